"""Tests for the key strategy and scheduler registries' entry points.

Each test makes a real, separate distribution in a temporary directory -- a module and
a ``*.dist-info`` directory with ``METADATA`` and ``entry_points.txt`` -- and puts it on
``sys.path``, so the strategy or scheduler reaches lbproxy only through its entry point,
as a third-party package would: no file under ``lbproxy/`` names it.  Cleanup takes the
directory off ``sys.path``, forgets the modules, the key kind and what the registries
loaded from entry points.
"""

from __future__ import annotations

import importlib
import os
import sys
import textwrap
from pathlib import Path

from scapy.layers.inet import UDP
from scapy.layers.inet6 import IPv6
from twisted.internet.task import Clock
from twisted.logger import LogEvent, LogLevel, capturedLogs, formatEvent
from twisted.trial.unittest import SynchronousTestCase

from lbproxy.config import ConfigError, load_config
from lbproxy.core import keys, selection
from lbproxy.core.keys import KeyChain, known_strategies
from lbproxy.core.selection import scheduler_names
from lbproxy.tap import build_balancer

VIP = "2001:db8:5::80"
PRIVACY_SRC = "2001:db8:2::8c1e:51a7:d3f0:2b6a"

# The plugin: its own key kind (the 20-bit flow label, as 3 bytes), a strategy, a
# factory declaring an option, and a scheduler.
PLUGIN = '''
"""lbproxy-testkey: a third-party key strategy and scheduler (made by tests)."""

from zope.interface import implementer

from lbproxy.core.keys import IKeyStrategy, Key, StrategyFactory, register_kind
from lbproxy.core.selection import IScheduler

register_kind("testflow", 3)
CALLS = []


@implementer(IKeyStrategy)
class FlowLabelStrategy:
    kind = "testflow"

    def key_for(self, buf, view):
        label = bytes((buf[1] & 0x0F,)) + bytes(buf[2:4])
        return Key("testflow", label) if any(label) else None


def _with_option(any_interface_id=False):
    CALLS.append(any_interface_id)
    return FlowLabelStrategy()


OPTIONED = StrategyFactory(_with_option, options=["any_interface_id"])


@implementer(IScheduler)
class Last:
    def __init__(self):
        self.backends = []

    def set_backends(self, backends):
        self.backends = [b for b in backends if b.weight]

    def choose(self, key, load):
        return self.backends[-1] if self.backends else None
'''

PLUGIN_ENTRY_POINTS = """
[lbproxy.key_strategies]
testflow = lbproxy_testkey:FlowLabelStrategy
testflow-opt = lbproxy_testkey:OPTIONED

[lbproxy.schedulers]
testlast = lbproxy_testkey:Last
"""

BROKEN = '''
"""lbproxy-testbroken: entry points that cannot be used (made by tests)."""

from lbproxy.core.keys import SourceAddressStrategy

NOT_A_FACTORY = 42
Strategy = SourceAddressStrategy
'''

BROKEN_ENTRY_POINTS = """
[lbproxy.key_strategies]
nomodule = lbproxy_testbroken_nonesuch:Strategy
notcallable = lbproxy_testbroken:NOT_A_FACTORY
raises = lbproxy_testraises:Strategy
src = lbproxy_testbroken:Strategy
twice = lbproxy_testbroken:Strategy

[lbproxy.schedulers]
nosched = lbproxy_testbroken:NOT_A_FACTORY
"""

# A second distribution that also declares "twice": ambiguous, so neither is used.
OTHER_ENTRY_POINTS = """
[lbproxy.key_strategies]
twice = lbproxy_testbroken:Strategy
"""

CONFIG = """
[balancer]
key_chain = {chain}
scheduler = "{scheduler}"
any_interface_id = {any_id}
[virtual]
addresses = ["{vip}"]
[interfaces]
client = "lbc"
server = "lbs"
[[backend]]
name = "a"
address = "2001:db8:b0::10"
[[backend]]
name = "b"
address = "2001:db8:b0::11"
"""

BUILT_IN_STRATEGIES = "hoa, iid, spi, ike, src, quic"
BUILT_IN_SCHEDULERS = "round_robin, weighted_round_robin, least_loaded, maglev"


def flow_packet(label: int) -> bytearray:
    return bytearray(bytes(IPv6(src=PRIVACY_SRC, dst=VIP, fl=label) / UDP(dport=80) / b"x"))


