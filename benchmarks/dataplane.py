"""Data-path benchmark: delivered packets/s through lbproxy (Python, XDP) vs kernel DNAT.

Why: the balancer's worth as a product depends on how much of a kernel forwarder's rate
it keeps (GitHub issue 3: on two veth hops a naive Python AF_PACKET ``recv_into``/``send``
loop, without Twisted or checksum fixes, forwarded ~180k packets/s, ~0.36 of the kernel's
nft DNAT, which forwarded all the generator offered; the goal is >= 0.5).  This script
measures both on the same namespace topology, in the same run, with the same generator
and sink, and prints the ratio.

Topology (three network namespaces created here and removed at the end; root needed)::

    gen  gen0 ==veth== lbc  [ lb ]  lbs ==veth== sink0  sink
         2001:db8:d1::2   ::1          ::1  2001:db8:d2::2 (+ backends ::11 ::12 ::13)

* ``gen``: ``dpgen`` (C, ``sendmmsg`` on AF_PACKET to lbc's MAC) sends IPv6/UDP with a
  Home Address Option, 64-byte payload, to the virtual address 2001:db8:d5::80,
  cycling through N terminals (care-of 2001:db8:d1::1:<i>, home 2001:db8:d100::<i>).
* ``lb``, three configurations of the same namespace:
  - *kernel*: forwarding on, ``nf_conntrack_checksum=0`` (conntrack counts the checksums
    of HAO packets as invalid, their pseudo-header source being the home address, and
    DNAT then forwards none of them), and an nftables DNAT rule
    ``ip6 daddr VIP dnat to jhash ip6 saddr mod 3 map {backends}``;
  - *lbproxy* (the Python paths): forwarding off and ``twistd -n lbproxy --config ...``
    (the real BalancerService; translate mode, key chain hoa/iid/spi/src, Maglev, 3
    backends), ``offload = "none"``;
  - *xdp*: the same with ``offload = "xdp"`` (docs/xdp.md): IPv6 forwarding on lbc and
    lbs only (the program's next-hop lookup needs it; the namespace still forwards
    nothing), the program attached to both in driver mode, and ``lbproxy_pass`` (an XDP
    program that passes everything) on sink0, without which veth drops the frames
    redirected into it.
* ``sink``: ``dpsink`` (C, ``recvmmsg`` on AF_PACKET) counts packets that are ours and
  have a valid UDP checksum, and takes one-way latency from the kernel's receive
  timestamp and the generator's timestamp in the payload.  nftables drops everything in
  the sink's prerouting so its kernel sends no ICMPv6 errors back.

Both C programs are compiled with gcc into a temporary directory at start.  Every
address is in 2001:db8::/32 and no traffic leaves the namespaces.

**The throughput runs' generator and sink** (``--generator``, default ``frames``):
dpgen's AF_PACKET socket buffers reach lbc as socket buffers, which veth must copy into
a fresh page before an XDP program may run on them -- a cost no NIC driver has, which
then dominated the XDP executor's figure.  With ``frames``, ``dpxgen`` (C, libbpf:
``dpxgen.bpf.c`` run by ``BPF_PROG_TEST_RUN`` in live-frames mode) sends raw frames out
of gen0, as a NIC's driver hands them over: the XDP executor runs on them in place, the
kernel and the Python paths get socket buffers built from them (lbc has GRO on for the
NAPI context raw frames need).  One such generator offers well over a million packets a
second, more than any forwarder here takes, so the delivered rates tell the forwarders
apart.  At that rate dpsink (AF_PACKET, on the CPU it shares with the generator) would
become the limit, so ``dpxsink.bpf.c`` on sink0 counts the good packets (dpsink's rules)
where veth hands them over and drops them, its NAPI poll in a real-time thread on the
sink's CPU (`FrameSink`); it passes everything on for the warm-ups and latency runs,
which keep dpgen (paced, one packet per send) and dpsink (timestamps).  Both BPF
programs are compiled with clang at start; without clang or libbpf the run falls back
to ``sockets`` and says so.  tests/test_dataplane_tools.py holds both instruments to
scapy.

CPUs: the generator, the sink and the sink's kernel work share one CPU (the "other
machines"); the forwarding runs on the other, the balancer's (``--balancer-cpu``,
``--rx-cpu``): the lbproxy process (pinned) and lbc's NAPI poll in a kernel thread
pinned there at the lowest real-time priority (threaded NAPI, as a softirq would run
before the CPU's processes; on a veth the poll otherwise runs on the sending CPU, the
generator's).  For XDP that poll runs the program and the redirect; for the kernel, GRO
on lbc gives it a NAPI context, and the poll is the kernel's whole forwarding (DNAT,
route, transmit; forwarded UDP is not coalesced).  *CPU per packet* is the forwarding's
CPU time -- that thread's (exactly: schedstat) plus the lbproxy process's -- per packet
delivered; other work on the machine does not count (a run whose balancer CPU was busy
with it anyway is flagged).  The Python paths' receive processing stays on the sender's
CPU as before (in the balancer's, at full rate, the softirq starves the process: receive
livelock), so their figure is the process's alone.  For XDP, sink0's NAPI poll, which
turns the redirected frames into the sink's packets, runs in a thread on the sink's CPU:
RPS does that for the other forwarders.

Runs come in rounds: per terminal count, each round runs the kernel, lbproxy and XDP
(both started fresh) one right after the other, so that a slow spell of the shared
machine falls on all.  Figures per run: offered packets/s (what the generator got out),
delivered packets/s (good packets at the sink), their share, CPU (the balancer
process's, the balancer CPU's, and the whole machine's); then the ratios to the kernel,
best against best and round by round; CPU per packet; latency p50/p99 at a moderate
rate (default 10k packets/s, one packet per send) and what each adds to the kernel's.
One generator offers a few hundred thousand packets/s: a forwarder that delivers nearly
all of it is not saturated, its rate says nothing of its capacity, and the summary
says so and compares CPU per packet instead.

Run: ``sudo .venv/bin/python benchmarks/dataplane.py [--duration 3] [--repeat 2]
[--terminals 1,100000] [--latency-rate 10000] [--forwarders kernel,lbproxy,xdp]
[--baseline REV]``.  ``--baseline`` also runs lbproxy as of git revision REV in every
round (``@REV``: its Python paths; ``xdp@REV``, with ``xdp`` among the forwarders: its
XDP executor, its program built from REV's source), for before/after figures against
the same kernel runs.  See docs/performance.md.
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import json
import os
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
TAG = f"lbdp{os.getpid() % 100000}"
GEN, LB, SINK = f"{TAG}-gen", f"{TAG}-lb", f"{TAG}-sink"

GEN_ADDR, LB_CLIENT = "2001:db8:d1::2", "2001:db8:d1::1"
LB_SERVER, SINK_ADDR = "2001:db8:d2::1", "2001:db8:d2::2"
BACKENDS = ("2001:db8:d2::11", "2001:db8:d2::12", "2001:db8:d2::13")
VIP = "2001:db8:d5::80"
COA_PREFIX = "2001:db8:d1:0:0:1::"
HOA_PREFIX = "2001:db8:d100::"
PORT = 5353
MACS = {
    "gen0": "02:00:5e:d1:00:02",
    "lbc": "02:00:5e:d1:00:01",
    "lbs": "02:00:5e:d2:00:01",
    "sink0": "02:00:5e:d2:00:02",
}
#: Every command gets a timeout: the benchmark is bounded in time whatever happens.
COMMAND_TIMEOUT = 60


def run(*argv: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    return subprocess.run(argv, check=check, capture_output=True, text=True,
                          timeout=COMMAND_TIMEOUT)  # fmt: skip


def in_ns(ns: str, *argv: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    return run("ip", "netns", "exec", ns, *argv, check=check)


def nft(ns: str, script: str) -> None:
    subprocess.run(["ip", "netns", "exec", ns, "nft", "-f", "-"], input=script, check=True,
                   capture_output=True, text=True, timeout=COMMAND_TIMEOUT)  # fmt: skip


# -- topology ---------------------------------------------------------------------------


def setup() -> None:
    """Create the three namespaces, the two veth links, addresses and neighbours."""
    for ns in (GEN, LB, SINK):
        run("ip", "netns", "add", ns)
        in_ns(ns, "sysctl", "-qw", "net.ipv6.conf.all.forwarding=0")
        in_ns(ns, "sysctl", "-qw", "net.ipv6.conf.default.accept_dad=0")
        in_ns(ns, "ip", "link", "set", "lo", "up")
    run("ip", "-n", GEN, "link", "add", "gen0", "address", MACS["gen0"], "type", "veth",
        "peer", "name", "lbc", "address", MACS["lbc"], "netns", LB)  # fmt: skip
    run("ip", "-n", LB, "link", "add", "lbs", "address", MACS["lbs"], "type", "veth",
        "peer", "name", "sink0", "address", MACS["sink0"], "netns", SINK)  # fmt: skip
    links = [
        (GEN, "gen0", [GEN_ADDR], LB_CLIENT, MACS["lbc"]),
        (LB, "lbc", [LB_CLIENT], GEN_ADDR, MACS["gen0"]),
        (LB, "lbs", [LB_SERVER], SINK_ADDR, MACS["sink0"]),
        (SINK, "sink0", [SINK_ADDR, *BACKENDS], LB_SERVER, MACS["lbs"]),
    ]
    for ns, dev, addrs, peer, peer_mac in links:
        # veth hands AF_PACKET readers packets whose offloaded checksums are not yet
        # filled in: TX checksum offload off, so the sink sees finished checksums.
        in_ns(ns, "ethtool", "-K", dev, "tx", "off", check=False)
        for addr in addrs:
            run("ip", "-n", ns, "addr", "add", f"{addr}/64", "dev", dev, "nodad")
        run("ip", "-n", ns, "link", "set", dev, "up")
        run("ip", "-n", ns, "neigh", "replace", peer, "lladdr", peer_mac, "dev", dev,
            "nud", "permanent")  # fmt: skip
    for backend in BACKENDS:
        run("ip", "-n", LB, "neigh", "replace", backend, "lladdr", MACS["sink0"], "dev", "lbs",
            "nud", "permanent")  # fmt: skip
    # The sink counts on AF_PACKET; its kernel must not answer (port unreachable,
    # parameter problem for the HAO): drop everything before the stack sees it.
    nft(SINK, "table inet lbdpsink {\n chain pre {\n"
              "  type filter hook prerouting priority -300; policy drop;\n }\n}\n")


def steer_sink(cpus: str | None) -> None:
    """Run the sink's receive processing on `cpus` (RPS), not on the sender's CPU.

    A veth hands a packet to its peer with netif_rx on the sending CPU, so without this
    the sink's kernel work (its half of "another machine") would be charged to the
    balancer's CPU in the lbproxy case and to the generator's in the kernel case.
    """
    if not cpus:
        return
    mask = sum(1 << int(c) for c in cpus.split(","))
    in_ns(SINK, "sh", "-c", f"echo {mask:x} > /sys/class/net/sink0/queues/rx-0/rps_cpus")


class XdpTopology:
    """What the XDP executor needs of this topology, for its runs only: IPv6 forwarding on
    lbc and lbs (the program's next-hop lookup answers only there; ``all.forwarding``
    stays 0, so the kernel forwards nothing), and ``lbproxy_pass`` on sink0: veth drops
    the frames redirected into it unless its peer has an XDP program (or GRO).  sink0's
    NAPI poll -- turning the redirected frames into the sink's packets -- then runs in a
    thread on the sink's CPU (`sink_cpus`): the sink's receive work is the sink's, as RPS
    makes it in the other runs; left where it is raised, it would be charged to the
    balancer's CPU (a fifth to a quarter of it, measured)."""

    def __init__(self, sink_cpus: str | None, frame_sink: FrameSink | None = None) -> None:
        from lbproxy.io.xdp import XdpProgram

        self.program = XdpProgram(max_bindings=1)
        self.sink_cpus = sink_cpus
        #: In frames mode, sink0's program for the whole XDP run (passing, and counting
        #: during the throughput run) instead of ``lbproxy_pass``.
        self.frame_sink = frame_sink

    def on(self) -> None:
        from lbproxy.io.rawsocket import _network_namespace

        in_ns(LB, "sysctl", "-qw", "net.ipv6.conf.lbc.forwarding=1",
              "net.ipv6.conf.lbs.forwarding=1")  # fmt: skip
        if self.frame_sink is not None:
            self.frame_sink.attach()
            return
        with _network_namespace(SINK):
            self.program.attach("lbproxy_pass", socket.if_nametoindex("sink0"))
        if self.sink_cpus:
            thread_napi(self.sink_cpus, SINK, "sink0", realtime=True)

    def off(self) -> None:
        self.program.detach()
        if self.frame_sink is not None:
            self.frame_sink.detach()
        in_ns(LB, "sysctl", "-qw", "net.ipv6.conf.lbc.forwarding=0",
              "net.ipv6.conf.lbs.forwarding=0")  # fmt: skip

    def close(self) -> None:
        self.program.close()


