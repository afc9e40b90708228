"""Batched packet I/O for the raw-socket port: ``recvmmsg(2)`` and ``sendmmsg(2)``.

Why this exists: at a few hundred thousand packets per second the balancer's budget is a
few microseconds per packet, and one ``recv_into`` plus one ``sendto`` per packet spend a
large share of it on system-call entry and on CPython's socket-call machinery.  Python's
``socket`` module has neither ``recvmmsg`` nor ``sendmmsg``; an
:class:`~lbproxy.io.rawsocket.IBatchPacketSystem` makes them (the Linux one through
``ctypes``, the in-memory fake of ``lbproxy.testing`` by following the same pointers), so
one call moves up to :data:`SLOTS` packets.

Theory of operation
-------------------
* A :class:`Batch` is ``count`` ``struct mmsghdr`` entries, each with one ``iovec``
  pointing into its own slot of one buffer.  Its accessors (``length(i)``,
  ``packet(i)``, ``set_iov_length(i, n)``, ``set_destination(i, packed)``...) name
  the fields; loops that must index the ``memoryview`` casts directly use the stride
  constants (``lengths[LENGTH_STRIDE * i + LENGTH_AT]`` is ``msg_len`` of header i),
  which cost an index operation, not a ctypes attribute access.
* :class:`BatchPacketReader` is a :class:`~lbproxy.io.rawsocket.PacketReader` that
  drains with ``recvmmsg``.  Same contract: the protocol's ``packetReceived`` gets a
  fresh ``bytearray`` it owns, the same statistics, nothing raises into the reactor,
  the writer is flushed after every wake-up.  A protocol that also provides
  :class:`IBatchPacketProtocol` gets each batch whole instead
  (``batchReceived(batch, count, deliver)``, the fast path) and hands back, in their
  turn, the packets it leaves: ``deliver(batch.start(i), batch.length(i))``.
* :class:`BatchPacketWriter` is a :class:`~lbproxy.io.rawsocket.PacketWriter` whose
  ``write``/``send`` copies the packet into the next slot of a queue and its destination
  into the slot's own ``sockaddr_in6`` (so any number of destinations costs nothing to
  remember) and returns True ("queued"); :meth:`BatchPacketWriter.flush` sends the
  queues with ``sendmmsg`` and a full queue flushes itself.  ``stats.sent`` counts what
  the kernel took; a refused packet is a counted drop, as with the plain writer, only
  counted at flush time.  Packets go out in the order they were queued (per queue).
  The fast path fills the queues itself (``routes``, ``raw_route``, ``flush_queue``).

With the Linux system, :func:`available` says whether the C library has the calls and
the structures have the LP64 layout assumed here.  ``lbproxy.testing.MemoryPacketSystem``
provides the same calls, so these very ports run in memory too
(``tests/test_batchport.py`` holds both to one contract).
"""

from __future__ import annotations

import ctypes
import errno
import socket
import struct
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from twisted.internet.interfaces import IReactorFDSet
from twisted.logger import Logger
from zope.interface import implementer

from lbproxy.io.neighbours import USABLE_STATES, NeighbourTable
from lbproxy.io.rawsocket import (
    _MMSG_CALLS,
    DEFAULT_BATCH,
    ETH_P_IPV6,
    IPV6_MAX_PACKET,
    IBatchPacketSystem,
    IPacketProtocol,
    IPacketSystem,
    IPacketWriter,
    Packet,
    PacketReader,
    PacketWriter,
    _HandlerProtocol,
    _should_log,
)

__all__ = [
    "ADDRESS_AT",
    "ADDRESS_STRIDE",
    "FLAGS_AT",
    "IOV_LENGTH_AT",
    "IOV_STRIDE",
    "LENGTH_AT",
    "LENGTH_STRIDE",
    "NAME_STRIDE",
    "SLOTS",
    "USABLE_STATES",
    "Batch",
    "BatchPacketReader",
    "BatchPacketWriter",
    "IBatchPacketProtocol",
    "NeighbourTable",
    "available",
]

