"""A twistd program (the balancer or an agent) run in one of a test bed's namespaces.

Why a module of its own: the integration tests, the benchmarks and ``make demo`` start
lbproxy's programs the way an operator would -- a configuration file and ``twistd -n`` --
and stop and restart them; this is that, once.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from typing import Self

from lbproxy.testbed.bed import TestBed

__all__ = ["TwistdProcess"]


class TwistdProcess:
    """``twistd -n PLUGIN --config FILE`` in ``role``'s namespace: start, stop, restart, log.

    ``ready`` is the log line that says the program is serving; a start waits for one
    more of it than the log already holds, so a restart waits for the new process.
    """

    def __init__(self, bed: TestBed, role: str, plugin: str, config: str, name: str,
                 ready: str) -> None:
        self.bed = bed
        self.role = role
        self.plugin = plugin
        self.name = name
        self.ready = ready
        self.config_path = bed.path(f"{name}.toml")
        self.log_path = bed.path(f"{name}.log")
        with open(self.config_path, "w") as f:
            f.write(config)
        self.process: subprocess.Popen[bytes] | None = None
        self.starts = 0

    def argv(self) -> list[str]:
        twistd = os.path.join(os.path.dirname(sys.executable), "twistd")
        return [twistd, "-n", "--pidfile=", f"--logfile={self.log_path}",
                self.plugin, "--config", self.config_path]

    def start(self, timeout: float = 20.0) -> Self:
        """Start twistd and wait until it logs its ready line (again)."""
        seen = self.log().count(self.ready)
        output = f"{self.name}-{self.starts}" if self.starts else self.name
        self.process = self.bed.spawn(self.role, self.argv(), name=output)
        self.starts += 1
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.log().count(self.ready) > seen:
                return self
            if self.process.poll() is not None:
                raise RuntimeError(
                    f"{self.name} exited {self.process.returncode}: "
                    f"{self.bed.stderr(output)[-2000:]}{self.log()[-2000:]}")
            time.sleep(0.05)
        raise RuntimeError(f"{self.name} not ready after {timeout}s: {self.log()[-2000:]}")

    def stop(self) -> None:
        """Stop twistd gracefully (SIGTERM) and wait for it."""
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(5)

    def restart(self, pause: float = 0.0) -> Self:
        """Stop, wait ``pause`` seconds, start again (same configuration)."""
        self.stop()
        time.sleep(pause)
        return self.start()

    def log(self) -> str:
        try:
            with open(self.log_path, errors="replace") as f:
                return f.read()
        except FileNotFoundError:
            return ""
