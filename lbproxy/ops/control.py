"""Operator operations over a live balancer, shared by the manhole and lbproxyctl.

An operator needs the same few things whatever door they come through: see the
sticky table a page at a time, ask what the balancer would do with a packet, move or
forget one terminal's binding, change a backend's weight (drain, undrain), list
backends, read the counters, see what is running (``info``).  They are written once
here, as plain methods that return values (``Row``, ``Page``, dicts of numbers and
strings), so that the SSH manhole, the UNIX-socket runtime API and the tests all
exercise one implementation.  Text rendering (``format_rows``) is also here so the
manhole and the ``lbproxyctl`` client print the same table.

Every change is logged as one audit line naming who asked (`lbproxy.ops.audit`): each
changing verb takes ``who``, which the door fills in (the control socket's peer uid, the
manhole's SSH user).

Reading costs what it shows, not what the table holds, where it can: per-backend
binding counts come from the table's incrementally kept load counts, and a page of
``show`` is chosen from a snapshot of the table taken with the garbage collector paused
(the collector, not the copy, is what makes a copy of 300,000 bindings slow) and
filtered in slices (`Control.scan` yields between them, so a door can run it a slice per
reactor turn).

This module does no I/O other than logging and imports nothing from
``twisted.internet``: it reads the balancer's objects and the injected clock.
"""

from __future__ import annotations

import contextlib
import gc
import heapq
import ipaddress
import re
from collections.abc import Callable, Generator, Iterable, Iterator, Mapping, Sequence
from operator import attrgetter
from typing import TYPE_CHECKING, Any

import attrs

from lbproxy import __version__
from lbproxy.core import actions
from lbproxy.core.keys import canonical_kind, kind_named
from lbproxy.ops.audit import audit

#: Rows a page of ``show`` holds when no limit is given.
DEFAULT_LIMIT = 100
#: The most rows one page may hold (page with ``offset`` for more).
MAX_LIMIT = 10_000
#: Bindings filtered between two yields of `Control.scan`.
SCAN_SLICE = 2_000

if TYPE_CHECKING:
    from twisted.internet.interfaces import IReactorTime

    from lbproxy.core.balancer import Balancer, TraceResult
    from lbproxy.core.keys import Key
    from lbproxy.core.table import Binding


class OperatorError(Exception):
    """An operator asked for something that cannot be done; ``str()`` says why."""


class Text(str):
    """A string that shows itself as is in an interactive console.

    The manhole echoes ``repr()`` of a result; returning ``Text`` makes
    ``show()`` print an aligned table rather than one long quoted line.
    """

    __slots__ = ()

    def __repr__(self) -> str:
        return str(self)


@attrs.frozen
class Row:
    """One binding of the sticky table, as an operator sees it."""

    kind: str
    key: str
    backend: str
    left: float  # seconds of lifetime left
    packets: int
    care_of: str | None
    confirmed: bool
    #: The terminal's other identities leading to this binding (`StickyTable.link`).
    aliases: tuple[str, ...] = ()
    #: Seconds since its lifetime last started again (its last packet -- the XDP
    #: program's own stamp when that is later -- or a notification), to the table's
    #: grain; None when the table does not say.
    idle: float | None = None

    def as_dict(self) -> dict[str, Any]:
        """The row as JSON-ready values."""
        return attrs.asdict(self)


COLUMNS = ("kind", "key", "backend", "left", "idle", "packets", "care-of", "confirmed",
           "aliases")  # fmt: skip


def _cells(row: Mapping[str, Any]) -> list[str]:
    care_of = row.get("care_of")
    idle = row.get("idle")
    return [
        str(row["kind"]),
        str(row["key"]),
        str(row["backend"]),
        f"{float(row['left']):.1f}",
        "-" if idle is None else f"{float(idle):.1f}",
        str(row["packets"]),
        care_of if care_of else "-",
        "yes" if row["confirmed"] else "no",
        ", ".join(row.get("aliases") or ()) or "-",
    ]


