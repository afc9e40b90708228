"""Batched packet I/O for the raw-socket port: ``recvmmsg(2)`` and ``sendmmsg(2)``.

Why this exists: at a few hundred thousand packets per second the balancer's budget is a
few microseconds per packet, and one ``recv_into`` plus one ``sendto`` per packet spend a
large share of it on system-call entry and on CPython's socket-call machinery.  Python's
``socket`` module has neither ``recvmmsg`` nor ``sendmmsg``; this module calls them
through ``ctypes`` on the sockets a :class:`~lbproxy.io.rawsocket.LinuxPacketSystem` opened,
so one call moves up to :data:`SLOTS` packets.

Theory of operation
-------------------
* A :class:`Batch` is :data:`SLOTS` ``struct mmsghdr`` entries, each with one ``iovec``
  pointing into its own slot of one buffer.  The per-packet fields (``msg_len``,
  ``iov_len``, ``msg_name``) are read and written through ``memoryview`` casts of the
  ctypes arrays, which costs an index operation, not a ctypes attribute access.
* :class:`BatchPacketReader` is a :class:`~lbproxy.io.rawsocket.PacketReader` whose
  ``doRead`` drains with ``recvmmsg``.  It keeps the reader's contract: the handler gets
  a fresh ``bytearray`` it owns, the same :class:`~lbproxy.io.rawsocket.ReaderStats` are
  kept, nothing raises into the reactor.  After each wake-up it calls ``after_batch``
  (the forwarder flushes its writer there).  With ``emit`` set, the handler's result
  (when not None) goes straight to it: the forwarder hands the balancer's ``inbound``
  and the writer's ``send`` to the reader, so the loop calls both without glue.
* :class:`BatchPacketWriter` is a :class:`~lbproxy.io.rawsocket.PacketWriter` whose
  ``send`` copies the packet into the next slot and its destination into the slot's
  own ``sockaddr_in6`` (so any number of destinations costs nothing to remember) and
  returns True ("queued"); :meth:`BatchPacketWriter.flush` sends the
  queue with ``sendmmsg`` and a full queue flushes itself.  ``stats.sent`` counts what
  the kernel took; a refused packet is a counted drop, as with the plain writer, only
  counted at flush time.  Packets go out in the order they were queued.

Only for the real Linux system: :func:`available` says whether the C library has the
calls and the structures have the LP64 layout assumed here.  The in-memory fake keeps
using the plain reader and writer.
"""

from __future__ import annotations

import ctypes
import errno
import socket
import struct
import sys
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from twisted.internet.interfaces import IReactorFDSet
from twisted.logger import Logger

from lbproxy.io.rawsocket import (
    DEFAULT_BATCH,
    ETH_P_IPV6,
    IPV6_MAX_PACKET,
    IPacketSystem,
    PacketReader,
    PacketWriter,
    _network_namespace,
)

__all__ = [
    "SLOTS",
    "Batch",
    "BatchPacketReader",
    "BatchPacketWriter",
    "NeighbourTable",
    "available",
]

#: Packets moved per system call at most.
SLOTS = 64
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


# The word indexes below assume the LP64 layout (x86-64, arm64): 64-byte mmsghdr,
# msg_name at byte 0, msg_len at byte 56, iov_len at byte 8 of a 16-byte iovec.
_LAYOUT_OK = (
    ctypes.sizeof(_MMsgHdr) == 64
    and _MMsgHdr.len.offset == 56
    and ctypes.sizeof(_IoVec) == 16
    and _IoVec.len.offset == 8
)


def _libc_calls() -> tuple[Any, Any] | None:
    if not sys.platform.startswith("linux") or not _LAYOUT_OK:
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


_CALLS = _libc_calls()


def available() -> bool:
    """Whether batched I/O works here (Linux C library, LP64 structure layout)."""
    return _CALLS is not None


