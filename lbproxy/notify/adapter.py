"""The balancer's ``IBindingListener``: a believed care-of address change, applied.

Claim 9 (Fig. 14B): when a terminal moves from CoA1 to CoA2, make an entry for CoA2 that
leads to CoA1's backend and leave CoA1's entry to live out its lifetime -- exactly
``StickyTable.rekey(Key("src", old), Key("src", new))``.  The change is also authenticated,
so the balancer may now send return traffic to the new address: ``ReturnPaths.confirm``
(`lbproxy.core.returnpaths`, the one record of confirmed care-of addresses).
A terminal keyed on its home address (HAO) keeps its entry; rekeying that entry onto itself
records the care-of address on it.  Likewise an entry that already exists under the notified
care-of address (the agent's answer to a Subscribe names the address the terminal is using) is
refreshed in place.
"""

from __future__ import annotations

from typing import Protocol

from zope.interface import implementer

from lbproxy.core.keys import Key
from lbproxy.core.table import Binding
from lbproxy.notify.listener import IBindingListener


class _Table(Protocol):
    def rekey(self, old: Key, new: Key, care_of: bytes | None = None) -> Binding | None: ...


class _ReturnPaths(Protocol):
    def confirm(self, home: bytes, care_of: bytes, lifetime: float | None = None) -> None: ...

    def unconfirm(self, home: bytes) -> bytes | None: ...


@implementer(IBindingListener)
class TableListener:
    """Applies changes to the sticky table and confirms them as return paths."""

    def __init__(self, table: _Table, return_paths: _ReturnPaths | None = None) -> None:
        self.table = table
        self.return_paths = return_paths
        self.applied = 0  # changes that moved or confirmed a table entry

    def binding_changed(
        self, home: bytes, old_care_of: bytes | None, new_care_of: bytes, seq: int, lifetime: int
    ) -> None:
        """Rekey the source-address entry, confirm the home-address entry, confirm the CoA.

        A deregistration (lifetime 0, or the care-of address is the home address: the
        terminal is at home, RFC 6275 section 9.5.1) ends the confirmation: replies go to
        the home address again; the old care-of address's entry is rekeyed to the home
        address, where the terminal's packets now come from, so it keeps its backend.
        """
        if lifetime == 0 or new_care_of == home:
            self._deregistered(home, old_care_of)
            return
        moved = None
        new_key = Key("src", new_care_of)
        if old_care_of is not None and old_care_of != new_care_of:
            moved = self.table.rekey(Key("src", old_care_of), new_key, care_of=new_care_of)
        if moved is None:
            # No move to make (the agent's first answer, or the old entry is gone): an
            # entry the terminal already has under this care-of address is refreshed.
            moved = self.table.rekey(new_key, new_key, care_of=new_care_of)
        hoa = self.table.rekey(Key("hoa", home), Key("hoa", home), care_of=new_care_of)
        if moved is not None or hoa is not None:
            self.applied += 1
        if self.return_paths is not None:
            self.return_paths.confirm(home, new_care_of, float(lifetime))

    def _deregistered(self, home: bytes, old_care_of: bytes | None) -> None:
        if (
            old_care_of is not None
            and old_care_of != home
            and self.table.rekey(Key("src", old_care_of), Key("src", home)) is not None
        ):
            self.applied += 1
        self.table.rekey(Key("hoa", home), Key("hoa", home))  # refreshed
        if self.return_paths is not None:
            self.return_paths.unconfirm(home)
