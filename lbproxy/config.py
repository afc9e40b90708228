"""The balancer's configuration: a TOML file read into frozen values.

Why a module of its own: every other part takes plain values, so the only
place that knows about files, keys and defaults is here, and every mistake an
operator can make is reported in one shape -- ``file: key: reason`` -- before
anything starts.  ``etc/lbproxy.toml`` is the commented example; the reference
is ``docs/configuration.md``.

Key strategies and schedulers are whatever their registries hold
(``lbproxy.core.keys.STRATEGY_REGISTRY``, ``lbproxy.core.selection.SCHEDULER_REGISTRY``,
including third-party entry points), so the names are checked against those, and the
chain and scheduler are built once here so that a plugin that fails to build is a
configuration error too, not a traceback at start-up.

Beyond types and ranges, what would load and then misbehave is refused here too: a
virtual address that is multicast, unspecified, link-local, loopback or IPv4-mapped; a
backend address that is one of those or a virtual address; two backends at one address;
every backend at weight 0; a health check without a port; a boolean where a port is
expected; two peers of one name; a relative or too long control socket path; endpoint
strings Twisted cannot parse.  What depends on the host (interfaces, privileges, files,
directories) is checked at start by ``lbproxy.preflight``.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import attrs

from lbproxy.core.correspondent import MAX_RR_BINDING_LIFETIME
from lbproxy.core.correspondent import MODES as CORRESPONDENT_MODES
from lbproxy.core.keys import STRATEGY_REGISTRY, KeyChain, declared_options
from lbproxy.core.quiclb import DEFAULT_PORTS as QUIC_PORTS
from lbproxy.core.quiclb import QuicLbSettings
from lbproxy.core.selection import SCHEDULER_REGISTRY, scheduler_from_name
from lbproxy.ops.persistence import DEFAULT_MAX_BYTES, max_bytes_for
from lbproxy.tomlconfig import (
    NAME,
    ConfigError,
    Section,
    checked,
    parse_toml,
    read_toml,
    show,
)

__all__ = [
    "BackendConfig",
    "Config",
    "ConfigError",
    "FleetConfig",
    "HealthConfig",
    "NotifyConfig",
    "PeerConfig",
    "load_config",
    "parse_config",
]

MODES = ("translate", "transparent")
DEFAULT_KEY_CHAIN = ("hoa", "iid", "spi", "ike", "src")
DEFAULT_SCHEDULER = "maglev"
DEAD_BACKEND_POLICIES = ("reassign", "keep")
#: ``[notify]``: the longest report interval (s) and the names of terminals that dial in.
MAX_INTERVAL = 86_400
DIAL_IN_PREFIX = "terminal:"
#: ``[balancer] offload``: the XDP executor (lbproxy.io.xdp) when this host can run it,
#: always (refuse to start otherwise), or never.
OFFLOADS = ("auto", "xdp", "none")
LOG_FORMATS = ("text", "json")


@attrs.frozen
class BackendConfig:
    """One backend server (or home agent, claim 11) behind the virtual addresses."""

    name: str
    address: ipaddress.IPv6Address
    weight: int = 1
    health: str = "none"  # none | tcp | http
    health_port: int = 0
    health_path: str = "/"
    #: Its QUIC-LB server ID (``[[backend]] quic_server_id``; docs/quic.md), or None.
    quic_server_id: bytes | None = None


@attrs.frozen
class PeerConfig:
    """A notification peer: a home agent (claim 5) or a terminal's own agent (claim 6)."""

    name: str
    kind: str  # "homeagent" | "terminal"
    endpoint: str  # Twisted client endpoint string, e.g. "tcp:host=2001:db8::1:port=7440"
    identity: str  # DNS-ID the peer's certificate must carry
    prefixes: tuple[ipaddress.IPv6Network, ...] = ()  # home prefixes it may speak for
    home: ipaddress.IPv6Address | None = None  # a terminal's own home address
    interval: int | None = None  # periodic reports every N s (None: [notify] interval)


