"""Reading TOML configuration files with errors that name the file, the key and the reason.

Why a module of its own: the balancer's configuration (``lbproxy.config``) and the
agents' (``lbproxy.agents.config``) report mistakes the same way, so they share this
small typed reader instead of each checking types and ranges by hand.

Every refusal is a `ConfigError` whose text is one line, ``file: key: reason``: values
are shown shortened and escaped, so a 4,000-character key or a newline in a string
cannot turn it into a page.  Hostile files are refused before ``tomllib`` sees them
when they could exhaust it: larger than `MAX_FILE_BYTES`, nested deeper than
`MAX_NESTING` (``tomllib`` recurses once per level and would raise ``RecursionError``),
or with more than `MAX_DOTS_PER_LINE` dots outside strings on a line (a dotted key of
*n* parts costs ``tomllib`` memory in proportion to *n* squared).

Why not ``cattrs``: the structure is small and flat, and what needs saying is mostly
semantic (a backend equal to a virtual address, every weight 0, a health check without a
port); ``cattrs`` would add a dependency and error groups to translate back into the
``file: key: reason`` form without making those checks shorter.
"""

from __future__ import annotations

import ipaddress
import math
import os
import re
import tomllib
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, Literal, TypeVar

T = TypeVar("T")

__all__ = [
    "MAX_DOTS_PER_LINE",
    "MAX_FILE_BYTES",
    "MAX_NESTING",
    "ConfigError",
    "Section",
    "address_problem",
    "checked",
    "endpoint_problem",
    "parse_toml",
    "read_toml",
    "show",
]

#: A configuration file larger than this is refused unread (a large one is a few KiB).
MAX_FILE_BYTES = 1 << 20
#: Arrays and inline tables nested deeper than this are refused (the schemas need 2).
MAX_NESTING = 32
#: More dots than this outside strings on one line are refused (the schemas need 2).
MAX_DOTS_PER_LINE = 64
#: Longest path of a UNIX socket (``sun_path`` is 108 bytes with the final NUL).
MAX_UNIX_PATH = 107
#: Interface names: what the kernel accepts (``dev_valid_name``), IFNAMSIZ - 1 bytes.
MAX_INTERFACE_NAME = 15
#: Names operators type (backends, peers) and identities (DNS-IDs).
NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.:-]{0,62}")
DNS_ID = re.compile(r"[A-Za-z0-9*_.-]{1,253}")

_SHOW_LIMIT = 48


def show(value: Any, limit: int = _SHOW_LIMIT) -> str:
    """``repr(value)`` on one line and at most about ``limit`` characters."""
    try:
        if isinstance(value, int) and not isinstance(value, bool) and value.bit_length() > 128:
            return f"an integer of about {int(value.bit_length() * 0.30103) + 1} digits"
        text = repr(value)
    except (RecursionError, ValueError):  # nested too deep, or too many digits to print
        return f"a {type(value).__name__} too large to show"
    if len(text) > limit:
        text = text[: limit - 3] + "..."
    return text


def _one_line(text: str) -> str:
    """``text`` with control characters escaped: a reason never spans lines."""
    if text.isprintable():
        return text
    return "".join(c if c.isprintable() else repr(c)[1:-1] for c in text)


def _key_text(key: str) -> str:
    """A dotted key as shown: printable, and not longer than the reason needs."""
    key = _one_line(key)
    return key if len(key) <= 80 else key[:77] + "..."


class ConfigError(ValueError):
    """A configuration that cannot be used, naming the file, the key and the reason.

    ``str()`` is one line: ``file: key: reason``.
    """

    def __init__(self, path: str, key: str, reason: str) -> None:
        self.path = path
        self.key = _key_text(key)
        self.reason = _one_line(reason)
        super().__init__(f"{_one_line(path)}: {self.key}: {self.reason}")


def address_problem(
    address: ipaddress.IPv6Address, link_local: bool = False, loopback: bool = False
) -> str | None:
    """Why ``address`` cannot be a terminal's, a virtual or a backend address (or None).

    Multicast, the unspecified address, IPv4-mapped addresses and (unless allowed)
    loopback and link-local ones name no single host lbproxy can exchange packets with.
    """
    if address.is_multicast:
        return f"{address} is a multicast address"
    if address.is_unspecified:
        return f"{address} is the unspecified address"
    if address.ipv4_mapped is not None:
        return f"{address} is an IPv4-mapped address (use an IPv6 address)"
    if address.is_loopback and not loopback:
        return f"{address} is the loopback address"
    if address.is_link_local and not link_local:
        return f"{address} is link-local (it needs an interface scope)"
    return None