#: Packets moved per system call at most.
SLOTS = 64

# The layout of a batch, for loops that index its memoryviews directly (LP64: x86-64,
# arm64; `available` checks it).  A 64-byte ``struct mmsghdr`` is 16 32-bit words or 8
# 64-bit words: ``msg_name`` at byte 0, ``msg_flags`` at byte 48, ``msg_len`` at byte 56;
# a 16-byte ``struct iovec`` has ``iov_len`` at byte 8; a 28-byte ``sockaddr_in6`` has
# its address at byte 8.
#: ``Batch.lengths`` (32-bit words): ``msg_len`` of header i is
#: ``lengths[LENGTH_STRIDE * i + LENGTH_AT]``.
LENGTH_STRIDE = 16
LENGTH_AT = 14
#: ``msg_flags`` of header i is ``lengths[LENGTH_STRIDE * i + FLAGS_AT]``.
FLAGS_AT = 12
#: ``Batch.names`` (64-bit words): ``msg_name`` of header i is ``names[NAME_STRIDE * i]``.
NAME_STRIDE = 8
#: ``Batch.iov_lengths`` (64-bit words): ``iov_len`` of iovec i is
#: ``iov_lengths[IOV_STRIDE * i + IOV_LENGTH_AT]``.
IOV_STRIDE = 2
IOV_LENGTH_AT = 1
#: ``Batch.addresses`` (bytes, addressed batches): the destination of slot i is
#: ``addresses[ADDRESS_STRIDE * i + ADDRESS_AT : ADDRESS_STRIDE * i + ADDRESS_AT + 16]``.
ADDRESS_STRIDE = 28
ADDRESS_AT = 8

#: struct sockaddr_ll: family, protocol (network order), ifindex, hatype, pkttype,
#: halen, addr[8].
_SOCKADDR_LL = struct.Struct("=HHiHBB8s")
_SOCKADDR_LL_SIZE = 20

_log = Logger()


class _IoVec(ctypes.Structure):
    _fields_ = [("base", ctypes.c_void_p), ("len", ctypes.c_size_t)]


class _MsgHdr(ctypes.Structure):
    _fields_ = [
        ("name", ctypes.c_void_p),
        ("namelen", ctypes.c_uint32),
        ("iov", ctypes.c_void_p),
        ("iovlen", ctypes.c_size_t),
        ("control", ctypes.c_void_p),
        ("controllen", ctypes.c_size_t),
        ("flags", ctypes.c_int),
    ]


class _MMsgHdr(ctypes.Structure):
    _fields_ = [("hdr", _MsgHdr), ("len", ctypes.c_uint32)]


_LAYOUT_OK = (
    ctypes.sizeof(_MMsgHdr) == 4 * LENGTH_STRIDE == 8 * NAME_STRIDE
    and _MMsgHdr.len.offset == 4 * LENGTH_AT
    and _MMsgHdr.hdr.offset + _MsgHdr.flags.offset == 4 * FLAGS_AT
    and _MsgHdr.name.offset == 0
    and ctypes.sizeof(_IoVec) == 8 * IOV_STRIDE
    and _IoVec.len.offset == 8 * IOV_LENGTH_AT
)


def available() -> bool:
    """Whether batched I/O works here with the Linux system (the C library's calls, the
    LP64 structure layout)."""
    return _LAYOUT_OK and _MMSG_CALLS is not None


