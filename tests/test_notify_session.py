"""Deadlines and bounds (lbproxy.notify.session): silent and slow peers on both sides.

The balancer and its agents run over real TLS in memory (``twisted.test.iosim``, the harness
of ``tests.test_notify_forgeries``) on a ``task.Clock``, so an hour passes in a second and
every timer fires exactly when it is due.
"""

from __future__ import annotations

import gc
import ipaddress
import tracemalloc
from typing import Any

from twisted.internet.protocol import Factory, Protocol
from twisted.internet.task import Clock
from twisted.protocols import amp
from twisted.trial.unittest import SynchronousTestCase

from lbproxy.notify import commands as c
from lbproxy.notify.agent import AgentSession, NotificationAgent
from lbproxy.notify.cache import BindingCache
from lbproxy.notify.machine import PeerState
from lbproxy.notify.policy import PrefixEntitlement, Refusal
from lbproxy.notify.session import GuardedAMP
from tests.test_notify_forgeries import (
    CA,
    COA1,
    H1,
    HA1,
    PREFIX,
    Link,
    PumpedEndpoint,
    a,
)


class SilentSession(AgentSession):
    """An agent that completes TLS, is verified, and then never answers anything."""

    def ampBoxReceived(self, box: amp.AmpBox) -> None:
        return None


def silent_tcp(agent: NotificationAgent) -> Factory:
    """Accepts the connection and never says a word (not even TLS)."""
    return Factory.forProtocol(Protocol)


def coa(i: int) -> bytes:
    return ipaddress.IPv6Address(int(ipaddress.IPv6Address("2001:db8:a::1000")) + i).packed


