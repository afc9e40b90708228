"""Fakes and helpers for testing code built on lbproxy, shipped with the package.

Why: users (and our own tests) need to drive the raw-socket port without
root, sockets or a kernel.  :class:`MemoryPacketSystem` is an in-memory
:class:`~lbproxy.io.rawsocket.IBatchPacketSystem`: the plain ports
(``PacketReader``/``PacketWriter``) and the batched ones of ``lbproxy.io.mmsg``
(``BatchPacketReader``/``BatchPacketWriter``: ``recvmmsg``/``sendmmsg`` batches,
the queues the fast path fills) run on it unchanged.  It passes the same
contract tests as :class:`~lbproxy.io.rawsocket.LinuxPacketSystem`
(``tests/test_rawsocket.py``, ``tests/test_batchport.py``), so code that works
against it works against the kernel.

:class:`VethPair` builds the real counterpart for integration tests: two
network namespaces joined by a veth link (root only).

Nothing here imports scapy (GPL): build packets by hand or in your tests.
"""

from __future__ import annotations

import collections
import ctypes
import errno
import functools
import ipaddress
import os
import shutil
import socket
import struct
import subprocess
from collections.abc import Callable, Iterable, Mapping, Sequence

import attrs
from zope.interface import implementer

from lbproxy.io.mmsg import Batch, _IoVec
from lbproxy.io.rawsocket import IBatchPacketSystem

__all__ = ["MemoryPacketSystem", "SentPacket", "VethPair"]

#: Operations whose failure :meth:`MemoryPacketSystem.fail` can inject.
OPERATIONS = frozenset({"open_reader", "attach_filter", "receive", "open_sender", "send", "close"})


@attrs.frozen
class SentPacket:
    """One packet the fake system sent, and where it went.

    ``destination`` is the address it was routed to (for a packet sent on a link:
    the packet's own destination); ``link_address`` the 6-byte link-layer address a
    packet socket sent it to (``sendmmsg`` with a ``sockaddr_ll``), else None.
    """

    packet: bytes
    destination: str
    interface: str
    link_address: bytes | None = None


_SOCKADDR_IN6 = struct.Struct("=HHI16sI")
_SOCKADDR_LL = struct.Struct("=HHiHBB8s")


class _MemorySocket:
    """State of one fake socket: a packet queue for readers."""

    __slots__ = ("destinations", "drops", "errors", "interface", "limit", "queue", "reader")

    def __init__(self, interface: str | None, destinations: Sequence[bytes], limit: int) -> None:
        self.reader = interface is not None
        self.limit = limit
        self.drops = 0
        self.interface = interface or ""
        self.destinations = frozenset(destinations)
        self.queue: collections.deque[bytes] = collections.deque()
        self.errors: collections.deque[int] = collections.deque()


