"""Terminals that come back to their home link, for tests of a terminal at home.

Why a module of its own: the bed's terminals are always away (docs/testbed.md, "Limits"):
the terminal emulator gives every packet from a home address a Home Address Option or a
reverse tunnel.  A mobile node that returns home (RFC 6275 section 11.5.5) stops doing
either: its kernel sends plain packets from its home address on the home link, it
deregisters with its home agent (a Binding Update whose care-of address is the home
address, lifetime 0, from the home link), and it takes its home address back from the
home agent's proxy neighbour discovery.  :class:`HomeLink` does that for chosen terminals
of a running bed, beside the emulators (which it does not change)::

    link = HomeLink(bed).attach()
    link.come_home([1, 2, 3])            # native packets, deregistration, BA awaited
    link.at_home                         # {1, 2, 3}

How the home link is reached.  ``attach`` adds a veth pair between ``term`` (``home``) and
the router ``net`` (``homet``): the terminals' port on the home link, beside the home
agent's.  ``come_home(i)`` then:

* ``term``: a policy rule sends everything from home address i out of ``home`` (table
  ``TABLE``, default route via the router's link-local ``ROUTER_LINK_LOCAL``) -- the
  kernel's own TCP and UDP sockets keep their connections, and no longer go through the
  emulator's TUN device;
* ``net``: a host route and a permanent neighbour entry for home address i on ``homet``
  replace the home agent's interception (the stand-in for the mobile node's unsolicited
  Neighbor Advertisement): replies to the home address reach the terminal directly; and
  in ``ha`` a permanent neighbour entry for it names the router's port (the stand-in for
  the shared segment), so the home agent's answer reaches it too;
* the deregistration Binding Update (``H`` and ``A`` flags, care-of address = home address,
  lifetime 0, sequence number one above the emulator's) leaves by ``home``; the router
  forwards it onto the home agent's link, where a home-agent agent can watch it and the
  Binding Acknowledgement, which ``come_home`` waits for.

The emulator still believes the terminal is where it last moved it; no packet reaches
that care-of address any more.  nftables in ``term`` drops Type 2 Routing Headers arriving
on ``home`` (the Binding Acknowledgement's), which the kernel, without MIPv6, would answer
with Parameter Problem; this module reads them with AF_PACKET first.
"""

from __future__ import annotations

import select
import socket
import time
from collections.abc import Iterable

from lbproxy.testbed import addresses, netns, packets
from lbproxy.testbed.bed import TestBed

__all__ = ["HOME_PORT", "ROUTER_HOME_PORT", "ROUTER_LINK_LOCAL", "TABLE", "HomeLink"]

#: The terminals' interface on the home link (ns ``term``) and the router's (ns ``net``).
HOME_PORT = "home"
ROUTER_HOME_PORT = "homet"
#: Their fixed MAC addresses.
TERMINAL_HOME_MAC = "02:00:00:00:10:04"
ROUTER_HOME_PORT_MAC = "02:00:00:00:10:03"
#: The router's link-local address on ``homet``: the at-home terminals' default gateway.
ROUTER_LINK_LOCAL = "fe80::1"
#: The routing table (ns ``term``) of packets from home addresses at home.
TABLE = 100
ETH_P_IPV6 = 0x86DD

_TERM_RULES = f"""\
table ip6 lbhome {{
  chain prerouting {{
    type filter hook prerouting priority raw; policy accept;
    iifname "{HOME_PORT}" rt type 2 drop
  }}
}}
"""


