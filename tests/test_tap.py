"""Tests for lbproxy.tap: twistd options, the service tree, forwarding through it, reload."""

from __future__ import annotations

import errno
import ipaddress
from pathlib import Path

from scapy.layers.inet import UDP
from scapy.layers.inet6 import HAO, IPv6, IPv6ExtHdrDestOpt, IPv6ExtHdrRouting
from twisted.internet.testing import MemoryReactorClock
from twisted.trial.unittest import SynchronousTestCase

from lbproxy.config import ConfigError, load_config
from lbproxy.core import actions
from lbproxy.core.keys import Key
from lbproxy.ops.control import format_stats
from lbproxy.preflight import Refused
from lbproxy.tap import BalancerService, Options
from lbproxy.testing import MemoryPacketSystem
from tests.test_preflight import FakeHost

CONFIG = """
[balancer]
key_chain = ["hoa", "src"]
[virtual]
addresses = ["2001:db8:5::80"]
[interfaces]
client = "lbc"
server = "lbs"
{backends}
"""
BACKEND = '[[backend]]\nname = "{name}"\naddress = "2001:db8:b0::{n}"\n'


def backends(*names: str) -> str:
    return "".join(BACKEND.format(name=name, n=10 + i) for i, name in enumerate(names))


def mobile(hoa: str) -> bytes:
    return bytes(IPv6(src="2001:db8:a1::9", dst="2001:db8:5::80")
                 / IPv6ExtHdrDestOpt(options=[HAO(hoa=hoa)]) / UDP(dport=80) / b"x")


class OptionsTests(SynchronousTestCase):
    def test_bad_config_refuses_to_start(self) -> None:
        """A bad file stops twistd at option parsing with file, key and reason."""
        path = self.mktemp()
        Path(path).write_text(CONFIG.format(backends=backends("a")).replace("lbc", "") +
                              "[balancer2]\n")
        options = Options()
        with self.assertRaises(Refused) as caught:
            options.parseOptions(["--config", path])
        self.assertIn(path, str(caught.exception.code))
        self.assertIn("balancer2", str(caught.exception.code))

    def test_missing_file(self) -> None:
        """A missing file is refused with its name."""
        with self.assertRaises(Refused) as caught:
            Options().parseOptions(["--config", "/nonexistent.toml"])
        self.assertIn("/nonexistent.toml", str(caught.exception.code))


class ServiceTests(SynchronousTestCase):
    def make(
        self, text: str, queue_limit: int = 10_000
    ) -> tuple[BalancerService, MemoryPacketSystem, str]:
        path = self.mktemp()
        Path(path).write_text(text)
        system = MemoryPacketSystem(interfaces=("lbc", "lbs"), queue_limit=queue_limit)
        service = BalancerService(load_config(path), MemoryReactorClock(),
                                  install_sighup=False, system=system, host=FakeHost())
        return service, system, path

    def test_forwards_through_fake_system(self) -> None:
        """The service tree reads the client link and sends the rewritten packet."""
        service, system, _ = self.make(CONFIG.format(backends=backends("a", "b")))
        service.privilegedStartService()
        service.startService()
        self.addCleanup(service.stopService)
        system.inject("lbc", mobile("2001:db8:100::1"))
        service.forwarder.client.doRead()
        self.assertEqual(len(system.sent), 1)
        sent = system.sent[0]
        out = IPv6(sent.packet)
        self.assertEqual(sent.destination, out.dst)
        self.assertEqual(out.src, "2001:db8:100::1")
        self.assertIn(out.dst, ("2001:db8:b0::10", "2001:db8:b0::11"))

    def test_port_counters_in_stats(self) -> None:
        """``stats`` (lbproxyctl, the manhole, metrics) shows what the sockets counted:
        packets read per link, those the kernel's full queue lost, the writer's sent
        and refused packets by errno name."""
        limit = 6
        service, system, _ = self.make(CONFIG.format(backends=backends("a", "b")), limit)
        service.privilegedStartService()
        service.startService()
        self.addCleanup(service.stopService)
        reader = service.forwarder.client
        for i in range(limit + 2):  # two more than the queue holds: the kernel drops them
            system.inject("lbc", mobile(f"2001:db8:100::{i + 1:x}"))
        system.fail("send", errno.ENOBUFS)
        reader.doRead()
        reader.doRead()
        ports = service.control.stats()["ports"]
        self.assertEqual(ports["client"]["received"], limit)
        self.assertEqual(ports["client"]["kernel_drops"], 2)
        self.assertEqual(ports["server"]["received"], 0)
        self.assertEqual(ports["writer"], {"sent": limit - 1, "dropped": 1,
                                           "errors": {"ENOBUFS": 1}})  # fmt: skip
        self.assertEqual(len(system.sent), limit - 1)
        self.assertIn("ports.writer.errors.ENOBUFS 1", str(format_stats(service.control.stats())))
        self.flushLoggedErrors()

    def test_reload_keeps_table(self) -> None:
        """Reload applies a new backend list; bindings to surviving backends stay, and an
        invalid file is refused with the old configuration still in force."""
        service, _, path = self.make(CONFIG.format(backends=backends("a", "b")))
        balancer = service.balancer
        keys = [Key("hoa", ipaddress.IPv6Address(f"2001:db8:100::{i}").packed)
                for i in range(1, 40)]
        for i, key in enumerate(keys):
            actions.move(balancer, key, "a" if i % 2 else "b")
        Path(path).write_text(CONFIG.format(backends=backends("a", "c")))
        report = self.successResultOf(service.reload())
        self.assertEqual(report.applied, ("backend (added c; removed b)",))
        self.assertEqual((report.restart, report.ignored, report.failed), ((), (), ()))
        self.assertEqual(sorted(balancer.backends), ["a", "c"])
        for i, key in enumerate(keys):
            binding = balancer.table.get(key)
            assert binding is not None
            self.assertEqual(binding.backend.name, "a" if i % 2 else "b")
        Path(path).write_text(CONFIG.format(backends=backends("a")).replace("hoa", "mac"))
        self.failureResultOf(service.reload(), ConfigError)
        self.assertEqual(sorted(balancer.backends), ["a", "c"])
        self.assertEqual(service.config.backends[1].name, "c")

    def test_reload_replaces_health_checks(self) -> None:
        """Reload probes the new backend list: a removed backend is no longer checked."""
        checked = CONFIG.format(backends=backends("a", "b")).replace(
            'address = "2001:db8:b0::11"\n', 'address = "2001:db8:b0::11"\nhealth = "tcp"\n'
            'health_port = 80\n')
        service, _, path = self.make(checked)
        assert service.health is not None
        self.assertEqual(sorted(service.health.probes), ["b"])
        service.startService()
        self.addCleanup(service.stopService)
        old = service.health
        Path(path).write_text(CONFIG.format(backends=backends("a")))
        self.successResultOf(service.reload())
        self.assertIsNone(service.health)
        self.assertFalse(old.running)
        Path(path).write_text(checked)
        self.successResultOf(service.reload())
        assert service.health is not None
        self.assertTrue(service.health.running)
        self.assertEqual(sorted(service.health.probes), ["b"])

    def test_reload_reports_restart_needed(self) -> None:
        """Changes that need a restart are named, not silently ignored."""
        service, _, path = self.make(CONFIG.format(backends=backends("a")))
        Path(path).write_text(CONFIG.format(backends=backends("a")).replace("lbs", "eth9"))
        report = self.successResultOf(service.reload())
        self.assertEqual(report.applied, ())
        self.assertEqual(report.restart, ("interfaces.server (a restart would fail: no "
                                          "network interface 'eth9' on this host)",))
        self.assertEqual(service.forwarder.server.interface, "lbs")


