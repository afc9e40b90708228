"""Tests for lbproxy/xdp/lbproxy.bpf.c and its loader lbproxy.io.xdp.

The program runs through BPF_PROG_TEST_RUN (no interface needed) and its output is
dissected by scapy, the independent oracle: addresses, hop limit, headers removed or
inserted, transport checksums.  The executor contract (tests/test_executors.py,
`XdpContractTests`) holds it to the general path on hypothesis-made batches; the tests
here pin the cases those batches rarely reach (a checksum whose update is zero, an
established binding living on through the driver alone) and the loader's own duties.
They skip, saying why, only where BPF is unavailable (not root, no libbpf, no object).
"""

from __future__ import annotations

import ipaddress
import os

from scapy.layers.inet import TCP, UDP
from scapy.layers.inet6 import IPv6, IPv6ExtHdrDestOpt, IPv6ExtHdrRouting
from twisted.trial.unittest import SynchronousTestCase

from lbproxy.core.balancer import Balancer
from lbproxy.core.keys import Key
from lbproxy.io.xdp import XDP_PASS, XDP_TX, XdpOffload, XdpProgram, available
from lbproxy.wire.checksum import apply_delta16, delta16
from tests.executors import ETHERNET, VIP, address, raw_mobile, raw_reply
from tests.test_balancer import BACKENDS, COA1, COA2, HOA, make, mobile
from tests.test_fastpath import _reply_checksum_ok, _rfc_checksum_ok, _usual


def _why_not() -> str | None:
    if os.geteuid() != 0:
        return "BPF_PROG_TEST_RUN needs root (CAP_BPF and CAP_NET_ADMIN)"
    return available()


SKIP = _why_not()
_program: XdpProgram | None = None


def offload(balancer: Balancer, clock: object) -> XdpOffload:
    """The executor on one loaded program, its maps emptied (loading is the slow part)."""
    global _program
    if _program is None:
        _program = XdpProgram(max_bindings=1000)
    _program.reset()
    return XdpOffload(balancer, clock, fixed_clock=True, program=_program)  # type: ignore[arg-type]


def run(xdp: XdpOffload, program: str, packet: bytes) -> tuple[int, bytes]:
    """One packet through the program: its verdict and the IPv6 packet it left."""
    xdp.prepare()
    verdict, out = xdp.program.test_run(program, ETHERNET + packet)
    assert out[:14] == ETHERNET
    return verdict, out[14:]


