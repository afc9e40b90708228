"""One packet's journey through the core: bytes in, rewritten bytes (or a counted drop) out.

Why this exists: the edges (raw sockets, twistd, the manhole, lbproxyctl) should not know
how a decision is made, and the decision should be testable without sockets.  `Balancer`
is that decision, as a pure object driven by bytes and an injected clock:

Inbound (terminal -> backend)::

    parse(buf) -> PacketView            malformed: counted by reason, dropped
    destination in the virtual set?     no: counted "not-virtual", dropped
    non-first fragment?                 follow its first fragment's backend
    KeyChain.key_for(buf, view)         first strategy that yields a key wins
    StickyTable.lookup(key)             hit: lifetime refreshed (claim 10)
        miss: scheduler.choose(...)     insert (refused when the table is full)
    nat.translate / nat.transparent     rewrite, checksums kept valid

Outbound (backend reply -> terminal): the balancer is the backends' gateway (IPVS NAT
style); a reply from a backend gets the virtual address as its source and goes to the
terminal -- to its care-of address with a Type 2 Routing Header only when the binding was
confirmed by an authenticated notification (DESIGN.md section 6), otherwise towards the
home address.

Nothing here raises for bad input: every refusal is a counted reason.

The fast path.  Almost every packet a balancer sees is the same shape (IPv6, PadN(2) and
the HAO, UDP or TCP, to the one virtual address).  `lbproxy.io.fastpath` handles that shape
straight from the receive buffer into the send queue, reading what it needs through
`Balancer.fast_plan`; everything else comes to `Balancer.inbound`.  ``fast_path = False``
turns it off; the tests check that both give the same bytes and the same counters.
"""

from __future__ import annotations

import enum
import heapq
import ipaddress
from collections import Counter
from collections.abc import Callable, Iterable, Sequence
from typing import NamedTuple

import attrs
from twisted.internet.interfaces import IReactorTime

from lbproxy.core import nat
from lbproxy.core.keys import HomeAddressStrategy, Key, KeyChain
from lbproxy.core.selection import Backend, IScheduler
from lbproxy.core.table import Binding, StickyTable
from lbproxy.wire.checksum import delta16
from lbproxy.wire.view import MalformedPacket, PacketView, parse

_ICMPV6 = 58

__all__ = ["Balancer", "Counters", "FastPlan", "ReplyPlan", "TraceResult", "Verdict"]

#: How long a first fragment's decision is remembered for its later fragments (RFC 8200
#: section 4.5 gives reassembly 60 seconds).
FRAGMENT_TIMEOUT = 60.0
#: At most this many fragmented datagrams are tracked at once; the oldest is forgotten.
MAX_FRAGMENT_FLOWS = 65536



class Verdict(enum.Enum):
    """What happened to a packet (for trace output)."""

    FORWARD = "forward"
    DROP = "drop"


class Counters:
    """Plain counters read by metrics, the manhole and lbproxyctl.

    Drops are counted by reason name (the malformed reasons of the view plus the
    balancer's own: ``not-virtual``, ``port``, ``no-backend``, ``table-full``,
    ``fragment-unknown``, ``not-from-backend``, and the rewrites' ``hop-limit`` and
    ``routing-header``).

    The fast path does not touch ``hits`` and ``backend_packets`` per packet (a
    ``Counter`` increment costs three times a list cell's): it adds to
    ``hoa_hits_pending`` and to a per-backend cell from :meth:`backend_cell`, which
    the two properties fold in whenever they are read, so readers see the same totals.
    """

    def __init__(self) -> None:
        self.packets_in = 0
        self.packets_out = 0
        self.replies_in = 0
        self.replies_out = 0
        self.dropped: Counter[str] = Counter()
        self._hits: Counter[str] = Counter()
        self.misses: Counter[str] = Counter()
        self._backend_packets: Counter[str] = Counter()
        self.reassigned = 0
        self.icmp_errors_in = 0
        #: Home-address hits not yet folded into ``hits``.
        self.hoa_hits_pending = 0
        # backend name -> [packets not yet folded into backend_packets]
        self._cells: dict[str, list[int]] = {}

    @property
    def hits(self) -> Counter[str]:
        """Binding hits by key kind."""
        if self.hoa_hits_pending:
            self._hits["hoa"] += self.hoa_hits_pending
            self.hoa_hits_pending = 0
        return self._hits

    @property
    def backend_packets(self) -> Counter[str]:
        """Packets forwarded, by backend name."""
        for name, cell in self._cells.items():
            if cell[0]:
                self._backend_packets[name] += cell[0]
                cell[0] = 0
        return self._backend_packets

    def backend_cell(self, name: str) -> list[int]:
        """The one-item list the fast path adds the backend's packets to."""
        cell = self._cells.get(name)
        if cell is None:
            cell = self._cells[name] = [0]
        return cell

    def as_dict(self) -> dict[str, object]:
        """A JSON-ready snapshot."""
        return {
            "packets_in": self.packets_in,
            "packets_out": self.packets_out,
            "replies_in": self.replies_in,
            "replies_out": self.replies_out,
            "dropped": dict(self.dropped),
            "hits": dict(self.hits),
            "misses": dict(self.misses),
            "backend_packets": dict(self.backend_packets),
            "reassigned": self.reassigned,
            "icmp_errors_in": self.icmp_errors_in,
        }


