"""twistd glue: ``twistd lbproxy --config FILE`` builds the balancer's service tree.

The configuration is read while the options are parsed, so a bad file stops twistd
before anything starts, with one line naming the file, the key and the reason; then
`makeService` checks the host (``lbproxy.preflight``) before it builds anything, and only
it hands the real reactor to the rest of the program.
"""

from __future__ import annotations

import contextlib
import os
import signal
from collections.abc import Callable
from typing import Any

import attrs
from twisted.application.internet import StreamServerEndpointService
from twisted.application.service import IService, IServiceCollection, MultiService, Service
from twisted.internet.defer import (
    Deferred,
    DeferredLock,
    fail,
    gatherResults,
    maybeDeferred,
    succeed,
)
from twisted.internet.task import LoopingCall
from twisted.logger import Logger
from twisted.python import usage

from lbproxy import preflight
from lbproxy.config import Config, load_config
from lbproxy.core.actions import Weights
from lbproxy.core.balancer import Balancer
from lbproxy.core.correspondent import Correspondent
from lbproxy.core.journey import Journeys
from lbproxy.core.keys import KeyChain
from lbproxy.core.selection import Backend, scheduler_from_name
from lbproxy.core.table import StickyTable
from lbproxy.fleet.service import FleetCollector, FleetService
from lbproxy.io.forwarder import ForwarderService
from lbproxy.io.rawsocket import IPacketSystem, LinuxPacketSystem
from lbproxy.notify.adapter import TableListener
from lbproxy.notify.reconfigure import NotifyChange
from lbproxy.notify.reconfigure import prepare as prepare_notify
from lbproxy.notify.router import Notifier
from lbproxy.ops import logs
from lbproxy.ops.audit import audit
from lbproxy.ops.control import Control
from lbproxy.ops.ctl import make_ctl_service
from lbproxy.ops.health import HealthMonitor, HealthState, make_health_service, make_probe
from lbproxy.ops.manhole import make_manhole_service
from lbproxy.ops.metrics import make_metrics_service
from lbproxy.ops.persistence import TablePersistence, remove_orphans
from lbproxy.ops.reload import (
    APPLIES,
    FIELDS,
    PARTLY,
    RESTART,
    Field,
    ReloadRefusedError,
    ReloadReport,
    backend_changes,
    differences,
    notify_differences,
    pending,
    restart_fields,
)
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
        reason`` on stderr and exit status 1 (`preflight.Refused`: no usage block).
        ``[logging] format = "json"`` sets twistd's log observer (`lbproxy.ops.logs`)."""
        self["loaded"] = preflight.load_or_refuse(load_config, self["config"])
        if self["loaded"].logging_format == "json":
            logs.use_json(self.parent)
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
    """The pure core for a configuration: key chain, table, scheduler, balancer (and
    the correspondent node, ``[correspondent]``)."""
    balancer = Balancer(
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
    cn = config.correspondent
    if cn.mode != "off":
        balancer.serve_as_correspondent(Correspondent(
            clock, strict=cn.mode == "strict", max_entries=config.max_entries,
            max_lifetime=cn.max_lifetime, binding_error_rate=cn.binding_error_rate,
        ))  # fmt: skip
    return balancer


class BalancerService(MultiService):
    """The balancer process: forwarding plus the operator and control services.

    Holds the live objects (`config`, `balancer`) so the manhole, lbproxyctl and reload
    all act on the same ones the data path uses.  `config` is the configuration *in
    force*: after a reload, the file's values for what the reload applied and the
    running values for what needs a restart (`lbproxy.ops.reload`).
    """

    def __init__(
        self,
        config: Config,
        reactor: Any,
        install_sighup: bool = True,
        system: IPacketSystem | None = None,
        host: preflight.Host | None = None,
    ) -> None:
        super().__init__()
        self.install_sighup = install_sighup
        self.config = config
        self.reactor = reactor
        #: What reload's start-up checks ask about this host (tests give a fake).
        self.host = host if host is not None else preflight.Host()
        self.balancer = build_balancer(config, reactor)
        #: The terminals' journeys (lbproxyctl journey), followed once started: after
        #: persistence restored the table (journeys are not saved; docs/journey.md).
        self.journeys = Journeys(reactor, config.journeys) if config.journeys else None
        #: The configured weights and the operator's overrides over them.
        self.weights = Weights(self.balancer.backends.values())
        self._reload_lock = DeferredLock()
        # Persistence first: the table is restored before the first packet and saved
        # after the forwarder has stopped.
        self.persistence: TablePersistence | None = None
        if config.persistence_path:
            self.persistence = self._persistence_service(config, TablePersistence)
            self.persistence.setServiceParent(self)
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
            offload=config.offload,
            config_path=config.path,
        )
        self.forwarder.setServiceParent(self)
        self.notifier: Notifier | None = None
        if config.notify.enabled:
            self.notifier = Notifier.from_config(
                config.notify,
                reactor,
                TableListener(self.balancer.table, self.fleet.return_paths() if self.fleet
                              else self.balancer.return_paths,  # fleet: confirmations shared
                              journeys=self.journeys),
                local=lambda: self.balancer.policy,  # care-of addresses: not VIPs, backends, us
                terminals=self._known_terminals,  # asked of a peer a reload adds (notify)
            )
            self.notifier.setServiceParent(self)
            self.balancer.terminal_seen = self._terminal_seen
        self.health = self._health_service(config)
        self.control = Control(
            self.balancer,
            reload=self.reload,
            ports=self.forwarder.port_stats,
            weights=self.weights,
            status=self.status,
            forwarding=lambda: bool(self.forwarder.running),
            notifier=self.notifier,
            fleet=self.fleet,
            offload=lambda: self.forwarder.xdp,
        )
        self.ctl: IService | None = None
        self.manhole: IService | None = None
        self.metrics: IService | None = None
        if config.control_socket:
            self.ctl = self._ctl_service(config)
            self.ctl.setServiceParent(self)
        if config.manhole_endpoint:
            self.manhole = self._manhole_service(config)
            self.manhole.setServiceParent(self)
        if config.metrics_endpoint:
            self.metrics = self._metrics_service(config)
            self.metrics.setServiceParent(self)
        # systemd's readiness and watchdog (lbproxy.ops.systemd): the last child, so it
        # starts after every other service.
        systemd_service(self, reactor).setServiceParent(self)

    # -- the services a reload may replace ------------------------------------------

    def _persistence_service(
        self, config: Config, kind: type[TablePersistence]
    ) -> TablePersistence:
        return kind(
            self.balancer.table,
            config.persistence_path,
            lambda: self.balancer.backends,
            self.reactor,
            config.persistence_interval,
            return_paths=self.balancer.return_paths,
            max_bytes=config.persistence_max_bytes,
            subscriptions=lambda: self.notifier,  # saved and restored with the table
            correspondent=self.balancer.correspondent,  # its binding cache, too
        )

    def _ctl_service(self, config: Config) -> IService:
        return make_ctl_service(config.control_socket, self.control, self.reactor)

    def _manhole_service(self, config: Config) -> IService:
        return make_manhole_service(
            self.control,
            config.manhole_host_key,
            config.manhole_authorized_keys,
            config.manhole_endpoint,
            self.reactor,
        )

    def _metrics_service(self, config: Config) -> IService:
        notifier = self.notifier
        return make_metrics_service(
            config.metrics_endpoint,
            self.control,
            self.reactor,
            notify=notifier.counters if notifier else None,
            peer_states=(
                (lambda: {n: c.machine.state for n, c in notifier.clients.items()})
                if notifier
                else None
            ),
            subscriptions=notifier.subscriptions if notifier else None,
            extra=[FleetCollector(self.fleet)] if self.fleet is not None else [],
        )

    def _known_terminals(self) -> list[tuple[bytes, bool]]:
        """The table's address bindings, for a notify peer a reload adds: (address, is it a
        home address -- a binding made with a Home Address option records a care-of)."""
        return [(key.value, binding.care_of is not None)
                for key, binding in self.balancer.table if key.kind == "addr"]  # fmt: skip

    def _terminal_seen(self, home: bytes | None, source: bytes) -> None:
        """A terminal's first packet: subscribe to its care-of address changes (claims 5, 6)."""
        if self.notifier is None:
            return
        if home is not None:
            self.notifier.terminal_seen(home, home=True)
        else:
            self.notifier.terminal_seen(source, home=False)

    def _health_service(self, config: Config) -> HealthMonitor | None:
        """Health checks for the backends that ask for one; they mark backends up/down.

        Each check starts from the state the balancer has for its backend (so a
        backend found down before a reload is reported up again when it recovers), and
        a backend no longer checked is up."""
        probes = {}
        for b in config.backends:
            probe = make_probe(b.health, self.reactor, str(b.address), b.health_port,
                               config.health.timeout, b.health_path)
            if probe is not None:
                probes[b.name] = probe
        for name in self.balancer.backends:
            if name not in probes and not self.balancer.is_up(name):
                self.balancer.set_backend_up(name, True)
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
        for name in probes:
            service.states[name] = HealthState(config.health.rise, config.health.fall,
                                               up=self.balancer.is_up(name))  # fmt: skip
        service.setServiceParent(self)
        return service

    # -- reload ----------------------------------------------------------------------

    def reload(self, who: str = "unknown") -> Deferred[ReloadReport]:
        """Apply the configuration file again without losing the table; fire with what
        was applied, what needs a restart, what was ignored and what failed.

        The file is compared with what is running (`config`), so a change that needs a
        restart is reported as such by every reload until the restart.  An invalid
        file, or one the start-up checks refuse in a section the reload would apply,
        fails with `ConfigError` (or `ReloadRefusedError`) and changes nothing.  Every
        reload is one audit line naming ``who``; reloads run one at a time.
        """
        return self._reload_lock.run(self._reload, who)

    def _reload(self, who: str) -> Deferred[ReloadReport]:
        running = self.config
        try:
            new = load_config(running.path)
            changed = differences(running, new)
            notes = self._check(new, changed)
            notify_change = self._notify_change(running, new)
        except ValueError as e:
            _log.error("reload refused, the running configuration stays ({who}): {error}",
                       who=who, error=e)  # fmt: skip
            return fail(e)
        applied: list[str] = []
        restart: list[str] = []
        ignored: list[str] = []
        failed: list[str] = []
        names = {f.name for f in changed}
        in_force = attrs.evolve(new, **restart_fields(running, new))
        for f in changed:
            if f.action == RESTART:
                restart.append(f.key + (f" ({notes[f.key]})" if f.key in notes else ""))
            elif f.action == PARTLY:  # [notify], key by key (reload.NOTIFY_FIELDS)
                for part in notify_differences(running.notify, new.notify):
                    if part.action == RESTART:
                        restart.append(part.key)
                    elif notify_change is None:  # notify is off, or nothing to do
                        applied.append(part.key)
        if notify_change is not None and self.notifier is not None:
            applied += notify_change.apply(self.notifier)[0]
        balancer = self.balancer
        if "backends" in names:
            overridden = self.weights.configure(backends_from(new))
            phrases = backend_changes(running.backends, new.backends, list(overridden))
            if phrases:
                applied.append(f"backend ({'; '.join(phrases)})")
            for name, (file_weight, override) in overridden.items():
                ignored.append(f"backend {name} weight {file_weight} (the operator's "
                               f"{override} stays until undrain {name})")  # fmt: skip
        if names & {"key_chain", "any_interface_id", "quic"}:
            balancer.chain = key_chain_from(new)
            applied += [f.key for f in changed
                        if f.name in ("key_chain", "any_interface_id", "quic")]  # fmt: skip
        if "scheduler" in names:
            balancer.scheduler = scheduler_from_name(new.scheduler)
            applied.append("balancer.scheduler")
        if names & {"backends", "scheduler"}:
            balancer.set_backends(self.weights.running())
        if names & {"virtual_addresses", "ports"}:
            balancer.set_virtual_addresses(new.virtual_addresses, new.ports)
            self.forwarder.client.set_destinations([a.packed for a in new.virtual_addresses])
            applied += [f.key for f in changed if f.section == "virtual"]
        if "health" in names or _probed(running) != _probed(new):
            balancer.reassign_dead = new.health.dead_backend == "reassign"
            if self.health is not None:
                self.health.disownServiceParent()
            self.health = self._health_service(new)
            if "health" in names:
                applied.append("health")
        if names & {"persistence_path", "persistence_interval", "persistence_max_bytes"}:
            self._replace_persistence(new)
            applied += [f.key for f in changed if f.section == "persistence"]
        if (names & {"manhole_authorized_keys", "manhole_host_key"}
                and "manhole_endpoint" not in names and self.manhole is not None):  # fmt: skip
            try:
                _factory(self.manhole).use_keys(new.manhole_host_key, new.manhole_authorized_keys)
            except Exception as e:
                failed.append(f"manhole keys ({_why(e)}; the old keys stay)")
                in_force = attrs.evolve(
                    in_force, manhole_host_key=running.manhole_host_key,
                    manhole_authorized_keys=running.manhole_authorized_keys)  # fmt: skip
            else:
                applied += [f.key for f in changed if f.name.startswith("manhole_")]
        sections: list[str] = []
        swaps: list[Deferred[bool]] = []
        for section, attribute, field, make in (
            ("manhole", "manhole", "manhole_endpoint", self._manhole_service),
            ("control", "ctl", "control_socket", self._ctl_service),
            ("metrics", "metrics", "metrics_endpoint", self._metrics_service),
        ):
            if field in names:
                sections.append(section)
                swaps.append(self._swap(section, attribute, running, new, make, applied, failed))
        self.config = in_force

        def done(moved: list[bool]) -> ReloadReport:
            for section, in_place in zip(sections, moved, strict=True):
                if not in_place:  # a listener that could not be replaced keeps the old values
                    self.config = attrs.evolve(self.config, **{
                        f.name: getattr(running, f.name) for f in FIELDS
                        if f.section == section and hasattr(running, f.name)
                    })
            report = ReloadReport(tuple(applied), tuple(restart), tuple(ignored), tuple(failed))
            audit(who, "reload", config=running.path, result=report.summary())
            return report

        return gatherResults(swaps, consumeErrors=True).addCallback(done)

    def _check(self, new: Config, changed: list[Field]) -> dict[str, str]:
        """The start-up checks for ``new``: problems in a changed section the reload
        would apply refuse it (`ReloadRefusedError`); those in a changed key that needs
        a restart are returned (key -> reason) for the answer."""
        applies = {f.section for f in changed if f.action == APPLIES}
        restarts = {f.key: f for f in changed if f.action == RESTART}
        refused = []
        notes: dict[str, str] = {}
        for problem in preflight.check_balancer(new, self.host):
            section = problem.key.split(".", 1)[0].split("[", 1)[0]
            if (section in applies and section in _LISTENING_SECTIONS) or (
                    problem.key in _NOTIFY_TLS and self.notifier is not None
                    and new.notify.enabled):  # fmt: skip
                refused.append(problem)  # notify: its TLS files are read on every reload
            for key in restarts:
                if problem.key == key or problem.key.startswith(key + "."):
                    notes[key] = f"a restart would fail: {problem.reason}"
        if refused:
            raise ReloadRefusedError(refused)
        return notes

    def _notify_change(self, running: Config, new: Config) -> NotifyChange | None:
        """What the reload changes in the running notifier (peers, TLS material, read
        again even from unchanged paths); refused whole (`ReloadRefusedError`) when the
        new ``[notify]`` cannot be used (lbproxy.notify.reconfigure)."""
        if self.notifier is None or not (running.notify.enabled and new.notify.enabled):
            return None
        found = prepare_notify(self.notifier, running.notify, new.notify, new.path,
                               self.reactor)  # fmt: skip
        if not isinstance(found, NotifyChange):
            raise ReloadRefusedError(found)
        return None if found.empty else found

    def _replace_persistence(self, new: Config) -> None:
        """Save to the new path, at the new interval, from now on: the old service
        stops (saving once more where it saved before), a new one starts that does not
        restore (the running table is newer than any file) and saves at once."""
        restored = None
        if self.persistence is not None:
            restored = self.persistence.last_restore
            self.persistence.disownServiceParent()
            self.persistence = None
        if new.persistence_path:
            service = self._persistence_service(new, _ContinuedPersistence)
            service.last_restore = restored
            service.setServiceParent(self)
            # First in the tree, as at start: stopped last, after the forwarder.
            self.services.remove(service)
            self.services.insert(0, service)
            self.persistence = service

    def _swap(
        self,
        section: str,
        attribute: str,
        running: Config,
        new: Config,
        make: Callable[[Config], IService],
        applied: list[str],
        failed: list[str],
    ) -> Deferred[bool]:
        """Replace a listener: stop the old one, start one for ``new``; if it cannot
        listen, start the old one again and say so in ``failed``.  Fires with whether the
        new one is in place."""
        old: IService | None = getattr(self, attribute)
        keys = [f.key for f in FIELDS if f.section == section
                and getattr(running, f.name) != getattr(new, f.name)]  # fmt: skip

        def start(config: Config) -> str | None:
            setattr(self, attribute, None)
            if not _enabled(section, config):
                return None
            try:
                service = make(config)
            except Exception as e:
                return _why(e)
            _raise_synchronously(service)
            try:
                service.setServiceParent(self)
            except Exception as e:
                with contextlib.suppress(Exception):
                    service.disownServiceParent()
                return _why(e)
            setattr(self, attribute, service)
            return None

        def replace(_: object) -> bool:
            problem = start(new)
            if problem is None:
                applied.extend(keys)
                return True
            again = start(running) if old is not None else None
            back = "the old one is back" if old is not None and again is None else (
                f"the old one could not restart either: {again}" if old is not None
                else "it stays off")  # fmt: skip
            failed.append(f"{section} ({problem}; {back})")
            _log.error("reload: {section} could not be replaced: {problem}; {back}",
                       section=section, problem=problem, back=back)  # fmt: skip
            return False

        stopped = maybeDeferred(old.disownServiceParent) if old is not None else succeed(None)
        return stopped.addBoth(replace)

    # -- what runs ----------------------------------------------------------------

    def status(self) -> dict[str, Any]:
        """The service's part of ``lbproxyctl info``: the configuration file, and which
        of its keys differ from what runs -- needing a restart, or a reload."""
        out: dict[str, Any] = {"config": self.config.path}
        # The offload in use (lbproxy.io.xdp), when the forwarder has one.
        reason = getattr(self.forwarder, "offload_reason", "")
        if getattr(self.forwarder, "xdp", None) is not None:
            out["offload"] = "xdp"
        elif reason:
            out["offload_reason"] = reason
        try:
            disk = load_config(self.config.path)
        except ValueError as e:
            out["config_error"] = str(e)
            return out
        out["pending_restart"], out["pending_reload"] = pending(self.config, disk)  # notify
        return out

    def startService(self) -> None:
        super().startService()
        if self.journeys is not None and self.balancer.journeys is None:  # journeys
            self.balancer.follow_journeys(self.journeys)
        self.control.started = self.reactor.seconds()
        if self.install_sighup:
            signal.signal(signal.SIGHUP, self._sighup)

    def _sighup(self, signum: int, frame: object) -> None:
        self.reactor.callFromThread(self._reload_logged)

    def _reload_logged(self) -> None:
        """A reload asked for by SIGHUP: the answer goes to the log only (the audit line;
        a refusal is logged by `reload`)."""
        d = maybeDeferred(self.reload, "SIGHUP")
        d.addErrback(lambda f: None if f.check(ValueError) else _log.failure(
            "reload failed, the running configuration stays", f))  # fmt: skip


