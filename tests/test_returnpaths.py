"""Tests for lbproxy.core.returnpaths: what its listeners are told.

The XDP executor keeps a copy of the confirmed care-of addresses in the program's map
and follows `ReturnPaths.listeners`; a change they miss would send replies on to a
care-of address the terminal left (docs/xdp.md).
"""

from __future__ import annotations

from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase

from lbproxy.core.returnpaths import ReturnPaths

HOME, OTHER = b"h" * 16, b"o" * 16
COA1, COA2, COA3 = b"1" * 16, b"2" * 16, b"3" * 16


class ListenerTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.clock = Clock()
        self.paths = ReturnPaths(self.clock, max_entries=2)
        self.told: list[tuple[bytes, bytes | None]] = []
        self.paths.listeners.append(lambda home, care_of: self.told.append((home, care_of)))

    def test_every_change_of_routes_is_told_once(self) -> None:
        """Confirmed, moved, renewed (not told: routes did not change), ended by the
        home agent and by its lifetime: the listener's copy is `routes` throughout."""
        paths, copy = self.paths, dict[bytes, bytes]()
        paths.confirm(HOME, COA1, 10.0)
        paths.confirm(HOME, COA2, 10.0)
        paths.confirm(HOME, COA2, 20.0)  # renewed: the route is the same
        paths.unconfirm(HOME)
        paths.unconfirm(HOME)  # nothing confirmed any more: nothing to tell
        paths.confirm(OTHER, COA1, 5.0)
        self.clock.advance(6)
        self.assertEqual(paths.expire(), 1)
        self.assertEqual(self.told, [(HOME, COA1), (HOME, COA2), (HOME, None),
                                     (OTHER, COA1), (OTHER, None)])
        for home, care_of in self.told:
            if care_of is None:
                del copy[home]
            else:
                copy[home] = care_of
        self.assertEqual(copy, paths.routes)

    def test_the_bound_pushing_one_out_is_told(self) -> None:
        """At the bound the oldest confirmation goes first: its end is told too."""
        self.paths.confirm(HOME, COA1)
        self.paths.confirm(OTHER, COA2)
        self.paths.confirm(b"t" * 16, COA3)
        self.assertEqual(self.told[-2:], [(HOME, None), (b"t" * 16, COA3)])
        self.assertNotIn(HOME, self.paths.routes)
