"""End-to-end tests of lbproxy.notify.client, .router and .agent over real TLS on loopback.

Certificates are made by the test (lbproxy.notify.pki): a CA, the balancer's client
certificate, agents' server certificates with subjectAltNames.  The balancer side is a
Notifier with a RecordingListener; the agent side a NotificationAgent over a BindingCache.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Callable
from typing import Any

from twisted.internet import reactor as _reactor
from twisted.internet.defer import Deferred, inlineCallbacks
from twisted.internet.endpoints import TCP4ClientEndpoint
from twisted.internet.interfaces import IListeningPort, IReactorCore, IReactorTCP, IReactorTime
from twisted.internet.task import deferLater
from twisted.trial.unittest import SynchronousTestCase, TestCase

from lbproxy.notify import commands as c
from lbproxy.notify.agent import NotificationAgent
from lbproxy.notify.cache import BindingCache
from lbproxy.notify.client import Peer
from lbproxy.notify.listener import BindingChange, RecordingListener
from lbproxy.notify.machine import PeerState
from lbproxy.notify.pki import CertificateAuthority
from lbproxy.notify.policy import HomeAddressEntitlement, PrefixEntitlement, Refusal
from lbproxy.notify.router import Notifier
from lbproxy.notify.tls import CLIENT_AUTH, SERVER_AUTH, check_certificate

reactor: Any = _reactor
assert IReactorTCP.providedBy(reactor) and IReactorTime.providedBy(reactor)
assert IReactorCore.providedBy(reactor)


def a(text: str) -> bytes:
    return ipaddress.IPv6Address(text).packed


HOME = a("2001:db8:1::16")
COA1 = a("2001:db8:a::16")
COA2 = a("2001:db8:b::16")
COA3 = a("2001:db8:c::16")
OUTSIDE = a("2001:db8:99::16")

CA = CertificateAuthority()  # one per test run: key generation is the slow part
OTHER_CA = CertificateAuthority("another CA")
BALANCER = CA.issue(dns=["lb1.test"])
HA1 = CA.issue(dns=["ha1.test"])
HA1_OTHER_CA = OTHER_CA.issue(dns=["ha1.test"])
IMPOSTOR = CA.issue(dns=["other.test"])
TERMINAL = CA.issue(dns=["t1.test"], ips=["2001:db8:1::16"])
TERMINAL_NO_IP = CA.issue(dns=["t1.test"])


def wait_until(predicate: Callable[[], bool], timeout: float = 5.0) -> Deferred[None]:
    """Poll ``predicate`` on the real reactor every 10 ms, failing after ``timeout``."""

    async def poll() -> None:
        for _ in range(int(timeout / 0.01)):
            if predicate():
                return
            await deferLater(reactor, 0.01, lambda: None)
        raise AssertionError(f"timed out waiting for {predicate}")

    return Deferred.fromCoroutine(poll())


class Harness:
    """An agent listening on loopback, and a balancer's Notifier pointed at it."""

    def __init__(self, test: TestCase) -> None:
        self.test = test
        self.cache = BindingCache()
        self.port: IListeningPort | None = None
        self.listener = RecordingListener()
        self.agent: NotificationAgent | None = None
        self.notifier: Notifier | None = None

    def start_agent(
        self,
        issued: Any = HA1,
        ca: CertificateAuthority = CA,
        entitlement: Any = None,
        balancers: tuple[str, ...] = ("lb1.test",),
        port: int = 0,
        tls: bool = True,
    ) -> NotificationAgent:
        entitlement = entitlement or PrefixEntitlement.of(["2001:db8:1::/64"])
        self.agent = NotificationAgent(self.cache, entitlement, balancers, reactor)
        factory = self.agent.tls_factory(ca.material(issued)) if tls else self.agent.factory()
        self.port = reactor.listenTCP(port, factory, interface="127.0.0.1")
        self.test.addCleanup(self.stop_agent)
        return self.agent

    def stop_agent(self) -> Deferred[Any] | None:
        if self.agent is not None:
            for session in list(self.agent.sessions):
                assert session.transport is not None
                session.transport.abortConnection()  # type: ignore[attr-defined]
        if self.port is None:
            return None
        port, self.port = self.port, None
        return port.stopListening()

    def start_balancer(
        self, peer: Peer | None = None, issued: Any = BALANCER, interval: int = 0
    ) -> Notifier:
        assert self.port is not None
        peer = peer or Peer.home_agent("ha1", "ha1.test", ["2001:db8:1::/64"])
        endpoint = TCP4ClientEndpoint(reactor, "127.0.0.1", self.port.getHost().port)  # type: ignore[attr-defined]
        self.notifier = Notifier(
            [(peer, endpoint)],
            CA.material(issued),
            self.listener,
            reactor,
            interval=interval,
            initial_delay=0.05,
            max_delay=0.4,
            jitter=lambda: 0.0,
        )
        self.notifier.startService()
        self.test.addCleanup(self.notifier.stopService)
        return self.notifier

    @property
    def client(self) -> Any:
        assert self.notifier is not None
        return next(iter(self.notifier.clients.values()))

    def session(self) -> Any:
        assert self.agent is not None
        return next(iter(self.agent.sessions))


