"""The header-chain view: where each IPv6 header sits in a packet, as offsets.

Why this exists: every packet the balancer forwards must be classified (does it carry a
Home Address Option?  an ESP SPI?  which ports?) and possibly rewritten in place.  Parsing
into objects (as scapy does) costs tens of microseconds per packet; this module walks the
Next Header chain once, with byte indexing and precompiled struct unpackers, and records
*offsets* into the caller's buffer.  Nothing is copied; one small ``__slots__`` object is
created per packet.  docs/wire.md has the tables, the reasons and the measured speed.

Theory of operation
-------------------
``parse(buf)`` checks the fixed IPv6 header (version 6, 40 bytes, payload length inside
the buffer), then follows Next Header values from offset 40:

* Hop-by-Hop (0) and Destination Options (60): ``(HdrExtLen + 1) * 8`` bytes; their TLV
  options are walked (Pad1, PadN and unknown options are skipped by their length).  A Home
  Address Option (type 0xC9, RFC 6275 section 6.3) is recorded.
* Routing (43): ``(HdrExtLen + 1) * 8`` bytes; for Type 2 the home address sits 8 bytes in.
* Fragment (44): 8 bytes.  For a *non-first* fragment (offset != 0) the walk stops there:
  ``proto`` is 44, ``l4`` is the fragment payload and ``l4_prev_nh`` is the Fragment
  header's own Next Header byte (so ``buf[view.l4_prev_nh]`` is the fragmented protocol).
  A first fragment (offset 0, including an atomic fragment) is walked on as usual.
* AH (51): ``(PayloadLen + 2) * 4`` bytes.
* ESP (50): the walk stops; ``spi`` is its first 4 bytes.  Nothing past it is readable.
* Mobility Header (135): the walk stops; ``mh_type`` is its third byte.
* Anything else is the upper layer and ends the walk: TCP (6) and UDP (17) report ports,
  ICMPv6 (58) and No Next Header (59) and unknown protocols report just ``proto``/``l4``.

Placement rules (RFC 8200 section 4.1, RFC 6275 section 6.3), enforced because a packet
breaking them is not one a conforming node would accept, and keying on it would let a
forged option steer traffic that real hosts would drop:

* Hop-by-Hop only directly after the IPv6 header; at most one Routing and one Fragment
  header (``BAD_EXTENSION_ORDER`` otherwise).  The second rule is stricter than RFC 8200
  (which says receivers should accept repeats): a view names one Routing and one Fragment
  header, and a packet with two has no single right answer to rewrite.
* The HAO only in a Destination Options header that comes after any Routing header and
  before any Fragment, AH or ESP header.  An HAO in Hop-by-Hop, in a Destination Options
  header after a Fragment or AH header, or followed later by a Routing header is
  ``HAO_MISPLACED``.
* At most one HAO in the packet (``DUPLICATE_HAO``); its option length must be 16
  (``BAD_HAO_LENGTH``).  When one HAO breaks several rules, the first of BAD_HAO_LENGTH,
  DUPLICATE_HAO, HAO_MISPLACED is reported.

Not supported: jumbograms (payload length 0 with a Jumbo Payload option): with payload
length 0 anything but No Next Header is ``TRUNCATED``.
"""

from __future__ import annotations

import enum
import struct
from typing import Final

__all__ = ["MAX_EXTENSION_HEADERS", "MalformedPacket", "PacketView", "Reason", "parse"]

#: More extension headers than this and the packet is refused (TOO_MANY_HEADERS).  Real
#: traffic carries two or three; the bound caps the work an attacker can make us do.
MAX_EXTENSION_HEADERS: Final = 16


class Reason(enum.Enum):
    """Why a packet is malformed; the edge counts drops by these names."""

    NOT_IPV6 = "not-ipv6"
    TRUNCATED = "truncated"
    BAD_PAYLOAD_LENGTH = "bad-payload-length"
    BAD_OPTION_LENGTH = "bad-option-length"
    DUPLICATE_HAO = "duplicate-hao"
    BAD_HAO_LENGTH = "bad-hao-length"
    HAO_MISPLACED = "hao-misplaced"
    TOO_MANY_HEADERS = "too-many-headers"
    BAD_EXTENSION_ORDER = "bad-extension-order"


