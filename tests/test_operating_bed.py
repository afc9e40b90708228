"""Operating the balancer in the network test bed: health, drain, reload, restart, HA pools.

The unit tests prove each operator feature against fakes; these prove them where they
matter, with ``twistd -n lbproxy`` in the bed's balancer namespace (docs/testbed.md), real
Linux TCP servers behind it and real kernel TCP sessions from moving terminals in front:

* a backend whose server dies gets no new terminals within the fall window, and gets them
  again within the rise window after it comes back; a drained backend keeps its terminals
  (their TCP sessions go on) while new ones go elsewhere (issue 5, must-show 4);
* a reload with a changed backend list keeps every binding to the surviving backends and
  their live sessions; a broken file is refused, by ``lbproxyctl reload``'s exit status and
  in the log, and the running configuration stays (must-show 5);
* a restart with persistence puts every terminal back on its backend, and TCP sessions
  opened before the restart carry on after it (must-show 6);
* a virtual address fronting a pool of three home agents: each terminal's Binding Updates,
  from changing care-of addresses, all reach the same home agent (claim 11, must-show 7).

Needs root; without it every test skips with the reason.  The schedulers are round robin,
not Maglev, so that stickiness can only come from the table (a consistent hash would put a
terminal back on its backend anyway).

The ``Xdp*`` classes run tests with ``[balancer] offload = "xdp"`` (docs/xdp.md) in a bed
made for it (`OperatingBedTestCase.xdp`): the established sessions' packets then stay in
the XDP program, so what an operator changes (a backend down, drained, removed by a
reload; a restart) must reach its maps.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterable, Sequence
from typing import Any

from prometheus_client.parser import text_string_to_metric_families
from twisted.python import log
from twisted.trial.unittest import SynchronousTestCase

from lbproxy.ops import ctl
from lbproxy.testbed import addresses, control
from lbproxy.testbed.balancer import BedBalancer, bed_config
from lbproxy.testbed.bed import TestBed
from lbproxy.wire import mobility
from tests.bedtools import require_bed, require_xdp

VIP = str(addresses.VIP)


def operating_config(
    bed: TestBed,
    *,
    key_chain: Sequence[str] = ("hoa", "src"),
    scheduler: str = "round_robin",
    **options: Any,
) -> str:
    """The bed's balancer configuration with this module's defaults (round robin, so
    stickiness can only come from the table); a bed made for XDP offloads."""
    options.setdefault("offload", "xdp" if bed.xdp else None)
    return bed_config(bed, key_chain=key_chain, scheduler=scheduler, **options)


class Session:
    """A live TCP session from terminal ``index``'s home address to VIP:80.

    The backend's greeting says who serves it; ``echo`` proves the session still works
    (every byte comes back).
    """

    def __init__(self, bed: TestBed, index: int, timeout: float = 10.0) -> None:
        self.index = index
        self.hoa = str(addresses.home_address(index))
        self.sock = bed.socket("term", socket.AF_INET6, socket.SOCK_STREAM)
        self.sock.settimeout(timeout)
        self.buffer = b""
        self.sent = 0
        self.sock.bind((self.hoa, 0))
        self.sock.connect((VIP, addresses.TCP_PORT))
        greeting = self._line().split()
        if len(greeting) != 4 or greeting[0] != "backend" or greeting[3] != self.hoa:
            raise AssertionError(f"bad greeting {greeting!r}")
        self.backend = greeting[1]

    def _line(self) -> str:
        while b"\n" not in self.buffer:
            chunk = self.sock.recv(4096)
            if not chunk:
                raise ConnectionError("closed before the greeting")
            self.buffer += chunk
        line, self.buffer = self.buffer.split(b"\n", 1)
        return line.decode()

    def echo(self, size: int = 3000) -> None:
        """Send ``size`` bytes and read them all back (raises if the session is broken)."""
        data = os.urandom(size)
        self.sock.sendall(data)
        got = self.buffer
        self.buffer = b""
        while len(got) < size:
            chunk = self.sock.recv(65536)
            if not chunk:
                raise ConnectionError(f"terminal {self.index}: closed after {len(got)} bytes")
            got += chunk
        if got != data:
            raise AssertionError(f"terminal {self.index}: echo differs")
        self.sent += size

    def close(self) -> None:
        self.sock.close()


def key_of(index: int) -> str:
    """The table key of terminal ``index`` (its home address)."""
    return f"addr {addresses.home_address(index)}"


def wait_for(condition: Callable[[], Any], timeout: float, what: str, step: float = 0.05) -> float:
    """Poll ``condition`` until it is true; the seconds it took.  Fails after ``timeout``."""
    start = time.monotonic()
    while True:
        if condition():
            return time.monotonic() - start
        if time.monotonic() - start > timeout:
            raise AssertionError(f"{what}: not within {timeout} s")
        time.sleep(step)


class OperatingBedTestCase(SynchronousTestCase):
    """A bed and one balancer per test, always torn down."""

    terminals = 12
    #: ``[balancer] offload = "xdp"`` in a bed made for it (`TestBed(xdp=True)`).
    xdp = False

    def setUp(self) -> None:
        if self.xdp:
            require_xdp()
        else:
            require_bed()
        self.bed = TestBed(terminals=self.terminals, backends=3, xdp=self.xdp)
        self.addCleanup(self.bed.stop)
        self.bed.start()

    def balancer(self, config: str, name: str = "lbproxy") -> BedBalancer:
        lb = BedBalancer(self.bed, config, name=name)
        self.addCleanup(lb.stop)
        lb.start()
        self.addCleanup(self.diagnostics, lb)
        if self.xdp:
            self.assertEqual(lb.ctl("stats")["ports"]["xdp"]["active"], 1)
        return lb

    def diagnostics(self, lb: BedBalancer) -> None:
        """Into the test log (_trial_temp/test.log): what to look at when a test failed."""
        try:
            stats = self.request("stats", timeout=2)
        except Exception as e:
            stats = repr(e)
        counters: object
        try:
            counters = self.bed.terminal_counters()
        except Exception as e:
            counters = repr(e)
        log.msg(f"{self.id()}: balancer stats {stats}; terminal emulator {counters}; "
                f"balancer log tail:\n{lb.log()[-3000:]}")

    def assert_offloaded(self, forwarded: bool = True) -> dict[str, Any]:
        """With ``xdp``: the program is attached and forwarded packets in both directions
        (`forwarded`), or handed every packet up (not `forwarded`: nothing it may take)."""
        stats = self.request("stats")
        offload = stats["ports"]["xdp"]
        self.assertEqual(offload["active"], 1, offload)
        # The shared counters include what the program forwarded (`stats` folds it in).
        self.assertGreaterEqual(stats["packets_in"], offload["forwarded"], stats)
        self.assertGreaterEqual(stats["replies_in"], offload["replies"], stats)
        if forwarded:
            self.assertGreater(offload["forwarded"], 0, offload)
            self.assertGreater(offload["replies"], 0, offload)
        else:
            self.assertEqual((offload["forwarded"], offload["replies"]), (0, 0), offload)
            self.assertGreater(offload["passed"], 0, offload)
        return offload

    def request(self, command: str, timeout: float = 10.0, **args: Any) -> Any:
        """The control socket, in process (quick enough to poll)."""
        return ctl.request(self.bed.path("lbproxy-control.sock"), command, args, timeout)

    def lbproxyctl(self, *args: str) -> subprocess.CompletedProcess[str]:
        """Run the real ``lbproxyctl`` command (exit status and messages matter)."""
        return subprocess.run(
            [sys.executable, "-m", "lbproxy.ops.ctl", "--socket",
             self.bed.path("lbproxy-control.sock"), *args],
            capture_output=True, text=True, timeout=30, check=False,
        )

    def open(self, indices: Iterable[int]) -> dict[int, Session]:
        sessions = {}
        for i in indices:
            sessions[i] = Session(self.bed, i)
            self.addCleanup(sessions[i].close)
        return sessions

    def table(self) -> dict[str, str]:
        """key -> backend name, from ``lbproxyctl show``."""
        return {row["key"]: row["backend"] for row in self.request("show")["rows"]}

    def state(self, backend: str) -> str:
        return next(b["state"] for b in self.request("backends") if b["name"] == backend)

    def tearDown(self) -> None:
        for name in ("lbproxy", "lbproxy-again"):
            log = self.bed.path(f"{name}.log")
            if os.path.exists(log):
                with open(log, errors="replace") as f:
                    self.assertNotIn("Traceback", f.read())


# Health timing of the tests: a dead server is down after `fall` failed probes
# `interval` apart; back up after `rise` good ones.
INTERVAL, TIMEOUT, RISE, FALL = 0.4, 0.3, 2, 3
HEALTH = (f"[health]\ninterval = {INTERVAL}\ntimeout = {TIMEOUT}\nrise = {RISE}\n"
          f"fall = {FALL}\ndead_backend = \"reassign\"\n"
          "[metrics]\nendpoint = \"tcp:9464:interface=127.0.0.1\"\n")


class HealthAndDrainTests(OperatingBedTestCase):
    def scrape(self) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
        """The balancer's /metrics, parsed by prometheus_client: (name, labels) -> value."""
        sock = self.bed.socket("lb", socket.AF_INET, socket.SOCK_STREAM)
        try:
            sock.settimeout(5)
            sock.connect(("127.0.0.1", 9464))
            sock.sendall(b"GET /metrics HTTP/1.0\r\nHost: localhost\r\n\r\n")
            data = b""
            while chunk := sock.recv(65536):
                data += chunk
        finally:
            sock.close()
        head, _, body = data.partition(b"\r\n\r\n")
        self.assertIn(b" 200 ", head.split(b"\r\n")[0])
        return {
            (sample.name, tuple(sorted(sample.labels.items()))): sample.value
            for family in text_string_to_metric_families(body.decode())
            for sample in family.samples
        }

    def test_dead_server_gets_no_new_terminals_and_returns(self) -> None:
        """Must-show 4a: when b2's server dies, b2 is marked down within the fall window
        (fall x interval + timeout) and no new terminal is bound to it; a terminal that
        was on it moves on its next connection (dead_backend = reassign); once the server
        is back, b2 is up again within the rise window and new terminals land on it.
        The metrics endpoint shows the same (backend_up, reassigned, packets moving)."""
        self.balancer(operating_config(self.bed, health=True, extra=HEALTH))
        wait_for(lambda: all(b["state"] == "up" for b in self.request("backends")),
                 5, "all backends up")
        before = self.open(range(1, 4))  # round robin: one terminal per backend
        self.assertEqual(sorted(s.backend for s in before.values()), ["b1", "b2", "b3"])
        on_b2 = next(i for i, s in before.items() if s.backend == "b2")
        metrics = self.scrape()
        self.assertEqual(metrics["lbproxy_backend_up", (("backend", "b2"),)], 1)

        server = self.bed.processes()["b2"]
        os.killpg(server.pid, signal.SIGTERM)
        server.wait(5)
        killed = time.monotonic()
        took = wait_for(lambda: self.state("b2") == "down", 10, "b2 down")
        fall_window = FALL * INTERVAL + TIMEOUT
        self.assertLessEqual(took, fall_window + 0.5, "down later than the fall window")
        self.assertGreaterEqual(time.monotonic() - killed, (FALL - 1) * INTERVAL * 0.9)

        # New terminals while b2 is down: none is bound to b2.
        during = self.open(range(4, 10))
        self.assertEqual({s.backend for s in during.values()}, {"b1", "b3"})
        # The terminal that was on b2 lost its server; its next connection is reassigned.
        again = Session(self.bed, on_b2)
        self.addCleanup(again.close)
        self.assertIn(again.backend, ("b1", "b3"))
        again.echo()
        self.assertNotIn("b2", {v for k, v in self.table().items()})
        for i, s in before.items():
            if i != on_b2:
                s.echo()  # sessions on the live backends carry on
        metrics = self.scrape()
        self.assertEqual(metrics["lbproxy_backend_up", (("backend", "b2"),)], 0)
        self.assertEqual(metrics["lbproxy_reassigned_total", ()], 1)
        self.assertEqual(metrics["lbproxy_backend_bindings", (("backend", "b2"),)], 0)

        # The server comes back (same program, same log): up after `rise` good probes.
        self.bed.spawn("srv2", self.bed.python_module(
            "lbproxy.testbed.server", "--name", "b2", "--log", self.bed.path("b2.log")),
            name="b2-again")
        wait_for(lambda: sum(e["event"] == "listening"
                             for e in self.bed.backend_log()["b2"]) == 2, 10, "b2 listening")
        took = wait_for(lambda: self.state("b2") == "up", 10, "b2 up")
        self.assertLessEqual(took, RISE * INTERVAL + TIMEOUT + 0.5, "up later than rise")
        after = self.open(range(10, 13))
        self.assertIn("b2", {s.backend for s in after.values()})
        for s in after.values():
            s.echo()
        self.assertEqual(self.bed.served_by(str(addresses.home_address(10))) +
                         self.bed.served_by(str(addresses.home_address(11))) +
                         self.bed.served_by(str(addresses.home_address(12))),
                         sorted(s.backend for s in after.values()))
        later = self.scrape()
        self.assertEqual(later["lbproxy_backend_up", (("backend", "b2"),)], 1)
        self.assertGreater(later["lbproxy_packets_in_total", ()],
                           metrics["lbproxy_packets_in_total", ()])
        self.assertGreater(later["lbproxy_backend_packets_total", (("backend", "b2"),)], 0)

    def test_drain_keeps_sessions_new_terminals_elsewhere(self) -> None:
        """Must-show 4b: after ``lbproxyctl drain b1`` the terminals bound to b1 keep it:
        their open TCP sessions go on (also across a care-of address change) and a new
        connection of theirs still lands on b1; new terminals go to b2 and b3 only."""
        lb = self.balancer(operating_config(self.bed))
        sessions = self.open(range(1, 7))
        on_b1 = sorted(i for i, s in sessions.items() if s.backend == "b1")
        self.assertEqual(len(on_b1), 2)
        answer = self.lbproxyctl("drain", "b1")
        self.assertEqual(answer.returncode, 0, answer.stderr)
        backends = {b["name"]: b for b in lb.ctl("backends")}
        self.assertEqual(backends["b1"]["weight"], 0)
        self.assertEqual(backends["b1"]["bindings"], 2)

        for s in sessions.values():
            s.echo()
        self.bed.move(on_b1[0], 2)  # a drained backend's terminal moves: still b1
        for s in sessions.values():
            s.echo()
        newcomers = self.open(range(7, 13))
        self.assertEqual({s.backend for s in newcomers.values()}, {"b2", "b3"})
        returning = Session(self.bed, on_b1[1])
        self.addCleanup(returning.close)
        self.assertEqual(returning.backend, "b1")
        returning.echo()
        table = self.table()
        self.assertEqual(sorted(k for k, v in table.items() if v == "b1"),
                         sorted(key_of(i) for i in on_b1))
        for i, s in sessions.items():
            self.assertEqual(self.bed.served_by(s.hoa), [s.backend], i)


