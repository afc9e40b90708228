"""The balancer's notification service: whom to ask (``terminal_seen``), how long to keep
asking (the subscription lifecycle), terminals that dial in, and the operator's view.

**Whom to ask.**  On a terminal's first packet the balancer asks to be told when its
care-of address changes (claims 5, 6).  With a home address (from a Home Address option) the
peer is the terminal's own agent if one is configured or dialled in for that home address
(claim 6), else the home agent whose home prefix contains it (claim 5).  With only a care-of
address (key = source address, the patent's second embodiment) there is no prefix to go by:
if a subscription already follows that care-of address nothing new is asked; otherwise
every configured home agent and terminal agent is asked (those without a binding for it
answer UNKNOWN_BINDING and that subscription is dropped).  The bounded
:class:`~lbproxy.notify.subscriptions.Subscriptions` registry decides whether a new
subscription may open at all; the :class:`~lbproxy.notify.addresses.AddressRules` the gate
applies to what peers say are built here, and an address they would refuse is not
subscribed to at all.

**A lifecycle that cannot lapse.**  A subscription lives as long as its terminal has
anything the balancer keeps for it -- a live table binding under its home or care-of
addresses (traffic refreshes those), a confirmed return path, a binding the peer reported
that has not ended, a dial-in connection -- and an idle lifetime after that.  The sweep
looks one sweep interval ahead and renews every subscription whose terminal is still alive
*before* it expires (``ITerminalLiveness``, which the balancer's ``TableListener``
provides); it ends (and unsubscribes) only those with nothing left.  Re-registrations from
the same care-of address reach the balancer (the agents pass them on) and renew the binding's
lifetime end to end.  Subscriptions are sent again after every reconnection, restored from
the saved table after a restart (``saved_subscriptions`` / ``restore_subscription``, called
by ``lbproxy.ops.persistence``), and a snapshot after each (re)connection reconciles what
was missed.  A subscription that ended and whose terminal is seen again within the idle
lifetime is counted as *lapsed* (``Subscriptions.lapsed``): the number the lifecycle keeps
at zero.

**Terminals dial in** (``listen``): a terminal agent on a mobile network cannot be
dialled, so the balancer listens for them (mutual TLS, :class:`DialInServer`), names each by
the one home address its certificate carries as an IP subjectAltName, and entitles it to that
home address only -- no per-terminal configuration.  It is subscribed to at once (its agent
answers with its current care-of address).  Home agents stay configured peers the balancer
dials.

**Periodic reports** (claims 12/13): each peer's ``interval`` (the ``[notify]`` default,
or the peer's own) is asked for in every Subscribe; the agent then sends BindingSnapshot
every ``interval`` seconds.  :meth:`Notifier.report` is what ``lbproxyctl notify`` shows.
"""

from __future__ import annotations

import ipaddress
from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Any, cast

from twisted.application.internet import StreamServerEndpointService
from twisted.application.service import MultiService, Service
from twisted.internet.defer import Deferred, maybeDeferred
from twisted.internet.interfaces import (
    IReactorTime,
    IStreamClientEndpoint,
    IStreamServerEndpoint,
)
from twisted.internet.protocol import Factory
from twisted.internet.task import LoopingCall
from twisted.logger import Logger
from twisted.python.failure import Failure

from lbproxy.notify.addresses import AddressRules, LocalAddresses
from lbproxy.notify.client import (
    DIAL_IN_PREFIX,
    BalancerProtocol,
    DialInPeer,
    NotificationClient,
    Peer,
    PeerLink,
)
from lbproxy.notify.gate import Gate
from lbproxy.notify.listener import IBindingListener, ITerminalLiveness
from lbproxy.notify.policy import (
    PrefixEntitlement,
    Refusal,
    RefusalCounters,
    valid_seq,
)
from lbproxy.notify.session import (
    DEFAULT_CALL_TIMEOUT,
    DEFAULT_HANDSHAKE_TIMEOUT,
    DEFAULT_MAX_OUTSTANDING,
)
from lbproxy.notify.subscriptions import KINDS, Subscription, Subscriptions
from lbproxy.notify.tls import (
    CLIENT_AUTH,
    Credentials,
    PeerRefused,
    TlsMaterial,
    check_terminal_certificate,
    dial_in_factory,
    peer_verdict,
    untrusted,
)

log = Logger()

