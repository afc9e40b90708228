"""QUIC-LB: the server ID a QUIC connection ID carries, as a terminal's identity.

Why this exists: a QUIC client that moves (Wi-Fi to cellular) keeps its connection and
changes its source address -- and, to be unlinkable, the connection ID it sends (RFC 9000
section 9.5).  Neither identity survives the move; what does is the *server ID* the
backend wrote into every connection ID it issued, the scheme of QUIC-LB
(draft-ietf-quic-load-balancers, "Generating Routable QUIC Connection IDs").  Reading it
needs no state: every balancer of a fleet, after any restart, sends the packet to the
backend that encoded it.

What is implemented of the draft: the connection ID, unencrypted ("plaintext" in its
earlier versions) or encrypted with an AES-128 key (single pass for 16 octets, four-pass
Feistel otherwise: `lbproxy.core.quiclb_cipher`)::

    first octet: config rotation (3 high bits) | length self-description (5 low bits)
    then:        server ID (server_id_length octets) | nonce (nonce_length octets),
                 both encrypted when a key is configured

read at the packet's Destination Connection ID by the QUIC invariants (RFC 8999): a
short header's starts at its second octet, with the configured length; a long header's
length is in the packet.  A packet yields no key -- the chain falls through -- unless it
is UDP to one of the configured ports, long enough, its first CID octet carries the
configured config rotation codepoint (and, if configured, the right length), and the
server ID is one a backend was configured with.  A client's first Initial (its own
random DCID) therefore falls through and is scheduled like any miss; the backend's
answer gives the client a routable CID for everything after.  With a key, a random DCID
that passes the first octet's checks decrypts to a random server ID, which names a
backend only by chance (server IDs over-provision the space, as the draft advises).

The strategy is a :class:`~lbproxy.core.keys.INamedKeyStrategy`: its key names the
backend (`backend_name`), so the balancer sends the packet there rather than looking
the key up in the sticky table or asking the scheduler (`lbproxy.core.balancer`), and
the packet's other identities follow that backend.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Mapping
from typing import TYPE_CHECKING, Final

import attrs
from zope.interface import implementer

from lbproxy.core.keys import INamedKeyStrategy, Key, kind_named
from lbproxy.core.quiclb_cipher import KEY_LENGTH, ServerIdCipher

if TYPE_CHECKING:
    from lbproxy.core.keys import Buffer
    from lbproxy.wire.view import PacketView

__all__ = [
    "DEFAULT_PORTS",
    "MAX_CID",
    "MIN_NONCE",
    "UNROUTABLE",
    "QuicLbSettings",
    "QuicLbStrategy",
    "encode_cid",
    "server_id_key",
]

#: QUIC's usual port (HTTP/3).
DEFAULT_PORTS: Final = (443,)
#: The longest connection ID of QUIC version 1 (RFC 9000 section 17.2).
MAX_CID: Final = 20
#: The config rotation codepoint the draft reserves for unroutable connection IDs.
UNROUTABLE: Final = 7
#: The draft's shortest nonce (octets).
MIN_NONCE: Final = 4
_UDP: Final = 17
_QUIC: Final = kind_named("quic")
_PREFIX: Final = _QUIC.prefix
_VALUE: Final = _QUIC.length  # 1 octet of length, then the server ID, zero-padded


def server_id_key(server_id: bytes) -> Key:
    """The ``quic`` key of a server ID (1 to 15 octets): ``quic 0a0b``."""
    if not 1 <= len(server_id) < _VALUE:
        raise ValueError(f"a server ID is 1 to {_VALUE - 1} octets, not {len(server_id)}")
    return Key("quic", bytes((len(server_id),)) + server_id.ljust(_VALUE - 1, b"\0"))


def _ports(value: Iterable[int]) -> frozenset[int]:
    return frozenset(value)


def _server_ids(
    value: Mapping[bytes, str] | Iterable[tuple[bytes, str]],
) -> tuple[tuple[bytes, str], ...]:
    pairs = value.items() if isinstance(value, Mapping) else value
    return tuple(sorted((bytes(k), str(v)) for k, v in pairs))


@attrs.frozen
class QuicLbSettings:
    """One QUIC-LB configuration: what the backends' connection IDs look like, which
    backend each server ID names, and which UDP ports carry QUIC."""

    #: The config rotation codepoint of the first CID octet (0 to 6).
    config_rotation: int = 0
    server_id_length: int = 2
    nonce_length: int = 5
    #: Whether the first octet's 5 low bits are the CID length minus one (else random).
    length_self_description: bool = True
    ports: frozenset[int] = attrs.field(default=frozenset(DEFAULT_PORTS), converter=_ports)
    #: (server ID, backend name) pairs (a mapping is accepted); frozen, so hashable.
    server_ids: tuple[tuple[bytes, str], ...] = attrs.field(default=(), converter=_server_ids)
    #: The AES-128 key of encrypted connection IDs (16 octets), or None: unencrypted.
    #: Never shown (``repr``).
    key: bytes | None = attrs.field(default=None, repr=False)

    def __attrs_post_init__(self) -> None:
        problem = self.problem()
        if problem is not None:
            raise ValueError(problem)

    @property
    def cid_length(self) -> int:
        """The backends' connection ID length: first octet, server ID, nonce."""
        return 1 + self.server_id_length + self.nonce_length

    def problem(self) -> str | None:
        """Why these settings cannot work (None: they can)."""
        if not 0 <= self.config_rotation < UNROUTABLE:
            return (f"config rotation {self.config_rotation} is not 0 to 6 (7 marks "
                    "unroutable connection IDs)")  # fmt: skip
        if not 1 <= self.server_id_length < _VALUE:
            return f"server ID length {self.server_id_length} is not 1 to {_VALUE - 1}"
        if self.nonce_length < MIN_NONCE:
            return f"nonce length {self.nonce_length} is below the draft's {MIN_NONCE}"
        if self.cid_length > MAX_CID:
            return (f"server ID and nonce ({self.server_id_length} + {self.nonce_length} "
                    f"octets) do not fit a {MAX_CID}-octet connection ID with its first "
                    "octet")  # fmt: skip
        if self.key is not None and len(self.key) != KEY_LENGTH:
            return f"a key is {KEY_LENGTH} octets (AES-128), not {len(self.key)}"
        for sid, _ in self.server_ids:
            if len(sid) != self.server_id_length:
                return (f"server ID {sid.hex()} is {len(sid)} octets, not "
                        f"{self.server_id_length}")  # fmt: skip
        return None


