"""Floods of forged identities against the sticky table and the subscription registry.

What it measures (docs/core.md, "The bound and the eviction policy";
docs/performance.md, "Memory and floods"): forged identities -- ``--identities`` of them
(1,000,000), each sending ``--packets`` packets (1, 2 and 5), at ``--rate`` packets per
second -- arrive at a table of ``--max-entries`` bindings (100,000, so the flood is ten
times the table) while ``--established`` terminals (1,000) bound before the flood keep
sending every 1-5 s and ``--newcomers`` new terminals (1,000) arrive during it, each
sending every 1-5 s for a minute. Printed per table and flood: established terminals
that lost their binding (goal 0), newcomers served (every packet forwarded by one
binding from its first packet to its last; goal >= 99 %), newcomers whose first packet
found room, the most bindings ever held against the bound, the table's own counters, and
RSS per binding (growth of a fresh process over the run / bindings held at the end; each
forged binding carries its source address as an alias, as on the real path).

The flood's source addresses (``--sources``): ``one64`` -- every identity from a new
address of the attacker's own /64 (no spoofing: the home address is packet content, the
interface ID is the attacker's to choose); ``spoofed`` -- every identity from a random
address anywhere. Forged packets carry a Home Address Option with a random home address;
an identity's packets go out in rounds over batches of ``--batch`` identities (its next
packet comes a batch later).

Tables (``--tables``): ``today`` is lbproxy/core/table.py as of ``--baseline`` (the
table before flood admission), loaded from git into this process; ``new`` this tree's;
``new-noadm`` this tree's without admission by prefix (what eviction alone does, as
against a spoofed flood). Each run is a fresh process (``--run``) driven as
`Balancer.backend_for` drives the table for a packet with a Home Address Option: the
home address, then the source address, looked up in that order; the first live binding
is refreshed (done, when its care-of address is the packet's source); otherwise a
backend is chosen by round robin (so a lost binding shows) and bound, with the source
address for admission; then both identities are linked and the care-of address set. Time
is a `twisted.internet.task.Clock`; the table is swept every second.

The registry part: the same flood through the notification subscriptions of one home
agent (``--registry-size`` 10,000 subscriptions, idle lifetime 600 s): every forged
identity's first packet opens a subscription to its claimed home address (inside the
agent's prefix, so the agent accepts it and answers, after ``--rtt``, that it knows no
binding), every newcomer's too (answered with its binding). ``today``:
`lbproxy.notify.subscriptions.Subscriptions` as it is; ``proposed``: the same with the
change proposed in docs/core.md ("The notification subscriptions") -- subscriptions no
agent reported a binding for are probationary and make room for new ones, oldest first;
established ones are never pushed out. Printed: established subscriptions lost (goal 0),
newcomers whose subscription was opened and kept (goal >= 99 %), the most held against
the bound.

Run: ``.venv/bin/python benchmarks/flood.py`` (a few minutes at full size; every run a
fresh process, one after the other); ``--identities 100000`` for a quick look. Prints
figures, asserts nothing.
"""

from __future__ import annotations

import argparse
import gc
import heapq
import ipaddress
import json
import os
import subprocess
import sys
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from twisted.internet.task import Clock

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.abtools import table_at
from lbproxy.core.keys import Key
from lbproxy.core.selection import Backend
from lbproxy.core.table import FREQUENT, StickyTable
from lbproxy.notify.subscriptions import Subscription, Subscriptions

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
#: The last revision of lbproxy/core/table.py before flood admission.
BASELINE = "ee58dd0"
BACKENDS = [Backend(f"s{i}", ipaddress.IPv6Address(f"2001:db8:ffff::{i + 1:x}"))
            for i in range(4)]
