"""Tests for lbproxy.core.table: lifetimes, expiry cost, rekey (T231-T235), the bound."""

from __future__ import annotations

import collections
import dataclasses
import ipaddress

from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    invariant,
    rule,
    run_state_machine_as_test,
)
from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase

from lbproxy.core.keys import Key
from lbproxy.core.selection import Backend
from lbproxy.core.table import _PROBATION, Binding, StickyTable

LIFETIME = 30.0
A = Backend("a", ipaddress.IPv6Address("2001:db8:ffff::a"))
B = Backend("b", ipaddress.IPv6Address("2001:db8:ffff::b"))
C = Backend("c", ipaddress.IPv6Address("2001:db8:ffff::c"))


def src(i: int) -> Key:
    """The source-address key of care-of address number i."""
    return Key("src", (0x2001_0DB8_0002 << 80 | i).to_bytes(16, "big"))


def hoa(i: int) -> Key:
    return Key("hoa", (0x2001_0DB8_0001 << 80 | i).to_bytes(16, "big"))


class TableTestCase(SynchronousTestCase):
    def setUp(self) -> None:
        self.clock = Clock()
        self.table = StickyTable(self.clock, LIFETIME, max_entries=1000)

    def tearDown(self) -> None:
        # The table is pure: it never schedules anything.
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def established(self, key: Key, backend: Backend = A) -> None:
        """Insert `key` and give it its second packet."""
        self.assertIsNotNone(self.table.insert(key, backend))
        self.assertIsNotNone(self.table.lookup(key))


class LifetimeTests(TableTestCase):
    def test_hit_and_miss(self) -> None:
        """A known key is a hit (counted, packet counted), an unknown one a miss."""
        self.assertIsNone(self.table.lookup(src(1)))
        binding = self.table.insert(src(1), A)
        assert binding is not None
        self.assertIs(self.table.lookup(src(1)), binding)
        self.assertEqual((binding.backend, binding.packets), (A, 2))
        self.assertEqual((self.table.stats.hits, self.table.stats.misses), (1, 1))

    def test_entry_expires_after_lifetime(self) -> None:
        """An entry nothing uses is invalid once its lifetime has passed (claim 10)."""
        self.table.insert(src(1), A)
        self.clock.advance(LIFETIME - 1)
        self.assertIsNotNone(self.table.get(src(1)))
        self.clock.advance(1)
        self.assertIsNone(self.table.get(src(1)))
        self.assertIsNone(self.table.lookup(src(1)))
        self.assertNotIn(src(1), self.table)

    def test_hit_refreshes_lifetime(self) -> None:
        """Every packet that uses an entry starts its lifetime again (claim 10)."""
        self.table.insert(src(1), A)
        for _ in range(5):
            self.clock.advance(LIFETIME - 1)
            self.assertIsNotNone(self.table.lookup(src(1)))
            self.assertEqual(self.table.expire(), 0)
        self.clock.advance(LIFETIME - 1)
        self.assertEqual(len(self.table), 1)
        self.clock.advance(1)
        self.assertEqual(self.table.expire(), 1)
        self.assertEqual(len(self.table), 0)

    def test_get_does_not_refresh(self) -> None:
        """Operators' get() neither refreshes nor counts."""
        self.table.insert(src(1), A)
        self.clock.advance(LIFETIME - 1)
        binding = self.table.get(src(1))
        assert binding is not None
        self.assertEqual((binding.expires, binding.packets), (LIFETIME, 1))
        self.assertEqual(self.table.stats.hits, 0)

    def test_refresh_all_is_refresh_of_each(self) -> None:
        """refresh_all(bindings, now) leaves the table as refresh(b, now) for each, in
        order -- a binding listed twice refreshed twice, a probationary one made
        established, the hits counted -- and the same evictions and expiries follow."""
        tables = [StickyTable(self.clock, LIFETIME, max_entries=4, frequent=3)
                  for _ in range(2)]  # fmt: skip
        for i in (1, 2, 3, 4):
            for table in tables:
                self.assertIsNotNone(table.insert(src(i), A))
            self.clock.advance(1)
        for table in tables:
            self.assertIsNotNone(table.lookup(src(4)))  # established, 2 packets
        self.clock.advance(2)
        now = self.clock.seconds() + 0.3  # off the rounding grid
        picks = [1, 4, 1, 3, 4]
        each, batched = tables
        for i in picks:
            b = each.peek(src(i))
            assert b is not None
            each.refresh(b, now)
        found = [batched.peek(src(i)) for i in picks]
        batched.refresh_all([b for b in found if b is not None], now)

        def state(table: StickyTable) -> object:
            return (sorted((k, b.expires, b.packets, b.established) for k, b in table),
                    table.stats.as_dict(), table.probationary)  # fmt: skip

        self.assertEqual(state(batched), state(each))
        self.assertEqual(batched.stats.hits, 1 + len(picks))
        b1 = batched.get(src(1))
        assert b1 is not None
        self.assertEqual((b1.packets, b1.established), (3, True))
        # Full: each insert evicts the same entry in both (first src(2), the one left
        # probationary).
        for i in (5, 6):
            for table in tables:
                self.assertIsNotNone(table.insert(src(i), B))
            self.assertEqual(state(batched), state(each))
            self.assertNotIn(src(2), batched)
        self.clock.advance(LIFETIME)
        self.assertEqual(batched.expire(), each.expire())
        self.assertEqual(state(batched), state(each))

    def test_refresh_all_of_nothing(self) -> None:
        """An empty batch of hits changes and counts nothing."""
        binding = self.table.insert(src(1), A)
        assert binding is not None
        self.clock.advance(5)
        self.table.refresh_all([], self.clock.seconds())
        self.assertEqual((binding.expires, binding.packets, binding.established),
                         (LIFETIME, 1, False))  # fmt: skip
        self.assertEqual(self.table.stats.hits, 0)

    def test_expiry_is_never_early(self) -> None:
        """With clock readings off the rounding grid, an entry still lives at least
        its lifetime, and at most one resolution step more."""
        self.clock.advance(0.3)
        binding = self.table.insert(src(1), A)
        assert binding is not None
        self.assertGreaterEqual(binding.expires, 0.3 + LIFETIME)
        self.assertLessEqual(binding.expires, 0.3 + LIFETIME + self.table.resolution)

    def test_expire_removes_only_due(self) -> None:
        """expire() removes exactly the entries whose lifetime ended, both new and
        established ones, and keeps the load counts right."""
        self.table.insert(src(1), A)
        self.established(src(2), B)
        self.clock.advance(10)
        self.table.insert(src(3), A)
        self.established(src(4), B)
        self.clock.advance(LIFETIME - 10)
        self.assertEqual(self.table.expire(), 2)
        self.assertEqual(sorted(k for k, _ in self.table), sorted([src(3), src(4)]))
        self.assertEqual(dict(self.table.load()), {A: 1, B: 1})
        self.clock.advance(10)
        self.assertEqual(self.table.expire(), 2)
        self.assertEqual(dict(self.table.load()), {})
        self.assertEqual(self.table.stats.expirations, 4)

    def test_lookup_of_expired_entry_removes_it(self) -> None:
        """An expired entry met by lookup is removed (a miss), so the caller can
        schedule the key afresh; its load is released at once."""
        self.table.insert(src(1), A)
        self.clock.advance(LIFETIME)
        self.assertIsNone(self.table.lookup(src(1)))
        self.assertEqual(len(self.table), 0)
        self.assertEqual(dict(self.table.load()), {})
        self.assertEqual(self.table.expire(), 0)


