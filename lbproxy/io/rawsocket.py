"""The raw-socket port: moves whole IPv6 packets between the kernel and the core.

Why this module exists: the balancer does not terminate connections, it
forwards packets.  It needs to see every IPv6 packet that arrives on the
client-side link (AF_PACKET) and to send rewritten packets that the kernel
routes for it (AF_INET6 / IPPROTO_RAW).  This is the thin Twisted edge that
does exactly that and nothing else.

Theory of operation
-------------------
* Twisted's idiom, as ``twisted.pair`` binds a protocol to a tuntap port: a
  :class:`PacketReader` is the *transport* of an :class:`IPacketProtocol`.  It
  calls ``makeConnection(reader)`` when its socket opens, ``packetReceived(packet)``
  for every packet, ``connectionLost(reason)`` when it closes.  The protocol
  writes with ``transport.write(packet)``, which goes through the reader's
  :class:`IPacketWriter` (a :class:`PacketWriter`, given as ``writer=``); the
  reader flushes that writer at the end of every wake-up, so a buffering writer
  (``lbproxy.io.mmsg.BatchPacketWriter``) needs no other care.  A plain callable
  is still accepted in place of a protocol (``handle(packet)``).
* Every system call goes through an :class:`IPacketSystem` (the ``system=``
  seam of ``twisted.pair``); :class:`IBatchPacketSystem` adds ``recvmmsg`` and
  ``sendmmsg`` for the batched ports of ``lbproxy.io.mmsg``.
  :class:`LinuxPacketSystem` is the real one; ``lbproxy.testing.MemoryPacketSystem``
  is an in-memory fake that passes the same contract tests
  (``tests/test_rawsocket.py``, ``tests/test_batchport.py``).
* :class:`PacketReader` is an ``IReadDescriptor``.  The reactor wakes it when
  its socket is readable; it then *drains* up to ``batch`` packets (until
  ``EAGAIN``) in one wake-up, because per-wake-up overhead dominates at
  hundreds of thousands of packets per second.
* Packets are received into one preallocated buffer.  **Ownership rule:**
  the protocol gets a fresh ``bytearray`` holding exactly the packet; it owns
  it (may keep it, mutate it in place, or pass it on).  That is one small
  copy per packet, which the core needs anyway because it rewrites in place.
* Outgoing packets (``PACKET_OUTGOING``, what this host itself sends out of
  the interface, e.g. our own forwarded replies) never reach the protocol.
  Linux hands copies of outgoing packets only to ``ETH_P_ALL`` packet sockets
  (``dev_queue_xmit_nit``); ours is bound to ``ETH_P_IPV6``, so the kernel
  never queues them and no per-packet ``recvfrom_into`` address tuple is
  needed to skip them.  ``PACKET_IGNORE_OUTGOING`` is set as well (Linux
  >= 4.20) so that this stays true if the binding ever changes.
* An optional classic BPF filter (``SO_ATTACH_FILTER``) lets the kernel drop
  every packet whose destination is not one of the given addresses (the
  virtual addresses) before Python sees it.
* Nothing escapes to the reactor: receive errors, protocol exceptions and send
  errors are counted (and logged at exponentially spaced counts, so a flood
  of identical failures cannot flood the log).
* Opening and reading are separate steps: ``twistd`` opens the sockets as
  root in ``privilegedStartService`` and starts reading in ``startService``.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import functools
import os
import socket
import struct
import sys
from collections.abc import Callable, Iterator, Sequence
from typing import TYPE_CHECKING, Any, Protocol, cast

from twisted.internet.error import ConnectionDone
from twisted.internet.interfaces import IReactorFDSet, IReadDescriptor
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import Attribute, Interface, implementer

if TYPE_CHECKING:
    from lbproxy.io.mmsg import Batch

__all__ = [
    "DEFAULT_BATCH",
    "ETH_P_IPV6",
    "IPV6_MAX_PACKET",
    "IBatchPacketSystem",
    "IPacketProtocol",
    "IPacketSystem",
    "IPacketTransport",
    "IPacketWriter",
    "LinuxPacketSystem",
    "PacketProtocol",
    "PacketReader",
    "PacketWriter",
    "ReaderStats",
    "WriterStats",
    "destination_filter",
]

ETH_P_IPV6 = 0x86DD
#: The largest IPv6 packet without a jumbo payload: 40-byte header + 65535.
IPV6_MAX_PACKET = 40 + 65535
#: How many packets one wake-up drains at most before yielding to the reactor.
DEFAULT_BATCH = 256

# Linux constants that the socket module does not export.
_SOL_PACKET = 263
_PACKET_IGNORE_OUTGOING = 23  # Linux >= 4.20
_PACKET_STATISTICS = 6
_SO_ATTACH_FILTER = 26
_SO_RCVBUFFORCE = 33
_CLONE_NEWNET = 0x40000000

# Classic BPF opcodes (linux/filter.h).
_BPF_LD_W_ABS = 0x20  # BPF_LD | BPF_W | BPF_ABS
_BPF_JEQ_K = 0x15  # BPF_JMP | BPF_JEQ | BPF_K
_BPF_RET_K = 0x06  # BPF_RET | BPF_K
_BPF_MAX_INSNS = 4096
_BPF_ACCEPT = 0x40000  # bytes to keep: "all of it" for any IPv6 packet

_log = Logger()

#: The packet types a port and its protocol exchange.
Packet = bytes | bytearray | memoryview


class IPacketProtocol(Interface):
    """What a raw-socket port delivers packets to: the ``protocol`` of ``twisted.pair``.

    A port calls ``makeConnection`` once its socket is open, ``packetReceived`` for
    every packet, and ``connectionLost`` once it is closed.  Exceptions raised by
    ``packetReceived`` are counted and logged by the port, never raised to the reactor.
    :class:`PacketProtocol` is a base class with the usual defaults.
    """

    def makeConnection(transport: IPacketTransport) -> None:  # noqa: N805
        """The port's socket is open (packets queue from now on); ``transport`` is the port."""

    def packetReceived(packet: bytearray) -> None:  # noqa: N805
        """One packet: a fresh ``bytearray`` holding exactly it, owned by the protocol.

        The protocol may keep it, rewrite it in place and ``transport.write`` it.
        """

    def connectionLost(reason: Failure) -> None:  # noqa: N805
        """The port was closed: no more packets."""


