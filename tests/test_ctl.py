"""Tests for lbproxy.ops.ctl: the UNIX-socket runtime API and the lbproxyctl client."""

from __future__ import annotations

import io
import json
import os
import pwd
import shutil
import socket
import stat
import tempfile
from typing import Any

from twisted.internet import defer, reactor, threads
from twisted.trial.unittest import SynchronousTestCase, TestCase

from lbproxy.ops import ctl
from lbproxy.ops.control import Control
from tests.operating_fakes import real_key, real_packet, real_populated
from tests.test_audit import AuditCapture

REACTOR: Any = reactor


class Run:
    """The outcome of one lbproxyctl invocation."""

    def __init__(self, code: int, out: str, err: str) -> None:
        self.code, self.out, self.err = code, out, err

    def json(self) -> Any:
        return json.loads(self.out)


class ServerTests(TestCase):
    """A real server on a real socket, the real client in a thread."""

    timeout = 30

    def setUp(self) -> Any:
        self.balancer, self.clock = real_populated()
        self.reloads: list[str] = []

        def reload(who: str) -> str:
            self.reloads.append(who)
            if len(self.reloads) > 1:
                raise ValueError("lbproxy.toml: backends.b3.address: not an IPv6 address")
            return "2 backends"

        self.control = Control(self.balancer, self.clock, reload=reload)
        # A short path: UNIX socket paths are limited to 107 bytes.
        parent = tempfile.mkdtemp(prefix="lbop-ctl-")
        self.addCleanup(shutil.rmtree, parent, True)
        os.chmod(parent, 0o755)  # the permission test's user must reach the 0700 directory
        self.directory = os.path.join(parent, "run")
        self.path = os.path.join(self.directory, "ctl.sock")
        self.service = ctl.make_ctl_service(self.path, self.control, REACTOR)
        self.service.privilegedStartService()
        self.service.startService()
        self.addCleanup(self.service.stopService)

    def run_ctl(self, *argv: str, stdin: str = "") -> defer.Deferred[Run]:
        def call() -> Run:
            out, err = io.StringIO(), io.StringIO()
            code = ctl.main(
                ["--socket", self.path, *argv], out, err, io.StringIO(stdin)
            )
            return Run(code, out.getvalue(), err.getvalue())

        return threads.deferToThread(call)

    def test_socket_and_directory_are_owner_only(self) -> None:
        """The socket is mode 0600 in a 0700 directory."""
        self.assertEqual(stat.S_IMODE(os.stat(self.path).st_mode), 0o600)
        self.assertTrue(stat.S_ISSOCK(os.stat(self.path).st_mode))
        self.assertEqual(stat.S_IMODE(os.stat(self.directory).st_mode), 0o700)

    @defer.inlineCallbacks
    def test_show(self) -> Any:
        """show prints the aligned table; --json gives rows and total; filters apply."""
        run = yield self.run_ctl("show")
        self.assertEqual(run.code, 0, run.err)
        lines = run.out.splitlines()
        self.assertEqual(lines[0].split()[:3], ["kind", "key", "backend"])
        self.assertIn("addr 2001:db8:2::12", run.out)
        self.assertEqual(lines[-1], "(3 bindings)")
        run = yield self.run_ctl("--json", "show", "--backend", "b1", "--limit", "1")
        result = run.json()
        self.assertEqual(result["total"], 2)
        self.assertEqual(len(result["rows"]), 1)
        self.assertEqual(result["rows"][0]["backend"], "b1")
        self.assertEqual(
            set(result["rows"][0]),
            {"kind", "key", "backend", "left", "idle", "packets", "care_of", "confirmed",
             "aliases"},
        )
        run = yield self.run_ctl("--json", "show", "aa::12")
        self.assertEqual([r["care_of"] for r in run.json()["rows"]], ["2001:db8:aa::12"])

    @defer.inlineCallbacks
    def test_trace(self) -> Any:
        """trace takes hex (argument or stdin) and answers strategy, key, backend, hit."""
        raw = bytes(real_packet("2001:db8:1::10")).hex()
        run = yield self.run_ctl("trace", raw)
        self.assertEqual(run.code, 0, run.err)
        self.assertIn("key: addr 2001:db8:1::10", run.out)
        self.assertIn("hit: True", run.out)
        run = yield self.run_ctl("--json", "trace", "-", stdin=raw + "\n")
        self.assertEqual(run.json()["key"], "addr 2001:db8:1::10")
        run = yield self.run_ctl("trace", "not-hex")
        self.assertEqual(run.code, 1)
        self.assertIn("not a hex packet", run.err)

    @defer.inlineCallbacks
    def test_move_and_forget(self) -> Any:
        """move rebinds (key given as two words or one), forget removes, both in JSON too."""
        before = self.balancer.table.get(real_key("addr 2001:db8:1::10"))
        self.assertEqual(before.backend.name, "b1")
        run = yield self.run_ctl("move", "src", "2001:db8:1::10", "b2")
        self.assertEqual((run.code, run.out), (0, "addr 2001:db8:1::10 -> b2\n"), run.err)
        binding = self.balancer.table.get(real_key("addr 2001:db8:1::10"))
        self.assertEqual(binding.backend.name, "b2")
        run = yield self.run_ctl("--json", "move", "addr 2001:db8:1::10", "b1")
        self.assertEqual(run.json()["backend"], "b1")
        binding = self.balancer.table.get(real_key("addr 2001:db8:1::10"))
        self.assertEqual(binding.backend.name, "b1")
        run = yield self.run_ctl("move", "addr 2001:db8:1::10", "b7")
        self.assertEqual(run.code, 1)
        self.assertIn("unknown backend 'b7'", run.err)
        run = yield self.run_ctl("forget", "src", "2001:db8:1::10")
        self.assertEqual(run.out, "forgot addr 2001:db8:1::10\n")
        self.assertIsNone(self.balancer.table.get(real_key("addr 2001:db8:1::10")))
        run = yield self.run_ctl("--json", "forget", "addr 2001:db8:1::10")
        self.assertIsNone(run.json())
        run = yield self.run_ctl("forget", "addr 2001:db8:1::10")
        self.assertEqual(run.out, "no such binding\n")

    @defer.inlineCallbacks
    def test_drain_backends_stats(self) -> Any:
        """drain sets weight 0 keeping bindings; backends and stats report it."""
        run = yield self.run_ctl("drain", "b1")
        self.assertEqual(run.code, 0, run.err)
        self.assertIn("b1 drained: weight 0, 2 existing bindings stay", run.out)
        run = yield self.run_ctl("--json", "backends")
        by_name = {b["name"]: b for b in run.json()}
        self.assertEqual(by_name["b1"]["weight"], 0)
        self.assertEqual(by_name["b1"]["bindings"], 2)
        self.assertEqual(by_name["b2"]["weight"], 1)
        self.assertEqual(by_name["b1"]["address"], "2001:db8:100::1")
        run = yield self.run_ctl("backends")
        self.assertEqual(run.out.split("\n")[0].split(), [
            "name", "address", "weight", "state", "bindings", "packets"])
        run = yield self.run_ctl("--json", "stats")
        self.assertEqual(run.json()["packets_in"], 3)
        self.assertEqual(run.json()["table"]["size"], 3)
        run = yield self.run_ctl("stats")
        self.assertIn("packets_in 3\n", run.out)
        self.assertIn("misses.src 3\n", run.out)

    @defer.inlineCallbacks
    def test_reload(self) -> Any:
        """reload calls the service's callable; its refusal comes back as a clear error."""
        run = yield self.run_ctl("reload")
        self.assertEqual((run.code, run.out), (0, "reloaded: 2 backends\n"))
        run = yield self.run_ctl("--json", "reload")
        self.assertEqual(run.code, 1)
        self.assertIn("backends.b3.address", run.err)
        me = f"lbproxyctl uid={os.geteuid()}({pwd.getpwuid(os.geteuid()).pw_name}) " \
             f"pid={os.getpid()}"  # fmt: skip
        self.assertEqual(self.reloads, [me, me])

    @defer.inlineCallbacks
    def test_reload_report(self) -> Any:
        """A reload answer with parts is printed as its summary; --json gives the parts."""
        from lbproxy.ops.reload import ReloadReport

        report = ReloadReport(applied=("backend (added b3)",), restart=("balancer.mode",))
        self.control.reload_callable = lambda who: report
        run = yield self.run_ctl("reload")
        self.assertEqual(run.out, "reloaded: applied: backend (added b3); needs a restart: "
                                  "balancer.mode\n")  # fmt: skip
        run = yield self.run_ctl("--json", "reload")
        self.assertEqual(run.json()["restart"], ["balancer.mode"])
        self.assertEqual(run.json()["applied"], ["backend (added b3)"])

    @defer.inlineCallbacks
    def test_changes_are_audited_with_the_peers_uid(self) -> Any:
        """A move through the socket is one audit line naming the peer's uid and pid
        (SO_PEERCRED; the client here is a thread of this process)."""
        capture = AuditCapture(self)
        run = yield self.run_ctl("move", "addr", "2001:db8:1::10", "b2")
        self.assertEqual(run.code, 0, run.err)
        name = pwd.getpwuid(os.geteuid()).pw_name
        self.assertEqual(capture.lines, [
            f'audit: who="lbproxyctl uid={os.geteuid()}({name}) pid={os.getpid()}" '
            'action=move key="addr 2001:db8:1::10" backend=b2 previous=b1'
        ])

    @defer.inlineCallbacks
    def test_show_pages(self) -> Any:
        """show holds 100 rows unless told otherwise, --offset pages on, and the footer
        says where the next page starts; more than 10,000 rows is refused."""
        for i in range(150):
            self.control.move(f"addr 2001:db8:7::{i:x}", "b1")
        run = yield self.run_ctl("--json", "show")
        page = run.json()
        self.assertEqual((len(page["rows"]), page["total"], page["offset"], page["limit"]),
                         (100, 153, 0, 100))  # fmt: skip
        run = yield self.run_ctl("show", "--offset", "100")
        lines = run.out.splitlines()
        self.assertEqual(len(lines), 1 + 53 + 1)
        self.assertEqual(lines[-1], "(53 of 153 bindings shown, from offset 100)")
        run = yield self.run_ctl("show", "--limit", "10", "--offset", "20")
        self.assertEqual(run.out.splitlines()[-1],
                         "(10 of 153 bindings shown, from offset 20; the next page starts at "
                         "offset 30)")  # fmt: skip
        run = yield self.run_ctl("show", "--limit", "10001")
        self.assertEqual(run.code, 1)
        self.assertIn("limit must be an integer from 0 to 10000", run.err)

    @defer.inlineCallbacks
    def test_answers_keep_the_order_of_requests(self) -> Any:
        """A show (answered after the reactor turns) and a stats sent together come back
        in the order they were asked."""
        answer = yield threads.deferToThread(
            self.raw, b'{"command": "show"}\n{"command": "stats"}\n{"command": "info"}\n'
        )
        lines = [json.loads(line) for line in answer.splitlines()]
        self.assertIn("rows", lines[0]["result"])
        self.assertIn("packets_in", lines[1]["result"])
        self.assertIn("version", lines[2]["result"])

    @defer.inlineCallbacks
    def test_weight_undrain_info(self) -> Any:
        """weight and undrain change the running weight; info shows the override."""
        run = yield self.run_ctl("weight", "b1", "7")
        self.assertEqual((run.code, run.out),
                         (0, "b1: weight 7 (operator override; the file says 1)\n"), run.err)
        self.assertEqual(self.balancer.backends["b1"].weight, 7)
        run = yield self.run_ctl("--json", "info")
        self.assertEqual(run.json()["weight_overrides"], {"b1": 7})
        self.assertEqual(run.json()["offload"], "none")
        run = yield self.run_ctl("info")
        self.assertIn("weight_overrides: b1=7\n", run.out)
        run = yield self.run_ctl("drain", "b1")
        self.assertIn("undrain b1 undoes it", run.out)
        run = yield self.run_ctl("undrain", "b1")
        self.assertEqual(run.out, "b1: weight 1 (the configuration file's)\n")
        self.assertEqual(self.balancer.backends["b1"].weight, 1)
        run = yield self.run_ctl("weight", "b1", "1001")
        self.assertEqual(run.code, 1)
        self.assertIn("0..1000", run.err)
        run = yield self.run_ctl("weight", "b1", "x")
        self.assertEqual(run.code, 2)

    @defer.inlineCallbacks
    def test_unknown_command(self) -> Any:
        """The client rejects an unknown command; the server too, naming the known ones."""
        run = yield self.run_ctl("explode")
        self.assertEqual(run.code, 2)
        self.assertIn("invalid choice", run.err)
        answer = yield threads.deferToThread(
            self.raw, b'{"command": "explode"}\n{"nonsense\n{"command": "stats"}\n'
        )
        lines = [json.loads(line) for line in answer.splitlines()]
        self.assertEqual(lines[0]["ok"], False)
        self.assertIn("unknown command 'explode'", lines[0]["error"])
        self.assertIn("show", lines[0]["error"])
        self.assertEqual(lines[1], {"ok": False, "error": "request is not JSON"})
        self.assertEqual(lines[2]["ok"], True)

    def raw(self, data: bytes) -> str:
        """Send raw bytes, read three answer lines."""
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
            sock.settimeout(10)
            sock.connect(self.path)
            sock.sendall(data)
            buf = b""
            while buf.count(b"\n") < 3:
                chunk = sock.recv(65536)
                if not chunk:
                    break
                buf += chunk
        return buf.decode()

    @defer.inlineCallbacks
    def test_permission_denied_for_other_users(self) -> Any:
        """A non-root user (nobody) cannot reach the socket and is told so clearly."""
        if os.geteuid() != 0:
            raise self.failureException("run as root: the test switches to user nobody")
        read_end, write_end = os.pipe()
        pid = os.fork()
        if pid == 0:  # child: become nobody, try the socket, report, exit at once
            try:
                os.close(read_end)
                os.setgroups([])
                os.setgid(65534)
                os.setuid(65534)
                try:
                    ctl.request(self.path, "stats", {}, timeout=5)
                    message = "connected"
                except ctl.ClientError as exc:
                    message = str(exc)
                os.write(write_end, message.encode())
            finally:
                os._exit(0)
        os.close(write_end)

        def collect() -> str:
            with os.fdopen(read_end, "rb") as handle:
                data = handle.read()
            os.waitpid(pid, 0)
            return data.decode()

        message = yield threads.deferToThread(collect)
        self.assertIn("permission denied", message)
        self.assertIn(self.path, message)


