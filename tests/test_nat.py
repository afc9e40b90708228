"""Tests for lbproxy.core.nat: the inbound rewrites, the return path, ICMPv6 errors, fragments.

scapy is the independent oracle: packets are built with scapy, rewritten by
lbproxy.core.nat, dissected again by scapy, and every upper-layer checksum is
compared with one computed by scapy's ``checksum`` over a ``PseudoIPv6`` whose
addresses the oracle picks from the dissected headers (the home address when an
HAO is present, the final destination when a Routing Header has segments left).
scapy's own ``in6_chksum`` is not used for that: scapy 2.8 takes the HAO's home
address only when the HAO is its Destination Options header's sole option, so
it uses the care-of address for an HAO next to other options, padding included
(which is how a packet parsed from bytes reads: ``[PadN, HAO]``).
"""

from __future__ import annotations

import ipaddress
import struct
from collections.abc import Callable, Sequence

from hypothesis import given, settings
from hypothesis import strategies as st
from scapy.layers.inet import TCP, UDP
from scapy.layers.inet6 import (
    HAO,
    MIP6MH_BU,
    HBHOptUnknown,
    ICMPv6DestUnreach,
    ICMPv6EchoReply,
    ICMPv6EchoRequest,
    ICMPv6PacketTooBig,
    IPv6,
    IPv6ExtHdrDestOpt,
    IPv6ExtHdrFragment,
    IPv6ExtHdrHopByHop,
    IPv6ExtHdrRouting,
    PseudoIPv6,
)
from scapy.layers.ipsec import ESP
from scapy.packet import Packet, Raw
from scapy.utils import checksum as scapy_checksum
from twisted.trial.unittest import SynchronousTestCase

from lbproxy.core import nat
from lbproxy.wire.view import parse

COA = "2001:db8:c0::1"
HOA = "2001:db8:1::5"
VIP = "2001:db8:f::80"
BACKEND = "2001:db8:b::2"
COA2 = "2001:db8:c1::7"

_EXT = (IPv6ExtHdrDestOpt, IPv6ExtHdrHopByHop, IPv6ExtHdrRouting, IPv6ExtHdrFragment)
_CSUM_AT = {6: 16, 17: 6, 58: 2, 135: 4}

addresses = st.builds(
    lambda tail: str(ipaddress.IPv6Address(b"\x20\x01\x0d\xb8" + tail)),
    st.binary(min_size=12, max_size=12),
)
ports = st.integers(min_value=0, max_value=65535)
payloads = st.binary(max_size=600)


def packed(address: str) -> bytes:
    """The 16 bytes of a printed address."""
    return ipaddress.IPv6Address(address).packed


def oracle(raw: bytes) -> tuple[int, int, int] | None:
    """(offset of the checksum field, its value, the value scapy says it should have).

    None when the packet has no upper-layer checksum (ESP, non-first fragment).
    """
    pkt = IPv6(raw)
    src, dst = pkt.src, pkt.dst
    layer = pkt.payload
    nh = pkt.nh
    while isinstance(layer, _EXT):
        if isinstance(layer, IPv6ExtHdrDestOpt):
            for option in layer.options:
                if isinstance(option, HAO):
                    src = option.hoa
        if isinstance(layer, IPv6ExtHdrRouting) and layer.segleft:
            dst = layer.addresses[-1]
        if isinstance(layer, IPv6ExtHdrFragment) and layer.offset:
            return None
        nh = layer.nh
        layer = layer.payload
    if nh not in _CSUM_AT:
        return None
    l4_at = len(raw) - len(bytes(layer))
    l4 = bytearray(raw[l4_at:])
    at = _CSUM_AT[nh]
    field = l4[at] << 8 | l4[at + 1]
    l4[at:at + 2] = b"\x00\x00"
    pseudo = PseudoIPv6(src=src, dst=dst, uplen=len(l4), nh=nh)
    expected = scapy_checksum(bytes(pseudo) + bytes(l4))
    if nh == 17 and expected == 0:
        expected = 0xFFFF
    return l4_at + at, field, expected


def seal(raw: bytes) -> bytes:
    """Give ``raw`` the correct upper-layer checksum (scapy errs with HAO + other options)."""
    found = oracle(raw)
    if found is None:
        return raw
    at, _, expected = found
    return raw[:at] + struct.pack("!H", expected) + raw[at + 2:]


def hao_header(hoa: str = HOA, before: Sequence[Packet] = (),
               after: Sequence[Packet] = ()) -> IPv6ExtHdrDestOpt:
    """A Destination Options header with an HAO, optionally among other options."""
    return IPv6ExtHdrDestOpt(options=[*before, HAO(hoa=hoa), *after])


def from_terminal(l4: Packet, *, hao: IPv6ExtHdrDestOpt | None = None, coa: str = COA,
                  vip: str = VIP, hlim: int = 64) -> bytes:
    """A terminal's packet to the virtual address, by default with an HAO, checksum right."""
    head = IPv6(src=coa, dst=vip, hlim=hlim)
    pkt = head / (hao if hao is not None else hao_header()) / l4
    return seal(bytes(pkt))


def rewrite(function: object, raw: bytes, *args: object) -> bytes:
    """Run a nat function on a fresh bytearray of ``raw``; fail on a drop."""
    buf = bytearray(raw)
    result = function(buf, parse(buf), *args)  # type: ignore[operator]
    assert isinstance(result, bytearray), result
    assert result is buf
    return bytes(result)


