"""The home agent emulator: binding cache, Binding Acknowledgements, tunnelling.

Theory of operation.  The router's neighbour table sends every home address
to this namespace's MAC on the home link, so packets for away terminals
arrive here; an AF_PACKET reader on that link takes them, and nftables
drops them before the kernel (which has no MIPv6) answers or forwards them.

* A Binding Update (RFC 6275 §10.3.1) to the home agent's address, with a
  Home Address Option, updates the binding cache (sequence numbers compared
  modulo 2**16, §9.5.1) and is answered by a Binding Acknowledgement sent to
  the care-of address with a Type 2 Routing Header (§6.1.8).
* A packet to a home address with a valid binding is tunnelled IPv6-in-IPv6
  from the home agent to the care-of address (§10.4.1).
* An IPv6-in-IPv6 packet from a bound care-of address is a reverse-tunnelled
  packet: its inner packet is sent on (§10.4.5).

Both BU and BA cross the home link (interface ``home`` in the ``ha``
namespace), so a later home-agent agent can observe them there with its own
AF_PACKET socket; binding changes are also logged as JSON lines (``--log``)
and readable through the control socket (``bindings``).
"""

from __future__ import annotations

import argparse
import json
import socket
import sys
import time
from collections.abc import Callable, Sequence
from ipaddress import IPv6Address, IPv6Network
from typing import IO, Any

import attrs

from lbproxy.testbed import addresses, packets
from lbproxy.testbed.control import Message, serve
from lbproxy.testbed.descriptor import PacketReader, packet_socket_reader

ETH_P_IPV6 = 0x86DD
MAX_LIFETIME = 900  # units of 4 s


@attrs.define
class BindingEntry:
    """One binding cache entry (RFC 6275 §9.1)."""

    hoa: bytes
    care_of: bytes
    seq: int
    lifetime: int  # units of 4 s, as granted
    expires: float

    def describe(self, now: float) -> Message:
        return {"hoa": str(IPv6Address(self.hoa)), "coa": str(IPv6Address(self.care_of)),
                "seq": self.seq, "lifetime": self.lifetime,
                "remaining": max(0.0, round(self.expires - now, 1))}


class HomeAgent:
    """The pure part of the home agent: the binding cache and what to send.

    :meth:`receive` takes one packet from the home link and returns the
    packets to send, each with the destination to hand to the raw socket.
    Events (bindings made, refused, removed) are queued in ``events``.
    """

    def __init__(self, address: bytes, prefix: IPv6Network, clock: Callable[[], float],
                 max_lifetime: int = MAX_LIFETIME) -> None:
        self.address = address
        self.prefix = prefix
        self.clock = clock
        self.max_lifetime = max_lifetime
        self.cache: dict[bytes, BindingEntry] = {}
        self.events: list[Message] = []
        self.counters: dict[str, int] = {}

    def _count(self, what: str) -> None:
        self.counters[what] = self.counters.get(what, 0) + 1

    def binding(self, hoa: bytes) -> BindingEntry | None:
        """The live binding for ``hoa`` (expired ones are removed on the way)."""
        entry = self.cache.get(hoa)
        if entry is not None and entry.expires <= self.clock():
            del self.cache[hoa]
            self.events.append({"event": "expired", "hoa": str(IPv6Address(hoa))})
            return None
        return entry

    def receive(self, packet: bytes) -> list[tuple[bytes, bytes]]:
        """``[(destination, packet), ...]`` to send in answer to one received packet."""
        try:
            if len(packet) < packets.IPV6_HEADER or packet[0] >> 4 != 6:
                return []
            dst = bytes(packet[24:40])
            if dst == self.address:
                return self._to_me(packet)
            if IPv6Address(dst) in self.prefix:
                return self._intercepted(dst, packet)
        except packets.PacketError:
            self._count("malformed")
        return []

    def _intercepted(self, hoa: bytes, packet: bytes) -> list[tuple[bytes, bytes]]:
        entry = self.binding(hoa)
        if entry is None:
            self._count("no-binding")
            return []
        self._count("tunnelled")
        return [(entry.care_of, packets.encapsulate(packet, self.address, entry.care_of))]

    def _to_me(self, packet: bytes) -> list[tuple[bytes, bytes]]:
        message = packets.parse_mobility(packet)
        if message is not None:
            return self._binding_update(message)
        inner = packets.decapsulate(packet)
        if inner is None:
            return []  # ordinary traffic for the home agent: the kernel has it
        entry = self.binding(bytes(inner[8:24]))
        if entry is None or entry.care_of != bytes(packet[8:24]):
            self._count("reverse-tunnel-refused")
            return []
        self._count("reverse-tunnelled")
        return [(bytes(inner[24:40]), inner)]

    def _binding_update(self, bu: packets.MobilityMessage) -> list[tuple[bytes, bytes]]:
        if bu.mh_type != packets.MH_BU or not bu.checksum_ok or bu.hoa is None:
            self._count("bad-mobility")  # RFC 6275 §9.2: silently discarded
            return []
        self._count("bu")
        hoa, care_of = bu.hoa, bu.src
        existing = self.binding(hoa)
        status, seq, lifetime = packets.BA_ACCEPTED, bu.seq, min(bu.lifetime, self.max_lifetime)
        if not bu.flags & packets.BU_FLAG_H:
            status, lifetime = packets.BA_REASON_UNSPECIFIED, 0
        elif IPv6Address(hoa) not in self.prefix:
            status, lifetime = packets.BA_NOT_HOME_SUBNET, 0
        elif existing is not None and not packets.seq_newer(bu.seq, existing.seq):
            status, seq, lifetime = packets.BA_SEQ_OUT_OF_WINDOW, existing.seq, 0
        elif lifetime == 0 or care_of == hoa:
            self.cache.pop(hoa, None)
            self.events.append({"event": "deregistered", "hoa": str(IPv6Address(hoa)),
                                "seq": bu.seq})
            lifetime = 0
        else:
            self.cache[hoa] = BindingEntry(hoa, care_of, bu.seq, lifetime,
                                           self.clock() + 4 * lifetime)
            self.events.append({"event": "bound", "hoa": str(IPv6Address(hoa)),
                                "coa": str(IPv6Address(care_of)), "seq": bu.seq,
                                "lifetime": lifetime,
                                "previous": str(IPv6Address(existing.care_of))
                                if existing is not None else None})
        if status != packets.BA_ACCEPTED:
            self._count(f"refused-{status}")
            self.events.append({"event": "refused", "hoa": str(IPv6Address(hoa)),
                                "seq": bu.seq, "status": status})
        elif not bu.flags & packets.BU_FLAG_A:
            return []
        ack = packets.binding_ack(self.address, care_of, hoa, status, seq, lifetime)
        return [(care_of, ack)]

    def describe(self) -> list[Message]:
        now = self.clock()
        return [entry.describe(now) for hoa in list(self.cache)
                if (entry := self.binding(hoa)) is not None]


