"""A flood of forged identities through the real balancer (``twistd -n lbproxy``) in the bed.

Why: ``benchmarks/flood.py`` drives the table in-process with `task.Clock` for size (1M
forged identities); this is the smaller run against the real daemon -- its sockets, its
reactor, its sweeps, its control socket -- so that what the model promises (established
terminals kept, newcomers served, the bound held) is shown on real packets too.

What runs (network namespaces of `lbproxy.testbed.TestBed`; root; every address in
2001:db8::/32): the balancer in ns ``lb`` with a small table (``--max-entries``, 10,000)
and the round-robin scheduler (so a binding lost and made again lands on another backend
and its TCP session breaks, where Maglev would hide the loss by hashing to the same one).
For each flood (``--sources`` x ``--packets``) a fresh balancer:

1. ``--established`` terminals (200; bed terminals on access link 1, through the terminal
   emulator: Home Address Option, care-of source) open a real TCP session each to the
   virtual address and echo 64 bytes every 1-5 s, before the flood until every one of
   their bindings has passed the table's "frequent" mark (at most ``--warmup`` s), then
   on through it.
2. The flood: ``dpgen`` (benchmarks/dpgen.c, AF_PACKET in ns ``term`` on acc1, to the
   router) sends ``--identities`` (20,000) forged identities, ``packets`` packets each,
   back to back, at ``--rate`` (2,000) packets/s: IPv6/UDP with a Home Address Option,
   home address 2001:db8:100:f::<i>, from 2001:db8:bad0:1::<i> (``one64``: all from the
   attacker's own /64, no spoofing needed) or from 2001:db8:<scatter>:bad0::<i>
   (``spoofed``: every identity from another /48 of 2001:db8::/32).  They go to UDP port
   9, which the backends drop in nftables (no replies: the table is what is measured).
3. ``--newcomers`` (200) more terminals (on access links 2-9, a few per /64 as on a real
   access network; one /64 making more than ``per_64`` new bindings a window is
   throttled by design) arrive evenly over the flood, each opening a session and echoing
   every 1-5 s for ``--newcomer-life`` (10) seconds.

Printed per flood: established terminals whose binding was lost -- from the balancer's
table over its control socket: binding gone, or on another backend than its session's --
and whose session broke; newcomers served (session opened, every echo right until the
end of its life: goal >= 99 %); the most bindings seen against the bound (``stats``
every 0.5 s); the table's evictions (and of them, ``established_evictions``: bindings
past their first packet, forged ones included), refusals and throttled inserts; the
flood as sent (and refused by the generator's socket); the client socket's kernel
drops; the balancer's RSS after the warm-up and at the end.

Run (root; under the bed lock on a shared machine)::

    flock /tmp/lbproxy-bed.lock .venv/bin/python benchmarks/flood_bed.py

about six minutes with the defaults (figures: docs/performance.md, "Memory and
floods").  Prints figures, asserts nothing; the bed is torn down whatever happens.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import random
import selectors
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from lbproxy.core.table import FREQUENT
from lbproxy.testbed import addresses
from lbproxy.testbed.balancer import BedBalancer, bed_config
from lbproxy.testbed.bed import TestBed

HERE = Path(__file__).resolve().parent
FLOOD_PORT = 9  # discard: the backends drop it
FLOOD_HOA = "2001:db8:100:f::"
FLOOD_SOURCES = {"one64": ("2001:db8:bad0:1::", "0"), "spoofed": ("2001:db8:0:bad0::", "1")}
CHUNK = 64


# -- the terminals' sessions ------------------------------------------------------------


@dataclass(eq=False)
class Session:
    """One terminal's TCP session to the virtual address, echoing every 1-5 s."""

    index: int
    newcomer: bool
    until: float
    sock: socket.socket | None = None
    state: str = "new"  # new, connecting, greeting, open, done, failed
    backend: str | None = None
    started: float = 0.0
    connected: float | None = None
    inbuf: bytearray = field(default_factory=bytearray)
    expect: bytes = b""
    sent_at: float = 0.0
    next_send: float = 0.0
    echoes: int = 0
    error: str | None = None

    @property
    def ok(self) -> bool:
        return self.state in ("open", "done") and self.error is None


