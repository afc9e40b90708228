"""Tests for lbproxy.notify.machine: every (state, input) pair, and sequences of inputs."""

from __future__ import annotations

import itertools
from pathlib import Path

from hypothesis import given
from hypothesis import strategies as st
from twisted.trial.unittest import SynchronousTestCase

from lbproxy.notify.machine import (
    TRANSITIONS,
    PeerInput,
    PeerMachine,
    PeerState,
    ProtocolViolation,
    diagram,
)

states = st.sampled_from(list(PeerState))
inputs = st.sampled_from(list(PeerInput))

# The rules the table must obey, stated independently of the table.
ACCEPTS_MESSAGES = {PeerState.SUBSCRIBED}


class EveryPairTests(SynchronousTestCase):
    """Each (state, input) pair either moves to the table's state or raises, unchanged."""

    def test_every_pair_exhaustive(self) -> None:
        """All pairs: allowed ones move to TRANSITIONS' target, the rest raise and stay."""
        for state, event in itertools.product(PeerState, PeerInput):
            machine = PeerMachine(state)
            if (state, event) in TRANSITIONS:
                self.assertTrue(machine.allows(event))
                self.assertEqual(machine.feed(event), TRANSITIONS[state, event])
            else:
                self.assertFalse(machine.allows(event))
                exc = self.assertRaises(ProtocolViolation, machine.feed, event)
                self.assertEqual((exc.state, exc.event), (state, event))
                self.assertEqual(machine.state, state)

    @given(state=states, event=inputs)
    def test_pair_invariants(self, state: PeerState, event: PeerInput) -> None:
        """Invariants per pair: STOP always closes; CLOSED is absorbing; notifications and
        snapshots are accepted only while subscribed; a lost connection never leaves a
        subscription behind; nothing but HANDSHAKE_DONE leaves CONNECTING upwards."""
        machine = PeerMachine(state)
        try:
            after = machine.feed(event)
        except ProtocolViolation:
            self.assertNotEqual(event, PeerInput.STOP)
            if event in (PeerInput.NOTIFICATION, PeerInput.SNAPSHOT):
                self.assertNotIn(state, ACCEPTS_MESSAGES)
            return
        if event is PeerInput.STOP or state is PeerState.CLOSED:
            self.assertIs(after, PeerState.CLOSED)
        if event in (PeerInput.NOTIFICATION, PeerInput.SNAPSHOT):
            self.assertIn(state, ACCEPTS_MESSAGES)
        if event is PeerInput.CONNECTION_LOST:
            self.assertIn(after, (PeerState.DISCONNECTED, PeerState.CLOSED))
        if state is PeerState.CONNECTING and after is PeerState.HANDSHAKEN:
            self.assertIs(event, PeerInput.HANDSHAKE_DONE)

    @given(events=st.lists(inputs, max_size=40))
    def test_sequences(self, events: list[PeerInput]) -> None:
        """Along any sequence, SUBSCRIBED is reached only through HANDSHAKEN (TLS verified)
        since the last connection loss, and CLOSED is never left."""
        machine = PeerMachine()
        verified = False
        for event in events:
            before = machine.state
            try:
                machine.feed(event)
            except ProtocolViolation:
                self.assertEqual(machine.state, before)
                continue
            if machine.state is PeerState.HANDSHAKEN:
                verified = True
            if machine.state in (PeerState.DISCONNECTED, PeerState.CONNECTING):
                verified = False
            if machine.state is PeerState.SUBSCRIBED:
                self.assertTrue(verified)
            if before is PeerState.CLOSED:
                self.assertIs(machine.state, PeerState.CLOSED)

    def test_every_state_reachable(self) -> None:
        """Every state is the target of some transition or the start state."""
        targets = set(TRANSITIONS.values()) | {PeerState.DISCONNECTED}
        self.assertEqual(targets, set(PeerState))


class DiagramTests(SynchronousTestCase):
    """The documentation shows the table as it is."""

    def test_docs_match_table(self) -> None:
        """docs/notify.md contains exactly the diagram rendered from TRANSITIONS."""
        doc = Path(__file__).resolve().parent.parent / "docs" / "notify.md"
        self.assertIn(diagram(), doc.read_text(encoding="utf-8"))

    def test_diagram_lists_every_transition(self) -> None:
        """One diagram line per transition, plus the header and the start arrow."""
        self.assertEqual(len(diagram().splitlines()), len(TRANSITIONS) + 2)
