"""The mobile node's side of RFC 6275 return routability and correspondent registration.

The messages a mobile node sends to a correspondent node and reads from it, as pure
functions of bytes, for the terminal emulator's RFC mode
(:mod:`lbproxy.testbed.correspondents`):

* Home Test Init (MH type 1, §6.1.3) -- from the home address, to be reverse-tunnelled
  through the home agent -- and Care-of Test Init (type 2, §6.1.4) from the care-of
  address, each carrying a 64-bit init cookie;
* Home Test and Care-of Test (types 3 and 4, §6.1.5, §6.1.6): the cookie back, a nonce
  index and a 64-bit keygen token;
* the Binding Update to a correspondent (type 5, §6.1.7): source the care-of address,
  a Home Address Option, a Nonce Indices option (§6.2.6) and a Binding Authorization Data
  option (§6.2.7) whose authenticator is First(96, HMAC_SHA1(Kbm, care-of address |
  correspondent | MH Data)), MH Data being the Mobility Header without the authenticator
  itself and with the checksum taken as zero; Kbm = SHA1(home keygen token | care-of
  keygen token) (§5.2.5);
* the Binding Acknowledgement (type 6, §6.1.8), whose authenticator is checked the same
  way, and the Binding Error (type 7, §6.1.9).

Written from the RFC for the test bed, apart from the balancer's implementation of the
correspondent side, so that the two can check each other; the tests hold it to scapy's
dissection and checksums.
"""

from __future__ import annotations

import hashlib
import hmac
import struct

import attrs

from lbproxy.testbed import packets

MH_HOTI = 1
MH_COTI = 2
MH_HOT = 3
MH_COT = 4
MH_BU = 5
MH_BA = 6
MH_BE = 7

OPT_PAD1 = 0
OPT_PADN = 1
OPT_NONCE_INDICES = 4  # §6.2.6
OPT_AUTH_DATA = 5  # §6.2.7
AUTHENTICATOR_LEN = 12  # 96 bits

BA_ACCEPTED = 0
BA_SEQ_OUT_OF_WINDOW = 135
BA_EXPIRED_HOME_NONCE = 136
BA_EXPIRED_CARE_OF_NONCE = 137
BA_EXPIRED_NONCES = 138
BE_UNKNOWN_BINDING = 1  # a Home Address Option without a binding (§9.3.1)
BE_UNKNOWN_MH_TYPE = 2

#: A Binding Update to a correspondent asks for at most MAX_RR_BINDING_LIFETIME, 420 s
#: (§12), in units of 4 s.
MAX_RR_BINDING_LIFETIME = 105


def mobility_header(mh_type: int, data: bytes, src: bytes, dst: bytes) -> bytes:
    """A Mobility Header of ``mh_type`` around ``data`` (padded to 8n octets), with the
    checksum over the pseudo-header ``src``/``dst`` (§6.1.1: the home address when an
    HAO is present, the final destination when an RH2 is)."""
    mh = bytearray(packets._mobility_header(mh_type, data))
    struct.pack_into("!H", mh, 4, packets.upper_checksum(src, dst, packets.NH_MOBILITY,
                                                         bytes(mh)))
    return bytes(mh)


def home_test_init(hoa: bytes, correspondent: bytes, cookie: bytes) -> bytes:
    """A HoTI from the home address (the emulator tunnels it to the home agent)."""
    mh = mobility_header(MH_HOTI, b"\x00\x00" + _cookie(cookie), hoa, correspondent)
    return packets.ipv6_header(hoa, correspondent, packets.NH_MOBILITY, len(mh)) + mh


def care_of_test_init(care_of: bytes, correspondent: bytes, cookie: bytes) -> bytes:
    """A CoTI sent directly from the care-of address."""
    mh = mobility_header(MH_COTI, b"\x00\x00" + _cookie(cookie), care_of, correspondent)
    return packets.ipv6_header(care_of, correspondent, packets.NH_MOBILITY, len(mh)) + mh


def _cookie(cookie: bytes) -> bytes:
    if len(cookie) != 8:
        raise ValueError("an init cookie is 64 bits")
    return cookie


