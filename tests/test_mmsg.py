"""Tests for lbproxy.io.mmsg: the batched reader and writer against the kernel.

Two network namespaces joined by a veth link per test (root needed; skipped with the
reason otherwise), addresses in 2001:db8::/32 only.  The batched ports must keep the
plain ports' contract: every packet, in order, byte for byte, the same statistics.
"""

from __future__ import annotations

import select
import socket
import struct
import subprocess
import time
from collections.abc import Callable

from twisted.internet.testing import MemoryReactor
from twisted.trial.unittest import SkipTest, SynchronousTestCase

from lbproxy.core.balancer import Balancer
from lbproxy.core.keys import KeyChain
from lbproxy.core.selection import Backend, scheduler_from_name
from lbproxy.core.table import StickyTable
from lbproxy.io import mmsg
from lbproxy.io.forwarder import ForwarderService
from lbproxy.io.rawsocket import LinuxPacketSystem, PacketReader, PacketWriter
from lbproxy.testing import MemoryPacketSystem, VethPair

NEAR = "2001:db8:7c::1"  # the side under test
FAR = "2001:db8:7c::2"  # the peer
ROUTED = "2001:db8:7d::/64"  # the peer routes this through the near side
TARGET = "2001:db8:7d::10"
UNROUTED = "2001:db8:dead::1"  # no route on the near side
PREFIX = "lbmm"


def packed(text: str) -> bytes:
    return socket.inet_pton(socket.AF_INET6, text)


def packet(src: str, dst: str, tag: int, size: int = 0) -> bytes:
    """An IPv6/UDP packet numbered `tag` (checksum left 0: nothing here checks it)."""
    payload = struct.pack("!I", tag) + b"p" * max(0, size - 52)
    udp = struct.pack("!HHHH", 4000, 5000, 8 + len(payload), 0) + payload
    return struct.pack("!IHBB", 6 << 28, len(udp), 17, 64) + packed(src) + packed(dst) + udp


def tag_of(data: bytes | bytearray) -> int:
    return int(struct.unpack_from("!I", data, 48)[0])