class FrameSink:
    """dpxsink.bpf.o, loaded for the whole benchmark (frames mode) and attached to sink0
    while it counts (`counting`, a throughput run): it counts what arrives, and good
    packets, where veth hands sink0 its frames, before any socket buffer is made --
    dpsink's counting, at a fraction of its cost (dpxsink.bpf.c says why that matters
    with two CPUs) -- and drops them.  sink0's NAPI poll then runs in a thread on the
    sink's CPU at the lowest real-time priority: the sink's work is the sink's, and
    ahead of the generator beside it.  Otherwise (warm-ups, latency runs: dpsink, with
    the kernel's receive timestamps) it is off sink0, as before it existed -- except
    in the XDP runs, where it stays attached, passing everything on, in the place of
    `lbproxy_pass` (`XdpTopology`: veth drops frames redirected to a peer without an
    XDP program)."""

    def __init__(self, path: str, sink_cpus: str | None) -> None:
        from lbproxy.io.xdp import BpfObject

        self.object = BpfObject(path, ("dpxsink",))
        self.config = self.object.map("dpx_config", 4, 4)
        self.counts = self.object.map("dpx_counts", 4, 8, per_cpu=True)
        self.config.update(_u32(1), _u32(PORT))
        self.config.update(_u32(0), _u32(1))  # passing, until a throughput run
        self._sink_cpus = sink_cpus
        self.napi: set[int] = set()

    def attach(self) -> bool:
        """On sink0, its poll threaded on the sink's CPU; False if it already was."""
        from lbproxy.io.rawsocket import _network_namespace

        if self.object.attached:
            return False
        with _network_namespace(SINK):
            self.object.attach("dpxsink", socket.if_nametoindex("sink0"))
        self.napi = thread_napi(self._sink_cpus, SINK, "sink0", realtime=True)
        return True

    def detach(self) -> None:
        """Off sink0 (its NAPI context goes with it: the sink's receive work is RPS's
        again)."""
        if self.object.attached:
            in_ns(SINK, "sh", "-c", "echo 0 > /sys/class/net/sink0/threaded", check=False)
            self.object.detach()
            self.napi = set()

    def totals(self) -> tuple[int, int, float]:
        """IPv6 frames and good packets counted so far, and the sink's NAPI CPU time."""
        return (self.counts.per_cpu_sums(0), self.counts.per_cpu_sums(1),
                sum(runtime_seconds(pid) for pid in self.napi))  # fmt: skip

    @contextlib.contextmanager
    def counting(self) -> Iterator[dict[str, Any]]:
        """A throughput run: frames counted and dropped; the dict gets dpsink's result
        keys (``received``, ``good``; no latency) and the sink's CPU seconds when the
        block ends."""
        result: dict[str, Any] = {}
        attached = self.attach()
        before = self.totals()
        self.config.update(_u32(0), _u32(0))
        try:
            yield result
        finally:
            self.config.update(_u32(0), _u32(1))
            after = self.totals()
            if attached:
                self.detach()
            result.update(received=after[0] - before[0], good=after[1] - before[1],
                          cpu=after[2] - before[2], lat_p50_us=0, lat_p99_us=0)  # fmt: skip

    def close(self) -> None:
        self.detach()
        self.object.close()


