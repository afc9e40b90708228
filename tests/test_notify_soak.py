"""Soak in the network test bed (issue 11, must-shows 1 and 2): subscriptions that never
lapse, against the real programs, with every lifetime scaled down to seconds.

The balancer (``twistd lbproxy``, key chain = source address only) in ns ``lb``; the
home-agent agent (``twistd lbproxy-homeagent``) beside the home agent emulator in ns ``ha``,
learning bindings from the real Binding Updates and Acknowledgements on the home link; 20
emulated terminals in ns ``term``, each with a kernel UDP socket on its home address.

Scaled down: the home agent grants 12 s bindings (the terminals ask for 3 units of 4 s) and
each terminal re-registers from where it is every 6 s, as a mobile node does before its
binding runs out; table entries live 6 s without traffic; subscriptions have an idle
lifetime of 3 s.  Each terminal sends a datagram every second and moves between three
access links at random times, staying put between moves for 1.5 to 12 s -- mostly longer
than the idle lifetime, which before this change ended its subscription.

A move *reaches the table* when the balancer's table shows the new care-of address's entry
confirmed -- only an accepted notification confirms a care-of address -- on the terminal's
backend, before its next move.  Subscriptions that lapsed or ended are counted by the
balancer itself (its log, and its one-line summary when it stops).  Half-way through, the
balancer restarts: its subscriptions and confirmations come back from the saved table, the
replies to confirmed care-of addresses keep their Type 2 Routing Header, and the next moves
are reported.  Needs root; skips otherwise.
"""

from __future__ import annotations

import json
import random
import re
import socket
import time
from collections.abc import Callable
from typing import Any

from scapy.layers.inet import UDP
from scapy.layers.inet6 import IPv6ExtHdrRouting
from twisted.trial.unittest import SynchronousTestCase

from lbproxy.testbed import addresses, control
from lbproxy.testbed.agents import BedAgent, BedPki, notify_section
from lbproxy.testbed.balancer import BedBalancer, bed_config
from lbproxy.testbed.bed import TestBed
from tests.bedtools import Capture, l4_checksum_ok, require_bed

TERMINALS = 20
BINDING_UNITS = 3  # the terminals' Binding Update lifetime, in units of 4 s: 12 s
BINDING_LIFETIME = 4 * BINDING_UNITS
REREGISTER = BINDING_LIFETIME / 2
TABLE_LIFETIME = 6.0
IDLE_LIFETIME = 3.0
PHASE = 5.5 * BINDING_LIFETIME  # at least five binding lifetimes before the restart
AFTER_RESTART = 3 * BINDING_LIFETIME
VIP = str(addresses.VIP)


class ShortBindingBed(TestBed):
    """The bed whose terminals ask for ``BINDING_UNITS`` x 4 s bindings."""

    __test__ = False

    def _program(self, module: str, *args: str) -> list[str]:
        argv = super()._program(module, *args)
        if module == "terminal":
            argv += ["--lifetime", str(BINDING_UNITS)]
        return argv


