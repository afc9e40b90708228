"""Mobility Header messages (RFC 6275 §6.1): the binding and return routability messages.

The home-agent agent learns bindings by watching the Binding Updates a mobile node sends to
its home agent and the Acknowledgements the home agent returns; the test bed and the
benchmarks build the same messages.  The balancer as correspondent node
(`lbproxy.core.correspondent`) reads Home/Care-of Test Init messages and Binding Updates
and answers with Home/Care-of Tests, Binding Acknowledgements and Binding Errors.  This
module turns the Mobility Header's bytes into frozen values and back, with the Mobility
Header checksum, and nothing else: no sockets, no Twisted, no scapy, no cryptography.

Theory of operation
-------------------
A Mobility Header is ``Payload Proto | Header Len | MH Type | Reserved | Checksum | data``
(§6.1.1); its length is ``(Header Len + 1) * 8`` octets.  The data of a Binding Update is
``Sequence # | A H L K ... flags | Lifetime`` (§6.1.7), of a Binding Acknowledgement
``Status | K ... flags | Sequence # | Lifetime`` (§6.1.8); both are followed by mobility
options (§6.2) up to the end of the header.  Home and Care-of Test Init (§6.1.3, §6.1.4)
carry ``Reserved(2) | init cookie(8)``, Home and Care-of Test (§6.1.5, §6.1.6)
``nonce index(2) | init cookie(8) | keygen token(8)``, a Binding Error (§6.1.9)
``Status | Reserved | Home Address(16)``; each may be followed by options too.  Pad1/PadN
are dropped when parsing and put back when building, to honour each option's alignment
(the Alternate Care-of Address must sit at 8n+6, the Binding Authorization Data at
8n+2).  The checksum covers an IPv6 pseudo-header with Next Header 135 whose source is
the home address when a Home Address option is present (§6.1.1) and whose destination is
the final destination (the home address when a Type 2 Routing Header is present).

Malformed input raises :class:`MalformedMobility` with a :class:`MobilityReason`; nothing
else escapes :func:`parse`.
"""

from __future__ import annotations

import enum
import struct

import attrs

from lbproxy.wire.checksum import checksum, pseudo_header_sum

MH_PROTO = 135  # IPv6 Next Header value of the Mobility Header (RFC 6275 §6.1)
IPPROTO_NONE = 59  # the Payload Proto field must be IPPROTO_NONE (RFC 6275 §6.1.1)

MH_BRR = 0  # Binding Refresh Request (RFC 6275 §6.1.2)
MH_HOTI = 1  # Home Test Init (RFC 6275 §6.1.3)
MH_COTI = 2  # Care-of Test Init (RFC 6275 §6.1.4)
MH_HOT = 3  # Home Test (RFC 6275 §6.1.5)
MH_COT = 4  # Care-of Test (RFC 6275 §6.1.6)
MH_BU = 5  # Binding Update (RFC 6275 §6.1.7)
MH_BA = 6  # Binding Acknowledgement (RFC 6275 §6.1.8)
MH_BE = 7  # Binding Error (RFC 6275 §6.1.9)

#: Binding Error status values (RFC 6275 §6.1.9).
BE_UNKNOWN_HAO = 1  # unknown binding for the Home Address destination option
BE_UNKNOWN_MH = 2  # unrecognized MH Type value

OPT_PAD1 = 0  # RFC 6275 §6.2.2
OPT_PADN = 1  # RFC 6275 §6.2.3
OPT_REFRESH_ADVICE = 2  # Binding Refresh Advice, RFC 6275 §6.2.4
OPT_ALT_COA = 3  # Alternate Care-of Address, RFC 6275 §6.2.5
OPT_NONCE_INDICES = 4  # RFC 6275 §6.2.6
OPT_AUTH_DATA = 5  # Binding Authorization Data, RFC 6275 §6.2.7

# Binding Update flags, the top bits of the 16-bit word after the sequence number (§6.1.7).
BU_ACK = 0x8000  # A: acknowledge
BU_HOME = 0x4000  # H: home registration
BU_LINK_LOCAL = 0x2000  # L: link-local address compatibility
BU_KEY_MGMT = 0x1000  # K: key management mobility capability
# Binding Acknowledgement flag, the top bit of the octet after the status (§6.1.8).
BA_KEY_MGMT = 0x80

BA_ACCEPTED_MAX = 127  # status values below 128 mean the update was accepted (§6.1.8)
LIFETIME_UNIT = 4  # lifetimes count units of 4 seconds (§6.1.7)

