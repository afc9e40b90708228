"""The subscription lifecycle (issue 11): subscriptions that cannot lapse, re-registrations
end to end, reconnections, agent and balancer restarts, periodic reports and snapshots.

Everything real but the network: the balancer's Notifier, gate and ``TableListener`` over a
real ``StickyTable`` and ``ReturnPaths``; the home-agent agent's ``NotificationAgent`` over a
real ``BindingCache`` (what ``twistd lbproxy-homeagent`` runs); real TLS with certificates
made here, pumped in memory (``twisted.test.iosim``); a ``task.Clock``, so eleven minutes
pass in a blink and every timer fires when it is due.  A terminal's packets are table
lookups (what the data path does per packet), its first packet an insert and
``terminal_seen`` (what ``Balancer.bind`` does).
"""

from __future__ import annotations

import ipaddress
import itertools
import json
import os
from typing import Any

from twisted.internet.protocol import Factory
from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase

from lbproxy.core.keys import Key
from lbproxy.core.returnpaths import ReturnPaths
from lbproxy.core.selection import Backend
from lbproxy.core.table import StickyTable
from lbproxy.notify import commands as c
from lbproxy.notify.adapter import TableListener
from lbproxy.notify.agent import AgentSession, NotificationAgent
from lbproxy.notify.cache import BindingCache
from lbproxy.notify.client import Peer
from lbproxy.notify.machine import PeerState
from lbproxy.notify.policy import PrefixEntitlement
from lbproxy.notify.router import LIFECYCLE, Notifier, format_report
from lbproxy.notify.subscriptions import Subscriptions
from lbproxy.ops import persistence
from tests.test_notify_forgeries import BALANCER, CA, HA1, PumpedEndpoint


def a(text: str) -> bytes:
    return ipaddress.IPv6Address(text).packed


PREFIX = "2001:db8:1::/64"
B1 = Backend("b1", ipaddress.IPv6Address("2001:db8:b0::11"))
B2 = Backend("b2", ipaddress.IPv6Address("2001:db8:b0::12"))


def home(i: int) -> bytes:
    return a(f"2001:db8:1::{0x100 + i:x}")


def coa(i: int, link: int) -> bytes:
    return a(f"2001:db8:a{link}::{0x100 + i:x}")


class NoLiveness:
    """What the balancer did before: no notion of the terminal's liveness."""

    def live_until(self, home: bytes | None, addresses: tuple[bytes, ...], now: float) -> None:
        return None


class Balancer:
    """The balancer's side: table, return paths, listener, notifier (one home agent)."""

    def __init__(self, clock: Clock, endpoint: PumpedEndpoint, table_lifetime: float = 300.0,
                 **options: Any) -> None:
        self.clock = clock
        self.table = StickyTable(clock, lifetime=table_lifetime, max_entries=1000)
        self.paths = ReturnPaths(clock, 1000)
        self.listener = TableListener(self.table, self.paths)
        options.setdefault("jitter", lambda: 0.0)
        self.notifier = Notifier(
            [(Peer.home_agent("ha1", "ha1.test", [PREFIX], options.pop("peer_interval", None)),
              endpoint)],
            CA.material(BALANCER), self.listener, clock, **options,
        )  # fmt: skip

    @property
    def link(self) -> Any:
        return self.notifier.clients["ha1"]

    def first_packet(self, address: bytes, backend: Backend = B1) -> None:
        """A terminal's first packet from ``address`` (key = source address)."""
        self.table.insert(Key("src", address), backend)
        self.notifier.terminal_seen(address)

    def packet(self, address: bytes) -> Backend | None:
        binding = self.table.lookup(Key("src", address))
        return None if binding is None else binding.backend

    def backend(self, address: bytes) -> str | None:
        binding = self.table.get(Key("src", address))
        return None if binding is None else binding.backend.name


