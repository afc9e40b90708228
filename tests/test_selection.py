"""Tests for lbproxy.core.selection: Backend values and the four schedulers."""

from __future__ import annotations

import collections
import ipaddress
import json
import os
import subprocess
import sys
from collections.abc import Mapping, Sequence

import attrs
from hypothesis import given, settings
from hypothesis import strategies as st
from twisted.trial.unittest import SynchronousTestCase
from zope.interface import implementer
from zope.interface.verify import verifyObject

from lbproxy.core.keys import Key
from lbproxy.core.selection import (
    SCHEDULER_REGISTRY,
    Backend,
    IScheduler,
    LeastLoaded,
    Maglev,
    RoundRobin,
    WeightedRoundRobin,
    key_hash,
    maglev_table,
    register_scheduler,
    scheduler_from_name,
    scheduler_names,
)

SMALL_PRIME = 4099  # a Maglev table small enough to build often, > 100 x 10 backends


def backend(name: str, weight: int = 1) -> Backend:
    n = int.from_bytes(name.encode().ljust(4, b"\0")[:4], "big")
    return Backend(name, ipaddress.IPv6Address((0x2001_0DB8_FFFF << 80) | n), weight)


def backends(n: int) -> list[Backend]:
    return [backend(f"s{i}") for i in range(n)]


def src_keys(n: int, salt: int = 0) -> list[Key]:
    return [Key("src", (0x2001_0DB8 << 96 | salt << 64 | i).to_bytes(16, "big"))
            for i in range(n)]


NO_LOAD: dict[Backend, int] = {}


class BackendTests(SynchronousTestCase):
    def test_packed_and_converter(self) -> None:
        """A Backend takes a text address and exposes the 16 packed bytes."""
        b = Backend("a", "2001:db8::a")
        self.assertEqual(b.address, ipaddress.IPv6Address("2001:db8::a"))
        self.assertEqual(b.packed, ipaddress.IPv6Address("2001:db8::a").packed)
        self.assertEqual(attrs.evolve(b, weight=3).packed, b.packed)

    def test_identity_ignores_weight(self) -> None:
        """Draining (weight 0) leaves a backend equal to itself, so load counts and
        bindings still belong to it; a different name or address is another backend."""
        b = backend("a")
        drained = attrs.evolve(b, weight=0)
        self.assertEqual(b, drained)
        self.assertEqual({b: 5}[drained], 5)
        self.assertNotEqual(b, backend("b"))
        self.assertNotEqual(b, Backend("a", ipaddress.IPv6Address("2001:db8::99")))

    def test_negative_weight(self) -> None:
        """A negative weight is a configuration error."""
        with self.assertRaises(ValueError):
            backend("a", -1)

    def test_duplicate_names(self) -> None:
        """Every scheduler refuses two backends of the same name."""
        for name in scheduler_names():
            scheduler = scheduler_from_name(name)
            with self.assertRaises(ValueError, msg=name):
                scheduler.set_backends([backend("a"), backend("a", 2)])


