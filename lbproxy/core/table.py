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

*Two segments*:

- **probationary**: a new entry (one packet seen) waits in a FIFO (``collections.deque``).
  Its expiry never changes while it is there, so the FIFO is also ordered by expiry: the
  oldest is both the first to expire and the least recently used.
- **established**: an entry that saw a second packet, or was made or refreshed by
  ``rekey`` (a continuing terminal).  It is filed in a coarse timer wheel: a dict from
  integer deadline (``ceil(expires / sweep_grain)``) to the two ends of a chain of
  bindings linked through their own ``_next`` slot, in the order they were filed (no
  list per entry, no allocation), plus a heap of those deadlines.  A hit does *not* move
  it; when its bucket comes due, the sweep finds its real expiry later and files it
  again, once per lifetime at most.  There are two wheels: *infrequent* entries (fewer
  than ``frequent`` packets, 8) and *frequent* ones; an entry moves to the second when
  the first's walker meets it with enough packets.  Each wheel is also its entries'
  recency order: the earliest bucket holds those used least recently (within it, the
  first filed first).

*Expiry* (:meth:`StickyTable.expire`) pops the due probationary entries from the FIFO's
head and the due buckets from the heaps: the work is proportional to what is due (plus
stale filings, each examined once), never to the table's size.  Entries are removed up
to one ``sweep_grain`` late; :meth:`lookup` and :meth:`get` never return an expired one.

*The bound* (docs/core.md, "The bound and the eviction policy").  When an insert finds
the table full it sweeps what is due; then

1. *admission*: an insert that names the packet's source address (``source``) from a
   /64 or /48 that has made many new entries lately (`PrefixAdmission`) is refused: a
   flood from a few prefixes cannot push anyone out;
2. *eviction*: the infrequent entry used least recently goes -- the FIFO's oldest or
   the first wheel's least recent, whichever was used longer ago -- and a frequent one
   only when no infrequent one is left.  An insert is never refused for want of a
   victim, so forged identities -- however many packets each sends -- cannot lock
   newcomers out; they can only push out what has been idle longer than they have; and
   a terminal that has sent ``frequent`` packets is never pushed out for an identity
   that has sent fewer.

*Aliases.*  A terminal carries several identities (its home address, its care-of
address, an interface ID, an SPI...).  One of them is the binding's key; the others are
*aliases* (:meth:`StickyTable.link`): keys of a second dict that lead to the same
:class:`Binding`, so a lookup by any of them is the same hit (same backend, lifetime,
counters).  Two dicts, not one: the fast path looks a terminal's home address -- a
binding's own key -- up in a dict that holds only bindings' own keys (one per binding,
not one per identity), which stays smaller and misses the CPU caches less; `peek`
looks there first and in the aliases' dict only on a miss.  A key is in one of the two,
never both.  Aliases go with the binding (expiry, eviction, removal).  Linking never
takes an identity that has a live entry of its own: only :meth:`rekey` (an authenticated
notification) and :meth:`insert` (the scheduler, the operator) change where a bound
identity leads.  A binding keeps at most ``max_aliases`` aliases, the oldest dropped
first, so no terminal (and no forger) can make one binding hold an unbounded number of
identities.

*Packets forwarded outside the table.*  An executor that forwards established bindings'
packets itself (the XDP program) tells the table of them late, when the table asks
(`Stamps`, :attr:`StickyTable.stamps`): the table asks before it treats a binding as
expired, replaces it or chooses it for eviction, and :meth:`StickyTable.extend` applies
what it is told at the packets' own expiry.  ``binding.expires`` is then a lower bound
until asked (`catch_up`), which is why every expiry decision goes through the table.

*Stale filings*: a filing whose binding has moved on or been removed is skipped and
dropped when reached, so nothing is searched on removal.  A binding in the FIFO is
current while its ``_next`` is the probation marker; one in a wheel chain while the
table still maps its key to it.  Stale FIFO filings (left by promotions) are compacted
away once they outnumber the live ones, so they never cost more than the live entries.

