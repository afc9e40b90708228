"""The ``quic`` strategy's configuration: ``[quic]`` and ``[[backend]] quic_server_id``.

A good file gives the chain its settings and the balancer routes by them; each bad
value is refused in one line ``file: key: reason``; a reload applies a change of the
settings or of a backend's server ID by rebuilding the chain.
"""

from __future__ import annotations

import ipaddress
import os
from pathlib import Path
from typing import Any

from scapy.layers.inet import UDP
from scapy.layers.inet6 import IPv6
from twisted.internet.task import Clock
from twisted.internet.testing import MemoryReactorClock
from twisted.trial.unittest import SynchronousTestCase

from lbproxy.config import load_config
from lbproxy.core.quiclb import QuicLbSettings, QuicLbStrategy, encode_cid
from lbproxy.ops.reload import ReloadReport
from lbproxy.tap import BalancerService, build_balancer
from lbproxy.testing import MemoryPacketSystem
from lbproxy.tomlconfig import ConfigError
from tests.test_preflight import FakeHost
from tests.test_reload import base, render

BALANCER = """\
[balancer]
key_chain = ["quic", "src"]
[virtual]
addresses = ["2001:db8:5::80"]
[interfaces]
client = "lbc"
server = "lbs"
[quic]
config_rotation = 2
server_id_length = 3
nonce_length = 6
[[backend]]
name = "srv1"
address = "2001:db8:b0::11"
quic_server_id = "0a0b01"
[[backend]]
name = "srv2"
address = "2001:db8:b0::12"
quic_server_id = "0a0b02"
"""


class ConfigTests(SynchronousTestCase):
    def write(self, text: str) -> str:
        path = os.path.abspath(self.mktemp())
        Path(path).write_text(text)
        return path

    def test_good_file(self) -> None:
        """The settings reach the strategy; a packet to srv2's server ID goes to srv2."""
        config = load_config(self.write(BALANCER))
        self.assertEqual(config.quic, QuicLbSettings(
            config_rotation=2, server_id_length=3, nonce_length=6, ports=frozenset({443}),
            server_ids={bytes.fromhex("0a0b01"): "srv1", bytes.fromhex("0a0b02"): "srv2"}))
        self.assertEqual(config.backends[1].quic_server_id, bytes.fromhex("0a0b02"))
        balancer = build_balancer(config, Clock())
        strategy = balancer.chain.strategies[0]
        assert isinstance(strategy, QuicLbStrategy)
        self.assertEqual(strategy.settings, config.quic)
        cid = encode_cid(config.quic, bytes.fromhex("0a0b02"))
        self.assertEqual(cid[0], (2 << 5) | 9)
        packet = bytes(IPv6(src="2001:db8:c1::1", dst="2001:db8:5::80")
                       / UDP(sport=5, dport=443) / (b"\x40" + cid + b"\0" * 20))
        out = balancer.inbound(bytearray(packet))
        assert out is not None
        self.assertEqual(IPv6(bytes(out)).dst, "2001:db8:b0::12")
        self.assertEqual(balancer.counters.hits["quic"], 1)

    def test_defaults_and_other_chains(self) -> None:
        """Without [quic]: port 443, codepoint 0, 2 + 5 octets; server IDs are accepted
        (and unused) with a chain that does not name ``quic``."""
        text = BALANCER.replace('key_chain = ["quic", "src"]', 'key_chain = ["hoa", "src"]')
        text = text[: text.index("[quic]")] + text[text.index("[[backend]]"):]
        text = text.replace("0a0b01", "0a01").replace("0a0b02", "0a02")
        config = load_config(self.write(text))
        self.assertEqual((config.quic.ports, config.quic.config_rotation,
                          config.quic.server_id_length, config.quic.nonce_length),
                         (frozenset({443}), 0, 2, 5))  # fmt: skip
        self.assertEqual(config.key_chain_options(), {})

    def test_refusals(self) -> None:
        """Each bad value: one line naming the file, the key and why."""
        cases: list[tuple[tuple[str, str], str, str]] = [
            (("config_rotation = 2", "config_rotation = 7"), "quic.config_rotation",
             "7 marks unroutable connection IDs in QUIC-LB; use 0 to 6"),
            (("config_rotation = 2", "config_rotation = true"), "quic.config_rotation",
             "expected int, got bool True"),
            (("server_id_length = 3", "server_id_length = 0"), "quic.server_id_length",
             "0 is outside 1..15"),
            (("server_id_length = 3", "server_id_length = 16"), "quic.server_id_length",
             "16 is outside 1..15"),
            (("nonce_length = 6", "nonce_length = 3"), "quic.nonce_length",
             "3 is outside 4..18"),
            (("nonce_length = 6", "nonce_length = 17"), "quic.nonce_length",
             "server_id_length + nonce_length = 20"),
            (("nonce_length = 6", "nonce_length = 6\nports = []"), "quic.ports",
             "at least one UDP port"),
            (("nonce_length = 6", "nonce_length = 6\nports = [true]"), "quic.ports",
             "True is not a port number"),
            (("nonce_length = 6", "nonce_length = 6\nports = [443, 443]"), "quic.ports",
             "443 is listed twice"),
            (("nonce_length = 6", "nonce_length = 6\nsecret = 1"), "quic.secret",
             "unknown key"),
            (('quic_server_id = "0a0b02"', 'quic_server_id = "0a0b0"'),
             "backend[1].quic_server_id", "is not hex digits"),
            (('quic_server_id = "0a0b02"', 'quic_server_id = "xyzxyz"'),
             "backend[1].quic_server_id", "is not hex digits"),
            (('quic_server_id = "0a0b02"', 'quic_server_id = ""'),
             "backend[1].quic_server_id", "is 0 octets"),
            (('quic_server_id = "0a0b02"', 'quic_server_id = 10'),
             "backend[1].quic_server_id", "expected str, got int 10"),
            (('quic_server_id = "0a0b02"', 'quic_server_id = "0a0b"'),
             "backend[1].quic_server_id", "is 2 octets, not quic.server_id_length = 3"),
            (('quic_server_id = "0a0b02"', 'quic_server_id = "0A0B01"'),
             "backend[1].quic_server_id", "also the server ID of backend 'srv1'"),
            (("nonce_length = 6", 'nonce_length = 6\nkey = "secret"'), "quic.key",
             "not hex digits (32 of them: an AES-128 key)"),
            (("nonce_length = 6", 'nonce_length = 6\nkey = "00112233"'), "quic.key",
             "4 octets; an AES-128 key is 16 (32 hex digits)"),
            (("nonce_length = 6", "nonce_length = 6\nkey = 5"), "quic.key",
             "expected str, got int 5"),
        ]
        for (old, new), key, reason in cases:
            text = BALANCER.replace(old, new)
            self.assertNotEqual(text, BALANCER, old)
            path = self.write(text)
            with self.assertRaises(ConfigError) as caught:
                load_config(path)
            message = str(caught.exception)
            self.assertEqual(message.count("\n"), 0)
            self.assertTrue(message.startswith(f"{path}: {key}: "), (new, message))
            self.assertIn(reason, message, new)

    def test_encrypted(self) -> None:
        """``key``: the backends' connection IDs are encrypted; the strategy reads them.
        The key never appears in the settings' text."""
        key = "8f95f09245765f80256934e50c66207f"
        config = load_config(self.write(BALANCER.replace("nonce_length = 6",
                                                         f'nonce_length = 6\nkey = "{key}"')))
        self.assertEqual(config.quic.key, bytes.fromhex(key))
        self.assertNotIn(key[:8], repr(config))
        balancer = build_balancer(config, Clock())
        cid = encode_cid(config.quic, bytes.fromhex("0a0b01"))
        self.assertNotIn(bytes.fromhex("0a0b01"), cid)
        packet = bytes(IPv6(src="2001:db8:c1::1", dst="2001:db8:5::80")
                       / UDP(sport=5, dport=443) / (b"\x40" + cid + b"\0" * 20))
        out = balancer.inbound(bytearray(packet))
        assert out is not None
        self.assertEqual(IPv6(bytes(out)).dst, "2001:db8:b0::11")

    def test_chain_without_server_ids(self) -> None:
        text = BALANCER.replace('quic_server_id = "0a0b01"\n', "").replace(
            'quic_server_id = "0a0b02"\n', "")
        path = self.write(text)
        with self.assertRaises(ConfigError) as caught:
            load_config(path)
        self.assertEqual(str(caught.exception),
                         f"{path}: balancer.key_chain: 'quic' needs a quic_server_id on at "
                         "least one [[backend]] (docs/quic.md)")  # fmt: skip


