"""The raw-socket port: moves whole IPv6 packets between the kernel and the core.

Why this module exists: the balancer does not terminate connections, it
forwards packets.  It needs to see every IPv6 packet that arrives on the
client-side link (AF_PACKET) and to send rewritten packets that the kernel
routes for it (AF_INET6 / IPPROTO_RAW).  This is the thin Twisted edge that
does exactly that and nothing else.

Theory of operation
-------------------
* Every system call goes through an :class:`IPacketSystem` (the ``system=``
  seam of ``twisted.pair``).  :class:`LinuxPacketSystem` is the real one;
  ``lbproxy.testing.MemoryPacketSystem`` is an in-memory fake that passes the
  same contract tests (``tests/test_rawsocket.py``).
* :class:`PacketReader` is an ``IReadDescriptor``.  The reactor wakes it when
  its socket is readable; it then *drains* up to ``batch`` packets (until
  ``EAGAIN``) in one wake-up, because per-wake-up overhead dominates at
  hundreds of thousands of packets per second.
* Packets are received into one preallocated buffer.  **Ownership rule:**
  the handler gets a fresh ``bytearray`` holding exactly the packet; it owns
  it (may keep it, mutate it in place, or pass it on).  That is one small
  copy per packet, which the core needs anyway because it rewrites in place.
* Outgoing packets (``PACKET_OUTGOING``, what this host itself sends out of
  the interface, e.g. our own forwarded replies) never reach the handler.
  Linux hands copies of outgoing packets only to ``ETH_P_ALL`` packet sockets
  (``dev_queue_xmit_nit``); ours is bound to ``ETH_P_IPV6``, so the kernel
  never queues them and no per-packet ``recvfrom_into`` address tuple is
  needed to skip them.  ``PACKET_IGNORE_OUTGOING`` is set as well (Linux
  >= 4.20) so that this stays true if the binding ever changes.
* An optional classic BPF filter (``SO_ATTACH_FILTER``) lets the kernel drop
  every packet whose destination is not one of the given addresses (the
  virtual addresses) before Python sees it.
* Nothing escapes to the reactor: receive errors, handler exceptions and send
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
from collections.abc import Callable, Iterator, Sequence

from twisted.internet.interfaces import IReactorFDSet, IReadDescriptor
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import Interface, implementer

__all__ = [
    "DEFAULT_BATCH",
    "ETH_P_IPV6",
    "IPV6_MAX_PACKET",
    "IPacketSystem",
    "LinuxPacketSystem",
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


@implementer(IPacketSystem)
class LinuxPacketSystem:
    """The real :class:`IPacketSystem`: AF_PACKET readers and IPPROTO_RAW senders.

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
        #: Packets handed to the handler (including those whose handler raised).
        self.received = 0
        #: Packets larger than the receive buffer, dropped.
        self.oversize = 0
        #: Receive calls that failed with anything but "nothing queued".
        self.errors = 0
        #: Packets whose handler raised.
        self.handler_errors = 0
        #: Packets the kernel dropped because the queue was full (as of the
        #: last :meth:`PacketReader.update_stats`).
        self.kernel_drops = 0

    def __repr__(self) -> str:
        fields = ", ".join(f"{name}={getattr(self, name)}" for name in sorted(self.__slots__))
        return f"ReaderStats({fields})"


@implementer(IReadDescriptor)
class PacketReader:
    """Reads the IPv6 packets of one interface and hands each to ``handle``.

    Life cycle: ``open()`` (needs privileges) → ``startReading()`` ⇄
    ``stopReading()`` → ``close()``.  ``handle(packet)`` receives a fresh
    ``bytearray`` it owns.  The reader never raises into the reactor.
    """

    def __init__(
        self,
        system: IPacketSystem,
        reactor: IReactorFDSet,
        interface: str,
        handle: Callable[[bytearray], object],
        *,
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
        self.handle = handle
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
        """Open the socket (privileged); packets queue in the kernel from now on."""
        if self._fd < 0:
            self._fd = self.system.open_reader(
                self.interface, self.destinations, self.receive_buffer
            )
            self._receive = self.system.receiver(self._fd)

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
        """Stop reading and close the socket.  Safe to call twice."""
        self.stopReading()
        if self._fd >= 0:
            with contextlib.suppress(OSError):
                self.update_stats()
            fd, self._fd = self._fd, -1
            self._receive = _closed_receiver
            self.system.close(fd)

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
        return f"PacketReader({self.interface})"

    def connectionLost(self, reason: Failure) -> None:
        """The reactor dropped us (shutdown or a bug): forget the registration."""
        self._reading = False

    def doRead(self) -> None:
        """Drain up to ``batch`` packets; count everything, raise nothing."""
        stats = self.stats
        stats.wakeups += 1
        receive = self._receive
        handle = self.handle
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
                    stats.handler_errors += 1
                    if _should_log(stats.handler_errors):
                        _log.failure(
                            "{prefix}: packet handler failed ({count} so far)",
                            prefix=self.logPrefix(),
                            count=stats.handler_errors,
                        )
        except BlockingIOError:
            pass  # drained
        except OSError as e:
            # For example ENETDOWN once when the link goes down; the kernel
            # resumes delivery when it comes back up, so keep the registration.
            stats.errors += 1
            if _should_log(stats.errors):
                _log.warn(
                    "{prefix}: receive failed: {error} ({count} so far)",
                    prefix=self.logPrefix(),
                    error=e,
                    count=stats.errors,
                )
        except Exception:
            # A broken system object must not kill the reactor either.
            stats.errors += 1
            if _should_log(stats.errors):
                _log.failure("{prefix}: receive failed", prefix=self.logPrefix())
        finally:
            stats.received += received
            stats.oversize += oversize


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


class PacketWriter:
    """Sends whole IPv6 packets; the kernel routes them and resolves neighbours.

    A send that fails (full queue, no route, too big...) is a counted drop,
    never an exception: a forwarder must not stop for one packet.
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