class World:
    """A home-agent agent and a balancer over in-memory TLS, on one clock."""

    def __init__(self, agent_session: type[AgentSession] = AgentSession, **options: Any) -> None:
        self.clock = Clock()
        self.clock.advance(1_000_000)
        self.cache = BindingCache()
        self.agent = self.make_agent(agent_session)
        self.endpoint = PumpedEndpoint(self.agent.tls_factory(CA.material(HA1)), self.clock)
        self.options = options
        self.balancer = Balancer(self.clock, self.endpoint, **options)
        self.seq: dict[bytes, int] = {}

    def make_agent(self, session: type[AgentSession] = AgentSession) -> NotificationAgent:
        agent = NotificationAgent(self.cache, PrefixEntitlement.of([PREFIX]), ("lb1.test",),
                                  self.clock)  # fmt: skip
        agent.factory = lambda: Factory.forProtocol(  # type: ignore[method-assign]
            lambda: session(agent))
        return agent

    def start(self) -> World:
        self.balancer.notifier.startService()
        self.flush()
        return self

    def flush(self) -> None:
        for _ in range(4):
            self.endpoint.flush()

    def run(self, seconds: float, step: float = 1.0, each: Any = None) -> None:
        """Let ``seconds`` pass in ``step``s, pumping the connections; ``each()`` per step."""
        end = self.clock.seconds() + seconds
        while self.clock.seconds() < end - 1e-9:
            self.clock.advance(min(step, end - self.clock.seconds()))
            self.flush()
            self.balancer.paths.expire()  # what the balancer's sweep does
            self.balancer.table.expire()
            if each is not None:
                each()

    def register(self, i: int, link: int, lifetime: int = 420) -> None:
        """Terminal ``i``'s Binding Update from ``link`` reaches the home agent (a move, or
        a re-registration from where it is)."""
        h = home(i)
        self.seq[h] = (self.seq.get(h, 0) + 1) & 0xFFFF
        self.cache.update(h, coa(i, link), self.seq[h], lifetime, self.clock.seconds())
        self.flush()

    def session(self) -> AgentSession:
        assert len(self.agent.sessions) == 1, self.agent.sessions
        return next(iter(self.agent.sessions))


