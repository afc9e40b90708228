"""Saving the sticky table to a file and restoring it, so a restart loses no binding.

A restart or an upgrade would otherwise send every terminal through the
scheduler again, and with a changed backend list many would land elsewhere and
lose their sessions.  So the table is written out periodically and on shutdown,
and read back on start.

Theory of operation:

* The file is JSON lines: a header ``{"format": "lbproxy-table", "version": 2,
  "saved_at": T, "count": N, "return_paths": M}``, then one object per binding: key
  text (``Key.__str__``), backend *name*, seconds of lifetime ``left`` at ``T``,
  packets, care-of address; then one object per confirmed return path
  (`lbproxy.core.returnpaths`): ``{"home": ..., "care_of": ..., "left": seconds or
  null}``.  Backends are saved by name so that a restart with a changed address or
  weight still finds them.  Return paths are saved because replies use them: without
  them a restart would send every confirmed terminal's replies towards its home
  address, without the Type 2 Routing Header, until its next notification.
* Version 1 files (no return-path lines; a ``confirmed`` flag on bindings) are still
  read: a confirmed home-address binding with a care-of address becomes a return path
  with the binding's lifetime.
* Writing is atomic: a temporary file in the same directory, flushed and
  fsynced, then ``os.replace`` over the old one.  A crash mid-write leaves
  the previous file intact.  The file is mode 0600: it lists terminals.
* On restore each binding's lifetime is ``left - (now - saved_at)``: the time
  the balancer was down counts, so what would have expired stays expired.
  Bindings to backends that no longer exist are dropped and counted.
* A file that cannot be read (bad JSON, wrong format or version, wrong count)
  is refused with one clear log message, moved aside as ``<file>.corrupt-<T>``
  for inspection, and the balancer starts with an empty table.  It never
  crashes the service.

``saved_at`` and ``now`` are the table clock's seconds (``reactor.seconds()``,
wall-clock time, in production; a ``task.Clock`` in tests).
"""

from __future__ import annotations

import ipaddress
import json
import os
from collections.abc import Callable, Iterator, Mapping
from typing import TYPE_CHECKING, Any

import attrs
from twisted.application.service import Service
from twisted.internet.task import LoopingCall
from twisted.logger import Logger

if TYPE_CHECKING:
    from twisted.internet.interfaces import IReactorTime

    from lbproxy.core.keys import Key
    from lbproxy.core.returnpaths import ReturnPaths
    from lbproxy.core.selection import Backend
    from lbproxy.core.table import StickyTable

FORMAT = "lbproxy-table"
VERSION = 2
#: Versions `read` accepts.
READABLE_VERSIONS = (1, 2)

log = Logger()


class CorruptTableFile(ValueError):  # noqa: N818 - names the file, not an error of ours
    """The saved table cannot be read; ``str()`` names the file, line and reason."""


@attrs.frozen
class SavedBinding:
    """One binding as written to and read from the file."""

    key: str
    backend: str
    left: float
    packets: int = 0
    care_of: bytes | None = None
    #: Read from version 1 files only (return paths have their own lines since).
    confirmed: bool = False

    def to_json(self) -> dict[str, Any]:
        """The JSON object of one line."""
        return {
            "key": self.key,
            "backend": self.backend,
            "left": round(self.left, 3),
            "packets": self.packets,
            "care_of": None
            if self.care_of is None
            else str(ipaddress.IPv6Address(self.care_of)),
        }

    @classmethod
    def from_json(cls, obj: object) -> SavedBinding:
        """Parse one line's object; raise ``ValueError`` when it is not one."""
        if not isinstance(obj, dict):
            raise ValueError("not a JSON object")
        key, backend, left = obj.get("key"), obj.get("backend"), obj.get("left")
        packets, care_of = obj.get("packets", 0), obj.get("care_of")
        confirmed = obj.get("confirmed", False)
        if not isinstance(key, str) or not isinstance(backend, str):
            raise ValueError("key and backend must be strings")
        if not isinstance(left, int | float) or isinstance(left, bool):
            raise ValueError("left must be a number")
        if not isinstance(packets, int) or isinstance(packets, bool) or packets < 0:
            raise ValueError("packets must be a non-negative integer")
        if not isinstance(confirmed, bool):
            raise ValueError("confirmed must be true or false")
        packed = None
        if care_of is not None:
            if not isinstance(care_of, str):
                raise ValueError("care_of must be an address")
            packed = ipaddress.IPv6Address(care_of).packed
        return cls(key, backend, float(left), packets, packed, confirmed)


