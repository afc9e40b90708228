"""Small stand-ins for the core (keys, table, selection, balancer) used by the operating tests.

They implement the parts of docs/contracts.md that the operator modules
(control, ctl, manhole, metrics, persistence) read, so those modules can be
tested before, and independently of, the real core.  ``real_core_available()``
says whether the real modules are importable; tests that can use them do.
"""

from __future__ import annotations

import importlib.util
import ipaddress
from collections import Counter
from collections.abc import Iterator, Sequence

import attrs
from twisted.internet.task import Clock


def real_core_available() -> bool:
    """True once lbproxy.keys, .table and .selection exist."""
    return all(
        importlib.util.find_spec(f"lbproxy.{name}") is not None
        for name in ("keys", "table", "selection")
    )


@attrs.frozen
class Key:
    """A key as in the contract: kind + value, ``str()`` and ``parse()`` inverse."""

    kind: str
    value: bytes

    def __str__(self) -> str:
        if self.kind in ("hoa", "src"):
            return f"{self.kind} {ipaddress.IPv6Address(self.value)}"
        if self.kind == "spi":
            return f"spi 0x{int.from_bytes(self.value, 'big'):08x}"
        return f"{self.kind} {self.value.hex()}"

    @classmethod
    def parse(cls, text: str) -> Key:
        kind, _, rest = text.strip().partition(" ")
        rest = rest.strip()
        if kind in ("hoa", "src"):
            return cls(kind, ipaddress.IPv6Address(rest).packed)
        if kind == "spi":
            return cls(kind, int(rest, 16).to_bytes(4, "big"))
        if kind == "iid":
            return cls(kind, bytes.fromhex(rest))
        raise ValueError(f"unknown key kind {kind!r}")


@attrs.frozen
class Backend:
    name: str
    address: ipaddress.IPv6Address
    weight: int = 1

    @property
    def packed(self) -> bytes:
        return self.address.packed


class Binding:
    __slots__ = ("backend", "care_of", "confirmed", "created", "expires", "packets")

    def __init__(self, backend: Backend, expires: float, created: float) -> None:
        self.backend = backend
        self.expires = expires
        self.created = created
        self.packets = 0
        self.care_of: bytes | None = None
        self.confirmed = False


class Stats:
    def __init__(self) -> None:
        self.hits = self.misses = self.inserts = 0
        self.expirations = self.evictions = self.refusals = 0


class StickyTable:
    def __init__(self, clock: Clock, lifetime: float, max_entries: int) -> None:
        self.clock = clock
        self.lifetime = lifetime
        self.max_entries = max_entries
        self.entries: dict[Key, Binding] = {}
        self.stats = Stats()

    def lookup(self, key: Key, now: float | None = None) -> Binding | None:
        binding = self.entries.get(key)
        now = self.clock.seconds() if now is None else now
        if binding is None or binding.expires <= now:
            self.stats.misses += 1
            return None
        self.stats.hits += 1
        binding.expires = now + self.lifetime
        binding.packets += 1
        return binding

    def insert(self, key: Key, backend: Backend, care_of: bytes | None = None) -> Binding | None:
        if len(self.entries) >= self.max_entries and key not in self.entries:
            self.stats.refusals += 1
            return None
        now = self.clock.seconds()
        binding = Binding(backend, now + self.lifetime, now)
        binding.care_of = care_of
        self.entries[key] = binding
        self.stats.inserts += 1
        return binding

    def get(self, key: Key) -> Binding | None:
        return self.entries.get(key)

    def remove(self, key: Key) -> Binding | None:
        return self.entries.pop(key, None)

    def expire(self, now: float | None = None) -> int:
        now = self.clock.seconds() if now is None else now
        due = [k for k, b in self.entries.items() if b.expires <= now]
        for k in due:
            del self.entries[k]
        self.stats.expirations += len(due)
        return len(due)

    def load(self) -> dict[Backend, int]:
        out: Counter[Backend] = Counter()
        for b in self.entries.values():
            out[b.backend] += 1
        return dict(out)

    def __len__(self) -> int:
        return len(self.entries)

    def __iter__(self) -> Iterator[tuple[Key, Binding]]:
        return iter(list(self.entries.items()))

    def __contains__(self, key: object) -> bool:
        return key in self.entries


