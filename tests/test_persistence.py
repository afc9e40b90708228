"""lbproxy.ops.persistence: the table survives a restart, expired bindings stay expired."""

from __future__ import annotations

import ipaddress
import json
import os
from typing import Any

from twisted.internet.task import Clock
from twisted.logger import ILogObserver, formatEvent
from twisted.trial.unittest import SynchronousTestCase
from zope.interface import implementer

from lbproxy.core.returnpaths import ReturnPaths
from lbproxy.ops import persistence
from lbproxy.ops.persistence import CorruptTableFile, TablePersistence
from tests.operating_fakes import BACKENDS, Backend, Key, StickyTable

B1, B2 = BACKENDS
HOME = ipaddress.IPv6Address("2001:db8:1::1").packed
OTHER_HOME = ipaddress.IPv6Address("2001:db8:1::2").packed
CARE_OF = ipaddress.IPv6Address("2001:db8:aa::1").packed
# Typed Any: the fakes stand in for lbproxy.core.keys/table/selection types.
BY_NAME: Any = {b.name: b for b in BACKENDS}
PARSE_KEY: Any = Key.parse


def new_table(clock: Clock, lifetime: float = 100.0, max_entries: int = 10) -> Any:
    return StickyTable(clock, lifetime, max_entries)


def key(text: str) -> Key:
    return Key.parse(text)


def filled(clock: Clock) -> Any:
    """A table (lifetime 100 s) with bindings of different ages."""
    table = new_table(clock, 100.0, 100)
    first = table.insert(key("hoa 2001:db8:1::1"), B1)
    assert first is not None
    first.packets = 5
    first.care_of = ipaddress.IPv6Address("2001:db8:aa::1").packed
    clock.advance(60)
    table.insert(key("src 2001:db8:2::2"), B2)  # expires at 160, the first at 100
    table.insert(key("spi 0x000000da"), B1)
    return table


class RoundTripTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.path = os.path.join(self.mktemp() + "-dir", "table.jsonl")
        os.makedirs(os.path.dirname(self.path))

    def test_round_trip_keeps_everything(self) -> None:
        """Keys, backends, packets, care-of, return paths and time left survive save +
        load."""
        clock = Clock()
        table = filled(clock)
        paths = ReturnPaths(clock, 10)
        paths.confirm(HOME, CARE_OF, lifetime=50.0)  # ends at 110
        paths.confirm(OTHER_HOME, CARE_OF, lifetime=None)
        self.assertEqual(persistence.save(table, self.path, clock.seconds(), paths), 3)
        self.assertEqual(os.stat(self.path).st_mode & 0o777, 0o600)
        restarted = Clock()
        restarted.advance(clock.seconds() + 10)  # down for 10 s
        fresh = new_table(restarted, 100.0, 100)
        fresh_paths = ReturnPaths(restarted, 10)
        result = persistence.load(
            fresh, self.path, BY_NAME, restarted.seconds(), PARSE_KEY, fresh_paths
        )
        self.assertEqual((result.restored, result.expired, result.error), (3, 0, None))
        self.assertEqual(result.return_paths, 2)
        # Saved at 60 with 50 s left; restored at 70: 40 s left.  No deadline stays none.
        self.assertEqual(sorted(fresh_paths.items()),
                         sorted([(HOME, CARE_OF, 40.0), (OTHER_HOME, CARE_OF, None)]))
        first = fresh.get(key("hoa 2001:db8:1::1"))
        assert first is not None
        self.assertEqual(first.backend, B1)
        self.assertEqual(first.packets, 5)
        self.assertEqual(first.care_of, ipaddress.IPv6Address("2001:db8:aa::1").packed)
        # Saved at 60 with 40 s left; restored at 70: 30 s left.
        self.assertAlmostEqual(first.expires - restarted.seconds(), 30.0)
        second = fresh.get(key("src 2001:db8:2::2"))
        assert second is not None
        self.assertEqual(second.backend, B2)
        self.assertAlmostEqual(second.expires - restarted.seconds(), 90.0)

    def test_version_1_confirmations_become_return_paths(self) -> None:
        """A file of the previous format (a ``confirmed`` flag on bindings, no return-path
        lines) is read: a confirmed home-address binding becomes a return path with the
        binding's remaining lifetime; a confirmed flag on another kind is not one."""
        lines = [
            {"format": "lbproxy-table", "version": 1, "saved_at": 10.0, "count": 2},
            {"key": "hoa 2001:db8:1::1", "backend": "b1", "left": 30.0, "packets": 2,
             "care_of": "2001:db8:aa::1", "confirmed": True},
            {"key": "src 2001:db8:aa::7", "backend": "b2", "left": 30.0, "packets": 2,
             "care_of": "2001:db8:aa::7", "confirmed": True},
        ]
        with open(self.path, "w") as handle:
            handle.writelines(json.dumps(line) + "\n" for line in lines)
        clock = Clock()
        clock.advance(20)
        paths = ReturnPaths(clock, 10)
        result = persistence.load(
            new_table(clock, 100.0, 10), self.path, BY_NAME, clock.seconds(), PARSE_KEY, paths
        )
        self.assertEqual((result.restored, result.return_paths, result.error), (2, 1, None))
        self.assertEqual(list(paths.items()), [(HOME, CARE_OF, 20.0)])

    def test_return_path_lines_are_checked(self) -> None:
        """A return-path line that is not one, or a count that does not match, refuses the
        file (set aside), as a bad binding line does."""
        clock = Clock()
        paths = ReturnPaths(clock, 10)
        paths.confirm(HOME, CARE_OF, lifetime=50.0)
        persistence.save(filled(clock), self.path, clock.seconds(), paths)
        with open(self.path) as handle:
            good = handle.read().splitlines()
        for bad in (
            good[:-1],  # the return path cut off
            [*good[:-1], '{"home": "2001:db8:1::1", "care_of": "ff02::1x", "left": 1}'],
            [*good[:-1], '{"home": "2001:db8:1::1", "care_of": "2001:db8::1", "left": "x"}'],
            [*good[:-1], "[]"],
        ):
            with open(self.path, "w") as handle:
                handle.write("\n".join(bad) + "\n")
            self.assertRaises(CorruptTableFile, persistence.read_table, self.path)
            fresh = ReturnPaths(clock, 10)
            result = persistence.load(new_table(clock), self.path, BY_NAME, clock.seconds(),
                                      PARSE_KEY, fresh)  # fmt: skip
            self.assertIsNotNone(result.error)
            self.assertEqual(len(fresh), 0)

    def test_expired_stay_expired(self) -> None:
        """Bindings whose lifetime ran out while the balancer was down are not restored."""
        clock = Clock()
        persistence.save(filled(clock), self.path, clock.seconds())
        later = Clock()
        later.advance(clock.seconds() + 50)  # the first binding had 40 s left
        fresh = new_table(later, 100.0, 100)
        result = persistence.load(
            fresh, self.path, BY_NAME, later.seconds(), PARSE_KEY
        )
        self.assertEqual((result.restored, result.expired), (2, 1))
        self.assertNotIn(key("hoa 2001:db8:1::1"), fresh)
        self.assertIn(key("src 2001:db8:2::2"), fresh)

    def test_unknown_backends_are_dropped(self) -> None:
        """A binding to a backend removed from the configuration is not restored."""
        clock = Clock()
        persistence.save(filled(clock), self.path, clock.seconds())
        fresh = new_table(clock, 100.0, 100)
        renamed: Any = {"b2": B2, "b3": Backend("b3", B1.address)}
        result = persistence.load(
            fresh, self.path, renamed, clock.seconds(), PARSE_KEY
        )
        self.assertEqual((result.restored, result.unknown_backend), (1, 2))

    def test_full_table_refuses(self) -> None:
        """When the new table is smaller, the excess is counted as refused, not an error."""
        clock = Clock()
        persistence.save(filled(clock), self.path, clock.seconds())
        small = new_table(clock, 100.0, 2)
        result = persistence.load(
            small, self.path, BY_NAME, clock.seconds(), PARSE_KEY
        )
        self.assertEqual((result.restored, result.refused), (2, 1))

    def test_missing_file_is_an_empty_start(self) -> None:
        """No file: nothing restored, no error, and the result says there was none."""
        clock = Clock()
        table = new_table(clock, 100.0, 10)
        result = persistence.load(table, self.path, BY_NAME, 0.0)
        self.assertEqual(result, persistence.RestoreResult(found=False))

    def test_save_is_atomic(self) -> None:
        """A failing save leaves the previous file intact and no temporary file behind."""
        clock = Clock()
        table = filled(clock)
        persistence.save(table, self.path, clock.seconds())
        with open(self.path) as handle:
            before = handle.read()

        class Exploding(StickyTable):
            def __iter__(self) -> Any:
                raise OSError("disk on fire")

        broken: Any = Exploding(clock, 100.0, 10)
        self.assertRaises(OSError, persistence.save, broken, self.path, clock.seconds())
        with open(self.path) as handle:
            self.assertEqual(handle.read(), before)
        self.assertEqual(os.listdir(os.path.dirname(self.path)), ["table.jsonl"])


class CorruptFileTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.path = os.path.join(self.mktemp() + "-dir", "table.jsonl")
        os.makedirs(os.path.dirname(self.path))

    def write(self, text: str | bytes) -> None:
        with open(self.path, "wb") as handle:
            handle.write(text if isinstance(text, bytes) else text.encode())

    def header(self, **fields: object) -> str:
        base = {"format": "lbproxy-table", "version": 1, "saved_at": 0.0, "count": 0}
        base.update(fields)
        return json.dumps(base) + "\n"

    def test_corrupt_files_are_refused_with_a_reason(self) -> None:
        """Each kind of damage gives CorruptTableFile naming the file and what is wrong."""
        line = '{"key": "src 2001:db8::1", "backend": "b1", "left": 5}\n'
        cases: dict[str | bytes, str] = {
            "": "empty",
            "{not json\n": "not JSON",
            '{"format": "other"}\n': "not an lbproxy table",
            self.header(version=99): "version 99",
            self.header(count=2) + line: "truncated",
            self.header(count=1) + "[1, 2]\n": ":2:",
            self.header(count=1) + line.replace("5", '"soon"'): "left must be a number",
            b"\xff\xfe": "UTF-8",
        }
        for text, reason in cases.items():
            self.write(text)
            error = self.assertRaises(CorruptTableFile, persistence.read, self.path)
            self.assertIn(reason, str(error), text)
            self.assertIn(self.path, str(error))

    def test_corrupt_file_is_moved_aside_and_table_starts_empty(self) -> None:
        """load() does not raise: it reports the error and keeps the bad file aside."""
        self.write("garbage\n")
        clock = Clock()
        clock.advance(1234)
        table = new_table(clock, 100.0, 10)
        result = persistence.load(table, self.path, BY_NAME, clock.seconds())
        self.assertIsNotNone(result.error)
        self.assertEqual(len(table), 0)
        self.assertFalse(os.path.exists(self.path))
        self.assertEqual(result.moved_to, self.path + ".corrupt-1234")
        with open(self.path + ".corrupt-1234") as handle:
            self.assertEqual(handle.read(), "garbage\n")


class ServiceTests(SynchronousTestCase):
    def test_restart_keeps_bindings(self) -> None:
        """Start restores, the periodic save runs on the clock, stop saves; a new service
        on a new table restores what the first had, minus the downtime."""
        path = self.mktemp()
        clock = Clock()
        table = new_table(clock, 100.0, 10)
        service = TablePersistence(
            table, path, lambda: BY_NAME, clock, interval=30.0, parse_key=PARSE_KEY
        )
        service.startService()
        self.assertEqual(service.last_restore, persistence.RestoreResult(found=False))
        table.insert(key("hoa 2001:db8:1::1"), B2)
        self.assertFalse(os.path.exists(path))
        clock.advance(30)  # periodic save
        self.assertEqual(persistence.read(path)[1][0].backend, "b2")
        clock.advance(5)
        service.stopService()
        self.assertEqual(clock.getDelayedCalls(), [])
        saved_at, entries = persistence.read(path)
        self.assertEqual(saved_at, 35.0)
        self.assertAlmostEqual(entries[0].left, 65.0)

        clock.advance(20)  # the restart takes 20 s
        table2 = new_table(clock, 100.0, 10)
        second = TablePersistence(
            table2, path, lambda: BY_NAME, clock, interval=30.0, parse_key=PARSE_KEY
        )
        second.startService()
        restored = table2.get(key("hoa 2001:db8:1::1"))
        assert restored is not None
        self.assertEqual(restored.backend, B2)
        self.assertAlmostEqual(restored.expires - clock.seconds(), 45.0)
        second.stopService()

    def test_corrupt_file_does_not_stop_the_service(self) -> None:
        """A bad file is logged and set aside; the service runs with an empty table."""
        path = self.mktemp()
        with open(path, "w") as handle:
            handle.write("nonsense")
        clock = Clock()
        table = new_table(clock, 100.0, 10)
        service = TablePersistence(table, path, lambda: BY_NAME, clock, interval=0)
        service.startService()
        assert service.last_restore is not None
        self.assertIn("not JSON", service.last_restore.error or "")
        self.assertTrue(service.running)
        errors = self.flushLoggedErrors()
        self.assertEqual(errors, [])
        service.stopService()
        self.assertEqual(persistence.read(path)[1], [])


class RealTableTests(SynchronousTestCase):
    """The same round trip through lbproxy.core.table.StickyTable and lbproxy.core.keys.Key."""

    def test_restore_into_the_real_table(self) -> None:
        """Bindings come back with their backend, lifetime left and state; an entry that
        had seen several packets comes back established (not evictable by a flood)."""
        from lbproxy.core.keys import Key as RealKey
        from lbproxy.core.selection import Backend as RealBackend
        from lbproxy.core.table import StickyTable as RealTable

        b1 = RealBackend("b1", "2001:db8:100::1")
        b2 = RealBackend("b2", "2001:db8:100::2")
        clock = Clock()
        table = RealTable(clock, lifetime=100.0, max_entries=4)
        busy = RealKey.parse("hoa 2001:db8:1::1")
        table.insert(busy, b1)
        while table.get(busy).packets < table.frequent:  # type: ignore[union-attr]
            table.lookup(busy)  # a busy terminal: frequent enough to outlast a flood
        clock.advance(50)
        table.insert(RealKey.parse("iid 0211:22ff:fe33:4455"), b2)
        path = self.mktemp()
        self.assertEqual(persistence.save(table, path, clock.seconds()), 2)

        clock.advance(30)
        fresh = RealTable(clock, lifetime=100.0, max_entries=4)
        result = persistence.load(fresh, path, {"b1": b1, "b2": b2}, clock.seconds())
        self.assertEqual((result.restored, result.expired, result.error), (2, 0, None))
        restored = fresh.get(busy)
        assert restored is not None
        self.assertEqual((restored.backend, restored.packets), (b1, fresh.frequent))
        self.assertTrue(restored.established)
        self.assertAlmostEqual(restored.expires - clock.seconds(), 20.0, places=1)
        for n in range(10):  # a flood of one-packet identities
            fresh.insert(RealKey.parse(f"src 2001:db8:66::{n + 1:x}"), b2)
        self.assertIsNotNone(fresh.get(busy))  # established: never evicted by the flood
        clock.advance(21)
        self.assertIsNone(fresh.get(busy))  # expired on time, not a full lifetime later


