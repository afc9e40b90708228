"""lbproxy.preflight: the host checked against the configuration before anything binds.

Unit tests run the checks against a fake host (interfaces, capabilities); the last class
runs the real ``twistd`` for the balancer and both agents and reads what an operator
would see: one line ``file: key: reason`` on stderr, exit status 1, no traceback, no
usage block.  Nothing here listens, connects or sends: the interfaces are ones that do
not exist or ``lo``, and every run is refused before the service is built.
"""

from __future__ import annotations

import io
import os
import shutil
import subprocess
import sys
import tempfile
from contextlib import redirect_stdout
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ed25519
from twisted.trial.unittest import SkipTest, SynchronousTestCase

from lbproxy import preflight
from lbproxy.agents.config import load_homeagent, load_terminal
from lbproxy.config import load_config
from lbproxy.notify.pki import CertificateAuthority
from lbproxy.preflight import CAP_NET_BIND_SERVICE, CAP_NET_RAW, Host, Refused
from lbproxy.tomlconfig import ConfigError

TWISTD = os.path.join(os.path.dirname(sys.executable), "twistd")
ALL_CAPS = (1 << 41) - 1

BALANCER = """\
[virtual]
addresses = ["2001:db8:5::80"]
[interfaces]
client = "{client}"
server = "{server}"
[[backend]]
name = "srv1"
address = "2001:db8:b0::11"
"""

AGENT = """\
[agent]
listen = "{listen}"
balancers = ["lb1.example.net"]
[tls]
ca = "{ca}"
certificate = "{certificate}"
key = "{key}"
"""


class FakeHost(Host):
    """Interfaces and capabilities as a test says."""

    def __init__(self, interfaces: tuple[str, ...] = ("lbc", "lbs", "eth0"),
                 capabilities: int = ALL_CAPS, port_start: int = 1024) -> None:
        self.interfaces = interfaces
        self.caps = capabilities
        self.port_start = port_start

    def interface_exists(self, name: str) -> bool:
        return name in self.interfaces

    def capabilities(self) -> int:
        return self.caps

    def unprivileged_port_start(self) -> int:
        return self.port_start


def without(*capabilities: int) -> int:
    caps = ALL_CAPS
    for capability in capabilities:
        caps &= ~(1 << capability)
    return caps