def _u32(value: int) -> bytes:
    return value.to_bytes(4, "little")


def napi_threads(device: str) -> set[int]:
    """The kernel threads polling `device`'s NAPI contexts (``napi/<device>-<id>``)."""
    found = set()
    for entry in os.scandir("/proc"):
        if entry.name.isdigit():
            with contextlib.suppress(OSError):
                if Path(entry.path, "comm").read_text().startswith(f"napi/{device}-"):
                    found.add(int(entry.name))
    return found


def thread_napi(cpus: str | None, ns: str = LB, device: str = "lbc",
                realtime: bool = False) -> set[int]:  # fmt: skip
    """`device`'s NAPI poll (lbc: where its XDP program runs) in kernel threads pinned to
    `cpus` (threaded NAPI), instead of in the softirq of whichever CPU sent the frame;
    their process ids.  `realtime`: at the lowest real-time priority, so that, like the
    softirq it replaces, it runs before the CPU's ordinary processes (the generator
    beside sink0's; the lbproxy process beside lbc's, which gets what the driver leaves,
    as with a NIC's softirq)."""
    before = napi_threads(device)
    in_ns(ns, "sh", "-c", f"echo 0 > /sys/class/net/{device}/threaded; "
                          f"echo 1 > /sys/class/net/{device}/threaded")  # fmt: skip
    threads: set[int] = set()
    for _ in range(50):
        threads = napi_threads(device) - before
        if threads:
            break
        time.sleep(0.02)
    if not threads:
        raise RuntimeError(f"no NAPI thread for {device} after enabling threaded NAPI")
    for pid in threads:
        if cpus:
            os.sched_setaffinity(pid, {int(c) for c in cpus.split(",")})
        if realtime:
            os.sched_setscheduler(pid, os.SCHED_FIFO, os.sched_param(1))
    return threads


def runtime_seconds(pid: int) -> float:
    """Time task `pid` spent on a CPU (/proc/<pid>/schedstat, in ns: a kernel thread's
    whole work, the softirqs it ran when it enabled them again included)."""
    try:
        return int(Path(f"/proc/{pid}/schedstat").read_text().split()[0]) / 1e9
    except (OSError, ValueError, IndexError):
        return 0.0


def busy_share(cpus: str | None, seconds: float = 0.5) -> float:
    """How busy `cpus` are with no traffic (other work on a shared machine), over
    `seconds`: from their idle time, which the kernel keeps exactly (0 without `cpus`)."""
    if not cpus:
        return 0.0
    wanted = {f"cpu{c}" for c in cpus.split(",")}

    def idle() -> float:
        ticks = 0
        for line in Path("/proc/stat").read_text().splitlines():
            fields = line.split()
            if fields and fields[0] in wanted:
                ticks += int(fields[4]) + int(fields[5])
        return ticks / os.sysconf("SC_CLK_TCK")

    before, start = idle(), time.monotonic()
    time.sleep(seconds)
    wall = (time.monotonic() - start) * len(wanted)
    return max(0.0, 1 - (idle() - before) / wall)


def program_stats(ns: str, device: str) -> tuple[int, int]:
    """(run time in ns, runs) of the XDP program attached to `device` in `ns`, while
    `BpfStats` is on ((0, 0) when none is attached or the stats are off)."""
    try:
        link = json.loads(run("ip", "-n", ns, "-j", "link", "show", "dev", device).stdout)[0]
        prog = link["xdp"]["prog"]["id"]
        info = json.loads(run("bpftool", "-j", "prog", "show", "id", str(prog)).stdout)
    except (KeyError, IndexError, ValueError, OSError, subprocess.CalledProcessError):
        return 0, 0
    return int(info.get("run_time_ns", 0)), int(info.get("run_cnt", 0))


class BpfStats:
    """BPF programs' run-time statistics, on while this holds libbpf's
    ``bpf_enable_stats`` descriptor (they go off when it is closed, or the process
    ends: nothing global is left behind)."""

    def __init__(self) -> None:

        self.fd = -1
        if shutil.which("bpftool") is None:
            return
        with contextlib.suppress(OSError, AttributeError):
            lib = ctypes.CDLL("libbpf.so.1", use_errno=True)
            lib.bpf_enable_stats.argtypes = [ctypes.c_int]
            self.fd = lib.bpf_enable_stats(0)  # BPF_STATS_RUN_TIME

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


def teardown() -> None:
    for ns in (GEN, LB, SINK):
        for _ in range(3):
            if run("ip", "netns", "del", ns, check=False).returncode == 0:
                break
            time.sleep(0.2)


def kernel_dnat(on: bool) -> None:
    """Configure the lb namespace as the kernel baseline (on) or for lbproxy (off)."""
    run("ip", "netns", "exec", LB, "nft", "delete", "table", "ip6", "lbdpnat", check=False)
    in_ns(LB, "sysctl", "-qw", f"net.ipv6.conf.all.forwarding={1 if on else 0}")
    if on:
        in_ns(LB, "sysctl", "-qw", "net.netfilter.nf_conntrack_checksum=0", check=False)
        mapping = ", ".join(f"{i} : {b}" for i, b in enumerate(BACKENDS))
        nft(LB, f"table ip6 lbdpnat {{\n chain pre {{\n"
                f"  type nat hook prerouting priority -100;\n"
                f"  ip6 daddr {VIP} dnat to jhash ip6 saddr mod {len(BACKENDS)}"
                f" map {{ {mapping} }}\n }}\n}}\n")
        # The checksum setting only exists once conntrack is loaded (by the table).
        in_ns(LB, "sysctl", "-qw", "net.netfilter.nf_conntrack_checksum=0")


def link_stats(ns: str, dev: str) -> dict[str, int]:
    data = json.loads(run("ip", "-n", ns, "-j", "-s", "link", "show", "dev", dev).stdout)[0]
    s = data["stats64"]
    return {"rx": s["rx"]["packets"], "tx": s["tx"]["packets"],
            "rx_dropped": s["rx"]["dropped"], "tx_dropped": s["tx"]["dropped"]}  # fmt: skip


# -- processes --------------------------------------------------------------------------


