"""Keeping the store and this balancer in step: what to publish, and what to take in.

Why this exists: every balancer of a fleet has the same backend list and computes the
same Maglev answer for a key, so a binding that *is* Maglev's answer needs no sharing.
What differs from it must be shared -- a care-of address rekeyed by a notification, an
identity linked to a terminal's binding (its aliases), an operator's move, a binding kept
on its backend when the backend set changed -- and so must confirmed care-of addresses.
`Sync` decides, from the local table, which identities are such *exceptions* and keeps
the store's records of them current; and it applies what other balancers published to
this balancer's table and return paths.

Theory of operation
-------------------
*The reference.*  Maglev over the configured backends and weights (`Balancer.backends`,
health ignored): the answer every balancer with the same configuration computes.  A live
binding's identity whose backend is not the reference's answer is an exception.  With a
scheduler other than Maglev there is no shared answer, and every binding is published.
When the backend set changes the reference is rebuilt and the whole table is looked at
again (in slices, a reactor turn each): established bindings keep their backend, so those
whose key Maglev now maps elsewhere become exceptions and are published.

*What changed.*  The table tells `StickyTable.listeners` of every binding made,
re-pointed, given or relieved of an alias, or gone.  The identities concerned are queued
(`pending`, bounded: an overflow is counted and the table is looked at whole again) and
a flush at the end of the reactor turn decides for each from the table as it is *then*
(so a binding replaced within a turn costs one write, not three):

- an exception whose record in the store is missing, names another backend or ends more
  than half a lifetime before the binding: written, with TTL = the binding's remaining
  lifetime;
- an identity that stopped being one: its record deleted if this balancer wrote it (the
  store's delete script checks the origin, so a balancer never deletes another's write).

Bindings are refreshed by traffic without telling anyone, so a timer looks at the
exceptions held (every eighth of a lifetime) and writes those whose record would lapse
before them.  Confirmations reach the store through `ConfirmingReturnPaths`, the return
paths the notification listener is given: each confirm or unconfirm is queued and
written (TTL = the confirmation's lifetime) or deleted.

*What others published* (`remote`): a record naming another backend for an identity this
balancer holds re-points it here too (its aliases follow), unless a write of ours for that
key is still on its way -- the channel delivers in write order, so ours is the later one.
A backend this balancer cannot use is left alone (counted).  A deleted record of an
exception this balancer still holds is written again.  A confirmation is applied to the
local return paths (after the same address checks the notification gate makes); a
deleted one ends the local copy.

*An outage.*  While the store is away nothing waits: lookups answer from the replica and
the table, decisions go on.  The exceptions are always known (`mine`); deletes and
confirmations are queued (bounded, overflows counted).  When the store is back
(`reconnected`, after the replica was loaded afresh) every exception held is compared with
the store and written where it differs, and the queue is played -- key by key.
"""

from __future__ import annotations

import ipaddress
from collections import OrderedDict
from collections.abc import Iterator
from typing import Any, Protocol

from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.logger import Logger

from lbproxy.core.balancer import Balancer
from lbproxy.core.keys import Key
from lbproxy.core.selection import Backend, Maglev
from lbproxy.core.table import Binding
from lbproxy.fleet.codec import MAX_CONFIRM_TTL_MS, Layout, check_address
from lbproxy.fleet.replica import Changed, Replica

__all__ = ["ConfirmingReturnPaths", "Sink", "Sync"]

_log = Logger()

#: Identities looked at per reactor turn when the whole table is looked at again.
RESCAN_SLICE = 5000


class Sink(Protocol):
    """The store, as `Sync` uses it (`lbproxy.fleet.store.RedisStore`)."""

    @property
    def up(self) -> bool: ...

    def room(self) -> int: ...

    def in_flight(self, store_key: str) -> bool: ...

    def write(self, store_key: str, field: str, ttl_ms: int) -> None: ...

    def delete(self, store_key: str, only_origin: str | None) -> None: ...


def _as_key(data: bytes) -> Key:
    return bytes.__new__(Key, data)


