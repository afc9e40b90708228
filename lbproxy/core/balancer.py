"""The balancer's decisions: which backend a terminal's packet goes to, and the general path.

Why this exists: the edges (raw sockets, twistd, the manhole, lbproxyctl) should not know
how a decision is made, and the decision should be testable without sockets.  `Balancer`
is the one owner of those decisions, as a pure object driven by bytes and an injected
clock.  Its parts, each with one job, live beside it in `lbproxy.core`:

=====================  ============================================================
`policy.Policy`        the immutable snapshot executors read (virtual addresses,
                       ports, mode, usable backends and their checksum constants,
                       whether the fast path applies), republished on every change
`table.StickyTable`    identity -> backend, lifetimes refreshed by traffic
`returnpaths`          confirmed care-of addresses: where replies may go
`fragments`            a fragmented datagram's later fragments follow its first
`counters.Counters`    what happened to packets, shared by every executor
`actions`              the operator's changes (move, forget, drain)
=====================  ============================================================

Inbound (terminal -> backend), `Balancer.inbound`, the *general path*::

    parse(buf) -> PacketView            malformed: counted by reason, dropped
    destination in the virtual set?     no: counted "not-virtual", dropped
    ICMPv6 error about one of our replies: to the backend that sent the reply
    non-first fragment?                 follow its first fragment's backend
    Balancer.backend_for                the decision: KeyChain.key_for, then
        StickyTable.lookup              hit: lifetime refreshed (claim 10); a binding to
                                        a backend no longer usable moves
        miss: Balancer.bind             Scheduler.choose + insert (refused when full)
    nat.translate / nat.transparent     rewrite, checksums kept valid

Outbound (backend reply -> terminal), `Balancer.outbound`: the balancer is the backends'
gateway (IPVS NAT style).  A server-link packet that is a reply (`policy.is_reply`) from a
backend gets the virtual address as its source and goes to the terminal -- to its care-of
address with a Type 2 Routing Header only when `ReturnPaths` holds a confirmation for its
home address, otherwise towards the home address.

Executors.  The general path above handles any packet.  `lbproxy.io.fastpath` handles the
usual shapes straight from the receive buffer; it reads `Balancer.policy` and calls only
public operations (`StickyTable.lookup`, `Balancer.bind`, `Counters`), and it must give
the same packets, counters and table as the general path (tests/test_executors.py holds
every executor to that).  Nothing here raises for bad input: every refusal is a counted
reason.
"""

from __future__ import annotations

import enum
import ipaddress
import struct
from collections.abc import Callable, Iterable, Mapping, Sequence

import attrs
from twisted.internet.interfaces import IReactorTime
from zope.interface import Interface

from lbproxy.core import nat
from lbproxy.core.correspondent import Correspondent
from lbproxy.core.counters import Counters
from lbproxy.core.fragments import FragmentFlows, flow_id
from lbproxy.core.journey import Journeys
from lbproxy.core.keys import (
    HomeAddressStrategy,
    IKeyStrategy,
    INamedKeyStrategy,
    Key,
    KeyChain,
)
from lbproxy.core.policy import Policy, build_policy
from lbproxy.core.returnpaths import ReturnPaths
from lbproxy.core.selection import Backend, IScheduler
from lbproxy.core.table import Binding, StickyTable
from lbproxy.wire.view import MalformedPacket, PacketView, parse

_ICMPV6 = 58
#: An IPv6 header's source and destination (bytes 8..39), in one call.
_ADDRESSES = struct.Struct("16s16s")

__all__ = ["Balancer", "Counters", "ISharedBindings", "TraceResult", "Verdict"]


class Verdict(enum.Enum):
    """What happened to a packet (for trace output)."""

    FORWARD = "forward"
    DROP = "drop"


@attrs.frozen
class TraceResult:
    """What the balancer would do with a packet, computed without side effects."""

    strategy: str | None
    key: Key | None
    backend: Backend | None
    hit: bool
    reason: str | None
    #: The packet's other identities (linked to the binding when it is forwarded).
    aliases: tuple[Key, ...] = ()

    @property
    def verdict(self) -> Verdict:
        return Verdict.FORWARD if self.backend is not None else Verdict.DROP


