"""The fleet: balancers sharing their exceptions to Maglev through a real redis-server.

Every test starts its own ``redis-server`` (UNIX socket in a temporary directory, no
persistence; `lbproxy.testbed.store.RedisServer`) and stops it; the balancers are real
`Balancer` objects on the real reactor, each with its own `FleetService`, in this
process.  Without redis-server on the host the tests skip, saying why.
"""

from __future__ import annotations

import functools
import ipaddress
import time
from collections.abc import Callable, Sequence
from typing import Any

from scapy.layers.inet import UDP
from scapy.layers.inet6 import HAO, IPv6, IPv6ExtHdrDestOpt
from twisted.internet import reactor, task
from twisted.trial.unittest import SkipTest, TestCase

from lbproxy.core import actions
from lbproxy.core.balancer import Balancer
from lbproxy.core.keys import Key, KeyChain
from lbproxy.core.selection import Backend, Maglev, scheduler_from_name
from lbproxy.core.table import StickyTable
from lbproxy.fleet.codec import Layout, Refused
from lbproxy.fleet.service import FleetService
from lbproxy.notify.adapter import TableListener
from lbproxy.ops.control import Control
from lbproxy.testbed.store import RedisServer, StoreUnavailableError

VIP = "2001:db8:5::80"
BACKENDS = [
    Backend(name=f"srv{i}", address=ipaddress.IPv6Address(f"2001:db8:b0::1{i}"))
    for i in (1, 2, 3)
]
SRV4 = Backend(name="srv4", address=ipaddress.IPv6Address("2001:db8:b0::14"))
BY_ADDRESS = {str(b.address): b.name for b in [*BACKENDS, SRV4]}


def addr(text: str) -> Key:
    return Key("addr", ipaddress.IPv6Address(text).packed)


def packed(text: str) -> bytes:
    return ipaddress.IPv6Address(text).packed


def mobile(coa: str, hoa: str, sport: int = 40000) -> bytearray:
    """A UDP packet from a terminal away from home: source = CoA, HAO = home address."""
    pkt = IPv6(src=coa, dst=VIP) / IPv6ExtHdrDestOpt(options=[HAO(hoa=hoa)]) / UDP(
        sport=sport, dport=80) / b"hello"
    return bytearray(bytes(pkt))


def plain(src: str, sport: int = 40000) -> bytearray:
    """A UDP packet from `src` to the virtual address (no HAO)."""
    return bytearray(bytes(IPv6(src=src, dst=VIP) / UDP(sport=sport, dport=80) / b"hello"))


def backend_of(out: bytearray | None) -> str:
    assert out is not None, "dropped"
    return BY_ADDRESS[IPv6(bytes(out)).dst]


@functools.cache
def _maglev(backends: tuple[Backend, ...]) -> Maglev:
    return Maglev(list(backends))


def maglev(backends: Sequence[Backend] = BACKENDS) -> Maglev:
    return _maglev(tuple(backends))


def not_maglev(key: Key, backends: Sequence[Backend] = BACKENDS) -> str:
    """A backend that is not Maglev's answer for `key`."""
    answer = maglev(backends).choose(key, {})
    assert answer is not None
    return next(b.name for b in backends if b.name != answer.name)


