"""The notification protocol's vocabulary: AMP commands and errors (docs/notify.md).

Declarative, as AMP intends: each command lists its arguments, response and errors, and
nothing here knows who sends it or what the answer does.  Addresses travel as 16 raw octets;
an empty string means "none" (no care-of address known), and a sequence number of -1 means
"no binding known".  Who sends what: the balancer sends Subscribe, Unsubscribe and
GetSnapshot to an agent; the agent sends BindingChanged and BindingSnapshot to the balancer.

Numbers are :class:`Number` arguments: on the wire exactly AMP's ``Integer`` (decimal
ASCII), but parsing never raises -- anything that is not a plain decimal integer (``nan``,
``1.5``, ``1e400``, ``+7``, a 5,000-digit string) becomes :data:`MALFORMED`, which the
receiver refuses and counts like any other bad value instead of AMP logging an unhandled
error and closing the connection.
"""

from __future__ import annotations

import re
from typing import Any, Final

# ruff: noqa: N818 - the error names are the protocol's (docs/notify.md)
from twisted.protocols import amp

from lbproxy.notify.policy import Refusal

NO_SEQ = -1  # "no binding known"


class _Malformed:
    """The value of a :class:`Number` argument that was not a decimal integer."""

    def __repr__(self) -> str:
        return "MALFORMED"


MALFORMED: Final = _Malformed()
_DECIMAL = re.compile(rb"-?[0-9]{1,1000}")


class Number(amp.Argument):
    """``amp.Integer`` on the wire; parses to an ``int`` or :data:`MALFORMED`, never raises.

    Up to 1,000 digits are parsed (so a huge lifetime is refused as out of range, by
    value); anything longer or not decimal is :data:`MALFORMED`.
    """

    def fromString(self, inString: bytes) -> int | _Malformed:
        if _DECIMAL.fullmatch(inString) is None:
            return MALFORMED
        return int(inString)

    def toString(self, inObject: Any) -> bytes:
        return str(int(inObject)).encode("ascii")


class NotificationError(Exception):
    """Base of the errors a peer answers with; ``refusal`` says which."""

    refusal = Refusal.PROTOCOL


class NotEntitled(NotificationError):
    """The address is outside what the peer may speak for (or subscribe to)."""

    refusal = Refusal.NOT_ENTITLED


class Stale(NotificationError):
    """The sequence number is not newer than the last accepted one (RFC 6275 §9.5.1)."""

    refusal = Refusal.STALE


class TooManySubscriptions(NotificationError):
    """The subscription limit is reached."""

    refusal = Refusal.TOO_MANY_SUBSCRIPTIONS


class NotSubscribed(NotificationError):
    """Nobody subscribed to that address (or that subscription id) on this connection."""

    refusal = Refusal.NOT_SUBSCRIBED


class UnknownBinding(NotificationError):
    """The agent has no binding for that care-of address."""

    refusal = Refusal.UNKNOWN_BINDING


class BadArgument(NotificationError):
    """An address is not 16 octets, a kind is unknown, a number out of range."""

    refusal = Refusal.BAD_ARGUMENT


class OutOfOrder(NotificationError):
    """The message is not allowed in the connection's state (see machine.TRANSITIONS)."""

    refusal = Refusal.PROTOCOL


ERRORS: dict[type[Exception], bytes] = {
    NotEntitled: b"NOT_ENTITLED",
    Stale: b"STALE",
    TooManySubscriptions: b"TOO_MANY_SUBSCRIPTIONS",
    NotSubscribed: b"NOT_SUBSCRIBED",
    UnknownBinding: b"UNKNOWN_BINDING",
    BadArgument: b"BAD_ARGUMENT",
    OutOfOrder: b"OUT_OF_ORDER",
}

BY_REFUSAL: dict[Refusal, type[NotificationError]] = {
    e.refusal: e
    for e in (NotEntitled, Stale, TooManySubscriptions, NotSubscribed, UnknownBinding,
              BadArgument, OutOfOrder)
}
# Refusals without an error of their own answer with the nearest one (no new wire codes).
BY_REFUSAL.update({
    Refusal.NOT_OWNER: NotEntitled,
    Refusal.BAD_LIFETIME: BadArgument,
    Refusal.BAD_ADDRESS: BadArgument,
    Refusal.LOCAL_ADDRESS: BadArgument,
    Refusal.FORBIDDEN_ADDRESS: BadArgument,
})


def error_for(refusal: Refusal) -> NotificationError:
    """The AMP error to answer a refusal with."""
    return BY_REFUSAL.get(refusal, OutOfOrder)()


BINDING = [
    (b"home", amp.String()),
    (b"care_of", amp.String()),
    (b"seq", Number()),
    (b"lifetime", Number()),
]


class Subscribe(amp.Command):
    """Balancer -> agent: tell me about the terminal at ``address`` (a home or care-of
    address, ``kind`` "hoa" or "coa"), on each change and/or every ``interval`` seconds.
    The answer carries the agent's current binding, if any."""

    arguments = [
        (b"address", amp.String()),
        (b"kind", amp.Unicode()),
        (b"on_change", amp.Boolean()),
        (b"interval", Number()),
    ]
    response = [(b"sub_id", Number()), *BINDING]
    errors = ERRORS


class Unsubscribe(amp.Command):
    """Balancer -> agent: stop subscription ``sub_id``."""

    arguments = [(b"sub_id", Number())]
    errors = ERRORS


#: Bindings per GetSnapshot answer or BindingSnapshot call: an AMP value holds at most
#: 65,535 octets, and one binding takes under 100 of them in an ``AmpList``.
SNAPSHOT_CHUNK = 256
#: ``next`` of the last page of a GetSnapshot answer.
NO_MORE = -1


class GetSnapshot(amp.Command):
    """Balancer -> agent: the current bindings of everything this connection subscribed to
    (claim 12/13, "on request"), a page of at most :data:`SNAPSHOT_CHUNK` at a time:
    ``after`` is the ``next`` of the previous page (0, or absent, for the first); ``next``
    is :data:`NO_MORE` on the last page."""

    arguments = [(b"after", Number(optional=True))]
    response = [(b"bindings", amp.AmpList(BINDING)), (b"next", Number(optional=True))]
    errors = ERRORS


class BindingChanged(amp.Command):
    """Agent -> balancer: the terminal with home address ``home`` moved (claim 9's trigger)."""

    arguments = [
        (b"home", amp.String()),
        (b"old_care_of", amp.String()),
        (b"new_care_of", amp.String()),
        (b"seq", Number()),
        (b"lifetime", Number()),
    ]
    errors = ERRORS


class BindingSnapshot(amp.Command):
    """Agent -> balancer: current bindings, sent periodically (claim 12/13, "periodically")."""

    arguments = [(b"bindings", amp.AmpList(BINDING))]
    response = [(b"accepted", Number()), (b"refused", Number())]
    errors = ERRORS