#: Optional ``[notify]`` keys read by :meth:`Notifier.from_config` when the configuration
#: has them: key -> constructor parameter.
CONFIG_KEYS = {
    "forbidden_prefixes": "forbidden",
    "care_of_prefixes": "care_of_prefixes",
    "allow_unique_local": "allow_unique_local",
    "call_timeout": "call_timeout",
    "handshake_timeout": "handshake_timeout",
    "max_outstanding": "max_outstanding",
    "interval": "interval",
    "idle_lifetime": "idle_lifetime",
    "max_dial_in": "max_dial_in",
}

#: What the lifecycle counts (``Notifier.lifecycle``).
LIFECYCLE = ("opened", "renewed", "ended", "lapsed", "restored", "resubscribed", "dialled_in",
             "evicted", "dropped")
_COUNTED = ("opened", "renewed", "ended", "restored", "dialled_in", "evicted", "dropped")
#: What reloads of ``[notify]`` count (``Notifier.reloads``).
RELOADS = ("peers_added", "peers_removed", "peers_changed", "material_rotated",
           "closed_untrusted")


def _text(address: bytes | None) -> str | None:
    return None if address is None else str(ipaddress.IPv6Address(address))


class Notifier(MultiService):
    """All notification peers of one balancer, the registry, the gate, the lifecycle."""

    def __init__(
        self,
        peers: Sequence[tuple[Peer, IStreamClientEndpoint]],
        material: TlsMaterial,
        listener: IBindingListener,
        clock: IReactorTime,
        max_subscriptions: int = 10_000,
        idle_lifetime: float = 600.0,
        interval: int = 0,
        sweep_interval: float | None = None,
        initial_delay: float = 0.1,
        max_delay: float = 30.0,
        jitter: Callable[[], float] | None = None,
        local: Callable[[], LocalAddresses] | None = None,
        forbidden: Sequence[Any] = (),
        care_of_prefixes: Sequence[Any] = (),
        allow_unique_local: bool = False,
        call_timeout: float = DEFAULT_CALL_TIMEOUT,
        handshake_timeout: float = DEFAULT_HANDSHAKE_TIMEOUT,
        max_outstanding: int = DEFAULT_MAX_OUTSTANDING,
        liveness: ITerminalLiveness | None = None,
        listen: IStreamServerEndpoint | None = None,
        max_dial_in: int | None = None,
        terminals: Callable[[], Iterable[tuple[bytes, bool]]] | None = None,
    ) -> None:
        super().__init__()
        self.clock = clock
        #: The TLS material in force, shared by every connection maker (a reload rotates it).
        self.credentials = Credentials(material)
        #: The terminals the balancer holds bindings for, as (address, is it a home
        #: address): a peer added by a reload is asked about those it may speak for.
        self.terminals = terminals
        self._backoff = (initial_delay, max_delay, jitter)
        self.counters = RefusalCounters()
        self.subscriptions = Subscriptions(max_subscriptions, idle_lifetime)
        self.subscriptions.evicted = self._evicted
        self.addresses = AddressRules(local, forbidden, care_of_prefixes, allow_unique_local)
        self.gate = Gate(self.subscriptions, listener, clock, self.counters, self.addresses)
        if liveness is None and ITerminalLiveness.providedBy(listener):
            liveness = cast(ITerminalLiveness, listener)
        self.liveness = liveness
        self.interval = interval
        self.call_timeout = call_timeout
        self.handshake_timeout = handshake_timeout
        self.max_outstanding = max_outstanding
        self.lifecycle: Counter[str] = Counter(dict.fromkeys(_COUNTED, 0))
        #: What reloads changed (:data:`RELOADS`).
        self.reloads: Counter[str] = Counter(dict.fromkeys(RELOADS, 0))
        self.clients: dict[str, PeerLink] = {}
        self._terminals: dict[bytes, PeerLink] = {}
        self._home_agents: list[tuple[PeerLink, PrefixEntitlement]] = []
        self._dial_in: dict[str, DialInPeer] = {}
        self.max_dial_in = max_subscriptions if max_dial_in is None else max_dial_in
        for peer, endpoint in peers:
            self._add_client(peer, endpoint)
        self.dial_in_server: DialInServer | None = None
        if listen is not None:
            self.dial_in_server = DialInServer(self, listen, self.credentials)
            self.dial_in_server.setServiceParent(self)
        self._sweeper = LoopingCall(self.sweep)
        self._sweeper.clock = clock
        # Renewal looks one sweep ahead, so a sweep a few times per idle lifetime keeps
        # every live subscription from ever reaching its expiry.
        self.sweep_interval = (
            min(5.0, max(0.05, idle_lifetime / 4)) if sweep_interval is None else sweep_interval
        )

    def _add_client(self, peer: Peer, endpoint: IStreamClientEndpoint) -> NotificationClient:
        """A configured peer's client, made, registered and (when running) started."""
        if peer.name.startswith(DIAL_IN_PREFIX):
            raise ValueError(f"peer name {peer.name!r}: {DIAL_IN_PREFIX!r} names terminals "
                             "that dial in")  # fmt: skip
        if peer.name in self.clients:
            raise ValueError(f"peer name {peer.name!r} is used twice")
        initial_delay, max_delay, jitter = self._backoff
        client = NotificationClient(
            peer, endpoint, self.credentials, self.gate, self.clock, self.interval,
            initial_delay, max_delay, jitter,
            call_timeout=self.call_timeout,
            handshake_timeout=self.handshake_timeout,
            max_outstanding=self.max_outstanding,
        )  # fmt: skip
        client.setServiceParent(self)
        self.clients[peer.name] = client
        if peer.home is not None:
            self._terminals[peer.home] = client
        elif isinstance(peer.entitlement, PrefixEntitlement):
            self._home_agents.append((client, peer.entitlement))
        return client

    @classmethod
    def from_config(
        cls, config: Any, reactor: Any, listener: IBindingListener, **options: Any
    ) -> Notifier:
        """From an ``lbproxy.config.NotifyConfig`` (peers' endpoints are Twisted client
        endpoint strings; TLS is added here, so they are plain ``tcp:`` endpoints; so is
        ``listen``, the dial-in endpoint).  The optional keys of :data:`CONFIG_KEYS` are
        read when the configuration has them; ``options`` (such as ``local=lambda:
        balancer.policy``) win over them."""
        from twisted.internet.endpoints import clientFromString, serverFromString

        material = TlsMaterial.from_files(config.ca, config.certificate, config.key)
        peers = [(Peer.from_config(p), clientFromString(reactor, p.endpoint))
                 for p in config.peers]
        optional = {
            parameter: getattr(config, key)
            for key, parameter in CONFIG_KEYS.items()
            if getattr(config, key, None) is not None
        }
        listen = getattr(config, "listen", "")
        if listen:
            optional["listen"] = serverFromString(reactor, listen)
        return cls(peers, material, listener, reactor,
                   max_subscriptions=config.max_subscriptions, **{**optional, **options})

    def startService(self) -> None:
        super().startService()
        self._sweeper.start(self.sweep_interval, now=False)

    def stopService(self):  # type: ignore[no-untyped-def]
        if self._sweeper.running:
            self._sweeper.stop()
        log.info("notify: {summary}", summary=self.summary())
        for link in self._dial_in.values():  # not services: closed here
            link.close()
        return super().stopService()

    # -- whom to ask ----------------------------------------------------------------------

    def peers_for(self, address: bytes, home: bool) -> list[PeerLink]:
        """Whom to ask about a terminal seen with this home (or care-of) address."""
        if home:
            own = self._terminals.get(address)
            if own is not None:
                return [own]
            return [c for c, e in self._home_agents if e.allows(address)]
        # Only the care-of address is known: every home agent may hold its binding, and so
        # may every configured terminal agent (claim 6); those without it answer
        # UNKNOWN_BINDING.  Terminals that dialled in were subscribed when they connected.
        return [c for c, _ in self._home_agents] + [
            c for c in self._terminals.values() if not c.peer.dial_in
        ]

    def terminal_seen(self, address: bytes, home: bool = False) -> int:
        """A terminal's first packet: subscribe to its changes.  ``address`` is its home
        address (``home=True``) or its care-of address.  Returns how many subscriptions
        were opened or already open; refusals (registry full) are counted."""
        if len(address) != 16:
            raise ValueError("address must be 16 octets")
        if (self.addresses.home if home else self.addresses.care_of)(address) is not None:
            return 0  # nothing a peer says about it could be believed
        now = self.clock.seconds()
        if not home:
            # Some subscription already follows the terminal at this care-of address (it
            # moved here, or its entry expired and came back): nothing new to ask.
            following = [s for s in self.subscriptions.following(address) if s.home is not None]
            if following:
                self.subscriptions.seen(address, now)
                return len(following)
        kind = "hoa" if home else "coa"
        count = 0
        for client in self.peers_for(address, home):
            if self._subscribe(client, address, kind, now) is not None:
                count += 1
        return count

    def _subscribe(
        self, client: PeerLink, address: bytes, kind: str, now: float
    ) -> Subscription | None:
        """The subscription to ``address`` at ``client``, opened (and sent) if new."""
        sub = self.subscriptions.get(client.peer.name, address)
        if sub is None and kind == "hoa":
            sub = self.subscriptions.by_home(client.peer.name, address)
        if sub is not None:
            return sub
        sub = self.subscriptions.add(client.peer.name, address, kind, now)
        if sub is None:
            self.counters.refuse(
                Refusal.TOO_MANY_SUBSCRIPTIONS,
                client.peer.name,
                f"registry full, {kind} {ipaddress.IPv6Address(address)}",
            )
            return None
        self.lifecycle["opened"] += 1
        client.send_subscribe(sub)
        return sub

    def _evicted(self, sub: Subscription) -> None:
        """A probationary subscription pushed out of a full registry: stop it at its peer."""
        self.lifecycle["evicted"] += 1
        link = self.clients.get(sub.peer)
        if link is not None:
            link.send_unsubscribe(sub)

    # -- the lifecycle --------------------------------------------------------------------

    def _alive(self, sub: Subscription) -> float | None:
        """Until when ``sub``'s terminal is known to be alive, or None (module docstring)."""
        now = self.clock.seconds()
        until: float | None = None
        if sub.binding_until is not None and sub.binding_until > now:
            until = sub.binding_until
        link = self.clients.get(sub.peer)
        if isinstance(link, DialInPeer) and link.connected:
            until = max(until or now, now + self.subscriptions.idle_lifetime)
        if self.liveness is not None:
            addresses = tuple({a for a in (sub.address, sub.care_of) if a is not None})
            found = self.liveness.live_until(sub.home, addresses, now)
            if found is not None:
                # A time at or before now still means alive now (no deadline known).
                until = max(until or now, found, now + self.sweep_interval)
        if until is not None and until > now:
            self.lifecycle["renewed"] += 1
            return until
        return None

    def sweep(self) -> int:
        """Renew the subscriptions whose terminals are alive before they expire; end (and
        unsubscribe) the others.  Returns how many ended."""
        now = self.clock.seconds()
        gone = self.subscriptions.sweep(now, self._alive, margin=self.sweep_interval)
        for sub in gone:
            self.lifecycle["ended"] += 1
            log.info("notify: subscription to {address} at {peer} ended: nothing is left of "
                     "the terminal (home {home})", address=_text(sub.address), peer=sub.peer,
                     home=_text(sub.home))  # fmt: skip
            client = self.clients.get(sub.peer)
            if client is not None:
                client.send_unsubscribe(sub)
                self._forget_dial_in(client)
        return len(gone)

    def lifecycle_counts(self) -> dict[str, int]:
        """What the lifecycle did (:data:`LIFECYCLE`): subscriptions opened, renewed before
        they expired, ended with nothing left of their terminal, lapsed (ended, and their
        terminal seen again within the idle lifetime), restored from the saved table,
        sent again on reconnections, terminals dialled in, probationary ones pushed out
        of a full registry (evicted), dropped with a peer a reload removed (or whose new
        entitlement no longer covers them)."""
        counts = dict(self.lifecycle)
        counts["lapsed"] = self.subscriptions.lapsed
        counts["resubscribed"] = sum(link.resubscribed for link in self.clients.values())
        return {k: counts[k] for k in LIFECYCLE}

    # -- persistence ----------------------------------------------------------------------

    def saved_subscriptions(self) -> Iterator[Subscription]:
        """The subscriptions to save with the table (``lbproxy.ops.persistence``)."""
        return iter(self.subscriptions)

    def restore_subscription(
        self,
        peer: str,
        address: bytes,
        kind: str,
        home: bytes | None,
        care_of: bytes | None,
        seq: int | None,
        expires: float,
        binding_until: float | None,
    ) -> str | None:
        """Put back one saved subscription, checked like what a peer says: ``None`` when
        restored, else why not (an unknown peer, an address the rules refuse, a home the
        peer may not speak for, the registry full).  It is sent when the peer connects."""
        if kind not in KINDS or len(address) != 16:
            return "not a subscription"
        if seq is not None and not valid_seq(seq):
            return f"sequence number {seq!r}"
        link = self.clients.get(peer)
        if link is None and peer.startswith(DIAL_IN_PREFIX) and self.dial_in_server is not None:
            text = peer[len(DIAL_IN_PREFIX):]
            try:
                named = ipaddress.IPv6Address(text).packed
            except ValueError:
                return f"no peer {peer!r}"
            if named == address and self.addresses.home(named) is None:
                link = self.dial_in_link(named)
        if link is None:
            return f"no peer {peer!r}"
        refused = (self.addresses.home if kind == "hoa" else self.addresses.care_of)(address)
        if refused is None and home is not None:
            refused = self.addresses.home(home)
            if refused is None and not link.peer.entitlement.allows(home):
                refused = (Refusal.NOT_ENTITLED, f"{_text(home)} is not {peer}'s")
        if refused is None and care_of is not None and care_of != home:
            refused = self.addresses.care_of(care_of)
        if refused is not None:
            return refused[1]
        if kind == "hoa" and home not in (None, address):
            return "a home-address subscription to another home"
        sub = Subscription(peer, address, kind, expires, home=address if kind == "hoa" else home,
                           care_of=care_of, seq=seq, binding_until=binding_until)  # fmt: skip
        if not self.subscriptions.restore(sub):
            return "the registry is full or already follows it"
        self.lifecycle["restored"] += 1
        return None

    # -- reload: peers added, removed, changed; TLS material rotated ------------------------

    def add_peer(self, peer: Peer, endpoint: IStreamClientEndpoint) -> NotificationClient:
        """A peer a reload added: dialled at once (when running), and asked about every
        terminal the balancer follows or holds a binding for that it may speak for -- as
        if each had just been seen (``peers_for``), the registry's bound respected."""
        client = self._add_client(peer, endpoint)
        self.reloads["peers_added"] += 1
        self._ask_about_known(client)
        return client

    def remove_peer(self, name: str) -> Deferred[None]:
        """A configured peer a reload removed: its connection closed (a TLS close_notify;
        the agent ends that session's subscriptions with it) and its service stopped;
        nothing it says from now on is believed; its subscriptions are dropped from the
        registry (counted ``dropped``) and their terminals asked of the remaining peers
        that may speak for them.  Fires when the connection is closed."""
        client = self._retire(name)
        homes = [sub.home for sub in self._drop(self.subscriptions.for_peer(name))
                 if sub.home is not None]  # fmt: skip
        self.reloads["peers_removed"] += 1
        closed = maybeDeferred(client.disownServiceParent)
        self._ask_others(homes)
        return closed

    def replace_peer(self, peer: Peer, endpoint: IStreamClientEndpoint) -> Deferred[None]:
        """A configured peer whose settings a reload changed (endpoint, identity,
        entitlement, interval): the old connection is closed and a new client dials with
        the new settings.  Its subscriptions stay, sent again once the new connection is
        verified, but those for homes the new entitlement does not allow, which are
        dropped (counted) and asked of the other peers.  Fires when the old connection
        is closed."""
        old = self._retire(peer.name)
        keep: list[Subscription] = []
        drop: list[Subscription] = []
        for sub in self.subscriptions.for_peer(peer.name):
            (keep if sub.home is None or peer.entitlement.allows(sub.home) else drop).append(sub)
        for sub in keep:
            sub.sub_id = None  # the old connection's ids mean nothing to the new one
        homes = [sub.home for sub in self._drop(drop) if sub.home is not None]
        self.reloads["peers_changed"] += 1
        closed = maybeDeferred(old.disownServiceParent)
        self._ask_about_known(self._add_client(peer, endpoint))
        self._ask_others(homes)
        return closed

    def use_material(self, material: TlsMaterial) -> dict[str, int]:
        """Rotate the TLS material (a reload): connections made from now on present the new
        certificate and trust the new CA.  Connections already up are kept -- the
        certificate is only shown in the handshake, and with ephemeral key exchange the old
        key protects nothing of them -- unless the CA changed: each is then checked
        against the new CA (``tls.untrusted``), and one whose peer it would not accept is
        closed and counted ``tls_failed`` (a configured peer is dialled again; the new
        handshake decides).  Returns ``{"kept": n, "closed": m}``."""
        ca_changed = not self.credentials.material.same_ca(material)
        self.credentials.use(material)
        self.reloads["material_rotated"] += 1
        kept = closed = 0
        if not ca_changed:
            return {"kept": sum(1 for link in self.clients.values() if link.connected),
                    "closed": 0}  # fmt: skip
        for link in list(self.clients.values()):
            protocol = link.protocol
            if protocol is None or protocol.transport is None or not link.connected:
                continue
            why = untrusted(protocol.transport.getHandle(), material.cas)  # type: ignore[attr-defined]
            if why is None:
                kept += 1
                continue
            closed += 1
            self.reloads["closed_untrusted"] += 1
            link.refuse(Refusal.TLS_FAILED, f"after the CA changed: {why}")
            protocol.transport.loseConnection()
        return {"kept": kept, "closed": closed}

    def _retire(self, name: str) -> NotificationClient:
        """Take the configured peer ``name`` out of every index; it believes nothing more."""
        client = self.clients.get(name)
        if not isinstance(client, NotificationClient):
            raise KeyError(f"no configured peer {name!r}")
        del self.clients[name]
        if client.peer.home is not None and self._terminals.get(client.peer.home) is client:
            del self._terminals[client.peer.home]
        self._home_agents = [(c, e) for c, e in self._home_agents if c is not client]
        client.retired = True
        return client

    def _drop(self, subs: Iterable[Subscription]) -> list[Subscription]:
        """Forget subscriptions whose peer went (or may no longer speak for them)."""
        dropped = list(subs)
        for sub in dropped:
            self.subscriptions.remove(sub)
            self.lifecycle["dropped"] += 1
        return dropped

    def _ask_others(self, homes: Iterable[bytes]) -> None:
        """Ask the peers that may speak for ``homes`` (now) about them."""
        now = self.clock.seconds()
        for home in dict.fromkeys(homes):
            for link in self.peers_for(home, True):
                self._subscribe(link, home, "hoa", now)

    def _ask_about_known(self, client: PeerLink) -> int:
        """Subscribe ``client`` to the known terminals it is one of the peers for: the
        registry's homes and care-of-only subscriptions, and (``terminals``) the table's
        bindings; stops when the registry is full.  Returns how many were opened."""
        homes: dict[bytes, None] = {}
        care_ofs: dict[bytes, None] = {}
        for sub in self.subscriptions:
            if sub.home is not None:
                homes[sub.home] = None
            else:
                care_ofs[sub.address] = None
        if self.terminals is not None:
            for address, is_home in self.terminals():
                (homes if is_home else care_ofs)[address] = None
        now = self.clock.seconds()
        opened = 0
        known = [(h, True) for h in homes] + [(c, False) for c in care_ofs]
        for address, is_home in known:
            if len(self.subscriptions) >= self.subscriptions.max_entries:
                break
            if (self.addresses.home if is_home else self.addresses.care_of)(address) is not None:
                continue
            if not is_home and any(s.home is not None
                                   for s in self.subscriptions.following(address)):  # fmt: skip
                continue  # followed by its home already
            if client not in self.peers_for(address, is_home):
                continue
            before = len(self.subscriptions)
            self._subscribe(client, address, "hoa" if is_home else "coa", now)
            opened += len(self.subscriptions) - before
        return opened

    # -- terminals that dial in -----------------------------------------------------------

    def dial_in_link(self, home: bytes) -> DialInPeer | None:
        """The link of the terminal with this home address, made if new; None when
        ``max_dial_in`` terminals are known (one that is gone is forgotten first)."""
        peer = Peer.dialled_in(home)
        link = self._dial_in.get(peer.name)
        if link is not None:
            return link
        if len(self._dial_in) >= self.max_dial_in:
            for other in list(self._dial_in.values()):
                if self._forget_dial_in(other):
                    break
            else:
                return None
        link = DialInPeer(peer, self.gate, self.clock, self.interval, self.call_timeout,
                          self.handshake_timeout, self.max_outstanding)  # fmt: skip
        self._dial_in[peer.name] = link
        self.clients[peer.name] = link
        if home not in self._terminals:
            self._terminals[home] = link
        return link

    def _forget_dial_in(self, link: PeerLink) -> bool:
        """Forget a dial-in terminal that is gone and followed by nothing."""
        if not isinstance(link, DialInPeer) or link.protocol is not None \
                or self.subscriptions.count(link.peer.name):  # fmt: skip
            return False
        del self._dial_in[link.peer.name]
        del self.clients[link.peer.name]
        if link.peer.home is not None and self._terminals.get(link.peer.home) is link:
            del self._terminals[link.peer.home]
        return True

    def dialled_in(self, link: DialInPeer, protocol: BalancerProtocol) -> None:
        """A terminal agent dialled in and was verified: follow it by its home address,
        then carry it on ``protocol`` (which (re)sends its subscriptions)."""
        home = link.peer.home
        assert home is not None
        now = self.clock.seconds()
        if self.subscriptions.by_home(link.peer.name, home) is None:
            sub = self.subscriptions.add(link.peer.name, home, "hoa", now)
            if sub is None:
                self.counters.refuse(Refusal.TOO_MANY_SUBSCRIPTIONS, link.peer.name,
                                     "registry full, dial-in terminal")  # fmt: skip
            else:
                self.lifecycle["opened"] += 1
        self.lifecycle["dialled_in"] += 1
        link.attach(protocol)

    # -- the operator's view --------------------------------------------------------------

    def report(self, limit: int = 100, peer: str | None = None) -> dict[str, Any]:
        """Everything ``lbproxyctl notify`` shows, JSON-ready: peers (state, connections,
        subscriptions, the last report and how long ago it came; every configured one and
        the first ``limit`` terminals that dialled in, or just ``peer``), subscriptions
        (counts, and the first ``limit`` of them, or of ``peer``'s), the lifecycle's counts
        and the refusals by reason."""
        now = self.clock.seconds()
        if peer is not None:
            links = [self.clients[peer]] if peer in self.clients else []
        else:  # every configured peer; terminals that dialled in, the first ``limit``
            links = [c for c in self.clients.values() if not c.peer.dial_in]
            links += list(self._dial_in.values())[:max(0, limit)]
        subs = self.subscriptions.for_peer(peer) if peer is not None else list(self.subscriptions)
        confirmed = sum(1 for s in subs if s.sub_id is not None)
        listing = [
            {
                "peer": s.peer,
                "address": _text(s.address),
                "kind": s.kind,
                "home": _text(s.home),
                "care_of": _text(s.care_of),
                "seq": s.seq,
                "subscribed": s.sub_id is not None,
                "expires_in": round(s.expires - now, 3),
                "binding_left": None if s.binding_until is None
                else round(max(0.0, s.binding_until - now), 3),
            }
            for s in subs[:max(0, limit)]
        ]
        server = self.dial_in_server
        return {
            "peers": [link.report(now) for link in links],
            "subscriptions": {
                "total": len(subs),
                "subscribed": confirmed,
                "pending": len(subs) - confirmed,
                "max": self.subscriptions.max_entries,
                "idle_lifetime": self.subscriptions.idle_lifetime,
                "listed": listing,
            },
            "lifecycle": self.lifecycle_counts(),
            "reloads": {k: self.reloads[k] for k in RELOADS},
            "notifications": {"accepted": self.counters.accepted,
                              "refreshed": self.counters.refreshed},
            "refused": {reason.value: n for reason, n in self.counters.counts.items()},
            "dial_in": None if server is None else {
                "terminals": len(self._dial_in),
                "connected": sum(1 for link in self._dial_in.values() if link.connected),
                "unverified": len(server.pending),
                "max": self.max_dial_in,
            },
        }

    def summary(self) -> str:
        """One line: the registry and what the lifecycle and the gate did."""
        life = self.lifecycle_counts()
        return (f"{len(self.subscriptions)} subscriptions; lifecycle "
                + " ".join(f"{k}={life[k]}" for k in LIFECYCLE)
                + f"; notifications accepted={self.counters.accepted} "
                f"refreshed={self.counters.refreshed} refused={self.counters.total()}")


