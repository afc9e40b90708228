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

**Entitlement to source-address bindings.**  A peer is entitled to a home address, but the
table is keyed by *source* addresses, and a care-of address is only the peer's claim.  So a
change for home H moves only H's own source-address bindings:

* the backend is **copied from** the old care-of address's binding only if that address is
  H's: H's confirmed care-of address (``ReturnPaths.care_of(H)``), or a binding this
  listener made or confirmed for H that is still the same binding (not expired and made
  again), or the home address itself.  An old address that is not H's is passed over for
  H's confirmed care-of address; if there is none, nothing is copied (the new address is
  scheduled on its first packet, as for any new terminal) and the other binding is not
  touched;
* an existing live binding under the new address is **re-pointed** to that backend only if
  this listener made it for H (same binding object), or it is the home address's own;
  otherwise, if re-pointing would change its backend, the change is refused ``not_owner``
  (:meth:`refusal_for`, asked by the gate before anything changes).  A binding that already
  has the right backend is only refreshed (nothing moves).

Hence a terminal agent entitled to its own home address can no longer move another
client's source-address binding onto its own backend by naming that client's address as its
new care-of address, nor copy another client's backend by naming it as its old one (the gate
gives the balancer's own record of the old address, never the agent's).
"""

from __future__ import annotations

import ipaddress
from collections import OrderedDict
from typing import Protocol

import attrs
from twisted.logger import Logger
from zope.interface import implementer

from lbproxy.core.journey import Journeys
from lbproxy.core.keys import Key
from lbproxy.core.table import Binding
from lbproxy.notify.listener import IBindingListener, ITerminalLiveness
from lbproxy.notify.policy import Refusal

log = Logger()


class _Table(Protocol):
    def rekey(self, old: Key, new: Key, care_of: bytes | None = None) -> Binding | None: ...

    def get(self, key: Key, now: float | None = None) -> Binding | None: ...


class _ReturnPaths(Protocol):
    def confirm(self, home: bytes, care_of: bytes, lifetime: float | None = None) -> None: ...

    def unconfirm(self, home: bytes) -> bytes | None: ...

    def care_of(self, home: bytes) -> bytes | None: ...


@attrs.frozen
class _Plan:
    """What :meth:`TableListener.binding_changed` will do: copy from ``source`` (a care-of
    address whose binding is the home's) to ``target`` (the new address, or the home address
    when deregistering)."""

    source: bytes | None
    target: bytes
    deregistering: bool


@implementer(IBindingListener, ITerminalLiveness)
class TableListener:
    """Applies changes to the sticky table and confirms them as return paths."""

    def __init__(
        self,
        table: _Table,
        return_paths: _ReturnPaths | None = None,
        max_owned: int = 100_000,
        journeys: Journeys | None = None,
    ) -> None:
        self.table = table
        self.return_paths = return_paths
        #: The terminals' journeys, told of every change applied (lbproxy.core.journey).
        self.journeys = journeys
        self.applied = 0  # changes that moved or confirmed a table entry
        self.refused = 0  # binding_changed calls refused by the entitlement rule
        self.not_copied = 0  # given old care-of bindings that were not the home's: passed over
        self.refreshed = 0  # confirmations renewed by re-registrations
        # care-of address -> (home, the binding, made by us): the source-address bindings
        # this listener made (True) or confirmed in place (False) for a home; valid while
        # the table still holds that very binding.  Oldest first out.
        self._owned: OrderedDict[bytes, tuple[bytes, Binding, bool]] = OrderedDict()
        self.max_owned = max_owned

    # -- entitlement to source-address bindings -----------------------------------------

    def _owner(self, address: bytes) -> tuple[bytes, bool] | None:
        """(home, made by us) of the live binding under ``address``, if we recorded it."""
        entry = self._owned.get(address)
        if entry is None:
            return None
        home, binding, made = entry
        if self.table.get(Key("src", address)) is not binding:
            del self._owned[address]  # expired, removed or made again since
            return None
        return home, made

    def _remember(self, home: bytes, address: bytes, binding: Binding, made: bool) -> None:
        current = self._owner(address)
        if current is not None and current[0] != home and current[1]:
            return  # another home's binding, made by us for it: it stays theirs
        if current is not None and current[0] == home:
            made = made or current[1]
        self._owned[address] = (home, binding, made)
        self._owned.move_to_end(address)
        while len(self._owned) > self.max_owned:
            self._owned.popitem(last=False)

    def _may_copy(self, home: bytes, address: bytes) -> bool:
        """Whether the binding under ``address`` is ``home``'s, to copy its backend."""
        if address == home:
            return True
        if self.return_paths is not None and self.return_paths.care_of(home) == address:
            return True
        owner = self._owner(address)
        return owner is not None and owner[0] == home

    def _may_repoint(self, home: bytes, address: bytes) -> bool:
        """Whether the binding under ``address`` is ``home``'s, to change its backend."""
        if address == home:
            return True
        owner = self._owner(address)
        return owner is not None and owner == (home, True)

    def _plan(
        self, home: bytes, old_care_of: bytes | None, new_care_of: bytes, lifetime: int
    ) -> _Plan | tuple[Refusal, str]:
        deregistering = lifetime == 0 or new_care_of == home
        target = home if deregistering else new_care_of
        # The previous address: the one we were given, else (or if that is not the
        # home's) the care-of address we confirmed last for it.
        candidates = [old_care_of]
        if self.return_paths is not None:
            candidates.append(self.return_paths.care_of(home))
        source_binding = None
        source = None
        for old in candidates:
            if old is None or old == target:
                continue
            binding = self.table.get(Key("src", old))
            if binding is not None and self._may_copy(home, old):
                source, source_binding = old, binding
                break
        existing = self.table.get(Key("src", target))
        if (
            existing is not None
            and source_binding is not None
            and existing.backend != source_binding.backend
            and not self._may_repoint(home, target)
        ):
            return (
                Refusal.NOT_OWNER,
                f"{_text(target)} is bound to {existing.backend.name} for another terminal;"
                f" home {_text(home)} may not move it to {source_binding.backend.name}",
            )
        return _Plan(source, target, deregistering)

    def refusal_for(
        self, home: bytes, old_care_of: bytes | None, new_care_of: bytes, lifetime: int
    ) -> tuple[Refusal, str] | None:
        """``not_owner`` when the change would re-point another terminal's binding."""
        plan = self._plan(home, old_care_of, new_care_of, lifetime)
        return None if isinstance(plan, _Plan) else plan

    # -- applying -----------------------------------------------------------------------

    def binding_changed(
        self, home: bytes, old_care_of: bytes | None, new_care_of: bytes, seq: int, lifetime: int
    ) -> None:
        """Rekey the source-address entry, confirm the home-address entry, confirm the CoA.

        A deregistration (lifetime 0, or the care-of address is the home address: the
        terminal is at home, RFC 6275 section 9.5.1) ends the confirmation: replies go to
        the home address again; the old care-of address's entry is rekeyed to the home
        address, where the terminal's packets now come from, so it keeps its backend.
        Only the home's own source-address bindings are copied or moved (module docstring);
        a change that would move another terminal's is refused here too (counted in
        ``refused``), whoever calls.
        """
        plan = self._plan(home, old_care_of, new_care_of, lifetime)
        if not isinstance(plan, _Plan):
            self.refused += 1
            log.warn("notify: not applied ({reason}): {detail}", reason=plan[0].value,
                     detail=plan[1])  # fmt: skip
            return
        if (
            old_care_of is not None
            and old_care_of not in (plan.target, plan.source)
            and self.table.get(Key("src", old_care_of)) is not None
        ):
            self.not_copied += 1  # a binding that is not the home's: passed over
        if plan.deregistering:
            if self.journeys is not None:  # the journey: the terminal is at home
                self.journeys.notified(home, old_care_of, new_care_of, 0)
            self._deregistered(home, plan.source)
            return
        moved = None
        new_key = Key("src", new_care_of)
        if plan.source is not None:
            existed = self.table.get(new_key) is not None
            moved = self.table.rekey(Key("src", plan.source), new_key, care_of=new_care_of)
            if moved is not None:
                self._remember(home, new_care_of, moved, made=not existed)
        if moved is None:
            # No move to make (the agent's first answer, or the old entry is gone or not
            # this home's): an entry already under this care-of address is refreshed in
            # place; it keeps its backend.
            moved = self.table.rekey(new_key, new_key, care_of=new_care_of)
            if moved is not None:
                self._remember(home, new_care_of, moved, made=False)
        hoa = self.table.rekey(Key("hoa", home), Key("hoa", home), care_of=new_care_of)
        if moved is not None or hoa is not None:
            self.applied += 1
        if self.journeys is not None:  # the journey: the move, before its confirmation
            self.journeys.notified(home, plan.source or old_care_of, new_care_of, lifetime,
                                   moved)
        if self.return_paths is not None:
            self.return_paths.confirm(home, new_care_of, float(lifetime))

    def binding_refreshed(self, home: bytes, care_of: bytes, seq: int, lifetime: int) -> None:
        """A re-registration from the care-of address already accepted for ``home``: the
        confirmation lasts ``lifetime`` seconds from now (replies keep going to the care-of
        address with a Type 2 Routing Header).  Only a confirmation of that same address
        (or one that ran out) is renewed -- never one another notification moved since;
        the table's bindings live by traffic (claim 10) and are left alone."""
        if self.return_paths is None or lifetime <= 0 or care_of == home:
            return
        if self.return_paths.care_of(home) in (None, care_of):
            self.return_paths.confirm(home, care_of, float(lifetime))
            self.refreshed += 1

    def live_until(
        self, home: bytes | None, addresses: tuple[bytes, ...], now: float
    ) -> float | None:
        """The latest expiry of a live binding under ``home`` or ``addresses`` (aliases
        included: one lookup each, nothing refreshed); ``now`` if only a confirmed return
        path is left; ``None`` when nothing is."""
        until: float | None = None
        for address in (home, *addresses) if home is not None else addresses:
            binding = self.table.get(Key("src", address))
            if binding is not None and (until is None or binding.expires > until):
                until = binding.expires
        if until is None and home is not None and self.return_paths is not None \
                and self.return_paths.care_of(home) is not None:  # fmt: skip
            until = now
        return until

    def _deregistered(self, home: bytes, source: bytes | None) -> None:
        if (
            source is not None
            and self.table.rekey(Key("src", source), Key("src", home)) is not None
        ):
            self.applied += 1
        self.table.rekey(Key("hoa", home), Key("hoa", home))  # refreshed
        if self.return_paths is not None:
            self.return_paths.unconfirm(home)


def _text(address: bytes) -> str:
    return str(ipaddress.IPv6Address(address))
