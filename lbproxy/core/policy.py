"""The forwarding policy: an immutable snapshot every executor reads.

Why this exists: a packet's fate is decided by the core (`lbproxy.core.balancer`) and
*executed* by more than one piece of code -- the general path over a parsed view, the
fast path straight from the receive buffer, and any later executor (an XDP program fed
from maps).  They must agree on what the configuration and the backends' health say.  So
the core publishes one frozen `Policy` -- rebuilt whenever configuration, health or this
host's addresses change -- and executors read only that and the table's public
operations; none of them looks at the balancer's private state.

It holds what is the same for many packets and so can be precomputed: the virtual
addresses and ports, the mode, which backends may take packets, each backend's checksum
constants (RFC 1624: rewriting the destination from the virtual address to a backend, or
a reply's source from a backend to the virtual address, changes the transport checksum
by a constant per backend), and whether -- and if not, why not -- the fast path can serve
this configuration.

`is_reply` is the one rule saying which packets read on the server link are replies to
forward (the rest are the kernel's: neighbour discovery, health-check answers...).
"""

from __future__ import annotations

from collections.abc import Collection, Iterable, Mapping, Sequence

import attrs

from lbproxy.core.selection import Backend
from lbproxy.wire.checksum import delta16

__all__ = ["Policy", "build_policy", "is_reply"]



def is_reply(destination: bytes, own: Collection[bytes]) -> bool:
    """Whether a packet read on the server link, to `destination` (16 bytes), is a
    backend's reply to a terminal -- not multicast, not link-local (fe80::/10), not to
    one of this host's own addresses `own` (those are the kernel's to handle)."""
    first = destination[0]
    if first == 0xFF or (first == 0xFE and destination[1] & 0xC0 == 0x80):
        return False
    return destination not in own


@attrs.frozen
class Policy:
    """What every executor needs to know of the configuration and the backends' health."""

    #: The virtual addresses (16 bytes each), in configuration order, and as a set.
    vips: tuple[bytes, ...]
    vip_set: frozenset[bytes]
    #: Destination ports served (empty: all).
    ports: frozenset[int]
    #: Translate mode (the HAO removed, source := home address); else transparent.
    translate: bool
    #: Every configured backend by name, and by address (16 bytes).
    backends: Mapping[str, Backend]
    by_address: Mapping[bytes, Backend]
    #: Backends health checks report down; backends removed by a reload that still hold
    #: bindings.
    down: frozenset[str]
    gone: frozenset[str]
    #: A binding to a down backend moves on its next packet (else it stays).
    reassign_dead: bool
    #: This host's own addresses: server-link packets to them are not replies.
    own: frozenset[bytes]
    #: Backend address -> checksum change of "destination := backend" for a packet to
    #: the first virtual address, and of "source := first virtual address" for a reply
    #: from it (`lbproxy.wire.checksum.delta16`).
    inbound_deltas: Mapping[bytes, int]
    reply_deltas: Mapping[bytes, int]
    #: Why the fast path cannot take terminals' packets / backends' replies under this
    #: policy (None: it can).
    fast_inbound: str | None
    fast_replies: str | None
    #: Precomputed for the general path's every packet (`Balancer.inbound`/`outbound`):
    #: the names of the backends a binding may keep its packets on (`usable`), and the
    #: virtual address when there is only one (None: several; replies look theirs up).
    usable_names: frozenset[str]
    only_vip: bytes | None
    #: The correspondent node's strict mode (lbproxy.core.correspondent): a packet with
    #: a Home Address Option is forwarded only if the binding cache maps its home
    #: address to its source.  The fast path looks the cache up; the XDP executor
    #: writes a binding's care-of address into the program only while the cache maps
    #: the home address to it.
    strict_hao: bool = False

    @property
    def offload_inbound(self) -> str | None:
        """Why the XDP program may not take terminals' packets (None: it may): the
        fast path's reason (in strict mode the program is kept in step with the binding
        cache, as the fast path reads it)."""
        return self.fast_inbound

    def usable(self, backend: Backend) -> bool:
        """Whether a binding to `backend` may keep its packets (not removed; not down
        when down backends are reassigned)."""
        return backend.name in self.usable_names


def build_policy(
    *,
    vips: Sequence[bytes],
    ports: Iterable[int],
    translate: bool,
    backends: Sequence[Backend],
    down: Iterable[str] = (),
    gone: Iterable[str] = (),
    reassign_dead: bool = True,
    own: Iterable[bytes] = (),
    fast_wanted: bool = True,
    fast_chain: str | None = None,
    strict_hao: bool = False,
) -> Policy:
    """A policy from its parts; `fast_chain` is why the key chain rules the fast path
    out (None: it starts with the home-address strategy, the shape the fast path keys);
    `strict_hao`: the correspondent's strict mode (`Policy.strict_hao`)."""
    if not vips:
        raise ValueError("at least one virtual address is required")
    down_set, gone_set = frozenset(down), frozenset(gone)
    first = vips[0]
    by_address = {b.packed: b for b in backends}
    inbound_reason = reply_reason = None
    if not fast_wanted:
        inbound_reason = reply_reason = "turned off"
    elif len(vips) > 1:
        inbound_reason = reply_reason = "several virtual addresses"
    if inbound_reason is None:
        if fast_chain is not None:
            inbound_reason = fast_chain
        elif down_set:
            inbound_reason = f"backend {sorted(down_set)[0]} is down"
        elif gone_set:
            inbound_reason = f"removed backend {sorted(gone_set)[0]} still has bindings"
    return Policy(
        vips=tuple(vips),
        vip_set=frozenset(vips),
        ports=frozenset(ports),
        translate=translate,
        backends={b.name: b for b in backends},
        by_address=by_address,
        down=down_set,
        gone=gone_set,
        reassign_dead=reassign_dead,
        own=frozenset(own),
        inbound_deltas={a: delta16(first, a) for a in by_address},
        reply_deltas={a: delta16(a, first) for a in by_address},
        fast_inbound=inbound_reason,
        fast_replies=reply_reason,
        usable_names=frozenset(
            b.name for b in backends if not (reassign_dead and b.name in down_set)
        ),
        only_vip=first if len(vips) == 1 else None,
        strict_hao=strict_hao,
    )
