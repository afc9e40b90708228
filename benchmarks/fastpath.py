"""In-process cost of the fast path against the general path, both directions.

Why: the data-path benchmark (benchmarks/dataplane.py) measures the whole forwarder
through real sockets, where the kernel's share and a shared machine's noise hide what a
change to the Python per-packet work is worth.  This script times only that work, in one
process, without sockets: batches laid out as ``recvmmsg`` leaves them go through
`FastPath.forward` / `FastPath.reply` into a `BatchPacketWriter`'s queues (whose
``sendmmsg`` is replaced by emptying the queue), and the same packets through
`Balancer.inbound` / `Balancer.outbound` and the writer's ``send`` (copying each packet
into a ``bytearray`` first, as the reader does) -- the baseline, in the same run.

Packets (built with ``struct``, no scapy): IPv6 + PadN(2)+HAO + UDP with a 64-byte
payload, as benchmarks/dataplane.py sends, from 1 and from 100,000 terminals; and the
backends' UDP replies to them, half to confirmed care-of addresses (Type 2 Routing
Header).  Printed: nanoseconds per packet (best of 5 timed passes) and the ratio.

Run: ``.venv/bin/python benchmarks/fastpath.py`` (``make bench``).  No root needed.
"""

from __future__ import annotations

import ipaddress
import struct
import sys
import time
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from twisted.internet.task import Clock

from lbproxy.core.balancer import Balancer
from lbproxy.core.keys import KeyChain
from lbproxy.core.selection import Backend, scheduler_from_name
from lbproxy.core.table import StickyTable
from lbproxy.io import mmsg
from lbproxy.io.fastpath import FastPath
from lbproxy.testing import MemoryPacketSystem

VIP = ipaddress.IPv6Address("2001:db8:d5::80")
BACKENDS = [Backend(f"b{i}", ipaddress.IPv6Address(f"2001:db8:d2::1{i}")) for i in (1, 2, 3)]
HOME = int(ipaddress.IPv6Address("2001:db8:d100::"))
CARE_OF = int(ipaddress.IPv6Address("2001:db8:d1:0:0:1::"))
SLOT = 256
PASSES = 5


def request(i: int) -> bytes:
    """Terminal i's packet to the virtual address: HAO, UDP, 64-byte payload."""
    home = (HOME + i + 1).to_bytes(16, "big")
    udp = struct.pack("!HHHH", 40000, 5353, 72, 0x1234) + bytes(64)
    options = bytes([17, 2, 1, 2, 0, 0, 0xC9, 16]) + home
    return (struct.pack("!IHBB", 6 << 28, 24 + len(udp), 60, 64)
            + (CARE_OF + i + 1).to_bytes(16, "big") + VIP.packed + options + udp)  # fmt: skip


def reply(i: int) -> bytes:
    """A backend's UDP reply to terminal i's home address."""
    udp = struct.pack("!HHHH", 5353, 40000, 72, 0x4321) + bytes(64)
    return (struct.pack("!IHBB", 6 << 28, len(udp), 17, 64) + BACKENDS[i % 3].packed
            + (HOME + i + 1).to_bytes(16, "big") + udp)  # fmt: skip


def batches(make: Callable[[int], bytes], terminals: int, count: int) -> list[mmsg.Batch]:
    """`count` packets (terminal i for packet i mod `terminals`) in recvmmsg batches."""
    out = []
    for first in range(0, count, mmsg.SLOTS):
        batch = mmsg.Batch(mmsg.SLOTS, SLOT)
        for j in range(mmsg.SLOTS):
            packet = make((first + j) % terminals)
            batch.data[j * SLOT : j * SLOT + len(packet)] = packet
            batch.lengths[16 * j + 14] = len(packet)
        out.append(batch)
    return out


def setup(terminals: int) -> tuple[Balancer, mmsg.BatchPacketWriter, FastPath]:
    clock = Clock()
    clock.advance(1000)
    balancer = Balancer(
        chain=KeyChain.from_names(["hoa", "iid", "spi", "src"]),
        table=StickyTable(clock, 600.0, 1_000_000), scheduler=scheduler_from_name("maglev"),
        backends=BACKENDS, virtual_addresses=[VIP], clock=clock,
    )  # fmt: skip
    writer = mmsg.BatchPacketWriter(MemoryPacketSystem())
    # Queues without a socket: "sending" empties the queue (the kernel's share is
    # benchmarks/dataplane.py's business).
    writer._ready = True
    writer._flush = lambda out: setattr(out, "queued", 0)  # type: ignore[method-assign]
    writer.use_link(-1, 1)
    writer.set_link_neighbours({b.packed: b"\x02\x00\x5e\x00\x00\x01" for b in BACKENDS})
    for i in range(terminals):  # bindings exist (and are established); half confirmed
        packet = request(i)
        balancer.inbound(bytearray(packet))
        balancer.inbound(bytearray(packet))
        if i % 2:
            balancer.confirm(packet[48:64], packet[8:24])
    return balancer, writer, FastPath(balancer, writer, clock)


def best_ns(run: Callable[[], object], packets: int) -> float:
    run()  # warm
    best = float("inf")
    for _ in range(PASSES):
        start = time.perf_counter()
        run()
        best = min(best, time.perf_counter() - start)
    return best / packets * 1e9


def measure(terminals: int, count: int, show: bool = True) -> None:
    balancer, writer, fast = setup(terminals)
    inbound = batches(request, terminals, count)
    replies = batches(reply, terminals, count)
    packets = len(inbound) * mmsg.SLOTS

    def general(batch: mmsg.Batch, handle: Callable[[bytearray], bytearray | None]) -> None:
        data, lengths = batch.data, batch.lengths
        for j in range(mmsg.SLOTS):
            start = j * SLOT
            out = handle(bytearray(data[start : start + lengths[16 * j + 14]]))
            if out is not None:
                writer.send(out)

    def refuse(start: int, length: int) -> None:
        raise AssertionError("a packet left the fast path")

    cases = (
        ("terminal -> backend", inbound, fast.forward, balancer.inbound),
        ("backend -> terminal", replies, fast.reply, balancer.outbound),
    )
    for name, work, fast_path, general_path in cases:

        def run_fast(
            work: list[mmsg.Batch] = work, path: Callable[..., object] = fast_path
        ) -> None:
            for b in work:
                path(b.data, SLOT, b.lengths, mmsg.SLOTS, refuse)

        def run_general(
            work: list[mmsg.Batch] = work,
            path: Callable[[bytearray], bytearray | None] = general_path,
        ) -> None:
            for b in work:
                general(b, path)

        fast_ns = best_ns(run_fast, packets)
        general_ns = best_ns(run_general, packets)
        if show:
            print(f"  {terminals:>7,} terminals  {name}:  fast path {fast_ns:6.0f} ns/packet   "
                  f"general path {general_ns:6.0f} ns/packet   "
                  f"ratio {general_ns / fast_ns:4.2f}")  # fmt: skip
    assert fast.errors == 0


def main() -> None:
    print(
        f"fast path vs general path, in-process, Python {sys.version.split()[0]} "
        f"(best of {PASSES} passes; 64-byte UDP payloads)"
    )
    # A first round not shown: the first seconds of work in a fresh process run up to
    # 2x slower here (the interpreter's specialisation, the CPU waking up).
    measure(1, 64 * 200, show=False)
    measure(1, 64 * 200)
    measure(100_000, 100_032)


if __name__ == "__main__":
    main()
