"""A pool of home agents as the balancer's backends (claim 11), in a running bed.

Why a module of its own: tests of the home-agent pool need, in each backend namespace,
the bed's home agent emulator (`lbproxy.testbed.homeagent`) answering on that backend's
address, with the kernel kept from answering Mobility Header packets itself::

    sockets = start_home_agent_pool(bed)           # backend index -> control socket
    control.request(sockets[1], "bindings")        # that home agent's binding cache

Each home agent logs its binding events to ``ha<i>.log`` in the bed's working directory
and is stopped with the bed.
"""

from __future__ import annotations

import time

from lbproxy.testbed import addresses, control
from lbproxy.testbed.bed import TestBed

__all__ = ["start_home_agent_pool"]

# The kernel has no MIPv6: it would answer a Mobility Header with Parameter Problem.
_RULES = """\
table ip6 lbpool {
  chain prerouting {
    type filter hook prerouting priority raw; policy accept;
    iifname "eth0" meta l4proto mobility-header drop
  }
}
"""


def start_home_agent_pool(bed: TestBed, timeout: float = 10.0) -> dict[int, str]:
    """A home agent emulator in each ``srv<i>`` namespace, on backend i's address (its
    home prefix the bed's); their control sockets by backend index, once all answer."""
    sockets = {}
    for i in bed.backend_indices:
        role = f"srv{i}"
        rules = bed.path(f"{role}-pool.nft")
        with open(rules, "w") as f:
            f.write(_RULES)
        bed.run(role, ["nft", "-f", rules])
        sockets[i] = bed.path(f"ha{i}.sock")
        bed.spawn(role, bed.python_module(
            "lbproxy.testbed.homeagent", "--address", str(addresses.backend_address(i)),
            "--iface", "eth0", "--control", sockets[i],
            "--log", bed.path(f"ha{i}.log")), name=f"ha{i}")
    deadline = time.monotonic() + timeout
    for i, path in sockets.items():
        while True:
            try:
                control.request(path, "bindings")
                break
            except (OSError, control.ControlError):
                if time.monotonic() > deadline:
                    raise RuntimeError(f"home agent {i} not answering after {timeout}s; "
                                       f"stderr: {bed.stderr(f'ha{i}')[-2000:]}") from None
                time.sleep(0.05)
    return sockets