class ReloadTests(OperatingBedTestCase):
    def test_reload_keeps_surviving_bindings_and_refuses_broken_file(self) -> None:
        """Must-show 5: a reload that removes b3 keeps every binding to b1 and b2 and their
        live TCP sessions; new terminals go to b1/b2 only, and so do b3's terminals on
        their next connection.  A broken file is refused with
        a message naming the file, key and reason (``lbproxyctl reload`` exits 1; the log
        says it too, also for SIGHUP) and the running configuration stays."""
        lb = self.balancer(operating_config(self.bed))
        sessions = self.open(range(1, 7))
        bound = self.table()
        self.assertEqual(sorted(bound.values()), ["b1", "b1", "b2", "b2", "b3", "b3"])

        with open(lb.config_path, "w") as f:
            f.write(operating_config(self.bed, backends=(1, 2), weights={2: 3}))
        answer = self.lbproxyctl("reload")
        self.assertEqual(answer.returncode, 0, answer.stderr)
        self.assertIn("reloaded", answer.stdout)
        backends = {b["name"]: b["weight"] for b in lb.ctl("backends")}
        self.assertEqual(backends, {"b1": 1, "b2": 3})
        table = self.table()
        for key, backend in bound.items():
            if backend != "b3":
                self.assertEqual(table.get(key), backend, key)
        for s in sessions.values():
            if s.backend != "b3":
                s.echo()
        newcomers = self.open(range(7, 13))
        self.assertLessEqual({s.backend for s in newcomers.values()}, {"b1", "b2"})
        for s in newcomers.values():
            s.echo()
        # The terminals that were on b3 are moved on their next connection (b3's replies
        # would no longer be accepted from a backend that is not configured).
        orphans = sorted(i for i, s in sessions.items() if s.backend == "b3")
        moved = self.open(orphans)
        for s in moved.values():
            self.assertIn(s.backend, ("b1", "b2"))
            s.echo()
        self.assertEqual(lb.ctl("stats")["reassigned"], len(orphans))

        # A broken file: refused, reported, and nothing changes.
        good = self.table()
        with open(lb.config_path, "w") as f:
            f.write(operating_config(self.bed, scheduler="fastest"))
        answer = self.lbproxyctl("reload")
        self.assertEqual(answer.returncode, 1)
        self.assertIn(lb.config_path, answer.stderr)
        self.assertIn("balancer.scheduler", answer.stderr)
        self.assertIn("'fastest' is not a registered scheduler", answer.stderr)
        wait_for(lambda: "reload refused" in lb.log() and "fastest" in lb.log(), 5,
                 "the refusal in the log")
        with open(lb.config_path, "w") as f:
            f.write("[balancer\nmode = ")  # not even TOML, this time by SIGHUP
        assert lb.process is not None
        lb.process.send_signal(signal.SIGHUP)
        wait_for(lambda: lb.log().count("reload refused") >= 2, 5, "SIGHUP refusal logged")
        self.assertIn("(syntax)", lb.log())
        self.assertIsNone(lb.process.poll())
        self.assertEqual({b["name"]: b["weight"] for b in lb.ctl("backends")},
                         {"b1": 1, "b2": 3})
        self.assertEqual(self.table(), good)
        for group in (sessions, newcomers):
            for s in group.values():
                if s.backend != "b3":
                    s.echo()


