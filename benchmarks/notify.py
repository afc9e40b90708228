"""Benchmark the care-of address notification path (docs/notify.md).

1. Notifications applied per second on loopback: a home-agent agent and a balancer's
   Notifier over mutually authenticated TLS; the agent's cache changes N times, each change
   is a BindingChanged the balancer checks and applies to a RecordingListener.
2. Binding Update on the home link -> table change, p50/p99 over many moves (root only),
   with 1,000 terminals registered, subscribed and confirmed: a veth pair in two ``lbnt``
   network namespaces is the home link; a BU arrives from the mobile node's side and the
   home agent's BA leaves from the agent's side; the agent's AF_PACKET reader learns the
   binding, notifies the balancer over TLS, whose TableListener rekeys a real StickyTable.
   Time from sending the BU to the table's rekey; the terminals move in turn.

Run: ``.venv/bin/python benchmarks/notify.py [--changes N] [--moves M] [--terminals T]
[--rounds R]`` (the home link needs root; ``make bench-notify`` runs this and the bed).
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
    # Subscribed, and the reconciling snapshot done: a snapshot still under way would
    # overtake the agent's queued changes, which would then be refused as stale.
    await until(lambda: client.machine.state is PeerState.SUBSCRIBED
                and len(listener.changes) == terminals and client.snapshots >= 1)
    start = time.perf_counter()
    # Every terminal moves once per round, a round at a time: the agent queues what is
    # beyond max_outstanding (one change per terminal), none is coalesced with the next.
    for round_ in range((changes + terminals - 1) // terminals):
        moves = min(terminals, changes - round_ * terminals)
        coa = addr(round_ + 2, "2001:db8:c1::")
        for i in range(moves):
            service.cache.update(addr(i + 1), coa, (round_ + 2) & 0xFFFF, 3600, now)
        expected = terminals + round_ * terminals + moves
        await until(lambda expected=expected: len(listener.changes) >= expected, timeout=120)
    elapsed = time.perf_counter() - start
    assert len(listener.changes) == terminals + changes, len(listener.changes)
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


async def home_link(moves: int, terminals: int = 1000) -> list[float]:
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
        backends = [Backend(f"srv{b}", ipaddress.IPv6Address(f"2001:db8:100::{b}"))
                    for b in (1, 2, 3)]

        def home(i: int) -> bytes:
            return addr(0x1000 + i)

        def care_of(i: int, link: int) -> bytes:
            return addr(0x1000 + i, f"2001:db8:c{link + 1}::")

        for i in range(terminals):
            table.insert(Key("src", care_of(i, 0)), backends[i % 3])
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
        ha_addr = addr(1)
        seqs = [0] * terminals

        def move(i: int, coa: bytes) -> None:
            seqs[i] = seq = (seqs[i] + 1) & 0xFFFF
            bu = m.bu_packet(coa, ha_addr, home(i), m.BindingUpdate(seq, 100))
            mn.send(near + far + b"\x86\xdd" + bu)
            ba = m.ba_packet(ha_addr, coa, home(i), m.BindingAck(0, seq, 100))
            ha.send(far + near + b"\x86\xdd" + ba)

        # Every terminal registers from its first care-of address; its first packet there
        # subscribes (by care-of address, key = source address); the agent's answers
        # confirm them all before the moves.
        for i in range(terminals):
            move(i, care_of(i, 0))
            if i % 100 == 99:
                await deferLater(reactor, 0.01, lambda: None)
        await until(lambda: all(service.cache.get(home(i)) is not None
                                for i in range(terminals)))
        for i in range(terminals):
            notifier.terminal_seen(care_of(i, 0))
        client = notifier.clients["ha1"]
        # (Connected before these subscriptions, so no reconciling snapshot follows.)
        await until(lambda: client.machine.state is PeerState.SUBSCRIBED
                    and len(listener.applied_at) >= terminals)
        listener.applied_at.clear()
        latencies = []
        used = {(i, 0) for i in range(terminals)}
        for j in range(moves):
            i, link = j % terminals, (j // terminals + 1) % 3
            used.add((i, link))
            n = len(listener.applied_at)
            start = time.perf_counter()
            move(i, care_of(i, link))
            await until(lambda n=n: len(listener.applied_at) > n, timeout=5)
            latencies.append(listener.applied_at[n] - start)
        # Every move made one entry (the care-of addresses used), none was refused.
        assert len(table) == len(used), (len(table), len(used))
        assert notifier.counters.total() == 0, notifier.counters.counts
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
    parser.add_argument("--moves", type=int, default=1000, help="moves per round")
    parser.add_argument("--terminals", type=int, default=1000)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    failed: list[BaseException] = []

    def ms(value: float) -> str:
        return f"{value * 1e3:.2f} ms"

    @inlineCallbacks
    def run() -> Any:
        try:
            rates = []
            for _ in range(args.rounds):
                rate = yield Deferred.fromCoroutine(loopback(args.changes, args.terminals))
                rates.append(rate)
            print(f"loopback TLS: notifications applied/s ({args.changes} BindingChanged, "
                  f"{args.terminals} terminals), rounds: "
                  + " / ".join(f"{r:,.0f}" for r in rates)
                  + f"; best {max(rates):,.0f}, median {statistics.median(rates):,.0f}")
            try:
                lat = yield Deferred.fromCoroutine(
                    home_link(args.moves * args.rounds, args.terminals))
            except RuntimeError as e:
                print(f"home link: not measured ({e})")
            else:
                p50s, p99s = [], []
                for i in range(args.rounds):
                    q = statistics.quantiles(lat[i * args.moves:(i + 1) * args.moves], n=100)
                    p50s.append(q[49])
                    p99s.append(q[98])
                    print(f"BU on home link -> table rekey, round {i + 1} ({args.moves} moves, "
                          f"{args.terminals} terminals): p50 {ms(q[49])}, p99 {ms(q[98])}, "
                          f"max {ms(max(lat[i * args.moves:(i + 1) * args.moves]))}")
                print(f"BU on home link -> table rekey over {args.rounds} rounds: p50 best "
                      f"{ms(min(p50s))} / median {ms(statistics.median(p50s))}, p99 best "
                      f"{ms(min(p99s))} / median {ms(statistics.median(p99s))}")
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
