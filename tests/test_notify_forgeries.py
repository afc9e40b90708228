"""Forgeries and garbage from authenticated peers, and certificates that must not authenticate.

Every case goes through the real code end to end -- the agent's AMP session, real TLS (a CA
and certificates made here, handshakes in memory through ``twisted.test.iosim``), the
balancer's client, gate and ``TableListener`` over a real ``StickyTable`` and a real
``ReturnPaths`` -- on a ``task.Clock``, so nothing waits and nothing is left to chance.
Each case must be refused, counted by its reason (and by nothing else), and leave the table,
the return paths and the subscriptions exactly as they were.

The setup follows three terminals through one home agent (``ha1``, entitled to
2001:db8:1::/64) and one terminal agent (``t1``, entitled to its own home address only):
H1 at CoA1 and H2 at CoA2 (via ha1), HT at CoAT (via t1).  A fourth client, the victim, has
a source-address binding at VICTIM on another backend.
"""

from __future__ import annotations

import contextlib
import ipaddress
from collections.abc import Callable, Iterator
from typing import Any

from OpenSSL import SSL
from twisted.internet.defer import Deferred, succeed
from twisted.internet.error import ConnectionDone
from twisted.internet.interfaces import (
    IOpenSSLClientConnectionCreator,
    IOpenSSLServerConnectionCreator,
    IProtocolFactory,
    IStreamClientEndpoint,
)
from twisted.internet.protocol import Factory
from twisted.internet.task import Clock
from twisted.protocols import amp
from twisted.protocols.tls import TLSMemoryBIOFactory
from twisted.python.failure import Failure
from twisted.test import iosim
from twisted.trial.unittest import SynchronousTestCase
from zope.interface import implementer

from lbproxy.core.keys import Key
from lbproxy.core.policy import Policy, build_policy
from lbproxy.core.returnpaths import ReturnPaths
from lbproxy.core.selection import Backend
from lbproxy.core.table import StickyTable
from lbproxy.notify import commands as c
from lbproxy.notify.adapter import TableListener
from lbproxy.notify.agent import AgentSession, NotificationAgent
from lbproxy.notify.cache import BindingCache
from lbproxy.notify.client import Peer
from lbproxy.notify.listener import RecordingListener
from lbproxy.notify.machine import PeerState
from lbproxy.notify.pki import CertificateAuthority, Issued
from lbproxy.notify.policy import HomeAddressEntitlement, PrefixEntitlement, Refusal
from lbproxy.notify.router import Notifier
from lbproxy.notify.tls import TlsMaterial


def a(text: str) -> bytes:
    return ipaddress.IPv6Address(text).packed


PREFIX = "2001:db8:1::/64"
H1, COA1 = a("2001:db8:1::11"), a("2001:db8:a::11")
H2, COA2 = a("2001:db8:1::12"), a("2001:db8:a::12")
HT, COAT = a("2001:db8:1::16"), a("2001:db8:a::16")
VICTIM = a("2001:db8:c::99")  # another client's source-address binding, on backend b2
FRESH = a("2001:db8:a::77")  # a care-of address nobody uses
VIP = a("2001:db8:5::80")
OWN = a("2001:db8:f0::2")
B1 = Backend("b1", ipaddress.IPv6Address("2001:db8:b0::11"))
B2 = Backend("b2", ipaddress.IPv6Address("2001:db8:b0::12"))
FORBIDDEN = "2001:db8:d::/48"
CARE_OF_PREFIXES = ("2001:db8:a::/48", "2001:db8:c::/48", "2001:db8:d::/48")

CA = CertificateAuthority()  # key generation is the slow part: one set per run
BALANCER = CA.issue(dns=["lb1.test"])
HA1 = CA.issue(dns=["ha1.test"])
T1 = CA.issue(dns=["t1.test"], ips=["2001:db8:1::16"])


# -- an in-memory network ------------------------------------------------------------------


@implementer(IStreamClientEndpoint)
class PumpedEndpoint:
    """A client endpoint whose every connection is an ``iosim`` pump to ``server``'s
    protocols: bytes move only when :meth:`flush` is called."""

    def __init__(self, server: IProtocolFactory, clock: Clock) -> None:
        self.server = server
        self.clock = clock
        self.pumps: list[iosim.IOPump] = []
        self.attempts = 0

    def connect(self, factory: IProtocolFactory) -> Deferred[Any]:
        self.attempts += 1
        client = factory.buildProtocol(iosim.FakeAddress())
        server = self.server.buildProtocol(iosim.FakeAddress())
        assert client is not None and server is not None
        transports = iosim.makeFakeServer(server), iosim.makeFakeClient(client)
        for transport in transports:
            # iosim's default is one exception instance shared by every transport, whose
            # traceback grows each time it is raised: give each connection its own.
            transport.disconnectReason = ConnectionDone("Connection done")
        pump = iosim.connect(server, transports[0], client, transports[1], greet=False,
                             clock=self.clock)  # fmt: skip
        self.pumps.append(pump)
        return succeed(client)

    def flush(self) -> None:
        for pump in list(self.pumps):
            pump.flush()
            if pump.clientIO.disconnected and pump.serverIO.disconnected:
                self.pumps.remove(pump)


def pumped(client: IProtocolFactory, server: IProtocolFactory, clock: Clock) -> iosim.IOPump:
    """One connection from ``client`` to ``server``, pumped once."""
    endpoint = PumpedEndpoint(server, clock)
    endpoint.connect(client)
    endpoint.flush()
    return endpoint.pumps[0] if endpoint.pumps else None  # type: ignore[return-value]