_SPECIAL_NETWORKS = tuple(
    (ipaddress.IPv6Network(n), what)
    for n, what in (("ff00::/8", "multicast"), ("fe80::/10", "link-local"),
                    ("::/128", "the unspecified"), ("::1/128", "the loopback"),
                    ("::ffff:0:0/96", "IPv4-mapped"))
)


def endpoint_problem(description: str, kind: Literal["server", "client"]) -> str | None:
    """Why ``description`` is not a usable Twisted endpoint string (or None).

    Parsing only: ``serverFromString``/``clientFromString`` against an in-memory reactor
    build the endpoint object, which neither listens nor connects.
    """
    from twisted.internet.endpoints import clientFromString, serverFromString
    from twisted.internet.testing import MemoryReactor

    parse = serverFromString if kind == "server" else clientFromString
    try:
        endpoint = parse(MemoryReactor(), description)
    except Exception as e:  # any parser's refusal: ValueError, TypeError, OSError, ...
        detail = str(e) or type(e).__name__
        return f"{show(description)} is not a Twisted {kind} endpoint ({detail})"
    port = getattr(endpoint, "_port", None)
    lowest = 0 if kind == "server" else 1
    if isinstance(port, int) and not lowest <= port <= 65535:
        return f"{show(description)}: port {port} is outside {lowest}..65535"
    if kind == "client" and getattr(endpoint, "_host", None) == "":
        return (f"{show(description)}: no host (escape the colons of an IPv6 address: "
                "host=2001\\:db8\\:\\:1)")
    return None


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
            if abs(value) > 2**53:
                raise self.fail(name, f"{show(value)} is too large")
            value = float(value)
        if not isinstance(value, kind) or (kind is not bool and isinstance(value, bool)):
            raise self.fail(name, f"expected {kind.__name__}, got {type(value).__name__} "
                                  f"{show(value)}")  # fmt: skip
        return value

    def number(self, name: str, default: float, minimum: float, maximum: float) -> float:
        value = self.get(name, float, default)
        if not math.isfinite(value):
            raise self.fail(name, f"{value} is not a finite number")
        if not minimum <= value <= maximum:
            raise self.fail(name, f"{value} is outside {minimum}..{maximum}")
        return value

    def integer(self, name: str, default: int, minimum: int, maximum: int) -> int:
        value = self.get(name, int, default)
        if not minimum <= value <= maximum:
            raise self.fail(name, f"{show(value)} is outside {minimum}..{maximum}")
        return value

    def choice(self, name: str, default: str, choices: Sequence[str]) -> str:
        value = self.get(name, str, default)
        if value not in choices:
            raise self.fail(name, f"{show(value)} is not one of {', '.join(choices)}")
        return value

    def convert(self, name: str, value: Any, parse: Callable[[Any], T]) -> T:
        try:
            return parse(value)
        except (ValueError, TypeError) as e:
            raise self.fail(name, str(e)) from None

    def address(self, name: str, value: Any) -> ipaddress.IPv6Address:
        if not isinstance(value, str):
            raise self.fail(name, f"expected an IPv6 address string, got {show(value)}")
        if len(value) > 64:
            raise self.fail(name, f"{show(value)} is not an IPv6 address")
        if "." in value and ":" not in value:
            raise self.fail(name, f"{show(value)} is an IPv4 address; lbproxy works with IPv6 "
                                  "addresses")  # fmt: skip
        return self.convert(name, value, ipaddress.IPv6Address)

    def host_address(self, name: str, value: Any, link_local: bool = False,
                     loopback: bool = False) -> ipaddress.IPv6Address:
        """An address of one host: not multicast, unspecified, IPv4-mapped, and
        (unless allowed) not loopback or link-local."""
        address = self.address(name, value)
        problem = address_problem(address, link_local=link_local, loopback=loopback)
        if problem is not None:
            raise self.fail(name, problem)
        return address

    def network(self, name: str, value: Any) -> ipaddress.IPv6Network:
        if not isinstance(value, str):
            raise self.fail(name, f"expected an IPv6 prefix string, got {show(value)}")
        if len(value) > 64:
            raise self.fail(name, f"{show(value)} is not an IPv6 prefix")
        return self.convert(name, value, ipaddress.IPv6Network)

    def home_prefix(self, name: str, value: Any) -> ipaddress.IPv6Network:
        """A prefix of unicast home addresses (no multicast, link-local, loopback...)."""
        network = self.network(name, value)
        for special, what in _SPECIAL_NETWORKS:
            if network.overlaps(special):
                raise self.fail(name, f"{network} includes {what} addresses ({special}), "
                                      "which are no home addresses")  # fmt: skip
        return network

    def prefixes(self, name: str, required: bool) -> tuple[ipaddress.IPv6Network, ...]:
        """A list of distinct home prefixes (`home_prefix`)."""
        values = self.strings(name) if required else self.get(name, list, [])
        found = tuple(self.home_prefix(name, v) for v in values)
        self.distinct(name, [str(n) for n in found])
        return found

    def distinct(self, name: str, values: Sequence[object], what: str = "") -> None:
        """Refuse a value listed twice."""
        seen: set[object] = set()
        for value in values:
            if value in seen:
                text = str(value)
                text = text if len(text) <= 60 else text[:57] + "..."
                raise self.fail(name, f"{what}{_one_line(text)} is listed twice")
            seen.add(value)

    def table(self, name: str) -> Section:
        value = self.data.get(name, {})
        if not isinstance(value, dict):
            raise self.fail(name, f"expected a table, got {show(value)}")
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

    def text(self, name: str, default: str | None = None, pattern: re.Pattern[str] | None = None,
             what: str = "") -> str:
        """A string; with ``pattern``, one that matches it whole (``what`` names it)."""
        value = self.get(name, str, default)
        if pattern is not None and pattern.fullmatch(value) is None:
            raise self.fail(name, f"{show(value)} is not {what or 'valid here'}")
        return value

    def identities(self, name: str) -> tuple[str, ...]:
        """A required, non-empty list of distinct DNS-IDs."""
        values = self.strings(name)
        for value in values:
            if DNS_ID.fullmatch(value) is None:
                raise self.fail(name, f"{show(value)} is not a DNS name")
        self.distinct(name, values)
        return values

    def interface(self, name: str, default: str | None = None) -> str:
        """A network interface name the kernel would accept ("" only as the default)."""
        value = self.get(name, str, default)
        if value == "" and default == "":
            return value
        if (
            not value
            or len(value.encode()) > MAX_INTERFACE_NAME
            or value in (".", "..")
            or any(c in "/:" or c.isspace() or not c.isprintable() for c in value)
        ):
            raise self.fail(name, f"{show(value)} is not a network interface name (1 to "
                                  f"{MAX_INTERFACE_NAME} bytes, no '/', ':' or spaces)")
        return value

    def filename(self, name: str, default: str | None = None, absolute: bool = False,
             unix_socket: bool = False) -> str:
        """A file path ("" only as the default): no NUL, not a directory name; with
        ``absolute`` an absolute one; with ``unix_socket`` short enough to bind."""
        value = self.get(name, str, default)
        if value == "" and default == "":
            return value
        if not value:
            raise self.fail(name, "empty path")
        if "\0" in value:
            raise self.fail(name, f"{show(value)} contains a NUL character")
        if value.endswith("/") or os.path.basename(value) in (".", ".."):
            raise self.fail(name, f"{show(value)} names a directory, not a file")
        if absolute and not os.path.isabs(value):
            raise self.fail(name, f"{show(value)} is a relative path; give an absolute one "
                                  "(the working directory of a service is not yours to "
                                  "choose)")  # fmt: skip
        if unix_socket and len(value.encode()) > MAX_UNIX_PATH:
            raise self.fail(name, f"{show(value)} is {len(value.encode())} bytes long; a "
                                  f"UNIX socket path has at most {MAX_UNIX_PATH}")  # fmt: skip
        return value

    def endpoint(self, name: str, kind: Literal["server", "client"],
                 default: str | None = None) -> str:
        """A Twisted endpoint string that parses ("" only as the default: off)."""
        value = self.get(name, str, default)
        if value == "" and default == "":
            return value
        problem = endpoint_problem(value, kind)
        if problem is not None:
            raise self.fail(name, problem)
        return value