def _address(obj: dict[str, Any], name: str) -> bytes:
    value = obj.get(name)
    if not isinstance(value, str):
        raise ValueError(f"{name} must be an IPv6 address")
    return ipaddress.IPv6Address(value).packed


@attrs.frozen
class SavedReturnPath:
    """One confirmed return path as written to and read from the file."""

    home: bytes
    care_of: bytes
    #: Seconds the confirmation had left when saved; None: no deadline.
    left: float | None

    def to_json(self) -> dict[str, Any]:
        return {
            "home": str(ipaddress.IPv6Address(self.home)),
            "care_of": str(ipaddress.IPv6Address(self.care_of)),
            "left": None if self.left is None else round(self.left, 3),
        }

    @classmethod
    def from_json(cls, obj: object) -> SavedReturnPath:
        """Parse one line's object; raise ``ValueError`` when it is not one."""
        if not isinstance(obj, dict) or "home" not in obj:
            raise ValueError("not a return path object")
        left = obj.get("left")
        if left is not None and (not isinstance(left, int | float) or isinstance(left, bool)):
            raise ValueError("left must be a number or null")
        return cls(_address(obj, "home"), _address(obj, "care_of"),
                   None if left is None else float(left))  # fmt: skip


@attrs.frozen
class SavedTable:
    """A whole file: when it was saved, its bindings and its return paths."""

    saved_at: float
    bindings: list[SavedBinding]
    return_paths: list[SavedReturnPath]


@attrs.frozen
class RestoreResult:
    """What a restore did: counts, and the reason when the file was refused."""

    restored: int = 0
    expired: int = 0
    unknown_backend: int = 0
    refused: int = 0  # bad keys, or the table refused the insert
    error: str | None = None
    moved_to: str | None = None
    return_paths: int = 0


def snapshot(table: StickyTable, now: float) -> list[SavedBinding]:
    """The live bindings of ``table`` as values, lifetimes relative to ``now``."""
    out = []
    for key, binding in table:
        left = binding.expires - now
        if left <= 0:
            continue
        out.append(
            SavedBinding(
                key=str(key),
                backend=binding.backend.name,
                left=left,
                packets=binding.packets,
                care_of=None if binding.care_of is None else bytes(binding.care_of),
            )
        )
    return out


def snapshot_return_paths(return_paths: ReturnPaths, now: float) -> list[SavedReturnPath]:
    """The live confirmations of ``return_paths``, lifetimes relative to ``now``."""
    return [SavedReturnPath(home, care_of, left)
            for home, care_of, left in return_paths.items(now)]  # fmt: skip


def _lines(
    saved: list[SavedBinding], paths: list[SavedReturnPath], now: float
) -> Iterator[str]:
    header = {"format": FORMAT, "version": VERSION, "saved_at": now, "count": len(saved),
              "return_paths": len(paths)}  # fmt: skip
    yield json.dumps(header) + "\n"
    for entry in saved:
        yield json.dumps(entry.to_json(), separators=(",", ":")) + "\n"
    for path in paths:
        yield json.dumps(path.to_json(), separators=(",", ":")) + "\n"


def save(
    table: StickyTable, path: str, now: float, return_paths: ReturnPaths | None = None
) -> int:
    """Write ``table`` (and ``return_paths``) to ``path`` atomically; return the number
    of bindings saved."""
    saved = snapshot(table, now)
    paths = [] if return_paths is None else snapshot_return_paths(return_paths, now)
    directory = os.path.dirname(os.path.abspath(path))
    temporary = f"{path}.tmp.{os.getpid()}"
    fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            handle.writelines(_lines(saved, paths, now))
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(temporary, path)
    except BaseException:
        if os.path.exists(temporary):
            os.unlink(temporary)
        raise
    try:
        dir_fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return len(saved)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)
    return len(saved)


def read(path: str) -> tuple[float, list[SavedBinding]]:
    """Read a saved table: ``(saved_at, bindings)``; raise ``CorruptTableFile``."""
    table = read_table(path)
    return table.saved_at, table.bindings