class Link:
    """A balancer (Notifier, TableListener, StickyTable, ReturnPaths, Policy) and two
    agents (ha1: a home agent; t1: a terminal agent), connected over in-memory TLS."""

    def __init__(
        self,
        ha1_cert: Issued = HA1,
        t1_cert: Issued = T1,
        balancer_cert: Issued = BALANCER,
        ha1_server: Callable[[NotificationAgent], IProtocolFactory] | None = None,
        agent_session: type[AgentSession] = AgentSession,
        max_subscriptions: int = 1000,
        ha1_identity: str = "ha1.test",
        **options: Any,
    ) -> None:
        self.clock = Clock()
        self.clock.advance(1000)
        self.table = StickyTable(self.clock, lifetime=300.0, max_entries=1000)
        self.paths = ReturnPaths(self.clock, 1000)
        self.listener = TableListener(self.table, self.paths)
        self.policy: Policy = build_policy(
            vips=[VIP], ports=(), translate=True, backends=[B1, B2], own=[OWN]
        )
        self.caches = {"ha1": BindingCache(), "t1": BindingCache()}
        self.agents = {
            "ha1": self._agent("ha1", PrefixEntitlement.of([PREFIX]), agent_session),
            "t1": self._agent("t1", HomeAddressEntitlement(HT), agent_session),
        }
        ha1_factory = (
            ha1_server(self.agents["ha1"]) if ha1_server is not None
            else self.agents["ha1"].tls_factory(CA.material(ha1_cert))
        )  # fmt: skip
        self.endpoints = {
            "ha1": PumpedEndpoint(ha1_factory, self.clock),
            "t1": PumpedEndpoint(self.agents["t1"].tls_factory(CA.material(t1_cert)), self.clock),
        }
        self.notifier = Notifier(
            [
                (Peer.home_agent("ha1", ha1_identity, [PREFIX]), self.endpoints["ha1"]),
                (Peer.terminal("t1", "t1.test", "2001:db8:1::16"), self.endpoints["t1"]),
            ],
            CA.material(balancer_cert),
            self.listener,
            self.clock,
            max_subscriptions=max_subscriptions,
            local=lambda: self.policy,
            forbidden=[FORBIDDEN],
            care_of_prefixes=CARE_OF_PREFIXES,
            jitter=lambda: 0.0,
            **options,
        )

    def _agent(self, name: str, entitlement: Any, session: type[AgentSession]) -> NotificationAgent:
        agent = NotificationAgent(self.caches[name], entitlement, ("lb1.test",), self.clock,
                                  max_subscriptions=50)  # fmt: skip
        agent.factory = lambda: Factory.forProtocol(lambda: session(agent))  # type: ignore[method-assign]
        return agent

    def start(self) -> Link:
        self.notifier.startService()
        self.flush()
        return self

    def flush(self) -> None:
        for _ in range(3):
            for endpoint in self.endpoints.values():
                endpoint.flush()

    def client(self, name: str) -> Any:
        return self.notifier.clients[name]

    def session(self, name: str) -> AgentSession:
        sessions = self.agents[name].sessions
        assert len(sessions) == 1, sessions
        return next(iter(sessions))

    def follow(self) -> None:
        """The setup every forgery starts from (module docstring)."""
        now = self.clock.seconds()
        for address, backend in ((COA1, B1), (COA2, B2), (COAT, B1), (VICTIM, B2)):
            self.table.insert(Key("src", address), backend)
        self.caches["ha1"].update(H1, COA1, 10, 400, now)
        self.caches["ha1"].update(H2, COA2, 65530, 400, now)
        self.caches["t1"].update(HT, COAT, 100, 400, now)
        for home in (H1, H2, HT):
            self.notifier.terminal_seen(home, home=True)
        self.flush()

    def state(self) -> tuple[Any, ...]:
        """Everything a refusal must leave as it was."""
        table = sorted(
            (bytes(k), b.backend.name, b.expires, b.care_of, b.established, b.packets)
            for k, b in self.table
        )
        subs = sorted(
            (s.peer, s.address, s.kind, s.expires, s.home, s.care_of, s.seq, s.sub_id, s.confirmed)
            for s in self.notifier.subscriptions
        )
        return table, sorted(self.paths.items()), subs

    def counts(self) -> dict[Refusal, int]:
        return dict(self.notifier.counters.counts)


# -- raw commands: what a forger can put on the wire ---------------------------------------


class RawBindingChanged(amp.Command):
    """BindingChanged with every argument as raw bytes."""

    commandName = b"BindingChanged"
    arguments = [(n, amp.String()) for n in
                 (b"home", b"old_care_of", b"new_care_of", b"seq", b"lifetime")]  # fmt: skip
    errors = c.ERRORS


class RawBindingSnapshot(amp.Command):
    """BindingSnapshot whose entries are raw bytes (missing keys allowed)."""

    commandName = b"BindingSnapshot"
    arguments = [(b"bindings", amp.AmpList([(b"home", amp.String()), (b"care_of", amp.String()),
                                            (b"seq", amp.String())]))]  # fmt: skip
    response = [(b"accepted", amp.Integer()), (b"refused", amp.Integer())]
    errors = c.ERRORS


class Unknown(amp.Command):
    """A command the balancer does not know."""

    commandName = b"MoveEverything"
    errors = c.ERRORS


def changed(home: bytes, new: bytes, seq: Any, lifetime: Any, old: bytes = b"") -> dict[str, Any]:
    return {"home": home, "old_care_of": old, "new_care_of": new, "seq": seq,
            "lifetime": lifetime}  # fmt: skip