@attrs.frozen
class NotifyConfig:
    """TLS material and limits for the care-of address notification clients."""

    enabled: bool = False
    ca: str = ""
    certificate: str = ""
    key: str = ""
    max_subscriptions: int = 10000
    peers: tuple[PeerConfig, ...] = ()
    #: Home and care-of addresses never believed; the only care-of prefixes ([] = any).
    forbidden_prefixes: tuple[ipaddress.IPv6Network, ...] = ()
    care_of_prefixes: tuple[ipaddress.IPv6Network, ...] = ()
    allow_unique_local: bool = False
    #: Deadlines (s) and the bound on calls in flight per peer (lbproxy.notify.session).
    call_timeout: float = 10.0
    handshake_timeout: float = 10.0
    max_outstanding: int = 512
    #: Periodic reports asked of every peer (s, 0 = on change only); a peer may override.
    interval: int = 0
    #: How long a subscription outlives everything its terminal had (s).
    idle_lifetime: float = 600.0
    #: Where terminal agents dial in (a Twisted server endpoint; "" = no dial-in).
    listen: str = ""
    max_dial_in: int = 10000


@attrs.frozen
class HealthConfig:
    """Health-check timing shared by every backend that asks for a check."""

    interval: float = 2.0
    timeout: float = 1.0
    rise: int = 2
    fall: int = 3
    dead_backend: str = "reassign"


@attrs.frozen
class FleetConfig:
    """``[fleet]``: several balancers sharing, through a store (Redis or Valkey), the
    bindings that differ from Maglev's answer (docs/fleet.md)."""

    enabled: bool = False
    #: Twisted client endpoint of the store (``unix:path=...`` or ``tcp:host=...:port=``).
    store: str = "tcp:host=127.0.0.1:port=6379"
    #: Prefix of the fleet's keys and channel: one fleet per prefix in one store.
    prefix: str = "lbproxy:"
    #: This balancer's name in the fleet (unique in it; "" = the host name).
    name: str = ""
    #: Changes queued while the store is away, at most (then counted and looked up again).
    queue_limit: int = 100_000
    #: Seconds without an answer from the store before the connection is given up.
    timeout: float = 2.0
    #: Records of the fleet the local replica holds, at most.
    max_keys: int = 1_000_000
    #: A file holding the store's password ("" = none).
    password_file: str = ""


@attrs.frozen
class CorrespondentConfig:
    """``[correspondent]``: the balancer as the terminals' correspondent node for the
    virtual addresses (RFC 6275 return routability; docs/correspondent.md)."""

    #: off | lenient | strict (`lbproxy.core.correspondent.MODES`).
    mode: str = "off"
    #: The longest binding a Binding Update gets (s; RFC 6275 MAX_RR_BINDING_LIFETIME).
    max_lifetime: int = int(MAX_RR_BINDING_LIFETIME)
    #: Binding Errors sent per second at most.
    binding_error_rate: float = 10.0


@attrs.frozen
class Config:
    """The whole configuration of one balancer process."""

    path: str
    virtual_addresses: tuple[ipaddress.IPv6Address, ...]
    ports: tuple[int, ...]
    client_interface: str
    server_interface: str
    backends: tuple[BackendConfig, ...]
    mode: str = "translate"
    key_chain: tuple[str, ...] = DEFAULT_KEY_CHAIN
    any_interface_id: bool = False
    scheduler: str = DEFAULT_SCHEDULER
    lifetime: float = 300.0
    max_entries: int = 1_000_000
    sweep_interval: float = 1.0
    batch: int = 256
    link_send: bool = True
    #: ``[balancer] offload`` (`OFFLOADS`; docs/xdp.md).
    offload: str = "auto"
    #: ``[correspondent]`` (docs/correspondent.md).
    correspondent: CorrespondentConfig = CorrespondentConfig()
    health: HealthConfig = HealthConfig()
    notify: NotifyConfig = NotifyConfig()
    fleet: FleetConfig = FleetConfig()
    manhole_endpoint: str = ""
    manhole_authorized_keys: str = ""
    manhole_host_key: str = ""
    control_socket: str = ""
    #: ``[control] journeys``: terminals whose journeys are kept (0: none; docs/journey.md).
    journeys: int = 1024
    metrics_endpoint: str = ""
    persistence_path: str = ""
    persistence_interval: float = 60.0
    #: Saved tables larger than this are neither read nor written (lbproxy.ops.persistence).
    persistence_max_bytes: int = DEFAULT_MAX_BYTES
    #: ``[logging] format``: twistd's text lines, or one JSON object per line.
    logging_format: str = "text"
    #: ``[quic]`` and the backends' server IDs: the ``quic`` strategy's settings.
    quic: QuicLbSettings = attrs.field(factory=QuicLbSettings)

    def key_chain_options(self) -> dict[str, Any]:
        """The options for ``KeyChain.from_names(self.key_chain, **options)``: each
        strategy option this file sets (``any_interface_id``) that a strategy in the
        chain declares."""
        return _chain_options(self.key_chain,
                              _strategy_settings(self.any_interface_id, self.quic))  # fmt: skip