class HappyPathTests(TestCase):
    """Subscribe, change, listener called."""

    timeout = 20

    @inlineCallbacks
    def test_subscribe_by_home_then_change(self) -> Any:
        """Claim 5: subscribe by home address at the home agent; the agent's current
        binding is confirmed, then a change reaches the listener as (home, old, new)."""
        h = Harness(self)
        h.cache.update(HOME, COA1, 10, 40, reactor.seconds())
        h.start_agent()
        notifier = h.start_balancer()
        yield wait_until(lambda: h.client.connected)
        self.assertEqual(notifier.terminal_seen(HOME, home=True), 1)
        yield wait_until(lambda: h.client.machine.state is PeerState.SUBSCRIBED)
        self.assertEqual(h.listener.changes, [BindingChange(HOME, None, COA1, 10, 40)])
        h.cache.update(HOME, COA2, 11, 40, reactor.seconds())
        yield wait_until(lambda: len(h.listener.changes) == 2)
        self.assertEqual(h.listener.changes[1], BindingChange(HOME, COA1, COA2, 11, 40))
        self.assertEqual(notifier.counters.total(), 0)
        self.assertEqual(notifier.counters.accepted, 2)

    @inlineCallbacks
    def test_subscribe_by_care_of(self) -> Any:
        """Embodiment 2: the balancer knows only the CoA; the agent resolves it to the home
        address and later moves are reported with the CoA the table is keyed on."""
        h = Harness(self)
        h.cache.update(HOME, COA1, 10, 40, reactor.seconds())
        h.start_agent()
        notifier = h.start_balancer()
        notifier.terminal_seen(COA1)  # before connecting: sent once connected
        yield wait_until(lambda: h.client.machine.state is PeerState.SUBSCRIBED)
        sub = notifier.subscriptions.by_home("ha1", HOME)
        assert sub is not None
        self.assertEqual((sub.kind, sub.care_of, sub.seq), ("coa", COA1, 10))
        h.cache.update(HOME, COA2, 11, 40, reactor.seconds())
        h.cache.update(HOME, COA1, 12, 40, reactor.seconds())
        yield wait_until(lambda: len(h.listener.changes) == 3)
        self.assertEqual(
            [(x.old_care_of, x.new_care_of, x.seq) for x in h.listener.changes[1:]],
            [(COA1, COA2, 11), (COA2, COA1, 12)],
        )

    @inlineCallbacks
    def test_unknown_care_of_dropped(self) -> Any:
        """A CoA the agent has no binding for is refused (UNKNOWN_BINDING) and forgotten."""
        h = Harness(self)
        h.start_agent()
        notifier = h.start_balancer()
        yield wait_until(lambda: h.client.connected)
        notifier.terminal_seen(COA3)
        yield wait_until(lambda: len(notifier.subscriptions) == 0)
        self.assertEqual(notifier.counters[Refusal.UNKNOWN_BINDING], 1)
        self.assertEqual(h.listener.changes, [])

    @inlineCallbacks
    def test_periodic_snapshot_and_request(self) -> Any:
        """Claim 12: the agent reports periodically (interval) and on request; a snapshot
        repeating the known binding changes nothing, one carrying a newer binding applies."""
        h = Harness(self)
        h.cache.update(HOME, COA1, 10, 40, reactor.seconds())
        h.start_agent()
        notifier = h.start_balancer(interval=1)
        notifier.terminal_seen(HOME, home=True)
        yield wait_until(lambda: h.client.machine.state is PeerState.SUBSCRIBED)
        session = h.session()
        self.assertEqual(list(session._timers), [1])
        got = yield h.client.request_snapshot()
        self.assertEqual(got, {"accepted": 1, "refused": 0})
        self.assertEqual(len(h.listener.changes), 1)
        # A change the agent makes without notifying (on_change off) arrives by snapshot.
        session.subscriptions[session._by_home[HOME]].on_change = False
        h.cache.update(HOME, COA2, 11, 40, reactor.seconds())
        yield wait_until(lambda: len(h.listener.changes) == 2, timeout=3)
        self.assertEqual(h.listener.changes[1].new_care_of, COA2)


