"""Care-of address notifications in the network test bed (issue 4, claims 5, 6, 9, 12, 13).

The patent's second embodiment end to end, with the programs an operator runs: the balancer
(``twistd lbproxy``, key chain = source address only) in ns ``lb``; the home-agent agent
(``twistd lbproxy-homeagent``) beside the home agent emulator in ns ``ha``, learning bindings
from the real Binding Updates and Acknowledgements on the home link; or the terminal agent
(``twistd lbproxy-terminal``) in ns ``term``, learning its care-of address from netlink.
They talk over mutually authenticated TLS with certificates from a throw-away CA
(``lbproxy.testbed.agents``).  A real Linux TCP connection from the terminal's home address
runs while the terminal moves CoA1 -> CoA2 -> CoA1; every echoed byte is checked, the
backends' logs say who served it, and ``lbproxyctl show --json`` shows the table.

Without a notification, the balancer would schedule the new care-of address afresh: each
test first checks (with the balancer's own Maglev) that CoA2 hashes to another backend than
CoA1, so staying on one backend is the notification's doing.  Needs root; skips otherwise.

The ``Xdp*`` classes run the same tests with ``[balancer] offload = "xdp"`` (docs/xdp.md) in
a bed made for it.  With the key on the source address the terminals' packets still go up
(the policy keeps that direction out of the driver); the backends' replies leave through
the XDP program, Type 2 Routing Header included, so a confirmation must reach its map
before the next reply.  (The soak, tests/test_notify_soak.py, runs without offload only:
two minutes for what these cover.)
"""

from __future__ import annotations

import ipaddress
import random
import socket
import time
from typing import Any

from scapy.layers.inet import TCP
from scapy.layers.inet6 import IPv6ExtHdrRouting
from twisted.trial.unittest import SynchronousTestCase

from lbproxy.core.keys import Key
from lbproxy.core.selection import Backend, scheduler_from_name
from lbproxy.testbed import addresses, control
from lbproxy.testbed.agents import BedAgent, BedPki, notify_section, track_addresses
from lbproxy.testbed.balancer import BedBalancer, bed_config
from lbproxy.testbed.bed import TestBed
from tests.bedtools import Capture, l4_checksum_ok, require_bed, require_xdp, wait_for

VIP = str(addresses.VIP)
LIFETIME = 300.0


def coa(index: int, link: int) -> str:
    return str(addresses.care_of_address(index, link))


def maglev_choice(bed: TestBed, address: str) -> str:
    """The backend the balancer's Maglev would give a fresh ``src`` key for ``address``."""
    scheduler = scheduler_from_name("maglev")
    scheduler.set_backends([Backend(addresses.backend_name(i), addresses.backend_address(i))
                            for i in bed.backend_indices])
    backend = scheduler.choose(Key("src", ipaddress.IPv6Address(address).packed), {})
    assert backend is not None
    return backend.name


def moving_terminal(bed: TestBed, links: tuple[int, int] = (1, 2)) -> int:
    """A terminal whose two care-of addresses Maglev sends to different backends."""
    for i in range(1, bed.terminals + 1):
        if maglev_choice(bed, coa(i, links[0])) != maglev_choice(bed, coa(i, links[1])):
            return i
    raise AssertionError("no terminal whose CoAs hash apart; use more terminals")


