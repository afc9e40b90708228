"""One contract for every executor of the core's decisions.

The core (`lbproxy.core.balancer.Balancer`) decides what becomes of a packet; executors
carry it out -- the general path over a parsed view, the fast path from the receive
buffer, and any later one.  An executor must be invisible: for any sequence of batches,
mixed with the things that happen between batches (time passing, sweeps, confirmations,
health changes, operator moves), it must send the same packets in the same order as the
general path, and leave the same counters, the same table -- every binding's backend,
care-of address, packets, expiry and established flag, and the table's own statistics --
and the same return paths.

`ExecutorContract` states that once.  A new executor plugs in with one class:
``class XdpContractTests(ExecutorContract, SynchronousTestCase): executor = XdpExecutor``
(see tests/executors.py for what an executor class provides).
"""

from __future__ import annotations

import hashlib
import ipaddress
import os
from typing import Any, ClassVar

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from scapy.layers.inet import UDP
from scapy.layers.inet6 import (
    HAO,
    ICMPv6EchoReply,
    ICMPv6EchoRequest,
    ICMPv6PacketTooBig,
    IPv6,
    IPv6ExtHdrDestOpt,
    IPv6ExtHdrFragment,
    MIP6MH_CoTI,
    MIP6MH_HoTI,
    PadN,
)
from scapy.layers.ipsec import ESP
from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase

from lbproxy.core import actions
from lbproxy.core.balancer import Balancer
from lbproxy.core.correspondent import Correspondent, keygen_token, sign
from lbproxy.core.keys import Key, KeyChain
from lbproxy.core.quiclb import QuicLbSettings, encode_cid
from lbproxy.wire import mobility
from tests.executors import (
    VIP,
    Executor,
    FastPathExecutor,
    GeneralPath,
    Sent,
    XdpExecutor,
    address,
    raw_mobile,
    raw_reply,
)
from tests.test_balancer import BACKENDS, make

#: This host's own address in these tests: server-link packets to it are not replies.
OWN = address("2001:db8:b0::1")
NOT_A_BACKEND = address("2001:db8:b0::99")


def home(t: int) -> bytes:
    return address(f"2001:db8:100::{t + 1}")


def care_of(t: int, c: int) -> bytes:
    return address(f"2001:db8:a{c + 1}::{t + 1}")


# -- terminals' packets ------------------------------------------------------------------

#: (kind, protocol, terminal, care-of, hop limit, port, checksum field, payload)
InSpec = tuple[int, int, int, int, int, int, int, bytes]