class CommonSchedulerTests(SynchronousTestCase):
    """What holds for every scheduler."""

    def schedulers(self) -> list[IScheduler]:
        return [RoundRobin(), WeightedRoundRobin(), LeastLoaded(), Maglev(table_size=SMALL_PRIME)]

    def test_interface(self) -> None:
        """Each scheduler provides IScheduler."""
        for s in self.schedulers():
            self.assertTrue(verifyObject(IScheduler, s))

    def test_no_backends(self) -> None:
        """With no usable backend (none, or all weight 0) choose says None."""
        for s in self.schedulers():
            self.assertIsNone(s.choose(src_keys(1)[0], NO_LOAD))
            s.set_backends([backend("a", 0), backend("b", 0)])
            self.assertIsNone(s.choose(src_keys(1)[0], NO_LOAD), s)

    def test_weight_zero_never_chosen(self) -> None:
        """A weight-0 (drained) backend is never chosen, even when it has no load."""
        drained = backend("d", 0)
        for s in self.schedulers():
            s.set_backends([drained, backend("a"), backend("b", 3)])
            load: dict[Backend, int] = collections.Counter()
            chosen = set()
            for k in src_keys(500):
                b = s.choose(k, load)
                chosen.add(b)
                if b is not None:
                    load[b] += 1
            self.assertNotIn(drained, chosen, s)
            self.assertEqual({b.name for b in chosen if b}, {"a", "b"}, s)

    def test_from_name(self) -> None:
        """scheduler_from_name knows the configuration's names (and - for _), and
        refuses others naming them."""
        self.assertIsInstance(scheduler_from_name("round_robin"), RoundRobin)
        self.assertIsInstance(scheduler_from_name("weighted-round-robin"), WeightedRoundRobin)
        self.assertIsInstance(scheduler_from_name("least_loaded"), LeastLoaded)
        m = scheduler_from_name("maglev", table_size=251)
        self.assertIsInstance(m, Maglev)
        with self.assertRaises(ValueError) as e:
            scheduler_from_name("random")
        self.assertIn("'random'", str(e.exception))
        self.assertIn(
            "(registered: round_robin, weighted_round_robin, least_loaded, maglev",
            str(e.exception),
        )

    def test_registered_scheduler(self) -> None:
        """register_scheduler makes a name usable; a factory that fails or makes
        something that is not an IScheduler is a ValueError naming it."""
        register_scheduler("first-test", _First)
        self.addCleanup(SCHEDULER_REGISTRY.unregister, "first-test")
        self.assertIn("first-test", scheduler_names())
        s = scheduler_from_name("first-test")
        s.set_backends([backend("b"), backend("a")])
        self.assertEqual(s.choose(Key("src", bytes(16)), {}), backend("b"))
        with self.assertRaises(ValueError):
            register_scheduler("maglev", _First)

        register_scheduler("wrong-test", object)  # type: ignore[arg-type]
        self.addCleanup(SCHEDULER_REGISTRY.unregister, "wrong-test")
        with self.assertRaises(ValueError) as e:
            scheduler_from_name("wrong-test")
        self.assertIn("does not provide IScheduler", str(e.exception))
        with self.assertRaises(ValueError) as e:
            scheduler_from_name("maglev", table_size=100)
        self.assertIn("'maglev'", str(e.exception))
        self.assertIn("prime", str(e.exception))


@implementer(IScheduler)
class _First:
    """A scheduler for registry tests: always the first usable backend."""

    def __init__(self) -> None:
        self.backends: list[Backend] = []

    def set_backends(self, backends: Sequence[Backend]) -> None:
        self.backends = [b for b in backends if b.weight]

    def choose(self, key: Key, load: Mapping[Backend, int]) -> Backend | None:
        return self.backends[0] if self.backends else None


class RoundRobinTests(SynchronousTestCase):
    def test_cycles(self) -> None:
        """Round robin visits the usable backends in order, over and over."""
        bs = backends(3)
        rr = RoundRobin(bs)
        got = [rr.choose(k, NO_LOAD) for k in src_keys(7)]
        self.assertEqual(got, [bs[0], bs[1], bs[2], bs[0], bs[1], bs[2], bs[0]])

    def test_shrinking_list(self) -> None:
        """After set_backends with fewer backends it still cycles over all of them."""
        rr = RoundRobin(backends(5))
        for k in src_keys(4):
            rr.choose(k, NO_LOAD)
        rr.set_backends(backends(2))
        got = [rr.choose(k, NO_LOAD) for k in src_keys(4)]
        self.assertEqual([b.name for b in got if b], ["s0", "s1", "s0", "s1"])