class RefusalTests(TestCase):
    """Each refusal is refused, counted, and leaves the listener (the table) alone."""

    timeout = 20

    @inlineCallbacks
    def test_wrong_ca(self) -> Any:
        """An agent certificate from another CA is refused at the TLS layer."""
        h = Harness(self)
        h.start_agent(issued=HA1_OTHER_CA, ca=OTHER_CA)
        notifier = h.start_balancer()
        notifier.terminal_seen(HOME, home=True)
        yield wait_until(lambda: notifier.counters[Refusal.TLS_FAILED] >= 2)
        self.assertFalse(h.client.connected)
        self.assertEqual(h.client.connections, 0)
        self.assertEqual(h.listener.changes, [])

    @inlineCallbacks
    def test_wrong_identity(self) -> Any:
        """A certificate from our CA with another name is refused as wrong_identity."""
        h = Harness(self)
        h.start_agent(issued=IMPOSTOR)
        notifier = h.start_balancer()
        yield wait_until(lambda: notifier.counters[Refusal.WRONG_IDENTITY] >= 1)
        self.assertEqual(h.client.connections, 0)
        self.assertEqual(h.listener.changes, [])

    @inlineCallbacks
    def test_plaintext_agent(self) -> Any:
        """An agent speaking plaintext AMP is refused."""
        h = Harness(self)
        h.start_agent(tls=False)
        notifier = h.start_balancer()
        yield wait_until(lambda: notifier.counters[Refusal.TLS_FAILED] >= 1)
        self.assertEqual(h.client.connections, 0)

    @inlineCallbacks
    def test_agent_refuses_unknown_balancer(self) -> Any:
        """The agent refuses a client certificate that is not an allowed balancer."""
        h = Harness(self)
        agent = h.start_agent(balancers=("lb2.test",))
        h.start_balancer()
        yield wait_until(lambda: agent.counters[Refusal.WRONG_IDENTITY] >= 1)
        self.assertEqual(agent.sessions, set())

    @inlineCallbacks
    def test_home_outside_prefixes(self) -> Any:
        """An agent (lying, or misconfigured with a wider prefix) reporting a home address
        outside the prefixes the balancer configured for it is refused NOT_ENTITLED."""
        h = Harness(self)
        h.cache.update(HOME, COA1, 1, 40, reactor.seconds())
        h.start_agent(entitlement=PrefixEntitlement.of(["2001:db8::/32"]))
        notifier = h.start_balancer()
        notifier.terminal_seen(HOME, home=True)
        yield wait_until(lambda: h.client.machine.state is PeerState.SUBSCRIBED)
        before = list(h.listener.changes)
        d = h.session().callRemote(
            c.BindingChanged, home=OUTSIDE, old_care_of=b"", new_care_of=COA2, seq=5,
            lifetime=40,
        )
        yield self.assertFailure(d, c.NotEntitled)
        self.assertEqual(notifier.counters[Refusal.NOT_ENTITLED], 1)
        self.assertEqual(h.listener.changes, before)

    @inlineCallbacks
    def test_replayed_sequence(self) -> Any:
        """A BindingChanged replaying an accepted sequence number is refused STALE."""
        h = Harness(self)
        h.cache.update(HOME, COA1, 1, 40, reactor.seconds())
        h.start_agent()
        notifier = h.start_balancer()
        notifier.terminal_seen(HOME, home=True)
        yield wait_until(lambda: h.client.machine.state is PeerState.SUBSCRIBED)
        h.cache.update(HOME, COA2, 2, 40, reactor.seconds())
        yield wait_until(lambda: len(h.listener.changes) == 2)
        replay = {"home": HOME, "old_care_of": COA1, "new_care_of": COA2, "seq": 2,
                  "lifetime": 40}
        yield self.assertFailure(h.session().callRemote(c.BindingChanged, **replay), c.Stale)
        older = dict(replay, new_care_of=COA3, seq=1)
        yield self.assertFailure(h.session().callRemote(c.BindingChanged, **older), c.Stale)
        self.assertEqual(notifier.counters[Refusal.STALE], 2)
        self.assertEqual(len(h.listener.changes), 2)

    @inlineCallbacks
    def test_subscription_flood_bounded(self) -> Any:
        """A flood of forged home addresses opens at most max_subscriptions: each past
        the bound pushes out an older probationary one (no binding reported), counted."""
        h = Harness(self)
        h.start_agent()
        notifier = h.start_balancer()
        notifier.subscriptions.max_entries = 50
        yield wait_until(lambda: h.client.connected)
        base = int(ipaddress.IPv6Address("2001:db8:1::"))
        for i in range(1, 1001):
            notifier.terminal_seen(ipaddress.IPv6Address(base + i).packed, home=True)
        self.assertEqual(len(notifier.subscriptions), 50)
        refused = notifier.counters[Refusal.TOO_MANY_SUBSCRIPTIONS]
        self.assertEqual(refused + notifier.lifecycle_counts()["evicted"], 950)
        assert h.agent is not None
        agent = h.agent
        yield wait_until(lambda: bool(agent.sessions) and len(h.session().subscriptions) == 50)


