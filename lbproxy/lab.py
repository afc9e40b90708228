"""``make lab``: a namespace lab that keeps running until you tear it down.

The network test bed (docs/testbed.md: terminals that move between three access links, a
home agent, three backends running Linux TCP servers) with the real programs on it: the
balancer under ``twistd lbproxy`` (health checks, metrics, persistence, notifications),
and ``twistd lbproxy-homeagent`` beside the home agent, telling it about care-of address
changes over mutual TLS.  Unlike ``make demo`` it stays up, for a tutorial, a dashboard or
an experiment::

    python -m lbproxy.lab up                           # build it, start everything, return
    python -m lbproxy.lab traffic --terminals 1 --moves 2,3   # a TCP session that moves
    python -m lbproxy.lab move 1 2                     # terminal 1 to access link 2
    python -m lbproxy.lab ctl show                     # lbproxyctl against the lab balancer
    python -m lbproxy.lab exec lb curl -s http://[::1]:9464/metrics
    python -m lbproxy.lab status
    python -m lbproxy.lab down                         # everything goes: processes, namespaces

``up`` starts a keeper process in a session of its own, which builds the lab, writes
``lab.json`` in the state directory (``--dir``, ``$LBPROXY_LAB_DIR``, default
``/run/lbproxy-lab``) and waits for SIGTERM; ``down`` sends it that and waits until the
lab is gone.  When the keeper itself is gone (killed), ``down`` removes what ``lab.json``
names: its processes and namespaces.  It needs root, like the bed.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

__all__ = ["main"]

DEFAULT_DIR = "/run/lbproxy-lab"
STATE = "lab.json"
METRICS_PORT = 9464


def _state_dir(given: str | None) -> Path:
    return Path(given or os.environ.get("LBPROXY_LAB_DIR") or DEFAULT_DIR)


def _read_state(directory: Path) -> dict[str, Any] | None:
    try:
        state: dict[str, Any] = json.loads((directory / STATE).read_text())
    except (OSError, ValueError):
        return None
    return state


def _alive(pid: int, marker: str = "lbproxy") -> bool:
    """Is ``pid`` running, and one of ours (its command line names ``marker``)?"""
    try:
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
        status = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return False
    return marker.encode() in cmdline and "\nState:\tZ" not in status


def _env() -> dict[str, str]:
    """The environment of programs run in the lab: this lbproxy first on the path."""
    root = str(Path(__file__).resolve().parent.parent)
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (root, env.get("PYTHONPATH", "")) if p)
    return env


# -- the keeper ------------------------------------------------------------------------------


def _keep(directory: Path, terminals: int, agent: bool) -> int:
    """Build the lab, write the state file, wait for SIGTERM, tear the lab down."""
    from lbproxy.testbed import addresses, control
    from lbproxy.testbed.agents import BedAgent, BedPki, notify_section
    from lbproxy.testbed.balancer import BedBalancer, bed_config
    from lbproxy.testbed.bed import TestBed

    stop = {"requested": False}

    def request_stop(signum: int, frame: object) -> None:
        stop["requested"] = True

    signal.signal(signal.SIGTERM, request_stop)
    signal.signal(signal.SIGINT, request_stop)
    state_file = directory / STATE
    bed = TestBed(terminals=terminals, backends=3, register=not agent)
    started: list[Any] = []
    try:
        bed.start()
        extra = ("[metrics]\n"
                 f"endpoint = 'tcp6:{METRICS_PORT}:interface=\\:\\:1'\n"
                 "[persistence]\n"
                 f'path = "{bed.path("table.jsonl")}"\n')  # fmt: skip
        if agent:
            pki = BedPki(bed)
            home_agent = BedAgent.home_agent(bed, pki).start()
            started.append(home_agent)
            control.request(bed.terminal_control, "register")
            deadline = time.monotonic() + 30
            while not all(t["registered"] for t in bed.terminal_status()):
                if time.monotonic() > deadline:
                    raise RuntimeError("the terminals did not register with the home agent")
                time.sleep(0.1)
            extra += notify_section(pki, [home_agent.peer])
        balancer = BedBalancer(bed, bed_config(bed, health=True, extra=extra), name="lbproxy")
        balancer.start()
        started.append(balancer)
        processes = {name: p.pid for name, p in bed.processes().items()}
        state = {
            "keeper": os.getpid(),
            "python": sys.executable,
            "ready": True,
            "namespaces": {role: bed.ns(role) for role in bed.roles},
            "workdir": bed.workdir,
            "processes": processes,
            "control_socket": balancer.control_socket,
            "terminal_control": bed.terminal_control,
            "logs": {"balancer": balancer.log_path,
                     **({"home-agent agent": started[0].log_path} if agent else {})},
            "metrics": f"http://[::1]:{METRICS_PORT}/metrics",
            "terminals": [str(addresses.home_address(i)) for i in range(1, terminals + 1)],
            "links": {str(k): str(addresses.access_prefix(k)) for k in bed.links},
            "backends": {addresses.backend_name(i): str(addresses.backend_address(i))
                         for i in bed.backend_indices},
            "virtual_address": str(addresses.VIP),
            "agent": agent,
        }
        tmp = state_file.with_suffix(".tmp")
        tmp.write_text(json.dumps(state, indent=2) + "\n")
        tmp.replace(state_file)
        print(f"lab ready: {', '.join(bed.namespaces())}", flush=True)
        while not stop["requested"]:
            time.sleep(0.2)
        print("lab: stopping", flush=True)
        return 0
    except Exception as exc:
        print(f"lab: {type(exc).__name__}: {exc}", flush=True)
        return 1
    finally:
        for program in reversed(started):
            with contextlib.suppress(Exception):
                program.stop()
        bed.stop()
        with contextlib.suppress(FileNotFoundError):
            state_file.unlink()
        print("lab: removed", flush=True)


# -- the commands ----------------------------------------------------------------------------


def _summary(state: dict[str, Any], directory: Path) -> str:
    python = state.get("python", sys.executable)
    me = f"{python} -m lbproxy.lab" + ("" if directory == Path(DEFAULT_DIR)
                                       else f" --dir {directory}")
    ns = state["namespaces"]
    lines = [
        f"lbproxy lab running: {len(state['terminals'])} terminals "
        f"({state['terminals'][0]} ...), virtual address {state['virtual_address']}, "
        f"backends {', '.join(f'{n} {a}' for n, a in state['backends'].items())}",
        "  namespaces:  " + " ".join(ns.values()),
        "  logs:        " + ", ".join(f"{k} {v}" for k, v in state["logs"].items()),
        f"  metrics:     ip netns exec {ns['lb']} curl -s {state['metrics']}",
        "Try:",
        f"  {me} traffic --terminals 1 --moves 2,3   # a TCP session while terminal 1 moves",
        f"  {me} ctl show                            # the sticky table (lbproxyctl)",
        f"  {me} move 1 1                            # terminal 1 back to access link 1",
        "Tear it down:",
        f"  {me} down" + ("   (or: make lab-down)" if directory == _state_dir(None) else ""),
    ]
    return "\n".join(lines)


def _up(directory: Path, terminals: int, agent: bool, timeout: float) -> int:
    from lbproxy.testbed.netns import BedUnavailableError, check_host

    state = _read_state(directory)
    if state is not None and _alive(int(state.get("keeper", 0))):
        print("A lab is already running.")
        print(_summary(state, directory))
        return 0
    if state is not None:
        _remove_leftovers(directory, state)
    try:
        check_host()
    except BedUnavailableError as exc:
        print(f"lbproxy lab: {exc}; run it as root (e.g. sudo make lab)", file=sys.stderr)
        return 1
    directory.mkdir(parents=True, exist_ok=True, mode=0o755)
    log = directory / "lab.log"
    print(f"Building the lab: {terminals} terminals, 3 access links, a home agent"
          f"{' with lbproxy-homeagent' if agent else ''}, the balancer, 3 backends ...",
          flush=True)
    with open(log, "wb") as out:
        keeper = subprocess.Popen(
            [sys.executable, "-m", "lbproxy.lab", "--dir", str(directory), "_keep",
             "--terminals", str(terminals), *([] if agent else ["--no-agent"])],
            stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
            start_new_session=True, env=_env(), cwd="/",
        )
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        state = _read_state(directory)
        if state is not None and state.get("ready"):
            print(_summary(state, directory))
            return 0
        if keeper.poll() is not None:
            print(f"lbproxy lab: the lab did not start (exit status {keeper.returncode}):",
                  file=sys.stderr)
            print(log.read_text(errors="replace")[-3000:], file=sys.stderr)
            return 1
        time.sleep(0.2)
    print(f"lbproxy lab: not ready after {timeout:.0f} s; see {log}", file=sys.stderr)
    _signal(keeper.pid, signal.SIGTERM)
    return 1


def _signal(pid: int, signum: int) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.kill(pid, signum)


def _remove_leftovers(directory: Path, state: dict[str, Any]) -> None:
    """The keeper is gone: stop the processes and delete the namespaces it left."""
    from lbproxy.testbed import netns

    for pid in state.get("processes", {}).values():
        if _alive(int(pid)):
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(int(pid), signal.SIGTERM)
    time.sleep(0.5)
    for pid in state.get("processes", {}).values():
        if _alive(int(pid)):
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(int(pid), signal.SIGKILL)
    for namespace in state.get("namespaces", {}).values():
        with contextlib.suppress(netns.CommandError):
            netns.delete(namespace)
    workdir = state.get("workdir", "")
    if workdir and Path(workdir).name.startswith("lbtb"):
        subprocess.run(["rm", "-rf", "--one-file-system", workdir], check=False)
    with contextlib.suppress(FileNotFoundError):
        (directory / STATE).unlink()


def _down(directory: Path, timeout: float) -> int:
    state = _read_state(directory)
    if state is None:
        print(f"No lab running (no {directory / STATE}); nothing to tear down.")
        return 0
    keeper = int(state.get("keeper", 0))
    if _alive(keeper):
        _signal(keeper, signal.SIGTERM)
        deadline = time.monotonic() + timeout
        while _alive(keeper) and time.monotonic() < deadline:
            time.sleep(0.1)
    if _read_state(directory) is not None:  # the keeper was gone, or did not finish
        _remove_leftovers(directory, state)
    left = [ns for ns in state.get("namespaces", {}).values()
            if os.path.exists(f"/run/netns/{ns}")]
    if left:
        print(f"lbproxy lab: namespaces left: {' '.join(left)}", file=sys.stderr)
        return 1
    print("Lab removed: processes stopped, namespaces deleted.")
    return 0


def _need_state(directory: Path) -> dict[str, Any]:
    state = _read_state(directory)
    if state is None:
        raise SystemExit(f"lbproxy lab: no lab running ({directory / STATE} missing); "
                         "start one with `make lab`")
    return state


def _status(directory: Path) -> int:
    state = _read_state(directory)
    if state is None:
        print("No lab running.")
        return 1
    print(_summary(state, directory))
    keeper = int(state.get("keeper", 0))
    print(f"  keeper:      pid {keeper} {'running' if _alive(keeper) else 'GONE'}")
    for name, pid in sorted(state.get("processes", {}).items()):
        print(f"  {name + ':':<12} pid {pid} {'running' if _alive(int(pid)) else 'GONE'}")
    return 0


def _ctl(directory: Path, args: Sequence[str]) -> int:
    from lbproxy.ops.ctl import main as ctl

    state = _need_state(directory)
    return ctl(["--socket", state["control_socket"], *args])


def _traffic(directory: Path, terminals: str, moves: str, chunks: int) -> int:
    state = _need_state(directory)
    from lbproxy.testbed import addresses

    argv = [state.get("python", sys.executable), "-m", "lbproxy.testbed.workload",
            "--control", state["terminal_control"], "--terminals", terminals,
            "--chunks", str(chunks), "--timeout", "10"]
    if moves:
        argv += ["--moves", moves]
    result = subprocess.run(["ip", "netns", "exec", state["namespaces"]["term"], *argv],
                            capture_output=True, text=True, timeout=300, env=_env(),
                            check=False)  # fmt: skip
    if result.returncode != 0:
        print(f"lbproxy lab: the workload failed: {result.stderr.strip()[-2000:]}",
              file=sys.stderr)
        return 1
    report = json.loads(result.stdout)
    ok = True
    for index, terminal in sorted(report["terminals"].items(), key=lambda item: int(item[0])):
        for conn in terminal["connections"]:
            path = [str(addresses.care_of_address(int(index), 1))]
            path += [m["coa"] if m.get("ok") else f"link {m['link']} FAILED"
                     for m in conn["moves"]]
            outcome = "intact" if conn["error"] is None else f"BROKEN: {conn['error']}"
            ok = ok and conn["error"] is None
            print(f"terminal {index} (home {terminal['hoa']}): care-of "
                  f"{' -> '.join(path)}; backend {conn['backend']}; "
                  f"{conn['bytes_ok']} bytes echoed; session {outcome}")
    summary = report["summary"]
    print(f"{summary['ok']}/{summary['connections']} sessions intact")
    if moves and state.get("agent"):
        _await_confirmations(state, report)
    return 0 if ok else 1


def _await_confirmations(state: dict[str, Any], report: dict[str, Any],
                         timeout: float = 10.0) -> None:
    """Wait until the balancer's table shows each moved terminal at its last care-of
    address, confirmed: the home-agent agent's notification travels beside the terminal's
    own Binding Update, and a reader of ``ctl show`` should see where the terminal is."""
    import io

    from lbproxy.ops.ctl import main as ctl

    wanted = {}
    for terminal in report["terminals"].values():
        for conn in terminal["connections"]:
            moved = [m["coa"] for m in conn["moves"] if m.get("ok")]
            if moved:
                wanted[f"addr {terminal['hoa']}"] = moved[-1]
    deadline = time.monotonic() + timeout
    while wanted and time.monotonic() < deadline:
        out = io.StringIO()
        if ctl(["--socket", state["control_socket"], "--json", "show", "--limit", "1000"],
               stdout=out, stderr=io.StringIO()) == 0:
            for row in json.loads(out.getvalue())["rows"]:
                if wanted.get(row["key"]) == row.get("care_of") and row.get("confirmed"):
                    del wanted[row["key"]]
        if wanted:
            time.sleep(0.1)
    for key, care_of in wanted.items():
        print(f"(the balancer has not confirmed {key} at {care_of} yet)")


def _move(directory: Path, terminal: int, link: int) -> int:
    from lbproxy.testbed import control

    state = _need_state(directory)
    answer = control.request(state["terminal_control"], "move", timeout=15.0,
                             terminal=terminal, link=link, wait=True)  # fmt: skip
    print(f"terminal {terminal} now on access link {link}: care-of {answer.get('coa')}, "
          f"registered {answer.get('registered')}")
    return 0


def _exec(directory: Path, role: str, command: Sequence[str]) -> int:
    state = _need_state(directory)
    namespace = state["namespaces"].get(role)
    if namespace is None:
        raise SystemExit(f"lbproxy lab: no namespace {role!r} "
                         f"(roles: {', '.join(state['namespaces'])})")
    os.execvp("ip", ["ip", "netns", "exec", namespace, *command])
    return 127  # not reached


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m lbproxy.lab", description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dir", default=None,
                        help=f"state directory (default $LBPROXY_LAB_DIR or {DEFAULT_DIR})")
    sub = parser.add_subparsers(dest="command", required=True)
    up = sub.add_parser("up", help="build the lab and start everything, then return")
    up.add_argument("--terminals", type=int, default=3)
    up.add_argument("--no-agent", action="store_true",
                    help="without lbproxy-homeagent (no care-of address notifications)")
    up.add_argument("--timeout", type=float, default=120.0)
    down = sub.add_parser("down", help="stop everything and delete the namespaces")
    down.add_argument("--timeout", type=float, default=60.0)
    sub.add_parser("status", help="what runs, and how to reach it")
    sub.add_parser("ctl", help="lbproxyctl against the lab's balancer: ctl ARGS...")
    traffic = sub.add_parser("traffic", help="TCP sessions from terminals, moving meanwhile")
    traffic.add_argument("--terminals", default="1", help="e.g. 1 or 1-3")
    traffic.add_argument("--moves", default="", help="access links to move through, e.g. 2,3")
    traffic.add_argument("--chunks", type=int, default=9)
    move = sub.add_parser("move", help="move a terminal to an access link (1..3)")
    move.add_argument("terminal", type=int)
    move.add_argument("link", type=int)
    sub.add_parser("exec", help="run a command in a lab namespace: exec ROLE COMMAND... "
                                "(roles net, term, ha, lb, sw, srv1..srv3)")
    keep = sub.add_parser("_keep", help=argparse.SUPPRESS)
    keep.add_argument("--terminals", type=int, default=3)
    keep.add_argument("--no-agent", action="store_true")
    return parser


def _split_passthrough(argv: list[str]) -> tuple[list[str], list[str]]:
    """``ctl`` and ``exec`` pass everything after them on untouched (options too)."""
    for i, word in enumerate(argv):
        if word in ("ctl", "exec") and (i == 0 or argv[i - 1] != "--dir"):
            return argv[: i + 1], argv[i + 1:]
    return argv, []


def main(argv: Sequence[str] | None = None) -> int:
    own, rest = _split_passthrough(list(sys.argv[1:] if argv is None else argv))
    options = _parser().parse_args(own)
    directory = _state_dir(options.dir)
    command = options.command
    if command == "up":
        return _up(directory, options.terminals, not options.no_agent, options.timeout)
    if command == "_keep":
        return _keep(directory, options.terminals, not options.no_agent)
    if command == "down":
        return _down(directory, options.timeout)
    if command == "status":
        return _status(directory)
    if command == "ctl":
        return _ctl(directory, rest)
    if command == "traffic":
        return _traffic(directory, options.terminals, options.moves, options.chunks)
    if command == "move":
        return _move(directory, options.terminal, options.link)
    if command == "exec":
        if len(rest) < 2:
            raise SystemExit("lbproxy lab: exec ROLE COMMAND...")
        return _exec(directory, rest[0], rest[1:])
    raise AssertionError(command)


if __name__ == "__main__":
    sys.exit(main())
