"""Run the real balancer (``twistd -n lbproxy``) in a test bed's ``lb`` namespace.

Why a module of its own: the integration tests and ``make demo`` start the balancer the
way an operator would -- a configuration file and twistd -- and both need the same
configuration for the bed's fixed address plan (`lbproxy.testbed.addresses`).
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Sequence
from typing import Any

from lbproxy.testbed import addresses
from lbproxy.testbed.bed import TestBed

__all__ = ["BedBalancer", "bed_config"]

READY_LINE = "lbproxy forwarding"


def bed_config(
    bed: TestBed,
    *,
    mode: str = "translate",
    key_chain: Sequence[str] = ("hoa", "iid", "spi", "src"),
    scheduler: str = "maglev",
    lifetime: float = 300.0,
    any_interface_id: bool = False,
    extra: str = "",
) -> str:
    """A balancer configuration (TOML text) for ``bed``'s address plan."""
    chain = ", ".join(f'"{k}"' for k in key_chain)
    lines = [
        "[balancer]",
        f'mode = "{mode}"',
        f"key_chain = [{chain}]",
        f"any_interface_id = {'true' if any_interface_id else 'false'}",
        f'scheduler = "{scheduler}"',
        f"lifetime = {lifetime}",
        "sweep_interval = 0.5",
        "[virtual]",
        f'addresses = ["{addresses.VIP}"]',
        "[interfaces]",
        'client = "lbc"',
        'server = "lbs"',
        "[control]",
        f'socket = "{bed.path("lbproxy-control.sock")}"',
    ]
    for i in bed.backend_indices:
        lines += [
            "[[backend]]",
            f'name = "{addresses.backend_name(i)}"',
            f'address = "{addresses.backend_address(i)}"',
        ]
    return "\n".join(lines) + "\n" + extra


class BedBalancer:
    """The balancer process in a bed: started under twistd, stopped with the bed."""

    def __init__(self, bed: TestBed, config: str, name: str = "lbproxy") -> None:
        self.bed = bed
        self.name = name
        self.config_path = bed.path(f"{name}.toml")
        self.log_path = bed.path(f"{name}.log")
        with open(self.config_path, "w") as f:
            f.write(config)
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def control_socket(self) -> str:
        return self.bed.path("lbproxy-control.sock")

    def argv(self) -> list[str]:
        twistd = os.path.join(os.path.dirname(sys.executable), "twistd")
        return [
            twistd, "-n", "--pidfile=", f"--logfile={self.log_path}",
            "lbproxy", "--config", self.config_path,
        ]

    def start(self, timeout: float = 20.0) -> BedBalancer:
        """Start twistd and wait until the forwarder reads both links."""
        self.process = self.bed.spawn("lb", self.argv(), name=self.name)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if READY_LINE in self.log():
                return self
            if self.process.poll() is not None:
                raise RuntimeError(
                    f"balancer exited {self.process.returncode}: "
                    f"{self.bed.stderr(self.name)[-2000:]}{self.log()[-2000:]}"
                )
            time.sleep(0.05)
        raise RuntimeError(f"balancer not ready after {timeout}s: {self.log()[-2000:]}")

    def stop(self) -> None:
        """Stop twistd gracefully (SIGTERM) and wait for it."""
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(5)

    def log(self) -> str:
        try:
            with open(self.log_path, errors="replace") as f:
                return f.read()
        except FileNotFoundError:
            return ""

    def ctl(self, *args: str) -> Any:
        """Run ``lbproxyctl --json`` against this balancer; the decoded answer."""
        import json

        result = subprocess.run(
            [sys.executable, "-m", "lbproxy.ctl", "--socket", self.control_socket, "--json",
             *args],
            capture_output=True, text=True, timeout=30, check=False,
        )
        if result.returncode != 0:
            raise RuntimeError(f"lbproxyctl {' '.join(args)}: {result.stderr.strip()}")
        return json.loads(result.stdout)