ADDR = Key("addr", bytes(16))[:1]  # the kind byte of address keys
HOME_PREFIX = 0x2001_0DB8_0001 << 80  # the home agent's /48: every home address in it
ATTACKER_64 = 0x2001_0DB8_BAD0_0001 << 64
MASK64 = (1 << 64) - 1
# Multipliers that scatter consecutive integers (odd, so a permutation mod 2**n).
SCATTER = (0x9E37_79B9_7F4A_7C15, 0xC2B2_AE3D_27D4_EB4F,
           0x1656_67B1_9E37_79F9_C2B2_AE3D_27D4_EB4F)


def rss() -> int:
    """Resident set size in bytes (Linux)."""
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def baseline_table(rev: str) -> type[StickyTable]:
    """lbproxy/core/table.py as of `rev`, loaded as a module of its own."""
    return table_at(rev)


# -- terminals -------------------------------------------------------------------------


@dataclass(eq=False)
class Terminal:
    """A legitimate terminal: its identities, and what happened to its packets."""

    home_key: Key
    source_key: Key
    source: bytes
    until: float
    backend: Backend | None = None
    packets: int = 0
    lost: int = 0  # packets after the first that found no binding (a new one was made)
    refused: int = 0  # packets dropped: no room
    moved: int = 0  # packets that went to another backend than the first


def terminal(n: int, until: float) -> Terminal:
    home = (HOME_PREFIX | (n * SCATTER[0]) & MASK64 | 1 << 63).to_bytes(16, "big")
    # Each from a /64 of its own, in /48s all over 2000::/4 (not the flood's).
    source = (1 << 125 | 1 << 124 | (n * SCATTER[2]) & ((1 << 124) - 1)).to_bytes(16, "big")
    return Terminal(Key("addr", home), Key("addr", source), source, until)


def forged(i: int, sources: str) -> tuple[Key, Key, bytes]:
    """Forged identity number i: its home key, its source key and its source address."""
    # Disjoint from the terminals' (their home addresses have bit 63 set, their sources
    # are in 3000::/4).
    home = (HOME_PREFIX | (i * SCATTER[0]) & (MASK64 >> 1)).to_bytes(16, "big")
    if sources == "one64":
        source = (ATTACKER_64 | (i * SCATTER[1]) & MASK64).to_bytes(16, "big")
    else:  # spoofed: anywhere in 2000::/4
        source = (1 << 125 | (i * SCATTER[2]) & ((1 << 124) - 1)).to_bytes(16, "big")
    return (bytes.__new__(Key, ADDR + home), bytes.__new__(Key, ADDR + source), source)


# -- the table run ---------------------------------------------------------------------