class NeverLapsesTests(SynchronousTestCase):
    """The issue's case: a terminal that stays put longer than the idle lifetime, then moves."""

    def follow(self, world: World, i: int = 1) -> None:
        world.register(i, 1)
        world.balancer.first_packet(coa(i, 1))
        world.flush()
        self.assertEqual(world.balancer.paths.care_of(home(i)), coa(i, 1))

    def test_stationary_eleven_minutes_then_moves(self) -> None:
        """Traffic every 10 s from CoA1 for 11 minutes (idle lifetime 600 s, the home
        agent granted 420 s and the terminal re-registers every 210 s); then it moves: the
        move reaches the table (CoA2 on CoA1's backend, confirmed); no subscription ended
        or lapsed; the subscription never got within a sweep of its expiry."""
        world = World().start()
        self.follow(world)
        b = world.balancer
        ticks = 0

        def each() -> None:
            nonlocal ticks
            ticks += 1
            if ticks % 10 == 0:
                self.assertEqual(b.packet(coa(1, 1)), B1)
            if ticks % 210 == 0:
                world.register(1, 1)  # re-registration from the same CoA
            sub = b.notifier.subscriptions.by_home("ha1", home(1))
            assert sub is not None
            self.assertGreater(sub.expires, world.clock.seconds())

        world.run(660, each=each)
        world.register(1, 2)
        self.assertEqual(b.backend(coa(1, 2)), "b1")
        self.assertEqual(b.paths.care_of(home(1)), coa(1, 2))
        life = b.notifier.lifecycle_counts()
        self.assertEqual((life["ended"], life["lapsed"]), (0, 0))
        self.assertEqual(b.notifier.counters.refreshed, 3)  # three re-registrations
        self.assertEqual(b.notifier.counters.total(), 0)

    def test_traffic_alone_keeps_it(self) -> None:
        """No re-registration reaches the balancer (the binding's 420 s run out), but the
        terminal's traffic keeps its table entry alive: the subscription lives on."""
        world = World().start()
        self.follow(world)
        b = world.balancer
        world.run(660, each=lambda: b.packet(coa(1, 1)))
        world.register(1, 2)
        self.assertEqual(b.backend(coa(1, 2)), "b1")
        self.assertEqual(b.notifier.lifecycle_counts()["ended"], 0)

    def test_without_liveness_it_lapsed(self) -> None:
        """The control: the same terminal, a balancer that does not ask the table (as
        before): the subscription ends after the idle lifetime, the move goes unreported,
        and the terminal's next packet from CoA2 counts it as lapsed."""
        world = World(liveness=NoLiveness()).start()
        self.follow(world)
        b = world.balancer
        world.run(660, each=lambda: b.packet(coa(1, 1)))
        self.assertEqual(b.notifier.lifecycle_counts()["ended"], 1)
        world.register(1, 2)
        self.assertIsNone(b.backend(coa(1, 2)))  # the move never reached the table
        self.assertEqual(b.paths.care_of(home(1)), None)
        b.first_packet(coa(1, 2), B2)  # scheduled afresh: another backend
        world.flush()
        self.assertEqual(b.notifier.lifecycle_counts()["lapsed"], 1)

    def test_gone_terminal_ends(self) -> None:
        """A terminal with nothing left (no traffic: its entry expired; its binding ran out)
        is unsubscribed after the idle lifetime -- at the agent too -- and that is no lapse;
        seen again much later, it is followed again."""
        world = World().start()
        self.follow(world)
        b = world.balancer
        world.run(300 + 420 + 600 + 10)
        self.assertEqual(len(b.notifier.subscriptions), 0)
        self.assertEqual(world.session().subscriptions, {})
        self.assertEqual(b.notifier.lifecycle_counts()["ended"], 1)
        world.run(700)
        world.register(1, 2)
        b.first_packet(coa(1, 2))
        world.flush()
        self.assertEqual(b.notifier.lifecycle_counts()["lapsed"], 0)
        self.assertEqual(b.paths.care_of(home(1)), coa(1, 2))

    def test_many_terminals_random(self) -> None:
        """20 terminals over five binding lifetimes (60 s, re-registration at 30 s; idle
        lifetime 20 s; table lifetime 30 s), moving at random times with stationary
        periods up to three idle lifetimes, sending every 2 s: every move reaches the table
        on the terminal's backend, no subscription ends or lapses."""
        import random

        rng = random.Random(11)
        world = World(idle_lifetime=20.0, table_lifetime=30.0).start()
        b = world.balancer
        n = 20
        where = dict.fromkeys(range(1, n + 1), 1)
        backend: dict[int, str] = {}
        for i in where:
            world.register(i, 1, lifetime=60)
            b.first_packet(coa(i, 1), (B1, B2)[i % 2])
            backend[i] = (B1, B2)[i % 2].name
        world.flush()
        next_move = {i: world.clock.seconds() + rng.uniform(1, 60) for i in where}
        next_reg = dict.fromkeys(where, world.clock.seconds() + 30)
        moves = applied = 0
        end = world.clock.seconds() + 300
        while world.clock.seconds() < end:
            world.run(1.0)
            now = world.clock.seconds()
            for i in where:
                if now >= next_move[i]:
                    where[i] = where[i] % 3 + 1
                    world.register(i, where[i], lifetime=60)
                    moves += 1
                    if b.backend(coa(i, where[i])) == backend[i] and \
                            b.paths.care_of(home(i)) == coa(i, where[i]):  # fmt: skip
                        applied += 1
                    next_move[i] = now + rng.choice((rng.uniform(1, 10), rng.uniform(20, 60)))
                    next_reg[i] = now + 30
                elif now >= next_reg[i]:
                    world.register(i, where[i], lifetime=60)
                    next_reg[i] = now + 30
                if int(now) % 2 == 0:
                    self.assertEqual(b.packet(coa(i, where[i])).name, backend[i])  # type: ignore[union-attr]
        self.assertGreater(moves, 100)
        self.assertEqual(applied, moves)
        life = b.notifier.lifecycle_counts()
        self.assertEqual((life["ended"], life["lapsed"]), (0, 0))
        self.assertEqual(b.notifier.counters.total(), 0)