def raw(home: bytes, new: bytes, seq: bytes, lifetime: bytes, old: bytes = b"") -> dict[str, Any]:
    return {"home": home, "old_care_of": old, "new_care_of": new, "seq": seq,
            "lifetime": lifetime}  # fmt: skip


def entry(home: bytes, care_of: bytes, seq: int, lifetime: int) -> dict[str, Any]:
    return {"home": home, "care_of": care_of, "seq": seq, "lifetime": lifetime}


# Each case: (name, peer that sends, command, arguments, expected reason, AMP error or
# None when the command itself succeeds and reports the entry refused).
Case = tuple[str, str, type[amp.Command], dict[str, Any], Refusal, type[Exception] | None]

_BAD_CARE_OF = [
    ("unspecified", "::"),
    ("loopback", "::1"),
    ("multicast_link", "ff02::1"),
    ("multicast_site", "ff05::1:3"),
    ("multicast_global", "ff0e::101"),
    ("link_local", "fe80::1"),
    ("site_local", "fec0::1"),
    ("ipv4_mapped", "::ffff:192.0.2.1"),
    ("ipv4_compatible", "::192.0.2.1"),
    ("nat64", "64:ff9b::c000:201"),
    ("discard", "100::1"),
    ("unique_local", "fd00:1::1"),
    ("subnet_router_anycast", "2001:db8:a::"),
    ("subnet_anycast", "2001:db8:a:0:fdff:ffff:ffff:ffff"),
    ("outside_2000_3", "4000::1"),
]


def cases() -> Iterator[Case]:
    bc = c.BindingChanged
    for name, text in _BAD_CARE_OF:
        yield (f"care_of_{name}", "ha1", bc, changed(H1, a(text), 11, 40),
               Refusal.BAD_ADDRESS, c.BadArgument)  # fmt: skip
    for name, address in (("vip", VIP), ("backend_b1", B1.packed), ("backend_b2", B2.packed),
                          ("this_host", OWN)):  # fmt: skip
        yield (f"care_of_{name}", "ha1", bc, changed(H1, address, 11, 40),
               Refusal.LOCAL_ADDRESS, c.BadArgument)  # fmt: skip
    yield ("care_of_forbidden_prefix", "ha1", bc, changed(H1, a("2001:db8:d::5"), 11, 40),
           Refusal.FORBIDDEN_ADDRESS, c.BadArgument)  # fmt: skip
    yield ("care_of_outside_care_of_prefixes", "ha1", bc, changed(H1, a("2001:db8:e::5"), 11, 40),
           Refusal.FORBIDDEN_ADDRESS, c.BadArgument)  # fmt: skip
    # Malformed addresses.
    yield ("care_of_4_octets", "ha1", bc, changed(H1, b"\x20\x01\x0d\xb8", 11, 40),
           Refusal.BAD_ARGUMENT, c.BadArgument)  # fmt: skip
    yield ("care_of_empty", "ha1", bc, changed(H1, b"", 11, 40),
           Refusal.BAD_ARGUMENT, c.BadArgument)  # fmt: skip
    yield ("home_15_octets", "ha1", bc, changed(H1[:15], FRESH, 11, 40),
           Refusal.BAD_ARGUMENT, c.BadArgument)  # fmt: skip
    yield ("old_care_of_3_octets", "ha1", bc, changed(H1, FRESH, 11, 40, old=b"abc"),
           Refusal.BAD_ARGUMENT, c.BadArgument)  # fmt: skip
    # Cross-terminal moves: another client's source-address binding (on b2) would be
    # pointed at the mover's backend (b1).
    yield ("terminal_moves_victim_binding", "t1", bc, changed(HT, VICTIM, 101, 40, old=COAT),
           Refusal.NOT_OWNER, c.NotEntitled)  # fmt: skip
    yield ("terminal_takes_h2_care_of", "t1", bc, changed(HT, COA2, 101, 40),
           Refusal.NOT_OWNER, c.NotEntitled)  # fmt: skip
    yield ("home_agent_moves_victim_binding", "ha1", bc, changed(H1, VICTIM, 11, 40),
           Refusal.NOT_OWNER, c.NotEntitled)  # fmt: skip
    yield ("terminal_speaks_for_h1", "t1", bc, changed(H1, FRESH, 11, 40),
           Refusal.NOT_ENTITLED, c.NotEntitled)  # fmt: skip
    yield ("terminal_snapshot_moves_victim", "t1", c.BindingSnapshot,
           {"bindings": [entry(HT, VICTIM, 101, 40)]}, Refusal.NOT_OWNER, None)  # fmt: skip
    # Homes outside what the peer may speak for, or not followed.
    yield ("home_outside_prefix", "ha1", bc, changed(a("2001:db8:99::16"), FRESH, 1, 40),
           Refusal.NOT_ENTITLED, c.NotEntitled)  # fmt: skip
    yield ("home_is_vip", "ha1", bc, changed(VIP, FRESH, 1, 40),
           Refusal.LOCAL_ADDRESS, c.BadArgument)  # fmt: skip
    yield ("home_is_multicast", "ha1", bc, changed(a("ff02::1"), FRESH, 1, 40),
           Refusal.BAD_ADDRESS, c.BadArgument)  # fmt: skip
    yield ("home_not_subscribed", "ha1", bc, changed(a("2001:db8:1::99"), FRESH, 1, 40),
           Refusal.NOT_SUBSCRIBED, c.NotSubscribed)  # fmt: skip
    # Replays and sequence numbers (H1 last accepted 10; H2 last accepted 65530).
    for name, home, seq in (("replay", H1, 10), ("older", H1, 9), ("half_ahead", H1, 10 + 32768),
                            ("wrapped_behind", H1, 65535), ("h2_replay", H2, 65530),
                            ("h2_half_behind", H2, 65530 - 32768)):  # fmt: skip
        yield (f"seq_{name}", "ha1", bc, changed(home, FRESH, seq, 40),
               Refusal.STALE, c.Stale)  # fmt: skip
    for name, value in (("17_bits", b"65536"), ("negative", b"-1"), ("nan", b"nan"),
                        ("float", b"11.0")):  # fmt: skip
        yield (f"seq_{name}", "ha1", RawBindingChanged, raw(H1, FRESH, value, b"40"),
               Refusal.BAD_ARGUMENT, c.BadArgument)  # fmt: skip
    # Lifetimes.
    for name, value in (("negative", b"-4"), ("above_rfc_max", b"262141"),
                        ("huge", str(10**400).encode()), ("2_64", str(2**64).encode()),
                        ("nan", b"nan"), ("inf", b"inf"), ("float", b"1.5"), ("empty", b""),
                        ("5000_digits", b"4" * 5000), ("exponent", b"1e400")):  # fmt: skip
        yield (f"lifetime_{name}", "ha1", RawBindingChanged, raw(H1, FRESH, b"11", value),
               Refusal.BAD_LIFETIME, c.BadArgument)  # fmt: skip
    # Forged snapshots (the command succeeds; every entry is refused).
    bs = c.BindingSnapshot
    for name, binding, reason in (
        ("multicast", entry(H1, a("ff02::1"), 11, 40), Refusal.BAD_ADDRESS),
        ("backend", entry(H1, B2.packed, 11, 40), Refusal.LOCAL_ADDRESS),
        ("not_entitled", entry(a("2001:db8:99::1"), FRESH, 11, 40), Refusal.NOT_ENTITLED),
        ("stale", entry(H1, FRESH, 10, 40), Refusal.STALE),
        ("negative_lifetime", entry(H1, FRESH, 11, -1), Refusal.BAD_LIFETIME),
        ("huge_lifetime", entry(H1, FRESH, 11, 10**400), Refusal.BAD_LIFETIME),
        ("moves_victim", entry(H1, VICTIM, 11, 40), Refusal.NOT_OWNER),
        ("empty_care_of", entry(H1, b"", 11, 40), Refusal.BAD_ARGUMENT),
    ):
        yield (f"snapshot_{name}", "ha1", bs, {"bindings": [binding]}, reason, None)
    yield ("snapshot_missing_lifetime", "ha1", RawBindingSnapshot,
           {"bindings": [{"home": H1, "care_of": FRESH, "seq": b"11"}]},
           Refusal.BAD_ARGUMENT, c.BadArgument)  # fmt: skip
    # Protocol.
    yield ("unknown_command", "ha1", Unknown, {}, Refusal.PROTOCOL, amp.UnhandledCommand)


