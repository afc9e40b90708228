"""The operator's changes to a running balancer: move, forget, drain, undrain.

Why a module of its own: these are the only changes to bindings and backends that come
from a person rather than from traffic or an authenticated notification, so they are kept
apart from the per-packet decisions (`lbproxy.core.balancer`) and from how operators
reach them (the manhole, ``lbproxyctl``, `lbproxy.ops.control`).  Each is one call on the
core's public operations.
"""

from __future__ import annotations

import attrs

from lbproxy.core.balancer import Balancer
from lbproxy.core.keys import Key
from lbproxy.core.table import Binding

__all__ = ["TableFullError", "drain", "forget", "move", "set_weight"]


class TableFullError(RuntimeError):
    """The table is full of established bindings: a new one cannot be made."""


def move(balancer: Balancer, key: Key, backend_name: str) -> Binding:
    """Send the terminal `key` identifies to the named backend now: its live binding
    (found by any of its identities) moves with its aliases, or a binding is made.
    ``KeyError`` for an unknown backend, `TableFullError` when a new binding cannot be
    made."""
    backend = balancer.backends[backend_name]
    table = balancer.table
    binding = table.get(key)
    if binding is not None:
        table.repoint(binding, backend)
        return binding
    binding = table.insert(key, backend)
    if binding is None:
        raise TableFullError("the table is full")
    return binding


def forget(balancer: Balancer, key: Key) -> Binding | None:
    """Drop the binding for `key`; its next packet is scheduled afresh."""
    return balancer.table.remove(key)


def set_weight(balancer: Balancer, backend_name: str, weight: int) -> None:
    """Give a backend a new scheduling weight; existing bindings stay (0: drained)."""
    if weight < 0:
        raise ValueError(f"a weight is >= 0, not {weight}")
    target = balancer.backends[backend_name]
    balancer.set_backends(
        [attrs.evolve(b, weight=weight) if b is target else b for b in balancer.backends.values()]
    )


def drain(balancer: Balancer, backend_name: str) -> None:
    """Weight 0: existing bindings stay, no new ones are made."""
    set_weight(balancer, backend_name, 0)