class Files:
    """TLS material and SSH keys in a directory."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        directory.mkdir(parents=True, exist_ok=True)
        ca = CertificateAuthority()
        self.ca, self.cert, self.key = ca.write(directory, "a", ca.issue(["a.example.net"]))
        other = ca.issue(["b.example.net"])
        self.other_key = str(directory / "b.key")
        Path(self.other_key).write_bytes(other.key_pem)
        private = ed25519.Ed25519PrivateKey.generate()
        self.host_key = str(directory / "ssh_host_key")
        Path(self.host_key).write_bytes(private.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH,
            serialization.NoEncryption()))  # fmt: skip
        os.chmod(self.host_key, 0o600)
        self.public_key = str(directory / "ssh_host_key.pub")
        Path(self.public_key).write_bytes(private.public_key().public_bytes(
            serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH))  # fmt: skip
        self.authorized_keys = str(directory / "authorized_keys")
        Path(self.authorized_keys).write_bytes(Path(self.public_key).read_bytes())
        os.chmod(self.authorized_keys, 0o600)
        self.garbage = str(directory / "garbage.pem")
        Path(self.garbage).write_text("not a certificate\n")


class BalancerChecks(SynchronousTestCase):
    def setUp(self) -> None:
        self.directory = Path(self.mktemp()).absolute()
        self.files = Files(self.directory / "files")
        # UNIX socket paths must be short: trial's directories are not.
        self.short = Path(tempfile.mkdtemp(prefix="lbproxy-preflight-"))
        self.addCleanup(shutil.rmtree, self.short, True)

    def config(self, extra: str = "", client: str = "lbc", server: str = "lbs") -> Any:
        path = self.directory / "lbproxy.toml"
        path.write_text(BALANCER.format(client=client, server=server) + extra)
        return load_config(path)

    def problems(self, extra: str = "", host: Host | None = None, **kw: str) -> list[str]:
        config = self.config(extra, **kw)
        found = preflight.check_balancer(config, host or FakeHost())
        for problem in found:
            self.assertTrue(str(problem).startswith(f"{config.path}: {problem.key}: "))
        return [f"{p.key}: {p.reason}" for p in found]

    def test_all_good(self) -> None:
        """A usable configuration on a host that has what it needs: no problem."""
        f = self.files
        extra = (f'[notify]\nenabled = true\nca = "{f.ca}"\ncertificate = "{f.cert}"\n'
                 f'key = "{f.key}"\n'
                 f'[manhole]\nendpoint = "tcp:2222:interface=127.0.0.1"\n'
                 f'authorized_keys = "{f.authorized_keys}"\nhost_key = "{f.host_key}"\n'
                 f'[control]\nsocket = "{self.short}/run/control.sock"\n'
                 f'[metrics]\nendpoint = "tcp:9464:interface=127.0.0.1"\n'
                 f'[persistence]\npath = "{self.directory}/state/table.jsonl"\n')
        self.assertEqual(self.problems(extra), [])

    def test_missing_interfaces(self) -> None:
        """Each missing interface is named with its key."""
        self.assertEqual(self.problems(client="nosuchif0", server="nosuchif1"), [
            "interfaces.client: no network interface 'nosuchif0' on this host",
            "interfaces.server: no network interface 'nosuchif1' on this host",
        ])

    def test_no_raw_sockets(self) -> None:
        """Without CAP_NET_RAW the balancer cannot open its sockets: said before it tries."""
        found = self.problems(host=FakeHost(capabilities=without(CAP_NET_RAW)))
        self.assertEqual(len(found), 1)
        self.assertTrue(found[0].startswith("interfaces: "))
        self.assertIn("needs CAP_NET_RAW", found[0])

    def test_privileged_ports(self) -> None:
        """A port below the unprivileged start needs CAP_NET_BIND_SERVICE; others not."""
        host = FakeHost(capabilities=without(CAP_NET_BIND_SERVICE))
        low = self.problems('[metrics]\nendpoint = "tcp:80:interface=127.0.0.1"\n', host)
        self.assertEqual(low, ["metrics.endpoint: port 80 is below 1024 and needs "
                               "CAP_NET_BIND_SERVICE, which this process lacks"])
        self.assertEqual(self.problems('[metrics]\nendpoint = "tcp:9464"\n', host), [])

    def test_tls_files(self) -> None:
        """Each TLS file: missing, not a certificate, a key of another certificate."""
        f = self.files
        notify = '[notify]\nenabled = true\nca = "{}"\ncertificate = "{}"\nkey = "{}"\n'
        missing = self.problems(notify.format(f.ca, "/nonexistent/a.pem", f.key))
        self.assertEqual(missing, ["notify.certificate: /nonexistent/a.pem: No such file or "
                                   "directory"])
        garbage = self.problems(notify.format(f.garbage, f.cert, f.key))
        self.assertEqual(len(garbage), 1)
        self.assertTrue(garbage[0].startswith(f"notify.ca: {f.garbage}: not a PEM certificate"))
        mismatch = self.problems(notify.format(f.ca, f.cert, f.other_key))
        self.assertEqual(len(mismatch), 1)
        self.assertTrue(mismatch[0].startswith(f"notify.key: {f.other_key}: does not match "
                                               f"the certificate {f.cert}"))
        directory = self.problems(notify.format(f.ca, str(self.directory), f.key))
        self.assertEqual(directory, [f"notify.certificate: {self.directory}: not a regular "
                                     "file"])

    def test_manhole_files(self) -> None:
        """The host key must be a private SSH key; authorized_keys not writable by others."""
        f = self.files
        manhole = ('[manhole]\nendpoint = "tcp:2222:interface=127.0.0.1"\n'
                   'authorized_keys = "{}"\nhost_key = "{}"\n')
        public = self.problems(manhole.format(f.authorized_keys, f.public_key))
        self.assertEqual(public, [f"manhole.host_key: {f.public_key}: a public key; the host "
                                  "key is the private one"])
        garbage = self.problems(manhole.format(f.authorized_keys, f.garbage))
        self.assertEqual(len(garbage), 1)
        self.assertTrue(garbage[0].startswith(f"manhole.host_key: {f.garbage}: not an SSH key"))
        os.chmod(f.authorized_keys, 0o666)
        writable = self.problems(manhole.format(f.authorized_keys, f.host_key))
        self.assertEqual(writable, [f"manhole.authorized_keys: {f.authorized_keys}: writable "
                                    "by others (mode 0666); whoever can write it can log in"])

    def test_persistence_directory_created_private(self) -> None:
        """A missing directory is created with mode 0700, parents too; an existing one
        keeps its mode."""
        base = self.directory / "var"
        base.mkdir()
        base.chmod(0o755)
        path = base / "lib" / "lbproxy" / "table.jsonl"
        self.assertEqual(self.problems(f'[persistence]\npath = "{path}"\n'), [])
        self.assertEqual((base / "lib").stat().st_mode & 0o777, 0o700)
        self.assertEqual((base / "lib" / "lbproxy").stat().st_mode & 0o777, 0o700)
        self.assertEqual(base.stat().st_mode & 0o777, 0o755)

    def test_persistence_directory_cannot_be_created(self) -> None:
        """A directory that cannot be created (a file is in the way) is one line."""
        blocker = self.directory / "blocker"
        blocker.write_text("")
        found = self.problems(f'[persistence]\npath = "{blocker}/lbproxy/table.jsonl"\n')
        self.assertEqual(found, [f"persistence.path: cannot create the directory "
                                 f"{blocker}/lbproxy: {blocker} is not a directory"])

    def test_persistence_file_not_a_file(self) -> None:
        """A directory where the table file goes is refused."""
        (self.directory / "table.jsonl").mkdir()
        found = self.problems(f'[persistence]\npath = "{self.directory}/table.jsonl"\n')
        self.assertEqual(found, [f"persistence.path: {self.directory}/table.jsonl exists and "
                                 "is not a regular file"])

    def test_control_socket_directory(self) -> None:
        """The socket's directory is created 0700; a shared writable one is refused and not
        changed; something else at the socket's path is refused."""
        run = self.short / "run"
        self.assertEqual(self.problems(f'[control]\nsocket = "{run}/lbproxy/c.sock"\n'), [])
        self.assertEqual((run / "lbproxy").stat().st_mode & 0o777, 0o700)
        shared = self.short / "shared"
        shared.mkdir()
        shared.chmod(0o777)
        found = self.problems(f'[control]\nsocket = "{shared}/c.sock"\n')
        self.assertEqual(len(found), 1)
        self.assertIn(f"the directory {shared} is writable by others (mode 0777)", found[0])
        self.assertEqual(shared.stat().st_mode & 0o777, 0o777)
        (run / "lbproxy" / "c.sock").write_text("")
        found = self.problems(f'[control]\nsocket = "{run}/lbproxy/c.sock"\n')
        self.assertEqual(found, [f"control.socket: {run}/lbproxy/c.sock exists and is not a "
                                 "socket; not replacing it"])

    def test_every_problem_is_listed(self) -> None:
        """Several problems: one line each, all of them, in the order of the file."""
        found = self.problems(
            f'[persistence]\npath = "{self.files.garbage}/x/t.jsonl"\n',
            host=FakeHost(interfaces=(), capabilities=0), client="a0", server="b0",
        )
        self.assertEqual([line.split(":")[0] for line in found],
                         ["interfaces.client", "interfaces.server", "interfaces",
                          "persistence.path"])  # fmt: skip


