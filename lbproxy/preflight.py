"""Start-up checks of the host against a loaded configuration, before anything binds.

Why a module of its own: a configuration can be valid and still unusable here -- an
interface that does not exist on this host, a process without ``CAP_NET_RAW``, a
certificate path that points nowhere, a directory that cannot be created.  Found while
the service starts, each would be a traceback naming neither the key nor the file (an
``OSError: [Errno 19] No such device``).  So the three twistd commands run these checks
first, and every problem is one line, ``file: key: reason``; twistd then exits with
status 1, without a traceback or a usage block (`refuse`).

What is checked:

* interfaces exist (``socket.if_nametoindex``);
* privileges: ``CAP_NET_RAW`` where raw or packet sockets are opened (the balancer; the
  home-agent agent when it observes a link), ``CAP_NET_BIND_SERVICE`` for a TCP port
  below ``net.ipv4.ip_unprivileged_port_start``, read from ``CapEff`` in
  ``/proc/self/status``;
* every file the configuration names exists, is a regular file and readable; TLS
  certificates and keys load (and the key matches its certificate), the manhole's host
  key loads and its ``authorized_keys`` is not writable by others;
* directories: the persistence file's, the control socket's, the agents' command socket
  and state file's are created (mode 0700) when missing; an existing directory is never
  changed, only refused when it is not one, not writable, or (for sockets) writable by
  others.

Endpoint strings were parsed when the configuration was loaded (``lbproxy.tomlconfig``);
nothing here listens, connects or sends.
"""

from __future__ import annotations

import errno
import os
import socket
import stat
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, NoReturn, TypeVar

from lbproxy.tomlconfig import ConfigError

if TYPE_CHECKING:
    from lbproxy.agents.config import AgentCommon, HomeAgentConfig, TerminalConfig
    from lbproxy.config import Config
    from lbproxy.notify.tls import TlsMaterial

__all__ = [
    "CAP_NET_BIND_SERVICE",
    "CAP_NET_RAW",
    "Host",
    "Refused",
    "agent_tls",
    "check_balancer",
    "check_homeagent",
    "check_only",
    "check_terminal",
    "load_or_refuse",
    "make_private_directories",
    "refuse",
]

CAP_NET_BIND_SERVICE = 10
CAP_NET_RAW = 13

T = TypeVar("T")


class Refused(SystemExit):
    """Start-up refused: ``code`` is the text to print, one ``file: key: reason`` line
    per problem.  A ``SystemExit`` with a text makes Python print it to stderr and exit
    with status 1, and twistd lets it through from ``postOptions`` and ``makeService``
    alike (a ``UsageError`` would come with twistd's usage block, any other exception
    with a traceback)."""

    def __init__(self, problems: Sequence[ConfigError]) -> None:
        super().__init__("\n".join(str(p) for p in problems))
        self.problems = tuple(problems)


def refuse(problems: Sequence[ConfigError]) -> None:
    """Raise `Refused` when there is any problem."""
    if problems:
        raise Refused(problems)


def load_or_refuse(load: Callable[[str], T], path: str) -> T:
    """``load(path)``, a `ConfigError` turned into `Refused` (for ``postOptions``)."""
    try:
        return load(path)
    except ConfigError as e:
        raise Refused([e]) from None


def agent_tls(path: str, common: AgentCommon) -> TlsMaterial:
    """An agent's TLS material from its files; what `check_homeagent` and
    `check_terminal` let through and still fails (a file changed since) is `Refused`."""
    from OpenSSL import SSL

    from lbproxy.notify.tls import TlsMaterial

    try:
        return TlsMaterial.from_files(common.ca, common.certificate, common.key)
    except (OSError, SSL.Error, ValueError) as e:
        raise Refused([ConfigError(path, "tls", f"the TLS material cannot be loaded "
                                                f"({_why(e)})")]) from None  # fmt: skip


def check_only(problems: Sequence[ConfigError], path: str) -> NoReturn:
    """``--check``: refuse on problems, otherwise say so and exit with status 0."""
    refuse(problems)
    print(f"{path}: configuration valid, preflight checks passed")
    raise SystemExit(0)


class Host:
    """What the checks ask the host; tests give a fake."""

    def interface_exists(self, name: str) -> bool:
        try:
            socket.if_nametoindex(name)
        except OSError:
            return False
        return True

    def capabilities(self) -> int:
        """The effective capability set; root's when ``/proc`` cannot say."""
        try:
            with open("/proc/self/status", encoding="ascii") as status:
                for line in status:
                    if line.startswith("CapEff:"):
                        return int(line.split()[1], 16)
        except (OSError, ValueError, IndexError):
            pass
        return ~0 if os.geteuid() == 0 else 0

    def unprivileged_port_start(self) -> int:
        try:
            with open("/proc/sys/net/ipv4/ip_unprivileged_port_start", encoding="ascii") as f:
                return int(f.read().strip())
        except (OSError, ValueError):
            return 1024


