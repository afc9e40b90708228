"""A fleet of three real balancers behind ECMP in the network test bed (issue 13).

``TestBed(balancers=3)``: the router ``net`` reaches the virtual prefix through an ECMP
route over three balancer namespaces, hashing on addresses and ports
(``fib_multipath_hash_policy=1``), so a terminal that moves -- a new source address --
very likely reaches another balancer; the backends' default route is an ECMP route over
the balancers' server-side addresses (any balancer rewrites a reply).  Each balancer is
``twistd -n lbproxy`` with its own configuration file, control socket and ``[fleet]``
section; the store is a private redis-server on a UNIX socket every namespace reaches
(`lbproxy.testbed.fleet.BedFleet`).  Real Linux TCP connections from the terminals' home
addresses, through the terminal emulator, to the backends' kernel sockets; every echoed
byte is checked and the backends' logs say which backend served each home address.

Must-shows 1 (50 terminals moving through three care-of addresses, the default key chain
and ``["src"]`` with the home-agent agent's notifications), 2 (a balancer dies mid-run and
comes back) and 4 (the store stops for 10 s mid-run; afterwards the balancers agree key by
key).  Needs root and redis-server; skips, saying why, otherwise.
"""

from __future__ import annotations

import random
import socket
import time
from collections.abc import Callable, Iterable
from typing import Any

from twisted.trial.unittest import SkipTest, SynchronousTestCase

from lbproxy.testbed import addresses, control
from lbproxy.testbed.agents import BedAgent, BedPki, notify_section
from lbproxy.testbed.bed import TestBed
from lbproxy.testbed.fleet import BedFleet
from lbproxy.testbed.store import StoreUnavailableError, redis_server_path
from tests.bedtools import require_bed

TERMINALS = 50
DEFAULT_CHAIN = ("hoa", "iid", "spi", "ike", "src")


def wait_for(what: str, predicate: Callable[[], Any], timeout: float = 15.0) -> Any:
    """Poll ``predicate`` until it returns something true; fail after ``timeout``."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(0.05)


class Session:
    """A kernel TCP connection in ns term from terminal ``index``'s home address to
    VIP:80; every byte echoed is checked."""

    def __init__(self, bed: TestBed, index: int) -> None:
        self.index = index
        self.sock = bed.socket("term", socket.AF_INET6, socket.SOCK_STREAM)
        self.sock.settimeout(10)
        self.sock.bind((str(addresses.home_address(index)), 0))
        self.sock.connect((str(addresses.VIP), addresses.TCP_PORT))
        self.stream = self.sock.makefile("rb")
        greeting = self.stream.readline().decode().split()
        assert len(greeting) == 4 and greeting[0] == "backend", greeting
        self.backend, self.peer = greeting[1], greeting[3]
        self.rng = random.Random(index)
        self.sent = 0

    def echo(self, size: int = 4096) -> None:
        data = self.rng.randbytes(size)
        self.sock.sendall(data)
        back = self.stream.read(size)
        assert back == data, (f"terminal {self.index}: echo differs after {self.sent} bytes "
                              f"({len(back or b'')} back)")
        self.sent += size

    def close(self) -> None:
        self.sock.shutdown(socket.SHUT_WR)
        assert self.stream.read() == b""
        self.stream.close()
        self.sock.close()


def terminal_keys(rows: Iterable[dict[str, Any]]) -> dict[str, int]:
    """Every identity of a table's rows (keys and aliases) -> its terminal's index."""
    keys: dict[str, int] = {}
    for row in rows:
        for key in [row["key"], *row.get("aliases", ())]:
            index = addresses.terminal_of(key.split()[1])
            if index is not None:
                keys[key] = index
    return keys


def answer(view: dict[str, Any]) -> str:
    """Where this balancer sends a packet of the viewed key: its own binding, else the
    fleet's record, else Maglev."""
    for part in ("local", "shared"):
        if view[part] is not None:
            return str(view[part]["backend"])
    return str(view["maglev"])


