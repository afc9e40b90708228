"""The balancer's ``[notify]`` keys (lbproxy.config): defaults, values, and every mistake
refused as one line ``file: key: reason``; and ``Notifier.from_config`` reading them."""

from __future__ import annotations

import ipaddress
import os

from twisted.internet.testing import MemoryReactorClock
from twisted.trial.unittest import SynchronousTestCase

from lbproxy.config import DIAL_IN_PREFIX, ConfigError, parse_config
from lbproxy.notify import client
from lbproxy.notify.listener import RecordingListener
from lbproxy.notify.router import Notifier
from tests.test_notify_forgeries import BALANCER, CA

BASE = """
[virtual]
addresses = ["2001:db8:5::80"]
[interfaces]
client = "eth0"
server = "eth1"
[[backend]]
name = "a"
address = "2001:db8:b0::11"
[notify]
"""
PEER = """
[[notify.peer]]
name = "ha1"
endpoint = "tcp:host=2001\\\\:db8\\\\:100\\\\:\\\\:1:port=7440"
identity = "ha1.example.net"
prefixes = ["2001:db8:100::/64"]
"""


class NotifyKeysTests(SynchronousTestCase):
    """The keys, their defaults and their checks."""

    def test_defaults(self) -> None:
        n = parse_config(BASE, "x.toml").notify
        self.assertEqual((n.forbidden_prefixes, n.care_of_prefixes, n.allow_unique_local),
                         ((), (), False))  # fmt: skip
        self.assertEqual((n.call_timeout, n.handshake_timeout, n.max_outstanding),
                         (10.0, 10.0, 512))  # fmt: skip
        self.assertEqual((n.interval, n.idle_lifetime, n.listen, n.max_dial_in),
                         (0, 600.0, "", 10000))  # fmt: skip

    def test_values(self) -> None:
        text = BASE + """forbidden_prefixes = ["2001:db8:d::/48", "2001:db8:e::/48"]
care_of_prefixes = ["2001:db8:a0::/44"]
allow_unique_local = true
call_timeout = 2
handshake_timeout = 2.5
max_outstanding = 64
interval = 30
idle_lifetime = 5
listen = "tcp6:7442"
max_dial_in = 100
""" + PEER + "interval = 10\n"
        n = parse_config(text, "x.toml").notify
        self.assertEqual([str(p) for p in n.forbidden_prefixes],
                         ["2001:db8:d::/48", "2001:db8:e::/48"])  # fmt: skip
        self.assertEqual(n.care_of_prefixes, (ipaddress.IPv6Network("2001:db8:a0::/44"),))
        self.assertEqual((n.allow_unique_local, n.call_timeout, n.handshake_timeout,
                          n.max_outstanding, n.interval, n.idle_lifetime, n.listen,
                          n.max_dial_in),
                         (True, 2.0, 2.5, 64, 30, 5.0, "tcp6:7442", 100))  # fmt: skip
        self.assertEqual(n.peers[0].interval, 10)
        self.assertIsNone(parse_config(BASE + PEER, "x.toml").notify.peers[0].interval)

    def test_refused(self) -> None:
        cases = [
            ('forbidden_prefixes = "2001:db8::/32"', "notify.forbidden_prefixes", "expected list"),
            ('forbidden_prefixes = ["nope"]', "notify.forbidden_prefixes", "nope"),
            ('forbidden_prefixes = [1]', "notify.forbidden_prefixes", "IPv6 prefix"),
            ('forbidden_prefixes = ["2001:db8::/32", "2001:db8::/32"]',
             "notify.forbidden_prefixes", "listed twice"),
            ('care_of_prefixes = ["2001:db8::1/32"]', "notify.care_of_prefixes", "host bits"),
            ("allow_unique_local = 1", "notify.allow_unique_local", "expected bool"),
            ("call_timeout = 0", "notify.call_timeout", "outside"),
            ("call_timeout = inf", "notify.call_timeout", "finite"),
            ("handshake_timeout = 7200", "notify.handshake_timeout", "outside"),
            ("max_outstanding = 0", "notify.max_outstanding", "outside"),
            ("max_outstanding = 1.5", "notify.max_outstanding", "expected int"),
            ("interval = -1", "notify.interval", "outside"),
            ("interval = 86401", "notify.interval", "outside"),
            ("idle_lifetime = 0.5", "notify.idle_lifetime", "outside"),
            ('listen = "nope:1"', "notify.listen", "not a Twisted server endpoint"),
            ("max_dial_in = 0", "notify.max_dial_in", "outside"),
            ("intervall = 3", "notify.intervall", "unknown key"),
        ]
        for line, key, reason in cases:
            with self.subTest(line=line):
                e = self.assertRaises(ConfigError, parse_config, BASE + line + "\n", "x.toml")
                self.assertEqual((e.path, e.key), ("x.toml", key), str(e))
                self.assertIn(reason, e.reason)
                self.assertNotIn("\n", str(e))

    def test_peer_keys_refused(self) -> None:
        e = self.assertRaises(ConfigError, parse_config, BASE + PEER + "interval = -5\n", "x.toml")
        self.assertEqual(e.key, "notify.peer[0].interval")
        named = PEER.replace('name = "ha1"', 'name = "terminal:2001:db8::1"')
        e = self.assertRaises(ConfigError, parse_config, BASE + named, "x.toml")
        self.assertEqual(e.key, "notify.peer[0].name")
        self.assertIn("dial in", e.reason)

    def test_prefix_matches_the_notifier(self) -> None:
        self.assertEqual(DIAL_IN_PREFIX, client.DIAL_IN_PREFIX)


class FromConfigTests(SynchronousTestCase):
    """``Notifier.from_config`` reads every key."""

    def test_from_config(self) -> None:
        directory = self.mktemp()
        ca, cert, key = CA.write(directory, "lb", BALANCER)
        text = BASE + f"""enabled = true
ca = "{ca}"
certificate = "{cert}"
key = "{key}"
forbidden_prefixes = ["2001:db8:d::/48"]
care_of_prefixes = ["2001:db8:a0::/44"]
allow_unique_local = true
call_timeout = 2
handshake_timeout = 3
max_outstanding = 64
interval = 30
idle_lifetime = 8
listen = "tcp6:7442:interface=\\\\:\\\\:1"
max_dial_in = 100
""" + PEER + "interval = 10\n"
        config = parse_config(text, os.path.join(directory, "x.toml"))
        reactor = MemoryReactorClock()
        n = Notifier.from_config(config.notify, reactor, RecordingListener())
        self.assertEqual([str(p) for p in n.addresses.forbidden], ["2001:db8:d::/48"])
        self.assertEqual([str(p) for p in n.addresses.care_of_prefixes], ["2001:db8:a0::/44"])
        self.assertTrue(n.addresses.allow_unique_local)
        link = n.clients["ha1"]
        self.assertEqual((link.call_timeout, link.handshake_timeout, link.max_outstanding,
                          link.interval), (2.0, 3.0, 64, 10))  # fmt: skip
        self.assertEqual((n.interval, n.subscriptions.idle_lifetime, n.max_dial_in),
                         (30, 8.0, 100))  # fmt: skip
        self.assertEqual(n.sweep_interval, 2.0)
        self.assertIsNotNone(n.dial_in_server)
        n.startService()
        self.addCleanup(n.stopService)
        self.assertEqual([p[0] for p in reactor.tcpServers], [7442])
