"""Care-of address notifications between the balancer and home agents or terminals.

The patent's second embodiment keys the table on the care-of address and keeps a terminal on
its backend because the balancer is *told* when that address changes: by the terminal's home
agent (claims 5, 12) or by the terminal itself (claims 6, 13).  A notification moves traffic,
so it travels over mutually authenticated TLS and is checked against what the peer may speak
for.  The protocol is specified in ``docs/notify.md``.

Pure modules: ``machine`` (per-peer state machine), ``policy`` (sequence numbers,
lifetimes, entitlements, refusal counters), ``addresses`` (which care-of and home addresses
may be believed), ``subscriptions`` (bounded registry), ``cache`` (an agent's binding
cache), ``gate`` (every check before any change).  Edges: ``commands`` (AMP vocabulary),
``tls`` (identity and role checks that fail closed), ``session`` (deadlines and bounds for
AMP with an untrusted peer), ``client`` (balancer side: peers it dials, terminals that dial
in), ``agent`` (agent side), ``router`` (``terminal_seen``, the subscription lifecycle, the
dial-in server, ``Notifier.report``), ``adapter`` (table and balancer; which source-address
bindings a home may move; whether a terminal is still alive).
"""