def format_rows(
    rows: Iterable[Row | Mapping[str, Any]], total: int | None = None, offset: int = 0
) -> Text:
    """Render rows (``Row`` or their dicts) as an aligned text table.

    ``total`` is the number of rows that matched before a limit, if any, and ``offset``
    how many matching rows come before the first one shown; a footer says how many are
    shown and where the next page starts.
    """
    body = [_cells(r.as_dict() if isinstance(r, Row) else r) for r in rows]
    table = [list(COLUMNS), *body]
    widths = [max(len(line[i]) for line in table) for i in range(len(COLUMNS))]
    numeric = {3, 4, 5}
    lines = []
    for line in table:
        cells = [
            cell.rjust(widths[i]) if i in numeric else cell.ljust(widths[i])
            for i, cell in enumerate(line)
        ]
        lines.append("  ".join(cells).rstrip())
    shown = len(body)
    if total is not None and (total != shown or offset):
        where = f", from offset {offset}" if offset else ""
        after = offset + shown
        more = f"; the next page starts at offset {after}" if after < total else ""
        lines.append(f"({shown} of {total} bindings shown{where}{more})")
    else:
        lines.append(f"({shown} binding{'s' if shown != 1 else ''})")
    return Text("\n".join(lines))


#: A line of ``tcpdump -x``/``-xx``/``-X``: an offset, then up to eight groups of hex
#: (``-X`` adds an ASCII column after two spaces).
_DUMP_LINE = re.compile(r"^\s*0x([0-9a-fA-F]+):\s+((?:[0-9a-fA-F]{2,4} ?)+)")


def _from_dump(text: str) -> str | None:
    """The hex of the first packet in ``tcpdump -x`` output, or None if it is not that:
    the offset lines' hex only (summary lines and the ASCII column left out), up to the
    next packet's ``0x0000`` line."""
    found: list[str] = []
    for line in text.splitlines():
        match = _DUMP_LINE.match(line)
        if match is None:
            if found and line.strip() and not line.startswith((" ", "\t")):
                break  # the next packet's summary line
            continue
        if int(match.group(1), 16) == 0 and found:
            break
        found.append(match.group(2))
    return "".join("".join(found).split()) if found else None


def parse_packet(packet: bytes | bytearray | str) -> bytes:
    """Bytes of a packet given as bytes, as hex text (spaces, colons allowed), or as
    ``tcpdump -x`` output (the first packet's bytes: what ``tcpdump -x ... | lbproxyctl
    trace -`` gives)."""
    if isinstance(packet, bytes | bytearray):
        return bytes(packet)
    dumped = _from_dump(packet)
    if dumped is not None:
        packet = dumped
    cleaned = "".join(packet.split()).replace(":", "")
    if cleaned.startswith(("0x", "0X")):
        cleaned = cleaned[2:]
    try:
        return bytes.fromhex(cleaned)
    except ValueError as exc:
        raise OperatorError(f"not a hex packet: {exc}") from None



def _address(raw: bytes | None) -> str | None:
    if raw is None:
        return None
    return str(ipaddress.IPv6Address(bytes(raw)))


def _int(value: object) -> int:
    return value if isinstance(value, int) else 0


def _ports(ports: Mapping[str, Mapping[str, object]]) -> dict[str, dict[str, Any]]:
    """Port statistics as plain JSON: integers, per-errno counts as dicts, and texts (a
    setting, the reason an executor is off) as they are."""
    return {
        port: {
            name: _counts(value) if isinstance(value, Mapping)
            else value if isinstance(value, str) else _int(value)
            for name, value in counters.items()
        }
        for port, counters in ports.items()
    }


def _counts(value: object) -> dict[str, int]:
    if isinstance(value, Mapping):
        return {str(k): int(v) for k, v in value.items()}
    return {}


@attrs.frozen
class Page:
    """One page of the table: the rows shown, how many matched, where the page starts."""

    rows: tuple[Row, ...]
    total: int
    offset: int
    limit: int | None

    def as_dict(self) -> dict[str, Any]:
        """The page as JSON-ready values."""
        return {
            "rows": [r.as_dict() for r in self.rows],
            "total": self.total,
            "offset": self.offset,
            "limit": self.limit,
        }

    def text(self) -> Text:
        """The page as an aligned text table with its footer."""
        return format_rows(self.rows, total=self.total, offset=self.offset)


