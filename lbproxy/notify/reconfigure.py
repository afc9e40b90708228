"""A reload of ``[notify]`` applied to the running notifier: peers and TLS material.

Why a module of its own: a reload must be all or nothing.  So it comes in two steps:
:func:`prepare` reads and checks everything the new ``[notify]`` needs -- the CA, the
certificate and the key (loaded, the key matching the certificate), each new or changed
peer's endpoint -- and changes nothing; any problem is a ``file: key: reason``
(`lbproxy.tomlconfig.ConfigError`) and the reload is refused whole.  Only then does
:meth:`NotifyChange.apply` change the running `lbproxy.notify.router.Notifier`, which
cannot fail half-way.

What a reload changes (``lbproxy.ops.reload.NOTIFY_FIELDS`` lists every key):

* **peers** (``[[notify.peer]]``, by name): an added peer is dialled at once and asked
  about the terminals the balancer already follows or holds bindings for that it may speak
  for; a removed peer's connection is closed (TLS close_notify; the agent ends that
  session's subscriptions), nothing more it says is believed, and its subscriptions are
  dropped (counted ``dropped``) and asked of the remaining peers; a changed peer (endpoint,
  identity, prefixes, home, interval) is dialled again with its new settings and keeps its
  subscriptions, but those for homes its new entitlement does not cover.
* **TLS material** (``ca``, ``certificate``, ``key``): read again on *every* reload, so a
  certificate renewed in place (same paths, new contents) is picked up too.  Connections
  made from then on present the new certificate and trust the new CA.  Connections
  already up are kept: the certificate is shown only in the handshake, and with an
  ephemeral key exchange (TLS 1.2+ ECDHE, what both ends negotiate) the old key protects
  nothing of a session already up, so dropping every peer -- each then resending its
  subscriptions and a snapshot -- would buy nothing.  A changed CA is different: it changes
  whom the balancer trusts, so each connection up is checked against the new CA at once
  and closed when its peer's certificate would no longer be accepted (counted
  ``tls_failed``; a configured peer is dialled again and the handshake decides).  The CA
  file may be a bundle (`lbproxy.notify.tls.load_cas`): trusting the old and the new CA
  for a while rotates a CA without closing anything.

Everything else in ``[notify]`` needs a restart, and the reload's answer says so.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import attrs
from twisted.internet.defer import Deferred, gatherResults

from lbproxy.notify.client import Peer
from lbproxy.notify.tls import TlsMaterial, load_cas
from lbproxy.tomlconfig import ConfigError

if TYPE_CHECKING:
    from lbproxy.config import NotifyConfig, PeerConfig
    from lbproxy.notify.router import Notifier

__all__ = ["NotifyChange", "prepare"]


@attrs.frozen
class NotifyChange:
    """What a reload will change in a running notifier; made by :func:`prepare`."""

    added: tuple[tuple[Peer, Any], ...] = ()  # (peer, its client endpoint)
    removed: tuple[str, ...] = ()
    changed: tuple[tuple[Peer, Any], ...] = ()
    material: TlsMaterial | None = None  # None: the material in force is unchanged
    parts: tuple[str, ...] = ()  # what of the material differs: certificate, key, CA
    tls_keys: tuple[str, ...] = ()  # the keys naming the material that changed

    @property
    def empty(self) -> bool:
        return not (self.added or self.removed or self.changed or self.material
                    or self.tls_keys)  # fmt: skip

    def apply(self, notifier: Notifier) -> tuple[list[str], Deferred[Any]]:
        """Change ``notifier``; returns the phrases for the reload's answer and a Deferred
        that fires when the removed and changed peers' old connections are closed."""
        applied: list[str] = []
        closing: list[Deferred[Any]] = []
        if self.material is not None:
            # Rotated first: a peer added below is dialled with the new material.
            outcome = notifier.use_material(self.material)
            what = ", ".join(self.parts)
            if "CA" in self.parts:
                up = (f"connections up: {outcome['kept']} kept, {outcome['closed']} closed "
                      "(not trusted by the new CA)")  # fmt: skip
            else:
                up = f"{outcome['kept']} connections up keep theirs until they reconnect"
            label = ", ".join(self.tls_keys) or "notify TLS files"
            applied.append(f"{label} (new {what}; {up})")
        elif self.tls_keys:
            applied.append(f"{', '.join(self.tls_keys)} (the same material)")
        phrases = [f"removed {name}" for name in self.removed]
        for name in self.removed:
            closing.append(notifier.remove_peer(name))
        for peer, endpoint in self.changed:
            closing.append(notifier.replace_peer(peer, endpoint))
            phrases.append(f"changed {peer.name}")
        for peer, endpoint in self.added:
            notifier.add_peer(peer, endpoint)
            phrases.insert(0, f"added {peer.name}")
        if phrases:
            applied.append(f"notify.peer ({'; '.join(phrases)})")
        return applied, gatherResults(closing, consumeErrors=True)


