"""`lbproxy.io.fastpath`: the usual packet from the receive buffer into the send queue.

The fast path must be invisible: for any sequence of packets, the same bytes out in the
same order, the same counters and the same table as the general path
(`Balancer.inbound`).  It runs here sans I/O: packets are laid out in a
`lbproxy.io.mmsg.Batch` as ``recvmmsg`` leaves them, and the writer's queues are a
`QueueWriter` whose "flush" collects what ``sendmmsg`` would have sent.  The real
writer and reader around it are tested against the kernel in tests/test_mmsg.py and
end to end in tests/test_dataplane.py.
"""

from __future__ import annotations

import ipaddress

from hypothesis import given, settings
from hypothesis import strategies as st
from scapy.layers.inet import TCP, UDP
from scapy.layers.inet6 import (
    HAO,
    ICMPv6EchoReply,
    IPv6,
    IPv6ExtHdrDestOpt,
    IPv6ExtHdrFragment,
    IPv6ExtHdrRouting,
    PadN,
)
from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase

from lbproxy.core.balancer import Balancer
from lbproxy.io.fastpath import FastPath
from lbproxy.io.mmsg import Batch
from tests.test_balancer import BACKENDS, COA1, COA2, HOA, VIP, make, mobile


class QueueWriter:
    """The writer's queues (`lbproxy.io.fastpath.SendQueues`) without a socket: no link
    neighbours, one small raw queue for every destination (so order is total and full
    queues flush mid-batch); a flush appends (destination, bytes) to ``sent``."""

    def __init__(self, count: int = 3) -> None:
        self.queue = Batch(count, 2048, addressed=True)
        self.routes: dict[bytes, tuple[Batch, int]] = {}
        self.raw_route = (self.queue, 0)
        self.sent: list[tuple[bytes, bytes]] = []
        self.ready = True

    def send(self, packet: bytearray) -> None:
        """What `BatchPacketWriter.send` does for the general path's packets."""
        queue = self.queue
        i = queue.queued
        queue.data[i * queue.slot : i * queue.slot + len(packet)] = packet
        queue.iov_lengths[2 * i + 1] = len(packet)
        queue.addresses[28 * i + 8 : 28 * i + 24] = packet[24:40]
        queue.queued = i + 1
        if queue.queued == queue.count:
            self.flush_queue(queue)

    def flush_queue(self, queue: Batch) -> None:
        for i in range(queue.queued):
            start = i * queue.slot
            data = bytes(queue.data[start : start + queue.iov_lengths[2 * i + 1]])
            self.sent.append((bytes(queue.addresses[28 * i + 8 : 28 * i + 24]), data))
        queue.queued = 0


def forward(
    balancer: Balancer, clock: Clock, packets: list[bytes], writer: QueueWriter | None = None
) -> tuple[list[tuple[bytes, bytes]], FastPath]:
    """`packets` as one ``recvmmsg`` batch through a FastPath (the rest through
    `Balancer.inbound`, as the reader does): what was sent, in order."""
    writer = writer or QueueWriter()
    fast = FastPath(balancer, writer, clock)
    rx = Batch(len(packets), 2048)
    for i, packet in enumerate(packets):
        rx.data[i * 2048 : i * 2048 + len(packet)] = packet
        rx.lengths[16 * i + 14] = len(packet)

    def other(start: int, length: int) -> None:
        out = balancer.inbound(bytearray(rx.data[start : start + length]))
        if out is not None:
            writer.send(out)

    fast.forward(rx.data, rx.slot, rx.lengths, len(packets), other)
    writer.flush_queue(writer.queue)
    return writer.sent, fast


def general(balancer: Balancer, packets: list[bytes]) -> list[tuple[bytes, bytes]]:
    """The same packets through the general path only."""
    sent = []
    for packet in packets:
        out = balancer.inbound(bytearray(packet))
        if out is not None:
            sent.append((bytes(out[24:40]), bytes(out)))
    return sent