class InboundTests(SynchronousTestCase):
    skip = SKIP

    def bound(self, mode: str = "translate") -> tuple[Balancer, XdpOffload, str]:
        """A balancer whose terminal HOA has its binding (made by the general path, as
        the program never makes one), and the program mirroring it."""
        balancer, clock = make(mode=mode, scheduler="round_robin")
        xdp = offload(balancer, clock)
        first = balancer.inbound(mobile(COA1))
        assert first is not None
        return balancer, xdp, IPv6(bytes(first)).dst

    def test_translate_udp_and_tcp(self) -> None:
        """Translate mode: the Destination Options header is gone, source := home
        address, destination := the binding's backend, a hop less, payload and transport
        checksum (scapy's verdict) intact."""
        _, xdp, backend = self.bound()
        for layer in (UDP(sport=40000, dport=80), TCP(sport=40000, dport=80, flags="PA")):
            packet = _usual(layer, COA1)
            self.assertTrue(_rfc_checksum_ok(packet))
            verdict, out = run(xdp, "lbproxy_inbound", packet)
            self.assertEqual(verdict, XDP_TX)
            pkt = IPv6(out)
            self.assertEqual((pkt.src, pkt.dst, pkt.hlim), (HOA, backend, 63))
            self.assertNotIn(IPv6ExtHdrDestOpt, pkt)
            self.assertEqual(pkt.plen, len(out) - 40)
            self.assertIn(type(layer), pkt)
            self.assertTrue(_rfc_checksum_ok(out))
            self.assertEqual(bytes(pkt[type(layer)].payload), b"payload")

    def test_transparent_keeps_the_hao(self) -> None:
        """Transparent mode: destination := backend, everything else stays."""
        _, xdp, backend = self.bound("transparent")
        verdict, out = run(xdp, "lbproxy_inbound", _usual(UDP(sport=40000, dport=80), COA1))
        self.assertEqual(verdict, XDP_TX)
        pkt = IPv6(out)
        self.assertEqual((pkt.src, pkt.dst, pkt.hlim), (COA1, backend, 63))
        self.assertIn(IPv6ExtHdrDestOpt, pkt)
        self.assertTrue(_rfc_checksum_ok(out))

    def test_udp_checksum_rules(self) -> None:
        """A UDP checksum of 0 (none) stays 0; an update whose result is 0 is sent as
        0xFFFF -- byte for byte what the general path sends."""
        _, xdp, backend = self.bound()
        reference, _ = make(scheduler="round_robin")
        assert reference.inbound(mobile(COA1)) is not None
        delta = delta16(address(VIP), address(backend))
        hoa, coa = address(HOA), address(COA1)
        for field in (0, delta or 0xFFFF):
            packet = raw_mobile(17, hoa, coa, 64, 80, field, b"x")
            verdict, out = run(xdp, "lbproxy_inbound", packet)
            self.assertEqual(verdict, XDP_TX)
            want = reference.inbound(bytearray(packet))
            self.assertEqual(out, bytes(want or b""))
            got = int.from_bytes(out[46:48], "big")
            self.assertEqual(got, 0 if field == 0 else 0xFFFF)
            self.assertEqual(got, 0 if field == 0 else apply_delta16(field, delta, True))

    def test_what_goes_up(self) -> None:
        """A miss, a hop limit of 1, another port, a backend down: XDP_PASS, untouched,
        and the program makes no binding."""
        balancer, xdp, _ = self.bound()
        other = raw_mobile(17, address("2001:db8:100::7"), address(COA1), 64, 80, 0, b"x")
        for packet in (other, raw_mobile(17, address(HOA), address(COA1), 1, 80, 0, b"x")):
            verdict, out = run(xdp, "lbproxy_inbound", packet)
            self.assertEqual((verdict, out), (XDP_PASS, packet))
        self.assertIsNone(xdp.program.bindings.lookup(address("2001:db8:100::7")))
        balancer.set_backend_up(BACKENDS[0].name, False)
        usual = bytes(mobile(COA1))
        self.assertEqual(run(xdp, "lbproxy_inbound", usual), (XDP_PASS, usual))
        balancer.set_backend_up(BACKENDS[0].name, True)
        self.assertEqual(run(xdp, "lbproxy_inbound", usual)[0], XDP_TX)
        balancer.set_virtual_addresses([ipaddress.IPv6Address(VIP)], [443])
        self.assertEqual(run(xdp, "lbproxy_inbound", usual), (XDP_PASS, usual))

    def test_moves_and_removals_are_mirrored(self) -> None:
        """An operator's move re-points the map's entry; a forgotten binding leaves it."""
        from lbproxy.core import actions

        balancer, xdp, backend = self.bound()
        key = Key("hoa", address(HOA))
        target = next(b for b in BACKENDS if str(b.address) != backend)
        actions.move(balancer, key, target.name)
        verdict, out = run(xdp, "lbproxy_inbound", bytes(mobile(COA1)))
        self.assertEqual((verdict, IPv6(out).dst), (XDP_TX, str(target.address)))
        actions.forget(balancer, key)
        self.assertIsNone(xdp.program.bindings.lookup(address(HOA)))
        self.assertEqual(run(xdp, "lbproxy_inbound", bytes(mobile(COA1)))[0], XDP_PASS)

    def test_a_new_care_of_address_goes_up_once(self) -> None:
        """A packet from a care-of address that is not the binding's goes up (the core
        records the move); after the next sync the program has the new address and
        takes the terminal's packets again."""
        balancer, xdp, backend = self.bound()
        moved = bytes(mobile(COA2))
        self.assertEqual(run(xdp, "lbproxy_inbound", moved), (XDP_PASS, moved))
        assert balancer.inbound(bytearray(moved)) is not None  # the raw socket's part
        xdp.sync()
        verdict, out = run(xdp, "lbproxy_inbound", moved)
        self.assertEqual((verdict, IPv6(out).dst), (XDP_TX, backend))
        binding = balancer.table.get(Key("hoa", address(HOA)))
        assert binding is not None
        self.assertEqual(binding.care_of, address(COA2))


    def test_a_care_of_address_bound_elsewhere_goes_up(self) -> None:
        """A terminal's care-of address that is an identity of another binding (a source
        bound on its own): even once the table has it as the terminal's care-of address,
        the program hands the terminal's packets from it up, so the core sees (and counts)
        the conflict; once that other binding is gone, the program takes them."""
        from lbproxy.core import actions

        balancer, clock = make(scheduler="round_robin")
        xdp = offload(balancer, clock)
        assert balancer.inbound(mobile(COA1)) is not None
        # COA2 on its own (no HAO: the source-address key).
        plain = bytearray(bytes(IPv6(src=COA2, dst=VIP) / UDP(sport=9, dport=80) / b"p"))
        assert balancer.inbound(plain) is not None
        xdp.flush()
        moved = bytes(mobile(COA2))
        self.assertEqual(run(xdp, "lbproxy_inbound", moved), (XDP_PASS, moved))
        assert balancer.inbound(bytearray(moved)) is not None  # the raw socket's part
        self.assertGreater(sum(balancer.counters.conflicts.values()), 0)
        xdp.sync()  # what the table says now is written back
        binding = balancer.table.get(Key("hoa", address(HOA)))
        assert binding is not None
        self.assertEqual(binding.care_of, address(COA2))
        self.assertEqual(run(xdp, "lbproxy_inbound", moved), (XDP_PASS, moved))
        actions.forget(balancer, Key("hoa", address(COA2)))
        xdp.flush()
        self.assertEqual(run(xdp, "lbproxy_inbound", moved)[0], XDP_TX)


class FullMapTests(SynchronousTestCase):
    """The maps hold two identities per binding of the table's bound; past that an
    identity is not offloaded -- counted, logged, its packets go up -- and nothing
    raises."""

    skip = SKIP

    def test_an_identity_beyond_the_maps_goes_up(self) -> None:
        balancer, clock = make(scheduler="round_robin", max_entries=1)
        program = XdpProgram(max_bindings=1)  # room for two identities
        self.addCleanup(program.close)
        xdp = XdpOffload(balancer, clock, fixed_clock=True, program=program)
        assert balancer.inbound(mobile(COA1)) is not None  # home + COA1: two entries
        xdp.flush()
        self.assertEqual(xdp.stats()["full"], 0)
        assert balancer.inbound(mobile(COA2)) is not None  # moved: COA2 is a third
        xdp.flush()  # must not raise
        self.assertEqual(xdp.stats()["full"], 1)
        self.assertEqual(len(list(program.bindings.items())), 2)
        self.assertIsNone(program.bindings.lookup(address(COA2)))
        # The terminal's own packets (keyed by its home address) stay in the driver.
        verdict, out = run(xdp, "lbproxy_inbound", bytes(mobile(COA2)))
        self.assertEqual(verdict, XDP_TX)
        self.assertEqual(IPv6(out).src, HOA)


    def test_an_identity_left_out_is_written_once_there_is_room(self) -> None:
        """An identity left out of full maps is written at the first sync after an
        entry was deleted, and its terminal's packets then stay in the driver; it is
        counted once however often it is tried."""
        from lbproxy.core import actions

        balancer, clock = make(scheduler="round_robin")
        program = XdpProgram(max_bindings=1)  # room for two identities
        self.addCleanup(program.close)
        xdp = XdpOffload(balancer, clock, fixed_clock=True, program=program)
        other = "2001:db8:100::2002"
        assert balancer.inbound(mobile(COA1)) is not None  # home + COA1: the two
        xdp.flush()
        assert balancer.inbound(mobile("2001:db8:a1::2002", hoa=other)) is not None
        xdp.flush()
        self.assertEqual(xdp.stats()["full"], 2)
        usual = bytes(mobile("2001:db8:a1::2002", hoa=other))
        self.assertEqual(run(xdp, "lbproxy_inbound", usual)[0], XDP_PASS)
        xdp.sync()  # no room made: nothing tried
        self.assertEqual(xdp.stats()["full"], 2)
        actions.forget(balancer, Key("hoa", address(HOA)))  # two entries deleted
        xdp.sync()
        verdict, out = run(xdp, "lbproxy_inbound", usual)
        self.assertEqual((verdict, IPv6(out).src), (XDP_TX, other))
        self.assertEqual(xdp.stats()["full"], 2)

    def test_a_conflict_ending_rewrites_only_what_is_offloaded(self) -> None:
        """A conflict that ends makes the other binding's identities be written again --
        only those in the maps: one left out for want of room stays out (its write
        would be an insert into a full map, and raise out of the flush)."""
        from lbproxy.core import actions

        balancer, clock = make(scheduler="round_robin")
        program = XdpProgram(max_bindings=2)  # room for four identities
        self.addCleanup(program.close)
        xdp = XdpOffload(balancer, clock, fixed_clock=True, program=program)
        other_home = "2001:db8:100::3003"
        plain = bytearray(bytes(IPv6(src="2001:db8:b::1", dst=VIP) / UDP(sport=9, dport=80)
                                / b"p"))  # fmt: skip
        for packet in (mobile(COA1), plain, mobile("2001:db8:a3::1", hoa=other_home)):
            assert balancer.inbound(packet) is not None
            xdp.flush()
        self.assertEqual(xdp.stats()["full"], 1)  # the third terminal's care-of address
        clock.advance(1)
        moved = bytes(mobile(COA1, hoa=other_home))  # onto the first terminal's COA1
        self.assertEqual(run(xdp, "lbproxy_inbound", moved)[0], XDP_PASS)
        assert balancer.inbound(bytearray(moved)) is not None
        xdp.sync()
        assert balancer.inbound(mobile(COA2)) is not None  # COA2 left out: full
        xdp.flush()
        actions.forget(balancer, Key("hoa", address(COA1)))  # the conflict ends
        xdp.flush()  # must not raise
        self.assertLessEqual(len(list(program.bindings.items())), 4)


