"""twistd glue: ``twistd lbproxy --config FILE`` builds the balancer's service tree.

The configuration is read while the options are parsed, so a bad file stops twistd
before anything starts, with one line naming the file, the key and the reason; then
`makeService` checks the host (``lbproxy.preflight``) before it builds anything, and only
it hands the real reactor to the rest of the program.
"""

from __future__ import annotations

import signal
from typing import Any

from twisted.application.service import IServiceCollection, MultiService
from twisted.logger import Logger
from twisted.python import usage

from lbproxy import preflight
from lbproxy.config import Config, ConfigError, load_config
from lbproxy.core.balancer import Balancer
from lbproxy.core.keys import KeyChain
from lbproxy.core.selection import Backend, scheduler_from_name
from lbproxy.core.table import StickyTable
from lbproxy.fleet.service import FleetService
from lbproxy.io.forwarder import ForwarderService
from lbproxy.io.rawsocket import IPacketSystem, LinuxPacketSystem
from lbproxy.notify.adapter import TableListener
from lbproxy.notify.router import Notifier
from lbproxy.ops.control import Control
from lbproxy.ops.ctl import make_ctl_service
from lbproxy.ops.health import HealthMonitor, make_health_service, make_probe
from lbproxy.ops.manhole import make_manhole_service
from lbproxy.ops.metrics import make_metrics_service
from lbproxy.ops.persistence import make_persistence_service
from lbproxy.ops.systemd import for_balancer as systemd_service

__all__ = ["BalancerService", "Options", "build_balancer", "makeService"]

_log = Logger()


class Options(usage.Options):
    """Command-line options of ``twistd lbproxy``."""

    optParameters = [
        ["config", "c", "/etc/lbproxy/lbproxy.toml", "Path to the configuration file."],
    ]
    optFlags = [
        ["check", None, "Check the configuration and this host (preflight), then exit: "
                        "status 0 when lbproxy would start."],
    ]

    def postOptions(self) -> None:
        """Load the configuration; a bad one is refused with one line ``file: key:
        reason`` on stderr and exit status 1 (`preflight.Refused`: no usage block)."""
        self["loaded"] = preflight.load_or_refuse(load_config, self["config"])
        if self["check"]:
            preflight.check_only(preflight.check_balancer(self["loaded"]), self["config"])


def backends_from(config: Config) -> list[Backend]:
    """The configured backends as scheduler values."""
    return [Backend(name=b.name, address=b.address, weight=b.weight) for b in config.backends]


def key_chain_from(config: Config) -> KeyChain:
    """The configured KeyChain, from the strategy registry; each strategy gets the
    configuration's options it declares (``Config.key_chain_options``)."""
    return KeyChain.from_names(config.key_chain, **config.key_chain_options())


def build_balancer(config: Config, clock: Any) -> Balancer:
    """The pure core for a configuration: key chain, table, scheduler, balancer."""
    return Balancer(
        chain=key_chain_from(config),
        table=StickyTable(clock, config.lifetime, config.max_entries),
        scheduler=scheduler_from_name(config.scheduler),
        backends=backends_from(config),
        virtual_addresses=config.virtual_addresses,
        clock=clock,
        mode=config.mode,
        ports=config.ports,
        reassign_dead=config.health.dead_backend == "reassign",
    )


