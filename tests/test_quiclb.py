"""The ``quic`` key strategy (QUIC-LB server IDs, `lbproxy.core.quiclb`) and what the
balancer does with its keys, in-process.

Oracles: scapy builds and dissects the IPv6/UDP packets and the long headers; aioquic --
a real QUIC stack -- builds the QUIC packets themselves (a whole handshake between its
client and a server whose connection IDs carry a server ID, and short-header packets
from its packet builder), and its own header parser says which Destination Connection
ID each packet carries.  Garbage, truncated headers and near misses (another config
rotation codepoint, another length, an unknown server ID, another port, TCP) yield no
key and raise nothing.
"""

from __future__ import annotations

import ipaddress
import os
import tempfile

import attrs
from hypothesis import given, settings
from hypothesis import strategies as st
from scapy.layers.inet import TCP, UDP
from scapy.layers.inet6 import HAO, IPv6, IPv6ExtHdrDestOpt
from scapy.layers.quic import QUIC_Handshake, QUIC_Initial
from scapy.packet import Raw
from twisted.internet.task import Clock
from twisted.trial.unittest import SkipTest, SynchronousTestCase

from lbproxy.core.balancer import Balancer
from lbproxy.core.keys import INamedKeyStrategy, Key, KeyChain
from lbproxy.core.quiclb import QuicLbSettings, QuicLbStrategy, encode_cid, server_id_key
from lbproxy.core.quiclb_cipher import ServerIdCipher
from lbproxy.core.selection import Backend, scheduler_from_name
from lbproxy.core.table import StickyTable
from lbproxy.wire.view import parse
from tests.test_balancer import BACKENDS, VIP

SETTINGS = QuicLbSettings(
    config_rotation=1,
    server_id_length=2,
    nonce_length=5,
    server_ids={bytes.fromhex("0b01"): "srv1", bytes.fromhex("0b02"): "srv2",
                bytes.fromhex("0b03"): "srv3"},
)  # fmt: skip
CLIENT = "2001:db8:c1::1"
MOVED = "2001:db8:c1::2"


def udp(payload: bytes, source: str = CLIENT, dport: int = 443) -> bytearray:
    return bytearray(bytes(IPv6(src=source, dst=VIP) / UDP(sport=50000, dport=dport) / payload))


def short_header(cid: bytes, rest: bytes = b"\x01" * 20) -> bytes:
    """A 1-RTT packet's bytes as the invariants see them: first octet 0b01xxxxxx, DCID."""
    return bytes((0x41,)) + cid + rest


def key_of(packet: bytearray, settings: QuicLbSettings = SETTINGS) -> Key | None:
    return QuicLbStrategy(settings).key_for(packet, parse(packet))


def balancer(chain: list[str], scheduler: str = "maglev") -> tuple[Balancer, Clock]:
    clock = Clock()
    b = Balancer(
        chain=KeyChain.from_names(chain, **({"quic": SETTINGS} if "quic" in chain else {})),
        table=StickyTable(clock, 300.0, 1000),
        scheduler=scheduler_from_name(scheduler),
        backends=BACKENDS,
        virtual_addresses=[ipaddress.IPv6Address(VIP)],
        clock=clock,
    )
    return b, clock


def address_key(address: str) -> Key:
    return Key("addr", ipaddress.IPv6Address(address).packed)


def backend_name(backend: Backend | None) -> str | None:
    return None if backend is None else backend.name


def bound_to(b: Balancer, address: str) -> str | None:
    """The backend of the binding `address` leads to (None: it has none)."""
    binding = b.table.get(address_key(address))
    return None if binding is None else binding.backend.name


def to(b: Balancer, packet: bytearray) -> str:
    out = b.inbound(packet)
    assert out is not None, b.counters.as_dict()
    return {str(x.address): x.name for x in BACKENDS}[str(IPv6(bytes(out)).dst)]


