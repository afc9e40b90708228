"""Core data-path figures: per-packet cost, table memory, sweep cost.

Run: ``.venv/bin/python benchmarks/core.py`` (``make bench``); ``--entries N`` to
change the memory/sweep table size (default 1,000,000).  Prints figures, asserts
nothing: it is not a test.  Goals (docs/core.md): parse + KeyChain + table hit
<= 2 us per packet; the decision for a packet whose every identity is already linked
(parse + `Balancer.backend_for`) within 10 % of the same with the table before flood
admission; <= 256 bytes of RSS per binding at 1,000,000 bindings (aliases counted
apart); one expiry sweep over 1,000,000 live entries with none due <= 1 ms.

"Before" is lbproxy/core/table.py as of ``--baseline`` (the table before flood
admission and the slimmer binding), loaded from git into the same process (per-packet
figures, in alternating rounds: best and median of each, and their ratio) or into a
fresh process of its own (memory).

Packets are built once with scapy (allowed here: this is tooling, not the data path).
"""

from __future__ import annotations

import argparse
import gc
import inspect
import ipaddress
import os
import statistics
import subprocess
import sys
import time
import tracemalloc
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from scapy.layers.inet import UDP
from scapy.layers.inet6 import HAO, IPv6, IPv6ExtHdrDestOpt
from scapy.layers.ipsec import ESP
from twisted.internet.task import Clock

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.abtools import module_from, table_at
from lbproxy.core.balancer import Balancer
from lbproxy.core.keys import Key, KeyChain
from lbproxy.core.selection import Backend, Maglev
from lbproxy.core.table import StickyTable
from lbproxy.wire.view import parse

REPO = Path(__file__).resolve().parent.parent
#: The last revision of lbproxy/core/table.py before flood admission and the six-slot
#: binding ("before" in the figures).
BASELINE = "ee58dd0"

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


