"""Tests for lbproxy.io.mmsg beyond the batched port's contract (tests/test_batchport.py).

The `Batch` layout against the ctypes structures, the callable form's keywords the
forwarder uses (on the fake), and the forwarder on the batched ports against the
kernel: two network namespaces joined by a veth link per test (root needed; skipped
with the reason otherwise), addresses in 2001:db8::/32 only.
"""

from __future__ import annotations

import ctypes
import socket
import struct
import subprocess
from collections.abc import Callable
from typing import Any

from twisted.internet.testing import MemoryReactor
from twisted.trial.unittest import SkipTest, SynchronousTestCase

from lbproxy.core.balancer import Balancer
from lbproxy.core.keys import KeyChain
from lbproxy.core.selection import Backend, scheduler_from_name
from lbproxy.core.table import StickyTable
from lbproxy.io import mmsg, neighbours
from lbproxy.io.forwarder import ForwarderService
from lbproxy.io.rawsocket import LinuxPacketSystem, PacketProtocol, PacketReader, PacketWriter
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


def tag_of(data: bytes | bytearray | memoryview) -> int:
    return int(struct.unpack_from("!I", data, 48)[0])


class BatchLayoutTests(SynchronousTestCase):
    """`Batch`'s accessors and stride constants name the very fields the kernel reads
    and writes (checked against the ctypes structures)."""

    def setUp(self) -> None:
        if not mmsg._LAYOUT_OK:
            raise SkipTest("not the LP64 mmsghdr layout")

    def test_received_fields(self) -> None:
        """length/set_length is msg_len, truncated is MSG_TRUNC in msg_flags, packet(i)
        the slot's bytes; set_received lays a packet out as recvmmsg does."""
        batch = mmsg.Batch(3, 100)
        batch.set_length(1, 1234)
        assert batch.headers[1].len == 1234 == batch.length(1)
        assert batch.lengths[mmsg.LENGTH_STRIDE * 1 + mmsg.LENGTH_AT] == 1234
        big = bytes(range(150))
        batch.set_received(2, big)
        assert (batch.headers[2].len, batch.length(2)) == (150, 150)
        assert batch.headers[2].hdr.flags == socket.MSG_TRUNC and batch.truncated(2)
        assert bytes(batch.packet(2)) == big[:100]
        assert batch.start(2) == 200 and batch.iovecs[2].base == batch.iovecs[0].base + 200
        batch.set_received(0, b"small")
        assert not batch.truncated(0) and bytes(batch.packet(0)) == b"small"
        assert batch.at(2) == batch.address + 2 * ctypes.sizeof(mmsg._MMsgHdr)

    def test_queued_fields(self) -> None:
        """set_iov_length is iov_len, set_name msg_name, set_destination the address
        of an addressed slot's own sockaddr_in6; append fills all three."""
        batch = mmsg.Batch(4, 64, addressed=True)
        batch.set_iov_length(3, 42)
        assert batch.iovecs[3].len == 42 == batch.iov_length(3)
        batch.set_destination(1, packed(FAR))
        sockaddr = ctypes.string_at(batch.headers[1].hdr.name, batch.headers[1].hdr.namelen)
        assert struct.unpack("=HHI16sI", sockaddr) == (socket.AF_INET6, 0, 0, packed(FAR), 0)
        assert batch.destination(1) == packed(FAR) and batch.name(1) == batch.headers[1].hdr.name
        assert batch.append(b"abc", 0, packed(TARGET)) == 1
        assert (bytes(batch.queued_packet(0)), batch.destination(0)) == (b"abc", packed(TARGET))
        link = mmsg.Batch(2, 64)
        link.append(b"xyz", 0xDEADBEEF)
        assert link.headers[0].hdr.name == 0xDEADBEEF == link.name(0)
        link.append(b"!", 1)
        self.assertRaises(IndexError, link.append, b"full", 1)

    def test_writer_send_lays_out_as_append(self) -> None:
        """`BatchPacketWriter.send` fills its queue's slot inline (the general path's
        every packet): the same bytes, iov_len, msg_name and sockaddr_in6 as
        `Batch.append`, on the raw socket's queue and on the link's."""
        system = MemoryPacketSystem(["c"])
        writer = mmsg.BatchPacketWriter(system, slots=4)
        writer.open()
        self.addCleanup(writer.close)
        writer.use_link(system.open_reader("c"), system.interface_index("c"))
        writer.set_link_neighbours({packed(FAR): b"\x02\x00\x00\x00\x00\x07"})
        sent = [packet(NEAR, FAR, 1), packet(NEAR, TARGET, 2, 90),
                packet(NEAR, FAR, 3, 70), packet(NEAR, UNROUTED, 4, 61)]  # fmt: skip
        for p in sent:
            assert writer.send(p)
        raw, _ = writer.raw_route
        link, name = writer.route(packed(FAR))
        assert name and link is not raw
        want_raw = mmsg.Batch(raw.count, raw.slot, addressed=True)
        want_link = mmsg.Batch(link.count, link.slot)
        for p in sent:
            if p[24:40] == packed(FAR):
                want_link.append(p, name)
            else:
                want_raw.append(p, 0, p[24:40])
        for got, want in ((raw, want_raw), (link, want_link)):
            assert got.queued == want.queued == 2
            for i in range(want.queued):
                assert bytes(got.queued_packet(i)) == bytes(want.queued_packet(i))
                assert got.iov_length(i) == want.iov_length(i)
            if got is raw:
                assert [got.destination(i) for i in range(2)] == [
                    want.destination(i) for i in range(2)] == [packed(TARGET), packed(UNROUTED)]
            else:
                assert [got.name(i) for i in range(2)] == [want.name(i) for i in range(2)]


