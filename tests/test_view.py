"""Tests for lbproxy.wire.view: the header-chain view.

Three kinds of evidence: golden bytes written by hand (one per rule and per malformed
reason), agreement with scapy's dissection of generated header chains (scapy is the
independent oracle here and only here: the runtime never imports it), and robustness on
random and mutated bytes (nothing but MalformedPacket ever escapes, and every offset a view
reports points at what it claims to).
"""

from __future__ import annotations

import ipaddress
import socket
import warnings
from typing import Any

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from twisted.trial.unittest import SynchronousTestCase

from lbproxy.wire.view import (
    MAX_EXTENSION_HEADERS,
    MalformedPacket,
    PacketView,
    Reason,
    parse,
)

with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    from scapy.compat import raw
    from scapy.layers.inet import TCP, UDP
    from scapy.layers.inet6 import (
        HAO,
        MIP6MH_BA,
        MIP6MH_BE,
        MIP6MH_BRR,
        MIP6MH_BU,
        HBHOptUnknown,
        ICMPv6EchoReply,
        ICMPv6EchoRequest,
        IPv6,
        IPv6ExtHdrDestOpt,
        IPv6ExtHdrFragment,
        IPv6ExtHdrHopByHop,
        IPv6ExtHdrRouting,
        IPv6ExtHdrSegmentRouting,
        MIP6MH_CoTI,
        MIP6MH_HoTI,
        Pad1,
        PadN,
        _MobilityHeader,
    )
    from scapy.layers.ipsec import AH, ESP
    from scapy.packet import NoPayload, Packet, Padding, Raw


FIELDS = (
    "end", "hoa", "hao_opt", "hao_hdr", "hao_hdr_len", "hao_prev_nh", "rh2", "rh", "rh_len",
    "rh_prev_nh", "frag", "frag_id", "frag_offset", "frag_more", "spi", "esp", "ah", "mh",
    "mh_type", "proto", "l4", "l4_prev_nh", "sport", "dport",
)

SRC = bytes.fromhex("20010db8000200000000000000000005")  # 2001:db8:2::5, a care-of address
DST = bytes.fromhex("20010db8000000000000000000000001")  # 2001:db8::1, the virtual address
HOME = bytes.fromhex("20010db8000100000000000000000016")  # 2001:db8:1::16, a home address


# --- golden bytes, built by hand (no scapy) ------------------------------------------------

def ipv6(nh: int, payload: bytes, plen: int | None = None, version: int = 6) -> bytes:
    """An IPv6 header (hop limit 64) followed by *payload*."""
    length = len(payload) if plen is None else plen
    return (
        bytes([version << 4, 0, 0, 0])
        + length.to_bytes(2, "big")
        + bytes([nh, 64])
        + SRC
        + DST
        + payload
    )


