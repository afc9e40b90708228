"""Reload: every section changed in turn, the answer checked against what runs afterwards.

The balancer is `lbproxy.tap.BalancerService` with the in-memory packet system (no raw
sockets needed); the control socket, metrics and manhole listeners are real sockets on
loopback, reached with the real ``lbproxyctl`` request code, HTTP and SSH clients.  For
each change the answer must list applied / needs a restart / ignored truthfully, the
running objects must agree with it, and ``info`` must name what still differs from the
file on disk.  The real ``twistd`` is exercised in tests/test_quiet_logs.py.
"""

from __future__ import annotations

import ipaddress
import json
import os
import shutil
import socket
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any, cast

import attrs
from cryptography.hazmat.primitives.asymmetric import ed25519
from twisted.conch.ssh import keys
from twisted.internet import defer, error, reactor, threads
from twisted.internet.testing import MemoryReactorClock
from twisted.trial.unittest import SynchronousTestCase, TestCase
from twisted.web.client import Agent, readBody

from lbproxy.config import Config, ConfigError, load_config
from lbproxy.core.keys import Key
from lbproxy.core.selection import LeastLoaded, RoundRobin
from lbproxy.ops import ctl
from lbproxy.ops.reload import FIELDS, ReloadRefusedError, ReloadReport
from lbproxy.tap import BalancerService
from lbproxy.testing import MemoryPacketSystem
from tests.test_audit import AuditCapture
from tests.test_preflight import FakeHost

REACTOR: Any = reactor


def render(sections: dict[str, dict[str, Any]], backends: list[dict[str, Any]]) -> str:
    """A configuration file from sections (key -> value) and backend tables."""

    def value(v: Any) -> str:
        if isinstance(v, bool):
            return "true" if v else "false"
        if isinstance(v, list | tuple):
            return "[" + ", ".join(value(x) for x in v) + "]"
        if isinstance(v, str):
            return json.dumps(v)
        return repr(v)

    lines = []
    for name, table in sections.items():
        lines.append(f"[{name}]")
        lines += [f"{k} = {value(v)}" for k, v in table.items()]
    for b in backends:
        lines.append("[[backend]]")
        lines += [f"{k} = {value(v)}" for k, v in b.items()]
    return "\n".join(lines) + "\n"


def base() -> tuple[dict[str, dict[str, Any]], list[dict[str, Any]]]:
    return (
        {
            "balancer": {"mode": "translate", "key_chain": ["hoa", "src"],
                         "scheduler": "round_robin"},
            "virtual": {"addresses": ["2001:db8:5::80"], "ports": [80]},
            "interfaces": {"client": "lbc", "server": "lbs"},
            "health": {"interval": 2.0},
        },
        [
            {"name": "a", "address": "2001:db8:b0::10"},
            {"name": "b", "address": "2001:db8:b0::11", "weight": 2},
        ],
    )  # fmt: skip


class FieldTableTests(SynchronousTestCase):
    def test_every_configuration_field_has_a_reload_rule(self) -> None:
        """No field of Config is silently ignored by reload: each is in FIELDS, once."""
        names = {f.name for f in attrs.fields(Config)} - {"path"}
        self.assertEqual(names - {f.name for f in FIELDS}, set())
        self.assertEqual(len({f.name for f in FIELDS}), len(FIELDS))
        self.assertEqual(len({f.key for f in FIELDS}), len(FIELDS))


Mutation = Callable[[dict[str, dict[str, Any]], list[dict[str, Any]]], None]
Check = Callable[["SectionTests", BalancerService], None]


def _set(section: str, key: str, value: Any) -> Mutation:
    def mutate(sections: dict[str, dict[str, Any]], backends: list[dict[str, Any]]) -> None:
        sections.setdefault(section, {})[key] = value

    return mutate


def _backends(change: Callable[[list[dict[str, Any]]], None]) -> Mutation:
    def mutate(sections: dict[str, dict[str, Any]], backends: list[dict[str, Any]]) -> None:
        change(backends)

    return mutate


