"""Tests for lbproxy.ops.systemd and the unit files in etc/.

systemd itself is not needed: the notification protocol is one datagram per message on an
``AF_UNIX`` socket named by ``$NOTIFY_SOCKET``, so each test binds such a socket and reads
what the program sends, exactly as systemd would.

* in-process: the protocol (path and abstract addresses), readiness only once the ready
  check passes, the watchdog period and ``$WATCHDOG_PID``, no pings while not alive,
  ``STOPPING=1``, silence without ``$NOTIFY_SOCKET``, the balancer's readiness after its
  table is restored;
* the real ``twistd``: the terminal agent as an ordinary user (no privilege needed), the
  balancer in a network namespace of its own as user ``nobody`` with only ``CAP_NET_RAW``
  -- what ``etc/lbproxy.service`` grants -- with a table to restore: READY=1 comes after the
  forwarder and the restore, WATCHDOG=1 every half period, none while the process is
  stopped (SIGSTOP), ``STOPPING=1`` on SIGTERM;
* the unit files: ``systemd-analyze verify`` and ``systemd-analyze security --offline=yes``
  (exposure at most 2.5, printed), and the balancer's system calls under ``strace``
  against the unit's ``SystemCallFilter``.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from twisted.application.service import MultiService, Service
from twisted.internet.task import Clock
from twisted.internet.testing import MemoryReactorClock
from twisted.trial.unittest import SkipTest, SynchronousTestCase, TestCase

from lbproxy.config import load_config
from lbproxy.ops import systemd
from lbproxy.ops.systemd import SystemdNotifier, SystemdService, watchdog_interval
from lbproxy.tap import BalancerService
from lbproxy.testing import MemoryPacketSystem

ROOT = Path(__file__).resolve().parent.parent
ETC = ROOT / "etc"
UNITS = ("lbproxy.service", "lbproxy-homeagent.service", "lbproxy-terminal.service")
TWISTD = os.path.join(os.path.dirname(sys.executable), "twistd")
MAX_EXPOSURE = 2.5


class Listener:
    """A datagram socket standing in for systemd's notification socket."""

    def __init__(self, address: str) -> None:
        self.address = address
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(b"\0" + address[1:].encode() if address.startswith("@") else address)
        self.received: list[tuple[float, dict[str, str]]] = []

    def read(self, timeout: float = 0.0) -> list[dict[str, str]]:
        """Datagrams received within ``timeout`` seconds (at least those already there)."""
        got = []
        deadline = time.monotonic() + timeout
        while True:
            self.sock.settimeout(max(0.0, deadline - time.monotonic()) or 0.001)
            try:
                data = self.sock.recv(4096)
            except (TimeoutError, BlockingIOError):
                break
            fields = dict(line.split("=", 1) for line in data.decode().split("\n") if line)
            self.received.append((time.monotonic(), fields))
            got.append(fields)
        return got

    def wait_for(self, name: str, timeout: float, process: Any = None) -> dict[str, str]:
        """The first message with ``name`` (e.g. READY), within ``timeout`` seconds."""
        for _, fields in self.received:
            if name in fields:
                return fields
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for fields in self.read(0.1):
                if name in fields:
                    return fields
            if process is not None and process.poll() is not None:
                raise AssertionError(f"the program exited ({process.returncode}) before {name}")
        raise AssertionError(f"no {name} in {timeout}s; received {self.received}")

    def close(self) -> None:
        self.sock.close()
        if not self.address.startswith("@"):
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self.address)


def abstract_name() -> str:
    return f"@lbproxy-test-{os.getpid()}-{time.monotonic_ns()}"