def format_report(report: dict[str, Any]) -> str:
    """:meth:`Notifier.report` as text (``lbproxyctl notify``)."""
    lines = ["peers:"]
    header = f"  {'name':<28} {'kind':<9} {'state':<11} {'conn':>4} {'subs':>6} " \
             f"{'interval':>8} {'reports':>7} {'last report':>11}"  # fmt: skip
    lines.append(header)
    for p in report["peers"]:
        last = "-" if p["last_report"] is None else f"{p['last_report']:.1f}s ago"
        lines.append(f"  {p['name']:<28} {p['kind']:<9} {p['state']:<11} {p['connections']:>4} "
                     f"{p['subscriptions']:>6} {p['interval']:>8} {p['reports']:>7} "
                     f"{last:>11}")  # fmt: skip
    subs = report["subscriptions"]
    lines.append(f"subscriptions: {subs['total']} of at most {subs['max']} "
                 f"({subs['subscribed']} subscribed, {subs['pending']} pending); idle "
                 f"lifetime {subs['idle_lifetime']:g}s")  # fmt: skip
    for s in subs["listed"]:
        lines.append(f"  {s['peer']:<28} {s['kind']} {s['address']:<39} home {s['home'] or '-'} "
                     f"care-of {s['care_of'] or '-'} seq {'-' if s['seq'] is None else s['seq']}"
                     f" expires in {s['expires_in']:.1f}s")  # fmt: skip
    life = report["lifecycle"]
    lines.append("lifecycle: " + " ".join(f"{k} {v}" for k, v in life.items()))
    reloads = report.get("reloads") or {}
    if any(reloads.values()):
        lines.append("reloads: " + " ".join(f"{k} {v}" for k, v in reloads.items()))
    n = report["notifications"]
    lines.append(f"notifications: accepted {n['accepted']}, re-registrations {n['refreshed']}")
    refused = {k: v for k, v in report["refused"].items() if v}
    lines.append("refused: " + (", ".join(f"{k} {v}" for k, v in refused.items()) or "none"))
    dial = report["dial_in"]
    if dial is not None:
        lines.append(f"dial-in: {dial['terminals']} terminals known, {dial['connected']} "
                     f"connected, {dial['unverified']} unverified (at most {dial['max']})")
    return "\n".join(lines)