class WeightedRoundRobinTests(SynchronousTestCase):
    def test_smooth_sequence(self) -> None:
        """Weights 5, 1, 1 give nginx's smooth order a a b a c a a."""
        a, b, c = backend("a", 5), backend("b"), backend("c")
        wrr = WeightedRoundRobin([a, b, c])
        got = [wrr.choose(k, NO_LOAD) for k in src_keys(7)]
        self.assertEqual([x.name for x in got if x], list("aabacaa"))

    @given(st.lists(st.integers(min_value=0, max_value=7), min_size=1, max_size=6),
           st.integers(min_value=1, max_value=4))
    def test_exact_proportions(self, weights: list[int], rounds: int) -> None:
        """Over rounds x sum(weights) choices, each backend is chosen exactly
        rounds x weight times."""
        bs = [backend(f"b{i}", w) for i, w in enumerate(weights)]
        wrr = WeightedRoundRobin(bs)
        total = sum(weights)
        counts = collections.Counter(
            wrr.choose(k, NO_LOAD) for k in src_keys(rounds * total)
        )
        for b in bs:
            self.assertEqual(counts[b], rounds * b.weight)


class LeastLoadedTests(SynchronousTestCase):
    def test_fewest_bindings(self) -> None:
        """The backend with the fewest live bindings is chosen."""
        a, b, c = backends(3)
        ll = LeastLoaded([a, b, c])
        self.assertEqual(ll.choose(src_keys(1)[0], {a: 5, b: 2, c: 9}), b)
        self.assertEqual(ll.choose(src_keys(1)[0], {a: 5, c: 9}), b)  # absent means 0

    @given(st.lists(st.tuples(st.integers(1, 5), st.integers(0, 50)), min_size=1, max_size=6))
    def test_weighted_ratio_minimal(self, spec: list[tuple[int, int]]) -> None:
        """The chosen backend has the smallest load / weight of all usable backends."""
        bs = [backend(f"b{i}", w) for i, (w, _) in enumerate(spec)]
        load = {b: n for b, (_, n) in zip(bs, spec, strict=True)}
        chosen = LeastLoaded(bs).choose(src_keys(1)[0], load)
        assert chosen is not None
        for b in bs:
            self.assertLessEqual(load[chosen] * b.weight, load[b] * chosen.weight)

    def test_ties_rotate(self) -> None:
        """Equal backends with equal load take turns, so a burst spreads out."""
        bs = backends(3)
        ll = LeastLoaded(bs)
        got = {ll.choose(k, NO_LOAD) for k in src_keys(3)}
        self.assertEqual(got, set(bs))

    def test_balances_with_table_counts(self) -> None:
        """Fed its own choices back as load, it keeps backends within one binding per
        unit of weight of each other."""
        bs = [backend("a", 1), backend("b", 2), backend("c", 3)]
        ll = LeastLoaded(bs)
        load: dict[Backend, int] = collections.Counter()
        for k in src_keys(600):
            chosen = ll.choose(k, load)
            assert chosen is not None
            load[chosen] += 1
        self.assertEqual([load[b] for b in bs], [100, 200, 300])


