"""The data path end to end: real packets, real kernels, the balancer under twistd.

Each test builds the network test bed (docs/testbed.md) in fresh network namespaces, starts
``twistd -n lbproxy`` in the balancer's namespace exactly as an operator would, and drives
real Linux TCP/UDP endpoints through it.  What crossed the wire is captured with AF_PACKET
sockets and dissected by scapy, the independent oracle.  Needs root; without it every test
skips with the reason.

The ``Xdp*`` classes run with ``[balancer] offload = "xdp"`` (docs/xdp.md) in a bed made
for it: the same tests with the program attached, and `XdpOffloadTests`, what the program
itself forwards (most of the 50 moving terminals' packets, transparent mode) and claim 10
when a terminal's packets never leave the driver.
"""

from __future__ import annotations

import ipaddress
import os
import socket
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from scapy.layers.inet import TCP, UDP
from scapy.layers.inet6 import (
    HAO,
    ICMPv6EchoRequest,
    IPv6,
    IPv6ExtHdrDestOpt,
)
from scapy.layers.ipsec import ESP, SecurityAssociation
from scapy.packet import Packet, Raw
from twisted.trial.unittest import SkipTest, SynchronousTestCase

from lbproxy.testbed import addresses
from lbproxy.testbed.balancer import BedBalancer, bed_config
from lbproxy.testbed.bed import TestBed
from tests.bedtools import Capture, l4_checksum_ok, require_bed

VIP = str(addresses.VIP)


class BedTestCase(SynchronousTestCase):
    """Builds a bed and a balancer per test and always tears both down."""

    terminals = 5
    #: Build the bed for the balancer's XDP executor (`TestBed(xdp=True)`).
    bed_xdp = False
    #: ``[balancer] offload`` for every balancer of the class (None: left out).
    offload: str | None = None

    def setUp(self) -> None:
        require_bed()

    @contextmanager
    def running(self, terminals: int | None = None, **config: Any) -> Iterator[
        tuple[TestBed, BedBalancer]
    ]:
        bed = TestBed(terminals=terminals or self.terminals, backends=3, xdp=self.bed_xdp)
        self.addCleanup(bed.stop)
        bed.start()
        if self.offload is not None:
            config.setdefault("offload", self.offload)
        balancer = BedBalancer(bed, bed_config(bed, **config))
        self.addCleanup(balancer.stop)
        balancer.start()
        try:
            yield bed, balancer
        finally:
            balancer.stop()
            self.assertNotIn("Traceback", balancer.log())

    def send_frames(self, bed: TestBed, role: str, ifname: str, dst_mac: str,
                    packets: list[bytes]) -> None:
        """Send raw IPv6 packets as Ethernet frames out of `ifname` in `role`."""
        sock = bed.socket(role, socket.AF_PACKET, socket.SOCK_RAW)
        try:
            sock.bind((ifname, 0))
            header = bytes.fromhex(dst_mac.replace(":", "")) + bytes(6) + b"\x86\xdd"
            for pkt in packets:
                sock.send(header + pkt)
        finally:
            sock.close()