# -- bad input never stops the service (issue 14) ----------------------------------------

GOOD_LINE = {"key": "hoa 2001:db8:1::1", "backend": "b1", "left": 30.0, "packets": 5,
             "care_of": "2001:db8:aa::1"}  # fmt: skip


def file_text(header: dict[str, Any] | None = None, lines: list[str] | None = None,
              trailer: str | None = None) -> bytes:
    """A version 3 file whose checksum is right (so that what is checked is the rest),
    unless ``trailer`` replaces the checksum line."""
    import hashlib

    body = [json.dumps(GOOD_LINE)] if lines is None else lines
    head = {"format": "lbproxy-table", "version": 3, "saved_at": 100.0, "count": len(body),
            "return_paths": 0}  # fmt: skip
    head.update(header or {})
    data = "".join(line + "\n" for line in [json.dumps(head), *body]).encode()
    if trailer is None:
        trailer = json.dumps({"sha256": hashlib.sha256(data).hexdigest()})
    return data + trailer.encode() + b"\n"


@implementer(ILogObserver)
class LineObserver:
    """Keeps each log event as its formatted line."""

    def __init__(self, lines: list[str]) -> None:
        self.lines = lines

    def __call__(self, event: dict[str, Any]) -> None:
        self.lines.append(formatEvent(event))


def nested(depth: int) -> str:
    return "[" * depth + "]" * depth


#: (name, file contents, what the log line says).  Every file is refused whole and set
#: aside; the service runs on with an empty table.
CRAFTED: list[tuple[str, bytes, str]] = [
    ("empty", b"", "empty file"),
    ("header-not-json", b"{not json\n", "header is not JSON"),
    ("other-format", file_text({"format": "other"}), "not an lbproxy table file"),
    ("version-99", file_text({"version": 99}), "version 99 not supported"),
    ("version-true", file_text({"version": True}), "version True not supported"),
    ("saved-at-nan", file_text({"saved_at": float("nan")}), "NaN is not a number JSON allows"),
    ("saved-at-400-digits", file_text({"saved_at": 10**400}), "saved_at must be within"),
    ("count-negative", file_text({"count": -1}), "count must be a count"),
    ("left-nan-established",
     file_text(lines=[json.dumps({**GOOD_LINE, "left": float("nan")})]),
     "NaN is not a number JSON allows"),
    ("left-infinity", file_text(lines=[json.dumps({**GOOD_LINE, "left": float("inf")})]),
     "Infinity is not a number JSON allows"),
    ("left-1e400", file_text(lines=[json.dumps(GOOD_LINE).replace("30.0", "1e400")]),
     "left must be a finite number"),
    ("left-400-digits", file_text(lines=[json.dumps({**GOOD_LINE, "left": 10**400})]),
     "left must be within 0..1e+09"),
    ("left-negative", file_text(lines=[json.dumps({**GOOD_LINE, "left": -5})]),
     "left must be within"),
    ("packets-400-digits", file_text(lines=[json.dumps({**GOOD_LINE, "packets": 10**400})]),
     "packets must be an integer within"),
    ("nested-100000", file_text(lines=[nested(100_000)]), "line longer than 65536 bytes"),
    ("nested-30000", file_text(lines=[nested(30_000)]), "nested too deeply"),
    ("nested-header", nested(20_000).encode() + b"\n", "header is nested too deeply"),
    ("care-of-garbage", file_text(lines=[json.dumps({**GOOD_LINE, "care_of": "ff02::zz"})]),
     "ff02::zz"),
    ("checksum-mismatch",
     file_text(lines=[json.dumps(GOOD_LINE)]).replace(b'"b1"', b'"b2"', 1),
     "checksum mismatch"),
    ("checksum-missing", file_text(trailer="").rstrip(b"\n"), "no checksum line"),
    ("checksum-malformed", file_text(trailer='{"sha1": "00"}'), "not a checksum line"),
    ("line-after-checksum", file_text() + b'{"key": "extra"}\n', "more lines than the header"),
    ("truncated", b"".join(file_text({"count": 2}).splitlines(keepends=True)[:-1]),
     "header says 2 bindings and 0 return paths, the file ends after 1 (truncated?)"),
    ("count-too-high", file_text({"count": 2}), ":3: key and backend must be strings"),
    ("not-utf8", file_text().replace(b'"b1"', b'"\xff1"', 1), "not UTF-8"),
    ("oversized", file_text(lines=[json.dumps(GOOD_LINE)] * 12_000),
     "more than max_bytes (1048576)"),
]