class BatchedPortTests(SynchronousTestCase):
    def setUp(self) -> None:
        reason = VethPair.unavailable() or (None if mmsg.available() else "no recvmmsg")
        if reason:
            raise SkipTest(f"batched port tests: {reason}")
        self.pair = VethPair(PREFIX, NEAR, FAR, ROUTED)
        self.addCleanup(self.pair.destroy)
        self.pair.create()
        self.near = LinuxPacketSystem(self.pair.near)
        self.far = LinuxPacketSystem(self.pair.far)
        self.far_sender = self.far.open_sender()
        self.addCleanup(self.far.close, self.far_sender)

    def deliver(self, packets: list[bytes]) -> None:
        """Send from the peer, then wait until the near side's interface counted them."""
        for p in packets:
            self.far.send(self.far_sender, p, socket.inet_ntop(socket.AF_INET6, p[24:40]))

    def reader(
        self, handle: Callable[[bytearray], object], **kw: object
    ) -> mmsg.BatchPacketReader:
        reader = mmsg.BatchPacketReader(
            self.near, MemoryReactor(), self.pair.near_interface, handle,
            destinations=[packed(TARGET)], receive_buffer=1 << 22, **kw,  # type: ignore[arg-type]
        )  # fmt: skip
        reader.open()
        self.addCleanup(reader.close)
        return reader

    def drain(self, reader: PacketReader, want: int) -> None:
        """Call doRead (as the reactor would) until `want` packets were handed over."""
        deadline = time.monotonic() + 5
        while reader.stats.received + reader.stats.oversize < want:
            if time.monotonic() > deadline:
                raise AssertionError(f"only {reader.stats.received} of {want} packets arrived")
            select.select([reader.fileno()], [], [], 0.05)
            reader.doRead()

    def test_reader_delivers_every_packet_in_order(self) -> None:
        """200 packets: all handed over, in order, byte for byte, as owned bytearrays;
        at most `batch` per wake-up; after_batch runs once per wake-up."""
        got: list[bytearray] = []
        flushes: list[int] = []
        reader = self.reader(got.append, batch=100, after_batch=lambda: flushes.append(1))
        sent = [packet(FAR, TARGET, i, size=60 + i) for i in range(200)]
        self.deliver(sent)
        self.drain(reader, 200)
        self.assertEqual([bytes(p) for p in got], sent)
        self.assertTrue(all(type(p) is bytearray for p in got))
        self.assertEqual(reader.stats.received, 200)
        self.assertGreaterEqual(reader.stats.wakeups, 2)  # batch=100 < 200
        self.assertEqual(len(flushes), reader.stats.wakeups)
        self.assertEqual(reader.stats.errors, 0)

    def test_oversize_and_handler_errors_counted(self) -> None:
        """A packet larger than max_packet and a handler that raises are counted;
        the packets around them still arrive."""
        got: list[int] = []

        def handle(p: bytearray) -> None:
            if tag_of(p) == 2:
                raise ValueError("boom")
            got.append(tag_of(p))

        reader = self.reader(handle, max_packet=300)
        self.deliver([packet(FAR, TARGET, 1), packet(FAR, TARGET, 9, size=400),
                      packet(FAR, TARGET, 2), packet(FAR, TARGET, 3)])  # fmt: skip
        self.drain(reader, 4)
        self.assertEqual(got, [1, 3])
        self.assertEqual(reader.stats.oversize, 1)
        self.assertEqual(reader.stats.handler_errors, 1)
        self.assertEqual(reader.stats.received, 3)
        self.flushLoggedErrors(ValueError)

    def test_reader_emits_handler_results(self) -> None:
        """With ``emit``, each handler result that is not None is emitted, in order;
        a None result is not; an emit failure is a counted handler error and the
        packets after it still go."""
        emitted: list[int] = []

        def handle(p: bytearray) -> bytearray | None:
            return None if tag_of(p) == 2 else p

        def emit(p: bytearray) -> None:
            if tag_of(p) == 3:
                raise ValueError("boom")
            emitted.append(tag_of(p))

        reader = self.reader(handle, emit=emit)
        self.deliver([packet(FAR, TARGET, i) for i in (1, 2, 3, 4)])
        self.drain(reader, 4)
        self.assertEqual(emitted, [1, 4])
        self.assertEqual(reader.stats.handler_errors, 1)
        self.assertEqual(reader.stats.received, 4)
        self.flushLoggedErrors(ValueError)

    def test_reader_when_nothing_queued(self) -> None:
        """A wake-up with nothing queued is no error and delivers nothing."""
        got: list[bytearray] = []
        reader = self.reader(got.append)
        reader.doRead()
        self.assertEqual((got, reader.stats.errors, reader.stats.received), ([], 0, 0))

    def far_reader(self) -> tuple[int, Callable[[int], list[bytes]]]:
        fd = self.far.open_reader(self.pair.far_interface, [packed(FAR)], 1 << 22)
        self.addCleanup(self.far.close, fd)

        def received(count: int) -> list[bytes]:
            out: list[bytes] = []
            buffer = bytearray(65575)
            deadline = time.monotonic() + 5
            while len(out) < count and time.monotonic() < deadline:
                select.select([fd], [], [], 0.05)
                try:
                    n = self.far.receive(fd, buffer)
                except BlockingIOError:
                    continue
                out.append(bytes(buffer[:n]))
            return out

        return fd, received

    def writer(self) -> mmsg.BatchPacketWriter:
        writer = mmsg.BatchPacketWriter(self.near)
        writer.open()
        self.addCleanup(writer.close)
        return writer

    def test_writer_sends_everything_in_order(self) -> None:
        """150 packets queued: a full queue flushes itself, flush() sends the rest; the
        peer gets all of them, in order, byte for byte; stats count them."""
        _, received = self.far_reader()
        writer = self.writer()
        sent = [packet(NEAR, FAR, i, size=60 + i) for i in range(150)]
        for p in sent:
            self.assertTrue(writer.send(bytearray(p)))
        self.assertEqual(writer.queued(), 150 - 2 * mmsg.SLOTS)
        self.assertEqual(writer.stats.sent, 2 * mmsg.SLOTS)
        writer.flush()
        self.assertEqual(writer.queued(), 0)
        self.assertEqual(received(150), sent)
        self.assertEqual((writer.stats.sent, writer.stats.dropped), (150, 0))

    def test_writer_refusal_is_counted_and_others_go(self) -> None:
        """A packet with no route is a counted drop (ENETUNREACH); those queued around
        it are still sent, in order."""
        _, received = self.far_reader()
        writer = self.writer()
        batch = [packet(NEAR, FAR, 1), packet(NEAR, UNROUTED, 2), packet(NEAR, FAR, 3)]
        for p in batch:
            writer.send(p)
        writer.flush()
        self.assertEqual([tag_of(p) for p in received(2)], [1, 3])
        self.assertEqual(writer.stats.sent, 2)
        self.assertEqual(writer.stats.dropped, 1)
        self.assertEqual(writer.stats.errors, {"ENETUNREACH": 1})
        self.flushLoggedErrors()

    def test_writer_explicit_destination_and_close_flushes(self) -> None:
        """``destination`` given as text is honoured; close() sends what is queued."""
        _, received = self.far_reader()
        writer = mmsg.BatchPacketWriter(self.near)
        writer.open()
        writer.send(packet(NEAR, FAR, 7), FAR)
        self.assertEqual(writer.queued(), 1)
        writer.close()
        self.assertEqual([tag_of(p) for p in received(1)], [7])
        self.assertEqual(writer.stats.sent, 1)
        self.assertFalse(writer.send(packet(NEAR, FAR, 8)))  # closed: a counted drop
        self.assertEqual(writer.stats.dropped, 1)
        self.flushLoggedErrors()


    def test_neighbour_table_reads_the_link(self) -> None:
        """The netlink dump of the near interface (in its namespace) has the far side's
        static entry with its MAC, and nothing of other interfaces (loopback)."""
        table = mmsg.NeighbourTable(self.pair.near_interface, self.pair.near)
        self.addCleanup(table.close)
        found = table.read()
        self.assertEqual(found.get(packed(FAR)), bytes.fromhex(VethPair.far_mac.replace(":", "")))
        self.assertNotIn(packed("::1"), found)
        self.assertEqual(table.read(), found)  # the socket is reusable

    def test_writer_link_send_and_fallback(self) -> None:
        """A destination given a link-layer address goes out on the link socket, with
        no route needed; once its entry is gone it takes the raw socket again (which
        has no route for it here: a counted ENETUNREACH drop); others always do."""
        fd = self.far.open_reader(self.pair.far_interface, [packed(UNROUTED), packed(FAR)],
                                  1 << 22)  # fmt: skip
        self.addCleanup(self.far.close, fd)
        link_fd = self.near.open_reader(self.pair.near_interface, [packed(TARGET)])
        writer = self.writer()
        self.addCleanup(self.near.close, link_fd)  # after the writer's close (LIFO)
        table = mmsg.NeighbourTable(self.pair.near_interface, self.pair.near)
        self.addCleanup(table.close)
        writer.use_link(link_fd, table.ifindex)
        far_mac = bytes.fromhex(VethPair.far_mac.replace(":", ""))
        writer.set_link_neighbours({packed(UNROUTED): far_mac})
        self.assertEqual(writer.link_destinations(), {packed(UNROUTED): far_mac})
        for i in range(3):
            self.assertTrue(writer.send(packet(NEAR, UNROUTED, i)))
        writer.send(packet(NEAR, FAR, 9))  # raw socket, routed by the kernel
        self.assertEqual(writer.queued(), 4)
        writer.flush()
        self.assertEqual((writer.stats.sent, writer.stats.dropped), (4, 0))
        got: list[int] = []
        buffer = bytearray(2048)
        deadline = time.monotonic() + 5
        while len(got) < 4 and time.monotonic() < deadline:
            select.select([fd], [], [], 0.05)
            try:
                got.append(tag_of(buffer[: self.far.receive(fd, buffer)]))
            except BlockingIOError:
                continue
        self.assertEqual(sorted(got), [0, 1, 2, 9])
        writer.set_link_neighbours({})
        writer.send(packet(NEAR, UNROUTED, 5))
        writer.flush()
        self.assertEqual(writer.stats.errors, {"ENETUNREACH": 1})
        self.flushLoggedErrors()


    def test_forwarder_sends_to_backends_on_the_link(self) -> None:
        """A started ForwarderService gives its writer the link-layer addresses of its
        backends only (not of other neighbours), refreshes them on its clock, and a
        backend whose entry is gone leaves the link within one interval."""
        import ipaddress

        from twisted.internet.task import Clock

        other = "2001:db8:7c::99"
        subprocess.run(["ip", "-n", self.pair.near, "neigh", "replace", other, "lladdr",
                        "02:00:5e:10:00:99", "dev", self.pair.near_interface],
                       check=True, timeout=30)  # fmt: skip
        clock = Clock()
        balancer = Balancer(
            chain=KeyChain.from_names(["hoa", "src"]),
            table=StickyTable(clock, 60.0, 100),
            scheduler=scheduler_from_name("round_robin"),
            backends=[Backend("far", ipaddress.IPv6Address(FAR))],
            virtual_addresses=[ipaddress.IPv6Address(TARGET)],
            clock=clock,
        )
        service = ForwarderService(
            balancer, self.near, MemoryReactor(), clock,
            client_interface=self.pair.near_interface,
            server_interface=self.pair.near_interface, own_addresses=(),
        )  # fmt: skip
        service.startService()
        self.addCleanup(service.stopService)
        assert isinstance(service.writer, mmsg.BatchPacketWriter)
        far_mac = bytes.fromhex(VethPair.far_mac.replace(":", ""))
        self.assertEqual(service.writer.link_destinations(), {packed(FAR): far_mac})
        subprocess.run(["ip", "-n", self.pair.near, "neigh", "del", FAR, "dev",
                        self.pair.near_interface], check=True, timeout=30)  # fmt: skip
        clock.advance(service.neighbour_interval)
        self.assertEqual(service.writer.link_destinations(), {})


