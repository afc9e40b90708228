"""A terminal's journey (lbproxy.core.journey), in-process with the real core and Clock.

The journeys are told by the table's listeners, the return paths, the notification
listener and the general path's slow branches.  These tests drive the real `Balancer`
(the default key chain, Maglev, three backends) with scapy-built packets and check what
each journey holds: the events in order, the packet that caused them (truncated), the
bounds (events per terminal, terminals kept, a flood of one-packet identities), and that
a steady-state hit records nothing.
"""

from __future__ import annotations

import ipaddress
import os
from typing import Any

from scapy.layers.inet import UDP
from scapy.layers.inet6 import HAO, IPv6, IPv6ExtHdrDestOpt
from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase

from lbproxy.core.balancer import Balancer
from lbproxy.core.journey import Journeys
from lbproxy.core.keys import Key
from lbproxy.core.returnpaths import ReturnPaths
from lbproxy.core.selection import Backend
from lbproxy.core.table import StickyTable
from lbproxy.notify.adapter import TableListener
from lbproxy.ops.control import Control, OperatorError
from tests.test_balancer import BACKENDS, COA1, COA2, HOA, VIP, make, mobile

COA3 = "2001:db8:a3::1001"


def packed(text: str) -> bytes:
    return ipaddress.IPv6Address(text).packed


def kinds(journeys: Journeys, key: Key) -> list[str]:
    journey = journeys.find(key)
    assert journey is not None, key
    return [e.kind for e in journey.events]


def following(max_terminals: int = 64, max_events: int = 64, snap: int = 256,
              chain: tuple[str, ...] | None = None) -> tuple[Balancer, Clock, Journeys]:
    balancer, clock = make() if chain is None else make(chain=chain)
    journeys = Journeys(clock, max_terminals, max_events, snap)
    balancer.follow_journeys(journeys)
    return balancer, clock, journeys


