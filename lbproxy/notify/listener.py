"""Where validated notifications go: the ``IBindingListener`` seam, and a recording fake.

The notification machinery decides *whether* to believe a peer; what a believed change does
to forwarding is the balancer's business.  This interface is the seam between the two: the
balancer's adapter (``adapter.TableListener``) implements it over the sticky table and
``Balancer.confirm``; tests use :class:`RecordingListener`.
"""

from __future__ import annotations

import attrs
from zope.interface import Interface, implementer

from lbproxy.notify.policy import Refusal


class IBindingListener(Interface):
    """Receives care-of address changes that passed every check (authenticated, entitled,
    fresh, and agreed to by :meth:`refusal_for`)."""

    def refusal_for(
        home: bytes,  # noqa: N805 - zope.interface methods have no self
        old_care_of: bytes | None,
        new_care_of: bytes,
        lifetime: int,
    ) -> tuple[Refusal, str] | None:
        """Why ``binding_changed`` with these arguments would be refused -- it would move
        or copy a binding that is not this terminal's -- or ``None``.  Asked before anything
        changes, so that a refusal leaves every state as it was; no side effects."""

    def binding_changed(
        home: bytes,  # noqa: N805 - zope.interface methods have no self
        old_care_of: bytes | None,
        new_care_of: bytes,
        seq: int,
        lifetime: int,
    ) -> None:
        """The terminal with home address ``home`` moved from ``old_care_of`` (``None``: not
        known to us) to ``new_care_of`` (the home address itself when it came home);
        ``lifetime`` is in seconds, 0 meaning the binding was deleted."""

    def binding_refreshed(
        home: bytes,  # noqa: N805 - zope.interface methods have no self
        care_of: bytes,
        seq: int,
        lifetime: int,
    ) -> None:
        """The terminal re-registered from the care-of address it was already known at (a
        newer sequence number, RFC 6275 §11.7.1): its binding lives ``lifetime`` seconds
        from now.  Nothing moves; what lasts as long as the binding is renewed."""


class ITerminalLiveness(Interface):
    """Whether a subscribed terminal still has anything the balancer keeps for it."""

    def live_until(
        home: bytes | None,  # noqa: N805 - zope.interface methods have no self
        addresses: tuple[bytes, ...],
        now: float,
    ) -> float | None:
        """Until when the terminal with home address ``home`` (if known) and these
        addresses (its care-of addresses) is known to be alive -- a live table binding
        under any of them, a confirmed return path -- or ``None`` when nothing is left."""


@attrs.frozen
class BindingChange:
    """One recorded ``binding_changed`` call."""

    home: bytes
    old_care_of: bytes | None
    new_care_of: bytes
    seq: int
    lifetime: int


@implementer(IBindingListener)
class RecordingListener:
    """A listener that records the changes it is given (for tests and benchmarks)."""

    def __init__(self) -> None:
        self.changes: list[BindingChange] = []
        self.refreshes: list[BindingChange] = []

    def refusal_for(
        self, home: bytes, old_care_of: bytes | None, new_care_of: bytes, lifetime: int
    ) -> tuple[Refusal, str] | None:
        """Nothing is refused."""
        return None

    def binding_changed(
        self, home: bytes, old_care_of: bytes | None, new_care_of: bytes, seq: int, lifetime: int
    ) -> None:
        """Record the change."""
        self.changes.append(BindingChange(home, old_care_of, new_care_of, seq, lifetime))

    def binding_refreshed(self, home: bytes, care_of: bytes, seq: int, lifetime: int) -> None:
        """Record the re-registration (``old_care_of`` is ``care_of``)."""
        self.refreshes.append(BindingChange(home, care_of, care_of, seq, lifetime))
