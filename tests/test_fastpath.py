"""`lbproxy.io.fastpath`: the usual packet from the receive buffer into the send queue.

That the fast path is invisible -- the general path's packets, counters and table for
any mix of batches -- is the executor contract's to show (tests/test_executors.py).
Here: what is particular to it -- that it takes the usual shapes at all (scapy's
checksums as the oracle), full queues, configurations it must leave alone and says why,
misses, failures.  It runs sans I/O: packets are laid out in a `lbproxy.io.mmsg.Batch`
as ``recvmmsg`` leaves them, and the writer's queues are a `QueueWriter` whose "flush"
collects what ``sendmmsg`` would have sent.  The real writer and reader around it are
tested against the kernel in tests/test_mmsg.py and end to end in
tests/test_dataplane.py.
"""

from __future__ import annotations

import ipaddress

from scapy.layers.inet import TCP, UDP
from scapy.layers.inet6 import HAO, IPv6, IPv6ExtHdrDestOpt, IPv6ExtHdrRouting, PadN
from twisted.internet.task import Clock
from twisted.logger import ILogObserver, LogEvent, globalLogPublisher
from twisted.trial.unittest import SynchronousTestCase
from zope.interface import provider

from lbproxy.core.balancer import Balancer
from lbproxy.core.keys import Key
from lbproxy.io.fastpath import FastPath
from tests.executors import (
    FastPathExecutor,
    GeneralPath,
    QueueWriter,
    Sent,
    address,
    raw_mobile,
    raw_reply,
)
from tests.test_balancer import BACKENDS, COA1, COA2, HOA, VIP, make, mobile


def forward(
    balancer: Balancer, clock: Clock, packets: list[bytes], writer: QueueWriter | None = None
) -> tuple[Sent, FastPath]:
    """`packets` as one ``recvmmsg`` batch through a FastPath (the rest through
    `Balancer.inbound`, as the reader does): what was sent, in order."""
    executor = FastPathExecutor(balancer, clock, writer)
    return executor.inbound(packets), executor.fast


def forward_replies(balancer: Balancer, packets: list[bytes]) -> tuple[Sent, FastPath]:
    """`packets` as one batch read on the server link, through FastPath.reply."""
    executor = FastPathExecutor(balancer, Clock())
    return executor.replies(packets), executor.fast


def general(balancer: Balancer, packets: list[bytes]) -> Sent:
    return GeneralPath(balancer, Clock()).inbound(packets)


def general_replies(balancer: Balancer, packets: list[bytes]) -> Sent:
    return GeneralPath(balancer, Clock()).replies(packets)


def _rfc_checksum_ok(data: bytes) -> bool:
    """scapy's checksum for the transport header, with the pseudo-header source the
    home address when an HAO is present (RFC 6275 section 6.3).  (scapy itself honours
    an HAO only when it is the first option, so the PadN-first layout is checked by
    recomputing over the addresses the RFC names.)"""
    pkt = IPv6(data)
    l4 = pkt[TCP] if TCP in pkt else pkt[UDP]
    source = pkt[HAO].hoa if HAO in pkt else pkt.src
    fresh = l4.copy()
    del fresh.chksum
    return bool(IPv6(bytes(IPv6(src=source, dst=pkt.dst) / fresh))[type(l4)].chksum
                == l4.chksum)  # fmt: skip


def _usual(layer: UDP | TCP, source: str = COA2) -> bytes:
    """The fast path's shape made with scapy (PadN(2) then the HAO), with the checksum
    RFC 6275 asks for (pseudo-header source = home address)."""
    payload = b"payload"
    chksum = IPv6(bytes(IPv6(src=HOA, dst=VIP) / layer / payload))[type(layer)].chksum
    fixed = layer.copy()
    fixed.chksum = chksum
    return bytes(
        IPv6(src=source, dst=VIP)
        / IPv6ExtHdrDestOpt(options=[PadN(optdata=b"\0\0"), HAO(hoa=HOA)])
        / fixed / payload
    )  # fmt: skip


