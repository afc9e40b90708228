"""Tests for lbproxy.ops.manhole: a real SSH session, key-only, sees the live table."""

from __future__ import annotations

import functools
import ipaddress
import os
import socket
from typing import Any, cast

from cryptography.hazmat.primitives.asymmetric import ed25519
from scapy.layers.inet import UDP
from scapy.layers.inet6 import HAO, IPv6, IPv6ExtHdrDestOpt
from twisted.conch.ssh import channel, common, connection, keys, session, transport, userauth
from twisted.internet import defer, reactor, task
from twisted.internet.defer import Deferred
from twisted.internet.endpoints import TCP6ClientEndpoint
from twisted.internet.protocol import Factory
from twisted.logger import ILogObserver, globalLogPublisher
from twisted.trial.unittest import SynchronousTestCase, TestCase

from lbproxy.core.balancer import Balancer
from lbproxy.core.keys import KeyChain
from lbproxy.core.selection import Backend, RoundRobin
from lbproxy.core.table import StickyTable
from lbproxy.ops.control import Control
from lbproxy.ops.manhole import (
    AuthorizedKeysFile,
    UnsafeKeyFileError,
    make_manhole_factory,
    make_manhole_service,
    manhole_namespace,
)
from tests.test_audit import AuditCapture

REACTOR: Any = reactor
VIP = "2001:db8:ff::1"


def new_key() -> keys.Key:
    return keys.Key(ed25519.Ed25519PrivateKey.generate())


def live_control() -> Control:
    """A real balancer that has seen two terminals, one of them from a care-of address."""
    clock = task.Clock()
    balancer = Balancer(
        chain=KeyChain.from_names(["hoa", "src"]),
        table=StickyTable(clock, lifetime=300.0, max_entries=100),
        scheduler=RoundRobin(),
        backends=[Backend("web1", "2001:db8:100::1"), Backend("web2", "2001:db8:100::2")],
        virtual_addresses=[ipaddress.IPv6Address(VIP)],
        clock=clock,
    )
    mobile = (
        IPv6(src="2001:db8:aa::77", dst=VIP)
        / IPv6ExtHdrDestOpt(options=[HAO(hoa="2001:db8:1::16")])
        / UDP(sport=4000, dport=53)
    )
    balancer.inbound(bytearray(bytes(mobile)))
    balancer.inbound(bytearray(bytes(IPv6(src="2001:db8:2::9", dst=VIP) / UDP(dport=53))))
    return Control(balancer)


class ClientTransport(transport.SSHClientTransport):
    """Checks the host key against the expected one, then authenticates."""

    def __init__(self, client: Client) -> None:
        self.client = client

    def verifyHostKey(self, hostKey: bytes, fingerprint: bytes) -> Deferred[None]:
        if hostKey != self.client.host_key.public().blob():
            return defer.fail(ValueError("unexpected host key"))
        return defer.succeed(None)

    def connectionSecure(self) -> None:
        self.requestService(ClientAuth(self.client, ClientConnection(self.client)))

    def connectionLost(self, reason: Any = None) -> None:
        super().connectionLost(reason)
        if not self.client.closed.called:
            self.client.closed.callback(None)


class ClientAuth(userauth.SSHUserAuthClient):
    """Offers the client's key, or (password mode) insists on a password."""

    def __init__(self, client: Client, service: Any) -> None:
        super().__init__(b"operator", service)
        self.client = client
        if client.password is not None:
            self.preferredOrder = [b"password"]

    def ssh_USERAUTH_FAILURE(self, packet: bytes) -> Any:
        methods, _rest = common.getNS(packet)
        self.client.offered.append(methods)
        if self.client.password is not None and not self.client.password_tried:
            # Send a password even though it was not offered: it must be refused too.
            self.client.password_tried = True
            self.askForAuth(b"password", b"\x00" + common.NS(self.client.password))
            return None
        return super().ssh_USERAUTH_FAILURE(packet)

    def getPublicKey(self) -> Any:
        if self.client.user_key is None or self.lastPublicKey is not None:
            return None
        return self.client.user_key.public()

    def getPrivateKey(self) -> Deferred[keys.Key]:
        assert self.client.user_key is not None
        return defer.succeed(self.client.user_key)

    def getPassword(self, prompt: Any = None) -> Any:
        return None


class ClientConnection(connection.SSHConnection):
    def __init__(self, client: Client) -> None:
        super().__init__()
        self.client = client

    def serviceStarted(self) -> None:
        self.client.authenticated = True
        self.openChannel(ShellChannel(self.client, conn=self))