class MalformedPacket(ValueError):  # noqa: N818 - the contract's name
    """The one exception :func:`parse` raises: the bytes are not a packet we accept.

    It carries a typed :attr:`reason` for counters; ``str(exc)`` says where and why.
    """

    def __init__(self, reason: Reason, detail: str) -> None:
        super().__init__(f"{reason.value}: {detail}")
        self.reason = reason


class PacketView:
    """Offsets of a packet's headers inside the buffer given to :func:`parse`.

    Why a class of plain ints: the hot path reads a few fields per packet; slot reads are
    the cheapest attribute access CPython has, and no payload bytes are referenced, so the
    buffer may be reused or rewritten in place.  Every offset is ``-1`` when absent.  The
    source address is always ``buf[8:24]`` and the destination ``buf[24:40]``.
    """

    __slots__ = (
        "ah",
        "dport",
        "end",
        "esp",
        "frag",
        "frag_id",
        "frag_more",
        "frag_offset",
        "hao_hdr",
        "hao_hdr_len",
        "hao_opt",
        "hao_prev_nh",
        "hoa",
        "l4",
        "l4_prev_nh",
        "mh",
        "mh_type",
        "proto",
        "rh",
        "rh2",
        "rh_len",
        "rh_prev_nh",
        "spi",
        "sport",
    )

    #: 40 + IPv6 payload length; bytes at or past it (link padding) are ignored.
    end: int
    #: Offset of the 16-byte home address inside the HAO.
    hoa: int
    #: Offset of the HAO's option-type byte (0xC9).
    hao_opt: int
    #: Offset and total length of the Destination Options header holding the HAO.
    hao_hdr: int
    hao_hdr_len: int
    #: Offset of the Next Header byte pointing at that header (6 = the IPv6 header's).
    hao_prev_nh: int
    #: Offset of the 16-byte address of a Type 2 Routing Header.
    rh2: int
    #: Offset and length of any Routing Header, and of the byte pointing at it.
    rh: int
    rh_len: int
    rh_prev_nh: int
    #: Offset of the Fragment header; its identification, offset (8-octet units), M flag.
    frag: int
    frag_id: int
    frag_offset: int
    frag_more: bool
    #: ESP: offset of the header and its SPI.
    esp: int
    spi: int
    #: Offset of an Authentication Header.
    ah: int
    #: Offset of the Mobility Header and its MH type (RFC 6275 section 6.1).
    mh: int
    mh_type: int
    #: The last Next Header value reached (44 for a non-first fragment), its header's
    #: offset, and the offset of the byte holding that value.
    proto: int
    l4: int
    l4_prev_nh: int
    #: TCP/UDP ports (-1 for anything else).
    sport: int
    dport: int

    def __repr__(self) -> str:
        present = ", ".join(
            f"{name}={getattr(self, name)!r}"
            for name in _REPR_ORDER
            if getattr(self, name) not in (-1, False)
        )
        return f"PacketView({present})"


_REPR_ORDER: Final = (
    "end", "proto", "l4", "l4_prev_nh", "sport", "dport", "hoa", "hao_opt", "hao_hdr",
    "hao_hdr_len", "hao_prev_nh", "rh", "rh_len", "rh_prev_nh", "rh2", "frag", "frag_id",
    "frag_offset", "frag_more", "ah", "esp", "spi", "mh", "mh_type",
)


_ipv6_header = struct.Struct("!B3xHB").unpack_from  # version byte, payload length, next header
_two_u16 = struct.Struct("!HH").unpack_from  # TCP/UDP source and destination ports
_u32 = struct.Struct("!I").unpack_from  # ESP SPI
_fragment = struct.Struct("!2xHI").unpack_from  # offset/flags word, identification
#: Destination Options bytes 1..7 in the usual HAO layout, ``NH 02 01 02 00 00 C9 10 <HoA>``:
#: Hdr Ext Len 2 (24 bytes), a PadN of 2 zeros that puts the HAO at its required 8n+6,
#: HAO type 0xC9, option length 16 (RFC 6275 section 6.3, PadN RFC 8200 section 4.2).
_CANONICAL_HAO_HEADER: Final = b"\x02\x01\x02\x00\x00\xc9\x10"
#: The walk's turns: MAX_EXTENSION_HEADERS extension headers and the header that ends it.
_HEADER_BUDGET: Final = (None,) * (MAX_EXTENSION_HEADERS + 1)


