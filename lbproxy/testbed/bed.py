"""The network test bed: namespaces, links, addresses, filters and emulators.

:class:`TestBed` builds, in network namespaces named ``lbtb<pid><n>-<role>``,
the network of docs/testbed.md: a router (``net``) between the terminals'
access links, the home link (``ha``) and the balancer (``lb``), whose other
side reaches the backends (``srv1``...) over a bridge (``sw``).  It starts
the backend servers, the home agent emulator and the terminal emulator,
and tears everything down again, also when anything fails half-way::

    with TestBed(terminals=50, backends=3) as bed:
        bed.spawn("lb", [...the balancer...])
        report = bed.workload(moves=[2, 3])
        assert report["summary"]["errors"] == 0

The balancer is not started: the bed only prepares its namespace (addresses,
routes, and the nftables drops that let an AF_PACKET reader own the traffic).

``TestBed(xdp=True)`` also prepares it for the balancer's XDP executor
(``[balancer] offload``, docs/xdp.md): IPv6 forwarding on the balancer's two links (the
program's next-hop lookup answers only there; the namespace as a whole still does not
forward), and an XDP program that passes everything on the far end of each link (``lbn``
in ``net``, ``p0`` in ``sw``), without which veth drops the frames redirected into it
(docs/deploying.md).  GRO would do as well there, but it would coalesce TCP segments
before the captures see them.

``TestBed(balancers=3)`` builds a fleet's network (docs/testbed.md, "A fleet of
balancers"): namespaces ``lb``, ``lb2``, ``lb3``, each with its own link to the router and
a port on the backends' bridge, the virtual prefix an ECMP route over the three in ``net``
(hashing on L4), and the backends' default route an ECMP route over the balancers'
server-side addresses.  `withdraw_balancer` and `restore_balancer` take a balancer's next
hops out of both routes and put them back, as a routing protocol does when a balancer's
session drops and comes back.  ``balancers=1`` (the default) is the bed with one ``lb``.
"""

from __future__ import annotations

import atexit
import contextlib
import itertools
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import IO, Any

from lbproxy.testbed import addresses, control, netns
from lbproxy.testbed.addresses import (
    HOME_AGENT,
    HOME_PREFIX,
    HOME_ROUTER,
    SERVER_LINK,
    VIP,
    VIP_PREFIX,
)

_instances = itertools.count()
_PACKAGE_ROOT = str(Path(__file__).resolve().parent.parent.parent)


