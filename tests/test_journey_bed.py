"""``lbproxyctl journey`` on a terminal of the network test bed (issue 15, must show 4).

The real balancer (``twistd -n lbproxy`` in the bed's balancer namespace, the default key
chain, Maglev, three Linux TCP servers), a terminal emulator whose terminal keeps a TCP
session from its home address while it moves a1 -> a2 -> a3; then the real
``lbproxyctl journey`` (a subprocess, the operator's command) asked by the terminal's
home address and by its last care-of address.  The pcap-ng it writes is read back by
scapy (and tshark when installed): the events in order, their comments, and the
packets that caused them, dissected -- the IPv6 source is the care-of address, the
Home Address Option carries the home address.  The SVG is parsed as XML.  Needs root
(network namespaces); without it the test skips with the reason.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import xml.etree.ElementTree as ET

from scapy.layers.inet import TCP
from scapy.layers.inet6 import HAO, IPv6
from scapy.utils import rdpcap
from twisted.trial.unittest import SynchronousTestCase

from lbproxy.testbed import addresses
from lbproxy.testbed.balancer import BedBalancer, bed_config
from lbproxy.testbed.bed import TestBed
from tests.bedtools import require_bed
from tests.test_operating_bed import Session

SVG = "{http://www.w3.org/2000/svg}"
TERMINAL = 1


class JourneyBedTests(SynchronousTestCase):
    def setUp(self) -> None:
        require_bed()
        self.bed = TestBed(terminals=2, backends=3)
        self.addCleanup(self.bed.stop)
        self.bed.start()
        self.lb = BedBalancer(self.bed, bed_config(self.bed), name="lbproxy")
        self.addCleanup(self.lb.stop)
        self.lb.start()

    def lbproxyctl(self, *args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "lbproxy.ops.ctl", "--socket", self.lb.control_socket,
             *args], capture_output=True, text=True, timeout=60, check=False)

    def test_a_terminal_that_moves_twice(self) -> None:
        hoa = str(addresses.home_address(TERMINAL))
        coas = [str(addresses.care_of_address(TERMINAL, link)) for link in (1, 2, 3)]
        session = Session(self.bed, TERMINAL)
        self.addCleanup(session.close)
        session.echo()
        for link in (2, 3):
            self.bed.move(TERMINAL, link)
            session.echo()  # the session carries on after each move
        out = self.mktemp()
        os.makedirs(out)
        pcap, svg = os.path.join(out, "journey.pcapng"), os.path.join(out, "journey.svg")
        result = self.lbproxyctl("journey", "addr", hoa, "--pcap", pcap, "--svg", svg)
        self.assertEqual(result.returncode, 0, result.stderr)
        self.assertEqual(result.stderr, "")
        lines = result.stdout.splitlines()
        self.assertEqual(lines[0], f"journey of addr {hoa}: bound by addr {hoa} to "
                                   f"{session.backend}")  # fmt: skip
        self.assertEqual(lines[-2:], [f"wrote {pcap}", f"wrote {svg}"])

        frames = rdpcap(pcap)
        comments = [(f.comments or [b""])[0].decode() for f in frames]
        kinds = [c.split(": ", 2)[1] for c in comments]
        # created (by the home address, from a1) and a1 linked; then per move: the new
        # care-of address linked and the move itself
        self.assertEqual(kinds, ["created", "linked", "linked", "care-of", "linked", "care-of"],
                         comments)
        prefix = f"lbproxy journey of addr {hoa}: "
        self.assertEqual(comments[0], f"{prefix}created: addr {hoa} -> {session.backend} "
                                      f"[backend {session.backend}, care-of {coas[0]}]")
        self.assertIn(f"linked: addr {coas[1]} ", comments[2])
        self.assertIn(f"care-of: {coas[0]} -> {coas[1]} ", comments[3])
        self.assertIn(f"care-of: {coas[1]} -> {coas[2]} ", comments[5])
        # the terminal's TCP packet that caused each pair of events is the first one's
        # frame (the second names it)
        for i, coa in ((0, coas[0]), (2, coas[1]), (4, coas[2])):
            frame = frames[i]
            self.assertEqual(frame[IPv6].src, coa)
            self.assertEqual(frame[IPv6].dst, str(addresses.VIP))
            self.assertEqual(frame[HAO].hoa, hoa)
            self.assertEqual(frame[TCP].dport, addresses.TCP_PORT)
            self.assertEqual((frames[i + 1].original, frames[i + 1].wirelen), (b"", 0))
            self.assertTrue(comments[i + 1].endswith(f" (its packet: frame {i + 1})"))
        self.assertTrue(frames[0][TCP].flags.S)  # the session's SYN made the binding
        times = [float(f.time) for f in frames]
        self.assertEqual(times, sorted(times))

        root = ET.parse(svg).getroot()
        labels = [t.text for t in root.iter(f"{SVG}text") if t.get("class") == "lane-label"]
        self.assertEqual(labels, coas)
        self.assertEqual({r.get("data-backend") for r in root.iter(f"{SVG}rect")
                          if r.get("class") == "band"}, {session.backend})  # fmt: skip
        self.assertEqual([m.get("data-kind") for m in root.iter() if m.get("class") == "event"],
                         kinds)

        # any identity of the terminal finds the same journey
        again = self.lbproxyctl("journey", "addr", coas[2])
        self.assertEqual(again.returncode, 0, again.stderr)
        self.assertEqual(again.stdout.splitlines()[1:], lines[1:-2])
        tshark = shutil.which("tshark")
        if tshark is not None:  # Wireshark's own reader agrees, where it is installed
            fields = subprocess.run([tshark, "-r", pcap, "-T", "fields", "-e", "ipv6.src",
                                     "-e", "frame.comment"], capture_output=True, text=True,
                                    timeout=60, check=True).stdout.splitlines()
            self.assertEqual([f.split("\t") for f in fields],
                             [[frame[IPv6].src if frame.original else "", c]
                              for frame, c in zip(frames, comments, strict=True)])

    def test_unknown_terminal(self) -> None:
        result = self.lbproxyctl("journey", "addr", "2001:db8:100::dead")
        self.assertEqual(result.returncode, 1)
        self.assertEqual(result.stdout, "")
        self.assertTrue(result.stderr.startswith(
            "lbproxyctl: journey: no journey for addr 2001:db8:100::dead"), result.stderr)
        self.assertNotIn("Traceback", result.stderr)
