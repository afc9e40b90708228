"""Reload applies ``[notify]`` (issue 11, must show 7): peers added and removed, the
balancer's certificate and key rotated, the CA changed -- and a bad ``[notify]`` refused
whole, the running notifier unchanged.

Real parts: the balancer is `lbproxy.tap.BalancerService` (its reload is what SIGHUP and
``lbproxyctl reload`` call) reading a configuration file and PEM files written here by a CA
made here (`lbproxy.notify.pki`); the home agents are `NotificationAgent`s over
`BindingCache`s behind real TLS on 127.0.0.1 with the real reactor.  What certificate the
balancer presents is read by the *peer*, from its own end of the TLS connection.  The
refusals run on an in-memory reactor (nothing connects; the answer and the running objects
are what is checked).
"""

from __future__ import annotations

import copy
import datetime
import ipaddress
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import hashes
from twisted.internet import defer
from twisted.internet import reactor as _reactor
from twisted.internet.endpoints import TCP4ClientEndpoint
from twisted.internet.interfaces import IListeningPort
from twisted.internet.testing import MemoryReactorClock
from twisted.trial.unittest import SynchronousTestCase, TestCase

from lbproxy.config import ConfigError, load_config
from lbproxy.core.keys import Key
from lbproxy.notify import commands as c
from lbproxy.notify.agent import NotificationAgent
from lbproxy.notify.cache import BindingCache
from lbproxy.notify.client import NotificationClient, Peer
from lbproxy.notify.listener import RecordingListener
from lbproxy.notify.pki import CertificateAuthority, Issued
from lbproxy.notify.policy import PrefixEntitlement, Refusal
from lbproxy.notify.router import Notifier, format_report
from lbproxy.ops.reload import NOTIFY_FIELDS, ReloadRefusedError
from lbproxy.tap import BalancerService
from lbproxy.testing import MemoryPacketSystem
from tests.test_notify_tls import wait_until
from tests.test_preflight import FakeHost
from tests.test_reload import SplitReactor, base, render

reactor: Any = _reactor

CA = CertificateAuthority("reload test CA")
OTHER_CA = CertificateAuthority("reload test CA 2")
LB_A = CA.issue(dns=["lb1.test"])
LB_B = CA.issue(dns=["lb1.test"])  # the same name, a new certificate and key
LB_C = CA.issue(dns=["lb1.test"])
HA1 = CA.issue(dns=["ha1.test"])
HA2 = CA.issue(dns=["ha2.test"])
P1, P2 = "2001:db8:1::/64", "2001:db8:2::/64"


def a(text: str) -> bytes:
    return ipaddress.IPv6Address(text).packed


HOME1, HOME2 = a("2001:db8:1::16"), a("2001:db8:2::16")
COA1, COA2, COA3 = a("2001:db8:a1::16"), a("2001:db8:a2::16"), a("2001:db8:a3::16")


def fingerprint_pem(pem: bytes) -> bytes:
    return x509.load_pem_x509_certificate(pem).fingerprint(hashes.SHA256())


def presented_to(agent: NotificationAgent) -> list[bytes]:
    """The fingerprints of the certificates the balancer presented to ``agent``'s open
    sessions, as the agent's end of each TLS connection saw them."""
    found = []
    for session in agent.sessions:
        cert = session.transport.getHandle().get_peer_certificate()  # type: ignore[union-attr]
        found.append(cert.to_cryptography().fingerprint(hashes.SHA256()))
    return found


def renewed_ca(ca: CertificateAuthority) -> CertificateAuthority:
    """The same CA (name and key) with a new CA certificate: what it signed stays valid."""
    renewed = copy.copy(ca)
    now = datetime.datetime.now(datetime.UTC)
    renewed.cert = (
        x509.CertificateBuilder()
        .subject_name(ca.cert.subject)
        .issuer_name(ca.cert.subject)
        .public_key(ca.key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=1))
        .not_valid_after(now + datetime.timedelta(days=30))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .sign(ca.key, hashes.SHA256())
    )
    return renewed


