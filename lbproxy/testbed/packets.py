"""Mobile IPv6 packets built and taken apart by hand, for the test bed's emulators.

The terminal and home-agent emulators need a few RFC 6275 operations on whole
IPv6 packets: add a Home Address Option, strip a Type 2 Routing Header,
tunnel and untunnel IPv6-in-IPv6, and write or read Binding Updates and
Acknowledgements.  They are pure functions of bytes here, kept apart from the
programs' sockets so that tests can check them against scapy without root.

This is test tooling: it checks only what the emulators rely on and is not
the balancer's parser (that is ``lbproxy.wire``).  scapy is deliberately not
imported (GPL, and too slow for a packet pump).
"""

from __future__ import annotations

import struct

import attrs

IPV6_HEADER = 40
NH_HOP_BY_HOP = 0
NH_TCP = 6
NH_UDP = 17
NH_IPV6 = 41
NH_ROUTING = 43
NH_FRAGMENT = 44
NH_NONE = 59
NH_DEST_OPTS = 60
NH_MOBILITY = 135

HAO_TYPE = 0xC9
HAO_HEADER_LEN = 24  # canonical Destination Options header holding only an HAO
RH2_LEN = 24

MH_BU = 5  # RFC 6275 §6.1.7
MH_BA = 6  # RFC 6275 §6.1.8
BU_FLAG_A = 0x8000  # Acknowledge
BU_FLAG_H = 0x4000  # Home Registration
BU_FLAG_L = 0x2000  # Link-Local Address Compatibility
BU_FLAG_K = 0x1000  # Key Management Mobility Capability
BA_ACCEPTED = 0
BA_SEQ_OUT_OF_WINDOW = 135  # RFC 6275 §6.1.8
BA_NOT_HOME_SUBNET = 132
BA_REASON_UNSPECIFIED = 128

PAD_N_2 = b"\x01\x02\x00\x00"  # PadN carrying two zero octets (options and mobility options)


class PacketError(ValueError):
    """The bytes are not the packet the emulator expected (it drops them)."""


def checksum(data: bytes | bytearray | memoryview, initial: int = 0) -> int:
    """The Internet checksum (RFC 1071) of ``data``, seeded with a partial sum."""
    buf = bytes(data)
    if len(buf) % 2:
        buf += b"\x00"
    total = initial + sum(struct.unpack(f"!{len(buf) // 2}H", buf))
    while total >> 16:
        total = (total & 0xFFFF) + (total >> 16)
    return ~total & 0xFFFF


def pseudo_header_sum(src: bytes, dst: bytes, length: int, next_header: int) -> int:
    """The unfolded sum of the RFC 8200 §8.1 pseudo-header."""
    words = struct.unpack("!16H", src + dst)
    return sum(words) + (length >> 16) + (length & 0xFFFF) + next_header


def upper_checksum(src: bytes, dst: bytes, next_header: int, payload: bytes) -> int:
    """The checksum of an upper-layer payload (TCP, UDP, ICMPv6, Mobility Header)."""
    result = checksum(payload, pseudo_header_sum(src, dst, len(payload), next_header))
    if next_header == NH_UDP and result == 0:
        return 0xFFFF
    return result


def ipv6_header(src: bytes, dst: bytes, next_header: int, payload_length: int,
                hop_limit: int = 64) -> bytes:
    """A fixed IPv6 header with traffic class and flow label zero."""
    return struct.pack("!IHBB16s16s", 6 << 28, payload_length, next_header, hop_limit, src, dst)


def hao_header(next_header: int, hoa: bytes) -> bytes:
    """The canonical 24-byte Destination Options header carrying a Home Address Option.

    ``NH 02 | PadN(2) | C9 10 <HoA>``: the option lands on 8n+6 (RFC 6275 §6.3).
    """
    return bytes((next_header, 2)) + PAD_N_2 + bytes((HAO_TYPE, 16)) + hoa


def rh2_header(next_header: int, hoa: bytes) -> bytes:
    """A Type 2 Routing Header carrying ``hoa`` (RFC 6275 §6.4), segments left 1."""
    return bytes((next_header, 2, 2, 1)) + b"\x00" * 4 + hoa


def _check_ipv6(packet: bytes | bytearray) -> None:
    if len(packet) < IPV6_HEADER or packet[0] >> 4 != 6:
        raise PacketError("not an IPv6 packet")
    if IPV6_HEADER + struct.unpack_from("!H", packet, 4)[0] > len(packet):
        raise PacketError("truncated IPv6 packet")


