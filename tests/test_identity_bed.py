"""One terminal, one backend, on every path -- in the network test bed (issue 10).

The identity model (`lbproxy.core.balancer.Balancer.backend_for`): a packet's identities
-- the home address of its Home Address Option, its source address (the home address for
a terminal at home or tunnelled through its home agent, else a care-of address), an
EUI-64 interface ID, an ESP SPI -- are looked up in chain order, the first live binding
wins and the others become its aliases; addresses are one namespace.  tests/test_identity.py
proves it in-process; these tests prove it where it matters: ``twistd -n lbproxy`` in the
bed's balancer namespace (docs/testbed.md), the default key chain (hoa, iid, spi, src) and
Maglev, real Linux TCP/UDP servers (or home agents) behind it, the terminal emulator's
kernel sockets or scapy-built frames in front, and scapy as the oracle for what crossed
the wire:

* 60 terminals move a1 -> a2 during TCP sessions, then return home
  (`lbproxy.testbed.homelink`): their kernels send plain packets from their home
  addresses, they deregister with the home agent, with and without a home-agent agent
  telling the balancer -- every session carries on, on its backend;
* a terminal's IKE (UDP 500 and 4500) and ESP, with an HAO, tunnelled through its home
  agent, and from bare care-of addresses, moving: one backend;
* three home agents behind the virtual address (transparent mode): a terminal's Binding
  Update, HoTI (source = home address) and CoTI (source = care-of address) reach one;
* ICMPv6 Packet Too Big and Destination Unreachable from the bed's router about a reply,
  and fragmented datagrams, for a terminal keyed by each kind (hoa, iid, spi, src): the
  backend that holds the binding gets them, and its kernel accepts them.

A MOBIKE address update that reaches the balancer from a new care-of address before any
ESP does finds the terminal's backend through the IKE SA's SPI (the ``ike`` key
strategy); an operator's move after a notified move takes every identity of the terminal
(a notified care-of address joins the terminal's binding as an alias).  Needs root; without it every
test skips with the reason.
"""

from __future__ import annotations

import ipaddress
import os
import socket
import struct
import time
from collections.abc import Callable, Iterable, Sequence
from typing import Any

from scapy.contrib.ikev2 import IKEv2
from scapy.layers.inet import TCP, UDP
from scapy.layers.inet6 import (
    HAO,
    MIP6MH_BU,
    ICMPv6DestUnreach,
    ICMPv6PacketTooBig,
    IPerror6,
    IPv6,
    IPv6ExtHdrDestOpt,
    IPv6ExtHdrFragment,
    IPv6ExtHdrRouting,
    MIP6MH_CoTI,
    MIP6MH_HoTI,
    defragment6,
    fragment6,
)
from scapy.layers.ipsec import ESP, SecurityAssociation
from scapy.packet import Packet, Raw
from scapy.utils import checksum
from twisted.python import log
from twisted.trial.unittest import SynchronousTestCase

from lbproxy.core.keys import Key
from lbproxy.core.selection import Backend, scheduler_from_name
from lbproxy.testbed import addresses, control, packets
from lbproxy.testbed.agents import BedAgent, BedPki, notify_section
from lbproxy.testbed.balancer import BedBalancer, bed_config
from lbproxy.testbed.bed import TestBed
from lbproxy.testbed.hapool import start_home_agent_pool
from lbproxy.testbed.homelink import HOME_PORT, HomeLink
from tests.bedtools import (
    Capture,
    Session,
    l4_checksum_ok,
    pseudo_addresses,
    require_bed,
    wait_for,
)

VIP = str(addresses.VIP)
IKE_PORT, NAT_T_PORT = 500, 4500
#: The MTU of the router's path to the terminals in the ICMPv6 error test.
ROUTER_MTU = 1280
IPV6_RECVERR = 25  # <linux/in6.h>; not in Python's socket module
SO_EE_ORIGIN_ICMP6 = 3  # <linux/errqueue.h>


def packed(address: str) -> bytes:
    return ipaddress.IPv6Address(address).packed


def text(address: str) -> str:
    """The canonical text form (what logs, ``show`` and scapy print)."""
    return str(ipaddress.IPv6Address(address))


def maglev_choice(bed: TestBed, address: str) -> str:
    """The backend the balancer's Maglev gives a fresh ``addr`` key for ``address``."""
    return maglev_choice_for(bed, Key("addr", packed(address)))


def maglev_choice_for(bed: TestBed, key: Key) -> str:
    """The backend the balancer's Maglev gives a fresh `key`."""
    scheduler = scheduler_from_name("maglev")
    scheduler.set_backends([Backend(addresses.backend_name(i), addresses.backend_address(i))
                            for i in bed.backend_indices])
    backend = scheduler.choose(key, {})
    assert backend is not None
    return backend.name


def coa(index: int, link: int) -> str:
    return str(addresses.care_of_address(index, link))


def hoa(index: int) -> str:
    return str(addresses.home_address(index))


def send_frames(bed: TestBed, role: str, ifname: str, dst_mac: str,
                frames: Iterable[bytes | Packet]) -> None:
    """Send IPv6 packets as Ethernet frames out of ``ifname`` in ``role``."""
    sock = bed.socket(role, socket.AF_PACKET, socket.SOCK_RAW)
    try:
        sock.bind((ifname, 0))
        header = bytes.fromhex(dst_mac.replace(":", "")) + bytes(6) + b"\x86\xdd"
        for frame in frames:
            sock.send(header + bytes(frame))
    finally:
        sock.close()


def from_access_link(bed: TestBed, link: int, frames: Iterable[bytes | Packet]) -> None:
    """Frames from a terminal on access link ``link`` to the router."""
    send_frames(bed, "term", f"acc{link}", bed.mac("net", f"acc{link}"), frames)


def from_home_link(bed: TestBed, frames: Iterable[bytes | Packet]) -> None:
    """Frames entering the router from the home link (as the home agent forwards them)."""
    send_frames(bed, "ha", "home", bed.mac("net", "home"), frames)


def with_hao(packet: Packet, care_of: str) -> bytes:
    """``packet`` (sent from the home address) as a route-optimised mobile node sends
    it: the home address in an HAO, the care-of address as source (RFC 6275 §11.3.1)."""
    return packets.add_hao(bytes(packet), packed(care_of))


def security_association(spi: int) -> SecurityAssociation:
    return SecurityAssociation(ESP, spi=spi, crypt_algo="AES-CBC", crypt_key=bytes(range(16)),
                               auth_algo="HMAC-SHA1-96", auth_key=bytes(20), tunnel_header=None)