class MemoryTests(TableTestCase):
    def test_stale_probation_filings_stay_bounded(self) -> None:
        """Entries promoted out of probation leave filings behind in its FIFO; they are
        compacted away once they outnumber the live ones, so the FIFO never holds much
        more than the probationary entries."""
        self.table = StickyTable(self.clock, LIFETIME, max_entries=100_000)
        for i in range(20_000):
            self.established(src(i))
            self.assertLessEqual(len(self.table._probation), self.table.probationary + 1025)
        for i in range(20_000, 21_000):
            self.table.insert(src(i), A)
        self.assertEqual(self.table.probationary, 1000)
        self.assertLessEqual(len(self.table._probation), 2025)
        self.assertEqual(self.table.expire(), 0)

    def test_aliases_share_the_key_slot(self) -> None:
        """A binding's key and aliases: the key alone while it has none, then a list
        with the key first; back to the key alone when the last alias goes."""
        binding = self.table.insert(src(1), A)
        assert binding is not None
        self.assertIsNone(binding.aliases)
        self.assertTrue(self.table.link(binding, hoa(1)))
        self.assertTrue(self.table.link(binding, hoa(2)))
        self.assertEqual(binding.aliases, [bytes(hoa(1)), bytes(hoa(2))])
        self.assertEqual(binding.key, src(1))
        self.table.remove(hoa(1))
        self.table.remove(hoa(2))
        self.assertIsNone(binding.aliases)
        self.assertEqual([k for k, _ in self.table], [src(1)])
        self.assertIsNone(binding.created)


class RestoreTests(TableTestCase):
    def test_restore_keeps_expiry_and_segment(self) -> None:
        """A restored binding keeps its remaining lifetime, counters and segment, is
        swept when that ends, and iteration yields Key objects."""
        self.clock.advance(100)
        b1 = self.table.restore(src(1), A, expires=110, packets=7, established=True,
                                care_of=src(1).value)
        b2 = self.table.restore(src(2), B, expires=120)
        assert b1 is not None and b2 is not None
        self.assertEqual((b1.expires, b1.packets, b1.established, b1.care_of),
                         (110, 7, True, src(1).value))
        self.assertEqual((b2.expires, b2.established), (120, False))
        self.assertEqual(dict(self.table.load()), {A: 1, B: 1})
        for key, binding in self.table:
            self.assertIs(type(key), Key)
            self.assertEqual(binding.key, key)
        self.clock.advance(10)
        self.assertEqual(self.table.expire(), 1)
        self.clock.advance(10)
        self.assertEqual(self.table.expire(), 1)

    def test_restore_clamps_and_skips_expired(self) -> None:
        """An already expired saved binding is not restored; one longer than the
        lifetime is cut to it."""
        self.clock.advance(100)
        self.assertIsNone(self.table.restore(src(1), A, expires=100))
        b = self.table.restore(src(2), A, expires=100 + 10 * LIFETIME)
        assert b is not None
        self.assertEqual(b.expires, 100 + LIFETIME)


