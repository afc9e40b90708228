"""Tests for lbproxy.agents.observer: bindings learnt from BU/BA frames seen on the link.

Frames are built with scapy (tests only) as a mobile node and a home agent send them.
"""

from __future__ import annotations

import ipaddress

from scapy.layers.inet6 import (
    HAO,
    MIP6MH_BA,
    MIP6MH_BU,
    UDP,
    IPv6,
    IPv6ExtHdrDestOpt,
    IPv6ExtHdrRouting,
    MIP6OptAltCoA,
)
from scapy.layers.l2 import Ether
from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase

from lbproxy.agents.observer import LinkObserver
from lbproxy.notify.cache import BindingCache
from lbproxy.notify.policy import PrefixEntitlement

HOME, HA, COA1, COA2 = "2001:db8:1::16", "2001:db8:1::1", "2001:db8:a::16", "2001:db8:b::16"


def p(text: str) -> bytes:
    return ipaddress.IPv6Address(text).packed


def bu(seq: int, coa: str = COA1, home: str = HOME, lifetime: int = 10, flags: str = "KHA",
       alt: str | None = None) -> bytes:
    options = [MIP6OptAltCoA(acoa=alt)] if alt else []
    return bytes(
        Ether(dst="02:00:00:00:00:01", src="02:00:00:00:00:02")
        / IPv6(src=coa, dst=HA)
        / IPv6ExtHdrDestOpt(options=[HAO(hoa=home)])
        / MIP6MH_BU(seq=seq, mhtime=lifetime, flags=flags, options=options)
    )


def ba(seq: int, coa: str = COA1, home: str = HOME, status: int = 0, lifetime: int = 10) -> bytes:
    return bytes(
        Ether(dst="02:00:00:00:00:02", src="02:00:00:00:00:01")
        / IPv6(src=HA, dst=coa)
        / IPv6ExtHdrRouting(type=2, segleft=1, addresses=[home])
        / MIP6MH_BA(status=status, seq=seq, mhtime=lifetime)
    )


class ObserverTests(SynchronousTestCase):
    """BU + accepting BA = binding; everything else is counted and ignored."""

    def setUp(self) -> None:
        self.clock = Clock()
        self.cache = BindingCache()
        self.obs = LinkObserver(
            self.cache, PrefixEntitlement.of(["2001:db8:1::/64"]), self.clock
        )

    def test_bu_then_ba(self) -> None:
        """The binding appears only when the BA accepts, with the granted lifetime."""
        self.assertEqual(self.obs.frame(bu(7)), "bu")
        self.assertIsNone(self.cache.get(p(HOME)))
        self.assertEqual(self.obs.frame(ba(7, lifetime=5)), "ba_applied")
        b = self.cache.get(p(HOME))
        assert b is not None
        self.assertEqual((b.care_of, b.seq, b.lifetime), (p(COA1), 7, 20))

    def test_move(self) -> None:
        """A second BU/BA pair from another CoA moves the binding."""
        for frame in (bu(7), ba(7), bu(8, COA2), ba(8, COA2)):
            self.obs.frame(frame)
        b = self.cache.get(p(HOME))
        assert b is not None
        self.assertEqual((b.care_of, b.seq), (p(COA2), 8))

    def test_alternate_care_of(self) -> None:
        """The Alternate Care-of Address option wins over the source address."""
        self.obs.frame(bu(3, alt=COA2))
        self.obs.frame(ba(3))
        b = self.cache.get(p(HOME))
        assert b is not None
        self.assertEqual(b.care_of, p(COA2))

    def test_rejected_and_unmatched(self) -> None:
        """A rejecting BA (status >= 128) or one with another sequence number binds nothing."""
        self.obs.frame(bu(7))
        self.assertEqual(self.obs.frame(ba(7, status=129)), "ba_rejected")
        self.assertEqual(self.obs.frame(ba(9)), "ba_unmatched")
        self.assertEqual(len(self.cache), 0)

    def test_late_ack(self) -> None:
        """A BA after the timeout does not bind (the BU is forgotten)."""
        self.obs.frame(bu(7))
        self.clock.advance(10)
        self.assertIn(self.obs.frame(ba(7)), ("ba_late", "ba_unmatched"))
        self.assertEqual(len(self.cache), 0)

    def test_outside_prefix(self) -> None:
        """A BU for a home address outside this agent's prefixes is ignored."""
        self.assertEqual(self.obs.frame(bu(1, home="2001:db8:99::16")), "not_entitled")

    def test_corrupt_checksum(self) -> None:
        """A BU whose MH checksum is wrong is malformed, not believed."""
        frame = bytearray(bu(1))
        frame[-1] ^= 0xFF
        self.assertEqual(self.obs.frame(bytes(frame)), "malformed")

    def test_no_ack_requested(self) -> None:
        """A BU that asks for no acknowledgement is believed on its own."""
        self.assertEqual(self.obs.frame(bu(4, flags="KH")), "bu_applied")
        self.assertIsNotNone(self.cache.get(p(HOME)))

    def test_stale_bu(self) -> None:
        """An older sequence number after a binding is counted stale."""
        self.obs.frame(bu(8, flags="KH"))
        self.assertEqual(self.obs.frame(bu(7, COA2, flags="KH")), "stale")

    def test_other_traffic(self) -> None:
        """Ordinary UDP and non-IPv6 frames are ignored cheaply."""
        udp = bytes(Ether(dst="02:00:00:00:00:01") / IPv6(src=COA1, dst=HA) / UDP(sport=1, dport=2))
        self.assertEqual(self.obs.frame(udp), "ignored")
        self.assertEqual(self.obs.frame(b"\x00" * 60), "ignored")
