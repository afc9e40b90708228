"""The agent's side of the notification protocol: an AMP-over-TLS server over a binding cache.

Shared by the home-agent agent (claim 12) and the terminal agent (claim 13): both hold a
:class:`~lbproxy.notify.cache.BindingCache`, may speak for some home addresses only, and
serve balancers from an allowed list.  Each accepted balancer connection is an
:class:`AgentSession` (one :class:`~lbproxy.notify.machine.PeerMachine`); it answers
Subscribe / Unsubscribe / GetSnapshot, sends BindingChanged on every cache change a
subscription asked for ("on change") -- moves and re-registrations alike -- and
BindingSnapshot every ``interval`` seconds a subscription asked for ("periodically"), in
calls of at most ``SNAPSHOT_CHUNK`` bindings; GetSnapshot answers page the same way.
Sessions are usually dialled by the balancer; a terminal agent on a mobile network dials the
balancer instead (:meth:`NotificationAgent.dial`), and the balancer then subscribes over
that connection just the same.

A session is a :class:`~lbproxy.notify.session.GuardedAMP`: the balancer must complete a TLS
handshake with an allowed, ``clientAuth`` certificate within ``handshake_timeout``; every
notification sent to it has a deadline; and at most ``max_outstanding`` are in flight -- the
changes of a terminal that happen meanwhile are coalesced into one (the latest binding, with
the care-of address the balancer was last told), sent as answers come back.  A balancer that
does not answer in time is dropped (``timeout``); it reconnects and resubscribes, and the
Subscribe answers carry the current bindings.
"""

from __future__ import annotations

import bisect
import ipaddress
import math
from collections.abc import Iterable, Sequence
from typing import Any

import attrs
from twisted.application.internet import ClientService, backoffPolicy
from twisted.internet.interfaces import IHandshakeListener, IReactorTime, IStreamClientEndpoint
from twisted.internet.protocol import Factory
from twisted.internet.task import LoopingCall
from twisted.logger import Logger
from twisted.protocols.tls import TLSMemoryBIOFactory
from twisted.python.failure import Failure
from zope.interface import implementer

from lbproxy.notify import commands as c
from lbproxy.notify.cache import BindingCache, CacheChange, CachedBinding
from lbproxy.notify.machine import PeerInput, PeerMachine, PeerState
from lbproxy.notify.policy import IEntitlement, Refusal, RefusalCounters
from lbproxy.notify.session import (
    DEFAULT_CALL_TIMEOUT,
    DEFAULT_HANDSHAKE_TIMEOUT,
    DEFAULT_MAX_OUTSTANDING,
    GuardedAMP,
)
from lbproxy.notify.tls import (
    CLIENT_AUTH,
    SERVER_AUTH,
    PeerRefused,
    TlsMaterial,
    client_factory,
    peer_verdict,
    server_factory,
)

log = Logger()
MAX_INTERVAL = 86_400


@attrs.define
class AgentSubscription:
    """What one balancer asked to hear about one home address."""

    sub_id: int
    home: bytes
    on_change: bool
    interval: int


def _entry(binding: CachedBinding, now: float | None = None) -> dict[str, Any]:
    """A binding on the wire; with ``now``, the lifetime it has left (at least 1 s: a
    binding that has run out is not reported at all), as a snapshot or a Subscribe answer
    reports it -- not the lifetime granted when it was made."""
    lifetime = binding.lifetime
    if now is not None:
        lifetime = min(lifetime, max(1, math.ceil(binding.expires - now)))
    return {
        "home": binding.home,
        "care_of": binding.care_of,
        "seq": binding.seq,
        "lifetime": lifetime,
    }