def check_page(offset: object, limit: object) -> tuple[int, int]:
    """``offset`` and ``limit`` as a page's: integers, ``0 <= offset``, ``0 <= limit <=
    MAX_LIMIT`` (None: 0 and `DEFAULT_LIMIT`); `OperatorError` otherwise."""
    if offset is None:
        offset = 0
    if limit is None:
        limit = DEFAULT_LIMIT
    if not isinstance(offset, int) or isinstance(offset, bool) or offset < 0:
        raise OperatorError("offset must be a non-negative integer")
    if not isinstance(limit, int) or isinstance(limit, bool) or not 0 <= limit <= MAX_LIMIT:
        raise OperatorError(f"limit must be an integer from 0 to {MAX_LIMIT} "
                            "(use offset for the next page)")  # fmt: skip
    return offset, limit


@contextlib.contextmanager
def _collector_paused() -> Iterator[None]:
    """The garbage collector off for a moment (a burst of short-lived objects)."""
    paused = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if paused:
            gc.enable()


def run_scan(scan: Generator[None, None, Page]) -> Page:
    """Run `Control.scan` to its end at once (the manhole, tests)."""
    while True:
        try:
            next(scan)
        except StopIteration as done:
            page: Page = done.value
            return page


class Control:
    """The operator's verbs over one balancer.

    ``clock`` is the clock the sticky table runs on (lifetimes left are
    ``expires - clock.seconds()``; default: the balancer's); ``backend_state``
    names each backend's health ("up", "down", "unknown"; default: whether the
    balancer has it marked down); ``reload`` is the callable that re-reads the
    configuration, if the service wiring provides one (called with who asked);
    ``ports`` returns what the sockets counted (`ForwarderService.port_stats`), shown
    under ``ports`` in :meth:`stats`; ``weights`` holds the configured weights and the
    operator's overrides (`actions.Weights`; default: the balancer's backends as
    configured); ``status`` adds the service's view to :meth:`info` (configuration
    file, pending restart, offload); ``forwarding`` says whether packets are being
    forwarded (for :meth:`health`); ``offload`` returns the XDP executor while it runs
    (`lbproxy.io.xdp.XdpOffload`, else None): ``show`` then takes the program's
    last-seen stamps (a binding whose packets stay in the driver is not idle) and
    ``trace`` says whether the program would forward the packet itself.
    """

    def __init__(
        self,
        balancer: Balancer,
        clock: IReactorTime | None = None,
        backend_state: Callable[[str], str] | None = None,
        reload: Callable[[str], object] | None = None,
        parse_key: Callable[[str], Key] | None = None,
        ports: Callable[[], Mapping[str, Mapping[str, object]]] | None = None,
        weights: actions.Weights | None = None,
        status: Callable[[], Mapping[str, Any]] | None = None,
        forwarding: Callable[[], bool] | None = None,
        notifier: Any | None = None,
        fleet: Any | None = None,
        offload: Callable[[], Any] | None = None,
    ) -> None:
        self.balancer = balancer
        self.offload = offload
        #: The notification service (`lbproxy.notify.router.Notifier`), if enabled.
        self.notifier = notifier
        #: The fleet service (`lbproxy.fleet.service.FleetService`), if configured.
        self.fleet = fleet
        self.ports = ports
        self.parse_key = parse_key
        self.clock: IReactorTime = clock if clock is not None else balancer.clock
        self.backend_state = backend_state
        self.reload_callable = reload
        self.weights = weights if weights is not None else actions.Weights(
            balancer.backends.values()
        )
        self.status = status
        self.forwarding = forwarding
        #: When the service started (uptime); the service sets it when it starts.
        self.started = self.clock.seconds()

    def _state(self, name: str) -> str:
        if self.backend_state is not None:
            return self.backend_state(name)
        is_up = getattr(self.balancer, "is_up", None)
        if is_up is None:
            return "unknown"
        return "up" if is_up(name) else "down"

    # -- the table -------------------------------------------------------

    def _confirmed(self, key: Key, binding: Binding) -> bool:
        """Whether `binding` is on a confirmed return path: a home address with a
        confirmed care-of address, or a source address confirmed as one."""
        paths = getattr(self.balancer, "return_paths", None)
        if paths is None:
            return False
        if key.kind == "addr" and paths.care_of(key.value) is not None:
            return True  # a home address with a confirmed care-of address
        care_of = binding.care_of
        return care_of is not None and paths.is_confirmed_care_of(care_of)

    def _xdp(self) -> Any:
        """The XDP executor while it runs, else None."""
        return None if self.offload is None else self.offload()

    def _row(self, key: Key, binding: Binding, now: float, xdp: Any = None) -> Row:
        expires, packets = binding.expires, binding.packets
        lifetime = getattr(self.balancer.table, "lifetime", None)
        refreshed = None if lifetime is None else expires - lifetime
        seen = None if xdp is None else xdp.seen(binding)
        if seen is not None:  # the program's, not folded into the table yet
            at, until, new = seen
            expires, packets = max(expires, until), packets + new
            refreshed = at if refreshed is None else max(refreshed, at)
        return Row(
            kind=key.kind,
            key=str(key),
            backend=binding.backend.name,
            left=max(0.0, expires - now),
            idle=None if refreshed is None else max(0.0, now - refreshed),
            packets=packets,
            care_of=_address(binding.care_of),
            confirmed=self._confirmed(key, binding),
            aliases=tuple(str(k) for k in getattr(binding, "alias_keys", ())),
        )

    def scan(
        self,
        filter: str | None = None,
        *,
        kind: str | None = None,
        backend: str | None = None,
        offset: int = 0,
        limit: int | None = DEFAULT_LIMIT,
    ) -> Generator[None, None, Page]:
        """A page of live bindings in key order (kind, then the identity's bytes),
        optionally filtered; a generator that yields after the snapshot and after each
        `SCAN_SLICE` bindings filtered (or merged up to the page), and returns the
        `Page` (``run_scan``).

        ``filter`` keeps a binding when it equals the key kind or the backend name,
        or is a substring of the key or the care-of address (only this one formats
        every key, which costs about 3 µs a binding); ``kind`` and ``backend`` are
        exact filters.  ``limit`` None: every match (for tests and small tables).
        """
        now = self.clock.seconds()
        code: int | None = None
        if kind is not None:
            kind = canonical_kind(kind)
            try:
                code = kind_named(kind).code
            except KeyError:
                code = -1  # no key has it
        with _collector_paused():
            # One list of the bindings (objects that exist anyway): the table's (key,
            # binding) pairs are made and freed while the collector is paused, so they
            # neither slow the copy nor leave hundreds of thousands of young objects
            # for the next collection to walk.
            snapshot = [binding for _key, binding in self.balancer.table]
        yield
        # Filter a slice at a time, each slice sorted into a run of its own; then merge
        # the runs as far as the page reaches.  Only lists of bindings are kept (keys
        # are made and dropped as they are compared), and every step is a slice.
        by_key = attrgetter("key")
        runs: list[list[Binding]] = []
        total = 0
        for start in range(0, len(snapshot), SCAN_SLICE):
            matched = []
            for binding in snapshot[start : start + SCAN_SLICE]:
                if binding.expires <= now:
                    continue
                if backend is not None and binding.backend.name != backend:
                    continue
                if code is not None or filter:
                    key = binding.key
                    if code is not None and key[0] != code:
                        continue
                    if filter and not self._matches(filter, key, binding):
                        continue
                matched.append(binding)
            if matched:
                matched.sort(key=by_key)
                runs.append(matched)
                total += len(matched)
            yield
        del snapshot
        end = None if limit is None else offset + limit
        chosen: list[Binding] = []
        for i, binding in enumerate(heapq.merge(*runs, key=by_key)):
            if end is not None and i >= end:
                break
            if i >= offset:
                chosen.append(binding)
            if i % SCAN_SLICE == SCAN_SLICE - 1:
                yield
        xdp = self._xdp()
        rows = tuple(self._row(binding.key, binding, now, xdp) for binding in chosen)
        return Page(rows, total, offset, limit)

    @staticmethod
    def _matches(filter: str, key: Key, binding: Binding) -> bool:
        if filter in (key.kind, binding.backend.name) or filter in str(key):
            return True
        care_of = _address(binding.care_of)
        return care_of is not None and filter in care_of

    def page(
        self,
        filter: str | None = None,
        *,
        kind: str | None = None,
        backend: str | None = None,
        offset: int | None = 0,
        limit: int | None = DEFAULT_LIMIT,
    ) -> Page:
        """`scan` run at once, with ``offset`` and ``limit`` checked (`check_page`)."""
        offset, limit = check_page(offset, limit)
        return run_scan(self.scan(filter, kind=kind, backend=backend, offset=offset,
                                  limit=limit))  # fmt: skip

    def rows(
        self,
        filter: str | None = None,
        *,
        kind: str | None = None,
        backend: str | None = None,
    ) -> list[Row]:
        """Every live binding that matches, in key order (see `scan` for the filters)."""
        return list(run_scan(self.scan(filter, kind=kind, backend=backend, limit=None)).rows)

    def show(
        self,
        filter: str | None = None,
        *,
        kind: str | None = None,
        backend: str | None = None,
        limit: int | None = DEFAULT_LIMIT,
        offset: int | None = 0,
    ) -> Text:
        """A page of the table as aligned text (see `scan` for the filters); at most
        ``limit`` rows (100 by default, 10,000 at most) from ``offset``."""
        return self.page(filter, kind=kind, backend=backend, offset=offset, limit=limit).text()

    def _key(self, key: Key | str) -> Key:
        if not isinstance(key, str):
            return key
        parse_key = self.parse_key
        if parse_key is None:
            from lbproxy.core.keys import Key

            parse_key = Key.parse
        try:
            return parse_key(key)
        except ValueError as exc:
            raise OperatorError(f"bad key {key!r}: {exc}") from None

    def _backend_name(self, name: str) -> str:
        if not isinstance(name, str) or name not in self.balancer.backends:
            known = ", ".join(self.balancer.backends) or "none"
            raise OperatorError(f"unknown backend {name!r} (known: {known})")
        return name

    def move(self, key: Key | str, backend: str, *, who: str = "unknown") -> Row:
        """Bind ``key`` to ``backend`` (creating the binding if needed)."""
        parsed = self._key(key)
        self._backend_name(backend)
        before = self.balancer.table.get(parsed)
        previous = None if before is None else before.backend.name
        try:
            with self._journey_cause(f"operator move by {who}"):
                binding = actions.move(self.balancer, parsed, backend)
        except (KeyError, ValueError, actions.TableFullError) as exc:
            raise OperatorError(f"cannot move {parsed}: {exc}") from None
        audit(who, "move", key=str(parsed), backend=backend, previous=previous or "-")
        return self._row(parsed, binding, self.clock.seconds())

    def forget(self, key: Key | str, *, who: str = "unknown") -> Row | None:
        """Remove ``key``'s binding; its next packet is scheduled afresh."""
        parsed = self._key(key)
        now = self.clock.seconds()
        with self._journey_cause(f"operator forget by {who}"):
            binding = actions.forget(self.balancer, parsed)
        if binding is None:
            return None
        audit(who, "forget", key=str(parsed), backend=binding.backend.name)
        return self._row(parsed, binding, now)

    def weight(self, backend: str, weight: int, *, who: str = "unknown") -> dict[str, Any]:
        """Give ``backend`` a new weight (0..1000; 0 drains), an operator override that
        reloads keep until ``undrain`` (`actions.Weights`)."""
        self._backend_name(backend)
        try:
            previous = actions.set_weight(self.balancer, backend, weight, self.weights)
        except (KeyError, ValueError, TypeError) as exc:
            raise OperatorError(f"cannot set the weight of {backend}: {exc}") from None
        audit(who, "weight", backend=backend, weight=weight, previous=previous)
        return self._backend_info(backend, self.per_backend())

    def drain(self, backend: str, *, who: str = "unknown") -> dict[str, Any]:
        """Give ``backend`` weight 0: existing bindings stay, no new ones (an operator
        override: ``undrain`` ends it)."""
        self._backend_name(backend)
        try:
            previous = actions.drain(self.balancer, backend, self.weights)
        except KeyError as exc:
            raise OperatorError(f"cannot drain {backend}: {exc}") from None
        audit(who, "drain", backend=backend, weight=0, previous=previous)
        return self._backend_info(backend, self.per_backend())

    def undrain(self, backend: str, *, who: str = "unknown") -> dict[str, Any]:
        """End the operator's override of ``backend``'s weight: the configuration
        file's weight is in force again."""
        self._backend_name(backend)
        try:
            previous = actions.undrain(self.balancer, backend, self.weights)
        except KeyError as exc:
            raise OperatorError(f"cannot undrain {backend}: {exc}") from None
        info = self._backend_info(backend, self.per_backend())
        audit(who, "undrain", backend=backend, weight=info["weight"], previous=previous)
        return info

    def _journey_cause(self, text: str) -> contextlib.AbstractContextManager[None]:
        """Journeys record what happens inside as caused by `text` (the operator)."""
        journeys = getattr(self.balancer, "journeys", None)
        return contextlib.nullcontext() if journeys is None else journeys.cause(text)

    def journey(self, key: Key | str) -> dict[str, Any]:
        """The journey of the terminal ``key`` identifies -- any of its identities, as
        ``show`` prints them (`lbproxy.core.journey`): its identities, backend, care-of
        address and events, oldest first (packets as hex), with ``now`` on the same
        clock."""
        journeys = getattr(self.balancer, "journeys", None)
        if journeys is None:
            raise OperatorError("journeys are not kept by this balancer (control.journeys = 0)")
        parsed = self._key(key)
        found = journeys.find(parsed, self.balancer.table.get(parsed))
        if found is None:
            raise OperatorError(
                f"no journey for {parsed}: the balancer keeps the journeys of the "
                f"{journeys.max_terminals} terminals that changed last, none has this "
                "identity")
        result: dict[str, Any] = found.as_dict()
        result["asked"] = str(parsed)
        result["now"] = self.clock.seconds()
        return result

    # -- packets ---------------------------------------------------------

    def trace(self, packet: bytes | bytearray | str) -> TraceResult:
        """What the balancer would do with ``packet``, without forwarding it."""
        return self.balancer.trace(parse_packet(packet))

    def would_offload(self, packet: bytes | bytearray | str) -> Any:
        """Whether the XDP program would forward ``packet`` itself, and why not
        (`lbproxy.io.xdpverdict.Decision`), or None when the XDP executor is not
        running."""
        xdp = self._xdp()
        return None if xdp is None else xdp.decide(parse_packet(packet))

    def trace_dict(self, packet: bytes | bytearray | str) -> dict[str, Any]:
        """``trace`` as JSON-ready values; ``xdp``: `would_offload`'s decision (None
        without the XDP executor)."""
        raw = parse_packet(packet)
        result = self.trace(raw)
        decision = self.would_offload(raw)
        return {
            "strategy": result.strategy,
            "key": None if result.key is None else str(result.key),
            "backend": None if result.backend is None else result.backend.name,
            "hit": bool(result.hit),
            "reason": result.reason,
            "aliases": [str(k) for k in getattr(result, "aliases", ())],
            "xdp": None if decision is None else decision.as_dict(),
        }

    # -- backends and counters --------------------------------------------

    def per_backend(self) -> dict[str, tuple[int, int]]:
        """Bindings and packets per backend name, at a cost in the number of backends
        (not bindings): the table's load counts (bindings whose lifetime ran out count
        until the next sweep) and the balancer's per-backend packet counter."""
        counts: dict[str, list[int]] = {name: [0, 0] for name in self.balancer.backends}
        for backend, bound in self.balancer.table.load().items():
            counts.setdefault(backend.name, [0, 0])[0] += bound
        kept = getattr(self.balancer.counters, "backend_packets", None)
        if isinstance(kept, Mapping):
            for name, packets in kept.items():
                counts.setdefault(str(name), [0, 0])[1] = int(packets)
        return {name: (c[0], c[1]) for name, c in counts.items()}

    def _backend_info(
        self, name: str, per_backend: Mapping[str, tuple[int, int]]
    ) -> dict[str, Any]:
        backend = self.balancer.backends[name]
        bindings, packets = per_backend.get(name, (0, 0))
        state = self._state(name)
        configured = self.weights.configured_weight(name)
        return {
            "name": backend.name,
            "address": str(backend.address),
            "weight": backend.weight,
            "configured_weight": backend.weight if configured is None else configured,
            "override": name in self.weights.overrides,
            "state": state,
            "bindings": bindings,
            "packets": packets,
        }

    def backends(self) -> list[dict[str, Any]]:
        """Every configured backend with weight, health, bindings and packets."""
        per = self.per_backend()
        return [self._backend_info(name, per) for name in self.balancer.backends]

    def health(self) -> dict[str, Any]:
        """Whether this balancer can take new terminals (``/healthz``): packets are being
        forwarded, at least one backend is up with a weight above 0, and, in a fleet, the
        store's records have been loaded once (before that, a terminal another balancer
        bound off Maglev would be placed by Maglev here: announce no route yet).  A
        later store outage does not count: forwarding goes on from local state."""
        forwarding = True if self.forwarding is None else bool(self.forwarding())
        backends = self.balancer.backends
        up = [name for name in backends if self._state(name) != "down"]
        usable = [name for name in up if backends[name].weight > 0]
        fleet_loaded = self.fleet is None or bool(self.fleet.loaded)
        ok = forwarding and bool(usable) and fleet_loaded
        return {
            "status": "ok" if ok else "unavailable",
            "forwarding": forwarding,
            "backends": len(backends),
            "up": len(up),
            "usable": len(usable),
            **({"fleet_loaded": fleet_loaded} if self.fleet is not None else {}),
        }

    def info(self) -> dict[str, Any]:
        """What is running: version, uptime, mode, offload, table size and capacity,
        the operator's weight overrides, and the service's view (`status`: the
        configuration file and which of its keys differ from what runs)."""
        table = self.balancer.table
        out: dict[str, Any] = {
            "version": __version__,
            "uptime": round(max(0.0, self.clock.seconds() - self.started), 3),
            "mode": self.balancer.mode,
            "offload": "none",
            "bindings": len(table),
            "capacity": getattr(table, "max_entries", None),
            "weight_overrides": dict(self.weights.as_dict()),
        }
        if self.status is not None:
            out.update(self.status())
        return out

    def stats(self) -> dict[str, Any]:
        """The balancer's and the table's counters.  The ports are read first: that folds
        what the XDP program counted since the last sweep into the counters below."""
        ports = _ports(self.ports()) if self.ports is not None else None
        counters = self.balancer.counters
        table = self.balancer.table
        table_stats = getattr(table, "stats", None)
        return {
            "packets_in": _int(getattr(counters, "packets_in", 0)),
            "packets_out": _int(getattr(counters, "packets_out", 0)),
            "replies_in": _int(getattr(counters, "replies_in", 0)),
            "replies_out": _int(getattr(counters, "replies_out", 0)),
            "reassigned": _int(getattr(counters, "reassigned", 0)),
            "dropped": _counts(getattr(counters, "dropped", None)),
            "hits": _counts(getattr(counters, "hits", None)),
            "misses": _counts(getattr(counters, "misses", None)),
            "conflicts": _counts(getattr(counters, "conflicts", None)),
            "correspondent": _counts(getattr(counters, "correspondent", None)),
            "table": {
                "size": len(table),
                "capacity": _int(getattr(table, "max_entries", 0)),
                "aliases": _int(getattr(table, "alias_count", 0)),
                **{
                    name: _int(getattr(table_stats, name, 0))
                    for name in (
                        "hits",
                        "misses",
                        "inserts",
                        "expirations",
                        "evictions",
                        "refusals",
                        "links",
                        "alias_evictions",
                        "established_evictions",
                        "throttled",
                    )
                },
            },
            **({"ports": ports} if ports is not None else {}),
            **({"fleet": self.fleet.stats()} if self.fleet is not None else {}),
        }

    def correspondent(self, limit: int = 100) -> dict[str, Any]:
        """The correspondent node's binding cache (docs/correspondent.md): mode, size,
        bound and the first `limit` entries' home and care-of address, sequence number,
        seconds left."""
        cn = getattr(self.balancer, "correspondent", None)
        if cn is None:
            return {"mode": "off", "size": 0, "entries": []}
        now = self.balancer.clock.seconds()
        return {
            "mode": "strict" if cn.strict else "lenient",
            "size": len(cn),
            "capacity": cn.max_entries,
            "expired": cn.expired,
            "entries": [{"home": _address(e.home), "care_of": _address(e.care_of), "seq": e.seq,
                         "left": round(max(0.0, e.expires - now), 1)}
                        for e in cn.entries(max(0, min(limit, 10_000)))],
        }

    def notify(self, limit: int = 100, peer: str | None = None) -> dict[str, Any]:
        """Notification peers, their states, subscriptions, last reports and refusals by
        reason (``lbproxyctl notify``)."""
        if self.notifier is None:
            raise OperatorError("notifications are off ([notify] enabled = false)")
        if not 0 <= limit <= 10_000:
            raise OperatorError(f"limit must be within 0..10000, not {limit}")
        result: dict[str, Any] = self.notifier.report(limit=limit, peer=peer)
        return result

    def fleet_view(self, key: Key | str) -> dict[str, Any]:
        """One identity as this balancer, the fleet's shared store and Maglev see it
        (``lbproxyctl fleet KEY``)."""
        if self.fleet is None:
            raise OperatorError("this balancer is not in a fleet (no [fleet] section)")
        result: dict[str, Any] = self.fleet.view(self._key(key))
        return result

    def reload(self, *, who: str = "unknown") -> object:
        """Re-read the configuration through the service's reload callable (which logs
        the audit line: it knows what changed)."""
        if self.reload_callable is None:
            raise OperatorError("reload is not available in this process")
        return self.reload_callable(who)


