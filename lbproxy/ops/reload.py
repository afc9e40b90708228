"""What a reload does with each key of the configuration file, and what it answers.

Why a module of its own: a reload must answer honestly -- what it applied, what it
ignored, what needs a restart -- and for that it compares the file with what is
*running*, not with the file it read last.  After a reload that changes ``mode`` (which
needs a restart), the running mode is still the old one, so the next reload of the same
file says again that ``balancer.mode`` needs a restart.  This module holds the table of
every configuration field and what a reload does with it (`FIELDS`; a test checks that
no field of `lbproxy.config.Config` is missing from it), the comparison, and the answer
(`ReloadReport`).  `lbproxy.tap.BalancerService.reload` applies the changes.

=============================  ===============================  ======================
field                          file key                         a reload
=============================  ===============================  ======================
virtual addresses, ports       ``virtual.*``                    applies
backends                       ``[[backend]]``                  applies (operator
                                                                weight overrides stay)
key chain, ``any_interface_id``  ``balancer.key_chain`` ...     applies
QUIC-LB settings, server IDs   ``[quic]``, ``quic_server_id``   applies (the chain is
                                                                rebuilt)
scheduler                      ``balancer.scheduler``           applies
health checks                  ``[health]``                     applies
manhole, control socket,       ``[manhole]``, ``[control]``,    applies (restarts that
metrics endpoint               ``[metrics]``                    listener in place)
persistence                    ``[persistence]``                applies (the running
                                                                table is kept)
interfaces                     ``interfaces.*``                 needs a restart
mode, lifetime, max_entries,   ``balancer.*``                   needs a restart
sweep_interval, batch,
link_send, offload
notifications: peers, TLS      ``notify.peer``, ``notify.ca``,  applies (`NOTIFY_FIELDS`;
material                       ``.certificate``, ``.key``       `lbproxy.notify.reconfigure`)
notifications: the rest        ``notify.*``                     needs a restart
the fleet                      ``[fleet]``                      needs a restart
log format                     ``logging.format``               needs a restart
=============================  ===============================  ======================

``[notify]`` is applied key by key (`NOTIFY_FIELDS`): its peers and TLS material change
while the notifier runs; its limits, deadlines, address rules and dial-in listener are
built into the running registry, gate and sessions, so they need a restart, as does
switching notifications on or off.  ``[fleet]`` needs a restart because the fleet service
(`lbproxy.fleet`) offers no way to change its store or name.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import attrs

if TYPE_CHECKING:
    from lbproxy.config import BackendConfig, Config, NotifyConfig

__all__ = [
    "APPLIES",
    "FIELDS",
    "NOTIFY_FIELDS",
    "PARTLY",
    "RESTART",
    "Field",
    "ReloadRefusedError",
    "ReloadReport",
    "backend_changes",
    "differences",
    "notify_differences",
    "pending",
    "restart_fields",
]

APPLIES = "applies"
RESTART = "restart"
PARTLY = "partly"  # a section some of whose keys apply, the others needing a restart


@attrs.frozen
class Field:
    """One field of `lbproxy.config.Config`: its key in the file and what a reload does."""

    name: str
    key: str
    action: str

    @property
    def section(self) -> str:
        """The file's section the key is in (``manhole`` for ``manhole.endpoint``)."""
        return self.key.split(".", 1)[0]


FIELDS: tuple[Field, ...] = tuple(
    Field(name, key, action)
    for name, key, action in (
        ("virtual_addresses", "virtual.addresses", APPLIES),
        ("ports", "virtual.ports", APPLIES),
        ("client_interface", "interfaces.client", RESTART),
        ("server_interface", "interfaces.server", RESTART),
        ("backends", "backend", APPLIES),
        ("mode", "balancer.mode", RESTART),
        ("key_chain", "balancer.key_chain", APPLIES),
        ("any_interface_id", "balancer.any_interface_id", APPLIES),
        ("quic", "quic", APPLIES),
        ("scheduler", "balancer.scheduler", APPLIES),
        ("lifetime", "balancer.lifetime", RESTART),
        ("max_entries", "balancer.max_entries", RESTART),
        ("sweep_interval", "balancer.sweep_interval", RESTART),
        ("batch", "balancer.batch", RESTART),
        ("link_send", "balancer.link_send", RESTART),
        ("offload", "balancer.offload", RESTART),
        ("correspondent", "correspondent", RESTART),
        ("health", "health", APPLIES),
        ("notify", "notify", PARTLY),
        ("fleet", "fleet", RESTART),
        ("manhole_endpoint", "manhole.endpoint", APPLIES),
        ("manhole_authorized_keys", "manhole.authorized_keys", APPLIES),
        ("manhole_host_key", "manhole.host_key", APPLIES),
        ("control_socket", "control.socket", APPLIES),
        ("journeys", "control.journeys", RESTART),
        ("metrics_endpoint", "metrics.endpoint", APPLIES),
        ("persistence_path", "persistence.path", APPLIES),
        ("persistence_interval", "persistence.interval", APPLIES),
        ("persistence_max_bytes", "persistence.max_bytes", APPLIES),
        ("logging_format", "logging.format", RESTART),
    )
)


#: ``[notify]``, key by key: the fields of `lbproxy.config.NotifyConfig` (a test checks
#: that none is missing).  Switching notifications on or off needs a restart for all.
NOTIFY_FIELDS: tuple[Field, ...] = tuple(
    Field(name, "notify." + key, action)
    for name, key, action in (
        ("enabled", "enabled", RESTART),
        ("ca", "ca", APPLIES),
        ("certificate", "certificate", APPLIES),
        ("key", "key", APPLIES),
        ("peers", "peer", APPLIES),
        ("max_subscriptions", "max_subscriptions", RESTART),
        ("forbidden_prefixes", "forbidden_prefixes", RESTART),
        ("care_of_prefixes", "care_of_prefixes", RESTART),
        ("allow_unique_local", "allow_unique_local", RESTART),
        ("call_timeout", "call_timeout", RESTART),
        ("handshake_timeout", "handshake_timeout", RESTART),
        ("max_outstanding", "max_outstanding", RESTART),
        ("interval", "interval", RESTART),
        ("idle_lifetime", "idle_lifetime", RESTART),
        ("listen", "listen", RESTART),
        ("max_dial_in", "max_dial_in", RESTART),
    )
)


