"""Run the real balancer (``twistd -n lbproxy``) in a test bed's ``lb`` namespace.

Why a module of its own: the integration tests and ``make demo`` start the balancer the
way an operator would -- a configuration file and twistd -- and both need the same
configuration for the bed's fixed address plan (`lbproxy.testbed.addresses`).
"""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from lbproxy.testbed import addresses
from lbproxy.testbed.bed import TestBed
from lbproxy.testbed.twistd import TwistdProcess

__all__ = ["BedBalancer", "bed_config", "control_socket"]

READY_LINE = "lbproxy forwarding"


def control_socket(bed: TestBed, balancer: int = 1) -> str:
    """Balancer ``balancer``'s control socket in ``bed`` (each of a fleet has its own)."""
    return bed.path("lbproxy-control.sock" if balancer == 1
                    else f"lbproxy{balancer}-control.sock")


def bed_config(
    bed: TestBed,
    *,
    mode: str = "translate",
    key_chain: Sequence[str] = ("hoa", "iid", "spi", "ike", "src"),
    scheduler: str = "maglev",
    lifetime: float = 300.0,
    max_entries: int | None = None,
    any_interface_id: bool = False,
    backends: Iterable[int] | None = None,
    weights: Mapping[int, int] | None = None,
    health: bool = False,
    offload: str | None = None,
    extra: str = "",
    balancer: int = 1,
) -> str:
    """A balancer configuration (TOML text) for ``bed``'s address plan.

    ``backends``: which of the bed's backends (default all), ``weights`` by backend
    index, ``health``: TCP checks on the backends' server port, ``offload``: the
    ``[balancer] offload`` setting (None: the key is left out; ``"xdp"`` wants a bed
    made with ``TestBed(xdp=True)``), ``max_entries`` the table bound (None: the
    default), ``balancer``: which of a fleet's balancers this is for (its control socket;
    the interfaces have the same names in every balancer's namespace).
    """
    chain = ", ".join(f'"{k}"' for k in key_chain)
    lines = [
        "[balancer]",
        f'mode = "{mode}"',
        f"key_chain = [{chain}]",
        f"any_interface_id = {'true' if any_interface_id else 'false'}",
        f'scheduler = "{scheduler}"',
        f"lifetime = {lifetime}",
        "sweep_interval = 0.5",
        *([f"max_entries = {max_entries}"] if max_entries is not None else []),
        *([f'offload = "{offload}"'] if offload is not None else []),
        "[virtual]",
        f'addresses = ["{addresses.VIP}"]',
        "[interfaces]",
        'client = "lbc"',
        'server = "lbs"',
        "[control]",
        f'socket = "{control_socket(bed, balancer)}"',
    ]
    for i in bed.backend_indices if backends is None else backends:
        lines += [
            "[[backend]]",
            f'name = "{addresses.backend_name(i)}"',
            f'address = "{addresses.backend_address(i)}"',
            f"weight = {(weights or {}).get(i, 1)}",
        ]
        if health:
            lines += ['health = "tcp"', f"health_port = {addresses.TCP_PORT}"]
    return "\n".join(lines) + "\n" + extra


class BedBalancer(TwistdProcess):
    """The balancer process in a bed: started under twistd, stopped with the bed."""

    def __init__(self, bed: TestBed, config: str, name: str = "lbproxy",
                 balancer: int = 1) -> None:
        super().__init__(bed, bed.balancer_role(balancer), "lbproxy", config, name,
                         READY_LINE)
        self.index = balancer

    @property
    def control_socket(self) -> str:
        return control_socket(self.bed, self.index)

    def ctl(self, *args: str) -> Any:
        """Run ``lbproxyctl --json`` against this balancer; the decoded answer."""
        result = subprocess.run(
            [sys.executable, "-m", "lbproxy.ops.ctl", "--socket", self.control_socket, "--json",
             *args],
            capture_output=True, text=True, timeout=30, check=False,
        )
        if result.returncode != 0:
            raise RuntimeError(f"lbproxyctl {' '.join(args)}: {result.stderr.strip()}")
        return json.loads(result.stdout)
