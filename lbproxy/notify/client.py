"""The balancer's side of one notification peer: a reconnecting AMP-over-TLS client.

One :class:`NotificationClient` per configured peer (a home agent or a terminal's agent)
keeps one connection up with ``ClientService`` (exponential back-off, injected clock).  When
TLS is up and the peer's identity checked, it (re)sends every subscription the registry holds
for that peer, so a restarted agent learns again what the balancer follows (by home address
once that is known, so an agent that lost its observations keeps the subscription).  What the peer
then says is handed to the :class:`~lbproxy.notify.gate.Gate`; what the gate refuses is
answered with the matching AMP error.  Forwarding does not wait for any of this: while a peer
is down the table keeps its entries and only confirmations stop.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Callable
from typing import Any

import attrs
from service_identity import VerificationError
from twisted.application.internet import ClientService, backoffPolicy
from twisted.application.service import Service
from twisted.internet.defer import Deferred, fail
from twisted.internet.interfaces import IHandshakeListener, IReactorTime, IStreamClientEndpoint
from twisted.internet.protocol import Factory
from twisted.logger import Logger
from twisted.protocols import amp
from twisted.python.failure import Failure
from zope.interface import implementer

from lbproxy.notify import commands as c
from lbproxy.notify.gate import Gate
from lbproxy.notify.machine import PeerInput, PeerMachine, PeerState, ProtocolViolation
from lbproxy.notify.policy import (
    HomeAddressEntitlement,
    IEntitlement,
    PrefixEntitlement,
    Refusal,
)
from lbproxy.notify.subscriptions import Subscription
from lbproxy.notify.tls import TlsMaterial, client_factory, peer_has_address

log = Logger()


@attrs.frozen
class Peer:
    """What the balancer knows about one peer from its configuration."""

    name: str
    kind: str  # "homeagent" | "terminal"
    identity: str  # DNS-ID its certificate must carry
    entitlement: IEntitlement
    home: bytes | None = None  # a terminal's home address (also required in its certificate)

    @classmethod
    def home_agent(cls, name: str, identity: str, prefixes: list[str]) -> Peer:
        """A home agent entitled to ``prefixes`` (claim 5)."""
        return cls(name, "homeagent", identity, PrefixEntitlement.of(prefixes))

    @classmethod
    def terminal(cls, name: str, identity: str, home: str) -> Peer:
        """A terminal's own agent, entitled to its home address only (claim 6)."""
        packed = ipaddress.IPv6Address(home).packed
        return cls(name, "terminal", identity, HomeAddressEntitlement(packed), packed)

    @classmethod
    def from_config(cls, config: Any) -> Peer:
        """From an ``lbproxy.config.PeerConfig``."""
        if config.kind == "terminal":
            return cls.terminal(config.name, config.identity, str(config.home))
        return cls.home_agent(config.name, config.identity, [str(p) for p in config.prefixes])


def _opt(address: bytes) -> bytes | None:
    if address == b"":
        return None
    if len(address) != 16:
        raise c.BadArgument(f"address of {len(address)} octets")
    return address


@implementer(IHandshakeListener)
class BalancerProtocol(amp.AMP):
    """One connection to a peer; hands everything to its :class:`NotificationClient`."""

    def __init__(self, client: NotificationClient) -> None:
        super().__init__()
        self.client = client
        self.handshaken = False

    def connectionMade(self) -> None:
        super().connectionMade()
        self.client.connection_made(self)

    def handshakeCompleted(self) -> None:
        """TLS is up and the DNS-ID verified (``optionsForClientTLS``)."""
        self.handshaken = True
        self.client.handshake_completed(self)

    def connectionLost(self, reason: Failure) -> None:  # type: ignore[override]
        super().connectionLost(reason)
        self.client.connection_lost(self, reason)

    @c.BindingChanged.responder
    def binding_changed(
        self, home: bytes, old_care_of: bytes, new_care_of: bytes, seq: int, lifetime: int
    ) -> dict[str, Any]:
        """An agent says a terminal moved."""
        new = _opt(new_care_of)
        if len(home) != 16 or new is None or not 0 <= seq <= 0xFFFF or lifetime < 0:
            self.client.refuse(Refusal.BAD_ARGUMENT, "BindingChanged arguments")
            raise c.BadArgument()
        self.client.expect(PeerInput.NOTIFICATION)
        refusal = self.client.gate.changed(
            self.client.peer.name,
            self.client.peer.entitlement,
            home,
            _opt(old_care_of),
            new,
            seq,
            lifetime,
        )
        if refusal is not None:
            raise c.error_for(refusal)
        return {}

    @c.BindingSnapshot.responder
    def binding_snapshot(self, bindings: list[dict[str, Any]]) -> dict[str, Any]:
        """An agent's periodic report of the bindings this connection subscribed to."""
        self.client.expect(PeerInput.SNAPSHOT)
        return self.client.apply_snapshot(bindings)


