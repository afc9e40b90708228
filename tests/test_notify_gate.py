"""Tests for lbproxy.notify.gate: what an authenticated peer is believed about."""

from __future__ import annotations

import ipaddress

from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase

from lbproxy.notify.gate import Gate
from lbproxy.notify.listener import BindingChange, RecordingListener
from lbproxy.notify.policy import HomeAddressEntitlement, PrefixEntitlement, Refusal
from lbproxy.notify.subscriptions import Subscriptions


def a(text: str) -> bytes:
    return ipaddress.IPv6Address(text).packed


HOME = a("2001:db8:1::16")
COA1 = a("2001:db8:a::16")
COA2 = a("2001:db8:b::16")
HA = PrefixEntitlement.of(["2001:db8:1::/64"])


class GateTests(SynchronousTestCase):
    """Accept, refuse, count; the listener hears only accepted changes."""

    def setUp(self) -> None:
        self.clock = Clock()
        self.subs = Subscriptions(100, idle_lifetime=60.0)
        self.listener = RecordingListener()
        self.gate = Gate(self.subs, self.listener, self.clock)

    def subscribed_by_coa(self) -> None:
        sub = self.subs.add("ha1", COA1, "coa", 0.0)
        assert sub is not None
        self.assertIsNone(self.gate.subscribed("ha1", HA, sub, 7, HOME, COA1, 10, 40))

    def test_subscribe_confirms_current_binding(self) -> None:
        """The Subscribe answer's binding is authenticated: the listener confirms it."""
        self.subscribed_by_coa()
        self.assertEqual(self.listener.changes, [BindingChange(HOME, COA1, COA1, 10, 40)])
        sub = self.subs.by_home("ha1", HOME)
        assert sub is not None
        self.assertEqual((sub.sub_id, sub.seq, sub.care_of), (7, 10, COA1))

    def test_change_accepted(self) -> None:
        """A newer BindingChanged reaches the listener with our old care-of address."""
        self.subscribed_by_coa()
        self.assertIsNone(self.gate.changed("ha1", HA, HOME, COA1, COA2, 11, 40))
        self.assertEqual(self.listener.changes[-1], BindingChange(HOME, COA1, COA2, 11, 40))
        self.assertEqual(self.gate.counters.accepted, 2)

    def test_replay_refused(self) -> None:
        """The same sequence number again, or an older one, is STALE and not applied."""
        self.subscribed_by_coa()
        self.gate.changed("ha1", HA, HOME, COA1, COA2, 11, 40)
        before = list(self.listener.changes)
        self.assertIs(self.gate.changed("ha1", HA, HOME, COA2, COA1, 11, 40), Refusal.STALE)
        self.assertIs(self.gate.changed("ha1", HA, HOME, COA2, COA1, 9, 40), Refusal.STALE)
        self.assertEqual(self.listener.changes, before)
        self.assertEqual(self.gate.counters[Refusal.STALE], 2)

    def test_wraparound_accepted(self) -> None:
        """Sequence 0 after 65535 is newer (RFC 6275 §9.5.1)."""
        sub = self.subs.add("ha1", HOME, "hoa", 0.0)
        assert sub is not None
        self.gate.subscribed("ha1", HA, sub, 1, HOME, COA1, 0xFFFF, 40)
        self.assertIsNone(self.gate.changed("ha1", HA, HOME, COA1, COA2, 0, 40))
        self.assertEqual(self.listener.changes[-1].new_care_of, COA2)

    def test_not_entitled(self) -> None:
        """A home address outside the peer's prefixes is refused even if subscribed."""
        other = a("2001:db8:99::16")
        self.subs.add("ha1", other, "hoa", 0.0)
        self.assertIs(
            self.gate.changed("ha1", HA, other, None, COA2, 1, 40), Refusal.NOT_ENTITLED
        )
        self.assertEqual(self.listener.changes, [])

    def test_subscribe_answer_outside_prefixes(self) -> None:
        """An agent resolving a care-of address to a home it may not speak for is refused;
        the subscription stays as it was (pending, no home, no sequence number)."""
        sub = self.subs.add("ha1", COA1, "coa", 0.0)
        assert sub is not None
        got = self.gate.subscribed("ha1", HA, sub, 3, a("2001:db8:99::16"), COA1, 1, 40)
        self.assertIs(got, Refusal.NOT_ENTITLED)
        self.assertEqual(list(self.subs), [sub])
        self.assertEqual(
            (sub.confirmed, sub.home, sub.seq, sub.sub_id, sub.care_of),
            (False, None, None, None, COA1),
        )
        self.assertEqual(self.listener.changes, [])

    def test_not_subscribed(self) -> None:
        """A notification nobody asked for is refused."""
        self.assertIs(
            self.gate.changed("ha1", HA, HOME, None, COA2, 1, 40), Refusal.NOT_SUBSCRIBED
        )
        self.assertEqual(self.gate.counters[Refusal.NOT_SUBSCRIBED], 1)

    def test_other_peer_cannot_use_subscription(self) -> None:
        """A subscription at ha1 does not let ha2 speak for the same home."""
        self.subscribed_by_coa()
        self.assertIs(
            self.gate.changed("ha2", HA, HOME, COA1, COA2, 99, 40), Refusal.NOT_SUBSCRIBED
        )

    def test_terminal_entitlement(self) -> None:
        """A terminal may speak for its own home address only."""
        own = HomeAddressEntitlement(HOME)
        self.subs.add("t1", HOME, "hoa", 0.0)
        self.subs.add("t1", a("2001:db8:1::17"), "hoa", 0.0)
        self.assertIsNone(self.gate.changed("t1", own, HOME, None, COA1, 1, 40))
        self.assertIs(
            self.gate.changed("t1", own, a("2001:db8:1::17"), None, COA1, 1, 40),
            Refusal.NOT_ENTITLED,
        )

    def test_snapshot_same_binding_only_refreshes(self) -> None:
        """A periodic snapshot repeating the binding is neither a change nor stale."""
        self.subscribed_by_coa()
        n = len(self.listener.changes)
        self.assertIsNone(self.gate.snapshot_entry("ha1", HA, HOME, COA1, 10, 400))
        self.assertEqual(len(self.listener.changes), n)
        self.assertEqual(self.gate.counters.total(), 0)
        sub = self.subs.by_home("ha1", HOME)
        assert sub is not None
        self.assertGreaterEqual(sub.expires, 400.0)

    def test_snapshot_carries_missed_change(self) -> None:
        """A snapshot with a newer binding applies it; an older one is stale."""
        self.subscribed_by_coa()
        self.assertIsNone(self.gate.snapshot_entry("ha1", HA, HOME, COA2, 12, 40))
        self.assertEqual(self.listener.changes[-1], BindingChange(HOME, COA1, COA2, 12, 40))
        self.assertIs(self.gate.snapshot_entry("ha1", HA, HOME, COA1, 11, 40), Refusal.STALE)

    def test_resubscribe_same_binding_no_change(self) -> None:
        """After a reconnect, the Subscribe answer repeating what we know changes nothing."""
        self.subscribed_by_coa()
        sub = self.subs.by_home("ha1", HOME)
        assert sub is not None
        n = len(self.listener.changes)
        self.assertIsNone(self.gate.subscribed("ha1", HA, sub, 8, HOME, COA1, 10, 40))
        self.assertEqual(len(self.listener.changes), n)
        self.assertEqual(sub.sub_id, 8)


