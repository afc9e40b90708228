"""What the fleet writes to the store, and how every value read back is checked.

Why a module of its own: everything read from the store is *peer-controlled input* (any
balancer of the fleet, or anyone who can write to the store, put it there), so it is
parsed in one place, by rules that refuse rather than guess, with a reason for every
refusal (`Refused`, counted by the caller).  Nothing here does I/O.

The store's layout (``prefix`` defaults to ``lbproxy:``):

=============================  ===============================================================
``<prefix>b:<kind>:<text>``    a binding that differs from Maglev's answer: the identity in its
                               operator's form (``b:addr:2001:db8:a2::1001``); the value names
                               the backend.  TTL = the binding's remaining lifetime.
``<prefix>r:<home address>``   a confirmed care-of address (a return path); the value is the
                               care-of address.  TTL = the confirmation's remaining lifetime.
``<prefix>version``            the fleet's write counter: every write or delete takes the next
                               number, so changes have one total order.
``<prefix>changes``            the pub/sub channel every change is published on.
=============================  ===============================================================

A value is ``1 <version> <field> <origin>``: format 1, the write's number, the backend name
or care-of address, the name of the balancer that wrote it.  A message on the channel is
``<op> <version> <ttl ms> <field> <origin> <store key>`` with ``op`` ``S`` (set) or ``D``
(deleted; ``field`` is ``-``).  The store key comes last, so nothing in it can shift the
other fields.
"""

from __future__ import annotations

import ipaddress
import re
from typing import Final

import attrs

from lbproxy.core.keys import Key

__all__ = [
    "MAX_CONFIRM_TTL_MS",
    "MAX_MESSAGE",
    "MAX_TTL_MS",
    "Change",
    "Layout",
    "Refused",
    "StoreValue",
    "check_address",
]

#: A value or message longer than this is refused unread.
MAX_MESSAGE: Final = 512
#: The longest TTL a binding record may carry (a week: the table's longest lifetime).
MAX_TTL_MS: Final = 7 * 86_400_000
#: The longest TTL a confirmation may carry (RFC 6275's longest binding lifetime).
MAX_CONFIRM_TTL_MS: Final = 262_140_000
#: Versions are the store's INCR counter: a signed 64-bit integer.
MAX_VERSION: Final = (1 << 63) - 1

NAME: Final = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.:-]{0,62}")
PREFIX: Final = re.compile(r"[A-Za-z0-9_.:-]{1,64}")
_DIGITS = re.compile(r"[0-9]{1,19}")
_KIND = re.compile(r"[a-z][a-z0-9_]{0,31}")

_SPECIAL = tuple(
    ipaddress.IPv6Network(n)
    for n in ("ff00::/8", "fe80::/10", "::/128", "::1/128", "::ffff:0:0/96")
)


class Refused(ValueError):  # noqa: N818 - a refusal, not an error of ours
    """A value from the store that is not what the fleet writes; ``reason`` is the
    counter's label (one word)."""

    def __init__(self, reason: str, detail: str = "") -> None:
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason


def check_address(packed: bytes) -> str | None:
    """Why the 16-byte `packed` is not a unicast address a terminal can use (or None)."""
    if len(packed) != 16:
        return "not 16 bytes"
    address = ipaddress.IPv6Address(packed)
    for network in _SPECIAL:
        if address in network:
            return f"{address} is in {network}"
    return None


def _address(text: str, reason: str) -> bytes:
    """The packed form of the canonical IPv6 text `text`; `Refused` otherwise."""
    try:
        address = ipaddress.IPv6Address(text)
    except ValueError:
        raise Refused(reason, f"{text[:60]!r} is not an IPv6 address") from None
    if str(address) != text:
        raise Refused(reason, f"{text[:60]!r} is not in canonical form")
    problem = check_address(address.packed)
    if problem is not None:
        raise Refused(reason, problem)
    return address.packed


@attrs.frozen
class StoreValue:
    """A parsed value: its write's number, field (backend name or care-of address,
    packed for a confirmation) and origin (the balancer that wrote it)."""

    version: int
    field: str
    origin: str


@attrs.frozen
class Change:
    """A parsed message: ``op`` ``"S"`` or ``"D"``; ``ttl`` in seconds (0 for a delete);
    ``store_key`` as written; ``key`` (a binding's identity) or ``home`` (a confirmation's
    home address) from it; ``field`` None for a delete."""

    op: str
    version: int
    ttl: float
    field: str | None
    origin: str
    store_key: str
    key: Key | None
    home: bytes | None