def headers(packet: bytes | bytearray) -> list[tuple[int, int, int]]:
    """The header chain as ``(next_header, offset, offset_of_the_byte_naming_it)``.

    Walks Hop-by-Hop, Routing, Destination Options and Fragment headers; the
    last entry is the first header it does not walk (upper layer, MH, 41...).
    """
    _check_ipv6(packet)
    end = IPV6_HEADER + struct.unpack_from("!H", packet, 4)[0]
    chain = []
    nh, off, prev = packet[6], IPV6_HEADER, 6
    for _ in range(16):
        chain.append((nh, off, prev))
        if nh in (NH_HOP_BY_HOP, NH_ROUTING, NH_DEST_OPTS):
            if off + 2 > end:
                raise PacketError("truncated extension header")
            nh, prev, off = packet[off], off, off + (packet[off + 1] + 1) * 8
        elif nh == NH_FRAGMENT:
            if off + 8 > end:
                raise PacketError("truncated fragment header")
            nh, prev, off = packet[off], off, off + 8
        else:
            return chain
        if off > end:
            raise PacketError("extension header runs past the packet")
    raise PacketError("too many extension headers")


def find_hao(packet: bytes | bytearray) -> bytes | None:
    """The home address carried in a Home Address Option, or None."""
    for nh, off, _ in headers(packet):
        if nh != NH_DEST_OPTS:
            continue
        end = off + (packet[off + 1] + 1) * 8
        pos = off + 2
        while pos < end:
            kind = packet[pos]
            if kind == 0:
                pos += 1
                continue
            if pos + 2 > end or pos + 2 + packet[pos + 1] > end:
                raise PacketError("option runs past its header")
            if kind == HAO_TYPE:
                if packet[pos + 1] != 16:
                    raise PacketError("bad Home Address Option length")
                return bytes(packet[pos + 2:pos + 18])
            pos += 2 + packet[pos + 1]
    return None


def add_hao(packet: bytes | bytearray, care_of: bytes) -> bytes:
    """Turn a packet sent from the home address into one sent from ``care_of``.

    The source (the home address) moves into a Home Address Option inserted
    where RFC 6275 §6.3 puts it: after Hop-by-Hop, Routing and a Destination
    Options header preceding a Routing header, before Fragment and upper
    layers.  Upper-layer checksums stay valid: with an HAO their pseudo-header
    source is the home address (RFC 6275 §6.3).
    """
    chain = headers(packet)
    hoa = bytes(packet[8:24])
    index = 0
    while index < len(chain) - 1 and (
        chain[index][0] in (NH_HOP_BY_HOP, NH_ROUTING)
        or (chain[index][0] == NH_DEST_OPTS and chain[index + 1][0] == NH_ROUTING)
    ):
        index += 1
    nh, off, prev = chain[index]
    out = bytearray(packet[:off]) + hao_header(nh, hoa) + packet[off:]
    out[prev] = NH_DEST_OPTS
    struct.pack_into("!H", out, 4, len(out) - IPV6_HEADER)
    out[8:24] = care_of
    return bytes(out)


def strip_rh2(packet: bytes | bytearray) -> tuple[bytes, bytes] | None:
    """``(home_address, packet_for_the_home_address)`` for a packet with an RH2, else None.

    What a mobile node does with a Type 2 Routing Header (RFC 6275 §9.3.3):
    the destination becomes the home address and the header goes away.
    Upper-layer checksums stay valid (their pseudo-header already used the
    final destination).
    """
    for nh, off, prev in headers(packet):
        if nh != NH_ROUTING or packet[off + 2] != 2:
            continue
        if packet[off + 1] != 2 or packet[off + 3] != 1:
            raise PacketError("malformed Type 2 Routing Header")
        hoa = bytes(packet[off + 8:off + 24])
        out = bytearray(packet[:off]) + packet[off + RH2_LEN:]
        out[prev] = packet[off]
        struct.pack_into("!H", out, 4, len(out) - IPV6_HEADER)
        out[24:40] = hoa
        return hoa, bytes(out)
    return None


def encapsulate(inner: bytes | bytearray, src: bytes, dst: bytes, hop_limit: int = 64) -> bytes:
    """IPv6-in-IPv6 (RFC 2473), as a home agent tunnels to a care-of address."""
    return ipv6_header(src, dst, NH_IPV6, len(inner), hop_limit) + bytes(inner)


def decapsulate(packet: bytes | bytearray) -> bytes | None:
    """The inner packet of an IPv6-in-IPv6 packet, or None if it is not one."""
    nh, off, _ = headers(packet)[-1]
    if nh != NH_IPV6:
        return None
    end = IPV6_HEADER + struct.unpack_from("!H", packet, 4)[0]
    inner = bytes(packet[off:end])
    _check_ipv6(inner)
    return inner


