"""The balancer's ``IBindingListener``: a believed care-of address change, applied.

Claim 9 (Fig. 14B): when a terminal moves from CoA1 to CoA2, make an entry for CoA2 that
leads to CoA1's backend and leave CoA1's entry to live out its lifetime -- exactly
``StickyTable.rekey(Key("src", old), Key("src", new))``.  The change is also authenticated,
so the balancer may now send return traffic to the new address: ``Balancer.confirm``.
A terminal keyed on its home address (HAO) keeps its entry; rekeying that entry onto itself
records the confirmed care-of address on it.
"""

from __future__ import annotations

from typing import Protocol

from zope.interface import implementer

from lbproxy.keys import Key
from lbproxy.notify.listener import IBindingListener
from lbproxy.table import Binding


class _Table(Protocol):
    def rekey(
        self, old: Key, new: Key, care_of: bytes | None = None, confirmed: bool = False
    ) -> Binding | None: ...


class _Balancer(Protocol):
    def confirm(self, home: bytes, care_of: bytes) -> None: ...


@implementer(IBindingListener)
class TableListener:
    """Applies changes to the sticky table and confirms them on the balancer."""

    def __init__(self, table: _Table, balancer: _Balancer | None = None) -> None:
        self.table = table
        self.balancer = balancer
        self.applied = 0  # changes that moved or confirmed a table entry

    def binding_changed(
        self, home: bytes, old_care_of: bytes | None, new_care_of: bytes, seq: int, lifetime: int
    ) -> None:
        """Rekey the source-address entry, confirm the home-address entry, confirm the CoA."""
        moved = None
        if old_care_of is not None and old_care_of != new_care_of:
            moved = self.table.rekey(
                Key("src", old_care_of), Key("src", new_care_of), care_of=new_care_of,
                confirmed=True,
            )
        hoa = self.table.rekey(
            Key("hoa", home), Key("hoa", home), care_of=new_care_of, confirmed=True
        )
        if moved is not None or hoa is not None:
            self.applied += 1
        if self.balancer is not None:
            self.balancer.confirm(home, new_care_of)
