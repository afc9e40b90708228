"""``lbproxyctl journey``: the text, the pcap-ng capture and the SVG picture.

The capture is read back by independent readers: scapy's pcap-ng reader always, and
``tshark`` (Wireshark's own reader) when it is installed.  The picture is parsed as XML.
The control socket and the client are the real ones (a real UNIX socket, the client in
a thread), over the real core driven by scapy-built packets on a `task.Clock`.
"""

from __future__ import annotations

import io
import os
import shutil
import subprocess
import tempfile
import xml.etree.ElementTree as ET
from typing import Any

from scapy.layers.inet import UDP
from scapy.layers.inet6 import HAO, IPv6, IPv6ExtHdrDestOpt
from scapy.utils import PcapNgReader, rdpcap
from twisted.internet import defer, reactor, threads
from twisted.internet.task import Clock
from twisted.trial.unittest import SkipTest, SynchronousTestCase, TestCase

from lbproxy.core.journey import Journeys
from lbproxy.core.keys import Key
from lbproxy.notify.adapter import TableListener
from lbproxy.ops import ctl
from lbproxy.ops.control import Control
from lbproxy.ops.journeyview import event_line, format_journey, journey_frames, journey_svg
from lbproxy.ops.pcapng import LINKTYPE_IPV6, write_pcapng
from tests.test_balancer import BACKENDS, COA1, COA2, HOA, VIP, make, mobile
from tests.test_journey import COA3, following, packed

REACTOR: Any = reactor
SVG = "{http://www.w3.org/2000/svg}"
#: A time of day for the clock (pcap-ng timestamps are seconds since the epoch).
EPOCH = 1_764_600_000.25


def a_journey(snap: int = 256) -> tuple[dict[str, Any], list[bytes], Any]:
    """A terminal that moves twice by its packets, is notified, moved by an operator and
    dropped: its journey (as the control op gives it) and the packets it sent."""
    balancer, clock, journeys = following(snap=snap)
    clock.advance(EPOCH)
    sent: list[bytes] = [bytes(p) for p in (mobile(COA1, payload=b"a" * 300), mobile(COA2),
                                            mobile(COA3))]
    for packet in sent:
        balancer.inbound(bytearray(packet))
        clock.advance(1.25)
    listener = TableListener(balancer.table, balancer.return_paths, journeys=journeys)
    listener.binding_changed(packed(HOA), None, packed(COA3), 1, 60)
    clock.advance(1)
    control = Control(balancer)
    bound = balancer.table.get(Key("addr", packed(HOA)))
    assert bound is not None
    other = next(b.name for b in BACKENDS if b.name != bound.backend.name)
    control.move(f"addr {COA2}", other, who="carol")
    clock.advance(1)
    dying = bytearray(bytes(IPv6(src=COA3, dst=VIP, hlim=1) / IPv6ExtHdrDestOpt(
        options=[HAO(hoa=HOA)]) / UDP(dport=80) / b"x"))
    balancer.inbound(bytearray(dying))
    sent.append(bytes(dying))
    return control.journey(f"addr {COA1}"), sent, control


EXPECTED = ["created", "linked", "linked", "care-of", "linked", "care-of", "notified",
            "confirmed", "backend", "drop"]


class TextTests(SynchronousTestCase):
    def test_lines(self) -> None:
        journey, _sent, _control = a_journey()
        self.assertEqual([e["kind"] for e in journey["events"]], EXPECTED)
        text = format_journey(journey).splitlines()
        self.assertEqual(text[0], f"journey of addr {COA1}: bound by addr {HOA} to "
                                  f"{journey['backend']}")  # fmt: skip
        self.assertIn(f"addr {COA3}", text[1])
        events = text[3:]
        self.assertEqual(len(events), len(EXPECTED))
        self.assertTrue(events[0].startswith("2025-12-01T14:40:00.250Z     +0.000s  created: "))
        self.assertIn(f"care-of: {COA1} -> {COA2} [backend ", events[3])
        self.assertIn("(operator move by carol)", events[8])
        self.assertTrue(events[9].endswith("<73-byte packet>"))