class ForgeryTests(SynchronousTestCase):
    """Every forged notification: refused, counted by its reason, all state unchanged."""

    def setUp(self) -> None:
        self.link = Link().start()
        self.link.follow()

    def test_setup(self) -> None:
        """The starting point: three followed terminals confirmed, nothing refused."""
        link = self.link
        self.assertEqual(link.client("ha1").machine.state, PeerState.SUBSCRIBED)
        self.assertEqual(link.client("t1").machine.state, PeerState.SUBSCRIBED)
        self.assertEqual(dict(link.paths.routes), {H1: COA1, H2: COA2, HT: COAT})
        self.assertEqual(link.notifier.counters.total(), 0)
        self.assertEqual(link.notifier.counters.accepted, 3)

    def check(self, case: Case) -> None:
        name, peer, command, arguments, reason, error = case
        link = self.link
        before, counts = link.state(), link.counts()
        accepted = link.notifier.counters.accepted
        results: list[Any] = []
        link.session(peer).callRemote(command, **arguments).addBoth(results.append)
        link.flush()
        self.assertEqual(len(results), 1, f"{name}: no answer")
        if error is None:
            self.assertEqual(results[0], {"accepted": 0, "refused": 1}, name)
        else:
            self.assertIsInstance(results[0], Failure, name)
            self.assertIsNotNone(results[0].check(error), f"{name}: {results[0]}")
        self.assertEqual(link.state(), before, name)
        expected = dict(counts)
        expected[reason] += 1
        self.assertEqual(link.counts(), expected, name)
        self.assertEqual(link.notifier.counters.accepted, accepted, name)
        self.assertEqual(link.client(peer).machine.state, PeerState.SUBSCRIBED, name)

    def test_every_forgery_refused(self) -> None:
        """At least 44 forged inputs, each refused by its reason with state unchanged; after
        all of them the same link still applies a legitimate move."""
        all_cases = list(cases())
        self.assertGreaterEqual(len(all_cases), 44)
        self.assertEqual(len({case[0] for case in all_cases}), len(all_cases))
        for case in all_cases:
            self.check(case)
        # Still working: a real move of H1 is applied, copying CoA1's backend.
        link = self.link
        link.caches["ha1"].update(H1, FRESH, 11, 40, link.clock.seconds())
        link.flush()
        moved = link.table.get(Key("src", FRESH))
        assert moved is not None
        self.assertEqual((moved.backend, link.paths.care_of(H1)), (B1, FRESH))

    def test_wrapped_sequence_accepted(self) -> None:
        """The control for the wrapped cases: 65530 -> 3 is newer (RFC 6275 §9.5.1)."""
        link = self.link
        link.caches["ha1"].update(H2, FRESH, 3, 40, link.clock.seconds())
        link.flush()
        self.assertEqual(link.paths.care_of(H2), FRESH)
        self.assertEqual(link.notifier.counters.total(), 0)

    def test_agent_old_care_of_not_believed(self) -> None:
        """A terminal naming another client's address as its *old* care-of address copies
        nothing from it: the move is the terminal's own (from its confirmed CoAT, backend
        b1), the victim's binding is neither read into the new entry nor changed."""
        link = self.link
        victim = link.table.get(Key("src", VICTIM))
        assert victim is not None
        victim_before = (victim.backend, victim.expires, victim.packets, victim.care_of)
        results: list[Any] = []
        link.session("t1").callRemote(
            c.BindingChanged, **changed(HT, FRESH, 101, 40, old=VICTIM)
        ).addBoth(results.append)
        link.flush()
        self.assertEqual(results, [{}])
        new = link.table.get(Key("src", FRESH))
        assert new is not None
        self.assertEqual(new.backend, B1)
        self.assertEqual((victim.backend, victim.expires, victim.packets, victim.care_of),
                         victim_before)  # fmt: skip

    def test_cross_terminal_move_back_allowed(self) -> None:
        """The entitlement rule does not stop a terminal's own moves: CoAT -> FRESH ->
        CoAT (claim 9's T235, back to an address whose entry still lives)."""
        link = self.link
        now = link.clock.seconds()
        link.caches["t1"].update(HT, FRESH, 101, 40, now)
        link.flush()
        link.caches["t1"].update(HT, COAT, 102, 40, now)
        link.flush()
        self.assertEqual(link.paths.care_of(HT), COAT)
        self.assertEqual(link.notifier.counters.total(), 0)

    def test_empty_box_drops_connection(self) -> None:
        """Garbage that makes AMP's parser raise (an empty box) ends the connection,
        counted ``protocol``; nothing raises, state unchanged; the client reconnects."""
        link = self.link
        before = link.state()
        session = link.session("ha1")
        assert session.transport is not None
        session.transport.write(b"\x00\x00")
        link.flush()
        self.assertEqual(link.notifier.counters[Refusal.PROTOCOL], 1)
        self.assertEqual(link.client("ha1").machine.state, PeerState.DISCONNECTED)
        # The agent's subscription ids died with the connection (they are sent again on
        # the next one); everything else is as it was.
        after = link.state()
        self.assertEqual(after[:2], before[:2])
        ha1 = [(*s[:7], None, *s[8:]) if s[0] == "ha1" else s for s in before[2]]
        self.assertEqual(after[2], ha1)
        link.clock.advance(1)
        link.flush()
        self.assertEqual(link.client("ha1").machine.state, PeerState.SUBSCRIBED)


