"""The emulators' control channel: JSON objects, one per line, on a UNIX socket.

The terminal and home-agent emulators run in their own network namespaces;
a UNIX socket in the bed's temporary directory reaches them from any
namespace (the file system is shared), so the bed, a test or the workload
program can ask for a move or read the binding cache without a network.

Requests are ``{"op": NAME, ...}``; every reply has ``"ok": true|false`` and,
when false, ``"error"``.  The server side is Twisted; the client side is a
blocking socket so that it can be called from tests and threads alike.
"""

from __future__ import annotations

import json
import socket
from collections.abc import Awaitable, Callable
from typing import Any

from twisted.internet.defer import Deferred, ensureDeferred
from twisted.internet.interfaces import IListeningPort, IReactorUNIX
from twisted.internet.protocol import Factory
from twisted.protocols.basic import LineOnlyReceiver
from twisted.python.failure import Failure

Message = dict[str, Any]
Handler = Callable[[Message], "Message | Awaitable[Message]"]


class ControlError(RuntimeError):
    """The emulator answered a control request with ``ok: false``."""


class ControlProtocol(LineOnlyReceiver):
    """One control connection: parse each line, hand it to the handler, write the reply."""

    delimiter = b"\n"
    MAX_LENGTH = 1 << 20

    def __init__(self, handler: Handler) -> None:
        self.handler = handler

    def lineReceived(self, line: bytes) -> None:
        try:
            request = json.loads(line)
            if not isinstance(request, dict):
                raise ValueError("a request is a JSON object")
            result = self.handler(request)
        except Exception as exc:  # report any failure to the client, keep serving
            self._reply({"ok": False, "error": f"{type(exc).__name__}: {exc}"})
            return
        if isinstance(result, dict):
            self._reply(result)
            return
        d: Deferred[Message] = ensureDeferred(result)  # type: ignore[arg-type]
        d.addCallbacks(self._reply, self._failed)

    def _failed(self, failure: Failure) -> None:
        self._reply({"ok": False, "error": failure.getErrorMessage()})

    def _reply(self, reply: Message) -> None:
        if self.transport is not None:
            self.sendLine(json.dumps(reply).encode())


class ControlFactory(Factory):
    """Builds a :class:`ControlProtocol` per connection, all sharing one handler."""

    def __init__(self, handler: Handler) -> None:
        self.handler = handler

    def buildProtocol(self, addr: object) -> ControlProtocol:
        return ControlProtocol(self.handler)


def serve(reactor: IReactorUNIX, path: str, handler: Handler) -> IListeningPort:
    """Listen on the UNIX socket ``path`` (removing a stale one first)."""
    return reactor.listenUNIX(path, ControlFactory(handler), wantPID=False)


class Client:
    """A blocking control connection, for the bed, tests and workload threads."""

    def __init__(self, path: str, timeout: float = 10.0) -> None:
        self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self._sock.settimeout(timeout)
        try:
            self._sock.connect(path)
        except OSError:
            self._sock.close()
            raise
        self._file = self._sock.makefile("rb")

    def request(self, op: str, **arguments: Any) -> Message:
        """Send one request, wait for its reply; raise :class:`ControlError` if not ok."""
        self._sock.sendall(json.dumps({"op": op, **arguments}).encode() + b"\n")
        line = self._file.readline()
        if not line:
            raise ControlError(f"control connection closed during {op!r}")
        reply: Message = json.loads(line)
        if not reply.get("ok"):
            raise ControlError(f"{op}: {reply.get('error', 'failed')}")
        return reply

    def close(self) -> None:
        self._file.close()
        self._sock.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def request(path: str, op: str, timeout: float = 10.0, **arguments: Any) -> Message:
    """One request on a fresh connection."""
    with Client(path, timeout) as client:
        return client.request(op, **arguments)