def encode_cid(settings: QuicLbSettings, server_id: bytes, nonce: bytes | None = None) -> bytes:
    """A connection ID naming `server_id` under `settings` (what a backend issues):
    the first octet, then the server ID and `nonce` (random when None) -- encrypted
    with the settings' key when they have one (`lbproxy.core.quiclb_cipher`)."""
    if len(server_id) != settings.server_id_length:
        raise ValueError(f"server ID {server_id.hex()} is not {settings.server_id_length} octets")
    if nonce is None:
        nonce = os.urandom(settings.nonce_length)
    if len(nonce) != settings.nonce_length:
        raise ValueError(f"a nonce is {settings.nonce_length} octets, not {len(nonce)}")
    low = settings.cid_length - 1 if settings.length_self_description else os.urandom(1)[0] & 0x1F
    body = server_id + nonce
    if settings.key is not None:
        body = ServerIdCipher(settings.key, len(server_id), len(nonce)).encrypt(body)
    return bytes(((settings.config_rotation << 5) | low,)) + body


@implementer(INamedKeyStrategy)
class QuicLbStrategy:
    """The ``quic`` strategy: the server ID of a QUIC packet's Destination Connection ID,
    when it names a configured backend (see the module's docstring)."""

    kind = "quic"
    __slots__ = ("_cid", "_cipher", "_first", "_keys", "_mask", "_names", "_ports", "_sid",
                 "settings")  # fmt: skip

    def __init__(self, settings: QuicLbSettings | None = None) -> None:
        self.settings = settings = settings or QuicLbSettings()
        self._ports = settings.ports
        self._sid = settings.server_id_length
        self._cid = settings.cid_length
        # The first octet's bits that must match: config rotation, and the length when
        # the connection IDs describe it.
        if settings.length_self_description:
            self._mask = 0xFF
            self._first = (settings.config_rotation << 5) | (self._cid - 1)
        else:
            self._mask = 0xE0
            self._first = settings.config_rotation << 5
        self._names = {server_id_key(s): n for s, n in settings.server_ids}
        # Server ID -> its key, built once: a packet's key costs a slice and a lookup.
        self._keys = {s: server_id_key(s) for s, _ in settings.server_ids}
        self._cipher = (None if settings.key is None else
                        ServerIdCipher(settings.key, self._sid, settings.nonce_length))  # fmt: skip

    def key_for(self, buf: Buffer, view: PacketView) -> Key | None:
        if view.proto != _UDP or view.dport not in self._ports:
            return None
        p = view.l4 + 8  # the UDP payload: the QUIC packet
        end = view.end
        if p >= end:
            return None
        if buf[p] & 0x80:  # long header: version (4), DCID length (1), DCID
            if p + 6 > end:
                return None
            length = buf[p + 5]
            cid = p + 6
            if length != self._cid or cid + length > end:
                return None
        else:  # short header: the DCID, of the configured length, at the second octet
            cid = p + 1
            if cid + self._cid > end:
                return None
        if buf[cid] & self._mask != self._first:
            return None
        if self._cipher is not None:
            return self._keys.get(self._cipher.server_id(buf[cid + 1 : cid + self._cid]))
        return self._keys.get(bytes(buf[cid + 1 : cid + 1 + self._sid]))

    def backend_name(self, key: Key) -> str | None:
        return self._names.get(key)

    def __repr__(self) -> str:
        return f"QuicLbStrategy({self.settings!r})"