class Batch:
    """``count`` message headers, each with one iovec into its ``slot``-byte part of a buffer.

    Received (``recvmmsg``): packet i starts at ``start(i)``, its full length is
    ``length(i)`` (larger than ``slot`` if it did not fit: ``truncated(i)``), its bytes
    ``packet(i)``.  Queued for sending (``sendmmsg``): ``append`` (or
    ``set_iov_length``, ``set_name`` and, in an ``addressed`` batch, ``set_destination``)
    say what and where.  The memoryviews ``data``, ``lengths``, ``names``,
    ``iov_lengths`` and ``addresses`` are for loops that index them directly (see the
    stride constants).
    """

    def __init__(self, count: int, slot: int, addressed: bool = False) -> None:
        if count < 1 or slot < 1:
            raise ValueError("a batch has at least one slot of at least one byte")
        self.count = count
        self.slot = slot
        self.buffer = (ctypes.c_char * (count * slot))()
        self.iovecs = (_IoVec * count)()
        self.headers = (_MMsgHdr * count)()
        base = ctypes.addressof(self.buffer)
        for i in range(count):
            self.iovecs[i].base = base + i * slot
            self.iovecs[i].len = slot
            self.headers[i].hdr.iov = ctypes.addressof(self.iovecs[i])
            self.headers[i].hdr.iovlen = 1
        self.address = ctypes.addressof(self.headers)
        #: Packets queued (writers), and the socket they go to.
        self.queued = 0
        self.fd = -1
        self.data = memoryview(self.buffer).cast("B")
        #: The headers as 32-bit words (``LENGTH_STRIDE``, ``LENGTH_AT``, ``FLAGS_AT``).
        self.lengths = memoryview(self.headers).cast("B").cast("I")
        #: The headers as 64-bit words (``NAME_STRIDE``).
        self.names = memoryview(self.headers).cast("B").cast("Q")
        #: The iovecs as 64-bit words (``IOV_STRIDE``, ``IOV_LENGTH_AT``).
        self.iov_lengths = memoryview(self.iovecs).cast("B").cast("Q")
        #: With ``addressed``: header i's ``msg_name`` is its own ``sockaddr_in6``
        #: (AF_INET6, port 0) -- a sender writes the destination there
        #: (``ADDRESS_STRIDE``, ``ADDRESS_AT``), so no destination needs a cached sockaddr.
        self.addresses = memoryview(b"")
        self.addressed = addressed
        if addressed:
            self._sockaddrs = ctypes.create_string_buffer(
                struct.pack("=HHI16sI", socket.AF_INET6, 0, 0, bytes(16), 0) * count,
                ADDRESS_STRIDE * count,
            )
            first = ctypes.addressof(self._sockaddrs)
            for i in range(count):
                self.headers[i].hdr.namelen = ADDRESS_STRIDE
                self.names[NAME_STRIDE * i] = first + ADDRESS_STRIDE * i
            self.addresses = memoryview(self._sockaddrs).cast("B")

    def at(self, index: int) -> int:
        """The address of header ``index`` (for a call starting there)."""
        return self.address + ctypes.sizeof(_MMsgHdr) * index

    def start(self, index: int) -> int:
        """Where slot ``index`` starts in ``data``."""
        return index * self.slot

    # Received packets --------------------------------------------------------

    def length(self, index: int) -> int:
        """``msg_len`` of header ``index``: the received packet's full length."""
        return int(self.lengths[LENGTH_STRIDE * index + LENGTH_AT])

    def set_length(self, index: int, length: int) -> None:
        """Set ``msg_len`` of header ``index`` (as ``recvmmsg`` does)."""
        self.lengths[LENGTH_STRIDE * index + LENGTH_AT] = length

    def truncated(self, index: int) -> bool:
        """Whether received packet ``index`` did not fit its slot (``MSG_TRUNC``)."""
        return bool(self.lengths[LENGTH_STRIDE * index + FLAGS_AT] & socket.MSG_TRUNC)

    def packet(self, index: int) -> memoryview:
        """The bytes of received packet ``index`` (its head only, if truncated)."""
        start = index * self.slot
        return self.data[start : start + min(self.length(index), self.slot)]

    def set_received(self, index: int, packet: Packet) -> None:
        """Lay ``packet`` out in slot ``index`` as ``recvmmsg`` with ``MSG_TRUNC`` would:
        its head in the slot, its full length, ``MSG_TRUNC`` if it did not fit (for
        tests that build batches; the fake system follows the pointers itself)."""
        size = min(len(packet), self.slot)
        start = index * self.slot
        self.data[start : start + size] = memoryview(packet)[:size]
        self.lengths[LENGTH_STRIDE * index + LENGTH_AT] = len(packet)
        self.lengths[LENGTH_STRIDE * index + FLAGS_AT] = (
            socket.MSG_TRUNC if len(packet) > self.slot else 0
        )

    # Packets queued for sending ----------------------------------------------

    def iov_length(self, index: int) -> int:
        """``iov_len`` of slot ``index``: how many of its bytes ``sendmmsg`` sends."""
        return int(self.iov_lengths[IOV_STRIDE * index + IOV_LENGTH_AT])

    def set_iov_length(self, index: int, length: int) -> None:
        self.iov_lengths[IOV_STRIDE * index + IOV_LENGTH_AT] = length

    def name(self, index: int) -> int:
        """``msg_name`` of header ``index``: the address of its socket address."""
        return int(self.names[NAME_STRIDE * index])

    def set_name(self, index: int, address: int) -> None:
        """Point header ``index`` at a socket address (a link queue's ``sockaddr_ll``);
        not in an ``addressed`` batch, whose headers keep their own."""
        self.names[NAME_STRIDE * index] = address

    def destination(self, index: int) -> bytes:
        """The destination in slot ``index``'s own ``sockaddr_in6`` (addressed batches)."""
        at = ADDRESS_STRIDE * index + ADDRESS_AT
        return bytes(self.addresses[at : at + 16])

    def set_destination(self, index: int, packed: bytes | memoryview) -> None:
        """Write a 16-byte destination into slot ``index``'s ``sockaddr_in6``."""
        at = ADDRESS_STRIDE * index + ADDRESS_AT
        self.addresses[at : at + 16] = packed

    def queued_packet(self, index: int) -> memoryview:
        """The bytes queued in slot ``index`` (``iov_len`` of them)."""
        start = index * self.slot
        return self.data[start : start + self.iov_length(index)]

    def append(self, packet: Packet, name: int = 0, destination: bytes = b"") -> int:
        """Queue ``packet`` in the next slot, to socket address ``name`` or (0) to
        ``destination`` in the slot's own ``sockaddr_in6``; return ``queued``."""
        i = self.queued
        if i >= self.count:
            raise IndexError("the batch is full: flush it first")
        length = len(packet)
        start = i * self.slot
        self.data[start : start + length] = packet
        self.iov_lengths[IOV_STRIDE * i + IOV_LENGTH_AT] = length
        if name:
            self.names[NAME_STRIDE * i] = name
        else:
            at = ADDRESS_STRIDE * i + ADDRESS_AT
            self.addresses[at : at + 16] = destination
        self.queued = i = i + 1
        return i


