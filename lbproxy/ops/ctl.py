"""Runtime control without Python: a line-JSON API on a UNIX socket, and ``lbproxyctl``.

Scripts and operators who do not want a Python console need the same verbs as
the manhole (show, trace, move, forget, drain, backends, stats, reload), as
HAProxy's runtime API gives them.  The socket is the access control: it is
created mode 0600 inside a directory only its owner (root) can enter, so only
root can speak to it.

The protocol is one JSON object per line each way::

    -> {"command": "move", "args": {"key": "hoa 2001:db8::16", "backend": "b2"}}
    <- {"ok": true, "result": {...}}
    <- {"ok": false, "error": "unknown backend 'b9' (known: b1, b2)"}

A connection may carry any number of requests.  Commands and their arguments:

========  ==========================================  ========================================
command   args                                        result
========  ==========================================  ========================================
show      filter, kind, backend, limit (optional)     {"rows": [...], "total": n}
trace     packet (hex)                                strategy, key, backend, hit, reason, aliases
move      key, backend                                the new row
forget    key                                         the removed row, or null
drain     backend                                     the backend
backends  -                                           [backend, ...]
stats     -                                           the counters
reload    -                                           the reload callable's answer, as text
========  ==========================================  ========================================

``main()`` is the ``lbproxyctl`` client: plain blocking sockets, text output
by default (the same tables as the manhole) or ``--json``.
"""

from __future__ import annotations

import argparse
import contextlib
import errno
import json
import os
import socket
import stat
import sys
from collections.abc import Callable, Mapping, Sequence
from typing import IO, Any

from twisted.application.internet import StreamServerEndpointService
from twisted.internet.defer import maybeDeferred
from twisted.internet.endpoints import UNIXServerEndpoint
from twisted.internet.protocol import Factory
from twisted.logger import Logger
from twisted.protocols.basic import LineOnlyReceiver
from twisted.python.failure import Failure

from lbproxy import __version__
from lbproxy.ops.control import (
    Control,
    OperatorError,
    format_backends,
    format_rows,
    format_stats,
)

DEFAULT_SOCKET = "/run/lbproxy/control.sock"
MAX_LINE = 1 << 20

log = Logger()


class CommandError(Exception):
    """A request the server refuses; ``str()`` goes back to the client."""


def _str_arg(args: Mapping[str, Any], name: str, required: bool = True) -> str | None:
    value = args.get(name)
    if value is None:
        if required:
            raise CommandError(f"missing argument {name!r}")
        return None
    if not isinstance(value, str):
        raise CommandError(f"argument {name!r} must be a string")
    return value


def _show(control: Control, args: Mapping[str, Any]) -> Any:
    limit = args.get("limit")
    if limit is not None and (not isinstance(limit, int) or limit < 0):
        raise CommandError("argument 'limit' must be a non-negative integer")
    rows = control.rows(
        _str_arg(args, "filter", False),
        kind=_str_arg(args, "kind", False),
        backend=_str_arg(args, "backend", False),
    )
    shown = rows if limit is None else rows[:limit]
    return {"rows": [r.as_dict() for r in shown], "total": len(rows)}


def _trace(control: Control, args: Mapping[str, Any]) -> Any:
    return control.trace_dict(_str_arg(args, "packet") or "")


def _move(control: Control, args: Mapping[str, Any]) -> Any:
    return control.move(_str_arg(args, "key") or "", _str_arg(args, "backend") or "").as_dict()


def _forget(control: Control, args: Mapping[str, Any]) -> Any:
    row = control.forget(_str_arg(args, "key") or "")
    return None if row is None else row.as_dict()


def _drain(control: Control, args: Mapping[str, Any]) -> Any:
    return control.drain(_str_arg(args, "backend") or "")


def _reload(control: Control, args: Mapping[str, Any]) -> Any:
    def refused(failure: Failure) -> Failure:
        # The operator sees the answer; the log must say it too (as for SIGHUP).
        if failure.check(ValueError):
            log.error(
                "reload refused, the running configuration stays: {error}",
                error=failure.value,
            )
        return failure

    def applied(result: object) -> str | None:
        log.info("reload (lbproxyctl): {outcome}", outcome=result)
        return None if result is None else str(result)

    return maybeDeferred(control.reload).addCallbacks(applied, refused)


COMMANDS: dict[str, Callable[[Control, Mapping[str, Any]], Any]] = {
    "show": _show,
    "trace": _trace,
    "move": _move,
    "forget": _forget,
    "drain": _drain,
    "backends": lambda control, args: control.backends(),
    "stats": lambda control, args: control.stats(),
    "reload": _reload,
}


