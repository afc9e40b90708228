"""The data path's counters: what happened to packets, by outcome and reason.

One object, shared by every executor (the general path, the fast path), so the operator's
``stats``, the metrics and the tests read one set of totals whichever code moved a packet.
"""

from __future__ import annotations

from collections import Counter

__all__ = ["Counters"]


class Counters:
    """Plain counters read by metrics, the manhole and lbproxyctl.

    Drops are counted by reason name (the malformed reasons of the view plus the
    balancer's own: ``not-virtual``, ``port``, ``no-backend``, ``table-full``,
    ``fragment-unknown``, ``not-from-backend``, and the rewrites' ``hop-limit`` and
    ``routing-header``).

    The fast path does not touch ``hits`` and ``backend_packets`` per packet (a
    ``Counter`` increment costs three times a list cell's): it adds to
    ``hoa_hits_pending`` and to a per-backend cell from :meth:`backend_cell`, which
    the two properties fold in whenever they are read, so readers see the same totals.
    """

    def __init__(self) -> None:
        self.packets_in = 0
        self.packets_out = 0
        self.replies_in = 0
        self.replies_out = 0
        self.dropped: Counter[str] = Counter()
        self._hits: Counter[str] = Counter()
        self.misses: Counter[str] = Counter()
        self._backend_packets: Counter[str] = Counter()
        self.reassigned = 0
        #: Identities of a packet that had a binding of their own, other than the one
        #: the packet went to (by the strategy that found them): linking never moves a
        #: bound identity, chain order settles the packet.
        self.conflicts: Counter[str] = Counter()
        self.icmp_errors_in = 0
        #: The correspondent node's outcomes (lbproxy.core.correspondent): Test Inits
        #: answered, Binding Updates accepted, messages sent ("hot-sent", "ba-sent",
        #: "be-sent"...), Binding Errors rate limited; its refusals are drops.
        self.correspondent: Counter[str] = Counter()
        #: Misses answered by the fleet's shared bindings rather than the scheduler.
        self.shared_hits = 0
        #: Server-link packets that are not replies (`lbproxy.core.policy.is_reply`):
        #: left to the kernel, not counted as replies.
        self.ignored = 0
        #: Home-address hits not yet folded into ``hits``.
        self.hoa_hits_pending = 0
        # backend name -> [packets not yet folded into backend_packets]
        self._cells: dict[str, list[int]] = {}

    @property
    def hits(self) -> Counter[str]:
        """Binding hits by key kind."""
        if self.hoa_hits_pending:
            self._hits["hoa"] += self.hoa_hits_pending
            self.hoa_hits_pending = 0
        return self._hits

    @property
    def backend_packets(self) -> Counter[str]:
        """Packets forwarded, by backend name."""
        for name, cell in self._cells.items():
            if cell[0]:
                self._backend_packets[name] += cell[0]
                cell[0] = 0
        return self._backend_packets

    def backend_cell(self, name: str) -> list[int]:
        """The one-item list the fast path adds the backend's packets to."""
        cell = self._cells.get(name)
        if cell is None:
            cell = self._cells[name] = [0]
        return cell

    def drop(self, reason: str) -> None:
        """A packet dropped, counted by `reason`."""
        self.dropped[reason] += 1

    def as_dict(self) -> dict[str, object]:
        """A JSON-ready snapshot."""
        return {
            "packets_in": self.packets_in,
            "packets_out": self.packets_out,
            "replies_in": self.replies_in,
            "replies_out": self.replies_out,
            "dropped": dict(self.dropped),
            "hits": dict(self.hits),
            "misses": dict(self.misses),
            "backend_packets": dict(self.backend_packets),
            "reassigned": self.reassigned,
            "conflicts": dict(self.conflicts),
            "icmp_errors_in": self.icmp_errors_in,
            "correspondent": dict(self.correspondent),
            "ignored": self.ignored,
            "shared_hits": self.shared_hits,
        }
