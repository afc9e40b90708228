"""Tests for lbproxy.agents.homeagent (with .link and .command): the home-agent agent.

The network test runs a real home link (a veth pair in two network namespaces named
``lbnt...``): Binding Updates arrive from the far side, Acknowledgements leave from the near
side, the agent's AF_PACKET reader sees both, and a balancer's Notifier over TLS rekeys a
real StickyTable through the TableListener.
"""

from __future__ import annotations

import contextlib
import ipaddress
import json
import socket
from typing import Any

from twisted.internet import reactor as _reactor
from twisted.internet.defer import inlineCallbacks
from twisted.internet.endpoints import TCP4ClientEndpoint
from twisted.internet.testing import StringTransport
from twisted.trial.unittest import SynchronousTestCase, TestCase

from lbproxy.agents.config import AgentCommon, HomeAgentConfig
from lbproxy.agents.homeagent import HomeAgentService
from lbproxy.agents.link import LinkReader
from lbproxy.core.keys import Key
from lbproxy.core.returnpaths import ReturnPaths
from lbproxy.core.selection import Backend
from lbproxy.core.table import StickyTable
from lbproxy.notify.adapter import TableListener
from lbproxy.notify.client import Peer
from lbproxy.notify.machine import PeerState
from lbproxy.notify.router import Notifier
from lbproxy.testing import VethPair
from lbproxy.wire import mobility as m
from tests.test_notify_tls import BALANCER, CA, HA1, wait_until

reactor: Any = _reactor


def a(text: str) -> bytes:
    return ipaddress.IPv6Address(text).packed


HOME, HA = a("2001:db8:7a::16"), a("2001:db8:7a::1")
COAS = [a("2001:db8:c1::16"), a("2001:db8:c2::16"), a("2001:db8:c3::16")]


def config(command_socket: str = "") -> HomeAgentConfig:
    return HomeAgentConfig(
        path="test",
        common=AgentCommon("tcp:0:interface=127.0.0.1", "", "", "", ("lb1.test",)),
        prefixes=(ipaddress.IPv6Network("2001:db8:7a::/64"),),
        command_socket=command_socket,
    )


class CommandSocketTests(TestCase):
    """Home-agent software pushes bindings over the UNIX socket."""

    timeout = 10

    @inlineCallbacks
    def test_push(self) -> Any:
        """A JSON line updates the cache; a home outside the prefixes and a stale sequence
        number are refused with an error line; "bindings" lists the cache."""
        path = self.mktemp()
        service = HomeAgentService(config(path), reactor, CA.material(HA1))
        service.startService()
        self.addCleanup(service.stopService)
        client = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        client.setblocking(False)
        client.connect(path)
        self.addCleanup(client.close)
        answers: list[dict[str, Any]] = []
        buffered = b""

        def ask(request: dict[str, Any]) -> Any:
            client.send(json.dumps(request).encode() + b"\n")
            n = len(answers)

            def got() -> bool:
                nonlocal buffered
                with contextlib.suppress(BlockingIOError):
                    buffered += client.recv(65536)
                while b"\n" in buffered:
                    line, buffered = buffered.split(b"\n", 1)
                    answers.append(json.loads(line))
                return len(answers) > n

            return wait_until(got)

        yield ask({"home": "2001:db8:7a::16", "care_of": "2001:db8:c1::16", "seq": 3,
                   "lifetime": 40})
        self.assertEqual(answers[-1], {"ok": True, "changed": True})
        binding = service.cache.get(HOME)
        assert binding is not None
        self.assertEqual(binding.care_of, COAS[0])
        yield ask({"home": "2001:db8:99::16", "care_of": "2001:db8:c1::16", "seq": 1,
                   "lifetime": 40})
        self.assertIn("outside", answers[-1]["error"])
        yield ask({"home": "2001:db8:7a::16", "care_of": "2001:db8:c2::16", "seq": 2,
                   "lifetime": 40})
        self.assertIn("stale", answers[-1]["error"])
        yield ask({"command": "bindings"})
        self.assertEqual(answers[-1]["bindings"][0]["care_of"], "2001:db8:c1::16")