class ISharedBindings(Interface):
    """Bindings a fleet of balancers shares (those that differ from the consistent
    hash every balancer computes alike: rekeyed care-of addresses, linked aliases,
    operator moves, bindings kept when the backend set changed)."""

    def backend_name(key: Key) -> str | None:  # noqa: N805
        """The name of the backend the fleet has `key` bound to, or None.  Answers
        from local state: the data path never waits for the shared store."""


def _chain_reason(chain: KeyChain) -> str | None:
    """Why `chain` rules the fast path out (None: it starts with the home address, the
    identity the fast path's packet shape carries)."""
    first = chain.strategies[0]
    if type(first) is HomeAddressStrategy:
        return None
    return f"key chain starts with {getattr(first, 'kind', type(first).__name__)!r}, not 'hoa'"


def _named_strategies(chain: KeyChain) -> dict[IKeyStrategy, Callable[[Key], str | None]]:
    """The chain's strategies whose keys name their backend, with how to read the name."""
    return {s: s.backend_name for s in chain.strategies if INamedKeyStrategy.providedBy(s)}


class Balancer:
    """The balancer's decisions over bytes, and the general path that executes them."""

    def __init__(
        self,
        *,
        chain: KeyChain,
        table: StickyTable,
        scheduler: IScheduler,
        backends: Sequence[Backend],
        virtual_addresses: Iterable[ipaddress.IPv6Address],
        clock: IReactorTime,
        mode: str = "translate",
        ports: Iterable[int] = (),
        reassign_dead: bool = True,
        own_addresses: Iterable[bytes] = (),
    ) -> None:
        if mode not in ("translate", "transparent"):
            raise ValueError(f"unknown forwarding mode {mode!r}")
        self.table = table
        self.scheduler = scheduler
        self.clock = clock
        self.mode = mode
        self.counters = Counters()
        #: The correspondent node for the virtual addresses (`serve_as_correspondent`;
        #: None: ``[correspondent] mode = "off"``, Mobility Headers forwarded as any packet).
        self.correspondent: Correspondent | None = None
        #: Confirmed care-of addresses: the one source of truth for the return path.
        self.return_paths = ReturnPaths(clock, table.max_entries)
        self._routes = self.return_paths.routes  # home -> confirmed care-of (never rebound)
        self.fragments = FragmentFlows()
        #: Called with (home address or None, source address) on a terminal's first
        #: packet, so notification subscriptions can follow (claims 5 and 6).
        self.terminal_seen: Callable[[bytes | None, bytes], None] | None = None
        #: The bindings other balancers of a fleet made that differ from what the
        #: scheduler would choose, consulted on a miss before the scheduler (None: a
        #: balancer on its own).
        self.shared: ISharedBindings | None = None
        #: The terminals' journeys (`follow_journeys`; None: not kept).  Told only on
        #: slow branches: a miss, a new care-of address, a drop, a reassignment.
        self.journeys: Journeys | None = None
        # home or source address -> the virtual address it last used (only needed with
        # several virtual addresses); bounded like the table, oldest first out.
        self._vip_of: dict[bytes, bytes] = {}
        # What the policy is built from.
        self._chain = chain
        self._named = _named_strategies(chain)
        self._named_walk = tuple((s, self._named.get(s)) for s in chain.strategies)
        self._vips: tuple[ipaddress.IPv6Address, ...] = ()
        self._ports: frozenset[int] = frozenset()
        self._backends: tuple[Backend, ...] = ()
        self._down: set[str] = set()
        # Backends removed by a reload that may still have bindings: those move on their
        # next packet; forgotten by `sweep` once no binding is left on them.
        self._gone: set[str] = set()
        self._reassign_dead = reassign_dead
        self._own = frozenset(own_addresses)
        self._fast_wanted = True
        self.policy: Policy
        self.set_virtual_addresses(virtual_addresses, ports)
        self.set_backends(backends)

    def follow_journeys(self, journeys: Journeys) -> None:
        """Keep `journeys` (lbproxy.core.journey): told by the table's listeners, the
        return paths and this balancer's slow branches."""
        self.journeys = journeys
        self.table.listeners.append(journeys.table_changed)
        self.return_paths.observer = journeys.confirmed

    # -- the published policy -------------------------------------------------------

    def _publish(self) -> None:
        """Rebuild the policy every executor reads (configuration or health changed)."""
        if not self._vips:
            return  # still constructing
        self.policy = build_policy(
            vips=[a.packed for a in self._vips],
            ports=self._ports,
            translate=self.mode == "translate",
            backends=self._backends,
            down=self._down,
            gone=self._gone,
            reassign_dead=self._reassign_dead,
            own=self._own,
            fast_wanted=self._fast_wanted,
            fast_chain=_chain_reason(self._chain),
            strict_hao=self.correspondent is not None and self.correspondent.strict,
        )

    @property
    def chain(self) -> KeyChain:
        """The key chain (assigning one, on reload, republishes the policy)."""
        return self._chain

    @chain.setter
    def chain(self, chain: KeyChain) -> None:
        self._chain = chain
        self._named = _named_strategies(chain)
        self._named_walk = tuple((s, self._named.get(s)) for s in chain.strategies)
        self._publish()

    @property
    def reassign_dead(self) -> bool:
        """Whether a binding to a down backend moves on its next packet."""
        return self._reassign_dead

    @reassign_dead.setter
    def reassign_dead(self, on: bool) -> None:
        self._reassign_dead = on
        self._publish()

    @property
    def fast_path(self) -> bool:
        """Whether executors other than the general path may be used at all."""
        return self._fast_wanted

    @fast_path.setter
    def fast_path(self, on: bool) -> None:
        self._fast_wanted = on
        self._publish()

    @property
    def vips(self) -> tuple[ipaddress.IPv6Address, ...]:
        return self._vips

    @property
    def ports(self) -> frozenset[int]:
        return self._ports

    @property
    def backends(self) -> Mapping[str, Backend]:
        """The configured backends by name (the published policy's, read-only)."""
        return self.policy.backends

    # -- configuration ---------------------------------------------------------------

    def set_virtual_addresses(
        self, virtual_addresses: Iterable[ipaddress.IPv6Address], ports: Iterable[int] = ()
    ) -> None:
        """The addresses (and ports; empty = all) this balancer answers for."""
        vips = tuple(virtual_addresses)
        if not vips:
            raise ValueError("at least one virtual address is required")
        self._vips = vips
        self._ports = frozenset(ports)
        self._publish()

    def set_backends(self, backends: Sequence[Backend]) -> None:
        """Install a new backend list (reload, drain, weight change); bindings stay."""
        names = {b.name for b in backends}
        self._gone = (self._gone | ({b.name for b in self._backends} - names)) - names
        self._backends = tuple(backends)
        self._down &= names
        self._publish()
        self._reschedule()

    def set_backend_up(self, name: str, up: bool) -> None:
        """Health checks report here; a down backend gets no new bindings."""
        if name not in self.policy.backends:
            raise KeyError(name)
        before = name in self._down
        if up:
            self._down.discard(name)
        else:
            self._down.add(name)
        if before != (name in self._down):
            self._publish()
            self._reschedule()

    def set_own_addresses(self, own: Iterable[bytes]) -> None:
        """This host's addresses: server-link packets to them are not replies."""
        self._own = frozenset(own)
        self._publish()

    def is_up(self, name: str) -> bool:
        return name not in self._down

    def _reschedule(self) -> None:
        self.scheduler.set_backends([b for b in self._backends if b.name not in self._down])

    def sweep(self) -> int:
        """Expire due bindings, confirmations and fragment flows; returns bindings expired.

        Each part costs what is due, not its size."""
        now = self.clock.seconds()
        self.fragments.expire(now)
        self.return_paths.expire(now)
        if self.correspondent is not None:
            self.correspondent.expire(now)
        expired = self.table.expire(now)
        if self._gone:
            left = self._gone & {b.name for b, n in self.table.load().items() if n > 0}
            if left != self._gone:
                self._gone = left
                self._publish()
        return expired

    def serve_as_correspondent(self, correspondent: Correspondent | None) -> None:
        """Answer return routability and Binding Updates to the virtual addresses with
        `correspondent` (lbproxy.core.correspondent; None: forward them as before).  In
        its strict mode the policy keeps other executors off terminals' packets: only
        the general path checks a Home Address Option against the binding cache."""
        self.correspondent = correspondent
        self._publish()

    # -- decisions (public: every executor uses these) ---------------------------------

    def bind(
        self, key: Key, strategy: str, home: bytes | None, source: bytes
    ) -> Binding | None:
        """No identity of the packet has a binding: choose a backend for `key` (found by
        the strategy named `strategy`) and insert one; None if the packet is dropped
        (counted: ``no-backend``, ``table-full``).

        `home` is the packet's home address (from its HAO) or None, `source` its source
        address.  A terminal keyed other than by its home address whose claimed home has
        a confirmed care-of address with a live binding joins that binding's backend
        (see `_confirmed_backend`).
        """
        self.counters.misses[strategy] += 1
        chosen = (
            self._confirmed_backend(home) if home is not None and strategy != "hoa" else None
        )
        if chosen is None and self.shared is not None:
            chosen = self._shared_backend(key)
        if chosen is None:
            chosen = self.scheduler.choose(key, self.table.load())
        if chosen is None:
            self.counters.drop("no-backend")
            if self.journeys is not None:  # a terminal seen before: its journey says so
                self.journeys.dropped(key, "no-backend")
            return None
        binding = self.table.insert(key, chosen, source=source)
        if binding is None:
            self.counters.drop("table-full")
            if self.journeys is not None:  # journey of a terminal seen before
                self.journeys.dropped(key, "table-full")
            return None
        if self.terminal_seen is not None:
            self.terminal_seen(home, source)
        return binding

    def backend_for(self, buf: bytearray, view: PacketView) -> Backend | None:
        """The decision for a terminal's (first or only) fragment: its backend, with the
        table updated; None when dropped (counted).

        The packet's identities (`KeyChain.keys_for`) are looked up in chain order and
        the first live binding wins: it is refreshed (claim 10), and moved first if its
        backend may no longer take packets.  With none, the first identity is bound
        (`bind`).  Then the packet's other identities are linked to the winner as
        aliases (`StickyTable.link`): one terminal, one binding, whichever identity
        its next packet shows.  Linking never moves an identity that has a binding of
        its own: that is a *conflict*, counted by the strategy that found the identity
        and settled by chain order (the packet goes to the winner's backend).  A packet
        with a Home Address Option whose source is already the winner's care-of address
        has nothing new to link (the steady state, which the fast path serves).
        """
        if self._named:
            return self._backend_for_named(buf, view)
        table = self.table
        now = self.clock.seconds()
        peek, peek_alias = table.peek_primary, table.peek_alias  # `table.peek`, inlined
        source = bytes(buf[8:24])
        hao = view.hoa >= 0
        winner: Binding | None = None
        # The identities in chain order, found lazily: the steady state (an HAO packet
        # from the winner's known care-of address) stops at the first identity.
        found: list[tuple[Key, IKeyStrategy]] = []
        for strategy in self._chain.strategies:
            key = strategy.key_for(buf, view)
            if key is None:
                continue
            if winner is None:
                b = peek(key)
                if b is None:
                    b = peek_alias(key)
                if b is not None and (b.expires > now or table.alive(b, now)):
                    if b.backend.name in self.policy.usable_names:
                        # `_hit` when the binding keeps its backend, written out (every
                        # packet of the general path): refreshed, its hit counted (a
                        # home-address hit as the fast path counts it).
                        table.refresh(b, now)
                        kind = strategy.kind
                        if kind == "hoa":
                            self.counters.hoa_hits_pending += 1
                        else:
                            self.counters.hits[kind] += 1
                        winner = b
                    else:
                        winner = self._hit(b, key, strategy.kind, now)
                        if winner is None:
                            return None  # dropped, counted
                    if hao and winner.care_of == source:
                        return winner.backend  # nothing new: the steady state
            found.append((key, strategy))
        return self._settle(winner, found, buf, view, source, now)

    def _settle(
        self,
        winner: Binding | None,
        found: list[tuple[Key, IKeyStrategy]],
        buf: bytearray,
        view: PacketView,
        source: bytes,
        now: float,
    ) -> Backend | None:
        """The end of both walks, once no named key decided: with no winner the first
        identity is bound (a miss); then the packet's identities are linked to the
        winner (conflicts counted) and a new care-of address recorded."""
        if not found:
            self.counters.drop("no-key")
            return None
        table = self.table
        hao = view.hoa >= 0
        if winner is None:
            table.stats.misses += 1
            key, strategy = found[0]
            home = bytes(buf[view.hoa : view.hoa + 16]) if hao else None
            winner = self.bind(key, strategy.kind, home, source)
            if winner is None:
                return None
            for key, strategy in found:
                if not table.link(winner, key, now):
                    self._conflict(winner, key, strategy.kind)
            if hao:
                winner.care_of = source
            if self.journeys is not None:  # a miss: the journey keeps its first packet
                self.journeys.first_packet(winner, source, buf, now)
            return winner.backend
        for key, strategy in found:
            if not table.link(winner, key, now):
                self._conflict(winner, key, strategy.kind)
        if hao:
            # Only a care-of address the binding had not seen gets here (the steady
            # state returned before): the journey records the move with its packet.
            if self.journeys is not None:
                self.journeys.care_of_changed(winner, winner.care_of, source, buf, now)
            table.set_care_of(winner, source)
        return winner.backend

    def _conflict(self, winner: Binding, key: Key, kind: str) -> None:
        """`key`, found by the strategy `kind`, has a binding of its own: counted."""
        self.counters.conflicts[kind] += 1
        if self.journeys is not None:  # the journey says which identity conflicted
            self.journeys.conflict(winner, key)

    def _backend_for_named(self, buf: bytearray, view: PacketView) -> Backend | None:
        """`backend_for` for a chain with strategies whose keys name their backend
        (`INamedKeyStrategy`: a QUIC-LB server ID).  The same walk in chain order, with
        one more kind of winner: a named key whose backend may take packets wins as a
        live binding would, and is itself neither bound nor linked (it names a backend,
        not a terminal; every balancer reads it alike).  The packet's other identities
        follow that backend: those without a binding are bound to it (the first) and
        linked (the rest), so the terminal's packets without the key -- another
        connection, plain UDP or TCP -- find the same backend; one bound elsewhere stays
        there and is a counted conflict.  Kept apart so that chains without such a
        strategy pay nothing for it."""
        table = self.table
        now = self.clock.seconds()
        peek, peek_alias = table.peek_primary, table.peek_alias  # `table.peek`, inlined
        source = bytes(buf[8:24])
        hao = view.hoa >= 0
        winner: Binding | None = None
        chosen: Backend | None = None  # the backend a named key chose
        chosen_by = ""
        found: list[tuple[Key, IKeyStrategy]] = []
        # (strategy, how its keys name a backend or None), in chain order: no hashing of
        # strategies per packet.
        for strategy, resolve in self._named_walk:
            key = strategy.key_for(buf, view)
            if key is None:
                continue
            if resolve is not None:
                if winner is None and chosen is None:
                    chosen = self._named_backend(resolve(key))
                    chosen_by = strategy.kind
                continue
            if winner is None and chosen is None:
                b = peek(key)
                if b is None:
                    b = peek_alias(key)
                if b is not None and (b.expires > now or table.alive(b, now)):
                    winner = self._hit(b, key, strategy.kind, now)
                    if winner is None:
                        return None  # dropped, counted
                    if hao and winner.care_of == source:
                        return winner.backend  # nothing new: the steady state
            found.append((key, strategy))
        if chosen is not None:
            self.counters.hits[chosen_by] += 1
            winner = self._follow(chosen, found, source, now)
            if winner is not None and hao and winner.care_of != source:
                if self.journeys is not None:
                    self.journeys.care_of_changed(winner, winner.care_of, source, buf, now)
                self.table.set_care_of(winner, source)
            return chosen
        return self._settle(winner, found, buf, view, source, now)

    def _named_backend(self, name: str | None) -> Backend | None:
        """The backend a named key names, if it may take packets."""
        policy = self.policy
        backend = policy.backends.get(name) if name is not None else None
        if backend is None or not policy.usable(backend):
            return None
        return backend

    def _follow(
        self,
        chosen: Backend,
        found: list[tuple[Key, IKeyStrategy]],
        source: bytes,
        now: float,
    ) -> Binding | None:
        """The packet's identities (`found`) follow the backend a named key chose: the
        first with a live binding to it is refreshed, else the first without one is
        bound to it; the others are linked.  Returns that binding (None: there was
        nothing to bind, or the table refused it -- the packet goes to `chosen` anyway)."""
        table = self.table
        seen = [(key, strategy, table.peek(key)) for key, strategy in found]
        anchor: Binding | None = None
        for _, _, b in seen:
            if b is not None and table.alive(b, now) and (b.backend is chosen
                                                          or b.backend == chosen):
                anchor = b
                table.refresh(b, now)
                break
        if anchor is None:
            for key, _, b in seen:
                if b is None or not table.alive(b, now):
                    anchor = table.insert(key, chosen, source=source)
                    if anchor is not None and self.terminal_seen is not None:
                        self.terminal_seen(None, source)
                    break
        for key, strategy, b in seen:
            if b is anchor:
                continue  # the anchor's own key, or one already linked to it
            if anchor is not None:
                if not table.link(anchor, key, now):
                    self._conflict(anchor, key, strategy.kind)
            elif b is not None and table.alive(b, now) and b.backend != chosen:
                self.counters.conflicts[strategy.kind] += 1
        return anchor

    def _hit(self, b: Binding, key: Key, kind: str, now: float) -> Binding | None:
        """The winning binding `b` (found by `key`, of the strategy `kind`): refreshed,
        moved first if its backend may no longer take packets; None when dropped."""
        table = self.table
        table.refresh(b, now)
        policy = self.policy
        name = b.backend.name
        if name not in policy.usable_names:  # `Policy.usable`
            # Down (with the reassign policy), or removed by a reload: a removed
            # backend's replies would be refused (not-from-backend), so always move.
            replacement = self.scheduler.choose(b.key, table.load())
            journeys = self.journeys
            if replacement is None:
                self.counters.drop("no-backend")
                if journeys is not None:  # journey: dropped, no backend to move to
                    journeys.dropped(key, "no-backend", binding=b)
                return None
            if journeys is None:
                table.repoint(b, replacement)
            else:
                why = "down" if name in policy.backends else "removed"
                with journeys.cause(f"reassigned: {name} {why}"):  # journey
                    table.repoint(b, replacement)
            self.counters.reassigned += 1
        self.counters.hits[kind] += 1
        return b

    def _shared_backend(self, key: Key) -> Backend | None:
        """The backend another balancer of the fleet bound `key` to, if it may take
        packets here (`shared`: a local replica, never a wait)."""
        assert self.shared is not None
        name = self.shared.backend_name(key)
        if name is None:
            return None
        backend = self.policy.backends.get(name)
        if backend is None or not self.policy.usable(backend):
            return None
        self.counters.shared_hits += 1
        return backend

    def _confirmed_backend(self, home: bytes) -> Backend | None:
        """The backend of the terminal's confirmed care-of address, if its entry lives.

        Keyed on the source address (patent embodiment 2), a terminal's first packet
        from a new care-of address can arrive before the notification of the move does;
        scheduling it afresh would reset its sessions.  If the home address it claims
        has a confirmed care-of address whose entry is still live, the new address
        joins that backend (the notification's rekey then finds the same backend).  The
        claim only steers the claimant's own packets.

        In a fleet the confirmation may come from the store and the old address's entry
        live on another balancer (ECMP sent the new address here): then the fleet's
        answer for the old address -- its shared record, else Maglev's, which is where
        every balancer binds an address nobody excepted (fleet-confirmed race).
        """
        care_of = self.return_paths.care_of(home)
        if care_of is None:
            return None
        key = Key("addr", care_of)
        binding = self.table.get(key)
        if binding is None:
            if self.shared is None:
                return None
            if self.shared.backend_name(key) is not None:
                return self._shared_backend(key)  # None if that backend is unusable here
            return self.scheduler.choose(key, self.table.load())
        if not self.policy.usable(binding.backend):
            return None
        return binding.backend

    # -- the general path ---------------------------------------------------------------

    def inbound(self, buf: bytearray) -> bytearray | None:
        """A packet from a terminal to a virtual address: rewritten for its backend, or None.

        Any packet, by its parsed view (the general path).
        """
        counters = self.counters
        counters.packets_in += 1
        try:
            view = parse(buf)
        except MalformedPacket as e:
            counters.drop(e.reason.value)
            return None
        policy = self.policy
        dst = bytes(buf[24:40])
        if dst not in policy.vip_set:
            counters.drop("not-virtual")
            return None
        if policy.ports and view.dport >= 0 and view.dport not in policy.ports:
            counters.drop("port")
            return None
        cn = self.correspondent
        if cn is not None and (view.mh >= 0 or (cn.strict and view.hoa >= 0 and cn.bindings.get(
                bytes(buf[view.hoa : view.hoa + 16])) != bytes(buf[8:24]))):  # fmt: skip
            return self._correspondent(buf, view, cn)
        if view.proto == _ICMPV6 and buf[view.l4] < 128:
            return self._icmp_error(buf, view)

        if view.frag >= 0 and view.frag_offset != 0:
            backend = self.fragments.backend(flow_id(buf, view.frag_id), self.clock.seconds())
            if backend is None:
                counters.drop("fragment-unknown")
                return None
            backend = policy.backends.get(backend.name, backend)
        else:
            backend = self.backend_for(buf, view)
            if backend is None:
                return None
            if view.frag >= 0 and view.frag_more:
                self.fragments.learn(flow_id(buf, view.frag_id), backend, self.clock.seconds())

        if policy.only_vip is None:  # several virtual addresses
            home = bytes(buf[view.hoa : view.hoa + 16]) if view.hoa >= 0 else bytes(buf[8:24])
            self._remember_vip(home, dst)

        if policy.translate:
            out = nat.translate(buf, view, backend.packed)
        else:
            out = nat.transparent(buf, view, backend.packed)
        # Asked of bytearray, not of nat.Drop: an Enum's metaclass sends isinstance down
        # its slow path, 50-60 ns a packet (here and in `outbound`, every packet).
        if not isinstance(out, bytearray):
            counters.drop(out.value)
            if self.journeys is not None:  # journey of the terminal the packet is from
                terminal = buf[view.hoa : view.hoa + 16] if view.hoa >= 0 else buf[8:24]
                self.journeys.dropped(Key("addr", terminal), out.value, buf)
            return None
        counters.packets_out += 1
        counters.backend_cell(backend.name)[0] += 1  # cheaper than backend_packets
        return out

    def _correspondent(
        self, buf: bytearray, view: PacketView, cn: Correspondent
    ) -> bytearray | None:
        """A Mobility Header to a virtual address, answered here (never forwarded), or,
        in strict mode, a packet with a Home Address Option the binding cache does not
        hold at its source: dropped with a Binding Error (rate limited)."""
        counters = self.counters
        if view.mh < 0:
            counters.drop("hao-without-binding")
            if self.journeys is not None:
                self.journeys.dropped(Key("addr", bytes(buf[view.hoa : view.hoa + 16])),
                                      "hao-without-binding", buf)  # fmt: skip
            error = cn.binding_error(buf, view.hoa)
            counters.correspondent["be-sent" if error else "be-rate-limited"] += 1
            return None if error is None else bytearray(error)
        outcome = cn.handle(buf, view.mh, view.hoa, view.end)
        if outcome.refused:
            counters.drop(outcome.what)
        else:
            counters.correspondent[outcome.what] += 1
        if outcome.sent:
            counters.correspondent[f"{outcome.sent}-sent"] += 1
        home, entry = outcome.home, outcome.entry
        if entry is not None and home is not None:
            # An authenticated care-of address: replies may go there (RFC 6275 §9.3.2),
            # and the terminal's binding learns it as today's keying would.
            now = self.clock.seconds()
            self.return_paths.confirm(home, entry.care_of, entry.expires - now, now=now)
            self.backend_for(buf, view)
        elif outcome.deleted and home is not None:
            self.return_paths.unconfirm(home)
        if self.journeys is not None and view.hoa >= 0:  # a Binding Update: its journey
            text = f"Binding Update from {ipaddress.IPv6Address(bytes(buf[8:24]))}: {outcome.what}"
            self.journeys.note(Key("addr", bytes(buf[view.hoa : view.hoa + 16])),
                               "drop" if outcome.refused else "correspondent", text, buf,
                               entry.care_of if entry is not None else None)  # fmt: skip
        return None if outcome.reply is None else bytearray(outcome.reply)

    def _remember_vip(self, home: bytes, vip: bytes) -> None:
        mapping = self._vip_of
        if home not in mapping and len(mapping) >= self.table.max_entries:
            del mapping[next(iter(mapping))]
        mapping[home] = vip

    def _icmp_error(self, buf: bytearray, view: PacketView) -> bytearray | None:
        """An ICMPv6 error to a virtual address, about one of our replies (a router on the
        way to the terminal: Packet Too Big, Destination Unreachable...): pass it to the
        backend that sent the reply, so path MTU discovery works through the balancer."""
        policy = self.policy
        quoted = nat.quoted_addresses(buf, view)
        if quoted is None or quoted[0] not in policy.vip_set:
            self.counters.drop("icmp-error-unknown")
            return None
        terminal = quoted[1]
        # The terminal's identities that the reply's destination shows: its address
        # (its home address, or a care-of address linked to its binding) and, for a
        # terminal keyed by its interface ID, that.
        binding = self.table.get(Key("addr", terminal)) or self.table.get(
            Key("iid", terminal[8:16])
        )
        if binding is None or binding.backend.name not in policy.backends:
            self.counters.drop("icmp-error-unknown")
            return None
        backend = binding.backend
        out = nat.error_to_backend(buf, view, backend.packed, policy.translate)
        if isinstance(out, nat.Drop):
            self.counters.drop(out.value)
            return None
        self.counters.icmp_errors_in += 1
        self.counters.packets_out += 1
        self.counters.backend_packets[backend.name] += 1
        return out

    def outbound(self, buf: bytearray) -> bytearray | None:
        """A packet read on the server link: a backend's reply goes out from the virtual
        address towards the terminal; anything that is not a reply is left to the
        kernel (None, counted as ``ignored``)."""
        counters = self.counters
        policy = self.policy
        if len(buf) < 40:  # no destination address: not a reply
            counters.ignored += 1
            return None
        # Both addresses in one call (two slices copied into bytes cost 3-4 % of a reply).
        source, home = _ADDRESSES.unpack_from(buf, 8)
        # `policy.is_reply`, inlined (it runs for every reply of the general path;
        # tests/test_balancer.py holds this copy to it).
        if home[0] == 0xFF or (home[0] == 0xFE and home[1] & 0xC0 == 0x80) or home in policy.own:
            counters.ignored += 1
            return None
        counters.replies_in += 1
        try:
            view = parse(buf)
        except MalformedPacket as e:
            counters.drop(e.reason.value)
            return None
        if source not in policy.by_address:
            counters.drop("not-from-backend")
            return None
        if view.rh2 >= 0:
            home = bytes(buf[view.rh2 : view.rh2 + 16])
        vip = policy.only_vip or self._vip_of.get(home, policy.vips[0])
        # No `home` for nat.reply: the destination is the home address already, and a
        # packet with a Routing Header (the Type 2's home address read above) keeps it.
        out = nat.reply(buf, view, vip, self._routes.get(home))
        if not isinstance(out, bytearray):  # a nat.Drop (see `inbound`)
            counters.drop(out.value)
            if self.journeys is not None:  # journey: a reply to this terminal dropped
                self.journeys.dropped(Key("addr", home), f"reply: {out.value}", buf)
            return None
        counters.replies_out += 1
        return out

    def trace(self, buf: bytes) -> TraceResult:
        """Which strategy, key and backend this packet would get; nothing is changed.

        The key is the identity whose binding would win (or, with none, the one that
        would be bound); ``aliases`` are the packet's other identities."""
        try:
            view = parse(buf)
        except MalformedPacket as e:
            return TraceResult(None, None, None, False, e.reason.value)
        if bytes(buf[24:40]) not in self.policy.vip_set:
            return TraceResult(None, None, None, False, "not-virtual")
        cn = self.correspondent
        if cn is not None and view.mh >= 0:
            return TraceResult(None, None, None, False, "answered by the correspondent node")
        if cn is not None and cn.strict and view.hoa >= 0 and cn.bindings.get(
                bytes(buf[view.hoa : view.hoa + 16])) != bytes(buf[8:24]):  # fmt: skip
            return TraceResult(None, None, None, False, "hao-without-binding")
        found = self._chain.keys_for(buf, view)
        if not found:
            return TraceResult(None, None, None, False, "no-key")
        named = self._named
        others = tuple(k for k, s in found if s not in named)
        for key, strategy in found:
            resolve = named.get(strategy)
            if resolve is not None:
                backend = self._named_backend(resolve(key))
                if backend is not None:
                    return TraceResult(strategy.kind, key, backend, True, None, others)
                continue
            binding = self.table.get(key)
            if binding is not None and self.policy.usable(binding.backend):
                aliases = tuple(k for k in others if k != key)
                return TraceResult(strategy.kind, key, binding.backend, True, None, aliases)
        found = [(k, s) for k, s in found if s not in named]
        if not found:
            return TraceResult(None, None, None, False, "no-key")
        key, strategy = found[0]
        backend = self.scheduler.choose(key, self.table.load())
        return TraceResult(strategy.kind, key, backend, False, None if backend else "no-backend",
                           others[1:])  # fmt: skip
