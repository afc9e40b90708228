"""Fleet figures on the network bed: delivered packets/s of one and of three balancers.

The bed of tests/test_fleet_bed.py (``TestBed(balancers=3)``, docs/testbed.md): three
``twistd -n lbproxy`` balancers with ``[fleet]`` and one redis-server, behind an ECMP
route in the router namespace ``net`` (``fib_multipath_hash_policy=1``); the backends'
default route is ECMP over the balancers.  This script adds a generator link to the
router (``term:gen0`` -- ``net:gen``, which the bed's emulators do not watch) and runs:

* ``dpgen`` (C, benchmarks/dataplane.py's generator) in ``term`` on ``gen0``: IPv6/UDP
  with a Home Address Option to the virtual address, as fast as it can, cycling through
  ``--terminals`` terminals (a source address each, so ECMP spreads them);
* ``dpsink`` (C) in each backend namespace on ``eth0``, counting good packets (valid UDP
  checksum, ours); nftables drops them before the backend's kernel, which would
  otherwise answer with ICMPv6 errors.  Delivered = the three sinks' sum.

Each round measures, one right after the other, *one balancer* (balancers 2 and 3
withdrawn from both ECMP routes, as a routing protocol does; their processes idle) and
*three balancers* (all next hops in).  Before the rounds each configuration is warmed
up, so every terminal has its binding (and the fleet its exceptions) on the balancers
that see it.  Printed per run: offered and delivered packets/s, each balancer's share
(its own ``packets_in`` counter) and CPU (its process's CPU seconds per second), the
balancers' CPU per packet delivered, what their client sockets' kernel queues dropped,
the machine's busy share during the run and just before it with no traffic (other work
on the machine); then best and median per configuration and the ratio of delivered
packets/s, 3 to 1, best against best and round by round.  ``--rate`` offers a fixed rate
instead of as much as the generator can.

Caveat, printed too: on a 2-CPU machine the generator, the router's kernel forwarding,
the sinks, the backends' kernels and the balancers share the same two CPUs.  Three
balancers can use at most what the others leave: the figure says how much a fleet gains
*on this machine*, not what three hosts would do.

Run (root; serialise with other beds): ``flock /tmp/lbproxy-bed.lock .venv/bin/python
benchmarks/fleet_bed.py [--duration 3] [--rounds 3] [--terminals 3000] [--rate 0]``.  See
docs/performance.md.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

from benchmarks.dataplane import build, cpu_seconds, finish, machine_cpu  # noqa: E402
from lbproxy.testbed import netns  # noqa: E402
from lbproxy.testbed.bed import TestBed  # noqa: E402
from lbproxy.testbed.fleet import BedFleet  # noqa: E402

PORT = 7777
GEN_MAC, ROUTER_MAC = "02:00:00:00:e0:02", "02:00:00:00:e0:01"
COA_PREFIX = "2001:db8:e1::"
HOA_PREFIX = "2001:db8:e100::"
CAVEAT = ("2 CPUs shared by the generator, the router's forwarding, the sinks, the "
          "backends' kernels and every balancer: three balancers compete for the same "
          "CPUs, so this is what a fleet gains on one small machine, not on three hosts")


def prepare(bed: TestBed) -> None:
    """The generator's link into the router, and the sinks' drops."""
    netns.ip_batch([f"link add gen0 address {GEN_MAC} type veth peer name gen netns "
                    f"{bed.ns('net')} address {ROUTER_MAC}", "link set gen0 up"],
                   bed.ns("term"))
    netns.ip_batch(["link set gen up", "addr add 2001:db8:e1::1/64 dev gen nodad"],
                   bed.ns("net"))
    netns.shell(bed.ns("term"), "ethtool -K gen0 tx off >/dev/null")
    for i in bed.backend_indices:
        bed.run(f"srv{i}", ["nft", "-f", "-"], input=(
            "table ip6 lbbench {\n chain pre {\n type filter hook prerouting priority raw;"
            f" policy accept;\n udp dport {PORT} drop\n }}\n}}\n"))


def use(bed: TestBed, balancers: int) -> None:
    """Routes through the first ``balancers`` balancers only."""
    for k in bed.balancer_indices:
        if k <= balancers and k not in bed.live_balancers:
            bed.restore_balancer(k)
    for k in sorted(bed.balancer_indices, reverse=True):
        if k > balancers and k in bed.live_balancers:
            bed.withdraw_balancer(k)


def generate(bed: TestBed, dpgen: str, terminals: int, rate: float,
             seconds: float) -> subprocess.Popen[str]:
    argv = [dpgen, "gen0", ROUTER_MAC, COA_PREFIX, HOA_PREFIX, "2001:db8:5::80", str(PORT),
            str(terminals), str(rate), str(seconds), "64"]
    return subprocess.Popen(["ip", "netns", "exec", bed.ns("term"), *argv],
                            stdout=subprocess.PIPE, text=True)


@contextlib.contextmanager
def sinks(bed: TestBed, dpsink: str, seconds: float) -> Iterator[list[subprocess.Popen[str]]]:
    procs = []
    try:
        for i in bed.backend_indices:
            proc = subprocess.Popen(["ip", "netns", "exec", bed.ns(f"srv{i}"), dpsink, "eth0",
                                     str(PORT), str(seconds)], stdout=subprocess.PIPE,
                                    text=True)
            procs.append(proc)
            assert proc.stdout is not None
            if proc.stdout.readline().strip() != "ready":
                raise RuntimeError("dpsink did not start")
        yield procs
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.send_signal(signal.SIGINT)


def pids(fleet: BedFleet) -> dict[int, int]:
    """Each balancer's twistd process id (``ip netns exec`` execs it)."""
    result = {}
    for k, balancer in fleet.balancers.items():
        assert balancer.process is not None
        result[k] = balancer.process.pid
    return result