def ctl(path: str, command: str, **args: Any) -> Any:
    """One request to the balancer's control socket (lbproxyctl's protocol)."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(5)
        sock.connect(path)
        sock.sendall(json.dumps({"command": command, "args": args}).encode() + b"\n")
        data = b""
        while not data.endswith(b"\n"):
            chunk = sock.recv(1 << 16)
            if not chunk:
                break
            data += chunk
    answer = json.loads(data)
    if not answer.get("ok"):
        raise RuntimeError(answer.get("error"))
    return answer["result"]


def wait_for(what: str, predicate: Callable[[], Any], timeout: float = 15.0) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        try:
            value = predicate()
        except (OSError, RuntimeError, ValueError):
            value = None
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(0.05)


class Move:
    """One move of one terminal, and whether it reached the table."""

    def __init__(self, terminal: int, care_of: str, at: float) -> None:
        self.terminal = terminal
        self.care_of = care_of
        self.at = at
        self.reached: float | None = None  # seconds after the Binding Update


class Soak:
    """Drives the terminals: datagrams, re-registrations, moves; watches the table."""

    def __init__(self, bed: TestBed, balancer: BedBalancer, seed: int = 11) -> None:
        self.bed = bed
        self.balancer = balancer
        self.rng = random.Random(seed)
        self.emulator = control.Client(bed.terminal_control)
        self.sockets: dict[int, socket.socket] = {}
        for i in range(1, TERMINALS + 1):
            sock = bed.socket("term", socket.AF_INET6, socket.SOCK_DGRAM)
            sock.bind((str(addresses.home_address(i)), 0))
            sock.setblocking(False)
            self.sockets[i] = sock
        self.link = dict.fromkeys(self.sockets, 1)
        self.backend: dict[int, str] = {}
        self.served: dict[int, set[str]] = {i: set() for i in self.sockets}
        self.replies = 0
        self.sent = 0
        self.moves: list[Move] = []
        self.pending: dict[int, Move] = {}
        self.polls = 0

    def close(self) -> None:
        self.emulator.close()
        for sock in self.sockets.values():
            sock.close()

    def care_of(self, i: int, link: int | None = None) -> str:
        return str(addresses.care_of_address(i, link or self.link[i]))

    def send(self, i: int) -> None:
        self.sent += 1
        self.sockets[i].sendto(f"t{i} {self.sent}".encode(), (VIP, addresses.UDP_PORT))

    def receive(self) -> None:
        for i, sock in self.sockets.items():
            while True:
                try:
                    data = sock.recv(2048)
                except BlockingIOError:
                    break
                self.replies += 1
                self.served[i].add(data.split(b" ", 1)[0].decode())

    def rows(self) -> dict[str, dict[str, Any]]:
        page = ctl(self.balancer.control_socket, "show", limit=10000)
        return {r["key"].split()[1]: r for r in page["rows"]}

    def check_pending(self, now: float) -> None:
        """Moves whose new care-of address is now confirmed on the terminal's backend."""
        if not self.pending:
            return
        try:
            rows = self.rows()
        except (OSError, RuntimeError, ValueError):
            return  # the balancer is restarting
        self.polls += 1
        for i, move in list(self.pending.items()):
            row = rows.get(move.care_of)
            if row is not None and row["confirmed"] and row["backend"] == self.backend[i]:
                move.reached = now - move.at
                del self.pending[i]

    def register(self, i: int, link: int) -> None:
        """A Binding Update from ``link`` (a move if it is another link)."""
        self.emulator.request("move", terminal=i, link=link, wait=False)

    def start(self) -> None:
        """Every terminal sends until its first care-of address is confirmed."""
        for i in self.sockets:
            self.send(i)

        def confirmed() -> bool:
            self.receive()
            rows = self.rows()
            return all((r := rows.get(self.care_of(i))) is not None and r["confirmed"]
                       for i in self.sockets)  # fmt: skip

        wait_for("every terminal's first care-of address confirmed", confirmed)
        for i in self.sockets:
            (self.backend[i],) = self.served[i]

    def run(self, seconds: float, stop_moving: float = 3.0) -> list[Move]:
        """Datagrams every second, re-registrations every ``REREGISTER`` s, moves at random
        times (none in the last ``stop_moving`` s, so the last ones can be seen arrive)."""
        start = time.monotonic()
        end = start + seconds
        moves: list[Move] = []
        next_send = {i: start + self.rng.random() for i in self.sockets}
        next_registration = {i: start + self.rng.uniform(0, REREGISTER) for i in self.sockets}
        next_move = {i: start + self.gap() for i in self.sockets}
        next_poll = start
        while (now := time.monotonic()) < end or (self.pending and now < end + 5):
            for i in self.sockets:
                if now >= next_send[i]:
                    self.send(i)
                    next_send[i] = now + 1.0
                if now >= next_move[i] and i not in self.pending and now < end - stop_moving:
                    self.link[i] = self.link[i] % 3 + 1
                    move = Move(i, self.care_of(i), now)
                    self.register(i, self.link[i])
                    moves.append(move)
                    self.pending[i] = move
                    next_move[i] = now + self.gap()
                    next_registration[i] = now + REREGISTER
                elif now >= next_registration[i]:
                    self.register(i, self.link[i])  # the same care-of address, a newer seq
                    next_registration[i] = now + REREGISTER
            self.receive()
            if now >= next_poll:
                self.check_pending(now)
                next_poll = now + 0.25
            time.sleep(0.02)
        self.moves += moves
        return moves

    def gap(self) -> float:
        """Stationary for 1.5-3 s (a third of the time) or for 4-12 s: longer than the
        idle lifetime (3 s) and than a table lifetime (6 s)."""
        if self.rng.random() < 1 / 3:
            return self.rng.uniform(1.5, 3.0)
        return self.rng.uniform(4.0, 12.0)


SUMMARY = re.compile(r"notify: (\d+) subscriptions; lifecycle (.*?); notifications "
                     r"accepted=(\d+) refreshed=(\d+) refused=(\d+)")  # fmt: skip
RESTORED = re.compile(r"Restored (\d+) bindings and (\d+) return paths .*; (\d+) notification "
                      r"subscriptions \((\d+) not taken back\)")  # fmt: skip


def summaries(log: str) -> list[dict[str, int]]:
    """The notifier's one-line summaries (one per balancer process that stopped)."""
    out = []
    for m in SUMMARY.finditer(log):
        counts = {k: int(v) for k, v in (kv.split("=") for kv in m.group(2).split())}
        counts.update(subscriptions=int(m.group(1)), accepted=int(m.group(3)),
                      refreshed=int(m.group(4)), refused=int(m.group(5)))  # fmt: skip
        out.append(counts)
    return out