@attrs.frozen
class TraceResult:
    """What the balancer would do with a packet, computed without side effects."""

    strategy: str | None
    key: Key | None
    backend: Backend | None
    hit: bool
    reason: str | None

    @property
    def verdict(self) -> Verdict:
        return Verdict.FORWARD if self.backend is not None else Verdict.DROP


class FastPlan(NamedTuple):
    """The balancer state the fast path reads (`Balancer.fast_plan`), for one batch."""

    #: The one virtual address (16 bytes) and the destination ports (empty: all).
    vip: bytes
    ports: frozenset[int]
    #: Translate mode (HAO removed, source := home address); else transparent.
    translate: bool
    #: `StickyTable.lookup`: (key, now) -> the refreshed binding or None.
    lookup: Callable[..., Binding | None]
    counters: Counters
    #: Backend -> (checksum delta of "destination := backend", its packet cell).
    backend_delta: Callable[[Backend], tuple[int, list[int]]]
    #: A miss: (key, kind, packet, home-address offset) -> the new binding or None.
    miss: Callable[[Key, str, bytearray, int], Binding | None]
    #: A counted drop, by reason.
    drop: Callable[[str], None]


class ReplyPlan(NamedTuple):
    """The balancer state the replies' fast path reads (`Balancer.reply_plan`)."""

    #: The one virtual address (16 bytes): every reply's new source.
    vip: bytes
    #: Backend address (16 bytes) -> the checksum change of "source := virtual address"
    #: for a reply from it (RFC 1624 arithmetic, as `nat.reply` computes it).
    deltas: dict[bytes, int]
    #: Home address -> confirmed care-of address (the return path's Type 2 Routing Header).
    confirmed: dict[bytes, bytes]
    counters: Counters
    #: A counted drop, by reason.
    drop: Callable[[str], None]


