"""Backend health checks: a dead backend must get no new terminals.

Each backend is probed every ``interval`` seconds by a TCP connect or an HTTP
GET that must finish within ``timeout``.  One failed probe proves little, so a
backend goes down only after ``fall`` failures in a row and comes back up only
after ``rise`` successes in a row (keepalived's and HAProxy's rule).  When a
backend changes state, a callback is told, and the balancer stops (or resumes)
choosing it for new bindings.

What happens to terminals already bound to a dead backend is the operator's
policy (``DownPolicy``): ``keep`` leaves them (the backend may come back; their
sessions die anyway), ``reassign`` moves each of them to a live backend on its
next packet (the balancer does it: ``Balancer(reassign_dead=True)``).

Theory of operation: ``HealthState`` is the pure per-backend counter machine
below; ``HealthMonitor`` is the thin Twisted driver that runs probes on an
injected clock and feeds their outcomes to the states::

    state  probe  -> effect
    up     ok        failures = 0
    up     fail      failures += 1; failures == fall -> down (callback)
    down   fail      successes = 0
    down   ok        successes += 1; successes == rise -> up (callback)

Probes are quiet: a probe every two seconds per backend would otherwise log a
"Starting factory" and a "Stopping factory" line each (Twisted's default for every
connection a factory makes), drowning everything else.  Only a change of state is
logged.
"""

from __future__ import annotations

import enum
import ipaddress
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any

from twisted.application.service import Service
from twisted.internet.defer import Deferred, maybeDeferred
from twisted.internet.endpoints import TCP6ClientEndpoint
from twisted.internet.interfaces import IStreamClientEndpoint
from twisted.internet.protocol import Factory, Protocol
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.iweb import IAgentEndpointFactory
from zope.interface import Attribute, Interface, implementer

if TYPE_CHECKING:
    from twisted.internet.interfaces import IDelayedCall, IReactorTCP, IReactorTime

log = Logger()


class DownPolicy(enum.Enum):
    """What to do with the bindings of a backend that went down."""

    KEEP = "keep"
    REASSIGN = "reassign"

    @property
    def reassign_dead(self) -> bool:
        """The ``Balancer(reassign_dead=...)`` flag that implements this policy."""
        return self is DownPolicy.REASSIGN


class HealthState:
    """Rise/fall counters of one backend; pure, driven by probe outcomes."""

    __slots__ = ("failures", "fall", "rise", "successes", "up")

    def __init__(self, rise: int = 2, fall: int = 3, up: bool = True) -> None:
        if rise < 1 or fall < 1:
            raise ValueError("rise and fall must be at least 1")
        self.rise = rise
        self.fall = fall
        self.up = up
        self.successes = 0
        self.failures = 0

    def record(self, ok: bool) -> bool | None:
        """Count one probe outcome; return the new state if it changed, else None."""
        if self.up:
            if ok:
                self.failures = 0
                return None
            self.failures += 1
            if self.failures >= self.fall:
                self.up, self.failures, self.successes = False, 0, 0
                return False
            return None
        if not ok:
            self.successes = 0
            return None
        self.successes += 1
        if self.successes >= self.rise:
            self.up, self.failures, self.successes = True, 0, 0
            return True
        return None

    @property
    def name(self) -> str:
        """``"up"`` or ``"down"``."""
        return "up" if self.up else "down"


class IHealthProbe(Interface):
    """One kind of probe of one backend."""

    description = Attribute("Human-readable target, e.g. 'tcp [2001:db8::1]:80'.")

    def probe() -> Deferred[Any]:
        """Start a probe; fire with anything for success, fail for failure."""


class _Connected(Protocol):
    def connectionMade(self) -> None:
        assert self.transport is not None
        self.transport.loseConnection()


class _QuietFactory(Factory):
    """Makes `_Connected` protocols without logging each connection."""

    noisy = False
    protocol = _Connected


@implementer(IStreamClientEndpoint)
class _QuietEndpoint:
    """An endpoint that silences the factories it connects (the HTTP agent's own)."""

    def __init__(self, endpoint: IStreamClientEndpoint) -> None:
        self.endpoint = endpoint

    def connect(self, protocolFactory: Any) -> Deferred[Any]:
        protocolFactory.noisy = False
        return self.endpoint.connect(protocolFactory)


@implementer(IAgentEndpointFactory)
class _QuietEndpoints:
    """The HTTP agent's endpoint factory: TCP over IPv6 to the probed backend, quiet."""

    def __init__(self, reactor: Any, timeout: float) -> None:
        self.reactor = reactor
        self.timeout = timeout

    def endpointForURI(self, uri: Any) -> IStreamClientEndpoint:
        host = uri.host.decode("ascii")
        return _QuietEndpoint(
            TCP6ClientEndpoint(self.reactor, host, uri.port, timeout=self.timeout)
        )


@implementer(IHealthProbe)
class TCPProbe:
    """Success when a TCP connection to ``host``:``port`` opens."""

    def __init__(self, reactor: IReactorTCP, host: str, port: int, timeout: float) -> None:
        self.reactor = reactor
        self.host = str(ipaddress.ip_address(host))
        self.port = port
        self.timeout = timeout
        self.description = f"tcp [{self.host}]:{port}"

    def probe(self) -> Deferred[Any]:
        """Connect and close at once."""
        endpoint = TCP6ClientEndpoint(self.reactor, self.host, self.port, timeout=self.timeout)
        return endpoint.connect(_QuietFactory())


