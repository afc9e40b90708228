"""Tests for lbproxy.config: the example file loads, and every mistake names file, key, reason."""

from __future__ import annotations

import ipaddress
from pathlib import Path

from twisted.trial.unittest import SynchronousTestCase

from lbproxy.config import ConfigError, load_config, parse_config
from lbproxy.core.keys import (
    STRATEGY_REGISTRY,
    IKeyStrategy,
    SourceAddressStrategy,
    register_strategy,
)

EXAMPLE = Path(__file__).resolve().parent.parent / "etc" / "lbproxy.toml"

MINIMAL = """
[virtual]
addresses = ["2001:db8:5::80"]
[interfaces]
client = "eth0"
server = "eth1"
[[backend]]
name = "a"
address = "2001:db8:b0::11"
"""


class ExampleTests(SynchronousTestCase):
    def test_example_loads(self) -> None:
        """The shipped, commented example is a valid configuration."""
        config = load_config(EXAMPLE)
        self.assertEqual([b.name for b in config.backends], ["srv1", "srv2", "srv3"])
        self.assertEqual(config.virtual_addresses, (ipaddress.IPv6Address("2001:db8:5::80"),))
        self.assertEqual(config.key_chain, ("hoa", "iid", "spi", "ike", "src"))

    def test_defaults(self) -> None:
        """A minimal file gets the documented defaults."""
        config = parse_config(MINIMAL, "min.toml")
        self.assertEqual(config.mode, "translate")
        self.assertEqual(config.scheduler, "maglev")
        self.assertEqual(config.lifetime, 300.0)
        self.assertEqual(config.backends[0].weight, 1)
        self.assertFalse(config.notify.enabled)
        self.assertTrue(config.link_send)
        off = parse_config(MINIMAL + "[balancer]\nlink_send = false\n", "min.toml")
        self.assertFalse(off.link_send)


class ErrorTests(SynchronousTestCase):
    def assertRefused(self, text: str, key: str, reason_part: str) -> None:
        with self.assertRaises(ConfigError) as caught:
            parse_config(text, "bad.toml")
        e = caught.exception
        self.assertEqual((e.path, e.key), ("bad.toml", key), str(e))
        self.assertIn(reason_part, e.reason)
        self.assertTrue(str(e).startswith(f"bad.toml: {key}: "))

    def test_syntax(self) -> None:
        """A TOML syntax error is reported against the file."""
        self.assertRefused("[virtual\n", "(syntax)", "line 1")

    def test_bad_address(self) -> None:
        """A malformed backend address names the backend's index and key."""
        self.assertRefused(MINIMAL.replace("2001:db8:b0::11", "2001:db8::zz"),
                           "backend[0].address", "2001:db8::zz")

    def test_unknown_key(self) -> None:
        """A misspelt key is refused rather than silently ignored."""
        self.assertRefused(MINIMAL + "[balancer]\nlifetmie = 3\n", "balancer.lifetmie", "unknown")

    def test_wrong_type(self) -> None:
        """A value of the wrong type says what was expected."""
        self.assertRefused(MINIMAL + "[balancer]\nlifetime = 'long'\n", "balancer.lifetime",
                           "expected float")

    def test_out_of_range(self) -> None:
        """Numbers outside their range are refused."""
        self.assertRefused(MINIMAL + "[balancer]\nlifetime = 0\n", "balancer.lifetime", "outside")

    def test_bad_choice(self) -> None:
        """An unknown mode lists the valid ones."""
        self.assertRefused(MINIMAL + "[balancer]\nmode = 'dsr'\n", "balancer.mode", "translate")

    def test_bad_key_kind(self) -> None:
        """An unknown key strategy is named, with the registered ones."""
        self.assertRefused(MINIMAL + "[balancer]\nkey_chain = ['hoa', 'mac']\n",
                           "balancer.key_chain",
                           "'mac' is not a registered key strategy "
                           "(registered: hoa, iid, spi, ike, src")
        self.assertRefused(MINIMAL + "[balancer]\nkey_chain = ['hoa', 3]\n",
                           "balancer.key_chain", "expected a list of strategy names, got 3")
        self.assertRefused(MINIMAL + "[balancer]\nkey_chain = ['src', 'src']\n",
                           "balancer.key_chain", "at most once")
        self.assertRefused(MINIMAL + "[balancer]\nkey_chain = []\n",
                           "balancer.key_chain", "at least one")

    def test_bad_scheduler(self) -> None:
        """An unknown scheduler is named, with the registered ones."""
        self.assertRefused(
            MINIMAL + "[balancer]\nscheduler = 'fastest'\n", "balancer.scheduler",
            "'fastest' is not a registered scheduler (registered: round_robin, "
            "weighted_round_robin, least_loaded, maglev",
        )

    def test_registered_strategy(self) -> None:
        """A strategy registered in code is a valid name; options reach the chain only
        when a named strategy declares them; a strategy that cannot be built is a
        ConfigError, not a traceback."""

        def failing(any_interface_id: bool = False) -> IKeyStrategy:
            raise RuntimeError("needs a kernel module")

        register_strategy("cfg-test", failing, options=["any_interface_id"])
        self.addCleanup(STRATEGY_REGISTRY.unregister, "cfg-test")
        self.assertRefused(MINIMAL + "[balancer]\nkey_chain = ['cfg-test', 'src']\n",
                           "balancer.key_chain", "RuntimeError: needs a kernel module")
        STRATEGY_REGISTRY.unregister("cfg-test")
        register_strategy("cfg-test", SourceAddressStrategy)
        config = parse_config(
            MINIMAL + "[balancer]\nkey_chain = ['cfg-test']\nany_interface_id = true\n"
        )
        self.assertEqual(config.key_chain, ("cfg-test",))
        self.assertEqual(config.key_chain_options(), {})
        iid = parse_config(
            MINIMAL + "[balancer]\nkey_chain = ['iid', 'src']\nany_interface_id = true\n"
        )
        self.assertEqual(iid.key_chain_options(), {"any_interface_id": True})

    def test_missing_required(self) -> None:
        """Required keys are named when missing."""
        self.assertRefused(MINIMAL.replace('client = "eth0"\n', ""), "interfaces.client",
                           "missing")

    def test_no_backends(self) -> None:
        """A balancer with nothing to balance to is refused."""
        text = MINIMAL.split("[[backend]]")[0]
        self.assertRefused(text, "backend", "at least one")

    def test_duplicate_backend(self) -> None:
        """Backend names are unique (operators address backends by name)."""
        self.assertRefused(MINIMAL + MINIMAL.split("\n[[backend]]")[1].join(["\n[[backend]]", ""]),
                           "backend", "used twice")

    def test_notify_requires_tls(self) -> None:
        """Notifications cannot be enabled without TLS material."""
        self.assertRefused(MINIMAL + "[notify]\nenabled = true\n", "notify.ca", "required")

    def test_homeagent_peer_needs_prefixes(self) -> None:
        """A home agent peer must be limited to home prefixes."""
        text = MINIMAL + (
            "[[notify.peer]]\nname='ha'\nendpoint='tcp:host=::1:port=1'\nidentity='ha'\n"
        )
        self.assertRefused(text, "notify.peer[0].prefixes", "home prefix")

    def test_missing_file(self) -> None:
        """An unreadable file is a ConfigError naming the file."""
        with self.assertRaises(ConfigError) as caught:
            load_config("/nonexistent/lbproxy.toml")
        self.assertIn("/nonexistent/lbproxy.toml", str(caught.exception))