class RefreshTests(SynchronousTestCase):
    """Claim 10 through the driver: the program stamps, `sync` folds the stamps in."""

    skip = SKIP

    def test_traffic_only_through_xdp_keeps_a_binding(self) -> None:
        """A terminal whose packets after the first all go through the program is not
        expired at its first lifetime's end; an idle one is, by the first sweep after
        its lifetime; the table's expiry and counts are those the general path gives.
        The stamps are read when the binding comes due -- by `sync` when it is due
        within `ahead`, else by the sweep itself -- never before."""
        balancer, clock = make(scheduler="round_robin")
        xdp = offload(balancer, clock)
        idle = "2001:db8:100::2002"
        for hoa, coa in ((HOA, COA1), (idle, "2001:db8:a1::2002")):
            assert balancer.inbound(mobile(coa, hoa=hoa)) is not None
        clock.advance(200)
        for _ in range(3):
            verdict, _out = run(xdp, "lbproxy_inbound", bytes(mobile(COA1)))
            self.assertEqual(verdict, XDP_TX)
        self.assertEqual(xdp.last_seen(address(HOA)), 200.0)
        self.assertEqual(xdp.sync(), 0)  # due at 300: not read yet
        kept = balancer.table.get(Key("hoa", address(HOA)))
        assert kept is not None
        self.assertEqual((kept.expires, kept.packets), (300.0, 1))
        clock.advance(99)  # 299
        self.assertEqual(xdp.sync(ahead=2), 1)  # due within 2 s: folded
        self.assertEqual((kept.expires, kept.packets), (500.0, 4))
        clock.advance(2)  # 301: the first packets' lifetime (300 s) is over
        balancer.sweep()
        self.assertIs(balancer.table.get(Key("hoa", address(HOA))), kept)
        self.assertEqual(kept.expires, 500.0)
        self.assertEqual((kept.packets, kept.established, kept.care_of), (4, True, address(COA1)))
        self.assertIsNone(balancer.table.get(Key("hoa", address(idle))))
        self.assertIsNone(xdp.program.bindings.lookup(address(idle)))
        self.assertEqual(balancer.counters.hits["hoa"], 3)
        self.assertEqual(balancer.counters.packets_out, 5)
        self.assertEqual(sum(balancer.counters.backend_packets.values()), 5)
        self.assertEqual(xdp.stats()["packets"], 3)
        clock.advance(200)  # 501: now it is idle too
        balancer.sweep()
        self.assertIsNone(balancer.table.get(Key("hoa", address(HOA))))

    def test_expired_in_the_program_goes_up(self) -> None:
        """Past the expiry the program knows, a packet goes up: the table decides (here:
        refreshed by the general path meanwhile), and the next sync gives the program
        the table's expiry, so the packets come back to the driver."""
        balancer, clock = make(scheduler="round_robin")
        xdp = offload(balancer, clock)
        assert balancer.inbound(mobile(COA1)) is not None
        xdp.flush()  # what the forwarder does after each batch of the general path
        clock.advance(250)
        # A packet the general path takes (the raw socket's) refreshes the table only.
        assert balancer.inbound(mobile(COA1)) is not None
        clock.advance(100)  # 350: past the expiry the program was given (300)
        usual = bytes(mobile(COA1))
        self.assertEqual(run(xdp, "lbproxy_inbound", usual), (XDP_PASS, usual))
        assert balancer.inbound(bytearray(usual)) is not None  # what the raw socket does
        xdp.sync()
        self.assertEqual(run(xdp, "lbproxy_inbound", usual)[0], XDP_TX)
        self.assertEqual(xdp.stats()["stale"], 1)


    def test_the_sweep_asks_without_a_sync(self) -> None:
        """With no `sync` at all, the sweep reads the stamps of what it would expire: the
        busy terminal lives on at its last packet's expiry, the idle one goes."""
        balancer, clock = make(scheduler="round_robin")
        xdp = offload(balancer, clock)
        idle = "2001:db8:100::2002"
        for hoa, coa in ((HOA, COA1), (idle, "2001:db8:a1::2002")):
            assert balancer.inbound(mobile(coa, hoa=hoa)) is not None
        xdp.flush()
        clock.advance(200)
        self.assertEqual(run(xdp, "lbproxy_inbound", bytes(mobile(COA1)))[0], XDP_TX)
        clock.advance(101)  # 301
        balancer.sweep()
        kept = balancer.table.get(Key("hoa", address(HOA)))
        assert kept is not None
        self.assertEqual((kept.expires, kept.packets, kept.established), (500.0, 2, True))
        self.assertIsNone(balancer.table.get(Key("hoa", address(idle))))

    def test_told_late_is_the_packets_own_expiry(self) -> None:
        """Stamps read long after their packet give the packet's expiry, not the
        reading's: a terminal last forwarded in the driver at 200 is gone by the sweep
        after 500, however late that sweep reads it; and a later hit through the
        general path is not shortened by an earlier stamp."""
        balancer, clock = make(scheduler="round_robin")
        xdp = offload(balancer, clock)
        other = "2001:db8:100::2002"
        other_coa = "2001:db8:a1::2002"
        for hoa, coa in ((HOA, COA1), (other, other_coa)):
            assert balancer.inbound(mobile(coa, hoa=hoa)) is not None
        xdp.flush()
        clock.advance(200)
        for hoa, coa in ((HOA, COA1), (other, other_coa)):
            self.assertEqual(run(xdp, "lbproxy_inbound", bytes(mobile(coa, hoa=hoa)))[0],
                             XDP_TX)  # fmt: skip
        clock.advance(50)  # 250: the general path takes one of the other's packets
        assert balancer.inbound(mobile(other_coa, hoa=other)) is not None
        clock.advance(260)  # 510: nothing read the stamps until now
        balancer.sweep()
        self.assertIsNone(balancer.table.get(Key("hoa", address(HOA))))
        later = balancer.table.get(Key("hoa", address(other)))
        assert later is not None
        self.assertEqual((later.expires, later.packets), (550.0, 2))  # not due: not read
        balancer.table.catch_up(later)
        self.assertEqual((later.expires, later.packets), (550.0, 3))

    def test_a_busy_terminal_in_the_driver_is_not_evicted(self) -> None:
        """A full table evicts by what the terminals did, the driver's packets
        included: the idle newcomer goes, not the terminal whose packets (all but its
        first) stayed in the driver."""
        balancer, clock = make(scheduler="round_robin", max_entries=2)
        xdp = offload(balancer, clock)
        idle = "2001:db8:100::2002"
        assert balancer.inbound(mobile(COA1)) is not None
        clock.advance(1)
        assert balancer.inbound(mobile("2001:db8:a1::2002", hoa=idle)) is not None
        xdp.flush()
        for _ in range(10):
            clock.advance(1)
            self.assertEqual(run(xdp, "lbproxy_inbound", bytes(mobile(COA1)))[0], XDP_TX)
        third = "2001:db8:100::3003"
        assert balancer.inbound(mobile("2001:db8:a3::1", hoa=third)) is not None
        self.assertIsNone(balancer.table.get(Key("hoa", address(idle))))
        busy = balancer.table.get(Key("hoa", address(HOA)))
        assert busy is not None
        self.assertEqual(busy.packets, 11)

    def test_a_rewrite_keeps_the_stamps(self) -> None:
        """The program's stamps share the binding's entry: a write of the entry (here an
        operator's move to another backend) carries them over, so no packet forwarded
        before it is lost from the binding's count, none is counted twice, and the
        expiry its last packet gave stands."""
        balancer, clock = make(scheduler="round_robin")
        xdp = offload(balancer, clock)
        assert balancer.inbound(mobile(COA1)) is not None
        binding = balancer.table.peek(Key("hoa", address(HOA)))
        assert binding is not None
        xdp.flush()
        clock.advance(100)
        for _ in range(3):
            self.assertEqual(run(xdp, "lbproxy_inbound", bytes(mobile(COA1)))[0], XDP_TX)
        other = next(b for b in BACKENDS if b.name != binding.backend.name)
        balancer.table.repoint(binding, other)
        xdp.flush()
        clock.advance(10)  # 110
        verdict, out = run(xdp, "lbproxy_inbound", bytes(mobile(COA1)))
        self.assertEqual((verdict, IPv6(out).dst), (XDP_TX, str(other.address)))
        balancer.table.catch_up(binding)
        self.assertEqual((binding.packets, binding.expires), (5, 410.0))
        balancer.table.catch_up(binding)  # told once
        self.assertEqual(binding.packets, 5)

    def test_an_identity_moving_takes_no_packets_with_it(self) -> None:
        """An address identity that moves to another binding (here flushed before the
        binding it leaves is written again) leaves the driver's packets it carried with
        the binding they were forwarded for."""
        balancer, clock = make(scheduler="round_robin")
        xdp = offload(balancer, clock)
        table = balancer.table
        moving = "2001:db8:a8::9"
        first = table.insert(Key("hoa", address(HOA)), BACKENDS[0])
        second = table.insert(Key("hoa", address("2001:db8:100::2")), BACKENDS[1])
        assert first is not None and second is not None
        table.set_care_of(first, address(COA1))
        table.link(first, Key("hoa", address(moving)))
        table.set_care_of(second, address(COA2))
        table.link(second, Key("hoa", address("2001:db8:a9::3")))
        xdp.flush()
        clock.advance(5)
        for _ in range(4):  # packets whose home address option names the alias
            verdict, _out = run(xdp, "lbproxy_inbound", bytes(mobile(COA1, hoa=moving)))
            self.assertEqual(verdict, XDP_TX)
        table.repoint(second, BACKENDS[2])  # the second binding is marked first
        table.rekey(Key("hoa", address("2001:db8:a9::3")), Key("hoa", address(moving)))
        xdp.flush()
        xdp.fold_all()
        self.assertIs(table.peek(Key("hoa", address(moving))), second)
        self.assertEqual((first.packets, second.packets), (5, 1))

    def test_stale_passes_are_recorded_once(self) -> None:
        """Packets passed up as stale record their home address in ``lb_stale`` once,
        however many they are; `sync` writes the entry again, empties the set, and the
        next packets stay in the driver.  Were the set full (here: filled with garbage),
        the pass is counted as unqueued and `sync` finds it by a whole pass, ignoring
        the garbage.  Throughout, the general path finds the terminal's binding alive
        by the driver's stamps where the table's own expiry has passed: it is never
        bound anew."""
        balancer, clock = make(scheduler="round_robin")
        xdp = offload(balancer, clock)
        first = balancer.inbound(mobile(COA1))
        assert first is not None
        binding = balancer.table.peek(Key("hoa", address(HOA)))
        xdp.flush()
        clock.advance(250)
        assert balancer.inbound(mobile(COA1)) is not None  # the table only: 550
        clock.advance(100)  # 350: past what the program was given (300)
        usual = bytes(mobile(COA1))
        for _ in range(3):
            self.assertEqual(run(xdp, "lbproxy_inbound", usual)[0], XDP_PASS)
        self.assertEqual([k for k, _ in xdp.program.stale.items()], [address(HOA)])
        xdp.sync()
        self.assertEqual(list(xdp.program.stale.items()), [])
        self.assertEqual(run(xdp, "lbproxy_inbound", usual)[0], XDP_TX)
        clock.advance(290)  # 640
        assert balancer.inbound(mobile(COA1)) is not None  # the table only: 940
        clock.advance(60)  # 700: stale again (550 and the last packet's 650 passed)
        for i in range(2000):  # the set (two identities per binding of 1,000) full
            xdp.program.stale.update((0x2001_0DB8_00FF << 80 | i).to_bytes(16, "big"), b"\1")
        self.assertEqual(run(xdp, "lbproxy_inbound", usual)[0], XDP_PASS)
        xdp.fold_counters()
        self.assertEqual(xdp.stats()["unqueued"], 1)
        xdp.sync()
        self.assertEqual(list(xdp.program.stale.items()), [])
        self.assertEqual(run(xdp, "lbproxy_inbound", usual)[0], XDP_TX)
        self.assertIs(balancer.table.peek(Key("hoa", address(HOA))), binding)
        self.assertEqual(balancer.table.stats.inserts, 1)

