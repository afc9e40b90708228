"""The forwarding service: raw-socket ports on both sides, the Balancer in between.

Why this exists: it is the one place that joins the edges to the core, so the data flow
reads in one screen::

    client interface --PacketReader--> Balancer.inbound  --PacketWriter--> backend
    server interface --PacketReader--> Balancer.outbound --PacketWriter--> terminal

Each port's protocol is an `Executing`: a packet goes through the core's general path and
its result is written to the port's transport (the writer).  With the real Linux packet
system the ports are the batched ones of `lbproxy.io.mmsg` (``recvmmsg``/``sendmmsg``, up
to 64 packets per system call; each reader wake-up ends by flushing the writer, so a
packet waits at most for the rest of its own batch), and each batch goes first to the fast
path executor (`lbproxy.io.fastpath`: `FastPath.forward` on the client link,
`FastPath.reply` on the server link), which rewrites the usual shapes from the receive
buffer straight into the writer's queue and delivers every other packet back, in its
turn, to the general path.  Packets to backends on the server link go out through that
link's packet socket to the MAC the kernel's neighbour table has for them (read every
``neighbour_interval`` seconds, `lbproxy.io.neighbours`; a backend with no usable entry
goes through the raw socket, so the kernel resolves it) -- docs/performance.md has the
figures and the trade-offs.

With ``offload`` (``[balancer] offload``, docs/xdp.md) the XDP executor
(`lbproxy.io.xdp.XdpOffload`) is loaded and attached to both links in driver mode when the
service is built -- so that ``offload = "xdp"`` refuses to start, with ``file: key:
reason``, before anything else starts -- and forwards the usual packets of established
bindings in the driver; what it hands up arrives here as before.  The service keeps its
maps in step: the bindings the core made are written after each batch (and, for changes
made outside a batch, on the next reactor turn), the policy is compared after each batch,
and the program's last-seen stamps of the bindings coming due are folded into the table
right before each sweep (claim 10; the table asks for any other it would expire or
evict), with its counters.

It owns the life cycle twistd expects: sockets are opened as root in
``privilegedStartService``, reading starts in ``startService``, and a `LoopingCall` on the
injected clock sweeps expired bindings.

The server-side reader sees every packet on the backends' link, including traffic to the
balancer host itself (health-check answers, neighbour discovery).  Which of them are
replies to forward is the core's rule (`lbproxy.core.policy.is_reply`): this service
only tells the core this host's own addresses; the rest are left to the kernel.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from pathlib import Path
from typing import TYPE_CHECKING

from twisted.application.service import Service
from twisted.internet.interfaces import IReactorFDSet, IReactorTime
from twisted.internet.task import LoopingCall
from twisted.logger import Logger
from zope.interface import implementer

from lbproxy import preflight
from lbproxy.core.balancer import Balancer
from lbproxy.io import mmsg
from lbproxy.io.fastpath import FastPath
from lbproxy.io.mmsg import IBatchPacketProtocol
from lbproxy.io.neighbours import NeighbourTable
from lbproxy.io.rawsocket import (
    IPacketSystem,
    LinuxPacketSystem,
    PacketProtocol,
    PacketReader,
    PacketWriter,
)
from lbproxy.tomlconfig import ConfigError

if TYPE_CHECKING:
    from lbproxy.io.xdp import XdpOffload

__all__ = ["Executing", "ForwarderService", "local_addresses"]

_log = Logger()

#: One batch as ``recvmmsg`` left it, for an executor: (data, slot, lengths, count,
#: deliver), where ``deliver(start, length)`` hands one packet to the general path.
_BatchExecutor = Callable[[memoryview, int, memoryview, int, Callable[[int, int], None]], object]


@implementer(IBatchPacketProtocol)
class Executing(PacketProtocol):
    """The protocol of each link's port: every packet through the core's general path
    (``general``: `Balancer.inbound` or `Balancer.outbound`), its result written to the
    port's transport; with ``fast``, every batch first through that executor
    (`FastPath.forward` or `FastPath.reply`), which delivers back, in order, each packet
    it leaves to the general path; ``after`` (when set) runs at the end of each batch
    (or packet) -- the XDP executor writes the bindings the core made meanwhile."""

    def __init__(
        self, general: Callable[[bytearray], bytearray | None], fast: _BatchExecutor | None = None
    ) -> None:
        self.general = general
        self.fast = fast
        self.after: Callable[[], object] | None = None
        self._write: Callable[..., object] | None = None

    def connectionMade(self) -> None:
        assert self.transport is not None
        self._write = self.transport.write

    def packetReceived(self, packet: bytearray) -> None:
        out = self.general(packet)
        if out is not None and self._write is not None:
            self._write(out)
        if self.after is not None:
            self.after()

    def batchReceived(
        self, batch: mmsg.Batch, count: int, deliver: Callable[[int, int], None]
    ) -> None:
        if self.fast is None:
            for i in range(count):
                deliver(batch.start(i), batch.length(i))
        else:
            self.fast(batch.data, batch.slot, batch.lengths, count, deliver)
        if self.after is not None:
            self.after()


def _xdp_counts(counted: dict[str, int]) -> dict[str, int]:
    """`XdpOffload.stats` under the names ``ports.xdp`` shows them."""
    names = (("forwarded", "packets"), ("forwarded_bytes", "bytes"), ("replies", "replies"),
             ("reply_bytes", "reply_bytes"), ("passed", "passed"),
             ("replies_passed", "replies_passed"), ("stale", "stale"),
             ("no_route", "no_route"), ("map_full", "full"),
             ("stale_unqueued", "unqueued"))  # fmt: skip
    return {shown: counted.get(name, 0) for shown, name in names}


def local_addresses(proc_path: str = "/proc/net/if_inet6") -> set[bytes]:
    """This network namespace's own IPv6 addresses (16-byte packed), from procfs."""
    found: set[bytes] = set()
    try:
        text = Path(proc_path).read_text()
    except OSError:
        return found
    for line in text.splitlines():
        fields = line.split()
        if fields and len(fields[0]) == 32:
            found.add(bytes.fromhex(fields[0]))
    return found


