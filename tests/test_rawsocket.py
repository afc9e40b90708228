"""Tests for lbproxy.io.rawsocket and its fake, lbproxy.testing.MemoryPacketSystem.

The contract mixin runs twice: against the in-memory fake and against the
Linux kernel (two network namespaces joined by veth, built per test; root
only).  What the fake promises is therefore checked against the real thing.
The two harnesses (`MemoryHarness`, `LinuxHarness`) also carry the batched
port's contract (tests/test_batchport.py).
"""

from __future__ import annotations

import errno
import select
import socket
import struct
import time
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING

from hypothesis import given
from hypothesis import strategies as st
from twisted.internet import reactor as global_reactor
from twisted.internet import task
from twisted.internet.defer import Deferred
from twisted.internet.error import ConnectionDone
from twisted.internet.interfaces import IReactorFDSet, IReactorTime, IReadDescriptor
from twisted.internet.testing import MemoryReactor
from twisted.python.failure import Failure
from twisted.trial.unittest import SkipTest, SynchronousTestCase, TestCase
from zope.interface.verify import verifyObject

from lbproxy.io.rawsocket import (
    IPacketProtocol,
    IPacketSystem,
    IPacketTransport,
    IPacketWriter,
    LinuxPacketSystem,
    PacketProtocol,
    PacketReader,
    PacketWriter,
    destination_filter,
)
from lbproxy.testing import MemoryPacketSystem, VethPair

NEAR = "2001:db8:7a::1"  # the balancer's side of the link
FAR = "2001:db8:7a::2"  # the peer
VIRTUAL1 = "2001:db8:7b::10"  # routed by the peer through the balancer
VIRTUAL2 = "2001:db8:7b::20"
UNROUTED = "2001:db8:dead::1"  # no route on the balancer's side
FENCE = "2001:db8:7b::ff"  # marks the end of a delivery (real harness)
PREFIX = "lbrs"
INTERFACE = "lbrsa"


def _ignore(packet: bytearray) -> None:
    """A handler that drops everything."""


class Collector(PacketProtocol):
    """Keeps every packet, and what happened to the connection."""

    def __init__(self) -> None:
        self.packets: list[bytearray] = []
        self.connected: list[object] = []
        self.lost: list[Failure] = []

    def connectionMade(self) -> None:
        self.connected.append(self.transport)

    def packetReceived(self, packet: bytearray) -> None:
        self.packets.append(packet)

    def connectionLost(self, reason: Failure) -> None:
        self.lost.append(reason)


def packed(text: str) -> bytes:
    return socket.inet_pton(socket.AF_INET6, text)


def udp_packet(src: str, dst: str, payload: bytes, sport: int = 4000, dport: int = 5000) -> bytes:
    """An IPv6/UDP packet with a correct checksum (built by hand: no scapy needed)."""
    length = 8 + len(payload)
    pseudo = packed(src) + packed(dst) + struct.pack("!IxxxB", length, 17)
    udp = struct.pack("!HHHH", sport, dport, length, 0) + payload
    data = pseudo + udp + (b"\0" if len(udp) % 2 else b"")
    total = sum(struct.unpack(f"!{len(data) // 2}H", data))
    while total >> 16:
        total = (total & 0xFFFF) + (total >> 16)
    checksum = (~total & 0xFFFF) or 0xFFFF
    udp = udp[:6] + struct.pack("!H", checksum) + udp[8:]
    header = struct.pack("!IHBB", 6 << 28, length, 17, 64) + packed(src) + packed(dst)
    return header + udp


def to(dst: str, tag: int, size: int = 0) -> bytes:
    """A packet from the peer to ``dst``, numbered ``tag``, ``size`` bytes if given."""
    payload = struct.pack("!I", tag)
    if size:
        payload += b"p" * (size - 48 - len(payload))
    return udp_packet(FAR, dst, payload)


if TYPE_CHECKING:
    _MixinBase = SynchronousTestCase
else:
    _MixinBase = object