*Memory.*  A :class:`Binding` is six slots (80 bytes): its key (or its key and aliases),
the link of its wheel chain (or the probation marker), backend, care-of address, expiry
and packet count.  Once established, its filing costs nothing more.
"""

from __future__ import annotations

import heapq
import math
import types
from collections import deque
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import TYPE_CHECKING, Final, Protocol

from lbproxy.core.admission import PrefixAdmission
from lbproxy.core.keys import Key

if TYPE_CHECKING:
    from twisted.internet.interfaces import IReactorTime

    from lbproxy.core.selection import Backend

__all__ = ["Binding", "Stamps", "StickyTable", "TableStats"]


def _as_key(data: bytes) -> Key:
    """The Key whose bytes are `data` (no checks: `data` came from a Key)."""
    return bytes.__new__(Key, data)


def _head(fifo: deque[Binding], until: float) -> list[Binding]:
    """The FIFO's filings from its head up to the first live one expiring after
    `until` (it is ordered by expiry)."""
    out = []
    for b in fifo:
        if b._next is _PROBATION and b.expires > until:
            break
        out.append(b)
    return out


class _Probation:
    """Marker: the binding waits in the probationary FIFO."""

    def __repr__(self) -> str:
        return "PROBATION"


_PROBATION: Final = _Probation()


class Binding:
    """One terminal identity's binding to a backend (mutable, slotted to stay small).

    ``expires`` is clock seconds, rounded up to the table's resolution; ``packets``
    counts the packets that used the entry; ``care_of`` is the last care-of address seen
    (16 bytes).  Whether replies may go to it is not the binding's to say:
    `lbproxy.core.returnpaths` is the one record of confirmed care-of addresses.
    ``key`` is the key it is filed under, ``aliases`` its other identities.  Change
    ``backend`` only through the table (:meth:`StickyTable.insert`, :meth:`rekey
    <StickyTable.rekey>`, :meth:`repoint <StickyTable.repoint>`), which keeps the load
    counts.
    """

    __slots__ = ("_keys", "_next", "backend", "care_of", "expires", "packets")

    def __init__(
        self,
        key: bytes,
        backend: Backend,
        expires: float,
        packets: int = 1,
        care_of: bytes | None = None,
    ) -> None:
        #: The table's plain-bytes copy of the Key, or, once the binding has aliases, a
        #: list: that key first, then the aliases (plain bytes of their Keys), oldest
        #: first.  One slot for both: most bindings have no alias.
        self._keys: bytes | list[bytes] = key
        #: The next binding in this one's wheel chain (None at a chain's end), or
        #: ``_PROBATION`` while it waits in the probationary FIFO.
        self._next: Binding | _Probation | None = None
        self.backend = backend
        self.expires = expires
        self.packets = packets
        self.care_of = care_of

    @property
    def _key(self) -> bytes:
        keys = self._keys
        return keys[0] if isinstance(keys, list) else keys

    @property
    def key(self) -> Key:
        """The key this binding is filed under."""
        return _as_key(self._key)

    @property
    def aliases(self) -> list[bytes] | None:
        """The other identities leading here (plain bytes of their Keys), oldest first;
        None when there are none.  A copy: change them through the table."""
        keys = self._keys
        return keys[1:] if isinstance(keys, list) else None

    @property
    def alias_keys(self) -> list[Key]:
        """The aliases as Keys (what operators and persistence print), oldest first."""
        keys = self._keys
        return [_as_key(k) for k in keys[1:]] if isinstance(keys, list) else []

    @property
    def established(self) -> bool:
        """True once the entry left probation (second packet, or made by ``rekey``)."""
        return self._next is not _PROBATION

    @property
    def created(self) -> None:
        """No longer recorded (it would cost 16 bytes per binding, and nothing read
        it); always None."""
        return None

    def __repr__(self) -> str:
        return (
            f"<Binding {self.key} -> {self.backend.name} expires={self.expires:.3f}"
            f" packets={self.packets} {'established' if self.established else 'new'}>"
        )


class Stamps(Protocol):
    """What an executor that forwards bindings' packets outside the table (the XDP
    program) has not told the table yet: its packets' refreshes and counts.

    The table calls `fold` on a binding before it treats it as expired (a lookup, a
    link, the sweep) or chooses it for eviction, so nothing the executor kept alive is
    dropped and no busy terminal looks idle; `fold_all` before every binding is read
    at once (persistence).  Each reports through :meth:`StickyTable.extend`."""

    def fold(self, binding: Binding) -> object: ...

    def fold_all(self) -> None: ...


class TableStats:
    """Counters of a :class:`StickyTable` (plain ints, read by metrics and the manhole).

    ``swept`` counts filings examined by :meth:`StickyTable.expire`: it measures the
    sweep's work, which must follow what was due, not the table's size.
    ``evictions`` counts every binding pushed out to make room, ``established_evictions``
    those of them that were established; ``refusals`` every insert, rekey or restore
    refused for want of room, ``throttled`` those of them refused by admission (the
    packet's source prefix made too many new entries lately).
    """

    __slots__ = ("alias_evictions", "established_evictions", "evictions", "expirations",
                 "hits", "inserts", "links", "misses", "refusals", "rekeys", "swept",
                 "throttled")

    def __init__(self) -> None:
        self.hits = 0
        self.misses = 0
        self.inserts = 0
        self.expirations = 0
        self.evictions = 0
        self.established_evictions = 0
        self.refusals = 0
        self.throttled = 0
        self.rekeys = 0
        self.swept = 0
        #: Identities linked as aliases, and aliases dropped to keep a binding's bound.
        self.links = 0
        self.alias_evictions = 0

    def as_dict(self) -> dict[str, int]:
        return {name: getattr(self, name) for name in self.__slots__}

    def __repr__(self) -> str:
        return f"TableStats({self.as_dict()})"


#: The default packet count from which an established entry is frequent.
FREQUENT: Final = 8


class StickyTable:
    """Key -> :class:`Binding`, with lifetimes, a bound and per-backend load counts.

    ``lifetime`` is the seconds an idle entry lives; ``max_entries`` bounds the table
    (see the module docstring for the eviction policy).  ``resolution`` is the rounding
    of expiry times, ``sweep_grain`` the width of a timer-wheel bucket (both seconds).
    When the table is full, room is made by evicting the entry used least recently
    among those with fewer than ``frequent`` packets, and only when there is none among
    the others.  ``admission`` decides, when the table is full, whether an insert from a
    packet's source address may push anything out (a `PrefixAdmission` sized for the
    table unless given; False admits everyone).  Every method taking ``now`` reads the
    clock when it is None; the data path can pass one reading for a whole batch of
    packets.
    """

    def __init__(
        self,
        clock: IReactorTime,
        lifetime: float,
        max_entries: int,
        resolution: float = 1 / 128,
        sweep_grain: float = 1.0,
        max_aliases: int = 8,
        frequent: int = FREQUENT,
        admission: PrefixAdmission | bool = True,
    ) -> None:
        if lifetime <= 0:
            raise ValueError(f"lifetime must be > 0, not {lifetime}")
        if max_entries < 1:
            raise ValueError(f"max_entries must be >= 1, not {max_entries}")
        if resolution <= 0 or sweep_grain <= 0:
            raise ValueError("resolution and sweep_grain must be > 0")
        if frequent < 2:
            raise ValueError(f"frequent must be >= 2, not {frequent}")
        self.clock = clock
        self.lifetime: Final = float(lifetime)
        self.max_entries: Final = max_entries
        self.resolution: Final = resolution
        self.sweep_grain: Final = sweep_grain
        self.max_aliases: Final = max_aliases
        #: Packets from which an established entry is *frequent*: it makes room only
        #: when no infrequent one is left.
        self.frequent: Final = frequent
        if admission is True:
            width = 1 << max(8, min(14, (max_entries // 8).bit_length()))
            admission = PrefixAdmission(width=width)
        self.admission: PrefixAdmission | None = admission or None
        self.stats = TableStats()
        #: Called with (binding, True) when a binding is made, points at another backend,
        #: gains or loses an alias (its identities are then ``binding.key`` and
        #: ``binding.aliases``) or has another care-of address (`set_care_of`), and
        #: (binding, False) when it goes (expiry, eviction, removal, replacement;
        #: ``aliases`` still lists what went with it): the seam an executor that keeps
        #: its own copy of the table (an XDP map) mirrors changes through.  Not called
        #: for refreshes.
        self.listeners: list[Callable[[Binding, bool], object]] = []
        #: An executor's packets not folded in yet (`Stamps`), or None: then
        #: ``binding.expires`` is each binding's expiry; with one it is a lower bound
        #: until `catch_up` (which the table calls itself before expiring or evicting).
        self.stamps: Stamps | None = None
        #: Each binding by its own key (only those: the dict the fast path reads).
        self._entries: dict[bytes, Binding] = {}
        #: Each binding by its aliases (a key is in one of the two dicts, never both).
        self._aliases: dict[bytes, Binding] = {}
        #: The binding whose own key is `key` -- live or not -- with nothing counted or
        #: refreshed: ``dict.get`` itself, for executors that check an entry before
        #: taking it (then `refresh`).  None for an alias: call `peek_alias` then (or
        #: `peek`, which does both).
        self.peek_primary: Callable[[bytes], Binding | None] = self._entries.get
        #: The binding `key` is an alias of, live or not (``dict.get`` of the aliases).
        self.peek_alias: Callable[[bytes], Binding | None] = self._aliases.get
        self._load: dict[Backend, int] = {}
        self._probation: deque[Binding] = deque()
        self._p_live = 0  # probationary bindings (live ones in the FIFO)
        self._p_stale = 0  # stale filings in the FIFO
        # The established entries, in two wheels: those with fewer than `frequent`
        # packets, and the others.  Each: deadline -> [first, last] binding of its chain
        # (in the order they were filed), and a heap of the deadlines.
        self._wheels: tuple[dict[int, list[Binding]], dict[int, list[Binding]]] = ({}, {})
        self._heaps: tuple[list[int], list[int]] = ([], [])
        # The current rounding interval: readings up to _q_end share _q_expires.
        self._q_end = -math.inf
        self._q_expires = 0.0

    # -- time ----------------------------------------------------------------------

    def _requantize(self, now: float) -> None:
        res = self.resolution
        end = math.ceil(now / res) * res
        if end < now:  # float rounding
            end += res
        self._q_end = end
        self._q_expires = end + self.lifetime

    # -- the data path -------------------------------------------------------------

    def peek(self, key: bytes) -> Binding | None:
        """The binding `key` leads to -- live or not, a binding's own key or an alias --
        with nothing counted or refreshed.  A hot loop binds `peek_primary` and
        `peek_alias` instead, and calls the second only when the first finds nothing."""
        b = self._entries.get(key)
        return self._aliases.get(key) if b is None else b

    def lookup(self, key: Key, now: float | None = None) -> Binding | None:
        """The live binding for `key`, refreshed (claim 10) and counted; None on a miss.

        The first hit of a probationary entry makes it established.  An expired entry
        found here is removed and reported as a miss.
        """
        b = self._entries.get(key)
        if b is None:
            b = self._aliases.get(key)
        if b is None:
            self.stats.misses += 1
            return None
        if now is None:
            now = self.clock.seconds()
        if b.expires <= now and self._lapsed(b, now):
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
        if b._next is _PROBATION:
            self._promote(b)
        self.stats.hits += 1

    def refresh_all(self, bindings: Sequence[Binding], now: float) -> None:
        """`refresh` of each of `bindings` (live ones, found with `peek`), in order, at
        the one time `now`: the table ends as after ``refresh(b, now)`` for each -- a
        binding listed twice is refreshed twice.

        Why: an executor that takes a batch of packets at one reading of the clock
        collects the bindings it hits and hands them over at once (before anything else
        reads the table, and at the end of the batch), which costs per packet a list
        append instead of a call (3-4 % of the fast path's work per packet)."""
        if not bindings:
            return
        if now > self._q_end:
            self._requantize(now)
        expires = self._q_expires
        for b in bindings:
            b.expires = expires
            b.packets += 1
            if b._next is _PROBATION:
                self._promote(b)
        self.stats.hits += len(bindings)

    def extend(self, b: Binding, expires: float, packets: int) -> None:
        """`packets` (> 0) packets of `b` that an executor forwarded outside the table
        (the XDP program), the last of which gave it expiry `expires` (its time rounded
        as `refresh` rounds, plus the lifetime): what those packets' `refresh` calls
        would have done, told late -- the expiry is the packets' own, never the time of
        telling, and never earlier than what `b` has.  A probationary binding becomes
        established."""
        if expires > b.expires:
            b.expires = expires
        b.packets += packets
        self.stats.hits += packets
        if b._next is _PROBATION:
            self._promote(b)

    def alive(self, b: Binding, now: float) -> bool:
        """Whether `b` (found with `peek`) is live at `now`, all told: by its expiry as
        the table knows it, else once the executor outside the table (`stamps`) has
        told what it forwarded.  A hot loop checks ``b.expires > now`` first and calls
        this only when that fails."""
        return b.expires > now or not self._lapsed(b, now)

    def catch_up(self, b: Binding) -> None:
        """Fold in what the executor outside the table did for `b` (`stamps`), so
        ``b.expires`` and ``b.packets`` are current: for a reader that takes them as
        they are (a record's lifetime given to others)."""
        stamps = self.stamps
        if stamps is not None:
            stamps.fold(b)

    def catch_up_all(self) -> None:
        """`catch_up` for every binding at once (before a snapshot of them all)."""
        stamps = self.stamps
        if stamps is not None:
            stamps.fold_all()

    def due(self, until: float) -> list[Binding]:
        """The bindings whose expiry is at or before `until` (an executor catches them
        up before the sweep reaches them): from the probationary FIFO's head and the
        wheel buckets that can hold them.  Work follows what is filed up to `until`
        (plus one bucket), not the table's size."""
        out = [b for b in _head(self._probation, until) if b._next is _PROBATION]
        entries, grain = self._entries, self.sweep_grain
        last = math.ceil(until / grain) + 1
        for heap, wheel in zip(self._heaps, self._wheels, strict=True):
            for slot in heap:
                if slot > last:
                    continue
                c: Binding | None = wheel[slot][0]
                while c is not None:
                    if c.expires <= until and entries.get(c._key) is c:
                        out.append(c)
                    c = c._next  # type: ignore[assignment]
        return out

    def set_care_of(self, b: Binding, care_of: bytes) -> None:
        """`b`'s terminal seen at `care_of` (its last care-of address).  A change is
        told to the listeners, so an executor's copy of the binding -- which takes the
        terminal's packets only from the care-of address the table has -- follows."""
        if b.care_of != care_of:
            b.care_of = care_of
            if self.listeners:
                self._tell(b, True)

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
        aliases = self._aliases
        found = self._entries.get(key)
        if found is None:
            found = aliases.get(key)
        if found is b:
            return True
        if found is not None:
            if now is None:
                now = self.clock.seconds()
            if found.expires > now or not self._lapsed(found, now):
                return False
            self._take(found, key)
            self.stats.expirations += 1
        k = bytes(key)
        aliases[k] = b
        keys = b._keys
        if isinstance(keys, list):
            keys.append(k)
        else:
            keys = b._keys = [keys, k]  # sized exactly: most bindings get one alias
        self.stats.links += 1
        if len(keys) > self.max_aliases + 1:
            del aliases[keys.pop(1)]
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
        source: bytes | None = None,
    ) -> Binding | None:
        """Bind `key` to `backend` (its first packet counted); None if refused.

        A new key starts probationary.  Inserting over a key's own entry replaces it
        (never refused, and a live established entry's replacement stays established).
        `source` is the source address of the packet that asks for the binding: when
        given, the table's admission counts it, and refuses the insert when the table
        is full and that address's /64 or /48 has made too many new entries lately.
        Otherwise a full table makes room (see `StickyTable`): an insert is never
        refused for want of something to evict.
        """
        if now is None:
            now = self.clock.seconds()
        old = self.peek(key)
        established = full = False
        if old is not None:
            # An expired entry, not yet swept, is replaced like an absent one.
            self.catch_up(old)  # packets it had outside the table count too
            established = old.established and old.expires > now
            full = old._key != key  # an alias makes a binding of its own: room
            self._take(old, key)
        else:
            full = True
        if full and self._size() >= self.max_entries:
            self.expire(now)
            full = self._size() >= self.max_entries
        else:
            full = False
        admission = self.admission
        if source is not None and admission is not None and not admission.admit(
            source, now, full
        ):
            self.stats.throttled += 1
            self.stats.refusals += 1
            return None
        if full and not (self._evict(0) or self._evict(1)):
            self.stats.refusals += 1
            return None
        b = self._add(key, backend, now, 1, care_of)
        if established:
            self._file(b)
        else:
            self._probate(b)
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
        old = self.peek(key)
        own = False
        if old is not None:
            own = old._key == key
            self._take(old, key)
        if not own and self._size() >= self.max_entries and not self._make_room(now):
            self.stats.refusals += 1
            return None
        b = self._add(key, backend, now, packets, care_of)
        b.expires = min(expires, b.expires)
        if established:
            self._file(b)
        else:
            self._probate(b)
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
        - `old` is an alias -- one of the identities of a terminal whose binding is
          keyed by another (its home address, typically) -- and `new` has no live entry
          of its own: `new` becomes an alias of that binding too, which is refreshed.
          Then every identity of the terminal keeps leading to one binding, and a later
          move (an operator's, a reassignment) takes the new address with the rest.
        - In every case `care_of` (if given) is set on the returned binding.  `old`'s
          entry is left alone to live out its lifetime (an alias lives as long as its
          binding, or until the binding's alias bound pushes it out).
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
        if nb is None and ob.key != old and self.link(ob, new, now):
            nb = ob  # refreshed below, as a continuing terminal's binding
        if nb is None:
            stale = self.peek(new)
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
                self.set_care_of(nb, care_of)
            if nb._next is _PROBATION:
                self._promote(nb)
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
            if b._next is _PROBATION:
                if b.expires > now:
                    break
                lapsed = self._lapsed(b, now)
                if b._next is not _PROBATION:
                    # Promoted by packets forwarded outside: filed in a wheel now (whose
                    # sweep drops it if it lapsed anyway), and the FIFO may have been
                    # compacted under this walk.
                    fifo = self._probation
                    continue
                if not lapsed:
                    break  # (`extend` promotes: not reached)
                self._drop(b)
                removed += 1
            fifo.popleft()
            self._p_stale -= 1
            touched += 1
        entries = self._entries
        grain = self.sweep_grain
        for heap, wheel in zip(self._heaps, self._wheels, strict=True):
            while heap and heap[0] * grain <= now:
                c: Binding | None = wheel.pop(heapq.heappop(heap))[0]
                while c is not None:
                    b, c = c, c._next  # type: ignore[assignment]
                    touched += 1
                    b._next = None
                    if entries.get(b._key) is not b:
                        continue  # removed meanwhile: a stale filing
                    if b.expires <= now and self._lapsed(b, now):
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
        b = self.peek(key)
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
        return len(self._aliases)

    @property
    def probationary(self) -> int:
        """Probationary bindings held (the rest of `len` is established)."""
        return self._p_live

    def _size(self) -> int:
        return len(self._entries)

    def __iter__(self) -> Iterator[tuple[Key, Binding]]:
        """(key, binding) for every binding held, by its own key (aliases are in
        ``binding.aliases``), from a snapshot (safe to mutate)."""
        return iter([(_as_key(k), b) for k, b in self._entries.items()])

    def __contains__(self, key: object) -> bool:
        """True if `key` has a live entry."""
        return isinstance(key, bytes) and self._live(key, self.clock.seconds()) is not None

    def __repr__(self) -> str:
        return f"<StickyTable {len(self)}/{self.max_entries} lifetime={self.lifetime}>"

    # -- internals -----------------------------------------------------------------

    def _live(self, key: bytes, now: float) -> Binding | None:
        b = self.peek(key)
        if b is None or (b.expires <= now and self._lapsed(b, now)):
            return None
        return b

    def _lapsed(self, b: Binding, now: float) -> bool:
        """Whether `b`, whose expiry as the table knows it is past, has lapsed once the
        executor outside the table has told what it forwarded (`stamps`)."""
        self.catch_up(b)
        return b.expires <= now

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
        b = Binding(k, backend, self._q_expires, packets, care_of)
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
        """Remove `b` with its aliases.  A probationary binding's FIFO filing becomes
        stale (``_next`` None); a wheel filing is left in its chain, whose walker sees
        that the table no longer maps the key to `b`."""
        keys = b._keys
        if isinstance(keys, list):
            del self._entries[keys[0]]
            aliases = self._aliases
            for k in keys[1:]:
                del aliases[k]
        else:
            del self._entries[keys]
        self._count(b.backend, -1)
        if b._next is _PROBATION:
            b._next = None
            self._p_live -= 1
            self._p_stale += 1
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
        keys = b._keys
        assert isinstance(keys, list)
        keys.remove(key)  # never the first: `key` is an alias, not b's own key
        if len(keys) == 1:
            b._keys = keys[0]
        del self._aliases[key]
        if self.listeners:
            self._tell(b, True)

    def _tell(self, b: Binding, bound: bool) -> None:
        for listener in self.listeners:
            listener(b, bound)

    def _probate(self, b: Binding) -> None:
        b._next = _PROBATION
        self._probation.append(b)
        self._p_live += 1

    def _promote(self, b: Binding) -> None:
        """Probationary `b` becomes established: filed in the wheel; its FIFO filing
        goes stale, and the FIFO is compacted once stale filings outnumber live ones."""
        self._p_live -= 1
        self._file(b)
        self._p_stale += 1
        if self._p_stale > 1024 and self._p_stale > self._p_live:
            self._probation = deque(x for x in self._probation if x._next is _PROBATION)
            self._p_stale = 0

    def _file(self, b: Binding) -> None:
        """File established `b` by its expiry, in the wheel of its frequency."""
        slot = math.ceil(b.expires / self.sweep_grain)
        i = b.packets >= self.frequent
        wheel = self._wheels[i]
        ends = wheel.get(slot)
        b._next = None
        if ends is None:
            wheel[slot] = [b, b]
            heapq.heappush(self._heaps[i], slot)
        else:
            ends[1]._next = b
            ends[1] = b

    def _make_room(self, now: float) -> bool:
        """Free one entry (for a rekey or a restore, or an insert's eviction, see
        `insert`): sweep what is due; else evict the infrequent entry (fewer than
        `frequent` packets, probationary or established) used least recently, else the
        frequent one used least recently.  False if there is nothing to evict."""
        self.expire(now)
        if self._size() < self.max_entries:
            return True
        return self._evict(0) or self._evict(1)

    def _evict(self, frequent: int) -> bool:
        """Evict the entry used least recently among the infrequent ones (0: the oldest
        probationary entry or the least recently used infrequent established one,
        whichever was used longer ago; a tie keeps the established one) or among the
        frequent ones (1).  False if there is none."""
        p: Binding | None = None
        if not frequent:
            while True:
                fifo = self._probation
                while fifo and fifo[0]._next is not _PROBATION:
                    fifo.popleft()
                    self._p_stale -= 1
                p = fifo[0] if fifo else None
                if p is None:
                    break
                self.catch_up(p)  # packets forwarded outside: no newcomer then
                if p._next is _PROBATION:
                    break
        e = self._least_recent(frequent)
        if e is None and p is None:
            return False
        if e is None or (p is not None and p.expires <= e.expires):
            assert p is not None
            self._probation.popleft()
            self._drop(p)
            self._p_stale -= 1
            self.stats.evictions += 1
            return True
        heap, wheel = self._heaps[frequent], self._wheels[frequent]
        rest = e._next
        if rest is None:
            del wheel[heapq.heappop(heap)]
        else:
            wheel[heap[0]][0] = rest  # type: ignore[assignment]
        e._next = None
        self._drop(e)
        self.stats.evictions += 1
        self.stats.established_evictions += 1
        return True

    def _least_recent(self, frequent: int) -> Binding | None:
        """The established entry used least recently (to within one sweep grain) of the
        infrequent (0) or the frequent (1) wheel, left first in the earliest bucket's
        chain: on the way, stale filings are dropped and the entries refreshed since
        they were filed there (or become frequent meanwhile) are filed again.  A chain
        is in the order its entries were filed, so its first is (nearly) its least
        recent."""
        heap, wheel = self._heaps[frequent], self._wheels[frequent]
        entries, grain, threshold = self._entries, self.sweep_grain, self.frequent

        def moved(c: Binding, slot: int) -> bool:  # refreshed since filed, or frequent now
            return math.ceil(c.expires / grain) > slot or (
                not frequent and c.packets >= threshold)

        while heap:
            slot = heap[0]
            ends = wheel[slot]
            c: Binding | None = ends[0]
            while c is not None:
                if entries.get(c._key) is c and not moved(c, slot):
                    self.catch_up(c)  # its packets outside the table count too
                    if not moved(c, slot):
                        ends[0] = c
                        return c
                b, c = c, c._next  # type: ignore[assignment]
                b._next = None
                if entries.get(b._key) is b:
                    self._file(b)  # refreshed, or now frequent: never this bucket
            del wheel[slot]
            heapq.heappop(heap)
        return None
