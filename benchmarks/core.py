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
import os
import subprocess
import sys
import time
import tracemalloc
from collections.abc import Callable

from scapy.layers.inet import UDP
from scapy.layers.inet6 import HAO, IPv6, IPv6ExtHdrDestOpt
from scapy.layers.ipsec import ESP
from twisted.internet.task import Clock

from lbproxy.core.keys import Key, KeyChain
from lbproxy.core.selection import Backend
from lbproxy.core.table import StickyTable
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


def stages(
    chain: KeyChain, table: StickyTable, bufs: list[bytearray]
) -> list[Callable[[bytearray], object]]:
    """The measured functions: whole path, parse + chain, parse, and the baseline."""
    key_for = chain.key_for
    lookup = table.lookup

    def full(buf: bytearray) -> object:
        found = key_for(buf, parse(buf))
        assert found is not None
        return lookup(found[0], 1.0)

    def parse_chain(buf: bytearray) -> object:
        return key_for(buf, parse(buf))

    def parse_only(buf: bytearray) -> object:
        return parse(buf)

    # Baseline: the least a Python data path does per packet - copy the source
    # address out of the buffer and look it up in a dict.
    get = {bytes(buf[8:24]): BACKENDS[0] for buf in bufs}.get

    def baseline(buf: bytearray) -> object:
        return get(bytes(buf[8:24]))

    return [full, parse_chain, parse_only, baseline]


def bench_packets() -> None:
    print("== per packet: parse + KeyChain + StickyTable.lookup (hit), goal <= 2 us ==")
    print(f"   (minimum over 300 interleaved trials; load average {os.getloadavg()[0]:.1f}"
          f" on {os.cpu_count()} CPUs)")
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
        t_full, t_chain, t_parse, t_base = per_packet(stages(chain, table, bufs), bufs)
        assert table.stats.hits >= 300 * n, table.stats
        print(f"  {kind}: {t_full * 1e6:5.2f} us/packet = parse {t_parse * 1e6:.2f}"
              f" + key chain {(t_chain - t_parse) * 1e6:.2f} + table hit"
              f" {(t_full - t_chain) * 1e6:.2f};  baseline (copy source, dict get)"
              f" {t_base * 1e6:.2f} us; ratio {t_full / t_base:.1f}x")


def make_key(kind: str, i: int) -> Key:
    if kind == "iid":
        return Key("iid", (0x0211_22FF_FE00_0000 | i).to_bytes(8, "big"))
    base = 0x2001_0DB8_0001 << 80 if kind == "hoa" else 0x2001_0DB8_0002 << 80
    return Key(kind, (base | i).to_bytes(16, "big"))


def rss() -> int:
    """Resident set size in bytes (Linux)."""
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


CASES = {
    "src": ("src", False, False),
    "hoa+care_of": ("hoa", True, False),
    "hoa+care_of,moving": ("hoa", True, True),
}


def fill(table: StickyTable, clock: Clock, kind: str, care_of: bool, spread: bool,
         entries: int) -> None:
    """Each entry: insert + one hit (established).  Keys and care-of addresses are
    made per packet, as the data path makes them, so only what the table keeps stays."""
    for i in range(entries):
        if spread and i % 16 == 0:
            # a new clock reading every 16 packets, 1 ms apart: (almost) no sharing
            # of the expiry floats between entries.
            clock.advance(0.001)
        key = make_key(kind, i)
        cares = (0x2001_0DB8_0002 << 80 | i).to_bytes(16, "big") if care_of else None
        table.insert(key, BACKENDS[i & 3], care_of=cares)
        table.lookup(key)


def rss_per_entry(case: str, entries: int) -> float:
    """RSS growth per entry of a table filled in this (fresh) process."""
    kind, care_of, spread = CASES[case]
    clock = Clock()
    gc.collect()
    before = rss()
    table = StickyTable(clock, 300, entries)
    fill(table, clock, kind, care_of, spread, entries)
    gc.collect()
    return (rss() - before) / len(table)


def bench_memory(entries: int) -> None:
    print(f"== table memory at {entries:,} established entries, goal <= 256 B/entry ==")
    print("   (tracemalloc = bytes requested, in this process; RSS = growth of a fresh")
    print("   process filling the same table, allocator rounding and free lists included)")
    for case, (kind, care_of, spread) in CASES.items():
        clock = Clock()
        gc.collect()
        tracemalloc.start()
        base = tracemalloc.get_traced_memory()[0]
        table = StickyTable(clock, 300, entries)
        fill(table, clock, kind, care_of, spread, entries)
        used = tracemalloc.get_traced_memory()[0] - base
        tracemalloc.stop()
        out = subprocess.run(
            [sys.executable, __file__, "--rss", case, "--entries", str(entries)],
            capture_output=True, text=True, check=True,
        )
        print(f"  {case:20s} tracemalloc {used / entries:6.1f} B/entry;"
              f" RSS {float(out.stdout):6.1f} B/entry")
        if spread:
            bench_sweep(table, clock)
        del table
        gc.collect()


def bench_sweep(table: StickyTable, clock: Clock) -> None:
    print(f"== expiry sweep, {len(table):,} live entries, none due, goal <= 1 ms ==")
    best = float("inf")
    for _ in range(20):
        clock.advance(0.01)
        t0 = time.perf_counter()
        removed = table.expire()
        best = min(best, time.perf_counter() - t0)
        assert removed == 0
    print(f"  {best * 1e6:.1f} us per sweep (best of 20)")
    # For scale, a sweep with the first two seconds' worth of entries due.
    clock.advance(302 - clock.seconds())
    t0 = time.perf_counter()
    removed = table.expire()
    dt = time.perf_counter() - t0
    print(f"  with {removed:,} due: {dt * 1e3:.1f} ms ({dt / max(removed, 1) * 1e9:.0f} ns"
          f" per entry removed)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--entries", type=int, default=1_000_000)
    parser.add_argument("--skip-memory", action="store_true")
    parser.add_argument("--rss", choices=CASES, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.rss:
        print(rss_per_entry(args.rss, args.entries))
        return
    print(f"Python {sys.version.split()[0]}")
    bench_packets()
    if not args.skip_memory:
        bench_memory(args.entries)


if __name__ == "__main__":
    main()
