"""Address rewrites for both forwarding modes and the return path, checksums kept valid.

Why this module exists: the balancer sits where a router would and sends each
terminal's packets to its sticky backend by rewriting addresses, as IPVS does
in NAT mode.  Mobile IPv6 makes that more than a destination swap: the
upper-layer checksum of a packet carrying a Home Address option (HAO) covers the
*home* address, not the source, and a plain server drops a packet with an HAO.
The functions here do the rewrite on the caller's ``bytearray``, in place, with
RFC 1624 incremental checksum updates, so the per-packet cost stays a few
slices and integer operations.  The full story, with the reasons, is in
``docs/nat.md``.

Theory of operation
-------------------
Every function takes ``(buf, view)`` where ``view = lbproxy.wire.view.parse(buf)``
and returns either ``buf`` itself, rewritten, or a :class:`Drop` reason.  Once a
function has returned, ``view`` describes the old layout and must not be used
again.  Bytes past ``view.end`` (link-layer padding) are cut off.

* :func:`transparent`: destination := backend; everything else, the HAO
  included, stays.  For MIPv6-aware backends.
* :func:`translate`: destination := backend, source := home address, HAO
  removed (the whole Destination Options header when nothing but padding is
  left in it).  For plain servers, which drop packets carrying an HAO.
* :func:`reply`: the return path.  Source := virtual address; with a confirmed
  care-of address a Type 2 Routing Header is inserted and the packet is sent
  to the care-of address.  An ICMPv6 error also has its quoted packet turned
  back into what the terminal sent, so path MTU discovery works end to end.
* :func:`error_to_backend`: the other way round, an ICMPv6 error about one of
  our replies (sent to the virtual address) goes to the backend, its quote
  turned back into what the backend sent (:func:`quoted_addresses` finds the
  binding).

Checksums: the pseudo-header (RFC 8200 section 8.1) uses the home address as
source when an HAO is present and the final destination (the RH2 address) as
destination when a Routing Header is present (RFC 6275 sections 6.3 and 6.4).
So inbound only the destination change counts, in both modes, and on the
return path only the source change does.  A non-first fragment carries no
upper-layer header: its addresses change and the first fragment's checksum
adjustment covers the whole reassembled datagram.  ESP has nothing to fix.

Every rewrite decrements the Hop Limit like a router; a packet that arrives
with a Hop Limit of 1 or 0 is dropped (:attr:`Drop.HOP_LIMIT`) and no ICMPv6
Time Exceeded is generated here.
"""

from __future__ import annotations

import enum
from typing import Final

from lbproxy.wire.checksum import (
    checksum,
    ones_sum,
    pseudo_header_sum,
    update16,
    update_sum,
    update_transport,
)
from lbproxy.wire.view import PacketView

__all__ = [
    "ICMPV6_ERROR_LIMIT",
    "ICMPV6_MIN_MTU",
    "Drop",
    "error_to_backend",
    "quoted_addresses",
    "reply",
    "reply_to_terminal",
    "translate",
    "transparent",
]

#: An ICMPv6 error must fit in the IPv6 minimum MTU (RFC 4443 section 2.4 (c));
#: when the return path adds a Type 2 Routing Header the quote is shortened.
ICMPV6_ERROR_LIMIT: Final = 1280

#: The IPv6 minimum link MTU (RFC 8200 section 5): no Packet Too Big goes below it.
ICMPV6_MIN_MTU: Final = 1280

#: Offset of the checksum field inside each upper-layer header we fix:
#: TCP (RFC 9293), UDP (RFC 768), ICMPv6 (RFC 4443), Mobility Header (RFC 6275 6.1.1).
_CSUM_AT: Final = {6: 16, 17: 6, 58: 2, 135: 4}

_UDP: Final = 17
_ICMPV6: Final = 58
#: A Type 2 Routing Header template (RFC 6275 section 6.4): Next Header and the home
#: address are filled in; Hdr Ext Len 2, Routing Type 2, Segments Left 1, reserved 0.
_RH2: Final = b"\x00\x02\x02\x01" + bytes(20)