class SoakTests(SynchronousTestCase):
    """Must-shows 1 and 2 of issue 11, in one run of the real programs."""

    def setUp(self) -> None:
        require_bed()

    def test_soak_with_restart(self) -> None:
        bed = ShortBindingBed(terminals=TERMINALS, backends=3, register=False)
        self.addCleanup(bed.stop)
        bed.start()
        pki = BedPki(bed)
        agent = BedAgent.home_agent(bed, pki)
        self.addCleanup(agent.stop)
        agent.start()
        control.request(bed.terminal_control, "register")
        wait_for("registration", lambda: all(t["registered"] for t in bed.terminal_status()))
        section = notify_section(pki, [agent.peer]).replace(
            "enabled = true\n", f"enabled = true\nidle_lifetime = {IDLE_LIFETIME}\n")
        extra = (section + "[persistence]\n"
                 f'path = "{bed.path("state/table.jsonl")}"\ninterval = 1\n')  # fmt: skip
        balancer = BedBalancer(bed, bed_config(bed, key_chain=["src"], lifetime=TABLE_LIFETIME,
                                               extra=extra))  # fmt: skip
        self.addCleanup(balancer.stop)
        balancer.start()
        wait_for("the balancer's connection to ha1",
                 lambda: "notify: connected to ha1" in balancer.log())
        soak = Soak(bed, balancer)
        self.addCleanup(soak.close)
        soak.start()

        # Must-show 1: five binding lifetimes and more of random moves.
        first = soak.run(PHASE)
        reached_first = [m for m in first if m.reached is not None]

        # Must-show 2: the balancer restarts mid-soak.
        captures = [Capture(bed, "term", f"acc{k}") for k in (1, 2, 3)]
        for capture in captures:
            self.addCleanup(capture.close)
        balancer.restart(pause=0.5)
        restored = [tuple(map(int, m.groups())) for m in RESTORED.finditer(balancer.log())]

        def confirmed() -> int:
            rows = soak.rows()
            n = sum(1 for i in soak.sockets if rows.get(soak.care_of(i), {}).get("confirmed"))
            return n if n == TERMINALS else 0

        confirmed_after = wait_for("every current care-of address confirmed", confirmed, 5.0)
        for capture in captures:
            capture.packets(settle=0.05)  # what came before the restart
        for i in soak.sockets:
            soak.send(i)
        time.sleep(1.0)
        soak.receive()
        replies = [p for c in captures for p in c.packets()
                   if UDP in p and p[UDP].sport == addresses.UDP_PORT]  # fmt: skip
        second = soak.run(AFTER_RESTART)
        reached_second = [m for m in second if m.reached is not None]
        balancer.stop()
        log = balancer.log()
        processes = summaries(log)
        ended = log.count("ended: nothing is left of the terminal")
        refused = log.count("notify: refused")
        delays = sorted(m.reached for m in soak.moves if m.reached is not None)
        figures = {
            "terminals": TERMINALS, "binding_lifetime": BINDING_LIFETIME,
            "idle_lifetime": IDLE_LIFETIME, "table_lifetime": TABLE_LIFETIME,
            "moves_before_restart": len(first), "reached_before_restart": len(reached_first),
            "moves_after_restart": len(second), "reached_after_restart": len(reached_second),
            "restored (bindings, paths, subscriptions, dropped)": restored,
            "confirmed_right_after_restart": confirmed_after,
            "replies_with_rh2_after_restart": len(replies),
            "subscription_ends_logged": ended, "refusals_logged": refused,
            "processes": processes, "datagrams": soak.sent, "replies": soak.replies,
            "move_to_table_p50_ms": round(1000 * delays[len(delays) // 2], 1) if delays else None,
            "move_to_table_max_ms": round(1000 * delays[-1], 1) if delays else None,
        }  # fmt: skip
        print("notify soak:", json.dumps(figures))
        with open(bed.path("soak.json"), "w") as handle:
            json.dump(figures, handle)

        # 1: every move reached the table, before and after the restart; nothing lapsed.
        self.assertGreaterEqual(len(first), 80, figures)
        self.assertEqual(len(reached_first), len(first), figures)
        self.assertGreaterEqual(len(second), 40, figures)
        self.assertEqual(len(reached_second), len(second), figures)
        self.assertEqual(len(processes), 2, figures)
        for counts in processes:
            self.assertEqual((counts["ended"], counts["lapsed"]), (0, 0), figures)
            self.assertEqual(counts["subscriptions"], TERMINALS, figures)
            self.assertGreater(counts["refreshed"], 0, figures)  # re-registrations, end to end
        self.assertEqual((ended, refused), (0, 0), figures)
        # Every terminal stayed on its backend the whole time.
        for i, names in soak.served.items():
            self.assertEqual(names, {soak.backend[i]}, (i, figures))
        # 2: subscriptions and confirmations restored; replies keep their Type 2 header.
        self.assertEqual(len(restored), 1, figures)
        self.assertEqual(restored[0][2:], (TERMINALS, 0), figures)
        self.assertEqual(restored[0][1], TERMINALS, figures)
        self.assertEqual(processes[1]["restored"], TERMINALS, figures)
        self.assertEqual(confirmed_after, TERMINALS, figures)
        self.assertGreaterEqual(len(replies), TERMINALS, figures)
        for p in replies:
            rh = p[IPv6ExtHdrRouting]
            t = addresses.terminal_of(p.dst)
            assert t is not None
            self.assertEqual((p.src, rh.type, rh.segleft), (VIP, 2, 1))
            self.assertEqual(rh.addresses, [str(addresses.home_address(t))])
            self.assertTrue(l4_checksum_ok(p))
