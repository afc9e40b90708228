"""The agents' configuration files (``etc/homeagent.toml``, ``etc/terminal.toml``).

Like the balancer's (``lbproxy.config``), every mistake is reported before anything starts
as one ``ConfigError`` naming the file, the key and the reason: besides types and ranges,
an endpoint Twisted cannot parse, a home prefix or address no host can have (multicast,
link-local, loopback, IPv4-mapped), a balancer identity or prefix listed twice, a relative
or too long command socket path.  What depends on the host is ``lbproxy.preflight``'s.
"""

from __future__ import annotations

import ipaddress
from pathlib import Path
from typing import Any

import attrs

from lbproxy.tomlconfig import ConfigError, Section, endpoint_problem, read_toml, show

__all__ = [
    "AgentCommon",
    "ConfigError",
    "HomeAgentConfig",
    "TerminalConfig",
    "load_homeagent",
    "load_terminal",
    "parse_homeagent",
    "parse_terminal",
]


@attrs.frozen
class AgentCommon:
    """What both agents need: where to listen, TLS material, whom to serve."""

    listen: str  # Twisted server endpoint string, e.g. "tcp:7440:interface=\\:\\:"; "" = none
    ca: str
    certificate: str
    key: str
    balancers: tuple[str, ...]  # DNS-IDs of the balancers allowed to subscribe
    max_subscriptions: int = 100_000
    #: Deadlines (s) and the bound on calls in flight per balancer (lbproxy.notify.session).
    call_timeout: float = 10.0
    handshake_timeout: float = 10.0
    max_outstanding: int = 512
    #: Balancers a terminal agent dials (Twisted client endpoints): a terminal on a mobile
    #: network cannot be dialled, so it connects to them instead.
    connect: tuple[str, ...] = ()


@attrs.frozen
class HomeAgentConfig:
    """``twistd lbproxy-homeagent``: beside a home agent (claim 12)."""

    path: str
    common: AgentCommon
    prefixes: tuple[ipaddress.IPv6Network, ...]
    interface: str = ""  # the home link to observe; "" = do not observe
    require_ack: bool = True
    ack_timeout: float = 3.0
    command_socket: str = ""  # UNIX socket for pushed bindings; "" = off
    max_bindings: int = 100_000


@attrs.frozen
class TerminalConfig:
    """``twistd lbproxy-terminal``: on a terminal (claim 13)."""

    path: str
    common: AgentCommon
    home: ipaddress.IPv6Address
    home_prefix: ipaddress.IPv6Network
    interface: str = ""  # where care-of addresses appear; "" = any interface
    lifetime: int = 420  # seconds announced with each binding
    state_file: str = ""  # keeps the sequence number across restarts; "" = none
    poll_interval: float = 30.0  # re-read addresses even without netlink events


def _table(path: str, name: str, data: dict[str, Any], known: tuple[str, ...]) -> Section:
    """The ``[name]`` table of ``data``, refusing unknown keys."""
    value = data.get(name, {})
    if not isinstance(value, dict):
        raise ConfigError(path, name, f"expected a table, got {show(value)}")
    return Section(path, name, value, known)


DEFAULT_LISTEN = "tcp:7440:interface=\\:\\:"


def _common(path: str, data: dict[str, Any], dials: bool = False) -> AgentCommon:
    """``[agent]`` and ``[tls]``; ``dials``: the agent may dial balancers (``connect``,
    a terminal agent), and then listens only if ``listen`` says so."""
    known = ("listen", "balancers", "max_subscriptions", "call_timeout", "handshake_timeout",
             "max_outstanding") + (("connect",) if dials else ())
    agent = _table(path, "agent", data, known)
    tls = _table(path, "tls", data, ("ca", "certificate", "key"))
    connect: tuple[str, ...] = ()
    if dials and "connect" in agent.data:
        values = agent.get("connect", list)
        for value in values:
            if not isinstance(value, str):
                raise agent.fail("connect", f"expected a list of endpoint strings, got "
                                            f"{show(value)}")  # fmt: skip
            problem = endpoint_problem(value, "client")
            if problem is not None:
                raise agent.fail("connect", problem)
        agent.distinct("connect", values)
        connect = tuple(values)
    listen = agent.endpoint("listen", "server", "" if connect else DEFAULT_LISTEN)
    return AgentCommon(
        listen=listen,
        ca=tls.filename("ca"),
        certificate=tls.filename("certificate"),
        key=tls.filename("key"),
        balancers=agent.identities("balancers"),
        max_subscriptions=agent.integer("max_subscriptions", 100_000, 1, 10_000_000),
        call_timeout=agent.number("call_timeout", 10.0, 0.1, 3600.0),
        handshake_timeout=agent.number("handshake_timeout", 10.0, 0.1, 3600.0),
        max_outstanding=agent.integer("max_outstanding", 512, 1, 65536),
        connect=connect,
    )


def _top(path: str, data: dict[str, Any], section: str) -> None:
    Section(path, "", data, ("agent", "tls", section))


def parse_homeagent(data: dict[str, Any], path: str = "<config>") -> HomeAgentConfig:
    """A home-agent agent's configuration from parsed TOML."""
    _top(path, data, "homeagent")
    s = _table(path, "homeagent", data, (
        "prefixes", "interface", "require_ack", "ack_timeout", "command_socket", "max_bindings",
    ))
    prefixes = s.prefixes("prefixes", required=True)
    return HomeAgentConfig(
        path=path,
        common=_common(path, data),
        prefixes=prefixes,
        interface=s.interface("interface", ""),
        require_ack=s.get("require_ack", bool, True),
        ack_timeout=s.number("ack_timeout", 3.0, 0.01, 60.0),
        command_socket=s.filename("command_socket", "", absolute=True, unix_socket=True),
        max_bindings=s.integer("max_bindings", 100_000, 1, 100_000_000),
    )


def parse_terminal(data: dict[str, Any], path: str = "<config>") -> TerminalConfig:
    """A terminal agent's configuration from parsed TOML."""
    _top(path, data, "terminal")
    s = _table(path, "terminal", data, (
        "home", "home_prefix", "interface", "lifetime", "state_file", "poll_interval",
    ))
    home = s.host_address("home", s.get("home", str))
    default = str(ipaddress.IPv6Network(f"{home}/64", strict=False))
    prefix = s.home_prefix("home_prefix", s.get("home_prefix", str, default))
    if home not in prefix:
        raise s.fail("home_prefix", f"{prefix} does not contain the home address {home}")
    return TerminalConfig(
        path=path,
        common=_common(path, data, dials=True),
        home=home,
        home_prefix=prefix,
        interface=s.interface("interface", ""),
        lifetime=s.integer("lifetime", 420, 4, 262_140),
        state_file=s.filename("state_file", ""),
        poll_interval=s.number("poll_interval", 30.0, 0.1, 3600.0),
    )


def load_homeagent(path: str | Path) -> HomeAgentConfig:
    """Read ``etc/homeagent.toml``-style files."""
    name, data = read_toml(path)
    return parse_homeagent(data, name)


def load_terminal(path: str | Path) -> TerminalConfig:
    """Read ``etc/terminal.toml``-style files."""
    name, data = read_toml(path)
    return parse_terminal(data, name)
