"""The connection to the fleet's store (Redis or Valkey), through txredisapi.

Why this exists: the store is reached over the network and can go away at any time; the
data path must not notice.  `RedisStore` keeps two connections up (one for commands, one
subscribed to the change channel), reconnecting with a capped back-off, pings both so a
store that hangs is noticed within ``timeout`` seconds, and tells `Sync` when the store
comes and goes.  It never queues work inside the client library: when the store is away
`up` is False and `Sync` keeps its own bounded queue.

Every write goes through a Lua script that takes the next number of the fleet's write
counter, sets (or deletes) the record and publishes the change, atomically: the changes of
the whole fleet have one total order, and a subscriber sees them in that order.  A delete
can be made conditional on the record's origin, so a balancer never deletes another's
write.

When both connections are up the replica is loaded afresh (SCAN over the fleet's keys,
values and TTLs read by a script), with the changes that arrive meanwhile merged in by
write number; then `Sync.reconnected` reconciles.  Every key, value and message read is
parsed by `lbproxy.fleet.codec`: what is refused is counted by reason and ignored.
"""

from __future__ import annotations

import contextlib
import socket
import time
from collections.abc import Callable
from typing import Any

import txredisapi
from twisted.internet import defer
from twisted.internet.endpoints import clientFromString
from twisted.internet.interfaces import IReactorTime
from twisted.internet.task import LoopingCall
from twisted.logger import Logger
from twisted.python.failure import Failure

from lbproxy.core.keys import Key
from lbproxy.fleet.codec import MAX_TTL_MS, Change, Layout, Refused
from lbproxy.fleet.replica import Entry, Replica
from lbproxy.fleet.sync import Sync

__all__ = ["RedisStore"]

_log = Logger()

#: KEYS: record, write counter.  ARGV: field, origin, TTL ms, channel.
SET_SCRIPT = b"""
local v = redis.call('INCR', KEYS[2])
redis.call('SET', KEYS[1], '1 ' .. v .. ' ' .. ARGV[1] .. ' ' .. ARGV[2], 'PX', ARGV[3])
redis.call('PUBLISH', ARGV[4],
  'S ' .. v .. ' ' .. ARGV[3] .. ' ' .. ARGV[1] .. ' ' .. ARGV[2] .. ' ' .. KEYS[1])
return v
"""

#: KEYS: record, write counter.  ARGV: origin the record must have ('' = any), channel,
#: the deleting balancer.  Returns 0 when there was nothing (of that origin) to delete.
DELETE_SCRIPT = b"""
local cur = redis.pcall('GET', KEYS[1])
if type(cur) ~= 'string' then return 0 end
if ARGV[1] ~= '' then
  local origin = string.match(cur, '^1 %d+ %S+ (%S+)$')
  if origin ~= ARGV[1] then return 0 end
end
local v = redis.call('INCR', KEYS[2])
redis.call('DEL', KEYS[1])
redis.call('PUBLISH', ARGV[2], 'D ' .. v .. ' 0 - ' .. ARGV[3] .. ' ' .. KEYS[1])
return v
"""

#: KEYS: records.  Returns value (or false) and PTTL for each, flat.
LOAD_SCRIPT = b"""
local out = {}
for i, k in ipairs(KEYS) do
  local v = redis.pcall('GET', k)
  if type(v) ~= 'string' then v = false end
  out[#out + 1] = v
  out[#out + 1] = redis.call('PTTL', k)
end
return out
"""

SCAN_COUNT = 500


def default_name() -> str:
    """This host's name, as a balancer name (letters, digits, '_.:-', up to 63)."""
    name = "".join(c if c.isalnum() or c in "_.:-" else "-" for c in socket.gethostname())
    return (name.lstrip("_.:-") or "lbproxy")[:63]


class _CommandFactory(txredisapi.RedisFactory):
    initialDelay = 0.1
    maxDelay = 2.0

    def __init__(self, store: RedisStore, password: str | None) -> None:
        super().__init__("lbproxy-fleet", None, 1, isLazy=True, charset=None,
                         password=password, replyTimeout=store.timeout,
                         convertNumbers=False)
        self.store = store

    def addConnection(self, conn: Any) -> None:
        super().addConnection(conn)
        if conn in self.pool:
            self.store._command_up(conn)

    def delConnection(self, conn: Any) -> None:
        super().delConnection(conn)
        self.store._command_down(conn)


