"""The Internet checksum (RFC 1071), the IPv6 pseudo-header, and RFC 1624 updates.

Why this module exists: every rewrite lbproxy does (a new destination, a new
source, a removed option) changes what the TCP, UDP, ICMPv6 and Mobility Header
checksums cover, and the forwarder must keep them valid without re-reading the
whole payload for every packet.

Theory of operation
-------------------
The Internet checksum is the one's complement of the one's complement sum of
the data taken as big-endian 16-bit words.  One's complement addition of
16-bit words is addition modulo 0xFFFF (2**16 is congruent to 1), so the sum of
a whole buffer is ``int.from_bytes(buffer, "big") % 0xFFFF``: one C-level
conversion and one C-level division, much faster in CPython than a Python loop
over words.  One's complement has two zeros, 0x0000 and 0xFFFF; an
end-around-carry sum of data that is not all zero is never 0x0000, so
``_fold`` maps a remainder of zero to 0xFFFF unless the data was all zero.
With that rule, a checksum computed from scratch and one updated with
:func:`update16` are bit-for-bit the same (RFC 1624 section 3, equation 3,
which avoids the "-0" result of equation 2).

Conventions used by every function here:

* a *sum* is a folded 16-bit one's complement sum (not complemented);
* a *checksum* is what goes into a header field: the complement of a sum;
* a buffer of odd length is padded with a zero byte at its end (RFC 1071).

UDP over IPv6 sends a computed checksum of 0x0000 as 0xFFFF (RFC 8200 section
8.1), and a received UDP checksum of 0x0000 means "none" (RFC 768; not allowed
over IPv6 but seen), which an update must leave at 0 rather than make up.  TCP,
ICMPv6 and the Mobility Header have neither rule.  :func:`udp_field` applies the
first to a computed checksum; :func:`update_transport` and
:func:`apply_delta16` apply both when told the field is UDP's.

This module is the one place for this arithmetic: other modules call it.  A
per-packet loop that measured a call as too costly may inline one of these
expressions; it marks the copy with a comment naming the function
("`checksum.apply_delta16`, inlined"), and tests/test_checksum.py holds every
such copy to the function here.
"""

from __future__ import annotations

__all__ = [
    "apply_delta16",
    "checksum",
    "delta16",
    "ones_sum",
    "pseudo_header_sum",
    "udp_field",
    "update16",
    "update_sum",
    "update_transport",
]

_MASK = 0xFFFF


def _fold(value: int) -> int:
    """Reduce a non-negative integer to its one's complement 16-bit sum.

    Zero stays zero only for a zero input: anything else lands in 1..0xFFFF,
    as an end-around-carry adder would produce.
    """
    folded = value % _MASK
    if folded == 0 and value:
        return _MASK
    return folded


def ones_sum(data: bytes | bytearray | memoryview, initial: int = 0) -> int:
    """Return the one's complement sum of ``data`` (big-endian words) plus ``initial``.

    ``initial`` is another sum (for example :func:`pseudo_header_sum`) to
    carry in.  Odd-length data is padded with one zero byte, as RFC 1071 says.
    """
    value = int.from_bytes(data, "big")
    if len(data) & 1:
        value <<= 8
    return _fold(value + initial)


def checksum(data: bytes | bytearray | memoryview, initial: int = 0) -> int:
    """Return the RFC 1071 checksum of ``data`` with the sum ``initial`` carried in.

    To fill a checksum field: zero the field, then store
    ``checksum(l4_bytes, pseudo_header_sum(...))``.  To verify: the same call
    over the bytes *with* the field returns 0 for a correct packet.
    """
    return _MASK - ones_sum(data, initial)


