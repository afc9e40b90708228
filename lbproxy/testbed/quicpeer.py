"""A real QUIC server and client (aioquic) for the test bed: QUIC-LB connection IDs and
a client that moves to a new address in the middle of a transfer.

Why a module of its own: the ``quic`` key strategy (`lbproxy.core.quiclb`) is only
worth something if a real QUIC stack's connection survives a move through the balancer.
The server runs in a backend's namespace and issues connection IDs that carry its
QUIC-LB server ID -- aioquic draws its own connection IDs at random, so
`QuicLbConnection` overrides the two places it does (the first one, in the constructor,
and `_replenish_connection_ids`, the ones it hands out in NEW_CONNECTION_ID frames).
The client opens one stream, reads the server's greeting (``backend b<i>``), sends
chunks of random bytes and checks every echoed byte; after ``--move-after`` chunks it
closes its socket, opens one bound to ``--moved`` (its new address), switches to a
fresh connection ID (`QuicConnection.change_connection_id`, as RFC 9000 section 9.5
asks of a migrating client) and carries on.  The server answers from the new path after
validating it (PATH_CHALLENGE / PATH_RESPONSE).

Both are sans-I/O aioquic (`QuicConnection`) driven by a plain ``select`` loop, so what
goes on the wire is exactly aioquic's.  The server logs JSON lines (``new``, ``path``,
``unknown-cid``: a packet for a connection it does not hold, the sign that the balancer
sent a connection elsewhere); the client prints a JSON report.  Test tooling: aioquic
is in the ``test`` extra only.

    python -m lbproxy.testbed.quicpeer server --name b1 --address 2001:db8:b0::11 \\
        --server-id 0b01 --certificate c.pem --key k.pem --log b1-quic.log
    python -m lbproxy.testbed.quicpeer client --server 2001:db8:5::80 \\
        --address 2001:db8:c1::1 --moved 2001:db8:c1::2 --ca ca.pem
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import select
import socket
import sys
import time
from collections.abc import Callable, Sequence
from typing import Any, TextIO

from aioquic.buffer import Buffer
from aioquic.quic import events
from aioquic.quic.configuration import QuicConfiguration
from aioquic.quic.connection import QuicConnection, QuicConnectionId
from aioquic.quic.packet import QuicPacketType, pull_quic_header

from lbproxy.core.quiclb import QuicLbSettings, encode_cid

__all__ = ["ALPN", "SERVER_NAME", "QuicLbConnection", "main"]

ALPN = "lbproxy-echo"
#: The DNS name in the servers' certificate, which the client checks.
SERVER_NAME = "quic.lbproxy.test"
_SMALLEST_INITIAL = 1200  # RFC 9000 section 14.1


class QuicLbConnection(QuicConnection):
    """A server connection whose every host connection ID comes from `cid_factory`."""

    def __init__(self, *, cid_factory: Callable[[], bytes], **kwargs: Any) -> None:
        self._cid_factory = cid_factory
        super().__init__(**kwargs)
        first = cid_factory()
        self._host_cids[0].cid = first
        self.host_cid = first
        self._local_initial_source_connection_id = first

    def _replenish_connection_ids(self) -> None:
        while len(self._host_cids) < min(8, self._remote_active_connection_id_limit):
            self._host_cids.append(
                QuicConnectionId(
                    cid=self._cid_factory(),
                    sequence_number=self._host_cid_seq,
                    stateless_reset_token=os.urandom(16),
                )
            )
            self._host_cid_seq += 1


def _udp_socket(address: str, port: int) -> socket.socket:
    sock = socket.socket(socket.AF_INET6, socket.SOCK_DGRAM)
    sock.bind((address, port))
    sock.setblocking(False)
    return sock


def _flush(conn: QuicConnection, sock: socket.socket, now: float) -> None:
    for data, addr in conn.datagrams_to_send(now):
        with contextlib.suppress(OSError):  # a full buffer, an unreachable path: resent
            sock.sendto(data, addr)


def _wait(conns: Sequence[QuicConnection], sock: socket.socket, limit: float) -> bool:
    """Wait for `sock` or the connections' next timer (at most `limit` s); readable?"""
    now = time.monotonic()
    timers = [t for t in (c.get_timer() for c in conns) if t is not None]
    timeout = min([limit, *(max(0.0, t - now) for t in timers)])
    return bool(select.select([sock], [], [], timeout)[0])