class GateValidationTests(SynchronousTestCase):
    """Every check runs before anything changes: a refusal leaves the subscription as it
    was and never reaches the listener."""

    def setUp(self) -> None:
        self.clock = Clock()
        self.subs = Subscriptions(100, idle_lifetime=60.0)
        self.listener = RecordingListener()
        self.gate = Gate(self.subs, self.listener, self.clock)
        sub = self.subs.add("ha1", COA1, "coa", 0.0)
        assert sub is not None
        self.gate.subscribed("ha1", HA, sub, 7, HOME, COA1, 10, 40)
        self.sub = sub

    def snapshot(self) -> tuple[object, ...]:
        s = self.sub
        return (s.care_of, s.seq, s.expires, s.sub_id, s.home, len(self.listener.changes))

    def test_lifetimes_refused_before_any_change(self) -> None:
        """10**400 (once an OverflowError after the subscription had changed), 262,141,
        -1, NaN, 1.5, True: ``bad_lifetime``, nothing changed; 262,140 is accepted."""
        before = self.snapshot()
        for lifetime in (10**400, 262_141, -1, float("nan"), 1.5, True, "40", None):
            self.assertIs(self.gate.changed("ha1", HA, HOME, COA1, COA2, 11, lifetime),
                          Refusal.BAD_LIFETIME, lifetime)  # fmt: skip
            self.assertIs(self.gate.snapshot_entry("ha1", HA, HOME, COA2, 11, lifetime),
                          Refusal.BAD_LIFETIME, lifetime)  # fmt: skip
            self.assertEqual(self.snapshot(), before, lifetime)
        self.assertEqual(self.gate.counters[Refusal.BAD_LIFETIME], 16)
        self.assertIsNone(self.gate.changed("ha1", HA, HOME, COA1, COA2, 11, 262_140))

    def test_sequence_numbers_refused(self) -> None:
        """Out of 16 bits, negative, not an int: ``bad_argument``."""
        before = self.snapshot()
        for seq in (65536, -1, 1.0, True, None):
            self.assertIs(self.gate.changed("ha1", HA, HOME, COA1, COA2, seq, 40),
                          Refusal.BAD_ARGUMENT, seq)  # fmt: skip
        self.assertEqual(self.snapshot(), before)

    def test_listener_refusal_changes_nothing(self) -> None:
        """A listener that refuses (the entitlement rule): counted, nothing changed."""
        self.listener.refusal_for = lambda *args: (Refusal.NOT_OWNER, "test")  # type: ignore[method-assign]
        before = self.snapshot()
        self.assertIs(self.gate.changed("ha1", HA, HOME, COA1, COA2, 11, 40), Refusal.NOT_OWNER)
        self.assertIs(self.gate.snapshot_entry("ha1", HA, HOME, COA2, 11, 40), Refusal.NOT_OWNER)
        self.assertEqual(self.snapshot(), before)
        self.assertEqual(self.gate.counters[Refusal.NOT_OWNER], 2)

    def test_agent_old_care_of_ignored(self) -> None:
        """The listener is given our record of the old care-of address, not the agent's."""
        self.gate.changed("ha1", HA, HOME, a("2001:db8:c::99"), COA2, 11, 40)
        self.assertEqual(self.listener.changes[-1], BindingChange(HOME, COA1, COA2, 11, 40))

    def test_subscribe_answer_must_match_the_question(self) -> None:
        """Asked about a home, answered about another; asked about a care-of address,
        answered with another: ``bad_argument``, the subscription stays pending."""
        hoa = self.subs.add("ha1", a("2001:db8:1::20"), "hoa", 0.0)
        coa = self.subs.add("ha1", a("2001:db8:a::20"), "coa", 0.0)
        assert hoa is not None and coa is not None
        self.assertIs(self.gate.subscribed("ha1", HA, hoa, 8, a("2001:db8:1::21"), COA2, 1, 40),
                      Refusal.BAD_ARGUMENT)  # fmt: skip
        self.assertIs(self.gate.subscribed("ha1", HA, coa, 9, a("2001:db8:1::20"), COA2, 1, 40),
                      Refusal.BAD_ARGUMENT)  # fmt: skip
        for sub in (hoa, coa):
            self.assertEqual((sub.confirmed, sub.sub_id, sub.seq), (False, None, None))

    def test_no_binding_answer(self) -> None:
        """"No binding" must come with lifetime 0; then the subscription is confirmed."""
        hoa = self.subs.add("ha1", a("2001:db8:1::20"), "hoa", 0.0)
        assert hoa is not None
        self.assertIs(self.gate.subscribed("ha1", HA, hoa, 8, hoa.address, None, None, 40),
                      Refusal.BAD_ARGUMENT)  # fmt: skip
        self.assertFalse(hoa.confirmed)
        self.assertIsNone(self.gate.subscribed("ha1", HA, hoa, 8, hoa.address, None, None, 0))
        self.assertTrue(hoa.confirmed)

    def test_resubscribe_answer_older_is_stale(self) -> None:
        """After a reconnect, an answer older than what we accepted is ``stale`` and the
        subscription keeps its sub_id and binding."""
        before = self.snapshot()
        self.assertIs(self.gate.subscribed("ha1", HA, self.sub, 99, HOME, COA2, 9, 40),
                      Refusal.STALE)  # fmt: skip
        self.assertEqual(self.snapshot(), before)