# Alignment requirement (x, y) meaning "xn + y" for the options we know (RFC 6275 §6.2).
_ALIGN: dict[int, tuple[int, int]] = {
    OPT_REFRESH_ADVICE: (2, 0),
    OPT_ALT_COA: (8, 6),
    OPT_NONCE_INDICES: (2, 0),
    OPT_AUTH_DATA: (8, 2),
}
# Exact data length of the options we know (RFC 6275 §6.2.4-6.2.7).
_OPT_LEN: dict[int, int] = {
    OPT_REFRESH_ADVICE: 2,
    OPT_ALT_COA: 16,
    OPT_NONCE_INDICES: 4,
    OPT_AUTH_DATA: 12,
}
_FIXED = 12  # both BU and BA have 6 octets of message data after the 6-octet header
#: Where the options start (the smallest Header Len, in octets) per MH type (§6.1.3-6.1.9).
_MINIMUM: dict[int, int] = {
    MH_HOTI: 16, MH_COTI: 16, MH_HOT: 24, MH_COT: 24, MH_BU: 12, MH_BA: 12, MH_BE: 24,
}
COOKIE_LEN = 8  # init cookies (§6.1.3)
TOKEN_LEN = 8  # keygen tokens (§6.1.5)
AUTHENTICATOR_LEN = 12  # the Binding Authorization Data option's data (§6.2.7)


class MobilityReason(enum.Enum):
    """Why a Mobility Header was refused."""

    TRUNCATED = "truncated"
    BAD_PAYLOAD_PROTO = "payload proto is not 59"
    BAD_HEADER_LENGTH = "header length too small for the message type"
    BAD_CHECKSUM = "checksum mismatch"
    BAD_OPTION = "malformed mobility option"
    DUPLICATE_ALT_COA = "more than one alternate care-of address option"
    BAD_ADDRESS = "address is not 16 octets"
    NO_AUTHENTICATOR = "no binding authorization data option"
    AUTHENTICATOR_NOT_LAST = "binding authorization data is not the last option"


class MalformedMobility(ValueError):  # noqa: N818 - named like view.MalformedPacket
    """A Mobility Header that cannot be parsed; ``reason`` says why."""

    def __init__(self, reason: MobilityReason, detail: str = "") -> None:
        self.reason = reason
        super().__init__(f"{reason.value}{': ' + detail if detail else ''}")


@attrs.frozen
class MobilityOption:
    """A mobility option other than padding and the Alternate Care-of Address, kept verbatim."""

    type: int
    data: bytes


@attrs.frozen
class BindingUpdate:
    """A Binding Update (RFC 6275 §6.1.7); ``lifetime`` is in 4-second units, as on the wire."""

    seq: int
    lifetime: int
    flags: int = BU_ACK | BU_HOME
    alt_coa: bytes | None = None
    options: tuple[MobilityOption, ...] = ()

    @property
    def ack(self) -> bool:
        """A: the mobile node asks for a Binding Acknowledgement."""
        return bool(self.flags & BU_ACK)

    @property
    def home_registration(self) -> bool:
        """H: the receiver is asked to act as the home agent."""
        return bool(self.flags & BU_HOME)

    @property
    def link_local(self) -> bool:
        """L: the home address's interface ID equals the link-local one's."""
        return bool(self.flags & BU_LINK_LOCAL)

    @property
    def key_management(self) -> bool:
        """K: key management survives movement."""
        return bool(self.flags & BU_KEY_MGMT)

    @property
    def lifetime_seconds(self) -> int:
        """The requested lifetime in seconds."""
        return self.lifetime * LIFETIME_UNIT


@attrs.frozen
class BindingAck:
    """A Binding Acknowledgement (RFC 6275 §6.1.8); ``lifetime`` is in 4-second units."""

    status: int
    seq: int
    lifetime: int
    flags: int = 0
    options: tuple[MobilityOption, ...] = ()

    @property
    def accepted(self) -> bool:
        """Status values 0-127 mean the Binding Update was accepted."""
        return self.status <= BA_ACCEPTED_MAX

    @property
    def key_management(self) -> bool:
        """K: key management survives movement."""
        return bool(self.flags & BA_KEY_MGMT)

    @property
    def lifetime_seconds(self) -> int:
        """The granted lifetime in seconds."""
        return self.lifetime * LIFETIME_UNIT


@attrs.frozen
class OtherMobilityMessage:
    """Any other Mobility Header type, kept as its message data (after the checksum)."""

    mh_type: int
    data: bytes