# (what, mutation, applied, needs a restart, check of the running objects)
CASES: list[tuple[str, Mutation, tuple[str, ...], tuple[str, ...], Check]] = [
    ("virtual addresses", _set("virtual", "addresses", ["2001:db8:5::80", "2001:db8:5::81"]),
     ("virtual.addresses",), (),
     lambda t, s: t.assertEqual(s.forwarder.client.destinations,
                                tuple(ipaddress.IPv6Address(f"2001:db8:5::8{i}").packed
                                      for i in (0, 1)))),
    ("virtual ports", _set("virtual", "ports", [80, 443]), ("virtual.ports",), (),
     lambda t, s: t.assertEqual(s.balancer.ports, frozenset({80, 443}))),
    ("a backend added", _backends(lambda b: b.append({"name": "c",
                                                      "address": "2001:db8:b0::12"})),
     ("backend (added c)",), (),
     lambda t, s: t.assertEqual(sorted(s.balancer.backends), ["a", "b", "c"])),
    ("a backend removed", _backends(lambda b: b.__delitem__(0)), ("backend (removed a)",), (),
     lambda t, s: t.assertEqual(sorted(s.balancer.backends), ["b"])),
    ("a weight", _backends(lambda b: b[1].update(weight=5)), ("backend (b weight 2 -> 5)",),
     (), lambda t, s: t.assertEqual(s.balancer.backends["b"].weight, 5)),
    ("a health check", _backends(lambda b: b[0].update(health="tcp", health_port=80)),
     ("backend (a health none -> tcp:80)",), (),
     lambda t, s: t.assertEqual(sorted(s.health.probes) if s.health else [], ["a"])),
    ("the key chain", _set("balancer", "key_chain", ["hoa", "iid", "src"]),
     ("balancer.key_chain",), (),
     lambda t, s: t.assertEqual([x.kind for x in s.balancer.chain.strategies],
                                ["hoa", "iid", "src"])),
    ("any_interface_id", _set("balancer", "any_interface_id", True),
     ("balancer.any_interface_id",), (), lambda t, s: None),
    ("the scheduler", _set("balancer", "scheduler", "least_loaded"), ("balancer.scheduler",),
     (), lambda t, s: t.assertIsInstance(s.balancer.scheduler, LeastLoaded)),
    ("[health]", _set("health", "dead_backend", "keep"), ("health",), (),
     lambda t, s: t.assertFalse(s.balancer.reassign_dead)),
    ("interfaces.client", _set("interfaces", "client", "eth0"), (), ("interfaces.client",),
     lambda t, s: t.assertEqual(s.forwarder.client.interface, "lbc")),
    ("mode", _set("balancer", "mode", "transparent"), (), ("balancer.mode",),
     lambda t, s: t.assertEqual(s.balancer.mode, "translate")),
    ("lifetime", _set("balancer", "lifetime", 60.0), (), ("balancer.lifetime",),
     lambda t, s: t.assertEqual(s.balancer.table.lifetime, 300.0)),
    ("max_entries", _set("balancer", "max_entries", 5000), (), ("balancer.max_entries",),
     lambda t, s: t.assertEqual(s.balancer.table.max_entries, 1_000_000)),
    ("sweep_interval", _set("balancer", "sweep_interval", 0.5), (),
     ("balancer.sweep_interval",), lambda t, s: None),
    ("batch", _set("balancer", "batch", 64), (), ("balancer.batch",), lambda t, s: None),
    ("link_send", _set("balancer", "link_send", False), (), ("balancer.link_send",),
     lambda t, s: None),
    ("[notify]", _set("notify", "max_subscriptions", 5), (), ("notify.max_subscriptions",),
     lambda t, s: t.assertIsNone(s.notifier)),
    ("[logging]", _set("logging", "format", "json"), (), ("logging.format",),
     lambda t, s: None),
    ("[fleet]", _set("fleet", "prefix", "other:"), (), ("fleet",),
     lambda t, s: t.assertIsNone(s.fleet)),
]  # fmt: skip
if "offload" in attrs.fields_dict(Config):  # [balancer] offload (the XDP executor)
    CASES.append(("offload", _set("balancer", "offload", "none"), (), ("balancer.offload",),
                  lambda t, s: None))


