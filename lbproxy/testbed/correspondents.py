"""A mobile node's registration with one correspondent node (RFC 6275 §11.6, §11.7.2).

The terminal emulator's RFC mode keeps one :class:`Registration` per terminal and
correspondent (the virtual address).  It is what a real mobile node does before it may
put a Home Address Option on a packet to a correspondent:

1. until a binding exists at the correspondent, everything to it is reverse-tunnelled
   through the home agent (:meth:`Registration.optimised` is false);
2. return routability: a Home Test Init through the home agent and a Care-of Test Init
   directly from the care-of address; the Home Test (tunnelled back by the home agent)
   and the Care-of Test must echo the init cookies; a home keygen token is reused while
   younger than MAX_TOKEN_LIFETIME, so after a move only the care-of test is redone;
3. a Binding Update authorised with Kbm = SHA1(home token | care-of token), A bit set,
   a fresh sequence number each time it is sent, retransmitted with a doubling timeout;
4. a Binding Acknowledgement whose sequence number matches and whose authenticator
   verifies with the same Kbm makes the binding: from then on packets to the
   correspondent go route-optimised (HAO, source the care-of address), until the
   terminal moves (the binding names the old care-of address) or a Binding Error says
   the correspondent has none.

Pure: no sockets, no timers.  Every method takes ``now`` and returns the packets to
send as :class:`Outgoing`; :attr:`Registration.deadline` says when :meth:`timeout` wants
to run next.  It also keeps the evidence the bed tests read: per care-of address (an
*epoch*) when the Binding Update went out and the Acknowledgement came, and how many
replies arrived tunnelled and how many with a Type 2 Routing Header, before and after it.
"""

from __future__ import annotations

import hmac
import os
from collections.abc import Callable
from ipaddress import IPv6Address
from typing import Any

import attrs

from lbproxy.testbed import packets, rrmessages

#: §12: a keygen token may be used for MAX_TOKEN_LIFETIME (210 s); stay clear of it.
HOME_TOKEN_REUSE = 200.0
#: §11.8: INITIAL_BINDACK_TIMEOUT, doubled up to MAX_BINDACK_TIMEOUT (32 s).
RETRANSMIT = (1.0, 2.0, 4.0, 8.0, 16.0, 32.0)
#: Epochs kept per registration (the oldest go first).
MAX_EPOCHS = 32

IDLE = "idle"  # no binding and nothing under way (tunnelling)
TESTING = "testing"  # HoTI/CoTI sent, waiting for HoT/CoT
UPDATING = "updating"  # BU sent, waiting for the BA
BOUND = "bound"  # the correspondent holds our binding
FAILED = "failed"  # no answer after every retransmission: tunnel until the next move
UNSUPPORTED = "unsupported"  # a Binding Error said the correspondent lacks MIPv6


@attrs.frozen
class Outgoing:
    """A packet to send: ``via_home_agent`` ones are reverse-tunnelled from the care-of
    address to the home agent, the others go as they are from the care-of address."""

    packet: bytes
    via_home_agent: bool
    kind: str  # "hoti", "coti", "bu"


@attrs.define
class Epoch:
    """What happened while the terminal was at one care-of address."""

    care_of: bytes
    started: float
    bu_at: float | None = None
    ba_at: float | None = None
    seq: int | None = None
    tunnelled_before_ba: int = 0
    tunnelled_after_ba: int = 0
    rh2_before_ba: int = 0
    rh2_after_ba: int = 0
    first_rh2_at: float | None = None  # the first route-optimised reply after the BA
    last_tunnelled_at: float | None = None  # the last reply through the home agent

    def describe(self) -> dict[str, Any]:
        def rel(t: float | None) -> float | None:
            return None if t is None else round(t - self.started, 4)

        return {"coa": str(IPv6Address(self.care_of)), "bu_at": rel(self.bu_at),
                "ba_at": rel(self.ba_at), "seq": self.seq,
                "tunnelled_before_ba": self.tunnelled_before_ba,
                "tunnelled_after_ba": self.tunnelled_after_ba,
                "rh2_before_ba": self.rh2_before_ba, "rh2_after_ba": self.rh2_after_ba,
                # seconds relative to the BA (negative: before it)
                "first_rh2_rel_ba": self._rel_ba(self.first_rh2_at),
                "last_tunnelled_rel_ba": self._rel_ba(self.last_tunnelled_at)}

    def _rel_ba(self, t: float | None) -> float | None:
        return None if t is None or self.ba_at is None else round(t - self.ba_at, 4)