def padding_runs(header: bytes) -> list[int]:
    """Lengths of the runs of Pad1/PadN bytes in an options header."""
    runs, run, i = [], 0, 2
    while i < len(header):
        if header[i] == 0:
            run, i = run + 1, i + 1
            continue
        size = header[i + 1] + 2
        if header[i] == 1:
            run += size
        else:
            runs.append(run)
            run = 0
        i += size
    runs.append(run)
    return runs


def zero_sum(build: Callable[[bytes], bytes], at: int) -> bytes:
    """``build(payload)`` with a 2-byte payload that makes its UDP checksum compute to 0.

    ``at`` is the checksum field's offset.  The payload is the checksum the packet
    has with a zero payload: adding a word to its own complement sums to 0xFFFF.
    """
    return build(build(bytes(2))[at:at + 2])


class ChecksumAssertions:
    """Shared checks: the rewritten packet's checksum is exactly what scapy computes."""

    def assertChecksumRight(self, raw: bytes) -> None:
        found = oracle(raw)
        assert found is not None, "no upper-layer checksum found"
        _, field, expected = found
        self.assertEqual(field, expected)  # type: ignore[attr-defined]


class TransparentTests(ChecksumAssertions, SynchronousTestCase):
    """transparent(): destination := backend, HAO and everything else kept."""

    def test_udp_with_hao(self) -> None:
        """A UDP/HAO packet goes to the backend; HAO, source, payload kept; checksum right."""
        raw = from_terminal(UDP(sport=4000, dport=53) / b"query")
        out = rewrite(nat.transparent, raw, packed(BACKEND))
        pkt = IPv6(out)
        self.assertEqual((pkt.src, pkt.dst, pkt.hlim), (COA, BACKEND, 63))
        self.assertEqual(pkt[HAO].hoa, HOA)
        self.assertEqual(bytes(pkt[UDP].payload), b"query")
        self.assertChecksumRight(out)
        self.assertEqual(len(out), len(raw))

    def test_mobility_header(self) -> None:
        """A Binding Update's Mobility Header checksum follows the new destination."""
        raw = from_terminal(MIP6MH_BU(seq=7, flags=0x18, mhtime=10))
        out = rewrite(nat.transparent, raw, packed(BACKEND))
        self.assertEqual(IPv6(out)[MIP6MH_BU].seq, 7)
        self.assertChecksumRight(out)

    def test_extra_options_untouched(self) -> None:
        """A Destination Options header with other options besides the HAO is left as is."""
        hao = hao_header(before=[HBHOptUnknown(otype=0x1E, optdata=b"abcd")])
        raw = from_terminal(TCP(sport=1, dport=80, flags="S"), hao=hao)
        out = rewrite(nat.transparent, raw, packed(BACKEND))
        self.assertEqual(out[40:72], raw[40:72])
        self.assertChecksumRight(out)

    def test_hop_limit_drop(self) -> None:
        """Hop Limit 1 or 0 is dropped with a reason and the buffer is left untouched."""
        for hlim in (0, 1):
            raw = from_terminal(UDP() / b"x", hlim=hlim)
            buf = bytearray(raw)
            self.assertIs(nat.transparent(buf, parse(buf), packed(BACKEND)), nat.Drop.HOP_LIMIT)
            self.assertEqual(bytes(buf), raw)

    def test_hop_limit_two(self) -> None:
        """Hop Limit 2 is forwarded with 1."""
        out = rewrite(nat.transparent, from_terminal(UDP() / b"x", hlim=2), packed(BACKEND))
        self.assertEqual(out[7], 1)

    def test_routing_header_with_segments_left_dropped(self) -> None:
        """A packet whose Routing Header still has segments left is not ours to rewrite."""
        raw = bytes(IPv6(src=COA, dst=VIP) / IPv6ExtHdrRouting(
            type=0, segleft=1, addresses=[HOA]) / UDP() / b"x")
        buf = bytearray(raw)
        self.assertIs(nat.transparent(buf, parse(buf), packed(BACKEND)),
                      nat.Drop.ROUTING_HEADER)

    def test_link_padding_cut(self) -> None:
        """Bytes past the IPv6 payload (Ethernet padding) are not forwarded."""
        raw = from_terminal(UDP() / b"x")
        out = rewrite(nat.transparent, raw + bytes(10), packed(BACKEND))
        self.assertEqual(len(out), len(raw))

    def test_esp(self) -> None:
        """ESP: destination rewritten, SPI and ciphertext bytes untouched."""
        raw = from_terminal(ESP(spi=0xDA, seq=3, data=b"\x99" * 40))
        out = rewrite(nat.transparent, raw, packed(BACKEND))
        self.assertEqual(IPv6(out).dst, BACKEND)
        self.assertEqual(out[40:], raw[40:])

    def test_udp_zero_checksum_left_alone(self) -> None:
        """A UDP checksum of 0 ("none") stays 0 rather than being made up."""
        raw = bytearray(from_terminal(UDP(sport=1, dport=2) / b"abc"))
        raw[64 + 6:64 + 8] = b"\x00\x00"
        out = rewrite(nat.transparent, bytes(raw), packed(BACKEND))
        self.assertEqual(out[70:72], b"\x00\x00")

    def test_udp_computed_zero_sent_as_ffff(self) -> None:
        """A UDP checksum that works out to 0 after the rewrite is sent as 0xFFFF."""
        probe = rewrite(nat.transparent, from_terminal(UDP(sport=1, dport=2) / bytes(2)),
                        packed(BACKEND))
        word = struct.unpack("!H", probe[70:72])[0]  # makes the new sum 0xFFFF
        raw = from_terminal(UDP(sport=1, dport=2) / struct.pack("!H", word))
        out = rewrite(nat.transparent, raw, packed(BACKEND))
        self.assertEqual(out[70:72], b"\xff\xff")
        self.assertChecksumRight(out)

    @settings(max_examples=200)
    @given(addresses, addresses, addresses, addresses, ports, ports, payloads,
           st.sampled_from(["udp", "tcp", "echo"]))
    def test_random(self, coa: str, hoa: str, vip: str, backend: str, sport: int,
                    dport: int, payload: bytes, kind: str) -> None:
        """For any addresses, ports and payload the checksum equals scapy's."""
        l4 = {"udp": UDP(sport=sport, dport=dport), "tcp": TCP(sport=sport, dport=dport),
              "echo": ICMPv6EchoRequest(id=sport, seq=dport)}[kind] / Raw(payload)
        raw = from_terminal(l4, hao=hao_header(hoa), coa=coa, vip=vip)
        out = rewrite(nat.transparent, raw, packed(backend))
        expected = bytearray(raw)
        expected[7] -= 1
        expected[24:40] = packed(backend)
        self.assertEqual(without_checksum(out), without_checksum(bytes(expected)))
        self.assertChecksumRight(out)