@implementer(IHandshakeListener)
class AgentSession(GuardedAMP):
    """One balancer's connection to this agent."""

    def __init__(self, agent: NotificationAgent, dialled: bool = False) -> None:
        super().__init__(
            agent.clock,
            self._count,
            agent.call_timeout,
            agent.max_outstanding,
            agent.handshake_timeout,
        )
        self.agent = agent
        # Who dialled: the balancer (it must prove clientAuth), or we did (a terminal agent
        # dialling its balancer, which must then prove serverAuth).
        self.usage = SERVER_AUTH if dialled else CLIENT_AUTH
        self._ids: list[int] = []  # sub_ids, ascending (GetSnapshot pages)
        self.machine = PeerMachine()
        self.balancer = "?"  # the verified identity once known
        self.subscriptions: dict[int, AgentSubscription] = {}
        self._by_home: dict[bytes, int] = {}
        self._timers: dict[int, LoopingCall] = {}
        # Changes waiting for room under max_outstanding, one per home (oldest first).
        self._pending: dict[bytes, CacheChange] = {}

    def _count(self, reason: Refusal, detail: str) -> None:
        self.agent.counters.refuse(reason, self.balancer, detail)

    # -- connection ---------------------------------------------------------------------

    def connectionMade(self) -> None:
        super().connectionMade()
        self.machine.feed(PeerInput.TCP_CONNECTED)
        peer = self.transport.getPeer() if self.transport is not None else None
        self.balancer = str(getattr(peer, "host", "?"))

    def handshakeCompleted(self) -> None:
        """TLS is up; the client certificate was checked in the handshake (again here):
        an allowed balancer, ``clientAuth``."""
        if self.dropped is not None:
            return
        connection = self.transport.getHandle()  # type: ignore[union-attr]
        verdict = peer_verdict(connection, self.agent.balancers, self.usage)
        if not verdict.accepted or verdict.name is None:
            self.drop(verdict.refusal or Refusal.WRONG_IDENTITY, verdict.detail)
            return
        self.handshake_verified()
        self.balancer = verdict.name
        self.machine.feed(PeerInput.HANDSHAKE_DONE)
        self.agent.sessions.add(self)
        log.info("notify agent: balancer {name} connected", name=verdict.name)

    def connectionLost(self, reason: Failure) -> None:  # type: ignore[override]
        super().connectionLost(reason)
        if self.machine.state is PeerState.CONNECTING and self.dropped is None:
            refused = reason.value
            if isinstance(refused, PeerRefused):  # refused in the handshake, with the reason
                self._count(refused.refusal, refused.detail)
            else:
                self._count(Refusal.TLS_FAILED, reason.getErrorMessage())
        self.agent.sessions.discard(self)
        self._pending.clear()
        for timer in self._timers.values():
            if timer.running:
                timer.stop()
        self._timers.clear()
        if self.machine.allows(PeerInput.CONNECTION_LOST):
            self.machine.feed(PeerInput.CONNECTION_LOST)

    def _require(self, *states: PeerState) -> None:
        if self.machine.state not in states:
            self.agent.counters.refuse(
                Refusal.PROTOCOL, self.balancer, f"command in {self.machine.state.value}"
            )
            raise c.OutOfOrder()

    def _refuse(self, reason: Refusal, detail: str) -> c.NotificationError:
        self.agent.counters.refuse(reason, self.balancer, detail)
        return c.error_for(reason)

    # -- commands from the balancer -----------------------------------------------------

    @c.Subscribe.responder
    def subscribe(
        self, address: bytes, kind: str, on_change: bool, interval: Any
    ) -> dict[str, Any]:
        """Start following one terminal for this balancer."""
        self._require(PeerState.HANDSHAKEN, PeerState.SUBSCRIBED)
        if (
            len(address) != 16
            or kind not in ("hoa", "coa")
            or type(interval) is not int
            or not 0 <= interval <= MAX_INTERVAL
        ):
            raise self._refuse(Refusal.BAD_ARGUMENT, f"Subscribe {kind!r} {interval!r}")
        text = str(ipaddress.IPv6Address(address))
        binding: CachedBinding | None
        if kind == "hoa":
            if not self.agent.entitlement.allows(address):
                raise self._refuse(Refusal.NOT_ENTITLED, f"Subscribe hoa {text}")
            home = address
            binding = self.agent.cache.get(home)
        else:
            binding = self.agent.cache.by_care_of(address)
            if binding is None:
                raise self._refuse(Refusal.UNKNOWN_BINDING, f"Subscribe coa {text}")
            home = binding.home
        sub_id = self._by_home.get(home)
        if sub_id is None:
            if len(self.subscriptions) >= self.agent.max_subscriptions:
                raise self._refuse(Refusal.TOO_MANY_SUBSCRIPTIONS, f"Subscribe {text}")
            self.agent.next_id += 1
            sub_id = self.agent.next_id
            self._by_home[home] = sub_id
            self._ids.append(sub_id)  # ids only grow: the list stays sorted
        old = self.subscriptions.get(sub_id)
        self.subscriptions[sub_id] = AgentSubscription(sub_id, home, on_change, interval)
        if old is not None and old.interval != interval:
            self._retime(old.interval)
        self._retime(interval)
        self.machine.feed(PeerInput.SUBSCRIBE_OK)
        now = self.agent.clock.seconds()
        if binding is None or binding.expires <= now:
            return {"sub_id": sub_id, "home": home, "care_of": b"", "seq": c.NO_SEQ,
                    "lifetime": 0}
        return {"sub_id": sub_id, **_entry(binding, now)}

    @c.Unsubscribe.responder
    def unsubscribe(self, sub_id: Any) -> dict[str, Any]:
        """Stop one subscription."""
        self._require(PeerState.HANDSHAKEN, PeerState.SUBSCRIBED)
        sub = self.subscriptions.pop(sub_id, None) if type(sub_id) is int else None
        if sub is None:
            raise self._refuse(Refusal.NOT_SUBSCRIBED, f"Unsubscribe {sub_id}")
        del self._by_home[sub.home]
        i = bisect.bisect_left(self._ids, sub.sub_id)
        if i < len(self._ids) and self._ids[i] == sub.sub_id:
            del self._ids[i]
        self._pending.pop(sub.home, None)
        self._retime(sub.interval)
        if not self.subscriptions:
            self.machine.feed(PeerInput.LAST_UNSUBSCRIBED)
        return {}

    @c.GetSnapshot.responder
    def get_snapshot(self, after: Any = None) -> dict[str, Any]:
        """The current bindings of everything this balancer subscribed to, one page at a
        time: the subscriptions after sub_id ``after`` (ascending) until a page holds
        ``SNAPSHOT_CHUNK`` bindings; ``next`` is the last sub_id looked at, or ``NO_MORE``."""
        self._require(PeerState.HANDSHAKEN, PeerState.SUBSCRIBED)
        if after is None:
            after = 0
        if type(after) is not int or after < 0:
            raise self._refuse(Refusal.BAD_ARGUMENT, f"GetSnapshot after {after!r}")
        now = self.agent.clock.seconds()
        bindings: list[dict[str, Any]] = []
        ids = self._ids
        i = bisect.bisect_right(ids, after)
        while i < len(ids) and len(bindings) < c.SNAPSHOT_CHUNK:
            bindings.extend(self._bindings((self.subscriptions[ids[i]],), now))
            i += 1
        following = ids[i - 1] if i < len(ids) else c.NO_MORE
        return {"bindings": bindings, "next": following}

    # -- notifications to the balancer --------------------------------------------------

    def _bindings(self, subs: Iterable[AgentSubscription], now: float) -> list[dict[str, Any]]:
        """The live bindings of ``subs``, with the lifetime each has left."""
        found = (self.agent.cache.get(s.home) for s in subs)
        return [_entry(b, now) for b in found if b is not None and b.expires > now]

    def _retime(self, interval: int) -> None:
        """Keep one timer per distinct interval that some subscription asked for."""
        if interval <= 0:
            return
        wanted = any(s.interval == interval for s in self.subscriptions.values())
        timer = self._timers.get(interval)
        if wanted and timer is None:
            timer = LoopingCall(self._periodic, interval)
            timer.clock = self.agent.clock
            self._timers[interval] = timer
            timer.start(interval, now=False)
        elif not wanted and timer is not None:
            del self._timers[interval]
            if timer.running:
                timer.stop()

    def _periodic(self, interval: int) -> None:
        """Every ``interval`` s: the bindings of the subscriptions that asked for it, in
        BindingSnapshot calls of at most ``SNAPSHOT_CHUNK`` (what does not fit under
        ``max_outstanding`` now waits for the next period)."""
        subs = [s for s in self.subscriptions.values() if s.interval == interval]
        bindings = self._bindings(subs, self.agent.clock.seconds())
        for start in range(0, len(bindings), c.SNAPSHOT_CHUNK):
            if not (self.can_call and self.machine.allows(PeerInput.SNAPSHOT)):
                return
            self.machine.feed(PeerInput.SNAPSHOT)
            d = self.call(c.BindingSnapshot, bindings=bindings[start:start + c.SNAPSHOT_CHUNK])
            if d is not None:
                d.addErrback(self._remote_refused, "BindingSnapshot")
                d.addBoth(self._drain)

    def cache_changed(self, change: CacheChange) -> None:
        """Tell the balancer, if it subscribed to this terminal on change; when
        ``max_outstanding`` notifications are in flight, coalesce it with the terminal's
        other waiting change and send it when there is room."""
        sub_id = self._by_home.get(change.home)
        if sub_id is None or not self.subscriptions[sub_id].on_change:
            return
        if not self.machine.allows(PeerInput.NOTIFICATION):
            return
        waiting = self._pending.pop(change.home, None)
        if waiting is not None:  # the balancer was last told waiting.old_care_of
            change = CacheChange(
                change.home, waiting.old_care_of, change.new_care_of, change.seq,
                change.lifetime,
            )  # fmt: skip
        if not self.can_call:
            self._pending[change.home] = change
            return
        self._notify(change)

    def _notify(self, change: CacheChange) -> None:
        self.machine.feed(PeerInput.NOTIFICATION)
        d = self.call(
            c.BindingChanged,
            home=change.home,
            old_care_of=change.old_care_of or b"",
            new_care_of=change.new_care_of,
            seq=change.seq,
            lifetime=change.lifetime,
        )
        if d is None:  # dropped meanwhile
            return
        d.addErrback(self._remote_refused, "BindingChanged")
        d.addBoth(self._drain)

    def _drain(self, result: object = None) -> object:
        """Send waiting changes while there is room."""
        while self._pending and self.can_call and self.machine.allows(PeerInput.NOTIFICATION):
            home = next(iter(self._pending))
            self._notify(self._pending.pop(home))
        return result

    @property
    def pending(self) -> int:
        """Changes waiting for room under ``max_outstanding``."""
        return len(self._pending)

    def _remote_refused(self, failure: Failure, what: str) -> None:
        error = failure.check(*c.ERRORS)
        if error is None:
            return  # connection gone; the balancer resubscribes and gets the current state
        self.agent.remote_refusals[error.__name__] = (
            self.agent.remote_refusals.get(error.__name__, 0) + 1
        )
        log.warn(
            "notify agent: {balancer} refused {what}: {error}",
            balancer=self.balancer,
            what=what,
            error=error.__name__,
        )


