"""Saving the sticky table to a file and restoring it, so a restart loses no binding.

A restart or an upgrade would otherwise send every terminal through the
scheduler again, and with a changed backend list many would land elsewhere and
lose their sessions.  So the table is written out periodically and on shutdown,
and read back on start.

Theory of operation:

* The file is JSON lines: a header ``{"format": "lbproxy-table", "version": 3,
  "saved_at": T, "count": N, "return_paths": M}``, then one object per binding: key
  text (``Key.__str__``), backend *name*, seconds of lifetime ``left`` at ``T``,
  packets, care-of address; then one object per confirmed return path
  (`lbproxy.core.returnpaths`): ``{"home": ..., "care_of": ..., "left": seconds or
  null}``; then one object per notification subscription (`lbproxy.notify.router`):
  ``{"peer": ..., "address": ..., "kind": "hoa"|"coa", "home": ... or null, "care_of":
  ... or null, "seq": 0..65535 or null, "left": seconds, "binding_left": seconds or
  null}`` (the header's ``"subscriptions": K``, 0 when absent); then one object per
  entry of the correspondent node's binding cache (`lbproxy.core.correspondent`):
  ``{"cache_home": ..., "care_of": ..., "seq": 0..65535, "left": seconds}`` (the
  header's ``"binding_cache": C``, 0 when absent); then a trailer ``{"sha256": HEX}``,
  the SHA-256 of every byte before it.
  Backends are saved by name so that a restart with a changed address or
  weight still finds them.  Return paths are saved because replies use them: without
  them a restart would send every confirmed terminal's replies towards its home
  address, without the Type 2 Routing Header, until its next notification.
  Subscriptions are saved for the same reason: without them a restarted balancer would
  not ask its peers about its terminals again until their next table miss, and their
  moves meanwhile would go unreported.  The binding cache is saved so that, in the
  correspondent's strict mode, a registered mobile node's packets are not answered with
  Binding Errors after a restart, and its sequence numbers still refuse a replayed
  Binding Update.  Each field is checked as strictly as a binding's
  when read; the notifier then checks what it restores as it checks what a peer says
  (known peer, acceptable addresses, entitlement, the registry's bound) and sends the
  subscriptions when its peers connect.
* The checksum makes damage detectable: a flipped bit, a truncated or spliced file is
  refused, never restored as different bindings.  Versions 1 and 2 (no trailer) are
  still read so that an upgrade keeps the table; version 1 files (no return-path lines;
  a ``confirmed`` flag on bindings) turn a confirmed home-address binding with a care-of
  address into a return path with the binding's lifetime.
* Writing is atomic: a temporary file ``<file>.tmp.<pid>`` in the same directory,
  flushed and fsynced, then ``os.replace`` over the old one.  A crash mid-write leaves
  the previous file intact; the temporary files of processes that no longer run are
  removed at the next start.  The file is mode 0600: it lists terminals.  The directory
  is created (mode 0700) when missing; an existing one is never changed.
* On restore each binding's lifetime is ``left - (now - saved_at)``: the time
  the balancer was down counts, so what would have expired stays expired.
  Bindings to backends that no longer exist are dropped and counted.
* A file that cannot be read is refused with one clear log line naming the file, the
  line and the reason, moved aside as ``<file>.corrupt-<T>`` for inspection, and the
  balancer starts with an empty table; nothing of it is restored.  That covers bad
  JSON, a wrong format, version, count or checksum, numbers JSON does not allow (NaN,
  Infinity), numbers out of range (a 400-digit ``left``), nesting too deep for the
  parser, a line longer than `MAX_LINE_BYTES`, and a file larger than ``max_bytes``
  (found from its size, before it is read; ``[persistence] max_bytes``, by default the
  larger of `DEFAULT_MAX_BYTES` and `max_bytes_for` ``max_entries``, what a full table
  needs).  It never crashes the service.  Saving a table that would exceed
  ``max_bytes`` is refused too (logged; the previous file stays), so what is saved can
  always be read back.

``saved_at`` and ``now`` are the table clock's seconds (``reactor.seconds()``,
wall-clock time, in production; a ``task.Clock`` in tests).
"""

from __future__ import annotations

import errno
import hashlib
import hmac
import ipaddress
import json
import math
import os
import stat
from collections.abc import Callable, Iterator, Mapping
from typing import TYPE_CHECKING, Any, Protocol

