"""Terminal identities: which part of a packet says *who* sent it.

Why this exists: a mobile IPv6 terminal's source address (its care-of address) changes
as it moves, so the balancer cannot key its sticky table on the source alone.  The patent
lists several identities that survive a move (claims 2-4) and the source address as the
fallback (claims 7-8).  Each is a small :class:`IKeyStrategy`; a :class:`KeyChain` tries
them in the configured order and the first that yields a :class:`Key` wins, the way
``twisted.names.resolve.ResolverChain`` walks its resolvers.

Theory of operation
-------------------
A :class:`Key` is made for every packet, and it is the sticky table's dict key, so it is
built for cost: it *is* a ``bytes`` object (a slot-less subclass) holding one kind byte
followed by the identity's value.  Hashing and equality are therefore the C
implementations of ``bytes`` (the hash is cached in the object), and one key costs one
small allocation.  The kind byte comes from a registry of :class:`KeyKind` (name, length,
text form), so plugins can add kinds without touching this module's classes.  A
consequence worth knowing: a ``Key`` compares equal to the plain ``bytes`` with the same
content; never mix keys and other bytes in one mapping.

Strategies read the packet through a :class:`~lbproxy.wire.view.PacketView` (offsets into
the caller's buffer, see ``docs/contracts.md``); they never parse or copy more than the
identity's own bytes.  :func:`register_strategy` adds a named strategy factory that
:meth:`KeyChain.from_names` can build from configuration.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import TYPE_CHECKING, Any, Final

import attrs
from zope.interface import Attribute, Interface, implementer

if TYPE_CHECKING:
    from lbproxy.wire.view import PacketView

    Buffer = bytes | bytearray | memoryview

__all__ = [
    "HomeAddressStrategy",
    "IKeyStrategy",
    "InterfaceIdStrategy",
    "Key",
    "KeyChain",
    "KeyKind",
    "SourceAddressStrategy",
    "SpiStrategy",
    "kind_named",
    "known_strategies",
    "register_kind",
    "register_strategy",
]


# -- key kinds ---------------------------------------------------------------------------


def _format_address(value: bytes) -> str:
    return str(ipaddress.IPv6Address(value))


def _parse_address(text: str) -> bytes:
    return ipaddress.IPv6Address(text).packed


def _format_iid(value: bytes) -> str:
    h = value.hex()
    return ":".join(h[i : i + 4] for i in range(0, 16, 4))


def _parse_iid(text: str) -> bytes:
    groups = text.split(":")
    if len(groups) != 4 or not all(1 <= len(g) <= 4 for g in groups):
        raise ValueError(f"an interface ID is four groups of hex digits, not {text!r}")
    return b"".join(int(g, 16).to_bytes(2, "big") for g in groups)


def _format_spi(value: bytes) -> str:
    return f"0x{int.from_bytes(value, 'big'):08x}"


def _parse_spi(text: str) -> bytes:
    return int(text, 0).to_bytes(4, "big")


def _parse_hex(text: str) -> bytes:
    return bytes.fromhex(text.removeprefix("0x"))


@attrs.frozen
class KeyKind:
    """One kind of identity: its name, its one-byte code inside a :class:`Key`, the
    length of its value, and its operator-facing text form (both ways)."""

    name: str
    code: int
    length: int
    format: Callable[[bytes], str] = attrs.field(default=bytes.hex, eq=False)
    parse: Callable[[str], bytes] = attrs.field(default=_parse_hex, eq=False)

    @property
    def prefix(self) -> bytes:
        """The first byte of every :class:`Key` of this kind."""
        return bytes((self.code,))


_KINDS_BY_NAME: dict[str, KeyKind] = {}
_KINDS_BY_CODE: dict[int, KeyKind] = {}


def register_kind(
    name: str,
    length: int,
    format: Callable[[bytes], str] = bytes.hex,
    parse: Callable[[str], bytes] = _parse_hex,
    code: int | None = None,
) -> KeyKind:
    """Add a key kind (for plugin strategies) and return it.

    Codes are assigned in registration order when not given; a :class:`Key`'s bytes (and
    so its ``hash``) depend on the code, but nothing that must agree across processes
    does: :mod:`lbproxy.core.selection` hashes the kind's *name* and the value.
    """
    if not name or " " in name:
        raise ValueError(f"a key kind name is one word, not {name!r}")
    if name in _KINDS_BY_NAME:
        raise ValueError(f"key kind {name!r} is already registered")
    if code is None:
        code = next(c for c in range(1, 256) if c not in _KINDS_BY_CODE)
    if not 0 < code < 256 or code in _KINDS_BY_CODE:
        raise ValueError(f"key kind code {code} is out of range or taken")
    kind = KeyKind(name, code, length, format, parse)
    _KINDS_BY_NAME[name] = kind
    _KINDS_BY_CODE[code] = kind
    return kind


def kind_named(name: str) -> KeyKind:
    """The registered :class:`KeyKind` called `name` (``KeyError`` if none)."""
    return _KINDS_BY_NAME[name]


HOA: Final = register_kind("hoa", 16, _format_address, _parse_address, code=1)
IID: Final = register_kind("iid", 8, _format_iid, _parse_iid, code=2)
SPI: Final = register_kind("spi", 4, _format_spi, _parse_spi, code=3)
SRC: Final = register_kind("src", 16, _format_address, _parse_address, code=4)


# -- the key value -----------------------------------------------------------------------


class Key(bytes):
    """A terminal's identity: a kind (``"hoa"``, ``"iid"``, ``"spi"``, ``"src"``, plugin
    kinds) and the identity's bytes.

    Why a ``bytes`` subclass: it is made per packet and looked up in a dict of up to
    millions of entries; ``bytes`` hashing and equality run in C, and the object is one
    allocation.  ``str(key)`` is the operator's form (``hoa 2001:db8:1::16``,
    ``iid 0211:22ff:fe33:4455``, ``spi 0x000000da``, ``src 2001:db8::1``) and
    :meth:`parse` reads it back.
    """

    __slots__ = ()

    def __new__(cls, kind: str, value: bytes | bytearray | memoryview) -> Key:
        spec = _KINDS_BY_NAME.get(kind)
        if spec is None:
            raise ValueError(f"unknown key kind {kind!r}")
        data = bytes(value)
        if len(data) != spec.length:
            raise ValueError(f"a {kind} key is {spec.length} bytes, not {len(data)}")
        return bytes.__new__(cls, spec.prefix + data)

    @property
    def kind(self) -> str:
        """The kind's name, e.g. ``"hoa"``."""
        return _KINDS_BY_CODE[self[0]].name

    @property
    def value(self) -> bytes:
        """The identity's bytes: 16 for hoa/src, 8 for iid, 4 for spi."""
        return bytes(self[1:])

    def __str__(self) -> str:
        spec = _KINDS_BY_CODE[self[0]]
        return f"{spec.name} {spec.format(bytes(self[1:]))}"

    def __repr__(self) -> str:
        return f"Key.parse({str(self)!r})"

    @classmethod
    def parse(cls, text: str) -> Key:
        """Read the operator's form back: ``Key.parse(str(key)) == key``."""
        kind, _, rest = text.strip().partition(" ")
        spec = _KINDS_BY_NAME.get(kind)
        if spec is None:
            raise ValueError(f"unknown key kind {kind!r} in {text!r}")
        try:
            value = spec.parse(rest.strip())
        except (ValueError, OverflowError) as e:
            raise ValueError(f"bad {kind} key {rest.strip()!r}: {e}") from None
        return cls(kind, value)