class FleetTestCase(TestCase):
    """A redis-server per test; balancers and fleet services made on demand, all stopped."""

    timeout = 60

    def setUp(self) -> None:
        try:
            self.redis = RedisServer()
        except StoreUnavailableError as e:
            raise SkipTest(str(e)) from None
        self.addCleanup(self.redis.close)
        self.redis.start()
        self.prefix = f"t{id(self) % 100000}:"
        self.layout = Layout(self.prefix)

    def balancer(self, chain: Sequence[str] = ("hoa", "iid", "spi", "src"),
                 lifetime: float = 300.0, backends: Sequence[Backend] = BACKENDS,
                 scheduler: str = "maglev") -> Balancer:
        return Balancer(
            chain=KeyChain.from_names(chain),
            table=StickyTable(reactor, lifetime, 10_000),
            scheduler=scheduler_from_name(scheduler),
            backends=list(backends),
            virtual_addresses=[ipaddress.IPv6Address(VIP)],
            clock=reactor,
        )

    async def fleet(self, balancer: Balancer, name: str, up: bool = True,
                    **options: Any) -> FleetService:
        service = FleetService(balancer, reactor, store=self.redis.endpoint,
                               prefix=self.prefix, name=name, **options)
        balancer.shared = service.replica
        service.startService()
        self.addCleanup(self._stop, service)
        if up:
            await self.until(lambda: service.store.up, what=f"{name} connected")
        return service

    async def _stop(self, service: FleetService) -> None:
        if service.running:
            await service.stopService()
        await task.deferLater(reactor, 0.01)  # the client library's last callLater(0)

    async def until(self, condition: Callable[[], object], timeout: float = 10.0,
                    what: str = "condition") -> float:
        start = time.monotonic()
        while not condition():
            if time.monotonic() - start > timeout:
                self.fail(f"{what}: not within {timeout} s")
            await task.deferLater(reactor, 0.002)
        return time.monotonic() - start

    def stored(self, key: Key) -> tuple[str, str, int] | None:
        """(backend, origin, PTTL ms) of `key`'s record in the store, or None."""
        name = self.layout.binding_key(key)
        raw = self.redis.command("GET", name)
        if raw is None:
            return None
        value = self.layout.parse_value(raw, confirmation=False)
        return value.field, value.origin, self.redis.command("PTTL", name)


