"""The operator kit: the alert rules and the dashboard in etc/, and ``make lab``.

* Every metric the rules (``etc/prometheus-lbproxy-alerts.yml``) and the dashboard
  (``etc/grafana-lbproxy.json``) name is one the exporter really produces -- read from a
  scrape of the balancer's own service tree, built from a configuration with health checks
  and notifications -- and so is every label value they select on.
* ``promtool check rules`` and ``promtool test rules`` (each alert fires on the series it is
  for, after its ``for:``, and not on a healthy balancer) when promtool is installed.
* The lab (lbproxy/lab.py) starts, answers ``lbproxyctl``, and ``down`` removes everything
  -- also when its keeper process was killed.  Root only.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import yaml
from prometheus_client.exposition import generate_latest
from prometheus_client.parser import text_string_to_metric_families
from scapy.layers.inet import UDP
from scapy.layers.inet6 import HAO, IPv6, IPv6ExtHdrDestOpt
from twisted.internet.testing import MemoryReactorClock
from twisted.trial.unittest import SkipTest, SynchronousTestCase
from twisted.web.server import Site

from lbproxy.config import load_config
from lbproxy.notify.pki import CertificateAuthority
from lbproxy.tap import BalancerService
from lbproxy.testing import MemoryPacketSystem

ROOT = Path(__file__).resolve().parent.parent
RULES = ROOT / "etc" / "prometheus-lbproxy-alerts.yml"
DASHBOARD = ROOT / "etc" / "grafana-lbproxy.json"
#: Series Prometheus makes itself, not the exporter.
PROMETHEUS_OWN = {"up"}
#: Series the exporter produces only on a real Linux host, with the family name as it is
#: written in lbproxy/ops/metrics.py (checked there instead).
CONDITIONAL = {"lbproxy_fast_path_packets_total": "_fast_path_packets"}
SEVERITIES = {"critical", "warning", "info"}

CONFIG = """
[balancer]
key_chain = ["hoa", "src"]
[virtual]
addresses = ["2001:db8:5::80"]
[interfaces]
client = "lbc"
server = "lbs"
[[backend]]
name = "srv1"
address = "2001:db8:b0::11"
health = "tcp"
health_port = 80
[[backend]]
name = "srv2"
address = "2001:db8:b0::12"
health = "tcp"
health_port = 80
[metrics]
endpoint = "tcp:0:interface=127.0.0.1"
[notify]
enabled = true
ca = "{ca}"
certificate = "{cert}"
key = "{key}"
[[notify.peer]]
name = "ha1"
kind = "homeagent"
endpoint = 'tcp:host=2001\\:db8\\:100\\:\\:1:port=7440'
identity = "ha1.example.net"
prefixes = ["2001:db8:100::/64"]
"""


def _packet(home: str, care_of: str) -> bytes:
    return bytes(IPv6(src=care_of, dst="2001:db8:5::80")
                 / IPv6ExtHdrDestOpt(options=[HAO(hoa=home)]) / UDP(dport=80) / b"x")


def scrape(test: SynchronousTestCase) -> str:
    """One scrape of the balancer's metrics page, from its real service tree: packets
    forwarded and dropped, health verdicts in, notifications configured."""
    directory = Path(test.mktemp())
    directory.mkdir()
    ca = CertificateAuthority("lbproxy kit test CA")
    ca_path, cert, key = ca.write(directory, "balancer", ca.issue(dns=["lb1.example.net"]))
    path = directory / "lbproxy.toml"
    path.write_text(CONFIG.format(ca=ca_path, cert=cert, key=key))
    system = MemoryPacketSystem(interfaces=("lbc", "lbs"))
    service = BalancerService(load_config(str(path)), MemoryReactorClock(),
                              install_sighup=False, system=system)  # fmt: skip
    service.privilegedStartService()
    service.startService()
    test.addCleanup(service.stopService)
    system.inject("lbc", _packet("2001:db8:100::1", "2001:db8:a1::1"))
    service.forwarder.client.doRead()
    service.balancer.set_backend_up("srv1", False)
    service.balancer.set_backend_up("srv2", True)
    for name in ("srv1", "srv2"):
        service.control.drain(name)
    # Another terminal, nowhere to go: dropped, no-backend.
    system.inject("lbc", _packet("2001:db8:100::2", "2001:db8:a1::2"))
    service.forwarder.client.doRead()
    sites = [s.factory for s in service if isinstance(getattr(s, "factory", None), Site)]
    test.assertEqual(len(sites), 1, "one metrics site in the service tree")
    registry = sites[0].resource.children[b"metrics"].registry
    return generate_latest(registry).decode()


def exported(text: str) -> dict[str, dict[str, set[str]]]:
    """Series names of a scrape (as PromQL sees them: counters with ``_total``), each
    with the values seen per label."""
    names: dict[str, dict[str, set[str]]] = {}
    suffix = {"counter": ["_total"], "info": ["_info"]}
    for family in text_string_to_metric_families(text):
        for name in [family.name + s for s in suffix.get(family.type, [""])]:
            names.setdefault(name, {})
        for sample in family.samples:
            labels = names.setdefault(sample.name, {})
            for label, value in sample.labels.items():
                labels.setdefault(label, set()).add(value)
    return names


_CLAUSES = re.compile(r"\b(by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)")
_KEYWORDS = {"and", "or", "unless", "bool", "offset", "by", "without", "on", "ignoring",
             "group_left", "group_right", "inf", "nan"}


def selectors(expr: str) -> list[tuple[str, list[tuple[str, str, str]]]]:
    """The series selectors of a PromQL (or Grafana) expression: name and matchers."""
    text = _CLAUSES.sub(" ", expr)
    text = re.sub(r"\[[^\]]*\]", "", text)  # ranges, Grafana's $__rate_interval
    found = []
    for match in re.finditer(r"([A-Za-z_:][A-Za-z0-9_:]*)\s*(\{[^}]*\})?\s*(\()?", text):
        name, braces, call = match.groups()
        if call or name in _KEYWORDS or text[max(0, match.start() - 1)] in "$.":
            continue
        matchers = re.findall(r'(\w+)\s*(=~|!~|!=|=)\s*"([^"]*)"', braces or "")
        found.append((name, matchers))
    return found


def rules() -> list[dict[str, Any]]:
    document = yaml.safe_load(RULES.read_text())
    return [rule for group in document["groups"] for rule in group["rules"]]


def dashboard_exprs() -> list[tuple[str, str]]:
    board = json.loads(DASHBOARD.read_text())
    return [(panel["title"], target["expr"]) for panel in board["panels"]
            for target in panel.get("targets", [])]


class MetricNamesTests(SynchronousTestCase):
    """The rules and the dashboard ask for what the exporter says."""

    def setUp(self) -> None:
        self.exported = exported(scrape(self))

    def check(self, where: str, expr: str) -> None:
        chosen = selectors(expr)
        self.assertTrue(chosen, f"{where}: no series in {expr!r}")
        for name, matchers in chosen:
            if name in PROMETHEUS_OWN:
                continue
            if name in CONDITIONAL:
                source = (ROOT / "lbproxy" / "ops" / "metrics.py").read_text()
                self.assertIn(f'f"{{PREFIX}}{CONDITIONAL[name]}"', source, where)
                continue
            self.assertIn(name, self.exported, f"{where}: {name} is not exported")
            for label, op, value in matchers:
                if label in ("instance", "job"):
                    continue  # Prometheus's target labels
                seen = self.exported[name].get(label)
                self.assertIsNotNone(seen, f"{where}: {name} has no label {label}")
                assert seen is not None
                wanted = value.split("|") if op in ("=~", "!~") else [value]
                for one in wanted:
                    self.assertIn(one, seen, f"{where}: {name}{{{label}}} is never {one!r} "
                                             f"(seen: {sorted(seen)})")

    def test_scrape_has_what_the_rules_are_about(self) -> None:
        """The scrape this test relies on has the drop, health and notification series
        (else the checks below would pass vacuously)."""
        self.assertIn("no-backend", self.exported["lbproxy_packets_dropped_total"]["reason"])
        self.assertEqual(self.exported["lbproxy_backend_up"]["backend"], {"srv1", "srv2"})
        self.assertIn("DISCONNECTED", self.exported["lbproxy_peer_state"]["state"])

    def test_selectors_parse(self) -> None:
        """The selector reader finds names and matchers, skips functions and clauses."""
        self.assertEqual(
            selectors('sum by (instance) (rate(a_total{reason=~"x|y", port!="z"}[5m])) '
                      '/ on(instance) b > 0.01 and up{job="lbproxy"} == 0'),
            [("a_total", [("reason", "=~", "x|y"), ("port", "!=", "z")]), ("b", []),
             ("up", [("job", "=", "lbproxy")])])

    def test_alert_rules_name_exported_series(self) -> None:
        for rule in rules():
            self.check(f"alert {rule['alert']}", rule["expr"])

    def test_dashboard_names_exported_series(self) -> None:
        exprs = dashboard_exprs()
        self.assertGreater(len(exprs), 20)
        for title, expr in exprs:
            self.check(f"panel {title!r}", expr)


def rendered_annotations(alert: str, labels: dict[str, str], value: float = 0.0) -> dict[str, str]:
    """``alert``'s annotations as Prometheus renders them for ``labels`` (the templates
    used in the file: ``{{ $labels.NAME }}`` and ``{{ $value | humanizePercentage }}``)."""
    (rule,) = [r for r in rules() if r["alert"] == alert]
    out = {}
    for name, template in rule["annotations"].items():
        text = re.sub(r"\{\{ \$labels\.(\w+) \}\}", lambda m: labels[m[1]], template)
        text = text.replace("{{ $value | humanizePercentage }}", f"{value * 100:g}%")
        out[name] = text
    return out


class AlertRulesTests(SynchronousTestCase):
    """The rules file as Prometheus reads it."""

    def test_every_rule_is_complete(self) -> None:
        """Each rule: a unique CamelCase name, a severity, a summary and a description."""
        names = [rule["alert"] for rule in rules()]
        self.assertEqual(len(names), len(set(names)))
        self.assertGreaterEqual(len(names), 10)
        for rule in rules():
            self.assertRegex(rule["alert"], r"^Lbproxy[A-Z][A-Za-z]+$")
            self.assertIn(rule["labels"]["severity"], SEVERITIES, rule["alert"])
            self.assertTrue(rule["annotations"]["summary"], rule["alert"])
            self.assertTrue(rule["annotations"]["description"], rule["alert"])

    def promtool(self) -> str:
        promtool = shutil.which("promtool")
        if promtool is None:
            raise SkipTest("no promtool (Debian package prometheus; `make system-deps` "
                           "installs it as root); the YAML and names are checked above")
        return promtool

    def test_promtool_check(self) -> None:
        result = subprocess.run([self.promtool(), "check", "rules", str(RULES)],
                                capture_output=True, text=True, timeout=120, check=False)
        self.assertEqual(result.returncode, 0, result.stdout + result.stderr)
        self.assertIn(f"SUCCESS: {len(rules())} rules found", result.stdout)

    def test_alerts_fire_when_they_should(self) -> None:
        """promtool's rule tests: made-up series, the alerts expected at given times --
        each fires after its ``for:``, none on a healthy balancer."""
        promtool = self.promtool()
        directory = Path(self.mktemp())
        directory.mkdir()
        shutil.copy(RULES, directory / "rules.yml")
        i = 'instance="lb1:9464", job="lbproxy"'

        def fires(when: str, alert: str, severity: str, value: float = 0.0,
                  **labels: str) -> dict[str, Any]:
            labels = {"instance": "lb1:9464", **labels}
            return {"eval_time": when, "alertname": alert, "exp_alerts": [{
                "exp_labels": {"severity": severity, **labels},
                "exp_annotations": rendered_annotations(alert, labels, value)}]}
        tests = {
            "rule_files": ["rules.yml"],
            "evaluation_interval": "1m",
            "tests": [
                {   # healthy: traffic flows, backends up, no loss, peer subscribed
                    "interval": "1m",
                    "input_series": [
                        {"series": f"up{{{i}}}", "values": "1x30"},
                        {"series": f"lbproxy_packets_in_total{{{i}}}", "values": "0+600x30"},
                        {"series": f"lbproxy_packets_out_total{{{i}}}", "values": "0+600x30"},
                        {"series": f'lbproxy_backend_up{{{i}, backend="srv1"}}',
                         "values": "1x30"},
                        {"series": f"lbproxy_port_received_total{{{i}, port=\"client\"}}",
                         "values": "0+600x30"},
                        {"series": f'lbproxy_port_lost_total{{{i}, port="client", '
                                   'reason="kernel-queue-full"}', "values": "0x30"},
                        {"series": f"lbproxy_table_bindings{{{i}}}", "values": "500x30"},
                        {"series": f"lbproxy_table_capacity{{{i}}}", "values": "1000x30"},
                        {"series": f'lbproxy_peer_state{{{i}, peer="ha1", '
                                   'state="SUBSCRIBED"}', "values": "1x30"},
                    ],
                    "alert_rule_test": [{"eval_time": f"{m}m", "alertname": name,
                                         "exp_alerts": []}
                                        for m in (10, 25) for name in (
                        "LbproxyDown", "LbproxyNotForwarding", "LbproxyBackendDown",
                        "LbproxyAllBackendsDown", "LbproxyPacketsLost",
                        "LbproxyTableNearlyFull", "LbproxyRestarted",
                        "LbproxyNotificationPeerDisconnected")],
                },
                {   # trouble
                    "interval": "1m",
                    "input_series": [
                        {"series": f"up{{{i}}}", "values": "1x5 0x10"},
                        {"series": f'lbproxy_backend_up{{{i}, backend="srv1"}}',
                         "values": "1x5 0x10"},
                        {"series": f'lbproxy_backend_up{{{i}, backend="srv2"}}',
                         "values": "1x10"},
                        {"series": f"lbproxy_packets_in_total{{{i}}}", "values": "0+600x15"},
                        {"series": f"lbproxy_packets_out_total{{{i}}}",
                         "values": "0+600x3 1800x12"},
                        {"series": f"lbproxy_port_received_total{{{i}, port=\"client\"}}",
                         "values": "0+1000x20"},
                        {"series": f'lbproxy_port_lost_total{{{i}, port="client", '
                                   'reason="kernel-queue-full"}', "values": "0+50x20"},
                        {"series": f"lbproxy_table_bindings{{{i}}}", "values": "950x30"},
                        {"series": f"lbproxy_table_capacity{{{i}}}", "values": "1000x30"},
                        {"series": f'lbproxy_peer_state{{{i}, peer="ha1", '
                                   'state="DISCONNECTED"}', "values": "1x10"},
                    ],
                    "alert_rule_test": [
                        {"eval_time": "5m", "alertname": "LbproxyBackendDown",
                         "exp_alerts": []},
                        fires("9m", "LbproxyBackendDown", "warning", job="lbproxy",
                              backend="srv1"),
                        fires("8m", "LbproxyDown", "critical", job="lbproxy"),
                        fires("14m", "LbproxyNotForwarding", "critical"),
                        fires("16m", "LbproxyPacketsLost", "warning"),
                        fires("16m", "LbproxyTableNearlyFull", "warning", value=0.95,
                              job="lbproxy"),
                        fires("6m", "LbproxyNotificationPeerDisconnected", "warning",
                              job="lbproxy", peer="ha1", state="DISCONNECTED"),
                    ],
                },
            ],
        }
        (directory / "tests.yml").write_text(yaml.safe_dump(tests, sort_keys=False))
        result = subprocess.run([promtool, "test", "rules", "tests.yml"], cwd=directory,
                                capture_output=True, text=True, timeout=120, check=False)
        self.assertEqual(result.returncode, 0, result.stdout + result.stderr)
        self.assertIn("SUCCESS", result.stdout)


class DashboardTests(SynchronousTestCase):
    """The Grafana dashboard is importable as it is."""

    def test_structure(self) -> None:
        board = json.loads(DASHBOARD.read_text())
        self.assertEqual((board["title"], board["uid"]), ("lbproxy", "lbproxy-overview"))
        ids = [panel["id"] for panel in board["panels"]]
        self.assertEqual(len(ids), len(set(ids)))
        variables = {v["name"]: v for v in board["templating"]["list"]}
        self.assertEqual(variables["datasource"]["type"], "datasource")
        cells: set[tuple[int, int]] = set()
        for panel in board["panels"]:
            grid = panel["gridPos"]
            self.assertLessEqual(grid["x"] + grid["w"], 24, panel["title"])
            covered = {(grid["y"] + dy, grid["x"] + dx)
                       for dy in range(grid["h"]) for dx in range(grid["w"])}
            self.assertFalse(covered & cells, f"{panel['title']} overlaps another panel")
            cells |= covered
            if panel["type"] != "row":
                self.assertEqual(panel["datasource"]["uid"], "${datasource}", panel["title"])
                self.assertTrue(panel["targets"], panel["title"])


def _lab(directory: Path, *args: str, timeout: float = 180) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "lbproxy.lab", "--dir", str(directory), *args],
                          capture_output=True, text=True, timeout=timeout, check=False)


def _namespaces() -> set[str]:
    try:
        return set(os.listdir("/run/netns"))
    except FileNotFoundError:
        return set()


class LabTests(SynchronousTestCase):
    """``make lab`` / ``make lab-down``: what runs, and that nothing is left."""

    def setUp(self) -> None:
        from lbproxy.testbed.netns import BedUnavailableError, check_host

        try:
            check_host()
        except BedUnavailableError as exc:
            raise SkipTest(str(exc)) from None
        self.directory = Path(tempfile.mkdtemp(prefix="lbproxy-lab-test-"))
        self.addCleanup(shutil.rmtree, self.directory, ignore_errors=True)
        self.addCleanup(_lab, self.directory, "down")

    def test_up_use_down_and_down_after_a_crash(self) -> None:
        """``up`` returns with everything running and says how to tear it down; the
        balancer answers; a second ``up`` says one runs; after the keeper is killed
        (SIGKILL: no clean-up of its own) ``down`` still stops every process and deletes
        every namespace."""
        up = _lab(self.directory, "up", "--terminals", "2", "--no-agent")
        self.assertEqual(up.returncode, 0, up.stdout + up.stderr)
        self.assertIn("down", up.stdout.splitlines()[-1])
        state = json.loads((self.directory / "lab.json").read_text())
        self.assertEqual(set(state["namespaces"].values()) - _namespaces(), set())
        backends = _lab(self.directory, "ctl", "--json", "backends")
        self.assertEqual(backends.returncode, 0, backends.stderr)
        self.assertEqual(sorted(b["name"] for b in json.loads(backends.stdout)),
                         ["b1", "b2", "b3"])
        again = _lab(self.directory, "up")
        self.assertIn("already running", again.stdout)

        os.kill(state["keeper"], signal.SIGKILL)
        time.sleep(0.5)
        down = _lab(self.directory, "down")
        self.assertEqual(down.returncode, 0, down.stdout + down.stderr)
        self.assertEqual(set(state["namespaces"].values()) & _namespaces(), set())
        self.assertFalse((self.directory / "lab.json").exists())
        for pid in state["processes"].values():
            self.assertFalse(_running(pid), f"pid {pid} still runs")
        self.assertIn("No lab running", _lab(self.directory, "down").stdout)


def _running(pid: int) -> bool:
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except FileNotFoundError:
        return False
    return "\nState:\tZ" not in status