def binding_key(home_token: bytes, care_of_token: bytes | None) -> bytes:
    """Kbm = SHA1(home keygen token | care-of keygen token) (§5.2.5); a deregistration
    (care-of address = home address) uses the home keygen token alone."""
    return hashlib.sha1(home_token + (care_of_token or b"")).digest()


def authenticator(kbm: bytes, care_of: bytes, correspondent: bytes, mh_data: bytes) -> bytes:
    """First(96, HMAC_SHA1(Kbm, care-of address | correspondent | MH Data)) (§6.2.7).

    ``mh_data``: the Mobility Header without the 12 authenticator octets, checksum zero.
    """
    digest = hmac.new(kbm, care_of + correspondent + mh_data, hashlib.sha1).digest()
    return digest[:AUTHENTICATOR_LEN]


def correspondent_binding_update(care_of: bytes, correspondent: bytes, hoa: bytes, seq: int,
                                 lifetime: int, home_index: int, care_of_index: int,
                                 kbm: bytes, flags: int = packets.BU_FLAG_A) -> bytes:
    """A Binding Update to a correspondent node (§6.1.7, §11.7.2), route-optimised from
    ``care_of`` with an HAO, authorised by Kbm.

    Layout of the Mobility Header: 6 octets of header, sequence number, flags,
    lifetime (offset 12), Nonce Indices (2n, offset 12, 6 octets), Binding
    Authorization Data (8n+2, offset 18, 14 octets): 32 octets, no padding.
    """
    data = struct.pack("!HHH", seq & 0xFFFF, flags, lifetime)
    data += struct.pack("!BBHH", OPT_NONCE_INDICES, 4, home_index, care_of_index)
    data += bytes((OPT_AUTH_DATA, AUTHENTICATOR_LEN))
    length = (6 + len(data) + AUTHENTICATOR_LEN) // 8 - 1
    head = bytes((packets.NH_NONE, length, MH_BU, 0)) + b"\x00\x00"
    auth = authenticator(kbm, care_of, correspondent, head + data)
    mh = bytearray(head + data + auth)
    struct.pack_into("!H", mh, 4, packets.upper_checksum(hoa, correspondent,
                                                         packets.NH_MOBILITY, bytes(mh)))
    ext = packets.hao_header(packets.NH_MOBILITY, hoa) + bytes(mh)
    return packets.ipv6_header(care_of, correspondent, packets.NH_DEST_OPTS, len(ext)) + ext


@attrs.frozen
class Message:
    """A return-routability or registration message as read off the wire.

    ``home``: the home address of the HAO or RH2 (None without).  ``mh``: the whole
    Mobility Header, for the authenticator check.  Fields a type does not have are 0 or
    empty.
    """

    mh_type: int
    src: bytes
    dst: bytes
    home: bytes | None
    checksum_ok: bool
    mh: bytes
    cookie: bytes = b""  # HoTI/CoTI/HoT/CoT
    index: int = 0  # HoT/CoT: the nonce index
    token: bytes = b""  # HoT/CoT: the keygen token
    seq: int = 0  # BU/BA
    lifetime: int = 0  # BU/BA, units of 4 s
    flags: int = 0  # BU: A H L K; BA: the K bit
    status: int = 0  # BA/BE
    error_home: bytes = b""  # BE: its Home Address field
    options: tuple[tuple[int, int, bytes], ...] = ()  # (type, offset in mh, value)

    def option(self, kind: int) -> tuple[int, bytes] | None:
        """``(offset, value)`` of the first mobility option of ``kind``, or None."""
        for option_type, offset, value in self.options:
            if option_type == kind:
                return offset, value
        return None

    def nonce_indices(self) -> tuple[int, int] | None:
        """``(home nonce index, care-of nonce index)`` of a BU, or None."""
        found = self.option(OPT_NONCE_INDICES)
        if found is None or len(found[1]) != 4:
            return None
        home, care_of = struct.unpack("!HH", found[1])
        return home, care_of

    def authenticated(self, kbm: bytes, care_of: bytes, correspondent: bytes) -> bool:
        """Does the Binding Authorization Data option verify with ``kbm`` (§6.2.7)?

        It must be the last option and carry 96 bits; the MH Data is the header with
        the authenticator cut out and the checksum zeroed.
        """
        found = self.option(OPT_AUTH_DATA)
        if found is None or self.options[-1][0] != OPT_AUTH_DATA:
            return False
        offset, value = found
        if len(value) != AUTHENTICATOR_LEN:
            return False
        data = bytearray(self.mh[:offset + 2] + self.mh[offset + 2 + AUTHENTICATOR_LEN:])
        data[4:6] = b"\x00\x00"
        expected = authenticator(kbm, care_of, correspondent, bytes(data))
        return hmac.compare_digest(expected, value)


