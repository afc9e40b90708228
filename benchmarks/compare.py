"""Per-packet cost of this tree against a baseline revision, in one run (``make bench``).

What it compares: benchmarks/fastpath.py -- the in-process cost of the fast path and of
the general path, terminal -> backend and backend -> terminal, with 1 and with 100,000
terminals, no sockets -- of two trees: the *baseline* (a git revision, by default the
one named in benchmarks/BASELINE) and the *current* tree (this working tree, or
``--current REV``).  Each tree runs its own script, with itself on ``PYTHONPATH``, in a
subprocess of this same interpreter; the baseline tree is exported with ``git archive``
into a temporary directory that is removed at the end, also after an error or an
interrupt.

A shared machine is noisy, so the two alternate, round after round (baseline, current,
baseline, current, ...), each round a fresh process of a few seconds.  Printed per case:
best and median of each side over the rounds (ns per packet, each round's figure being
the best of its timed passes), and current / baseline as best against best and as the
median of the per-round ratios -- below 1 is faster.  Then the current tree's general
path / fast path, as benchmarks/fastpath.py prints it.

A script that knows ``--json`` (this tree's) is run with it and with the round's sizes.
An older one (before ``--json``) is loaded as a module and its own ``measure`` called
with the same sizes, its text lines parsed; a script with neither is run whole.

Run: ``.venv/bin/python benchmarks/compare.py`` (``make bench``; ``make bench
BASELINE=<rev>``); ``--help`` for the rounds and sizes.  No root needed.  The figures,
and how benchmarks/BASELINE is moved after each merge: docs/performance.md.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
SCRIPT = "benchmarks/fastpath.py"
DIRECTIONS = ("terminal -> backend", "backend -> terminal")
PATHS = ("fast", "general")

#: Runs an old benchmarks/fastpath.py (no ``--json``) at the given sizes: loads it as a
#: module (its ``main`` does not run) and calls its own ``measure``.  argv: script,
#: passes, warm-up packets, "terminals:count,...".
LEGACY_DRIVER = r"""
import importlib.util, inspect, os, runpy, sys
script, passes, warmup, sizes = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
tree = os.path.dirname(os.path.dirname(os.path.abspath(script)))
spec = importlib.util.spec_from_file_location("baseline_fastpath_benchmark", script)
module = importlib.util.module_from_spec(spec)
spec.loader.exec_module(module)
import lbproxy
if not os.path.abspath(lbproxy.__file__).startswith(tree + os.sep):
    sys.exit(f"lbproxy was imported from {lbproxy.__file__}, not from {tree}")
measure = getattr(module, "measure", None)
try:
    fits = {"terminals", "count", "show"} <= set(inspect.signature(measure).parameters)
except (TypeError, ValueError):
    fits = False
if not fits or not hasattr(module, "PASSES"):
    print("note: this fastpath.py has no measure(terminals, count, show): run whole",
          file=sys.stderr)
    runpy.run_path(script, run_name="__main__")
    sys.exit(0)
module.PASSES = passes
if warmup:
    measure(1, warmup, show=False)
for size in sizes.split(","):
    terminals, count = (int(n) for n in size.split(":"))
    measure(terminals, count, show=True)
"""

#: One case line of benchmarks/fastpath.py's text output, e.g.
#: "  100,000 terminals  terminal -> backend:  fast path   1494 ns/packet   general path
#: 5313 ns/packet   ratio 3.56"
LINE = re.compile(
    r"^\s*(?P<terminals>[\d,_]+)\s+terminals?\s+(?P<direction>.+?)\s*:\s*"
    r"fast\s+path\s+(?P<fast>[\d,.]+)\s*ns/packet\s+"
    r"general\s+path\s+(?P<general>[\d,.]+)\s*ns/packet",
    re.IGNORECASE,
)

Case = tuple[int, str, str]  # terminals, direction, path


class CompareError(Exception):
    """A side's run failed; the message says which and why."""


@dataclass
class Tree:
    """A tree whose benchmarks/fastpath.py is run: its label, root and revision."""

    label: str
    root: Path
    description: str
    figures: dict[Case, list[float]] = field(default_factory=dict)

    @property
    def script(self) -> Path:
        return self.root / SCRIPT

    def knows_json(self) -> bool:
        return "--json" in self.script.read_text(encoding="utf-8", errors="replace")


def git(*args: str) -> str:
    try:
        done = subprocess.run(
            ["git", "-C", str(REPO), *args],
            capture_output=True,
            text=True,
            check=False,
            env=dict(os.environ, GIT_OPTIONAL_LOCKS="0"),  # others share this checkout
        )
    except OSError as e:
        raise CompareError(f"git: {e}") from None
    if done.returncode:
        raise CompareError(f"git {' '.join(args)}: {done.stderr.strip() or done.returncode}")
    return done.stdout.strip()


def default_baseline() -> str:
    """The revision in benchmarks/BASELINE (its first line that is not a comment)."""
    for line in (HERE / "BASELINE").read_text(encoding="utf-8").splitlines():
        line = line.split("#", 1)[0].strip()
        if line:
            return line
    raise CompareError("benchmarks/BASELINE names no revision")


