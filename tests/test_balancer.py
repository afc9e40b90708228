"""Tests for lbproxy.core.balancer: one packet's journey through the pure core.

Packets are built with scapy and the results are re-dissected by scapy, so the core is
checked against an independent implementation, not against itself.
"""

from __future__ import annotations

import ipaddress

from hypothesis import given, settings
from hypothesis import strategies as st
from scapy.layers.inet import TCP, UDP
from scapy.layers.inet6 import (
    HAO,
    ICMPv6DestUnreach,
    ICMPv6PacketTooBig,
    IPv6,
    IPv6ExtHdrDestOpt,
    IPv6ExtHdrFragment,
    IPv6ExtHdrRouting,
)
from scapy.layers.ipsec import ESP
from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase

from lbproxy.config import DEFAULT_KEY_CHAIN
from lbproxy.core import actions
from lbproxy.core.balancer import Balancer
from lbproxy.core.keys import Key, KeyChain
from lbproxy.core.selection import Backend, scheduler_from_name
from lbproxy.core.table import StickyTable

VIP = "2001:db8:5::80"
HOA = "2001:db8:100::1001"
COA1 = "2001:db8:a1::1001"
COA2 = "2001:db8:a2::1001"
BACKENDS = [
    Backend(name=f"srv{i}", address=ipaddress.IPv6Address(f"2001:db8:b0::1{i}"))
    for i in (1, 2, 3)
]


def mobile(coa: str, hoa: str = HOA, sport: int = 40000, payload: bytes = b"hello") -> bytearray:
    """A UDP packet from a moving terminal: source = CoA, HAO = home address."""
    pkt = IPv6(src=coa, dst=VIP) / IPv6ExtHdrDestOpt(options=[HAO(hoa=hoa)]) / UDP(
        sport=sport, dport=80
    ) / payload
    return bytearray(bytes(pkt))


def checksum_ok(data: bytes) -> bool:
    """scapy's own verdict: rebuild the L4 checksum and compare."""
    pkt = IPv6(data)
    for layer in (TCP, UDP):
        if layer in pkt:
            l4 = pkt[layer]
            got = l4.chksum
            del l4.chksum
            return bool(IPv6(bytes(pkt))[layer].chksum == got)
    raise AssertionError("no L4")


def make(mode: str = "translate", scheduler: str = "maglev", max_entries: int = 1000,
         chain: tuple[str, ...] = DEFAULT_KEY_CHAIN) -> tuple[Balancer, Clock]:
    clock = Clock()
    balancer = Balancer(
        chain=KeyChain.from_names(chain),
        table=StickyTable(clock, 300.0, max_entries),
        scheduler=scheduler_from_name(scheduler),
        backends=BACKENDS,
        virtual_addresses=[ipaddress.IPv6Address(VIP)],
        clock=clock,
        mode=mode,
    )
    return balancer, clock