def memory_reader(
    handle: Callable[[bytearray], object], **kw: Any
) -> tuple[MemoryPacketSystem, mmsg.BatchPacketReader]:
    system = MemoryPacketSystem(["c"])
    reader = mmsg.BatchPacketReader(system, MemoryReactor(), "c", handle, **kw)
    reader.open()
    return system, reader


class HandlerKeywordTests(SynchronousTestCase):
    """The callable form and its keywords (``after_batch``, ``emit``, ``fast``), as the
    forwarder uses them, on the fake (the port is the same class on the kernel)."""

    def setUp(self) -> None:
        if not mmsg._LAYOUT_OK:
            raise SkipTest("not the LP64 mmsghdr layout")

    def test_after_batch_once_per_wake_up(self) -> None:
        """after_batch runs at the end of every wake-up, whatever happened in it."""
        got: list[bytearray] = []
        flushes: list[int] = []
        system, reader = memory_reader(got.append, batch=100,
                                       after_batch=lambda: flushes.append(1))  # fmt: skip
        for i in range(150):
            system.inject("c", packet(FAR, TARGET, i))
        reader.doRead()
        reader.doRead()
        reader.doRead()
        assert [tag_of(p) for p in got] == list(range(150))
        assert len(flushes) == reader.stats.wakeups == 3

    def test_emit_handler_results(self) -> None:
        """With ``emit``, each handler result that is not None is emitted, in order; an
        emit failure is a counted handler error and the packets after it still go."""
        emitted: list[int] = []

        def handle(p: bytearray) -> bytearray | None:
            return None if tag_of(p) == 2 else p

        def emit(p: bytearray) -> None:
            if tag_of(p) == 3:
                raise ValueError("boom")
            emitted.append(tag_of(p))

        system, reader = memory_reader(handle, emit=emit)
        for i in (1, 2, 3, 4):
            system.inject("c", packet(FAR, TARGET, i))
        reader.doRead()
        assert emitted == [1, 4]
        assert (reader.stats.handler_errors, reader.stats.received) == (1, 4)
        assert len(self.flushLoggedErrors(ValueError)) == 1

    def test_fast_gets_the_batch(self) -> None:
        """``fast(data, slot, lengths, count, other)`` gets each batch as recvmmsg left
        it; ``other(start, length)`` is the per-packet handling."""
        got: list[int] = []
        calls: list[int] = []

        def fast(data: memoryview, slot: int, lengths: memoryview, count: int,
                 other: Callable[[int, int], object]) -> None:  # fmt: skip
            calls.append(count)
            for i in range(count):
                n = lengths[mmsg.LENGTH_STRIDE * i + mmsg.LENGTH_AT]
                if tag_of(data[i * slot : i * slot + n]) % 2:
                    other(i * slot, n)

        system, reader = memory_reader(lambda p: got.append(tag_of(p)), fast=fast)
        for i in range(100):
            system.inject("c", packet(FAR, TARGET, i))
        reader.doRead()
        assert calls == [64, 36]
        assert got == list(range(1, 100, 2))

    def test_keywords_need_a_handler(self) -> None:
        """emit and fast belong to the callable form; a protocol says it itself."""
        system = MemoryPacketSystem(["c"])
        self.assertRaises(TypeError, mmsg.BatchPacketReader, system, MemoryReactor(), "c",
                          PacketProtocol(), emit=print)  # fmt: skip

    def test_batched_ports_need_batched_calls(self) -> None:
        """A system without recvmmsg/sendmmsg is refused at once."""

        class Plain:
            pass

        self.assertRaises(RuntimeError, mmsg.BatchPacketWriter, Plain())
        self.assertRaises(RuntimeError, mmsg.BatchPacketReader, Plain(), MemoryReactor(),
                          "c", print)  # fmt: skip


class BatchedForwarderTests(SynchronousTestCase):
    """The forwarder on the batched ports, against the kernel (root needed)."""

    def setUp(self) -> None:
        reason = VethPair.unavailable() or (None if mmsg.available() else "no recvmmsg")
        if reason:
            raise SkipTest(f"batched port tests: {reason}")
        self.pair = VethPair(PREFIX, NEAR, FAR, ROUTED)
        self.addCleanup(self.pair.destroy)
        self.pair.create()
        self.near = LinuxPacketSystem(self.pair.near)

    def test_neighbour_table_reexported(self) -> None:
        """mmsg.NeighbourTable is lbproxy.io.neighbours' (the forwarder imports it here)."""
        assert mmsg.NeighbourTable is neighbours.NeighbourTable

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
