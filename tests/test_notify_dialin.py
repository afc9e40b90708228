"""Terminals dial in (issue 11): terminal agents connect to the balancer, each named by the
home address its certificate carries, with no per-terminal configuration -- and none can
speak for another's home address or move a binding keyed by an address it is not entitled to.

Real parts throughout: each terminal is a ``NotificationAgent`` over its own one-entry
``BindingCache`` dialling with ``NotificationAgent.dial`` (what ``twistd lbproxy-terminal``
runs with ``[agent] connect``), with its own certificate from a CA made here; the balancer
is a ``Notifier`` listening (``DialInServer``) over a real ``StickyTable`` and
``ReturnPaths``; TLS is real, its bytes pumped in memory (``twisted.test.iosim``) on a
``task.Clock``.  ``TerminalLoopbackTests`` runs ten of them over TCP on loopback with the
real reactor.
"""

from __future__ import annotations

import ipaddress
from typing import Any

from twisted.internet import reactor as _reactor
from twisted.internet.defer import Deferred, inlineCallbacks, succeed
from twisted.internet.endpoints import TCP6ClientEndpoint, TCP6ServerEndpoint
from twisted.internet.interfaces import IListeningPort, IStreamServerEndpoint
from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase, TestCase
from zope.interface import implementer

from lbproxy.core.keys import Key
from lbproxy.core.policy import build_policy
from lbproxy.core.returnpaths import ReturnPaths
from lbproxy.core.selection import Backend
from lbproxy.core.table import StickyTable
from lbproxy.notify import commands as c
from lbproxy.notify.adapter import TableListener
from lbproxy.notify.agent import NotificationAgent
from lbproxy.notify.cache import BindingCache
from lbproxy.notify.client import DialInPeer
from lbproxy.notify.machine import PeerState
from lbproxy.notify.pki import CertificateAuthority, Issued
from lbproxy.notify.policy import HomeAddressEntitlement, Refusal
from lbproxy.notify.router import Notifier
from lbproxy.notify.tls import check_terminal_certificate
from tests.test_notify_forgeries import BALANCER, CA, PumpedEndpoint
from tests.test_notify_tls import wait_until

reactor: Any = _reactor


def a(text: str) -> bytes:
    return ipaddress.IPv6Address(text).packed


B1 = Backend("b1", ipaddress.IPv6Address("2001:db8:b0::11"))
B2 = Backend("b2", ipaddress.IPv6Address("2001:db8:b0::12"))
VIP = a("2001:db8:5::80")
OTHER_CA = CertificateAuthority("another CA")


def home(i: int) -> bytes:
    return a(f"2001:db8:100::{0x1000 + i:x}")


def coa(i: int, link: int) -> bytes:
    return a(f"2001:db8:a{link}::{0x1000 + i:x}")


CERTS = {i: CA.issue(dns=[f"t{i}.test"], ips=[str(ipaddress.IPv6Address(home(i)))])
         for i in range(1, 11)}  # fmt: skip


@implementer(IListeningPort)
class _Port:
    def startListening(self) -> None:
        pass

    def stopListening(self) -> None:
        return None

    def getHost(self) -> Any:
        return None


@implementer(IStreamServerEndpoint)
class MemoryServerEndpoint:
    """Keeps the factory the service listens with, for ``PumpedEndpoint`` to connect to."""

    def __init__(self) -> None:
        self.factory: Any = None

    def listen(self, factory: Any) -> Deferred[Any]:
        self.factory = factory
        return succeed(_Port())


class Terminal:
    """A terminal agent dialling the balancer, with its binding."""

    def __init__(self, world: World, i: int, issued: Issued | None = None,
                 ca: CertificateAuthority = CA, home_address: bytes | None = None) -> None:
        self.i = i
        self.home = home_address or home(i)
        self.cache = BindingCache(1)
        self.agent = NotificationAgent(self.cache, HomeAddressEntitlement(self.home),
                                       ("lb1.test",), world.clock)  # fmt: skip
        self.endpoint = PumpedEndpoint(world.server.factory, world.clock)
        world.endpoints.append(self.endpoint)
        self.service = self.agent.dial(self.endpoint, ca.material(issued or CERTS[i]),
                                       jitter=lambda: 0.0)  # fmt: skip
        self.seq = 0

    def start(self) -> Terminal:
        self.service.startService()
        return self

    def move(self, care_of: bytes, now: float, lifetime: int = 420) -> None:
        self.seq += 1
        self.cache.update(self.home, care_of, self.seq, lifetime, now)

    @property
    def session(self) -> Any:
        (session,) = self.agent.sessions
        return session


