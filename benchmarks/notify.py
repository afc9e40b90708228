"""Benchmark the care-of address notification path (docs/notify.md).

1. Notifications applied per second on loopback: a home-agent agent and a balancer's
   Notifier over mutually authenticated TLS; the agent's cache changes N times, each change
   is a BindingChanged the balancer checks and applies to a RecordingListener.
2. Binding Update on the home link -> table change, p50/p99 over many moves (root only):
   a veth pair in two ``lbnt`` network namespaces is the home link; a BU arrives from the
   mobile node's side and the home agent's BA leaves from the agent's side; the agent's
   AF_PACKET reader learns the binding, notifies the balancer over TLS, whose TableListener
   rekeys a real StickyTable.  Time from sending the BU to the table's rekey.

Run: ``.venv/bin/python benchmarks/notify.py [--changes N] [--moves M]``.
"""

from __future__ import annotations

import argparse
import ipaddress
import socket
import statistics
import time
from typing import Any

from twisted.internet import reactor as _reactor
from twisted.internet.defer import Deferred, inlineCallbacks
from twisted.internet.endpoints import TCP4ClientEndpoint
from twisted.internet.task import deferLater

from lbproxy.agents.config import AgentCommon, HomeAgentConfig
from lbproxy.agents.homeagent import HomeAgentService
from lbproxy.agents.link import LinkReader
from lbproxy.core.keys import Key
from lbproxy.core.selection import Backend
from lbproxy.core.table import StickyTable
from lbproxy.notify.adapter import TableListener
from lbproxy.notify.client import Peer
from lbproxy.notify.listener import RecordingListener
from lbproxy.notify.machine import PeerState
from lbproxy.notify.pki import CertificateAuthority
from lbproxy.notify.router import Notifier
from lbproxy.wire import mobility as m

reactor: Any = _reactor
CA = CertificateAuthority()
BALANCER = CA.issue(dns=["lb1.bench"])
HA_CERT = CA.issue(dns=["ha1.bench"])
PREFIX = "2001:db8:7a::/64"


def addr(n: int, prefix: str = "2001:db8:7a::") -> bytes:
    return ipaddress.IPv6Address(int(ipaddress.IPv6Address(prefix)) + n).packed


