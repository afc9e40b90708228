"""What the correspondent node (``[correspondent]``, docs/correspondent.md) costs the
general path, and what answering return routability and Binding Updates costs.

Run: ``.venv/bin/python benchmarks/correspondent.py [--before REV] [--rounds N]``.
Prints figures, asserts nothing.  Each comparison runs in alternating rounds in one
process (best and median per packet, and their ratio):

1. `Balancer.inbound` on the usual packet (a terminal's UDP datagram with a Home Address
   Option, its binding live), ``mode = "off"``: this tree against this tree's
   ``lbproxy/core/balancer.py`` without the correspondent's test (its four lines taken
   out of the source), or as of git revision ``--before``, loaded into the same process
   -- the price of the one test the general path gained;
2. the same packets, ``off`` -> ``lenient`` (nothing more to do for them) and ``off`` ->
   ``strict`` (one binding-cache lookup per packet, every terminal registered);
3. the correspondent's own work, per message: a Home Test Init answered, a Binding
   Update verified and acknowledged (two keygen tokens, Kbm, two authenticators),
   a forged one refused (against a Home Test Init as the baseline).

Packets are built once with scapy (tooling, not the data path).
"""

from __future__ import annotations

import argparse
import hashlib
import ipaddress
import sys
from pathlib import Path

from scapy.layers.inet import UDP
from scapy.layers.inet6 import HAO, IPv6, IPv6ExtHdrDestOpt, MIP6MH_HoTI
from twisted.internet.task import Clock

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.abtools import balancer_at, balancer_from, compare
from lbproxy.core.balancer import Balancer
from lbproxy.core.correspondent import Correspondent, keygen_token, sign
from lbproxy.core.keys import KeyChain
from lbproxy.core.selection import Backend, scheduler_from_name
from lbproxy.core.table import StickyTable
from lbproxy.wire import mobility

REPO = Path(__file__).resolve().parent.parent
VIP = "2001:db8:5::80"
BACKENDS = [Backend(f"srv{i}", ipaddress.IPv6Address(f"2001:db8:b0::1{i}")) for i in (1, 2, 3)]
N = 2000


#: The general path's test for the correspondent node (lbproxy/core/balancer.py).
CHECK = """        cn = self.correspondent
        if cn is not None and (view.mh >= 0 or (cn.strict and view.hoa >= 0 and cn.bindings.get(
                bytes(buf[view.hoa : view.hoa + 16])) != bytes(buf[8:24]))):  # fmt: skip
            return self._correspondent(buf, view, cn)
"""


def old_balancer(rev: str) -> type[Balancer]:
    """``Balancer`` as of git revision ``rev``, or ("") this tree's without `CHECK`."""
    if rev:
        return balancer_at(rev)
    source = (REPO / "lbproxy" / "core" / "balancer.py").read_text()
    if source.count(CHECK) != 1:
        raise SystemExit("the correspondent's test is not in lbproxy/core/balancer.py as "
                         "this script knows it: update CHECK")  # fmt: skip
    return balancer_from(source.replace(CHECK, ""), "without the test")


def make(cls: type[Balancer], mode: str = "off") -> Balancer:
    clock = Clock()
    clock.advance(1000)
    balancer = cls(chain=KeyChain.from_names(["hoa", "iid", "spi", "ike", "src"]),
                   table=StickyTable(clock, 300.0, 10 * N),
                   scheduler=scheduler_from_name("maglev"), backends=BACKENDS,
                   virtual_addresses=[ipaddress.IPv6Address(VIP)], clock=clock)  # fmt: skip
    if mode != "off":
        balancer.serve_as_correspondent(Correspondent(clock, strict=mode == "strict",
                                                      max_entries=10 * N))  # fmt: skip
    return balancer


def home(i: int) -> str:
    return f"2001:db8:100::{i + 1:x}"


def care_of(i: int) -> str:
    return f"2001:db8:a2::{i + 1:x}"