def build(directory: str) -> dict[str, str]:
    """Compile dpgen.c and dpsink.c into `directory`, and the frame generator (dpxgen.c,
    with libbpf, and its program dpxgen.bpf.c, with clang) when the tools are there;
    their paths by name ("dpxgen-missing": why there is no frame generator)."""
    built = {}
    for name in ("dpgen", "dpsink"):
        out = os.path.join(directory, name)
        run("gcc", "-O2", "-Wall", "-o", out, str(HERE / f"{name}.c"))
        built[name] = out
    try:
        for name in ("dpxgen", "dpxsink"):
            built[f"{name}.bpf.o"] = os.path.join(directory, f"{name}.bpf.o")
            run("clang", "-O2", "-g", "-Wall", "-target", "bpf",
                f"-I/usr/include/{os.uname().machine}-linux-gnu", "-c",
                str(HERE / f"{name}.bpf.c"), "-o", built[f"{name}.bpf.o"])  # fmt: skip
        built["dpxgen"] = os.path.join(directory, "dpxgen")
        run("gcc", "-O2", "-Wall", "-o", built["dpxgen"], str(HERE / "dpxgen.c"), "-lbpf")
    except (OSError, subprocess.CalledProcessError) as e:
        detail = getattr(e, "stderr", "") or str(e)
        built["dpxgen-missing"] = f"cannot build the frame generator: {detail.strip()[-300:]}"
    return built


def pinned(cpus: str | None, argv: Sequence[str]) -> list[str]:
    return ["taskset", "-c", cpus, *argv] if cpus else list(argv)


def cpu_seconds(pid: int) -> float:
    """User + system CPU of a running process (``ip netns exec`` and taskset exec it)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def machine_cpu() -> dict[str, int]:
    """/proc/stat's first line: jiffies spent by all CPUs, by kind."""
    names = ("user", "nice", "system", "idle", "iowait", "irq", "softirq", "steal")
    values = Path("/proc/stat").read_text().splitlines()[0].split()[1:9]
    return dict(zip(names, map(int, values), strict=True))


def finish(proc: subprocess.Popen[str]) -> tuple[dict[str, Any], float]:
    """Wait for a C helper; its JSON line and the CPU seconds it used."""
    assert proc.stdout is not None
    out = proc.stdout.read()
    _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    lines = [line for line in out.splitlines() if line.startswith("{")]
    if proc.returncode != 0 or not lines:
        raise RuntimeError(f"{proc.args!r}: exit {proc.returncode}: {out[-500:]}")
    return json.loads(lines[-1]), usage.ru_utime + usage.ru_stime


class Tools:
    """The compiled helpers and where to run them."""

    def __init__(self, built: dict[str, str], gen_cpu: str | None, sink_cpu: str | None,
                 balancer_cpu: str | None = None, frames: bool = False):  # fmt: skip
        self.built = built
        #: Throughput runs offer raw frames (dpxgen) instead of socket buffers (dpgen),
        #: and count them with `frame_sink` instead of dpsink.
        self.frames = frames
        self.frame_sink: FrameSink | None = None
        self.gen_cpu = gen_cpu
        self.sink_cpu = sink_cpu
        #: The CPU every forwarder's work runs on (its busy time is their cost).
        self.balancer_cpu = balancer_cpu

    def generate(self, terminals: int, rate: float, seconds: float,
                 batch: int) -> subprocess.Popen[str]:  # fmt: skip
        """A generator offering `rate` packets/s (0: as fast as it can) for `seconds`:
        dpgen, or at full rate with `frames`, dpxgen (which offers raw frames)."""
        if self.frames and rate == 0:
            argv = [self.built["dpxgen"], self.built["dpxgen.bpf.o"], "gen0", MACS["lbc"],
                    MACS["gen0"], COA_PREFIX, HOA_PREFIX, VIP, str(PORT), str(terminals),
                    str(seconds)]  # fmt: skip
        else:
            argv = [self.built["dpgen"], "gen0", MACS["lbc"], COA_PREFIX, HOA_PREFIX, VIP,
                    str(PORT), str(terminals), str(rate), str(seconds), str(batch)]  # fmt: skip
        return subprocess.Popen(["ip", "netns", "exec", GEN, *pinned(self.gen_cpu, argv)],
                                stdout=subprocess.PIPE, text=True)  # fmt: skip

    @contextlib.contextmanager
    def sink(self, seconds: float) -> Iterator[subprocess.Popen[str]]:
        argv = [self.built["dpsink"], "sink0", str(PORT), str(seconds)]
        proc = subprocess.Popen(["ip", "netns", "exec", SINK, *pinned(self.sink_cpu, argv)],
                                stdout=subprocess.PIPE, text=True)  # fmt: skip
        try:
            assert proc.stdout is not None
            if proc.stdout.readline().strip() != "ready":
                raise RuntimeError("dpsink did not start")
            yield proc
        finally:
            if proc.returncode is None and proc.poll() is None:
                proc.send_signal(signal.SIGINT)


class Lbproxy:
    """``twistd -n lbproxy`` in the lb namespace, with a configuration for this topology."""

    def __init__(self, directory: str, cpu: str | None, tree: str | None = None,
                 offload: str | None = None, rx_cpu: str | None = None) -> None:  # fmt: skip
        name = "lbproxy" if tree is None else "lbproxy-baseline"
        if offload == "xdp":
            name = "lbproxy-xdp" if tree is None else "lbproxy-xdp-baseline"
        self.config = os.path.join(directory, f"{name}.toml")
        self.log = os.path.join(directory, f"{name}.log")
        self.errors = os.path.join(directory, f"{name}.err")
        self.control = os.path.join(directory, f"{name}.sock")
        self.cpu = cpu
        #: Another source tree to run lbproxy from (a baseline revision), or None.
        self.tree = tree
        #: ``[balancer] offload`` (None: left out, for trees older than the key).
        self.offload = offload
        #: Where lbc's NAPI threads go (the XDP executor's runs).
        self.rx_cpu = rx_cpu
        self.napi: set[int] = set()
        lines = [
            "[balancer]", 'mode = "translate"', 'key_chain = ["hoa", "iid", "spi", "src"]',
            'scheduler = "maglev"', "lifetime = 600", "max_entries = 1000000",
            "sweep_interval = 1.0", "batch = 256",
            *([f'offload = "{offload}"'] if offload is not None else []),
            "[virtual]", f'addresses = ["{VIP}"]',
            "[interfaces]", 'client = "lbc"', 'server = "lbs"',
            "[control]", f'socket = "{self.control}"',
        ]  # fmt: skip
        for i, address in enumerate(BACKENDS, 1):
            lines += ["[[backend]]", f'name = "b{i}"', f'address = "{address}"']
        Path(self.config).write_text("\n".join(lines) + "\n")
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self, timeout: float = 30.0) -> None:
        for stale in (self.log, self.control):  # the ready line must be this run's
            with contextlib.suppress(FileNotFoundError):
                os.unlink(stale)
        twistd = os.path.join(os.path.dirname(sys.executable), "twistd")
        argv = [twistd, "-n", "--pidfile=", f"--logfile={self.log}", "lbproxy",
                "--config", self.config]  # fmt: skip
        env = dict(os.environ)
        if self.tree is not None:
            env["PYTHONPATH"] = self.tree
        with open(self.errors, "wb") as errors:
            self.proc = subprocess.Popen(
                ["ip", "netns", "exec", LB, *pinned(self.cpu, argv)],
                stdout=subprocess.DEVNULL, stderr=errors, cwd=self.tree or ROOT, env=env,
            )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if "lbproxy forwarding" in self.read_log():
                if self.offload == "xdp":
                    self.napi = thread_napi(self.rx_cpu, realtime=True)
                return
            if self.proc.poll() is not None:
                break
            time.sleep(0.1)
        self.stop()  # never leave it running behind an error
        raise RuntimeError(f"lbproxy did not start: {Path(self.errors).read_text()[-2000:]}"
                           f"{self.read_log()[-2000:]}")  # fmt: skip

    def read_log(self) -> str:
        try:
            return Path(self.log).read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def stats(self) -> dict[str, Any]:
        """``lbproxyctl stats``: the balancer's packet counters."""
        result = subprocess.run(
            [sys.executable, "-m", "lbproxy.ops.ctl", "--socket", self.control, "--json", "stats"],
            check=True, capture_output=True, text=True, timeout=COMMAND_TIMEOUT,
            cwd=self.tree or ROOT,
            env={**os.environ, "PYTHONPATH": self.tree} if self.tree else None,
        )
        return dict(json.loads(result.stdout))

    def cpu_seconds(self) -> float:
        """The process's CPU time (all its threads)."""
        assert self.proc is not None
        return cpu_seconds(self.proc.pid)


    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)


