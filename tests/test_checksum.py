"""Tests for lbproxy.wire.checksum: RFC 1071 sums, the pseudo-header, RFC 1624 updates.

scapy's own checksum code is the independent oracle, next to a naive
word-by-word end-around-carry adder written here from RFC 1071.  The copies of
this arithmetic inlined elsewhere for speed are held to the functions here
(:class:`InlinedCopyTests`).
"""

from __future__ import annotations

import ast
import ipaddress
import struct
from pathlib import Path

from hypothesis import given
from hypothesis import strategies as st
from scapy.layers.inet import TCP, UDP
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
    update_transport,
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


class UpdateTransportTests(SynchronousTestCase):
    """`update_transport`: `update16` (written out in it) with UDP's rules."""

    @given(
        csum=st.integers(0, 0xFFFF),
        old=addresses,
        new=addresses,
        udp=st.booleans(),
    )
    def test_same_as_update16(self, csum: int, old: bytes, new: bytes, udp: bool) -> None:
        """update16 for TCP/ICMPv6/MH; for UDP a 0 field stays 0, a 0 result is 0xFFFF."""
        got = update_transport(csum, old, new, udp)
        if udp and csum == 0:
            self.assertEqual(got, 0)
            return
        want = update16(csum, old, new)
        self.assertEqual(got, (want or 0xFFFF) if udp else want)

    def test_udp_rules(self) -> None:
        """The UDP cases spelled out: "none" stays none, a computed 0 goes out as 0xFFFF."""
        zero, one = bytes(16), bytes(15) + b"\x01"
        self.assertEqual(update_transport(0, zero, one, True), 0)
        self.assertEqual(update_transport(0x0001, zero, one, True), 0xFFFF)
        self.assertEqual(update_transport(0x0001, zero, one, False), 0)

    @given(addresses, addresses, addresses, st.binary(max_size=200),
           st.sampled_from(["udp", "tcp"]))
    def test_destination_change_against_scapy(
        self, src: bytes, dst: bytes, new: bytes, payload: bytes, kind: str
    ) -> None:
        """The field scapy gives src -> dst, updated for dst := new, is scapy's src -> new."""
        l4 = UDP(sport=1000, dport=53) if kind == "udp" else TCP(sport=1000, dport=80)
        at = 46 if kind == "udp" else 56
        before = bytes(IPv6(src=_text(src), dst=_text(dst)) / l4 / payload)
        after = bytes(IPv6(src=_text(src), dst=_text(new)) / l4 / payload)
        (field,) = struct.unpack_from("!H", before, at)
        (expected,) = struct.unpack_from("!H", after, at)
        self.assertEqual(update_transport(field, dst, new, kind == "udp"), expected)


#: The marker comment of an inlined copy of `apply_delta16`.
_APPLY_DELTA16_MARK = "`checksum.apply_delta16`, inlined"
_FASTPATH = Path(__file__).resolve().parent.parent / "lbproxy" / "io" / "fastpath.py"


def _inlined_updates(path: Path, marker: str) -> tuple[dict[str, object], list[ast.If]]:
    """``path``'s literal module constants, and the ``if`` after each ``marker`` comment.

    The copy reads the field into a variable, then updates it in an ``if``; only the
    ``if`` is arithmetic, so that is what is run.  The source is read, not imported:
    the test needs none of the module's dependencies.
    """
    source = path.read_text()
    tree = ast.parse(source)
    constants: dict[str, object] = {}
    for node in tree.body:
        if isinstance(node, ast.Assign):
            try:
                value = ast.literal_eval(node.value)
            except ValueError:
                continue
            for target in node.targets:
                if isinstance(target, ast.Name):
                    constants[target.id] = value
                elif isinstance(target, ast.Tuple) and isinstance(value, tuple):
                    for name, item in zip(target.elts, value, strict=True):
                        if isinstance(name, ast.Name):
                            constants[name.id] = item
    marks = [n for n, line in enumerate(source.splitlines(), 1) if marker in line]
    blocks: list[list[ast.stmt]] = []
    for parent in ast.walk(tree):
        for field in ("body", "orelse", "finalbody"):
            block = getattr(parent, field, None)
            if isinstance(block, list) and block and isinstance(block[0], ast.stmt):
                blocks.append(block)
    found: list[ast.If] = []
    for mark in marks:
        following = [
            stmt for block in blocks for stmt in block if mark < stmt.lineno <= mark + 3
        ]
        ifs = [stmt for stmt in following if isinstance(stmt, ast.If)]
        assert ifs, f"{path.name}:{mark}: no `if` right after the {marker!r} comment"
        found.append(min(ifs, key=lambda stmt: stmt.lineno))
    return constants, found


def _run_copy(copy: ast.If, constants: dict[str, object], csum: int, delta: int,
              udp: bool) -> int:
    """Run one inlined ``if`` with the field ``csum``, the delta and the protocol."""
    fields = [target for n in ast.walk(copy) if isinstance(n, ast.Assign)
              for target in n.targets if isinstance(target, ast.Name)]
    field = fields[0].id  # the checksum variable the copy updates
    protocol = "_UDP" if udp else "_TCP"
    names = {n.id for n in ast.walk(copy) if isinstance(n, ast.Name)}
    proto_names = {
        side.id
        for n in ast.walk(copy) if isinstance(n, ast.Compare)
        for side in (n.left, *n.comparators)
        if isinstance(side, ast.Name) and side.id not in constants and side.id != field
    }
    rest = names - set(constants) - proto_names - {field}
    assert len(rest) == 1, f"cannot tell the delta among {sorted(rest)}"
    namespace: dict[str, object] = dict(constants)
    namespace.update({name: constants[protocol] for name in proto_names})
    namespace[rest.pop()] = delta
    namespace[field] = csum
    exec(compile(ast.Module(body=[copy], type_ignores=[]), str(_FASTPATH), "exec"), namespace)
    result = namespace[field]
    assert isinstance(result, int)
    return result


class InlinedCopyTests(SynchronousTestCase):
    """Copies of this module's arithmetic inlined elsewhere compute what the functions do.

    `lbproxy.io.fastpath` inlines `apply_delta16` twice (inbound: destination :=
    backend; replies: source := virtual address), each after a comment carrying
    :data:`_APPLY_DELTA16_MARK`.  The ``if`` that follows each comment is taken
    from the source and run against `apply_delta16` for TCP and UDP.
    """

    def test_fastpath_copies_found(self) -> None:
        """Both of the fast path's copies are found (a renamed marker would hide them)."""
        _, copies = _inlined_updates(_FASTPATH, _APPLY_DELTA16_MARK)
        self.assertEqual(len(copies), 2)

    @given(
        csum=st.integers(0, 0xFFFF),
        old=addresses,
        new=addresses,
        udp=st.booleans(),
    )
    def test_fastpath_apply_delta16(self, csum: int, old: bytes, new: bytes, udp: bool) -> None:
        """Every inlined copy gives apply_delta16's field, UDP's zero rules included."""
        constants, copies = _inlined_updates(_FASTPATH, _APPLY_DELTA16_MARK)
        delta = delta16(old, new)
        want = apply_delta16(csum, delta, udp)
        for copy in copies:
            self.assertEqual(_run_copy(copy, constants, csum, delta, udp), want,
                             f"fastpath.py line {copy.lineno}")