class ReplyTests(SynchronousTestCase):
    skip = SKIP

    def test_reply_from_the_virtual_address(self) -> None:
        """A backend's reply: source := virtual address, a hop less, checksum valid."""
        balancer, clock = make(scheduler="round_robin")
        xdp = offload(balancer, clock)
        for proto, layer in ((17, UDP), (6, TCP)):
            packet = raw_reply(proto, BACKENDS[1].packed, address(HOA), 64, 0, b"reply")
            pkt = IPv6(packet)
            del pkt[layer].chksum
            packet = bytes(pkt)  # a valid checksum, computed by scapy
            verdict, out = run(xdp, "lbproxy_replies", packet)
            self.assertEqual(verdict, XDP_TX)
            got = IPv6(out)
            self.assertEqual((got.src, got.dst, got.hlim), (VIP, HOA, 63))
            self.assertTrue(_reply_checksum_ok(out))

    def test_confirmed_care_of_gets_a_type_2_routing_header(self) -> None:
        """With a confirmed care-of address the reply goes there, the home address in a
        Type 2 Routing Header (RFC 6275 section 6.4); scapy checks the checksum against
        that final destination.  Unconfirmed, it goes to the home address again."""
        balancer, clock = make(scheduler="round_robin")
        xdp = offload(balancer, clock)
        pkt = IPv6(raw_reply(17, BACKENDS[0].packed, address(HOA), 64, 0, b"reply"))
        del pkt[UDP].chksum
        packet = bytes(pkt)
        balancer.return_paths.confirm(address(HOA), address(COA2))
        verdict, out = run(xdp, "lbproxy_replies", packet)
        self.assertEqual(verdict, XDP_TX)
        got = IPv6(out)
        self.assertEqual((got.src, got.dst, got.nh), (VIP, COA2, 43))
        rh = got[IPv6ExtHdrRouting]
        self.assertEqual((rh.type, rh.segleft, rh.addresses), (2, 1, [HOA]))
        self.assertTrue(_reply_checksum_ok(out))
        self.assertEqual(out, bytes(balancer.outbound(bytearray(packet)) or b""))
        balancer.return_paths.unconfirm(address(HOA))
        self.assertEqual(IPv6(run(xdp, "lbproxy_replies", packet)[1]).dst, HOA)

    def test_a_confirmation_reaches_the_program_at_once(self) -> None:
        """A confirmation made, moved to another care-of address or ended (by a
        notification, outside any batch) is in the program's map before the next reply,
        with no `prepare` or sweep in between: its replies never go on to the care-of
        address the terminal left."""
        balancer, clock = make(scheduler="round_robin")
        xdp = offload(balancer, clock)
        pkt = IPv6(raw_reply(17, BACKENDS[0].packed, address(HOA), 64, 0, b"reply"))
        del pkt[UDP].chksum
        frame = ETHERNET + bytes(pkt)
        paths = balancer.return_paths

        def destination() -> str:
            verdict, out = xdp.program.test_run("lbproxy_replies", frame)
            self.assertEqual(verdict, XDP_TX)
            return str(IPv6(out[14:]).dst)

        self.assertEqual(destination(), HOA)
        for care_of in (COA1, COA2):
            paths.confirm(address(HOA), address(care_of), 30.0)
            self.assertEqual(destination(), care_of)
        paths.unconfirm(address(HOA))
        self.assertEqual(destination(), HOA)
        paths.confirm(address(HOA), address(COA1), 30.0)
        clock.advance(31)
        self.assertEqual(paths.expire(), 1)
        self.assertEqual(destination(), HOA)

    def test_not_replies_go_up(self) -> None:
        """Not from a backend, to multicast or link-local, to this host: XDP_PASS."""
        balancer, clock = make(scheduler="round_robin")
        own = address("2001:db8:b0::1")
        balancer.set_own_addresses({own})
        xdp = offload(balancer, clock)
        for source, destination in (
            (address("2001:db8:b0::99"), address(HOA)),
            (BACKENDS[0].packed, address("ff02::1")),
            (BACKENDS[0].packed, address("fe80::1")),
            (BACKENDS[0].packed, own),
        ):
            packet = raw_reply(17, source, destination, 64, 0, b"x")
            self.assertEqual(run(xdp, "lbproxy_replies", packet), (XDP_PASS, packet))