def _raw_mobile(
    proto: int, hoa: bytes, coa: bytes, hop: int, dport: int, csum: int, payload: bytes
) -> bytes:
    """The fast path's shape, built by hand: IPv6, PadN(2)+HAO, UDP or TCP.

    By hand because the checksum field is chosen by the test (0, or anything): the
    fast path must treat every value exactly as the general path does.
    """
    if proto == 17:
        l4 = (
            (40000).to_bytes(2, "big") + dport.to_bytes(2, "big")
            + (8 + len(payload)).to_bytes(2, "big") + csum.to_bytes(2, "big")
        )  # fmt: skip
    else:
        l4 = (
            (40000).to_bytes(2, "big") + dport.to_bytes(2, "big") + bytes(8)
            + b"\x50\x10\xff\xff" + csum.to_bytes(2, "big") + bytes(2)
        )  # fmt: skip
    dest = bytes([proto, 2, 1, 2, 0, 0, 0xC9, 16]) + hoa
    body = dest + l4 + payload
    header = bytes([0x60, 0, 0, 0]) + len(body).to_bytes(2, "big") + bytes([60, hop])
    return header + coa + ipaddress.IPv6Address(VIP).packed + body


def _other_shape(kind: int, t: int) -> bytes:
    """Packets the fast path must leave to the general path: no HAO, a fragment, the
    HAO without PadN before it, a truncated packet."""
    home = f"2001:db8:100::{t + 1}"
    coa = f"2001:db8:a9::{t + 1}"
    if kind == 0:
        return bytes(IPv6(src=home, dst=VIP) / UDP(sport=1, dport=80) / b"plain")
    if kind == 1:
        return bytes(
            IPv6(src=coa, dst=VIP) / IPv6ExtHdrDestOpt(options=[HAO(hoa=home)])
            / IPv6ExtHdrFragment(m=1, id=7) / UDP(sport=1, dport=80) / b"frag"
        )  # fmt: skip
    if kind == 2:
        return bytes(
            IPv6(src=coa, dst=VIP)
            / IPv6ExtHdrDestOpt(options=[HAO(hoa=home), PadN(optdata=b"\0\0")])
            / UDP(sport=1, dport=80) / b"odd layout"
        )  # fmt: skip
    return _raw_mobile(17, ipaddress.IPv6Address(home).packed,
                       ipaddress.IPv6Address(coa).packed, 64, 80, 0, b"cut")[:70]  # fmt: skip


def _packets(
    specs: list[tuple[int, int, int, int, int, int, bytes]], others: list[tuple[int, int, int]]
) -> list[bytes]:
    packets = []
    for proto, t, c, hop, dport, csum, payload in specs:
        hoa = ipaddress.IPv6Address(f"2001:db8:100::{t + 1}").packed
        coa = ipaddress.IPv6Address(f"2001:db8:a{c + 1}::{t + 1}").packed
        packets.append(_raw_mobile(proto, hoa, coa, hop, dport, csum, payload))
    for at, kind, t in others:  # interleaved, so order across both paths is checked
        packets.insert(at % (len(packets) + 1), _other_shape(kind, t))
    return packets


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


