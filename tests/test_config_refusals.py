"""Bad configuration files, one class of mistake each, for the balancer and both agents.

Each file is written to disk and loaded the way twistd loads it; each must be refused
with one ``ConfigError`` whose text is exactly one line ``file: key: reason``, naming the
file, the dotted key and a reason that says what is wrong.  Among them: every class
issue 14 found accepted (duplicate backend addresses, ``ports = [true]``, bad virtual
and backend addresses, every weight 0, a health check without a port, duplicate peer
names, a relative control socket) and the hostile shapes that gave tracebacks (deep
nesting, a huge dotted key, a 5,000-digit integer).
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import attrs
from twisted.trial.unittest import SynchronousTestCase

from lbproxy.agents.config import load_homeagent, load_terminal
from lbproxy.config import load_config
from lbproxy.tomlconfig import ConfigError

BALANCER = """\
[balancer]
mode = "translate"
[virtual]
addresses = ["2001:db8:5::80"]
ports = [80]
[interfaces]
client = "lbc"
server = "lbs"
[[backend]]
name = "srv1"
address = "2001:db8:b0::11"
[[backend]]
name = "srv2"
address = "2001:db8:b0::12"
"""

PEER = """
[notify]
[[notify.peer]]
name = "ha1"
kind = "homeagent"
endpoint = "tcp:host=2001\\\\:db8\\\\:100\\\\:\\\\:1:port=7440"
identity = "ha1.example.net"
prefixes = ["2001:db8:100::/64"]
"""

AGENT = """\
[agent]
listen = "tcp6:7440"
balancers = ["lb1.example.net"]
[tls]
ca = "/etc/lbproxy/pki/ca.pem"
certificate = "/etc/lbproxy/pki/a.pem"
key = "/etc/lbproxy/pki/a.key"
"""

HOMEAGENT = AGENT + """\
[homeagent]
prefixes = ["2001:db8:100::/64"]
interface = "eth0"
command_socket = "/run/lbproxy-homeagent.sock"
"""

TERMINAL = AGENT + """\
[terminal]
home = "2001:db8:100::16"
home_prefix = "2001:db8:100::/64"
state_file = "/var/lib/lbproxy-terminal/seq"
"""

LOADERS: dict[str, Callable[[str], Any]] = {
    "balancer": load_config,
    "homeagent": load_homeagent,
    "terminal": load_terminal,
}
BASES = {"balancer": BALANCER, "homeagent": HOMEAGENT, "terminal": TERMINAL}


@attrs.frozen
class Bad:
    """One bad file: which program, how it differs from the valid base, what is said."""

    name: str
    program: str
    key: str
    reason: str
    replace: tuple[str, str] | None = None
    append: str = ""
    whole: str | bytes | None = None

    def text(self) -> str | bytes:
        if self.whole is not None:
            return self.whole
        base = BASES[self.program]
        if self.replace is not None:
            old, new = self.replace
            assert old in base, (self.name, old)
            base = base.replace(old, new)
        return base + self.append


def b(name: str, key: str, reason: str, **kw: Any) -> Bad:
    return Bad(name, "balancer", key, reason, **kw)


def ha(name: str, key: str, reason: str, **kw: Any) -> Bad:
    return Bad(name, "homeagent", key, reason, **kw)


def t(name: str, key: str, reason: str, **kw: Any) -> Bad:
    return Bad(name, "terminal", key, reason, **kw)


VIP = '["2001:db8:5::80"]'
BACKEND1 = 'address = "2001:db8:b0::11"'
BACKEND2 = 'address = "2001:db8:b0::12"'

CASES: list[Bad] = [
    # -- syntax and hostile shapes ------------------------------------------------
    b("syntax", "(syntax)", "line 1", whole="[virtual\n"),
    b("deep-arrays", "(syntax)", "nested more than 32 levels",
      whole="x = " + "[" * 100_000 + "]" * 100_000 + "\n"),
    b("deep-inline-tables", "(syntax)", "nested more than 32 levels",
      whole="x = " + "{a = " * 1000 + "1" + "}" * 1000 + "\n"),
    b("dotted-key-100000", "(syntax)", "more than 64 dots", whole="a." * 100_000 + "b = 1\n"),
    b("digits-5000", "(syntax)", "a value cannot be read",
      append="[health]\nrise = 1" + "0" * 5000 + "\n"),
    b("oversized", "(file)", "larger than 1048576 bytes",
      whole="# padding\n" * 120_000),
    b("not-utf8", "(file)", "not UTF-8", whole=b"[balancer]\nmode = \"\xff\"\n"),
    b("newline-in-key", 'a\\nb', "unknown key", whole='"a\\nb" = 1\n' + BALANCER),
    # -- structure, unknown keys, types ---------------------------------------------
    b("unknown-section", "balancer2", "unknown key", append="[balancer2]\n"),
    b("unknown-key", "balancer.lifetmie", "unknown key", append="[health]\n",
      replace=('mode = "translate"', "lifetmie = 3")),
    b("virtual-array-of-tables", "virtual", "expected a table",
      replace=("[virtual]\naddresses = " + VIP + "\nports = [80]\n",
               "[[virtual]]\naddresses = " + VIP + "\n")),
    b("backend-plain-table", "backend", "expected an array of tables",
      whole=BALANCER.split("[[backend]]")[0] + '[backend]\nname = "a"\n'),
    b("lifetime-string", "balancer.lifetime", "expected float, got str",
      replace=('mode = "translate"', 'lifetime = "long"')),
    b("any-iid-int", "balancer.any_interface_id", "expected bool",
      replace=('mode = "translate"', "any_interface_id = 1")),
    b("weight-bool", "backend[0].weight", "expected int, got bool",
      replace=(BACKEND1, BACKEND1 + "\nweight = true")),
    # -- numbers ------------------------------------------------------------------
    b("lifetime-zero", "balancer.lifetime", "outside",
      replace=('mode = "translate"', "lifetime = 0")),
    b("lifetime-nan", "balancer.lifetime", "not a finite number",
      replace=('mode = "translate"', "lifetime = nan")),
    b("sweep-inf", "balancer.sweep_interval", "not a finite number",
      replace=('mode = "translate"', "sweep_interval = inf")),
    b("max-entries-400-digits", "balancer.max_entries", "an integer of about 400 digits",
      replace=('mode = "translate"', "max_entries = 1" + "0" * 399)),
    b("weight-1001", "backend[0].weight", "outside 0..1000",
      replace=(BACKEND1, BACKEND1 + "\nweight = 1001")),
    b("health-interval-negative", "health.interval", "outside",
      append="[health]\ninterval = -1.0\n"),
    b("persistence-interval-zero", "persistence.interval", "outside",
      append='[persistence]\npath = "/var/lib/lbproxy/t.jsonl"\ninterval = 0\n'),
    b("max-bytes-too-small", "persistence.max_bytes", "cannot hold a full table",
      append='[persistence]\npath = "/var/lib/lbproxy/t.jsonl"\nmax_bytes = 1000\n'),
    # -- choices and registries ---------------------------------------------------
    b("mode", "balancer.mode", "not one of translate, transparent",
      replace=('mode = "translate"', 'mode = "dsr"')),
    b("scheduler", "balancer.scheduler", "not a registered scheduler",
      replace=('mode = "translate"', 'scheduler = "fastest"')),
    b("key-chain-unknown", "balancer.key_chain", "'mac' is not a registered key strategy",
      replace=('mode = "translate"', 'key_chain = ["hoa", "mac"]')),
    b("key-chain-twice", "balancer.key_chain", "at most once",
      replace=('mode = "translate"', 'key_chain = ["src", "src"]')),
    b("health-kind", "backend[0].health", "not one of none, tcp, http",
      replace=(BACKEND1, BACKEND1 + '\nhealth = "icmp"')),
    b("dead-backend", "health.dead_backend", "not one of reassign, keep",
      append='[health]\ndead_backend = "drop"\n'),
    # -- ports --------------------------------------------------------------------
    b("ports-true", "virtual.ports", "True is not a port number",
      replace=("ports = [80]", "ports = [true]")),
    b("ports-zero", "virtual.ports", "0 is not a port number",
      replace=("ports = [80]", "ports = [0]")),
    b("ports-70000", "virtual.ports", "70000 is not a port number",
      replace=("ports = [80]", "ports = [70000]")),
    b("ports-twice", "virtual.ports", "listed twice", replace=("ports = [80]", "ports = [80, 80]")),
    b("ports-string", "virtual.ports", "expected list", replace=("ports = [80]", 'ports = "80"')),
    # -- virtual addresses --------------------------------------------------------
    b("vip-multicast", "virtual.addresses", "multicast",
      replace=(VIP, '["ff05::1"]')),
    b("vip-unspecified", "virtual.addresses", "unspecified", replace=(VIP, '["::"]')),
    b("vip-link-local", "virtual.addresses", "link-local", replace=(VIP, '["fe80::80"]')),
    b("vip-ipv4-mapped", "virtual.addresses", "IPv4-mapped",
      replace=(VIP, '["::ffff:192.0.2.80"]')),
    b("vip-loopback", "virtual.addresses", "loopback", replace=(VIP, '["::1"]')),
    b("vip-ipv4", "virtual.addresses", "is an IPv4 address", replace=(VIP, '["192.0.2.80"]')),
    b("vip-twice", "virtual.addresses", "listed twice",
      replace=(VIP, '["2001:db8:5::80", "2001:db8:5:0::80"]')),
    b("vip-none", "virtual.addresses", "at least one", replace=(VIP, "[]")),
    # -- backends -----------------------------------------------------------------
    b("backend-is-vip", "backend[0].address", "is a virtual address",
      replace=(BACKEND1, 'address = "2001:db8:5::80"')),
    b("backend-loopback", "backend[1].address", "loopback", replace=(BACKEND2, 'address = "::1"')),
    b("backend-multicast", "backend[0].address", "multicast",
      replace=(BACKEND1, 'address = "ff02::2"')),
    b("backend-same-address", "backend[1].address", "also the address of backend 'srv1'",
      replace=(BACKEND2, 'address = "2001:db8:b0:0::11"')),
    b("all-weights-zero", "backend", "every backend has weight 0",
      replace=(BACKEND1, BACKEND1 + "\nweight = 0"),
      append="weight = 0\n"),
    b("tcp-health-no-port", "backend[0].health_port", "needs the port to check",
      replace=(BACKEND1, BACKEND1 + '\nhealth = "tcp"')),
    b("http-health-path", "backend[0].health_path", "not a URL path",
      replace=(BACKEND1, BACKEND1 + '\nhealth = "http"\nhealth_port = 80\n'
                                    'health_path = "/ok\\r\\nHost: evil"')),
    b("backend-name-twice", "backend", "'srv1' is used twice",
      replace=('name = "srv2"', 'name = "srv1"')),
    b("backend-name-space", "backend[0].name", "is not a backend name",
      replace=('name = "srv1"', 'name = "srv 1"')),
    b("backend-no-address", "backend[0].address", "missing (required)",
      replace=(BACKEND1, "")),
    b("no-backends", "backend", "at least one [[backend]]",
      whole=BALANCER.split("[[backend]]")[0]),
    # -- interfaces ---------------------------------------------------------------
    b("interface-empty", "interfaces.client", "not a network interface name",
      replace=('client = "lbc"', 'client = ""')),
    b("interface-too-long", "interfaces.server", "not a network interface name",
      replace=('server = "lbs"', 'server = "averyveryverylongname"')),
    b("interface-missing", "interfaces.server", "missing (required)",
      replace=('server = "lbs"', "")),
    # -- notifications ------------------------------------------------------------
    b("notify-no-ca", "notify.ca", "required when notifications are enabled",
      append="[notify]\nenabled = true\n"),
    b("peer-name-twice", "notify.peer[1].name", "'ha1' is used twice",
      append=PEER + PEER.split("[notify]\n")[1].replace("2001:db8:100::/64", "2001:db8:101::/64")),
    b("peer-endpoint-garbage", "notify.peer[0].endpoint", "not a Twisted client endpoint",
      append=PEER.replace("tcp:host=2001", "tcp:hast=2001")),
    b("peer-endpoint-kind", "notify.peer[0].endpoint", "Unknown endpoint type",
      append=PEER.replace("tcp:host=", "pigeon:host=")),
    b("peer-endpoint-no-host", "notify.peer[0].endpoint", "no host",
      append=PEER.replace("2001\\\\:db8\\\\:100\\\\:\\\\:1", "::1")),
    b("peer-homeagent-home", "notify.peer[0].home", "only for kind = 'terminal'",
      append=PEER + 'home = "2001:db8:100::16"\n'),
    b("peer-terminal-no-home", "notify.peer[0].home", "needs its home address",
      append=PEER.replace('kind = "homeagent"', 'kind = "terminal"')
      .replace('prefixes = ["2001:db8:100::/64"]\n', "")),
    b("peer-prefix-everything", "notify.peer[0].prefixes",
      "includes multicast addresses (ff00::/8)", append=PEER.replace("2001:db8:100::/64", "::/0")),
    b("peer-kind", "notify.peer[0].kind", "not one of homeagent, terminal",
      append=PEER.replace('kind = "homeagent"', 'kind = "router"')),
    b("peer-identity-space", "notify.peer[0].identity", "is not a DNS name",
      append=PEER.replace("ha1.example.net", "ha1 example")),
    # -- operator doors and files -------------------------------------------------
    b("control-relative", "control.socket", "is a relative path",
      append='[control]\nsocket = "run/lbproxy.sock"\n'),
    b("control-too-long", "control.socket", "a UNIX socket path has at most 107",
      append='[control]\nsocket = "/run/' + "x" * 120 + '.sock"\n'),
    b("journeys-negative", "control.journeys", "outside",
      append="[control]\njourneys = -1\n"),
    b("journeys-not-a-number", "control.journeys", "expected int",
      append='[control]\njourneys = "many"\n'),
    b("metrics-garbage", "metrics.endpoint", "not a Twisted server endpoint",
      append='[metrics]\nendpoint = "tcp:abc"\n'),
    b("metrics-port-range", "metrics.endpoint", "port 99999 is outside 0..65535",
      append='[metrics]\nendpoint = "tcp:99999"\n'),
    b("manhole-no-keys", "manhole.authorized_keys", "required when the manhole is enabled",
      append='[manhole]\nendpoint = "tcp:2222:interface=127.0.0.1"\n'),
    b("manhole-endpoint-option", "manhole.endpoint", "unexpected keyword argument 'bogus'",
      append='[manhole]\nendpoint = "tcp:2222:bogus=1"\n'),
    b("persistence-directory", "persistence.path", "names a directory",
      append='[persistence]\npath = "/var/lib/lbproxy/"\n'),
    b("persistence-nul", "persistence.path", "contains a NUL character",
      append='[persistence]\npath = "/var/lib/\\u0000x"\n'),
    # -- the home-agent agent -----------------------------------------------------
    ha("listen-garbage", "agent.listen", "not a Twisted server endpoint",
       replace=('listen = "tcp6:7440"', 'listen = "tcp6:seventy"')),
    ha("balancers-empty", "agent.balancers", "non-empty list",
       replace=('["lb1.example.net"]', "[]")),
    ha("balancers-twice", "agent.balancers", "listed twice",
       replace=('["lb1.example.net"]', '["lb1.example.net", "lb1.example.net"]')),
    ha("balancers-space", "agent.balancers", "is not a DNS name",
       replace=('["lb1.example.net"]', '["lb1 example"]')),
    ha("tls-ca-missing", "tls.ca", "missing (required)",
       replace=('ca = "/etc/lbproxy/pki/ca.pem"\n', "")),
    ha("tls-key-empty", "tls.key", "empty path",
       replace=('key = "/etc/lbproxy/pki/a.key"', 'key = ""')),
    ha("prefix-multicast", "homeagent.prefixes", "includes multicast addresses (ff00::/8)",
       replace=('prefixes = ["2001:db8:100::/64"]', 'prefixes = ["ff00::/8"]')),
    ha("prefix-host-bits", "homeagent.prefixes", "has host bits set",
       replace=('prefixes = ["2001:db8:100::/64"]', 'prefixes = ["2001:db8:100::1/64"]')),
    ha("prefix-twice", "homeagent.prefixes", "listed twice",
       replace=('prefixes = ["2001:db8:100::/64"]',
                'prefixes = ["2001:db8:100::/64", "2001:db8:100:0::/64"]')),
    ha("interface-slash", "homeagent.interface", "not a network interface name",
       replace=('interface = "eth0"', 'interface = "eth/0"')),
    ha("command-socket-relative", "homeagent.command_socket", "is a relative path",
       replace=('"/run/lbproxy-homeagent.sock"', '"lbproxy-homeagent.sock"')),
    ha("ack-timeout-nan", "homeagent.ack_timeout", "not a finite number",
       append="ack_timeout = nan\n"),
    ha("require-ack-string", "homeagent.require_ack", "expected bool",
       append='require_ack = "yes"\n'),
    ha("max-subscriptions-zero", "agent.max_subscriptions", "outside",
       replace=('listen = "tcp6:7440"', 'listen = "tcp6:7440"\nmax_subscriptions = 0')),
    ha("unknown-section", "balancer", "unknown key", append="[balancer]\n"),
    # -- the terminal agent -------------------------------------------------------
    t("home-multicast", "terminal.home", "multicast",
      replace=('home = "2001:db8:100::16"', 'home = "ff02::16"')),
    t("home-link-local", "terminal.home", "link-local",
      replace=('home = "2001:db8:100::16"', 'home = "fe80::16"')),
    t("home-unspecified", "terminal.home", "unspecified",
      replace=('home = "2001:db8:100::16"', 'home = "::"')),
    t("home-outside-prefix", "terminal.home_prefix", "does not contain the home address",
      replace=('"2001:db8:100::/64"', '"2001:db8:200::/64"')),
    t("lifetime-3", "terminal.lifetime", "outside 4..262140", append="lifetime = 3\n"),
    t("poll-interval-inf", "terminal.poll_interval", "not a finite number",
      append="poll_interval = inf\n"),
    t("state-file-directory", "terminal.state_file", "names a directory",
      replace=('"/var/lib/lbproxy-terminal/seq"', '"/var/lib/lbproxy-terminal/"')),
    t("listen-port-range", "agent.listen", "port 99999 is outside 0..65535",
      replace=('listen = "tcp6:7440"', 'listen = "tcp6:99999"')),
    t("typo", "terminal.hom", "unknown key", append='hom = "2001:db8:100::17"\n'),
    t("deep-nesting", "(syntax)", "nested more than 32 levels",
      whole=AGENT + "[terminal]\nhome = " + "[" * 5000 + "]" * 5000 + "\n"),
]


class RefusalTests(SynchronousTestCase):
    """Every bad file: refused, one line, ``file: key: reason``."""

    def setUp(self) -> None:
        self.directory = Path(self.mktemp())
        self.directory.mkdir()

    def write(self, case: Bad) -> str:
        path = self.directory / f"{case.program}-{case.name}.toml"
        text = case.text()
        if isinstance(text, bytes):
            path.write_bytes(text)
        else:
            path.write_text(text, encoding="utf-8")
        return str(path)

    def test_the_bases_load(self) -> None:
        """The valid files the cases change load: each refusal is the change's."""
        for program, base in BASES.items():
            path = self.directory / f"{program}.toml"
            path.write_text(base + (PEER if program == "balancer" else ""))
            LOADERS[program](str(path))

    def test_enough_cases(self) -> None:
        """At least 50 files, for every program, and no name twice."""
        self.assertGreaterEqual(len(CASES), 50)
        self.assertEqual({c.program for c in CASES}, set(BASES))
        self.assertEqual(len({(c.program, c.name) for c in CASES}), len(CASES))

    def test_every_bad_file_is_refused_in_one_line(self) -> None:
        """``str(error)`` is exactly ``FILE: KEY: REASON`` on one line; the reason says
        what is wrong; nothing else escapes (no RecursionError, MemoryError...)."""
        wrong = []
        for case in CASES:
            path = self.write(case)
            label = f"{case.program}/{case.name}"
            try:
                LOADERS[case.program](path)
            except ConfigError as e:
                text = str(e)
                if (
                    (e.path, e.key) != (path, case.key)
                    or case.reason not in e.reason
                    or text != f"{path}: {case.key}: {e.reason}"
                    or "\n" in text
                    or len(text) > len(path) + 400
                ):
                    wrong.append(f"{label}: {text[:300]}")
            else:
                wrong.append(f"{label}: accepted")
        self.assertEqual(wrong, [])

    def test_the_file_name_is_the_one_given(self) -> None:
        """A relative name is reported as given (what the operator typed)."""
        self.write(CASES[0])
        self.addCleanup(os.chdir, os.getcwd())
        os.chdir(self.directory)
        with self.assertRaises(ConfigError) as caught:
            load_config("balancer-syntax.toml")
        self.assertTrue(str(caught.exception).startswith("balancer-syntax.toml: (syntax): "))