def describe(rev: str) -> tuple[str, str]:
    """The full commit id of `rev` and 'short-id subject'."""
    try:
        commit = git("rev-parse", "--verify", "--quiet", f"{rev}^{{commit}}")
    except CompareError:
        raise CompareError(f"{rev!r} is not a commit of {REPO}") from None
    return commit, git("log", "-1", "--format=%h %s", commit)


def export(commit: str, into: Path) -> None:
    """Write the tree of `commit` into `into` (git archive | tar -x)."""
    archive = subprocess.Popen(
        ["git", "-C", str(REPO), "archive", "--format=tar", commit], stdout=subprocess.PIPE
    )
    untar = subprocess.run(
        ["tar", "-x", "-C", str(into)], stdin=archive.stdout, capture_output=True, check=False
    )
    assert archive.stdout is not None
    archive.stdout.close()
    if archive.wait() or untar.returncode:
        raise CompareError(f"could not export {commit[:12]}: {untar.stderr.decode().strip()}")


def run(
    tree: Tree, sizes: list[tuple[int, int]], passes: int, warmup: int, timeout: float
) -> tuple[dict[Case, float], str]:
    """One round of `tree`'s script: ns per packet by case, and its stderr."""
    if tree.knows_json():
        counts = {count for _, count in sizes}
        assert len(counts) == 1
        command = [
            sys.executable,
            str(tree.script),
            "--json",
            "--terminals",
            ",".join(str(t) for t, _ in sizes),
            "--count",
            str(counts.pop()),
            "--passes",
            str(passes),
            "--warmup",
            str(warmup),
        ]
    else:
        command = [
            sys.executable,
            "-c",
            LEGACY_DRIVER,
            str(tree.script),
            str(passes),
            str(warmup),
            ",".join(f"{t}:{c}" for t, c in sizes),
        ]
    env = dict(os.environ, PYTHONPATH=str(tree.root))
    try:
        done = subprocess.run(
            command,
            cwd=tree.root,
            env=env,
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
        )
    except subprocess.TimeoutExpired:
        raise CompareError(f"{tree.label}: no result within {timeout:.0f} s") from None
    if done.returncode:
        raise CompareError(
            f"{tree.label} ({tree.description}) failed:\n{done.stdout}{done.stderr}".rstrip()
        )
    found = parse(done.stdout)
    wanted = {(t, d, p) for t, _ in sizes for d in DIRECTIONS for p in PATHS}
    if not wanted <= found.keys():
        missing = ", ".join(f"{t:,} {d} {p}" for t, d, p in sorted(wanted - found.keys()))
        raise CompareError(f"{tree.label}: no figure for {missing} in its output:\n{done.stdout}")
    return {case: found[case] for case in wanted}, done.stderr


def parse(output: str) -> dict[Case, float]:
    """ns per packet by case, from JSON lines or from fastpath.py's text lines."""
    found: dict[Case, float] = {}
    for line in output.splitlines():
        line = line.strip()
        if line.startswith("{"):
            try:
                item = json.loads(line)
                terminals, direction = int(item["terminals"]), str(item["direction"])
                fast, general = float(item["fast_ns"]), float(item["general_ns"])
            except (ValueError, KeyError, TypeError):
                continue
        else:
            match = LINE.match(line)
            if match is None:
                continue
            terminals = int(re.sub("[,_]", "", match["terminals"]))
            direction = re.sub(r"\s+", " ", match["direction"])
            fast = float(match["fast"].replace(",", ""))
            general = float(match["general"].replace(",", ""))
        direction = direction.replace("→", "->")
        found[terminals, direction, "fast"] = fast
        found[terminals, direction, "general"] = general
    return found


def order(case: Case) -> tuple[int, int, int]:
    """Terminals, then the direction and the path in fastpath.py's order."""
    terminals, direction, path = case
    return terminals, DIRECTIONS.index(direction), PATHS.index(path)


def table(baseline: Tree, current: Tree) -> list[str]:
    """The comparison, one row per case."""
    head = (
        f"{'terminals':>9}  {'direction':<19}  {'path':<7}  "
        f"{'baseline best':>13} {'median':>7}  {'current best':>12} {'median':>7}  "
        f"{'ratio best':>10} {'median':>7}"
    )
    lines = [head, "-" * len(head)]
    for case in sorted(current.figures, key=order):
        base, cur = baseline.figures[case], current.figures[case]
        per_round = [c / b for b, c in zip(base, cur, strict=True)]
        terminals, direction, path = case
        lines.append(
            f"{terminals:>9,}  {direction:<19}  {path:<7}  "
            f"{min(base):>13,.0f} {statistics.median(base):>7,.0f}  "
            f"{min(cur):>12,.0f} {statistics.median(cur):>7,.0f}  "
            f"{min(cur) / min(base):>10.3f} {statistics.median(per_round):>7.3f}"
        )
    return lines