# -- measurements -----------------------------------------------------------------------


def baseline_tree(revision: str, directory: str) -> str:
    """Export lbproxy at git `revision` into `directory`/baseline; its path."""
    tree = os.path.join(directory, "baseline")
    if not os.path.isdir(tree):
        os.makedirs(tree)
        archive = subprocess.run(["git", "-C", str(ROOT), "archive", revision], check=True,
                                 capture_output=True, timeout=COMMAND_TIMEOUT).stdout  # fmt: skip
        subprocess.run(["tar", "-x", "-C", tree], input=archive, check=True,
                       timeout=COMMAND_TIMEOUT)  # fmt: skip
        source = os.path.join(tree, "lbproxy", "xdp", "lbproxy.bpf.c")
        if os.path.exists(source):  # its XDP program, built as `make xdp` builds ours
            subprocess.run(["clang", "-O2", "-g", "-Wall", "-target", "bpf",
                            "-I/usr/include/x86_64-linux-gnu", "-c", source, "-o",
                            source[:-1] + "o"], check=True, timeout=COMMAND_TIMEOUT)  # fmt: skip
    return tree


def warm_up(tools: Tools, terminals: int, balancer: Lbproxy | None = None) -> None:
    """Send every terminal's packets twice at a moderate rate: bindings, conntrack, caches.

    Twice so that lbproxy's new bindings (probationary until their second packet) are
    established, as long-lived terminals' are.  With lbproxy, until its table holds every
    terminal (a first packet dropped at a full socket queue makes no binding; up to three
    more times, slower each time): the measured runs are of established terminals.
    """
    rate = 50_000.0
    for _ in range(4):
        seconds = max(0.5, 2 * terminals / rate)
        with tools.sink(seconds + 5) as sink:
            gen = tools.generate(terminals, rate, seconds, 16)
            finish(gen)
            time.sleep(0.3)
        finish(sink)
        if balancer is None:
            return
        time.sleep(1.2)  # a sweep: bindings written to the program, counters folded
        size = balancer.stats()["table"]["size"]
        if size >= terminals:
            return
        rate /= 2
    print(f"  (warm-up: {size:,} of {terminals:,} terminals have a binding)", flush=True)


def forwarding_seconds(balancer: Lbproxy | None, napi: set[int]) -> float:
    """The CPU time the forwarding has taken so far: the lbproxy process's (the Python
    paths; with XDP, the misses, the stamps and the counters) and lbc's NAPI threads'
    (the kernel's forwarding, or the XDP program's, with the redirect)."""
    total = balancer.cpu_seconds() if balancer else 0.0
    return total + sum(runtime_seconds(pid) for pid in napi)


def throughput(tools: Tools, terminals: int, seconds: float, balancer: Lbproxy | None,
               napi: set[int]) -> dict[str, float]:  # fmt: skip
    """Offer as much as the generator can for `seconds`; what arrived, and the CPU it took."""
    counted = balancer.stats() if balancer else {}
    background = busy_share(tools.balancer_cpu)
    frame_sink = tools.frame_sink
    with (tools.sink(seconds + 10) if frame_sink is None else frame_sink.counting()) as sink:
        links = (link_stats(GEN, "gen0"), link_stats(LB, "lbc"), link_stats(SINK, "sink0"))
        machine = machine_cpu()
        bal_cpu = balancer.cpu_seconds() if balancer else 0.0
        fwd_cpu = forwarding_seconds(balancer, napi)
        gen = tools.generate(terminals, 0, seconds, 64)
        gen_result, gen_cpu = finish(gen)
        time.sleep(0.3)  # what is queued in the balancer drains
        bal_cpu = (balancer.cpu_seconds() - bal_cpu) if balancer else 0.0
        fwd_cpu = forwarding_seconds(balancer, napi) - fwd_cpu
        after_machine = machine_cpu()
        background_after = busy_share(tools.balancer_cpu)
        after = (link_stats(GEN, "gen0"), link_stats(LB, "lbc"), link_stats(SINK, "sink0"))
    if isinstance(sink, dict):  # the frame sink's counts
        sink_result, sink_cpu = sink, sink["cpu"]
    else:
        sink_result, sink_cpu = finish(sink)
    elapsed = gen_result["elapsed"]
    processed = 0.0
    if balancer:
        processed = (balancer.stats()["packets_in"] - counted["packets_in"]) / elapsed
    spent = {k: after_machine[k] - machine[k] for k in machine}
    total = sum(spent.values()) or 1
    return {
        "offered": gen_result["sent"] / elapsed,
        "arrived": (after[1]["rx"] - links[1]["rx"]) / elapsed,
        "processed": processed,
        "delivered": sink_result["good"] / elapsed,
        "bad": float(sink_result["received"] - sink_result["good"]),
        "balancer_cpu": bal_cpu / elapsed,
        # The forwarding's CPU time as a share of the run, and per packet delivered (us);
        # how busy the balancer's CPU was with no traffic, just before and after.
        "forwarding_cpu": fwd_cpu / elapsed,
        "background_cpu": max(background, background_after),
        "us_per_packet": fwd_cpu / (sink_result["good"] or 1) * 1e6,
        "gen_cpu": gen_cpu / elapsed,
        "sink_cpu": sink_cpu / elapsed,
        "machine_busy": 1 - (spent["idle"] + spent["iowait"]) / total,
        "machine_softirq": spent["softirq"] / total,
        "latency_p50": float(sink_result["lat_p50_us"]),
        "latency_p99": float(sink_result["lat_p99_us"]),
    }


def latency(tools: Tools, terminals: int, rate: float, seconds: float) -> dict[str, float]:
    """One packet per send at `rate`; one-way latency percentiles at the sink (us), and
    the XDP program's own run time per packet (ns; 0 when none is attached), from the
    kernel's BPF statistics -- on for this run only, as they cost two clock reads per
    program run, which the throughput runs must not pay."""
    stats = BpfStats()
    try:
        before = program_stats(LB, "lbc")
        with tools.sink(seconds + 10) as sink:
            gen_result, _ = finish(tools.generate(terminals, rate, seconds, 1))
            time.sleep(0.3)
        result, _ = finish(sink)
        after = program_stats(LB, "lbc")
    finally:
        stats.close()
    runs = after[1] - before[1]
    return {
        "offered": gen_result["sent"] / gen_result["elapsed"],
        "delivered": result["good"] / gen_result["elapsed"],
        "p50": float(result["lat_p50_us"]),
        "p90": float(result["lat_p90_us"]),
        "p99": float(result["lat_p99_us"]),
        "p999": float(result["lat_p999_us"]),
        "program_ns": (after[0] - before[0]) / runs if runs > 0 else 0.0,
    }


# -- the run ----------------------------------------------------------------------------


