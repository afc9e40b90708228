"""Shared helpers for the tests that run in the network test bed: skip, capture, checksum.

Captured packets are dissected by scapy (the independent oracle), so this lives with the
tests, not in ``lbproxy.testbed``.
"""

from __future__ import annotations

import os
import select
import socket
import time
from collections.abc import Callable
from typing import Any

from scapy.layers.inet import TCP, UDP
from scapy.layers.inet6 import HAO, IPv6, IPv6ExtHdrRouting, _ICMPv6
from scapy.layers.l2 import Ether
from scapy.packet import Packet
from scapy.utils import checksum
from twisted.trial.unittest import SkipTest

from lbproxy.testbed import addresses
from lbproxy.testbed.bed import TestBed
from lbproxy.testbed.netns import BedUnavailableError, check_host

ETH_P_ALL = 0x0003


def require_bed() -> None:
    """Skip the test, saying why, when this host cannot build the bed (not root...)."""
    try:
        check_host()
    except BedUnavailableError as e:
        raise SkipTest(str(e)) from None


def require_xdp() -> None:
    """Skip, saying why, where the balancer's XDP executor cannot run (no bed, not root,
    no loadable program: `lbproxy.io.xdp.available` says which)."""
    require_bed()
    if os.geteuid() != 0:
        raise SkipTest("the XDP executor needs root")
    from lbproxy.io.xdp import available

    why = available()
    if why:
        raise SkipTest(why)


class Capture:
    """An AF_PACKET capture of one interface in one of the bed's namespaces."""

    def __init__(self, bed: TestBed, role: str, ifname: str) -> None:
        self.sock = bed.socket(role, socket.AF_PACKET, socket.SOCK_RAW, socket.htons(ETH_P_ALL))
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 8 << 20)
        self.sock.bind((ifname, 0))
        self.sock.setblocking(False)

    def packets(self, settle: float = 0.3) -> list[Packet]:
        """Every IPv6 packet received so far (waits `settle` seconds of silence)."""
        found = []
        while select.select([self.sock], [], [], settle)[0]:
            data, meta = self.sock.recvfrom(65600)
            if meta[1] == 0x86DD and meta[2] != socket.PACKET_OUTGOING:
                found.append(Ether(data)[IPv6])
        return found

    def close(self) -> None:
        self.sock.close()


def pseudo_addresses(pkt: Packet) -> tuple[str, str]:
    """Pseudo-header source and destination per RFC 6275 (HAO source, RH2 destination)."""
    src, dst = pkt.src, pkt.dst
    if HAO in pkt:
        src = pkt[HAO].hoa
    if IPv6ExtHdrRouting in pkt and pkt[IPv6ExtHdrRouting].segleft:
        dst = pkt[IPv6ExtHdrRouting].addresses[-1]
    return src, dst


def l4_checksum_ok(pkt: Packet) -> bool | None:
    """Is the TCP/UDP/ICMPv6 checksum right by scapy's arithmetic? None: no such layer."""
    for layer in pkt.iterpayloads():
        proto = 6 if isinstance(layer, TCP) else 17 if isinstance(layer, UDP) else (
            58 if isinstance(layer, _ICMPv6) else 0)
        if proto:
            l4 = bytes(layer)
            src, dst = pseudo_addresses(pkt)
            pseudo = (
                socket.inet_pton(socket.AF_INET6, src)
                + socket.inet_pton(socket.AF_INET6, dst)
                + len(l4).to_bytes(4, "big")
                + bytes((0, 0, 0, proto))
            )
            return checksum(pseudo + l4) == 0
    return None


def wait_for(what: str, predicate: Callable[[], Any], timeout: float = 10.0) -> Any:
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
    """A kernel TCP session from terminal ``index``'s home address to VIP:80 (ns term);
    the backend's greeting says who serves it, ``echo`` that the session still works."""

    def __init__(self, bed: TestBed, index: int, timeout: float = 10.0) -> None:
        self.index = index
        self.hoa = str(addresses.home_address(index))
        self.sock = bed.socket("term", socket.AF_INET6, socket.SOCK_STREAM)
        self.sock.settimeout(timeout)
        self.buffer = b""
        self.sent = 0
        self.sock.bind((self.hoa, 0))
        self.sock.connect((str(addresses.VIP), addresses.TCP_PORT))
        greeting = self._line().split()
        if len(greeting) != 4 or greeting[0] != "backend" or greeting[3] != self.hoa:
            raise AssertionError(f"terminal {index}: bad greeting {greeting!r}")
        self.backend = greeting[1]

    def _line(self) -> str:
        while b"\n" not in self.buffer:
            chunk = self.sock.recv(4096)
            if not chunk:
                raise ConnectionError(f"terminal {self.index}: closed before the greeting")
            self.buffer += chunk
        line, self.buffer = self.buffer.split(b"\n", 1)
        return line.decode()

    def echo(self, size: int = 6000) -> None:
        """Send ``size`` random bytes and read every one back."""
        data = os.urandom(size)
        self.sock.sendall(data)
        got, self.buffer = self.buffer, b""
        while len(got) < size:
            chunk = self.sock.recv(65536)
            if not chunk:
                raise ConnectionError(f"terminal {self.index}: closed after {len(got)} bytes")
            got += chunk
        if got != data:
            raise AssertionError(f"terminal {self.index}: echo differs")
        self.sent += size

    def close(self) -> None:
        """Half-close, read the end of the stream, close."""
        self.sock.shutdown(socket.SHUT_WR)
        rest = self.buffer
        while chunk := self.sock.recv(65536):
            rest += chunk
        self.sock.close()
        if rest:
            raise AssertionError(f"terminal {self.index}: {len(rest)} bytes after the echo")