# The hot path builds keys without the checks of Key.__new__: the strategies below know
# their slices have the right length.
_new_key: Final = bytes.__new__
_HOA: Final = HOA.prefix
_IID: Final = IID.prefix
_SPI: Final = SPI.prefix
_SRC: Final = SRC.prefix


# -- strategies --------------------------------------------------------------------------


class IKeyStrategy(Interface):
    """Finds one kind of terminal identity in a packet, or says it is not there."""

    kind = Attribute("The name of the key kind this strategy yields (str).")

    def key_for(buf: Buffer, view: PacketView) -> Key | None:  # noqa: N805
        """The packet's identity of this kind, or None when the packet has none.

        `view` is ``lbproxy.wire.view.parse(buf)``; the strategy must not modify `buf`.
        """


@implementer(IKeyStrategy)
@attrs.frozen
class HomeAddressStrategy:
    """Claim 2: the home address carried in a Home Address Option (RFC 6275 section
    6.3).  The HAO is the terminal's own claim; see DESIGN.md section 6 for why keying
    on it is fine but replying to its care-of address needs confirmation."""

    kind: str = attrs.field(default="hoa", init=False)

    def key_for(self, buf: Buffer, view: PacketView) -> Key | None:
        o = view.hoa
        if o < 0:
            return None
        return _new_key(Key, _HOA + buf[o : o + 16])


@implementer(IKeyStrategy)
@attrs.frozen
class InterfaceIdStrategy:
    """Claim 3: the interface ID (low 64 bits) of a stateless-autoconfigured source.

    Only a universal EUI-64 interface ID (``ff fe`` in its bytes 3-4 and the u bit,
    0x02 of its first byte, set) stays the same when the terminal moves to another
    prefix; temporary (RFC 8981) and stable-privacy (RFC 7217) IDs change exactly then.
    So by default other IDs yield no key and the chain moves on.  ``accept_any=True``
    takes every ID, as a heuristic for networks known to use stable IDs.
    """

    accept_any: bool = False
    kind: str = attrs.field(default="iid", init=False)

    def key_for(self, buf: Buffer, view: PacketView) -> Key | None:
        # Source address is buf[8:24]; its interface ID buf[16:24].
        if self.accept_any or (buf[19] == 0xFF and buf[20] == 0xFE and buf[16] & 0x02):
            return _new_key(Key, _IID + buf[16:24])
        return None


