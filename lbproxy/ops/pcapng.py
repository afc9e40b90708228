"""A minimal pcap-ng writer: raw IPv6 frames with a comment each, for Wireshark.

Why our own: ``lbproxyctl journey --pcap`` writes a terminal's events as a capture
(docs/journey.md), and the only Python library that writes pcap-ng at hand (scapy) is GPL,
which installed code must not import (docs/licensing.md).  The format is small: a file is
a Section Header Block, an Interface Description Block, then one Enhanced Packet Block per
frame (the pcap-ng specification, draft-ietf-opsawg-pcapng).  Everything is written in this
host's byte order, as the specification allows (readers learn it from the SHB's magic).

Used here:

- SHB (type 0x0A0D0D0A): version 1.0, section length unknown (-1), ``shb_userappl``;
- IDB (type 1): link type ``LINKTYPE_IPV6`` (229: each frame is an IPv6 packet), a
  snap length, ``if_name`` and ``if_tsresol`` = 6 (microseconds);
- EPB (type 6): interface 0, a timestamp, the captured bytes (possibly truncated: the
  original length says how long the packet was), ``opt_comment`` (the event's text).
  A frame with no bytes is an event without a packet: Wireshark shows it as a
  zero-length frame with its comment.
"""

from __future__ import annotations

import struct
from collections.abc import Iterable
from typing import BinaryIO

__all__ = ["LINKTYPE_IPV6", "Frame", "write_pcapng"]

#: Link type of frames that are bare IPv6 packets (the tcpdump.org link-layer registry).
LINKTYPE_IPV6 = 229

_SHB, _IDB, _EPB = 0x0A0D0D0A, 0x00000001, 0x00000006
_BYTE_ORDER_MAGIC = 0x1A2B3C4D
_OPT_END, _OPT_COMMENT = 0, 1
_SHB_USERAPPL = 4
_IF_NAME, _IF_TSRESOL = 2, 9

Frame = tuple[float, bytes, int, str]
"""(seconds since the epoch, captured bytes, original length, comment)."""


def _pad(data: bytes) -> bytes:
    return data + b"\0" * (-len(data) % 4)


def _options(options: Iterable[tuple[int, bytes]]) -> bytes:
    out = b"".join(struct.pack("=HH", code, len(value)) + _pad(value)
                   for code, value in options)  # fmt: skip
    return out + struct.pack("=HH", _OPT_END, 0) if out else out


def _block(kind: int, body: bytes) -> bytes:
    length = 12 + len(body)
    return struct.pack("=II", kind, length) + body + struct.pack("=I", length)


def write_pcapng(out: BinaryIO, frames: Iterable[Frame], *, snaplen: int = 0,
                 application: str = "lbproxy", interface: str = "lbproxy") -> int:
    """Write a pcap-ng file of raw IPv6 `frames` to `out`; returns the frames written.

    ``snaplen`` is the IDB's snap length (0: unlimited)."""
    out.write(_block(_SHB, struct.pack("=IHHq", _BYTE_ORDER_MAGIC, 1, 0, -1) + _options(
        [(_SHB_USERAPPL, application.encode())])))
    out.write(_block(_IDB, struct.pack("=HHI", LINKTYPE_IPV6, 0, snaplen) + _options(
        [(_IF_NAME, interface.encode()), (_IF_TSRESOL, bytes([6]))])))
    written = 0
    for at, data, length, comment in frames:
        micros = max(0, round(at * 1_000_000))
        body = struct.pack("=IIIII", 0, micros >> 32, micros & 0xFFFFFFFF, len(data),
                           max(length, len(data)))
        body += _pad(data) + _options([(_OPT_COMMENT, comment.encode())] if comment else [])
        out.write(_block(_EPB, body))
        written += 1
    return written