def pseudo_header_sum(src: bytes | bytearray, dst: bytes | bytearray, length: int, nh: int) -> int:
    """Return the sum of the IPv6 pseudo-header (RFC 8200 section 8.1).

    ``src`` and ``dst`` are 16-byte addresses; mind that with a Home Address
    option the source is the home address, and with a Routing Header the
    destination is the final one (RFC 6275 sections 6.3 and 6.4).  ``length``
    is the upper-layer packet length and ``nh`` the upper-layer protocol.
    """
    value = int.from_bytes(src, "big") + int.from_bytes(dst, "big") + length + nh
    return _fold(value)


def update_sum(field: int, old_sum: int, new_sum: int) -> int:
    """Return a checksum field updated for covered data whose sum went old -> new.

    RFC 1624 equation 3, ``HC' = ~(~HC + ~m + m')``, where ``m`` and ``m'``
    are sums (of any number of words) of what was replaced and what replaced
    it.  The result is canonical: equal to a checksum computed from scratch.
    """
    total = (_MASK - field) + (_MASK - old_sum) + new_sum
    folded = total % _MASK
    if folded == 0:
        # The true sum covers a pseudo-header that is never all zero, so it
        # is the 0xFFFF representation, as a from-scratch computation gives.
        folded = _MASK
    return _MASK - folded


def delta16(old: bytes | bytearray, new: bytes | bytearray) -> int:
    """The change ``old`` -> ``new`` (same even length) in one's-complement arithmetic,
    for :func:`apply_delta16`: computed once when it is the same for many packets
    (an address rewritten to a fixed one)."""
    return (int.from_bytes(new, "big") - int.from_bytes(old, "big")) % _MASK


def apply_delta16(csum: int, delta: int, udp: bool) -> int:
    """Checksum field ``csum`` updated by a :func:`delta16` (RFC 1624 equation 3).

    For UDP (``udp``) a field of 0 means "no checksum" and stays 0, and a result of 0
    is sent as 0xFFFF (RFC 768, RFC 8200 section 8.1), as :func:`update_transport` does.
    """
    if udp and not csum:
        return 0
    csum = _MASK - (((_MASK - csum + delta) % _MASK) or _MASK)
    return csum or (_MASK if udp else 0)


def update16(csum: int, old: bytes | bytearray, new: bytes | bytearray) -> int:
    """Return checksum field ``csum`` updated for ``old`` bytes replaced by ``new``.

    ``old`` and ``new`` have the same even length and start at an even offset
    of the checksummed data, such as a 16-byte address (8 words).  RFC 1624
    equation 3.
    """
    # ~HC + ~m + m' is congruent to (0xFFFF - HC) - m + m' modulo 0xFFFF; Python's %
    # of a negative number is non-negative, so one expression does it (hot path).
    folded = (_MASK - csum + int.from_bytes(new, "big") - int.from_bytes(old, "big")) % _MASK
    return _MASK - (folded or _MASK)


def update_transport(csum: int, old: bytes | bytearray, new: bytes | bytearray, udp: bool) -> int:
    """Transport checksum field ``csum`` updated for pseudo-header bytes ``old`` -> ``new``.

    :func:`update16` (``old`` and ``new`` as there: an address, 16 bytes) with
    UDP's rules when ``udp``: a field of 0 means "no checksum" and stays 0, and
    a result of 0 is sent as 0xFFFF (RFC 768, RFC 8200 section 8.1).  For TCP,
    ICMPv6 and the Mobility Header (``udp`` false) it is :func:`update16`.
    """
    if udp and not csum:
        return 0
    # update16's expression, written out: this runs for every packet lbproxy.core.nat
    # rewrites, where calling update16 from here cost ~30 ns (2 % of parse + rewrite).
    # tests/test_checksum.py holds it to update16.
    folded = (_MASK - csum + int.from_bytes(new, "big") - int.from_bytes(old, "big")) % _MASK
    csum = _MASK - (folded or _MASK)
    return csum or (_MASK if udp else 0)


def udp_field(csum: int) -> int:
    """Return the value to transmit for a computed UDP checksum: 0 is sent as 0xFFFF."""
    return csum or _MASK
