"""Tests for lbproxy.testbed: packet rewrites against scapy, the emulators' cores, the bed.

The first classes are pure (no root).  The network classes build the real
bed in namespaces and skip, with the reason, when the host cannot (not root,
no nft/ethtool, no /dev/net/tun).  scapy is the independent oracle: the bed
itself never imports it.
"""

from __future__ import annotations

import contextlib
import json
import select
import socket
import struct
import threading
import time
from collections.abc import Callable, Iterator
from ipaddress import IPv6Address
from typing import Any

from scapy.layers.inet import TCP, UDP
from scapy.layers.inet6 import (
    HAO,
    MIP6MH_BA,
    MIP6MH_BU,
    ICMPv6ParamProblem,
    IPv6,
    IPv6ExtHdrDestOpt,
    IPv6ExtHdrRouting,
    in6_chksum,
)
from scapy.packet import Packet, Raw, bind_layers
from twisted.trial.unittest import SkipTest, SynchronousTestCase, TestCase

from lbproxy.testbed import BedUnavailableError, TestBed, addresses, netns, packets
from lbproxy.testbed.homeagent import HomeAgent
from lbproxy.testbed.terminal import MobileNodes

HOA1 = addresses.home_address(1)
HA = addresses.HOME_AGENT
ETH_P_IPV6 = 0x86DD
ETH_P_ALL = 0x0003
bind_layers(IPv6, IPv6, nh=41)


def coa(index: int, link: int) -> IPv6Address:
    return addresses.care_of_address(index, link)


def checksum_ok(packet: Packet, layer: type[Packet], nh: int) -> bool:
    """Does ``layer``'s checksum verify, per scapy, with the RFC 6275 pseudo-header?

    scapy (2.8) uses the HAO's address as the pseudo-header source only when it is the
    header's sole option; a packet parsed from bytes has [PadN, HAO], and scapy then
    uses the care-of address: keep only the HAO before asking it.
    """
    packet = packet.copy()
    for dest in _layers(packet, IPv6ExtHdrDestOpt):
        dest.options = [o for o in dest.options if isinstance(o, HAO)] or dest.options
    upper = packet[layer]
    return in6_chksum(nh, upper, bytes(upper)) == 0


def _layers(packet: Packet, kind: type[Packet]) -> list[Packet]:
    found: list[Packet] = []
    layer: Packet | None = packet
    while layer is not None and not isinstance(layer, Raw):
        if isinstance(layer, kind):
            found.append(layer)
        layer = layer.payload if layer.payload else None
    return found


def hao_of(packet: Packet) -> list[Packet]:
    return [o for d in _layers(packet, IPv6ExtHdrDestOpt) for o in d.options
            if isinstance(o, HAO)]


class AddressPlanTests(SynchronousTestCase):
    def test_fixed_addresses(self) -> None:
        """The documented plan: HoA ::<1000+i>, CoA a<k>::<1000+i>, backend b0::1<i>."""
        self.assertEqual(str(addresses.home_address(1)), "2001:db8:100::1001")
        self.assertEqual(str(addresses.home_address(50)), "2001:db8:100::1050")
        self.assertEqual(str(coa(50, 3)), "2001:db8:a3::1050")
        self.assertEqual(str(addresses.backend_address(2)), "2001:db8:b0::12")
        self.assertEqual(str(addresses.access_router(2)), "2001:db8:a2::1")

    def test_terminal_of_inverts(self) -> None:
        """terminal_of maps home and care-of addresses back to the index, others to None."""
        for i in (1, 42, 8999):
            self.assertEqual(addresses.terminal_of(addresses.home_address(i)), i)
            self.assertEqual(addresses.terminal_of(coa(i, 2)), i)
        self.assertIsNone(addresses.terminal_of(HA))
        self.assertIsNone(addresses.terminal_of("2001:db8:100::abcd"))
        self.assertIsNone(addresses.terminal_of(addresses.VIP))

    def test_out_of_range(self) -> None:
        """Indices outside the plan are refused rather than wrapped."""
        self.assertRaises(ValueError, addresses.home_address, 0)
        self.assertRaises(ValueError, addresses.home_address, 9000)
        self.assertRaises(ValueError, addresses.care_of_address, 1, 10)


