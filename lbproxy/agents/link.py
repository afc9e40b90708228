"""Reading every frame on the home agent's link, both directions, with an AF_PACKET socket.

The home-agent agent must see the Binding Updates arriving at the home agent *and* the
Binding Acknowledgements it sends.  When the agent runs on the home agent's own host, the
Acknowledgements are outgoing packets, which Linux copies only to ``ETH_P_ALL`` packet
sockets; so this reader binds ``ETH_P_ALL`` to one interface (unlike the balancer's
``lbproxy.io.rawsocket`` reader, which wants incoming IPv6 only).  Mobility signalling is rare,
so each wake-up drains a bounded batch and hands each frame to the observer.
"""

from __future__ import annotations

import socket
from collections.abc import Callable

from twisted.internet.interfaces import IReactorFDSet, IReadDescriptor
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

ETH_P_ALL = 0x0003
log = Logger()


@implementer(IReadDescriptor)
class SocketReader:
    """One non-blocking socket watched by the reactor: the life cycle both agents' readers
    share.  Subclasses make the socket in :meth:`open` and read it in ``doRead``."""

    reactor: IReactorFDSet
    sock: socket.socket | None

    def open(self) -> None:
        raise NotImplementedError

    def doRead(self) -> None:
        raise NotImplementedError

    def start(self) -> None:
        """Start reading (opening first if needed)."""
        if self.sock is None:
            self.open()
        self.reactor.addReader(self)

    def stop(self) -> None:
        """Stop reading and close the socket."""
        if self.sock is not None:
            self.reactor.removeReader(self)
            self.sock.close()
            self.sock = None

    def fileno(self) -> int:
        return -1 if self.sock is None else self.sock.fileno()

    def logPrefix(self) -> str:
        return type(self).__name__

    def connectionLost(self, reason: Failure) -> None:
        self.stop()


class LinkReader(SocketReader):
    """Delivers each frame seen on ``interface`` to ``handler``."""

    def __init__(
        self,
        reactor: IReactorFDSet,
        interface: str,
        handler: Callable[[bytes], object],
        batch: int = 256,
    ) -> None:
        self.reactor = reactor
        self.interface = interface
        self.handler = handler
        self.batch = batch
        self.sock: socket.socket | None = None
        self.frames = 0
        self.errors = 0

    def open(self) -> None:
        """Open and bind the socket (needs CAP_NET_RAW: call from privilegedStartService)."""
        sock = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(ETH_P_ALL))
        sock.setblocking(False)
        sock.bind((self.interface, 0))
        self.sock = sock

    def logPrefix(self) -> str:
        return f"LinkReader({self.interface})"

    def doRead(self) -> None:
        """Drain up to ``batch`` frames."""
        sock = self.sock
        if sock is None:
            return
        for _ in range(self.batch):
            try:
                frame = sock.recv(65535)
            except BlockingIOError:
                return
            except OSError as e:
                self.errors += 1
                log.warn("link reader: {error}", error=e)
                return
            self.frames += 1
            try:
                self.handler(frame)
            except Exception:
                self.errors += 1
                log.failure("link reader: handler failed")
