"""The balancer's bounded registry of subscriptions, one per (peer, address).

A terminal's first packet opens a subscription (``router.terminal_seen``), and anyone can
send a first packet with any source or home address.  So the registry has a hard bound: when
it is full, new subscriptions are refused and counted while established ones stay; idle ones
expire by a sweep whose cost grows with the number due (a heap), not with the registry.
Each subscription also remembers the last accepted sequence number and care-of address of its
terminal, which is what ``gate`` checks notifications against.
"""

from __future__ import annotations

import heapq
from collections.abc import Iterator

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
    confirmed: bool = False  # the agent acknowledged it at least once


class Subscriptions:
    """Subscriptions by (peer, address) and (peer, home), at most ``max_entries`` of them."""

    def __init__(self, max_entries: int, idle_lifetime: float = 600.0) -> None:
        if max_entries < 1:
            raise ValueError("max_entries must be at least 1")
        self.max_entries = max_entries
        self.idle_lifetime = idle_lifetime
        self._by_address: dict[tuple[str, bytes], Subscription] = {}
        self._by_home: dict[tuple[str, bytes], Subscription] = {}
        self._heap: list[tuple[float, str, bytes]] = []

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
        return [s for (p, _), s in self._by_address.items() if p == peer]

    def add(self, peer: str, address: bytes, kind: str, now: float) -> Subscription | None:
        """Open a subscription; the existing one if already open; ``None`` when full."""
        if kind not in KINDS or len(address) != 16:
            raise ValueError(f"bad subscription {kind!r} / {len(address)} octets")
        existing = self._by_address.get((peer, address))
        if existing is not None:
            return existing
        if kind == "hoa" and (peer, address) in self._by_home:
            return self._by_home[peer, address]
        if len(self._by_address) >= self.max_entries:
            return None
        sub = Subscription(peer, address, kind, now + self.idle_lifetime)
        if kind == "hoa":
            sub.home = address
            self._by_home[peer, address] = sub
        else:
            sub.care_of = address
        self._by_address[peer, address] = sub
        heapq.heappush(self._heap, (sub.expires, peer, address))
        return sub

    def set_home(self, sub: Subscription, home: bytes) -> Subscription:
        """Record the home address an agent resolved a care-of subscription to.

        If the same peer already follows that home address, the older subscription wins and
        this one is dropped; the survivor is returned.
        """
        other = self._by_home.get((sub.peer, home))
        if other is not None and other is not sub:
            self.remove(sub)
            return other
        if sub.home is not None and sub.home != home:
            self._by_home.pop((sub.peer, sub.home), None)
        sub.home = home
        self._by_home[sub.peer, home] = sub
        return sub

    def refresh(self, sub: Subscription, now: float, lifetime: float = 0.0) -> None:
        """Push the expiry out to cover ``lifetime`` seconds (at least the idle lifetime)."""
        expires = now + max(lifetime, self.idle_lifetime)
        if expires > sub.expires:
            sub.expires = expires
            heapq.heappush(self._heap, (expires, sub.peer, sub.address))
            if len(self._heap) > 4 * len(self._by_address) + 64:
                self._heap = [(s.expires, s.peer, s.address) for s in self._by_address.values()]
                heapq.heapify(self._heap)

    def remove(self, sub: Subscription) -> None:
        """Forget ``sub`` (unsubscribed, refused by the agent, or expired)."""
        if self._by_address.get((sub.peer, sub.address)) is sub:
            del self._by_address[sub.peer, sub.address]
        if sub.home is not None and self._by_home.get((sub.peer, sub.home)) is sub:
            del self._by_home[sub.peer, sub.home]

    def expire(self, now: float) -> list[Subscription]:
        """Remove and return the subscriptions idle past their expiry; cost ~ number due."""
        gone: list[Subscription] = []
        while self._heap and self._heap[0][0] <= now:
            _, peer, address = heapq.heappop(self._heap)
            sub = self._by_address.get((peer, address))
            if sub is not None and sub.expires <= now:
                self.remove(sub)
                gone.append(sub)
        return gone
