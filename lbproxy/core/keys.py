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
identity's own bytes.

Registries
----------
Configuration names strategies (``key_chain = ["hoa", "iid", "spi", "ike", "src"]``), and
:meth:`KeyChain.from_names` looks each name up in :data:`STRATEGY_REGISTRY`, a
:class:`Registry` of :class:`StrategyFactory`.  The four built-in strategies are
registered below with :func:`register_strategy`; third-party ones come from Python entry
points in the group ``lbproxy.key_strategies`` (the entry point's name is the strategy's
name, its object a :class:`StrategyFactory` or a callable taking no arguments that returns
an :class:`IKeyStrategy` provider).  Entry points are read once, lazily: the first time
the registry is asked for its names or for a name it does not know.  A broken one (import
error, wrong type, name taken) is skipped with one logged warning and is simply not
registered.  A plugin module adds its own key kind with :func:`register_kind` when it is
imported.  :mod:`lbproxy.core.selection` keeps its schedulers in a :class:`Registry` too
(group ``lbproxy.schedulers``).  ``docs/core.md`` has an example plugin package.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import TYPE_CHECKING, Any, Final, TypeVar

import attrs
from zope.interface import Attribute, Interface, implementer

from lbproxy.core.registry import Registry, reason

if TYPE_CHECKING:
    from lbproxy.wire.view import PacketView

    Buffer = bytes | bytearray | memoryview

T = TypeVar("T")

