"""The balancer's checks on what an authenticated peer tells it, then the listener call.

By the time a message reaches the gate, TLS has proven *who* the peer is.  The gate decides
whether to *believe* it: the home address must be one the peer is entitled to, somebody must
have subscribed to it at that peer, and the sequence number must be newer than the last one
accepted (RFC 6275 §9.5.1).  A message that passes updates the subscription and reaches the
``IBindingListener``; one that fails is counted and logged, and the listener never hears of
it.  Pure: the clock is injected, the edges map a returned :class:`Refusal` to an AMP error.
"""

from __future__ import annotations

import ipaddress

from twisted.internet.interfaces import IReactorTime

from lbproxy.notify.listener import IBindingListener
from lbproxy.notify.policy import IEntitlement, Refusal, RefusalCounters, seq_newer
from lbproxy.notify.subscriptions import Subscription, Subscriptions


def _hex(address: bytes | None) -> str:
    return "-" if address is None else str(ipaddress.IPv6Address(address))


class Gate:
    """Applies notifications from peers to the subscriptions and the listener."""

    def __init__(
        self,
        subscriptions: Subscriptions,
        listener: IBindingListener,
        clock: IReactorTime,
        counters: RefusalCounters | None = None,
    ) -> None:
        self.subscriptions = subscriptions
        self.listener = listener
        self.clock = clock
        self.counters = counters if counters is not None else RefusalCounters()

    def _apply(
        self, sub: Subscription, care_of: bytes, seq: int, lifetime: int, first: bool
    ) -> None:
        home = sub.home
        assert home is not None
        old = sub.care_of
        changed = old != care_of or sub.seq is None or first
        sub.care_of, sub.seq = care_of, seq
        self.subscriptions.refresh(sub, self.clock.seconds(), float(lifetime))
        if changed:
            self.counters.accepted += 1
            self.listener.binding_changed(home, old, care_of, seq, lifetime)

    def subscribed(
        self,
        peer: str,
        entitlement: IEntitlement,
        sub: Subscription,
        sub_id: int,
        home: bytes | None,
        care_of: bytes | None,
        seq: int | None,
        lifetime: int,
    ) -> Refusal | None:
        """An agent accepted ``sub``; ``home``/``care_of``/``seq`` is its current binding,
        if it has one.  Returns a refusal (and drops the subscription) if it lies."""
        if home is not None and not entitlement.allows(home):
            self.subscriptions.remove(sub)
            return self.counters.refuse(Refusal.NOT_ENTITLED, peer, f"subscribed {_hex(home)}")
        sub.sub_id = sub_id
        first = not sub.confirmed
        sub.confirmed = True
        if home is not None:
            sub = self.subscriptions.set_home(sub, home)
        if sub.home is None or care_of is None or seq is None:
            self.subscriptions.refresh(sub, self.clock.seconds())
            return None
        return self._entry(peer, sub, care_of, seq, lifetime, first)

    def _entry(
        self, peer: str, sub: Subscription, care_of: bytes, seq: int, lifetime: int, first: bool
    ) -> Refusal | None:
        if sub.seq is not None and seq == sub.seq and care_of == sub.care_of:
            # The same binding again (a periodic snapshot): refresh only.
            self.subscriptions.refresh(sub, self.clock.seconds(), float(lifetime))
            if first:
                self._apply(sub, care_of, seq, lifetime, first)
            return None
        if sub.seq is not None and not seq_newer(seq, sub.seq):
            return self.counters.refuse(
                Refusal.STALE, peer, f"{_hex(sub.home)} seq {seq} after {sub.seq}"
            )
        self._apply(sub, care_of, seq, lifetime, first)
        return None

    def _find(self, peer: str, entitlement: IEntitlement, home: bytes) -> Subscription | Refusal:
        if not entitlement.allows(home):
            return self.counters.refuse(Refusal.NOT_ENTITLED, peer, _hex(home))
        sub = self.subscriptions.by_home(peer, home)
        if sub is None:
            return self.counters.refuse(Refusal.NOT_SUBSCRIBED, peer, _hex(home))
        return sub

    def changed(
        self,
        peer: str,
        entitlement: IEntitlement,
        home: bytes,
        old_care_of: bytes | None,
        new_care_of: bytes,
        seq: int,
        lifetime: int,
    ) -> Refusal | None:
        """A BindingChanged from ``peer``; ``None`` when accepted."""
        found = self._find(peer, entitlement, home)
        if isinstance(found, Refusal):
            return found
        if found.seq is not None and not seq_newer(seq, found.seq):
            return self.counters.refuse(
                Refusal.STALE, peer, f"{_hex(home)} seq {seq} after {found.seq}"
            )
        if found.care_of is None and old_care_of is not None:
            found.care_of = old_care_of  # what the agent knew before; we knew nothing
        self._apply(found, new_care_of, seq, lifetime, first=False)
        return None

    def snapshot_entry(
        self,
        peer: str,
        entitlement: IEntitlement,
        home: bytes,
        care_of: bytes,
        seq: int,
        lifetime: int,
    ) -> Refusal | None:
        """One binding from a BindingSnapshot; the same binding again only refreshes."""
        found = self._find(peer, entitlement, home)
        if isinstance(found, Refusal):
            return found
        return self._entry(peer, found, care_of, seq, lifetime, first=False)