import attrs
from twisted.application.service import Service
from twisted.internet.task import LoopingCall
from twisted.logger import Logger

from lbproxy.preflight import make_private_directories
from lbproxy.tomlconfig import NAME

if TYPE_CHECKING:
    from twisted.internet.interfaces import IReactorTime

    from lbproxy.core.correspondent import Correspondent
    from lbproxy.core.keys import Key
    from lbproxy.core.returnpaths import ReturnPaths
    from lbproxy.core.selection import Backend
    from lbproxy.core.table import StickyTable

FORMAT = "lbproxy-table"
VERSION = 3
#: Versions `read` accepts.
READABLE_VERSIONS = (1, 2, 3)
#: Versions whose last line is the ``{"sha256": ...}`` trailer.
CHECKSUMMED_VERSIONS = (3,)
#: Bytes per table entry a file may need: a binding line (key, a backend name of up to
#: 63 characters, a care-of address, a 20-digit packet count: under 256 bytes) plus its
#: return path line (under 128).
BYTES_PER_ENTRY = 384
#: The header and the trailer, generously.
HEADER_BYTES = 4096
#: No line the writer makes comes near this; a longer one is damage.
MAX_LINE_BYTES = 1 << 16
#: Bounds on saved numbers: seconds left (about 31 years), the clock, packet counts.
MAX_LEFT = 1e9
MAX_SAVED_AT = 1e12
MAX_PACKETS = 2**64 - 1
#: Aliases one saved binding may list, and the length of one key's text.
MAX_ALIASES = 64
MAX_KEY_TEXT = 256


def max_bytes_for(max_entries: int) -> int:
    """The size a file of a full table of ``max_entries`` bindings (and as many return
    paths) stays under: the default and the least ``[persistence] max_bytes``."""
    return HEADER_BYTES + BYTES_PER_ENTRY * max_entries


#: ``max_bytes_for`` the default ``max_entries`` (1,000,000): 384,004,096 bytes.
DEFAULT_MAX_BYTES = max_bytes_for(1_000_000)

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
    #: The terminal's other identities (key texts) linked to this binding.
    aliases: tuple[str, ...] = ()

    def to_json(self) -> dict[str, Any]:
        """The JSON object of one line."""
        out: dict[str, Any] = {
            "key": self.key,
            "backend": self.backend,
            "left": round(self.left, 3),
            "packets": self.packets,
            "care_of": None
            if self.care_of is None
            else str(ipaddress.IPv6Address(self.care_of)),
        }
        if self.aliases:
            out["aliases"] = list(self.aliases)
        return out

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
        seconds = _number(left, "left", 0.0, MAX_LEFT)
        if not isinstance(packets, int) or isinstance(packets, bool) or \
                not 0 <= packets <= MAX_PACKETS:
            raise ValueError(f"packets must be an integer within 0..{MAX_PACKETS}")
        if not isinstance(confirmed, bool):
            raise ValueError("confirmed must be true or false")
        packed = None
        if care_of is not None:
            if not isinstance(care_of, str):
                raise ValueError("care_of must be an address")
            packed = _address(obj, "care_of")
        aliases = obj.get("aliases", [])
        if not isinstance(aliases, list) or len(aliases) > MAX_ALIASES or not all(
            isinstance(a, str) and len(a) <= MAX_KEY_TEXT for a in aliases
        ):
            raise ValueError(f"aliases must be a list of at most {MAX_ALIASES} key texts")
        return cls(key, backend, seconds, packets, packed, confirmed, tuple(aliases))


def _number(value: object, name: str, minimum: float, maximum: float) -> float:
    """``value`` as a finite float within ``minimum..maximum``; ``ValueError`` otherwise.

    Integers are compared before they are converted: a 400-digit one is out of range,
    not an ``OverflowError``.
    """
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ValueError(f"{name} must be a number")
    if isinstance(value, float) and not math.isfinite(value):
        raise ValueError(f"{name} must be a finite number")
    if not minimum <= value <= maximum:
        raise ValueError(f"{name} must be within {minimum:g}..{maximum:g}")
    return float(value)


def _address(obj: dict[str, Any], name: str) -> bytes:
    value = obj.get(name)
    if not isinstance(value, str) or len(value) > 64:
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
        seconds = None if left is None else _number(left, "left", 0.0, MAX_LEFT)
        return cls(_address(obj, "home"), _address(obj, "care_of"), seconds)


