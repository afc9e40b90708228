"""What a notification must satisfy before it may move traffic: freshness and entitlement.

A notification moves a terminal's traffic to another address, so the balancer believes a
peer only about the home addresses the peer is entitled to (a home agent: its configured
home prefixes; a terminal: its own home address) and only when the sequence number is newer
than the last one it accepted, compared modulo 2**16 as RFC 6275 §9.5.1 compares Binding
Update sequence numbers.  Every refusal is counted by reason and logged, in one place.
"""

from __future__ import annotations

import enum
import ipaddress
from collections.abc import Iterable

import attrs
from twisted.logger import Logger
from zope.interface import Interface, implementer

SEQ_MODULUS = 1 << 16  # RFC 6275 §6.1.7: a 16-bit sequence number
SEQ_HALF = 1 << 15  # RFC 6275 §9.5.1: "less than" within half the sequence space


def seq_newer(new: int, old: int) -> bool:
    """Whether ``new`` comes after ``old`` modulo 2**16 (RFC 6275 §9.5.1).

    ``new`` is newer when ``(new - old) mod 2**16`` lies in ``1 .. 2**15 - 1``; equal numbers
    (a replay) and numbers up to half the space behind are not.
    """
    return 0 < (new - old) % SEQ_MODULUS < SEQ_HALF


class Refusal(enum.Enum):
    """Why a connection, a subscription or a notification was refused."""

    TLS_FAILED = "tls_failed"  # plaintext, unknown CA, handshake error
    WRONG_IDENTITY = "wrong_identity"  # certificate valid but not the configured identity
    NOT_ENTITLED = "not_entitled"  # home address outside what the peer may speak for
    STALE = "stale"  # sequence number not newer (replayed or reordered)
    NOT_SUBSCRIBED = "not_subscribed"  # notification for an address nobody subscribed to
    TOO_MANY_SUBSCRIPTIONS = "too_many_subscriptions"
    UNKNOWN_BINDING = "unknown_binding"  # the agent has no binding for the address
    BAD_ARGUMENT = "bad_argument"  # malformed address, kind, lifetime...
    PROTOCOL = "protocol"  # input not allowed in the peer's state (see machine)


class RefusalCounters:
    """Refusals by reason (plain ints for metrics and the manhole), each one logged."""

    log = Logger()

    def __init__(self) -> None:
        self.counts: dict[Refusal, int] = dict.fromkeys(Refusal, 0)
        self.accepted = 0  # notifications applied

    def refuse(self, reason: Refusal, peer: str, detail: str = "") -> Refusal:
        """Count and log one refusal; returns ``reason`` for convenience."""
        self.counts[reason] += 1
        self.log.warn(
            "notify: refused ({reason}) from {peer}: {detail}",
            reason=reason.value,
            peer=peer,
            detail=detail,
        )
        return reason

    def __getitem__(self, reason: Refusal) -> int:
        return self.counts[reason]

    def total(self) -> int:
        """All refusals."""
        return sum(self.counts.values())


class IEntitlement(Interface):
    """Which home addresses a peer may speak for."""

    def allows(home: bytes) -> bool:  # noqa: N805 - zope.interface
        """Whether the peer may report bindings of this 16-octet home address."""


@implementer(IEntitlement)
@attrs.frozen
class PrefixEntitlement:
    """A home agent speaks for the home addresses in its configured home prefixes."""

    prefixes: tuple[ipaddress.IPv6Network, ...]

    @classmethod
    def of(cls, prefixes: Iterable[str | ipaddress.IPv6Network]) -> PrefixEntitlement:
        """From prefix strings or networks."""
        return cls(tuple(ipaddress.IPv6Network(p) for p in prefixes))

    def allows(self, home: bytes) -> bool:
        """Whether ``home`` lies in one of the prefixes."""
        if len(home) != 16:
            return False
        address = ipaddress.IPv6Address(home)
        return any(address in prefix for prefix in self.prefixes)


@implementer(IEntitlement)
@attrs.frozen
class HomeAddressEntitlement:
    """A terminal speaks only for its own home address (bound to its certificate)."""

    home: bytes

    def allows(self, home: bytes) -> bool:
        """Whether ``home`` is the terminal's own home address."""
        return home == self.home
