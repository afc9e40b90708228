"""The balancer as the terminals' correspondent node (RFC 6275 §5.2, §9): return
routability, Binding Updates, the binding cache and Binding Errors, for the virtual
addresses.

Why this exists: RFC 6275 §9.3.1 says a correspondent node drops a packet carrying a Home
Address Option unless it holds a binding for that home address at that care-of address.
A real mobile node therefore sends HAO packets to a server only after return
routability and a Binding Update to that server; plain backends behind a translating
balancer never answer those.  The balancer answers for them: it checks that the mobile
node can receive at both its home and its care-of address (the Home and Care-of Tests),
accepts a Binding Update whose authenticator proves it did, and so learns an
*authenticated* care-of address with no home agent's cooperation -- which the return
path (`lbproxy.core.returnpaths`) may then use for replies.

This module is pure logic over bytes and an injected clock; `lbproxy.core.balancer` calls
`Correspondent.handle` for Mobility Header packets to a virtual address and
`Correspondent.binding_error` for HAO packets without a binding (strict mode).  docs/
correspondent.md says what of RFC 6275 §9 is implemented and what is not.

Theory of operation
-------------------
*Node key and nonces* (§5.2.3, §5.2.7): ``Kcn`` is 20 random octets made at start.  A
new nonce (8 random octets) with the next 16-bit index replaces the current one every
``nonce_interval`` seconds (checked lazily, when one is needed); a retired nonce is still
accepted for ``nonce_lifetime`` (MAX_NONCE_LIFETIME, 240 s) after it was retired, then
forgotten, so the table holds ``nonce_lifetime / nonce_interval + 1`` nonces at most.

*Tokens* (§5.2.5): home keygen token = First(64, HMAC_SHA1(Kcn, home address | nonce |
0)), care-of keygen token = First(64, HMAC_SHA1(Kcn, care-of address | nonce | 1)), the
last part one octet.  Nothing is kept per Test Init: a Binding Update names the nonces by
index and the tokens are computed again from its addresses, so a Binding Update whose
Home Address Option is not the address that received the Home Test fails its
authenticator like any forgery.

*Binding Update* (§9.5.1), in this order; each refusal is counted by its reason and
changes nothing:

1. a well-formed Mobility Header with a valid checksum (pseudo-header source: the home
   address), a Home Address Option, no H bit (we are no home agent: BA status 131),
   unicast global addresses;
2. a Nonce Indices option and a Binding Authorization Data option (last): otherwise
   silently discarded;
3. both nonce indices still known: otherwise a Binding Acknowledgement with status 136,
   137 or 138 (without authenticator: there is no key to make one with);
4. Kbm = SHA1(home keygen token | care-of keygen token), or SHA1(home keygen token) when
   the care-of address is the home address (returning home; the care-of nonce index is
   then ignored); a lifetime-0 update from elsewhere may use either.  The authenticator
   = First(96, HMAC_SHA1(Kbm, care-of address | correspondent | MH Data)), MH Data being
   the Mobility Header without the authenticator, its checksum taken as zero (§6.2.7).
   A mismatch is silently discarded;
5. the sequence number, modulo 2**16, greater than the cached entry's -- or, without one,
   than the last of an entry ended (deregistered, expired, deleted) less than
   ``nonce_interval + nonce_lifetime`` ago, the longest its nonces may still be
   accepted (RFC 6275 §5.2.8: else a recorded update replayed after a deregistration
   binds again); any value without either: otherwise BA status 135 carrying that
   number.  At most ``max_entries`` ended entries are remembered, oldest dropped first;
6. accepted: lifetime 0 or care-of address = home address deletes the entry; otherwise
   the entry (care-of address, sequence number) lives min(requested, ``max_lifetime``)
   seconds (MAX_RR_BINDING_LIFETIME, 420 s).  A full cache refuses a new home address
   (BA status 130); an entry is never pushed out by another.

The Binding Acknowledgement (§9.5.4) is sent when the A bit asks for one or on a
refusal with a status; it carries its own Binding Authorization Data (same Kbm) when
Kbm is known, and goes to the care-of address with a Type 2 Routing Header holding the
home address (straight to the home address when they are one).

*Binding Error* (§9.3.3): status 1 (unknown binding for the HAO) to the packet's source,
status 2 (unrecognised MH type) likewise; at most ``binding_error_rate`` per second
(a token bucket holding one second's worth), the rest counted as rate limited.  The
Binding Acknowledgements sent before an authenticator could be checked (131, 136-138)
draw on the same budget: they may go to an Alternate Care-of Address nothing proved.

The cache expires on `expire` (the balancer's sweep), so the strict check -- does
``bindings`` map this home address to this source? -- is a dictionary lookup that every
executor can make alike.
"""