class SectionTests(SynchronousTestCase):
    """Each change alone, in memory: the answer, the running objects, info, honesty."""

    def make(self, text: str) -> tuple[BalancerService, str]:
        path = os.path.abspath(self.mktemp())
        Path(path).write_text(text)
        system = MemoryPacketSystem(interfaces=("lbc", "lbs"))
        service = BalancerService(load_config(path), MemoryReactorClock(), install_sighup=False,
                                  system=system, host=FakeHost())  # fmt: skip
        service.startService()
        self.addCleanup(service.stopService)
        return service, path

    def reload(self, service: BalancerService, who: str = "test") -> ReloadReport:
        report: ReloadReport = self.successResultOf(service.reload(who))
        return report

    def test_each_section_in_turn(self) -> None:
        """For every case: applied and restart exactly as listed, nothing else; the
        running objects agree; info names the restart keys as pending; a second reload
        of the same file applies nothing and still names them."""
        for what, mutate, applied, restart, check in CASES:
            sections, backends = base()
            service, path = self.make(render(sections, backends))
            self.assertEqual(str(self.reload(service)), "nothing changed", what)
            mutate(sections, backends)
            Path(path).write_text(render(sections, backends))
            report = self.reload(service)
            self.assertEqual((report.applied, report.restart, report.ignored, report.failed),
                             (applied, restart, (), ()), what)  # fmt: skip
            check(self, service)
            info = service.control.info()
            self.assertEqual(info["pending_restart"], [k.split(" ")[0] for k in restart], what)
            self.assertEqual(info["pending_reload"], [], what)
            again = self.reload(service)
            self.assertEqual((again.applied, again.restart), ((), restart), what)

    def test_mode_change_stays_pending_until_restart(self) -> None:
        """The issue's case: after a reload that changes mode, reloading the same file
        again still says mode needs a restart, and the audit lines say so each time."""
        sections, backends = base()
        service, path = self.make(render(sections, backends))
        capture = AuditCapture(self)
        sections["balancer"]["mode"] = "transparent"
        Path(path).write_text(render(sections, backends))
        for _ in range(3):
            self.assertEqual(str(self.reload(service, "SIGHUP")),
                             "needs a restart: balancer.mode")
        self.assertEqual(service.balancer.mode, "translate")
        self.assertEqual(service.config.mode, "translate")
        self.assertEqual(service.control.info()["pending_restart"], ["balancer.mode"])
        self.assertEqual(capture.lines, [
            f'audit: who=SIGHUP action=reload config={path} result="needs a restart: '
            'balancer.mode"'] * 3)  # fmt: skip

    def test_operator_weights_survive_a_reload(self) -> None:
        """A drain survives a reload that changes other things; a reload changing the
        drained backend's file weight says it ignored it; undrain brings the file's
        weight back; other backends follow the file."""
        sections, backends = base()
        service, path = self.make(render(sections, backends))
        service.control.drain("b", who="op")
        backends[0]["weight"] = 3
        Path(path).write_text(render(sections, backends))
        report = self.reload(service)
        self.assertEqual(report.applied, ("backend (a weight 1 -> 3)",))
        self.assertEqual(report.ignored, ())
        self.assertEqual({n: b.weight for n, b in service.balancer.backends.items()},
                         {"a": 3, "b": 0})  # fmt: skip
        backends[1]["weight"] = 7
        Path(path).write_text(render(sections, backends))
        report = self.reload(service)
        self.assertEqual((report.applied, report.ignored),
                         ((), ("backend b weight 7 (the operator's 0 stays until undrain b)",)))
        self.assertEqual(service.balancer.backends["b"].weight, 0)
        self.assertEqual(service.control.info()["weight_overrides"], {"b": 0})
        service.control.undrain("b", who="op")
        self.assertEqual(service.balancer.backends["b"].weight, 7)
        self.assertEqual(str(self.reload(service)), "nothing changed")

    def test_bad_file_changes_nothing(self) -> None:
        """An invalid file, or one whose new manhole host key others may write, is
        refused whole: the backend change in the same file is not applied either."""
        sections, backends = base()
        service, path = self.make(render(sections, backends))
        backends.append({"name": "c", "address": "2001:db8:b0::12"})
        Path(path).write_text(render(sections, backends) + "[balancer2]\n")
        failure = self.failureResultOf(service.reload(), ConfigError)
        self.assertIn("balancer2", str(failure.value))
        directory = os.path.abspath(self.mktemp())
        os.makedirs(directory)
        host_key = os.path.join(directory, "host_key")
        Path(host_key).write_bytes(keys.Key(ed25519.Ed25519PrivateKey.generate())
                                   .toString("OPENSSH"))  # fmt: skip
        os.chmod(host_key, 0o666)
        authorized = os.path.join(directory, "authorized_keys")
        Path(authorized).write_text("")
        sections["manhole"] = {"endpoint": r"tcp6:0:interface=\:\:1",
                               "authorized_keys": authorized, "host_key": host_key}
        Path(path).write_text(render(sections, backends))
        failure = self.failureResultOf(service.reload(), ReloadRefusedError)
        self.assertIn(f"{path}: manhole.host_key: {host_key}: writable by others",
                      str(failure.value))  # fmt: skip
        self.assertEqual(sorted(service.balancer.backends), ["a", "b"])
        self.assertIsNone(service.manhole)
        self.assertEqual(service.config.manhole_endpoint, "")

    def test_persistence_moves_without_restoring(self) -> None:
        """Enabling persistence by reload saves the running table at once and does not
        restore an old file there; a new interval is used; disabling saves a last time."""
        sections, backends = base()
        service, path = self.make(render(sections, backends))
        clock: MemoryReactorClock = service.reactor
        directory = os.path.abspath(self.mktemp())
        table = os.path.join(directory, "sub", "table.jsonl")
        key = Key("addr", ipaddress.IPv6Address("2001:db8:100::1").packed)
        service.control.move(str(key), "a")
        sections["persistence"] = {"path": table, "interval": 10}
        Path(path).write_text(render(sections, backends))
        report = self.reload(service)
        self.assertEqual(report.applied, ("persistence.path", "persistence.interval"))
        self.assertEqual(os.stat(os.path.dirname(table)).st_mode & 0o777, 0o700)
        saved = Path(table).read_text()
        self.assertIn("2001:db8:100::1", saved)
        # The next reload moves it; the old file at the new place is not restored.
        other = os.path.join(directory, "other.jsonl")
        Path(other).write_text(saved.replace("2001:db8:100::1", "2001:db8:100::2"))
        service.control.forget(str(key))
        sections["persistence"] = {"path": other, "interval": 5}
        Path(path).write_text(render(sections, backends))
        self.assertEqual(self.reload(service).applied,
                         ("persistence.path", "persistence.interval"))
        self.assertEqual(len(service.balancer.table), 0)
        self.assertNotIn("2001:db8:100::2", Path(other).read_text())
        service.control.move(str(key), "b")
        clock.advance(5)
        self.assertIn("2001:db8:100::1", Path(other).read_text())
        assert service.persistence is not None
        self.assertIs(service.services[0], service.persistence)
        del sections["persistence"]
        service.control.forget(str(key))
        Path(path).write_text(render(sections, backends))
        self.reload(service)
        self.assertIsNone(service.persistence)
        self.assertNotIn("2001:db8:100::1", Path(other).read_text())  # saved on the way out


