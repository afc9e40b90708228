"""The sticky table: terminal identity -> backend, with lifetimes and a bound.

Why this exists: it is the patent's load-balancing table (Fig. 15, claims 8-10): every
packet of a known terminal goes to the backend chosen for its first packet, each entry
lives for a lifetime that every packet using it starts again, and a care-of address
change copies the backend to the new address's entry (:meth:`StickyTable.rekey`, steps
T231-T235).  It is pure: time comes from an injected ``IReactorTime`` (or a ``now``
argument), nothing is scheduled.

Theory of operation
-------------------
*Lookup.*  A hit is a dict get, an expiry compare and three attribute stores.  Expiry
times are rounded up to a multiple of ``resolution`` (default 1/128 s) and the float
object is shared by every entry refreshed within the same interval, so a busy table
does not allocate a float per packet, and an entry lives at least ``lifetime``.

*Two segments* (a segmented LRU, bounded by ``max_entries``):

- **probationary**: a new entry (one packet seen) waits in a FIFO (``collections.deque``).
  Its expiry never changes while it is there, so the FIFO is also ordered by expiry: the
  oldest is both the first to expire and the first to evict.
- **established**: an entry that saw a second packet, or was made or refreshed by
  ``rekey`` (a continuing terminal).  It is filed in a coarse timer wheel: a dict from
  integer deadline (``ceil(expires / sweep_grain)``) to a list of bindings, plus a heap
  of those deadlines.  A hit does *not* move it; when its bucket comes due, the sweep
  finds its real expiry later and files it again, once per lifetime at most.

*Expiry* (:meth:`StickyTable.expire`) pops the due probationary entries from the FIFO's
head and the due buckets from the heap: the work is proportional to what is due (plus
stale filings, each examined once), never to the table's size.  Entries are removed up
to one ``sweep_grain`` late; :meth:`lookup` and :meth:`get` never return an expired one.

*Eviction*: when the table is full, an insert first sweeps what is due, then evicts the
oldest probationary entry; if every entry is established the insert is *refused* and
counted.  A flood of forged identities (one packet each) therefore only ever displaces
other one-packet entries; established terminals keep their backend.

*Aliases.*  A terminal carries several identities (its home address, its care-of
address, an interface ID, an SPI...).  One of them is the binding's key; the others are
*aliases* (:meth:`StickyTable.link`): further dict keys for the same :class:`Binding`, so
a lookup by any of them is the same hit (same backend, lifetime, counters).  They go with
the binding (expiry, eviction, removal).  Linking never takes an identity that has a
live entry of its own: only :meth:`rekey` (an authenticated notification) and
:meth:`insert` (the scheduler, the operator) change where a bound identity leads.  A
binding keeps at most ``max_aliases`` aliases, the oldest dropped first, so no terminal
(and no forger) can make one binding hold an unbounded number of identities.

*Stale filings*: each :class:`Binding` records where it is filed (``_where``: the FIFO
marker, a wheel bucket, or None once removed).  A filing whose binding has moved on or
been removed is skipped and dropped when reached, so nothing is searched on removal.
"""

from __future__ import annotations

import heapq
import math
import types
from collections import deque
from collections.abc import Callable, Iterator, Mapping
from typing import TYPE_CHECKING, Final

from lbproxy.core.keys import Key

if TYPE_CHECKING:
    from twisted.internet.interfaces import IReactorTime

    from lbproxy.core.selection import Backend

__all__ = ["Binding", "StickyTable", "TableStats"]


def _as_key(data: bytes) -> Key:
    """The Key whose bytes are `data` (no checks: `data` came from a Key)."""
    return bytes.__new__(Key, data)


class _Probation:
    """Marker: the binding waits in the probationary FIFO."""

    def __repr__(self) -> str:
        return "PROBATION"


_PROBATION: Final = _Probation()