def _reply_checksum_ok(data: bytes) -> bool:
    """scapy's checksum over the final destination (the home address when a Type 2
    Routing Header is present) and the source."""
    pkt = IPv6(data)
    l4 = pkt[TCP] if TCP in pkt else pkt[UDP]
    final = pkt[IPv6ExtHdrRouting].addresses[-1] if IPv6ExtHdrRouting in pkt else pkt.dst
    fresh = l4.copy()
    del fresh.chksum
    return bool(IPv6(bytes(IPv6(src=pkt.src, dst=final) / fresh))[type(l4)].chksum
                == l4.chksum)  # fmt: skip


def _observer(events: list[LogEvent]) -> ILogObserver:
    """A log observer that keeps every event in `events`."""

    @provider(ILogObserver)
    def observe(event: LogEvent) -> None:
        events.append(event)

    return observe


def _same(case: SynchronousTestCase, fast: Balancer, slow: Balancer) -> None:
    case.assertEqual(fast.counters.as_dict(), slow.counters.as_dict())
    case.assertEqual(
        [(k, b.backend, b.care_of, b.packets, b.expires) for k, b in fast.table],
        [(k, b.backend, b.care_of, b.packets, b.expires) for k, b in slow.table],
    )


class FastPathTests(SynchronousTestCase):
    def test_takes_the_usual_shape(self) -> None:
        """A known terminal's HAO packets go the fast way; the output's checksum is
        valid by scapy's computation, for UDP and TCP, in both modes."""
        for mode in ("translate", "transparent"):
            balancer, clock = make(mode=mode)
            balancer.inbound(mobile(COA1))  # the binding exists, and knows COA1, from now on
            packets = [_usual(layer, COA1)
                       for layer in (UDP(sport=1, dport=80), TCP(sport=1, dport=80))]  # fmt: skip
            for packet in packets:
                self.assertTrue(_rfc_checksum_ok(packet))
            sent, fast = forward(balancer, clock, packets)
            self.assertEqual(fast.forwarded, 2)
            for _, data in sent:
                self.assertTrue(_rfc_checksum_ok(data))
                pkt = IPv6(data)
                self.assertEqual(pkt.src, HOA if mode == "translate" else COA1)
                self.assertEqual(IPv6ExtHdrDestOpt in pkt, mode == "transparent")
            self.assertEqual(balancer.counters.hits["hoa"], 2)

    def test_full_queue_flushes_mid_batch(self) -> None:
        """More packets than the queue holds: every one is sent, in order."""
        balancer, clock = make()
        hoa, coa = address(HOA), address(COA1)
        packets = [raw_mobile(17, hoa, coa, 64, 80, 0, bytes([i])) for i in range(10)]
        sent, fast = forward(balancer, clock, packets, QueueWriter(count=4))
        self.assertEqual([data[-1] for _, data in sent], list(range(10)))
        # The first a miss: bound by the general path; the other nine the fast way.
        self.assertEqual(fast.forwarded, 9)
        self.assertEqual(balancer.counters.packets_out, 10)

    def test_configurations_without_fast_path(self) -> None:
        """Two virtual addresses, a down backend, turned off, a key chain not starting
        with the home address: nothing taken, the general path's results, and the
        reason said once in the log and kept for ``lbproxyctl stats``; a closed
        writer: nothing taken either."""

        def two_vips(b: Balancer) -> None:
            b.set_virtual_addresses(
                [ipaddress.IPv6Address(VIP), ipaddress.IPv6Address("2001:db8:5::81")]
            )

        def one_down(b: Balancer) -> None:
            b.set_backend_up(BACKENDS[0].name, False)

        def off(b: Balancer) -> None:
            b.fast_path = False

        def src_first(b: Balancer) -> None:
            b.chain = make(chain=("src", "hoa"))[0].chain

        reasons = {two_vips: "several virtual addresses", one_down: "backend srv1 is down",
                   off: "turned off", src_first: "key chain starts with 'src', not 'hoa'"}
        for change in (two_vips, one_down, off, src_first, None):
            (fast, clock), (slow, _) = make(), make()
            writer = QueueWriter()
            if change is None:
                writer.close()  # the writer is not ready: nothing is queued
            else:
                change(fast)
                change(slow)
            logged: list[LogEvent] = []
            observe = _observer(logged)
            globalLogPublisher.addObserver(observe)
            try:
                executor = FastPathExecutor(fast, clock, writer)
                packets = [bytes(mobile(coa)) for coa in (COA1, COA2, COA1)]
                sent = executor.inbound(packets)
                executor.inbound(packets[:1])  # a second batch: nothing logged again
            finally:
                globalLogPublisher.removeObserver(observe)
            self.assertEqual(executor.fast.forwarded, 0)
            expected = general(slow, packets)
            if change is None:  # the general path's packets were refused by the writer
                self.assertEqual((sent, writer.stats.dropped), ([], len(expected) + 1))
            else:
                self.assertEqual(sent, expected)
            general(slow, packets[:1])
            _same(self, fast, slow)
            if change is not None:
                self.assertEqual(executor.fast.inbound_off, reasons[change])
                said = [e for e in logged if "fast path off" in str(e.get("log_format", ""))
                        and e.get("direction") == "terminals' packets"]  # fmt: skip
                self.assertEqual(len(said), 1)
                self.assertEqual(said[0]["reason"], reasons[change])

    def test_misses_and_moves_go_to_the_core(self) -> None:
        """A first packet of the usual shape, and the first from a new care-of address,
        go to the general path: the core binds the terminal (scheduler, terminal_seen for
        notification subscriptions) and links the new address; the packets after each
        take the fast path."""
        balancer, clock = make()
        seen: list[tuple[bytes | None, bytes]] = []
        balancer.terminal_seen = lambda home, source: seen.append((home, source))
        hoa, coa, moved = address(HOA), address(COA1), address(COA2)
        packets = [raw_mobile(6, hoa, c, 64, 80, 0, b"") for c in (coa, coa, moved, moved)]
        sent, fast = forward(balancer, clock, packets)
        self.assertEqual(seen, [(hoa, coa)])
        self.assertEqual((fast.forwarded, len(sent)), (2, 4))
        self.assertEqual(dict(balancer.counters.misses), {"hoa": 1})
        binding = balancer.table.get(Key("addr", hoa))
        assert binding is not None
        self.assertEqual(binding.care_of, moved)
        self.assertIs(balancer.table.get(Key("addr", moved)), binding)

    def test_removed_backend_takes_general_path(self) -> None:
        """After a reload removes a backend that holds bindings, the binding moves on
        its next packet exactly as on the general path."""
        (fast, clock), (slow, _) = make(), make()
        first = bytes(mobile(COA1))
        self.assertEqual(forward(fast, clock, [first])[0], general(slow, [first]))
        to = forward(fast, clock, [first])[0][0][0]
        used = next(b for b in BACKENDS if b.packed == to)
        general(slow, [first])
        for b in (fast, slow):
            b.set_backends([x for x in BACKENDS if x is not used])
        again = bytes(mobile(COA2))
        sent, _ = forward(fast, clock, [again])
        self.assertEqual(sent, general(slow, [again]))
        self.assertNotEqual(sent[0][0], used.packed)
        _same(self, fast, slow)

    def test_udp_checksum_never_becomes_zero(self) -> None:
        """A UDP checksum whose adjusted value is 0 is sent as 0xFFFF (RFC 768: 0 means
        none), as the general path does; a TCP one stays 0."""
        for proto in (17, 6):
            (fast, clock), (slow, _) = make(scheduler="round_robin"), make(scheduler="round_robin")
            packets = []
            for t, backend in enumerate(BACKENDS):
                delta = fast.policy.inbound_deltas[backend.packed]
                hoa = address(f"2001:db8:100::{t + 1}")
                coa = address(f"2001:db8:a1::{t + 1}")
                packets.append(raw_mobile(proto, hoa, coa, 64, 80, delta, b""))
            sent, _ = forward(fast, clock, packets)
            self.assertEqual(sent, general(slow, packets))
            pos = 46 if proto == 17 else 56
            fields = {data[pos : pos + 2] for _, data in sent}
            self.assertIn(b"\xff\xff" if proto == 17 else b"\x00\x00", fields)

    def test_a_failure_loses_one_packet_not_the_batch(self) -> None:
        """Should handling one packet raise (a bug: here a scheduler that fails on a
        new terminal), that packet is counted and logged, and the rest of the batch
        is still forwarded, in order."""
        balancer, clock = make()
        hoa, coa = address(HOA), address(COA1)
        known = raw_mobile(17, hoa, coa, 64, 80, 0, b"known")
        forward(balancer, clock, [known])  # bound

        class Broken:
            def choose(self, key: object, load: object) -> None:
                raise RuntimeError("scheduler bug")

        balancer.scheduler = Broken()  # type: ignore[assignment]
        stranger = raw_mobile(17, bytes(15) + b"\x09", address(COA2), 64, 80, 0, b"new")
        sent, fast = forward(balancer, clock, [known, stranger, known])
        self.assertEqual([data[-5:] for _, data in sent], [b"known", b"known"])
        self.assertEqual((fast.forwarded, fast.errors), (2, 1))
        self.assertEqual(len(self.flushLoggedErrors(RuntimeError)), 1)