class FleetBedTestCase(SynchronousTestCase):
    """A bed with three balancers and a fleet per test; everything torn down always."""

    def setUp(self) -> None:
        require_bed()
        try:
            redis_server_path()
        except StoreUnavailableError as e:
            raise SkipTest(str(e)) from None

    def start(self, key_chain: Iterable[str] = DEFAULT_CHAIN, notify: bool = False,
              lifetime: float = 300.0) -> tuple[TestBed, BedFleet]:
        bed = TestBed(terminals=TERMINALS, backends=3, balancers=3, register=not notify)
        self.addCleanup(bed.stop)
        bed.start()
        extra = ""
        if notify:
            # The home-agent agent must watch the terminals' first registrations.
            pki = BedPki(bed)
            agent = BedAgent.home_agent(bed, pki)
            self.addCleanup(agent.stop)
            agent.start()
            control.request(bed.terminal_control, "register")
            wait_for("registration", lambda: all(t["registered"]
                                                 for t in bed.terminal_status()))
            extra = notify_section(pki, [agent.peer])
        fleet = BedFleet(bed, extra=extra, key_chain=list(key_chain), lifetime=lifetime)
        self.addCleanup(fleet.stop)
        fleet.start()
        if notify:  # every balancer has the agent as a peer (docs/fleet.md)
            for k in bed.balancer_indices:
                wait_for(f"lb{k}'s connection to the agent",
                         lambda k=k: "notify: connected to ha1" in fleet[k].log())  # type: ignore[misc]
        return bed, fleet

    # -- checks -------------------------------------------------------------------------

    def assert_served_once(self, bed: TestBed, backends: dict[int, str]) -> None:
        """Each terminal's home address was accepted by its backend, and by no other."""
        for index, backend in backends.items():
            self.assertEqual(bed.served_by(str(addresses.home_address(index))), [backend],
                             f"terminal {index}")

    def spread(self, fleet: BedFleet) -> dict[int, set[int]]:
        """Per terminal, the balancers whose table holds one of its identities."""
        seen: dict[int, set[int]] = {}
        for k in fleet.balancers:
            for index in set(terminal_keys(fleet.rows(k)).values()):
                seen.setdefault(index, set()).add(k)
        return seen

    def disagreements(self, fleet: BedFleet, backends: dict[int, str]) -> list[str]:
        """Key by key, across every balancer: every identity any table holds is answered
        with its terminal's backend by every balancer, and a binding that is an exception
        to Maglev is in every balancer's replica with that backend.  What differs."""
        keys: dict[str, int] = {}
        for k in fleet.balancers:
            keys.update(terminal_keys(fleet.rows(k)))
        wrong = []
        for key, index in sorted(keys.items()):
            for k in fleet.balancers:
                view = fleet.view(k, key)
                if answer(view) != backends[index]:
                    wrong.append(f"lb{k} sends {key} to {answer(view)}, not {backends[index]}")
                local = view["local"]
                if local is not None and local["backend"] != view["maglev"]:
                    for j in fleet.balancers:
                        shared = fleet.view(j, key)["shared"]
                        if shared is None or shared["backend"] != local["backend"]:
                            wrong.append(f"lb{j}'s replica has {shared} for {key}, an "
                                         f"exception to {local['backend']} on lb{k}")
        return wrong

    def assert_converged(self, fleet: BedFleet, backends: dict[int, str],
                         timeout: float = 15.0) -> float:
        """Wait until `disagreements` is empty; how long it took."""
        started = time.monotonic()
        wrong: list[str] = []
        while time.monotonic() - started < timeout:
            wrong = self.disagreements(fleet, backends)
            if not wrong:
                return time.monotonic() - started
            time.sleep(0.2)
        self.fail(f"not converged in {timeout}s: {len(wrong)} disagreements, e.g. {wrong[:5]}")

    def moving_workload(self, bed: TestBed, fleet: BedFleet) -> dict[int, str]:
        """The bed's workload: 50 terminals, one TCP session each, moving a1 -> a2 -> a3
        mid-session.  Every session intact, one backend per terminal (the report and the
        backends' logs), the packets spread over the three balancers.  The backends."""
        report = bed.workload(moves=[2, 3], chunks=12, chunk_size=4096)
        summary = report["summary"]
        broken = {i: [c["error"] for c in t["connections"]]
                  for i, t in report["terminals"].items() if not t["sticky"]
                  or any(c["error"] for c in t["connections"])}
        self.assertEqual((summary["ok"], summary["errors"], summary["sticky"],
                          summary["moves_failed"]), (TERMINALS, 0, TERMINALS, 0), broken)
        backends = {int(i): t["backends"][0] for i, t in report["terminals"].items()}
        self.assert_served_once(bed, backends)
        # The packets crossed the balancers: each forwarded and rewrote replies, and most
        # terminals' identities are in more than one balancer's table.
        stats = {k: fleet[k].ctl("stats") for k in bed.balancer_indices}  # lbproxyctl
        for k, s in stats.items():
            self.assertGreater(s["packets_in"], 100, f"lb{k}")
            self.assertGreater(s["replies_out"], 100, f"lb{k}")
            self.assertEqual(s["fleet"]["store"]["state"], "up")
        spread = self.spread(fleet)
        crossed = sum(1 for balancers in spread.values() if len(balancers) > 1)
        print(f"\npackets in by balancer: "
              f"{ {f'lb{k}': s['packets_in'] for k, s in stats.items()} }; terminals seen "
              f"by more than one balancer: {crossed} of {TERMINALS}")
        self.assertGreater(crossed, TERMINALS // 2)
        return backends


class MovingTerminalsTests(FleetBedTestCase):
    """Must-show 1."""

    def test_default_key_chain(self) -> None:
        """Default key chain: a packet with a Home Address option is keyed by the home
        address (Maglev's answer on every balancer); its care-of addresses become aliases,
        published when Maglev would put them elsewhere.  Every balancer answers every
        identity with the terminal's backend."""
        bed, fleet = self.start()
        backends = self.moving_workload(bed, fleet)
        self.assert_converged(fleet, backends)

    def test_source_key_with_home_agent_notifications(self) -> None:
        """Key chain ``["src"]``: each care-of address is a binding of its own.  Each
        balancer has the home-agent agent as a peer and subscribes on a terminal's first
        packet; the notification of a move rekeys the new address on the balancers that
        are subscribed, and the store carries the rekey and the confirmation to the
        others, which see the new address's packets.  Every session intact on one
        backend; the exceptions are shared."""
        bed, fleet = self.start(key_chain=["src"], notify=True)
        backends = self.moving_workload(bed, fleet)
        self.assert_converged(fleet, backends)
        fleets = [fleet.stats(k)["fleet"] for k in bed.balancer_indices]
        self.assertGreater(sum(f["writes"] for f in fleets), 0)
        self.assertGreater(sum(f["confirm_writes"] for f in fleets), 0)
        self.assertGreater(sum(f["remote_confirms"] for f in fleets), 0)
        for f in fleets:
            self.assertEqual(f["refused"], {})


class BalancerFailureTests(FleetBedTestCase):
    """Must-show 2: a balancer dies mid-run and comes back."""

    def test_kill_and_revive(self) -> None:
        """Key chain ``["src"]`` with notifications (the shared records matter: a moved
        terminal's address is bound off Maglev).  Balancer 2 is withdrawn from the routes
        (what BGP/BFD does when its session drops) and killed (SIGKILL) while 50
        sessions run; its terminals go on through the others on the same backends and
        move again.  It starts again (loading the store), its next hops come back, and
        the terminals ECMP now sends it stay on their backends: from its replica, not
        from Maglev."""
        bed, fleet = self.start(key_chain=["src"], notify=True)
        sessions = {i: Session(bed, i) for i in range(1, TERMINALS + 1)}
        backends = {i: s.backend for i, s in sessions.items()}

        def echo(rounds: int = 2) -> None:
            for _ in range(rounds):
                for s in sessions.values():
                    s.echo()

        echo()
        for i in sessions:
            self.assertTrue(bed.move(i, 2)["ok"])
        echo()
        victim = 2
        its = {i for i, seen in self.spread(fleet).items() if victim in seen}
        self.assertTrue(its, "no terminal reached balancer 2")
        fleet.kill(victim)
        echo()
        for i in sessions:
            self.assertTrue(bed.move(i, 3)["ok"])
        echo(3)
        survivors = [k for k in bed.balancer_indices if k != victim]
        self.assertTrue(its & set().union(*(set(terminal_keys(fleet.rows(k)).values())
                                            for k in survivors)))

        fleet.revive(victim)
        revived = fleet.stats(victim)
        self.assertGreater(revived["fleet"]["replica"]["bindings"], 0)  # loaded
        self.assertEqual(revived["fleet"]["store"]["state"], "up")
        echo(3)
        rows = fleet.rows(victim)
        self.assertTrue(rows, "ECMP sends balancer 2 nothing after its return")
        exceptions = 0
        for key, index in terminal_keys(rows).items():
            view = fleet.view(victim, key)
            self.assertEqual(view["local"]["backend"], backends[index], key)
            exceptions += view["local"]["backend"] != view["maglev"]
        after = fleet.stats(victim)
        print(f"\nlb2 killed with {len(its)} terminals; after its return it holds "
              f"{len(rows)} bindings, {exceptions} of them off Maglev (from the store); "
              f"shared hits {after['fleet']['shared_hits']}")
        self.assertGreater(exceptions, 0)
        self.assertGreater(after["fleet"]["shared_hits"], 0)
        for s in sessions.values():
            s.close()
        self.assert_served_once(bed, backends)
        self.assert_converged(fleet, backends)


class StoreOutageTests(FleetBedTestCase):
    """Must-show 4: the store stops for 10 s mid-run."""

    def test_store_away_ten_seconds(self) -> None:
        """Default key chain, 50 sessions.  The store stops (SIGKILL: it comes back empty);
        meanwhile every terminal moves -- new care-of addresses, new aliases, new
        exceptions, each balancer's own -- and the sessions go on.  When the store is
        back, the balancers reconcile: every identity any of them holds is answered the
        same by all three, and every exception is in every replica (key by key)."""
        bed, fleet = self.start()
        sessions = {i: Session(bed, i) for i in range(1, TERMINALS + 1)}
        backends = {i: s.backend for i, s in sessions.items()}
        for s in sessions.values():
            s.echo()
        for i in sessions:
            self.assertTrue(bed.move(i, 2)["ok"])
        for s in sessions.values():
            s.echo()
        self.assert_converged(fleet, backends)
        held = sum(fleet.stats(k)["fleet"]["exceptions"] for k in bed.balancer_indices)

        fleet.store.stop()
        down = time.monotonic()
        for i in sessions:
            self.assertTrue(bed.move(i, 3)["ok"])
        rounds = 0
        while time.monotonic() - down < 10.0 and rounds < 1000:
            for s in sessions.values():
                s.echo(1024)
            rounds += 1
        states = {k: fleet.stats(k)["fleet"] for k in bed.balancer_indices}
        for k, f in states.items():
            self.assertNotEqual(f["store"]["state"], "up", f"lb{k}")
            self.assertGreaterEqual(f["store"]["outages"], 1, f"lb{k}")
        held_away = sum(f["exceptions"] for f in states.values())
        self.assertGreater(held_away, held)  # new aliases, made while the store was away
        fleet.store.start()  # empty: no persistence
        back = time.monotonic()
        wait_for("every balancer reconnected", lambda: all(
            fleet.stats(k)["fleet"]["store"]["state"] == "up" for k in bed.balancer_indices))
        took = self.assert_converged(fleet, backends, timeout=20.0)
        print(f"\nstore away {back - down:.1f} s, {rounds} echo rounds meanwhile, "
              f"exceptions held {held} -> {held_away}; converged "
              f"{time.monotonic() - back:.2f} s after its return ({took:.2f} s of checking), "
              f"{fleet.store.command('DBSIZE')} keys in the store again")
        for k in bed.balancer_indices:
            self.assertGreaterEqual(fleet.stats(k)["fleet"]["reconciled"], 1, f"lb{k}")
        for s in sessions.values():
            s.echo()
            s.close()
        self.assert_served_once(bed, backends)