class Drop(enum.Enum):
    """Why a rewrite refused a packet; the value is the counter name."""

    #: Hop Limit 0 or 1 on arrival: a router must not forward it (RFC 8200 section 3).
    HOP_LIMIT = "hop-limit"
    #: A Routing Header with segments left: the destination is a waypoint, not us.
    ROUTING_HEADER = "routing-header"
    #: error_to_backend() was given something that is not an ICMPv6 error with a quote.
    NOT_AN_ERROR = "not-an-icmp-error"
    #: error_to_backend() found the ICMPv6 checksum wrong before rewriting.
    BAD_CHECKSUM = "bad-checksum"


def transparent(buf: bytearray, view: PacketView, backend: bytes) -> bytearray | Drop:
    """Send a terminal's packet to ``backend`` (16 bytes), keeping every header.

    The HAO stays, so the pseudo-header source (the home address) is unchanged
    and only the destination change enters the checksum.
    """
    drop = _forward_checks(buf, view)
    if drop is not None:
        return drop
    _set_destination(buf, view, backend)
    return buf


def translate(buf: bytearray, view: PacketView, backend: bytes) -> bytearray | Drop:
    """Send a terminal's packet to a plain ``backend``: HAO out, source := home address.

    The pseudo-header source was the home address before (because of the HAO)
    and is the home address after (it is now the real source), so again only
    the destination change enters the checksum.  Without an HAO this is the
    same as :func:`transparent`.
    """
    drop = _forward_checks(buf, view)
    if drop is not None:
        return drop
    _set_destination(buf, view, backend)
    hoa = view.hoa
    if hoa != -1:
        buf[8:24] = buf[hoa:hoa + 16]
        _remove_hao(buf, view)
    return buf


def reply(
    buf: bytearray,
    view: PacketView,
    vip: bytes,
    care_of: bytes | None = None,
    home: bytes | None = None,
) -> bytearray | Drop:
    """Turn a backend's packet towards a terminal into one from the virtual address.

    ``vip`` becomes the source.  When ``care_of`` is given (a binding confirmed
    by an authenticated notification, never a bare HAO claim) a Type 2 Routing
    Header carrying the home address is inserted and the packet goes to the
    care-of address; the home address stays the final destination, so the
    checksum does not change for it.  Without ``care_of`` the destination
    stays the home address.  ``home``, when given and different from the
    packet's destination, becomes the final destination first.  A packet that
    already has a Routing Header (a MIPv6-aware backend in transparent mode
    addressing the terminal itself) gets only the new source.

    ICMPv6 errors also get their quoted packet's destination set to ``vip``
    (see :func:`_unquote`).
    """
    hop = buf[7]
    if hop <= 1:
        return Drop.HOP_LIMIT
    end = view.end
    if len(buf) != end:
        del buf[end:]
    buf[7] = hop - 1

    proto = view.proto
    error = proto == _ICMPV6 and buf[view.l4] < 128 and view.frag == -1
    if error:
        _unquote(buf, view, vip)

    old_src = buf[8:24]
    buf[8:24] = vip
    if view.hoa == -1:  # with an HAO the pseudo-header source is the home address
        _fix_l4(buf, view, old_src, vip)

    if view.rh != -1:
        return buf
    if home is not None and buf[24:40] != home:
        _set_destination(buf, view, home)
    if care_of is not None:
        _insert_rh2(buf, care_of)
        if error and len(buf) > ICMPV6_ERROR_LIMIT:
            _shorten_error(buf)
    return buf


#: The name docs/contracts.md uses for :func:`reply`.
reply_to_terminal = reply


def quoted_addresses(buf: bytes | bytearray, view: PacketView) -> tuple[bytes, bytes] | None:
    """The quoted packet's source and final destination in an ICMPv6 error, or None.

    For a Type 2 Routing Header in the quote the final destination is its home
    address.  The balancer uses this to find which binding an error arriving at
    the virtual address (about one of our replies) belongs to.  None when the
    packet is not an ICMPv6 error or its quote is shorter than an IPv6 header.
    """
    icmp = view.l4
    quote = icmp + 8
    if view.proto != _ICMPV6 or buf[icmp] >= 128 or view.frag != -1 or quote + 40 > view.end:
        return None
    final = quote + 24
    if buf[quote + 6] == 43 and quote + 64 <= view.end and buf[quote + 42] == 2:
        final = quote + 48
    return bytes(buf[quote + 8:quote + 24]), bytes(buf[final:final + 16])