class RestartTests(SynchronousTestCase):
    """A restart with persistence keeps what replies use: the confirmed return paths."""

    def test_restart_keeps_confirmed_return_paths(self) -> None:
        """A terminal's care-of address confirmed by a notification (through the real
        TableListener, as the notification client calls it): replies carry a Type 2
        Routing Header to it.  After the service is stopped and a new one started from
        the same configuration and persistence file, replies still do, ``show`` still
        says confirmed, and the confirmation still ends with its lifetime."""
        from lbproxy.notify.adapter import TableListener

        state = Path(self.mktemp())
        state.mkdir()
        text = CONFIG.format(backends=backends("a", "b")) + (
            f'[persistence]\npath = "{state / "table.jsonl"}"\ninterval = 60\n'
        )
        path = self.mktemp()
        Path(path).write_text(text)
        home, old, new = "2001:db8:100::1", "2001:db8:a1::9", "2001:db8:a2::9"

        def start(clock: MemoryReactorClock) -> tuple[BalancerService, MemoryPacketSystem]:
            system = MemoryPacketSystem(interfaces=("lbc", "lbs"))
            service = BalancerService(load_config(path), clock, install_sighup=False,
                                      system=system)  # fmt: skip
            service.privilegedStartService()
            service.startService()
            return service, system

        def reply(service: BalancerService, system: MemoryPacketSystem) -> IPv6:
            backend = service.balancer.backends["a"]  # any backend may reply
            system.inject("lbs", bytes(IPv6(src=str(backend.address), dst=home)
                                       / UDP(sport=80, dport=4000) / b"reply"))  # fmt: skip
            before = len(system.sent)
            service.forwarder.server.doRead()
            self.assertEqual(len(system.sent), before + 1)
            return IPv6(system.sent[-1].packet)

        clock = MemoryReactorClock()
        service, system = start(clock)
        system.inject("lbc", mobile(home))
        service.forwarder.client.doRead()
        listener = TableListener(service.balancer.table, service.balancer.return_paths)
        listener.binding_changed(ipaddress.IPv6Address(home).packed,
                                 ipaddress.IPv6Address(old).packed,
                                 ipaddress.IPv6Address(new).packed, 7, 600)  # fmt: skip
        before = reply(service, system)
        self.assertEqual((before.dst, before[IPv6ExtHdrRouting].addresses), (new, [home]))
        clock.advance(100)
        service.stopService()

        later = MemoryReactorClock()
        later.advance(clock.seconds() + 30)  # down for 30 s
        service, system = start(later)
        self.addCleanup(service.stopService)
        after = reply(service, system)
        self.assertEqual(after.src, "2001:db8:5::80")
        self.assertEqual((after.dst, after[IPv6ExtHdrRouting].addresses), (new, [home]))
        rows = {row.key: row for row in service.control.rows()}
        self.assertTrue(rows[f"addr {home}"].confirmed)
        # 600 s granted at 0; 130 s have passed: it ends 470 s from now, not later.
        later.advance(469)
        service.balancer.sweep()
        self.assertIn(IPv6ExtHdrRouting, reply(service, system))
        later.advance(2)
        service.balancer.sweep()
        home_again = reply(service, system)
        self.assertNotIn(IPv6ExtHdrRouting, home_again)
        self.assertEqual(home_again.dst, home)