def checked(section: Section, known: Sequence[str]) -> Section:
    return Section(section.path, section.prefix, section.data, known)


def read_toml(path: str | Path) -> tuple[str, dict[str, Any]]:
    """Read and parse a TOML file; unreadable, oversized or invalid files are a
    `ConfigError`."""
    name = str(path)
    try:
        with open(path, "rb") as handle:
            raw = handle.read(MAX_FILE_BYTES + 1)
    except OSError as e:
        raise ConfigError(name, "(file)", e.strerror or str(e)) from None
    except ValueError as e:  # a NUL in the name
        raise ConfigError(name, "(file)", str(e)) from None
    if len(raw) > MAX_FILE_BYTES:
        raise ConfigError(name, "(file)", f"larger than {MAX_FILE_BYTES} bytes; not a "
                                          "configuration file?")  # fmt: skip
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise ConfigError(name, "(file)", f"not UTF-8 text: {e}") from None
    return name, parse_toml(text, name)


_SPECIAL = re.compile(r"[\"'#\[\]{}.\n]")
_BASIC_REST = re.compile(r'(?:\\.|[^"\\\n])*"')


def _close_multiline(text: str, start: int, quote: str) -> int:
    """The index after the ``quote * 3`` that closes a multi-line string opened before
    ``start`` (an escaped one does not close a basic string), or -1."""
    position = start
    while True:
        found = text.find(quote * 3, position)
        if found < 0:
            return -1
        backslashes = 0
        while quote == '"' and found - backslashes - 1 >= start and \
                text[found - backslashes - 1] == "\\":
            backslashes += 1
        if backslashes % 2 == 0:
            # One or two more quotes belong to the string: the delimiter is the last three.
            end = found + 3
            while end < found + 5 and text.startswith(quote, end):
                end += 1
            return end
        position = found + 1