class AcceptedTests(SynchronousTestCase):
    """What the stricter checks must still accept."""

    def test_sensible_variants_load(self) -> None:
        """One drained backend among live ones, a checked backend with its port, a
        relative persistence path, an absolute control socket, a manhole, ports."""
        text = (
            MINIMAL.replace('address = "2001:db8:b0::11"\n',
                            'address = "2001:db8:b0::11"\nweight = 0\n')
            .replace('addresses = ["2001:db8:5::80"]',
                     'addresses = ["2001:db8:5::80"]\nports = [80, 443]')
            + '[[backend]]\nname = "b"\naddress = "2001:db8:b0::12"\nhealth = "http"\n'
            'health_port = 8080\nhealth_path = "/healthz?full=1"\n'
            '[control]\nsocket = "/run/lbproxy/control.sock"\n'
            '[persistence]\npath = "state/table.jsonl"\n'
            '[manhole]\nendpoint = "tcp6:2222:interface=\\\\:\\\\:1"\n'
            'authorized_keys = "keys"\nhost_key = "host_key"\n'
        )
        config = parse_config(text)
        self.assertEqual([b.weight for b in config.backends], [0, 1])
        self.assertEqual(config.ports, (80, 443))
        self.assertEqual(config.persistence_path, "state/table.jsonl")
        self.assertEqual(config.manhole_endpoint, "tcp6:2222:interface=\\:\\:1")

    def test_max_bytes_default_follows_max_entries(self) -> None:
        """Default cap: a full table of max_entries fits (and never less than the
        default's); an explicit larger cap is kept."""
        from lbproxy.ops.persistence import DEFAULT_MAX_BYTES, max_bytes_for

        self.assertEqual(parse_config(MINIMAL).persistence_max_bytes, DEFAULT_MAX_BYTES)
        big = parse_config(MINIMAL + "[balancer]\nmax_entries = 2000000\n")
        self.assertEqual(big.persistence_max_bytes, max_bytes_for(2_000_000))
        small = parse_config(MINIMAL + "[balancer]\nmax_entries = 1000\n")
        self.assertEqual(small.persistence_max_bytes, DEFAULT_MAX_BYTES)
        raised = parse_config(MINIMAL + "[persistence]\nmax_bytes = 1000000000\n")
        self.assertEqual(raised.persistence_max_bytes, 1_000_000_000)

    def test_brackets_and_dots_in_strings_and_comments(self) -> None:
        """The guard against hostile nesting counts only what the parser nests: brackets
        and dots in strings and comments are text."""
        text = MINIMAL.replace(
            'name = "a"',
            'name = "a" # ' + "[{." * 100 + '\nhealth_path = "/' + "[." * 100 + '"',
        ) + "[balancer]\nmode = '''\n" + "]]." * 100 + "'''\n"
        with self.assertRaises(ConfigError) as caught:  # mode is checked, the shape passed
            parse_config(text, "x.toml")
        self.assertEqual(caught.exception.key, "balancer.mode")
        config = parse_config(text.split("[balancer]")[0])
        self.assertEqual(config.backends[0].health_path, "/" + "[." * 100)

    def test_reasons_are_one_line(self) -> None:
        """Control characters in what is quoted back are escaped: one line, always."""
        with self.assertRaises(ConfigError) as caught:
            parse_config(MINIMAL + '[balancer]\nmode = "a\\nb"\n', "x.toml")
        self.assertEqual(str(caught.exception),
                         "x.toml: balancer.mode: 'a\\nb' is not one of translate, transparent")
        error = ConfigError("f\n.toml", "k\r", "two\nlines")
        self.assertEqual(str(error), "f\\n.toml: k\\r: two\\nlines")