class PacketTests(SynchronousTestCase):
    def udp_from_home(self, payload: bytes = b"ping") -> bytes:
        return bytes(IPv6(src=str(HOA1), dst=str(addresses.VIP)) / UDP(sport=4000, dport=5353)
                     / payload)

    def test_add_hao_canonical(self) -> None:
        """add_hao puts the canonical 24-byte header right after IPv6, source = CoA."""
        out = packets.add_hao(self.udp_from_home(), coa(1, 2).packed)
        self.assertEqual(out[6], packets.NH_DEST_OPTS)
        self.assertEqual(out[40:48], bytes((17, 2, 1, 2, 0, 0, 0xC9, 16)))
        self.assertEqual(out[48:64], HOA1.packed)
        self.assertEqual(out[8:24], coa(1, 2).packed)
        self.assertEqual(struct.unpack("!H", out[4:6])[0], len(out) - 40)

    def test_add_hao_checksum_per_scapy(self) -> None:
        """The UDP and TCP checksums stay valid: scapy computes them over the HoA."""
        for upper, layer, nh in ((UDP(sport=1, dport=2), UDP, 17),
                                 (TCP(sport=1, dport=80, flags="S", seq=7), TCP, 6)):
            original = bytes(IPv6(src=str(HOA1), dst=str(addresses.VIP)) / upper / b"data")
            parsed = IPv6(packets.add_hao(original, coa(1, 3).packed))
            self.assertEqual(parsed.src, str(coa(1, 3)))
            [hao] = hao_of(parsed)
            self.assertEqual(hao.hoa, str(HOA1))
            self.assertTrue(checksum_ok(parsed, layer, nh))
            self.assertEqual(bytes(parsed[layer].payload), b"data")

    def test_add_hao_would_fail_with_coa_pseudo_header(self) -> None:
        """The oracle can fail: the same checksum does not verify over the CoA."""
        parsed = IPv6(packets.add_hao(self.udp_from_home(), coa(1, 3).packed))
        self.assertNotEqual(in6_chksum(17, parsed[UDP], bytes(parsed[UDP])), 0)

    def test_strip_rh2(self) -> None:
        """An RH2 packet to a CoA becomes a packet to the HoA with a valid checksum."""
        sent = bytes(IPv6(src="2001:db8:a1::1", dst=str(coa(1, 1)))
                     / IPv6ExtHdrRouting(type=2, segleft=1, addresses=[str(HOA1)])
                     / UDP(sport=9, dport=7777) / b"hello")
        result = packets.strip_rh2(sent)
        assert result is not None
        hoa, inner = result
        self.assertEqual(hoa, HOA1.packed)
        parsed = IPv6(inner)
        self.assertEqual(parsed.dst, str(HOA1))
        self.assertEqual(parsed.nh, 17)
        self.assertFalse(_layers(parsed, IPv6ExtHdrRouting))
        self.assertTrue(checksum_ok(parsed, UDP, 17))
        self.assertEqual(bytes(parsed[UDP].payload), b"hello")
        self.assertIsNone(packets.strip_rh2(self.udp_from_home()))

    def test_tunnel_round_trip(self) -> None:
        """encapsulate/decapsulate are inverse; a plain packet is not a tunnel."""
        inner = self.udp_from_home()
        outer = packets.encapsulate(inner, HA.packed, coa(1, 2).packed)
        parsed = IPv6(outer)
        self.assertEqual((parsed.nh, parsed.src, parsed.dst), (41, str(HA), str(coa(1, 2))))
        self.assertEqual(packets.decapsulate(outer), inner)
        self.assertIsNone(packets.decapsulate(inner))

    def test_binding_update_per_scapy(self) -> None:
        """A BU: HAO with the HoA, MH type 5 fields, checksum over the HoA (RFC 6275 §6.1.7)."""
        raw = packets.binding_update(coa(1, 2).packed, HA.packed, HOA1.packed, 7, 900)
        parsed = IPv6(raw)
        bu = parsed[MIP6MH_BU]
        self.assertEqual((bu.seq, bu.mhtime, bu.mhtype), (7, 900, 5))
        self.assertEqual(raw[-8] & 0xC0, 0xC0)  # A and H flags
        [hao] = hao_of(parsed)
        self.assertEqual(hao.hoa, str(HOA1))
        self.assertTrue(checksum_ok(parsed, MIP6MH_BU, 135))
        message = packets.parse_mobility(raw)
        assert message is not None
        self.assertEqual((message.mh_type, message.seq, message.hoa, message.checksum_ok),
                         (5, 7, HOA1.packed, True))

    def test_binding_ack_per_scapy(self) -> None:
        """A BA: RH2 to the HoA, status/seq, checksum over the final destination (§6.1.8)."""
        raw = packets.binding_ack(HA.packed, coa(1, 2).packed, HOA1.packed, 0, 7, 900)
        parsed = IPv6(raw)
        self.assertEqual(parsed[IPv6ExtHdrRouting].addresses, [str(HOA1)])
        ba = parsed[MIP6MH_BA]
        self.assertEqual((ba.status, ba.seq, ba.mhtime), (0, 7, 900))
        self.assertTrue(checksum_ok(parsed, MIP6MH_BA, 135))

    def test_parse_scapy_binding_update(self) -> None:
        """A BU built by scapy parses, with its checksum accepted; a corrupted one is not."""
        built = (IPv6(src=str(coa(3, 1)), dst=str(HA))
                 / IPv6ExtHdrDestOpt(options=[HAO(hoa=str(addresses.home_address(3)))])
                 / MIP6MH_BU(seq=65535, flags="AH", mhtime=10))
        raw = bytes(built)
        message = packets.parse_mobility(raw)
        assert message is not None
        self.assertEqual((message.mh_type, message.seq, message.lifetime),
                         (packets.MH_BU, 65535, 10))
        self.assertEqual(message.hoa, addresses.home_address(3).packed)
        self.assertTrue(message.checksum_ok)
        broken = bytearray(raw)
        broken[-1] ^= 1
        self.assertFalse(packets.parse_mobility(bytes(broken)).checksum_ok)  # type: ignore[union-attr]

    def test_seq_newer_modulo(self) -> None:
        """RFC 6275 §9.5.1: sequence numbers compare modulo 2**16."""
        self.assertTrue(packets.seq_newer(1, 0))
        self.assertTrue(packets.seq_newer(0, 65535))
        self.assertFalse(packets.seq_newer(5, 5))
        self.assertFalse(packets.seq_newer(65535, 0))
        self.assertFalse(packets.seq_newer(0, 0x8000))

    def test_truncated_is_packet_error(self) -> None:
        """Truncated headers raise PacketError, nothing else."""
        raw = packets.binding_update(coa(1, 2).packed, HA.packed, HOA1.packed, 7, 900)
        for cut in range(0, len(raw)):
            with contextlib.suppress(packets.PacketError):
                packets.parse_mobility(raw[:cut])


class HomeAgentTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.now = 1000.0
        self.agent = HomeAgent(HA.packed, addresses.HOME_PREFIX, lambda: self.now)

    def bu(self, seq: int, link: int = 2, lifetime: int = 10, index: int = 1) -> list[Any]:
        return self.agent.receive(packets.binding_update(
            coa(index, link).packed, HA.packed, addresses.home_address(index).packed, seq,
            lifetime))

    def ack(self, sent: list[Any]) -> packets.MobilityMessage:
        [(destination, raw)] = sent
        message = packets.parse_mobility(raw)
        assert message is not None and message.mh_type == packets.MH_BA
        self.assertEqual(destination, message.dst)
        return message

    def test_accept_and_ack(self) -> None:
        """A BU makes a binding and is acknowledged to the CoA with status 0."""
        ba = self.ack(self.bu(5))
        self.assertEqual((ba.status, ba.seq, ba.dst, ba.hoa), (0, 5, coa(1, 2).packed,
                                                                HOA1.packed))
        self.assertTrue(ba.checksum_ok)
        binding = self.agent.binding(HOA1.packed)
        assert binding is not None
        self.assertEqual(binding.care_of, coa(1, 2).packed)

    def test_stale_sequence_refused(self) -> None:
        """A BU not newer than the cached one gets status 135 and the cached seq."""
        self.bu(5)
        ba = self.ack(self.bu(5, link=3))
        self.assertEqual((ba.status, ba.seq), (packets.BA_SEQ_OUT_OF_WINDOW, 5))
        self.assertEqual(self.agent.binding(HOA1.packed).care_of,  # type: ignore[union-attr]
                         coa(1, 2).packed)

    def test_sequence_wraps(self) -> None:
        """65535 then 0 is an update, not a replay."""
        self.bu(65535)
        self.assertEqual(self.ack(self.bu(0, link=3)).status, 0)
        self.assertEqual(self.agent.binding(HOA1.packed).care_of,  # type: ignore[union-attr]
                         coa(1, 3).packed)

    def test_tunnels_to_current_coa(self) -> None:
        """A packet for the HoA goes IPv6-in-IPv6 from the HA to the bound CoA."""
        packet = bytes(IPv6(src="2001:db8:a1::1", dst=str(HOA1)) / UDP(dport=9) / b"x")
        self.assertEqual(self.agent.receive(packet), [])
        self.bu(1, link=3)
        [(destination, outer)] = self.agent.receive(packet)
        self.assertEqual(destination, coa(1, 3).packed)
        self.assertEqual(packets.decapsulate(outer), packet)
        self.assertEqual(outer[8:24], HA.packed)

    def test_lifetime_expires(self) -> None:
        """A binding is gone after lifetime * 4 seconds."""
        self.bu(1, lifetime=10)
        self.now += 39
        self.assertIsNotNone(self.agent.binding(HOA1.packed))
        self.now += 2
        self.assertIsNone(self.agent.binding(HOA1.packed))

    def test_reverse_tunnel_only_from_bound_coa(self) -> None:
        """A reverse-tunnelled packet is sent on only if it comes from the bound CoA."""
        self.bu(1, link=2)
        inner = bytes(IPv6(src=str(HOA1), dst="2001:db8:a1::1") / UDP(dport=9) / b"y")
        good = packets.encapsulate(inner, coa(1, 2).packed, HA.packed)
        bad = packets.encapsulate(inner, coa(1, 3).packed, HA.packed)
        self.assertEqual(self.agent.receive(good), [(IPv6Address("2001:db8:a1::1").packed,
                                                     inner)])
        self.assertEqual(self.agent.receive(bad), [])

    def test_bad_checksum_discarded(self) -> None:
        """A BU with a wrong checksum is silently discarded (RFC 6275 §9.2)."""
        raw = bytearray(packets.binding_update(coa(1, 2).packed, HA.packed, HOA1.packed, 1, 9))
        raw[-1] ^= 0xFF
        self.assertEqual(self.agent.receive(bytes(raw)), [])
        self.assertIsNone(self.agent.binding(HOA1.packed))


class MobileNodesTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.nodes = MobileNodes(5, HA.packed, 1, [addresses.VIP_PREFIX])

    def test_outbound_to_vip_gets_hao(self) -> None:
        """To the VIP: HAO, source = CoA on the current link."""
        packet = bytes(IPv6(src=str(HOA1), dst=str(addresses.VIP)) / UDP(dport=1) / b"z")
        link, out = self.nodes.outbound(packet)  # type: ignore[misc]
        self.assertEqual(link, 1)
        self.assertEqual(packets.find_hao(out), HOA1.packed)
        self.assertEqual(out[8:24], coa(1, 1).packed)

    def test_outbound_elsewhere_reverse_tunnelled(self) -> None:
        """To another destination: tunnelled from the CoA to the home agent."""
        packet = bytes(IPv6(src=str(HOA1), dst="2001:db8:a1::1") / UDP(dport=1))
        _, out = self.nodes.outbound(packet)  # type: ignore[misc]
        self.assertEqual((out[8:24], out[24:40]), (coa(1, 1).packed, HA.packed))
        self.assertEqual(packets.decapsulate(out), packet)

    def test_unknown_source_dropped(self) -> None:
        """A packet not from a home address is not sent."""
        packet = bytes(IPv6(src="fe80::1", dst=str(addresses.VIP)) / UDP(dport=1))
        self.assertIsNone(self.nodes.outbound(packet))

    def test_move_and_ack(self) -> None:
        """A move sends a BU from the new CoA; the matching BA registers the terminal."""
        link, bu = self.nodes.binding_update(1, 3)
        self.assertEqual(link, 3)
        message = packets.parse_mobility(bu)
        assert message is not None
        self.assertEqual(message.src, coa(1, 3).packed)
        self.assertFalse(self.nodes.terminals[1].registered)
        ba = packets.binding_ack(HA.packed, coa(1, 3).packed, HOA1.packed, 0, message.seq, 9)
        self.assertIsNone(self.nodes.inbound(3, ba))
        self.assertTrue(self.nodes.terminals[1].registered)

    def test_inbound_only_at_current_coa(self) -> None:
        """An RH2 packet is delivered at the current CoA and ignored at an old one."""
        def rh2(link: int) -> bytes:
            return bytes(IPv6(src=str(addresses.VIP), dst=str(coa(1, link)))
                         / IPv6ExtHdrRouting(type=2, segleft=1, addresses=[str(HOA1)])
                         / UDP(dport=7) / b"r")
        self.assertIsNone(self.nodes.inbound(2, rh2(2)))
        inner = self.nodes.inbound(1, rh2(1))
        assert inner is not None
        self.assertEqual(inner[24:40], HOA1.packed)

    def test_out_of_window_adopts_sequence(self) -> None:
        """A BA with status 135 makes the next BU use a number above the HA's."""
        _, bu = self.nodes.binding_update(1)
        ba = packets.binding_ack(HA.packed, coa(1, 1).packed, HOA1.packed,
                                 packets.BA_SEQ_OUT_OF_WINDOW, 400, 0)
        self.nodes.inbound(1, ba)
        _, bu = self.nodes.binding_update(1)
        self.assertEqual(packets.parse_mobility(bu).seq, 401)  # type: ignore[union-attr]


