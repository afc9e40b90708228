"""Tests for lbproxy.ops.health: rise/fall counting, the probe driver, real TCP and HTTP probes."""

from __future__ import annotations

from typing import Any, cast

from twisted.internet import defer, error, reactor, task
from twisted.internet.defer import Deferred
from twisted.internet.protocol import Factory, Protocol
from twisted.logger import ILogObserver, formatEvent, globalLogPublisher
from twisted.trial.unittest import SynchronousTestCase, TestCase
from twisted.web.resource import Resource
from twisted.web.server import Site
from zope.interface import implementer

from lbproxy.ops.health import (
    DownPolicy,
    HealthMonitor,
    HealthState,
    HTTPProbe,
    IHealthProbe,
    TCPProbe,
    make_health_service,
    make_probe,
)

# Typed Any: the global reactor provides more interfaces than its declared type.
REACTOR: Any = reactor


class HealthStateTests(SynchronousTestCase):
    def test_goes_down_after_fall_failures_in_a_row(self) -> None:
        """Fewer than `fall` consecutive failures keep the backend up; the fall-th takes it down."""
        state = HealthState(rise=2, fall=3)
        self.assertEqual([state.record(False), state.record(False)], [None, None])
        self.assertTrue(state.up)
        self.assertIs(state.record(False), False)
        self.assertFalse(state.up)
        self.assertEqual(state.name, "down")

    def test_a_success_resets_the_failure_count(self) -> None:
        """Failures must be consecutive: a success in between starts the count again."""
        state = HealthState(rise=2, fall=2)
        for ok in (False, True, False, True, False):
            self.assertIsNone(state.record(ok))
        self.assertTrue(state.up)

    def test_comes_back_after_rise_successes_in_a_row(self) -> None:
        """A down backend needs `rise` consecutive successes; a failure restarts the count."""
        state = HealthState(rise=3, fall=1)
        self.assertIs(state.record(False), False)
        self.assertEqual([state.record(True), state.record(True)], [None, None])
        self.assertIsNone(state.record(False))
        self.assertEqual([state.record(True), state.record(True)], [None, None])
        self.assertIs(state.record(True), True)
        self.assertTrue(state.up)

    def test_every_transition_reported_once(self) -> None:
        """Over a long random-ish run, reported changes alternate and match the state."""
        state = HealthState(rise=2, fall=2)
        outcomes = [i % 7 not in (0, 1, 2) for i in range(100)]
        changes = [c for c in (state.record(ok) for ok in outcomes) if c is not None]
        self.assertTrue(changes)
        self.assertEqual(changes, [i % 2 == 1 for i in range(len(changes))])
        self.assertEqual(state.up, changes[-1])

    def test_bad_counts_refused(self) -> None:
        """rise or fall below 1 is a configuration error."""
        self.assertRaises(ValueError, HealthState, 0, 1)
        self.assertRaises(ValueError, HealthState, 1, 0)

    def test_policy_names(self) -> None:
        """The two policies map to the balancer's reassign_dead flag."""
        self.assertTrue(DownPolicy("reassign").reassign_dead)
        self.assertFalse(DownPolicy("keep").reassign_dead)
        self.assertRaises(ValueError, DownPolicy, "explode")


@implementer(IHealthProbe)
class ScriptedProbe:
    """A probe whose outcome the test sets; 'hang' never answers (timeout)."""

    description = "scripted"

    def __init__(self) -> None:
        self.outcome = "ok"
        self.started = 0

    def probe(self) -> Deferred[Any]:
        self.started += 1
        if self.outcome == "ok":
            return defer.succeed(None)
        if self.outcome == "hang":
            return Deferred()
        return defer.fail(ConnectionRefusedError())


class MonitorTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.clock = task.Clock()
        self.probes = {"b1": ScriptedProbe(), "b2": ScriptedProbe()}
        self.changes: list[tuple[str, bool]] = []
        self.monitor = HealthMonitor(
            self.probes,
            self.clock,
            lambda name, up: self.changes.append((name, up)),
            interval=2.0,
            timeout=1.0,
            rise=2,
            fall=3,
        )
        self.monitor.startService()
        self.addCleanup(self.monitor.stopService)

    def test_down_within_fall_window_and_up_within_rise_window(self) -> None:
        """A failing backend is reported down after fall probes, and up after rise probes."""
        self.clock.advance(0)
        self.assertEqual(self.probes["b1"].started, 1)
        self.probes["b1"].outcome = "refused"
        for _ in range(2):
            self.clock.advance(2.0)
        self.assertEqual(self.changes, [])
        self.clock.advance(2.0)  # third failure
        self.assertEqual(self.changes, [("b1", False)])
        self.assertEqual(self.monitor.state("b1"), "down")
        self.assertFalse(self.monitor.is_up("b1"))
        self.assertEqual(self.monitor.state("b2"), "up")
        self.probes["b1"].outcome = "ok"
        self.clock.advance(2.0)
        self.assertEqual(len(self.changes), 1)
        self.clock.advance(2.0)
        self.assertEqual(self.changes, [("b1", False), ("b1", True)])
        self.assertEqual(self.monitor.state("unknown-backend"), "unknown")

    def test_timeouts_count_as_failures_and_probes_do_not_overlap(self) -> None:
        """A probe that hangs fails after the timeout; the next starts an interval later."""
        self.probes["b2"].outcome = "hang"
        self.clock.advance(0)
        self.assertEqual(self.probes["b2"].started, 1)
        self.clock.advance(0.9)
        self.assertEqual(self.probes["b2"].started, 1)
        self.clock.advance(0.1)  # timeout at 1.0; next probe at 3.0
        self.clock.advance(1.9)
        self.assertEqual(self.probes["b2"].started, 1)
        self.clock.advance(0.1)
        self.assertEqual(self.probes["b2"].started, 2)
        for _ in range(2):
            self.clock.advance(1.0)
            self.clock.advance(2.0)
        self.assertEqual(self.changes, [("b2", False)])

    def test_stop_leaves_no_delayed_calls(self) -> None:
        """Stopping cancels scheduled and in-flight probes."""
        self.probes["b1"].outcome = "hang"
        self.clock.advance(0)
        self.monitor.stopService()
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_callback_errors_do_not_stop_checking(self) -> None:
        """An exception in the state callback is logged and probing goes on."""
        def boom(name: str, up: bool) -> None:
            raise RuntimeError("balancer said no")

        clock = task.Clock()
        probe = ScriptedProbe()
        probe.outcome = "refused"
        monitor = make_health_service({"b1": probe}, clock, boom, interval=1, fall=1)
        monitor.startService()
        clock.advance(0)
        self.assertEqual(len(self.flushLoggedErrors(RuntimeError)), 1)
        clock.advance(1)
        self.assertEqual(probe.started, 2)
        monitor.stopService()


class MakeProbeTests(SynchronousTestCase):
    def test_kinds(self) -> None:
        """Configuration names map to the probe kinds; 'none' means unchecked."""
        self.assertIsNone(make_probe("none", REACTOR, "2001:db8::1", 80, 1.0))
        tcp = make_probe("tcp", REACTOR, "2001:db8::1", 80, 1.0)
        self.assertIsInstance(tcp, TCPProbe)
        http = make_probe("http", REACTOR, "2001:db8::1", 8080, 1.0, path="/health")
        assert isinstance(http, HTTPProbe)
        self.assertEqual(http.url, "http://[2001:db8::1]:8080/health")
        self.assertRaises(ValueError, make_probe, "icmp", REACTOR, "2001:db8::1", 80, 1.0)


class _Accept(Protocol):
    pass