class TestBed:
    """A disposable network of namespaces with moving MIPv6 terminals.

    ``start()`` builds it (or raises :class:`~lbproxy.testbed.netns.BedUnavailableError`
    when the host cannot), ``stop()`` removes it and may be called any number
    of times; the context manager does both.  Terminals and backends are
    numbered from 1; roles are ``net``, ``term``, ``ha``, ``lb``, ``sw`` and
    ``srv1``... ``srvN``.
    """

    __test__ = False  # a fixture, whatever its name says

    def __init__(self, terminals: int = 50, backends: int = 3, links: int = 3,
                 initial_link: int = 1, tcp_ports: Sequence[int] = (addresses.TCP_PORT,),
                 udp_ports: Sequence[int] = (addresses.UDP_PORT,), lb_forwarding: bool = False,
                 register: bool = True, python: str = sys.executable,
                 ready_timeout: float = 20.0, xdp: bool = False, balancers: int = 1) -> None:
        if not 1 <= terminals <= addresses.MAX_TERMINALS:
            raise ValueError(f"terminals must be in 1..{addresses.MAX_TERMINALS}")
        if not 1 <= backends <= 255:
            raise ValueError("backends must be in 1..255")
        if not 1 <= links <= addresses.MAX_LINKS or not 1 <= initial_link <= links:
            raise ValueError("bad access link count or initial link")
        if not 1 <= balancers <= addresses.MAX_BALANCERS:
            raise ValueError(f"balancers must be in 1..{addresses.MAX_BALANCERS}")
        if xdp and balancers > 1:
            raise ValueError("the XDP bed has one balancer")
        self.terminals = terminals
        self.backends = backends
        self.links = list(range(1, links + 1))
        self.initial_link = initial_link
        self.tcp_ports = list(tcp_ports)
        self.udp_ports = list(udp_ports)
        self.lb_forwarding = lb_forwarding
        self.xdp = xdp
        self.balancers = balancers
        #: The balancers whose next hops the routes hold (`withdraw_balancer`).
        self.live_balancers = set(range(1, balancers + 1))
        self._peer_xdp: Any = None  # lbproxy.io.xdp.XdpProgram on the links' far ends
        self.register = register
        self.python = python
        self.ready_timeout = ready_timeout
        self.name = f"lbtb{os.getpid() % 10000}{next(_instances)}"
        self.workdir = ""
        self._processes: list[tuple[str, subprocess.Popen[bytes]]] = []
        self._files: list[IO[bytes]] = []
        self._created: list[str] = []
        self.started = False

    # -- names -------------------------------------------------------------------------

    @property
    def roles(self) -> list[str]:
        """Every role, hence every namespace, of this bed."""
        return (["net", "term", "ha"] + [self.balancer_role(k) for k in self.balancer_indices]
                + ["sw"] + [f"srv{i}" for i in self.backend_indices])

    @property
    def balancer_indices(self) -> range:
        return range(1, self.balancers + 1)

    @staticmethod
    def balancer_role(index: int) -> str:
        """The namespace role of balancer ``index``: ``lb``, ``lb2``, ``lb3``..."""
        return "lb" if index == 1 else f"lb{index}"

    @staticmethod
    def _uplink(index: int) -> str:
        """The router's interface towards balancer ``index`` (in ``net``)."""
        return "lbn" if index == 1 else f"lbn{index}"

    @staticmethod
    def _bridge_port(index: int) -> str:
        """Balancer ``index``'s port on the backends' bridge (in ``sw``)."""
        return "p0" if index == 1 else f"lbs{index}"

    @property
    def backend_indices(self) -> range:
        return range(1, self.backends + 1)

    def ns(self, role: str) -> str:
        """The network namespace name of ``role`` (``ip netns exec`` takes it)."""
        if role not in self.roles:
            raise KeyError(f"no role {role!r} in this bed (roles: {', '.join(self.roles)})")
        return f"{self.name}-{role}"

    def mac(self, role: str, ifname: str) -> str:
        """The fixed MAC address of ``ifname`` in ``role`` (veth ends of the bed)."""
        if role in ("net", "term") and ifname.startswith("acc"):
            return f"02:00:00:00:{int(ifname[3:]):02x}:{1 if role == 'net' else 2:02x}"
        fixed = {("net", "home"): "02:00:00:00:10:01", ("ha", "home"): "02:00:00:00:10:02",
                 ("net", "lbn"): "02:00:00:00:f0:01", ("lb", "lbc"): "02:00:00:00:f0:02",
                 ("lb", "lbs"): "02:00:00:00:b0:01"}
        if (role, ifname) in fixed:
            return fixed[role, ifname]
        if role == "net" and ifname.startswith("lbn") and ifname[3:].isdigit():
            return f"02:00:00:{int(ifname[3:]):02x}:f0:01"
        if role.startswith("lb") and role[2:].isdigit() and ifname in ("lbc", "lbs"):
            return f"02:00:00:{int(role[2:]):02x}:{'f0:02' if ifname == 'lbc' else 'b0:01'}"
        if role.startswith("srv") and ifname == "eth0":
            return f"02:00:00:00:b1:{int(role[3:]):02x}"
        raise KeyError(f"no fixed MAC for {ifname} in {role}")

    def path(self, name: str) -> str:
        """A file in the bed's working directory (logs, control sockets)."""
        return os.path.join(self.workdir, name)

    @property
    def terminal_control(self) -> str:
        """The terminal emulator's control socket."""
        return self.path("term.sock")

    @property
    def home_agent_control(self) -> str:
        """The home agent emulator's control socket."""
        return self.path("ha.sock")

    # -- life cycle --------------------------------------------------------------------

    def start(self) -> TestBed:
        """Build the network and start the emulators and servers; tear down on failure."""
        if self.started:
            return self
        netns.check_host()
        self.started = True
        atexit.register(self.stop)
        try:
            self.workdir = tempfile.mkdtemp(prefix=f"{self.name}-")
            self._create_namespaces()
            self._create_links()
            self._configure()
            if self.xdp:
                self._prepare_xdp()
            self._start_programs()
        except BaseException:
            self.stop()
            raise
        return self

    def stop(self) -> None:
        """Kill what the bed started, delete its namespaces and files. Idempotent."""
        for _, process in reversed(self._processes):
            _terminate(process)
        self._processes.clear()
        if self._peer_xdp is not None:
            self._peer_xdp.close()  # its links: the programs leave lbn and p0
            self._peer_xdp = None
        for stream in self._files:
            stream.close()
        self._files.clear()
        failures = []
        for role in reversed(self._created):
            try:
                netns.delete(f"{self.name}-{role}")
            except netns.CommandError as exc:
                failures.append(str(exc))
        self._created.clear()
        if self.workdir:
            shutil.rmtree(self.workdir, ignore_errors=True)
            self.workdir = ""
        if self.started:
            atexit.unregister(self.stop)
            self.started = False
        if failures:
            raise netns.CommandError("; ".join(failures))

    def __enter__(self) -> TestBed:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def namespaces(self) -> list[str]:
        """The bed's namespaces that exist right now (empty after ``stop()``)."""
        return [self.ns(role) for role in self.roles if netns.exists(self.ns(role))]

    # -- building ----------------------------------------------------------------------

    def _create_namespaces(self) -> None:
        for role in self.roles:
            netns.delete(self.ns(role))  # a stale one from a crashed run with our pid
            netns.run(["ip", "netns", "add", self.ns(role)])
            self._created.append(role)
            self._sysctl(role, {"net/ipv6/conf/all/accept_dad": "0",
                                "net/ipv6/conf/default/accept_dad": "0",
                                "net/ipv6/conf/all/forwarding":
                                    "1" if role == "net" or (self._is_balancer(role)
                                                             and self.lb_forwarding)
                                    else "0"})
        if self.balancers > 1:  # ECMP hashes addresses *and ports* (docs/testbed.md)
            self._sysctl("net", {"net/ipv6/fib_multipath_hash_policy": "1"})

    def _is_balancer(self, role: str) -> bool:
        return role in {self.balancer_role(k) for k in self.balancer_indices}

    def _sysctl(self, role: str, values: dict[str, str], optional: bool = False) -> None:
        with netns.inside(self.ns(role)):
            for key, value in values.items():
                try:
                    with open(f"/proc/sys/{key}", "w") as f:
                        f.write(value)
                except FileNotFoundError:
                    if not optional:
                        raise

    def _veth(self, role: str, ifname: str, peer_role: str, peer_ifname: str) -> str:
        line = f"link add {ifname} "
        with contextlib.suppress(KeyError):
            line += f"address {self.mac(role, ifname)} "
        line += f"type veth peer name {peer_ifname} netns {self.ns(peer_role)}"
        with contextlib.suppress(KeyError):
            line += f" address {self.mac(peer_role, peer_ifname)}"
        return line

    def _create_links(self) -> None:
        lines = [self._veth("net", f"acc{k}", "term", f"acc{k}") for k in self.links]
        lines.append(self._veth("net", "home", "ha", "home"))
        lines += [self._veth("net", self._uplink(k), self.balancer_role(k), "lbc")
                  for k in self.balancer_indices]
        netns.ip_batch(lines, self.ns("net"))
        lines = [self._veth("sw", self._bridge_port(k), self.balancer_role(k), "lbs")
                 for k in self.balancer_indices]
        lines += [self._veth("sw", f"p{i}", f"srv{i}", "eth0") for i in self.backend_indices]
        lines.append("link add br0 type bridge mcast_snooping 0")
        lines += [f"link set {self._bridge_port(k)} master br0 up"
                  for k in self.balancer_indices[1:]]
        lines += [f"link set p{i} master br0 up" for i in range(0, self.backends + 1)]
        lines.append("link set br0 up")
        netns.ip_batch(lines, self.ns("sw"))

    def _configure(self) -> None:
        n = self.terminals
        net = ["link set lo up"]
        for k in self.links:
            net += [f"link set acc{k} up",
                    f"addr add {addresses.access_router(k)}/64 dev acc{k} nodad"]
            net += [f"neigh replace {addresses.care_of_address(i, k)} lladdr "
                    f"{self.mac('term', f'acc{k}')} dev acc{k} nud permanent"
                    for i in range(1, n + 1)]
        net += ["link set home up", f"addr add {HOME_ROUTER}/64 dev home nodad",
                f"neigh replace {HOME_AGENT} lladdr {self.mac('ha', 'home')} dev home "
                "nud permanent"]
        # The home agent intercepts its terminals' home addresses: the router delivers
        # them to its MAC (a static stand-in for proxy neighbour discovery).
        net += [f"neigh replace {addresses.home_address(i)} lladdr {self.mac('ha', 'home')} "
                "dev home nud permanent" for i in range(1, n + 1)]
        for k in self.balancer_indices:
            uplink = self._uplink(k)
            net += [f"link set {uplink} up",
                    f"addr add {addresses.balancer_router(k)}/64 dev {uplink} nodad",
                    f"neigh replace {addresses.balancer_client_side(k)} lladdr "
                    f"{self.mac(self.balancer_role(k), 'lbc')} dev {uplink} nud permanent"]
        net += self._router_routes("add")
        netns.ip_batch(net, self.ns("net"))

        term = ["link set lo up"]
        for k in self.links:
            term += [f"link set acc{k} up",
                     f"neigh replace {addresses.access_router(k)} lladdr "
                     f"{self.mac('net', f'acc{k}')} dev acc{k} nud permanent"]
            term += [f"addr add {addresses.care_of_address(i, k)}/64 dev acc{k} nodad"
                     for i in range(1, n + 1)]
        netns.ip_batch(term, self.ns("term"))

        netns.ip_batch(["link set lo up", "link set home up",
                        f"addr add {HOME_AGENT}/64 dev home nodad",
                        f"neigh replace {HOME_ROUTER} lladdr {self.mac('net', 'home')} "
                        "dev home nud permanent",
                        f"route add default via {HOME_ROUTER} dev home"], self.ns("ha"))

        for k in self.balancer_indices:
            role, router = self.balancer_role(k), addresses.balancer_router(k)
            lb = ["link set lo up", "link set lbc up", "link set lbs up",
                  f"addr add {addresses.balancer_client_side(k)}/64 dev lbc nodad",
                  f"addr add {addresses.balancer_server_side(k)}/64 dev lbs nodad",
                  f"neigh replace {router} lladdr {self.mac('net', self._uplink(k))} dev lbc "
                  "nud permanent",
                  f"route add default via {router} dev lbc"]
            lb += [f"neigh replace {addresses.backend_address(i)} lladdr "
                   f"{self.mac(f'srv{i}', 'eth0')} dev lbs nud permanent"
                   for i in self.backend_indices]
            netns.ip_batch(lb, self.ns(role))

        for i in self.backend_indices:
            srv = ["link set lo up", "link set eth0 up",
                   f"addr add {addresses.backend_address(i)}/64 dev eth0 nodad"]
            srv += [f"neigh replace {addresses.balancer_server_side(k)} lladdr "
                    f"{self.mac(self.balancer_role(k), 'lbs')} dev eth0 nud permanent"
                    for k in self.balancer_indices]
            netns.ip_batch(srv + self._backend_routes("add"), self.ns(f"srv{i}"))
        netns.ip_batch(["link set lo up"], self.ns("sw"))
        if self.balancers > 1:
            # Each balancer reads its server link with AF_PACKET, whatever the frame's
            # destination MAC: the bridge must never flood a reply meant for one balancer
            # to the others (as it would before learning where a MAC is).
            netns.shell(self.ns("sw"), "\n".join(
                f"bridge fdb replace {self.mac(self.balancer_role(k), 'lbs')} "
                f"dev {self._bridge_port(k)} master static" for k in self.balancer_indices))

        self._filters()

    def _next_hops(self, address: Callable[[int], object],
                   device: Callable[[int], str]) -> str:
        """``via A dev D`` for one live balancer, ``nexthop via A dev D ...`` for several
        (``address``, ``device``: functions of the balancer's index)."""
        live = sorted(self.live_balancers)
        if len(live) == 1:
            return f"via {address(live[0])} dev {device(live[0])}"
        return " ".join(f"nexthop via {address(k)} dev {device(k)}" for k in live)

    def _router_routes(self, verb: str) -> list[str]:
        """``net``'s routes to the virtual prefix and the server link, over every live
        balancer (ECMP when there are several)."""
        hops = self._next_hops(addresses.balancer_client_side, self._uplink)
        return [f"route {verb} {VIP}/128 {hops}", f"route {verb} {VIP_PREFIX} {hops}",
                f"route {verb} {SERVER_LINK} {hops}"]

    def _backend_routes(self, verb: str) -> list[str]:
        """A backend's default route: through every live balancer (the balancers are
        the backends' gateway; any of them rewrites a reply)."""
        hops = self._next_hops(addresses.balancer_server_side, lambda k: "eth0")
        return [f"route {verb} ::/0 {hops}"]

    def withdraw_balancer(self, index: int) -> None:
        """Take balancer ``index``'s next hops out of the router's ECMP routes and the
        backends' default routes -- what BGP or BFD does when the balancer's session
        drops.  Its namespace and whatever runs there stay."""
        if index not in self.live_balancers:
            raise ValueError(f"balancer {index} is not in the routes")
        if len(self.live_balancers) == 1:
            raise ValueError("cannot withdraw the last balancer")
        self.live_balancers.discard(index)
        self._reroute()

    def restore_balancer(self, index: int) -> None:
        """Put balancer ``index``'s next hops back (its session is up again)."""
        if index not in self.balancer_indices:
            raise ValueError(f"no balancer {index} in this bed")
        self.live_balancers.add(index)
        self._reroute()

    def _reroute(self) -> None:
        netns.ip_batch(self._router_routes("replace"), self.ns("net"))
        for i in self.backend_indices:
            netns.ip_batch(self._backend_routes("replace"), self.ns(f"srv{i}"))

    def _filters(self) -> None:
        """TX checksum offload off on every veth; the nftables drops; conntrack checksums."""
        veths = {"net": [f"acc{k}" for k in self.links] + ["home", "lbn"],
                 "term": [f"acc{k}" for k in self.links], "ha": ["home"],
                 "sw": [f"p{i}" for i in range(self.backends + 1)]}
        veths["net"] += [self._uplink(k) for k in self.balancer_indices[1:]]
        veths["sw"] += [self._bridge_port(k) for k in self.balancer_indices[1:]]
        veths.update({self.balancer_role(k): ["lbc", "lbs"] for k in self.balancer_indices})
        veths.update({f"srv{i}": ["eth0"] for i in self.backend_indices})
        rules = {"term": _TERM_RULES, "ha": _HA_RULES.format(ha=HOME_AGENT, home=HOME_PREFIX)}
        rules.update({self.balancer_role(k): _LB_RULES.format(vip=VIP_PREFIX,
                                                              servers=SERVER_LINK)
                      for k in self.balancer_indices})
        for role, devices in veths.items():
            script = "\n".join(f"ethtool -K {dev} tx off >/dev/null" for dev in devices)
            if role in rules:
                path = self.path(f"{role}.nft")
                with open(path, "w") as f:
                    f.write(rules[role])
                script += f"\nnft -f {path}"
            netns.shell(self.ns(role), script)
        for role in [self.balancer_role(k) for k in self.balancer_indices] + ["net"]:
            # Conntrack (if a balancer's rules load it) must not drop HAO packets whose
            # checksum uses the home address (docs/testbed.md).
            self._sysctl(role, {"net/netfilter/nf_conntrack_checksum": "0"}, optional=True)

    def _prepare_xdp(self) -> None:
        """What the balancer's XDP executor needs of the bed (module docstring)."""
        from lbproxy.io.xdp import XdpProgram, XdpUnavailable

        self._sysctl("lb", {"net/ipv6/conf/lbc/forwarding": "1",
                            "net/ipv6/conf/lbs/forwarding": "1"})
        try:
            program = XdpProgram(max_bindings=1)
        except XdpUnavailable as e:
            raise netns.BedUnavailableError(f"the XDP bed needs the XDP program: {e}") from None
        self._peer_xdp = program
        for role, ifname in (("net", "lbn"), ("sw", "p0")):
            with netns.inside(self.ns(role)):
                program.attach("lbproxy_pass", socket.if_nametoindex(ifname))

    def _program(self, module: str, *args: str) -> list[str]:
        return [self.python, "-m", f"lbproxy.testbed.{module}", *args]

    def _start_programs(self) -> None:
        for i in self.backend_indices:
            argv = self._program("server", "--name", addresses.backend_name(i),
                                 "--log", self.path(f"b{i}.log"))
            argv += [a for port in self.tcp_ports for a in ("--tcp-port", str(port))]
            argv += [a for port in self.udp_ports for a in ("--udp-port", str(port))]
            self.spawn(f"srv{i}", argv, name=f"b{i}")
        self.spawn("ha", self._program("homeagent", "--control", self.home_agent_control,
                                       "--log", self.path("ha.log")), name="ha")
        argv = self._program("terminal", "--count", str(self.terminals), "--link",
                             str(self.initial_link), "--control", self.terminal_control)
        for k in self.links:
            argv += ["--router-mac", f"{k}={self.mac('net', f'acc{k}')}"]
        if not self.register:
            argv.append("--no-register")
        self.spawn("term", argv, name="term")
        deadline = time.monotonic() + self.ready_timeout
        for i in self.backend_indices:
            self._wait(deadline, f"b{i}", lambda i=i: any(
                e["event"] == "listening" for e in self._read_log(f"b{i}.log")))
        self._wait(deadline, "ha", lambda: self.bindings() is not None)
        if self.register:
            self._wait(deadline, "term", lambda: all(
                t["registered"] for t in self.terminal_status()))
        else:
            self._wait(deadline, "term", lambda: bool(self.terminal_status()))

    def _wait(self, deadline: float, name: str, ready: Any) -> None:
        while True:
            self._check_alive()
            try:
                if ready():
                    return
            except (OSError, control.ControlError, ValueError):
                pass
            if time.monotonic() > deadline:
                raise RuntimeError(f"test bed: {name} not ready in {self.ready_timeout}s; "
                                   f"stderr: {self.stderr(name)[-2000:]}")
            time.sleep(0.05)

    def _check_alive(self) -> None:
        essential = {"ha", "term", *(f"b{i}" for i in self.backend_indices)}
        for name, process in self._processes:
            if process.poll() is not None and name in essential:
                raise RuntimeError(f"test bed: {name} exited with {process.returncode}; "
                                   f"stderr: {self.stderr(name)[-2000:]}")

    # -- running things ----------------------------------------------------------------

    def _env(self) -> dict[str, str]:
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join(
            p for p in (_PACKAGE_ROOT, env.get("PYTHONPATH", "")) if p)
        env["PYTHONUNBUFFERED"] = "1"
        return env

    def run(self, role: str, argv: Sequence[str], timeout: float = 60.0, check: bool = True,
            input: str | None = None) -> subprocess.CompletedProcess[str]:
        """Run ``argv`` to completion inside ``role``'s namespace; its output."""
        result = subprocess.run(["ip", "netns", "exec", self.ns(role), *argv], input=input,
                                capture_output=True, text=True, timeout=timeout,
                                env=self._env(), check=False)
        if check and result.returncode != 0:
            raise netns.CommandError(f"{' '.join(argv)} in {role} exited {result.returncode}: "
                                     f"{result.stderr.strip()[-2000:]}")
        return result

    def spawn(self, role: str, argv: Sequence[str], name: str | None = None
              ) -> subprocess.Popen[bytes]:
        """Start ``argv`` inside ``role``'s namespace; it is killed by ``stop()``.

        Its stdout and stderr go to ``<name>.out`` / ``<name>.err`` in the working
        directory (see :meth:`stdout`, :meth:`stderr`).
        """
        name = name or f"{role}-{len(self._processes)}"
        out = open(self.path(f"{name}.out"), "wb")  # noqa: SIM115 - closed by stop()
        err = open(self.path(f"{name}.err"), "wb")  # noqa: SIM115
        self._files += [out, err]
        process = subprocess.Popen(["ip", "netns", "exec", self.ns(role), *argv],
                                   stdin=subprocess.DEVNULL, stdout=out, stderr=err,
                                   env=self._env(), start_new_session=True)
        self._processes.append((name, process))
        return process

    def processes(self) -> dict[str, subprocess.Popen[bytes]]:
        """The programs the bed has spawned and not yet stopped, by name."""
        return dict(self._processes)

    def stdout(self, name: str) -> str:
        """What the spawned program ``name`` wrote on stdout so far."""
        return _read(self.path(f"{name}.out"))

    def stderr(self, name: str) -> str:
        """What the spawned program ``name`` wrote on stderr so far."""
        return _read(self.path(f"{name}.err"))

    def python_module(self, module: str, *args: str) -> list[str]:
        """argv running ``python -m module args`` with the bed's interpreter."""
        return [self.python, "-m", module, *args]

    @contextlib.contextmanager
    def inside(self, role: str) -> Iterator[None]:
        """Run the block with this thread inside ``role``'s namespace."""
        with netns.inside(self.ns(role)):
            yield

    def socket(self, role: str, family: int, type: int, proto: int = 0) -> socket.socket:
        """A socket living in ``role``'s namespace (the caller closes it)."""
        with self.inside(role):
            return socket.socket(family, type, proto)

    # -- the emulators -----------------------------------------------------------------

    def move(self, terminal: int, link: int, wait: bool = True,
             timeout: float = 15.0) -> dict[str, Any]:
        """Move ``terminal`` to access ``link``: new CoA, Binding Update, (wait for BA)."""
        return control.request(self.terminal_control, "move", timeout=timeout,
                               terminal=terminal, link=link, wait=wait)

    def terminal_status(self) -> list[dict[str, Any]]:
        """Per terminal: HoA, link, CoA, BU sequence number, registered."""
        terminals: list[dict[str, Any]] = control.request(
            self.terminal_control, "status")["terminals"]
        return terminals

    def terminal_counters(self) -> dict[str, int]:
        """The terminal emulator's packet counters (by what it did)."""
        counters: dict[str, int] = control.request(self.terminal_control, "status")["counters"]
        return counters

    def bindings(self) -> list[dict[str, Any]]:
        """The home agent's binding cache: HoA, CoA, seq, lifetime."""
        bindings: list[dict[str, Any]] = control.request(
            self.home_agent_control, "bindings")["bindings"]
        return bindings

    def home_agent_log(self) -> list[dict[str, Any]]:
        """The home agent's binding events (bound, refused, deregistered...)."""
        return self._read_log("ha.log")

    def backend_log(self) -> dict[str, list[dict[str, Any]]]:
        """Each backend's events (accept, close, datagram), by backend name."""
        return {addresses.backend_name(i): self._read_log(f"b{i}.log")
                for i in self.backend_indices}

    def served_by(self, peer: str) -> list[str]:
        """Names of the backends that accepted a TCP connection or datagram from ``peer``."""
        return sorted(name for name, events in self.backend_log().items()
                      if any(e.get("peer") == peer and e["event"] in ("accept", "datagram")
                             for e in events))

    def workload(self, terminals: Sequence[int] | None = None, moves: Sequence[int] = (),
                 connections: int = 1, chunks: int = 8, chunk_size: int = 4096,
                 port: int | None = None, timeout: float = 120.0,
                 extra: Sequence[str] = ()) -> dict[str, Any]:
        """Run the workload program in the terminal namespace; its JSON report."""
        indices = terminals or range(1, self.terminals + 1)
        argv = self._program("workload", "--control", self.terminal_control,
                             "--terminals", ",".join(str(i) for i in indices),
                             "--connections", str(connections), "--chunks", str(chunks),
                             "--chunk-size", str(chunk_size),
                             "--port", str(port or self.tcp_ports[0]), *extra)
        if moves:
            argv += ["--moves", ",".join(str(k) for k in moves)]
        report: dict[str, Any] = json.loads(self.run("term", argv, timeout=timeout).stdout)
        return report

    def _read_log(self, name: str) -> list[dict[str, Any]]:
        events = []
        for line in _read(self.path(name)).splitlines():
            with contextlib.suppress(ValueError):
                events.append(json.loads(line))
        return events


