"""twistd glue: ``twistd lbproxy --config FILE`` builds the balancer's service tree.

The configuration is read while the options are parsed, so a bad file stops twistd
before anything starts, with one line naming the file, the key and the reason.  Only
`makeService` hands the real reactor to the rest of the program.
"""

from __future__ import annotations

from typing import Any

from twisted.application.service import IServiceCollection, MultiService
from twisted.python import usage

from lbproxy.balancer import Balancer
from lbproxy.config import Config, ConfigError, load_config
from lbproxy.forwarder import ForwarderService
from lbproxy.keys import KeyChain
from lbproxy.rawsocket import LinuxPacketSystem
from lbproxy.selection import Backend, scheduler_from_name
from lbproxy.table import StickyTable

__all__ = ["BalancerService", "Options", "build_balancer", "makeService"]


class Options(usage.Options):
    """Command-line options of ``twistd lbproxy``."""

    optParameters = [
        ["config", "c", "/etc/lbproxy/lbproxy.toml", "Path to the configuration file."],
    ]

    def postOptions(self) -> None:
        try:
            self["loaded"] = load_config(self["config"])
        except ConfigError as e:
            raise usage.UsageError(f"refusing to start: {e}") from None


def backends_from(config: Config) -> list[Backend]:
    """The configured backends as scheduler values."""
    return [Backend(name=b.name, address=b.address, weight=b.weight) for b in config.backends]


def build_balancer(config: Config, clock: Any) -> Balancer:
    """The pure core for a configuration: key chain, table, scheduler, balancer."""
    return Balancer(
        chain=KeyChain.from_names(config.key_chain, any_interface_id=config.any_interface_id),
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

    def __init__(self, config: Config, reactor: Any) -> None:
        super().__init__()
        self.config = config
        self.reactor = reactor
        self.balancer = build_balancer(config, reactor)
        self.forwarder = ForwarderService(
            self.balancer,
            LinuxPacketSystem(),
            reactor,
            reactor,
            client_interface=config.client_interface,
            server_interface=config.server_interface,
            batch=config.batch,
            sweep_interval=config.sweep_interval,
        )
        self.forwarder.setServiceParent(self)


def makeService(options: Options) -> IServiceCollection:
    """Build the balancer's service tree from the already loaded configuration."""
    from twisted.internet import reactor

    config: Config = options["loaded"]
    return BalancerService(config, reactor)
