"""The balancer as the terminals' correspondent node, with RFC 6275 mobile nodes (issue 15).

In the network test bed (docs/testbed.md): ``twistd -n lbproxy`` in translate mode with
``[correspondent] mode = "strict"``, plain Linux TCP/UDP backends, and the terminal
emulator in its RFC mode (``ro_mode rfc``): each terminal tunnels through its home agent
until return routability (HoTI through the home agent, CoTI direct), a Binding Update
authorised with Kbm and an authenticated Binding Acknowledgement from the balancer let it
send route-optimised, and again after every move.  The emulator's side is written apart
from the balancer's (lbproxy.testbed.rrmessages, lbproxy.testbed.correspondents), so the
two implementations of RFC 6275 check each other; scapy dissects what crossed the wire.

* TCP sessions of three terminals stay on one backend through three moves, every byte
  echoed; replies reach a care-of address with a Type 2 Routing Header only after the
  Binding Acknowledgement for that address (before it: tunnelled by the home agent);
* forged Binding Updates -- a bad authenticator, a stale nonce index, a sequence number
  that is not newer -- are refused and change nothing;
* a packet with a Home Address Option from a terminal without a binding gets a Binding
  Error (status 1) and reaches no backend.

Needs root; without it every test skips with the reason.
"""

from __future__ import annotations

import os
import socket
import time
from collections.abc import Iterable
from ipaddress import IPv6Address
from typing import Any

from scapy.layers.inet import UDP
from scapy.layers.inet6 import (
    MIP6MH_BA,
    MIP6MH_BE,
    IPv6,
    IPv6ExtHdrRouting,
    MIP6MH_CoT,
    MIP6MH_HoT,
    MIP6OptBindingAuthData,
    in6_chksum,
)
from scapy.packet import Packet, bind_layers
from twisted.python import log
from twisted.trial.unittest import SynchronousTestCase

from lbproxy.testbed import addresses, control, packets, rrmessages
from lbproxy.testbed.balancer import BedBalancer, bed_config
from lbproxy.testbed.bed import TestBed
from tests.bedtools import Capture, Session, require_bed, wait_for

bind_layers(IPv6, IPv6, nh=41)
VIP = str(addresses.VIP)
STRICT = '[correspondent]\nmode = "strict"\n'
#: Seconds from a terminal's first packet to the virtual address until its return
#: routability starts: long enough for the first echo to go through the home agent.
RO_DELAY = 1.0
MOVES = (2, 3, 1)


def hoa(index: int) -> str:
    return str(addresses.home_address(index))


def coa(index: int, link: int) -> str:
    return str(addresses.care_of_address(index, link))


def from_access_link(bed: TestBed, link: int, frames: Iterable[bytes]) -> None:
    """IPv6 packets sent as a terminal on access link ``link`` sends them (to the router)."""
    sock = bed.socket("term", socket.AF_PACKET, socket.SOCK_RAW)
    try:
        sock.bind((f"acc{link}", 0))
        header = bytes.fromhex(bed.mac("net", f"acc{link}").replace(":", "")) + bytes(6)
        for frame in frames:
            sock.send(header + b"\x86\xdd" + frame)
    finally:
        sock.close()


def mh_checksum_ok(packet: Packet, layer: type[Packet]) -> bool:
    """scapy's verdict on a Mobility Header's checksum (RH2: the final destination)."""
    upper = packet[layer]
    return in6_chksum(135, upper, bytes(upper)) == 0