async def until(predicate: Any, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise TimeoutError("benchmark step timed out")
        await deferLater(reactor, 0.001, lambda: None)


def setup(listener: Any) -> tuple[HomeAgentService, Notifier]:
    config = HomeAgentConfig(
        path="bench",
        common=AgentCommon("tcp:0:interface=127.0.0.1", "", "", "", ("lb1.bench",)),
        prefixes=(ipaddress.IPv6Network(PREFIX),),
    )
    service = HomeAgentService(config, reactor, CA.material(HA_CERT))
    service.startService()
    port = service.listening._waitingForPort.result  # type: ignore[union-attr]
    endpoint = TCP4ClientEndpoint(reactor, "127.0.0.1", port.getHost().port)
    notifier = Notifier(
        [(Peer.home_agent("ha1", "ha1.bench", [PREFIX]), endpoint)],
        CA.material(BALANCER), listener, reactor, max_subscriptions=100_000,
    )
    notifier.startService()
    return service, notifier


async def loopback(changes: int, terminals: int = 1000) -> float:
    listener = RecordingListener()
    service, notifier = setup(listener)
    now = reactor.seconds()
    for i in range(terminals):
        service.cache.update(addr(i + 1), addr(1, "2001:db8:c1::"), 1, 3600, now)
        notifier.terminal_seen(addr(i + 1), home=True)
    client = notifier.clients["ha1"]
    await until(lambda: client.machine.state is PeerState.SUBSCRIBED
                and len(listener.changes) == terminals)
    start = time.perf_counter()
    for n in range(changes):
        i, round_ = n % terminals, n // terminals
        coa = addr(round_ + 2, "2001:db8:c1::")
        service.cache.update(addr(i + 1), coa, (round_ + 2) & 0xFFFF, 3600, now)
    await until(lambda: len(listener.changes) == terminals + changes, timeout=120)
    elapsed = time.perf_counter() - start
    await notifier.stopService()
    await service.stopService()
    assert notifier.counters.total() == 0, notifier.counters.counts
    return changes / elapsed


class TimedListener(TableListener):
    """A TableListener that notes when each change was applied."""

    def __init__(self, table: StickyTable) -> None:
        super().__init__(table)
        self.applied_at: list[float] = []

    def binding_changed(self, *args: Any) -> None:
        super().binding_changed(*args)
        self.applied_at.append(time.perf_counter())


async def home_link(moves: int) -> list[float]:
    from lbproxy.io.rawsocket import _network_namespace
    from lbproxy.testing import VethPair

    why = VethPair.unavailable()
    if why:
        raise RuntimeError(why)
    pair = VethPair("lbnt", near_address="2001:db8:7a::1", far_address="2001:db8:7a::2",
                    routed="2001:db8:7b::/64")
    pair.create()
    try:
        table = StickyTable(reactor, lifetime=300.0, max_entries=100_000)
        table.insert(Key("src", addr(1, "2001:db8:c1::")), Backend(
            "srv1", ipaddress.IPv6Address("2001:db8:100::1")))
        listener = TimedListener(table)
        service, notifier = setup(listener)
        reader = LinkReader(reactor, pair.near_interface, service.observer.frame)
        with _network_namespace(pair.near):
            reader.open()
            ha = socket.socket(socket.AF_PACKET, socket.SOCK_RAW)
            ha.bind((pair.near_interface, 0))
        with _network_namespace(pair.far):
            mn = socket.socket(socket.AF_PACKET, socket.SOCK_RAW)
            mn.bind((pair.far_interface, 0))
        reader.start()
        near = bytes.fromhex(pair.near_mac.replace(":", ""))
        far = bytes.fromhex(pair.far_mac.replace(":", ""))
        home, ha_addr = addr(0x16), addr(1)

        def move(seq: int, coa: bytes) -> None:
            bu = m.bu_packet(coa, ha_addr, home, m.BindingUpdate(seq, 100))
            mn.send(near + far + b"\x86\xdd" + bu)
            ba = m.ba_packet(ha_addr, coa, home, m.BindingAck(0, seq, 100))
            ha.send(far + near + b"\x86\xdd" + ba)

        move(1, addr(1, "2001:db8:c1::"))
        await until(lambda: service.cache.get(home) is not None)
        notifier.terminal_seen(addr(1, "2001:db8:c1::"))
        await until(lambda: notifier.clients["ha1"].machine.state is PeerState.SUBSCRIBED)
        latencies = []
        for i in range(moves):
            seq = (i + 2) & 0xFFFF
            coa = addr(1 + (i + 1) % 3, "2001:db8:c1::")
            n = len(listener.applied_at)
            start = time.perf_counter()
            move(seq, coa)
            await until(lambda n=n: len(listener.applied_at) > n, timeout=5)
            latencies.append(listener.applied_at[n] - start)
        assert len(table) == 3, len(table)  # three CoAs, returns made no new entries
        reader.stop()
        ha.close()
        mn.close()
        await notifier.stopService()
        await service.stopService()
        return latencies
    finally:
        pair.destroy()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--changes", type=int, default=20_000)
    parser.add_argument("--moves", type=int, default=1000)
    args = parser.parse_args()
    failed: list[BaseException] = []

    @inlineCallbacks
    def run() -> Any:
        try:
            rate = yield Deferred.fromCoroutine(loopback(args.changes))
            print(f"loopback TLS: {rate:,.0f} notifications applied/s "
                  f"({args.changes} BindingChanged, 1000 terminals)")
            try:
                lat = yield Deferred.fromCoroutine(home_link(args.moves))
            except RuntimeError as e:
                print(f"home link: not measured ({e})")
            else:
                q = statistics.quantiles(lat, n=100)
                print(f"BU on home link -> table rekey over {len(lat)} moves: "
                      f"p50 {q[49] * 1e3:.2f} ms, p99 {q[98] * 1e3:.2f} ms, "
                      f"max {max(lat) * 1e3:.2f} ms")
        except BaseException as e:  # report, then stop the reactor
            failed.append(e)
            raise
        finally:
            reactor.stop()

    reactor.callWhenRunning(run)
    reactor.run()
    if failed:
        raise SystemExit(f"benchmark failed: {failed[0]!r}")


if __name__ == "__main__":
    main()