class Batch:
    """`count` message headers, each with one iovec into its `slot`-byte part of a buffer.

    Packet i is ``data[i * slot :]``; received, its length is ``lengths[16 * i + 14]``;
    queued for sending, ``iov_lengths[2 * i + 1]`` and its ``msg_name`` address
    ``names[8 * i]`` (or, in an `addressed` batch, the destination in ``addresses``) say
    what and where (`lbproxy.io.fastpath` fills them directly).
    """

    def __init__(self, count: int, slot: int, addressed: bool = False) -> None:
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
        #: msg_len of header i is lengths[16 * i + 14].
        self.lengths = memoryview(self.headers).cast("B").cast("I")
        #: msg_name of header i is names[8 * i].
        self.names = memoryview(self.headers).cast("B").cast("Q")
        #: iov_len of iovec i is iov_lengths[2 * i + 1].
        self.iov_lengths = memoryview(self.iovecs).cast("B").cast("Q")
        #: With `addressed`: header i's msg_name is its own ``sockaddr_in6`` (AF_INET6,
        #: port 0), whose address is ``addresses[28 * i + 8 : 28 * i + 24]`` -- a sender
        #: writes the destination there, so no destination needs a cached sockaddr.
        self.addresses = memoryview(b"")
        if addressed:
            self._sockaddrs = ctypes.create_string_buffer(
                struct.pack("=HHI16sI", socket.AF_INET6, 0, 0, bytes(16), 0) * count,
                28 * count,
            )
            first = ctypes.addressof(self._sockaddrs)
            for i in range(count):
                self.headers[i].hdr.namelen = 28
                self.names[8 * i] = first + 28 * i
            self.addresses = memoryview(self._sockaddrs).cast("B")

    def at(self, index: int) -> int:
        """The address of header `index` (for a call starting there)."""
        return self.address + 64 * index


