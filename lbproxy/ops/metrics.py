"""Prometheus metrics read from the live balancer on every scrape.

The data path keeps plain integer counters (``Balancer.counters``, the
table's ``stats``, the notification service's counters) because a Python
per-packet ``Counter.inc()`` would cost more than the work it measures.  This
module turns them into Prometheus metric families *at scrape time* with a
custom collector, so counting stays free and the numbers are always current.

Objects the collector reads may be missing (no notification service
configured, no health checks): their metrics are simply absent.

A scrape costs the same whatever the table holds: per-backend bindings come from the
table's load counts, kept as bindings come and go, never from walking the table.  Besides
lbproxy's own families the page has ``process_*`` (prometheus_client's
``ProcessCollector``: CPU, memory, file descriptors, start time), ``lbproxy_build_info``
and the table's capacity.

The page is rendered in the reactor thread, not through
``prometheus_client.twisted.MetricsResource``: that one runs the collector
in a thread pool, where reading the live objects would race the reactor
thread that mutates them.

The same endpoint serves ``/healthz`` for load balancers and supervisors in front of
this one: ``200`` and ``{"status": "ok", ...}`` when packets are being forwarded and at
least one backend is up with a weight above 0 (and, in a fleet, the store's records were
loaded once), ``503`` and ``{"status": "unavailable", ...}`` otherwise
(`Control.health`).  Neither page is written to the log: a scrape every few seconds would
drown everything else.
"""

from __future__ import annotations

import json
import platform
from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import Any

from prometheus_client import ProcessCollector
from prometheus_client.core import (
    CollectorRegistry,
    CounterMetricFamily,
    GaugeMetricFamily,
    InfoMetricFamily,
    Metric,
)
from prometheus_client.exposition import choose_encoder
from twisted.application import strports
from twisted.application.service import IService
from twisted.web import http
from twisted.web.resource import Resource
from twisted.web.server import Request, Site

from lbproxy import __version__
from lbproxy.ops.control import Control

PREFIX = "lbproxy"


def _number(value: object) -> float | None:
    if isinstance(value, bool):
        return float(value)
    if isinstance(value, int | float):
        return float(value)
    return None


