"""Tests for lbproxy.ring: the receive-ring reader against the kernel.

It must keep the batched reader's contract (the same tests run against it here: every
packet, in order, byte for byte, the same statistics), and what is its own: frames
handed back to the kernel as the ring wraps, a full ring's drops counted by the kernel,
a packet truncated to its frame counted as oversize, the socket and the map released
at close.  Two network namespaces joined by a veth link per test (root needed; skipped
with the reason otherwise), addresses in 2001:db8::/32 only.
"""

from __future__ import annotations

import ipaddress
import os
import subprocess
from collections.abc import Callable

from twisted.internet.task import Clock
from twisted.internet.testing import MemoryReactor
from twisted.trial.unittest import SkipTest, SynchronousTestCase

from lbproxy import ring
from lbproxy.balancer import Balancer
from lbproxy.forwarder import ForwarderService
from lbproxy.keys import KeyChain
from lbproxy.rawsocket import LinuxPacketSystem
from lbproxy.selection import scheduler_from_name
from lbproxy.table import StickyTable
from lbproxy.testing import VethPair
from tests import test_mmsg
from tests.test_mmsg import FAR, NEAR, ROUTED, TARGET, packed, packet, tag_of

PREFIX = "lbrg"


class RingReaderTests(test_mmsg.ReaderContract, SynchronousTestCase):
    """The readers' contract (`tests.test_mmsg.ReaderContract`) and the ring's own."""

    def setUp(self) -> None:
        reason = VethPair.unavailable() or (None if ring.available() else "no receive rings")
        if reason:
            raise SkipTest(f"receive ring tests: {reason}")
        self.pair = VethPair(PREFIX, NEAR, FAR, ROUTED)
        self.addCleanup(self.pair.destroy)
        self.pair.create()
        self.near = LinuxPacketSystem(self.pair.near)
        self.far = LinuxPacketSystem(self.pair.far)
        self.far_sender = self.far.open_sender()
        self.addCleanup(self.far.close, self.far_sender)

    def reader(self, handle: Callable[[bytearray], object], **kw: object) -> ring.RingPacketReader:
        kw.setdefault("receive_buffer", 1 << 22)
        reader = ring.RingPacketReader(
            self.near, MemoryReactor(), self.pair.near_interface, handle,
            destinations=[packed(TARGET)], **kw,  # type: ignore[arg-type]
        )  # fmt: skip
        reader.open()
        self.addCleanup(reader.close)
        return reader

    def test_ring_wraps_and_frames_go_back(self) -> None:
        """A 32-frame ring (64 KiB) carries 300 packets in rounds of 25: every packet,
        in order, byte for byte; the kernel drops none, so frames were handed back."""
        got: list[bytes] = []
        reader = self.reader(lambda p: got.append(bytes(p)), receive_buffer=1 << 16)
        self.assertEqual((reader.frames, reader.frame_size), (32, 2048))
        sent = [packet(FAR, TARGET, i, size=60 + i) for i in range(300)]
        for start in range(0, 300, 25):
            self.deliver(sent[start : start + 25])
            self.drain(reader, start + 25)
        self.assertEqual(got, sent)
        self.assertEqual(reader.update_stats().kernel_drops, 0)

    def test_full_ring_drops_are_counted(self) -> None:
        """100 packets into a 32-frame ring not being read: 32 are kept, 68 counted
        as kernel drops; after a drain, packets arrive again."""
        got: list[int] = []
        reader = self.reader(lambda p: got.append(tag_of(p)), receive_buffer=1 << 16)
        self.deliver([packet(FAR, TARGET, i) for i in range(100)])
        self.drain(reader, 32)
        self.assertEqual(got, list(range(32)))
        self.assertEqual(reader.update_stats().kernel_drops, 68)
        self.deliver([packet(FAR, TARGET, 1000 + i) for i in range(5)])
        self.drain(reader, 37)
        self.assertEqual(got[32:], [1000 + i for i in range(5)])

    def test_truncated_packet_is_oversize(self) -> None:
        """On a 4000-byte MTU link with max_packet 1000 (2048-byte frames), a
        3000-byte packet is truncated by the kernel: counted as oversize, dropped;
        the packets around it arrive."""
        for side, interface in ((self.pair.near, self.pair.near_interface),
                                (self.pair.far, self.pair.far_interface)):  # fmt: skip
            subprocess.run(["ip", "-n", side, "link", "set", "dev", interface, "mtu", "4000"],
                           check=True, timeout=30)  # fmt: skip
        got: list[int] = []
        reader = self.reader(lambda p: got.append(tag_of(p)), max_packet=1000)
        self.assertEqual(reader.frame_size, 2048)
        self.deliver([packet(FAR, TARGET, 1), packet(FAR, TARGET, 2, size=3000),
                      packet(FAR, TARGET, 3)])  # fmt: skip
        self.drain(reader, 3)
        self.assertEqual(got, [1, 3])
        self.assertEqual((reader.stats.received, reader.stats.oversize), (2, 1))

    def test_close_releases_socket_and_map(self) -> None:
        """After close the process holds no more descriptors than before open (the map
        holds a duplicate of the socket's), and closing twice is harmless."""
        before = len(os.listdir("/proc/self/fd"))
        reader = ring.RingPacketReader(self.near, MemoryReactor(), self.pair.near_interface,
                                       lambda p: None)  # fmt: skip
        reader.open()
        self.assertGreater(len(os.listdir("/proc/self/fd")), before)
        reader.close()
        reader.close()
        self.assertEqual(len(os.listdir("/proc/self/fd")), before)
        self.assertEqual(reader.fileno(), -1)

    def test_forwarder_reads_through_rings(self) -> None:
        """The forwarder reads both links through rings by default here, and through
        ``recvmmsg`` when told not to."""
        for rx_ring in (None, False):
            service = _service(self.near, rx_ring)
            self.assertEqual(service.rx_ring, rx_ring is None)
            for reader in (service.client, service.server):
                self.assertEqual(isinstance(reader, ring.RingPacketReader), rx_ring is None)


def _service(system: LinuxPacketSystem, rx_ring: bool | None) -> ForwarderService:
    clock = Clock()
    balancer = Balancer(
        chain=KeyChain.from_names(["hoa", "src"]), table=StickyTable(clock, 60.0, 100),
        scheduler=scheduler_from_name("round_robin"), backends=[],
        virtual_addresses=[ipaddress.IPv6Address(TARGET)], clock=clock,
    )  # fmt: skip
    return ForwarderService(balancer, system, MemoryReactor(), clock, client_interface="c",
                            server_interface="s", rx_ring=rx_ring)  # fmt: skip