class Layout:
    """The names of one fleet's keys and channel, and the parsers of what they hold."""

    def __init__(self, prefix: str = "lbproxy:") -> None:
        if PREFIX.fullmatch(prefix) is None:
            raise ValueError(f"fleet key prefix {prefix!r}: 1 to 64 of A-Z a-z 0-9 _ . : -")
        self.prefix = prefix
        self.bindings = prefix + "b:"
        self.confirmations = prefix + "r:"
        self.version = prefix + "version"
        self.channel = prefix + "changes"
        #: SCAN pattern for everything of this fleet (the prefix has no glob characters).
        self.pattern = prefix + "*"

    # -- writing -------------------------------------------------------------------------

    def binding_key(self, key: Key) -> str:
        """``<prefix>b:<kind>:<text>`` for `key`."""
        kind, _, text = str(key).partition(" ")
        return f"{self.bindings}{kind}:{text}"

    def confirmation_key(self, home: bytes) -> str:
        return f"{self.confirmations}{ipaddress.IPv6Address(home)}"

    # -- reading -------------------------------------------------------------------------

    def parse_store_key(self, name: str) -> tuple[Key | None, bytes | None]:
        """(identity, None) for a binding's key, (None, home) for a confirmation's;
        `Refused` for anything else under the prefix (``bad-key``) or a key in a form
        this fleet would not write (so no identity has two names in the store)."""
        if len(name) > MAX_MESSAGE:
            raise Refused("bad-key", "too long")
        if name.startswith(self.bindings):
            rest = name[len(self.bindings):]
            kind, sep, text = rest.partition(":")
            if not sep or _KIND.fullmatch(kind) is None:
                raise Refused("bad-key", f"{name[:80]!r}: no key kind")
            try:
                key = Key.parse(f"{kind} {text}")
            except (ValueError, KeyError) as e:
                raise Refused("bad-key", f"{name[:80]!r}: {e}") from None
            if self.binding_key(key) != name:
                raise Refused("bad-key", f"{name[:80]!r} is not in canonical form")
            if key.kind == "addr":
                problem = check_address(key.value)
                if problem is not None:
                    raise Refused("bad-key", problem)
            return key, None
        if name.startswith(self.confirmations):
            return None, _address(name[len(self.confirmations):], "bad-key")
        raise Refused("bad-key", f"{name[:80]!r} is no key of the fleet")

    def parse_value(self, raw: bytes | str | None, confirmation: bool) -> StoreValue:
        """A stored value (`Refused`: ``bad-value``)."""
        text = _text(raw, "bad-value")
        parts = text.split(" ")
        if len(parts) != 4 or parts[0] != "1":
            raise Refused("bad-value", f"{text[:80]!r}: not '1 <version> <field> <origin>'")
        return StoreValue(_version(parts[1], "bad-value"),
                          _field(parts[2], confirmation, "bad-value"),
                          _origin(parts[3], "bad-value"))

    def parse_change(self, raw: bytes | str | None) -> Change:
        """A message from the channel (`Refused`: ``bad-message`` or ``bad-key``)."""
        text = _text(raw, "bad-message")
        parts = text.split(" ", 5)
        if len(parts) != 6 or parts[0] not in ("S", "D"):
            raise Refused("bad-message", f"{text[:80]!r}: not '<op> <version> <ttl> <field> "
                                         "<origin> <key>'")  # fmt: skip
        op, version, ttl, field, origin, name = parts
        key, home = self.parse_store_key(name)
        ttl_ms = _version(ttl, "bad-message") if op == "S" else 0
        if op == "S":
            limit = MAX_CONFIRM_TTL_MS if home is not None else MAX_TTL_MS
            if not 0 < ttl_ms <= limit:
                raise Refused("bad-message", f"TTL {ttl_ms} ms outside 1..{limit}")
            checked: str | None = _field(field, home is not None, "bad-message")
        elif field != "-" or ttl_ms:
            raise Refused("bad-message", "a delete carries no field or TTL")
        else:
            checked = None
        return Change(op, _version(version, "bad-message"), ttl_ms / 1000.0, checked,
                      _origin(origin, "bad-message"), name, key, home)


def _text(raw: bytes | str | None, reason: str) -> str:
    if raw is None:
        raise Refused(reason, "empty")
    if isinstance(raw, str):
        raw = raw.encode("utf-8", "surrogateescape")
    if not isinstance(raw, bytes):
        raise Refused(reason, f"a {type(raw).__name__}, not a string")
    if len(raw) > MAX_MESSAGE:
        raise Refused(reason, f"{len(raw)} bytes (at most {MAX_MESSAGE})")
    try:
        text = raw.decode("ascii")
    except UnicodeDecodeError:
        raise Refused(reason, "not ASCII") from None
    if not text.isprintable():
        raise Refused(reason, "control characters")
    return text


def _version(text: str, reason: str) -> int:
    if _DIGITS.fullmatch(text) is None:
        raise Refused(reason, f"{text[:30]!r} is not a number")
    value = int(text)
    if not 0 < value <= MAX_VERSION:
        raise Refused(reason, f"{value} is out of range")
    return value


def _field(text: str, confirmation: bool, reason: str) -> str:
    if confirmation:
        _address(text, reason)
        return text
    if NAME.fullmatch(text) is None:
        raise Refused(reason, f"{text[:80]!r} is not a backend name")
    return text


def _origin(text: str, reason: str) -> str:
    if NAME.fullmatch(text) is None:
        raise Refused(reason, f"{text[:80]!r} is not a balancer name")
    return text