def _timers(conns: Sequence[QuicConnection], now: float) -> None:
    for conn in conns:
        timer = conn.get_timer()
        if timer is not None and timer <= now:
            conn.handle_timer(now)


# -- the server --------------------------------------------------------------------------


class _Server:
    def __init__(self, args: argparse.Namespace, log: TextIO) -> None:
        sid = bytes.fromhex(args.server_id)
        self.settings = QuicLbSettings(
            config_rotation=args.config_rotation,
            server_id_length=len(sid),
            nonce_length=args.nonce_length,
            server_ids={sid: args.name},
            key=bytes.fromhex(args.lb_key) if args.lb_key else None,
        )
        self.server_id = sid
        self.name = args.name
        self.config = QuicConfiguration(is_client=False, alpn_protocols=[ALPN],
                                        connection_id_length=self.settings.cid_length)  # fmt: skip
        self.config.load_cert_chain(args.certificate, args.key)
        self.sock = _udp_socket(args.address, args.port)
        self.log = log
        self.conns: dict[bytes, QuicLbConnection] = {}
        self.peer: dict[int, Any] = {}
        self.greeted: set[tuple[int, int]] = set()

    def note(self, event: str, **fields: Any) -> None:
        self.log.write(json.dumps({"event": event, "backend": self.name, **fields}) + "\n")
        self.log.flush()

    def cid(self) -> bytes:
        return encode_cid(self.settings, self.server_id)

    def datagram(self, data: bytes, addr: Any, now: float) -> None:
        try:
            header = pull_quic_header(Buffer(data=data), host_cid_length=self.settings.cid_length)
        except ValueError:
            self.note("not-quic", peer=addr[0], length=len(data))
            return
        conn = self.conns.get(header.destination_cid)
        if (conn is None and header.packet_type == QuicPacketType.INITIAL
                and len(data) >= _SMALLEST_INITIAL):  # fmt: skip
            conn = QuicLbConnection(
                configuration=self.config,
                original_destination_connection_id=header.destination_cid,
                cid_factory=self.cid,
            )
            self.conns[header.destination_cid] = self.conns[conn.host_cid] = conn
            self.note("new", peer=addr[0], cid=conn.host_cid.hex())
        if conn is None:
            self.note("unknown-cid", peer=addr[0], dcid=header.destination_cid.hex())
            return
        conn.receive_datagram(data, addr, now)

    def serve(self) -> None:
        self.note("listening")
        while True:
            live = list({id(c): c for c in self.conns.values()}.values())
            if _wait(live, self.sock, 1.0):
                while True:
                    try:
                        data, addr = self.sock.recvfrom(65535)
                    except BlockingIOError:
                        break
                    self.datagram(data, addr[:2], time.monotonic())
            now = time.monotonic()
            _timers(live, now)
            for conn in list({id(c): c for c in self.conns.values()}.values()):
                self.events(conn)
                _flush(conn, self.sock, now)
                paths = conn._network_paths
                if paths and self.peer.get(id(conn)) != paths[0].addr:
                    self.peer[id(conn)] = paths[0].addr
                    self.note("path", peer=paths[0].addr[0], validated=paths[0].is_validated)

    def events(self, conn: QuicLbConnection) -> None:
        while (event := conn.next_event()) is not None:
            if isinstance(event, events.ConnectionIdIssued):
                self.conns[event.connection_id] = conn
            elif isinstance(event, events.ConnectionIdRetired):
                self.conns.pop(event.connection_id, None)
            elif isinstance(event, events.StreamDataReceived):
                stream = (id(conn), event.stream_id)
                if stream not in self.greeted:
                    self.greeted.add(stream)
                    conn.send_stream_data(event.stream_id, f"backend {self.name}\n".encode())
                conn.send_stream_data(event.stream_id, event.data, end_stream=event.end_stream)
            elif isinstance(event, events.ConnectionTerminated):
                for cid in [c for c, v in self.conns.items() if v is conn]:
                    del self.conns[cid]
                self.note("closed", reason=event.reason_phrase)


# -- the client --------------------------------------------------------------------------


