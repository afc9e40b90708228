"""What the ``quic`` key strategy costs per packet, and what it costs packets of chains
without it.

Run: ``.venv/bin/python benchmarks/quiclb.py [--before REV] [--rounds N]``.  Prints
figures, asserts nothing.  Three comparisons, each in alternating rounds in one process
(best and median per packet, and their ratio):

1. the decision (`Balancer.backend_for`) for a packet whose identities are all linked,
   default chain, this tree against ``lbproxy/core/balancer.py`` as of ``--before``
   (default: the commit before the strategy), loaded from git into the same process --
   the price chains without ``quic`` pay for the named-key rule (one test);
2. ``QuicLbStrategy.key_for`` on a 1-RTT packet against ``SourceAddressStrategy.key_for``
   (the cheapest strategy), encrypted against unencrypted connection IDs (8 octets: three
   AES passes), and on a non-QUIC packet (stops at the port test);
3. the decision for a moved QUIC client's packet with ``["quic", "src"]`` (the server ID
   names the backend, the address is already linked) against ``["src"]`` (a hit).

Packets are built once with scapy (tooling, not the data path).
"""

from __future__ import annotations

import argparse
import functools
import ipaddress
import sys
from collections.abc import Sequence
from pathlib import Path

import attrs
from scapy.layers.inet import UDP
from scapy.layers.inet6 import HAO, IPv6, IPv6ExtHdrDestOpt
from twisted.internet.task import Clock

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks import abtools
from benchmarks.abtools import balancer_at
from lbproxy.core.balancer import Balancer
from lbproxy.core.keys import KeyChain, SourceAddressStrategy
from lbproxy.core.quiclb import QuicLbSettings, QuicLbStrategy, encode_cid
from lbproxy.core.selection import Backend, scheduler_from_name
from lbproxy.core.table import StickyTable
from lbproxy.wire.view import parse

VIP = "2001:db8:5::80"
BACKENDS = [Backend(f"srv{i}", ipaddress.IPv6Address(f"2001:db8:b0::1{i}")) for i in (1, 2, 3)]
SETTINGS = QuicLbSettings(server_ids={bytes((0x0B, i)): f"srv{i}" for i in (1, 2, 3)})
N = 2000
#: The comparison, with this script's label column.
compare = functools.partial(abtools.compare, width=58)


def make(cls: type[Balancer], chain: Sequence[str]) -> Balancer:
    clock = Clock()
    options = {"quic": SETTINGS} if "quic" in chain else {}
    return cls(chain=KeyChain.from_names(chain, **options), table=StickyTable(clock, 300.0, 10 * N),
               scheduler=scheduler_from_name("maglev"), backends=BACKENDS,
               virtual_addresses=[ipaddress.IPv6Address(VIP)], clock=clock)  # fmt: skip


def hao_packets() -> list[bytearray]:
    return [bytearray(bytes(IPv6(src=f"2001:db8:a2::{i + 1:x}", dst=VIP)
                            / IPv6ExtHdrDestOpt(options=[HAO(hoa=f"2001:db8:100::{i + 1:x}")])
                            / UDP(sport=5, dport=80) / (b"x" * 32))) for i in range(N)]  # fmt: skip


def quic_packets(dport: int = 443, settings: QuicLbSettings = SETTINGS) -> list[bytearray]:
    return [bytearray(bytes(IPv6(src=f"2001:db8:c1::{i + 1:x}", dst=VIP) / UDP(sport=5, dport=dport)
                            / (b"\x41" + encode_cid(settings, bytes((0x0B, i % 3 + 1)))
                               + b"\0" * 40))) for i in range(N)]  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--before", default="50ebf04^", help="the tree before the strategy")
    parser.add_argument("--rounds", type=int, default=15)
    args = parser.parse_args()
    print(f"{'':<58} before: best / median  ->  after: best / median")

    # 1. Chains without quic: this tree against the one before.
    hao = hao_packets()
    chain = ["hoa", "iid", "spi", "ike", "src"]
    old, new = make(balancer_at(args.before), chain), make(Balancer, chain)
    for b in (old, new):
        for buf in hao:
            b.inbound(bytearray(buf))
    views = [(buf, parse(buf)) for buf in hao]
    compare(f"backend_for, default chain, linked HAO ({args.before} -> this tree)",
            lambda bv: old.backend_for(*bv), lambda bv: new.backend_for(*bv), views, args.rounds)

    # 2. The strategy alone.
    quic, src = QuicLbStrategy(SETTINGS), SourceAddressStrategy()
    views = [(buf, parse(buf)) for buf in quic_packets()]
    compare("key_for on a 1-RTT packet: src -> quic", lambda bv: src.key_for(*bv),
            lambda bv: quic.key_for(*bv), views, args.rounds)
    encrypted = attrs.evolve(SETTINGS, key=bytes(range(16)))
    secret = QuicLbStrategy(encrypted)
    sealed = [(buf, parse(buf)) for buf in quic_packets(settings=encrypted)]
    compare("key_for on a 1-RTT packet: quic -> quic encrypted (3 AES)",
            lambda bv: quic.key_for(*bv), lambda bv: secret.key_for(*bv), views, args.rounds,
            after_items=lambda n: sealed)
    other = [(buf, parse(buf)) for buf in quic_packets(dport=80)]
    compare("key_for on a UDP packet to port 80: src -> quic", lambda bv: src.key_for(*bv),
            lambda bv: quic.key_for(*bv), other, args.rounds)

    # 3. A moved QUIC client's packets, linked: ["src"] (a hit) -> ["quic", "src"].
    by_src, by_quic = make(Balancer, ["src"]), make(Balancer, ["quic", "src"])
    for b in (by_src, by_quic):
        for buf in quic_packets():
            b.inbound(bytearray(buf))
    compare('backend_for, moved QUIC client: ["src"] -> ["quic", "src"]',
            lambda bv: by_src.backend_for(*bv), lambda bv: by_quic.backend_for(*bv), views,
            args.rounds)


if __name__ == "__main__":
    main()