class IPacketWriter(Interface):
    """Sends whole IPv6 packets: :class:`PacketWriter`, ``mmsg.BatchPacketWriter``."""

    def write(packet: Packet, destination: str | None = None) -> bool:  # noqa: N805
        """Send (or queue) ``packet``; False when it was dropped (and counted).

        ``destination`` (text) defaults to the packet's own destination address;
        give the final address when it differs (a Routing Header's).  A failure is
        a counted drop, never an exception.
        """

    def flush() -> None:
        """Send what is queued, if the writer queues (reading ports call it after
        every wake-up)."""


class IPacketTransport(Interface):
    """What a protocol is connected to: the reading port (:class:`PacketReader`)."""

    interface = Attribute("The name of the interface the port reads.")
    writer = Attribute("The IPacketWriter that write() sends through, or None.")

    def write(packet: Packet, destination: str | None = None) -> bool:  # noqa: N805
        """Send ``packet`` through the port's writer (:meth:`IPacketWriter.write`).

        The port flushes its writer at the end of every wake-up.  Without a writer
        it raises ``RuntimeError``.
        """


class IPacketSystem(Interface):
    """The system calls the raw-socket port makes; the seam for fakes.

    Sockets are named by integer descriptors, as in ``twisted.pair``.  Every
    method raises ``OSError`` (with the kernel's ``errno``) on failure.
    """

    # Interface methods declare no self (zope.interface), hence the noqa: N805.
    def open_reader(
        interface: str,  # noqa: N805
        destinations: Sequence[bytes] = (),
        receive_buffer: int = 0,
    ) -> int:
        """Open a non-blocking socket that receives the IPv6 packets of one interface.

        The packets come without their link-layer header.  ``destinations``
        (16-byte addresses), when given, restricts the socket to packets
        addressed to one of them (see :func:`destination_filter`).
        ``receive_buffer`` > 0 sets the socket's kernel queue size in bytes.
        Raises ``OSError(ENODEV)`` for an unknown interface.
        """

    def attach_filter(fd: int, destinations: Sequence[bytes]) -> None:  # noqa: N805
        """Replace the destination filter of a reading socket; ``()`` removes it."""

    def receive(fd: int, buffer: bytearray) -> int:  # noqa: N805
        """Copy the next packet that arrived on the interface into ``buffer``.

        Returns the packet's full length, which is larger than
        ``len(buffer)`` when the packet did not fit (its head was copied).
        Packets this host sent out of the interface are never returned.
        Raises ``BlockingIOError`` when no packet is queued.
        """

    def dropped(fd: int) -> int:  # noqa: N805
        """Packets the kernel dropped for reader ``fd`` (queue full) since the last call."""

    def receiver(fd: int) -> Callable[[bytearray], int]:  # noqa: N805
        """Return a callable doing ``receive(fd, buffer)``, for the per-packet loop.

        The port looks it up once per socket, so the real system can hand out
        the socket's own C method: no Python frame per packet.
        """

    def open_sender() -> int:
        """Open a non-blocking socket that sends whole IPv6 packets.

        The kernel routes each packet and resolves the next hop's link
        address; the packet's own header is sent as given.
        """

    def send(fd: int, packet: bytes | bytearray | memoryview, destination: str) -> int:  # noqa: N805
        """Send one IPv6 packet towards ``destination`` (its destination address as text).

        Returns the number of bytes sent.  ``BlockingIOError`` / ``ENOBUFS``
        mean the kernel's queue is full.
        """

    def sender(fd: int) -> Callable[[bytes | bytearray | memoryview, tuple[str, int]], int]:  # noqa: N805
        """Return a callable doing ``send(fd, packet, address[0])``, for the per-packet loop.

        ``address`` is ``(destination text, 0)``, the form ``socket.sendto``
        takes, so that callers can cache it per destination.
        """

    def close(fd: int) -> None:  # noqa: N805
        """Close a socket opened by this system."""


