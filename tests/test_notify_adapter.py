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
        """CoA1 -> CoA2: the CoA2 entry leads to CoA1's backend, CoA1's entry stays, the
        home address's return path is CoA2."""
        self.table.insert(Key("src", COA1), self.backend)
        self.listener.binding_changed(HOME, COA1, COA2, 2, 40)
        new = self.table.get(Key("src", COA2))
        assert new is not None
        self.assertEqual(new.backend, self.backend)
        self.assertEqual(new.care_of, COA2)
        self.assertTrue(self.paths.is_confirmed_care_of(COA2))
        self.assertIsNotNone(self.table.get(Key("src", COA1)))
        self.assertEqual(dict(self.paths.routes), {HOME: COA2})
        self.assertEqual(self.listener.applied, 1)

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