# -- the real bed ---------------------------------------------------------------------


def require_bed() -> None:
    try:
        netns.check_host()
    except BedUnavailableError as exc:
        raise SkipTest(str(exc)) from exc


class Capture:
    """Frames seen on one interface of the bed (both directions), kept until matched."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.pending: list[Packet] = []

    def drain(self, seconds: float) -> list[Packet]:
        """Everything captured within ``seconds`` plus what is pending; clears both."""
        deadline = time.monotonic() + seconds
        while (left := deadline - time.monotonic()) > 0:
            if not select.select([self.sock], [], [], left)[0]:
                break
            data, address = self.sock.recvfrom(65536)
            if address[1] == ETH_P_IPV6:
                self.pending.append(IPv6(data))
        found, self.pending = self.pending, []
        return found

    def wait_for(self, match: Callable[[Packet], bool], seconds: float = 5.0) -> Packet:
        """The first captured packet ``match`` accepts; the others stay pending."""
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            packets_seen = self.drain(0.1)
            for index, packet in enumerate(packets_seen):
                if match(packet):
                    self.pending = packets_seen[index + 1:]
                    return packet
        raise AssertionError("no matching packet captured")


@contextlib.contextmanager
def capture(bed: TestBed, role: str, ifname: str) -> Iterator[Capture]:
    """An AF_PACKET capture on ``ifname`` in ``role``'s namespace."""
    # ETH_P_ALL: a socket bound to one protocol does not see outgoing frames.
    sock = bed.socket(role, socket.AF_PACKET, socket.SOCK_DGRAM, socket.htons(ETH_P_ALL))
    try:
        sock.bind((ifname, ETH_P_ALL))
        yield Capture(sock)
    finally:
        sock.close()


class HostCheckTests(SynchronousTestCase):
    def test_not_root_is_a_clear_error(self) -> None:
        """Without root, check_host (hence start) raises BedUnavailableError saying so."""
        self.patch(netns.os, "geteuid", lambda: 1000)
        exc = self.assertRaises(BedUnavailableError, netns.check_host)
        self.assertIn("root", str(exc))
        bed = TestBed(terminals=1, backends=1)
        self.assertRaises(BedUnavailableError, bed.start)
        self.assertFalse(bed.started)

    def test_missing_tool_is_named(self) -> None:
        """A missing command is named in the reason."""
        self.patch(netns.os, "geteuid", lambda: 0)
        self.patch(netns.shutil, "which", lambda tool: None if tool == "nft" else "/bin/x")
        exc = self.assertRaises(BedUnavailableError, netns.check_host)
        self.assertIn("nft", str(exc))


