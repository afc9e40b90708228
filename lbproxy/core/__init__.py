"""The core ring: decisions, pure except for an injected clock.

Identities and key strategies (`keys`), the sticky table (`table`), backend selection
(`selection`), address rewrites (`nat`) and the balancer's decisions (`balancer`).  No
module here imports ``twisted.internet`` for I/O: every rule is testable with bytes and
a ``task.Clock``.
"""