class DecisionTests(SynchronousTestCase):
    """`XdpOffload.decide` (``lbproxyctl trace``) is the program's decision: the same
    packets through both, offloaded exactly where the program returns ``XDP_TX``."""

    skip = SKIP

    def same(self, xdp: XdpOffload, program: str, packet: bytes) -> str:
        """The decision, checked against the program's verdict; its reason."""
        xdp.prepare()
        decision = xdp.decide(packet)  # first: the run stamps and counts
        verdict, _out = xdp.program.test_run(program, ETHERNET + packet)
        self.assertEqual(decision.offloaded, verdict == XDP_TX, (decision, verdict))
        self.assertIn(verdict, (XDP_TX, XDP_PASS))
        return decision.reason

    def test_each_reason_is_the_programs(self) -> None:
        """Every way a terminal's packet or a reply goes up, and both offloaded, with
        the reason an operator reads."""
        from lbproxy.core import actions

        balancer, clock = make(scheduler="round_robin")
        xdp = offload(balancer, clock)
        usual = bytes(mobile(COA1))
        self.assertIn("no binding for home address", self.same(xdp, "lbproxy_inbound", usual))
        assert balancer.inbound(mobile(COA1)) is not None  # the core makes the binding
        reason = self.same(xdp, "lbproxy_inbound", usual)
        self.assertIn("to srv", reason)
        self.assertEqual(xdp.decide(usual).text()[:20], "would be offloaded (")
        cases = {
            "hop limit 1": raw_mobile(17, address(HOA), address(COA1), 1, 80, 0, b"x"),
            "not the binding's care-of": bytes(mobile(COA2)),
            "payload length": usual[:-1],
            "neither UDP nor a full TCP": usual[:40] + bytes([58]) + usual[41:],
            "PadN(2)": usual[:42] + b"\x01\x03" + usual[44:],
            "no Destination Options": bytes(IPv6(src=HOA, dst=VIP) / UDP(dport=80) / (b"x" * 40)),
        }
        for words, packet in cases.items():
            self.assertIn(words, self.same(xdp, "lbproxy_inbound", packet), words)
        balancer.set_virtual_addresses([ipaddress.IPv6Address(VIP)], [443])
        self.assertIn("port 80 is not served", self.same(xdp, "lbproxy_inbound", usual))
        balancer.set_virtual_addresses([ipaddress.IPv6Address(VIP)], [])
        binding = balancer.table.get(Key("hoa", address(HOA)))
        assert binding is not None
        name = binding.backend.name
        balancer.set_backend_up(name, False)
        self.assertIn(f"out of the driver: backend {name} is down",
                      self.same(xdp, "lbproxy_inbound", usual))
        balancer.set_backend_up(name, True)
        clock.advance(301)
        self.assertIn("expired", self.same(xdp, "lbproxy_inbound", usual))
        actions.forget(balancer, Key("hoa", address(HOA)))
        self.assertIn("no binding", self.same(xdp, "lbproxy_inbound", usual))

        reply = raw_reply(17, BACKENDS[0].packed, address(HOA), 64, 0, b"r")
        self.assertEqual(self.same(xdp, "lbproxy_replies", reply)[:len(HOA) + 3], f"to {HOA}")
        balancer.return_paths.confirm(address(HOA), address(COA2))
        self.assertIn(f"confirmed care-of address {COA2}",
                      self.same(xdp, "lbproxy_replies", reply))
        for words, packet in {
            "not a backend": raw_reply(17, address(COA1), address(HOA), 64, 0, b"r"),
            "multicast or link-local": raw_reply(17, BACKENDS[0].packed,
                                                 address("ff02::1"), 64, 0, b"r"),
            "not UDP or TCP": reply[:6] + bytes([58]) + reply[7:],
            "hop limit": raw_reply(17, BACKENDS[0].packed, address(HOA), 1, 0, b"r"),
        }.items():  # fmt: skip
            self.assertIn(words, self.same(xdp, "lbproxy_replies", packet), words)
        balancer.set_backends(BACKENDS[1:])
        self.assertIn("a backend no longer configured", self.same(xdp, "lbproxy_replies", reply))

    def test_any_byte_changed(self) -> None:
        """Each byte of the headers of an offloaded packet, in each direction, changed
        to a few values: the decision follows the program every time."""
        balancer, clock = make(scheduler="round_robin")
        xdp = offload(balancer, clock)
        assert balancer.inbound(mobile(COA1)) is not None
        balancer.set_own_addresses({address("2001:db8:b0::1")})
        inbound = bytes(mobile(COA1))
        reply = raw_reply(6, BACKENDS[1].packed, address(HOA), 64, 0, b"reply" * 4)
        offloaded = 0
        for program, packet, header in (("lbproxy_inbound", inbound, 68),
                                        ("lbproxy_replies", reply, 60)):  # fmt: skip
            for at in range(header):
                for value in {0, 1, 0xFF, packet[at] ^ 0x01, packet[at] ^ 0x80}:
                    changed = packet[:at] + bytes([value]) + packet[at + 1 :]
                    self.same(xdp, program, changed)
                    offloaded += xdp.program.test_run(program, ETHERNET + changed)[0] == XDP_TX
        self.assertGreater(offloaded, 100)  # both outcomes were compared, many times


