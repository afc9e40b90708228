"""Micro benchmark of the raw-socket port: packets/s through PacketReader → PacketWriter.

Why: per-packet Python work is the budget that matters (docs/rawsocket.md): a naive
Python AF_PACKET loop forwards ~180k packets/s where the kernel forwards all of the
~450-600k a C generator offers.  This measures what the Twisted edge costs against a
bare Python ``recv_into``/``sendto`` loop on the same machine, in the same run.

Topology (three network namespaces, built and removed here; root needed)::

    gen ──veth── balancer ──veth── sink
    2001:db8:7c::/64       2001:db8:7d::/64

The generator sends 88-byte UDP packets with a Home Address Option to the
virtual address 2001:db8:7e::1 as fast as one Python process can.  In the
balancer (IPv6 forwarding off, so the kernel forwards nothing itself) one of
the forwarders reads them and sends them on, unchanged, towards the sink,
which counts them on its interface.  Modes:

* ``bare``: a blocking ``recv_into`` + ``sendto`` loop (no Twisted);
* ``port``: ``PacketReader`` (epoll reactor, batch 256) with a handler that
  calls ``PacketWriter.send`` (the destination read from the packet);
* ``port+filter``: the same with the BPF destination filter attached.

Figures: packets/s offered by the generator, arriving at the balancer,
forwarded to the sink; packets per reactor wake-up; and the forwarder's CPU
time per forwarded packet (the least noisy figure on a shared machine).

Run: ``sudo .venv/bin/python benchmarks/rawsocket.py [--duration 3] [--repeat 2]``.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import struct
import subprocess
import sys
import time

PREFIX = "lbrsb"
GEN, BAL, SINK = f"{PREFIX}{os.getpid()}g", f"{PREFIX}{os.getpid()}l", f"{PREFIX}{os.getpid()}s"
VIRTUAL = "2001:db8:7e::1"
HOME = "2001:db8:99::77"
GEN_ADDR, BAL_IN = "2001:db8:7c::2", "2001:db8:7c::1"
BAL_OUT, SINK_ADDR = "2001:db8:7d::1", "2001:db8:7d::2"
MACS = {
    "gen": "02:00:5e:10:01:01",
    "balin": "02:00:5e:10:01:02",
    "balout": "02:00:5e:10:01:03",
    "sink": "02:00:5e:10:01:04",
}
MODES = ("bare", "port", "port+filter")


def ip(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["ip", *args], check=check, capture_output=True, text=True, timeout=30)


def packet() -> bytes:
    """IPv6 + Destination Options (HAO) + UDP + 16 bytes: 88 bytes."""
    src, dst = (
        socket.inet_pton(socket.AF_INET6, GEN_ADDR),
        socket.inet_pton(socket.AF_INET6, VIRTUAL),
    )
    hoa = socket.inet_pton(socket.AF_INET6, HOME)
    dest_opts = bytes([17, 2, 1, 2, 0, 0, 0xC9, 16]) + hoa
    udp = struct.pack("!HHHH", 4000, 5000, 24, 0) + b"b" * 16
    payload = dest_opts + udp
    return struct.pack("!IHBB", 6 << 28, len(payload), 60, 64) + src + dst + payload


def setup() -> None:
    for name in (GEN, BAL, SINK):
        ip("netns", "add", name)
        subprocess.run(
            ["ip", "netns", "exec", name, "sysctl", "-qw", "net.ipv6.conf.all.forwarding=0"],
            check=True,
        )
    ip("-n", GEN, "link", "add", "gen0", "address", MACS["gen"], "type", "veth",
       "peer", "name", "balin", "address", MACS["balin"], "netns", BAL)  # fmt: skip
    ip("-n", BAL, "link", "add", "balout", "address", MACS["balout"], "type", "veth",
       "peer", "name", "sink0", "address", MACS["sink"], "netns", SINK)  # fmt: skip
    links = [
        (GEN, "gen0", GEN_ADDR, BAL_IN, MACS["balin"]),
        (BAL, "balin", BAL_IN, GEN_ADDR, MACS["gen"]),
        (BAL, "balout", BAL_OUT, SINK_ADDR, MACS["sink"]),
        (SINK, "sink0", SINK_ADDR, BAL_OUT, MACS["balout"]),
    ]
    for ns, dev, addr, peer, peer_mac in links:
        subprocess.run(
            ["ip", "netns", "exec", ns, "ethtool", "-K", dev, "tx", "off"],
            check=False, capture_output=True,
        )  # fmt: skip
        ip("-n", ns, "addr", "add", f"{addr}/64", "dev", dev, "nodad")
        ip("-n", ns, "link", "set", dev, "up")
        ip("-n", ns, "neigh", "replace", peer, "lladdr", peer_mac, "dev", dev, "nud", "permanent")
    ip("-n", GEN, "route", "add", "2001:db8:7e::/64", "via", BAL_IN)
    ip("-n", BAL, "route", "add", "2001:db8:7e::/64", "via", SINK_ADDR)


def teardown() -> None:
    for name in (GEN, BAL, SINK):
        ip("netns", "del", name, check=False)


def counters(ns: str, dev: str) -> dict[str, int]:
    out = json.loads(ip("-n", ns, "-j", "-s", "link", "show", "dev", dev).stdout)[0]
    stats = out["stats64"]
    return {
        "rx": stats["rx"]["packets"],
        "tx": stats["tx"]["packets"],
        "rx_dropped": stats["rx"]["dropped"],
    }


# Roles, each run in its own process --------------------------------------


def role_generate(namespace: str, seconds: float) -> None:
    from lbproxy.io.rawsocket import LinuxPacketSystem

    system = LinuxPacketSystem(namespace)
    fd = system.open_sender()
    sock = socket.socket(fileno=os.dup(fd))
    sock.setblocking(True)
    data, address = packet(), (VIRTUAL, 0)
    sent = errors = 0
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        for _ in range(1000):
            try:
                sock.sendto(data, address)
                sent += 1
            except OSError:
                errors += 1
    print(json.dumps({"generated": sent, "errors": errors}))


def role_forward(namespace: str, mode: str) -> None:
    from lbproxy.io.rawsocket import LinuxPacketSystem, PacketReader, PacketWriter

    system = LinuxPacketSystem(namespace)
    virtual = [socket.inet_pton(socket.AF_INET6, VIRTUAL)]
    if mode == "bare":
        reader = socket.socket(fileno=os.dup(system.open_reader("balin", (), 1 << 23)))
        writer = socket.socket(fileno=os.dup(system.open_sender()))
        reader.setblocking(True)
        writer.setblocking(True)
        buffer = bytearray(65575)
        view = memoryview(buffer)
        count = 0
        print("ready", flush=True)
        cpu = time.process_time()
        try:
            while True:
                n = reader.recv_into(buffer)
                writer.sendto(view[:n], (VIRTUAL, 0))
                count += 1
        except KeyboardInterrupt:
            pass
        print(json.dumps({"forwarded": count, "cpu": time.process_time() - cpu}))
        return

    from twisted.internet import epollreactor

    epollreactor.install()
    from twisted.internet import reactor

    writer_port = PacketWriter(system)
    writer_port.open()
    reader_port = PacketReader(
        system,
        reactor,
        "balin",
        writer_port.send,
        destinations=virtual if mode == "port+filter" else (),
        receive_buffer=1 << 23,
    )
    reader_port.open()
    reader_port.startReading()
    started: list[float] = []

    def ready() -> None:
        print("ready", flush=True)
        started.append(time.process_time())

    reactor.callWhenRunning(ready)
    reactor.run()  # SIGINT stops it
    stats = reader_port.stats
    print(
        json.dumps(
            {
                "forwarded": writer_port.stats.sent,
                "send_drops": writer_port.stats.dropped,
                "received": stats.received,
                "wakeups": stats.wakeups,
                "cpu": time.process_time() - started[0],
            }
        )
    )


# Orchestration ------------------------------------------------------------


def run_mode(mode: str, duration: float) -> dict[str, float]:
    script = os.path.abspath(__file__)
    forwarder = subprocess.Popen(
        [sys.executable, script, "--role", "forward", "--mode", mode, "--namespace", BAL],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert forwarder.stdout is not None
        if forwarder.stdout.readline().strip() != "ready":
            raise RuntimeError("forwarder did not start")
        # Warm up (neighbours, caches), then measure.
        subprocess.run(
            [sys.executable, script, "--role", "generate", "--namespace", GEN, "--seconds", "0.3"],
            check=True, capture_output=True,
        )  # fmt: skip
        time.sleep(0.3)
        before = counters(GEN, "gen0"), counters(BAL, "balin"), counters(SINK, "sink0")
        started = time.monotonic()
        subprocess.run(
            [sys.executable, script, "--role", "generate", "--namespace", GEN,
             "--seconds", str(duration)],
            check=True, capture_output=True,
        )  # fmt: skip
        elapsed = time.monotonic() - started
        time.sleep(0.3)  # let the forwarder finish what is queued
        after = counters(GEN, "gen0"), counters(BAL, "balin"), counters(SINK, "sink0")
    finally:
        forwarder.send_signal(signal.SIGINT)
        out, _ = forwarder.communicate(timeout=10)
    result = json.loads(out.strip().splitlines()[-1])
    offered = (after[0]["tx"] - before[0]["tx"]) / elapsed
    arrived = (after[1]["rx"] - before[1]["rx"]) / elapsed
    forwarded = (after[2]["rx"] - before[2]["rx"]) / elapsed
    figures = {"offered": offered, "arrived": arrived, "forwarded": forwarded}
    if result["forwarded"]:
        figures["cpu_us"] = result["cpu"] / result["forwarded"] * 1e6
    if result.get("wakeups"):
        figures["per_wakeup"] = result["received"] / result["wakeups"]
    return figures


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--duration", type=float, default=3.0)
    parser.add_argument("--repeat", type=int, default=2)
    parser.add_argument("--role", choices=("generate", "forward"))
    parser.add_argument("--mode", choices=MODES, default="port")
    parser.add_argument("--namespace")
    parser.add_argument("--seconds", type=float, default=1.0)
    args = parser.parse_args()
    if args.role == "generate":
        role_generate(args.namespace, args.seconds)
        return
    if args.role == "forward":
        role_forward(args.namespace, args.mode)
        return
    if os.geteuid() != 0:
        sys.exit("benchmarks/rawsocket.py needs root (network namespaces, raw sockets)")
    setup()
    try:
        print(f"raw-socket port, {len(packet())}-byte HAO/UDP packets, {args.duration:.0f} s runs")
        print(f"{'mode':<12} {'offered/s':>10} {'arrived/s':>10} {'forwarded/s':>12} "
              f"{'of arrived':>10} {'pkts/wakeup':>11} {'cpu us/pkt':>10}")  # fmt: skip
        for _ in range(args.repeat):
            for mode in MODES:
                f = run_mode(mode, args.duration)
                share = f["forwarded"] / f["arrived"] if f["arrived"] else 0.0
                wake = f"{f['per_wakeup']:.1f}" if "per_wakeup" in f else "-"
                cpu = f"{f['cpu_us']:.2f}" if "cpu_us" in f else "-"
                print(f"{mode:<12} {f['offered']:>10,.0f} {f['arrived']:>10,.0f} "
                      f"{f['forwarded']:>12,.0f} {share:>10.1%} {wake:>11} {cpu:>10}")  # fmt: skip
    finally:
        teardown()


if __name__ == "__main__":
    main()