class Registration:
    """One terminal's registration with one correspondent (module docstring)."""

    def __init__(self, hoa: bytes, correspondent: bytes, care_of: bytes, now: float,
                 seq: int | None = None, lifetime: int = rrmessages.MAX_RR_BINDING_LIFETIME,
                 random_bytes: Callable[[int], bytes] = os.urandom) -> None:
        self.hoa = hoa
        self.correspondent = correspondent
        self.lifetime = lifetime
        self.random_bytes = random_bytes
        self.seq = int.from_bytes(random_bytes(2), "big") if seq is None else seq & 0xFFFF
        self.state = IDLE
        self.created = now  # first contact
        self.care_of = care_of  # where the terminal is now
        self.attempt = 0
        self.deadline: float | None = None
        self.home_cookie: bytes | None = None
        self.care_of_cookie: bytes | None = None
        self.home_token: bytes | None = None
        self.home_index = 0
        self.home_token_at = 0.0
        self.care_of_token: bytes | None = None
        self.care_of_index = 0
        self.kbm: bytes | None = None
        self.bound_care_of: bytes | None = None
        self.bound_until = 0.0
        self.granted = 0
        self.epochs = [Epoch(care_of, now)]
        self.counters: dict[str, int] = {}

    def _count(self, what: str) -> None:
        self.counters[what] = self.counters.get(what, 0) + 1

    @property
    def epoch(self) -> Epoch:
        return self.epochs[-1]

    # -- what the emulator asks --------------------------------------------------------

    def optimised(self, care_of: bytes, now: float) -> bool:
        """May a packet from ``care_of`` carry an HAO to this correspondent now?"""
        return self.bound_care_of == care_of and now < self.bound_until

    def wants_start(self) -> bool:
        """Is there nothing under way and nothing that rules return routability out?"""
        return self.state == IDLE

    # -- transitions -------------------------------------------------------------------

    def begin(self, now: float) -> list[Outgoing]:
        """Start return routability at the current care-of address (from IDLE, FAILED or
        BOUND for a refresh); a home token younger than HOME_TOKEN_REUSE is kept."""
        if self.state == UNSUPPORTED:
            return []
        self.state = TESTING
        self.attempt = 0
        self.kbm = None
        self.care_of_token = None
        if self.home_token is not None and now - self.home_token_at >= HOME_TOKEN_REUSE:
            self.home_token = None
        self.home_cookie = None if self.home_token is not None else self.random_bytes(8)
        self.care_of_cookie = self.random_bytes(8)
        self._count("rr-started")
        return self._tests(now)

    def _tests(self, now: float) -> list[Outgoing]:
        out = []
        if self.home_token is None and self.home_cookie is not None:
            out.append(Outgoing(rrmessages.home_test_init(
                self.hoa, self.correspondent, self.home_cookie), True, "hoti"))
            self._count("hoti-sent")
        if self.care_of_token is None and self.care_of_cookie is not None:
            out.append(Outgoing(rrmessages.care_of_test_init(
                self.care_of, self.correspondent, self.care_of_cookie), False, "coti"))
            self._count("coti-sent")
        self.deadline = now + RETRANSMIT[min(self.attempt, len(RETRANSMIT) - 1)]
        return out

    def moved(self, care_of: bytes, now: float) -> None:
        """The terminal is at ``care_of`` now: the binding (for the old address) no longer
        serves, the care-of token is void; a new epoch starts.  Return routability waits
        for :meth:`begin` (the emulator calls it once the home agent has the new address,
        which the Home Test Init needs)."""
        if care_of == self.care_of:
            return
        self.care_of = care_of
        self.care_of_token = None
        self.care_of_cookie = None
        self.kbm = None
        self.deadline = None
        if self.state != UNSUPPORTED:
            self.state = IDLE
        self.epochs.append(Epoch(care_of, now))
        del self.epochs[:-MAX_EPOCHS]

    def timeout(self, now: float) -> list[Outgoing]:
        """The deadline passed: retransmit (with a doubled timeout), give up after the
        last, or refresh a binding that is about to run out."""
        self.deadline = None
        if self.state == BOUND:
            self._count("refresh")
            return self.begin(now)
        if self.state not in (TESTING, UPDATING):
            return []
        self.attempt += 1
        if self.attempt >= len(RETRANSMIT):
            self._count("gave-up")
            self.state = FAILED
            return []
        self._count("retransmit")
        if self.state == TESTING:
            return self._tests(now)
        return [self._binding_update(now)]

    def _binding_update(self, now: float) -> Outgoing:
        """A Binding Update with the next sequence number (each transmission gets its own,
        §11.7.2), authorised by Kbm."""
        assert self.kbm is not None
        self.state = UPDATING
        self.seq = (self.seq + 1) & 0xFFFF
        epoch = self.epoch
        if epoch.bu_at is None:
            epoch.bu_at = now
        epoch.seq = self.seq
        self.deadline = now + RETRANSMIT[min(self.attempt, len(RETRANSMIT) - 1)]
        self._count("bu-sent")
        return Outgoing(rrmessages.correspondent_binding_update(
            self.care_of, self.correspondent, self.hoa, self.seq, self.lifetime,
            self.home_index, self.care_of_index, self.kbm), False, "bu")

    def received(self, message: rrmessages.Message, now: float) -> list[Outgoing]:
        """A message from the correspondent: HoT (already untunnelled), CoT, BA or BE."""
        if not message.checksum_ok:
            self._count("bad-checksum")
            return []
        if message.src != self.correspondent:
            self._count("foreign-source")
            return []
        handler = {rrmessages.MH_HOT: self._home_test, rrmessages.MH_COT: self._care_of_test,
                   rrmessages.MH_BA: self._acknowledgement,
                   rrmessages.MH_BE: self._error}.get(message.mh_type)
        if handler is None:
            self._count("unexpected-type")
            return []
        return handler(message, now)

    def _home_test(self, message: rrmessages.Message, now: float) -> list[Outgoing]:
        if self.state != TESTING or self.home_cookie is None or message.dst != self.hoa \
                or not _same(message.cookie, self.home_cookie):
            self._count("hot-unexpected")
            return []
        self._count("hot")
        self.home_token, self.home_index, self.home_token_at = message.token, message.index, now
        self.home_cookie = None
        return self._tested(now)

    def _care_of_test(self, message: rrmessages.Message, now: float) -> list[Outgoing]:
        if self.state != TESTING or self.care_of_cookie is None \
                or message.dst != self.care_of or not _same(message.cookie,
                                                            self.care_of_cookie):
            self._count("cot-unexpected")
            return []
        self._count("cot")
        self.care_of_token, self.care_of_index = message.token, message.index
        self.care_of_cookie = None
        return self._tested(now)

    def _tested(self, now: float) -> list[Outgoing]:
        if self.home_token is None or self.care_of_token is None:
            return []
        self.kbm = rrmessages.binding_key(self.home_token, self.care_of_token)
        self.attempt = 0
        return [self._binding_update(now)]

    def _acknowledgement(self, message: rrmessages.Message, now: float) -> list[Outgoing]:
        # A BA 135 carries the correspondent's last accepted number, any other ours.
        if self.state != UPDATING or message.dst != self.care_of or message.home != self.hoa \
                or (message.seq != self.seq
                    and message.status != rrmessages.BA_SEQ_OUT_OF_WINDOW):
            self._count("ba-unexpected")
            return []
        if message.status in (rrmessages.BA_EXPIRED_HOME_NONCE,
                              rrmessages.BA_EXPIRED_CARE_OF_NONCE, rrmessages.BA_EXPIRED_NONCES):
            # No authenticator is possible here (the correspondent cannot build Kbm): a
            # forged one only makes us test again.
            self._count(f"ba-status-{message.status}")
            if message.status != rrmessages.BA_EXPIRED_CARE_OF_NONCE:
                self.home_token = None
            return self.begin(now)
        assert self.kbm is not None
        if not message.authenticated(self.kbm, self.care_of, self.correspondent):
            self._count("ba-bad-authenticator")
            return []
        if message.status == rrmessages.BA_SEQ_OUT_OF_WINDOW:
            self._count("ba-status-135")
            self.seq = message.seq  # §11.7.1: go on above the correspondent's number
            self.attempt = 0
            return [self._binding_update(now)]
        if message.status >= 128:
            self._count(f"ba-status-{message.status}")
            self.state = FAILED
            self.deadline = None
            return []
        self._count("ba")
        self.state = BOUND
        self.granted = message.lifetime
        self.bound_care_of = self.care_of
        self.bound_until = now + 4 * message.lifetime
        if self.epoch.ba_at is None:  # a refresh keeps the epoch's first BA
            self.epoch.ba_at = now
        # refresh well before it runs out (a zero lifetime: nothing to refresh)
        self.deadline = now + 3.2 * message.lifetime if message.lifetime else None
        return []

    def _error(self, message: rrmessages.Message, now: float) -> list[Outgoing]:
        if message.dst != self.care_of or message.error_home != self.hoa:
            self._count("be-unexpected")
            return []
        self._count(f"be-status-{message.status}")
        if message.status == rrmessages.BE_UNKNOWN_MH_TYPE:
            self.state = UNSUPPORTED
            self.deadline = None
            self.bound_care_of = None
            return []
        # §11.3.6: the correspondent has no binding for us: tunnel, and register again.
        self.bound_care_of = None
        if self.state in (BOUND, IDLE, FAILED):
            self.state = IDLE
        return []

    # -- replies -----------------------------------------------------------------------

    def reply(self, how: str, care_of: bytes, now: float) -> None:
        """Count a reply from the correspondent that arrived at ``care_of``, ``how`` being
        ``"rh2"`` (route-optimised) or ``"tunnel"`` (through the home agent)."""
        epoch = self.epoch
        if epoch.care_of != care_of:
            self._count(f"{how}-other-care-of")
            return
        after = epoch.ba_at is not None
        self._count(f"{how}-{'after' if after else 'before'}-ba")
        if how == "rh2":
            if after:
                epoch.rh2_after_ba += 1
                if epoch.first_rh2_at is None:
                    epoch.first_rh2_at = now
            else:
                epoch.rh2_before_ba += 1
        else:
            if after:
                epoch.tunnelled_after_ba += 1
            else:
                epoch.tunnelled_before_ba += 1
            epoch.last_tunnelled_at = now

    def describe(self, now: float, secrets: bool = False) -> dict[str, Any]:
        """The registration for the control socket; ``secrets`` adds Kbm and the nonce
        indices (the bed tests forge Binding Updates with them)."""
        result: dict[str, Any] = {
            "correspondent": str(IPv6Address(self.correspondent)), "state": self.state,
            "seq": self.seq, "optimised": self.optimised(self.care_of, now),
            "bound_coa": str(IPv6Address(self.bound_care_of)) if self.bound_care_of else None,
            "granted": self.granted, "counters": dict(self.counters),
            "epochs": [e.describe() for e in self.epochs]}
        if secrets:
            result.update(kbm=self.kbm.hex() if self.kbm else None,
                          home_index=self.home_index, care_of_index=self.care_of_index)
        return result


