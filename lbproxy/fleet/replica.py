"""The local replica of the fleet's shared state: what `Balancer.shared` answers from.

Why this exists: on a local miss the balancer asks the fleet before its scheduler, and the
data path never waits for a store.  So every balancer keeps, in memory, a copy of what the
store holds -- bindings that differ from Maglev's answer, and confirmed care-of addresses
-- loaded when the connection to the store is made and kept current from the store's
change channel (`lbproxy.fleet.store`).  A lookup is a dict get and an expiry compare.

Every entry carries the store's write number (``version``): the changes of the whole
fleet have one total order, so a change older than what the replica holds is ignored, and
a fresh load merges the changes that arrived while it was reading.  Entries expire by
their TTL on the local clock.  The replica is bounded (``max_keys``); past it new keys are
refused and counted, never evicting what it holds.
"""

from __future__ import annotations

import heapq
from collections.abc import Iterable, Iterator

import attrs
from twisted.internet.interfaces import IReactorTime
from zope.interface import implementer

from lbproxy.core.balancer import ISharedBindings
from lbproxy.core.keys import Key
from lbproxy.fleet.codec import Change

__all__ = ["Entry", "Replica"]


@attrs.define(slots=True)
class Entry:
    """One record of the store: backend name or care-of address text (``field``), the
    balancer that wrote it, its write number and when it ends (local clock seconds)."""

    field: str
    origin: str
    version: int
    expires: float


Changed = tuple[str, bytes, "Entry | None", "Entry | None"]
"""(``"b"`` or ``"r"``, the identity or home address, entry before, entry after)."""


@implementer(ISharedBindings)
class Replica:
    """Identity -> backend name and home -> care-of address, as the store holds them."""

    def __init__(self, clock: IReactorTime, max_keys: int = 1_000_000) -> None:
        if max_keys < 1:
            raise ValueError("max_keys must be >= 1")
        self.clock = clock
        self.max_keys = max_keys
        #: identity (the bytes of its Key) -> entry; home (16 bytes) -> entry.
        self.bindings: dict[bytes, Entry] = {}
        self.confirmations: dict[bytes, Entry] = {}
        self._deadlines: list[tuple[float, int, bytes]] = []  # (expires, 0 b / 1 r, key)
        #: Changes applied, changes older than what was held, keys refused for room.
        self.applied = 0
        self.stale = 0
        self.full = 0
        self.expired = 0
        self.loads = 0

    # -- the data path (ISharedBindings) -----------------------------------------------

    def backend_name(self, key: Key) -> str | None:
        """The backend the fleet has `key` bound to, if a live record says so."""
        entry = self.bindings.get(key)
        if entry is None or entry.expires <= self.clock.seconds():
            return None
        return entry.field

    # -- reading -------------------------------------------------------------------------

    def binding(self, key: bytes, now: float | None = None) -> Entry | None:
        entry = self.bindings.get(key)
        if entry is None or entry.expires <= (self.clock.seconds() if now is None else now):
            return None
        return entry

    def confirmation(self, home: bytes, now: float | None = None) -> Entry | None:
        entry = self.confirmations.get(home)
        if entry is None or entry.expires <= (self.clock.seconds() if now is None else now):
            return None
        return entry

    def __len__(self) -> int:
        return len(self.bindings) + len(self.confirmations)

    # -- changes -------------------------------------------------------------------------

    def apply(self, change: Change, now: float | None = None) -> Changed | None:
        """Apply one change from the channel; what it changed, or None (stale, or no
        room).  An older write than the one held is ignored."""
        if now is None:
            now = self.clock.seconds()
        if change.key is not None:
            kind, table, key = "b", self.bindings, bytes(change.key)
        else:
            assert change.home is not None
            kind, table, key = "r", self.confirmations, change.home
        old = table.get(key)
        if old is not None and change.version <= old.version:
            self.stale += 1
            return None
        if change.op == "D":
            if old is None:
                return None
            del table[key]
            self.applied += 1
            return kind, key, old, None
        assert change.field is not None
        if old is None and len(self) >= self.max_keys:
            self.full += 1
            return None
        entry = Entry(change.field, change.origin, change.version, now + change.ttl)
        table[key] = entry
        self._file(kind, key, entry)
        self.applied += 1
        return kind, key, old, entry

    def replace(
        self,
        bindings: dict[bytes, Entry],
        confirmations: dict[bytes, Entry],
        during: Iterable[Change],
        now: float | None = None,
    ) -> list[Changed]:
        """Install a fresh load (what the store held, read key by key) with the changes
        that arrived while it was read merged in by write number; what differs from
        before, for the caller to act on."""
        if now is None:
            now = self.clock.seconds()
        for change in during:
            if change.key is not None:
                table, key = bindings, bytes(change.key)
            else:
                assert change.home is not None
                table, key = confirmations, change.home
            held = table.get(key)
            if held is not None and change.version <= held.version:
                continue
            if change.op == "D":
                table.pop(key, None)
            elif change.field is not None:
                table[key] = Entry(change.field, change.origin, change.version,
                                   now + change.ttl)
        total = len(bindings) + len(confirmations)
        if total > self.max_keys:
            self.full += total - self.max_keys
            for table in (bindings, confirmations):
                while table and len(bindings) + len(confirmations) > self.max_keys:
                    table.popitem()
        changed: list[Changed] = []
        for kind, old_table, new_table in (("b", self.bindings, bindings),
                                           ("r", self.confirmations, confirmations)):
            for key, entry in new_table.items():
                before = old_table.get(key)
                if before is None or before.field != entry.field:
                    changed.append((kind, key, before, entry))
            changed.extend((kind, key, before, None)
                           for key, before in old_table.items() if key not in new_table)
        self.bindings = bindings
        self.confirmations = confirmations
        self._deadlines = []
        for kind, table in (("b", bindings), ("r", confirmations)):
            for key, entry in table.items():
                self._file(kind, key, entry)
        self.loads += 1
        return changed

    def expire(self, now: float | None = None) -> int:
        """Drop the records whose TTL ended; the cost follows what is due."""
        if now is None:
            now = self.clock.seconds()
        heap = self._deadlines
        ended = 0
        while heap and heap[0][0] <= now:
            expires, which, key = heapq.heappop(heap)
            table = self.bindings if which == 0 else self.confirmations
            entry = table.get(key)
            if entry is not None and entry.expires == expires:
                del table[key]
                ended += 1
        self.expired += ended
        return ended

    def items(self) -> Iterator[tuple[str, bytes, Entry]]:
        """Every record held, as (``"b"`` or ``"r"``, key, entry)."""
        for key, entry in list(self.bindings.items()):
            yield "b", key, entry
        for key, entry in list(self.confirmations.items()):
            yield "r", key, entry

    def _file(self, kind: str, key: bytes, entry: Entry) -> None:
        heapq.heappush(self._deadlines, (entry.expires, 0 if kind == "b" else 1, key))

    def counts(self) -> dict[str, int]:
        return {"bindings": len(self.bindings), "confirmations": len(self.confirmations),
                "applied": self.applied, "stale": self.stale, "full": self.full,
                "expired": self.expired, "loads": self.loads}