class TerminalJourneyTests(SynchronousTestCase):
    def test_moves_are_recorded_with_their_packets(self) -> None:
        """A terminal's first packet makes 'created' and 'linked' (its care-of address),
        each move a 'linked' and a 'care-of' event; each carries the packet that caused
        it, and the care-of address and backend at that moment."""
        balancer, clock, journeys = following()
        first = mobile(COA1)
        self.assertIsNotNone(balancer.inbound(bytearray(first)))
        clock.advance(1)
        second = mobile(COA2, payload=b"moved")
        balancer.inbound(bytearray(second))
        clock.advance(1)
        balancer.inbound(mobile(COA3))
        journey = journeys.find(Key("addr", packed(HOA)))
        assert journey is not None
        self.assertEqual([e.kind for e in journey.events],
                         ["created", "linked", "linked", "care-of", "linked", "care-of"])
        created, linked1, linked2, moved, _, moved3 = journey.events
        self.assertEqual(created.text, f"addr {HOA} -> {created.backend}")
        self.assertEqual(created.packet, bytes(first))
        self.assertEqual(linked1.packet, bytes(first))
        self.assertEqual(created.care_of, packed(COA1))
        self.assertEqual(linked2.text, f"addr {COA2}")
        self.assertEqual(moved.text, f"{COA1} -> {COA2}")
        self.assertEqual(moved.packet, bytes(second))
        self.assertEqual(moved.care_of, packed(COA2))
        self.assertEqual(moved3.at, 2.0)
        bound = balancer.table.get(Key("addr", packed(HOA)))
        assert bound is not None
        self.assertEqual({e.backend for e in journey.events}, {bound.backend.name})
        # every identity of the terminal finds the journey
        for address in (HOA, COA1, COA2, COA3):
            self.assertIs(journeys.find(Key("addr", packed(address))), journey)

    def test_steady_state_records_nothing(self) -> None:
        """Hits from the known care-of address (the steady state) add no event, and a
        packet without news from a terminal keyed by its source address neither."""
        balancer, clock, journeys = following()
        balancer.inbound(mobile(COA1))
        journey = journeys.find(Key("addr", packed(HOA)))
        assert journey is not None
        before = [(e.kind, e.repeat) for e in journey.events]
        for _ in range(200):
            clock.advance(0.01)
            self.assertIsNotNone(balancer.inbound(mobile(COA1)))
        self.assertEqual([(e.kind, e.repeat) for e in journey.events], before)
        plain = bytearray(bytes(IPv6(src="2001:db8:a1::77", dst=VIP) / UDP(dport=80) / b"x"))
        balancer.inbound(bytearray(plain))
        other = journeys.find(Key("addr", packed("2001:db8:a1::77")))
        assert other is not None
        count = len(other.events)
        for _ in range(50):
            balancer.inbound(bytearray(plain))
        self.assertEqual(len(other.events), count)

    def test_snap_truncates_and_keeps_the_length(self) -> None:
        balancer, _clock, journeys = following(snap=64)
        big = mobile(COA1, payload=b"z" * 900)
        balancer.inbound(bytearray(big))
        created = journeys.find(Key("addr", packed(HOA))).events[0]  # type: ignore[union-attr]
        self.assertEqual(created.packet, bytes(big[:64]))
        self.assertEqual(created.length, len(big))
        self.assertEqual(created.as_dict()["packet"], bytes(big[:64]).hex())

    def test_operator_move_and_forget_name_their_cause(self) -> None:
        balancer, clock, journeys = following()
        balancer.inbound(mobile(COA1))
        key = Key("addr", packed(HOA))
        was = balancer.table.get(key).backend.name  # type: ignore[union-attr]
        other = next(b.name for b in BACKENDS if b.name != was)
        clock.advance(5)
        control = Control(balancer)
        control.move(f"addr {COA1}", other, who="alice")  # by an alias
        clock.advance(1)
        control.forget(str(key), who="bob")
        events = journeys.find(key).events  # type: ignore[union-attr]
        self.assertEqual([e.kind for e in events][-2:], ["backend", "gone"])
        self.assertEqual(events[-2].text, f"{was} -> {other} (operator move by alice)")
        self.assertEqual(events[-2].packet, b"")  # no packet caused it
        self.assertEqual(events[-1].text,
                         f"{key} -> {other} removed (operator forget by bob)")
        # after the binding is gone, the journey is still found by its identities
        self.assertEqual(control.journey(f"addr {COA1}")["events"][-1]["kind"], "gone")
        # the terminal comes back: the same journey goes on
        clock.advance(1)
        balancer.inbound(mobile(COA2))
        self.assertEqual(kinds(journeys, key)[-3:], ["gone", "created", "linked"])
        self.assertIs(journeys.find(Key("addr", packed(COA2))), journeys.find(key))

    def test_reassignment_from_a_down_backend(self) -> None:
        balancer, clock, journeys = following()
        balancer.inbound(mobile(COA1))
        key = Key("addr", packed(HOA))
        was = balancer.table.get(key).backend.name  # type: ignore[union-attr]
        balancer.set_backend_up(was, False)
        clock.advance(1)
        balancer.inbound(mobile(COA1))
        last = journeys.find(key).events[-1]  # type: ignore[union-attr]
        self.assertEqual(last.kind, "backend")
        self.assertTrue(last.text.startswith(f"{was} -> "))
        self.assertTrue(last.text.endswith(f"(reassigned: {was} down)"))

    def test_drops_are_recorded_once_with_a_repeat_count(self) -> None:
        """A terminal's packets dropped by the rewrite (hop limit 1) are one event with
        a repeat count; a terminal never seen gets no journey from a drop."""
        balancer, clock, journeys = following()
        balancer.inbound(mobile(COA1))
        dying = bytearray(bytes(IPv6(src=COA1, dst=VIP, hlim=1) / IPv6ExtHdrDestOpt(
            options=[HAO(hoa=HOA)]) / UDP(dport=80) / b"x"))
        for _ in range(5):
            clock.advance(0.1)
            self.assertIsNone(balancer.inbound(bytearray(dying)))
        last = journeys.find(Key("addr", packed(HOA))).events[-1]  # type: ignore[union-attr]
        self.assertEqual((last.kind, last.text, last.repeat), ("drop", "hop-limit", 5))
        self.assertEqual(last.packet, bytes(dying))
        stranger = bytearray(bytes(IPv6(src="2001:db8:a1::99", dst=VIP, hlim=1)
                                   / UDP(dport=80) / b"x"))  # fmt: skip
        balancer.inbound(stranger)
        # its binding was made (a journey), then the packet dropped: both recorded
        self.assertEqual(kinds(journeys, Key("addr", packed("2001:db8:a1::99"))),
                         ["created", "drop"])

    def test_expiry_is_gone(self) -> None:
        balancer, clock, journeys = following()
        balancer.inbound(mobile(COA1))
        clock.advance(400)
        balancer.sweep()
        last = journeys.find(Key("addr", packed(HOA))).events[-1]  # type: ignore[union-attr]
        self.assertEqual(last.kind, "gone")
        self.assertTrue(last.text.endswith("expired"))


