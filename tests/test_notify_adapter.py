"""Tests for lbproxy.notify.adapter: a believed change rekeys the real StickyTable (claim 9)
and confirms the care-of address on the balancer."""

from __future__ import annotations

import ipaddress

from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase
from zope.interface.verify import verifyObject

from lbproxy.core.keys import Key
from lbproxy.core.selection import Backend
from lbproxy.core.table import StickyTable
from lbproxy.notify.adapter import TableListener
from lbproxy.notify.listener import IBindingListener


def a(text: str) -> bytes:
    return ipaddress.IPv6Address(text).packed


HOME = a("2001:db8:1::16")
COA1 = a("2001:db8:a::16")
COA2 = a("2001:db8:b::16")


class FakeBalancer:
    """Records confirm() calls."""

    def __init__(self) -> None:
        self.confirmed: list[tuple[bytes, bytes]] = []
        self.lifetimes: list[float | None] = []
        self.unconfirmed: list[bytes] = []

    def confirm(self, home: bytes, care_of: bytes, lifetime: float | None = None) -> None:
        self.confirmed.append((home, care_of))
        self.lifetimes.append(lifetime)

    def unconfirm(self, home: bytes) -> None:
        self.unconfirmed.append(home)


class TableListenerTests(SynchronousTestCase):
    """binding_changed -> table.rekey + balancer.confirm."""

    def setUp(self) -> None:
        self.clock = Clock()
        self.table = StickyTable(self.clock, lifetime=30.0, max_entries=100)
        self.backend = Backend("srv1", ipaddress.IPv6Address("2001:db8:100::1"))
        self.balancer = FakeBalancer()
        self.listener = TableListener(self.table, self.balancer)

    def test_interface(self) -> None:
        """TableListener provides IBindingListener."""
        verifyObject(IBindingListener, self.listener)

    def test_move_copies_backend_keeps_old(self) -> None:
        """CoA1 -> CoA2: the CoA2 entry leads to CoA1's backend, CoA1's entry stays, the
        binding is confirmed, and the balancer hears confirm(home, CoA2)."""
        self.table.insert(Key("src", COA1), self.backend)
        self.listener.binding_changed(HOME, COA1, COA2, 2, 40)
        new = self.table.get(Key("src", COA2))
        assert new is not None
        self.assertEqual(new.backend, self.backend)
        self.assertTrue(new.confirmed)
        self.assertEqual(new.care_of, COA2)
        self.assertIsNotNone(self.table.get(Key("src", COA1)))
        self.assertEqual(self.balancer.confirmed, [(HOME, COA2)])
        self.assertEqual(self.listener.applied, 1)

    def test_hoa_entry_confirmed(self) -> None:
        """A terminal keyed on its home address gets the confirmed CoA recorded."""
        self.table.insert(Key("hoa", HOME), self.backend)
        self.listener.binding_changed(HOME, None, COA1, 1, 40)
        b = self.table.get(Key("hoa", HOME))
        assert b is not None
        self.assertEqual((b.care_of, b.confirmed), (COA1, True))

    def test_unknown_terminal(self) -> None:
        """No entry for the old CoA: nothing is created, but the CoA is still confirmed."""
        self.listener.binding_changed(HOME, COA1, COA2, 2, 40)
        self.assertEqual(len(self.table), 0)
        self.assertEqual(self.listener.applied, 0)
        self.assertEqual(self.balancer.confirmed, [(HOME, COA2)])

    def test_first_answer_confirms_existing_entry(self) -> None:
        """The agent's first answer names the CoA already in use (old == new): that
        source-address entry is marked confirmed in place, no entry is added."""
        self.table.insert(Key("src", COA1), self.backend)
        self.listener.binding_changed(HOME, COA1, COA1, 1, 40)
        b = self.table.get(Key("src", COA1))
        assert b is not None
        self.assertEqual((b.care_of, b.confirmed, len(self.table)), (COA1, True, 1))
        self.assertEqual(self.listener.applied, 1)
        self.assertEqual(self.balancer.confirmed, [(HOME, COA1)])

    def test_lifetime_passed_on(self) -> None:
        """The binding's lifetime bounds the balancer's confirmation."""
        self.listener.binding_changed(HOME, None, COA1, 1, 40)
        self.assertEqual(self.balancer.lifetimes, [40.0])

    def test_deregistration_at_home(self) -> None:
        """Lifetime 0 or CoA == HoA (RFC 6275 9.5.1): the confirmation ends, the home
        address entry is no longer confirmed, and the old CoA's backend follows the
        terminal home (its packets now come from the home address)."""
        self.table.insert(Key("src", COA1), self.backend)
        self.table.insert(Key("hoa", HOME), self.backend)
        self.listener.binding_changed(HOME, None, COA1, 1, 40)
        self.listener.binding_changed(HOME, COA1, HOME, 2, 0)
        self.assertEqual(self.balancer.unconfirmed, [HOME])
        hoa = self.table.get(Key("hoa", HOME))
        assert hoa is not None
        self.assertFalse(hoa.confirmed)
        home_src = self.table.get(Key("src", HOME))
        assert home_src is not None
        self.assertEqual(home_src.backend, self.backend)
        self.assertFalse(home_src.confirmed)
        self.listener.binding_changed(HOME, COA1, COA2, 3, 0)  # lifetime 0 alone
        self.assertEqual(self.balancer.unconfirmed, [HOME, HOME])
        self.assertIsNone(self.table.get(Key("src", COA2)))

