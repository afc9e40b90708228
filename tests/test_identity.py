"""One terminal, one backend, on every path: the identity model, in-process.

A terminal's packets show different identities depending on where it is and what it
sends: an HAO packet from a care-of address shows the home address and the care-of
address; a packet from home, or tunnelled through the home agent, shows the home address
as its source; IKE shows the care-of address, ESP its SPI.  The core links them: every
identity of a packet leads to the binding of the first one (in chain order) that has one.
These tests take the paths a real terminal takes -- and the ones a forger takes -- with
the real `Balancer`, the default key chain and Maglev, three backends; packets are built
and re-dissected by scapy.
"""

from __future__ import annotations

import ipaddress

from scapy.layers.inet import TCP, UDP
from scapy.layers.inet6 import (
    HAO,
    ICMPv6DestUnreach,
    ICMPv6PacketTooBig,
    IPv6,
    IPv6ExtHdrDestOpt,
    IPv6ExtHdrFragment,
)
from scapy.layers.ipsec import ESP
from twisted.trial.unittest import SynchronousTestCase

from lbproxy.core.balancer import Balancer
from lbproxy.core.keys import Key
from lbproxy.ops.control import Control
from tests.test_balancer import VIP, make

N = 60


def home(i: int) -> str:
    return f"2001:db8:100::{i + 1:x}"


def coa(i: int, link: int = 1) -> str:
    return f"2001:db8:a{link}::{i + 1:x}"


def eui64(i: int, link: int = 1) -> str:
    """A universal EUI-64 address (u bit set, ff:fe in the middle) on access link `link`."""
    return f"2001:db8:a{link}::211:22ff:fe33:{i + 1:x}"


def hao(source: str, hoa: str, payload: bytes = b"x", dport: int = 80) -> bytearray:
    return bytearray(bytes(IPv6(src=source, dst=VIP) / IPv6ExtHdrDestOpt(options=[HAO(hoa=hoa)])
                           / UDP(sport=40000, dport=dport) / payload))  # fmt: skip


def plain(source: str, dport: int = 80, payload: bytes = b"x") -> bytearray:
    return bytearray(bytes(IPv6(src=source, dst=VIP) / UDP(sport=40000, dport=dport) / payload))


def esp(source: str, spi: int) -> bytearray:
    return bytearray(bytes(IPv6(src=source, dst=VIP) / ESP(spi=spi, seq=1) / (b"\0" * 32)))


def to(balancer: Balancer, packet: bytearray) -> str:
    """The backend address the packet went to (it must have been forwarded)."""
    out = balancer.inbound(packet)
    assert out is not None, balancer.counters.as_dict()
    return str(IPv6(bytes(out)).dst)