@implementer(IBatchPacketSystem)
class MemoryPacketSystem:
    """An in-memory :class:`~lbproxy.io.rawsocket.IBatchPacketSystem` with a kernel's manners.

    * ``interfaces``: names that exist (others give ``ENODEV``), each with an
      MTU of ``mtu``; :meth:`link_down` / :meth:`link_up` change their state.
    * ``routes``: network text → interface; a send to an address no route
      covers fails with ``ENETUNREACH``.  By default everything is routed
      through the first interface.
    * :meth:`inject` delivers a packet to every reader open on an interface
      (subject to its destination filter and queue bound, past which the
      packet is dropped and counted, like a full kernel queue).  The bound is
      ``receive_buffer // 1024`` packets when the reader asked for a
      ``receive_buffer`` (the kernel charges about a kilobyte per small
      packet), else ``queue_limit``.
    * :attr:`sent` lists every packet sent; :meth:`fail` injects errors.
    * ``receive_batch`` and ``send_batch`` are ``recvmmsg`` and ``sendmmsg``: they
      follow a batch's header, iovec and socket-address pointers as the kernel does.
      A reader socket sends to the ``sockaddr_ll`` it is given (out of that
      interface, no route needed), a sender to the ``sockaddr_in6`` (routed).
      Interface indexes are 2, 3... in the order given (1 is the loopback's).

    Descriptors are small fake numbers, not real files: use it with
    ``twisted.internet.testing.MemoryReactor`` and call ``doRead()`` yourself.
    """

    def __init__(
        self,
        interfaces: Iterable[str] = ("eth0",),
        routes: Mapping[str, str] | None = None,
        mtu: int = 1500,
        queue_limit: int = 10_000,
    ) -> None:
        self.interfaces: dict[str, bool] = dict.fromkeys(interfaces, True)
        if not self.interfaces:
            raise ValueError("a system needs at least one interface")
        if routes is None:
            routes = {"::/0": next(iter(self.interfaces))}
        self.routes = sorted(
            ((ipaddress.IPv6Network(net), name) for net, name in routes.items()),
            key=lambda route: route[0].prefixlen,
            reverse=True,
        )
        self.mtu = mtu
        self.queue_limit = queue_limit
        self.sent: list[SentPacket] = []
        self.overflows = 0
        self._sockets: dict[int, _MemorySocket] = {}
        self._next_fd = 3
        self._failures: dict[str, collections.deque[int]] = {}

    # Driving the fake -----------------------------------------------------

    def fail(self, operation: str, code: int, count: int = 1) -> None:
        """Make the next ``count`` calls of ``operation`` raise ``OSError(code)``."""
        if operation not in OPERATIONS:
            raise ValueError(f"unknown operation {operation!r}")
        self._failures.setdefault(operation, collections.deque()).extend([code] * count)

    def inject(self, interface: str, packet: bytes | bytearray, outgoing: bool = False) -> int:
        """A packet arrives on ``interface``; return how many readers queued it.

        ``outgoing=True`` is a packet this host sends out of the interface:
        like the Linux system (``PACKET_IGNORE_OUTGOING``) no reader gets it.
        """
        if interface not in self.interfaces:
            raise KeyError(interface)
        if outgoing or not self.interfaces[interface]:
            return 0
        data = bytes(packet)
        queued = 0
        for sock in self._sockets.values():
            if not sock.reader or sock.interface != interface:
                continue
            if sock.destinations and data[24:40] not in sock.destinations:
                continue
            if len(sock.queue) >= sock.limit:
                sock.drops += 1
                self.overflows += 1
                continue
            sock.queue.append(data)
            queued += 1
        return queued

    def link_down(self, interface: str) -> None:
        """Take the link down: readers on it get one ``ENETDOWN``, then nothing."""
        self.interfaces[interface] = False
        for sock in self._sockets.values():
            if sock.reader and sock.interface == interface:
                sock.errors.append(errno.ENETDOWN)

    def link_up(self, interface: str) -> None:
        """Bring the link back up: readers on it receive again."""
        self.interfaces[interface] = True

    def queued(self, fd: int) -> int:
        """How many packets wait on reader ``fd``."""
        return len(self._sockets[fd].queue)

    @property
    def open_descriptors(self) -> list[int]:
        """Descriptors not yet closed (a test can assert none leaked)."""
        return sorted(self._sockets)

    def _check(self, operation: str) -> None:
        pending = self._failures.get(operation)
        if pending:
            code = pending.popleft()
            raise OSError(code, os.strerror(code))

    def _allocate(self, sock: _MemorySocket) -> int:
        fd = self._next_fd
        self._next_fd += 1
        self._sockets[fd] = sock
        return fd

    # IPacketSystem --------------------------------------------------------

    def open_reader(
        self,
        interface: str,
        destinations: Sequence[bytes] = (),
        receive_buffer: int = 0,
    ) -> int:
        self._check("open_reader")
        if interface not in self.interfaces:
            raise OSError(errno.ENODEV, os.strerror(errno.ENODEV))
        _check_destinations(destinations)
        # Like the kernel's byte budget, roughly: ~1 KB of queue per small packet.
        limit = receive_buffer // 1024 if receive_buffer > 0 else self.queue_limit
        return self._allocate(_MemorySocket(interface, destinations, max(1, limit)))

    def attach_filter(self, fd: int, destinations: Sequence[bytes]) -> None:
        self._check("attach_filter")
        _check_destinations(destinations)
        self._socket(fd, reader=True).destinations = frozenset(destinations)

    def receive(self, fd: int, buffer: bytearray) -> int:
        self._check("receive")
        sock = self._socket(fd, reader=True)
        if sock.errors:
            code = sock.errors.popleft()
            raise OSError(code, os.strerror(code))
        if not sock.queue:
            raise BlockingIOError(errno.EAGAIN, os.strerror(errno.EAGAIN))
        packet = sock.queue.popleft()
        copied = min(len(packet), len(buffer))
        buffer[:copied] = packet[:copied]
        return len(packet)

    def dropped(self, fd: int) -> int:
        sock = self._socket(fd, reader=True)
        drops, sock.drops = sock.drops, 0
        return drops

    def receiver(self, fd: int) -> Callable[[bytearray], int]:
        self._socket(fd, reader=True)
        return functools.partial(self.receive, fd)

    def open_sender(self) -> int:
        self._check("open_sender")
        return self._allocate(_MemorySocket(None, (), 0))

    def send(self, fd: int, packet: bytes | bytearray | memoryview, destination: str) -> int:
        self._check("send")
        self._socket(fd, reader=False)
        return self._routed(bytes(packet), destination)

    def _routed(self, data: bytes, destination: str) -> int:
        """Send ``data`` as an IPPROTO_RAW socket would, routed towards ``destination``."""
        if len(data) < 40:
            raise _error(errno.EINVAL)
        address = ipaddress.IPv6Address(destination)
        interface = next((name for net, name in self.routes if address in net), None)
        if interface is None:
            raise _error(errno.ENETUNREACH)
        if not self.interfaces[interface]:
            raise _error(errno.ENETDOWN)
        if len(data) > self.mtu:
            raise _error(errno.EMSGSIZE)
        self.sent.append(SentPacket(data, destination, interface))
        return len(data)

    def _linked(self, data: bytes, sockaddr: bytes) -> int:
        """Send ``data`` as a packet socket would, to a ``sockaddr_ll``: out of its
        interface, to its link-layer address, no route involved."""
        if len(sockaddr) < _SOCKADDR_LL.size:
            raise _error(errno.EINVAL)
        family, _protocol, index, _, _, length, address = _SOCKADDR_LL.unpack(sockaddr)
        if family != socket.AF_PACKET:
            raise _error(errno.EINVAL)
        names = list(self.interfaces)
        if not 0 <= index - 2 < len(names):
            raise _error(errno.ENXIO)
        interface = names[index - 2]
        if not self.interfaces[interface]:
            raise _error(errno.ENETDOWN)
        if len(data) > self.mtu:
            raise _error(errno.EMSGSIZE)
        destination = socket.inet_ntop(socket.AF_INET6, data[24:40]) if len(data) >= 40 else ""
        self.sent.append(SentPacket(data, destination, interface, bytes(address[:length])))
        return len(data)

    def sender(self, fd: int) -> Callable[[bytes | bytearray | memoryview, tuple[str, int]], int]:
        self._socket(fd, reader=False)

        def send(packet: bytes | bytearray | memoryview, address: tuple[str, int]) -> int:
            return self.send(fd, packet, address[0])

        return send

    # IBatchPacketSystem ---------------------------------------------------

    def receive_batch(self, fd: int, batch: Batch, count: int) -> int:
        self._check("receive")
        sock = self._socket(fd, reader=True)
        if sock.errors:
            raise _error(sock.errors.popleft())
        if not sock.queue:
            raise _error(errno.EAGAIN)
        got = 0
        while got < count and sock.queue:
            packet = sock.queue.popleft()
            # As recvmmsg with MSG_TRUNC: through the header's iovec, the packet's head;
            # its full length in msg_len; MSG_TRUNC in msg_flags if it did not fit.
            header = batch.headers[got]
            iov = _IoVec.from_address(header.hdr.iov)
            ctypes.memmove(iov.base, packet, min(len(packet), iov.len))
            header.len = len(packet)
            header.hdr.flags = socket.MSG_TRUNC if len(packet) > iov.len else 0
            got += 1
        return got

    def send_batch(self, fd: int, batch: Batch, start: int, count: int) -> int:
        sock = self._sockets.get(fd)
        if sock is None:
            raise _error(errno.EBADF)
        sent = 0
        for i in range(start, start + count):
            if sent and self._failures.get("send"):
                return sent  # as sendmmsg: the refusal is the next call's answer
            try:
                self._check("send")
                header = batch.headers[i].hdr
                iov = _IoVec.from_address(header.iov)
                data = ctypes.string_at(iov.base, iov.len)
                name = ctypes.string_at(header.name, header.namelen) if header.name else b""
                if sock.reader:  # a packet socket: to a sockaddr_ll
                    self._linked(data, name)
                else:
                    if len(name) < _SOCKADDR_IN6.size:
                        raise _error(errno.EDESTADDRREQ if not name else errno.EINVAL)
                    family, _, _, address, _ = _SOCKADDR_IN6.unpack(name)
                    if family != socket.AF_INET6:
                        raise _error(errno.EAFNOSUPPORT)
                    self._routed(data, socket.inet_ntop(socket.AF_INET6, address))
            except OSError:
                if sent:
                    return sent  # the refused one is the next call's first
                raise
            sent += 1
        return sent

    def interface_index(self, interface: str) -> int:
        names = list(self.interfaces)
        if interface not in names:
            raise _error(errno.ENODEV)
        return names.index(interface) + 2

    def close(self, fd: int) -> None:
        self._check("close")
        if self._sockets.pop(fd, None) is None:
            raise OSError(errno.EBADF, os.strerror(errno.EBADF))

    def _socket(self, fd: int, reader: bool) -> _MemorySocket:
        sock = self._sockets.get(fd)
        if sock is None:
            raise OSError(errno.EBADF, os.strerror(errno.EBADF))
        if sock.reader != reader:
            raise OSError(errno.EOPNOTSUPP, os.strerror(errno.EOPNOTSUPP))
        return sock