class InboundTests(SynchronousTestCase):
    def test_translate_moves_keep_backend(self) -> None:
        """A terminal moving between care-of addresses stays on one backend (claims 1, 2)."""
        balancer, clock = make()
        seen = set()
        for coa in (COA1, COA2, COA1):
            out = balancer.inbound(mobile(coa))
            assert out is not None
            pkt = IPv6(bytes(out))
            self.assertEqual(pkt.src, HOA)
            self.assertNotIn(IPv6ExtHdrDestOpt, pkt)
            self.assertTrue(checksum_ok(bytes(out)))
            self.assertEqual(bytes(pkt[UDP].payload), b"hello")
            seen.add(pkt.dst)
            clock.advance(1)
        self.assertEqual(len(seen), 1)
        self.assertIn(seen.pop(), {str(b.address) for b in BACKENDS})
        self.assertEqual(balancer.counters.misses["hoa"], 1)
        self.assertEqual(balancer.counters.hits["hoa"], 2)
        binding = balancer.table.get(Key("hoa", ipaddress.IPv6Address(HOA).packed))
        assert binding is not None
        self.assertEqual(binding.care_of, ipaddress.IPv6Address(COA1).packed)

    def test_transparent_keeps_hao(self) -> None:
        """Transparent mode rewrites only the destination; the HAO reaches the backend."""
        balancer, _ = make(mode="transparent")
        out = balancer.inbound(mobile(COA1))
        assert out is not None
        pkt = IPv6(bytes(out))
        self.assertEqual(pkt.src, COA1)
        self.assertEqual(pkt[HAO].hoa, HOA)
        self.assertIn(pkt.dst, {str(b.address) for b in BACKENDS})

    def test_not_virtual(self) -> None:
        """Packets to other destinations are counted and dropped."""
        balancer, _ = make()
        pkt = bytearray(bytes(IPv6(src=COA1, dst="2001:db8:5::81") / UDP()))
        self.assertIsNone(balancer.inbound(pkt))
        self.assertEqual(balancer.counters.dropped["not-virtual"], 1)

    def test_malformed_counted_others_unaffected(self) -> None:
        """Malformed packets are dropped by reason; a good flow around them is untouched."""
        balancer, _ = make()
        first = balancer.inbound(mobile(COA1))
        assert first is not None
        backend = IPv6(bytes(first)).dst
        two_haos = IPv6(src=COA1, dst=VIP) / IPv6ExtHdrDestOpt(
            options=[HAO(hoa=HOA), HAO(hoa="2001:db8:100::9")]
        ) / UDP()
        for bad in (b"\x60" + b"\x00" * 10, bytes(two_haos), bytes(mobile(COA1))[:50], b"junk"):
            self.assertIsNone(balancer.inbound(bytearray(bad)))
        self.assertEqual(sum(balancer.counters.dropped.values()), 4)
        self.assertGreaterEqual(balancer.counters.dropped["duplicate-hao"], 1)
        again = balancer.inbound(mobile(COA2))
        assert again is not None
        self.assertEqual(IPv6(bytes(again)).dst, backend)

    def test_fragments_follow_first(self) -> None:
        """A non-first fragment goes where its first fragment went."""
        balancer, _ = make(scheduler="round_robin", chain=("src",))
        src = "2001:db8:a1::77"
        head = IPv6(src=src, dst=VIP) / IPv6ExtHdrFragment(id=7, m=1, offset=0) / UDP(
            sport=1, dport=80) / (b"x" * 16)
        tail = IPv6(src=src, dst=VIP) / IPv6ExtHdrFragment(id=7, m=0, offset=3, nh=17) / (
            b"y" * 8)
        out1 = balancer.inbound(bytearray(bytes(head)))
        # another terminal in between moves the round robin on
        balancer.inbound(bytearray(bytes(IPv6(src="2001:db8:a1::78", dst=VIP) / UDP())))
        out2 = balancer.inbound(bytearray(bytes(tail)))
        assert out1 is not None and out2 is not None
        self.assertEqual(IPv6(bytes(out1)).dst, IPv6(bytes(out2)).dst)
        orphan = IPv6(src=src, dst=VIP) / IPv6ExtHdrFragment(id=8, m=0, offset=3, nh=17) / b"z"
        self.assertIsNone(balancer.inbound(bytearray(bytes(orphan))))
        self.assertEqual(balancer.counters.dropped["fragment-unknown"], 1)

    def test_esp_key(self) -> None:
        """An ESP packet is keyed by its SPI (claim 4) whatever its source."""
        balancer, _ = make(chain=("hoa", "spi", "src"))
        outs = set()
        for src in (COA1, COA2):
            pkt = IPv6(src=src, dst=VIP) / ESP(spi=0xDA, seq=1, data=b"\x00" * 16)
            out = balancer.inbound(bytearray(bytes(pkt)))
            assert out is not None
            outs.add(IPv6(bytes(out)).dst)
        self.assertEqual(len(outs), 1)
        self.assertEqual(balancer.counters.hits["spi"], 1)

    def test_terminal_seen_once(self) -> None:
        """The first packet of a terminal is reported (claim 5's trigger), later ones not."""
        balancer, _ = make()
        seen: list[tuple[bytes | None, bytes]] = []
        balancer.terminal_seen = lambda home, src: seen.append((home, src))
        balancer.inbound(mobile(COA1))
        balancer.inbound(mobile(COA2))
        self.assertEqual(seen, [(ipaddress.IPv6Address(HOA).packed,
                                 ipaddress.IPv6Address(COA1).packed)])