def ike(exchange: str, initiator: bytes, responder: bytes, message: int,
        nat_t: bool) -> bytes:
    """An IKEv2 message's UDP payload (RFC 7296): on port 4500 after the four-byte
    non-ESP marker (RFC 3948 §2.2); the payloads themselves are opaque here."""
    body = IKEv2(init_SPI=initiator, resp_SPI=responder, exch_type=exchange,
                 flags="Initiator", id=message,
                 next_payload="None" if exchange == "IKE_SA_INIT" else "Encrypted")
    data = bytes(body / Raw(os.urandom(48)))
    data = data[:24] + struct.pack("!I", len(data)) + data[28:]
    return (bytes(4) + data) if nat_t else data


def backend_datagrams(bed: TestBed, peer: str,
                      port: int | None = None) -> dict[str, list[dict[str, Any]]]:
    """Datagrams each backend's server logged from ``peer`` (on ``port``), by backend."""
    found: dict[str, list[dict[str, Any]]] = {}
    for name, events in bed.backend_log().items():
        mine = [e for e in events if e["event"] == "datagram" and e.get("peer") == text(peer)
                and (port is None or e.get("port") == port)]
        if mine:
            found[name] = mine
    return found


class IdentityBedTestCase(SynchronousTestCase):
    """A bed and the real balancer per test, always torn down."""

    def setUp(self) -> None:
        require_bed()

    def make_bed(self, terminals: int = 1, **options: Any) -> TestBed:
        bed = TestBed(terminals=terminals, backends=3, **options)
        self.addCleanup(bed.stop)
        bed.start()
        return bed

    def start_balancer(self, bed: TestBed, **config: Any) -> BedBalancer:
        lb = BedBalancer(bed, bed_config(bed, **config))
        self.addCleanup(self.no_traceback, lb)
        self.addCleanup(lb.stop)
        lb.start()
        self.addCleanup(self.diagnostics, bed, lb)
        return lb

    def no_traceback(self, lb: BedBalancer) -> None:
        self.assertNotIn("Traceback", lb.log())

    def diagnostics(self, bed: TestBed, lb: BedBalancer) -> None:
        """Into the test log (_trial_temp/test.log): what to look at when a test failed."""
        try:
            stats: object = lb.ctl("stats")
        except Exception as e:
            stats = repr(e)
        try:
            counters: object = bed.terminal_counters()
        except Exception as e:
            counters = repr(e)
        log.msg(f"{self.id()}: balancer stats {stats}; terminal emulator {counters}; "
                f"balancer log tail:\n{lb.log()[-3000:]}")

    def capture(self, bed: TestBed, role: str, ifname: str) -> Capture:
        cap = Capture(bed, role, ifname)
        self.addCleanup(cap.close)
        return cap

    def backend_captures(self, bed: TestBed) -> dict[str, Capture]:
        return {addresses.backend_name(i): self.capture(bed, f"srv{i}", "eth0")
                for i in bed.backend_indices}

    def rows(self, lb: BedBalancer) -> list[dict[str, Any]]:
        answer = lb.ctl("show", "--limit", "10000")
        rows: list[dict[str, Any]] = answer["rows"]
        self.assertEqual(len(rows), answer["total"])
        return rows

    def holder(self, lb: BedBalancer, key: str) -> dict[str, Any]:
        """The ``show`` row of the binding that ``key`` (its own key or an alias) leads to."""
        found = [r for r in self.rows(lb) if r["key"] == key or key in r["aliases"]]
        self.assertEqual(len(found), 1, (key, found))
        return found[0]


