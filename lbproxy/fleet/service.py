"""The fleet service: one balancer's part in a fleet sharing its exceptions through a store.

`FleetService` builds the parts (`Layout`, `Replica`, `Sync`, `RedisStore`), runs them
with the balancer's service tree, and gives the operator's view: `stats` (counters, the
store's state, queue sizes) and `view` (one key as this balancer, the fleet and Maglev see
it), both JSON-ready, and `FleetCollector` (Prometheus metric families, read at scrape
time).  The wiring (`lbproxy.tap`) sets ``balancer.shared = service.replica`` and gives
the notification listener `return_paths` instead of the balancer's own.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterator, Mapping
from typing import Any

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from twisted.application.service import Service
from twisted.internet import defer
from twisted.internet.task import LoopingCall

from lbproxy.core.balancer import Balancer
from lbproxy.core.keys import Key
from lbproxy.fleet.codec import NAME, Layout
from lbproxy.fleet.replica import Replica
from lbproxy.fleet.store import RedisStore, default_name
from lbproxy.fleet.sync import ConfirmingReturnPaths, Sync

__all__ = ["FleetCollector", "FleetService"]


class FleetService(Service):
    """Shares this balancer's exceptions and confirmations with the fleet, and keeps the
    replica `Balancer.shared` answers from."""

    name = "fleet"

    def __init__(
        self,
        balancer: Balancer,
        reactor: Any,
        *,
        store: str,
        prefix: str = "lbproxy:",
        name: str = "",
        queue_limit: int = 100_000,
        timeout: float = 2.0,
        max_keys: int = 1_000_000,
        password: str | None = None,
    ) -> None:
        self.balancer = balancer
        self.reactor = reactor
        self.member = name or default_name()
        if NAME.fullmatch(self.member) is None:
            raise ValueError(f"fleet member name {self.member!r}: letters, digits, '_.:-'")
        self.layout = Layout(prefix)
        self.replica = Replica(reactor, max_keys)
        self.sync = Sync(balancer, self.replica, self.layout, self.member, reactor, queue_limit)
        self.store = RedisStore(store, self.layout, self.replica, self.sync, self.member,
                                reactor, timeout=timeout, password=password)
        self._refresher = LoopingCall(self.sync.refresh)
        self._refresher.clock = reactor

    @classmethod
    def from_config(cls, config: Any, balancer: Balancer, reactor: Any) -> FleetService:
        """From the configuration's ``[fleet]`` section (`lbproxy.config.FleetConfig`)."""
        password = None
        if config.password_file:
            with open(config.password_file) as f:
                password = f.read().strip() or None
        return cls(balancer, reactor, store=config.store, prefix=config.prefix,
                   name=config.name, queue_limit=config.queue_limit, timeout=config.timeout,
                   max_keys=config.max_keys, password=password)

    def return_paths(self) -> ConfirmingReturnPaths:
        """The return paths to give the notification listener: the balancer's own, whose
        confirmations are also published to the fleet."""
        return ConfirmingReturnPaths(self.balancer.return_paths, self.sync)

    # -- life cycle ----------------------------------------------------------------------

    def startService(self) -> None:
        super().startService()
        self.sync.attach()
        self.sync.rescan()  # the exceptions of a restored table
        self.store.start()
        self._refresher.start(max(1.0, self.sync.lifetime / 8), now=False)

    def stopService(self) -> defer.Deferred[Any]:
        super().stopService()
        if self._refresher.running:
            self._refresher.stop()
        self.sync.stop()
        return self.store.stop()

    @property
    def loaded(self) -> bool:
        """Whether the store's records have been loaded into the replica at least once
        (``/healthz`` waits for it: until then this balancer knows no exception)."""
        return self.replica.loads > 0

    # -- the operator's view ---------------------------------------------------------------

    def stats(self) -> dict[str, Any]:
        """Counters and state, JSON-ready (``lbproxyctl stats`` under ``fleet``)."""
        refused = dict(self.store.refused)
        for reason, n in self.sync.refused.items():
            refused[reason] = refused.get(reason, 0) + n
        return {
            "member": self.member,
            "store": self.store.status(),
            "replica": self.replica.counts(),
            "exceptions": len(self.sync.mine),
            "pending": len(self.sync.pending),
            "confirm_pending": len(self.sync.confirm_pending),
            "shared_hits": self.balancer.counters.shared_hits,
            **self.sync.counters,
            "refused": refused,
        }

    def view(self, key: Key | str) -> dict[str, Any]:
        """One identity as this balancer (``local``), the fleet (``shared``) and Maglev
        (``maglev``) see it, JSON-ready (``lbproxyctl fleet KEY``)."""
        if isinstance(key, str):
            key = Key.parse(key)
        now = self.reactor.seconds()
        raw = bytes(key)
        b = self.balancer.table.get(key, now)
        local = None
        if b is not None:
            local = {"backend": b.backend.name, "expires_in": round(b.expires - now, 3),
                     "binding": str(b.key), "alias": bytes(b.key) != raw,
                     "established": b.established}
        entry = self.replica.binding(raw, now)
        shared = None
        if entry is not None:
            shared = {"backend": entry.field, "origin": entry.origin,
                      "version": entry.version, "expires_in": round(entry.expires - now, 3)}
        confirmed = None
        if key.kind == "addr":
            c = self.replica.confirmation(key.value, now)
            local_coa = self.balancer.return_paths.care_of(key.value)
            if c is not None or local_coa is not None:
                confirmed = {
                    "local": str(ipaddress.IPv6Address(local_coa)) if local_coa else None,
                    "shared": c.field if c is not None else None,
                    "origin": c.origin if c is not None else None,
                }
        maglev = self.sync.reference(raw)
        backend = local["backend"] if local else None
        return {
            "key": str(key),
            "member": self.member,
            "local": local,
            "shared": shared,
            "maglev": maglev,
            "exception": backend is not None and backend != maglev,
            "published": raw in self.sync.mine,
            "confirmed": confirmed,
            "store": self.store.state,
        }