class OperatorViewTests(SynchronousTestCase):
    """``lbproxyctl show`` and ``trace`` with the XDP executor (`Control`'s ``offload``)."""

    skip = SKIP

    def test_show_takes_the_programs_last_seen(self) -> None:
        """A terminal whose packets stay in the driver is not idle in ``show``, before
        any sweep folds the program's stamps into the table: its row's idle time, lifetime
        left and packets are the program's; an idle terminal's are the table's."""
        from lbproxy.ops.control import Control

        balancer, clock = make(scheduler="round_robin")
        xdp = offload(balancer, clock)
        idle = "2001:db8:100::2002"
        for hoa, coa in ((HOA, COA1), (idle, "2001:db8:a1::2002")):
            assert balancer.inbound(mobile(coa, hoa=hoa)) is not None
        clock.advance(250)
        self.assertEqual(run(xdp, "lbproxy_inbound", bytes(mobile(COA1)))[0], XDP_TX)
        clock.advance(1)
        without = {r.key: r for r in Control(balancer, clock).rows()}
        rows = {r.key: r for r in Control(balancer, clock, offload=lambda: xdp).rows()}
        busy, quiet = f"addr {HOA}", f"addr {idle}"
        # The table alone (no sweep since): idle for 251 s, 49 s left, one packet.
        self.assertEqual((without[busy].idle, without[busy].left), (251.0, 49.0))
        self.assertEqual(without[busy].packets, 1)
        self.assertEqual((rows[busy].idle, rows[busy].left, rows[busy].packets), (1.0, 299.0, 2))
        self.assertEqual((rows[quiet].idle, rows[quiet].left, rows[quiet].packets),
                         (251.0, 49.0, 1))  # fmt: skip
        self.assertIn(" 1.0 ", Control(balancer, clock, offload=lambda: xdp).show())
        xdp.fold_all()  # the whole fold (a snapshot's): the table now agrees
        table = {r.key: r for r in Control(balancer, clock).rows()}
        self.assertEqual((table[busy].left, table[busy].packets), (299.0, 2))
        self.assertEqual(Control(balancer, clock, offload=lambda: xdp).rows()[0], table[busy])

    def test_trace_says_whether_the_program_would_forward_it(self) -> None:
        """``trace``'s ``xdp`` entry: offloaded for an established terminal's usual packet,
        not (with the reason) for a miss; absent without the executor."""
        from lbproxy.ops.control import Control
        from lbproxy.ops.ctl import render

        balancer, clock = make(scheduler="round_robin")
        xdp = offload(balancer, clock)
        control = Control(balancer, clock, offload=lambda: xdp)
        usual = bytes(mobile(COA1)).hex()
        miss = control.trace_dict(usual)
        self.assertFalse(miss["hit"])
        self.assertEqual((miss["xdp"]["offloaded"], miss["xdp"]["direction"]),
                         (False, "inbound"))  # fmt: skip
        self.assertIn("no binding for home address", miss["xdp"]["reason"])
        self.assertIn("xdp: not offloaded: no binding", render("trace", miss))
        assert balancer.inbound(mobile(COA1)) is not None
        xdp.flush()
        hit = control.trace_dict(usual)
        self.assertTrue(hit["hit"])
        self.assertTrue(hit["xdp"]["offloaded"], hit)
        self.assertIn(f"to {hit['backend']}", hit["xdp"]["reason"])
        self.assertIn("xdp: would be offloaded (to ", render("trace", hit))
        self.assertEqual(xdp.stats()["packets"], 0)  # nothing ran, nothing counted
        self.assertIsNone(Control(balancer, clock).trace_dict(usual)["xdp"])
        self.assertNotIn("xdp:", render("trace", Control(balancer, clock).trace_dict(usual)))


