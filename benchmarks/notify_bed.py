"""Binding Update on the home agent's link -> the real balancer's table change, in the bed.

The whole path of the patent's second embodiment, each part the real program: the terminal
emulator sends a Binding Update; it crosses the ``home`` link of ns ``ha``, where the home
agent emulator answers with a Binding Acknowledgement; the home-agent agent
(``twistd lbproxy-homeagent``, beside it) observes both, and tells the balancer
(``twistd lbproxy``, ns ``lb``, key chain = source address) over mutually authenticated TLS;
the balancer rekeys its table (claim 9).

Timing, all kernel timestamps (``SO_TIMESTAMPNS``) of one AF_PACKET socket on ``home`` in
ns ``ha``, so nothing polls the balancer while it works: from the Binding Update crossing the
link to the balancer's AMP answer to the agent's BindingChanged crossing it back.  The
balancer writes that answer in the same reactor turn, right after the table changed, so the
figure is the table change plus one link hop and a TLS record (tens of microseconds).  After
each answer one ``stats`` over the control socket checks that the table did grow by one
entry: every move goes to a care-of address the terminal has not used yet (``--links``
access links; ``--terminals`` terminals, 1,000 by default, each followed by the balancer and
known to the agent, take turns: moves <= terminals x (links - 1)).  Moves are one at a time.

Run as root: ``.venv/bin/python benchmarks/notify_bed.py [--moves 1000] [--terminals 1000]
[--links 9] [--rounds 3]``.
"""

from __future__ import annotations

import argparse
import json
import math
import select
import socket
import statistics
import struct
import time
from typing import Any

from lbproxy.testbed import addresses, control
from lbproxy.testbed.agents import HOME_AGENT_PORT, BedAgent, BedPki, notify_section
from lbproxy.testbed.balancer import BedBalancer, bed_config
from lbproxy.testbed.bed import TestBed
from lbproxy.wire import view

ETH_P_ALL = 0x0003
SO_TIMESTAMPNS = getattr(socket, "SO_TIMESTAMPNS", 35)
MH_BU, MH_BA = 5, 6


class ControlPoller:
    """One persistent connection to the balancer's control socket."""

    def __init__(self, path: str) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.connect(path)
        self.file = self.sock.makefile("rb")

    def ask(self, command: str, **args: Any) -> Any:
        self.sock.sendall(json.dumps({"command": command, "args": args}).encode() + b"\n")
        answer = json.loads(self.file.readline())
        if not answer.get("ok"):
            raise RuntimeError(answer)
        return answer["result"]

    def size(self) -> int:
        return int(self.ask("stats")["table"]["size"])


class HomeLinkTimes:
    """Kernel timestamps of what crosses the home link: BU, BA, the balancer's answer."""

    def __init__(self, bed: TestBed) -> None:
        self.sock = bed.socket("ha", socket.AF_PACKET, socket.SOCK_RAW, socket.htons(ETH_P_ALL))
        self.sock.setsockopt(socket.SOL_SOCKET, SO_TIMESTAMPNS, 1)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 8 << 20)
        self.sock.bind(("home", 0))
        self.balancer = addresses.BALANCER_CLIENT_SIDE.packed

    def _next(self, deadline: float) -> tuple[bytes, float]:
        while time.monotonic() < deadline:
            if not select.select([self.sock], [], [], 0.5)[0]:
                continue
            data, ancillary, _, _ = self.sock.recvmsg(65600, 64)
            if len(data) < 54 or data[12:14] != b"\x86\xdd":
                continue
            for level, kind, value in ancillary:
                if level == socket.SOL_SOCKET and kind == SO_TIMESTAMPNS:
                    sec, nsec = struct.unpack("qq", value[:16])
                    return data[14:], sec + nsec / 1e9
            return data[14:], time.time()
        raise TimeoutError("expected packet not seen on the home link")

    def mobility(self, home: bytes, mh_type: int, timeout: float = 5.0) -> float:
        """The timestamp of the next BU (from) / BA (to) ``home``."""
        deadline = time.monotonic() + timeout
        while True:
            pkt, stamp = self._next(deadline)
            try:
                v = view.parse(pkt)
            except view.MalformedPacket:
                continue
            where = v.hoa if mh_type == MH_BU else v.rh2
            if v.mh_type == mh_type and where >= 0 and pkt[where:where + 16] == home:
                return stamp

    def answer(self, timeout: float = 5.0) -> float:
        """The timestamp of the next TCP segment with data from the balancer to the agent:
        its answer to a BindingChanged, written once the table has changed."""
        deadline = time.monotonic() + timeout
        while True:
            pkt, stamp = self._next(deadline)
            if pkt[6] != 6 or pkt[8:24] != self.balancer or len(pkt) < 60:
                continue
            dport = int.from_bytes(pkt[42:44], "big")
            payload = int.from_bytes(pkt[4:6], "big") - (pkt[52] >> 4) * 4
            if dport == HOME_AGENT_PORT and payload > 0:
                return stamp


def percentile(values: list[float], p: int) -> float:
    return statistics.quantiles(values, n=100)[p - 1]