class TestBedLifecycleTests(TestCase):
    timeout = 120

    def setUp(self) -> None:
        require_bed()

    def test_up_and_down(self) -> None:
        """The bed builds every namespace and leaves none (nor processes) after stop()."""
        bed = TestBed(terminals=3, backends=3)
        self.addCleanup(bed.stop)
        bed.start()
        names = bed.namespaces()
        self.assertEqual(len(names), 8)
        self.assertTrue(all(name.startswith("lbtb") for name in names))
        processes = list(bed.processes().values())
        self.assertEqual(sorted(bed.processes()), ["b1", "b2", "b3", "ha", "term"])
        self.assertTrue(all(p.poll() is None for p in processes))
        self.assertEqual([t["registered"] for t in bed.terminal_status()], [True] * 3)
        bed.stop()
        bed.stop()  # idempotent
        self.assertEqual(bed.namespaces(), [])
        self.assertFalse(any(name in netns.run(["ip", "netns", "list"]).stdout
                             for name in names))
        self.assertTrue(all(p.poll() is not None for p in processes))

    def test_context_manager_cleans_up_on_error(self) -> None:
        """Leaving the with-block by an exception still removes everything."""
        names: list[str] = []
        with self.assertRaises(ZeroDivisionError), TestBed(terminals=1, backends=1) as bed:
            names.extend(bed.namespaces())
            1 / 0  # noqa: B018
        self.assertTrue(names)
        self.assertFalse(any(netns.exists(name) for name in names))

    def test_failed_start_cleans_up(self) -> None:
        """A start that fails half-way (a bad program) removes the namespaces it made."""
        bed = TestBed(terminals=1, backends=1, python="/nonexistent/python",
                      ready_timeout=3)
        self.addCleanup(bed.stop)
        self.assertRaises(RuntimeError, bed.start)
        self.assertFalse(any(netns.exists(f"{bed.name}-{role}") for role in bed.roles))