class NotificationClient(Service):
    """Keeps one peer connected, subscribed, and listened to."""

    def __init__(
        self,
        peer: Peer,
        endpoint: IStreamClientEndpoint,
        material: TlsMaterial,
        gate: Gate,
        clock: IReactorTime,
        interval: int = 0,
        initial_delay: float = 0.1,
        max_delay: float = 30.0,
        jitter: Callable[[], float] | None = None,
    ) -> None:
        self.peer = peer
        self.gate = gate
        self.clock = clock
        self.interval = interval
        self.machine = PeerMachine()
        self.protocol: BalancerProtocol | None = None
        self.connections = 0  # verified connections so far (1 + reconnects)
        self._unverified = 0  # consecutive connections lost before being verified
        self.setName(peer.name)
        factory = Factory.forProtocol(lambda: BalancerProtocol(self))
        base = backoffPolicy(
            initialDelay=initial_delay,
            maxDelay=max_delay,
            factor=2.0,
            **({"jitter": jitter} if jitter is not None else {}),
        )
        self.service = ClientService(
            endpoint,
            client_factory(material, peer.identity, factory),
            # A connection that fails TLS looks "made" to ClientService, which then resets
            # its attempt count; keep backing off across such failures too.
            retryPolicy=lambda attempt: base(attempt + self._unverified),
            clock=clock,
        )

    # -- service ------------------------------------------------------------------------

    def startService(self) -> None:
        super().startService()
        self.service.startService()

    def stopService(self) -> Deferred[None]:
        super().stopService()
        self.machine.state = PeerState.CLOSED
        return self.service.stopService()

    # -- connection events --------------------------------------------------------------

    def _feed(self, event: PeerInput) -> None:
        try:
            self.machine.feed(event)
        except ProtocolViolation as e:
            self.refuse(Refusal.PROTOCOL, str(e))
            raise

    def expect(self, event: PeerInput) -> None:
        """Move on a message from the peer, or refuse it as out of order."""
        try:
            self._feed(event)
        except ProtocolViolation:
            raise c.OutOfOrder() from None

    def refuse(self, reason: Refusal, detail: str) -> None:
        """Count and log a refusal concerning this peer."""
        self.gate.counters.refuse(reason, self.peer.name, detail)

    def connection_made(self, protocol: BalancerProtocol) -> None:
        self.protocol = protocol
        if self.machine.state is not PeerState.CLOSED:
            self.machine.feed(PeerInput.TCP_CONNECTED)

    def handshake_completed(self, protocol: BalancerProtocol) -> None:
        if self.peer.home is not None:
            connection = protocol.transport.getHandle()  # type: ignore[union-attr]
            if not peer_has_address(connection, self.peer.home):
                self.refuse(Refusal.WRONG_IDENTITY, "certificate lacks the terminal's home")
                protocol.handshaken = False
                protocol.transport.abortConnection()  # type: ignore[union-attr]
                return
        if self.machine.state is PeerState.CLOSED:
            return
        self.machine.feed(PeerInput.HANDSHAKE_DONE)
        self._unverified = 0
        self.connections += 1
        log.info("notify: connected to {peer}", peer=self.peer.name)
        for sub in self.gate.subscriptions.for_peer(self.peer.name):
            self.send_subscribe(sub)

    def connection_lost(self, protocol: BalancerProtocol, reason: Failure) -> None:
        if protocol is self.protocol:
            self.protocol = None
        if not protocol.handshaken:
            self._unverified += 1
            if self.machine.state is PeerState.CONNECTING:
                wrong = reason.check(VerificationError) is not None
                self.refuse(
                    Refusal.WRONG_IDENTITY if wrong else Refusal.TLS_FAILED,
                    reason.getErrorMessage(),
                )
        if self.machine.allows(PeerInput.CONNECTION_LOST):
            self.machine.feed(PeerInput.CONNECTION_LOST)

    # -- subscriptions ------------------------------------------------------------------

    @property
    def connected(self) -> bool:
        """TLS up and the peer verified."""
        return self.machine.state in (PeerState.HANDSHAKEN, PeerState.SUBSCRIBED)

    def send_subscribe(self, sub: Subscription) -> Deferred[Any] | None:
        """Send Subscribe for ``sub`` now if connected (else on the next connection)."""
        if not self.connected or self.protocol is None:
            return None
        # Once the home address is known, follow the terminal by it: a care-of address is
        # what the terminal gives up when it moves, and an agent that restarted (and lost
        # what it had observed) answers UNKNOWN_BINDING for it, but still accepts -- and then
        # reports on -- a home address it is entitled to.
        address, kind = (sub.address, sub.kind) if sub.home is None else (sub.home, "hoa")
        d = self.protocol.callRemote(
            c.Subscribe,
            address=address,
            kind=kind,
            on_change=True,
            interval=self.interval,
        )
        d.addCallbacks(self._subscribed, self._subscribe_failed, (sub,), None, (sub,), None)
        return d

    def _subscribed(self, answer: dict[str, Any], sub: Subscription) -> None:
        try:
            home, care_of = _opt(answer["home"]), _opt(answer["care_of"])
        except c.BadArgument:
            self._refused_subscription(sub, Refusal.BAD_ARGUMENT)
            return
        seq = answer["seq"] if 0 <= answer["seq"] <= 0xFFFF else None
        refusal = self.gate.subscribed(
            self.peer.name,
            self.peer.entitlement,
            sub,
            answer["sub_id"],
            home,
            care_of,
            seq,
            answer["lifetime"],
        )
        if refusal is None and self.machine.allows(PeerInput.SUBSCRIBE_OK):
            self.machine.feed(PeerInput.SUBSCRIBE_OK)

    def _refused_subscription(self, sub: Subscription, reason: Refusal) -> None:
        self.gate.subscriptions.remove(sub)
        self.refuse(reason, f"subscription to {ipaddress.IPv6Address(sub.address)}")
        if self.machine.allows(PeerInput.SUBSCRIBE_REFUSED):
            self.machine.feed(PeerInput.SUBSCRIBE_REFUSED)

    def _subscribe_failed(self, failure: Failure, sub: Subscription) -> None:
        error = failure.check(*c.ERRORS)
        if error is None:
            return  # connection lost: the subscription is sent again on reconnecting
        refusal = getattr(error, "refusal", Refusal.PROTOCOL)
        self._refused_subscription(sub, refusal)

    def send_unsubscribe(self, sub: Subscription) -> None:
        """Tell the peer to stop ``sub`` (best effort; the registry forgets it anyway)."""
        if self.connected and self.protocol is not None and sub.sub_id is not None:
            d = self.protocol.callRemote(c.Unsubscribe, sub_id=sub.sub_id)
            d.addErrback(lambda f: None)

    def request_snapshot(self) -> Deferred[dict[str, Any]]:
        """Ask the peer for its current bindings (claims 12/13, "on request") and apply
        them; fires with the counts."""
        if not self.connected or self.protocol is None:
            return fail(ConnectionError(f"{self.peer.name} is not connected"))
        d = self.protocol.callRemote(c.GetSnapshot)
        d.addCallback(lambda answer: self.apply_snapshot(answer["bindings"]))
        return d

    def apply_snapshot(self, bindings: list[dict[str, Any]]) -> dict[str, Any]:
        """Hand each binding of a snapshot to the gate; count what was accepted."""
        accepted = refused = 0
        for b in bindings:
            try:
                home, care_of = _opt(b["home"]), _opt(b["care_of"])
            except c.BadArgument:
                home = care_of = None
            if home is None or care_of is None or not 0 <= b["seq"] <= 0xFFFF:
                self.refuse(Refusal.BAD_ARGUMENT, "snapshot entry")
                refused += 1
                continue
            r = self.gate.snapshot_entry(
                self.peer.name, self.peer.entitlement, home, care_of, b["seq"], b["lifetime"]
            )
            if r is None:
                accepted += 1
            else:
                refused += 1
        return {"accepted": accepted, "refused": refused}