class PacketSystemContractMixin(_MixinBase):
    """What every IPacketSystem, and the port on top of it, must do.

    A test class provides ``system``, ``deliver(packets)`` (the peer sends
    them over the link), ``settle()`` (wait until the kernel queued them),
    ``peer_received(count)``, ``link_down()`` and ``link_up()``.
    """

    system: IPacketSystem

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
        destinations: Sequence[str] = (),
        protocol: IPacketProtocol | None = None,
        writer: PacketWriter | None = None,
        **kwargs: int,
    ) -> tuple[PacketReader, list[bytearray], MemoryReactor]:
        collector = Collector()
        memory = MemoryReactor()
        kwargs.setdefault("receive_buffer", 1 << 22)
        port = PacketReader(
            self.system,
            memory,
            INTERFACE,
            protocol or collector,
            writer=writer,
            destinations=[packed(d) for d in destinations],
            **kwargs,
        )
        port.open()
        self.addCleanup(port.close)
        port.startReading()
        return port, collector.packets, memory

    def writer(self) -> PacketWriter:
        port = PacketWriter(self.system)
        port.open()
        self.addCleanup(port.close)
        return port

    def test_provides_interface(self) -> None:
        """The system provides IPacketSystem; the reader is a read descriptor and its
        protocol's transport; the writer an IPacketWriter."""
        assert verifyObject(IPacketSystem, self.system)
        port, _, memory = self.reader(writer=self.writer())
        assert verifyObject(IReadDescriptor, port)
        assert verifyObject(IPacketTransport, port)
        assert verifyObject(IPacketProtocol, port.protocol)
        assert verifyObject(IPacketWriter, self.writer())
        assert port in memory.getReaders()

    def test_protocol_life_cycle(self) -> None:
        """open() connects the protocol to the reader (its transport), close() tells it
        the connection is lost, once; the protocol's packets arrive in between."""
        protocol = Collector()
        port = PacketReader(self.system, MemoryReactor(), INTERFACE, protocol,
                            destinations=[packed(VIRTUAL1)])  # fmt: skip
        self.addCleanup(port.close)
        assert protocol.connected == []
        port.open()
        assert protocol.connected == [port]
        assert protocol.transport is port
        self.deliver([to(VIRTUAL1, 1)])
        self.settle()
        port.doRead()
        assert [bytes(p) for p in protocol.packets] == [to(VIRTUAL1, 1)]
        port.close()
        port.close()
        assert len(protocol.lost) == 1
        protocol.lost[0].trap(ConnectionDone)

    def test_transport_writes_through_writer(self) -> None:
        """A protocol writes with ``transport.write``: the reader's writer sends it.  A
        reader without a writer refuses (a counted handler error)."""

        class Echo(PacketProtocol):
            def packetReceived(self, packet: bytearray) -> None:
                assert self.transport is not None
                packet[24:40] = packed(FAR)  # back to the peer
                self.transport.write(packet)

        writer = self.writer()
        port, _, _ = self.reader([VIRTUAL1], protocol=Echo(), writer=writer)
        self.deliver([to(VIRTUAL1, i) for i in range(3)])
        self.settle()
        port.doRead()
        expected = [to(VIRTUAL1, i)[:24] + packed(FAR) + to(VIRTUAL1, i)[40:] for i in range(3)]
        assert self.peer_received(3) == expected
        assert writer.stats.sent == 3
        lonely, _, _ = self.reader([VIRTUAL1], protocol=Echo())
        self.deliver([to(VIRTUAL1, 9)])
        self.settle()
        lonely.doRead()
        assert lonely.stats.handler_errors == 1
        assert len(self.flushLoggedErrors(RuntimeError)) == 1

    def test_handler_callable(self) -> None:
        """A plain callable in place of a protocol is its ``packetReceived``."""
        got: list[bytearray] = []
        port = PacketReader(self.system, MemoryReactor(), INTERFACE, got.append,
                            destinations=[packed(VIRTUAL1)])  # fmt: skip
        port.open()
        self.addCleanup(port.close)
        self.deliver([to(VIRTUAL1, 5)])
        self.settle()
        port.doRead()
        assert [bytes(p) for p in got] == [to(VIRTUAL1, 5)]
        self.assertRaises(TypeError, PacketReader, self.system, MemoryReactor(), INTERFACE,
                          object())  # fmt: skip

    def test_receive_intact(self) -> None:
        """A packet from the peer reaches the handler byte for byte, as a bytearray."""
        port, received, _ = self.reader([VIRTUAL1])
        packets = [to(VIRTUAL1, 1), to(VIRTUAL1, 2, size=1280), to(VIRTUAL1, 3, size=1500)]
        self.deliver(packets)
        self.settle()
        port.doRead()
        assert [bytes(p) for p in received] == packets
        assert all(type(p) is bytearray for p in received)
        assert port.stats.received == 3

    def test_handler_owns_packets(self) -> None:
        """Packets kept by the handler are not overwritten by later receives."""
        port, received, _ = self.reader([VIRTUAL1])
        packets = [to(VIRTUAL1, i, size=100 + i) for i in range(20)]
        self.deliver(packets)
        self.settle()
        port.doRead()
        received[0][40] ^= 0xFF  # the handler may mutate its own copy
        assert bytes(received[0]) != packets[0]
        assert [bytes(p) for p in received[1:]] == packets[1:]

    def test_burst_drained_in_batches(self) -> None:
        """One wake-up drains up to ``batch`` packets; a burst takes few wake-ups."""
        port, received, _ = self.reader([VIRTUAL1], batch=64)
        packets = [to(VIRTUAL1, i) for i in range(200)]
        self.deliver(packets)
        self.settle()
        port.doRead()
        assert len(received) == 64
        for _ in range(3):
            port.doRead()
        assert [bytes(p) for p in received] == packets
        assert port.stats.wakeups == 4
        port.doRead()  # nothing queued: a harmless empty wake-up
        assert port.stats.received == 200
        assert port.stats.errors == 0

    def test_opened_before_reading(self) -> None:
        """Packets arriving after open() but before startReading() are kept."""
        memory = MemoryReactor()
        collector = Collector()
        received = collector.packets
        port = PacketReader(
            self.system, memory, INTERFACE, collector, destinations=[packed(VIRTUAL1)]
        )
        port.open()
        self.addCleanup(port.close)
        assert port.fileno() >= 0
        assert memory.getReaders() == []
        self.deliver([to(VIRTUAL1, 7)])
        self.settle()
        port.startReading()
        assert memory.getReaders() == [port]
        port.doRead()
        assert [bytes(p) for p in received] == [to(VIRTUAL1, 7)]
        port.stopReading()
        assert memory.getReaders() == []
        port.close()
        port.close()
        assert port.fileno() == -1

    def test_filter(self) -> None:
        """With destinations, only packets to them are read; the filter can change."""
        port, received, _ = self.reader([VIRTUAL1])
        self.deliver([to(VIRTUAL2, 1), to(VIRTUAL1, 2), to(VIRTUAL2, 3)])
        self.settle()
        port.doRead()
        assert [bytes(p) for p in received] == [to(VIRTUAL1, 2)]
        port.set_destinations([packed(VIRTUAL2)])
        self.deliver([to(VIRTUAL1, 4), to(VIRTUAL2, 5)])
        self.settle()
        port.doRead()
        assert [bytes(p) for p in received[1:]] == [to(VIRTUAL2, 5)]
        port.set_destinations([])
        self.deliver([to(VIRTUAL1, 6), to(VIRTUAL2, 7)])
        self.settle()
        port.doRead()
        ours = [bytes(p) for p in received[2:] if p[24:40] in (packed(VIRTUAL1), packed(VIRTUAL2))]
        assert ours == [to(VIRTUAL1, 6), to(VIRTUAL2, 7)]

    def test_oversize_counted(self) -> None:
        """A packet larger than the receive buffer is counted and dropped, not truncated."""
        port, received, _ = self.reader([VIRTUAL1], max_packet=200)
        self.deliver([to(VIRTUAL1, 1, size=300), to(VIRTUAL1, 2, size=200)])
        self.settle()
        port.doRead()
        assert [bytes(p) for p in received] == [to(VIRTUAL1, 2, size=200)]
        assert port.stats.oversize == 1
        assert port.stats.received == 1

    def test_kernel_drops_counted(self) -> None:
        """A burst larger than the queue: every packet is either read or counted dropped."""
        port, received, _ = self.reader([VIRTUAL1], batch=1000)
        small, _, _ = self.reader(
            [VIRTUAL1], protocol=PacketProtocol(), batch=1000, receive_buffer=32 * 1024
        )
        self.deliver([to(VIRTUAL1, i) for i in range(300)])
        self.settle()
        port.doRead()
        small.doRead()
        assert port.update_stats().kernel_drops == 0
        assert len(received) == 300
        stats = small.update_stats()
        assert stats.kernel_drops > 0, stats
        assert stats.received + stats.kernel_drops == 300, stats
        assert small.update_stats().kernel_drops == stats.kernel_drops  # not counted twice

    def test_send_reaches_peer(self) -> None:
        """A sent packet leaves on the link intact, routed by its destination."""
        port = self.writer()
        packet = udp_packet(NEAR, FAR, b"hello")
        assert port.send(bytearray(packet))
        assert port.send(memoryview(packet), FAR)
        assert self.peer_received(2) == [packet, packet]
        assert port.stats.sent == 2
        assert port.stats.dropped == 0

    def test_outgoing_not_read(self) -> None:
        """What this host sends out of the interface never reaches the reader."""
        reader, received, _ = self.reader()
        writer = self.writer()
        packet = udp_packet(NEAR, FAR, b"outgoing")
        for _ in range(5):
            assert writer.send(packet)
        assert self.peer_received(5) == [packet] * 5
        self.settle()
        reader.doRead()
        assert not [p for p in received if p[8:24] == packed(NEAR)]

    def test_send_errors_counted(self) -> None:
        """Unroutable, oversized and malformed sends are counted drops, never raised."""
        port = self.writer()
        assert not port.send(udp_packet(NEAR, UNROUTED, b"x"))
        assert not port.send(udp_packet(NEAR, FAR, b"x" * 2000))
        assert not port.send(b"\x60" * 20)
        assert port.stats.errors == {"ENETUNREACH": 1, "EMSGSIZE": 1, "EINVAL": 1}
        assert port.stats.dropped == 3
        assert port.stats.sent == 0
        assert port.send(udp_packet(NEAR, FAR, b"after"))
        assert self.peer_received(1) == [udp_packet(NEAR, FAR, b"after")]

    def test_handler_exception_counted(self) -> None:
        """A handler that raises is logged and counted; the next packets are still read."""
        got: list[bytes] = []

        class Buggy(PacketProtocol):
            def packetReceived(self, packet: bytearray) -> None:
                if packet[51] == 1:  # the low byte of the tag (payload at 48)
                    raise ZeroDivisionError("handler bug")
                got.append(bytes(packet))

        memory = MemoryReactor()
        port = PacketReader(self.system, memory, INTERFACE, Buggy(),
                            destinations=[packed(VIRTUAL1)])  # fmt: skip
        port.open()
        self.addCleanup(port.close)
        port.startReading()
        self.deliver([to(VIRTUAL1, 0), to(VIRTUAL1, 1), to(VIRTUAL1, 2)])
        self.settle()
        port.doRead()
        assert got == [to(VIRTUAL1, 0), to(VIRTUAL1, 2)]
        assert port.stats.handler_errors == 1
        assert port.stats.received == 3
        assert len(self.flushLoggedErrors(ZeroDivisionError)) == 1

    def test_link_down_counted(self) -> None:
        """A link going down is a counted receive error; reading resumes when it is back."""
        port, received, memory = self.reader([VIRTUAL1])
        self.link_down()  # the kernel flags the socket before `ip` returns
        port.doRead()
        assert port.stats.errors == 1
        assert port in memory.getReaders()
        self.link_up()
        self.deliver([to(VIRTUAL1, 9)])
        self.settle()
        port.doRead()
        assert [bytes(p) for p in received] == [to(VIRTUAL1, 9)]

    def test_unknown_interface(self) -> None:
        """Opening a reader on a missing interface raises ENODEV."""
        protocol = Collector()
        port = PacketReader(self.system, MemoryReactor(), "lbrs-nosuch", protocol)
        with self.assertRaises(OSError) as caught:
            port.open()
        assert caught.exception.errno == errno.ENODEV
        assert port.fileno() == -1
        assert protocol.connected == []


