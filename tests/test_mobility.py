"""Tests for lbproxy.wire.mobility: Binding Update / Acknowledgement codec and checksum.

scapy (tests only) is the independent oracle: its MIP6MH_BU / MIP6MH_BA / MIP6OptAltCoA
build what we parse, and parse what we build.
"""

from __future__ import annotations

import ipaddress
import struct

from hypothesis import given, settings
from hypothesis import strategies as st
from scapy.layers.inet6 import (
    HAO,
    MIP6MH_BA,
    MIP6MH_BU,
    IPv6,
    IPv6ExtHdrDestOpt,
    IPv6ExtHdrRouting,
    MIP6OptAltCoA,
    MIP6OptNonceIndices,
)
from twisted.trial.unittest import SynchronousTestCase

from lbproxy.wire import mobility as m

HOA = ipaddress.IPv6Address("2001:db8:1::16")
HA = ipaddress.IPv6Address("2001:db8:1::1")
COA = ipaddress.IPv6Address("2001:db8:a::16")

# A BU from COA for HOA to HA with an Alternate CoA, as scapy 2.8 builds it (checked by hand
# against RFC 6275 §6.1.7 / §6.2.5: PadN(0) puts the option at offset 14 = 8n+6).
GOLDEN_BU = bytes.fromhex(
    "3b03050061cf0007d000000a0100031020010db8000a00000000000000000016"
)



def exactly(n: int) -> st.SearchStrategy[bytes]:
    """Byte strings of exactly ``n`` octets."""
    return st.binary(min_size=n, max_size=n)


addresses = st.binary(min_size=16, max_size=16)
u16 = st.integers(0, 0xFFFF)
u8 = st.integers(0, 0xFF)
other_options = st.lists(
    st.one_of(
        st.builds(m.MobilityOption, st.just(m.OPT_REFRESH_ADVICE), exactly(2)),
        st.builds(m.MobilityOption, st.just(m.OPT_NONCE_INDICES), exactly(4)),
        st.builds(m.MobilityOption, st.just(m.OPT_AUTH_DATA), exactly(12)),
        st.builds(m.MobilityOption, st.integers(7, 255), st.binary(max_size=30)),
    ),
    max_size=3,
).map(tuple)
updates = st.builds(
    m.BindingUpdate,
    seq=u16,
    lifetime=u16,
    flags=u16,
    alt_coa=st.none() | addresses,
    options=other_options,
)
acks = st.builds(
    m.BindingAck, status=u8, seq=u16, lifetime=u16, flags=u8, options=other_options
)


def bu_packet(seq: int, lifetime: int, flags: str, acoa: str | None) -> bytes:
    """A whole IPv6 packet with HAO and a BU, built by scapy; returns the MH bytes."""
    options = [MIP6OptAltCoA(acoa=acoa)] if acoa else []
    pkt = (
        IPv6(src=str(COA), dst=str(HA))
        / IPv6ExtHdrDestOpt(options=[HAO(hoa=str(HOA))])
        / MIP6MH_BU(seq=seq, mhtime=lifetime, flags=flags, options=options)
    )
    return bytes(pkt)[40 + 24 :]


class GoldenTests(SynchronousTestCase):
    """Known bytes."""

    def test_golden_bu(self) -> None:
        """The golden BU parses to its fields and builds back to the same bytes."""
        msg = m.parse(GOLDEN_BU, HOA.packed, HA.packed)
        self.assertEqual(
            msg, m.BindingUpdate(7, 10, m.BU_ACK | m.BU_HOME | m.BU_KEY_MGMT, COA.packed)
        )
        assert isinstance(msg, m.BindingUpdate)
        self.assertTrue(msg.ack and msg.home_registration and msg.key_management)
        self.assertFalse(msg.link_local)
        self.assertEqual(msg.lifetime_seconds, 40)
        self.assertEqual(m.build(msg, HOA.packed, HA.packed), GOLDEN_BU)

    def test_checksum_uses_home_address(self) -> None:
        """With an HAO the pseudo-header source is the HoA: verifying with the CoA fails."""
        exc = self.assertRaises(m.MalformedMobility, m.parse, GOLDEN_BU, COA.packed, HA.packed)
        self.assertIs(exc.reason, m.MobilityReason.BAD_CHECKSUM)

    def test_ba_with_rh2_checksum(self) -> None:
        """A BA sent to the CoA with a Type 2 RH checks against the HoA as destination."""
        pkt = (
            IPv6(src=str(HA), dst=str(COA))
            / IPv6ExtHdrRouting(type=2, segleft=1, addresses=[str(HOA)])
            / MIP6MH_BA(status=0, seq=9, mhtime=15)
        )
        mh = bytes(pkt)[40 + 24 :]
        msg = m.parse(mh, HA.packed, HOA.packed)
        self.assertEqual(msg, m.BindingAck(0, 9, 15, m.BA_KEY_MGMT))
        assert isinstance(msg, m.BindingAck)
        self.assertTrue(msg.accepted)
        self.assertEqual(m.build(msg, HA.packed, HOA.packed), mh)

    def test_other_type(self) -> None:
        """A type other than BU/BA is returned as OtherMobilityMessage and builds back."""
        data = bytes([59, 0, 0, 0, 0, 0]) + b"\x00\x00"  # BRR
        msg = m.parse(data)
        self.assertEqual(msg, m.OtherMobilityMessage(0, b"\x00\x00"))
        self.assertEqual(m.build(msg), data)