class Sessions:
    """Every terminal's session, driven by one selector loop in this process (the sockets
    live in ns ``term``, on the terminals' home addresses, through the emulator)."""

    ECHO_TIMEOUT = 10.0
    CONNECT_TIMEOUT = 15.0

    def __init__(self, bed: TestBed, seed: int) -> None:
        self.bed = bed
        self.selector = selectors.DefaultSelector()
        self.sessions: list[Session] = []
        self.random = random.Random(seed)

    def open(self, s: Session, now: float) -> None:
        sock = self.bed.socket("term", socket.AF_INET6, socket.SOCK_STREAM)
        sock.setblocking(False)
        sock.bind((str(addresses.home_address(s.index)), 0))
        s.sock, s.state, s.started = sock, "connecting", now
        err = sock.connect_ex((str(addresses.VIP), addresses.TCP_PORT))
        if err not in (0, 115):  # EINPROGRESS
            self._fail(s, f"connect: {os.strerror(err)}")
            return
        self.selector.register(sock, selectors.EVENT_WRITE, s)

    def _fail(self, s: Session, why: str) -> None:
        if s.error is None:
            s.error = why
        s.state = "failed"
        self._close(s)

    def _close(self, s: Session) -> None:
        if s.sock is not None:
            with contextlib.suppress(KeyError, ValueError):
                self.selector.unregister(s.sock)
            s.sock.close()
            s.sock = None

    def _send(self, s: Session, now: float) -> None:
        assert s.sock is not None
        s.expect = self.random.randbytes(CHUNK)
        s.sent_at = now
        try:
            s.sock.send(s.expect)  # 64 bytes into an empty send buffer: all of it
        except OSError as exc:
            self._fail(s, f"send: {exc}")

    def _readable(self, s: Session, now: float) -> None:
        assert s.sock is not None
        try:
            data = s.sock.recv(4096)
        except BlockingIOError:
            return
        except OSError as exc:
            self._fail(s, f"recv: {exc}")
            return
        if not data:
            self._fail(s, "closed by the peer")
            return
        s.inbuf += data
        if s.state == "greeting":
            if b"\n" not in s.inbuf:
                return
            line, _, rest = bytes(s.inbuf).partition(b"\n")
            s.inbuf = bytearray(rest)
            words = line.decode(errors="replace").split()
            s.backend = words[1] if len(words) > 1 else line.decode(errors="replace")
            s.state = "open"
            s.next_send = now + self.random.uniform(1.0, 5.0)
        if s.state == "open" and s.expect and len(s.inbuf) >= len(s.expect):
            if bytes(s.inbuf[:len(s.expect)]) != s.expect:
                self._fail(s, "echo differs")
                return
            del s.inbuf[:len(s.expect)]
            s.expect = b""
            s.echoes += 1
            s.next_send = now + self.random.uniform(1.0, 5.0)

    def step(self, now: float, timeout: float) -> None:
        """Wait up to `timeout` for the sockets, then do what is due."""
        for key, events in self.selector.select(timeout):
            s: Session = key.data
            if s.state == "connecting" and events & selectors.EVENT_WRITE:
                assert s.sock is not None
                err = s.sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
                if err:
                    self._fail(s, f"connect: {os.strerror(err)}")
                    continue
                s.connected, s.state = now, "greeting"
                self.selector.modify(s.sock, selectors.EVENT_READ, s)
            elif events & selectors.EVENT_READ:
                self._readable(s, now)
        for s in self.sessions:
            if s.state == "connecting" and now - s.started > self.CONNECT_TIMEOUT:
                self._fail(s, "connect timed out")
            elif s.state == "greeting" and now - s.started > self.CONNECT_TIMEOUT:
                self._fail(s, "no greeting")
            elif s.state == "open":
                if s.expect:
                    if now - s.sent_at > self.ECHO_TIMEOUT:
                        self._fail(s, "echo timed out")
                elif now >= s.until:
                    s.state = "done"
                    self._close(s)
                elif now >= s.next_send:
                    self._send(s, now)

    def close(self) -> None:
        for s in self.sessions:
            self._close(s)
        self.selector.close()


