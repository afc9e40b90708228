"""Core data-path figures: per-packet cost, table memory, sweep cost.

Run: ``.venv/bin/python benchmarks/core.py`` (``make bench``); ``--entries N`` to
change the memory/sweep table size (default 1,000,000).  Prints figures, asserts
nothing: it is not a test.  Goals (docs/core.md): parse + KeyChain + table hit
<= 2 us per packet; <= 256 bytes per table entry at 1,000,000 entries; one expiry
sweep over 1,000,000 live entries with none due <= 1 ms.

Packets are built once with scapy (allowed here: this is tooling, not the data path).
"""

from __future__ import annotations

import argparse
import gc
import ipaddress
import sys
import time
import tracemalloc
from collections.abc import Callable

from scapy.layers.inet import UDP
from scapy.layers.inet6 import HAO, IPv6, IPv6ExtHdrDestOpt
from scapy.layers.ipsec import ESP
from twisted.internet.task import Clock

from lbproxy.keys import Key, KeyChain
from lbproxy.selection import Backend
from lbproxy.table import StickyTable
from lbproxy.wire.view import parse

VIP = "2001:db8::100"
BACKENDS = [Backend(f"s{i}", ipaddress.IPv6Address(f"2001:db8:ffff::{i + 1:x}"))
            for i in range(4)]


def packets(kind: str, n: int) -> list[bytearray]:
    """n distinct 64-byte-payload packets whose chain key is of `kind`."""
    out = []
    for i in range(n):
        hi, lo = divmod(i, 65536)
        if kind == "iid":  # universal EUI-64 source, no HAO
            src = f"2001:db8:2:{hi:x}:211:22ff:fe33:{lo:x}"
        else:  # a privacy-style source: the iid strategy declines it
            src = f"2001:db8:2:{hi:x}:8c1e:51a7:d3f0:{lo:x}"
        p = IPv6(src=src, dst=VIP)
        if kind == "hoa":
            p = p / IPv6ExtHdrDestOpt(options=[HAO(hoa=f"2001:db8:1:{hi:x}::{lo:x}")])
        if kind == "spi":
            p = p / ESP(spi=0x1000 + i, seq=1, data=b"\0" * 56)
        else:
            p = p / UDP(sport=40000, dport=53) / (b"x" * 56)
        out.append(bytearray(bytes(p)))
    return out


def per_packet(fns: list[Callable[[bytearray], object]], bufs: list[bytearray],
               trials: int = 300) -> list[float]:
    """Seconds per call of each fn over bufs: the minimum over many short trials,
    interleaved, so that a busy machine's preemptions do not count."""
    best = [float("inf")] * len(fns)
    clock = time.perf_counter
    for _ in range(trials):
        for i, fn in enumerate(fns):
            t0 = clock()
            for buf in bufs:
                fn(buf)
            best[i] = min(best[i], (clock() - t0) / len(bufs))
    return best


def bench_packets() -> None:
    print("== per packet: parse + KeyChain + StickyTable.lookup (hit), goal <= 2 us ==")
    chain = KeyChain.from_names(["hoa", "iid", "spi", "src"])
    clock = Clock()
    n = 256
    for kind in ("hoa", "iid", "spi", "src"):
        bufs = packets(kind, n)
        table = StickyTable(clock, 300, 10 * n)
        for i, buf in enumerate(bufs):
            found = chain.key_for(buf, parse(buf))
            assert found is not None and found[0].kind == kind, (kind, found)
            table.insert(found[0], BACKENDS[i % 4])
            table.lookup(found[0])  # established, as a busy terminal's entry is
        key_for = chain.key_for
        lookup = table.lookup

        def full(buf: bytearray) -> object:
            found = key_for(buf, parse(buf))
            assert found is not None
            return lookup(found[0], 1.0)

        # Baseline: the least a Python data path does per packet - copy the source
        # address out of the buffer and look it up in a dict.
        plain = {bytes(buf[8:24]): BACKENDS[0] for buf in bufs}
        get = plain.get

        def baseline(buf: bytearray) -> object:
            return get(bytes(buf[8:24]))

        def parse_only(buf: bytearray) -> object:
            return parse(buf)

        def parse_chain(buf: bytearray) -> object:
            return key_for(buf, parse(buf))

        t_full, t_chain, t_parse, t_base = per_packet(
            [full, parse_chain, parse_only, baseline], bufs
        )
        hits = table.stats.hits
        assert hits >= 300 * n, hits
        print(f"  {kind}: {t_full * 1e6:5.2f} us/packet = parse {t_parse * 1e6:.2f}"
              f" + key chain {(t_chain - t_parse) * 1e6:.2f} + table hit"
              f" {(t_full - t_chain) * 1e6:.2f};  baseline (copy source, dict get)"
              f" {t_base * 1e6:.2f} us; ratio {t_full / t_base:.1f}x")


