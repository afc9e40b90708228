"""In-process cost of the fast path against the general path, both directions.

Why: the data-path benchmark (benchmarks/dataplane.py) measures the whole forwarder
through real sockets, where the kernel's share and a shared machine's noise hide what a
change to the Python per-packet work is worth.  This script times only that work, in one
process, without sockets: batches laid out as ``recvmmsg`` leaves them go through
`FastPath.forward` / `FastPath.reply` into a `BatchPacketWriter`'s queues (whose
``sendmmsg`` is replaced by emptying the queue), and the same packets through
`Balancer.inbound` / `Balancer.outbound` and the writer's ``send`` (copying each packet
into a ``bytearray`` first, as the reader does) -- the baseline, in the same run.

The balancer, the writer and the fast path are built as the running service builds
them: a configuration text through `lbproxy.config.parse_config`,
`lbproxy.tap.build_balancer`, and a `ForwarderService` (batched I/O on) over an
in-memory packet system, whose ``writer`` and ``fast`` are the objects measured.  No
constructor of the core or of the fast path is called here.

Packets (built with ``struct``, no scapy): IPv6 + PadN(2)+HAO + UDP with a 64-byte
payload, as benchmarks/dataplane.py sends, from 1 and from 100,000 terminals; and the
backends' UDP replies to them, half to confirmed care-of addresses (Type 2 Routing
Header).  Printed: nanoseconds per packet (best of 5 timed passes) and the ratio.

Run: ``.venv/bin/python benchmarks/fastpath.py`` (no root needed).  Options, for
benchmarks/compare.py (which ``make bench`` runs) and for quick checks:
``--json`` prints one JSON object per case instead of the text lines
(``{"terminals", "direction", "fast_ns", "general_ns", "passes", "count"}``);
``--terminals 1,100000``; ``--count N`` packets per timed pass (default: 12,800, or
every terminal once if there are more); ``--passes N`` (default 5); ``--warmup N``
packets of an untimed first round (default 12,800; 0: none).  With ``--count`` below
the number of terminals, the packets come from the first ``N`` terminals of a table
holding all of them.
"""

from __future__ import annotations

import argparse
import ipaddress
import json
import struct
import sys
import time
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from twisted.internet.testing import MemoryReactorClock

from lbproxy.config import parse_config
from lbproxy.io import mmsg
from lbproxy.io.forwarder import ForwarderService
from lbproxy.io.mmsg import BatchPacketWriter
from lbproxy.tap import build_balancer
from lbproxy.testing import MemoryPacketSystem

VIP = ipaddress.IPv6Address("2001:db8:d5::80")
BACKENDS = [ipaddress.IPv6Address(f"2001:db8:d2::1{i}") for i in (1, 2, 3)]
HOME = int(ipaddress.IPv6Address("2001:db8:d100::"))
CARE_OF = int(ipaddress.IPv6Address("2001:db8:d1:0:0:1::"))
SLOT = 256
PASSES = 5
SMALL = 64 * 200  # packets per pass with few terminals, and of the warm-up
INBOUND, REPLIES = "terminal -> backend", "backend -> terminal"

#: The balancer measured, as an operator would configure it (etc/lbproxy.toml).
CONFIG = f"""
[balancer]
mode = "translate"
key_chain = ["hoa", "iid", "spi", "src"]
scheduler = "maglev"
lifetime = 600
max_entries = 1000000
[virtual]
addresses = ["{VIP}"]
[interfaces]
client = "client"
server = "server"
""" + "".join(
    f'[[backend]]\nname = "b{i}"\naddress = "{address}"\n'
    for i, address in zip((1, 2, 3), BACKENDS, strict=True)
)


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
            batch.set_received(j, make((first + j) % terminals))
        out.append(batch)
    return out