class World:
    """One balancer listening for terminals."""

    def __init__(self, **options: Any) -> None:
        self.clock = Clock()
        self.clock.advance(1000)
        self.table = StickyTable(self.clock, lifetime=300.0, max_entries=1000)
        self.paths = ReturnPaths(self.clock, 1000)
        self.listener = TableListener(self.table, self.paths)
        self.policy = build_policy(vips=[VIP], ports=(), translate=True, backends=[B1, B2],
                                   own=[])  # fmt: skip
        self.server = MemoryServerEndpoint()
        self.endpoints: list[PumpedEndpoint] = []
        self.notifier = Notifier([], CA.material(BALANCER), self.listener, self.clock,
                                 listen=self.server, local=lambda: self.policy,
                                 **options)  # fmt: skip
        self.notifier.startService()

    def flush(self) -> None:
        for _ in range(4):
            for endpoint in self.endpoints:
                endpoint.flush()

    def run(self, seconds: float) -> None:
        end = self.clock.seconds() + seconds
        while self.clock.seconds() < end:
            self.clock.advance(0.5)
            self.flush()

    def link(self, i: int) -> DialInPeer:
        link = self.notifier.clients[f"terminal:{ipaddress.IPv6Address(home(i))}"]
        assert isinstance(link, DialInPeer)
        return link

    def state(self) -> tuple[Any, ...]:
        table = sorted((bytes(k), b.backend.name, b.care_of) for k, b in self.table)
        subs = sorted((s.peer, s.address, s.home, s.care_of, s.seq)
                      for s in self.notifier.subscriptions)  # fmt: skip
        return table, sorted((h, c_) for h, c_, _ in self.paths.items()), subs