def inbound_packet(spec: InSpec) -> bytes:
    """One packet of the mix: mostly the usual shape, and every kind the fast path must
    leave to the general path."""
    kind, proto, t, c, hop, port, csum, payload = spec
    hoa, coa = home(t), care_of(t, c)
    hoa_text, coa_text = str(ipaddress.IPv6Address(hoa)), str(ipaddress.IPv6Address(coa))
    if kind < 6:  # the usual shape, most of the time
        return raw_mobile(proto, hoa, coa, hop, port, csum, payload)
    if kind == 6:  # no HAO: a terminal at home (or tunnelled through its home agent)
        return bytes(IPv6(src=hoa_text, dst=VIP, hlim=hop) / UDP(sport=1, dport=port) / payload)
    if kind == 7:  # a first fragment, then (kind 8) a later one of the same datagram
        return bytes(
            IPv6(src=coa_text, dst=VIP, hlim=hop) / IPv6ExtHdrDestOpt(options=[HAO(hoa=hoa_text)])
            / IPv6ExtHdrFragment(m=1, id=t) / UDP(sport=1, dport=port) / payload
        )  # fmt: skip
    if kind == 8:
        return bytes(
            IPv6(src=coa_text, dst=VIP, hlim=hop) / IPv6ExtHdrDestOpt(options=[HAO(hoa=hoa_text)])
            / IPv6ExtHdrFragment(offset=4, m=0, id=t, nh=17) / (payload + bytes(8))
        )  # fmt: skip
    if kind == 9:  # another option layout: the HAO first, padding after
        return bytes(
            IPv6(src=coa_text, dst=VIP, hlim=hop)
            / IPv6ExtHdrDestOpt(options=[HAO(hoa=hoa_text), PadN(optdata=b"\0\0")])
            / UDP(sport=1, dport=port) / payload
        )  # fmt: skip
    if kind == 10:  # truncated
        return raw_mobile(proto, hoa, coa, hop, port, csum, payload)[: 40 + (t * 13) % 40]
    if kind == 11:  # ICMPv6 to the virtual address: an echo request, keyed like the rest
        return bytes(IPv6(src=coa_text, dst=VIP, hlim=hop) / ICMPv6EchoRequest(id=t))
    if kind == 12:  # an ICMPv6 error about one of our replies (path MTU discovery)
        quote = IPv6(src=VIP, dst=hoa_text) / UDP(sport=80, dport=40000) / payload
        return bytes(
            IPv6(src="2001:db8:77::1", dst=VIP, hlim=hop) / ICMPv6PacketTooBig(mtu=1280)
            / bytes(quote)
        )  # fmt: skip
    if kind == 13:  # ESP: keyed by its SPI
        return bytes(IPv6(src=coa_text, dst=VIP, hlim=hop) / ESP(spi=0x100 + t, seq=1)
                     / payload)  # fmt: skip
    if kind == 14:  # a link-local or multicast source with the usual shape
        return raw_mobile(proto, hoa, address("fe80::1") if t % 2 else address("ff02::1"),
                          hop, port, csum, payload)  # fmt: skip
    # not to a virtual address
    return raw_mobile(proto, hoa, coa, hop, port, csum, payload)[:24] + address(
        "2001:db8:5::81"
    ) + raw_mobile(proto, hoa, coa, hop, port, csum, payload)[40:]


in_specs = st.tuples(
    st.integers(0, 15),
    st.sampled_from([6, 17]),
    st.integers(0, 4),  # terminal
    st.integers(0, 2),  # care-of address
    st.sampled_from([0, 1, 2, 64, 255]),  # hop limit
    st.sampled_from([80, 5353]),
    st.integers(0, 0xFFFF),  # checksum field
    st.binary(max_size=24),
)

# -- backends' replies -------------------------------------------------------------------

#: (kind, protocol, backend, terminal, hop limit, checksum field, payload)
OutSpec = tuple[int, int, int, int, int, int, bytes]


def reply_packet(spec: OutSpec) -> bytes:
    kind, proto, b, t, hop, csum, payload = spec
    source = BACKENDS[b].packed if b < len(BACKENDS) else NOT_A_BACKEND
    if kind < 5:  # the usual reply, to a terminal's home address
        return raw_reply(proto, source, home(t), hop, csum, payload)
    if kind == 5:  # to multicast, link-local, this host
        destination = (address("ff02::1"), address("fe80::1"), OWN)[t % 3]
        return raw_reply(proto, source, destination, hop, csum, payload)
    if kind == 6:  # ICMPv6 from a backend
        return bytes(IPv6(src=str(ipaddress.IPv6Address(source)),
                          dst=str(ipaddress.IPv6Address(home(t))), hlim=hop)
                     / ICMPv6EchoReply(id=1, seq=t))  # fmt: skip
    if kind == 7:  # an extension header the fast path does not take
        return bytes(IPv6(src=str(ipaddress.IPv6Address(source)),
                          dst=str(ipaddress.IPv6Address(home(t))), hlim=hop)
                     / IPv6ExtHdrDestOpt(options=[PadN(optdata=b"\0\0\0\0")])
                     / UDP(sport=80, dport=40000) / payload)  # fmt: skip
    return raw_reply(proto, source, home(t), hop, csum, payload)[: 40 + (t * 7) % 20]  # cut


out_specs = st.tuples(
    st.integers(0, 8),
    st.sampled_from([6, 17]),
    st.integers(0, len(BACKENDS)),  # backend (the last: not one)
    st.integers(0, 4),  # terminal
    st.sampled_from([0, 1, 2, 64]),
    st.integers(0, 0xFFFF),
    st.binary(max_size=16),
)