class ClientErrorTests(SynchronousTestCase):
    def test_missing_socket(self) -> None:
        """No socket: exit 2 and a message saying so and naming the path."""
        out, err = io.StringIO(), io.StringIO()
        path = os.path.abspath(self.mktemp())
        code = ctl.main(["--socket", path, "stats"], out, err)
        self.assertEqual(code, 2)
        self.assertIn(f"no control socket at {path}", err.getvalue())
        self.assertEqual(out.getvalue(), "")

    def test_stale_socket(self) -> None:
        """A socket file nobody listens on: exit 2, 'stale socket'."""
        path = os.path.abspath(self.mktemp())
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.bind(path)
        sock.close()
        err = io.StringIO()
        self.assertEqual(ctl.main(["--socket", path, "stats"], io.StringIO(), err), 2)
        self.assertIn("stale socket", err.getvalue())

    def test_usage_errors(self) -> None:
        """Missing arguments are usage errors (exit 2) reported on the given stream."""
        err = io.StringIO()
        self.assertEqual(ctl.main(["move", "b1"], io.StringIO(), err), 2)
        self.assertIn("usage: lbproxyctl", err.getvalue())




class SocketDirectoryTests(SynchronousTestCase):
    """The control socket's directory: created 0700 when missing, never changed when it
    exists, refused when unsafe (the start-up checks' rule)."""

    def directory(self, mode: int) -> str:
        directory = os.path.abspath(self.mktemp())
        os.makedirs(directory)
        os.chmod(directory, mode)
        return directory

    def test_missing_directories_are_created_private(self) -> None:
        """Missing directories (parents too) are made mode 0700 whatever the umask."""
        base = self.directory(0o755)
        path = os.path.join(base, "a", "b", "ctl.sock")
        old = os.umask(0)
        try:
            created = ctl.prepare_socket_directory(path)
        finally:
            os.umask(old)
        self.assertEqual(created, [os.path.join(base, "a"), os.path.join(base, "a", "b")])
        for directory in created:
            self.assertEqual(stat.S_IMODE(os.stat(directory).st_mode), 0o700)
        self.assertEqual(stat.S_IMODE(os.stat(base).st_mode), 0o755)

    def test_an_existing_safe_directory_is_left_as_it_is(self) -> None:
        """A shared parent like /run (0755, ours) is used and not changed."""
        for mode in (0o755, 0o750, 0o711):
            directory = self.directory(mode)
            self.assertEqual(ctl.prepare_socket_directory(os.path.join(directory, "s")), [])
            self.assertEqual(stat.S_IMODE(os.stat(directory).st_mode), mode)

    def test_writable_by_others_is_refused_and_unchanged(self) -> None:
        """World- or group-writable, sticky or not: refused, naming the directory and the
        mode, and left as it was."""
        for mode in (0o777, 0o1777, 0o775, 0o757):
            directory = self.directory(mode)
            error = self.assertRaises(ctl.UnsafeSocketPathError, ctl.prepare_socket_directory,
                                      os.path.join(directory, "s"))  # fmt: skip
            self.assertIn(f"{directory} is writable by others (mode {mode:04o})", str(error))
            self.assertEqual(stat.S_IMODE(os.stat(directory).st_mode), mode)

    def test_another_users_directory_is_refused(self) -> None:
        """A directory owned by someone else (nobody) is refused and not changed."""
        if os.geteuid() != 0:
            raise self.failureException("run as root: the test gives a directory to nobody")
        directory = self.directory(0o755)
        os.chown(directory, 65534, 65534)
        error = self.assertRaises(ctl.UnsafeSocketPathError, ctl.prepare_socket_directory,
                                  os.path.join(directory, "s"))  # fmt: skip
        self.assertIn("belongs to uid 65534", str(error))
        self.assertEqual(os.stat(directory).st_uid, 65534)

    def test_something_else_at_the_path_is_refused(self) -> None:
        """A regular file where the socket goes is not replaced."""
        directory = self.directory(0o700)
        path = os.path.join(directory, "s")
        with open(path, "w") as f:
            f.write("precious")
        error = self.assertRaises(ctl.UnsafeSocketPathError, ctl.prepare_socket_directory, path)
        self.assertIn("is not a socket", str(error))
        with open(path) as f:
            self.assertEqual(f.read(), "precious")

    def test_the_service_refuses_to_start(self) -> None:
        """The listening service refuses an unsafe directory before it listens."""
        directory = self.directory(0o777)
        control = Control(real_populated()[0])
        service = ctl.make_ctl_service(os.path.join(directory, "s"), control, REACTOR)
        self.assertRaises(ctl.UnsafeSocketPathError, service.privilegedStartService)
        self.assertFalse(os.path.exists(os.path.join(directory, "s")))
