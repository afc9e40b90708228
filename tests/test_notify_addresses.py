"""Tests for lbproxy.notify.addresses: which addresses a peer may name."""

from __future__ import annotations

import ipaddress

from twisted.trial.unittest import SynchronousTestCase

from lbproxy.core.policy import build_policy
from lbproxy.core.selection import Backend
from lbproxy.notify.addresses import AddressRules, address_class
from lbproxy.notify.policy import Refusal


def a(text: str) -> bytes:
    return ipaddress.IPv6Address(text).packed


VIP = a("2001:db8:5::80")
OWN = a("2001:db8:f0::2")
BACKEND = Backend("b1", ipaddress.IPv6Address("2001:db8:b0::11"))


class AddressClassTests(SynchronousTestCase):
    """Global unicast only."""

    def test_refused_classes(self) -> None:
        """Every class that cannot be a care-of address is named."""
        for text, why in (
            ("::", "unspecified"),
            ("::1", "loopback"),
            ("::ffff:192.0.2.1", "IPv4-mapped"),
            ("::192.0.2.1", "IPv4-compatible"),
            ("64:ff9b::c000:201", "NAT64"),
            ("64:ff9b:1::1", "NAT64"),
            ("100::1", "discard"),
            ("ff02::1", "multicast"),
            ("ff0e::1", "multicast"),
            ("fe80::1", "link-local"),
            ("febf::1", "link-local"),
            ("fec0::1", "site-local"),
            ("fc00::1", "unique-local"),
            ("fdff::1", "unique-local"),
            ("4000::1", "2000::/3"),
            ("1000::1", "2000::/3"),
            ("2001:db8:a::", "subnet-router anycast"),
            ("2001:db8:a:0:fdff:ffff:ffff:ff80", "subnet anycast"),
            ("2001:db8:a:0:fdff:ffff:ffff:ffff", "subnet anycast"),
        ):
            got = address_class(a(text))
            assert got is not None, text
            self.assertIn(why, got, text)

    def test_global_unicast_accepted(self) -> None:
        """Addresses in 2000::/3 with an ordinary interface identifier are accepted,
        including the documentation prefix the test beds use and the last ones that are
        not RFC 2526 anycast."""
        for text in ("2001:db8:a::16", "2a00:1450::1", "3fff:ffff::1",
                     "2001:db8:a:0:fdff:ffff:ffff:ff7f", "2001:db8:a:0:fe00::1"):  # fmt: skip
            self.assertIsNone(address_class(a(text)), text)

    def test_not_16_octets(self) -> None:
        """A wrong length is named, not raised."""
        got = address_class(b"\x20\x01")
        assert got is not None
        self.assertIn("2 octets", got)

    def test_unique_local_when_allowed(self) -> None:
        """A site whose access networks use ULA turns them on; nothing else changes."""
        self.assertIsNone(address_class(a("fd00:1::1"), allow_unique_local=True))
        self.assertIsNotNone(address_class(a("fe80::1"), allow_unique_local=True))
        self.assertIsNotNone(address_class(a("fd00:1::"), allow_unique_local=True))


class AddressRulesTests(SynchronousTestCase):
    """The balancer's own addresses, forbidden prefixes, care-of prefixes."""

    def setUp(self) -> None:
        self.policy = build_policy(vips=[VIP], ports=(), translate=True, backends=[BACKEND],
                                   own=[OWN])  # fmt: skip
        self.rules = AddressRules(lambda: self.policy, forbidden=["2001:db8:d::/48"])

    def test_local(self) -> None:
        """The virtual address, a backend, this host: refused as care-of and home."""
        for address, what in ((VIP, "virtual"), (BACKEND.packed, "backend"), (OWN, "host")):
            for check in (self.rules.care_of, self.rules.home):
                got = check(address)
                assert got is not None
                self.assertEqual(got[0], Refusal.LOCAL_ADDRESS)
                self.assertIn(what, got[1])

    def test_policy_read_on_every_check(self) -> None:
        """A reload that adds a backend is seen by the next check."""
        extra = Backend("b9", ipaddress.IPv6Address("2001:db8:b0::99"))
        self.assertIsNone(self.rules.care_of(extra.packed))
        self.policy = build_policy(vips=[VIP], ports=(), translate=True,
                                   backends=[BACKEND, extra], own=[OWN])  # fmt: skip
        got = self.rules.care_of(extra.packed)
        assert got is not None
        self.assertEqual(got[0], Refusal.LOCAL_ADDRESS)

    def test_forbidden(self) -> None:
        """A configured forbidden prefix."""
        got = self.rules.care_of(a("2001:db8:d::5"))
        assert got is not None
        self.assertEqual(got[0], Refusal.FORBIDDEN_ADDRESS)
        self.assertIsNone(self.rules.care_of(a("2001:db8:e::5")))

    def test_care_of_prefixes(self) -> None:
        """With care-of prefixes, a care-of address must be inside one; a home need not."""
        rules = AddressRules(care_of_prefixes=["2001:db8:a::/48"])
        self.assertIsNone(rules.care_of(a("2001:db8:a::5")))
        got = rules.care_of(a("2001:db8:b::5"))
        assert got is not None
        self.assertEqual(got[0], Refusal.FORBIDDEN_ADDRESS)
        self.assertIsNone(rules.home(a("2001:db8:1::5")))

    def test_class_first(self) -> None:
        """The class is checked first, so a multicast address is ``bad_address``."""
        got = self.rules.care_of(a("ff02::1"))
        assert got is not None
        self.assertEqual(got[0], Refusal.BAD_ADDRESS)