class OneTerminalOneBackendTests(SynchronousTestCase):
    def test_returning_home(self) -> None:
        """60 terminals send HAO traffic from a1, move to a2, then come home and send
        plain packets from their home address: 60 of 60 stay on their backend."""
        balancer, clock = make()
        moved = 0
        for i in range(N):
            first = to(balancer, hao(coa(i, 1), home(i)))
            clock.advance(1)
            seen = {first, to(balancer, hao(coa(i, 2), home(i))), to(balancer, plain(home(i)))}
            moved += len(seen) > 1
        self.assertEqual(moved, 0)
        self.assertEqual(len(balancer.table), N)  # one binding each, the rest aliases

    def test_tunnelled_first_then_route_optimised(self) -> None:
        """RFC 6275 section 9.3.1: a real mobile node reaches a server tunnelled (source =
        home address) before it sends HAO packets from its care-of address: one key."""
        balancer, _ = make()
        for i in range(N):
            first = to(balancer, plain(home(i)))
            self.assertEqual(to(balancer, hao(coa(i), home(i))), first)
            self.assertEqual(to(balancer, plain(coa(i))), first)  # e.g. its CoTI

    def test_ike_and_esp_land_together(self) -> None:
        """A terminal's IKE (UDP 500 and 4500 from its care-of address) and its ESP (its
        SPI, from the same address), with and without an HAO, moving: one backend."""
        balancer, _ = make()
        for i in range(N):
            spi = 0x1000 + i
            first = to(balancer, plain(coa(i), dport=500))
            self.assertEqual(to(balancer, plain(coa(i), dport=4500)), first)
            self.assertEqual(to(balancer, esp(coa(i), spi)), first)
            self.assertEqual(to(balancer, hao(coa(i), home(i), dport=4500)), first)
            # moved: the HAO packet shows the home address and the new care-of address
            self.assertEqual(to(balancer, hao(coa(i, 2), home(i), dport=4500)), first)
            self.assertEqual(to(balancer, esp(coa(i, 2), spi)), first)
            self.assertEqual(to(balancer, plain(coa(i, 2), dport=500)), first)

    def test_hoti_and_coti_reach_one_home_agent(self) -> None:
        """Home agents as backends (claim 11, transparent mode): after one packet that
        shows both identities, the HoTI (reverse-tunnelled, source = home address) and
        the CoTI (source = care-of address) reach the same home agent."""
        balancer, _ = make(mode="transparent")
        for i in range(N):
            first = to(balancer, hao(coa(i), home(i)))  # e.g. a Binding Update
            self.assertEqual(to(balancer, plain(home(i))), first)  # HoTI
            self.assertEqual(to(balancer, plain(coa(i))), first)  # CoTI

    def test_interface_id_terminal_moving(self) -> None:
        """An EUI-64 terminal without an HAO, moving between prefixes: one backend, its
        source addresses linked to its interface-ID binding."""
        balancer, _ = make()
        for i in range(N):
            first = to(balancer, plain(eui64(i, 1)))
            self.assertEqual(to(balancer, plain(eui64(i, 2))), first)
            self.assertEqual(to(balancer, plain(eui64(i, 3))), first)
        self.assertEqual(len(balancer.table), N)
        self.assertEqual(balancer.table.alias_count, 3 * N)

    def test_errors_about_replies_follow_every_key_kind(self) -> None:
        """A Packet Too Big or a Destination Unreachable about one of our replies reaches
        the terminal's backend, whatever identity keyed the terminal: home address,
        interface ID, SPI (the error quotes a reply to its care-of address, linked), or
        source address."""
        cases = {
            "hoa": (hao(coa(1), home(1)), home(1)),
            "iid": (plain(eui64(2)), eui64(2)),
            "spi": (esp(coa(3), 0x77), coa(3)),
            "src": (plain(coa(4)), coa(4)),
        }
        for kind, (packet, terminal) in cases.items():
            for error in (ICMPv6PacketTooBig(mtu=1280), ICMPv6DestUnreach(code=3)):
                balancer, _ = make()
                backend = to(balancer, bytearray(packet))
                reply = bytes(IPv6(src=VIP, dst=terminal) / TCP(sport=80, dport=40000) / b"r")
                message = bytearray(bytes(IPv6(src="2001:db8:f0::1", dst=VIP) / error / reply))
                self.assertEqual(to(balancer, message), backend, kind)
                self.assertEqual(balancer.counters.icmp_errors_in, 1)

    def test_fragments_follow_their_first_for_every_key_kind(self) -> None:
        """The later fragments of a datagram follow its first fragment, whatever identity
        keyed it; a later fragment whose first never came is dropped and counted."""
        balancer, _ = make()
        sources = {"hoa": (coa(5), home(5)), "iid": (eui64(6), None), "src": (coa(7), None)}
        for n, (kind, (source, hoa_)) in enumerate(sources.items()):
            layers = IPv6(src=source, dst=VIP)
            if hoa_ is not None:
                layers = layers / IPv6ExtHdrDestOpt(options=[HAO(hoa=hoa_)])
            first = layers / IPv6ExtHdrFragment(m=1, id=n) / UDP(sport=1, dport=80) / (b"a" * 64)
            later = layers / IPv6ExtHdrFragment(offset=9, m=0, id=n, nh=17) / (b"b" * 64)
            backend = to(balancer, bytearray(bytes(first)))
            self.assertEqual(to(balancer, bytearray(bytes(later))), backend, kind)
        orphan = IPv6(src=coa(9), dst=VIP) / IPv6ExtHdrFragment(offset=9, m=0, id=99, nh=17)
        self.assertIsNone(balancer.inbound(bytearray(bytes(orphan / b"c"))))
        self.assertEqual(balancer.counters.dropped["fragment-unknown"], 1)