class HomeAgent:
    """A home-agent agent listening on 127.0.0.1 (what ``twistd lbproxy-homeagent`` runs)."""

    def __init__(self, test: TestCase, issued: Issued, prefix: str,
                 ca: CertificateAuthority = CA) -> None:  # fmt: skip
        self.cache = BindingCache()
        self.agent = NotificationAgent(self.cache, PrefixEntitlement.of([prefix]),
                                       ("lb1.test",), reactor)  # fmt: skip
        self.port: IListeningPort = reactor.listenTCP(
            0, self.agent.tls_factory(ca.material(issued)), interface="127.0.0.1")
        test.addCleanup(self.stop)

    @property
    def number(self) -> int:
        return int(self.port.getHost().port)  # type: ignore[attr-defined]

    def drop_sessions(self) -> None:
        for session in list(self.agent.sessions):
            session.transport.abortConnection()  # type: ignore[union-attr]

    def stop(self) -> Any:
        self.drop_sessions()
        return self.port.stopListening()


def peer_table(name: str, port: int, identity: str, prefix: str) -> str:
    return (f'[[notify.peer]]\nname = "{name}"\nkind = "homeagent"\n'
            f'endpoint = "tcp:host=127.0.0.1:port={port}"\nidentity = "{identity}"\n'
            f'prefixes = ["{prefix}"]\n')  # fmt: skip


class Files:
    """A configuration file with ``[notify]`` and its PEM files, rewritten by the tests."""

    def __init__(self, directory: str) -> None:
        self.directory = directory
        self.path = os.path.join(directory, "lbproxy.toml")
        self.sections, self.backends = base()
        self.peers: list[str] = []
        self.write_tls("lb", LB_A)

    def write_tls(self, name: str, issued: Issued, ca: CertificateAuthority = CA) -> None:
        ca_path, cert, key = ca.write(self.directory, name, issued)
        self.sections["notify"] = {**self.sections.get("notify", {}), "enabled": True,
                                   "ca": ca_path, "certificate": cert, "key": key}

    def write(self) -> None:
        Path(self.path).write_text(render(self.sections, self.backends) + "".join(self.peers))