class IBatchPacketSystem(IPacketSystem):
    """The batched system calls, ``recvmmsg(2)`` and ``sendmmsg(2)``, on the sockets of
    an :class:`IPacketSystem`, for the batched ports of ``lbproxy.io.mmsg``.

    A batch is an ``lbproxy.io.mmsg.Batch``: ``struct mmsghdr`` entries, each with one
    ``iovec`` into its own ``slot``-byte part of one buffer.  The fake
    (``lbproxy.testing.MemoryPacketSystem``) reads and writes a batch through the same
    pointers the kernel follows.
    """

    def receive_batch(fd: int, batch: Batch, count: int) -> int:  # noqa: N805
        """Receive up to ``count`` packets into headers 0..n-1 of ``batch``; return n >= 1.

        Exactly as ``recvmmsg(MSG_DONTWAIT | MSG_TRUNC)`` leaves them: each packet's
        first ``batch.slot`` bytes in its slot, its *full* length in ``msg_len`` and
        ``MSG_TRUNC`` in ``msg_flags`` when it did not fit.  ``BlockingIOError`` when
        nothing is queued; other failures (``ENETDOWN``...) raise ``OSError``.
        """

    def send_batch(fd: int, batch: Batch, start: int, count: int) -> int:  # noqa: N805
        """Send headers ``start``..``start + count - 1`` of ``batch``, as ``sendmmsg``.

        Each sends ``iov_len`` bytes of its slot to its ``msg_name``: a
        ``sockaddr_in6`` on a sender socket (routed by the kernel), a ``sockaddr_ll``
        on a reader socket (out of that interface to that link-layer address).
        Returns how many the kernel took, from ``start`` on (>= 1); raises
        ``OSError`` when it refused the first one.
        """

    def interface_index(interface: str) -> int:  # noqa: N805
        """The interface's index (``OSError(ENODEV)`` when it does not exist)."""


def destination_filter(destinations: Sequence[bytes]) -> bytes:
    """Return a classic BPF program accepting IPv6 packets to one of ``destinations``.

    The program runs on the packet from its IPv6 header (a ``SOCK_DGRAM``
    packet socket has no link header) and compares the destination address
    (bytes 24-39) as four 32-bit words.  The result is the ``struct
    sock_filter`` array, ready for ``SO_ATTACH_FILTER``.
    """
    insns: list[tuple[int, int, int, int]] = []
    for address in destinations:
        if len(address) != 16:
            raise ValueError(f"an IPv6 address has 16 bytes, not {len(address)}")
        words = struct.unpack("!4I", address)
        # Nine instructions per address; a mismatch jumps to the next block.
        for i, word in enumerate(words):
            insns.append((_BPF_LD_W_ABS, 0, 0, 24 + 4 * i))
            insns.append((_BPF_JEQ_K, 0, 7 - 2 * i, word))
        insns.append((_BPF_RET_K, 0, 0, _BPF_ACCEPT))
    insns.append((_BPF_RET_K, 0, 0, 0))
    if len(insns) > _BPF_MAX_INSNS:
        raise ValueError(f"too many destinations for one filter: {len(destinations)}")
    return b"".join(struct.pack("=HBBI", *insn) for insn in insns)