#: Subscription kinds (``lbproxy.notify.subscriptions.KINDS``) and the longest peer name
#: (a configured name, or ``terminal:`` and an IPv6 address for one that dialled in).
SUBSCRIPTION_KINDS = ("hoa", "coa")
MAX_PEER_NAME = 63


def _optional_address(obj: dict[str, Any], name: str) -> bytes | None:
    return None if obj.get(name) is None else _address(obj, name)


@attrs.frozen
class SavedSubscription:
    """One notification subscription as written to and read from the file."""

    peer: str
    address: bytes
    kind: str
    home: bytes | None
    care_of: bytes | None
    seq: int | None
    #: Seconds until the subscription would have been looked at for renewal.
    left: float
    #: Seconds the binding its peer last reported had left; None: none known.
    binding_left: float | None

    def to_json(self) -> dict[str, Any]:
        def text(address: bytes | None) -> str | None:
            return None if address is None else str(ipaddress.IPv6Address(address))

        return {
            "peer": self.peer,
            "address": text(self.address),
            "kind": self.kind,
            "home": text(self.home),
            "care_of": text(self.care_of),
            "seq": self.seq,
            "left": round(self.left, 3),
            "binding_left": None if self.binding_left is None else round(self.binding_left, 3),
        }

    @classmethod
    def from_json(cls, obj: object) -> SavedSubscription:
        """Parse one line's object; raise ``ValueError`` when it is not one."""
        if not isinstance(obj, dict) or "peer" not in obj:
            raise ValueError("not a subscription object")
        peer, kind, seq = obj.get("peer"), obj.get("kind"), obj.get("seq")
        if not isinstance(peer, str) or len(peer) > MAX_PEER_NAME or NAME.fullmatch(peer) is None:
            raise ValueError("peer must be a peer name")
        if kind not in SUBSCRIPTION_KINDS:
            raise ValueError(f"kind must be one of {', '.join(SUBSCRIPTION_KINDS)}")
        if seq is not None and (isinstance(seq, bool) or not isinstance(seq, int)
                                or not 0 <= seq <= 0xFFFF):  # fmt: skip
            raise ValueError("seq must be null or an integer within 0..65535")
        binding_left = obj.get("binding_left")
        if binding_left is not None:
            binding_left = _number(binding_left, "binding_left", 0.0, MAX_LEFT)
        return cls(
            peer,
            _address(obj, "address"),
            kind,
            _optional_address(obj, "home"),
            _optional_address(obj, "care_of"),
            seq,
            _number(obj.get("left"), "left", 0.0, MAX_LEFT),
            binding_left,
        )


@attrs.frozen
class SavedCacheEntry:
    """One entry of the correspondent node's binding cache, as written and read."""

    home: bytes
    care_of: bytes
    seq: int
    #: Seconds of lifetime the entry had left when saved.
    left: float

    def to_json(self) -> dict[str, Any]:
        return {
            "cache_home": str(ipaddress.IPv6Address(self.home)),
            "care_of": str(ipaddress.IPv6Address(self.care_of)),
            "seq": self.seq,
            "left": round(self.left, 3),
        }

    @classmethod
    def from_json(cls, obj: object) -> SavedCacheEntry:
        """Parse one line's object; raise ``ValueError`` when it is not one."""
        if not isinstance(obj, dict) or "cache_home" not in obj:
            raise ValueError("not a binding cache entry object")
        seq = obj.get("seq")
        if isinstance(seq, bool) or not isinstance(seq, int) or not 0 <= seq <= 0xFFFF:
            raise ValueError("seq must be an integer within 0..65535")
        return cls(_address(obj, "cache_home"), _address(obj, "care_of"), seq,
                   _number(obj.get("left"), "left", 0.0, MAX_LEFT))  # fmt: skip


class SubscriptionStore(Protocol):
    """What persistence needs of the notification service (``Notifier``)."""

    def saved_subscriptions(self) -> Iterator[Any]:
        """The subscriptions (``lbproxy.notify.subscriptions.Subscription``) to save."""

    def restore_subscription(
        self,
        peer: str,
        address: bytes,
        kind: str,
        home: bytes | None,
        care_of: bytes | None,
        seq: int | None,
        expires: float,
        binding_until: float | None,
    ) -> str | None:
        """Put one back; ``None`` when restored, else why not."""