def measure(args: argparse.Namespace, tools: Tools, directory: str) -> dict[str, Any]:
    """Rounds of one run per forwarder, one right after the other.

    Why rounds: this VM's host slows it down now and then for tens of seconds (every
    function in a profile ~1.5 times slower at once, docs/performance.md); measuring
    all kernel runs, then all lbproxy runs, let such a spell fall on one forwarder
    only.  Within a round the runs are seconds apart, so the round's ratio compares
    like with like.  lbproxy is started fresh for each of its runs (and warmed up, as
    the kernel's conntrack is).
    """
    results: dict[str, Any] = {"throughput": {}, "latency": {}}
    forwarders = list(args.forwarders)
    if args.baseline:
        forwarders.append(f"@{args.baseline}")
        if "xdp" in forwarders:  # the XDP executor as of the baseline too: before/after
            forwarders.append(f"xdp@{args.baseline}")
    trees = {f: baseline_tree(args.baseline, directory) for f in forwarders if "@" in f}
    xdp_links = None
    if "xdp" in forwarders:
        xdp_links = XdpTopology(args.sink_rps or None, tools.frame_sink)
    try:
        for terminals in args.terminals:
            for forwarder in forwarders:
                results["throughput"][forwarder, terminals] = []
            for round_ in range(args.repeat):
                last = round_ == args.repeat - 1
                for forwarder in forwarders:
                    one_run(args, tools, directory, results, forwarder, terminals, last,
                            trees.get(forwarder), xdp_links)  # fmt: skip
    finally:
        if xdp_links is not None:
            xdp_links.close()
    return results


def one_run(args: argparse.Namespace, tools: Tools, directory: str, results: dict[str, Any],
            forwarder: str, terminals: int, last: bool, tree: str | None,
            xdp_links: XdpTopology | None) -> None:  # fmt: skip
    """One forwarder's throughput run (and, in the last round, its latency run)."""
    balancer = None
    napi: set[int] = set()
    kind = forwarder.split("@")[0]  # "xdp@REV": the XDP executor of a baseline tree
    kernel_dnat(forwarder == "kernel")
    if forwarder == "kernel":
        # The kernel forwards in lbc's receive processing: GRO gives lbc a NAPI context,
        # run in a thread on the balancer's CPU (as XDP's is), where its time is the
        # kernel's forwarding, measured exactly.  (Forwarded UDP is not coalesced.)
        in_ns(LB, "ethtool", "-K", "lbc", "gro", "on")
        napi = thread_napi(args.rx_cpu or None, realtime=True)
    if kind == "xdp":
        assert xdp_links is not None
        xdp_links.on()
    elif forwarder != "kernel" and tools.frames:
        # Raw frames reach lbc only through a NAPI context: GRO gives the Python paths
        # one, polled (unthreaded) on the sender's CPU, where their receive work was.
        in_ns(LB, "ethtool", "-K", "lbc", "gro", "on")
    if forwarder != "kernel":
        offload = {"lbproxy": "none", "xdp": "xdp"}.get(kind)  # None: a baseline tree
        balancer = Lbproxy(directory, args.balancer_cpu or None, tree, offload,
                           args.rx_cpu or None)  # fmt: skip
        balancer.start()
    if balancer is not None:
        napi = balancer.napi
    try:
        warm_up(tools, terminals, balancer)
        run = throughput(tools, terminals, args.duration, balancer, napi)
        if kind == "xdp" and balancer is not None:
            run["offloaded"] = balancer.stats()["ports"]["xdp"]["forwarded"]
        results["throughput"][forwarder, terminals].append(run)
        report_throughput(forwarder, terminals, [run])
        if last and args.latency_rate > 0:
            if kind == "xdp":
                # sink0's poll unthreaded: it runs right after the redirect, and RPS
                # hands the packets to the sink's CPU, as for the other forwarders
                # (a thread woken there would add its wake-up to the XDP path alone).
                in_ns(SINK, "sh", "-c", "echo 0 > /sys/class/net/sink0/threaded")
            lat = latency(tools, terminals, args.latency_rate, args.latency_seconds)
            results["latency"][forwarder, terminals] = lat
            report_latency(forwarder, terminals, lat)
    finally:
        if balancer is not None:
            balancer.stop()
            if args.show_log:
                print(balancer.read_log()[-3000:])
        if kind == "xdp" and xdp_links is not None:
            xdp_links.off()
        if forwarder == "kernel":
            in_ns(LB, "sh", "-c", "echo 0 > /sys/class/net/lbc/threaded")
        if forwarder == "kernel" or (kind != "xdp" and tools.frames):
            in_ns(LB, "ethtool", "-K", "lbc", "gro", "off")


def round_ratios(results: dict[str, Any], forwarder: str, terminals: int) -> list[float]:
    """`forwarder`'s delivered rate over the kernel's, round by round."""
    ours = results["throughput"][forwarder, terminals]
    kernel = results["throughput"]["kernel", terminals]
    return [o["delivered"] / (k["delivered"] or 1) for o, k in zip(ours, kernel, strict=True)]


def best(runs: list[dict[str, float]]) -> dict[str, float]:
    """The run with the highest delivered rate (noise on a shared machine only lowers it)."""
    return max(runs, key=lambda r: r["delivered"])


#: A run whose balancer CPU was busier than this with no traffic, just before or just
#: after it, shared that CPU with other work (the NAPI threads run before it, at a
#: real-time priority; the lbproxy process shares it).
DISTURBED = 0.05


def cpu_per_packet(runs: list[dict[str, float]]) -> tuple[float, int]:
    """The median CPU per packet of the runs whose balancer CPU was otherwise idle, or of
    all when none was; and how many runs that is (negative: all, none undisturbed)."""
    clean = [r["us_per_packet"] for r in runs if r["background_cpu"] <= DISTURBED]
    if clean:
        return statistics.median(clean), len(clean)
    return statistics.median(r["us_per_packet"] for r in runs), -len(runs)


def report_throughput(forwarder: str, terminals: int, runs: list[dict[str, float]]) -> None:
    for r in runs:
        print(f"{forwarder:<9} {terminals:>8,} {r['offered']:>11,.0f} {r['arrived']:>11,.0f} "
              f"{r['processed']:>11,.0f} "
              f"{r['delivered']:>11,.0f} {r['delivered'] / (r['offered'] or 1):>6.1%} "
              f"{r['balancer_cpu']:>6.0%} {r['forwarding_cpu']:>6.0%} "
              f"{r['us_per_packet']:>6.2f}{'!' if r['background_cpu'] > DISTURBED else ' '}"
              f"{r['gen_cpu']:>6.0%} {r['sink_cpu']:>6.0%} "
              f"{r['machine_busy']:>6.0%} {r['machine_softirq']:>6.0%}",
              flush=True)  # fmt: skip


def report_latency(forwarder: str, terminals: int, r: dict[str, float]) -> None:
    program = f"; the XDP program {r['program_ns']:.0f} ns/packet" if r["program_ns"] else ""
    print(f"  latency {forwarder} {terminals:,} terminals at {r['offered']:,.0f}/s "
          f"(delivered {r['delivered']:,.0f}/s): p50 {r['p50']:.0f} us, p90 {r['p90']:.0f} us, "
          f"p99 {r['p99']:.0f} us, p99.9 {r['p999']:.0f} us{program}", flush=True)  # fmt: skip


# -- ablation: what each optimisation is worth, in-process --------------------------------

#: (name, batched I/O, fast path, link sending): the forwarder variants the ablation
#: compares ("all": what ForwarderService does by default).  The fast path and link
#: sending work on the batched ports only, so "no batched I/O" has neither.
VARIANTS = (
    ("all", True, True, True),
    ("no link send", True, True, False),
    ("no fast path", True, False, True),
    ("no batched I/O", False, False, False),
)