class AgentChecks(SynchronousTestCase):
    def setUp(self) -> None:
        self.directory = Path(self.mktemp()).absolute()
        self.files = Files(self.directory / "files")
        self.short = Path(tempfile.mkdtemp(prefix="lbproxy-preflight-"))
        self.addCleanup(shutil.rmtree, self.short, True)

    def write(self, name: str, text: str) -> Path:
        path = self.directory / name
        path.write_text(text)
        return path

    def agent(self, listen: str = "tcp6:7440", certificate: str | None = None) -> str:
        f = self.files
        return AGENT.format(listen=listen, ca=f.ca, certificate=certificate or f.cert, key=f.key)

    def test_homeagent(self) -> None:
        """A home-agent agent: its link interface, CAP_NET_RAW to observe it, the command
        socket's directory, the TLS files; none needed when it does not observe."""
        text = self.agent() + ('[homeagent]\nprefixes = ["2001:db8:100::/64"]\n'
                               'interface = "home0"\n'
                               f'command_socket = "{self.short}/run/ha.sock"\n')
        config = load_homeagent(self.write("ha.toml", text))
        self.assertEqual(preflight.check_homeagent(config, FakeHost(interfaces=("home0",))), [])
        self.assertEqual((self.short / "run").stat().st_mode & 0o777, 0o700)
        found = preflight.check_homeagent(config, FakeHost(interfaces=(), capabilities=0))
        self.assertEqual([p.key for p in found], ["homeagent.interface", "homeagent.interface"])
        self.assertIn("no network interface 'home0'", found[0].reason)
        self.assertIn("needs CAP_NET_RAW", found[1].reason)
        quiet = load_homeagent(self.write("ha2.toml", self.agent() +
                                          '[homeagent]\nprefixes = ["2001:db8:100::/64"]\n'))
        self.assertEqual(preflight.check_homeagent(quiet, FakeHost(capabilities=0)), [])

    def test_terminal(self) -> None:
        """A terminal agent: a privileged listening port, a missing certificate, the state
        file's directory."""
        text = self.agent("tcp6:700", certificate="/nonexistent/t1.pem") + (
            '[terminal]\nhome = "2001:db8:100::16"\n'
            f'state_file = "{self.directory}/state/seq"\ninterface = "wlan9"\n'
        )
        config = load_terminal(self.write("t.toml", text))
        found = preflight.check_terminal(config, FakeHost(capabilities=0))
        self.assertEqual([str(p) for p in found], [
            f"{config.path}: agent.listen: port 700 is below 1024 and needs "
            "CAP_NET_BIND_SERVICE, which this process lacks",
            f"{config.path}: tls.certificate: /nonexistent/t1.pem: No such file or directory",
            f"{config.path}: terminal.interface: no network interface 'wlan9' on this host",
        ])
        self.assertEqual((self.directory / "state").stat().st_mode & 0o777, 0o700)