@attrs.frozen
class SavedTable:
    """A whole file: when it was saved, its bindings, return paths and subscriptions."""

    saved_at: float
    bindings: list[SavedBinding]
    return_paths: list[SavedReturnPath]
    subscriptions: list[SavedSubscription] = attrs.Factory(list)
    binding_cache: list[SavedCacheEntry] = attrs.Factory(list)


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
    #: False when there was no file to restore from (a first start).
    found: bool = True
    #: Notification subscriptions restored, and those the notifier would not take back.
    subscriptions: int = 0
    subscriptions_dropped: int = 0
    #: Binding cache entries of the correspondent node live again.
    binding_cache: int = 0


def snapshot(table: StickyTable, now: float) -> list[SavedBinding]:
    """The live bindings of ``table`` as values, lifetimes relative to ``now`` (what an
    executor forwarded outside the table, the XDP program, folded in first)."""
    table.catch_up_all()
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
                aliases=_alias_texts(binding),
            )
        )
    return out


def _alias_texts(binding: object) -> tuple[str, ...]:
    """The text of each alias of `binding`, oldest first (none for a table without
    aliases)."""
    return tuple(str(k) for k in getattr(binding, "alias_keys", ()))


def snapshot_return_paths(return_paths: ReturnPaths, now: float) -> list[SavedReturnPath]:
    """The live confirmations of ``return_paths``, lifetimes relative to ``now``."""
    return [SavedReturnPath(home, care_of, left)
            for home, care_of, left in return_paths.items(now)]  # fmt: skip


def snapshot_subscriptions(store: SubscriptionStore, now: float) -> list[SavedSubscription]:
    """The notifier's subscriptions as values, times relative to ``now``."""
    out = []
    for sub in store.saved_subscriptions():
        until = sub.binding_until
        out.append(SavedSubscription(
            sub.peer, bytes(sub.address), sub.kind, sub.home, sub.care_of, sub.seq,
            min(MAX_LEFT, max(0.0, sub.expires - now)),
            None if until is None or until <= now else min(MAX_LEFT, until - now),
        ))
    return out


def snapshot_cache(correspondent: Correspondent, now: float) -> list[SavedCacheEntry]:
    """The correspondent node's live binding cache entries, lifetimes relative to ``now``."""
    return [SavedCacheEntry(e.home, e.care_of, e.seq, min(MAX_LEFT, e.expires - now))
            for e in correspondent.entries() if e.expires > now]  # fmt: skip


def _lines(
    saved: list[SavedBinding],
    paths: list[SavedReturnPath],
    now: float,
    subscriptions: list[SavedSubscription] | None = None,
    cache: list[SavedCacheEntry] | None = None,
) -> Iterator[bytes]:
    """The file's lines, each ending in a newline, the checksum trailer last."""
    subs = subscriptions or []
    header = {"format": FORMAT, "version": VERSION, "saved_at": now, "count": len(saved),
              "return_paths": len(paths)}  # fmt: skip
    if subs:
        header["subscriptions"] = len(subs)
    if cache:
        header["binding_cache"] = len(cache)
    digest = hashlib.sha256()
    for obj in _objects(header, saved, paths, subs, cache or []):
        line = json.dumps(obj, separators=(",", ":"), allow_nan=False).encode() + b"\n"
        digest.update(line)
        yield line
    yield json.dumps({"sha256": digest.hexdigest()}).encode() + b"\n"


def _objects(
    header: dict[str, Any],
    saved: list[SavedBinding],
    paths: list[SavedReturnPath],
    subscriptions: list[SavedSubscription],
    cache: list[SavedCacheEntry],
) -> Iterator[dict[str, Any]]:
    yield header
    for entry in saved:
        yield entry.to_json()
    for path in paths:
        yield path.to_json()
    for sub in subscriptions:
        yield sub.to_json()
    for cached in cache:
        yield cached.to_json()