class DialInTests(SynchronousTestCase):
    """Ten terminal agents with their own certificates dial in to one balancer."""

    def ten(self) -> tuple[World, dict[int, Terminal]]:
        world = World()
        terminals = {}
        for i in range(1, 11):
            t = Terminal(world, i)
            t.move(coa(i, 1), world.clock.seconds())
            world.table.insert(Key("src", coa(i, 1)), (B1, B2)[i % 2])  # its first packets
            terminals[i] = t.start()
        world.flush()
        return world, terminals

    def test_ten_terminals(self) -> None:
        """Each is named by its certificate's home address, subscribed to at once, and
        its care-of address confirmed; each move then reaches the table on its backend."""
        world, terminals = self.ten()
        report = world.notifier.report()
        self.assertEqual(report["dial_in"]["connected"], 10)
        self.assertEqual(len(report["peers"]), 10)
        self.assertEqual(len(world.notifier.report(limit=3)["peers"]), 3)
        (one,) = world.notifier.report(peer="terminal:2001:db8:100::1004")["peers"]
        self.assertEqual((one["dialled_in"], one["state"], one["subscriptions"]),
                         (True, "SUBSCRIBED", 1))  # fmt: skip
        self.assertEqual(len(world.notifier.subscriptions), 10)
        for i in terminals:
            link = world.link(i)
            self.assertEqual(link.machine.state, PeerState.SUBSCRIBED)
            self.assertEqual(link.peer.entitlement, HomeAddressEntitlement(home(i)))
            self.assertEqual(world.paths.care_of(home(i)), coa(i, 1))
        for i, t in terminals.items():
            t.move(coa(i, 2), world.clock.seconds())
        world.flush()
        for i in terminals:
            binding = world.table.get(Key("src", coa(i, 2)))
            assert binding is not None
            self.assertEqual(binding.backend, (B1, B2)[i % 2])
            self.assertEqual(world.paths.care_of(home(i)), coa(i, 2))
        self.assertEqual(world.notifier.counters.total(), 0)
        self.assertEqual(world.notifier.counters.accepted, 20)

    def test_care_of_miss_needs_no_fan_out(self) -> None:
        """A table miss for a care-of address a dialled-in terminal already reported asks
        nobody (the subscription follows it)."""
        world, _ = self.ten()
        self.assertEqual(world.notifier.terminal_seen(coa(3, 1)), 1)
        self.assertEqual(len(world.notifier.subscriptions), 10)

    def forge(self, world: World, t: Terminal, command: type[c.Subscribe] | Any,
              **arguments: Any) -> list[Any]:
        results: list[Any] = []
        t.session.callRemote(command, **arguments).addBoth(results.append)
        world.flush()
        return results

    def test_cannot_speak_for_another_home(self) -> None:
        """Terminal 1 names terminal 2's home address: NOT_ENTITLED, counted, nothing
        changes -- as a change and as a snapshot."""
        world, terminals = self.ten()
        before = world.state()
        results = self.forge(world, terminals[1], c.BindingChanged, home=home(2),
                             old_care_of=coa(2, 1), new_care_of=coa(1, 1), seq=50,
                             lifetime=420)  # fmt: skip
        self.assertTrue(results[0].check(c.NotEntitled))
        results = self.forge(world, terminals[1], c.BindingSnapshot, bindings=[
            {"home": home(2), "care_of": coa(1, 3), "seq": 51, "lifetime": 420}])
        self.assertEqual(results, [{"accepted": 0, "refused": 1}])
        self.assertEqual(world.notifier.counters[Refusal.NOT_ENTITLED], 2)
        self.assertEqual(world.state(), before)

    def test_cannot_move_another_binding(self) -> None:
        """Terminal 1 names terminal 2's care-of address (bound to another backend) as its
        own new one: refused not_owner; terminal 2's binding keeps its backend."""
        world, terminals = self.ten()
        before = world.state()
        victim = world.table.get(Key("src", coa(2, 1)))
        assert victim is not None
        results = self.forge(world, terminals[1], c.BindingChanged, home=home(1),
                             old_care_of=coa(1, 1), new_care_of=coa(2, 1), seq=50,
                             lifetime=420)  # fmt: skip
        self.assertTrue(results[0].check(c.NotEntitled))
        self.assertEqual(world.notifier.counters[Refusal.NOT_OWNER], 1)
        self.assertEqual(world.state(), before)
        self.assertEqual(victim.backend, B1)

    def test_reconnect_replaces(self) -> None:
        """A terminal that reconnects (a new connection before the old one is seen to go)
        replaces its old connection; it stays subscribed, once."""
        world, terminals = self.ten()
        again = Terminal(world, 3)
        again.seq = terminals[3].seq
        again.cache.update(home(3), coa(3, 1), terminals[3].seq, 420, world.clock.seconds())
        again.start()
        world.flush()
        self.assertEqual(world.link(3).machine.state, PeerState.SUBSCRIBED)
        self.assertEqual(world.link(3).connections, 2)
        self.assertEqual(terminals[3].agent.sessions, set())
        self.assertEqual(len(world.notifier.subscriptions), 10)
        again.move(coa(3, 2), world.clock.seconds())
        world.flush()
        self.assertEqual(world.paths.care_of(home(3)), coa(3, 2))

    def test_stop_closes_dialled_in(self) -> None:
        """Stopping the notifier ends the terminals' connections; they redial elsewhere."""
        world, terminals = self.ten()
        world.notifier.stopService()
        world.flush()
        self.assertTrue(all(t.agent.sessions == set() for t in terminals.values()))
        self.assertEqual(world.link(1).machine.state, PeerState.CLOSED)

    def test_subscription_outlives_a_disconnection(self) -> None:
        """While its terminal is away (disconnected), the subscription stays as long as the
        table keeps the terminal's entry, and is sent again when it dials in again."""
        world, terminals = self.ten()
        terminals[4].service.stopService()
        world.flush()
        self.assertFalse(world.link(4).connected)
        world.run(60)
        self.assertIsNotNone(world.notifier.subscriptions.by_home(world.link(4).peer.name,
                                                                  home(4)))  # fmt: skip
        terminals[4].service.startService()
        world.run(1)
        terminals[4].move(coa(4, 2), world.clock.seconds())
        world.flush()
        self.assertEqual(world.paths.care_of(home(4)), coa(4, 2))