class PropagationTests(FleetTestCase):
    async def test_rekey_on_a_is_known_to_b(self) -> None:
        """Keyed by source address, a terminal's care-of address change notified to
        balancer A (the one its home agent subscription is on) reaches balancer B through
        the store: B sends the new address's first packet to the terminal's backend, and
        B's replies go to the confirmed care-of address.  A balancer outside the fleet
        sends it elsewhere (the test can fail)."""
        a, b, alone = (self.balancer(chain=("src",)) for _ in range(3))
        fa = await self.fleet(a, "lb-a")
        fb = await self.fleet(b, "lb-b")
        home, coa1 = "2001:db8:100::1001", "2001:db8:a1::1001"
        first = backend_of(a.inbound(plain(coa1)))
        # A second care-of address whose Maglev answer is another backend.
        coa2 = next(c for c in (f"2001:db8:a2::{i:x}" for i in range(0x1001, 0x1100))
                    if maglev().choose(addr(c), {}).name != first)  # type: ignore[union-attr]
        listener = TableListener(a.table, fa.return_paths())
        listener.binding_changed(packed(home), None, packed(coa1), 1, 600)
        started = time.monotonic()
        listener.binding_changed(packed(home), packed(coa1), packed(coa2), 2, 600)
        self.assertEqual(a.table.get(addr(coa2)).backend.name, first)  # type: ignore[union-attr]
        await self.until(lambda: fb.replica.backend_name(addr(coa2)) is not None
                         and b.return_paths.care_of(packed(home)) == packed(coa2),
                         what="B learns the rekey and the confirmation")
        print(f"\nrekey on A -> known to B: {(time.monotonic() - started) * 1000:.1f} ms")
        self.assertEqual(backend_of(b.inbound(plain(coa2))), first)
        self.assertEqual(b.counters.shared_hits, 1)
        self.assertNotEqual(backend_of(alone.inbound(plain(coa2))), first)
        # The confirmation A's notification made is B's return path too.
        self.assertEqual(b.return_paths.routes[packed(home)], packed(coa2))
        self.assertEqual(fb.stats()["remote_confirms"], 1)
        # One subscription, fanned out: B was told nothing by any home agent.  (A's two
        # confirmations came within one reactor turn: one write, the later one.)
        self.assertEqual(fa.stats()["confirm_writes"], 1)
        self.assertEqual(fb.stats()["confirm_writes"], 0)

    async def test_new_address_first_on_another_balancer(self) -> None:
        """The race after a move, across balancers: keyed by source address, a terminal's
        first packet from its new care-of address reaches balancer B (ECMP) before any
        notification of the move.  B holds no entry for the old address -- A does -- but
        has A's confirmation from the store: the new address joins the old address's
        backend as the fleet knows it (Maglev's answer, or the shared record of an
        exception), not Maglev's answer for the new address.  A balancer outside the
        fleet with the same confirmation schedules afresh (the test can fail)."""
        a, b, alone = (self.balancer(chain=("src",)) for _ in range(3))
        fa = await self.fleet(a, "lb-a")
        await self.fleet(b, "lb-b")
        listener = TableListener(a.table, fa.return_paths())
        expected = {}
        for i, moved in ((0x1001, False), (0x1002, True)):
            home, coa1 = f"2001:db8:100::{i:x}", f"2001:db8:a1::{i:x}"
            first = backend_of(a.inbound(mobile(coa1, home)))
            if moved:  # an operator's move: the old address is an exception, shared
                first = not_maglev(addr(coa1))
                actions.move(a, addr(coa1), first)
            listener.binding_changed(packed(home), None, packed(coa1), 1, 600)
            coa2 = next(c for c in (f"2001:db8:a2::{j:x}" for j in range(0x1001, 0x1100))
                        if maglev().choose(addr(c), {}).name != first)  # type: ignore[union-attr]
            expected[home] = (coa1, coa2, first)
        await self.until(lambda: all(b.return_paths.care_of(packed(h)) == packed(c1)
                                     for h, (c1, _, _) in expected.items())
                         and fb_knows(b, addr(expected["2001:db8:100::1002"][0])),
                         what="B learns the confirmations and the operator's move")
        for home, (coa1, coa2, first) in expected.items():
            self.assertIsNone(b.table.get(addr(coa1)))
            self.assertEqual(backend_of(b.inbound(mobile(coa2, home))), first, home)
            alone.return_paths.confirm(packed(home), packed(coa1), 600)
            self.assertNotEqual(backend_of(alone.inbound(mobile(coa2, home))), first, home)
        # The shared record's backend is down on B: that record steers nothing there (the
        # new address is scheduled as any other, not by Maglev's answer for the old one).
        home = "2001:db8:100::1002"
        coa1, _, first = expected[home]
        b.set_backend_up(first, False)
        old = b.scheduler.choose(addr(coa1), {})
        assert old is not None
        coa3 = next(c for c in (f"2001:db8:a3::{j:x}" for j in range(0x1001, 0x1100))
                    if b.scheduler.choose(addr(c), {}).name != old.name)  # type: ignore[union-attr]
        fresh = b.scheduler.choose(addr(coa3), {})
        assert fresh is not None
        self.assertEqual(backend_of(b.inbound(mobile(coa3, home))), fresh.name)

    async def test_only_what_differs_from_maglev_is_published(self) -> None:
        """Fresh bindings Maglev made are not written; an alias that Maglev would put
        elsewhere (a care-of address linked to its terminal's binding) is."""
        a = self.balancer()
        fa = await self.fleet(a, "lb-a")
        for i in range(40):
            a.inbound(plain(f"2001:db8:100::{0x2000 + i:x}"))  # at home: one identity each
        await task.deferLater(reactor, 0.05)
        self.assertEqual(fa.stats()["writes"], 0)
        self.assertEqual(self.redis.command("KEYS", f"{self.prefix}b:*"), [])
        home, coa = "2001:db8:100::1001", "2001:db8:a1::1001"
        backend = backend_of(a.inbound(mobile(coa, home)))
        expected = 0 if maglev().choose(addr(coa), {}).name == backend else 1  # type: ignore[union-attr]
        await self.until(lambda: fa.stats()["writes"] == expected and not fa.store.in_flight(
            self.layout.binding_key(addr(coa))), what="the alias written")
        self.assertEqual(len(self.redis.command("KEYS", f"{self.prefix}b:*")), expected)
        if expected:
            self.assertEqual(self.stored(addr(coa))[:2], (backend, "lb-a"))  # type: ignore[index]

    async def test_ttl_is_the_bindings_remaining_lifetime(self) -> None:
        """A record's TTL is its binding's remaining lifetime; when the binding ends
        (here a 2 s lifetime) the record is gone from the store and every replica."""
        a, b = self.balancer(lifetime=2.0), self.balancer(lifetime=2.0)
        await self.fleet(a, "lb-a")
        fb = await self.fleet(b, "lb-b")
        key = addr("2001:db8:100::1001")
        actions.move(a, key, not_maglev(key))
        await self.until(lambda: fb.replica.backend_name(key) is not None, what="propagated")
        backend, origin, pttl = self.stored(key)  # type: ignore[misc]
        self.assertEqual((backend, origin), (not_maglev(key), "lb-a"))
        left = a.table.get(key).expires - reactor.seconds()  # type: ignore[union-attr]
        # Expiry times are rounded up to the table's resolution (1/128 s).
        self.assertTrue(0 < pttl <= 2010 and abs(pttl / 1000 - left) < 0.25, (pttl, left))
        await self.until(lambda: self.redis.command("EXISTS", self.layout.binding_key(key)) == 0,
                         timeout=5, what="the record expires with the binding")
        await self.until(lambda: fb.replica.backend_name(key) is None, timeout=2)
        # B now schedules the key by Maglev, as every balancer would.
        self.assertEqual(backend_of(b.inbound(plain("2001:db8:100::1001"))),
                         maglev().choose(key, {}).name)  # type: ignore[union-attr]

    async def test_confirmation_ttl(self) -> None:
        """A confirmation's record lives as long as the lifetime the home agent gave."""
        a = self.balancer(chain=("src",))
        fa = await self.fleet(a, "lb-a")
        listener = TableListener(a.table, fa.return_paths())
        listener.binding_changed(packed("2001:db8:100::7"), None, packed("2001:db8:a1::7"), 1, 40)
        name = self.layout.confirmation_key(packed("2001:db8:100::7"))
        await self.until(lambda: self.redis.command("EXISTS", name) == 1, what="written")
        self.assertTrue(39_000 < self.redis.command("PTTL", name) <= 40_000)
        listener.binding_changed(packed("2001:db8:100::7"), packed("2001:db8:a1::7"),
                                 packed("2001:db8:a1::7"), 2, 0)  # deregistration
        await self.until(lambda: self.redis.command("EXISTS", name) == 0, what="deleted")

    async def test_refreshed_bindings_keep_their_record(self) -> None:
        """Traffic refreshes a binding without telling anyone; the record is written again
        before it would lapse while the binding lives."""
        a = self.balancer(lifetime=2.0)
        fa = await self.fleet(a, "lb-a")
        key = addr("2001:db8:100::1001")
        actions.move(a, key, not_maglev(key))
        await self.until(lambda: self.stored(key) is not None, what="written")
        for _ in range(12):  # 3.6 s of traffic: longer than the lifetime
            a.inbound(plain("2001:db8:100::1001"))
            fa.sync.refresh()  # the timer's work (it runs every max(1 s, lifetime / 8))
            await task.deferLater(reactor, 0.3)
        self.assertIsNotNone(self.stored(key), "the record lapsed under a live binding")
        self.assertGreater(fa.stats()["writes"], 1)

    async def test_packets_in_the_driver_keep_the_record(self) -> None:
        """A binding whose packets an executor outside the table forwards (XDP: the
        table hears of them when it asks) keeps its record too: the refresh asks."""
        from tests.test_table import Outside

        a = self.balancer(lifetime=2.0)
        outside = Outside(a.table)
        fa = await self.fleet(a, "lb-a")
        key = addr("2001:db8:100::1001")
        actions.move(a, key, not_maglev(key))
        await self.until(lambda: self.stored(key) is not None, what="written")
        binding = a.table.peek(key)
        assert binding is not None
        for _ in range(12):  # 3.6 s of traffic in the driver: longer than the lifetime
            outside.forward(binding, reactor.seconds())
            fa.sync.refresh()
            await task.deferLater(reactor, 0.3)
        self.assertIsNotNone(self.stored(key), "the record lapsed under a live binding")
        self.assertGreater(fa.stats()["writes"], 1)

    async def test_operator_move_reaches_every_balancer(self) -> None:
        """`lbproxyctl move` on A: B, which holds the terminal too, re-points it (with its
        aliases), and C, which never saw it, sends its first packet there."""
        a, b, c = self.balancer(), self.balancer(), self.balancer()
        fa = await self.fleet(a, "lb-a")
        fb = await self.fleet(b, "lb-b")
        fc = await self.fleet(c, "lb-c")
        home, coa = "2001:db8:100::1001", "2001:db8:a1::1001"
        first = backend_of(a.inbound(mobile(coa, home)))
        self.assertEqual(backend_of(b.inbound(mobile(coa, home))), first)
        target = next(x.name for x in BACKENDS if x.name != first)
        actions.move(a, addr(home), target)
        await self.until(lambda: b.table.get(addr(home)).backend.name == target,  # type: ignore[union-attr]
                         what="B re-points")
        self.assertEqual(backend_of(b.inbound(mobile(coa, home))), target)
        self.assertEqual(backend_of(b.inbound(plain(coa))), target)  # the alias followed
        await self.until(lambda: fc.replica.backend_name(addr(home)) == target)
        self.assertEqual(backend_of(c.inbound(mobile("2001:db8:a3::1001", home))), target)
        self.assertGreaterEqual(fb.stats()["remote_moves"], 1)
        self.assertEqual(fa.stats()["remote_moves"], 0)

    async def test_a_backend_this_balancer_cannot_use_is_not_taken(self) -> None:
        """A record naming a backend that is down here moves nothing here (counted), and
        B's scheduler decides the key's first packet."""
        a, b = self.balancer(), self.balancer()
        await self.fleet(a, "lb-a")
        fb = await self.fleet(b, "lb-b")
        key = addr("2001:db8:100::1001")
        b.inbound(plain("2001:db8:100::1001"))
        target = not_maglev(key)
        b.set_backend_up(target, False)
        actions.move(a, key, target)
        await self.until(lambda: fb.replica.backend_name(key) == target)
        self.assertNotEqual(b.table.get(key).backend.name, target)  # type: ignore[union-attr]
        self.assertEqual(fb.stats()["remote_unusable"], 1)