class BoundTests(SynchronousTestCase):
    def test_events_per_terminal_are_a_ring(self) -> None:
        balancer, clock, journeys = following(max_events=8)
        for i in range(20):
            clock.advance(1)
            balancer.inbound(mobile(f"2001:db8:a{1 + i % 9}::{i + 1:x}"))
        journey = journeys.find(Key("addr", packed(HOA)))
        assert journey is not None
        self.assertEqual(len(journey.events), 8)
        # created and linked, then linked and care-of per move, and an unlinked each
        # time the table's alias bound (8) drops the oldest care-of address
        self.assertEqual(journey.earlier + 8, 2 + 2 * 19 + (20 - 8))
        self.assertEqual(journey.events[-1].text.split(" -> ")[1], "2001:db8:a2::14")
        self.assertEqual(journey.as_dict()["earlier"], journey.earlier)

    def test_terminals_kept_are_bounded_least_recent_first_out(self) -> None:
        balancer, clock, journeys = following(max_terminals=8)
        for i in range(40):
            balancer.inbound(mobile(f"2001:db8:a1::{i + 1:x}", hoa=f"2001:db8:100::{i + 1:x}"))
            clock.advance(0.1)
        self.assertLessEqual(len(journeys), 8)
        self.assertEqual(journeys.evicted, 40 - len(journeys))
        self.assertIsNone(journeys.find(Key("addr", packed("2001:db8:100::1"))))
        self.assertIsNotNone(journeys.find(Key("addr", packed("2001:db8:100::28"))))
        # nothing of an evicted journey is left in the index
        self.assertLessEqual(len(journeys.index), 8 * journeys.max_names)

    def test_a_flood_of_one_packet_identities_keeps_moving_terminals(self) -> None:
        """Terminals that moved (a second event) are in the main segment; 5,000 forged
        home addresses, one packet each, churn only the probationary one."""
        balancer, clock, journeys = following(max_terminals=100)
        movers = [f"2001:db8:100::{i + 1:x}" for i in range(50)]
        for i, hoa in enumerate(movers):
            balancer.inbound(mobile(f"2001:db8:a1::{i + 1:x}", hoa=hoa))
            clock.advance(0.01)
            balancer.inbound(mobile(f"2001:db8:a2::{i + 1:x}", hoa=hoa))
        for i in range(5000):
            clock.advance(0.001)
            balancer.inbound(mobile(f"2001:db8:a3::{i + 1:x}", hoa=f"2001:db8:666::{i + 1:x}"))
        self.assertLessEqual(len(journeys), 100)
        kept = [h for h in movers if journeys.find(Key("addr", packed(h))) is not None]
        self.assertEqual(len(kept), 50)

    def test_garbage_and_refusals_start_no_journey(self) -> None:
        """Malformed packets, packets to other addresses and first packets the table
        refuses (a flood from one /64 into a full table) leave no journey: nothing a
        peer sends that changes nothing in the table costs journey memory."""
        balancer, clock = make(max_entries=4)
        journeys = Journeys(clock, 16)
        balancer.follow_journeys(journeys)
        for junk in (b"", b"\x60" * 39, b"\x45" + bytes(60), bytes(mobile(COA1))[:50]):
            self.assertIsNone(balancer.inbound(bytearray(junk)))
        other = bytearray(bytes(IPv6(src=COA1, dst="2001:db8:5::99") / UDP(dport=80)))
        self.assertIsNone(balancer.inbound(other))
        self.assertEqual(len(journeys), 0)
        refused = 0
        for i in range(400):  # one /64: admission throttles it once the table is full
            clock.advance(0.001)
            packet = mobile(f"2001:db8:a1::{i + 1:x}", hoa=f"2001:db8:666::{i + 1:x}")
            refused += balancer.inbound(packet) is None
        self.assertGreater(refused, 0)
        self.assertEqual(balancer.counters.dropped["table-full"], refused)
        self.assertLessEqual(len(journeys), 16)
        self.assertLessEqual(len(journeys), 400 - refused)

    def test_bad_bounds_refused(self) -> None:
        for bad in ({"max_terminals": 0}, {"max_events": 0}, {"snap": -1}):
            with self.assertRaises(ValueError):
                Journeys(Clock(), **bad)