def error_to_backend(
    buf: bytearray, view: PacketView, backend: bytes, added_rh2: bool = True
) -> bytearray | Drop:
    """Pass an ICMPv6 error about one of our replies on to the backend that sent it.

    A router between the balancer and the terminal reports a problem with a
    reply (source: the virtual address) to the virtual address.  The backend
    must see it as about the packet *it* sent: outer destination := backend;
    in the quote, source := backend and, when we had inserted a Type 2 Routing
    Header, that header is taken out again and the destination is the home
    address.  Because that header made our packet 24 bytes longer than the
    backend's, a Packet Too Big MTU is lowered by 24 (not below 1280, RFC 8200
    section 5).  The ICMPv6 checksum is verified first (a bad one is dropped:
    :attr:`Drop.BAD_CHECKSUM`), then recomputed: errors are rare and their
    layout changes here.

    ``added_rh2`` says whether the balancer inserts Type 2 Routing Headers on
    this path (translate mode, :func:`reply` with a care-of address).  In
    transparent mode the backend put the header there itself: pass False and
    the quote keeps it, and the MTU, unchanged.
    """
    icmp = view.l4
    end = view.end
    if quoted_addresses(buf, view) is None:
        return Drop.NOT_AN_ERROR
    hop = buf[7]
    if hop <= 1:
        return Drop.HOP_LIMIT
    if view.rh != -1 and buf[view.rh + 3]:
        return Drop.ROUTING_HEADER
    if checksum(memoryview(buf)[icmp:end], _icmp_pseudo(buf, view, end - icmp)):
        return Drop.BAD_CHECKSUM
    if len(buf) != end:
        del buf[end:]
    buf[7] = hop - 1
    buf[24:40] = backend
    quote = icmp + 8
    inner, proto = _quoted_l4_checksum(buf, quote, end)
    old_src = buf[quote + 8:quote + 24]
    buf[quote + 8:quote + 24] = backend
    if inner != -1:
        _update_at(buf, inner, proto, old_src, backend)
    if added_rh2 and buf[quote + 6] == 43 and quote + 64 <= len(buf) and buf[quote + 42] == 2:
        buf[quote + 24:quote + 40] = buf[quote + 48:quote + 64]
        buf[quote + 6] = buf[quote + 40]
        del buf[quote + 40:quote + 64]
        inner_length = max(0, (buf[quote + 4] << 8 | buf[quote + 5]) - 24)
        buf[quote + 4] = (inner_length >> 8) & 0xFF
        buf[quote + 5] = inner_length & 0xFF
        length = len(buf) - 40
        buf[4] = length >> 8
        buf[5] = length & 0xFF
        if buf[icmp] == 2:  # Packet Too Big (RFC 4443 section 3.2)
            mtu = max(ICMPV6_MIN_MTU, int.from_bytes(buf[icmp + 4:icmp + 8], "big") - 24)
            buf[icmp + 4:icmp + 8] = mtu.to_bytes(4, "big")
    buf[icmp + 2:icmp + 4] = b"\x00\x00"
    length = len(buf) - icmp
    csum = checksum(memoryview(buf)[icmp:], _icmp_pseudo(buf, view, length))
    buf[icmp + 2] = csum >> 8
    buf[icmp + 3] = csum & 0xFF
    return buf


def _icmp_pseudo(buf: bytearray, view: PacketView, length: int) -> int:
    """Pseudo-header sum of an ICMPv6 message: real source, final destination."""
    dst = buf[view.rh2:view.rh2 + 16] if view.rh2 != -1 else buf[24:40]
    return pseudo_header_sum(buf[8:24], dst, length, _ICMPV6)


def _forward_checks(buf: bytearray, view: PacketView) -> Drop | None:
    """Hop Limit and Routing Header checks shared by both inbound modes; trims padding."""
    hop = buf[7]
    if hop <= 1:
        return Drop.HOP_LIMIT
    if view.rh != -1 and buf[view.rh + 3]:
        return Drop.ROUTING_HEADER
    end = view.end
    if len(buf) != end:
        del buf[end:]
    buf[7] = hop - 1
    return None


def _set_destination(buf: bytearray, view: PacketView, new: bytes) -> None:
    """Rewrite the IPv6 destination and the upper-layer checksum that covers it."""
    old = buf[24:40]
    buf[24:40] = new
    _fix_l4(buf, view, old, new)


