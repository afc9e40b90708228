"""A terminal's journey: a bounded ring of what happened to each terminal, for operators.

Why this exists: an operator debugging "my session broke when I moved" needs the story of
one terminal -- its care-of addresses over time, its backend, the notifications and
confirmations, the drops -- not the table as it is now.  `Journeys` keeps that story for
the terminals seen last, as events with a time from the injected clock, and
``lbproxyctl journey KEY`` prints it, writes it as a pcap-ng and draws it
(`lbproxy.ops.journeyfiles`; docs/journey.md).

Theory of operation
-------------------
*Where events come from.*  Nothing here runs per forwarded packet: the fast path, the XDP
program and the general path's hits never call it.  Events are recorded only where
something changes, which are slow branches already:

- the sticky table's ``listeners`` (`table_changed`): a binding made (``created``), an
  identity linked to it or unlinked (``linked``, ``unlinked``), its backend changed
  (``backend``; with the cause when one is set: an operator's move, a reassignment away
  from a down or removed backend), the binding gone (``gone``);
- the general path (`lbproxy.core.balancer`), on a miss and on an HAO packet from a
  care-of address the binding had not seen (``care-of``): these hand over the packet
  that caused the event (`sample`), which is stored truncated to ``snap`` bytes; and
  drops whose terminal is known (``drop``, with the reason the counters count);
- notifications (`lbproxy.notify.adapter`): a care-of address change a home agent or
  terminal reported (``notified``), and the return paths' confirmations
  (`lbproxy.core.returnpaths`: ``confirmed``, ``unconfirmed``);
- the correspondent node (`lbproxy.core.correspondent`, through the balancer): a Binding
  Update accepted (``correspondent``) or refused (``drop``, with the reason), and the
  packets strict mode answered with a Binding Error (``drop``), through `note` and
  `dropped`.

*One journey per terminal.*  A terminal has several identities (the table's aliases); a
journey belongs to the live binding that holds them, and is found by any identity it
ever had (``index``).  A notification that makes a separate binding for a new care-of
address (a terminal keyed by its source address) joins that binding's journey to the
terminal's.

*Bounds.*  Each journey keeps its last ``max_events`` events (a ring; the count of those
pushed out is kept) and its last ``max_names`` identities.  At most ``max_terminals``
journeys are kept, least recently changed first out, in two segments so a flood of
one-packet identities cannot push out the journeys of terminals that did something: a
new journey waits in a *probationary* segment (a quarter of the bound) and moves to the
main one at its second event.  Consecutive identical events are one event with a repeat
count (a terminal dropped for the same reason a thousand times is one line).  Memory at
the bound is measured in docs/journey.md.  Nothing is saved across restarts.
"""

from __future__ import annotations

import contextlib
import ipaddress
from collections import OrderedDict, deque
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

from lbproxy.core.keys import Key

if TYPE_CHECKING:
    from twisted.internet.interfaces import IReactorTime

    from lbproxy.core.table import Binding

__all__ = ["DEFAULT_TERMINALS", "Event", "Journey", "Journeys"]

#: Terminals whose journeys are kept by default.
DEFAULT_TERMINALS = 1024
#: Events a journey keeps by default (a ring).
DEFAULT_EVENTS = 64
#: Bytes of a sampled packet kept by default.
DEFAULT_SNAP = 256
#: Identities a journey remembers (the table keeps at most 8 aliases per binding).
MAX_NAMES = 16

#: The kinds of event, in the order a legend lists them.
KINDS = ("created", "linked", "unlinked", "care-of", "notified", "confirmed", "unconfirmed",
         "correspondent", "backend", "conflict", "drop", "gone")


def _as_key(data: bytes) -> Key:
    return bytes.__new__(Key, data)


def _text(address: bytes | None) -> str:
    return "-" if address is None else str(ipaddress.IPv6Address(bytes(address)))


