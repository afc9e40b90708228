"""The balancer's side of one notification peer: a reconnecting AMP-over-TLS client.

One :class:`NotificationClient` per configured peer (a home agent or a terminal's agent)
keeps one connection up with ``ClientService`` (exponential back-off, injected clock).  When
TLS is up and the peer's identity checked, it (re)sends every subscription the registry holds
for that peer, so a restarted agent learns again what the balancer follows (by home address
once that is known, so an agent that lost its observations keeps the subscription).  What the peer
then says is handed to the :class:`~lbproxy.notify.gate.Gate`; what the gate refuses is
answered with the matching AMP error.  Forwarding does not wait for any of this: while a peer
is down the table keeps its entries and only confirmations stop.

Every call to the peer has a deadline and at most ``max_outstanding`` are in flight
(:class:`~lbproxy.notify.session.GuardedAMP`); Subscribes beyond that wait in a backlog,
bounded by the subscription registry, and go out as answers come back.  A peer that does not
answer in time is dropped (``timeout``) and reconnected with back-off.
"""

from __future__ import annotations

import ipaddress
from collections import OrderedDict
from collections.abc import Callable
from typing import Any

import attrs
from twisted.application.internet import ClientService, backoffPolicy
from twisted.application.service import Service
from twisted.internet.defer import CancelledError, Deferred, fail
from twisted.internet.error import ConnectionClosed
from twisted.internet.interfaces import IHandshakeListener, IReactorTime, IStreamClientEndpoint
from twisted.internet.protocol import Factory
from twisted.logger import Logger
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
from lbproxy.notify.session import (
    DEFAULT_CALL_TIMEOUT,
    DEFAULT_HANDSHAKE_TIMEOUT,
    DEFAULT_MAX_OUTSTANDING,
    GuardedAMP,
)
from lbproxy.notify.subscriptions import Subscription
from lbproxy.notify.tls import SERVER_AUTH, PeerRefused, TlsMaterial, client_factory, peer_verdict

log = Logger()


class Overloaded(Exception):  # noqa: N818 - a condition
    """Too many calls are outstanding to the peer; nothing was sent."""


@attrs.frozen
class Peer:
    """What the balancer knows about one peer from its configuration."""

    name: str
    kind: str  # "homeagent" | "terminal"
    identity: str  # DNS-ID (or IP address) its certificate must carry as a subjectAltName
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


def _seq(value: object) -> object:
    """A Subscribe answer's sequence number: ``None`` for "no binding known"."""
    return None if value == c.NO_SEQ and type(value) is int else value


