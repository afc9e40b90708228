"""twistd plugin: ``twistd lbproxy-homeagent`` (see lbproxy.agents.homeagent)."""

from twisted.application.service import ServiceMaker

lbproxy_homeagent = ServiceMaker(
    "lbproxy home-agent agent",
    "lbproxy.agents.homeagent",
    "Publishes a home agent's care-of address bindings to lbproxy balancers",
    "lbproxy-homeagent",
)
