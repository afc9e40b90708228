"""Tests for lbproxy.ops.control: the operator's verbs over a balancer."""

from __future__ import annotations

import ipaddress
from collections.abc import Callable
from typing import Any

from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase

from lbproxy.ops.control import Control, OperatorError, Row, Text, format_rows, parse_packet
from tests.operating_fakes import real_packet, real_populated


def make_control(
    backend_state: Callable[[str], str] | None = None,
    reload: Callable[[], object] | None = None,
) -> tuple[Control, Any, Clock]:
    balancer, clock = real_populated()
    control = Control(balancer, clock, backend_state=backend_state, reload=reload)
    return control, balancer, clock


class RowsTests(SynchronousTestCase):
    def test_rows_list_every_live_binding(self) -> None:
        """Each binding appears once with its backend, packets and lifetime left."""
        control, _balancer, clock = make_control()
        clock.advance(100)
        rows = control.rows()
        self.assertEqual(
            [r.key for r in rows],
            ["addr 2001:db8:1::10", "addr 2001:db8:1::11", "addr 2001:db8:2::12"],
        )
        self.assertEqual({r.backend for r in rows}, {"b1", "b2"})
        self.assertEqual([r.left for r in rows], [200.0, 200.0, 200.0])
        confirmed = rows[2]
        self.assertEqual(confirmed.care_of, "2001:db8:aa::12")
        self.assertTrue(confirmed.confirmed)
        self.assertIsNone(rows[0].care_of)

    def test_expired_bindings_are_not_shown(self) -> None:
        """A binding whose lifetime ran out (not yet swept) is not listed."""
        control, _balancer, clock = make_control()
        clock.advance(301)
        self.assertEqual(control.rows(), [])

    def test_filters(self) -> None:
        """The filter matches backend name, kind, key substring or care-of substring."""
        control, _balancer, _clock = make_control()
        by_backend = {r.key for r in control.rows("b1")}
        self.assertTrue(by_backend)
        self.assertTrue(all(r.backend == "b1" for r in control.rows("b1")))
        self.assertEqual(len(control.rows("addr")), 3)
        self.assertEqual([r.key for r in control.rows("db8:2::")], ["addr 2001:db8:2::12"])
        self.assertEqual([r.key for r in control.rows("aa::12")], ["addr 2001:db8:2::12"])
        self.assertEqual(control.rows("nothing-matches"), [])
        self.assertEqual(control.rows(kind="iid"), [])
        self.assertEqual(len(control.rows(kind="src")), 3)  # the old names mean addr
        self.assertEqual(len(control.rows(kind="addr")), 3)
        on_b1 = control.rows(backend="b1")
        self.assertEqual(len(on_b1), 2)  # round robin: ::10 and ::12
        self.assertEqual({r.backend for r in on_b1}, {"b1"})


class FormatTests(SynchronousTestCase):
    def test_show_is_an_aligned_table(self) -> None:
        """show() has a header, one line per binding, aligned columns and a count."""
        control, _balancer, _clock = make_control()
        text = control.show()
        self.assertIsInstance(text, Text)
        self.assertEqual(repr(text), str(text))  # the manhole prints it as is
        lines = text.splitlines()
        self.assertEqual(lines[0].split(), ["kind", "key", "backend", "left", "packets",
                                            "care-of", "confirmed", "aliases"])
        self.assertEqual(len(lines), 1 + 3 + 1)
        self.assertEqual(lines[-1], "(3 bindings)")
        starts = {line.index("addr 2001") for line in lines[1:4]}
        self.assertEqual(len(starts), 1)
        backend_column = lines[0].index("backend")
        for line in lines[1:4]:
            self.assertIn(line[backend_column : backend_column + 2], ("b1", "b2"))
        self.assertIn("2001:db8:aa::12", lines[3])
        self.assertEqual(lines[3].split()[-2:], ["yes", "-"])  # confirmed, no aliases
        self.assertEqual(lines[1].split()[-2:], ["no", "-"])

    def test_limit_says_how_many_are_shown(self) -> None:
        """With a limit the footer says 'n of total'."""
        control, _balancer, _clock = make_control()
        text = control.show(limit=1)
        self.assertEqual(len(text.splitlines()), 3)
        self.assertEqual(text.splitlines()[-1], "(1 of 3 bindings shown)")

    def test_format_rows_takes_dicts(self) -> None:
        """The client renders the JSON rows the same way as Row objects."""
        row = Row("addr", "addr 2001:db8::1", "b1", 12.345, 7, None, False, ("iid 1:2:3:4",))
        self.assertEqual(format_rows([row]), format_rows([row.as_dict()]))
        self.assertIn("12.3", format_rows([row]))