#: An event's text: a string, or parts (strings, Keys) joined when read -- the events a
#: miss records name identities, and formatting them would cost more than the rest of
#: recording (the rarer events -- moves, notifications -- are formatted at once).
Text = str | tuple[object, ...]


def _render(text: Text) -> str:
    return text if isinstance(text, str) else "".join(map(str, text))


class Event:
    """One thing that happened to a terminal.

    ``at`` is clock seconds; ``care_of`` (16 bytes or None) and ``backend`` (a name or
    None) are the terminal's at that moment, for drawing; ``packet`` is the first
    ``snap`` bytes of the packet that caused it, None while one may still be attached,
    ``b""`` when none will be (a notification, an operator); ``length`` the packet's
    whole length; ``repeat`` how many times it happened in a row.
    """

    __slots__ = ("_text", "at", "backend", "care_of", "kind", "length", "packet", "repeat")

    def __init__(self, at: float, kind: str, text: Text, care_of: bytes | None,
                 backend: str | None, packet: bytes | None = None, length: int = 0) -> None:
        self.at = at
        self.kind = kind
        self._text = text
        self.care_of = care_of
        self.backend = backend
        self.packet = packet
        self.length = length
        self.repeat = 1

    @property
    def text(self) -> str:
        """What happened, in words."""
        return _render(self._text)

    def as_dict(self) -> dict[str, Any]:
        """JSON-ready values (the packet as hex)."""
        return {
            "at": self.at,
            "kind": self.kind,
            "text": self.text,
            "care_of": None if self.care_of is None else _text(self.care_of),
            "backend": self.backend,
            "packet": self.packet.hex() if self.packet else None,
            "length": self.length,
            "repeat": self.repeat,
        }

    def __repr__(self) -> str:
        return f"<Event {self.at:.3f} {self.kind} {self.text!r} x{self.repeat}>"


class Journey:
    """One terminal's events (a ring) and what it looked like at the last one."""

    __slots__ = ("backend", "bindings", "care_of", "earlier", "events", "names")

    def __init__(self, max_events: int) -> None:
        self.events: deque[Event] = deque(maxlen=max_events)
        #: Events pushed out of the ring.
        self.earlier = 0
        #: Identities (plain bytes of Keys) this journey is found by, oldest first.
        self.names: list[bytes] = []
        #: The live bindings it follows (one, but two once a notification joined a
        #: separate binding's journey to this one; none once gone).
        self.bindings: list[Binding] = []
        #: The terminal's backend and care-of (or source) address at the last event.
        self.backend: str | None = None
        self.care_of: bytes | None = None

    @property
    def binding(self) -> Binding | None:
        """The (first) live binding it follows, or None."""
        return self.bindings[0] if self.bindings else None

    def as_dict(self) -> dict[str, Any]:
        """JSON-ready: identities, state, the events oldest first."""
        binding = self.binding
        return {
            "names": [str(_as_key(n)) for n in self.names],
            "key": None if binding is None else str(binding.key),
            "backend": self.backend if binding is not None else None,
            "care_of": None if self.care_of is None else _text(self.care_of),
            "earlier": self.earlier,
            "events": [e.as_dict() for e in self.events],
        }


class _Followed:
    """What a live binding looked like at its journey's last event (to tell what
    changed when the table reports it again)."""

    __slots__ = ("backend", "journey", "keys")

    def __init__(self, journey: Journey, keys: tuple[bytes, ...], backend: str) -> None:
        self.journey = journey
        self.keys = keys
        self.backend = backend