class SweepCostTests(TableTestCase):
    def test_nothing_due_touches_nothing(self) -> None:
        """A sweep with many live entries and none due examines no live entry (only
        the one stale filing at the FIFO's head, left by a promotion, is dropped)."""
        for i in range(500):
            self.table.insert(src(i), A)
        for i in range(0, 500, 2):
            self.table.lookup(src(i))
        self.clock.advance(LIFETIME / 2)
        self.assertEqual(self.table.expire(), 0)
        self.assertEqual(self.table.stats.swept, 1)
        self.assertEqual(self.table.expire(), 0)
        self.assertEqual(self.table.stats.swept, 1)

    def test_work_follows_what_is_due(self) -> None:
        """Expiring k entries out of many examines about k filings, not the table."""
        self.table = StickyTable(self.clock, LIFETIME, max_entries=2000)
        for i in range(1000):
            self.established(src(i))
        self.clock.advance(5)
        for i in range(1000, 1010):
            self.established(src(i))
        self.clock.advance(LIFETIME - 5)
        # The first 1000 are due now; then only the 10 late ones.
        self.assertEqual(self.table.expire(), 1000)
        before = self.table.stats.swept
        self.clock.advance(5)
        self.assertEqual(self.table.expire(), 10)
        self.assertLessEqual(self.table.stats.swept - before, 20)

    def test_refreshed_entry_refiled_once(self) -> None:
        """A busy established entry is examined once when its first deadline comes,
        refiled, and kept; it is not examined on every sweep."""
        self.established(src(1))
        for _ in range(int(LIFETIME) + 5):
            self.clock.advance(1)
            self.table.lookup(src(1))
            self.table.expire()
        self.assertIn(src(1), self.table)
        self.assertLessEqual(self.table.stats.swept, 2)

    def test_established_removed_within_grain(self) -> None:
        """An established entry whose lifetime ended off the grain is swept at the
        latest one sweep_grain later."""
        self.clock.advance(0.25)
        self.established(src(1))
        self.clock.advance(LIFETIME)
        removed = self.table.expire()
        self.clock.advance(self.table.sweep_grain)
        removed += self.table.expire()
        self.assertEqual(removed, 1)
        self.assertEqual(len(self.table), 0)


class RekeyTests(TableTestCase):
    """Fig. 14B: a notification says care-of address `old` became `new`."""

    def test_new_entry_copies_backend(self) -> None:
        """T231-T234: no entry for the new address: one is made with the old entry's
        backend, established; the old entry is left untouched."""
        self.established(src(1), B)
        old = self.table.get(src(1))
        assert old is not None
        old_expires = old.expires
        self.clock.advance(10)
        new = self.table.rekey(src(1), src(2), care_of=src(2).value)
        assert new is not None
        self.assertEqual((new.backend, new.packets), (B, 0))
        self.assertEqual(new.care_of, src(2).value)
        self.assertTrue(new.established)
        self.assertEqual(new.expires, 10 + LIFETIME)
        self.assertEqual(old.expires, old_expires)
        self.assertEqual(dict(self.table.load()), {B: 2})
        self.assertEqual(len(self.table), 2)

    def test_old_entry_lives_out_its_lifetime(self) -> None:
        """After a move the old address keeps its entry until its own lifetime ends,
        then it goes and the new one stays."""
        self.established(src(1), B)
        self.clock.advance(10)
        self.table.rekey(src(1), src(2))
        self.clock.advance(LIFETIME - 10)
        self.table.expire()
        self.assertNotIn(src(1), self.table)
        self.assertIn(src(2), self.table)
        self.assertEqual(dict(self.table.load()), {B: 1})

    def test_return_to_address_with_entry(self) -> None:
        """T235: back at an address whose entry still lives: no new entry; that one
        is refreshed and follows the terminal's backend."""
        self.established(src(1), B)
        self.clock.advance(5)
        self.table.rekey(src(1), src(2))
        self.clock.advance(5)
        entries = len(self.table)
        back = self.table.rekey(src(2), src(1), care_of=src(1).value)
        assert back is not None
        self.assertIs(back, self.table.get(src(1)))
        self.assertEqual(len(self.table), entries)
        self.assertEqual(back.expires, 10 + LIFETIME)
        self.assertEqual((back.backend, back.care_of), (B, src(1).value))
        self.assertEqual(self.table.stats.inserts, 1)

    def test_return_repoints_to_current_backend(self) -> None:
        """T235 when the still-living entry points elsewhere (e.g. the terminal was moved
        by an operator meanwhile): it is repointed to the old key's backend, and the
        load counts follow."""
        self.table.insert(src(1), A)
        self.established(src(2), C)
        self.assertEqual(dict(self.table.load()), {A: 1, C: 1})
        back = self.table.rekey(src(2), src(1))
        assert back is not None
        self.assertEqual(back.backend, C)
        self.assertTrue(back.established)
        self.assertEqual(dict(self.table.load()), {C: 2})

    def test_unknown_old_key(self) -> None:
        """T232 with no entry for the old address: nothing to copy, nothing made."""
        self.assertIsNone(self.table.rekey(src(1), src(2)))
        self.table.insert(src(3), A)
        self.clock.advance(LIFETIME)
        self.assertIsNone(self.table.rekey(src(3), src(4)))
        self.assertNotIn(src(4), self.table)

    def test_expired_new_entry_replaced(self) -> None:
        """An expired, unswept entry for the new address does not count as T235: a
        fresh entry with the right backend replaces it."""
        self.table.insert(src(2), A)
        self.clock.advance(LIFETIME)
        self.established(src(1), B)
        new = self.table.rekey(src(1), src(2))
        assert new is not None
        self.assertEqual((new.backend, new.expires), (B, 2 * LIFETIME))
        self.assertEqual(dict(self.table.load()), {B: 2})

    def test_same_key(self) -> None:
        """rekey(k, k) just refreshes k."""
        self.table.insert(src(1), A)
        self.clock.advance(10)
        binding = self.table.rekey(src(1), src(1))
        assert binding is not None
        self.assertEqual((binding.expires, len(self.table)), (10 + LIFETIME, 1))

    def test_home_address_key(self) -> None:
        """A notification can also point a home-address key at a new care-of address:
        rekey(old, old) records the care-of address."""
        self.established(hoa(1), B)
        binding = self.table.rekey(hoa(1), hoa(1), care_of=src(9).value)
        assert binding is not None
        self.assertEqual(binding.care_of, src(9).value)