def _read(path: str) -> str:
    try:
        with open(path, errors="replace") as f:
            return f.read()
    except FileNotFoundError:
        return ""


def _terminate(process: subprocess.Popen[bytes]) -> None:
    """SIGTERM the process group we started, SIGKILL it if it lingers."""
    if process.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGTERM)
        try:
            process.wait(timeout=3)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(process.pid, signal.SIGKILL)
            process.wait(timeout=3)


# Terminal namespace: what arrives for a care-of address with a Type 2 Routing Header,
# or tunnelled, is the emulator's (it read it with AF_PACKET already); the kernel,
# without MIPv6, would answer with ICMPv6 errors.
_TERM_RULES = """\
table ip6 lbtb {
  chain prerouting {
    type filter hook prerouting priority raw; policy accept;
    iifname "acc*" rt type 2 drop
    iifname "acc*" meta l4proto ipv6 drop
  }
}
"""

# Home agent namespace: Binding Updates (HAO + MH), reverse-tunnelled packets and
# intercepted packets for home addresses are the emulator's.
_HA_RULES = """\
table ip6 lbtb {{
  chain prerouting {{
    type filter hook prerouting priority raw; policy accept;
    iifname "home" meta l4proto {{ ipv6, mobility-header }} drop
    iifname "home" ip6 daddr {home} ip6 daddr != {ha} drop
  }}
}}
"""

# Balancer namespace: the balancer reads these with AF_PACKET and forwards them itself;
# the kernel must neither forward nor answer them.  Its own output (raw sockets) is not
# touched: these are prerouting rules only.
_LB_RULES = """\
table ip6 lbtb {{
  chain prerouting {{
    type filter hook prerouting priority raw; policy accept;
    ip6 daddr {vip} drop
    iifname "lbs" ip6 saddr {servers} ip6 daddr != ff00::/8 fib daddr type != local drop
  }}
}}
"""