@attrs.frozen
class HomeTestInit:
    """A Home Test Init (RFC 6275 §6.1.3): sent from the home address, through the home
    agent; ``cookie`` is the 8-octet home init cookie."""

    cookie: bytes
    options: tuple[MobilityOption, ...] = ()


@attrs.frozen
class CareOfTestInit:
    """A Care-of Test Init (RFC 6275 §6.1.4): sent from the care-of address directly."""

    cookie: bytes
    options: tuple[MobilityOption, ...] = ()


@attrs.frozen
class HomeTest:
    """A Home Test (RFC 6275 §6.1.5): the home nonce index, the home init cookie echoed
    and the 8-octet home keygen token."""

    nonce_index: int
    cookie: bytes
    token: bytes
    options: tuple[MobilityOption, ...] = ()


@attrs.frozen
class CareOfTest:
    """A Care-of Test (RFC 6275 §6.1.6): the care-of nonce index, cookie and token."""

    nonce_index: int
    cookie: bytes
    token: bytes
    options: tuple[MobilityOption, ...] = ()


@attrs.frozen
class BindingError:
    """A Binding Error (RFC 6275 §6.1.9); ``home`` is the home address of the packet
    that caused it (16 octets; zero when it had none)."""

    status: int
    home: bytes
    options: tuple[MobilityOption, ...] = ()


MobilityMessage = (
    BindingUpdate | BindingAck | HomeTestInit | CareOfTestInit | HomeTest | CareOfTest
    | BindingError | OtherMobilityMessage
)


def mh_checksum(src: bytes, dst: bytes, mh: bytes | bytearray | memoryview) -> int:
    """The Mobility Header checksum of ``mh`` (with its checksum field taken as zero).

    ``src`` is the home address when the packet carries a Home Address option, ``dst`` the
    final destination (RFC 6275 §6.1.1, RFC 8200 §8.1).  The arithmetic is
    :mod:`lbproxy.wire.checksum`'s; unlike UDP's, a computed 0 stays 0.
    """
    if len(src) != 16 or len(dst) != 16:
        raise MalformedMobility(MobilityReason.BAD_ADDRESS)
    pseudo = pseudo_header_sum(src, dst, len(mh), MH_PROTO)
    return checksum(bytes(mh[:4]) + b"\x00\x00" + bytes(mh[6:]), pseudo)


def _parse_options(buf: memoryview) -> tuple[bytes | None, tuple[MobilityOption, ...]]:
    alt_coa: bytes | None = None
    options: list[MobilityOption] = []
    i = 0
    while i < len(buf):
        otype = buf[i]
        if otype == OPT_PAD1:
            i += 1
            continue
        if i + 2 > len(buf):
            raise MalformedMobility(MobilityReason.BAD_OPTION, f"option {otype} cut short")
        olen = buf[i + 1]
        if i + 2 + olen > len(buf):
            raise MalformedMobility(MobilityReason.BAD_OPTION, f"option {otype} overruns")
        expected = _OPT_LEN.get(otype)
        if expected is not None and olen != expected:
            raise MalformedMobility(
                MobilityReason.BAD_OPTION, f"option {otype} length {olen} != {expected}"
            )
        data = bytes(buf[i + 2 : i + 2 + olen])
        if otype == OPT_ALT_COA:
            if alt_coa is not None:
                raise MalformedMobility(MobilityReason.DUPLICATE_ALT_COA)
            alt_coa = data
        elif otype != OPT_PADN:
            options.append(MobilityOption(otype, data))
        i += 2 + olen
    return alt_coa, tuple(options)


