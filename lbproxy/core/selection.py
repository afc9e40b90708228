"""Backends and the schedulers that pick one for a terminal seen for the first time.

Why this exists: the patent leaves the choice on a table miss to "conventional methods".
We offer the usual ones behind one interface, :class:`IScheduler`, so the balancer does
not care which is configured:

* :class:`RoundRobin` - each usable backend in turn;
* :class:`WeightedRoundRobin` - nginx's *smooth* weighted round robin: proportions follow
  the weights and a heavy backend's turns are spread out, not bunched;
* :class:`LeastLoaded` - fewest live bindings (from ``StickyTable.load()``) per unit of
  weight;
* :class:`Maglev` - consistent hashing (Eisenbud et al., NSDI 2016): the choice depends
  only on the key and the backend names, so several balancers with the same backend list
  agree without talking, and removing one of N backends moves about 1/N of the keys.

A backend of weight 0 is never chosen (that is how a backend is drained: its existing
bindings stay, it gets no new ones).  Everything here is pure: no clock, no I/O.

Schedulers are found by configuration name in :data:`SCHEDULER_REGISTRY` (a
:class:`~lbproxy.core.registry.Registry`): the four above are registered here with
:func:`register_scheduler`, third-party ones come from Python entry points in the group
``lbproxy.schedulers`` (the entry point's name is the scheduler's name, its object a
callable -- typically the class -- that returns a new :class:`IScheduler` provider with no
backends when called with no arguments).
"""

from __future__ import annotations

import hashlib
import ipaddress
from collections.abc import Callable, Mapping, Sequence
from typing import Any, Final

import attrs
from zope.interface import Interface, implementer

from lbproxy.core.keys import Key
from lbproxy.core.registry import Registry

__all__ = [
    "SCHEDULER_REGISTRY",
    "Backend",
    "IScheduler",
    "LeastLoaded",
    "Maglev",
    "RoundRobin",
    "WeightedRoundRobin",
    "key_hash",
    "register_scheduler",
    "scheduler_from_name",
    "scheduler_names",
]


def _non_negative(instance: object, attribute: attrs.Attribute[int], value: int) -> None:
    if value < 0:
        raise ValueError(f"backend weight must be >= 0, not {value}")


@attrs.frozen(cache_hash=True)
class Backend:
    """A server the balancer forwards to.

    Equality and hash use the name and address only, not the weight: draining a backend
    (weight 0) or re-weighting it leaves it *the same backend*, so its bindings and its
    load count in the sticky table still belong to it.  ``packed`` is the 16-byte
    address the forwarder writes into packets.
    """

    name: str
    address: ipaddress.IPv6Address = attrs.field(converter=ipaddress.IPv6Address)
    weight: int = attrs.field(default=1, eq=False, validator=_non_negative)
    packed: bytes = attrs.field(init=False, eq=False, repr=False)

    def __attrs_post_init__(self) -> None:
        object.__setattr__(self, "packed", self.address.packed)


class IScheduler(Interface):
    """Chooses a backend for a key the sticky table does not know yet."""

    def set_backends(backends: Sequence[Backend]) -> None:  # noqa: N805
        """Replace the backend list (configuration order); weight-0 backends stay
        known but are never chosen."""

    def choose(key: Key, load: Mapping[Backend, int]) -> Backend | None:  # noqa: N805
        """The backend for `key`, or None when no backend is usable.

        `load` is live bindings per backend (``StickyTable.load()``); schedulers that do
        not balance by load ignore it.
        """


def _usable(backends: Sequence[Backend]) -> tuple[Backend, ...]:
    names = [b.name for b in backends]
    if len(set(names)) != len(names):
        dup = next(n for n in names if names.count(n) > 1)
        raise ValueError(f"backend name {dup!r} is used more than once")
    return tuple(b for b in backends if b.weight > 0)


@implementer(IScheduler)
class RoundRobin:
    """Each usable backend in turn, ignoring weights beyond 0 / not 0."""

    def __init__(self, backends: Sequence[Backend] = ()) -> None:
        self._ring: tuple[Backend, ...] = ()
        self._next = 0
        self.set_backends(backends)

    def set_backends(self, backends: Sequence[Backend]) -> None:
        self._ring = _usable(backends)
        self._next = 0

    def choose(self, key: Key, load: Mapping[Backend, int]) -> Backend | None:
        ring = self._ring
        if not ring:
            return None
        i = self._next % len(ring)
        self._next = i + 1
        return ring[i]


