"""``twistd lbproxy-terminal``: a terminal publishes its own care-of address changes (claim 13).

Runs on the terminal.  It watches the kernel's IPv6 address events (a netlink socket joined
to ``RTMGRP_IPV6_IFADDR``, read by the reactor), re-reads the addresses when one arrives (and
every ``poll_interval`` seconds, in case an event was missed), picks the care-of address, and
when it changed records a new binding -- next sequence number modulo 2**16, kept in
``state_file`` across restarts so a restarted agent is not taken for a replay -- in its
one-entry ``BindingCache``, which the notification agent publishes to subscribed balancers.
Like a mobile node (RFC 6275 §11.7.1) it registers again before the binding's lifetime
runs out -- at half of it, from the same care-of address, with the next sequence number --
so the balancer's confirmation never lapses while the terminal stays put.

A terminal on a mobile network cannot be dialled: with ``[agent] connect`` the agent dials
its balancers instead (mutual TLS, the balancer proving one of ``balancers`` with
``serverAuth``, the terminal its home address as an IP subjectAltName) and the balancer
subscribes over that connection; ``listen`` is then optional.

The choice (:func:`choose_care_of`) is pure: a global, usable (not tentative, deprecated or
failed) address outside the home prefix, on the configured interface if one is given; the
home address itself when only home-prefix addresses are present (the terminal is at home).
"""

from __future__ import annotations

import ipaddress
import os
import socket
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import attrs
from twisted.application.internet import StreamServerEndpointService, TimerService
from twisted.application.service import MultiService, Service
from twisted.internet.endpoints import clientFromString, serverFromString
from twisted.internet.interfaces import IDelayedCall, IReactorFDSet, IReactorTime
from twisted.logger import Logger
from twisted.python import usage
from zope.interface import Interface, implementer

from lbproxy import preflight
from lbproxy.agents.config import TerminalConfig, load_terminal
from lbproxy.agents.link import SocketReader
from lbproxy.notify.agent import NotificationAgent
from lbproxy.notify.cache import BindingCache, CacheChange
from lbproxy.notify.policy import HomeAddressEntitlement
from lbproxy.notify.tls import TlsMaterial
from lbproxy.ops.systemd import for_agent

log = Logger()

IFA_F_DADFAILED = 0x08
IFA_F_DEPRECATED = 0x20
IFA_F_TENTATIVE = 0x40
UNUSABLE = IFA_F_DADFAILED | IFA_F_DEPRECATED | IFA_F_TENTATIVE
RT_SCOPE_UNIVERSE = 0
RTMGRP_IPV6_IFADDR = 0x100


@attrs.frozen
class AddressInfo:
    """One IPv6 address on one interface, as the kernel reports it."""

    interface: str
    address: bytes
    flags: int = 0
    scope: int = RT_SCOPE_UNIVERSE


def choose_care_of(
    addresses: Iterable[AddressInfo],
    home: bytes,
    home_prefix: ipaddress.IPv6Network,
    interface: str = "",
) -> bytes | None:
    """The care-of address to announce, the home address when at home, ``None`` when
    there is no usable global address at all."""
    at_home = False
    candidates = []
    for info in addresses:
        if info.scope != RT_SCOPE_UNIVERSE or info.flags & UNUSABLE:
            continue
        if interface and info.interface != interface:
            continue
        address = ipaddress.IPv6Address(info.address)
        if info.address == home or address in home_prefix:
            at_home = True
            continue
        if address.is_loopback or address.is_link_local or address.is_multicast:
            continue
        candidates.append(info.address)
    if candidates:
        return min(candidates)
    return home if at_home else None


class SequenceStore:
    """The last sequence number used, in a small file (or only in memory)."""

    def __init__(self, path: str = "") -> None:
        self.path = path

    def load(self) -> int:
        """The stored number, or a fresh random one."""
        if self.path:
            try:
                return int(Path(self.path).read_text().strip()) & 0xFFFF
            except (OSError, ValueError):
                pass
        return int.from_bytes(os.urandom(2), "big")

    def save(self, seq: int) -> None:
        """Store ``seq`` atomically (best effort)."""
        if not self.path:
            return
        tmp = Path(self.path + ".tmp")
        try:
            tmp.write_text(f"{seq}\n")
            tmp.replace(self.path)
        except OSError as e:
            log.warn("terminal agent: cannot save sequence number: {error}", error=e)