class BalancerService(MultiService):
    """The balancer process: forwarding plus the operator and control services.

    Holds the live objects (`config`, `balancer`) so the manhole, lbproxyctl and reload
    all act on the same ones the data path uses.
    """

    def __init__(
        self,
        config: Config,
        reactor: Any,
        install_sighup: bool = True,
        system: IPacketSystem | None = None,
    ) -> None:
        super().__init__()
        self.install_sighup = install_sighup
        self.config = config
        self.reactor = reactor
        self.balancer = build_balancer(config, reactor)
        # Persistence first: the table is restored before the first packet and saved
        # after the forwarder has stopped.
        if config.persistence_path:
            make_persistence_service(
                self.balancer.table,
                config.persistence_path,
                lambda: self.balancer.backends,
                reactor,
                config.persistence_interval,
                return_paths=self.balancer.return_paths,
                max_bytes=config.persistence_max_bytes,
                subscriptions=lambda: self.notifier,  # saved and restored with the table
            ).setServiceParent(self)
        # The fleet (docs/fleet.md): after persistence, so a restored table's exceptions
        # are published; before the forwarder, so the replica starts loading first.
        self.fleet: FleetService | None = None
        if config.fleet.enabled:
            self.fleet = FleetService.from_config(config.fleet, self.balancer, reactor)
            self.balancer.shared = self.fleet.replica
            self.fleet.setServiceParent(self)
        self.forwarder = ForwarderService(
            self.balancer,
            system if system is not None else LinuxPacketSystem(),
            reactor,
            reactor,
            client_interface=config.client_interface,
            server_interface=config.server_interface,
            batch=config.batch,
            sweep_interval=config.sweep_interval,
            link_send=config.link_send,
        )
        self.forwarder.setServiceParent(self)
        self.notifier: Notifier | None = None
        if config.notify.enabled:
            self.notifier = Notifier.from_config(
                config.notify,
                reactor,
                TableListener(self.balancer.table, self.fleet.return_paths() if self.fleet
                              else self.balancer.return_paths),  # fleet: confirmations shared
                local=lambda: self.balancer.policy,  # care-of addresses: not VIPs, backends, us
            )
            self.notifier.setServiceParent(self)
            self.balancer.terminal_seen = self._terminal_seen
        self.health = self._health_service(config)
        self.control = Control(self.balancer, reload=self.reload, ports=self.forwarder.port_stats)
        if config.control_socket:
            make_ctl_service(config.control_socket, self.control, reactor).setServiceParent(self)
        if config.manhole_endpoint:
            make_manhole_service(
                self.control,
                config.manhole_host_key,
                config.manhole_authorized_keys,
                config.manhole_endpoint,
                reactor,
            ).setServiceParent(self)
        if config.metrics_endpoint:
            notifier = self.notifier
            make_metrics_service(
                config.metrics_endpoint,
                self.control,
                reactor,
                notify=notifier.counters if notifier else None,
                peer_states=(
                    (lambda: {n: c.machine.state for n, c in notifier.clients.items()})
                    if notifier
                    else None
                ),
                subscriptions=notifier.subscriptions if notifier else None,
            ).setServiceParent(self)
        # systemd's readiness and watchdog (lbproxy.ops.systemd): the last child, so it
        # starts after every other service.
        systemd_service(self, reactor).setServiceParent(self)

    def _terminal_seen(self, home: bytes | None, source: bytes) -> None:
        """A terminal's first packet: subscribe to its care-of address changes (claims 5, 6)."""
        if self.notifier is None:
            return
        if home is not None:
            self.notifier.terminal_seen(home, home=True)
        else:
            self.notifier.terminal_seen(source, home=False)

    def _health_service(self, config: Config) -> HealthMonitor | None:
        """Health checks for the backends that ask for one; they mark backends up/down."""
        probes = {}
        for b in config.backends:
            probe = make_probe(b.health, self.reactor, str(b.address), b.health_port,
                               config.health.timeout, b.health_path)
            if probe is not None:
                probes[b.name] = probe
        if not probes:
            return None
        service = make_health_service(
            probes,
            self.reactor,
            self.balancer.set_backend_up,
            interval=config.health.interval,
            timeout=config.health.timeout,
            rise=config.health.rise,
            fall=config.health.fall,
        )
        service.setServiceParent(self)
        return service

    def reload(self) -> str:
        """Apply the configuration file again without losing the table.

        Backends, weights, key chain, scheduler, virtual addresses and ports change in
        place; an invalid file raises `ConfigError` and the running configuration stays.
        Interfaces, mode and table sizing need a restart and are reported, not applied.
        """
        new = load_config(self.config.path)
        balancer = self.balancer
        fresh = build_balancer(new, self.reactor)
        balancer.chain = fresh.chain
        balancer.scheduler = fresh.scheduler
        balancer.set_virtual_addresses(new.virtual_addresses, new.ports)
        self.forwarder.client.set_destinations([a.packed for a in new.virtual_addresses])
        balancer.reassign_dead = fresh.reassign_dead
        balancer.set_backends(backends_from(new))
        # Health checks follow the new backend list (a removed backend is no longer
        # probed, an added one is); surviving backends keep their up/down state in the
        # balancer until the new monitor's first verdict on them.
        if self.health is not None:
            self.health.disownServiceParent()
        self.health = self._health_service(new)
        restart = [
            name
            for name in ("client_interface", "server_interface", "mode", "lifetime",
                         "max_entries", "batch", "link_send")
            if getattr(new, name) != getattr(self.config, name)
        ]
        self.config = new
        if restart:
            return "applied; needs a restart to change: " + ", ".join(restart)
        return "applied"


    def startService(self) -> None:
        super().startService()
        if self.install_sighup:
            signal.signal(signal.SIGHUP, self._sighup)

    def _sighup(self, signum: int, frame: object) -> None:
        self.reactor.callFromThread(self._reload_logged)

    def _reload_logged(self) -> None:
        try:
            outcome = self.reload()
        except ConfigError as e:
            _log.error("reload refused, the running configuration stays: {error}", error=e)
        except Exception:
            _log.failure("reload failed, the running configuration stays")
        else:
            _log.info("reload: {outcome}", outcome=outcome)


def makeService(options: Options) -> IServiceCollection:
    """Check the host (`preflight.check_balancer`: one line per problem, exit status 1),
    then build the balancer's service tree from the already loaded configuration."""
    config: Config = options["loaded"]
    preflight.refuse(preflight.check_balancer(config))
    from twisted.internet import reactor

    return BalancerService(config, reactor)