class NotifierTests(SynchronousTestCase):
    """The datagram protocol itself."""

    def listen(self, address: str) -> Listener:
        listener = Listener(address)
        self.addCleanup(listener.close)
        return listener

    def test_path_and_abstract_addresses(self) -> None:
        """A path is used as it is; ``@name`` is the abstract name ``\\0name``; the
        assignments arrive in one datagram."""
        # A short path: an AF_UNIX path has at most 107 bytes, and a checkout's own
        # trial directory can be deeper than that.
        directory = tempfile.mkdtemp(prefix="lbproxy-sd-")
        self.addCleanup(shutil.rmtree, directory, True)
        for address in (os.path.join(directory, "notify"), abstract_name()):
            if not address.startswith("@"):
                os.makedirs(os.path.dirname(address), exist_ok=True)
            listener = self.listen(address)
            notifier = SystemdNotifier(address)
            self.assertTrue(notifier.send("READY=1", "STATUS=up"))
            self.assertEqual(listener.read(1.0), [{"READY": "1", "STATUS": "up"}])
            notifier.close()

    def test_unset_or_unusable(self) -> None:
        """No ``$NOTIFY_SOCKET``: no notifier; an address of another kind: none either."""
        self.assertIsNone(SystemdNotifier.from_environment({}))
        self.assertIsNone(SystemdNotifier.from_environment({"NOTIFY_SOCKET": "vsock:2:99"}))
        self.assertIsNotNone(SystemdNotifier.from_environment({"NOTIFY_SOCKET": "@x"}))

    def test_send_failure_is_reported_not_raised(self) -> None:
        """Nobody listening: ``send`` answers False and the service goes on."""
        notifier = SystemdNotifier(os.path.abspath(self.mktemp()))
        self.assertFalse(notifier.send("READY=1"))
        self.assertFalse(notifier.send("WATCHDOG=1"))
        self.assertEqual(notifier.sent, 0)
        notifier.close()

    def test_watchdog_interval(self) -> None:
        """Half of ``$WATCHDOG_USEC``; none when unset, zero, garbage or for another pid."""
        self.assertEqual(watchdog_interval({"WATCHDOG_USEC": "30000000"}, 7), 15.0)
        self.assertEqual(watchdog_interval({"WATCHDOG_USEC": "400000",
                                            "WATCHDOG_PID": "7"}, 7), 0.2)
        self.assertIsNone(watchdog_interval({"WATCHDOG_USEC": "400000",
                                             "WATCHDOG_PID": "8"}, 7))
        for value in ("", "0", "-5", "x"):
            self.assertIsNone(watchdog_interval({"WATCHDOG_USEC": value}, 7))


