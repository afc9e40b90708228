"""``[balancer] offload``: the XDP executor in the forwarder, or the Python paths and why.

``auto`` runs the XDP executor (`lbproxy.io.xdp`) when this host can and otherwise says
why in one log line and serves every packet on the Python paths; ``xdp`` refuses to
start, with one line ``file: balancer.offload: reason``; ``none`` never loads it.  The
reasons are made for real here -- an object that is not there, a process without the
capabilities BPF needs (``setpriv`` takes them away), IPv6 forwarding off on a link, a
driver without native XDP (a bridge) -- in network namespaces of our own, and
twistd is run as an operator runs it.  What the executor then does with packets is in
tests/test_xdp.py and, through twistd in the network test bed, tests/test_dataplane.py
(`XdpOffloadTests`).
"""

from __future__ import annotations

import ipaddress
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, cast

from twisted.internet.task import Clock
from twisted.internet.testing import MemoryReactor
from twisted.logger import ILogObserver, LogEvent, globalLogPublisher
from twisted.trial.unittest import SkipTest, SynchronousTestCase

from lbproxy.config import ConfigError, parse_config
from lbproxy.core import actions
from lbproxy.core.balancer import Balancer
from lbproxy.core.keys import Key, KeyChain
from lbproxy.core.selection import Backend, scheduler_from_name
from lbproxy.core.table import StickyTable
from lbproxy.io.forwarder import ForwarderService
from lbproxy.io.rawsocket import LinuxPacketSystem
from lbproxy.preflight import Refused
from lbproxy.testing import MemoryPacketSystem

VIP = "2001:db8:5::80"
BACKENDS = ("2001:db8:b0::11", "2001:db8:b0::12")
TWISTD = os.path.join(os.path.dirname(sys.executable), "twistd")

CONFIG = """\
[balancer]
{offload}
[virtual]
addresses = ["2001:db8:5::80"]
[interfaces]
client = "{client}"
server = "{server}"
[[backend]]
name = "srv1"
address = "2001:db8:b0::11"
"""


def balancer(clock: Clock) -> Balancer:
    return Balancer(
        chain=KeyChain.from_names(["hoa", "src"]),
        table=StickyTable(clock, 60.0, 100),
        scheduler=scheduler_from_name("round_robin"),
        backends=[Backend(f"b{i}", ipaddress.IPv6Address(a)) for i, a in enumerate(BACKENDS)],
        virtual_addresses=[ipaddress.IPv6Address(VIP)],
        clock=clock,
    )


class Logged:
    """The log events emitted while it is installed (`stop` removes it)."""

    def __init__(self) -> None:
        self.events: list[LogEvent] = []
        self.observer = cast(ILogObserver, self.events.append)
        globalLogPublisher.addObserver(self.observer)

    def stop(self) -> None:
        globalLogPublisher.removeObserver(self.observer)

    def about_offload(self) -> list[str]:
        from twisted.logger import formatEvent

        return [formatEvent(e) for e in self.events if "XDP offload" in e.get("log_format", "")]


class ConfigTests(SynchronousTestCase):
    def test_values(self) -> None:
        """``auto`` by default; each of the three accepted."""
        text = CONFIG.format(offload="", client="c0", server="s0")
        self.assertEqual(parse_config(text).offload, "auto")
        for value in ("auto", "xdp", "none"):
            text = CONFIG.format(offload=f'offload = "{value}"', client="c0", server="s0")
            self.assertEqual(parse_config(text).offload, value)

    def test_refused(self) -> None:
        """Anything else is refused in one line naming the file and the key."""
        for value, why in (('"fast"', "'fast' is not one of auto, xdp, none"),
                           ("true", "expected str")):  # fmt: skip
            text = CONFIG.format(offload=f"offload = {value}", client="c0", server="s0")
            with self.assertRaises(ConfigError) as caught:
                parse_config(text, "lb.toml")
            self.assertTrue(str(caught.exception).startswith("lb.toml: balancer.offload: "),
                            caught.exception)  # fmt: skip
            self.assertIn(why, str(caught.exception))