class ShellChannel(channel.SSHChannel):
    """Asks for a wide pty and a shell; collects what the manhole writes."""

    name = b"session"

    def __init__(self, client: Client, **kw: Any) -> None:
        super().__init__(**kw)
        self.client = client

    def channelOpen(self, specificData: bytes) -> None:
        pty = session.packRequest_pty_req(b"xterm", (40, 220, 0, 0), b"")
        assert self.conn is not None
        self.conn.sendRequest(self, b"pty-req", pty, wantReply=True)
        self.conn.sendRequest(self, b"shell", b"", wantReply=True)
        self.client.channel = self

    def dataReceived(self, data: bytes) -> None:
        self.client.received(data)


class Client:
    """One SSH connection to the manhole and what happened on it."""

    def __init__(
        self, host_key: keys.Key, user_key: keys.Key | None, password: bytes | None = None
    ) -> None:
        self.host_key = host_key
        self.user_key = user_key
        self.password = password
        self.password_tried = False
        self.offered: list[bytes] = []
        self.authenticated = False
        self.channel: ShellChannel | None = None
        self.output = b""
        self.closed: Deferred[None] = Deferred()
        self._waiting: list[tuple[bytes, Deferred[bytes]]] = []
        self.transport: ClientTransport | None = None

    def connect(self, port: int) -> Deferred[Any]:
        def build() -> ClientTransport:
            self.transport = ClientTransport(self)
            return self.transport

        factory = Factory()
        factory.protocol = build
        return TCP6ClientEndpoint(REACTOR, "::1", port).connect(factory)

    def received(self, data: bytes) -> None:
        self.output += data
        still = []
        for marker, d in self._waiting:
            if marker in self.output:
                d.callback(self.output)
            else:
                still.append((marker, d))
        self._waiting = still

    def wait_for(self, marker: bytes, timeout: float = 10.0) -> Deferred[bytes]:
        d: Deferred[bytes] = Deferred()
        if marker in self.output:
            d.callback(self.output)
            return d
        self._waiting.append((marker, d))
        return d.addTimeout(timeout, REACTOR)

    def type(self, line: str) -> None:
        assert self.channel is not None
        self.channel.write(line.encode() + b"\r")

    def close(self) -> Deferred[None]:
        if self.transport is not None and self.transport.transport is not None:
            self.transport.transport.loseConnection()
        return self.closed


