"""Quiet logs from the real ``twistd -n lbproxy`` in the network test bed (issue 14, must-show 6).

The balancer runs in the bed's ``lb`` namespace with TCP health checks on the bed's three
real servers every 0.05 s (about 60 probes a second: two minutes at the default 2 s
interval is 180 probes, so the window below holds several times the checks an operator's
two minutes would), metrics scrapes and read-only ``lbproxyctl`` calls.  The log must
gain at most a handful of lines in that window (before: two lines per probe, one per
scrape).  Then one ``lbproxyctl move`` adds exactly one line: the audit line naming the
peer's uid.  With ``[logging] format = "json"`` every line is a JSON object and the audit
line carries its parts.

Needs root; without it every test skips with the reason.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from typing import Any

from twisted.python import log
from twisted.trial.unittest import SynchronousTestCase

from lbproxy.ops import ctl
from lbproxy.testbed import addresses
from lbproxy.testbed.balancer import BedBalancer, bed_config
from lbproxy.testbed.bed import TestBed
from tests.bedtools import require_bed

#: The window, seconds, and the most lines the log may gain in it.
WINDOW = 8.0
HANDFUL = 5

EXTRA = (
    "[health]\ninterval = 0.05\ntimeout = 0.5\nrise = 2\nfall = 3\n"
    '[metrics]\nendpoint = "tcp:9464:interface=127.0.0.1"\n'
)


class QuietLogTests(SynchronousTestCase):
    def setUp(self) -> None:
        require_bed()
        self.bed = TestBed(terminals=2, backends=3)
        self.addCleanup(self.bed.stop)
        self.bed.start()

    def balancer(self, extra: str = "") -> BedBalancer:
        config = bed_config(self.bed, health=True, scheduler="round_robin", extra=EXTRA + extra)
        lb = BedBalancer(self.bed, config)
        self.addCleanup(lb.stop)
        lb.start()
        return lb

    def lines(self, lb: BedBalancer) -> list[str]:
        return lb.log().splitlines()

    def get(self, path: str) -> bytes:
        sock = self.bed.socket("lb", socket.AF_INET, socket.SOCK_STREAM)
        try:
            sock.settimeout(5)
            sock.connect(("127.0.0.1", 9464))
            sock.sendall(f"GET {path} HTTP/1.0\r\nHost: localhost\r\n\r\n".encode())
            data = b""
            while chunk := sock.recv(65536):
                data += chunk
        finally:
            sock.close()
        return data

    def lbproxyctl(self, lb: BedBalancer, *args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "lbproxy.ops.ctl", "--socket", lb.control_socket, *args],
            capture_output=True, text=True, timeout=30, check=False,
        )

    def probes(self) -> int:
        """Connections the bed's servers accepted from the balancer's server-side address
        (its health checks)."""
        me = str(addresses.BALANCER_SERVER_SIDE)
        return sum(1 for events in self.bed.backend_log().values() for e in events
                   if e["event"] == "accept" and e.get("peer") == me)

    def settle(self, lb: BedBalancer) -> None:
        """Wait until every backend is up (the first probes ran)."""
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            states = [b["state"] for b in ctl.request(lb.control_socket, "backends", {})]
            if states and all(s == "up" for s in states):
                return
            time.sleep(0.1)
        self.fail("backends not up")

    def test_a_busy_window_is_quiet_and_a_move_is_one_audit_line(self) -> None:
        """Hundreds of health checks, scrapes and read-only commands: at most a handful
        of log lines.  Then one move: exactly one more line, the audit line."""
        lb = self.balancer()
        self.settle(lb)
        before = self.lines(lb)
        probed = self.probes()
        start = time.monotonic()
        scrapes = 0
        while time.monotonic() - start < WINDOW:
            self.assertIn(b" 200 ", self.get("/metrics").split(b"\r\n")[0])
            self.assertIn(b'"status": "ok"', self.get("/healthz"))
            scrapes += 1
            ctl.request(lb.control_socket, "show", {})
            ctl.request(lb.control_socket, "info", {})
            time.sleep(0.2)
        window = self.lines(lb)[len(before):]
        probes = self.probes() - probed
        # Two minutes at the default interval (2 s) would be 180 probes of 3 backends.
        self.assertGreater(probes, 180)
        self.assertGreater(scrapes, 10)
        log.msg(f"quiet logs: {probes} health probes, {scrapes} x /metrics + /healthz + show "
                f"+ info in {WINDOW} s: {len(window)} log lines")
        self.assertLessEqual(len(window), HANDFUL, "\n".join(window))
        hoa = addresses.home_address(1)
        run = self.lbproxyctl(lb, "move", "addr", str(hoa), "b2")
        self.assertEqual(run.returncode, 0, run.stderr)
        time.sleep(0.5)
        after = self.lines(lb)[len(before) + len(window):]
        self.assertEqual(len(after), 1, "\n".join(after))
        self.assertRegex(
            after[0],
            r'audit: who="lbproxyctl uid=0\(root\) pid=\d+" action=move '
            rf'key="addr {hoa}" backend=b2 previous=-$',
        )
        self.assertNotIn("Traceback", lb.log())

    def test_json_format(self) -> None:
        """``[logging] format = "json"``: every line of the log is one JSON object; the
        audit line of a reload names SIGHUP and what it did."""
        lb = self.balancer('[logging]\nformat = "json"\n')
        self.settle(lb)
        assert lb.process is not None
        lb.process.send_signal(1)  # SIGHUP: a reload of the same file
        deadline = time.monotonic() + 10
        records: list[dict[str, Any]] = []
        while time.monotonic() < deadline:
            records = [json.loads(line) for line in self.lines(lb)]
            if any(r.get("audit") for r in records):
                break
            time.sleep(0.1)
        audit = next(r for r in records if r.get("audit"))
        self.assertEqual(audit["audit"]["who"], "SIGHUP")
        self.assertEqual(audit["audit"]["result"], "nothing changed")
        self.assertEqual(audit["namespace"], "lbproxy.audit")
        self.assertTrue(any("lbproxy forwarding" in r["message"] for r in records))
        self.assertTrue(all({"time", "level", "namespace", "message"} <= set(r)
                            for r in records))  # fmt: skip
        self.assertFalse(os.path.exists(lb.log_path + ".1"))
