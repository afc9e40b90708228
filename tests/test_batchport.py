"""The batched port's contract: `lbproxy.io.mmsg` on the kernel and on the fake.

`BatchPortContractMixin` runs twice: with `LinuxPacketSystem` (two namespaces and a veth
link per test, root only; the harness of tests/test_rawsocket.py) and with
`lbproxy.testing.MemoryPacketSystem`, whose ``recvmmsg``/``sendmmsg`` follow a batch's
pointers as the kernel does.  The ports are the same classes on both, so what is held to
the contract here is the fake's batched calls -- they cannot drift from the kernel's
unseen -- and the ports' own behaviour: every packet, in order, byte for byte, batches
laid out as ``recvmmsg`` leaves them, the queues the fast path fills, link sending.
"""

from __future__ import annotations

import errno
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

from twisted.internet.interfaces import IReadDescriptor
from twisted.internet.testing import MemoryReactor
from twisted.trial.unittest import SkipTest, SynchronousTestCase
from zope.interface import implementer
from zope.interface.verify import verifyObject

from lbproxy.io import mmsg
from lbproxy.io.rawsocket import (
    IBatchPacketSystem,
    IPacketSystem,
    IPacketTransport,
    IPacketWriter,
    PacketProtocol,
)
from tests.test_rawsocket import (
    FAR,
    INTERFACE,
    NEAR,
    UNROUTED,
    VIRTUAL1,
    VIRTUAL2,
    Collector,
    LinuxHarness,
    MemoryHarness,
    packed,
    to,
    udp_packet,
)

if TYPE_CHECKING:
    _MixinBase = SynchronousTestCase
else:
    _MixinBase = object


def tag(packet: bytes | bytearray | memoryview) -> int:
    """The number `to` gave a packet."""
    return int.from_bytes(packet[48:52], "big")


@implementer(mmsg.IBatchPacketProtocol)
class BatchCollector(Collector):
    """Records every batch as the port hands it over, and delivers the packets `keep`
    says yes to (all by default) back to the per-packet handling."""

    def __init__(self, keep: Callable[[int], bool] = lambda i: True) -> None:
        super().__init__()
        self.keep = keep
        #: Per batch: (count, [(full length, truncated, bytes)]).
        self.batches: list[tuple[int, list[tuple[int, bool, bytes]]]] = []

    def batchReceived(
        self, batch: mmsg.Batch, count: int, deliver: Callable[[int, int], None]
    ) -> None:
        self.batches.append((count, [(batch.length(i), batch.truncated(i),
                                      bytes(batch.packet(i))) for i in range(count)]))  # fmt: skip
        for i in range(count):
            if self.keep(tag(batch.packet(i))):
                deliver(batch.start(i), batch.length(i))


