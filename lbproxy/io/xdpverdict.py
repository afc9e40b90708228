"""Whether the XDP program would forward a packet itself, and why not: its decision in Python.

Why: ``lbproxyctl trace`` tells an operator what the balancer would do with a packet; with
the XDP executor the first question is whether the packet stays in the driver at all or
goes up to the raw-socket path (docs/xdp.md, "What it takes, and what goes up").  Running
the program on the packet (``BPF_PROG_TEST_RUN``) would answer, but it would also stamp
the binding's last-seen time and count the packet: a trace changes nothing.  So the
program's tests are repeated here, in its order, on what its maps hold (`ProgramView`),
and the first that fails is the reason.  ``tests/test_xdp.py`` holds this function to the
program: the same packets through both, ``XDP_TX`` exactly where this says offloaded.

Pure: no I/O.  `lbproxy.io.xdp.XdpOffload.view` reads the maps (one lookup per question);
the tests give dictionaries.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Callable

import attrs

__all__ = ["INBOUND", "REPLIES", "Decision", "ProgramView", "decide"]

# lb_config.flags and the map entries' flags (lbproxy.bpf.c)
INBOUND, REPLIES, PORTS = 1, 2, 8
_USABLE, _CONFIGURED, _NEXT_HOP = 1, 2, 4
_HAS_CARE_OF = 1

_DSTOPTS, _UDP, _TCP = 60, 17, 6
#: IPv6 (40), Destination Options with PadN(2) and the Home Address Option (24), ports (4).
_MOBILE_HEAD = 68


@attrs.frozen
class ProgramView:
    """What the program reads to decide, as of now.

    ``binding``: home address -> (backend index, flags, expiry ns, care-of address, the
    expiry its last hit in the driver gave) of ``lb_bindings``; ``backend``: index ->
    (address, flags); ``backend_index``: address -> index (``lb_backend_ix``);
    ``port_served``, ``own``, ``confirmed``: the ports, this host's addresses, home ->
    confirmed care-of address; ``now_ns``: the table's clock as the program reads it;
    ``names``: backend index -> name (for the operator); ``inbound_off``/``replies_off``:
    the policy's reason when a direction is kept out of the driver."""

    flags: int
    vip: bytes
    now_ns: int
    binding: Callable[[bytes], tuple[int, int, int, bytes, int] | None]
    backend: Callable[[int], tuple[bytes, int] | None]
    backend_index: Callable[[bytes], int | None]
    port_served: Callable[[int], bool]
    own: Callable[[bytes], bool]
    confirmed: Callable[[bytes], bytes | None]
    names: Callable[[int], str] = str
    inbound_off: str = ""
    replies_off: str = ""


@attrs.frozen
class Decision:
    """``offloaded``: the program forwards the packet itself; ``direction``: "inbound"
    (to the virtual address), "reply" (from a backend) or "" (neither); ``reason``: why
    it goes up, or what the program does with it."""

    offloaded: bool
    direction: str
    reason: str

    def as_dict(self) -> dict[str, object]:
        return attrs.asdict(self)

    def text(self) -> str:
        """One line for ``lbproxyctl trace``."""
        if self.offloaded:
            return f"would be offloaded ({self.reason})"
        return f"not offloaded: {self.reason}"


def _up(direction: str, reason: str) -> Decision:
    return Decision(False, direction, reason)


def _addr(raw: bytes) -> str:
    return str(ipaddress.IPv6Address(raw))


def decide(packet: bytes, view: ProgramView) -> Decision:
    """What the program does with `packet` (an IPv6 packet, no link-layer header) on the
    client link when it is to the virtual address, else on the server link."""
    if len(packet) >= 40 and packet[24:40] == view.vip:
        return _inbound(packet, view)
    return _reply(packet, view)