class ScapyAgreementTests(SynchronousTestCase):
    """scapy as the oracle."""

    @given(seq=u16, lifetime=u16, flags=st.sampled_from(["", "A", "KHA", "LK", "AHLK"]),
           acoa=st.none() | st.sampled_from(["2001:db8:a::16", "2001:db8:ffff::1"]))
    @settings(max_examples=200)
    def test_parse_scapy_bu(self, seq: int, lifetime: int, flags: str, acoa: str | None) -> None:
        """A BU built by scapy parses (checksum verified) to the same fields."""
        mh = bu_packet(seq, lifetime, flags, acoa)
        msg = m.parse(mh, HOA.packed, HA.packed)
        assert isinstance(msg, m.BindingUpdate)
        self.assertEqual((msg.seq, msg.lifetime), (seq, lifetime))
        self.assertEqual(msg.ack, "A" in flags)
        self.assertEqual(msg.home_registration, "H" in flags)
        self.assertEqual(msg.link_local, "L" in flags)
        self.assertEqual(msg.key_management, "K" in flags)
        expected = ipaddress.IPv6Address(acoa).packed if acoa else None
        self.assertEqual(msg.alt_coa, expected)
        self.assertEqual(m.build(msg, HOA.packed, HA.packed), mh)

    @given(msg=st.builds(m.BindingUpdate, seq=u16, lifetime=u16, flags=u16,
                         alt_coa=st.none() | addresses))
    @settings(max_examples=200)
    def test_scapy_parses_our_bu(self, msg: m.BindingUpdate) -> None:
        """scapy dissects our BU to the same fields and the same checksum."""
        mh = m.build(msg, HOA.packed, HA.packed)
        pkt = MIP6MH_BU(mh)
        self.assertEqual((pkt.seq, pkt.mhtime), (msg.seq, msg.lifetime))
        self.assertEqual(int(pkt.flags) << 9 | pkt.reserved, msg.flags)
        alt = [o for o in pkt.options if isinstance(o, MIP6OptAltCoA)]
        if msg.alt_coa is None:
            self.assertEqual(alt, [])
        else:
            self.assertEqual(ipaddress.IPv6Address(alt[0].acoa).packed, msg.alt_coa)
        full = IPv6(src=str(COA), dst=str(HA)) / IPv6ExtHdrDestOpt(
            options=[HAO(hoa=str(HOA))]
        ) / MIP6MH_BU(mh[:4] + b"\x00\x00" + mh[6:])
        full[MIP6MH_BU].cksum = None
        self.assertEqual(bytes(full)[40 + 24 :], mh)

    @given(status=u8, seq=u16, lifetime=u16, k=st.booleans())
    @settings(max_examples=100)
    def test_ba_both_ways(self, status: int, seq: int, lifetime: int, k: bool) -> None:
        """A BA agrees with scapy's byte for byte, checksum included."""
        pkt = IPv6(src=str(HA), dst=str(HOA)) / MIP6MH_BA(
            status=status, seq=seq, mhtime=lifetime, flags="K" if k else 0
        )
        mh = bytes(pkt)[40:]
        msg = m.BindingAck(status, seq, lifetime, m.BA_KEY_MGMT if k else 0)
        self.assertEqual(m.parse(mh, HA.packed, HOA.packed), msg)
        self.assertEqual(m.build(msg, HA.packed, HOA.packed), mh)

    def test_nonce_option_agrees(self) -> None:
        """A Nonce Indices option (olen=4, scapy pitfall) is kept verbatim."""
        pkt = IPv6(src=str(HOA), dst=str(HA)) / MIP6MH_BU(
            seq=1, options=[MIP6OptNonceIndices(olen=4, hni=0x1234, coni=0x5678)]
        )
        mh = bytes(pkt)[40:]
        msg = m.parse(mh, HOA.packed, HA.packed)
        assert isinstance(msg, m.BindingUpdate)
        self.assertEqual(msg.options, (m.MobilityOption(m.OPT_NONCE_INDICES, b"\x12\x34\x56\x78"),))


class RoundTripTests(SynchronousTestCase):
    """build and parse are inverses."""

    @given(msg=updates | acks, src=addresses, dst=addresses)
    @settings(max_examples=300)
    def test_round_trip(self, msg: m.MobilityMessage, src: bytes, dst: bytes) -> None:
        """parse(build(msg)) == msg, the length is 8n, the checksum verifies."""
        mh = m.build(msg, src, dst)
        self.assertEqual(len(mh) % 8, 0)
        self.assertEqual((mh[1] + 1) * 8, len(mh))
        if isinstance(msg, m.BindingAck) and any(o.type == m.OPT_ALT_COA for o in msg.options):
            return  # pragma: no cover - strategy never makes one
        self.assertEqual(m.parse(mh, src, dst), msg)

    @given(msg=updates)
    def test_alt_coa_alignment(self, msg: m.BindingUpdate) -> None:
        """The Alternate CoA option always starts at an offset of the form 8n+6."""
        mh = m.build(msg)
        if msg.alt_coa is None:
            return
        i = 12
        while mh[i] != m.OPT_ALT_COA:
            i += 1 if mh[i] == m.OPT_PAD1 else 2 + mh[i + 1]
        self.assertEqual(i % 8, 6)