class HomeAgentProgram:
    """The Twisted program around :class:`HomeAgent`: home link reader, raw socket."""

    def __init__(self, reactor: Any, agent: HomeAgent, link: socket.socket,
                 raw: socket.socket, log: IO[str] | None) -> None:
        self.reactor = reactor
        self.agent = agent
        self.link = link
        self.raw = raw
        self.log = log

    def start(self) -> None:
        self.reactor.addReader(PacketReader(self.link.fileno(), packet_socket_reader(self.link),
                                            self.received, "home"))

    def received(self, packet: bytes) -> None:
        for destination, out in self.agent.receive(packet):
            try:
                self.raw.sendto(out, (str(IPv6Address(destination)), 0))
            except OSError:
                self.agent._count("send-error")
        if self.agent.events:
            events, self.agent.events = self.agent.events, []
            if self.log is not None:
                for event in events:
                    self.log.write(json.dumps({"t": time.time(), **event}) + "\n")
                self.log.flush()

    def control(self, request: Message) -> Message:
        op = request.get("op")
        if op == "bindings":
            return {"ok": True, "bindings": self.agent.describe(),
                    "counters": dict(self.agent.counters)}
        return {"ok": False, "error": f"unknown op {op!r}"}


def parse_args(argv: Sequence[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="lbproxy.testbed.homeagent", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--address", default=str(addresses.HOME_AGENT))
    parser.add_argument("--prefix", default=str(addresses.HOME_PREFIX))
    parser.add_argument("--iface", default="home")
    parser.add_argument("--max-lifetime", type=int, default=MAX_LIFETIME)
    parser.add_argument("--control", required=True, help="UNIX socket path")
    parser.add_argument("--log", help="append binding events here as JSON lines")
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> None:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    from twisted.internet import reactor as _reactor

    reactor: Any = _reactor

    link = socket.socket(socket.AF_PACKET, socket.SOCK_DGRAM, socket.htons(ETH_P_IPV6))
    link.bind((args.iface, ETH_P_IPV6))
    link.setblocking(False)
    raw = socket.socket(socket.AF_INET6, socket.SOCK_RAW, socket.IPPROTO_RAW)
    agent = HomeAgent(IPv6Address(args.address).packed, IPv6Network(args.prefix),
                      reactor.seconds, args.max_lifetime)
    log = open(args.log, "a") if args.log else None  # noqa: SIM115 - lives as long as the program
    program = HomeAgentProgram(reactor, agent, link, raw, log)
    program.start()
    serve(reactor, args.control, program.control)
    reactor.run()


if __name__ == "__main__":
    main()
