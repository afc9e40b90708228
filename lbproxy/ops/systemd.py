"""systemd's notification protocol: readiness, watchdog and stopping, as a Twisted service.

A unit with ``Type=notify`` waits for the process to say ``READY=1`` before it counts the
service as started (and before units ordered after it start); with ``WatchdogSec=`` it
kills and restarts a process that stops saying ``WATCHDOG=1``.  The protocol (sd_notify(3))
is one datagram per message on an ``AF_UNIX`` socket whose address systemd puts in
``$NOTIFY_SOCKET`` -- a path, or a name in the abstract namespace when it starts with
``@`` -- holding newline-separated ``NAME=value`` assignments.  It is spoken here directly:
no libsystemd, no extra dependency.

`SystemdService` is the last child of the balancer's and the agents' service trees, so its
``startService`` runs after every other service has started (the forwarder's sockets were
opened by ``privilegedStartService`` before that, and the saved table was restored by the
persistence service's ``startService``).  Once the reactor runs and the ``ready`` check
says so, it sends ``READY=1`` with a ``STATUS=`` line; it pings ``WATCHDOG=1`` every half of
``$WATCHDOG_USEC`` from a reactor timer, so the pings stop when the reactor stops turning
(a blocked or dead reactor is what the watchdog must catch), and also while the ``alive``
check fails; on stop it sends ``STOPPING=1``.  Without ``$NOTIFY_SOCKET`` (not under
systemd, or ``Type=simple``) it does nothing at all.
"""

from __future__ import annotations

import os
import socket
from collections.abc import Callable, Mapping
from typing import Any

from twisted.application.service import Service
from twisted.internet.task import LoopingCall
from twisted.logger import Logger

__all__ = [
    "SystemdNotifier",
    "SystemdService",
    "for_agent",
    "for_balancer",
    "watchdog_interval",
]

_log = Logger()


def _address(name: str) -> str | bytes:
    """The socket address of ``$NOTIFY_SOCKET``: ``@name`` is ``\\0name`` (abstract)."""
    if name.startswith("@"):
        return b"\0" + name[1:].encode()
    return name


class SystemdNotifier:
    """Sends sd_notify datagrams to one address; never raises on a send.

    A failed send (systemd gone, the socket full) is logged once per reason and reported
    as ``False``: the service keeps running, as it would without systemd.
    """

    def __init__(self, address: str) -> None:
        if not address or not (address.startswith(("/", "@"))):
            raise ValueError(f"NOTIFY_SOCKET {address!r}: not a path or an @abstract name")
        self.address = address
        self._socket: socket.socket | None = None
        self._failed: set[str] = set()
        self.sent = 0

    @classmethod
    def from_environment(cls, environ: Mapping[str, str] | None = None) -> SystemdNotifier | None:
        """The notifier for ``$NOTIFY_SOCKET``, or ``None`` when it is unset or unusable
        (logged: e.g. a ``vsock:`` address, which only a virtual machine's manager uses)."""
        env = os.environ if environ is None else environ
        address = env.get("NOTIFY_SOCKET", "")
        if not address:
            return None
        try:
            return cls(address)
        except ValueError as exc:
            _log.warn("systemd: {error}; not notifying", error=exc)
            return None

    def send(self, *assignments: str) -> bool:
        """Send ``NAME=value`` assignments in one datagram; True when the kernel took it."""
        message = "\n".join(assignments).encode()
        try:
            if self._socket is None:
                self._socket = socket.socket(
                    socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC | socket.SOCK_NONBLOCK
                )
            self._socket.sendto(message, _address(self.address))
        except OSError as exc:
            reason = exc.strerror or str(exc)
            if reason not in self._failed:
                self._failed.add(reason)
                _log.warn("systemd: cannot notify {address}: {reason}",
                          address=self.address, reason=reason)  # fmt: skip
            return False
        self.sent += 1
        return True

    def close(self) -> None:
        if self._socket is not None:
            self._socket.close()
            self._socket = None


def watchdog_interval(environ: Mapping[str, str], pid: int) -> float | None:
    """Seconds between ``WATCHDOG=1`` pings: half of ``$WATCHDOG_USEC``, or ``None`` when
    no watchdog is asked for, or it is meant for another process (``$WATCHDOG_PID``)."""
    try:
        usec = int(environ.get("WATCHDOG_USEC", "0"))
    except ValueError:
        return None
    if usec <= 0:
        return None
    wanted = environ.get("WATCHDOG_PID", "")
    if wanted and wanted != str(pid):
        return None
    return usec / 2 / 1e6