def ablation(tools: Tools, terminals: int, rounds: int, count: int = 30_000) -> None:
    """CPU per packet of ForwarderService variants draining the same queued packets.

    The variants share one process; each round queues `count` packets in the client
    socket (the forwarder not reading), then times draining them through the variant
    (CPU time of this process).  Rounds alternate the order; the ratios are taken per
    round, so machine-wide noise (other jobs on a shared machine) mostly cancels out.
    """
    import ipaddress

    from twisted.internet import reactor as clock  # only its clock: never run here
    from twisted.internet.testing import MemoryReactor

    from lbproxy.core.balancer import Balancer
    from lbproxy.core.keys import KeyChain
    from lbproxy.core.selection import Backend, scheduler_from_name
    from lbproxy.core.table import StickyTable
    from lbproxy.io.forwarder import ForwarderService
    from lbproxy.io.rawsocket import LinuxPacketSystem

    backends = [Backend(f"b{i}", ipaddress.IPv6Address(a)) for i, a in enumerate(BACKENDS, 1)]
    services = {}
    for name, batch_io, fast, link in VARIANTS:
        balancer = Balancer(
            chain=KeyChain.from_names(["hoa", "iid", "spi", "src"]),
            table=StickyTable(clock, 600.0, 1_000_000), scheduler=scheduler_from_name("maglev"),
            backends=backends, virtual_addresses=[ipaddress.IPv6Address(VIP)], clock=clock,
        )  # fmt: skip
        balancer.fast_path = fast
        service = ForwarderService(
            balancer, LinuxPacketSystem(LB), MemoryReactor(), clock, client_interface="lbc",
            server_interface="lbs", batch_io=batch_io, own_addresses=(), link_send=link,
        )  # fmt: skip
        service.client.receive_buffer = 64 << 20  # the whole round's packets fit
        service.privilegedStartService()  # opens the sockets, reads nothing yet
        service._refresh_neighbours()  # the backends' static entries (link sending)
        services[name] = service
    costs: dict[str, list[float]] = {name: [] for name, *_ in VARIANTS}
    try:
        for r in range(rounds + 1):  # round 0 warms up (bindings, caches)
            order = list(services) if r % 2 else list(services)[::-1]
            for name in order:
                service = services[name]
                sent, _ = finish(tools.generate(terminals, 100_000, count / 100_000, 64))
                time.sleep(0.2)
                reader = service.client
                before = reader.stats.received
                cpu = time.process_time()
                deadline = time.monotonic() + 10
                while (reader.stats.received - before < sent["sent"]
                       and time.monotonic() < deadline):  # fmt: skip
                    reader.doRead()
                flush = getattr(service.writer, "flush", None)
                if flush is not None:
                    flush()
                done = reader.stats.received - before
                if r and done:
                    costs[name].append((time.process_time() - cpu) / done * 1e6)
    finally:
        for service in services.values():
            service.writer.close()  # first: it flushes through the server socket
            service.client.close()
            service.server.close()
    print(f"\nablation, {terminals:,} terminals, {rounds} rounds of {count:,} queued packets "
          "(CPU us per packet of the forwarding process; ratio to 'all' per round)")
    for name, *_ in VARIANTS:
        ratios = [a / b for a, b in zip(costs[name], costs["all"], strict=True)]
        print(f"  {name:<15} median {statistics.median(costs[name]):5.2f} us  "
              f"min {min(costs[name]):5.2f} us  ratio {statistics.median(ratios):.2f}")


#: Issue 12's goals for the XDP executor.
GOAL_RATIO, GOAL_US, GOAL_P99_ADDED = 2.0, 1.0, 50.0
#: A forwarder delivering at least this share of what was offered is not saturated.
UNSATURATED = 0.97


def summary(args: argparse.Namespace, results: dict[str, Any]) -> None:
    print("\nsummary (best run of each; ratio = delivered / kernel's delivered; CPU per packet "
          "= the forwarding's CPU time / packets delivered)")
    baseline = [f"@{args.baseline}", *([f"xdp@{args.baseline}"] if "xdp" in args.forwarders
                                       else [])] if args.baseline else []  # fmt: skip
    forwarders = [*args.forwarders, *baseline]
    throughput, lat = results["throughput"], results["latency"]
    for terminals in args.terminals:
        print(f"  {terminals:,} terminals:")
        kernel = best(throughput["kernel", terminals]) if "kernel" in forwarders else None
        for forwarder in forwarders:
            runs = throughput[forwarder, terminals]
            if not runs:
                continue
            ours = best(runs)
            median = statistics.median(r["delivered"] for r in runs)
            cpu, clean = cpu_per_packet(runs)
            which = (f"{clean} undisturbed run{'s' if clean != 1 else ''}" if clean > 0 else
                     f"all {-clean} runs, every one disturbed")  # fmt: skip
            line = (f"    {forwarder:<9} {ours['delivered']:>9,.0f}/s (median {median:,.0f}; "
                    f"{ours['delivered'] / (ours['offered'] or 1):.0%} of the "
                    f"{ours['offered']:,.0f}/s offered)  CPU {cpu:.2f} us/packet (median of "
                    f"{which})")  # fmt: skip
            if kernel is not None and forwarder != "kernel":
                rounds = round_ratios(results, forwarder, terminals)
                line += (f"  ratio {ours['delivered'] / (kernel['delivered'] or 1):.2f} "
                         f"(rounds {', '.join(f'{r:.2f}' for r in rounds)})")
            if forwarder.startswith("xdp") and "offloaded" in ours:
                line += (f"  in the driver: {ours['offloaded']:,} packets since start")
            print(line)
            if (forwarder, terminals) in lat:
                o = lat[forwarder, terminals]
                added = ""
                if ("kernel", terminals) in lat and forwarder != "kernel":
                    k = lat["kernel", terminals]
                    added = f", added {o['p50'] - k['p50']:.0f}/{o['p99'] - k['p99']:.0f} us"
                program = (f"; the XDP program itself {o['program_ns']:.0f} ns/packet"
                           if o.get("program_ns") else "")  # fmt: skip
                print(f"    {'':<9} latency at {o['offered']:,.0f}/s: p50/p99 "
                      f"{o['p50']:.0f}/{o['p99']:.0f} us{added}{program}")  # fmt: skip
        if kernel is not None and throughput.get(("xdp", terminals)):
            goals(results, terminals, throughput["kernel", terminals],
                  throughput["xdp", terminals])  # fmt: skip


