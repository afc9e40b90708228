"""The terminal emulator: many mobile IPv6 terminals behind one TUN device.

Theory of operation.  Linux here has no MIPv6 (CONFIG_IPV6_MIP6 unset), so
this program plays the mobile node's part for the kernel's own sockets:

* The home addresses sit on a TUN device with a route to the virtual
  address (and the default route) through it.  A kernel TCP or UDP socket
  bound to home address i sends ordinary packets into the TUN.
* Outbound (TUN -> access link): to a route-optimised destination (the
  VIP prefix) the packet gets a Home Address Option and the terminal's
  current care-of address as source (RFC 6275 §11.3.1); to anything else it
  is reverse-tunnelled to the home agent.  It leaves by AF_PACKET on the
  access link the terminal is on, to the router's MAC address.
* Inbound (access link -> TUN): a packet to the current care-of address with
  a Type 2 Routing Header loses the header and gets the home address as
  destination; an IPv6-in-IPv6 packet from the home agent is untunnelled;
  Binding Acknowledgements are consumed here.  nftables in the terminal
  namespace drops those packets before the kernel sees them (it would answer
  Parameter Problem); AF_PACKET has read them already.
* ``move`` switches a terminal's care-of address and sends a Binding Update
  to its home agent, retransmitted (1 s, 2 s, 4 s) until acknowledged.

RFC mode (``--ro-mode rfc`` or the ``ro_mode`` control request).  By default a packet
to the VIP prefix gets its HAO at once, without any binding at the correspondent --
which no real mobile node does (RFC 6275 §9.3.1: the correspondent drops it and answers
with a Binding Error).  In the RFC mode each terminal behaves as §11.6-§11.7 say towards
each correspondent (:mod:`lbproxy.testbed.correspondents`): tunnel through the home
agent, return routability (HoTI through the home agent, CoTI direct), a Binding Update
authorised with Kbm, then route optimisation once the Binding Acknowledgement verifies;
after every move, tunnelling again until the next acknowledgement.

Control (JSON lines on a UNIX socket, see :mod:`lbproxy.testbed.control`):
``status``, ``move {terminal, link, wait=true}``, ``register``, ``track_addresses``,
``ro_mode {mode: "always"|"rfc", delay=0}``, ``correspondents {terminal}`` (the RFC
mode's registrations with their keys, for tests that forge Binding Updates).

Kernel care-of addresses.  The bed puts every terminal's care-of address on every
access link on the kernel's ``acc*`` interfaces, so the kernel's view never changes
when a terminal moves.  ``track_addresses`` switches to what a real mobile node's
kernel shows: from then on only each terminal's *current* care-of address is there,
and a move adds the new one and then deletes the old one (before the Binding Update
goes out), so a program watching netlink address events -- the terminal agent,
``twistd lbproxy-terminal`` -- sees each move.

Run inside the terminal namespace::

    python -m lbproxy.testbed.terminal --count 50 --control /tmp/x/term.sock \\
        --router-mac 1=02:00:00:00:01:01 --router-mac 2=... --link 1
"""

from __future__ import annotations

import argparse
import errno
import fcntl
import os
import socket
import struct
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from ipaddress import IPv6Address, IPv6Network
from typing import Any

import attrs
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IDelayedCall

from lbproxy.testbed import addresses, packets, rrmessages
from lbproxy.testbed.control import Message, serve
from lbproxy.testbed.correspondents import Registrations
from lbproxy.testbed.descriptor import PacketReader, packet_socket_reader, tun_reader

ETH_P_IPV6 = 0x86DD
TUNSETIFF = 0x400454CA
IFF_TUN = 0x0001
IFF_NO_PI = 0x1000
RETRANSMIT = (1.0, 2.0, 4.0)  # RFC 6275 §11.8: INITIAL_BINDACK_TIMEOUT doubling
DEFAULT_LIFETIME = 900  # units of 4 s: one hour
IFA_F_NODAD = 0x02


@attrs.define
class Terminal:
    """One emulated mobile node: its home address, where it is, its BU state."""

    index: int
    hoa: bytes
    link: int
    seq: int
    registered: bool = False
    last_status: int | None = None
    moves: int = 0

    def care_of(self, link: int | None = None) -> bytes:
        """The care-of address on ``link`` (default: the current one)."""
        return addresses.care_of_address(self.index, link or self.link).packed

    def describe(self) -> Message:
        return {"terminal": self.index, "hoa": str(IPv6Address(self.hoa)), "link": self.link,
                "coa": str(IPv6Address(self.care_of())), "seq": self.seq,
                "registered": self.registered, "status": self.last_status,
                "moves": self.moves}