class SystemdService(Service):
    """``READY=1`` once the reactor runs and ``ready()`` gives a status text; ``WATCHDOG=1``
    every half watchdog period while ``alive()``; ``STOPPING=1`` on stop.

    ``ready`` returns the ``STATUS=`` text when the program serves, ``None`` while it does
    not yet (asked again every ``poll`` seconds).  ``environ`` defaults to ``os.environ``.
    """

    name = "systemd"

    def __init__(
        self,
        reactor: Any,
        ready: Callable[[], str | None] = lambda: "running",
        alive: Callable[[], bool] = lambda: True,
        environ: Mapping[str, str] | None = None,
        poll: float = 0.05,
    ) -> None:
        env = os.environ if environ is None else environ
        self.reactor = reactor
        self.ready = ready
        self.alive = alive
        self.poll = poll
        self.notifier = SystemdNotifier.from_environment(env)
        self.interval = watchdog_interval(env, os.getpid()) if self.notifier else None
        self.is_ready = False
        self.pings = 0
        self._watchdog: LoopingCall | None = None
        self._pending: Any = None
        self._said_not_alive = False

    def startService(self) -> None:
        super().startService()
        if self.notifier is None:
            return
        when_running = getattr(self.reactor, "callWhenRunning", None)
        if when_running is None:
            self._reactor_running()
        else:
            when_running(self._reactor_running)

    def _reactor_running(self) -> None:
        if not self.running:
            return
        if self.interval is not None and self._watchdog is None:
            self._watchdog = LoopingCall(self._ping)
            self._watchdog.clock = self.reactor
            self._watchdog.start(self.interval, now=True)
        self._check_ready()

    def _check_ready(self) -> None:
        self._pending = None
        if not self.running or self.notifier is None or self.is_ready:
            return
        try:
            status = self.ready()
        except Exception:
            _log.failure("systemd: the readiness check failed")
            status = None
        if status is None:
            self._pending = self.reactor.callLater(self.poll, self._check_ready)
            return
        self.is_ready = True
        self.notifier.send("READY=1", f"STATUS={status}", f"MAINPID={os.getpid()}")

    def _ping(self) -> None:
        if self.notifier is None:
            return
        try:
            alive = self.alive()
        except Exception:
            _log.failure("systemd: the liveness check failed")
            alive = False
        if not alive:
            if not self._said_not_alive:
                self._said_not_alive = True
                _log.error("systemd: not alive; the watchdog pings stop until it is again")
            return
        self._said_not_alive = False
        if self.notifier.send("WATCHDOG=1"):
            self.pings += 1

    def stopService(self) -> None:
        super().stopService()
        if self._pending is not None and self._pending.active():
            self._pending.cancel()
        self._pending = None
        if self._watchdog is not None and self._watchdog.running:
            self._watchdog.stop()
        self._watchdog = None
        if self.notifier is not None:
            self.notifier.send("STOPPING=1", "STATUS=stopping")
            self.notifier.close()


def for_balancer(balancer: Any, reactor: Any) -> SystemdService:
    """The systemd service of a ``lbproxy.tap.BalancerService``: ready once its forwarder
    runs with its sockets open and the saved table (if any) was restored; alive while the
    forwarder runs."""
    forwarder = balancer.forwarder

    def persistence() -> Any:
        return balancer.namedServices.get("persistence")

    def ready() -> str | None:
        if not forwarder.running or forwarder.writer.fileno() < 0:
            return None
        status = (f"forwarding {forwarder.client.interface} -> {forwarder.server.interface} "
                  f"({balancer.balancer.mode})")  # fmt: skip
        saved = persistence()
        if saved is not None:
            result = saved.last_restore
            if result is None:
                return None
            status += f", {result.restored} bindings restored"
        return status

    return SystemdService(reactor, ready=ready, alive=lambda: bool(forwarder.running))


def for_agent(agent: Any, reactor: Any, what: str) -> SystemdService:
    """The systemd service of an agent (``what``: "home-agent agent", "terminal agent"):
    ready once its TLS listener and the services before it run."""

    def ready() -> str | None:
        listening = agent.listening
        return f"{what}: serving balancers" if listening.running else None

    return SystemdService(reactor, ready=ready, alive=lambda: bool(agent.running))
