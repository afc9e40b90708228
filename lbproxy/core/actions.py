"""The operator's changes to a running balancer: move, forget, weight, drain, undrain.

Why a module of its own: these are the only changes to bindings and backends that come
from a person rather than from traffic or an authenticated notification, so they are kept
apart from the per-packet decisions (`lbproxy.core.balancer`) and from how operators
reach them (the manhole, ``lbproxyctl``, `lbproxy.ops.control`).  Each is one call on the
core's public operations.

Weights have two sources: the configuration file, and the operator (``weight``,
``drain``).  `Weights` keeps both, so that an operator's change survives a reload and can
be undone alone (``undrain``).  The rule:

* an operator's weight for a backend (an *override*) is in force until ``undrain`` (or
  another ``weight``) changes it, across reloads;
* a reload installs the file's backend list with the overrides applied on top; the file's
  weight for an overridden backend is not used (the reload says it ignored it);
* an override ends when its backend leaves the file, or when a reload brings the file's
  weight to the override's value (they agree; nothing is left to undo);
* a restart starts from the file alone.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence

import attrs

from lbproxy.core.balancer import Balancer
from lbproxy.core.keys import Key
from lbproxy.core.selection import Backend
from lbproxy.core.table import Binding

__all__ = [
    "MAX_WEIGHT",
    "TableFullError",
    "Weights",
    "drain",
    "forget",
    "move",
    "set_weight",
    "undrain",
]

#: The largest weight an operator may give (the configuration's bound too).
MAX_WEIGHT = 1000


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


class Weights:
    """The configured backends and the operator's weight overrides on top of them."""

    def __init__(self, configured: Iterable[Backend]) -> None:
        self.configured: tuple[Backend, ...] = tuple(configured)
        #: backend name -> the operator's weight, in force over the file's.
        self.overrides: dict[str, int] = {}

    def running(self) -> list[Backend]:
        """The backend list to install: the configured one with the overrides applied."""
        overrides = self.overrides
        return [
            attrs.evolve(b, weight=overrides[b.name]) if b.name in overrides else b
            for b in self.configured
        ]

    def configured_weight(self, name: str) -> int | None:
        """The file's weight for `name` (None: not configured)."""
        for b in self.configured:
            if b.name == name:
                return b.weight
        return None

    def configure(self, backends: Sequence[Backend]) -> dict[str, tuple[int, int]]:
        """A reload's backend list.  Overrides of backends no longer listed, or equal
        to the new file weight, end; returns, for each override still in force whose
        file weight changed, ``name -> (file weight, override)``: what the reload
        ignored."""
        before = {b.name: b.weight for b in self.configured}
        self.configured = tuple(backends)
        now = {b.name: b.weight for b in self.configured}
        for name in list(self.overrides):
            if name not in now or now[name] == self.overrides[name]:
                del self.overrides[name]
        return {
            name: (now[name], weight)
            for name, weight in self.overrides.items()
            if before.get(name) != now[name]
        }

    def as_dict(self) -> Mapping[str, int]:
        """The overrides in force, by backend name."""
        return dict(self.overrides)


def set_weight(
    balancer: Balancer, backend_name: str, weight: int, weights: Weights | None = None
) -> int:
    """Give a backend a new scheduling weight; existing bindings stay (0: drained).
    With `weights`, the change is an operator override that a reload keeps (see the
    module docstring).  Returns the weight it had."""
    if isinstance(weight, bool) or not 0 <= weight <= MAX_WEIGHT:
        raise ValueError(f"a weight is 0..{MAX_WEIGHT}, not {weight}")
    target = balancer.backends[backend_name]
    previous = target.weight
    if weights is None:
        balancer.set_backends(
            [attrs.evolve(b, weight=weight) if b is target else b
             for b in balancer.backends.values()]
        )
        return previous
    if weights.configured_weight(backend_name) is None:
        raise KeyError(backend_name)
    weights.overrides[backend_name] = weight
    balancer.set_backends(weights.running())
    return previous


def drain(balancer: Balancer, backend_name: str, weights: Weights | None = None) -> int:
    """Weight 0: existing bindings stay, no new ones are made.  Returns the weight it
    had."""
    return set_weight(balancer, backend_name, 0, weights)


def undrain(balancer: Balancer, backend_name: str, weights: Weights) -> int:
    """End the operator's override of a backend's weight: the file's weight is in force
    again (which is 0 if the file drains it).  Returns the weight it had."""
    previous = balancer.backends[backend_name].weight
    configured = weights.configured_weight(backend_name)
    if configured is None:
        raise KeyError(backend_name)
    weights.overrides.pop(backend_name, None)
    balancer.set_backends(weights.running())
    return previous