class CraftedFileTests(SynchronousTestCase):
    """Crafted files against the real table: refused in one log line, set aside, the
    service running with an empty table and no return path."""

    MAX_BYTES = 1 << 20

    def start(self, path: str) -> tuple[Any, Any, TablePersistence, list[str]]:
        from twisted.logger import Logger

        from lbproxy.core.keys import Key as RealKey
        from lbproxy.core.selection import Backend as RealBackend
        from lbproxy.core.table import StickyTable as RealTable

        lines: list[str] = []
        self.patch(persistence, "log", Logger(observer=LineObserver(lines)))
        clock = Clock()
        clock.advance(110)
        table = RealTable(clock, lifetime=100.0, max_entries=1000)
        paths = ReturnPaths(clock, 1000)
        backends = {"b1": RealBackend("b1", "2001:db8:100::1"),
                    "b2": RealBackend("b2", "2001:db8:100::2")}  # fmt: skip
        service = TablePersistence(table, path, lambda: backends, clock, interval=60.0,
                                   parse_key=RealKey.parse, return_paths=paths,
                                   max_bytes=self.MAX_BYTES)  # fmt: skip
        service.startService()
        self.addCleanup(lambda: service.stopService() if service.running else None)
        return table, paths, service, lines

    def test_the_good_file_is_restored(self) -> None:
        """The file the crafted ones are made from restores its binding: what refuses
        each crafted file is its damage."""
        path = self.mktemp()
        with open(path, "wb") as handle:
            handle.write(file_text())
        table, _, service, lines = self.start(path)
        self.assertEqual(len(table), 1)
        self.assertIsNone(service.last_restore and service.last_restore.error)
        self.assertIn("Restored 1 bindings", lines[-1])

    def test_crafted_files(self) -> None:
        """Each file: one error line naming the file and the reason; the file kept as
        ``<path>.corrupt-110``; an empty table and no return path; the service running;
        nothing raised out of startService (no RecursionError, OverflowError...)."""
        self.assertGreaterEqual(len(CRAFTED), 20)
        wrong = []
        for name, data, reason in CRAFTED:
            directory = self.mktemp()
            os.makedirs(directory)
            path = os.path.join(directory, "table.jsonl")
            with open(path, "wb") as handle:
                handle.write(data)
            table, paths, service, lines = self.start(path)
            errors = [line for line in lines if line.startswith("Refused the saved table")]
            problems = []
            if len(errors) != 1 or reason not in errors[0] or path not in errors[0]:
                problems.append(f"log {lines}")
            elif "\n" in errors[0] or "kept aside as " + path + ".corrupt-110" not in errors[0]:
                problems.append(f"log line {errors[0]!r}")
            if len(table) or len(paths) or not service.running:
                problems.append(f"state: {len(table)} bindings, {len(paths)} paths")
            if os.path.exists(path) or not os.path.exists(path + ".corrupt-110"):
                problems.append(f"not set aside: {os.listdir(directory)}")
            if problems:
                wrong.append(f"{name}: {problems}")
        self.assertEqual(wrong, [])

    def test_a_directory_is_left_where_it_is(self) -> None:
        """Something that is not a file at the path is refused, not moved."""
        path = self.mktemp()
        os.makedirs(path)
        table, _, service, lines = self.start(path)
        self.assertEqual((len(table), service.running), (0, True))
        self.assertIn("not a regular file", lines[-1])
        self.assertTrue(os.path.isdir(path))

    def test_random_damage_is_refused_never_loaded_as_other_data(self) -> None:
        """Two thousand random damages to a saved file (a byte changed, a byte removed,
        the file cut short, two lines swapped): each is refused, or reads back exactly
        what was saved (damage JSON does not see, like a space turned into a tab)."""
        import random

        from lbproxy.core.keys import Key as RealKey
        from lbproxy.core.selection import Backend as RealBackend
        from lbproxy.core.table import StickyTable as RealTable

        clock = Clock()
        table = RealTable(clock, lifetime=300.0, max_entries=100)
        paths = ReturnPaths(clock, 100)
        backends = [RealBackend("b1", "2001:db8:100::1"), RealBackend("b2", "2001:db8:100::2")]
        for i in range(20):
            binding = table.insert(RealKey.parse(f"hoa 2001:db8:1::{i + 1:x}"), backends[i % 2])
            assert binding is not None
            binding.care_of = ipaddress.IPv6Address(f"2001:db8:aa::{i + 1:x}").packed
            clock.advance(1.5)
        paths.confirm(HOME, CARE_OF, lifetime=50.0)
        path = self.mktemp()
        persistence.save(table, path, clock.seconds(), paths)
        with open(path, "rb") as handle:
            original = handle.read()
        expected = persistence.read_table(path)
        rng = random.Random(14)
        loaded_other = refused = 0
        for _ in range(2000):
            data = bytearray(original)
            how = rng.randrange(4)
            at = rng.randrange(len(data))
            if how == 0:
                data[at] = rng.choice([b for b in range(256) if b != data[at]])
            elif how == 1:
                del data[at]
            elif how == 2:
                del data[at:]
            else:
                lines = bytes(data).split(b"\n")
                i, j = rng.sample(range(len(lines) - 1), 2)
                lines[i], lines[j] = lines[j], lines[i]
                data = bytearray(b"\n".join(lines))
            with open(path, "wb") as handle:
                handle.write(bytes(data))
            try:
                got = persistence.read_table(path)
            except CorruptTableFile:
                refused += 1
                continue
            if got != expected:
                loaded_other += 1
        self.assertEqual(loaded_other, 0)
        self.assertGreater(refused, 1900)