def _inbound(p: bytes, view: ProgramView) -> Decision:
    """`inbound` in lbproxy.bpf.c, test by test."""
    d = "inbound"
    if not view.flags & INBOUND:
        return _up(d, f"the policy keeps terminals' packets out of the driver"
                      f"{': ' + view.inbound_off if view.inbound_off else ''}")  # fmt: skip
    n = len(p)
    if n < _MOBILE_HEAD:
        return _up(d, "shorter than IPv6, a Home Address Option and ports")
    if p[0] >> 4 != 6:
        return _up(d, "not IPv6")
    if p[6] != _DSTOPTS:
        return _up(d, "no Destination Options header right after the IPv6 header "
                      "(no Home Address Option: the core's)")  # fmt: skip
    if int.from_bytes(p[4:6], "big") + 40 != n:
        return _up(d, "the payload length does not match the packet (truncated?)")
    if p[41] != 2 or p[42:46] != b"\x01\x02\x00\x00" or p[46:48] != b"\xc9\x10":
        return _up(d, "the Destination Options header is not laid out as PadN(2) then "
                      "the Home Address Option")  # fmt: skip
    if not (p[40] == _UDP or (p[40] == _TCP and n >= 40 + 24 + 20)):
        return _up(d, "neither UDP nor a full TCP header after the Home Address Option")
    port = int.from_bytes(p[66:68], "big")
    if view.flags & PORTS and not view.port_served(port):
        return _up(d, f"port {port} is not served")
    if p[7] <= 1:
        return _up(d, "hop limit 1 or less (the core refreshes the binding, then drops it)")
    home, source = p[48:64], p[8:24]
    binding = view.binding(home)
    if binding is None:
        return _up(d, f"no binding for home address {_addr(home)} in the program's map "
                      "(a miss: the core makes the binding)")  # fmt: skip
    index, flags, expires_ns, care_of, seen = binding
    if view.now_ns >= expires_ns and view.now_ns >= seen:
        return _up(d, "the binding has expired as far as the program knows (the core "
                      "decides; the next sync writes the table's expiry back)")  # fmt: skip
    if not flags & _HAS_CARE_OF:
        return _up(d, "the program has no care-of address for the binding (none yet, or "
                      "it is an identity of another binding: the core counts the conflict)")
    if source != care_of:
        return _up(d, f"from {_addr(source)}, not the binding's care-of address "
                      f"{_addr(care_of)} (the core records the move)")  # fmt: skip
    backend = view.backend(index)
    if backend is None or not backend[1] & _USABLE:
        return _up(d, f"backend {view.names(index)} may not take packets in the driver "
                      "(down, removed, or the policy's)")  # fmt: skip
    hop = ("through its next hop from the neighbour table" if backend[1] & _NEXT_HOP
           else "if the kernel has a next hop for it")  # fmt: skip
    return Decision(True, d, f"to {view.names(index)} at {_addr(backend[0])}, {hop}")


def _reply(p: bytes, view: ProgramView) -> Decision:
    """`reply` in lbproxy.bpf.c, test by test."""
    n = len(p)
    if n < 40 or p[0] >> 4 != 6:
        return _up("", "not an IPv6 packet to the virtual address, nor a reply")
    source = p[8:24]
    index = view.backend_index(source)
    d = "reply" if index is not None else ""
    if not view.flags & REPLIES:
        return _up(d, f"the policy keeps replies out of the driver"
                      f"{': ' + view.replies_off if view.replies_off else ''}")  # fmt: skip
    if int.from_bytes(p[4:6], "big") + 40 != n:
        return _up(d, "the payload length does not match the packet (truncated?)")
    if not ((p[6] == _UDP and n >= 48) or (p[6] == _TCP and n >= 60)):
        return _up(d, "not UDP or TCP straight after the IPv6 header")
    destination = p[24:40]
    if destination[0] == 0xFF or (destination[0] == 0xFE and destination[1] & 0xC0 == 0x80):
        return _up(d, "to a multicast or link-local address: not a reply")
    if view.own(destination):
        return _up(d, "to this host: not a reply")
    if index is None:
        return _up(d, f"not to the virtual address, and {_addr(source)} is not a backend")
    backend = view.backend(index)
    if backend is None or not backend[1] & _CONFIGURED:
        return _up(d, f"from {_addr(source)}, a backend no longer configured")
    if p[7] <= 1:
        return _up(d, "hop limit 1 or less")
    care_of = view.confirmed(destination)
    if care_of is not None:
        how = f"to the confirmed care-of address {_addr(care_of)} with a Type 2 Routing Header"
    else:
        how = f"to {_addr(destination)}"
    return Decision(True, d, f"{how}, from the virtual address, if the kernel has a next hop")