class DialInCertificateTests(SynchronousTestCase):
    """Certificates a dialling terminal must not pass with, each refused by reason."""

    def refused(self, issued: Issued, reason: Refusal, ca: CertificateAuthority = CA,
                world: World | None = None) -> World:
        world = world or World()
        t = Terminal(world, 1, issued, ca).start()
        world.flush()
        self.assertGreaterEqual(world.notifier.counters[reason], 1, world.notifier.counters.counts)
        self.assertEqual(world.notifier.counters.total(), world.notifier.counters[reason])
        self.assertEqual(len(world.notifier.subscriptions), 0)
        self.assertEqual(world.notifier.report()["dial_in"]["terminals"], 0)
        t.service.stopService()
        return world

    def test_no_home_address(self) -> None:
        self.refused(CA.issue(dns=["t1.test"]), Refusal.WRONG_IDENTITY)

    def test_two_home_addresses(self) -> None:
        self.refused(CA.issue(dns=["t1.test"], ips=["2001:db8:100::1001", "2001:db8:100::1002"]),
                     Refusal.WRONG_IDENTITY)  # fmt: skip

    def test_server_usage_only(self) -> None:
        self.refused(CA.issue(ips=["2001:db8:100::1001"], usages=("server",)),
                     Refusal.WRONG_USAGE)  # fmt: skip

    def test_other_ca(self) -> None:
        self.refused(OTHER_CA.issue(ips=["2001:db8:100::1001"]), Refusal.TLS_FAILED, OTHER_CA)

    def test_expired(self) -> None:
        self.refused(CA.issue(ips=["2001:db8:100::1001"], starts=-86400 * 3, days=-1),
                     Refusal.TLS_FAILED)  # fmt: skip

    def test_unique_local_home(self) -> None:
        self.refused(CA.issue(ips=["fd00::1001"]), Refusal.BAD_ADDRESS)

    def test_virtual_address_as_home(self) -> None:
        self.refused(CA.issue(ips=["2001:db8:5::80"]), Refusal.LOCAL_ADDRESS)

    def test_forbidden_home(self) -> None:
        self.refused(CA.issue(ips=["2001:db8:100::1001"]), Refusal.FORBIDDEN_ADDRESS,
                     world=World(forbidden=["2001:db8:100::/64"]))  # fmt: skip

    def test_check_terminal_certificate(self) -> None:
        """The pure check names the home address; a DNS-only one is refused."""
        from cryptography import x509

        cert = x509.load_pem_x509_certificate(CERTS[5].cert_pem)
        self.assertEqual(check_terminal_certificate(cert).name, "2001:db8:100::1005")
        bare = x509.load_pem_x509_certificate(CA.issue(dns=["x.test"]).cert_pem)
        self.assertEqual(check_terminal_certificate(bare).refusal, Refusal.WRONG_IDENTITY)

    def test_balancer_must_prove_itself(self) -> None:
        """The terminal refuses a balancer whose certificate is not an allowed balancer's."""
        world = World()
        impostor = Notifier([], CA.material(CA.issue(dns=["lb9.test"])), world.listener,
                            world.clock, listen=MemoryServerEndpoint())  # fmt: skip
        impostor.startService()
        server = impostor.dial_in_server
        assert server is not None
        world.server.factory = server.factory
        t = Terminal(world, 1).start()
        world.flush()
        self.assertGreaterEqual(t.agent.counters[Refusal.WRONG_IDENTITY], 1)
        self.assertEqual(len(impostor.subscriptions), 0)

    def test_too_many(self) -> None:
        """Past ``max_dial_in`` terminals (none gone), a new one is refused too_many_peers."""
        world = World(max_dial_in=3)
        for i in range(1, 5):
            Terminal(world, i).start()
        world.flush()
        self.assertEqual(world.notifier.report()["dial_in"]["terminals"], 3)
        self.assertGreaterEqual(world.notifier.counters[Refusal.TOO_MANY_PEERS], 1)