class SettingsTests(SynchronousTestCase):
    def test_connection_id_layout(self) -> None:
        """First octet: config rotation in the 3 high bits, length - 1 in the 5 low;
        then the server ID, then the nonce."""
        cid = encode_cid(SETTINGS, bytes.fromhex("0b02"), bytes.fromhex("0102030405"))
        self.assertEqual(cid, bytes.fromhex("27" "0b02" "0102030405"))
        self.assertEqual(cid[0] >> 5, 1)
        self.assertEqual((cid[0] & 0x1F) + 1, len(cid))
        random_low = QuicLbSettings(config_rotation=6, length_self_description=False)
        for _ in range(20):
            self.assertEqual(encode_cid(random_low, b"\1\2")[0] >> 5, 6)

    def test_refused(self) -> None:
        """Settings the draft does not allow are refused, saying why."""
        for fields, words in [
            ({"config_rotation": 7}, "unroutable"),
            ({"config_rotation": -1}, "not 0 to 6"),
            ({"server_id_length": 0}, "server ID length 0"),
            ({"server_id_length": 16}, "server ID length 16"),
            ({"nonce_length": 3}, "below the draft's 4"),
            ({"server_id_length": 15, "nonce_length": 5}, "do not fit a 20-octet"),
            ({"server_ids": {b"\1": "srv1"}}, "is 1 octets, not 2"),
        ]:
            with self.assertRaises(ValueError) as caught:
                QuicLbSettings(**fields)  # type: ignore[arg-type]
            self.assertIn(words, str(caught.exception))

    def test_key_text(self) -> None:
        """``quic 0a0b`` is what operators see and type."""
        key = server_id_key(bytes.fromhex("0a0b"))
        self.assertEqual(str(key), "quic 0a0b")
        self.assertEqual(Key.parse("quic 0a0b"), key)
        self.assertEqual(key.kind, "quic")
        self.assertNotEqual(Key.parse("quic 0a0b00"), key)
        self.assertRaises(ValueError, Key.parse, "quic " + "00" * 16)

    def test_strategy_is_registered_and_named(self) -> None:
        chain = KeyChain.from_names(["quic", "src"], quic=SETTINGS)
        strategy = chain.strategies[0]
        assert isinstance(strategy, QuicLbStrategy)
        self.assertTrue(INamedKeyStrategy.providedBy(strategy))
        self.assertEqual(strategy.backend_name(server_id_key(b"\x0b\x02")), "srv2")
        self.assertIsNone(strategy.backend_name(server_id_key(b"\x0b\x09")))