def notify_differences(running: NotifyConfig, new: NotifyConfig) -> list[Field]:
    """The ``[notify]`` keys whose value differs, each with what a reload does with it
    (all need a restart when ``enabled`` changes)."""
    names = {a.name for a in attrs.fields(type(running))}
    found = [f for f in NOTIFY_FIELDS
             if f.name in names and getattr(running, f.name) != getattr(new, f.name)]
    if running.enabled != new.enabled:
        return [attrs.evolve(f, action=RESTART) for f in found]
    return found


def _notify_in_force(running: NotifyConfig, new: NotifyConfig) -> NotifyConfig:
    """``[notify]`` after a reload: ``new``'s keys that apply, ``running``'s others."""
    return attrs.evolve(running, **{f.name: getattr(new, f.name)
                                    for f in notify_differences(running, new)
                                    if f.action == APPLIES})  # fmt: skip


def pending(running: Config, disk: Config) -> tuple[list[str], list[str]]:
    """The keys of ``disk`` that differ from what runs: (needing a restart, a reload)."""
    restart: list[str] = []
    reload: list[str] = []
    for f in differences(running, disk):
        fields = notify_differences(running.notify, disk.notify) if f.action == PARTLY else [f]
        for part in fields:
            (restart if part.action == RESTART else reload).append(part.key)
    return restart, reload


def _fields(config: Config) -> list[Field]:
    """The rules for the fields ``config`` has (a rule may be ahead of its field)."""
    names = {a.name for a in attrs.fields(type(config))}
    return [f for f in FIELDS if f.name in names]


def differences(running: Config, new: Config) -> list[Field]:
    """The fields whose value in ``new`` differs from ``running``, in `FIELDS` order."""
    return [f for f in _fields(running) if getattr(running, f.name) != getattr(new, f.name)]


def restart_fields(running: Config, new: Config) -> dict[str, Any]:
    """``new``'s fields that a reload cannot apply, set back to ``running``'s: what is
    in force after a reload (``attrs.evolve(new, **restart_fields(running, new))``)."""
    kept = {f.name: getattr(running, f.name) for f in _fields(running) if f.action == RESTART}
    if any(f.name == "notify" for f in _fields(running)):
        kept["notify"] = _notify_in_force(running.notify, new.notify)
    return kept


def _health_text(b: BackendConfig) -> str:
    if b.health == "none":
        return "none"
    path = b.health_path if b.health == "http" else ""
    return f"{b.health}:{b.health_port}{path}"


def backend_changes(
    old: Sequence[BackendConfig], new: Sequence[BackendConfig], overridden: Sequence[str] = ()
) -> list[str]:
    """What changed in the backend list, as short phrases: ``added b3``, ``removed b2``,
    ``b1 weight 1 -> 2``, ``b1 address ...``, ``b1 health tcp:80 -> none``.  The weight
    of a backend in ``overridden`` is left out (the operator's override stays)."""
    before = {b.name: b for b in old}
    after = {b.name: b for b in new}
    phrases = [f"added {name}" for name in after if name not in before]
    phrases += [f"removed {name}" for name in before if name not in after]
    for name, b in after.items():
        a = before.get(name)
        if a is None:
            continue
        if a.address != b.address:
            phrases.append(f"{name} address {a.address} -> {b.address}")
        if a.weight != b.weight and name not in overridden:
            phrases.append(f"{name} weight {a.weight} -> {b.weight}")
        if _health_text(a) != _health_text(b):
            phrases.append(f"{name} health {_health_text(a)} -> {_health_text(b)}")
    if not phrases and [b.name for b in old] != [b.name for b in new]:
        phrases.append("order")
    return phrases


class ReloadRefusedError(ValueError):
    """The new file cannot be used here (problems the start-up checks find in a section
    the reload would apply); nothing was changed.  ``str()`` is each problem's ``file:
    key: reason``, joined by ``; ``."""

    def __init__(self, problems: Sequence[object]) -> None:
        self.problems = tuple(problems)
        super().__init__("; ".join(str(p) for p in self.problems))


@attrs.frozen
class ReloadReport:
    """What a reload did: keys (with details) applied, needing a restart, ignored, and
    those it tried to apply and could not (the old setting stays in force)."""

    applied: tuple[str, ...] = ()
    restart: tuple[str, ...] = ()
    ignored: tuple[str, ...] = ()
    failed: tuple[str, ...] = ()

    def summary(self) -> str:
        """One line: ``applied: ...; needs a restart: ...; ignored: ...; failed: ...``,
        or ``nothing changed``."""
        parts = [
            f"{label}: {', '.join(items)}"
            for label, items in (
                ("applied", self.applied),
                ("needs a restart", self.restart),
                ("ignored", self.ignored),
                ("failed", self.failed),
            )
            if items
        ]
        return "; ".join(parts) or "nothing changed"

    def __str__(self) -> str:
        return self.summary()

    def as_dict(self) -> dict[str, Any]:
        """The report as JSON-ready values (``lbproxyctl --json reload``)."""
        return {
            "applied": list(self.applied),
            "restart": list(self.restart),
            "ignored": list(self.ignored),
            "failed": list(self.failed),
            "summary": self.summary(),
        }