class ReloadTests(SynchronousTestCase):
    def test_reload_rebuilds_the_chain(self) -> None:
        """A new [quic] setting or server ID is applied by a reload."""
        sections, backends = base()
        sections["balancer"]["key_chain"] = ["quic", "src"]
        backends[0]["quic_server_id"] = "0a01"
        backends[1]["quic_server_id"] = "0a02"
        path = os.path.abspath(self.mktemp())
        Path(path).write_text(render(sections, backends))
        service = BalancerService(load_config(path), MemoryReactorClock(), install_sighup=False,
                                  system=MemoryPacketSystem(interfaces=("lbc", "lbs")),
                                  host=FakeHost())  # fmt: skip
        service.startService()
        self.addCleanup(service.stopService)

        def reload() -> ReloadReport:
            report: ReloadReport = self.successResultOf(service.reload("test"))
            return report

        def settings() -> Any:
            strategy = service.balancer.chain.strategies[0]
            assert isinstance(strategy, QuicLbStrategy)
            return strategy.settings

        sections["quic"] = {"config_rotation": 3}
        Path(path).write_text(render(sections, backends))
        self.assertIn("quic", reload().applied)
        self.assertEqual(settings().config_rotation, 3)
        backends[1]["quic_server_id"] = "0a03"
        Path(path).write_text(render(sections, backends))
        self.assertIn("quic", reload().applied)
        self.assertEqual(dict(settings().server_ids),
                         {bytes.fromhex("0a01"): "a", bytes.fromhex("0a03"): "b"})  # fmt: skip
        self.assertEqual(ipaddress.IPv6Address(service.balancer.backends["b"].address),
                         ipaddress.IPv6Address("2001:db8:b0::11"))  # fmt: skip


class DocumentedTests(SynchronousTestCase):
    def test_every_key_documented(self) -> None:
        """Each ``[quic]`` key and ``quic_server_id`` is in the reference and in the
        commented example; docs/quic.md is linked from the index."""
        root = Path(__file__).resolve().parent.parent
        reference = (root / "docs" / "configuration.md").read_text()
        example = (root / "etc" / "lbproxy.toml").read_text()
        for key in ("ports", "config_rotation", "server_id_length", "nonce_length",
                    "length_self_description", "key"):  # fmt: skip
            self.assertIn(f"`quic.{key}`", reference)
            self.assertIn(f"\n{key} = ", example[example.index("\n[quic]\n"):])
        self.assertIn("`[[backend]] quic_server_id`", reference)
        self.assertIn("quic_server_id = ", example)
        self.assertIn("(quic.md)", (root / "docs" / "index.md").read_text())