class LinkingCannotStealTests(SynchronousTestCase):
    """An HAO is a claim anyone can make.  Linking only ever attaches identities that have
    no binding -- identities the sender shows of itself -- and never moves one that has a
    binding: a forger cannot take a victim's binding, or any bound identity."""

    def setUp(self) -> None:
        self.balancer, self.clock = make(scheduler="round_robin")
        self.victim = to(self.balancer, hao(coa(1), home(1)))
        self.victim_key = Key("addr", ipaddress.IPv6Address(home(1)).packed)
        self.victim_coa = Key("addr", ipaddress.IPv6Address(coa(1)).packed)
        self.forger = to(self.balancer, plain(coa(2)))  # the forger's own binding
        self.assertNotEqual(self.victim, self.forger)

    def assert_victim_untouched(self) -> None:
        for key in (self.victim_key, self.victim_coa):
            binding = self.balancer.table.get(key)
            assert binding is not None
            self.assertEqual(str(binding.backend.address), self.victim)
        # the victim's own packets still go where they went
        self.assertEqual(to(self.balancer, hao(coa(1), home(1))), self.victim)
        self.assertEqual(to(self.balancer, plain(coa(1))), self.victim)

    def test_claiming_a_victims_home_from_a_bound_address(self) -> None:
        """The forger claims the victim's home address from its own, bound, address:
        the packet goes by chain order (the home address first) -- only the forger's own
        packet is steered -- and nothing moves: not the victim's binding, not the
        forger's; the conflict is counted."""
        self.assertEqual(to(self.balancer, hao(coa(2), home(1))), self.victim)
        self.assertEqual(self.balancer.counters.conflicts["src"], 1)
        forger = self.balancer.table.get(Key("addr", ipaddress.IPv6Address(coa(2)).packed))
        assert forger is not None
        self.assertEqual(str(forger.backend.address), self.forger)
        self.assert_victim_untouched()

    def test_claiming_a_victims_care_of_address_as_home(self) -> None:
        """The forger claims the victim's care-of address as its home address, from a
        fresh address: only the forger's fresh address is linked (to the victim's
        binding, where its own packets now go); the victim's identities do not move."""
        to(self.balancer, hao(coa(3), coa(1)))
        self.assert_victim_untouched()
        self.assertEqual(self.balancer.counters.conflicts.total(), 0)

    def test_a_flood_of_claims_cannot_move_anyone(self) -> None:
        """Hundreds of forged packets, every combination of the victim's and the forger's
        identities as home and source: afterwards every identity that had a binding
        leads where it led before."""
        table = self.balancer.table
        for i in range(10, 40):
            to(self.balancer, plain(coa(i)))
        before = {bytes(k): b.backend.name for k, b in table}
        names = [home(1), coa(1), coa(2), *[coa(i) for i in range(10, 40)]]
        for claimed in names:
            for source in names:
                if claimed != source:
                    self.balancer.inbound(hao(source, claimed))
        after = {k: table.get(Key.parse(str(Key("addr", k[1:])))) for k in before}
        self.assertEqual({k: b.backend.name for k, b in after.items() if b is not None}, before)


class OperatorViewTests(SynchronousTestCase):
    def test_show_trace_and_stats_show_the_identities(self) -> None:
        """``show`` lists a binding's aliases, ``trace`` names the identities a packet
        would link, ``stats`` counts aliases, links and conflicts."""
        balancer, _ = make()
        to(balancer, hao(coa(1), home(1)))
        to(balancer, esp(coa(1), 0x42))
        control = Control(balancer)
        (row,) = control.rows()
        self.assertEqual(row.key, f"addr {home(1)}")
        self.assertEqual(set(row.aliases), {f"addr {coa(1)}", "spi 0x00000042"})
        traced = control.trace_dict(bytes(hao(coa(2), home(1))))
        self.assertEqual((traced["strategy"], traced["key"], traced["hit"]),
                         ("hoa", f"addr {home(1)}", True))  # fmt: skip
        self.assertEqual(traced["aliases"], [f"addr {coa(2)}"])
        stats = control.stats()
        self.assertEqual((stats["table"]["size"], stats["table"]["aliases"]), (1, 2))
        self.assertEqual(stats["table"]["links"], 2)
        self.assertEqual(stats["conflicts"], {})


def ike(source: str, spi: bytes, port: int = 500, exchange: int = 34) -> bytearray:
    """An IKEv2 message (scapy's IKEv2 layer) from `source`: on UDP 500, or behind the
    non-ESP marker on UDP 4500."""
    from scapy.contrib.ikev2 import IKEv2

    message = IKEv2(init_SPI=spi, resp_SPI=b"\x00" * 8, exch_type=exchange)
    marker = b"\x00\x00\x00\x00" if port == 4500 else b""
    return bytearray(bytes(IPv6(src=source, dst=VIP) / UDP(sport=port, dport=port)
                           / (marker + bytes(message))))  # fmt: skip