class ForgedAnswerSession(AgentSession):
    """An agent whose Subscribe answers are replaced by ``Link.forged`` (when set)."""

    forged: dict[str, Any] | None = None

    @c.Subscribe.responder
    def subscribe(
        self, address: bytes, kind: str, on_change: bool, interval: Any
    ) -> dict[str, Any]:
        answer = super().subscribe(address, kind, on_change, interval)
        return answer if self.forged is None else {**answer, **self.forged}


class ForgedSubscribeAnswerTests(SynchronousTestCase):
    """Forged answers to Subscribe: refused by reason; the subscription stays pending."""

    def check(self, forged: dict[str, Any], reason: Refusal, home: bool = True) -> None:
        link = Link(agent_session=ForgedAnswerSession).start()
        link.follow()
        ForgedAnswerSession.forged = forged
        self.addCleanup(setattr, ForgedAnswerSession, "forged", None)
        before_table, before_paths = link.state()[:2]
        counts = link.counts()
        address = a("2001:db8:1::21") if home else a("2001:db8:a::21")
        link.caches["ha1"].update(a("2001:db8:1::21"), a("2001:db8:a::21"), 5, 40,
                                  link.clock.seconds())  # fmt: skip
        link.notifier.terminal_seen(address, home=home)
        link.flush()
        sub = link.notifier.subscriptions.get("ha1", address)
        assert sub is not None
        self.assertEqual((sub.confirmed, sub.sub_id, sub.seq), (False, None, None))
        self.assertEqual(link.state()[:2], (before_table, before_paths))
        expected = dict(counts)
        expected[reason] += 1
        if not home:  # the terminal agent is asked too, and does not know the address
            expected[Refusal.UNKNOWN_BINDING] += 1
        self.assertEqual(link.counts(), expected)

    def test_negative_lifetime(self) -> None:
        """A Subscribe answer with a negative lifetime."""
        self.check({"lifetime": -40}, Refusal.BAD_LIFETIME)

    def test_huge_lifetime(self) -> None:
        """A Subscribe answer with a lifetime of 10**400 s."""
        self.check({"lifetime": 10**400}, Refusal.BAD_LIFETIME)

    def test_another_home(self) -> None:
        """Asked about one home, the agent answers for another."""
        self.check({"home": H1}, Refusal.BAD_ARGUMENT)

    def test_multicast_care_of(self) -> None:
        """The current binding names a multicast care-of address."""
        self.check({"care_of": a("ff02::1")}, Refusal.BAD_ADDRESS)

    def test_backend_care_of(self) -> None:
        """The current binding names a backend as the care-of address."""
        self.check({"care_of": B1.packed}, Refusal.LOCAL_ADDRESS)

    def test_huge_sub_id(self) -> None:
        """A subscription id of 2**70."""
        self.check({"sub_id": 2**70}, Refusal.BAD_ARGUMENT)

    def test_no_seq_with_care_of(self) -> None:
        """"No binding known" (seq -1) with a care-of address."""
        self.check({"seq": -1}, Refusal.BAD_ARGUMENT)

    def test_seq_out_of_range(self) -> None:
        """A sequence number of 70000."""
        self.check({"seq": 70000}, Refusal.BAD_ARGUMENT)

    def test_care_of_answer_for_another_address(self) -> None:
        """Asked about a care-of address, the agent answers with another one."""
        self.check({"care_of": FRESH}, Refusal.BAD_ARGUMENT, home=False)

    def test_home_outside_prefix(self) -> None:
        """Asked about a care-of address, the agent names a home outside its prefixes."""
        self.check({"home": a("2001:db8:99::21")}, Refusal.NOT_ENTITLED, home=False)