class RealProbeTests(TestCase):
    """Probes against real loopback listeners, with the real REACTOR."""

    timeout = 30

    @defer.inlineCallbacks
    def test_tcp_probe_follows_a_listener_stopped_and_started(self) -> Any:
        """A TCP probe succeeds while [::1]:port listens and fails once it is closed."""
        port = REACTOR.listenTCP(0, Factory.forProtocol(_Accept), interface="::1")
        number = port.getHost().port
        probe = TCPProbe(REACTOR, "::1", number, timeout=2.0)
        yield probe.probe()
        yield port.stopListening()
        yield self.assertFailure(probe.probe(), error.ConnectionRefusedError)
        port = REACTOR.listenTCP(number, Factory.forProtocol(_Accept), interface="::1")
        self.addCleanup(port.stopListening)
        yield probe.probe()

    @defer.inlineCallbacks
    def test_monitor_marks_a_real_backend_down_and_up(self) -> Any:
        """With the real REACTOR, a stopped listener goes down after `fall` probes and
        comes back after `rise` probes once it listens again."""
        port = REACTOR.listenTCP(0, Factory.forProtocol(_Accept), interface="::1")
        number = port.getHost().port
        changes: list[tuple[str, bool]] = []
        waiting: list[Deferred[None]] = []

        def changed(name: str, up: bool) -> None:
            changes.append((name, up))
            fired = list(waiting)
            del waiting[:]
            for d in fired:
                d.callback(None)

        def next_change() -> Deferred[None]:
            d: Deferred[None] = Deferred()
            waiting.append(d)
            return d.addTimeout(10, REACTOR)

        monitor = make_health_service(
            {"b1": TCPProbe(REACTOR, "::1", number, timeout=0.5)},
            REACTOR,
            changed,
            interval=0.05,
            timeout=0.5,
            rise=2,
            fall=2,
        )
        monitor.startService()
        self.addCleanup(monitor.stopService)
        yield task.deferLater(REACTOR, 0.3, lambda: None)
        self.assertEqual(changes, [])  # up all along
        yield port.stopListening()
        yield next_change()
        self.assertEqual(changes, [("b1", False)])
        port = REACTOR.listenTCP(number, Factory.forProtocol(_Accept), interface="::1")
        self.addCleanup(port.stopListening)
        yield next_change()
        self.assertEqual(changes, [("b1", False), ("b1", True)])

    @defer.inlineCallbacks
    def test_http_probe_checks_the_status(self) -> Any:
        """An HTTP probe succeeds on 200 and fails on 503."""
        root = Resource()

        class Status(Resource):
            isLeaf = True

            def __init__(self, code: int) -> None:
                super().__init__()
                self.code = code

            def render_GET(self, request: Any) -> bytes:
                request.setResponseCode(self.code)
                return b"status"

        root.putChild(b"ok", Status(200))
        root.putChild(b"sick", Status(503))
        port = REACTOR.listenTCP(0, Site(root), interface="::1")
        self.addCleanup(port.stopListening)
        number = port.getHost().port
        yield HTTPProbe(REACTOR, "::1", number, 2.0, path="/ok").probe()
        yield self.assertFailure(
            HTTPProbe(REACTOR, "::1", number, 2.0, path="/sick").probe(), ValueError
        )


class QuietProbeTests(TestCase):
    """Probes leave nothing in the log: no "Starting factory"/"Stopping factory" per probe."""

    timeout = 30

    def setUp(self) -> None:
        self.events: list[str] = []

        def observe(event: dict[str, Any]) -> None:
            self.events.append(formatEvent(event))

        observer = cast(ILogObserver, observe)
        globalLogPublisher.addObserver(observer)
        self.addCleanup(globalLogPublisher.removeObserver, observer)

    @defer.inlineCallbacks
    def test_tcp_and_http_probes_are_quiet(self) -> Any:
        """Twenty TCP and twenty HTTP probes, successful and refused, log no line."""
        root = Resource()
        root.putChild(b"ok", _Ok())
        site = Site(root)
        site.noisy = False
        site.log = lambda request: None  # type: ignore[method-assign]  # the server's log
        web = REACTOR.listenTCP(0, site, interface="::1")
        self.addCleanup(web.stopListening)
        tcp = REACTOR.listenTCP(0, Factory.forProtocol(_Accept), interface="::1")
        self.addCleanup(tcp.stopListening)
        closed = REACTOR.listenTCP(0, Factory.forProtocol(_Accept), interface="::1")
        closed_port = closed.getHost().port
        yield closed.stopListening()
        del self.events[:]
        for _ in range(20):
            yield TCPProbe(REACTOR, "::1", tcp.getHost().port, 2.0).probe()
            yield HTTPProbe(REACTOR, "::1", web.getHost().port, 2.0, path="/ok").probe()
            yield self.assertFailure(TCPProbe(REACTOR, "::1", closed_port, 2.0).probe(),
                                     error.ConnectionRefusedError)  # fmt: skip
            yield self.assertFailure(HTTPProbe(REACTOR, "::1", closed_port, 2.0).probe(),
                                     error.ConnectionRefusedError)  # fmt: skip
        noise = [e for e in self.events if "factory" in e.lower() or "http" in e.lower()]
        self.assertEqual(noise, [])


class _Ok(Resource):
    isLeaf = True

    def render_GET(self, request: Any) -> bytes:
        return b"ok"