def make_private_directories(directory: str) -> list[str]:
    """Create ``directory`` and its missing parents with mode 0700; return those created,
    outermost first.  Existing directories are left exactly as they are."""
    missing = []
    current = os.path.abspath(directory)
    while not os.path.isdir(current):
        if os.path.lexists(current):
            raise NotADirectoryError(errno.ENOTDIR, f"{current} is not a directory")
        missing.append(current)
        parent = os.path.dirname(current)
        if parent == current:
            break
        current = parent
    created = []
    for path in reversed(missing):
        os.mkdir(path, 0o700)
        os.chmod(path, 0o700)  # ours: the umask does not decide
        created.append(path)
    return created


class _Checks:
    """Collects problems for one configuration file."""

    def __init__(self, path: str, host: Host) -> None:
        self.path = path
        self.host = host
        self.problems: list[ConfigError] = []
        self._caps: int | None = None

    def add(self, key: str, reason: str) -> None:
        self.problems.append(ConfigError(self.path, key, reason))

    def capable(self, capability: int) -> bool:
        if self._caps is None:
            self._caps = self.host.capabilities()
        return bool(self._caps >> capability & 1)

    def interface(self, key: str, name: str) -> None:
        if name and not self.host.interface_exists(name):
            self.add(key, f"no network interface {name!r} on this host")

    def raw_sockets(self, key: str, what: str) -> None:
        if not self.capable(CAP_NET_RAW):
            self.add(key, f"{what} needs CAP_NET_RAW, which this process lacks (run as root, "
                          "or grant it, e.g. AmbientCapabilities=CAP_NET_RAW)")  # fmt: skip

    def listening(self, key: str, description: str) -> None:
        """A TCP port below the unprivileged start needs CAP_NET_BIND_SERVICE."""
        port = _tcp_server_port(description)
        if port is None or port == 0:
            return
        start = self.host.unprivileged_port_start()
        if port < start and not self.capable(CAP_NET_BIND_SERVICE):
            self.add(key, f"port {port} is below {start} and needs CAP_NET_BIND_SERVICE, "
                          "which this process lacks")  # fmt: skip

    def readable(self, key: str, filename: str) -> bytes | None:
        """The file's contents, or None after adding the problem."""
        try:
            info = os.stat(filename)
            if not stat.S_ISREG(info.st_mode):
                self.add(key, f"{filename}: not a regular file")
                return None
            with open(filename, "rb") as handle:
                return handle.read(1 << 20)
        except OSError as e:
            self.add(key, f"{filename}: {e.strerror or e}")
        except ValueError as e:
            self.add(key, f"{filename!r}: {e}")
        return None

    def not_writable_by_others(self, key: str, filename: str) -> None:
        try:
            info = os.stat(filename)
        except OSError:
            return
        if info.st_mode & (stat.S_IWGRP | stat.S_IWOTH):
            self.add(key, f"{filename}: writable by others (mode {info.st_mode & 0o777:04o}); "
                          "whoever can write it can log in")  # fmt: skip
        elif info.st_uid not in (0, os.geteuid()):
            self.add(key, f"{filename}: owned by uid {info.st_uid}, neither root nor this "
                          "process's user")  # fmt: skip

    def directory(self, key: str, filename: str, socket_file: bool = False) -> None:
        """The directory ``filename`` goes in: created 0700 if missing, otherwise usable
        as it is."""
        directory = os.path.dirname(os.path.abspath(filename))
        try:
            make_private_directories(directory)
        except OSError as e:
            self.add(key, f"cannot create the directory {directory}: {e.strerror or e}")
            return
        if not os.access(directory, os.W_OK | os.X_OK, effective_ids=_EFFECTIVE):
            self.add(key, f"the directory {directory} is not writable by this process")
            return
        if socket_file:
            info = os.stat(directory)
            if info.st_uid != os.geteuid():
                self.add(key, f"the directory {directory} belongs to uid {info.st_uid}, not to "
                              "this process's user; its owner could replace the socket (use "
                              "a directory of its own)")  # fmt: skip
            elif info.st_mode & (stat.S_IWGRP | stat.S_IWOTH):
                self.add(key, f"the directory {directory} is writable by others (mode "
                              f"{info.st_mode & 0o777:04o}); they could replace the socket "
                              "(use a directory of its own)")  # fmt: skip

    def existing_file(self, key: str, filename: str, socket_file: bool = False) -> None:
        """What is already at ``filename``: a file we can replace, or a stale socket."""
        try:
            info = os.lstat(filename)
        except OSError:
            return
        if socket_file:
            if not stat.S_ISSOCK(info.st_mode):
                self.add(key, f"{filename} exists and is not a socket; not replacing it")
        elif not stat.S_ISREG(info.st_mode):
            self.add(key, f"{filename} exists and is not a regular file")
        elif not os.access(filename, os.R_OK | os.W_OK, effective_ids=_EFFECTIVE):
            self.add(key, f"{filename} is not readable and writable by this process")

    def tls(self, section: str, ca: str, certificate: str, key: str) -> None:
        """The TLS material loads, and the key is the certificate's."""
        from OpenSSL import crypto
        from twisted.internet import ssl

        ca_pem = self.readable(f"{section}.ca", ca)
        cert_pem = self.readable(f"{section}.certificate", certificate)
        key_pem = self.readable(f"{section}.key", key)
        if ca_pem is not None:
            try:
                ssl.Certificate.loadPEM(ca_pem)
            except Exception as e:
                self.add(f"{section}.ca", f"{ca}: not a PEM certificate ({_why(e)})")
        if cert_pem is None or key_pem is None:
            return
        try:
            ssl.Certificate.loadPEM(cert_pem)
        except Exception as e:
            self.add(f"{section}.certificate", f"{certificate}: not a PEM certificate "
                                               f"({_why(e)})")  # fmt: skip
            return
        try:
            crypto.load_privatekey(crypto.FILETYPE_PEM, key_pem)
        except Exception as e:
            self.add(f"{section}.key", f"{key}: not a PEM private key ({_why(e)})")
            return
        try:
            ssl.PrivateCertificate.loadPEM(cert_pem + b"\n" + key_pem)
        except Exception as e:
            self.add(f"{section}.key", f"{key}: does not match the certificate {certificate} "
                                       f"({_why(e)})")  # fmt: skip