class Counters:
    def __init__(self) -> None:
        self.packets_in = 0
        self.packets_out = 0
        self.dropped: Counter[str] = Counter()
        self.hits: Counter[str] = Counter()
        self.misses: Counter[str] = Counter()
        self.backend_packets: Counter[str] = Counter()


@attrs.frozen
class TraceResult:
    strategy: str | None
    key: Key | None
    backend: Backend | None
    hit: bool
    reason: str | None


class Balancer:
    """Keys a packet on its source address (bytes 8..24); enough for the operator tests."""

    def __init__(self, backends: Sequence[Backend], clock: Clock, lifetime: float = 300.0):
        self.clock = clock
        self.table = StickyTable(clock, lifetime, 1000)
        self.chain = "src"
        self.counters = Counters()
        self.backends = {b.name: b for b in backends}
        self._down: set[str] = set()
        self._next = 0

    def is_up(self, name: str) -> bool:
        return name not in self._down

    def set_backend_up(self, name: str, up: bool) -> None:
        (self._down.discard if up else self._down.add)(name)

    def _choose(self) -> Backend | None:
        usable = [b for b in self.backends.values() if b.weight and b.name not in self._down]
        if not usable:
            return None
        self._next += 1
        return usable[self._next % len(usable)]

    def inbound(self, buf: bytes) -> bytes | None:
        self.counters.packets_in += 1
        if len(buf) < 40:
            self.counters.dropped["truncated"] += 1
            return None
        key = Key("src", bytes(buf[8:24]))
        binding = self.table.lookup(key)
        if binding is None:
            self.counters.misses["src"] += 1
            backend = self._choose()
            if backend is None:
                self.counters.dropped["no-backend"] += 1
                return None
            binding = self.table.insert(key, backend)
            assert binding is not None
        else:
            self.counters.hits["src"] += 1
        self.counters.packets_out += 1
        self.counters.backend_packets[binding.backend.name] += 1
        return buf

    def trace(self, buf: bytes) -> TraceResult:
        if len(buf) < 40:
            return TraceResult(None, None, None, False, "truncated")
        key = Key("src", bytes(buf[8:24]))
        binding = self.table.get(key)
        if binding is not None:
            return TraceResult("src", key, binding.backend, True, None)
        return TraceResult("src", key, None, False, "would schedule")

    def move(self, key: Key, backend_name: str) -> Binding:
        backend = self.backends[backend_name]
        old = self.table.remove(key)
        binding = self.table.insert(key, backend, care_of=old.care_of if old else None)
        assert binding is not None
        return binding

    def forget(self, key: Key) -> Binding | None:
        return self.table.remove(key)

    def drain(self, name: str) -> None:
        self.backends = {
            n: attrs.evolve(b, weight=0) if n == name else b for n, b in self.backends.items()
        }


def packet(source: str, destination: str = "2001:db8:ff::1", payload: bytes = b"") -> bytes:
    """A bare IPv6 header (next header 59, no next header) with ``payload``."""
    header = bytes([0x60, 0, 0, 0]) + len(payload).to_bytes(2, "big") + bytes([59, 64])
    return (
        header
        + ipaddress.IPv6Address(source).packed
        + ipaddress.IPv6Address(destination).packed
        + payload
    )


BACKENDS = (
    Backend("b1", ipaddress.IPv6Address("2001:db8:100::1")),
    Backend("b2", ipaddress.IPv6Address("2001:db8:100::2")),
)


def populated(clock: Clock | None = None) -> tuple[Balancer, Clock]:
    """A balancer with two backends and three bindings (one with a confirmed care-of)."""
    clock = clock or Clock()
    balancer = Balancer(BACKENDS, clock)
    for source in ("2001:db8:1::10", "2001:db8:1::11", "2001:db8:2::12"):
        balancer.inbound(packet(source))
    key = Key.parse("src 2001:db8:2::12")
    binding = balancer.table.get(key)
    assert binding is not None
    binding.care_of = ipaddress.IPv6Address("2001:db8:aa::12").packed
    binding.confirmed = True
    return balancer, clock
