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


class RefreshTests(SynchronousTestCase):
    """Claim 10 through the driver: the program stamps, `sync` folds the stamps in."""

    skip = SKIP

    def test_traffic_only_through_xdp_keeps_a_binding(self) -> None:
        """A terminal whose packets after the first all go through the program is not
        expired at its first lifetime's end; an idle one is, by the first sweep after
        its lifetime; the table's expiry and counts are those the general path gives."""
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
        self.assertEqual(xdp.sync(), 1)
        clock.advance(101)  # 301: the first packets' lifetime (300 s) is over
        balancer.sweep()
        kept = balancer.table.get(Key("hoa", address(HOA)))
        assert kept is not None
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


class LoaderTests(SynchronousTestCase):
    def test_missing_object_is_a_reason(self) -> None:
        """No object: `available` says so in one line (what `auto` logs)."""
        reason = available("/nonexistent/lbproxy.bpf.o")
        self.assertIsNotNone(reason)
        assert reason is not None
        self.assertIn("/nonexistent/lbproxy.bpf.o", reason)