def _fix_l4(buf: bytearray, view: PacketView, old: bytes | bytearray, new: bytes) -> None:
    """Update the TCP/UDP/ICMPv6/MH checksum for a pseudo-header address old -> new.

    Nothing to do for a non-first fragment (proto 44), ESP, or unknown
    protocols.  A UDP checksum of 0 (none; invalid over IPv6 but seen) is left
    alone; a computed 0 is sent as 0xFFFF.  This runs for every packet of the general
    path (both directions), so it is :func:`_update_at` -- the field access and
    :func:`lbproxy.wire.checksum.update_transport`'s arithmetic -- written out: the two
    calls cost 50-90 ns and 25-35 ns a packet.  tests/test_nat.py holds this copy to
    `update_transport`.
    """
    proto = view.proto
    at = _CSUM_AT.get(proto)
    if at is None:
        return
    pos = view.l4 + at
    csum = buf[pos] << 8 | buf[pos + 1]
    if proto == _UDP and not csum:
        return  # UDP without a checksum: it stays 0
    folded = (0xFFFF - csum + int.from_bytes(new, "big") - int.from_bytes(old, "big")) % 0xFFFF
    csum = 0xFFFF - (folded or 0xFFFF)
    if not csum and proto == _UDP:
        csum = 0xFFFF
    buf[pos] = csum >> 8
    buf[pos + 1] = csum & 0xFF


def _update_at(
    buf: bytearray, pos: int, proto: int, old: bytes | bytearray, new: bytes | bytearray
) -> tuple[int, int]:
    """Update the ``proto`` checksum field at ``buf[pos]`` for covered bytes old -> new.

    :func:`lbproxy.wire.checksum.update_transport`, UDP's rules included; returns
    the field's value before and after (equal for a UDP field of 0, left alone).
    """
    before = buf[pos] << 8 | buf[pos + 1]
    after = update_transport(before, old, new, proto == _UDP)
    buf[pos] = after >> 8
    buf[pos + 1] = after & 0xFF
    return before, after


def _remove_hao(buf: bytearray, view: PacketView) -> None:
    """Take the HAO out: drop its header if only padding remains, else rebuild the header.

    Overwriting the HAO with an 18-byte PadN is not an option: Linux refuses
    runs of more than 7 padding bytes (RFC 4942 section 2.1.9.5) and would drop
    the packet.  Instead each padding run, the HAO counted as padding, is cut
    to its length modulo 8, which keeps every remaining option's alignment and
    the header a multiple of 8 bytes.
    """
    start = view.hao_hdr
    stop = start + view.hao_hdr_len
    rebuilt = _options_without(buf, start, stop, view.hao_opt)
    if rebuilt is None:
        buf[view.hao_prev_nh] = buf[start]
        del buf[start:stop]
        removed = stop - start
    else:
        buf[start:stop] = rebuilt
        removed = stop - start - len(rebuilt)
    length = (buf[4] << 8 | buf[5]) - removed
    buf[4] = length >> 8
    buf[5] = length & 0xFF


def _options_without(buf: bytearray, start: int, stop: int, skip: int) -> bytearray | None:
    """The options header ``buf[start:stop]`` without the option at ``skip``.

    ``None`` when nothing but padding would be left.  Offsets are trusted: the
    parser has checked every option length against the header.
    """
    out: bytearray | None = None
    run = 0
    i = start + 2
    while i < stop:
        kind = buf[i]
        if kind == 0:  # Pad1
            run += 1
            i += 1
            continue
        size = buf[i + 1] + 2
        if kind != 1 and i != skip:  # a real option: keep it, at the same alignment
            if out is None:
                out = bytearray(buf[start:start + 2])
            _pad(out, run & 7)
            run = 0
            out += buf[i:i + size]
        else:
            run += size
        i += size
    if out is None:
        return None
    _pad(out, run & 7)
    out[1] = (len(out) >> 3) - 1
    return out


def _pad(out: bytearray, size: int) -> None:
    """Append ``size`` (0..7) bytes of padding: Pad1 or one PadN (RFC 8200 section 4.2)."""
    if size == 1:
        out.append(0)
    elif size:
        out += bytes((1, size - 2)) + bytes(size - 2)