class TerminalPeerTests(TestCase):
    """Claim 6: the terminal's own agent, bound to its home address by its certificate."""

    timeout = 20

    @inlineCallbacks
    def test_terminal_agent(self) -> Any:
        """A terminal certificate carrying its home address is accepted and its reports
        applied; another home address from it is NOT_ENTITLED."""
        h = Harness(self)
        h.cache.update(HOME, COA1, 100, 40, reactor.seconds())
        h.start_agent(issued=TERMINAL, entitlement=HomeAddressEntitlement(HOME))
        notifier = h.start_balancer(Peer.terminal("t1", "t1.test", "2001:db8:1::16"))
        self.assertEqual(notifier.peers_for(HOME, home=True), [h.client])
        notifier.terminal_seen(HOME, home=True)
        yield wait_until(lambda: h.client.machine.state is PeerState.SUBSCRIBED)
        h.cache.update(HOME, COA2, 101, 40, reactor.seconds())
        yield wait_until(lambda: len(h.listener.changes) == 2)
        d = h.session().callRemote(
            c.BindingChanged, home=a("2001:db8:1::17"), old_care_of=b"", new_care_of=COA2,
            seq=102, lifetime=40,
        )
        yield self.assertFailure(d, c.NotEntitled)

    @inlineCallbacks
    def test_terminal_certificate_without_home(self) -> Any:
        """A terminal certificate without its home address as an IP SAN is refused."""
        h = Harness(self)
        h.start_agent(issued=TERMINAL_NO_IP, entitlement=HomeAddressEntitlement(HOME))
        notifier = h.start_balancer(Peer.terminal("t1", "t1.test", "2001:db8:1::16"))
        yield wait_until(lambda: notifier.counters[Refusal.WRONG_IDENTITY] >= 1)
        self.assertEqual(h.client.connections, 0)