class ServiceReloadTests(TestCase):
    """The balancer service's reload with real agents over TLS on loopback."""

    timeout = 60

    def setUp(self) -> None:
        self.directory = tempfile.mkdtemp(prefix="lbnr-")
        self.addCleanup(shutil.rmtree, self.directory, True)
        self.files = Files(self.directory)

    def start(self) -> BalancerService:
        self.files.write()
        service = BalancerService(load_config(self.files.path), SplitReactor(),
                                  install_sighup=False,
                                  system=MemoryPacketSystem(interfaces=("lbc", "lbs")),
                                  host=FakeHost())  # fmt: skip
        service.startService()
        self.addCleanup(service.stopService)
        assert service.notifier is not None
        return service

    @defer.inlineCallbacks
    def test_peers_added_and_removed_and_certificate_rotated(self) -> Any:
        """One reload adds ha2, removes ha1 and rotates the balancer's certificate and key:
        ha1's session is closed and its subscription dropped (counted); ha2 is dialled,
        asked about the terminal the table holds in its prefix, and the certificate it
        sees is the new one; its next move reaches the table.  Then the certificate is
        renewed in place (same paths): the session up is kept, and the reconnection
        presents the newest certificate."""
        ha1 = HomeAgent(self, HA1, P1)
        ha2 = HomeAgent(self, HA2, P2)
        ha1.cache.update(HOME1, COA1, 1, 400, reactor.seconds())
        ha2.cache.update(HOME2, COA2, 1, 400, reactor.seconds())
        self.files.peers = [peer_table("ha1", ha1.number, "ha1.test", P1)]
        service = self.start()
        notifier = service.notifier
        assert notifier is not None
        backend = service.balancer.backends["a"]
        # Terminals with bindings (made with a Home Address option): home1 is subscribed at
        # ha1; no peer may speak for home2 yet.
        service.balancer.table.insert(Key("hoa", HOME1), backend, care_of=COA1)
        service.balancer.table.insert(Key("hoa", HOME2), backend, care_of=COA2)
        self.assertEqual(notifier.terminal_seen(HOME1, home=True), 1)
        self.assertEqual(notifier.terminal_seen(HOME2, home=True), 0)
        paths = service.balancer.return_paths
        yield wait_until(lambda: paths.care_of(HOME1) == COA1, timeout=10)
        self.assertEqual(presented_to(ha1.agent), [fingerprint_pem(LB_A.cert_pem)])

        self.files.peers = [peer_table("ha2", ha2.number, "ha2.test", P2)]
        self.files.write_tls("lb-b", LB_B)
        self.files.write()
        report = yield service.reload("test")
        self.assertEqual(report.restart, ())
        self.assertEqual(report.failed, ())
        self.assertEqual(report.applied, (
            "notify.certificate, notify.key (new certificate, key; 1 connections up keep "
            "theirs until they reconnect)",
            "notify.peer (added ha2; removed ha1)",
        ))  # fmt: skip
        self.assertEqual(sorted(notifier.clients), ["ha2"])
        self.assertEqual(notifier.subscriptions.for_peer("ha1"), [])
        self.assertEqual(notifier.lifecycle_counts()["dropped"], 1)
        self.assertEqual((notifier.reloads["peers_added"], notifier.reloads["peers_removed"],
                          notifier.reloads["material_rotated"]), (1, 1, 1))  # fmt: skip
        yield wait_until(lambda: not ha1.agent.sessions, timeout=10)
        yield wait_until(lambda: paths.care_of(HOME2) == COA2, timeout=10)
        self.assertEqual(presented_to(ha2.agent), [fingerprint_pem(LB_B.cert_pem)])
        ha2.cache.update(HOME2, COA3, 2, 400, reactor.seconds())
        yield wait_until(lambda: paths.care_of(HOME2) == COA3, timeout=10)
        binding = service.balancer.table.get(Key("hoa", HOME2))
        assert binding is not None
        self.assertEqual(binding.care_of, COA3)  # the terminal's entry follows it
        self.assertEqual(notifier.counters.total(), 0)
        self.assertEqual(service.control.info()["pending_restart"], [])

        # Renewed in place: the same paths, new contents.
        (session,) = ha2.agent.sessions
        self.files.write_tls("lb-b", LB_C)
        report = yield service.reload("test")
        self.assertEqual(report.applied, (
            "notify TLS files (new certificate, key; 1 connections up keep theirs until "
            "they reconnect)",))  # fmt: skip
        self.assertEqual(list(ha2.agent.sessions), [session])  # kept
        self.assertEqual(presented_to(ha2.agent), [fingerprint_pem(LB_B.cert_pem)])
        ha2.drop_sessions()
        yield wait_until(lambda: presented_to(ha2.agent) == [fingerprint_pem(LB_C.cert_pem)],
                         timeout=10)  # fmt: skip
        self.assertEqual(str((yield service.reload("test"))), "nothing changed")


class NotifierRotationTests(TestCase):
    """Notifier.use_material and the peers over TLS on loopback: a changed CA."""

    timeout = 30

    def notifier(self, agent: HomeAgent, issued: Issued = LB_A) -> Notifier:
        peer = Peer.home_agent("ha1", "ha1.test", [P1])
        endpoint = TCP4ClientEndpoint(reactor, "127.0.0.1", agent.number)
        notifier = Notifier([(peer, endpoint)], CA.material(issued), RecordingListener(),
                            reactor, initial_delay=0.05, max_delay=0.2,
                            jitter=lambda: 0.0)  # fmt: skip
        notifier.startService()
        self.addCleanup(notifier.stopService)
        return notifier

    @defer.inlineCallbacks
    def test_ca_changed_to_one_that_does_not_sign_the_peer(self) -> Any:
        """The connection up is checked against the new CA at once and closed (counted
        tls_failed); the redials fail in the handshake; nothing it sent after is applied."""
        agent = HomeAgent(self, HA1, P1)
        notifier = self.notifier(agent)
        client = notifier.clients["ha1"]
        yield wait_until(lambda: client.connected)
        outcome = notifier.use_material(OTHER_CA.material(OTHER_CA.issue(dns=["lb1.test"])))
        self.assertEqual(outcome, {"kept": 0, "closed": 1})
        self.assertEqual(notifier.reloads["closed_untrusted"], 1)
        self.assertGreaterEqual(notifier.counters[Refusal.TLS_FAILED], 1)
        yield wait_until(lambda: not agent.agent.sessions and not client.connected)
        yield wait_until(lambda: notifier.counters[Refusal.TLS_FAILED] >= 2, timeout=10)
        self.assertFalse(client.connected)

    @defer.inlineCallbacks
    def test_ca_renewed_keeps_what_it_still_signs(self) -> Any:
        """A renewed CA certificate (same name and key) still signs the peer's: the
        connection up is kept, not dropped."""
        agent = HomeAgent(self, HA1, P1)
        notifier = self.notifier(agent)
        client = notifier.clients["ha1"]
        yield wait_until(lambda: client.connected)
        (session,) = agent.agent.sessions
        renewed = renewed_ca(CA)
        outcome = notifier.use_material(renewed.material(LB_B))
        self.assertEqual(outcome, {"kept": 1, "closed": 0})
        self.assertEqual(list(agent.agent.sessions), [session])
        self.assertTrue(client.connected)
        self.assertEqual(notifier.counters.total(), 0)