class ReplyFastPathTests(SynchronousTestCase):
    def test_takes_the_usual_reply(self) -> None:
        """UDP and TCP replies, to a terminal at home and to one whose care-of address
        is confirmed: all four the fast way, checksums valid by scapy's computation, the
        Type 2 Routing Header only for the confirmed one."""
        balancer, _ = make()
        balancer.return_paths.confirm(address(HOA), address(COA2))
        packets = [
            bytes(IPv6(src=str(BACKENDS[1].address), dst=dst, hlim=64) / layer / b"reply")
            for dst in (HOA, "2001:db8:100::7")
            for layer in (UDP(sport=80, dport=4000), TCP(sport=80, dport=4000))
        ]
        sent, fast = forward_replies(balancer, packets)
        self.assertEqual(fast.replies, 4)
        for (to, data), original in zip(sent, packets, strict=True):
            pkt = IPv6(data)
            self.assertTrue(_reply_checksum_ok(data))
            self.assertEqual(pkt.src, VIP)
            self.assertEqual(pkt.hlim, 63)
            if IPv6(original).dst == HOA:
                self.assertEqual((pkt.dst, to), (COA2, address(COA2)))
                self.assertEqual(pkt[IPv6ExtHdrRouting].type, 2)
                self.assertEqual(pkt[IPv6ExtHdrRouting].addresses, [HOA])
            else:
                self.assertNotIn(IPv6ExtHdrRouting, pkt)
                self.assertEqual(pkt.dst, "2001:db8:100::7")
            self.assertEqual(bytes(pkt.lastlayer()), b"reply")
        self.assertEqual(balancer.counters.replies_out, 4)

    def test_several_virtual_addresses_take_the_general_path(self) -> None:
        """With two virtual addresses a reply's source depends on the terminal: nothing
        is taken, the results are the general path's."""
        (fast, _), (slow, _) = make(), make()
        two = [ipaddress.IPv6Address(VIP), ipaddress.IPv6Address("2001:db8:5::81")]
        for b in (fast, slow):
            b.set_virtual_addresses(two)
        packets = [raw_reply(17, BACKENDS[0].packed, address(f"2001:db8:100::{t + 1}"), 64, 0,
                             b"x") for t in range(3)]  # fmt: skip
        sent, path = forward_replies(fast, packets)
        self.assertEqual(path.replies, 0)
        self.assertEqual(path.replies_off, "several virtual addresses")
        self.assertEqual(sent, general_replies(slow, packets))

    def test_udp_checksum_never_becomes_zero(self) -> None:
        """A reply whose adjusted UDP checksum is 0 goes out as 0xFFFF, as on the
        general path; a TCP one as 0."""
        for proto in (17, 6):
            (fast, _), (slow, _) = make(), make()
            deltas = fast.policy.reply_deltas
            packets = [raw_reply(proto, b.packed, address("2001:db8:100::1"), 64,
                                 deltas[b.packed], b"") for b in BACKENDS]  # fmt: skip
            sent, path = forward_replies(fast, packets)
            self.assertEqual(path.replies, 3)
            self.assertEqual(sent, general_replies(slow, packets))
            pos = 46 if proto == 17 else 56
            self.assertEqual({data[pos : pos + 2] for _, data in sent},
                             {b"\xff\xff" if proto == 17 else b"\x00\x00"})  # fmt: skip
