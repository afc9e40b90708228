"""The balancer's checks on what an authenticated peer tells it, then the listener call.

By the time a message reaches the gate, TLS has proven *who* the peer is.  The gate decides
whether to *believe* it, and decides **completely before changing anything**: a refused
message leaves the subscriptions, the table and the return paths exactly as they were, and
is counted by reason.  In order (the first failing check names the reason):

1. the lifetime is an integer within RFC 6275's 0..262,140 s (``bad_lifetime``), the
   sequence number one of 0..65535 (``bad_argument``);
2. the home and care-of addresses pass :class:`~lbproxy.notify.addresses.AddressRules`:
   global unicast, not the balancer's own, not forbidden (``bad_address``,
   ``local_address``, ``forbidden_address``);
3. the home address is one the peer is entitled to (``not_entitled``), and somebody
   subscribed to it at that peer (``not_subscribed``);
4. the sequence number is newer than the last one accepted, modulo 2**16 (RFC 6275 §9.5.1;
   ``stale``); a repeat of the known binding only refreshes;
5. the listener agrees that the change moves only this terminal's own bindings
   (``IBindingListener.refusal_for``; ``not_owner``).

A message that passes updates the subscription and reaches the ``IBindingListener``: a
move as ``binding_changed``, a re-registration from the same care-of address (a newer
sequence number) as ``binding_refreshed`` -- the binding's lifetime starts again end to end.  Pure:
the clock is injected, the edges map a returned :class:`Refusal` to an AMP error.  The agent's
``old_care_of`` is not believed: the old care-of address is the balancer's own record (the
subscription's last accepted one).
"""

from __future__ import annotations

import ipaddress

from twisted.internet.interfaces import IReactorTime

from lbproxy.notify.addresses import AddressRules
from lbproxy.notify.listener import IBindingListener
from lbproxy.notify.policy import (
    IEntitlement,
    Refusal,
    RefusalCounters,
    seq_newer,
    valid_lifetime,
    valid_seq,
)
from lbproxy.notify.subscriptions import Subscription, Subscriptions

MAX_SUB_ID = (1 << 63) - 1


def _hex(address: bytes | None) -> str:
    if address is None:
        return "-"
    if len(address) != 16:
        return f"<{len(address)} octets>"
    return str(ipaddress.IPv6Address(address))


