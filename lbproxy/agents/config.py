"""The agents' configuration files (``etc/homeagent.toml``, ``etc/terminal.toml``).

Like the balancer's (``lbproxy.config``), every mistake is reported before anything starts
as one ``ConfigError`` naming the file, the key and the reason.
"""

from __future__ import annotations

import ipaddress
import tomllib
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, TypeVar

import attrs

from lbproxy.config import ConfigError

T = TypeVar("T")


@attrs.frozen
class AgentCommon:
    """What both agents need: where to listen, TLS material, whom to serve."""

    listen: str  # Twisted server endpoint string, e.g. "tcp:7440:interface=\\:\\:"
    ca: str
    certificate: str
    key: str
    balancers: tuple[str, ...]  # DNS-IDs of the balancers allowed to subscribe
    max_subscriptions: int = 100_000


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


class _Table:
    def __init__(self, path: str, prefix: str, data: Any, known: Sequence[str]) -> None:
        if not isinstance(data, Mapping):
            raise ConfigError(path, prefix, f"expected a table, got {data!r}")
        self.path, self.prefix, self.data = path, prefix, data
        for name in data:
            if name not in known:
                raise self.fail(name, f"unknown key (known: {', '.join(known)})")

    def fail(self, name: str, reason: str) -> ConfigError:
        return ConfigError(self.path, f"{self.prefix}.{name}", reason)

    def get(self, name: str, kind: type[T], default: T | None = None) -> T:
        if name not in self.data:
            if default is None:
                raise self.fail(name, "missing (required)")
            return default
        value = self.data[name]
        if kind is float and isinstance(value, int) and not isinstance(value, bool):
            value = float(value)
        if not isinstance(value, kind) or (kind is not bool and isinstance(value, bool)):
            raise self.fail(name, f"expected {kind.__name__}, got {value!r}")
        return value

    def number(self, name: str, default: float, low: float, high: float) -> float:
        value = self.get(name, float, default)
        if not low <= value <= high:
            raise self.fail(name, f"{value} is outside {low}..{high}")
        return value

    def integer(self, name: str, default: int, low: int, high: int) -> int:
        value = self.get(name, int, default)
        if not low <= value <= high:
            raise self.fail(name, f"{value} is outside {low}..{high}")
        return value

    def strings(self, name: str) -> tuple[str, ...]:
        value = self.get(name, list)
        if not value or not all(isinstance(v, str) and v for v in value):
            raise self.fail(name, "expected a non-empty list of strings")
        return tuple(value)

    def network(self, name: str, text: str) -> ipaddress.IPv6Network:
        try:
            return ipaddress.IPv6Network(text)
        except ValueError as e:
            raise self.fail(name, str(e)) from None


def _load(path: str | Path) -> tuple[str, dict[str, Any]]:
    name = str(path)
    try:
        text = Path(path).read_text(encoding="utf-8")
    except OSError as e:
        raise ConfigError(name, "(file)", e.strerror or str(e)) from None
    try:
        return name, tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(name, "(syntax)", str(e)) from None


def _common(path: str, data: dict[str, Any]) -> AgentCommon:
    agent = _Table(path, "agent", data.get("agent", {}), ("listen", "balancers",
                                                           "max_subscriptions"))
    tls = _Table(path, "tls", data.get("tls", {}), ("ca", "certificate", "key"))
    return AgentCommon(
        listen=agent.get("listen", str, "tcp:7440:interface=\\:\\:"),
        ca=tls.get("ca", str),
        certificate=tls.get("certificate", str),
        key=tls.get("key", str),
        balancers=agent.strings("balancers"),
        max_subscriptions=agent.integer("max_subscriptions", 100_000, 1, 10_000_000),
    )


def _top(path: str, data: dict[str, Any], section: str) -> None:
    _Table(path, "", data, ("agent", "tls", section))


def parse_homeagent(data: dict[str, Any], path: str = "<config>") -> HomeAgentConfig:
    """A home-agent agent's configuration from parsed TOML."""
    _top(path, data, "homeagent")
    s = _Table(path, "homeagent", data.get("homeagent", {}), (
        "prefixes", "interface", "require_ack", "ack_timeout", "command_socket", "max_bindings",
    ))
    prefixes = tuple(s.network("prefixes", p) for p in s.strings("prefixes"))
    return HomeAgentConfig(
        path=path,
        common=_common(path, data),
        prefixes=prefixes,
        interface=s.get("interface", str, ""),
        require_ack=s.get("require_ack", bool, True),
        ack_timeout=s.number("ack_timeout", 3.0, 0.01, 60.0),
        command_socket=s.get("command_socket", str, ""),
        max_bindings=s.integer("max_bindings", 100_000, 1, 100_000_000),
    )


def parse_terminal(data: dict[str, Any], path: str = "<config>") -> TerminalConfig:
    """A terminal agent's configuration from parsed TOML."""
    _top(path, data, "terminal")
    s = _Table(path, "terminal", data.get("terminal", {}), (
        "home", "home_prefix", "interface", "lifetime", "state_file", "poll_interval",
    ))
    try:
        home = ipaddress.IPv6Address(s.get("home", str))
    except ValueError as e:
        raise s.fail("home", str(e)) from None
    default = str(ipaddress.IPv6Network(f"{home}/64", strict=False))
    prefix = s.network("home_prefix", s.get("home_prefix", str, default))
    if home not in prefix:
        raise s.fail("home_prefix", f"{prefix} does not contain the home address {home}")
    return TerminalConfig(
        path=path,
        common=_common(path, data),
        home=home,
        home_prefix=prefix,
        interface=s.get("interface", str, ""),
        lifetime=s.integer("lifetime", 420, 4, 262_140),
        state_file=s.get("state_file", str, ""),
        poll_interval=s.number("poll_interval", 30.0, 0.1, 3600.0),
    )


def load_homeagent(path: str | Path) -> HomeAgentConfig:
    """Read ``etc/homeagent.toml``-style files."""
    name, data = _load(path)
    return parse_homeagent(data, name)


def load_terminal(path: str | Path) -> TerminalConfig:
    """Read ``etc/terminal.toml``-style files."""
    name, data = _load(path)
    return parse_terminal(data, name)