def _same(a: bytes, b: bytes) -> bool:
    return hmac.compare_digest(a, b)


class Registrations:
    """Every terminal's registrations with its correspondents: the RFC mode's state.

    The terminal emulator (:class:`lbproxy.testbed.terminal.MobileNodes`) asks
    :meth:`route` for each packet to a route-optimisable destination and hands it the
    correspondents' messages and replies.  What to send piles up in :attr:`to_send`
    (``(link, packet)``); :attr:`touched` names the registrations whose deadline may have
    changed and :attr:`wanted` those ready for return routability (the program around
    starts those, after ``delay`` seconds from first contact, once the terminal's home
    registration is done: the Home Test Init goes through the home agent).
    """

    def __init__(self, home_agent: bytes, delay: float = 0.0,
                 random_bytes: Callable[[int], bytes] = os.urandom) -> None:
        self.home_agent = home_agent
        self.delay = delay
        self.random_bytes = random_bytes
        self.by_key: dict[tuple[int, bytes], Registration] = {}
        self.terminals: dict[int, Any] = {}  # index -> lbproxy.testbed.terminal.Terminal
        self.binding_errors: dict[int, int] = {}
        self.to_send: list[tuple[int, bytes]] = []
        self.touched: set[tuple[int, bytes]] = set()
        self.wanted: set[tuple[int, bytes]] = set()

    def _emit(self, terminal: Any, outgoing: list[Outgoing]) -> None:
        for item in outgoing:
            packet = item.packet
            if item.via_home_agent:
                packet = packets.encapsulate(packet, terminal.care_of(), self.home_agent)
            self.to_send.append((terminal.link, packet))

    def _settled(self, terminal: Any, key: tuple[int, bytes], registration: Registration
                 ) -> None:
        self.touched.add(key)
        if registration.wants_start() and terminal.registered:
            self.wanted.add(key)

    def route(self, terminal: Any, correspondent: bytes, now: float) -> bool:
        """May this packet to ``correspondent`` go route-optimised (HAO)?  If not, it is
        tunnelled, and a registration is created or marked wanted as needed."""
        key = (terminal.index, correspondent)
        registration = self.by_key.get(key)
        if registration is None:
            registration = Registration(terminal.hoa, correspondent, terminal.care_of(), now,
                                        random_bytes=self.random_bytes)
            self.by_key[key] = registration
            self.terminals[terminal.index] = terminal
        if registration.optimised(terminal.care_of(), now):
            return True
        if registration.wants_start() and terminal.registered and key not in self.wanted:
            self.wanted.add(key)
        return False

    def of(self, terminal: Any) -> list[tuple[tuple[int, bytes], Registration]]:
        return [(key, r) for key, r in self.by_key.items() if key[0] == terminal.index]

    def moved(self, terminal: Any, now: float) -> None:
        """The terminal has a new care-of address: every binding of it is void."""
        for key, registration in self.of(terminal):
            registration.moved(terminal.care_of(), now)
            self.wanted.discard(key)
            self.touched.add(key)

    def home_registered(self, terminal: Any) -> None:
        """The home agent acknowledged: return routability may start (again)."""
        for key, registration in self.of(terminal):
            if registration.wants_start():
                self.wanted.add(key)

    def begin(self, key: tuple[int, bytes], now: float) -> None:
        registration = self.by_key.get(key)
        terminal = self.terminals.get(key[0])
        self.wanted.discard(key)
        if registration is None or terminal is None or not registration.wants_start() \
                or not terminal.registered:
            return
        self._emit(terminal, registration.begin(now))
        self.touched.add(key)

    def timeout(self, key: tuple[int, bytes], now: float) -> None:
        registration = self.by_key.get(key)
        if registration is not None:
            terminal = self.terminals[key[0]]
            self._emit(terminal, registration.timeout(now))
            self._settled(terminal, key, registration)

    def received(self, terminal: Any, message: rrmessages.Message, now: float) -> str:
        """A Mobility Header message from a correspondent, at the terminal's current
        care-of address; what it was, for the emulator's counters."""
        if message.mh_type == rrmessages.MH_BE and message.checksum_ok \
                and message.error_home == terminal.hoa:
            self.binding_errors[terminal.index] = self.binding_errors.get(terminal.index, 0) + 1
        key = (terminal.index, message.src)
        registration = self.by_key.get(key)
        if registration is None:
            return f"mh{message.mh_type}-no-registration"
        self._emit(terminal, registration.received(message, now))
        self._settled(terminal, key, registration)
        return f"mh{message.mh_type}"

    def reply(self, terminal: Any, correspondent: bytes, how: str, now: float) -> None:
        """Count a packet from ``correspondent`` that reached the terminal ``how``."""
        registration = self.by_key.get((terminal.index, correspondent))
        if registration is not None:
            registration.reply(how, terminal.care_of(), now)

    def describe(self, terminal: Any, now: float, secrets: bool = False) -> dict[str, Any]:
        """The terminal's RFC-mode view: Binding Errors received, its registrations."""
        return {"binding_errors": self.binding_errors.get(terminal.index, 0),
                "correspondents": [r.describe(now, secrets) for _, r in self.of(terminal)]}
