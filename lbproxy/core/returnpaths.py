"""Confirmed return paths: home address -> care-of address, the one source of truth.

Why this exists: a backend's reply to a terminal goes out from the virtual address, and
it may go to the terminal's *care-of* address (with a Type 2 Routing Header carrying the
home address, RFC 6275 section 6.4) only when that care-of address was confirmed by an
authenticated notification.  A Home Address Option is a claim anyone can make (RFC 6275
section 15): replying to an unconfirmed care-of address would let a forger reflect a
server's traffic at a third party.  Without a confirmation replies go towards the home
address, where the home agent tunnels them on.

Every reader asks this store: the general path (`lbproxy.core.balancer`), the fast
path (through the `routes` mapping it reads per batch), the operator's ``show`` (the
"confirmed" column) and persistence (saved and restored with the table, so a restart
keeps the return paths).

Theory of operation
-------------------
``routes`` maps home -> care-of (16 bytes each); a confirmation with a lifetime (the
binding lifetime the home agent granted) also has a deadline, kept in a heap: `expire`
pops what is due, so its cost follows the confirmations that end, not the store's size.
A confirmation refreshed since its deadline was pushed is skipped when popped (the
deadline no longer matches).  The store is bounded: at ``max_entries`` the oldest
confirmation goes first.  ``confirmed_addresses`` counts, per care-of address, the homes
that confirmed it, so the operator's view can say whether a source-address binding is a
confirmed one in O(1).
"""

from __future__ import annotations

import heapq
from collections.abc import Callable, Iterator

from twisted.internet.interfaces import IReactorTime

__all__ = ["ReturnPath", "ReturnPaths"]

ReturnPath = tuple[bytes, bytes, float | None]
"""(home, care-of, seconds left or None for no deadline), as `ReturnPaths.items` gives."""


class ReturnPaths:
    """Home address -> confirmed care-of address, with lifetimes and a bound."""

    def __init__(self, clock: IReactorTime, max_entries: int) -> None:
        if max_entries < 1:
            raise ValueError(f"max_entries must be >= 1, not {max_entries}")
        self.clock = clock
        self.max_entries = max_entries
        #: home -> care-of: what replies use.  Read-only for everyone but this class.
        self.routes: dict[bytes, bytes] = {}
        self._until: dict[bytes, float] = {}
        self._deadlines: list[tuple[float, bytes]] = []
        self._by_care_of: dict[bytes, int] = {}
        #: Confirmations that ended by their lifetime (not by a deregistration).
        self.expired = 0
        #: Told (home, care-of or None when it ends, lifetime) of every confirmation
        #: made, renewed or ended (a terminal's journey: lbproxy.core.journey).
        self.observer: Callable[[bytes, bytes | None, float | None], object] | None = None
        #: Told (home, care-of or None) whenever `routes` changes for a home: executors
        #: that keep their own copy (the XDP program's map) follow at once.
        self.listeners: list[Callable[[bytes, bytes | None], object]] = []

    def confirm(
        self, home: bytes, care_of: bytes, lifetime: float | None = None, now: float | None = None
    ) -> None:
        """An authenticated notification confirmed `care_of` for `home`.

        With a `lifetime` (seconds) the confirmation ends with it; None: until
        `unconfirm` (or until the bound pushes it out).
        """
        routes = self.routes
        if home not in routes and len(routes) >= self.max_entries:
            self.unconfirm(next(iter(routes)))
        self._set(home, care_of)
        if lifetime is None:
            self._until.pop(home, None)
        else:
            deadline = (self.clock.seconds() if now is None else now) + lifetime
            self._until[home] = deadline
            deadlines = self._deadlines
            heapq.heappush(deadlines, (deadline, home))
            if len(deadlines) > 2 * len(self._until) + 64:
                # Refreshed confirmations leave their old deadlines behind: a terminal
                # confirming again and again (Binding Updates as fast as it can send
                # them) must not grow the heap without bound.  Rebuilt in O(n), at most
                # once per n refreshes.
                self._deadlines = [(d, h) for h, d in self._until.items()]
                heapq.heapify(self._deadlines)
        if self.observer is not None:  # the terminal's journey
            self.observer(home, care_of, lifetime)

    def unconfirm(self, home: bytes) -> bytes | None:
        """The binding ended (deregistration): replies go towards the home address again.
        Returns the care-of address that was confirmed, if any."""
        care_of = self.routes.pop(home, None)
        self._until.pop(home, None)
        if care_of is not None:
            self._uncount(care_of)
            for listener in self.listeners:
                listener(home, None)
            if self.observer is not None:  # the terminal's journey
                self.observer(home, None, None)
        return care_of

    def care_of(self, home: bytes) -> bytes | None:
        """The confirmed care-of address of `home`, or None."""
        return self.routes.get(home)

    def is_confirmed_care_of(self, address: bytes) -> bool:
        """Whether some home address has `address` as its confirmed care-of address."""
        return address in self._by_care_of

    def expire(self, now: float | None = None) -> int:
        """End the confirmations whose lifetime ran out; returns how many."""
        if now is None:
            now = self.clock.seconds()
        deadlines = self._deadlines
        ended = 0
        while deadlines and deadlines[0][0] <= now:
            deadline, home = heapq.heappop(deadlines)
            if self._until.get(home) == deadline:  # not refreshed since
                self.unconfirm(home)
                ended += 1
        self.expired += ended
        return ended

    def items(self, now: float | None = None) -> Iterator[ReturnPath]:
        """Every live confirmation as (home, care-of, seconds left or None)."""
        if now is None:
            now = self.clock.seconds()
        for home, care_of in list(self.routes.items()):
            until = self._until.get(home)
            if until is None:
                yield home, care_of, None
            elif until > now:
                yield home, care_of, until - now

    def __len__(self) -> int:
        return len(self.routes)

    def __repr__(self) -> str:
        return f"<ReturnPaths {len(self)}/{self.max_entries}>"

    def _set(self, home: bytes, care_of: bytes) -> None:
        old = self.routes.get(home)
        if old == care_of:
            return
        if old is not None:
            self._uncount(old)
        self.routes[home] = care_of
        self._by_care_of[care_of] = self._by_care_of.get(care_of, 0) + 1
        for listener in self.listeners:
            listener(home, care_of)

    def _uncount(self, care_of: bytes) -> None:
        n = self._by_care_of[care_of] - 1
        if n:
            self._by_care_of[care_of] = n
        else:
            del self._by_care_of[care_of]
