"""twistd plugin: ``twistd lbproxy`` runs the balancer (see lbproxy.tap)."""

from twisted.application.service import ServiceMaker

lbproxy = ServiceMaker(
    "lbproxy",
    "lbproxy.tap",
    "Server-consistent load balancer for mobile IPv6 terminals",
    "lbproxy",
)
