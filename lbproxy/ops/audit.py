"""Audit lines: one log line per change an operator (or a reload) makes, saying who and what.

Why a module of its own: the changes come through several doors -- ``lbproxyctl`` on the
control socket, the SSH manhole, ``SIGHUP`` -- and an operator reading the log after an
incident wants them in one shape, whichever door was used::

    audit: who="lbproxyctl uid=0(root) pid=4242" action=move key="addr 2001:db8:1::16"
           backend=b2 previous=b1                       (one line in the log)
    audit: who="manhole user=operator" action=drain backend=b1 weight=0 previous=1
    audit: who=SIGHUP action=reload applied="backend (added b3)" restart=balancer.mode

Every value is one ``name=value`` word; a value with spaces, quotes, ``=`` or control
characters is written as a JSON string, so a key or a file name can neither span lines
nor forge another field.  The event also carries the parts as fields (``audit_who``,
``audit_action``, ``audit_details``) for the JSON log format (`lbproxy.ops.logs`).
"""

from __future__ import annotations

import json
import pwd
import re
from typing import Any

from twisted.logger import Logger

__all__ = ["NAMESPACE", "audit", "format_audit", "peer_who"]

#: The log namespace of audit events (``log_namespace``).
NAMESPACE = "lbproxy.audit"

_log = Logger(namespace=NAMESPACE)
_PLAIN = re.compile(r"[A-Za-z0-9_.:/@+,()\[\]-]+")


def _word(value: object) -> str:
    """`value` as one word: as it is when plain, otherwise a JSON string."""
    if isinstance(value, list | tuple):
        value = ", ".join(str(v) for v in value)
    text = str(value)
    return text if _PLAIN.fullmatch(text) else json.dumps(text, ensure_ascii=True)


def format_audit(who: str, action: str, details: dict[str, Any]) -> str:
    """The text of an audit line (without the log's timestamp and namespace)."""
    words = [f"who={_word(who)}", f"action={_word(action)}"]
    words += [f"{name}={_word(value)}" for name, value in details.items() if value is not None]
    return "audit: " + " ".join(words)


def audit(who: str, action: str, **details: Any) -> str:
    """Log one audit line (level info, namespace ``lbproxy.audit``) and return its text.

    ``details`` keep their order; None values are left out.
    """
    line = format_audit(who, action, details)
    _log.info(
        "{audit_line}",
        audit_line=line,
        audit_who=who,
        audit_action=action,
        audit_details={k: v if isinstance(v, int | float | bool) else _plain(v)
                       for k, v in details.items() if v is not None},
    )
    return line


def _plain(value: object) -> object:
    if isinstance(value, list | tuple):
        return [str(v) for v in value]
    return str(value)


def peer_who(door: str, uid: int | None, pid: int | None = None) -> str:
    """Who is behind a UNIX socket: ``"lbproxyctl uid=0(root) pid=4242"`` (the user name
    when this host knows the uid); ``"lbproxyctl uid=?"`` when the kernel did not say."""
    if uid is None:
        return f"{door} uid=?"
    try:
        name = pwd.getpwuid(uid).pw_name
    except (KeyError, OverflowError):
        user = f"uid={uid}"
    else:
        user = f"uid={uid}({name})"
    return f"{door} {user}" + (f" pid={pid}" if pid is not None else "")