class MobileNodes:
    """The pure part of the emulator: rewrites packets, keeps terminal state.

    No sockets and no clock: the program around it moves bytes and timers.
    Acknowledgements read off the wire are queued in ``acks`` for it.
    """

    def __init__(self, count: int, home_agent: bytes, link: int,
                 route_optimized: Sequence[IPv6Network], first_seq: int = 0,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.home_agent = home_agent
        self.route_optimized = list(route_optimized)
        self.clock = clock
        #: The RFC mode's registrations with correspondents (None: every packet to a
        #: route-optimised prefix gets an HAO at once, the bed's default).
        self.correspondents: Registrations | None = None
        self.terminals = {
            i: Terminal(i, addresses.home_address(i).packed, link, first_seq)
            for i in range(1, count + 1)}
        self._by_hoa = {t.hoa: t for t in self.terminals.values()}
        self.acks: list[tuple[Terminal, packets.MobilityMessage]] = []
        self.counters: dict[str, int] = {}

    def _count(self, what: str) -> None:
        self.counters[what] = self.counters.get(what, 0) + 1

    def set_ro_mode(self, mode: str, delay: float = 0.0) -> None:
        """``"rfc"``: route optimisation only after return routability and a Binding
        Update acknowledged by the correspondent (RFC 6275 §11.6, §11.7.2); before that,
        and after each move until the next acknowledgement, packets to it are
        reverse-tunnelled.  ``"always"``: an HAO on every packet to a route-optimised
        prefix (the default).  ``delay``: seconds from a terminal's first packet to a
        correspondent until return routability starts."""
        if mode == "rfc":
            if self.correspondents is None:
                self.correspondents = Registrations(self.home_agent, delay)
            self.correspondents.delay = delay
        elif mode == "always":
            self.correspondents = None
        else:
            raise ValueError(f"unknown route optimisation mode {mode!r} (always, rfc)")

    def describe(self, terminal: Terminal, secrets: bool = False) -> Message:
        """A terminal's state; in the RFC mode with its correspondent registrations."""
        described = terminal.describe()
        if self.correspondents is not None:
            described.update(self.correspondents.describe(terminal, self.clock(), secrets))
        return described

    def outbound(self, packet: bytes) -> tuple[int, bytes] | None:
        """``(link, packet)`` to send for a packet the kernel wrote into the TUN."""
        try:
            if len(packet) < packets.IPV6_HEADER or packet[0] >> 4 != 6:
                raise packets.PacketError("not IPv6")
            terminal = self._by_hoa.get(bytes(packet[8:24]))
            if terminal is None:
                self._count("out-unknown-source")
                return None
            dst = IPv6Address(bytes(packet[24:40]))
            if any(dst in prefix for prefix in self.route_optimized):
                if self.correspondents is not None and not self.correspondents.route(
                        terminal, dst.packed, self.clock()):
                    self._count("out-rr-tunnel")  # no binding at the correspondent yet
                    return terminal.link, packets.encapsulate(packet, terminal.care_of(),
                                                              self.home_agent)
                self._count("out-hao")
                return terminal.link, packets.add_hao(packet, terminal.care_of())
            self._count("out-reverse-tunnel")
            return terminal.link, packets.encapsulate(packet, terminal.care_of(),
                                                      self.home_agent)
        except packets.PacketError:
            self._count("out-malformed")
            return None

    def inbound(self, link: int, packet: bytes) -> bytes | None:
        """The packet to write into the TUN for one received on access link ``link``."""
        try:
            if len(packet) < packets.IPV6_HEADER:
                raise packets.PacketError("short")
            terminal = self._terminal_at(link, bytes(packet[24:40]))
            if terminal is None:
                return None
            rfc = self.correspondents
            src = bytes(packet[8:24])
            stripped = packets.strip_rh2(packet)
            if stripped is not None:
                if rfc is not None and src != self.home_agent:
                    if self._from_correspondent(terminal, packet):
                        return None
                else:
                    message = packets.parse_mobility(packet)
                    if message is not None:
                        self._acknowledged(terminal, message)
                        return None
                hoa, inner = stripped
                if hoa != terminal.hoa:
                    self._count("in-rh2-foreign-hoa")
                    return None
                self._count("in-rh2")
                if rfc is not None:
                    rfc.reply(terminal, src, "rh2", self.clock())
                return inner
            inner_or_none = packets.decapsulate(packet)
            if inner_or_none is not None:
                if src != self.home_agent or inner_or_none[24:40] != terminal.hoa:
                    self._count("in-tunnel-refused")
                    return None
                if rfc is not None:
                    if self._from_correspondent(terminal, inner_or_none):
                        return None  # a Home Test, tunnelled by the home agent
                    rfc.reply(terminal, bytes(inner_or_none[8:24]), "tunnel", self.clock())
                self._count("in-tunnel")
                return inner_or_none
            if rfc is not None and self._from_correspondent(terminal, packet):
                return None  # a Care-of Test or a Binding Error
            self._count("in-other")
            return None
        except packets.PacketError:
            self._count("in-malformed")
            return None

    def _from_correspondent(self, terminal: Terminal, packet: bytes) -> bool:
        """RFC mode: consume a correspondent's Mobility Header message (HoT, CoT, BA, BE);
        False if ``packet`` carries none."""
        message = rrmessages.parse(packet)
        if message is None or self.correspondents is None:
            return False
        self._count("in-" + self.correspondents.received(terminal, message, self.clock()))
        return True

    def _terminal_at(self, link: int, dst: bytes) -> Terminal | None:
        index = addresses.terminal_of(IPv6Address(dst))
        terminal = self.terminals.get(index) if index is not None else None
        if terminal is None or terminal.link != link or terminal.care_of() != dst:
            self._count("in-not-current-coa")
            return None
        return terminal

    def _acknowledged(self, terminal: Terminal, message: packets.MobilityMessage) -> None:
        if message.mh_type != packets.MH_BA or not message.checksum_ok:
            self._count("in-bad-mobility")
            return
        self._count("in-ba")
        terminal.last_status = message.status
        if message.status == packets.BA_ACCEPTED and message.seq == terminal.seq:
            terminal.registered = True
            if self.correspondents is not None:
                self.correspondents.home_registered(terminal)
        elif message.status == packets.BA_SEQ_OUT_OF_WINDOW:
            terminal.seq = message.seq  # RFC 6275 §11.7.1: resend above the HA's number
        self.acks.append((terminal, message))

    def binding_update(self, index: int, link: int | None = None,
                       lifetime: int = DEFAULT_LIFETIME) -> tuple[int, bytes]:
        """Move terminal ``index`` to ``link`` (if given); the BU to send there."""
        terminal = self.terminals[index]
        if link is not None and link != terminal.link:
            terminal.link = link
            terminal.moves += 1
            if self.correspondents is not None:
                self.correspondents.moved(terminal, self.clock())
        terminal.seq = (terminal.seq + 1) & 0xFFFF
        terminal.registered = False
        self._count("out-bu")
        return terminal.link, packets.binding_update(
            terminal.care_of(), self.home_agent, terminal.hoa, terminal.seq, lifetime)


class Emulator:
    """The Twisted program around :class:`MobileNodes`: TUN, access links, control."""

    def __init__(self, reactor: Any, nodes: MobileNodes, tun_fd: int,
                 links: dict[int, tuple[socket.socket, str, bytes]],
                 lifetime: int = DEFAULT_LIFETIME) -> None:
        self.reactor = reactor
        self.nodes = nodes
        self.tun_fd = tun_fd
        self.links = links
        self.lifetime = lifetime
        self._retries: dict[int, IDelayedCall] = {}
        self._waiters: dict[int, list[Deferred[Message]]] = {}
        # RFC mode: per (terminal, correspondent) the next retransmission or refresh, and
        # the pending start of return routability
        self._rr_timers: dict[tuple[int, bytes], IDelayedCall] = {}
        self._rr_starts: dict[tuple[int, bytes], IDelayedCall] = {}
        self._mh_dropped = False
        self.kernel: KernelAddresses | None = None  # set by ``track_addresses``

    def start(self) -> None:
        self.reactor.addReader(PacketReader(self.tun_fd, tun_reader(self.tun_fd),
                                            self.from_tun, "tun"))
        for link, (sock, _, _) in self.links.items():
            self.reactor.addReader(PacketReader(sock.fileno(), packet_socket_reader(sock),
                                                self._from_link(link), f"link{link}"))

    def _send(self, link: int, packet: bytes) -> None:
        sock, ifname, router_mac = self.links[link]
        try:
            sock.sendto(packet, (ifname, ETH_P_IPV6, 0, 0, router_mac))
        except OSError:
            self.nodes._count("out-send-error")

    def from_tun(self, packet: bytes) -> None:
        result = self.nodes.outbound(packet)
        if result is not None:
            self._send(*result)
        if self.nodes.correspondents is not None:
            self._settle()

    # -- RFC mode: return routability and correspondent registration -------------------

    def _settle(self) -> None:
        """Send what the registrations produced and (re)arm their timers."""
        rfc = self.nodes.correspondents
        if rfc is None:
            return
        sends, rfc.to_send = rfc.to_send, []
        for link, packet in sends:
            self._send(link, packet)
        touched, rfc.touched = rfc.touched, set()
        now = self.reactor.seconds()
        for key in touched:
            call = self._rr_timers.pop(key, None)
            if call is not None and call.active():
                call.cancel()
            deadline = rfc.by_key[key].deadline
            if deadline is not None:
                self._rr_timers[key] = self.reactor.callLater(
                    max(0.0, deadline - now), self._rr_timeout, key)
        for key in rfc.wanted:
            pending = self._rr_starts.get(key)
            if pending is None or not pending.active():
                at = rfc.by_key[key].created + rfc.delay
                self._rr_starts[key] = self.reactor.callLater(
                    max(0.0, at - now), self._rr_begin, key)

    def _rr_begin(self, key: tuple[int, bytes]) -> None:
        self._rr_starts.pop(key, None)
        if self.nodes.correspondents is not None:
            self.nodes.correspondents.begin(key, self.reactor.seconds())
            self._settle()

    def _rr_timeout(self, key: tuple[int, bytes]) -> None:
        self._rr_timers.pop(key, None)
        if self.nodes.correspondents is not None:
            self.nodes.correspondents.timeout(key, self.reactor.seconds())
            self._settle()

    def set_ro_mode(self, mode: str, delay: float = 0.0) -> Message:
        """Switch the route optimisation mode (:meth:`MobileNodes.set_ro_mode`).

        The RFC mode also has nftables drop Mobility Headers arriving on the access links
        before the kernel (without MIPv6 it would answer a Care-of Test or a Binding Error
        with a Parameter Problem); the emulator has read them already.
        """
        self.nodes.set_ro_mode(mode, delay)
        if mode == "rfc" and not self._mh_dropped:
            drop = ["nft", "add", "rule", "ip6", "lbtb", "prerouting", "iifname", "acc*",
                    "meta", "l4proto", "mobility-header", "drop"]
            result = subprocess.run(drop, capture_output=True, text=True, check=False)
            if result.returncode != 0:
                return {"ok": False, "error": f"nft: {result.stderr.strip()}"}
            self._mh_dropped = True
        if self.nodes.correspondents is None:
            for call in [*self._rr_timers.values(), *self._rr_starts.values()]:
                if call.active():
                    call.cancel()
            self._rr_timers.clear()
            self._rr_starts.clear()
        return {"ok": True, "mode": mode, "delay": delay}

    def _from_link(self, link: int) -> Callable[[bytes], None]:
        def deliver(packet: bytes) -> None:
            inner = self.nodes.inbound(link, packet)
            if inner is not None:
                try:
                    os.write(self.tun_fd, inner)
                except OSError:
                    self.nodes._count("in-tun-error")
            if self.nodes.acks:
                self._handle_acks()
            if self.nodes.correspondents is not None:
                self._settle()
        return deliver

    def _handle_acks(self) -> None:
        acks, self.nodes.acks = self.nodes.acks, []
        for terminal, message in acks:
            if terminal.registered:
                self._cancel_retry(terminal.index)
                for waiter in self._waiters.pop(terminal.index, []):
                    waiter.callback({"ok": True, **terminal.describe()})
            elif message.status == packets.BA_SEQ_OUT_OF_WINDOW:
                self.register(terminal.index)

    def _cancel_retry(self, index: int) -> None:
        call = self._retries.pop(index, None)
        if call is not None and call.active():
            call.cancel()

    def register(self, index: int, link: int | None = None) -> None:
        """Send a Binding Update (moving first if ``link`` is given), with retransmissions."""
        self._cancel_retry(index)
        terminal = self.nodes.terminals[index]
        if self.kernel is not None and link is not None and link != terminal.link:
            self.kernel.move(terminal.care_of(), terminal.link, terminal.care_of(link), link)
        self._transmit(index, link, 0)
        self._settle()

    def track_addresses(self) -> Message:
        """Keep only each terminal's current care-of address on the kernel's interfaces."""
        if self.kernel is None:
            self.kernel = KernelAddresses()
        for terminal in self.nodes.terminals.values():
            for link in self.links:
                if link == terminal.link:
                    self.kernel.add(terminal.care_of(link), link)
                else:
                    self.kernel.remove(terminal.care_of(link), link)
        return {"ok": True}

    def _transmit(self, index: int, link: int | None, attempt: int) -> None:
        if attempt == 0:
            out_link, bu = self.nodes.binding_update(index, link, self.lifetime)
        else:  # a retransmission repeats the sequence number
            terminal = self.nodes.terminals[index]
            out_link = terminal.link
            bu = packets.binding_update(terminal.care_of(), self.nodes.home_agent,
                                        terminal.hoa, terminal.seq, self.lifetime)
        self._send(out_link, bu)
        if attempt < len(RETRANSMIT):
            self._retries[index] = self.reactor.callLater(
                RETRANSMIT[attempt], self._transmit, index, None, attempt + 1)
        else:
            self._retries[index] = self.reactor.callLater(RETRANSMIT[-1], self._give_up, index)

    def _give_up(self, index: int) -> None:
        self._retries.pop(index, None)
        for waiter in self._waiters.pop(index, []):
            waiter.callback({"ok": False, "error": f"terminal {index}: no Binding "
                             "Acknowledgement", **self.nodes.terminals[index].describe()})

    def control(self, request: Message) -> Message | Deferred[Message]:
        """Answer one control request (see the module docstring)."""
        op = request.get("op")
        if op == "status":
            return {"ok": True, "terminals": [self.nodes.describe(t)
                                              for t in self.nodes.terminals.values()],
                    "counters": dict(self.nodes.counters)}
        if op == "ro_mode":
            return self.set_ro_mode(str(request["mode"]), float(request.get("delay", 0.0)))
        if op == "correspondents":
            index = int(request["terminal"])
            if index not in self.nodes.terminals:
                return {"ok": False, "error": f"no terminal {index}"}
            if self.nodes.correspondents is None:
                return {"ok": False, "error": "not in the RFC route optimisation mode"}
            return {"ok": True, **self.nodes.describe(self.nodes.terminals[index],
                                                      secrets=True)}
        if op == "move":
            index, link = int(request["terminal"]), int(request["link"])
            if index not in self.nodes.terminals or link not in self.links:
                return {"ok": False, "error": f"no terminal {index} or link {link}"}
            self.register(index, link)
            if not request.get("wait", True):
                return {"ok": True, **self.nodes.terminals[index].describe()}
            waiter: Deferred[Message] = Deferred()
            self._waiters.setdefault(index, []).append(waiter)
            return waiter
        if op == "register":
            for index in self.nodes.terminals:
                self.register(index)
            return {"ok": True}
        if op == "track_addresses":
            return self.track_addresses()
        return {"ok": False, "error": f"unknown op {op!r}"}


class KernelAddresses:
    """Adds and deletes care-of addresses on the ``acc<k>`` interfaces (netlink)."""

    def __init__(self) -> None:
        from pyroute2 import IPRoute

        self.ipr = IPRoute()
        self._index: dict[int, int] = {}

    def _ifindex(self, link: int) -> int:
        if link not in self._index:
            self._index[link] = self.ipr.link_lookup(ifname=f"acc{link}")[0]
        return self._index[link]

    def _change(self, command: str, address: bytes, link: int) -> None:
        from pyroute2 import NetlinkError

        try:
            self.ipr.addr(command, index=self._ifindex(link), address=str(IPv6Address(address)),
                          prefixlen=64, flags=IFA_F_NODAD)
        except NetlinkError as exc:
            if exc.code not in (errno.EEXIST, errno.EADDRNOTAVAIL, errno.ENOENT):
                raise

    def add(self, address: bytes, link: int) -> None:
        self._change("add", address, link)

    def remove(self, address: bytes, link: int) -> None:
        self._change("del", address, link)

    def move(self, old: bytes, old_link: int, new: bytes, new_link: int) -> None:
        """The new address first, then the old one goes: never a moment without one."""
        self.add(new, new_link)
        self.remove(old, old_link)


def open_tun(name: str) -> int:
    """Create TUN device ``name`` (IFF_TUN | IFF_NO_PI); its non-blocking fd."""
    fd = os.open("/dev/net/tun", os.O_RDWR | os.O_NONBLOCK)
    fcntl.ioctl(fd, TUNSETIFF, struct.pack("16sH22x", name.encode(), IFF_TUN | IFF_NO_PI))
    return fd


def tun_commands(name: str, count: int, mtu: int, routes: Sequence[str]) -> list[str]:
    """``ip -batch`` lines putting the home addresses and routes on the TUN device."""
    lines = [f"link set {name} addrgenmode none", f"link set {name} mtu {mtu} up"]
    lines += [f"addr add {addresses.home_address(i)}/128 dev {name} nodad"
              for i in range(1, count + 1)]
    lines += [f"route replace {route} dev {name}" for route in routes]
    return lines


def open_link(ifname: str) -> socket.socket:
    """An AF_PACKET datagram socket for IPv6 on ``ifname``."""
    sock = socket.socket(socket.AF_PACKET, socket.SOCK_DGRAM, socket.htons(ETH_P_IPV6))
    sock.bind((ifname, ETH_P_IPV6))
    sock.setblocking(False)
    return sock


def parse_args(argv: Sequence[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="lbproxy.testbed.terminal", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--count", type=int, default=50, help="number of terminals")
    parser.add_argument("--link", type=int, default=1, help="initial access link")
    parser.add_argument("--router-mac", action="append", default=[], metavar="K=MAC",
                        help="access link K (interface accK) and its router's MAC")
    parser.add_argument("--home-agent", default=str(addresses.HOME_AGENT))
    parser.add_argument("--route-optimized", action="append", metavar="PREFIX",
                        help="destinations sent with an HAO (default: the VIP prefix); "
                        "others are reverse-tunnelled to the home agent")
    parser.add_argument("--tun", default="mip0")
    parser.add_argument("--mtu", type=int, default=1400)
    parser.add_argument("--lifetime", type=int, default=DEFAULT_LIFETIME,
                        help="binding lifetime asked for, in units of 4 s")
    parser.add_argument("--control", required=True, help="UNIX socket path")
    parser.add_argument("--no-register", action="store_true",
                        help="do not send the initial Binding Updates")
    parser.add_argument("--ro-mode", choices=("always", "rfc"), default="always",
                        help="always: an HAO on every packet to a route-optimised prefix; "
                        "rfc: tunnel through the home agent until return routability and a "
                        "Binding Update acknowledged by the correspondent (RFC 6275)")
    parser.add_argument("--ro-delay", type=float, default=0.0,
                        help="rfc mode: seconds from first contact to return routability")
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> None:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    from twisted.internet import reactor as _reactor

    reactor: Any = _reactor

    tun_fd = open_tun(args.tun)
    routes = [str(addresses.VIP_PREFIX), "::/0"]
    subprocess.run(["ip", "-batch", "-"], check=True, text=True,
                   input="\n".join(tun_commands(args.tun, args.count, args.mtu, routes)) + "\n")
    links = {}
    for item in args.router_mac:
        key, mac = item.split("=", 1)
        link = int(key)
        links[link] = (open_link(f"acc{link}"), f"acc{link}", bytes.fromhex(mac.replace(":", "")))
    prefixes = [IPv6Network(p) for p in (args.route_optimized or [str(addresses.VIP_PREFIX)])]
    nodes = MobileNodes(args.count, IPv6Address(args.home_agent).packed, args.link, prefixes,
                        clock=reactor.seconds)
    emulator = Emulator(reactor, nodes, tun_fd, links, args.lifetime)
    emulator.start()
    emulator.set_ro_mode(args.ro_mode, args.ro_delay)
    serve(reactor, args.control, emulator.control)
    if not args.no_register:
        for index in nodes.terminals:
            reactor.callWhenRunning(emulator.register, index)
    reactor.run()


if __name__ == "__main__":
    main()
