"""The balancer's entry point to notifications: ``terminal_seen`` picks whom to ask.

On a terminal's first packet the balancer asks to be told when its care-of address changes
(claims 5, 6).  With a home address (from a Home Address option) the peer is the terminal's
own agent if one is configured for that home address (claim 6), else the home agent whose
home prefix contains it (claim 5).  With only a care-of address (key = source address, the
patent's second embodiment) there is no prefix to go by, so every home agent and every
terminal agent is asked; those without a binding for it answer UNKNOWN_BINDING and the
subscription is dropped.  Either way the bounded
:class:`~lbproxy.notify.subscriptions.Subscriptions` registry decides whether a new
subscription may open at all.  The :class:`~lbproxy.notify.addresses.AddressRules` the gate
applies to what peers say (global unicast, not the balancer's own ``local`` addresses, not
forbidden, within the care-of prefixes if any) are built here, and an address they would
refuse is not subscribed to at all.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Callable, Sequence
from typing import Any

from twisted.application.service import MultiService
from twisted.internet.interfaces import IReactorTime, IStreamClientEndpoint
from twisted.internet.task import LoopingCall

from lbproxy.notify.addresses import AddressRules, LocalAddresses
from lbproxy.notify.client import NotificationClient, Peer
from lbproxy.notify.gate import Gate
from lbproxy.notify.listener import IBindingListener
from lbproxy.notify.policy import PrefixEntitlement, Refusal, RefusalCounters
from lbproxy.notify.session import (
    DEFAULT_CALL_TIMEOUT,
    DEFAULT_HANDSHAKE_TIMEOUT,
    DEFAULT_MAX_OUTSTANDING,
)
from lbproxy.notify.subscriptions import Subscriptions
from lbproxy.notify.tls import TlsMaterial

#: Optional ``[notify]`` keys read by :meth:`Notifier.from_config` when the configuration
#: has them: key -> constructor parameter.
CONFIG_KEYS = {
    "forbidden_prefixes": "forbidden",
    "care_of_prefixes": "care_of_prefixes",
    "allow_unique_local": "allow_unique_local",
    "call_timeout": "call_timeout",
    "handshake_timeout": "handshake_timeout",
    "max_outstanding": "max_outstanding",
}


class Notifier(MultiService):
    """All notification clients of one balancer, the registry, the gate."""

    def __init__(
        self,
        peers: Sequence[tuple[Peer, IStreamClientEndpoint]],
        material: TlsMaterial,
        listener: IBindingListener,
        clock: IReactorTime,
        max_subscriptions: int = 10_000,
        idle_lifetime: float = 600.0,
        interval: int = 0,
        sweep_interval: float = 5.0,
        initial_delay: float = 0.1,
        max_delay: float = 30.0,
        jitter: Callable[[], float] | None = None,
        local: Callable[[], LocalAddresses] | None = None,
        forbidden: Sequence[Any] = (),
        care_of_prefixes: Sequence[Any] = (),
        allow_unique_local: bool = False,
        call_timeout: float = DEFAULT_CALL_TIMEOUT,
        handshake_timeout: float = DEFAULT_HANDSHAKE_TIMEOUT,
        max_outstanding: int = DEFAULT_MAX_OUTSTANDING,
    ) -> None:
        super().__init__()
        self.clock = clock
        self.counters = RefusalCounters()
        self.subscriptions = Subscriptions(max_subscriptions, idle_lifetime)
        self.addresses = AddressRules(local, forbidden, care_of_prefixes, allow_unique_local)
        self.gate = Gate(self.subscriptions, listener, clock, self.counters, self.addresses)
        self.clients: dict[str, NotificationClient] = {}
        self._terminals: dict[bytes, NotificationClient] = {}
        self._home_agents: list[tuple[NotificationClient, PrefixEntitlement]] = []
        for peer, endpoint in peers:
            client = NotificationClient(
                peer, endpoint, material, self.gate, clock, interval,
                initial_delay, max_delay, jitter,
                call_timeout=call_timeout,
                handshake_timeout=handshake_timeout,
                max_outstanding=max_outstanding,
            )
            client.setServiceParent(self)
            self.clients[peer.name] = client
            if peer.home is not None:
                self._terminals[peer.home] = client
            elif isinstance(peer.entitlement, PrefixEntitlement):
                self._home_agents.append((client, peer.entitlement))
        self._sweeper = LoopingCall(self.sweep)
        self._sweeper.clock = clock
        self.sweep_interval = sweep_interval

    @classmethod
    def from_config(
        cls, config: Any, reactor: Any, listener: IBindingListener, **options: Any
    ) -> Notifier:
        """From an ``lbproxy.config.NotifyConfig`` (peers' endpoints are Twisted client
        endpoint strings; TLS is added here, so they are plain ``tcp:`` endpoints).  The
        optional keys of :data:`CONFIG_KEYS` are read when the configuration has them;
        ``options`` (such as ``local=lambda: balancer.policy``) win over them."""
        from twisted.internet.endpoints import clientFromString

        material = TlsMaterial.from_files(config.ca, config.certificate, config.key)
        peers = [(Peer.from_config(p), clientFromString(reactor, p.endpoint))
                 for p in config.peers]
        optional = {
            parameter: getattr(config, key)
            for key, parameter in CONFIG_KEYS.items()
            if getattr(config, key, None) is not None
        }
        return cls(peers, material, listener, reactor,
                   max_subscriptions=config.max_subscriptions, **{**optional, **options})

    def startService(self) -> None:
        super().startService()
        self._sweeper.start(self.sweep_interval, now=False)

    def stopService(self):  # type: ignore[no-untyped-def]
        if self._sweeper.running:
            self._sweeper.stop()
        return super().stopService()

    def peers_for(self, address: bytes, home: bool) -> list[NotificationClient]:
        """Whom to ask about a terminal seen with this home (or care-of) address."""
        if home:
            own = self._terminals.get(address)
            if own is not None:
                return [own]
            return [c for c, e in self._home_agents if e.allows(address)]
        # Only the care-of address is known: every home agent may hold its binding, and so
        # may every terminal agent (claim 6); those without it answer UNKNOWN_BINDING.
        return [c for c, _ in self._home_agents] + list(self._terminals.values())

    def terminal_seen(self, address: bytes, home: bool = False) -> int:
        """A terminal's first packet: subscribe to its changes.  ``address`` is its home
        address (``home=True``) or its care-of address.  Returns how many subscriptions
        were opened or already open; refusals (registry full) are counted."""
        if len(address) != 16:
            raise ValueError("address must be 16 octets")
        if (self.addresses.home if home else self.addresses.care_of)(address) is not None:
            return 0  # nothing a peer says about it could be believed
        kind = "hoa" if home else "coa"
        now = self.clock.seconds()
        count = 0
        for client in self.peers_for(address, home):
            sub = self.subscriptions.get(client.peer.name, address)
            if sub is None and home:
                sub = self.subscriptions.by_home(client.peer.name, address)
            if sub is not None:
                count += 1
                continue
            sub = self.subscriptions.add(client.peer.name, address, kind, now)
            if sub is None:
                self.counters.refuse(
                    Refusal.TOO_MANY_SUBSCRIPTIONS,
                    client.peer.name,
                    f"registry full, {kind} {ipaddress.IPv6Address(address)}",
                )
                continue
            count += 1
            client.send_subscribe(sub)
        return count

    def sweep(self) -> int:
        """Drop idle subscriptions, telling their peers."""
        gone = self.subscriptions.expire(self.clock.seconds())
        for sub in gone:
            client = self.clients.get(sub.peer)
            if client is not None:
                client.send_unsubscribe(sub)
        return len(gone)