class Binding:
    """One terminal identity's binding to a backend (mutable, slotted to stay small).

    ``expires`` and ``created`` are clock seconds (``created`` rounded down, ``expires``
    rounded up, to the table's resolution); ``packets`` counts the packets that used the
    entry; ``care_of`` is the last care-of address seen (16 bytes).  Whether replies may
    go to it is not the binding's to say: `lbproxy.core.returnpaths` is the one record
    of confirmed care-of addresses.
    ``key`` is the key it is filed under.  Change ``backend`` only through
    :meth:`StickyTable.insert` or :meth:`StickyTable.rekey`, which keep the load counts.
    """

    __slots__ = ("_key", "_where", "aliases", "backend", "care_of", "created", "expires",
                 "packets")

    def __init__(
        self,
        key: bytes,
        backend: Backend,
        created: float,
        expires: float,
        packets: int = 1,
        care_of: bytes | None = None,
    ) -> None:
        self._key = key  # the table's plain-bytes copy of the Key (see StickyTable)
        self.backend = backend
        self.created = created
        self.expires = expires
        self.packets = packets
        self.care_of = care_of
        #: The other identities leading here (plain bytes of their Keys), oldest first;
        #: None when there are none (the common case costs no list).
        self.aliases: list[bytes] | None = None
        self._where: object = None

    @property
    def key(self) -> Key:
        """The key this binding is filed under."""
        return _as_key(self._key)

    @property
    def established(self) -> bool:
        """True once the entry left probation (second packet, or made by ``rekey``)."""
        return self._where is not _PROBATION

    def __repr__(self) -> str:
        return (
            f"<Binding {self.key} -> {self.backend.name} expires={self.expires:.3f}"
            f" packets={self.packets} {'established' if self.established else 'new'}>"
        )


class TableStats:
    """Counters of a :class:`StickyTable` (plain ints, read by metrics and the manhole).

    ``swept`` counts filings examined by :meth:`StickyTable.expire`: it measures the
    sweep's work, which must follow what was due, not the table's size.
    """

    __slots__ = ("alias_evictions", "evictions", "expirations", "hits", "inserts", "links",
                 "misses", "refusals", "rekeys", "swept")

    def __init__(self) -> None:
        self.hits = 0
        self.misses = 0
        self.inserts = 0
        self.expirations = 0
        self.evictions = 0
        self.refusals = 0
        self.rekeys = 0
        self.swept = 0
        #: Identities linked as aliases, and aliases dropped to keep a binding's bound.
        self.links = 0
        self.alias_evictions = 0

    def as_dict(self) -> dict[str, int]:
        return {name: getattr(self, name) for name in self.__slots__}

    def __repr__(self) -> str:
        return f"TableStats({self.as_dict()})"