class ReRegistrationTests(SynchronousTestCase):
    """Re-registrations from the same care-of address, end to end."""

    def test_refreshes_confirmation(self) -> None:
        """The home agent grants 40 s; the terminal re-registers every 20 s from CoA1 and
        sends nothing: the confirmation (replies to CoA1 with a Type 2 Routing Header) lives
        as long as the registrations go on -- 200 s -- and ends 40 s after the last one."""
        world = World().start()
        world.register(1, 1, lifetime=40)
        b = world.balancer
        b.first_packet(coa(1, 1))
        world.flush()
        for _ in range(10):
            world.run(20)
            self.assertEqual(b.paths.care_of(home(1)), coa(1, 1))
            world.register(1, 1, lifetime=40)
        self.assertEqual(b.notifier.counters.refreshed, 10)
        self.assertEqual(b.listener.refreshed, 10)
        self.assertEqual(b.notifier.counters.accepted, 1)  # one binding, never moved
        world.run(39)
        b.paths.expire()  # what the balancer's sweep does
        self.assertEqual(b.paths.care_of(home(1)), coa(1, 1))
        world.run(2)
        b.paths.expire()
        self.assertIsNone(b.paths.care_of(home(1)))

    def test_refresh_never_repoints(self) -> None:
        """A re-registration of an address another notification has moved away from does
        not take the confirmation back."""
        world = World().start()
        world.register(1, 1)
        b = world.balancer
        b.first_packet(coa(1, 1))
        world.flush()
        b.paths.confirm(home(1), coa(1, 3), 100.0)  # another source moved it meanwhile
        world.register(1, 1)
        self.assertEqual(b.paths.care_of(home(1)), coa(1, 3))


class ReconnectionTests(SynchronousTestCase):
    """Reconnections, agent restarts, snapshots on (re)connection."""

    def test_reconnect_resubscribes_and_reconciles(self) -> None:
        """The connection drops; the terminal moves while it is down (the agent cannot
        tell); on reconnection the balancer subscribes again and asks for a snapshot, and
        the missed move reaches the table."""
        world = World().start()
        world.register(1, 1)
        b = world.balancer
        b.first_packet(coa(1, 1))
        world.flush()
        world.session().transport.abortConnection()  # type: ignore[union-attr]
        world.flush()
        self.assertEqual(b.link.machine.state, PeerState.DISCONNECTED)
        world.register(1, 2)  # nobody to tell
        self.assertIsNone(b.backend(coa(1, 2)))
        world.run(1)
        self.assertEqual(b.link.machine.state, PeerState.SUBSCRIBED)
        self.assertEqual(b.backend(coa(1, 2)), "b1")
        self.assertEqual(b.paths.care_of(home(1)), coa(1, 2))
        self.assertEqual(b.link.snapshots, 1)
        self.assertEqual(b.notifier.lifecycle_counts()["resubscribed"], 1)

    def test_agent_restart(self) -> None:
        """The agent restarts and has forgotten everything: the balancer resubscribes by
        home address, the agent knows no binding; the terminal's next registration (from
        the same care-of address: a re-registration) and its next move are accepted."""
        world = World().start()
        world.register(1, 1)
        b = world.balancer
        b.first_packet(coa(1, 1))
        world.flush()
        old = world.session()
        world.cache = BindingCache()
        world.agent = world.make_agent()
        world.endpoint.server = world.agent.tls_factory(CA.material(HA1))
        old.transport.abortConnection()  # type: ignore[union-attr]
        world.flush()
        world.run(1)
        self.assertEqual(len(world.session().subscriptions), 1)
        world.register(1, 1)
        world.register(1, 2)
        self.assertEqual(b.backend(coa(1, 2)), "b1")
        self.assertEqual(b.paths.care_of(home(1)), coa(1, 2))
        self.assertEqual(b.notifier.counters.total(), 0)

    def test_snapshot_pages(self) -> None:
        """A snapshot of 600 bindings comes in pages of SNAPSHOT_CHUNK (an AMP value holds
        64 KiB); every binding is applied."""
        world = World().start()
        b = world.balancer
        for i in range(600):
            world.register(i, 1)
            b.first_packet(coa(i, 1))
        world.flush()
        self.assertEqual(len(b.notifier.subscriptions), 600)
        reports = b.link.reports
        got: list[Any] = []
        b.link.request_snapshot().addBoth(got.append)
        world.flush()
        self.assertEqual(got, [{"accepted": 600, "refused": 0}])
        self.assertEqual(b.link.reports - reports, 3)  # 256 + 256 + 88