class Balancer:
    """The balancer's decisions over bytes: inbound, outbound, and operator actions."""

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
    ) -> None:
        if mode not in ("translate", "transparent"):
            raise ValueError(f"unknown forwarding mode {mode!r}")
        self.chain = chain
        self.table = table
        self.scheduler = scheduler
        self.clock = clock
        self.mode = mode
        self.reassign_dead = reassign_dead
        self.counters = Counters()
        # The fast path (module docstring): wanted, and possible with this
        # configuration; the chain it was checked against (None: not a hoa-first one).
        self._fast_wanted = True
        self._fast_ready = False
        self._fast_chain: KeyChain | None = None
        self._plan: FastPlan | None = None
        self._reply_plan: ReplyPlan | None = None
        # backend address -> (checksum delta virtual address -> backend, its packet
        # counter cell, its name), see inbound.
        self._fast_backends: dict[bytes, tuple[int, list[int], str]] = {}
        self.backends: dict[str, Backend] = {}
        self._by_address: dict[bytes, Backend] = {}
        self._down: set[str] = set()
        # Backends removed by a reload that may still have bindings: those move on their
        # next packet (general path); cleared by `sweep` once no binding is left on them.
        self._gone: set[str] = set()
        self.set_virtual_addresses(virtual_addresses, ports)
        # home address (16 bytes) -> confirmed care-of address (16 bytes); bounded like
        # the table, oldest first out.
        self._confirmed: dict[bytes, bytes] = {}
        # home address -> when its confirmation ends, and a heap of (deadline, home)
        # (entries refreshed since are skipped when popped).
        self._confirmed_until: dict[bytes, float] = {}
        self._confirm_deadlines: list[tuple[float, bytes]] = []
        # home or source address -> the virtual address it last used (only needed with
        # several virtual addresses); bounded the same way.
        self._vip_of: dict[bytes, bytes] = {}
        # (source, destination, fragment id) -> (backend, deadline)
        self._fragments: dict[bytes, tuple[Backend, float]] = {}
        #: Called with (home address or None, source address) on a terminal's first
        #: packet, so notification subscriptions can follow (claims 5 and 6).
        self.terminal_seen: Callable[[bytes | None, bytes], None] | None = None
        self.set_backends(backends)
        self._check_chain()

    # -- configuration ---------------------------------------------------------------

    def set_virtual_addresses(
        self, virtual_addresses: Iterable[ipaddress.IPv6Address], ports: Iterable[int] = ()
    ) -> None:
        """The addresses (and ports; empty = all) this balancer answers for."""
        vips = tuple(virtual_addresses)
        if not vips:
            raise ValueError("at least one virtual address is required")
        self.vips = vips
        self._vips = frozenset(a.packed for a in vips)
        self._first_vip = vips[0].packed
        self.ports = frozenset(ports)
        self._fast_backends = {}
        self._update_fast()

    def set_backends(self, backends: Sequence[Backend]) -> None:
        """Install a new backend list (reload, drain, weight change); bindings stay."""
        names = {b.name for b in backends}
        self._gone = (self._gone | (set(self.backends) - names)) - names
        self.backends = {b.name: b for b in backends}
        self._by_address = {b.packed: b for b in backends}
        self._down &= set(self.backends)
        self._update_fast()
        self._reschedule()

    def set_backend_up(self, name: str, up: bool) -> None:
        """Health checks report here; a down backend gets no new bindings."""
        if name not in self.backends:
            raise KeyError(name)
        before = name in self._down
        if up:
            self._down.discard(name)
        else:
            self._down.add(name)
        if before != (name in self._down):
            self._update_fast()
            self._reschedule()

    def is_up(self, name: str) -> bool:
        return name not in self._down

    def _reschedule(self) -> None:
        self.scheduler.set_backends([b for b in self.backends.values() if b.name not in self._down])

    def drain(self, backend_name: str) -> None:
        """Weight 0: existing bindings stay, no new ones are made."""
        backend = self.backends[backend_name]
        self.set_backends(
            [attrs.evolve(b, weight=0) if b is backend else b for b in self.backends.values()]
        )

    def confirm(self, home: bytes, care_of: bytes, lifetime: float | None = None) -> None:
        """An authenticated notification confirmed this care-of address (return path).

        With a `lifetime` (seconds, the binding's as granted by the home agent) the
        confirmation ends with it: replies then go towards the home address again.
        """
        self._remember(self._confirmed, home, care_of)
        if lifetime is None:
            self._confirmed_until.pop(home, None)
        else:
            deadline = self.clock.seconds() + lifetime
            self._confirmed_until[home] = deadline
            heapq.heappush(self._confirm_deadlines, (deadline, home))

    def unconfirm(self, home: bytes) -> None:
        """The binding ended (deregistration): replies go towards the home address again."""
        self._confirmed.pop(home, None)
        self._confirmed_until.pop(home, None)

    def _expire_confirmations(self, now: float) -> None:
        """Drop confirmations whose binding lifetime ran out (cost: what is due)."""
        deadlines = self._confirm_deadlines
        while deadlines and deadlines[0][0] <= now:
            deadline, home = heapq.heappop(deadlines)
            if self._confirmed_until.get(home) == deadline:  # not refreshed since
                self.unconfirm(home)

    def confirmed_care_of(self, home: bytes) -> bytes | None:
        return self._confirmed.get(home)

    def _remember(self, mapping: dict[bytes, bytes], key: bytes, value: bytes) -> None:
        if key not in mapping and len(mapping) >= self.table.max_entries:
            del mapping[next(iter(mapping))]
        mapping[key] = value

    # -- operator actions ----------------------------------------------------------

    def move(self, key: Key, backend_name: str) -> Binding:
        """Bind `key` to the named backend now (replacing any binding)."""
        backend = self.backends[backend_name]
        old = self.table.get(key)
        # Inserting over an entry replaces it and keeps it established.
        binding = self.table.insert(key, backend, care_of=old.care_of if old else None)
        if binding is None:
            raise RuntimeError("the table is full")
        return binding

    def forget(self, key: Key) -> Binding | None:
        """Drop the binding for `key`; its next packet is scheduled afresh."""
        return self.table.remove(key)

    def sweep(self) -> int:
        """Expire due bindings and stale fragment flows; returns bindings expired."""
        now = self.clock.seconds()
        if self._fragments:
            for k in [k for k, (_, deadline) in self._fragments.items() if deadline <= now]:
                del self._fragments[k]
        self._expire_confirmations(now)
        expired = self.table.expire(now)
        if self._gone:
            self._gone &= {b.name for b, n in self.table.load().items() if n > 0}
            self._update_fast()
        return expired

    # -- the data path -------------------------------------------------------------

    def _drop(self, reason: str) -> None:
        self.counters.dropped[reason] += 1

    def _classify(self, buf: bytes | bytearray, view: PacketView) -> tuple[Key | None, str | None]:
        found = self.chain.key_for(buf, view)
        if found is None:
            return None, None
        key, strategy = found
        return key, strategy.kind

    def _choose(self, key: Key) -> Backend | None:
        return self.scheduler.choose(key, self.table.load())

    def inbound(self, buf: bytearray) -> bytearray | None:
        """A packet from a terminal to a virtual address: rewritten for its backend, or None.

        Any packet, by its parsed view (the general path; `lbproxy.io.fastpath` takes the
        usual shape without coming here, with the same results).
        """
        counters = self.counters
        counters.packets_in += 1
        try:
            view = parse(buf)
        except MalformedPacket as e:
            self._drop(e.reason.value)
            return None
        dst = bytes(buf[24:40])
        if dst not in self._vips:
            self._drop("not-virtual")
            return None
        if self.ports and view.dport >= 0 and view.dport not in self.ports:
            self._drop("port")
            return None
        if view.proto == _ICMPV6 and buf[view.l4] < 128:
            return self._icmp_error(buf, view)

        if view.frag >= 0 and view.frag_offset != 0:
            backend = self._fragment_backend(buf, view)
            if backend is None:
                self._drop("fragment-unknown")
                return None
        else:
            backend = self._backend_for(buf, view)
            if backend is None:
                return None
            if view.frag >= 0 and view.frag_more:
                self._remember_fragment(buf, view, backend)

        if len(self.vips) > 1:
            home = bytes(buf[view.hoa : view.hoa + 16]) if view.hoa >= 0 else bytes(buf[8:24])
            self._remember(self._vip_of, home, dst)

        if self.mode == "translate":
            out = nat.translate(buf, view, backend.packed)
        else:
            out = nat.transparent(buf, view, backend.packed)
        if isinstance(out, nat.Drop):
            self._drop(out.value)
            return None
        counters.packets_out += 1
        counters.backend_packets[backend.name] += 1
        return out

    @property
    def fast_path(self) -> bool:
        """Whether the usual packet shape takes the fast path (see the module docstring)."""
        return self._fast_wanted

    @fast_path.setter
    def fast_path(self, on: bool) -> None:
        self._fast_wanted = on
        self._update_fast()

    def _update_fast(self) -> None:
        """Recompute when the fast path applies: the configuration parts it assumes."""
        self._fast_ready = (
            self._fast_wanted and len(self.vips) == 1 and not self._down and not self._gone
        )
        self._plan = None
        self._reply_plan = None

    def _check_chain(self) -> None:
        """The key chain changed (reload): does it start with the home-address strategy?"""
        chain = self.chain
        self._fast_chain = chain if type(chain.strategies[0]) is HomeAddressStrategy else None
        self._plan = None

    def fast_plan(self) -> FastPlan | None:
        """What `lbproxy.io.fastpath` needs to handle the usual shape itself, or None when
        this configuration has no fast path (turned off, several virtual addresses, a
        backend down or removed, a key chain not starting with ``hoa``).

        Asked once per batch of packets: a reload or a health change between batches
        is seen by the next one.
        """
        if self.chain is not self._fast_chain:
            self._check_chain()
        if not self._fast_ready or self._fast_chain is None:
            return None
        plan = self._plan
        if plan is None:
            plan = self._plan = FastPlan(
                vip=self._first_vip,
                ports=self.ports,
                translate=self.mode == "translate",
                lookup=self.table.lookup,
                counters=self.counters,
                backend_delta=self._backend_delta,
                miss=self._miss,
                drop=self._drop,
            )
        return plan

    def reply_plan(self) -> ReplyPlan | None:
        """What `lbproxy.io.fastpath` needs to handle a backend's usual reply itself (IPv6
        straight to UDP or TCP), or None when the fast path is off or there are several
        virtual addresses (a reply's source then depends on the terminal).  Asked once
        per batch, as `fast_plan`."""
        if not self._fast_wanted or len(self.vips) != 1:
            return None
        plan = self._reply_plan
        if plan is None:
            plan = self._reply_plan = ReplyPlan(
                vip=self._first_vip,
                deltas={a: delta16(a, self._first_vip) for a in self._by_address},
                confirmed=self._confirmed,
                counters=self.counters,
                drop=self._drop,
            )
        return plan

    def _backend_delta(self, backend: Backend) -> tuple[int, list[int]]:
        """The checksum change of "destination := `backend`" for a packet to the
        virtual address (a constant: RFC 1624 arithmetic on the two addresses), and
        the backend's packet-counter cell (`Counters.backend_cell`)."""
        found = self._fast_backends.get(backend.packed)
        if found is None or found[2] is not backend.name:
            delta = delta16(self._first_vip, backend.packed)
            found = self._fast_backends[backend.packed] = (
                delta,
                self.counters.backend_cell(backend.name),
                backend.name,
            )
        return found[0], found[1]

    def _icmp_error(self, buf: bytearray, view: PacketView) -> bytearray | None:
        """An ICMPv6 error to a virtual address, about one of our replies (a router on the
        way to the terminal: Packet Too Big, Destination Unreachable...): pass it to the
        backend that sent the reply, so path MTU discovery works through the balancer."""
        quoted = nat.quoted_addresses(buf, view)
        if quoted is None or quoted[0] not in self._vips:
            self._drop("icmp-error-unknown")
            return None
        terminal = quoted[1]
        binding = self.table.get(Key("hoa", terminal)) or self.table.get(Key("src", terminal))
        if binding is None or binding.backend.name not in self.backends:
            self._drop("icmp-error-unknown")
            return None
        backend = binding.backend
        out = nat.error_to_backend(buf, view, backend.packed, self.mode == "translate")
        if isinstance(out, nat.Drop):
            self._drop(out.value)
            return None
        self.counters.icmp_errors_in += 1
        self.counters.packets_out += 1
        self.counters.backend_packets[backend.name] += 1
        return out

    def _backend_for(self, buf: bytearray, view: PacketView) -> Backend | None:
        key, kind = self._classify(buf, view)
        if key is None or kind is None:
            self._drop("no-key")
            return None
        table = self.table
        binding = table.lookup(key)
        if binding is not None:
            backend = binding.backend
            if backend.name not in self.backends or (
                backend.name in self._down and self.reassign_dead
            ):
                # Down (with the reassign policy), or removed by a reload: a removed
                # backend's replies would be refused (not-from-backend), so always move.
                replacement = self._choose(key)
                if replacement is None:
                    self._drop("no-backend")
                    return None
                binding = self.move(key, replacement.name)
                self.counters.reassigned += 1
                backend = replacement
            self.counters.hits[kind] += 1
        else:
            binding = self._miss(key, kind, buf, view.hoa)
            if binding is None:
                return None
            backend = binding.backend
        if view.hoa >= 0:
            binding.care_of = bytes(buf[8:24])
        return backend

    def _miss(self, key: Key, kind: str, buf: bytearray, hoa: int) -> Binding | None:
        """No binding for `key`: choose a backend and insert one (None: dropped, counted).

        `hoa` is the offset of the home address in `buf`, or -1.
        """
        self.counters.misses[kind] += 1
        chosen = self._confirmed_backend(buf, hoa) if hoa >= 0 and kind != "hoa" else None
        if chosen is None:
            chosen = self._choose(key)
        if chosen is None:
            self._drop("no-backend")
            return None
        binding = self.table.insert(key, chosen)
        if binding is None:
            self._drop("table-full")
            return None
        if self.terminal_seen is not None:
            home = bytes(buf[hoa : hoa + 16]) if hoa >= 0 else None
            self.terminal_seen(home, bytes(buf[8:24]))
        return binding

    def _confirmed_backend(self, buf: bytearray, hoa: int) -> Backend | None:
        """The backend of the terminal's confirmed care-of address, if its entry lives.

        Keyed on the source address (patent embodiment 2), a terminal's first packet
        from a new care-of address can arrive before the notification of the move does;
        scheduling it afresh would reset its sessions.  If the home address it claims
        has a confirmed care-of address whose entry is still live, the new address
        joins that backend (the notification's rekey then finds the same backend).  The
        claim only steers the claimant's own packets.
        """
        care_of = self._confirmed.get(bytes(buf[hoa : hoa + 16]))
        if care_of is None:
            return None
        binding = self.table.get(Key("src", care_of))
        if binding is None or binding.backend.name not in self.backends:
            return None
        if binding.backend.name in self._down and self.reassign_dead:
            return None
        return binding.backend

    def _fragment_id(self, buf: bytearray, view: PacketView) -> bytes:
        return bytes(buf[8:40]) + view.frag_id.to_bytes(4, "big")

    def _remember_fragment(self, buf: bytearray, view: PacketView, backend: Backend) -> None:
        fragments = self._fragments
        if len(fragments) >= MAX_FRAGMENT_FLOWS:
            del fragments[next(iter(fragments))]
        fragments[self._fragment_id(buf, view)] = (
            backend,
            self.clock.seconds() + FRAGMENT_TIMEOUT,
        )

    def _fragment_backend(self, buf: bytearray, view: PacketView) -> Backend | None:
        found = self._fragments.get(self._fragment_id(buf, view))
        if found is None:
            return None
        backend, deadline = found
        if deadline <= self.clock.seconds():
            return None
        return self.backends.get(backend.name, backend)

    def outbound(self, buf: bytearray) -> bytearray | None:
        """A backend's reply: source := virtual address, towards the terminal; or None."""
        counters = self.counters
        counters.replies_in += 1
        try:
            view = parse(buf)
        except MalformedPacket as e:
            self._drop(e.reason.value)
            return None
        if bytes(buf[8:24]) not in self._by_address:
            self._drop("not-from-backend")
            return None
        home = bytes(buf[24:40])
        if view.rh2 >= 0:
            home = bytes(buf[view.rh2 : view.rh2 + 16])
        vip = self._vip_of.get(home, self._first_vip) if len(self.vips) > 1 else self._first_vip
        out = nat.reply(buf, view, vip, self._confirmed.get(home), home)
        if isinstance(out, nat.Drop):
            self._drop(out.value)
            return None
        counters.replies_out += 1
        return out

    def trace(self, buf: bytes) -> TraceResult:
        """Which strategy, key and backend this packet would get; nothing is changed."""
        try:
            view = parse(buf)
        except MalformedPacket as e:
            return TraceResult(None, None, None, False, e.reason.value)
        if bytes(buf[24:40]) not in self._vips:
            return TraceResult(None, None, None, False, "not-virtual")
        key, kind = self._classify(buf, view)
        if key is None:
            return TraceResult(None, None, None, False, "no-key")
        binding = self.table.get(key)
        if binding is not None and not (
            binding.backend.name not in self.backends
            or (binding.backend.name in self._down and self.reassign_dead)
        ):
            return TraceResult(kind, key, binding.backend, True, None)
        backend = self._choose(key)
        return TraceResult(kind, key, backend, False, None if backend else "no-backend")
