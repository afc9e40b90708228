"""The balancer's fast path: the usual packet, from the receive buffer to the send queue.

Why: almost every packet a balancer sees has one shape -- IPv6, one Destination Options
header laid out as RFC 6275 section 6.3 shows it (PadN(2) then the Home Address Option,
24 bytes), then UDP or TCP, to the one virtual address, from a terminal whose binding
exists.  On the general path each such packet is copied into a ``bytearray``, parsed
into a `PacketView`, passed through the key chain, rewritten in place and copied again
into the writer's queue.  Here it is read with one ``struct`` call where ``recvmmsg``
left it and written, already rewritten, where ``sendmmsg`` will take it: at 200,000+
packets per second that is a third of the forwarding process's CPU (docs/performance.md).

It is an *executor*: the decisions are the core's.  Per batch it reads the published
`lbproxy.core.policy.Policy` (virtual address, ports, mode, the checksum constant of
"destination := backend" per backend, and whether the fast path may serve this
configuration at all -- if not, why not, said once in the log and in ``lbproxyctl
stats``); it calls only public operations: per packet `StickyTable.peek_primary` with
the home-address key (usually the binding's own key; `StickyTable.peek_alias` only when
that finds nothing), and it refreshes the binding when it is live and already knows
this care-of address (the steady state: the packet has no identity to link) --
`StickyTable.refresh_all` of the batch's hits, in order, before the general handling
sees a packet and at the batch's end, which leaves the table as a `StickyTable.refresh`
per packet would whenever anything else reads it; and the shared `Counters`, once per
batch.  Then the hop limit and the rewrite -- translate mode: HAO removed,
source := home address, destination := backend; transparent mode: destination :=
backend -- as `nat` does it.  Any other packet -- a miss, a new care-of address (whose
identities the core links), another layout, a fragment, ICMPv6, a packet the writer
could not take directly -- goes, in its turn (order is kept), to the reader's general
handling: a ``bytearray`` copy through `Balancer.inbound`.

Replies (`FastPath.reply`): the usual reply from a backend -- IPv6 straight to UDP or
TCP, to a terminal -- gets the virtual address as its source (one checksum constant per
backend), a hop less, and, when the terminal's care-of address was confirmed by an
authenticated notification, a Type 2 Routing Header with the home address and the
care-of address as destination: `nat.reply` for that shape; the care-of address comes
from `lbproxy.core.returnpaths`, the one record of confirmed ones.  Everything else on
the server link (ICMPv6, extension headers, a source that is not a backend, and what is
not a reply at all: traffic for this host, multicast, link-local -- the rule of
`lbproxy.core.policy.is_reply`, inlined here) goes to the general handling.
tests/test_executors.py holds this executor to the general path with hypothesis: for any
sequence of packets, the same output bytes in the same order, the same counters and the
same table, expiry and established flag included.
"""

from __future__ import annotations

import struct
from collections.abc import Callable
from typing import Protocol

from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger

from lbproxy.core import nat
from lbproxy.core.balancer import Balancer
from lbproxy.core.keys import Key
from lbproxy.core.policy import Policy
from lbproxy.core.table import Binding
from lbproxy.io.mmsg import (
    ADDRESS_AT,
    ADDRESS_STRIDE,
    IOV_LENGTH_AT,
    IOV_STRIDE,
    LENGTH_AT,
    LENGTH_STRIDE,
    NAME_STRIDE,
    Batch,
)

__all__ = ["FastPath", "SendQueues"]

