"""Fleet figures: how long a change on one balancer takes to reach another's replica.

Starts a private redis-server (UNIX socket, temporary directory; `lbproxy.testbed.store`)
and two balancers in this process, each with its own `FleetService` (its own two
connections to the store).  Balancer A makes exceptions (operator moves of keys Maglev
maps elsewhere); the time from A's table change to B's replica applying it is measured
for each:

* ``paced``: one change at a time, ``--interval`` apart (the latency of a lone rekey);
* ``burst``: ``--burst`` changes in one reactor turn (a backend-set change, a reconnect):
  each change's delay, and the changes per second the store took.

Both balancers share one reactor thread here (as each balancer has one in production),
so the figures include A's end-of-turn flush, the script's round trip through the store
and B's handling of the message.  Prints one JSON object.

    .venv/bin/python benchmarks/fleet.py [--paced 500] [--burst 5000]
"""

from __future__ import annotations

import argparse
import ipaddress
import json
import statistics
import sys
import time
from typing import Any

from twisted.internet import defer, reactor, task

from lbproxy.core import actions
from lbproxy.core.balancer import Balancer
from lbproxy.core.keys import Key, KeyChain
from lbproxy.core.selection import Backend, scheduler_from_name
from lbproxy.core.table import StickyTable
from lbproxy.fleet.codec import Change
from lbproxy.fleet.service import FleetService
from lbproxy.testbed.store import RedisServer

BACKENDS = [Backend(name=f"srv{i}", address=ipaddress.IPv6Address(f"2001:db8:b0::1{i}"))
            for i in (1, 2, 3)]


def balancer() -> Balancer:
    return Balancer(chain=KeyChain.from_names(("hoa", "src")),
                    table=StickyTable(reactor, 300.0, 1_000_000),
                    scheduler=scheduler_from_name("maglev"), backends=BACKENDS,
                    virtual_addresses=[ipaddress.IPv6Address("2001:db8:5::80")], clock=reactor)


def percentile(values: list[float], p: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(p / 100 * len(ordered)))]


def summary(delays: list[float]) -> dict[str, float]:
    ms = [d * 1000 for d in delays]
    return {"n": len(ms), "p50_ms": round(percentile(ms, 50), 3),
            "p99_ms": round(percentile(ms, 99), 3), "max_ms": round(max(ms), 3),
            "mean_ms": round(statistics.fmean(ms), 3)}


async def run(args: argparse.Namespace) -> dict[str, Any]:
    redis = RedisServer().start()
    services: list[FleetService] = []
    try:
        a, b = balancer(), balancer()
        fa = FleetService(a, reactor, store=redis.endpoint, name="lb-a")
        fb = FleetService(b, reactor, store=redis.endpoint, name="lb-b",
                          queue_limit=args.burst * 4)
        b.shared = fb.replica
        services = [fa, fb]
        for s in services:
            s.startService()
        while not (fa.store.up and fb.store.up):
            await task.deferLater(reactor, 0.01)
        sent: dict[str, float] = {}
        delays: list[float] = []

        def seen(change: Change, _: float) -> None:
            t0 = sent.pop(change.store_key, None)
            if t0 is not None:
                delays.append(time.perf_counter() - t0)

        fb.store.observers.append(seen)
        counter = iter(range(1, 1 << 30))

        def change() -> None:
            key = Key("addr", (0x20010DB8_0100 << 80 | next(counter)).to_bytes(16, "big"))
            answer = fa.sync.reference(bytes(key))
            target = next(x.name for x in BACKENDS if x.name != answer)
            sent[fa.layout.binding_key(key)] = time.perf_counter()
            actions.move(a, key, target)

        for _ in range(args.paced):
            change()
            await task.deferLater(reactor, args.interval)
        while sent:
            await task.deferLater(reactor, 0.01)
        paced = summary(delays)
        delays.clear()
        start = time.perf_counter()
        for _ in range(args.burst):
            change()
        while sent:
            await task.deferLater(reactor, 0.001)
        took = time.perf_counter() - start
        burst = summary(delays)
        burst["changes_per_s"] = round(args.burst / took)
        return {"store": "redis-server " + redis.command("INFO", "server").decode()
                .split("redis_version:")[1].split()[0],
                "paced": paced, "burst": burst,
                "replica_records_b": len(fb.replica), "writes_a": fa.stats()["writes"]}
    finally:
        for s in services:
            if s.running:
                await s.stopService()
        redis.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--paced", type=int, default=500, help="changes one at a time")
    parser.add_argument("--interval", type=float, default=0.002, help="between paced ones (s)")
    parser.add_argument("--burst", type=int, default=5000, help="changes in one turn")
    args = parser.parse_args()
    result: dict[str, Any] = {}

    def done(value: Any) -> None:
        if isinstance(value, dict):
            result.update(value)
        else:
            value.printTraceback()
        reactor.callLater(0.05, reactor.stop)

    reactor.callWhenRunning(lambda: defer.ensureDeferred(run(args)).addBoth(done))
    reactor.run()
    if not result:
        sys.exit(1)
    json.dump(result, sys.stdout, indent=1)
    sys.stdout.write("\n")


if __name__ == "__main__":
    main()
