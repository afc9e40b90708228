"""lbproxy.ops.metrics: a real scrape, parsed with prometheus_client, shows counters move."""

from __future__ import annotations

import ipaddress
import json
import socket
from typing import Any, cast

from prometheus_client.parser import text_string_to_metric_families
from scapy.layers.inet import UDP
from scapy.layers.inet6 import HAO, IPv6, IPv6ExtHdrDestOpt
from twisted.internet import defer, reactor, task
from twisted.logger import ILogObserver, formatEvent, globalLogPublisher
from twisted.trial.unittest import SynchronousTestCase, TestCase
from twisted.web.client import Agent, readBody

from lbproxy.core import actions
from lbproxy.core.balancer import Balancer
from lbproxy.core.keys import KeyChain
from lbproxy.core.selection import Backend, RoundRobin
from lbproxy.core.table import StickyTable
from lbproxy.notify.policy import Refusal, RefusalCounters
from lbproxy.ops.control import Control
from lbproxy.ops.metrics import (
    BalancerCollector,
    make_metrics_service,
    make_registry,
    make_site,
)
from tests.operating_fakes import real_key

REACTOR: Any = reactor
VIP = "2001:db8:ff::1"


def real_balancer(clock: task.Clock) -> Balancer:
    return Balancer(
        chain=KeyChain.from_names(["hoa", "src"]),
        table=StickyTable(clock, lifetime=30.0, max_entries=100),
        scheduler=RoundRobin(),
        backends=[Backend("b1", "2001:db8:100::1"), Backend("b2", "2001:db8:100::2")],
        virtual_addresses=[ipaddress.IPv6Address(VIP)],
        clock=clock,
    )


def hao_packet(home: str, care_of: str) -> bytearray:
    """A UDP packet from a mobile terminal: source = care-of, HAO = home address."""
    pkt = (
        IPv6(src=care_of, dst=VIP)
        / IPv6ExtHdrDestOpt(options=[HAO(hoa=home)])
        / UDP(sport=4000, dport=53)
        / b"hello"
    )
    return bytearray(bytes(pkt))


def plain_packet(source: str) -> bytearray:
    return bytearray(bytes(IPv6(src=source, dst=VIP) / UDP(sport=4000, dport=53) / b"x"))