class IBatchPacketProtocol(IPacketProtocol):
    """A packet protocol that takes a :class:`BatchPacketReader`'s batches whole."""

    def batchReceived(batch: Batch, count: int, deliver: Callable[[int, int], None]) -> None:  # noqa: N805
        """Packets 0..``count``-1 of ``batch``, as ``recvmmsg`` left them.

        ``deliver(batch.start(i), batch.length(i))`` hands packet i, in its turn, to
        ``packetReceived`` the way the port does when there is no ``batchReceived``
        (an owned copy; oversize packets and exceptions counted).  Anything the
        protocol neither handles nor delivers is lost uncounted.  An exception here
        counts as one handler error, and the rest of the wake-up goes on.
        """


@implementer(IBatchPacketProtocol)
class _FastHandlerProtocol(_HandlerProtocol):
    """The protocol of a batched port given ``handle`` and ``fast`` (the old keywords):
    each batch to ``fast(data, slot, lengths, count, deliver)``."""

    def __init__(
        self,
        handle: Callable[[bytearray], object],
        emit: Callable[[Any], object] | None,
        fast: Callable[[memoryview, int, memoryview, int, Callable[[int, int], object]], object],
    ) -> None:
        super().__init__(handle, emit)
        self.fast = fast

    def batchReceived(self, batch: Batch, count: int, deliver: Callable[[int, int], None]) -> None:
        self.fast(batch.data, batch.slot, batch.lengths, count, deliver)


