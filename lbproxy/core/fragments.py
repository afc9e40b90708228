"""Fragment flows: a fragmented datagram's later fragments follow its first one.

Why this exists: only the first fragment of a datagram carries the upper-layer header, an
ESP header or anything else a key strategy may need (RFC 8200 section 4.5), so the
balancer decides on the first fragment and remembers (source, destination, fragment
identification) -> backend for the rest.  An RFC-following mobile node repeats its Home
Address Option in every fragment (it sits before the Fragment header), but a terminal
keyed on its SPI or interface ID is not, so fragments are followed by identification, not
re-keyed.

Theory of operation
-------------------
Every flow lives `timeout` seconds from its first fragment (RFC 8200 gives reassembly 60
seconds).  The timeout is the same for all, so deadlines come in insertion order: a FIFO
of (deadline, flow) is expired from its front, and `expire` costs what is due, never a
scan of every flow.  A flow learnt again (a retransmitted first fragment) gets a new
deadline; its old FIFO entry is skipped when it comes up.  The number of flows is bounded:
at `max_flows` the oldest is forgotten (its later fragments are then dropped, counted by
the caller as ``fragment-unknown``).
"""

from __future__ import annotations

from collections import deque

from lbproxy.core.selection import Backend

__all__ = ["FRAGMENT_TIMEOUT", "MAX_FRAGMENT_FLOWS", "FragmentFlows", "flow_id"]

#: How long a first fragment's decision is remembered for its later fragments (RFC 8200
#: section 4.5 gives reassembly 60 seconds).
FRAGMENT_TIMEOUT = 60.0
#: At most this many fragmented datagrams are tracked at once; the oldest is forgotten.
MAX_FRAGMENT_FLOWS = 65536


def flow_id(buf: bytes | bytearray, identification: int) -> bytes:
    """The flow of a fragment: its source and destination (bytes 8..39) and its
    Fragment header's identification."""
    return bytes(buf[8:40]) + identification.to_bytes(4, "big")


class FragmentFlows:
    """Fragment flow -> backend, each for `timeout` seconds, at most `max_flows`."""

    def __init__(
        self, timeout: float = FRAGMENT_TIMEOUT, max_flows: int = MAX_FRAGMENT_FLOWS
    ) -> None:
        self.timeout = timeout
        self.max_flows = max_flows
        self._flows: dict[bytes, tuple[Backend, float]] = {}
        self._fifo: deque[tuple[float, bytes]] = deque()
        #: Flows forgotten to make room (bound reached), and expired.
        self.evicted = 0
        self.expired = 0

    def learn(self, flow: bytes, backend: Backend, now: float) -> None:
        """The first fragment of `flow` went to `backend`."""
        flows = self._flows
        if flow not in flows and len(flows) >= self.max_flows:
            self._evict_oldest()
        deadline = now + self.timeout
        flows[flow] = (backend, deadline)
        self._fifo.append((deadline, flow))

    def backend(self, flow: bytes, now: float) -> Backend | None:
        """The backend of a later fragment of `flow`, or None (unknown or timed out)."""
        found = self._flows.get(flow)
        if found is None or found[1] <= now:
            return None
        return found[0]

    def expire(self, now: float) -> int:
        """Forget the flows whose time is up; returns how many (cost: what is due)."""
        fifo, flows = self._fifo, self._flows
        ended = 0
        while fifo and fifo[0][0] <= now:
            deadline, flow = fifo.popleft()
            found = flows.get(flow)
            if found is not None and found[1] == deadline:
                del flows[flow]
                ended += 1
        self.expired += ended
        return ended

    def _evict_oldest(self) -> None:
        fifo, flows = self._fifo, self._flows
        while fifo:
            deadline, flow = fifo.popleft()
            found = flows.get(flow)
            if found is not None and found[1] == deadline:
                del flows[flow]
                self.evicted += 1
                return

    def __len__(self) -> int:
        return len(self._flows)