class InMemoryTests(SynchronousTestCase):
    """The in-memory packet system has no driver to attach to."""

    def service(self, offload: str) -> ForwarderService:
        clock = Clock()
        return ForwarderService(
            balancer(clock), MemoryPacketSystem(["c0", "s0"]), MemoryReactor(), clock,
            client_interface="c0", server_interface="s0", offload=offload,
            config_path="lb.toml",
        )  # fmt: skip

    def test_auto_falls_back_and_says_why_once(self) -> None:
        logged = Logged()
        self.addCleanup(logged.stop)
        service = self.service("auto")
        self.assertIsNone(service.xdp)
        self.assertEqual(logged.about_offload(), [
            "XDP offload off: not on the kernel's interfaces (an in-memory packet system); "
            "the Python paths serve every packet"])  # fmt: skip
        xdp = service.port_stats()["xdp"]
        self.assertEqual((xdp["setting"], xdp["active"], xdp["forwarded"]), ("auto", 0, 0))
        self.assertIn("in-memory", str(xdp["reason"]))

    def test_xdp_refuses(self) -> None:
        with self.assertRaises(Refused) as caught:
            self.service("xdp")
        self.assertEqual(str(caught.exception.code), (
            'lb.toml: balancer.offload: "xdp" cannot run here: not on the kernel\'s '
            'interfaces (an in-memory packet system) (offload = "auto" falls back to the '
            "Python paths)"))  # fmt: skip

    def test_none(self) -> None:
        """Never loaded, nothing logged, nothing in the port statistics."""
        logged = Logged()
        self.addCleanup(logged.stop)
        service = self.service("none")
        self.assertIsNone(service.xdp)
        self.assertNotIn("xdp", service.port_stats())
        self.assertEqual(logged.about_offload(), [])


def _why_no_host() -> str | None:
    if os.geteuid() != 0:
        return "network namespaces and BPF need root"
    if shutil.which("ip") is None:
        return "needs ip (iproute2)"
    from lbproxy.io.xdp import available

    return available()


def sh(*commands: str) -> None:
    for command in commands:
        subprocess.run(command, shell=True, check=True, capture_output=True, timeout=30)