class BatchPacketReader(PacketReader):
    """A :class:`PacketReader` that drains its socket with ``recvmmsg``.

    Same life cycle, protocol contract and statistics; ``system`` must provide
    :class:`~lbproxy.io.rawsocket.IBatchPacketSystem`.  A protocol providing
    :class:`IBatchPacketProtocol` gets every batch whole.

    The keywords of the callable form (``handle`` in place of a protocol) remain:
    ``emit`` gets every result of ``handle`` that is not None, ``fast(data, slot,
    lengths, count, deliver)`` gets every batch, ``after_batch()`` runs at the end of
    every wake-up (after the writer's flush, if there is a writer).
    """

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
        after_batch: Callable[[], object] | None = None,
        emit: Callable[[Any], object] | None = None,
        fast: Callable[[memoryview, int, memoryview, int, Callable[[int, int], object]], object]
        | None = None,
    ) -> None:
        if not _LAYOUT_OK or not IBatchPacketSystem.providedBy(system):
            raise RuntimeError("recvmmsg is not available here")
        if not IPacketProtocol.providedBy(protocol) and callable(protocol):
            if fast is not None:
                protocol = _FastHandlerProtocol(protocol, emit, fast)
            else:
                protocol = _HandlerProtocol(protocol, emit)
        elif emit is not None or fast is not None:
            raise TypeError("emit and fast go with a handler, not with a protocol")
        super().__init__(system, reactor, interface, protocol, writer=writer,
                         destinations=destinations, batch=batch, max_packet=max_packet,
                         receive_buffer=receive_buffer)  # fmt: skip
        self._system: IBatchPacketSystem = system
        self.after_batch = after_batch
        self._in = Batch(min(SLOTS, batch), max_packet)
        self._handle: Callable[[bytearray], object] = self.protocol.packetReceived

    def doRead(self) -> None:
        """Drain up to ``batch`` packets, ``SLOTS`` per call; count everything, raise nothing."""
        stats = self.stats
        stats.wakeups += 1
        protocol = self.protocol
        self._handle = protocol.packetReceived
        batch_received = (
            protocol.batchReceived if IBatchPacketProtocol.providedBy(protocol) else None
        )
        deliver = self._deliver
        receive = self._system.receive_batch
        batch = self._in
        lengths, slot = batch.lengths, batch.slot
        fd = self.fileno()
        left = self.batch
        try:
            while left > 0:
                want = batch.count if left > batch.count else left
                try:
                    got = receive(fd, batch, want)
                except (BlockingIOError, InterruptedError):
                    break  # drained
                except OSError as e:
                    self._receive_failed(e)
                    break
                left -= got
                stats.received += got  # `_deliver` takes the oversize ones back out
                if batch_received is not None:
                    try:
                        batch_received(batch, got, deliver)
                    except Exception:
                        self._handler_failed()
                else:
                    for i in range(got):
                        deliver(i * slot, lengths[LENGTH_STRIDE * i + LENGTH_AT])
                if got < want:
                    break  # drained
        except Exception:
            stats.errors += 1
            if _should_log(stats.errors):
                _log.failure("{prefix}: receive failed", prefix=self.logPrefix())
        finally:
            self._wakeup_done()

    def _deliver(self, start: int, length: int) -> None:
        """One received packet, at ``start`` in the batch buffer: an owned copy to the
        protocol; oversize and protocol failures counted."""
        if length > self._in.slot:
            stats = self.stats
            stats.received -= 1
            stats.oversize += 1
            return
        try:
            self._handle(bytearray(self._in.data[start : start + length]))
        except Exception:
            self._handler_failed()

    def _wakeup_done(self) -> None:
        super()._wakeup_done()
        if self.after_batch is not None:
            try:
                self.after_batch()
            except Exception:
                _log.failure("{prefix}: after_batch failed", prefix=self.logPrefix())