class HostTests(SynchronousTestCase):
    def test_real_host(self) -> None:
        """The real host: ``lo`` exists, a made-up name does not; CapEff is read."""
        host = Host()
        self.assertTrue(host.interface_exists("lo"))
        self.assertFalse(host.interface_exists("nosuchif0"))
        with open("/proc/self/status") as status:
            line = next(x for x in status if x.startswith("CapEff:"))
        self.assertEqual(host.capabilities(), int(line.split()[1], 16))
        self.assertGreater(host.unprivileged_port_start(), -1)

    def test_private_directories_ignore_the_umask(self) -> None:
        """Created directories are exactly 0700 whatever the umask; existing ones are
        not touched; a file in the way is an error."""
        base = Path(self.mktemp()).absolute()
        base.mkdir()
        old = os.umask(0o277)
        try:
            created = preflight.make_private_directories(str(base / "a" / "b"))
        finally:
            os.umask(old)
        self.assertEqual(created, [str(base / "a"), str(base / "a" / "b")])
        self.assertEqual((base / "a" / "b").stat().st_mode & 0o777, 0o700)
        base.chmod(0o751)
        self.assertEqual(preflight.make_private_directories(str(base)), [])
        self.assertEqual(base.stat().st_mode & 0o777, 0o751)
        (base / "f").write_text("")
        self.assertRaises(NotADirectoryError, preflight.make_private_directories,
                          str(base / "f" / "g"))


class OptionsTests(SynchronousTestCase):
    """The three twistd commands' options: a bad file is `Refused` (a SystemExit carrying
    the one line), which twistd lets through without its usage block."""

    def test_bad_files_refused(self) -> None:
        from lbproxy.agents import homeagent, terminal
        from lbproxy.tap import Options

        directory = Path(self.mktemp()).absolute()
        directory.mkdir()
        bad = directory / "bad.toml"
        bad.write_text("[virtual\n")
        for options in (Options, homeagent.Options, terminal.Options):
            with self.assertRaises(Refused) as caught:
                options().parseOptions(["--config", str(bad)])
            self.assertIsInstance(caught.exception, SystemExit)
            self.assertEqual(caught.exception.code, f"{bad}: (syntax): Expected ']' at the end "
                                                    "of a table declaration (at line 1, column 9)")
            self.assertEqual(len(caught.exception.problems), 1)
            self.assertIsInstance(caught.exception.problems[0], ConfigError)

    def test_check_flag(self) -> None:
        """``--check``: exit status 0 and one line when the host has what it needs."""
        from lbproxy.tap import Options

        directory = Path(self.mktemp()).absolute()
        directory.mkdir()
        good = directory / "good.toml"
        good.write_text(BALANCER.format(client="lo", server="lo"))
        if not Host().capabilities() >> CAP_NET_RAW & 1:
            raise SkipTest("this process lacks CAP_NET_RAW: --check would refuse")
        out = io.StringIO()
        with redirect_stdout(out), self.assertRaises(SystemExit) as caught:
            Options().parseOptions(["--config", str(good), "--check"])
        self.assertEqual(caught.exception.code, 0)
        self.assertEqual(out.getvalue(), f"{good}: configuration valid, preflight checks "
                                         "passed\n")