class SplitReactor:
    """The real reactor for sockets and time; the in-memory packet readers' made-up
    descriptors go to a memory reactor instead of the real one's poller."""

    def __init__(self) -> None:
        self.memory = MemoryReactorClock()

    def __getattr__(self, name: str) -> Any:
        return getattr(REACTOR, name)

    def addReader(self, reader: Any) -> None:
        self.memory.addReader(reader)

    def removeReader(self, reader: Any) -> None:
        self.memory.removeReader(reader)

    def addWriter(self, writer: Any) -> None:
        self.memory.addWriter(writer)

    def removeWriter(self, writer: Any) -> None:
        self.memory.removeWriter(writer)


def free_port() -> int:
    probe = socket.socket(socket.AF_INET6)
    probe.bind(("::1", 0))
    number: int = probe.getsockname()[1]
    probe.close()
    return number


class ListenerTests(TestCase):
    """[control], [metrics], [manhole]: replaced in place on real loopback sockets."""

    timeout = 60

    def setUp(self) -> None:
        # A short path: UNIX socket paths are limited to 107 bytes.
        self.directory = tempfile.mkdtemp(prefix="lbop-rl-")
        self.addCleanup(shutil.rmtree, self.directory, True)
        self.sections, self.backends = base()
        self.socket = os.path.join(self.directory, "run", "ctl.sock")
        self.sections["control"] = {"socket": self.socket}
        self.metrics_port = free_port()
        self.sections["metrics"] = {"endpoint": rf"tcp6:{self.metrics_port}:interface=\:\:1"}
        self.path = os.path.join(self.directory, "lbproxy.toml")
        self.write()
        self.service = BalancerService(load_config(self.path), SplitReactor(),
                                       install_sighup=False,
                                       system=MemoryPacketSystem(interfaces=("lbc", "lbs")),
                                       host=FakeHost())  # fmt: skip
        self.service.privilegedStartService()
        self.service.startService()
        self.addCleanup(self.service.stopService)

    def write(self) -> None:
        Path(self.path).write_text(render(self.sections, self.backends))

    def ctl(self, path: str, command: str, **args: Any) -> defer.Deferred[Any]:
        return threads.deferToThread(ctl.request, path, command, args, 10.0)

    @defer.inlineCallbacks
    def http(self, port: int, path: str) -> Any:
        response = yield Agent(REACTOR).request(b"GET", f"http://[::1]:{port}{path}".encode())
        body = yield readBody(response)
        return response.code, body

    @defer.inlineCallbacks
    def test_control_socket_moves(self) -> Any:
        """A reload asked for over the control socket that moves the socket: the answer
        comes back on the old connection, the old path is gone, the new one answers info,
        and info agrees with what runs (a mode change pending a restart)."""
        new = os.path.join(self.directory, "run2", "ctl.sock")
        self.sections["control"] = {"socket": new}
        self.sections["balancer"]["mode"] = "transparent"
        self.write()
        answer = yield self.ctl(self.socket, "reload")
        self.assertEqual(answer["applied"], ["control.socket"])
        self.assertEqual(answer["restart"], ["balancer.mode"])
        self.assertFalse(os.path.exists(self.socket))
        info = yield self.ctl(new, "info")
        self.assertEqual((info["mode"], info["pending_restart"], info["pending_reload"]),
                         ("translate", ["balancer.mode"], []))  # fmt: skip
        self.assertEqual(os.stat(os.path.dirname(new)).st_mode & 0o777, 0o700)

    @defer.inlineCallbacks
    def test_metrics_endpoint_moves_and_a_busy_port_fails_honestly(self) -> Any:
        """The metrics endpoint moves to a new port (the old one stops answering); a
        port already taken is reported as failed, the old endpoint is back, and info
        says the file's endpoint is still to be applied."""
        code, body = yield self.http(self.metrics_port, "/healthz")
        self.assertEqual((code, json.loads(body)["status"]), (200, "ok"))
        moved = free_port()
        self.sections["metrics"] = {"endpoint": rf"tcp6:{moved}:interface=\:\:1"}
        self.write()
        report = yield self.service.reload("test")
        self.assertEqual(report.applied, ("metrics.endpoint",))
        code, _ = yield self.http(moved, "/metrics")
        self.assertEqual(code, 200)
        with self.assertRaises(error.ConnectionRefusedError):
            yield self.http(self.metrics_port, "/metrics")
        busy = socket.socket(socket.AF_INET6)
        self.addCleanup(busy.close)
        busy.bind(("::1", 0))
        busy.listen(1)
        self.sections["metrics"] = {"endpoint": rf"tcp6:{busy.getsockname()[1]}:interface=\:\:1"}
        self.write()
        report = yield self.service.reload("test")
        self.assertEqual(report.applied, ())
        self.assertEqual(len(report.failed), 1)
        self.assertRegex(report.failed[0], r"^metrics \(.*[Aa]ddress already in use.*; the old "
                                           r"one is back\)$")  # fmt: skip
        code, _ = yield self.http(moved, "/metrics")
        self.assertEqual(code, 200)
        self.assertEqual(self.service.config.metrics_endpoint, rf"tcp6:{moved}:interface=\:\:1")
        info = yield self.ctl(self.socket, "info")
        self.assertEqual(info["pending_reload"], ["metrics.endpoint"])

    @defer.inlineCallbacks
    def test_manhole_enabled_moved_and_disabled(self) -> Any:
        """The manhole comes up by reload (SSH answers with the new host key), moves to
        another port, and goes away."""
        from tests.test_manhole import Client

        host_key = keys.Key(ed25519.Ed25519PrivateKey.generate())
        user_key = keys.Key(ed25519.Ed25519PrivateKey.generate())
        host_path = os.path.join(self.directory, "host_key")
        Path(host_path).write_bytes(host_key.toString("OPENSSH"))
        os.chmod(host_path, 0o600)
        authorized = os.path.join(self.directory, "authorized_keys")
        Path(authorized).write_bytes(user_key.public().toString("OPENSSH") + b"\n")
        for step in range(2):
            port = free_port()
            self.sections["manhole"] = {"endpoint": rf"tcp6:{port}:interface=\:\:1",
                                        "authorized_keys": authorized, "host_key": host_path}
            self.write()
            report = yield self.service.reload("test")
            expected = ("manhole.endpoint",) if step else (
                "manhole.endpoint", "manhole.authorized_keys", "manhole.host_key")
            self.assertEqual(report.applied, expected)
            client = Client(host_key, user_key)
            yield client.connect(port)
            yield client.wait_for(b">>> ")
            client.type("info()['mode']")
            yield client.wait_for(b"'translate'")
            yield client.close()
        del self.sections["manhole"]
        self.write()
        report = yield self.service.reload("test")
        self.assertEqual(report.applied, ("manhole.endpoint", "manhole.authorized_keys",
                                          "manhole.host_key"))  # fmt: skip
        self.assertIsNone(self.service.manhole)
        with self.assertRaises(error.ConnectionRefusedError):
            yield Client(host_key, user_key).connect(port)