class ServiceTests(SynchronousTestCase):
    """`SystemdService` driven by a fake clock."""

    def setUp(self) -> None:
        self.address = abstract_name()
        self.listener = Listener(self.address)
        self.addCleanup(self.listener.close)

    def environ(self, **extra: str) -> dict[str, str]:
        return {"NOTIFY_SOCKET": self.address, **extra}

    def test_ready_only_when_the_check_passes(self) -> None:
        """READY=1 (with STATUS and MAINPID) is sent once, when ``ready`` first gives a
        status; before that, nothing."""
        clock = Clock()
        state: dict[str, str | None] = {"status": None}
        service = SystemdService(clock, ready=lambda: state["status"], environ=self.environ())
        service.startService()
        clock.advance(1)
        self.assertEqual(self.listener.read(0.2), [])
        self.assertFalse(service.is_ready)
        state["status"] = "serving"
        clock.advance(0.05)
        self.assertEqual(self.listener.read(1.0),
                         [{"READY": "1", "STATUS": "serving", "MAINPID": str(os.getpid())}])
        clock.advance(5)
        self.assertEqual(self.listener.read(0.2), [])  # once only
        service.stopService()
        self.assertEqual(self.listener.read(1.0), [{"STOPPING": "1", "STATUS": "stopping"}])

    def test_waits_for_the_reactor(self) -> None:
        """Nothing before the reactor runs (``callWhenRunning``), READY=1 once it does."""
        reactor = MemoryReactorClock()
        service = SystemdService(reactor, environ=self.environ())
        service.startService()
        self.assertEqual(self.listener.read(0.2), [])
        reactor.run()
        self.assertEqual(self.listener.read(1.0)[0]["READY"], "1")
        service.stopService()

    def test_watchdog_every_half_period_while_alive(self) -> None:
        """WATCHDOG=1 every half of ``$WATCHDOG_USEC`` on the reactor's clock; none while
        ``alive`` is false, again when it is true; none after stop."""
        clock = Clock()
        alive = {"yes": True}
        service = SystemdService(clock, alive=lambda: alive["yes"],
                                 environ=self.environ(WATCHDOG_USEC="2000000"))
        service.startService()
        self.assertEqual(service.interval, 1.0)
        first = self.listener.read(1.0)
        self.assertIn({"WATCHDOG": "1"}, first)
        self.assertIn("READY", first[-1])
        for _ in range(3):
            clock.advance(1.0)
        self.assertEqual(self.listener.read(0.5), [{"WATCHDOG": "1"}] * 3)
        alive["yes"] = False
        for _ in range(3):
            clock.advance(1.0)
        self.assertEqual(self.listener.read(0.2), [])
        alive["yes"] = True
        clock.advance(1.0)
        self.assertEqual(self.listener.read(0.5), [{"WATCHDOG": "1"}])
        self.assertEqual(service.pings, 5)
        service.stopService()
        clock.advance(5)
        self.assertEqual(self.listener.read(0.5), [{"STOPPING": "1", "STATUS": "stopping"}])
        self.flushLoggedErrors()

    def test_watchdog_meant_for_another_process(self) -> None:
        """``$WATCHDOG_PID`` names another process: no pings, READY=1 still."""
        clock = Clock()
        service = SystemdService(clock, environ=self.environ(
            WATCHDOG_USEC="1000000", WATCHDOG_PID=str(os.getpid() + 1)))
        service.startService()
        clock.advance(3)
        self.assertEqual([m for m in self.listener.read(0.5) if "WATCHDOG" in m], [])
        self.assertTrue(service.is_ready)
        service.stopService()

    def test_silent_without_notify_socket(self) -> None:
        """Not under systemd: no socket, no timers, no calls on the reactor."""
        reactor = MemoryReactorClock()
        service = SystemdService(reactor, environ={"WATCHDOG_USEC": "1000000"})
        service.startService()
        reactor.run()
        reactor.advance(10)
        self.assertEqual((reactor.getDelayedCalls(), service.pings), ([], 0))
        service.stopService()
        self.assertEqual(self.listener.read(0.2), [])

    def test_agent_ready_once_listening(self) -> None:
        """``for_agent``: ready once the agent's listener runs."""
        clock = Clock()
        agent = MultiService()
        agent.listening = Service()  # type: ignore[attr-defined]
        service = systemd.for_agent(agent, clock, "terminal agent")
        service.notifier = SystemdNotifier(self.address)
        service.startService()
        clock.advance(1)
        self.assertEqual(self.listener.read(0.2), [])
        agent.listening.startService()  # type: ignore[attr-defined]
        clock.advance(0.05)
        self.assertEqual(self.listener.read(1.0)[0]["STATUS"], "terminal agent: serving balancers")
        service.stopService()


BALANCER = """
[balancer]
key_chain = ["hoa", "src"]
[virtual]
addresses = ["2001:db8:5::80"]
[interfaces]
client = "lbc"
server = "lbs"
[[backend]]
name = "srv1"
address = "2001:db8:b0::11"
[[backend]]
name = "srv2"
address = "2001:db8:b0::12"
"""