def parse(
    data: bytes | bytearray | memoryview,
    src: bytes | None = None,
    dst: bytes | None = None,
) -> MobilityMessage:
    """Parse one Mobility Header starting at ``data[0]``; bytes past its length are ignored.

    When ``src`` and ``dst`` are given (the pseudo-header's addresses, see
    :func:`mh_checksum`), the checksum is verified too.  Raises only :class:`MalformedMobility`.
    """
    buf = memoryview(data)
    if len(buf) < 8:
        raise MalformedMobility(MobilityReason.TRUNCATED, f"{len(buf)} octets")
    if buf[0] != IPPROTO_NONE:
        raise MalformedMobility(MobilityReason.BAD_PAYLOAD_PROTO, str(buf[0]))
    length = (buf[1] + 1) * 8
    if len(buf) < length:
        raise MalformedMobility(MobilityReason.TRUNCATED, f"{len(buf)} < {length} octets")
    buf = buf[:length]
    mh_type = buf[2]
    if src is not None and dst is not None:
        (wire,) = struct.unpack_from("!H", buf, 4)
        if mh_checksum(src, dst, buf) != wire:
            raise MalformedMobility(MobilityReason.BAD_CHECKSUM)
    fixed = _MINIMUM.get(mh_type)
    if fixed is None:
        return OtherMobilityMessage(mh_type, bytes(buf[6:]))
    if length < fixed:
        # RFC 6275 §9.2: discard when Header Len is below the type's minimum.
        raise MalformedMobility(MobilityReason.BAD_HEADER_LENGTH, f"type {mh_type}, {length}")
    alt_coa, options = _parse_options(buf[fixed:])
    if mh_type == MH_BU:
        seq, flags, lifetime = struct.unpack_from("!HHH", buf, 6)
        return BindingUpdate(seq, lifetime, flags, alt_coa, options)
    if alt_coa is not None:
        options = (MobilityOption(OPT_ALT_COA, alt_coa), *options)
    if mh_type == MH_BA:
        status, flags, seq, lifetime = struct.unpack_from("!BBHH", buf, 6)
        return BindingAck(status, seq, lifetime, flags, options)
    if mh_type == MH_HOTI:
        return HomeTestInit(bytes(buf[8:16]), options)
    if mh_type == MH_COTI:
        return CareOfTestInit(bytes(buf[8:16]), options)
    if mh_type == MH_BE:
        return BindingError(buf[6], bytes(buf[8:24]), options)
    (index,) = struct.unpack_from("!H", buf, 6)
    if mh_type == MH_HOT:
        return HomeTest(index, bytes(buf[8:16]), bytes(buf[16:24]), options)
    return CareOfTest(index, bytes(buf[8:16]), bytes(buf[16:24]), options)


def option_spans(data: bytes | bytearray | memoryview) -> list[tuple[int, int, int]]:
    """Every option of a whole Mobility Header ``data`` (already parsed, so well formed)
    other than padding, as (type, offset of its data, offset past it)."""
    buf = memoryview(data)
    length = (buf[1] + 1) * 8
    i = _MINIMUM.get(buf[2], length)
    spans = []
    while i < length:
        otype = buf[i]
        if otype == OPT_PAD1:
            i += 1
            continue
        end = i + 2 + buf[i + 1]
        if otype != OPT_PADN:
            spans.append((otype, i + 2, end))
        i = end
    return spans


def split_authenticator(data: bytes | bytearray | memoryview) -> tuple[bytes, bytes]:
    """The "MH Data" a Binding Authorization Data option's authenticator covers and the
    authenticator, from a whole (parsed) Binding Update or Acknowledgement ``data``.

    RFC 6275 §6.2.7: the option is the last one; MH Data is the Mobility Header without
    the Authenticator field, computed as if the Checksum field were zero.  Raises
    `MalformedMobility` (``NO_AUTHENTICATOR``, ``AUTHENTICATOR_NOT_LAST``).
    """
    buf = bytes(data[: (data[1] + 1) * 8])
    spans = option_spans(buf)
    found = [s for s in spans if s[0] == OPT_AUTH_DATA]
    if not found:
        raise MalformedMobility(MobilityReason.NO_AUTHENTICATOR)
    _, start, end = found[0]
    if len(found) > 1 or spans[-1][0] != OPT_AUTH_DATA or any(buf[end:]):
        raise MalformedMobility(MobilityReason.AUTHENTICATOR_NOT_LAST)
    mh_data = buf[:4] + b"\x00\x00" + buf[6:start] + buf[end:]
    return mh_data, buf[start:end]


def nonce_indices(options: tuple[MobilityOption, ...]) -> tuple[int, int] | None:
    """(home nonce index, care-of nonce index) of the Nonce Indices option, or None."""
    for option in options:
        if option.type == OPT_NONCE_INDICES:
            home, care_of = struct.unpack("!HH", option.data)
            return home, care_of
    return None


def nonce_indices_option(home: int, care_of: int) -> MobilityOption:
    """A Nonce Indices option (RFC 6275 §6.2.6)."""
    return MobilityOption(OPT_NONCE_INDICES, struct.pack("!HH", home, care_of))


def auth_data_option(authenticator: bytes = bytes(AUTHENTICATOR_LEN)) -> MobilityOption:
    """A Binding Authorization Data option (RFC 6275 §6.2.7); build it zeroed, compute
    the authenticator over `split_authenticator`'s MH Data, then build it again."""
    if len(authenticator) != AUTHENTICATOR_LEN:
        raise ValueError(f"an authenticator is {AUTHENTICATOR_LEN} octets")
    return MobilityOption(OPT_AUTH_DATA, authenticator)


