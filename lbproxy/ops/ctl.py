"""Runtime control without Python: a line-JSON API on a UNIX socket, and ``lbproxyctl``.

Scripts and operators who do not want a Python console need the same verbs as
the manhole (show, trace, move, forget, weight, drain, undrain, backends, stats, info,
journey, reload), as HAProxy's runtime API gives them.  The socket is the access control: it is
created mode 0600, so only its owner (root, or the service's user) can speak to it, in a
directory that is created mode 0700 when missing.  An existing directory is never
changed: it is refused when it belongs to another user or others may write to it (they
could replace the socket), the rule the start-up checks apply (``lbproxy.preflight``).

Every change is logged as one audit line naming the peer: its uid (and pid), which the
kernel gives for a UNIX socket (``SO_PEERCRED``), so the log says who moved a terminal
even when several operators share the root account through sudo.

The protocol is one JSON object per line each way::

    -> {"command": "move", "args": {"key": "addr 2001:db8::16", "backend": "b2"}}
    <- {"ok": true, "result": {...}}
    <- {"ok": false, "error": "unknown backend 'b9' (known: b1, b2)"}

A connection may carry any number of requests.  Commands and their arguments:

========  ===========================================  =======================================
command   args                                         result
========  ===========================================  =======================================
show      filter, kind, backend, offset, limit         {"rows": [...], "total": n,
          (optional; limit 100 by default, 10000 max)  "offset": o, "limit": l}
trace     packet (hex)                                 strategy, key, backend, hit, reason,
                                                       aliases, xdp (would the XDP program
                                                       forward it, and why not; null
                                                       without it)
move      key, backend                                 the new row
forget    key                                          the removed row, or null
weight    backend, weight (0..1000)                    the backend
drain     backend                                      the backend
undrain   backend                                      the backend
backends  -                                            [backend, ...]
stats     -                                            the counters
cache     limit (optional; 100 by default, 10000 max)  the correspondent node's binding
                                                       cache: mode, size, entries
info      -                                            version, uptime, mode, offload, pending
                                                       restart, ...
notify    peer, limit (optional; 100 by default)       peers, states, subscriptions, last
                                                       reports, refusals by reason
fleet     key                                          the key as this balancer, the fleet's
                                                       store and Maglev see it
journey   key                                          the terminal's journey: identities,
                                                       backend, events (packets as hex)
reload    -                                            {"applied": [...], "restart": [...],
                                                       "ignored": [...], "failed": [...],
                                                       "summary": text}
========  ===========================================  =======================================

A page of ``show`` is chosen without building every row (`Control.scan`), a slice of the
table per reactor turn, so a table of 300,000 bindings neither stalls forwarding nor
sends megabytes; ``offset`` pages through it (the table changes between pages: a binding
made or gone meanwhile shifts the rest by one).

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
import struct
import sys
from collections.abc import Callable, Generator, Mapping, Sequence
from typing import IO, Any

from twisted.application.internet import StreamServerEndpointService
from twisted.internet.defer import Deferred, maybeDeferred
from twisted.internet.endpoints import UNIXServerEndpoint
from twisted.internet.protocol import Factory
from twisted.internet.task import Cooperator
from twisted.logger import Logger
from twisted.protocols.basic import LineOnlyReceiver
from twisted.python.failure import Failure

from lbproxy import __version__
from lbproxy.ops.audit import peer_who
from lbproxy.ops.control import (
    Control,
    OperatorError,
    Page,
    check_page,
    format_backends,
    format_info,
    format_rows,
    format_stats,
)
from lbproxy.ops.journeyview import format_journey, journey_frames, journey_svg
from lbproxy.ops.pcapng import write_pcapng
from lbproxy.preflight import make_private_directories

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


def _int_arg(args: Mapping[str, Any], name: str) -> int:
    value = args.get(name)
    if not isinstance(value, int) or isinstance(value, bool):
        raise CommandError(f"argument {name!r} must be an integer")
    return value


#: What a command gets: the control, its arguments, who asked, and a way to run a
#: `Control.scan` a slice per reactor turn.
Command = Callable[["Request"], Any]


class Request:
    """One request being served: what the command functions read."""

    def __init__(
        self,
        control: Control,
        args: Mapping[str, Any],
        who: str,
        drive: Callable[[Generator[None, None, Page]], Deferred[Page]],
    ) -> None:
        self.control = control
        self.args = args
        self.who = who
        self.drive = drive


def _show(request: Request) -> Any:
    args = request.args
    try:
        offset, limit = check_page(args.get("offset"), args.get("limit"))
    except OperatorError as e:
        raise CommandError(str(e)) from None
    scan = request.control.scan(
        _str_arg(args, "filter", False),
        kind=_str_arg(args, "kind", False),
        backend=_str_arg(args, "backend", False),
        offset=offset,
        limit=limit,
    )
    return request.drive(scan).addCallback(Page.as_dict)


def _trace(request: Request) -> Any:
    return request.control.trace_dict(_str_arg(request.args, "packet") or "")


def _move(request: Request) -> Any:
    args = request.args
    return request.control.move(
        _str_arg(args, "key") or "", _str_arg(args, "backend") or "", who=request.who
    ).as_dict()


def _forget(request: Request) -> Any:
    row = request.control.forget(_str_arg(request.args, "key") or "", who=request.who)
    return None if row is None else row.as_dict()


def _weight(request: Request) -> Any:
    args = request.args
    return request.control.weight(
        _str_arg(args, "backend") or "", _int_arg(args, "weight"), who=request.who
    )


def _drain(request: Request) -> Any:
    return request.control.drain(_str_arg(request.args, "backend") or "", who=request.who)


def _undrain(request: Request) -> Any:
    return request.control.undrain(_str_arg(request.args, "backend") or "", who=request.who)


def _reload(request: Request) -> Any:
    def answer(result: object) -> object:
        as_dict = getattr(result, "as_dict", None)
        if callable(as_dict):
            return as_dict()
        return None if result is None else str(result)

    return maybeDeferred(request.control.reload, who=request.who).addCallback(answer)


COMMANDS: dict[str, Command] = {
    "show": _show,
    "trace": _trace,
    "move": _move,
    "forget": _forget,
    "weight": _weight,
    "drain": _drain,
    "undrain": _undrain,
    "backends": lambda request: request.control.backends(),
    "stats": lambda request: request.control.stats(),
    "cache": lambda request: request.control.correspondent(
        limit=_int_arg(request.args, "limit") if "limit" in request.args else 100),
    "info": lambda request: request.control.info(),
    "notify": lambda request: request.control.notify(
        limit=_int_arg(request.args, "limit") if "limit" in request.args else 100,
        peer=_str_arg(request.args, "peer", required=False),
    ),
    "fleet": lambda request: request.control.fleet_view(_str_arg(request.args, "key") or ""),
    "journey": lambda request: request.control.journey(_str_arg(request.args, "key") or ""),
    "reload": _reload,
}


def peer_credentials(transport: object) -> tuple[int, int, int] | None:
    """(pid, uid, gid) of the process at the other end of a UNIX socket transport, as
    the kernel recorded them when it connected (``SO_PEERCRED``); None when the
    transport has no such socket."""
    get_handle = getattr(transport, "getHandle", None)
    if get_handle is None:
        return None
    try:
        handle = get_handle()
        if handle.family != socket.AF_UNIX:
            return None
        raw = handle.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    except (OSError, AttributeError):
        return None
    pid, uid, gid = struct.unpack("3i", raw)
    return pid, uid, gid


class ControlProtocol(LineOnlyReceiver):
    """Serves one client connection: a JSON request per line, a JSON answer per line."""

    delimiter = b"\n"
    MAX_LENGTH = MAX_LINE

    def __init__(self, control: Control, cooperator: Cooperator | None = None) -> None:
        self.control = control
        self.cooperator = cooperator if cooperator is not None else Cooperator()
        self.who = peer_who("lbproxyctl", None)
        # Answers go out in the order of the requests, also when one waits (show, reload).
        self._queue: Deferred[None] = Deferred()
        self._queue.callback(None)

    def connectionMade(self) -> None:
        """Learn who is at the other end (for the audit lines)."""
        credentials = peer_credentials(self.transport)
        if credentials is not None:
            pid, uid, _gid = credentials
            self.who = peer_who("lbproxyctl", uid, pid)

    def _drive(self, scan: Generator[None, None, Page]) -> Deferred[Page]:
        """Run a scan a slice per reactor turn; fire with its page."""
        pages: list[Page] = []

        def steps() -> Generator[None, None, None]:
            pages.append((yield from scan))

        return self.cooperator.cooperate(steps()).whenDone().addCallback(lambda _: pages[0])

    def lineReceived(self, line: bytes) -> None:
        """Answer one request (asynchronously when the command returns a Deferred), after
        the answers to the requests before it."""
        if not line.strip():
            return

        def answer(_: object) -> Deferred[None]:
            d = maybeDeferred(self._dispatch, line).addCallbacks(self._ok, self._error)
            return d.addErrback(lambda f: log.failure("Control answer failed", f))

        self._queue.addCallback(answer)

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
        return command(Request(self.control, args, self.who, self._drive))

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
    """Builds a ``ControlProtocol`` per connection, all over one ``Control``; scans run
    a slice per turn of ``reactor``."""

    noisy = False  # no "Starting factory" lines

    def __init__(self, control: Control, reactor: Any = None) -> None:
        self.control = control
        if reactor is None:
            self.cooperator = Cooperator()
        else:
            self.cooperator = Cooperator(scheduler=lambda work: reactor.callLater(0, work))

    def buildProtocol(self, addr: Any) -> ControlProtocol:
        """A protocol for one client."""
        proto = ControlProtocol(self.control, self.cooperator)
        proto.factory = self
        return proto


class UnsafeSocketPathError(OSError):
    """The control socket's directory (or what is at its path) is not safe to listen in;
    ``str()`` says which and why."""

    def __init__(self, message: str) -> None:
        super().__init__(errno.EPERM, message)
        self.message = message

    def __str__(self) -> str:
        return self.message


def prepare_socket_directory(path: str) -> list[str]:
    """Make sure the socket at ``path`` can be listened on safely; return the directories
    created.

    A missing directory (and its missing parents) is created with mode 0700.  An
    existing one is never changed (it may be ``/run``, shared by everything): it is
    refused (`UnsafeSocketPathError`) when it belongs to another user or others may write to
    it -- they could replace the socket with their own -- and so is something other than
    a socket at ``path``.  The same rule as the start-up checks (``lbproxy.preflight``).
    """
    directory = os.path.dirname(os.path.abspath(path))
    try:
        created = make_private_directories(directory)
    except OSError as e:
        raise UnsafeSocketPathError(
            f"cannot create the control socket directory {directory}: {e.strerror or e}"
        ) from None
    if not created:
        info = os.stat(directory)
        if info.st_uid != os.geteuid():
            raise UnsafeSocketPathError(
                f"the control socket directory {directory} belongs to uid {info.st_uid}, not "
                "to this process's user; its owner could replace the socket (use a "
                "directory of its own)"
            )
        if info.st_mode & (stat.S_IWGRP | stat.S_IWOTH):
            raise UnsafeSocketPathError(
                f"the control socket directory {directory} is writable by others (mode "
                f"{stat.S_IMODE(info.st_mode):04o}); they could replace the socket (use a "
                "directory of its own)"
            )
    try:
        existing = os.lstat(path)
    except FileNotFoundError:
        return created
    if not stat.S_ISSOCK(existing.st_mode):
        raise UnsafeSocketPathError(f"{path} exists and is not a socket; not replacing it")
    return created


class ControlSocketService(StreamServerEndpointService):
    """Listens on the control socket; prepares its directory first."""

    def __init__(self, reactor: Any, path: str, control: Control) -> None:
        self.path = path
        endpoint = UNIXServerEndpoint(reactor, path, mode=0o600, wantPID=True)
        super().__init__(endpoint, ControlFactory(control, reactor))
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
    show.add_argument("--kind",
                      help="only this key kind (addr, iid, spi, ike; hoa and src mean addr)")
    show.add_argument("--backend", help="only bindings to this backend")
    show.add_argument("--limit", type=int,
                      help="show at most this many rows (default 100, at most 10000)")
    show.add_argument("--offset", type=int, help="skip this many matching rows (next pages)")
    trace = sub.add_parser("trace", help="which key and backend a packet would get")
    trace.add_argument("packet", help="the IPv6 packet in hex, or - to read hex from stdin")
    move = sub.add_parser("move", help="bind a key to a backend")
    move.add_argument("key", nargs="+", help='key, e.g. "hoa 2001:db8::16"')
    move.add_argument("backend")
    forget = sub.add_parser("forget", help="remove a key's binding")
    forget.add_argument("key", nargs="+")
    weight = sub.add_parser("weight", help="give a backend a new weight (0..1000) until undrain")
    weight.add_argument("backend")
    weight.add_argument("weight", type=int)
    drain = sub.add_parser("drain", help="no new bindings to a backend; existing ones stay")
    drain.add_argument("backend")
    undrain = sub.add_parser("undrain", help="undo drain or weight: the file's weight again")
    undrain.add_argument("backend")
    sub.add_parser("backends", help="list backends with weight, health, bindings")
    sub.add_parser("stats", help="packet and table counters")
    cache = sub.add_parser("cache", help="the correspondent node's binding cache (RFC 6275)")
    cache.add_argument("--limit", type=int, default=100, help="entries shown (10000 at most)")
    sub.add_parser("info", help="version, uptime, mode, offload, what needs a restart")
    notify = sub.add_parser("notify", help="notification peers, subscriptions, refusals")
    notify.add_argument("--peer", help="only this peer")
    notify.add_argument("--limit", type=int, default=100, help="dialled-in terminals shown")
    fleet = sub.add_parser("fleet", help="a key as this balancer, the fleet and Maglev see it")
    fleet.add_argument("key", nargs="+", help='key, e.g. "addr 2001:db8::16"')
    journey = sub.add_parser("journey", help="a terminal's journey: events, capture, picture")
    journey.add_argument("key", nargs="+", help='any identity of the terminal, as show prints '
                                                'it, e.g. "addr 2001:db8::16"')
    journey.add_argument("--pcap", metavar="FILE",
                         help="also write it as pcap-ng (events as comments) for Wireshark")
    journey.add_argument("--svg", metavar="FILE", help="also draw it as an SVG picture")
    sub.add_parser("reload", help="re-read the configuration")
    return parser


def _request_args(options: argparse.Namespace, stdin: IO[str]) -> dict[str, Any]:
    command = options.command
    if command == "show":
        return {
            name: getattr(options, name)
            for name in ("filter", "kind", "backend", "offset", "limit")
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
    if command in ("drain", "undrain"):
        return {"backend": options.backend}
    if command == "weight":
        return {"backend": options.backend, "weight": options.weight}
    if command == "notify":
        args = {"limit": options.limit}
        if options.peer is not None:
            args["peer"] = options.peer
        return args
    if command in ("fleet", "journey"):
        return {"key": " ".join(options.key)}
    if command == "cache":
        return {"limit": options.limit}
    return {}


def _offload_text(decision: Mapping[str, Any]) -> str:
    """`lbproxy.io.xdpverdict.Decision.text` of a decision's JSON."""
    if decision.get("offloaded"):
        return f"would be offloaded ({decision.get('reason')})"
    return f"not offloaded: {decision.get('reason')}"