class Gate:
    """Applies notifications from peers to the subscriptions and the listener."""

    def __init__(
        self,
        subscriptions: Subscriptions,
        listener: IBindingListener,
        clock: IReactorTime,
        counters: RefusalCounters | None = None,
        addresses: AddressRules | None = None,
    ) -> None:
        self.subscriptions = subscriptions
        self.listener = listener
        self.clock = clock
        self.counters = counters if counters is not None else RefusalCounters()
        self.addresses = addresses if addresses is not None else AddressRules()

    # -- checks (no state changes) ------------------------------------------------------

    def _binding_refusal(
        self, peer: str, home: bytes, care_of: bytes, seq: object, lifetime: object
    ) -> Refusal | None:
        """The checks of a reported binding that need no state (steps 1 and 2)."""
        if not valid_lifetime(lifetime):
            return self.counters.refuse(
                Refusal.BAD_LIFETIME, peer, f"{_hex(home)} lifetime {lifetime!r}"
            )
        if not valid_seq(seq):
            return self.counters.refuse(Refusal.BAD_ARGUMENT, peer, f"{_hex(home)} seq {seq!r}")
        refused = self.addresses.home(home)
        if refused is None and care_of != home:
            refused = self.addresses.care_of(care_of)
        if refused is not None:
            return self.counters.refuse(refused[0], peer, refused[1])
        return None

    def _find(self, peer: str, entitlement: IEntitlement, home: bytes) -> Subscription | Refusal:
        if not entitlement.allows(home):
            return self.counters.refuse(Refusal.NOT_ENTITLED, peer, _hex(home))
        sub = self.subscriptions.by_home(peer, home)
        if sub is None:
            return self.counters.refuse(Refusal.NOT_SUBSCRIBED, peer, _hex(home))
        return sub

    def _stale(self, peer: str, sub: Subscription, seq: int) -> Refusal | None:
        if sub.seq is not None and not seq_newer(seq, sub.seq):
            return self.counters.refuse(
                Refusal.STALE, peer, f"{_hex(sub.home)} seq {seq} after {sub.seq}"
            )
        return None

    def _listener_refusal(
        self, peer: str, home: bytes, old: bytes | None, new: bytes, lifetime: int
    ) -> Refusal | None:
        check = getattr(self.listener, "refusal_for", None)
        found = None if check is None else check(home, old, new, lifetime)
        if found is not None:
            return self.counters.refuse(found[0], peer, found[1])
        return None

    # -- changes ------------------------------------------------------------------------

    def _apply(
        self, sub: Subscription, care_of: bytes, seq: int, lifetime: int, first: bool
    ) -> None:
        home = sub.home
        assert home is not None
        old = sub.care_of
        changed = old != care_of or sub.seq is None or first
        bound = lifetime > 0 and care_of != home
        # A re-registration: the same care-of address, a newer sequence number.
        renewed = not changed and sub.seq != seq and bound
        self.subscriptions.set_care_of(sub, care_of)
        sub.seq = seq
        now = self.clock.seconds()
        sub.binding_until = now + lifetime if bound else None
        self.subscriptions.refresh(sub, now, float(lifetime))
        if changed:
            self.counters.accepted += 1
            self.listener.binding_changed(home, old, care_of, seq, lifetime)
        elif renewed:
            self.counters.refreshed += 1
            refreshed = getattr(self.listener, "binding_refreshed", None)
            if refreshed is not None:
                refreshed(home, care_of, seq, lifetime)

    # -- what peers say -----------------------------------------------------------------

    def subscribed(
        self,
        peer: str,
        entitlement: IEntitlement,
        sub: Subscription,
        sub_id: object,
        home: bytes | None,
        care_of: bytes | None,
        seq: object,
        lifetime: object,
    ) -> Refusal | None:
        """An agent accepted ``sub``; ``home``/``care_of``/``seq`` is its current binding
        (``care_of`` ``None`` and ``seq`` ``None``: it has none, and then ``lifetime`` is
        0).  The answer must be about what was asked (the home address asked for, or the
        care-of address asked for).  Returns a refusal, leaving ``sub`` as it was (pending),
        if the answer is malformed or lies."""
        asked, kind = (sub.address, sub.kind) if sub.home is None else (sub.home, "hoa")
        if type(sub_id) is not int or not 0 <= sub_id <= MAX_SUB_ID:
            return self.counters.refuse(Refusal.BAD_ARGUMENT, peer, f"sub_id {sub_id!r}")
        if home is None:
            return self.counters.refuse(Refusal.BAD_ARGUMENT, peer, "answer without a home")
        if kind == "hoa" and home != asked:
            return self.counters.refuse(
                Refusal.BAD_ARGUMENT, peer, f"asked for {_hex(asked)}, answered {_hex(home)}"
            )
        if kind == "coa" and care_of != asked:
            return self.counters.refuse(
                Refusal.BAD_ARGUMENT, peer,
                f"asked for care-of {_hex(asked)}, answered {_hex(care_of)}",
            )  # fmt: skip
        if care_of is None or seq is None:
            if care_of is not None or seq is not None or lifetime != 0:
                return self.counters.refuse(
                    Refusal.BAD_ARGUMENT, peer, f"{_hex(home)}: no binding, but seq/lifetime"
                )
            refused = self.addresses.home(home)
            if refused is not None:
                return self.counters.refuse(refused[0], peer, refused[1])
        else:
            r = self._binding_refusal(peer, home, care_of, seq, lifetime)
            if r is not None:
                return r
        if not entitlement.allows(home):
            return self.counters.refuse(Refusal.NOT_ENTITLED, peer, f"subscribed {_hex(home)}")
        survivor = self.subscriptions.by_home(peer, home)
        target = survivor if survivor is not None else sub
        first = not sub.confirmed
        if care_of is None or seq is None:
            sub.sub_id, sub.confirmed = sub_id, True
            now = self.clock.seconds()
            self.subscriptions.refresh(self.subscriptions.set_home(sub, home, now), now)
            return None
        assert isinstance(seq, int) and isinstance(lifetime, int)
        same = target.seq == seq and target.care_of == care_of
        if not same:
            r = self._stale(peer, target, seq)
            if r is not None:
                return r
        if not same or first:
            r = self._listener_refusal(peer, home, target.care_of, care_of, lifetime)
            if r is not None:
                return r
        sub.sub_id, sub.confirmed = sub_id, True
        target = self.subscriptions.set_home(sub, home, self.clock.seconds())
        if same:
            self.subscriptions.refresh(target, self.clock.seconds(), float(lifetime))
            if first:
                self._apply(target, care_of, seq, lifetime, first)
            return None
        self._apply(target, care_of, seq, lifetime, first)
        return None

    def changed(
        self,
        peer: str,
        entitlement: IEntitlement,
        home: bytes,
        old_care_of: bytes | None,
        new_care_of: bytes,
        seq: object,
        lifetime: object,
    ) -> Refusal | None:
        """A BindingChanged from ``peer``; ``None`` when accepted.  ``old_care_of`` is the
        agent's claim, not believed: the balancer's own record of the last accepted care-of
        address is what the listener is given."""
        r = self._binding_refusal(peer, home, new_care_of, seq, lifetime)
        if r is not None:
            return r
        assert isinstance(seq, int) and isinstance(lifetime, int)
        found = self._find(peer, entitlement, home)
        if isinstance(found, Refusal):
            return found
        r = self._stale(peer, found, seq) or self._listener_refusal(
            peer, home, found.care_of, new_care_of, lifetime
        )
        if r is not None:
            return r
        self._apply(found, new_care_of, seq, lifetime, first=False)
        return None

    def snapshot_entry(
        self,
        peer: str,
        entitlement: IEntitlement,
        home: bytes,
        care_of: bytes,
        seq: object,
        lifetime: object,
    ) -> Refusal | None:
        """One binding from a BindingSnapshot; the same binding again only refreshes."""
        r = self._binding_refusal(peer, home, care_of, seq, lifetime)
        if r is not None:
            return r
        assert isinstance(seq, int) and isinstance(lifetime, int)
        found = self._find(peer, entitlement, home)
        if isinstance(found, Refusal):
            return found
        if found.seq == seq and found.care_of == care_of:
            self.subscriptions.refresh(found, self.clock.seconds(), float(lifetime))
            return None
        r = self._stale(peer, found, seq) or self._listener_refusal(
            peer, home, found.care_of, care_of, lifetime
        )
        if r is not None:
            return r
        self._apply(found, care_of, seq, lifetime, first=False)
        return None