class ManholeSessionTests(TestCase):
    timeout = 60

    def setUp(self) -> None:
        self.host_key = new_key()
        self.user_key = new_key()
        directory = os.path.abspath(self.mktemp())
        os.makedirs(directory)
        self.host_key_path = os.path.join(directory, "ssh_host_ed25519_key")
        with open(self.host_key_path, "wb") as handle:
            handle.write(self.host_key.toString("OPENSSH"))
        self.authorized_path = os.path.join(directory, "authorized_keys")
        with open(self.authorized_path, "wb") as handle:
            handle.write(b"# operators\n" + self.user_key.public().toString("OPENSSH") + b"\n")
        self.control = live_control()
        self.factory = make_manhole_factory(
            functools.partial(manhole_namespace, self.control), self.host_key_path,
            self.authorized_path,
        )
        self.port = REACTOR.listenTCP(0, self.factory, interface="::1")
        self.addCleanup(self.port.stopListening)

    def client(self, user_key: keys.Key | None, password: bytes | None = None) -> Client:
        client = Client(self.host_key, user_key, password)
        self.addCleanup(client.close)
        return client

    @defer.inlineCallbacks
    def test_show_over_ssh(self) -> Any:
        """With the authorized key, a shell session runs show() and gets the live table."""
        client = self.client(self.user_key)
        yield client.connect(self.port.getHost().port)
        yield client.wait_for(b">>> ")
        self.assertTrue(client.authenticated)
        client.type("show()")
        output = yield client.wait_for(b"(2 bindings)")
        text = output.decode("utf-8", "replace")
        self.assertIn("addr 2001:db8:1::16", text)
        self.assertIn("2001:db8:aa::77", text)  # the care-of address seen
        self.assertIn("addr 2001:db8:2::9", text)
        self.assertIn("web1", text)
        self.assertIn("web2", text)
        header = next(line for line in text.splitlines() if "care-of" in line)
        self.assertEqual(header.split()[:3], ["kind", "key", "backend"])
        # The namespace holds the live objects: change the table, see it at once.
        client.type("forget('src 2001:db8:2::9')")
        client.type("len(table)")
        yield client.wait_for(b"\r\n1\r\n")
        self.assertEqual(len(self.control.balancer.table), 1)

    @defer.inlineCallbacks
    def test_password_login_refused(self) -> Any:
        """Password authentication is neither offered nor accepted."""
        client = self.client(None, password=b"hunter2")
        yield client.connect(self.port.getHost().port)
        yield client.closed
        self.assertFalse(client.authenticated)
        self.assertTrue(client.password_tried)
        self.assertTrue(client.offered)
        self.assertEqual(set(client.offered), {b"publickey"})

    @defer.inlineCallbacks
    def test_unknown_key_refused(self) -> Any:
        """A key not in authorized_keys does not get in."""
        client = self.client(new_key())
        yield client.connect(self.port.getHost().port)
        yield client.closed
        self.assertFalse(client.authenticated)
        self.assertIsNone(client.channel)

    @defer.inlineCallbacks
    def test_authorized_keys_reread(self) -> Any:
        """Removing a key from authorized_keys locks it out without a restart."""
        with open(self.authorized_path, "wb") as handle:
            handle.write(b"")
        client = self.client(self.user_key)
        yield client.connect(self.port.getHost().port)
        yield client.closed
        self.assertFalse(client.authenticated)

    @defer.inlineCallbacks
    def test_changes_are_audited_with_the_ssh_user(self) -> Any:
        """move() typed in the manhole is one audit line naming the SSH user; the new
        verbs are there (info, weight, undrain) and page the table (show offset)."""
        capture = AuditCapture(self)
        client = self.client(self.user_key)
        yield client.connect(self.port.getHost().port)
        yield client.wait_for(b">>> ")
        client.type("move('addr 2001:db8:1::16', 'web2')")
        yield client.wait_for(b"web2")
        client.type("weight('web1', 4)['weight']")
        yield client.wait_for(b"\r\n4\r\n")
        client.type("undrain('web1')['weight']")
        yield client.wait_for(b"\r\n1\r\n")
        client.type("info()['offload']")
        yield client.wait_for(b"'none'")
        client.type("show(limit=1, offset=1)")
        yield client.wait_for(b"(1 of 2 bindings shown, from offset 1)")
        self.assertEqual(capture.lines, [
            'audit: who="manhole user=operator" action=move key="addr 2001:db8:1::16" '
            "backend=web2 previous=web1",
            'audit: who="manhole user=operator" action=weight backend=web1 weight=4 previous=1',
            'audit: who="manhole user=operator" action=undrain backend=web1 weight=1 '
            "previous=4",
        ])

    @defer.inlineCallbacks
    def test_unsafe_authorized_keys_admit_no_one(self) -> Any:
        """An authorized_keys file others may write (or, as root, one owned by nobody)
        admits no one, even with a listed key, and the log says why."""
        errors: list[str] = []

        def observe(event: dict[str, Any]) -> None:
            if "Manhole authorized keys refused" in event.get("log_format", ""):
                errors.append(str(event["reason"]))

        observer = cast(ILogObserver, observe)
        globalLogPublisher.addObserver(observer)
        self.addCleanup(globalLogPublisher.removeObserver, observer)
        os.chmod(self.authorized_path, 0o666)
        client = self.client(self.user_key)
        yield client.connect(self.port.getHost().port)
        yield client.closed
        self.assertFalse(client.authenticated)
        self.assertIn("writable by others (mode 0666)", errors[0])
        if os.geteuid() == 0:
            os.chmod(self.authorized_path, 0o644)
            os.chown(self.authorized_path, 65534, 65534)
            client = self.client(self.user_key)
            yield client.connect(self.port.getHost().port)
            yield client.closed
            self.assertFalse(client.authenticated)
            self.assertIn("owned by uid 65534", errors[-1])
        os.chown(self.authorized_path, os.geteuid(), os.getegid())
        os.chmod(self.authorized_path, 0o600)
        client = self.client(self.user_key)
        yield client.connect(self.port.getHost().port)
        yield client.wait_for(b">>> ")
        self.assertTrue(client.authenticated)

    @defer.inlineCallbacks
    def test_keys_changed_in_place(self) -> Any:
        """use_keys (what a reload does when only the key files change): the new
        authorized keys admit the new key and no longer the old one."""
        other = new_key()
        path = self.authorized_path + ".new"
        with open(path, "wb") as handle:
            handle.write(other.public().toString("OPENSSH") + b"\n")
        self.factory.use_keys(self.host_key_path, path)
        client = self.client(self.user_key)
        yield client.connect(self.port.getHost().port)
        yield client.closed
        self.assertFalse(client.authenticated)
        client = self.client(other)
        yield client.connect(self.port.getHost().port)
        yield client.wait_for(b">>> ")
        self.assertTrue(client.authenticated)

    @defer.inlineCallbacks
    def test_service_on_loopback_endpoint(self) -> Any:
        """make_manhole_service listens on its endpoint and serves the same shell."""
        probe = socket.socket(socket.AF_INET6)
        probe.bind(("::1", 0))
        number = probe.getsockname()[1]
        probe.close()
        service = make_manhole_service(
            self.control,
            self.host_key_path,
            self.authorized_path,
            rf"tcp6:{number}:interface=\:\:1",
            REACTOR,
        )
        service.startService()
        self.addCleanup(service.stopService)
        client = self.client(self.user_key)
        yield client.connect(number)
        yield client.wait_for(b">>> ")
        client.type("stats()['packets_in']")
        yield client.wait_for(b"\r\n2\r\n")