class MemoryHarness(_MixinBase):
    """The peer and the link of the contract tests, in memory: ``system`` is the fake."""

    system: IPacketSystem
    #: The peer's link-layer address (packets sent on the link go there).
    far_mac = bytes.fromhex(VethPair.far_mac.replace(":", ""))

    def setUp(self) -> None:
        self.memory = MemoryPacketSystem([INTERFACE], routes={"2001:db8:7a::/64": INTERFACE})
        self.system = self.memory

    def deliver(self, packets: Sequence[bytes]) -> None:
        for packet in packets:
            self.memory.inject(INTERFACE, packet)

    def settle(self) -> None:
        pass

    def peer_received(self, count: int) -> list[bytes]:
        return [s.packet for s in self.memory.sent if s.interface == INTERFACE][-count:]

    def link_down(self) -> None:
        self.memory.link_down(INTERFACE)

    def link_up(self) -> None:
        self.memory.link_up(INTERFACE)


class LinuxHarness(_MixinBase):
    """The peer and the link of the contract tests, real: two namespaces and a veth link
    per test; ``system`` opens its sockets in the near one (root needed)."""

    system: IPacketSystem
    far_mac = bytes.fromhex(VethPair.far_mac.replace(":", ""))

    def setUp(self) -> None:
        reason = VethPair.unavailable()
        if reason:
            raise SkipTest(f"Linux packet system tests: {reason}")
        self.pair = VethPair(PREFIX, NEAR, FAR, "2001:db8:7b::/64")
        self.addCleanup(self.pair.destroy)
        self.pair.create()
        assert self.pair.near_interface == INTERFACE
        self.system = LinuxPacketSystem(self.pair.near)
        self.far = LinuxPacketSystem(self.pair.far)
        self.far_sender = self.far.open_sender()
        self.addCleanup(self.far.close, self.far_sender)
        # What reaches the peer: to its address, or sent to its MAC on the link.
        self.far_reader = self.far.open_reader(
            self.pair.far_interface, [packed(FAR), packed(UNROUTED)], 1 << 22
        )
        self.addCleanup(self.far.close, self.far_reader)
        self.fence = self.system.open_reader(INTERFACE, [packed(FENCE)])
        self.addCleanup(self.system.close, self.fence)
        self.fences = 0

    def deliver(self, packets: Sequence[bytes]) -> None:
        for packet in packets:
            self.far.send(self.far_sender, packet, socket.inet_ntop(socket.AF_INET6, packet[24:40]))

    def settle(self) -> None:
        """Send a fence packet and wait for it on a reader of its own.

        One link, one queue, in order: once the fence has reached its
        reader, every packet sent before it has reached the reader under test.
        """
        self.fences += 1
        self.deliver([to(FENCE, self.fences)])
        buffer = bytearray(2048)
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline:
            select.select([self.fence], [], [], 0.05)
            try:
                self.system.receive(self.fence, buffer)
                return
            except OSError:  # nothing yet, or ENETDOWN once after a link went down
                continue
        raise AssertionError("the fence packet did not arrive within 5 s")

    def peer_received(self, count: int) -> list[bytes]:
        """The next ``count`` packets the peer got, the near kernel's ICMPv6 aside (it
        answers packets delivered to addresses it does not have with errors)."""
        got: list[bytes] = []
        buffer = bytearray(65575)
        deadline = time.monotonic() + 2
        while len(got) < count and time.monotonic() < deadline:
            select.select([self.far_reader], [], [], 0.05)
            try:
                length = self.far.receive(self.far_reader, buffer)
            except BlockingIOError:
                continue
            if buffer[6] != 58:
                got.append(bytes(buffer[:length]))
        return got

    def link_down(self) -> None:
        self.pair.link_down()

    def link_up(self) -> None:
        self.pair.link_up()