class NotificationTests(SynchronousTestCase):
    def test_notified_move_and_confirmation(self) -> None:
        """A home agent's notification (the real TableListener) is a 'notified' event;
        the return path's confirmation and its end are 'confirmed', 'unconfirmed'; an
        identity the notification links carries no packet (none caused it)."""
        balancer, clock, journeys = following()
        balancer.inbound(mobile(COA1))
        clock.advance(1)
        balancer.inbound(mobile(COA2))
        listener = TableListener(balancer.table, balancer.return_paths, journeys=journeys)
        clock.advance(1)
        listener.binding_changed(packed(HOA), None, packed(COA2), 1, 60)
        clock.advance(1)
        listener.binding_changed(packed(HOA), packed(COA2), packed(COA3), 2, 60)
        key = Key("addr", packed(HOA))
        events = list(journeys.find(key).events)  # type: ignore[union-attr]
        self.assertEqual([e.kind for e in events],
                         ["created", "linked", "linked", "care-of", "notified", "confirmed",
                          "linked", "notified", "confirmed"])
        self.assertEqual(events[3].packet, bytes(mobile(COA2)))
        self.assertEqual(events[4].text, f"- -> {COA2}, lifetime 60 s")
        self.assertEqual(events[5].text, f"replies via {COA2} for 60 s")
        self.assertEqual(events[6].text, f"addr {COA3}")
        self.assertEqual(events[7].text, f"{COA2} -> {COA3}, lifetime 60 s")
        self.assertEqual(events[8].care_of, packed(COA3))
        self.assertEqual([e.packet for e in events[4:]], [b""] * 5)
        clock.advance(61)
        balancer.sweep()
        self.assertEqual(kinds(journeys, key)[-1], "unconfirmed")

    def test_source_keyed_terminal_rekeyed_is_one_journey(self) -> None:
        """Keyed by its source address only, a notified move makes a separate binding
        for the new care-of address; its journey joins the terminal's."""
        balancer, clock, journeys = following(chain=("src",))
        plain1 = bytearray(bytes(IPv6(src=COA1, dst=VIP) / UDP(dport=80) / b"x"))
        balancer.inbound(plain1)
        listener = TableListener(balancer.table, balancer.return_paths, journeys=journeys)
        clock.advance(1)
        listener.binding_changed(packed(HOA), None, packed(COA1), 1, 60)  # COA1 is HOA's
        clock.advance(1)
        listener.binding_changed(packed(HOA), packed(COA1), packed(COA2), 2, 60)
        self.assertIsNot(balancer.table.get(Key("addr", packed(COA2))),
                         balancer.table.get(Key("addr", packed(COA1))))
        journey = journeys.find(Key("addr", packed(COA2)))
        assert journey is not None
        self.assertIs(journeys.find(Key("addr", packed(COA1))), journey)
        self.assertIs(journeys.find(Key("addr", packed(HOA))), journey)
        self.assertEqual([e.kind for e in journey.events],
                         ["created", "notified", "confirmed", "created", "notified",
                          "confirmed"])
        self.assertEqual(journey.events[3].text, f"addr {COA2} -> {journey.backend}")
        self.assertEqual(len(journeys), 1)
        # the second binding's expiry is recorded on the same journey
        clock.advance(400)
        balancer.sweep()
        self.assertEqual([e.kind for e in journey.events].count("gone"), 2)

    def test_return_paths_alone(self) -> None:
        """ReturnPaths tells its observer of confirmations made and ended."""
        seen: list[tuple[bytes, bytes | None, float | None]] = []
        paths = ReturnPaths(Clock(), 2)
        paths.observer = lambda *a: seen.append(a)
        paths.confirm(b"h" * 16, b"c" * 16, 5.0)
        paths.confirm(b"i" * 16, b"d" * 16)
        paths.confirm(b"j" * 16, b"e" * 16)  # the bound pushes the oldest out
        self.assertEqual(seen, [(b"h" * 16, b"c" * 16, 5.0), (b"i" * 16, b"d" * 16, None),
                                (b"h" * 16, None, None), (b"j" * 16, b"e" * 16, None)])