from __future__ import annotations

import hashlib
import heapq
import hmac
import itertools
import os
import struct
from collections import deque
from collections.abc import Callable, Iterator

import attrs
from twisted.internet.interfaces import IReactorTime

from lbproxy.wire import mobility as m

__all__ = [
    "MAX_NONCE_LIFETIME",
    "MAX_RR_BINDING_LIFETIME",
    "MODES",
    "CacheEntry",
    "Correspondent",
    "NonceTable",
    "Outcome",
    "authenticator",
    "binding_key",
    "keygen_token",
]

#: ``[correspondent] mode``: off (Mobility Headers forwarded like any packet, as before),
#: lenient (answered here; HAO packets without a binding keyed as before), strict (HAO
#: packets without a binding dropped with a Binding Error).
MODES = ("off", "lenient", "strict")

MAX_NONCE_LIFETIME = 240.0  # RFC 6275 §12
MAX_TOKEN_LIFETIME = 210.0  # RFC 6275 §12 (the mobile node's side)
MAX_RR_BINDING_LIFETIME = 420.0  # RFC 6275 §12
NODE_KEY_LEN = 20  # Kcn (§5.2.3)
NONCE_LEN = 8

# Binding Acknowledgement status values (RFC 6275 §6.1.8).
BA_ACCEPTED = 0
BA_INSUFFICIENT_RESOURCES = 130
BA_HOME_REGISTRATION_NOT_SUPPORTED = 131
BA_SEQUENCE_OUT_OF_WINDOW = 135
BA_EXPIRED_HOME_NONCE = 136
BA_EXPIRED_CARE_OF_NONCE = 137
BA_EXPIRED_NONCES = 138

_MH = 135


def keygen_token(node_key: bytes, address: bytes, nonce: bytes, care_of: bool) -> bytes:
    """A home (``care_of`` False) or care-of keygen token (RFC 6275 §5.2.5)."""
    digest = hmac.new(node_key, address + nonce + bytes((care_of,)), hashlib.sha1).digest()
    return digest[: m.TOKEN_LEN]


def binding_key(home_token: bytes, care_of_token: bytes | None) -> bytes:
    """Kbm (RFC 6275 §5.2.5); without a care-of token: returning home."""
    return hashlib.sha1(home_token + (care_of_token or b"")).digest()


def authenticator(kbm: bytes, care_of: bytes, correspondent: bytes, mh_data: bytes) -> bytes:
    """The Binding Authorization Data's authenticator (RFC 6275 §6.2.7)."""
    mac = hmac.new(kbm, care_of + correspondent + mh_data, hashlib.sha1).digest()
    return mac[: m.AUTHENTICATOR_LEN]


def sign(message: m.BindingUpdate | m.BindingAck, kbm: bytes, care_of: bytes,
         correspondent: bytes, src: bytes, dst: bytes) -> bytes:  # fmt: skip
    """``message`` (its options without a Binding Authorization Data option) built with
    one, last, whose authenticator is computed with ``kbm``; the checksum over the
    pseudo-header ``src``/``dst``."""
    unsigned = attrs.evolve(message, options=(*message.options, m.auth_data_option()))
    mh_data, _ = m.split_authenticator(m.build(unsigned))
    auth = authenticator(kbm, care_of, correspondent, mh_data)
    signed = attrs.evolve(message, options=(*message.options, m.auth_data_option(auth)))
    return m.build(signed, src, dst)