# -- the balancer's control socket ------------------------------------------------------


class Control:
    """One persistent connection to the balancer's control socket."""

    def __init__(self, path: str) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(30)
        self.sock.connect(path)
        self.file = self.sock.makefile("rb")

    def ask(self, command: str, **args: Any) -> Any:
        self.sock.sendall(json.dumps({"command": command, "args": args}).encode() + b"\n")
        answer = json.loads(self.file.readline())
        if not answer.get("ok"):
            raise RuntimeError(f"{command}: {answer}")
        return answer["result"]

    def close(self) -> None:
        self.file.close()
        self.sock.close()


def rss(pid: int) -> int:
    """A process's resident set size in bytes."""
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    return 0


def home_rows(control: Control) -> dict[str, Any]:
    """The bindings of the bed's terminals (keyed by their home addresses), by home
    address; the flood's home addresses are in another /64."""
    rows = control.ask("show", filter=str(addresses.HOME_PREFIX.network_address),
                       limit=10_000)["rows"]
    return {r["key"].split(" ", 1)[1]: r for r in rows}


# -- one flood --------------------------------------------------------------------------


def run_flood(bed: TestBed, dpgen: str, args: argparse.Namespace, sources: str,
              packets: int, seed: int) -> dict[str, Any]:
    """A fresh balancer, the established sessions, the flood and its newcomers."""
    config = bed_config(bed, scheduler="round_robin", max_entries=args.max_entries,
                        lifetime=args.lifetime)
    balancer = BedBalancer(bed, config, name=f"lbproxy-{sources}-{packets}").start()
    assert balancer.process is not None
    pid = balancer.process.pid
    control = Control(balancer.control_socket)
    sessions = Sessions(bed, seed)
    established = [Session(i, False, float("inf")) for i in range(1, args.established + 1)]
    newcomers = [Session(args.established + n + 1, True, 0.0) for n in range(args.newcomers)]
    sessions.sessions = established + newcomers
    flood: subprocess.Popen[bytes] | None = None
    try:
        t0 = time.monotonic()
        for n, s in enumerate(established):  # spread over the first second
            s.started = t0 + n / len(established)
        pending = list(established)
        # Until every established terminal's binding has passed the table's "frequent"
        # mark (the in-process model's terminals sent for a minute first), at most
        # --warmup seconds.
        frequent, next_check = 0, t0 + 3.0
        while time.monotonic() < t0 + args.warmup and frequent < len(established):
            now = time.monotonic()
            while pending and pending[0].started <= now:
                sessions.open(pending.pop(0), now)
            if now >= next_check:
                frequent = sum(1 for r in home_rows(control).values()
                               if r["packets"] >= FREQUENT)
                next_check = now + 1.0
            sessions.step(now, 0.02)
        warmup = time.monotonic() - t0
        warm = control.ask("stats")["table"]
        rss_warm = rss(pid)
        seconds = args.identities * packets / args.rate
        prefix, spread = FLOOD_SOURCES[sources]
        flood_name = f"dpgen-{sources}-{packets}"
        flood = bed.spawn("term", [
            dpgen, "acc1", bed.mac("net", "acc1"), prefix, FLOOD_HOA, str(addresses.VIP),
            str(FLOOD_PORT), str(args.identities), str(args.rate), str(seconds + 30),
            str(args.batch), str(packets), spread], name=flood_name)
        t_flood = time.monotonic()
        arrivals = [t_flood + seconds * (n + 0.5) / max(len(newcomers), 1)
                    for n in range(len(newcomers))]
        for s, when in zip(newcomers, arrivals, strict=True):
            s.until = when + args.newcomer_life
        end = max([t_flood + seconds, *(s.until for s in newcomers)]) + 1.0
        largest, next_poll, n_new = warm["size"], t_flood, 0
        while time.monotonic() < end:
            now = time.monotonic()
            while n_new < len(newcomers) and arrivals[n_new] <= now:
                sessions.open(newcomers[n_new], now)
                n_new += 1
            if now >= next_poll:
                largest = max(largest, control.ask("stats")["table"]["size"])
                next_poll = now + 0.5
            sessions.step(now, 0.02)
        flood.wait(timeout=seconds + 60)
        sent = json.loads(bed.stdout(flood_name) or "{}")
        stats = control.ask("stats")
        largest = max(largest, stats["table"]["size"])
        bound = home_rows(control)
        rss_end = rss(pid)
    finally:
        sessions.close()
        control.close()
        if flood is not None and flood.poll() is None:
            flood.kill()
            flood.wait()
        balancer.stop()

    def lost(s: Session) -> bool:
        row = bound.get(str(addresses.home_address(s.index)))
        return row is None or row["backend"] != s.backend

    served = [s for s in newcomers if s.ok and s.echoes > 0]
    failures: dict[str, int] = {}
    for s in established + newcomers:
        if not s.ok:
            failures[s.error or s.state] = failures.get(s.error or s.state, 0) + 1
    connects = sorted((s.connected - s.started) for s in newcomers if s.connected is not None)
    table = stats["table"]
    return {
        "sources": sources, "packets": packets, "flood_seconds": seconds,
        "flood_sent": sent.get("sent", 0), "flood_send_errors": sent.get("errors", 0),
        "established": len(established),
        "established_table_lost": sum(1 for s in established if lost(s)),
        "established_sessions_broken": sum(1 for s in established if not s.ok),
        "established_evictions": table["established_evictions"],
        "warm_bindings": warm["size"], "warmup": warmup, "warm_frequent": frequent,
        "newcomers": len(newcomers), "newcomers_served": len(served),
        "newcomer_connect_p50": connects[len(connects) // 2] if connects else None,
        "newcomer_connect_max": connects[-1] if connects else None,
        "failures": failures,
        "largest": largest, "bound": table["capacity"], "bindings": table["size"],
        "evictions": table["evictions"], "refusals": table["refusals"],
        "throttled": table["throttled"], "inserts": table["inserts"],
        "kernel_drops": stats.get("ports", {}).get("client", {}).get("kernel_drops"),
        "received": stats.get("ports", {}).get("client", {}).get("received"),
        "rss_warm": rss_warm, "rss_end": rss_end,
    }


def build_dpgen(directory: str) -> str:
    out = os.path.join(directory, "dpgen")
    subprocess.run(["gcc", "-O2", "-Wall", "-o", out, str(HERE / "dpgen.c")], check=True,
                   capture_output=True, text=True, timeout=60)
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--identities", type=int, default=20_000)
    parser.add_argument("--packets", default="1,2,5", help="packets per forged identity")
    parser.add_argument("--sources", default="one64,spoofed")
    parser.add_argument("--rate", type=float, default=2_000.0, help="flood packets/s")
    parser.add_argument("--batch", type=int, default=16, help="the generator's sendmmsg batch")
    parser.add_argument("--max-entries", type=int, default=10_000)
    parser.add_argument("--lifetime", type=float, default=300.0)
    parser.add_argument("--established", type=int, default=200)
    parser.add_argument("--newcomers", type=int, default=200)
    parser.add_argument("--newcomer-life", type=float, default=10.0)
    parser.add_argument("--warmup", type=float, default=40.0,
                        help="at most this long for every established binding to become"
                             " frequent")
    parser.add_argument("--seed", type=int, default=1)
    args = parser.parse_args()
    counts = [int(p) for p in args.packets.split(",") if p]
    kinds = [s for s in args.sources.split(",") if s]
    for kind in kinds:
        if kind not in FLOOD_SOURCES:
            parser.error(f"--sources: {kind!r} is not one of {', '.join(FLOOD_SOURCES)}")
    terminals = args.established + args.newcomers
    print(f"Python {sys.version.split()[0]}; load average {os.getloadavg()[0]:.1f} on"
          f" {os.cpu_count()} CPUs")
    print(f"== the real balancer in the bed: {args.identities:,} forged identities at"
          f" {args.rate:,.0f} packets/s against max_entries = {args.max_entries:,}"
          f" (lifetime {args.lifetime:g} s, round robin); {args.established} established"
          f" TCP sessions, {args.newcomers} newcomers over the flood for"
          f" {args.newcomer_life:g} s each ==")
    with tempfile.TemporaryDirectory(prefix="lbflood-") as tmp:
        dpgen = build_dpgen(tmp)
        bed = TestBed(terminals=terminals, backends=3, links=addresses.MAX_LINKS,
                      ready_timeout=120.0)
        bed.start()
        try:
            for i in bed.backend_indices:  # the flood is dropped at the backends, unanswered
                bed.run(f"srv{i}", ["nft", "-f", "-"], input=(
                    "table inet lbflood {\n chain pre {\n"
                    "  type filter hook prerouting priority -300;\n"
                    f"  udp dport {FLOOD_PORT} drop\n }}\n}}\n"))
            # Newcomers a few per /64: access links 2..9.
            for n in range(args.newcomers):
                bed.move(args.established + n + 1, 2 + n % (addresses.MAX_LINKS - 1))
            print("  sources  packets  flood sent (s)   established terminals lost:"
                  " table/sessions  newcomers served  largest/bound  evicted (2+ packets)"
                  "  refused (throttled)  socket drops  RSS warm -> end")
            results = []
            seed = args.seed
            for kind in kinds:
                for packets in counts:
                    seed += 1
                    r = run_flood(bed, dpgen, args, kind, packets, seed)
                    results.append(r)
                    print(f"  {kind:8s} {packets:7d}  {r['flood_sent']:9,d}"
                          f" ({r['flood_seconds']:4.0f})"
                          f"   {r['established_table_lost']:3d}"
                          f" / {r['established_sessions_broken']:3d} of {r['established']}"
                          f"     {r['newcomers_served']:4d} ({100 * r['newcomers_served'] / max(r['newcomers'], 1):5.1f} %)"  # noqa: E501
                          f"  {r['largest']:,}/{r['bound']:,}  {r['evictions']:7,d}"
                          f" ({r['established_evictions']:,})"
                          f"  {r['refusals']:7,d} ({r['throttled']:,})"
                          f"  {r['kernel_drops'] or 0:12,d}"
                          f"  {r['rss_warm'] / 2**20:.1f} -> {r['rss_end'] / 2**20:.1f} MiB",
                          flush=True)
                    print(f"           warm-up {r['warmup']:.0f} s: {r['warm_frequent']} of"
                          f" {r['established']} established bindings frequent (>= {FREQUENT}"
                          f" packets); {r['inserts']:,} inserts", flush=True)
                    if r["failures"] or r["flood_send_errors"]:
                        print(f"           failures: {r['failures']};"
                              f" generator send errors {r['flood_send_errors']:,};"
                              f" newcomers connected in p50"
                              f" {r['newcomer_connect_p50'] or 0:.3f} s,"
                              f" max {r['newcomer_connect_max'] or 0:.3f} s", flush=True)
        finally:
            bed.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