class ReturningHomeTests(IdentityBedTestCase):
    """60 terminals: TCP sessions opened on a1, moved to a2, carried home."""

    TERMINALS = 60

    def test_sixty_terminals_come_home_without_notification(self) -> None:
        """Each terminal opens a TCP session from its home address while on a1 (HAO
        packets from CoA1), moves to a2 (CoA2, a Binding Update to its home agent), then
        returns home: its kernel sends plain packets from the home address on the home
        link and it deregisters with its home agent.  No agent tells the balancer.  60 of
        60 sessions carry on with every byte echoed, a new connection from home lands on
        the same backend, and the table holds one binding per terminal, its care-of
        addresses aliases of it."""
        bed = self.make_bed(terminals=self.TERMINALS)
        lb = self.start_balancer(bed)
        self.return_home(bed, lb, notified=False)
        rows = self.rows(lb)
        self.assertEqual(len(rows), self.TERMINALS)
        for row in rows:
            index = addresses.terminal_of(row["key"].split()[1])
            assert index is not None
            self.assertEqual(row["key"], f"addr {hoa(index)}")
            self.assertEqual(sorted(row["aliases"]),
                             sorted(f"addr {coa(index, k)}" for k in (1, 2)))
            self.assertFalse(row["confirmed"])

    def test_sixty_terminals_come_home_with_deregistration_notification(self) -> None:
        """As without notification, but the home-agent agent (``twistd
        lbproxy-homeagent``) watches the home link and tells the balancer, over mutual TLS,
        of every move -- replies then reach the care-of address directly, with a Type 2
        Routing Header -- and of every deregistration: the balancer stops using the
        care-of address (``show`` no longer says confirmed; replies go to the home address,
        no Routing Header) and keeps the terminal on its backend."""
        bed = self.make_bed(terminals=self.TERMINALS, register=False)
        pki = BedPki(bed)
        agent = BedAgent.home_agent(bed, pki)
        self.addCleanup(agent.stop)
        agent.start()
        control.request(bed.terminal_control, "register")
        wait_for("registration", lambda: all(t["registered"] for t in bed.terminal_status()))
        lb = self.start_balancer(bed, extra=notify_section(pki, [agent.peer]))
        wait_for("the balancer's connection to the agent",
                 lambda: "notify: connected to ha1" in lb.log())
        self.return_home(bed, lb, notified=True)
        self.assertNotIn("notify: refused", lb.log())
        self.assertNotIn("not applied", lb.log())
        self.assertNotIn("refused", agent.log())

    def confirmed(self, lb: BedBalancer, care_of: Callable[[int], str | None],
                  indices: Iterable[int]) -> None:
        """Wait until every terminal's home-address row says its return path is
        ``care_of(i)`` (confirmed), or, for None, that it is not confirmed."""
        wanted = {f"addr {hoa(i)}": care_of(i) for i in indices}

        def done() -> bool:
            rows = {r["key"]: r for r in self.rows(lb)}
            for key, address in wanted.items():
                row = rows.get(key)
                if row is None:
                    return False
                if address is None and row["confirmed"]:
                    return False
                if address is not None and (not row["confirmed"] or row["care_of"] != address):
                    return False
            return True

        try:
            wait_for("the notifications", done, timeout=20)
        except AssertionError as e:
            rows = {r["key"]: r for r in self.rows(lb)}
            wrong = [(key, address, rows.get(key)) for key, address in wanted.items()
                     if rows.get(key) is None or bool(rows[key]["confirmed"]) != bool(address)
                     or (address is not None and rows[key]["care_of"] != address)]
            raise AssertionError(f"{e}; {len(wrong)} rows not as wanted, e.g. {wrong[:3]}; "
                                 f"log {lb.log()[-3000:]}") from None

    def return_home(self, bed: TestBed, lb: BedBalancer, notified: bool) -> None:
        indices = range(1, self.TERMINALS + 1)
        sessions: dict[int, Session] = {}
        for i in indices:
            sessions[i] = Session(bed, i)
            self.addCleanup(sessions[i].sock.close)
        backends = {i: s.backend for i, s in sessions.items()}
        self.assertEqual(set(backends.values()), {"b1", "b2", "b3"})
        for s in sessions.values():
            s.echo()
        if notified:
            self.confirmed(lb, lambda i: coa(i, 1), indices)

        for i in indices:
            self.assertTrue(bed.move(i, 2)["ok"], i)
        if notified:
            self.confirmed(lb, lambda i: coa(i, 2), indices)
        away = self.capture(bed, "term", "acc2")
        for s in sessions.values():
            s.echo()
        replies = [p for p in away.packets() if TCP in p and p[TCP].sport == addresses.TCP_PORT]
        self.assertTrue(replies)
        for p in replies:
            if notified:  # straight to the confirmed care-of address
                self.assertEqual(p.src, VIP)
                rh = p[IPv6ExtHdrRouting]
                self.assertEqual((rh.type, rh.segleft), (2, 1))
                self.assertEqual(addresses.terminal_of(rh.addresses[0]),
                                 addresses.terminal_of(p.dst))
            else:  # through the home agent's tunnel
                self.assertEqual(p.src, str(addresses.HOME_AGENT))

        # Home: native packets from the home address, the deregistration acknowledged.
        statuses = HomeLink(bed).come_home(indices)
        self.assertEqual(statuses, dict.fromkeys(indices, 0))
        self.assertEqual(bed.bindings(), [])
        deregistered = {e["hoa"] for e in bed.home_agent_log() if e["event"] == "deregistered"}
        self.assertEqual(deregistered, {hoa(i) for i in indices})
        if notified:
            self.confirmed(lb, lambda i: None, indices)
        before = bed.terminal_counters()
        to_terminals = self.capture(bed, "net", "lbn")
        at_home = self.capture(bed, "term", HOME_PORT)
        for s in sessions.values():
            s.echo()
        fresh = {}
        for i in indices:
            fresh[i] = Session(bed, i)
            self.addCleanup(fresh[i].sock.close)
            fresh[i].echo()

        # Nothing went through the emulator: no HAO, no tunnel, no Routing Header.
        after = bed.terminal_counters()
        for what in ("out-hao", "out-reverse-tunnel", "in-rh2", "in-tunnel"):
            self.assertEqual(after.get(what, 0), before.get(what, 0), what)
        replies = [p for p in to_terminals.packets() if p.src == VIP and TCP in p]
        self.assertGreater(len(replies), 2 * self.TERMINALS)
        homes = {hoa(i) for i in indices}
        for p in replies:
            self.assertIn(p.dst, homes)
            self.assertNotIn(IPv6ExtHdrRouting, p)
            self.assertTrue(l4_checksum_ok(p), p.summary())
        delivered = [p for p in at_home.packets() if p.src == VIP and TCP in p]
        self.assertEqual({p.dst for p in delivered}, homes)
        self.assertTrue(all(l4_checksum_ok(p) for p in delivered))

        stayed = [i for i in indices if fresh[i].backend == backends[i]
                  and bed.served_by(hoa(i)) == [backends[i]]]
        self.assertEqual(len(stayed), self.TERMINALS,
                         {i: (backends[i], fresh[i].backend, bed.served_by(hoa(i)))
                          for i in indices if i not in stayed})
        for group in (sessions, fresh):
            for s in group.values():
                s.close()
        for i, s in sessions.items():
            closes = wait_for(f"terminal {i}'s close record", lambda i=i: [  # type: ignore[misc]
                e for e in bed.backend_log()[backends[i]]
                if e["event"] == "close" and e.get("peer") == hoa(i)])
            self.assertIn(s.sent, [e["bytes"] for e in closes])

        stats = lb.ctl("stats")
        self.assertEqual(stats["misses"], {"hoa": self.TERMINALS})
        self.assertEqual(stats["dropped"], {})
        self.assertGreaterEqual(stats["hits"].get("src", 0), 2 * self.TERMINALS)
        for row in self.rows(lb):  # every entry a terminal has leads to its backend
            index = addresses.terminal_of(row["key"].split()[1])
            assert index is not None
            self.assertEqual(row["backend"], backends[index], row)