class MemoryContractTests(MemoryHarness, PacketSystemContractMixin, SynchronousTestCase):
    """The contract, against the in-memory fake."""


class LinuxContractTests(LinuxHarness, PacketSystemContractMixin, SynchronousTestCase):
    """The contract, against the kernel: two namespaces and a veth link per test."""


class MemoryPacketSystemTests(SynchronousTestCase):
    """Behaviour only the fake can show: injected errors, full queues."""

    def setUp(self) -> None:
        self.system = MemoryPacketSystem(["eth0"])
        self.collector = Collector()
        self.received = self.collector.packets
        self.port = PacketReader(self.system, MemoryReactor(), "eth0", self.collector)
        self.port.open()

    def test_receive_error_counted(self) -> None:
        """An injected receive error is counted, not raised, and the next wake-up reads."""
        self.system.fail("receive", errno.EIO)
        self.system.inject("eth0", to(VIRTUAL1, 1))
        self.port.doRead()
        assert self.port.stats.errors == 1
        assert self.received == []
        self.port.doRead()
        assert [bytes(p) for p in self.received] == [to(VIRTUAL1, 1)]

    def test_unexpected_exception_contained(self) -> None:
        """Even a non-OSError from the system is counted and logged, not raised."""

        def broken(buffer: bytearray) -> int:
            raise RuntimeError("broken system")

        self.system.receiver = lambda fd: broken  # type: ignore[method-assign]
        port = PacketReader(self.system, MemoryReactor(), "eth0", _ignore)
        port.open()
        port.doRead()
        assert port.stats.errors == 1
        assert len(self.flushLoggedErrors(RuntimeError)) == 1

    def test_full_queue_send_dropped(self) -> None:
        """ENOBUFS and EAGAIN on send are counted drops by errno name."""
        writer = PacketWriter(self.system)
        writer.open()
        self.system.fail("send", errno.ENOBUFS)
        self.system.fail("send", errno.EAGAIN)
        packet = udp_packet(NEAR, FAR, b"x")
        assert not writer.send(packet)
        assert not writer.send(packet)
        assert writer.send(packet)
        assert writer.stats.errors == {"ENOBUFS": 1, "EAGAIN": 1}
        assert writer.stats.dropped == 2
        assert writer.stats.sent == 1
        assert self.system.sent[0].packet == packet
        assert self.system.sent[0].destination == FAR

    def test_log_is_bounded(self) -> None:
        """A handler failing on every packet logs at counts 1, 2, 4, 8...: not per packet."""

        def handle(packet: bytearray) -> None:
            raise ValueError("always")

        self.collector.packetReceived = handle  # type: ignore[method-assign]
        for i in range(100):
            self.system.inject("eth0", to(VIRTUAL1, i))
        self.port.doRead()
        assert self.port.stats.handler_errors == 100
        assert len(self.flushLoggedErrors(ValueError)) == 7  # 1 2 4 8 16 32 64

    def test_outgoing_and_overflow(self) -> None:
        """Outgoing packets are not queued; past queue_limit packets are counted overflows."""
        system = MemoryPacketSystem(["eth0"], queue_limit=2)
        fd = system.open_reader("eth0")
        assert system.inject("eth0", to(VIRTUAL1, 0), outgoing=True) == 0
        assert [system.inject("eth0", to(VIRTUAL1, i)) for i in range(3)] == [1, 1, 0]
        assert system.overflows == 1
        assert system.queued(fd) == 2

    def test_descriptors_not_leaked(self) -> None:
        """close() releases the descriptor; closing a closed one is EBADF."""
        fd = self.port.fileno()
        self.port.close()
        assert fd not in self.system.open_descriptors
        assert self.port.fileno() == -1
        with self.assertRaises(OSError) as caught:
            self.system.close(fd)
        assert caught.exception.errno == errno.EBADF

    def test_start_needs_open(self) -> None:
        """startReading() before open() is a programming error, said early."""
        port = PacketReader(self.system, MemoryReactor(), "eth0", _ignore)
        self.assertRaises(RuntimeError, port.startReading)
        self.assertRaises(
            ValueError, PacketReader, self.system, MemoryReactor(), "eth0", print, batch=0
        )