class BatchPortContractMixin(_MixinBase):
    """What the batched reader and writer do on every IBatchPacketSystem.

    A test class provides ``system`` and the harness of tests/test_rawsocket.py:
    ``deliver``, ``settle``, ``peer_received``, ``link_down``, ``link_up``, ``far_mac``.
    """

    system: IPacketSystem
    far_mac: bytes

    def deliver(self, packets: Sequence[bytes]) -> None:
        raise NotImplementedError

    def settle(self) -> None:
        raise NotImplementedError

    def peer_received(self, count: int) -> list[bytes]:
        raise NotImplementedError

    def link_down(self) -> None:
        raise NotImplementedError

    def link_up(self) -> None:
        raise NotImplementedError

    def reader(
        self,
        protocol: object = None,
        writer: mmsg.BatchPacketWriter | None = None,
        destinations: Sequence[str] = (VIRTUAL1,),
        **kwargs: Any,
    ) -> mmsg.BatchPacketReader:
        kwargs.setdefault("receive_buffer", 1 << 22)
        port = mmsg.BatchPacketReader(
            self.system, MemoryReactor(), INTERFACE, protocol or Collector(),  # type: ignore[arg-type]
            writer=writer, destinations=[packed(d) for d in destinations], **kwargs,
        )  # fmt: skip
        port.open()
        self.addCleanup(port.close)
        port.startReading()
        return port

    def writer(self, **kwargs: int) -> mmsg.BatchPacketWriter:
        writer = mmsg.BatchPacketWriter(self.system, **kwargs)
        writer.open()
        self.addCleanup(writer.close)
        return writer

    # The reader -----------------------------------------------------------

    def test_provides_interfaces(self) -> None:
        """The system is an IBatchPacketSystem; the reader a read descriptor and its
        protocol's transport; the writer an IPacketWriter."""
        assert verifyObject(IBatchPacketSystem, self.system)
        writer = self.writer()
        port = self.reader(writer=writer)
        assert verifyObject(IReadDescriptor, port)
        assert verifyObject(IPacketTransport, port)
        assert verifyObject(IPacketWriter, writer)
        assert verifyObject(mmsg.IBatchPacketProtocol, BatchCollector())

    def test_every_packet_in_order(self) -> None:
        """200 packets of many sizes: all handed over, in order, byte for byte, as
        owned bytearrays; at most ``batch`` per wake-up."""
        protocol = Collector()
        port = self.reader(protocol, batch=100)
        sent = [to(VIRTUAL1, i, size=60 + 5 * i) for i in range(200)]
        self.deliver(sent)
        self.settle()
        port.doRead()
        assert len(protocol.packets) == 100
        port.doRead()
        port.doRead()  # nothing left: a harmless empty wake-up
        assert [bytes(p) for p in protocol.packets] == sent
        assert all(type(p) is bytearray for p in protocol.packets)
        assert (port.stats.received, port.stats.wakeups, port.stats.errors) == (200, 3, 0)

    def test_batches_laid_out_as_recvmmsg_leaves_them(self) -> None:
        """A batch protocol gets at most SLOTS packets a batch, each with its full length
        and, when it did not fit, its head and MSG_TRUNC; what it delivers reaches
        packetReceived in order, oversize ones counted, the rest it keeps."""
        protocol = BatchCollector(keep=lambda t: t % 3 != 0)
        port = self.reader(protocol, max_packet=300)
        sent = [to(VIRTUAL1, i, size=400 if i == 70 else 100 + i) for i in range(150)]
        self.deliver(sent)
        self.settle()
        port.doRead()
        counts = [count for count, _ in protocol.batches]
        assert sum(counts) == 150 and max(counts) <= mmsg.SLOTS, counts
        seen = [entry for _, entries in protocol.batches for entry in entries]
        assert [length for length, _, _ in seen] == [len(p) for p in sent]
        assert [truncated for _, truncated, _ in seen] == [len(p) > 300 for p in sent]
        assert [data for _, _, data in seen] == [p[:300] for p in sent]
        kept = [p for i, p in enumerate(sent) if i % 3 and len(p) <= 300]
        assert [bytes(p) for p in protocol.packets] == kept
        assert port.stats.oversize == 1
        assert port.stats.received == 149

    def test_oversize_and_protocol_errors_counted(self) -> None:
        """A packet larger than max_packet and a protocol that raises are counted; the
        packets around them still arrive."""
        got: list[int] = []

        class Picky(PacketProtocol):
            def packetReceived(self, packet: bytearray) -> None:
                if tag(packet) == 2:
                    raise ValueError("boom")
                got.append(tag(packet))

        port = self.reader(Picky(), max_packet=300)
        self.deliver([to(VIRTUAL1, 1), to(VIRTUAL1, 9, size=400), to(VIRTUAL1, 2),
                      to(VIRTUAL1, 3)])  # fmt: skip
        self.settle()
        port.doRead()
        assert got == [1, 3]
        assert (port.stats.oversize, port.stats.handler_errors, port.stats.received) == (1, 1, 3)
        assert len(self.flushLoggedErrors(ValueError)) == 1

    def test_batch_protocol_error_contained(self) -> None:
        """A batchReceived that raises is one counted handler error; reading goes on."""

        @implementer(mmsg.IBatchPacketProtocol)
        class Broken(Collector):
            def batchReceived(self, batch: mmsg.Batch, count: int,
                              deliver: Callable[[int, int], None]) -> None:  # fmt: skip
                raise ZeroDivisionError("bug")

        port = self.reader(Broken(), batch=1000)
        self.deliver([to(VIRTUAL1, i) for i in range(100)])
        self.settle()
        port.doRead()
        assert port.stats.handler_errors == 2  # 64 + 36
        assert port.stats.errors == 0
        assert len(self.flushLoggedErrors(ZeroDivisionError)) == 2

    def test_nothing_queued(self) -> None:
        """A wake-up with nothing queued is no error and delivers nothing."""
        protocol = Collector()
        port = self.reader(protocol)
        port.doRead()
        assert (protocol.packets, port.stats.errors, port.stats.received) == ([], 0, 0)

    def test_link_down_counted(self) -> None:
        """A link going down is a counted receive error; reading resumes when it is back."""
        protocol = Collector()
        port = self.reader(protocol)
        self.link_down()
        port.doRead()
        assert port.stats.errors == 1
        self.link_up()
        self.deliver([to(VIRTUAL1, 9)])
        self.settle()
        port.doRead()
        assert [bytes(p) for p in protocol.packets] == [to(VIRTUAL1, 9)]

    def test_filter_changes(self) -> None:
        """The destination filter applies to batches too, and can change."""
        protocol = Collector()
        port = self.reader(protocol)
        self.deliver([to(VIRTUAL2, 1), to(VIRTUAL1, 2)])
        self.settle()
        port.doRead()
        port.set_destinations([packed(VIRTUAL2)])
        self.deliver([to(VIRTUAL1, 3), to(VIRTUAL2, 4)])
        self.settle()
        port.doRead()
        assert [tag(p) for p in protocol.packets] == [2, 4]

    def test_unknown_interface(self) -> None:
        """ENODEV for a missing interface, at open and for its index."""
        port = mmsg.BatchPacketReader(self.system, MemoryReactor(), "lbrs-nosuch", Collector())
        with self.assertRaises(OSError) as caught:
            port.open()
        assert caught.exception.errno == errno.ENODEV
        with self.assertRaises(OSError) as caught:
            self.system.interface_index("lbrs-nosuch")  # type: ignore[attr-defined]
        assert caught.exception.errno == errno.ENODEV

    # Reader and writer together -------------------------------------------

    def test_protocol_writes_flushed_after_each_wake_up(self) -> None:
        """A protocol writes through its transport; the writer queues, and the reader
        flushes it at the end of the wake-up: the peer has every packet, in order."""

        class Echo(PacketProtocol):
            def packetReceived(self, packet: bytearray) -> None:
                assert self.transport is not None
                packet[24:40] = packed(FAR)
                self.transport.write(packet)

        writer = self.writer()
        port = self.reader(Echo(), writer=writer)
        sent = [to(VIRTUAL1, i, size=80 + i) for i in range(100)]
        self.deliver(sent)
        self.settle()
        port.doRead()
        assert writer.queued() == 0
        assert self.peer_received(100) == [p[:24] + packed(FAR) + p[40:] for p in sent]
        assert (writer.stats.sent, writer.stats.dropped) == (100, 0)

    # The writer -----------------------------------------------------------

    def test_writer_sends_everything_in_order(self) -> None:
        """150 packets queued: a full queue flushes itself, flush() sends the rest; the
        peer gets all of them, in order, byte for byte; stats count them."""
        writer = self.writer()
        sent = [udp_packet(NEAR, FAR, bytes([i % 256]) * (10 + i)) for i in range(150)]
        for p in sent:
            assert writer.write(bytearray(p))
        assert writer.queued() == 150 - 2 * mmsg.SLOTS
        assert writer.stats.sent == 2 * mmsg.SLOTS
        writer.flush()
        assert writer.queued() == 0
        assert self.peer_received(150) == sent
        assert (writer.stats.sent, writer.stats.dropped) == (150, 0)

    def test_writer_refusals_counted_others_go(self) -> None:
        """No route, too big: counted drops by errno name; the packets queued around
        them still go, in order."""
        writer = self.writer()
        batch = [udp_packet(NEAR, FAR, b"1"), udp_packet(NEAR, UNROUTED, b"2"),
                 udp_packet(NEAR, FAR, b"3" * 1600), udp_packet(NEAR, FAR, b"4")]  # fmt: skip
        for p in batch:
            writer.send(p)
        writer.flush()
        assert self.peer_received(2) == [batch[0], batch[3]]
        assert writer.stats.errors == {"ENETUNREACH": 1, "EMSGSIZE": 1}
        assert (writer.stats.sent, writer.stats.dropped) == (2, 2)

    def test_writer_destination_and_close(self) -> None:
        """A given destination is honoured; close() sends what is queued; after it a
        send is a counted drop."""
        writer = mmsg.BatchPacketWriter(self.system)
        writer.open()
        packet = udp_packet(NEAR, UNROUTED, b"7")  # routed by the given FAR, not UNROUTED
        writer.send(packet, FAR)
        assert writer.queued() == 1
        writer.close()
        assert self.peer_received(1) == [packet]
        assert writer.stats.sent == 1
        assert not writer.send(udp_packet(NEAR, FAR, b"8"))
        assert writer.stats.dropped == 1

    def test_queues_filled_directly(self) -> None:
        """The fast path's surface: a packet written straight into ``raw_route``'s
        queue (slot, iov_len, destination) goes out with ``flush_queue``; ``ready``
        says whether the writer is open."""
        writer = mmsg.BatchPacketWriter(self.system, slots=4)
        assert not writer.ready
        writer.open()
        self.addCleanup(writer.close)
        assert writer.ready
        queue, name = writer.raw_route
        assert name == 0 and writer.routes == {}
        sent = [udp_packet(NEAR, FAR, bytes([i]) * 20) for i in range(3)]
        for i, p in enumerate(sent):
            start = queue.start(i)
            queue.data[start : start + len(p)] = p
            queue.set_iov_length(i, len(p))
            queue.set_destination(i, packed(FAR))
        queue.queued = 3
        writer.flush_queue(queue)
        assert queue.queued == 0
        assert self.peer_received(3) == sent
        assert writer.stats.sent == 3

    def test_link_send_and_fallback(self) -> None:
        """A destination given a link-layer address goes out on the link socket to it,
        with no route needed (``routes``); once its entry is gone it takes the raw
        socket again (no route here: a counted ENETUNREACH)."""
        port = self.reader()
        writer = self.writer(slots=4)
        writer.use_link(port.fileno(), self.system.interface_index(INTERFACE))  # type: ignore[attr-defined]
        writer.set_link_neighbours({packed(UNROUTED): self.far_mac})
        assert set(writer.routes) == {packed(UNROUTED)}
        assert writer.link_destinations() == {packed(UNROUTED): self.far_mac}
        sent = [udp_packet(NEAR, UNROUTED, bytes([i]) * 30) for i in range(6)]
        for p in sent:
            assert writer.send(p)  # the fifth fills the 4-slot link queue: flushed
        writer.flush()
        assert self.peer_received(6) == sent
        assert (writer.stats.sent, writer.stats.dropped) == (6, 0)
        writer.set_link_neighbours({})
        assert writer.routes == {}
        writer.send(udp_packet(NEAR, UNROUTED, b"x"))
        writer.flush()
        assert writer.stats.errors == {"ENETUNREACH": 1}