def _insert_rh2(buf: bytearray, care_of: bytes) -> None:
    """Insert ``NH 02 02 01 00000000 <dst>`` after any Hop-by-Hop header; dst := care_of.

    RFC 6275 section 6.4: the Type 2 Routing Header carries the home address and
    the packet is addressed to the care-of address.
    """
    if buf[6] == 0:  # Hop-by-Hop comes first and stays first
        prev = 40
        at = 40 + ((buf[41] + 1) << 3)
    else:
        prev = 6
        at = 40
    buf[at:at] = _RH2
    buf[at] = buf[prev]
    buf[at + 8:at + 24] = buf[24:40]
    buf[prev] = 43
    buf[24:40] = care_of
    length = (buf[4] << 8 | buf[5]) + 24
    buf[4] = length >> 8
    buf[5] = length & 0xFF


def _unquote(buf: bytearray, view: PacketView, vip: bytes) -> None:
    """Make an ICMPv6 error's quoted packet read as the terminal sent it: dst := vip.

    The quote is the packet the backend side saw, addressed to the backend
    (from the home address in translate mode).  Its destination becomes the
    virtual address again; its upper-layer checksum, when the quote still holds
    it, gets the reverse of the inbound adjustment; and the ICMPv6 checksum is
    updated for both changes.  The Packet Too Big MTU is passed on unchanged:
    see docs/nat.md for why neither adding nor subtracting the HAO's 24 bytes
    is right.
    """
    icmp = view.l4
    quote = icmp + 8
    end = view.end
    if quote + 40 > end:
        return
    old = buf[quote + 24:quote + 40]
    buf[quote + 24:quote + 40] = vip
    csum = update16(buf[icmp + 2] << 8 | buf[icmp + 3], old, vip)
    inner, proto = _quoted_l4_checksum(buf, quote, end)
    if inner != -1:
        before, after = _update_at(buf, inner, proto, old, vip)
        if after != before:
            csum = update_sum(csum, before, after)
    buf[icmp + 2] = csum >> 8
    buf[icmp + 3] = csum & 0xFF


def _quoted_l4_checksum(buf: bytearray, start: int, end: int) -> tuple[int, int]:
    """Offset of the quoted packet's upper-layer checksum field and its protocol.

    ``(-1, proto)`` when the quote is cut before the field, is a non-first
    fragment, or has no checksum we know.  The quote is untrusted and may be
    truncated anywhere, so every step is bounds-checked and the walk is bounded.
    """
    nh = buf[start + 6]
    off = start + 40
    for _ in range(8):
        if nh in (0, 43, 60):
            if off + 2 > end:
                return -1, nh
            nh, off = buf[off], off + ((buf[off + 1] + 1) << 3)
        elif nh == 44:
            if off + 8 > end or (buf[off + 2] << 8 | buf[off + 3]) & 0xFFF8:
                return -1, nh
            nh, off = buf[off], off + 8
        elif nh == 51:
            if off + 2 > end:
                return -1, nh
            nh, off = buf[off], off + ((buf[off + 1] + 2) << 2)
        else:
            break
    at = _CSUM_AT.get(nh)
    if at is None or off + at + 2 > end:
        return -1, nh
    return off + at, nh


def _shorten_error(buf: bytearray) -> None:
    """Cut an ICMPv6 error's quote to fit :data:`ICMPV6_ERROR_LIMIT`; keep its checksum.

    The cut keeps the message a multiple of 8 bytes long from the ICMPv6
    header, so the removed tail starts on a word boundary: its sum leaves the
    checksum, and the pseudo-header length goes down by the bytes cut.
    """
    icmp = _icmp_offset(buf)
    new_end = icmp + ((ICMPV6_ERROR_LIMIT - icmp) & ~7)
    old_len = len(buf) - icmp
    new_len = new_end - icmp
    tail = buf[new_end:]
    del buf[new_end:]
    csum = buf[icmp + 2] << 8 | buf[icmp + 3]
    csum = update_sum(csum, ones_sum(tail, old_len), new_len)
    buf[icmp + 2] = csum >> 8
    buf[icmp + 3] = csum & 0xFF
    length = len(buf) - 40
    buf[4] = length >> 8
    buf[5] = length & 0xFF


def _icmp_offset(buf: bytearray) -> int:
    """Offset of the ICMPv6 header after our own Hop-by-Hop/Routing insertion walk."""
    nh = buf[6]
    off = 40
    while nh in (0, 43, 60):
        nh, off = buf[off], off + ((buf[off + 1] + 1) << 3)
    return off
