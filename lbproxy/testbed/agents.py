"""Run the notification agents (``twistd lbproxy-homeagent``, ``lbproxy-terminal``) in a bed.

Why a module of its own: the integration tests and benchmarks prove care-of address
notifications (claims 5, 6, 9, 12, 13) with the programs an operator would run -- the
agents under twistd from their own configuration files, the balancer under twistd with a
``[notify]`` section -- in the bed's namespaces, over mutually authenticated TLS with
certificates from a throw-away CA.  This module writes those files for the bed's fixed
address plan (`lbproxy.testbed.addresses`) and starts, restarts and stops the agents::

    pki = BedPki(bed)
    agent = BedAgent.home_agent(bed, pki).start()          # in ns ha, watching the home link
    extra = notify_section(pki, [agent.peer()])            # the balancer's [notify] TOML
    balancer = BedBalancer(bed, bed_config(bed, key_chain=["src"], extra=extra)).start()

The home-agent agent runs beside the home agent emulator in ``ha`` and learns bindings from
the real Binding Updates and Acknowledgements on its ``home`` link.  The terminal agent runs
in ``term`` and learns its care-of address from netlink; the terminal emulator must then keep
only current care-of addresses on the kernel's interfaces (:func:`track_addresses`).  The
balancer reaches it at the terminal's home address, i.e. through the home agent's tunnel,
as it would reach a real mobile node.
"""

from __future__ import annotations

import json
import socket
from collections.abc import Sequence
from typing import Any

import attrs

from lbproxy.notify.pki import CertificateAuthority
from lbproxy.testbed import addresses, control
from lbproxy.testbed.bed import TestBed
from lbproxy.testbed.twistd import TwistdProcess

__all__ = [
    "BALANCER_IDENTITY",
    "HOME_AGENT_PORT",
    "TERMINAL_PORT",
    "AgentPeer",
    "BedAgent",
    "BedPki",
    "notify_section",
    "track_addresses",
]

HOME_AGENT_PORT = 7440
TERMINAL_PORT = 7441
BALANCER_IDENTITY = "lb.bed.example"
HOME_AGENT_IDENTITY = "ha.bed.example"


def terminal_identity(index: int) -> str:
    """The DNS-ID in terminal ``index``'s certificate."""
    return f"t{index}.bed.example"


def _endpoint(address: object, port: int) -> str:
    """A Twisted ``tcp:`` client endpoint string for an IPv6 literal (colons escaped)."""
    host = str(address).replace(":", "\\:")
    return f"tcp:host={host}:port={port}"


class BedPki:
    """A throw-away CA and the certificates of one bed, written to its working directory."""

    def __init__(self, bed: TestBed) -> None:
        self.directory = bed.path("pki")
        self.ca = CertificateAuthority("lbproxy bed CA")
        self.ca_path = ""
        self._issued: dict[str, tuple[str, str]] = {}

    def files(self, name: str, dns: Sequence[str], ips: Sequence[str] = ()) -> tuple[str, str]:
        """``(certificate, key)`` paths for ``name``, issued on first use."""
        if name not in self._issued:
            ca, cert, key = self.ca.write(self.directory, name, self.ca.issue(dns=dns, ips=ips))
            self.ca_path = ca
            self._issued[name] = (cert, key)
        return self._issued[name]

    def balancer(self) -> tuple[str, str]:
        return self.files("balancer", [BALANCER_IDENTITY])

    def home_agent(self) -> tuple[str, str]:
        return self.files("homeagent", [HOME_AGENT_IDENTITY])

    def terminal(self, index: int) -> tuple[str, str]:
        """A terminal's certificate carries its home address (the balancer checks it)."""
        return self.files(f"t{index}", [terminal_identity(index)],
                          [str(addresses.home_address(index))])


@attrs.frozen
class AgentPeer:
    """How the balancer's configuration names one agent (a ``[[notify.peer]]`` table)."""

    name: str
    kind: str  # "homeagent" | "terminal"
    endpoint: str
    identity: str
    prefixes: tuple[str, ...] = ()
    home: str = ""

    def toml(self) -> str:
        lines = ["[[notify.peer]]", f'name = "{self.name}"', f'kind = "{self.kind}"',
                 f"endpoint = '{self.endpoint}'", f'identity = "{self.identity}"']
        if self.prefixes:
            lines.append("prefixes = [" + ", ".join(f'"{p}"' for p in self.prefixes) + "]")
        if self.home:
            lines.append(f'home = "{self.home}"')
        return "\n".join(lines) + "\n"