class MalformedTests(SynchronousTestCase):
    """Malformed input raises MalformedMobility with a reason, and nothing else."""

    def assertReason(self, data: bytes, reason: m.MobilityReason) -> None:
        exc = self.assertRaises(m.MalformedMobility, m.parse, data)
        self.assertIs(exc.reason, reason)
        self.assertIsInstance(exc, ValueError)

    @given(data=st.binary(max_size=80), src=addresses, dst=addresses)
    @settings(max_examples=500)
    def test_total(self, data: bytes, src: bytes, dst: bytes) -> None:
        """Random bytes either parse or raise MalformedMobility."""
        try:
            m.parse(data, src, dst)
        except m.MalformedMobility as exc:
            self.assertIsInstance(exc.reason, m.MobilityReason)

    @given(cut=st.integers(0, len(GOLDEN_BU) - 1))
    def test_truncated(self, cut: int) -> None:
        """Every truncation of a valid BU is TRUNCATED."""
        self.assertReason(GOLDEN_BU[:cut], m.MobilityReason.TRUNCATED)

    def test_payload_proto(self) -> None:
        """Payload Proto other than 59 is refused."""
        self.assertReason(b"\x06" + GOLDEN_BU[1:], m.MobilityReason.BAD_PAYLOAD_PROTO)

    def test_header_too_short(self) -> None:
        """A BU with Header Len 0 (8 octets) is below the minimum."""
        self.assertReason(bytes([59, 0, 5, 0, 0, 0, 0, 1]), m.MobilityReason.BAD_HEADER_LENGTH)

    def test_option_overrun(self) -> None:
        """An option whose length runs past the header is BAD_OPTION."""
        data = GOLDEN_BU[:15] + b"\x20" + GOLDEN_BU[16:]
        self.assertReason(data, m.MobilityReason.BAD_OPTION)

    def test_alt_coa_wrong_length(self) -> None:
        """An Alternate CoA option with a length other than 16 is BAD_OPTION."""
        body = struct.pack("!HHH", 1, 0, 0) + bytes([1, 0, 3, 8]) + bytes(8) + bytes([1, 2, 0, 0])
        data = bytes([59, 2, 5, 0, 0, 0]) + body
        self.assertReason(data, m.MobilityReason.BAD_OPTION)

    def test_duplicate_alt_coa(self) -> None:
        """Two Alternate CoA options are refused."""
        msg = m.BindingUpdate(1, 1, 0, COA.packed, (m.MobilityOption(m.OPT_ALT_COA, HOA.packed),))
        self.assertReason(m.build(msg), m.MobilityReason.DUPLICATE_ALT_COA)

    def test_bad_checksum(self) -> None:
        """A flipped bit is caught by the checksum."""
        data = bytearray(GOLDEN_BU)
        data[-1] ^= 1
        exc = self.assertRaises(m.MalformedMobility, m.parse, bytes(data), HOA.packed, HA.packed)
        self.assertIs(exc.reason, m.MobilityReason.BAD_CHECKSUM)


class PacketTests(SynchronousTestCase):
    """Whole BU/BA packets, checked by scapy."""

    def test_bu_packet(self) -> None:
        """scapy reads our BU packet's HAO, BU fields and a valid checksum."""
        pkt = IPv6(m.bu_packet(COA.packed, HA.packed, HOA.packed, m.BindingUpdate(5, 3)))
        self.assertEqual(pkt[HAO].hoa, str(HOA))
        self.assertEqual((pkt[MIP6MH_BU].seq, pkt[MIP6MH_BU].mhtime), (5, 3))
        wire = pkt[MIP6MH_BU].cksum
        pkt[IPv6ExtHdrDestOpt].options = [pkt[HAO]]  # scapy pitfall: drop the PadN first
        del pkt[MIP6MH_BU].cksum
        self.assertEqual(IPv6(bytes(pkt))[MIP6MH_BU].cksum, wire)

    def test_ba_packet(self) -> None:
        """scapy reads our BA packet's Type 2 RH and BA fields."""
        raw = m.ba_packet(HA.packed, COA.packed, HOA.packed, m.BindingAck(0, 5, 3))
        pkt = IPv6(raw)
        self.assertEqual(pkt[IPv6ExtHdrRouting].addresses, [str(HOA)])
        self.assertEqual((pkt[MIP6MH_BA].seq, pkt[MIP6MH_BA].status), (5, 0))
        self.assertEqual(m.parse(raw[64:], HA.packed, HOA.packed), m.BindingAck(0, 5, 3))