class VerbTests(SynchronousTestCase):
    def test_move(self) -> None:
        """move() rebinds a key to the named backend and returns its row."""
        control, _balancer, _clock = make_control()
        key = "addr 2001:db8:1::10"
        before = control.rows(key)[0].backend
        target = "b2" if before == "b1" else "b1"
        row = control.move(key, target)
        self.assertEqual(row.backend, target)
        self.assertEqual(control.rows(key)[0].backend, target)

    def test_move_new_key_creates_binding(self) -> None:
        """Moving a key without a binding creates one (to pin a terminal in advance)."""
        control, _balancer, _clock = make_control()
        control.move("addr 2001:db8:9::9", "b1")
        self.assertEqual(control.rows("2001:db8:9::9")[0].backend, "b1")

    def test_move_refuses_unknown_backend_and_bad_key(self) -> None:
        """Unknown backends and unparsable keys raise OperatorError naming the problem."""
        control, _balancer, _clock = make_control()
        error = self.assertRaises(OperatorError, control.move, "addr 2001:db8:1::10", "b9")
        self.assertIn("b9", str(error))
        self.assertIn("b1, b2", str(error))
        error = self.assertRaises(OperatorError, control.move, "bogus thing", "b1")
        self.assertIn("bogus", str(error))

    def test_forget(self) -> None:
        """forget() removes the binding and returns it; a second forget returns None."""
        control, _balancer, _clock = make_control()
        row = control.forget("addr 2001:db8:1::10")
        assert row is not None
        self.assertEqual(row.key, "addr 2001:db8:1::10")
        self.assertEqual(len(control.rows()), 2)
        self.assertIsNone(control.forget("addr 2001:db8:1::10"))

    def test_drain(self) -> None:
        """drain() sets weight 0 and keeps the backend's bindings."""
        control, _balancer, _clock = make_control()
        bound = len(control.rows(backend="b1"))
        info = control.drain("b1")
        self.assertEqual(info["weight"], 0)
        self.assertEqual(info["bindings"], bound)
        self.assertEqual(len(control.rows(backend="b1")), bound)
        self.assertRaises(OperatorError, control.drain, "nope")

    def test_trace_takes_hex_or_bytes(self) -> None:
        """trace() accepts bytes or hex text with spaces/colons and does not change the table."""
        control, balancer, _clock = make_control()
        raw = bytes(real_packet("2001:db8:1::10"))
        before = len(balancer.table)
        as_hex = " ".join(f"{b:02x}" for b in raw)
        for form in (raw, as_hex, raw.hex(), "0x" + raw.hex()):
            result = control.trace_dict(form)
            self.assertEqual(result["key"], "addr 2001:db8:1::10")
            self.assertTrue(result["hit"])
            self.assertIn(result["backend"], ("b1", "b2"))
        self.assertEqual(len(balancer.table), before)
        self.assertRaises(OperatorError, control.trace, "zz not hex")
        self.assertEqual(parse_packet("01:02 03"), b"\x01\x02\x03")

    def test_backends_and_stats(self) -> None:
        """backends() lists weight, state, bindings, packets; stats() the counters."""
        control, balancer, _clock = make_control(backend_state=lambda name: "down")
        balancer.inbound(real_packet("2001:db8:1::10"))
        backends = control.backends()
        self.assertEqual([b["name"] for b in backends], ["b1", "b2"])
        self.assertEqual(sum(b["bindings"] for b in backends), 3)
        self.assertEqual(sum(b["packets"] for b in backends), 4)
        self.assertEqual({b["state"] for b in backends}, {"down"})
        self.assertEqual(backends[0]["address"], str(ipaddress.IPv6Address("2001:db8:100::1")))
        stats = control.stats()
        self.assertEqual(stats["packets_in"], 4)
        self.assertEqual(stats["misses"], {"src": 3})
        self.assertEqual(stats["hits"], {"src": 1})
        self.assertEqual(stats["table"]["size"], 3)
        self.assertEqual(stats["table"]["inserts"], 3)

    def test_state_defaults_to_the_balancers_marks(self) -> None:
        """Without a health view, a backend marked down on the balancer shows 'down'."""
        control, balancer, _clock = make_control()
        balancer.set_backend_up("b2", False)
        self.assertEqual([b["state"] for b in control.backends()], ["up", "down"])

    def test_reload(self) -> None:
        """reload() calls the given callable; without one it is refused."""
        calls: list[int] = []

        def reload() -> str:
            calls.append(1)
            return "ok"

        control, _balancer, _clock = make_control(reload=reload)
        self.assertEqual(control.reload(), "ok")
        self.assertEqual(calls, [1])
        bare, _, _ = make_control()
        self.assertRaises(OperatorError, bare.reload)