class MemoryBatchPortTests(MemoryHarness, BatchPortContractMixin, SynchronousTestCase):
    """The batched port's contract, on the in-memory fake."""


class LinuxBatchPortTests(LinuxHarness, BatchPortContractMixin, SynchronousTestCase):
    """The batched port's contract, on the kernel."""

    def setUp(self) -> None:
        if not mmsg.available():
            raise SkipTest("no recvmmsg/sendmmsg here")
        super().setUp()


class MemoryBatchOnlyTests(SynchronousTestCase):
    """What only the fake can show of the batched calls."""

    def test_injected_send_failure_is_one_packet(self) -> None:
        """An injected ENOBUFS refuses one packet (the call stops before it, as
        sendmmsg does, and the retry gets the refusal); the others go, in order."""
        from lbproxy.testing import MemoryPacketSystem

        system = MemoryPacketSystem(["eth0"])
        writer = mmsg.BatchPacketWriter(system)
        writer.open()
        packets = [udp_packet(NEAR, FAR, bytes([i])) for i in range(4)]
        writer.send(packets[0])
        system.fail("send", errno.ENOBUFS)
        for p in packets[1:]:
            writer.send(p)
        writer.flush()
        assert [s.packet for s in system.sent] == packets[1:]
        assert writer.stats.errors == {"ENOBUFS": 1}
        self.flushLoggedErrors()

    def test_link_sends_recorded(self) -> None:
        """A packet sent on the link is recorded with its interface and link address."""
        from lbproxy.testing import MemoryPacketSystem, SentPacket

        system = MemoryPacketSystem(["eth0", "eth1"])
        reader = system.open_reader("eth1")
        writer = mmsg.BatchPacketWriter(system)
        writer.open()
        writer.use_link(reader, system.interface_index("eth1"))
        writer.set_link_neighbours({packed(FAR): b"\x02\x00\x00\x00\x00\x07"})
        packet = udp_packet(NEAR, FAR, b"hi")
        writer.send(packet)
        writer.flush()
        assert system.sent == [SentPacket(packet, FAR, "eth1", b"\x02\x00\x00\x00\x00\x07")]
        assert system.interface_index("eth0") == 2
