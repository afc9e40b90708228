"""Tests for lbproxy.notify.subscriptions: bounded, deduplicated, expiring registry."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st
from twisted.trial.unittest import SynchronousTestCase

from lbproxy.notify.subscriptions import Subscriptions


def addr(n: int) -> bytes:
    return b"\x20\x01\x0d\xb8" + n.to_bytes(12, "big")


class SubscriptionsTests(SynchronousTestCase):
    """Registry behaviour."""

    def test_add_dedupes(self) -> None:
        """Subscribing twice to the same (peer, address) returns the same subscription."""
        subs = Subscriptions(10)
        first = subs.add("ha1", addr(1), "hoa", 0.0)
        self.assertIs(subs.add("ha1", addr(1), "hoa", 1.0), first)
        self.assertIsNot(subs.add("ha2", addr(1), "hoa", 1.0), first)
        self.assertEqual(len(subs), 2)
        assert first is not None
        self.assertEqual(first.home, addr(1))
        self.assertIs(subs.by_home("ha1", addr(1)), first)

    def test_bound(self) -> None:
        """A flood of forged addresses stays within max_entries: it pushes out only
        probationary subscriptions (no binding reported), oldest first, each handed to
        ``evicted``; those an agent reported a binding for stay; newcomers keep being
        admitted.  With every subscription established, a new one is refused."""
        subs = Subscriptions(100)
        gone: list[bytes] = []
        subs.evicted = lambda sub: gone.append(sub.address)
        kept = subs.add("ha1", addr(0), "coa", 0.0)
        assert kept is not None
        kept.seq = 1  # an agent reported its binding: established
        results = [subs.add("ha1", addr(i), "coa", 0.0) for i in range(1, 10_000)]
        self.assertEqual(len(subs), 100)
        self.assertTrue(all(r is not None for r in results))  # nobody locked out
        self.assertIs(subs.get("ha1", addr(0)), kept)
        self.assertEqual(gone, [addr(i) for i in range(1, 10_000 - 99)])  # oldest first
        self.assertEqual(subs.evictions, len(gone))
        for sub in subs:
            sub.seq = 1
        self.assertIsNone(subs.add("ha1", addr(20_000), "coa", 0.0))

    def test_set_home_merges(self) -> None:
        """A care-of subscription resolving to an already followed home is merged away."""
        subs = Subscriptions(10)
        by_home = subs.add("ha1", addr(1), "hoa", 0.0)
        by_coa = subs.add("ha1", addr(9), "coa", 0.0)
        assert by_coa is not None
        self.assertIs(subs.set_home(by_coa, addr(1)), by_home)
        self.assertIsNone(subs.get("ha1", addr(9)))
        self.assertEqual(len(subs), 1)

    def test_expire_and_refresh(self) -> None:
        """Idle subscriptions expire; a refresh covering a lifetime keeps one alive."""
        subs = Subscriptions(10, idle_lifetime=10.0)
        a = subs.add("ha1", addr(1), "hoa", 0.0)
        b = subs.add("ha1", addr(2), "hoa", 0.0)
        assert a is not None and b is not None
        subs.refresh(b, 5.0, lifetime=100.0)
        self.assertEqual(subs.expire(9.0), [])
        self.assertEqual(subs.expire(10.0), [a])
        self.assertEqual(list(subs), [b])
        self.assertEqual(subs.expire(104.0), [])
        self.assertEqual(subs.expire(105.0), [b])
        self.assertEqual(len(subs), 0)
        self.assertIsNone(subs.by_home("ha1", addr(2)))

    def test_for_peer(self) -> None:
        """for_peer lists exactly one peer's subscriptions."""
        subs = Subscriptions(10)
        subs.add("ha1", addr(1), "hoa", 0.0)
        subs.add("ha2", addr(2), "hoa", 0.0)
        subs.add("ha1", addr(3), "coa", 0.0)
        self.assertEqual(sorted(s.address for s in subs.for_peer("ha1")), [addr(1), addr(3)])

    def test_rejects_bad_input(self) -> None:
        """Unknown kinds and wrong-length addresses are programming errors."""
        subs = Subscriptions(10)
        self.assertRaises(ValueError, subs.add, "ha1", b"x", "hoa", 0.0)
        self.assertRaises(ValueError, subs.add, "ha1", addr(1), "iid", 0.0)

    @given(ops=st.lists(st.tuples(st.integers(0, 30), st.floats(0, 50), st.booleans()),
                        max_size=200))
    def test_bounded_and_consistent(self, ops: list[tuple[int, float, bool]]) -> None:
        """Under any mix of adds, refreshes and sweeps, size <= bound and the indexes agree."""
        subs = Subscriptions(8, idle_lifetime=5.0)
        now = 0.0
        for n, dt, refresh in ops:
            now += dt
            sub = subs.add("p", addr(n), "hoa" if n % 2 else "coa", now)
            if sub is not None and refresh:
                subs.refresh(sub, now, lifetime=dt)
            subs.expire(now)
            self.assertLessEqual(len(subs), 8)
            for s in subs:
                self.assertIs(subs.get(s.peer, s.address), s)
                if s.home is not None:
                    self.assertIs(subs.by_home(s.peer, s.home), s)
                self.assertGreater(s.expires, now)