class FastPathTests(SynchronousTestCase):
    def assert_same(self, fast: Balancer, slow: Balancer) -> None:
        self.assertEqual(fast.counters.as_dict(), slow.counters.as_dict())
        self.assertEqual(
            [(k, b.backend, b.care_of, b.packets) for k, b in fast.table],
            [(k, b.backend, b.care_of, b.packets) for k, b in slow.table],
        )

    @settings(max_examples=200, deadline=None)
    @given(
        mode=st.sampled_from(["translate", "transparent"]),
        batches=st.lists(
            st.lists(
                st.tuples(
                    st.sampled_from([6, 17]),
                    st.integers(0, 3),  # terminal
                    st.integers(0, 2),  # care-of address
                    st.sampled_from([0, 1, 2, 64, 255]),  # hop limit
                    st.sampled_from([80, 5353]),
                    st.integers(0, 0xFFFF),  # checksum field
                    st.binary(max_size=24),
                ),
                max_size=12,
            ),
            min_size=1,
            max_size=3,
        ),
        others=st.lists(
            st.tuples(st.integers(0, 12), st.integers(0, 3), st.integers(0, 3)), max_size=4
        ),
        ports=st.sampled_from([(), (80,)]),
    )
    def test_same_as_general_path(
        self,
        mode: str,
        batches: list[list[tuple[int, int, int, int, int, int, bytes]]],
        others: list[tuple[int, int, int]],
        ports: tuple[int, ...],
    ) -> None:
        """Any batches of usual-shape packets mixed with others: the same packets out
        in the same order, the same counters, the same table."""
        (fast, clock), (slow, _) = (
            make(mode=mode, scheduler="round_robin"),
            make(mode=mode, scheduler="round_robin"),
        )
        for b in (fast, slow):
            b.set_virtual_addresses([ipaddress.IPv6Address(VIP)], ports)
        for n, specs in enumerate(batches):
            packets = _packets(specs, others if n == 0 else [])
            sent, _ = forward(fast, clock, packets)
            self.assertEqual(sent, general(slow, packets))
        self.assert_same(fast, slow)

    def test_takes_the_usual_shape(self) -> None:
        """A known terminal's HAO packets go the fast way; the output's checksum is
        valid by scapy's computation, for UDP and TCP, in both modes."""
        for mode in ("translate", "transparent"):
            balancer, clock = make(mode=mode)
            balancer.inbound(mobile(COA1))  # the binding exists from now on
            packets = [_usual(layer) for layer in (UDP(sport=1, dport=80), TCP(sport=1, dport=80))]
            for packet in packets:
                self.assertTrue(_rfc_checksum_ok(packet))
            sent, fast = forward(balancer, clock, packets)
            self.assertEqual(fast.forwarded, 2)
            for _, data in sent:
                self.assertTrue(_rfc_checksum_ok(data))
                pkt = IPv6(data)
                self.assertEqual(pkt.src, HOA if mode == "translate" else COA2)
                self.assertEqual(IPv6ExtHdrDestOpt in pkt, mode == "transparent")
            self.assertEqual(balancer.counters.hits["hoa"], 2)

    def test_full_queue_flushes_mid_batch(self) -> None:
        """More packets than the queue holds: every one is sent, in order."""
        balancer, clock = make()
        hoa = ipaddress.IPv6Address(HOA).packed
        coa = ipaddress.IPv6Address(COA1).packed
        packets = [_raw_mobile(17, hoa, coa, 64, 80, 0, bytes([i])) for i in range(10)]
        sent, fast = forward(balancer, clock, packets, QueueWriter(count=4))
        self.assertEqual([data[-1] for _, data in sent], list(range(10)))
        self.assertEqual(fast.forwarded, 10)  # the first a miss, bound by the balancer
        self.assertEqual(balancer.counters.packets_out, 10)

    def test_configurations_without_fast_path(self) -> None:
        """Two virtual addresses, a down backend, turned off, a closed writer: nothing
        taken, the same results as the general path."""

        def two_vips(b: Balancer) -> None:
            b.set_virtual_addresses(
                [ipaddress.IPv6Address(VIP), ipaddress.IPv6Address("2001:db8:5::81")]
            )

        def one_down(b: Balancer) -> None:
            b.set_backend_up(BACKENDS[0].name, False)

        def off(b: Balancer) -> None:
            b.fast_path = False

        for change in (two_vips, one_down, off, None):
            (fast, clock), (slow, _) = make(), make()
            writer = QueueWriter()
            if change is None:
                writer.ready = False
            else:
                change(fast)
                change(slow)
            packets = [bytes(mobile(coa)) for coa in (COA1, COA2, COA1)]
            sent, path = forward(fast, clock, packets, writer)
            self.assertEqual(path.forwarded, 0)
            self.assertEqual(sent, general(slow, packets))
            self.assert_same(fast, slow)

    def test_miss_on_the_fast_path_reports_the_terminal(self) -> None:
        """A first packet of the usual shape makes its binding through the balancer
        (scheduler, terminal_seen for notification subscriptions) and is forwarded."""
        balancer, clock = make()
        seen: list[tuple[bytes | None, bytes]] = []
        balancer.terminal_seen = lambda home, source: seen.append((home, source))
        hoa = ipaddress.IPv6Address(HOA).packed
        coa = ipaddress.IPv6Address(COA1).packed
        sent, fast = forward(balancer, clock, [_raw_mobile(6, hoa, coa, 64, 80, 0, b"")])
        self.assertEqual(seen, [(hoa, coa)])
        self.assertEqual(fast.forwarded, 1)
        self.assertEqual(len(sent), 1)
        self.assertEqual(dict(balancer.counters.misses), {"hoa": 1})

    def test_removed_backend_takes_general_path(self) -> None:
        """After a reload removes a backend that holds bindings, the binding moves on
        its next packet exactly as on the general path."""
        (fast, clock), (slow, _) = make(), make()
        first = bytes(mobile(COA1))
        self.assertEqual(forward(fast, clock, [first])[0], general(slow, [first]))
        used = next(b for b in BACKENDS if b.packed == forward(fast, clock, [first])[0][0][0])
        general(slow, [first])
        for b in (fast, slow):
            b.set_backends([x for x in BACKENDS if x is not used])
        again = bytes(mobile(COA2))
        sent, _ = forward(fast, clock, [again])
        self.assertEqual(sent, general(slow, [again]))
        self.assertNotEqual(sent[0][0], used.packed)
        self.assert_same(fast, slow)

    def test_udp_checksum_never_becomes_zero(self) -> None:
        """A UDP checksum whose adjusted value is 0 is sent as 0xFFFF (RFC 768: 0 means
        none), as the general path does; a TCP one stays 0."""
        for proto in (17, 6):
            (fast, clock), (slow, _) = make(scheduler="round_robin"), make(scheduler="round_robin")
            packets = []
            for t, backend in enumerate(BACKENDS):
                delta, _ = fast._backend_delta(backend)
                hoa = ipaddress.IPv6Address(f"2001:db8:100::{t + 1}").packed
                coa = ipaddress.IPv6Address(f"2001:db8:a1::{t + 1}").packed
                packets.append(_raw_mobile(proto, hoa, coa, 64, 80, delta, b""))
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
        hoa = ipaddress.IPv6Address(HOA).packed
        coa = ipaddress.IPv6Address(COA1).packed
        known = _raw_mobile(17, hoa, coa, 64, 80, 0, b"known")
        forward(balancer, clock, [known])  # bound

        class Broken:
            def choose(self, key: object, load: object) -> None:
                raise RuntimeError("scheduler bug")

        balancer.scheduler = Broken()  # type: ignore[assignment]
        stranger = _raw_mobile(17, bytes(15) + b"\x09", coa, 64, 80, 0, b"new")
        sent, fast = forward(balancer, clock, [known, stranger, known])
        self.assertEqual([data[-5:] for _, data in sent], [b"known", b"known"])
        self.assertEqual((fast.forwarded, fast.errors), (2, 1))
        self.assertEqual(len(self.flushLoggedErrors(RuntimeError)), 1)