def _pad(out: bytearray, count: int) -> None:
    if count == 1:
        out.append(OPT_PAD1)
    elif count > 1:
        out += bytes((OPT_PADN, count - 2)) + bytes(count - 2)


def _put_options(out: bytearray, options: tuple[MobilityOption, ...]) -> None:
    for option in options:
        x, y = _ALIGN.get(option.type, (1, 0))
        _pad(out, (y - len(out)) % x)
        if len(option.data) > 255:
            raise ValueError(f"option {option.type} data longer than 255 octets")
        out += bytes((option.type, len(option.data))) + option.data
    _pad(out, -len(out) % 8)


def build(message: MobilityMessage, src: bytes | None = None, dst: bytes | None = None) -> bytes:
    """The Mobility Header bytes of ``message``; with ``src``/``dst`` the checksum is set.

    Raises ``ValueError`` for a field out of range (a programming error, not input).
    """
    out = bytearray(6)
    if isinstance(message, OtherMobilityMessage):
        mh_type = message.mh_type
        out += message.data
        if len(out) % 8:
            raise ValueError("message data must make the header a multiple of 8 octets")
    else:
        options = message.options
        if isinstance(message, BindingUpdate):
            mh_type = MH_BU
            out += struct.pack("!HHH", message.seq, message.flags, message.lifetime)
            if message.alt_coa is not None:
                if len(message.alt_coa) != 16:
                    raise ValueError("alt_coa must be 16 octets")
                options = (MobilityOption(OPT_ALT_COA, message.alt_coa), *options)
        elif isinstance(message, BindingAck):
            mh_type = MH_BA
            out += struct.pack(
                "!BBHH", message.status, message.flags, message.seq, message.lifetime
            )
        elif isinstance(message, HomeTestInit | CareOfTestInit):
            mh_type = MH_HOTI if isinstance(message, HomeTestInit) else MH_COTI
            out += bytes(2) + _exactly(message.cookie, COOKIE_LEN, "cookie")
        elif isinstance(message, HomeTest | CareOfTest):
            mh_type = MH_HOT if isinstance(message, HomeTest) else MH_COT
            out += struct.pack("!H", message.nonce_index)
            out += _exactly(message.cookie, COOKIE_LEN, "cookie")
            out += _exactly(message.token, TOKEN_LEN, "token")
        else:
            mh_type = MH_BE
            out += bytes((message.status, 0)) + _exactly(message.home, 16, "home")
        _put_options(out, options)
    if len(out) > 2048:
        raise ValueError("mobility header longer than 2048 octets")
    out[0] = IPPROTO_NONE
    out[1] = len(out) // 8 - 1
    out[2] = mh_type
    if src is not None and dst is not None:
        struct.pack_into("!H", out, 4, mh_checksum(src, dst, out))
    return bytes(out)


def _exactly(value: bytes, n: int, what: str) -> bytes:
    if len(value) != n:
        raise ValueError(f"{what} must be {n} octets")
    return value


def bu_packet(care_of: bytes, home_agent: bytes, hoa: bytes, message: BindingUpdate) -> bytes:
    """A whole IPv6 packet carrying ``message`` as a mobile node sends it (RFC 6275 §11.7.1):
    from the care-of address to the home agent, with a Home Address option."""
    mh = build(message, hoa, home_agent)
    # Destination Options with the HAO at 8n+6: NH | 2 | PadN(2) | C9 10 <HoA> (24 octets).
    dest = bytes((MH_PROTO, 2, 1, 2, 0, 0, 0xC9, 16)) + hoa
    return _ipv6(care_of, home_agent, 60, dest + mh)


def ba_packet(home_agent: bytes, care_of: bytes, hoa: bytes, message: BindingAck) -> bytes:
    """A whole IPv6 packet carrying ``message`` as a home agent sends it (RFC 6275 §10.3.1):
    to the care-of address, with a Type 2 Routing Header holding the home address."""
    mh = build(message, home_agent, hoa)
    rh2 = bytes((MH_PROTO, 2, 2, 1, 0, 0, 0, 0)) + hoa
    return _ipv6(home_agent, care_of, 43, rh2 + mh)


def _ipv6(src: bytes, dst: bytes, nh: int, payload: bytes) -> bytes:
    return struct.pack("!IHBB", 6 << 28, len(payload), nh, 64) + src + dst + payload