class TestBedPacketTests(TestCase):
    """One bed of 5 terminals for the packet-level checks."""

    timeout = 120

    def setUp(self) -> None:
        require_bed()
        self.bed = TestBed(terminals=5, backends=3)
        self.addCleanup(self.bed.stop)
        self.bed.start()

    def udp(self, role: str, bind: str, port: int = 0) -> socket.socket:
        sock = self.bed.socket(role, socket.AF_INET6, socket.SOCK_DGRAM)
        self.addCleanup(sock.close)
        sock.bind((bind, port))
        sock.settimeout(5)
        return sock

    def test_emitted_packet_has_hao(self) -> None:
        """Kernel UDP and TCP from a HoA leave the access link with a well-formed HAO,
        the CoA as source and checksums scapy accepts."""
        with capture(self.bed, "net", "acc1") as acc1:
            self.udp("term", str(HOA1)).sendto(b"hello vip", (str(addresses.VIP), 5353))
            packet = acc1.wait_for(lambda p: UDP in p and p.src == str(coa(1, 1)))
            [hao] = hao_of(packet)
            self.assertEqual(hao.hoa, str(HOA1))
            self.assertEqual(bytes(packet)[40:48], bytes((17, 2, 1, 2, 0, 0, 0xC9, 16)))
            self.assertTrue(checksum_ok(packet, UDP, 17))
            self.assertEqual(bytes(packet[UDP].payload), b"hello vip")

            hoa2 = str(addresses.home_address(2))
            tcp = self.bed.socket("term", socket.AF_INET6, socket.SOCK_STREAM)
            self.addCleanup(tcp.close)
            tcp.bind((hoa2, 0))
            tcp.setblocking(False)
            with contextlib.suppress(BlockingIOError):
                tcp.connect((str(addresses.VIP), 80))
            syn = acc1.wait_for(lambda p: TCP in p and p.src == str(coa(2, 1)))
            self.assertEqual(hao_of(syn)[0].hoa, hoa2)
            self.assertEqual(syn[TCP].flags, "S")
            self.assertTrue(checksum_ok(syn, TCP, 6))

    def send_from_net(self, ifname: str, packet: Packet, mac: str) -> None:
        sock = self.bed.socket("net", socket.AF_PACKET, socket.SOCK_DGRAM)
        self.addCleanup(sock.close)
        sock.sendto(bytes(packet), (ifname, ETH_P_IPV6, 0, 0, bytes.fromhex(mac.replace(":", ""))))

    def test_rh2_delivered_to_home_address(self) -> None:
        """An RH2 packet to the CoA reaches a kernel socket on the HoA, and the terminal's
        kernel answers no Parameter Problem (nftables keeps it from seeing the RH2)."""
        receiver = self.udp("term", str(HOA1), 7777)
        rh2 = (IPv6(src="2001:db8:a1::1", dst=str(coa(1, 1)))
               / IPv6ExtHdrRouting(type=2, segleft=1, addresses=[str(HOA1)])
               / UDP(sport=4000, dport=7777) / b"via rh2")
        with capture(self.bed, "net", "acc1") as acc1:
            self.send_from_net("acc1", rh2, self.bed.mac("term", "acc1"))
            data, peer = receiver.recvfrom(2048)
            self.assertEqual((data, peer[0], peer[1]), (b"via rh2", "2001:db8:a1::1", 4000))
            errors = acc1.drain(0.5)
            self.assertFalse([p for p in errors if ICMPv6ParamProblem in p])
        self.assertEqual(self.bed.terminal_counters().get("in-rh2"), 1)

    def test_move_binding_update_and_tunnel(self) -> None:
        """A move sends a BU across the home link, the HA answers a BA (both with valid
        checksums), and then a packet to the HoA arrives tunnelled at the new CoA and
        reaches the kernel socket; the reply goes back through the reverse tunnel."""
        with capture(self.bed, "net", "home") as home, capture(self.bed, "net", "acc2") as acc2:
            reply = self.bed.move(1, 2)
            self.assertEqual((reply["link"], reply["coa"], reply["status"]),
                             (2, str(coa(1, 2)), 0))
            bu = home.wait_for(lambda p: MIP6MH_BU in p)
            self.assertEqual((bu.src, bu.dst, hao_of(bu)[0].hoa),
                             (str(coa(1, 2)), str(HA), str(HOA1)))
            self.assertEqual(bu[MIP6MH_BU].seq, reply["seq"])
            self.assertTrue(checksum_ok(bu, MIP6MH_BU, 135))
            ba = home.wait_for(lambda p: MIP6MH_BA in p)
            self.assertEqual((ba.src, ba.dst), (str(HA), str(coa(1, 2))))
            self.assertEqual(ba[IPv6ExtHdrRouting].addresses, [str(HOA1)])
            self.assertEqual((ba[MIP6MH_BA].status, ba[MIP6MH_BA].seq), (0, reply["seq"]))
            self.assertTrue(checksum_ok(ba, MIP6MH_BA, 135))
            [binding] = [b for b in self.bed.bindings() if b["hoa"] == str(HOA1)]
            self.assertEqual(binding["coa"], str(coa(1, 2)))

            receiver = self.udp("term", str(HOA1), 7777)
            sender = self.udp("net", str(addresses.HOME_ROUTER))
            sender.sendto(b"to the home address", (str(HOA1), 7777))
            data, peer = receiver.recvfrom(2048)
            self.assertEqual((data, peer[0]), (b"to the home address",
                                               str(addresses.HOME_ROUTER)))
            tunnelled = acc2.wait_for(lambda p: p.nh == 41)
            self.assertEqual((tunnelled.src, tunnelled.dst), (str(HA), str(coa(1, 2))))
            self.assertEqual(tunnelled[IPv6].payload.dst, str(HOA1))

            receiver.sendto(b"answer", peer)
            self.assertEqual(sender.recvfrom(2048)[0], b"answer")
        events = [e for e in self.bed.home_agent_log() if e["hoa"] == str(HOA1)]
        self.assertEqual(events[-1]["event"], "bound")
        self.assertEqual(events[-1]["previous"], str(coa(1, 1)))

    def test_backend_servers(self) -> None:
        """Each backend greets TCP with its name and the peer, echoes, and logs the peer;
        the UDP echo prefixes its name."""
        client = self.bed.socket("lb", socket.AF_INET6, socket.SOCK_STREAM)
        self.addCleanup(client.close)
        client.settimeout(5)
        client.connect((str(addresses.backend_address(2)), 80))
        stream = client.makefile("rb")
        self.assertEqual(stream.readline(),
                         f"backend b2 peer {addresses.BALANCER_SERVER_SIDE}\n".encode())
        client.sendall(b"echo me")
        self.assertEqual(stream.read(7), b"echo me")
        udp = self.udp("lb", str(addresses.BALANCER_SERVER_SIDE))
        udp.sendto(b"u", (str(addresses.backend_address(3)), 5353))
        self.assertEqual(udp.recvfrom(100)[0], b"b3 u")
        self.assertEqual(self.bed.served_by(str(addresses.BALANCER_SERVER_SIDE)), ["b2", "b3"])


