"""What the in-process before/after benchmarks share (benchmarks/correspondent.py,
benchmarks/quiclb.py): ``Balancer`` as of another revision, and the per-packet
comparison they print.

Why a module: both compare this tree's core with an earlier one in one process,
alternating rounds, and printed their figures through two copies of the same code.
"""

from __future__ import annotations

import statistics
import subprocess
import sys
import time
import types
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from lbproxy.core.balancer import Balancer

REPO = Path(__file__).resolve().parent.parent


def balancer_from(source: str, label: str) -> type[Balancer]:
    """``Balancer`` from the source text of a balancer.py (`label` names it in
    tracebacks), loaded beside this tree's."""
    module = types.ModuleType("lbproxy.core.balancer_before")
    module.__file__ = f"<{label}:lbproxy/core/balancer.py>"
    sys.modules[module.__name__] = module
    exec(compile(source, module.__file__, "exec"), module.__dict__)
    cls: type[Balancer] = module.Balancer
    return cls


def balancer_at(rev: str) -> type[Balancer]:
    """``Balancer`` as of git revision `rev`."""
    source = subprocess.run(["git", "-C", str(REPO), "show", f"{rev}:lbproxy/core/balancer.py"],
                            capture_output=True, text=True, check=True).stdout  # fmt: skip
    return balancer_from(source, rev)


def per_packet(fn: Callable[[Any], object], items: Sequence[Any]) -> float:
    """Seconds per item of `fn` over `items`."""
    start = time.perf_counter()
    for item in items:
        fn(item)
    return (time.perf_counter() - start) / len(items)


def compare(label: str, before: Callable[[Any], object], after: Callable[[Any], object],
            items: Sequence[Any], rounds: int,
            after_items: Callable[[int], Sequence[Any]] | None = None, width: int = 60) -> None:
    """Print `before` against `after` per item, alternating `rounds` times: best and
    median of each, and their ratios.  ``after_items(n)``: round n's items for `after`
    (default: `items`)."""
    b, a = [], []
    for n in range(rounds):
        b.append(per_packet(before, items))
        a.append(per_packet(after, items if after_items is None else after_items(n)))
    print(f"{label:<{width}} {min(b) * 1e9:7.0f} / {statistics.median(b) * 1e9:7.0f} ns  ->  "
          f"{min(a) * 1e9:7.0f} / {statistics.median(a) * 1e9:7.0f} ns   "
          f"ratio best {min(a) / min(b):.3f}, median "
          f"{statistics.median(a) / statistics.median(b):.3f}")  # fmt: skip