class FleetCollector:
    """Prometheus metric families of a `FleetService`, read at scrape time."""

    def __init__(self, fleet: FleetService) -> None:
        self.fleet = fleet

    def describe(self) -> list[Metric]:
        return []

    def collect(self) -> Iterator[Metric]:
        stats = self.fleet.stats()
        store = stats["store"]
        up = GaugeMetricFamily("lbproxy_fleet_store_up", "1 when the fleet's store is up "
                               "and the replica loaded")
        up.add_metric([], 1.0 if store["state"] == "up" else 0.0)
        yield up
        for name, value, help_text in (
            ("replica_records", stats["replica"]["bindings"] + stats["replica"]["confirmations"],
             "records of the fleet held in the local replica"),
            ("exceptions", stats["exceptions"], "local bindings that differ from Maglev"),
            ("pending", stats["pending"] + stats["confirm_pending"],
             "changes waiting for the store"),
        ):
            gauge = GaugeMetricFamily(f"lbproxy_fleet_{name}", help_text)
            gauge.add_metric([], float(value))
            yield gauge
        for name in ("writes", "deletes", "queue_overflows", "remote_moves", "remote_unusable",
                     "remote_confirms", "rescans", "reconciled"):
            counter = CounterMetricFamily(f"lbproxy_fleet_{name}", f"fleet: {name}")
            counter.add_metric([], float(stats[name]))
            yield counter
        for name in ("outages", "messages", "loads"):
            counter = CounterMetricFamily(f"lbproxy_fleet_store_{name}", f"store: {name}")
            counter.add_metric([], float(store[name]))
            yield counter
        yield _labelled("lbproxy_fleet_refused", "values from the store refused, by reason",
                        stats["refused"])


def _labelled(name: str, help_text: str, counts: Mapping[str, int]) -> Metric:
    family = CounterMetricFamily(name, help_text, labels=["reason"])
    for reason, n in sorted(counts.items()):
        family.add_metric([reason], float(n))
    return family