class HomeAddressTranslateTests(BedTestCase):
    def test_fifty_moving_terminals_stay_put(self) -> None:
        """Must-show 1: 50 terminals, TCP both ways, three care-of addresses each: every
        byte arrives, no resets, and each terminal's flows were all served by one backend;
        every packet the balancer emitted has checksums valid by scapy's computation
        (must-show 4)."""
        with self.running(terminals=50, key_chain=("hoa", "src")) as (bed, balancer):
            to_backends = Capture(bed, "srv1", "eth0")
            to_terminals = Capture(bed, "net", "lbn")
            self.addCleanup(to_backends.close)
            self.addCleanup(to_terminals.close)
            report = bed.workload(moves=[2, 3], connections=2, chunks=9, timeout=240)
            summary = report["summary"]
            self.assertEqual(summary["connections"], 100, summary)
            self.assertEqual(summary["errors"], 0, summary)
            self.assertEqual(summary["ok"], 100, summary)
            self.assertEqual(summary["moves_failed"], 0, summary)
            self.assertEqual(summary["moves"], 100, summary)
            for index, terminal in report["terminals"].items():
                self.assertEqual(len(terminal["backends"]), 1, (index, terminal))
                for conn in terminal["connections"]:
                    self.assertIsNone(conn["error"], conn)
                    self.assertEqual(conn["bytes_ok"], conn["bytes_sent"], conn)
                    # translate mode: the backend saw the home address, not a CoA
                    self.assertEqual(conn["peer"], terminal["hoa"])
            # the backends' own logs agree with what the terminals were told
            for index, terminal in report["terminals"].items():
                served = bed.served_by(terminal["hoa"])
                self.assertEqual(served, terminal["backends"], index)
            table = balancer.ctl("show")
            self.assertEqual(table["total"], 50)
            self.assertEqual({row["kind"] for row in table["rows"]}, {"addr"})
            stats = balancer.ctl("stats")
            self.assertEqual(stats["misses"], {"hoa": 50})
            self.assertEqual(stats["dropped"], {})
            # both directions took the fast path (lbproxy.io.fastpath) for most packets
            fast = stats["ports"]["fast_path"]
            self.assertGreater(fast["forwarded"], stats["packets_in"] // 2, stats)
            self.assertGreater(fast["replies"], stats["replies_in"] // 2, stats)
            self.assertEqual(fast["errors"], 0)

            emitted = [p for p in to_backends.packets() if p.src != "fe80::"]
            emitted = [p for p in emitted if TCP in p or UDP in p]
            back = [p for p in to_terminals.packets() if p.src == VIP]
            self.assertGreater(len(emitted), 100)
            self.assertGreater(len(back), 100)
            for pkt in emitted + back:
                self.assertTrue(l4_checksum_ok(pkt), pkt.summary())
            for pkt in emitted:
                self.assertNotIn(IPv6ExtHdrDestOpt, pkt)  # translate: HAO removed


class OtherKeysTests(BedTestCase):
    def datagrams(self, bed: TestBed, role: str, ifname: str, router_mac: str,
                  sources: list[str], count: int = 4) -> None:
        """UDP datagrams from `sources` (no HAO) to the VIP's UDP echo port."""
        packets = [
            bytes(IPv6(src=src, dst=VIP) / UDP(sport=40000 + i, dport=addresses.UDP_PORT)
                  / f"probe {src} {i}".encode())
            for src in sources
            for i in range(count)
        ]
        self.send_frames(bed, role, ifname, router_mac, packets)

    def test_source_address_key_at_home(self) -> None:
        """Must-show 2a: a terminal at home (no HAO) is keyed by its source address."""
        with self.running(key_chain=("hoa", "src"), scheduler="round_robin") as (bed, lb):
            homes = [f"2001:db8:100::{0x2000 + i:x}" for i in range(6)]
            self.datagrams(bed, "ha", "home", bed.mac("net", "home"), homes)
            time.sleep(0.5)
            for home in homes:
                self.assertEqual(len(bed.served_by(home)), 1, home)
            rows = lb.ctl("show")["rows"]
            self.assertEqual(sorted(r["key"] for r in rows), sorted(f"addr {h}" for h in homes))
            # round robin spread the six over the three backends
            self.assertEqual(len({r["backend"] for r in rows}), 3)

    def test_interface_id_key_moving_without_hao(self) -> None:
        """Must-show 2b: an EUI-64 terminal moving between prefixes without an HAO keeps
        its backend through the interface-ID key; a privacy address does not get one."""
        with self.running(key_chain=("hoa", "iid", "src"), scheduler="round_robin") as (
            bed, lb
        ):
            iid = "211:22ff:fe33:4455"  # universal EUI-64: u bit set, ff:fe in the middle
            for link in (1, 2, 3, 1):
                src = f"2001:db8:a{link}::{iid}"
                self.datagrams(bed, "term", f"acc{link}", bed.mac("net", f"acc{link}"), [src])
            time.sleep(0.5)
            served = {
                name
                for link in (1, 2, 3)
                for name in bed.served_by(str(ipaddress.IPv6Address(f"2001:db8:a{link}::{iid}")))
            }
            self.assertEqual(len(served), 1, served)
            rows = lb.ctl("show")["rows"]
            self.assertEqual([r["key"] for r in rows], ["iid 0211:22ff:fe33:4455"])
            self.assertEqual(rows[0]["packets"], 16)
            # an RFC 8981 style random IID is not an identity: keyed by source instead
            self.datagrams(bed, "term", "acc1", bed.mac("net", "acc1"),
                           ["2001:db8:a1::8d3c:51ad:1b2e:9f01"], count=1)
            time.sleep(0.3)
            kinds = sorted(r["kind"] for r in lb.ctl("show")["rows"])
            self.assertEqual(kinds, ["addr", "iid"])


class EspTests(BedTestCase):
    def test_esp_spi_keeps_backend_and_decrypts(self) -> None:
        """Must-show 3: ESP packets (scapy SecurityAssociation) keep their backend across
        a care-of address change and the backend's SA decrypts them intact."""
        with self.running(key_chain=("hoa", "spi", "src")) as (bed, lb):
            key = bytes(range(16))
            sa = SecurityAssociation(ESP, spi=0x1234, crypt_algo="AES-CBC", crypt_key=key,
                                     auth_algo="HMAC-SHA1-96", auth_key=bytes(20),
                                     tunnel_header=None)
            captures = {i: Capture(bed, f"srv{i}", "eth0") for i in bed.backend_indices}
            for c in captures.values():
                self.addCleanup(c.close)
            inner_payloads = []
            for n, link in enumerate((1, 2, 3)):
                coa = f"2001:db8:a{link}::1099"
                payload = f"secret order {n}".encode()
                inner_payloads.append(payload)
                clear = IPv6(src=coa, dst=VIP) / UDP(sport=5000, dport=5001) / payload
                enc = sa.encrypt(clear)
                self.send_frames(bed, "term", f"acc{link}", bed.mac("net", f"acc{link}"),
                                 [bytes(enc)])
            time.sleep(0.5)
            seen = {i: [p for p in c.packets() if ESP in p] for i, c in captures.items()}
            holders = [i for i, pkts in seen.items() if pkts]
            self.assertEqual(len(holders), 1, {i: len(p) for i, p in seen.items()})
            got = seen[holders[0]]
            self.assertEqual(len(got), 3)
            for pkt, payload in zip(got, inner_payloads, strict=True):
                self.assertEqual(pkt[ESP].spi, 0x1234)
                self.assertEqual(pkt.dst, str(addresses.backend_address(holders[0])))
                clear = sa.decrypt(pkt)
                self.assertEqual(bytes(clear[UDP].payload), payload)
            rows = lb.ctl("show")["rows"]
            self.assertEqual([r["key"] for r in rows], ["spi 0x00001234"])


class MalformedTests(BedTestCase):
    def test_malformed_dropped_good_flows_unaffected(self) -> None:
        """Must-show 5: malformed packets mixed into live traffic are counted by reason
        and dropped; the good TCP flows are unaffected and the log has no traceback."""
        with self.running(terminals=10, key_chain=("hoa", "src")) as (bed, lb):
            coa, hoa = "2001:db8:a1::4001", "2001:db8:100::4001"

            def good() -> Packet:
                return IPv6(src=coa, dst=VIP) / IPv6ExtHdrDestOpt(options=[HAO(hoa=hoa)])

            two_haos = bytes(IPv6(src=coa, dst=VIP) / IPv6ExtHdrDestOpt(
                options=[HAO(hoa=hoa), HAO(hoa="2001:db8:100::4002")]) / UDP())
            bad_hao_len = bytearray(bytes(good() / UDP()))
            bad_hao_len[40 + 7] = 14  # HAO option length 14, not 16
            over_len = bytearray(bytes(good() / UDP()))
            over_len[41] = 9  # Destination Options length past the end
            truncated = bytes(good() / UDP())[:46]
            truncated = bytes(IPv6(src=coa, dst=VIP, plen=6, nh=60)) + truncated[40:46]
            # random option bytes behind a Destination Options header that overruns
            garbage = bytes(IPv6(src=coa, dst=VIP, nh=60, plen=32)) + b"\x11\x07" + (
                os.urandom(30))
            not_v6 = bytearray(bytes(good() / UDP()))
            not_v6[0] = 0x45  # an IPv4 header's first byte, to the virtual address
            mix = [two_haos, bytes(bad_hao_len), bytes(over_len), truncated, bytes(not_v6)]
            lbc = bed.mac("lb", "lbc")
            before = lb.ctl("stats")
            for _ in range(20):
                self.send_frames(bed, "net", "lbn", lbc, mix)
            report = bed.workload(moves=[2], chunks=6, timeout=120)
            for _ in range(20):
                self.send_frames(bed, "net", "lbn", lbc, [*mix, garbage])
            time.sleep(0.3)
            summary = report["summary"]
            self.assertEqual((summary["ok"], summary["errors"]), (10, 0), summary)
            stats = lb.ctl("stats")
            dropped = stats["dropped"]
            self.assertEqual(before["dropped"], {})
            self.assertEqual(dropped.get("duplicate-hao"), 40, dropped)
            self.assertEqual(dropped.get("bad-hao-length"), 40, dropped)
            self.assertEqual(dropped.get("not-ipv6"), 40, dropped)
            # over_len, truncated and garbage: 40 + 40 + 20, as truncated or bad lengths
            self.assertEqual(dropped.get("truncated", 0) + dropped.get("bad-option-length", 0)
                             + dropped.get("bad-payload-length", 0), 100, dropped)
            self.assertEqual(sum(dropped.values()), 220, dropped)
            self.assertEqual(stats["misses"], {"hoa": 10})


class TransparentTests(BedTestCase):
    def test_transparent_forwards_hao_unchanged(self) -> None:
        """Must-show 6: in transparent mode the backend receives the HAO unchanged, the
        destination rewritten, the checksum valid (pseudo-header source = home address)."""
        with self.running(mode="transparent", key_chain=("hoa", "src")) as (bed, _):
            captures = {i: Capture(bed, f"srv{i}", "eth0") for i in bed.backend_indices}
            for c in captures.values():
                self.addCleanup(c.close)
            hoa, coa = "2001:db8:100::1777", "2001:db8:a2::1777"
            sent = IPv6(src=coa, dst=VIP) / IPv6ExtHdrDestOpt(options=[HAO(hoa=hoa)]) / UDP(
                sport=7, dport=addresses.UDP_PORT) / b"mip6-aware backend"
            self.send_frames(bed, "term", "acc2", bed.mac("net", "acc2"), [bytes(sent)])
            time.sleep(0.5)
            got = [p for c in captures.values() for p in c.packets() if HAO in p]
            self.assertEqual(len(got), 1)
            pkt = got[0]
            self.assertIn(pkt.dst, [str(addresses.backend_address(i))
                                    for i in bed.backend_indices])
            self.assertEqual(pkt.src, coa)
            self.assertEqual(bytes(pkt[IPv6ExtHdrDestOpt])[:24],
                             bytes(sent[IPv6ExtHdrDestOpt])[:24])
            self.assertEqual(pkt[HAO].hoa, hoa)
            self.assertEqual(bytes(pkt[UDP].payload), b"mip6-aware backend")
            self.assertTrue(l4_checksum_ok(pkt))
            self.assertEqual(pkt.hlim, sent.hlim - 2)  # the router and the balancer


class IcmpTests(BedTestCase):
    def test_echo_through_virtual_address(self) -> None:
        """ICMPv6 echo to the virtual address is balanced and answered with valid checksums."""
        with self.running(key_chain=("hoa", "src")) as (bed, _):
            cap = Capture(bed, "net", "lbn")
            self.addCleanup(cap.close)
            probe = IPv6(src="2001:db8:100::2222", dst=VIP) / ICMPv6EchoRequest(
                id=1, seq=1, data=b"ping")
            self.send_frames(bed, "ha", "home", bed.mac("net", "home"), [bytes(probe)])
            time.sleep(0.5)
            replies = [p for p in cap.packets() if p.src == VIP]
            self.assertEqual(len(replies), 1, [p.summary() for p in cap.packets()])
            self.assertEqual(replies[0].dst, "2001:db8:100::2222")
            self.assertTrue(l4_checksum_ok(replies[0]))
            self.assertEqual(bytes(replies[0][Raw]) if Raw in replies[0] else
                             replies[0].data, b"ping")


def _no_xdp() -> str | None:
    """Why the XDP executor cannot run here (None: it can)."""
    if os.geteuid() != 0:
        return "the XDP executor needs root"
    from lbproxy.io.xdp import available

    return available()


class XdpBed(BedTestCase):
    """The bed with ``[balancer] offload = "xdp"`` (docs/xdp.md): the usual packets of
    established bindings never reach the balancer's user space.  The bed gives the
    balancer's links what the program needs (`TestBed(xdp=True)`)."""

    bed_xdp = True
    offload = "xdp"

    def setUp(self) -> None:
        super().setUp()
        why = _no_xdp()
        if why:
            raise SkipTest(why)


# What the Python paths must decide stays theirs with the program attached: the same
# tests, the same outcomes.
class XdpOtherKeysTests(XdpBed, OtherKeysTests):
    pass


class XdpEspTests(XdpBed, EspTests):
    pass


class XdpMalformedTests(XdpBed, MalformedTests):
    pass


class XdpTransparentTests(XdpBed, TransparentTests):
    pass


class XdpIcmpTests(XdpBed, IcmpTests):
    pass


class XdpOffloadTests(XdpBed):
    """What the program itself forwards, through twistd in the bed."""

    def test_fifty_moving_terminals_offloaded(self) -> None:
        """Must-show 2 of issue 12: 50 terminals, TCP both ways, three care-of addresses
        each, with the XDP executor: every byte arrives, each terminal stays on one
        backend, checksums are valid by scapy, and most packets in each direction were
        forwarded by the program (its own counters), not by the Python paths."""
        with self.running(terminals=50, key_chain=("hoa", "src"), offload="xdp") as (
            bed, balancer
        ):
            to_backends = Capture(bed, "srv1", "eth0")
            to_terminals = Capture(bed, "net", "lbn")
            self.addCleanup(to_backends.close)
            self.addCleanup(to_terminals.close)
            report = bed.workload(moves=[2, 3], connections=2, chunks=9, timeout=240)
            summary = report["summary"]
            self.assertEqual(summary["connections"], 100, summary)
            self.assertEqual((summary["ok"], summary["errors"]), (100, 0), summary)
            self.assertEqual((summary["moves"], summary["moves_failed"]), (100, 0), summary)
            for index, terminal in report["terminals"].items():
                self.assertEqual(len(terminal["backends"]), 1, (index, terminal))
                for conn in terminal["connections"]:
                    self.assertIsNone(conn["error"], conn)
                    self.assertEqual(conn["bytes_ok"], conn["bytes_sent"], conn)
                    self.assertEqual(conn["peer"], terminal["hoa"])
                self.assertEqual(bed.served_by(terminal["hoa"]), terminal["backends"], index)
            time.sleep(1.2)  # a sweep or two: the program's stamps and counts folded in
            stats = balancer.ctl("stats")
            self.assertEqual(stats["misses"], {"hoa": 50})
            self.assertEqual(stats["dropped"], {})
            self.assertEqual(balancer.ctl("show")["total"], 50)
            xdp = stats["ports"]["xdp"]
            self.assertEqual(xdp["active"], 1, stats["ports"])
            self.assertGreater(xdp["forwarded"], stats["packets_in"] // 2, stats)
            self.assertGreater(xdp["replies"], stats["replies_in"] // 2, stats)
            self.assertGreater(xdp["forwarded_bytes"], 60 * xdp["forwarded"])
            self.assertGreater(xdp["reply_bytes"], 60 * xdp["replies"])
            self.assertEqual(xdp["no_route"], 0, xdp)
            # What went up is what the Python paths forwarded: the rest.
            fast = stats["ports"]["fast_path"]
            self.assertLess(fast["forwarded"], xdp["forwarded"], stats)

            emitted = [p for p in to_backends.packets() if TCP in p or UDP in p]
            back = [p for p in to_terminals.packets() if p.src == VIP]
            self.assertGreater(len(emitted), 100)
            self.assertGreater(len(back), 100)
            for pkt in emitted + back:
                self.assertTrue(l4_checksum_ok(pkt), pkt.summary())
            for pkt in emitted:
                self.assertNotIn(IPv6ExtHdrDestOpt, pkt)  # translate: HAO removed

    def test_transparent_in_the_driver(self) -> None:
        """Transparent mode in the driver: after the first packet (a miss, the core's),
        every packet of the terminal is forwarded by the program -- destination := the
        backend, the Home Address Option and payload unchanged, a hop less from the
        balancer, the transport checksum valid by scapy."""
        with self.running(mode="transparent", key_chain=("hoa", "src")) as (bed, lb):
            captures = {i: Capture(bed, f"srv{i}", "eth0") for i in bed.backend_indices}
            for c in captures.values():
                self.addCleanup(c.close)
            hoa, coa = "2001:db8:100::1778", "2001:db8:a2::1778"
            sent = [IPv6(src=coa, dst=VIP) / IPv6ExtHdrDestOpt(options=[HAO(hoa=hoa)])
                    / UDP(sport=7, dport=addresses.UDP_PORT) / f"in the driver {n}".encode()
                    for n in range(20)]  # fmt: skip
            self.send_frames(bed, "term", "acc2", bed.mac("net", "acc2"), [bytes(sent[0])])
            time.sleep(0.3)  # the binding reaches the program's map after that batch
            before = lb.ctl("stats")["ports"]["xdp"]["forwarded"]
            self.send_frames(bed, "term", "acc2", bed.mac("net", "acc2"),
                             [bytes(p) for p in sent[1:]])  # fmt: skip
            time.sleep(0.5)
            got = [p for c in captures.values() for p in c.packets() if HAO in p]
            self.assertEqual(len(got), 20)
            self.assertEqual(lb.ctl("stats")["ports"]["xdp"]["forwarded"] - before, 19)
            self.assertEqual(len({p.dst for p in got}), 1)
            for pkt, original in zip(got, sent, strict=True):
                self.assertEqual((pkt.src, pkt[HAO].hoa), (coa, hoa))
                self.assertEqual(bytes(pkt[UDP].payload), bytes(original[UDP].payload))
                self.assertEqual(pkt.hlim, original.hlim - 2)  # the router and the balancer
                self.assertTrue(l4_checksum_ok(pkt), pkt.summary())

    def test_claim_10_through_the_driver(self) -> None:
        """Must-show 3 of issue 12, against twistd: a terminal whose packets after its
        first all go through the program keeps its binding past several lifetimes (the
        stamps are folded in before each sweep), while an idle one expires on time --
        its expiry is its one packet's -- and is removed within a sweep (and the table's
        timer grain) of it; the program does not outlive the table's decision: the
        idle terminal's next packet is a miss again."""
        lifetime, sweep, grain = 3.0, 0.5, 1.0  # bed_config's sweep_interval; table grain
        with self.running(key_chain=("hoa", "src"), offload="xdp", lifetime=lifetime) as (
            bed, lb
        ):
            busy, idle = ("2001:db8:100::7001", "2001:db8:a1::7001"), (
                "2001:db8:100::7002", "2001:db8:a1::7002")
            router = bytes.fromhex(bed.mac("net", "acc1").replace(":", ""))
            sock = bed.socket("term", socket.AF_PACKET, socket.SOCK_RAW)
            self.addCleanup(sock.close)
            sock.bind(("acc1", 0))

            def packet(terminal: tuple[str, str], n: int) -> bytes:
                hoa, coa = terminal
                return bytes(IPv6(src=coa, dst=VIP) / IPv6ExtHdrDestOpt(options=[HAO(hoa=hoa)])
                             / UDP(sport=41000, dport=addresses.UDP_PORT)
                             / f"claim 10 {n}".encode())  # fmt: skip

            def send(terminal: tuple[str, str], n: int) -> None:
                sock.send(router + bytes(6) + b"\x86\xdd" + packet(terminal, n))

            def rows() -> dict[str, dict[str, Any]]:
                return {r["key"]: r for r in lb.ctl("show")["rows"]}

            send(busy, 0)
            send(idle, 0)
            idle_sent = time.monotonic()
            time.sleep(0.3)
            before = lb.ctl("stats")["ports"]["xdp"]
            asked = time.monotonic()
            first = rows()
            answered = time.monotonic()
            self.assertEqual(set(first), {f"addr {busy[0]}", f"addr {idle[0]}"})
            # Its expiry, from what was left of it at some moment of the request: its
            # one packet's time + the lifetime.
            left = first[f"addr {idle[0]}"]["left"]
            self.assertLessEqual(asked + left - idle_sent, lifetime + 0.1)
            self.assertGreaterEqual(answered + left - idle_sent, lifetime - 0.3)

            # The busy terminal sends every 0.2 s, whatever the polling below costs.
            stop, sent = threading.Event(), [1]

            def keep_sending() -> None:
                while not stop.wait(0.2):
                    send(busy, sent[0])
                    sent[0] += 1

            sender = threading.Thread(target=keep_sending, daemon=True)
            sender.start()
            self.addCleanup(stop.set)
            removed = None
            while time.monotonic() < idle_sent + 3 * lifetime:
                size = lb.ctl("stats")["table"]["size"]
                if removed is None and size == 1:
                    removed = time.monotonic() - idle_sent
                time.sleep(0.1)
            stop.set()
            sender.join()
            time.sleep(3 * sweep)  # the last stamps folded in
            after = lb.ctl("stats")
            table = rows()
            # The busy terminal: alive after three lifetimes, every packet counted, and
            # all but its first in the driver (the first made the binding, up there).
            self.assertEqual(set(table), {f"addr {busy[0]}"})
            row = table[f"addr {busy[0]}"]
            self.assertEqual(row["packets"], sent[0])
            self.assertEqual(after["ports"]["xdp"]["forwarded"] - before["forwarded"],
                             sent[0] - 1, after["ports"])  # fmt: skip
            self.assertEqual(after["ports"]["fast_path"]["forwarded"], 0, after["ports"])
            echoed = [e for e in bed.backend_log()[row["backend"]] if e.get("peer") == busy[0]]
            self.assertEqual(len(echoed), sent[0])
            # The idle one: removed by a sweep within a sweep (and the grain) of its
            # expiry, its map entry with it.
            assert removed is not None
            self.assertGreaterEqual(removed, lifetime)
            self.assertLess(removed, lifetime + sweep + grain + 0.5)
            self.assertEqual(after["misses"], {"hoa": 2})
            # lbproxyctl trace: the busy terminal's next packet would stay in the driver;
            # the idle one's would go up (its binding is gone from the program's map).
            busy_trace = lb.ctl("trace", packet(busy, 99).hex())
            self.assertTrue(busy_trace["xdp"]["offloaded"], busy_trace)
            self.assertIn(f"to {row['backend']}", busy_trace["xdp"]["reason"])
            idle_trace = lb.ctl("trace", packet(idle, 99).hex())
            self.assertFalse(idle_trace["xdp"]["offloaded"], idle_trace)
            self.assertIn(f"no binding for home address {idle[0]}", idle_trace["xdp"]["reason"])
            send(idle, 1)
            time.sleep(0.3)
            self.assertEqual(lb.ctl("stats")["misses"], {"hoa": 3})
