"""What the in-process before/after benchmarks share (core, flood, correspondent,
quiclb): lbproxy modules as of another revision, loaded beside this tree's, and the
per-packet comparison the last two print.

Why a module: each compares this tree's core with an earlier one in one process, and
each carried its own copy of the loading code.
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
from lbproxy.core.table import StickyTable

REPO = Path(__file__).resolve().parent.parent


def module_from(source: str, name: str, filename: str) -> types.ModuleType:
    """The module compiled from `source` as `name` (registered, so that its classes
    pickle and its dataclasses resolve), beside this tree's own; `filename` names it in
    tracebacks."""
    module = types.ModuleType(name)
    module.__file__ = filename
    sys.modules[name] = module
    exec(compile(source, filename, "exec"), module.__dict__)
    return module


def module_at(rev: str, path: str, name: str) -> types.ModuleType:
    """The lbproxy module at `path` (e.g. ``lbproxy/core/table.py``) as of git revision
    `rev`, loaded as `name`."""
    source = subprocess.run(["git", "-C", str(REPO), "show", f"{rev}:{path}"],
                            capture_output=True, text=True, check=True).stdout  # fmt: skip
    return module_from(source, name, f"<{rev}:{path}>")


def balancer_from(source: str, label: str) -> type[Balancer]:
    """``Balancer`` from the source text of a balancer.py (`label` names it in
    tracebacks), loaded beside this tree's."""
    module = module_from(source, "lbproxy.core.balancer_before",
                         f"<{label}:lbproxy/core/balancer.py>")  # fmt: skip
    cls: type[Balancer] = module.Balancer
    return cls


def balancer_at(rev: str) -> type[Balancer]:
    """``Balancer`` as of git revision `rev`."""
    cls: type[Balancer] = module_at(rev, "lbproxy/core/balancer.py",
                                    "lbproxy.core.balancer_before").Balancer  # fmt: skip
    return cls


def table_at(rev: str) -> type[StickyTable]:
    """``StickyTable`` as of git revision `rev`."""
    cls: type[StickyTable] = module_at(rev, "lbproxy/core/table.py",
                                       "lbproxy.core.table_baseline").StickyTable  # fmt: skip
    return cls


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
