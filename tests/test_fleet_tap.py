"""The fleet in twistd's service tree: ``[fleet] enabled`` wires `FleetService` into
`BalancerService` (the replica is ``balancer.shared``), as a child before the forwarder."""

from __future__ import annotations

from pathlib import Path

from twisted.internet.testing import MemoryReactorClock
from twisted.trial.unittest import SynchronousTestCase

from lbproxy.config import load_config
from lbproxy.fleet.service import FleetService
from lbproxy.tap import BalancerService
from lbproxy.testing import MemoryPacketSystem

CONFIG = """
[balancer]
key_chain = ["hoa", "src"]
[virtual]
addresses = ["2001:db8:5::80"]
[interfaces]
client = "lbc"
server = "lbs"
[[backend]]
name = "a"
address = "2001:db8:b0::10"
[[backend]]
name = "b"
address = "2001:db8:b0::11"
[[backend]]
name = "c"
address = "2001:db8:b0::12"
[fleet]
enabled = {enabled}
store = "{store}"
name = "{name}"
prefix = "tap:"
"""


class FleetWiringTests(SynchronousTestCase):
    """The tree is built on a memory reactor (the sharing itself, on the real reactor and
    a real store, is tests/test_fleet.py)."""

    def service(self, name: str, enabled: bool = True) -> BalancerService:
        path = self.mktemp()
        Path(path).write_text(CONFIG.format(enabled="true" if enabled else "false",
                                            store="unix:path=/nonexistent/redis.sock",
                                            name=name))
        return BalancerService(load_config(path), MemoryReactorClock(), install_sighup=False,
                               system=MemoryPacketSystem(interfaces=("lbc", "lbs")))

    def test_wired(self) -> None:
        """The fleet service is a child started before the forwarder (the replica loads
        first), its replica is what the balancer asks on a miss, and it is configured
        from the file."""
        service = self.service("lb-1")
        fleet = service.fleet
        assert fleet is not None
        self.assertIsInstance(fleet, FleetService)
        self.assertIs(service.getServiceNamed("fleet"), fleet)
        self.assertIs(service.balancer.shared, fleet.replica)
        children = list(service)
        self.assertLess(children.index(fleet), children.index(service.forwarder))
        self.assertEqual((fleet.member, fleet.layout.prefix, fleet.store.endpoint),
                         ("lb-1", "tap:", "unix:path=/nonexistent/redis.sock"))
        self.assertIn(fleet.sync._table_changed, service.balancer.table.listeners)

    def test_off_by_default(self) -> None:
        off = self.service("lb-3", enabled=False)
        self.assertIsNone(off.fleet)
        self.assertIsNone(off.balancer.shared)
        with self.assertRaises(KeyError):
            off.getServiceNamed("fleet")