def _strategy_settings(any_interface_id: bool, quic: QuicLbSettings) -> dict[str, Any]:
    """Every strategy option the file offers, for the strategies that declare it."""
    return {"any_interface_id": any_interface_id, "quic": quic}


def _chain_options(chain: Sequence[str], settings: Mapping[str, Any]) -> dict[str, Any]:
    wanted = declared_options(chain)
    return {k: v for k, v in settings.items() if k in wanted}


def _key_chain(bal: Section, settings: Mapping[str, Any]) -> tuple[str, ...]:
    """``balancer.key_chain``: registered, distinct strategy names that build a chain."""
    chain = tuple(bal.get("key_chain", list, list(DEFAULT_KEY_CHAIN)))
    for name in chain:
        if not isinstance(name, str):
            raise bal.fail("key_chain", f"expected a list of strategy names, got {name!r}")
        if name not in STRATEGY_REGISTRY:
            raise bal.fail("key_chain", STRATEGY_REGISTRY.unknown(name))
    if not chain or len(set(chain)) != len(chain):
        raise bal.fail("key_chain", "must name each strategy at most once, and at least one")
    try:
        KeyChain.from_names(chain, **_chain_options(chain, settings))
    except ValueError as e:
        raise bal.fail("key_chain", str(e)) from None
    return chain


def _scheduler(bal: Section) -> str:
    """``balancer.scheduler``: a registered scheduler name that builds a scheduler."""
    name = bal.get("scheduler", str, DEFAULT_SCHEDULER)
    if name not in SCHEDULER_REGISTRY:
        raise bal.fail("scheduler", SCHEDULER_REGISTRY.unknown(name))
    try:
        scheduler_from_name(name)
    except ValueError as e:
        raise bal.fail("scheduler", str(e)) from None
    return name


def _backend(s: Section) -> BackendConfig:
    s = checked(s, ("name", "address", "weight", "health", "health_port", "health_path",
                    "quic_server_id"))  # fmt: skip
    health = s.choice("health", "none", ("none", "tcp", "http"))
    port = s.integer("health_port", 0, 0, 65535)
    if health != "none" and port == 0:
        raise s.fail("health_port", f"health = {health!r} needs the port to check (1..65535)")
    path = s.get("health_path", str, "/")
    if not path.startswith("/") or any(c.isspace() or not c.isprintable() for c in path):
        raise s.fail("health_path", f"{path[:40]!r} is not a URL path (it starts with '/' "
                                    "and has no spaces or control characters)")  # fmt: skip
    return BackendConfig(
        name=s.text("name", pattern=NAME, what="a backend name (letters, digits, '_.:-', "
                                                "up to 63)"),
        address=s.host_address("address", s.get("address", str)),
        weight=s.integer("weight", 1, 0, 1000),
        health=health,
        health_port=port,
        health_path=path,
        quic_server_id=_server_id(s) if "quic_server_id" in s.data else None,
    )