@implementer(IHealthProbe)
class HTTPProbe:
    """Success when ``GET path`` answers with a status below 400."""

    def __init__(
        self,
        reactor: Any,
        host: str,
        port: int,
        timeout: float,
        path: str = "/",
        host_header: str | None = None,
    ) -> None:
        self.reactor = reactor
        address = ipaddress.ip_address(host)
        self.url = f"http://[{address}]:{port}{path}"
        self.timeout = timeout
        self.host_header = host_header
        self.description = f"http GET {self.url}"

    def probe(self) -> Deferred[Any]:
        """Send the request; fail on a connection error or a 4xx/5xx status."""
        from twisted.web.client import Agent, readBody
        from twisted.web.http_headers import Headers

        agent = Agent.usingEndpointFactory(
            self.reactor, _QuietEndpoints(self.reactor, self.timeout)
        )
        headers = Headers({b"User-Agent": [b"lbproxy-health"]})
        if self.host_header:
            headers.addRawHeader(b"Host", self.host_header.encode())
        d = agent.request(b"GET", self.url.encode(), headers)

        def check(response: Any) -> Deferred[Any]:
            body = readBody(response)
            if response.code >= 400:
                return body.addCallback(
                    lambda _: Failure(ValueError(f"HTTP status {response.code}"))
                )
            return body

        d.addCallback(check)
        return d


def make_probe(
    kind: str,
    reactor: Any,
    address: str,
    port: int,
    timeout: float,
    path: str = "/",
) -> IHealthProbe | None:
    """The probe a backend's configuration asks for (``health = "none" | "tcp" | "http"``).

    ``None`` for ``"none"``: that backend is not checked and stays up.
    """
    if kind == "none":
        return None
    if kind == "tcp":
        return TCPProbe(reactor, address, port, timeout)
    if kind == "http":
        return HTTPProbe(reactor, address, port, timeout, path=path)
    raise ValueError(f"unknown health check {kind!r} (known: none, tcp, http)")


class HealthMonitor(Service):
    """Probe each backend on a schedule and report state changes.

    ``probes`` maps backend name to its probe; ``on_change(name, up)`` is
    called on every transition.  Probes of one backend never overlap: the
    next one is scheduled ``interval`` seconds after the previous finished
    or timed out.  ``clock`` drives intervals and timeouts.
    """

    name = "health"

    def __init__(
        self,
        probes: Mapping[str, IHealthProbe],
        clock: IReactorTime,
        on_change: Callable[[str, bool], object],
        interval: float = 2.0,
        timeout: float = 1.0,
        rise: int = 2,
        fall: int = 3,
    ) -> None:
        self.probes = dict(probes)
        self.clock = clock
        self.on_change = on_change
        self.interval = interval
        self.timeout = timeout
        self.states = {name: HealthState(rise, fall) for name in self.probes}
        self._calls: dict[str, IDelayedCall] = {}
        self._running: dict[str, Deferred[Any]] = {}

    def state(self, name: str) -> str:
        """``"up"``, ``"down"``, or ``"unknown"`` for a backend not checked."""
        state = self.states.get(name)
        return "unknown" if state is None else state.name

    def is_up(self, name: str) -> bool:
        """False only for a backend known to be down."""
        state = self.states.get(name)
        return state is None or state.up

    def startService(self) -> None:
        """Schedule the first probe of every backend at once."""
        super().startService()
        for name in self.probes:
            self._schedule(name, 0)

    def stopService(self) -> None:
        """Cancel pending and running probes."""
        super().stopService()
        for call in self._calls.values():
            if call.active():
                call.cancel()
        self._calls.clear()
        running = list(self._running.values())
        self._running.clear()
        for d in running:
            d.cancel()

    def _schedule(self, name: str, delay: float) -> None:
        self._calls[name] = self.clock.callLater(delay, self._probe, name)

    def _probe(self, name: str) -> None:
        self._calls.pop(name, None)
        d: Deferred[Any] = maybeDeferred(self.probes[name].probe)
        d.addTimeout(self.timeout, self.clock)
        self._running[name] = d
        d.addCallbacks(lambda _: True, lambda _f: False)
        d.addCallback(self._outcome, name, d)

    def _outcome(self, ok: bool, name: str, d: Deferred[Any]) -> None:
        if self._running.get(name) is not d:
            return  # stopped meanwhile
        del self._running[name]
        changed = self.states[name].record(ok)
        if changed is not None:
            log.info(
                "Backend {name} is {state} ({probe}).",
                name=name,
                state="up" if changed else "down",
                probe=self.probes[name].description,
            )
            try:
                self.on_change(name, changed)
            except Exception:
                log.failure("Health state callback failed for {name}", name=name)
        if self.running:
            self._schedule(name, self.interval)


def make_health_service(
    probes: Mapping[str, IHealthProbe],
    clock: IReactorTime,
    set_backend_up: Callable[[str, bool], object],
    interval: float = 2.0,
    timeout: float = 1.0,
    rise: int = 2,
    fall: int = 3,
) -> HealthMonitor:
    """A health monitor that tells ``set_backend_up(name, up)`` of every change.

    Wire it to ``Balancer.set_backend_up``: a down backend is left out of the
    scheduler (no new bindings).  The ``DownPolicy`` for existing bindings is
    the balancer's ``reassign_dead`` flag (``DownPolicy.REASSIGN.reassign_dead``).
    """
    return HealthMonitor(probes, clock, set_backend_up, interval, timeout, rise, fall)
