"""Tests for lbproxy.agents.config: the agents' TOML files, errors naming file/key/reason."""

from __future__ import annotations

import tomllib
from pathlib import Path

from twisted.trial.unittest import SynchronousTestCase

from lbproxy.agents.config import load_homeagent, load_terminal, parse_homeagent, parse_terminal
from lbproxy.config import ConfigError

ETC = Path(__file__).resolve().parent.parent / "etc"
COMMON = """
[agent]
balancers = ["lb1.test"]
[tls]
ca = "ca.pem"
certificate = "a.pem"
key = "a.key"
"""


class ConfigTests(SynchronousTestCase):
    """The shipped examples load; mistakes are named precisely."""

    def test_examples_load(self) -> None:
        """etc/homeagent.toml and etc/terminal.toml are valid."""
        ha = load_homeagent(ETC / "homeagent.toml")
        self.assertEqual([str(p) for p in ha.prefixes], ["2001:db8:100::/64"])
        self.assertTrue(ha.require_ack)
        t = load_terminal(ETC / "terminal.toml")
        self.assertEqual(str(t.home), "2001:db8:100::16")
        self.assertEqual(t.common.balancers, ("lb1.example.net",))

    def assertError(self, text: str, key: str, terminal: bool = False) -> ConfigError:
        parse = parse_terminal if terminal else parse_homeagent
        exc = self.assertRaises(ConfigError, parse, tomllib.loads(text), "x.toml")
        self.assertEqual((exc.path, exc.key), ("x.toml", key))
        self.assertTrue(exc.reason)
        return exc

    def test_missing_prefixes(self) -> None:
        """A home-agent agent without prefixes is refused."""
        self.assertError(COMMON + "[homeagent]\n", "homeagent.prefixes")

    def test_bad_prefix(self) -> None:
        """A malformed prefix names the key and the reason."""
        exc = self.assertError(COMMON + '[homeagent]\nprefixes = ["nope"]\n',
                               "homeagent.prefixes")
        self.assertIn("nope", exc.reason)

    def test_unknown_key(self) -> None:
        """Typos are refused, not ignored."""
        self.assertError(COMMON + '[homeagent]\nprefixes = ["2001:db8::/64"]\nrequire_ak = 1\n',
                         "homeagent.require_ak")

    def test_missing_tls(self) -> None:
        """TLS material is required."""
        text = '[agent]\nbalancers = ["b"]\n[homeagent]\nprefixes = ["2001:db8::/64"]\n'
        self.assertError(text, "tls.ca")

    def test_terminal_home_outside_prefix(self) -> None:
        """A home prefix that does not contain the home address is refused."""
        text = COMMON + '[terminal]\nhome = "2001:db8:1::16"\nhome_prefix = "2001:db8:2::/64"\n'
        self.assertError(text, "terminal.home_prefix", terminal=True)

    def test_missing_file(self) -> None:
        """An unreadable file is a ConfigError naming it."""
        exc = self.assertRaises(ConfigError, load_terminal, "/nonexistent/t.toml")
        self.assertEqual(exc.key, "(file)")

    def test_defaults_pass_the_stricter_checks(self) -> None:
        """Optional keys left out keep their "off" defaults: no interface, no command
        socket, no state file, the default listening endpoint."""
        ha = parse_homeagent(tomllib.loads(COMMON + '[homeagent]\nprefixes = ["2001:db8::/64"]\n'))
        self.assertEqual((ha.interface, ha.command_socket), ("", ""))
        self.assertEqual(ha.common.listen, "tcp:7440:interface=\\:\\:")
        t = parse_terminal(tomllib.loads(COMMON + '[terminal]\nhome = "2001:db8:1::16"\n'))
        self.assertEqual((t.interface, t.state_file), ("", ""))
        self.assertEqual(str(t.home_prefix), "2001:db8:1::/64")


class LifecycleKeyTests(SynchronousTestCase):
    """The agents' deadlines and bounds, and a terminal agent that dials its balancers."""

    TERMINAL = '[terminal]\nhome = "2001:db8:1::16"\n'

    def test_deadlines_and_bound(self) -> None:
        """call_timeout, handshake_timeout, max_outstanding: defaults, values, ranges."""
        t = parse_terminal(tomllib.loads(COMMON + self.TERMINAL))
        self.assertEqual((t.common.call_timeout, t.common.handshake_timeout,
                          t.common.max_outstanding), (10.0, 10.0, 512))  # fmt: skip
        text = COMMON.replace('[agent]\n', '[agent]\ncall_timeout = 2\nhandshake_timeout = 3.5\n'
                              'max_outstanding = 8\n')  # fmt: skip
        t = parse_terminal(tomllib.loads(text + self.TERMINAL))
        self.assertEqual((t.common.call_timeout, t.common.handshake_timeout,
                          t.common.max_outstanding), (2.0, 3.5, 8))  # fmt: skip
        for line, key in (("call_timeout = 0", "agent.call_timeout"),
                          ("handshake_timeout = -1", "agent.handshake_timeout"),
                          ("max_outstanding = 0", "agent.max_outstanding"),
                          ('max_outstanding = "8"', "agent.max_outstanding"),
                          ("call_timeout = nan", "agent.call_timeout")):  # fmt: skip
            with self.subTest(line=line):
                ConfigTests.assertError(self, COMMON.replace("[agent]\n", f"[agent]\n{line}\n")  # type: ignore[arg-type]
                                        + self.TERMINAL, key, terminal=True)

    def test_connect(self) -> None:
        """A terminal agent may dial its balancers; then it listens only when told to."""
        text = COMMON.replace("[agent]\n", "[agent]\nconnect = ['tcp:host=2001\\:db8\\:f0"
                              "\\:\\:2:port=7442']\n")  # fmt: skip
        t = parse_terminal(tomllib.loads(text + self.TERMINAL))
        self.assertEqual(t.common.connect, ("tcp:host=2001\\:db8\\:f0\\:\\:2:port=7442",))
        self.assertEqual(t.common.listen, "")
        for line in ("connect = ['nope:x']", "connect = [1]", "connect = 'tcp:host=a:port=1'",
                     "connect = ['tcp:host=a:port=1', 'tcp:host=a:port=1']"):  # fmt: skip
            with self.subTest(line=line):
                ConfigTests.assertError(self, COMMON.replace("[agent]\n", f"[agent]\n{line}\n")  # type: ignore[arg-type]
                                        + self.TERMINAL, "agent.connect", terminal=True)

    def test_home_agent_does_not_dial(self) -> None:
        """A home agent stays a peer the balancer dials: ``connect`` is unknown there."""
        text = COMMON.replace("[agent]\n", "[agent]\nconnect = ['tcp:host=a:port=1']\n")
        ConfigTests.assertError(self, text + '[homeagent]\nprefixes = ["2001:db8::/64"]\n',  # type: ignore[arg-type]
                                "agent.connect")