def format_info(info: Mapping[str, Any]) -> Text:
    """Render ``Control.info()`` as ``name: value`` lines."""
    lines = []
    for name, value in info.items():
        if isinstance(value, Mapping):
            value = ", ".join(f"{k}={v}" for k, v in value.items()) or "-"
        elif isinstance(value, list | tuple):
            value = ", ".join(str(v) for v in value) or "-"
        elif value is None:
            value = "-"
        lines.append(f"{name}: {value}")
    return Text("\n".join(lines))


def format_backends(backends: Sequence[Mapping[str, Any]]) -> Text:
    """Render ``Control.backends()`` as aligned text."""
    header = ["name", "address", "weight", "state", "bindings", "packets"]
    table = [header] + [[str(b[h]) for h in header] for b in backends]
    widths = [max(len(line[i]) for line in table) for i in range(len(header))]
    return Text(
        "\n".join(
            "  ".join(cell.ljust(widths[i]) for i, cell in enumerate(line)).rstrip()
            for line in table
        )
    )


def format_stats(stats: Mapping[str, Any], prefix: str = "") -> Text:
    """Render ``Control.stats()`` as ``name value`` lines, nested names dotted."""
    lines: list[str] = []
    for name, value in stats.items():
        if isinstance(value, Mapping):
            if value:
                lines.append(format_stats(value, f"{prefix}{name}."))
            else:
                lines.append(f"{prefix}{name} -")
        else:
            lines.append(f"{prefix}{name} {value}")
    return Text("\n".join(lines))