class IkeAndEspTests(IdentityBedTestCase):
    """A terminal's IKE (UDP 500, then 4500) and ESP, moving: one backend."""

    def start(self) -> tuple[TestBed, BedBalancer]:
        bed = self.make_bed(udp_ports=(addresses.UDP_PORT, IKE_PORT, NAT_T_PORT))
        return bed, self.start_balancer(bed)

    def ike_sockets(self, bed: TestBed, index: int) -> dict[int, socket.socket]:
        """Kernel UDP sockets on the home address's IKE ports (ns term), for the replies."""
        socks = {}
        for port in (IKE_PORT, NAT_T_PORT):
            sock = bed.socket("term", socket.AF_INET6, socket.SOCK_DGRAM)
            self.addCleanup(sock.close)
            sock.settimeout(5)
            sock.bind((hoa(index), port))
            socks[port] = sock
        return socks

    def answered_by(self, sock: socket.socket, sent: bytes) -> str:
        """The backend that echoed ``sent`` (the UDP server answers ``b<i> `` + datagram)."""
        reply, _ = sock.recvfrom(65536)
        name, _, echoed = reply.partition(b" ")
        self.assertEqual(echoed, sent)
        return name.decode()

    def esp_at_backends(self, captures: dict[str, Capture], sa: SecurityAssociation,
                        payloads: Sequence[bytes]) -> str:
        """The one backend whose capture holds the ESP packets; each decrypts to the next
        of ``payloads`` (the SA at the backend: the packets crossed intact)."""
        seen = {name: [p for p in c.packets() if ESP in p] for name, c in captures.items()}
        holders = [name for name, found in seen.items() if found]
        self.assertEqual(len(holders), 1, {n: len(p) for n, p in seen.items()})
        got = seen[holders[0]]
        self.assertEqual(len(got), len(payloads))
        for pkt, payload in zip(got, payloads, strict=True):
            self.assertEqual(pkt[ESP].spi, sa.spi)
            self.assertEqual(bytes(sa.decrypt(pkt)[UDP].payload), payload)
        return holders[0]

    def test_with_hao_moving(self) -> None:
        """A route-optimised mobile node's IKE and ESP, from its kernel's sockets through
        the terminal emulator (every packet an HAO packet from the current care-of
        address): IKE_SA_INIT on 500, IKE_AUTH on 4500 and ESP from CoA1; after each move
        (a2, a3) the MOBIKE address update on 4500 first, then ESP.  Every IKE message is
        answered by one backend, which the ESP packets reach too and decrypt there; the
        table has one binding, the home address, with the care-of addresses as aliases."""
        bed, lb = self.start()
        captures = self.backend_captures(bed)
        socks = self.ike_sockets(bed, 1)
        esp_sock = bed.socket("term", socket.AF_INET6, socket.SOCK_RAW, socket.IPPROTO_ESP)
        self.addCleanup(esp_sock.close)
        esp_sock.bind((hoa(1), 0))
        sa = security_association(0x5101)
        spi_i, spi_r = os.urandom(8), os.urandom(8)
        answers, payloads = [], []

        def exchange(port: int, kind: str, responder: bytes, message: int) -> None:
            data = ike(kind, spi_i, responder, message, nat_t=port == NAT_T_PORT)
            socks[port].sendto(data, (VIP, port))
            answers.append(self.answered_by(socks[port], data))

        def esp(n: int) -> None:
            payload = f"secret {n}".encode()
            payloads.append(payload)
            inner = sa.encrypt(IPv6(src=hoa(1), dst=VIP) / UDP(sport=4000, dport=4001) / payload)
            esp_sock.sendto(bytes(inner[ESP]), (VIP, 0))

        exchange(IKE_PORT, "IKE_SA_INIT", bytes(8), 0)
        exchange(NAT_T_PORT, "IKE_AUTH", spi_r, 1)
        esp(0)
        for message, link in enumerate((2, 3), start=2):
            self.assertTrue(bed.move(1, link)["ok"])
            exchange(NAT_T_PORT, "INFORMATIONAL", spi_r, message)
            esp(message)
        time.sleep(0.3)
        self.assertEqual(len(set(answers)), 1, answers)
        backend = answers[0]
        self.assertEqual(self.esp_at_backends(captures, sa, payloads), backend)
        # translate mode: the backend saw the home address, never a care-of address
        self.assertEqual(list(backend_datagrams(bed, hoa(1))), [backend])
        self.assertEqual(len(backend_datagrams(bed, hoa(1), NAT_T_PORT)[backend]), 3)
        row = self.holder(lb, f"addr {hoa(1)}")
        self.assertEqual(row["key"], f"addr {hoa(1)}")
        self.assertEqual(row["backend"], backend)
        self.assertLessEqual({f"addr {coa(1, k)}" for k in (1, 2, 3)}, set(row["aliases"]))
        self.assertEqual(bed.terminal_counters().get("out-reverse-tunnel", 0), 0)
        self.assertEqual(lb.ctl("stats")["misses"], {"hoa": 1})

    def test_ike_tunnelled_esp_route_optimised_moving(self) -> None:
        """A mobile node whose IKE goes through its home agent's reverse tunnel (the
        balancer sees it from the home address, without an HAO; RFC 6275 §11.3.1) and
        whose ESP is route-optimised (HAO packets from the current care-of address),
        moving a1 -> a2 -> a3: one backend answers every IKE message (the answers come
        back through the home agent's tunnel to the kernel's sockets) and receives the
        ESP."""
        bed, lb = self.start()
        captures = self.backend_captures(bed)
        socks = self.ike_sockets(bed, 1)
        esp_sock = bed.socket("term", socket.AF_INET6, socket.SOCK_RAW, socket.IPPROTO_ESP)
        self.addCleanup(esp_sock.close)
        esp_sock.bind((hoa(1), 0))
        sa = security_association(0x5201)
        spi_i, spi_r = os.urandom(8), os.urandom(8)
        agent = addresses.HOME_AGENT.packed
        answers, payloads = [], []

        def exchange(link: int, port: int, kind: str, responder: bytes, message: int) -> None:
            """An IKE message reverse-tunnelled from the care-of address on ``link``."""
            data = ike(kind, spi_i, responder, message, nat_t=port == NAT_T_PORT)
            inner = IPv6(src=hoa(1), dst=VIP) / UDP(sport=port, dport=port) / data
            from_access_link(bed, link, [packets.encapsulate(bytes(inner),
                                                              packed(coa(1, link)), agent)])
            answers.append(self.answered_by(socks[port], data))

        def esp(n: int) -> None:
            payload = f"tunnelled ike, optimised esp {n}".encode()
            payloads.append(payload)
            inner = sa.encrypt(IPv6(src=hoa(1), dst=VIP) / UDP(sport=4000, dport=4001) / payload)
            esp_sock.sendto(bytes(inner[ESP]), (VIP, 0))

        exchange(1, IKE_PORT, "IKE_SA_INIT", bytes(8), 0)
        exchange(1, NAT_T_PORT, "IKE_AUTH", spi_r, 1)
        esp(0)
        for message, link in enumerate((2, 3), start=2):
            self.assertTrue(bed.move(1, link)["ok"])
            esp(message)
            exchange(link, NAT_T_PORT, "INFORMATIONAL", spi_r, message)
        time.sleep(0.3)
        self.assertEqual(len(set(answers)), 1, answers)
        backend = answers[0]
        self.assertEqual(self.esp_at_backends(captures, sa, payloads), backend)
        self.assertEqual(list(backend_datagrams(bed, hoa(1))), [backend])
        counters = control.request(bed.home_agent_control, "bindings")["counters"]
        self.assertEqual(counters.get("reverse-tunnelled"), 4)
        row = self.holder(lb, f"addr {hoa(1)}")
        self.assertEqual(row["backend"], backend)
        self.assertIn("spi 0x00005201", row["aliases"])
        # IKE_SA_INIT came first (through the home agent's tunnel): keyed by its IKE SPI
        self.assertEqual(lb.ctl("stats")["misses"], {"ike": 1})

    def plain_terminal(self, bed: TestBed) -> int:
        """A terminal (not emulated: its frames are built here) whose care-of addresses
        on a2 and a3 Maglev would both send elsewhere than its address on a1, so that
        only linking can keep it on one backend."""
        for index in range(300, 400):
            first = maglev_choice(bed, coa(index, 1))
            if all(maglev_choice(bed, coa(index, k)) != first for k in (2, 3)):
                return index
        raise AssertionError("no terminal whose care-of addresses all hash apart")

    def send_plain(self, bed: TestBed, link: int, frames: Sequence[Packet]) -> None:
        """Frames from access link ``link``, then a pause (they must arrive in order)."""
        from_access_link(bed, link, frames)
        time.sleep(0.05)

    def test_from_care_of_addresses_esp_first_after_each_move(self) -> None:
        """An IPsec terminal without Mobile IPv6 (every packet from its current care-of
        address, no HAO): IKE_SA_INIT on 500, IKE_AUTH on 4500 and ESP from CoA1; after
        each move ESP first -- its SPI leads to the binding and links the new address --
        then IKE on 4500.  Maglev alone would send CoA2 and CoA3 to other backends; every
        datagram and ESP packet reaches one."""
        bed, lb = self.start()
        index = self.plain_terminal(bed)
        captures = self.backend_captures(bed)
        sa = security_association(0x5301)
        spi_i, spi_r = os.urandom(8), os.urandom(8)
        payloads = []

        def ike_from(link: int, port: int, kind: str, responder: bytes, n: int) -> Packet:
            return IPv6(src=coa(index, link), dst=VIP) / UDP(sport=port, dport=port) / ike(
                kind, spi_i, responder, n, nat_t=port == NAT_T_PORT)

        def esp_from(link: int, n: int) -> Packet:
            payload = f"plain ipsec {n}".encode()
            payloads.append(payload)
            return sa.encrypt(IPv6(src=coa(index, link), dst=VIP) / UDP(sport=4000, dport=4001)
                              / payload)

        self.send_plain(bed, 1, [ike_from(1, IKE_PORT, "IKE_SA_INIT", bytes(8), 0)])
        self.send_plain(bed, 1, [ike_from(1, NAT_T_PORT, "IKE_AUTH", spi_r, 1)])
        self.send_plain(bed, 1, [esp_from(1, 0)])
        for n, link in enumerate((2, 3), start=2):
            self.send_plain(bed, link, [esp_from(link, n)])
            self.send_plain(bed, link, [ike_from(link, NAT_T_PORT, "INFORMATIONAL",
                                                        spi_r, n)])
        time.sleep(0.3)
        backend = self.esp_at_backends(captures, sa, payloads)
        # IKE_SA_INIT came first: the binding is the IKE SA's (its initiator's SPI),
        # where Maglev sends that key; the addresses and the ESP SPI are its aliases.
        ike_key = Key("ike", spi_i)
        self.assertEqual(backend, maglev_choice_for(bed, ike_key))
        for link in (1, 2, 3):
            self.assertEqual(list(backend_datagrams(bed, coa(index, link))), [backend], link)
        row = self.holder(lb, f"addr {coa(index, 1)}")
        self.assertEqual(row["key"], str(ike_key))
        self.assertEqual(sorted(row["aliases"]), sorted(
            [f"addr {coa(index, k)}" for k in (1, 2, 3)] + ["spi 0x00005301"]))
        self.assertEqual(lb.ctl("stats")["conflicts"], {})

    def test_mobike_address_update_before_esp(self) -> None:
        """The same IPsec terminal, moving as MOBIKE moves (RFC 4555 §3.5): from the new
        care-of address the INFORMATIONAL request with UPDATE_SA_ADDRESSES on UDP 4500
        comes first, then ESP.  The IKE message must reach the backend holding the IKE
        SA, like everything else of the terminal."""
        bed, lb = self.start()
        index = self.plain_terminal(bed)
        captures = self.backend_captures(bed)
        sa = security_association(0x5401)
        spi_i, spi_r = os.urandom(8), os.urandom(8)
        payloads = []

        def ike_from(link: int, port: int, kind: str, responder: bytes, n: int) -> Packet:
            return IPv6(src=coa(index, link), dst=VIP) / UDP(sport=port, dport=port) / ike(
                kind, spi_i, responder, n, nat_t=port == NAT_T_PORT)

        def esp_from(link: int, n: int) -> Packet:
            payload = f"mobike {n}".encode()
            payloads.append(payload)
            return sa.encrypt(IPv6(src=coa(index, link), dst=VIP) / UDP(sport=4000, dport=4001)
                              / payload)

        self.send_plain(bed, 1, [ike_from(1, IKE_PORT, "IKE_SA_INIT", bytes(8), 0)])
        self.send_plain(bed, 1, [ike_from(1, NAT_T_PORT, "IKE_AUTH", spi_r, 1)])
        self.send_plain(bed, 1, [esp_from(1, 0)])
        self.send_plain(bed, 2, [ike_from(2, NAT_T_PORT, "INFORMATIONAL", spi_r, 2)])
        self.send_plain(bed, 2, [esp_from(2, 3)])
        time.sleep(0.3)
        backend = self.esp_at_backends(captures, sa, payloads)
        served = {link: list(backend_datagrams(bed, coa(index, link))) for link in (1, 2)}
        self.assertEqual(served, {1: [backend], 2: [backend]},
                         f"table {self.rows(lb)}; stats {lb.ctl('stats')['conflicts']}")



