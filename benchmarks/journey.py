"""What the terminals' journeys cost (lbproxy.core.journey; docs/journey.md).

Two figures:

1. *memory at the bound*: `Journeys` filled to ``--terminals`` journeys of ``--events``
   events each, measured with tracemalloc -- the worst case (every event with a packet
   of its own, ``--snap`` bytes) and the usual one (no packet: notifications,
   confirmations, operator moves; the events of one packet share its bytes);
2. *the general path with and without journeys*, per packet, in rounds (best and
   median, and the ratio with/without measured in the same run): a hit (the steady
   state: an HAO packet from the known care-of address), a hit without an HAO (a
   terminal keyed by its source address: the general path's link loop), and a miss
   (a new terminal: the table's listener and the journey's first event).

Run: ``.venv/bin/python benchmarks/journey.py`` (pure Python, no namespaces; about a
minute).
"""

from __future__ import annotations

import argparse
import gc
import ipaddress
import statistics
import time
import tracemalloc
from collections.abc import Callable

from twisted.internet.task import Clock

from lbproxy.core.balancer import Balancer
from lbproxy.core.journey import (
    DEFAULT_EVENTS,
    DEFAULT_SNAP,
    DEFAULT_TERMINALS,
    Journeys,
)
from lbproxy.core.keys import Key, KeyChain
from lbproxy.core.selection import Backend, scheduler_from_name
from lbproxy.core.table import StickyTable

VIP = ipaddress.IPv6Address("2001:db8:5::80")
BACKENDS = [Backend(f"b{i}", ipaddress.IPv6Address(f"2001:db8:b0::{i}")) for i in (1, 2, 3)]


class _FakeBinding:
    """Stands in for a table binding in the memory measurement (no table needed)."""

    def __init__(self, i: int) -> None:
        self.key = bytes([1]) + i.to_bytes(16, "big")