class HostTests(SynchronousTestCase):
    """On a namespace of ours: ``c0`` and ``s0`` are veth ends (native XDP), ``d0`` a
    bridge (none)."""

    skip = _why_no_host()

    def setUp(self) -> None:
        self.ns = f"lbxo{os.getpid() % 100000}"
        self.addCleanup(sh, f"ip netns del {self.ns} 2>/dev/null || true")
        sh(f"ip netns del {self.ns} 2>/dev/null || true", f"ip netns add {self.ns}",
           f"ip -n {self.ns} link add c0 type veth peer name c1",
           f"ip -n {self.ns} link add s0 type veth peer name s1",
           f"ip -n {self.ns} link add d0 type bridge",
           *(f"ip -n {self.ns} link set {d} up"
             for d in ("c0", "c1", "s0", "s1", "d0")))  # fmt: skip
        self.forwarding("c0", "s0", "d0")

    def forwarding(self, *interfaces: str, on: bool = True) -> None:
        sh(*(f"ip netns exec {self.ns} sysctl -qw net.ipv6.conf.{i}.forwarding={int(on)}"
             for i in interfaces))  # fmt: skip

    def service(self, offload: str, client: str = "c0", server: str = "s0",
                **kw: Any) -> ForwarderService:  # fmt: skip
        clock = Clock()
        return ForwarderService(
            balancer(clock), LinuxPacketSystem(self.ns), MemoryReactor(), clock,
            client_interface=client, server_interface=server, offload=offload,
            config_path="lb.toml", own_addresses=(), **kw,
        )  # fmt: skip

    def attached(self) -> dict[str, str]:
        """Interface -> name of the XDP program attached to it (absent: none)."""
        import json

        out = subprocess.run(["ip", "-n", self.ns, "-j", "link", "show"], check=True,
                             capture_output=True, text=True, timeout=30).stdout  # fmt: skip
        return {link["ifname"]: link["xdp"]["prog"]["name"]
                for link in json.loads(out) if "xdp" in link}  # fmt: skip

    def assertFallsBack(self, reason: str, **kw: Any) -> None:
        """``auto``: the Python paths, the reason logged once; ``xdp``: refused."""
        logged = Logged()
        self.addCleanup(logged.stop)
        service = self.service("auto", **kw)
        self.assertIsNone(service.xdp)
        self.assertEqual(len(logged.about_offload()), 1, logged.about_offload())
        self.assertIn(reason, logged.about_offload()[0])
        self.assertIn(reason, str(service.port_stats()["xdp"]["reason"]))
        self.assertEqual(self.attached(), {})
        # Nothing of the executor is left behind: the core makes bindings as before.
        from tests.executors import address, raw_mobile

        self.assertEqual(service.balancer.table.listeners, [])
        packet = raw_mobile(17, address("2001:db8:100::1"), address("2001:db8:a1::1"), 64,
                            80, 0, b"x")  # fmt: skip
        self.assertIsNotNone(service.balancer.inbound(bytearray(packet)))
        with self.assertRaises(Refused) as caught:
            self.service("xdp", **kw)
        line = str(caught.exception.code)
        self.assertTrue(line.startswith('lb.toml: balancer.offload: "xdp" cannot run here: '),
                        line)  # fmt: skip
        self.assertIn(reason, line)
        self.assertEqual(len(line.splitlines()), 1)
        self.assertEqual(self.attached(), {})

    def test_object_missing(self) -> None:
        self.assertFallsBack("no BPF object at /nonexistent/lbproxy.bpf.o",
                             xdp_object="/nonexistent/lbproxy.bpf.o")  # fmt: skip

    def test_forwarding_off(self) -> None:
        self.forwarding("c0", "s0", on=False)
        self.assertFallsBack("IPv6 forwarding is off on c0 and s0")

    def test_driver_without_native_xdp(self) -> None:
        self.assertFallsBack("d0: the driver has no native (driver-mode) XDP", client="d0")

    def test_attached_while_the_service_lives(self) -> None:
        """On both links in driver mode from construction to `stopService`; the port
        statistics say so."""
        service = self.service("xdp")
        self.assertIsNotNone(service.xdp)
        self.assertEqual(self.attached(), {"c0": "lbproxy_inbound", "s0": "lbproxy_replies"})
        service.startService()
        xdp = service.port_stats()["xdp"]
        self.assertEqual((xdp["setting"], xdp["active"], xdp["reason"]), ("xdp", 1, ""))
        self.assertEqual((xdp["inbound_off"], xdp["replies_off"]), ("", ""))
        service.stopService()
        self.assertEqual(self.attached(), {})
        self.assertEqual(service.port_stats()["xdp"]["active"], 0)

    def test_changes_outside_a_batch_reach_the_map(self) -> None:
        """A binding made by the core is in the program's map after the batch; an
        operator's move outside any batch reaches it on the next reactor turn."""
        from tests.executors import address, raw_mobile

        service = self.service("xdp")
        self.addCleanup(service.stopService)
        xdp = service.xdp
        assert xdp is not None
        hoa = address("2001:db8:100::1")
        # What the client reader does with a miss: the general path, then the hook.
        packet = raw_mobile(17, hoa, address("2001:db8:a1::1"), 64, 80, 0, b"x")
        self.assertIsNotNone(service.balancer.inbound(bytearray(packet)))
        self.assertIsNone(xdp.program.bindings.lookup(hoa))
        service.client.protocol.after()  # type: ignore[attr-defined]
        raw = xdp.program.bindings.lookup(hoa)
        assert raw is not None
        binding = service.balancer.table.get(Key("hoa", hoa))
        assert binding is not None
        other = next(n for n in ("b0", "b1") if n != binding.backend.name)
        actions.move(service.balancer, Key("hoa", hoa), other)
        self.assertEqual(xdp.program.bindings.lookup(hoa), raw)  # not yet
        clock = service.clock
        assert isinstance(clock, Clock)
        clock.advance(0)
        moved = xdp.program.bindings.lookup(hoa)
        assert moved is not None
        self.assertEqual(int.from_bytes(moved[:4], "little"), int(other[1:]))

    def test_next_hops_from_the_neighbour_table(self) -> None:
        """At each sweep the backends' next hops on the server link (their MAC from the
        kernel's neighbour table, the link's MAC, index and MTU) go into the program,
        which then needs no lookup of its own for them; a backend whose entry goes
        goes back to the kernel's lookup."""
        import struct

        service = self.service("xdp")
        self.addCleanup(service.stopService)
        xdp = service.xdp
        assert xdp is not None
        service.startService()
        sh(f"ip -n {self.ns} neigh replace {BACKENDS[0]} dev s0 lladdr 02:00:00:00:b1:01 "
           "nud permanent")  # fmt: skip
        clock = service.clock
        assert isinstance(clock, Clock)

        def entry(address: str) -> tuple[int, int, bytes, int]:
            i = int.from_bytes(xdp.program.backend_ix.lookup(
                ipaddress.IPv6Address(address).packed) or b"", "little")
            raw = xdp.program.backends.lookup(i.to_bytes(4, "little"))
            assert raw is not None
            _a, flags, _d, _e, ifindex, eth, mtu, _p = struct.unpack("<16sIHHI12sHH", raw)
            return flags & 4, ifindex, eth, mtu

        self.assertEqual(entry(BACKENDS[0])[0], 0)
        clock.advance(service.sweep_interval)
        out = subprocess.run(["ip", "netns", "exec", self.ns, "cat", "/sys/class/net/s0/address",
                              "/sys/class/net/s0/ifindex"], check=True, capture_output=True,
                             text=True).stdout.split()  # fmt: skip
        mine = bytes.fromhex(out[0].replace(":", ""))
        self.assertEqual(entry(BACKENDS[0]),
                         (4, int(out[1]), bytes.fromhex("02000000b101") + mine, 1500))
        self.assertEqual(entry(BACKENDS[1])[0], 0)  # no neighbour entry: the kernel's
        sh(f"ip -n {self.ns} neigh del {BACKENDS[0]} dev s0")
        clock.advance(service.sweep_interval)
        self.assertEqual(entry(BACKENDS[0])[0], 0)