class _Bounded(Factory):
    """The dial-in server's factory: at most ``limit`` connections not yet verified."""

    def __init__(self, server: DialInServer, wrapped: Any, limit: int) -> None:
        self.server = server
        self.wrapped = wrapped
        self.limit = limit

    def doStart(self) -> None:
        self.wrapped.doStart()

    def doStop(self) -> None:
        self.wrapped.doStop()

    def buildProtocol(self, addr: Any) -> Any:
        if len(self.server.pending) >= self.limit:
            self.server.refuse(Refusal.TOO_MANY_PEERS,
                               f"{self.limit} dial-in connections not yet verified")  # fmt: skip
            return None
        return self.wrapped.buildProtocol(addr)


class DialInServer(Service):
    """Listens for terminal agents (mutual TLS): each is verified in the handshake by the
    one home address its certificate names (``tls.check_terminal_certificate``), checked
    by the address rules, and carried by its :class:`DialInPeer`."""

    name = "dial-in"

    def __init__(
        self,
        notifier: Notifier,
        endpoint: IStreamServerEndpoint,
        material: TlsMaterial | Credentials,
        max_unverified: int = 1024,
    ) -> None:
        self.notifier = notifier
        self.clock = notifier.clock
        self.call_timeout = notifier.call_timeout
        self.max_outstanding = notifier.max_outstanding
        self.handshake_timeout = notifier.handshake_timeout
        self.pending: set[BalancerProtocol] = set()
        factory = Factory.forProtocol(lambda: BalancerProtocol(self))
        self.factory = _Bounded(self, dial_in_factory(material, factory, self.clock),
                                max_unverified)  # fmt: skip
        self.service = StreamServerEndpointService(endpoint, self.factory)

    def startService(self) -> None:
        super().startService()
        self.service.startService()

    def stopService(self) -> Any:
        super().stopService()
        for protocol in list(self.pending):
            if protocol.transport is not None:
                protocol.transport.abortConnection()  # type: ignore[attr-defined]
        return self.service.stopService()

    def refuse(self, reason: Refusal, detail: str) -> None:
        self.notifier.counters.refuse(reason, "dial-in", detail)

    def connection_made(self, protocol: BalancerProtocol) -> None:
        self.pending.add(protocol)

    def handshake_completed(self, protocol: BalancerProtocol) -> None:
        if protocol.dropped is not None:
            return
        connection = protocol.transport.getHandle()  # type: ignore[union-attr]
        verdict = peer_verdict(connection, (), CLIENT_AUTH, check=check_terminal_certificate)
        if not verdict.accepted or verdict.name is None:
            protocol.drop(verdict.refusal or Refusal.WRONG_IDENTITY, verdict.detail)
            return
        home = ipaddress.IPv6Address(verdict.name).packed
        refused = self.notifier.addresses.home(home)
        if refused is not None:
            protocol.drop(refused[0], f"dial-in terminal: {refused[1]}")
            return
        link = self.notifier.dial_in_link(home)
        if link is None:
            protocol.drop(Refusal.TOO_MANY_PEERS,
                          f"{self.notifier.max_dial_in} dial-in terminals known")  # fmt: skip
            return
        self.pending.discard(protocol)
        self.notifier.dialled_in(link, protocol)

    def connection_lost(self, protocol: BalancerProtocol, reason: Failure) -> None:
        if protocol not in self.pending:
            return
        self.pending.discard(protocol)
        if not protocol.handshaken and protocol.dropped is None:
            value = reason.value
            if isinstance(value, PeerRefused):  # refused in the handshake, with the reason
                self.refuse(value.refusal, value.detail)
            else:
                self.refuse(Refusal.TLS_FAILED, reason.getErrorMessage())