class HousekeepingTests(SynchronousTestCase):
    """The directory, orphan temporary files, the size cap on save, the log at start."""

    def service(self, path: str, max_bytes: int = persistence.DEFAULT_MAX_BYTES
                ) -> tuple[TablePersistence, list[str], Any]:  # fmt: skip
        from twisted.logger import Logger

        lines: list[str] = []
        self.patch(persistence, "log", Logger(observer=LineObserver(lines)))
        clock = Clock()
        table = new_table(clock, 100.0, 10)
        service = TablePersistence(table, path, lambda: BY_NAME, clock, interval=0,
                                   parse_key=PARSE_KEY, max_bytes=max_bytes)  # fmt: skip
        return service, lines, table

    def test_no_file_says_so(self) -> None:
        """A first start logs that there is no saved table, not "Restored 0 bindings"."""
        path = self.mktemp()
        service, lines, _ = self.service(path)
        service.startService()
        self.assertEqual(lines, [f"No saved table at {path} yet; starting with an empty table."])
        service.stopService()

    def test_missing_directory_is_created_private(self) -> None:
        """A missing directory (and missing parents) are created with mode 0700; the
        existing parent keeps its mode."""
        base = self.mktemp()
        os.makedirs(base)
        os.chmod(base, 0o755)
        path = os.path.join(base, "var", "lib", "table.jsonl")
        service, lines, table = self.service(path)
        service.startService()
        for directory in (os.path.join(base, "var"), os.path.join(base, "var", "lib")):
            self.assertEqual(os.stat(directory).st_mode & 0o777, 0o700, directory)
        self.assertEqual(os.stat(base).st_mode & 0o777, 0o755)
        self.assertIn(f"Created {os.path.abspath(os.path.join(base, 'var'))} (mode 0700)",
                      lines[0])  # fmt: skip
        table.insert(key("hoa 2001:db8:1::1"), B1)
        service.stopService()
        self.assertEqual(len(persistence.read(path)[1]), 1)

    def test_orphan_temporary_files_are_removed(self) -> None:
        """``<path>.tmp.<pid>`` of processes that are gone (and of this pid, left by an
        earlier process with it) are removed at start; a live process's is kept, and so
        are files that only look similar."""
        import subprocess
        import sys

        directory = self.mktemp()
        os.makedirs(directory)
        path = os.path.join(directory, "table.jsonl")
        gone = subprocess.Popen([sys.executable, "-c", "pass"])
        gone.wait()
        live = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
        self.addCleanup(live.wait)
        self.addCleanup(live.kill)
        names = {
            f"table.jsonl.tmp.{gone.pid}": False,
            f"table.jsonl.tmp.{os.getpid()}": False,
            f"table.jsonl.tmp.{live.pid}": True,
            "table.jsonl.tmp.notapid": True,
            "other.jsonl.tmp.1": True,
        }
        for name in names:
            with open(os.path.join(directory, name), "wb") as handle:
                handle.write(b"x" * 1000)
        service, lines, _ = self.service(path)
        service.startService()
        service.stopService()
        for name, kept in names.items():
            self.assertEqual(os.path.exists(os.path.join(directory, name)), kept, name)
        self.assertIn(f"Removed 2 temporary files (2000 bytes) that interrupted saves left "
                      f"next to {path}.", lines)  # fmt: skip

    def test_save_over_the_cap_keeps_the_previous_file(self) -> None:
        """A table that would exceed max_bytes is not written (it could not be read
        back): the error is logged and the previous file stays."""
        directory = self.mktemp()
        os.makedirs(directory)
        path = os.path.join(directory, "table.jsonl")
        service, lines, table = self.service(path, max_bytes=600)
        service.startService()
        table.insert(key("hoa 2001:db8:1::1"), B1)
        self.assertEqual(service.save(), 1)
        with open(path, "rb") as handle:
            before = handle.read()
        for n in range(2, 9):
            table.insert(key(f"hoa 2001:db8:1::{n}"), B2)
        self.assertEqual(service.save(), 0)
        self.assertIn("max_bytes (600)", lines[-1])
        with open(path, "rb") as handle:
            self.assertEqual(handle.read(), before)
        self.assertEqual(os.listdir(directory), ["table.jsonl"])
        service.stopService()

    def test_the_file_carries_its_checksum(self) -> None:
        """Version 3: the last line is the SHA-256 of every byte before it."""
        import hashlib

        path = self.mktemp()
        clock = Clock()
        persistence.save(filled(clock), path, clock.seconds())
        with open(path, "rb") as handle:
            data = handle.read()
        body, trailer = data[: data.rstrip(b"\n").rfind(b"\n") + 1], data.splitlines()[-1]
        self.assertEqual(json.loads(data.splitlines()[0])["version"], 3)
        self.assertEqual(json.loads(trailer), {"sha256": hashlib.sha256(body).hexdigest()})