class BalancerServiceTests(SynchronousTestCase):
    """The balancer's service tree in-process, with the in-memory packet system."""

    def test_ready_after_forwarder_and_restore(self) -> None:
        """The systemd service is the tree's last child; READY=1 comes when the reactor
        runs, with the forwarder's sockets open and the saved table restored (its count
        in STATUS); the stop sends STOPPING=1 before the table is saved."""
        address = abstract_name()
        listener = Listener(address)
        self.addCleanup(listener.close)
        state = Path(self.mktemp())
        state.mkdir()
        path = self.mktemp()
        Path(path).write_text(BALANCER + f'[persistence]\npath = "{state}/t.jsonl"\n')

        def start(reactor: MemoryReactorClock) -> BalancerService:
            system = MemoryPacketSystem(interfaces=("lbc", "lbs"))
            with _environ(NOTIFY_SOCKET=address):
                service = BalancerService(load_config(path), reactor, install_sighup=False,
                                          system=system)
            self.assertIs(list(service)[-1], service.getServiceNamed("systemd"))
            service.privilegedStartService()
            service.startService()
            return service

        first = start(MemoryReactorClock())
        first.control.move("addr 2001:db8:100::1", "srv2")
        first.stopService()
        listener.read(0.5)  # a reactor that never ran: no READY=1, only STOPPING=1

        reactor = MemoryReactorClock()
        service = start(reactor)
        self.addCleanup(service.stopService)
        self.assertEqual(listener.read(0.2), [])  # not before the reactor runs
        reactor.run()
        ready = listener.read(1.0)
        self.assertEqual(len(ready), 1)
        self.assertEqual(ready[0]["READY"], "1")
        self.assertEqual(ready[0]["STATUS"],
                         "forwarding lbc -> lbs (translate), 1 bindings restored")
        self.assertGreaterEqual(service.forwarder.writer.fileno(), 0)
        self.assertEqual(len(service.balancer.table), 1)


@contextlib.contextmanager
def _environ(**values: str) -> Iterator[None]:
    old = {name: os.environ.get(name) for name in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for name, value in old.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


def _need_twistd() -> None:
    if not os.path.exists(TWISTD):
        raise SkipTest(f"no twistd at {TWISTD}")


def _stop(process: subprocess.Popen[bytes], main: int = 0) -> None:
    """Stop what a test started: the program (``main``, its pid when a wrapper such as
    strace started it) and the process the test spawned."""
    for pid in (main, process.pid):
        if pid and process.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGTERM)
            try:
                process.wait(20)
            except subprocess.TimeoutExpired:
                continue
    if process.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            if main:
                os.kill(main, signal.SIGKILL)
        process.kill()
        process.wait(5)


#: twistd stops cleanly on SIGTERM and then ends by that signal, as systemd expects.
CLEAN_STOP = (0, -signal.SIGTERM)


def _terminate(process: subprocess.Popen[bytes], main: int, log: Path) -> None:
    """SIGTERM to the program, a clean stop: exit status and the log say so."""
    os.kill(main, signal.SIGTERM)
    code = process.wait(60)
    assert code in CLEAN_STOP, f"exit status {code}"
    assert "Server Shut Down." in log.read_text()[-2000:], log.read_text()[-2000:]


def _watchdog_evidence(test: TestCase, listener: Listener, process: subprocess.Popen[bytes],
                       period: float) -> None:
    """Pings every half period while running; none while stopped; again after SIGCONT."""
    listener.read(0.0)
    start = time.monotonic()
    pings = [m for m in listener.read(period * 2.5) if "WATCHDOG" in m]
    elapsed = time.monotonic() - start
    test.assertGreaterEqual(len(pings), 3, f"{len(pings)} pings in {elapsed:.2f}s")
    test.assertLessEqual(len(pings), int(elapsed / (period / 2)) + 2)
    os.kill(process.pid, signal.SIGSTOP)
    try:
        time.sleep(0.05)
        listener.read(0.0)  # one already in flight
        test.assertEqual([m for m in listener.read(period * 1.5) if "WATCHDOG" in m], [],
                         "a stopped process must not ping")
    finally:
        os.kill(process.pid, signal.SIGCONT)
    test.assertTrue([m for m in listener.read(period * 1.5) if "WATCHDOG" in m])