def run_table(args: argparse.Namespace, name: str, packets: int) -> dict[str, Any]:
    """One flood against one table, in this (fresh) process."""
    if name == "today":
        cls = baseline_table(args.baseline)
        gc.collect()
        before = rss()
        table = cls(Clock(), args.lifetime, args.max_entries)
        with_source = False
    else:
        gc.collect()
        before = rss()
        table = StickyTable(Clock(), args.lifetime, args.max_entries,
                            frequent=args.frequent,
                            admission=name != "new-noadm")
        with_source = True
    peek, refresh, insert, link = table.peek, table.refresh, table.insert, table.link
    rr = [0]

    def choose() -> Backend:
        rr[0] += 1
        return BACKENDS[rr[0] & 3]

    def packet(home_key: Key, source_key: Key, source: bytes, now: float) -> Any:
        """What `Balancer.backend_for` does to the table for an HAO packet; the binding
        that took it, and whether it was new, or None if dropped."""
        b = peek(home_key)
        if b is not None and b.expires > now:
            refresh(b, now)
            if b.care_of == source:
                return b, False
        else:
            b = peek(source_key)
            if b is not None and b.expires > now:
                refresh(b, now)
            else:
                if with_source:
                    b = insert(home_key, choose(), now=now, source=source)
                else:
                    b = insert(home_key, choose(), now=now)
                if b is None:
                    return None, True
                link(b, source_key, now)
                b.care_of = source
                return b, True
        link(b, home_key, now)
        link(b, source_key, now)
        b.care_of = source
        return b, False

    def legit(t: Terminal, now: float) -> None:
        b, new = packet(t.home_key, t.source_key, t.source, now)
        t.packets += 1
        if b is None:
            t.refused += 1
            return
        if t.backend is None:
            t.backend = b.backend
            return
        if new:
            t.lost += 1
        if b.backend != t.backend:
            t.moved += 1

    # Warm-up: the established terminals start within ten seconds and send every 1-5 s
    # for a minute before the flood (and on through it).
    events: list[tuple[float, int, Terminal]] = []
    established = [terminal(n, float("inf")) for n in range(args.established)]
    for n, t in enumerate(established):
        heapq.heappush(events, (10.0 * n / len(established), id(t), t))
    lcg = 12345

    def due(until: float) -> None:
        nonlocal lcg
        while events and events[0][0] <= until:
            when, _, t = heapq.heappop(events)
            legit(t, when)
            lcg = (lcg * 1103515245 + 12345) & 0x7FFF_FFFF
            after = when + 1.0 + 4.0 * lcg / 0x7FFF_FFFF
            if after <= t.until:
                heapq.heappush(events, (after, id(t), t))

    start = 60.0
    for second in range(int(start)):
        due(float(second))
        table.expire(float(second))
    due(start)
    t_flood = args.identities * packets / args.rate
    newcomers = [terminal(1_000_000 + n, 0.0) for n in range(args.newcomers)]
    for n, t in enumerate(newcomers):
        arrive = start + t_flood * (n + 0.5) / len(newcomers)
        t.until = arrive + args.newcomer_life
        heapq.heappush(events, (arrive, id(t), t))
    step = 1.0 / args.rate
    sweep_at = start
    batch = args.batch
    largest = len(table)
    t_run = time.perf_counter()
    sent = 0
    for first in range(0, args.identities, batch):
        ids = [forged(i, args.sources) for i in range(first, min(first + batch, args.identities))]
        for _ in range(packets):
            for home_key, source_key, source in ids:
                now = start + sent * step
                sent += 1
                if events and events[0][0] <= now:
                    due(now)
                if now >= sweep_at:
                    table.expire(now)
                    sweep_at = now + 1.0
                    largest = max(largest, len(table))
                packet(home_key, source_key, source, now)
        largest = max(largest, len(table))
    elapsed = time.perf_counter() - t_run
    gc.collect()
    grown = rss() - before
    served = [t for t in newcomers if t.packets and not (t.lost or t.refused or t.moved)]
    stats = table.stats
    return {
        "table": name,
        "packets": packets,
        "sources": args.sources,
        "flood_seconds": t_flood,
        "established_lost": sum(1 for t in established if t.lost or t.refused or t.moved),
        "newcomers": len(newcomers),
        "newcomers_served": len(served),
        "newcomers_first_admitted": sum(1 for t in newcomers if t.backend is not None),
        "newcomer_packets_refused": sum(t.refused for t in newcomers),
        "largest": largest,
        "bound": args.max_entries,
        "bindings": len(table),
        "aliases": getattr(table, "alias_count", 0),
        "rss_per_binding": grown / max(len(table), 1),
        "evictions": stats.evictions,
        "established_evictions": getattr(stats, "established_evictions", None),
        "refusals": stats.refusals,
        "throttled": getattr(stats, "throttled", None),
        "us_per_packet": elapsed / max(sent, 1) * 1e6,
    }


# -- the registry run ------------------------------------------------------------------