class PersistenceTests(OperatingBedTestCase):
    def test_restart_keeps_terminals_on_their_backends(self) -> None:
        """Must-show 6: with ``[persistence]``, stopping twistd and starting it again puts
        every terminal back on its backend: TCP sessions opened before the restart carry
        on after it, and new connections land where the terminals were.  The bindings
        were placed by the operator (``lbproxyctl move``) in a pattern round robin would
        never produce (nothing on b2), so only the saved table can explain the result."""
        path = self.bed.path("table.jsonl")
        config = operating_config(
            self.bed, extra=f'[persistence]\npath = "{path}"\ninterval = 1.0\n')
        lb = self.balancer(config)
        placed = {1: "b3", 2: "b1", 3: "b3", 4: "b1", 5: "b3", 6: "b1"}
        for i, backend in placed.items():
            answer = self.lbproxyctl("move", key_of(i), backend)
            self.assertEqual(answer.returncode, 0, answer.stderr)
        sessions = self.open(placed)
        self.assertEqual({i: s.backend for i, s in sessions.items()}, placed)
        for s in sessions.values():
            s.echo()
        before = self.table()

        lb.stop()
        restarted = self.balancer(config, name="lbproxy-again")
        self.assertEqual(self.table(), before)
        for s in sessions.values():
            s.echo()  # the same TCP sessions, through the new process
        again = self.open(reversed(list(placed)))  # any order: the table decides
        self.assertEqual({i: s.backend for i, s in again.items()}, placed)
        for i in placed:
            self.assertEqual(self.bed.served_by(str(addresses.home_address(i))), [placed[i]])
        stats = restarted.ctl("stats")
        self.assertEqual(stats["misses"], {})  # no terminal went through the scheduler
        self.assertIn("Saved 6 bindings", lb.log())
        self.assertIn("Restored 6 bindings", restarted.log())