def save(
    table: StickyTable,
    path: str,
    now: float,
    return_paths: ReturnPaths | None = None,
    max_bytes: int = DEFAULT_MAX_BYTES,
    subscriptions: SubscriptionStore | None = None,
    correspondent: Correspondent | None = None,
) -> int:
    """Write ``table`` (and ``return_paths``, the notifier's ``subscriptions``, the
    ``correspondent`` node's binding cache) to ``path`` atomically; return the number of
    bindings saved.

    Raises ``OSError`` when it cannot, also when the file would exceed ``max_bytes``
    (``EFBIG``: it could not be read back); the previous file then stays as it was.
    """
    saved = snapshot(table, now)
    paths = [] if return_paths is None else snapshot_return_paths(return_paths, now)
    subs = [] if subscriptions is None else snapshot_subscriptions(subscriptions, now)
    cache = [] if correspondent is None else snapshot_cache(correspondent, now)
    directory = os.path.dirname(os.path.abspath(path))
    temporary = f"{path}.tmp.{os.getpid()}"
    fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        with os.fdopen(fd, "wb") as handle:
            size = 0
            for line in _lines(saved, paths, now, subs, cache):
                size += len(line)
                if size > max_bytes:
                    raise OSError(
                        errno.EFBIG,
                        f"the table needs more than max_bytes ({max_bytes}) bytes; "
                        "raise [persistence] max_bytes",
                    )
                handle.write(line)
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


def read(path: str, max_bytes: int = DEFAULT_MAX_BYTES) -> tuple[float, list[SavedBinding]]:
    """Read a saved table: ``(saved_at, bindings)``; raise ``CorruptTableFile``."""
    table = read_table(path, max_bytes)
    return table.saved_at, table.bindings


def _refuse_constant(name: str) -> Any:
    raise ValueError(f"{name} is not a number JSON allows")


class _LineReader:
    """A file's lines as JSON values, bounded in length and in total, with the SHA-256
    of what was read so far."""

    def __init__(self, path: str, handle: Any, max_bytes: int) -> None:
        self.path = path
        self.handle = handle
        self.max_bytes = max_bytes
        self.total = 0
        self.number = 0
        self.digest = hashlib.sha256()
        self.last = b""

    def next(self, what: str) -> object:
        """The next line's value; ``CorruptTableFile`` at the end of the file or for a
        line that is not JSON (``what`` names the line in the message)."""
        raw = self.handle.readline(MAX_LINE_BYTES + 1)
        self.number += 1
        where = f"{self.path}:{self.number}"
        if not raw:
            raise EOFError(where)
        if len(raw) > MAX_LINE_BYTES:
            raise CorruptTableFile(f"{where}: line longer than {MAX_LINE_BYTES} bytes")
        self.total += len(raw)
        if self.total > self.max_bytes:
            raise CorruptTableFile(f"{self.path}: more than max_bytes ({self.max_bytes}) "
                                   "bytes")  # fmt: skip
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise CorruptTableFile(f"{where}: not UTF-8 text ({exc.reason})") from None
        try:
            value = json.loads(text, parse_constant=_refuse_constant)
        except RecursionError:
            raise CorruptTableFile(f"{where}: {what} is nested too deeply") from None
        except ValueError as exc:
            raise CorruptTableFile(f"{where}: {what} is not JSON ({exc})") from None
        self.last = raw
        return value

    def hash_last(self) -> None:
        self.digest.update(self.last)

    def at_end(self) -> bool:
        return not self.handle.read(1)


def _count(header: dict[str, Any], name: str, default: int | None) -> int:
    value = header.get(name, default)
    if not isinstance(value, int) or isinstance(value, bool) or not 0 <= value <= 2**40:
        raise ValueError(f"{name} must be a count")
    return value


def read_table(path: str, max_bytes: int = DEFAULT_MAX_BYTES) -> SavedTable:
    """Read a saved table with its return paths; raise ``CorruptTableFile`` (naming the
    file, the line and the reason) for anything but a whole, undamaged file."""
    try:
        handle = open(path, "rb")  # noqa: SIM115 - closed below, after fstat
    except (OSError, ValueError) as exc:
        reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
        raise CorruptTableFile(f"{path}: cannot be opened ({reason})") from None
    with handle:
        info = os.fstat(handle.fileno())
        if not stat.S_ISREG(info.st_mode):
            raise CorruptTableFile(f"{path}: not a regular file")
        if info.st_size > max_bytes:
            raise CorruptTableFile(
                f"{path}: {info.st_size} bytes, more than max_bytes ({max_bytes}); not read "
                "(raise [persistence] max_bytes if the table really is that large)"
            )
        if info.st_size == 0:
            raise CorruptTableFile(f"{path}: empty file, no header")
        try:
            return _read_lines(path, _LineReader(path, handle, max_bytes))
        except EOFError as exc:
            raise CorruptTableFile(f"{exc}: the file ends early (truncated?)") from None
        except OSError as exc:
            raise CorruptTableFile(f"{path}: cannot be read ({exc.strerror})") from None