class FloodTests(SynchronousTestCase):
    """Subscription floods from one source, at both ends."""

    def test_balancer_registry_bound(self) -> None:
        """1,000 first packets from one source, each with another home address: at most
        ``max_subscriptions`` open; each one past the bound either pushed out an older
        probationary one (evicted, unsubscribed) or, when none was left, was refused --
        both counted; what was followed (a reported binding) stays followed."""
        link = Link(max_subscriptions=20).start()
        link.follow()
        before = link.state()
        base = int(ipaddress.IPv6Address("2001:db8:1::1000"))
        for i in range(1000):
            link.notifier.terminal_seen(ipaddress.IPv6Address(base + i).packed, home=True)
        link.flush()
        self.assertEqual(len(link.notifier.subscriptions), 20)
        refused = link.notifier.counters[Refusal.TOO_MANY_SUBSCRIPTIONS]
        evicted = link.notifier.lifecycle_counts()["evicted"]
        self.assertGreater(evicted, 0)
        self.assertGreaterEqual(refused + evicted, 1000 - 19)  # 19 places besides the followed
        after_subs = {s[:3]: s for s in link.state()[2]}
        for sub in before[2]:
            self.assertEqual(after_subs[sub[:3]], sub)
        self.assertEqual(link.state()[:2], before[:2])

    def test_agent_bound_per_connection(self) -> None:
        """One balancer connection asking an agent for more than its bound: refused and
        counted at the agent; the first 50 stay."""
        link = Link().start()
        link.follow()
        session_before = len(link.session("ha1").subscriptions)
        link.notifier.subscriptions.max_entries = 10_000
        base = int(ipaddress.IPv6Address("2001:db8:1::1000"))
        for i in range(100):
            link.notifier.terminal_seen(ipaddress.IPv6Address(base + i).packed, home=True)
        link.flush()
        agent = link.agents["ha1"]
        self.assertEqual(len(link.session("ha1").subscriptions), 50)
        refused = 100 - (50 - session_before)
        self.assertEqual(agent.counters[Refusal.TOO_MANY_SUBSCRIPTIONS], refused)


# -- certificates ---------------------------------------------------------------------------

OTHER_CA = CertificateAuthority("another CA")
SAME_NAME_CA = CertificateAuthority("lbproxy test CA")  # the real CA's name, another key


def self_signed(ca: CertificateAuthority) -> Issued:
    """A CA's own certificate and key, presented as a leaf."""
    from cryptography.hazmat.primitives import serialization

    key = ca.key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                               serialization.NoEncryption())  # fmt: skip
    return Issued(ca.cert_pem, key)


def material(issued: Issued, ca: CertificateAuthority = CA) -> TlsMaterial:
    return TlsMaterial.from_pem(ca.cert_pem, issued.cert_pem, issued.key_pem)


@implementer(IOpenSSLClientConnectionCreator, IOpenSSLServerConnectionCreator)
class Tls11:
    """TLS 1.1 at most, with the security level lowered so that this OpenSSL speaks it."""

    def __init__(self, issued: Issued | None, minimum: int = SSL.TLS1_VERSION) -> None:
        from OpenSSL import crypto

        self.context = SSL.Context(SSL.TLS_METHOD)
        self.context.set_cipher_list(b"DEFAULT:@SECLEVEL=0")
        self.context.set_min_proto_version(minimum)
        self.context.set_max_proto_version(SSL.TLS1_1_VERSION)
        if issued is not None:
            self.context.use_certificate(crypto.load_certificate(crypto.FILETYPE_PEM,
                                                                 issued.cert_pem))  # fmt: skip
            self.context.use_privatekey(crypto.load_privatekey(crypto.FILETYPE_PEM,
                                                               issued.key_pem))  # fmt: skip

    def clientConnectionForTLS(self, tls: Any) -> SSL.Connection:
        return SSL.Connection(self.context, None)

    def serverConnectionForTLS(self, tls: Any) -> SSL.Connection:
        return SSL.Connection(self.context, None)


@implementer(IOpenSSLClientConnectionCreator)
class NoClientCertificate:
    """A client trusting the CA and presenting no certificate."""

    def __init__(self) -> None:
        from twisted.internet import ssl

        self.options = ssl.CertificateOptions(trustRoot=ssl.Certificate.loadPEM(CA.cert_pem))

    def clientConnectionForTLS(self, tls: Any) -> SSL.Connection:
        return self.options.clientConnectionForTLS(tls)


