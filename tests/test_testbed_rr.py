"""The terminal emulator's RFC mode: return routability and correspondent registration.

Pure tests (no root).  scapy is the independent oracle twice over: it dissects every
message the emulator builds (fields, alignment, checksums with the RFC 6275 §6.1.1
pseudo-header), and a small correspondent node written here on top of scapy -- keygen
tokens per RFC 6275 §5.2.5, the authenticator of §6.2.7 computed over scapy's own
serialisation -- answers the emulator and checks its Binding Updates.  The emulator
never imports scapy, nor the balancer's implementation of the correspondent side.
"""

from __future__ import annotations

import hashlib
import hmac
import random
from ipaddress import IPv6Address

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
    MIP6OptBindingAuthData,
    MIP6OptNonceIndices,
    in6_chksum,
)
from scapy.packet import Packet, Raw, bind_layers
from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase

from lbproxy.testbed import addresses, correspondents, packets, rrmessages
from lbproxy.testbed.correspondents import Registration
from lbproxy.testbed.terminal import MobileNodes

bind_layers(IPv6, IPv6, nh=41)
HA = addresses.HOME_AGENT.packed
VIP = addresses.VIP.packed
HOA1 = addresses.home_address(1).packed


def coa(index: int, link: int) -> bytes:
    return addresses.care_of_address(index, link).packed


def text(address: bytes) -> str:
    return str(IPv6Address(address))


def mh_checksum_ok(packet: Packet, layer: type[Packet]) -> bool:
    """scapy's verdict on a Mobility Header checksum with the RFC 6275 pseudo-header
    (scapy uses the HAO's address only when it is its header's sole option)."""
    packet = packet.copy()
    layer_found: Packet | None = packet
    while layer_found is not None and not isinstance(layer_found, Raw):
        if isinstance(layer_found, IPv6ExtHdrDestOpt):
            layer_found.options = [o for o in layer_found.options
                                   if isinstance(o, HAO)] or layer_found.options
        layer_found = layer_found.payload if layer_found.payload else None
    upper = packet[layer]
    return in6_chksum(135, upper, bytes(upper)) == 0


def independent_authenticator(kbm: bytes, care_of: bytes, correspondent: bytes,
                              mh: bytes) -> bytes:
    """RFC 6275 §6.2.7 from scapy's bytes: the Mobility Header with its checksum zeroed
    and the last 12 octets (the authenticator, the last option) cut off."""
    data = bytearray(mh[:-12])
    data[4:6] = b"\x00\x00"
    return hmac.new(kbm, care_of + correspondent + bytes(data), hashlib.sha1).digest()[:12]