class LoaderTests(SynchronousTestCase):
    def test_missing_object_is_a_reason(self) -> None:
        """No object: `available` says so in one line (what `auto` logs)."""
        reason = available("/nonexistent/lbproxy.bpf.o")
        self.assertIsNotNone(reason)
        assert reason is not None
        self.assertIn("/nonexistent/lbproxy.bpf.o", reason)


# -- attached to a veth in driver mode ---------------------------------------------------

_RECEIVE = """
import socket, sys, select, time
s = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(0x86DD))
s.bind((sys.argv[1], 0))
print("ready", flush=True)
end = time.monotonic() + float(sys.argv[2])
while time.monotonic() < end:
    if select.select([s], [], [], 0.1)[0]:
        frame, info = s.recvfrom(65535)
        if info[2] != socket.PACKET_OUTGOING:
            print(frame[14:].hex(), flush=True)
"""

_SEND = """
import socket, sys
s = socket.socket(socket.AF_PACKET, socket.SOCK_RAW)
s.bind((sys.argv[1], 0))
for _ in range(int(sys.argv[3])):
    s.send(bytes.fromhex(sys.argv[2]))
"""


def _sh(*commands: str) -> None:
    import subprocess

    for command in commands:
        subprocess.run(command, shell=True, check=True, capture_output=True)


class _InNamespace:
    """`with _InNamespace(name):` -- this process in network namespace `name` (for the
    interface-index calls), back in its own afterwards."""

    def __init__(self, name: str) -> None:
        self.name = name

    def __enter__(self) -> None:
        import ctypes

        self.libc = ctypes.CDLL(None, use_errno=True)
        self.home = os.open("/proc/self/ns/net", os.O_RDONLY)
        target = os.open(f"/run/netns/{self.name}", os.O_RDONLY)
        try:
            if self.libc.setns(target, 0x40000000) != 0:  # CLONE_NEWNET
                raise OSError(ctypes.get_errno(), "setns")
        finally:
            os.close(target)

    def __exit__(self, *_: object) -> None:
        self.libc.setns(self.home, 0x40000000)
        os.close(self.home)