class FactoryTests(SynchronousTestCase):
    def test_public_host_key_refused(self) -> None:
        """A public key given as the host key is a configuration error, said clearly."""
        path = self.mktemp()
        with open(path, "wb") as handle:
            handle.write(new_key().public().toString("OPENSSH"))
        error = self.assertRaises(
            ValueError, make_manhole_factory, dict, path, "/nonexistent"
        )
        self.assertIn("private", str(error))

    def test_unsafe_host_key_refused(self) -> None:
        """A host key others may write is refused (they could impersonate the manhole),
        and so, as root, is one owned by another user."""
        path = self.mktemp()
        with open(path, "wb") as handle:
            handle.write(new_key().toString("OPENSSH"))
        os.chmod(path, 0o620)
        error = self.assertRaises(UnsafeKeyFileError, make_manhole_factory, dict, path,
                                  "/nonexistent")  # fmt: skip
        self.assertIn("writable by others (mode 0620)", str(error))
        os.chmod(path, 0o600)
        make_manhole_factory(dict, path, "/nonexistent")
        if os.geteuid() == 0:
            os.chown(path, 65534, 65534)
            error = self.assertRaises(UnsafeKeyFileError, make_manhole_factory, dict, path,
                                      "/nonexistent")  # fmt: skip
            self.assertIn("owned by uid 65534", str(error))

    def test_host_keys_are_per_factory(self) -> None:
        """Two factories do not share host keys (no class-level dicts)."""
        paths = []
        for _ in range(2):
            path = self.mktemp()
            with open(path, "wb") as handle:
                handle.write(new_key().toString("OPENSSH"))
            paths.append(path)
        first = make_manhole_factory(dict, paths[0], "/nonexistent")
        second = make_manhole_factory(dict, paths[1], "/nonexistent")
        self.assertNotEqual(first.publicKeys, second.publicKeys)

    def test_unreadable_authorized_keys_admits_no_one(self) -> None:
        """A missing authorized_keys file yields no keys."""
        self.assertEqual(list(AuthorizedKeysFile("/nonexistent/keys").getAuthorizedKeys(b"x")), [])

    def test_namespace(self) -> None:
        """The namespace holds the live objects and the helpers."""
        control = live_control()
        namespace = manhole_namespace(control)
        self.assertIs(namespace["table"], control.balancer.table)
        self.assertIs(namespace["counters"], control.balancer.counters)
        for name in ("balancer", "backends", "chain", "show", "trace", "move", "forget",
                     "weight", "drain", "undrain", "stats", "backend_list", "info", "reload"):
            self.assertIn(name, namespace)
        self.assertIn("(2 bindings)", repr(namespace["show"]()))

    def test_journey(self) -> None:
        """``journey(key)`` prints the terminal's journey as lbproxyctl does."""
        from scapy.layers.inet import UDP
        from scapy.layers.inet6 import HAO, IPv6ExtHdrDestOpt

        from lbproxy.core.journey import Journeys

        coa1, home = "2001:db8:a1::5", "2001:db8:100::5"
        control = live_control()
        balancer = control.balancer
        balancer.follow_journeys(Journeys(balancer.clock))
        balancer.inbound(bytearray(bytes(IPv6(src=coa1, dst=VIP) / IPv6ExtHdrDestOpt(
            options=[HAO(hoa=home)]) / UDP(dport=80) / b"x")))
        shown = repr(manhole_namespace(control)["journey"](f"addr {coa1}"))
        self.assertTrue(shown.startswith(f"journey of addr {coa1}: bound by addr {home} to "))
        self.assertIn(f"created: addr {home} -> ", shown)
