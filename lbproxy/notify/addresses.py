"""Which addresses a peer may name as a care-of (or home) address: global unicast, not ours.

A believed care-of address becomes the destination of a home's replies (``ReturnPaths``) and
the key of a source-address binding, so the balancer refuses, before anything changes:

* every address that is not **global unicast** (RFC 4291 §2.4; IANA allocates global unicast
  from ``2000::/3`` only): ``::``, ``::1``, multicast ``ff00::/8``, link-local ``fe80::/10``,
  site-local ``fec0::/10``, IPv4-mapped ``::ffff:0:0/96``, IPv4-compatible ``::/96``, the
  NAT64 and discard prefixes, unique-local ``fc00::/7`` (see below), and the reserved
  anycast interface identifiers of RFC 4291 §2.6.1 / RFC 2526 (a /64's subnet-router anycast
  address, interface identifier 0, and its 128 reserved subnet anycast addresses);
* the balancer's own addresses: the **virtual addresses**, the **backends**, and **this
  host's** addresses (read, on every check, from the ``Policy`` the balancer publishes, so a
  reload or a health change is seen at once);
* addresses in a configured **forbidden** prefix; and, when **care-of prefixes** are
  configured, every care-of address outside them.

Unique-local addresses are refused by default: they are site-scoped (RFC 4193), a mobile
terminal's care-of address on a visited network is not one the balancer's site can route
to, and accepting them would let a peer aim replies into the balancer's own site.  A
deployment whose access networks are numbered from a ULA prefix passes
``allow_unique_local=True``.

Pure: no I/O; the balancer's addresses come from a callable.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Callable, Collection, Iterable, Mapping
from typing import Protocol

from lbproxy.notify.policy import Refusal

__all__ = ["AddressRules", "LocalAddresses", "address_class"]

def _net(text: str) -> ipaddress.IPv6Network:
    return ipaddress.IPv6Network(text)


#: Classes refused whatever the configuration, checked in this order (first match names it).
_CLASSES: tuple[tuple[ipaddress.IPv6Network, str], ...] = (
    (_net("::/128"), "the unspecified address ::"),
    (_net("::1/128"), "the loopback address ::1"),
    (_net("::ffff:0:0/96"), "an IPv4-mapped address"),
    (_net("::/96"), "an IPv4-compatible address"),
    (_net("64:ff9b::/96"), "a NAT64 address"),
    (_net("64:ff9b:1::/48"), "a NAT64 address"),
    (_net("100::/64"), "a discard-only address"),
    (_net("ff00::/8"), "a multicast address"),
    (_net("fe80::/10"), "a link-local address"),
    (_net("fec0::/10"), "a site-local address"),
)
_UNIQUE_LOCAL = _net("fc00::/7")
_GLOBAL_UNICAST = _net("2000::/3")
_IID_MASK = (1 << 64) - 1
_SUBNET_ANYCAST = range(0xFDFF_FFFF_FFFF_FF80, 0xFDFF_FFFF_FFFF_FFFF + 1)  # RFC 2526 §2


def address_class(address: bytes, allow_unique_local: bool = False) -> str | None:
    """Why ``address`` (16 octets) is not a global unicast address, or ``None`` if it is."""
    if len(address) != 16:
        return f"not an IPv6 address ({len(address)} octets)"
    ip = ipaddress.IPv6Address(address)
    for net, name in _CLASSES:
        if ip in net:
            return name
    if ip in _UNIQUE_LOCAL:
        if not allow_unique_local:
            return "a unique-local address"
    elif ip not in _GLOBAL_UNICAST:
        return "outside the global unicast space 2000::/3"
    iid = int(ip) & _IID_MASK
    if iid == 0:
        return "a subnet-router anycast address (interface identifier 0)"
    if iid in _SUBNET_ANYCAST:
        return "a reserved subnet anycast address (RFC 2526)"
    return None


class LocalAddresses(Protocol):
    """What the checker reads of the balancer: ``lbproxy.core.policy.Policy`` provides it."""

    @property
    def vip_set(self) -> Collection[bytes]: ...

    @property
    def by_address(self) -> Mapping[bytes, object]: ...

    @property
    def own(self) -> Collection[bytes]: ...


class AddressRules:
    """The checks on the home and care-of addresses a peer names (module docstring).

    ``local`` returns the balancer's current addresses (``lambda: balancer.policy``); without
    it only the address classes and prefixes are checked.  ``forbidden`` prefixes are refused
    for home and care-of addresses alike; ``care_of_prefixes``, when not empty, are the only
    prefixes a care-of address may come from.
    """

    def __init__(
        self,
        local: Callable[[], LocalAddresses] | None = None,
        forbidden: Iterable[str | ipaddress.IPv6Network] = (),
        care_of_prefixes: Iterable[str | ipaddress.IPv6Network] = (),
        allow_unique_local: bool = False,
    ) -> None:
        self.local = local
        self.forbidden = tuple(ipaddress.IPv6Network(p) for p in forbidden)
        self.care_of_prefixes = tuple(ipaddress.IPv6Network(p) for p in care_of_prefixes)
        self.allow_unique_local = allow_unique_local

    def _common(self, address: bytes, what: str) -> tuple[Refusal, str] | None:
        why = address_class(address, self.allow_unique_local)
        if why is not None:
            return Refusal.BAD_ADDRESS, f"{what} is {why}"
        text = ipaddress.IPv6Address(address)
        if self.local is not None:
            local = self.local()
            if address in local.vip_set:
                return Refusal.LOCAL_ADDRESS, f"{what} {text} is a virtual address"
            if address in local.by_address:
                return Refusal.LOCAL_ADDRESS, f"{what} {text} is a backend"
            if address in local.own:
                return Refusal.LOCAL_ADDRESS, f"{what} {text} is this host's address"
        for prefix in self.forbidden:
            if text in prefix:
                return Refusal.FORBIDDEN_ADDRESS, f"{what} {text} is in forbidden {prefix}"
        return None

    def home(self, address: bytes) -> tuple[Refusal, str] | None:
        """Why the home address ``address`` is refused, or ``None``."""
        return self._common(address, "home address")

    def care_of(self, address: bytes) -> tuple[Refusal, str] | None:
        """Why the care-of address ``address`` is refused, or ``None``."""
        refused = self._common(address, "care-of address")
        if refused is not None:
            return refused
        if self.care_of_prefixes:
            text = ipaddress.IPv6Address(address)
            if not any(text in p for p in self.care_of_prefixes):
                return Refusal.FORBIDDEN_ADDRESS, f"care-of address {text} outside care-of prefixes"
        return None