def per_packet(fns: Sequence[Callable[[Any], object]], bufs: Sequence[Any],
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
            assert found is not None and found[1].kind == kind, (kind, found)
            table.insert(found[0], BACKENDS[i % 4])
            table.lookup(found[0])  # established, as a busy terminal's entry is
        t_full, t_chain, t_parse, t_base = per_packet(stages(chain, table, bufs), bufs)
        assert table.stats.hits >= 300 * n, table.stats
        print(f"  {kind}: {t_full * 1e6:5.2f} us/packet = parse {t_parse * 1e6:.2f}"
              f" + key chain {(t_chain - t_parse) * 1e6:.2f} + table hit"
              f" {(t_full - t_chain) * 1e6:.2f};  baseline (copy source, dict get)"
              f" {t_base * 1e6:.2f} us; ratio {t_full / t_base:.1f}x")


def baseline_table(rev: str) -> type[StickyTable]:
    """lbproxy/core/table.py as of `rev`, loaded as a module of its own, under the
    interface this tree's `Balancer` calls where the revision predates it (ee58dd0, the
    default, does): a table that kept aliases in its one dictionary answers
    `peek_primary` with its `peek` (which finds aliases too) and `peek_alias` with
    nothing, a table without admission takes `insert` without the packet's source, and
    one without executors' stamps answers `alive` by its expiry and sets a care-of
    address without telling anyone.  Without this `make bench` stopped here (the balancer
    has called each since)."""
    old = table_at(rev)

    class Adapted(old):  # type: ignore[misc,valid-type]
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            super().__init__(*args, **kwargs)
            if not hasattr(self, "peek_primary"):
                self.peek_primary = self.peek
                self.peek_alias = _nothing

        def insert(self, *args: Any, source: object = None, **kwargs: Any) -> Any:
            if "source" in inspect.signature(old.insert).parameters:
                kwargs["source"] = source
            return super().insert(*args, **kwargs)

        if not hasattr(old, "alive"):  # no executor outside that table: its expiry is all

            def alive(self, b: Any, now: float) -> bool:
                return bool(b.expires > now)

        if not hasattr(old, "set_care_of"):

            def set_care_of(self, b: Any, care_of: bytes) -> None:
                b.care_of = care_of

    return Adapted


def _nothing(key: bytes) -> None:
    return None


def balancer_copy() -> type[Balancer]:
    """A second copy of `Balancer` (lbproxy/core/balancer.py run again as a module of its
    own), so that two tables measured side by side do not share the interpreter's
    specialised code for the decision."""
    path = REPO / "lbproxy" / "core" / "balancer.py"
    module = module_from(path.read_text(), "lbproxy.core.balancer_copy", str(path))
    cls: type[Balancer] = module.Balancer
    return cls


def rounds_line(label: str, before: list[float], after: list[float]) -> str:
    """Best and median of each side (ns), and after/before as best against best and as
    the median of the per-round ratios."""
    ratios = [a / b for a, b in zip(after, before, strict=True)]
    med = statistics.median
    return (f"  {label:28s} before {min(before) * 1e9:5.0f} / {med(before) * 1e9:5.0f}"
            f"  after {min(after) * 1e9:5.0f} / {med(after) * 1e9:5.0f} ns"
            f"  ratio {min(after) / min(before):.3f} / {med(ratios):.3f}")


def bench_before_after(rev: str, rounds: int) -> None:
    """This tree's table against the one before, in the same process, alternating."""
    print(f"== per packet, this tree's table against {rev}'s (before), {rounds} rounds;"
          f" best / median ns, after/before best / median of the rounds' ratios ==")
    print("   linked: parse + Balancer.backend_for, every identity of the packet already"
          " linked to its binding; goal: ratio <= 1.10")
    print("   hit path -> linked: this tree's linked decision against the plain hit path"
          " (parse + KeyChain.key_for + StickyTable.lookup of the first key)")
    old_table = baseline_table(rev)
    old_balancer = balancer_copy()
    chain = KeyChain.from_names(["hoa", "iid", "spi", "src"])
    n = 256
    for kind in ("hoa", "iid", "spi", "src"):
        bufs = packets(kind, n)
        clock = Clock()
        clock.advance(1.0)
        fns: list[Callable[[bytearray], object]] = []
        tables = []
        for cls, balancer_cls in ((old_table, old_balancer), (StickyTable, Balancer)):
            table = cls(clock, 300, 10 * n)
            scheduler = Maglev()
            scheduler.set_backends(BACKENDS)
            balancer = balancer_cls(chain=chain, table=table, scheduler=scheduler,
                                backends=BACKENDS, virtual_addresses=[ipaddress.IPv6Address(VIP)],
                                clock=clock)
            for buf in bufs:  # bound, then every identity linked (and established)
                balancer.backend_for(buf, parse(buf))
                balancer.backend_for(buf, parse(buf))
            decide = balancer.backend_for

            def linked(buf: bytearray, decide: Callable[..., object] = decide) -> object:
                return decide(buf, parse(buf))

            fns.append(linked)
            tables.append(table)
        keys = [chain.key_for(buf, parse(buf)) for buf in bufs]
        first = [found[0] for found in keys if found is not None]
        lookups = [t.lookup for t in tables]

        def hit_old(key: Key, lookup: Callable[..., object] = lookups[0]) -> object:
            return lookup(key, 1.0)

        def hit_new(key: Key, lookup: Callable[..., object] = lookups[1]) -> object:
            return lookup(key, 1.0)

        def hit_path(buf: bytearray, key_for: Callable[..., Any] = chain.key_for,
                     lookup: Callable[..., object] = tables[1].lookup) -> object:
            found = key_for(buf, parse(buf))
            assert found is not None
            return lookup(found[0], 1.0)

        linked_rounds: list[list[float]] = [[], [], []]
        hit_rounds: list[list[float]] = [[], []]
        for _ in range(rounds):
            for side, t in enumerate(per_packet([*fns, hit_path], bufs, trials=60)):
                linked_rounds[side].append(t)
            for side, t in enumerate(per_packet([hit_old, hit_new], first, trials=60)):
                hit_rounds[side].append(t)
        print(rounds_line(f"{kind}: linked", *linked_rounds[:2]))
        print(rounds_line(f"{kind}: table hit (lookup)", *hit_rounds))
        print(rounds_line(f"{kind}: hit path -> linked", linked_rounds[2], linked_rounds[1])
              .replace("before", "hit   ").replace("after ", "linked"))


def make_key(kind: str, i: int) -> Key:
    if kind == "iid":
        return Key("iid", (0x0211_22FF_FE00_0000 | i).to_bytes(8, "big"))
    base = 0x2001_0DB8_0001 << 80 if kind == "hoa" else 0x2001_0DB8_0002 << 80
    return Key(kind, (base | i).to_bytes(16, "big"))


def rss() -> int:
    """Resident set size in bytes (Linux)."""
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


#: case -> (key kind, with a care-of address, clock moving, with an alias)
CASES = {
    "src": ("src", False, False, False),
    "hoa+care_of": ("hoa", True, False, False),
    "hoa+care_of,moving": ("hoa", True, True, False),
    "hoa+care_of+alias": ("hoa", True, False, True),
}


def fill(table: StickyTable, clock: Clock, kind: str, care_of: bool, spread: bool,
         entries: int, alias: bool = False) -> None:
    """Each entry: insert + one hit (established), and with `alias` its care-of address
    linked as an alias (as `Balancer.backend_for` links a packet's source).  Keys and
    care-of addresses are made per packet, as the data path makes them, so only what
    the table keeps stays."""
    for i in range(entries):
        if spread and i % 16 == 0:
            # a new clock reading every 16 packets, 1 ms apart: (almost) no sharing
            # of the expiry floats between entries.
            clock.advance(0.001)
        key = make_key(kind, i)
        cares = (0x2001_0DB8_0002 << 80 | i).to_bytes(16, "big") if care_of else None
        binding = table.insert(key, BACKENDS[i & 3], care_of=cares)
        table.lookup(key)
        if alias and binding is not None and cares is not None:
            table.link(binding, Key("addr", cares))


def rss_per_entry(case: str, entries: int, rev: str | None) -> float:
    """RSS growth per binding of a table filled in this (fresh) process: this tree's, or
    `rev`'s."""
    kind, care_of, spread, alias = CASES[case]
    cls = baseline_table(rev) if rev else StickyTable
    clock = Clock()
    gc.collect()
    before = rss()
    table = cls(clock, 300, entries)
    fill(table, clock, kind, care_of, spread, entries, alias)
    gc.collect()
    return (rss() - before) / len(table)


def fresh_rss(case: str, entries: int, rev: str | None = None) -> float:
    argv = [sys.executable, __file__, "--rss", case, "--entries", str(entries)]
    if rev:
        argv += ["--baseline", rev]
    out = subprocess.run(argv, capture_output=True, text=True, check=True)
    return float(out.stdout)


def bench_memory(entries: int, rev: str) -> None:
    print(f"== table memory at {entries:,} established bindings, goal <= 256 B/binding"
          " (RSS, aliases apart) ==")
    print("   (tracemalloc = bytes requested, this tree, in this process; RSS = growth of a")
    print("   fresh process filling the same table, allocator rounding and free lists")
    print(f"   included: this tree, and {rev}'s table before the slimmer binding)")
    before_alias = after_alias = 0.0
    for case, (kind, care_of, spread, alias) in CASES.items():
        clock = Clock()
        gc.collect()
        tracemalloc.start()
        base = tracemalloc.get_traced_memory()[0]
        table = StickyTable(clock, 300, entries)
        fill(table, clock, kind, care_of, spread, entries, alias)
        used = tracemalloc.get_traced_memory()[0] - base
        tracemalloc.stop()
        after, before = fresh_rss(case, entries), fresh_rss(case, entries, rev)
        print(f"  {case:20s} tracemalloc {used / entries:6.1f} B/binding;"
              f" RSS {after:6.1f} B/binding (before: {before:6.1f})")
        if case == "hoa+care_of":
            before_alias, after_alias = before, after
        if alias:
            print(f"  {'':20s} of which the alias: {after - after_alias:6.1f} B"
                  f" (before: {before - before_alias:6.1f})")
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
    parser.add_argument("--baseline", default=BASELINE,
                        help=f"the revision of the table 'before' (default {BASELINE})")
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--rss", choices=CASES, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.rss:
        print(rss_per_entry(args.rss, args.entries,
                            args.baseline if "--baseline" in sys.argv else None))
        return
    print(f"Python {sys.version.split()[0]}")
    bench_packets()
    bench_before_after(args.baseline, args.rounds)
    if not args.skip_memory:
        bench_memory(args.entries, args.baseline)


if __name__ == "__main__":
    main()