class ForwarderService(Service):
    """Reads both links, asks the Balancer, writes the results."""

    def __init__(
        self,
        balancer: Balancer,
        system: IPacketSystem,
        reactor: IReactorFDSet,
        clock: IReactorTime,
        *,
        client_interface: str,
        server_interface: str,
        batch: int = 256,
        sweep_interval: float = 1.0,
        own_addresses: Iterable[bytes] | None = None,
        batch_io: bool | None = None,
        link_send: bool | None = None,
        neighbour_interval: float = 1.0,
        offload: str = "none",
        config_path: str = "<config>",
        xdp_object: str | Path | None = None,
    ) -> None:
        """``batch_io``: use `lbproxy.io.mmsg`; None = when the system is the real Linux one.
        ``link_send``: send to backends with a neighbour entry on the server link
        through the server link's packet socket (module docstring); None = with
        batched I/O.  ``neighbour_interval``: seconds between neighbour-table reads.
        ``offload``: ``"auto"`` (the XDP executor when this host can run it, else one
        log line saying why not), ``"xdp"`` (`preflight.Refused`, naming
        ``config_path`` and ``balancer.offload``, when it cannot), ``"none"``;
        ``xdp_object``: the compiled program (default: `lbproxy.io.xdp.OBJECT`)."""
        self.balancer = balancer
        self.clock = clock
        self.sweep_interval = sweep_interval
        self._own = set(own_addresses) if own_addresses is not None else None
        if batch_io is None:
            batch_io = mmsg.available() and isinstance(system, LinuxPacketSystem)
        self.writer: PacketWriter
        self.client: PacketReader
        self.server: PacketReader
        vips = [a.packed for a in balancer.vips]
        self.fast: FastPath | None = None
        if batch_io:
            writer = self.writer = mmsg.BatchPacketWriter(system)
            #: The usual packet from the receive buffer straight into the send queue.
            fast = self.fast = FastPath(balancer, writer, clock)
            self.client = mmsg.BatchPacketReader(
                system, reactor, client_interface,
                Executing(balancer.inbound, fast.forward), writer=writer,
                destinations=vips, batch=batch,
            )  # fmt: skip
            self.server = mmsg.BatchPacketReader(
                system, reactor, server_interface,
                Executing(balancer.outbound, fast.reply), writer=writer, batch=batch,
            )  # fmt: skip
        else:
            self.writer = PacketWriter(system)
            self.client = PacketReader(
                system, reactor, client_interface, Executing(balancer.inbound),
                writer=self.writer, destinations=vips, batch=batch,
            )  # fmt: skip
            self.server = PacketReader(
                system, reactor, server_interface, Executing(balancer.outbound),
                writer=self.writer, batch=batch,
            )  # fmt: skip
        self._sweeper = LoopingCall(self._sweep)
        self._sweeper.clock = clock
        self.link_send = batch_io if link_send is None else link_send and batch_io
        self.neighbour_interval = neighbour_interval
        self._neighbours: NeighbourTable | None = None
        #: The server link's neighbours, for the XDP program's next hops to backends.
        self._xdp_neighbours: NeighbourTable | None = None
        self._namespace: str | None = getattr(system, "namespace", None)
        self._refresher = LoopingCall(self._refresh_neighbours)
        self._refresher.clock = clock
        self.offload = offload
        #: The XDP executor, attached to both links (None: the Python paths serve all).
        self.xdp: XdpOffload | None = None
        #: Why the XDP executor does not run ("" when it does, or offload = "none").
        self.offload_reason = ""
        self._xdp_counts: dict[str, int] = _xdp_counts({})
        self._flush_due = False
        if offload != "none":
            self._start_offload(system, config_path, xdp_object)

    # -- the XDP executor ------------------------------------------------------------

    def _start_offload(
        self, system: IPacketSystem, config_path: str, path: str | Path | None
    ) -> None:
        """Load and attach the XDP executor, or fall back (``auto``) / refuse (``xdp``)."""
        client, server = self.client.interface, self.server.interface
        if isinstance(system, LinuxPacketSystem):
            from lbproxy.io.xdp import OBJECT, XdpOffload, XdpUnavailable

            try:
                self.xdp = XdpOffload.open(
                    self.balancer, self.clock, client, server, namespace=self._namespace,
                    path=OBJECT if path is None else path,
                )  # fmt: skip
            except XdpUnavailable as e:
                self.offload_reason = str(e)
        else:
            self.offload_reason = "not on the kernel's interfaces (an in-memory packet system)"
        if self.xdp is None:
            if self.offload == "xdp":
                raise preflight.Refused([ConfigError(
                    config_path, "balancer.offload",
                    f'"xdp" cannot run here: {self.offload_reason} (offload = "auto" falls '
                    "back to the Python paths)",
                )])  # fmt: skip
            _log.info("XDP offload off: {reason}; the Python paths serve every packet",
                      reason=self.offload_reason)  # fmt: skip
            return
        xdp = self.xdp
        xdp.on_dirty = self._flush_soon
        try:
            self._xdp_neighbours = NeighbourTable(server, self._namespace)
        except OSError:
            _log.failure("no neighbour table: the XDP program looks up every next hop")
        self._xdp_next_hops(xdp)
        for reader in (self.client, self.server):
            protocol = reader.protocol
            if isinstance(protocol, Executing):
                protocol.after = self._after_batch
        _log.info("XDP offload on: {client} and {server} (driver mode)", client=client,
                  server=server)  # fmt: skip

    def _after_batch(self) -> None:
        """After each batch the Python paths handled: the bindings the core made or
        changed into the program's maps (so the terminal's next packets stay in the
        driver), and the policy if it changed."""
        xdp = self.xdp
        if xdp is not None:
            xdp.flush()
            xdp.refresh_policy()

    def _flush_soon(self) -> None:
        """A binding changed outside a batch, maybe (an operator's move, a
        notification): flush on the next reactor turn (after the core is done)."""
        if not self._flush_due:
            self._flush_due = True
            self.clock.callLater(0, self._flush_now)

    def _flush_now(self) -> None:
        self._flush_due = False
        try:
            self._after_batch()
        except Exception:
            _log.failure("XDP map update failed")

    def _stop_offload(self) -> None:
        """The program's last stamps into the table (saved after this), then off the
        links: what it forwarded goes to the kernel (and the nftables drops) again."""
        xdp, self.xdp = self.xdp, None
        if xdp is None:
            return
        try:
            xdp.sync()
            xdp.fold_all()
        except Exception:
            _log.failure("XDP sync failed")
        self._xdp_counts = _xdp_counts(xdp.stats())
        xdp.close()
        if self._xdp_neighbours is not None:
            self._xdp_neighbours.close()
            self._xdp_neighbours = None

    def _xdp_next_hops(self, xdp: XdpOffload) -> None:
        """The backends' next hops from the server link's neighbour table into the
        program (`XdpOffload.set_next_hops`): one dump a sweep instead of the kernel's
        lookup per packet.  A backend without a usable entry, or any failure, leaves it
        to the kernel's lookup (which hands the packet up when it has no neighbour
        either; the general path's sending resolves it)."""
        table = self._xdp_neighbours
        if table is None:
            return
        backends = {b.packed for b in self.balancer.backends.values()}
        try:
            found = table.read(backends)
            mac, mtu = table.link()
        except Exception:
            _log.failure("neighbour table read failed: the XDP program looks up next hops")
            found, mac, mtu = {}, b"", 0
        xdp.set_next_hops({address: (table.ifindex, their + mac, mtu)
                           for address, their in found.items()})

    def privilegedStartService(self) -> None:
        """Open the raw sockets (needs root or CAP_NET_RAW)."""
        super().privilegedStartService()
        if self._own is None:
            self._own = local_addresses()
        self.balancer.set_own_addresses(self._own)
        self.writer.open()
        self.client.open()
        self.server.open()
        if self.link_send and self._neighbours is None:
            assert isinstance(self.writer, mmsg.BatchPacketWriter)
            try:
                self._neighbours = NeighbourTable(self.server.interface, self._namespace)
            except OSError:
                _log.failure("no neighbour table: sending to backends through the kernel")
            else:
                self.writer.use_link(self.server.fileno(), self._neighbours.ifindex)

    def startService(self) -> None:
        super().startService()
        if self.writer.fileno() < 0:  # started without privilegedStartService (tests)
            self.privilegedStartService()
        self.client.startReading()
        self.server.startReading()
        self._sweeper.start(self.sweep_interval, now=False)
        if self._neighbours is not None:
            self._refresher.start(self.neighbour_interval, now=True)
        _log.info(
            "lbproxy forwarding: {client} -> Balancer({mode}) -> {server}",
            client=self.client.interface,
            server=self.server.interface,
            mode=self.balancer.mode,
        )

    def stopService(self) -> None:
        super().stopService()
        if self._sweeper.running:
            self._sweeper.stop()
        if self._refresher.running:
            self._refresher.stop()
        self._stop_offload()
        for reader in (self.client, self.server):
            reader.stopReading()
        self.writer.close()  # first: it flushes through the server link's socket
        for reader in (self.client, self.server):
            reader.close()
        if self._neighbours is not None:
            self._neighbours.close()
            self._neighbours = None

    def _sweep(self) -> None:
        xdp = self.xdp
        if xdp is not None:
            # Claim 10 through the driver: the bindings due before the next sweeps are
            # refreshed by what the program forwarded (at their last packet's time);
            # the sweep asks for any other it would expire.
            try:
                self._xdp_next_hops(xdp)
                xdp.prepare()
                xdp.sync(ahead=2 * self.sweep_interval)
            except Exception:
                _log.failure("XDP sync failed")
        try:
            self.balancer.sweep()
        except Exception:  # never let a sweep bug stop the sweeper or reach the reactor
            _log.failure("expiry sweep failed")

    def port_stats(self) -> dict[str, dict[str, object]]:
        """What the sockets counted, for `lbproxyctl stats` and the metrics: per reader
        ("client", "server") packets received and lost (too big, the kernel's queue
        full, handler failures), the writer's sent and refused packets by errno name,
        and the fast path's share.  Reads the kernel's drop counters (one system call
        per reader)."""
        ports: dict[str, dict[str, object]] = {}
        for name, reader in (("client", self.client), ("server", self.server)):
            try:
                stats = reader.update_stats()
            except OSError:  # the socket went away under us: what we have
                stats = reader.stats
            ports[name] = {
                "received": stats.received,
                "oversize": stats.oversize,
                "kernel_drops": stats.kernel_drops,
                "handler_errors": stats.handler_errors,
                "receive_errors": stats.errors,
                "wakeups": stats.wakeups,
            }
        writer = self.writer.stats
        ports["writer"] = {
            "sent": writer.sent,
            "dropped": writer.dropped,
            "errors": dict(writer.errors),
        }
        if self.fast is not None:
            ports["fast_path"] = {
                "forwarded": self.fast.forwarded,
                "replies": self.fast.replies,
                "errors": self.fast.errors,
                # Why the fast path does not serve this configuration ("" = it does).
                "inbound_off": self.fast.inbound_off or "",
                "replies_off": self.fast.replies_off or "",
            }
        if self.offload != "none":
            ports["xdp"] = self._offload_stats()
        return ports

    def _offload_stats(self) -> dict[str, object]:
        """The XDP executor: the setting, whether it runs (and why not), and what the
        program forwarded -- packets and bytes per direction -- and handed up (the
        program's per-CPU counters, summed; kept after the service stops)."""
        xdp = self.xdp
        if xdp is not None:
            xdp.fold_counters()
            self._xdp_counts = _xdp_counts(xdp.stats())
        out: dict[str, object] = {
            "setting": self.offload,
            "active": 1 if xdp is not None else 0,
            "reason": self.offload_reason,
            **self._xdp_counts,
        }
        if xdp is not None:
            # Why the policy keeps a direction out of the driver ("" = it does not).
            policy = self.balancer.policy
            out["inbound_off"] = policy.fast_inbound or ""
            out["replies_off"] = policy.fast_replies or ""
        return out

    def _refresh_neighbours(self) -> None:
        """Give the writer the backends' current link-layer addresses (a backend with
        no usable entry goes through the kernel, which resolves it)."""
        writer = self.writer
        if self._neighbours is None or not isinstance(writer, mmsg.BatchPacketWriter):
            return
        backends = {b.packed for b in self.balancer.backends.values()}
        try:
            found = self._neighbours.read(backends)
        except Exception:  # never let it stop the refresher; the kernel path still works
            _log.failure("neighbour table read failed")
            found = {}
        writer.set_link_neighbours(found)