class StrategyTests(SynchronousTestCase):
    def test_long_headers_by_scapy(self) -> None:
        """Initial and Handshake packets built and dissected by scapy: the server ID of
        a routable DCID, whatever the packet type, and nothing for the client's own."""
        cid = encode_cid(SETTINGS, bytes.fromhex("0b03"))
        for layer in (QUIC_Initial, QUIC_Handshake):
            pkt = IPv6(src=CLIENT, dst=VIP) / UDP(sport=50000, dport=443) / layer(
                DstConnID=cid, SrcConnID=os.urandom(8), PacketNumber=1) / Raw(b"\0" * 40)
            data = bytearray(bytes(pkt))
            dissected = layer(bytes(IPv6(bytes(data))[UDP].payload))
            self.assertEqual(dissected.DstConnID, cid)
            key = key_of(data)
            self.assertEqual(key, server_id_key(dissected.DstConnID[1:3]))
            self.assertEqual(str(key), "quic 0b03")
        # The client's first Initial: its random DCID (codepoint 0 here) is not ours.
        random_dcid = bytes.fromhex("07") + os.urandom(7)
        pkt = IPv6(src=CLIENT, dst=VIP) / UDP(sport=50000, dport=443) / QUIC_Initial(
            DstConnID=random_dcid, SrcConnID=os.urandom(8)) / Raw(b"\0" * 1200)
        self.assertIsNone(key_of(bytearray(bytes(pkt))))

    def test_short_header(self) -> None:
        """A 1-RTT packet: the DCID starts at the second octet, of the configured length."""
        cid = encode_cid(SETTINGS, bytes.fromhex("0b01"))
        self.assertEqual(str(key_of(udp(short_header(cid)))), "quic 0b01")
        # Exactly long enough for the DCID: still read; one octet less: refused.
        self.assertEqual(str(key_of(udp(short_header(cid, b"")))), "quic 0b01")
        self.assertIsNone(key_of(udp(short_header(cid, b"")[:-1])))

    def test_near_misses(self) -> None:
        """Each differs from a routable packet in one way, and yields no key."""
        sid = bytes.fromhex("0b01")
        cid = encode_cid(SETTINGS, sid)
        other_rotation = bytes(((2 << 5) | 7,)) + cid[1:]
        other_length = bytes(((1 << 5) | 8,)) + cid[1:]
        unknown = encode_cid(SETTINGS, bytes.fromhex("0b09"))
        unroutable = bytes(((7 << 5) | 7,)) + cid[1:]
        for packet, why in [
            (udp(short_header(other_rotation)), "config rotation 2"),
            (udp(short_header(other_length)), "length self-description 9"),
            (udp(short_header(unknown)), "unknown server ID"),
            (udp(short_header(unroutable)), "unroutable codepoint"),
            (udp(short_header(cid), dport=4433), "not a QUIC port"),
            (bytearray(bytes(IPv6(src=CLIENT, dst=VIP) / TCP(sport=5, dport=443)
                             / short_header(cid))), "TCP"),
            (udp(b""), "empty"),
            # A long header whose DCID length is not the configured one.
            (udp(bytes((0xC0,)) + b"\0\0\0\1" + bytes((9,)) + cid + b"\0" + b"\0" * 30),
             "long header DCID of 9"),
        ]:
            self.assertIsNone(key_of(packet), why)
        # Without length self-description, the low 5 bits are not looked at.
        loose = QuicLbSettings(config_rotation=1, length_self_description=False,
                               server_ids={sid: "srv1"})  # fmt: skip
        self.assertEqual(str(key_of(udp(short_header(other_length)), loose)), "quic 0b01")

    def test_truncated_at_every_length(self) -> None:
        """Every prefix of a long and a short header: a key only once the server ID is
        in, no exception anywhere."""
        cid = encode_cid(SETTINGS, bytes.fromhex("0b02"))
        long = bytes((0xC3,)) + b"\0\0\0\1" + bytes((len(cid),)) + cid + b"\x08" + os.urandom(8)
        for quic in (long, short_header(cid)):
            first = (6 if quic[0] & 0x80 else 1) + len(cid)
            for n in range(len(quic) + 1):
                key = key_of(udp(quic[:n]))
                self.assertEqual(key is not None, n >= first, (quic[:n].hex(), n))

    @settings(max_examples=400, deadline=None)
    @given(st.binary(max_size=64), st.sampled_from([443, 80]))
    def test_garbage(self, payload: bytes, port: int) -> None:
        """Arbitrary UDP payloads: a key only when it has the shape, never an exception."""
        key = key_of(udp(payload, dport=port))
        if key is not None:
            self.assertEqual(port, 443)
            cid = payload[6:14] if payload[0] & 0x80 else payload[1:9]
            self.assertEqual(cid[0], 0x27)
            self.assertEqual(key, server_id_key(cid[1:3]))


