"""Admission by source prefix: how many new entries each prefix made recently.

Why this exists: an identity costs an attacker nothing -- a home address, an SPI or an
interface ID is packet content, and anyone may use every address of their own /64 -- so a
bounded table cannot tell a forged identity from a new terminal by the identity.  The
prefix the packets come *from* is different: without spoofing, a flood comes from the few
prefixes the attacker holds, while new terminals come from everywhere.  When a table is
full, a prefix that has been making new entries much faster than a terminal ever does
is refused instead of being allowed to push anything out.

`PrefixAdmission` counts new entries per source /64 and per source /48 in a count-min
sketch (two rows per prefix length, fixed memory whatever the number of prefixes), over
a sliding window of one to two ``window`` lengths (two generations: the current one and
the previous one).  A prefix is *heavy* when its estimate reaches its limit plus a noise
allowance: four times the mean count per cell, so that a flood spread over random
(spoofed) prefixes, which fills every cell a little, makes no light prefix look heavy.

It is pure: the caller passes the time, nothing is scheduled.  Positions in the sketch
come from Python's salted ``hash`` of the prefix bytes, so an attacker cannot aim at the
cells of a victim prefix.
"""

from __future__ import annotations

from array import array
from typing import Final

__all__ = ["PrefixAdmission"]

#: The prefix lengths counted, in bytes (/64 and /48), in the order of the limits.
_LENGTHS: Final = (8, 6)


class PrefixAdmission:
    """Recent new entries per source /64 and /48; `heavy` says who is over their limit.

    ``per_64`` and ``per_48`` are the new entries a /64 and a /48 may make per window
    before they count as heavy; ``width`` is the number of cells per sketch row (a power
    of two).  Memory: ``2 generations x 2 lengths x 2 rows x width x 4`` bytes (512 KiB
    with the default width).
    """

    __slots__ = ("_cur", "_end", "_limits", "_mask", "_prev", "_total", "per_48", "per_64",
                 "width", "window")

    def __init__(
        self,
        window: float = 10.0,
        per_64: int = 64,
        per_48: int = 1024,
        width: int = 1 << 14,
    ) -> None:
        if window <= 0:
            raise ValueError(f"window must be > 0, not {window}")
        if per_64 < 1 or per_48 < 1:
            raise ValueError("per_64 and per_48 must be >= 1")
        if width < 2 or width & (width - 1):
            raise ValueError(f"width must be a power of two >= 2, not {width}")
        self.window: Final = float(window)
        self.per_64: Final = per_64
        self.per_48: Final = per_48
        self.width: Final = width
        self._limits = (per_64, per_48)
        self._mask = width - 1
        self._cur = self._fresh()
        self._prev = self._fresh()
        self._total = [0, 0]  # new entries counted in (current, previous) generation
        self._end = -1.0  # the current generation ends here (first use starts one)

    def _fresh(self) -> array[int]:
        # Rows, each ``width`` cells: /64 row 0, /64 row 1, /48 row 0, /48 row 1.
        return array("I", bytes(4 * 4 * self.width))

    def _roll(self, now: float) -> None:
        if now >= self._end + self.window:
            self._cur, self._prev = self._fresh(), self._fresh()
            self._total = [0, 0]
        else:
            self._cur, self._prev = self._fresh(), self._cur
            self._total = [0, self._total[0]]
        self._end = now + self.window

    def _cells(self, address: bytes) -> tuple[int, int, int, int]:
        mask, width = self._mask, self.width
        h64 = hash(address[:8])
        h48 = hash(address[:6])
        return (
            h64 & mask,
            width + ((h64 >> 32) & mask),
            2 * width + (h48 & mask),
            3 * width + ((h48 >> 32) & mask),
        )

    def count(self, address: bytes, now: float) -> None:
        """One new entry made by a packet from `address` (16 bytes) at `now`."""
        if now >= self._end:
            self._roll(now)
        cur = self._cur
        for i in self._cells(address):
            cur[i] += 1
        self._total[0] += 1

    def estimate(self, address: bytes, now: float) -> tuple[int, int]:
        """New entries made recently from `address`'s /64 and /48 (never less than the
        true counts over the last one to two windows; more only by collisions)."""
        if now >= self._end:
            self._roll(now)
        cur, prev = self._cur, self._prev
        a, b, c, d = self._cells(address)
        return (
            min(cur[a] + prev[a], cur[b] + prev[b]),
            min(cur[c] + prev[c], cur[d] + prev[d]),
        )

    def admit(self, address: bytes, now: float, full: bool) -> bool:
        """A packet from `address` asks for a new entry at `now`: when the table is
        `full`, False if `address` is `heavy` (nothing is counted); otherwise True, and
        the entry is counted.  (`heavy` and `count` in one, for the data path.)"""
        if now >= self._end:
            self._roll(now)
        mask, width = self._mask, self.width
        h64 = hash(address[:8])
        h48 = hash(address[:6])
        a = h64 & mask
        b = width + ((h64 >> 32) & mask)
        c = 2 * width + (h48 & mask)
        d = 3 * width + ((h48 >> 32) & mask)
        cur = self._cur
        total = self._total
        if full:
            prev = self._prev
            noise = 4 * (total[0] + total[1]) // width
            if (
                min(cur[a] + prev[a], cur[b] + prev[b]) >= self.per_64 + noise
                or min(cur[c] + prev[c], cur[d] + prev[d]) >= self.per_48 + noise
            ):
                return False
        cur[a] += 1
        cur[b] += 1
        cur[c] += 1
        cur[d] += 1
        total[0] += 1
        return True

    def heavy(self, address: bytes, now: float) -> bool:
        """True if `address`'s /64 or /48 has made at least its limit of new entries
        recently, beyond the noise every cell carries."""
        e64, e48 = self.estimate(address, now)
        noise = 4 * (self._total[0] + self._total[1]) // self.width
        return e64 >= self.per_64 + noise or e48 >= self.per_48 + noise

    def __repr__(self) -> str:
        return (f"<PrefixAdmission per /64 {self.per_64}, per /48 {self.per_48}"
                f" in {self.window:g} s>")