class SilentAgentTests(SynchronousTestCase):
    """A silent or slow agent is dropped and counted; the balancer's memory stays flat."""

    def run_hour(self, link: Link, step: float = 1.0, seconds: float = 3600.0) -> list[int]:
        """An accelerated hour: a new terminal every ``step`` s (each a Subscribe to every
        agent); returns traced memory samples, the first after ten minutes."""
        samples: list[int] = []
        client = link.client("ha1")
        i = 0
        while link.clock.seconds() < 1000 + seconds:
            link.clock.advance(step)
            link.notifier.terminal_seen(coa(i))
            i += 1
            link.flush()
            protocol = client.protocol
            if protocol is not None:
                self.assertLessEqual(protocol.outstanding, client.max_outstanding)
                self.assertLessEqual(len(protocol._outstandingRequests), client.max_outstanding)
            if (link.clock.seconds() - 1000) % 600 == 0:
                gc.collect()
                samples.append(tracemalloc.get_traced_memory()[0])
        return samples

    def flat(self, samples: list[int]) -> None:
        # From minute 10 to minute 60: no growth beyond allocator noise and the objects
        # in flight at the moment of a sample (a full registry churns: each new terminal
        # pushes out a probationary subscription).  A leak of one Subscribe or one
        # connection per second would be megabytes: 3,000 of them at a few hundred bytes.
        self.assertGreaterEqual(len(samples), 6)
        self.assertLess(max(samples[1:]) - samples[0], 200_000, samples)

    def test_silent_after_tls(self) -> None:
        """The agent verifies and never answers: every connection is dropped when its first
        call times out (counted ``timeout``), reconnects back off, outstanding calls never
        exceed the bound, the registry stays bounded, memory is flat over an hour."""
        tracemalloc.start()
        self.addCleanup(tracemalloc.stop)
        link = Link(agent_session=SilentSession, max_subscriptions=100, call_timeout=5.0,
                    max_outstanding=8, max_delay=60.0).start()  # fmt: skip
        samples = self.run_hour(link)
        counters = link.notifier.counters
        client = link.client("ha1")
        self.flat(samples)
        # Dropped once per connection, and reconnections back off to max_delay: about an
        # hour / (60 s + 5 s) connections per agent, not one per call.
        self.assertGreater(counters[Refusal.TIMEOUT], 2 * 40)
        self.assertLess(counters[Refusal.TIMEOUT], 2 * 80)
        self.assertLess(link.endpoints["ha1"].attempts, 80)
        self.assertEqual(counters[Refusal.TIMEOUT] - 2, client.connections + link.client(
            "t1").connections - 2)  # fmt: skip
        self.assertLessEqual(len(link.notifier.subscriptions), 100)
        self.assertLessEqual(client.backlog, 100)
        self.assertEqual(counters.accepted, 0)

    def test_silent_before_tls(self) -> None:
        """The agent accepts TCP and never starts TLS: each connection is dropped after
        the handshake deadline (``timeout``), reconnects back off, memory is flat."""
        tracemalloc.start()
        self.addCleanup(tracemalloc.stop)
        link = Link(ha1_server=silent_tcp, max_subscriptions=100, handshake_timeout=5.0,
                    max_delay=60.0).start()  # fmt: skip
        samples = self.run_hour(link)
        self.flat(samples)
        client = link.client("ha1")
        self.assertEqual(client.connections, 0)
        attempts = link.endpoints["ha1"].attempts
        self.assertGreater(attempts, 40)
        self.assertLess(attempts, 80)
        # ha1's connections all timed out; t1 is fine (it answers, one connection).
        self.assertEqual(link.notifier.counters[Refusal.TIMEOUT], attempts)
        self.assertTrue(link.client("t1").connected)
        self.assertEqual(link.client("t1").connections, 1)

    def test_slow_answer_dropped(self) -> None:
        """An answer later than ``call_timeout``: the connection is dropped, the late
        answer is never applied, the subscription is sent again on the next connection."""
        link = Link(agent_session=SilentSession, call_timeout=5.0).start()
        link.caches["ha1"].update(H1, COA1, 1, 400, link.clock.seconds())
        link.notifier.terminal_seen(H1, home=True)
        link.flush()
        client = link.client("ha1")
        self.assertEqual(client.protocol.outstanding, 1)
        link.clock.advance(4.9)
        link.flush()
        self.assertEqual(link.notifier.counters[Refusal.TIMEOUT], 0)
        link.clock.advance(0.2)
        link.flush()
        self.assertEqual(link.notifier.counters[Refusal.TIMEOUT], 1)
        self.assertEqual(client.machine.state, PeerState.DISCONNECTED)
        self.assertIsNone(link.paths.care_of(H1))
        sub = link.notifier.subscriptions.get("ha1", H1)
        assert sub is not None
        self.assertFalse(sub.confirmed)

    def test_outstanding_bounded_then_drained(self) -> None:
        """With ``max_outstanding`` 4, 30 new terminals: at most 4 Subscribes in flight at
        any moment, the rest wait, and all 30 are answered in the end."""
        link = Link(max_outstanding=4).start()
        base = int(ipaddress.IPv6Address("2001:db8:1::1000"))
        homes = [ipaddress.IPv6Address(base + i).packed for i in range(30)]
        now = link.clock.seconds()
        for i, home in enumerate(homes):
            link.caches["ha1"].update(home, coa(i), 1, 400, now)
            link.notifier.terminal_seen(home, home=True)
        client = link.client("ha1")
        self.assertEqual(client.protocol.outstanding, 4)
        self.assertEqual(client.backlog, 26)
        seen = []
        for _ in range(40):
            for pump in link.endpoints["ha1"].pumps:
                pump.pump()
            seen.append(client.protocol.outstanding)
        link.flush()
        self.assertLessEqual(max(seen), 4)
        self.assertEqual(client.backlog, 0)
        self.assertEqual(sum(1 for s in link.notifier.subscriptions if s.confirmed), 30)
        self.assertEqual(link.notifier.counters.total(), 0)


class SilentBalancer(amp.AMP):
    """A balancer that subscribes and then never answers the agent's notifications."""

    answer = False

    def ampBoxReceived(self, box: amp.AmpBox) -> None:
        if amp.COMMAND in box and not self.answer:
            return None
        super().ampBoxReceived(box)