class PcapNgTests(SynchronousTestCase):
    def write(self, journey: dict[str, Any]) -> str:
        path = self.mktemp() + ".pcapng"
        with open(path, "wb") as f:
            self.assertEqual(write_pcapng(f, journey_frames(journey)), len(journey["events"]))
        return path

    def test_scapy_reads_every_event(self) -> None:
        """scapy's reader: one frame per event, in order, at the event's time; the
        comment is the event's line; frames of events with a packet are those IPv6
        packets (dissected: source, HAO, payload), truncated to the snap length with
        the original length kept -- once: the other events the same packet caused name
        its frame; the others are empty."""
        journey, sent, _control = a_journey(snap=128)
        path = self.write(journey)
        frames = rdpcap(path)
        self.assertEqual(len(frames), len(EXPECTED))
        with PcapNgReader(path) as reader:
            reader.read_packet()
            self.assertEqual([i[0] for i in reader.interfaces], [LINKTYPE_IPV6])
        shared = {2: 1, 4: 3, 6: 5}  # frame -> the frame carrying its packet
        for number, (frame, event) in enumerate(zip(frames, journey["events"], strict=True),
                                                start=1):
            line = f"lbproxy journey of addr {COA1}: {event_line(event)}"
            if number in shared:
                line += f" (its packet: frame {shared[number]})"
            self.assertEqual(frame.comments, [line.encode()])
            self.assertTrue(event_line(event).startswith(f"{event['kind']}: {event['text']}"))
            self.assertAlmostEqual(float(frame.time), event["at"], places=5)
        first = frames[0]
        self.assertEqual(bytes(first), sent[0][:128])
        self.assertEqual(first.wirelen, len(sent[0]))
        self.assertEqual(first[IPv6].src, COA1)
        self.assertEqual(first[HAO].hoa, HOA)
        moved = frames[2]  # COA2 linked, then the move (frame 4) by the same packet
        self.assertEqual(bytes(moved), sent[1])
        self.assertEqual(moved[IPv6].src, COA2)
        self.assertEqual(moved[UDP].dport, 80)
        self.assertIn(f"linked: addr {COA2}".encode(), moved.comments[0])
        self.assertIn(f"care-of: {COA1} -> {COA2}".encode(), frames[3].comments[0])
        self.assertEqual(bytes(frames[4]), sent[2])
        for i in (1, 3, 5, 6, 7, 8):  # shared, notified, confirmed, operator move: empty
            self.assertEqual((frames[i].original, frames[i].wirelen), (b"", 0), EXPECTED[i])
        self.assertEqual(bytes(frames[9]), sent[3])
        self.assertEqual(frames[9][IPv6].hlim, 1)

    def test_tshark_reads_it(self) -> None:
        """Wireshark's reader agrees (when tshark is installed)."""
        tshark = shutil.which("tshark")
        if tshark is None:
            raise SkipTest("tshark is not installed (apt-get install tshark); scapy's "
                           "reader checked the capture above")
        journey, sent, _control = a_journey()
        path = self.write(journey)
        result = subprocess.run(
            [tshark, "-r", path, "-T", "fields", "-E", "separator=|", "-e", "frame.len",
             "-e", "frame.cap_len", "-e", "ipv6.src", "-e", "frame.comment"],
            capture_output=True, text=True, timeout=60, check=True)
        rows = [line.split("|") for line in result.stdout.splitlines()]
        self.assertEqual(len(rows), len(EXPECTED))
        self.assertEqual(rows[0][:3], [str(len(sent[0])), "256", COA1])  # the snap length
        self.assertEqual(rows[2][2], COA2)
        self.assertEqual(rows[3][:3], ["0", "0", ""])  # the move: its packet is frame 3
        self.assertEqual(rows[6][:3], ["0", "0", ""])
        for row, event in zip(rows, journey["events"], strict=True):
            self.assertIn(f"{event['kind']}: {event['text']}", row[3])

    def test_block_layout(self) -> None:
        """The blocks: SHB, IDB, then EPBs whose total lengths frame them, padded to 32
        bits, with the original length of a truncated packet."""
        out = io.BytesIO()
        write_pcapng(out, [(1.5, b"\x60abc", 9, "x" * 5), (2.0, b"", 0, "")])
        data = out.getvalue()
        kinds, offset = [], 0
        while offset < len(data):
            kind = int.from_bytes(data[offset:offset + 4], "little")
            length = int.from_bytes(data[offset + 4:offset + 8], "little")
            self.assertEqual(length % 4, 0)
            self.assertEqual(data[offset + length - 4:offset + length],
                             data[offset + 4:offset + 8])
            kinds.append(kind)
            if kind == 6:
                captured = int.from_bytes(data[offset + 20:offset + 24], "little")
                original = int.from_bytes(data[offset + 24:offset + 28], "little")
                micros = (int.from_bytes(data[offset + 12:offset + 16], "little") << 32) \
                    + int.from_bytes(data[offset + 16:offset + 20], "little")  # fmt: skip
                self.assertIn((captured, original, micros), [(4, 9, 1_500_000), (0, 0, 2_000_000)])
            offset += length
        self.assertEqual(kinds, [0x0A0D0D0A, 1, 6, 6])


