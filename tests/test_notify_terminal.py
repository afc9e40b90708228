"""Tests for lbproxy.agents.terminal: choosing the care-of address, sequence numbers,
netlink address events (in a network namespace), and the agent publishing a move."""

from __future__ import annotations

import ipaddress
import os
import shutil
import subprocess
from typing import Any

from twisted.internet import reactor as _reactor
from twisted.internet.defer import inlineCallbacks
from twisted.internet.task import Clock, deferLater
from twisted.trial.unittest import SynchronousTestCase, TestCase
from zope.interface import implementer

from lbproxy.agents.terminal import (
    IFA_F_TENTATIVE,
    AddressEvents,
    AddressInfo,
    CareOfTracker,
    IAddressSource,
    SequenceStore,
    WatchService,
    choose_care_of,
)
from lbproxy.notify.cache import BindingCache, CacheChange

reactor: Any = _reactor


def a(text: str) -> bytes:
    return ipaddress.IPv6Address(text).packed


HOME = a("2001:db8:1::16")
PREFIX = ipaddress.IPv6Network("2001:db8:1::/64")
COA1, COA2 = a("2001:db8:a::16"), a("2001:db8:b::16")


class ChooseTests(SynchronousTestCase):
    """choose_care_of picks a usable global address outside the home prefix."""

    def test_away(self) -> None:
        """A global address outside the home prefix is the CoA; link-local is not."""
        addrs = [AddressInfo("wlan0", a("fe80::1"), scope=253), AddressInfo("wlan0", COA1)]
        self.assertEqual(choose_care_of(addrs, HOME, PREFIX), COA1)

    def test_at_home(self) -> None:
        """Only home-prefix addresses: the home address (at home)."""
        self.assertEqual(choose_care_of([AddressInfo("eth0", HOME)], HOME, PREFIX), HOME)

    def test_tentative_skipped(self) -> None:
        """A tentative address (DAD running) is not announced."""
        addrs = [AddressInfo("wlan0", COA1, flags=IFA_F_TENTATIVE)]
        self.assertIsNone(choose_care_of(addrs, HOME, PREFIX))

    def test_interface_filter(self) -> None:
        """With an interface configured, other interfaces' addresses are ignored."""
        addrs = [AddressInfo("eth0", COA1), AddressInfo("wlan0", COA2)]
        self.assertEqual(choose_care_of(addrs, HOME, PREFIX, "wlan0"), COA2)


class TrackerTests(SynchronousTestCase):
    """Moves become bindings with increasing sequence numbers, persisted."""

    def setUp(self) -> None:
        self.clock = Clock()
        self.cache = BindingCache(1)
        self.seen: list[CacheChange] = []
        self.cache.observers.append(self.seen.append)
        self.path = self.mktemp()
        with open(self.path, "w") as f:
            f.write("65534\n")
        self.tracker = CareOfTracker(
            self.cache, HOME, PREFIX, 40, self.clock, SequenceStore(self.path)
        )

    def test_moves(self) -> None:
        """CoA1 -> CoA2 -> home: three changes, seq wraps 65535 -> 0 -> 1, saved."""
        self.tracker.addresses_changed([AddressInfo("w", COA1)])
        self.tracker.addresses_changed([AddressInfo("w", COA1)])  # no move: refresh only
        self.tracker.addresses_changed([AddressInfo("w", COA2)])
        self.tracker.addresses_changed([AddressInfo("e", HOME)])
        self.assertEqual(
            [(c.old_care_of, c.new_care_of, c.seq, c.lifetime) for c in self.seen],
            [(None, COA1, 65535, 40), (COA1, COA2, 0, 40), (COA2, HOME, 1, 0)],
        )
        with open(self.path) as f:
            self.assertEqual(f.read().strip(), "1")

    def test_restart_continues_sequence(self) -> None:
        """A restarted tracker continues from the stored number (no replay)."""
        self.tracker.addresses_changed([AddressInfo("w", COA1)])
        again = CareOfTracker(BindingCache(1), HOME, PREFIX, 40, self.clock,
                              SequenceStore(self.path))
        again.addresses_changed([AddressInfo("w", COA2)])
        self.assertEqual(again.seq, 0)

    def test_no_address_keeps_binding(self) -> None:
        """Losing every address changes nothing (no connectivity is not a move)."""
        self.tracker.addresses_changed([AddressInfo("w", COA1)])
        self.assertIsNone(self.tracker.addresses_changed([]))
        self.assertEqual(len(self.seen), 1)