class CorrespondentBedTestCase(SynchronousTestCase):
    """A bed, the real balancer in strict correspondent mode, the emulator in RFC mode."""

    def setUp(self) -> None:
        require_bed()

    def start(self, terminals: int = 3) -> tuple[TestBed, BedBalancer]:
        bed = TestBed(terminals=terminals, backends=3)
        self.addCleanup(bed.stop)
        bed.start()
        lb = BedBalancer(bed, bed_config(bed, extra=STRICT))
        self.addCleanup(lambda: self.assertNotIn("Traceback", lb.log()))
        self.addCleanup(lb.stop)
        lb.start()
        self.addCleanup(self.diagnostics, bed, lb)
        control.request(bed.terminal_control, "ro_mode", mode="rfc", delay=RO_DELAY)
        return bed, lb

    def diagnostics(self, bed: TestBed, lb: BedBalancer) -> None:
        """Into the test log (_trial_temp/test.log): what to look at when a test failed."""
        try:
            stats: object = lb.ctl("stats")
        except Exception as e:
            stats = repr(e)
        try:
            status: object = control.request(bed.terminal_control, "status")
        except Exception as e:
            status = repr(e)
        log.msg(f"{self.id()}: balancer stats {stats}; terminal emulator {status}; "
                f"balancer log tail:\n{lb.log()[-3000:]}")

    def capture(self, bed: TestBed, role: str, ifname: str) -> Capture:
        cap = Capture(bed, role, ifname)
        self.addCleanup(cap.close)
        return cap

    @staticmethod
    def terminal(bed: TestBed, index: int) -> dict[str, Any]:
        """The emulator's view of terminal ``index``, with its registration's secrets."""
        return control.request(bed.terminal_control, "correspondents", terminal=index)

    @classmethod
    def registration(cls, bed: TestBed, index: int) -> dict[str, Any]:
        """Terminal ``index``'s registration with the virtual address."""
        found = [r for r in cls.terminal(bed, index)["correspondents"]
                 if r["correspondent"] == VIP]
        assert len(found) == 1, found
        return found[0]

    def wait_bound(self, bed: TestBed, index: int, link: int) -> dict[str, Any]:
        """Wait until terminal ``index`` is route-optimised at its care-of address on
        ``link`` (the balancer acknowledged its Binding Update); its registration."""
        def bound() -> dict[str, Any] | None:
            registration = self.registration(bed, index)
            if registration["optimised"] and registration["bound_coa"] == coa(index, link):
                return registration
            return None
        try:
            result: dict[str, Any] = wait_for(f"terminal {index} bound at {coa(index, link)}",
                                              bound)
        except AssertionError as e:
            raise AssertionError(f"{e}: {self.registration(bed, index)}") from None
        return result

    @staticmethod
    def cache_entry(lb: BedBalancer, index: int) -> dict[str, Any] | None:
        """The balancer's binding cache entry for terminal ``index`` (``lbproxyctl cache``),
        without the seconds left."""
        entries = [e for e in lb.ctl("cache", "--limit", "10000")["entries"]
                   if e["home"] == hoa(index)]
        assert len(entries) <= 1, entries
        return {k: v for k, v in entries[0].items() if k != "left"} if entries else None

    @staticmethod
    def row(lb: BedBalancer, index: int) -> dict[str, Any]:
        """The balancer's ``show`` row of terminal ``index``'s home address binding."""
        rows = lb.ctl("show", "--limit", "10000")["rows"]
        found = [r for r in rows if r["key"] == f"addr {hoa(index)}"]
        assert len(found) == 1, rows
        row: dict[str, Any] = found[0]
        return row


