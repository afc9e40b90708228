"""An SSH manhole: a Python console inside the running balancer, for operators.

Some questions are best answered by looking at the live objects themselves:
the sticky table, the backends, the key chain, the counters.  The manhole
is twisted.conch's: a ``TerminalRealm`` behind a ``Portal`` whose only
checker is ``SSHPublicKeyChecker`` over an ``authorized_keys`` file, so only
holders of a listed key get in (no passwords are ever offered).  The host key
is read from a file the operator generated (``ssh-keygen``), so clients can
pin it.  It listens on loopback unless configured otherwise.

Each session gets a fresh namespace (so one operator's variables do not leak
into another's) holding ``balancer``, ``table``, ``backends``, ``chain``,
``counters``, ``control`` and the helpers ``show()``, ``trace()``,
``move()``, ``forget()``, ``drain()``, ``backend_list()`` and ``stats()``
(see ``lbproxy.ops.control``).  Everything runs in the reactor thread: what you
type runs between packets, so keep it short.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any, cast

from twisted.application import strports
from twisted.application.service import IService
from twisted.conch import manhole, manhole_ssh
from twisted.conch.checkers import (
    IAuthorizedKeysDB,
    SSHPublicKeyChecker,
    readAuthorizedKeyFile,
)
from twisted.conch.insults import insults
from twisted.conch.ssh import keys
from twisted.cred import portal
from twisted.cred.portal import IRealm
from twisted.logger import Logger
from zope.interface import implementer

from lbproxy.ops.control import Control

DEFAULT_ENDPOINT = r"tcp6:port=2222:interface=\:\:1"

log = Logger()


@implementer(IAuthorizedKeysDB)
class AuthorizedKeysFile:
    """Public keys allowed into the manhole, read from one ``authorized_keys`` file.

    The file is re-read at every login, so adding or removing a key takes
    effect without a restart.  Any user name is accepted with a listed key;
    an unreadable file admits no one.
    """

    def __init__(self, path: str) -> None:
        self.path = path

    def getAuthorizedKeys(self, avatarId: bytes) -> Iterable[keys.Key]:
        """Every key in the file (the same for every user name)."""
        try:
            with open(self.path, "rb") as handle:
                return list(readAuthorizedKeyFile(handle))
        except OSError as exc:
            log.error(
                "Cannot read manhole authorized keys {path}: {exc}", path=self.path, exc=exc
            )
            return []


def manhole_namespace(control: Control) -> dict[str, Any]:
    """The names an operator finds in a new manhole session."""
    balancer = control.balancer
    return {
        "balancer": balancer,
        "table": balancer.table,
        "backends": balancer.backends,
        "chain": balancer.chain,
        "counters": balancer.counters,
        "control": control,
        "show": control.show,
        "trace": control.trace,
        "move": control.move,
        "forget": control.forget,
        "drain": control.drain,
        "backend_list": control.backends,
        "stats": control.stats,
    }


def make_manhole_factory(
    namespace: Callable[[], dict[str, Any]],
    host_key_path: str,
    authorized_keys_path: str,
) -> manhole_ssh.ConchFactory:
    """The SSH factory: key-only auth, a fresh namespace per session."""
    realm = manhole_ssh.TerminalRealm()

    def chained_protocol() -> insults.ServerProtocol:
        return insults.ServerProtocol(manhole.ColoredManhole, namespace())

    realm.chainedProtocolFactory = chained_protocol  # type: ignore[assignment]
    checker = SSHPublicKeyChecker(AuthorizedKeysFile(authorized_keys_path))
    factory = manhole_ssh.ConchFactory(portal.Portal(cast(IRealm, realm), [checker]))
    host_key = keys.Key.fromFile(host_key_path)
    if host_key.isPublic():
        raise ValueError(f"{host_key_path} holds a public key; the host key must be private")
    # Instance attributes: ConchFactory's class-level dicts are shared by all.
    factory.privateKeys = {host_key.sshType(): host_key}
    factory.publicKeys = {host_key.sshType(): host_key.public()}
    return factory


def make_manhole_service(
    control: Control,
    host_key_path: str,
    authorized_keys_path: str,
    endpoint: str = DEFAULT_ENDPOINT,
    reactor: Any = None,
) -> IService:
    """The manhole over ``control``'s balancer on the strports ``endpoint``.

    The default endpoint is ``[::1]:2222``: loopback only.
    """
    factory = make_manhole_factory(
        lambda: manhole_namespace(control), host_key_path, authorized_keys_path
    )
    service: IService = strports.service(endpoint, factory, reactor=reactor)
    return service
