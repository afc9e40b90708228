"""Tests for lbproxy.notify.policy: RFC 6275 §9.5.1 sequence arithmetic, entitlements,
refusal counters."""

from __future__ import annotations

import ipaddress
from typing import cast

from hypothesis import given
from hypothesis import strategies as st
from twisted.trial.unittest import SynchronousTestCase
from zope.interface.verify import verifyObject

from lbproxy.notify.policy import (
    HomeAddressEntitlement,
    IEntitlement,
    PrefixEntitlement,
    Refusal,
    RefusalCounters,
    seq_newer,
)

seqs = st.integers(0, 0xFFFF)


def a(text: str) -> bytes:
    return ipaddress.IPv6Address(text).packed


class SequenceTests(SynchronousTestCase):
    """Modular comparison of 16-bit sequence numbers."""

    def test_examples(self) -> None:
        """Wrap-around: 0 follows 65535; 32768 ahead is not newer; equal is not newer."""
        self.assertTrue(seq_newer(1, 0))
        self.assertTrue(seq_newer(0, 0xFFFF))
        self.assertTrue(seq_newer(5, 0xFFF0))
        self.assertFalse(seq_newer(7, 7))
        self.assertFalse(seq_newer(0xFFFF, 0))
        self.assertFalse(seq_newer(0x8000, 0))
        self.assertTrue(seq_newer(0x7FFF, 0))

    @given(old=seqs, step=st.integers(1, 0x7FFF))
    def test_ahead_is_newer(self, old: int, step: int) -> None:
        """Up to half the space ahead is newer, and then the old one is not newer."""
        new = (old + step) % 0x10000
        self.assertTrue(seq_newer(new, old))
        self.assertFalse(seq_newer(old, new))

    @given(x=seqs)
    def test_replay_refused(self, x: int) -> None:
        """The same number again is never newer."""
        self.assertFalse(seq_newer(x, x))


class EntitlementTests(SynchronousTestCase):
    """Who may speak for which home address."""

    def test_prefix(self) -> None:
        """A home agent speaks for its prefixes only."""
        e = PrefixEntitlement.of(["2001:db8:1::/64", "2001:db8:2::/48"])
        verifyObject(IEntitlement, e)
        self.assertTrue(e.allows(a("2001:db8:1::16")))
        self.assertTrue(e.allows(a("2001:db8:2:ff::1")))
        self.assertFalse(e.allows(a("2001:db8:3::16")))
        self.assertFalse(e.allows(b"short"))

    def test_home(self) -> None:
        """A terminal speaks for its own home address only."""
        e = HomeAddressEntitlement(a("2001:db8:1::16"))
        verifyObject(IEntitlement, e)
        self.assertTrue(e.allows(a("2001:db8:1::16")))
        self.assertFalse(e.allows(a("2001:db8:1::17")))


class CounterTests(SynchronousTestCase):
    """Refusals are counted and logged."""

    def test_refuse_counts_and_logs(self) -> None:
        """refuse() bumps the reason's count and emits a log event naming peer and reason."""
        from twisted.logger import ILogObserver, globalLogPublisher

        events: list[dict[str, object]] = []
        observer = cast(ILogObserver, events.append)
        globalLogPublisher.addObserver(observer)
        self.addCleanup(globalLogPublisher.removeObserver, observer)
        c = RefusalCounters()
        c.refuse(Refusal.STALE, "ha1", "seq 3 after 4")
        c.refuse(Refusal.STALE, "ha1")
        c.refuse(Refusal.NOT_ENTITLED, "ha2")
        self.assertEqual(c[Refusal.STALE], 2)
        self.assertEqual(c[Refusal.NOT_ENTITLED], 1)
        self.assertEqual(c.total(), 3)
        mine = [e for e in events if e.get("peer") == "ha1"]
        self.assertEqual(len(mine), 2)
        self.assertEqual(mine[0]["reason"], "stale")