class MovingMobileNodesTests(CorrespondentBedTestCase):
    """Three terminals' TCP sessions through three moves, tunnel then route optimisation."""

    TERMINALS = (1, 2, 3)

    def test_sessions_survive_moves_route_optimised_after_each_ack(self) -> None:
        bed, lb = self.start(len(self.TERMINALS))
        links = [1, *MOVES]
        downlink = {k: self.capture(bed, "term", f"acc{k}") for k in sorted(set(links))}
        sessions = {i: Session(bed, i, timeout=15.0) for i in self.TERMINALS}
        for session in sessions.values():
            session.echo()
        # Before any Binding Update: every reply came through the home agent.
        for i in self.TERMINALS:
            [epoch] = self.registration(bed, i)["epochs"]
            self.assertIsNone(epoch["ba_at"], epoch)
            self.assertGreater(epoch["tunnelled_before_ba"], 0, epoch)
            self.assertEqual(epoch["rh2_before_ba"], 0, epoch)
        for step, link in enumerate(links):
            if step:
                for i in self.TERMINALS:
                    self.assertTrue(bed.move(i, link)["ok"])
                for session in sessions.values():
                    session.echo()  # tunnelled, or retransmitted after the new BA
            for i in self.TERMINALS:
                self.wait_bound(bed, i, link)
            for session in sessions.values():
                session.echo()
            for i in self.TERMINALS:
                row = self.row(lb, i)
                self.assertEqual((row["care_of"], row["confirmed"]), (coa(i, link), True), row)
                self.assertEqual(self.cache_entry(lb, i), {
                    "home": hoa(i), "care_of": coa(i, link),
                    "seq": self.registration(bed, i)["seq"]})
        for session in sessions.values():
            session.close()

        # One backend per terminal, the one of its greeting; every byte came back.
        for i, session in sessions.items():
            self.assertEqual(bed.served_by(hoa(i)), [session.backend])
            self.assertEqual(self.row(lb, i)["backend"], session.backend)
            self.assertEqual(session.sent, 6000 * (1 + 2 * len(links) - 1))

        # Per care-of address: RH2 replies only after that address's BA, some after it.
        for i in self.TERMINALS:
            view = self.terminal(bed, i)
            self.assertEqual(view["binding_errors"], 0, view)
            epochs = self.registration(bed, i)["epochs"]
            log.msg(f"terminal {i} epochs: {epochs}")
            self.assertEqual([e["coa"] for e in epochs], [coa(i, k) for k in links])
            for epoch in epochs:
                self.assertIsNotNone(epoch["ba_at"], epoch)
                self.assertEqual(epoch["rh2_before_ba"], 0, epoch)
                self.assertGreater(epoch["rh2_after_ba"], 0, epoch)
                self.assertGreaterEqual(epoch["first_rh2_rel_ba"], 0.0, epoch)
            self.assertGreater(epochs[0]["tunnelled_before_ba"], 0, epochs[0])

        # On the wire (scapy): the balancer's CoT and BA at the care-of address, the HoT
        # tunnelled by the home agent, all with valid checksums; at each care-of address
        # the first packet with an RH2 that is not the BA comes after a successful BA.
        for k, cap in downlink.items():
            seen = cap.packets()
            for i in self.TERMINALS:
                mine = [p for p in seen if p.dst == coa(i, k)]
                hot = [p for p in mine if MIP6MH_HoT in p]
                cot = [p for p in mine if MIP6MH_CoT in p]
                # the balancer's BAs (the home agent's, for the home registration, too
                # arrive here)
                acks = [n for n, p in enumerate(mine) if MIP6MH_BA in p and p.src == VIP]
                data = [n for n, p in enumerate(mine)
                        if IPv6ExtHdrRouting in p and MIP6MH_BA not in p]
                self.assertTrue(cot and acks and data, (k, i, len(mine)))
                # a home test on the first link only: after a move the emulator reuses
                # its home keygen token (younger than 200 s) and redoes the care-of test
                self.assertEqual(bool(hot), k == links[0], (k, i, len(hot)))
                self.assertTrue(all(mh_checksum_ok(p, MIP6MH_HoT) for p in hot))
                self.assertTrue(all(p[IPv6].src == str(addresses.HOME_AGENT) for p in hot))
                self.assertTrue(all(mh_checksum_ok(p, MIP6MH_CoT) and p.src == VIP
                                    for p in cot))
                for n in acks:
                    ba = mine[n]
                    self.assertTrue(mh_checksum_ok(ba, MIP6MH_BA), ba.summary())
                    self.assertEqual(ba[IPv6ExtHdrRouting].addresses, [hoa(i)])
                    self.assertEqual(ba[MIP6MH_BA].status, 0)
                    [auth] = [o for o in ba[MIP6MH_BA].options
                              if isinstance(o, MIP6OptBindingAuthData)]
                    self.assertEqual(auth.olen, 12)
                    message = rrmessages.parse(bytes(ba))
                    assert message is not None
                    self.assertTrue(message.checksum_ok)
                self.assertLess(acks[0], data[0], (k, i))