class ControlProtocol(LineOnlyReceiver):
    """Serves one client connection: a JSON request per line, a JSON answer per line."""

    delimiter = b"\n"
    MAX_LENGTH = MAX_LINE

    def __init__(self, control: Control) -> None:
        self.control = control

    def lineReceived(self, line: bytes) -> None:
        """Answer one request (asynchronously when the command returns a Deferred)."""
        if not line.strip():
            return
        d = maybeDeferred(self._dispatch, line)
        d.addCallbacks(self._ok, self._error)

    def _dispatch(self, line: bytes) -> Any:
        try:
            request = json.loads(line)
        except ValueError:
            raise CommandError("request is not JSON") from None
        if not isinstance(request, dict) or not isinstance(request.get("command"), str):
            raise CommandError('request must be {"command": NAME, "args": {...}}')
        name = request["command"]
        args = request.get("args") or {}
        if not isinstance(args, dict):
            raise CommandError("args must be an object")
        command = COMMANDS.get(name)
        if command is None:
            raise CommandError(f"unknown command {name!r} (known: {', '.join(COMMANDS)})")
        return command(self.control, args)

    def _ok(self, result: Any) -> None:
        self._send({"ok": True, "result": result})

    def _error(self, failure: Failure) -> None:
        if failure.check(CommandError, OperatorError, ValueError):
            message = str(failure.value)
        else:
            log.failure("Control command failed", failure)
            message = f"internal error: {failure.getErrorMessage()}"
        self._send({"ok": False, "error": message})

    def _send(self, answer: Mapping[str, Any]) -> None:
        if self.transport is not None:
            self.sendLine(json.dumps(answer, default=str).encode("utf-8"))

    def lineLengthExceeded(self, line: bytes) -> None:
        """Refuse an oversized request and hang up."""
        self._send({"ok": False, "error": "request too long"})
        assert self.transport is not None
        self.transport.loseConnection()


class ControlFactory(Factory):
    """Builds a ``ControlProtocol`` per connection, all over one ``Control``."""

    def __init__(self, control: Control) -> None:
        self.control = control

    def buildProtocol(self, addr: Any) -> ControlProtocol:
        """A protocol for one client."""
        proto = ControlProtocol(self.control)
        proto.factory = self
        return proto


def prepare_socket_directory(path: str) -> None:
    """Make the socket's directory owner-only (0700), creating it if needed.

    Refuse to listen in a directory others may write to: they could replace
    the socket with their own.
    """
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, mode=0o700, exist_ok=True)
    info = os.stat(directory)
    if info.st_uid != os.geteuid():
        raise OSError(errno.EPERM, f"control socket directory {directory} is not ours")
    if info.st_mode & (stat.S_IWGRP | stat.S_IWOTH):
        raise OSError(errno.EPERM, f"control socket directory {directory} is writable by others")
    if info.st_mode & 0o077:
        os.chmod(directory, 0o700)


class ControlSocketService(StreamServerEndpointService):
    """Listens on the control socket; prepares its directory first."""

    def __init__(self, reactor: Any, path: str, control: Control) -> None:
        self.path = path
        endpoint = UNIXServerEndpoint(reactor, path, mode=0o600, wantPID=True)
        super().__init__(endpoint, ControlFactory(control))
        self._raiseSynchronously = True

    def privilegedStartService(self) -> None:
        """Create the directory, then listen (as root, before privileges drop)."""
        prepare_socket_directory(self.path)
        super().privilegedStartService()


def make_ctl_service(
    path: str,
    control: Control,
    reactor: Any = None,
) -> ControlSocketService:
    """The runtime API on the UNIX socket ``path`` over ``control``.

    ``control.reload_callable`` (``Control(reload=...)``) is what the
    ``reload`` command calls.
    """
    if reactor is None:
        from twisted.internet import reactor as default_reactor

        reactor = default_reactor
    return ControlSocketService(reactor, path, control)


# -- the lbproxyctl client ----------------------------------------------------


class ClientError(Exception):
    """A client-side failure (cannot reach the socket, bad answer)."""