class TerminalAgentTwistdTests(TestCase):
    """``twistd lbproxy-terminal`` as an ordinary program: it needs no privilege."""

    def test_ready_watchdog_stopping(self) -> None:
        _need_twistd()
        from lbproxy.notify.pki import CertificateAuthority

        directory = Path(self.mktemp()).absolute()
        directory.mkdir()
        ca = CertificateAuthority("lbproxy systemd test CA")
        ca_path, cert, key = ca.write(directory, "t1", ca.issue(
            dns=["t1.example.net"], ips=["2001:db8:100::16"]))
        config = directory / "terminal.toml"
        config.write_text("\n".join([
            "[agent]", 'listen = "tcp6:0:interface=\\\\:\\\\:1"',
            'balancers = ["lb1.example.net"]',
            "[tls]", f'ca = "{ca_path}"', f'certificate = "{cert}"', f'key = "{key}"',
            "[terminal]", 'home = "2001:db8:100::16"', 'home_prefix = "2001:db8:100::/64"',
            f'state_file = "{directory}/state/seq"',
        ]) + "\n")
        listener = Listener(abstract_name())
        self.addCleanup(listener.close)
        env = dict(os.environ, NOTIFY_SOCKET=listener.address, WATCHDOG_USEC="400000")
        log = directory / "twistd.log"
        process = subprocess.Popen(
            [TWISTD, "--nodaemon", "--pidfile=", f"--logfile={log}", "lbproxy-terminal",
             "--config", str(config)],
            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        self.addCleanup(_stop, process)
        ready = listener.wait_for("READY", 30, process)
        self.assertEqual(ready["STATUS"], "terminal agent: serving balancers")
        self.assertEqual(ready["MAINPID"], str(process.pid))
        self.assertIn("terminal agent: watching addresses", log.read_text())
        _watchdog_evidence(self, listener, process, 0.4)
        _terminate(process, process.pid, log)
        self.assertIn({"STOPPING": "1", "STATUS": "stopping"}, listener.read(0.5) +
                      [fields for _, fields in listener.received])


def _need_root_and(*tools: str) -> None:
    if os.geteuid() != 0:
        raise SkipTest("needs root (a network namespace, setpriv to become nobody)")
    missing = [tool for tool in tools if shutil.which(tool) is None]
    if missing:
        raise SkipTest(f"needs {', '.join(missing)}")


@contextlib.contextmanager
def balancer_namespace() -> Iterator[str]:
    """A network namespace with a veth pair ``lbc``/``lbs``, deleted afterwards."""
    name = f"lbsd{os.getpid() % 100000}"
    subprocess.run(["ip", "netns", "del", name], capture_output=True, check=False)
    subprocess.run(["ip", "netns", "add", name], check=True)
    try:
        subprocess.run(["ip", "-n", name, "-batch", "-"], check=True, text=True, input="\n".join([
            "link set lo up", "link add lbc type veth peer name lbs",
            "link set lbc up", "link set lbs up",
            "addr add 2001:db8:b0::1/64 dev lbs nodad"]) + "\n")
        yield name
    finally:
        subprocess.run(["ip", "netns", "del", name], capture_output=True, check=False)


NOBODY = ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", "--no-new-privs",
          "--inh-caps=-all,+net_raw", "--ambient-caps=-all,+net_raw",
          "--bounding-set=-all,+net_raw"]