def warnings(events: list[LogEvent]) -> list[str]:
    return [formatEvent(e) for e in events if e.get("log_level") == LogLevel.warn]


class EntryPointTestCase(SynchronousTestCase):
    def install(self, distributions: dict[str, str], modules: dict[str, str]) -> None:
        """Put a directory on sys.path holding `modules` (name -> source) and one
        distribution per `distributions` entry (name -> entry_points.txt), and make the
        registries read their entry points again when next asked."""
        where = Path(os.path.abspath(self.mktemp()))
        where.mkdir()
        for name, source in modules.items():
            (where / f"{name}.py").write_text(textwrap.dedent(source))
        for name, entry_points in distributions.items():
            info = where / f"{name}-0.1.dist-info"
            info.mkdir()
            dist = name.replace("_", "-")
            (info / "METADATA").write_text(
                f"Metadata-Version: 2.1\nName: {dist}\nVersion: 0.1\n"
            )
            (info / "entry_points.txt").write_text(entry_points)
        sys.path.insert(0, str(where))
        importlib.invalidate_caches()
        self.addCleanup(self._uninstall, str(where), list(modules))
        self._forget()

    def _uninstall(self, where: str, modules: list[str]) -> None:
        sys.path.remove(where)
        for name in modules:
            sys.modules.pop(name, None)
        keys.unregister_kind("testflow")
        importlib.invalidate_caches()
        self._forget()

    def _forget(self) -> None:
        keys.STRATEGY_REGISTRY.forget_entry_points()
        selection.SCHEDULER_REGISTRY.forget_entry_points()

    def write_config(
        self, chain: str, scheduler: str = "maglev", any_id: str = "false"
    ) -> str:
        path = os.path.abspath(self.mktemp()) + ".toml"
        Path(path).write_text(
            CONFIG.format(chain=chain, scheduler=scheduler, any_id=any_id, vip=VIP)
        )
        return path


class PluginStrategyTests(EntryPointTestCase):
    def setUp(self) -> None:
        self.install({"lbproxy_testkey": PLUGIN_ENTRY_POINTS}, {"lbproxy_testkey": PLUGIN})

    def test_usable_from_configuration(self) -> None:
        """A key strategy registered only through its entry point is named in a
        configuration file, and the balancer built from it keys packets with the plugin's
        own key kind."""
        path = self.write_config('["testflow", "src"]')
        config = load_config(path)
        self.assertEqual(config.key_chain, ("testflow", "src"))
        balancer = build_balancer(config, Clock())
        out = balancer.inbound(flow_packet(0xABCDE))
        self.assertIsNotNone(out)
        [(key, binding)] = list(balancer.table)
        self.assertEqual(key.kind, "testflow")
        self.assertEqual(str(key), "testflow 0abcde")
        self.assertIn(binding.backend.name, {"a", "b"})
        # The flow label, not the source, is the identity: another source, same label.
        other = bytes(IPv6(src="2001:db8:9::1", dst=VIP, fl=0xABCDE) / UDP(dport=80) / b"y")
        balancer.inbound(bytearray(other))
        self.assertEqual(len(list(balancer.table)), 1)

    def test_lazy_and_once(self) -> None:
        """Entry points are read only when the registry is asked for its names or for a
        name it does not know, and only once."""
        KeyChain.from_names(["hoa", "src"])
        self.assertNotIn("lbproxy_testkey", sys.modules)
        self.assertEqual(
            known_strategies(),
            ("hoa", "iid", "spi", "ike", "src", "quic", "testflow", "testflow-opt"),
        )
        module = sys.modules["lbproxy_testkey"]
        self.assertEqual(scheduler_names()[-1], "testlast")
        self.assertIs(sys.modules["lbproxy_testkey"], module)

    def test_options_from_configuration(self) -> None:
        """The configuration's any_interface_id reaches a plugin strategy that declares
        it, with no iid in the chain."""
        path = self.write_config('["testflow-opt", "src"]', any_id="true")
        config = load_config(path)
        self.assertEqual(config.key_chain_options(), {"any_interface_id": True})
        build_balancer(config, Clock())
        calls = sys.modules["lbproxy_testkey"].CALLS
        self.assertEqual(calls[-1], True)
        # A chain of strategies that declare no option gets none.
        plain = load_config(self.write_config('["testflow", "src"]', any_id="true"))
        self.assertEqual(plain.key_chain_options(), {})

    def test_unknown_name(self) -> None:
        """An unknown name is a ConfigError in the file: key: reason form, listing every
        registered strategy, entry points included."""
        path = self.write_config('["flowlabel", "src"]')
        with self.assertRaises(ConfigError) as caught:
            load_config(path)
        self.assertEqual(
            str(caught.exception),
            f"{path}: balancer.key_chain: 'flowlabel' is not a registered key strategy "
            f"(registered: {BUILT_IN_STRATEGIES}, testflow, testflow-opt)",
        )

    def test_scheduler_from_configuration(self) -> None:
        """A scheduler registered only through its entry point is named in a
        configuration file and chooses the balancer's backends."""
        config = load_config(self.write_config('["src"]', scheduler="testlast"))
        balancer = build_balancer(config, Clock())
        balancer.inbound(flow_packet(0))
        [(key, binding)] = list(balancer.table)
        self.assertEqual((key.kind, binding.backend.name), ("addr", "b"))
        path = self.write_config('["src"]', scheduler="fastest")
        with self.assertRaises(ConfigError) as caught:
            load_config(path)
        self.assertEqual(
            str(caught.exception),
            f"{path}: balancer.scheduler: 'fastest' is not a registered scheduler "
            f"(registered: {BUILT_IN_SCHEDULERS}, testlast)",
        )