class AioquicTests(SynchronousTestCase):
    """A real handshake between aioquic's client and a server whose connection IDs carry
    server ID 0b02, and the strategy on every packet the client sent."""

    def setUp(self) -> None:
        try:
            from aioquic.quic.configuration import QuicConfiguration  # noqa: F401
        except ImportError as e:
            raise SkipTest(f"aioquic is not installed ({e})") from None

    def test_handshake_and_transfer(self) -> None:
        """Unencrypted connection IDs: the server ID in clear after the first octet."""
        self.handshake(SETTINGS)

    def test_handshake_and_transfer_encrypted(self) -> None:
        """Encrypted connection IDs (four-pass, 7 octets): nothing of the server ID in
        clear, and the strategy still finds it."""
        self.handshake(ENCRYPTED)

    def handshake(self, settings: QuicLbSettings) -> None:
        from aioquic.buffer import Buffer
        from aioquic.quic.configuration import QuicConfiguration
        from aioquic.quic.connection import QuicConnection
        from aioquic.quic.packet import pull_quic_header

        from lbproxy.notify.pki import CertificateAuthority
        from lbproxy.testbed.quicpeer import ALPN, SERVER_NAME, QuicLbConnection

        ca = CertificateAuthority("quiclb test CA")
        directory = tempfile.mkdtemp()
        ca_path, cert, key = ca.write(directory, "server", ca.issue(dns=[SERVER_NAME]))
        server_config = QuicConfiguration(is_client=False, alpn_protocols=[ALPN],
                                          connection_id_length=settings.cid_length)  # fmt: skip
        server_config.load_cert_chain(cert, key)
        client_config = QuicConfiguration(is_client=True, alpn_protocols=[ALPN],
                                          server_name=SERVER_NAME)  # fmt: skip
        client_config.load_verify_locations(ca_path)
        client = QuicConnection(configuration=client_config)
        now = 1.0
        client.connect(("2001:db8:5::80", 443), now)
        server: QuicLbConnection | None = None
        keys: list[tuple[bytes, Key | None]] = []
        stream = None
        sent = 0
        for _ in range(40):
            now += 0.01
            for data, _ in client.datagrams_to_send(now):
                dcid = pull_quic_header(Buffer(data=data), host_cid_length=8).destination_cid
                keys.append((dcid, key_of(udp(data), settings)))
                if server is None:
                    server = QuicLbConnection(
                        configuration=server_config, original_destination_connection_id=dcid,
                        cid_factory=lambda: encode_cid(settings, b"\x0b\x02"))  # fmt: skip
                server.receive_datagram(data, (CLIENT, 50000), now)
            assert server is not None
            for data, _ in server.datagrams_to_send(now):
                client.receive_datagram(data, ("2001:db8:5::80", 443), now)
            if stream is None and client._handshake_complete:
                stream = client.get_next_available_stream_id()
            if stream is not None and sent < 10:
                client.send_stream_data(stream, b"x" * 1000)
                sent += 1
                if sent == 5 and client._peer_cid_available:
                    client.change_connection_id()
        self.assertIsNotNone(stream)
        dcids = [d for d, _ in keys]
        # The client's first Initial carries its own random DCID: no key.
        self.assertIsNone(keys[0][1])
        routable = [(d, k) for d, k in keys if d != dcids[0]]
        self.assertGreater(len(routable), 3)
        self.assertGreaterEqual(len({d for d, _ in routable}), 2)  # a fresh CID too
        for dcid, found in routable:
            self.assertEqual(dcid[0], 0x27)
            if settings.key is None:
                self.assertEqual(dcid[1:3], b"\x0b\x02")
            else:
                self.assertEqual(ServerIdCipher(settings.key, 2, 5).server_id(dcid[1:]),
                                 b"\x0b\x02")  # fmt: skip
            self.assertEqual(str(found), "quic 0b02")
        if settings.key is not None:  # encrypted: the nonces differ, so do the IDs' octets
            self.assertGreater(len({d[1:3] for d, _ in routable}), 1)


#: The draft's test vectors (draft-ietf-quic-load-balancers-19, appendix B; the same in
#: QUICHE's load balancer tests): key, server ID, and per configuration (config
#: rotation, server ID length, nonce length) a connection ID.
VECTOR_KEY = bytes.fromhex("8f95f09245765f80256934e50c66207f")
VECTOR_SID = bytes.fromhex("ed793a51d49b8f5fab65ba04c3330a")
VECTORS = [
    (0, 3, 4, "0720b1d07b359d3c"),  # 8 octets: four passes, odd, server ID in the left half
    (1, 10, 5, "2fcc381bc74cb4fbad2823a3d1f8fed2"),  # the fourth pass needed
    (2, 8, 8, "504dd2d05a7b0de9b2b9907afb5ecf8cc3"),  # 16 octets: a single pass
    (0, 9, 9, "125779c9cc86beb3a3a4a3ca96fce4bfe0cdbc"),  # even
]
UNENCRYPTED_VECTORS = [(0, 3, 4, "07ed793a8049718a"), (1, 8, 5, "2ded793a51d49b8f5fee15da27c4")]
ENCRYPTED = attrs.evolve(SETTINGS, key=VECTOR_KEY)


