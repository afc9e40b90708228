"""A real QUIC connection moves to a new client address through the real balancer
(issue 15, must-show 3).

``twistd -n lbproxy`` in the bed's balancer namespace (docs/testbed.md) fronts three
aioquic servers, one per backend, whose connection IDs carry their QUIC-LB server ID
(`lbproxy.testbed.quicpeer`).  An aioquic client in the router's namespace, on addresses
of its own (on its loopback interface; the terminals' namespace would send them through
the mobile-node emulator), opens a connection from one address, transfers half of its
data, rebinds its socket to a second address, switches to a fresh connection ID and
sends the other half.  The second address is chosen so that Maglev, over the same
backends, puts it on another backend than the first.

In one test, with the same servers and addresses:

* key chain ``["quic", "src"]``: the moved connection stays on its backend (the server
  sees its peer change to the new address) and every byte comes back;
* key chain ``["src"]``: the moved packets reach the backend Maglev chose for the new
  address, which knows none of its connection IDs (it logs them as unknown), and the
  transfer does not complete.

`EncryptedQuicMigrationTests` runs the same with encrypted connection IDs (``[quic] key``,
the servers encrypting, the balancer decrypting).  The servers' certificate comes from a
throw-away CA made by the test; the client checks it.  Needs root and aioquic; without
them the tests skip, saying why.
"""

from __future__ import annotations

import ipaddress
import json
import time
from typing import Any

from twisted.trial.unittest import SkipTest, SynchronousTestCase

from lbproxy.core.keys import Key
from lbproxy.core.quiclb_cipher import ServerIdCipher
from lbproxy.core.selection import Backend, scheduler_from_name
from lbproxy.testbed import addresses
from lbproxy.testbed.agents import BedPki
from lbproxy.testbed.balancer import BedBalancer, bed_config
from lbproxy.testbed.bed import TestBed
from tests.bedtools import require_bed

try:
    from lbproxy.testbed.quicpeer import SERVER_NAME
except ImportError as e:  # aioquic is in the test extra
    SERVER_NAME = ""
    _NO_AIOQUIC: str | None = f"aioquic is not installed ({e})"
else:
    _NO_AIOQUIC = None

#: The client's own prefix, on the loopback interface of the router's namespace.
CLIENT_PREFIX = ipaddress.IPv6Network("2001:db8:c1::/64")
QUIC_PORT = 443
NONCE_LENGTH = 5


def server_id(index: int) -> str:
    """Backend b<i>'s QUIC-LB server ID (two octets, hex)."""
    return f"0b{index:02x}"


def quic_extra(bed: TestBed, lb_key: str = "") -> str:
    """The ``[quic]`` section (the backends' server IDs are added per backend)."""
    return (f"[quic]\nports = [{QUIC_PORT}]\nconfig_rotation = 1\n"
            f'server_id_length = 2\nnonce_length = {NONCE_LENGTH}\nkey = "{lb_key}"\n')  # fmt: skip


def with_server_ids(config: str, bed: TestBed) -> str:
    """Add ``quic_server_id`` to each ``[[backend]]`` of a `bed_config` text."""
    out = []
    for line in config.splitlines():
        out.append(line)
        if line.startswith("name = \"b"):
            index = int(line.split('"')[1][1:])
            out.append(f'quic_server_id = "{server_id(index)}"')
    return "\n".join(out) + "\n"


def maglev_choice(bed: TestBed, address: ipaddress.IPv6Address) -> str:
    """The backend the balancer's Maglev chooses for a source-address key."""
    scheduler = scheduler_from_name("maglev")
    scheduler.set_backends([Backend(addresses.backend_name(i), addresses.backend_address(i))
                            for i in bed.backend_indices])  # fmt: skip
    chosen = scheduler.choose(Key("addr", address.packed), {})
    assert chosen is not None
    return chosen.name