# -- replies (FastPath.reply) --------------------------------------------------------

#: Addresses of "this host" in the reply tests: replies to them are left to the kernel.
OWN = ipaddress.IPv6Address("2001:db8:b0::1").packed


def _raw_reply(proto: int, backend: int, t: int, hop: int, csum: int, payload: bytes) -> bytes:
    """A backend's reply, built by hand (the checksum field is the test's choice):
    IPv6 straight to UDP or TCP, from backend `backend` (3: not a backend) to the home
    address of terminal `t`; t = 7 is multicast, 8 link-local, 9 this host."""
    source = (BACKENDS[backend].packed if backend < 3
              else ipaddress.IPv6Address("2001:db8:b0::99").packed)  # fmt: skip
    destination = {
        7: ipaddress.IPv6Address("ff02::1").packed,
        8: ipaddress.IPv6Address("fe80::1").packed,
        9: OWN,
    }.get(t, ipaddress.IPv6Address(f"2001:db8:100::{t + 1}").packed)
    if proto == 17:
        l4 = (80).to_bytes(2, "big") + (40000).to_bytes(2, "big") + (
            8 + len(payload)).to_bytes(2, "big") + csum.to_bytes(2, "big")  # fmt: skip
    else:
        l4 = ((80).to_bytes(2, "big") + (40000).to_bytes(2, "big") + bytes(8)
              + b"\x50\x10\xff\xff" + csum.to_bytes(2, "big") + bytes(2))  # fmt: skip
    body = l4 + payload
    header = bytes([0x60, 0, 0, 0]) + len(body).to_bytes(2, "big") + bytes([proto, hop])
    return header + source + destination + body


def forward_replies(
    balancer: Balancer, packets: list[bytes]
) -> tuple[list[tuple[bytes, bytes]], FastPath]:
    """`packets` as one batch read on the server link, through FastPath.reply; the rest
    as the forwarder's ``_from_backend`` does: this host's, multicast and link-local
    are left alone, everything else goes through `Balancer.outbound`."""
    writer = QueueWriter()
    fast = FastPath(balancer, writer, Clock())
    fast.own_addresses = {OWN}
    rx = Batch(len(packets), 2048)
    for i, packet in enumerate(packets):
        rx.data[i * 2048 : i * 2048 + len(packet)] = packet
        rx.lengths[16 * i + 14] = len(packet)

    def other(start: int, length: int) -> None:
        packet = bytearray(rx.data[start : start + length])
        if not _left_to_kernel(bytes(packet)):
            out = balancer.outbound(packet)
            if out is not None:
                writer.send(out)

    fast.reply(rx.data, rx.slot, rx.lengths, len(packets), other)
    writer.flush_queue(writer.queue)
    return writer.sent, fast