class _Subscriber(txredisapi.SubscriberProtocol):
    def messageReceived(self, pattern: Any, channel: Any, message: Any) -> None:
        self.factory.store._message(message)


class _SubscriberFactory(txredisapi.SubscriberFactory):
    protocol = _Subscriber
    initialDelay = 0.1
    maxDelay = 2.0

    def __init__(self, store: RedisStore, password: str | None) -> None:
        super().__init__(isLazy=True)
        self.store = store
        self.charset = None
        self.convertNumbers = False
        self.password = password
        self.replyTimeout = store.timeout

    def addConnection(self, conn: Any) -> None:
        super().addConnection(conn)
        if conn in self.pool:
            self.store._subscriber_up(conn)

    def delConnection(self, conn: Any) -> None:
        super().delConnection(conn)
        self.store._subscriber_down(conn)


class RedisStore:
    """Two connections to the store, the scripts, the load, and the in-flight writes."""

    def __init__(
        self,
        endpoint: str,
        layout: Layout,
        replica: Replica,
        sync: Sync,
        name: str,
        reactor: Any,
        timeout: float = 2.0,
        password: str | None = None,
        max_in_flight: int = 1000,
    ) -> None:
        self.endpoint = endpoint
        self.layout = layout
        self.replica = replica
        self.sync = sync
        self.name = name
        self.reactor = reactor
        self.clock: IReactorTime = reactor
        self.timeout = timeout
        self.password = password
        self.max_in_flight = max_in_flight
        self.state = "down"  # down | loading | up
        self._cmd: Any = None
        self._sub: Any = None
        self._subscribed = False
        self._buffer: list[Change] = []
        self._in_flight: dict[str, int] = {}
        self._in_flight_total = 0
        self._factories: list[Any] = []
        self._pinger = LoopingCall(self._ping)
        self._pinger.clock = reactor
        self._load_started = 0.0
        self._down_since: float | None = time.monotonic()
        self._stopping = False
        #: Observers of every change applied (benchmarks, tests): called with the change
        #: and the local clock's reading when it was applied.
        self.observers: list[Callable[[Change, float], None]] = []
        self.counters: dict[str, int] = dict.fromkeys(
            ("connects", "outages", "messages", "loads", "loaded_keys", "write_errors",
             "own_messages"), 0)
        #: Values, keys and messages refused (garbage), by reason.
        self.refused: dict[str, int] = {}
        self.last_load_seconds = 0.0
        self.last_outage_seconds = 0.0
        sync.sink = self

    # -- life cycle ----------------------------------------------------------------------

    def start(self) -> None:
        self._stopping = False
        for factory in (_CommandFactory(self, self.password),
                        _SubscriberFactory(self, self.password)):
            factory.startConnecting(clientFromString(self.reactor, self.endpoint))
            self._factories.append(factory)
        self._pinger.start(max(0.2, self.timeout / 2), now=False)

    def stop(self) -> defer.Deferred[Any]:
        self._stopping = True
        if self._pinger.running:
            self._pinger.stop()
        factories, self._factories = self._factories, []
        return defer.gatherResults([f.disconnect() for f in factories], consumeErrors=True)

    @property
    def up(self) -> bool:
        return self.state == "up"

    # -- connections ---------------------------------------------------------------------

    def _command_up(self, conn: Any) -> None:
        self._cmd = conn
        self._maybe_load()

    def _command_down(self, conn: Any) -> None:
        if conn is self._cmd:
            self._cmd = None
            self._lost("command connection")

    def _subscriber_up(self, conn: Any) -> None:
        self._sub = conn
        self._subscribed = False

        def subscribed(_: object) -> None:
            if conn is self._sub:
                self._subscribed = True
                self._maybe_load()

        def failed(failure: Failure) -> None:
            _log.warn("fleet: could not subscribe: {error}", error=failure.getErrorMessage())
            conn.transport.loseConnection()

        conn.subscribe(self.layout.channel).addCallbacks(subscribed, failed)

    def _subscriber_down(self, conn: Any) -> None:
        if conn is self._sub:
            self._sub = None
            self._subscribed = False
            self._lost("subscription")

    def _lost(self, what: str) -> None:
        self._in_flight.clear()
        self._in_flight_total = 0
        if self.state != "down":
            self.state = "down"
            self.counters["outages"] += 1
            self._down_since = time.monotonic()
            if not self._stopping:
                _log.warn("fleet: store {endpoint} lost ({what}); forwarding goes on from "
                          "local state, changes are queued", endpoint=self.endpoint, what=what)

    def _maybe_load(self) -> None:
        if self.state != "down" or self._cmd is None or not self._subscribed:
            return
        self.state = "loading"
        self._buffer = []
        self._load_started = time.monotonic()
        cmd = self._cmd
        d = defer.ensureDeferred(self._load(cmd))
        d.addCallbacks(self._loaded, self._load_failed, callbackArgs=(cmd,), errbackArgs=(cmd,))

    async def _load(self, cmd: Any) -> tuple[dict[bytes, Entry], dict[bytes, Entry]]:
        bindings: dict[bytes, Entry] = {}
        confirmations: dict[bytes, Entry] = {}
        cursor: Any = b"0"
        layout = self.layout
        while True:
            cursor, names = await cmd.scan(cursor, layout.pattern, SCAN_COUNT)
            names = [n for n in names if n != layout.version.encode()]
            if names:
                reply = await cmd.eval(LOAD_SCRIPT, names, [])
                now = self.clock.seconds()
                for i, raw_name in enumerate(names):
                    self._take(raw_name, reply[2 * i], reply[2 * i + 1], now,
                               bindings, confirmations)
            if cursor in (b"0", 0, "0"):
                return bindings, confirmations

    def _take(self, raw_name: Any, raw_value: Any, pttl: Any, now: float,
              bindings: dict[bytes, Entry], confirmations: dict[bytes, Entry]) -> None:
        """One record of a load, checked."""
        try:
            if not isinstance(raw_name, bytes):
                raise Refused("bad-key", "not a string")
            try:
                name = raw_name.decode("ascii")
            except UnicodeDecodeError:
                raise Refused("bad-key", "not ASCII") from None
            key, home = self.layout.parse_store_key(name)
            if raw_value is None:
                return  # expired between SCAN and GET, or not a string (counted below)
            value = self.layout.parse_value(raw_value, confirmation=home is not None)
            if not isinstance(pttl, int) or isinstance(pttl, bool) or pttl == -1:
                raise Refused("no-ttl", name[:80])
            if pttl <= 0:
                return
            if pttl > MAX_TTL_MS * 40:
                raise Refused("bad-ttl", f"{pttl} ms")
        except Refused as e:
            self._refuse(e)
            return
        entry = Entry(value.field, value.origin, value.version, now + pttl / 1000.0)
        if key is not None:
            bindings[bytes(key)] = entry
        else:
            assert home is not None
            confirmations[home] = entry

    def _loaded(self, loaded: tuple[dict[bytes, Entry], dict[bytes, Entry]], cmd: Any) -> None:
        if cmd is not self._cmd or self.state != "loading":
            return  # lost meanwhile: a new load follows the reconnection
        bindings, confirmations = loaded
        buffered, self._buffer = self._buffer, []
        changed = self.replica.replace(bindings, confirmations, buffered)
        self.state = "up"
        self.counters["loads"] += 1
        self.counters["connects"] += 1
        self.counters["loaded_keys"] += len(bindings) + len(confirmations)
        self.last_load_seconds = time.monotonic() - self._load_started
        if self._down_since is not None:
            self.last_outage_seconds = time.monotonic() - self._down_since
            self._down_since = None
        _log.info("fleet: store {endpoint} up; replica loaded {n} records in {ms:.1f} ms",
                  endpoint=self.endpoint, n=len(bindings) + len(confirmations),
                  ms=self.last_load_seconds * 1000)
        for item in changed:
            entry = item[3] or item[2]
            own = entry is not None and entry.origin == self.name
            self.sync.remote(item, own, self._store_key(item[0], item[1]))
        self.sync.reconnected()

    def _load_failed(self, failure: Failure, cmd: Any) -> None:
        _log.warn("fleet: loading the replica failed: {error}", error=failure.getErrorMessage())
        if self.state == "loading":
            self.state = "down"
        if cmd is self._cmd and cmd.transport is not None:
            cmd.transport.loseConnection()  # reconnect and load again

    def _store_key(self, kind: str, key: bytes) -> str:
        if kind == "b":
            return self.layout.binding_key(bytes.__new__(Key, key))
        return self.layout.confirmation_key(key)

    # -- messages ------------------------------------------------------------------------

    def _message(self, raw: Any) -> None:
        self.counters["messages"] += 1
        try:
            change = self.layout.parse_change(raw)
        except Refused as e:
            self._refuse(e)
            return
        if self.state == "loading":
            self._buffer.append(change)
            if len(self._buffer) > self.sync.queue_limit:
                self._buffer.pop(0)
                self.sync.counters["queue_overflows"] += 1
            return
        own = change.origin == self.name
        if own:
            self.counters["own_messages"] += 1
            self._settle(change.store_key)
        changed = self.replica.apply(change)
        now = self.clock.seconds()
        for observer in self.observers:
            observer(change, now)
        if changed is not None:
            self.sync.remote(changed, own, change.store_key)

    def _refuse(self, e: Refused) -> None:
        self.refused[e.reason] = self.refused.get(e.reason, 0) + 1
        _log.debug("fleet: refused from the store: {error}", error=str(e))

    # -- writes (Sync's sink) ------------------------------------------------------------

    def room(self) -> int:
        return self.max_in_flight - self._in_flight_total if self.up else 0

    def in_flight(self, store_key: str) -> bool:
        return store_key in self._in_flight

    def write(self, store_key: str, field: str, ttl_ms: int) -> None:
        self._call(SET_SCRIPT, store_key, [field, self.name, str(ttl_ms), self.layout.channel])

    def delete(self, store_key: str, only_origin: str | None) -> None:
        self._call(DELETE_SCRIPT, store_key, [only_origin or "", self.layout.channel, self.name])

    def _call(self, script: bytes, store_key: str, args: list[str]) -> None:
        cmd = self._cmd
        if cmd is None or not self.up:
            return
        self._in_flight[store_key] = self._in_flight.get(store_key, 0) + 1
        self._in_flight_total += 1
        try:
            d = cmd.eval(script, [store_key, self.layout.version], args)
        except txredisapi.ConnectionError:
            self._settle(store_key)
            return
        d.addCallbacks(self._done, self._failed, callbackArgs=(store_key,),
                       errbackArgs=(store_key,))

    def _done(self, result: Any, store_key: str) -> None:
        if result == 0:  # nothing published: no message of ours will settle it
            self._settle(store_key)

    def _failed(self, failure: Failure, store_key: str) -> None:
        if failure.check(txredisapi.ConnectionError):
            return  # the connection's loss resets what is in flight
        self.counters["write_errors"] += 1
        _log.warn("fleet: write of {key} failed: {error}", key=store_key,
                  error=failure.getErrorMessage())
        self._settle(store_key)

    def _settle(self, store_key: str) -> None:
        n = self._in_flight.get(store_key)
        if n is None:
            return
        self._in_flight_total -= 1
        if n > 1:
            self._in_flight[store_key] = n - 1
        else:
            del self._in_flight[store_key]
        if (self.sync.pending or self.sync.confirm_pending) \
                and self.room() >= max(1, self.max_in_flight // 4):
            self.sync.schedule()  # fmt: skip

    # -- liveness ------------------------------------------------------------------------

    def _ping(self) -> None:
        for conn in (self._cmd, self._sub):
            if conn is not None:
                with contextlib.suppress(txredisapi.ConnectionError):
                    conn.ping().addErrback(lambda _: None)
        self.replica.expire()

    def status(self) -> dict[str, Any]:
        down = (time.monotonic() - self._down_since) if self._down_since is not None else 0.0
        return {
            "endpoint": self.endpoint,
            "state": self.state,
            "down_seconds": round(down, 3),
            "last_outage_seconds": round(self.last_outage_seconds, 3),
            "last_load_ms": round(self.last_load_seconds * 1000, 3),
            "in_flight": self._in_flight_total,
            **self.counters,
            "refused": dict(self.refused),
        }