def run(moves: int, links: int, terminals: int | None = None) -> dict[str, Any]:
    terminals = terminals or math.ceil(moves / (links - 1))
    if moves > terminals * (links - 1):
        raise SystemExit(f"{moves} moves need at least {math.ceil(moves / (links - 1))} "
                         f"terminals with {links} links")
    bed = TestBed(terminals=terminals, backends=3, links=links, register=False,
                  ready_timeout=60.0)
    bed.start()
    try:
        pki = BedPki(bed)
        agent = BedAgent.home_agent(bed, pki).start()
        control.request(bed.terminal_control, "register", timeout=30)
        deadline = time.monotonic() + 60
        while not all(t["registered"] for t in bed.terminal_status()):
            if time.monotonic() > deadline:
                raise RuntimeError("terminals did not register")
            time.sleep(0.1)
        # The agent learns bindings by observing the home link; with many terminals
        # registering at once its socket may miss a few: register those again, so that
        # every terminal's subscription finds its binding.
        homes = {str(addresses.home_address(i)): i for i in range(1, terminals + 1)}
        for _ in range(10):
            known = {b["home"] for b in agent.bindings()}
            missing = [i for text, i in homes.items() if text not in known]
            if not missing:
                break
            for i in missing:
                control.request(bed.terminal_control, "move", terminal=i, link=1, timeout=30)
            time.sleep(0.5)
        else:
            raise RuntimeError(f"the agent did not learn {len(missing)} terminals' bindings")
        balancer = BedBalancer(bed, bed_config(bed, key_chain=["src"], extra=notify_section(
            pki, [agent.peer], max_subscriptions=100_000))).start()
        while "notify: connected to ha1" not in balancer.log():
            time.sleep(0.05)
        poller = ControlPoller(balancer.control_socket)

        def hello(indexes: list[int]) -> None:
            """One datagram per terminal from its first care-of address: its entry and
            its subscription (a datagram lost on the way is sent again)."""
            for n, i in enumerate(indexes):
                s = bed.socket("term", socket.AF_INET6, socket.SOCK_DGRAM)
                s.bind((str(addresses.home_address(i)), 0))
                s.sendto(b"hello", (str(addresses.VIP), addresses.UDP_PORT))
                s.close()
                if n % 100 == 99:
                    time.sleep(0.02)

        hello(list(range(1, terminals + 1)))
        deadline = time.monotonic() + 120
        resent = time.monotonic()
        while True:
            rows = poller.ask("show", kind="src", limit=10_000)["rows"]
            if len(rows) == terminals and all(r["confirmed"] for r in rows):
                break
            if time.monotonic() > deadline:
                raise RuntimeError(f"initial entries not confirmed: {len(rows)} rows, "
                                   f"{[r['key'] for r in rows if not r['confirmed']][:20]}; "
                                   f"the agent knows {len(agent.bindings())} bindings")
            if time.monotonic() - resent > 2:
                present = {r["key"].rsplit("::", 1)[1] for r in rows}
                hello([i for i in range(1, terminals + 1) if f"{1000 + i}" not in present])
                resent = time.monotonic()
            time.sleep(0.05)
        link_times = HomeLinkTimes(bed)
        to_table: list[float] = []
        bu_to_ba: list[float] = []
        ba_to_table: list[float] = []
        for j in range(moves):
            index, link = j % terminals + 1, j // terminals + 2
            home = addresses.home_address(index).packed
            before = poller.size()
            control.request(bed.terminal_control, "move", terminal=index, link=link, wait=False)
            bu = link_times.mobility(home, MH_BU)
            ba = link_times.mobility(home, MH_BA)
            answered = link_times.answer()
            if poller.size() != before + 1:
                raise RuntimeError(f"move {j}: answered, but the table did not grow by one")
            to_table.append(answered - bu)
            bu_to_ba.append(ba - bu)
            ba_to_table.append(answered - ba)
        rows = poller.ask("show", kind="src", limit=10_000)["rows"]
        by_terminal: dict[str, set[str]] = {}
        for r in rows:
            by_terminal.setdefault(r["key"].rsplit("::", 1)[1], set()).add(r["backend"])
        sticky = sum(1 for backends in by_terminal.values() if len(backends) == 1)
        refused = balancer.log().count("notify: refused")
        return {"moves": moves, "terminals": terminals, "entries": len(rows),
                "sticky_terminals": sticky, "refusals": refused,
                "to_table": to_table, "bu_to_ba": bu_to_ba, "ba_to_table": ba_to_table}
    finally:
        bed.stop()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--moves", type=int, default=1000, help="moves per round")
    parser.add_argument("--terminals", type=int, default=1000)
    parser.add_argument("--links", type=int, default=9, help="access links (2..9)")
    parser.add_argument("--rounds", type=int, default=3,
                        help="rounds of --moves in the same bed (figures per round)")
    args = parser.parse_args()
    r = run(args.moves * args.rounds, args.links, args.terminals)

    def line(name: str, values: list[float]) -> str:
        return (f"{name}: p50 {percentile(values, 50) * 1e3:.2f} ms, "
                f"p99 {percentile(values, 99) * 1e3:.2f} ms, max {max(values) * 1e3:.2f} ms")

    print(f"bed: {r['terminals']} terminals, {r['moves']} moves, key = source address; "
          f"table {r['entries']} src entries, {r['sticky_terminals']}/{r['terminals']} "
          f"terminals on one backend, {r['refusals']} refusals")
    print(line("BU on the home link -> balancer table change", r["to_table"]))
    print(line("  of which BU -> BA (home agent emulator)", r["bu_to_ba"]))
    print(line("  of which BA -> table (agent, TLS, balancer)", r["ba_to_table"]))
    if args.rounds > 1:
        n = args.moves
        p50s, p99s = [], []
        for i in range(args.rounds):
            values = r["to_table"][i * n:(i + 1) * n]
            p50s.append(percentile(values, 50))
            p99s.append(percentile(values, 99))
            print(line(f"  round {i + 1}: BU -> table", values))
        print(f"BU -> table over {args.rounds} rounds of {n} moves: p50 best "
              f"{min(p50s) * 1e3:.2f} / median {statistics.median(p50s) * 1e3:.2f} ms, "
              f"p99 best {min(p99s) * 1e3:.2f} / median {statistics.median(p99s) * 1e3:.2f} ms")


if __name__ == "__main__":
    main()