def _truncated(what: str, off: int, end: int) -> MalformedPacket:
    return MalformedPacket(
        Reason.TRUNCATED, f"{what} at offset {off} runs past the end of the packet ({end})"
    )


def parse(buf: bytes | bytearray | memoryview) -> PacketView:
    """Walk the IPv6 header chain of *buf* and return where everything is.

    *buf* starts at the IPv6 header (no link-layer header); a memoryview must have
    format ``B``.  Raises :class:`MalformedPacket`, and nothing else, for any input.
    """
    # Speed notes (measured, CPython 3.11): buf[i] costs about as much as a short
    # struct unpack, so two-byte reads index directly and wider ones use struct; the
    # usual Destination Options header (PadN + HAO) is recognised by one slice compare;
    # the view is created first and only present fields are stored over the defaults;
    # the walk is a for loop over a constant tuple (cheaper than counting headers).
    n = len(buf)
    if n < 40:
        if n and buf[0] >> 4 != 6:
            raise MalformedPacket(Reason.NOT_IPV6, f"IP version {buf[0] >> 4}")
        raise MalformedPacket(Reason.TRUNCATED, f"{n} bytes, shorter than an IPv6 header")
    vtc, plen, nh = _ipv6_header(buf)
    if vtc >> 4 != 6:
        raise MalformedPacket(Reason.NOT_IPV6, f"IP version {vtc >> 4}")
    end = 40 + plen
    if end > n:
        raise MalformedPacket(
            Reason.BAD_PAYLOAD_LENGTH, f"payload length {plen} but only {n - 40} bytes"
        )

    v = PacketView()
    v.end = end
    v.hoa = v.hao_opt = v.hao_hdr = v.hao_hdr_len = v.hao_prev_nh = -1
    v.rh2 = v.rh = v.rh_len = v.rh_prev_nh = -1
    v.frag = v.frag_id = v.frag_offset = -1
    v.frag_more = False
    v.esp = v.spi = v.ah = v.mh = v.mh_type = v.sport = v.dport = -1
    hoa = rh = frag = -1
    late = False  # a Fragment or AH header was seen: an HAO from here on is misplaced
    hao_free = True  # neither an HAO nor a Fragment/AH header seen yet
    prev = 6
    off = 40

    for _ in _HEADER_BUDGET:  # one turn per extension header, plus the last one
        if nh == 17 or nh == 6:  # UDP, TCP
            if off + (8 if nh == 17 else 20) > end:
                raise _truncated("UDP header" if nh == 17 else "TCP header", off, end)
            v.sport, v.dport = _two_u16(buf, off)
            break

        if nh == 60 or nh == 0:  # Destination Options, Hop-by-Hop
            if (
                nh == 60
                and hao_free
                and buf[off + 1 : off + 8] == _CANONICAL_HAO_HEADER
                and off + 24 <= end
            ):
                # The usual layout (RFC 6275 section 6.3 alignment 8n+6): PadN(2), HAO.
                hend = off + 24
                v.hao_opt = off + 6
                v.hoa = hoa = off + 8
                v.hao_hdr = off
                v.hao_hdr_len = 24
                v.hao_prev_nh = prev
                hao_free = False
            else:
                if off + 2 > end:
                    raise _truncated("options header", off, end)
                hend = off + ((buf[off + 1] + 1) << 3)
                if hend > end:
                    raise _truncated("options header", off, end)
                if nh == 0 and off != 40:
                    raise MalformedPacket(
                        Reason.BAD_EXTENSION_ORDER, f"Hop-by-Hop header at offset {off}, not 40"
                    )
                i = off + 2
                while i < hend:
                    t = buf[i]
                    if t == 0:  # Pad1
                        i += 1
                        continue
                    if i + 2 > hend:
                        raise MalformedPacket(
                            Reason.BAD_OPTION_LENGTH,
                            f"option type {t:#04x} at offset {i} has no length byte",
                        )
                    j = i + 2 + buf[i + 1]
                    if j > hend:
                        raise MalformedPacket(
                            Reason.BAD_OPTION_LENGTH,
                            f"option type {t:#04x} at offset {i} overruns its header ({hend})",
                        )
                    if t == 0xC9:  # Home Address Option
                        if j - i != 18:
                            raise MalformedPacket(
                                Reason.BAD_HAO_LENGTH,
                                f"home address option at offset {i} has length {j - i - 2}",
                            )
                        if hoa != -1:
                            raise MalformedPacket(
                                Reason.DUPLICATE_HAO,
                                f"second home address option at offset {i} "
                                f"(first at {hoa - 2})",
                            )
                        if nh == 0 or late:
                            where = (
                                "Hop-by-Hop header"
                                if nh == 0
                                else "Destination Options header after a Fragment or AH header"
                            )
                            raise MalformedPacket(
                                Reason.HAO_MISPLACED,
                                f"home address option at offset {i} in a {where}",
                            )
                        v.hao_opt = i
                        v.hoa = hoa = i + 2
                        v.hao_hdr = off
                        v.hao_hdr_len = hend - off
                        v.hao_prev_nh = prev
                        hao_free = False
                    i = j
            prev = off
            nh = buf[off]
            off = hend

        elif nh == 50:  # ESP: nothing past the SPI is readable
            if off + 8 > end:
                raise _truncated("ESP header", off, end)
            v.esp = off
            v.spi = _u32(buf, off)[0]
            break

        elif nh == 44:  # Fragment
            if frag != -1:
                raise MalformedPacket(
                    Reason.BAD_EXTENSION_ORDER, f"second Fragment header at offset {off}"
                )
            if off + 8 > end:
                raise _truncated("Fragment header", off, end)
            v.frag = frag = off
            fo, v.frag_id = _fragment(buf, off)
            v.frag_offset = fo >> 3
            v.frag_more = bool(fo & 1)
            late = True
            hao_free = False
            prev = off
            off += 8
            if fo >> 3:
                # Non-first fragment: the rest is opaque payload (RFC 8200 section 4.5);
                # proto stays 44 and l4_prev_nh is the Fragment header's Next Header byte.
                break
            nh = buf[prev]

        elif nh == 43:  # Routing
            if rh != -1:
                raise MalformedPacket(
                    Reason.BAD_EXTENSION_ORDER, f"second Routing header at offset {off}"
                )
            if hoa != -1:
                raise MalformedPacket(
                    Reason.HAO_MISPLACED,
                    f"home address option at offset {hoa - 2} precedes the Routing header",
                )
            if off + 8 > end:
                raise _truncated("Routing header", off, end)
            v.rh_len = rh_len = (buf[off + 1] + 1) << 3
            if off + rh_len > end:
                raise _truncated("Routing header", off, end)
            if buf[off + 2] == 2:  # Type 2 (RFC 6275 section 6.4): the home address
                if rh_len < 24:
                    raise _truncated("Type 2 Routing header address", off, end)
                v.rh2 = off + 8
            v.rh = rh = off
            v.rh_prev_nh = prev
            prev = off
            nh = buf[off]
            off += rh_len

        elif nh == 51:  # Authentication Header (RFC 4302): length in 4-octet units
            if off + 8 > end:
                raise _truncated("Authentication Header", off, end)
            hend = off + ((buf[off + 1] + 2) << 2)
            if hend > end:
                raise _truncated("Authentication Header", off, end)
            v.ah = off
            late = True
            hao_free = False
            prev = off
            nh = buf[off]
            off = hend

        elif nh == 135:  # Mobility Header (RFC 6275 section 6.1): ends the chain
            if off + 8 > end or off + ((buf[off + 1] + 1) << 3) > end:
                raise _truncated("Mobility Header", off, end)
            v.mh = off
            v.mh_type = buf[off + 2]
            break

        else:
            # Upper layer (or an unknown header, treated as one).
            if nh == 58 and off + 4 > end:
                raise _truncated("ICMPv6 header", off, end)
            break

    else:
        raise MalformedPacket(
            Reason.TOO_MANY_HEADERS, f"more than {MAX_EXTENSION_HEADERS} extension headers"
        )

    v.proto = nh
    v.l4 = off
    v.l4_prev_nh = prev
    return v
