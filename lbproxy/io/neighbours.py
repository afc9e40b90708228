"""The kernel's IPv6 neighbour table for one interface, read through pyroute2.

Why: the batched writer (`lbproxy.io.mmsg.BatchPacketWriter`) sends to backends on the
server link straight to their link-layer addresses, skipping the kernel's route lookup
and neighbour code; the forwarder gives it the backends' entries from here, read about
once a second.  An entry counts only in a state whose link-layer address the kernel
itself would use: REACHABLE, STALE, DELAY, PROBE or PERMANENT (not INCOMPLETE, FAILED,
NOARP or NONE).  Any backend without one goes through the kernel, which resolves it.

The netlink socket is opened inside the given network namespace (as
`lbproxy.io.rawsocket.LinuxPacketSystem` opens its sockets: ``setns`` in this thread for
the moment of creating it) and kept; pyroute2 does the queries and the parsing.
"""

from __future__ import annotations

import errno
import socket
from collections.abc import Iterable
from typing import Any

from lbproxy.io.rawsocket import _network_namespace

__all__ = ["USABLE_STATES", "NeighbourTable"]

#: Neighbour states whose link-layer address is usable: REACHABLE, STALE, DELAY,
#: PROBE, PERMANENT (``NUD_*`` of linux/neighbour.h).
USABLE_STATES = 0x02 | 0x04 | 0x08 | 0x10 | 0x80


class NeighbourTable:
    """Reads the usable IPv6 neighbours of one interface (netlink, no subprocess).

    ``ifindex`` is the interface's index in its namespace; :meth:`read` is one dump
    (about a millisecond with a handful of neighbours); :meth:`close` releases the
    socket.  Raises ``OSError`` (``ENODEV``: no such interface; ``ENOENT``: no such
    namespace) when it cannot be opened.
    """

    def __init__(self, interface: str, namespace: str | None = None) -> None:
        from pyroute2 import IPRoute

        self.interface = interface
        with _network_namespace(namespace):
            # Created here, the netlink socket belongs to the namespace for good.
            ipr = IPRoute()
        try:
            found = ipr.link_lookup(ifname=interface)
            if not found:
                raise OSError(errno.ENODEV, f"no interface {interface!r}")
        except BaseException:
            ipr.close()
            raise
        self.ifindex: int = int(found[0])
        self._ipr: Any = ipr

    def read(self, addresses: Iterable[bytes] | None = None) -> dict[bytes, bytes]:
        """The interface's usable IPv6 neighbours: address (16 bytes) -> link-layer
        address (6 bytes) -- all of them (one dump), or only those among `addresses`
        (one query each).  Failures raise ``OSError``.

        Why both: a dump carries the whole namespace's table, every interface's, and
        pyroute2 decodes it all before keeping this interface's -- 10-15 ms a read with
        a few hundred entries on another link (the client link's, say, where the kernel
        tries to answer terminals' care-of addresses), twice a second in the forwarder.
        The forwarder wants its backends only: a query each is about 0.2 ms, whatever
        the table holds."""
        if self._ipr is None:
            raise OSError(errno.EBADF, "the neighbour table is closed")
        from pyroute2 import NetlinkError

        if addresses is None:
            try:
                messages = list(self._ipr.neigh("dump", family=socket.AF_INET6,
                                                ifindex=self.ifindex))  # fmt: skip
            except NetlinkError as e:
                raise OSError(e.code, f"neighbour dump refused: {e}") from e
        else:
            messages = []
            for address in addresses:
                try:
                    messages += self._ipr.neigh(
                        "get", family=socket.AF_INET6, ifindex=self.ifindex,
                        dst=socket.inet_ntop(socket.AF_INET6, address),
                    )  # fmt: skip
                except NetlinkError as e:
                    if e.code != errno.ENOENT:  # no entry: not a usable neighbour
                        raise OSError(e.code, f"neighbour query refused: {e}") from e
        found: dict[bytes, bytes] = {}
        for message in messages:
            if (
                message["family"] != socket.AF_INET6
                or message["ifindex"] != self.ifindex
                or not message["state"] & USABLE_STATES
            ):
                continue
            destination, link = message.get_attr("NDA_DST"), message.get_attr("NDA_LLADDR")
            if not destination or not link:
                continue
            mac = bytes.fromhex(link.replace(":", ""))
            if len(mac) == 6:
                found[socket.inet_pton(socket.AF_INET6, destination)] = mac
        return found

    def link(self) -> tuple[bytes, int]:
        """The interface's own link-layer address (6 bytes) and MTU (the XDP executor's
        next hops to backends: `lbproxy.io.xdp.XdpOffload.set_next_hops`).  Failures
        raise ``OSError``."""
        if self._ipr is None:
            raise OSError(errno.EBADF, "the neighbour table is closed")
        from pyroute2 import NetlinkError

        try:
            messages = list(self._ipr.get_links(self.ifindex))
        except NetlinkError as e:
            raise OSError(e.code, f"link query refused: {e}") from e
        if not messages:
            raise OSError(errno.ENODEV, f"no interface {self.interface!r}")
        address = messages[0].get_attr("IFLA_ADDRESS") or ""
        return bytes.fromhex(address.replace(":", "")), int(messages[0].get_attr("IFLA_MTU") or 0)

    def close(self) -> None:
        """Close the netlink socket.  Safe to call twice."""
        ipr, self._ipr = self._ipr, None
        if ipr is not None:
            ipr.close()