@implementer(IKeyStrategy)
@attrs.frozen
class SpiStrategy:
    """Claim 4: the Security Parameter Index of an ESP header (RFC 4303 section 2.1).

    The only field of an encrypted packet the balancer can read.  ESP appears only in a
    first fragment, so a non-first fragment yields no SPI key (the balancer follows
    fragments by their identification instead).
    """

    kind: str = attrs.field(default="spi", init=False)

    def key_for(self, buf: Buffer, view: PacketView) -> Key | None:
        o = view.esp
        if o < 0:
            return None
        return _new_key(Key, _SPI + buf[o : o + 4])


@implementer(IKeyStrategy)
@attrs.frozen
class SourceAddressStrategy:
    """Claims 7-8: the source address, for packets from the home link or without any
    other identity.  Always yields a key, so it belongs at the end of a chain."""

    kind: str = attrs.field(default="src", init=False)

    def key_for(self, buf: Buffer, view: PacketView) -> Key | None:
        return _new_key(Key, _SRC + buf[8:24])


# -- the chain ---------------------------------------------------------------------------


@attrs.frozen
class _StrategyFactory:
    build: Callable[..., IKeyStrategy]
    options: frozenset[str]


_STRATEGIES: dict[str, _StrategyFactory] = {}


def register_strategy(
    name: str, factory: Callable[..., IKeyStrategy], options: Iterable[str] = ()
) -> None:
    """Make `name` usable in :meth:`KeyChain.from_names` (and so in configuration).

    `factory` is called with the keyword options, among those given to ``from_names``,
    whose names are listed in `options`.
    """
    if name in _STRATEGIES:
        raise ValueError(f"key strategy {name!r} is already registered")
    _STRATEGIES[name] = _StrategyFactory(factory, frozenset(options))


def known_strategies() -> tuple[str, ...]:
    """The names :meth:`KeyChain.from_names` accepts, in registration order."""
    return tuple(_STRATEGIES)


def _interface_id(any_interface_id: bool = False) -> InterfaceIdStrategy:
    return InterfaceIdStrategy(accept_any=any_interface_id)


register_strategy("hoa", HomeAddressStrategy)
register_strategy("iid", _interface_id, options=["any_interface_id"])
register_strategy("spi", SpiStrategy)
register_strategy("src", SourceAddressStrategy)


class KeyChain:
    """Ordered key strategies; the first that yields a key wins.

    Why a chain: the identities are not equally good (a home address survives every
    move, a source address none) and not always present, so each packet is keyed by the
    best identity it carries, in the operator's order.
    """

    __slots__ = ("_calls", "strategies")

    strategies: tuple[IKeyStrategy, ...]

    def __init__(self, strategies: Sequence[IKeyStrategy]) -> None:
        if not strategies:
            raise ValueError("a key chain needs at least one strategy")
        self.strategies = tuple(strategies)
        self._calls = tuple((s.key_for, s) for s in self.strategies)

    def key_for(self, buf: Buffer, view: PacketView) -> tuple[Key, IKeyStrategy] | None:
        """The packet's key and the strategy that found it, or None if none did."""
        for key_for, strategy in self._calls:
            key = key_for(buf, view)
            if key is not None:
                return key, strategy
        return None

    @classmethod
    def from_names(cls, names: Sequence[str], **options: Any) -> KeyChain:
        """Build a chain from configuration names (``["hoa", "iid", "spi", "src"]``).

        Options go to the strategies that declare them (``any_interface_id`` for
        ``iid``).  An unknown name, a repeated name, or an option no named strategy
        takes raises ``ValueError`` naming it.
        """
        unknown = [n for n in names if n not in _STRATEGIES]
        if unknown:
            raise ValueError(
                f"unknown key strategy {unknown[0]!r} (known: {', '.join(_STRATEGIES)})"
            )
        repeated = sorted({n for n in names if list(names).count(n) > 1})
        if repeated:
            raise ValueError(f"key strategy {repeated[0]!r} is named more than once")
        wanted = frozenset().union(*(_STRATEGIES[n].options for n in names))
        stray = sorted(set(options) - wanted)
        if stray:
            raise ValueError(
                f"option {stray[0]!r} is not taken by any of the strategies {list(names)}"
            )
        return cls([_build(_STRATEGIES[n], options) for n in names])

    def __repr__(self) -> str:
        return f"KeyChain({list(self.strategies)!r})"


def _build(factory: _StrategyFactory, options: Mapping[str, Any]) -> IKeyStrategy:
    return factory.build(**{k: v for k, v in options.items() if k in factory.options})
