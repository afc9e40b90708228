"""The workload: real TCP connections from moving terminals, checked byte for byte.

Run in the terminal namespace while the terminal emulator runs.  For each
terminal it opens TCP connections from the home address to VIP:port, reads
the backend's greeting (which backend, which peer address it saw), sends
data in chunks and checks every echoed byte.  Between chunks the first
connection of each terminal asks the emulator to move the terminal through
the given access links (Binding Update, wait for the Acknowledgement), so
the connections cross care-of address changes mid-stream.

It prints one JSON report on stdout::

    {"summary": {"connections": 50, "ok": 50, "errors": 0, "sticky": 50, ...},
     "terminals": {"1": {"hoa": ..., "backends": ["b2"], "sticky": true,
                         "connections": [{"backend": "b2", "peer": ..., "bytes_sent": ...,
                                          "bytes_ok": ..., "moves": [...], "error": null}]}}}

Threads and blocking sockets on purpose: this is a client of the system
under test, and plain sockets keep it obviously correct.
"""

from __future__ import annotations

import argparse
import json
import random
import socket
import sys
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from lbproxy.testbed import addresses
from lbproxy.testbed.control import Client, ControlError


def parse_indices(text: str) -> list[int]:
    """``"1-3,7"`` -> ``[1, 2, 3, 7]``."""
    result: list[int] = []
    for part in text.split(","):
        if "-" in part:
            low, high = part.split("-", 1)
            result.extend(range(int(low), int(high) + 1))
        elif part:
            result.append(int(part))
    return result


def move_schedule(chunks: int, links: Sequence[int]) -> dict[int, int]:
    """After which chunk (0-based) to move to which link: spread evenly over the stream."""
    return {(j + 1) * chunks // (len(links) + 1) - 1: link for j, link in enumerate(links)
            if (j + 1) * chunks // (len(links) + 1) >= 1}


def _read_exactly(stream: Any, size: int) -> bytes:
    data = stream.read(size)
    return data if data is not None else b""


def run_connection(args: argparse.Namespace, index: int, number: int) -> dict[str, Any]:
    """One connection from terminal ``index``; its record for the report."""
    record: dict[str, Any] = {"connection": number, "backend": None, "peer": None,
                              "bytes_sent": 0, "bytes_ok": 0, "moves": [], "error": None}
    rng = random.Random(args.seed * 1_000_003 + index * 101 + number)
    schedule = move_schedule(args.chunks, args.moves) if number == 0 else {}
    started = time.monotonic()
    sock = socket.socket(socket.AF_INET6, socket.SOCK_STREAM)
    sock.settimeout(args.timeout)
    try:
        sock.bind((str(addresses.home_address(index)), 0))
        sock.connect((args.vip, args.port))
        stream = sock.makefile("rb")
        greeting = stream.readline().decode(errors="replace").split()
        if len(greeting) != 4 or greeting[0] != "backend" or greeting[2] != "peer":
            raise ValueError(f"bad greeting {' '.join(greeting)!r}")
        record["backend"], record["peer"] = greeting[1], greeting[3]
        for chunk in range(args.chunks):
            data = rng.randbytes(args.chunk_size)
            sock.sendall(data)
            record["bytes_sent"] += len(data)
            echo = _read_exactly(stream, len(data))
            if echo != data:
                raise ValueError(f"chunk {chunk}: echo differs ({len(echo)} bytes back)")
            record["bytes_ok"] += len(echo)
            if chunk in schedule:
                record["moves"].append(move(args.control, index, schedule[chunk]))
        sock.shutdown(socket.SHUT_WR)
        if stream.read() != b"":
            raise ValueError("data after the echo")
    except (OSError, ValueError, ControlError) as exc:
        record["error"] = f"{type(exc).__name__}: {exc}"
    finally:
        sock.close()
    record["seconds"] = round(time.monotonic() - started, 3)
    return record


def move(control: str, index: int, link: int) -> dict[str, Any]:
    """Ask the emulator to move terminal ``index`` to ``link``; how it went."""
    started = time.monotonic()
    try:
        with Client(control) as client:
            reply = client.request("move", terminal=index, link=link)
        return {"link": link, "ok": True, "coa": reply["coa"], "seq": reply["seq"],
                "seconds": round(time.monotonic() - started, 3)}
    except (OSError, ControlError) as exc:
        return {"link": link, "ok": False, "error": str(exc)}


def run(args: argparse.Namespace) -> dict[str, Any]:
    """Run every connection concurrently; the report."""
    jobs = [(i, n) for i in args.terminals for n in range(args.connections)]
    with ThreadPoolExecutor(max_workers=max(1, len(jobs))) as pool:
        records = list(pool.map(lambda job: run_connection(args, *job), jobs))
    terminals: dict[str, Any] = {}
    for (index, _), record in zip(jobs, records, strict=True):
        entry = terminals.setdefault(str(index), {
            "hoa": str(addresses.home_address(index)), "connections": []})
        entry["connections"].append(record)
    for entry in terminals.values():
        backends = {c["backend"] for c in entry["connections"] if c["backend"]}
        entry["backends"] = sorted(backends)
        entry["sticky"] = len(backends) == 1
    ok = [r for r in records if r["error"] is None and r["bytes_ok"] == r["bytes_sent"]
          and r["backend"]]
    moves = [m for r in records for m in r["moves"]]
    return {"vip": args.vip, "port": args.port, "terminals": terminals, "summary": {
        "connections": len(records), "ok": len(ok), "errors": len(records) - len(ok),
        "bytes_ok": sum(r["bytes_ok"] for r in records),
        "sticky": sum(1 for e in terminals.values() if e["sticky"]),
        "moves": len(moves), "moves_failed": sum(1 for m in moves if not m["ok"]),
        "backends": {name: sum(1 for r in records if r["backend"] == name)
                     for name in sorted({r["backend"] for r in records if r["backend"]})}}}


def parse_args(argv: Sequence[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="lbproxy.testbed.workload", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--control", required=True, help="the terminal emulator's socket")
    parser.add_argument("--terminals", type=parse_indices, default=parse_indices("1-50"),
                        help="terminal indices, e.g. 1-50 or 1,3,5")
    parser.add_argument("--vip", default=str(addresses.VIP))
    parser.add_argument("--port", type=int, default=addresses.TCP_PORT)
    parser.add_argument("--connections", type=int, default=1, help="per terminal")
    parser.add_argument("--chunks", type=int, default=8)
    parser.add_argument("--chunk-size", type=int, default=4096)
    parser.add_argument("--moves", type=parse_indices, default=[],
                        help="access links to move through, e.g. 2,3,1")
    parser.add_argument("--timeout", type=float, default=20.0, help="per socket operation")
    parser.add_argument("--seed", type=int, default=1)
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> None:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    json.dump(run(args), sys.stdout)
    sys.stdout.write("\n")


if __name__ == "__main__":
    main()