class ControlTests(SynchronousTestCase):
    def test_journey_op(self) -> None:
        balancer, clock, _journeys = following()
        balancer.inbound(mobile(COA1))
        clock.advance(1)
        balancer.inbound(mobile(COA2))
        control = Control(balancer)
        result = control.journey(f"addr {COA2}")
        self.assertEqual(result["asked"], f"addr {COA2}")
        self.assertEqual(result["key"], f"addr {HOA}")
        self.assertEqual(result["care_of"], COA2)
        self.assertIn(f"addr {COA1}", result["names"])
        self.assertEqual([e["kind"] for e in result["events"]],
                         ["created", "linked", "linked", "care-of"])
        self.assertEqual(bytes.fromhex(result["events"][0]["packet"]), bytes(mobile(COA1)))
        self.assertEqual(result["now"], 1.0)

    def test_unknown_and_bad_keys_and_off(self) -> None:
        balancer, _clock, _journeys = following()
        control = Control(balancer)
        with self.assertRaises(OperatorError) as e:
            control.journey("addr 2001:db8::dead")
        self.assertIn("no journey for addr 2001:db8::dead", str(e.exception))
        with self.assertRaises(OperatorError):
            control.journey("addr not-an-address")
        plain = Balancer(chain=balancer.chain, table=StickyTable(Clock(), 300.0, 10),
                         scheduler=balancer.scheduler,
                         backends=[Backend("b", ipaddress.IPv6Address("2001:db8:b0::1"))],
                         virtual_addresses=[ipaddress.IPv6Address(VIP)], clock=Clock())
        with self.assertRaises(OperatorError) as e:
            Control(plain).journey(f"addr {HOA}")
        self.assertIn("not kept", str(e.exception))


class ServiceWiringTests(SynchronousTestCase):
    """``twistd lbproxy``'s service tree (real core, in-memory packet system): journeys
    are followed once started -- after persistence restored the table, so restored
    bindings start none -- and ``[control] journeys = 0`` keeps none."""

    def make(self, extra: str, directory: str) -> Any:
        from twisted.internet.testing import MemoryReactorClock

        from lbproxy.config import load_config
        from lbproxy.tap import BalancerService
        from lbproxy.testing import MemoryPacketSystem
        from tests.test_preflight import FakeHost
        from tests.test_tap import CONFIG, backends

        path = os.path.join(directory, "lbproxy.toml")
        with open(path, "w") as f:
            f.write(CONFIG.format(backends=backends("a", "b")) + extra)
        system = MemoryPacketSystem(interfaces=("lbc", "lbs"))
        service = BalancerService(load_config(path), MemoryReactorClock(),
                                  install_sighup=False, system=system, host=FakeHost())
        return service, system

    def test_followed_after_the_restore(self) -> None:
        from tests.test_tap import mobile as tap_mobile

        directory = self.mktemp()
        os.makedirs(directory)
        saved = os.path.join(directory, "table.jsonl")
        persist = f'[persistence]\npath = "{saved}"\ninterval = 60\n'
        first, _system = self.make(persist, directory)
        first.privilegedStartService()
        first.startService()
        first.balancer.table.insert(Key("addr", packed("2001:db8:100::7")),
                                    first.balancer.backends["a"])
        first.stopService()
        service, system = self.make(persist + "[control]\njourneys = 8\n", directory)
        self.assertIsNone(service.balancer.journeys)  # not before it starts
        service.privilegedStartService()
        service.startService()
        self.addCleanup(service.stopService)
        journeys = service.balancer.journeys
        assert journeys is not None
        self.assertEqual(journeys.max_terminals, 8)
        self.assertEqual(len(service.balancer.table), 1)  # restored ...
        self.assertEqual(len(journeys), 0)  # ... without a journey
        system.inject("lbc", tap_mobile("2001:db8:100::1"))
        service.forwarder.client.doRead()
        self.assertEqual(service.control.journey("addr 2001:db8:100::1")["events"][0]["kind"],
                         "created")

    def test_none_kept(self) -> None:
        directory = self.mktemp()
        os.makedirs(directory)
        service, _system = self.make("[control]\njourneys = 0\n", directory)
        service.privilegedStartService()
        service.startService()
        self.addCleanup(service.stopService)
        self.assertIsNone(service.balancer.journeys)
        with self.assertRaises(OperatorError):
            service.control.journey("addr 2001:db8:100::1")