class HomeLink:
    """Brings terminals of ``bed`` home (see the module docstring)."""

    def __init__(self, bed: TestBed) -> None:
        self.bed = bed
        self.at_home: set[int] = set()
        self.attached = False

    def attach(self) -> HomeLink:
        """Add the terminals' port on the home link (once; it goes with the bed)."""
        if self.attached:
            return self
        bed = self.bed
        netns.ip_batch([
            f"link add {ROUTER_HOME_PORT} address {ROUTER_HOME_PORT_MAC} type veth peer name "
            f"{HOME_PORT} netns {bed.ns('term')} address {TERMINAL_HOME_MAC}",
            f"link set {ROUTER_HOME_PORT} up",
            f"addr add {ROUTER_LINK_LOCAL}/64 dev {ROUTER_HOME_PORT} nodad",
        ], bed.ns("net"))
        netns.ip_batch([
            f"link set {HOME_PORT} up",
            f"neigh replace {ROUTER_LINK_LOCAL} lladdr {ROUTER_HOME_PORT_MAC} dev {HOME_PORT} "
            "nud permanent",
            f"route add default via {ROUTER_LINK_LOCAL} dev {HOME_PORT} table {TABLE}",
        ], bed.ns("term"))
        rules = bed.path("term-home.nft")
        with open(rules, "w") as f:
            f.write(_TERM_RULES)
        # finished checksums on the wire, as on every other veth of the bed
        netns.shell(bed.ns("term"), f"ethtool -K {HOME_PORT} tx off >/dev/null\nnft -f {rules}")
        netns.shell(bed.ns("net"), f"ethtool -K {ROUTER_HOME_PORT} tx off >/dev/null")
        self.attached = True
        return self

    def come_home(self, indices: Iterable[int], deregister: bool = True,
                  timeout: float = 10.0) -> dict[int, int]:
        """Bring terminals ``indices`` home; with ``deregister``, the status of each one's
        Binding Acknowledgement (0: accepted), waited for up to ``timeout`` seconds."""
        self.attach()
        bed = self.bed
        chosen = sorted(set(indices))
        homes = {i: str(addresses.home_address(i)) for i in chosen}
        sequence = {t["terminal"]: t["seq"] for t in bed.terminal_status()}
        ha_mac = bed.mac("net", "home")
        # The home agent reaches the home address on its link (through the router's port).
        netns.ip_batch([f"neigh replace {h} lladdr {ha_mac} dev home nud permanent"
                        for h in homes.values()], bed.ns("ha"))
        netns.run(["ip", "-6", "-n", bed.ns("term"), "-batch", "-"], input="".join(
            f"rule add from {h} lookup {TABLE} pref {TABLE}\n" for h in homes.values()))
        netns.ip_batch([line for h in homes.values() for line in (
            f"route replace {h}/128 dev {ROUTER_HOME_PORT}",
            f"neigh replace {h} lladdr {TERMINAL_HOME_MAC} dev {ROUTER_HOME_PORT} nud permanent",
        )], bed.ns("net"))
        self.at_home.update(chosen)
        if not deregister:
            return {}
        return self._deregister(chosen, sequence, timeout)

    def _deregister(self, indices: list[int], sequence: dict[int, int],
                    timeout: float) -> dict[int, int]:
        """Send each terminal's deregistration from home; the BA statuses by terminal."""
        bed = self.bed
        agent = addresses.HOME_AGENT.packed
        sock = bed.socket("term", socket.AF_PACKET, socket.SOCK_DGRAM, socket.htons(ETH_P_IPV6))
        try:
            sock.bind((HOME_PORT, ETH_P_IPV6))
            router = bytes.fromhex(ROUTER_HOME_PORT_MAC.replace(":", ""))
            waiting: dict[bytes, tuple[int, int]] = {}
            for i in indices:
                home = addresses.home_address(i).packed
                seq = (sequence[i] + 1) & 0xFFFF
                waiting[home] = (i, seq)
                bu = packets.binding_update(home, agent, home, seq, lifetime=0)
                sock.sendto(bu, (HOME_PORT, ETH_P_IPV6, 0, 0, router))
            answers: dict[int, int] = {}
            deadline = time.monotonic() + timeout
            while waiting and time.monotonic() < deadline:
                if not select.select([sock], [], [], 0.1)[0]:
                    continue
                data, meta = sock.recvfrom(65536)
                if meta[2] == socket.PACKET_OUTGOING:
                    continue
                try:
                    message = packets.parse_mobility(data)
                except packets.PacketError:
                    continue
                if message is None or message.mh_type != packets.MH_BA or message.hoa is None:
                    continue
                found = waiting.get(message.hoa)
                if found is not None and found[1] == message.seq and message.checksum_ok:
                    answers[found[0]] = message.status
                    del waiting[message.hoa]
        finally:
            sock.close()
        if waiting:
            missing = sorted(i for i, _ in waiting.values())
            raise TimeoutError(f"no Binding Acknowledgement for terminals {missing}")
        return answers
