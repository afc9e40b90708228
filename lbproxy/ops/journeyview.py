"""A terminal's journey for people: text lines, a pcap-ng capture, an SVG picture.

``lbproxyctl journey KEY`` asks the balancer for the journey (`Control.journey`: plain
JSON values, packets as hex) and renders it here, on the operator's side, so the
balancer never writes files.  Three forms (docs/journey.md):

- `format_journey`: one line per event -- UTC time, seconds from the first event, the
  kind, what happened, the backend and care-of address at that moment, the sampled
  packet's length;
- `journey_frames` for `lbproxy.ops.pcapng.write_pcapng`: each event is a frame whose
  comment is the event's line; an event with a sampled packet carries its bytes (the
  IPv6 packet, truncated to the balancer's snap length; the original length is kept),
  the others are zero-length frames;
- `journey_svg`: plain SVG (no plotting library): time on x, one lane per care-of (or
  source) address the terminal used, the backend as the colour of the band the terminal
  sits on, events as marks (a cross for a drop) with their text as a tooltip, a legend.
"""

from __future__ import annotations

import datetime
import math
from collections.abc import Mapping, Sequence
from typing import Any
from xml.sax.saxutils import escape, quoteattr

from lbproxy.ops.pcapng import Frame

__all__ = ["event_line", "format_journey", "journey_frames", "journey_svg"]

#: Colours of backends, in the order they appear in a journey.
BACKEND_COLOURS = ("#4e79a7", "#f28e2b", "#59a14f", "#b07aa1", "#edc948", "#76b7b2",
                   "#ff9da7", "#9c755f")
#: Colours of event marks by kind (others: grey).
KIND_COLOURS = {
    "created": "#2ca02c", "linked": "#1f77b4", "unlinked": "#7f7f7f", "care-of": "#17becf",
    "notified": "#9467bd", "confirmed": "#8c564b", "unconfirmed": "#c49c94",
    "backend": "#ff7f0e", "conflict": "#bcbd22", "drop": "#d62728", "gone": "#000000",
    "correspondent": "#e377c2",
}
#: Kinds drawn as a cross (a refusal: a drop, a refused Binding Update).
_CROSS_KINDS = frozenset({"drop"})


def _utc(at: float) -> str:
    moment = datetime.datetime.fromtimestamp(at, datetime.UTC)
    return moment.strftime("%Y-%m-%dT%H:%M:%S.%f")[:-3] + "Z"


def event_line(event: Mapping[str, Any]) -> str:
    """One event as words: kind, what happened, repeats, backend and care-of address."""
    repeat = int(event.get("repeat") or 1)
    parts = [f"{event['kind']}: {event['text']}"]
    if repeat > 1:
        parts.append(f"(x{repeat})")
    parts.append(f"[backend {event.get('backend') or '-'}, "
                 f"care-of {event.get('care_of') or '-'}]")  # fmt: skip
    return " ".join(parts)


def _packet(event: Mapping[str, Any]) -> bytes:
    data = event.get("packet")
    return bytes.fromhex(data) if data else b""


def format_journey(journey: Mapping[str, Any]) -> str:
    """The journey as text: a header (identities, state) and one line per event."""
    events: Sequence[Mapping[str, Any]] = journey.get("events") or []
    names = ", ".join(journey.get("names") or ()) or "-"
    key = journey.get("key")
    state = (f"bound by {key} to {journey.get('backend')}" if key
             else "no live binding")  # fmt: skip
    lines = [f"journey of {journey.get('asked', '?')}: {state}",
             f"identities: {names}",
             f"care-of: {journey.get('care_of') or '-'}"]  # fmt: skip
    earlier = int(journey.get("earlier") or 0)
    if earlier:
        lines.append(f"({earlier} earlier events no longer kept)")
    first = float(events[0]["at"]) if events else 0.0
    for event in events:
        at = float(event["at"])
        length = int(event.get("length") or 0)
        packet = f"  <{length}-byte packet>" if event.get("packet") else ""
        lines.append(f"{_utc(at)}  {at - first:+9.3f}s  {event_line(event)}{packet}")
    if not events:
        lines.append("(no events)")
    return "\n".join(lines)


