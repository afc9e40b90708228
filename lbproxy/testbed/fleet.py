"""A fleet of real balancers (``twistd -n lbproxy`` with ``[fleet]``) in one test bed.

Why a module of its own: the fleet's integration tests and benchmark start several
balancers the way an operator would -- one configuration file each, the same backends and
Maglev, a ``[fleet]`` section with a unique name and one shared store -- and need to stop
one, take it out of the routes, bring it back, and read each balancer's table.  The bed
(``TestBed(balancers=N)``) builds the network; this module runs the store and the
balancers on it::

    with TestBed(terminals=50, backends=3, balancers=3) as bed, \\
            BedFleet(bed, key_chain=["src"]) as fleet:
        report = bed.workload(moves=[2, 3])
        fleet.kill(2)                      # withdrawn from the routes, twistd stopped
        fleet.revive(2)                    # started again (loads the store), routes back

The store is `lbproxy.testbed.store.RedisServer` on a UNIX socket in the bed's working
directory: a file, so every balancer's namespace reaches it (network namespaces do not
separate the file system).
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from typing import Any, Self

from lbproxy.ops import ctl
from lbproxy.testbed.balancer import BedBalancer, bed_config
from lbproxy.testbed.bed import TestBed
from lbproxy.testbed.store import RedisServer

__all__ = ["BedFleet", "fleet_section"]

PREFIX = "bed:"


def fleet_section(store: str, name: str, prefix: str = PREFIX, timeout: float = 1.0) -> str:
    """A balancer's ``[fleet]`` TOML (docs/configuration.md)."""
    return ("[fleet]\nenabled = true\n"
            f'store = "{store}"\nname = "{name}"\nprefix = "{prefix}"\n'
            f"timeout = {timeout}\n")


class BedFleet:
    """The store and one `BedBalancer` per balancer namespace of ``bed``.

    ``extra``: more TOML for every balancer (e.g. a ``[notify]`` section), or a function of
    the balancer's index giving it; other keyword arguments go to `bed_config`.
    """

    def __init__(self, bed: TestBed, extra: str | Callable[[int], str] = "",
                 **config: Any) -> None:
        self.bed = bed
        directory = bed.path("store")
        os.makedirs(directory, exist_ok=True)
        self.store = RedisServer(directory)
        self.balancers: dict[int, BedBalancer] = {}
        for k in bed.balancer_indices:
            more = extra(k) if callable(extra) else extra
            text = bed_config(bed, balancer=k, extra=fleet_section(
                self.store.endpoint, self.member(k)) + more, **config)
            self.balancers[k] = BedBalancer(bed, text, name=self.member(k), balancer=k)

    @staticmethod
    def member(index: int) -> str:
        """Balancer ``index``'s name in the fleet (and of its log and configuration)."""
        return f"lb{index}"

    def start(self) -> Self:
        """Start the store, then every balancer (each until it forwards and has loaded
        the store)."""
        try:
            self.store.start()
            for k, balancer in self.balancers.items():
                balancer.start()
                self.wait_loaded(k)
        except BaseException:
            self.stop()
            raise
        return self

    def stop(self) -> None:
        """Stop every balancer and the store (idempotent)."""
        for balancer in self.balancers.values():
            balancer.stop()
        self.store.close()

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def __getitem__(self, index: int) -> BedBalancer:
        return self.balancers[index]

    # -- a balancer dies and comes back ----------------------------------------------------

    def kill(self, index: int) -> None:
        """Balancer ``index`` fails: its next hops leave the routes (as when its BGP or BFD
        session drops), then its twistd is killed (SIGKILL: nothing is said to anyone)."""
        self.bed.withdraw_balancer(index)
        process = self.balancers[index].process
        if process is not None and process.poll() is None:
            process.kill()
            process.wait(10)

    def revive(self, index: int, timeout: float = 20.0) -> None:
        """Start balancer ``index`` again; once it forwards *and* has loaded the store's
        records into its replica (it forwards first: the load follows the connection),
        its next hops go back into the routes -- as a route announced only then."""
        self.balancers[index].start(timeout)
        self.wait_loaded(index, timeout)
        self.bed.restore_balancer(index)

    def wait_loaded(self, index: int, timeout: float = 20.0) -> None:
        deadline = time.monotonic() + timeout
        while not self.loaded(index):
            if time.monotonic() > deadline:
                raise RuntimeError(f"lb{index} did not load the store in {timeout} s")
            time.sleep(0.02)

    def loaded(self, index: int) -> bool:
        """Whether balancer ``index`` is connected to the store and has loaded it."""
        fleet = self.stats(index)["fleet"]
        return bool(fleet["store"]["state"] == "up" and fleet["replica"]["loads"] >= 1)

    # -- what the balancers say --------------------------------------------------------------

    def request(self, index: int, command: str, **args: Any) -> Any:
        """One command on balancer ``index``'s control socket (what ``lbproxyctl`` sends,
        without a process per question)."""
        return ctl.request(self.balancers[index].control_socket, command, args)

    def rows(self, index: int) -> list[dict[str, Any]]:
        """Balancer ``index``'s whole table (``show``), at most 10,000 rows."""
        rows: list[dict[str, Any]] = self.request(index, "show", limit=10_000)["rows"]
        return rows

    def view(self, index: int, key: str) -> dict[str, Any]:
        """``fleet KEY`` on balancer ``index``: local, shared and Maglev's answers."""
        result: dict[str, Any] = self.request(index, "fleet", key=key)
        return result

    def stats(self, index: int) -> dict[str, Any]:
        """Balancer ``index``'s counters (``stats``)."""
        result: dict[str, Any] = self.request(index, "stats")
        return result
