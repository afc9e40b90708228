"""Helpers for the operating tests (control, ctl, manhole, metrics, persistence).

``real_populated()`` builds the real Balancer with a few terminals bound, for the
tests of the operator's verbs.  ``Key``, ``Backend`` and ``StickyTable`` are
minimal contract stand-ins (docs/contracts.md) that let the persistence tests
pin exact lifetimes without the real table's rounding; tests/test_persistence.py
runs the same round trip through the real table as well.
"""

from __future__ import annotations

import ipaddress
from collections import Counter
from collections.abc import Iterator
from typing import Any

import attrs
from twisted.internet.task import Clock


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
    __slots__ = ("aliases", "backend", "care_of", "created", "expires", "packets")

    def __init__(self, backend: Backend, expires: float, created: float) -> None:
        self.backend = backend
        self.expires = expires
        self.created = created
        self.packets = 0
        self.care_of: bytes | None = None
        self.aliases: list[bytes] | None = None


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

    def catch_up_all(self) -> None:
        """No executor forwards outside this table: nothing to fold in."""

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

    def restore(self, key: Key, backend: Backend, expires: float, packets: int = 1,
                care_of: bytes | None = None, established: bool = False,
                now: float | None = None) -> Binding | None:
        now = self.clock.seconds() if now is None else now
        if expires <= now:
            return None
        binding = self.insert(key, backend, care_of)
        if binding is not None:
            binding.expires = min(expires, now + self.lifetime)
            binding.packets = packets
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


BACKENDS = (
    Backend("b1", ipaddress.IPv6Address("2001:db8:100::1")),
    Backend("b2", ipaddress.IPv6Address("2001:db8:100::2")),
)


# -- the real core, for tests that can use it ----------------------------------------

VIP = "2001:db8:ff::1"


def real_packet(source: str, home: str | None = None) -> bytearray:
    """A UDP packet to the virtual address, with a home address option if ``home``."""
    from scapy.layers.inet import UDP
    from scapy.layers.inet6 import HAO, IPv6, IPv6ExtHdrDestOpt

    pkt = IPv6(src=source, dst=VIP)
    if home is not None:
        pkt = pkt / IPv6ExtHdrDestOpt(options=[HAO(hoa=home)])
    return bytearray(bytes(pkt / UDP(sport=4000, dport=53) / b"x"))


def real_populated(clock: Clock | None = None) -> tuple[Any, Clock]:
    """The real Balancer (round robin over b1, b2, lifetime 300 s) after three terminals:
    src ::10 -> b1, src ::11 -> b2, src ::12 -> b1 (its care-of confirmed)."""
    from lbproxy.core.balancer import Balancer as RealBalancer
    from lbproxy.core.keys import KeyChain
    from lbproxy.core.selection import Backend as RealBackend
    from lbproxy.core.selection import RoundRobin
    from lbproxy.core.table import StickyTable as RealTable

    clock = clock or Clock()
    balancer = RealBalancer(
        chain=KeyChain.from_names(["hoa", "src"]),
        table=RealTable(clock, lifetime=300.0, max_entries=1000),
        scheduler=RoundRobin(),
        backends=[RealBackend(b.name, b.address) for b in BACKENDS],
        virtual_addresses=[ipaddress.IPv6Address(VIP)],
        clock=clock,
    )
    for source in ("2001:db8:1::10", "2001:db8:1::11", "2001:db8:2::12"):
        assert balancer.inbound(real_packet(source)) is not None
    binding = balancer.table.get(real_key("src 2001:db8:2::12"))
    assert binding is not None
    binding.care_of = ipaddress.IPv6Address("2001:db8:aa::12").packed
    balancer.return_paths.confirm(
        ipaddress.IPv6Address("2001:db8:100::12").packed, binding.care_of
    )
    return balancer, clock


def real_key(text: str) -> Any:
    from lbproxy.core.keys import Key as RealKey

    return RealKey.parse(text)