class OperatorTests(SynchronousTestCase):
    def test_drain_keeps_existing(self) -> None:
        """A drained backend keeps its bindings and gets no new ones."""
        balancer, _ = make(scheduler="round_robin")
        out = balancer.inbound(mobile(COA1))
        assert out is not None
        name = next(b.name for b in BACKENDS if str(b.address) == IPv6(bytes(out)).dst)
        actions.drain(balancer, name)
        again = balancer.inbound(mobile(COA2))
        assert again is not None
        self.assertEqual(IPv6(bytes(again)).dst, IPv6(bytes(out)).dst)
        for i in range(20):  # new terminals, each from its own care-of address
            o = balancer.inbound(mobile(f"2001:db8:a9::{i + 1:x}", hoa=f"2001:db8:100::{i + 1:x}"))
            assert o is not None
            self.assertNotEqual(IPv6(bytes(o)).dst, IPv6(bytes(out)).dst)

    def test_dead_backend_reassigned(self) -> None:
        """With the reassign policy a binding on a down backend moves on its next packet."""
        balancer, _ = make()
        out = balancer.inbound(mobile(COA1))
        assert out is not None
        name = next(b.name for b in BACKENDS if str(b.address) == IPv6(bytes(out)).dst)
        balancer.set_backend_up(name, False)
        again = balancer.inbound(mobile(COA1))
        assert again is not None
        self.assertNotEqual(IPv6(bytes(again)).dst, IPv6(bytes(out)).dst)
        self.assertEqual(balancer.counters.reassigned, 1)

    def test_trace_has_no_side_effects(self) -> None:
        """trace() says what would happen and changes nothing."""
        balancer, _ = make()
        result = balancer.trace(bytes(mobile(COA1)))
        self.assertEqual(result.strategy, "hoa")
        self.assertEqual(str(result.key), f"addr {HOA}")
        self.assertEqual([str(k) for k in result.aliases], [f"addr {COA1}"])
        self.assertFalse(result.hit)
        self.assertEqual(len(balancer.table), 0)
        out = balancer.inbound(mobile(COA1))
        assert out is not None and result.backend is not None
        self.assertEqual(IPv6(bytes(out)).dst, str(result.backend.address))
        self.assertTrue(balancer.trace(bytes(mobile(COA2))).hit)

    def test_move_and_forget(self) -> None:
        """move() rebinds a key to a named backend; forget() removes it."""
        balancer, _ = make()
        key = Key("hoa", ipaddress.IPv6Address(HOA).packed)
        actions.move(balancer, key, "srv3")
        out = balancer.inbound(mobile(COA1))
        assert out is not None
        self.assertEqual(IPv6(bytes(out)).dst, "2001:db8:b0::13")
        self.assertIsNotNone(actions.forget(balancer, key))
        self.assertNotIn(key, balancer.table)


class OutboundTests(SynchronousTestCase):
    def reply(self, backend: str = "2001:db8:b0::11") -> bytearray:
        pkt = IPv6(src=backend, dst=HOA) / TCP(sport=80, dport=40000, flags="A") / b"data"
        return bytearray(bytes(pkt))

    def test_unconfirmed_goes_home(self) -> None:
        """Without a confirmed binding the reply goes towards the home address."""
        balancer, _ = make()
        out = balancer.outbound(self.reply())
        assert out is not None
        pkt = IPv6(bytes(out))
        self.assertEqual((pkt.src, pkt.dst), (VIP, HOA))
        self.assertNotIn(IPv6ExtHdrRouting, pkt)
        self.assertTrue(checksum_ok(bytes(out)))

    def test_confirmed_goes_to_care_of(self) -> None:
        """A confirmed binding gets a Type 2 Routing Header to the care-of address."""
        balancer, _ = make()
        balancer.return_paths.confirm(
            ipaddress.IPv6Address(HOA).packed, ipaddress.IPv6Address(COA2).packed
        )
        out = balancer.outbound(self.reply())
        assert out is not None
        pkt = IPv6(bytes(out))
        self.assertEqual((pkt.src, pkt.dst), (VIP, COA2))
        self.assertEqual(pkt[IPv6ExtHdrRouting].type, 2)
        self.assertEqual(pkt[IPv6ExtHdrRouting].addresses, [HOA])
        self.assertEqual(bytes(pkt[TCP].payload), b"data")

    def test_confirmation_ends_with_its_lifetime(self) -> None:
        """A confirmation given with the binding's lifetime ends with it: replies go
        towards the home address again; a refresh before then keeps it."""
        balancer, clock = make()
        home, coa = ipaddress.IPv6Address(HOA).packed, ipaddress.IPv6Address(COA2).packed
        balancer.return_paths.confirm(home, coa, 40.0)
        clock.advance(30)
        balancer.return_paths.confirm(home, coa, 40.0)  # refreshed: now good until 70
        clock.advance(30)
        balancer.sweep()
        self.assertEqual(balancer.return_paths.care_of(home), coa)
        clock.advance(11)
        balancer.sweep()
        self.assertIsNone(balancer.return_paths.care_of(home))
        out = balancer.outbound(self.reply())
        assert out is not None
        self.assertEqual(IPv6(bytes(out)).dst, HOA)

    def test_not_from_backend(self) -> None:
        """Only backends' packets are rewritten."""
        balancer, _ = make()
        self.assertIsNone(balancer.outbound(self.reply(backend="2001:db8:b0::99")))
        self.assertEqual(balancer.counters.dropped["not-from-backend"], 1)