class TranslateTests(ChecksumAssertions, SynchronousTestCase):
    """translate(): HAO removed, source := home address, destination := backend."""

    def test_udp_with_hao(self) -> None:
        """The whole HAO-only header goes, the chain and payload length follow."""
        raw = from_terminal(UDP(sport=4000, dport=53) / b"query")
        out = rewrite(nat.translate, raw, packed(BACKEND))
        pkt = IPv6(out)
        self.assertEqual((pkt.src, pkt.dst, pkt.nh, pkt.plen), (HOA, BACKEND, 17, 8 + 5))
        self.assertNotIn(IPv6ExtHdrDestOpt, pkt)
        self.assertEqual(len(out), len(raw) - 24)
        self.assertEqual(bytes(pkt[UDP].payload), b"query")
        self.assertChecksumRight(out)

    def test_tcp_and_echo(self) -> None:
        """TCP and ICMPv6 echo checksums are right after translation."""
        for l4 in (TCP(sport=5, dport=80, flags="PA", seq=99) / b"GET /",
                   ICMPv6EchoRequest(id=1, seq=2, data=b"ping")):
            out = rewrite(nat.translate, from_terminal(l4), packed(BACKEND))
            self.assertEqual(IPv6(out).src, HOA)
            self.assertChecksumRight(out)

    def test_without_hao(self) -> None:
        """A packet without an HAO only has its destination rewritten."""
        raw = seal(bytes(IPv6(src=HOA, dst=VIP) / UDP(sport=9, dport=10) / b"home"))
        out = rewrite(nat.translate, raw, packed(BACKEND))
        self.assertEqual((IPv6(out).src, IPv6(out).dst), (HOA, BACKEND))
        self.assertChecksumRight(out)

    def test_hop_by_hop_before(self) -> None:
        """With a Hop-by-Hop header first, its Next Header is relinked past the removed header."""
        raw = seal(bytes(IPv6(src=COA, dst=VIP) / IPv6ExtHdrHopByHop() / hao_header()
                         / UDP(sport=1, dport=2) / b"abc"))
        out = rewrite(nat.translate, raw, packed(BACKEND))
        pkt = IPv6(out)
        self.assertEqual(pkt[IPv6ExtHdrHopByHop].nh, 17)
        self.assertNotIn(IPv6ExtHdrDestOpt, pkt)
        self.assertChecksumRight(out)

    def test_other_options_kept(self) -> None:
        """With other options the header stays, without the HAO or a padding run over 7."""
        unknown = HBHOptUnknown(otype=0x1E, optdata=b"abcd")
        raw = from_terminal(UDP(sport=1, dport=2) / b"abc", hao=hao_header(before=[unknown]))
        out = rewrite(nat.translate, raw, packed(BACKEND))
        pkt = IPv6(out)
        options = pkt[IPv6ExtHdrDestOpt].options
        self.assertFalse(any(isinstance(option, HAO) for option in options))
        self.assertIn(b"\x1e\x04abcd", bytes(pkt[IPv6ExtHdrDestOpt]))
        header = bytes(pkt[IPv6ExtHdrDestOpt])[:(out[41] + 1) * 8]
        self.assertLessEqual(max(padding_runs(header)), 7)
        self.assertEqual(pkt.plen, len(out) - 40)
        self.assertEqual(bytes(pkt[UDP].payload), b"abc")
        self.assertChecksumRight(out)

    @settings(max_examples=200)
    @given(st.lists(st.binary(max_size=20), max_size=3),
           st.lists(st.binary(max_size=20), max_size=3), payloads)
    def test_option_layouts(self, before: list[bytes], after: list[bytes],
                            payload: bytes) -> None:
        """Whatever options surround the HAO: they survive at their alignment modulo 8.

        The header is a multiple of 8 bytes, holds no padding run over 7 bytes (Linux
        drops those), and the checksum is right.
        """
        def options(datas: list[bytes]) -> list[Packet]:
            return [HBHOptUnknown(otype=0x1E + i, optdata=d) for i, d in enumerate(datas)]

        hao = hao_header(before=options(before), after=options(after))
        raw = from_terminal(UDP(sport=1, dport=2) / Raw(payload), hao=hao)
        buf = bytearray(raw)
        view = parse(buf)
        kept = _real_options(raw[view.hao_hdr:view.hao_hdr + view.hao_hdr_len], view.hao_opt
                             - view.hao_hdr)
        out = rewrite(nat.translate, raw, packed(BACKEND))
        after_view = parse(out)
        self.assertEqual(after_view.hoa, -1)
        if not kept:
            self.assertEqual(out[6], 17)
            self.assertEqual(len(out), len(raw) - view.hao_hdr_len)
        else:
            self.assertEqual(out[6], 60)
            header = out[40:40 + (out[41] + 1) * 8]
            self.assertEqual(len(header) % 8, 0)
            self.assertLessEqual(max(padding_runs(header)), 7)
            self.assertEqual([(o % 8, b) for o, b in _real_options(header, -1)],
                             [(o % 8, b) for o, b in kept])
        self.assertEqual(out[after_view.l4 + 8:], payload)
        self.assertChecksumRight(out)

    def test_esp(self) -> None:
        """ESP with an HAO: HAO gone, Next Header 50, SPI and ciphertext intact."""
        raw = from_terminal(ESP(spi=0xDA, seq=3, data=b"\x99" * 40))
        out = rewrite(nat.translate, raw, packed(BACKEND))
        pkt = IPv6(out)
        self.assertEqual((pkt.src, pkt.dst, pkt.nh), (HOA, BACKEND, 50))
        self.assertEqual(out[40:], raw[64:])

    def test_hop_limit_drop(self) -> None:
        """Hop Limit 1 is dropped before anything changes."""
        raw = from_terminal(UDP() / b"x", hlim=1)
        buf = bytearray(raw)
        self.assertIs(nat.translate(buf, parse(buf), packed(BACKEND)), nat.Drop.HOP_LIMIT)
        self.assertEqual(bytes(buf), raw)

    @settings(max_examples=200)
    @given(addresses, addresses, addresses, addresses, ports, ports, payloads,
           st.sampled_from(["udp", "tcp", "echo"]))
    def test_random(self, coa: str, hoa: str, vip: str, backend: str, sport: int,
                    dport: int, payload: bytes, kind: str) -> None:
        """For any addresses, ports and payload: HoA -> backend, no HAO, checksum = scapy's."""
        l4 = {"udp": UDP(sport=sport, dport=dport), "tcp": TCP(sport=sport, dport=dport),
              "echo": ICMPv6EchoRequest(id=sport, seq=dport)}[kind] / Raw(payload)
        raw = from_terminal(l4, hao=hao_header(hoa), coa=coa, vip=vip)
        out = rewrite(nat.translate, raw, packed(backend))
        self.assertNotIn(HAO, IPv6(out))
        expected = bytearray(raw[:40] + raw[64:])
        expected[4:6] = struct.pack("!H", len(expected) - 40)
        expected[6] = raw[40]
        expected[7] -= 1
        expected[8:40] = packed(hoa) + packed(backend)
        self.assertEqual(without_checksum(out), without_checksum(bytes(expected)))
        self.assertChecksumRight(out)