class BrokenEntryPointTests(EntryPointTestCase):
    def setUp(self) -> None:
        self.install(
            {"lbproxy_testbroken": BROKEN_ENTRY_POINTS, "lbproxy_testother": OTHER_ENTRY_POINTS},
            {"lbproxy_testbroken": BROKEN, "lbproxy_testraises": "raise RuntimeError('boom')\n"},
        )

    def test_skipped_with_one_warning_each(self) -> None:
        """An entry point that cannot be imported, names something unfit, or takes a
        registered name is skipped with one warning naming it and the reason; nothing
        is raised, and the names it claimed are not registered (a built-in keeps its)."""
        with capturedLogs() as events:
            names = known_strategies()
            known_strategies()  # read once: no second round of warnings
        self.assertEqual(names, ("hoa", "iid", "spi", "ike", "src", "quic"))
        logged = warnings(list(events))
        self.assertEqual(len(logged), 6, logged)
        expect = {
            "nomodule": "ModuleNotFoundError",
            "notcallable": "42 is neither a StrategyFactory nor callable",
            "raises": "RuntimeError: boom",
            "src = lbproxy_testbroken:Strategy": "'src' is already registered",
            "twice": "2 entry points of the group are named 'twice'",
        }
        for name, reason in expect.items():
            lines = [w for w in logged if f"'{name}" in w]
            self.assertEqual(len(lines), 2 if name == "twice" else 1, lines)
            for line in lines:
                self.assertIn("lbproxy.key_strategies", line)
                self.assertIn(reason, line)
        self.assertEqual(sum("lbproxy-testother 0.1" in w for w in logged), 1)
        self.assertIsInstance(KeyChain.from_names(["src"]).strategies[0],
                              keys.SourceAddressStrategy)

    def test_refused_like_unknown_names(self) -> None:
        """A configuration naming a skipped entry point gets the ordinary unknown-name
        error, not a traceback."""
        with capturedLogs():
            for name in ("nomodule", "notcallable", "raises", "twice"):
                path = self.write_config(f'["{name}"]')
                with self.assertRaises(ConfigError) as caught:
                    load_config(path)
                self.assertEqual(
                    str(caught.exception),
                    f"{path}: balancer.key_chain: '{name}' is not a registered key strategy "
                    f"(registered: {BUILT_IN_STRATEGIES})",
                )

    def test_broken_scheduler(self) -> None:
        """A scheduler entry point naming something unfit is skipped with a warning and
        its name is refused like an unknown one."""
        with capturedLogs() as events:
            self.assertEqual(
                scheduler_names(),
                ("round_robin", "weighted_round_robin", "least_loaded", "maglev"),
            )
        [line] = warnings(list(events))
        self.assertIn("'nosched = lbproxy_testbroken:NOT_A_FACTORY'", line)
        self.assertIn("lbproxy.schedulers", line)
        self.assertIn("42 is not callable", line)
        path = self.write_config('["src"]', scheduler="nosched")
        with self.assertRaises(ConfigError) as caught:
            load_config(path)
        self.assertEqual(
            str(caught.exception),
            f"{path}: balancer.scheduler: 'nosched' is not a registered scheduler "
            f"(registered: {BUILT_IN_SCHEDULERS})",
        )