class CareOfTracker:
    """Turns address sets into the terminal's own binding, one sequence number per move."""

    def __init__(
        self,
        cache: BindingCache,
        home: bytes,
        home_prefix: ipaddress.IPv6Network,
        lifetime: int,
        clock: IReactorTime,
        store: SequenceStore,
        interface: str = "",
    ) -> None:
        self.cache = cache
        self.home = home
        self.home_prefix = home_prefix
        self.lifetime = lifetime
        self.clock = clock
        self.store = store
        self.interface = interface
        self.seq = store.load()
        self.care_of: bytes | None = None
        self._renewal: IDelayedCall | None = None
        self.registrations = 0  # bindings recorded (moves and re-registrations)

    def addresses_changed(self, addresses: Iterable[AddressInfo]) -> CacheChange | None:
        """Re-evaluate; on a move, record the new binding (notifying subscribers)."""
        now = self.clock.seconds()
        chosen = choose_care_of(addresses, self.home, self.home_prefix, self.interface)
        if chosen is None:
            return None  # no connectivity: keep the last binding until it expires
        if chosen == self.care_of and chosen == self.home:
            return None
        if chosen == self.care_of and self.cache.get(self.home) is not None:
            # Refresh our binding's lifetime with the same sequence number.
            self.cache.update(self.home, chosen, self.seq, self.lifetime, now)
            return None
        # A move (or our binding expired in the cache): a new sequence number.
        change = self._register(chosen, now)
        log.info(
            "terminal agent: care-of address {coa} (seq {seq})",
            coa=str(ipaddress.IPv6Address(chosen)),
            seq=self.seq,
        )
        return change

    def _register(self, care_of: bytes, now: float) -> CacheChange | None:
        """Record a binding at ``care_of`` with the next sequence number; plan the
        re-registration at half its lifetime."""
        self.seq = (self.seq + 1) & 0xFFFF
        self.store.save(self.seq)
        self.care_of = care_of
        lifetime = 0 if care_of == self.home else self.lifetime
        change = self.cache.update(self.home, care_of, self.seq, lifetime, now)
        self.registrations += 1
        self._plan(lifetime)
        return change

    def _plan(self, lifetime: int) -> None:
        self.stop()
        if lifetime > 0:
            self._renewal = self.clock.callLater(lifetime / 2, self.reregister)

    def reregister(self) -> CacheChange | None:
        """Register again from the current care-of address before the lifetime runs out
        (RFC 6275 §11.7.1): the next sequence number, the whole lifetime again."""
        self._renewal = None
        if self.care_of is None or self.care_of == self.home:
            return None
        return self._register(self.care_of, self.clock.seconds())

    def stop(self) -> None:
        """Cancel the planned re-registration."""
        if self._renewal is not None and self._renewal.active():
            self._renewal.cancel()
        self._renewal = None


class IAddressSource(Interface):
    """Where the terminal's addresses come from (netlink; a fake in tests)."""

    def addresses() -> list[AddressInfo]:
        """Every IPv6 address on every interface now."""


@implementer(IAddressSource)
class NetlinkAddresses:
    """Reads addresses with pyroute2 (a netlink dump)."""

    def addresses(self) -> list[AddressInfo]:
        """Every IPv6 address on every interface now."""
        from pyroute2 import IPRoute

        with IPRoute() as ipr:
            names = {link["index"]: link.get_attr("IFLA_IFNAME") for link in ipr.get_links()}
            result = []
            for msg in ipr.get_addr(family=socket.AF_INET6):
                flags = msg.get_attr("IFA_FLAGS") or msg["flags"]
                result.append(AddressInfo(
                    names.get(msg["index"], ""),
                    ipaddress.IPv6Address(msg.get_attr("IFA_ADDRESS")).packed,
                    flags,
                    msg["scope"],
                ))
            return result


class AddressEvents(SocketReader):
    """A netlink socket joined to the IPv6 address group; any message means "look again"."""

    def __init__(self, reactor: IReactorFDSet, changed: Callable[[], object]) -> None:
        self.reactor = reactor
        self.changed = changed
        self.sock: socket.socket | None = None
        self.events = 0

    def open(self) -> None:
        sock = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, socket.NETLINK_ROUTE)
        sock.setblocking(False)
        sock.bind((0, RTMGRP_IPV6_IFADDR))
        self.sock = sock

    def doRead(self) -> None:
        got = False
        while self.sock is not None:
            try:
                self.sock.recv(65536)
            except BlockingIOError:
                break
            except OSError:  # ENOBUFS: events were lost; a re-read covers them
                got = True
                break
            got = True
        if got:
            self.events += 1
            self.changed()