def run_filter(program: bytes, packet: bytes) -> int:
    """A classic BPF interpreter for the instructions destination_filter uses."""
    insns = [struct.unpack("=HBBI", program[i : i + 8]) for i in range(0, len(program), 8)]
    pc = accumulator = 0
    while True:
        code, jt, jf, k = insns[pc]
        if code == 0x20:  # ld word [k]
            if k + 4 > len(packet):
                return 0
            accumulator = struct.unpack("!I", packet[k : k + 4])[0]
        elif code == 0x15:  # jeq #k
            pc += jt if accumulator == k else jf
        elif code == 0x06:  # ret #k
            return k
        else:
            raise AssertionError(f"unexpected opcode {code:#x}")
        pc += 1


class DestinationFilterTests(SynchronousTestCase):
    """The BPF program accepts exactly the packets to the listed destinations."""

    addresses = st.binary(min_size=16, max_size=16)

    @given(st.lists(addresses, max_size=8), addresses, addresses)
    def test_accepts_exactly_listed(self, listed: list[bytes], src: bytes, dst: bytes) -> None:
        """Any destination is accepted iff listed, whatever the source address."""
        program = destination_filter(listed)
        for destination in [*listed, dst]:
            packet = b"\x60" + bytes(7) + src + destination + bytes(8)
            verdict = run_filter(program, packet)
            assert (verdict > 0) == (destination in listed)
            assert verdict == 0 or verdict >= 65575

    def test_short_packet_rejected(self) -> None:
        """A packet too short to hold a destination address is rejected."""
        assert run_filter(destination_filter([packed(VIRTUAL1)]), b"\x60" + bytes(30)) == 0

    def test_limits(self) -> None:
        """Bad address lengths and more addresses than one program holds are refused."""
        self.assertRaises(ValueError, destination_filter, [b"\x01" * 4])
        self.assertRaises(ValueError, destination_filter, [bytes(16)] * 500)
        assert len(destination_filter([bytes(16)] * 400)) == (9 * 400 + 1) * 8


