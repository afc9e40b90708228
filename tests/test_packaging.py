"""The distribution an operator installs: built from this checkout, installed elsewhere.

``pip install lbproxy`` must give a ``twistd`` that knows the lbproxy commands.  The
twistd plugins live in ``twisted/plugins/`` (a directory without ``__init__.py`` that
merges into Twisted's own plugin package); a packaging configuration that forgets it
builds a wheel that installs and imports fine, and whose ``twistd`` then answers
"Unknown command: lbproxy".  Only installing the built artefacts into a fresh virtual
environment, outside the checkout, shows that.
"""

from __future__ import annotations

import atexit
import functools
import os
import re
import shutil
import subprocess
import sys
import tarfile
import tempfile
import zipfile
from pathlib import Path

import attrs
from twisted.trial.unittest import SynchronousTestCase

import lbproxy

CHECKOUT = Path(__file__).resolve().parent.parent
PLUGINS = sorted(p.name for p in (CHECKOUT / "twisted" / "plugins").glob("*.py"))


def _run(argv: list[str], cwd: Path, timeout: float = 600) -> subprocess.CompletedProcess[str]:
    """Run a command with an environment that cannot see the checkout."""
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    return subprocess.run(
        argv, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout, check=False
    )


@attrs.frozen
class Built:
    """The artefacts built once for the whole module, and the venv the wheel went into."""

    work: Path
    wheel: Path
    sdist: Path
    venv: Path


@functools.cache
def _build() -> Built:
    """Build sdist and wheel from the tracked files, install the wheel in a fresh venv.

    trial has no setUpClass: the first test pays, the others reuse it, and the directory
    goes at interpreter exit.
    """
    work = Path(tempfile.mkdtemp(prefix="lbproxy-dist-"))
    atexit.register(shutil.rmtree, work, ignore_errors=True)
    # Copy the tracked tree only, so that a developer's build/ or dropin.cache cannot
    # hide a packaging fault.
    tree = work / "src"
    files = subprocess.run(
        ["git", "ls-files", "-z"], cwd=CHECKOUT, capture_output=True, check=True
    ).stdout.decode()
    for name in filter(None, files.split("\0")):
        source = CHECKOUT / name
        if source.exists():
            (tree / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source, tree / name)
    dist = work / "dist"
    built = _run([sys.executable, "-m", "build", "--outdir", str(dist), str(tree)], work)
    if built.returncode:
        raise AssertionError(f"python -m build failed:\n{built.stdout}\n{built.stderr}")
    (wheel,) = dist.glob("*.whl")
    (sdist,) = dist.glob("*.tar.gz")
    venv = work / "venv"
    made = _run([sys.executable, "-m", "venv", str(venv)], work)
    if made.returncode:
        raise AssertionError(f"venv failed:\n{made.stderr}")
    pip = _run([str(venv / "bin" / "pip"), "install", "-q", str(wheel)], work)
    if pip.returncode:
        raise AssertionError(f"pip install of the wheel failed:\n{pip.stdout}\n{pip.stderr}")
    return Built(work=work, wheel=wheel, sdist=sdist, venv=venv)


class BuiltDistributionTests(SynchronousTestCase):
    """The sdist and the wheel carry the plugins; the wheel installs a working twistd."""

    def setUp(self) -> None:
        built = _build()
        self.work, self.wheel, self.sdist, self.venv = (
            built.work, built.wheel, built.sdist, built.venv
        )

    def test_wheel_has_the_plugins(self) -> None:
        """Every twisted/plugins/*.py of the checkout is in the wheel, and no __init__.py."""
        with zipfile.ZipFile(self.wheel) as z:
            names = set(z.namelist())
        for plugin in PLUGINS:
            self.assertIn(f"twisted/plugins/{plugin}", names)
        self.assertNotIn("twisted/plugins/__init__.py", names)
        self.assertNotIn("twisted/__init__.py", names)

    def test_sdist_has_the_plugins(self) -> None:
        """The sdist carries the plugins too (a wheel built from it would lack them)."""
        with tarfile.open(self.sdist) as t:
            names = {n.split("/", 1)[1] for n in t.getnames() if "/" in n}
        for plugin in PLUGINS:
            self.assertIn(f"twisted/plugins/{plugin}", names)

    def test_twistd_knows_every_command(self) -> None:
        """The installed twistd lists and runs each lbproxy subcommand's --help."""
        twistd = str(self.venv / "bin" / "twistd")
        listing = _run([twistd, "--help"], self.work)
        for command in ("lbproxy", "lbproxy-homeagent", "lbproxy-terminal"):
            self.assertIn(command, listing.stdout)
            answer = _run([twistd, command, "--help"], self.work, timeout=120)
            self.assertEqual(answer.returncode, 0, answer.stderr)
            self.assertIn("--config", answer.stdout, answer.stderr)

    def test_documentation_installed(self) -> None:
        """The unit's Documentation= path exists in the installed tree."""
        unit = (CHECKOUT / "etc" / "lbproxy.service").read_text()
        (line,) = [x for x in unit.splitlines() if x.startswith("Documentation=")]
        path = line.split("file:///opt/lbproxy/venv/", 1)[1]
        self.assertTrue((self.venv / path).is_file(), path)
        self.assertTrue((self.venv / "share/lbproxy/etc/lbproxy.toml").is_file())
        # every page of docs/ the installed index links to is installed too
        index = (self.venv / "share/doc/lbproxy/index.md").read_text()
        for link in re.findall(r"\]\(([^)#.][^)#]*\.md)\)", index):
            self.assertTrue((self.venv / "share/doc/lbproxy" / link).is_file(), link)
        for extra in ("grafana-lbproxy.json", "prometheus-lbproxy-alerts.yml"):
            self.assertTrue((self.venv / "share/lbproxy/etc" / extra).is_file(), extra)

    def test_lbproxyctl_version(self) -> None:
        """The installed lbproxyctl reports the package's one version."""
        answer = _run([str(self.venv / "bin" / "lbproxyctl"), "--version"], self.work)
        self.assertEqual(answer.returncode, 0, answer.stderr)
        self.assertEqual(answer.stdout.strip(), f"lbproxyctl {lbproxy.__version__}")
        with zipfile.ZipFile(self.wheel) as z:
            meta = next(n for n in z.namelist() if n.endswith(".dist-info/METADATA"))
            self.assertIn(f"Version: {lbproxy.__version__}", z.read(meta).decode())