def read_table(path: str) -> SavedTable:
    """Read a saved table with its return paths; raise ``CorruptTableFile``."""
    try:
        with open(path, encoding="utf-8") as handle:
            text = handle.read()
    except UnicodeDecodeError as exc:
        raise CorruptTableFile(f"{path}: not UTF-8 text ({exc.reason})") from None
    lines = text.splitlines()
    if not lines:
        raise CorruptTableFile(f"{path}: empty file, no header")
    try:
        header = json.loads(lines[0])
    except ValueError as exc:
        raise CorruptTableFile(f"{path}:1: header is not JSON ({exc})") from None
    if not isinstance(header, dict) or header.get("format") != FORMAT:
        raise CorruptTableFile(f"{path}:1: not an lbproxy table file")
    version = header.get("version")
    if version not in READABLE_VERSIONS:
        raise CorruptTableFile(
            f"{path}:1: version {version!r} not supported (want one of {READABLE_VERSIONS})"
        )
    saved_at, count = header.get("saved_at"), header.get("count")
    if not isinstance(saved_at, int | float) or not isinstance(count, int):
        raise CorruptTableFile(f"{path}:1: header lacks saved_at or count")
    paths_count = header.get("return_paths", 0)
    if not isinstance(paths_count, int) or isinstance(paths_count, bool) or paths_count < 0:
        raise CorruptTableFile(f"{path}:1: return_paths must be a count")
    if count < 0 or len(lines) - 1 != count + paths_count:
        raise CorruptTableFile(
            f"{path}: header says {count} bindings and {paths_count} return paths, "
            f"file has {len(lines) - 1} lines (truncated?)"
        )
    entries = []
    for number, line in enumerate(lines[1 : 1 + count], start=2):
        try:
            entries.append(SavedBinding.from_json(json.loads(line)))
        except ValueError as exc:
            raise CorruptTableFile(f"{path}:{number}: {exc}") from None
    paths = []
    for number, line in enumerate(lines[1 + count :], start=2 + count):
        try:
            paths.append(SavedReturnPath.from_json(json.loads(line)))
        except ValueError as exc:
            raise CorruptTableFile(f"{path}:{number}: {exc}") from None
    if version == 1:
        paths = [
            SavedReturnPath(_v1_home(e.key), e.care_of, e.left)
            for e in entries
            if e.confirmed and e.care_of is not None and _v1_home(e.key)
        ]
    return SavedTable(float(saved_at), entries, paths)


def _v1_home(key: str) -> bytes:
    """The home address of a version 1 ``hoa`` key's text (empty for other kinds)."""
    kind, _, value = key.partition(" ")
    if kind != "hoa":
        return b""
    try:
        return ipaddress.IPv6Address(value.strip()).packed
    except ValueError:
        return b""


def restore(
    table: StickyTable,
    backends: Mapping[str, Backend],
    saved_at: float,
    entries: list[SavedBinding],
    now: float,
    parse_key: Callable[[str], Key] | None = None,
) -> RestoreResult:
    """Put ``entries`` saved at ``saved_at`` back into ``table`` at time ``now``.

    ``parse_key`` turns saved key text into a key (default ``Key.parse``).
    """
    if parse_key is None:
        from lbproxy.core.keys import Key

        parse_key = Key.parse

    elapsed = max(0.0, now - saved_at)
    restored = expired = unknown = refused = 0
    # Shortest-lived first: a table that files new entries in a FIFO by expiry
    # (lbproxy.core.table's probation) keeps that order.
    for entry in sorted(entries, key=lambda e: e.left):
        left = entry.left - elapsed
        if left <= 0:
            expired += 1
            continue
        backend = backends.get(entry.backend)
        if backend is None:
            unknown += 1
            continue
        try:
            key = parse_key(entry.key)
        except ValueError:
            refused += 1
            continue
        # Established if it had seen more than its first packet, as before the restart
        # (so a flood of new keys cannot evict it); its own remaining lifetime.
        binding = table.restore(
            key,
            backend,
            now + left,
            packets=entry.packets,
            care_of=entry.care_of,
            established=entry.packets > 1,
            now=now,
        )
        if binding is None:
            refused += 1
            continue
        restored += 1
    return RestoreResult(restored, expired, unknown, refused)