# -- what happens between batches ----------------------------------------------------------

#: (operation, argument)
Op = tuple[str, int]

ops = st.tuples(
    st.sampled_from(["advance", "sweep", "confirm", "unconfirm", "down", "up", "move"]),
    st.integers(0, 400),
)

steps = st.lists(
    st.one_of(
        st.tuples(st.just("in"), st.lists(in_specs, min_size=1, max_size=12)),
        st.tuples(st.just("out"), st.lists(out_specs, min_size=1, max_size=12)),
        st.tuples(st.just("op"), ops),
    ),
    min_size=1,
    max_size=10,
)


# -- QUIC packets for a chain with the quic strategy (docs/quic.md) -----------------------

#: Server IDs 0b01..0b03 name srv1..srv3.
QUIC = QuicLbSettings(server_ids={bytes((0x0B, i)): f"srv{i}" for i in (1, 2, 3)})
quic_payloads = st.builds(
    lambda sid, nonce, rest: b"\x41" + encode_cid(QUIC, bytes((0x0B, sid)), nonce) + rest,
    st.integers(1, 4),  # 4: a server ID no backend has
    st.binary(min_size=5, max_size=5),
    st.binary(max_size=8),
)
quic_in_specs = st.tuples(
    st.integers(0, 15), st.just(17), st.integers(0, 4), st.integers(0, 2),
    st.sampled_from([0, 1, 64]), st.just(443), st.integers(0, 0xFFFF),
    quic_payloads | st.binary(max_size=24),
)  # fmt: skip
quic_steps = st.lists(
    st.one_of(
        st.tuples(st.just("in"), st.lists(quic_in_specs | in_specs, min_size=1, max_size=12)),
        st.tuples(st.just("out"), st.lists(out_specs, min_size=1, max_size=12)),
        st.tuples(st.just("op"), ops),
    ),
    min_size=1,
    max_size=10,
)


def apply(op: Op, balancer: Balancer, clock: Clock) -> None:
    """One thing that happens between batches, to both balancers alike."""
    name, n = op
    t = n % 5
    if name == "advance":
        clock.advance((0, 1, 30, 299, 301)[n % 5])
    elif name == "sweep":
        balancer.sweep()
    elif name == "confirm":
        balancer.return_paths.confirm(home(t), care_of(t, n % 3), float(n % 3 * 100) or None)
    elif name == "unconfirm":
        balancer.return_paths.unconfirm(home(t))
    elif name in ("down", "up"):
        balancer.set_backend_up(BACKENDS[n % len(BACKENDS)].name, name == "up")
    else:
        actions.move(balancer, Key("hoa", home(t)), BACKENDS[n % len(BACKENDS)].name)


# -- the correspondent node's packets (issue 15) -------------------------------------------

#: (kind, terminal, care-of, sequence number)
MhSpec = tuple[int, int, int, int]

mh_specs = st.tuples(st.integers(0, 4), st.integers(0, 4), st.integers(0, 2), st.integers(0, 9))


def correspondent_for(balancer: Balancer, clock: Clock, strict: bool) -> None:
    """The same correspondent node for both balancers of a pair: one node key, one
    nonce sequence."""
    balancer.serve_as_correspondent(Correspondent(
        clock, strict=strict, node_key=b"N" * 20, random=lambda n: b"\x5a" * n))  # fmt: skip