@attrs.frozen
class MobilityMessage:
    """A Binding Update or Acknowledgement as read off the wire (RFC 6275 §6.1)."""

    mh_type: int
    src: bytes  # the IPv6 source (a care-of address for a BU)
    dst: bytes  # the IPv6 destination (a care-of address for a BA)
    hoa: bytes | None  # from the HAO (BU) or the RH2 (BA)
    seq: int
    lifetime: int  # in units of 4 seconds
    flags: int = 0  # BU: A H L K..., BA: the K bit
    status: int = 0  # BA only
    checksum_ok: bool = True


def _mobility_header(mh_type: int, data: bytes) -> bytes:
    """A Mobility Header (checksum zero) padded to 8n octets with PadN."""
    body = data
    if (6 + len(body)) % 8:
        pad = 8 - (6 + len(body)) % 8
        body += b"\x00" if pad == 1 else bytes((1, pad - 2)) + b"\x00" * (pad - 2)
    length = (6 + len(body)) // 8 - 1
    return bytes((NH_NONE, length, mh_type, 0)) + b"\x00\x00" + body


def binding_update(care_of: bytes, home_agent: bytes, hoa: bytes, seq: int, lifetime: int,
                   flags: int = BU_FLAG_A | BU_FLAG_H) -> bytes:
    """A home registration Binding Update from ``care_of`` (RFC 6275 §6.1.7, §11.7.1).

    Carries an HAO; its checksum's pseudo-header source is therefore the HoA.
    """
    mh = bytearray(_mobility_header(MH_BU, struct.pack("!HHH", seq & 0xFFFF, flags, lifetime)))
    struct.pack_into("!H", mh, 4, upper_checksum(hoa, home_agent, NH_MOBILITY, bytes(mh)))
    ext = hao_header(NH_MOBILITY, hoa) + bytes(mh)
    return ipv6_header(care_of, home_agent, NH_DEST_OPTS, len(ext)) + ext


def binding_ack(home_agent: bytes, care_of: bytes, hoa: bytes, status: int, seq: int,
                lifetime: int, key_management: bool = False) -> bytes:
    """A Binding Acknowledgement to ``care_of`` routed to ``hoa`` by an RH2 (§6.1.8, §10.3.1).

    Its checksum's pseudo-header destination is the final one, the HoA.
    """
    data = struct.pack("!BBHH", status, 0x80 if key_management else 0, seq & 0xFFFF, lifetime)
    mh = bytearray(_mobility_header(MH_BA, data))
    struct.pack_into("!H", mh, 4, upper_checksum(home_agent, hoa, NH_MOBILITY, bytes(mh)))
    ext = rh2_header(NH_MOBILITY, hoa) + bytes(mh)
    return ipv6_header(home_agent, care_of, NH_ROUTING, len(ext)) + ext


def parse_mobility(packet: bytes | bytearray) -> MobilityMessage | None:
    """The BU or BA in ``packet``, or None if it carries no Mobility Header.

    The checksum is verified with the pseudo-header RFC 6275 §6.1.1 asks
    for: source = HoA when an HAO is present, destination = the RH2 address
    when one is present.
    """
    chain = headers(packet)
    nh, off, _ = chain[-1]
    if nh != NH_MOBILITY:
        return None
    end = IPV6_HEADER + struct.unpack_from("!H", packet, 4)[0]
    if off + 6 > end:
        raise PacketError("truncated Mobility Header")
    mh_len = (packet[off + 1] + 1) * 8
    if off + mh_len > end:
        raise PacketError("Mobility Header runs past the packet")
    mh = bytes(packet[off:off + mh_len])
    src, dst = bytes(packet[8:24]), bytes(packet[24:40])
    hoa = find_hao(packet)
    rh2 = None
    for h_nh, h_off, _ in chain:
        if h_nh == NH_ROUTING and packet[h_off + 2] == 2:
            rh2 = bytes(packet[h_off + 8:h_off + 24])
    pseudo_src = hoa if hoa is not None else src
    pseudo_dst = rh2 if rh2 is not None else dst
    ok = checksum(mh, pseudo_header_sum(pseudo_src, pseudo_dst, len(mh), NH_MOBILITY)) == 0
    mh_type = mh[2]
    if mh_type == MH_BU and len(mh) >= 12:
        seq, flags, lifetime = struct.unpack_from("!HHH", mh, 6)
        return MobilityMessage(MH_BU, src, dst, hoa, seq, lifetime, flags, 0, ok)
    if mh_type == MH_BA and len(mh) >= 12:
        status, kflag, seq, lifetime = struct.unpack_from("!BBHH", mh, 6)
        return MobilityMessage(MH_BA, src, dst, rh2, seq, lifetime, kflag, status, ok)
    return MobilityMessage(mh_type, src, dst, hoa or rh2, -1, 0, 0, 0, ok)


def seq_newer(seq: int, than: int) -> bool:
    """RFC 6275 §9.5.1: is ``seq`` greater than ``than`` modulo 2**16?"""
    return seq != than and (seq - than) % 0x10000 < 0x8000