class AliasesTests(SynchronousTestCase):
    def test_aliases_survive_a_restart(self) -> None:
        """A terminal's other identities come back linked to its binding: after a
        restart its packets from any of them find the same backend, with no new
        binding."""
        from lbproxy.core.keys import Key as RealKey
        from lbproxy.core.selection import Backend as RealBackend
        from lbproxy.core.table import StickyTable as RealTable

        b1 = RealBackend("b1", "2001:db8:100::1")
        clock = Clock()
        table = RealTable(clock, lifetime=100.0, max_entries=10)
        home = RealKey.parse("addr 2001:db8:1::1")
        others = [RealKey.parse("addr 2001:db8:aa::1"), RealKey.parse("spi 0x00000042")]
        binding = table.insert(home, b1)
        assert binding is not None
        for other in others:
            self.assertTrue(table.link(binding, other))
        path = self.mktemp()
        persistence.save(table, path, clock.seconds())
        clock.advance(10)
        fresh = RealTable(clock, lifetime=100.0, max_entries=10)
        result = persistence.load(fresh, path, {"b1": b1}, clock.seconds())
        self.assertEqual((result.restored, result.refused, result.error), (1, 0, None))
        restored = fresh.get(home)
        assert restored is not None
        for other in others:
            self.assertIs(fresh.get(other), restored)
        self.assertEqual((len(fresh), fresh.alias_count), (1, 2))


# -- notification subscriptions (issue 11) ------------------------------------------------


class SubscriptionStoreFake:
    """What a Notifier offers persistence: its subscriptions, and taking them back."""

    def __init__(self, subs: list[Any] | None = None, refuse: str | None = None) -> None:
        self.subs = subs or []
        self.refuse = refuse
        self.restored: list[tuple[Any, ...]] = []

    def saved_subscriptions(self) -> Any:
        return iter(self.subs)

    def restore_subscription(self, *fields: Any) -> str | None:
        if self.refuse is not None:
            return self.refuse
        self.restored.append(fields)
        return None


GOOD_SUBSCRIPTION = {"peer": "ha1", "address": "2001:db8:aa::1", "kind": "coa",
                     "home": "2001:db8:1::1", "care_of": "2001:db8:aa::1", "seq": 7,
                     "left": 500.0, "binding_left": 300.0}  # fmt: skip


def subscription_file(entries: list[dict[str, Any]]) -> bytes:
    return file_text({"count": 1, "subscriptions": len(entries)},
                     lines=[json.dumps(GOOD_LINE), *(json.dumps(e) for e in entries)])


