"""Reading TOML configuration files with errors that name the file, the key and the reason.

Why a module of its own: the balancer's configuration (``lbproxy.config``) and the
agents' (``lbproxy.agents.config``) report mistakes the same way, so they share this
small typed reader instead of each checking types and ranges by hand.
"""

from __future__ import annotations

import ipaddress
import tomllib
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, TypeVar

T = TypeVar("T")

__all__ = ["ConfigError", "Section", "checked", "read_toml"]


class ConfigError(ValueError):
    """A configuration that cannot be used, naming the file, the key and the reason."""

    def __init__(self, path: str, key: str, reason: str) -> None:
        super().__init__(f"{path}: {key}: {reason}")
        self.path = path
        self.key = key
        self.reason = reason


class Section:
    """Typed access to one TOML table, reporting errors with the dotted key."""

    def __init__(
        self, path: str, prefix: str, data: Mapping[str, Any], known: Sequence[str] | None = None
    ) -> None:
        self.path = path
        self.prefix = prefix
        self.data = data
        if known is not None:
            for name in data:
                if name not in known:
                    reason = f"unknown key (known: {', '.join(known)})"
                    raise ConfigError(path, self.key(name), reason)

    def key(self, name: str) -> str:
        return f"{self.prefix}.{name}" if self.prefix else name

    def fail(self, name: str, reason: str) -> ConfigError:
        return ConfigError(self.path, self.key(name), reason)

    def get(self, name: str, kind: type[T], default: T | None = None) -> T:
        if name not in self.data:
            if default is None:
                raise self.fail(name, "missing (required)")
            return default
        value = self.data[name]
        if kind is float and isinstance(value, int) and not isinstance(value, bool):
            value = float(value)
        if not isinstance(value, kind) or (kind is not bool and isinstance(value, bool)):
            raise self.fail(name, f"expected {kind.__name__}, got {type(value).__name__} {value!r}")
        return value

    def number(self, name: str, default: float, minimum: float, maximum: float) -> float:
        value = self.get(name, float, default)
        if not minimum <= value <= maximum:
            raise self.fail(name, f"{value} is outside {minimum}..{maximum}")
        return value

    def integer(self, name: str, default: int, minimum: int, maximum: int) -> int:
        value = self.get(name, int, default)
        if not minimum <= value <= maximum:
            raise self.fail(name, f"{value} is outside {minimum}..{maximum}")
        return value

    def choice(self, name: str, default: str, choices: Sequence[str]) -> str:
        value = self.get(name, str, default)
        if value not in choices:
            raise self.fail(name, f"{value!r} is not one of {', '.join(choices)}")
        return value

    def convert(self, name: str, value: Any, parse: Callable[[Any], T]) -> T:
        try:
            return parse(value)
        except (ValueError, TypeError) as e:
            raise self.fail(name, str(e)) from None

    def address(self, name: str, value: Any) -> ipaddress.IPv6Address:
        if not isinstance(value, str):
            raise self.fail(name, f"expected an IPv6 address string, got {value!r}")
        return self.convert(name, value, ipaddress.IPv6Address)

    def network(self, name: str, value: Any) -> ipaddress.IPv6Network:
        if not isinstance(value, str):
            raise self.fail(name, f"expected an IPv6 prefix string, got {value!r}")
        return self.convert(name, value, ipaddress.IPv6Network)

    def table(self, name: str) -> Section:
        value = self.data.get(name, {})
        if not isinstance(value, dict):
            raise self.fail(name, f"expected a table, got {value!r}")
        return Section(self.path, self.key(name), value)

    def tables(self, name: str) -> list[Section]:
        value = self.data.get(name, [])
        if not isinstance(value, list) or not all(isinstance(v, dict) for v in value):
            raise self.fail(name, "expected an array of tables ([[...]])")
        return [Section(self.path, f"{self.key(name)}[{i}]", v) for i, v in enumerate(value)]

    def strings(self, name: str) -> tuple[str, ...]:
        """A required, non-empty list of non-empty strings."""
        value = self.get(name, list)
        if not value or not all(isinstance(v, str) and v for v in value):
            raise self.fail(name, "expected a non-empty list of strings")
        return tuple(value)


def checked(section: Section, known: Sequence[str]) -> Section:
    return Section(section.path, section.prefix, section.data, known)


def read_toml(path: str | Path) -> tuple[str, dict[str, Any]]:
    """Read and parse a TOML file; unreadable or invalid files are a `ConfigError`."""
    name = str(path)
    try:
        text = Path(path).read_text(encoding="utf-8")
    except OSError as e:
        raise ConfigError(name, "(file)", e.strerror or str(e)) from None
    except UnicodeDecodeError as e:
        raise ConfigError(name, "(file)", f"not UTF-8 text: {e}") from None
    return name, parse_toml(text, name)


def parse_toml(text: str, name: str) -> dict[str, Any]:
    """Parse TOML text; a syntax error is a `ConfigError` naming the file."""
    try:
        return tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(name, "(syntax)", str(e)) from None