def _client(args: argparse.Namespace) -> dict[str, Any]:
    config = QuicConfiguration(is_client=True, alpn_protocols=[ALPN], server_name=SERVER_NAME)
    config.load_verify_locations(args.ca)
    conn = QuicConnection(configuration=config)
    sock = _udp_socket(args.address, 0)
    server = (args.server, args.port)
    report: dict[str, Any] = {"ok": False, "greeting": None, "sent": 0, "echoed": 0,
                              "moved": False, "cids": [], "error": None}  # fmt: skip
    start = time.monotonic()
    conn.connect(server, start)
    chunks = [os.urandom(args.chunk_size) for _ in range(args.chunks)]
    expected = b"".join(chunks)
    received = b""
    stream: int | None = None
    sent = 0
    deadline = start + args.timeout
    while time.monotonic() < deadline:
        if _wait([conn], sock, 0.5):
            while True:
                try:
                    data, addr = sock.recvfrom(65535)
                except BlockingIOError:
                    break
                conn.receive_datagram(data, addr[:2], time.monotonic())
        now = time.monotonic()
        _timers([conn], now)
        while (event := conn.next_event()) is not None:
            if isinstance(event, events.HandshakeCompleted):
                stream = conn.get_next_available_stream_id()
                report["cids"].append(conn._peer_cid.cid.hex())
            elif isinstance(event, events.StreamDataReceived):
                received += event.data
            elif isinstance(event, events.ConnectionTerminated):
                report["error"] = f"connection closed: {event.reason_phrase or event.error_code}"
                return report
        if report["greeting"] is None and b"\n" in received:
            line, _, received = received.partition(b"\n")
            report["greeting"] = line.decode(errors="replace")
        if received and expected[: len(received)] != received:
            report["error"] = f"echo differs at byte {len(received)}"
            return report
        report["echoed"] = len(received) if report["greeting"] is not None else 0
        if stream is not None and sent < len(chunks) and report["echoed"] == sent * args.chunk_size:
            if sent == args.move_after and not report["moved"]:
                sock.close()
                sock = _udp_socket(args.moved, 0)
                conn.change_connection_id()
                report["moved"] = True
                report["cids"].append(conn._peer_cid.cid.hex())
                deadline = time.monotonic() + args.timeout  # the rest of the transfer
            conn.send_stream_data(stream, chunks[sent], end_stream=sent == len(chunks) - 1)
            sent += 1
            report["sent"] = sent * args.chunk_size
        if report["echoed"] == len(expected):
            report["ok"] = True
            conn.close()
            _flush(conn, sock, now)
            return report
        _flush(conn, sock, now)
    report["error"] = (f"transfer not done within {args.timeout} s"
                       + (" after the move" if report["moved"] else ""))  # fmt: skip
    return report


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m lbproxy.testbed.quicpeer")
    sub = parser.add_subparsers(dest="role", required=True)
    srv = sub.add_parser("server")
    srv.add_argument("--name", required=True)
    srv.add_argument("--address", required=True)
    srv.add_argument("--port", type=int, default=443)
    srv.add_argument("--server-id", required=True, help="hex")
    srv.add_argument("--config-rotation", type=int, default=0)
    srv.add_argument("--nonce-length", type=int, default=5)
    srv.add_argument("--lb-key", default="", help="QUIC-LB AES-128 key (hex): encrypted CIDs")
    srv.add_argument("--certificate", required=True)
    srv.add_argument("--key", required=True)
    srv.add_argument("--log", required=True)
    cli = sub.add_parser("client")
    cli.add_argument("--server", required=True)
    cli.add_argument("--port", type=int, default=443)
    cli.add_argument("--address", required=True)
    cli.add_argument("--moved", required=True)
    cli.add_argument("--ca", required=True)
    cli.add_argument("--chunks", type=int, default=16)
    cli.add_argument("--chunk-size", type=int, default=4000)
    cli.add_argument("--move-after", type=int, default=8)
    cli.add_argument("--timeout", type=float, default=8.0)
    args = parser.parse_args(argv)
    if args.role == "server":
        with open(args.log, "a") as log:
            _Server(args, log).serve()
        return 0
    report = _client(args)
    print(json.dumps(report))
    return 0 if report["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