@implementer(IScheduler)
class WeightedRoundRobin:
    """nginx's smooth weighted round robin.

    Each choice adds every backend's weight to its running score, picks the highest
    score and subtracts the total weight from it.  Over any run of ``sum(weights)``
    choices each backend is chosen exactly ``weight`` times, interleaved (weights 5, 1, 1
    give ``a a b a c a a``, not ``a a a a a b c``).
    """

    def __init__(self, backends: Sequence[Backend] = ()) -> None:
        self._ring: tuple[Backend, ...] = ()
        self._score: list[int] = []
        self._total = 0
        self.set_backends(backends)

    def set_backends(self, backends: Sequence[Backend]) -> None:
        self._ring = _usable(backends)
        self._score = [0] * len(self._ring)
        self._total = sum(b.weight for b in self._ring)

    def choose(self, key: Key, load: Mapping[Backend, int]) -> Backend | None:
        ring = self._ring
        if not ring:
            return None
        score = self._score
        best = 0
        for i, backend in enumerate(ring):
            score[i] += backend.weight
            if score[i] > score[best]:
                best = i
        score[best] -= self._total
        return ring[best]


@implementer(IScheduler)
class LeastLoaded:
    """The backend with the fewest live bindings per unit of weight.

    ``load[b] / b.weight`` is compared exactly (cross-multiplied integers).  Ties go to
    the heavier backend, then to the next in a rotating order, so equal backends share a
    burst of new terminals that arrives before the table's counts move.
    """

    def __init__(self, backends: Sequence[Backend] = ()) -> None:
        self._ring: tuple[Backend, ...] = ()
        self._start = 0
        self.set_backends(backends)

    def set_backends(self, backends: Sequence[Backend]) -> None:
        self._ring = _usable(backends)
        self._start = 0

    def choose(self, key: Key, load: Mapping[Backend, int]) -> Backend | None:
        ring = self._ring
        n = len(ring)
        if not n:
            return None
        start = self._start % n
        self._start = start + 1
        best = ring[start]
        best_load = load.get(best, 0)
        for step in range(1, n):
            b = ring[(start + step) % n]
            b_load = load.get(b, 0)
            # b_load / b.weight < best_load / best.weight, exactly:
            lhs = b_load * best.weight
            rhs = best_load * b.weight
            if lhs < rhs or (lhs == rhs and b.weight > best.weight):
                best, best_load = b, b_load
        return best


def key_hash(key: Key) -> int:
    """A 64-bit hash of `key` that is the same in every process and on every machine.

    Python's ``hash()`` of bytes is salted per process, so it cannot make several
    balancers agree; BLAKE2b of the kind's *name* and the value can.
    """
    h = hashlib.blake2b(key.kind.encode(), digest_size=8, person=b"lbproxy-key")
    h.update(b"\0")
    h.update(key.value)
    return int.from_bytes(h.digest(), "big")


def _name_hashes(name: str, size: int) -> tuple[int, int]:
    digest = hashlib.blake2b(name.encode(), digest_size=16, person=b"lbproxy-maglev").digest()
    offset = int.from_bytes(digest[:8], "big") % size
    skip = int.from_bytes(digest[8:], "big") % (size - 1) + 1
    return offset, skip


def _is_prime(n: int) -> bool:
    if n < 2:
        return False
    i = 2
    while i * i <= n:
        if n % i == 0:
            return False
        i += 1
    return True


def maglev_table(backends: Sequence[Backend], size: int) -> list[int]:
    """The Maglev lookup table: for each of `size` slots, an index into `backends`.

    Each backend walks its own permutation of the slots (``offset + j * skip`` modulo the
    prime `size`, both from a hash of its name) and, in turns, claims its next preferred
    free slot.  Weights (Maglev paper section 3.4) set how often a backend takes a turn:
    every round adds its weight to a credit, and it claims one slot per ``max(weight)``
    of credit, so slot counts are proportional to weights.  Pure function of the names,
    weights and order of `backends`.
    """
    n = len(backends)
    if not n:
        return []
    perms = [_name_hashes(b.name, size) for b in backends]
    weights = [b.weight for b in backends]
    top = max(weights)
    credit = [0] * n
    nxt = [p[0] for p in perms]  # next candidate slot of each backend
    table = [-1] * size
    filled = 0
    while True:
        for i in range(n):
            credit[i] += weights[i]
            if credit[i] < top:
                continue
            credit[i] -= top
            c = nxt[i]
            skip = perms[i][1]
            while table[c] >= 0:
                c += skip
                if c >= size:
                    c -= size
            table[c] = i
            c += skip
            nxt[i] = c - size if c >= size else c
            filled += 1
            if filled == size:
                return table