@implementer(IAddressSource)
class FakeSource:
    """Addresses set by the test."""

    def __init__(self) -> None:
        self.current: list[AddressInfo] = []

    def addresses(self) -> list[AddressInfo]:
        return list(self.current)


class WatchTests(SynchronousTestCase):
    """The watch service polls the source periodically."""

    def test_poll(self) -> None:
        """A move is picked up by the periodic poll; stopping leaves no timers."""
        clock = Clock()
        cache = BindingCache(1)
        tracker = CareOfTracker(cache, HOME, PREFIX, 40, clock, SequenceStore())
        source = FakeSource()
        watch = WatchService(tracker, source, clock, poll_interval=5.0, events=False)
        watch.startService()
        source.current = [AddressInfo("w", COA1)]
        clock.advance(5.0)
        binding = cache.get(HOME)
        assert binding is not None
        self.assertEqual(binding.care_of, COA1)
        watch.stopService()
        self.assertEqual(clock.getDelayedCalls(), [])


class NetlinkTests(TestCase):
    """A real netlink event from a network namespace wakes the watcher."""

    timeout = 10

    @inlineCallbacks
    def test_address_event(self) -> Any:
        """Adding an address in the namespace triggers the callback."""
        if os.geteuid() != 0 or shutil.which("ip") is None:
            raise self.skipTest("needs root and iproute2")
        from lbproxy.io.rawsocket import _network_namespace

        ns = f"lbnt{os.getpid()}t"
        subprocess.run(["ip", "netns", "add", ns], check=True)
        self.addCleanup(subprocess.run, ["ip", "netns", "del", ns], check=False)
        subprocess.run(
            ["ip", "-n", ns, "link", "add", "lbntd", "type", "veth", "peer", "name", "lbnte"],
            check=True,
        )
        subprocess.run(["ip", "-n", ns, "link", "set", "lbntd", "up"], check=True)
        calls: list[int] = []
        events = AddressEvents(reactor, lambda: calls.append(1))
        with _network_namespace(ns):
            events.start()
        self.addCleanup(events.stop)
        subprocess.run(
            ["ip", "-n", ns, "addr", "add", "2001:db8:a::16/64", "dev", "lbntd", "nodad"],
            check=True,
        )
        for _ in range(200):
            if calls:
                break
            yield deferLater(reactor, 0.01, lambda: None)
        self.assertTrue(calls)


class ReRegistrationTests(SynchronousTestCase):
    """The terminal registers again before its binding's lifetime runs out."""

    def test_reregisters_at_half_lifetime(self) -> None:
        """Lifetime 40 s: a re-registration from the same care-of address every 20 s, each
        with the next sequence number, each told to the observers (the agent's sessions);
        a move plans from the move; at home, none; stop() leaves no timer."""
        clock = Clock()
        cache = BindingCache(1)
        seen: list[CacheChange] = []
        cache.observers.append(seen.append)
        tracker = CareOfTracker(cache, HOME, PREFIX, 40, clock, SequenceStore())
        tracker.addresses_changed([AddressInfo("w", COA1)])
        first = tracker.seq
        clock.advance(20)
        clock.advance(20)
        self.assertEqual([(c.old_care_of, c.new_care_of, c.seq) for c in seen],
                         [(None, COA1, first), (COA1, COA1, (first + 1) & 0xFFFF),
                          (COA1, COA1, (first + 2) & 0xFFFF)])  # fmt: skip
        self.assertTrue(all(c.refresh for c in seen[1:]))
        binding = cache.get(HOME)
        assert binding is not None
        self.assertEqual(binding.expires, clock.seconds() + 40)
        clock.advance(5)
        tracker.addresses_changed([AddressInfo("w", COA2)])
        clock.advance(19)
        self.assertEqual(len(seen), 4)
        clock.advance(1)
        self.assertEqual((seen[-1].old_care_of, seen[-1].new_care_of), (COA2, COA2))
        tracker.addresses_changed([AddressInfo("e", HOME)])
        self.assertEqual(clock.getDelayedCalls(), [])
        tracker.addresses_changed([AddressInfo("w", COA1)])
        tracker.stop()
        self.assertEqual(clock.getDelayedCalls(), [])