def keys_of(kind: str, n: int) -> list[Key]:
    if kind == "iid":
        return [Key("iid", (0x0211_22FF_FE00_0000 | i).to_bytes(8, "big")) for i in range(n)]
    base = 0x2001_0DB8_0001 << 80 if kind == "hoa" else 0x2001_0DB8_0002 << 80
    return [Key(kind, (base | i).to_bytes(16, "big")) for i in range(n)]


def bench_memory(entries: int) -> None:
    print(f"== table memory at {entries:,} entries, goal <= 256 B/entry ==")
    for kind, care_of, spread in [
        ("src", False, False),
        ("hoa", True, False),
        ("hoa", True, True),
    ]:
        keys = keys_of(kind, entries)
        cares = [bytes(k.value) for k in keys_of("src", entries)] if care_of else None
        clock = Clock()
        gc.collect()
        tracemalloc.start()
        base = tracemalloc.get_traced_memory()[0]
        table = StickyTable(clock, 300, entries)
        for i, key in enumerate(keys):
            if spread and i % 16 == 0:
                # a new clock reading every 16 packets, 1 ms apart: (almost) no
                # sharing of the expiry floats between entries.
                clock.advance(0.001)
            table.insert(key, BACKENDS[i & 3], care_of=cares[i] if cares else None)
            table.lookup(key)
        used = tracemalloc.get_traced_memory()[0] - base
        tracemalloc.stop()
        # The keys are made by the packet path anyway, but the table keeps them alive:
        # count them too (they were allocated before tracing started).
        key_bytes = sum(sys.getsizeof(k) for k in keys[:1000]) / 1000
        care_bytes = sum(sys.getsizeof(c) for c in cares[:1000]) / 1000 if cares else 0.0
        per = used / entries + key_bytes + care_bytes
        label = f"{kind} key{' + care_of' if care_of else ''}"
        label += ", clock moving" if spread else ", batched clock"
        print(f"  {label}: {per:6.1f} B/entry (table {used / entries:.1f}"
              f" + key {key_bytes:.0f} + care_of {care_bytes:.0f})")
        if kind == "hoa" and spread:
            bench_sweep(table, clock, entries)
        del table, keys, cares
        gc.collect()


def bench_sweep(table: StickyTable, clock: Clock, entries: int) -> None:
    print(f"== expiry sweep, {len(table):,} live entries, none due, goal <= 1 ms ==")
    best = float("inf")
    for _ in range(20):
        clock.advance(0.01)
        t0 = time.perf_counter()
        removed = table.expire()
        best = min(best, time.perf_counter() - t0)
        assert removed == 0
    print(f"  {best * 1e6:.1f} us per sweep")
    # And a sweep with 1% of the entries due, for scale.
    clock.advance(300 - 0.2 - entries / 16 * 0.001 * 0.99)
    t0 = time.perf_counter()
    removed = table.expire()
    dt = time.perf_counter() - t0
    print(f"  {removed:,} due: {dt * 1e3:.1f} ms ({dt / max(removed, 1) * 1e9:.0f} ns/entry)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--entries", type=int, default=1_000_000)
    parser.add_argument("--skip-memory", action="store_true")
    args = parser.parse_args()
    print(f"Python {sys.version.split()[0]}")
    bench_packets()
    if not args.skip_memory:
        bench_memory(args.entries)


if __name__ == "__main__":
    main()