class MaglevTests(SynchronousTestCase):
    def test_table_size_prime(self) -> None:
        """The lookup table size must be prime (each permutation must cover it)."""
        with self.assertRaises(ValueError):
            Maglev(table_size=65536)

    def test_table_full_and_even(self) -> None:
        """Every slot is owned, and equal backends own within 1% of an even share."""
        table = maglev_table(backends(7), SMALL_PRIME)
        self.assertNotIn(-1, table)
        counts = collections.Counter(table)
        even = SMALL_PRIME / 7
        for i in range(7):
            self.assertLess(abs(counts[i] - even), 0.01 * SMALL_PRIME, counts)

    def test_independent_instances_agree(self) -> None:
        """Two balancers built separately, with the backends listed in different
        orders, choose the same backend for every key."""
        bs = backends(9)
        one = Maglev(bs, table_size=SMALL_PRIME)
        two = Maglev(list(reversed(bs)), table_size=SMALL_PRIME)
        for k in src_keys(2000):
            self.assertEqual(one.choose(k, NO_LOAD), two.choose(k, {bs[0]: 1000}))

    def test_agreement_across_processes(self) -> None:
        """A fresh Python process (another hash seed) makes the same choices: the key
        hash is not Python's salted hash()."""
        keys = [*src_keys(300, salt=3), Key.parse("hoa 2001:db8:1::16"),
                Key.parse("spi 0x000000da")]
        code = (
            "import json, sys\n"
            "from lbproxy.core.keys import Key\n"
            "from lbproxy.core.selection import Maglev, key_hash\n"
            "from tests.test_selection import backends\n"
            "m = Maglev(backends(9), table_size=4099)\n"
            "texts = json.load(sys.stdin)\n"
            "print(json.dumps([[m.choose(Key.parse(t), {}).name, key_hash(Key.parse(t))]"
            " for t in texts]))\n"
        )
        env = dict(os.environ, PYTHONHASHSEED="12345")
        out = subprocess.run(
            [sys.executable, "-c", code], input=json.dumps([str(k) for k in keys]),
            capture_output=True, text=True, check=True, env=env,
            cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))), timeout=60,
        )
        theirs = json.loads(out.stdout)
        m = Maglev(backends(9), table_size=SMALL_PRIME)
        ours = [[m.choose(k, NO_LOAD).name, key_hash(k)] for k in keys]  # type: ignore[union-attr]
        self.assertEqual(theirs, ours)

    def test_minimal_disruption(self) -> None:
        """Removing one of N backends moves about 1/N of the keys: its own keys, plus
        only a few percent of the others."""
        for n in (5, 10):
            bs = backends(n)
            before = Maglev(bs, table_size=SMALL_PRIME)
            after = Maglev(bs[:2] + bs[3:], table_size=SMALL_PRIME)
            ks = src_keys(20000, salt=n)
            moved = 0
            moved_elsewhere = 0
            for k in ks:
                a, b = before.choose(k, NO_LOAD), after.choose(k, NO_LOAD)
                if a != b:
                    moved += 1
                    if a != bs[2]:
                        moved_elsewhere += 1
            fraction = moved / len(ks)
            self.assertLess(abs(fraction - 1 / n), 0.35 / n, (n, fraction))
            self.assertLess(moved_elsewhere / len(ks), 0.05, (n, moved_elsewhere))

    def test_adding_backend_disruption(self) -> None:
        """Adding an N+1th backend moves about 1/(N+1) of the keys, all to it mostly."""
        bs = backends(8)
        before = Maglev(bs[:7], table_size=SMALL_PRIME)
        after = Maglev(bs, table_size=SMALL_PRIME)
        ks = src_keys(20000, salt=99)
        moved = [k for k in ks if before.choose(k, NO_LOAD) != after.choose(k, NO_LOAD)]
        self.assertLess(abs(len(moved) / len(ks) - 1 / 8), 0.35 / 8)
        to_new = sum(after.choose(k, NO_LOAD) == bs[7] for k in moved)
        self.assertGreater(to_new / len(moved), 0.8)

    @settings(max_examples=15, deadline=None)
    @given(st.lists(st.integers(1, 6), min_size=2, max_size=5))
    def test_weights_honoured(self, weights: list[int]) -> None:
        """Slot shares, and so key shares, follow the weights within a few percent."""
        bs = [backend(f"w{i}", w) for i, w in enumerate(weights)]
        m = Maglev(bs, table_size=SMALL_PRIME)
        shares = m.shares()
        total = sum(weights)
        for b in bs:
            expected = SMALL_PRIME * b.weight / total
            self.assertLess(abs(shares[b.name] - expected), 0.02 * SMALL_PRIME + 2,
                            (weights, shares))
        counts = collections.Counter(m.choose(k, NO_LOAD) for k in src_keys(8000))
        for b in bs:
            self.assertLess(abs(counts[b] / 8000 - b.weight / total), 0.04, (weights, counts))

    def test_key_hash_separates_kinds(self) -> None:
        """The same bytes as an address and as an interface ID (or an SPI) hash
        differently, and key_hash is a 64-bit value."""
        a = Key.parse("addr 2001:db8::1:2:3:4")
        b = Key.parse("iid 1:2:3:4")
        self.assertNotEqual(key_hash(a), key_hash(b))
        self.assertLess(key_hash(a), 2**64)

    def test_default_size(self) -> None:
        """The default table has 65537 slots shared evenly by two backends."""
        m = Maglev(backends(2))
        self.assertEqual(m.table_size, 65537)
        self.assertEqual(sorted(m.shares().values()), [32768, 32769])
