"""Tests for lbproxy.notify.adapter: a believed change rekeys the real StickyTable (claim 9)
and confirms the care-of address as the return path (the real ReturnPaths)."""

from __future__ import annotations

import ipaddress

from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase
from zope.interface.verify import verifyObject

from lbproxy.core.keys import Key
from lbproxy.core.returnpaths import ReturnPaths
from lbproxy.core.selection import Backend
from lbproxy.core.table import StickyTable
from lbproxy.notify.adapter import TableListener
from lbproxy.notify.listener import IBindingListener
from lbproxy.notify.policy import Refusal


def a(text: str) -> bytes:
    return ipaddress.IPv6Address(text).packed


HOME = a("2001:db8:1::16")
COA1 = a("2001:db8:a::16")
COA2 = a("2001:db8:b::16")


class TableListenerTests(SynchronousTestCase):
    """binding_changed -> table.rekey + ReturnPaths.confirm."""

    def setUp(self) -> None:
        self.clock = Clock()
        self.table = StickyTable(self.clock, lifetime=30.0, max_entries=100)
        self.backend = Backend("srv1", ipaddress.IPv6Address("2001:db8:100::1"))
        self.paths = ReturnPaths(self.clock, 100)
        self.listener = TableListener(self.table, self.paths)

    def test_interface(self) -> None:
        """TableListener provides IBindingListener."""
        verifyObject(IBindingListener, self.listener)

    def test_move_copies_backend_keeps_old(self) -> None:
        """CoA1 (confirmed by the agent's first answer) -> CoA2: the CoA2 entry leads to
        CoA1's backend, CoA1's entry stays, the home address's return path is CoA2."""
        self.table.insert(Key("src", COA1), self.backend)
        self.listener.binding_changed(HOME, COA1, COA1, 1, 40)
        self.listener.binding_changed(HOME, COA1, COA2, 2, 40)
        new = self.table.get(Key("src", COA2))
        assert new is not None
        self.assertEqual(new.backend, self.backend)
        self.assertEqual(new.care_of, COA2)
        self.assertTrue(self.paths.is_confirmed_care_of(COA2))
        self.assertIsNotNone(self.table.get(Key("src", COA1)))
        self.assertEqual(dict(self.paths.routes), {HOME: COA2})
        self.assertEqual(self.listener.applied, 2)

    def test_hoa_entry_confirmed(self) -> None:
        """A terminal keyed on its home address gets the confirmed CoA recorded."""
        self.table.insert(Key("hoa", HOME), self.backend)
        self.listener.binding_changed(HOME, None, COA1, 1, 40)
        b = self.table.get(Key("hoa", HOME))
        assert b is not None
        self.assertEqual((b.care_of, self.paths.care_of(HOME)), (COA1, COA1))

    def test_unknown_terminal(self) -> None:
        """No entry for the old CoA: nothing is created, but the CoA is still confirmed."""
        self.listener.binding_changed(HOME, COA1, COA2, 2, 40)
        self.assertEqual(len(self.table), 0)
        self.assertEqual(self.listener.applied, 0)
        self.assertEqual(dict(self.paths.routes), {HOME: COA2})

    def test_first_answer_confirms_existing_entry(self) -> None:
        """The agent's first answer names the CoA already in use (old == new): that
        source-address entry is refreshed in place and confirmed, no entry is added."""
        self.table.insert(Key("src", COA1), self.backend)
        self.listener.binding_changed(HOME, COA1, COA1, 1, 40)
        b = self.table.get(Key("src", COA1))
        assert b is not None
        self.assertEqual((b.care_of, len(self.table)), (COA1, 1))
        self.assertTrue(self.paths.is_confirmed_care_of(COA1))
        self.assertEqual(self.listener.applied, 1)
        self.assertEqual(dict(self.paths.routes), {HOME: COA1})

    def test_lifetime_passed_on(self) -> None:
        """The binding's lifetime bounds the confirmation: it ends 40 s later."""
        self.listener.binding_changed(HOME, None, COA1, 1, 40)
        self.assertEqual(list(self.paths.items()), [(HOME, COA1, 40.0)])
        self.clock.advance(39)
        self.assertEqual(self.paths.expire(), 0)
        self.clock.advance(1)
        self.assertEqual(self.paths.expire(), 1)
        self.assertIsNone(self.paths.care_of(HOME))

    def test_deregistration_at_home(self) -> None:
        """Lifetime 0 or CoA == HoA (RFC 6275 9.5.1): the confirmation ends, the home
        address entry is no longer confirmed, and the old CoA's backend follows the
        terminal home (its packets now come from the home address)."""
        self.table.insert(Key("src", COA1), self.backend)
        self.table.insert(Key("hoa", HOME), self.backend)
        self.listener.binding_changed(HOME, None, COA1, 1, 40)
        self.listener.binding_changed(HOME, COA1, HOME, 2, 0)
        self.assertIsNone(self.paths.care_of(HOME))
        self.assertFalse(self.paths.is_confirmed_care_of(COA1))
        self.assertIsNotNone(self.table.get(Key("hoa", HOME)))
        home_src = self.table.get(Key("src", HOME))
        assert home_src is not None
        self.assertEqual(home_src.backend, self.backend)
        self.listener.binding_changed(HOME, None, COA2, 3, 40)
        self.listener.binding_changed(HOME, COA2, COA2, 4, 0)  # lifetime 0 alone
        self.assertIsNone(self.paths.care_of(HOME))
        self.assertIsNone(self.table.get(Key("src", COA2)))