class SvgTests(SynchronousTestCase):
    def test_picture(self) -> None:
        """One lane per care-of address, bands coloured by backend (two: the operator
        moved it), one mark per event (a cross for the drop), a legend of both."""
        journey, _sent, _control = a_journey()
        root = ET.fromstring(journey_svg(journey))
        self.assertEqual(root.tag, f"{SVG}svg")
        labels = [t.text for t in root.iter(f"{SVG}text") if t.get("class") == "lane-label"]
        self.assertEqual(labels, [COA1, COA2, COA3])
        bands = [r for r in root.iter(f"{SVG}rect") if r.get("class") == "band"]
        backends = {r.get("data-backend") for r in bands}
        self.assertEqual(len(backends), 2)
        self.assertEqual(journey["backend"], bands[-1].get("data-backend"))
        marks = [m for m in root.iter() if m.get("class") == "event"]
        self.assertEqual([m.get("data-kind") for m in marks], EXPECTED)
        self.assertEqual(marks[-1].tag, f"{SVG}path")  # the drop: a cross
        self.assertEqual(marks[0].tag, f"{SVG}circle")
        tip = marks[3].find(f"{SVG}title")
        assert tip is not None and tip.text is not None
        self.assertIn(f"care-of: {COA1} -> {COA2}", tip.text)
        # time runs left to right
        xs = [float(m.get("cx") or m.get("d", "M0").split(",")[0][1:]) for m in marks]
        self.assertEqual(xs, sorted(xs))
        legend = [g.get("data-kind") for g in root.iter(f"{SVG}g")
                  if g.get("class") == "legend-kind"]  # fmt: skip
        self.assertEqual(legend, list(dict.fromkeys(EXPECTED)))
        self.assertEqual(len([r for r in root.iter(f"{SVG}rect")
                              if r.get("class") == "legend-backend"]), 2)  # fmt: skip

    def test_empty_and_hostile_text(self) -> None:
        """No events still draws; names are escaped."""
        svg = journey_svg({"asked": "addr <&>", "names": ["a<b"], "events": []})
        root = ET.fromstring(svg)
        self.assertIn("addr <&>", "".join(root.itertext()))