def memory(terminals: int, events: int, snap: int, own_packets: bool) -> float:
    """Bytes per journey kept, every journey full."""
    clock = Clock()
    gc.collect()
    tracemalloc.start()
    before = tracemalloc.get_traced_memory()[0]
    journeys = Journeys(clock, terminals, events, snap)
    shared = bytes(snap)
    for t in range(terminals - terminals // 4):
        journey = journeys._journey_for(())
        name = b"\x01" + t.to_bytes(16, "big")
        journeys._name(journey, name)
        journey.backend = "backend-1"
        for e in range(events):
            clock.advance(0.001)
            packet = (t.to_bytes(4, "big") + e.to_bytes(4, "big") + shared)[:snap] \
                if own_packets else b""  # fmt: skip
            # Alternately a care-of move (its text formatted at once) and an identity
            # linked (the Key kept, formatted when read).
            if e % 2:
                journeys._record(journey, "care-of",
                                 f"2001:db8:a1::{t:x} -> 2001:db8:a2::{e:x}", packet, 1400)
            else:
                journeys._record(journey, "linked", (Key("addr", _address(e, 0xA2)),),
                                 packet, 1400)
    gc.collect()
    used = tracemalloc.get_traced_memory()[0] - before
    tracemalloc.stop()
    # Every journey here has more than one event: all in the main segment (3/4 of the
    # bound; the probationary quarter holds journeys of one event, which cost less).
    kept = len(journeys)
    assert kept == terminals - terminals // 4, kept
    return used / kept


def _balancer(chain: tuple[str, ...], journeys: bool) -> tuple[Balancer, Clock]:
    clock = Clock()
    balancer = Balancer(chain=KeyChain.from_names(chain), table=StickyTable(clock, 300.0, 1 << 20),
                        scheduler=scheduler_from_name("maglev"), backends=BACKENDS,
                        virtual_addresses=[VIP], clock=clock)  # fmt: skip
    if journeys:
        balancer.follow_journeys(Journeys(clock))
    return balancer, clock


def _hao(source: bytes, home: bytes) -> bytearray:
    """An HAO UDP packet (built by hand: scapy is slow to import and not needed)."""
    payload = b"x" * 32
    udp = (40000).to_bytes(2, "big") + (80).to_bytes(2, "big") \
        + (8 + len(payload)).to_bytes(2, "big") + b"\0\0" + payload  # fmt: skip
    dest = bytes([17, 2, 1, 2, 0, 0, 0xC9, 16]) + home  # PadN(2) + HAO
    header = bytes([0x60, 0, 0, 0]) + (len(dest) + len(udp)).to_bytes(2, "big") \
        + bytes([60, 64]) + source + VIP.packed  # fmt: skip
    return bytearray(header + dest + udp)


def _plain(source: bytes) -> bytearray:
    payload = b"x" * 32
    udp = (40000).to_bytes(2, "big") + (80).to_bytes(2, "big") \
        + (8 + len(payload)).to_bytes(2, "big") + b"\0\0" + payload  # fmt: skip
    header = bytes([0x60, 0, 0, 0]) + len(udp).to_bytes(2, "big") + bytes([17, 64]) \
        + source + VIP.packed  # fmt: skip
    return bytearray(header + udp)


def _address(i: int, prefix: int = 0xA1) -> bytes:
    return bytes([0x20, 0x01, 0x0D, 0xB8, 0, prefix]) + bytes(6) + i.to_bytes(4, "big")


def per_packet(case: str, journeys: bool, packets: int) -> float:
    """Seconds per packet through `Balancer.inbound` for `case` (hit, hit-src, miss)."""
    chain = ("src",) if case == "hit-src" else ("hoa", "iid", "spi", "src")
    balancer, clock = _balancer(chain, journeys)
    terminals = 1000
    if case == "miss":
        batch = [_hao(_address(i), _address(i, 0x10)) for i in range(packets)]
    else:
        make: Callable[[int], bytearray] = (
            (lambda i: _plain(_address(i))) if case == "hit-src"
            else (lambda i: _hao(_address(i), _address(i, 0x10))))
        warm = [make(i) for i in range(terminals)]
        for packet in warm:
            balancer.inbound(bytearray(packet))
        batch = [warm[i % terminals] for i in range(packets)]
    copies = [bytearray(p) for p in batch]
    clock.advance(1)
    gc.disable()
    start = time.perf_counter()
    inbound = balancer.inbound
    for packet in copies:
        inbound(packet)
    took = time.perf_counter() - start
    gc.enable()
    assert balancer.counters.packets_out >= packets, balancer.counters.as_dict()
    return took / packets


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--terminals", type=int, default=DEFAULT_TERMINALS)
    parser.add_argument("--events", type=int, default=DEFAULT_EVENTS)
    parser.add_argument("--snap", type=int, default=DEFAULT_SNAP)
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--packets", type=int, default=50_000)
    parser.add_argument("--memory-only", action="store_true",
                        help="only the memory figures (no timing: no need of a quiet machine)")
    args = parser.parse_args()
    worst = memory(args.terminals, args.events, args.snap, own_packets=True)
    usual = memory(args.terminals, args.events, args.snap, own_packets=False)
    print(f"memory at the bound ({args.terminals} terminals x {args.events} events, "
          f"packets of {args.snap} bytes):")
    print(f"  every event with a packet of its own: {worst / 1024:7.1f} KiB per terminal, "
          f"{worst * args.terminals / 2**20:6.1f} MiB in all")
    print(f"  events without packets:               {usual / 1024:7.1f} KiB per terminal, "
          f"{usual * args.terminals / 2**20:6.1f} MiB in all")
    if args.memory_only:
        return
    print(f"\nthe general path per packet, {args.rounds} rounds of {args.packets} packets "
          "(best / median, microseconds):")
    for case in ("hit", "hit-src", "miss"):
        off, on = [], []
        for _ in range(args.rounds):  # interleaved, so drift hits both alike
            off.append(per_packet(case, False, args.packets))
            on.append(per_packet(case, True, args.packets))
        ratio = statistics.median(on) / statistics.median(off)
        print(f"  {case:8} without journeys {min(off) * 1e6:6.2f} / "
              f"{statistics.median(off) * 1e6:6.2f}   with {min(on) * 1e6:6.2f} / "
              f"{statistics.median(on) * 1e6:6.2f}   ratio of medians {ratio:5.3f}")


if __name__ == "__main__":
    main()