class Journeys:
    """The journeys of the terminals that changed last (see the module docstring)."""

    def __init__(self, clock: IReactorTime, max_terminals: int = DEFAULT_TERMINALS,
                 max_events: int = DEFAULT_EVENTS, snap: int = DEFAULT_SNAP,
                 max_names: int = MAX_NAMES) -> None:
        if max_terminals < 1 or max_events < 1 or snap < 0 or max_names < 1:
            raise ValueError("journeys need at least one terminal, event and name")
        self.clock = clock
        self.max_terminals = max_terminals
        self.max_events = max_events
        self.snap = snap
        self.max_names = max_names
        self._probation_max = max_terminals // 4
        self._main_max = max_terminals - self._probation_max
        self._probation: OrderedDict[Journey, None] = OrderedDict()
        self._main: OrderedDict[Journey, None] = OrderedDict()
        #: identity (plain bytes of its Key) -> its journey.
        self.index: dict[bytes, Journey] = {}
        self._of: dict[Binding, _Followed] = {}
        self._cause: str | None = None
        #: Journeys pushed out by the bound.
        self.evicted = 0

    # -- finding ---------------------------------------------------------------------

    def __len__(self) -> int:
        return len(self._probation) + len(self._main)

    def __iter__(self) -> Iterator[Journey]:
        yield from self._main
        yield from self._probation

    def find(self, key: bytes, binding: Binding | None = None) -> Journey | None:
        """The journey of the terminal `key` identifies: its live `binding`'s (the table
        resolves aliases), or the one `key` was last an identity of."""
        if binding is not None:
            followed = self._of.get(binding)
            if followed is not None:
                return followed.journey
        return self.index.get(bytes(key))

    def _journey_of(self, binding: Binding) -> Journey | None:
        followed = self._of.get(binding)
        return None if followed is None else followed.journey

    # -- recording -------------------------------------------------------------------

    @contextlib.contextmanager
    def cause(self, text: str) -> Iterator[None]:
        """Events recorded inside carry `text` as their cause and no packet (an
        operator's move, a reassignment)."""
        before = self._cause
        self._cause = text
        try:
            yield
        finally:
            self._cause = before

    def table_changed(self, binding: Binding, bound: bool) -> None:
        """`StickyTable.listeners`: a binding made, re-pointed, linked or gone."""
        followed = self._of.get(binding)
        if not bound:
            if followed is not None:
                del self._of[binding]
                journey = followed.journey
                if binding in journey.bindings:
                    journey.bindings.remove(binding)
                how = "expired" if binding.expires <= self.clock.seconds() else "removed"
                self._record(journey, "gone", (binding.key, f" -> {binding.backend.name} {how}"),
                             packet=b"")
            return
        own = binding.key
        aliases = binding.aliases
        keys = (own,) if aliases is None else (own, *aliases)
        name = binding.backend.name
        if followed is None:
            journey = self._journey_for(keys)
            journey.bindings.append(binding)
            self._of[binding] = _Followed(journey, keys, name)
            journey.backend = name
            if binding.care_of is not None:
                journey.care_of = binding.care_of
            for key in keys:
                self._name(journey, key)
            # A binding older than its journey (restored at start, or its journey pushed
            # out by the bound) says so: its first events are not known here.
            older = " (made earlier; its first events are not kept)" \
                if binding.packets > 1 else ""  # fmt: skip
            self._record(journey, "created", (own, f" -> {name}{older}"))
            return
        journey = followed.journey
        if name != followed.backend:
            old = followed.backend
            followed.backend = journey.backend = name
            self._record(journey, "backend", f"{old} -> {name}")
        before = followed.keys
        if keys != before:
            for added in keys:
                if added not in before:
                    self._name(journey, added)
                    self._record(journey, "linked", (_as_key(added),))
            for removed in before:
                if removed not in keys:
                    self._record(journey, "unlinked", (_as_key(removed),))
            followed.keys = keys

    def first_packet(self, binding: Binding, address: bytes, packet: bytes | bytearray,
                     now: float) -> None:
        """The general path, after a miss: `packet`, from `address` (its care-of
        address with an HAO, else its source), made `binding` (and its links)."""
        journey = self._journey_of(binding)
        if journey is None:
            return
        journey.care_of = address
        for event in reversed(journey.events):
            if event.packet is not None or event.at < now:
                break
            event.care_of = address
        self.sample(binding, packet, now)

    def care_of_changed(self, binding: Binding, old: bytes | None, new: bytes,
                        packet: bytes | bytearray, now: float) -> None:
        """The general path: an HAO packet from a care-of address `binding` had not
        seen (`old` -> `new`); `packet` caused it (and the links just recorded)."""
        journey = self._journey_of(binding)
        if journey is None:
            return
        journey.care_of = new
        for event in reversed(journey.events):  # the links this packet made: at `new`
            if event.packet is not None or event.at < now:
                break
            event.care_of = new
        self._record(journey, "care-of", f"{_text(old)} -> {_text(new)}")
        self.sample(binding, packet, now)

    def sample(self, binding: Binding, packet: bytes | bytearray, now: float) -> None:
        """The general path, after a miss or a change: `packet` caused the events of
        `binding`'s journey recorded since `now` that have none yet; they take its time
        (`now`, when the general path took it) as theirs."""
        journey = self._journey_of(binding)
        if journey is None:
            return
        data: bytes | None = None
        for event in reversed(journey.events):
            if event.packet is not None or event.at < now:
                break
            if data is None:
                data = bytes(packet[: self.snap])
            event.packet = data
            event.length = len(packet)
            event.at = now

    def dropped(self, key: bytes, reason: str, packet: bytes | bytearray | None = None,
                binding: Binding | None = None) -> None:
        """A packet of a known terminal dropped (`reason` as counted).  A terminal with
        no journey yet gets none (a flood of refused identities leaves nothing here)."""
        journey = self.find(key, binding)
        if journey is None:
            return
        self._record(journey, "drop", reason, *self._snap(packet))

    def conflict(self, binding: Binding, key: bytes) -> None:
        """The general path: `key`, an identity of `binding`'s packet, has a binding of
        its own (not linked; the packet followed chain order)."""
        journey = self._journey_of(binding)
        if journey is not None:
            self._record(journey, "conflict", (_as_key(bytes(key)), " is bound apart: not linked"))

    def notified(self, home: bytes, old: bytes | None, new: bytes, lifetime: int,
                 binding: Binding | None = None) -> None:
        """A notification moved `home` from care-of `old` to `new` (applied by the
        notification listener); `binding` is the one the new address leads to.  The
        journey of `binding`, if it is another's, joins the home's."""
        journey = self.index.get(bytes(Key("addr", home)))
        if journey is None and old is not None:
            journey = self.index.get(bytes(Key("addr", old)))
        other = self._journey_of(binding) if binding is not None else None
        if journey is None:
            journey = other
        elif other is not None and other is not journey:
            self._merge(journey, other)
        if journey is None:
            return
        self._name(journey, bytes(Key("addr", home)))
        for event in reversed(journey.events):  # the notification's own, not a packet's
            if event.packet is not None:
                break
            event.packet = b""
        what: Text = "deregistered: at home"
        if not (lifetime == 0 or new == home):
            what = f"{_text(old)} -> {_text(new)}, lifetime {lifetime} s"
            journey.care_of = new
        self._record(journey, "notified", what, packet=b"")

    def confirmed(self, home: bytes, care_of: bytes | None, lifetime: float | None) -> None:
        """`ReturnPaths`: replies to `home` go to `care_of` (None: no longer)."""
        journey = self.index.get(bytes(Key("addr", home)))
        if journey is None:
            return
        if care_of is None:
            self._record(journey, "unconfirmed", f"replies to {_text(home)} go home",
                         packet=b"")
        else:
            until = "" if lifetime is None else f" for {lifetime:g} s"
            self._record(journey, "confirmed", f"replies via {_text(care_of)}{until}",
                         packet=b"")

    def note(self, key: bytes, kind: str, text: str, packet: bytes | bytearray | None = None,
             care_of: bytes | None = None) -> bool:
        """An event another module reports (the correspondent node's Binding Updates:
        kind ``correspondent``, or ``drop`` when refused) for the terminal `key`
        identifies, with the `packet` that caused it and the `care_of` address it
        establishes; False when it has no journey."""
        journey = self.index.get(bytes(key))
        if journey is None:
            return False
        if care_of is not None:
            journey.care_of = care_of
        self._record(journey, kind, text, *self._snap(packet))
        return True

    # -- internals -------------------------------------------------------------------

    def _snap(self, packet: bytes | bytearray | None) -> tuple[bytes, int]:
        if packet is None:
            return b"", 0
        return bytes(packet[: self.snap]), len(packet)

    def _journey_for(self, keys: tuple[bytes, ...]) -> Journey:
        """The journey an identity of a new binding had (the terminal came back), if
        no live binding holds it; else a new one."""
        for key in keys:
            found = self.index.get(key)
            if found is not None and not found.bindings:
                return found
        journey = Journey(self.max_events)
        self._admit(journey)
        return journey

    def _admit(self, journey: Journey) -> None:
        if self._probation_max:
            self._probation[journey] = None
            while len(self._probation) > self._probation_max:
                self._evict(self._probation.popitem(last=False)[0])
        else:
            self._enter_main(journey)

    def _enter_main(self, journey: Journey) -> None:
        self._main[journey] = None
        while len(self._main) > self._main_max:
            self._evict(self._main.popitem(last=False)[0])

    def _touch(self, journey: Journey, promote: bool = True) -> None:
        """`journey` changed: last out of its segment; a probationary one that
        `promote`s moves to the main segment."""
        if journey in self._main:
            self._main.move_to_end(journey)
        elif journey in self._probation:
            if promote:
                del self._probation[journey]
                self._enter_main(journey)
            else:
                self._probation.move_to_end(journey)

    def _evict(self, journey: Journey) -> None:
        self.evicted += 1
        for name in journey.names:
            if self.index.get(name) is journey:
                del self.index[name]
        for binding in journey.bindings:
            self._of.pop(binding, None)
        journey.bindings = []

    def _name(self, journey: Journey, name: bytes) -> None:
        names = journey.names
        self.index[name] = journey
        if name in names:
            return
        names.append(name)
        if len(names) > self.max_names:
            # The oldest name that is not a live binding's own key goes.
            own = {bytes(b.key) for b in journey.bindings}
            gone = names.pop(next((i for i, n in enumerate(names) if n not in own), 0))
            if self.index.get(gone) is journey:
                del self.index[gone]

    def _record(self, journey: Journey, kind: str, text: Text,
                packet: bytes | None = None, length: int = 0) -> None:
        cause = self._cause
        if cause is not None:
            text = (text, f" ({cause})") if isinstance(text, str) else (*text, f" ({cause})")
            if packet is None:
                packet = b""
        events = journey.events
        # A probationary journey is promoted by an event after the one that made it
        # (the first packet's events are done once it has its packet): a flood of
        # one-packet identities stays in probation.
        promote = bool(events) and events[-1].packet is not None
        if events:
            last = events[-1]
            if last.kind == kind and last._text == text and last.care_of == journey.care_of:
                last.repeat += 1
                if packet and not last.packet:
                    last.packet, last.length = packet, length
                self._touch(journey, promote)
                return
            if len(events) == events.maxlen:
                journey.earlier += 1
        events.append(Event(self.clock.seconds(), kind, text, journey.care_of,
                            journey.backend, packet, length))
        self._touch(journey, promote)

    def _merge(self, into: Journey, other: Journey) -> None:
        """`other` (a separate binding's journey) becomes part of `into`."""
        merged = sorted([*into.events, *other.events], key=lambda e: e.at)
        into.earlier += other.earlier + max(0, len(merged) - self.max_events)
        into.events.clear()
        into.events.extend(merged[-self.max_events:])
        for name in other.names:
            self._name(into, name)
        for binding in other.bindings:
            self._of[binding].journey = into
            into.bindings.append(binding)
        if into.backend is None:
            into.backend = other.backend
        other.bindings = []
        other.names = []
        self._probation.pop(other, None)
        self._main.pop(other, None)
        self._touch(into)