class StandInBalancer:
    """A test-only translate-mode balancer (the real one is lbproxy.core.balancer).

    Runs as a thread in the test process with its sockets in the lb namespace:
    terminal -> VIP packets lose the HAO and go from the HoA to a backend chosen
    by the HoA; backend replies get the VIP as source and go towards the home
    address (through the home agent's tunnel).  Checksums are recomputed whole.
    """

    def __init__(self, bed: TestBed) -> None:
        self.backends = [addresses.backend_address(i).packed for i in bed.backend_indices]
        self.vip = addresses.VIP.packed
        self.client = bed.socket("lb", socket.AF_PACKET, socket.SOCK_DGRAM,
                                 socket.htons(ETH_P_IPV6))
        self.client.bind(("lbc", ETH_P_IPV6))
        self.server = bed.socket("lb", socket.AF_PACKET, socket.SOCK_DGRAM,
                                 socket.htons(ETH_P_IPV6))
        self.server.bind(("lbs", ETH_P_IPV6))
        self.raw = bed.socket("lb", socket.AF_INET6, socket.SOCK_RAW, socket.IPPROTO_RAW)
        self.choice: dict[bytes, bytes] = {}
        self.stopping = threading.Event()
        self.thread = threading.Thread(target=self.loop, daemon=True)

    def start(self) -> None:
        self.thread.start()

    def stop(self) -> None:
        self.stopping.set()
        self.thread.join(5)
        for sock in (self.client, self.server, self.raw):
            sock.close()

    def loop(self) -> None:
        while not self.stopping.is_set():
            for sock in select.select([self.client, self.server], [], [], 0.1)[0]:
                data, address = sock.recvfrom(65536)
                if address[2] == 4:  # our own output
                    continue
                try:
                    out = self.inbound(data) if sock is self.client else self.outbound(data)
                except packets.PacketError:
                    continue
                if out is not None:
                    self.raw.sendto(out, (str(IPv6Address(out[24:40])), 0))

    def rewrite(self, packet: bytes, src: bytes, dst: bytes) -> bytes | None:
        nh, off, _ = packets.headers(packet)[-1]
        if nh not in (6, 17):
            return None
        upper = bytearray(packet[off:])
        position = 16 if nh == 6 else 6
        upper[position:position + 2] = b"\x00\x00"
        struct.pack_into("!H", upper, position, packets.upper_checksum(src, dst, nh,
                                                                        bytes(upper)))
        return packets.ipv6_header(src, dst, nh, len(upper), packet[7]) + bytes(upper)

    def inbound(self, packet: bytes) -> bytes | None:
        if packet[24:40] != self.vip or packet[6] != packets.NH_DEST_OPTS:
            return None
        hoa = packets.find_hao(packet)
        if hoa is None:
            return None
        backend = self.choice.setdefault(hoa, self.backends[hoa[-1] % len(self.backends)])
        stripped = bytearray(packet[:40]) + packet[64:]
        stripped[6] = packet[40]
        struct.pack_into("!H", stripped, 4, len(stripped) - 40)
        return self.rewrite(bytes(stripped), hoa, backend)

    def outbound(self, packet: bytes) -> bytes | None:
        if packet[8:24] not in self.backends:
            return None
        if IPv6Address(packet[24:40]) not in addresses.HOME_PREFIX:
            return None
        return self.rewrite(packet, self.vip, packet[24:40])


class TestBedWorkloadTests(TestCase):
    """50 terminals, 3 backends, TCP through a stand-in balancer, moving mid-stream."""

    timeout = 300

    def setUp(self) -> None:
        require_bed()
        self.bed = TestBed(terminals=50, backends=3)
        self.addCleanup(self.bed.stop)
        self.bed.start()
        self.balancer = StandInBalancer(self.bed)
        self.balancer.start()
        self.addCleanup(self.balancer.stop)

    def test_connections_survive_moves(self) -> None:
        """Every connection keeps its backend and every byte while its terminal moves
        over links 2 and 3; the backends saw the home addresses."""
        report = self.bed.workload(moves=[2, 3], chunks=6, chunk_size=2000)
        summary = report["summary"]
        self.assertEqual((summary["connections"], summary["ok"], summary["errors"]),
                         (50, 50, 0), json.dumps(report)[:3000])
        self.assertEqual((summary["moves"], summary["moves_failed"]), (100, 0))
        self.assertEqual(summary["bytes_ok"], 50 * 6 * 2000)
        self.assertEqual(set(summary["backends"]), {"b1", "b2", "b3"})
        for index, entry in report["terminals"].items():
            hoa = addresses.home_address(int(index))
            [connection] = entry["connections"]
            expected = self.balancer.choice[hoa.packed]
            self.assertEqual(connection["backend"],
                             f"b{self.balancer.backends.index(expected) + 1}")
            self.assertEqual(connection["peer"], str(hoa))
            self.assertEqual(self.bed.served_by(str(hoa)), [connection["backend"]])
        self.assertEqual({t["link"] for t in self.bed.terminal_status()}, {3})