class BalancerTwistdTests(TestCase):
    """``twistd lbproxy`` as ``etc/lbproxy.service`` runs it: not root, only CAP_NET_RAW."""

    def setUp(self) -> None:
        _need_twistd()
        _need_root_and("ip", "setpriv")
        self.directory = Path(tempfile.mkdtemp(prefix="lbproxy-systemd-"))
        self.addCleanup(shutil.rmtree, self.directory, ignore_errors=True)
        self.directory.chmod(0o755)
        self.state = self.directory / "state"  # nobody's, like StateDirectory=
        self.state.mkdir()
        os.chown(self.state, 65534, 65534)
        self.config = self.directory / "lbproxy.toml"
        self.config.write_text(BALANCER + "\n".join([
            "[control]", f'socket = "{self.state}/run/control.sock"',
            "[persistence]", f'path = "{self.state}/lib/table.jsonl"', "interval = 600",
        ]) + "\n")
        self.log = self.state / "twistd.log"

    def start(self, namespace: str, listener: Listener, prefix: list[str],
              trace: str = "") -> subprocess.Popen[bytes]:
        env = dict(os.environ, NOTIFY_SOCKET=listener.address, WATCHDOG_USEC="400000")
        strace = ["strace", "-f", "-qq", "-o", trace] if trace else []
        return subprocess.Popen(
            ["ip", "netns", "exec", namespace, *strace, *prefix, TWISTD, "--nodaemon",
             "--pidfile=", f"--logfile={self.log}", "lbproxy", "--config", str(self.config)],
            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)

    def listener(self) -> Listener:
        listener = Listener(str(self.directory / "notify.sock"))  # a path: netns-proof
        os.chmod(listener.address, 0o666)
        self.addCleanup(listener.close)
        return listener

    def test_ready_after_restore_watchdog_stopping_as_nobody(self) -> None:
        """First run: a binding is placed with lbproxyctl and saved on SIGTERM.  Second
        run: READY=1 only after the log says the forwarder runs and the table was
        restored, with the count in STATUS; WATCHDOG=1 every 0.2 s, none while stopped;
        STOPPING=1 on SIGTERM, exit status 0."""
        with balancer_namespace() as namespace:
            listener = self.listener()
            process = self.start(namespace, listener, NOBODY)
            self.addCleanup(_stop, process)
            first = listener.wait_for("READY", 60, process)
            self.assertEqual(first["STATUS"], "forwarding lbc -> lbs (translate), "
                                              "0 bindings restored")
            ctl = subprocess.run(
                [sys.executable, "-m", "lbproxy.ops.ctl", "--socket",
                 f"{self.state}/run/control.sock", "move", "addr 2001:db8:100::1", "srv2"],
                capture_output=True, text=True, timeout=30, check=False)
            self.assertEqual(ctl.returncode, 0, ctl.stderr)
            _terminate(process, process.pid, self.log)

            listener.received.clear()
            process = self.start(namespace, listener, NOBODY)
            self.addCleanup(_stop, process)
            ready = listener.wait_for("READY", 60, process)
            log = self.log.read_text()
            second = log[log.rindex("starting up."):]
            self.assertIn("lbproxy forwarding: lbc -> Balancer(translate) -> lbs", second)
            self.assertIn("Restored 1 bindings", second)
            self.assertEqual(ready["STATUS"], "forwarding lbc -> lbs (translate), "
                                              "1 bindings restored")
            self.assertEqual(ready["MAINPID"], str(process.pid))
            status = Path(f"/proc/{process.pid}/status").read_text()
            self.assertIn("Uid:\t65534", status)
            self.assertEqual(re.search(r"CapEff:\s*(\w+)", status)[1],  # type: ignore[index]
                             "0000000000002000")  # CAP_NET_RAW only
            _watchdog_evidence(self, listener, process, 0.4)
            _terminate(process, process.pid, self.log)
            self.assertIn({"STOPPING": "1", "STATUS": "stopping"},
                          [fields for _, fields in listener.received] + listener.read(0.5))

    def test_system_calls_within_the_units_filter(self) -> None:
        """Every system call the balancer makes from start to a clean stop (under
        strace, all threads) is allowed by ``etc/lbproxy.service``'s
        ``SystemCallFilter=@system-service ~@privileged @resources``, as systemd-analyze
        expands those sets on this host."""
        _need_root_and("strace", "systemd-analyze")
        allowed = _filter_sets("@system-service") - _filter_sets("@privileged", "@resources")
        trace = str(self.directory / "strace.out")
        with balancer_namespace() as namespace:
            listener = self.listener()
            process = self.start(namespace, listener, NOBODY, trace=trace)
            self.addCleanup(_stop, process)
            main = int(listener.wait_for("READY", 90, process)["MAINPID"])
            self.addCleanup(_stop, process, main)
            listener.read(0.5)
            _terminate(process, main, self.log)
        called: set[str] = set()
        denied_anyway: set[str] = set()
        entered = False
        for line in Path(trace).read_text().splitlines():
            if f'execve("{TWISTD}"' in line:
                entered = True  # from twistd's own execve on: what the unit's process does
            match = re.match(r"\d+\s+(?:<\.\.\. )?(\w+)\(", line)
            if entered and match:
                called.add(match[1])
                if "= -1 EPERM" in line:
                    denied_anyway.add(match[1])
        self.assertIn("sendto", called)  # the trace holds the notifications
        outside = called - allowed - {"execve"}
        # bpf(): the XDP executor's attempt (offload = "auto"), refused already without
        # CAP_BPF; the filter's EPERM is the same answer, and the Python paths serve.
        self.assertEqual(sorted(outside - (denied_anyway & {"bpf"})), [],
                         "system calls outside the unit's SystemCallFilter")
        print(f"\n  {len(called)} system calls, all within the filter"
              + (f" but {sorted(outside)} (refused with EPERM either way)" if outside else ""),
              end=" ")