def journey_frames(journey: Mapping[str, Any]) -> list[Frame]:
    """The journey's events as pcap-ng frames (time, bytes, original length, comment).

    Events one packet caused together (a binding made and its first identities linked,
    a new care-of address linked and the move) share that packet: it is the first
    one's frame; the others are empty frames whose comment names it (the same bytes
    twice would look like a retransmission to Wireshark)."""
    frames: list[Frame] = []
    asked = journey.get("asked", "?")
    previous: tuple[float, str] | None = None
    carrier = 0
    for number, event in enumerate(journey.get("events") or [], start=1):
        comment = f"lbproxy journey of {asked}: {event_line(event)}"
        data = _packet(event)
        at = float(event["at"])
        if data and previous == (at, event.get("packet")):
            comment += f" (its packet: frame {carrier})"
            data = b""
        elif data:
            previous, carrier = (at, event.get("packet")), number
        else:
            previous = None
        length = int(event.get("length") or 0) if data else 0
        frames.append((at, data, length, comment))
    return frames


# -- the picture ------------------------------------------------------------------------

_WIDTH = 1000
_LEFT, _RIGHT, _TOP = 250, 30, 70
_LANE = 40


def _ticks(span: float) -> float:
    """A round tick step giving 4 to 10 ticks over `span` seconds."""
    raw = span / 6
    power = 10 ** math.floor(math.log10(raw)) if raw > 0 else 1.0
    for step in (1, 2, 5, 10):
        if raw <= step * power:
            return step * power
    return 10 * power