def _server_id(s: Section) -> bytes:
    """``[[backend]] quic_server_id``: hex digits, 1 to 15 octets."""
    text = s.get("quic_server_id", str)
    try:
        sid = bytes.fromhex(text)
    except ValueError:
        raise s.fail("quic_server_id", f"{show(text)} is not hex digits (e.g. \"0a0b\": two "
                                       "per octet)") from None  # fmt: skip
    if not 1 <= len(sid) <= 15:
        raise s.fail("quic_server_id", f"{show(text)} is {len(sid)} octets; a server ID is "
                                       "1 to 15")  # fmt: skip
    return sid


def _quic(top: Section, backends: Sequence[BackendConfig]) -> QuicLbSettings:
    """``[quic]`` and the backends' ``quic_server_id`` (docs/quic.md)."""
    s = checked(top.table("quic"), ("ports", "config_rotation", "server_id_length",
                                    "nonce_length", "length_self_description", "key"))
    ports = tuple(s.get("ports", list, list(QUIC_PORTS)))
    for p in ports:
        if not isinstance(p, int) or isinstance(p, bool) or not 0 < p < 65536:
            raise s.fail("ports", f"{show(p)} is not a port number (1..65535)")
    if not ports:
        raise s.fail("ports", "at least one UDP port carries QUIC")
    s.distinct("ports", ports)
    sid_length = s.integer("server_id_length", 2, 1, 15)
    nonce_length = s.integer("nonce_length", 5, 4, 18)
    if sid_length + nonce_length > 19:
        raise s.fail("nonce_length", f"server_id_length + nonce_length = "
                                     f"{sid_length + nonce_length}; with the first octet a "
                                     "connection ID is at most 20 octets: at most 19")  # fmt: skip
    rotation = s.integer("config_rotation", 0, 0, 7)
    if rotation == 7:
        raise s.fail("config_rotation", "7 marks unroutable connection IDs in QUIC-LB; "
                                        "use 0 to 6")  # fmt: skip
    seen: dict[bytes, str] = {}
    for i, b in enumerate(backends):
        sid = b.quic_server_id
        if sid is None:
            continue
        if len(sid) != sid_length:
            raise top.fail(f"backend[{i}].quic_server_id", f"{sid.hex()!r} is {len(sid)} "
                           f"octets, not quic.server_id_length = {sid_length}")  # fmt: skip
        if sid in seen:
            raise top.fail(f"backend[{i}].quic_server_id", f"{sid.hex()!r} is also the "
                           f"server ID of backend {seen[sid]!r}")  # fmt: skip
        seen[sid] = b.name
    key_text = s.get("key", str, "")
    key = None
    if key_text:
        try:
            key = bytes.fromhex(key_text)
        except ValueError:
            raise s.fail("key", "not hex digits (32 of them: an AES-128 key)") from None
        if len(key) != 16:
            raise s.fail("key", f"{len(key)} octets; an AES-128 key is 16 (32 hex digits)")
    return QuicLbSettings(
        key=key,
        config_rotation=rotation,
        server_id_length=sid_length,
        nonce_length=nonce_length,
        length_self_description=s.get("length_self_description", bool, True),
        ports=frozenset(ports),
        server_ids=seen,
    )


def _prefix_list(s: Section, name: str) -> tuple[ipaddress.IPv6Network, ...]:
    """``[notify]`` prefixes: a list of distinct IPv6 prefixes ([] when absent)."""
    values = s.get(name, list, [])
    found = tuple(s.network(name, v) for v in values)
    s.distinct(name, [str(n) for n in found])
    return found


