"""Batched packet I/O for the raw-socket port: ``recvmmsg(2)`` and ``sendmmsg(2)``.

Why this exists: at a few hundred thousand packets per second the balancer's budget is a
few microseconds per packet, and one ``recv_into`` plus one ``sendto`` per packet spend a
large share of it on system-call entry and on CPython's socket-call machinery.  Python's
``socket`` module has neither ``recvmmsg`` nor ``sendmmsg``; this module calls them
through ``ctypes`` on the sockets a :class:`~lbproxy.rawsocket.LinuxPacketSystem` opened,
so one call moves up to :data:`SLOTS` packets.

Theory of operation
-------------------
* A :class:`_Batch` is :data:`SLOTS` ``struct mmsghdr`` entries, each with one ``iovec``
  pointing into its own slot of one buffer.  The per-packet fields (``msg_len``,
  ``iov_len``, ``msg_name``) are read and written through ``memoryview`` casts of the
  ctypes arrays, which costs an index operation, not a ctypes attribute access.
* :class:`BatchPacketReader` is a :class:`~lbproxy.rawsocket.PacketReader` whose
  ``doRead`` drains with ``recvmmsg``.  It keeps the reader's contract: the handler gets
  a fresh ``bytearray`` it owns, the same :class:`~lbproxy.rawsocket.ReaderStats` are
  kept, nothing raises into the reactor.  After each wake-up it calls ``after_batch``
  (the forwarder flushes its writer there).  With ``emit`` set, the handler's result
  (when not None) goes straight to it: the forwarder hands the balancer's ``inbound``
  and the writer's ``send`` to the reader, so the loop calls both without glue.
* :class:`BatchPacketWriter` is a :class:`~lbproxy.rawsocket.PacketWriter` whose
  ``send`` copies the packet into the next slot (with a cached ``sockaddr_in6`` for its
  destination) and returns True ("queued"); :meth:`BatchPacketWriter.flush` sends the
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
from collections.abc import Callable, Sequence
from typing import Any

from twisted.internet.interfaces import IReactorFDSet
from twisted.logger import Logger

from lbproxy.rawsocket import (
    DEFAULT_BATCH,
    IPV6_MAX_PACKET,
    IPacketSystem,
    PacketReader,
    PacketWriter,
)

__all__ = ["SLOTS", "BatchPacketReader", "BatchPacketWriter", "available"]

#: Packets moved per system call at most.
SLOTS = 64

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


class _Batch:
    """`count` message headers, each with one iovec into its `slot`-byte part of a buffer."""

    def __init__(self, count: int, slot: int) -> None:
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
        self.data = memoryview(self.buffer).cast("B")
        #: msg_len of header i is lengths[16 * i + 14].
        self.lengths = memoryview(self.headers).cast("B").cast("I")
        #: msg_name of header i is names[8 * i].
        self.names = memoryview(self.headers).cast("B").cast("Q")
        #: iov_len of iovec i is iov_lengths[2 * i + 1].
        self.iov_lengths = memoryview(self.iovecs).cast("B").cast("Q")

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
        self._in = _Batch(min(SLOTS, batch), max_packet)

    def doRead(self) -> None:
        """Drain up to ``batch`` packets, ``SLOTS`` per call; count everything, raise nothing."""
        assert _CALLS is not None
        recvmmsg = _CALLS[0]
        stats = self.stats
        stats.wakeups += 1
        handle = self.handle
        emit = self.emit
        batch = self._in
        data, lengths, slot, address = batch.data, batch.lengths, batch.slot, batch.address
        fd = self.fileno()
        left = self.batch
        received = oversize = 0
        try:
            while left > 0:
                want = batch.count if left > batch.count else left
                got = recvmmsg(fd, address, want, socket.MSG_DONTWAIT | socket.MSG_TRUNC, None)
                if got <= 0:
                    if got < 0:
                        self._receive_failed(ctypes.get_errno())
                    break
                left -= got
                for i in range(got):
                    length = lengths[16 * i + 14]
                    if length > slot:
                        oversize += 1
                        continue
                    received += 1
                    start = i * slot
                    try:
                        out = handle(bytearray(data[start : start + length]))
                        if out is not None and emit is not None:
                            emit(out)
                    except Exception:
                        stats.handler_errors += 1
                        if _should_log(stats.handler_errors):
                            _log.failure(
                                "{prefix}: packet handler failed ({count} so far)",
                                prefix=self.logPrefix(),
                                count=stats.handler_errors,
                            )
                if got < want:
                    break  # drained
        except Exception:
            stats.errors += 1
            if _should_log(stats.errors):
                _log.failure("{prefix}: receive failed", prefix=self.logPrefix())
        finally:
            stats.received += received
            stats.oversize += oversize
            if self.after_batch is not None:
                try:
                    self.after_batch()
                except Exception:
                    _log.failure("{prefix}: after_batch failed", prefix=self.logPrefix())

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
    """True for the 1st, 2nd, 4th, 8th... occurrence (as `lbproxy.rawsocket` logs)."""
    return count & (count - 1) == 0


class BatchPacketWriter(PacketWriter):
    """A :class:`PacketWriter` that queues packets and sends them with ``sendmmsg``.

    :meth:`send` returns True when the packet was queued; :meth:`flush` (called by the
    reader after each wake-up, by a full queue, and by :meth:`close`) sends the queue.
    Refusals found then are counted drops in ``stats``, by errno name, as before.
    """

    def __init__(self, system: IPacketSystem, max_packet: int = IPV6_MAX_PACKET + 64) -> None:
        super().__init__(system)
        if _CALLS is None:
            raise RuntimeError("sendmmsg is not available here")
        self._out = _Batch(SLOTS, max_packet)
        self._queued = 0
        self._ready = False  # open: queue; closed: the plain writer counts the drop
        # destination (16 bytes) -> the address of its sockaddr_in6 (for msg_name), and
        # the buffers themselves, kept alive while queued headers point at them.
        self._names: dict[bytes, int] = {}
        self._sockaddrs: list[ctypes.Array[ctypes.c_char]] = []
        for i in range(SLOTS):
            self._out.headers[i].hdr.namelen = 28

    def open(self) -> None:
        super().open()
        self._ready = self.fileno() >= 0

    def send(self, packet: bytes | bytearray | memoryview, destination: str | None = None) -> bool:
        """Queue ``packet`` for its own destination (or ``destination``); True if queued."""
        if destination is None:
            name = self._names.get(bytes(packet[24:40]))
            if name is None:
                return self._send_new(packet, bytes(packet[24:40]))
        else:
            return self._send_new(packet, destination)
        length = len(packet)
        out = self._out
        if length > out.slot or not self._ready:
            return self._send_new(packet, None)
        i = self._queued
        start = i * out.slot
        out.data[start : start + length] = packet
        out.iov_lengths[2 * i + 1] = length
        out.names[8 * i] = name
        i += 1
        self._queued = i
        if i == out.count:
            self.flush()
        return True

    def _send_new(
        self, packet: bytes | bytearray | memoryview, destination: bytes | str | None
    ) -> bool:
        """`send` for the uncommon cases: a new or given destination, an oversize packet,
        a closed writer."""
        if not self._ready:
            return super().send(packet, None)  # counted as the plain writer does
        if len(packet) > self._out.slot:
            return self._drop("EMSGSIZE", f"{len(packet)}-byte packet")
        if isinstance(destination, str):
            try:
                packed = socket.inet_pton(socket.AF_INET6, destination)
            except OSError as e:
                return self._drop("EINVAL", e)
        elif destination is None or len(destination) != 16:
            return self._drop("EINVAL", "not an IPv6 packet")
        else:
            packed = destination
        if packed not in self._names:
            if len(self._names) >= self.cache_size:
                self.flush()  # queued headers point at the cached addresses
                self._names.clear()
                self._sockaddrs.clear()
            # struct sockaddr_in6: family, port, flowinfo, address, scope id.
            sockaddr = ctypes.create_string_buffer(
                struct.pack("=HHI16sI", socket.AF_INET6, 0, 0, packed, 0), 28
            )
            self._sockaddrs.append(sockaddr)
            self._names[packed] = ctypes.addressof(sockaddr)
        out = self._out
        i = self._queued
        start = i * out.slot
        out.data[start : start + len(packet)] = packet
        out.iov_lengths[2 * i + 1] = len(packet)
        out.names[8 * i] = self._names[packed]
        self._queued = i + 1
        if i + 1 == out.count:
            self.flush()
        return True

    def flush(self) -> None:
        """Send what is queued; each refused packet is a counted drop."""
        count = self._queued
        if not count:
            return
        self._queued = 0
        assert _CALLS is not None
        sendmmsg = _CALLS[1]
        out = self._out
        fd = self.fileno()
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
        return self._queued

    def close(self) -> None:
        """Send what is queued, then close the socket."""
        if self._ready:
            self.flush()
        self._ready = False
        super().close()
