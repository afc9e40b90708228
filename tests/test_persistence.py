"""lbproxy.ops.persistence: the table survives a restart, expired bindings stay expired."""

from __future__ import annotations

import ipaddress
import json
import os
from typing import Any

from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase

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
        """No file: nothing restored, no error."""
        clock = Clock()
        table = new_table(clock, 100.0, 10)
        result = persistence.load(table, self.path, BY_NAME, 0.0)
        self.assertEqual(result, persistence.RestoreResult())

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
        self.assertEqual(service.last_restore, persistence.RestoreResult())
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
        table.lookup(busy)
        table.lookup(busy)
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
        self.assertEqual((restored.backend, restored.packets), (b1, 3))
        self.assertTrue(restored.established)
        self.assertAlmostEqual(restored.expires - clock.seconds(), 20.0, places=1)
        for n in range(10):  # a flood of one-packet identities
            fresh.insert(RealKey.parse(f"src 2001:db8:66::{n + 1:x}"), b2)
        self.assertIsNotNone(fresh.get(busy))  # established: never evicted by the flood
        clock.advance(21)
        self.assertIsNone(fresh.get(busy))  # expired on time, not a full lifetime later