def source(net: int, host: int) -> bytes:
    """Address `host` of the /64 number `net` (all in 2001:db8:ab00::/40, one /48 each)."""
    return (0x2001_0DB8_AB00 << 80 | net << 64 | host).to_bytes(16, "big")


class BoundTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.clock = Clock()
        self.table = StickyTable(self.clock, LIFETIME, max_entries=100)

    def fill_established(self, n: int, packets: int = 2) -> None:
        for i in range(n):
            self.table.insert(src(i), A if i % 2 else B)
            for _ in range(packets - 1):
                self.table.lookup(src(i))

    def test_flood_does_not_evict_frequent(self) -> None:
        """A flood of new keys (one packet each) never displaces a binding that has
        seen `frequent` packets while any other is left; it displaces the infrequent
        ones least recently used first, and the table stays within its bound."""
        self.fill_established(60, packets=self.table.frequent)
        self.clock.advance(1)
        for i in range(1000, 11000):
            self.table.insert(hoa(i), C)
            self.assertLessEqual(len(self.table), 100)
        for i in range(60):
            binding = self.table.get(src(i))
            assert binding is not None
            self.assertEqual(binding.backend, A if i % 2 else B)
        self.assertEqual(self.table.stats.evictions, 10000 - 40)
        self.assertEqual(self.table.stats.established_evictions, 0)
        self.assertEqual(self.table.stats.refusals, 0)
        self.assertEqual(dict(self.table.load()), {A: 30, B: 30, C: 40})

    def test_oldest_probationary_evicted_first(self) -> None:
        """When full, of entries used at the same time the probationary entry inserted
        first is the one evicted."""
        self.fill_established(50)
        for i in range(50):
            self.table.insert(hoa(i), C)
        self.table.insert(hoa(99), C)
        self.assertNotIn(hoa(0), self.table)
        self.assertIn(hoa(1), self.table)
        self.assertIn(hoa(99), self.table)
        self.assertEqual(self.table.stats.established_evictions, 0)

    def test_second_packet_protects(self) -> None:
        """Of entries last used at the same time, a probationary one goes before one
        that has seen a second packet."""
        for i in range(100):
            self.table.insert(hoa(i), C)
        self.table.lookup(hoa(0))
        self.table.insert(hoa(500), C)
        self.assertIn(hoa(0), self.table)
        self.assertNotIn(hoa(1), self.table)

    def test_least_recently_used_goes(self) -> None:
        """An established entry idle longer than every probationary one is evicted
        before them: new identities push out what has been idle longest."""
        self.fill_established(10)
        self.clock.advance(5)
        for i in range(90):
            self.table.insert(hoa(i), C)
        self.clock.advance(1)
        self.table.lookup(src(3))  # used again: no longer the least recent
        self.table.insert(hoa(500), C)
        self.assertIn(src(3), self.table)
        gone = [i for i in range(10) if src(i) not in self.table]
        self.assertEqual(len(gone), 1)
        self.assertNotIn(3, gone)
        self.assertEqual(self.table.stats.established_evictions, 1)
        self.assertIn(hoa(0), self.table)

    def test_least_recent_within_a_second(self) -> None:
        """Established entries last used within the same second of the wheel go in the
        order they were used: a probationary entry used between two of them outlives
        the earlier one."""
        self.fill_established(99)  # used at 0
        self.clock.advance(5.1)
        self.table.insert(hoa(1), C)
        self.table.lookup(hoa(1))  # established, used at 5.1
        self.clock.advance(0.4)
        self.table.insert(hoa(2), C)  # probationary, used at 5.5
        self.clock.advance(0.4)
        for i in range(99):
            self.table.lookup(src(i))  # used at 5.9
        self.table.insert(hoa(3), C)
        self.assertNotIn(hoa(1), self.table)
        self.assertIn(hoa(2), self.table)

    def test_full_of_established_never_refuses(self) -> None:
        """With every entry established and live, an insert (or a rekey) is not
        refused: the least recently used infrequent entry makes room; frequent entries
        go only when no infrequent one is left, least recently used first."""
        self.table.insert(hoa(900), A)
        for _ in range(self.table.frequent):
            self.table.lookup(hoa(900))  # frequent
        self.clock.advance(1)
        self.fill_established(99, packets=self.table.frequent)
        self.assertIsNotNone(self.table.insert(hoa(1), C))
        self.assertNotIn(hoa(900), self.table)  # all frequent: the least recent went
        self.clock.advance(1)
        self.table.lookup(hoa(1))  # infrequent established
        self.assertIsNotNone(self.table.rekey(src(1), hoa(2)))
        self.assertNotIn(hoa(1), self.table)  # the only infrequent one went
        self.assertEqual((self.table.stats.refusals, self.table.stats.evictions), (0, 2))
        self.assertEqual(self.table.stats.established_evictions, 2)
        self.assertEqual(len(self.table), 100)

    def test_due_entries_make_room_first(self) -> None:
        """When full, entries whose lifetime ended are swept before anything live
        is evicted or refused."""
        self.fill_established(100)
        self.clock.advance(LIFETIME)
        binding = self.table.insert(hoa(1), C)
        self.assertIsNotNone(binding)
        self.assertEqual(self.table.stats.evictions, 0)
        self.assertEqual(len(self.table), 1)

    def test_replacing_is_never_refused(self) -> None:
        """Inserting over an existing key replaces it even when full, and an
        established entry's replacement stays established."""
        self.fill_established(100)
        binding = self.table.insert(src(3), C)
        assert binding is not None
        self.assertEqual((binding.backend, binding.packets), (C, 1))
        self.assertTrue(binding.established)
        self.assertEqual(self.table.load()[C], 1)