class BatchPacketWriter(PacketWriter):
    """A :class:`PacketWriter` that queues packets and sends them with ``sendmmsg``.

    :meth:`send` (:meth:`write`) returns True when the packet was queued; :meth:`flush`
    (called by the reading ports after each wake-up, by a full queue, and by
    :meth:`close`) sends the queues.  Refusals found then are counted drops in
    ``stats``, by errno name, as before.  ``system`` must provide
    :class:`~lbproxy.io.rawsocket.IBatchPacketSystem`; ``slots`` is the size of each
    queue.

    Link sending (optional, :meth:`use_link`): packets to a destination with a known
    link-layer address on one interface (:meth:`set_link_neighbours`; the forwarder
    gives it the backends' neighbour entries) go out on a packet socket bound to that
    interface, to that address, skipping the kernel's route lookup, IPv6 output and
    neighbour code; every other destination keeps the ``IPPROTO_RAW`` socket.  Each
    socket has its own queue; the order is kept per destination.

    The fast path fills the queues itself: :attr:`ready`, :attr:`routes`,
    :attr:`raw_route`, :meth:`flush_queue`.
    """

    def __init__(
        self,
        system: IPacketSystem,
        max_packet: int = IPV6_MAX_PACKET + 64,
        slots: int = SLOTS,
    ) -> None:
        super().__init__(system)
        if not _LAYOUT_OK or not IBatchPacketSystem.providedBy(system):
            raise RuntimeError("sendmmsg is not available here")
        self._system: IBatchPacketSystem = system
        self.slots = slots
        # The raw socket's queue: each slot has its own sockaddr_in6, so any destination
        # (a backend, a terminal's home or care-of address) costs one 16-byte write.
        self._out = Batch(slots, max_packet, addressed=True)
        self._ready = False  # open: queue; closed: the plain writer counts the drop
        # link neighbour (16 bytes) -> (the link queue, the address of its sockaddr_ll
        # for msg_name); everything else goes to the raw queue.
        self._routes: dict[bytes, tuple[Batch, int]] = {}
        self._raw_route = (self._out, 0)
        self._link: Batch | None = None
        self._link_ifindex = 0
        self._link_macs: dict[bytes, bytes] = {}
        self._link_sockaddrs: list[ctypes.Array[ctypes.c_char]] = []

    def open(self) -> None:
        super().open()
        self._ready = self.fileno() >= 0
        self._out.fd = self.fileno()

    def use_link(self, fd: int, ifindex: int) -> None:
        """Send to link neighbours through packet socket ``fd`` (bound to ``ifindex``, not
        owned: the caller closes it, after this writer)."""
        link = Batch(self.slots, self._out.slot)
        link.fd = fd
        for i in range(self.slots):
            link.headers[i].hdr.namelen = _SOCKADDR_LL_SIZE
        self.flush()
        self._link, self._link_ifindex = link, ifindex
        self._install_link_routes()

    def set_link_neighbours(self, neighbours: Mapping[bytes, bytes]) -> None:
        """IPv6 address (16 bytes) -> link-layer address (6 bytes) to send to directly;
        any destination not here (any more) goes through the raw socket."""
        macs = {a: m for a, m in neighbours.items() if len(a) == 16 and len(m) == 6}
        if macs == self._link_macs:
            return
        self.flush()  # queued headers point at the old addresses
        for address in self._link_macs:
            self._routes.pop(address, None)
        self._link_macs = macs
        self._install_link_routes()

    def link_destinations(self) -> dict[bytes, bytes]:
        """The destinations sent on the link now, with their link-layer addresses."""
        return dict(self._link_macs) if self._link is not None else {}

    def _install_link_routes(self) -> None:
        link = self._link
        self._link_sockaddrs = []
        if link is None:
            return
        for address, mac in self._link_macs.items():
            sockaddr = ctypes.create_string_buffer(
                _SOCKADDR_LL.pack(
                    socket.AF_PACKET, socket.htons(ETH_P_IPV6), self._link_ifindex, 0, 0, 6, mac
                ),
                _SOCKADDR_LL_SIZE,
            )
            self._link_sockaddrs.append(sockaddr)
            self._routes[address] = (link, ctypes.addressof(sockaddr))

    @property
    def ready(self) -> bool:
        """Open: packets are queued (closed: `send` counts them as drops)."""
        return self._ready

    @property
    def routes(self) -> dict[bytes, tuple[Batch, int]]:
        """Link neighbour (16 bytes) -> (the link queue, its ``msg_name`` address).  It
        changes only when the neighbours do (`set_link_neighbours`), never while a
        batch is being handled."""
        return self._routes

    @property
    def raw_route(self) -> tuple[Batch, int]:
        """The route of every other destination: the raw socket's queue, name 0 -- the
        destination goes into the slot's own address (`Batch.set_destination`)."""
        return self._raw_route

    def route(self, destination: bytes) -> tuple[Batch, int]:
        """The queue and ``msg_name`` for ``destination`` (16 bytes): the link queue's for
        a link neighbour, else `raw_route`."""
        return self._routes.get(destination, self._raw_route)

    def flush_queue(self, queue: Batch) -> None:
        """Send one queue now (it is full)."""
        self._flush(queue)

    def send(self, packet: Packet, destination: str | None = None) -> bool:
        """Queue ``packet`` for its own destination (or ``destination``, which always
        goes through the raw socket); True if queued."""
        if not self._ready:
            return super().send(packet, destination)  # counted as the plain writer does
        length = len(packet)
        if length > self._out.slot:
            return self._drop("EMSGSIZE", f"{length}-byte packet")
        if destination is None:
            if length < 40:
                return self._drop("EINVAL", "not an IPv6 packet")
            packed = bytes(packet[24:40])
            out, name = self._routes.get(packed, self._raw_route)
        else:
            # A given destination (a Routing Header's final address) goes through the
            # raw socket: only it sends by the packet's own destination for us.
            try:
                packed = socket.inet_pton(socket.AF_INET6, destination)
            except OSError as e:
                return self._drop("EINVAL", e)
            out, name = self._raw_route
        # `Batch.append`, written out (the general path sends every packet through here;
        # the call cost 50-60 ns a packet).  The slot is free: a full queue is flushed
        # below as soon as it fills.  tests/test_mmsg.py holds the two to one layout.
        i = out.queued
        start = i * out.slot
        out.data[start : start + length] = packet
        out.iov_lengths[IOV_STRIDE * i + IOV_LENGTH_AT] = length
        if name:
            out.names[NAME_STRIDE * i] = name
        else:
            at = ADDRESS_STRIDE * i + ADDRESS_AT
            out.addresses[at : at + 16] = packed
        out.queued = i = i + 1
        if i == out.count:
            self._flush(out)
        return True

    write = send

    def flush(self) -> None:
        """Send what is queued; each refused packet is a counted drop."""
        if self._out.queued:
            self._flush(self._out)
        link = self._link
        if link is not None and link.queued:
            self._flush(link)

    def _flush(self, out: Batch) -> None:
        count = out.queued
        if not count:
            return
        out.queued = 0
        send = self._system.send_batch
        fd = out.fd
        stats = self.stats
        start = 0
        while start < count:
            try:
                sent = send(fd, out, start, count - start)
            except OSError as e:
                # The packet at `start` was refused (ENOBUFS, EAGAIN, ENETUNREACH...).
                code = e.errno or 0
                self._drop(errno.errorcode.get(code, str(code)), e)
                start += 1
            else:
                stats.sent += sent
                start += sent

    def queued(self) -> int:
        """Packets waiting for :meth:`flush`."""
        return self._out.queued + (self._link.queued if self._link is not None else 0)

    def close(self) -> None:
        """Send what is queued, then close the socket (not a link socket: not ours)."""
        if self._ready:
            self.flush()
        self._ready = False
        if self._link is not None:
            self._link.queued = 0
        super().close()