def _left_to_kernel(packet: bytes) -> bool:
    return packet[24] == 0xFF or (packet[24] == 0xFE and packet[25] & 0xC0 == 0x80) or (
        packet[24:40] == OWN)  # fmt: skip


def general_replies(balancer: Balancer, packets: list[bytes]) -> list[tuple[bytes, bytes]]:
    sent = []
    for packet in packets:
        if _left_to_kernel(packet):
            continue
        out = balancer.outbound(bytearray(packet))
        if out is not None:
            sent.append((bytes(out[24:40]), bytes(out)))
    return sent


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


class ReplyFastPathTests(SynchronousTestCase):
    @settings(max_examples=200, deadline=None)
    @given(
        specs=st.lists(
            st.tuples(
                st.sampled_from([6, 17]),
                st.integers(0, 3),  # backend (3: not one)
                st.integers(0, 9),  # terminal (7-9: multicast, link-local, this host)
                st.sampled_from([0, 1, 2, 64]),  # hop limit
                st.integers(0, 0xFFFF),  # checksum field
                st.binary(max_size=16),
            ),
            min_size=1,
            max_size=20,
        ),
        confirmed=st.sets(st.integers(0, 6)),
        icmp=st.integers(0, 20),  # where an ICMPv6 echo reply goes in the batch
    )
    def test_same_as_general_path(
        self,
        specs: list[tuple[int, int, int, int, int, bytes]],
        confirmed: set[int],
        icmp: int,
    ) -> None:
        """Any batch of replies, confirmed care-of addresses or not, mixed with other
        traffic: the same packets out in the same order, the same counters."""
        (fast, _), (slow, _) = make(), make()
        for t in confirmed:
            home = ipaddress.IPv6Address(f"2001:db8:100::{t + 1}").packed
            coa = ipaddress.IPv6Address(f"2001:db8:a9::{t + 1}").packed
            for b in (fast, slow):
                b.confirm(home, coa)
        packets = [_raw_reply(*spec) for spec in specs]
        echo = bytes(IPv6(src=str(BACKENDS[0].address), dst="2001:db8:100::1")
                     / ICMPv6EchoReply(id=1, seq=1))  # fmt: skip
        packets.insert(icmp % (len(packets) + 1), echo)
        sent, _ = forward_replies(fast, packets)
        self.assertEqual(sent, general_replies(slow, packets))
        self.assertEqual(fast.counters.as_dict(), slow.counters.as_dict())

    def test_takes_the_usual_reply(self) -> None:
        """UDP and TCP replies, to a terminal at home and to one whose care-of address
        is confirmed: all four the fast way, checksums valid by scapy's computation, the
        Type 2 Routing Header only for the confirmed one."""
        balancer, _ = make()
        home = ipaddress.IPv6Address(HOA).packed
        balancer.confirm(home, ipaddress.IPv6Address(COA2).packed)
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
                self.assertEqual((pkt.dst, to), (COA2, ipaddress.IPv6Address(COA2).packed))
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
        packets = [_raw_reply(17, 0, t, 64, 0, b"x") for t in range(3)]
        sent, path = forward_replies(fast, packets)
        self.assertEqual(path.replies, 0)
        self.assertEqual(sent, general_replies(slow, packets))

    def test_udp_checksum_never_becomes_zero(self) -> None:
        """A reply whose adjusted UDP checksum is 0 goes out as 0xFFFF, as on the
        general path; a TCP one as 0."""
        for proto in (17, 6):
            (fast, _), (slow, _) = make(), make()
            plan = fast.reply_plan()
            assert plan is not None
            packets = [_raw_reply(proto, b, 0, 64, plan.deltas[BACKENDS[b].packed], b"")
                       for b in range(3)]  # fmt: skip
            sent, path = forward_replies(fast, packets)
            self.assertEqual(path.replies, 3)
            self.assertEqual(sent, general_replies(slow, packets))
            pos = 46 if proto == 17 else 56
            self.assertEqual({data[pos : pos + 2] for _, data in sent},
                             {b"\xff\xff" if proto == 17 else b"\x00\x00"})  # fmt: skip