class BalancerCollector:
    """A prometheus_client collector over one balancer and its helpers.

    ``control`` gives the balancer, table, backends and health; ``notify``
    is any object with ``accepted`` (an int, or a mapping of kind to count)
    and ``refused`` or ``counts`` (a mapping of reason to count, enum keys
    allowed), such as ``notify.policy.RefusalCounters``; ``peer_states``
    returns the state of each notification peer connection, by peer name;
    ``subscriptions`` is iterable over subscriptions with a ``confirmed`` flag
    (``notify.subscriptions.Subscriptions``).
    """

    def __init__(
        self,
        control: Control,
        notify: object | None = None,
        peer_states: Callable[[], Mapping[str, object]] | None = None,
        subscriptions: Iterable[object] | None = None,
    ) -> None:
        self.control = control
        self.notify = notify
        self.peer_states = peer_states
        self.subscriptions = subscriptions

    def describe(self) -> list[Metric]:
        """Nothing up front: metrics depend on what the objects hold at scrape."""
        return []

    def collect(self) -> Iterator[Metric]:
        """Build every metric family from the live objects."""
        yield InfoMetricFamily(
            f"{PREFIX}_build", "lbproxy's version and the Python running it (always 1).",
            value={"version": __version__, "python": platform.python_version()},
        )
        yield from self._packets()
        yield from self._table()
        yield from self._backends()
        yield from self._notifications()
        yield from self._subscriptions()

    def _ports(self, stats: Mapping[str, Any]) -> Iterator[Metric]:
        """What the sockets counted (absent when the control has no forwarder)."""
        ports = stats.get("ports")
        if not ports:
            return
        received = CounterMetricFamily(
            f"{PREFIX}_port_received", "Packets read from a link, by reader.", labels=["port"]
        )
        lost = CounterMetricFamily(
            f"{PREFIX}_port_lost",
            "Packets lost at the sockets, by port and reason (oversize, kernel queue full, "
            "handler failure, and the writer's refusals by errno name).",
            labels=["port", "reason"],
        )
        for port in ("client", "server"):
            counters = ports.get(port)
            if counters is None:
                continue
            received.add_metric([port], counters["received"])
            for reason, key in (("oversize", "oversize"), ("kernel-queue-full", "kernel_drops"),
                                ("handler-failed", "handler_errors")):  # fmt: skip
                lost.add_metric([port, reason], counters[key])
        writer = ports.get("writer", {})
        for errno_name, count in sorted(writer.get("errors", {}).items()):
            lost.add_metric(["writer", errno_name], count)
        fast = ports.get("fast_path")
        if fast is not None:
            lost.add_metric(["fast-path", "handler-failed"], fast["errors"])
        yield received
        yield lost
        yield CounterMetricFamily(
            f"{PREFIX}_port_sent", "Packets the kernel took for sending.", writer.get("sent", 0)
        )
        if fast is not None:
            family = CounterMetricFamily(
                f"{PREFIX}_fast_path_packets",
                "Packets forwarded by the fast path (lbproxy.io.fastpath), by direction.",
                labels=["direction"],
            )
            family.add_metric(["to-backend"], fast["forwarded"])
            family.add_metric(["to-terminal"], fast.get("replies", 0))
            yield family
        xdp = ports.get("xdp")
        if xdp is not None:
            yield GaugeMetricFamily(
                f"{PREFIX}_xdp_active",
                "Whether the XDP program forwards in the driver (1) or not (0; the reason "
                "is in lbproxyctl stats, ports.xdp.reason).",
                int(xdp.get("active", 0) or 0),
            )
            for unit, forwarded, replies, help_text in (
                ("packets", "forwarded", "replies", "Packets forwarded by the XDP program"),
                ("bytes", "forwarded_bytes", "reply_bytes", "Bytes forwarded by the XDP "
                                                            "program"),
            ):
                family = CounterMetricFamily(f"{PREFIX}_xdp_{unit}",
                                             f"{help_text}, by direction.",
                                             labels=["direction"])  # fmt: skip
                family.add_metric(["to-backend"], int(xdp.get(forwarded, 0) or 0))
                family.add_metric(["to-terminal"], int(xdp.get(replies, 0) or 0))
                yield family

    def _packets(self) -> Iterator[Metric]:
        stats = self.control.stats()
        yield from self._ports(stats)
        yield CounterMetricFamily(
            f"{PREFIX}_packets_in", "Packets received from terminals.", stats["packets_in"]
        )
        for name, help_text in (
            ("packets_out", "Packets forwarded to backends."),
            ("replies_in", "Backend replies received."),
            ("replies_out", "Backend replies forwarded to terminals."),
            ("reassigned", "Bindings moved off a backend that went down."),
        ):
            yield CounterMetricFamily(f"{PREFIX}_{name}", help_text, stats[name])
        dropped = CounterMetricFamily(
            f"{PREFIX}_packets_dropped", "Packets dropped, by reason.", labels=["reason"]
        )
        for reason, count in sorted(stats["dropped"].items()):
            dropped.add_metric([reason], count)
        yield dropped
        for name, help_text in (
            ("hits", "Sticky-table hits, by the strategy whose identity found the binding."),
            ("misses", "Sticky-table misses (new bindings scheduled), by strategy."),
            ("conflicts", "Identities of a packet bound to another binding than the one the "
                          "packet went to (linking never moves them), by strategy."),
        ):
            family = CounterMetricFamily(f"{PREFIX}_{name}", help_text, labels=["kind"])
            for kind, count in sorted(stats[name].items()):
                family.add_metric([kind], count)
            yield family
        correspondent = CounterMetricFamily(
            f"{PREFIX}_correspondent", "The correspondent node's outcomes (Test Inits "
            "answered, Binding Updates accepted, messages sent), by event; its refusals are "
            "in packets_dropped.", labels=["event"])  # fmt: skip
        for event, count in sorted(stats.get("correspondent", {}).items()):
            correspondent.add_metric([event], count)
        yield correspondent

    def _table(self) -> Iterator[Metric]:
        table = self.control.stats()["table"]
        yield GaugeMetricFamily(
            f"{PREFIX}_table_bindings", "Bindings in the sticky table.", table["size"]
        )
        yield GaugeMetricFamily(
            f"{PREFIX}_table_capacity",
            "Bindings the sticky table may hold (balancer.max_entries).",
            table.get("capacity", 0),
        )
        yield GaugeMetricFamily(
            f"{PREFIX}_table_aliases",
            "Identities leading to another identity's binding (a terminal's other "
            "addresses, interface ID, SPI).",
            table.get("aliases", 0),
        )
        for name, help_text in (
            ("links", "Identities linked to a binding as aliases."),
            ("alias_evictions", "Aliases dropped to keep a binding's bound."),
            ("established_evictions", "Established bindings evicted to make room (only "
                                      "when no less busy binding was left)."),
            ("throttled", "New bindings refused because their source prefix made too "
                          "many lately (admission, under a flood)."),
            ("inserts", "Bindings inserted."),
            ("expirations", "Bindings whose lifetime ran out."),
            ("evictions", "Bindings evicted to make room."),
            ("refusals", "Inserts refused because the table was full."),
        ):
            yield CounterMetricFamily(f"{PREFIX}_table_{name}", help_text, table[name])

    def _backends(self) -> Iterator[Metric]:
        backends = self.control.backends()
        bindings = GaugeMetricFamily(
            f"{PREFIX}_backend_bindings",
            "Bindings per backend (those whose lifetime ran out count until the next sweep).",
            labels=["backend"],
        )
        packets = CounterMetricFamily(
            f"{PREFIX}_backend_packets",
            "Packets forwarded per backend.",
            labels=["backend"],
        )
        weight = GaugeMetricFamily(
            f"{PREFIX}_backend_weight", "Configured weight (0 = drained).", labels=["backend"]
        )
        up = GaugeMetricFamily(
            f"{PREFIX}_backend_up", "1 up, 0 down by health checks.", labels=["backend"]
        )
        for backend in backends:
            name = backend["name"]
            bindings.add_metric([name], backend["bindings"])
            packets.add_metric([name], backend["packets"])
            weight.add_metric([name], backend["weight"])
            if backend["state"] in ("up", "down"):
                up.add_metric([name], 1 if backend["state"] == "up" else 0)
        yield from (bindings, packets, weight, up)

    def _notifications(self) -> Iterator[Metric]:
        if self.notify is None:
            return
        accepted: Any = getattr(self.notify, "accepted", None)
        refused: Any = getattr(self.notify, "refused", None)
        if refused is None:
            refused = getattr(self.notify, "counts", None)  # notify.policy.RefusalCounters
        yield _labelled(
            f"{PREFIX}_notifications_accepted",
            "Care-of address notifications accepted.",
            "kind",
            accepted,
        )
        yield _labelled(
            f"{PREFIX}_notifications_refused",
            "Connections, subscriptions and notifications refused, by reason.",
            "reason",
            refused,
        )

    def _subscriptions(self) -> Iterator[Metric]:
        if self.peer_states is not None:
            family = GaugeMetricFamily(
                f"{PREFIX}_peer_state",
                "1 for the state each notification peer connection is in.",
                labels=["peer", "state"],
            )
            for peer, state in sorted(self.peer_states().items()):
                family.add_metric([str(peer), str(getattr(state, "value", state))], 1)
            yield family
        if self.subscriptions is not None:
            totals = {"confirmed": 0, "pending": 0}
            for subscription in self.subscriptions:
                state = "confirmed" if getattr(subscription, "confirmed", False) else "pending"
                totals[state] += 1
            family = GaugeMetricFamily(
                f"{PREFIX}_subscriptions",
                "Care-of address subscriptions, confirmed by the agent or pending.",
                labels=["state"],
            )
            for state, number in totals.items():
                family.add_metric([state], number)
            yield family