class ProposedSubscriptions(Subscriptions):
    """`Subscriptions` with the change proposed in docs/core.md ("The notification
    subscriptions"): when full,
    the oldest subscription no agent reported a binding for (``seq`` None) makes room;
    those with a reported binding are never pushed out.  Each one evicted is handed to
    ``evicted`` (the router would send its Unsubscribe at once)."""

    def __init__(self, max_entries: int, idle_lifetime: float = 600.0) -> None:
        super().__init__(max_entries, idle_lifetime)
        self._probation: deque[Subscription] = deque()
        self.evicted: Callable[[Subscription], object] = lambda sub: None

    def add(self, peer: str, address: bytes, kind: str, now: float) -> Subscription | None:
        if (len(self) >= self.max_entries and self.get(peer, address) is None
                and self.by_home(peer, address) is None):
            fifo = self._probation
            while fifo:
                old = fifo.popleft()
                if old.seq is None and self.get(old.peer, old.address) is old:
                    self.remove(old)
                    self.evicted(old)
                    break
        sub = super().add(peer, address, kind, now)
        if sub is not None and sub.seq is None and (not self._probation
                                                    or self._probation[-1] is not sub):
            self._probation.append(sub)
            if len(self._probation) > 2 * self.max_entries:
                self._probation = deque(s for s in self._probation
                                        if s.seq is None and self.get(s.peer, s.address) is s)
        return sub


def run_registry(args: argparse.Namespace, name: str, packets: int) -> dict[str, Any]:
    """The flood's first packets through one home agent's subscriptions."""
    cls = Subscriptions if name == "today" else ProposedSubscriptions
    gc.collect()
    before = rss()
    subs = cls(args.registry_size, 600.0)
    answers: deque[tuple[float, Subscription, bool]] = deque()  # (when, sub, has binding)

    def answer(until: float) -> None:
        while answers and answers[0][0] <= until:
            when, sub, binding = answers.popleft()
            if subs.get(sub.peer, sub.address) is not sub:
                continue  # gone before the answer came
            sub.confirmed = True
            if binding:
                sub.seq = 1
                subs.refresh(sub, when, 600.0)

    def first_packet(home: bytes, now: float, binding: bool) -> Subscription | None:
        sub = subs.add("ha1", home, "hoa", now)
        if sub is not None and not sub.confirmed:
            answers.append((now + args.rtt, sub, binding))
        return sub

    established = []
    for n in range(args.established):
        sub = first_packet(terminal(n, 0.0).home_key.value, 0.0, True)
        established.append(sub)
    answer(1.0)
    start = 20.0
    # The table admits one forged identity per `packets` flood packets.
    step = packets / args.rate
    t_flood = args.identities * step
    arrivals = deque(start + t_flood * (n + 0.5) / args.newcomers
                     for n in range(args.newcomers))
    newcomers: list[tuple[Subscription | None, float]] = []
    sweep_at = start
    largest = len(subs)
    for i in range(args.identities):
        now = start + i * step
        answer(now)
        while arrivals and arrivals[0] <= now:
            arrivals.popleft()
            n = len(newcomers)
            newcomers.append((first_packet(terminal(1_000_000 + n, 0.0).home_key.value,
                                           now, True), now))
        if now >= sweep_at:
            subs.sweep(now)  # the router would send Unsubscribe for what it returns
            sweep_at = now + 5.0
        first_packet(forged(i, "one64")[0].value, now, False)
        largest = max(largest, len(subs))
    answer(float("inf"))
    gc.collect()
    kept = [s for s, _ in newcomers if s is not None and subs.get(s.peer, s.address) is s
            and s.seq is not None]
    return {
        "registry": name,
        "packets": packets,
        "established_lost": sum(1 for s in established
                                if s is None or subs.get(s.peer, s.address) is not s),
        "newcomers": len(newcomers),
        "newcomers_kept": len(kept),
        "largest": largest,
        "bound": args.registry_size,
        "rss_per_subscription": (rss() - before) / max(len(subs), 1),
    }


# -- driver ----------------------------------------------------------------------------


