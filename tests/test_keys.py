"""Tests for lbproxy.core.keys: the Key value, the four strategies and the KeyChain.

Packets are built with scapy (an independent oracle for where the fields sit) and read
through the real header-chain view, as the data path does.
"""

from __future__ import annotations

import ipaddress

from hypothesis import given
from hypothesis import strategies as st
from scapy.layers.inet import UDP
from scapy.layers.inet6 import HAO, IPv6, IPv6ExtHdrDestOpt
from scapy.layers.ipsec import ESP
from twisted.trial.unittest import SynchronousTestCase
from zope.interface import implementer
from zope.interface.verify import verifyObject

from lbproxy.core import keys
from lbproxy.core.keys import (
    HomeAddressStrategy,
    IKeyStrategy,
    InterfaceIdStrategy,
    Key,
    KeyChain,
    SourceAddressStrategy,
    SpiStrategy,
)
from lbproxy.wire.view import PacketView, parse

EUI64_SRC = "2001:db8:2::211:22ff:fe33:4455"  # u bit set, ff fe in the middle
PRIVACY_SRC = "2001:db8:2::8c1e:51a7:d3f0:2b6a"
HOME = "2001:db8:1::16"
VIP = "2001:db8::100"

addresses = st.binary(min_size=16, max_size=16).map(
    lambda b: str(ipaddress.IPv6Address(b))
)


def packet(src: str = EUI64_SRC, hoa: str | None = None, spi: int | None = None) -> bytes:
    """An IPv6 packet to the virtual address, optionally with an HAO and/or ESP."""
    p = IPv6(src=src, dst=VIP)
    if hoa is not None:
        p = p / IPv6ExtHdrDestOpt(options=[HAO(hoa=hoa)])
    if spi is not None:
        p = p / ESP(spi=spi, seq=1, data=b"\x00" * 16)
    else:
        p = p / UDP(sport=4000, dport=53) / (b"q" * 8)
    return bytes(p)


def viewed(buf: bytes) -> tuple[bytes, PacketView]:
    return buf, parse(buf)


def addr(text: str) -> bytes:
    return ipaddress.IPv6Address(text).packed


class KeyTests(SynchronousTestCase):
    def test_text_forms(self) -> None:
        """Each built-in kind prints in the operator's form given by the contract; an
        address is ``addr`` whether it came as a home address or a source address."""
        self.assertEqual(str(Key("addr", addr("2001:db8:1::16"))), "addr 2001:db8:1::16")
        self.assertEqual(str(Key("hoa", addr("2001:db8:1::16"))), "addr 2001:db8:1::16")
        self.assertEqual(
            str(Key("iid", bytes.fromhex("021122fffe334455"))), "iid 0211:22ff:fe33:4455"
        )
        self.assertEqual(str(Key("spi", (0xDA).to_bytes(4, "big"))), "spi 0x000000da")
        self.assertEqual(str(Key("src", addr("2001:db8::1"))), "addr 2001:db8::1")

    @given(
        st.sampled_from([("addr", 16), ("iid", 8), ("spi", 4)]).flatmap(
            lambda kl: st.tuples(st.just(kl[0]), st.binary(min_size=kl[1], max_size=kl[1]))
        )
    )
    def test_parse_inverts_str(self, kind_value: tuple[str, bytes]) -> None:
        """Key.parse(str(k)) gives back an equal key with the same kind and value."""
        kind, value = kind_value
        k = Key(kind, value)
        back = Key.parse(str(k))
        self.assertEqual(back, k)
        self.assertEqual(hash(back), hash(k))
        self.assertEqual((back.kind, back.value), (kind, value))

    def test_parse_lenient_forms(self) -> None:
        """Operators may type short SPIs and IID groups; they mean the same key."""
        self.assertEqual(Key.parse("spi 218"), Key("spi", b"\x00\x00\x00\xda"))
        self.assertEqual(
            Key.parse(" iid 211:22ff:fe33:4455 "), Key("iid", bytes.fromhex("021122fffe334455"))
        )

    def test_parse_errors(self) -> None:
        """Bad text raises ValueError naming the problem, never another exception."""
        for text in ["", "hoa", "foo 1", "hoa not-an-address", "iid 1:2:3", "spi 0x1ffffffff",
                     "spi xyz", "src 10.0.0.1"]:
            with self.assertRaises(ValueError, msg=text):
                Key.parse(text)

    def test_equality_by_kind_and_value(self) -> None:
        """Keys are equal exactly when kind and value are.  Addresses are one namespace:
        the same 16 bytes as a home address and as a source address are one identity
        (a terminal at home is the terminal away), and the old names read as ``addr``;
        an interface ID with the same bytes as part of an address is another."""
        a = addr(HOME)
        self.assertEqual(Key("hoa", a), Key("hoa", bytearray(a)))
        self.assertEqual(Key("hoa", a), Key("src", a))
        self.assertEqual(Key.parse(f"hoa {HOME}"), Key.parse(f"src {HOME}"))
        self.assertEqual(Key.parse(f"src {HOME}").kind, "addr")
        self.assertEqual(len({Key("hoa", a), Key("addr", a), Key("src", a)}), 1)
        self.assertNotEqual(Key("iid", a[8:]), Key("addr", a))

    def test_value_length_checked(self) -> None:
        """A value of the wrong length for its kind, or an unknown kind, is refused."""
        with self.assertRaises(ValueError):
            Key("hoa", b"\x00" * 8)
        with self.assertRaises(ValueError):
            Key("nope", b"\x00" * 16)