def notify_section(pki: BedPki, peers: Sequence[AgentPeer],
                   max_subscriptions: int = 10_000) -> str:
    """The balancer's ``[notify]`` TOML (for ``bed_config(extra=...)``)."""
    cert, key = pki.balancer()
    text = ("[notify]\nenabled = true\n"
            f'ca = "{pki.ca_path}"\ncertificate = "{cert}"\nkey = "{key}"\n'
            f"max_subscriptions = {max_subscriptions}\n")
    return text + "".join(peer.toml() for peer in peers)


def track_addresses(bed: TestBed) -> None:
    """Make the terminal emulator keep only current care-of addresses in the kernel."""
    control.request(bed.terminal_control, "track_addresses")


class BedAgent(TwistdProcess):
    """One agent process under twistd in a bed namespace: start, restart, stop, log."""

    def __init__(self, bed: TestBed, role: str, plugin: str, config: str, name: str,
                 peer: AgentPeer, ready: str) -> None:
        # ``ready``: the log line that says it listens *and* observes
        super().__init__(bed, role, plugin, config, name, ready)
        self.peer = peer

    @classmethod
    def home_agent(cls, bed: TestBed, pki: BedPki, require_ack: bool = True,
                   name: str = "ha-agent") -> BedAgent:
        """The home-agent agent beside the home agent emulator (ns ``ha``, link ``home``)."""
        cert, key = pki.home_agent()
        config = "\n".join([
            "[agent]", f'listen = "tcp6:{HOME_AGENT_PORT}"',
            f'balancers = ["{BALANCER_IDENTITY}"]',
            "[tls]", f'ca = "{pki.ca_path}"', f'certificate = "{cert}"', f'key = "{key}"',
            "[homeagent]", f'prefixes = ["{addresses.HOME_PREFIX}"]', 'interface = "home"',
            f"require_ack = {'true' if require_ack else 'false'}", "ack_timeout = 3.0",
            f'command_socket = "{bed.path(name + ".sock")}"',
        ]) + "\n"
        peer = AgentPeer("ha1", "homeagent", _endpoint(addresses.HOME_AGENT, HOME_AGENT_PORT),
                         HOME_AGENT_IDENTITY, prefixes=(str(addresses.HOME_PREFIX),))
        return cls(bed, "ha", "lbproxy-homeagent", config, name, peer,
                   "home-agent agent: observing home")

    @classmethod
    def terminal(cls, bed: TestBed, pki: BedPki, index: int, lifetime: int = 420,
                 name: str | None = None) -> BedAgent:
        """Terminal ``index``'s own agent (ns ``term``), reached at its home address."""
        cert, key = pki.terminal(index)
        home = addresses.home_address(index)
        name = name or f"t{index}-agent"
        config = "\n".join([
            "[agent]", f'listen = "tcp6:{TERMINAL_PORT}"',
            f'balancers = ["{BALANCER_IDENTITY}"]',
            "[tls]", f'ca = "{pki.ca_path}"', f'certificate = "{cert}"', f'key = "{key}"',
            "[terminal]", f'home = "{home}"', f'home_prefix = "{addresses.HOME_PREFIX}"',
            f"lifetime = {lifetime}", f'state_file = "{bed.path(name + ".seq")}"',
            "poll_interval = 30.0",
        ]) + "\n"
        peer = AgentPeer(f"t{index}", "terminal", _endpoint(home, TERMINAL_PORT),
                         terminal_identity(index), home=str(home))
        return cls(bed, "term", "lbproxy-terminal", config, name, peer,
                   "terminal agent: watching addresses")

    @property
    def command_socket(self) -> str:
        """The home-agent agent's command socket (JSON lines, docs/notify.md)."""
        return self.bed.path(f"{self.name}.sock")

    def bindings(self) -> list[dict[str, Any]]:
        """What the home-agent agent has learnt: its binding cache."""
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
            sock.settimeout(5)
            sock.connect(self.command_socket)
            sock.sendall(b'{"command": "bindings"}\n')
            answer = b""
            while not answer.endswith(b"\n"):
                chunk = sock.recv(65536)
                if not chunk:
                    break
                answer += chunk
        result: list[dict[str, Any]] = json.loads(answer)["bindings"]
        return result