@implementer(IHandshakeListener)
class BalancerProtocol(GuardedAMP):
    """One connection to a peer; hands everything to its :class:`NotificationClient`."""

    def __init__(self, client: NotificationClient) -> None:
        super().__init__(
            client.clock,
            client.refuse,
            client.call_timeout,
            client.max_outstanding,
            client.handshake_timeout,
        )
        self.client = client
        self.handshaken = False  # TLS up *and* the peer verified

    def connectionMade(self) -> None:
        super().connectionMade()
        self.client.connection_made(self)

    def handshakeCompleted(self) -> None:
        """TLS is up; the certificate was checked in the handshake (check it again)."""
        self.client.handshake_completed(self)

    def connectionLost(self, reason: Failure) -> None:  # type: ignore[override]
        super().connectionLost(reason)
        self.client.connection_lost(self, reason)

    @c.BindingChanged.responder
    def binding_changed(
        self, home: bytes, old_care_of: bytes, new_care_of: bytes, seq: Any, lifetime: Any
    ) -> dict[str, Any]:
        """An agent says a terminal moved."""
        self.client.expect(PeerInput.NOTIFICATION)
        try:
            new, old = _opt(new_care_of), _opt(old_care_of)
        except c.BadArgument:
            new = old = None
        if len(home) != 16 or new is None:
            self.client.refuse(Refusal.BAD_ARGUMENT, "BindingChanged addresses")
            raise c.BadArgument()
        refusal = self.client.gate.changed(
            self.client.peer.name, self.client.peer.entitlement, home, old, new, seq, lifetime
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
        call_timeout: float = DEFAULT_CALL_TIMEOUT,
        handshake_timeout: float = DEFAULT_HANDSHAKE_TIMEOUT,
        max_outstanding: int = DEFAULT_MAX_OUTSTANDING,
    ) -> None:
        self.peer = peer
        self.gate = gate
        self.clock = clock
        self.interval = interval
        self.call_timeout = call_timeout
        self.handshake_timeout = handshake_timeout
        self.max_outstanding = max_outstanding
        self.machine = PeerMachine()
        self.protocol: BalancerProtocol | None = None
        self.connections = 0  # verified connections so far (1 + reconnects)
        self.max_delay = max_delay
        # Consecutive connections that failed: lost before being verified, or verified but
        # lost without the peer answering anything (a silent peer) and within max_delay.
        self._failures = 0
        self._verified_at: float | None = None
        # Subscribes waiting for room under max_outstanding, by address (oldest first).
        self._backlog: OrderedDict[bytes, Subscription] = OrderedDict()
        self.setName(peer.name)
        factory = Factory.forProtocol(lambda: BalancerProtocol(self))
        base = backoffPolicy(
            initialDelay=initial_delay,
            maxDelay=max_delay,
            factor=2.0,
            **({"jitter": jitter} if jitter is not None else {}),
        )
        addresses = () if peer.home is None else (peer.home,)
        self.service = ClientService(
            endpoint,
            client_factory(material, peer.identity, factory, addresses, clock),
            # A connection that fails TLS, or a silent peer's, looks "made" to ClientService,
            # which then resets its attempt count; keep backing off across such failures.
            retryPolicy=lambda attempt: base(attempt + self._failures),
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
        if protocol.dropped is not None:
            return
        addresses = () if self.peer.home is None else (self.peer.home,)
        connection = protocol.transport.getHandle()  # type: ignore[union-attr]
        verdict = peer_verdict(connection, [self.peer.identity], SERVER_AUTH, addresses)
        if not verdict.accepted:
            protocol.drop(verdict.refusal or Refusal.WRONG_IDENTITY, verdict.detail)
            return
        protocol.handshake_verified()
        protocol.handshaken = True
        if self.machine.state is PeerState.CLOSED:
            return
        self.machine.feed(PeerInput.HANDSHAKE_DONE)
        self._verified_at = self.clock.seconds()
        self.connections += 1
        log.info("notify: connected to {peer}", peer=self.peer.name)
        for sub in self.gate.subscriptions.for_peer(self.peer.name):
            self.send_subscribe(sub)

    def connection_lost(self, protocol: BalancerProtocol, reason: Failure) -> None:
        if protocol is self.protocol:
            self.protocol = None
            self._backlog.clear()  # everything is sent again on the next connection
        lived = None if self._verified_at is None else self.clock.seconds() - self._verified_at
        self._verified_at = None
        healthy = protocol.answers or (lived or 0) >= self.max_delay
        if protocol.handshaken and protocol.dropped is None and healthy:
            self._failures = 0
        else:
            self._failures += 1
        unverified = not protocol.handshaken and protocol.dropped is None
        if unverified and self.machine.state is PeerState.CONNECTING:
            value = reason.value
            if isinstance(value, PeerRefused):  # refused in the handshake, with the reason
                self.refuse(value.refusal, value.detail)
            else:
                self.refuse(Refusal.TLS_FAILED, reason.getErrorMessage())
        if self.machine.allows(PeerInput.CONNECTION_LOST):
            self.machine.feed(PeerInput.CONNECTION_LOST)

    # -- subscriptions ------------------------------------------------------------------

    @property
    def connected(self) -> bool:
        """TLS up and the peer verified."""
        return self.machine.state in (PeerState.HANDSHAKEN, PeerState.SUBSCRIBED)

    @property
    def backlog(self) -> int:
        """Subscribes waiting for room under ``max_outstanding``."""
        return len(self._backlog)

    def send_subscribe(self, sub: Subscription) -> Deferred[Any] | None:
        """Send Subscribe for ``sub`` now if connected and there is room (else later)."""
        protocol = self.protocol
        if not self.connected or protocol is None:
            return None
        # Once the home address is known, follow the terminal by it: a care-of address is
        # what the terminal gives up when it moves, and an agent that restarted (and lost
        # what it had observed) answers UNKNOWN_BINDING for it, but still accepts -- and then
        # reports on -- a home address it is entitled to.
        address, kind = (sub.address, sub.kind) if sub.home is None else (sub.home, "hoa")
        d = protocol.call(
            c.Subscribe, address=address, kind=kind, on_change=True, interval=self.interval
        )
        if d is None:
            self._backlog[sub.address] = sub
            return None
        d.addCallbacks(
            self._subscribed, self._subscribe_failed, callbackArgs=(sub,), errbackArgs=(sub,)
        )
        d.addBoth(self._drain)
        return d

    def _drain(self, result: object = None) -> object:
        """Send waiting Subscribes while there is room."""
        protocol = self.protocol
        while self._backlog and protocol is not None and protocol.can_call and self.connected:
            address, sub = self._backlog.popitem(last=False)
            if self.gate.subscriptions.get(self.peer.name, address) is sub:
                self.send_subscribe(sub)
        return result

    def _subscribed(self, answer: dict[str, Any], sub: Subscription) -> None:
        try:
            home, care_of = _opt(answer["home"]), _opt(answer["care_of"])
        except c.BadArgument:
            self.refuse(Refusal.BAD_ARGUMENT, "Subscribe answer addresses")
            self._answer_refused()
            return
        refusal = self.gate.subscribed(
            self.peer.name,
            self.peer.entitlement,
            sub,
            answer["sub_id"],
            home,
            care_of,
            _seq(answer["seq"]),
            answer["lifetime"],
        )
        if refusal is not None:
            self._answer_refused()
        elif self.machine.allows(PeerInput.SUBSCRIBE_OK):
            self.machine.feed(PeerInput.SUBSCRIBE_OK)

    def _answer_refused(self) -> None:
        """The answer was refused; the subscription stays as it was (pending)."""
        if self.machine.allows(PeerInput.SUBSCRIBE_REFUSED):
            self.machine.feed(PeerInput.SUBSCRIBE_REFUSED)

    def _refused_subscription(self, sub: Subscription, reason: Refusal) -> None:
        self.gate.subscriptions.remove(sub)
        self.refuse(reason, f"subscription to {ipaddress.IPv6Address(sub.address)}")
        if self.machine.allows(PeerInput.SUBSCRIBE_REFUSED):
            self.machine.feed(PeerInput.SUBSCRIBE_REFUSED)

    def _subscribe_failed(self, failure: Failure, sub: Subscription) -> None:
        error = failure.check(*c.ERRORS)
        if error is not None:  # the agent refused it: forget it
            refusal = getattr(error, "refusal", Refusal.PROTOCOL)
            self._refused_subscription(sub, refusal)
        elif failure.check(ConnectionClosed, CancelledError) is None:
            # A malformed answer, or an error the protocol does not know: keep the
            # subscription as it was.
            self.refuse(Refusal.PROTOCOL, f"Subscribe answer: {failure.getErrorMessage()}")
            self._answer_refused()
        # else: connection lost; the subscription is sent again on reconnecting

    def send_unsubscribe(self, sub: Subscription) -> None:
        """Tell the peer to stop ``sub`` (best effort; the registry forgets it anyway)."""
        self._backlog.pop(sub.address, None)
        if self.connected and self.protocol is not None and sub.sub_id is not None:
            d = self.protocol.call(c.Unsubscribe, sub_id=sub.sub_id)
            if d is not None:
                d.addErrback(lambda f: None)
                d.addBoth(self._drain)

    def request_snapshot(self) -> Deferred[dict[str, Any]]:
        """Ask the peer for its current bindings (claims 12/13, "on request") and apply
        them; fires with the counts."""
        if not self.connected or self.protocol is None:
            return fail(ConnectionError(f"{self.peer.name} is not connected"))
        d = self.protocol.call(c.GetSnapshot)
        if d is None:
            return fail(Overloaded(f"{self.max_outstanding} calls outstanding to {self.peer.name}"))
        d.addCallback(lambda answer: self.apply_snapshot(answer["bindings"]))
        d.addBoth(self._drain)
        return d

    def apply_snapshot(self, bindings: list[dict[str, Any]]) -> dict[str, Any]:
        """Hand each binding of a snapshot to the gate; count what was accepted."""
        accepted = refused = 0
        for b in bindings:
            try:
                home, care_of = _opt(b["home"]), _opt(b["care_of"])
            except c.BadArgument:
                home = care_of = None
            if home is None or care_of is None:
                self.refuse(Refusal.BAD_ARGUMENT, "snapshot entry addresses")
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
