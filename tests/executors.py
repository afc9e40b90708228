"""The executors of the core's decisions, driven sans I/O, and the packets they are fed.

An *executor* moves packets according to what `lbproxy.core.balancer.Balancer` decides:
the general path (`Balancer.inbound` / `Balancer.outbound`, one parsed packet at a time)
and the fast path (`lbproxy.io.fastpath.FastPath`, a whole ``recvmmsg`` batch from its
buffer into the writer's ``sendmmsg`` queues).  Each is wrapped here in one small class
with the same two calls -- a batch read on the client link, a batch read on the server
link, each returning what was sent, in order -- so tests/test_executors.py can hold any
executor to the general path.  A new executor (an XDP program run through
``BPF_PROG_TEST_RUN``, say) plugs in by adding one such class.
"""

from __future__ import annotations

import ipaddress
import socket
from typing import TYPE_CHECKING, ClassVar, Protocol

from twisted.internet.task import Clock

from lbproxy.core.balancer import Balancer
from lbproxy.io.fastpath import FastPath
from lbproxy.io.mmsg import Batch, BatchPacketWriter
from lbproxy.testing import MemoryPacketSystem

if TYPE_CHECKING:
    from lbproxy.io.xdp import XdpProgram

Sent = list[tuple[bytes, bytes]]
"""What an executor sent: (destination it was sent to, packet bytes), in order."""

VIP = "2001:db8:5::80"


class QueueWriter(BatchPacketWriter):
    """The real batched writer (`lbproxy.io.mmsg.BatchPacketWriter`) on the in-memory
    packet system (`lbproxy.testing.MemoryPacketSystem`, which emulates ``sendmmsg`` and
    passes the same port contract as the kernel, tests/test_batchport.py): small queues
    (`count` slots) so that full queues flush mid-batch; `take` flushes and returns what
    the system was given, in order."""

    def __init__(self, count: int = 3) -> None:
        self.memory = MemoryPacketSystem(["eth0"], mtu=65535)
        super().__init__(self.memory, max_packet=2048, slots=count)
        self.open()

    def take(self) -> Sent:
        """Flush, and return and forget what was sent."""
        self.flush()
        sent = [(socket.inet_pton(socket.AF_INET6, p.destination), p.packet)
                for p in self.memory.sent]  # fmt: skip
        self.memory.sent.clear()
        return sent


def received(packets: list[bytes], slot: int = 2048) -> Batch:
    """`packets` laid out as ``recvmmsg`` leaves them."""
    rx = Batch(max(1, len(packets)), slot)
    for i, packet in enumerate(packets):
        rx.set_received(i, packet)
    return rx


class Executor(Protocol):
    """One way of executing the balancer's decisions, driven one batch at a time."""

    name: ClassVar[str]

    def __init__(self, balancer: Balancer, clock: Clock) -> None: ...

    def inbound(self, packets: list[bytes]) -> Sent:
        """A batch read on the client link (terminals' packets)."""

    def replies(self, packets: list[bytes]) -> Sent:
        """A batch read on the server link (backends' replies, and whatever else is
        there)."""


class GeneralPath:
    """The reference executor: every packet through `Balancer.inbound`/`outbound`."""

    name: ClassVar[str] = "general path"

    def __init__(self, balancer: Balancer, clock: Clock) -> None:
        self.balancer = balancer

    def inbound(self, packets: list[bytes]) -> Sent:
        return _each(self.balancer.inbound, packets)

    def replies(self, packets: list[bytes]) -> Sent:
        return _each(self.balancer.outbound, packets)


def _each(handle: object, packets: list[bytes]) -> Sent:
    sent = []
    for packet in packets:
        out = handle(bytearray(packet))  # type: ignore[operator]
        if out is not None:
            sent.append((bytes(out[24:40]), bytes(out)))
    return sent


class FastPathExecutor:
    """`FastPath` over a received batch, the rest through the general path in its turn,
    into one writer -- as `lbproxy.io.forwarder.ForwarderService` wires them."""

    name: ClassVar[str] = "fast path"

    def __init__(self, balancer: Balancer, clock: Clock, writer: QueueWriter | None = None):
        self.balancer = balancer
        self.writer = writer or QueueWriter()
        self.fast = FastPath(balancer, self.writer, clock)

    def _run(self, packets: list[bytes], handle: object, fast: object) -> Sent:
        rx = received(packets)
        writer = self.writer

        def other(start: int, length: int) -> None:
            out = handle(bytearray(rx.data[start : start + length]))  # type: ignore[operator]
            if out is not None:
                writer.write(out)

        fast(rx.data, rx.slot, rx.lengths, len(packets), other)  # type: ignore[operator]
        return writer.take()

    def inbound(self, packets: list[bytes]) -> Sent:
        return self._run(packets, self.balancer.inbound, self.fast.forward)

    def replies(self, packets: list[bytes]) -> Sent:
        return self._run(packets, self.balancer.outbound, self.fast.reply)


#: The Ethernet header the XDP program's test runs see (it leaves it alone unattached).
ETHERNET = bytes.fromhex("020000000002" "020000000001" "86dd")