def samples(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """Every sample of a scrape, by (name, sorted labels)."""
    out = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            out[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return out


class Subscription:
    def __init__(self, confirmed: bool) -> None:
        self.confirmed = confirmed


class CollectorTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.clock = task.Clock()
        self.balancer = real_balancer(self.clock)
        self.control = Control(self.balancer)

    def scrape(self, collector: BalancerCollector) -> dict[Any, float]:
        from prometheus_client.exposition import generate_latest

        return samples(generate_latest(make_registry(collector)).decode())

    def test_port_counters(self) -> None:
        """What the sockets counted (ForwarderService.port_stats, through Control):
        packets read per link, lost per link and reason, the writer's refusals by
        errno name, packets sent, and the fast path's share."""
        ports: dict[str, dict[str, Any]] = {
            "client": {"received": 10, "oversize": 1, "kernel_drops": 7, "handler_errors": 0,
                       "receive_errors": 0, "wakeups": 3},
            "server": {"received": 4, "oversize": 0, "kernel_drops": 0, "handler_errors": 2,
                       "receive_errors": 0, "wakeups": 2},
            "writer": {"sent": 11, "dropped": 3, "errors": {"EAGAIN": 2, "ENOBUFS": 1}},
            "fast_path": {"forwarded": 9, "replies": 5, "errors": 0},
        }  # fmt: skip
        control = Control(self.balancer, ports=lambda: ports)
        got = self.scrape(BalancerCollector(control))
        self.assertEqual(got[("lbproxy_port_received_total", (("port", "client"),))], 10)
        self.assertEqual(got[("lbproxy_port_received_total", (("port", "server"),))], 4)
        lost = {labels: v for (name, labels), v in got.items() if name == "lbproxy_port_lost_total"}
        self.assertEqual(lost[(("port", "client"), ("reason", "kernel-queue-full"))], 7)
        self.assertEqual(lost[(("port", "client"), ("reason", "oversize"))], 1)
        self.assertEqual(lost[(("port", "server"), ("reason", "handler-failed"))], 2)
        self.assertEqual(lost[(("port", "writer"), ("reason", "EAGAIN"))], 2)
        self.assertEqual(lost[(("port", "writer"), ("reason", "ENOBUFS"))], 1)
        self.assertEqual(lost[(("port", "fast-path"), ("reason", "handler-failed"))], 0)
        self.assertEqual(got[("lbproxy_port_sent_total", ())], 11)
        fast = (("direction", "to-backend"),), (("direction", "to-terminal"),)
        self.assertEqual(got[("lbproxy_fast_path_packets_total", fast[0])], 9)
        self.assertEqual(got[("lbproxy_fast_path_packets_total", fast[1])], 5)
        without = self.scrape(BalancerCollector(self.control))  # no forwarder: no port metrics
        self.assertFalse([name for name, _ in without if name.startswith("lbproxy_port_")])

    def test_counters_move(self) -> None:
        """Packets in/out, hits and misses per kind, drops by reason, table size and
        per-backend figures follow the traffic between two scrapes."""
        collector = BalancerCollector(self.control)
        before = self.scrape(collector)
        self.assertEqual(before[("lbproxy_packets_in_total", ())], 0)
        self.assertEqual(before[("lbproxy_table_bindings", ())], 0)

        self.balancer.inbound(hao_packet("2001:db8:1::1", "2001:db8:aa::1"))
        self.balancer.inbound(hao_packet("2001:db8:1::1", "2001:db8:bb::1"))  # moved: hit
        self.balancer.inbound(plain_packet("2001:db8:2::2"))
        self.balancer.inbound(bytearray(b"\x60garbage"))
        after = self.scrape(collector)
        self.assertEqual(after[("lbproxy_packets_in_total", ())], 4)
        self.assertEqual(after[("lbproxy_packets_out_total", ())], 3)
        self.assertEqual(after[("lbproxy_hits_total", (("kind", "hoa"),))], 1)
        self.assertEqual(after[("lbproxy_misses_total", (("kind", "hoa"),))], 1)
        self.assertEqual(after[("lbproxy_misses_total", (("kind", "src"),))], 1)
        dropped = {k: v for k, v in after.items() if k[0] == "lbproxy_packets_dropped_total"}
        self.assertEqual(sum(dropped.values()), 1)
        self.assertEqual(after[("lbproxy_table_bindings", ())], 2)
        self.assertEqual(after[("lbproxy_table_inserts_total", ())], 2)
        per_backend = {
            dict(k[1])["backend"]: v
            for k, v in after.items()
            if k[0] == "lbproxy_backend_bindings"
        }
        self.assertEqual(per_backend, {"b1": 1, "b2": 1})
        packets = sum(v for k, v in after.items() if k[0] == "lbproxy_backend_packets_total")
        self.assertEqual(packets, 3)
        self.assertEqual(after[("lbproxy_backend_up", (("backend", "b1"),))], 1)

        self.clock.advance(31)
        self.balancer.sweep()
        expired = self.scrape(collector)
        self.assertEqual(expired[("lbproxy_table_expirations_total", ())], 2)
        self.assertEqual(expired[("lbproxy_table_bindings", ())], 0)

    def test_health_and_drain_show(self) -> None:
        """A backend marked down shows up=0; a drained one weight 0."""
        self.balancer.set_backend_up("b2", False)
        actions.drain(self.balancer, "b1")
        now = self.scrape(BalancerCollector(self.control))
        self.assertEqual(now[("lbproxy_backend_up", (("backend", "b2"),))], 0)
        self.assertEqual(now[("lbproxy_backend_weight", (("backend", "b1"),))], 0)
        self.assertEqual(now[("lbproxy_backend_weight", (("backend", "b2"),))], 1)

    def test_notifications_and_subscriptions(self) -> None:
        """Notification counters (RefusalCounters) and subscription states are exported;
        absent objects just leave their metrics out."""
        refusals = RefusalCounters()
        collector = BalancerCollector(
            self.control,
            notify=refusals,
            peer_states=lambda: {"ha1": "SUBSCRIBED", "ha2": "DISCONNECTED"},
            subscriptions=[Subscription(True), Subscription(True), Subscription(False)],
        )
        refusals.accepted += 5
        refusals.refuse(Refusal.STALE, "ha1")
        refusals.refuse(Refusal.STALE, "ha1")
        refusals.refuse(Refusal.NOT_ENTITLED, "ha2")
        now = self.scrape(collector)
        self.assertEqual(now[("lbproxy_notifications_accepted_total", (("kind", "all"),))], 5)
        self.assertEqual(
            now[("lbproxy_notifications_refused_total", (("reason", "stale"),))], 2
        )
        self.assertEqual(
            now[("lbproxy_notifications_refused_total", (("reason", "not_entitled"),))], 1
        )
        self.assertEqual(
            now[("lbproxy_peer_state", (("peer", "ha1"), ("state", "SUBSCRIBED")))], 1
        )
        self.assertEqual(now[("lbproxy_subscriptions", (("state", "confirmed"),))], 2)
        self.assertEqual(now[("lbproxy_subscriptions", (("state", "pending"),))], 1)
        bare = self.scrape(BalancerCollector(self.control))
        self.assertFalse([k for k in bare if "notifications" in k[0] or "peer" in k[0]])


class ScrapeTests(TestCase):
    """Scrapes over HTTP, as Prometheus does."""

    timeout = 30

    def setUp(self) -> None:
        self.clock = task.Clock()
        self.balancer = real_balancer(self.clock)
        self.control = Control(self.balancer)

    @defer.inlineCallbacks
    def get(self, port: int) -> Any:
        agent = Agent(REACTOR)
        response = yield agent.request(b"GET", f"http://[::1]:{port}/metrics".encode())
        self.assertEqual(response.code, 200)
        body = yield readBody(response)
        return body.decode()

    @defer.inlineCallbacks
    def test_http_scrape_shows_counters_moving(self) -> Any:
        """Two scrapes of /metrics over HTTP, parsed by prometheus_client, differ by the
        packets sent in between."""
        site = make_site(make_registry(BalancerCollector(self.control)))
        port = REACTOR.listenTCP(0, site, interface="::1")
        self.addCleanup(port.stopListening)
        first = samples((yield self.get(port.getHost().port)))
        for n in range(10):
            self.balancer.inbound(hao_packet(f"2001:db8:1::{n + 1:x}", f"2001:db8:aa::{n + 1:x}"))
        second = samples((yield self.get(port.getHost().port)))
        self.assertEqual(
            second[("lbproxy_packets_in_total", ())] - first[("lbproxy_packets_in_total", ())],
            10,
        )
        self.assertEqual(second[("lbproxy_misses_total", (("kind", "hoa"),))], 10)
        self.assertEqual(second[("lbproxy_table_bindings", ())], 10)

    @defer.inlineCallbacks
    def test_service_listens_on_its_endpoint(self) -> Any:
        """make_metrics_service serves /metrics on the configured strports endpoint."""
        probe = socket.socket(socket.AF_INET6)
        probe.bind(("::1", 0))
        number = probe.getsockname()[1]
        probe.close()
        service = make_metrics_service(rf"tcp6:{number}:interface=\:\:1", self.control, REACTOR)
        service.startService()
        self.addCleanup(service.stopService)
        text = yield self.get(number)
        self.assertIn("lbproxy_packets_in_total 0.0", text)


class NoWalkTable(StickyTable):
    """The real table, except that walking it fails the test."""

    def __iter__(self) -> Any:
        raise AssertionError("a scrape walked the table")


class ProductionMetricsTests(SynchronousTestCase):
    """process_*, build_info, capacity, and a scrape that costs the same at any size."""

    def setUp(self) -> None:
        self.clock = task.Clock()
        self.balancer = Balancer(
            chain=KeyChain.from_names(["hoa", "src"]),
            table=NoWalkTable(self.clock, lifetime=30.0, max_entries=50_000),
            scheduler=RoundRobin(),
            backends=[Backend("b1", "2001:db8:100::1"), Backend("b2", "2001:db8:100::2")],
            virtual_addresses=[ipaddress.IPv6Address(VIP)],
            clock=self.clock,
        )
        self.control = Control(self.balancer)

    def scrape(self) -> dict[Any, float]:
        from prometheus_client.exposition import generate_latest

        return samples(generate_latest(make_registry(BalancerCollector(self.control))).decode())

    def test_process_build_and_capacity(self) -> None:
        """The process collector's families, lbproxy_build_info with the version, and the
        table's capacity are on the page."""
        import platform

        from lbproxy import __version__

        got = self.scrape()
        names = {name for name, _ in got}
        for name in ("process_cpu_seconds_total", "process_resident_memory_bytes",
                     "process_open_fds", "process_start_time_seconds"):
            self.assertIn(name, names)
        self.assertEqual(got[("lbproxy_build_info", (("python", platform.python_version()),
                                                     ("version", __version__)))], 1)
        self.assertEqual(got[("lbproxy_table_capacity", ())], 50_000)

    def test_scrape_does_not_walk_the_table(self) -> None:
        """With 20,000 bindings in a table that fails when walked, a scrape still gives
        every family, per-backend bindings included (from the load counts)."""
        for i in range(20_000):
            key = real_key(f"addr 2001:db8:7::{i:x}")
            actions.move(self.balancer, key, "b1" if i % 4 else "b2")
        got = self.scrape()
        self.assertEqual(got[("lbproxy_backend_bindings", (("backend", "b1"),))], 15_000)
        self.assertEqual(got[("lbproxy_backend_bindings", (("backend", "b2"),))], 5_000)
        self.assertEqual(got[("lbproxy_table_bindings", ())], 20_000)


class HealthzTests(TestCase):
    """/healthz and /metrics over HTTP on the service's endpoint, and nothing in the log."""

    timeout = 30

    def setUp(self) -> None:
        self.clock = task.Clock()
        self.balancer = real_balancer(self.clock)
        self.forwarding = True
        self.control = Control(self.balancer, forwarding=lambda: self.forwarding)
        probe = socket.socket(socket.AF_INET6)
        probe.bind(("::1", 0))
        self.number = probe.getsockname()[1]
        probe.close()
        service = make_metrics_service(rf"tcp6:{self.number}:interface=\:\:1", self.control,
                                       REACTOR)  # fmt: skip
        service.startService()
        self.addCleanup(service.stopService)
        self.events: list[dict[str, Any]] = []
        observer = cast(ILogObserver, self.events.append)
        globalLogPublisher.addObserver(observer)
        self.addCleanup(globalLogPublisher.removeObserver, observer)

    @defer.inlineCallbacks
    def get(self, path: str) -> Any:
        agent = Agent(REACTOR)
        response = yield agent.request(b"GET", f"http://[::1]:{self.number}{path}".encode())
        body = yield readBody(response)
        return response.code, response.headers.getRawHeaders(b"content-type"), body

    @defer.inlineCallbacks
    def test_healthz(self) -> Any:
        """200 and status ok while forwarding with a usable backend; 503 when every
        backend is down or drained, or when forwarding stopped."""
        code, kind, body = yield self.get("/healthz")
        self.assertEqual((code, kind), (200, [b"application/json"]))
        self.assertEqual(json.loads(body), {"status": "ok", "forwarding": True, "backends": 2,
                                            "up": 2, "usable": 2})  # fmt: skip
        self.balancer.set_backend_up("b1", False)
        actions.drain(self.balancer, "b2", self.control.weights)
        code, _, body = yield self.get("/healthz")
        self.assertEqual((code, json.loads(body)["status"]), (503, "unavailable"))
        actions.undrain(self.balancer, "b2", self.control.weights)
        code, _, body = yield self.get("/healthz")
        self.assertEqual(code, 200)
        self.forwarding = False
        code, _, body = yield self.get("/healthz")
        self.assertEqual((code, json.loads(body)["forwarding"]), (503, False))

    @defer.inlineCallbacks
    def test_scrapes_are_not_logged(self) -> Any:
        """Ten scrapes and health checks leave no line in the log."""
        for _ in range(5):
            code, _, _ = yield self.get("/metrics")
            self.assertEqual(code, 200)
            yield self.get("/healthz")
        mine = [formatEvent(e) for e in self.events
                if "GET" in formatEvent(e) or "Site" in formatEvent(e)
                or "metrics" in str(e.get("log_namespace", ""))]
        self.assertEqual(mine, [])
