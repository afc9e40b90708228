"""The balancer as correspondent node (lbproxy.core.correspondent, RFC 6275 §5.2, §9).

Independent oracles: scapy (tests only) builds the mobile node's messages and dissects
every message the balancer emits, and recomputes its Mobility Header checksum; the keygen
tokens, Kbm and authenticators the tests use are computed here from the RFC's formulas
with ``hmac``/``hashlib`` directly, not with the module's helpers.  Forgeries are refused
with a reason, counted, and leave the binding cache, the return paths and the table as
they were.  Pure logic with task.Clock: no sockets.
"""

from __future__ import annotations

import hashlib
import hmac
import ipaddress
import struct
from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st
from scapy.layers.inet import UDP
from scapy.layers.inet6 import (
    HAO,
    MIP6MH_BA,
    MIP6MH_BE,
    MIP6MH_BU,
    IPv6,
    IPv6ExtHdrDestOpt,
    IPv6ExtHdrRouting,
    MIP6MH_CoT,
    MIP6MH_CoTI,
    MIP6MH_HoT,
    MIP6MH_HoTI,
    MIP6OptAltCoA,
    MIP6OptBindingAuthData,
    MIP6OptNonceIndices,
)
from scapy.packet import Packet
from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase

from lbproxy.config import ConfigError, parse_config
from lbproxy.core.balancer import Balancer
from lbproxy.core.correspondent import Correspondent, NonceTable
from lbproxy.core.keys import Key
from lbproxy.tap import build_balancer
from lbproxy.wire import mobility as m
from lbproxy.wire.view import parse
from tests.test_balancer import BACKENDS, make

VIP = "2001:db8:5::80"
HOA = "2001:db8:100::1"
COA = "2001:db8:a1::1"
COA2 = "2001:db8:a2::1"
OTHER_HOA = "2001:db8:100::2"


def packed(text: str) -> bytes:
    return ipaddress.IPv6Address(text).packed


# -- the RFC's formulas, computed here (the oracle for the module's cryptography) ----------


def token_of(kcn: bytes, address: str, nonce: bytes, which: int) -> bytes:
    return hmac.new(kcn, packed(address) + nonce + bytes([which]), hashlib.sha1).digest()[:8]


def sign_bu(packet: Packet, kbm: bytes, care_of: str) -> Packet:
    """``packet`` (IPv6 / DestOpt(HAO) / BU whose last option is an all-zero Binding
    Authorization Data) with its authenticator set (RFC 6275 §6.2.7), built by scapy."""
    raw = bytearray(bytes(packet))
    mh_at = len(raw) - len(bytes(packet[MIP6MH_BU]))
    mh = raw[mh_at:]
    mh[4:6] = b"\0\0"
    auth = hmac.new(kbm, packed(care_of) + packed(VIP) + bytes(mh[:-12]),
                    hashlib.sha1).digest()[:12]  # fmt: skip
    bu = packet[MIP6MH_BU]
    options = list(bu.options)
    options[-1] = MIP6OptBindingAuthData(olen=12, authenticator=int.from_bytes(auth, "big"))
    bu.options = options
    bu.cksum = None
    return IPv6(bytes(packet))


def checksum_valid(packet: bytes, layer: type[Packet]) -> bool:
    """scapy's own checksum of the Mobility Header equals the one on the wire."""
    dissected = IPv6(packet)
    wire = dissected[layer].cksum
    dissected[layer].cksum = None
    return IPv6(bytes(dissected))[layer].cksum == wire


#: What the balancer emits as correspondent node, as scapy names it.
EMITTED = (MIP6MH_HoT, MIP6MH_CoT, MIP6MH_BA, MIP6MH_BE)
#: Every kind each test run saw emitted (Must show 2: checked below for all of them).
SEEN: set[str] = set()


def dissects_cleanly(packet: bytes) -> None:
    """Must show 2, for every message any test here makes the balancer emit: scapy
    dissects it as one of the four messages, with nothing left over, the IPv6 payload
    length right, and scapy's checksum equal to the one on the wire."""
    dissected = IPv6(packet)
    [layer] = [layer for layer in EMITTED if layer in dissected]
    mh = dissected[layer]
    assert not mh.payload, f"bytes after the Mobility Header: {mh.payload!r}"
    assert dissected.plen == len(packet) - 40, dissected.summary()
    assert checksum_valid(packet, layer), dissected.summary()
    SEEN.add(f"{layer.__name__}" + (f" {mh.status}" if layer in (MIP6MH_BA, MIP6MH_BE)
                                      else ""))  # fmt: skip


class MobileNode:
    """What a mobile node does, from the RFC (tests' own code): Test Inits, tokens from
    the Tests, the Binding Update, all built with scapy."""

    def __init__(self, handle: Any, home: str = HOA, care_of: str = COA) -> None:
        self.handle = handle  # bytes -> reply bytes or None
        self.home = home
        self.care_of = care_of
        self.seq = 0

    def home_test(self, source: str | None = None) -> Packet:
        reply = self.handle(bytes(IPv6(src=source or self.home, dst=VIP)
                                  / MIP6MH_HoTI(cookie=b"homecook")))  # fmt: skip
        assert reply is not None
        return IPv6(reply)

    def care_of_test(self, source: str | None = None) -> Packet:
        reply = self.handle(bytes(IPv6(src=source or self.care_of, dst=VIP)
                                  / MIP6MH_CoTI(cookie=b"carecook")))  # fmt: skip
        assert reply is not None
        return IPv6(reply)

    def update(self, hot: Packet, cot: Packet | None, *, lifetime: int = 100,
               seq: int | None = None, flags: str = "A", home: str | None = None,
               care_of: str | None = None,
               kbm: bytes | None = None, indices: tuple[int, int] | None = None,
               sign: bool = True) -> Packet:  # fmt: skip
        if seq is None:
            self.seq += 1
            seq = self.seq
        care_of = care_of or self.care_of
        home_token = hot[MIP6MH_HoT].token
        care_of_token = cot[MIP6MH_CoT].token if cot is not None else b""
        if kbm is None:
            kbm = hashlib.sha1(home_token + care_of_token).digest()
        if indices is None:
            indices = (hot[MIP6MH_HoT].index, cot[MIP6MH_CoT].index if cot is not None else 0)
        packet = (IPv6(src=care_of, dst=VIP)
                  / IPv6ExtHdrDestOpt(options=[HAO(hoa=home or self.home)])
                  / MIP6MH_BU(seq=seq, flags=flags, mhtime=lifetime, options=[
                      MIP6OptNonceIndices(olen=4, hni=indices[0], coni=indices[1]),
                      MIP6OptBindingAuthData(olen=12, authenticator=0)]))  # fmt: skip
        return sign_bu(packet, kbm, care_of) if sign else IPv6(bytes(packet))