class StrategyTests(SynchronousTestCase):
    def test_interfaces(self) -> None:
        """Every built-in strategy provides IKeyStrategy with its kind name."""
        for strategy, kind in [
            (HomeAddressStrategy(), "hoa"),
            (InterfaceIdStrategy(), "iid"),
            (SpiStrategy(), "spi"),
            (SourceAddressStrategy(), "src"),
        ]:
            self.assertTrue(verifyObject(IKeyStrategy, strategy))
            self.assertEqual(strategy.kind, kind)

    @given(addresses, addresses)
    def test_home_address_agrees_with_scapy(self, src: str, home: str) -> None:
        """The hoa key is the HAO's home address, as scapy put it there."""
        buf, view = viewed(packet(src=src, hoa=home))
        self.assertEqual(HomeAddressStrategy().key_for(buf, view), Key("hoa", addr(home)))

    def test_home_address_absent(self) -> None:
        """Without an HAO the hoa strategy yields nothing."""
        self.assertIsNone(HomeAddressStrategy().key_for(*viewed(packet())))

    def test_interface_id_universal_eui64(self) -> None:
        """A universal EUI-64 source yields its low 64 bits as the iid key."""
        key = InterfaceIdStrategy().key_for(*viewed(packet(src=EUI64_SRC)))
        self.assertEqual(key, Key.parse("iid 0211:22ff:fe33:4455"))

    def test_interface_id_same_across_prefixes(self) -> None:
        """The iid key does not change when the terminal moves to another prefix."""
        a = InterfaceIdStrategy().key_for(*viewed(packet(src="2001:db8:2::211:22ff:fe33:4455")))
        b = InterfaceIdStrategy().key_for(*viewed(packet(src="2001:db8:7::211:22ff:fe33:4455")))
        self.assertIsNotNone(a)
        self.assertEqual(a, b)

    def test_interface_id_refuses_unstable_ids(self) -> None:
        """By default a privacy ID, an EUI-64 with the u bit clear, or ff fe elsewhere
        yields no iid key: only a universal EUI-64 ID stays the same across networks."""
        strategy = InterfaceIdStrategy()
        for src in [PRIVACY_SRC, "2001:db8:2::11:22ff:fe33:4455", "2001:db8:2::2ff:fe00:0:1"]:
            self.assertIsNone(strategy.key_for(*viewed(packet(src=src))), src)

    def test_interface_id_accept_any(self) -> None:
        """With accept_any, any source's interface ID is the key."""
        key = InterfaceIdStrategy(accept_any=True).key_for(*viewed(packet(src=PRIVACY_SRC)))
        self.assertEqual(key, Key("iid", addr(PRIVACY_SRC)[8:]))

    @given(st.integers(min_value=0, max_value=2**32 - 1))
    def test_spi_agrees_with_scapy(self, spi: int) -> None:
        """The spi key is the ESP header's SPI, as scapy put it there."""
        buf, view = viewed(packet(spi=spi))
        key = SpiStrategy().key_for(buf, view)
        self.assertEqual(key, Key("spi", spi.to_bytes(4, "big")))
        self.assertEqual(str(key), f"spi 0x{spi:08x}")

    def test_spi_absent(self) -> None:
        """Without ESP the spi strategy yields nothing."""
        self.assertIsNone(SpiStrategy().key_for(*viewed(packet())))

    @given(addresses)
    def test_source_address(self, src: str) -> None:
        """The src strategy always yields the source address."""
        self.assertEqual(
            SourceAddressStrategy().key_for(*viewed(packet(src=src))), Key("src", addr(src))
        )

    def test_buffer_types(self) -> None:
        """bytes, bytearray and memoryview buffers give the same keys (the raw socket
        hands the data path bytearrays)."""
        raw = packet(src=EUI64_SRC, hoa=HOME, spi=7)
        view = parse(raw)
        strategies = [HomeAddressStrategy(), InterfaceIdStrategy(), SpiStrategy(),
                      SourceAddressStrategy()]
        expected = [s.key_for(raw, view) for s in strategies]
        self.assertNotIn(None, expected)
        for buf in (bytearray(raw), memoryview(raw)):
            got = [s.key_for(buf, view) for s in strategies]
            self.assertEqual(got, expected)
            self.assertTrue(all(type(k) is Key for k in got))


class KeyChainTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.chain = KeyChain.from_names(["hoa", "iid", "spi", "src"])

    def kind_of(self, buf: bytes) -> str:
        found = self.chain.key_for(*viewed(buf))
        assert found is not None
        key, strategy = found
        self.assertEqual(key.kind, {"hoa": "addr", "src": "addr"}.get(strategy.kind,
                                                                      strategy.kind))
        return str(strategy.kind)

    def test_first_strategy_wins(self) -> None:
        """The chain returns the key of the first strategy that yields one."""
        self.assertEqual(self.kind_of(packet(src=EUI64_SRC, hoa=HOME, spi=9)), "hoa")
        self.assertEqual(self.kind_of(packet(src=EUI64_SRC, spi=9)), "iid")
        self.assertEqual(self.kind_of(packet(src=PRIVACY_SRC, spi=9)), "spi")
        self.assertEqual(self.kind_of(packet(src=PRIVACY_SRC)), "src")

    def test_order_is_configurable(self) -> None:
        """The configured order, not a fixed one, decides."""
        chain = KeyChain.from_names(["spi", "src"])
        found = chain.key_for(*viewed(packet(src=EUI64_SRC, hoa=HOME, spi=9)))
        assert found is not None
        self.assertEqual(found[0], Key("spi", (9).to_bytes(4, "big")))

    def test_nothing_found(self) -> None:
        """A chain without a fallback can find nothing: None."""
        chain = KeyChain.from_names(["hoa", "spi"])
        self.assertIsNone(chain.key_for(*viewed(packet())))

    def test_from_names_options(self) -> None:
        """any_interface_id reaches the iid strategy."""
        chain = KeyChain.from_names(["iid", "src"], any_interface_id=True)
        found = chain.key_for(*viewed(packet(src=PRIVACY_SRC)))
        assert found is not None
        self.assertEqual(found[0].kind, "iid")

    def test_from_names_errors(self) -> None:
        """Unknown names, repeated names, stray options and empty chains are refused with
        a message naming the culprit."""
        with self.assertRaises(ValueError) as e:
            KeyChain.from_names(["hoa", "mac"])
        self.assertIn("'mac'", str(e.exception))
        self.assertIn("(registered: hoa, iid, spi, ike, src", str(e.exception))
        with self.assertRaises(ValueError) as e:
            KeyChain.from_names(["src", "src"])
        self.assertIn("'src'", str(e.exception))
        with self.assertRaises(ValueError) as e:
            KeyChain.from_names(["hoa"], any_interface_id=True)
        self.assertIn("'any_interface_id'", str(e.exception))
        with self.assertRaises(ValueError):
            KeyChain.from_names([])

    def test_options_reach_only_declaring_strategies(self) -> None:
        """Each strategy is called with the options it declares and no others, and
        declared_options says which options a chain takes."""
        calls: list[dict[str, object]] = []

        def coloured(colour: str = "none") -> IKeyStrategy:
            calls.append({"colour": colour})
            return SourceAddressStrategy()

        def plain() -> IKeyStrategy:  # any keyword would be a TypeError
            calls.append({})
            return HomeAddressStrategy()

        keys.register_strategy("coloured-test", coloured, options=["colour"])
        self.addCleanup(keys.STRATEGY_REGISTRY.unregister, "coloured-test")
        keys.register_strategy("plain-test", plain)
        self.addCleanup(keys.STRATEGY_REGISTRY.unregister, "plain-test")
        KeyChain.from_names(["plain-test", "coloured-test"], colour="red")
        self.assertEqual(calls, [{}, {"colour": "red"}])
        self.assertEqual(keys.declared_options(["plain-test", "src"]), frozenset())
        self.assertEqual(keys.declared_options(["iid", "coloured-test", "nonesuch"]),
                         {"any_interface_id", "colour"})
        with self.assertRaises(ValueError) as e:
            KeyChain.from_names(["plain-test"], colour="red")
        self.assertIn("'colour'", str(e.exception))

    def test_broken_factories(self) -> None:
        """A factory that raises, or makes something that is not an IKeyStrategy, is a
        ValueError naming the strategy, not a stray exception."""

        def fails() -> IKeyStrategy:
            raise RuntimeError("no such device")

        keys.register_strategy("fails-test", fails)
        self.addCleanup(keys.STRATEGY_REGISTRY.unregister, "fails-test")
        keys.register_strategy("wrong-test", object)  # type: ignore[arg-type]
        self.addCleanup(keys.STRATEGY_REGISTRY.unregister, "wrong-test")
        with self.assertRaises(ValueError) as e:
            KeyChain.from_names(["fails-test"])
        self.assertIn("'fails-test'", str(e.exception))
        self.assertIn("RuntimeError: no such device", str(e.exception))
        with self.assertRaises(ValueError) as e:
            KeyChain.from_names(["wrong-test"])
        self.assertIn("does not provide IKeyStrategy", str(e.exception))

    def test_registration_errors(self) -> None:
        """A taken name, a name that is not one word, or options given as one string are
        refused."""
        with self.assertRaises(ValueError):
            keys.register_strategy("src", SourceAddressStrategy)
        with self.assertRaises(ValueError):
            keys.register_strategy("two words", SourceAddressStrategy)
        with self.assertRaises(TypeError):
            keys.register_strategy("x-test", SourceAddressStrategy, options="colour")
        self.assertNotIn("x-test", keys.known_strategies())

    def test_plugin_strategy(self) -> None:
        """A new kind and strategy plug in through the registries, without touching
        KeyChain: here a key on the flow label."""
        keys.register_kind("flow-test", 3)
        self.addCleanup(keys.unregister_kind, "flow-test")

        @implementer(IKeyStrategy)
        class FlowLabelStrategy:
            kind = "flow-test"

            def key_for(self, buf: bytes | bytearray | memoryview, view: PacketView) -> Key | None:
                label = bytes([buf[1] & 0x0F]) + bytes(buf[2:4])
                return Key("flow-test", label) if any(label) else None

        keys.register_strategy("flow-test", FlowLabelStrategy)
        self.addCleanup(keys.STRATEGY_REGISTRY.unregister, "flow-test")
        self.assertIn("flow-test", keys.known_strategies())
        chain = KeyChain.from_names(["flow-test", "src"])
        buf = bytes(IPv6(src=PRIVACY_SRC, dst=VIP, fl=0xABCDE) / UDP() / b"x")
        found = chain.key_for(*viewed(buf))
        assert found is not None
        self.assertEqual(str(found[0]), "flow-test 0abcde")
        self.assertEqual(Key.parse("flow-test 0abcde"), found[0])
        with self.assertRaises(ValueError):
            keys.register_strategy("flow-test", FlowLabelStrategy)
