"""The data-path benchmark's own instruments: the frame generator and the frame sink.

`benchmarks/dataplane.py` reports packets/s and CPU per packet from what dpxgen offers
and what dpxsink counts as good; wrong frames or a lenient count would make every figure
wrong.  So: dpxgen's frames, captured on the peer of a veth it sends out of, are each
terminal's packet in turn with a checksum scapy agrees with (RFC 6275's pseudo-header:
the home address); dpxsink counts exactly the packets dpsink.c counts as good, on
packets scapy builds, and passes or drops as told.  Needs root, clang, gcc and libbpf.
"""

from __future__ import annotations

import importlib.util
import ipaddress
import json
import os
import select
import shutil
import socket
import subprocess
import tempfile
import time
from pathlib import Path
from types import ModuleType

from scapy.layers.inet import UDP
from scapy.layers.inet6 import HAO, IPv6, IPv6ExtHdrDestOpt, PadN
from scapy.layers.l2 import Ether
from twisted.trial.unittest import SkipTest, SynchronousTestCase

from tests.bedtools import l4_checksum_ok

ROOT = Path(__file__).resolve().parent.parent


def _dataplane() -> ModuleType:
    """benchmarks/dataplane.py, loaded as a module (benchmarks/ is not a package)."""
    spec = importlib.util.spec_from_file_location("dataplane", ROOT / "benchmarks" / "dataplane.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _why_not() -> str | None:
    if os.geteuid() != 0:
        return "the frame generator and sink need root (BPF, network namespaces)"
    for tool in ("clang", "gcc", "ip"):
        if shutil.which(tool) is None:
            return f"no {tool} (make test installs it)"
    if not Path("/usr/include/bpf/libbpf.h").exists():
        return "no libbpf headers (libbpf-dev; make test installs it)"
    return None


class FrameToolsTests(SynchronousTestCase):
    skip = _why_not()

    def setUp(self) -> None:
        self.dp = _dataplane()
        directory = tempfile.mkdtemp(prefix="lbdpt-")
        self.addCleanup(shutil.rmtree, directory, ignore_errors=True)
        self.built = self.dp.build(directory)
        if "dpxgen-missing" in self.built:
            raise SkipTest(self.built["dpxgen-missing"])

    def namespaces(self) -> tuple[str, str]:
        """Two fresh namespaces joined by gen0 -- lbc (the benchmark's names and MACs),
        GRO on lbc (the NAPI context raw frames need); removed after the test."""
        dp = self.dp
        tag = f"lbdpt{os.getpid() % 100000}"
        gen, lb = f"{tag}-gen", f"{tag}-lb"
        for ns in (gen, lb):
            subprocess.run(["ip", "netns", "add", ns], check=True)
            self.addCleanup(subprocess.run, ["ip", "netns", "del", ns], check=False)
        subprocess.run(["ip", "-n", gen, "link", "add", "gen0", "address", dp.MACS["gen0"],
                        "type", "veth", "peer", "name", "lbc", "address", dp.MACS["lbc"],
                        "netns", lb], check=True)  # fmt: skip
        for ns, dev in ((gen, "gen0"), (lb, "lbc")):
            subprocess.run(["ip", "-n", ns, "link", "set", dev, "up"], check=True)
        subprocess.run(["ip", "netns", "exec", lb, "ethtool", "-K", "lbc", "gro", "on"],
                       check=True, capture_output=True)  # fmt: skip
        return gen, lb

    def test_generator_sends_each_terminals_packet_in_turn(self) -> None:
        """dpxgen's frames reach the peer: to its MAC, terminal i's care-of and home
        addresses in turn (1..N, then 1 again), UDP to the port with "LBDP", and a
        checksum scapy computes the same (pseudo-header source: the home address)."""
        from lbproxy.io.rawsocket import _network_namespace

        dp = self.dp
        gen, lb = self.namespaces()
        with _network_namespace(lb):
            sock = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(0x86DD))
        self.addCleanup(sock.close)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4 << 20)
        sock.bind(("lbc", 0))
        terminals = 7
        result = subprocess.run(
            ["ip", "netns", "exec", gen, self.built["dpxgen"], self.built["dpxgen.bpf.o"],
             "gen0", dp.MACS["lbc"], dp.MACS["gen0"], dp.COA_PREFIX, dp.HOA_PREFIX, dp.VIP,
             str(dp.PORT), str(terminals), "0.05"],
            check=True, capture_output=True, text=True, timeout=30,
        )  # fmt: skip
        self.assertGreater(int(json.loads(result.stdout)["sent"]), 0)
        frames: list[Ether] = []
        deadline = time.monotonic() + 5
        while len(frames) < 3 * terminals and time.monotonic() < deadline:
            if select.select([sock], [], [], 0.5)[0]:
                frames.append(Ether(sock.recv(2048)))
        ours = [f for f in frames if HAO in f]
        self.assertGreaterEqual(len(ours), 2 * terminals, [f.summary() for f in frames])
        first = int(ours[0][HAO].hoa.rsplit(":", 1)[1], 16)
        for n, frame in enumerate(ours):
            i = (first - 1 + n) % terminals + 1
            self.assertEqual((frame.dst, frame.src), (dp.MACS["lbc"], dp.MACS["gen0"]))
            ip = frame[IPv6]
            self.assertEqual(ip.src, str(ipaddress.IPv6Address(dp.COA_PREFIX) + i))
            self.assertEqual(ip[HAO].hoa, str(ipaddress.IPv6Address(dp.HOA_PREFIX) + i))
            self.assertEqual((ip.dst, ip[UDP].dport), (dp.VIP, dp.PORT))
            self.assertTrue(bytes(ip[UDP].payload).startswith(b"LBDP"))
            self.assertIs(l4_checksum_ok(ip), True, ip.show2(dump=True))

    def test_sink_counts_what_dpsink_counts(self) -> None:
        """dpxsink, run on packets scapy builds: good are ours with a valid checksum --
        translated (plain UDP from the home address) or forwarded with the HAO (the
        home address in the pseudo-header); a flipped payload bit, another port, no
        "LBDP", an HAO packet checksummed from its care-of address are not."""
        from lbproxy.io.xdp import BpfObject

        dp = self.dp
        sink = BpfObject(self.built["dpxsink.bpf.o"], ("dpxsink",))
        self.addCleanup(sink.close)
        config, counts = sink.map("dpx_config", 4, 4), sink.map("dpx_counts", 4, 8, per_cpu=True)
        config.update(dp._u32(1), dp._u32(dp.PORT))

        def run(frame: bytes) -> tuple[int, int]:
            """The verdict, and whether the frame was counted good."""
            before = counts.per_cpu_sums(1)
            verdict, _ = sink.test_run("dpxsink", frame)
            return verdict, counts.per_cpu_sums(1) - before

        home, care_of, backend = "2001:db8:d100::5", "2001:db8:d1::1:0:5", "2001:db8:d2::11"
        payload = b"LBDP" + bytes(60)
        ether = Ether(dst=dp.MACS["sink0"], src=dp.MACS["lbs"])
        plain = IPv6(src=home, dst=backend) / UDP(sport=4000, dport=dp.PORT) / payload
        by_home = UDP(bytes(IPv6(bytes(plain))[UDP])).chksum  # scapy's, from the home address
        hao = (IPv6(src=care_of, dst=backend)
               / IPv6ExtHdrDestOpt(options=[PadN(optdata=b"\0\0"), HAO(hoa=home)])
               / UDP(sport=4000, dport=dp.PORT, chksum=by_home) / payload)  # fmt: skip
        by_care_of = hao.copy()
        del by_care_of[UDP].chksum
        by_care_of = IPv6(bytes(by_care_of))  # scapy sums from the care-of address
        self.assertNotEqual(by_care_of[UDP].chksum, by_home)
        flipped = bytearray(bytes(ether / plain))
        flipped[-1] ^= 1
        cases = {
            "translated": (bytes(ether / plain), 1),
            "with the HAO": (bytes(ether / hao), 1),
            "a flipped bit": (bytes(flipped), 0),
            "another port": (bytes(ether / IPv6(src=home, dst=backend)
                                   / UDP(sport=4000, dport=dp.PORT + 1) / payload), 0),
            "not LBDP": (bytes(ether / IPv6(src=home, dst=backend)
                               / UDP(sport=4000, dport=dp.PORT) / (b"XBDP" + bytes(60))), 0),
            "HAO summed from the care-of address": (bytes(ether / by_care_of), 0),
        }  # fmt: skip
        config.update(dp._u32(0), dp._u32(0))  # a throughput run: counted, dropped
        for name, (frame, good) in cases.items():
            self.assertEqual(run(frame), (1, good), name)  # XDP_DROP = 1
        config.update(dp._u32(0), dp._u32(1))  # otherwise: counted, passed on
        self.assertEqual(run(cases["translated"][0]), (2, 1))  # XDP_PASS = 2