def _parts(old: TlsMaterial, new: TlsMaterial) -> tuple[str, ...]:
    parts = []
    if old.own.dump() != new.own.dump():
        parts.append("certificate")
    if old.own.privateKey.dump() != new.own.privateKey.dump():
        parts.append("key")
    if not old.same_ca(new):
        parts.append("CA")
    return tuple(parts)


def _why(error: BaseException) -> str:
    text = str(error) or type(error).__name__
    return text if len(text) <= 120 else text[:117] + "..."


def _endpoint(reactor: Any, path: str, index: int, peer: PeerConfig,
              problems: list[ConfigError]) -> Any:  # fmt: skip
    from twisted.internet.endpoints import clientFromString

    try:
        return clientFromString(reactor, peer.endpoint)
    except Exception as e:
        problems.append(ConfigError(path, f"notify.peer[{index}].endpoint",
                                    f"{peer.endpoint!r}: {_why(e)}"))  # fmt: skip
        return None


def prepare(
    notifier: Notifier,
    running: NotifyConfig,
    new: NotifyConfig,
    path: str,
    reactor: Any,
) -> NotifyChange | Sequence[ConfigError]:
    """Read and check what the new ``[notify]`` needs; change nothing.  Returns the
    change to apply, or the problems (``file: key: reason``) that refuse the reload."""
    problems: list[ConfigError] = []
    material: TlsMaterial | None = None
    try:
        load_cas(Path(new.ca).read_bytes())
    except Exception as e:  # the whole bundle, where the start-up checks read the first
        problems.append(ConfigError(path, "notify.ca", f"{new.ca}: not a PEM certificate "
                                                       f"bundle ({_why(e)})"))  # fmt: skip
    else:
        try:
            material = TlsMaterial.from_files(new.ca, new.certificate, new.key)
        except Exception as e:  # changed since the start-up checks read them
            problems.append(ConfigError(path, "notify.certificate", f"{new.certificate} and "
                                        f"{new.key} cannot be loaded ({_why(e)})"))
    before = {p.name: p for p in running.peers}
    after = {p.name: p for p in new.peers}
    added: list[tuple[Peer, Any]] = []
    changed: list[tuple[Peer, Any]] = []
    for index, config in enumerate(new.peers):
        if before.get(config.name) == config:
            continue
        try:
            peer = Peer.from_config(config)
        except ValueError as e:
            problems.append(ConfigError(path, f"notify.peer[{index}]", _why(e)))
            continue
        endpoint = _endpoint(reactor, path, index, config, problems)
        (changed if config.name in before else added).append((peer, endpoint))
    if problems:
        return problems
    assert material is not None
    in_force = notifier.credentials.material
    rotated = None if in_force.same_as(material) else material
    tls_keys = tuple(f"notify.{k}" for k in ("ca", "certificate", "key")
                     if getattr(running, k) != getattr(new, k))  # fmt: skip
    return NotifyChange(
        added=tuple(added),
        removed=tuple(name for name in before if name not in after),
        changed=tuple(changed),
        material=rotated,
        parts=_parts(in_force, material) if rotated is not None else (),
        tls_keys=tls_keys,
    )