def bundle(*cas: CertificateAuthority) -> bytes:
    return b"".join(ca.cert_pem for ca in cas)


class CaBundleTests(TestCase):
    """A CA rotated without a gap: trust the old and the new CA (a bundle), reissue the
    peers' certificates, then trust the new one alone."""

    timeout = 30

    @defer.inlineCallbacks
    def test_rotation_through_a_bundle(self) -> Any:
        from lbproxy.notify.tls import TlsMaterial

        old_peer = HomeAgent(self, HA1, P1)  # certificate from CA
        new_peer = HomeAgent(self, OTHER_CA.issue(dns=["ha2.test"]), P2, ca=OTHER_CA)
        peers = [(Peer.home_agent("ha1", "ha1.test", [P1]),
                  TCP4ClientEndpoint(reactor, "127.0.0.1", old_peer.number))]
        notifier = Notifier(peers, CA.material(LB_A), RecordingListener(), reactor,
                            initial_delay=0.05, max_delay=0.2, jitter=lambda: 0.0)
        notifier.startService()
        self.addCleanup(notifier.stopService)
        ha1 = notifier.clients["ha1"]
        yield wait_until(lambda: ha1.connected)
        (session,) = old_peer.agent.sessions
        # Both CAs trusted; the balancer's certificate is still CA's: ha1 stays up.
        both = TlsMaterial.from_pem(bundle(CA, OTHER_CA), LB_A.cert_pem, LB_A.key_pem)
        self.assertEqual(len(both.cas), 2)
        self.assertEqual(notifier.use_material(both), {"kept": 1, "closed": 0})
        self.assertEqual(list(old_peer.agent.sessions), [session])
        # The balancer's certificate reissued by OTHER_CA, which the new peer trusts (and
        # whose certificate the balancer now trusts): it is reached.
        lb_other = OTHER_CA.issue(dns=["lb1.test"])
        notifier.use_material(TlsMaterial.from_pem(bundle(OTHER_CA, CA), lb_other.cert_pem,
                                                   lb_other.key_pem))  # fmt: skip
        notifier.add_peer(Peer.home_agent("ha2", "ha2.test", [P2]),
                          TCP4ClientEndpoint(reactor, "127.0.0.1", new_peer.number))
        yield wait_until(lambda: notifier.clients["ha2"].connected)
        self.assertEqual(presented_to(new_peer.agent), [fingerprint_pem(lb_other.cert_pem)])
        self.assertTrue(ha1.connected)  # still trusted, still up
        # The old CA dropped: ha1's certificate is from it, so its connection closes.
        outcome = notifier.use_material(OTHER_CA.material(lb_other))
        self.assertEqual(outcome, {"kept": 1, "closed": 1})
        yield wait_until(lambda: not old_peer.agent.sessions and not ha1.connected)
        self.assertTrue(notifier.clients["ha2"].connected)
        self.assertGreaterEqual(notifier.counters[Refusal.TLS_FAILED], 1)