_LISTENING_SECTIONS = frozenset({"manhole", "control", "metrics", "persistence"})
_NOTIFY_TLS = frozenset({"notify.ca", "notify.certificate", "notify.key"})


def _probed(config: Config) -> list[tuple[str, str, str, int, str]]:
    """What the health checks depend on in the backend list."""
    return [(b.name, str(b.address), b.health, b.health_port, b.health_path)
            for b in config.backends]  # fmt: skip


def _enabled(section: str, config: Config) -> bool:
    return bool({"manhole": config.manhole_endpoint, "control": config.control_socket,
                 "metrics": config.metrics_endpoint}[section])  # fmt: skip


def _factory(service: IService) -> Any:
    return getattr(service, "factory", None)


def _raise_synchronously(service: IService) -> None:
    """Make a listener's start raise when it cannot listen (rather than only logging),
    so a reload can say so and put the old one back."""
    if isinstance(service, StreamServerEndpointService):
        service._raiseSynchronously = True


def _why(error: BaseException) -> str:
    text = str(error) or type(error).__name__
    return text if len(text) <= 200 else text[:197] + "..."


class _ContinuedPersistence(TablePersistence):
    """Persistence that a reload starts or moves: it saves, but does not restore (the
    running table is newer than whatever the file holds)."""

    def startService(self) -> None:
        Service.startService(self)
        directory = os.path.dirname(os.path.abspath(self.path))
        try:
            preflight.make_private_directories(directory)
        except OSError as exc:
            _log.error("Cannot create {directory} for the saved table: {reason}",
                       directory=directory, reason=exc.strerror or exc)  # fmt: skip
        remove_orphans(self.path)
        self.save()
        self._periodic = LoopingCall(self.save)
        self._periodic.clock = self.clock
        self._periodic.start(self.interval, now=False).addErrback(
            lambda f: _log.failure("Periodic table save stopped", f)
        )

    def stopService(self) -> None:
        periodic = getattr(self, "_periodic", None)
        if periodic is not None and periodic.running:
            periodic.stop()
        super().stopService()


def makeService(options: Options) -> IServiceCollection:
    """Check the host (`preflight.check_balancer`: one line per problem, exit status 1),
    then build the balancer's service tree from the already loaded configuration."""
    config: Config = options["loaded"]
    preflight.refuse(preflight.check_balancer(config))
    from twisted.internet import reactor

    return BalancerService(config, reactor)