def setup(terminals: int) -> ForwarderService:
    """A forwarder (batched I/O, link sending) whose balancer knows `terminals`."""
    reactor = MemoryReactorClock()
    reactor.advance(1000)
    balancer = build_balancer(parse_config(CONFIG, "<benchmarks/fastpath.py>"), reactor)
    forwarder = ForwarderService(
        balancer, MemoryPacketSystem(("client", "server")), reactor, reactor,
        client_interface="client", server_interface="server", batch_io=True, link_send=True,
    )  # fmt: skip
    writer = forwarder.writer
    assert isinstance(writer, BatchPacketWriter) and forwarder.fast is not None
    # Queues without a socket: "sending" empties the queue (the kernel's share is
    # benchmarks/dataplane.py's business).
    writer.open()
    writer._flush = lambda out: setattr(out, "queued", 0)  # type: ignore[method-assign]
    writer.use_link(-1, 1)
    writer.set_link_neighbours({b.packed: b"\x02\x00\x5e\x00\x00\x01" for b in BACKENDS})
    for i in range(terminals):  # bindings exist (and are established); half confirmed
        packet = request(i)
        balancer.inbound(bytearray(packet))
        balancer.inbound(bytearray(packet))
        if i % 2:
            balancer.return_paths.confirm(packet[48:64], packet[8:24])
    return forwarder


def best_ns(run: Callable[[], object], packets: int) -> float:
    run()  # warm
    best = float("inf")
    for _ in range(PASSES):
        start = time.perf_counter()
        run()
        best = min(best, time.perf_counter() - start)
    return best / packets * 1e9


def measure(terminals: int, count: int, show: bool = True, as_json: bool = False) -> None:
    forwarder = setup(terminals)
    balancer, writer, fast = forwarder.balancer, forwarder.writer, forwarder.fast
    assert fast is not None
    inbound = batches(request, terminals, count)
    replies = batches(reply, terminals, count)
    packets = len(inbound) * mmsg.SLOTS

    def general(batch: mmsg.Batch, handle: Callable[[bytearray], bytearray | None]) -> None:
        data, lengths = batch.data, batch.lengths
        stride, at = mmsg.LENGTH_STRIDE, mmsg.LENGTH_AT
        for j in range(mmsg.SLOTS):
            start = j * SLOT
            out = handle(bytearray(data[start : start + lengths[stride * j + at]]))
            if out is not None:
                writer.send(out)

    def refuse(start: int, length: int) -> None:
        raise AssertionError("a packet left the fast path")

    cases = (
        (INBOUND, inbound, fast.forward, balancer.inbound),
        (REPLIES, replies, fast.reply, balancer.outbound),
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
        if show and as_json:
            print(json.dumps({
                "terminals": terminals, "direction": name, "fast_ns": round(fast_ns, 1),
                "general_ns": round(general_ns, 1), "passes": PASSES, "count": packets,
            }), flush=True)  # fmt: skip
        elif show:
            print(f"  {terminals:>7,} terminals  {name}:  fast path {fast_ns:6.0f} ns/packet   "
                  f"general path {general_ns:6.0f} ns/packet   "
                  f"ratio {general_ns / fast_ns:4.2f}")  # fmt: skip
    assert fast.errors == 0


def positive(text: str) -> int:
    value = int(text.replace(",", "").replace("_", ""))
    if value < 0:
        raise argparse.ArgumentTypeError(f"{text} is negative")
    return value


def main(argv: list[str] | None = None) -> None:
    global PASSES
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--json", action="store_true", help="one JSON object per case")
    parser.add_argument("--terminals", default="1,100000", help="comma-separated counts")
    parser.add_argument(
        "--count",
        type=positive,
        default=0,
        help="packets per timed pass (default: 12,800 or every terminal)",
    )
    parser.add_argument("--passes", type=positive, default=PASSES, help="timed passes")
    parser.add_argument("--warmup", type=positive, default=SMALL,
                        help="packets of the untimed first round (0: none)")  # fmt: skip
    args = parser.parse_args(argv)
    terminal_counts = [positive(t) for t in args.terminals.split(",") if t.strip()]
    if not terminal_counts or min(terminal_counts) < 1 or args.passes < 1:
        parser.error("--terminals and --passes must be at least 1")
    PASSES = args.passes
    if not args.json:
        print(
            f"fast path vs general path, in-process, Python {sys.version.split()[0]} "
            f"(best of {PASSES} passes; 64-byte UDP payloads)"
        )
    # A first round not shown: the first seconds of work in a fresh process run up to
    # 2x slower here (the interpreter's specialisation, the CPU waking up).
    if args.warmup:
        measure(1, args.warmup, show=False)
    for terminals in terminal_counts:
        # Whole batches of 64: 100,000 terminals give 100,032 packets by default.
        count = args.count or max(SMALL, terminals)
        measure(terminals, -(-count // mmsg.SLOTS) * mmsg.SLOTS, as_json=args.json)


if __name__ == "__main__":
    main()