class ReconnectTests(TestCase):
    """The agent restarts; the balancer reconnects with back-off and resubscribes."""

    timeout = 30

    @inlineCallbacks
    def test_agent_restart(self) -> Any:
        """After the agent goes away and comes back on the same port, the client reconnects,
        resubscribes, and the next change is delivered; nothing is applied twice."""
        h = Harness(self)
        h.cache.update(HOME, COA1, 1, 40, reactor.seconds())
        h.start_agent()
        notifier = h.start_balancer()
        notifier.terminal_seen(HOME, home=True)
        yield wait_until(lambda: h.client.machine.state is PeerState.SUBSCRIBED)
        assert h.port is not None
        port = h.port.getHost().port  # type: ignore[attr-defined]
        yield h.stop_agent()
        yield wait_until(lambda: h.client.machine.state is PeerState.DISCONNECTED)
        # Down for a while: several failed attempts, backing off.
        yield deferLater(reactor, 0.5, lambda: None)
        self.assertEqual(h.client.connections, 1)
        h.cache = BindingCache()  # a restarted agent relearns its bindings
        h.cache.update(HOME, COA1, 1, 40, reactor.seconds())
        h.start_agent(port=port)
        yield wait_until(lambda: h.client.connections == 2, timeout=5)
        yield wait_until(lambda: h.client.machine.state is PeerState.SUBSCRIBED)
        self.assertEqual(len(h.listener.changes), 1)  # the same binding: nothing new
        h.cache.update(HOME, COA2, 2, 40, reactor.seconds())
        yield wait_until(lambda: len(h.listener.changes) == 2)
        self.assertEqual(h.listener.changes[1], BindingChange(HOME, COA1, COA2, 2, 40))
        self.assertEqual(notifier.counters.total(), 0)


class FromConfigTests(TestCase):
    """Notifier.from_config builds one client per configured peer."""

    def test_from_config(self) -> None:
        """Peers from lbproxy.config become clients with the right entitlements."""
        from lbproxy.config import NotifyConfig, PeerConfig

        directory = self.mktemp()
        ca, cert, key = CA.write(directory, "lb1", BALANCER)
        config = NotifyConfig(
            enabled=True, ca=ca, certificate=cert, key=key, max_subscriptions=7,
            peers=(
                PeerConfig("ha1", "homeagent", "tcp:host=127.0.0.1:port=1", "ha1.test",
                           prefixes=(ipaddress.IPv6Network("2001:db8:1::/64"),)),
                PeerConfig("t1", "terminal", "tcp:host=127.0.0.1:port=2", "t1.test",
                           home=ipaddress.IPv6Address("2001:db8:1::16")),
            ),
        )
        notifier = Notifier.from_config(config, reactor, RecordingListener())
        self.assertEqual(sorted(notifier.clients), ["ha1", "t1"])
        self.assertEqual(notifier.subscriptions.max_entries, 7)
        self.assertEqual(notifier.peers_for(HOME, home=True), [notifier.clients["t1"]])
        self.assertEqual(notifier.peers_for(a("2001:db8:1::17"), home=True),
                         [notifier.clients["ha1"]])
        self.assertEqual(notifier.peers_for(COA1, home=False),
                         [notifier.clients["ha1"], notifier.clients["t1"]])

    def test_optional_keys(self) -> None:
        """The checks' keys are read when the configuration has them; ``local`` is passed
        by the caller."""
        import types

        directory = self.mktemp()
        ca, cert, key = CA.write(directory, "lb1", BALANCER)
        config = types.SimpleNamespace(
            ca=ca, certificate=cert, key=key, max_subscriptions=7, peers=(),
            forbidden_prefixes=["2001:db8:d::/48"], care_of_prefixes=["2001:db8:a::/48"],
            allow_unique_local=True, call_timeout=3.0, handshake_timeout=4.0, max_outstanding=9,
        )  # fmt: skip
        vip = a("2001:db8:5::80")
        policy = types.SimpleNamespace(vip_set={vip}, by_address={}, own=set())
        notifier = Notifier.from_config(config, reactor, RecordingListener(), local=lambda: policy)
        rules = notifier.addresses
        self.assertEqual([str(p) for p in rules.forbidden], ["2001:db8:d::/48"])
        self.assertEqual([str(p) for p in rules.care_of_prefixes], ["2001:db8:a::/48"])
        self.assertTrue(rules.allow_unique_local)
        self.assertIsNotNone(rules.care_of(vip))
        self.assertEqual(notifier.terminal_seen(vip), 0)