def mobility_packet(spec: MhSpec, balancer: Balancer) -> bytes:
    """Return routability and Binding Updates (valid ones made with `balancer`'s node
    key and current nonce, as a mobile node would after its Tests), and forgeries."""
    kind, t, c, seq = spec
    hoa, coa = home(t), care_of(t, c)
    hoa_text, coa_text = str(ipaddress.IPv6Address(hoa)), str(ipaddress.IPv6Address(coa))
    if kind == 0:
        return bytes(IPv6(src=hoa_text, dst=VIP) / MIP6MH_HoTI(cookie=b"c" * 8))
    if kind == 1:
        return bytes(IPv6(src=coa_text, dst=VIP) / MIP6MH_CoTI(cookie=b"d" * 8))
    cn = balancer.correspondent
    assert cn is not None
    index, nonce = cn.nonces.current()
    kbm = hashlib.sha1(keygen_token(cn.node_key, hoa, nonce, False)
                       + keygen_token(cn.node_key, coa, nonce, True)).digest()  # fmt: skip
    if kind == 2:  # forged: another key
        kbm = bytes(20)
    bu = mobility.BindingUpdate(seq, 0 if kind == 4 else 30, mobility.BU_ACK, None,
                                (mobility.nonce_indices_option(index, index),))  # fmt: skip
    mh = sign(bu, kbm, coa, address(VIP), hoa, address(VIP))
    dest = bytes((135, 2, 1, 2, 0, 0, 0xC9, 16)) + hoa
    payload = dest + mh
    return bytes(IPv6(src=coa_text, dst=VIP, nh=60, plen=len(payload)))[:40] + payload


def state(balancer: Balancer) -> dict[str, Any]:
    """Everything an executor may change, as comparable values.  The table's ``swept``
    (filings its sweeps examined) measures its work, not what it holds: an executor
    whose hits reach the table later (XDP's, when the table asks) leaves other
    filings behind, and is not held to the general path's count of them."""
    table = balancer.table
    stats = table.stats.as_dict()
    del stats["swept"]
    return {
        "counters": balancer.counters.as_dict(),
        "bindings": sorted(
            (bytes(k), b.backend.name, b.care_of, b.packets, b.created, b.expires, b.established)
            for k, b in table
        ),
        "load": sorted((b.name, n) for b, n in table.load().items()),
        "table_stats": stats,
        "return_paths": sorted(balancer.return_paths.items(), key=repr),
        "fragments": len(balancer.fragments),
        "binding_cache": sorted(balancer.correspondent.bindings.items())
        if balancer.correspondent is not None else None,
    }


