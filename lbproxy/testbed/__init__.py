"""The network test bed: namespaces with moving MIPv6 terminals, a home agent, backends.

Test tooling, not part of the balancer's data path (see docs/testbed.md).
The Python API is :class:`TestBed`; the per-namespace programs are
``python -m lbproxy.testbed.terminal`` (the terminals), ``.homeagent``,
``.server`` (a backend) and ``.workload``.
"""

from lbproxy.testbed.bed import TestBed
from lbproxy.testbed.netns import BedUnavailableError, CommandError

__all__ = ["BedUnavailableError", "CommandError", "TestBed"]