class CheckCertificateTests(SynchronousTestCase):
    """lbproxy.notify.tls.check_certificate: identity and role, exactly."""

    def cert(self, **kwargs: Any) -> Any:
        from cryptography import x509

        return x509.load_pem_x509_certificate(CA.issue(**kwargs).cert_pem)

    def test_exact_dns_id(self) -> None:
        """A DNS-ID matches case-insensitively (and with a trailing dot), nothing else."""
        cert = self.cert(dns=["HA1.Test"])
        self.assertEqual(check_certificate(cert, ["ha1.test."], SERVER_AUTH).name, "ha1.test.")
        self.assertEqual(check_certificate(cert, ["lb2.test", "ha1.test"], SERVER_AUTH).name,
                         "ha1.test")  # fmt: skip
        verdict = check_certificate(cert, ["ha2.test"], SERVER_AUTH)
        self.assertEqual((verdict.name, verdict.refusal), (None, Refusal.WRONG_IDENTITY))

    def test_ip_identity(self) -> None:
        """An identity that is an IP address matches an iPAddress SAN, not a DNS-ID."""
        cert = self.cert(dns=["2001:db8::1"], ips=["2001:db8::2"])
        self.assertTrue(check_certificate(cert, ["2001:db8::2"], SERVER_AUTH).accepted)
        self.assertFalse(check_certificate(cert, ["2001:db8::1"], SERVER_AUTH).accepted)

    def test_wildcards_never_match(self) -> None:
        """``*.test`` and ``*.example.test`` prove no name; the refusal says so."""
        for pattern, name in (("*.test", "ha1.test"), ("*.example.test", "ha1.example.test")):
            verdict = check_certificate(self.cert(dns=[pattern]), [name], SERVER_AUTH)
            self.assertEqual(verdict.refusal, Refusal.WRONG_IDENTITY)
            self.assertIn("wildcard", verdict.detail)

    def test_common_name_ignored(self) -> None:
        """No subjectAltName: refused whatever the common name says."""
        verdict = check_certificate(self.cert(common_name="ha1.test"), ["ha1.test"], SERVER_AUTH)
        self.assertEqual((verdict.refusal, verdict.detail),
                         (Refusal.WRONG_IDENTITY, "no subjectAltName"))  # fmt: skip

    def test_usage(self) -> None:
        """serverAuth for the dialled side, clientAuth for the dialling side; none, or a CA
        certificate: ``wrong_usage``."""
        server_only = self.cert(dns=["x.test"], usages=["server"])
        client_only = self.cert(dns=["x.test"], usages=["client"])
        self.assertTrue(check_certificate(server_only, ["x.test"], SERVER_AUTH).accepted)
        self.assertTrue(check_certificate(client_only, ["x.test"], CLIENT_AUTH).accepted)
        for cert, usage in ((server_only, CLIENT_AUTH), (client_only, SERVER_AUTH),
                            (self.cert(dns=["x.test"], usages=None), SERVER_AUTH),
                            (self.cert(dns=["x.test"], ca=True), SERVER_AUTH)):  # fmt: skip
            self.assertEqual(check_certificate(cert, ["x.test"], usage).refusal,
                             Refusal.WRONG_USAGE)  # fmt: skip

    def test_required_addresses(self) -> None:
        """A terminal's certificate must carry its home address as an iPAddress SAN."""
        home = ipaddress.IPv6Address("2001:db8:1::16").packed
        with_home = self.cert(dns=["t1.test"], ips=["2001:db8:1::16"])
        self.assertTrue(check_certificate(with_home, ["t1.test"], SERVER_AUTH, [home]).accepted)
        verdict = check_certificate(self.cert(dns=["t1.test"]), ["t1.test"], SERVER_AUTH, [home])
        self.assertEqual(verdict.refusal, Refusal.WRONG_IDENTITY)
