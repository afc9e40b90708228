"""``twistd lbproxy-homeagent``: publishes a home agent's binding changes (claim 12).

Runs beside a home agent.  It learns bindings from the Binding Updates and Acknowledgements
on the home link (``observer.LinkObserver`` over ``link.LinkReader``) and from home-agent
software that pushes them (``command``), keeps them in a ``BindingCache``, and serves
balancers over the notification protocol (``lbproxy.notify.agent``): on request (Subscribe,
GetSnapshot), on change (BindingChanged) and periodically (BindingSnapshot).  A terminal's
re-registration from the care-of address it already has (a newer sequence number) is passed
on as well, so the balancer's confirmation lives as long as the binding does.
"""

from __future__ import annotations

from typing import Any

from twisted.application.internet import StreamServerEndpointService, TimerService
from twisted.application.service import MultiService, Service
from twisted.internet.endpoints import UNIXServerEndpoint, serverFromString
from twisted.logger import Logger
from twisted.python import usage

from lbproxy import preflight
from lbproxy.agents.command import command_factory
from lbproxy.agents.config import HomeAgentConfig, load_homeagent
from lbproxy.agents.link import LinkReader
from lbproxy.agents.observer import LinkObserver
from lbproxy.notify.agent import NotificationAgent
from lbproxy.notify.cache import BindingCache
from lbproxy.notify.policy import PrefixEntitlement
from lbproxy.notify.tls import TlsMaterial
from lbproxy.ops.systemd import for_agent

log = Logger()


class Options(usage.Options):
    """Command-line options of ``twistd lbproxy-homeagent``."""

    optParameters = [
        ["config", "c", "/etc/lbproxy/homeagent.toml", "Path to the configuration file."],
    ]
    optFlags = [
        ["check", None, "Check the configuration and this host (preflight), then exit: "
                        "status 0 when the agent would start."],
    ]

    def postOptions(self) -> None:
        """Load the configuration; a bad one is refused with one line ``file: key:
        reason`` on stderr and exit status 1 (`preflight.Refused`: no usage block)."""
        self["loaded"] = preflight.load_or_refuse(load_homeagent, self["config"])
        if self["check"]:
            preflight.check_only(preflight.check_homeagent(self["loaded"]), self["config"])


class LinkService(Service):
    """Opens the link socket as root (privilegedStartService), reads while running."""

    def __init__(self, reader: LinkReader) -> None:
        self.reader = reader

    def privilegedStartService(self) -> None:
        super().privilegedStartService()
        self.reader.open()

    def startService(self) -> None:
        super().startService()
        self.reader.start()
        log.info("home-agent agent: observing {interface}", interface=self.reader.interface)

    def stopService(self) -> None:
        super().stopService()
        self.reader.stop()


class HomeAgentService(MultiService):
    """Everything one home-agent agent runs; its parts are attributes for tests/operators."""

    def __init__(self, config: HomeAgentConfig, reactor: Any, material: TlsMaterial) -> None:
        super().__init__()
        self.config = config
        self.entitlement = PrefixEntitlement(config.prefixes)
        self.cache = BindingCache(config.max_bindings)
        self.agent = NotificationAgent(
            self.cache,
            self.entitlement,
            config.common.balancers,
            reactor,
            config.common.max_subscriptions,
            call_timeout=config.common.call_timeout,
            handshake_timeout=config.common.handshake_timeout,
            max_outstanding=config.common.max_outstanding,
        )
        self.observer = LinkObserver(
            self.cache, self.entitlement, reactor, config.require_ack, config.ack_timeout
        )
        # Observe before accepting balancers: a balancer that (re)subscribes must not
        # miss a Binding Update that crosses the link while we are still starting.
        self.link: LinkService | None = None
        if config.interface:
            self.link = LinkService(LinkReader(reactor, config.interface, self.observer.frame))
            self.link.setServiceParent(self)
        self.listening = StreamServerEndpointService(
            serverFromString(reactor, config.common.listen), self.agent.tls_factory(material)
        )
        self.listening.setServiceParent(self)
        if config.command_socket:
            endpoint = UNIXServerEndpoint(reactor, config.command_socket, mode=0o600)
            StreamServerEndpointService(
                endpoint, command_factory(self.cache, self.entitlement, reactor)
            ).setServiceParent(self)
        expiry = TimerService(1.0, lambda: self.cache.expire(reactor.seconds()))
        expiry.clock = reactor
        expiry.setServiceParent(self)


def makeService(options: Options) -> HomeAgentService:
    """Check the host (`preflight.check_homeagent`: one line per problem, exit status 1),
    then build the agent from its already loaded configuration."""
    config: HomeAgentConfig = options["loaded"]
    preflight.refuse(preflight.check_homeagent(config))
    material = preflight.agent_tls(config.path, config.common)
    from twisted.internet import reactor

    service = HomeAgentService(config, reactor, material)
    # READY=1 and the watchdog under systemd (Type=notify), after the services above start.
    for_agent(service, reactor, "home-agent agent").setServiceParent(service)
    return service