@contextlib.contextmanager
def _network_namespace(name: str | None) -> Iterator[None]:
    """Run the body with this thread in network namespace ``name`` (``ip netns`` name).

    Sockets keep the namespace they were created in, so a socket opened here
    stays in ``name`` after the thread returns to its own namespace.
    """
    if name is None:
        yield
        return
    libc = ctypes.CDLL(None, use_errno=True)
    original = os.open("/proc/thread-self/ns/net", os.O_RDONLY)
    try:
        target = os.open(os.path.join("/run/netns", name), os.O_RDONLY)
        try:
            if libc.setns(target, _CLONE_NEWNET) != 0:
                code = ctypes.get_errno()
                raise OSError(code, f"setns({name}): {os.strerror(code)}")
        finally:
            os.close(target)
        try:
            yield
        finally:
            if libc.setns(original, _CLONE_NEWNET) != 0:  # pragma: no cover
                code = ctypes.get_errno()
                raise OSError(code, f"cannot return to the original namespace: {code}")
    finally:
        os.close(original)


def _mmsg_calls() -> tuple[Any, Any] | None:
    """The C library's ``recvmmsg`` and ``sendmmsg``, or None (not Linux, too old)."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        recv, send = libc.recvmmsg, libc.sendmmsg
    except (OSError, AttributeError):
        return None
    recv.argtypes = [ctypes.c_int, ctypes.c_void_p, ctypes.c_uint, ctypes.c_int,
                     ctypes.c_void_p]  # fmt: skip
    recv.restype = ctypes.c_int
    send.argtypes = [ctypes.c_int, ctypes.c_void_p, ctypes.c_uint, ctypes.c_int]
    send.restype = ctypes.c_int
    return recv, send


#: ``recvmmsg`` and ``sendmmsg`` (``lbproxy.io.mmsg.available`` says whether they work).
_MMSG_CALLS = _mmsg_calls()
_RECEIVE_FLAGS = socket.MSG_DONTWAIT | socket.MSG_TRUNC


def _errno_error(code: int, what: str) -> OSError:
    """``OSError`` for ``code``: ``BlockingIOError`` for EAGAIN and so on."""
    return OSError(code, f"{what}: {os.strerror(code)}")


class _Write(Protocol):
    def __call__(self, packet: Packet, destination: str | None = None) -> bool: ...


@implementer(IBatchPacketSystem)
class LinuxPacketSystem:
    """The real :class:`IBatchPacketSystem`: AF_PACKET readers and IPPROTO_RAW senders,
    and ``recvmmsg``/``sendmmsg`` on them through ctypes.

    Needs ``CAP_NET_RAW``.  ``namespace`` (an ``ip netns`` name) opens the
    sockets inside that network namespace instead of the caller's; the test
    suite and the benchmark use it, and so can a balancer serving links that
    live in another namespace.
    """

    def __init__(self, namespace: str | None = None) -> None:
        self.namespace = namespace
        self._sockets: dict[int, socket.socket] = {}

    def open_reader(
        self,
        interface: str,
        destinations: Sequence[bytes] = (),
        receive_buffer: int = 0,
    ) -> int:
        with _network_namespace(self.namespace):
            # Protocol 0: the socket receives nothing until bind() names the
            # interface and protocol, so no packet of another interface, and
            # none that the filter would reject, slips in before the filter.
            sock = socket.socket(socket.AF_PACKET, socket.SOCK_DGRAM, 0)
        try:
            if receive_buffer > 0:
                try:
                    sock.setsockopt(socket.SOL_SOCKET, _SO_RCVBUFFORCE, receive_buffer)
                except PermissionError:
                    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, receive_buffer)
            with contextlib.suppress(OSError):  # Linux < 4.20: ETH_P_IPV6 suffices
                sock.setsockopt(_SOL_PACKET, _PACKET_IGNORE_OUTGOING, 1)
            if destinations:
                self._attach(sock, destinations)
            sock.bind((interface, ETH_P_IPV6))
            sock.setblocking(False)
        except OSError:
            sock.close()
            raise
        fd = sock.fileno()
        self._sockets[fd] = sock
        return fd

    def attach_filter(self, fd: int, destinations: Sequence[bytes]) -> None:
        sock = self._sockets[fd]
        if destinations:
            self._attach(sock, destinations)
        else:
            # SO_DETACH_FILTER (27) fails with ENOENT when none is attached.
            with contextlib.suppress(FileNotFoundError):
                sock.setsockopt(socket.SOL_SOCKET, 27, 0)

    @staticmethod
    def _attach(sock: socket.socket, destinations: Sequence[bytes]) -> None:
        program = destination_filter(destinations)
        code = ctypes.create_string_buffer(program, len(program))
        # struct sock_fprog { unsigned short len; struct sock_filter *filter; }
        fprog = struct.pack("HL", len(program) // 8, ctypes.addressof(code))
        sock.setsockopt(socket.SOL_SOCKET, _SO_ATTACH_FILTER, fprog)

    def receive(self, fd: int, buffer: bytearray) -> int:
        # MSG_TRUNC: a packet socket then returns the packet's real length.
        return self._sockets[fd].recv_into(buffer, 0, socket.MSG_TRUNC)

    def dropped(self, fd: int) -> int:
        # struct tpacket_stats {tp_packets, tp_drops}; reading resets both.
        stats = self._sockets[fd].getsockopt(_SOL_PACKET, _PACKET_STATISTICS, 8)
        return int(struct.unpack("II", stats)[1])

    def receiver(self, fd: int) -> Callable[[bytearray], int]:
        return functools.partial(self._sockets[fd].recv_into, nbytes=0, flags=socket.MSG_TRUNC)

    def open_sender(self) -> int:
        with _network_namespace(self.namespace):
            # IPPROTO_RAW on AF_INET6 implies IPV6_HDRINCL: we send the header.
            sock = socket.socket(socket.AF_INET6, socket.SOCK_RAW, socket.IPPROTO_RAW)
        sock.setblocking(False)
        fd = sock.fileno()
        self._sockets[fd] = sock
        return fd

    def send(self, fd: int, packet: bytes | bytearray | memoryview, destination: str) -> int:
        return self._sockets[fd].sendto(packet, (destination, 0))

    def sender(self, fd: int) -> Callable[[bytes | bytearray | memoryview, tuple[str, int]], int]:
        return self._sockets[fd].sendto

    def close(self, fd: int) -> None:
        self._sockets.pop(fd).close()

    # IBatchPacketSystem: recvmmsg/sendmmsg through ctypes (Python's socket module has
    # neither); fd is one of this system's sockets.

    def receive_batch(self, fd: int, batch: Batch, count: int) -> int:
        if _MMSG_CALLS is None:
            raise _errno_error(errno.ENOSYS, "recvmmsg")
        got = int(_MMSG_CALLS[0](fd, batch.address, count, _RECEIVE_FLAGS, None))
        if got <= 0:
            # 0 cannot happen on a packet socket; say "nothing queued" rather than loop.
            raise _errno_error(ctypes.get_errno() if got < 0 else errno.EAGAIN, "recvmmsg")
        return got

    def send_batch(self, fd: int, batch: Batch, start: int, count: int) -> int:
        if _MMSG_CALLS is None:
            raise _errno_error(errno.ENOSYS, "sendmmsg")
        sent = int(_MMSG_CALLS[1](fd, batch.at(start), count, 0))
        if sent <= 0:
            raise _errno_error(ctypes.get_errno() if sent < 0 else errno.EIO, "sendmmsg")
        return sent

    def interface_index(self, interface: str) -> int:
        with _network_namespace(self.namespace):
            try:
                return socket.if_nametoindex(interface)
            except OSError as e:  # "no interface with this name", without an errno
                raise _errno_error(errno.ENODEV, interface) from e


def _should_log(count: int) -> bool:
    """True for the 1st, 2nd, 4th, 8th... occurrence: a bounded log under a flood."""
    return count & (count - 1) == 0


def _closed_receiver(buffer: bytearray) -> int:
    raise OSError(errno.EBADF, "the reader is closed")


def _closed_sender(packet: bytes | bytearray | memoryview, address: tuple[str, int]) -> int:
    raise OSError(errno.EBADF, "the writer is closed")


class ReaderStats:
    """Counters of one :class:`PacketReader`, read by metrics and the manhole."""

    __slots__ = ("errors", "handler_errors", "kernel_drops", "oversize", "received", "wakeups")

    def __init__(self) -> None:
        #: Times the reactor woke the reader.
        self.wakeups = 0
        #: Packets handed to the protocol (including those whose handling raised).
        self.received = 0
        #: Packets larger than the receive buffer, dropped.
        self.oversize = 0
        #: Receive calls that failed with anything but "nothing queued".
        self.errors = 0
        #: Packets whose handling by the protocol raised.
        self.handler_errors = 0
        #: Packets the kernel dropped because the queue was full (as of the
        #: last :meth:`PacketReader.update_stats`).
        self.kernel_drops = 0

    def __repr__(self) -> str:
        fields = ", ".join(f"{name}={getattr(self, name)}" for name in sorted(self.__slots__))
        return f"ReaderStats({fields})"


@implementer(IPacketProtocol)
class PacketProtocol:
    """A base :class:`IPacketProtocol`, as ``twisted.internet.protocol.Protocol`` is one:
    ``transport`` is set by ``makeConnection``, which calls ``connectionMade``; packets
    are dropped unless ``packetReceived`` is overridden."""

    transport: IPacketTransport | None = None

    def makeConnection(self, transport: IPacketTransport) -> None:
        self.transport = transport
        self.connectionMade()

    def connectionMade(self) -> None:
        """The port is open; ``self.transport`` is set."""

    def packetReceived(self, packet: bytearray) -> None:
        """One packet (see :meth:`IPacketProtocol.packetReceived`); dropped here."""

    def connectionLost(self, reason: Failure) -> None:
        """The port was closed."""


@implementer(IPacketProtocol)
class _HandlerProtocol:
    """The protocol of a port given a callable: ``handle(packet)`` is ``packetReceived``
    (the callable itself: no frame in between); with ``emit``, a result of ``handle``
    that is not None goes to ``emit``."""

    packetReceived: Callable[[bytearray], None]

    def __init__(
        self, handle: Callable[[bytearray], object], emit: Callable[[Any], object] | None = None
    ) -> None:
        self.handle = handle
        self.emit = emit
        if emit is None:
            self.packetReceived = cast(Callable[[bytearray], None], handle)
        else:

            def received(packet: bytearray) -> None:
                out = handle(packet)
                if out is not None:
                    emit(out)

            self.packetReceived = received

    def makeConnection(self, transport: IPacketTransport) -> None:
        pass

    def connectionLost(self, reason: Failure) -> None:
        pass


def _no_writer(packet: Packet, destination: str | None = None) -> bool:
    raise RuntimeError("this port has no writer: give it one (writer=) to write")


@implementer(IReadDescriptor, IPacketTransport)
class PacketReader:
    """Reads the IPv6 packets of one interface and hands each to its protocol.

    Life cycle: ``open()`` (needs privileges; ``protocol.makeConnection(reader)``) →
    ``startReading()`` ⇄ ``stopReading()`` → ``close()``
    (``protocol.connectionLost``).  ``protocol`` is an :class:`IPacketProtocol`, or a
    callable ``handle(packet)`` used as its ``packetReceived``.  The reader is the
    protocol's transport: ``write`` sends through ``writer``, flushed after every
    wake-up.  The reader never raises into the reactor.
    """

    #: Sends through the writer: the writer's own ``write`` (no frame in between).
    write: _Write

    def __init__(
        self,
        system: IPacketSystem,
        reactor: IReactorFDSet,
        interface: str,
        protocol: IPacketProtocol | Callable[[bytearray], object],
        *,
        writer: IPacketWriter | None = None,
        destinations: Sequence[bytes] = (),
        batch: int = DEFAULT_BATCH,
        max_packet: int = IPV6_MAX_PACKET,
        receive_buffer: int = 0,
    ) -> None:
        if batch < 1:
            raise ValueError("batch must be at least 1")
        self.system = system
        self.reactor = reactor
        self.interface = interface
        self.protocol: IPacketProtocol = _as_protocol(protocol)
        self.writer = writer
        self.write = writer.write if writer is not None else _no_writer
        self.destinations = tuple(destinations)
        self.batch = batch
        self.receive_buffer = receive_buffer
        self.stats = ReaderStats()
        self._buffer = bytearray(max_packet)
        self._fd = -1
        self._receive: Callable[[bytearray], int] = _closed_receiver
        self._reading = False

    # Life cycle -----------------------------------------------------------

    def open(self) -> None:
        """Open the socket (privileged); packets queue in the kernel from now on, and
        the protocol is connected (``makeConnection``)."""
        if self._fd < 0:
            self._fd = self.system.open_reader(
                self.interface, self.destinations, self.receive_buffer
            )
            self._receive = self.system.receiver(self._fd)
            self.protocol.makeConnection(self)

    def set_destinations(self, destinations: Sequence[bytes]) -> None:
        """Change the destination filter (``()``: every IPv6 packet), e.g. on reload."""
        self.destinations = tuple(destinations)
        if self._fd >= 0:
            self.system.attach_filter(self._fd, self.destinations)

    def startReading(self) -> None:
        """Ask the reactor to call :meth:`doRead` whenever packets are queued."""
        if self._fd < 0:
            raise RuntimeError("open() the reader before startReading()")
        if not self._reading:
            self._reading = True
            self.reactor.addReader(self)

    def stopReading(self) -> None:
        """Stop reading; packets keep queueing in the kernel (up to its buffer)."""
        if self._reading:
            self._reading = False
            self.reactor.removeReader(self)

    def close(self) -> None:
        """Stop reading, close the socket, tell the protocol.  Safe to call twice."""
        self.stopReading()
        if self._fd >= 0:
            with contextlib.suppress(OSError):
                self.update_stats()
            fd, self._fd = self._fd, -1
            self._receive = _closed_receiver
            try:
                self.system.close(fd)
            finally:
                try:
                    self.protocol.connectionLost(Failure(ConnectionDone("the port was closed")))
                except Exception:
                    _log.failure("{prefix}: connectionLost failed", prefix=self.logPrefix())

    def update_stats(self) -> ReaderStats:
        """Fetch the kernel's drop count into ``stats.kernel_drops``; return the stats.

        One system call: metrics and the manhole call it when they read the
        counters, not the packet loop.
        """
        if self._fd >= 0:
            self.stats.kernel_drops += self.system.dropped(self._fd)
        return self.stats

    @property
    def reading(self) -> bool:
        """Whether the reactor is watching the socket."""
        return self._reading

    # IReadDescriptor ------------------------------------------------------

    def fileno(self) -> int:
        return self._fd

    def logPrefix(self) -> str:
        return f"{type(self).__name__}({self.interface})"

    def connectionLost(self, reason: Failure) -> None:
        """The reactor dropped us (shutdown or a bug): forget the registration.

        The socket stays open until :meth:`close`, which tells the protocol.
        """
        self._reading = False

    def doRead(self) -> None:
        """Drain up to ``batch`` packets; count everything, raise nothing."""
        stats = self.stats
        stats.wakeups += 1
        receive = self._receive
        handle = self.protocol.packetReceived
        buffer = self._buffer
        size = len(buffer)
        received = oversize = 0
        try:
            for _ in range(self.batch):
                length = receive(buffer)
                if length > size:
                    oversize += 1
                    continue
                received += 1
                try:
                    handle(buffer[:length])
                except Exception:
                    self._handler_failed()
        except BlockingIOError:
            pass  # drained
        except OSError as e:
            # For example ENETDOWN once when the link goes down; the kernel
            # resumes delivery when it comes back up, so keep the registration.
            self._receive_failed(e)
        except Exception:
            # A broken system object must not kill the reactor either.
            stats.errors += 1
            if _should_log(stats.errors):
                _log.failure("{prefix}: receive failed", prefix=self.logPrefix())
        finally:
            stats.received += received
            stats.oversize += oversize
            self._wakeup_done()

    # For the subclasses and the loop above ---------------------------------

    def _handler_failed(self) -> None:
        """Count and (boundedly) log the exception being handled, a protocol's."""
        stats = self.stats
        stats.handler_errors += 1
        if _should_log(stats.handler_errors):
            _log.failure(
                "{prefix}: packet handler failed ({count} so far)",
                prefix=self.logPrefix(),
                count=stats.handler_errors,
            )

    def _receive_failed(self, error: OSError) -> None:
        stats = self.stats
        stats.errors += 1
        if _should_log(stats.errors):
            _log.warn(
                "{prefix}: receive failed: {error} ({count} so far)",
                prefix=self.logPrefix(),
                error=error,
                count=stats.errors,
            )

    def _wakeup_done(self) -> None:
        """The end of a wake-up: flush the writer (queued packets wait for nothing else)."""
        writer = self.writer
        if writer is not None:
            try:
                writer.flush()
            except Exception:
                _log.failure("{prefix}: flushing the writer failed", prefix=self.logPrefix())