class NotifierPeerTests(TestCase):
    """Notifier.remove_peer over TLS on loopback: a removed peer is believed no more."""

    timeout = 30

    @defer.inlineCallbacks
    def test_removed_peer_is_not_believed_while_its_connection_closes(self) -> Any:
        agent = HomeAgent(self, HA1, P1)
        agent.cache.update(HOME1, COA1, 1, 400, reactor.seconds())
        listener = RecordingListener()
        peer = Peer.home_agent("ha1", "ha1.test", [P1])
        notifier = Notifier([(peer, TCP4ClientEndpoint(reactor, "127.0.0.1", agent.number))],
                            CA.material(LB_A), listener, reactor)  # fmt: skip
        notifier.startService()
        self.addCleanup(notifier.stopService)
        client = notifier.clients["ha1"]
        notifier.terminal_seen(HOME1, home=True)
        yield wait_until(lambda: len(listener.changes) == 1)
        protocol = client.protocol
        assert protocol is not None
        closed = notifier.remove_peer("ha1")
        # Still open this turn: what it says now changes nothing.
        with self.assertRaises(c.OutOfOrder):
            protocol.binding_changed(HOME1, COA1, COA2, 2, 400)
        self.assertEqual(len(listener.changes), 1)
        self.assertEqual(notifier.subscriptions.for_peer("ha1"), [])
        self.assertEqual(notifier.lifecycle_counts()["dropped"], 1)
        self.assertEqual(notifier.report()["reloads"]["peers_removed"], 1)
        self.assertIn("reloads: peers_added 0 peers_removed 1 peers_changed 0 "
                      "material_rotated 0 closed_untrusted 0",
                      format_report(notifier.report()).splitlines())  # lbproxyctl notify
        self.assertIn("dropped 1", format_report(notifier.report()))
        yield closed
        yield wait_until(lambda: not agent.agent.sessions)
        self.assertNotIn("ha1", notifier.clients)
        self.assertEqual(notifier.counters.total(), 0)