def _read_lines(path: str, lines: _LineReader) -> SavedTable:
    header = lines.next("header")
    lines.hash_last()
    if not isinstance(header, dict) or header.get("format") != FORMAT:
        raise CorruptTableFile(f"{path}:1: not an lbproxy table file")
    version = header.get("version")
    if isinstance(version, bool) or version not in READABLE_VERSIONS:
        raise CorruptTableFile(
            f"{path}:1: version {version!r:.20} not supported (want one of "
            f"{READABLE_VERSIONS})"
        )
    try:
        saved_at = _number(header.get("saved_at"), "saved_at", 0.0, MAX_SAVED_AT)
        count = _count(header, "count", None)
        paths_count = _count(header, "return_paths", 0)
        subs_count = _count(header, "subscriptions", 0)
        cache_count = _count(header, "binding_cache", 0)
    except ValueError as exc:
        raise CorruptTableFile(f"{path}:1: header: {exc}") from None
    entries = []
    paths = []
    subs = []
    cache = []
    try:
        for _ in range(count):
            entries.append(SavedBinding.from_json(lines.next("binding")))
            lines.hash_last()
        for _ in range(paths_count):
            paths.append(SavedReturnPath.from_json(lines.next("return path")))
            lines.hash_last()
        for _ in range(subs_count):
            subs.append(SavedSubscription.from_json(lines.next("subscription")))
            lines.hash_last()
        for _ in range(cache_count):
            cache.append(SavedCacheEntry.from_json(lines.next("binding cache entry")))
            lines.hash_last()
    except EOFError:
        also = f", {subs_count} subscriptions" if subs_count else ""
        also += f", {cache_count} binding cache entries" if cache_count else ""
        raise CorruptTableFile(
            f"{path}: header says {count} bindings and {paths_count} return paths{also}, "
            f"the file ends after {lines.number - 2} (truncated?)"
        ) from None
    except ValueError as exc:
        if isinstance(exc, CorruptTableFile):
            raise
        raise CorruptTableFile(f"{path}:{lines.number}: {exc}") from None
    if version in CHECKSUMMED_VERSIONS:
        try:
            trailer = lines.next("checksum")
        except EOFError:
            raise CorruptTableFile(f"{path}: no checksum line (truncated?)") from None
        expected = lines.digest.hexdigest()
        if not isinstance(trailer, dict) or set(trailer) != {"sha256"} or \
                not isinstance(trailer["sha256"], str):
            raise CorruptTableFile(f"{path}:{lines.number}: not a checksum line (or more "
                                   "lines than the header says)")  # fmt: skip
        if not hmac.compare_digest(trailer["sha256"], expected):
            raise CorruptTableFile(f"{path}: checksum mismatch: the file was changed or "
                                   "damaged after it was written")  # fmt: skip
    if not lines.at_end():
        raise CorruptTableFile(f"{path}: more lines than the header says")
    if version == 1:
        paths = [
            SavedReturnPath(_v1_home(e.key), e.care_of, e.left)
            for e in entries
            if e.confirmed and e.care_of is not None and _v1_home(e.key)
        ]
    return SavedTable(saved_at, entries, paths, subs, cache)


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
        except Exception:  # a key text no strategy reads (a plugin's parser may raise anything)
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
        for text in entry.aliases:
            try:
                table.link(binding, parse_key(text), now)
            except Exception:  # a key text no strategy reads: the alias is re-learnt
                refused += 1
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


def restore_cache(
    correspondent: Correspondent, saved_at: float, saved: list[SavedCacheEntry], now: float
) -> int:
    """Put saved binding cache entries back (the downtime counts against their
    lifetimes, none longer than the node grants, none past its bound); returns how many
    are live again."""
    elapsed = max(0.0, now - saved_at)
    restored = 0
    for entry in saved:
        left = min(entry.left - elapsed, correspondent.max_lifetime)
        if left <= 0 or (correspondent.entry(entry.home) is None
                         and len(correspondent) >= correspondent.max_entries):  # fmt: skip
            continue
        correspondent.register(entry.home, entry.care_of, entry.seq, left)
        restored += 1
    return restored