class HomeLinkTests(TestCase):
    """Claims 5, 9, 12 end to end on a real link."""

    timeout = 60

    def setUp(self) -> None:
        why = VethPair.unavailable()
        if why:
            raise self.skipTest(why)
        self.pair = VethPair("lbnt", near_address="2001:db8:7a::1",
                             far_address="2001:db8:7a::2", routed="2001:db8:7b::/64")
        self.pair.create()
        self.addCleanup(self.pair.destroy)

    def raw_socket(self, namespace: str, interface: str) -> socket.socket:
        from lbproxy.io.rawsocket import _network_namespace

        with _network_namespace(namespace):
            s = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(0x86DD))
            s.bind((interface, 0))
        self.addCleanup(s.close)
        return s

    def frame(self, dst_mac: str, src_mac: str, packet: bytes) -> bytes:
        return (bytes.fromhex(dst_mac.replace(":", "")) + bytes.fromhex(src_mac.replace(":", ""))
                + b"\x86\xdd" + packet)

    @inlineCallbacks
    def test_moves_keep_backend(self) -> Any:
        """A terminal keyed on its source address moves CoA1 -> CoA2 -> CoA3 -> CoA1 ...;
        each BU/BA pair on the home link rekeys the table to the same backend, the return
        to an earlier CoA makes no new entry (T235), and every entry is confirmed."""
        from lbproxy.io.rawsocket import _network_namespace

        service = HomeAgentService(config(), reactor, CA.material(HA1))
        reader = LinkReader(reactor, self.pair.near_interface, service.observer.frame)
        with _network_namespace(self.pair.near):
            reader.open()
        service.startService()
        reader.start()
        self.addCleanup(service.stopService)
        self.addCleanup(reader.stop)

        table = StickyTable(reactor, lifetime=300.0, max_entries=1000)
        backend = Backend("srv1", ipaddress.IPv6Address("2001:db8:100::1"))
        table.insert(Key("src", COAS[0]), backend)
        paths = ReturnPaths(reactor, 1000)
        listener = TableListener(table, paths)
        port = service.listening._waitingForPort.result  # type: ignore[union-attr]
        endpoint = TCP4ClientEndpoint(reactor, "127.0.0.1", port.getHost().port)
        notifier = Notifier(
            [(Peer.home_agent("ha1", "ha1.test", ["2001:db8:7a::/64"]), endpoint)],
            CA.material(BALANCER), listener, reactor,
        )
        notifier.startService()
        self.addCleanup(notifier.stopService)
        client = notifier.clients["ha1"]

        mn = self.raw_socket(self.pair.far, self.pair.far_interface)
        ha = self.raw_socket(self.pair.near, self.pair.near_interface)

        def move(seq: int, coa: bytes) -> None:
            bu = m.bu_packet(coa, HA, HOME, m.BindingUpdate(seq, 10))
            mn.send(self.frame(self.pair.near_mac, self.pair.far_mac, bu))
            ba = m.ba_packet(HA, coa, HOME, m.BindingAck(0, seq, 10))
            ha.send(self.frame(self.pair.far_mac, self.pair.near_mac, ba))

        move(1, COAS[0])  # the terminal's first registration, before the balancer asks
        yield wait_until(lambda: service.cache.get(HOME) is not None)
        notifier.terminal_seen(COAS[0])  # first packet, key = source address (CoA1)
        yield wait_until(lambda: client.machine.state is PeerState.SUBSCRIBED)
        path = [COAS[1], COAS[2], COAS[0], COAS[1], COAS[0]]
        for seq, coa in enumerate(path, start=2):
            move(seq, coa)
            # the Subscribe answer confirmed CoA1 (applied 1); each move applies one more
            yield wait_until(lambda seq=seq: listener.applied >= seq)  # type: ignore[misc]
            entry = table.get(Key("src", coa))
            assert entry is not None
            self.assertEqual(entry.backend, backend)
            self.assertEqual(paths.care_of(HOME), coa)
        self.assertEqual(len(table), 3)  # CoA1, CoA2, CoA3: returns made no new entry
        self.assertEqual(notifier.counters.total(), 0)
        self.assertGreaterEqual(service.observer.counts["ba_applied"], 6)


class CommandGarbageTests(SynchronousTestCase):
    """Whatever a client of the command socket writes is answered; nothing raises, a
    refused request changes nothing."""

    def setUp(self) -> None:
        from twisted.internet.task import Clock

        from lbproxy.agents.command import CommandProtocol
        from lbproxy.notify.cache import BindingCache
        from lbproxy.notify.policy import PrefixEntitlement

        self.cache = BindingCache()
        self.protocol = CommandProtocol(self.cache, PrefixEntitlement.of(["2001:db8:7a::/64"]),
                                        Clock())  # fmt: skip
        self.transport = StringTransport()
        self.protocol.makeConnection(self.transport)

    def ask(self, line: bytes) -> dict[str, Any]:
        self.transport.clear()
        self.protocol.dataReceived(line + b"\n")
        answer: dict[str, Any] = json.loads(self.transport.value().splitlines()[0])
        return answer

    def test_garbage(self) -> None:
        """Not JSON, deep nesting, wrong types, NaN, huge and negative lifetimes, bools,
        bad addresses, missing keys: an error each, the cache unchanged."""
        good = {"home": "2001:db8:7a::16", "care_of": "2001:db8:c1::16", "seq": 3,
                "lifetime": 40}  # fmt: skip
        self.assertEqual(self.ask(json.dumps(good).encode()), {"ok": True, "changed": True})
        before = (list(self.cache), self.cache.last_seq(HOME))
        lines = [b"not json", b"\xff\xfe", b"[" * 2000 + b"]" * 2000, b"[]", b"42",
                 b'{"command": 7}', json.dumps({**good, "seq": 4, "lifetime": 10**400}).encode(),
                 json.dumps({**good, "seq": 4, "lifetime": -1}).encode(),
                 json.dumps({**good, "seq": 4, "lifetime": 262_141}).encode(),
                 json.dumps({**good, "seq": 4, "lifetime": True}).encode(),
                 json.dumps({**good, "seq": True}).encode(),
                 json.dumps({**good, "seq": 70_000}).encode(),
                 b'{"home": "2001:db8:7a::16", "care_of": "2001:db8:c1::16", "seq": 4, '
                 b'"lifetime": NaN}',
                 json.dumps({**good, "seq": 4, "care_of": "not an address"}).encode(),
                 json.dumps({**good, "seq": 4, "home": "2001:db8:99::16"}).encode(),
                 json.dumps({"home": "2001:db8:7a::16"}).encode()]  # fmt: skip
        for line in lines:
            answer = self.ask(line)
            self.assertIn("error", answer, line[:60])
            self.assertEqual((list(self.cache), self.cache.last_seq(HOME)), before, line[:60])
        self.assertFalse(self.transport.disconnecting)

    def test_line_too_long(self) -> None:
        """A line over 4 KiB is answered with an error and the connection closed."""
        self.protocol.dataReceived(b"x" * 5000)
        self.assertIn(b"line too long", self.transport.value())
        self.assertTrue(self.transport.disconnecting)