def _peer(s: Section) -> PeerConfig:
    s = checked(s, ("name", "kind", "endpoint", "identity", "prefixes", "home", "interval"))
    name = s.text("name", pattern=NAME, what="a peer name (letters, digits, '_.:-', up to 63)")
    if name.startswith(DIAL_IN_PREFIX):
        raise s.fail("name", f"{DIAL_IN_PREFIX!r} names terminals that dial in; choose "
                             "another name")  # fmt: skip
    kind = s.choice("kind", "homeagent", ("homeagent", "terminal"))
    prefixes = s.prefixes("prefixes", required=False)
    home = s.host_address("home", s.data["home"]) if "home" in s.data else None
    if kind == "homeagent" and not prefixes:
        raise s.fail("prefixes", "a home agent needs at least one home prefix it may speak for")
    if kind == "homeagent" and home is not None:
        raise s.fail("home", "only for kind = 'terminal' (a home agent speaks for prefixes)")
    if kind == "terminal" and home is None:
        raise s.fail("home", "a terminal peer needs its home address")
    if kind == "terminal" and prefixes:
        raise s.fail("prefixes", "only for kind = 'homeagent' (a terminal speaks for its home "
                                 "address)")  # fmt: skip
    identity = s.get("identity", str)
    if not identity or any(c.isspace() or not c.isprintable() for c in identity):
        raise s.fail("identity", f"{identity[:40]!r} is not a DNS name")
    return PeerConfig(
        name=name,
        kind=kind,
        endpoint=s.endpoint("endpoint", "client"),
        identity=identity,
        prefixes=prefixes,
        home=home,
        interval=s.integer("interval", 0, 0, MAX_INTERVAL) if "interval" in s.data else None,
    )


def _fleet(top: Section) -> FleetConfig:
    """``[fleet]`` (docs/fleet.md)."""
    from lbproxy.fleet.codec import PREFIX

    s = checked(top.table("fleet"), ("enabled", "store", "prefix", "name", "queue_limit",
                                     "timeout", "max_keys", "password_file"))
    name = s.get("name", str, "")
    if name and NAME.fullmatch(name) is None:
        raise s.fail("name", f"{show(name)} is not a balancer name (letters, digits, '_.:-', "
                             "up to 63)")  # fmt: skip
    return FleetConfig(
        enabled=s.get("enabled", bool, False),
        store=s.endpoint("store", "client", "tcp:host=127.0.0.1:port=6379"),
        prefix=s.text("prefix", "lbproxy:", pattern=PREFIX,
                      what="a key prefix (1 to 64 of letters, digits, '_.:-')"),
        name=name,
        queue_limit=s.integer("queue_limit", 100_000, 1, 10_000_000),
        timeout=s.number("timeout", 2.0, 0.05, 60.0),
        max_keys=s.integer("max_keys", 1_000_000, 1, 100_000_000),
        password_file=s.filename("password_file", ""),
    )


def _correspondent(top: Section, mode: str) -> CorrespondentConfig:
    """``[correspondent]`` (docs/correspondent.md); not with the transparent mode."""
    s = checked(top.table("correspondent"), ("mode", "max_lifetime", "binding_error_rate"))
    chosen = s.choice("mode", "off", CORRESPONDENT_MODES)
    if chosen != "off" and mode != "translate":
        raise s.fail("mode", f"{chosen!r} needs balancer.mode = \"translate\" (in transparent "
                             "mode the backends receive the Home Address Option and must be "
                             "the correspondent node themselves)")  # fmt: skip
    return CorrespondentConfig(
        mode=chosen,
        max_lifetime=s.integer("max_lifetime", int(MAX_RR_BINDING_LIFETIME), 4,
                               int(MAX_RR_BINDING_LIFETIME)),
        binding_error_rate=s.number("binding_error_rate", 10.0, 0.0, 100_000.0),
    )


def parse_config(text: str, path: str = "<config>") -> Config:
    """Parse configuration text; raise `ConfigError` naming file, key and reason."""
    return parse_data(parse_toml(text, path), path)