def request(path: str, command: str, args: Mapping[str, Any], timeout: float = 10.0) -> Any:
    """Send one command to the socket at ``path``; return its result or raise.

    Raises ``ClientError`` when the socket cannot be used and ``CommandError``
    when the server refused the command.
    """
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.settimeout(timeout)
    try:
        try:
            sock.connect(path)
        except FileNotFoundError:
            raise ClientError(
                f"no control socket at {path} (is lbproxy running? see --socket)"
            ) from None
        except PermissionError:
            raise ClientError(
                f"permission denied on {path} (the control socket is for root only)"
            ) from None
        except ConnectionRefusedError:
            raise ClientError(
                f"nothing listens on {path} (stale socket; is lbproxy running?)"
            ) from None
        except OSError as exc:
            raise ClientError(f"cannot connect to {path}: {exc.strerror or exc}") from None
        line = json.dumps({"command": command, "args": dict(args)}) + "\n"
        sock.sendall(line.encode("utf-8"))
        buf = b""
        while not buf.endswith(b"\n"):
            try:
                chunk = sock.recv(65536)
            except TimeoutError:
                raise ClientError(f"no answer from {path} within {timeout:g} s") from None
            if not chunk:
                raise ClientError(f"{path} closed the connection without an answer")
            buf += chunk
    finally:
        sock.close()
    try:
        answer = json.loads(buf)
    except ValueError:
        raise ClientError("the server's answer is not JSON") from None
    if not isinstance(answer, dict) or "ok" not in answer:
        raise ClientError("the server's answer is not an lbproxy answer")
    if not answer["ok"]:
        raise CommandError(str(answer.get("error")))
    return answer.get("result")


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="lbproxyctl", description="Inspect and steer a running lbproxy."
    )
    parser.add_argument(
        "--socket",
        default=os.environ.get("LBPROXY_CTL_SOCKET", DEFAULT_SOCKET),
        help=f"control socket (default: $LBPROXY_CTL_SOCKET or {DEFAULT_SOCKET})",
    )
    parser.add_argument("--version", action="version", version=f"lbproxyctl {__version__}")
    parser.add_argument("--json", action="store_true", help="print the result as JSON")
    parser.add_argument("--timeout", type=float, default=10.0, help="seconds to wait")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    show = sub.add_parser("show", help="list bindings of the sticky table")
    show.add_argument("filter", nargs="?", help="key kind, backend name, or substring")
    show.add_argument("--kind", help="only this key kind (hoa, iid, spi, src)")
    show.add_argument("--backend", help="only bindings to this backend")
    show.add_argument("--limit", type=int, help="show at most this many rows")
    trace = sub.add_parser("trace", help="which key and backend a packet would get")
    trace.add_argument("packet", help="the IPv6 packet in hex, or - to read hex from stdin")
    move = sub.add_parser("move", help="bind a key to a backend")
    move.add_argument("key", nargs="+", help='key, e.g. "hoa 2001:db8::16"')
    move.add_argument("backend")
    forget = sub.add_parser("forget", help="remove a key's binding")
    forget.add_argument("key", nargs="+")
    drain = sub.add_parser("drain", help="no new bindings to a backend; existing ones stay")
    drain.add_argument("backend")
    sub.add_parser("backends", help="list backends with weight, health, bindings")
    sub.add_parser("stats", help="packet and table counters")
    sub.add_parser("reload", help="re-read the configuration")
    return parser


def _request_args(options: argparse.Namespace, stdin: IO[str]) -> dict[str, Any]:
    command = options.command
    if command == "show":
        return {
            name: getattr(options, name)
            for name in ("filter", "kind", "backend", "limit")
            if getattr(options, name) is not None
        }
    if command == "trace":
        packet = stdin.read() if options.packet == "-" else options.packet
        return {"packet": packet}
    if command in ("move", "forget"):
        args: dict[str, Any] = {"key": " ".join(options.key)}
        if command == "move":
            args["backend"] = options.backend
        return args
    if command == "drain":
        return {"backend": options.backend}
    return {}


def render(command: str, result: Any) -> str:
    """The text output of ``command`` for its ``result``."""
    if command == "show":
        return format_rows(result["rows"], total=result["total"])
    if command == "trace":
        lines = [
            f"{name}: {'-' if result[name] is None else result[name]}"
            for name in ("strategy", "key", "backend", "hit", "reason")
        ]
        lines.append(f"aliases: {', '.join(result.get('aliases') or ()) or '-'}")
        return "\n".join(lines)
    if command == "move":
        return f"{result['key']} -> {result['backend']}"
    if command == "forget":
        return "no such binding" if result is None else f"forgot {result['key']}"
    if command == "drain":
        return (
            f"{result['name']} drained: weight {result['weight']}, "
            f"{result['bindings']} existing bindings stay"
        )
    if command == "backends":
        return format_backends(result)
    if command == "stats":
        return format_stats(result)
    if command == "reload":
        return "reloaded" if not result else f"reloaded: {result}"
    return json.dumps(result)


def main(
    argv: Sequence[str] | None = None,
    stdout: IO[str] | None = None,
    stderr: IO[str] | None = None,
    stdin: IO[str] | None = None,
) -> int:
    """``lbproxyctl``: exit 0 on success, 1 when refused, 2 when unreachable or misused."""
    out = stdout if stdout is not None else sys.stdout
    err = stderr if stderr is not None else sys.stderr
    parser = _parser()
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            options = parser.parse_args(argv)
    except SystemExit as exc:
        return exc.code if isinstance(exc.code, int) else 2
    try:
        args = _request_args(options, stdin if stdin is not None else sys.stdin)
        result = request(options.socket, options.command, args, options.timeout)
    except ClientError as exc:
        err.write(f"lbproxyctl: {exc}\n")
        return 2
    except CommandError as exc:
        err.write(f"lbproxyctl: {options.command}: {exc}\n")
        return 1
    if options.json:
        out.write(json.dumps(result, indent=2, sort_keys=True) + "\n")
    else:
        out.write(render(options.command, result) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