def _as_protocol(protocol: IPacketProtocol | Callable[[bytearray], object]) -> IPacketProtocol:
    if IPacketProtocol.providedBy(protocol):
        return protocol
    if callable(protocol):
        return _HandlerProtocol(protocol)
    raise TypeError(f"{protocol!r} is neither an IPacketProtocol nor callable")


class WriterStats:
    """Counters of one :class:`PacketWriter`."""

    __slots__ = ("dropped", "errors", "sent")

    def __init__(self) -> None:
        #: Packets the kernel accepted.
        self.sent = 0
        #: Packets not sent, whatever the reason.
        self.dropped = 0
        #: Dropped packets by errno name ("ENOBUFS", "EAGAIN", "ENETUNREACH", ...).
        self.errors: dict[str, int] = {}

    def __repr__(self) -> str:
        return f"WriterStats(sent={self.sent}, dropped={self.dropped}, errors={self.errors})"


@implementer(IPacketWriter)
class PacketWriter:
    """Sends whole IPv6 packets; the kernel routes them and resolves neighbours.

    A send that fails (full queue, no route, too big...) is a counted drop,
    never an exception: a forwarder must not stop for one packet.  ``write`` and
    ``send`` are one method; ``flush`` has nothing to do (nothing is queued).
    """

    #: Destination-text cache bound (destinations are backends and terminals).
    cache_size = 4096

    def __init__(self, system: IPacketSystem) -> None:
        self.system = system
        self.stats = WriterStats()
        self._fd = -1
        self._send: Callable[[bytes | bytearray | memoryview, tuple[str, int]], int]
        self._send = _closed_sender
        self._addresses: dict[bytes, tuple[str, int]] = {}

    def open(self) -> None:
        """Open the sending socket (privileged)."""
        if self._fd < 0:
            self._fd = self.system.open_sender()
            self._send = self.system.sender(self._fd)

    def close(self) -> None:
        """Close the socket.  Safe to call twice."""
        if self._fd >= 0:
            fd, self._fd = self._fd, -1
            self._send = _closed_sender
            self.system.close(fd)

    def fileno(self) -> int:
        """The sending socket's descriptor, -1 when closed."""
        return self._fd

    def send(self, packet: bytes | bytearray | memoryview, destination: str | None = None) -> bool:
        """Send ``packet``; return whether the kernel took it.

        ``destination`` defaults to the packet's own destination address;
        pass the final address if it differs (e.g. a Routing Header's).
        """
        if destination is None:
            packed = bytes(packet[24:40])
            address = self._addresses.get(packed)
            if address is None:
                if len(packed) != 16:
                    return self._drop("EINVAL", "not an IPv6 packet")
                if len(self._addresses) >= self.cache_size:
                    self._addresses.clear()
                address = (socket.inet_ntop(socket.AF_INET6, packed), 0)
                self._addresses[packed] = address
        else:
            address = (destination, 0)
        try:
            self._send(packet, address)
        except OSError as e:
            name = errno.errorcode.get(e.errno or 0, str(e.errno))
            return self._drop(name, e)
        self.stats.sent += 1
        return True

    write = send

    def flush(self) -> None:
        """Nothing to do: every packet was sent by :meth:`send`."""

    def _drop(self, name: str, error: object) -> bool:
        stats = self.stats
        stats.dropped += 1
        count = stats.errors[name] = stats.errors.get(name, 0) + 1
        if _should_log(count):
            _log.warn(
                "PacketWriter: send failed: {error} ({count} {name} so far)",
                error=error,
                count=count,
                name=name,
            )
        return False
