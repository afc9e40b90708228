"""A backend's real Linux servers: a greeting TCP echo server and a UDP echo server.

Each TCP connection is greeted with ``backend <name> peer <peer-address>\\n``
and then everything it sends is echoed.  Each UDP datagram is answered with
``<name> `` + the datagram.  So a client learns which backend served it and
which source address that backend saw (the home address in translate mode).

Every accepted peer is logged as a JSON line (``--log``), which the bed reads
back to tell which backend served which flow::

    {"t": ..., "backend": "b1", "event": "accept", "proto": "tcp",
     "peer": "2001:db8:100::1001", "peer_port": 40000, "port": 80}

Events: ``listening``, ``accept`` and ``close`` (with ``bytes`` echoed) for
TCP, ``datagram`` for UDP.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Sequence
from typing import IO, Any

from twisted.internet.address import IPv6Address as TwistedIPv6Address
from twisted.internet.protocol import DatagramProtocol, Protocol, ServerFactory
from twisted.python.failure import Failure

from lbproxy.testbed import addresses


class EventLog:
    """Appends one JSON object per line and flushes, so readers never see half a line."""

    def __init__(self, name: str, stream: IO[str]) -> None:
        self.name = name
        self.stream = stream

    def write(self, event: str, **fields: Any) -> None:
        record = {"t": time.time(), "backend": self.name, "event": event, **fields}
        self.stream.write(json.dumps(record) + "\n")
        self.stream.flush()


def _host_port(address: object) -> tuple[str, int]:
    if isinstance(address, TwistedIPv6Address):
        return address.host, address.port
    return str(address), 0


class Greeter(Protocol):
    """Greets with the backend's name and the peer's address, then echoes."""

    def __init__(self, log: EventLog, port: int) -> None:
        self.log = log
        self.port = port
        self.echoed = 0
        self.peer = ("", 0)

    def connectionMade(self) -> None:
        assert self.transport is not None
        self.peer = _host_port(self.transport.getPeer())
        self.log.write("accept", proto="tcp", peer=self.peer[0], peer_port=self.peer[1],
                       port=self.port)
        self.transport.write(f"backend {self.log.name} peer {self.peer[0]}\n".encode())

    def dataReceived(self, data: bytes) -> None:
        assert self.transport is not None
        self.echoed += len(data)
        self.transport.write(data)

    def connectionLost(self, reason: Failure = Failure(ConnectionError())) -> None:  # noqa: B008
        self.log.write("close", proto="tcp", peer=self.peer[0], peer_port=self.peer[1],
                       port=self.port, bytes=self.echoed,
                       reason=reason.type.__name__ if reason.type else "")


class GreeterFactory(ServerFactory):
    """One :class:`Greeter` per connection."""

    def __init__(self, log: EventLog, port: int) -> None:
        self.log = log
        self.port = port

    def buildProtocol(self, addr: object) -> Greeter:
        return Greeter(self.log, self.port)


class UDPEcho(DatagramProtocol):
    """Answers each datagram with ``<name> `` + the datagram."""

    def __init__(self, log: EventLog, port: int) -> None:
        self.log = log
        self.port = port

    def datagramReceived(self, datagram: bytes, addr: Any) -> None:
        assert self.transport is not None
        self.log.write("datagram", proto="udp", peer=addr[0], peer_port=addr[1],
                       port=self.port, bytes=len(datagram))
        self.transport.write(self.log.name.encode() + b" " + datagram, addr)


def parse_args(argv: Sequence[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="lbproxy.testbed.server", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--name", required=True, help="backend name used in greetings")
    parser.add_argument("--tcp-port", type=int, action="append",
                        help=f"TCP port(s) (default {addresses.TCP_PORT})")
    parser.add_argument("--udp-port", type=int, action="append",
                        help=f"UDP port(s) (default {addresses.UDP_PORT})")
    parser.add_argument("--log", help="JSON-lines event log (default: stdout)")
    parser.add_argument("--interface", default="::")
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> None:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    from twisted.internet import reactor as _reactor

    reactor: Any = _reactor

    stream = open(args.log, "a") if args.log else sys.stdout  # noqa: SIM115
    log = EventLog(args.name, stream)
    tcp_ports = args.tcp_port or [addresses.TCP_PORT]
    udp_ports = args.udp_port or [addresses.UDP_PORT]
    for port in tcp_ports:
        reactor.listenTCP(port, GreeterFactory(log, port), interface=args.interface)
    for port in udp_ports:
        reactor.listenUDP(port, UDPEcho(log, port), interface=args.interface)
    log.write("listening", tcp=tcp_ports, udp=udp_ports)
    reactor.run()


if __name__ == "__main__":
    main()
