"""What a notification must satisfy before it may move traffic: freshness and entitlement.

A notification moves a terminal's traffic to another address, so the balancer believes a
peer only about the home addresses the peer is entitled to (a home agent: its configured
home prefixes; a terminal: its own home address) and only when the sequence number is newer
than the last one it accepted, compared modulo 2**16 as RFC 6275 §9.5.1 compares Binding
Update sequence numbers.  Lifetimes are bounded by what a Binding Update can carry (RFC 6275
§6.1.7: 16 bits of 4-second units).  Every refusal is counted by reason and logged, in one
place.
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
MAX_SEQ = SEQ_MODULUS - 1
#: RFC 6275 §6.1.7: the Binding Update's lifetime is 16 bits of 4-second units.
MAX_LIFETIME = 0xFFFF * 4  # 262,140 s


def valid_seq(seq: object) -> bool:
    """Whether ``seq`` is a Binding Update sequence number (an int, not a bool, 0..65535)."""
    return type(seq) is int and 0 <= seq <= MAX_SEQ


def valid_lifetime(lifetime: object) -> bool:
    """Whether ``lifetime`` is a binding lifetime in seconds a Binding Update can carry:
    an int (not a bool, not a float -- so no NaN or infinity) in 0..262,140."""
    return type(lifetime) is int and 0 <= lifetime <= MAX_LIFETIME


def seq_newer(new: int, old: int) -> bool:
    """Whether ``new`` comes after ``old`` modulo 2**16 (RFC 6275 §9.5.1).

    ``new`` is newer when ``(new - old) mod 2**16`` lies in ``1 .. 2**15 - 1``; equal numbers
    (a replay) and numbers up to half the space behind are not.
    """
    return 0 < (new - old) % SEQ_MODULUS < SEQ_HALF


class Refusal(enum.Enum):
    """Why a connection, a subscription or a notification was refused (docs/notify.md)."""

    TLS_FAILED = "tls_failed"  # plaintext, unknown CA, expired, no certificate, old TLS
    WRONG_IDENTITY = "wrong_identity"  # no SAN, wildcard only, another name, no home IP
    WRONG_USAGE = "wrong_usage"  # extended key usage not serverAuth/clientAuth, or a CA
    NOT_ENTITLED = "not_entitled"  # home address outside what the peer may speak for
    NOT_OWNER = "not_owner"  # would move a source-address binding of another terminal
    STALE = "stale"  # sequence number not newer (replayed or reordered)
    NOT_SUBSCRIBED = "not_subscribed"  # notification for an address nobody subscribed to
    TOO_MANY_SUBSCRIPTIONS = "too_many_subscriptions"
    UNKNOWN_BINDING = "unknown_binding"  # the agent has no binding for the address
    BAD_ARGUMENT = "bad_argument"  # malformed address, kind, number, box...
    BAD_LIFETIME = "bad_lifetime"  # negative, above 262,140 s, not an integer
    BAD_ADDRESS = "bad_address"  # not global unicast: multicast, link-local, ::, ::1, ...
    LOCAL_ADDRESS = "local_address"  # a virtual address, a backend, this host
    FORBIDDEN_ADDRESS = "forbidden_address"  # forbidden prefix / outside care-of prefixes
    PROTOCOL = "protocol"  # input not allowed in the peer's state (see machine)
    TIMEOUT = "timeout"  # no TLS handshake or no answer in time: the peer is dropped
    TOO_MANY_PEERS = "too_many_peers"  # dial-in terminals or unverified connections bound


class RefusalCounters:
    """Refusals by reason (plain ints for metrics and the manhole), each one logged."""

    log = Logger()

    def __init__(self) -> None:
        self.counts: dict[Refusal, int] = dict.fromkeys(Refusal, 0)
        self.accepted = 0  # notifications applied (moves, first bindings)
        self.refreshed = 0  # re-registrations applied (same care-of address, newer seq)

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
