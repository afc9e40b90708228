"""The sticky table with aliases, against a model small enough to be obviously right.

A terminal's identities (home address, care-of addresses, interface ID, SPI) lead to one
binding: its own key, and *aliases* linked to it.  The rules that make this safe are
checked here by a hypothesis state machine driving the real `StickyTable` and a model
side by side through inserts, links, lookups, removals, rekeys, moves, time and sweeps:

- every identity leads where the model says (binding, backend, aliases in order);
- **linking never moves an identity that has a live binding** -- not its backend, not the
  binding it leads to (`link` answers False and changes nothing);
- aliases live and die with their binding, and a binding holds at most ``max_aliases``.
"""

from __future__ import annotations

import ipaddress

from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, rule
from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase

from lbproxy.core.keys import Key
from lbproxy.core.selection import Backend
from lbproxy.core.table import StickyTable

LIFETIME = 10.0
MAX_ALIASES = 3
BACKENDS = [Backend(f"b{i}", ipaddress.IPv6Address(f"2001:db8:b0::{i + 1}")) for i in range(3)]
KEYS = [Key("addr", ipaddress.IPv6Address(f"2001:db8:1::{i + 1}").packed) for i in range(5)] + [
    Key("iid", bytes([0, 0, 0, 0, 0, 0, 0, i + 1])) for i in range(2)
]

keys = st.sampled_from(KEYS)
backends = st.sampled_from(BACKENDS)


class Model:
    """A binding as the model keeps it."""

    def __init__(self, key: Key, backend: Backend, expires: float, established: bool) -> None:
        self.key = key
        self.aliases: list[Key] = []
        self.backend = backend
        self.expires = expires
        self.established = established


class AliasMachine(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.clock = Clock()
        self.table = StickyTable(self.clock, LIFETIME, 1000, max_aliases=MAX_ALIASES)
        self.bindings: list[Model] = []

    # -- the model's own rules ---------------------------------------------------------

    def now(self) -> float:
        return self.clock.seconds()

    def find(self, key: Key) -> Model | None:
        """The model binding `key` leads to, live or not."""
        for m in self.bindings:
            if m.key == key or key in m.aliases:
                return m
        return None

    def live(self, key: Key) -> Model | None:
        m = self.find(key)
        return m if m is not None and m.expires > self.now() else None

    def take(self, m: Model, key: Key) -> None:
        if m.key == key:
            self.bindings.remove(m)
        else:
            m.aliases.remove(key)

    # -- rules -----------------------------------------------------------------------------

    @rule(key=keys, backend=backends)
    def insert(self, key: Key, backend: Backend) -> None:
        old = self.find(key)
        established = False
        if old is not None:
            established = old.established and old.expires > self.now()
            self.take(old, key)
        self.bindings.append(Model(key, backend, self.now() + LIFETIME, established))
        b = self.table.insert(key, backend)
        assert b is not None and b.backend == backend

    @rule(via=keys, key=keys)
    def link(self, via: Key, key: Key) -> None:
        m = self.live(via)
        b = self.table.get(via)
        assert (m is None) == (b is None)
        if m is None or b is None:
            return
        before = self.live(key)
        before_binding = self.table.get(key)
        linked = self.table.link(b, key)
        if before is not None and before is not m:
            # A bound identity is never moved by linking.
            assert not linked
            after = self.table.get(key)
            assert after is before_binding and after is not None
            assert after.backend == before.backend
            return
        assert linked
        if before is m:
            return
        stale = self.find(key)
        if stale is not None:
            self.take(stale, key)
        m.aliases.append(key)
        if len(m.aliases) > MAX_ALIASES:
            m.aliases.pop(0)

    @rule(key=keys)
    def lookup(self, key: Key) -> None:
        m = self.find(key)
        b = self.table.lookup(key)
        if m is None:
            assert b is None
        elif m.expires <= self.now():
            assert b is None
            self.bindings.remove(m)
        else:
            assert b is not None
            m.expires = self.now() + LIFETIME
            m.established = True

    @rule(key=keys)
    def remove(self, key: Key) -> None:
        m = self.find(key)
        self.table.remove(key)
        if m is not None:
            self.take(m, key)

    @rule(key=keys, backend=backends)
    def move(self, key: Key, backend: Backend) -> None:
        """An operator's move: the whole binding, aliases included."""
        m = self.live(key)
        b = self.table.get(key)
        if m is None or b is None:
            assert m is None and b is None
            return
        self.table.repoint(b, backend)
        m.backend = backend

    @rule(old=keys, new=keys)
    def rekey(self, old: Key, new: Key) -> None:
        """An authenticated notification: `new` leads to `old`'s backend."""
        om = self.live(old)
        got = self.table.rekey(old, new)
        if om is None:
            assert got is None
            return
        nm = om if new == old else self.live(new)
        if nm is not None and nm is not om and nm.key != new:
            nm.aliases.remove(new)
            nm = None
        if nm is None and om.key != old:
            # `old` is one of the terminal's other identities: `new` joins them.
            stale = self.find(new)
            if stale is not None:
                self.take(stale, new)
            om.aliases.append(new)
            if len(om.aliases) > MAX_ALIASES:
                om.aliases.pop(0)
            nm = om
            nm.expires = self.now() + LIFETIME
            nm.established = True
        elif nm is None:
            stale = self.find(new)
            if stale is not None:
                self.take(stale, new)
            nm = Model(new, om.backend, self.now() + LIFETIME, True)
            self.bindings.append(nm)
        else:
            nm.backend = om.backend
            nm.expires = self.now() + LIFETIME
            nm.established = True
        assert got is not None and got.backend == om.backend

    @rule(seconds=st.sampled_from([1, 3, 9, 11]))
    def advance(self, seconds: int) -> None:
        self.clock.advance(seconds)

    @rule()
    def sweep(self) -> None:
        self.table.expire()
        self.bindings = [m for m in self.bindings if m.expires > self.now()]

    # -- what must always hold ---------------------------------------------------------

    @invariant()
    def same_as_the_model(self) -> None:
        assert len(self.table) == len(self.bindings)
        assert self.table.alias_count == sum(len(m.aliases) for m in self.bindings)
        for key in KEYS:
            m = self.live(key)
            b = self.table.get(key)
            if m is None:
                assert b is None, key
                continue
            assert b is not None, key
            assert b.key == m.key and b.backend == m.backend
            assert [bytes(a) for a in (b.aliases or [])] == [bytes(a) for a in m.aliases]
            assert b.expires == m.expires
        for m in self.bindings:
            assert len(m.aliases) <= MAX_ALIASES
        load = {b: n for b, n in self.table.load().items()}
        want: dict[Backend, int] = {}
        for m in self.bindings:
            want[m.backend] = want.get(m.backend, 0) + 1
        assert load == want


class AliasMachineTests(SynchronousTestCase):
    def test_table_with_aliases_agrees_with_the_model(self) -> None:
        """Hundreds of random sequences of table operations: the table agrees with the
        model after every step, and linking never moves a bound identity."""
        machine = AliasMachine.TestCase
        machine.settings = settings(max_examples=300, stateful_step_count=40, deadline=None)
        machine("runTest").runTest()