class Connection:
    """A kernel TCP connection in ns term from a terminal's home address to VIP:80."""

    def __init__(self, bed: TestBed, index: int, seed: int = 1) -> None:
        self.sock = bed.socket("term", socket.AF_INET6, socket.SOCK_STREAM)
        self.sock.settimeout(10)
        self.sock.bind((str(addresses.home_address(index)), 0))
        self.sock.connect((VIP, addresses.TCP_PORT))
        self.stream = self.sock.makefile("rb")
        greeting = self.stream.readline().decode().split()
        assert len(greeting) == 4 and greeting[0] == "backend", greeting
        self.backend, self.peer = greeting[1], greeting[3]
        self.rng = random.Random(seed)
        self.sent = 0

    def exchange(self, size: int = 8192) -> None:
        """Send ``size`` random bytes; every one must come back."""
        data = self.rng.randbytes(size)
        self.sock.sendall(data)
        echo = self.stream.read(size)
        assert echo == data, f"echo differs after {self.sent} bytes ({len(echo or b'')} back)"
        self.sent += size

    def close(self) -> None:
        """Half-close, read the end of the stream, close."""
        self.sock.shutdown(socket.SHUT_WR)
        rest = self.stream.read()
        assert rest == b"", rest
        self.stream.close()
        self.sock.close()


