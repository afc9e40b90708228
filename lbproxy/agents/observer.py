"""What a home-agent agent learns from the Binding Updates and Acknowledgements on the link.

Beside an unmodified home agent, the agent cannot ask the binding cache; it can watch the
home link, which both the mobile node's Binding Update (to the home agent, with a Home
Address option, RFC 6275 §6.1.7) and the home agent's Binding Acknowledgement (to the
care-of address, with a Type 2 Routing Header, §6.1.8) cross.  A binding is learnt when
the Acknowledgement *accepts* the Update with the same sequence number (status < 128), with
the lifetime the home agent granted; the care-of address is the Alternate Care-of Address
option's if present, else the Update's source.  With ``require_ack`` off, or for an Update
that asks for no Acknowledgement, the Update alone is believed.  Pure: frames in, cache
updates out, an injected clock.
"""

from __future__ import annotations

import collections

from twisted.internet.interfaces import IReactorTime

from lbproxy.notify.cache import BindingCache, CacheFull
from lbproxy.notify.policy import IEntitlement
from lbproxy.wire import mobility, view

ETH_P_IPV6 = 0x86DD
ETH_HEADER = 14


class LinkObserver:
    """Turns observed BU/BA frames into binding cache updates."""

    def __init__(
        self,
        cache: BindingCache,
        entitlement: IEntitlement,
        clock: IReactorTime,
        require_ack: bool = True,
        ack_timeout: float = 3.0,
        max_pending: int = 4096,
    ) -> None:
        self.cache = cache
        self.entitlement = entitlement
        self.clock = clock
        self.require_ack = require_ack
        self.ack_timeout = ack_timeout
        self.max_pending = max_pending
        # (home, seq) -> (care_of, requested lifetime in s, deadline); oldest first
        self._pending: collections.OrderedDict[tuple[bytes, int], tuple[bytes, int, float]] = (
            collections.OrderedDict()
        )
        self.counts: collections.Counter[str] = collections.Counter()

    def frame(self, data: bytes | bytearray | memoryview) -> str:
        """One Ethernet frame from the link; returns what it was (also counted)."""
        if len(data) < ETH_HEADER + 40 or data[12] << 8 | data[13] != ETH_P_IPV6:
            return self._count("ignored")
        return self.packet(memoryview(data)[ETH_HEADER:])

    def packet(self, pkt: bytes | bytearray | memoryview) -> str:
        """One IPv6 packet; returns what it was (also counted)."""
        if len(pkt) < 40 or pkt[6] not in (60, 43, 135, 0):
            return self._count("ignored")  # cheap pre-filter: no MH can follow
        try:
            v = view.parse(pkt)
        except view.MalformedPacket:
            return self._count("malformed")
        if v.mh < 0 or v.mh_type not in (mobility.MH_BU, mobility.MH_BA):
            return self._count("ignored")
        src, dst = bytes(pkt[8:24]), bytes(pkt[24:40])
        if v.mh_type == mobility.MH_BU:
            if v.hoa < 0:
                return self._count("bu_without_hao")
            home = bytes(pkt[v.hoa : v.hoa + 16])
            final = bytes(pkt[v.rh2 : v.rh2 + 16]) if v.rh2 >= 0 else dst
            return self._update(pkt, v, home, home, final, src)
        home = bytes(pkt[v.rh2 : v.rh2 + 16]) if v.rh2 >= 0 else dst
        return self._ack(pkt, v, home, src)

    def _count(self, what: str) -> str:
        self.counts[what] += 1
        return what

    def _parse(
        self, pkt: bytes | bytearray | memoryview, v: view.PacketView, src: bytes, dst: bytes
    ) -> mobility.MobilityMessage | None:
        try:
            return mobility.parse(memoryview(pkt)[v.mh : v.end], src, dst)
        except mobility.MalformedMobility:
            return None

    def _update(
        self,
        pkt: bytes | bytearray | memoryview,
        v: view.PacketView,
        home: bytes,
        pseudo_src: bytes,
        pseudo_dst: bytes,
        src: bytes,
    ) -> str:
        msg = self._parse(pkt, v, pseudo_src, pseudo_dst)
        if not isinstance(msg, mobility.BindingUpdate):
            return self._count("malformed")
        if not msg.home_registration:
            return self._count("ignored")  # a correspondent registration, not for us
        if not self.entitlement.allows(home):
            return self._count("not_entitled")
        care_of = msg.alt_coa or src
        if msg.ack and self.require_ack:
            now = self.clock.seconds()
            self._expire_pending(now)
            if len(self._pending) >= self.max_pending:
                self._pending.popitem(last=False)
                self._count("pending_dropped")
            self._pending[home, msg.seq] = (care_of, msg.lifetime_seconds, now + self.ack_timeout)
            return self._count("bu")
        return self._apply(home, care_of, msg.seq, msg.lifetime_seconds, "bu_applied")

    def _ack(
        self, pkt: bytes | bytearray | memoryview, v: view.PacketView, home: bytes, src: bytes
    ) -> str:
        msg = self._parse(pkt, v, src, home)
        if not isinstance(msg, mobility.BindingAck):
            return self._count("malformed")
        pending = self._pending.pop((home, msg.seq), None)
        if pending is None:
            return self._count("ba_unmatched")
        if not msg.accepted:
            return self._count("ba_rejected")
        care_of, _, deadline = pending
        if deadline < self.clock.seconds():
            return self._count("ba_late")
        return self._apply(home, care_of, msg.seq, msg.lifetime_seconds, "ba_applied")

    def _apply(self, home: bytes, care_of: bytes, seq: int, lifetime: int, what: str) -> str:
        try:
            self.cache.update(home, care_of, seq, lifetime, self.clock.seconds())
        except CacheFull:
            return self._count("cache_full")
        except ValueError:
            return self._count("stale")
        return self._count(what)

    def _expire_pending(self, now: float) -> None:
        while self._pending:
            key, (_, _, deadline) = next(iter(self._pending.items()))
            if deadline >= now:
                break
            del self._pending[key]
            self._count("bu_unacknowledged")

    def describe(self) -> dict[str, int]:
        """Counts by outcome, for logs and operators."""
        return dict(self.counts)