class CtlTests(TestCase):
    """``lbproxyctl journey`` over a real control socket."""

    timeout = 30

    def setUp(self) -> None:
        _journey, _sent, self.control = a_journey()
        parent = tempfile.mkdtemp(prefix="lbj-ctl-")
        self.addCleanup(shutil.rmtree, parent, True)
        self.directory = parent
        self.path = os.path.join(parent, "run", "ctl.sock")
        self.service = ctl.make_ctl_service(self.path, self.control, REACTOR)
        self.service.privilegedStartService()
        self.service.startService()
        self.addCleanup(self.service.stopService)

    def run_ctl(self, *argv: str) -> defer.Deferred[tuple[int, str, str]]:
        def call() -> tuple[int, str, str]:
            out, err = io.StringIO(), io.StringIO()
            code = ctl.main(["--socket", self.path, *argv], out, err, io.StringIO())
            return code, out.getvalue(), err.getvalue()

        return threads.deferToThread(call)

    @defer.inlineCallbacks
    def test_text_pcap_and_svg(self) -> Any:
        pcap = os.path.join(self.directory, "t.pcapng")
        svg = os.path.join(self.directory, "t.svg")
        code, out, err = yield self.run_ctl("journey", "addr", HOA, "--pcap", pcap, "--svg", svg)
        self.assertEqual((code, err), (0, ""))
        self.assertTrue(out.startswith(f"journey of addr {HOA}: bound by addr {HOA}"))
        self.assertTrue(out.endswith(f"wrote {pcap}\nwrote {svg}\n"))
        self.assertEqual(len(rdpcap(pcap)), len(EXPECTED))
        ET.parse(svg)
        code, out, err = yield self.run_ctl("--json", "journey", f"addr {COA3}")
        self.assertEqual(code, 0)
        self.assertIn(f'"asked": "addr {COA3}"', out)

    @defer.inlineCallbacks
    def test_operator_errors(self) -> Any:
        """Unknown key, bad key, unwritable file: one line, non-zero, no traceback,
        nothing written."""
        code, out, err = yield self.run_ctl("journey", "addr", "2001:db8::dead")
        self.assertEqual((code, out), (1, ""))
        self.assertTrue(err.startswith("lbproxyctl: journey: no journey for addr "
                                       "2001:db8::dead"))  # fmt: skip
        self.assertEqual(err.count("\n"), 1)
        code, out, err = yield self.run_ctl("journey", "addr", "nonsense")
        self.assertEqual(code, 1)
        self.assertEqual(err.count("\n"), 1)
        self.assertIn("bad key", err)
        missing = os.path.join(self.directory, "no", "such", "dir", "x.pcapng")
        code, out, err = yield self.run_ctl("journey", "addr", HOA, "--pcap", missing)
        self.assertEqual((code, out), (1, ""))
        self.assertEqual(err, f"lbproxyctl: journey: cannot write {missing}: "
                              "No such file or directory\n")  # fmt: skip
        code, out, err = yield self.run_ctl("journey", "addr", HOA, "--svg", self.directory)
        self.assertEqual(code, 1)
        self.assertIn(f"cannot write {self.directory}: Is a directory", err)
        self.assertNotIn("Traceback", err)


class TickingClock(Clock):
    """A clock that moves on by a microsecond at every reading, like the reactor's."""

    def seconds(self) -> float:
        self.advance(1e-6)
        return super().seconds()


class SharedPacketTests(SynchronousTestCase):
    def test_one_packet_one_frame_on_a_moving_clock(self) -> None:
        """The events one packet caused take its time, so the capture carries the packet
        once even when the clock moved between them (the reactor's does)."""
        clock = TickingClock()
        balancer, _ = make()
        balancer.clock = balancer.table.clock = clock
        journeys = Journeys(clock)
        balancer.follow_journeys(journeys)
        balancer.inbound(mobile(COA1))
        balancer.inbound(mobile(COA2))
        journey = Control(balancer, clock).journey(f"addr {HOA}")
        events = journey["events"]
        self.assertEqual([e["kind"] for e in events], ["created", "linked", "linked", "care-of"])
        self.assertEqual(events[0]["at"], events[1]["at"])
        self.assertEqual(events[2]["at"], events[3]["at"])
        self.assertLess(events[1]["at"], events[2]["at"])
        frames = journey_frames(journey)
        self.assertEqual([len(f[1]) for f in frames], [len(mobile(COA1)), 0, len(mobile(COA2)), 0])