#: Destination Options bytes 2..7 in the usual HAO layout (RFC 6275 section 6.3 and
#: appendix A): PadN with 2 zero bytes, then option type 0xC9 and length 16.
PADN2_HAO = b"\x01\x02\x00\x00\xc9\x10"
#: Version/class/flow, payload length, next header, hop limit, source; then 24 bytes
#: that are constant for the shape (destination, the Destination Options header's next
#: header and length, PadN(2)+HAO type and length: see `FastPath.forward`), the home
#: address, the transport header's destination port (its source port skipped), and the
#: UDP checksum (a TCP packet's bytes 70..71 are read too, and not used: its checksum is
#: further on).
_IN = struct.Struct("!IHBB16s24s16sxxHxxH")
#: The rewritten IPv6 header.
_OUT = struct.Struct("!IHBB16s16s")
#: A reply's IPv6 header and its UDP checksum (a TCP reply's bytes 46..47 are read too,
#: and not used: its checksum is further on).
_REPLY = struct.Struct("!IHBB16s16s6xH")
#: The first byte of every address key (see `lbproxy.core.keys.Key`).
_ADDR_KIND = Key("addr", bytes(16))[:1]
_MASK = 0xFFFF
_HOP_LIMIT = nat.Drop.HOP_LIMIT.value
_UDP, _TCP, _DSTOPTS, _ROUTING = 17, 6, 60, 43
#: A Type 2 Routing Header: next header, length 2 (24 bytes), type 2, one segment
#: left, 4 reserved bytes, the home address.
_RH2 = struct.Struct("!BBBB4x16s")
_log = Logger()
#: The ``mmsghdr`` layout's strides and offsets (`lbproxy.io.mmsg`), bound to locals in
#: the loops below: received length, queued length, ``msg_name``, ``sockaddr_in6``
#: address.
_STRIDES = (LENGTH_STRIDE, LENGTH_AT, IOV_STRIDE, IOV_LENGTH_AT, NAME_STRIDE,
            ADDRESS_STRIDE, ADDRESS_AT)  # fmt: skip
#: A backend's send queue and ``msg_name`` (0: the raw queue's own addresses), checksum
#: delta and packet cell, and the queue's buffers (`lbproxy.io.mmsg.Batch`: data, lengths,
#: names or addresses, slot size, count), unpacked once per batch.
_Target = tuple[Batch, int, int, list[int], memoryview, memoryview, memoryview, int, int]


class SendQueues(Protocol):
    """What the fast path needs of a writer (`lbproxy.io.mmsg.BatchPacketWriter`): its
    queues, to fill directly."""

    @property
    def ready(self) -> bool: ...

    @property
    def routes(self) -> dict[bytes, tuple[Batch, int]]: ...

    @property
    def raw_route(self) -> tuple[Batch, int]: ...

    def flush_queue(self, queue: Batch) -> None: ...