def run_once(bed: TestBed, fleet: BedFleet, built: dict[str, str], terminals: int,
             seconds: float, rate: float = 0) -> dict[str, Any]:
    """Offer traffic for ``seconds``; what arrived, per balancer what it took."""
    processes = pids(fleet)
    idle = machine_cpu()
    time.sleep(0.5)
    background = busy(idle, machine_cpu())
    before = {k: fleet.stats(k) for k in processes}
    with sinks(bed, built["dpsink"], seconds + 10) as procs:
        machine = machine_cpu()
        cpu = {k: cpu_seconds(pid) for k, pid in processes.items()}
        gen, _ = finish(generate(bed, built["dpgen"], terminals, rate, seconds))
        time.sleep(0.5)  # what is queued drains
        cpu = {k: cpu_seconds(pid) - cpu[k] for k, pid in processes.items()}
        after_machine = machine_cpu()
        for proc in procs:
            proc.send_signal(signal.SIGINT)
        results = [finish(proc)[0] for proc in procs]
    elapsed = gen["elapsed"]
    after = {k: fleet.stats(k) for k in processes}
    packets = {k: after[k]["packets_in"] - before[k]["packets_in"] for k in processes}
    drops = sum(after[k]["ports"]["client"]["kernel_drops"]
                - before[k]["ports"]["client"]["kernel_drops"] for k in processes)
    delivered = sum(r["good"] for r in results)
    return {
        "offered": gen["sent"] / elapsed,
        "delivered": delivered / elapsed,
        "bad": sum(r["received"] - r["good"] for r in results),
        "per_balancer": {f"lb{k}": round(n / elapsed) for k, n in packets.items()},
        "balancer_cpu": {f"lb{k}": round(c / elapsed, 2) for k, c in cpu.items()},
        "machine_busy": round(busy(machine, after_machine), 3),
        # The same just before, with no traffic: other work on the machine.
        "background_busy": round(background, 3),
        # The balancers' own CPU per packet delivered (us), and what their client
        # sockets' kernel queues dropped (offered faster than they read).
        "balancer_us_per_packet": round(sum(cpu.values()) / (delivered or 1) * 1e6, 2),
        "balancer_socket_drops": drops,
    }