class OutageTests(FleetTestCase):
    async def test_store_outage_then_reconciliation(self) -> None:
        """Stop the store: forwarding and notifications go on from local state, changes
        are queued and counted.  Start it again (empty: no persistence): every balancer
        reloads, and the store and every replica converge, key by key."""
        a, b = self.balancer(chain=("src",)), self.balancer(chain=("src",))
        fa = await self.fleet(a, "lb-a")
        fb = await self.fleet(b, "lb-b")
        before = [addr(f"2001:db8:a1::{i:x}") for i in range(1, 6)]
        for key in before:
            actions.move(a, key, not_maglev(key))
        await self.until(lambda: all(fb.replica.backend_name(k) for k in before))
        self.redis.stop()
        await self.until(lambda: fa.store.state == "down" and fb.store.state == "down",
                         what="both see the outage")
        # Meanwhile: moves on both, a binding forgotten, a notification on A.
        during_a = [addr(f"2001:db8:a2::{i:x}") for i in range(1, 11)]
        during_b = [addr(f"2001:db8:a3::{i:x}") for i in range(1, 6)]
        for key in during_a:
            actions.move(a, key, not_maglev(key))
        for key in during_b:
            actions.move(b, key, not_maglev(key))
        actions.forget(a, before[0])
        listener = TableListener(a.table, fa.return_paths())
        listener.binding_changed(packed("2001:db8:100::9"), None, packed("2001:db8:a1::2"),
                                 1, 600)
        # Forwarding did not wait: packets of known and new terminals went through.
        self.assertEqual(backend_of(a.inbound(plain("2001:db8:a2::1"))),
                         not_maglev(during_a[0]))
        self.assertIsNotNone(b.inbound(plain("2001:db8:a9::1")))
        await task.deferLater(reactor, 0.01)  # the end-of-turn flush
        self.assertEqual(fa.stats()["store"]["state"], "down")
        self.assertEqual(fa.stats()["store"]["outages"], 1)
        self.assertEqual(fa.stats()["pending"], 1)  # the forgotten key's delete
        self.assertEqual(fa.stats()["confirm_pending"], 1)
        self.assertEqual(fa.stats()["exceptions"], 4 + 10)
        self.redis.start()
        took = await self.until(lambda: fa.store.up and fb.store.up, timeout=15,
                                what="both reconnect")

        def converged() -> bool:
            for service, balancer in ((fa, a), (fb, b)):
                for key in service.sync.mine:
                    local = balancer.table.get(bytes.__new__(Key, key))
                    stored = self.stored(bytes.__new__(Key, key))
                    if local is None or stored is None or stored[0] != local.backend.name:
                        return False
                    for other in (fa, fb):
                        if other.replica.backend_name(bytes.__new__(Key, key)) != stored[0]:
                            return False
            return True

        await self.until(converged, what="store and replicas converge key by key")
        print(f"\nreconnected {took:.2f} s after the store came back")
        self.assertEqual(len(self.redis.command("KEYS", f"{self.prefix}b:*")), 4 + 10 + 5)
        self.assertIsNone(self.stored(before[0]))
        self.assertIsNone(fb.replica.backend_name(before[0]))
        await self.until(lambda: b.return_paths.care_of(packed("2001:db8:100::9"))
                         == packed("2001:db8:a1::2"), what="the confirmation fanned out")
        for key in during_a:
            self.assertEqual(backend_of(b.inbound(plain(_text(key)))), not_maglev(key))
        self.assertEqual(fa.stats()["reconciled"], 2)
        self.assertEqual(fa.stats()["queue_overflows"], 0)

    async def test_queue_is_bounded(self) -> None:
        """More changes during an outage than the queue holds: the overflow is counted,
        memory stays bounded, and the store still converges afterwards (the table is
        looked at whole again)."""
        a = self.balancer(chain=("src",))
        fa = await self.fleet(a, "lb-a", queue_limit=20)
        keys = [addr(f"2001:db8:a1::{i:x}") for i in range(1, 61)]
        for key in keys:
            actions.move(a, key, not_maglev(key))
        await self.until(lambda: len(self.redis.command("KEYS", f"{self.prefix}b:*")) == 60)
        self.redis.stop()
        await self.until(lambda: fa.store.state == "down")
        for key in keys:
            actions.forget(a, key)  # 60 deletes to queue, room for 20
        await task.deferLater(reactor, 0.05)
        self.assertLessEqual(fa.stats()["pending"], 20)
        self.assertGreater(fa.stats()["queue_overflows"], 0)
        self.redis.start()  # empty again: nothing to delete, and nothing resurrected
        await self.until(lambda: fa.store.up, timeout=15)
        await task.deferLater(reactor, 0.1)
        self.assertEqual(self.redis.command("KEYS", f"{self.prefix}b:*"), [])
        self.assertEqual(fa.stats()["exceptions"], 0)


