"""`lbproxy.io.neighbours.NeighbourTable` against the kernel's neighbour table.

One network namespace per test (root needed; skipped with the reason otherwise) with a
veth pair inside it and neighbour entries in every state the kernel lets us make: static
ones (``ip -6 neigh add ... nud STATE``) and DELAY, which only traffic to a STALE entry
makes.  The table must return exactly the usable IPv6 entries of its one interface.
"""

from __future__ import annotations

import errno
import json
import os
import shutil
import socket
import subprocess

from twisted.trial.unittest import SkipTest, SynchronousTestCase

from lbproxy.io.neighbours import NeighbourTable
from lbproxy.io.rawsocket import _network_namespace

INTERFACE = "lbnba"
OTHER = "lbnbb"
OWN = "2001:db8:99::100"


def mac(n: int) -> str:
    return f"02:00:5e:99:00:{n:02x}"


def address(n: int) -> str:
    return f"2001:db8:99::{n:x}"


#: Entry number -> the state asked for ("delay": made by traffic to a STALE entry).
USABLE = {1: "permanent", 2: "reachable", 3: "stale", 4: "probe", 5: "delay"}
UNUSABLE = {6: "noarp", 7: "incomplete", 8: "failed", 9: "none"}


class NeighbourTableTests(SynchronousTestCase):
    def setUp(self) -> None:
        if os.geteuid() != 0:
            raise SkipTest("neighbour table tests: need root to create network namespaces")
        if shutil.which("ip") is None:
            raise SkipTest("neighbour table tests: need iproute2's ip command")
        NeighbourTableTests._count += 1
        self.namespace = f"lbnb{os.getpid()}x{self._count}"
        self.ip("netns", "add", self.namespace)
        self.addCleanup(subprocess.run, ["ip", "netns", "del", self.namespace],
                        check=False, capture_output=True)  # fmt: skip
        self.ip("-n", self.namespace, "link", "add", INTERFACE, "type", "veth", "peer",
                "name", OTHER)  # fmt: skip
        # Slow timers, so that every entry stays in its state while the test reads it.
        for key in ("retrans_time_ms=600000", "delay_first_probe_time=600",
                    "base_reachable_time_ms=600000"):  # fmt: skip
            self.ip("netns", "exec", self.namespace, "sysctl", "-qw",
                    f"net.ipv6.neigh.{INTERFACE}.{key}")  # fmt: skip
        self.ip("netns", "exec", self.namespace, "sysctl", "-qw",
                f"net.ipv6.conf.{INTERFACE}.accept_dad=0")  # fmt: skip
        for name in (INTERFACE, OTHER):
            self.ip("-n", self.namespace, "link", "set", name, "up")
        self.ip("-n", self.namespace, "addr", "add", f"{OWN}/64", "dev", INTERFACE, "nodad")

    _count = 0

    def ip(self, *args: str) -> None:
        subprocess.run(["ip", *args], check=True, capture_output=True, timeout=30)

    def neigh(self, n: int, state: str, lladdr: bool = True, dev: str = INTERFACE) -> None:
        link = ["lladdr", mac(n)] if lladdr else []
        self.ip("-n", self.namespace, "-6", "neigh", "add", address(n), *link, "dev", dev,
                "nud", state)  # fmt: skip

    def states(self) -> dict[str, str]:
        """What the kernel says: address -> state, for the interface."""
        out = subprocess.run(
            ["ip", "-j", "-n", self.namespace, "-6", "neigh", "show", "nud", "all", "dev",
             INTERFACE], check=True, capture_output=True, text=True, timeout=30,
        ).stdout  # fmt: skip
        return {e["dst"]: ",".join(e.get("state", ["NONE"])) for e in json.loads(out or "[]")}

    def table(self, interface: str = INTERFACE) -> NeighbourTable:
        table = NeighbourTable(interface, self.namespace)
        self.addCleanup(table.close)
        return table

    def test_usable_entries_of_the_interface(self) -> None:
        """REACHABLE, STALE, DELAY, PROBE and PERMANENT entries are read, with their
        link-layer addresses; NOARP, INCOMPLETE, FAILED and NONE are not, nor another
        interface's entries, nor IPv4 ones."""
        for n, state in USABLE.items():
            self.neigh(n, "stale" if state == "delay" else state)
        for n, state in UNUSABLE.items():
            self.neigh(n, state, lladdr=state == "noarp")
        self.neigh(0xBB, "permanent", dev=OTHER)
        self.ip("-n", self.namespace, "-4", "neigh", "add", "192.0.2.1", "lladdr", mac(0x44),
                "dev", INTERFACE, "nud", "permanent")  # fmt: skip
        # Traffic to a STALE entry makes it DELAY (for delay_first_probe_time).
        with _network_namespace(self.namespace):
            sender = socket.socket(socket.AF_INET6, socket.SOCK_DGRAM)
        with sender:
            sender.sendto(b"x", (address(5), 9))
        expected_states = {address(n): s.upper() for n, s in {**USABLE, **UNUSABLE}.items()}
        expected_states[address(9)] = "NONE"
        states = self.states()
        self.assertEqual({a: states.get(a) for a in expected_states}, expected_states)
        table = self.table()
        found = table.read()
        self.assertEqual(
            found,
            {socket.inet_pton(socket.AF_INET6, address(n)): bytes.fromhex(mac(n).replace(":", ""))
             for n in USABLE},
        )  # fmt: skip
        self.assertEqual(table.read(), found)  # the socket is kept and reusable
        # Asked for addresses: the usable ones among them, one query each -- not an
        # unusable entry, another interface's (0xBB), nor one the table does not have.
        def packed(n: int) -> bytes:
            return socket.inet_pton(socket.AF_INET6, address(n))

        asked = [packed(n) for n in (*USABLE, *UNUSABLE, 0xBB, 0x77)]
        self.assertEqual(table.read(asked), found)
        first = next(iter(USABLE))
        self.assertEqual(table.read([packed(first), packed(0x77)]),
                         {packed(first): found[packed(first)]})  # fmt: skip
        self.assertEqual(table.read([]), {})

    def test_ifindex_in_the_namespace(self) -> None:
        """``ifindex`` is the interface's index in the table's namespace."""
        out = subprocess.run(["ip", "-j", "-n", self.namespace, "link", "show", INTERFACE],
                             check=True, capture_output=True, text=True, timeout=30).stdout
        self.assertEqual(self.table().ifindex, json.loads(out)[0]["ifindex"])
        self.assertEqual(self.table(OTHER).read(), {})

    def test_entries_come_and_go(self) -> None:
        """A read sees the table as it is now: added, changed and removed entries."""
        table = self.table()
        self.assertEqual(table.read(), {})
        self.neigh(1, "permanent")
        packed = socket.inet_pton(socket.AF_INET6, address(1))
        self.assertEqual(table.read(), {packed: bytes.fromhex(mac(1).replace(":", ""))})
        self.ip("-n", self.namespace, "-6", "neigh", "replace", address(1), "lladdr", mac(2),
                "dev", INTERFACE, "nud", "stale")  # fmt: skip
        self.assertEqual(table.read(), {packed: bytes.fromhex(mac(2).replace(":", ""))})
        self.ip("-n", self.namespace, "-6", "neigh", "del", address(1), "dev", INTERFACE)
        self.assertEqual(table.read(), {})

    def test_failures(self) -> None:
        """No such interface: ENODEV; no such namespace: an OSError; closed: EBADF, and
        closing twice is harmless."""
        with self.assertRaises(OSError) as caught:
            NeighbourTable("lbnb-nosuch", self.namespace)
        self.assertEqual(caught.exception.errno, errno.ENODEV)
        self.assertRaises(OSError, NeighbourTable, INTERFACE, f"{self.namespace}-nosuch")
        table = NeighbourTable(INTERFACE, self.namespace)
        table.close()
        table.close()
        with self.assertRaises(OSError) as caught:
            table.read()
        self.assertEqual(caught.exception.errno, errno.EBADF)