OTHER = a("2001:db8:c::99")  # another client's address


class EntitlementTests(SynchronousTestCase):
    """A change for one home moves only that home's source-address bindings."""

    def setUp(self) -> None:
        self.clock = Clock()
        self.table = StickyTable(self.clock, lifetime=30.0, max_entries=100)
        self.b1 = Backend("srv1", ipaddress.IPv6Address("2001:db8:100::1"))
        self.b2 = Backend("srv2", ipaddress.IPv6Address("2001:db8:100::2"))
        self.paths = ReturnPaths(self.clock, 100)
        self.listener = TableListener(self.table, self.paths)
        self.table.insert(Key("src", COA1), self.b1)
        self.listener.binding_changed(HOME, COA1, COA1, 1, 40)  # HOME confirmed at CoA1
        self.table.insert(Key("src", OTHER), self.b2)

    def backend(self, address: bytes) -> Backend | None:
        b = self.table.get(Key("src", address))
        return None if b is None else b.backend

    def test_repointing_another_binding_refused(self) -> None:
        """CoA1 (b1) -> OTHER (another client's, b2): refused ``not_owner`` by
        ``refusal_for`` and by ``binding_changed`` itself; nothing changes."""
        got = self.listener.refusal_for(HOME, COA1, OTHER, 40)
        assert got is not None
        self.assertEqual(got[0], Refusal.NOT_OWNER)
        self.listener.binding_changed(HOME, COA1, OTHER, 2, 40)
        self.assertEqual(self.backend(OTHER), self.b2)
        self.assertEqual(self.paths.care_of(HOME), COA1)
        self.assertEqual(self.listener.refused, 1)

    def test_old_not_this_homes_not_copied(self) -> None:
        """Told that HOME came from OTHER: OTHER's backend is not copied (nor is its entry
        touched); HOME's own confirmed CoA1 is used instead.  Without one, the new address
        gets no entry until its first packet."""
        other = self.table.get(Key("src", OTHER))
        assert other is not None
        expires = other.expires
        self.clock.advance(5)
        self.assertIsNone(self.listener.refusal_for(HOME, OTHER, COA2, 40))
        self.listener.binding_changed(HOME, OTHER, COA2, 2, 40)
        self.assertEqual(self.backend(COA2), self.b1)
        self.assertEqual(other.expires, expires)
        self.assertEqual(self.listener.not_copied, 1)
        self.assertEqual(self.paths.care_of(HOME), COA2)
        stranger = a("2001:db8:1::99")  # no confirmed care-of address
        self.listener.binding_changed(stranger, OTHER, a("2001:db8:e::1"), 1, 40)
        self.assertIsNone(self.backend(a("2001:db8:e::1")))
        self.assertEqual((other.backend, other.expires), (self.b2, expires))

    def test_own_move_back_allowed(self) -> None:
        """CoA1 -> CoA2 -> CoA1 (T235): CoA2 is made with CoA1's backend; moving back
        finds CoA1's entry on that same backend and refreshes it."""
        self.listener.binding_changed(HOME, COA1, COA2, 2, 40)
        self.assertEqual(self.backend(COA2), self.b1)
        self.assertIsNone(self.listener.refusal_for(HOME, COA2, COA1, 40))
        self.listener.binding_changed(HOME, COA2, COA1, 3, 40)
        self.assertEqual((self.backend(COA1), self.paths.care_of(HOME)), (self.b1, COA1))

    def test_made_by_us_may_be_repointed(self) -> None:
        """An entry the listener made for HOME (CoA2) stays HOME's: after CoA2's backend
        changed behind it, moving back to CoA2 from an entry on another backend re-points
        it.  An entry made for HOME by the scheduler instead is not re-pointed."""
        self.listener.binding_changed(HOME, COA1, COA2, 2, 40)
        third = a("2001:db8:d::16")
        self.table.insert(Key("src", third), self.b2)  # HOME's packets from a third CoA
        self.listener.binding_changed(HOME, COA2, third, 3, 40)  # same backend? no: b1 -> b2
        self.assertEqual(self.listener.refused, 1)  # third is not HOME's: refused
        # Now a binding made by the listener for HOME: CoA2.  Point it elsewhere, then
        # move back to it from CoA1 (b1).
        coa2 = self.table.get(Key("src", COA2))
        assert coa2 is not None
        self.table.rekey(Key("src", OTHER), Key("src", COA2))  # CoA2 -> b2 (same object)
        self.assertEqual(self.backend(COA2), self.b2)
        self.listener.binding_changed(HOME, COA2, COA1, 4, 40)
        self.assertIsNone(self.listener.refusal_for(HOME, COA1, COA2, 40))
        self.listener.binding_changed(HOME, COA1, COA2, 5, 40)
        self.assertEqual(self.backend(COA2), self.b1)

    def test_ownership_ends_with_the_binding(self) -> None:
        """Once the made entry expires and the address is bound again (by anyone), it is
        no longer HOME's to re-point."""
        self.listener.binding_changed(HOME, COA1, COA2, 2, 40)
        self.listener.binding_changed(HOME, COA2, COA1, 3, 40)
        self.clock.advance(31)
        self.table.expire()
        self.table.insert(Key("src", COA1), self.b1)
        self.table.insert(Key("src", COA2), self.b2)  # somebody else's now
        got = self.listener.refusal_for(HOME, COA1, COA2, 40)
        assert got is not None
        self.assertEqual(got[0], Refusal.NOT_OWNER)

    def test_same_backend_refreshed(self) -> None:
        """An existing entry already on the right backend (the terminal's packet from the
        new address arrived first) is only refreshed: no refusal."""
        self.table.insert(Key("src", COA2), self.b1)
        self.assertIsNone(self.listener.refusal_for(HOME, COA1, COA2, 40))
        self.listener.binding_changed(HOME, COA1, COA2, 2, 40)
        self.assertEqual((self.backend(COA2), self.paths.care_of(HOME)), (self.b1, COA2))

    def test_deregistration_copies_own_only(self) -> None:
        """Coming home copies the confirmed CoA's backend to the home address's entry, and
        never another client's."""
        self.listener.binding_changed(HOME, OTHER, HOME, 2, 0)
        self.assertEqual(self.backend(HOME), self.b1)
        self.assertIsNone(self.paths.care_of(HOME))

    def test_owned_record_bounded(self) -> None:
        """The record of made entries keeps at most ``max_owned``."""
        listener = TableListener(self.table, self.paths, max_owned=3)
        for i in range(10):
            coa = a(f"2001:db8:e::{i + 1:x}")
            listener.binding_changed(HOME, COA1, coa, 10 + i, 40)
            listener.binding_changed(HOME, coa, COA1, 30 + i, 40)
        self.assertLessEqual(len(listener._owned), 3)