class Sync:
    """Publishes this balancer's exceptions and confirmations; applies the fleet's."""

    def __init__(
        self,
        balancer: Balancer,
        replica: Replica,
        layout: Layout,
        name: str,
        clock: IReactorTime,
        queue_limit: int = 100_000,
    ) -> None:
        self.balancer = balancer
        self.table = balancer.table
        self.replica = replica
        self.layout = layout
        self.name = name
        self.clock = clock
        self.queue_limit = queue_limit
        self.lifetime = self.table.lifetime
        self.slack = self.lifetime / 2
        self.sink: Sink | None = None
        #: Identities of live local bindings that differ from the reference, and the
        #: identities so held per binding.
        self.mine: dict[bytes, Binding] = {}
        self._of: dict[Binding, set[bytes]] = {}
        #: Identities whose record may need a write or delete.
        self.pending: OrderedDict[bytes, None] = OrderedDict()
        #: Homes whose confirmation changed here ("confirm" / "unconfirm"), and the
        #: confirmations this balancer's notifications made: home -> (care-of, ends).
        self.confirm_pending: OrderedDict[bytes, str] = OrderedDict()
        self.my_confirms: OrderedDict[bytes, tuple[bytes, float]] = OrderedDict()
        self._flush_call: IDelayedCall | None = None
        self._rescan: Iterator[tuple[Key, Binding]] | None = None
        self._rescan_call: IDelayedCall | None = None
        self._rescan_wanted = False
        self._rescan_again = False
        self._ref_backends: object = None
        self._ref_sig: tuple[Any, ...] | None = None
        self._maglev: Maglev | None = None
        self.counters: dict[str, int] = dict.fromkeys(
            ("writes", "deletes", "refreshes", "queue_overflows", "rescans",
             "remote_moves", "remote_unusable", "remote_confirms", "remote_unconfirms",
             "rewrites", "reconciled", "confirm_writes", "confirm_deletes"), 0)
        #: Remote values refused by the local checks (a confirmation to a virtual
        #: address, a backend or this host), by reason.
        self.refused: dict[str, int] = {}
        self.attach()

    def attach(self) -> None:
        """Listen to the table's changes (again, after `stop`)."""
        if self._table_changed not in self.table.listeners:
            self.table.listeners.append(self._table_changed)

    # -- the reference -------------------------------------------------------------------

    def reference(self, key: bytes) -> str | None:
        """Maglev's answer for `key` over the configured backends (None: no shared
        answer -- another scheduler, or no backend)."""
        self._check_reference()
        maglev = self._maglev
        if maglev is None:
            return None
        backend = maglev.choose(_as_key(key), {})
        return backend.name if backend is not None else None

    def _check_reference(self) -> None:
        backends = self.balancer.backends
        if backends is self._ref_backends:
            return
        self._ref_backends = backends
        scheduler = self.balancer.scheduler
        sig = (type(scheduler).__name__, getattr(scheduler, "table_size", None),
               tuple(sorted((b.name, str(b.address), b.weight) for b in backends.values())))
        if sig == self._ref_sig:
            return
        first = self._ref_sig is None
        self._ref_sig = sig
        if isinstance(scheduler, Maglev):
            self._maglev = Maglev(list(backends.values()), table_size=scheduler.table_size)
        else:
            self._maglev = None
        if not first:
            _log.info("fleet: the backend set changed; looking at every binding again")
            self.rescan()

    # -- the table's changes -------------------------------------------------------------

    def _table_changed(self, b: Binding, bound: bool) -> None:
        mark = self._mark
        if bound:
            mark(bytes(b.key))
            if b.aliases:
                for alias in b.aliases:
                    mark(alias)
        held = self._of.get(b)
        if held:
            for key in list(held):
                mark(key)
        self.schedule()

    def _mark(self, key: bytes) -> None:
        pending = self.pending
        if key in pending:
            return
        if len(pending) >= self.queue_limit:
            self.counters["queue_overflows"] += 1
            self.rescan()  # what was not queued is found by looking at all again
            return
        pending[key] = None

    def schedule(self) -> None:
        """Flush at the end of this reactor turn."""
        if self._flush_call is None:
            self._flush_call = self.clock.callLater(0, self.flush)

    def rescan(self) -> None:
        """Look at every binding of the table again (in slices): the reference changed,
        the queue overflowed, or the service starts."""
        if self._rescan is not None:
            self._rescan_again = True  # what changed behind the running one's snapshot
            return
        if not self._rescan_wanted:
            self._rescan_wanted = True
            self.counters["rescans"] += 1
        if self._rescan_call is None:
            self._rescan_call = self.clock.callLater(0, self._rescan_step)

    def _rescan_step(self) -> None:
        self._rescan_call = None
        if self._rescan is None and self._rescan_wanted:
            # Started here, after the turn that asked: its changes are in the snapshot.
            self._rescan_wanted = False
            self._rescan = iter(self.table)
        it = self._rescan
        if it is None:
            return
        self.flush()  # evaluates what is queued, sending what it may
        room = self.queue_limit - len(self.pending) - self.table.max_aliases
        budget = max(1, min(RESCAN_SLICE, room)) if room > 0 else 0
        progress = budget > 0
        while budget > 0:
            item = next(it, None)
            if item is None:
                self._rescan = None
                if self._rescan_again:
                    self._rescan_again = False
                    self._rescan_wanted = True
                    self.counters["rescans"] += 1
                    progress = True
                break
            key, b = item
            self.pending[bytes(key)] = None
            budget -= 1
            if b.aliases:
                for alias in b.aliases:
                    self.pending[alias] = None
                budget -= len(b.aliases)
        if progress:
            self.flush()
        if self._rescan is not None or self._rescan_wanted:
            self._rescan_call = self.clock.callLater(0.0 if progress else 0.05,
                                                     self._rescan_step)

    # -- deciding and sending ----------------------------------------------------------

    def flush(self) -> None:
        """Decide every queued identity and confirmation; send what the store may take
        now.  While the store is away, writes are left to the reconciliation (the
        exceptions are in `mine`) and deletes stay queued."""
        if self._flush_call is not None:
            if self._flush_call.active():
                self._flush_call.cancel()
            self._flush_call = None
        self._check_reference()
        now = self.clock.seconds()
        sink = self.sink
        up = sink is not None and sink.up
        room = sink.room() if sink is not None and up else 0
        pending = self.pending
        keep: list[bytes] = []
        while pending:
            if up and room <= 0:
                break  # the rest waits for answers (the store calls `schedule`)
            key, _ = pending.popitem(last=False)
            op = self._decide(key, now)
            if op is None:
                continue
            if not up:
                if op[0] == "delete":
                    keep.append(key)
                continue
            room -= 1
            self._send(key, op, now)
        for key in keep:
            pending[key] = None
        self._flush_confirmations(now, up, room)

    def _decide(self, key: bytes, now: float) -> tuple[str, str, int] | None:
        """The op `key`'s record needs, with `mine` updated: ("write", backend, TTL ms),
        ("delete", "", 0) or None."""
        b = self.table.peek(key)
        if b is not None:
            self.table.catch_up(b)  # the record's lifetime is the binding's, all told
        live = b is not None and b.expires > now
        if live:
            assert b is not None
            name = b.backend.name
            if self.reference(key) != name:
                self._track(key, b)
                entry = self.replica.binding(key, now)
                if entry is not None and entry.field == name \
                        and entry.expires >= min(b.expires, now + self.lifetime) - self.slack:
                    return None  # fmt: skip
                return "write", name, max(1000, int((b.expires - now) * 1000))
        was = self._untrack(key)
        entry = self.replica.binding(key, now)
        if entry is not None and entry.origin == self.name:
            return "delete", "", 0
        if was and self.sink is not None and self.sink.in_flight(self._store_key(key)):
            return "delete", "", 0
        return None

    def _send(self, key: bytes, op: tuple[str, str, int], now: float) -> None:
        assert self.sink is not None
        store_key = self._store_key(key)
        if op[0] == "write":
            self.counters["writes"] += 1
            self.sink.write(store_key, op[1], op[2])
        else:
            self.counters["deletes"] += 1
            self.sink.delete(store_key, self.name)

    def _store_key(self, key: bytes) -> str:
        return self.layout.binding_key(_as_key(key))

    def _track(self, key: bytes, b: Binding) -> None:
        old = self.mine.get(key)
        if old is b:
            return
        if old is not None:
            self._forget_of(old, key)
        self.mine[key] = b
        held = self._of.get(b)
        if held is None:
            held = self._of[b] = set()
        held.add(key)

    def _untrack(self, key: bytes) -> bool:
        b = self.mine.pop(key, None)
        if b is None:
            return False
        self._forget_of(b, key)
        return True

    def _forget_of(self, b: Binding, key: bytes) -> None:
        held = self._of.get(b)
        if held is not None:
            held.discard(key)
            if not held:
                del self._of[b]

    def refresh(self) -> int:
        """Queue the exceptions whose record would lapse before their binding (bindings
        are refreshed by traffic, silently); returns how many."""
        now = self.clock.seconds()
        horizon = self.slack
        count = 0
        caught_up: set[Binding] = set()
        for key, b in list(self.mine.items()):
            entry = self.replica.binding(key, now)
            if entry is not None and entry.field == b.backend.name \
                    and entry.expires >= now + self.lifetime - horizon:
                continue  # fresh whatever the binding's expiry (at most now + lifetime)
            if b not in caught_up:  # packets forwarded in the driver refresh it too
                caught_up.add(b)
                self.table.catch_up(b)
            if b.expires <= now:
                continue
            if entry is None or entry.field != b.backend.name \
                    or entry.expires < min(b.expires, now + self.lifetime) - horizon:
                self._mark(key)  # fmt: skip
                count += 1
        self.counters["refreshes"] += count
        if count:
            self.schedule()
        return count

    # -- confirmations -------------------------------------------------------------------

    def confirmed(self, home: bytes, care_of: bytes, lifetime: float | None) -> None:
        """A notification confirmed `care_of` for `home` here."""
        ttl = MAX_CONFIRM_TTL_MS / 1000 if lifetime is None else lifetime
        mine = self.my_confirms
        mine[home] = (care_of, self.clock.seconds() + ttl)
        mine.move_to_end(home)
        while len(mine) > self.balancer.return_paths.max_entries:
            mine.popitem(last=False)
        self._confirm_op(home, "confirm")

    def unconfirmed(self, home: bytes) -> None:
        """A notification ended `home`'s confirmation here."""
        self.my_confirms.pop(home, None)
        self._confirm_op(home, "unconfirm")

    def _confirm_op(self, home: bytes, op: str) -> None:
        queue = self.confirm_pending
        if home not in queue and len(queue) >= self.queue_limit:
            self.counters["queue_overflows"] += 1
            return
        queue[home] = op
        queue.move_to_end(home)
        self.schedule()

    def _flush_confirmations(self, now: float, up: bool, room: int) -> None:
        if not up or self.sink is None:
            return
        queue = self.confirm_pending
        while queue and room > 0:
            home, op = queue.popitem(last=False)
            store_key = self.layout.confirmation_key(home)
            if op == "confirm":
                mine = self.my_confirms.get(home)
                if mine is None or mine[1] <= now:
                    continue
                entry = self.replica.confirmation(home, now)
                care_of = _text(mine[0])
                if entry is not None and entry.field == care_of \
                        and entry.expires >= mine[1] - 1.0:
                    continue  # fmt: skip
                ttl_ms = min(MAX_CONFIRM_TTL_MS, max(1000, int((mine[1] - now) * 1000)))
                self.counters["confirm_writes"] += 1
                self.sink.write(store_key, care_of, ttl_ms)
            else:
                self.counters["confirm_deletes"] += 1
                self.sink.delete(store_key, None)
            room -= 1

    # -- the store's side ----------------------------------------------------------------

    def reconnected(self) -> None:
        """The store is back and the replica was loaded afresh: compare every exception
        held and every confirmation made here with it, and play the queue."""
        self.counters["reconciled"] += 1
        for key in list(self.mine):
            self.pending[key] = None
        now = self.clock.seconds()
        for home, (_, ends) in list(self.my_confirms.items()):
            if ends > now and home not in self.confirm_pending:
                self.confirm_pending[home] = "confirm"
        self.flush()

    def remote(self, changed: Changed, own: bool, store_key: str) -> None:
        """Act on a record another balancer wrote or deleted (`own`: one of ours, which
        changes nothing here)."""
        if own:
            return
        kind, key, before, after = changed
        in_flight = self.sink is not None and self.sink.in_flight(store_key)
        if kind == "b":
            if after is None:
                if key in self.mine:  # we still hold it: the fleet must know
                    self.counters["rewrites"] += 1
                    self._mark(key)
                    self.schedule()
                return
            if not in_flight:
                self._repoint(key, after.field)
            return
        if in_flight:
            return
        paths = self.balancer.return_paths
        if after is None:
            if before is not None and paths.care_of(key) == _packed(before.field):
                paths.unconfirm(key)
                self.my_confirms.pop(key, None)
                self.counters["remote_unconfirms"] += 1
            return
        care_of = _packed(after.field)
        reason = self._local_refusal(key, care_of)
        if reason is not None:
            self.refused[reason] = self.refused.get(reason, 0) + 1
            return
        left = after.expires - self.clock.seconds()
        if left <= 0:
            return
        mine = self.my_confirms.get(key)
        if mine is not None and mine[0] != care_of:
            del self.my_confirms[key]  # a newer confirmation, from another balancer
        paths.confirm(key, care_of, left)
        self.counters["remote_confirms"] += 1

    def _local_refusal(self, home: bytes, care_of: bytes) -> str | None:
        """Why a confirmation from the store may not be applied here (or None): the
        notification gate's address checks, against this balancer's policy."""
        policy = self.balancer.policy
        for address in (home, care_of):
            if check_address(address) is not None:
                return "bad-address"
            if address in policy.vip_set or address in policy.by_address \
                    or address in policy.own:
                return "local-address"  # fmt: skip
        return None

    def _repoint(self, key: bytes, name: str) -> None:
        now = self.clock.seconds()
        b = self.table.get(_as_key(key), now)
        if b is None or b.backend.name == name:
            return
        policy = self.balancer.policy
        backend: Backend | None = policy.backends.get(name)
        if backend is None or not policy.usable(backend):
            self.counters["remote_unusable"] += 1
            return
        self.counters["remote_moves"] += 1
        if bytes(b.key) == key:
            self.table.repoint(b, backend)  # its aliases follow: one terminal
        else:
            self.table.insert(_as_key(key), backend, now=now)  # the alias gets its own

    def held(self, key: bytes) -> Binding | None:
        """The local binding `key` is an exception of, if it is one."""
        return self.mine.get(key)

    def stop(self) -> None:
        for call in (self._flush_call, self._rescan_call):
            if call is not None and call.active():
                call.cancel()
        self._flush_call = self._rescan_call = None
        self._rescan = None
        self._rescan_wanted = self._rescan_again = False
        if self._table_changed in self.table.listeners:
            self.table.listeners.remove(self._table_changed)


class ConfirmingReturnPaths:
    """The return paths the notification listener is given: the balancer's own
    (`lbproxy.core.returnpaths.ReturnPaths`), with every confirm and unconfirm also
    published to the fleet."""

    def __init__(self, paths: Any, sync: Sync) -> None:
        self.paths = paths
        self.sync = sync

    def confirm(self, home: bytes, care_of: bytes, lifetime: float | None = None) -> None:
        self.paths.confirm(home, care_of, lifetime)
        self.sync.confirmed(home, care_of, lifetime)

    def unconfirm(self, home: bytes) -> bytes | None:
        care_of: bytes | None = self.paths.unconfirm(home)
        self.sync.unconfirmed(home)
        return care_of

    def care_of(self, home: bytes) -> bytes | None:
        answer: bytes | None = self.paths.care_of(home)
        return answer

    def __getattr__(self, name: str) -> Any:
        return getattr(self.paths, name)


def _text(packed: bytes) -> str:
    return str(ipaddress.IPv6Address(packed))


def _packed(text: str) -> bytes:
    return ipaddress.IPv6Address(text).packed