def restore_return_paths(
    return_paths: ReturnPaths, saved_at: float, saved: list[SavedReturnPath], now: float
) -> int:
    """Put saved confirmations back (the downtime counts against their lifetimes);
    returns how many are live again."""
    elapsed = max(0.0, now - saved_at)
    restored = 0
    for entry in saved:
        if entry.left is None:
            return_paths.confirm(entry.home, entry.care_of, None, now=now)
        elif entry.left - elapsed > 0:
            return_paths.confirm(entry.home, entry.care_of, entry.left - elapsed, now=now)
        else:
            continue
        restored += 1
    return restored


def load(
    table: StickyTable,
    path: str,
    backends: Mapping[str, Backend],
    now: float,
    parse_key: Callable[[str], Key] | None = None,
    return_paths: ReturnPaths | None = None,
) -> RestoreResult:
    """Restore ``table`` from ``path`` if it exists, refusing a corrupt file.

    A corrupt file is renamed to ``<path>.corrupt-<now>`` and the table is
    left empty; the result's ``error`` says why.  Never raises for a bad file.
    """
    if not os.path.exists(path):
        return RestoreResult()
    try:
        saved = read_table(path)
    except (CorruptTableFile, OSError) as exc:
        aside = f"{path}.corrupt-{int(now)}"
        try:
            os.replace(path, aside)
        except OSError:
            aside = None  # type: ignore[assignment]
        return RestoreResult(error=str(exc), moved_to=aside)
    result = restore(table, backends, saved.saved_at, saved.bindings, now, parse_key)
    if return_paths is not None:
        restored = restore_return_paths(return_paths, saved.saved_at, saved.return_paths, now)
        result = attrs.evolve(result, return_paths=restored)
    return result


class TablePersistence(Service):
    """Restore the table on start, save it every ``interval`` seconds and on stop.

    Add it to the service tree *before* the packet reader so the table is
    restored before the first packet is looked up.
    """

    name = "persistence"

    def __init__(
        self,
        table: StickyTable,
        path: str,
        backends: Callable[[], Mapping[str, Backend]],
        clock: IReactorTime,
        interval: float = 60.0,
        parse_key: Callable[[str], Key] | None = None,
        return_paths: ReturnPaths | None = None,
    ) -> None:
        self.parse_key = parse_key
        self.return_paths = return_paths
        self.table = table
        self.path = path
        self.backends = backends
        self.clock = clock
        self.interval = interval
        self.last_restore: RestoreResult | None = None
        self._loop: LoopingCall | None = None

    def startService(self) -> None:
        """Restore, then start the periodic save."""
        super().startService()
        result = load(
            self.table, self.path, self.backends(), self.clock.seconds(), self.parse_key,
            self.return_paths,
        )
        self.last_restore = result
        if result.error is not None:
            log.error(
                "Refused the saved table ({error}); starting with an empty table. "
                "The file was kept aside as {aside}.",
                error=result.error,
                aside=result.moved_to,
            )
        else:
            log.info(
                "Restored {restored} bindings and {paths} return paths from {path} "
                "({expired} expired, {unknown} for unknown backends, {refused} refused).",
                restored=result.restored,
                paths=result.return_paths,
                path=self.path,
                expired=result.expired,
                unknown=result.unknown_backend,
                refused=result.refused,
            )
        if self.interval > 0:
            self._loop = LoopingCall(self.save)
            self._loop.clock = self.clock
            self._loop.start(self.interval, now=False).addErrback(
                lambda f: log.failure("Periodic table save stopped", f)
            )

    def save(self) -> int:
        """Save now; log and swallow I/O errors (the next save will retry)."""
        try:
            return save(self.table, self.path, self.clock.seconds(), self.return_paths)
        except OSError as exc:
            log.error("Could not save the table to {path}: {exc}", path=self.path, exc=exc)
            return 0

    def stopService(self) -> None:
        """Stop the periodic save and save one last time."""
        if self._loop is not None and self._loop.running:
            self._loop.stop()
        self._loop = None
        count = self.save()
        log.info("Saved {count} bindings to {path}.", count=count, path=self.path)
        super().stopService()


def make_persistence_service(
    table: StickyTable,
    path: str,
    backends: Callable[[], Mapping[str, Backend]],
    clock: IReactorTime,
    interval: float = 60.0,
    return_paths: ReturnPaths | None = None,
) -> TablePersistence:
    """The service that keeps ``table`` (and ``return_paths``) in ``path`` across
    restarts."""
    return TablePersistence(table, path, backends, clock, interval, return_paths=return_paths)
