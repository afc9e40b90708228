"""Tests for lbproxy.io.xdpverdict: the XDP program's decision on map contents given here.

No BPF needed: the maps are dictionaries.  tests/test_xdp.py (`DecisionTests`) holds the
same function to the program itself through ``BPF_PROG_TEST_RUN``.
"""

from __future__ import annotations

import ipaddress

from twisted.trial.unittest import SynchronousTestCase

from lbproxy.io.xdpverdict import INBOUND, REPLIES, ProgramView, decide
from tests.executors import address, raw_mobile, raw_reply

VIP = address("2001:db8:5::80")
HOME, CARE_OF, OTHER = (address(a) for a in ("2001:db8:100::1", "2001:db8:a1::1",
                                              "2001:db8:a2::1"))  # fmt: skip
BACKEND = address("2001:db8:b0::11")
SECOND = 1_000_000_000


def view(**changes: object) -> ProgramView:
    """One binding, HOME -> backend 0 (usable, configured) from CARE_OF, live until 300 s;
    now is 100 s."""
    bindings = {HOME: (0, 1, 300 * SECOND, CARE_OF, 0)}
    fields: dict[str, object] = dict(
        flags=INBOUND | REPLIES, vip=VIP, now_ns=100 * SECOND, binding=bindings.get,
        backend={0: (BACKEND, 3)}.get,
        backend_index={BACKEND: 0}.get, port_served=lambda port: True,
        own=lambda a: False, confirmed={}.get, names={0: "b1"}.get,
    )  # fmt: skip
    fields.update(changes)
    return ProgramView(**fields)  # type: ignore[arg-type]


def inbound(source: bytes = CARE_OF, hop: int = 64) -> bytes:
    packet = raw_mobile(17, HOME, source, hop, 80, 0, b"payload")
    return packet[:24] + VIP + packet[40:]


class DecideTests(SynchronousTestCase):
    def test_usual_packets_are_offloaded(self) -> None:
        """The usual shape from the binding's care-of address, and a backend's reply."""
        decision = decide(inbound(), view())
        self.assertEqual((decision.offloaded, decision.direction), (True, "inbound"))
        self.assertIn("to b1 at 2001:db8:b0::11", decision.reason)
        reply = decide(raw_reply(17, BACKEND, HOME, 64, 0, b"r"), view())
        self.assertEqual((reply.offloaded, reply.direction), (True, "reply"))
        confirmed = decide(raw_reply(17, BACKEND, HOME, 64, 0, b"r"),
                           view(confirmed={HOME: OTHER}.get))  # fmt: skip
        self.assertIn("Type 2 Routing Header", confirmed.reason)
        self.assertIn(str(ipaddress.IPv6Address(OTHER)), confirmed.reason)

    def test_why_not(self) -> None:
        """Each test of the program that can fail, with its reason."""
        cases = [
            (inbound(), view(flags=REPLIES, inbound_off="backend b1 is down"),
             "out of the driver: backend b1 is down"),
            (inbound(hop=1), view(), "hop limit 1"),
            (inbound(OTHER), view(), "not the binding's care-of address"),
            (inbound(), view(binding={}.get), "no binding for home address 2001:db8:100::1"),
            (inbound(), view(now_ns=301 * SECOND), "expired"),
            (inbound(), view(now_ns=301 * SECOND,
                             binding={HOME: (0, 1, 300 * SECOND, CARE_OF, 400 * SECOND)}.get),
             "to b1"),  # a hit in the driver refreshed it
            (inbound(), view(binding={HOME: (0, 0, 300 * SECOND, CARE_OF, 0)}.get),
             "no care-of address"),
            (inbound(), view(backend={0: (BACKEND, 2)}.get), "b1 may not take packets"),
            (inbound(), view(flags=INBOUND | REPLIES | 8, port_served=lambda p: p == 443),
             "port 80 is not served"),
            (inbound()[:-1], view(), "payload length"),
            (inbound()[:60], view(), "shorter than"),
            (raw_reply(17, BACKEND, HOME, 64, 0, b"r"), view(flags=INBOUND), "replies out"),
            (raw_reply(17, OTHER, HOME, 64, 0, b"r"), view(), "is not a backend"),
            (raw_reply(17, BACKEND, HOME, 64, 0, b"r"), view(own=lambda a: a == HOME),
             "to this host"),
            (raw_reply(17, BACKEND, HOME, 64, 0, b"r"), view(backend={0: (BACKEND, 1)}.get),
             "no longer configured"),
            (b"\x60" + bytes(10), view(), "not an IPv6 packet to the virtual address"),
        ]  # fmt: skip
        for packet, state, words in cases:
            decision = decide(packet, state)
            self.assertIn(words, decision.reason, (words, decision))
            self.assertEqual(decision.offloaded, words == "to b1", words)
            self.assertTrue(decision.text().startswith(
                "would be offloaded (" if decision.offloaded else "not offloaded: "))
