"""Tests for lbproxy.wire.checksum: RFC 1071 sums, the pseudo-header, RFC 1624 updates.

scapy's own checksum code is the independent oracle, next to a naive
word-by-word end-around-carry adder written here from RFC 1071.
"""

from __future__ import annotations

import ipaddress
import struct

from hypothesis import given
from hypothesis import strategies as st
from scapy.layers.inet import UDP
from scapy.layers.inet6 import IPv6, in6_chksum
from scapy.utils import checksum as scapy_checksum
from twisted.trial.unittest import SynchronousTestCase

from lbproxy.wire.checksum import (
    apply_delta16,
    checksum,
    delta16,
    ones_sum,
    pseudo_header_sum,
    udp_field,
    update16,
    update_sum,
)

addresses = st.binary(min_size=16, max_size=16)


def naive_sum(data: bytes) -> int:
    """RFC 1071 section 4.1, literally: add words, fold carries back in."""
    if len(data) % 2:
        data += b"\x00"
    total = 0
    for (word,) in struct.iter_unpack("!H", data):
        total += word
        total = (total & 0xFFFF) + (total >> 16)
    return total


class OnesSumTests(SynchronousTestCase):
    """The sum and the checksum of a buffer."""

    def test_rfc1071_example(self) -> None:
        """The worked example of RFC 1071 section 3 sums to 0xddf2."""
        data = bytes.fromhex("0001f203f4f5f6f7")
        self.assertEqual(ones_sum(data), 0xDDF2)
        self.assertEqual(checksum(data), 0xFFFF - 0xDDF2)

    def test_zero_data(self) -> None:
        """All-zero data sums to +0, and its checksum is 0xFFFF."""
        self.assertEqual(ones_sum(bytes(10)), 0)
        self.assertEqual(checksum(bytes(10)), 0xFFFF)

    def test_negative_zero(self) -> None:
        """Non-zero data whose sum is congruent to 0 sums to 0xFFFF, as an adder would."""
        self.assertEqual(ones_sum(b"\xff\xff"), 0xFFFF)
        self.assertEqual(ones_sum(b"\x80\x00\x7f\xff"), 0xFFFF)
        self.assertEqual(checksum(b"\x80\x00\x7f\xff"), 0)

    def test_odd_length(self) -> None:
        """An odd-length buffer is summed as if padded with one zero byte."""
        self.assertEqual(ones_sum(b"\x12\x34\x56"), 0x1234 + 0x5600)

    def test_memoryview(self) -> None:
        """A memoryview slice is summed like the bytes it shows."""
        data = bytearray(b"\x00\x01\xf2\x03\xf4\xf5\xf6\xf7")
        self.assertEqual(ones_sum(memoryview(data)[2:]), naive_sum(bytes(data[2:])))

    @given(st.binary(max_size=3000), st.integers(min_value=0, max_value=0xFFFF))
    def test_matches_naive_adder(self, data: bytes, initial: int) -> None:
        """For any data and carried-in sum, the result equals a word-by-word adder's."""
        expected = naive_sum(data + b"\x00" * (len(data) % 2) + struct.pack("!H", initial))
        self.assertEqual(ones_sum(data, initial), expected)

    @given(st.binary(max_size=3000))
    def test_matches_scapy(self, data: bytes) -> None:
        """checksum() equals scapy's checksum() for any data."""
        self.assertEqual(checksum(data), scapy_checksum(data))

    @given(st.binary(min_size=1, max_size=500))
    def test_verifies_to_zero(self, data: bytes) -> None:
        """A buffer with its own checksum appended (word aligned) verifies to zero."""
        data += b"\x00" * (len(data) % 2)
        field = checksum(data)
        self.assertEqual(checksum(data + struct.pack("!H", field)), 0)