class IcmpErrorTests(SynchronousTestCase):
    def test_packet_too_big_reaches_the_backend(self) -> None:
        """A Packet Too Big from a router about one of our replies (to a confirmed care-of
        address, with the Type 2 Routing Header we added) goes to the backend that sent
        the reply, reading as about its own packet, MTU lowered by our header's 24 bytes;
        the ICMPv6 checksum is valid by scapy's computation."""
        balancer, _ = make()
        home, coa = ipaddress.IPv6Address(HOA).packed, ipaddress.IPv6Address(COA2).packed
        first = balancer.inbound(mobile(COA2))
        assert first is not None
        backend = IPv6(bytes(first)).dst
        balancer.return_paths.confirm(home, coa)
        reply = balancer.outbound(bytearray(bytes(
            IPv6(src=backend, dst=HOA) / TCP(sport=80, dport=40000, flags="A") / (b"d" * 1300)
        )))
        assert reply is not None
        self.assertEqual(IPv6(bytes(reply)).dst, COA2)
        ptb = ICMPv6PacketTooBig(mtu=1400) / bytes(reply)[:1232]
        error = bytearray(bytes(IPv6(src="2001:db8:f0::1", dst=VIP) / ptb))
        out = balancer.inbound(error)
        assert out is not None
        pkt = IPv6(bytes(out))
        self.assertEqual(pkt.dst, backend)
        self.assertEqual(pkt[ICMPv6PacketTooBig].mtu, 1376)
        quoted = IPv6(bytes(pkt[ICMPv6PacketTooBig].payload))
        self.assertEqual((quoted.src, quoted.dst), (backend, HOA))
        self.assertNotIn(IPv6ExtHdrRouting, quoted)
        got = pkt[ICMPv6PacketTooBig].cksum
        del pkt[ICMPv6PacketTooBig].cksum
        self.assertEqual(IPv6(bytes(pkt))[ICMPv6PacketTooBig].cksum, got)
        self.assertEqual(balancer.counters.icmp_errors_in, 1)

    def test_unknown_error_dropped(self) -> None:
        """An error about nothing we sent is counted and dropped, not balanced."""
        balancer, _ = make()
        quote = bytes(IPv6(src=VIP, dst="2001:db8:100::9999") / UDP())
        error = bytearray(bytes(IPv6(src="2001:db8:f0::1", dst=VIP)
                                / ICMPv6DestUnreach() / quote))
        self.assertIsNone(balancer.inbound(error))
        self.assertEqual(balancer.counters.dropped["icmp-error-unknown"], 1)
        self.assertEqual(len(balancer.table), 0)


class ConfirmedRaceTests(SynchronousTestCase):
    def test_new_care_of_joins_confirmed_backend(self) -> None:
        """Keyed on the source address, a packet from a new care-of address that beats
        the notification joins the backend of the terminal's confirmed care-of address."""
        balancer, _ = make(scheduler="round_robin", chain=("src",))
        first = balancer.inbound(mobile(COA1))
        assert first is not None
        backend = IPv6(bytes(first)).dst
        balancer.return_paths.confirm(
            ipaddress.IPv6Address(HOA).packed, ipaddress.IPv6Address(COA1).packed
        )
        for i in range(4):  # round robin would send the next new key elsewhere
            balancer.inbound(mobile(f"2001:db8:a3::{i + 1:x}", hoa=f"2001:db8:100::{i + 1:x}"))
        moved = balancer.inbound(mobile(COA2))
        assert moved is not None
        self.assertEqual(IPv6(bytes(moved)).dst, backend)

    def test_unconfirmed_claim_is_scheduled(self) -> None:
        """Without a confirmed binding the home address claim steers nothing."""
        balancer, _ = make(scheduler="round_robin", chain=("src",))
        first = balancer.inbound(mobile(COA1))
        second = balancer.inbound(mobile(COA2))
        assert first is not None and second is not None
        self.assertNotEqual(IPv6(bytes(first)).dst, IPv6(bytes(second)).dst)




