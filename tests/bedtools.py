"""Shared helpers for the tests that run in the network test bed: skip, capture, checksum.

Captured packets are dissected by scapy (the independent oracle), so this lives with the
tests, not in ``lbproxy.testbed``.
"""

from __future__ import annotations

import os
import select
import socket

from scapy.layers.inet import TCP, UDP
from scapy.layers.inet6 import HAO, IPv6, IPv6ExtHdrRouting, _ICMPv6
from scapy.layers.l2 import Ether
from scapy.packet import Packet
from scapy.utils import checksum
from twisted.trial.unittest import SkipTest

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
