"""A private redis-server for the fleet's tests, bed and benchmark.

Why a module of its own: a fleet needs a store, and a test must not use (or harm) one the
host runs.  `RedisServer` starts Debian's ``redis-server`` listening on a UNIX socket only
(no TCP port: nothing to collide with, and a socket file reaches balancers in other
network namespaces through the shared file system), with no persistence, in a temporary
directory it removes; it can be stopped and started again on the same socket (a store
outage).  `RedisServer.command` is a small blocking RESP client for the test's own reads
and writes (checking TTLs, planting garbage) -- never the code under test's way in.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from typing import Any

__all__ = ["RedisServer", "StoreUnavailableError", "redis_server_path"]


class StoreUnavailableError(RuntimeError):
    """No redis-server on this host (``make system-deps`` installs it as root)."""


def redis_server_path() -> str:
    """The redis-server binary, or `StoreUnavailableError` saying why not."""
    path = shutil.which("redis-server") or (
        "/usr/bin/redis-server" if os.path.exists("/usr/bin/redis-server") else None)
    if path is None:
        raise StoreUnavailableError("no redis-server on this host (Debian: apt-get install "
                                    "redis-server; `make system-deps` does it as root)")
    return path


class RedisServer:
    """redis-server on ``<directory>/redis.sock``; `start`, `stop`, `restart`, `command`."""

    def __init__(self, directory: str | None = None) -> None:
        self.binary = redis_server_path()
        self._own_directory = directory is None
        self.directory = directory or tempfile.mkdtemp(prefix="lbfleet-")
        self.socket_path = os.path.join(self.directory, "redis.sock")
        self.process: subprocess.Popen[bytes] | None = None
        self.starts = 0

    @property
    def endpoint(self) -> str:
        """The Twisted client endpoint string for this server."""
        return f"unix:path={self.socket_path}:timeout=2"

    def start(self, timeout: float = 10.0) -> RedisServer:
        if self.process is not None and self.process.poll() is None:
            return self
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.socket_path)
        log = open(os.path.join(self.directory, f"redis-{self.starts}.log"), "wb")  # noqa: SIM115
        self.starts += 1
        argv = [self.binary, "--port", "0", "--unixsocket", self.socket_path,
                "--unixsocketperm", "700", "--save", "", "--appendonly", "no",
                "--dir", self.directory, "--daemonize", "no", "--protected-mode", "no",
                "--loglevel", "warning"]
        self.process = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=log,
                                        stderr=subprocess.STDOUT, start_new_session=True,
                                        preexec_fn=_die_with_parent)
        log.close()
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"redis-server exited {self.process.returncode}: "
                                   f"{self.log()[-2000:]}")
            with contextlib.suppress(OSError):
                if self.command("PING") == "PONG":
                    return self
            time.sleep(0.02)
        self.stop()
        raise RuntimeError(f"redis-server not ready in {timeout} s: {self.log()[-2000:]}")

    def stop(self) -> None:
        """Stop the server (SIGKILL: an outage, not a shutdown that saves anything)."""
        process, self.process = self.process, None
        if process is not None and process.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(process.pid, signal.SIGKILL)
            process.wait(5)

    def restart(self, pause: float = 0.0) -> RedisServer:
        self.stop()
        time.sleep(pause)
        return self.start()

    def close(self) -> None:
        """Stop the server and remove its directory (if this object made it)."""
        self.stop()
        if self._own_directory:
            shutil.rmtree(self.directory, ignore_errors=True)

    def __enter__(self) -> RedisServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.close()

    def log(self) -> str:
        text = ""
        for i in range(self.starts):
            with contextlib.suppress(OSError), \
                    open(os.path.join(self.directory, f"redis-{i}.log"), errors="replace") as f:
                text += f.read()  # fmt: skip
        return text

    # -- a small blocking client -----------------------------------------------------------

    def command(self, *args: str | bytes | int, timeout: float = 5.0) -> Any:
        """Send one command, return its decoded reply (str for simple strings, bytes for
        bulk strings, int, list, None; an error reply raises RuntimeError)."""
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
            s.settimeout(timeout)
            s.connect(self.socket_path)
            s.sendall(_encode(args))
            reader = _Reader(s)
            return reader.reply()


def _die_with_parent() -> None:
    """In the child: SIGKILL when the process that started it dies (a killed test run
    leaves no server behind)."""
    with contextlib.suppress(OSError, AttributeError):
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG


def _encode(args: tuple[str | bytes | int, ...]) -> bytes:
    out = [b"*%d\r\n" % len(args)]
    for arg in args:
        data = arg if isinstance(arg, bytes) else str(arg).encode()
        out.append(b"$%d\r\n%s\r\n" % (len(data), data))
    return b"".join(out)


class _Reader:
    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.buffer = b""

    def _line(self) -> bytes:
        while b"\r\n" not in self.buffer:
            chunk = self.sock.recv(65536)
            if not chunk:
                raise ConnectionError("redis closed the connection")
            self.buffer += chunk
        line, self.buffer = self.buffer.split(b"\r\n", 1)
        return line

    def _exactly(self, n: int) -> bytes:
        while len(self.buffer) < n + 2:
            chunk = self.sock.recv(65536)
            if not chunk:
                raise ConnectionError("redis closed the connection")
            self.buffer += chunk
        data, self.buffer = self.buffer[:n], self.buffer[n + 2:]
        return data

    def reply(self) -> Any:
        line = self._line()
        kind, rest = line[:1], line[1:]
        if kind == b"+":
            return rest.decode()
        if kind == b"-":
            raise RuntimeError(rest.decode(errors="replace"))
        if kind == b":":
            return int(rest)
        if kind == b"$":
            n = int(rest)
            return None if n < 0 else self._exactly(n)
        if kind == b"*":
            n = int(rest)
            return None if n < 0 else [self.reply() for _ in range(n)]
        raise RuntimeError(f"unexpected reply {line[:40]!r}")
