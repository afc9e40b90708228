"""An agent's binding cache: home address -> (care-of address, sequence number, lifetime).

A home-agent agent fills it from the Binding Updates/Acknowledgements it observes and from
bindings that home-agent software pushes; a terminal agent holds its own single binding.
Either way the rules are those of RFC 6275 §9.5.1: a newer sequence number replaces the
binding, the same one again only refreshes it, an older one is refused; lifetime 0 (or a
care-of address equal to the home address) deletes it.  Every accepted registration with a
newer sequence number is handed to the observers -- the agent's sessions, which notify
subscribed balancers: a move, and also a **re-registration** from the same care-of address
(``CacheChange.refresh``), which is how a terminal that stays put keeps its binding alive
(RFC 6275 §11.7.1) and how the balancer learns that the binding's lifetime started again.
The same sequence number seen again (a retransmitted Binding Update, the Acknowledgement
of one already seen) only refreshes the lifetime here.  Pure; bounded.
"""

from __future__ import annotations

import heapq
from collections.abc import Callable, Iterator

import attrs

from lbproxy.notify.policy import seq_newer, valid_lifetime, valid_seq


@attrs.frozen
class CachedBinding:
    """One binding as an agent knows it."""

    home: bytes
    care_of: bytes
    seq: int
    lifetime: int  # seconds granted
    expires: float


@attrs.frozen
class CacheChange:
    """A binding changed: ``new_care_of`` is the home address when the binding was deleted."""

    home: bytes
    old_care_of: bytes | None
    new_care_of: bytes
    seq: int
    lifetime: int

    @property
    def refresh(self) -> bool:
        """A re-registration: the same care-of address with a newer sequence number."""
        return self.old_care_of == self.new_care_of


class CacheFull(Exception):  # noqa: N818 - a condition, like queue.Full
    """The cache holds ``max_entries`` bindings and the update is for a new home address."""


class BindingCache:
    """Bindings by home address and by care-of address, at most ``max_entries``."""

    def __init__(self, max_entries: int = 100_000) -> None:
        self.max_entries = max_entries
        self._by_home: dict[bytes, CachedBinding] = {}
        self._by_care_of: dict[bytes, bytes] = {}
        self._last_seq: dict[bytes, int] = {}  # survives deletion, for replay checks
        self._heap: list[tuple[float, bytes]] = []
        self.observers: list[Callable[[CacheChange], None]] = []

    def __len__(self) -> int:
        return len(self._by_home)

    def __iter__(self) -> Iterator[CachedBinding]:
        return iter(list(self._by_home.values()))

    def get(self, home: bytes) -> CachedBinding | None:
        """The binding of ``home``, if any."""
        return self._by_home.get(home)

    def by_care_of(self, care_of: bytes) -> CachedBinding | None:
        """The binding whose care-of address is ``care_of``, if any."""
        home = self._by_care_of.get(care_of)
        return None if home is None else self._by_home.get(home)

    def last_seq(self, home: bytes) -> int | None:
        """The last accepted sequence number for ``home`` (kept after deletion)."""
        return self._last_seq.get(home)

    def update(
        self, home: bytes, care_of: bytes, seq: int, lifetime: int, now: float
    ) -> CacheChange | None:
        """Apply a binding; the change (also given to the observers: a move, a deletion, or
        a re-registration from the same care-of address with a newer sequence number), or
        ``None`` when it only refreshed the binding (the same sequence number again).
        Raises ``ValueError`` for a stale sequence number, a sequence number that is not
        an int in 0..65535, a lifetime that is not an int in 0..262,140 s (RFC 6275
        §6.1.7) -- all before anything changes -- and :class:`CacheFull` when no room is
        left."""
        if len(home) != 16 or len(care_of) != 16:
            raise ValueError("addresses must be 16 octets")
        if not valid_seq(seq):
            raise ValueError(f"sequence number {seq!r} is not an integer in 0..65535")
        if not valid_lifetime(lifetime):
            raise ValueError(f"lifetime {lifetime!r} is not an integer in 0..262140")
        current = self._by_home.get(home)
        last = self._last_seq.get(home)
        same = current is not None and seq == last and care_of == current.care_of
        if same and current is not None and lifetime > 0:
            self._store(attrs.evolve(current, lifetime=lifetime, expires=now + lifetime))
            return None
        if last is not None and not seq_newer(seq, last):
            raise ValueError(f"stale sequence number {seq} (last {last})")
        deleting = lifetime == 0 or care_of == home
        if current is None and not deleting and len(self._by_home) >= self.max_entries:
            raise CacheFull()
        self._last_seq[home] = seq
        old = None if current is None else current.care_of
        if current is not None:
            self._by_care_of.pop(current.care_of, None)
        if deleting:
            self._by_home.pop(home, None)
            change = CacheChange(home, old, home, seq, 0)
        else:
            self._store(CachedBinding(home, care_of, seq, lifetime, now + lifetime))
            change = CacheChange(home, old, care_of, seq, lifetime)
        for observer in list(self.observers):
            observer(change)
        return change

    def _store(self, binding: CachedBinding) -> None:
        self._by_home[binding.home] = binding
        self._by_care_of[binding.care_of] = binding.home
        heapq.heappush(self._heap, (binding.expires, binding.home))
        if len(self._heap) > 4 * len(self._by_home) + 64:
            self._heap = [(b.expires, b.home) for b in self._by_home.values()]
            heapq.heapify(self._heap)

    def expire(self, now: float) -> list[CacheChange]:
        """Delete bindings whose lifetime ran out.  Not a new Binding Update, so observers are
        not told (the balancer's own entries and subscriptions expire by themselves)."""
        changes: list[CacheChange] = []
        while self._heap and self._heap[0][0] <= now:
            _, home = heapq.heappop(self._heap)
            b = self._by_home.get(home)
            if b is not None and b.expires <= now:
                del self._by_home[home]
                self._by_care_of.pop(b.care_of, None)
                change = CacheChange(home, b.care_of, home, b.seq, 0)
                changes.append(change)
        return changes