class HomeAgentPoolTests(OperatingBedTestCase):
    """Claim 11: the backends are home agents, the virtual address is their address."""

    terminals = 1  # the bed's own terminals are not used; these BUs come from the test

    def start_pool(self) -> dict[int, str]:
        """A home agent (the bed's emulator) in each srv namespace, on that backend's
        address; its control socket path by backend index."""
        sockets = {}
        for i in self.bed.backend_indices:
            role = f"srv{i}"
            rules = self.bed.path(f"{role}-ha.nft")
            with open(rules, "w") as f:
                # the kernel has no MIPv6: it would answer a BU with Parameter Problem
                f.write("table ip6 lbob {\n chain prerouting {\n"
                        "  type filter hook prerouting priority raw; policy accept;\n"
                        '  iifname "eth0" meta l4proto mobility-header drop\n }\n}\n')
            self.bed.run(role, ["nft", "-f", rules])
            sockets[i] = self.bed.path(f"ha{i}.sock")
            self.bed.spawn(role, self.bed.python_module(
                "lbproxy.testbed.homeagent", "--address", str(addresses.backend_address(i)),
                "--iface", "eth0", "--control", sockets[i],
                "--log", self.bed.path(f"ha{i}.log")), name=f"ha{i}")
        for i, path in sockets.items():
            wait_for(lambda p=path: _answers(p), 10, f"home agent {i}")  # type: ignore[misc]
        return sockets

    def send_bu(self, index: int, link: int, seq: int) -> None:
        """Terminal ``index``'s Binding Update from its care-of address on ``link``, to
        the virtual address (its home agent's address), as RFC 6275 §11.7.1 builds it."""
        care_of = addresses.care_of_address(index, link).packed
        packet = mobility.bu_packet(
            care_of, addresses.VIP.packed, addresses.home_address(index).packed,
            mobility.BindingUpdate(seq=seq, lifetime=100, flags=mobility.BU_HOME))
        sock = self.bed.socket("term", socket.AF_PACKET, socket.SOCK_RAW)
        try:
            sock.bind((f"acc{link}", 0))
            mac = bytes.fromhex(self.bed.mac("net", f"acc{link}").replace(":", ""))
            sock.send(mac + bytes(6) + b"\x86\xdd" + packet)
        finally:
            sock.close()

    def test_binding_updates_of_a_terminal_reach_one_home_agent(self) -> None:
        """Must-show 7: twelve terminals each send Binding Updates from four care-of
        addresses in turn (links 1, 2, 3, 1) to the virtual address; the balancer, in
        transparent mode keyed on the home address, hands every BU of one terminal to the
        same home agent of the three, which accepts each (checksum, HAO, sequence number)
        and whose binding cache follows the terminal from care-of address to care-of
        address; the terminals are spread over all three home agents."""
        lb = self.balancer(operating_config(self.bed, mode="transparent"))
        sockets = self.start_pool()
        terminals = range(101, 113)
        path = (1, 2, 3, 1)
        for seq, link in enumerate(path, start=1):
            for i in terminals:
                self.send_bu(i, link, seq)
            time.sleep(0.05)

        def cache(i: int) -> list[dict[str, Any]]:
            return control.request(sockets[i], "bindings")["bindings"]

        wait_for(lambda: sum(len(cache(i)) for i in sockets) == len(terminals) and all(
            b["seq"] == len(path) for i in sockets for b in cache(i)), 10, "every BU in")
        holders: dict[str, list[int]] = {}
        for i in sockets:
            for b in cache(i):
                holders.setdefault(b["hoa"], []).append(i)
                self.assertEqual(b["coa"], str(addresses.care_of_address(
                    addresses.terminal_of(b["hoa"]) or 0, path[-1])))
        self.assertEqual(sorted(holders), sorted(str(addresses.home_address(t))
                                                 for t in terminals))
        self.assertTrue(all(len(h) == 1 for h in holders.values()), holders)
        self.assertEqual({h[0] for h in holders.values()}, {1, 2, 3})

        # Each home agent's log: every BU of its terminals, in order, none refused.
        for i in sockets:
            events = self.bed._read_log(f"ha{i}.log")
            self.assertEqual([e for e in events if e["event"] != "bound"], [])
            mine = {hoa for hoa, h in holders.items() if h == [i]}
            self.assertEqual({e["hoa"] for e in events}, mine)
            for hoa in mine:
                index = addresses.terminal_of(hoa) or 0
                chain = [(e["seq"], e["coa"], e["previous"]) for e in events
                         if e["hoa"] == hoa]
                coas = [str(addresses.care_of_address(index, k)) for k in path]
                self.assertEqual(chain, [(n + 1, coas[n], coas[n - 1] if n else None)
                                         for n in range(len(path))])
        table = lb.ctl("show")
        self.assertEqual(table["total"], len(terminals))
        self.assertEqual({r["kind"] for r in table["rows"]}, {"addr"})
        self.assertEqual({r["key"]: r["backend"] for r in table["rows"]},
                         {f"addr {hoa}": addresses.backend_name(h[0])
                          for hoa, h in holders.items()})
        self.assertEqual(lb.ctl("stats")["misses"], {"hoa": len(terminals)})