class SubscriptionTests(SynchronousTestCase):
    """Subscriptions are saved with the table and come back through the notifier."""

    def test_round_trip(self) -> None:
        """Saved after the return paths; restored with the downtime counted against both
        their times; a binding that ran out while down comes back without a deadline."""
        from lbproxy.notify.subscriptions import Subscription

        clock = Clock()
        clock.advance(1000)
        table = filled(clock)  # now 1060
        subs = [
            Subscription("ha1", CARE_OF, "coa", 1600.0, home=HOME, care_of=CARE_OF, seq=7,
                         sub_id=3, confirmed=True, binding_until=1300.0),
            Subscription("terminal:2001:db8:1::2", OTHER_HOME, "hoa", 1010.0, home=OTHER_HOME,
                         binding_until=1005.0),
        ]  # fmt: skip
        path = self.mktemp()
        persistence.save(table, path, clock.seconds(),
                         subscriptions=SubscriptionStoreFake(subs))  # fmt: skip
        with open(path) as handle:
            lines = handle.read().splitlines()
        self.assertEqual(json.loads(lines[0])["subscriptions"], 2)
        self.assertEqual(json.loads(lines[-3])["peer"], "ha1")
        clock.advance(20)
        store = SubscriptionStoreFake()
        result = persistence.load(new_table(clock, 100.0, 100), path, BY_NAME, clock.seconds(),
                                  PARSE_KEY, subscriptions=store)  # fmt: skip
        self.assertEqual((result.error, result.subscriptions, result.subscriptions_dropped),
                         (None, 2, 0))  # fmt: skip
        self.assertEqual(store.restored[0],
                         ("ha1", CARE_OF, "coa", HOME, CARE_OF, 7, 1600.0, 1300.0))  # fmt: skip
        self.assertEqual(store.restored[1], ("terminal:2001:db8:1::2", OTHER_HOME, "hoa",
                                             OTHER_HOME, None, None, 1080.0, None))  # fmt: skip

    def test_refused_by_the_notifier_counted(self) -> None:
        path = self.mktemp()
        with open(path, "wb") as handle:
            handle.write(subscription_file([GOOD_SUBSCRIPTION, GOOD_SUBSCRIPTION]))
        clock = Clock()
        clock.advance(110)
        refusing = SubscriptionStoreFake(refuse="no such peer")
        result = persistence.load(new_table(clock), path, BY_NAME, clock.seconds(), PARSE_KEY,
                                  subscriptions=refusing)  # fmt: skip
        self.assertEqual((result.restored, result.subscriptions,
                          result.subscriptions_dropped), (1, 0, 2))  # fmt: skip

    def test_no_subscriptions_no_header_key(self) -> None:
        """A table without subscriptions is written as before (no "subscriptions" key)."""
        path = self.mktemp()
        clock = Clock()
        persistence.save(filled(clock), path, clock.seconds(),
                         subscriptions=SubscriptionStoreFake())  # fmt: skip
        with open(path) as handle:
            self.assertNotIn("subscriptions", json.loads(handle.readline()))

    def test_every_field_checked(self) -> None:
        """Each damaged field refuses the whole file (set aside, nothing restored), as a
        damaged binding does; the checksum is right, so the field is what is refused."""
        cases: dict[str, tuple[dict[str, Any], str]] = {
            "peer-number": ({"peer": 5}, "peer must be a peer name"),
            "peer-spaces": ({"peer": "ha 1"}, "peer must be a peer name"),
            "peer-long": ({"peer": "h" * 64}, "peer must be a peer name"),
            "kind": ({"kind": "iid"}, "kind must be one of"),
            "address": ({"address": "2001:db8::zz"}, "2001:db8::zz"),
            "address-missing": ({"address": None}, "address must be an IPv6 address"),
            "home": ({"home": 7}, "home must be an IPv6 address"),
            "care-of": ({"care_of": "x" * 100}, "care_of must be an IPv6 address"),
            "seq-big": ({"seq": 65536}, "seq must be null or an integer"),
            "seq-bool": ({"seq": True}, "seq must be null or an integer"),
            "seq-float": ({"seq": 7.5}, "seq must be null or an integer"),
            "left-negative": ({"left": -1}, "left must be within"),
            "left-huge": ({"left": 10**400}, "left must be within"),
            "left-missing": ({"left": None}, "left must be a number"),
            "binding-left": ({"binding_left": "soon"}, "binding_left must be a number"),
        }
        for name, (change, reason) in cases.items():
            with self.subTest(name=name):
                path = os.path.join(self.mktemp())
                with open(path, "wb") as handle:
                    handle.write(subscription_file([{**GOOD_SUBSCRIPTION, **change}]))
                with self.assertRaises(CorruptTableFile) as caught:
                    persistence.read_table(path)
                self.assertIn(reason, str(caught.exception))
        text = subscription_file([GOOD_SUBSCRIPTION])
        path = self.mktemp()
        with open(path, "wb") as handle:
            handle.write(text.replace(b'"seq": 7', b'"seq": 8'))
        with self.assertRaises(CorruptTableFile) as caught:
            persistence.read_table(path)
        self.assertIn("checksum mismatch", str(caught.exception))
        with open(path, "wb") as handle:
            handle.write(b"".join(text.splitlines(keepends=True)[:-2]))
        with self.assertRaises(CorruptTableFile) as caught:
            persistence.read_table(path)
        self.assertIn("1 subscriptions, the file ends", str(caught.exception))
        with open(path, "wb") as handle:
            handle.write(text)
        (entry,) = persistence.read_table(path).subscriptions
        self.assertEqual((entry.peer, entry.kind, entry.seq, entry.left, entry.binding_left),
                         ("ha1", "coa", 7, 500.0, 300.0))  # fmt: skip

    def test_service_restores_into_the_notifier(self) -> None:
        """TablePersistence asks for the notifier when it starts (it is made after), and
        saves its subscriptions when it stops."""
        from lbproxy.notify.subscriptions import Subscription

        path = self.mktemp()
        with open(path, "wb") as handle:
            handle.write(subscription_file([GOOD_SUBSCRIPTION]))
        clock = Clock()
        clock.advance(110)
        store = SubscriptionStoreFake([Subscription("ha1", HOME, "hoa", 200.0, home=HOME)])
        holder: dict[str, Any] = {}
        service = TablePersistence(new_table(clock), path, lambda: BY_NAME, clock,
                                   parse_key=PARSE_KEY,
                                   subscriptions=lambda: holder.get("n"))  # fmt: skip
        holder["n"] = store
        service.startService()
        self.assertEqual(len(store.restored), 1)
        service.stopService()
        self.assertEqual(persistence.read_table(path).subscriptions[0].address, HOME)