_EFFECTIVE = os.access in os.supports_effective_ids


def _why(error: BaseException) -> str:
    text = str(error) or type(error).__name__
    return text if len(text) <= 120 else text[:117] + "..."


def _tcp_server_port(description: str) -> int | None:
    """The TCP (or SSL) port a server endpoint string listens on, if it has one."""
    from twisted.internet.endpoints import serverFromString
    from twisted.internet.testing import MemoryReactor

    try:
        endpoint = serverFromString(MemoryReactor(), description)
    except Exception:
        return None  # refused when the configuration was loaded
    port = getattr(endpoint, "_port", None)
    return port if isinstance(port, int) else None


def check_balancer(config: Config, host: Host | None = None) -> list[ConfigError]:
    """Everything ``twistd lbproxy`` needs from this host, as problems (empty: go)."""
    checks = _Checks(config.path, host or Host())
    checks.interface("interfaces.client", config.client_interface)
    checks.interface("interfaces.server", config.server_interface)
    checks.raw_sockets("interfaces", "forwarding (raw and packet sockets on the interfaces)")
    if config.notify.enabled:
        checks.tls("notify", config.notify.ca, config.notify.certificate, config.notify.key)
        if config.notify.listen:
            checks.listening("notify.listen", config.notify.listen)
    if config.manhole_endpoint:
        checks.listening("manhole.endpoint", config.manhole_endpoint)
        if checks.readable("manhole.authorized_keys", config.manhole_authorized_keys) \
                is not None:
            checks.not_writable_by_others("manhole.authorized_keys",
                                          config.manhole_authorized_keys)
        _host_key(checks, config.manhole_host_key)
    if config.metrics_endpoint:
        checks.listening("metrics.endpoint", config.metrics_endpoint)
    if config.control_socket:
        checks.directory("control.socket", config.control_socket, socket_file=True)
        checks.existing_file("control.socket", config.control_socket, socket_file=True)
    if config.persistence_path:
        checks.directory("persistence.path", config.persistence_path)
        checks.existing_file("persistence.path", config.persistence_path)
    return checks.problems


def _host_key(checks: _Checks, filename: str) -> None:
    data = checks.readable("manhole.host_key", filename)
    if data is None:
        return
    from twisted.conch.ssh import keys

    try:
        key = keys.Key.fromString(data)
    except Exception as e:
        checks.add("manhole.host_key", f"{filename}: not an SSH key ({_why(e)})")
        return
    if key.isPublic():
        checks.add("manhole.host_key", f"{filename}: a public key; the host key is the "
                                       "private one")  # fmt: skip
    checks.not_writable_by_others("manhole.host_key", filename)


def _agent(checks: _Checks, common: AgentCommon) -> None:
    checks.listening("agent.listen", common.listen)
    checks.tls("tls", common.ca, common.certificate, common.key)


def check_homeagent(config: HomeAgentConfig, host: Host | None = None) -> list[ConfigError]:
    """Everything ``twistd lbproxy-homeagent`` needs from this host."""
    checks = _Checks(config.path, host or Host())
    _agent(checks, config.common)
    if config.interface:
        checks.interface("homeagent.interface", config.interface)
        checks.raw_sockets("homeagent.interface", "observing the home link (a packet socket)")
    if config.command_socket:
        checks.directory("homeagent.command_socket", config.command_socket, socket_file=True)
        checks.existing_file("homeagent.command_socket", config.command_socket,
                             socket_file=True)
    return checks.problems


def check_terminal(config: TerminalConfig, host: Host | None = None) -> list[ConfigError]:
    """Everything ``twistd lbproxy-terminal`` needs from this host."""
    checks = _Checks(config.path, host or Host())
    _agent(checks, config.common)
    checks.interface("terminal.interface", config.interface)
    if config.state_file:
        checks.directory("terminal.state_file", config.state_file)
        checks.existing_file("terminal.state_file", config.state_file)
    return checks.problems
