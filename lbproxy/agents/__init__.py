"""The agents that run beside a home agent (``twistd lbproxy-homeagent``, claim 12) or on
a terminal (``twistd lbproxy-terminal``, claim 13) and notify balancers of care-of address
changes over the protocol of ``lbproxy.notify`` (docs/notify.md)."""
