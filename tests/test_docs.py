"""The documentation's recipes, run; its index and links, checked; the changelog, built.

A shell block whose info string is ``sh test`` (```` ```sh test ````) is a recipe this
module runs; words after ``test`` say how:

* ``lab=ROLE``: inside that namespace of a running lab (``lbproxy.lab``), with
  ``lbproxyctl`` on the path and ``$LBPROXY_CTL_SOCKET`` naming the lab balancer's socket;
* ``traffic``: while terminals of the lab send traffic (a capture waits for a packet).

A block of ``nft test`` is an nftables ruleset, checked with ``nft -c`` in a namespace of
its own.  The tutorial's blocks run in order, as one script, in a copy of the checkout with
``$HOME`` in a temporary directory: the wheel is built and installed from there, the lab
started, a terminal moved, the lab torn down.  Root is needed for namespaces; without it
(or a tool) the test says why it skips.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import attrs
from twisted.trial.unittest import SkipTest, SynchronousTestCase

ROOT = Path(__file__).resolve().parent.parent
DOCS = ROOT / "docs"
VENV_BIN = Path(sys.executable).parent
FENCE = re.compile(r"^```([^\n`]*)\n(.*?)^```[ \t]*$", re.M | re.S)
#: The pages written by need (docs/index.md's four sections) and what they must hold.
SECTIONS = ("## Tutorial", "## How-to guides", "## Reference", "## Explanation")
HOWTOS = ("install", "systemd", "nftables", "certificates", "several-balancers", "logging",
          "alerting", "upgrades", "troubleshooting")


@attrs.frozen
class Block:
    """One fenced block of a Markdown file."""

    path: Path
    line: int
    lang: str
    options: tuple[str, ...]
    text: str

    def option(self, name: str) -> str | None:
        for word in self.options:
            key, _, value = word.partition("=")
            if key == name:
                return value or "yes"
        return None

    @property
    def where(self) -> str:
        return f"{self.path.relative_to(ROOT)}:{self.line}"


def blocks(path: Path) -> list[Block]:
    """The fenced blocks of ``path``, with their info strings split."""
    text = path.read_text()
    found = []
    for match in FENCE.finditer(text):
        info = match[1].split()
        found.append(Block(path, text.count("\n", 0, match.start()) + 1,
                           info[0] if info else "", tuple(info[1:]), match[2]))
    return found


def recipes(path: Path, lang: str = "sh") -> list[Block]:
    """The blocks of ``path`` marked to be run."""
    return [b for b in blocks(path) if b.lang == lang and b.option("test")]


def _need_root(*tools: str) -> None:
    if os.geteuid() != 0:
        raise SkipTest("the recipe needs root (network namespaces)")
    missing = [t for t in tools if shutil.which(t) is None]
    if missing:
        raise SkipTest(f"the recipe needs {', '.join(missing)} (Debian: `make system-deps`, "
                       "and curl)")
    if not os.path.exists("/dev/net/tun"):
        raise SkipTest("the lab needs /dev/net/tun")


def _lab(directory: Path, *args: str, timeout: float = 180) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "lbproxy.lab", "--dir", str(directory), *args],
                          capture_output=True, text=True, timeout=timeout, check=False)


class IndexTests(SynchronousTestCase):
    """docs/index.md is organised by need and reaches every page; links resolve."""

    def test_four_sections_and_every_page(self) -> None:
        index = (DOCS / "index.md").read_text()
        positions = [index.find(heading) for heading in SECTIONS]
        self.assertNotIn(-1, positions, SECTIONS)
        self.assertEqual(positions, sorted(positions))
        linked = set(re.findall(r"\]\(([^)#]+\.md)\)", index))
        pages = {str(p.relative_to(DOCS)) for p in DOCS.rglob("*.md")} - {"index.md"}
        self.assertEqual(sorted(pages - linked), [], "pages the index does not link")
        for name in HOWTOS:
            self.assertIn(f"howto/{name}.md", linked)

    def test_links_resolve(self) -> None:
        """Every relative link of the pages written by need points at a file that exists
        (and an anchor-free ``.md`` link at a page)."""
        pages = [DOCS / "index.md", DOCS / "tutorial.md", DOCS / "glossary.md",
                 DOCS / "deploying.md", *sorted((DOCS / "howto").glob("*.md"))]
        for page in pages:
            for target in re.findall(r"\]\(([^)\s]+)\)", page.read_text()):
                if re.match(r"[a-z]+:", target) or target.startswith("#"):
                    continue
                path = (page.parent / target.split("#")[0]).resolve()
                self.assertTrue(path.exists(), f"{page.relative_to(ROOT)}: {target}")

    def test_recipes_are_marked(self) -> None:
        """The install, first-run and troubleshooting recipes are marked to be run."""
        tutorial = "\n".join(b.text for b in recipes(DOCS / "tutorial.md"))
        for step in ("pip install -q ~/dist/lbproxy-", "lbproxy.lab up", "lab traffic",
                     "lab ctl show", "lbproxy.lab down"):
            self.assertIn(step, tutorial)
        trouble = "\n".join(b.text for b in recipes(DOCS / "howto" / "troubleshooting.md"))
        self.assertIn("lbproxyctl trace -", trouble)
        self.assertTrue(recipes(DOCS / "howto" / "certificates.md"))
        self.assertTrue(recipes(DOCS / "howto" / "nftables.md", "nft"))


class TutorialTests(SynchronousTestCase):
    """docs/tutorial.md, every marked block in order, as root, from a fresh copy."""

    def test_tutorial(self) -> None:
        _need_root("ip", "nft", "ethtool", "tcpdump", "curl", "git")
        work = Path(tempfile.mkdtemp(prefix="lbproxy-tutorial-"))
        self.addCleanup(shutil.rmtree, work, ignore_errors=True)
        source, home, lab = work / "src", work / "home", work / "lab"
        home.mkdir()
        _copy_checkout(source)
        self.addCleanup(_lab, lab, "down")
        script = "\n".join(f"# {b.where}\n{b.text}" for b in recipes(DOCS / "tutorial.md"))
        env = _clean_env(HOME=str(home), LBPROXY_LAB_DIR=str(lab))
        result = subprocess.run(["bash", "-euo", "pipefail", "-c", script], cwd=source,
                                env=env, capture_output=True, text=True, timeout=1800,
                                check=False)  # fmt: skip
        output = result.stdout + result.stderr
        self.assertEqual(result.returncode, 0, output[-6000:])
        # What the tutorial tells the reader they will see.
        for line in ("lbproxy-homeagent", "lbproxy-terminal", "lbproxyctl 0.",
                     "lbproxy lab running", "-> 2001:db8:a2::1001 -> 2001:db8:a3::1001",
                     "session intact", "1/1 sessions intact", "2001:db8:100::1001",
                     "lbproxy_backend_up{backend=\"b1\"} 1.0",
                     "Lab removed: processes stopped, namespaces deleted."):
            self.assertIn(line, output)
        rows = [r for r in output.splitlines() if r.startswith("addr  addr 2001:db8:100::1001")
                and "2001:db8:a3::1001" in r]
        self.assertTrue(rows, output[-6000:])
        self.assertIn(" yes ", rows[-1])  # the care-of address confirmed by the agent
        self.assertFalse((lab / "lab.json").exists())


class TroubleshootingTests(SynchronousTestCase):
    """docs/howto/troubleshooting.md's recipes in a running lab's balancer namespace."""

    def test_recipes_in_the_lab(self) -> None:
        _need_root("ip", "nft", "ethtool", "tcpdump")
        directory = Path(tempfile.mkdtemp(prefix="lbproxy-trouble-"))
        self.addCleanup(shutil.rmtree, directory, ignore_errors=True)
        self.addCleanup(_lab, directory, "down")
        up = _lab(directory, "up", "--terminals", "2")
        self.assertEqual(up.returncode, 0, up.stdout + up.stderr)
        state = json.loads((directory / "lab.json").read_text())
        traced = False
        for block in recipes(DOCS / "howto" / "troubleshooting.md"):
            role = block.option("lab")
            self.assertIsNotNone(role, f"{block.where}: runs where?")
            assert role is not None
            env = _clean_env(LBPROXY_CTL_SOCKET=state["control_socket"],
                             PATH=f"{VENV_BIN}:{os.environ.get('PATH', '')}")
            process = subprocess.Popen(
                ["ip", "netns", "exec", state["namespaces"][role], "bash", "-euo", "pipefail",
                 "-c", block.text], env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                text=True, cwd=directory)
            with _traffic(directory, block.option("traffic") is not None, process):
                output, _ = process.communicate(timeout=120)
            self.assertEqual(process.returncode, 0, f"{block.where}:\n{output}")
            if "lbproxyctl trace -" in block.text:
                traced = True
                self.assertRegex(output, r"strategy: hoa\nkey: addr 2001:db8:100::100[12]\n"
                                         r"backend: b[123]\n")
        self.assertTrue(traced)

    def test_hex_from_tcpdump(self) -> None:
        """The recipe's filter turns ``tcpdump -x`` output into exactly the packet's bytes
        from its IPv6 header on (-x leaves the link-layer header out); the offsets and the
        summary line, which ``lbproxyctl trace -`` cannot read, are gone."""
        if shutil.which("tcpdump") is None:
            raise SkipTest("no tcpdump")
        from scapy.layers.inet import TCP
        from scapy.layers.inet6 import HAO, IPv6, IPv6ExtHdrDestOpt
        from scapy.layers.l2 import Ether
        from scapy.utils import wrpcap

        packet = (IPv6(src="2001:db8:a1::1001", dst="2001:db8:5::80")
                  / IPv6ExtHdrDestOpt(options=[HAO(hoa="2001:db8:100::1001")])
                  / TCP(sport=40000, dport=80, flags="S") / (b"x" * 37))
        path = Path(self.mktemp() + ".pcap")
        wrpcap(str(path), [Ether(src="02:00:00:00:f0:01", dst="02:00:00:00:f0:02") / packet])
        (block,) = [b for b in recipes(DOCS / "howto" / "troubleshooting.md")
                    if "lbproxyctl trace -" in b.text]
        (line,) = [x for x in block.text.splitlines() if "tcpdump -r" in x]
        pipeline = line.split("| lbproxyctl trace -")[0].replace("/tmp/one.pcap", str(path))
        result = subprocess.run(["bash", "-o", "pipefail", "-c", pipeline], capture_output=True,
                                text=True, timeout=60, check=False)  # fmt: skip
        self.assertEqual(result.returncode, 0, result.stderr)
        self.assertEqual(bytes.fromhex("".join(result.stdout.split())), bytes(packet))
        raw = subprocess.run(["tcpdump", "-r", str(path), "-x"], capture_output=True,
                             text=True, timeout=60, check=False).stdout  # fmt: skip
        self.assertIn("0x0000:", raw)  # what the filter is there for


class CertificatesTests(SynchronousTestCase):
    """docs/howto/certificates.md: the openssl recipe makes certificates lbproxy accepts,
    each for its role only."""

    def test_recipe(self) -> None:
        if shutil.which("openssl") is None:
            raise SkipTest("no openssl")
        from cryptography import x509

        from lbproxy.notify.tls import CLIENT_AUTH, SERVER_AUTH, TlsMaterial, check_certificate

        work = Path(self.mktemp())
        work.mkdir()
        script = "\n".join(b.text for b in recipes(DOCS / "howto" / "certificates.md"))
        result = subprocess.run(["bash", "-euo", "pipefail", "-c", script], cwd=work,
                                capture_output=True, text=True, timeout=120, check=False)
        self.assertEqual(result.returncode, 0, result.stdout + result.stderr)
        pki = work / "pki"

        def cert(name: str) -> x509.Certificate:
            return x509.load_pem_x509_certificate((pki / f"{name}.pem").read_bytes())

        home = bytes.fromhex("20010db8010000000000000000000016")
        self.assertTrue(check_certificate(cert("lb1"), ["lb1.example.net"], CLIENT_AUTH).accepted)
        self.assertTrue(check_certificate(cert("ha1"), ["ha1.example.net"], SERVER_AUTH).accepted)
        self.assertTrue(check_certificate(cert("t1"), ["t1.example.net"], SERVER_AUTH,
                                          [home]).accepted)
        # Each only for its role, and the terminal's only with its home address.
        self.assertFalse(check_certificate(cert("ha1"), ["ha1.example.net"],
                                           CLIENT_AUTH).accepted)
        self.assertFalse(check_certificate(cert("lb1"), ["lb1.example.net"],
                                           SERVER_AUTH).accepted)
        self.assertFalse(check_certificate(cert("ha1"), ["ha1.example.net"], SERVER_AUTH,
                                           [home]).accepted)
        self.assertFalse(check_certificate(cert("ca"), ["lbproxy deployment CA"],
                                           SERVER_AUTH).accepted)
        for name in ("lb1", "ha1", "t1"):  # certificate and key belong together
            TlsMaterial.from_files(str(pki / "ca.pem"), str(pki / f"{name}.pem"),
                                   str(pki / f"{name}.key"))
            self.assertEqual((pki / f"{name}.key").stat().st_mode & 0o077, 0, name)
        self.assertIn("t1.pem: OK", result.stdout)


class NftablesTests(SynchronousTestCase):
    """docs/howto/nftables.md: the ruleset loads (``nft -c``, in a namespace of its own)."""

    def test_rules_parse(self) -> None:
        _need_root("ip", "nft")
        rulesets = recipes(DOCS / "howto" / "nftables.md", "nft")
        self.assertTrue(rulesets)
        for block in rulesets:
            with _namespace() as namespace:
                result = subprocess.run(["ip", "netns", "exec", namespace, "nft", "-c", "-f",
                                         "-"], input=block.text, capture_output=True,
                                        text=True, timeout=60, check=False)  # fmt: skip
            self.assertEqual(result.returncode, 0, f"{block.where}: {result.stderr}")


class ChangelogTests(SynchronousTestCase):
    """towncrier renders changelog.d/; ``make changelog`` writes CHANGELOG.md from it."""

    def towncrier(self) -> str:
        towncrier = VENV_BIN / "towncrier"
        if not towncrier.exists():
            raise SkipTest(f"no towncrier in {VENV_BIN} (the dev extras install it)")
        return str(towncrier)

    def fragments(self) -> list[Path]:
        return sorted(p for p in (ROOT / "changelog.d").glob("*.md") if p.name != "README.md")

    def test_draft_builds(self) -> None:
        """``towncrier build --draft`` succeeds and shows every fragment's issue."""
        result = subprocess.run([self.towncrier(), "build", "--draft", "--version", "0.0.0"],
                                cwd=ROOT, capture_output=True, text=True, timeout=120,
                                check=False)  # fmt: skip
        self.assertEqual(result.returncode, 0, result.stderr)
        for fragment in self.fragments():
            issue, kind = fragment.name.split(".")[:2]
            self.assertIn(kind, ("feature", "bugfix", "doc", "removal", "misc"), fragment)
            self.assertIn(f"(#{issue})", result.stdout)

    def test_make_changelog(self) -> None:
        """In a copy: ``make changelog`` puts the fragments into CHANGELOG.md's unreleased
        section and keeps them; again, the file does not change."""
        self.towncrier()
        if shutil.which("make") is None:
            raise SkipTest("no make")
        work = Path(self.mktemp())
        work.mkdir()
        for name in ("Makefile", "pyproject.toml", "setup.cfg", "CHANGELOG.md"):
            shutil.copy(ROOT / name, work / name)
        shutil.copytree(ROOT / "changelog.d", work / "changelog.d")
        shutil.copytree(ROOT / "lbproxy", work / "lbproxy",
                        ignore=shutil.ignore_patterns("__pycache__", "*.o"))
        venv = VENV_BIN.parent
        make = ["make", "--no-print-directory", f"VENV={venv}", "-o", f"{venv}/.installed",
                "changelog"]
        first = subprocess.run(make, cwd=work, capture_output=True, text=True, timeout=300,
                               check=False)  # fmt: skip
        self.assertEqual(first.returncode, 0, first.stdout + first.stderr)
        text = (work / "CHANGELOG.md").read_text()
        unreleased = text.split("<!-- unreleased start -->")[1].split("<!-- unreleased end -->")[0]
        self.assertIn("(unreleased)", unreleased)
        for fragment in self.fragments():
            first_line = fragment.read_text().splitlines()[0]
            self.assertIn(first_line, unreleased)
            self.assertTrue((work / "changelog.d" / fragment.name).exists())
        subprocess.run(make, cwd=work, capture_output=True, timeout=300, check=True)
        self.assertEqual((work / "CHANGELOG.md").read_text(), text)