class TwistdTests(SynchronousTestCase):
    """The real ``twistd``: what an operator sees for each start-up failure."""

    def setUp(self) -> None:
        if not os.access(TWISTD, os.X_OK):
            raise SkipTest(f"no twistd at {TWISTD}")
        self.directory = Path(self.mktemp()).absolute()
        self.directory.mkdir()

    def run_twistd(self, program: str, text: str, prefix: tuple[str, ...] = ()
                   ) -> tuple[int, str, str, str]:  # fmt: skip
        path = self.directory / f"{program}.toml"
        path.write_text(text)
        command = [*prefix, TWISTD, "--nodaemon", "--pidfile=", program, "--config", str(path)]
        try:
            result = subprocess.run(command, capture_output=True, text=True, timeout=120,
                                    cwd=self.directory, check=False)  # fmt: skip
        except subprocess.TimeoutExpired:
            self.fail(f"{program} started instead of refusing: {command}")
        return result.returncode, result.stdout, result.stderr, str(path)

    def assertOneLine(self, program: str, text: str, key: str, reason: str,
                      prefix: tuple[str, ...] = ()) -> None:
        code, out, err, path = self.run_twistd(program, text, prefix)
        self.assertEqual(code, 1, err)
        self.assertEqual(out, "")
        self.assertNotIn("Traceback", err)
        self.assertNotIn("Usage:", err)
        self.assertEqual(err.splitlines(), [f"{path}: {key}: {reason}"])

    def test_missing_interface(self) -> None:
        """``twistd lbproxy`` with an interface this host lacks."""
        self.assertOneLine("lbproxy", BALANCER.format(client="nosuchif0", server="lo"),
                           "interfaces.client", "no network interface 'nosuchif0' on this host")

    def test_no_privilege(self) -> None:
        """``twistd lbproxy`` without CAP_NET_RAW: as root, ``setpriv`` removes it from the
        bounding set (so the exec'd twistd has no CAP_NET_RAW); as another user, twistd
        runs as is."""
        prefix: tuple[str, ...] = ()
        if os.geteuid() == 0:
            setpriv = shutil.which("setpriv")
            if setpriv is None:
                raise SkipTest("running as root and no setpriv to drop CAP_NET_RAW")
            prefix = (setpriv, "--bounding-set=-net_raw", "--inh-caps=-net_raw")
        elif Host().capabilities() >> CAP_NET_RAW & 1:
            raise SkipTest("this user has CAP_NET_RAW")
        self.assertOneLine(
            "lbproxy", BALANCER.format(client="lo", server="lo"), "interfaces",
            "forwarding (raw and packet sockets on the interfaces) needs CAP_NET_RAW, which "
            "this process lacks (run as root, or grant it, e.g. "
            "AmbientCapabilities=CAP_NET_RAW)", prefix,
        )

    def test_missing_persistence_directory(self) -> None:
        """``twistd lbproxy`` whose persistence directory cannot be created."""
        blocker = self.directory / "blocker"
        blocker.write_text("")
        text = (BALANCER.format(client="lo", server="lo")
                + f'[persistence]\npath = "{blocker}/lbproxy/table.jsonl"\n')
        if not Host().capabilities() >> CAP_NET_RAW & 1:
            raise SkipTest("this process lacks CAP_NET_RAW: that would be a second line")
        self.assertOneLine("lbproxy", text, "persistence.path",
                           f"cannot create the directory {blocker}/lbproxy: {blocker} is not a "
                           "directory")

    def test_missing_certificate_homeagent(self) -> None:
        """``twistd lbproxy-homeagent`` whose certificate file does not exist."""
        files = Files(self.directory / "pki")
        text = AGENT.format(listen="tcp6:7440", ca=files.ca, certificate="/nonexistent/ha1.pem",
                            key=files.key) + '[homeagent]\nprefixes = ["2001:db8:100::/64"]\n'
        self.assertOneLine("lbproxy-homeagent", text, "tls.certificate",
                           "/nonexistent/ha1.pem: No such file or directory")

    def test_missing_ca_terminal(self) -> None:
        """``twistd lbproxy-terminal`` whose CA file does not exist."""
        files = Files(self.directory / "pki")
        text = AGENT.format(listen="tcp6:7441", ca="/nonexistent/ca.pem",
                            certificate=files.cert, key=files.key)
        text += '[terminal]\nhome = "2001:db8:100::16"\n'
        self.assertOneLine("lbproxy-terminal", text, "tls.ca",
                           "/nonexistent/ca.pem: No such file or directory")

    def test_bad_configuration(self) -> None:
        """A configuration error is the same one line, without twistd's usage block: a
        duplicate backend address, and a file nested to exhaust the parser."""
        text = BALANCER.format(client="lo", server="lo") + (
            '[[backend]]\nname = "srv2"\naddress = "2001:db8:b0::11"\n')
        self.assertOneLine("lbproxy", text, "backend[1].address",
                           "2001:db8:b0::11 is also the address of backend 'srv1'")
        self.assertOneLine("lbproxy-terminal", "x = " + "[" * 100_000 + "]" * 100_000,
                           "(syntax)", "line 1: nested more than 32 levels deep")