class StickyTable:
    """Key -> :class:`Binding`, with lifetimes, a bound and per-backend load counts.

    ``lifetime`` is the seconds an idle entry lives; ``max_entries`` bounds the table
    (see the module docstring for the eviction policy).  ``resolution`` is the rounding
    of expiry times, ``sweep_grain`` the width of a timer-wheel bucket (both seconds).
    Every method taking ``now`` reads the clock when it is None; the data path can pass
    one reading for a whole batch of packets.
    """

    def __init__(
        self,
        clock: IReactorTime,
        lifetime: float,
        max_entries: int,
        resolution: float = 1 / 128,
        sweep_grain: float = 1.0,
        max_aliases: int = 8,
    ) -> None:
        if lifetime <= 0:
            raise ValueError(f"lifetime must be > 0, not {lifetime}")
        if max_entries < 1:
            raise ValueError(f"max_entries must be >= 1, not {max_entries}")
        if resolution <= 0 or sweep_grain <= 0:
            raise ValueError("resolution and sweep_grain must be > 0")
        self.clock = clock
        self.lifetime: Final = float(lifetime)
        self.max_entries: Final = max_entries
        self.resolution: Final = resolution
        self.sweep_grain: Final = sweep_grain
        self.max_aliases: Final = max_aliases
        self.stats = TableStats()
        #: Called with (binding, True) when a binding is made, points at another backend
        #: or gains or loses an alias (its identities are then ``binding.key`` and
        #: ``binding.aliases``), and (binding, False) when it goes (expiry, eviction,
        #: removal, replacement; ``aliases`` still lists what went with it): the seam an
        #: executor that keeps its own copy of the table (an XDP map) mirrors changes
        #: through.  Not called for refreshes.
        self.listeners: list[Callable[[Binding, bool], object]] = []
        self._entries: dict[bytes, Binding] = {}
        self._alias_count = 0
        #: The entry `key` leads to -- live or not, a binding's own key or an alias --
        #: with nothing counted or refreshed: ``dict.get`` itself, for executors that
        #: check an entry before taking it (then `refresh`).
        self.peek: Callable[[bytes], Binding | None] = self._entries.get
        self._load: dict[Backend, int] = {}
        self._probation: deque[Binding] = deque()
        self._wheel: dict[int, list[Binding]] = {}
        self._deadlines: list[int] = []
        # The current rounding interval: readings up to _q_end share _q_now/_q_expires.
        self._q_end = -math.inf
        self._q_now = 0.0
        self._q_expires = 0.0

    # -- time ----------------------------------------------------------------------

    def _requantize(self, now: float) -> None:
        res = self.resolution
        end = math.ceil(now / res) * res
        if end < now:  # float rounding
            end += res
        self._q_end = end
        self._q_now = now
        self._q_expires = end + self.lifetime

    # -- the data path -------------------------------------------------------------

    def lookup(self, key: Key, now: float | None = None) -> Binding | None:
        """The live binding for `key`, refreshed (claim 10) and counted; None on a miss.

        The first hit of a probationary entry makes it established.  An expired entry
        found here is removed and reported as a miss.
        """
        b = self._entries.get(key)
        if b is None:
            self.stats.misses += 1
            return None
        if now is None:
            now = self.clock.seconds()
        if b.expires <= now:
            self._drop(b)
            self.stats.expirations += 1
            self.stats.misses += 1
            return None
        self.refresh(b, now)
        return b

    def refresh(self, b: Binding, now: float) -> None:
        """A hit on live binding `b` (found with `peek`): its lifetime starts again
        (claim 10), its packet is counted, and a probationary entry becomes established.
        `lookup` is `peek`, the expiry check, and this."""
        if now > self._q_end:
            self._requantize(now)
        b.expires = self._q_expires
        b.packets += 1
        if b._where is _PROBATION:
            self._file(b)
        self.stats.hits += 1

    def repoint(self, b: Binding, backend: Backend) -> None:
        """Send live binding `b` -- with its aliases -- to `backend` (a reassignment, an
        operator's move); its lifetime, counters and segment stay."""
        self._count(b.backend, -1)
        self._count(backend, 1)
        b.backend = backend
        if self.listeners:
            self._tell(b, True)

    def link(self, b: Binding, key: Key, now: float | None = None) -> bool:
        """Make `key` an alias of live binding `b` (another identity of its terminal):
        True if it leads to `b` now, False if it has a live entry of its own (linking
        never moves a bound identity: the caller counts the conflict).

        An expired entry under `key` is removed first.  Past ``max_aliases`` the
        binding's oldest alias is dropped.
        """
        entries = self._entries
        found = entries.get(key)
        if found is b:
            return True
        if found is not None:
            if now is None:
                now = self.clock.seconds()
            if found.expires > now:
                return False
            self._take(found, key)
            self.stats.expirations += 1
        k = bytes(key)
        entries[k] = b
        aliases = b.aliases
        if aliases is None:
            aliases = b.aliases = []
        aliases.append(k)
        self._alias_count += 1
        self.stats.links += 1
        if len(aliases) > self.max_aliases:
            del entries[aliases.pop(0)]
            self._alias_count -= 1
            self.stats.alias_evictions += 1
        if self.listeners:
            self._tell(b, True)
        return True

    def insert(
        self,
        key: Key,
        backend: Backend,
        care_of: bytes | None = None,
        now: float | None = None,
    ) -> Binding | None:
        """Bind `key` to `backend` (its first packet counted); None if refused (full).

        A new key starts probationary.  Inserting over an existing entry replaces it
        (never refused, and a live established entry's replacement stays established).
        """
        if now is None:
            now = self.clock.seconds()
        old = self._entries.get(key)
        if old is not None:
            # An expired entry, not yet swept, is replaced like an absent one.
            established = old.established and old.expires > now
            self._take(old, key)
            if old._key != key and self._size() >= self.max_entries \
                    and not self._make_room(now):  # fmt: skip
                self.stats.refusals += 1  # an alias made a binding of its own: room
                return None
        else:
            established = False
            if self._size() >= self.max_entries and not self._make_room(now):
                self.stats.refusals += 1
                return None
        b = self._add(key, backend, now, 1, care_of)
        if established:
            self._file(b)
        else:
            self._probation.append(b)
            b._where = _PROBATION
        self.stats.inserts += 1
        return b

    def restore(
        self,
        key: Key,
        backend: Backend,
        expires: float,
        packets: int = 1,
        care_of: bytes | None = None,
        established: bool = False,
        now: float | None = None,
    ) -> Binding | None:
        """Put back a saved binding (persistence across a restart) with its own expiry.

        `expires` is clamped to ``now + lifetime``; a binding already expired is not
        restored (None).  Otherwise like :meth:`insert` (replaces, may evict, None when
        refused), but the binding keeps its segment and counters.  Restore
        probationary bindings in order of increasing `expires`, so the FIFO stays
        ordered by expiry.
        """
        if now is None:
            now = self.clock.seconds()
        if expires <= now:
            return None
        old = self._entries.get(key)
        if old is not None:
            self._take(old, key)
        if (old is None or old._key != key) and self._size() >= self.max_entries \
                and not self._make_room(now):  # fmt: skip
            self.stats.refusals += 1
            return None
        b = self._add(key, backend, now, packets, care_of)
        b.expires = min(expires, b.expires)
        if established:
            self._file(b)
        else:
            self._probation.append(b)
            b._where = _PROBATION
        return b

    def rekey(
        self,
        old: Key,
        new: Key,
        care_of: bytes | None = None,
        now: float | None = None,
    ) -> Binding | None:
        """A care-of address change: make `new` lead to `old`'s backend (Fig. 14B).

        - T231/T232: look `old` up (no refresh).  No live entry: nothing to copy,
          return None (the caller schedules `new` on its first packet as usual).
        - T233/T234: `new` has no live entry: make one with `old`'s backend, ``packets``
          0, established (it continues a known terminal).  May evict like an insert;
          None if refused.
        - T235: `new` still has a live entry (the terminal came back to an address it
          used within a lifetime): no new entry; that one is refreshed, made
          established and pointed at `old`'s backend (moving its load count).
        - `new` is an alias of another terminal's binding: it leaves that binding and
          gets an entry of its own, as in T233/T234 (this is an authenticated move).
        - In both cases `care_of` (if given) is set on the returned
          binding.  `old`'s entry is left alone to live out its lifetime.
        - ``old == new`` refreshes that entry.
        """
        if now is None:
            now = self.clock.seconds()
        ob = self._live(old, now)
        if ob is None:
            return None
        nb = ob if new == old else self._live(new, now)
        if nb is not None and nb is not ob and nb._key != new:
            self._unlink(nb, bytes(new))
            nb = None
        if nb is None:
            stale = self._entries.get(new)
            if stale is not None:
                self._take(stale, new)
                self.stats.expirations += 1
            if self._size() >= self.max_entries and not self._make_room(now):
                self.stats.refusals += 1
                return None
            nb = self._add(new, ob.backend, now, 0, care_of)
            self._file(nb)
        else:
            if nb.backend != ob.backend:
                self.repoint(nb, ob.backend)
            if now > self._q_end:
                self._requantize(now)
            nb.expires = self._q_expires
            if care_of is not None:
                nb.care_of = care_of
            if nb._where is _PROBATION:
                self._file(nb)
        self.stats.rekeys += 1
        return nb

    def expire(self, now: float | None = None) -> int:
        """Remove entries whose lifetime has ended; return how many.

        Work is proportional to the filings that are due, not to the table's size.
        Established entries are removed up to ``sweep_grain`` seconds late.
        """
        if now is None:
            now = self.clock.seconds()
        removed = 0
        touched = 0
        fifo = self._probation
        while fifo:
            b = fifo[0]
            if b._where is _PROBATION:
                if b.expires > now:
                    break
                self._drop(b)
                removed += 1
            fifo.popleft()
            touched += 1
        heap = self._deadlines
        grain = self.sweep_grain
        while heap and heap[0] * grain <= now:
            bucket = self._wheel.pop(heapq.heappop(heap))
            touched += len(bucket)
            for b in bucket:
                if b._where is not bucket:
                    continue
                if b.expires <= now:
                    self._drop(b)
                    removed += 1
                else:
                    self._file(b)
        self.stats.expirations += removed
        self.stats.swept += touched
        return removed

    # -- operators -----------------------------------------------------------------

    def get(self, key: Key, now: float | None = None) -> Binding | None:
        """The live binding for `key` without refreshing or counting it."""
        return self._live(key, self.clock.seconds() if now is None else now)

    def remove(self, key: Key) -> Binding | None:
        """Remove `key`'s entry (live or not yet swept) and return its binding: a
        binding's own key takes the binding and its aliases; an alias only itself."""
        b = self._entries.get(key)
        if b is not None:
            self._take(b, key)
        return b

    def load(self) -> Mapping[Backend, int]:
        """Entries per backend (a read-only live view; expired entries count until swept)."""
        return types.MappingProxyType(self._load)

    def __len__(self) -> int:
        """Bindings held (not counting aliases), including expired ones not yet swept
        (call expire() first)."""
        return self._size()

    @property
    def alias_count(self) -> int:
        """Aliases held (identities leading to another identity's binding)."""
        return self._alias_count

    def _size(self) -> int:
        return len(self._entries) - self._alias_count

    def __iter__(self) -> Iterator[tuple[Key, Binding]]:
        """(key, binding) for every binding held, by its own key (aliases are in
        ``binding.aliases``), from a snapshot (safe to mutate)."""
        return iter([(_as_key(k), b) for k, b in self._entries.items() if b._key is k])

    def __contains__(self, key: object) -> bool:
        """True if `key` has a live entry."""
        b = self._entries.get(key) if isinstance(key, bytes) else None
        return b is not None and b.expires > self.clock.seconds()

    def __repr__(self) -> str:
        return f"<StickyTable {len(self)}/{self.max_entries} lifetime={self.lifetime}>"

    # -- internals -----------------------------------------------------------------

    def _live(self, key: Key, now: float) -> Binding | None:
        b = self._entries.get(key)
        if b is None or b.expires <= now:
            return None
        return b

    def _add(
        self,
        key: Key,
        backend: Backend,
        now: float,
        packets: int,
        care_of: bytes | None,
    ) -> Binding:
        if now > self._q_end:
            self._requantize(now)
        # Stored under a plain-bytes copy: equal to the Key and with the same hash (a Key
        # is a bytes subclass that overrides neither), so Key lookups find it, and it
        # is 16 bytes smaller than a Key (plain bytes are not tracked by the GC).
        k = bytes(key)
        b = Binding(k, backend, self._q_now, self._q_expires, packets, care_of)
        self._entries[k] = b
        self._count(backend, 1)
        if self.listeners:
            self._tell(b, True)
        return b

    def _count(self, backend: Backend, delta: int) -> None:
        n = self._load.get(backend, 0) + delta
        if n:
            self._load[backend] = n
        else:
            del self._load[backend]

    def _drop(self, b: Binding) -> None:
        entries = self._entries
        del entries[b._key]
        aliases = b.aliases
        if aliases:
            for k in aliases:
                del entries[k]
            self._alias_count -= len(aliases)
        self._count(b.backend, -1)
        b._where = None
        if self.listeners:
            self._tell(b, False)

    def _take(self, b: Binding, key: bytes) -> None:
        """Remove what `key` is in `b`: the whole binding if it is `b`'s own key, else
        that alias."""
        if b._key == key:
            self._drop(b)
        else:
            self._unlink(b, bytes(key))

    def _unlink(self, b: Binding, key: bytes) -> None:
        assert b.aliases is not None
        b.aliases.remove(key)
        del self._entries[key]
        self._alias_count -= 1
        if self.listeners:
            self._tell(b, True)

    def _tell(self, b: Binding, bound: bool) -> None:
        for listener in self.listeners:
            listener(b, bound)

    def _file(self, b: Binding) -> None:
        slot = math.ceil(b.expires / self.sweep_grain)
        bucket = self._wheel.get(slot)
        if bucket is None:
            bucket = self._wheel[slot] = []
            heapq.heappush(self._deadlines, slot)
        bucket.append(b)
        b._where = bucket

    def _make_room(self, now: float) -> bool:
        """Free one entry for an insert: sweep what is due, else evict the oldest
        probationary entry.  False if every entry is established and live."""
        self.expire(now)
        if self._size() < self.max_entries:
            return True
        fifo = self._probation
        while fifo:
            b = fifo.popleft()
            if b._where is _PROBATION:
                self._drop(b)
                self.stats.evictions += 1
                return True
        return False
