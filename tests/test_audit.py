"""lbproxy.ops.audit and lbproxy.ops.logs: audit lines one per change, one line each;
the JSON log format."""

from __future__ import annotations

import io
import json
import os
import re
from typing import Any, cast

from twisted.logger import ILogObserver, LogLevel, globalLogPublisher
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase

from lbproxy.ops import audit as audit_module
from lbproxy.ops import logs
from lbproxy.ops.audit import audit, format_audit, peer_who


class AuditCapture:
    """Collects the audit events logged while it is installed (``lines``: their text)."""

    def __init__(self, case: SynchronousTestCase) -> None:
        self.events: list[dict[str, Any]] = []
        observer = cast(ILogObserver, self.observe)
        globalLogPublisher.addObserver(observer)
        case.addCleanup(globalLogPublisher.removeObserver, observer)

    def observe(self, event: dict[str, Any]) -> None:
        if event.get("log_namespace") == audit_module.NAMESPACE:
            self.events.append(event)

    @property
    def lines(self) -> list[str]:
        return [str(e["audit_line"]) for e in self.events]


class FormatTests(SynchronousTestCase):
    def test_plain_and_quoted_values(self) -> None:
        """Plain words stay as they are; a value with spaces is a JSON string."""
        line = format_audit("SIGHUP", "move", {"key": "addr 2001:db8::1", "backend": "b2",
                                               "previous": None})  # fmt: skip
        self.assertEqual(line, 'audit: who=SIGHUP action=move key="addr 2001:db8::1" backend=b2')

    def test_values_cannot_span_lines_or_forge_fields(self) -> None:
        """A newline or an ``x=y`` inside a value stays inside one quoted word."""
        line = format_audit("manhole user=eve\naudit: who=root", "forget",
                            {"key": 'k" action=drain'})  # fmt: skip
        self.assertNotIn("\n", line)
        fields = re.findall(r' (\w+)=("(?:[^"\\]|\\.)*"|[^ "]+)', line)
        self.assertEqual([name for name, _ in fields], ["who", "action", "key"])
        self.assertEqual(json.loads(fields[0][1]), "manhole user=eve\naudit: who=root")
        self.assertEqual(json.loads(fields[2][1]), 'k" action=drain')

    def test_one_event_per_change_with_fields(self) -> None:
        """audit() logs one info event in the audit namespace carrying who, what and the
        details as fields, whose text is the line."""
        capture = AuditCapture(self)
        text = audit("lbproxyctl uid=0(root) pid=7", "weight", backend="b1", weight=3,
                     previous=1)  # fmt: skip
        self.assertEqual(len(capture.events), 1)
        event = capture.events[0]
        self.assertEqual(event["log_level"], LogLevel.info)
        self.assertEqual(event["audit_who"], "lbproxyctl uid=0(root) pid=7")
        self.assertEqual(event["audit_details"], {"backend": "b1", "weight": 3, "previous": 1})
        self.assertEqual(capture.lines, [text])
        self.assertEqual(text, 'audit: who="lbproxyctl uid=0(root) pid=7" action=weight '
                               "backend=b1 weight=3 previous=1")

    def test_peer_who(self) -> None:
        """The peer's uid with its user name when the host knows it; ? when unknown."""
        self.assertEqual(peer_who("lbproxyctl", 0, 42), "lbproxyctl uid=0(root) pid=42")
        self.assertEqual(peer_who("lbproxyctl", None), "lbproxyctl uid=?")
        self.assertEqual(peer_who("lbproxyctl", 4_000_000_000 - 7),
                         "lbproxyctl uid=3999999993")


class JsonLogTests(SynchronousTestCase):
    def test_event_as_one_json_line(self) -> None:
        """Each event is one line of JSON with time, level, namespace and the text."""
        line = logs.format_json({"log_format": "Backend {name} is {state}.", "name": "b1",
                                 "state": "down", "log_level": LogLevel.warn,
                                 "log_namespace": "lbproxy.ops.health",
                                 "log_time": 0.5})  # fmt: skip
        self.assertTrue(line.endswith("\n"))
        self.assertEqual(line.count("\n"), 1)
        record = json.loads(line)
        self.assertEqual(record, {"time": "1970-01-01T00:00:00.500000+00:00", "level": "warn",
                                  "namespace": "lbproxy.ops.health",
                                  "message": "Backend b1 is down."})  # fmt: skip

    def test_audit_and_failures(self) -> None:
        """Audit lines carry their parts; a failure carries its traceback (in one line)."""
        out = io.StringIO()
        observer = logs.json_observer(out)
        globalLogPublisher.addObserver(observer)
        self.addCleanup(globalLogPublisher.removeObserver, observer)
        audit("SIGHUP", "reload", result="nothing changed")
        try:
            1 / 0  # noqa: B018
        except ZeroDivisionError:
            from twisted.logger import Logger

            Logger(namespace="t").failure("it broke", Failure())
        self.flushLoggedErrors(ZeroDivisionError)
        records = [json.loads(line) for line in out.getvalue().splitlines()]
        audits = [r for r in records if r["namespace"] == "lbproxy.audit"]
        self.assertEqual(audits[0]["audit"], {"who": "SIGHUP", "action": "reload",
                                              "result": "nothing changed"})
        self.assertEqual(audits[0]["message"],
                         'audit: who=SIGHUP action=reload result="nothing changed"')
        broke = next(r for r in records if r["message"] == "it broke")
        self.assertIn("ZeroDivisionError", broke["traceback"])

    def test_use_json_points_twistd_at_the_observer(self) -> None:
        """With twistd's options, use_json sets its logger option by name, keeping the
        destination twistd would use; an operator's --logger wins."""
        options: dict[str, Any] = {"logger": None, "logfile": None, "nodaemon": True}
        self.assertTrue(logs.use_json(options))
        self.assertEqual(options["logger"], logs.JSON_OBSERVER)
        from twisted.python.reflect import namedAny

        self.assertIs(namedAny(options["logger"]), logs.json_observer)
        mine = {"logger": "my.observer", "logfile": None, "nodaemon": True}
        self.assertFalse(logs.use_json(mine))
        self.assertEqual(mine["logger"], "my.observer")
        self.assertFalse(logs.use_json(None))
        path = os.path.abspath(self.mktemp())
        self.assertTrue(logs.use_json({"logger": None, "logfile": path, "nodaemon": True}))
        observer = logs.json_observer()
        observer({"log_format": "hello", "log_level": LogLevel.info, "log_time": 1.0,
                  "log_namespace": "t"})  # fmt: skip
        with open(path) as f:
            self.assertEqual(json.loads(f.read())["message"], "hello")
        logs.use_json({"logger": None, "logfile": None, "nodaemon": True})  # back to stdout
