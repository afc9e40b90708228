"""A packet reader that takes its packets from a ``PACKET_RX_RING`` instead of ``recvmmsg``.

Why: with ``recvmmsg`` every packet is dequeued, copied to the process and freed by the
balancer's own CPU, inside the system call -- about a sixth of that CPU at full load
(docs/performance.md).  With a receive ring (packet(7), TPACKET_V2) the kernel copies
each packet into a memory map shared with the process as it arrives, in the receiving
CPU's softirq, and the process reads it there: no system call per batch, no copy out,
no socket buffer to free.  The fast path (`lbproxy.fastpath`) reads the ring directly.

Theory of operation
-------------------
* The ring is `frames` frames of `frame_size` bytes.  A frame starts with a
  ``struct tpacket2_hdr``: ``tp_status`` (0: the kernel's; nonzero: a packet for us),
  ``tp_len`` (the packet's length), ``tp_snaplen`` (the bytes in the frame), ``tp_net``
  (where the packet starts in the frame; the same for every frame of a ``SOCK_DGRAM``
  socket).  The kernel fills frames in order and never overtakes the process: a full
  ring drops the packet, counted in ``PACKET_STATISTICS`` as before.
* `RingPacketReader.doRead` walks the frames from where it stopped: the ready run up to
  the ring's end (or ``batch``) goes to the fast path whole, exactly as a ``recvmmsg``
  batch does (packet i at ``i * frame_size``, its length every ``frame_size // 4``
  words), then every frame of the run is handed back (status 0), whatever happened.
* A packet longer than its frame is truncated by the kernel (``tp_len >
  tp_snaplen``); it is counted as oversize and dropped, as one longer than
  ``max_packet`` is.  Frames are sized for the interface's MTU (at least 2048 bytes),
  so only packets merged by GRO/LRO can be that long: turn those off on the client
  interface (docs/deploying.md).
* Memory order: the process reads ``tp_status`` before the packet and writes it back
  after.  On x86-64 loads are not reordered with loads nor stores with earlier loads,
  so plain reads and writes of the map suffice; elsewhere Python cannot place the
  barriers the kernel's documentation asks for, so :func:`available` is False there
  and the forwarder keeps ``recvmmsg``.
"""

from __future__ import annotations

import array
import contextlib
import mmap
import platform
import sys
from collections.abc import Callable, Sequence
from typing import Any

from twisted.internet.interfaces import IReactorFDSet
from twisted.logger import Logger

from lbproxy import mmsg
from lbproxy.rawsocket import DEFAULT_BATCH, IPV6_MAX_PACKET, LinuxPacketSystem

__all__ = ["DEFAULT_RING_BYTES", "RingPacketReader", "available", "frame_size_for"]

#: The ring's size when the reader is not given a receive buffer size: 8 MiB, 4096
#: frames of 2048 bytes (about 10 ms of packets at 400,000 per second).
DEFAULT_RING_BYTES = 8 << 20
#: tpacket2_hdr (32 bytes) aligned, plus the 16 bytes the kernel keeps for a link
#: header before the network header of a SOCK_DGRAM packet: where packets start.
_FRAME_HEADROOM = 48 + 16
_MIN_FRAME = 2048
_BLOCK = 1 << 16

_log = Logger()
#: tp_status values handing a run of frames back to the kernel.
_ZEROS = memoryview(array.array("I", [0] * mmsg.SLOTS))


def available() -> bool:
    """Whether receive rings are used here: Linux on x86-64 (see the memory-order note)."""
    return (
        sys.platform.startswith("linux")
        and platform.machine() in ("x86_64", "AMD64")
        and mmsg.available()
    )


def frame_size_for(packet: int) -> int:
    """The frame size that holds a `packet`-byte packet: a power of two, >= 2048."""
    size = _MIN_FRAME
    while size < packet + _FRAME_HEADROOM:
        size *= 2
    return size