@implementer(IScheduler)
class Maglev:
    """Maglev consistent hashing.

    Backends are ordered by name before the table is built, so balancers configured with
    the same backends in any order build identical tables.  `table_size` must be prime;
    keep it well above 100 x the number of backends (the default 65537 suits up to a few
    hundred) for even shares and minimal disruption.  Building the table costs a fraction
    of a second in Python and happens only on :meth:`set_backends`.
    """

    def __init__(self, backends: Sequence[Backend] = (), table_size: int = 65537) -> None:
        if not _is_prime(table_size):
            raise ValueError(f"Maglev table size must be prime, not {table_size}")
        self.table_size: Final = table_size
        self._backends: tuple[Backend, ...] = ()
        self._slots: list[Backend] = []
        self.set_backends(backends)

    def set_backends(self, backends: Sequence[Backend]) -> None:
        usable = tuple(sorted(_usable(backends), key=lambda b: b.name))
        self._backends = usable
        self._slots = [usable[i] for i in maglev_table(usable, self.table_size)]

    def choose(self, key: Key, load: Mapping[Backend, int]) -> Backend | None:
        if not self._slots:
            return None
        return self._slots[key_hash(key) % self.table_size]

    def shares(self) -> dict[str, int]:
        """Slots owned per backend name (for operators and tests)."""
        counts = {b.name: 0 for b in self._backends}
        for b in self._slots:
            counts[b.name] += 1
        return counts


def _as_scheduler_factory(obj: object) -> Callable[..., IScheduler]:
    if not callable(obj):
        raise TypeError(f"{obj!r} is not callable")
    return obj


SCHEDULER_REGISTRY: Final[Registry[Callable[..., IScheduler]]] = Registry(
    "scheduler", "lbproxy.schedulers", _as_scheduler_factory
)
"""The schedulers :func:`scheduler_from_name` knows, by configuration name."""


def register_scheduler(name: str, factory: Callable[..., IScheduler]) -> None:
    """Make `name` usable in :func:`scheduler_from_name` (and so in configuration).

    `factory` called with no arguments (or the options given to ``scheduler_from_name``)
    returns a new :class:`IScheduler` provider with no backends yet.  Third-party packages
    can do the same without code through an entry point of group ``lbproxy.schedulers``.
    """
    SCHEDULER_REGISTRY.register(name, factory)


register_scheduler("round_robin", RoundRobin)
register_scheduler("weighted_round_robin", WeightedRoundRobin)
register_scheduler("least_loaded", LeastLoaded)
register_scheduler("maglev", Maglev)


def scheduler_names() -> tuple[str, ...]:
    """The names :func:`scheduler_from_name` accepts (as in the configuration file):
    built-ins in registration order, then those of entry points."""
    return SCHEDULER_REGISTRY.names()


def scheduler_from_name(name: str, **options: Any) -> IScheduler:
    """Build the registered scheduler called `name` (``round_robin``,
    ``weighted_round_robin``, ``least_loaded``, ``maglev``, or one from an entry point;
    ``-`` may stand for ``_``), with no backends yet.  `options` go to its factory
    (``table_size`` for Maglev).  An unknown name (the message lists the registered
    ones), or a factory that fails or makes something that is not an
    :class:`IScheduler`, raises ``ValueError``."""
    factory = SCHEDULER_REGISTRY.get(name)
    if factory is None and isinstance(name, str) and "-" in name:
        factory = SCHEDULER_REGISTRY.get(name.replace("-", "_"))
    if factory is None:
        raise ValueError(SCHEDULER_REGISTRY.unknown(name))
    try:
        scheduler = factory(**options)
    except Exception as e:
        raise ValueError(
            f"scheduler {name!r} could not be built: {type(e).__name__}: {e}"
        ) from e
    if not IScheduler.providedBy(scheduler):
        raise ValueError(
            f"scheduler {name!r} made {scheduler!r}, which does not provide IScheduler"
        )
    return scheduler