def _labelled(name: str, help_text: str, label: str, value: Any) -> Metric:
    """A counter family from an int (label "all") or a mapping (enum keys allowed)."""
    family = CounterMetricFamily(name, help_text, labels=[label])
    if isinstance(value, Mapping):
        for key, count in sorted(
            ((str(getattr(k, "value", k)), v) for k, v in value.items())
        ):
            family.add_metric([key], float(count))
    elif (number := _number(value)) is not None:
        family.add_metric(["all"], number)
    return family


class MetricsPage(Resource):
    """The exposition page, rendered in the reactor thread."""

    isLeaf = True

    def __init__(self, registry: CollectorRegistry) -> None:
        super().__init__()
        self.registry = registry

    def render_GET(self, request: Request) -> bytes:
        """Encode the registry in the format the scraper accepts."""
        accept = request.getHeader("accept")
        encoder, content_type = choose_encoder(accept or "")
        output: bytes = encoder(self.registry)
        request.setHeader(b"Content-Type", content_type.encode("ascii"))
        return output


class HealthPage(Resource):
    """``/healthz``: 200 when this balancer can take new terminals, 503 otherwise, with
    `Control.health` as a small JSON body."""

    isLeaf = True

    def __init__(self, control: Control) -> None:
        super().__init__()
        self.control = control

    def render_GET(self, request: Request) -> bytes:
        """The verdict and its parts."""
        health = self.control.health()
        request.setResponseCode(200 if health["status"] == "ok" else 503)
        request.setHeader(b"Content-Type", b"application/json")
        request.setHeader(b"Cache-Control", b"no-store")
        return json.dumps(health, sort_keys=True).encode("ascii") + b"\n"


class QuietSite(Site):
    """A site that writes no access log and no "Starting factory" lines."""

    noisy = False

    def log(self, request: http.Request) -> None:
        """No access log: a scrape every few seconds would drown the rest."""


def make_registry(collector: BalancerCollector, process: bool = True) -> CollectorRegistry:
    """A registry holding ``collector`` and (``process``) this process's ``process_*``
    metrics (no process-global state)."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(collector)
    if process:
        ProcessCollector(registry=registry)
    return registry


def make_site(registry: CollectorRegistry, control: Control | None = None) -> Site:
    """A site serving ``/metrics`` (and ``/healthz`` for ``control``)."""
    root = Resource()
    root.putChild(b"metrics", MetricsPage(registry))
    if control is not None:
        root.putChild(b"healthz", HealthPage(control))
    return QuietSite(root)


def make_metrics_service(
    endpoint: str,
    control: Control,
    reactor: Any = None,
    notify: object | None = None,
    peer_states: Callable[[], Mapping[str, object]] | None = None,
    subscriptions: Iterable[object] | None = None,
    extra: Iterable[Any] = (),
) -> IService:
    """Serve the balancer's metrics at ``/metrics`` and its health at ``/healthz`` on
    the strports ``endpoint``; ``extra`` collectors (the fleet's) are served too.

    ``endpoint`` is e.g. ``tcp6:9100:interface=\\:\\:1``.
    """
    registry = make_registry(BalancerCollector(control, notify, peer_states, subscriptions))
    for collector in extra:
        registry.register(collector)
    site = make_site(registry, control)
    service: IService = strports.service(endpoint, site, reactor=reactor)
    return service