class QuicMigrationTests(SynchronousTestCase):
    stats: dict[str, Any]
    #: The QUIC-LB key (hex) of the servers' and the balancer's configuration: "" means
    #: unencrypted connection IDs.
    lb_key = ""

    def sid_of(self, cid_hex: str) -> str:
        """The server ID a connection ID (hex, first octet included) carries."""
        cid = bytes.fromhex(cid_hex)
        if not self.lb_key:
            return cid[1:3].hex()
        cipher = ServerIdCipher(bytes.fromhex(self.lb_key), 2, NONCE_LENGTH)
        return cipher.server_id(cid[1:]).hex()

    def setUp(self) -> None:
        require_bed()
        if _NO_AIOQUIC:
            raise SkipTest(_NO_AIOQUIC)
        self.bed = TestBed(terminals=1, backends=3, register=False)
        self.addCleanup(self.bed.stop)
        self.bed.start()
        pki = BedPki(self.bed)
        certificate, key = pki.files("quic", [SERVER_NAME])
        self.ca = pki.ca_path
        for i in self.bed.backend_indices:
            self.bed.spawn(f"srv{i}", self.bed.python_module(
                "lbproxy.testbed.quicpeer", "server", "--name", addresses.backend_name(i),
                "--address", str(addresses.backend_address(i)), "--port", str(QUIC_PORT),
                "--server-id", server_id(i), "--config-rotation", "1",
                "--nonce-length", str(NONCE_LENGTH), "--certificate", certificate, "--key", key,
                "--lb-key", self.lb_key, "--log", self.bed.path(f"quic-{i}.log")),
                name=f"quic{i}")  # fmt: skip
        self.first = CLIENT_PREFIX[1]
        home = maglev_choice(self.bed, self.first)
        self.moved = next(a for a in (CLIENT_PREFIX[n] for n in range(2, 200))
                          if maglev_choice(self.bed, a) != home)  # fmt: skip
        self.home, self.elsewhere = home, maglev_choice(self.bed, self.moved)
        for address in (self.first, self.moved):
            self.bed.run("net", ["ip", "-6", "addr", "add", f"{address}/128", "dev", "lo"])
        deadline = time.monotonic() + 10
        while not all("listening" in self.log(i) for i in self.bed.backend_indices):
            self.assertLess(time.monotonic(), deadline, "the QUIC servers did not start")
            time.sleep(0.05)

    def log(self, index: int) -> str:
        try:
            with open(self.bed.path(f"quic-{index}.log")) as f:
                return f.read()
        except FileNotFoundError:
            return ""

    def events(self, name: str, since: dict[str, int]) -> list[dict[str, Any]]:
        index = int(name[1:])
        text = self.log(index)[since.get(name, 0):]
        return [json.loads(line) for line in text.splitlines() if line]

    def transfer(
        self, key_chain: list[str], timeout: float
    ) -> tuple[dict[str, Any], dict[str, int]]:
        """Run the balancer with `key_chain` and the moving client once; the client's
        report and where each server's log stood before (`self.stats`: the balancer's
        ``lbproxyctl stats`` at the end)."""
        config = with_server_ids(bed_config(self.bed, key_chain=key_chain,
                                            extra=quic_extra(self.bed, self.lb_key)),
                                 self.bed)  # fmt: skip
        balancer = BedBalancer(self.bed, config, name=f"lbproxy-{'-'.join(key_chain)}")
        since = {addresses.backend_name(i): len(self.log(i)) for i in self.bed.backend_indices}
        balancer.start()
        try:
            result = self.bed.run("net", self.bed.python_module(
                "lbproxy.testbed.quicpeer", "client", "--server", str(addresses.VIP),
                "--port", str(QUIC_PORT), "--address", str(self.first),
                "--moved", str(self.moved), "--ca", self.ca, "--timeout", str(timeout)),
                check=False, timeout=timeout * 3)  # fmt: skip
            self.stats = balancer.ctl("stats")
        finally:
            balancer.stop()
        self.assertTrue(result.stdout.strip(), f"client said nothing: {result.stderr[-2000:]}")
        return json.loads(result.stdout.strip().splitlines()[-1]), since

    def test_quic_key_keeps_a_moved_connection_src_alone_does_not(self) -> None:
        """Must-show 3: the same move, through ["quic", "src"] and through ["src"]."""
        self.assertNotEqual(self.home, self.elsewhere)

        # With the QUIC-LB key: the moved connection stays on its backend, every byte back.
        report, since = self.transfer(["quic", "src"], timeout=10)
        self.assertTrue(report["ok"], report)
        self.assertTrue(report["moved"], report)
        self.assertEqual(report["greeting"], f"backend {self.home}")
        self.assertEqual(report["echoed"], 16 * 4000)
        # The client used two connection IDs, both issued by that backend: its server ID
        # follows the first octet (config rotation 1, length 8 - 1).
        first, after = report["cids"]
        self.assertNotEqual(first, after)
        home_index = int(self.home[1:])
        for cid in (first, after):
            self.assertEqual(cid[:2], f"{(1 << 5) | 7:02x}")
            self.assertEqual(self.sid_of(cid), server_id(home_index))
            if not self.lb_key:  # in clear, right after the first octet
                self.assertEqual(cid[2:6], server_id(home_index))
        # Every packet after the handshake's first flight was decided by the server ID.
        self.assertGreater(self.stats["hits"].get("quic", 0), 10, self.stats)
        self.assertEqual(self.stats["misses"], {"src": 1}, self.stats)
        home_events = self.events(self.home, since)
        self.assertEqual([e["peer"] for e in home_events if e["event"] == "path"],
                         [str(self.first), str(self.moved)])  # fmt: skip
        for i in self.bed.backend_indices:
            name = addresses.backend_name(i)
            self.assertEqual([e for e in self.events(name, since) if e["event"] == "unknown-cid"],
                             [], name)  # fmt: skip
            if name != self.home:
                self.assertEqual(self.events(name, since), [], name)

        # With the source address alone: after the move the packets go where Maglev puts
        # the new address -- another backend, which holds none of the connection's IDs.
        report, since = self.transfer(["src"], timeout=4)
        self.assertFalse(report["ok"], report)
        self.assertTrue(report["moved"], report)
        self.assertEqual(report["greeting"], f"backend {self.home}")
        self.assertLess(report["echoed"], 16 * 4000)
        self.assertIn("after the move", report["error"])
        self.assertEqual(self.stats["misses"], {"src": 2}, self.stats)  # both addresses
        lost = [e for e in self.events(self.elsewhere, since) if e["event"] == "unknown-cid"]
        self.assertTrue(lost, self.events(self.elsewhere, since))
        self.assertEqual({e["peer"] for e in lost}, {str(self.moved)})
        self.assertEqual({self.sid_of(e["dcid"]) for e in lost}, {server_id(home_index)})
        home_paths = [e["peer"] for e in self.events(self.home, since) if e["event"] == "path"]
        self.assertNotIn(str(self.moved), home_paths)


class EncryptedQuicMigrationTests(QuicMigrationTests):
    """The same with encrypted connection IDs (``[quic] key``; four AES passes over the
    7 octets after the first): the servers encrypt, the real balancer decrypts."""

    lb_key = "8f95f09245765f80256934e50c66207f"