def restore_subscriptions(
    store: SubscriptionStore, saved_at: float, saved: list[SavedSubscription], now: float
) -> tuple[int, int]:
    """Hand saved subscriptions back to the notifier (the downtime counts against their
    times); returns (restored, dropped).  The notifier checks each as it checks what a
    peer says and logs nothing per entry: the counts are logged once."""
    elapsed = max(0.0, now - saved_at)
    restored = dropped = 0
    for entry in saved:
        left = entry.binding_left
        until = None if left is None or left - elapsed <= 0 else now + left - elapsed
        why = store.restore_subscription(
            entry.peer, entry.address, entry.kind, entry.home, entry.care_of, entry.seq,
            now + max(0.0, entry.left - elapsed), until,
        )
        if why is None:
            restored += 1
        else:
            dropped += 1
    return restored, dropped


def load(
    table: StickyTable,
    path: str,
    backends: Mapping[str, Backend],
    now: float,
    parse_key: Callable[[str], Key] | None = None,
    return_paths: ReturnPaths | None = None,
    max_bytes: int = DEFAULT_MAX_BYTES,
    subscriptions: SubscriptionStore | None = None,
    correspondent: Correspondent | None = None,
) -> RestoreResult:
    """Restore ``table`` from ``path`` if it exists, refusing a corrupt file.

    A corrupt file is renamed to ``<path>.corrupt-<now>`` and the table is left empty
    (nothing of the file is restored); the result's ``error`` says why.  Something that
    is not a regular file is left where it is.  No file: ``found`` is false.  Never
    raises for a bad file.
    """
    try:
        info = os.stat(path)
    except FileNotFoundError:
        return RestoreResult(found=False)
    except (OSError, ValueError) as exc:
        reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
        return RestoreResult(error=f"{path}: cannot be read ({reason})")
    if not stat.S_ISREG(info.st_mode):
        return RestoreResult(error=f"{path}: not a regular file (left where it is)")
    try:
        saved = read_table(path, max_bytes)
    except CorruptTableFile as exc:
        aside = f"{path}.corrupt-{int(now)}"
        try:
            os.replace(path, aside)
        except OSError:
            return RestoreResult(error=str(exc))
        return RestoreResult(error=str(exc), moved_to=aside)
    result = restore(table, backends, saved.saved_at, saved.bindings, now, parse_key)
    if return_paths is not None:
        restored = restore_return_paths(return_paths, saved.saved_at, saved.return_paths, now)
        result = attrs.evolve(result, return_paths=restored)
    if subscriptions is not None:
        subs, dropped = restore_subscriptions(subscriptions, saved.saved_at,
                                              saved.subscriptions, now)  # fmt: skip
        result = attrs.evolve(result, subscriptions=subs, subscriptions_dropped=dropped)
    if correspondent is not None:
        cached = restore_cache(correspondent, saved.saved_at, saved.binding_cache, now)
        result = attrs.evolve(result, binding_cache=cached)
    return result


def remove_orphans(path: str) -> tuple[int, int]:
    """Remove the temporary files ``<path>.tmp.<pid>`` of processes that no longer run
    (a save killed half-way); return how many and their bytes.  A live process's is
    kept: it may be writing it."""
    directory = os.path.dirname(os.path.abspath(path))
    prefix = os.path.basename(path) + ".tmp."
    removed = size = 0
    try:
        names = os.listdir(directory)
    except OSError:
        return 0, 0
    for name in names:
        pid_text = name[len(prefix):]
        if not name.startswith(prefix) or not pid_text.isdigit() or len(pid_text) > 10:
            continue
        pid = int(pid_text)
        if pid != os.getpid() and _alive(pid):
            continue
        full = os.path.join(directory, name)
        try:
            info = os.lstat(full)
            if not stat.S_ISREG(info.st_mode):
                continue
            os.unlink(full)
        except OSError:
            continue
        removed += 1
        size += info.st_size
    return removed, size


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OverflowError, ValueError):
        return True  # another user's process, or not a pid we can ask about
    return True