class WorkloadTests(CorrespondentBedTestCase):
    """Fifty RFC-mode terminals under the bed's workload, each moving three times."""

    def test_fifty_terminals_three_moves(self) -> None:
        bed, lb = self.start(50)
        control.request(bed.terminal_control, "ro_mode", mode="rfc", delay=0.0)
        report = bed.workload(moves=list(MOVES), chunks=8, chunk_size=4096)
        summary = report["summary"]
        self.assertEqual((summary["connections"], summary["ok"], summary["errors"],
                          summary["sticky"], summary["moves"], summary["moves_failed"]),
                         (50, 50, 0, 50, 150, 0), summary)
        self.assertEqual(summary["bytes_ok"], 50 * 8 * 4096)
        # Chunks follow every move (after chunks 2, 4 and 6 of 8), and their echoes can
        # only come route-optimised to the new address (the balancer's binding names the
        # old one until the new BU): every care-of address was acknowledged, and no RH2
        # reply reached one before.
        for view in control.request(bed.terminal_control, "status")["terminals"]:
            i = view["terminal"]
            [registration] = view["correspondents"]
            epochs = registration["epochs"]
            self.assertEqual([e["coa"] for e in epochs], [coa(i, k) for k in (1, *MOVES)])
            for epoch in epochs:
                self.assertIsNotNone(epoch["ba_at"], (i, epoch))
                self.assertEqual(epoch["rh2_before_ba"], 0, (i, epoch))
                self.assertGreater(epoch["rh2_after_ba"], 0, (i, epoch))
            self.assertEqual(view["binding_errors"], 0, view)
        rows = {r["key"]: r for r in lb.ctl("show", "--limit", "10000")["rows"]}
        for i in range(1, 51):
            [backend] = report["terminals"][str(i)]["backends"]
            self.assertEqual(rows[f"addr {hoa(i)}"]["backend"], backend)