def parse_data(data: dict[str, Any], path: str) -> Config:
    """The configuration from parsed TOML data."""
    top = Section(
        path,
        "",
        data,
        (
            "balancer", "virtual", "interfaces", "backend", "health", "notify", "correspondent",
            "manhole", "control", "metrics", "persistence", "logging", "fleet", "quic",
        ),
    )
    bal = checked(
        top.table("balancer"),
        ("mode", "key_chain", "any_interface_id", "scheduler", "lifetime", "max_entries",
         "sweep_interval", "batch", "link_send", "offload"),
    )
    any_interface_id = bal.get("any_interface_id", bool, False)
    chain = _key_chain(bal, _strategy_settings(any_interface_id, QuicLbSettings()))
    scheduler = _scheduler(bal)

    virt = checked(top.table("virtual"), ("addresses", "ports"))
    vips = tuple(virt.host_address("addresses", a) for a in virt.get("addresses", list))
    if not vips:
        raise virt.fail("addresses", "at least one virtual address is required")
    virt.distinct("addresses", vips)
    ports = tuple(virt.get("ports", list, []))
    for p in ports:
        if not isinstance(p, int) or isinstance(p, bool) or not 0 < p < 65536:
            raise virt.fail("ports", f"{show(p)} is not a port number (1..65535)")
    virt.distinct("ports", ports)

    ifaces = checked(top.table("interfaces"), ("client", "server"))
    client_interface = ifaces.interface("client")
    server_interface = ifaces.interface("server")
    backends = tuple(_backend(b) for b in top.tables("backend"))
    if not backends:
        raise top.fail("backend", "at least one [[backend]] is required")
    names = [b.name for b in backends]
    for b in backends:
        if names.count(b.name) > 1:
            raise top.fail("backend", f"backend name {b.name!r} is used twice")
    _check_backend_addresses(top, backends, vips)
    quic = _quic(top, backends)
    if "quic" in chain and not quic.server_ids:
        raise bal.fail("key_chain", "'quic' needs a quic_server_id on at least one "
                                    "[[backend]] (docs/quic.md)")  # fmt: skip

    health_s = checked(
        top.table("health"), ("interval", "timeout", "rise", "fall", "dead_backend")
    )
    health = HealthConfig(
        interval=health_s.number("interval", 2.0, 0.05, 3600),
        timeout=health_s.number("timeout", 1.0, 0.01, 600),
        rise=health_s.integer("rise", 2, 1, 100),
        fall=health_s.integer("fall", 3, 1, 100),
        dead_backend=health_s.choice("dead_backend", "reassign", DEAD_BACKEND_POLICIES),
    )

    notify_s = checked(
        top.table("notify"),
        ("enabled", "ca", "certificate", "key", "max_subscriptions", "peer",
         "forbidden_prefixes", "care_of_prefixes", "allow_unique_local", "call_timeout",
         "handshake_timeout", "max_outstanding", "interval", "idle_lifetime", "listen",
         "max_dial_in"),
    )
    notify = NotifyConfig(
        enabled=notify_s.get("enabled", bool, False),
        ca=notify_s.filename("ca", ""),
        certificate=notify_s.filename("certificate", ""),
        key=notify_s.filename("key", ""),
        max_subscriptions=notify_s.integer("max_subscriptions", 10000, 1, 10_000_000),
        peers=tuple(_peer(p) for p in notify_s.tables("peer")),
        forbidden_prefixes=_prefix_list(notify_s, "forbidden_prefixes"),
        care_of_prefixes=_prefix_list(notify_s, "care_of_prefixes"),
        allow_unique_local=notify_s.get("allow_unique_local", bool, False),
        call_timeout=notify_s.number("call_timeout", 10.0, 0.1, 3600.0),
        handshake_timeout=notify_s.number("handshake_timeout", 10.0, 0.1, 3600.0),
        max_outstanding=notify_s.integer("max_outstanding", 512, 1, 65536),
        interval=notify_s.integer("interval", 0, 0, MAX_INTERVAL),
        idle_lifetime=notify_s.number("idle_lifetime", 600.0, 1.0, 604800.0),
        listen=notify_s.endpoint("listen", "server", ""),
        max_dial_in=notify_s.integer("max_dial_in", 10000, 1, 10_000_000),
    )
    peer_names = [p.name for p in notify.peers]
    for i, peer in enumerate(notify.peers):
        if peer_names.index(peer.name) != i:
            raise notify_s.fail(f"peer[{i}].name", f"peer name {peer.name!r} is used twice")
    if notify.enabled:
        for name in ("ca", "certificate", "key"):
            if not getattr(notify, name):
                raise notify_s.fail(name, "required when notifications are enabled")

    manhole = checked(top.table("manhole"), ("endpoint", "authorized_keys", "host_key"))
    control = checked(top.table("control"), ("socket", "journeys"))
    metrics = checked(top.table("metrics"), ("endpoint",))
    persist = checked(top.table("persistence"), ("path", "interval", "max_bytes"))
    logging = checked(top.table("logging"), ("format",))
    manhole_endpoint = manhole.endpoint("endpoint", "server", "")
    if manhole_endpoint and not manhole.get("authorized_keys", str, ""):
        raise manhole.fail("authorized_keys", "required when the manhole is enabled (key-only)")
    if manhole_endpoint and not manhole.get("host_key", str, ""):
        raise manhole.fail("host_key", "required when the manhole is enabled")
    max_entries = bal.integer("max_entries", 1_000_000, 1, 100_000_000)
    least = max_bytes_for(max_entries)
    max_bytes = persist.integer("max_bytes", max(least, DEFAULT_MAX_BYTES), 1, 1 << 40)
    if max_bytes < least:
        raise persist.fail("max_bytes", f"{max_bytes} bytes cannot hold a full table of "
                                        f"balancer.max_entries = {max_entries}; at least "
                                        f"{least}")  # fmt: skip

    return Config(
        path=path,
        virtual_addresses=vips,
        ports=ports,
        client_interface=client_interface,
        server_interface=server_interface,
        backends=backends,
        mode=bal.choice("mode", "translate", MODES),
        key_chain=chain,
        any_interface_id=any_interface_id,
        scheduler=scheduler,
        lifetime=bal.number("lifetime", 300.0, 1.0, 86400.0 * 7),
        max_entries=max_entries,
        sweep_interval=bal.number("sweep_interval", 1.0, 0.01, 60.0),
        batch=bal.integer("batch", 256, 1, 65536),
        link_send=bal.get("link_send", bool, True),
        offload=bal.choice("offload", "auto", OFFLOADS),
        correspondent=_correspondent(top, bal.choice("mode", "translate", MODES)),
        health=health,
        notify=notify,
        fleet=_fleet(top),
        manhole_endpoint=manhole_endpoint,
        manhole_authorized_keys=manhole.filename("authorized_keys", ""),
        manhole_host_key=manhole.filename("host_key", ""),
        control_socket=control.filename("socket", "", absolute=True, unix_socket=True),
        journeys=control.integer("journeys", 1024, 0, 1_000_000),
        metrics_endpoint=metrics.endpoint("endpoint", "server", ""),
        persistence_path=persist.filename("path", ""),
        persistence_interval=persist.number("interval", 60.0, 1.0, 86400.0),
        persistence_max_bytes=max_bytes,
        logging_format=logging.choice("format", "text", LOG_FORMATS),
        quic=quic,
    )


def _check_backend_addresses(
    top: Section, backends: Sequence[BackendConfig], vips: Sequence[ipaddress.IPv6Address]
) -> None:
    """One backend per address, none at a virtual address, not all drained."""
    seen: dict[ipaddress.IPv6Address, str] = {}
    for i, b in enumerate(backends):
        if b.address in vips:
            raise top.fail(f"backend[{i}].address", f"{b.address} is a virtual address; a "
                                                    "backend must be another host")  # fmt: skip
        if b.address in seen:
            raise top.fail(f"backend[{i}].address", f"{b.address} is also the address of "
                                                    f"backend {seen[b.address]!r}")  # fmt: skip
        seen[b.address] = b.name
    if all(b.weight == 0 for b in backends):
        raise top.fail("backend", "every backend has weight 0: no terminal could be placed "
                                  "(0 drains one backend; keep at least one above 0)")  # fmt: skip


def load_config(path: str | Path) -> Config:
    """Read and parse a configuration file; unreadable files are a `ConfigError` too."""
    name, data = read_toml(path)
    return parse_data(data, name)