def goals(results: dict[str, Any], terminals: int, kernel_runs: list[dict[str, float]],
          xdp_runs: list[dict[str, float]]) -> None:  # fmt: skip
    """Issue 12's goals, each with its evidence -- and where one generator cannot tell
    the forwarders apart, that, and the comparison that can."""
    kernel, xdp = best(kernel_runs), best(xdp_runs)
    kernel_us, xdp_us = cpu_per_packet(kernel_runs)[0], cpu_per_packet(xdp_runs)[0]
    ratio = xdp["delivered"] / (kernel["delivered"] or 1)
    saturated = {name: r["delivered"] / (r["offered"] or 1) < UNSATURATED
                 for name, r in (("kernel", kernel), ("xdp", xdp))}  # fmt: skip
    print(f"    goals ({terminals:,} terminals):")
    if ratio >= GOAL_RATIO:
        print(f"      XDP >= {GOAL_RATIO:g}x kernel delivered: met ({ratio:.2f})")
    elif not saturated["xdp"]:
        print(f"      XDP >= {GOAL_RATIO:g}x kernel delivered: not measurable with one "
              f"generator -- it offered {xdp['offered']:,.0f}/s and XDP delivered "
              f"{xdp['delivered'] / (xdp['offered'] or 1):.0%} of it (ratio {ratio:.2f}; the "
              f"kernel {'was' if saturated['kernel'] else 'was not'} saturated); by CPU per "
              f"packet on the balancer's CPU, XDP {xdp_us:.2f} us against the kernel's "
              f"{kernel_us:.2f} us: {kernel_us / xdp_us:.2f}x the kernel's capacity")
    else:
        print(f"      XDP >= {GOAL_RATIO:g}x kernel delivered: NOT met ({ratio:.2f}, XDP "
              "saturated)")
    lat = results["latency"]
    program = lat.get(("xdp", terminals), {}).get("program_ns", 0.0)
    print(f"      XDP <= {GOAL_US:g} us CPU per packet: "
          f"{'met' if xdp_us <= GOAL_US else 'NOT met'} ({xdp_us:.2f} us of the balancer's "
          "CPU on these veths"
          + (f"; the program itself {program / 1000:.2f} us" if program else "") + ")")
    if ("xdp", terminals) in lat and ("kernel", terminals) in lat:
        added = lat["xdp", terminals]["p99"] - lat["kernel", terminals]["p99"]
        print(f"      p99 added latency <= {GOAL_P99_ADDED:g} us: "
              f"{'met' if added <= GOAL_P99_ADDED else 'NOT met'} ({added:.0f} us over the "
              "kernel's)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--duration", type=float, default=3.0, help="seconds per run")
    parser.add_argument("--repeat", type=int, default=3,
                        help="rounds per terminal count (one run of each forwarder per round)")
    parser.add_argument("--terminals", default="1,100000",
                        help="comma-separated distinct terminal counts")  # fmt: skip
    parser.add_argument("--latency-rate", type=float, default=10_000.0,
                        help="packets/s for the latency runs (0: none)")  # fmt: skip
    parser.add_argument("--latency-seconds", type=float, default=2.0)
    parser.add_argument("--gen-cpu", default="0", help="taskset CPU list ('' = any)")
    parser.add_argument("--balancer-cpu", default="1", help="taskset CPU list ('' = any)")
    parser.add_argument("--sink-cpu", default="0",
                        help="taskset CPU list ('' = any; not the balancer's: its busy "
                             "time is the forwarders' cost)")
    parser.add_argument("--rx-cpu", default="1",
                        help="CPU list for lbc's NAPI thread: the kernel's forwarding and "
                             "the XDP program ('' = not pinned)")
    parser.add_argument("--forwarders", default="kernel,lbproxy,xdp",
                        help="comma-separated: kernel (nft DNAT), lbproxy (the Python "
                             "paths), xdp (the XDP executor)")
    parser.add_argument("--sink-rps", default="0",
                        help="CPU list for the sink's receive processing ('' = the sender's)")
    parser.add_argument("--baseline", metavar="REV",
                        help="also run lbproxy as of this git revision (before/after figures)")
    parser.add_argument("--ablation", type=int, default=0, metavar="ROUNDS",
                        help="also compare fast path / batched I/O on and off in-process")
    parser.add_argument("--generator", choices=("frames", "sockets"), default="frames",
                        help="the throughput runs' generator: frames (dpxgen: raw frames, "
                             "as a NIC's driver hands them over; the default) or sockets "
                             "(dpgen: AF_PACKET socket buffers, which veth copies before "
                             "an XDP program may see them); latency runs always use dpgen")
    parser.add_argument("--show-log", action="store_true", help="print lbproxy's log tail")
    parser.add_argument("--json", help="also write the figures to this file")
    args = parser.parse_args()
    args.terminals = [int(t) for t in args.terminals.split(",")]
    args.forwarders = [f for f in args.forwarders.split(",") if f]
    if not set(args.forwarders) <= {"kernel", "lbproxy", "xdp"} or not args.forwarders:
        parser.error("--forwarders: a list of kernel, lbproxy, xdp")
    if not 0 < args.duration <= 60 or not 0 < args.repeat <= 10 or not 0 <= args.ablation <= 20:
        parser.error("--duration must be in (0, 60], --repeat in 1..10, --ablation in 0..20")
    if any(not 0 < t <= 1_000_000 for t in args.terminals):
        parser.error("terminal counts must be in 1..1000000")
    if os.geteuid() != 0:
        sys.exit("benchmarks/dataplane.py needs root (network namespaces, raw sockets)")
    for tool in ("gcc", "ip", "nft", "taskset"):
        if shutil.which(tool) is None:
            sys.exit(f"benchmarks/dataplane.py needs {tool}")
    if "xdp" in args.forwarders:
        from lbproxy.io.xdp import available

        why = available()
        if why:
            print(f"no XDP runs: {why}")
            args.forwarders.remove("xdp")
    directory = tempfile.mkdtemp(prefix="lbdp-")
    tools: Tools | None = None
    try:
        built = build(directory)
        frames = args.generator == "frames"
        if frames and "dpxgen-missing" in built:
            print(f"generator: sockets, not frames -- {built['dpxgen-missing']}")
            frames = False
        tools = Tools(built, args.gen_cpu or None, args.sink_cpu or None,
                      args.balancer_cpu or None, frames)  # fmt: skip
        setup()
        steer_sink(args.sink_rps or None)
        if frames:
            tools.frame_sink = FrameSink(built["dpxsink.bpf.o"], args.sink_cpu or None)
        print(f"data-path benchmark: {os.cpu_count()} CPUs, 64-byte UDP payloads with HAO, "
              f"{args.duration:g} s runs x {args.repeat}; gen CPU {args.gen_cpu or 'any'}, "
              f"lbproxy CPU {args.balancer_cpu or 'any'}, sink CPU {args.sink_cpu or 'any'}, "
              f"sink softirq CPU {args.sink_rps or 'sender'}, balancer receive CPU "
              f"{args.rx_cpu or 'sender'}")
        print("throughput generator: " + (
            "frames (dpxgen: BPF_PROG_TEST_RUN live frames out of gen0; lbc receives raw "
            "frames, as from a NIC's driver: XDP runs on them in place, the kernel and the "
            "Python paths get socket buffers built from them)" if frames else
            "sockets (dpgen: AF_PACKET sendmmsg; veth copies each socket buffer into a "
            "page before lbc's XDP program sees it)") + "; latency runs: dpgen, paced")
        print("columns: lb cpu = the lbproxy process; fwd = the forwarding's CPU time (the "
              "lbproxy process and lbc's NAPI thread) per second of the run; us/pkt = that "
              f"per packet delivered; ! = the balancer's CPU was over {DISTURBED:.0%} busy "
              "with other work just before or after (the figure is kept, but flagged)")
        print(f"{'forwarder':<9} {'terminals':>8} {'offered/s':>11} {'at lb/s':>11} "
              f"{'lbproxy/s':>11} "
              f"{'delivered/s':>11} {'share':>6} {'lb cpu':>6} {'fwd':>6} {'us/pkt':>6} "
              f"{'gen':>6} {'sink':>6} {'busy':>6} {'sirq':>6}")  # fmt: skip
        results = measure(args, tools, directory)
        summary(args, results)
        if args.ablation:
            kernel_dnat(False)
            for terminals in args.terminals:
                ablation(tools, terminals, args.ablation)
        if args.json:
            flat = {f"{kind}/{f}/{t}": v for kind in ("throughput", "latency")
                    for (f, t), v in results[kind].items()}  # fmt: skip
            Path(args.json).write_text(json.dumps(flat, indent=1))
    finally:
        if tools is not None and tools.frame_sink is not None:
            tools.frame_sink.close()
        teardown()
        shutil.rmtree(directory, ignore_errors=True)


if __name__ == "__main__":
    main()