class BatchPacketReader(PacketReader):
    """A :class:`PacketReader` that drains its socket with ``recvmmsg``.

    Same life cycle, handler contract and statistics; ``after_batch`` (if given) runs at
    the end of every wake-up, whatever happened in it.
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
        after_batch: Callable[[], object] | None = None,
        emit: Callable[[Any], object] | None = None,
        fast: Callable[[memoryview, int, memoryview, int, Callable[[int, int], object]], object]
        | None = None,
    ) -> None:
        super().__init__(system, reactor, interface, handle, destinations=destinations,
                         batch=batch, max_packet=max_packet,
                         receive_buffer=receive_buffer)  # fmt: skip
        if _CALLS is None:
            raise RuntimeError("recvmmsg is not available here")
        self.after_batch = after_batch
        #: If set, every result of ``handle`` that is not None is passed to it, in the
        #: same loop (one Python call per packet less than a handler that does it);
        #: its failures count as handler errors.
        self.emit = emit
        #: If set, it gets each ``recvmmsg`` batch whole: ``fast(data, slot, lengths,
        #: count, other)`` (`lbproxy.io.fastpath.FastPath.forward`), and calls ``other(start,
        #: length)`` -- the per-packet handling above -- for each packet it leaves.
        self.fast = fast
        self._in = Batch(min(SLOTS, batch), max_packet)

    def doRead(self) -> None:
        """Drain up to ``batch`` packets, ``SLOTS`` per call; count everything, raise nothing."""
        assert _CALLS is not None
        recvmmsg = _CALLS[0]
        stats = self.stats
        stats.wakeups += 1
        fast = self.fast
        one = self._one
        batch = self._in
        lengths, slot, address = batch.lengths, batch.slot, batch.address
        fd = self.fileno()
        left = self.batch
        try:
            while left > 0:
                want = batch.count if left > batch.count else left
                got = recvmmsg(fd, address, want, socket.MSG_DONTWAIT | socket.MSG_TRUNC, None)
                if got <= 0:
                    if got < 0:
                        self._receive_failed(ctypes.get_errno())
                    break
                left -= got
                stats.received += got  # `_one` takes the oversize ones back out
                if fast is not None:
                    fast(batch.data, slot, lengths, got, one)
                else:
                    for i in range(got):
                        one(i * slot, lengths[16 * i + 14])
                if got < want:
                    break  # drained
        except Exception:
            stats.errors += 1
            if _should_log(stats.errors):
                _log.failure("{prefix}: receive failed", prefix=self.logPrefix())
        finally:
            if self.after_batch is not None:
                try:
                    self.after_batch()
                except Exception:
                    _log.failure("{prefix}: after_batch failed", prefix=self.logPrefix())

    def _one(self, start: int, length: int) -> None:
        """One received packet, at `start` in the batch buffer: an owned copy to the
        handler (and its result to ``emit``); oversize and handler failures counted."""
        stats = self.stats
        if length > self._in.slot:
            stats.received -= 1
            stats.oversize += 1
            return
        try:
            out = self.handle(bytearray(self._in.data[start : start + length]))
            if out is not None and self.emit is not None:
                self.emit(out)
        except Exception:
            stats.handler_errors += 1
            if _should_log(stats.handler_errors):
                _log.failure(
                    "{prefix}: packet handler failed ({count} so far)",
                    prefix=self.logPrefix(),
                    count=stats.handler_errors,
                )

    def _receive_failed(self, code: int) -> None:
        if code in (errno.EAGAIN, errno.EWOULDBLOCK, errno.EINTR):
            return  # drained
        stats = self.stats
        stats.errors += 1
        if _should_log(stats.errors):
            _log.warn(
                "{prefix}: receive failed: {error} ({count} so far)",
                prefix=self.logPrefix(),
                error=OSError(code, errno.errorcode.get(code, str(code))),
                count=stats.errors,
            )


def _should_log(count: int) -> bool:
    """True for the 1st, 2nd, 4th, 8th... occurrence (as `lbproxy.io.rawsocket` logs)."""
    return count & (count - 1) == 0


class BatchPacketWriter(PacketWriter):
    """A :class:`PacketWriter` that queues packets and sends them with ``sendmmsg``.

    :meth:`send` returns True when the packet was queued; :meth:`flush` (called by the
    reader after each wake-up, by a full queue, and by :meth:`close`) sends the queue.
    Refusals found then are counted drops in ``stats``, by errno name, as before.

    Link sending (optional, :meth:`use_link`): packets to a destination with a known
    link-layer address on one interface (:meth:`set_link_neighbours`; the forwarder
    gives it the backends' neighbour entries) go out on a packet socket bound to that
    interface, to that address, skipping the kernel's route lookup, IPv6 output and
    neighbour code; every other destination keeps the ``IPPROTO_RAW`` socket.  Each
    socket has its own queue; the order is kept per destination.
    """

    def __init__(self, system: IPacketSystem, max_packet: int = IPV6_MAX_PACKET + 64) -> None:
        super().__init__(system)
        if _CALLS is None:
            raise RuntimeError("sendmmsg is not available here")
        # The raw socket's queue: each slot has its own sockaddr_in6, so any destination
        # (a backend, a terminal's home or care-of address) costs one 16-byte write.
        self._out = Batch(SLOTS, max_packet, addressed=True)
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
        """Send to link neighbours through packet socket `fd` (bound to `ifindex`, not
        owned: the caller closes it, after this writer)."""
        link = Batch(SLOTS, self._out.slot)
        link.fd = fd
        for i in range(SLOTS):
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
            # struct sockaddr_ll: family, protocol (network order), ifindex, hatype,
            # pkttype, halen, addr[8].
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
        destination goes into the slot's own address (`Batch.addresses`)."""
        return self._raw_route

    def route(self, destination: bytes) -> tuple[Batch, int]:
        """The queue and ``msg_name`` for `destination` (16 bytes): the link queue's for a
        link neighbour, else `raw_route`."""
        return self._routes.get(destination, self._raw_route)

    def flush_queue(self, queue: Batch) -> None:
        """Send one queue now (it is full)."""
        self._flush(queue)

    def send(self, packet: bytes | bytearray | memoryview, destination: str | None = None) -> bool:
        """Queue ``packet`` for its own destination (or ``destination``, which always
        goes through the raw socket); True if queued."""
        length = len(packet)
        if not self._ready:
            return super().send(packet, destination)  # counted as the plain writer does
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
        i = out.queued
        start = i * out.slot
        out.data[start : start + length] = packet
        out.iov_lengths[2 * i + 1] = length
        if name:
            out.names[8 * i] = name
        else:
            out.addresses[28 * i + 8 : 28 * i + 24] = packed
        i += 1
        out.queued = i
        if i == out.count:
            self._flush(out)
        return True

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
        assert _CALLS is not None
        sendmmsg = _CALLS[1]
        fd = out.fd
        stats = self.stats
        start = 0
        while start < count:
            sent = sendmmsg(fd, out.at(start), count - start, 0)
            if sent > 0:
                stats.sent += sent
                start += sent
            else:
                # The packet at `start` was refused (ENOBUFS, EAGAIN, ENETUNREACH...).
                code = ctypes.get_errno() if sent < 0 else errno.EIO
                name = errno.errorcode.get(code, str(code))
                self._drop(name, OSError(code, name))
                start += 1

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


# Netlink (rtnetlink(7)): a neighbour dump is one RTM_GETNEIGH request with NLM_F_DUMP,
# answered by RTM_NEWNEIGH messages (struct ndmsg + attributes) until NLMSG_DONE.
_NLMSG_ERROR, _NLMSG_DONE = 2, 3
_RTM_NEWNEIGH, _RTM_GETNEIGH = 28, 30
_NLM_F_REQUEST, _NLM_F_DUMP = 0x1, 0x300
_NDA_DST, _NDA_LLADDR = 1, 2
_NLMSGHDR = struct.Struct("=IHHII")
_NDMSG = struct.Struct("=BBHiHBB")
_RTATTR = struct.Struct("=HH")
#: Neighbour states whose link-layer address is usable: REACHABLE, STALE, DELAY,
#: PROBE, PERMANENT (not INCOMPLETE, FAILED, NOARP, NONE).
USABLE_STATES = 0x02 | 0x04 | 0x08 | 0x10 | 0x80


def parse_neighbours(data: bytes, ifindex: int) -> tuple[dict[bytes, bytes], bool]:
    """IPv6 neighbours of `ifindex` in usable states from netlink messages `data`
    (address -> 6-byte link-layer address), and whether NLMSG_DONE was seen."""
    found: dict[bytes, bytes] = {}
    pos = 0
    while pos + 16 <= len(data):
        length, kind, _flags, _seq, _pid = _NLMSGHDR.unpack_from(data, pos)
        if length < 16 or pos + length > len(data):
            break
        if kind == _NLMSG_DONE:
            return found, True
        if kind == _NLMSG_ERROR:
            code = -struct.unpack_from("=i", data, pos + 16)[0]
            raise OSError(code, f"neighbour dump refused: {errno.errorcode.get(code, code)}")
        if kind == _RTM_NEWNEIGH and length >= 16 + _NDMSG.size:
            family, _, _, index, state, _, _ = _NDMSG.unpack_from(data, pos + 16)
            if family == socket.AF_INET6 and index == ifindex and state & USABLE_STATES:
                destination = link = None
                at = pos + 16 + _NDMSG.size
                while at + 4 <= pos + length:
                    size, attr = _RTATTR.unpack_from(data, at)
                    if size < 4:
                        break
                    if attr == _NDA_DST:
                        destination = bytes(data[at + 4 : at + size])
                    elif attr == _NDA_LLADDR:
                        link = bytes(data[at + 4 : at + size])
                    at += (size + 3) & ~3
                if destination is not None and len(destination) == 16 and link is not None \
                        and len(link) == 6:  # fmt: skip
                    found[destination] = link
        pos += (length + 3) & ~3
    return found, False


class NeighbourTable:
    """Reads the kernel's IPv6 neighbour table for one interface (netlink, no
    subprocess), so the writer can send to on-link backends itself.

    The netlink socket is opened in the given network namespace (as the packet
    system opens its sockets) and kept; :meth:`read` is one dump, a few hundred
    microseconds with a handful of neighbours, meant to run about once a second.
    """

    def __init__(self, interface: str, namespace: str | None = None) -> None:
        with _network_namespace(namespace):
            self.ifindex = socket.if_nametoindex(interface)
            sock = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, 0)  # NETLINK_ROUTE
        sock.settimeout(1.0)
        self._sock = sock
        self._seq = 0

    def read(self) -> dict[bytes, bytes]:
        """The interface's usable IPv6 neighbours: address -> link-layer address."""
        self._seq += 1
        request = _NLMSGHDR.pack(16 + _NDMSG.size, _RTM_GETNEIGH,
                                 _NLM_F_REQUEST | _NLM_F_DUMP, self._seq, 0)  # fmt: skip
        self._sock.send(request + _NDMSG.pack(socket.AF_INET6, 0, 0, 0, 0, 0, 0))
        found: dict[bytes, bytes] = {}
        for _ in range(1000):  # bounded: a dump of 1000 reads is no neighbour table
            part, done = parse_neighbours(self._sock.recv(1 << 16), self.ifindex)
            found.update(part)
            if done:
                return found
        raise OSError(errno.EIO, "neighbour dump did not end")

    def close(self) -> None:
        self._sock.close()