def _close_line_string(text: str, start: int, quote: str) -> int:
    """The index after the quote that closes a one-line string opened before ``start``,
    or -1 when the line ends first."""
    if quote == '"':
        match = _BASIC_REST.match(text, start)
        return -1 if match is None else match.end()
    found = text.find("'", start)
    newline = text.find("\n", start)
    return -1 if found < 0 or 0 <= newline < found else found + 1


def _shape_problem(text: str) -> str | None:
    """Why ``text`` is shaped to exhaust the parser (see the module docstring), or None.

    One pass over the text, skipping strings and comments; each character is looked at a
    bounded number of times, so hostile input cannot make it slow.
    """
    depth = dots = 0
    line = 1
    position = 0
    while True:
        match = _SPECIAL.search(text, position)
        if match is None:
            return None
        at = match.start()
        char = text[at]
        position = at + 1
        if char == "\n":
            line += 1
            dots = 0
        elif char == "#":
            newline = text.find("\n", at)
            if newline < 0:
                return None
            position = newline
        elif char in "\"'":
            if text.startswith(char * 3, at):
                end = _close_multiline(text, at + 3, char)
                if end < 0:
                    return None  # unterminated: tomllib refuses it without recursing
                line += text.count("\n", at, end)
            else:
                end = _close_line_string(text, at + 1, char)
            position = max(position, end)
        elif char in "[{":
            depth += 1
            if depth > MAX_NESTING:
                return f"line {line}: nested more than {MAX_NESTING} levels deep"
        elif char in "]}":
            depth = max(0, depth - 1)
        else:
            dots += 1
            if dots > MAX_DOTS_PER_LINE:
                return (f"line {line}: more than {MAX_DOTS_PER_LINE} dots outside strings "
                        "(a dotted key that long is refused)")


def parse_toml(text: str, name: str) -> dict[str, Any]:
    """Parse TOML text; a syntax error or a hostile shape is a `ConfigError` naming the
    file."""
    if len(text) > MAX_FILE_BYTES:
        raise ConfigError(name, "(file)", f"larger than {MAX_FILE_BYTES} bytes")
    problem = _shape_problem(text)
    if problem is not None:
        raise ConfigError(name, "(syntax)", problem)
    try:
        return tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(name, "(syntax)", str(e)) from None
    except ValueError as e:  # e.g. an integer of more than 4300 digits
        detail = str(e) if len(str(e)) <= 80 else str(e)[:77] + "..."
        raise ConfigError(name, "(syntax)", f"a value cannot be read ({detail})") from None
    except RecursionError:  # the shape check should make this unreachable
        raise ConfigError(name, "(syntax)", "nested too deeply") from None