# -- wire ----------------------------------------------------------------------------------


cookies = st.binary(min_size=8, max_size=8)


class WireTests(SynchronousTestCase):
    """The new messages and options, against scapy both ways."""

    @given(cookie=cookies, care_of=st.booleans())
    def test_test_init_from_scapy(self, cookie: bytes, care_of: bool) -> None:
        layer = MIP6MH_CoTI if care_of else MIP6MH_HoTI
        raw = bytes(IPv6(src=COA, dst=VIP) / layer(cookie=cookie))[40:]
        msg = m.parse(raw, packed(COA), packed(VIP))
        want = m.CareOfTestInit(cookie) if care_of else m.HomeTestInit(cookie)
        self.assertEqual(msg, want)
        self.assertEqual(m.build(want, packed(COA), packed(VIP)), raw)

    @given(cookie=cookies, token=cookies, index=st.integers(0, 0xFFFF), care_of=st.booleans())
    def test_tests_both_ways(self, cookie: bytes, token: bytes, index: int, care_of: bool) -> None:
        cls = m.CareOfTest if care_of else m.HomeTest
        layer = MIP6MH_CoT if care_of else MIP6MH_HoT
        ours = m.build(cls(index, cookie, token), packed(VIP), packed(HOA))
        packet = IPv6(src=VIP, dst=HOA, nh=135) / ours
        dissected = IPv6(bytes(packet))
        self.assertEqual((dissected[layer].index, dissected[layer].cookie,
                          dissected[layer].token), (index, cookie, token))  # fmt: skip
        self.assertTrue(checksum_valid(bytes(packet), layer))
        theirs = bytes(IPv6(src=VIP, dst=HOA) / layer(index=index, cookie=cookie, token=token))
        self.assertEqual(m.parse(theirs[40:], packed(VIP), packed(HOA)), cls(index, cookie, token))

    @given(status=st.integers(0, 255), home=st.binary(min_size=16, max_size=16))
    def test_binding_error_both_ways(self, status: int, home: bytes) -> None:
        ours = m.build(m.BindingError(status, home), packed(VIP), packed(COA))
        packet = bytes(IPv6(src=VIP, dst=COA, nh=135) / ours)
        self.assertEqual((IPv6(packet)[MIP6MH_BE].status, IPv6(packet)[MIP6MH_BE].ha),
                         (status, str(ipaddress.IPv6Address(home))))  # fmt: skip
        self.assertTrue(checksum_valid(packet, MIP6MH_BE))
        theirs = bytes(IPv6(src=VIP, dst=COA)
                       / MIP6MH_BE(status=status, ha=str(ipaddress.IPv6Address(home))))
        self.assertEqual(m.parse(theirs[40:], packed(VIP), packed(COA)),
                         m.BindingError(status, home))  # fmt: skip

    def test_options_and_authenticator_split(self) -> None:
        """A scapy BU with Nonce Indices and Binding Authorization Data: our option
        readers find both, and the MH Data excludes exactly the authenticator."""
        auth = bytes(range(12))
        packet = IPv6(src=COA, dst=VIP) / IPv6ExtHdrDestOpt(options=[HAO(hoa=HOA)]) / MIP6MH_BU(
            seq=5, mhtime=10, flags="A", options=[
                MIP6OptNonceIndices(olen=4, hni=0x1234, coni=0x5678),
                MIP6OptBindingAuthData(olen=12, authenticator=int.from_bytes(auth, "big"))])
        mh = bytes(packet[MIP6MH_BU])
        msg = m.parse(mh, packed(HOA), packed(VIP))
        assert isinstance(msg, m.BindingUpdate)
        self.assertEqual(m.nonce_indices(msg.options), (0x1234, 0x5678))
        data, found = m.split_authenticator(mh)
        self.assertEqual(found, auth)
        self.assertEqual(data, mh[:4] + b"\0\0" + mh[6:-12])
        # Our build of the same message is scapy's, byte for byte.
        ours = m.build(m.BindingUpdate(5, 10, m.BU_ACK, None, (
            m.nonce_indices_option(0x1234, 0x5678), m.auth_data_option(auth))),
            packed(HOA), packed(VIP))  # fmt: skip
        self.assertEqual(ours, mh)

    def test_authenticator_must_be_last(self) -> None:
        msg = m.BindingUpdate(1, 1, m.BU_ACK, None, (
            m.auth_data_option(), m.nonce_indices_option(1, 2)))
        exc = self.assertRaises(m.MalformedMobility, m.split_authenticator, m.build(msg))
        self.assertIs(exc.reason, m.MobilityReason.AUTHENTICATOR_NOT_LAST)
        exc = self.assertRaises(m.MalformedMobility, m.split_authenticator,
                                m.build(m.BindingUpdate(1, 1)))  # fmt: skip
        self.assertIs(exc.reason, m.MobilityReason.NO_AUTHENTICATOR)

    @given(mh_type=st.sampled_from([1, 2, 3, 4, 7]), cut=st.integers(1, 16))
    def test_short_header_length_refused(self, mh_type: int, cut: int) -> None:
        """§9.2: a Header Len below the type's minimum is refused with its reason."""
        minimum = {1: 16, 2: 16, 3: 24, 4: 24, 7: 24}[mh_type]
        length = max(8, (minimum - cut) // 8 * 8)
        data = bytes([59, length // 8 - 1, mh_type, 0]) + bytes(length - 4)
        exc = self.assertRaises(m.MalformedMobility, m.parse, data)
        self.assertIs(exc.reason, m.MobilityReason.BAD_HEADER_LENGTH)


# -- the correspondent's logic -------------------------------------------------------------


def correspondent(clock: Clock, **kwargs: Any) -> Correspondent:
    return Correspondent(clock, node_key=b"K" * 20, **kwargs)


def handler(cn: Correspondent) -> Any:
    def handle(data: bytes) -> bytes | None:
        return outcome(cn, IPv6(data)).reply
    return handle


def outcome(cn: Correspondent, packet: Packet) -> Any:
    buf = bytearray(bytes(packet))
    view = parse(buf)
    result = cn.handle(buf, view.mh, view.hoa, view.end)
    if result.reply is not None:
        dissects_cleanly(result.reply)
    return result


class NonceTableTests(SynchronousTestCase):
    def test_rotation_and_lifetime(self) -> None:
        clock = Clock()
        table = NonceTable(clock, interval=30.0, lifetime=240.0)
        first, nonce = table.current()
        clock.advance(29)
        self.assertEqual(table.current()[0], first)
        clock.advance(1)
        second, _ = table.current()
        self.assertEqual(second, (first + 1) & 0xFFFF)
        self.assertEqual(table.get(first), nonce)  # retired at 30 s, kept until 270 s
        clock.advance(239)
        self.assertEqual(table.get(first), nonce)
        clock.advance(1)
        self.assertIsNone(table.get(first))
        self.assertIsNone(table.get((first + 100) & 0xFFFF))  # never issued
        # Bounded: lifetime / interval + 1 nonces at most, however long it runs.
        for _ in range(100):
            clock.advance(30)
            table.current()
        self.assertLessEqual(len(table), 240 // 30 + 1)


class CorrespondentTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.clock = Clock()
        self.clock.advance(1000)
        self.cn = correspondent(self.clock)
        self.mn = MobileNode(handler(self.cn))

    def test_tests_carry_tokens_from_the_rfc(self) -> None:
        """HoT to the home address, CoT to the care-of address, cookies echoed, tokens =
        First(64, HMAC_SHA1(Kcn, address | nonce | 0 or 1)), checksums valid in scapy."""
        hot, cot = self.mn.home_test(), self.mn.care_of_test()
        self.assertEqual((hot.src, hot.dst, cot.src, cot.dst), (VIP, HOA, VIP, COA))
        self.assertEqual(hot[MIP6MH_HoT].cookie, b"homecook")
        self.assertEqual(cot[MIP6MH_CoT].cookie, b"carecook")
        nonce = self.cn.nonces.get(hot[MIP6MH_HoT].index)
        assert nonce is not None
        self.assertEqual(hot[MIP6MH_HoT].token, token_of(b"K" * 20, HOA, nonce, 0))
        self.assertEqual(cot[MIP6MH_CoT].token, token_of(b"K" * 20, COA, nonce, 1))
        self.assertTrue(checksum_valid(bytes(hot), MIP6MH_HoT))
        self.assertTrue(checksum_valid(bytes(cot), MIP6MH_CoT))

    def test_binding_update_accepted_with_authenticated_ack(self) -> None:
        hot, cot = self.mn.home_test(), self.mn.care_of_test()
        result = outcome(self.cn, self.mn.update(hot, cot, lifetime=200))
        self.assertEqual(result.what, "bu-accepted")
        self.assertEqual(self.cn.bindings, {packed(HOA): packed(COA)})
        # Lifetime capped at MAX_RR_BINDING_LIFETIME (420 s = 105 units).
        self.assertEqual(getattr(self.cn.entry(packed(HOA)), "expires", None), 1000 + 420)
        ba = IPv6(result.reply)
        self.assertEqual((ba.src, ba.dst), (VIP, COA))
        self.assertEqual(ba[IPv6ExtHdrRouting].type, 2)
        self.assertEqual(ba[IPv6ExtHdrRouting].addresses, [HOA])
        self.assertEqual((ba[MIP6MH_BA].status, ba[MIP6MH_BA].seq, ba[MIP6MH_BA].mhtime),
                         (0, 1, 105))  # fmt: skip
        self.assertTrue(checksum_valid(result.reply, MIP6MH_BA))
        # The BA's authenticator, checked with the RFC's formula.
        kbm = hashlib.sha1(hot[MIP6MH_HoT].token + cot[MIP6MH_CoT].token).digest()
        mh = bytearray(bytes(ba[MIP6MH_BA]))
        mh[4:6] = b"\0\0"
        want = hmac.new(kbm, packed(COA) + packed(VIP) + bytes(mh[:-12]),
                        hashlib.sha1).digest()[:12]  # fmt: skip
        self.assertEqual(bytes(mh[-12:]), want)
        self.assertEqual(ba[MIP6OptBindingAuthData].authenticator,
                         int.from_bytes(want, "big"))  # fmt: skip

    def test_no_ack_without_a_bit(self) -> None:
        hot, cot = self.mn.home_test(), self.mn.care_of_test()
        result = outcome(self.cn, self.mn.update(hot, cot, flags=""))
        self.assertEqual((result.what, result.reply), ("bu-accepted", None))

    def test_deregistration(self) -> None:
        """Lifetime 0 (from the care-of address) or the care-of address = the home
        address (from home, Kbm from the home token alone) deletes the entry."""
        hot, cot = self.mn.home_test(), self.mn.care_of_test()
        outcome(self.cn, self.mn.update(hot, cot))
        result = outcome(self.cn, self.mn.update(hot, cot, lifetime=0))
        self.assertEqual((result.what, result.deleted), ("bu-deregistered", True))
        self.assertEqual(self.cn.bindings, {})
        outcome(self.cn, self.mn.update(hot, cot))
        home_only = hashlib.sha1(hot[MIP6MH_HoT].token).digest()
        result = outcome(self.cn, self.mn.update(hot, None, care_of=HOA, kbm=home_only))
        self.assertEqual(result.what, "bu-deregistered")
        self.assertEqual(self.cn.bindings, {})
        ba = IPv6(result.reply)
        self.assertEqual(ba.dst, HOA)  # straight home, no Type 2 Routing Header
        self.assertNotIn(IPv6ExtHdrRouting, ba)
        self.assertTrue(checksum_valid(result.reply, MIP6MH_BA))

    def test_expiry_on_sweep(self) -> None:
        hot, cot = self.mn.home_test(), self.mn.care_of_test()
        outcome(self.cn, self.mn.update(hot, cot, lifetime=10))  # 40 s
        self.clock.advance(39)
        self.assertEqual(self.cn.expire(), [])
        self.clock.advance(1)
        self.assertEqual(self.cn.expire(), [packed(HOA)])
        self.assertEqual((self.cn.bindings, len(self.cn)), ({}, 0))

    def test_cache_bound_refuses_newcomers(self) -> None:
        cn = correspondent(self.clock, max_entries=1)
        first, second = MobileNode(handler(cn)), MobileNode(handler(cn), OTHER_HOA, COA2)
        outcome(cn, first.update(first.home_test(), first.care_of_test()))
        result = outcome(cn, second.update(second.home_test(), second.care_of_test()))
        self.assertEqual(result.what, "bu-cache-full")
        self.assertEqual(IPv6(result.reply)[MIP6MH_BA].status, 130)
        self.assertEqual(list(cn.bindings), [packed(HOA)])

    def test_binding_error_rate_limited(self) -> None:
        cn = correspondent(self.clock, binding_error_rate=2.0)
        packet = bytearray(bytes(IPv6(src=COA, dst=VIP) / IPv6ExtHdrDestOpt(options=[HAO(hoa=HOA)])
                                 / UDP(dport=80)))  # fmt: skip
        view = parse(packet)
        errors = [cn.binding_error(packet, view.hoa) for _ in range(5)]
        for error in errors:
            if error is not None:
                dissects_cleanly(error)
        self.assertEqual([e is not None for e in errors], [True, True, False, False, False])
        first = errors[0]
        assert first is not None
        be = IPv6(first)
        self.assertEqual((be.src, be.dst, be[MIP6MH_BE].status, be[MIP6MH_BE].ha),
                         (VIP, COA, 1, HOA))  # fmt: skip
        self.assertTrue(checksum_valid(first, MIP6MH_BE))
        self.clock.advance(0.5)
        self.assertIsNotNone(cn.binding_error(packet, view.hoa))
        self.assertIsNone(cn.binding_error(packet, view.hoa))


class ForgeryTests(SynchronousTestCase):
    """Each forgery refused with its reason; the cache unchanged."""

    def setUp(self) -> None:
        self.clock = Clock()
        self.clock.advance(1000)
        self.cn = correspondent(self.clock)
        self.mn = MobileNode(handler(self.cn))
        self.hot, self.cot = self.mn.home_test(), self.mn.care_of_test()
        self.assertEqual(outcome(self.cn, self.mn.update(self.hot, self.cot)).what,
                         "bu-accepted")  # fmt: skip
        self.before = dict(self.cn.bindings)

    def refused(self, packet: Packet | bytes, reason: str) -> Any:
        result = outcome(self.cn, packet if isinstance(packet, Packet) else IPv6(packet))
        self.assertTrue(result.refused)
        self.assertEqual(result.what, reason)
        self.assertEqual(self.cn.bindings, self.before)
        entry = self.cn.entry(packed(HOA))
        self.assertEqual(entry.seq if entry else None, 1)
        return result

    def test_bad_authenticator(self) -> None:
        result = self.refused(self.mn.update(self.hot, self.cot, care_of=COA2, kbm=b"x" * 20),
                              "bu-bad-authenticator")  # fmt: skip
        self.assertIsNone(result.reply)  # silently discarded

    def test_tokens_of_another_care_of_address(self) -> None:
        """The care-of token was issued to COA; a BU from COA2 with it fails."""
        self.refused(self.mn.update(self.hot, self.cot, care_of=COA2), "bu-bad-authenticator")

    def test_hao_not_the_home_test_address(self) -> None:
        """A BU whose HAO is not the address the Home Test went to."""
        self.refused(self.mn.update(self.hot, self.cot, home=OTHER_HOA), "bu-bad-authenticator")

    def test_stale_nonce_index(self) -> None:
        self.clock.advance(30 + 240)
        result = self.refused(self.mn.update(self.hot, self.cot), "bu-stale-nonce")
        ba = IPv6(result.reply)
        self.assertEqual(ba[MIP6MH_BA].status, 138)
        self.assertTrue(checksum_valid(result.reply, MIP6MH_BA))
        index = self.hot[MIP6MH_HoT].index
        fresh = self.mn.care_of_test()
        result = self.refused(self.mn.update(self.hot, fresh), "bu-stale-nonce")
        self.assertEqual(IPv6(result.reply)[MIP6MH_BA].status, 136)
        result = self.refused(self.mn.update(self.hot, self.cot,
                                             indices=(fresh[MIP6MH_CoT].index, index)),
                              "bu-stale-nonce")  # fmt: skip
        self.assertEqual(IPv6(result.reply)[MIP6MH_BA].status, 137)

    def test_old_or_equal_sequence(self) -> None:
        for seq in (1, 0, 1 + 0x8000):
            result = self.refused(self.mn.update(self.hot, self.cot, seq=seq), "bu-sequence")
            ba = IPv6(result.reply)
            self.assertEqual((ba[MIP6MH_BA].status, ba[MIP6MH_BA].seq), (135, 1))
        # Modulo 2**16: 0x8000 past 1 is old, 0x7FFF past it is new.
        newer = self.mn.update(self.hot, self.cot, seq=0x8000)
        self.assertEqual(outcome(self.cn, newer).what, "bu-accepted")

    def test_replayed_update(self) -> None:
        replay = self.mn.update(self.hot, self.cot, seq=1)
        self.refused(replay, "bu-sequence")

    def test_without_hao(self) -> None:
        bu = self.mn.update(self.hot, self.cot)
        self.refused(IPv6(src=COA, dst=VIP) / bu[MIP6MH_BU], "bu-without-hao")

    def test_without_options(self) -> None:
        bare = IPv6(src=COA, dst=VIP) / IPv6ExtHdrDestOpt(options=[HAO(hoa=HOA)]) / MIP6MH_BU(
            seq=9, flags="A", mhtime=10)
        self.refused(bare, "bu-no-nonce-indices")
        only_nonces = IPv6(src=COA, dst=VIP) / IPv6ExtHdrDestOpt(options=[HAO(hoa=HOA)]) / \
            MIP6MH_BU(seq=9, flags="A", mhtime=10,
                      options=[MIP6OptNonceIndices(olen=4, hni=1, coni=1)])  # fmt: skip
        self.refused(only_nonces, "bu-no-authenticator")

    def test_home_registration(self) -> None:
        result = self.refused(self.mn.update(self.hot, self.cot, flags="AH"),
                              "bu-home-registration")  # fmt: skip
        self.assertEqual(IPv6(result.reply)[MIP6MH_BA].status, 131)

    def test_bad_checksum_and_garbage(self) -> None:
        raw = bytearray(bytes(self.mn.update(self.hot, self.cot)))
        raw[-1] ^= 1  # the authenticator's last octet: the checksum no longer matches
        self.refused(bytes(raw), "mh-bad-checksum")
        good = bytes(self.mn.update(self.hot, self.cot))
        cut = good[:64] + bytes([59, 0, 5, 0, 0, 0, 0, 0])  # Header Len 0: below a BU's
        cut = cut[:4] + struct.pack("!H", len(cut) - 40) + cut[6:]
        self.refused(cut, "mh-bad-checksum")

    @given(data=st.binary(max_size=64))
    @settings(max_examples=300)
    def test_garbage_after_hao(self, data: bytes) -> None:
        """Any bytes as the Mobility Header: refused with a reason or handled; never an
        exception; the cache unchanged."""
        header = bytes(IPv6(src=COA, dst=VIP, nh=60, plen=24 + len(data)))[:40]
        dest = bytes([135, 2, 1, 2, 0, 0, 0xC9, 16]) + packed(HOA)
        buf = bytearray(header + dest + data)
        try:
            view = parse(buf)
        except ValueError:
            return
        if view.mh < 0:
            return
        result = self.cn.handle(buf, view.mh, view.hoa, view.end)
        self.assertTrue(result.refused, result)
        self.assertEqual(self.cn.bindings, self.before)

    def test_test_init_with_hao_or_bad_source(self) -> None:
        hoti = IPv6(src=COA, dst=VIP) / IPv6ExtHdrDestOpt(options=[HAO(hoa=HOA)]) / MIP6MH_HoTI()
        self.refused(hoti, "mh-with-hao")
        self.refused(IPv6(src="ff02::1", dst=VIP) / MIP6MH_CoTI(), "mh-bad-source")
        self.refused(IPv6(src="fe80::1", dst=VIP) / MIP6MH_HoTI(), "mh-bad-source")

    def test_unexpected_and_unknown_types(self) -> None:
        self.refused(IPv6(src=COA, dst=VIP) / MIP6MH_HoT(), "mh-unexpected-type")
        unknown = bytes(IPv6(src=COA, dst=VIP, nh=135)) + m.build(
            m.OtherMobilityMessage(42, bytes(2)), packed(COA), packed(VIP))
        unknown = unknown[:4] + struct.pack("!H", len(unknown) - 40) + unknown[6:]
        result = self.refused(unknown, "mh-unknown-type")
        self.assertEqual(IPv6(result.reply)[MIP6MH_BE].status, 2)


# -- in the balancer ------------------------------------------------------------------------


def balancer_with(mode: str) -> tuple[Balancer, Clock]:
    balancer, clock = make(scheduler="round_robin")
    clock.advance(1000)
    if mode != "off":
        balancer.serve_as_correspondent(
            Correspondent(clock, strict=mode == "strict", node_key=b"K" * 20))
    return balancer, clock


def data_packet(care_of: str = COA, home: str = HOA) -> bytes:
    return bytes(IPv6(src=care_of, dst=VIP) / IPv6ExtHdrDestOpt(options=[HAO(hoa=home)])
                 / UDP(sport=4000, dport=80) / b"data")  # fmt: skip


def reply_packet(balancer: Balancer, home: str = HOA) -> bytes:
    backend = balancer.table.get(Key("addr", packed(home)))
    assert backend is not None
    return bytes(IPv6(src=str(backend.backend.address), dst=home)
                 / UDP(sport=80, dport=4000) / b"reply")  # fmt: skip


def inbound(balancer: Balancer, data: bytes | Packet) -> bytes | None:
    out = balancer.inbound(bytearray(bytes(data)))
    if out is not None and IPv6(bytes(out)).dst not in {str(b.address) for b in BACKENDS}:
        dissects_cleanly(bytes(out))  # not forwarded: the balancer's own answer
    return None if out is None else bytes(out)


def sent(balancer: Balancer, data: bytes | Packet) -> Packet:
    """What the balancer sends for ``data`` (it must send something), dissected."""
    out = inbound(balancer, data)
    assert out is not None
    return IPv6(out)


def reply(balancer: Balancer) -> Packet:
    out = balancer.outbound(bytearray(reply_packet(balancer)))
    assert out is not None
    return IPv6(bytes(out))


class BalancerTests(SynchronousTestCase):
    def test_off_forwards_mobility_headers_as_before(self) -> None:
        balancer, _ = balancer_with("off")
        out = inbound(balancer, IPv6(src=HOA, dst=VIP) / MIP6MH_HoTI(cookie=b"homecook"))
        assert out is not None
        self.assertIn(IPv6(out).dst, {str(b.address) for b in BACKENDS})
        self.assertIsNone(balancer.correspondent)

    def test_route_optimisation_after_the_ack(self) -> None:
        """Lenient: HoT/CoT/BA answered, never forwarded; replies go to the home
        address until the BU is accepted, then to the care-of address with a Type 2
        Routing Header; the terminal keeps its backend."""
        balancer, _ = balancer_with("lenient")
        mn = MobileNode(lambda data: inbound(balancer, data))
        # Before: the terminal at home (tunnelled), a binding by its home address.
        first = inbound(balancer, IPv6(src=HOA, dst=VIP) / UDP(sport=4000, dport=80) / b"x")
        assert first is not None
        backend = IPv6(first).dst
        self.assertEqual(reply(balancer).dst, HOA)
        hot, cot = mn.home_test(), mn.care_of_test()
        ba = sent(balancer, mn.update(hot, cot))
        self.assertEqual(ba[MIP6MH_BA].status, 0)
        self.assertEqual(balancer.return_paths.care_of(packed(HOA)), packed(COA))
        optimised = reply(balancer)
        self.assertEqual((optimised.src, optimised.dst), (VIP, COA))
        self.assertEqual(optimised[IPv6ExtHdrRouting].addresses, [HOA])
        out = inbound(balancer, data_packet())
        assert out is not None
        self.assertEqual(IPv6(out).dst, backend)
        counted = balancer.counters.correspondent
        self.assertEqual((counted["hoti"], counted["coti"], counted["bu-accepted"],
                          counted["hot-sent"], counted["cot-sent"], counted["ba-sent"]),
                         (1, 1, 1, 1, 1, 1))  # fmt: skip
        self.assertEqual(balancer.counters.packets_out, 2)  # the two data packets only
        # Deregistration: replies to the home address again.
        inbound(balancer, mn.update(hot, cot, lifetime=0))
        self.assertIsNone(balancer.return_paths.care_of(packed(HOA)))

    def test_confirmation_expires_with_the_binding(self) -> None:
        balancer, clock = balancer_with("lenient")
        mn = MobileNode(lambda data: inbound(balancer, data))
        inbound(balancer, mn.update(mn.home_test(), mn.care_of_test(), lifetime=10))
        clock.advance(40)
        balancer.sweep()
        self.assertIsNone(balancer.return_paths.care_of(packed(HOA)))
        self.assertEqual(balancer.correspondent.bindings, {})  # type: ignore[union-attr]

    def test_forged_update_changes_nothing(self) -> None:
        balancer, _ = balancer_with("strict")
        mn = MobileNode(lambda data: inbound(balancer, data))
        hot, cot = mn.home_test(), mn.care_of_test()
        table_before = sorted((bytes(k), b.backend.name) for k, b in balancer.table)
        for forged, reason in ((mn.update(hot, cot, kbm=b"x" * 20), "bu-bad-authenticator"),
                               (mn.update(hot, cot, indices=(7, 7)), "bu-stale-nonce")):
            inbound(balancer, forged)
            self.assertEqual(balancer.counters.dropped[reason], 1)
        self.assertEqual(len(balancer.return_paths), 0)
        self.assertEqual(sorted((bytes(k), b.backend.name) for k, b in balancer.table),
                         table_before)  # fmt: skip
        self.assertEqual(balancer.counters.packets_out, 0)

    def test_strict_binding_error_and_lenient_keying(self) -> None:
        strict, _ = balancer_with("strict")
        be = inbound(strict, data_packet())
        assert be is not None
        self.assertEqual((IPv6(be).dst, IPv6(be)[MIP6MH_BE].status, IPv6(be)[MIP6MH_BE].ha),
                         (COA, 1, HOA))  # fmt: skip
        self.assertEqual(strict.counters.dropped["hao-without-binding"], 1)
        self.assertEqual(strict.counters.correspondent["be-sent"], 1)
        self.assertEqual(len(strict.table), 0)
        # After return routability and the BU, the same packet is forwarded; from
        # another care-of address it is not.
        mn = MobileNode(lambda data: inbound(strict, data))
        inbound(strict, mn.update(mn.home_test(), mn.care_of_test()))
        out = inbound(strict, data_packet())
        assert out is not None
        self.assertEqual(IPv6(out).src, HOA)
        self.assertEqual(sent(strict, data_packet(COA2))[MIP6MH_BE].status, 1)
        # The fast path and the XDP executor check the cache themselves.
        self.assertIsNone(strict.policy.fast_inbound)
        self.assertTrue(strict.policy.strict_hao)
        lenient, _ = balancer_with("lenient")
        out = inbound(lenient, data_packet())
        assert out is not None
        self.assertNotIn(MIP6MH_BE, IPv6(out))
        self.assertIsNone(lenient.policy.fast_inbound)
        self.assertFalse(lenient.policy.strict_hao)


class ConfigTests(SynchronousTestCase):
    BASE = """
[virtual]
addresses = ["2001:db8:5::80"]
[interfaces]
client = "eth0"
server = "eth1"
[[backend]]
name = "a"
address = "2001:db8:b0::11"
"""

    def test_modes(self) -> None:
        self.assertEqual(parse_config(self.BASE, "x.toml").correspondent.mode, "off")
        self.assertIsNone(build_balancer(parse_config(self.BASE, "x.toml"), Clock())
                          .correspondent)  # fmt: skip
        for mode in ("lenient", "strict"):
            config = parse_config(self.BASE + f'[correspondent]\nmode = "{mode}"\n', "x.toml")
            balancer = build_balancer(config, Clock())
            assert balancer.correspondent is not None
            self.assertEqual(balancer.correspondent.strict, mode == "strict")

    def test_refusals(self) -> None:
        for text, key, part in (
            ('[correspondent]\nmode = "on"\n', "correspondent.mode", "not one of"),
            ('[correspondent]\nmode = "strict"\n[balancer]\nmode = "transparent"\n',
             "correspondent.mode", 'needs balancer.mode = "translate"'),
            ("[correspondent]\nmax_lifetime = 421\n", "correspondent.max_lifetime", "outside"),
            ("[correspondent]\nbinding_error_rate = -1\n", "correspondent.binding_error_rate",
             "outside"),
            ("[correspondent]\nkey_file = 'x'\n", "correspondent.key_file", "unknown key"),
        ):
            with self.assertRaises(ConfigError) as caught:
                parse_config(self.BASE + text, "x.toml")
            self.assertEqual(caught.exception.key, key, str(caught.exception))
            self.assertIn(part, caught.exception.reason)


class AlternateCareOfTests(SynchronousTestCase):
    def test_alternate_care_of_address_is_the_care_of_address(self) -> None:
        """A BU sent from one address with an Alternate Care-of Address option registers
        the alternate one: its Care-of Test, its authenticator, the BA goes there."""
        clock = Clock()
        cn = correspondent(clock)
        mn = MobileNode(handler(cn), care_of=COA2)
        hot, cot = mn.home_test(), mn.care_of_test()
        kbm = hashlib.sha1(hot[MIP6MH_HoT].token + cot[MIP6MH_CoT].token).digest()
        packet = (IPv6(src=COA, dst=VIP) / IPv6ExtHdrDestOpt(options=[HAO(hoa=HOA)])
                  / MIP6MH_BU(seq=1, flags="A", mhtime=10, options=[
                      MIP6OptAltCoA(acoa=COA2),
                      MIP6OptNonceIndices(olen=4, hni=hot[MIP6MH_HoT].index,
                                          coni=cot[MIP6MH_CoT].index),
                      MIP6OptBindingAuthData(olen=12, authenticator=0)]))  # fmt: skip
        result = outcome(cn, sign_bu(packet, kbm, COA2))
        self.assertEqual(result.what, "bu-accepted")
        self.assertEqual(cn.bindings, {packed(HOA): packed(COA2)})
        self.assertEqual(IPv6(result.reply).dst, COA2)
        # Signed for the source address instead of the alternate one: refused.
        packet[MIP6MH_BU].seq = 2
        result = outcome(cn, sign_bu(packet, kbm, COA))
        self.assertEqual(result.what, "bu-bad-authenticator")

    def test_unauthenticated_acks_to_an_alternate_address_are_rate_limited(self) -> None:
        """A forged BU naming any address as its Alternate Care-of Address, with nonce
        indices the node never issued, is answered (BA 138) before an authenticator can be
        checked: those BAs draw on the Binding Errors' budget, so a stream of forgeries
        cannot aim a stream of BAs at a victim.  Refused and counted either way; the cache
        and return paths unchanged."""
        clock = Clock()
        clock.advance(1000)
        cn = correspondent(clock, binding_error_rate=2.0)
        victim = "2001:db8:dead::1"
        forged = (IPv6(src=COA, dst=VIP) / IPv6ExtHdrDestOpt(options=[HAO(hoa=HOA)])
                  / MIP6MH_BU(seq=1, flags="A", mhtime=10, options=[
                      MIP6OptAltCoA(acoa=victim),
                      MIP6OptNonceIndices(olen=4, hni=4000, coni=4001),
                      MIP6OptBindingAuthData(olen=12, authenticator=0)]))  # fmt: skip
        results = [outcome(cn, forged) for _ in range(5)]
        self.assertEqual({r.what for r in results}, {"bu-stale-nonce"})
        sent = [r.reply for r in results if r.reply is not None]
        self.assertEqual(len(sent), 2)
        for reply in sent:
            self.assertEqual((IPv6(reply).dst, IPv6(reply)[MIP6MH_BA].status), (victim, 138))
            self.assertTrue(checksum_valid(reply, MIP6MH_BA))
        self.assertEqual(cn.bindings, {})
        clock.advance(0.5)
        self.assertIsNotNone(outcome(cn, forged).reply)


class OperatorTests(SynchronousTestCase):
    """The binding cache in lbproxyctl, the outcomes in stats and the metrics."""

    def test_cache_stats_and_metrics(self) -> None:
        from prometheus_client.exposition import generate_latest

        from lbproxy.ops.control import Control
        from lbproxy.ops.ctl import render
        from lbproxy.ops.metrics import BalancerCollector, make_registry
        from tests.test_metrics import samples

        balancer, clock = balancer_with("strict")
        control = Control(balancer)
        self.assertEqual(control.correspondent()["entries"], [])
        mn = MobileNode(lambda data: inbound(balancer, data))
        inbound(balancer, mn.update(mn.home_test(), mn.care_of_test(), lifetime=25))
        inbound(balancer, mn.update(mn.home_test(), mn.care_of_test(), seq=1))  # replayed
        clock.advance(10)
        view = control.correspondent()
        self.assertEqual((view["mode"], view["size"]), ("strict", 1))
        self.assertEqual(view["entries"], [{"home": HOA, "care_of": COA, "seq": 1,
                                            "left": 90.0}])  # fmt: skip
        self.assertIn(f"{HOA} -> {COA}  seq 1  90.0 s left", render("cache", view))
        limited = control.correspondent(limit=0)
        self.assertEqual((limited["size"], limited["entries"]), (1, []))
        self.assertIn("1 bindings (0 shown)", render("cache", limited))
        stats = control.stats()
        self.assertEqual(stats["correspondent"]["bu-accepted"], 1)
        self.assertEqual(stats["dropped"]["bu-sequence"], 1)
        got = samples(generate_latest(make_registry(BalancerCollector(control))).decode())
        self.assertEqual(got[("lbproxy_correspondent_total", (("event", "bu-accepted"),))], 1)
        self.assertEqual(got[("lbproxy_correspondent_total", (("event", "hoti"),))], 2)
        self.assertEqual(got[("lbproxy_packets_dropped_total", (("reason", "bu-sequence"),))],
                         1)  # fmt: skip
        off = Control(balancer_with("off")[0]).correspondent()
        self.assertEqual((off["mode"], off["entries"]), ("off", []))


class TraceTests(SynchronousTestCase):
    def test_trace_says_what_the_correspondent_does(self) -> None:
        strict, _ = balancer_with("strict")
        self.assertEqual(strict.trace(bytes(IPv6(src=HOA, dst=VIP) / MIP6MH_HoTI())).reason,
                         "answered by the correspondent node")  # fmt: skip
        self.assertEqual(strict.trace(data_packet()).reason, "hao-without-binding")
        lenient, _ = balancer_with("lenient")
        self.assertIsNotNone(lenient.trace(data_packet()).backend)
        off, _ = balancer_with("off")
        self.assertIsNotNone(off.trace(bytes(IPv6(src=HOA, dst=VIP) / MIP6MH_HoTI())).backend)


class PersistenceTests(SynchronousTestCase):
    """The binding cache survives a restart with the table (lbproxy.ops.persistence)."""

    def test_saved_and_restored(self) -> None:
        from lbproxy.ops import persistence

        path = self.mktemp()
        balancer, clock = balancer_with("strict")
        mn = MobileNode(lambda data: inbound(balancer, data))
        inbound(balancer, mn.update(mn.home_test(), mn.care_of_test(), lifetime=50))  # 200 s
        cn = balancer.correspondent
        assert cn is not None
        persistence.save(balancer.table, path, clock.seconds(), balancer.return_paths,
                         correspondent=cn)  # fmt: skip
        # A new process, 50 s later: the entry is back with 150 s left, sequence
        # number kept (a replay is still refused), the return path too.
        again, clock2 = balancer_with("strict")
        clock2.advance(50)
        result = persistence.load(again.table, path, again.backends, clock2.seconds(),
                                  return_paths=again.return_paths,
                                  correspondent=again.correspondent)  # fmt: skip
        self.assertEqual((result.error, result.binding_cache, result.return_paths), (None, 1, 1))
        restored = again.correspondent
        assert restored is not None
        entry = restored.entry(packed(HOA))
        assert entry is not None
        self.assertEqual((entry.care_of, entry.seq, entry.expires),
                         (packed(COA), 1, clock2.seconds() + 150))  # fmt: skip
        out = inbound(again, data_packet())  # strict: forwarded, no Binding Error
        assert out is not None
        self.assertEqual(IPv6(out).src, HOA)
        # Past its lifetime at restore time: not restored.
        late, clock3 = balancer_with("strict")
        clock3.advance(201)
        result = persistence.load(late.table, path, late.backends, clock3.seconds(),
                                  correspondent=late.correspondent)  # fmt: skip
        self.assertEqual(result.binding_cache, 0)

    def test_damaged_entry_refuses_the_file(self) -> None:
        from lbproxy.ops import persistence

        path = self.mktemp()
        balancer, clock = balancer_with("lenient")
        assert balancer.correspondent is not None
        balancer.correspondent.register(packed(HOA), packed(COA), 7, 100.0)
        persistence.save(balancer.table, path, clock.seconds(),
                         correspondent=balancer.correspondent)  # fmt: skip
        with open(path) as handle:
            text = handle.read()
        self.assertIn('"seq":7', text)
        bad = text.replace('"seq":7', '"seq":70000')
        with open(path, "w") as handle:
            handle.write(bad)
        again, clock2 = balancer_with("lenient")
        result = persistence.load(again.table, path, again.backends, clock2.seconds(),
                                  correspondent=again.correspondent)  # fmt: skip
        self.assertIn("seq must be an integer", result.error or "")
        self.assertEqual(len(again.correspondent or []), 0)


class JourneyTests(SynchronousTestCase):
    def test_binding_updates_and_binding_errors_in_the_journey(self) -> None:
        """A terminal's journey (lbproxy.core.journey) shows its Binding Updates,
        accepted and forged, and the Binding Errors strict mode answered."""
        from lbproxy.core.journey import Journeys

        balancer, clock = balancer_with("strict")
        journeys = Journeys(clock)
        balancer.follow_journeys(journeys)
        inbound(balancer, IPv6(src=HOA, dst=VIP) / UDP(sport=4000, dport=80) / b"home")
        mn = MobileNode(lambda data: inbound(balancer, data))
        hot, cot = mn.home_test(), mn.care_of_test()
        inbound(balancer, mn.update(hot, cot, kbm=b"x" * 20))
        inbound(balancer, mn.update(hot, cot))
        inbound(balancer, data_packet(COA2))
        journey = journeys.find(bytes(Key("addr", packed(HOA))))
        assert journey is not None
        texts = [(e.kind, e.text) for e in journey.events]
        self.assertIn(("drop", f"Binding Update from {COA}: bu-bad-authenticator"), texts)
        self.assertIn(("correspondent", f"Binding Update from {COA}: bu-accepted"), texts)
        self.assertIn("hao-without-binding", [t for k, t in texts if k == "drop"])


class EveryMessageTests(SynchronousTestCase):
    """Must show 2: every kind of message the balancer emits, each status included,
    dissects cleanly in scapy with a valid checksum (`dissects_cleanly`, which every
    test here also applies to whatever the balancer answers)."""

    def test_every_kind(self) -> None:
        SEEN.clear()
        clock = Clock()
        clock.advance(1000)
        cn = correspondent(clock, max_entries=1)
        mn = MobileNode(handler(cn))
        hot, cot = mn.home_test(), mn.care_of_test()
        outcome(cn, mn.update(hot, cot))  # BA 0
        outcome(cn, mn.update(hot, cot, seq=1))  # BA 135
        outcome(cn, mn.update(hot, cot, flags="AH"))  # BA 131
        other = MobileNode(handler(cn), OTHER_HOA, COA2)
        outcome(cn, other.update(other.home_test(), other.care_of_test()))  # BA 130
        index = hot[MIP6MH_HoT].index
        never = (index + 0x100) & 0xFFFF  # an index never issued
        outcome(cn, mn.update(hot, cot, indices=(index, never)))  # BA 137
        outcome(cn, mn.update(hot, cot, indices=(never, index)))  # BA 136
        outcome(cn, mn.update(hot, cot, indices=(never, never)))  # BA 138
        outcome(cn, mn.update(hot, cot, lifetime=0))  # BA 0, deregistration
        unknown = bytes(IPv6(src=COA, dst=VIP, nh=135)) + m.build(
            m.OtherMobilityMessage(42, bytes(2)), packed(COA), packed(VIP))
        unknown = unknown[:4] + struct.pack("!H", len(unknown) - 40) + unknown[6:]
        outcome(cn, IPv6(unknown))  # BE 2
        strict, _ = balancer_with("strict")
        inbound(strict, data_packet())  # BE 1
        self.assertEqual(SEEN, {"MIP6MH_HoT", "MIP6MH_CoT", "MIP6MH_BA 0", "MIP6MH_BA 130",
                                "MIP6MH_BA 131", "MIP6MH_BA 135", "MIP6MH_BA 136",
                                "MIP6MH_BA 137", "MIP6MH_BA 138", "MIP6MH_BE 1",
                                "MIP6MH_BE 2"})  # fmt: skip


class BoundedTests(SynchronousTestCase):
    def test_refreshes_do_not_grow_the_deadline_heaps(self) -> None:
        """A mobile node refreshing its binding as fast as it can (each Binding Update
        valid) leaves the cache's and the return paths' deadline heaps bounded."""
        balancer, clock = balancer_with("lenient")
        mn = MobileNode(lambda data: inbound(balancer, data))
        hot, cot = mn.home_test(), mn.care_of_test()
        for _ in range(1000):
            clock.advance(0.01)
            inbound(balancer, mn.update(hot, cot, flags=""))
        cn = balancer.correspondent
        assert cn is not None
        self.assertEqual(balancer.counters.correspondent["bu-accepted"], 1000)
        self.assertLessEqual(len(cn._deadlines), 2 * len(cn) + 65)
        self.assertLessEqual(len(balancer.return_paths._deadlines), 2 * 1 + 65)
        # Expiry still ends both at the last refresh's lifetime.
        clock.advance(400 - 0.01)
        balancer.sweep()
        self.assertEqual(len(cn), 1)
        clock.advance(0.02)
        balancer.sweep()
        self.assertEqual((len(cn), len(balancer.return_paths)), (0, 0))


class ReplayAfterDeletionTests(SynchronousTestCase):
    """RFC 6275 §5.2.8: a correspondent keeps a deleted binding's sequence number as
    long as the nonces that authorised it are accepted; otherwise a recorded Binding
    Update replayed after a deregistration (or after its entry expired) is taken as
    new (no entry: any sequence number goes, §9.5.1) and binds the home address again."""

    def setUp(self) -> None:
        self.clock = Clock()
        self.clock.advance(1000)
        self.cn = correspondent(self.clock)
        self.mn = MobileNode(handler(self.cn))
        self.hot, self.cot = self.mn.home_test(), self.mn.care_of_test()

    def test_replay_after_deregistration(self) -> None:
        recorded = self.mn.update(self.hot, self.cot)  # seq 1
        self.assertEqual(outcome(self.cn, recorded).what, "bu-accepted")
        self.assertEqual(outcome(self.cn, self.mn.update(self.hot, self.cot, lifetime=0)).what,
                         "bu-deregistered")  # seq 2  # fmt: skip
        self.clock.advance(10)
        result = outcome(self.cn, recorded)
        self.assertEqual((result.what, self.cn.bindings), ("bu-sequence", {}))
        self.assertEqual((IPv6(result.reply)[MIP6MH_BA].status, IPv6(result.reply)[MIP6MH_BA].seq),
                         (135, 2))  # fmt: skip
        # The mobile node's own next update is newer: accepted.
        self.assertEqual(outcome(self.cn, self.mn.update(self.hot, self.cot)).what,
                         "bu-accepted")  # fmt: skip

    def test_replay_after_expiry(self) -> None:
        recorded = self.mn.update(self.hot, self.cot, lifetime=1)  # 4 s
        self.assertEqual(outcome(self.cn, recorded).what, "bu-accepted")
        self.clock.advance(5)
        self.assertEqual(self.cn.expire(), [packed(HOA)])
        self.assertEqual(outcome(self.cn, recorded).what, "bu-sequence")
        self.assertEqual(self.cn.bindings, {})

    def test_forgotten_once_its_nonces_are(self) -> None:
        """The sequence number is kept no longer than a nonce is accepted (interval +
        lifetime), and no more of them than the cache holds entries."""
        recorded = self.mn.update(self.hot, self.cot)
        outcome(self.cn, recorded)
        outcome(self.cn, self.mn.update(self.hot, self.cot, lifetime=0))
        self.clock.advance(30 + 240)
        self.cn.expire()
        self.assertEqual(len(self.cn._retired), 0)
        self.assertEqual(outcome(self.cn, recorded).what, "bu-stale-nonce")
        cn = correspondent(self.clock, max_entries=2)
        for i in range(5):
            cn.register(bytes(15) + bytes([i + 1]), packed(COA), 1, 60)
            cn.delete(bytes(15) + bytes([i + 1]))
        self.assertEqual(len(cn._retired), 2)


class BalancerGarbageTests(SynchronousTestCase):
    @given(nh=st.sampled_from([0, 43, 44, 51, 58, 60, 135, 17, 6, 59]),
           payload=st.binary(max_size=96), hao=st.booleans())
    @settings(max_examples=400, deadline=None)
    def test_inbound_never_raises_and_garbage_binds_nothing(self, nh: int, payload: bytes,
                                                             hao: bool) -> None:  # fmt: skip
        """Any payload after an IPv6 header to the virtual address (a Home Address Option
        before it or not), in strict mode after a registration: `Balancer.inbound`
        returns, and nothing but a Binding Update proven by return routability changes
        the binding cache or the return paths."""
        balancer, _ = balancer_with("strict")
        mn = MobileNode(lambda data: inbound(balancer, data))
        inbound(balancer, mn.update(mn.home_test(), mn.care_of_test()))
        cn = balancer.correspondent
        assert cn is not None
        before = (dict(cn.bindings), balancer.return_paths.care_of(packed(HOA)))
        body = (bytes([nh, 2, 1, 2, 0, 0, 0xC9, 16]) + packed(OTHER_HOA) if hao else b"") + payload
        header = struct.pack("!IHBB", 6 << 28, len(body), 60 if hao else nh, 64)
        balancer.inbound(bytearray(header + packed(COA2) + packed(VIP) + body))
        self.assertEqual((dict(cn.bindings), balancer.return_paths.care_of(packed(HOA))), before)