def _clean_env(**extra: str) -> dict[str, str]:
    """The environment of a recipe: this process's, without the checkout's virtual
    environment or Python path, with ``/usr/sbin`` on the path (ip, nft)."""
    env = {k: v for k, v in os.environ.items()
           if k not in ("PYTHONPATH", "VIRTUAL_ENV", "LBPROXY_CTL_SOCKET")}
    path = [p for p in env.get("PATH", "/usr/bin:/bin").split(":") if p != str(VENV_BIN)]
    for extra_dir in ("/usr/local/sbin", "/usr/sbin", "/sbin"):
        if extra_dir not in path:
            path.append(extra_dir)
    env["PATH"] = ":".join(path)
    env.update(extra)
    return env


def _copy_checkout(target: Path) -> None:
    """The checkout's files (tracked, and new ones not ignored: what a clone of the
    next commit has) into ``target``."""
    files = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
                           cwd=ROOT, capture_output=True,
                           check=True).stdout.decode()  # fmt: skip
    for name in filter(None, files.split("\0")):
        source = ROOT / name
        if source.is_file():
            (target / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source, target / name)


@contextlib.contextmanager
def _traffic(directory: Path, wanted: bool, process: subprocess.Popen[str]) -> Iterator[None]:
    """While ``process`` runs (and ``wanted``), lab terminals open sessions now and then."""
    done = threading.Event()

    def loop() -> None:
        time.sleep(1.0)  # let a capture start first
        while not done.is_set() and process.poll() is None:
            _lab(directory, "traffic", "--terminals", "1-2", "--chunks", "2", timeout=60)
            done.wait(0.5)

    thread = threading.Thread(target=loop, daemon=True)
    if wanted:
        thread.start()
    try:
        yield
    finally:
        done.set()
        if wanted:
            thread.join(90)


@contextlib.contextmanager
def _namespace() -> Iterator[str]:
    name = f"lbdoc{os.getpid() % 100000}"
    subprocess.run(["ip", "netns", "del", name], capture_output=True, check=False)
    subprocess.run(["ip", "netns", "add", name], check=True)
    try:
        yield name
    finally:
        subprocess.run(["ip", "netns", "del", name], capture_output=True, check=False)