class NonceTable:
    """The correspondent's nonces by 16-bit index: a fresh one every ``interval``
    seconds, a retired one kept ``lifetime`` seconds (module docstring)."""

    def __init__(self, clock: IReactorTime, interval: float = 30.0,
                 lifetime: float = MAX_NONCE_LIFETIME,
                 random: Callable[[int], bytes] = os.urandom) -> None:  # fmt: skip
        if interval <= 0 or lifetime < 0:
            raise ValueError("the nonce interval must be > 0 and the lifetime >= 0")
        self.clock = clock
        self.interval = interval
        self.lifetime = lifetime
        self._random = random
        # (index, nonce, retired at) oldest first; the last is current (retired at: its
        # successor's due time).
        self._nonces: deque[tuple[int, bytes, float]] = deque()
        self._index = random(2)  # the first index is random: a restart does not reuse
        self._next = struct.unpack("!H", self._index)[0]

    def current(self) -> tuple[int, bytes]:
        """The nonce tokens are made with now, and its index."""
        self._rotate(self.clock.seconds())
        index, nonce, _ = self._nonces[-1]
        return index, nonce

    def get(self, index: int) -> bytes | None:
        """The nonce of ``index`` if it is still accepted, else None."""
        self._rotate(self.clock.seconds())
        for i, nonce, _ in self._nonces:
            if i == index:
                return nonce
        return None

    def __len__(self) -> int:
        return len(self._nonces)

    def _rotate(self, now: float) -> None:
        nonces = self._nonces
        if not nonces or now >= nonces[-1][2]:
            index = self._next
            self._next = (index + 1) & 0xFFFF
            nonces.append((index, self._random(NONCE_LEN), now + self.interval))
        while len(nonces) > 1 and nonces[0][2] + self.lifetime <= now:
            nonces.popleft()
        # Never two live nonces under one index (after 65,536 rotations within a
        # lifetime, impossible with interval > lifetime / 65536): the older goes.
        if len(nonces) > 1 and nonces[0][0] == nonces[-1][0]:
            nonces.popleft()


@attrs.define
class CacheEntry:
    """One binding cache entry (RFC 6275 §9.1): the home address's care-of address."""

    home: bytes
    care_of: bytes
    seq: int
    expires: float


@attrs.frozen
class Outcome:
    """What `Correspondent.handle` made of a Mobility Header packet: the packet to send
    (or None), what happened (a counter name: sent or accepted, or why refused), and,
    for an accepted Binding Update, the entry made (None when it deleted one: ``home``
    then names it)."""

    reply: bytes | None
    what: str
    refused: bool = False
    #: What ``reply`` is: "hot", "cot", "ba", "be" ("" without one).
    sent: str = ""
    home: bytes | None = None
    entry: CacheEntry | None = None
    deleted: bool = False


def _refused(what: str, reply: bytes | None = None, sent: str = "ba") -> Outcome:
    return Outcome(reply, what, refused=True, sent=sent if reply is not None else "")


def _unicast(address: bytes) -> bool:
    """A global (or unique-local) unicast address: not unspecified, loopback,
    multicast, link-local or IPv4-mapped -- somewhere a reply may go."""
    first = address[0]
    return not (
        first == 0xFF
        or (first == 0xFE and address[1] & 0xC0 == 0x80)
        or address[:15] == bytes(15)
        or address[:12] == bytes(10) + b"\xff\xff"
    )


