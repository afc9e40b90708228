"""``make demo``: moving terminals through a real balancer, in network namespaces.

It builds the network test bed (docs/testbed.md: an access router with three care-of
prefixes, a home agent, the balancer, three backends running Linux TCP servers), starts
``twistd -n lbproxy`` in the balancer's namespace, and runs terminals whose TCP sessions
move between care-of addresses mid-connection:

1. first keyed on the source address only, as IPVS, nginx ``ip_hash`` or HAProxy
   ``stick on src`` would: a moved terminal lands on another backend and its session
   breaks;
2. then with lbproxy's key chain (home address first): every terminal stays on its
   backend, every byte arrives.

It prints the sticky table, which backend served each terminal, and the counters, and
ends by drawing one terminal's journey (``lbproxyctl journey``: an SVG picture and a
pcap-ng capture, whose paths it prints), then tears everything down.  It needs root
(network namespaces); without it it says so and exits non-zero.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
from collections.abc import Sequence
from typing import Any

from lbproxy.ops.control import format_rows
from lbproxy.testbed import addresses
from lbproxy.testbed.balancer import BedBalancer, bed_config
from lbproxy.testbed.bed import TestBed
from lbproxy.testbed.netns import BedUnavailableError, check_host

__all__ = ["main"]


def _backends_by_terminal(rows: list[dict[str, Any]]) -> dict[int, set[str]]:
    """Which backends the table sent each terminal to (by its home or care-of address)."""
    found: dict[int, set[str]] = {}
    for row in rows:
        index = addresses.terminal_of(row["key"].split()[1])
        if index is not None:
            found.setdefault(index, set()).add(row["backend"])
    return found


def _print_terminals(report: dict[str, Any], served: dict[int, set[str]]) -> None:
    print(f"  {'terminal (home address)':<22} {'care-of addresses during the session':<62} "
          "backends  session")
    for index in sorted(report["terminals"], key=int):
        terminal = report["terminals"][index]
        for conn in terminal["connections"]:
            coas = [str(addresses.care_of_address(int(index), 1))] + [
                m["coa"] if m.get("ok") else f"link {m['link']} FAILED" for m in conn["moves"]
            ]
            result = "intact" if conn["error"] is None else conn["error"]
            backends = ",".join(sorted(served.get(int(index), ()))) or "-"
            print(f"  {terminal['hoa']:<22} {' -> '.join(coas):<62} {backends:<9} {result}")


def _journey(balancer: BedBalancer, index: int, directory: str) -> None:
    """Draw terminal `index`'s journey with ``lbproxyctl journey`` (docs/journey.md) and
    print where the picture and the capture are."""
    hoa = addresses.home_address(index)
    pcap = os.path.join(directory, f"journey-terminal-{index}.pcapng")
    svg = os.path.join(directory, f"journey-terminal-{index}.svg")
    result = subprocess.run(
        [sys.executable, "-m", "lbproxy.ops.ctl", "--socket", balancer.control_socket,
         "journey", "addr", str(hoa), "--pcap", pcap, "--svg", svg],
        capture_output=True, text=True, timeout=30, check=False)
    if result.returncode != 0:
        print(f"\n  journey of terminal {index}: {result.stderr.strip()}")
        return
    print(f"\n  terminal {index}'s journey (lbproxyctl journey addr {hoa}):")
    for line in result.stdout.splitlines():
        if not line.startswith("wrote "):
            print("   ", line)
    print(f"  journey picture: {svg}")
    print(f"  journey capture (Wireshark): {pcap}")


def _run(bed: TestBed, title: str, key_chain: Sequence[str], moves: Sequence[int],
         journey_dir: str | None = None) -> bool:
    print(f"\n=== {title}: key chain {list(key_chain)} ===")
    balancer = BedBalancer(bed, bed_config(bed, key_chain=key_chain), name="lbproxy-demo")
    balancer.start()
    try:
        report = bed.workload(moves=moves, chunks=9, timeout=180,
                              extra=("--timeout", "5"))
        table = balancer.ctl("show")
        served = _backends_by_terminal(table["rows"])
        _print_terminals(report, served)
        print("\n  sticky table (lbproxyctl show):")
        for line in format_rows(table["rows"], table["total"]).splitlines():
            print("   ", line)
        stats = balancer.ctl("stats")
        print(f"\n  packets in {stats['packets_in']}, out {stats['packets_out']}, "
              f"replies {stats['replies_out']}, hits {stats['hits']}, "
              f"misses {stats['misses']}, dropped {stats['dropped'] or 0}")
        summary = report["summary"]
        one = sum(1 for i in report["terminals"] if len(served.get(int(i), ())) == 1)
        print(f"  => {summary['ok']}/{summary['connections']} sessions intact, "
              f"{one}/{len(report['terminals'])} terminals kept on one backend")
        if journey_dir is not None:  # the demo ends by drawing one terminal's journey
            _journey(balancer, 1, journey_dir)
        return one == len(report["terminals"]) and summary["errors"] == 0
    finally:
        balancer.stop()
        os.unlink(balancer.config_path)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="lbproxy.demo", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--terminals", type=int, default=6)
    parser.add_argument("--no-baseline", action="store_true",
                        help="skip the address-keyed run")
    parser.add_argument("--journey-dir", default=None,
                        help="where to write terminal 1's journey (SVG and pcap-ng); "
                             "default: a new directory under the system's temporary one")
    args = parser.parse_args(argv)
    try:
        check_host()
    except BedUnavailableError as e:
        print(f"lbproxy demo: {e}; run it as root (e.g. sudo make demo)", file=sys.stderr)
        return 1
    print(f"Building the test bed: {args.terminals} terminals, 3 access links, a home agent, "
          "the balancer, 3 backends ...")
    with TestBed(terminals=args.terminals, backends=3) as bed:
        print(f"  namespaces: {', '.join(bed.namespaces())}")
        print("  every terminal opens a TCP session from its home address to "
              "[2001:db8:5::80]:80 and moves a1 -> a2 -> a3 during it")
        if not args.no_baseline:
            _run(bed, "Baseline: keyed on the source (care-of) address, like IPVS",
                 ["src"], [2, 3])
            for i in range(1, args.terminals + 1):
                bed.move(i, 1)
        journey_dir = args.journey_dir or tempfile.mkdtemp(prefix="lbproxy-demo-")
        os.makedirs(journey_dir, exist_ok=True)
        ok = _run(bed, "lbproxy: keyed on the home address", ["hoa", "iid", "spi", "src"],
                  [2, 3], journey_dir)
    print("\nTest bed removed.")
    if ok:
        print("Every terminal stayed on its backend while it moved.")
        return 0
    print("FAILED: a terminal changed backend or lost data with lbproxy's key chain.")
    return 1


if __name__ == "__main__":
    sys.exit(main())