def without_checksum(raw: bytes) -> bytes:
    """``raw`` with its upper-layer checksum field zeroed, to compare everything else."""
    found = oracle(raw)
    if found is None:
        return raw
    return raw[:found[0]] + b"\x00\x00" + raw[found[0] + 2:]


def _real_options(header: bytes, skip: int) -> list[tuple[int, bytes]]:
    """(offset in header, bytes) of every option that is not padding and not at ``skip``."""
    found, i = [], 2
    while i < len(header):
        if header[i] == 0:
            i += 1
            continue
        size = header[i + 1] + 2
        if header[i] != 1 and i != skip:
            found.append((i, header[i:i + size]))
        i += size
    return found


def fragments(whole: bytes, chunk: int, ident: int = 0x1234) -> list[bytes]:
    """Fragment ``whole`` as an RFC-following sender would: the HAO in every fragment.

    scapy's fragment6() puts the HAO only in the first fragment, so this is done by
    hand.  ``chunk`` is a multiple of 8.
    """
    view = parse(whole)
    head, body = bytearray(whole[:view.l4]), whole[view.l4:]
    proto = head[view.l4_prev_nh]
    head[view.l4_prev_nh] = 44
    out = []
    for start in range(0, len(body), chunk):
        piece = body[start:start + chunk]
        more = int(start + chunk < len(body))
        frag = struct.pack("!BBHI", proto, 0, (start // 8) << 3 | more, ident)
        packet = bytearray(head) + frag + piece
        packet[4:6] = struct.pack("!H", len(packet) - 40)
        out.append(bytes(packet))
    return out


def reassemble(pieces: list[bytes]) -> bytes:
    """Reassemble fragments (RFC 8200 section 4.5): the first one's headers, payloads joined."""
    views = [parse(piece) for piece in pieces]
    first, first_view = pieces[0], views[0]
    head = bytearray(first[:first_view.frag])
    head[_header_before(head, first_view.frag)] = first[first_view.frag]
    body = bytearray()
    for piece, view in sorted(zip(pieces, views, strict=True), key=lambda p: p[1].frag_offset):
        assert view.frag_offset * 8 == len(body)
        body += piece[view.frag + 8:view.end]
    whole = head + body
    whole[4:6] = struct.pack("!H", len(whole) - 40)
    return bytes(whole)


def _header_before(packet: bytes | bytearray, target: int) -> int:
    """Offset of the Next Header byte that points at the header at ``target``."""
    prev, off = 6, 40
    while off < target:
        prev, off = off, off + ((packet[off + 1] + 1) << 3)
    return prev


class FragmentTests(ChecksumAssertions, SynchronousTestCase):
    """Fragments: addresses rewritten in each; the first carries the checksum adjustment."""

    @settings(max_examples=100)
    @given(st.binary(min_size=1, max_size=900), st.sampled_from([16, 64, 256, 512]),
           st.sampled_from(["translate", "transparent"]))
    def test_reassembled_checksum(self, payload: bytes, chunk: int, mode: str) -> None:
        """Each fragment is rewritten alone; the reassembled datagram's checksum is right."""
        whole = from_terminal(UDP(sport=7, dport=9) / Raw(payload))
        function = getattr(nat, mode)
        out = [rewrite(function, piece, packed(BACKEND)) for piece in fragments(whole, chunk)]
        for piece in out:
            pkt = IPv6(piece)
            self.assertEqual(pkt.dst, BACKEND)
            self.assertEqual(HAO in pkt, mode == "transparent")
            self.assertEqual(pkt.src, HOA if mode == "translate" else COA)
            self.assertEqual(pkt.plen, len(piece) - 40)
        whole_out = reassemble(out)
        self.assertEqual(bytes(IPv6(whole_out)[UDP].payload), payload)
        self.assertChecksumRight(whole_out)

    def test_non_first_fragment_translate(self) -> None:
        """A non-first fragment loses its HAO header; its payload bytes are untouched."""
        whole = from_terminal(UDP(sport=7, dport=9) / Raw(bytes(range(200))))
        second = fragments(whole, 64)[1]
        out = rewrite(nat.translate, second, packed(BACKEND))
        self.assertEqual(out[6], 44)
        self.assertEqual(out[40:], second[64:])
        self.assertEqual(out[8:40], packed(HOA) + packed(BACKEND))


def from_backend(l4: Packet, *, backend: str = BACKEND, dst: str = HOA,
                 hlim: int = 64) -> bytes:
    """A plain backend's packet towards the home address."""
    return bytes(IPv6(src=backend, dst=dst, hlim=hlim) / l4)


class ReplyTests(ChecksumAssertions, SynchronousTestCase):
    """reply(): source := virtual address, to the home address or via a Type 2 RH."""

    def test_to_home_address(self) -> None:
        """Without a confirmed care-of address the reply goes to the home address."""
        raw = from_backend(UDP(sport=53, dport=4000) / b"answer")
        out = rewrite(nat.reply, raw, packed(VIP))
        expected = IPv6(src=VIP, dst=HOA, hlim=63) / UDP(sport=53, dport=4000) / b"answer"
        self.assertEqual(out, bytes(expected))

    def test_via_care_of(self) -> None:
        """With a care-of address: RH2 carrying the HoA, sent to the CoA, as scapy builds it."""
        raw = from_backend(TCP(sport=80, dport=5000, flags="SA") / b"hello")
        out = rewrite(nat.reply, raw, packed(VIP), packed(COA), packed(HOA))
        expected = (IPv6(src=VIP, dst=COA, hlim=63)
                    / IPv6ExtHdrRouting(type=2, segleft=1, addresses=[HOA])
                    / TCP(sport=80, dport=5000, flags="SA") / b"hello")
        self.assertEqual(out, bytes(expected))
        self.assertChecksumRight(out)

    def test_after_hop_by_hop(self) -> None:
        """A Hop-by-Hop header stays first; the RH2 follows it."""
        raw = from_backend(IPv6ExtHdrHopByHop() / UDP(sport=1, dport=2) / b"x")
        out = rewrite(nat.reply, raw, packed(VIP), packed(COA))
        expected = (IPv6(src=VIP, dst=COA, hlim=63) / IPv6ExtHdrHopByHop()
                    / IPv6ExtHdrRouting(type=2, segleft=1, addresses=[HOA])
                    / UDP(sport=1, dport=2) / b"x")
        self.assertEqual(out, bytes(expected))

    def test_home_given_differs(self) -> None:
        """A ``home`` different from the destination becomes the final destination."""
        raw = seal(from_backend(UDP(sport=1, dport=2) / b"x", dst=COA2))
        out = rewrite(nat.reply, raw, packed(VIP), None, packed(HOA))
        self.assertEqual(out, bytes(IPv6(src=VIP, dst=HOA, hlim=63) / UDP(sport=1, dport=2)
                                    / b"x"))

    def test_transparent_backend_reply(self) -> None:
        """A MIPv6-aware backend's reply (RH2 already there) only gets the new source."""
        raw = bytes(IPv6(src=BACKEND, dst=COA)
                    / IPv6ExtHdrRouting(type=2, segleft=1, addresses=[HOA])
                    / UDP(sport=1, dport=2) / b"x")
        out = rewrite(nat.reply, raw, packed(VIP), packed(COA2))
        pkt = IPv6(out)
        self.assertEqual((pkt.src, pkt.dst, pkt[IPv6ExtHdrRouting].addresses), (VIP, COA, [HOA]))
        self.assertChecksumRight(out)

    def test_echo_reply(self) -> None:
        """An ICMPv6 echo reply is not an error: only its source changes."""
        raw = from_backend(ICMPv6EchoReply(id=3, seq=4, data=b"pong"))
        out = rewrite(nat.reply, raw, packed(VIP), packed(COA))
        self.assertEqual(IPv6(out)[ICMPv6EchoReply].data, b"pong")
        self.assertChecksumRight(out)

    def test_hop_limit_drop(self) -> None:
        """Hop Limit 1 on the return path is dropped too, buffer untouched."""
        raw = from_backend(UDP() / b"x", hlim=1)
        buf = bytearray(raw)
        self.assertIs(nat.reply(buf, parse(buf), packed(VIP)), nat.Drop.HOP_LIMIT)
        self.assertEqual(bytes(buf), raw)

    def test_fragmented_reply(self) -> None:
        """Fragments of a reply each get the RH2 before their Fragment header; reassembly works."""
        whole = from_backend(UDP(sport=1, dport=2) / Raw(bytes(range(256)) * 2))
        out = [rewrite(nat.reply, piece, packed(VIP), packed(COA)) for piece in
               fragments(whole, 128)]
        for piece in out:
            pkt = IPv6(piece)
            self.assertEqual((pkt.src, pkt.dst, pkt.nh), (VIP, COA, 43))
            self.assertEqual(pkt[IPv6ExtHdrRouting].nh, 44)
        self.assertChecksumRight(reassemble(out))

    @settings(max_examples=200)
    @given(addresses, addresses, addresses, addresses, ports, ports, payloads,
           st.booleans(), st.sampled_from(["udp", "tcp", "echo"]))
    def test_random(self, backend: str, hoa: str, vip: str, coa: str, sport: int,
                    dport: int, payload: bytes, confirmed: bool, kind: str) -> None:
        """For any addresses, ports, payload: byte-identical to scapy's build of the reply."""
        def l4() -> Packet:
            return {"udp": UDP(sport=sport, dport=dport), "tcp": TCP(sport=sport, dport=dport),
                    "echo": ICMPv6EchoReply(id=sport, seq=dport)}[kind] / Raw(payload)

        raw = from_backend(l4(), backend=backend, dst=hoa)
        if confirmed:
            out = rewrite(nat.reply, raw, packed(vip), packed(coa), packed(hoa))
            expected = (IPv6(src=vip, dst=coa, hlim=63)
                        / IPv6ExtHdrRouting(type=2, segleft=1, addresses=[hoa]) / l4())
        else:
            out = rewrite(nat.reply, raw, packed(vip), None, packed(hoa))
            expected = IPv6(src=vip, dst=hoa, hlim=63) / l4()
        self.assertEqual(out, bytes(expected))


class ICMPErrorTests(ChecksumAssertions, SynchronousTestCase):
    """ICMPv6 errors on the return path: outer header and quoted packet both turned back."""

    def _inbound(self, size: int, mode: str = "translate") -> tuple[bytes, bytes]:
        """(what the terminal sent, what the backend side received)."""
        sent = from_terminal(UDP(sport=4000, dport=53) / Raw(b"q" * size))
        return sent, rewrite(getattr(nat, mode), sent, packed(BACKEND))

    def _as_terminal_sees_it(self, sent: bytes, received: bytes) -> bytes:
        """The received packet with dst := VIP and the terminal's own UDP checksum."""
        fixed = bytearray(received)
        fixed[24:40] = packed(VIP)
        sent_view, view = parse(sent), parse(received)
        fixed[view.l4 + 6:view.l4 + 8] = sent[sent_view.l4 + 6:sent_view.l4 + 8]
        return bytes(fixed)

    def test_packet_too_big_via_care_of(self) -> None:
        """A full-size PTB stays within 1280 bytes after the RH2; quote and checksums right."""
        sent, received = self._inbound(1400)
        error = from_backend(ICMPv6PacketTooBig(mtu=1300) / received[:1280 - 48])
        self.assertEqual(len(error), 1280)
        out = rewrite(nat.reply, error, packed(VIP), packed(COA), packed(HOA))
        pkt = IPv6(out)
        self.assertLessEqual(len(out), nat.ICMPV6_ERROR_LIMIT)
        self.assertEqual(pkt.plen, len(out) - 40)
        self.assertEqual((pkt.src, pkt.dst, pkt[IPv6ExtHdrRouting].addresses), (VIP, COA, [HOA]))
        self.assertEqual(pkt[ICMPv6PacketTooBig].mtu, 1300)
        quote = out[40 + 24 + 8:]
        self.assertEqual(quote, self._as_terminal_sees_it(sent, received)[:len(quote)])
        self.assertEqual(len(quote) % 8, 0)
        self.assertChecksumRight(out)

    def test_packet_too_big_to_home(self) -> None:
        """Without a care-of address the error keeps its size; the quote reads HoA -> VIP."""
        sent, received = self._inbound(1400)
        error = from_backend(ICMPv6PacketTooBig(mtu=1300) / received[:1280 - 48])
        out = rewrite(nat.reply, error, packed(VIP))
        self.assertEqual(len(out), 1280)
        self.assertEqual(out[48:], self._as_terminal_sees_it(sent, received)[:1280 - 48])
        self.assertChecksumRight(out)

    def test_whole_quote_checksum_is_the_terminals(self) -> None:
        """A complete quote's UDP checksum is valid again for HoA -> VIP, by scapy's count."""
        _sent, received = self._inbound(20)
        error = from_backend(ICMPv6DestUnreach(code=4) / received)
        out = rewrite(nat.reply, error, packed(VIP), packed(COA))
        quote = bytes(out[40 + 24 + 8:])
        self.assertEqual(IPv6(quote).dst, VIP)
        self.assertChecksumRight(quote)
        self.assertChecksumRight(out)

    def test_transparent_quote_with_hao(self) -> None:
        """In transparent mode the quote keeps its HAO; dst and checksum turned back."""
        sent, received = self._inbound(20, mode="transparent")
        error = from_backend(ICMPv6DestUnreach(code=1) / received)
        out = rewrite(nat.reply, error, packed(VIP))
        quote = bytes(out[48:])
        self.assertEqual(quote, self._as_terminal_sees_it(sent, received))
        self.assertChecksumRight(quote)
        self.assertChecksumRight(out)

    def test_quoted_udp_zero_checksum_left_alone(self) -> None:
        """A quoted UDP checksum of 0 ("none") stays 0; the ICMPv6 checksum is right."""
        sent = from_terminal(UDP(sport=4000, dport=53) / Raw(b"q" * 20))
        sent = sent[:70] + b"\x00\x00" + sent[72:]  # from_terminal seals the checksum
        received = rewrite(nat.translate, sent, packed(BACKEND))
        error = from_backend(ICMPv6DestUnreach(code=4) / received)
        out = rewrite(nat.reply, error, packed(VIP))
        self.assertEqual(out[48:], self._as_terminal_sees_it(sent, received))
        self.assertEqual(out[48 + 46:48 + 48], b"\x00\x00")
        self.assertChecksumRight(out)

    def test_quoted_udp_computed_zero_sent_as_ffff(self) -> None:
        """A quoted UDP checksum that works out to 0 is 0xFFFF again, as the terminal sent it."""
        sent = zero_sum(lambda data: from_terminal(UDP(sport=4000, dport=53) / data), 70)
        self.assertEqual(sent[70:72], b"\xff\xff")
        received = rewrite(nat.translate, sent, packed(BACKEND))
        error = from_backend(ICMPv6DestUnreach(code=4) / received)
        out = rewrite(nat.reply, error, packed(VIP))
        self.assertEqual(out[48:], self._as_terminal_sees_it(sent, received))
        self.assertChecksumRight(out[48:])
        self.assertChecksumRight(out)

    def test_short_quotes(self) -> None:
        """Quotes cut anywhere (even inside the inner IPv6 header) still give a valid error."""
        _sent, received = self._inbound(100)
        for size in (0, 8, 39, 40, 41, 44, 46, 47, 48, 60):
            error = from_backend(ICMPv6DestUnreach(code=3) / Raw(received[:size]))
            out = rewrite(nat.reply, error, packed(VIP), packed(COA))
            self.assertChecksumRight(out)
            if size >= 40:
                self.assertEqual(out[72 + 24:72 + 40], packed(VIP))
            else:
                self.assertEqual(out[72:], received[:size])


class ErrorToBackendTests(ChecksumAssertions, SynchronousTestCase):
    """error_to_backend(): an error about one of our replies goes back to its backend."""

    def _our_reply(self, size: int, care_of: str | None = COA) -> tuple[bytes, bytes]:
        """(the backend's reply, what the balancer sent towards the terminal)."""
        sent = from_backend(TCP(sport=80, dport=5000, flags="A") / Raw(b"d" * size))
        out = rewrite(nat.reply, sent, packed(VIP), care_of and packed(care_of), packed(HOA))
        return sent, out

    def _error(self, about: bytes, icmp: Packet, limit: int = 1280) -> bytes:
        """A router's ICMPv6 error to the virtual address quoting ``about``."""
        return bytes(IPv6(src="2001:db8:99::1", dst=VIP) / icmp / about[:limit - 48])

    def _backend_view(self, sent: bytes) -> bytes:
        """The backend's reply as the quote should show it (we decremented the Hop Limit)."""
        return sent[:7] + bytes([sent[7] - 1]) + sent[8:]

    def test_packet_too_big_about_rh2_reply(self) -> None:
        """PTB: RH2 gone from the quote, quote = the backend's packet, MTU lowered by 24."""
        sent, ours = self._our_reply(1400)
        error = self._error(ours, ICMPv6PacketTooBig(mtu=1400))
        buf = bytearray(error)
        self.assertEqual(nat.quoted_addresses(buf, parse(buf)), (packed(VIP), packed(HOA)))
        out = rewrite(nat.error_to_backend, error, packed(BACKEND))
        pkt = IPv6(out)
        self.assertEqual((pkt.src, pkt.dst, pkt.hlim), ("2001:db8:99::1", BACKEND, 63))
        self.assertEqual(pkt[ICMPv6PacketTooBig].mtu, 1376)
        self.assertEqual(pkt.plen, len(out) - 40)
        quote = out[48:]
        self.assertEqual(len(quote), 1280 - 48 - 24)
        self.assertEqual(quote, self._backend_view(sent)[:len(quote)])
        self.assertChecksumRight(out)

    def test_mtu_not_below_minimum(self) -> None:
        """A lowered MTU stops at 1280, the IPv6 minimum."""
        _sent, ours = self._our_reply(1400)
        out = rewrite(nat.error_to_backend, self._error(ours, ICMPv6PacketTooBig(mtu=1290)),
                      packed(BACKEND))
        self.assertEqual(IPv6(out)[ICMPv6PacketTooBig].mtu, 1280)
        self.assertChecksumRight(out)

    def test_whole_quote_checksum(self) -> None:
        """A complete quote is byte-identical to what the backend sent, checksum included."""
        sent, ours = self._our_reply(30)
        out = rewrite(nat.error_to_backend, self._error(ours, ICMPv6DestUnreach(code=3)),
                      packed(BACKEND))
        self.assertEqual(out[48:], self._backend_view(sent))
        self.assertChecksumRight(out[48:])
        self.assertChecksumRight(out)

    def test_reply_without_rh2(self) -> None:
        """Without an RH2 in the quote only the quoted source changes; the MTU stays."""
        sent, ours = self._our_reply(1400, care_of=None)
        out = rewrite(nat.error_to_backend, self._error(ours, ICMPv6PacketTooBig(mtu=1400)),
                      packed(BACKEND))
        self.assertEqual(IPv6(out)[ICMPv6PacketTooBig].mtu, 1400)
        self.assertEqual(out[48:], self._backend_view(sent)[:1280 - 48])
        self.assertChecksumRight(out)

    def test_quoted_udp_zero_checksum_left_alone(self) -> None:
        """A quoted UDP checksum of 0 ("none") stays 0; the ICMPv6 checksum is right."""
        sent = from_backend(UDP(sport=53, dport=4000, chksum=0) / Raw(b"d" * 30))
        ours = rewrite(nat.reply, sent, packed(VIP), packed(COA), packed(HOA))
        out = rewrite(nat.error_to_backend, self._error(ours, ICMPv6DestUnreach(code=3)),
                      packed(BACKEND))
        self.assertEqual(out[48:], self._backend_view(sent))
        self.assertEqual(out[48 + 46:48 + 48], b"\x00\x00")
        self.assertChecksumRight(out)

    def test_quoted_udp_computed_zero_sent_as_ffff(self) -> None:
        """A quoted UDP checksum that works out to 0 is 0xFFFF again, as the backend sent it."""
        sent = zero_sum(lambda data: from_backend(UDP(sport=53, dport=4000) / data), 46)
        self.assertEqual(sent[46:48], b"\xff\xff")
        ours = rewrite(nat.reply, sent, packed(VIP), packed(COA), packed(HOA))
        out = rewrite(nat.error_to_backend, self._error(ours, ICMPv6DestUnreach(code=3)),
                      packed(BACKEND))
        self.assertEqual(out[48:], self._backend_view(sent))
        self.assertChecksumRight(out[48:])
        self.assertChecksumRight(out)

    def test_transparent_keeps_backend_rh2(self) -> None:
        """added_rh2=False: the backend's own RH2 and the MTU are left alone."""
        _sent, ours = self._our_reply(1400)
        out = rewrite(nat.error_to_backend, self._error(ours, ICMPv6PacketTooBig(mtu=1400)),
                      packed(BACKEND), False)
        pkt = IPv6(out)
        self.assertEqual(pkt[ICMPv6PacketTooBig].mtu, 1400)
        self.assertEqual(out[48 + 40:48 + 64], ours[40:64])
        self.assertEqual(out[48 + 8:48 + 24], packed(BACKEND))
        self.assertChecksumRight(out)

    def test_refusals(self) -> None:
        """Not an error, or a wrong ICMPv6 checksum: dropped with a reason, buffer untouched."""
        echo = from_backend(ICMPv6EchoRequest(), dst=VIP)
        bad = bytearray(self._error(self._our_reply(20)[1], ICMPv6DestUnreach()))
        bad[-1] ^= 1
        for raw, reason in ((echo, nat.Drop.NOT_AN_ERROR), (bytes(bad), nat.Drop.BAD_CHECKSUM)):
            buf = bytearray(raw)
            self.assertIs(nat.error_to_backend(buf, parse(buf), packed(BACKEND)), reason)
            self.assertEqual(bytes(buf), raw)


class FixL4Tests(SynchronousTestCase):
    """`nat._fix_l4` writes `update_transport`'s arithmetic out (the general path's every
    packet): held here to the reference, for each protocol it fixes and one it does not."""

    @given(
        csum=st.integers(0, 0xFFFF),
        old=st.binary(min_size=16, max_size=16),
        new=st.binary(min_size=16, max_size=16),
        proto=st.sampled_from([6, 17, 58, 135, 50]),
    )
    def test_same_as_update_transport(self, csum: int, old: bytes, new: bytes,
                                      proto: int) -> None:
        from lbproxy.wire.checksum import update_transport

        l4 = bytes(20) if proto == 6 else bytes(8)
        raw = bytearray(struct.pack("!IHBB", 6 << 28, len(l4), proto, 64) + old + new + l4)
        at = _CSUM_AT.get(proto)
        if at is not None:
            raw[40 + at : 42 + at] = csum.to_bytes(2, "big")
        view = parse(raw)
        before = bytes(raw)
        nat._fix_l4(raw, view, old, new)
        if at is None:  # ESP: nothing covers the addresses
            self.assertEqual(bytes(raw), before)
            return
        want = update_transport(csum, old, new, proto == 17)
        self.assertEqual(int.from_bytes(raw[40 + at : 42 + at], "big"), want)
        self.assertEqual(raw[: 40 + at] + raw[42 + at :], before[: 40 + at] + before[42 + at :])
