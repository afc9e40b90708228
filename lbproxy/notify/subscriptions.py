"""The balancer's bounded registry of subscriptions, one per (peer, address).

A terminal's first packet opens a subscription (``router.terminal_seen``), and anyone can
send a first packet with any source or home address.  So the registry has a hard bound,
and a flood of forged first packets must not lock real newcomers out.  A subscription
that no agent has reported a binding for (``seq`` None: a claim nobody vouched for) is
*probationary*, kept in a FIFO; when the registry is full, the oldest probationary one
makes room (and is handed to ``evicted``, so the router can unsubscribe it).  One with a
reported binding is never pushed out; only when every subscription has one is a new one
refused and counted.  Measured (benchmarks/flood.py): under a flood of forged first
packets the old registry kept 9 of 1,000 newcomers' subscriptions, this one all 1,000,
with no established one lost.  Each
subscription also remembers the last accepted sequence number and care-of address of its
terminal, which is what ``gate`` checks notifications against, and when the binding the peer
last reported ends (``binding_until``).

**Lifetime.**  A subscription has an expiry, pushed out by every accepted report.  When it
comes due, :meth:`Subscriptions.sweep` asks the caller whether the terminal is still alive
(``router.Notifier`` asks the table: a live binding under its addresses, a confirmed return
path, a reported binding that has not ended, a connected dial-in terminal); a live one is
*renewed* -- before it expires, as the sweep looks ``margin`` seconds ahead -- and only one
whose terminal has nothing left is ended.  The sweep's cost grows with the number due (a
heap), not with the registry.

Indexes: by (peer, address), by (peer, home), by peer, and by the care-of address each
subscription last accepted (so a table miss for an address some subscription already
follows needs no new Subscribe).
"""

from __future__ import annotations

import heapq
from collections import OrderedDict, deque
from collections.abc import Callable, Iterator

import attrs

KINDS = ("hoa", "coa")


@attrs.define
class Subscription:
    """One subscription: what we asked a peer about, and what it has told us since."""

    peer: str
    address: bytes  # the address subscribed to (16 octets), of kind ``kind``
    kind: str  # "hoa" | "coa"
    expires: float
    home: bytes | None = None  # known home address (= address for kind "hoa")
    care_of: bytes | None = None  # last accepted care-of address
    seq: int | None = None  # last accepted sequence number
    sub_id: int | None = None  # the agent's id; None while the Subscribe is in flight
    confirmed: bool = False  # the agent acknowledged it at least once (this connection)
    binding_until: float | None = None  # when the binding last reported ends


