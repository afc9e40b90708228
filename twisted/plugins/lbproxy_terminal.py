"""twistd plugin: ``twistd lbproxy-terminal`` (see lbproxy.agents.terminal)."""

from twisted.application.service import ServiceMaker

lbproxy_terminal = ServiceMaker(
    "lbproxy terminal agent",
    "lbproxy.agents.terminal",
    "Publishes this terminal's own care-of address changes to lbproxy balancers",
    "lbproxy-terminal",
)
