"""Operator operations over a live balancer, shared by the manhole and lbproxyctl.

An operator needs the same few things whatever door they come through: see the
sticky table, ask what the balancer would do with a packet, move or forget one
terminal's binding, drain a backend, list backends, read the counters.  They are
written once here, as plain methods that return values (``Row``, dicts of
numbers and strings), so that the SSH manhole, the UNIX-socket runtime API
and the tests all exercise one implementation.  Text rendering (``format_rows``)
is also here so the manhole and the ``lbproxyctl`` client print the same table.

This module does no I/O and imports nothing from ``twisted.internet``: it reads
the balancer's objects and the injected clock.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import TYPE_CHECKING, Any

import attrs

from lbproxy.core import actions
from lbproxy.core.keys import Key as _Key
from lbproxy.core.keys import canonical_kind

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

    def as_dict(self) -> dict[str, Any]:
        """The row as JSON-ready values."""
        return attrs.asdict(self)


COLUMNS = ("kind", "key", "backend", "left", "packets", "care-of", "confirmed", "aliases")


def _cells(row: Mapping[str, Any]) -> list[str]:
    care_of = row.get("care_of")
    return [
        str(row["kind"]),
        str(row["key"]),
        str(row["backend"]),
        f"{float(row['left']):.1f}",
        str(row["packets"]),
        care_of if care_of else "-",
        "yes" if row["confirmed"] else "no",
        ", ".join(row.get("aliases") or ()) or "-",
    ]


def format_rows(rows: Iterable[Row | Mapping[str, Any]], total: int | None = None) -> Text:
    """Render rows (``Row`` or their dicts) as an aligned text table.

    ``total`` is the number of rows that matched before a limit, if any; a
    footer says how many are shown.
    """
    body = [_cells(r.as_dict() if isinstance(r, Row) else r) for r in rows]
    table = [list(COLUMNS), *body]
    widths = [max(len(line[i]) for line in table) for i in range(len(COLUMNS))]
    numeric = {3, 4}
    lines = []
    for line in table:
        cells = [
            cell.rjust(widths[i]) if i in numeric else cell.ljust(widths[i])
            for i, cell in enumerate(line)
        ]
        lines.append("  ".join(cells).rstrip())
    shown = len(body)
    if total is not None and total != shown:
        lines.append(f"({shown} of {total} bindings shown)")
    else:
        lines.append(f"({shown} binding{'s' if shown != 1 else ''})")
    return Text("\n".join(lines))


def parse_packet(packet: bytes | bytearray | str) -> bytes:
    """Bytes of a packet given as bytes or as hex text (spaces, colons allowed)."""
    if isinstance(packet, bytes | bytearray):
        return bytes(packet)
    cleaned = "".join(packet.split()).replace(":", "")
    if cleaned.startswith(("0x", "0X")):
        cleaned = cleaned[2:]
    try:
        return bytes.fromhex(cleaned)
    except ValueError as exc:
        raise OperatorError(f"not a hex packet: {exc}") from None


def _as_key(data: bytes) -> _Key:
    """The Key whose bytes are `data` (an alias as the table keeps it)."""
    return bytes.__new__(_Key, data)


def _address(raw: bytes | None) -> str | None:
    if raw is None:
        return None
    return str(ipaddress.IPv6Address(bytes(raw)))


def _int(value: object) -> int:
    return value if isinstance(value, int) else 0


def _ports(ports: Mapping[str, Mapping[str, object]]) -> dict[str, dict[str, Any]]:
    """Port statistics as plain JSON: integers, and per-errno counts as dicts."""
    return {
        port: {
            name: _counts(value) if isinstance(value, Mapping) else _int(value)
            for name, value in counters.items()
        }
        for port, counters in ports.items()
    }


def _counts(value: object) -> dict[str, int]:
    if isinstance(value, Mapping):
        return {str(k): int(v) for k, v in value.items()}
    return {}


class Control:
    """The operator's verbs over one balancer.

    ``clock`` is the clock the sticky table runs on (lifetimes left are
    ``expires - clock.seconds()``; default: the balancer's); ``backend_state``
    names each backend's health ("up", "down", "unknown"; default: whether the
    balancer has it marked down); ``reload`` is the callable that re-reads the
    configuration, if the service wiring provides one; ``ports`` returns what the
    sockets counted (`ForwarderService.port_stats`), shown under ``ports`` in
    :meth:`stats`.
    """

    def __init__(
        self,
        balancer: Balancer,
        clock: IReactorTime | None = None,
        backend_state: Callable[[str], str] | None = None,
        reload: Callable[[], object] | None = None,
        parse_key: Callable[[str], Key] | None = None,
        ports: Callable[[], Mapping[str, Mapping[str, object]]] | None = None,
    ) -> None:
        self.balancer = balancer
        self.ports = ports
        self.parse_key = parse_key
        self.clock: IReactorTime = clock if clock is not None else balancer.clock
        self.backend_state = backend_state
        self.reload_callable = reload

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

    def _row(self, key: Key, binding: Binding, now: float) -> Row:
        return Row(
            kind=key.kind,
            key=str(key),
            backend=binding.backend.name,
            left=max(0.0, binding.expires - now),
            packets=binding.packets,
            care_of=_address(binding.care_of),
            confirmed=self._confirmed(key, binding),
            aliases=tuple(str(_as_key(a)) for a in binding.aliases or ()),
        )

    def rows(
        self,
        filter: str | None = None,
        *,
        kind: str | None = None,
        backend: str | None = None,
    ) -> list[Row]:
        """Live bindings, sorted by key, optionally filtered.

        ``filter`` keeps a row when it equals the key kind or the backend name,
        or is a substring of the key or the care-of address; ``kind`` and
        ``backend`` are exact filters.
        """
        now = self.clock.seconds()
        if kind is not None:
            kind = canonical_kind(kind)
        out = []
        for key, binding in self.balancer.table:
            if binding.expires <= now:
                continue
            row = self._row(key, binding, now)
            if kind is not None and row.kind != kind:
                continue
            if backend is not None and row.backend != backend:
                continue
            if filter and not (
                filter in (row.kind, row.backend)
                or filter in row.key
                or (row.care_of is not None and filter in row.care_of)
            ):
                continue
            out.append(row)
        out.sort(key=lambda r: (r.kind, r.key))
        return out

    def show(
        self,
        filter: str | None = None,
        *,
        kind: str | None = None,
        backend: str | None = None,
        limit: int | None = None,
    ) -> Text:
        """The table as aligned text (see ``rows`` for the filters)."""
        rows = self.rows(filter, kind=kind, backend=backend)
        shown = rows if limit is None else rows[:limit]
        return format_rows(shown, total=len(rows))

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
        if name not in self.balancer.backends:
            known = ", ".join(self.balancer.backends) or "none"
            raise OperatorError(f"unknown backend {name!r} (known: {known})")
        return name

    def move(self, key: Key | str, backend: str) -> Row:
        """Bind ``key`` to ``backend`` (creating the binding if needed)."""
        parsed = self._key(key)
        self._backend_name(backend)
        try:
            binding = actions.move(self.balancer, parsed, backend)
        except (KeyError, ValueError, actions.TableFullError) as exc:
            raise OperatorError(f"cannot move {parsed}: {exc}") from None
        return self._row(parsed, binding, self.clock.seconds())

    def forget(self, key: Key | str) -> Row | None:
        """Remove ``key``'s binding; its next packet is scheduled afresh."""
        parsed = self._key(key)
        now = self.clock.seconds()
        binding = actions.forget(self.balancer, parsed)
        return None if binding is None else self._row(parsed, binding, now)

    def drain(self, backend: str) -> dict[str, Any]:
        """Give ``backend`` weight 0: existing bindings stay, no new ones."""
        self._backend_name(backend)
        actions.drain(self.balancer, backend)
        return self._backend_info(backend, self.per_backend())

    # -- packets ---------------------------------------------------------

    def trace(self, packet: bytes | bytearray | str) -> TraceResult:
        """What the balancer would do with ``packet``, without forwarding it."""
        return self.balancer.trace(parse_packet(packet))

    def trace_dict(self, packet: bytes | bytearray | str) -> dict[str, Any]:
        """``trace`` as JSON-ready values."""
        result = self.trace(packet)
        return {
            "strategy": result.strategy,
            "key": None if result.key is None else str(result.key),
            "backend": None if result.backend is None else result.backend.name,
            "hit": bool(result.hit),
            "reason": result.reason,
            "aliases": [str(k) for k in getattr(result, "aliases", ())],
        }

    # -- backends and counters --------------------------------------------

    def per_backend(self) -> dict[str, tuple[int, int]]:
        """Live bindings and their packets per backend name.

        Packets come from a ``backend_packets`` counter on the balancer's
        counters when it keeps one; otherwise they are summed over the live
        bindings (what the table remembers).
        """
        counts: dict[str, list[int]] = {name: [0, 0] for name in self.balancer.backends}
        now = self.clock.seconds()
        for _key, binding in self.balancer.table:
            if binding.expires <= now:
                continue
            entry = counts.setdefault(binding.backend.name, [0, 0])
            entry[0] += 1
            entry[1] += binding.packets
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
        return {
            "name": backend.name,
            "address": str(backend.address),
            "weight": backend.weight,
            "state": state,
            "bindings": bindings,
            "packets": packets,
        }

    def backends(self) -> list[dict[str, Any]]:
        """Every configured backend with weight, health, bindings and packets."""
        per = self.per_backend()
        return [self._backend_info(name, per) for name in self.balancer.backends]

    def stats(self) -> dict[str, Any]:
        """The balancer's and the table's counters."""
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
            "table": {
                "size": len(table),
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
                    )
                },
            },
            **({"ports": _ports(self.ports())} if self.ports is not None else {}),
        }

    def reload(self) -> object:
        """Re-read the configuration through the service's reload callable."""
        if self.reload_callable is None:
            raise OperatorError("reload is not available in this process")
        return self.reload_callable()


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