def _filter_sets(*names: str) -> set[str]:
    """The system call names in systemd's ``names`` sets, nested sets expanded."""
    out = subprocess.run(["systemd-analyze", "syscall-filter", *names], capture_output=True,
                         text=True, check=True).stdout
    calls = set()
    for line in out.splitlines():
        word = line.strip()
        if word and not word.startswith(("#", "@")) and re.fullmatch(r"\w+", word):
            calls.add(word)
    nested = {line.strip() for line in out.splitlines() if line.strip().startswith("@")}
    nested -= set(names)
    return calls | (_filter_sets(*sorted(nested)) if nested else set())


class UnitFileTests(SynchronousTestCase):
    """The unit files as systemd reads them."""

    def setUp(self) -> None:
        if shutil.which("systemd-analyze") is None:
            raise SkipTest("no systemd-analyze (Debian package systemd; `make system-deps` "
                           "installs it as root)")

    def test_verify(self) -> None:
        """``systemd-analyze verify`` finds nothing to say about any unit (with ExecStart
        pointing at this checkout's twistd, since verify checks the program exists)."""
        directory = Path(self.mktemp())
        directory.mkdir()
        for unit in UNITS:
            text = (ETC / unit).read_text().replace("/opt/lbproxy/venv/bin/twistd", TWISTD)
            (directory / unit).write_text(text)
            result = subprocess.run(["systemd-analyze", "verify", str(directory / unit)],
                                    capture_output=True, text=True, timeout=60, check=False)
            self.assertEqual((result.returncode, result.stdout + result.stderr), (0, ""), unit)

    def test_security_exposure(self) -> None:
        """``systemd-analyze security --offline=yes``: every unit at most 2.5 (printed)."""
        for unit in UNITS:
            result = subprocess.run(
                ["systemd-analyze", "security", "--offline=yes", "--no-pager",
                 str(ETC / unit)],
                capture_output=True, text=True, timeout=60, check=False)
            match = re.search(r"Overall exposure level for \S+: ([\d.]+)", result.stdout)
            self.assertIsNotNone(match, result.stdout + result.stderr)
            assert match is not None
            score = float(match[1])
            print(f"\n  systemd-analyze security {unit}: {score}", end=" ")
            self.assertLessEqual(score, MAX_EXPOSURE, result.stdout)

    def test_units_as_documented(self) -> None:
        """Type=notify with a watchdog, never root, capabilities only where needed."""
        expected_caps = {"lbproxy.service": "CAP_NET_RAW",
                         "lbproxy-homeagent.service": "CAP_NET_RAW",
                         "lbproxy-terminal.service": ""}
        for unit in UNITS:
            settings: dict[str, list[str]] = {}
            for line in (ETC / unit).read_text().splitlines():
                if "=" in line and not line.startswith(("#", "[")):
                    name, _, value = line.partition("=")
                    settings.setdefault(name, []).append(value)
            self.assertEqual(settings["Type"], ["notify"], unit)
            self.assertEqual(settings["NotifyAccess"], ["main"], unit)
            self.assertTrue(settings["WatchdogSec"], unit)
            self.assertEqual(settings["User"], ["lbproxy"], unit)
            self.assertEqual(settings["AmbientCapabilities"], [expected_caps[unit]], unit)
            self.assertEqual(settings["CapabilityBoundingSet"], [expected_caps[unit]], unit)
            self.assertIn("--nodaemon", settings["ExecStart"][0], unit)