class ReadinessTests(FleetTestCase):
    async def test_health_waits_for_the_first_load(self) -> None:
        """``/healthz`` says unavailable until the fleet's records are loaded once (a
        balancer that starts while the store is away would place another balancer's
        exceptions by Maglev: its route must not be announced yet); a later outage does
        not make it unavailable (forwarding goes on from local state)."""
        a = self.balancer()
        self.redis.stop()
        fa = await self.fleet(a, "lb-a", up=False)
        control = Control(a, reactor, fleet=fa)
        await task.deferLater(reactor, 0.3)  # it tried, and failed, to reach the store
        health = control.health()
        self.assertEqual((health["status"], health["fleet_loaded"]), ("unavailable", False))
        self.redis.start()
        await self.until(lambda: fa.loaded, what="the first load")
        self.assertEqual(control.health()["status"], "ok")
        self.redis.stop()
        await self.until(lambda: fa.store.state == "down", what="the outage seen")
        self.assertEqual((control.health()["status"], control.health()["fleet_loaded"]),
                         ("ok", True))


class GarbageTests(FleetTestCase):
    async def test_garbage_in_the_store_is_refused_and_counted(self) -> None:
        """Records and messages that are not what the fleet writes are refused, counted
        by reason and ignored: the replica holds only the valid record, and packets go
        where Maglev (or the valid record) says."""
        p = self.prefix
        valid = addr("2001:db8:100::77")
        plant = {
            f"{p}b:addr:not-an-address": b"1 5 srv1 lb-x",
            f"{p}b:addr:2001:0db8:100::1": b"1 5 srv1 lb-x",  # not canonical
            f"{p}b:nokind:abc": b"1 5 srv1 lb-x",
            f"{p}b:addr:ff02::1": b"1 5 srv1 lb-x",  # multicast identity
            f"{p}r:::1": b"1 5 2001:db8:a1::1 lb-x",  # loopback home
            f"{p}whatever": b"1 5 srv1 lb-x",
            f"{p}b:addr:2001:db8:100::1": b"hello",
            f"{p}b:addr:2001:db8:100::2": b"1 x srv1 lb-x",
            f"{p}b:addr:2001:db8:100::3": b"1 5 bad/name lb-x",
            f"{p}b:addr:2001:db8:100::4": b"1 5 srv1 lb-x extra",
            f"{p}b:addr:2001:db8:100::5": b"1 5 srv1 " + b"x" * 600,
            f"{p}b:addr:2001:db8:100::6": b"1 5 srv\xff1 lb-x",
            f"{p}b:addr:2001:db8:100::8": b"2 5 srv1 lb-x",  # unknown format
            f"{p}b:addr:2001:db8:100::9": b"1 99999999999999999999 srv1 lb-x",
            f"{p}r:2001:db8:100::10": b"1 5 ff02::1 lb-x",  # multicast care-of
        }
        for name, value in plant.items():
            self.redis.command("SET", name, value, "PX", 60000)
        self.redis.command("SET", f"{p}b:addr:2001:db8:100::11", "1 5 srv1 lb-x")  # no TTL
        self.redis.command("RPUSH", f"{p}b:addr:2001:db8:100::12", "1 5 srv1 lb-x")  # a list
        self.redis.command("SET", self.layout.binding_key(valid), "1 6 srv3 lb-x", "PX", 60000)
        # A confirmation that is well formed but names this balancer's virtual address.
        self.redis.command("SET", f"{p}r:2001:db8:100::13", f"1 7 {VIP} lb-x", "PX", 60000)
        b = self.balancer()
        fb = await self.fleet(b, "lb-b")
        refused = fb.stats()["refused"]
        self.assertEqual(refused.get("bad-key"), 6, refused)
        self.assertEqual(refused.get("bad-value"), 9, refused)
        self.assertEqual(refused.get("no-ttl"), 1, refused)
        self.assertEqual(refused.get("local-address"), 1, refused)
        self.assertEqual(fb.replica.backend_name(valid), "srv3")
        self.assertEqual(set(fb.replica.bindings), {bytes(valid)})
        self.assertEqual(b.return_paths.routes, {})
        # Messages on the channel: refused the same way.
        channel = self.layout.channel
        for message in (
            b"S 1 1000 srv1 lb-x " + p.encode() + b"b:addr:zzz",
            b"X 1 1000 srv1 lb-x " + self.layout.binding_key(valid).encode(),
            b"S 1 0 srv1 lb-x " + self.layout.binding_key(valid).encode(),  # TTL 0
            b"S 1 999999999999 srv1 lb-x " + self.layout.binding_key(valid).encode(),
            b"D 1 0 srv1 lb-x " + self.layout.binding_key(valid).encode(),  # delete + field
            b"S 1 1000 srv1 lb-x",
            b"\x00\x01binary",
            b"S " * 300,
            b"12345",
        ):
            self.redis.command("PUBLISH", channel, message)
        # An older write than the one held is stale, not applied.
        self.redis.command("PUBLISH", channel,
                           b"S 2 60000 srv1 lb-x " + self.layout.binding_key(valid).encode())
        await self.until(lambda: fb.stats()["store"]["messages"] == 10)
        refused = fb.stats()["refused"]
        self.assertEqual(refused.get("bad-message"), 8, refused)
        self.assertEqual(refused.get("bad-key"), 6 + 1, refused)
        self.assertEqual(fb.replica.backend_name(valid), "srv3")
        self.assertEqual(fb.replica.stale, 1)
        self.assertEqual(set(fb.replica.bindings), {bytes(valid)})
        self.assertEqual(backend_of(b.inbound(plain("2001:db8:100::77"))), "srv3")
        self.assertEqual(backend_of(b.inbound(plain("2001:db8:100::1"))),
                         maglev().choose(addr("2001:db8:100::1"), {}).name)  # type: ignore[union-attr]

    def test_codec_round_trip_and_refusals(self) -> None:
        """What the fleet writes parses back; near misses are refused with a reason."""
        layout = Layout("lbproxy:")
        for text in ("addr 2001:db8::1", "iid 0211:22ff:fe33:4455", "spi 0x000000da"):
            key = Key.parse(text)
            self.assertEqual(layout.parse_store_key(layout.binding_key(key)), (key, None))
        home = packed("2001:db8:100::1")
        self.assertEqual(layout.parse_store_key(layout.confirmation_key(home)), (None, home))
        change = layout.parse_change(b"S 7 1500 srv1 lb-a lbproxy:b:addr:2001:db8::1")
        self.assertEqual((change.op, change.version, change.ttl, change.field, change.origin),
                         ("S", 7, 1.5, "srv1", "lb-a"))
        for bad in (b"", b"S 7 1500 srv1 lb-a", b"S -7 1500 srv1 lb-a lbproxy:b:addr:2001:db8::1",
                    b"S 7 1500 srv1 lb a lbproxy:b:addr:2001:db8::1",
                    b"S 7 1500 srv1 lb-a lbproxy:b:addr:2001:db8::1 ",
                    b"S 0 1500 srv1 lb-a lbproxy:b:addr:2001:db8::1"):
            with self.assertRaises(Refused):
                layout.parse_change(bad)
        with self.assertRaises(ValueError):
            Layout("bad prefix*")