class RingPacketReader(mmsg.BatchPacketReader):
    """A :class:`lbproxy.mmsg.BatchPacketReader` reading a ``PACKET_RX_RING``.

    Same life cycle, handler contract (``handle``, ``emit``, ``fast``, ``after_batch``)
    and statistics.  The ring holds ``receive_buffer`` bytes (default
    :data:`DEFAULT_RING_BYTES`); frames fit the smaller of ``max_packet`` and the
    interface's MTU.
    """

    def __init__(
        self,
        system: LinuxPacketSystem,
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
        fast: mmsg.FastHandler | None = None,
    ) -> None:
        super().__init__(system, reactor, interface, handle, destinations=destinations,
                         batch=batch, max_packet=max_packet, receive_buffer=receive_buffer,
                         after_batch=after_batch, emit=emit, fast=fast)  # fmt: skip
        self._linux = system
        self._map: mmap.mmap | None = None
        self._data = memoryview(b"")
        self._words = memoryview(b"").cast("I")
        self._frames = self._frame_size = self._net = self._head = self._base = 0

    def open(self) -> None:
        """Open the socket with its ring (privileged); packets fill the ring from now on."""
        if self._fd >= 0:
            return
        frame = frame_size_for(min(self.max_packet, self._linux.interface_mtu(self.interface)))
        block = max(_BLOCK, frame)
        total = self.receive_buffer or DEFAULT_RING_BYTES
        frames = max(1, total // block) * (block // frame)
        fd, mapped = self._linux.open_ring_reader(
            self.interface, self.destinations, frame, frames, block
        )
        self._fd, self._map = fd, mapped
        self._data = memoryview(mapped)
        self._words = self._data.cast("I")
        self._frames, self._frame_size, self._head = frames, frame, 0
        self._net = 0

    def close(self) -> None:
        """Stop reading, unmap the ring and close the socket.  Safe to call twice."""
        self.stopReading()
        self._view = self._in.data
        self._words.release()
        self._data.release()
        self._words = memoryview(b"").cast("I")
        self._data = memoryview(b"")
        if self._map is not None:
            mapped, self._map = self._map, None
            with contextlib.suppress(BufferError):  # a view still held elsewhere: GC
                mapped.close()
        super().close()

    @property
    def frames(self) -> int:
        """Frames in the ring (packets it holds at most)."""
        return self._frames

    @property
    def frame_size(self) -> int:
        return self._frame_size

    def doRead(self) -> None:
        """Hand over the ready frames (up to ``batch``); count everything, raise nothing."""
        stats = self.stats
        stats.wakeups += 1
        words, size, frames = self._words, self._frame_size, self._frames
        step = size >> 2  # words per frame
        zeros = _ZEROS
        fast, one = self.fast, self._one
        head = self._head
        left = self.batch
        try:
            while left > 0:
                limit = min(left, frames - head, mmsg.SLOTS)
                # The run of ready frames (tp_status nonzero), read in one strided copy.
                ready = words[head * step : (head + limit) * step : step].tolist()
                try:
                    count = ready.index(0)
                except ValueError:
                    count = limit
                if not count:
                    break
                base = head * size
                net = self._net or words[(base >> 2) + 3] >> 16  # tp_net: the high half
                self._net, self._base = net, base
                self._view = view = self._data[base + net :]
                lengths = words[(base >> 2) + 2 :]  # tp_snaplen of frame i at [i * step]
                stats.received += count  # `_one` takes oversize ones back out
                try:
                    if fast is not None:
                        fast(view, size, lengths, step, count, one)
                    else:
                        for i in range(count):
                            one(i * size, lengths[i * step])
                finally:
                    # The frames are the kernel's again: tp_status := 0, one strided write.
                    words[head * step : (head + count) * step : step] = zeros[:count]
                    view.release()
                    lengths.release()
                    self._view = self._in.data
                left -= count
                head += count
                if head == frames:
                    head = 0
                elif count < limit:
                    break  # drained
        except Exception:
            stats.errors += 1
            if mmsg._should_log(stats.errors):
                _log.failure("{prefix}: ring read failed", prefix=self.logPrefix())
        finally:
            self._head = head
            if self.after_batch is not None:
                try:
                    self.after_batch()
                except Exception:
                    _log.failure("{prefix}: after_batch failed", prefix=self.logPrefix())

    def _one(self, start: int, length: int) -> None:
        """As the batched reader's, and a packet the kernel truncated to its frame
        (``tp_len`` > ``tp_snaplen``) is oversize."""
        if self._words[((self._base + start) >> 2) + 1] > length:  # tp_len of the frame
            self.stats.received -= 1
            self.stats.oversize += 1
            return
        super()._one(start, length)

    def logPrefix(self) -> str:
        return f"RingPacketReader({self.interface})"