def render(command: str, result: Any) -> str:
    """The text output of ``command`` for its ``result``."""
    if command == "show":
        return format_rows(result["rows"], total=result["total"],
                           offset=result.get("offset") or 0)  # fmt: skip
    if command == "trace":
        lines = [
            f"{name}: {'-' if result[name] is None else result[name]}"
            for name in ("strategy", "key", "backend", "hit", "reason")
        ]
        lines.append(f"aliases: {', '.join(result.get('aliases') or ()) or '-'}")
        offload = result.get("xdp")
        if offload is not None:  # the XDP executor runs: does the packet stay in it?
            lines.append(f"xdp: {_offload_text(offload)}")
        return "\n".join(lines)
    if command == "move":
        return f"{result['key']} -> {result['backend']}"
    if command == "forget":
        return "no such binding" if result is None else f"forgot {result['key']}"
    if command == "drain":
        return (
            f"{result['name']} drained: weight {result['weight']}, "
            f"{result['bindings']} existing bindings stay (undrain {result['name']} undoes it)"
        )
    if command in ("weight", "undrain"):
        source = (
            f"operator override; the file says {result['configured_weight']}"
            if result.get("override") else "the configuration file's"
        )
        return f"{result['name']}: weight {result['weight']} ({source})"
    if command == "info":
        return format_info(result)
    if command == "notify":
        from lbproxy.notify.router import format_report

        return format_report(result)
    if command == "backends":
        return format_backends(result)
    if command == "stats":
        return format_stats(result)
    if command == "cache":
        head = (f"correspondent mode {result['mode']}: {result['size']} bindings"
                + (f" ({len(result['entries'])} shown)"
                   if len(result["entries"]) < result["size"] else ""))
        return "\n".join([head, *(f"{e['home']} -> {e['care_of']}  seq {e['seq']}  "
                                   f"{e['left']} s left" for e in result["entries"])])
    if command == "journey":
        return format_journey(result)
    if command == "reload":
        if isinstance(result, Mapping):
            return f"reloaded: {result.get('summary')}"
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
    if options.command == "journey":
        try:
            written = _journey_files(options, result)
        except OSError as exc:
            err.write(f"lbproxyctl: journey: cannot write {exc.filename}: "
                      f"{exc.strerror or exc}\n")
            return 1
    if options.json:
        out.write(json.dumps(result, indent=2, sort_keys=True) + "\n")
    else:
        out.write(render(options.command, result) + "\n")
        if options.command == "journey":
            out.writelines(f"wrote {path}\n" for path in written)
    return 0


def _journey_files(options: argparse.Namespace, result: Mapping[str, Any]) -> list[str]:
    """Write the journey's pcap-ng and SVG files the options ask for; their paths."""
    written = []
    if options.pcap:
        with open(options.pcap, "wb") as f:
            write_pcapng(f, journey_frames(result), application=f"lbproxyctl {__version__}",
                         interface="lbproxy journey")
        written.append(options.pcap)
    if options.svg:
        with open(options.svg, "w", encoding="utf-8") as f:
            f.write(journey_svg(result))
        written.append(options.svg)
    return written


if __name__ == "__main__":
    sys.exit(main())
