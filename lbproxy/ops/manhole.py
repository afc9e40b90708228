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
``counters``, ``control`` and the helpers ``show()``, ``trace()``, ``move()``,
``forget()``, ``weight()``, ``drain()``, ``undrain()``, ``backend_list()``,
``stats()``, ``info()`` and ``reload()`` (see ``lbproxy.ops.control``).  The helpers
that change something are bound to the session's SSH user, so each change is logged as
an audit line naming them (``who="manhole user=alice"``).  Everything runs in the
reactor thread: what you type runs between packets, so keep it short.

The key files are refused when whoever could write them could log in: writable by
group or others, or owned by someone other than root or this process's user -- the rule
the start-up checks apply (``lbproxy.preflight``), applied again at every login for
``authorized_keys`` (read from the open file, so a swapped file cannot slip between the
check and the read) and whenever the host key is read.
"""

from __future__ import annotations

import functools
import os
import stat
from collections.abc import Callable, Iterable
from typing import IO, Any, cast

from twisted.application import strports
from twisted.application.service import IService
from twisted.conch import manhole, manhole_ssh
from twisted.conch.checkers import (
    IAuthorizedKeysDB,
    SSHPublicKeyChecker,
    readAuthorizedKeyFile,
)
from twisted.conch.insults import insults
from twisted.conch.interfaces import ISession
from twisted.conch.ssh import keys
from twisted.cred import portal
from twisted.cred.portal import IRealm
from twisted.logger import Logger
from zope.interface import implementer

from lbproxy.ops.control import Control, Text
from lbproxy.ops.journeyview import format_journey

DEFAULT_ENDPOINT = r"tcp6:port=2222:interface=\:\:1"

log = Logger()


class UnsafeKeyFileError(ValueError):
    """A manhole key file whose writers could log in (or impersonate the manhole)."""


def key_file_problem(path: str, info: os.stat_result) -> str | None:
    """Why a key file with status ``info`` must not be used, or None: writable by group
    or others, or owned by someone other than root or this process's user (the start-up
    checks' rule, ``lbproxy.preflight``)."""
    if info.st_mode & (stat.S_IWGRP | stat.S_IWOTH):
        return (f"{path}: writable by others (mode {stat.S_IMODE(info.st_mode):04o}); "
                "whoever can write it can log in")  # fmt: skip
    if info.st_uid not in (0, os.geteuid()):
        return f"{path}: owned by uid {info.st_uid}, neither root nor this process's user"
    return None


def _read_safely(path: str) -> bytes:
    """The contents of the key file ``path``, checked on the open file (`key_file_problem`);
    `UnsafeKeyFileError` when it must not be used, ``OSError`` when it cannot be read."""
    with open(path, "rb") as handle:
        _check_open(path, handle)
        return handle.read(1 << 20)


def _check_open(path: str, handle: IO[bytes]) -> None:
    info = os.fstat(handle.fileno())
    if not stat.S_ISREG(info.st_mode):
        raise UnsafeKeyFileError(f"{path}: not a regular file")
    problem = key_file_problem(path, info)
    if problem is not None:
        raise UnsafeKeyFileError(problem)


@implementer(IAuthorizedKeysDB)
class AuthorizedKeysFile:
    """Public keys allowed into the manhole, read from one ``authorized_keys`` file.

    The file is re-read at every login, so adding or removing a key takes
    effect without a restart.  Any user name is accepted with a listed key;
    an unreadable or unsafe file (`key_file_problem`) admits no one, and says why in
    the log.
    """

    def __init__(self, path: str) -> None:
        self.path = path

    def getAuthorizedKeys(self, avatarId: bytes) -> Iterable[keys.Key]:
        """Every key in the file (the same for every user name)."""
        try:
            with open(self.path, "rb") as handle:
                _check_open(self.path, handle)
                return list(readAuthorizedKeyFile(handle))
        except UnsafeKeyFileError as exc:
            log.error("Manhole authorized keys refused, no one may log in: {reason}",
                      reason=exc)  # fmt: skip
            return []
        except OSError as exc:
            log.error(
                "Cannot read manhole authorized keys {path}: {exc}", path=self.path, exc=exc
            )
            return []