class CipherTests(SynchronousTestCase):
    def test_draft_vectors(self) -> None:
        """Each of the draft's encrypted connection IDs gives its server ID, through the
        cipher and through the strategy (first octet, length, lookup)."""
        for rotation, sid_length, nonce_length, text in VECTORS:
            cid = bytes.fromhex(text)
            cipher = ServerIdCipher(VECTOR_KEY, sid_length, nonce_length)
            self.assertEqual(cipher.server_id(cid[1:]), VECTOR_SID[:sid_length], text)
            settings = QuicLbSettings(config_rotation=rotation, server_id_length=sid_length,
                                      nonce_length=nonce_length, key=VECTOR_KEY,
                                      server_ids={VECTOR_SID[:sid_length]: "srv1"})  # fmt: skip
            self.assertEqual(key_of(udp(short_header(cid)), settings),
                             server_id_key(VECTOR_SID[:sid_length]), text)  # fmt: skip
            # The same settings without the key read the ciphertext, not the server ID.
            clear = attrs.evolve(settings, key=None)
            self.assertIsNone(key_of(udp(short_header(cid)), clear), text)
        for rotation, sid_length, nonce_length, text in UNENCRYPTED_VECTORS:
            settings = QuicLbSettings(config_rotation=rotation, server_id_length=sid_length,
                                      nonce_length=nonce_length,
                                      server_ids={VECTOR_SID[:sid_length]: "srv1"})  # fmt: skip
            self.assertEqual(key_of(udp(short_header(bytes.fromhex(text))), settings),
                             server_id_key(VECTOR_SID[:sid_length]), text)  # fmt: skip

    def test_round_trip_every_length(self) -> None:
        """Every server ID and nonce length the draft allows: what a backend encrypts
        (`encode_cid`) the strategy reads back; the ciphertext is not the plaintext."""
        for sid_length in range(1, 16):
            for nonce_length in range(4, 20 - sid_length):
                sid = os.urandom(sid_length)
                settings = QuicLbSettings(server_id_length=sid_length, nonce_length=nonce_length,
                                          key=os.urandom(16), server_ids={sid: "srv1"})  # fmt: skip
                nonce = os.urandom(nonce_length)
                cid = encode_cid(settings, sid, nonce)
                self.assertEqual(len(cid), settings.cid_length)
                self.assertNotEqual(cid[1:], sid + nonce)
                self.assertEqual(key_of(udp(short_header(cid)), settings), server_id_key(sid))

    def test_bad_keys_refused(self) -> None:
        for key in (b"", bytes(15), bytes(17), bytes(32)):
            with self.assertRaises(ValueError) as caught:
                QuicLbSettings(key=key)
            self.assertIn("a key is 16 octets (AES-128)", str(caught.exception))
        self.assertNotIn("8f95", repr(ENCRYPTED))  # the key is never shown

    @settings(max_examples=300, deadline=None)
    @given(st.binary(max_size=40))
    def test_garbage_encrypted(self, payload: bytes) -> None:
        """Arbitrary payloads under a key: a key only for a configured server ID, never
        an exception."""
        key = key_of(udp(payload), ENCRYPTED)
        if key is not None:
            self.assertIn(key, {server_id_key(bytes((0x0B, i))) for i in (1, 2, 3)})


