"""The test bed's fixed address plan.

Every address the bed uses is written here once, so that a balancer
configuration, a test or the demo can name them without repeating literals.
Terminals and backends are numbered from 1.  All addresses are in the
documentation prefix 2001:db8::/32 (RFC 3849).

===========================  ===================================================
access link k (1..9)         2001:db8:a<k>::/64, router ``::1``
care-of address              2001:db8:a<k>::<1000+i>  (terminal i on link k)
home link                    2001:db8:100::/64, router ``::ffff``
home agent                   2001:db8:100::1
home address                 2001:db8:100::<1000+i>
balancer link                2001:db8:f0::/64, router ``::1``, balancer ``::2``
virtual address (VIP)        2001:db8:5::80 (the VIP prefix is 2001:db8:5::/64)
server link                  2001:db8:b0::/64, balancer ``::1``
backend b<i>                 2001:db8:b0::1<i>
balancer k of a fleet        client link 2001:db8:f0:<k-1>::/64 (router ``::1``,
                             balancer ``::2``), server side 2001:db8:b0::<k>
===========================  ===================================================

Balancer 1 of a fleet has the single balancer's addresses, so ``TestBed(balancers=1)``
is the bed as it always was.

``<1000+i>`` is the decimal number written as one hexadecimal group, so
terminal 1 has home address 2001:db8:100::1001 and terminal 50 has
2001:db8:100::1050; hence at most 8999 terminals.
"""

from __future__ import annotations

from ipaddress import IPv6Address, IPv6Network

MAX_TERMINALS = 8999
MAX_LINKS = 9
MAX_BALANCERS = 9

HOME_PREFIX = IPv6Network("2001:db8:100::/64")
HOME_AGENT = IPv6Address("2001:db8:100::1")
HOME_ROUTER = IPv6Address("2001:db8:100::ffff")

VIP = IPv6Address("2001:db8:5::80")
VIP_PREFIX = IPv6Network("2001:db8:5::/64")

BALANCER_LINK = IPv6Network("2001:db8:f0::/64")
BALANCER_ROUTER = IPv6Address("2001:db8:f0::1")
BALANCER_CLIENT_SIDE = IPv6Address("2001:db8:f0::2")

SERVER_LINK = IPv6Network("2001:db8:b0::/64")
BALANCER_SERVER_SIDE = IPv6Address("2001:db8:b0::1")

TCP_PORT = 80
UDP_PORT = 5353


def _check_terminal(index: int) -> None:
    if not 1 <= index <= MAX_TERMINALS:
        raise ValueError(f"terminal index {index} outside 1..{MAX_TERMINALS}")


def _check_link(link: int) -> None:
    if not 1 <= link <= MAX_LINKS:
        raise ValueError(f"access link {link} outside 1..{MAX_LINKS}")


def access_prefix(link: int) -> IPv6Network:
    """The care-of prefix of access link ``link``."""
    _check_link(link)
    return IPv6Network(f"2001:db8:a{link}::/64")


def access_router(link: int) -> IPv6Address:
    """The router's address on access link ``link``."""
    _check_link(link)
    return IPv6Address(f"2001:db8:a{link}::1")


def home_address(index: int) -> IPv6Address:
    """Terminal ``index``'s home address (HoA)."""
    _check_terminal(index)
    return IPv6Address(f"2001:db8:100::{1000 + index}")


def care_of_address(index: int, link: int) -> IPv6Address:
    """Terminal ``index``'s care-of address (CoA) while it is on access link ``link``."""
    _check_terminal(index)
    _check_link(link)
    return IPv6Address(f"2001:db8:a{link}::{1000 + index}")


def terminal_of(address: IPv6Address | str) -> int | None:
    """The terminal index whose home or care-of address this is, or None."""
    addr = IPv6Address(address)
    if addr in HOME_PREFIX or any(addr in access_prefix(k) for k in range(1, MAX_LINKS + 1)):
        low = int(addr) & 0xFFFF_FFFF_FFFF_FFFF
        try:
            index = int(f"{low:x}") - 1000
        except ValueError:
            return None
        if 1 <= index <= MAX_TERMINALS:
            return index
    return None


def _check_balancer(index: int) -> None:
    if not 1 <= index <= MAX_BALANCERS:
        raise ValueError(f"balancer index {index} outside 1..{MAX_BALANCERS}")


def balancer_link(index: int) -> IPv6Network:
    """Balancer ``index``'s own link to the router (balancer 1: `BALANCER_LINK`)."""
    _check_balancer(index)
    return IPv6Network(f"2001:db8:f0:{index - 1:x}::/64")


def balancer_router(index: int) -> IPv6Address:
    """The router's address on balancer ``index``'s link (balancer 1: `BALANCER_ROUTER`)."""
    return balancer_link(index)[1]


def balancer_client_side(index: int) -> IPv6Address:
    """Balancer ``index``'s address towards the router, an ECMP next hop of the virtual
    prefix (balancer 1: `BALANCER_CLIENT_SIDE`)."""
    return balancer_link(index)[2]


def balancer_server_side(index: int) -> IPv6Address:
    """Balancer ``index``'s address on the server link, a gateway of the backends
    (balancer 1: `BALANCER_SERVER_SIDE`)."""
    _check_balancer(index)
    return SERVER_LINK[index]


def backend_name(index: int) -> str:
    """Backend ``index``'s name, as it greets clients: ``b1``, ``b2``..."""
    return f"b{index}"


def backend_address(index: int) -> IPv6Address:
    """Backend ``index``'s address on the server link."""
    if index < 1:
        raise ValueError(f"backend index {index} must be at least 1")
    return IPv6Address(f"2001:db8:b0::1{index}")