class NotifyBedTestCase(SynchronousTestCase):
    """Builds a bed, agents and the balancer per test; always tears everything down."""

    #: ``[balancer] offload = "xdp"`` in a bed made for it (`TestBed(xdp=True)`).
    xdp = False

    def setUp(self) -> None:
        if self.xdp:
            require_xdp()
        else:
            require_bed()

    def bed(self, terminals: int, register: bool = True) -> TestBed:
        bed = TestBed(terminals=terminals, backends=3, register=register, xdp=self.xdp)
        self.addCleanup(bed.stop)
        bed.start()
        return bed

    def agent(self, agent: BedAgent) -> BedAgent:
        self.addCleanup(agent.stop)
        return agent.start()

    def balancer(self, bed: TestBed, pki: BedPki, *agents: BedAgent) -> BedBalancer:
        extra = notify_section(pki, [a.peer for a in agents])
        balancer = BedBalancer(bed, bed_config(bed, key_chain=["src"], lifetime=LIFETIME,
                                               offload="xdp" if self.xdp else None,
                                               extra=extra))  # fmt: skip
        self.addCleanup(balancer.stop)
        balancer.start()
        if self.xdp:
            self.assertEqual(balancer.ctl("stats")["ports"]["xdp"]["active"], 1)
        for a in agents:
            line = f"notify: connected to {a.peer.name}"
            wait_for(f"the balancer's connection to {a.peer.name}",
                     lambda line=line: line in balancer.log())  # type: ignore[misc]
        return balancer

    def rows(self, balancer: BedBalancer, index: int) -> dict[str, dict[str, Any]]:
        """The table's ``src`` rows of terminal ``index``, by care-of address."""
        suffix = f"::{1000 + index}"
        rows = balancer.ctl("show", "--kind", "src")["rows"]
        return {r["key"].split()[1]: r for r in rows if r["key"].endswith(suffix)}

    def confirmed(self, balancer: BedBalancer, index: int, address: str) -> dict[str, Any]:
        """Wait until the agent's word has confirmed ``address``'s entry; the row."""
        try:
            row: dict[str, Any] = wait_for(
                f"a confirmed entry for {address}",
                lambda: (r := self.rows(balancer, index).get(address)) and r["confirmed"] and r)
        except AssertionError as e:
            notes = [line for line in balancer.log().splitlines() if "notify" in line]
            raise AssertionError(f"{e}; table {self.rows(balancer, index)}; "
                                 f"balancer log {notes[-20:]}") from None
        return row

    def assert_no_refusals(self, balancer: BedBalancer, *agents: BedAgent) -> None:
        self.assertNotIn("notify: refused", balancer.log())
        for a in agents:
            self.assertNotIn("refused", a.log())

    def embodiment_2(self, bed: TestBed, balancer: BedBalancer, index: int) -> None:
        """CoA1 -> CoA2 -> CoA1 under a running TCP connection (must-shows 1 and 2)."""
        home = str(addresses.home_address(index))
        coa1, coa2 = coa(index, 1), coa(index, 2)
        self.assertNotEqual(maglev_choice(bed, coa1), maglev_choice(bed, coa2))

        conn = Connection(bed, index)
        self.assertEqual(conn.peer, home)  # translate mode: the backend sees the HoA
        conn.exchange()
        first = self.confirmed(balancer, index, coa1)
        self.assertEqual(first["backend"], conn.backend)

        # CoA1 -> CoA2.  The terminal resumes once the balancer has the new entry: the
        # Binding Acknowledgement and the notification race (docs/notify.md, known limits).
        # The same race is why the kernel first acknowledges the echo from the old address.
        capture = Capture(bed, "term", "acc2")
        self.addCleanup(capture.close)
        time.sleep(0.2)
        self.assertTrue(bed.move(index, 2)["ok"])
        made = self.confirmed(balancer, index, coa2)
        # Made by the notification (no packet from CoA2 yet), with CoA1's backend (T233/T234).
        self.assertEqual((made["packets"], made["backend"]), (0, conn.backend))
        for _ in range(4):
            conn.exchange()
        rows = self.rows(balancer, index)
        self.assertEqual(sorted(rows), sorted([coa1, coa2]))
        self.assertEqual({r["backend"] for r in rows.values()}, {conn.backend})
        self.assertTrue(rows[coa2]["confirmed"])
        self.assertEqual(rows[coa2]["care_of"], coa2)
        for r in rows.values():  # both entries live, with a lifetime counting down
            self.assertTrue(0 < r["left"] <= LIFETIME + 1, r)

        # The confirmed binding: replies reach CoA2 directly with a Type 2 Routing Header
        # carrying the home address (not through the home agent's tunnel).
        replies = [p for p in capture.packets() if TCP in p and p[TCP].sport == 80]
        self.assertTrue(replies)
        for p in replies:
            self.assertEqual((p.src, p.dst), (VIP, coa2))
            rh = p[IPv6ExtHdrRouting]
            self.assertEqual((rh.type, rh.segleft, rh.addresses), (2, 1, [home]))
            self.assertTrue(l4_checksum_ok(p))

        # CoA2 -> CoA1: back to a live entry, which is reused (T235): no new entry.  Nothing
        # uses CoA1's entry meanwhile, so its lifetime only runs down -- until the rekey
        # refreshes it.
        time.sleep(0.2)
        inserts = balancer.ctl("stats")["table"]["inserts"]
        left = self.rows(balancer, index)[coa1]["left"]
        self.assertTrue(bed.move(index, 1)["ok"])
        wait_for("the notification to refresh CoA1's entry",
                 lambda: self.rows(balancer, index)[coa1]["left"] > left + 0.1)
        for _ in range(4):
            conn.exchange()
        rows = self.rows(balancer, index)
        self.assertEqual(sorted(rows), sorted([coa1, coa2]))
        self.assertEqual({r["backend"] for r in rows.values()}, {conn.backend})
        self.assertTrue(rows[coa1]["confirmed"])
        self.assertGreater(rows[coa1]["packets"], first["packets"])
        self.assertEqual(balancer.ctl("stats")["table"]["inserts"], inserts)

        if self.xdp:
            # Key = source address: terminals' packets go up (the policy keeps the
            # inbound direction out of the driver); the replies, Type 2 Routing Header
            # included, left through the program.
            offload = balancer.ctl("stats")["ports"]["xdp"]
            self.assertIn("'src'", offload["inbound_off"])
            self.assertEqual((offload["forwarded"], offload["replies_off"]), (0, ""))
            self.assertGreaterEqual(offload["replies"], len(replies), offload)
        sent = conn.sent
        conn.close()
        self.assertEqual(bed.served_by(home), [conn.backend])
        closes = wait_for("the backend's close record", lambda: [
            e for e in bed.backend_log()[conn.backend]
            if e["event"] == "close" and e.get("peer") == home])
        self.assertEqual(len(closes), 1)
        self.assertEqual(closes[0].get("bytes"), sent)