def handshake(server: Any, client: Any) -> str:
    """A memory-BIO handshake between two connection creators: the version, or the error."""
    s, cl = server.serverConnectionForTLS(None), client.clientConnectionForTLS(None)
    s.set_accept_state()
    cl.set_connect_state()
    for _ in range(20):
        for one, other in ((cl, s), (s, cl)):
            try:
                one.do_handshake()
            except SSL.WantReadError:
                pass
            except SSL.Error as e:
                return f"failed: {e}"
            with contextlib.suppress(SSL.WantReadError):
                other.bio_write(one.bio_read(65536))
    return str(cl.get_protocol_version_name())


class BalancerRefusesAgentCertificateTests(SynchronousTestCase):
    """The balancer dials ha1 (or t1), which presents a certificate that proves nothing."""

    def check(self, reason: Refusal, ha1: Issued = HA1, t1: Issued = T1, peer: str = "ha1",
              **link: Any) -> Link:  # fmt: skip
        lk = Link(ha1_cert=ha1, t1_cert=t1, **link).start()
        lk.follow()
        client = lk.client(peer)
        self.assertEqual(client.connections, 0)
        self.assertNotEqual(client.machine.state, PeerState.HANDSHAKEN)
        self.assertNotIn(client.machine.state, (PeerState.HANDSHAKEN, PeerState.SUBSCRIBED))
        self.assertEqual(lk.agents[peer].sessions, set())
        self.assertEqual(lk.notifier.counters[reason], 1, lk.counts())
        others = {r: n for r, n in lk.counts().items() if n and r is not reason}
        self.assertEqual(others, {}, others)
        self.assertEqual(
            sorted(h for h, _, _ in lk.paths.items()),
            sorted(h for h in (H1, H2, HT) if (h == HT) != (peer == "t1")),
        )
        return lk

    def test_no_subject_alt_name(self) -> None:
        """Right CA, the right name as common name only, no subjectAltName."""
        self.check(Refusal.WRONG_IDENTITY, ha1=CA.issue(common_name="ha1.test"))

    def test_bare_wildcard(self) -> None:
        """Right CA, subjectAltName ``*.test`` only."""
        self.check(Refusal.WRONG_IDENTITY, ha1=CA.issue(dns=["*.test"], common_name="ha1.test"))

    def test_wildcard_that_service_identity_accepts(self) -> None:
        """``*.lbproxy.test`` for identity ``ha1.lbproxy.test``: service_identity calls it a
        match (RFC 6125); here no wildcard proves a peer's identity."""
        from service_identity.hazmat import DNS_ID, DNSPattern

        self.assertTrue(DNS_ID("ha1.lbproxy.test").verify(DNSPattern.from_bytes(b"*.lbproxy.test")))
        self.check(Refusal.WRONG_IDENTITY, ha1=CA.issue(dns=["*.lbproxy.test"]),
                   ha1_identity="ha1.lbproxy.test")  # fmt: skip
        control = Link(ha1_cert=CA.issue(dns=["ha1.lbproxy.test"]),
                       ha1_identity="ha1.lbproxy.test").start()  # fmt: skip
        self.assertEqual(control.client("ha1").connections, 1)

    def test_wrong_name(self) -> None:
        """Right CA, another agent's name."""
        self.check(Refusal.WRONG_IDENTITY, ha1=CA.issue(dns=["ha2.test"]))

    def test_client_usage_only(self) -> None:
        """Right CA and name, extended key usage clientAuth only (not serverAuth)."""
        self.check(Refusal.WRONG_USAGE, ha1=CA.issue(dns=["ha1.test"], usages=["client"]))

    def test_no_extended_key_usage(self) -> None:
        """Right CA and name, no extended key usage at all."""
        self.check(Refusal.WRONG_USAGE, ha1=CA.issue(dns=["ha1.test"], usages=None))

    def test_ca_certificate_as_peer(self) -> None:
        """Right CA, name and usage, but basicConstraints CA:TRUE."""
        self.check(Refusal.WRONG_USAGE, ha1=CA.issue(dns=["ha1.test"], ca=True))

    def test_expired(self) -> None:
        """Right CA and name, expired yesterday."""
        self.check(Refusal.TLS_FAILED, ha1=CA.issue(dns=["ha1.test"], starts=-3 * 86400, days=-1))

    def test_not_yet_valid(self) -> None:
        """Right CA and name, valid from tomorrow."""
        self.check(Refusal.TLS_FAILED, ha1=CA.issue(dns=["ha1.test"], starts=86400, days=3))

    def test_other_ca(self) -> None:
        """Right name, another CA."""
        lk = Link(ha1_server=lambda agent: agent.tls_factory(
            material(OTHER_CA.issue(dns=["ha1.test"]), OTHER_CA))).start()  # fmt: skip
        self.assertEqual(lk.client("ha1").connections, 0)
        self.assertEqual(lk.notifier.counters[Refusal.TLS_FAILED], 1)

    def test_ca_with_the_same_name(self) -> None:
        """Right name, a CA with our CA's name but another key."""
        lk = Link(ha1_server=lambda agent: agent.tls_factory(
            material(SAME_NAME_CA.issue(dns=["ha1.test"]), SAME_NAME_CA))).start()  # fmt: skip
        self.assertEqual(lk.client("ha1").connections, 0)
        self.assertEqual(lk.notifier.counters[Refusal.TLS_FAILED], 1)

    def test_self_signed(self) -> None:
        """A self-signed certificate (a CA of its own)."""
        lk = Link(ha1_server=lambda agent: agent.tls_factory(
            material(self_signed(OTHER_CA), OTHER_CA))).start()  # fmt: skip
        self.assertEqual(lk.client("ha1").connections, 0)
        self.assertEqual(lk.notifier.counters[Refusal.TLS_FAILED], 1)

    def test_tls_1_1(self) -> None:
        """An agent that speaks TLS 1.1 at most (this OpenSSL can, see the control)."""
        self.assertEqual(handshake(Tls11(HA1), Tls11(None)), "TLSv1.1")  # the control
        lk = Link(ha1_server=lambda agent: TLSMemoryBIOFactory(
            Tls11(HA1), False, agent.factory(), clock=agent.clock)).start()  # fmt: skip
        self.assertEqual(lk.client("ha1").connections, 0)
        self.assertEqual(lk.notifier.counters[Refusal.TLS_FAILED], 1)

    def test_plaintext(self) -> None:
        """An agent speaking AMP without TLS."""
        lk = Link(ha1_server=lambda agent: agent.factory()).start()
        self.assertEqual(lk.client("ha1").connections, 0)
        self.assertEqual(lk.notifier.counters[Refusal.TLS_FAILED], 1)

    def test_terminal_without_home_address(self) -> None:
        """A terminal's certificate without its home address as an IP subjectAltName."""
        self.check(Refusal.WRONG_IDENTITY, t1=CA.issue(dns=["t1.test"]), peer="t1")

    def test_terminal_with_another_home_address(self) -> None:
        """A terminal's certificate carrying another terminal's home address."""
        self.check(Refusal.WRONG_IDENTITY, t1=CA.issue(dns=["t1.test"], ips=["2001:db8:1::11"]),
                   peer="t1")  # fmt: skip

    def test_valid_certificates_accepted(self) -> None:
        """The control: the same link with good certificates connects and subscribes."""
        lk = Link().start()
        lk.follow()
        self.assertEqual(lk.client("ha1").connections, 1)
        self.assertEqual(lk.notifier.counters.total(), 0)