class Correspondent:
    """The correspondent node for the virtual addresses: tokens, Binding Updates, the
    binding cache and Binding Errors (module docstring)."""

    def __init__(
        self,
        clock: IReactorTime,
        *,
        strict: bool = False,
        max_entries: int = 100_000,
        max_lifetime: float = MAX_RR_BINDING_LIFETIME,
        binding_error_rate: float = 10.0,
        nonce_interval: float = 30.0,
        nonce_lifetime: float = MAX_NONCE_LIFETIME,
        node_key: bytes | None = None,
        random: Callable[[int], bytes] = os.urandom,
    ) -> None:
        if max_entries < 1:
            raise ValueError("max_entries must be >= 1")
        self.clock = clock
        #: Strict mode: HAO packets without an entry are dropped with a Binding Error.
        self.strict = strict
        self.max_entries = max_entries
        self.max_lifetime = max_lifetime
        self.node_key = random(NODE_KEY_LEN) if node_key is None else node_key
        if len(self.node_key) != NODE_KEY_LEN:
            raise ValueError(f"the node key is {NODE_KEY_LEN} octets")
        self.nonces = NonceTable(clock, nonce_interval, nonce_lifetime, random)
        #: home -> care-of of every entry: the strict check (every executor reads it).
        self.bindings: dict[bytes, bytes] = {}
        self._entries: dict[bytes, CacheEntry] = {}
        self._deadlines: list[tuple[float, bytes]] = []
        # home -> (last sequence number, until) of entries ended while the nonces that
        # authorised them may still be accepted (RFC 6275 §5.2.8: else a recorded
        # Binding Update replayed after a deregistration or an expiry binds again);
        # oldest first, at most ``max_entries``.
        self._retired: dict[bytes, tuple[int, float]] = {}
        self.expired = 0
        #: Told the home address of every entry made, changed or ended (the XDP
        #: executor writes what the strict check allows into its program's map).
        self.listeners: list[Callable[[bytes], object]] = []
        self._rate = binding_error_rate
        self._tokens = binding_error_rate
        self._filled = clock.seconds()

    # -- the binding cache ---------------------------------------------------------------

    def entry(self, home: bytes) -> CacheEntry | None:
        """The live entry for ``home``, or None."""
        return self._entries.get(home)

    def entries(self, limit: int | None = None) -> Iterator[CacheEntry]:
        """Every entry, or the first ``limit`` (the operator's view, persistence)."""
        return iter(list(itertools.islice(self._entries.values(), limit)))

    def __len__(self) -> int:
        return len(self._entries)

    def register(self, home: bytes, care_of: bytes, seq: int, lifetime: float) -> CacheEntry:
        """Create or refresh ``home``'s entry (an accepted Binding Update did)."""
        expires = self.clock.seconds() + lifetime
        entry = self._entries.get(home)
        if entry is None:
            entry = self._entries[home] = CacheEntry(home, care_of, seq, expires)
        else:
            entry.care_of, entry.seq, entry.expires = care_of, seq, expires
        self.bindings[home] = care_of
        self._retired.pop(home, None)
        deadlines = self._deadlines
        heapq.heappush(deadlines, (expires, home))
        if len(deadlines) > 2 * len(self._entries) + 64:
            # A refreshed entry leaves its old deadline behind: Binding Updates sent as
            # fast as a mobile node can must not grow the heap without bound (rebuilt
            # in O(n), at most once per n refreshes).
            self._deadlines = [(e.expires, h) for h, e in self._entries.items()]
            heapq.heapify(self._deadlines)
        for listener in self.listeners:
            listener(home)
        return entry

    def delete(self, home: bytes) -> CacheEntry | None:
        """End ``home``'s entry (a deregistration, or the operator)."""
        self.bindings.pop(home, None)
        entry = self._entries.pop(home, None)
        if entry is not None:
            self._retire(home, entry.seq)
            for listener in self.listeners:
                listener(home)
        return entry

    def expire(self, now: float | None = None) -> list[bytes]:
        """End the entries whose lifetime ran out; returns their home addresses."""
        if now is None:
            now = self.clock.seconds()
        ended = []
        deadlines = self._deadlines
        while deadlines and deadlines[0][0] <= now:
            deadline, home = heapq.heappop(deadlines)
            entry = self._entries.get(home)
            if entry is not None and entry.expires == deadline:
                self.delete(home)
                ended.append(home)
        self.expired += len(ended)
        retired = self._retired
        while retired:
            home = next(iter(retired))
            if retired[home][1] > now:
                break
            del retired[home]
        return ended

    def _retire(self, home: bytes, seq: int) -> None:
        """Keep ``home``'s last sequence number while a nonce that authorised it may
        still be accepted (the module docstring, step 5)."""
        retired = self._retired
        retired.pop(home, None)
        if len(retired) >= self.max_entries:
            del retired[next(iter(retired))]
        until = self.clock.seconds() + self.nonces.interval + self.nonces.lifetime
        retired[home] = (seq, until)

    # -- Mobility Header packets ----------------------------------------------------------

    def handle(self, buf: bytes | bytearray, mh: int, hoa: int, end: int) -> Outcome:
        """A packet to the virtual address ``buf[24:40]`` whose Mobility Header starts at
        ``mh`` (``hoa``: the offset of its Home Address Option's address or -1; ``end``:
        the end of the IPv6 payload): what to answer.  Never raises for bad input."""
        src, dst = bytes(buf[8:24]), bytes(buf[24:40])
        home = bytes(buf[hoa : hoa + 16]) if hoa >= 0 else None
        data = bytes(buf[mh:end])
        if data[2] == m.MH_BU and home is None:  # its checksum could not be right either
            return _refused("bu-without-hao")
        try:
            message = m.parse(data, home or src, dst)
        except m.MalformedMobility as e:
            return _refused(_REASONS.get(e.reason, "mh-malformed"))
        if isinstance(message, m.BindingUpdate) and home is not None:
            return self._update(message, data, home, src, dst)
        if home is not None:
            # §6.1: only a Binding Update may carry a Home Address Option.
            return _refused("mh-with-hao")
        if not _unicast(src):
            return _refused("mh-bad-source")
        if isinstance(message, m.HomeTestInit | m.CareOfTestInit):
            index, nonce = self.nonces.current()
            care_of = isinstance(message, m.CareOfTestInit)
            token = keygen_token(self.node_key, src, nonce, care_of)
            test: m.HomeTest | m.CareOfTest
            if care_of:
                test, what = m.CareOfTest(index, message.cookie, token), "coti"
            else:
                test, what = m.HomeTest(index, message.cookie, token), "hoti"
            reply = _packet(dst, src, m.build(test, dst, src))
            return Outcome(reply, what, sent="cot" if care_of else "hot")
        if isinstance(message, m.OtherMobilityMessage) and message.mh_type > m.MH_BE:
            error = self._binding_error(dst, src, m.BE_UNKNOWN_MH, bytes(16))
            return _refused("mh-unknown-type", error, "be")
        return _refused("mh-unexpected-type")

    def binding_error(self, buf: bytes | bytearray, hoa: int) -> bytes | None:
        """Strict mode: the Binding Error (status 1) for a packet whose Home Address
        Option ``buf[hoa:hoa+16]`` has no entry at its source, or None when rate
        limited or the source is not somewhere to answer."""
        src = bytes(buf[8:24])
        if not _unicast(src):
            return None
        return self._binding_error(bytes(buf[24:40]), src, m.BE_UNKNOWN_HAO,
                                   bytes(buf[hoa : hoa + 16]))  # fmt: skip

    # -- the steps ------------------------------------------------------------------------

    def _update(self, bu: m.BindingUpdate, data: bytes, home: bytes, src: bytes,
                cn: bytes) -> Outcome:  # fmt: skip
        care_of = bu.alt_coa if bu.alt_coa is not None else src
        if not (_unicast(home) and _unicast(care_of) and _unicast(src)):
            return _refused("bu-bad-address")
        if bu.home_registration:
            ack = m.BindingAck(BA_HOME_REGISTRATION_NOT_SUPPORTED, bu.seq, 0)
            return _refused("bu-home-registration", self._ack(ack, None, home, care_of, cn))
        indices = m.nonce_indices(bu.options)
        if indices is None:
            return _refused("bu-no-nonce-indices")
        try:
            mh_data, auth = m.split_authenticator(data)
        except m.MalformedMobility as e:
            return _refused(_REASONS.get(e.reason, "bu-no-authenticator"))
        returning = care_of == home
        home_nonce = self.nonces.get(indices[0])
        care_of_nonce = None if returning else self.nonces.get(indices[1])
        home_stale = home_nonce is None
        care_of_stale = care_of_nonce is None and not returning
        if home_nonce is None or care_of_stale:
            status = (BA_EXPIRED_NONCES if home_stale and care_of_stale
                      else BA_EXPIRED_HOME_NONCE if home_stale
                      else BA_EXPIRED_CARE_OF_NONCE)  # fmt: skip
            ack = m.BindingAck(status, bu.seq, 0)
            return _refused("bu-stale-nonce", self._ack(ack, None, home, care_of, cn))
        home_token = keygen_token(self.node_key, home, home_nonce, False)
        keys = []
        if care_of_nonce is not None:
            care_of_token = keygen_token(self.node_key, care_of, care_of_nonce, True)
            keys.append(binding_key(home_token, care_of_token))
        if returning or bu.lifetime == 0:
            keys.append(binding_key(home_token, None))
        kbm = next((k for k in keys
                    if hmac.compare_digest(authenticator(k, care_of, cn, mh_data), auth)),
                   None)  # fmt: skip
        if kbm is None:
            return _refused("bu-bad-authenticator")
        entry = self._entries.get(home)
        retired = self._retired.get(home) if entry is None else None
        if retired is not None and retired[1] <= self.clock.seconds():
            retired = None
        last = entry.seq if entry is not None else retired[0] if retired is not None else None
        if last is not None and not 0 < (bu.seq - last) & 0xFFFF < 0x8000:
            ack = m.BindingAck(BA_SEQUENCE_OUT_OF_WINDOW, last, 0)
            return _refused("bu-sequence", self._ack(ack, kbm, home, care_of, cn))
        if bu.lifetime == 0 or returning:
            self.delete(home)
            self._retire(home, bu.seq)
            ack = m.BindingAck(BA_ACCEPTED, bu.seq, 0)
            reply = self._ack(ack, kbm, home, care_of, cn) if bu.ack else None
            return Outcome(reply, "bu-deregistered", home=home, deleted=True,
                           sent="ba" if reply else "")
        if entry is None and len(self._entries) >= self.max_entries:
            ack = m.BindingAck(BA_INSUFFICIENT_RESOURCES, bu.seq, 0)
            return _refused("bu-cache-full", self._ack(ack, kbm, home, care_of, cn))
        units = min(bu.lifetime, int(self.max_lifetime) // m.LIFETIME_UNIT)
        entry = self.register(home, care_of, bu.seq, units * m.LIFETIME_UNIT)
        ack = m.BindingAck(BA_ACCEPTED, bu.seq, units)
        reply = self._ack(ack, kbm, home, care_of, cn) if bu.ack else None
        return Outcome(reply, "bu-accepted", home=home, entry=entry, sent="ba" if reply else "")

    def _ack(self, ack: m.BindingAck, kbm: bytes | None, home: bytes, care_of: bytes,
             cn: bytes) -> bytes | None:  # fmt: skip
        """The Binding Acknowledgement packet: to the care-of address with a Type 2
        Routing Header (§9.5.4), straight to the home address when they are one.

        An unauthenticated one (``kbm`` None: status 131, 136-138, sent before the
        authenticator could be checked) goes wherever the update's Alternate Care-of
        Address option says, with nothing proven: it draws on the Binding Errors' budget
        (None when that is spent), so forged updates cannot aim a stream of them at an
        address of the forger's choosing."""
        if kbm is None and not self._take_token():
            return None
        mh = m.build(ack, cn, home) if kbm is None else sign(ack, kbm, care_of, cn, cn, home)
        if care_of == home:
            return _packet(cn, home, mh)
        rh2 = bytes((_MH, 2, 2, 1, 0, 0, 0, 0)) + home
        return _packet(cn, care_of, rh2 + mh, next_header=43)

    def _binding_error(self, cn: bytes, to: bytes, status: int, home: bytes) -> bytes | None:
        if not self._take_token():
            return None
        return _packet(cn, to, m.build(m.BindingError(status, home), cn, to))

    def _take_token(self) -> bool:
        """One answer from the budget of ``binding_error_rate`` per second (a token
        bucket holding one second's worth): False when it is spent."""
        now = self.clock.seconds()
        self._tokens = min(self._rate, self._tokens + (now - self._filled) * self._rate)
        self._filled = now
        if self._tokens < 1:
            return False
        self._tokens -= 1
        return True


def _packet(src: bytes, dst: bytes, payload: bytes, next_header: int = _MH) -> bytes:
    """An IPv6 packet from ``src`` to ``dst`` (hop limit 64)."""
    return struct.pack("!IHBB", 6 << 28, len(payload), next_header, 64) + src + dst + payload


#: Counter names of the malformed Mobility Header reasons.
_REASONS: dict[m.MobilityReason, str] = {
    m.MobilityReason.TRUNCATED: "mh-truncated",
    m.MobilityReason.BAD_PAYLOAD_PROTO: "mh-bad-payload-proto",
    m.MobilityReason.BAD_HEADER_LENGTH: "mh-bad-header-length",
    m.MobilityReason.BAD_CHECKSUM: "mh-bad-checksum",
    m.MobilityReason.BAD_OPTION: "mh-bad-option",
    m.MobilityReason.DUPLICATE_ALT_COA: "mh-bad-option",
    m.MobilityReason.BAD_ADDRESS: "mh-malformed",
    m.MobilityReason.NO_AUTHENTICATOR: "bu-no-authenticator",
    m.MobilityReason.AUTHENTICATOR_NOT_LAST: "bu-authenticator-not-last",
}