class HomeAgentNotificationTests(NotifyBedTestCase):
    """Must-shows 1 and 3: the home-agent agent is the source of notifications."""

    def start(self, terminals: int) -> tuple[TestBed, BedAgent, BedBalancer]:
        # The agent must watch the terminals' first registrations, so they wait for it.
        bed = self.bed(terminals, register=False)
        pki = BedPki(bed)
        agent = self.agent(BedAgent.home_agent(bed, pki))
        control.request(bed.terminal_control, "register")
        wait_for("registration", lambda: all(t["registered"] for t in bed.terminal_status()))
        return bed, agent, self.balancer(bed, pki, agent)

    def test_embodiment_2_home_agent(self) -> None:
        """Key = source address only; a terminal moves CoA1 -> CoA2 -> CoA1 during a TCP
        connection; the home-agent agent, observing the real BU/BA, tells the balancer over
        mutual TLS; the terminal stays on its backend with every byte intact, the table
        holds both CoA entries with lifetimes, the return made no new entry (T235), and the
        confirmed CoA gets replies directly with a Type 2 Routing Header."""
        bed, agent, balancer = self.start(terminals=4)
        self.embodiment_2(bed, balancer, moving_terminal(bed))
        self.assertIn("balancer lb.bed.example connected", agent.log())
        self.assert_no_refusals(balancer, agent)

    def test_agent_restart(self) -> None:
        """The home-agent agent restarts while connections run: the balancer reconnects and
        resubscribes, and the terminals' later moves still keep every one on its backend."""
        bed, agent, balancer = self.start(terminals=6)
        indices = range(1, bed.terminals + 1)
        conns = {i: Connection(bed, i, seed=i) for i in indices}
        for i, conn in conns.items():
            conn.exchange()
            self.confirmed(balancer, i, coa(i, 1))
        movers = [i for i in indices if maglev_choice(bed, coa(i, 1)) != maglev_choice(
            bed, coa(i, 2))]
        self.assertTrue(movers)  # some terminals would change backend without notifications

        agent.restart(pause=0.5)
        wait_for("the balancer to reconnect",
                 lambda: balancer.log().count("notify: connected to ha1") >= 2, timeout=15)
        for i in indices:
            self.assertTrue(bed.move(i, 2)["ok"])
        for i, conn in conns.items():
            made = self.confirmed(balancer, i, coa(i, 2))
            self.assertEqual((made["packets"], made["backend"]), (0, conn.backend))
            conn.exchange()
            rows = self.rows(balancer, i)
            self.assertEqual(sorted(rows), sorted([coa(i, 1), coa(i, 2)]))
            self.assertEqual({r["backend"] for r in rows.values()}, {conn.backend})
            self.assertTrue(rows[coa(i, 2)]["confirmed"])
        for i, conn in conns.items():
            conn.close()
            self.assertEqual(bed.served_by(str(addresses.home_address(i))), [conn.backend])
        self.assert_no_refusals(balancer, agent)


class TerminalNotificationTests(NotifyBedTestCase):
    """Must-show 2: the terminal's own agent is the source of notifications."""

    def test_embodiment_2_terminal_agent(self) -> None:
        """As with the home agent, but the terminal agent in ns term sees each move as a
        netlink address event (the emulator keeps only the current CoA on the kernel's
        interfaces) and tells the balancer, which reaches it at the home address."""
        bed = self.bed(terminals=1)
        track_addresses(bed)
        pki = BedPki(bed)
        agent = self.agent(BedAgent.terminal(bed, pki, 1))
        balancer = self.balancer(bed, pki, agent)
        self.embodiment_2(bed, balancer, 1)
        self.assertIn(f"care-of address {coa(1, 2)}", agent.log())
        self.assertIn("balancer lb.bed.example connected", agent.log())
        self.assert_no_refusals(balancer, agent)


class XdpHomeAgentNotificationTests(HomeAgentNotificationTests):
    """The home agent's notifications with the XDP executor (`NotifyBedTestCase.xdp`)."""

    xdp = True


class XdpTerminalNotificationTests(TerminalNotificationTests):
    """The terminal's notifications with the XDP executor."""

    xdp = True