class TablePersistence(Service):
    """Restore the table on start, save it every ``interval`` seconds and on stop.

    Add it to the service tree *before* the packet reader so the table is
    restored before the first packet is looked up.  Nothing a file holds stops the
    service: a bad file is logged in one line and set aside.
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
        max_bytes: int = DEFAULT_MAX_BYTES,
        subscriptions: Callable[[], SubscriptionStore | None] | None = None,
        correspondent: Correspondent | None = None,
    ) -> None:
        self.parse_key = parse_key
        #: The correspondent node whose binding cache is saved too (None: off).
        self.correspondent = correspondent
        self.return_paths = return_paths
        #: The notifier, asked for when needed (it may be made after this service).
        self.subscriptions = subscriptions
        self.table = table
        self.path = path
        self.backends = backends
        self.clock = clock
        self.interval = interval
        self.max_bytes = max_bytes
        self.last_restore: RestoreResult | None = None
        self._loop: LoopingCall | None = None

    def startService(self) -> None:
        """Prepare the directory, restore, then start the periodic save."""
        super().startService()
        self._prepare()
        try:
            result = load(
                self.table, self.path, self.backends(), self.clock.seconds(), self.parse_key,
                self.return_paths, self.max_bytes, self._store(), self.correspondent,
            )
        except Exception:  # a bug, not a file: keep running with what there is
            log.failure("Restoring the saved table from {path} failed", path=self.path)
            result = RestoreResult(error="restore failed (see the traceback above)")
        self.last_restore = result
        if not result.found:
            log.info("No saved table at {path} yet; starting with an empty table.",
                     path=self.path)  # fmt: skip
        elif result.error is not None:
            log.error(
                "Refused the saved table ({error}); starting with an empty table. "
                "{aside}",
                error=result.error,
                aside="The file was kept aside as " + result.moved_to + "."
                if result.moved_to else "The file could not be moved aside.",
            )
        else:
            log.info(
                "Restored {restored} bindings and {paths} return paths from {path} "
                "({expired} expired, {unknown} for unknown backends, {refused} refused)"
                "{subs}.",
                restored=result.restored,
                paths=result.return_paths,
                path=self.path,
                expired=result.expired,
                unknown=result.unknown_backend,
                refused=result.refused,
                subs=("" if self._store() is None else
                      f"; {result.subscriptions} notification subscriptions "
                      f"({result.subscriptions_dropped} not taken back)")
                + ("" if self.correspondent is None else
                   f"; {result.binding_cache} binding cache entries"),
            )
        if self.interval > 0:
            self._loop = LoopingCall(self.save)
            self._loop.clock = self.clock
            self._loop.start(self.interval, now=False).addErrback(
                lambda f: log.failure("Periodic table save stopped", f)
            )

    def _prepare(self) -> None:
        """Create the directory when missing (0700) and remove orphan temporary files."""
        directory = os.path.dirname(os.path.abspath(self.path))
        try:
            created = make_private_directories(directory)
        except OSError as exc:
            log.error("Cannot create {directory} for the saved table: {reason}",
                      directory=directory, reason=exc.strerror or exc)  # fmt: skip
            return
        if created:
            log.info("Created {directory} (mode 0700) for the saved table.",
                     directory=created[0])  # fmt: skip
        removed, size = remove_orphans(self.path)
        if removed:
            log.info("Removed {count} temporary files ({size} bytes) that interrupted saves "
                     "left next to {path}.", count=removed, size=size, path=self.path)

    def _store(self) -> SubscriptionStore | None:
        return None if self.subscriptions is None else self.subscriptions()

    def save(self) -> int:
        """Save now; log and swallow I/O errors (the next save will retry)."""
        try:
            return save(self.table, self.path, self.clock.seconds(), self.return_paths,
                        self.max_bytes, self._store(), self.correspondent)  # fmt: skip
        except OSError as exc:
            log.error("Could not save the table to {path}: {exc}", path=self.path,
                      exc=exc.strerror or exc)  # fmt: skip
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
    max_bytes: int = DEFAULT_MAX_BYTES,
    subscriptions: Callable[[], SubscriptionStore | None] | None = None,
) -> TablePersistence:
    """The service that keeps ``table`` (and ``return_paths``, and the subscriptions of
    the notifier ``subscriptions()`` returns) in ``path`` across restarts; files larger
    than ``max_bytes`` are neither read nor written."""
    return TablePersistence(table, path, backends, clock, interval, return_paths=return_paths,
                            max_bytes=max_bytes, subscriptions=subscriptions)  # fmt: skip