class XdpHealthAndDrainTests(HealthAndDrainTests):
    """Health and drain with the sessions' packets in the XDP program: a backend down
    takes its bindings' packets out of the driver (the core reassigns them)."""

    xdp = True

    def test_dead_server_gets_no_new_terminals_and_returns(self) -> None:
        super().test_dead_server_gets_no_new_terminals_and_returns()
        self.assert_offloaded()

    def test_drain_keeps_sessions_new_terminals_elsewhere(self) -> None:
        super().test_drain_keeps_sessions_new_terminals_elsewhere()
        self.assert_offloaded()


class XdpReloadTests(ReloadTests):
    """A reload with the program attached: a removed backend's bindings go up."""

    xdp = True

    def test_reload_keeps_surviving_bindings_and_refuses_broken_file(self) -> None:
        super().test_reload_keeps_surviving_bindings_and_refuses_broken_file()
        self.assert_offloaded()


class XdpPersistenceTests(PersistenceTests):
    """A restart with the program: the old process's links go with it, the new one
    mirrors the restored table before its first packet."""

    xdp = True

    def test_restart_keeps_terminals_on_their_backends(self) -> None:
        super().test_restart_keeps_terminals_on_their_backends()
        self.assert_offloaded()


class XdpHomeAgentPoolTests(HomeAgentPoolTests):
    """Binding Updates are the core's (mobility headers): the program hands each up."""

    xdp = True

    def test_binding_updates_of_a_terminal_reach_one_home_agent(self) -> None:
        super().test_binding_updates_of_a_terminal_reach_one_home_agent()
        self.assert_offloaded(forwarded=False)


def _answers(path: str) -> bool:
    try:
        control.request(path, "bindings")
    except (OSError, control.ControlError):
        return False
    return True