class HomeAgentPoolTests(IdentityBedTestCase):
    """Claim 11: three home agents behind the virtual address, transparent mode."""

    POOL_TERMINALS = range(101, 131)
    LINKS = (1, 2, 3)

    def test_bu_hoti_and_coti_reach_one_home_agent(self) -> None:
        """30 terminals (scapy-built packets), on each of links 1, 2, 3 in turn: first a
        Binding Update from the care-of address with the home address in an HAO -- one
        packet showing both identities -- then a HoTI from the home address (reverse-
        tunnelled through the home agent: no HAO) and a CoTI from the care-of address.
        Captured in the home agents' namespaces and dissected by scapy, every message of
        a terminal reaches the same home agent, its Mobility Header checksum right for the
        new destination; that home agent's binding cache follows the terminal.  Maglev
        alone would send some terminals' care-of addresses to another home agent than
        their home address."""
        bed = self.make_bed()
        lb = self.start_balancer(bed, mode="transparent")
        sockets = start_home_agent_pool(bed)
        captures = {i: self.capture(bed, f"srv{i}", "eth0") for i in sockets}
        split = [t for t in self.POOL_TERMINALS
                 if len({maglev_choice(bed, hoa(t))}
                        | {maglev_choice(bed, coa(t, k)) for k in self.LINKS}) > 1]
        self.assertGreater(len(split), len(self.POOL_TERMINALS) // 2)

        for seq, link in enumerate(self.LINKS, start=1):
            from_access_link(bed, link, [
                IPv6(src=coa(t, link), dst=VIP) / IPv6ExtHdrDestOpt(options=[HAO(hoa=hoa(t))])
                / MIP6MH_BU(seq=seq, flags="AH", mhtime=100) for t in self.POOL_TERMINALS])
            time.sleep(0.2)  # the Binding Updates first
            from_home_link(bed, [IPv6(src=hoa(t), dst=VIP) / MIP6MH_HoTI(cookie=os.urandom(8))
                                 for t in self.POOL_TERMINALS])
            from_access_link(bed, link, [
                IPv6(src=coa(t, link), dst=VIP) / MIP6MH_CoTI(cookie=os.urandom(8))
                for t in self.POOL_TERMINALS])
            time.sleep(0.2)

        # terminal -> home agent index -> messages (BU, HoTI, CoTI) it received
        received: dict[int, dict[int, list[str]]] = {}
        for i, cap in captures.items():
            for p in cap.packets():
                kinds = [(MIP6MH_BU, "BU"), (MIP6MH_HoTI, "HoTI"), (MIP6MH_CoTI, "CoTI")]
                found = [(layer, name) for layer, name in kinds if layer in p]
                if not found:
                    continue
                layer, name = found[0]
                self.assertEqual(p.dst, str(addresses.backend_address(i)))
                self.assert_mh_checksum(p, layer)
                who = p[HAO].hoa if HAO in p else p.src
                t = addresses.terminal_of(who)
                assert t is not None, who
                received.setdefault(t, {}).setdefault(i, []).append(name)
                if name == "HoTI":
                    self.assertEqual(p.src, hoa(t))
                if name == "CoTI":
                    self.assertIn(p.src, [coa(t, k) for k in self.LINKS])
        self.assertEqual(sorted(received), list(self.POOL_TERMINALS))
        together = [t for t, by in received.items() if len(by) == 1]
        self.assertEqual(len(together), len(self.POOL_TERMINALS),
                         {t: by for t, by in received.items() if len(by) > 1})
        holders = {t: next(iter(by)) for t, by in received.items()}
        for t, by in received.items():
            self.assertEqual(sorted(by[holders[t]]), sorted(["BU", "HoTI", "CoTI"] * 3), t)
        self.assertEqual(set(holders.values()), set(sockets))

        def caches() -> dict[str, tuple[int, str, int]]:
            return {b["hoa"]: (i, b["coa"], b["seq"]) for i, path in sockets.items()
                    for b in control.request(path, "bindings")["bindings"]}

        wait_for("every home agent's binding cache", lambda: len(caches()) == len(
            self.POOL_TERMINALS) and all(seq == 3 for _, _, seq in caches().values()))
        self.assertEqual(caches(), {hoa(t): (holders[t], coa(t, 3), 3)
                                    for t in self.POOL_TERMINALS})
        rows = self.rows(lb)
        self.assertEqual(len(rows), len(self.POOL_TERMINALS))
        for row in rows:
            t = addresses.terminal_of(row["key"].split()[1])
            assert t is not None
            self.assertEqual(row["key"], f"addr {hoa(t)}")
            self.assertEqual(row["backend"], addresses.backend_name(holders[t]))
            self.assertEqual(sorted(row["aliases"]),
                             sorted(f"addr {coa(t, k)}" for k in self.LINKS))
        stats = lb.ctl("stats")
        self.assertEqual(stats["misses"], {"hoa": len(self.POOL_TERMINALS)})
        self.assertEqual((stats["conflicts"], stats["dropped"]), ({}, {}))

    def assert_mh_checksum(self, pkt: Packet, layer: type[Packet]) -> None:
        """The Mobility Header checksum is right for the packet as received, by scapy's
        arithmetic: pseudo-header source the HAO's home address when there is one
        (RFC 6275 §6.1.1; scapy's own recomputation only finds an HAO that is alone in
        its header, without the PadN in front of it)."""
        src, dst = pseudo_addresses(pkt)
        mh = bytes(pkt[layer])
        pseudo = packed(src) + packed(dst) + len(mh).to_bytes(4, "big") + bytes((0, 0, 0, 135))
        self.assertEqual(checksum(pseudo + mh), 0, pkt.summary())


#: One terminal per key kind: what it sends first (and so what keys it), on which access
#: link, and the address the backend's replies go to.
EUI64 = "2001:db8:a1::211:22ff:fe33:502"  # universal EUI-64: u bit set, ff:fe in the middle


def kind_packets(kind: str, payload: bytes, location: int = 1,
                 sa: SecurityAssociation | None = None,
                 fragment_id: int | None = None) -> tuple[int, list[Packet | bytes]]:
    """(access link, frames) of the terminal keyed by ``kind``, at its ``location``
    (1 or 2: it moves), sending ``payload`` (fragmented when ``fragment_id`` is given)."""
    def udp(source: str) -> Packet:
        if fragment_id is None:
            return IPv6(src=source, dst=VIP) / UDP(sport=40000, dport=addresses.UDP_PORT) / payload
        return (IPv6(src=source, dst=VIP) / IPv6ExtHdrFragment(id=fragment_id)
                / UDP(sport=40000, dport=addresses.UDP_PORT) / payload)

    def fragmented(pkt: Packet) -> list[Packet | bytes]:
        return list(fragment6(pkt, 1280)) if fragment_id is not None else [pkt]

    if kind == "hoa":
        if fragment_id is None:
            return location, [with_hao(udp(hoa(501)), coa(501, location))]
        # The HAO belongs to the unfragmentable part (RFC 6275 §6.3): in every fragment.
        pkt = (IPv6(src=coa(501, location), dst=VIP)
               / IPv6ExtHdrDestOpt(options=[HAO(hoa=hoa(501))]) / IPv6ExtHdrFragment(
                   id=fragment_id) / UDP(sport=40000, dport=addresses.UDP_PORT) / payload)
        return location, fragmented(pkt)
    if kind == "iid":
        return location, fragmented(udp(EUI64.replace("a1::", f"a{location}::")))
    if kind == "spi":
        assert sa is not None
        enc = sa.encrypt(IPv6(src=coa(503, location), dst=VIP) / UDP(sport=4000, dport=4001)
                         / payload)
        if fragment_id is not None:
            enc = IPv6(src=enc.src, dst=VIP) / IPv6ExtHdrFragment(id=fragment_id) / enc[ESP]
        return location, fragmented(enc)
    return 2, fragmented(udp(coa(504, 2)))  # src: the same address every time


#: What the backends' replies are addressed to, by kind (the terminal's address).
REPLY_TO = {"hoa": hoa(501), "iid": text(EUI64), "spi": coa(503, 1), "src": coa(504, 2)}
#: The key of each terminal's binding in ``show`` (the identity its first packet bound).
BOUND_BY = {"hoa": f"addr {hoa(501)}", "iid": "iid 0211:22ff:fe33:0502",
            "spi": "spi 0x00000503", "src": f"addr {coa(504, 2)}"}
KINDS = tuple(REPLY_TO)


class ErrorsAndFragmentsTests(IdentityBedTestCase):
    """A terminal keyed by each kind: ICMPv6 errors about replies, fragmented datagrams."""

    def bind_each_kind(self, bed: TestBed, lb: BedBalancer, sa: SecurityAssociation,
                       size: int = 16) -> dict[str, str]:
        """Each kind's terminal sends one packet (``size`` bytes of payload); the backend
        of each binding, by kind (each bound by the identity of its kind)."""
        self.send_each_kind(bed, sa, size)
        holders = {}
        for kind in KINDS:
            row = self.holder(lb, f"addr {REPLY_TO[kind]}")
            self.assertEqual(row["key"], BOUND_BY[kind])
            holders[kind] = row["backend"]
        return holders

    def send_each_kind(self, bed: TestBed, sa: SecurityAssociation, size: int) -> None:
        for kind in KINDS:
            link, frames = kind_packets(kind, os.urandom(size), sa=sa)
            from_access_link(bed, link, frames)
        time.sleep(0.3)

    def test_errors_about_replies_reach_the_binding_for_every_key_kind(self) -> None:
        """For a terminal keyed by each kind (hoa, iid, spi, src), the backend holding its
        binding replies (its UDP echo server; for the SPI terminal, ESP from a raw socket
        of its kernel).  The bed's router, on the terminals' side, reports on the
        balancer's replies to the virtual address: first a Packet Too Big (its route to
        the terminal has MTU 1280, the reply is longer), then a Destination Unreachable
        (no route any more).  Each error reaches the backend of the binding and no other:
        addressed to it, ICMPv6 checksum right, its quote reading exactly as the packet
        that backend sent (hop limit aside; a Packet Too Big quotes what fits), by scapy.
        And the backend's kernel takes them: its path MTU to the terminal becomes 1280,
        and the ESP socket is told of both errors."""
        bed = self.make_bed()
        lb = self.start_balancer(bed)
        sa = security_association(0x503)
        sent_by = {i: self.capture(bed, "sw", f"p{i}") for i in bed.backend_indices}
        arrived = self.backend_captures(bed)
        towards = {"hoa": "home", "iid": "acc1", "spi": "acc1", "src": "acc2"}
        macs = {"home": bed.mac("ha", "home"), "acc1": bed.mac("term", "acc1"),
                "acc2": bed.mac("term", "acc2")}
        # The router's path to each terminal: MTU 1280; a neighbour entry, so that no
        # error comes from neighbour discovery failing.  Its ICMPv6 errors are not rate
        # limited (Linux sends at most one a second per destination by default, and all
        # of them go to the virtual address: the second kind would be lost).
        bed.run("net", ["sysctl", "-qw", "net.ipv6.icmp.ratelimit=0"])
        bed.run("net", ["ip", "-6", "-batch", "-"], input="".join(
            f"route replace {REPLY_TO[k]}/128 dev {dev} mtu lock {ROUTER_MTU}\n"
            f"neigh replace {REPLY_TO[k]} lladdr {macs[dev]} dev {dev} nud permanent\n"
            for k, dev in towards.items()))
        # Large enough that the replies (the datagram and "b<i> " back) exceed 1280.
        holders = self.bind_each_kind(bed, lb, sa, size=1240)
        spi_backend = int(holders["spi"][1:])
        esp_sock = bed.socket(f"srv{spi_backend}", socket.AF_INET6, socket.SOCK_RAW,
                              socket.IPPROTO_ESP)
        self.addCleanup(esp_sock.close)
        esp_sock.setsockopt(socket.IPPROTO_IPV6, IPV6_RECVERR, 1)
        answer = security_association(0x9503)

        def esp_reply(size: int) -> None:
            clear = IPv6(src=str(addresses.backend_address(spi_backend)), dst=REPLY_TO["spi"])
            enc = answer.encrypt(clear / UDP(sport=4001, dport=4000) / os.urandom(size))
            esp_sock.sendto(bytes(enc[ESP]), (REPLY_TO["spi"], 0))

        esp_reply(1300)
        time.sleep(0.3)
        bed.run("net", ["ip", "-6", "-batch", "-"], input="".join(
            f"route replace unreachable {address}/128\n" for address in REPLY_TO.values()))
        self.send_each_kind(bed, sa, 16)
        esp_reply(16)
        time.sleep(0.5)

        originals = [p for cap in sent_by.values() for p in cap.packets()]
        got: dict[str, dict[str, list[Packet]]] = {}
        for name, cap in arrived.items():
            for p in cap.packets():
                if ICMPv6PacketTooBig in p or ICMPv6DestUnreach in p:
                    got.setdefault(p[IPerror6].dst, {}).setdefault(name, []).append(p)
        for kind, address in REPLY_TO.items():
            backend = holders[kind]
            self.assertEqual(list(got.get(address, {})), [backend], kind)
            backend_address = str(addresses.backend_address(int(backend[1:])))
            found = got[address][backend]
            self.assertEqual(sorted((p[IPerror6].underlayer.type, p[IPerror6].underlayer.code)
                                    for p in found), [(1, 0), (2, 0)], kind)
            for p in found:
                self.assertEqual((p.src, p.dst),
                                 (str(addresses.BALANCER_ROUTER), backend_address), kind)
                self.assertTrue(l4_checksum_ok(p), (kind, p.summary()))
                if ICMPv6PacketTooBig in p:
                    self.assertEqual(p[ICMPv6PacketTooBig].mtu, ROUTER_MTU)
                quote = bytearray(bytes(p[IPerror6]))
                self.assertEqual(IPv6(bytes(quote)).src, backend_address)
                original = [bytes(o) for o in originals if o.src == backend_address
                            and o.dst == address and len(bytes(o)) >= len(quote)
                            and bytes(o)[8:] .startswith(bytes(quote)[8:48])]
                self.assertTrue(original, kind)
                quote[7] = original[0][7]  # the hop limit: the quote is as the router saw it
                self.assertIn(bytes(quote), [o[:len(quote)] for o in original], kind)
            route = bed.run(f"srv{backend[1:]}", ["ip", "-6", "route", "get", address]).stdout
            self.assertIn(f"mtu {ROUTER_MTU}", route, (kind, route))
            for other in set(arrived) - {backend}:
                route = bed.run(f"srv{other[1:]}", ["ip", "-6", "route", "get", address]).stdout
                self.assertNotIn("mtu", route, (kind, other, route))
        # The ESP replies' sender was told both, by its kernel: (type, code, info).
        queued = []
        while True:
            try:
                _, ancillary, _, _ = esp_sock.recvmsg(
                    2048, 1024, socket.MSG_ERRQUEUE | socket.MSG_DONTWAIT)
            except BlockingIOError:
                break
            for level, kind_, data in ancillary:
                if (level, kind_) == (socket.IPPROTO_IPV6, IPV6_RECVERR):
                    _, origin, icmp_type, code, _, info, _ = struct.unpack_from("=IBBBBII", data)
                    self.assertEqual(origin, SO_EE_ORIGIN_ICMP6)
                    queued.append((icmp_type, code, info))
        self.assertEqual(sorted(queued), [(1, 0, 0), (2, 0, ROUTER_MTU)])
        stats = lb.ctl("stats")
        self.assertEqual(stats["dropped"], {})
        self.assertEqual(stats["misses"], {"hoa": 1, "iid": 1, "spi": 1, "src": 1})

    def test_fragments_follow_their_first_for_every_key_kind(self) -> None:
        """A terminal keyed by each kind sends a 3000-byte datagram in three fragments
        as its first packet (the first fragment makes the binding), then moves (hoa, iid,
        spi: to a2; src cannot) and sends another.  Every fragment reaches the backend
        of the binding, and that backend's kernel reassembles both datagrams (its UDP
        server logs 3000 bytes from the terminal; the ESP ones are reassembled and
        decrypted by scapy)."""
        bed = self.make_bed()
        lb = self.start_balancer(bed)
        sa = security_association(0x503)
        arrived = self.backend_captures(bed)
        payloads = {kind: [os.urandom(3000), os.urandom(3000)] for kind in KINDS}
        for location in (1, 2):
            for n, kind in enumerate(KINDS):
                link, frames = kind_packets(kind, payloads[kind][location - 1], location, sa=sa,
                                            fragment_id=0x7000 + 16 * location + n)
                self.assertEqual(len(frames), 3)
                from_access_link(bed, link, frames)
            time.sleep(0.3)
        holders = {kind: self.holder(lb, BOUND_BY[kind])["backend"] for kind in KINDS}
        peers = {"hoa": [hoa(501)] * 2, "iid": [text(EUI64), text(EUI64.replace("a1", "a2"))],
                 "src": [coa(504, 2)] * 2}
        for kind, addresses_ in peers.items():
            logged: dict[str, list[int]] = {}
            for peer in set(addresses_):
                for name, events in backend_datagrams(bed, peer).items():
                    logged.setdefault(name, []).extend(e["bytes"] for e in events)
            self.assertEqual(logged, {holders[kind]: [3000, 3000]}, kind)
        fragments = {name: [p for p in cap.packets() if ESP in p or (
            IPv6ExtHdrFragment in p and p.src in (coa(503, 1), coa(503, 2)))]
            for name, cap in arrived.items()}
        self.assertEqual([name for name, found in fragments.items() if found],
                         [holders["spi"]])
        esp = fragments[holders["spi"]]
        self.assertEqual(len(esp), 6)
        for n, location in enumerate((1, 2)):
            mine = [p for p in esp if p.src == coa(503, location)]
            whole = defragment6(mine)
            clear = sa.decrypt(IPv6(bytes(whole)))
            self.assertEqual(bytes(clear[UDP].payload), payloads["spi"][n])
        stats = lb.ctl("stats")
        self.assertEqual(stats["dropped"], {})
        self.assertEqual(stats["misses"], {"hoa": 1, "iid": 1, "spi": 1, "src": 1})


class NotifiedMoveTests(IdentityBedTestCase):
    """A terminal whose moves the balancer learns from its home-agent agent."""

    def test_operator_move_after_a_notified_move_takes_every_identity(self) -> None:
        """Terminal 1 sends an HAO packet from CoA1 (binding: its home address), moves to
        a2 -- the home-agent agent tells the balancer -- and the operator then moves the
        terminal to another backend (``lbproxyctl move addr <home>``).  Its next packets
        from CoA2, with an HAO (a Binding Update, data) and without (a CoTI, IKE), must
        all reach the new backend: one terminal, one binding."""
        bed = self.make_bed(register=False)
        pki = BedPki(bed)
        agent = BedAgent.home_agent(bed, pki)
        self.addCleanup(agent.stop)
        agent.start()
        control.request(bed.terminal_control, "register")
        wait_for("registration", lambda: all(t["registered"] for t in bed.terminal_status()))
        lb = self.start_balancer(bed, extra=notify_section(pki, [agent.peer]))
        wait_for("the balancer's connection to the agent",
                 lambda: "notify: connected to ha1" in lb.log())

        def datagram(link: int, mobile: bool, n: int) -> bytes | Packet:
            pkt = IPv6(src=hoa(1) if mobile else coa(1, link), dst=VIP) / UDP(
                sport=40000 + n, dport=addresses.UDP_PORT) / f"datagram {n}".encode()
            return with_hao(pkt, coa(1, link)) if mobile else pkt

        home_key = f"addr {hoa(1)}"
        from_access_link(bed, 1, [datagram(1, True, 0)])
        wait_for("CoA1 confirmed", lambda: self.holder(lb, home_key)["confirmed"])
        before = self.holder(lb, home_key)["backend"]
        self.assertTrue(bed.move(1, 2)["ok"])
        wait_for("CoA2 confirmed", lambda: (r := self.holder(lb, home_key))["confirmed"]
                 and r["care_of"] == coa(1, 2))
        from_access_link(bed, 2, [datagram(2, True, 1)])
        after = next(b for b in ("b1", "b2", "b3") if b != before)
        lb.ctl("move", home_key, after)
        from_access_link(bed, 2, [datagram(2, True, 2), datagram(2, False, 3)])
        time.sleep(0.3)
        served = {n: name for peer in (hoa(1), coa(1, 2))
                  for name, events in backend_datagrams(bed, peer).items()
                  for e in events for n in (int(e["peer_port"]) - 40000,)}
        self.assertEqual(served, {0: before, 1: before, 2: after, 3: after},
                         f"table {self.rows(lb)}")