class RefusedReloadTests(SynchronousTestCase):
    """A bad ``[notify]`` refuses the whole reload: ``file: key: reason``, nothing changed."""

    def setUp(self) -> None:
        self.directory = tempfile.mkdtemp(prefix="lbnr-")
        self.addCleanup(shutil.rmtree, self.directory, True)
        self.files = Files(self.directory)
        self.files.peers = [peer_table("ha1", 7440, "ha1.test", P1)]
        self.files.write()
        self.service = BalancerService(load_config(self.files.path), MemoryReactorClock(),
                                       install_sighup=False,
                                       system=MemoryPacketSystem(interfaces=("lbc", "lbs")),
                                       host=FakeHost())  # fmt: skip
        self.service.startService()
        self.addCleanup(self.service.stopService)
        notifier = self.service.notifier
        assert notifier is not None
        self.notifier = notifier
        self.material = notifier.credentials.material
        self.config = self.service.config

    def assertUnchanged(self) -> None:
        self.assertIs(self.notifier.credentials.material, self.material)
        self.assertEqual(self.notifier.credentials.rotations, 0)
        self.assertEqual(sorted(self.notifier.clients), ["ha1"])
        self.assertIs(self.service.config, self.config)
        self.assertEqual(sorted(self.service.balancer.backends), ["a", "b"])

    def refused(self, kind: type[Exception] = ReloadRefusedError) -> str:
        # A backend added in the same file: refused with the rest.
        self.files.backends.append({"name": "c", "address": "2001:db8:b0::12"})
        self.files.peers.append(peer_table("ha2", 7441, "ha2.test", P2))
        self.files.write()
        failure = self.failureResultOf(self.service.reload("test"), kind)
        self.assertUnchanged()
        return str(failure.value)

    def test_missing_certificate_file(self) -> None:
        gone = os.path.join(self.directory, "gone.pem")
        self.files.sections["notify"]["certificate"] = gone
        text = self.refused()
        self.assertTrue(text.startswith(f"{self.files.path}: notify.certificate: {gone}"), text)

    def test_key_not_the_certificates(self) -> None:
        _, _, other_key = CA.write(self.directory, "other", LB_B)
        self.files.sections["notify"]["key"] = other_key
        text = self.refused()
        self.assertIn(f"{self.files.path}: notify.key: {other_key}: does not match the "
                      "certificate", text)  # fmt: skip

    def test_certificate_replaced_in_place_by_one_the_key_does_not_match(self) -> None:
        cert = self.files.sections["notify"]["certificate"]
        Path(cert).write_bytes(LB_B.cert_pem)
        text = self.refused()
        self.assertIn(f"{self.files.path}: notify.key: ", text)
        self.assertIn("does not match the certificate", text)

    def test_not_a_ca(self) -> None:
        Path(self.files.sections["notify"]["ca"]).write_text("not PEM\n")
        self.assertIn(f"{self.files.path}: notify.ca: ", self.refused())

    def test_a_bundle_with_garbage_after_the_first_ca(self) -> None:
        ca = self.files.sections["notify"]["ca"]
        Path(ca).write_bytes(CA.cert_pem + b"-----BEGIN CERTIFICATE-----\nAAAA\n"
                             b"-----END CERTIFICATE-----\n")
        text = self.refused()
        self.assertIn(f"{self.files.path}: notify.ca: {ca}: not a PEM certificate bundle", text)

    def test_bad_peer_address(self) -> None:
        self.files.peers[0] = self.files.peers[0].replace("port=7440", "port=port")
        text = self.refused(ConfigError)
        self.assertTrue(text.startswith(f"{self.files.path}: notify.peer[0].endpoint: "), text)

    def test_bad_peer_prefix(self) -> None:
        self.files.peers[0] = self.files.peers[0].replace(P1, "2001:db8:1::1/64")
        text = self.refused(ConfigError)
        self.assertTrue(text.startswith(f"{self.files.path}: notify.peer[0].prefixes"), text)

    def test_what_needs_a_restart_is_named(self) -> None:
        """Peers apply, the registry's bound does not: the answer says which is which,
        and ``info`` keeps naming the key until a restart."""
        self.files.sections["notify"]["max_subscriptions"] = 5
        self.files.peers.append(peer_table("ha2", 7441, "ha2.test", P2))
        self.files.write()
        report = self.successResultOf(self.service.reload("test"))
        self.assertEqual((report.applied, report.restart),
                         (("notify.peer (added ha2)",), ("notify.max_subscriptions",)))
        self.assertEqual(sorted(self.notifier.clients), ["ha1", "ha2"])
        self.assertEqual(self.notifier.subscriptions.max_entries, 10_000)
        self.assertEqual(self.service.control.info()["pending_restart"],
                         ["notify.max_subscriptions"])
        again = self.successResultOf(self.service.reload("test"))
        self.assertEqual((again.applied, again.restart), ((), ("notify.max_subscriptions",)))

    def test_a_changed_peer_is_dialled_again(self) -> None:
        """A peer whose endpoint changed: a new client with the new endpoint, the old one
        stopped; the subscriptions it may still speak for stay."""
        self.notifier.terminal_seen(HOME1, home=True)
        old = self.notifier.clients["ha1"]
        self.files.peers[0] = self.files.peers[0].replace("port=7440", "port=7450")
        self.files.write()
        report = self.successResultOf(self.service.reload("test"))
        self.assertEqual(report.applied, ("notify.peer (changed ha1)",))
        new = self.notifier.clients["ha1"]
        self.assertIsNot(new, old)
        assert isinstance(old, NotificationClient)
        self.assertFalse(old.running)
        self.assertTrue(old.retired)
        self.assertEqual([s.address for s in self.notifier.subscriptions.for_peer("ha1")],
                         [HOME1])  # fmt: skip
        self.assertEqual(self.notifier.lifecycle_counts()["dropped"], 0)

    def test_notify_fields_cover_the_configuration(self) -> None:
        """Every [notify] key has a reload rule."""
        import attrs

        from lbproxy.config import NotifyConfig

        names = {f.name for f in attrs.fields(NotifyConfig)}
        self.assertEqual(names, {f.name for f in NOTIFY_FIELDS})