def hao_packets() -> list[bytes]:
    return [bytes(IPv6(src=care_of(i), dst=VIP) / IPv6ExtHdrDestOpt(options=[HAO(hoa=home(i))])
                  / UDP(sport=5, dport=80) / (b"x" * 32)) for i in range(N)]  # fmt: skip


def binding_update(cn: Correspondent, i: int, seq: int, forged: bool = False) -> bytes:
    """A Binding Update as mobile node ``i`` sends it after its Tests."""
    hoa, coa = ipaddress.IPv6Address(home(i)).packed, ipaddress.IPv6Address(care_of(i)).packed
    vip = ipaddress.IPv6Address(VIP).packed
    index, nonce = cn.nonces.current()
    kbm = bytes(20) if forged else hashlib.sha1(
        keygen_token(cn.node_key, hoa, nonce, False)
        + keygen_token(cn.node_key, coa, nonce, True)).digest()
    bu = mobility.BindingUpdate(seq, 100, mobility.BU_ACK, None,
                                (mobility.nonce_indices_option(index, index),))  # fmt: skip
    payload = bytes((135, 2, 1, 2, 0, 0, 0xC9, 16)) + hoa + sign(bu, kbm, coa, vip, hoa, vip)
    return bytes(IPv6(src=care_of(i), dst=VIP, nh=60, plen=len(payload)))[:40] + payload


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--before", default="", help="a git revision to compare with "
                        "(default: this tree without the correspondent's test)")
    parser.add_argument("--rounds", type=int, default=15)
    args = parser.parse_args()
    print(f"{'':<60} before: best / median  ->  after: best / median")
    packets = hao_packets()

    # 1 and 2: the usual packet, bindings live (and, for strict, every terminal
    # registered at its care-of address).
    old = make(old_balancer(args.before))
    off, lenient, strict = make(Balancer), make(Balancer, "lenient"), make(Balancer, "strict")
    assert strict.correspondent is not None
    for i in range(N):
        strict.correspondent.register(ipaddress.IPv6Address(home(i)).packed,
                                      ipaddress.IPv6Address(care_of(i)).packed, 1, 400.0)
    for b in (old, off, lenient, strict):
        for buf in packets:
            assert b.inbound(bytearray(buf)) is not None
    compare(f"inbound, HAO packet, off ({args.before or 'without the test'} -> this tree)",
            lambda p: old.inbound(bytearray(p)), lambda p: off.inbound(bytearray(p)),
            packets, args.rounds)  # fmt: skip
    compare("inbound, HAO packet: off -> lenient", lambda p: off.inbound(bytearray(p)),
            lambda p: lenient.inbound(bytearray(p)), packets, args.rounds)
    compare("inbound, HAO packet: off -> strict (registered)",
            lambda p: off.inbound(bytearray(p)), lambda p: strict.inbound(bytearray(p)),
            packets, args.rounds)  # fmt: skip

    # 3: the correspondent's own work.
    node = make(Balancer, "lenient")
    cn = node.correspondent
    assert cn is not None
    hotis = [bytes(IPv6(src=home(i), dst=VIP) / MIP6MH_HoTI(cookie=b"c" * 8)) for i in range(N)]
    # Each round's Binding Updates are newer than the last round's: every one accepted.
    rounds_of_updates = [[binding_update(cn, i, n + 1) for i in range(N)]
                         for n in range(args.rounds)]  # fmt: skip
    compare("HoTI answered -> BU verified and acknowledged",
            lambda p: node.inbound(bytearray(p)), lambda p: node.inbound(bytearray(p)),
            hotis, args.rounds, after_items=lambda n: rounds_of_updates[n])  # fmt: skip
    forged = [binding_update(cn, i, 1, forged=True) for i in range(N)]
    compare("HoTI answered -> forged BU refused", lambda p: node.inbound(bytearray(p)),
            lambda p: node.inbound(bytearray(p)), hotis, args.rounds,
            after_items=lambda n: forged)  # fmt: skip
    print(f"accepted: {node.counters.correspondent['bu-accepted']}, refused: "
          f"{node.counters.dropped['bu-bad-authenticator']}")


if __name__ == "__main__":
    main()