class ScapyCorrespondent:
    """A correspondent node written on scapy (RFC 6275 §5.2, §9.4, §9.5), the oracle the
    emulator's mobile-node side is held to."""

    def __init__(self, address: bytes = VIP) -> None:
        self.address = address
        self.kcn = bytes(range(20))
        self.nonces = {7: b"\x11" * 8, 8: b"\x22" * 8}
        self.index = 8
        self.last_seq: dict[bytes, int] = {}
        self.bindings: dict[bytes, bytes] = {}
        self.refusals: list[str] = []

    def token(self, address: bytes, index: int, which: int) -> bytes:
        data = address + self.nonces[index] + bytes((which,))
        return hmac.new(self.kcn, data, hashlib.sha1).digest()[:8]

    def answer(self, packet: bytes) -> bytes | None:
        """The answer to a HoTI, CoTI or BU (the bare packet, untunnelled)."""
        parsed = IPv6(packet)
        src, dst = text(self.address), parsed.src
        if MIP6MH_HoTI in parsed:
            assert mh_checksum_ok(parsed, MIP6MH_HoTI)
            hoti = parsed[MIP6MH_HoTI]
            hoa = IPv6Address(parsed.src).packed
            return bytes(IPv6(src=src, dst=dst) / MIP6MH_HoT(
                index=self.index, cookie=hoti.cookie, token=self.token(hoa, self.index, 0)))
        if MIP6MH_CoTI in parsed:
            assert mh_checksum_ok(parsed, MIP6MH_CoTI)
            coti = parsed[MIP6MH_CoTI]
            care_of = IPv6Address(parsed.src).packed
            return bytes(IPv6(src=src, dst=dst) / MIP6MH_CoT(
                index=self.index, cookie=coti.cookie, token=self.token(care_of, self.index, 1)))
        if MIP6MH_BU in parsed:
            return self._binding_update(parsed)
        return None

    def keys_for(self, hoa: bytes, care_of: bytes, hni: int, coni: int) -> bytes:
        return hashlib.sha1(self.token(hoa, hni, 0) + self.token(care_of, coni, 1)).digest()

    def _binding_update(self, parsed: Packet) -> bytes | None:
        assert mh_checksum_ok(parsed, MIP6MH_BU)
        bu = parsed[MIP6MH_BU]
        [hao] = [o for o in parsed[IPv6ExtHdrDestOpt].options if isinstance(o, HAO)]
        hoa, care_of = IPv6Address(hao.hoa).packed, IPv6Address(parsed.src).packed
        indices = [o for o in bu.options if isinstance(o, MIP6OptNonceIndices)]
        auth = [o for o in bu.options if isinstance(o, MIP6OptBindingAuthData)]
        if len(indices) != 1 or len(auth) != 1 or not isinstance(bu.options[-1],
                                                                 MIP6OptBindingAuthData):
            self.refusals.append("options")
            return None
        hni, coni = indices[0].hni, indices[0].coni
        if hni not in self.nonces or coni not in self.nonces:
            return self.ack(hoa, care_of, 138, bu.seq, None)
        kbm = self.keys_for(hoa, care_of, hni, coni)
        mh = bytes(bu)
        expected = independent_authenticator(kbm, care_of, self.address, mh)
        if auth[0].authenticator.to_bytes(12, "big") != expected:
            self.refusals.append("authenticator")
            return None  # §9.5.1: silently discarded
        last = self.last_seq.get(hoa)
        if last is not None and not packets.seq_newer(bu.seq, last):
            return self.ack(hoa, care_of, 135, last, kbm)
        self.last_seq[hoa] = bu.seq
        self.bindings[hoa] = care_of
        return self.ack(hoa, care_of, 0, bu.seq, kbm)

    def ack(self, hoa: bytes, care_of: bytes, status: int, seq: int, kbm: bytes | None,
            lifetime: int = 100) -> bytes:
        """A BA to ``care_of`` with an RH2 to ``hoa``, authenticated with ``kbm``."""
        def build(authenticator: int) -> Packet:
            options = [] if kbm is None else [
                MIP6OptBindingAuthData(olen=12, authenticator=authenticator)]
            return (IPv6(src=text(self.address), dst=text(care_of))
                    / IPv6ExtHdrRouting(type=2, segleft=1, addresses=[text(hoa)])
                    / MIP6MH_BA(status=status, flags=0, seq=seq, mhtime=lifetime,
                                options=options))
        if kbm is None:
            return bytes(build(0))
        mh = bytes(IPv6(bytes(build(0)))[MIP6MH_BA])
        value = independent_authenticator(kbm, care_of, self.address, mh)
        return bytes(build(int.from_bytes(value, "big")))