class PeriodicTests(SynchronousTestCase):
    """Claims 12/13, "periodically": per-peer interval, reports every N s, reconciliation."""

    def test_reports_every_interval(self) -> None:
        """With interval 7 the agent reports every 7 s (the Clock says so), and a change
        the agent never sent as a BindingChanged (lost) reaches the table by the next
        report."""
        world = World(peer_interval=7).start()
        world.register(1, 1)
        b = world.balancer
        b.first_packet(coa(1, 1))
        world.flush()
        self.assertEqual(b.link.interval, 7)
        session = world.session()
        self.assertEqual(list(session._timers), [7])
        stamps: list[float] = []
        seen = b.link.reports
        for _ in range(30):
            world.run(1)
            if b.link.reports != seen:
                seen = b.link.reports
                stamps.append(world.clock.seconds())
        gaps = {round(y - x) for x, y in itertools.pairwise(stamps)}
        self.assertEqual(gaps, {7})
        # The table misses a change: the agent's BindingChanged is lost on the way.
        session.subscriptions[session._by_home[home(1)]].on_change = False
        world.register(1, 2)
        self.assertIsNone(b.backend(coa(1, 2)))
        world.run(7)
        self.assertEqual(b.backend(coa(1, 2)), "b1")
        self.assertEqual(b.paths.care_of(home(1)), coa(1, 2))

    def test_default_interval_from_notifier(self) -> None:
        """The [notify] interval applies to peers without their own."""
        world = World(interval=5).start()
        world.register(1, 1)
        world.balancer.first_packet(coa(1, 1))
        world.flush()
        self.assertEqual(list(world.session()._timers), [5])


class RestartTests(SynchronousTestCase):
    """The balancer restarts: subscriptions and confirmations come back from the file."""

    def test_restart_restores(self) -> None:
        """Save table, return paths and subscriptions; a new balancer (same clock, new
        objects) restores them, subscribes again when it connects, confirms again, and
        the next move is reported -- including one made while it was down."""
        world = World().start()
        b = world.balancer
        for i in (1, 2, 3):
            world.register(i, 1)
            b.first_packet(coa(i, 1), B2)
        world.flush()
        path = os.path.join(self.mktemp(), "table.jsonl")
        os.makedirs(os.path.dirname(path))
        persistence.save(b.table, path, world.clock.seconds(), b.paths,
                         subscriptions=b.notifier)  # fmt: skip
        b.notifier.stopService()
        world.flush()
        world.run(5)
        world.register(2, 2)  # moves while the balancer is down
        # A new balancer process.
        endpoint = PumpedEndpoint(world.agent.tls_factory(CA.material(HA1)), world.clock)
        world.endpoint = endpoint
        new = Balancer(world.clock, endpoint)
        result = persistence.load(new.table, path, {"b1": B1, "b2": B2}, world.clock.seconds(),
                                  return_paths=new.paths, subscriptions=new.notifier)  # fmt: skip
        self.assertEqual((result.restored, result.return_paths, result.subscriptions,
                          result.subscriptions_dropped), (3, 3, 3, 0))  # fmt: skip
        self.assertEqual(new.notifier.lifecycle_counts()["restored"], 3)
        for i in (1, 2, 3):
            self.assertEqual(new.paths.care_of(home(i)), coa(i, 1))
        new.notifier.startService()
        world.balancer = new
        world.flush()
        self.assertEqual(new.link.machine.state, PeerState.SUBSCRIBED)
        self.assertEqual(new.paths.care_of(home(2)), coa(2, 2))  # the move made while down
        self.assertEqual(new.backend(coa(2, 2)), "b2")
        world.register(1, 3)
        self.assertEqual(new.backend(coa(1, 3)), "b2")
        self.assertEqual(new.paths.care_of(home(1)), coa(1, 3))
        self.assertEqual(new.notifier.counters.total(), 0)

    def test_restore_checks_like_a_peer(self) -> None:
        """What the file says is checked like what a peer says: unknown peers, addresses
        the rules refuse, homes the peer may not speak for are not taken back."""
        world = World()
        n = world.balancer.notifier
        now = world.clock.seconds()
        cases = [
            ("ha9", home(1), "hoa", home(1), None, None),  # no such peer
            ("ha1", a("fe80::1"), "hoa", a("fe80::1"), None, None),  # link-local home
            ("ha1", a("2001:db8:9::1"), "hoa", a("2001:db8:9::1"), None, None),  # not its
            ("ha1", coa(1, 1), "coa", a("2001:db8:9::1"), coa(1, 1), 3),  # home not its
            ("ha1", coa(1, 1), "coa", home(1), a("ff02::1"), 3),  # multicast care-of
            ("ha1", home(1), "hoa", home(2), None, None),  # hoa for another home
            ("ha1", home(1), "hoa", home(1), coa(1, 1), 70000),  # bad seq
            ("terminal:2001:db8:1::101", home(1), "hoa", home(1), None, None),  # no dial-in
        ]
        for case in cases:
            self.assertIsNotNone(n.restore_subscription(*case, now + 10, None), case)
        self.assertEqual(len(n.subscriptions), 0)
        self.assertIsNone(n.restore_subscription("ha1", home(1), "hoa", home(1), coa(1, 1), 3,
                                                 now + 10, None))  # fmt: skip
        self.assertEqual(len(n.subscriptions), 1)