class BalancerTests(SynchronousTestCase):
    def cid(self, backend: str) -> bytes:
        return encode_cid(SETTINGS, bytes.fromhex("0b0" + backend[-1]))

    def test_moved_connection_follows_its_server_id(self) -> None:
        """The Initial is scheduled by its source; after a move, the server ID decides,
        not the scheduler, and the new address follows that backend."""
        b, clock = balancer(["quic", "src"])
        initial = to(b, udp(b"\xc0\0\0\0\1\x08" + os.urandom(8) + b"\0" * 1200))
        self.assertEqual(b.counters.misses["src"], 1)
        clock.advance(1)
        # Find an address the scheduler would put elsewhere.
        moved = next(a for a in (f"2001:db8:c1::{n:x}" for n in range(2, 500))
                     if backend_name(b.scheduler.choose(address_key(a), {})) != initial)
        self.assertEqual(to(b, udp(short_header(self.cid(initial)), source=moved)), initial)
        self.assertEqual(b.counters.hits["quic"], 1)
        # The new address now leads there too, for packets without the key.
        self.assertEqual(bound_to(b, moved), initial)
        self.assertEqual(to(b, udp(b"plain", source=moved, dport=80)), initial)
        # The server ID key itself is never in the table.
        self.assertEqual([k for k, _ in b.table if k.kind == "quic"], [])
        trace = b.trace(bytes(udp(short_header(self.cid(initial)), source=moved)))
        self.assertEqual((trace.strategy, str(trace.key), backend_name(trace.backend)),
                         ("quic", f"quic 0b0{initial[-1]}", initial))  # fmt: skip
        # With the source address alone, the same packet is scheduled by its address.
        src_only, _ = balancer(["src"])
        to(src_only, udp(b"\xc0\0\0\0\1\x08" + os.urandom(8) + b"\0" * 1200))
        self.assertNotEqual(to(src_only, udp(short_header(self.cid(initial)), source=moved)),
                            initial)  # fmt: skip

    def test_mobile_node_keeps_one_backend(self) -> None:
        """["hoa", "quic", "src"]: a bound home address wins over the server ID; a server
        ID wins for a terminal whose identities have no binding, and they follow it."""
        b, clock = balancer(["hoa", "quic", "src"])
        home, coa1, coa2 = "2001:db8:100::1001", "2001:db8:a1::1001", "2001:db8:a2::1001"

        def mobile(coa: str, quic: bytes) -> bytearray:
            return bytearray(bytes(IPv6(src=coa, dst=VIP) / IPv6ExtHdrDestOpt(
                options=[HAO(hoa=home)]) / UDP(sport=5, dport=443) / quic))  # fmt: skip

        first = to(b, mobile(coa1, b"\xc0\0\0\0\1\x08" + os.urandom(8) + b"\0" * 100))
        other = next(s.name for s in BACKENDS if s.name != first)
        # A (forged or stale) server ID of another backend does not split the terminal.
        self.assertEqual(to(b, mobile(coa2, short_header(self.cid(other)))), first)
        self.assertEqual(b.counters.hits["quic"], 0)
        # Another terminal, no binding yet: its server ID decides, its identities follow.
        other_home = "2001:db8:100::2002"
        pkt = bytearray(bytes(IPv6(src="2001:db8:a1::2002", dst=VIP) / IPv6ExtHdrDestOpt(
            options=[HAO(hoa=other_home)]) / UDP(sport=5, dport=443)
            / short_header(self.cid(other))))  # fmt: skip
        self.assertEqual(to(b, pkt), other)
        self.assertEqual(b.counters.hits["quic"], 1)
        binding = b.table.get(address_key(other_home))
        assert binding is not None
        self.assertEqual(binding.backend.name, other)
        self.assertEqual(binding.care_of, ipaddress.IPv6Address("2001:db8:a1::2002").packed)
        self.assertIs(b.table.get(address_key("2001:db8:a1::2002")), binding)
        clock.advance(1)
        self.assertEqual(to(b, mobile(coa2, b"plain")), first)

    def test_conflict_and_unusable_backend(self) -> None:
        """A server ID wins over a later identity's binding elsewhere (a counted conflict,
        the binding unchanged); a down backend's server ID is passed over."""
        b, _ = balancer(["quic", "src"], scheduler="round_robin")
        bound = to(b, udp(b"plain", dport=80))
        other = next(s.name for s in BACKENDS if s.name != bound)
        self.assertEqual(to(b, udp(short_header(self.cid(other)))), other)
        self.assertEqual(b.counters.conflicts["src"], 1)
        self.assertEqual(bound_to(b, CLIENT), bound)
        b.set_backend_up(other, False)
        self.assertEqual(to(b, udp(short_header(self.cid(other)))), bound)
        self.assertEqual(b.trace(bytes(udp(short_header(self.cid(other))))).strategy, "src")
        # Removed from the configuration: the same.
        b.set_backend_up(other, True)
        b.set_backends([s for s in BACKENDS if s.name != other])
        self.assertEqual(to(b, udp(short_header(self.cid(other)))), bound)

    def test_chain_without_named_strategies_unchanged(self) -> None:
        """The named walk is used only when the chain holds such a strategy."""
        b, _ = balancer(["hoa", "src"])
        self.assertEqual(b._named, {})
        b.chain = KeyChain.from_names(["quic", "src"], quic=SETTINGS)
        self.assertEqual(len(b._named), 1)

    def test_forged_server_id(self) -> None:
        """A client claiming another backend's server ID steers only its own packets:
        a victim's binding, and where the victim's packets go, are unchanged."""
        b, _ = balancer(["quic", "src"], scheduler="round_robin")
        victim, forger = "2001:db8:c1::10", "2001:db8:c1::66"
        victim_backend = to(b, udp(b"plain", source=victim, dport=80))
        other = next(s.name for s in BACKENDS if s.name != victim_backend)
        before = {str(k): v.backend.name for k, v in b.table}
        # The forger claims backend `other`: only his own, unbound address follows it.
        self.assertEqual(to(b, udp(short_header(self.cid(other)), source=forger)), other)
        after = {str(k): v.backend.name for k, v in b.table}
        self.assertEqual({k: v for k, v in after.items() if k in before}, before)
        self.assertEqual(set(after) - set(before), {f"addr {forger}"})
        self.assertEqual(to(b, udp(b"plain", source=victim, dport=80)), victim_backend)
        # The victim's own QUIC packets still go where their server ID says.
        self.assertEqual(to(b, udp(short_header(self.cid(victim_backend)), source=victim)),
                         victim_backend)  # fmt: skip
        self.assertEqual([k for k, _ in b.table if k.kind == "quic"], [])