__all__ = [
    "STRATEGY_REGISTRY",
    "HomeAddressStrategy",
    "IKeyStrategy",
    "INamedKeyStrategy",
    "IkeStrategy",
    "InterfaceIdStrategy",
    "Key",
    "KeyChain",
    "KeyKind",
    "Registry",
    "SourceAddressStrategy",
    "SpiStrategy",
    "StrategyFactory",
    "declared_options",
    "kind_named",
    "known_strategies",
    "register_kind",
    "register_strategy",
    "unregister_kind",
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


def _format_ike(value: bytes) -> str:
    return f"0x{value.hex()}"


def _parse_ike(text: str) -> bytes:
    return int(text, 0).to_bytes(8, "big")


def _parse_hex(text: str) -> bytes:
    return bytes.fromhex(text.removeprefix("0x"))


def _format_server_id(value: bytes) -> str:
    return value[1 : 1 + value[0]].hex()


def _parse_server_id(text: str) -> bytes:
    sid = _parse_hex(text)
    if not 1 <= len(sid) <= 15:
        raise ValueError(f"a server ID is 1 to 15 octets, not {len(sid)}")
    return bytes((len(sid),)) + sid.ljust(15, b"\0")


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


def canonical_kind(name: str) -> str:
    """The name keys of kind `name` print with (``"hoa"`` and ``"src"`` are ``"addr"``);
    an unknown name is returned as it is."""
    spec = _KINDS_BY_NAME.get(name)
    return spec.name if spec is not None else name


def unregister_kind(name: str) -> None:
    """Forget the key kind `name` (for tests that register their own; no key of that
    kind may be in use any more).  Unknown names are ignored."""
    kind = _KINDS_BY_NAME.pop(name, None)
    if kind is not None:
        del _KINDS_BY_CODE[kind.code]


#: An IPv6 address identifying a terminal, whichever header it came from: the home
#: address in a Home Address Option, or the source address -- which *is* the home
#: address for a terminal at home or tunnelled through its home agent, and the care-of
#: address otherwise.  One namespace, so a terminal at home and the same terminal away
#: (HAO) have one key (RFC 6275 section 9.3.1: a real mobile node reaches a server
#: tunnelled, source = home address, before it uses route optimisation).
ADDR: Final = register_kind("addr", 16, _format_address, _parse_address, code=1)
IID: Final = register_kind("iid", 8, _format_iid, _parse_iid, code=2)
SPI: Final = register_kind("spi", 4, _format_spi, _parse_spi, code=3)
#: An IKE SA initiator's SPI (8 bytes), see `IkeStrategy`.
IKE: Final = register_kind("ike", 8, _format_ike, _parse_ike, code=5)
#: A QUIC-LB server ID (1-15 octets, stored as its length then the ID, zero-padded to
#: 16), see `lbproxy.core.quiclb`: printed as the ID's hex digits, ``quic 0a0b``.
QUIC: Final = register_kind("quic", 16, _format_server_id, _parse_server_id, code=6)
# The names the strategies yielding addresses used for their keys before addresses were
# one namespace: still read (saved tables, operators' habits), never written.
_KINDS_BY_NAME["hoa"] = _KINDS_BY_NAME["src"] = ADDR
HOA: Final = ADDR
SRC: Final = ADDR


# -- the key value -----------------------------------------------------------------------


class Key(bytes):
    """A terminal's identity: a kind (``"addr"``, ``"iid"``, ``"spi"``, plugin kinds;
    ``"hoa"`` and ``"src"`` are read as ``"addr"``) and the identity's bytes.

    Why a ``bytes`` subclass: it is made per packet and looked up in a dict of up to
    millions of entries; ``bytes`` hashing and equality run in C, and the object is one
    allocation.  ``str(key)`` is the operator's form (``addr 2001:db8:1::16``,
    ``iid 0211:22ff:fe33:4455``, ``spi 0x000000da``) and :meth:`parse` reads it back.
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
        """The kind's name, e.g. ``"addr"``."""
        return _KINDS_BY_CODE[self[0]].name

    @property
    def value(self) -> bytes:
        """The identity's bytes: 16 for an address, 8 for iid, 4 for spi."""
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
_IKE_KIND: Final = IKE.prefix
_UDP: Final = 17
#: IKE's ports (RFC 7296 section 2), and the zero marker that tells IKE from ESP on
#: the NAT-traversal port (RFC 3948 section 2.2).
_IKE: Final = 500
_NAT_T: Final = 4500
_NON_ESP_MARKER: Final = bytes(4)
_NO_SPI: Final = bytes(8)
#: The IKEv2 header's length (RFC 7296 section 3.1).
_IKE_HEADER: Final = 28
_SRC: Final = SRC.prefix


# -- strategies --------------------------------------------------------------------------


class IKeyStrategy(Interface):
    """Finds one kind of terminal identity in a packet, or says it is not there."""

    kind = Attribute("The name of the key kind this strategy yields (str).")

    def key_for(buf: Buffer, view: PacketView) -> Key | None:  # noqa: N805
        """The packet's identity of this kind, or None when the packet has none.

        `view` is ``lbproxy.wire.view.parse(buf)``; the strategy must not modify `buf`.
        """


class INamedKeyStrategy(IKeyStrategy):
    """A strategy whose keys name their backend (a QUIC-LB server ID: the backend that
    wrote it into the connection ID).

    The balancer neither binds such a key nor links it: while its backend may take
    packets, a packet whose first identity in chain order is such a key goes there, and
    the packet's other identities follow it (`lbproxy.core.balancer`)."""

    def backend_name(key: Key) -> str | None:  # noqa: N805
        """The name of the backend `key` names, or None."""


@implementer(IKeyStrategy)
@attrs.frozen
class HomeAddressStrategy:
    """Claim 2: the home address carried in a Home Address Option (RFC 6275 section
    6.3).

    The HAO is the terminal's own claim, not a proof (RFC 6275 section 15): anyone can
    put any home address in it.  Keying on it is fine -- the worst a liar gets is to
    share a backend -- but replying to an unverified care-of address would be a
    reflection attack, so replies go to a care-of address only for a binding confirmed
    by an authenticated notification (``Binding.confirmed``)."""

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
    fragments by their identification instead).  ESP encapsulated in UDP port 4500
    (RFC 3948, what a terminal behind a NAT, or a MOBIKE one, sends) is read too: a
    payload whose first four bytes are not the zero "non-ESP marker" starts with the SPI.
    """

    kind: str = attrs.field(default="spi", init=False)

    def key_for(self, buf: Buffer, view: PacketView) -> Key | None:
        o = view.esp
        if o >= 0:
            return _new_key(Key, _SPI + buf[o : o + 4])
        if view.proto == _UDP and (view.dport == _NAT_T or view.sport == _NAT_T):
            p = view.l4 + 8
            if p + 8 <= view.end and buf[p : p + 4] != _NON_ESP_MARKER:
                return _new_key(Key, _SPI + buf[p : p + 4])
        return None


@implementer(IKeyStrategy)
@attrs.frozen
class IkeStrategy:
    """The IKE SA initiator's SPI of an IKEv2 message (RFC 7296 section 3.1), on UDP 500
    or behind the non-ESP marker on UDP 4500 (RFC 3948).

    Why: the IKE SA outlives a terminal's moves -- MOBIKE (RFC 4555) moves it to the new
    care-of address with an INFORMATIONAL exchange, which is the terminal's *first* packet
    from that address.  Keyed by its source address alone it would be a new terminal;
    keyed by the IKE SPI, linked to the terminal's binding by its earlier IKE packets, it
    finds the backend that holds the SA.  The initiator chooses the SPI (64 random bits,
    never 0), so it identifies the SA, hence the terminal.
    """

    kind: str = attrs.field(default="ike", init=False)

    def key_for(self, buf: Buffer, view: PacketView) -> Key | None:
        if view.proto != _UDP:
            return None
        p = view.l4 + 8
        if view.dport == _NAT_T or view.sport == _NAT_T:
            if buf[p : p + 4] != _NON_ESP_MARKER:
                return None  # ESP in UDP: the SPI strategy's
            p += 4
        elif view.dport != _IKE and view.sport != _IKE:
            return None
        if p + _IKE_HEADER > view.end:
            return None
        spi = buf[p : p + 8]
        if spi == _NO_SPI:
            return None
        return _new_key(Key, _IKE_KIND + spi)


@implementer(IKeyStrategy)
@attrs.frozen
class SourceAddressStrategy:
    """Claims 7-8: the source address, for packets from the home link or without any
    other identity.  Always yields a key, so it belongs at the end of a chain."""

    kind: str = attrs.field(default="src", init=False)

    def key_for(self, buf: Buffer, view: PacketView) -> Key | None:
        return _new_key(Key, _SRC + buf[8:24])


# -- strategies by name ------------------------------------------------------------------


def _option_names(options: Iterable[str]) -> frozenset[str]:
    if isinstance(options, str):
        raise TypeError(f"options is a list of option names, not the string {options!r}")
    return frozenset(options)


@attrs.frozen
class StrategyFactory:
    """How :meth:`KeyChain.from_names` builds a named strategy: it calls ``build`` with
    those of its keyword options whose names are in `options`, and ``build`` returns a
    new :class:`IKeyStrategy` provider.

    A ``lbproxy.key_strategies`` entry point names one of these, or any callable that
    takes no arguments and returns an :class:`IKeyStrategy` provider (a strategy class).
    """

    build: Callable[..., IKeyStrategy]
    options: frozenset[str] = attrs.field(default=frozenset(), converter=_option_names)


def _as_strategy_factory(obj: object) -> StrategyFactory:
    if isinstance(obj, StrategyFactory):
        return obj
    if callable(obj):
        return StrategyFactory(obj)
    raise TypeError(f"{obj!r} is neither a StrategyFactory nor callable")


STRATEGY_REGISTRY: Final[Registry[StrategyFactory]] = Registry(
    "key strategy", "lbproxy.key_strategies", _as_strategy_factory
)
"""The key strategies :meth:`KeyChain.from_names` knows, by configuration name."""


def register_strategy(
    name: str, factory: Callable[..., IKeyStrategy], options: Iterable[str] = ()
) -> None:
    """Make `name` usable in :meth:`KeyChain.from_names` (and so in configuration).

    `factory` is called with the keyword options, among those given to ``from_names``,
    whose names are listed in `options`.  Third-party packages can do the same without
    code through an entry point of group ``lbproxy.key_strategies``.
    """
    STRATEGY_REGISTRY.register(name, StrategyFactory(factory, options))


def known_strategies() -> tuple[str, ...]:
    """The names :meth:`KeyChain.from_names` accepts: built-ins in registration order,
    then those of entry points."""
    return STRATEGY_REGISTRY.names()


def declared_options(names: Iterable[str]) -> frozenset[str]:
    """The options the registered strategies among `names` declare (unknown names are
    left to :meth:`KeyChain.from_names` to refuse)."""
    found = (STRATEGY_REGISTRY.get(n) for n in names if isinstance(n, str))
    return frozenset().union(*(f.options for f in found if f is not None))


def _interface_id(any_interface_id: bool = False) -> InterfaceIdStrategy:
    return InterfaceIdStrategy(accept_any=any_interface_id)


register_strategy("hoa", HomeAddressStrategy)
register_strategy("iid", _interface_id, options=["any_interface_id"])
register_strategy("spi", SpiStrategy)
register_strategy("ike", IkeStrategy)
register_strategy("src", SourceAddressStrategy)


def _quic_lb(quic: Any = None) -> IKeyStrategy:
    from lbproxy.core.quiclb import QuicLbStrategy  # it imports this module

    return QuicLbStrategy(quic)


register_strategy("quic", _quic_lb, options=["quic"])


# -- the chain ---------------------------------------------------------------------------


class KeyChain:
    """Ordered key strategies: a packet's identities, best first.

    Why a chain: the identities are not equally good (a home address survives every
    move, a source address none) and not always present, so each packet is keyed by the
    best identity it carries, in the operator's order (`key_for`); and all of them
    (`keys_for`) are linked to one binding, so that every packet of the terminal -- at
    home, away, its IKE and its ESP -- finds it (`lbproxy.core.balancer`).
    """

    __slots__ = ("_calls", "strategies")

    strategies: tuple[IKeyStrategy, ...]

    def __init__(self, strategies: Sequence[IKeyStrategy]) -> None:
        if not strategies:
            raise ValueError("a key chain needs at least one strategy")
        self.strategies = tuple(strategies)
        self._calls = tuple((s.key_for, s) for s in self.strategies)

    def key_for(self, buf: Buffer, view: PacketView) -> tuple[Key, IKeyStrategy] | None:
        """The packet's best key and the strategy that found it, or None if none did."""
        for key_for, strategy in self._calls:
            key = key_for(buf, view)
            if key is not None:
                return key, strategy
        return None

    def keys_for(self, buf: Buffer, view: PacketView) -> list[tuple[Key, IKeyStrategy]]:
        """Every identity the packet carries, in chain order, each key once (a terminal
        at home has the same address as its home address and its source)."""
        found: list[tuple[Key, IKeyStrategy]] = []
        for key_for, strategy in self._calls:
            key = key_for(buf, view)
            if key is not None and all(key != k for k, _ in found):
                found.append((key, strategy))
        return found

    @classmethod
    def from_names(cls, names: Sequence[str], **options: Any) -> KeyChain:
        """Build a chain from registered names (``["hoa", "iid", "spi", "ike", "src"]``).

        Each strategy gets only the options it declares (``any_interface_id`` for
        ``iid``).  An unknown name (the message lists the registered ones), a repeated
        name, an option no named strategy declares, or a factory that fails or makes
        something that is not an :class:`IKeyStrategy` raises ``ValueError`` naming it.
        """
        names = list(names)
        factories = []
        for name in names:
            factory = STRATEGY_REGISTRY.get(name)
            if factory is None:
                raise ValueError(STRATEGY_REGISTRY.unknown(name))
            factories.append(factory)
        repeated = [n for n in names if names.count(n) > 1]
        if repeated:
            raise ValueError(f"key strategy {repeated[0]!r} is named more than once")
        wanted = frozenset[str]().union(*(f.options for f in factories))
        stray = sorted(set(options) - wanted)
        if stray:
            raise ValueError(
                f"option {stray[0]!r} is not taken by any of the strategies {names}"
            )
        return cls([_build(n, f, options) for n, f in zip(names, factories, strict=True)])

    def __repr__(self) -> str:
        return f"KeyChain({list(self.strategies)!r})"


def _build(name: str, factory: StrategyFactory, options: Mapping[str, Any]) -> IKeyStrategy:
    given = {k: v for k, v in options.items() if k in factory.options}
    try:
        strategy = factory.build(**given)
    except Exception as e:
        raise ValueError(f"key strategy {name!r} could not be built: {reason(e)}") from e
    if not IKeyStrategy.providedBy(strategy):
        raise ValueError(
            f"key strategy {name!r} made {strategy!r}, which does not provide IKeyStrategy"
        )
    return strategy
