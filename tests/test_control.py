"""Tests for lbproxy.ops.control: the operator's verbs over a balancer."""

from __future__ import annotations

import ipaddress
from collections.abc import Callable
from typing import Any

from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase

from lbproxy.ops.control import (
    Control,
    OperatorError,
    Page,
    Row,
    Text,
    format_rows,
    parse_packet,
)
from tests.operating_fakes import real_key, real_packet, real_populated
from tests.test_audit import AuditCapture


def make_control(
    backend_state: Callable[[str], str] | None = None,
    reload: Callable[[str], object] | None = None,
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
        self.assertEqual([r.idle for r in rows], [100.0, 100.0, 100.0])
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
        self.assertEqual(lines[0].split(), ["kind", "key", "backend", "left", "idle",
                                            "packets", "care-of", "confirmed", "aliases"])
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
        """With a limit the footer says 'n of total' and where the next page starts."""
        control, _balancer, _clock = make_control()
        text = control.show(limit=1)
        self.assertEqual(len(text.splitlines()), 3)
        self.assertEqual(text.splitlines()[-1],
                         "(1 of 3 bindings shown; the next page starts at offset 1)")
        last = control.show(limit=1, offset=2).splitlines()
        self.assertEqual(last[-1], "(1 of 3 bindings shown, from offset 2)")
        self.assertIn("addr 2001:db8:2::12", last[1])

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

    def test_stats_count_what_the_ports_fold_in(self) -> None:
        """Reading the ports folds an executor's counts into the shared counters (the
        XDP program's, `ForwarderService.port_stats`): `stats` reads the ports first,
        so its totals include what the driver forwarded since the last sweep."""
        balancer, clock = real_populated()

        def ports() -> dict[str, dict[str, object]]:
            balancer.counters.packets_in += 10  # as XdpOffload.fold_counters does
            balancer.counters.replies_in += 7
            return {"xdp": {"forwarded": 10, "replies": 7}}

        control = Control(balancer, clock, ports=ports)
        before = balancer.counters.packets_in
        stats = control.stats()
        self.assertEqual(stats["packets_in"], before + 10)
        self.assertEqual(stats["replies_in"], 7)
        self.assertEqual(stats["ports"]["xdp"], {"forwarded": 10, "replies": 7})

    def test_state_defaults_to_the_balancers_marks(self) -> None:
        """Without a health view, a backend marked down on the balancer shows 'down'."""
        control, balancer, _clock = make_control()
        balancer.set_backend_up("b2", False)
        self.assertEqual([b["state"] for b in control.backends()], ["up", "down"])

    def test_reload(self) -> None:
        """reload() calls the given callable with who asked; without one it is refused."""
        calls: list[str] = []

        def reload(who: str) -> str:
            calls.append(who)
            return "ok"

        control, _balancer, _clock = make_control(reload=reload)
        self.assertEqual(control.reload(who="SIGHUP"), "ok")
        self.assertEqual(calls, ["SIGHUP"])
        bare, _, _ = make_control()
        self.assertRaises(OperatorError, bare.reload)


def many(count: int) -> tuple[Control, Any, Clock]:
    """The real balancer with `count` more terminals, placed by `move` on b1 and b2 in
    turn, after the three of `real_populated`."""
    control, balancer, clock = make_control()
    for i in range(count):
        control.move(f"addr 2001:db8:7::{i:x}", "b1" if i % 2 else "b2")
    return control, balancer, clock


class PagingTests(SynchronousTestCase):
    def test_pages_are_slices_of_the_whole_table_in_key_order(self) -> None:
        """Every page is the matching slice of the full, key-ordered list, whichever way
        it is chosen (a partial heap for early pages, a sort for late ones)."""
        control, _balancer, _clock = many(500)
        everything = control.rows()
        self.assertEqual(len(everything), 503)
        keys = [real_key(r.key) for r in everything]
        self.assertEqual(keys, sorted(keys))
        for offset, limit in ((0, 10), (10, 10), (0, 100), (450, 100), (500, 100), (600, 5)):
            page = control.page(offset=offset, limit=limit)
            self.assertEqual(page.rows, tuple(everything[offset:offset + limit]))
            self.assertEqual((page.total, page.offset, page.limit), (503, offset, limit))
        default = control.page()
        self.assertEqual(len(default.rows), 100)
        self.assertEqual(default.as_dict()["limit"], 100)

    def test_filters_apply_before_paging(self) -> None:
        """kind, backend and the substring filter narrow the total and the pages."""
        control, _balancer, _clock = many(50)
        on_b1 = control.page(backend="b1", limit=7)
        self.assertEqual(on_b1.total, 2 + 25)
        self.assertTrue(all(r.backend == "b1" for r in on_b1.rows))
        self.assertEqual(control.page(kind="iid").total, 0)
        self.assertEqual(control.page(kind="nonsense").total, 0)
        self.assertEqual(control.page("2001:db8:7::3").total, 3)  # ::3, ::30, ::31
        self.assertEqual([r.key for r in control.page("aa::12").rows], ["addr 2001:db8:2::12"])

    def test_scan_yields_between_slices(self) -> None:
        """A scan gives the reactor a turn after the snapshot, after every slice it
        filters, and every slice it merges on the way to a far page."""
        from lbproxy.ops import control as control_module

        control, _balancer, _clock = many(300)
        self.patch(control_module, "SCAN_SLICE", 100)

        def turns(offset: int = 0, limit: int = 100) -> tuple[int, Page]:
            scan = control.scan(offset=offset, limit=limit)
            count = 0
            while True:
                try:
                    next(scan)
                except StopIteration as done:
                    return count, done.value
                count += 1

        count, page = turns(limit=5)
        self.assertEqual((count, page.total), (1 + 4, 303))  # snapshot, 4 slices of 303
        count, page = turns(offset=250, limit=50)
        self.assertEqual((count, len(page.rows)), (1 + 4 + 3, 50))  # merged 100, 200, 300
        self.assertEqual(page.rows, tuple(control.rows()[250:300]))

    def test_bad_pages_refused(self) -> None:
        """A negative offset, a limit above 10,000 or not an integer is refused clearly."""
        control, _balancer, _clock = make_control()
        for offset, limit in ((-1, 10), (0, 10_001), (0, -1), ("1", 10), (0, True)):
            error = self.assertRaises(OperatorError, control.page, offset=offset, limit=limit)
            self.assertRegex(str(error), "offset|limit")


class WeightTests(SynchronousTestCase):
    def test_weight_drain_undrain(self) -> None:
        """weight and drain are overrides; undrain brings back the configured weight."""
        control, balancer, _clock = make_control()
        capture = AuditCapture(self)
        info = control.weight("b1", 5, who="tester")
        self.assertEqual((info["weight"], info["configured_weight"], info["override"]),
                         (5, 1, True))  # fmt: skip
        self.assertEqual(balancer.backends["b1"].weight, 5)
        control.drain("b1", who="tester")
        self.assertEqual(balancer.backends["b1"].weight, 0)
        info = control.undrain("b1", who="tester")
        self.assertEqual((info["weight"], info["override"]), (1, False))
        self.assertEqual(balancer.backends["b1"].weight, 1)
        self.assertEqual(capture.lines, [
            "audit: who=tester action=weight backend=b1 weight=5 previous=1",
            "audit: who=tester action=drain backend=b1 weight=0 previous=5",
            "audit: who=tester action=undrain backend=b1 weight=1 previous=0",
        ])

    def test_bad_weights_refused(self) -> None:
        """Weights outside 0..1000, or not integers, and unknown backends are refused."""
        control, balancer, _clock = make_control()
        for weight in (-1, 1001, True):
            self.assertRaises(OperatorError, control.weight, "b1", weight)
        self.assertRaises(OperatorError, control.undrain, "b9")
        self.assertEqual(balancer.backends["b1"].weight, 1)

    def test_overrides_survive_a_new_backend_list(self) -> None:
        """A reload's backend list keeps the override; an override whose backend left,
        or that the file now agrees with, ends; a changed file weight is reported."""
        from lbproxy.core.selection import Backend

        control, balancer, _clock = make_control()
        control.drain("b1")
        weights = control.weights
        file_list = [Backend("b1", "2001:db8:100::1", weight=3), Backend("b2", "2001:db8:100::2")]
        self.assertEqual(weights.configure(file_list), {"b1": (3, 0)})
        balancer.set_backends(weights.running())
        self.assertEqual(balancer.backends["b1"].weight, 0)
        self.assertEqual(weights.configure(file_list), {})  # unchanged file: nothing to say
        self.assertEqual(weights.configure([Backend("b1", "2001:db8:100::1", weight=0),
                                            Backend("b2", "2001:db8:100::2")]), {})
        self.assertEqual(weights.overrides, {})  # the file drains it now


class AuditTests(SynchronousTestCase):
    def test_every_change_is_one_audit_line(self) -> None:
        """move, forget: one line each naming who; reading and forgetting nothing
        change nothing and say nothing."""
        control, _balancer, _clock = make_control()
        capture = AuditCapture(self)
        control.move("addr 2001:db8:1::10", "b2", who="manhole user=alice")
        control.move("addr 2001:db8:9::1", "b1", who="manhole user=alice")
        control.forget("addr 2001:db8:1::11", who="manhole user=bob")
        control.forget("addr 2001:db8:1::11", who="manhole user=bob")
        control.show()
        control.backends()
        control.stats()
        control.info()
        self.assertEqual(capture.lines, [
            'audit: who="manhole user=alice" action=move key="addr 2001:db8:1::10" backend=b2 '
            "previous=b1",
            'audit: who="manhole user=alice" action=move key="addr 2001:db8:9::1" backend=b1 '
            "previous=-",
            'audit: who="manhole user=bob" action=forget key="addr 2001:db8:1::11" backend=b2',
        ])

    def test_refused_changes_leave_no_audit_line(self) -> None:
        """A refused move (unknown backend) changes nothing and logs no audit line."""
        control, _balancer, _clock = make_control()
        capture = AuditCapture(self)
        self.assertRaises(OperatorError, control.move, "addr 2001:db8:1::10", "b9")
        self.assertEqual(capture.lines, [])


class InfoHealthTests(SynchronousTestCase):
    def test_info(self) -> None:
        """info: version, uptime, mode, offload, table size and capacity, overrides, and
        what the service adds."""
        from lbproxy import __version__

        control, _balancer, clock = make_control()
        control.status = lambda: {"config": "/etc/lbproxy.toml", "pending_restart": []}
        clock.advance(12.5)
        control.drain("b2")
        info = control.info()
        self.assertEqual(info, {
            "version": __version__, "uptime": 12.5, "mode": "translate", "offload": "none",
            "bindings": 3, "capacity": 1000, "weight_overrides": {"b2": 0},
            "config": "/etc/lbproxy.toml", "pending_restart": [],
        })  # fmt: skip
        from lbproxy.ops.control import format_info

        self.assertIn("weight_overrides: b2=0", format_info(info))
        self.assertIn("pending_restart: -", format_info(info))

    def test_health(self) -> None:
        """ok while forwarding and one backend is up with a weight; unavailable when all
        are down or drained, or when not forwarding."""
        control, balancer, _clock = make_control()
        forwarding = [True]
        control.forwarding = lambda: forwarding[0]
        self.assertEqual(control.health(), {"status": "ok", "forwarding": True, "backends": 2,
                                            "up": 2, "usable": 2})  # fmt: skip
        balancer.set_backend_up("b1", False)
        control.drain("b2")
        self.assertEqual(control.health()["status"], "unavailable")
        self.assertEqual((control.health()["up"], control.health()["usable"]), (1, 0))
        control.undrain("b2")
        self.assertEqual(control.health()["status"], "ok")
        forwarding[0] = False
        self.assertEqual(control.health()["status"], "unavailable")


class PerBackendTests(SynchronousTestCase):
    def test_counts_come_from_the_load_not_the_table(self) -> None:
        """Per-backend bindings are the table's load counts: the table is not walked
        (a table that refuses to be iterated still answers); expired bindings count
        until the sweep."""
        control, balancer, clock = many(10)

        def refuse(table: Any) -> Any:
            raise AssertionError("the table was walked")

        table = balancer.table
        per = control.per_backend()
        self.assertEqual(per["b1"][0] + per["b2"][0], 13)
        self.patch(type(table), "__iter__", refuse)
        self.assertEqual(sum(b["bindings"] for b in control.backends()), 13)
        self.assertRaises(AssertionError, control.rows)  # the patch holds
        clock.advance(301)
        self.assertEqual(sum(b["bindings"] for b in control.backends()), 13)
        balancer.sweep()
        self.assertEqual(sum(b["bindings"] for b in control.backends()), 0)


class NotifyAndFleetTests(SynchronousTestCase):
    def test_off_says_so(self) -> None:
        """Without notifications or a fleet the verbs are refused with what to configure,
        and a bad limit is refused before the notifier is asked."""
        control, _balancer, _clock = make_control()
        error = self.assertRaises(OperatorError, control.notify)
        self.assertIn("[notify] enabled = false", str(error))
        error = self.assertRaises(OperatorError, control.fleet_view, "addr 2001:db8::1")
        self.assertIn("[fleet]", str(error))

    def test_lbproxyctl_arguments(self) -> None:
        """``lbproxyctl notify --peer ha1 --limit 5`` and ``lbproxyctl fleet addr X`` send
        what the server's verbs take."""
        import io

        from lbproxy.ops.ctl import _parser, _request_args

        options = _parser().parse_args(["notify", "--peer", "ha1", "--limit", "5"])
        self.assertEqual(_request_args(options, io.StringIO()), {"limit": 5, "peer": "ha1"})
        options = _parser().parse_args(["fleet", "addr", "2001:db8::1"])
        self.assertEqual(_request_args(options, io.StringIO()), {"key": "addr 2001:db8::1"})


class TcpdumpInputTests(SynchronousTestCase):
    def test_trace_reads_tcpdump_hex_output(self) -> None:
        """``tcpdump -x`` (and ``-X``, with its ASCII column) output of several packets
        gives the first packet's bytes exactly; the summary lines are skipped."""
        from scapy.layers import inet, inet6

        from lbproxy.ops.control import parse_packet

        packet = bytes(inet6.IPv6(src="2001:db8:1::10", dst="2001:db8:5::80")
                       / inet.UDP(sport=1, dport=80) / b"hello, world")  # fmt: skip

        def dump(data: bytes, ascii_column: bool) -> str:
            lines = ["12:00:00.000000 IP6 2001:db8:1::10.1 > 2001:db8:5::80.80: UDP, length 12"]
            for offset in range(0, len(data), 16):
                chunk = data[offset : offset + 16]
                groups = " ".join(chunk[i : i + 2].hex() for i in range(0, len(chunk), 2))
                line = f"\t0x{offset:04x}:  {groups}"
                if ascii_column:
                    line += "  " + "".join(chr(c) if 32 <= c < 127 else "." for c in chunk)
                lines.append(line)
            return "\n".join(lines)

        for ascii_column in (False, True):
            text = dump(packet, ascii_column) + "\n" + dump(b"\x60" + bytes(60), ascii_column)
            self.assertEqual(parse_packet(text), packet)
        self.assertEqual(parse_packet(packet.hex()), packet)