class PseudoHeaderTests(SynchronousTestCase):
    """The IPv6 pseudo-header of RFC 8200 section 8.1."""

    @given(addresses, addresses, st.integers(min_value=0, max_value=2**32 - 1),
           st.integers(min_value=0, max_value=255))
    def test_matches_literal_layout(self, src: bytes, dst: bytes, length: int, nh: int) -> None:
        """The sum equals the sum of the 40-byte pseudo-header laid out literally."""
        literal = src + dst + struct.pack("!I3xB", length, nh)
        self.assertEqual(pseudo_header_sum(src, dst, length, nh), naive_sum(literal))

    @given(addresses, addresses, st.binary(max_size=200),
           st.integers(min_value=0, max_value=65535), st.integers(min_value=0, max_value=65535))
    def test_udp_against_scapy(self, src: bytes, dst: bytes, payload: bytes,
                               sport: int, dport: int) -> None:
        """A UDP checksum built from pseudo_header_sum + checksum equals scapy's in6_chksum."""
        pkt = IPv6(src=_text(src), dst=_text(dst)) / UDP(sport=sport, dport=dport) / payload
        raw = bytes(pkt)
        udp = bytearray(raw[40:])
        udp[6:8] = b"\x00\x00"
        ours = udp_field(checksum(udp, pseudo_header_sum(src, dst, len(udp), 17)))
        theirs = in6_chksum(17, pkt[IPv6], bytes(udp))
        self.assertEqual(ours, theirs)
        self.assertEqual(ours, struct.unpack("!H", raw[46:48])[0])


class UpdateTests(SynchronousTestCase):
    """RFC 1624 incremental updates."""

    @given(st.binary(min_size=32, max_size=400), addresses,
           st.integers(min_value=0, max_value=10))
    def test_update_equals_recompute(self, data: bytes, new: bytes, slot: int) -> None:
        """Replacing 16 bytes at an even offset and updating equals recomputing from scratch."""
        data = data + b"\x00" * (len(data) % 2)
        offset = min(2 * slot, len(data) - 16) & ~1
        field = checksum(data, 0x1234)
        old = data[offset:offset + 16]
        changed = data[:offset] + new + data[offset + 16:]
        self.assertEqual(update16(field, old, new), checksum(changed, 0x1234))

    def test_update_canonical_zero(self) -> None:
        """An update whose true sum is 0xFFFF yields 0, never 0xFFFF, like a recomputation."""
        data = bytearray(b"\x00\x11" + bytes(16))
        field = checksum(data)  # sum 0x0011 -> 0xffee
        new = b"\xff\xee" + bytes(14)
        changed = bytes(data[:2]) + new
        self.assertEqual(checksum(changed), 0)
        self.assertEqual(update16(field, bytes(16), new), 0)

    def test_update_from_negative_zero_field(self) -> None:
        """A field of 0xFFFF (covered sum +0) updated for a word 1 -> 2 becomes ~1 = 0xFFFE."""
        self.assertEqual(update_sum(0xFFFF, 0x0001, 0x0002), 0xFFFE)

    def test_update_identity(self) -> None:
        """Replacing bytes by themselves leaves a canonical checksum unchanged."""
        data = bytes(range(40))
        field = checksum(data)
        self.assertEqual(update16(field, data[8:24], data[8:24]), field)

    def test_udp_field(self) -> None:
        """A computed UDP checksum of 0 is transmitted as 0xFFFF; others unchanged."""
        self.assertEqual(udp_field(0), 0xFFFF)
        self.assertEqual(udp_field(0x1234), 0x1234)


def _text(address: bytes) -> str:
    """The printed form of a 16-byte address, for scapy."""
    return str(ipaddress.IPv6Address(address))


class DeltaTests(SynchronousTestCase):
    """`delta16` + `apply_delta16` (the fast path's form) agree with `update16`."""

    @given(
        csum=st.integers(0, 0xFFFF),
        old=st.binary(min_size=16, max_size=16),
        new=st.binary(min_size=16, max_size=16),
        udp=st.booleans(),
    )
    def test_same_as_update16(self, csum: int, old: bytes, new: bytes, udp: bool) -> None:
        got = apply_delta16(csum, delta16(old, new), udp)
        if udp and csum == 0:
            self.assertEqual(got, 0)  # "no checksum" stays so
            return
        want = update16(csum, old, new)
        self.assertEqual(got, (want or 0xFFFF) if udp else want)
