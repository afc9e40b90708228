"""The per-peer notification state machine, as one dict table (h11-style), no I/O.

Both ends of a notification connection -- the balancer's client for one peer and an agent's
session for one balancer -- walk the same states.  The edges (``client``, ``agent``) feed
inputs and act on the resulting state; whatever the table does not allow raises
:class:`ProtocolViolation`, which the edge counts and answers (a notification before any
subscription is refused, for instance).  ``docs/notify.md`` shows the diagram that
:func:`diagram` renders from this table; a test keeps the two equal.
"""

from __future__ import annotations

import enum


class PeerState(enum.Enum):
    """Where one peer connection is."""

    DISCONNECTED = "DISCONNECTED"  # no connection; the client is backing off or not started
    CONNECTING = "CONNECTING"  # TCP up, TLS handshake and identity check in progress
    HANDSHAKEN = "HANDSHAKEN"  # TLS up, peer identity verified, no subscription yet
    SUBSCRIBED = "SUBSCRIBED"  # at least one subscription is active
    CLOSED = "CLOSED"  # stopped for good (service stopped); absorbing


class PeerInput(enum.Enum):
    """What can happen to a peer connection."""

    TCP_CONNECTED = "TCP_CONNECTED"
    HANDSHAKE_DONE = "HANDSHAKE_DONE"  # TLS verified and the identity matches configuration
    SUBSCRIBE_OK = "SUBSCRIBE_OK"
    SUBSCRIBE_REFUSED = "SUBSCRIBE_REFUSED"
    LAST_UNSUBSCRIBED = "LAST_UNSUBSCRIBED"
    NOTIFICATION = "NOTIFICATION"  # BindingChanged
    SNAPSHOT = "SNAPSHOT"  # BindingSnapshot
    CONNECTION_LOST = "CONNECTION_LOST"  # includes TLS failures and refused identities
    STOP = "STOP"


S, In = PeerState, PeerInput

TRANSITIONS: dict[tuple[PeerState, PeerInput], PeerState] = {
    (S.DISCONNECTED, In.TCP_CONNECTED): S.CONNECTING,
    (S.DISCONNECTED, In.STOP): S.CLOSED,
    (S.CONNECTING, In.HANDSHAKE_DONE): S.HANDSHAKEN,
    (S.CONNECTING, In.CONNECTION_LOST): S.DISCONNECTED,
    (S.CONNECTING, In.STOP): S.CLOSED,
    (S.HANDSHAKEN, In.SUBSCRIBE_OK): S.SUBSCRIBED,
    (S.HANDSHAKEN, In.SUBSCRIBE_REFUSED): S.HANDSHAKEN,
    (S.HANDSHAKEN, In.CONNECTION_LOST): S.DISCONNECTED,
    (S.HANDSHAKEN, In.STOP): S.CLOSED,
    (S.SUBSCRIBED, In.SUBSCRIBE_OK): S.SUBSCRIBED,
    (S.SUBSCRIBED, In.SUBSCRIBE_REFUSED): S.SUBSCRIBED,
    (S.SUBSCRIBED, In.NOTIFICATION): S.SUBSCRIBED,
    (S.SUBSCRIBED, In.SNAPSHOT): S.SUBSCRIBED,
    (S.SUBSCRIBED, In.LAST_UNSUBSCRIBED): S.HANDSHAKEN,
    (S.SUBSCRIBED, In.CONNECTION_LOST): S.DISCONNECTED,
    (S.SUBSCRIBED, In.STOP): S.CLOSED,
    # Stopping closes the connection, whose loss is then reported: both are no-ops here.
    (S.CLOSED, In.STOP): S.CLOSED,
    (S.CLOSED, In.CONNECTION_LOST): S.CLOSED,
}
del S, In


class ProtocolViolation(Exception):  # noqa: N818 - a violation, not an error of ours
    """An input the table does not allow in the current state."""

    def __init__(self, state: PeerState, event: PeerInput) -> None:
        super().__init__(f"{event.value} is not allowed in {state.value}")
        self.state = state
        self.event = event


class PeerMachine:
    """The state of one peer connection; ``feed`` moves it along :data:`TRANSITIONS`."""

    def __init__(self, state: PeerState = PeerState.DISCONNECTED) -> None:
        self.state = state

    def allows(self, event: PeerInput) -> bool:
        """Whether ``event`` is allowed now (without moving)."""
        return (self.state, event) in TRANSITIONS

    def feed(self, event: PeerInput) -> PeerState:
        """Move on ``event``; raise :class:`ProtocolViolation` (state unchanged) if not allowed."""
        try:
            self.state = TRANSITIONS[self.state, event]
        except KeyError:
            raise ProtocolViolation(self.state, event) from None
        return self.state


def diagram() -> str:
    """The table as a Mermaid state diagram (the one in docs/notify.md)."""
    lines = ["stateDiagram-v2", f"    [*] --> {PeerState.DISCONNECTED.value}"]
    for (state, event), target in TRANSITIONS.items():
        lines.append(f"    {state.value} --> {target.value}: {event.value}")
    return "\n".join(lines)