class ChoiceTests(SynchronousTestCase):
    """ForwarderService uses the batched ports with the real system only."""

    def service(self, system: object, batch_io: bool | None = None) -> ForwarderService:
        import ipaddress

        from twisted.internet.task import Clock

        clock = Clock()
        balancer = Balancer(
            chain=KeyChain.from_names(["hoa", "src"]),
            table=StickyTable(clock, 60.0, 100),
            scheduler=scheduler_from_name("round_robin"),
            backends=[],
            virtual_addresses=[ipaddress.IPv6Address(TARGET)],
            clock=clock,
        )
        return ForwarderService(balancer, system, MemoryReactor(), clock,  # type: ignore[arg-type]
                                client_interface="c", server_interface="s",
                                batch_io=batch_io)  # fmt: skip

    def test_fake_system_plain_ports(self) -> None:
        """The in-memory fake keeps the plain reader and writer."""
        service = self.service(MemoryPacketSystem(["c", "s"]))
        self.assertIs(type(service.writer), PacketWriter)
        self.assertIs(type(service.client), PacketReader)

    def test_linux_system_batched_ports(self) -> None:
        """The Linux system gets the batched ones (when the C library has them), unless
        turned off."""
        if not mmsg.available():
            raise SkipTest("no recvmmsg/sendmmsg here")
        service = self.service(LinuxPacketSystem())
        self.assertIsInstance(service.writer, mmsg.BatchPacketWriter)
        self.assertIsInstance(service.client, mmsg.BatchPacketReader)
        self.assertIsInstance(service.server, mmsg.BatchPacketReader)
        plain = self.service(LinuxPacketSystem(), batch_io=False)
        self.assertIs(type(plain.writer), PacketWriter)