class NotificationAgent:
    """The state every session of one agent shares: cache, entitlement, allowed balancers."""

    def __init__(
        self,
        cache: BindingCache,
        entitlement: IEntitlement,
        balancers: Sequence[str],
        clock: IReactorTime,
        max_subscriptions: int = 100_000,
        counters: RefusalCounters | None = None,
        call_timeout: float = DEFAULT_CALL_TIMEOUT,
        handshake_timeout: float = DEFAULT_HANDSHAKE_TIMEOUT,
        max_outstanding: int = DEFAULT_MAX_OUTSTANDING,
    ) -> None:
        self.cache = cache
        self.entitlement = entitlement
        self.balancers = tuple(balancers)
        self.clock = clock
        self.max_subscriptions = max_subscriptions
        self.call_timeout = call_timeout
        self.handshake_timeout = handshake_timeout
        self.max_outstanding = max_outstanding
        self.counters = counters if counters is not None else RefusalCounters()
        self.sessions: set[AgentSession] = set()
        self.remote_refusals: dict[str, int] = {}  # what balancers refused of ours
        self.next_id = 0
        cache.observers.append(self._changed)

    def _changed(self, change: CacheChange) -> None:
        for session in list(self.sessions):
            session.cache_changed(change)

    def factory(self) -> Factory:
        """A plain factory of sessions (tests; production uses :meth:`tls_factory`)."""
        return Factory.forProtocol(lambda: AgentSession(self))

    def tls_factory(self, material: TlsMaterial) -> TLSMemoryBIOFactory:
        """Sessions behind server TLS that requires a CA-signed ``clientAuth`` certificate
        of one of the allowed balancers."""
        return server_factory(material, self.factory(), self.balancers, self.clock)

    def dial(
        self,
        endpoint: IStreamClientEndpoint,
        material: TlsMaterial,
        initial_delay: float = 0.1,
        max_delay: float = 30.0,
        jitter: Any = None,
    ) -> ClientService:
        """A service that keeps a session dialled to a balancer at ``endpoint`` (a terminal
        agent on a mobile network cannot be dialled): client TLS that requires the server
        to prove one of the allowed balancers with ``serverAuth``; the balancer then
        subscribes over it as over any session.  Reconnects with back-off."""
        factory = Factory.forProtocol(lambda: AgentSession(self, dialled=True))
        policy = backoffPolicy(initialDelay=initial_delay, maxDelay=max_delay, factor=2.0,
                               **({"jitter": jitter} if jitter is not None else {}))  # fmt: skip
        return ClientService(
            endpoint,
            client_factory(material, self.balancers, factory, clock=self.clock),
            retryPolicy=policy,
            clock=self.clock,
        )