class AdmissionTests(SynchronousTestCase):
    """Admission by source prefix: when the table is full, a /64 or /48 that has made
    many new entries lately is refused instead of pushing anyone out."""

    def setUp(self) -> None:
        self.clock = Clock()
        self.table = StickyTable(self.clock, LIFETIME, max_entries=100)
        admission = self.table.admission
        assert admission is not None
        self.per_64 = admission.per_64

    def test_room_admits_everyone(self) -> None:
        """While there is room, every insert is admitted, however busy its prefix."""
        for i in range(100):
            self.assertIsNotNone(self.table.insert(hoa(i), A, source=source(1, i)))
        self.assertEqual(self.table.stats.throttled, 0)

    def test_full_refuses_a_busy_prefix_and_admits_others(self) -> None:
        """A full table refuses a new identity from a /64 that made more than its
        limit of new entries lately (counted), and nothing is evicted for it; a newcomer
        from another prefix is admitted, pushing out the least recently used entry."""
        for i in range(100):
            self.table.insert(hoa(i), A, source=source(1, i))
        self.clock.advance(1)
        for i in range(100, 200):
            self.assertIsNone(self.table.insert(hoa(i), A, source=source(1, i)))
        self.assertEqual((self.table.stats.throttled, self.table.stats.refusals), (100, 100))
        self.assertEqual(self.table.stats.evictions, 0)
        newcomer = self.table.insert(src(1), B, source=source(2, 1))
        self.assertIsNotNone(newcomer)
        self.assertNotIn(hoa(0), self.table)
        self.assertEqual(len(self.table), 100)

    def test_a_quiet_prefix_is_admitted_when_full(self) -> None:
        """Under the limit, a prefix's new identities evict like anyone's."""
        self.table = StickyTable(self.clock, LIFETIME, max_entries=self.per_64 * 4)
        for i in range(self.per_64 * 4):
            self.table.insert(hoa(i), A, source=source(3 + i % 64, i))
        for i in range(self.per_64 // 2):
            self.assertIsNotNone(self.table.insert(src(i), B, source=source(1, i)))
        self.assertEqual(self.table.stats.throttled, 0)

    def test_without_source_or_admission(self) -> None:
        """An insert that names no source, or a table without admission, is never
        refused: the bound is kept by eviction alone."""
        table = StickyTable(self.clock, LIFETIME, max_entries=10, admission=False)
        for i in range(50):
            self.assertIsNotNone(table.insert(hoa(i), A, source=source(1, i)))
            self.assertIsNotNone(self.table.insert(hoa(i), A))
        self.assertEqual(len(table), 10)
        self.assertEqual(table.stats.refusals + self.table.stats.refusals, 0)


@dataclasses.dataclass
class Entry:
    backend: Backend
    expires: float
    established: bool
    order: int
    packets: int


class TableModel(RuleBasedStateMachine):
    """The table against a plain-dict model of the documented semantics.

    Times are whole seconds and the lifetime is whole, so the rounding of expiry times
    and the one-second wheel grain never blur the model's exact deadlines.  Where the
    documented policy leaves a choice (which of several established entries last used
    in the same second is evicted), the model accepts any of them and follows the table.
    """

    MAX = 4
    LIFE = 5
    FREQUENT = 3
    KEYS = [src(i) for i in range(7)]
    BACKENDS = [A, B, C]

    def __init__(self) -> None:
        super().__init__()
        self.clock = Clock()
        self.table = StickyTable(self.clock, self.LIFE, self.MAX, frequent=self.FREQUENT)
        self.model: dict[Key, Entry] = {}
        self.order = 0

    @property
    def now(self) -> float:
        return self.clock.seconds()

    def _model_expire(self) -> int:
        due = [k for k, e in self.model.items() if e.expires <= self.now]
        for k in due:
            del self.model[k]
        return len(due)

    def _model_room(self) -> None:
        """Room for one more, as the table made it: if full, sweep what is due; else
        evict the infrequent entry used least recently (a probationary one, oldest
        first, before an established one last used at the same time), or, with none,
        the frequent one used least recently."""
        if len(self.model) < self.MAX:
            return
        self._model_expire()
        if len(self.model) < self.MAX:
            return
        pool = [
            (e.expires, e.established, e.order, k)
            for k, e in self.model.items()
            if not e.established or e.packets < self.FREQUENT
        ] or [(e.expires, True, e.order, k) for k, e in self.model.items()]
        first = min(pool)
        if not first[1]:
            victims = {first[3]}  # the FIFO's oldest
        else:
            victims = {k for x, est, _, k in pool if (x, est) == first[:2]}
        gone = [k for k in self.model if k not in self.table]
        assert len(gone) == 1 and gone[0] in victims, (gone, victims)
        del self.model[gone[0]]

    def _live(self, key: Key) -> Entry | None:
        entry = self.model.get(key)
        return entry if entry is not None and entry.expires > self.now else None

    def _hit(self, key: Key) -> Entry | None:
        """A lookup's hit on `key` in the model: its live entry refreshed and counted
        (None: it has none)."""
        entry = self._live(key)
        if entry is not None:
            entry.expires = self.now + self.LIFE
            entry.established = True
            entry.packets += 1
        return entry

    @rule(key=st.sampled_from(KEYS), backend=st.sampled_from(BACKENDS))
    def insert(self, key: Key, backend: Backend) -> None:
        binding = self.table.insert(key, backend)
        old = self.model.pop(key, None)
        if old is None:
            self._model_room()
        assert binding is not None and binding.backend == backend
        self.order += 1
        established = old is not None and old.expires > self.now and old.established
        self.model[key] = Entry(backend, self.now + self.LIFE, established, self.order, 1)

    @rule(key=st.sampled_from(KEYS))
    def lookup(self, key: Key) -> None:
        binding = self.table.lookup(key)
        entry = self._hit(key)
        if entry is None:
            self.model.pop(key, None)
            assert binding is None
        else:
            assert binding is not None and binding.backend == entry.backend

    @rule(keys=st.lists(st.sampled_from(KEYS), max_size=5))
    def refresh_all(self, keys: list[Key]) -> None:
        """An executor's batch of hits: the live bindings of `keys` (found with peek,
        repeats kept), refreshed at once; each as a lookup's hit."""
        live = [b for k in keys if (b := self.table.peek(k)) is not None and b.expires > self.now]
        hits = self.table.stats.hits
        self.table.refresh_all(live, self.now)
        for key in keys:
            self._hit(key)
        assert self.table.stats.hits == hits + len(live)

    @rule(old=st.sampled_from(KEYS), new=st.sampled_from(KEYS))
    def rekey(self, old: Key, new: Key) -> None:
        binding = self.table.rekey(old, new)
        source = self._live(old)
        if source is None:
            assert binding is None
            return
        target = self._live(new)
        if target is not None:
            target.backend = source.backend
            target.expires = self.now + self.LIFE
            target.established = True
        else:
            self.model.pop(new, None)
            self._model_room()
            self.model[new] = Entry(source.backend, self.now + self.LIFE, True, 0, 0)
        assert binding is not None and binding.backend == source.backend

    @rule(key=st.sampled_from(KEYS))
    def remove(self, key: Key) -> None:
        binding = self.table.remove(key)
        entry = self.model.pop(key, None)
        assert (binding is None) == (entry is None)

    @rule(seconds=st.sampled_from([1, 2, 4, 5, 6]))
    def advance(self, seconds: int) -> None:
        self.clock.advance(seconds)

    @rule()
    def expire(self) -> None:
        assert self.table.expire() == self._model_expire()

    def _view(self, b: Binding) -> tuple[float, bool, int]:
        """`b`'s expiry, segment and packets, as the model's entry should have them."""
        return b.expires, b.established, b.packets

    def _untold(self) -> int:
        """Probationary bindings that packets the table has not heard of promote."""
        return 0

    @invariant()
    def same_entries(self) -> None:
        want = {k: (e.backend, e.expires, e.established, e.packets)
                for k, e in self.model.items()}
        got = {k: (b.backend, *self._view(b)) for k, b in self.table}
        assert got == want, (got, want)

    @invariant()
    def load_counts_consistent(self) -> None:
        counts = collections.Counter(b.backend for _, b in self.table)
        assert dict(self.table.load()) == dict(counts)
        assert len(self.table) <= self.MAX
        assert self.table.probationary - self._untold() == sum(
            not e.established for e in self.model.values())


class TableModelTests(SynchronousTestCase):
    def test_against_model(self) -> None:
        """Random sequences of inserts, lookups, rekeys, removals, clock steps and
        sweeps leave the table equal to the model: same keys, backends, expiry times
        and segments, load counts that match the entries, and never more than the
        bound."""
        run_state_machine_as_test(
            TableModel,
            settings=settings(max_examples=300, stateful_step_count=40, deadline=None),
        )


class Outside:
    """An executor forwarding packets of the table's bindings outside it (as the XDP
    program does), which the table hears of only when it asks (`Stamps`): per binding,
    the expiry its last packet gave and the packets not told yet."""

    def __init__(self, table: StickyTable) -> None:
        self.table = table
        self.pending: dict[Binding, tuple[float, int]] = {}
        self.folds = 0
        table.stamps = self

    def forward(self, binding: Binding, now: float) -> None:
        _, count = self.pending.get(binding, (0.0, 0))
        self.pending[binding] = (now + self.table.lifetime, count + 1)

    def fold(self, binding: Binding) -> None:
        self.folds += 1
        told = self.pending.pop(binding, None)
        if told is not None:
            self.table.extend(binding, *told)

    def fold_all(self) -> None:
        for binding in list(self.pending):
            self.fold(binding)

    def view(self, binding: Binding) -> tuple[float, bool, int]:
        """`binding`'s expiry, segment and packets once told (without telling)."""
        expires, count = self.pending.get(binding, (0.0, 0))
        return (max(binding.expires, expires), binding.established or count > 0,
                binding.packets + count)  # fmt: skip


class StampedTableModel(TableModel):
    """The model again, with packets also forwarded outside the table (`Outside`):
    the table, told only when it asks, must decide every lookup, link, sweep and
    eviction as if each of those packets had been a lookup's hit."""

    def __init__(self) -> None:
        super().__init__()
        self.outside = Outside(self.table)

    @rule(keys=st.lists(st.sampled_from(TableModel.KEYS), max_size=5))
    def forwarded_outside(self, keys: list[Key]) -> None:
        for key in keys:
            if self._live(key) is None:
                continue  # the executor holds live bindings only (the table tells it)
            binding = self.table.peek(key)
            assert binding is not None  # never dropped while its packets are untold
            self.outside.forward(binding, self.now)
            self._hit(key)

    @rule(keys=st.lists(st.sampled_from(TableModel.KEYS), max_size=5))
    def refresh_all(self, keys: list[Key]) -> None:
        """The fast path's batch: a binding live as far as the table knows is refreshed
        in the batch; one that looks expired goes to the general path (a lookup)."""
        batch = []
        for key in keys:
            b = self.table.peek(key)
            if b is not None and b.expires > self.now:
                batch.append(b)
            else:
                self.table.lookup(key)
        self.table.refresh_all(batch, self.now)
        for key in keys:
            if self._hit(key) is None:
                self.model.pop(key, None)

    @rule(ahead=st.sampled_from([0, 1, 3, 6]))
    def due(self, ahead: int) -> None:
        until = self.now + ahead
        got = self.table.due(until)
        assert len(got) == len(set(map(id, got)))
        assert {id(b) for b in got} == {id(b) for _, b in self.table if b.expires <= until}

    def _view(self, b: Binding) -> tuple[float, bool, int]:
        return self.outside.view(b)

    def _untold(self) -> int:
        return sum(not b.established and self.outside.view(b)[1] for _, b in self.table)


class StampedTableTests(TableTestCase):
    """`StickyTable.stamps`: packets forwarded outside the table, told late."""

    def test_against_model(self) -> None:
        run_state_machine_as_test(
            StampedTableModel,
            settings=settings(max_examples=300, stateful_step_count=40, deadline=None),
        )

    def test_told_late_the_expiry_is_the_packets_own(self) -> None:
        """A packet forwarded outside at 20 keeps the binding until 50, not until the
        lifetime after the table hears of it: an idle terminal does not outlive its
        lifetime however late the telling."""
        outside = Outside(self.table)
        binding = self.table.insert(src(1), A)
        assert binding is not None
        self.clock.advance(20)
        outside.forward(binding, 20)
        self.clock.advance(25)  # 45: past what the table knew (30)
        self.assertEqual(self.table.expire(), 0)
        self.assertEqual((binding.expires, binding.packets, binding.established),
                         (50.0, 2, True))  # fmt: skip
        self.clock.advance(6)  # 51
        self.assertEqual(self.table.expire(), 1)
        self.assertNotIn(src(1), self.table)

    def test_told_late_never_shortens(self) -> None:
        """Told after a later hit in the table itself, an earlier packet outside leaves
        the later expiry (and still counts)."""
        outside = Outside(self.table)
        binding = self.table.insert(src(1), A)
        assert binding is not None
        self.clock.advance(20)
        outside.forward(binding, 20)  # gives 50
        self.clock.advance(2)
        self.table.lookup(src(1))  # gives 52
        self.table.catch_up(binding)
        self.assertEqual((binding.expires, binding.packets), (52.0, 3))

    def test_told_too_late_while_the_fifo_compacts(self) -> None:
        """A probationary binding told at the sweep of packets whose own expiry is past
        too (a sync missed: a stalled reactor, a clock step): promoted by them, which
        compacts the FIFO under the sweep's walk, then dropped -- and the table's count
        of stale FIFO filings stays true."""
        table = StickyTable(self.clock, LIFETIME, max_entries=100_000, admission=False)
        outside = Outside(table)
        bindings = [table.insert(src(i), A) for i in range(1100)]
        head = bindings[0]
        assert head is not None
        outside.pending[head] = (LIFETIME + 0.5, 1)
        self.clock.advance(1)
        for b in bindings[50:1074]:  # 1024 promotions: one more compacts the FIFO
            assert b is not None
            table.lookup(b.key)
        self.clock.advance(LIFETIME)  # 31: the head's expiry and its stamp's both past
        table.expire()
        self.clock.advance(1)
        table.expire()  # the promoted head, dropped by its wheel within a grain
        fifo = table._probation
        self.assertEqual(table._p_stale, sum(b._next is not _PROBATION for b in fifo))
        self.assertEqual(table.probationary, sum(b._next is _PROBATION for b in fifo))
        self.assertNotIn(src(0), table)

    def test_busy_outside_is_not_evicted_as_a_newcomer(self) -> None:
        """When the table is full, a terminal whose packets all went outside is judged
        by them: the idle entry is evicted, not the busy one."""
        table = StickyTable(self.clock, LIFETIME, max_entries=2)
        outside = Outside(table)
        busy = table.insert(src(1), A)
        self.clock.advance(1)
        idle = table.insert(src(2), A)
        assert busy is not None and idle is not None
        for t in range(2, 12):
            self.clock.advance(1)
            outside.forward(busy, t)
        table.insert(src(3), B)  # full: one must go
        self.assertIn(src(1), table)
        self.assertNotIn(src(2), table)
        self.assertEqual(busy.packets, 11)
        self.assertGreaterEqual(outside.folds, 1)

    def test_a_lookup_takes_what_was_told(self) -> None:
        """A lookup past the expiry the table knew, of a binding kept alive outside, is
        a hit; a link onto its identity is refused (it is bound)."""
        outside = Outside(self.table)
        binding = self.table.insert(src(1), A)
        other = self.table.insert(src(2), B)
        assert binding is not None and other is not None
        self.clock.advance(29)
        outside.forward(binding, 29)
        self.clock.advance(2)  # 31
        self.assertFalse(self.table.link(other, src(1)))
        self.assertIs(self.table.lookup(src(1)), binding)
        self.assertEqual(self.table.stats.misses, 0)


class ListenerTests(TableTestCase):
    """`StickyTable.listeners`: every binding made, re-pointed or gone is told, so an
    executor with its own copy of the table (an XDP map) can mirror it exactly."""

    def test_mirror_follows_every_change(self) -> None:
        """A mirror kept only from the listener calls equals the table after inserts,
        lookups, replacement, rekeys (new entry and T235), eviction, expiry and removal."""
        mirror: dict[bytes, str] = {}

        def tell(binding: Binding, bound: bool) -> None:
            if bound:
                mirror[bytes(binding.key)] = binding.backend.name
            else:
                mirror.pop(bytes(binding.key), None)

        self.table.listeners.append(tell)

        def check() -> None:
            now = self.clock.seconds()
            live = {bytes(k): b.backend.name for k, b in self.table if b.expires > now}
            held = {bytes(k): b.backend.name for k, b in self.table}
            self.assertEqual(mirror, held)
            self.assertLessEqual(live.items(), mirror.items())

        self.table.insert(src(1), A)
        self.table.lookup(src(1))
        self.table.insert(src(2), B)
        check()
        self.table.insert(src(1), B)  # replaced
        check()
        self.table.rekey(src(1), src(3))  # a new entry for the new address
        self.table.rekey(src(2), src(1))  # T235: src(1) re-pointed
        check()
        self.assertEqual(mirror[bytes(src(1))], B.name)
        self.table.remove(src(3))
        check()
        self.clock.advance(LIFETIME + 2)
        self.table.expire()
        check()
        self.assertEqual(mirror, {})