def fresh(args: argparse.Namespace, what: str, name: str, packets: int) -> dict[str, Any]:
    """One run in a fresh process (its own RSS, nothing left over from the last)."""
    argv = [sys.executable, __file__, "--run", what, name, str(packets)]
    for option in ("identities", "rate", "max_entries", "lifetime", "established",
                   "newcomers", "newcomer_life", "batch", "sources", "baseline",
                   "registry_size", "rtt", "frequent"):
        argv += [f"--{option.replace('_', '-')}", str(getattr(args, option))]
    out = subprocess.run(argv, capture_output=True, text=True, check=True)
    result: dict[str, Any] = json.loads(out.stdout)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--identities", type=int, default=1_000_000)
    parser.add_argument("--packets", default="1,2,5", help="packets per forged identity")
    parser.add_argument("--rate", type=float, default=10_000.0, help="flood packets/s")
    parser.add_argument("--max-entries", type=int, default=100_000)
    parser.add_argument("--lifetime", type=float, default=300.0)
    parser.add_argument("--established", type=int, default=1000)
    parser.add_argument("--newcomers", type=int, default=1000)
    parser.add_argument("--newcomer-life", type=float, default=60.0)
    parser.add_argument("--batch", type=int, default=1,
                        help="identities whose packets interleave (1: back to back)")
    parser.add_argument("--frequent", type=int, default=FREQUENT)
    parser.add_argument("--sources", default="one64,spoofed")
    parser.add_argument("--tables", default="today,new")
    parser.add_argument("--registries", default="today,proposed")
    parser.add_argument("--registry-size", type=int, default=10_000)
    parser.add_argument("--rtt", type=float, default=0.05)
    parser.add_argument("--baseline", default=BASELINE)
    parser.add_argument("--run", nargs=3, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.run:
        what, name, packets = args.run
        run = run_table if what == "table" else run_registry
        print(json.dumps(run(args, name, int(packets))))
        return
    counts = [int(p) for p in args.packets.split(",")]
    print(f"Python {sys.version.split()[0]}; load average {os.getloadavg()[0]:.1f} on"
          f" {os.cpu_count()} CPUs")
    print(f"== sticky table: {args.identities:,} forged identities at {args.rate:,.0f}"
          f" packets/s against {args.max_entries:,} bindings (lifetime"
          f" {args.lifetime:g} s); {args.established:,} established terminals,"
          f" {args.newcomers:,} newcomers ==")
    print("  sources  packets  table      established lost  newcomers served"
          "  first admitted  largest/bound  evicted (est.)  refused (throttled)"
          "  RSS/binding  us/packet")
    for sources in [x for x in args.sources.split(",") if x]:
        args.sources = sources
        for packets in counts:
            for name in args.tables.split(","):
                r = fresh(args, "table", name, packets)
                print(f"  {sources:8s} {packets:7d}  {name:9s} {r['established_lost']:16,d}"
                      f"  {r['newcomers_served']:6,d} ({100 * r['newcomers_served'] / max(r['newcomers'], 1):5.1f} %)"  # noqa: E501
                      f"  {100 * r['newcomers_first_admitted'] / max(r['newcomers'], 1):13.1f} %"
                      f"  {r['largest']:,}/{r['bound']:,}"
                      f"  {r['evictions']:,} ({r['established_evictions'] or 0:,})"
                      f"  {r['refusals']:,} ({r['throttled'] or 0:,})"
                      f"  {r['rss_per_binding']:9.0f} B  {r['us_per_packet']:7.2f}")
    print(f"== subscription registry: the same floods' first packets (one per identity)"
          f" through one home agent's {args.registry_size:,} subscriptions ==")
    print("  packets  registry   established lost  newcomers kept  largest/bound"
          "  RSS/subscription")
    args.sources = "one64"
    for packets in counts:
        for name in [x for x in args.registries.split(",") if x]:
            r = fresh(args, "registry", name, packets)
            print(f"  {packets:7d}  {name:9s} {r['established_lost']:16,d}"
                  f"  {r['newcomers_kept']:6,d} ({100 * r['newcomers_kept'] / max(r['newcomers'], 1):5.1f} %)"  # noqa: E501
                  f"  {r['largest']:,}/{r['bound']:,}  {r['rss_per_subscription']:9.0f} B")


if __name__ == "__main__":
    main()