class XdpExecutor:
    """The XDP program (`lbproxy.io.xdp`), run on each packet through BPF_PROG_TEST_RUN:
    a rewritten packet (``XDP_TX``) is what it sends; ``XDP_PASS`` hands the packet, in
    its turn, to the general path, as the raw-socket reader would.

    Nothing folds the program's stamps into the table within a batch: the table asks
    for them where it needs them (`StickyTable.stamps`: a binding that looks expired, an
    eviction candidate), as it does in the forwarder.  At the end of the batch `sync`
    runs (as before a sweep) and then a whole fold, so the state compared is the table's
    with every packet told.  The table's clock is the test's `Clock`, written into the
    program's configuration.
    """

    name: ClassVar[str] = "XDP program"
    #: One loaded program per table bound (loading costs milliseconds; its maps are
    #: sized by the bound): each new executor empties its maps.
    _programs: ClassVar[dict[int, XdpProgram]] = {}

    def __init__(self, balancer: Balancer, clock: Clock) -> None:
        from lbproxy.io.xdp import XdpOffload, XdpProgram

        bound = balancer.table.max_entries
        program = XdpExecutor._programs.get(bound)
        if program is None:
            program = XdpExecutor._programs[bound] = XdpProgram(max_bindings=bound)
        program.reset()
        self.balancer = balancer
        self.xdp = XdpOffload(balancer, clock, fixed_clock=True, program=program)
        #: Packets the program rewrote (not the general path), per direction.
        self.offloaded = {"inbound": 0, "replies": 0}

    def _run(self, packets: list[bytes], program: str, handle: object, direction: str) -> Sent:
        from lbproxy.io.xdp import XDP_PASS, XDP_TX

        xdp = self.xdp
        xdp.prepare()
        sent: Sent = []
        for packet in packets:
            frame = ETHERNET + packet
            verdict, out = xdp.program.test_run(program, frame)
            if verdict == XDP_PASS:
                assert out == frame, "the program changed a packet it handed up"
                result = handle(bytearray(packet))  # type: ignore[operator]
                if result is not None:
                    sent.append((bytes(result[24:40]), bytes(result)))
                xdp.flush()  # the bindings the core made or changed, into the maps
            elif verdict == XDP_TX:
                assert out[:14] == ETHERNET, "the Ethernet header changed"
                body = out[14:]
                sent.append((body[24:40], body))
                self.offloaded[direction] += 1
            else:
                raise AssertionError(f"XDP verdict {verdict} for {packet.hex()}")
        xdp.sync()
        xdp.fold_all()
        return sent

    def inbound(self, packets: list[bytes]) -> Sent:
        return self._run(packets, "lbproxy_inbound", self.balancer.inbound, "inbound")

    def replies(self, packets: list[bytes]) -> Sent:
        return self._run(packets, "lbproxy_replies", self.balancer.outbound, "replies")



# -- packets -----------------------------------------------------------------------------


def address(text: str) -> bytes:
    return ipaddress.IPv6Address(text).packed


def raw_mobile(
    proto: int, hoa: bytes, coa: bytes, hop: int, dport: int, csum: int, payload: bytes
) -> bytes:
    """The fast path's shape, built by hand: IPv6, PadN(2)+HAO, UDP or TCP.

    By hand because the checksum field is chosen by the test (0, or anything): every
    executor must treat every value exactly as the general path does.
    """
    if proto == 17:
        l4 = (
            (40000).to_bytes(2, "big") + dport.to_bytes(2, "big")
            + (8 + len(payload)).to_bytes(2, "big") + csum.to_bytes(2, "big")
        )  # fmt: skip
    else:
        l4 = (
            (40000).to_bytes(2, "big") + dport.to_bytes(2, "big") + bytes(8)
            + b"\x50\x10\xff\xff" + csum.to_bytes(2, "big") + bytes(2)
        )  # fmt: skip
    dest = bytes([proto, 2, 1, 2, 0, 0, 0xC9, 16]) + hoa
    body = dest + l4 + payload
    header = bytes([0x60, 0, 0, 0]) + len(body).to_bytes(2, "big") + bytes([60, hop])
    return header + coa + address(VIP) + body


def raw_reply(
    proto: int, source: bytes, destination: bytes, hop: int, csum: int, payload: bytes
) -> bytes:
    """A backend's reply, built by hand: IPv6 straight to UDP or TCP (the checksum field
    is the test's choice)."""
    if proto == 17:
        l4 = (80).to_bytes(2, "big") + (40000).to_bytes(2, "big") + (
            8 + len(payload)).to_bytes(2, "big") + csum.to_bytes(2, "big")  # fmt: skip
    else:
        l4 = ((80).to_bytes(2, "big") + (40000).to_bytes(2, "big") + bytes(8)
              + b"\x50\x10\xff\xff" + csum.to_bytes(2, "big") + bytes(2))  # fmt: skip
    body = l4 + payload
    header = bytes([0x60, 0, 0, 0]) + len(body).to_bytes(2, "big") + bytes([proto, hop])
    return header + source + destination + body