def _error(code: int) -> OSError:
    """``OSError`` for ``code`` (``BlockingIOError`` for EAGAIN, and so on)."""
    return OSError(code, os.strerror(code))


def _check_destinations(destinations: Sequence[bytes]) -> None:
    for address in destinations:
        if len(address) != 16:
            raise ValueError(f"an IPv6 address has 16 bytes, not {len(address)}")


class VethPair:
    """Two network namespaces joined by one veth link, for integration tests.

    ``near`` is the side under test, ``far`` the peer.  Addresses come from
    ``2001:db8::/32`` only.  The far side routes ``routed`` (say, virtual
    addresses) through the near side; both sides have static neighbour
    entries (no neighbour discovery delays) and TX checksum offload off
    (``ethtool``, when installed), so AF_PACKET readers see final checksums.
    Needs root; :meth:`unavailable` says why not.  Always :meth:`destroy`.
    """

    near_mac = "02:00:5e:10:00:01"
    far_mac = "02:00:5e:10:00:02"

    def __init__(
        self,
        prefix: str,
        near_address: str = "2001:db8:7a::1",
        far_address: str = "2001:db8:7a::2",
        routed: str = "2001:db8:7b::/64",
    ) -> None:
        for address in (near_address, far_address, routed):
            if ipaddress.IPv6Network(address, strict=False).network_address not in (
                ipaddress.IPv6Network("2001:db8::/32")
            ):
                raise ValueError(f"{address} is outside 2001:db8::/32")
        VethPair._count += 1
        tag = f"{prefix}{os.getpid()}x{VethPair._count}"
        self.near = f"{tag}n"
        self.far = f"{tag}f"
        self.near_interface = f"{prefix}a"[:15]
        self.far_interface = f"{prefix}b"[:15]
        self.near_address = near_address
        self.far_address = far_address
        self.routed = routed
        self._created: list[str] = []

    _count = 0

    @staticmethod
    def unavailable() -> str | None:
        """Why namespaces cannot be built here, or ``None`` if they can."""
        if os.geteuid() != 0:
            return "needs root to create network namespaces"
        if shutil.which("ip") is None:
            return "needs iproute2's ip command"
        if not os.path.isdir("/proc/self/ns"):
            return "no network namespace support"
        return None

    def _ip(self, *args: str) -> None:
        subprocess.run(["ip", *args], check=True, capture_output=True, timeout=30)

    def create(self) -> None:
        """Make both namespaces and the link, configured and up."""
        for name in (self.near, self.far):
            self._ip("netns", "add", name)
            self._created.append(name)
        self._ip(
            "-n", self.near, "link", "add", self.near_interface, "address", self.near_mac,
            "type", "veth", "peer", "name", self.far_interface, "address", self.far_mac,
            "netns", self.far,
        )  # fmt: skip
        sides = ((self.near, self.near_interface), (self.far, self.far_interface))
        for name, interface in sides:
            # No router solicitations, no DAD: less unrelated traffic on the link.
            for key in ("accept_ra=0", "router_solicitations=0", "accept_dad=0"):
                self._ip("netns", "exec", name, "sysctl", "-qw", f"net.ipv6.conf.{interface}.{key}")
        if shutil.which("ethtool") is not None:
            for name, interface in sides:
                subprocess.run(
                    ["ip", "netns", "exec", name, "ethtool", "-K", interface, "tx", "off"],
                    check=False, capture_output=True, timeout=30,
                )  # fmt: skip
        self.link_up()

    def link_down(self) -> None:
        """Take the near side's interface down."""
        self._ip("-n", self.near, "link", "set", self.near_interface, "down")

    def link_up(self) -> None:
        """Bring both ends up and (re)install addresses, routes and neighbours."""
        sides = (
            (self.near, self.near_interface, self.near_address, self.far_address, self.far_mac),
            (self.far, self.far_interface, self.far_address, self.near_address, self.near_mac),
        )
        for name, interface, address, peer, peer_mac in sides:
            self._ip("-n", name, "link", "set", interface, "up")
            self._ip("-n", name, "addr", "replace", f"{address}/64", "dev", interface, "nodad")
            self._ip(
                "-n", name, "neigh", "replace", peer, "lladdr", peer_mac,
                "dev", interface, "nud", "permanent",
            )  # fmt: skip
        self._ip("-n", self.far, "route", "replace", self.routed, "via", self.near_address)

    def destroy(self) -> None:
        """Delete the namespaces (and with them the link).  Safe to call twice."""
        while self._created:
            name = self._created.pop()
            subprocess.run(["ip", "netns", "del", name], check=False, capture_output=True)

    def address(self, text: str) -> bytes:
        """Packed form of an address, for filters and packets."""
        return socket.inet_pton(socket.AF_INET6, text)