def busy(before: dict[str, int], after: dict[str, int]) -> float:
    """The share of the machine's CPU time not idle between two `machine_cpu` reads."""
    spent = {k: after[k] - before[k] for k in before}
    return 1 - (spent["idle"] + spent["iowait"]) / (sum(spent.values()) or 1)


def warm_up(bed: TestBed, fleet: BedFleet, built: dict[str, str], terminals: int) -> None:
    """Every terminal bound on the balancers that see it: a slow pass, then a check that
    the tables stopped growing."""
    for _ in range(10):
        sizes = {k: fleet.stats(k)["table"]["size"] for k in fleet.balancers}
        run_once(bed, fleet, built, terminals, 1.0, rate=max(5000, terminals * 2))
        if {k: fleet.stats(k)["table"]["size"] for k in fleet.balancers} == sizes:
            return


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--duration", type=float, default=3.0, help="seconds per run")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--terminals", type=int, default=3000)
    parser.add_argument("--rate", type=float, default=0,
                        help="packets/s offered (0: as fast as the generator can)")
    args = parser.parse_args()
    if os.geteuid() != 0:
        sys.exit("benchmarks/fleet_bed.py needs root (network namespaces)")
    runs: dict[int, list[dict[str, Any]]] = {1: [], 3: []}
    with tempfile.TemporaryDirectory(prefix="lbfleetbench-") as directory, \
            TestBed(terminals=1, backends=3, balancers=3, links=1) as bed, \
            BedFleet(bed, offload="none") as fleet:
        built = build(directory)
        prepare(bed)
        for n in (1, 3):
            use(bed, n)
            warm_up(bed, fleet, built, args.terminals)
        for round_ in range(args.rounds):
            for n in (1, 3):
                use(bed, n)
                result = run_once(bed, fleet, built, args.terminals, args.duration,
                                  args.rate)
                runs[n].append(result)
                print(json.dumps({"round": round_ + 1, "balancers": n, **{
                    k: round(v) if isinstance(v, float) and v > 10 else v
                    for k, v in result.items()}}), flush=True)
        use(bed, 3)
        fleet_stats = {k: fleet.stats(k)["fleet"] for k in fleet.balancers}
    summary: dict[str, Any] = {}
    for n, results in runs.items():
        delivered = [r["delivered"] for r in results]
        summary[f"{n}_balancer{'s' if n > 1 else ''}"] = {
            "delivered_best": round(max(delivered)), "delivered_median":
            round(statistics.median(delivered)),
            "offered_median": round(statistics.median(r["offered"] for r in results)),
            "delivered_share_median": round(statistics.median(
                r["delivered"] / r["offered"] for r in results), 3),
            "balancer_us_per_packet_median": statistics.median(
                r["balancer_us_per_packet"] for r in results),
            "machine_busy_median": round(statistics.median(
                r["machine_busy"] for r in results), 3),
            "background_busy_median": round(statistics.median(
                r["background_busy"] for r in results), 3)}
    one, three = summary["1_balancer"], summary["3_balancers"]
    summary["ratio_3_to_1_best"] = round(three["delivered_best"] / one["delivered_best"], 2)
    summary["ratio_3_to_1_by_round"] = [round(b["delivered"] / a["delivered"], 2)
                                        for a, b in zip(runs[1], runs[3], strict=True)]
    offered = f"{args.rate:g} packets/s" if args.rate else "as fast as it can"
    summary["how"] = (f"one dpgen (C, AF_PACKET, HAO/UDP, {args.terminals} terminals, "
                      f"{offered}) into the router; ECMP (L4 hash) over the live "
                      f"balancers; three dpsinks at the backends; {args.duration:g} s per "
                      f"run, {args.rounds} rounds, 1 and 3 balancers alternating")
    summary["caveat"] = CAVEAT
    summary["cpus"] = os.cpu_count()
    summary["fleet_writes"] = {f"lb{k}": f["writes"] for k, f in fleet_stats.items()}
    print(json.dumps(summary, indent=1))


if __name__ == "__main__":
    main()
