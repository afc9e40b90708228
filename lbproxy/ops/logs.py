"""The log format: twistd's text lines (the default) or one JSON object per line.

Why a module of its own: twistd chooses the log observer before the service tree runs,
from its own options (``--logfile``, ``--logger``), while the format is a key of
lbproxy's configuration file (``[logging] format``).  `use_json` bridges the two: called
while ``twistd lbproxy``'s options are parsed, it points twistd's ``--logger`` option at
`json_observer` (unless the operator gave ``--logger`` already), with the destination
twistd would have used for text: standard output under ``--nodaemon`` without
``--logfile`` (journald, a container runtime), otherwise the log file.

Each JSON line has ``time`` (ISO 8601, UTC), ``level``, ``namespace``, ``message`` (the
text the text format would show), ``traceback`` when a failure was logged, and for audit
lines (`lbproxy.ops.audit`) ``audit`` with ``who``, ``action`` and the details::

    {"time": "2025-01-01T12:00:00.000000+00:00", "level": "info",
     "namespace": "lbproxy.audit", "message": "audit: who=SIGHUP action=reload ...",
     "audit": {"who": "SIGHUP", "action": "reload", ...}}      (one line in the log)

The format is read at start: changing it needs a restart (reload says so).
"""

from __future__ import annotations

import datetime
import json
import sys
from collections.abc import Mapping
from typing import IO, Any

from twisted.logger import FileLogObserver, ILogObserver, formatEvent

__all__ = ["JSON_OBSERVER", "format_json", "json_observer", "use_json"]

#: The fully qualified name twistd's ``--logger`` option resolves to `json_observer`.
JSON_OBSERVER = "lbproxy.ops.logs.json_observer"

# Where json_observer writes: "-" for standard output, else a file name.
_destination: str = "-"


def use_json(twistd_options: Any) -> bool:
    """Make twistd log JSON lines: set its ``logger`` option (a name it resolves after
    our options are parsed).  ``twistd_options`` is twistd's own `ServerOptions` (our
    options' ``parent``); False, changing nothing, when there is none or the operator
    chose a ``--logger`` already."""
    global _destination
    if twistd_options is None or twistd_options.get("logger"):
        return False
    logfile = twistd_options.get("logfile")
    nodaemon = twistd_options.get("nodaemon", True)
    to_stdout = logfile == "-" or (not logfile and nodaemon)
    _destination = "-" if to_stdout else logfile or "twistd.log"
    twistd_options["logger"] = JSON_OBSERVER
    return True


def json_observer(out: IO[str] | None = None) -> ILogObserver:
    """An observer writing `format_json` lines to ``out`` (default: where `use_json`
    said: standard output or the log file, opened for appending)."""
    if out is None:
        out = sys.stdout if _destination == "-" else open(  # noqa: SIM115 (lives as long as the log)
            _destination, "a", encoding="utf-8"
        )
    return FileLogObserver(out, format_json)


def format_json(event: Mapping[str, Any]) -> str:
    """One event as one JSON line (newline included)."""
    when = event.get("log_time")
    level = event.get("log_level")
    record: dict[str, Any] = {
        "time": (
            datetime.datetime.fromtimestamp(when, datetime.UTC).isoformat()
            if isinstance(when, int | float) else None
        ),
        "level": getattr(level, "name", None),
        "namespace": event.get("log_namespace"),
        "message": formatEvent(dict(event)),
    }
    failure = event.get("log_failure")
    if failure is not None:
        try:
            record["traceback"] = failure.getTraceback()
        except Exception:  # a failure that cannot print itself still leaves a line
            record["traceback"] = repr(failure)
    if "audit_who" in event:
        record["audit"] = {
            "who": event.get("audit_who"),
            "action": event.get("audit_action"),
            **dict(event.get("audit_details") or {}),
        }
    return json.dumps(record, default=str, ensure_ascii=False) + "\n"