class Subscriptions:
    """Subscriptions by (peer, address) and (peer, home), at most ``max_entries`` of them."""

    def __init__(self, max_entries: int, idle_lifetime: float = 600.0) -> None:
        if max_entries < 1:
            raise ValueError("max_entries must be at least 1")
        self.max_entries = max_entries
        self.idle_lifetime = idle_lifetime
        self._by_address: dict[tuple[str, bytes], Subscription] = {}
        self._by_home: dict[tuple[str, bytes], Subscription] = {}
        self._by_peer: dict[str, dict[bytes, Subscription]] = {}
        self._by_care_of: dict[bytes, dict[tuple[str, bytes], Subscription]] = {}
        self._heap: list[tuple[float, str, bytes]] = []
        #: Subscriptions that ended and whose terminal was seen again within the idle
        #: lifetime (a table miss for its address, an agent naming its home): each one a
        #: subscription dropped while the terminal was still there.
        self.lapsed = 0
        # address or home -> (when its subscription ended, the other one), oldest first
        self._ended: OrderedDict[bytes, tuple[float, bytes | None]] = OrderedDict()
        # Probationary subscriptions (no reported binding yet), oldest first; entries that
        # got one since, or left, are skipped when reached.
        self._probation: deque[Subscription] = deque()
        #: Called with each probationary subscription pushed out to make room.
        self.evicted: Callable[[Subscription], object] = lambda sub: None
        #: Probationary subscriptions pushed out to make room for new ones.
        self.evictions = 0

    def __len__(self) -> int:
        return len(self._by_address)

    def __iter__(self) -> Iterator[Subscription]:
        return iter(list(self._by_address.values()))

    def get(self, peer: str, address: bytes) -> Subscription | None:
        """The subscription to ``address`` at ``peer``, if any."""
        return self._by_address.get((peer, address))

    def by_home(self, peer: str, home: bytes) -> Subscription | None:
        """The subscription at ``peer`` that follows the terminal with this home address."""
        return self._by_home.get((peer, home))

    def for_peer(self, peer: str) -> list[Subscription]:
        """Every subscription at ``peer`` (to send again after reconnecting)."""
        return list(self._by_peer.get(peer, {}).values())

    def count(self, peer: str) -> int:
        """How many subscriptions ``peer`` has."""
        return len(self._by_peer.get(peer, ()))

    def following(self, care_of: bytes) -> list[Subscription]:
        """The subscriptions whose last accepted care-of address is ``care_of``."""
        return list(self._by_care_of.get(care_of, {}).values())

    def _file(self, sub: Subscription) -> None:
        heapq.heappush(self._heap, (sub.expires, sub.peer, sub.address))
        if len(self._heap) > 4 * len(self._by_address) + 64:
            self._heap = [(s.expires, s.peer, s.address) for s in self._by_address.values()]
            heapq.heapify(self._heap)

    def _index(self, sub: Subscription) -> None:
        self._by_address[sub.peer, sub.address] = sub
        self._by_peer.setdefault(sub.peer, {})[sub.address] = sub
        if sub.home is not None:
            self._by_home[sub.peer, sub.home] = sub
        if sub.care_of is not None:
            self._by_care_of.setdefault(sub.care_of, {})[sub.peer, sub.address] = sub

    def add(self, peer: str, address: bytes, kind: str, now: float) -> Subscription | None:
        """Open a subscription; the existing one if already open; ``None`` when full."""
        if kind not in KINDS or len(address) != 16:
            raise ValueError(f"bad subscription {kind!r} / {len(address)} octets")
        self.seen(address, now)
        existing = self._by_address.get((peer, address))
        if existing is not None:
            return existing
        if kind == "hoa" and (peer, address) in self._by_home:
            return self._by_home[peer, address]
        if len(self._by_address) >= self.max_entries and not self._make_room():
            return None
        sub = Subscription(peer, address, kind, now + self.idle_lifetime)
        if kind == "hoa":
            sub.home = address
        else:
            sub.care_of = address
        self._index(sub)
        self._file(sub)
        self._probation.append(sub)
        if len(self._probation) > 2 * self.max_entries + 64:
            self._probation = deque(s for s in self._probation if self._probationary(s))
        return sub

    def _probationary(self, sub: Subscription) -> bool:
        return sub.seq is None and self._by_address.get((sub.peer, sub.address)) is sub

    def _make_room(self) -> bool:
        """Push out the oldest probationary subscription; False if there is none."""
        fifo = self._probation
        while fifo:
            old = fifo.popleft()
            if self._probationary(old):
                self.remove(old)
                self.evictions += 1
                self.evicted(old)
                return True
        return False

    def restore(self, sub: Subscription) -> bool:
        """Put back a saved subscription (persistence); False when it cannot be (full, or
        its address or home address is already followed at that peer)."""
        if sub.kind not in KINDS or len(sub.address) != 16:
            raise ValueError(f"bad subscription {sub.kind!r} / {len(sub.address)} octets")
        if (sub.peer, sub.address) in self._by_address or len(self) >= self.max_entries:
            return False
        if sub.home is not None and (sub.peer, sub.home) in self._by_home:
            return False
        self._index(sub)
        self._file(sub)
        return True

    def set_home(self, sub: Subscription, home: bytes, now: float | None = None) -> Subscription:
        """Record the home address an agent resolved a care-of subscription to.

        If the same peer already follows that home address, the older subscription wins and
        this one is dropped; the survivor is returned.  With ``now``, a home whose
        subscription ended lately counts as :attr:`lapsed`.
        """
        if now is not None:
            self.seen(home, now)
        other = self._by_home.get((sub.peer, home))
        if other is not None and other is not sub:
            self.remove(sub)
            return other
        if sub.home is not None and sub.home != home:
            self._by_home.pop((sub.peer, sub.home), None)
        sub.home = home
        if self._by_address.get((sub.peer, sub.address)) is sub:
            self._by_home[sub.peer, home] = sub
        return sub

    def set_care_of(self, sub: Subscription, care_of: bytes | None) -> None:
        """Record the care-of address last accepted for ``sub``'s terminal."""
        if sub.care_of == care_of:
            return
        self._unfollow(sub)
        sub.care_of = care_of
        if care_of is not None and self._by_address.get((sub.peer, sub.address)) is sub:
            self._by_care_of.setdefault(care_of, {})[sub.peer, sub.address] = sub

    def _unfollow(self, sub: Subscription) -> None:
        if sub.care_of is None:
            return
        followers = self._by_care_of.get(sub.care_of)
        if followers is not None and followers.get((sub.peer, sub.address)) is sub:
            del followers[sub.peer, sub.address]
            if not followers:
                del self._by_care_of[sub.care_of]

    def refresh(self, sub: Subscription, now: float, lifetime: float = 0.0) -> None:
        """Push the expiry out to cover ``lifetime`` seconds (at least the idle lifetime)."""
        self.renew(sub, now + max(lifetime, self.idle_lifetime))

    def renew(self, sub: Subscription, until: float) -> None:
        """Push the expiry out to ``until`` (never earlier than it is)."""
        if until > sub.expires:
            sub.expires = until
            self._file(sub)

    def remove(self, sub: Subscription) -> None:
        """Forget ``sub`` (unsubscribed, refused by the agent, or expired)."""
        if self._by_address.get((sub.peer, sub.address)) is sub:
            del self._by_address[sub.peer, sub.address]
            peer = self._by_peer[sub.peer]
            del peer[sub.address]
            if not peer:
                del self._by_peer[sub.peer]
            self._unfollow(sub)
        if sub.home is not None and self._by_home.get((sub.peer, sub.home)) is sub:
            del self._by_home[sub.peer, sub.home]

    def seen(self, address: bytes, now: float) -> None:
        """A terminal was seen at (or named with) ``address``: if its subscription ended
        within the idle lifetime, that subscription lapsed."""
        ended = self._ended.pop(address, None)
        if ended is None:
            return
        when, other = ended
        if other is not None:
            self._ended.pop(other, None)
        if now - when <= self.idle_lifetime:
            self.lapsed += 1

    def _ended_at(self, sub: Subscription, now: float) -> None:
        if sub.seq is None and not sub.confirmed:
            return  # never a terminal an agent knew (a forged address, say): nothing lapses
        other = sub.home if sub.home not in (None, sub.address) else None
        self._ended[sub.address] = (now, other)
        self._ended.move_to_end(sub.address)
        if other is not None:
            self._ended[other] = (now, sub.address)
            self._ended.move_to_end(other)
        while len(self._ended) > self.max_entries:
            self._ended.popitem(last=False)

    def sweep(
        self,
        now: float,
        alive: Callable[[Subscription], float | None] | None = None,
        margin: float = 0.0,
    ) -> list[Subscription]:
        """Look at every subscription due by ``now + margin``: one whose terminal is alive
        (``alive(sub)`` is a time after ``now``: until when it is known to be) is renewed
        to that time or the idle lifetime from now, whichever is later; one not yet
        expired is kept until it is; the others are removed and returned.  Costs what is
        due."""
        gone: list[Subscription] = []
        horizon = now + margin
        again: list[Subscription] = []
        while self._heap and self._heap[0][0] <= horizon:
            expires, peer, address = heapq.heappop(self._heap)
            sub = self._by_address.get((peer, address))
            if sub is None or sub.expires != expires:
                continue  # removed, or renewed since (filed again)
            until = alive(sub) if alive is not None else None
            if until is not None and until > now:
                sub.expires = max(until, now + self.idle_lifetime, sub.expires)
                again.append(sub)
            elif sub.expires > now:
                again.append(sub)  # not expired yet: looked at again when it is
            else:
                self.remove(sub)
                self._ended_at(sub, now)
                gone.append(sub)
        for sub in again:
            heapq.heappush(self._heap, (sub.expires, sub.peer, sub.address))
        return gone

    def expire(self, now: float) -> list[Subscription]:
        """Remove and return the subscriptions idle past their expiry; cost ~ number due."""
        return self.sweep(now)