class SighupTests(SynchronousTestCase):
    def test_sighup_is_audited_and_a_refusal_logged(self) -> None:
        """The SIGHUP path: one audit line naming SIGHUP; a bad file is one error line
        and nothing raises out of the reactor's call."""
        sections, backends = base()
        path = os.path.abspath(self.mktemp())
        Path(path).write_text(render(sections, backends))
        service = BalancerService(load_config(path), MemoryReactorClock(), install_sighup=False,
                                  system=MemoryPacketSystem(interfaces=("lbc", "lbs")),
                                  host=FakeHost())  # fmt: skip
        capture = AuditCapture(self)
        backends[1]["weight"] = 4
        Path(path).write_text(render(sections, backends))
        service._reload_logged()
        self.assertEqual(capture.lines, [f'audit: who=SIGHUP action=reload config={path} '
                                         'result="applied: backend (b weight 2 -> 4)"'])
        Path(path).write_text("nonsense = [\n")
        errors: list[str] = []
        from twisted.logger import ILogObserver, formatEvent, globalLogPublisher

        def observe(event: dict[str, Any]) -> None:
            if "reload refused" in event.get("log_format", ""):
                errors.append(formatEvent(event))

        observer = cast(ILogObserver, observe)
        globalLogPublisher.addObserver(observer)
        self.addCleanup(globalLogPublisher.removeObserver, observer)
        service._reload_logged()
        self.assertEqual(len(errors), 1)
        self.assertIn(f"(SIGHUP): {path}:", errors[0])
        self.assertEqual(len(capture.lines), 1)
        self.assertEqual(service.balancer.backends["b"].weight, 4)
        _ = RoundRobin  # the base configuration's scheduler