class WatchService(Service):
    """Re-reads addresses on netlink events and every ``poll_interval`` seconds."""

    def __init__(
        self,
        tracker: CareOfTracker,
        source: IAddressSource,
        reactor: Any,
        poll_interval: float,
        events: bool = True,
    ) -> None:
        self.tracker = tracker
        self.source = source
        self.reactor = reactor
        self.events = AddressEvents(reactor, self.poll) if events else None
        self.timer = TimerService(poll_interval, self.poll)
        self.timer.clock = reactor

    def poll(self) -> None:
        """Read the addresses now and tell the tracker."""
        try:
            addresses = self.source.addresses()
        except Exception:
            log.failure("terminal agent: reading addresses failed")
            return
        self.tracker.addresses_changed(addresses)

    def startService(self) -> None:
        super().startService()
        if self.events is not None:
            self.events.start()
        self.timer.startService()
        log.info("terminal agent: watching addresses")

    def stopService(self) -> Any:
        super().stopService()
        if self.events is not None:
            self.events.stop()
        self.tracker.stop()
        return self.timer.stopService()


class Options(usage.Options):
    """Command-line options of ``twistd lbproxy-terminal``."""

    optParameters = [
        ["config", "c", "/etc/lbproxy/terminal.toml", "Path to the configuration file."],
    ]
    optFlags = [
        ["check", None, "Check the configuration and this host (preflight), then exit: "
                        "status 0 when the agent would start."],
    ]

    def postOptions(self) -> None:
        """Load the configuration; a bad one is refused with one line ``file: key:
        reason`` on stderr and exit status 1 (`preflight.Refused`: no usage block)."""
        self["loaded"] = preflight.load_or_refuse(load_terminal, self["config"])
        if self["check"]:
            preflight.check_only(preflight.check_terminal(self["loaded"]), self["config"])


class TerminalService(MultiService):
    """Everything one terminal agent runs; its parts are attributes for tests/operators."""

    def __init__(
        self,
        config: TerminalConfig,
        reactor: Any,
        material: TlsMaterial,
        source: IAddressSource | None = None,
        events: bool = True,
    ) -> None:
        super().__init__()
        home = config.home.packed
        self.cache = BindingCache(1)
        common = config.common
        self.agent = NotificationAgent(
            self.cache,
            HomeAddressEntitlement(home),
            common.balancers,
            reactor,
            common.max_subscriptions,
            call_timeout=common.call_timeout,
            handshake_timeout=common.handshake_timeout,
            max_outstanding=common.max_outstanding,
        )
        self.listening: StreamServerEndpointService | None = None
        if common.listen:
            self.listening = StreamServerEndpointService(
                serverFromString(reactor, common.listen), self.agent.tls_factory(material)
            )
            self.listening.setServiceParent(self)
        #: One reconnecting connection to each balancer in ``[agent] connect``.
        self.dialling = [self.agent.dial(clientFromString(reactor, endpoint), material)
                         for endpoint in common.connect]  # fmt: skip
        for service in self.dialling:
            service.setServiceParent(self)
        self.tracker = CareOfTracker(
            self.cache, home, config.home_prefix, config.lifetime, reactor,
            SequenceStore(config.state_file), config.interface,
        )
        self.watch = WatchService(
            self.tracker, source or NetlinkAddresses(), reactor, config.poll_interval, events
        )
        self.watch.setServiceParent(self)


def makeService(options: Options) -> TerminalService:
    """Check the host (`preflight.check_terminal`: one line per problem, exit status 1),
    then build the agent from its already loaded configuration."""
    config: TerminalConfig = options["loaded"]
    preflight.refuse(preflight.check_terminal(config))
    material = preflight.agent_tls(config.path, config.common)
    from twisted.internet import reactor

    service = TerminalService(config, reactor, material)
    # READY=1 and the watchdog under systemd (Type=notify), after the services above start.
    for_agent(service, reactor, "terminal agent").setServiceParent(service)
    return service