#: Where each message type's fixed part ends (offset in the Mobility Header).
_FIXED = {MH_HOTI: 16, MH_COTI: 16, MH_HOT: 24, MH_COT: 24, MH_BU: 12, MH_BA: 12,
          MH_BE: 24}


def parse(packet: bytes | bytearray) -> Message | None:
    """The Mobility Header message in ``packet``, or None if it has none.

    Raises :class:`~lbproxy.testbed.packets.PacketError` when it is cut short or its
    options run past it; the checksum is verified with the RFC 6275 pseudo-header
    (source = HAO's home address, destination = RH2's address when present).
    """
    chain = packets.headers(packet)
    nh, off, _ = chain[-1]
    if nh != packets.NH_MOBILITY:
        return None
    end = packets.IPV6_HEADER + struct.unpack_from("!H", packet, 4)[0]
    if off + 6 > end:
        raise packets.PacketError("truncated Mobility Header")
    mh = bytes(packet[off:off + (packet[off + 1] + 1) * 8])
    if off + len(mh) > end:
        raise packets.PacketError("Mobility Header runs past the packet")
    mh_type = mh[2]
    fixed = _FIXED.get(mh_type, 6)
    if len(mh) < fixed:
        raise packets.PacketError(f"Mobility Header type {mh_type} too short")
    src, dst = bytes(packet[8:24]), bytes(packet[24:40])
    hao = packets.find_hao(packet)
    rh2 = None
    for h_nh, h_off, _ in chain:
        if h_nh == packets.NH_ROUTING and packet[h_off + 2] == 2:
            rh2 = bytes(packet[h_off + 8:h_off + 24])
    pseudo = packets.pseudo_header_sum(hao or src, rh2 or dst, len(mh), packets.NH_MOBILITY)
    fields: dict[str, object] = {
        "mh_type": mh_type, "src": src, "dst": dst, "home": hao or rh2, "mh": mh,
        "checksum_ok": packets.checksum(mh, pseudo) == 0, "options": _options(mh, fixed)}
    if mh_type in (MH_HOTI, MH_COTI):
        fields["cookie"] = mh[8:16]
    elif mh_type in (MH_HOT, MH_COT):
        fields.update(index=struct.unpack_from("!H", mh, 6)[0], cookie=mh[8:16],
                      token=mh[16:24])
    elif mh_type == MH_BU:
        seq, flags, lifetime = struct.unpack_from("!HHH", mh, 6)
        fields.update(seq=seq, flags=flags, lifetime=lifetime)
    elif mh_type == MH_BA:
        status, kflag, seq, lifetime = struct.unpack_from("!BBHH", mh, 6)
        fields.update(status=status, flags=kflag, seq=seq, lifetime=lifetime)
    elif mh_type == MH_BE:
        fields.update(status=mh[6], error_home=mh[8:24])
    return Message(**fields)  # type: ignore[arg-type]


def _options(mh: bytes, start: int) -> tuple[tuple[int, int, bytes], ...]:
    """The mobility options (§6.2) after the fixed part; padding is left out."""
    found = []
    pos = start
    while pos < len(mh):
        kind = mh[pos]
        if kind == OPT_PAD1:
            pos += 1
            continue
        if pos + 2 > len(mh) or pos + 2 + mh[pos + 1] > len(mh):
            raise packets.PacketError("mobility option runs past the header")
        if kind != OPT_PADN:
            found.append((kind, pos, mh[pos + 2:pos + 2 + mh[pos + 1]]))
        pos += 2 + mh[pos + 1]
    return tuple(found)