class AgentRefusesBalancerCertificateTests(SynchronousTestCase):
    """A balancer (or something claiming to be one) dials ha1 with a certificate that proves
    nothing: the agent refuses it; no session, no subscription."""

    def agent(self) -> tuple[NotificationAgent, Clock]:
        clock = Clock()
        agent = NotificationAgent(BindingCache(), PrefixEntitlement.of([PREFIX]), ("lb1.test",),
                                  clock)  # fmt: skip
        agent.cache.update(H1, COA1, 10, 400, clock.seconds())
        return agent, clock

    def check_balancer(
        self, issued: Issued, reason: Refusal, ca: CertificateAuthority = CA
    ) -> None:
        agent, clock = self.agent()
        endpoint = PumpedEndpoint(agent.tls_factory(CA.material(HA1)), clock)
        listener = RecordingListener()
        notifier = Notifier([(Peer.home_agent("ha1", "ha1.test", [PREFIX]), endpoint)],
                            material(issued, ca), listener, clock)  # fmt: skip
        notifier.startService()
        notifier.terminal_seen(H1, home=True)
        for _ in range(3):
            endpoint.flush()
        self.assertEqual(agent.sessions, set())
        self.assertEqual(agent.counters[reason], 1, agent.counters.counts)
        self.assertEqual(agent.counters.total(), 1)
        self.assertEqual(notifier.counters.accepted, 0)
        self.assertEqual(listener.changes, [])

    def check_raw(self, creator: Any, reason: Refusal) -> None:
        agent, clock = self.agent()
        client = TLSMemoryBIOFactory(creator, True, Factory.forProtocol(amp.AMP), clock=clock)
        pumped(client, agent.tls_factory(CA.material(HA1)), clock)
        self.assertEqual(agent.sessions, set())
        self.assertEqual(agent.counters[reason], 1, agent.counters.counts)
        self.assertEqual(agent.counters.total(), 1)

    def test_no_client_certificate(self) -> None:
        """A client that presents no certificate."""
        self.check_raw(NoClientCertificate(), Refusal.TLS_FAILED)

    def test_tls_1_1(self) -> None:
        """A client that speaks TLS 1.1 at most, with a good certificate."""
        self.check_raw(Tls11(BALANCER), Refusal.TLS_FAILED)

    def test_no_subject_alt_name(self) -> None:
        """Right CA, the allowed name as common name only."""
        self.check_balancer(CA.issue(common_name="lb1.test"), Refusal.WRONG_IDENTITY)

    def test_bare_wildcard(self) -> None:
        """Right CA, ``*.test`` only."""
        self.check_balancer(CA.issue(dns=["*.test"]), Refusal.WRONG_IDENTITY)

    def test_wrong_name(self) -> None:
        """Right CA, a balancer that is not in the allowed list."""
        self.check_balancer(CA.issue(dns=["lb2.test"]), Refusal.WRONG_IDENTITY)

    def test_server_usage_only(self) -> None:
        """Right CA and name, serverAuth only (a balancer dials: it needs clientAuth)."""
        self.check_balancer(CA.issue(dns=["lb1.test"], usages=["server"]), Refusal.WRONG_USAGE)

    def test_expired(self) -> None:
        """Right CA and name, expired."""
        self.check_balancer(CA.issue(dns=["lb1.test"], starts=-3 * 86400, days=-1),
                            Refusal.TLS_FAILED)  # fmt: skip

    def test_other_ca(self) -> None:
        """Right name, another CA."""
        self.check_balancer(OTHER_CA.issue(dns=["lb1.test"]), Refusal.TLS_FAILED, OTHER_CA)