class FastPath:
    """Forwards the usual packets of a received batch straight into `writer`'s queues.

    Called by `lbproxy.io.mmsg.BatchPacketReader` once per ``recvmmsg`` batch, with the
    reader's per-packet handling (``other``) for every packet it does not take.
    """

    def __init__(self, balancer: Balancer, writer: SendQueues, clock: IReactorTime) -> None:
        self.balancer = balancer
        self.writer = writer
        self.clock = clock
        #: Packets forwarded here (not by the general path), for the statistics.
        self.forwarded = 0
        #: Replies forwarded here (not by the general path).
        self.replies = 0
        #: Packets whose handling here raised (a bug: bad input never does); each is
        #: lost, counted and logged, and the rest of its batch goes on.
        self.errors = 0
        # The last policy seen, and per backend address what its packets need (the
        # checksum constant and the packet-counter cell), rebuilt with the policy.
        self._policy: Policy | None = None
        self._backends: dict[bytes, tuple[int, list[int]]] = {}
        #: Why the fast path does not take terminals' packets / backends' replies now
        #: (None: it does), as the policy said when last read.
        self.inbound_off: str | None = None
        self.replies_off: str | None = None

    def _read_policy(self) -> Policy:
        """The balancer's current policy; on a change, the per-backend constants are
        rebuilt and a change of whether the fast path applies is logged, once."""
        policy = self.balancer.policy
        if policy is not self._policy:
            self._policy = policy
            cell = self.balancer.counters.backend_cell
            self._backends = {
                address: (policy.inbound_deltas[address], cell(backend.name))
                for address, backend in policy.by_address.items()
            }
            for direction, before, now in (
                ("terminals' packets", self.inbound_off, policy.fast_inbound),
                ("backends' replies", self.replies_off, policy.fast_replies),
            ):
                if now != before:
                    if now is None:
                        _log.info("fast path on for {direction}", direction=direction)
                    else:
                        _log.info("fast path off for {direction}: {reason}; they take "
                                  "the general path", direction=direction, reason=now)  # fmt: skip
            self.inbound_off, self.replies_off = policy.fast_inbound, policy.fast_replies
        return policy

    def forward(
        self,
        data: memoryview,
        slot: int,
        lengths: memoryview,
        count: int,
        other: Callable[[int, int], object],
    ) -> None:
        """Packets 0..`count`-1 of a ``recvmmsg`` batch: packet i is ``data[i * slot:]``,
        its length ``lengths[LENGTH_STRIDE * i + LENGTH_AT]`` (`lbproxy.io.mmsg.Batch`);
        ``other(start, length)`` handles one that does not take the fast path."""
        policy = self._read_policy()
        writer = self.writer
        if policy.fast_inbound is not None or not writer.ready:
            _all_to(other, slot, lengths, count)
            return
        vip, ports, translate = policy.vips[0], policy.ports, policy.translate
        balancer = self.balancer
        table = balancer.table
        peek, peek_alias = table.peek_primary, table.peek_alias
        refresh_all, counters = table.refresh_all, balancer.counters
        drop, backends = counters.drop, self._backends
        # The correspondent's strict mode: home -> the care-of address its binding cache
        # entry holds; a packet from any other source is the general path's (a Binding
        # Error).  None otherwise.
        cn = balancer.correspondent
        strict = cn.bindings if policy.strict_hao and cn is not None else None
        # Bytes 24..47 of the shape: the virtual address, then the Destination Options
        # header's next header (UDP or TCP) and length (2: 24 bytes), PadN(2)+HAO.
        udp_shape = vip + bytes([_UDP, 2]) + PADN2_HAO
        tcp_shape = vip + bytes([_TCP, 2]) + PADN2_HAO
        cut = 24 if translate else 0  # bytes the rewrite removes
        unpack, pack = _IN.unpack_from, _OUT.pack_into
        routes, raw = writer.routes, writer.raw_route
        # Backend address -> everything its packets need, for this batch only (a reload
        # or a health change, or new neighbours, come between batches, never inside one).
        targets: dict[bytes, _Target] = {}
        now = self.clock.seconds()
        taken = forwarded = 0
        ls, la, ios, iol, ns, ast, aat = _STRIDES
        # The bindings hit, in order, not yet refreshed: `StickyTable.refresh_all` takes
        # them before the general handling sees a packet (`general`) and at the end, so
        # the table is as per-packet `refresh` calls leave it whenever anything else
        # reads it -- for a list append per packet instead of a call.
        hit: list[Binding] = []
        push = hit.append

        def general(start: int, length: int) -> None:
            if hit:
                refresh_all(hit, now)
                hit.clear()
            other(start, length)

        try:
            for i in range(count):
                try:
                    n = lengths[ls * i + la]
                    s = i * slot
                    if n < 72 or n > slot:
                        general(s, n)
                        continue
                    vtf, plen, nh, hop, src, shape, hoa, dport, csum = unpack(data, s)
                    if shape == udp_shape:
                        nh2 = _UDP
                    elif shape == tcp_shape and n >= 84:
                        nh2 = _TCP
                    else:
                        nh2 = 0
                    if (
                        not nh2
                        or nh != _DSTOPTS
                        or plen + 40 != n
                        or vtf >> 28 != 6
                        or (ports and dport not in ports)
                    ):
                        general(s, n)
                        continue
                    binding = peek(_ADDR_KIND + hoa)
                    if binding is None:  # not a binding's own key: an alias, or a miss
                        binding = peek_alias(_ADDR_KIND + hoa)
                        if binding is None:
                            general(s, n)
                            continue
                    if (binding.expires <= now or binding.care_of != src
                            or (strict is not None and strict.get(hoa) != src)):  # fmt: skip
                        # A miss, or a care-of address the binding has not seen: the
                        # identities to link are the core's business (the general path);
                        # so is a packet the correspondent's strict mode refuses.
                        general(s, n)
                        continue
                    taken += 1  # a home-address hit, too
                    push(binding)
                    if hop <= 1:
                        drop(_HOP_LIMIT)
                        continue
                    backend = binding.backend
                    packed = backend.packed
                    target = targets.get(packed)
                    if target is None:
                        out, name = routes.get(packed, raw)
                        target = targets[packed] = (
                            out, name, *backends[packed], out.data, out.iov_lengths,
                            out.names if name else out.addresses, out.slot, out.count,
                        )  # fmt: skip
                    out, name, delta, cell, tx, tx_lengths, tx_names, tx_slot, tx_count = target
                    # The transport checksum: destination := backend (the pseudo-header's
                    # source is the home address before and after).  A UDP checksum of 0
                    # (none) stays 0, as `nat` leaves it.
                    # The UDP checksum came with the header (reading its two bytes here
                    # was 6 % of this loop); TCP's is at 80.
                    if nh2 == _UDP:
                        pos = 70
                    else:
                        pos = 80
                        csum = data[s + 80] << 8 | data[s + 81]
                    # `checksum.apply_delta16`, inlined (a call is 6 % of this loop).
                    if csum or nh2 == _TCP:
                        csum = _MASK - (((_MASK - csum + delta) % _MASK) or _MASK)
                        if not csum and nh2 == _UDP:
                            csum = _MASK
                    q = out.queued
                    o = q * tx_slot
                    if translate:
                        pack(tx, o, vtf, plen - 24, nh2, hop - 1, hoa, packed)
                    else:
                        pack(tx, o, vtf, plen, nh, hop - 1, src, packed)
                    length = n - cut
                    tx[o + 40 : o + length] = data[s + 40 + cut : s + n]
                    o += pos - cut
                    tx[o] = csum >> 8
                    tx[o + 1] = csum & 0xFF
                    tx_lengths[ios * q + iol] = length
                    if name:  # a link neighbour: its sockaddr_ll
                        tx_names[ns * q] = name
                    else:  # the raw socket: the slot's own sockaddr_in6
                        a = ast * q + aat
                        tx_names[a : a + 16] = packed
                    cell[0] += 1
                    forwarded += 1
                    q += 1
                    out.queued = q
                    if q == tx_count:
                        writer.flush_queue(out)
                except Exception:  # a bug, not bad input: count it, keep the batch going
                    self._failed()
        finally:
            counters.packets_in += taken
            counters.packets_out += forwarded
            counters.hoa_hits_pending += taken
            self.forwarded += forwarded
            refresh_all(hit, now)

    def reply(
        self,
        data: memoryview,
        slot: int,
        lengths: memoryview,
        count: int,
        other: Callable[[int, int], object],
    ) -> None:
        """A batch read on the server link, as `forward` takes one: a backend's usual
        reply (IPv6 straight to UDP or TCP, to a terminal) goes out from the virtual
        address, with a Type 2 Routing Header to the confirmed care-of address if
        there is one, as `Balancer.outbound` would send it; ``other(start, length)``
        handles every other packet (ICMPv6, extension headers, traffic for this host,
        a source that is not a backend...)."""
        policy = self._read_policy()
        writer = self.writer
        if policy.fast_replies is not None or not writer.ready:
            _all_to(other, slot, lengths, count)
            return
        vip, deltas, own = policy.vips[0], policy.reply_deltas, policy.own
        counters = self.balancer.counters
        drop, confirmed = counters.drop, self.balancer.return_paths.routes
        unpack, pack = _REPLY.unpack_from, _OUT.pack_into
        routes, raw = writer.routes, writer.raw_route
        queue: Batch | None = None  # the last queue used, and its buffers below
        tx = tx_lengths = tx_names = tx_addresses = data
        tx_slot = tx_count = 0
        taken = sent = 0
        ls, la, ios, iol, ns, ast, aat = _STRIDES
        try:
            for i in range(count):
                try:
                    n = lengths[ls * i + la]
                    s = i * slot
                    if n < 48 or n > slot:
                        other(s, n)
                        continue
                    vtf, plen, nh, hop, src, dst, csum = unpack(data, s)
                    delta = deltas.get(src)
                    if (
                        delta is None
                        or (nh != _UDP and (nh != _TCP or n < 60))
                        or plen + 40 != n
                        or vtf >> 28 != 6
                        # Not a reply (`lbproxy.core.policy.is_reply`, inlined): the
                        # general path counts it and leaves it to the kernel.
                        or dst[0] == 0xFF
                        or (dst[0] == 0xFE and dst[1] & 0xC0 == 0x80)
                        or dst in own
                    ):
                        other(s, n)
                        continue
                    taken += 1
                    if hop <= 1:
                        drop(_HOP_LIMIT)
                        continue
                    # The transport checksum: source := virtual address (the destination,
                    # the home address, stays the final one).  A UDP checksum of 0 stays.
                    # UDP's came with the header (reading its two bytes here was 8 % of
                    # this loop); TCP's is at 56.
                    if nh == _UDP:
                        pos = 46
                    else:
                        pos = 56
                        csum = data[s + 56] << 8 | data[s + 57]
                    # `checksum.apply_delta16`, inlined (a call is 6 % of this loop).
                    if csum or nh == _TCP:
                        csum = _MASK - (((_MASK - csum + delta) % _MASK) or _MASK)
                        if not csum and nh == _UDP:
                            csum = _MASK
                    care_of = confirmed.get(dst)
                    to = dst if care_of is None else care_of
                    out, name = routes.get(to, raw)
                    if out is not queue:  # replies mostly share one queue: the raw socket's
                        queue, tx, tx_lengths, tx_names = out, out.data, out.iov_lengths, out.names
                        tx_addresses, tx_slot, tx_count = out.addresses, out.slot, out.count
                    q = out.queued
                    o = q * tx_slot
                    if care_of is None:
                        pack(tx, o, vtf, plen, nh, hop - 1, vip, dst)
                        extra = 0
                    else:
                        # RFC 6275 section 6.4: a Type 2 Routing Header with the home
                        # address; the packet goes to the care-of address.
                        pack(tx, o, vtf, plen + 24, _ROUTING, hop - 1, vip, care_of)
                        _RH2.pack_into(tx, o + 40, nh, 2, 2, 1, dst)
                        extra = 24
                    tx[o + 40 + extra : o + n + extra] = data[s + 40 : s + n]
                    o += pos + extra
                    tx[o] = csum >> 8
                    tx[o + 1] = csum & 0xFF
                    tx_lengths[ios * q + iol] = n + extra
                    if name:
                        tx_names[ns * q] = name
                    else:
                        a = ast * q + aat
                        tx_addresses[a : a + 16] = to
                    sent += 1
                    q += 1
                    out.queued = q
                    if q == tx_count:
                        writer.flush_queue(out)
                except Exception:  # a bug, not bad input: count it, keep the batch going
                    self._failed()
        finally:
            counters.replies_in += taken
            counters.replies_out += sent
            self.replies += sent

    def _failed(self) -> None:
        self.errors += 1
        if self.errors & (self.errors - 1) == 0:  # the 1st, 2nd, 4th... (a bounded log)
            _log.failure("fast path: packet handling failed ({count} so far)", count=self.errors)


def _all_to(
    other: Callable[[int, int], object], slot: int, lengths: memoryview, count: int
) -> None:
    """The whole batch to the general handling (no fast path for this configuration)."""
    for i in range(count):
        other(i * slot, lengths[LENGTH_STRIDE * i + LENGTH_AT])