class AttachedTests(SynchronousTestCase):
    """The program in driver mode on a veth: a terminal's packet, sent on the wire,
    arrives at the backend rewritten without entering the balancer's user space."""

    skip = SKIP

    NS = ("xdpt-term", "xdpt-lb", "xdpt-srv")

    def setUp(self) -> None:
        import shutil

        if shutil.which("ip") is None or shutil.which("ethtool") is None:
            raise self.skipTest("needs ip and ethtool (make system-deps)")
        term, lb, srv = self.NS
        ends = ((term, "t0"), (lb, "c0"), (lb, "s0"), (srv, "b0"))
        self.addCleanup(self._down)
        self._down()
        _sh(
            *(f"ip netns add {n}" for n in self.NS),
            f"ip link add t0 netns {term} type veth peer name c0 netns {lb}",
            f"ip link add s0 netns {lb} type veth peer name b0 netns {srv}",
            f"ip -n {term} addr add {COA1}/64 dev t0 nodad",
            f"ip -n {lb} addr add 2001:db8:a1::1/64 dev c0 nodad",
            f"ip -n {lb} addr add 2001:db8:b0::1/64 dev s0 nodad",
            f"ip -n {srv} addr add {BACKENDS[0].address}/64 dev b0 nodad",
            *(f"ip -n {n} link set {d} up" for n, d in ends),
            f"ip netns exec {lb} sysctl -qw net.ipv6.conf.all.forwarding=1",
            # XDP_REDIRECT into a veth needs GRO (or an XDP program) on its peer.
            f"ip netns exec {srv} ethtool -K b0 gro on",
            # The backend's neighbour entry (the FIB lookup's next hop).
            f"ip -n {lb} neigh replace {BACKENDS[0].address} dev s0 nud permanent lladdr"
            f" $(ip netns exec {srv} cat /sys/class/net/b0/address)",
            # Carrier comes up asynchronously (link watch): wait for every end.
            *(f"for i in $(seq 50); do [ $(ip netns exec {n} cat /sys/class/net/{d}/carrier)"
              f" = 1 ] && break; sleep 0.1; done" for n, d in ends),
        )

    def _down(self) -> None:
        for n in self.NS:
            _sh(f"ip netns del {n} 2>/dev/null || true")

    def through(self, frame: bytes, count: int, seconds: str) -> list[IPv6]:
        """Send `frame` `count` times from the terminal's link; every IPv6 packet the
        backend's link received within `seconds`."""
        import subprocess
        import sys

        term, _lb, srv = self.NS
        receiver = subprocess.Popen(
            ["ip", "netns", "exec", srv, sys.executable, "-c", _RECEIVE, "b0", seconds],
            stdout=subprocess.PIPE, text=True,
        )  # fmt: skip
        assert receiver.stdout is not None
        self.assertEqual(receiver.stdout.readline().strip(), "ready")
        subprocess.run(["ip", "netns", "exec", term, sys.executable, "-c", _SEND, "t0",
                        frame.hex(), str(count)], check=True)  # fmt: skip
        out, _ = receiver.communicate(timeout=10)
        return [IPv6(bytes.fromhex(line)) for line in out.split()]

    def test_forwarded_in_the_driver(self) -> None:
        import subprocess

        _term, lb, _srv = self.NS
        balancer, clock = make(scheduler="round_robin")
        balancer.set_backends([BACKENDS[0]])
        balancer.sweep()  # the removed backends had no bindings: forgotten
        self.assertIsNone(balancer.policy.fast_inbound)
        xdp = XdpOffload(balancer, clock, program=XdpProgram(max_bindings=1000))
        self.addCleanup(xdp.close)
        # The binding, made by the core (the raw-socket path's first packet).
        assert balancer.inbound(mobile(COA1)) is not None
        xdp.prepare()
        with _InNamespace(lb):
            xdp.attach("c0", "s0")
        mac = subprocess.run(
            ["ip", "netns", "exec", lb, "cat", "/sys/class/net/c0/address"],
            capture_output=True, text=True, check=True,
        ).stdout.strip().replace(":", "")  # fmt: skip
        frame = bytes.fromhex(mac + "020000000001" + "86dd") + bytes(mobile(COA1))
        got = self.through(frame, 5, "3")
        ours = [p for p in got if p.dst == str(BACKENDS[0].address) and UDP in p]
        xdp.sync()
        self.assertEqual(len(ours), 5, (xdp.stats(), [p.summary() for p in got]))
        for pkt in ours:
            self.assertEqual((pkt.src, pkt.hlim), (HOA, 63))
            self.assertNotIn(IPv6ExtHdrDestOpt, pkt)
            self.assertEqual(bytes(pkt[UDP].payload), b"hello")
        self.assertEqual(xdp.stats()["packets"], 5)
        binding = balancer.table.get(Key("hoa", address(HOA)))
        assert binding is not None
        balancer.table.catch_up(binding)  # what a sweep or a snapshot asks for
        self.assertEqual(binding.packets, 6)

    def test_next_hop_from_user_space(self) -> None:
        """With the backend's next hop given (`XdpOffload.set_next_hops`) the program
        forwards without the kernel's neighbour entry; without either, it hands the
        packets up (no route, counted)."""
        import subprocess

        _term, lb, srv = self.NS
        balancer, clock = make(scheduler="round_robin")
        balancer.set_backends([BACKENDS[0]])
        balancer.sweep()
        xdp = XdpOffload(balancer, clock, program=XdpProgram(max_bindings=1000))
        self.addCleanup(xdp.close)
        assert balancer.inbound(mobile(COA1)) is not None
        xdp.prepare()
        with _InNamespace(lb):
            xdp.attach("c0", "s0")
        _sh(f"ip -n {lb} neigh del {BACKENDS[0].address} dev s0")

        def read(name: str, ns: str, what: str) -> str:
            return subprocess.run(["ip", "netns", "exec", ns, "cat",
                                   f"/sys/class/net/{name}/{what}"], capture_output=True,
                                  text=True, check=True).stdout.strip()  # fmt: skip

        mac = bytes.fromhex(read("c0", lb, "address").replace(":", ""))
        frame = mac + bytes.fromhex("020000000001" "86dd") + bytes(mobile(COA1))

        def send(count: int) -> list[IPv6]:
            got = self.through(frame, count, "2")
            return [p for p in got if p.dst == str(BACKENDS[0].address) and UDP in p]

        self.assertEqual(send(3), [])  # the kernel has no neighbour: up, no route
        xdp.fold_counters()
        self.assertEqual(xdp.stats()["no_route"], 3)
        their = bytes.fromhex(read("b0", srv, "address").replace(":", ""))
        ours = bytes.fromhex(read("s0", lb, "address").replace(":", ""))
        xdp.set_next_hops({BACKENDS[0].packed: (int(read("s0", lb, "ifindex")), their + ours,
                                                1500)})  # fmt: skip
        arrived = send(4)
        self.assertEqual(len(arrived), 4, xdp.stats())
        for pkt in arrived:
            self.assertEqual((pkt.src, pkt.hlim), (HOA, 63))
        xdp.fold_counters()
        self.assertEqual((xdp.stats()["packets"], xdp.stats()["no_route"]), (4, 3))
