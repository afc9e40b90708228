"""Tests for lbproxy.notify.cache: an agent's binding cache under RFC 6275 §9.5.1 rules."""

from __future__ import annotations

import ipaddress

from twisted.trial.unittest import SynchronousTestCase

from lbproxy.notify.cache import BindingCache, CacheChange, CacheFull


def a(text: str) -> bytes:
    return ipaddress.IPv6Address(text).packed


HOME = a("2001:db8:1::16")
COA1 = a("2001:db8:a::16")
COA2 = a("2001:db8:b::16")


class CacheTests(SynchronousTestCase):
    """Updates, refreshes, stale refusals, deletion, expiry, bound."""

    def setUp(self) -> None:
        self.cache = BindingCache(max_entries=2)
        self.seen: list[CacheChange] = []
        self.cache.observers.append(self.seen.append)

    def test_change_notifies(self) -> None:
        """A new binding and a move are changes, told to the observers."""
        self.cache.update(HOME, COA1, 1, 40, 0.0)
        self.cache.update(HOME, COA2, 2, 40, 1.0)
        self.assertEqual(
            self.seen,
            [CacheChange(HOME, None, COA1, 1, 40), CacheChange(HOME, COA1, COA2, 2, 40)],
        )
        b = self.cache.by_care_of(COA2)
        assert b is not None
        self.assertEqual((b.home, b.expires), (HOME, 41.0))
        self.assertIsNone(self.cache.by_care_of(COA1))

    def test_same_update_refreshes(self) -> None:
        """The same BU seen again (e.g. BU then BA) only refreshes the lifetime."""
        self.cache.update(HOME, COA1, 1, 40, 0.0)
        self.assertIsNone(self.cache.update(HOME, COA1, 1, 100, 5.0))
        self.assertEqual(len(self.seen), 1)
        b = self.cache.get(HOME)
        assert b is not None
        self.assertEqual(b.expires, 105.0)

    def test_stale_refused(self) -> None:
        """An older or replayed sequence number with another CoA is refused."""
        self.cache.update(HOME, COA1, 10, 40, 0.0)
        self.assertRaises(ValueError, self.cache.update, HOME, COA2, 9, 40, 1.0)
        self.assertRaises(ValueError, self.cache.update, HOME, COA2, 10, 40, 1.0)
        b = self.cache.get(HOME)
        assert b is not None
        self.assertEqual(b.care_of, COA1)

    def test_deregistration(self) -> None:
        """Lifetime 0 deletes the binding and reports the home address as new CoA."""
        self.cache.update(HOME, COA1, 1, 40, 0.0)
        change = self.cache.update(HOME, HOME, 2, 0, 1.0)
        self.assertEqual(change, CacheChange(HOME, COA1, HOME, 2, 0))
        self.assertIsNone(self.cache.get(HOME))
        self.assertEqual(self.cache.last_seq(HOME), 2)
        self.assertRaises(ValueError, self.cache.update, HOME, COA1, 1, 40, 2.0)

    def test_expire(self) -> None:
        """Bindings past their lifetime go, silently (not a new Binding Update)."""
        self.cache.update(HOME, COA1, 1, 40, 0.0)
        self.assertEqual(self.cache.expire(39.0), [])
        self.assertEqual(len(self.cache.expire(40.0)), 1)
        self.assertEqual(len(self.cache), 0)
        self.assertEqual(len(self.seen), 1)

    def test_bound(self) -> None:
        """A full cache refuses new home addresses but still updates known ones."""
        self.cache.update(a("2001:db8:1::1"), COA1, 1, 40, 0.0)
        self.cache.update(a("2001:db8:1::2"), COA2, 1, 40, 0.0)
        self.assertRaises(CacheFull, self.cache.update, HOME, COA1, 1, 40, 0.0)
        self.cache.update(a("2001:db8:1::2"), a("2001:db8:c::1"), 2, 40, 0.0)
        self.assertEqual(len(self.cache), 2)


class CacheValidationTests(SynchronousTestCase):
    """Sequence numbers and lifetimes are checked before anything changes."""

    def test_refused_before_any_change(self) -> None:
        """A lifetime of 10**400 used to raise OverflowError after the sequence number had
        been recorded; now it, and every value a Binding Update cannot carry, is refused
        with ValueError and the cache is exactly as before."""
        cache = BindingCache()
        seen: list[CacheChange] = []
        cache.observers.append(seen.append)
        cache.update(HOME, COA1, 5, 40, 0.0)
        before = (list(cache), cache.last_seq(HOME), len(seen))
        for seq, lifetime in ((6, 10**400), (6, 262_141), (6, -1), (6, float("nan")), (6, 1.5),
                              (6, True), (65536, 40), (-1, 40), (True, 40), (6.0, 40)):  # fmt: skip
            with self.assertRaises(ValueError):
                cache.update(HOME, COA2, seq, lifetime, 1.0)  # type: ignore[arg-type]
            self.assertEqual((list(cache), cache.last_seq(HOME), len(seen)), before)
        self.assertIsNotNone(cache.update(HOME, COA2, 6, 262_140, 1.0))