def journey_svg(journey: Mapping[str, Any]) -> str:
    """The journey as a standalone SVG document (see the module docstring)."""
    events: Sequence[Mapping[str, Any]] = journey.get("events") or []
    lanes: list[str] = []
    backends: list[str] = []
    for event in events:
        lane = event.get("care_of") or "-"
        if lane not in lanes:
            lanes.append(lane)
        backend = event.get("backend")
        if backend and backend not in backends:
            backends.append(backend)
    lanes = lanes or ["-"]
    colour = {b: BACKEND_COLOURS[i % len(BACKEND_COLOURS)] for i, b in enumerate(backends)}
    start = float(events[0]["at"]) if events else 0.0
    last = float(events[-1]["at"]) if events else 0.0
    span = max(last - start, 1.0)
    end = last + span * 0.05
    span = end - start
    plot = _WIDTH - _LEFT - _RIGHT
    height_lanes = _LANE * len(lanes)

    def x(at: float) -> float:
        return round(_LEFT + (at - start) / span * plot, 2)

    def y(lane: str) -> float:
        return _TOP + _LANE * lanes.index(lane) + _LANE / 2

    kinds = [k for k in dict.fromkeys(str(e["kind"]) for e in events)]
    legend_rows = max(1, math.ceil(len(backends) / 4)) + max(1, math.ceil(len(kinds) / 4))
    height = _TOP + height_lanes + 50 + 22 * legend_rows + 20
    out = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{_WIDTH}" height="{height}" '
           f'viewBox="0 0 {_WIDTH} {height}" font-family="sans-serif" font-size="12">',
           f"<title>{escape('lbproxy journey of ' + str(journey.get('asked', '?')))}</title>",
           '<rect width="100%" height="100%" fill="white"/>',
           f'<text x="10" y="22" font-size="16" font-weight="bold">'
           f"{escape('Journey of ' + str(journey.get('asked', '?')))}</text>",
           f'<text x="10" y="42">{escape("identities: " + (", ".join(journey.get("names") or ()) or "-"))}</text>',  # noqa: E501
           f'<text x="10" y="58">{escape(f"from {_utc(start)}" if events else "no events")}'
           "</text>"]  # fmt: skip
    out.append('<g id="lanes">')
    for lane in lanes:
        label = "(no address)" if lane == "-" else lane
        out.append(f'<line class="lane" x1="{_LEFT}" x2="{_WIDTH - _RIGHT}" y1="{y(lane)}" '
                   f'y2="{y(lane)}" stroke="#dddddd"/>'
                   f'<text class="lane-label" x="{_LEFT - 8}" y="{y(lane) + 4}" '
                   f'text-anchor="end">{escape(label)}</text>')  # fmt: skip
    out.append("</g>")
    out.append('<g id="bands">')
    for i, event in enumerate(events):
        backend = event.get("backend")
        if not backend:
            continue
        until = float(events[i + 1]["at"]) if i + 1 < len(events) else end
        if event["kind"] == "gone":
            continue
        x0, x1 = x(float(event["at"])), x(until)
        lane = event.get("care_of") or "-"
        out.append(f'<rect class="band" data-backend={quoteattr(backend)} x="{x0}" '
                   f'y="{y(lane) - 9}" width="{max(x1 - x0, 1.0)}" height="18" '
                   f'fill="{colour[backend]}" fill-opacity="0.55"/>')  # fmt: skip
    out.append("</g>")
    axis_y = _TOP + height_lanes + 10
    step = _ticks(span)
    out.append('<g id="axis">'
               f'<line x1="{_LEFT}" x2="{_WIDTH - _RIGHT}" y1="{axis_y}" y2="{axis_y}" '
               'stroke="black"/>')  # fmt: skip
    tick = 0.0
    while tick <= span + 1e-9:
        tx = x(start + tick)
        out.append(f'<line x1="{tx}" x2="{tx}" y1="{axis_y}" y2="{axis_y + 5}" '
                   f'stroke="black"/><text x="{tx}" y="{axis_y + 18}" '
                   f'text-anchor="middle">+{tick:g}s</text>')  # fmt: skip
        tick += step
    out.append(f'<text x="{_LEFT - 30}" y="{axis_y + 18}" text-anchor="end">time</text></g>')
    out.append('<g id="events">')
    stacked: dict[tuple[int, str], int] = {}  # marks at one spot stack upwards
    for event in events:
        kind = str(event["kind"])
        lane = event.get("care_of") or "-"
        ex = x(float(event["at"]))
        spot = (round(ex / 6), lane)
        height = stacked.get(spot, 0)
        stacked[spot] = height + 1
        ey = y(lane) - 12 * min(height, 2)
        tip = f"{_utc(float(event['at']))} {event_line(event)}"
        fill = KIND_COLOURS.get(kind, "#7f7f7f")
        cls = f'class="event" data-kind={quoteattr(kind)}'
        if kind in _CROSS_KINDS:
            out.append(f'<path {cls} d="M{ex - 6},{ey - 6}L{ex + 6},{ey + 6}M{ex - 6},'
                       f'{ey + 6}L{ex + 6},{ey - 6}" stroke="{fill}" stroke-width="3">'
                       f"<title>{escape(tip)}</title></path>")  # fmt: skip
        else:
            out.append(f'<circle {cls} cx="{ex}" cy="{ey}" r="6" fill="{fill}" '
                       f'stroke="black" stroke-width="0.5"><title>{escape(tip)}</title>'
                       "</circle>")  # fmt: skip
    out.append("</g>")
    ly = axis_y + 45
    out.append('<g id="legend">')
    out.append(f'<text x="10" y="{ly}" font-weight="bold">backend</text>')
    for i, backend in enumerate(backends):
        lx, row = _LEFT + (i % 4) * 180, ly + (i // 4) * 22
        out.append(f'<rect class="legend-backend" x="{lx}" y="{row - 11}" width="24" '
                   f'height="14" fill="{colour[backend]}" fill-opacity="0.55"/>'
                   f'<text x="{lx + 30}" y="{row}">{escape(backend)}</text>')  # fmt: skip
    ly += 22 * max(1, math.ceil(len(backends) / 4))
    out.append(f'<text x="10" y="{ly}" font-weight="bold">event</text>')
    for i, kind in enumerate(kinds):
        lx, row = _LEFT + (i % 4) * 180, ly + (i // 4) * 22
        fill = KIND_COLOURS.get(kind, "#7f7f7f")
        if kind in _CROSS_KINDS:
            mark = (f'<path d="M{lx + 6},{row - 10}L{lx + 18},{row + 2}M{lx + 6},{row + 2}'
                    f'L{lx + 18},{row - 10}" stroke="{fill}" stroke-width="3"/>')
        else:
            mark = f'<circle cx="{lx + 12}" cy="{row - 4}" r="6" fill="{fill}"/>'
        out.append(f'<g class="legend-kind" data-kind={quoteattr(kind)}>{mark}'
                   f'<text x="{lx + 30}" y="{row}">{escape(kind)}</text></g>')
    out.append("</g></svg>")
    return "\n".join(out) + "\n"