class BackendSetTests(FleetTestCase):
    async def test_adding_a_backend_keeps_established_bindings_everywhere(self) -> None:
        """Add a backend on every balancer: no established binding moves -- on A, which
        holds them, or on B, which never saw them (A publishes those Maglev now maps
        elsewhere) -- while about 1/N of the keys nobody holds move to the new backend."""
        a, b = self.balancer(), self.balancer()
        fa = await self.fleet(a, "lb-a")
        fb = await self.fleet(b, "lb-b")
        homes = [f"2001:db8:100::{0x3000 + i:x}" for i in range(300)]
        before = {}
        for h in homes:
            before[h] = backend_of(a.inbound(plain(h)))
            a.inbound(plain(h))  # a second packet: established
        self.assertEqual(fa.stats()["exceptions"], 0)
        new = [*BACKENDS, SRV4]
        a.set_backends(new)
        b.set_backends(new)
        pinned = [h for h in homes if maglev(new).choose(addr(h), {}).name != before[h]]  # type: ignore[union-attr]
        await self.until(lambda: all(fb.replica.backend_name(addr(h)) == before[h]
                                     for h in pinned), what="the pinned bindings published")
        self.assertEqual(fa.stats()["exceptions"], len(pinned))
        moved_a = [h for h in homes if backend_of(a.inbound(plain(h))) != before[h]]
        moved_b = [h for h in homes if backend_of(b.inbound(plain(h))) != before[h]]
        self.assertEqual((moved_a, moved_b), ([], []))
        fraction = len(pinned) / len(homes)
        unbound = _moved_fraction(BACKENDS, new, 20000)
        print(f"\nadd a 4th backend: {len(pinned)}/{len(homes)} established bindings would "
              f"have moved ({fraction:.3f}), 0 moved; unbound keys moved: {unbound:.3f} "
              f"(1/N = {1 / len(new):.3f})")
        self.assertTrue(0.2 < unbound < 0.3, unbound)
        self.assertTrue(0.15 < fraction < 0.35, fraction)

    async def test_removing_a_backend_moves_only_its_terminals(self) -> None:
        """Remove a backend: its terminals move (on every balancer to the same new one);
        every other terminal stays where it was."""
        a, b = self.balancer(), self.balancer()
        await self.fleet(a, "lb-a")
        fb = await self.fleet(b, "lb-b")
        homes = [f"2001:db8:100::{0x4000 + i:x}" for i in range(300)]
        before = {h: backend_of(a.inbound(plain(h))) for h in homes}
        for h in homes:
            a.inbound(plain(h))
        rest = [x for x in BACKENDS if x.name != "srv2"]
        a.set_backends(rest)
        b.set_backends(rest)
        after_a = {h: backend_of(a.inbound(plain(h))) for h in homes}
        await task.deferLater(reactor, 0.2)
        after_b = {h: backend_of(b.inbound(plain(h))) for h in homes}
        moved = {h for h in homes if after_a[h] != before[h]}
        self.assertEqual(moved, {h for h in homes if before[h] == "srv2"})
        self.assertEqual(after_a, after_b)
        self.assertEqual(fb.stats()["remote_unusable"], 0)
        unbound = _moved_fraction(BACKENDS, rest, 20000)
        print(f"\nremove 1 of 3 backends: {len(moved)}/{len(homes)} terminals moved (all of "
              f"srv2's); unbound keys moved: {unbound:.3f} (1/N = {1 / 3:.3f})")
        self.assertTrue(0.28 < unbound < 0.39, unbound)


def _moved_fraction(old: Sequence[Backend], new: Sequence[Backend], n: int) -> float:
    """The fraction of `n` keys whose Maglev answer differs between two backend sets."""
    before, after = maglev(old), maglev(new)
    moved = 0
    for i in range(n):
        key = Key("addr", (0x20010DB8_00AA << 80 | i).to_bytes(16, "big"))
        if before.choose(key, {}) != after.choose(key, {}):
            moved += 1
    return moved / n


def _text(key: Key) -> str:
    return str(ipaddress.IPv6Address(key.value))


def fb_knows(balancer: Balancer, key: Key) -> bool:
    """Whether `balancer`'s fleet replica has a record for `key`."""
    assert balancer.shared is not None
    return balancer.shared.backend_name(key) is not None