def esp_in_udp(source: str, spi: int) -> bytearray:
    """ESP encapsulated in UDP 4500 (RFC 3948)."""
    payload = spi.to_bytes(4, "big") + (1).to_bytes(4, "big") + b"\0" * 32
    return bytearray(bytes(IPv6(src=source, dst=VIP) / UDP(sport=4500, dport=4500) / payload))


class IpsecTerminalTests(SynchronousTestCase):
    """A terminal using IPsec without Mobile IPv6: MOBIKE (RFC 4555) moves its IKE SA to
    a new address with an INFORMATIONAL exchange -- its first packet from there."""

    def test_ike_and_esp_identities(self) -> None:
        """The IKE SA initiator's SPI is an identity on UDP 500 and behind the non-ESP
        marker on UDP 4500; ESP in UDP 4500 is keyed by its SPI; a zero SPI or a
        truncated header is none."""
        from lbproxy.core.keys import IkeStrategy, SpiStrategy
        from lbproxy.wire.view import parse

        spi = bytes(range(1, 9))
        for port in (500, 4500):
            packet = ike(coa(1), spi, port)
            self.assertEqual(IkeStrategy().key_for(packet, parse(packet)), Key("ike", spi))
        short = plain(coa(1), dport=500, payload=spi + bytes(10))  # not a whole IKE header
        for packet in (ike(coa(1), bytes(8)), short, plain(coa(1), dport=4500)):
            self.assertIsNone(IkeStrategy().key_for(packet, parse(packet)))
        packet = esp_in_udp(coa(1), 0xABCD)
        self.assertEqual(SpiStrategy().key_for(packet, parse(packet)),
                         Key("spi", (0xABCD).to_bytes(4, "big")))  # fmt: skip
        self.assertIsNone(IkeStrategy().key_for(packet, parse(packet)))
        self.assertEqual(str(Key("ike", spi)), "ike 0x0102030405060708")
        self.assertEqual(Key.parse("ike 0x0102030405060708"), Key("ike", spi))

    def test_mobike_update_before_esp_keeps_the_backend(self) -> None:
        """IKE and ESP-in-UDP from the first address, then the MOBIKE address update from
        the second as its first packet there, then ESP: one backend, for 60 terminals."""
        balancer, _ = make()
        for i in range(N):
            spi = (0x1000 + i).to_bytes(8, "big")
            first = to(balancer, ike(coa(i, 1), spi, 500))
            self.assertEqual(to(balancer, ike(coa(i, 1), spi, 4500)), first)
            self.assertEqual(to(balancer, esp_in_udp(coa(i, 1), 0x5000 + i)), first)
            self.assertEqual(to(balancer, ike(coa(i, 2), spi, 4500, exchange=37)), first)
            self.assertEqual(to(balancer, esp_in_udp(coa(i, 2), 0x5000 + i)), first)
            self.assertEqual(to(balancer, esp(coa(i, 3), 0x5000 + i)), first)
        self.assertEqual(balancer.counters.conflicts.total(), 0)


class FloodTests(SynchronousTestCase):
    def test_a_flood_of_forged_identities_locks_nobody_out(self) -> None:
        """A full table (200 bindings) under a flood of 5,000 forged home addresses sent
        twice each, each from its own address of one /64 (no spoofing needed: the home
        address is packet content, and the /64 is the attacker's): the established
        terminals keep their backends, every newcomer from elsewhere is served, and the
        flood's own new identities are throttled, counted.  (From one source address the
        flood would not even take places: its claims become aliases of one binding.)"""
        balancer, clock = make(max_entries=200)
        established = {}
        for i in range(50):
            first = to(balancer, hao(coa(i), home(i)))
            for _ in range(10):
                to(balancer, hao(coa(i), home(i)))
            established[i] = first
        served = 0
        for n in range(5000):
            forged = f"2001:db8:666::{n + 1:x}"
            for _ in range(2):
                balancer.inbound(hao(f"2001:db8:bad::{n + 1:x}", forged))
            if n % 100 == 0:
                clock.advance(1)
                newcomer = n // 100
                source = f"2001:db8:c{newcomer % 10}:{newcomer}::1"
                out = balancer.inbound(hao(source, f"2001:db8:200::{newcomer + 1:x}"))
                served += out is not None
                for i in range(50):  # the established terminals keep talking
                    self.assertEqual(to(balancer, hao(coa(i), home(i))), established[i])
        self.assertEqual(served, 50)
        self.assertLessEqual(len(balancer.table), 200)
        self.assertGreater(balancer.table.stats.throttled, 0)