def manhole_namespace(control: Control, user: str = "unknown") -> dict[str, Any]:
    """The names an operator finds in a new manhole session; the helpers that change
    something name ``user`` in their audit lines."""
    balancer = control.balancer
    who = f"manhole user={user}"
    return {
        "balancer": balancer,
        "table": balancer.table,
        "backends": balancer.backends,
        "chain": balancer.chain,
        "counters": balancer.counters,
        "control": control,
        "show": control.show,
        "trace": control.trace,
        "move": functools.partial(control.move, who=who),
        "forget": functools.partial(control.forget, who=who),
        "weight": functools.partial(control.weight, who=who),
        "drain": functools.partial(control.drain, who=who),
        "undrain": functools.partial(control.undrain, who=who),
        "reload": functools.partial(control.reload, who=who),
        "backend_list": control.backends,
        "stats": control.stats,
        "info": control.info,
        "journey": lambda key: Text(format_journey(control.journey(key))),
    }


class _SessionRealm(manhole_ssh.TerminalRealm):
    """A terminal realm whose sessions get a namespace made for their SSH user."""

    def __init__(self, namespace: Callable[[str], dict[str, Any]]) -> None:
        super().__init__()
        self.namespace = namespace

    def requestAvatar(self, avatarId: Any, mind: Any, *interfaces: Any) -> Any:
        interface, user, logout = super().requestAvatar(avatarId, mind, *interfaces)
        name = avatarId.decode("utf-8", "replace") if isinstance(avatarId, bytes) \
            else str(avatarId)  # fmt: skip
        session = user.original.getComponent(ISession)

        def chained_protocol() -> insults.ServerProtocol:
            return insults.ServerProtocol(manhole.ColoredManhole, self.namespace(name))

        session.chainedProtocolFactory = chained_protocol
        log.info("Manhole session for {user}.", user=name)
        return interface, user, logout


class ManholeFactory(manhole_ssh.ConchFactory):
    """The manhole's SSH factory; `use_keys` changes its key files in place (reload)."""

    noisy = False

    def __init__(self, portal: portal.Portal, authorized: AuthorizedKeysFile) -> None:
        super().__init__(portal)
        self.authorized = authorized

    def use_keys(self, host_key_path: str, authorized_keys_path: str) -> None:
        """Read the host key (refused: a public key, an unsafe or unreadable file) and
        admit the keys in ``authorized_keys_path`` from the next login on."""
        try:
            data = _read_safely(host_key_path)
        except OSError as exc:
            raise ValueError(f"{host_key_path}: {exc.strerror or exc}") from None
        host_key = keys.Key.fromString(data)
        if host_key.isPublic():
            raise ValueError(f"{host_key_path} holds a public key; the host key must be private")
        # Instance attributes: ConchFactory's class-level dicts are shared by all.
        self.privateKeys = {host_key.sshType(): host_key}
        self.publicKeys = {host_key.sshType(): host_key.public()}
        self.authorized.path = authorized_keys_path


def make_manhole_factory(
    namespace: Callable[..., dict[str, Any]],
    host_key_path: str,
    authorized_keys_path: str,
) -> ManholeFactory:
    """The SSH factory: key-only auth, a fresh namespace per session (``namespace(user)``
    with the SSH user name)."""
    realm = _SessionRealm(namespace)
    authorized = AuthorizedKeysFile(authorized_keys_path)
    checker = SSHPublicKeyChecker(authorized)
    factory = ManholeFactory(portal.Portal(cast(IRealm, realm), [checker]), authorized)
    factory.use_keys(host_key_path, authorized_keys_path)
    return factory


def make_manhole_service(
    control: Control,
    host_key_path: str,
    authorized_keys_path: str,
    endpoint: str = DEFAULT_ENDPOINT,
    reactor: Any = None,
) -> IService:
    """The manhole over ``control``'s balancer on the strports ``endpoint`` (its
    ``factory`` is a `ManholeFactory`).

    The default endpoint is ``[::1]:2222``: loopback only.
    """
    factory = make_manhole_factory(
        functools.partial(manhole_namespace, control), host_key_path, authorized_keys_path
    )
    service: IService = strports.service(endpoint, factory, reactor=reactor)
    return service