class AgentSideTests(SynchronousTestCase):
    """The agent drops a silent balancer and bounds what it owes it."""

    def agent(self, **options: Any) -> tuple[NotificationAgent, Clock]:
        clock = Clock()
        agent = NotificationAgent(BindingCache(), PrefixEntitlement.of([PREFIX]), ("lb1.test",),
                                  clock, **options)  # fmt: skip
        return agent, clock

    def test_handshake_deadline(self) -> None:
        """A client that connects and never starts TLS is dropped after the deadline."""
        agent, clock = self.agent(handshake_timeout=3.0)
        endpoint = PumpedEndpoint(agent.tls_factory(CA.material(HA1)), clock)
        endpoint.connect(Factory.forProtocol(Protocol))
        endpoint.flush()
        clock.advance(2.9)
        endpoint.flush()
        self.assertEqual(agent.counters.total(), 0)
        clock.advance(0.2)
        endpoint.flush()
        self.assertEqual(agent.counters[Refusal.TIMEOUT], 1)
        self.assertEqual(endpoint.pumps, [])

    def test_silent_balancer(self) -> None:
        """A verified balancer that subscribes, then never answers BindingChanged: at most
        ``max_outstanding`` notifications in flight, further changes coalesced (one per
        terminal), the session dropped when the first one times out (``timeout``)."""
        from lbproxy.notify.tls import client_factory

        agent, clock = self.agent(call_timeout=5.0, max_outstanding=3)
        endpoint = PumpedEndpoint(agent.tls_factory(CA.material(HA1)), clock)
        protocols: list[SilentBalancer] = []

        def build() -> SilentBalancer:
            protocols.append(SilentBalancer())
            return protocols[-1]

        endpoint.connect(client_factory(CA.material(CA.issue(dns=["lb1.test"])), "ha1.test",
                                        Factory.forProtocol(build), clock=clock))  # fmt: skip
        endpoint.flush()
        balancer = protocols[0]
        homes = [a(f"2001:db8:1::{i:x}") for i in range(1, 11)]
        for home in homes:
            agent.cache.update(home, COA1, 1, 400, clock.seconds())
            balancer.callRemote(c.Subscribe, address=home, kind="hoa", on_change=True,
                                interval=0)  # fmt: skip
        endpoint.flush()
        (session,) = agent.sessions
        self.assertEqual(len(session.subscriptions), 10)
        for n in range(2, 6):  # four moves of each of ten terminals
            for home in homes:
                agent.cache.update(home, coa(n), n, 400, clock.seconds())
            endpoint.flush()
            self.assertEqual(session.outstanding, 3)
            # At most one waiting change per terminal: 7 after the first round (3 sent),
            # then all 10 terminals have a newer change waiting.
            self.assertEqual(session.pending, 7 if n == 2 else 10)
        waiting = session._pending[homes[0]]
        self.assertEqual((waiting.old_care_of, waiting.new_care_of, waiting.seq),
                         (coa(2), coa(5), 5))  # fmt: skip
        clock.advance(5.1)
        endpoint.flush()
        self.assertEqual(agent.counters[Refusal.TIMEOUT], 1)
        self.assertEqual(agent.sessions, set())
        self.assertEqual(session.pending, 0)


class GuardedAMPTests(SynchronousTestCase):
    """The guard itself, without TLS."""

    def test_call_returns_none_at_bound(self) -> None:
        """``call`` sends nothing once ``max_outstanding`` calls wait; a dropped
        connection sends nothing either."""
        from twisted.test import iosim

        refused: list[tuple[Refusal, str]] = []
        clock = Clock()
        client = GuardedAMP(clock, lambda r, d: refused.append((r, d)), max_outstanding=2)
        server = amp.AMP()
        iosim.connect(server, iosim.makeFakeServer(server), client, iosim.makeFakeClient(client),
                      greet=False, clock=clock)  # fmt: skip
        first = [client.call(c.GetSnapshot), client.call(c.GetSnapshot)]
        self.assertTrue(all(d is not None for d in first))
        for d in first:
            assert d is not None
            d.addErrback(lambda f: None)
        self.assertIsNone(client.call(c.GetSnapshot))
        self.assertFalse(client.can_call)
        client.drop(Refusal.TIMEOUT, "test")
        client.drop(Refusal.TIMEOUT, "counted once")
        self.assertEqual(refused, [(Refusal.TIMEOUT, "test")])
        self.assertIsNone(client.call(c.GetSnapshot))