class ExecutorContract:
    """Any executor against the general path: the same packets, counters and state."""

    executor: ClassVar[type[Executor]]

    def _pair(self, mode: str, ports: tuple[int, ...], correspondent: str = "off",
              chain: tuple[str, ...] = (), max_entries: int = 1000) -> tuple[
        tuple[Balancer, Clock, Executor], tuple[Balancer, Clock, Executor]
    ]:  # fmt: skip
        made = []
        for kind in (self.executor, GeneralPath):
            balancer, clock = make(mode=mode, scheduler="round_robin", max_entries=max_entries)
            if chain:
                options = {"quic": QUIC} if "quic" in chain else {}
                balancer.chain = KeyChain.from_names(chain, **options)
            balancer.set_virtual_addresses([ipaddress.IPv6Address(VIP)], ports)
            balancer.set_own_addresses({OWN})
            if correspondent != "off":
                correspondent_for(balancer, clock, correspondent == "strict")
            made.append((balancer, clock, kind(balancer, clock)))
        return made[0], made[1]

    def check(self, mode: str, ports: tuple[int, ...], plan: list[tuple[str, Any]],
              correspondent: str = "off", chain: tuple[str, ...] = (),
              max_entries: int = 1000) -> None:  # fmt: skip
        (balancer, clock, executor), (reference, ref_clock, general) = self._pair(
            mode, ports, correspondent, chain, max_entries)
        case: Any = self
        for n, (what, arg) in enumerate(plan):
            if what == "op":
                apply(arg, balancer, clock)
                apply(arg, reference, ref_clock)
                continue
            if what == "register":  # an accepted Binding Update, in both
                for b in (balancer, reference):
                    assert b.correspondent is not None
                    b.correspondent.register(home(arg % 5), care_of(arg % 5, arg % 3), 1, 60.0)
                continue
            if what == "in":
                packets = [inbound_packet(spec) if len(spec) == 8 else
                           mobility_packet(spec, reference) for spec in arg]  # fmt: skip
                got: Sent = executor.inbound(packets)
                want = general.inbound(packets)
            else:
                packets = [reply_packet(spec) for spec in arg]
                got = executor.replies(packets)
                want = general.replies(packets)
            case.assertEqual(got, want, f"step {n}: {what} batch sent differently")
            case.assertEqual(state(balancer), state(reference), f"step {n}: state differs")

    # One test function shared by every executor's class (the point of a contract): the
    # examples hypothesis saves for one executor are replayed on the others, which is
    # what we want, so its differing-executors check does not apply.
    @settings(max_examples=300, deadline=None,
              suppress_health_check=[HealthCheck.differing_executors])  # fmt: skip
    @given(mode=st.sampled_from(["translate", "transparent"]),
           ports=st.sampled_from([(), (80,)]), plan=steps)  # fmt: skip
    def test_same_as_the_general_path(
        self, mode: str, ports: tuple[int, ...], plan: list[tuple[str, Any]]
    ) -> None:
        """Any batches of terminals' packets and backends' replies, in any mix of shapes,
        interleaved with time, sweeps, confirmations, health changes and operator
        moves: the same packets out in the same order, the same counters, bindings
        (expiry and established flag included), table statistics and return paths."""
        self.check(mode, ports, plan)

    @settings(max_examples=150, deadline=None,
              suppress_health_check=[HealthCheck.differing_executors])  # fmt: skip
    @given(correspondent=st.sampled_from(["lenient", "strict"]), plan=st.lists(st.one_of(
        st.tuples(st.just("in"), st.lists(in_specs | mh_specs, min_size=1, max_size=12)),
        st.tuples(st.just("out"), st.lists(out_specs, min_size=1, max_size=12)),
        st.tuples(st.just("op"), ops),
        st.tuples(st.just("register"), st.integers(0, 14)),
    ), min_size=1, max_size=10))  # fmt: skip
    def test_same_as_the_general_path_as_correspondent(
        self, correspondent: str, plan: list[tuple[str, Any]]
    ) -> None:
        """The balancer as correspondent node (lenient and strict): return routability,
        Binding Updates valid and forged, Binding Errors, bindings registered between
        batches -- every executor sends and keeps what the general path does (in strict
        mode no other executor forwards an HAO packet the binding cache would refuse)."""
        self.check("translate", (), plan, correspondent)

    @settings(max_examples=150, deadline=None,
              suppress_health_check=[HealthCheck.differing_executors])  # fmt: skip
    @given(mode=st.sampled_from(["translate", "transparent"]), plan=quic_steps)
    def test_same_as_the_general_path_with_quic(
        self, mode: str, plan: list[tuple[str, Any]]
    ) -> None:
        """The key chain ["hoa", "quic", "src"] (docs/quic.md), QUIC packets naming a
        backend by their server ID (or none) mixed with the rest: every executor sends
        and keeps what the general path does (a server ID never outranks a live home
        address binding, so the steady state an executor takes is the same)."""
        self.check(mode, (), plan, chain=("hoa", "quic", "src"))

    def test_quic_server_id_then_the_steady_state(self) -> None:
        """A fixed walk: a terminal's first HAO packet carries a QUIC connection ID
        naming srv2 (the server ID decides, its home and care-of addresses follow), then
        its usual packets (the steady state, an executor's to take) and a move."""
        cid = b"\x41" + encode_cid(QUIC, b"\x0b\x02", bytes(5)) + b"q"
        first = [(0, 17, 1, 0, 64, 443, 0, cid)]
        usual = [(0, 17, 1, c, 64, 443, 0, cid) for c in (0, 0, 1, 1)]
        plan: list[tuple[str, Any]] = [("in", first), ("in", usual), ("op", ("advance", 2)),
                                       ("in", usual)]  # fmt: skip
        self.check("translate", (), plan, chain=("hoa", "quic", "src"))
        reference, _ = make(scheduler="round_robin")
        reference.chain = KeyChain.from_names(["hoa", "quic", "src"], quic=QUIC)
        general = GeneralPath(reference, Clock())
        general.inbound([inbound_packet(spec) for spec in first])
        case: Any = self
        case.assertEqual(reference.counters.hits["quic"], 1)
        binding = reference.table.get(Key("addr", home(1)))
        assert binding is not None
        case.assertEqual(binding.backend.name, "srv2")

    def test_strict_mode_follows_the_binding_cache(self) -> None:
        """Strict mode, a fixed walk: a registered terminal's packets (the steady state
        an executor may take), then its cache entry moves to another care-of address,
        then expires -- its packets from the old address, then from any, get Binding
        Errors from every executor, whatever the table still holds."""
        usual = [(0, 17, 1, c, 64, 80, 0, b"x") for c in (0, 1)]
        self.check("translate", (), [
            ("register", 6), ("in", usual[:1]), ("in", usual[:1] * 3), ("register", 1),
            ("in", usual[:1] * 2), ("in", usual[1:] * 2), ("op", ("advance", 3)),
            ("op", ("sweep", 0)), ("in", usual), ("op", ("advance", 1)), ("in", usual),
        ], "strict")  # fmt: skip

    def test_a_terminal_moving_and_replies_confirmed(self) -> None:
        """A fixed walk through the common case: a terminal's first packet (a miss), its
        move, a confirmation, replies before and after it, time passing to expiry."""
        usual = [(0, 17, 1, c, 64, 80, 0, b"x") for c in (0, 1, 0)]
        replies = [(0, 17, b, 1, 64, 0, b"r") for b in range(3)]
        self.check("translate", (), [
            ("in", usual), ("out", replies), ("op", ("confirm", 1)), ("out", replies),
            ("op", ("advance", 3)), ("in", usual[:1]), ("op", ("advance", 4)),
            ("op", ("sweep", 0)), ("in", usual), ("out", replies),
        ])  # fmt: skip

    def test_a_hit_counts_before_a_later_packet_of_its_batch(self) -> None:
        """A full table (2 bindings), a fixed walk: in one batch, terminal 0's second
        packet (a hit, which makes its binding established) and then a new terminal's
        first packet (an insert that must evict one).  The general path evicts the
        probationary terminal 1, not terminal 0: an executor that took the hit must
        have left the table so before the next packet of the batch is decided."""
        first = [(0, 17, t, 0, 64, 80, 0, b"x") for t in (0, 1, 2)]
        plan: list[tuple[str, Any]] = [
            ("in", first[:1]), ("op", ("advance", 1)), ("in", first[1:2]),
            ("op", ("advance", 1)), ("in", [first[0], first[2]]),
        ]  # fmt: skip
        # The home address alone (no care-of address linked): two identities, two
        # bindings, for an executor that keeps its own copy sized by the table's bound.
        self.check("translate", (), plan, chain=("hoa",), max_entries=2)
        reference, clock = make(scheduler="round_robin", max_entries=2, chain=("hoa",))
        general = GeneralPath(reference, clock)
        for what, arg in plan:
            if what == "op":
                apply(arg, reference, clock)
            else:
                general.inbound([inbound_packet(spec) for spec in arg])
        case: Any = self
        case.assertEqual(sorted(bytes(k)[1:] for k, _ in reference.table),
                         sorted([home(0), home(2)]))  # fmt: skip
        case.assertEqual(reference.table.stats.evictions, 1)


class GeneralPathContractTests(ExecutorContract, SynchronousTestCase):
    """The reference against itself: the contract holds for it trivially, which checks
    the contract's own machinery (a contract nothing can pass would fail here)."""

    executor = GeneralPath


class FastPathContractTests(ExecutorContract, SynchronousTestCase):
    """`lbproxy.io.fastpath.FastPath`, the Python fast path."""

    executor = FastPathExecutor


def _no_xdp() -> str | None:
    """Why the XDP program cannot run here (None: it can)."""
    if os.geteuid() != 0:
        return "BPF_PROG_TEST_RUN needs root (CAP_BPF and CAP_NET_ADMIN)"
    from lbproxy.io.xdp import available

    return available()


class XdpContractTests(ExecutorContract, SynchronousTestCase):
    """`lbproxy.io.xdp`, the XDP program, run through BPF_PROG_TEST_RUN."""

    executor = XdpExecutor
    skip = _no_xdp()