class TerminalLoopbackTests(TestCase):
    """Ten terminal agents dial one balancer over TCP and TLS on loopback (real reactor)."""

    timeout = 30

    @inlineCallbacks
    def test_ten_over_tcp(self) -> Any:
        table = StickyTable(reactor, lifetime=300.0, max_entries=1000)
        paths = ReturnPaths(reactor, 1000)
        notifier = Notifier([], CA.material(BALANCER), TableListener(table, paths), reactor,
                            listen=TCP6ServerEndpoint(reactor, 0, interface="::1"))  # fmt: skip
        notifier.startService()
        self.addCleanup(notifier.stopService)
        server = notifier.dial_in_server
        assert server is not None
        port = server.service._waitingForPort.result  # type: ignore[union-attr]
        agents = []
        for i in range(1, 11):
            cache = BindingCache(1)
            cache.update(home(i), coa(i, 1), 1, 420, reactor.seconds())
            table.insert(Key("src", coa(i, 1)), (B1, B2)[i % 2])
            agent = NotificationAgent(cache, HomeAddressEntitlement(home(i)), ("lb1.test",),
                                      reactor)  # fmt: skip
            service = agent.dial(TCP6ClientEndpoint(reactor, "::1", port.getHost().port),
                                 CA.material(CERTS[i]), initial_delay=0.05)  # fmt: skip
            service.startService()
            self.addCleanup(service.stopService)
            agents.append((cache, agent))
        yield wait_until(lambda: all(paths.care_of(home(i)) == coa(i, 1) for i in range(1, 11)),
                         timeout=20)  # fmt: skip
        for i, (cache, _) in enumerate(agents, 1):
            cache.update(home(i), coa(i, 2), 2, 420, reactor.seconds())
        yield wait_until(lambda: all(paths.care_of(home(i)) == coa(i, 2) for i in range(1, 11)),
                         timeout=20)  # fmt: skip
        for i in range(1, 11):
            binding = table.get(Key("src", coa(i, 2)))
            assert binding is not None
            self.assertEqual(binding.backend, (B1, B2)[i % 2])
        self.assertEqual(notifier.counters.total(), 0)

    @inlineCallbacks
    def test_terminal_service_dials(self) -> Any:
        """``twistd lbproxy-terminal`` with ``[agent] connect`` (and no listen): the agent
        built from its configuration file dials the balancer, is named by its certificate,
        and its care-of address -- read from its address source -- is confirmed; a move
        follows."""
        import tomllib

        from lbproxy.agents.config import parse_terminal
        from lbproxy.agents.terminal import AddressInfo, TerminalService
        from tests.test_notify_terminal import FakeSource

        table = StickyTable(reactor, lifetime=300.0, max_entries=1000)
        paths = ReturnPaths(reactor, 1000)
        notifier = Notifier([], CA.material(BALANCER), TableListener(table, paths), reactor,
                            listen=TCP6ServerEndpoint(reactor, 0, interface="::1"))  # fmt: skip
        notifier.startService()
        self.addCleanup(notifier.stopService)
        server = notifier.dial_in_server
        assert server is not None
        port = server.service._waitingForPort.result  # type: ignore[union-attr]
        text = f"""
[agent]
connect = ["tcp:host=\\\\:\\\\:1:port={port.getHost().port}"]
balancers = ["lb1.test"]
[tls]
ca = "ca.pem"
certificate = "t.pem"
key = "t.key"
[terminal]
home = "{ipaddress.IPv6Address(home(7))}"
home_prefix = "2001:db8:100::/64"
lifetime = 40
"""
        config = parse_terminal(tomllib.loads(text), "t.toml")
        self.assertEqual(config.common.listen, "")
        source = FakeSource()
        source.current = [AddressInfo("w", coa(7, 1))]
        table.insert(Key("src", coa(7, 1)), B2)
        service = TerminalService(config, reactor, CA.material(CERTS[7]), source, events=False)
        self.assertIsNone(service.listening)
        service.startService()
        self.addCleanup(service.stopService)
        yield wait_until(lambda: paths.care_of(home(7)) == coa(7, 1), timeout=10)
        source.current = [AddressInfo("w", coa(7, 2))]
        service.watch.poll()
        yield wait_until(lambda: paths.care_of(home(7)) == coa(7, 2), timeout=10)
        binding = table.get(Key("src", coa(7, 2)))
        assert binding is not None
        self.assertEqual(binding.backend, B2)
        self.assertIn("terminal:2001:db8:100::1007", notifier.clients)