class TwistdTests(SynchronousTestCase):
    """``twistd lbproxy`` as an operator runs it, without the capabilities BPF needs
    (``setpriv`` drops CAP_BPF, CAP_SYS_ADMIN, CAP_NET_ADMIN and CAP_PERFMON from its
    bounding set; CAP_NET_RAW stays, so the rest of the balancer can start)."""

    skip = _why_no_host()

    def setUp(self) -> None:
        if not os.access(TWISTD, os.X_OK):
            raise SkipTest(f"no twistd at {TWISTD}")
        if shutil.which("setpriv") is None:
            raise SkipTest("needs setpriv (util-linux) to drop capabilities")
        self.ns = f"lbxt{os.getpid() % 100000}"
        self.addCleanup(sh, f"ip netns del {self.ns} 2>/dev/null || true")
        sh(f"ip netns del {self.ns} 2>/dev/null || true", f"ip netns add {self.ns}",
           f"ip -n {self.ns} link add c0 type veth peer name s0",
           f"ip -n {self.ns} link set c0 up", f"ip -n {self.ns} link set s0 up",
           f"ip netns exec {self.ns} sysctl -qw net.ipv6.conf.c0.forwarding=1 "
           "net.ipv6.conf.s0.forwarding=1")  # fmt: skip
        self.directory = Path(self.mktemp()).absolute()
        self.directory.mkdir()

    def command(self, offload: str) -> tuple[list[str], Path, Path]:
        path = self.directory / f"{offload}.toml"
        path.write_text(CONFIG.format(offload=f'offload = "{offload}"', client="c0",
                                      server="s0"))  # fmt: skip
        log = self.directory / f"{offload}.log"
        return ["ip", "netns", "exec", self.ns, "setpriv",
                "--bounding-set=-bpf,-sys_admin,-net_admin,-perfmon",
                "--inh-caps=-bpf,-sys_admin,-net_admin,-perfmon", TWISTD, "--nodaemon",
                "--pidfile=", f"--logfile={log}", "lbproxy", "--config", str(path)], path, log

    def test_xdp_refuses_in_one_line(self) -> None:
        command, path, _ = self.command("xdp")
        result = subprocess.run(command, capture_output=True, text=True, timeout=120,
                                cwd=self.directory, check=False)  # fmt: skip
        self.assertEqual(result.returncode, 1, result.stderr)
        self.assertNotIn("Traceback", result.stderr)
        lines = result.stderr.splitlines()
        self.assertEqual(len(lines), 1, result.stderr)
        self.assertTrue(lines[0].startswith(f'{path}: balancer.offload: "xdp" cannot run '
                                            "here: cannot load lbproxy.bpf.o: Operation not "
                                            "permitted"), lines[0])  # fmt: skip

    def test_auto_starts_and_says_why_once(self) -> None:
        command, _, log = self.command("auto")
        process = subprocess.Popen(command, cwd=self.directory, stdout=subprocess.DEVNULL,
                                   stderr=subprocess.PIPE, text=True)  # fmt: skip
        try:
            deadline = time.monotonic() + 60
            text = ""
            while "lbproxy forwarding" not in text:
                if process.poll() is not None:
                    self.fail(f"twistd exited {process.returncode}: {process.communicate()}")
                self.assertLess(time.monotonic(), deadline, text)
                time.sleep(0.1)
                text = log.read_text() if log.exists() else ""
        finally:
            process.send_signal(signal.SIGTERM)
            process.communicate(timeout=30)
        about = [line for line in text.splitlines() if "XDP offload" in line]
        self.assertEqual(len(about), 1, about)
        self.assertIn("XDP offload off: cannot load lbproxy.bpf.o: Operation not permitted",
                      about[0])  # fmt: skip
        self.assertIn("the Python paths serve every packet", about[0])
        self.assertNotIn("Traceback", text)