class MessageTests(SynchronousTestCase):
    """Each builder against scapy's dissection; each parser on scapy's packets."""

    def test_home_test_init(self) -> None:
        raw = rrmessages.home_test_init(HOA1, VIP, b"cookie-1")
        parsed = IPv6(raw)
        self.assertEqual((parsed.src, parsed.dst, parsed.nh), (text(HOA1), text(VIP), 135))
        hoti = parsed[MIP6MH_HoTI]
        self.assertEqual((hoti.mhtype, hoti.len, hoti.nh, hoti.cookie), (1, 1, 59, b"cookie-1"))
        self.assertTrue(mh_checksum_ok(parsed, MIP6MH_HoTI))

    def test_care_of_test_init(self) -> None:
        raw = rrmessages.care_of_test_init(coa(1, 2), VIP, b"cookie-2")
        parsed = IPv6(raw)
        coti = parsed[MIP6MH_CoTI]
        self.assertEqual((parsed.src, coti.mhtype, coti.cookie), (text(coa(1, 2)), 2,
                                                                   b"cookie-2"))
        self.assertTrue(mh_checksum_ok(parsed, MIP6MH_CoTI))

    def test_cookie_must_be_64_bits(self) -> None:
        self.assertRaises(ValueError, rrmessages.home_test_init, HOA1, VIP, b"short")

    def test_binding_update_to_correspondent(self) -> None:
        """§6.1.7: HAO, A bit only, Nonce Indices (type 4, 2n) and Binding Authorization
        Data (type 5, 8n+2, last) whose authenticator scapy's bytes confirm."""
        kbm = bytes(range(20))
        raw = rrmessages.correspondent_binding_update(coa(1, 2), VIP, HOA1, 0x1234, 105,
                                                      7, 9, kbm)
        parsed = IPv6(raw)
        [hao] = [o for o in parsed[IPv6ExtHdrDestOpt].options if isinstance(o, HAO)]
        self.assertEqual((parsed.src, hao.hoa), (text(coa(1, 2)), text(HOA1)))
        bu = parsed[MIP6MH_BU]
        self.assertEqual((bu.seq, bu.mhtime, bu.len), (0x1234, 105, 3))
        self.assertEqual(str(bu.flags), "A")
        [indices, auth] = bu.options
        self.assertIsInstance(indices, MIP6OptNonceIndices)
        self.assertEqual((indices.otype, indices.olen, indices.hni, indices.coni),
                         (4, 4, 7, 9))
        self.assertIsInstance(auth, MIP6OptBindingAuthData)
        self.assertEqual((auth.otype, auth.olen), (5, 12))
        mh = bytes(bu)
        self.assertEqual(len(mh), 32)
        self.assertEqual((mh.index(bytes((4, 4))) % 2, mh.index(bytes((5, 12))) % 8), (0, 2))
        self.assertEqual(auth.authenticator.to_bytes(12, "big"),
                         independent_authenticator(kbm, coa(1, 2), VIP, mh))
        self.assertTrue(mh_checksum_ok(parsed, MIP6MH_BU))
        # another key, another authenticator
        other = IPv6(rrmessages.correspondent_binding_update(coa(1, 2), VIP, HOA1, 0x1234, 105,
                                                             7, 9, bytes(20)))
        self.assertNotEqual(other[MIP6OptBindingAuthData].authenticator, auth.authenticator)

    def test_binding_key(self) -> None:
        """Kbm = SHA1(home token | care-of token); the home token alone to deregister."""
        self.assertEqual(rrmessages.binding_key(b"h" * 8, b"c" * 8),
                         hashlib.sha1(b"h" * 8 + b"c" * 8).digest())
        self.assertEqual(rrmessages.binding_key(b"h" * 8, None), hashlib.sha1(b"h" * 8).digest())

    def test_parse_scapy_tests(self) -> None:
        """HoT and CoT built by scapy: cookie, index, token; checksums; corruption seen."""
        hot = bytes(IPv6(src=text(VIP), dst=text(HOA1))
                    / MIP6MH_HoT(index=513, cookie=b"abcdefgh", token=b"TOKEN-01"))
        message = rrmessages.parse(hot)
        assert message is not None
        self.assertEqual((message.mh_type, message.index, message.cookie, message.token,
                          message.checksum_ok), (3, 513, b"abcdefgh", b"TOKEN-01", True))
        cot = bytes(IPv6(src=text(VIP), dst=text(coa(1, 1)))
                    / MIP6MH_CoT(index=2, cookie=b"12345678", token=b"tokentok"))
        message = rrmessages.parse(cot)
        assert message is not None
        self.assertEqual((message.mh_type, message.index, message.token), (4, 2, b"tokentok"))
        broken = bytearray(cot)
        broken[-1] ^= 1
        self.assertFalse(rrmessages.parse(bytes(broken)).checksum_ok)  # type: ignore[union-attr]

    def test_parse_scapy_ack_and_authenticator(self) -> None:
        """A BA from the scapy correspondent: RH2 home address, status, sequence number,
        lifetime, and an authenticator that verifies with Kbm only."""
        cn = ScapyCorrespondent()
        kbm = cn.keys_for(HOA1, coa(1, 2), 8, 8)
        raw = cn.ack(HOA1, coa(1, 2), 0, 77, kbm, lifetime=50)
        message = rrmessages.parse(raw)
        assert message is not None
        self.assertEqual((message.mh_type, message.home, message.status, message.seq,
                          message.lifetime, message.checksum_ok),
                         (6, HOA1, 0, 77, 50, True))
        self.assertTrue(message.authenticated(kbm, coa(1, 2), VIP))
        self.assertFalse(message.authenticated(bytes(20), coa(1, 2), VIP))
        self.assertFalse(message.authenticated(kbm, coa(1, 3), VIP))
        # the same BA without the option, or with the status changed: refused
        bare = rrmessages.parse(cn.ack(HOA1, coa(1, 2), 0, 77, None))
        self.assertFalse(bare.authenticated(kbm, coa(1, 2), VIP))  # type: ignore[union-attr]
        tampered = IPv6(raw)
        tampered[MIP6MH_BA].status = 1
        tampered[MIP6MH_BA].cksum = None
        again = rrmessages.parse(bytes(tampered))
        assert again is not None
        self.assertTrue(again.checksum_ok)
        self.assertFalse(again.authenticated(kbm, coa(1, 2), VIP))

    def test_parse_scapy_binding_error(self) -> None:
        raw = bytes(IPv6(src=text(VIP), dst=text(coa(1, 1)))
                    / MIP6MH_BE(status=1, ha=text(HOA1)))
        message = rrmessages.parse(raw)
        assert message is not None
        self.assertEqual((message.mh_type, message.status, message.error_home,
                          message.checksum_ok), (7, 1, HOA1, True))

    def test_not_mobility(self) -> None:
        self.assertIsNone(rrmessages.parse(bytes(IPv6(src=text(VIP), dst=text(HOA1))
                                                 / UDP(dport=9) / b"x")))

    def test_garbage_is_refused_cleanly(self) -> None:
        """Truncations and random bytes: a PacketError or None, never anything else."""
        rng = random.Random(15)
        good = ScapyCorrespondent().ack(HOA1, coa(1, 2), 0, 1, bytes(20))
        samples = [good[:n] for n in range(len(good))]
        for _ in range(500):
            mutated = bytearray(good)
            for _ in range(rng.randint(1, 6)):
                mutated[rng.randrange(40, len(mutated))] = rng.randrange(256)
            samples.append(bytes(mutated))
        refused = 0
        for sample in samples:
            try:
                rrmessages.parse(sample)
            except packets.PacketError:
                refused += 1
        self.assertGreater(refused, len(good) // 2)


class RfcModeTests(SynchronousTestCase):
    """MobileNodes in the RFC mode, against the scapy correspondent, on a fake clock."""

    def setUp(self) -> None:
        self.clock = Clock()
        self.nodes = MobileNodes(3, HA, 1, [addresses.VIP_PREFIX], clock=self.clock.seconds)
        self.nodes.set_ro_mode("rfc")
        for terminal in self.nodes.terminals.values():
            terminal.registered = True  # the home agent has acknowledged
        self.cn = ScapyCorrespondent()
        assert self.nodes.correspondents is not None
        self.rfc: correspondents.Registrations = self.nodes.correspondents

    def udp(self, index: int = 1) -> bytes:
        return bytes(IPv6(src=str(addresses.home_address(index)), dst=text(VIP))
                     / UDP(sport=4000, dport=5353) / b"data")

    def registration(self, index: int = 1) -> Registration:
        return self.rfc.by_key[(index, VIP)]

    def sent(self) -> list[tuple[int, bytes]]:
        out, self.rfc.to_send = self.rfc.to_send, []
        return out

    def exchange(self, index: int = 1) -> list[str]:
        """Let the correspondent answer whatever the terminal sent, as the network would
        carry it (HoTI through the home agent, HoT tunnelled back); what it saw."""
        seen = []
        for _ in range(10):
            pending = self.sent()
            if not pending:
                break
            for link, packet in pending:
                inner = packets.decapsulate(packet)
                via_ha = inner is not None
                if via_ha:
                    self.assertEqual((packet[8:24], packet[24:40]), (coa(index, link), HA))
                bare = inner if inner is not None else packet
                answer = self.cn.answer(bare)
                seen.append(_mh_name(bare))
                if answer is None:
                    continue
                if via_ha:  # the HA tunnels the HoT to the care-of address
                    answer = packets.encapsulate(answer, HA, coa(index, link))
                self.assertIsNone(self.nodes.inbound(link, answer))
        return seen

    def route_optimise(self, index: int = 1) -> list[str]:
        self.nodes.outbound(self.udp(index))
        for key in sorted(self.rfc.wanted):
            self.rfc.begin(key, self.clock.seconds())
        return self.exchange(index)

    def test_tunnelled_until_acknowledged(self) -> None:
        """Before a binding: reverse-tunnelled with the HoA as inner source, no HAO;
        after the BA: HAO and the care-of address."""
        _, out = self.nodes.outbound(self.udp())  # type: ignore[misc]
        inner = packets.decapsulate(out)
        assert inner is not None
        self.assertEqual((out[8:24], out[24:40], inner[8:24]), (coa(1, 1), HA, HOA1))
        self.assertIsNone(packets.find_hao(out))
        self.assertEqual(self.rfc.wanted, {(1, VIP)})
        self.rfc.begin((1, VIP), 0.0)
        self.assertEqual(self.exchange(), ["HoTI", "CoTI", "BU"])
        self.assertEqual(self.cn.bindings, {HOA1: coa(1, 1)})
        registration = self.registration()
        self.assertEqual(registration.state, correspondents.BOUND)
        _, out = self.nodes.outbound(self.udp())  # type: ignore[misc]
        self.assertEqual((out[8:24], packets.find_hao(out)), (coa(1, 1), HOA1))
        self.assertEqual(self.nodes.counters["out-rr-tunnel"], 1)
        self.assertEqual(self.nodes.counters["out-hao"], 1)

    def test_moves_redo_the_care_of_test(self) -> None:
        """After a move: tunnelled again, only a CoTI (the home token is reused), a BU
        with a higher sequence number, and route optimisation at the new address."""
        self.route_optimise()
        first_seq = self.registration().seq
        self.clock.advance(5)
        self.nodes.binding_update(1, 2)
        _, out = self.nodes.outbound(self.udp())  # type: ignore[misc]
        self.assertEqual((out[8:24], out[24:40]), (coa(1, 2), HA))
        self.assertEqual(self.rfc.wanted, set())  # the home agent has not answered yet
        self.nodes.terminals[1].registered = True
        self.rfc.home_registered(self.nodes.terminals[1])
        self.assertEqual(self.rfc.wanted, {(1, VIP)})
        self.rfc.begin((1, VIP), self.clock.seconds())
        self.assertEqual(self.exchange(), ["CoTI", "BU"])
        self.assertEqual(self.cn.bindings[HOA1], coa(1, 2))
        self.assertTrue(packets.seq_newer(self.registration().seq, first_seq))
        _, out = self.nodes.outbound(self.udp())  # type: ignore[misc]
        self.assertEqual((out[8:24], packets.find_hao(out)), (coa(1, 2), HOA1))
        epochs = self.registration().describe(self.clock.seconds())["epochs"]
        self.assertEqual([e["coa"] for e in epochs], [text(coa(1, 1)), text(coa(1, 2))])
        self.assertTrue(all(e["ba_at"] is not None for e in epochs))

    def test_old_home_token_is_not_reused(self) -> None:
        self.route_optimise()
        self.clock.advance(correspondents.HOME_TOKEN_REUSE + 1)
        self.nodes.binding_update(1, 2)
        self.nodes.terminals[1].registered = True
        self.rfc.home_registered(self.nodes.terminals[1])
        self.rfc.begin((1, VIP), self.clock.seconds())
        self.assertEqual(self.exchange(), ["HoTI", "CoTI", "BU"])

    def test_replies_counted_by_path_and_ba(self) -> None:
        """Tunnelled and RH2 replies, before and after the BA, per care-of address."""
        self.nodes.outbound(self.udp())
        reply = bytes(IPv6(src=text(VIP), dst=text(HOA1)) / UDP(sport=5353, dport=4000) / b"r")
        tunnelled = packets.encapsulate(reply, HA, coa(1, 1))
        self.assertEqual(self.nodes.inbound(1, tunnelled), reply)
        rh2 = bytes(IPv6(src=text(VIP), dst=text(coa(1, 1)))
                    / IPv6ExtHdrRouting(type=2, segleft=1, addresses=[text(HOA1)])
                    / UDP(sport=5353, dport=4000) / b"r")
        self.assertIsNotNone(self.nodes.inbound(1, rh2))  # early: counted as before the BA
        self.rfc.begin((1, VIP), 0.0)
        self.exchange()
        self.clock.advance(0.25)
        self.nodes.inbound(1, rh2)
        self.nodes.inbound(1, tunnelled)
        [epoch] = self.nodes.describe(self.nodes.terminals[1])["correspondents"][0]["epochs"]
        self.assertEqual((epoch["tunnelled_before_ba"], epoch["rh2_before_ba"],
                          epoch["rh2_after_ba"], epoch["tunnelled_after_ba"]), (1, 1, 1, 1))
        self.assertEqual(epoch["first_rh2_rel_ba"], 0.25)

    def test_bu_retransmitted_with_new_numbers_then_given_up(self) -> None:
        self.nodes.outbound(self.udp())
        self.rfc.begin((1, VIP), 0.0)
        registration = self.registration()
        for link, packet in self.sent():  # answer the tests, drop the BU
            bare = packets.decapsulate(packet) or packet
            answer = self.cn.answer(bare)
            assert answer is not None
            if packets.decapsulate(packet) is not None:
                answer = packets.encapsulate(answer, HA, coa(1, link))
            self.nodes.inbound(link, answer)
        [(_, bu)] = self.sent()
        seqs = [rrmessages.parse(bu).seq]  # type: ignore[union-attr]
        timeouts = []
        while registration.deadline is not None:
            timeouts.append(registration.deadline - self.clock.seconds())
            self.clock.advance(registration.deadline - self.clock.seconds())
            self.rfc.timeout((1, VIP), self.clock.seconds())
            seqs += [rrmessages.parse(p).seq for _, p in self.sent()]  # type: ignore[union-attr]
        self.assertEqual(timeouts, list(correspondents.RETRANSMIT))
        self.assertEqual(seqs, [(seqs[0] + i) & 0xFFFF for i in range(len(seqs))])
        self.assertEqual(len(seqs), len(correspondents.RETRANSMIT))
        self.assertEqual(registration.state, correspondents.FAILED)
        self.assertFalse(registration.optimised(coa(1, 1), self.clock.seconds()))

    def _updating(self) -> tuple[Registration, bytes]:
        """Terminal 1 with its BU sent (and not answered); the BU."""
        self.nodes.outbound(self.udp())
        self.rfc.begin((1, VIP), 0.0)
        for link, packet in self.sent():
            bare = packets.decapsulate(packet) or packet
            answer = self.cn.answer(bare)
            assert answer is not None
            if packets.decapsulate(packet) is not None:
                answer = packets.encapsulate(answer, HA, coa(1, link))
            self.nodes.inbound(link, answer)
        [(_, bu)] = self.sent()
        return self.registration(), bu

    def test_forged_acknowledgements_refused(self) -> None:
        """A BA with another key, another sequence number, for another care-of address or
        home address binds nothing."""
        registration, bu = self._updating()
        seq = rrmessages.parse(bu).seq  # type: ignore[union-attr]
        kbm = self.cn.keys_for(HOA1, coa(1, 1), 8, 8)
        for forged in (self.cn.ack(HOA1, coa(1, 1), 0, seq, bytes(20)),
                       self.cn.ack(HOA1, coa(1, 1), 0, seq, None),
                       self.cn.ack(HOA1, coa(1, 1), 0, seq - 1, kbm),
                       self.cn.ack(addresses.home_address(2).packed, coa(1, 1), 0, seq, kbm)):
            self.assertIsNone(self.nodes.inbound(1, forged))
        self.assertEqual(registration.state, correspondents.UPDATING)
        self.assertEqual(registration.counters["ba-bad-authenticator"], 2)
        self.assertEqual(registration.counters["ba-unexpected"], 2)
        self.nodes.inbound(1, self.cn.ack(HOA1, coa(1, 1), 0, seq, kbm))
        self.assertEqual(registration.state, correspondents.BOUND)

    def test_forged_tests_refused(self) -> None:
        """A HoT or CoT whose cookie does not match, or a CoT to another address, or a HoT
        sent directly instead of through the home agent: ignored."""
        self.nodes.outbound(self.udp())
        self.rfc.begin((1, VIP), 0.0)
        registration = self.registration()
        wrong_cookie = bytes(IPv6(src=text(VIP), dst=text(coa(1, 1)))
                             / MIP6MH_CoT(index=8, cookie=b"guessed!", token=b"t" * 8))
        self.assertIsNone(self.nodes.inbound(1, wrong_cookie))
        hot = bytes(IPv6(src=text(VIP), dst=text(HOA1))
                    / MIP6MH_HoT(index=8, cookie=b"guessed!", token=b"t" * 8))
        self.assertIsNone(self.nodes.inbound(1, packets.encapsulate(hot, HA, coa(1, 1))))
        from_elsewhere = bytes(IPv6(src="2001:db8:5::99", dst=text(coa(1, 1)))
                               / MIP6MH_CoT(index=8, cookie=registration.care_of_cookie,
                                            token=b"t" * 8))
        self.nodes.inbound(1, from_elsewhere)
        self.assertEqual((registration.home_token, registration.care_of_token), (None, None))
        self.assertEqual(registration.counters["cot-unexpected"], 1)
        self.assertEqual(registration.counters["hot-unexpected"], 1)
        self.assertEqual(self.nodes.counters["in-mh4-no-registration"], 1)

    def test_sequence_out_of_window(self) -> None:
        """BA 135 (authenticated): the next BU goes on above the correspondent's number."""
        registration, _ = self._updating()
        kbm = self.cn.keys_for(HOA1, coa(1, 1), 8, 8)
        self.nodes.inbound(1, self.cn.ack(HOA1, coa(1, 1), 135, 40000, kbm))
        [(_, again)] = self.sent()
        self.assertEqual(rrmessages.parse(again).seq, 40001)  # type: ignore[union-attr]
        self.assertEqual(registration.state, correspondents.UPDATING)

    def test_expired_nonces_restart_the_tests(self) -> None:
        registration, bu = self._updating()
        seq = rrmessages.parse(bu).seq  # type: ignore[union-attr]
        self.nodes.inbound(1, self.cn.ack(HOA1, coa(1, 1), 138, seq, None))
        self.assertEqual(sorted(_mh_name(packets.decapsulate(p) or p) for _, p in self.sent()),
                         ["CoTI", "HoTI"])
        self.assertEqual(registration.state, correspondents.TESTING)

    def test_binding_error(self) -> None:
        """BE status 1 while bound: back to tunnelling and ready to register again;
        status 2: the correspondent has no MIPv6, tunnel for good; both counted."""
        self.route_optimise()
        be = bytes(IPv6(src=text(VIP), dst=text(coa(1, 1))) / MIP6MH_BE(status=1,
                                                                        ha=text(HOA1)))
        self.assertIsNone(self.nodes.inbound(1, be))
        registration = self.registration()
        self.assertFalse(registration.optimised(coa(1, 1), self.clock.seconds()))
        self.assertEqual(self.rfc.wanted, {(1, VIP)})
        unsupported = bytes(IPv6(src=text(VIP), dst=text(coa(1, 1)))
                            / MIP6MH_BE(status=2, ha=text(HOA1)))
        self.nodes.inbound(1, unsupported)
        self.assertEqual(registration.state, correspondents.UNSUPPORTED)
        self.assertEqual(registration.begin(self.clock.seconds()), [])
        self.assertEqual(self.nodes.describe(self.nodes.terminals[1])["binding_errors"], 2)

    def test_binding_error_without_registration_counted(self) -> None:
        be = bytes(IPv6(src=text(VIP), dst=text(coa(2, 1)))
                   / MIP6MH_BE(status=1, ha=str(addresses.home_address(2))))
        self.assertIsNone(self.nodes.inbound(1, be))
        self.assertEqual(self.nodes.describe(self.nodes.terminals[2])["binding_errors"], 1)

    def test_refresh_before_expiry(self) -> None:
        self.route_optimise()
        registration = self.registration()
        assert registration.deadline is not None
        self.assertLess(registration.deadline, registration.bound_until)
        self.clock.advance(registration.deadline)
        self.rfc.timeout((1, VIP), self.clock.seconds())
        self.assertTrue(registration.optimised(coa(1, 1), self.clock.seconds()))
        # 320 s on: the home token is too old to reuse as well
        self.assertEqual(self.exchange(), ["HoTI", "CoTI", "BU"])
        self.assertEqual(registration.state, correspondents.BOUND)

    def test_default_mode_unchanged(self) -> None:
        nodes = MobileNodes(1, HA, 1, [addresses.VIP_PREFIX])
        _, out = nodes.outbound(self.udp())  # type: ignore[misc]
        self.assertEqual(packets.find_hao(out), HOA1)
        self.assertNotIn("correspondents", nodes.describe(nodes.terminals[1]))
        self.assertRaises(ValueError, nodes.set_ro_mode, "sometimes")


def _mh_name(packet: bytes | None) -> str:
    assert packet is not None
    message = rrmessages.parse(packet)
    assert message is not None
    return {1: "HoTI", 2: "CoTI", 3: "HoT", 4: "CoT", 5: "BU", 6: "BA", 7: "BE"}[
        message.mh_type]


class FakeLink:
    """An access link's socket: what the emulator sends, with the time it sent it."""

    def __init__(self, clock: Clock) -> None:
        self.clock = clock
        self.sent: list[tuple[float, bytes]] = []

    def sendto(self, packet: bytes, address: object) -> None:
        self.sent.append((self.clock.seconds(), packet))


class EmulatorTimerTests(SynchronousTestCase):
    """The program around MobileNodes: when return routability starts, retransmissions,
    a move cancelling what was under way (fake clock, fake link sockets)."""

    def setUp(self) -> None:
        from lbproxy.testbed.terminal import Emulator

        self.clock = Clock()
        self.nodes = MobileNodes(1, HA, 1, [addresses.VIP_PREFIX], clock=self.clock.seconds)
        self.nodes.set_ro_mode("rfc", delay=0.5)
        self.nodes.terminals[1].registered = True
        self.links = {k: FakeLink(self.clock) for k in (1, 2)}
        self.emulator = Emulator(self.clock, self.nodes, -1,
                                 {k: (link, f"acc{k}", b"\x02" * 6)  # type: ignore[misc]
                                  for k, link in self.links.items()})
        self.cn = ScapyCorrespondent()

    def names(self, link: int) -> list[tuple[float, str]]:
        found = []
        for at, packet in self.links[link].sent:
            bare = packets.decapsulate(packet) or packet
            found.append((at, _mh_name(bare) if rrmessages.parse(bare) is not None
                          else "data"))
        return found

    def test_start_after_delay_and_retransmit(self) -> None:
        self.emulator.from_tun(bytes(IPv6(src=text(HOA1), dst=text(VIP)) / UDP() / b"x"))
        self.assertEqual(self.names(1), [(0.0, "data")])
        self.clock.advance(0.5)
        self.assertEqual(self.names(1)[1:], [(0.5, "HoTI"), (0.5, "CoTI")])
        self.clock.pump([1.0, 2.0])
        self.assertEqual(self.names(1)[3:],
                         [(1.5, "HoTI"), (1.5, "CoTI"), (3.5, "HoTI"), (3.5, "CoTI")])

    def test_answers_lead_to_route_optimisation_and_a_move_cancels(self) -> None:
        self.emulator.from_tun(bytes(IPv6(src=text(HOA1), dst=text(VIP)) / UDP() / b"x"))
        self.clock.advance(0.5)
        deliver = self.emulator._from_link(1)
        for _, packet in list(self.links[1].sent[1:]):
            inner = packets.decapsulate(packet)
            answer = self.cn.answer(inner if inner is not None else packet)
            assert answer is not None
            deliver(packets.encapsulate(answer, HA, coa(1, 1)) if inner is not None
                    else answer)
        self.assertEqual(self.names(1)[-1], (0.5, "BU"))
        _, bu = self.links[1].sent[-1]
        ack = self.cn.answer(bu)
        assert ack is not None
        deliver(ack)
        registration = self.nodes.correspondents.by_key[(1, VIP)]  # type: ignore[union-attr]
        self.assertEqual(registration.state, correspondents.BOUND)
        self.emulator.from_tun(bytes(IPv6(src=text(HOA1), dst=text(VIP)) / UDP() / b"y"))
        self.assertEqual(packets.find_hao(self.links[1].sent[-1][1]), HOA1)
        # a move: the refresh timer goes, nothing more on link 1; tunnelled on link 2
        sent_on_1 = len(self.links[1].sent)
        self.assertEqual(list(self.emulator._rr_timers), [(1, VIP)])  # the refresh
        self.emulator.register(1, 2)
        self.assertEqual(self.emulator._rr_timers, {})
        self.clock.advance(5)
        self.assertEqual(len(self.links[1].sent), sent_on_1)
        self.emulator.from_tun(bytes(IPv6(src=text(HOA1), dst=text(VIP)) / UDP() / b"z"))
        tunnelled = [p for _, p in self.links[2].sent if p[24:40] == HA and p[6] == 41]
        self.assertTrue(tunnelled)
        self.assertIsNone(packets.find_hao(tunnelled[-1]))
        # no care-of test before the home agent has the new address; then at once, alone
        self.assertNotIn("CoTI", [name for _, name in self.names(2)])
        os_write = self.patch_tun()
        self.emulator._from_link(2)(packets.binding_ack(
            HA, coa(1, 2), HOA1, 0, self.nodes.terminals[1].seq, 900))
        self.clock.advance(0)
        now = [name for at, name in self.names(2) if at == self.clock.seconds()]
        self.assertIn("CoTI", now)
        self.assertNotIn("HoTI", now)  # the home token is 5 s old
        self.assertEqual(os_write, [])

    def patch_tun(self) -> list[bytes]:
        """Packets the emulator writes into its TUN device (collected, not written)."""
        written: list[bytes] = []
        from lbproxy.testbed import terminal

        self.patch(terminal.os, "write", lambda fd, data: written.append(data))
        return written