def fast_vs_general(tree: Tree) -> list[str]:
    """The tree's general path / fast path (medians), as fastpath.py prints it."""
    out = []
    for terminals, direction, path in sorted(tree.figures, key=order):
        if path == "fast":
            fast = statistics.median(tree.figures[terminals, direction, "fast"])
            general = statistics.median(tree.figures[terminals, direction, "general"])
            out.append(
                f"  {terminals:>7,} terminals  {direction}:  fast path {fast:6.0f} "
                f"ns/packet   general path {general:6.0f} ns/packet   "
                f"ratio {general / fast:4.2f}"
            )
    return out


def number(text: str) -> int:
    value = int(text.replace(",", "").replace("_", ""))
    if value < 0:
        raise argparse.ArgumentTypeError(f"{text} is negative")
    return value


def terminate(signum: int, frame: FrameType | None) -> None:
    raise SystemExit(128 + signum)  # so the temporary trees are removed


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--baseline", default="", help="revision to compare against (default: benchmarks/BASELINE)"
    )
    parser.add_argument("--current", default="", help="a revision instead of this working tree")
    parser.add_argument("--rounds", type=number, default=5, help="alternating rounds (default 5)")
    parser.add_argument("--terminals", default="1,100000", help="comma-separated counts")
    parser.add_argument(
        "--count",
        type=number,
        default=25_600,
        help="packets per timed pass, per case (default 25,600)",
    )
    parser.add_argument(
        "--passes", type=number, default=2, help="timed passes per round, the best kept (default 2)"
    )
    parser.add_argument(
        "--warmup",
        type=number,
        default=6_400,
        help="packets of each process's untimed first round (default 6,400)",
    )
    parser.add_argument(
        "--timeout",
        type=float,
        default=300.0,
        help="seconds one side's round may take (default 300)",
    )
    args = parser.parse_args(argv)
    terminal_counts = [number(t) for t in args.terminals.split(",") if t.strip()]
    if not terminal_counts or min(terminal_counts) < 1:
        parser.error("--terminals must name counts of at least 1")
    if args.rounds < 1 or args.passes < 1 or args.count < 1:
        parser.error("--rounds, --passes and --count must be at least 1")
    count = -(-args.count // 64) * 64  # whole recvmmsg batches, as fastpath.py rounds
    sizes = [(t, count) for t in terminal_counts]
    signal.signal(signal.SIGTERM, terminate)
    signal.signal(signal.SIGHUP, terminate)
    try:
        with tempfile.TemporaryDirectory(prefix="lbproxy-bench-") as scratch:
            return compare(args, sizes, Path(scratch))
    except CompareError as e:
        print(f"compare: {e}", file=sys.stderr)
        return 1


def compare(args: argparse.Namespace, sizes: list[tuple[int, int]], scratch: Path) -> int:
    commit, about = describe(args.baseline or default_baseline())
    (scratch / "baseline").mkdir()
    export(commit, scratch / "baseline")
    baseline = Tree("baseline", scratch / "baseline", about)
    if args.current:
        commit, about = describe(args.current)
        (scratch / "current").mkdir()
        export(commit, scratch / "current")
        current = Tree("current", scratch / "current", about)
    else:
        head = git("log", "-1", "--format=%h", "HEAD")
        dirty = (
            " + uncommitted changes"
            if git("status", "--porcelain", "--", "lbproxy", "benchmarks")
            else ""
        )
        current = Tree("current", REPO, f"working tree at {head}{dirty}")
    for tree in (baseline, current):
        if not tree.script.is_file():
            raise CompareError(f"{tree.label} ({tree.description}) has no {SCRIPT}")
    print(
        f"per-packet cost, in-process (benchmarks/fastpath.py of each tree), "
        f"Python {sys.version.split()[0]}\n"
        f"  baseline: {baseline.description}\n"
        f"  current:  {current.description}\n"
        f"  {args.rounds} alternating rounds, each a fresh process per tree: "
        f"best of {args.passes} passes of {sizes[0][1]:,} packets per case",
        flush=True,
    )
    for number_ in range(1, args.rounds + 1):
        took = []
        for tree in (baseline, current):
            start = time.monotonic()
            figures, stderr = run(tree, sizes, args.passes, args.warmup, args.timeout)
            took.append(time.monotonic() - start)
            if stderr.strip() and number_ == 1:
                print(f"  ({tree.label}: {stderr.strip()})", file=sys.stderr)
            for case, ns in figures.items():
                tree.figures.setdefault(case, []).append(ns)
        print(
            f"  round {number_}/{args.rounds}: baseline {took[0]:.1f} s, current {took[1]:.1f} s",
            file=sys.stderr,
            flush=True,
        )
    print()
    print(
        "ns per packet (best / median over the rounds); ratio = current / baseline, "
        "best against best and median of the per-round ratios (< 1: faster)"
    )
    print("\n".join(table(baseline, current)))
    print()
    print("current, general path against fast path (medians):")
    print("\n".join(fast_vs_general(current)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