class SharedBindingsTests(SynchronousTestCase):
    def test_a_miss_asks_the_fleet_first(self) -> None:
        """A key another balancer bound differently from the scheduler's choice goes to
        that backend here too; a backend this balancer cannot use (down, unknown) is
        ignored and the scheduler decides."""
        from zope.interface import implementer

        from lbproxy.core.balancer import ISharedBindings

        @implementer(ISharedBindings)
        class Fleet:
            def __init__(self) -> None:
                self.names: dict[bytes, str] = {}

            def backend_name(self, key: Key) -> str | None:
                return self.names.get(bytes(key))

        balancer, _ = make(scheduler="round_robin")
        fleet = Fleet()
        balancer.shared = fleet
        keys = [Key("addr", ipaddress.IPv6Address(f"2001:db8:100::{i + 1}").packed)
                for i in range(3)]  # fmt: skip
        fleet.names[bytes(keys[0])] = "srv3"
        fleet.names[bytes(keys[1])] = "nowhere"
        fleet.names[bytes(keys[2])] = "srv2"
        balancer.set_backend_up("srv2", False)
        got = []
        for i in range(3):
            out = balancer.inbound(mobile(f"2001:db8:a1::{i + 1}", hoa=f"2001:db8:100::{i + 1}"))
            assert out is not None
            got.append(IPv6(bytes(out)).dst)
        self.assertEqual(got[0], "2001:db8:b0::13")
        self.assertNotEqual(got[2], "2001:db8:b0::12")
        self.assertEqual(balancer.counters.shared_hits, 1)


class ReplyRuleTests(SynchronousTestCase):
    @given(destination=st.one_of(
        st.binary(min_size=16, max_size=16),
        st.sampled_from(["ff02::1", "ff05::2", "fe80::1", "febf::1", "fec0::1",
                         "2001:db8:b0::1", "2001:db8:100::1", "::"]).map(
            lambda a: ipaddress.IPv6Address(a).packed),
    ))
    @settings(max_examples=300, deadline=None)
    def test_the_general_path_applies_the_policy_rule(self, destination: bytes) -> None:
        """`Balancer.outbound` leaves to the kernel exactly what `policy.is_reply` says is
        not a reply (multicast, link-local, this host's own address), whatever the
        destination -- its inline copy of the rule is the rule."""
        from lbproxy.core.policy import is_reply

        balancer, _ = make()
        own = ipaddress.IPv6Address("2001:db8:b0::1").packed
        balancer.set_own_addresses({own})
        packet = bytearray(bytes(IPv6(src=str(BACKENDS[0].address), dst="::")
                                 / UDP(sport=80, dport=4000) / b"r"))  # fmt: skip
        packet[24:40] = destination
        before = balancer.counters.ignored
        balancer.outbound(packet)
        ignored = balancer.counters.ignored - before
        self.assertEqual(ignored == 1, not is_reply(destination, {own}))

    def test_shorter_than_an_ipv6_header(self) -> None:
        """Server-link bytes too short to hold a destination address are not a reply:
        left to the kernel and counted as ignored, at every length up to 39; from 40
        on, a reply from a source that is no backend is refused as such."""
        balancer, _ = make()
        packet = bytes(IPv6(src="2001:db8:77::1", dst="2001:db8:100::1") / UDP() / b"r")
        for length in range(40):
            self.assertIsNone(balancer.outbound(bytearray(packet[:length])))
        self.assertEqual(balancer.counters.ignored, 40)
        self.assertEqual(balancer.counters.replies_in, 0)
        self.assertIsNone(balancer.outbound(bytearray(packet)))
        self.assertEqual(balancer.counters.ignored, 40)
        self.assertEqual(balancer.counters.dropped["not-from-backend"], 1)