def options_header(nh: int, options: bytes) -> bytes:
    """A Hop-by-Hop or Destination Options header holding exactly *options*."""
    body = bytes([nh, 0]) + options
    assert len(body) % 8 == 0, "caller pads"
    return bytes([nh, len(body) // 8 - 1]) + options


def hao(address: bytes = HOME, length: int = 16) -> bytes:
    """A Home Address Option (RFC 6275 section 6.3)."""
    return bytes([0xC9, length]) + address


def dstopt_hao(nh: int, address: bytes = HOME) -> bytes:
    """The canonical 24-byte Destination Options header: PadN(2), HAO."""
    return bytes([nh, 2, 1, 2, 0, 0]) + hao(address)


def udp(sport: int = 1234, dport: int = 53, data: bytes = b"") -> bytes:
    """A UDP header (checksum not computed: the view does not look at it)."""
    return (
        sport.to_bytes(2, "big")
        + dport.to_bytes(2, "big")
        + (8 + len(data)).to_bytes(2, "big")
        + b"\0\0"
        + data
    )


def tcp(sport: int = 40000, dport: int = 80) -> bytes:
    """A 20-byte TCP header."""
    return sport.to_bytes(2, "big") + dport.to_bytes(2, "big") + bytes(8) + b"\x50\x02" + bytes(6)


def rh2(nh: int, address: bytes = HOME) -> bytes:
    """A Type 2 Routing Header (RFC 6275 section 6.4)."""
    return bytes([nh, 2, 2, 1, 0, 0, 0, 0]) + address


def fragment(nh: int, offset: int = 0, more: bool = False, ident: int = 0xDEADBEEF) -> bytes:
    """A Fragment header (RFC 8200 section 4.5)."""
    return bytes([nh, 0]) + ((offset << 3) | int(more)).to_bytes(2, "big") + ident.to_bytes(
        4, "big"
    )


def ah(nh: int) -> bytes:
    """An Authentication Header with a 12-byte ICV (24 bytes, Payload Len 4)."""
    return bytes([nh, 4, 0, 0]) + (0x1234).to_bytes(4, "big") + (1).to_bytes(4, "big") + bytes(12)


def esp(spi: int = 0xDA) -> bytes:
    """An ESP header and some ciphertext."""
    return spi.to_bytes(4, "big") + (1).to_bytes(4, "big") + bytes(24)


def mh(mh_type: int = 5) -> bytes:
    """A 16-byte Mobility Header of *mh_type* (payload proto 59)."""
    return bytes([59, 1, mh_type, 0, 0, 0]) + bytes(10)


def view_fields(view: PacketView) -> dict[str, Any]:
    """Every contract field of *view*."""
    return {name: getattr(view, name) for name in FIELDS}


def absent(**present: Any) -> dict[str, Any]:
    """The expected fields: -1 (False for frag_more) except *present*."""
    fields: dict[str, Any] = {name: -1 for name in FIELDS}
    fields["frag_more"] = False
    fields.update(present)
    return fields


class GoldenViewTests(SynchronousTestCase):
    """Hand-built packets of each shape the balancer meets, field by field."""

    def test_plain_udp(self) -> None:
        """IPv6 + UDP: ports, l4 right after the fixed header, nothing else."""
        buf = ipv6(17, udp(1234, 53, b"hello"))
        self.assertEqual(
            view_fields(parse(buf)),
            absent(end=len(buf), proto=17, l4=40, l4_prev_nh=6, sport=1234, dport=53),
        )

    def test_canonical_hao_udp(self) -> None:
        """The canonical HAO header ``NH 02 01 02 00 00 C9 10 <HoA>``: all offsets found."""
        buf = ipv6(60, dstopt_hao(17) + udp(5000, 7))
        view = parse(buf)
        self.assertEqual(
            view_fields(view),
            absent(
                end=len(buf), hoa=48, hao_opt=46, hao_hdr=40, hao_hdr_len=24, hao_prev_nh=6,
                proto=17, l4=64, l4_prev_nh=40, sport=5000, dport=7,
            ),
        )
        self.assertEqual(buf[view.hoa : view.hoa + 16], HOME)

    def test_hao_with_pad1_layout(self) -> None:
        """An HAO placed with Pad1s instead of PadN is found by the general option walk."""
        buf = ipv6(60, options_header(6, b"\0\0\0\0" + hao()) + tcp(1, 2))
        view = parse(buf)
        self.assertEqual((view.hao_opt, view.hoa, view.hao_hdr_len), (46, 48, 24))
        self.assertEqual((view.proto, view.sport, view.dport), (6, 1, 2))

    def test_hao_among_unknown_options(self) -> None:
        """Skippable unknown options before and after the HAO are stepped over."""
        options = b"\x1e\x02ab" + bytes([1, 0]) + hao() + b"\x3e\x04abcd"
        buf = ipv6(60, options_header(59, options))
        view = parse(buf)
        self.assertEqual((view.hao_opt, view.hoa, view.hao_hdr_len), (48, 50, 32))
        self.assertEqual((view.proto, view.l4), (59, 72))

    def test_rh2_then_hao_then_tcp(self) -> None:
        """Type 2 Routing Header before the HAO header: both recorded, with their NH bytes."""
        buf = ipv6(43, rh2(60) + dstopt_hao(6) + tcp(40000, 443))
        self.assertEqual(
            view_fields(parse(buf)),
            absent(
                end=len(buf), rh=40, rh_len=24, rh_prev_nh=6, rh2=48, hoa=72, hao_opt=70,
                hao_hdr=64, hao_hdr_len=24, hao_prev_nh=40, proto=6, l4=88, l4_prev_nh=64,
                sport=40000, dport=443,
            ),
        )

    def test_routing_type_0_has_no_rh2(self) -> None:
        """Only a Type 2 Routing Header sets rh2."""
        buf = ipv6(43, bytes([17, 2, 0, 1, 0, 0, 0, 0]) + HOME + udp())
        view = parse(buf)
        self.assertEqual((view.rh, view.rh_len, view.rh2, view.l4), (40, 24, -1, 64))

    def test_esp(self) -> None:
        """ESP ends the walk; the SPI is read as an unsigned 32-bit number."""
        buf = ipv6(50, esp(0xFEDCBA98))
        self.assertEqual(
            view_fields(parse(buf)),
            absent(end=len(buf), esp=40, spi=0xFEDCBA98, proto=50, l4=40, l4_prev_nh=6),
        )

    def test_hao_then_esp(self) -> None:
        """An HAO before ESP is allowed and both are reported."""
        buf = ipv6(60, dstopt_hao(50) + esp(7))
        view = parse(buf)
        self.assertEqual((view.hoa, view.esp, view.spi, view.proto), (48, 64, 7, 50))

    def test_first_fragment_walks_on(self) -> None:
        """A first fragment (offset 0, M set) is walked into: ports are reported."""
        buf = ipv6(60, dstopt_hao(44) + fragment(17, 0, True, 99) + udp(9, 10))
        self.assertEqual(
            view_fields(parse(buf)),
            absent(
                end=len(buf), hoa=48, hao_opt=46, hao_hdr=40, hao_hdr_len=24, hao_prev_nh=6,
                frag=64, frag_id=99, frag_offset=0, frag_more=True, proto=17, l4=72,
                l4_prev_nh=64, sport=9, dport=10,
            ),
        )

    def test_non_first_fragment_stops(self) -> None:
        """A non-first fragment stops at the Fragment header: proto 44, l4 the payload."""
        buf = ipv6(60, dstopt_hao(44) + fragment(17, 185, False, 0xFFFFFFFF) + b"\x04\xd2" * 8)
        view = parse(buf)
        self.assertEqual(
            view_fields(view),
            absent(
                end=len(buf), hoa=48, hao_opt=46, hao_hdr=40, hao_hdr_len=24, hao_prev_nh=6,
                frag=64, frag_id=0xFFFFFFFF, frag_offset=185, frag_more=False, proto=44,
                l4=72, l4_prev_nh=64,
            ),
        )
        self.assertEqual(buf[view.l4_prev_nh], 17, "the fragmented protocol stays readable")

    def test_ah_then_udp(self) -> None:
        """AH is stepped over by its 4-octet-unit length."""
        buf = ipv6(51, ah(17) + udp(1, 2))
        view = parse(buf)
        self.assertEqual((view.ah, view.proto, view.l4, view.l4_prev_nh), (40, 17, 64, 40))

    def test_binding_update(self) -> None:
        """A Binding Update (HAO + MH type 5) reports the MH offset and type."""
        buf = ipv6(60, dstopt_hao(135) + mh(5))
        view = parse(buf)
        self.assertEqual(
            (view.hoa, view.mh, view.mh_type, view.proto, view.l4), (48, 64, 5, 135, 64)
        )

    def test_hop_by_hop_first(self) -> None:
        """Hop-by-Hop directly after the IPv6 header is walked (Router Alert here)."""
        buf = ipv6(0, options_header(58, bytes([5, 2, 0, 0, 1, 0])) + bytes([128, 0, 0, 0]))
        view = parse(buf)
        self.assertEqual((view.proto, view.l4, view.l4_prev_nh, view.sport), (58, 48, 40, -1))

    def test_no_next_header(self) -> None:
        """Next Header 59 ends the walk, even with nothing after it."""
        buf = ipv6(59, b"")
        self.assertEqual(view_fields(parse(buf)), absent(end=40, proto=59, l4=40, l4_prev_nh=6))

    def test_unknown_protocol_is_upper_layer(self) -> None:
        """An unknown Next Header value is reported as the upper layer, unread."""
        buf = ipv6(253, b"\xff" * 3)
        view = parse(buf)
        self.assertEqual((view.proto, view.l4, view.sport), (253, 40, -1))

    def test_link_padding_ignored(self) -> None:
        """Bytes past the IPv6 payload length (Ethernet padding) are not parsed."""
        buf = ipv6(59, b"") + b"\x3c\x05" * 11
        self.assertEqual((parse(buf).end, parse(buf).proto, parse(buf).l4), (40, 59, 40))

    def test_buffer_types_agree(self) -> None:
        """bytes, bytearray and memoryview give the same view."""
        buf = ipv6(43, rh2(60) + dstopt_hao(44) + fragment(51, 0, True) + ah(17) + udp(3, 4))
        expected = view_fields(parse(buf))
        self.assertEqual(view_fields(parse(bytearray(buf))), expected)
        self.assertEqual(view_fields(parse(memoryview(buf))), expected)
        self.assertEqual(view_fields(parse(memoryview(bytearray(buf)))), expected)

    def test_sixteen_headers_allowed(self) -> None:
        """Exactly MAX_EXTENSION_HEADERS extension headers are accepted."""
        empty = bytes([60, 0, 1, 4, 0, 0, 0, 0])
        last = bytes([17, 0, 1, 4, 0, 0, 0, 0])
        buf = ipv6(60, empty * (MAX_EXTENSION_HEADERS - 1) + last + udp())
        view = parse(buf)
        self.assertEqual((view.proto, view.l4), (17, 40 + 8 * MAX_EXTENSION_HEADERS))

    def test_view_holds_only_ints(self) -> None:
        """The view holds no reference to the buffer: every slot is an int (or bool)."""
        view = parse(ipv6(43, rh2(60) + dstopt_hao(50) + esp()))
        self.assertFalse(hasattr(view, "__dict__"))
        for name in PacketView.__slots__:
            self.assertIsInstance(getattr(view, name), int, name)

    def test_repr_lists_present_fields(self) -> None:
        """repr() names the fields that are present and leaves out the absent ones."""
        text = repr(parse(ipv6(60, dstopt_hao(17) + udp(1, 2))))
        self.assertIn("hoa=48", text)
        self.assertIn("sport=1", text)
        self.assertNotIn("spi", text)


class MalformedTests(SynchronousTestCase):
    """One golden packet (at least) per Reason; the reason is typed, the text explains."""

    def assertReason(self, buf: bytes, reason: Reason) -> MalformedPacket:
        """parse(buf) raises MalformedPacket with *reason* and a non-empty message."""
        exc = self.assertRaises(MalformedPacket, parse, buf)
        self.assertIs(exc.reason, reason, str(exc))
        self.assertIsInstance(exc, ValueError)
        self.assertTrue(str(exc).startswith(reason.value + ": "), str(exc))
        return exc

    def test_not_ipv6(self) -> None:
        """An IPv4 header (long or short) and a version-0 buffer are NOT_IPV6."""
        ipv4 = bytes.fromhex("4500001c000000004011") + bytes(18)
        self.assertReason(ipv4, Reason.NOT_IPV6)
        self.assertReason(ipv4 + bytes(40), Reason.NOT_IPV6)
        self.assertReason(ipv6(17, udp(), version=4), Reason.NOT_IPV6)
        self.assertReason(bytes(60), Reason.NOT_IPV6)

    def test_shorter_than_ipv6_header(self) -> None:
        """Fewer than 40 bytes (or none) is TRUNCATED."""
        self.assertReason(b"", Reason.TRUNCATED)
        self.assertReason(ipv6(59, b"")[:39], Reason.TRUNCATED)

    def test_bad_payload_length(self) -> None:
        """A payload length past the end of the buffer is BAD_PAYLOAD_LENGTH."""
        self.assertReason(ipv6(17, udp(), plen=9), Reason.BAD_PAYLOAD_LENGTH)
        self.assertReason(ipv6(59, b"", plen=0xFFFF), Reason.BAD_PAYLOAD_LENGTH)

    def test_truncated_headers(self) -> None:
        """Each header kind cut short by the payload length is TRUNCATED."""
        cases = {
            "udp": ipv6(17, udp()[:7]),
            "tcp": ipv6(6, tcp()[:19]),
            "icmpv6": ipv6(58, b"\x80\x00\x00"),
            "empty after IPv6 header": ipv6(60, b""),
            "one byte of options header": ipv6(60, b"\x11"),
            "options header": ipv6(60, dstopt_hao(17)[:23]),
            "routing": ipv6(43, rh2(17)[:23]),
            "short type 2 routing": ipv6(43, bytes([17, 0, 2, 1, 0, 0, 0, 0])),
            "fragment": ipv6(44, fragment(17)[:7]),
            "ah": ipv6(51, ah(17)[:23]),
            "esp": ipv6(50, esp()[:7]),
            "mobility header": ipv6(135, mh()[:15]),
            "upper layer after HAO": ipv6(60, dstopt_hao(17) + udp()[:4]),
            "jumbogram": ipv6(0, b"", plen=0) + options_header(17, bytes([0xC2, 4, 0, 1, 0, 0])),
        }
        for name, buf in cases.items():
            with self.subTest(name):
                self.assertReason(buf, Reason.TRUNCATED)

    def test_link_padding_is_not_header_bytes(self) -> None:
        """A header that only fits by using bytes past the payload length is TRUNCATED."""
        buf = ipv6(17, udp())
        cut = buf[:4] + (4).to_bytes(2, "big") + buf[6:]
        self.assertReason(cut, Reason.TRUNCATED)

    def test_options_header_in_link_padding(self) -> None:
        """An options header that only fits by using bytes past the payload length is TRUNCATED."""
        buf = ipv6(60, dstopt_hao(59))
        cut = buf[:4] + (16).to_bytes(2, "big") + buf[6:]
        self.assertReason(cut, Reason.TRUNCATED)

    def test_option_overruns_header(self) -> None:
        """An option whose length runs past its header is BAD_OPTION_LENGTH."""
        self.assertReason(
            ipv6(60, options_header(17, bytes([1, 5, 0, 0, 0, 0])) + udp()),
            Reason.BAD_OPTION_LENGTH,
        )
        self.assertReason(
            ipv6(0, options_header(17, bytes([0x1E, 5, 0, 0, 0, 0])) + udp()),
            Reason.BAD_OPTION_LENGTH,
        )

    def test_option_without_length_byte(self) -> None:
        """A non-Pad1 option type in the header's last byte is BAD_OPTION_LENGTH."""
        self.assertReason(
            ipv6(60, options_header(17, bytes([0, 0, 0, 0, 0, 1])) + udp()),
            Reason.BAD_OPTION_LENGTH,
        )

    def test_hao_length_not_16(self) -> None:
        """An HAO whose option length is not 16 is BAD_HAO_LENGTH, shorter or longer."""
        self.assertReason(
            ipv6(60, options_header(17, bytes([1, 0]) + hao(HOME[:8], 8) + bytes(10)) + udp()),
            Reason.BAD_HAO_LENGTH,
        )
        self.assertReason(
            ipv6(60, options_header(17, hao(HOME + b"\0\0", 18) + bytes(2)) + udp()),
            Reason.BAD_HAO_LENGTH,
        )

    def test_two_hao_in_one_header(self) -> None:
        """Two HAOs in one Destination Options header are DUPLICATE_HAO."""
        options = bytes([1, 2, 0, 0]) + hao() + bytes([1, 4, 0, 0, 0, 0]) + hao()
        self.assertReason(ipv6(60, options_header(17, options) + udp()), Reason.DUPLICATE_HAO)

    def test_hao_in_two_headers(self) -> None:
        """HAOs in two Destination Options headers are DUPLICATE_HAO."""
        buf = ipv6(60, dstopt_hao(60) + dstopt_hao(17, SRC) + udp())
        self.assertReason(buf, Reason.DUPLICATE_HAO)

    def test_hao_in_hop_by_hop(self) -> None:
        """An HAO in the Hop-by-Hop header is HAO_MISPLACED."""
        self.assertReason(ipv6(0, dstopt_hao(17) + udp()), Reason.HAO_MISPLACED)

    def test_hao_before_routing_header(self) -> None:
        """An HAO in a Destination Options header before the Routing header is misplaced."""
        self.assertReason(ipv6(60, dstopt_hao(43) + rh2(17) + udp()), Reason.HAO_MISPLACED)

    def test_hao_after_fragment(self) -> None:
        """An HAO after the Fragment header (in the fragmentable part) is misplaced."""
        buf = ipv6(44, fragment(60, 0, True) + dstopt_hao(17) + udp())
        self.assertReason(buf, Reason.HAO_MISPLACED)

    def test_hao_after_ah(self) -> None:
        """An HAO after AH is misplaced: RFC 6275 puts it before AH and ESP."""
        self.assertReason(ipv6(51, ah(60) + dstopt_hao(17) + udp()), Reason.HAO_MISPLACED)

    def test_length_checked_before_duplicate_and_place(self) -> None:
        """Precedence: a bad-length second HAO is BAD_HAO_LENGTH; a misplaced second, DUPLICATE."""
        bad = bytes([1, 0]) + hao(HOME[:8], 8) + bytes(10)
        buf = ipv6(60, dstopt_hao(60) + options_header(17, bad) + udp())
        self.assertReason(buf, Reason.BAD_HAO_LENGTH)
        buf = ipv6(60, dstopt_hao(44) + fragment(60) + dstopt_hao(17) + udp())
        self.assertReason(buf, Reason.DUPLICATE_HAO)

    def test_too_many_headers(self) -> None:
        """More than MAX_EXTENSION_HEADERS extension headers is TOO_MANY_HEADERS."""
        empty = bytes([60, 0, 1, 4, 0, 0, 0, 0])
        buf = ipv6(60, empty * MAX_EXTENSION_HEADERS + bytes([17, 0, 1, 4, 0, 0, 0, 0]) + udp())
        self.assertReason(buf, Reason.TOO_MANY_HEADERS)

    def test_hop_by_hop_not_first(self) -> None:
        """Hop-by-Hop anywhere but directly after the IPv6 header is BAD_EXTENSION_ORDER."""
        buf = ipv6(60, options_header(0, bytes([1, 4, 0, 0, 0, 0])) + options_header(17, bytes(6)))
        self.assertReason(buf + udp(), Reason.BAD_EXTENSION_ORDER)

    def test_second_routing_header(self) -> None:
        """Two Routing headers are BAD_EXTENSION_ORDER."""
        self.assertReason(ipv6(43, rh2(43) + rh2(17) + udp()), Reason.BAD_EXTENSION_ORDER)

    def test_second_fragment_header(self) -> None:
        """Two Fragment headers are BAD_EXTENSION_ORDER."""
        buf = ipv6(44, fragment(44, 0, True) + fragment(17, 0, True) + udp())
        self.assertReason(buf, Reason.BAD_EXTENSION_ORDER)


# --- scapy as the oracle -------------------------------------------------------------------

addresses = st.integers(0, 2**96 - 1).map(
    lambda low: str(ipaddress.IPv6Address((0x20010DB8 << 96) | low))
)
# RFC 3692 experimental option types: every action bit pattern, none known to scapy.
_experimental_option = st.builds(
    lambda otype, data: HBHOptUnknown(otype=otype, optdata=data),
    st.sampled_from([0x1E, 0x3E, 0x5E, 0x7E, 0x9E, 0xBE, 0xDE, 0xFE]),
    st.binary(max_size=7),
)
_filler_option = st.one_of(
    st.just(Pad1()).map(lambda p: p.copy()),
    st.binary(max_size=6).map(lambda data: PadN(optdata=data)),
    _experimental_option,
)


@st.composite
def _options(draw: st.DrawFn, with_hao: bool) -> list[Packet]:
    """Option lists with Pad1/PadN/unknown options and, when asked, one HAO anywhere."""
    options: list[Packet] = draw(st.lists(_filler_option, max_size=3))
    if with_hao:
        options.insert(draw(st.integers(0, len(options))), HAO(hoa=draw(addresses)))
    return options


_MOBILITY = [
    lambda seq: MIP6MH_BU(seq=seq),
    lambda seq: MIP6MH_BA(seq=seq, status=0),
    lambda seq: MIP6MH_BRR(),
    lambda seq: MIP6MH_HoTI(cookie=seq),
    lambda seq: MIP6MH_CoTI(cookie=seq),
    lambda seq: MIP6MH_BE(status=1, ha="2001:db8:1::16"),
]


@st.composite
def _upper(draw: st.DrawFn) -> tuple[int, Packet]:
    """The end of a chain: (its Next Header value, the scapy layers)."""
    kind = draw(st.sampled_from(["udp", "tcp", "icmp", "esp", "mh", "none", "unknown"]))
    data = draw(st.binary(max_size=24))
    ports = st.integers(0, 0xFFFF)
    if kind == "udp":
        return 17, UDP(sport=draw(ports), dport=draw(ports)) / Raw(data)
    if kind == "tcp":
        return 6, TCP(sport=draw(ports), dport=draw(ports), flags="S")
    if kind == "icmp":
        echo = draw(st.sampled_from([ICMPv6EchoRequest, ICMPv6EchoReply]))
        return 58, echo(id=draw(ports), data=data)
    if kind == "esp":
        # SPI 0 is reserved (RFC 4303 section 2.1); scapy reads it as a NAT-T marker.
        return 50, ESP(spi=draw(st.integers(1, 2**32 - 1)), seq=1, data=data)
    if kind == "mh":
        return 135, draw(st.sampled_from(_MOBILITY))(draw(ports))
    if kind == "none":
        return 59, Raw(data)
    return draw(st.sampled_from([253, 254])), Raw(data)


@st.composite
def chains(draw: st.DrawFn) -> bytes:
    """Valid header chains in the order RFC 8200 section 4.1 and RFC 6275 section 6.3 ask.

    IPv6 [HbH] [DestOpt] [Routing 0/2/4] [DestOpt{HAO}] [Fragment] [AH] [DestOpt] upper,
    where a non-first fragment ends the chain with opaque bytes.  Each header's Next
    Header is set explicitly (scapy's AH does not fill it in).
    """
    headers: list[tuple[int, Packet]] = []
    if draw(st.booleans()):
        headers.append((0, IPv6ExtHdrHopByHop(options=draw(_options(False)))))
    if draw(st.booleans()):
        headers.append((60, IPv6ExtHdrDestOpt(options=draw(_options(False)))))
    routing = draw(st.sampled_from([None, 0, 2, 4]))
    if routing == 2:
        headers.append((43, IPv6ExtHdrRouting(type=2, segleft=1, addresses=[draw(addresses)])))
    elif routing == 0:
        hops = draw(st.lists(addresses, min_size=1, max_size=3))
        headers.append((43, IPv6ExtHdrRouting(type=0, segleft=len(hops), addresses=hops)))
    elif routing == 4:
        headers.append((43, IPv6ExtHdrSegmentRouting(addresses=[draw(addresses)])))
    if draw(st.booleans()):
        headers.append((60, IPv6ExtHdrDestOpt(options=draw(_options(True)))))
    fragmented = draw(st.sampled_from([None, "first", "later"]))
    if fragmented is not None:
        offset = 0 if fragmented == "first" else draw(st.integers(1, 0x1FFF))
        header = IPv6ExtHdrFragment(
            offset=offset, m=draw(st.integers(0, 1)), id=draw(st.integers(0, 2**32 - 1))
        )
        headers.append((44, header))
    if fragmented == "later":
        last_nh: int = draw(st.sampled_from([6, 17, 58, 60, 51, 50]))
        tail: Packet = Raw(draw(st.binary(max_size=32)))
    else:
        if draw(st.booleans()):
            icv = draw(st.sampled_from([4, 12, 20]))
            headers.append(
                (51, AH(payloadlen=(12 + icv) // 4 - 2, spi=draw(st.integers(0, 2**32 - 1)),
                        seq=1, icv=b"\xaa" * icv))
            )
        if draw(st.booleans()):
            headers.append((60, IPv6ExtHdrDestOpt(options=draw(_options(False)))))
        last_nh, tail = draw(_upper())
    first_nh = headers[0][0] if headers else last_nh
    packet = IPv6(src=draw(addresses), dst=draw(addresses), nh=first_nh)
    for index, (_, layer) in enumerate(headers):
        layer.nh = headers[index + 1][0] if index + 1 < len(headers) else last_nh
        packet = packet / layer
    data = raw(packet / tail)
    return data + draw(st.binary(max_size=8))  # maybe link-layer padding


_EXTENSIONS = (
    IPv6ExtHdrHopByHop, IPv6ExtHdrDestOpt, IPv6ExtHdrRouting, IPv6ExtHdrSegmentRouting,
    IPv6ExtHdrFragment, AH,
)


def _scapy_headers(data: bytes) -> list[tuple[int, int, Packet]]:
    """(offset, Next Header value naming it, layer) for each header scapy finds after IPv6.

    Offsets come from the lengths of scapy's re-encoded layers.  scapy does not dissect
    past a transport-mode AH, so the bytes after it are dissected again behind a copy of
    the IPv6 header whose Next Header is AH's.
    """
    found: list[tuple[int, int, Packet]] = []
    outer = IPv6(data)
    end = 40 + outer.plen
    base, current, nh = 0, outer, outer.nh
    while True:
        layer = current.payload
        while True:
            offset = base + len(raw(current)) - len(raw(layer))
            found.append((offset, nh, layer))
            if isinstance(layer, AH) or not isinstance(layer, _EXTENSIONS):
                break
            if isinstance(layer, IPv6ExtHdrFragment) and layer.offset:
                break
            nh, layer = layer.nh, layer.payload
        if not isinstance(layer, AH):
            return found
        after = offset + (layer.payloadlen + 2) * 4
        header = bytearray(data[:40])
        header[4:6] = (end - after).to_bytes(2, "big")
        header[6] = nh = layer.nh
        current = IPv6(bytes(header) + data[after:])
        base = after - 40


def scapy_view(data: bytes) -> dict[str, Any]:
    """The fields a PacketView of *data* must have, according to scapy."""
    expected = absent(end=40 + IPv6(data).plen)
    prev = 6
    for offset, nh, layer in _scapy_headers(data):
        if isinstance(layer, (IPv6ExtHdrHopByHop, IPv6ExtHdrDestOpt)):
            position = offset + 2
            for option in layer.options:
                if isinstance(option, HAO):
                    expected.update(
                        hao_opt=position, hoa=position + 2, hao_hdr=offset,
                        hao_hdr_len=(layer.len + 1) * 8, hao_prev_nh=prev,
                    )
                    assert data[position + 2 : position + 18] == socket.inet_pton(
                        socket.AF_INET6, option.hoa
                    )
                position += len(raw(option))
        elif isinstance(layer, (IPv6ExtHdrRouting, IPv6ExtHdrSegmentRouting)):
            expected.update(rh=offset, rh_len=(layer.len + 1) * 8, rh_prev_nh=prev)
            if layer.type == 2:
                expected["rh2"] = offset + 8
        elif isinstance(layer, IPv6ExtHdrFragment):
            expected.update(
                frag=offset, frag_id=layer.id, frag_offset=layer.offset, frag_more=bool(layer.m)
            )
            if layer.offset:
                expected.update(proto=44, l4=offset + 8, l4_prev_nh=offset)
                return expected
        elif isinstance(layer, AH):
            expected["ah"] = offset
        else:
            expected.update(proto=nh, l4=offset, l4_prev_nh=prev)
            if isinstance(layer, ESP):
                expected.update(esp=offset, spi=layer.spi)
            elif isinstance(layer, _MobilityHeader):
                expected.update(mh=offset, mh_type=layer.mhtype)
            elif isinstance(layer, (TCP, UDP)):
                expected.update(sport=layer.sport, dport=layer.dport)
            else:
                assert isinstance(layer, (Raw, NoPayload, Padding, ICMPv6EchoRequest,
                                          ICMPv6EchoReply)), repr(layer)
            return expected
        prev = offset
    raise AssertionError("scapy found no upper layer")


ORACLE = settings(
    max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow]
)


class ScapyAgreementTests(SynchronousTestCase):
    """The view agrees with scapy's dissection of the same bytes on every field."""

    @ORACLE
    @given(chains())
    def test_agrees_with_scapy(self, data: bytes) -> None:
        """For any valid chain, parse() succeeds and reports what scapy finds."""
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            expected = scapy_view(data)
        self.assertEqual(view_fields(parse(data)), expected)

    @ORACLE
    @given(chains())
    def test_hao_and_rh2_hold_the_addresses(self, data: bytes) -> None:
        """hoa and rh2 point at the addresses scapy decodes from the HAO and the RH2."""
        view = parse(data)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            headers = _scapy_headers(data)
        for _, _, layer in headers:
            if isinstance(layer, IPv6ExtHdrDestOpt):
                for option in layer.options:
                    if isinstance(option, HAO):
                        self.assertEqual(
                            data[view.hoa : view.hoa + 16],
                            socket.inet_pton(socket.AF_INET6, option.hoa),
                        )
            if isinstance(layer, IPv6ExtHdrRouting) and layer.type == 2:
                self.assertEqual(
                    data[view.rh2 : view.rh2 + 16],
                    socket.inet_pton(socket.AF_INET6, layer.addresses[0]),
                )


# --- robustness ------------------------------------------------------------------------

def check_view(test: SynchronousTestCase, buf: bytes, view: PacketView) -> None:
    """Every offset in *view* lies inside the payload and points at what it claims."""
    end = view.end
    test.assertTrue(40 <= view.l4 <= end <= len(buf))
    test.assertEqual(end, 40 + int.from_bytes(buf[4:6], "big"))
    for name in FIELDS:
        test.assertIsInstance(getattr(view, name), int, name)
    if view.hoa != -1:
        test.assertEqual((buf[view.hao_opt], buf[view.hao_opt + 1]), (0xC9, 16))
        test.assertEqual(view.hoa, view.hao_opt + 2)
        test.assertEqual(buf[view.hao_prev_nh], 60)
        test.assertTrue(
            view.hao_hdr < view.hao_opt < view.hoa + 16 <= view.hao_hdr + view.hao_hdr_len
        )
        test.assertEqual(view.hao_hdr_len, (buf[view.hao_hdr + 1] + 1) * 8)
        test.assertLessEqual(view.hao_hdr + view.hao_hdr_len, view.l4)
    else:
        test.assertEqual(
            (view.hao_opt, view.hao_hdr, view.hao_hdr_len, view.hao_prev_nh), (-1, -1, -1, -1)
        )
    if view.rh != -1:
        test.assertEqual(buf[view.rh_prev_nh], 43)
        test.assertEqual(view.rh_len, (buf[view.rh + 1] + 1) * 8)
        test.assertLessEqual(view.rh + view.rh_len, view.l4)
        if view.rh2 != -1:
            test.assertEqual((buf[view.rh + 2], view.rh2), (2, view.rh + 8))
            test.assertLessEqual(view.rh2 + 16, view.rh + view.rh_len)
    else:
        test.assertEqual((view.rh2, view.rh_len, view.rh_prev_nh), (-1, -1, -1))
    if view.frag != -1:
        word = int.from_bytes(buf[view.frag + 2 : view.frag + 4], "big")
        test.assertEqual((view.frag_offset, view.frag_more), (word >> 3, bool(word & 1)))
        test.assertEqual(view.frag_id, int.from_bytes(buf[view.frag + 4 : view.frag + 8], "big"))
        test.assertLessEqual(view.frag + 8, view.l4)
    if view.proto == 44:
        test.assertEqual((view.l4_prev_nh, view.l4), (view.frag, view.frag + 8))
        test.assertNotEqual(view.frag_offset, 0)
    else:
        test.assertEqual(buf[view.l4_prev_nh], view.proto)
    if view.proto == 50:
        test.assertEqual(view.esp, view.l4)
        test.assertEqual(view.spi, int.from_bytes(buf[view.esp : view.esp + 4], "big"))
        test.assertLessEqual(view.esp + 8, end)
    else:
        test.assertEqual((view.esp, view.spi), (-1, -1))
    if view.proto == 135:
        test.assertEqual((view.mh, view.mh_type), (view.l4, buf[view.l4 + 2]))
    else:
        test.assertEqual((view.mh, view.mh_type), (-1, -1))
    if view.proto in (6, 17):
        test.assertEqual(view.sport, int.from_bytes(buf[view.l4 : view.l4 + 2], "big"))
        test.assertEqual(view.dport, int.from_bytes(buf[view.l4 + 2 : view.l4 + 4], "big"))
        test.assertLessEqual(view.l4 + (20 if view.proto == 6 else 8), end)
    else:
        test.assertEqual((view.sport, view.dport), (-1, -1))
    if view.ah != -1:
        test.assertLessEqual(view.ah + (buf[view.ah + 1] + 2) * 4, view.l4)


def parse_or_reason(buf: bytes | bytearray | memoryview) -> PacketView | Reason:
    """parse(), with MalformedPacket turned into its reason; anything else propagates."""
    try:
        return parse(buf)
    except MalformedPacket as exc:
        assert isinstance(exc.reason, Reason)
        return exc.reason


_NEXT_HEADERS = st.sampled_from([0, 6, 17, 43, 44, 50, 51, 58, 59, 60, 135, 253])


@st.composite
def ipv6_with_random_payload(draw: st.DrawFn) -> bytes:
    """A sound IPv6 header, an interesting Next Header and random bytes after it."""
    payload = draw(st.binary(max_size=160))
    return ipv6(draw(_NEXT_HEADERS), payload)


@st.composite
def mutated_chains(draw: st.DrawFn) -> bytes:
    """Valid chains with bytes flipped, cut or added (payload length kept or fixed up)."""
    buf = bytearray(draw(chains()))
    for _ in range(draw(st.integers(1, 4))):
        action = draw(st.sampled_from(["set", "flip", "truncate", "extend", "insert"]))
        if action in ("set", "flip") and buf:
            index = draw(st.integers(0, len(buf) - 1))
            if action == "set":
                buf[index] = draw(st.integers(0, 255))
            else:
                buf[index] ^= 1 << draw(st.integers(0, 7))
        elif action == "truncate":
            del buf[draw(st.integers(0, len(buf))) :]
        elif action == "extend":
            buf += draw(st.binary(min_size=1, max_size=16))
        else:
            index = draw(st.integers(0, len(buf)))
            buf[index:index] = draw(st.binary(min_size=1, max_size=8))
    if len(buf) >= 40 and draw(st.booleans()):
        buf[4:6] = (len(buf) - 40).to_bytes(2, "big")  # go past the payload length check
    return bytes(buf)


FUZZ = settings(max_examples=500, deadline=None)
# Chains are built with scapy (a few ms each): fewer examples, same shapes.
FUZZ_CHAINS = settings(max_examples=250, deadline=None)


class RobustnessTests(SynchronousTestCase):
    """Any bytes: parse() returns a sound view or raises MalformedPacket, nothing else."""

    @FUZZ
    @given(st.binary(max_size=200))
    def test_random_bytes(self, buf: bytes) -> None:
        """Random bytes never raise anything but MalformedPacket."""
        result = parse_or_reason(buf)
        if isinstance(result, PacketView):
            check_view(self, buf, result)

    @FUZZ
    @given(ipv6_with_random_payload())
    def test_random_payload(self, buf: bytes) -> None:
        """Behind a sound IPv6 header, random bytes give a sound view or MalformedPacket."""
        result = parse_or_reason(buf)
        if isinstance(result, PacketView):
            check_view(self, buf, result)

    @FUZZ_CHAINS
    @given(mutated_chains())
    def test_mutated_chains(self, buf: bytes) -> None:
        """Flipped, cut or extended valid packets give a sound view or MalformedPacket."""
        result = parse_or_reason(buf)
        if isinstance(result, PacketView):
            check_view(self, buf, result)

    @FUZZ_CHAINS
    @given(chains(), st.data())
    def test_truncation_is_reported(self, buf: bytes, data: st.DataObject) -> None:
        """Cutting a valid packet short (payload length fixed up) never passes silently.

        Either the view still fits inside the shorter packet, or the reason is TRUNCATED.
        The cut-off bytes may stay behind as link padding: they must not be read.
        """
        cut = data.draw(st.integers(40, len(buf)))
        short = bytearray(buf if data.draw(st.booleans()) else buf[:cut])
        short[4:6] = (cut - 40).to_bytes(2, "big")
        result = parse_or_reason(bytes(short))
        if isinstance(result, PacketView):
            check_view(self, bytes(short), result)
        else:
            self.assertIs(result, Reason.TRUNCATED)

    def test_buffer_types_agree_on_random_chains(self) -> None:
        """bytes, bytearray and memoryview inputs give identical views and reasons."""

        @settings(max_examples=100, deadline=None)
        @given(mutated_chains())
        def check(buf: bytes) -> None:
            results = [parse_or_reason(b) for b in (buf, bytearray(buf), memoryview(buf))]
            shapes = [view_fields(r) if isinstance(r, PacketView) else r for r in results]
            self.assertEqual(shapes[1], shapes[0])
            self.assertEqual(shapes[2], shapes[0])

        check()