class ForgedBindingUpdateTests(CorrespondentBedTestCase):
    """Binding Updates that must not be accepted: refused, and nothing changes."""

    def test_forged_binding_updates_change_nothing(self) -> None:
        bed, lb = self.start(1)
        session = Session(bed, 1, timeout=15.0)
        session.echo()
        registration = self.wait_bound(bed, 1, 1)
        session.echo()
        secrets = self.terminal(bed, 1)["correspondents"][0]
        kbm = bytes.fromhex(secrets["kbm"])
        seq, hni, coni = secrets["seq"], secrets["home_index"], secrets["care_of_index"]
        before_row = self.row(lb, 1)
        before_cache = self.cache_entry(lb, 1)
        self.assertEqual(before_cache, {"home": hoa(1), "care_of": coa(1, 1), "seq": seq})
        before_stats = lb.ctl("stats")
        before_rh2 = registration["epochs"][-1]["rh2_after_ba"]
        caps = {k: self.capture(bed, "term", f"acc{k}") for k in (1, 3)}
        home, vip = addresses.home_address(1).packed, addresses.VIP.packed

        def bu(care_of_link: int, seq: int, hni: int, coni: int, key: bytes) -> bytes:
            return rrmessages.correspondent_binding_update(
                addresses.care_of_address(1, care_of_link).packed, vip, home, seq,
                rrmessages.MAX_RR_BINDING_LIFETIME, hni, coni, key)

        forgeries = {
            # an attacker redirecting the terminal to a3 without Kbm
            "bad authenticator": (3, bu(3, seq + 1, hni, coni, os.urandom(20))),
            # Kbm from the terminal's own tokens, but a nonce index long retired
            "stale nonce index": (1, bu(1, seq + 2, (hni - 100) & 0xFFFF,
                                        (coni - 100) & 0xFFFF, kbm)),
            # the right key and indices, a sequence number that is not newer
            "old sequence number": (1, bu(1, seq, hni, coni, kbm)),
        }
        for name, (link, packet) in forgeries.items():
            from_access_link(bed, link, [packet])
            time.sleep(0.3)
            row = self.row(lb, 1)
            self.assertEqual((row["care_of"], row["backend"], row["confirmed"]),
                             (before_row["care_of"], before_row["backend"], True),
                             f"{name}: {row}")
            self.assertEqual(self.cache_entry(lb, 1), before_cache, name)
        # each refused for its own reason, nothing accepted
        stats = lb.ctl("stats")
        for reason in ("bu-bad-authenticator", "bu-stale-nonce", "bu-sequence"):
            self.assertEqual(stats["dropped"].get(reason, 0),
                             before_stats["dropped"].get(reason, 0) + 1, (reason, stats))
        self.assertEqual(stats["correspondent"].get("bu-accepted"),
                         before_stats["correspondent"].get("bu-accepted"))
        acks = [p for cap in caps.values() for p in cap.packets() if MIP6MH_BA in p
                and p.src == VIP]
        self.assertEqual([p for p in acks if p[MIP6MH_BA].status == 0], [],
                         [p.summary() for p in acks])
        self.assertTrue(all(mh_checksum_ok(p, MIP6MH_BA) for p in acks))
        # the stale indices are answered 136-138 (no authenticator possible), the old
        # sequence number 135 with the balancer's number (authenticated)
        stale = [p for p in acks if p[MIP6MH_BA].status in (136, 137, 138)]
        self.assertEqual([p[MIP6MH_BA].status for p in stale], [138],  # both expired
                         [p.summary() for p in acks])
        self.assertFalse([o for o in stale[0][MIP6MH_BA].options
                          if isinstance(o, MIP6OptBindingAuthData)])
        refusals = [p for p in acks if p[MIP6MH_BA].status == 135]
        self.assertEqual(len(refusals), 1, [p.summary() for p in acks])
        self.assertEqual(refusals[0][MIP6MH_BA].seq, seq)
        message = rrmessages.parse(bytes(refusals[0]))
        assert message is not None
        self.assertTrue(message.authenticated(kbm, addresses.care_of_address(1, 1).packed,
                                              vip))
        # still route-optimised to the same care-of address, the same session
        session.echo()
        after = self.registration(bed, 1)
        self.assertEqual(after["bound_coa"], coa(1, 1))
        self.assertGreater(after["epochs"][-1]["rh2_after_ba"], before_rh2)
        session.close()
        self.assertEqual(bed.served_by(hoa(1)), [session.backend])


class BindingErrorTests(CorrespondentBedTestCase):
    """RFC 6275 §9.3.1 in strict mode: an HAO without a binding gets a Binding Error."""

    def test_hao_without_binding_gets_binding_error(self) -> None:
        bed, _ = self.start(2)
        cap = self.capture(bed, "term", "acc1")
        datagram = bytes(IPv6(src=hoa(2), dst=VIP)
                         / UDP(sport=40000, dport=addresses.UDP_PORT) / b"no binding")
        from_access_link(bed, 1, [packets.add_hao(datagram, IPv6Address(coa(2, 1)).packed)])
        errors = wait_for("a Binding Error", lambda: [
            p for p in cap.packets() if MIP6MH_BE in p])
        [be] = errors
        self.assertEqual((be.src, be.dst), (VIP, coa(2, 1)))
        self.assertEqual((be[MIP6MH_BE].status, be[MIP6MH_BE].ha), (1, hoa(2)))
        self.assertTrue(mh_checksum_ok(be, MIP6MH_BE))
        self.assertEqual(self.terminal(bed, 2)["binding_errors"], 1)
        time.sleep(0.3)
        self.assertEqual([e for events in bed.backend_log().values() for e in events
                          if e["event"] == "datagram" and e.get("peer") == hoa(2)], [])