class PackagingTests(SynchronousTestCase):
    """The wheel and the sdist carry the program's source (and the object, when `make`
    built it before packaging: the build here is of tracked files only, so without it),
    where the installed loader looks."""

    def test_the_program_travels(self) -> None:
        import tarfile
        import zipfile

        from tests.test_packaging import _build, _run

        built = _build()
        with zipfile.ZipFile(built.wheel) as z:
            self.assertIn("lbproxy/xdp/lbproxy.bpf.c", z.namelist())
        with tarfile.open(built.sdist) as t:
            names = {n.split("/", 1)[1] for n in t.getnames() if "/" in n}
        self.assertIn("lbproxy/xdp/lbproxy.bpf.c", names)
        # The loader looks beside the package: lbproxy/xdp/ of wherever it is installed.
        import lbproxy
        from lbproxy.io.xdp import OBJECT

        self.assertEqual(OBJECT, Path(lbproxy.__file__).resolve().parent / "xdp" /
                         "lbproxy.bpf.o")  # fmt: skip
        where = _run([str(built.venv / "bin" / "python"), "-c",
                      "import lbproxy; print(lbproxy.__file__)"], built.work)  # fmt: skip
        self.assertEqual(where.returncode, 0, where.stderr)
        installed = Path(where.stdout.strip()).parent
        self.assertTrue(installed.is_relative_to(built.venv), installed)
        self.assertTrue((installed / "xdp" / "lbproxy.bpf.c").is_file(), installed)