class ReactorDrainTests(TestCase):
    """With the real reactor, a burst is drained in a few wake-ups (kernel sockets)."""

    def test_wakeups_per_burst(self) -> Deferred[None]:
        """1000 queued packets reach the handler in at most a handful of wake-ups."""
        reason = VethPair.unavailable()
        if reason:
            raise SkipTest(f"Linux packet system tests: {reason}")
        pair = VethPair(PREFIX, NEAR, FAR, "2001:db8:7b::/64")
        self.addCleanup(pair.destroy)
        pair.create()
        near, far = LinuxPacketSystem(pair.near), LinuxPacketSystem(pair.far)
        sender = far.open_sender()
        self.addCleanup(far.close, sender)
        collector = Collector()
        received = collector.packets
        assert IReactorFDSet.providedBy(global_reactor)
        port = PacketReader(
            near,
            global_reactor,
            pair.near_interface,
            collector,
            destinations=[packed(VIRTUAL1)],
            receive_buffer=1 << 23,
        )
        port.open()
        self.addCleanup(port.close)
        port.startReading()
        packets = [to(VIRTUAL1, i) for i in range(1000)]
        for packet in packets:
            far.send(sender, packet, VIRTUAL1)

        clock: IReactorTime = global_reactor
        deadline = clock.seconds() + 5

        def done() -> bool:
            return len(received) >= 1000 or clock.seconds() > deadline

        def check(_: object) -> None:
            assert [bytes(p) for p in received] == packets
            # ceil(1000 / 256) = 4 full drains, plus slack for a wake-up that
            # raced the sender; per-packet wake-ups would be ~1000.
            assert port.stats.wakeups <= 8, port.stats
            assert port.stats.errors == 0

        return _wait_until(clock, done).addCallback(check)


def _wait_until(clock: IReactorTime, predicate: Callable[[], bool]) -> Deferred[None]:
    """Poll ``predicate`` every 10 ms on ``clock`` until it is true."""
    result: Deferred[None] = Deferred()

    def poll() -> None:
        if predicate():
            loop.stop()

    loop = task.LoopingCall(poll)
    loop.clock = clock
    loop.start(0.01).addCallbacks(result.callback, result.errback)
    return result
