"""Raw file descriptors (a TUN device, AF_PACKET sockets) as Twisted readers.

Each wake-up drains up to ``batch`` packets, so a burst costs one trip
through the reactor rather than one per packet.
"""

from __future__ import annotations

import os
import socket
from collections.abc import Callable

from twisted.internet.interfaces import IReadDescriptor
from twisted.python.failure import Failure
from zope.interface import implementer

PACKET_OUTGOING = 4  # sll_pkttype of frames this host sent


@implementer(IReadDescriptor)
class PacketReader:
    """Calls ``deliver(packet)`` for each packet ``read()`` returns, until it returns None."""

    def __init__(self, fileno: int, read: Callable[[], bytes | None],
                 deliver: Callable[[bytes], None], name: str, batch: int = 64) -> None:
        self._fileno = fileno
        self._read = read
        self._deliver = deliver
        self._name = name
        self._batch = batch

    def fileno(self) -> int:
        return self._fileno

    def logPrefix(self) -> str:
        return self._name

    def doRead(self) -> None:
        for _ in range(self._batch):
            packet = self._read()
            if packet is None:
                return
            self._deliver(packet)

    def connectionLost(self, reason: Failure) -> None:
        pass


def tun_reader(fd: int) -> Callable[[], bytes | None]:
    """A non-blocking read of one packet from a TUN file descriptor."""

    def read() -> bytes | None:
        try:
            return os.read(fd, 65536)
        except BlockingIOError:
            return None

    return read


def packet_socket_reader(sock: socket.socket) -> Callable[[], bytes | None]:
    """A non-blocking read of one incoming packet from an AF_PACKET socket.

    Frames the host itself sent (``PACKET_OUTGOING``) are skipped.
    """

    def read() -> bytes | None:
        while True:
            try:
                data, address = sock.recvfrom(65536)
            except BlockingIOError:
                return None
            if address[2] != PACKET_OUTGOING:
                return data

    return read