class RegistryTests(SynchronousTestCase):
    """The registry's lifecycle parts: sweep with liveness, care-of index, lapses."""

    def test_sweep_renews_before_expiry(self) -> None:
        subs = Subscriptions(10, idle_lifetime=10.0)
        s = subs.add("p", home(1), "hoa", 0.0)
        assert s is not None
        for t in range(1, 100):
            now = float(t)

            def alive(sub: Any, now: float = now) -> float:
                return now + 3.0

            subs.sweep(now, alive, margin=2.0)
            self.assertGreater(s.expires, now)
        self.assertEqual(len(subs), 1)
        gone: list[Any] = []
        for t in range(100, 120):
            gone += subs.sweep(float(t), lambda sub: None, margin=2.0)
        self.assertEqual(gone, [s])

    def test_following_index(self) -> None:
        subs = Subscriptions(10)
        s = subs.add("p", coa(1, 1), "coa", 0.0)
        assert s is not None
        self.assertEqual(subs.following(coa(1, 1)), [s])
        subs.set_care_of(s, coa(1, 2))
        self.assertEqual(subs.following(coa(1, 1)), [])
        self.assertEqual(subs.following(coa(1, 2)), [s])
        subs.remove(s)
        self.assertEqual(subs.following(coa(1, 2)), [])
        self.assertEqual(subs.count("p"), 0)

    def test_lapse_counted_once(self) -> None:
        subs = Subscriptions(10, idle_lifetime=10.0)
        s = subs.add("p", coa(1, 1), "coa", 0.0)
        assert s is not None
        s.seq, s.confirmed = 1, True
        subs.set_home(s, home(1))
        self.assertEqual(subs.sweep(20.0), [s])
        again = subs.add("p", coa(1, 1), "coa", 25.0)
        assert again is not None
        subs.set_home(again, home(1), 25.0)
        self.assertEqual(subs.lapsed, 1)
        self.assertEqual(len(subs), 1)


class ReportTests(SynchronousTestCase):
    """``Notifier.report`` (what ``lbproxyctl notify`` shows) and its text form."""

    def test_report(self) -> None:
        world = World(peer_interval=30).start()
        world.register(1, 1)
        world.balancer.first_packet(coa(1, 1))
        world.flush()
        world.run(31)
        report = world.balancer.notifier.report()
        json.dumps(report)  # JSON-ready
        (peer,) = report["peers"]
        self.assertEqual((peer["name"], peer["state"], peer["interval"], peer["subscriptions"]),
                         ("ha1", "SUBSCRIBED", 30, 1))  # fmt: skip
        self.assertLessEqual(peer["last_report"], 1.0)
        self.assertEqual(report["subscriptions"]["total"], 1)
        self.assertEqual(report["subscriptions"]["listed"][0]["care_of"], "2001:db8:a1::101")
        self.assertEqual(set(report["lifecycle"]), set(LIFECYCLE))
        self.assertIn("not_owner", report["refused"])
        text = format_report(report)
        self.assertIn("ha1", text)
        self.assertIn("lifecycle: opened 1", text)
        self.assertIn("refused: none", text)
        self.assertEqual(world.balancer.notifier.report(peer="ha9")["peers"], [])

    def test_snapshot_command_pages_when_empty(self) -> None:
        """GetSnapshot without subscriptions: one empty page, ``next`` NO_MORE."""
        world = World().start()
        session = world.session()
        session.machine.state = PeerState.HANDSHAKEN
        self.assertEqual(session.get_snapshot(), {"bindings": [], "next": c.NO_MORE})
