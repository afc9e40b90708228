"""The XDP executor: established bindings forwarded in the driver, Python as control plane.

Why: on the Python paths every packet crosses the interpreter (docs/performance.md).  The
program in ``lbproxy/xdp/lbproxy.bpf.c`` rewrites the usual packets of established
bindings in the driver's receive hook, the way the fast path (`lbproxy.io.fastpath`)
does in Python, and hands everything else up (``XDP_PASS``) to the raw-socket path,
where the core decides.  docs/xdp.md has the design, the maps and the figures.

It is an *executor*: it decides nothing.  This module keeps the program's maps in step
with the core, using only what every executor uses:

- **the policy** (`Balancer.policy`, a new object on every change: compared by
  identity): the virtual address, the mode, ports, this host's addresses, each
  backend's checksum constants and whether a binding to it may keep its packets, and
  whether the policy lets an executor other than the general path serve each direction;
- **the table** through `StickyTable.listeners`: a home-address binding made or
  re-pointed is written into ``lb_bindings`` (backend, expiry), one that goes is
  deleted.  The program never makes a binding: a miss goes up;
- **the return paths** (`ReturnPaths.listeners`): confirmed care-of addresses, for the
  Type 2 Routing Header of replies, written as each is made or ends (and compared with
  the last copy at each `prepare`).

What the program did comes back when the table needs it:

- **claim 10**: each hit stamps its ``lb_bindings`` entry (time, the expiry it gave,
  hits: the program's part of the entry, carried over when user space writes it).  This
  executor is the table's `Stamps`: the table asks it to `fold` a binding's stamps
  before it treats the binding as expired (a lookup, a link, the sweep) or chooses it
  for eviction, and `fold` tells the table the packets with `StickyTable.extend` -- the
  expiry the *last packet* gave, as the general path would have; so a binding whose
  traffic never leaves the driver lives on, an idle one expires on time, and a busy
  one is never evicted as a newcomer.  The work follows what comes due, not the
  number of terminals in the driver: `sync`, before every sweep, folds the bindings
  due before the next sweeps (`StickyTable.due`), so the table's expiries (which the
  fleet's records and the notifier's subscriptions read) are current where it counts;
  `fold_all` folds every stamp (before a snapshot, at shutdown);
- **stale passes**: a packet the program hands up because its entry looked expired or
  came from another care-of address puts its home address in ``lb_stale`` (a set, sized
  like ``lb_bindings``: repeats cost nothing); `sync` writes those entries again from
  the table, so the terminal's next packets stay in the driver.  Were one ever not
  recorded (counted as ``unqueued``), `sync` finds them by a whole pass instead;
- the per-CPU counters, into the shared `Counters` (packets in and out, hits,
  per-backend packets, replies), at every `sync` and `lbproxyctl stats`.

A binding's packet count (and the table's hit count) therefore includes its packets in
the driver from the next fold on; ``show`` adds those not folded yet.

Without BPF (no ``libbpf.so.1``, no object, no permission) `XdpOffload` raises
`XdpUnavailable` with the reason; `XdpOffload.open` (what the forwarder calls) also
checks the links (IPv6 forwarding on, native XDP) and attaches; the caller falls back to
the Python paths or refuses to start (``[balancer] offload``).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import errno
import os
import socket
import struct
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any, Final

from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger

from lbproxy.core.balancer import Balancer
from lbproxy.core.keys import Key
from lbproxy.core.policy import Policy
from lbproxy.core.table import Binding
from lbproxy.io.xdpverdict import Decision, ProgramView, decide
from lbproxy.wire.checksum import delta16

__all__ = [
    "OBJECT",
    "XDP_ABORTED",
    "XDP_DROP",
    "XDP_PASS",
    "XDP_REDIRECT",
    "XDP_TX",
    "BpfObject",
    "XdpOffload",
    "XdpProgram",
    "XdpUnavailable",
    "available",
]

_log = Logger()

#: The compiled program (`make test` builds it from lbproxy.bpf.c beside it).
OBJECT: Final = Path(__file__).resolve().parent.parent / "xdp" / "lbproxy.bpf.o"

XDP_ABORTED, XDP_DROP, XDP_PASS, XDP_TX, XDP_REDIRECT = range(5)

# lb_config.flags (lbproxy.bpf.c)
_INBOUND, _REPLIES, _TRANSLATE, _PORTS, _DRY, _FIXED_CLOCK = 1, 2, 4, 8, 16, 32
# lb_backends flags
_USABLE, _CONFIGURED = 1, 2
_MAX_BACKENDS: Final = 256
# lb_counters indices
C_IN_PACKETS, C_IN_BYTES, C_REPLY_PACKETS, C_REPLY_BYTES = 0, 1, 2, 3
C_IN_PASSED, C_REPLIES_PASSED, C_STALE, C_NO_ROUTE, C_UNQUEUED = 4, 5, 6, 7, 8
_COUNTER_NAMES: Final = ("packets", "bytes", "replies", "reply_bytes", "passed",
                         "replies_passed", "stale", "no_route", "unqueued")  # fmt: skip

#: struct lb_config: vip, flags, pad, lifetime, resolution, clock offset, fixed now.
_CONFIG = struct.Struct("<16sII QQqQ")
#: struct lb_backend: address, flags, checksum constants (inbound, reply), and the next
#: hop user space resolved: link index, destination and source MACs, the link's MTU.
_BACKEND = struct.Struct("<16sIHHI12sHH")
_NEXT_HOP = 4
#: struct lb_binding: user space's part -- backend index, flags, expiry (ns), care-of
#: address -- then, at _STAMPS, the program's: last seen, the expiry that gave (ns),
#: hits, stale passes (_HITS).
_BINDING = struct.Struct("<IIQ16sQQQQ")
_STAMPS: Final = 32
_HITS = struct.Struct("<QQQQ")
_HAS_CARE_OF = 1
_U32 = struct.Struct("<I")
_U16 = struct.Struct("<H")
_HOA_KIND: Final = Key("hoa", bytes(16))[:1]
_BPF_ANY, _BPF_NOEXIST = 0, 1
XDP_FLAGS_SKB_MODE, XDP_FLAGS_DRV_MODE = 1 << 1, 1 << 2
_PROGRAMS: Final = ("lbproxy_inbound", "lbproxy_replies", "lbproxy_pass")


class XdpUnavailable(Exception):  # noqa: N818 (a state, not an error of the caller's)
    """BPF cannot be used here; ``str()`` says why (one line, for the log)."""


def _ns(seconds: float) -> int:
    return round(seconds * 1e9)


# -- libbpf through ctypes -------------------------------------------------------------


class _TestRunOpts(ctypes.Structure):
    """struct bpf_test_run_opts (libbpf's bpf.h)."""

    _fields_ = [
        ("sz", ctypes.c_size_t),
        ("data_in", ctypes.c_void_p),
        ("data_out", ctypes.c_void_p),
        ("data_size_in", ctypes.c_uint32),
        ("data_size_out", ctypes.c_uint32),
        ("ctx_in", ctypes.c_void_p),
        ("ctx_out", ctypes.c_void_p),
        ("ctx_size_in", ctypes.c_uint32),
        ("ctx_size_out", ctypes.c_uint32),
        ("retval", ctypes.c_uint32),
        ("repeat", ctypes.c_int),
        ("duration", ctypes.c_uint32),
        ("flags", ctypes.c_uint32),
        ("cpu", ctypes.c_uint32),
        ("batch_size", ctypes.c_uint32),
    ]


class _LinkCreateOpts(ctypes.Structure):
    """struct bpf_link_create_opts (libbpf's bpf.h): its size and the XDP mode flags."""

    _fields_ = [
        ("sz", ctypes.c_size_t),
        ("flags", ctypes.c_uint32),
        ("_rest", ctypes.c_uint8 * 52),
    ]


#: enum bpf_attach_type's BPF_XDP (linux/bpf.h).
_BPF_XDP: Final = 37

_PRINT_FN = ctypes.CFUNCTYPE(ctypes.c_int, ctypes.c_int, ctypes.c_char_p, ctypes.c_void_p)


class _Libbpf:
    """The few libbpf functions used, with their C signatures, and its messages kept
    (the verifier's refusal, say) instead of printed."""

    _instance: _Libbpf | None = None

    def __init__(self) -> None:
        try:
            lib = ctypes.CDLL("libbpf.so.1", use_errno=True)
        except OSError as e:
            raise XdpUnavailable(f"no libbpf.so.1 ({e})") from None
        self.lib = lib
        vp, i, u32, u64, cp = (ctypes.c_void_p, ctypes.c_int, ctypes.c_uint32,
                               ctypes.c_uint64, ctypes.c_char_p)  # fmt: skip
        for name, restype, argtypes in (
            ("bpf_object__open_file", vp, [cp, vp]),
            ("bpf_object__load", i, [vp]),
            ("bpf_object__close", None, [vp]),
            ("bpf_object__find_map_by_name", vp, [vp, cp]),
            ("bpf_object__find_program_by_name", vp, [vp, cp]),
            ("bpf_map__set_max_entries", i, [vp, u32]),
            ("bpf_map__fd", i, [vp]),
            ("bpf_program__fd", i, [vp]),
            ("bpf_map_update_elem", i, [i, vp, vp, u64]),
            ("bpf_map_lookup_elem", i, [i, vp, vp]),
            ("bpf_map_delete_elem", i, [i, vp]),
            ("bpf_map_get_next_key", i, [i, vp, vp]),
            ("bpf_map_lookup_batch", i, [i, vp, vp, vp, vp, ctypes.POINTER(u32), vp]),
            ("bpf_prog_test_run_opts", i, [i, ctypes.POINTER(_TestRunOpts)]),
            ("bpf_link_create", i, [i, i, ctypes.c_int, ctypes.POINTER(_LinkCreateOpts)]),
            ("libbpf_num_possible_cpus", i, []),
            ("libbpf_set_print", vp, [_PRINT_FN]),
        ):
            fn = getattr(lib, name)
            fn.restype = restype
            fn.argtypes = argtypes
        self.messages: list[str] = []
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        vsnprintf = libc.vsnprintf
        vsnprintf.argtypes = [ctypes.c_char_p, ctypes.c_size_t, ctypes.c_char_p, vp]

        def keep(level: int, fmt: bytes, args: int) -> int:
            buf = ctypes.create_string_buffer(1024)
            vsnprintf(buf, 1024, fmt, args)
            self.messages.append(buf.value.decode(errors="replace").rstrip())
            del self.messages[:-200]
            return 0

        self._printer = _PRINT_FN(keep)  # kept alive as long as libbpf may call it
        lib.libbpf_set_print(self._printer)
        self.cpus = lib.libbpf_num_possible_cpus()

    @classmethod
    def get(cls) -> _Libbpf:
        if cls._instance is None:
            cls._instance = cls()
        return cls._instance


def _check(rc: int, what: str) -> None:
    if rc < 0:
        err = ctypes.get_errno() or -rc
        raise OSError(err, f"{what}: {os.strerror(err)}")


class _Map:
    """One BPF map by its fd: bytes in, bytes out."""

    def __init__(self, lib: Any, fd: int, key_size: int, value_size: int, cpus: int = 0):
        self.lib, self.fd = lib, fd
        self.key_size, self.value_size = key_size, value_size
        # A per-CPU map's value is one 8-byte-aligned slot per possible CPU.
        self.read_size = ((value_size + 7) // 8 * 8) * cpus if cpus else value_size

    def update(self, key: bytes, value: bytes, flags: int = _BPF_ANY) -> None:
        _check(self.lib.bpf_map_update_elem(self.fd, key, value, flags), "map update")

    def lookup(self, key: bytes) -> bytes | None:
        out = ctypes.create_string_buffer(self.read_size)
        if self.lib.bpf_map_lookup_elem(self.fd, key, out) < 0:
            if ctypes.get_errno() == errno.ENOENT:
                return None
            _check(-1, "map lookup")
        return out.raw

    def delete(self, key: bytes) -> bool:
        if self.lib.bpf_map_delete_elem(self.fd, key) < 0:
            if ctypes.get_errno() == errno.ENOENT:
                return False
            _check(-1, "map delete")
        return True

    def items(self, chunk: int = 256) -> Iterator[tuple[bytes, bytes]]:
        """Every (key, value) of a hash map, `chunk` entries per system call
        (``BPF_MAP_LOOKUP_BATCH``), or one key at a time where batches are refused.
        Small chunks: a kernel without preemption runs nothing else on this CPU until
        the call returns (4,096 entries of 100,000 held a threaded NAPI poll there for
        over a millisecond)."""
        lib, ks, vs = self.lib, self.key_size, self.read_size
        keys = ctypes.create_string_buffer(ks * chunk)
        values = ctypes.create_string_buffer(vs * chunk)
        token = ctypes.create_string_buffer(max(ks, 8))
        count = ctypes.c_uint32()
        first = True
        while True:
            count.value = chunk
            rc = lib.bpf_map_lookup_batch(
                self.fd, None if first else token, token, keys, values,
                ctypes.byref(count), None,
            )  # fmt: skip
            err = ctypes.get_errno() if rc < 0 else 0
            if rc < 0 and err not in (errno.ENOENT,):
                if first and err in (errno.EINVAL, errno.ENOTSUP, errno.EOPNOTSUPP):
                    yield from self._items_one_by_one()
                    return
                _check(rc, "map batch lookup")
            k, v = keys.raw, values.raw
            for i in range(count.value):
                yield k[i * ks : (i + 1) * ks], v[i * vs : (i + 1) * vs]
            if rc < 0:  # ENOENT: that was the last batch
                return
            first = False

    def _items_one_by_one(self) -> Iterator[tuple[bytes, bytes]]:
        key = None
        nxt = ctypes.create_string_buffer(self.key_size)
        while self.lib.bpf_map_get_next_key(self.fd, key, nxt) == 0:
            key = nxt.raw
            value = self.lookup(key)
            if value is not None:
                yield key, value

    def per_cpu_sums(self, index: int) -> int:
        """The sum over CPUs of a per-CPU array's u64 at `index`."""
        raw = self.lookup(_U32.pack(index))
        if raw is None:
            return 0
        return sum(v for (v,) in struct.iter_unpack("<Q", raw))


class BpfObject:
    """A compiled BPF object loaded through libbpf: its programs by name, its maps,
    ``BPF_PROG_TEST_RUN``, and XDP attachment through BPF links.

    `programs` are looked up after loading; `sizes` (map name -> entries) are set
    before it.  Any failure to open or load raises `XdpUnavailable` with the reason.
    `XdpProgram` is the balancer's; the data-path benchmark loads its generator and
    sink the same way."""

    def __init__(self, path: Path | str, programs: Sequence[str],
                 sizes: Mapping[str, int] | None = None) -> None:  # fmt: skip
        lib = _Libbpf.get()
        self._lib = lib
        l = lib.lib  # noqa: E741
        path = Path(path)
        self.path = path
        if not path.is_file():
            raise XdpUnavailable(f"no BPF object at {path}")
        lib.messages.clear()
        obj = l.bpf_object__open_file(str(path).encode(), None)
        if not obj:
            raise XdpUnavailable(f"cannot open {path}: {os.strerror(ctypes.get_errno())}")
        self._obj: int | None = obj
        self.attached: list[int] = []
        try:
            for name, size in (sizes or {}).items():
                m = l.bpf_object__find_map_by_name(obj, name.encode())
                if not m or l.bpf_map__set_max_entries(m, max(1, size)) < 0:
                    raise XdpUnavailable(f"{path}: no map {name}")
            if l.bpf_object__load(obj) < 0:
                err = ctypes.get_errno()
                detail = next((m for m in reversed(lib.messages) if m), "")
                raise XdpUnavailable(
                    f"cannot load {path.name}: {os.strerror(err)}"
                    + (f" ({detail})" if detail else "")
                )
            self.programs: dict[str, int] = {}
            for name in programs:
                prog = l.bpf_object__find_program_by_name(obj, name.encode())
                if not prog:
                    raise XdpUnavailable(f"{path}: no program {name}")
                self.programs[name] = l.bpf_program__fd(prog)
        except BaseException:
            self.close()
            raise

    def map(self, name: str, key_size: int, value_size: int, per_cpu: bool = False) -> _Map:
        """Map `name`, with its key and value sizes (a per-CPU map's values are read
        for every possible CPU)."""
        l = self._lib.lib  # noqa: E741
        m = l.bpf_object__find_map_by_name(self._obj, name.encode())
        if not m:
            raise XdpUnavailable(f"{self.path}: no map {name}")
        return _Map(l, l.bpf_map__fd(m), key_size, value_size,
                    self._lib.cpus if per_cpu else 0)  # fmt: skip

    def test_run(self, program: str, frame: bytes) -> tuple[int, bytes]:
        """Run `program` once on `frame` (an Ethernet frame) through BPF_PROG_TEST_RUN:
        its verdict and the frame as it left it."""
        data_in = ctypes.create_string_buffer(frame, len(frame))
        data_out = ctypes.create_string_buffer(len(frame) + 256)
        opts = _TestRunOpts(
            sz=ctypes.sizeof(_TestRunOpts),
            data_in=ctypes.cast(data_in, ctypes.c_void_p),
            data_out=ctypes.cast(data_out, ctypes.c_void_p),
            data_size_in=len(frame),
            data_size_out=len(data_out),
            repeat=1,
        )
        _check(self._lib.lib.bpf_prog_test_run_opts(self.programs[program], opts), "test run")
        return opts.retval, data_out.raw[: opts.data_size_out]

    def attach(self, program: str, ifindex: int, flags: int = XDP_FLAGS_DRV_MODE) -> None:
        """Attach `program` to interface `ifindex` of this thread's network namespace
        (driver mode unless `flags` say otherwise), through a BPF link: the attachment
        lasts as long as this object (`detach`, `close`, or the process's end -- a
        balancer that crashes leaves no program behind on its interfaces)."""
        opts = _LinkCreateOpts(sz=ctypes.sizeof(_LinkCreateOpts), flags=flags)
        fd = self._lib.lib.bpf_link_create(self.programs[program], ifindex, _BPF_XDP, opts)
        if fd < 0:
            err = ctypes.get_errno() or -fd
            raise OSError(err, f"attach {program} to interface {ifindex}: {_attach_error(err)}")
        self.attached.append(fd)

    def detach(self) -> None:
        """Take the programs off every interface they were attached to."""
        for fd in self.attached:
            os.close(fd)
        self.attached = []

    def close(self) -> None:
        """Detach, and unload the object (maps and programs go with it)."""
        if getattr(self, "attached", None):
            self.detach()
        if self._obj:
            self._lib.lib.bpf_object__close(self._obj)
            self._obj = None


class XdpProgram(BpfObject):
    """The balancer's compiled object, loaded: its programs and its maps (no interface
    yet).

    `max_bindings` sizes the binding maps (the table's bound): two identities each in
    ``lb_bindings``, one confirmed care-of address each."""

    def __init__(self, path: Path | str = OBJECT, max_bindings: int = 65536) -> None:
        if not Path(path).is_file():
            raise XdpUnavailable(f"no BPF object at {path} (make builds it: clang, libbpf-dev)")
        # A binding's identities: its home address and its care-of address, the usual
        # terminal; lb_confirmed holds one care-of address per home address.
        super().__init__(path, _PROGRAMS, {"lb_bindings": 2 * max_bindings,
                                           "lb_stale": 2 * max_bindings,
                                           "lb_confirmed": max_bindings})  # fmt: skip
        try:
            map_ = self.map
            self.config = map_("lb_config", 4, _CONFIG.size)
            self.backends = map_("lb_backends", 4, _BACKEND.size)
            self.backend_ix = map_("lb_backend_ix", 16, 4)
            self.ports = map_("lb_ports", 2, 1)
            self.own = map_("lb_own", 16, 1)
            self.bindings = map_("lb_bindings", 16, _BINDING.size)
            self.stale = map_("lb_stale", 16, 1)
            self.confirmed = map_("lb_confirmed", 16, 16)
            self.counters = map_("lb_counters", 4, 8, per_cpu=True)
            self.backend_packets = map_("lb_backend_packets", 4, 8, per_cpu=True)
        except BaseException:
            self.close()
            raise

    def reset(self) -> None:
        """Empty every map (a program reused for another balancer, in the tests)."""
        for m in (self.backend_ix, self.ports, self.own, self.bindings, self.stale,
                  self.confirmed):  # fmt: skip
            for key, _ in list(m.items()):
                m.delete(key)
        self.config.update(_U32.pack(0), bytes(_CONFIG.size))
        zero = bytes(self.counters.read_size)
        for i in range(len(_COUNTER_NAMES)):
            self.counters.update(_U32.pack(i), zero)
        for i in range(_MAX_BACKENDS):
            self.backends.update(_U32.pack(i), bytes(_BACKEND.size))
            self.backend_packets.update(_U32.pack(i), zero)


def _attach_error(err: int) -> str:
    """Why an XDP attachment was refused, in the operator's words."""
    if err in (errno.EOPNOTSUPP, errno.ENOTSUP):
        return "the driver has no native (driver-mode) XDP"
    if err in (errno.EBUSY, errno.EEXIST):
        return "another XDP program is attached to it (`ip link show` names it)"
    if err == errno.EPERM:
        return "not permitted (needs CAP_NET_ADMIN and CAP_BPF, or root)"
    return os.strerror(err)


def available(path: Path | str = OBJECT) -> str | None:
    """None when the XDP program can be loaded here, else why not."""
    try:
        XdpProgram(path, 16).close()
    except XdpUnavailable as e:
        return str(e)
    return None


# -- the executor ------------------------------------------------------------------------


class XdpOffload:
    """The XDP program's maps kept in step with `balancer`, and what it did read back.

    ``attached``: False for a program run only through `XdpProgram.test_run` (the
    rewritten packet comes back as ``XDP_TX``, no next-hop lookup); True once `attach`
    put it on interfaces.  ``fixed_clock``: the program reads the table's clock from
    its configuration, written at every `prepare` (deterministic: the tests' `Clock`),
    instead of the monotonic clock plus an offset.
    """

    def __init__(
        self,
        balancer: Balancer,
        clock: IReactorTime,
        *,
        path: Path | str = OBJECT,
        fixed_clock: bool = False,
        program: XdpProgram | None = None,
    ) -> None:
        self.balancer = balancer
        self.clock = clock
        self.fixed_clock = fixed_clock
        table = balancer.table
        self.program = program or XdpProgram(path, table.max_entries)
        self.attached = False
        #: Called when a binding is marked for the next `flush` and none was (the
        #: forwarder schedules a flush, so a change made outside a packet batch -- an
        #: operator's move, a notification -- reaches the program at once).
        self.on_dirty: Callable[[], object] | None = None
        self._policy: Policy | None = None
        self._config: bytes = b""
        # Backend address -> index in lb_backends (stable: bindings refer to it), and
        # each index's backend name (for the per-backend counters).
        self._index: dict[bytes, int] = {}
        self._names: list[str] = []
        # Home address -> (hits, stale passes) of its entry's stamps already folded in
        # (every identity with an entry has one).
        self._synced: dict[bytes, tuple[int, int]] = {}
        # The program's count of stale passes it could not record, when last looked at.
        self._unqueued = 0
        self._routes: dict[bytes, bytes] = {}
        # Backend address -> (link index, destination + source MAC, MTU): the next hop
        # of terminals' packets to it (`set_next_hops`), instead of the kernel's lookup.
        self._next_hops: dict[bytes, tuple[int, bytes, int]] = {}
        self._counted = [0] * len(_COUNTER_NAMES)
        #: Identities not written for want of room in the maps (`_write`), each once.
        self.full = 0
        # Those identities now, with the binding each leads to: written again at the
        # first sync after an entry was deleted (room made).
        self._left_out: dict[bytes, Binding] = {}
        self._room_made = False
        self._backend_counted: list[int] = []
        # The correspondent's strict mode: its binding cache (home -> care-of), which a
        # binding's care-of address must match to be written (None: not strict).
        self._strict: dict[bytes, bytes] | None = None
        self.refresh_policy()
        # Address identity -> the binding it leads to, and each binding's identities.
        self._owner: dict[bytes, Binding] = {}
        self._homes: dict[Binding, tuple[bytes, ...]] = {}
        # Care-of address -> the bindings whose entries name it, and each binding's.
        self._care_of_users: dict[bytes, set[Binding]] = {}
        self._care_of: dict[Binding, bytes] = {}
        # Bindings made or changed since the last flush (an ordered set).
        self._dirty: dict[Binding, None] = {}
        for _key, binding in table:
            self._dirty[binding] = None
        table.listeners.append(self._mirror)
        table.stamps = self
        if balancer.correspondent is not None:  # strict mode: entries follow the cache
            balancer.correspondent.listeners.append(self._cache_changed)
        # A confirmation made or ended (a notification, persistence, its lifetime)
        # reaches the program at once: replies must not go on to a care-of address the
        # terminal left, nor to the home address once another is confirmed.
        balancer.return_paths.listeners.append(self._route_changed)
        self.prepare()

    # -- the policy and the clock ---------------------------------------------------

    def refresh_policy(self) -> bool:
        """Rewrite the configuration and backends if the policy changed (True then)."""
        policy = self.balancer.policy
        if policy is self._policy:
            return False
        self._policy = policy
        cn = self.balancer.correspondent
        strict = cn.bindings if policy.strict_hao and cn is not None else None
        if strict is not self._strict:
            self._strict = strict
            for binding in getattr(self, "_homes", ()):  # written again at the next flush
                self._dirty[binding] = None
        program = self.program
        for address in policy.by_address:
            self._index_of(address)
        for address, i in self._index.items():
            program.backends.update(_U32.pack(i), self._backend_entry(policy, address))
            program.backend_ix.update(address, _U32.pack(i))
        _replace(program.ports, {_U16.pack(p) for p in policy.ports})
        _replace(program.own, set(policy.own))
        self._write_config()
        return True

    def _backend_entry(self, policy: Policy, address: bytes) -> bytes:
        backend = policy.by_address.get(address)
        flags = 0
        if backend is not None:
            flags |= _CONFIGURED
            if policy.usable(backend):
                flags |= _USABLE
            self._names[self._index[address]] = backend.name
        vip = policy.vips[0]
        hop = self._next_hops.get(address)
        if hop is not None:
            flags |= _NEXT_HOP
        ifindex, eth, mtu = hop or (0, bytes(12), 0)
        return _BACKEND.pack(address, flags, delta16(vip, address), delta16(address, vip),
                             ifindex, eth, mtu, 0)  # fmt: skip

    def set_next_hops(self, hops: Mapping[bytes, tuple[int, bytes, int]]) -> None:
        """The next hop of terminals' packets to each backend address: (link index,
        the backend's MAC followed by the link's, the link's MTU), as user space reads
        them from the neighbour table (the forwarder, at every sweep); a backend left
        out goes back to the kernel's lookup (``bpf_fib_lookup``), which also takes
        what the link's MTU does not.  Why: that lookup was a sixth of the program's
        cost per packet (docs/performance.md)."""
        hops = {a: h for a, h in hops.items() if len(h[1]) == 12}
        if hops == self._next_hops:
            return
        changed = {a for a in hops.keys() | self._next_hops.keys()
                   if hops.get(a) != self._next_hops.get(a)}  # fmt: skip
        self._next_hops = dict(hops)
        policy = self._policy
        if policy is None:
            return
        for address in changed:
            i = self._index.get(address)
            if i is not None:
                self.program.backends.update(_U32.pack(i), self._backend_entry(policy, address))

    def _index_of(self, address: bytes) -> int | None:
        i = self._index.get(address)
        if i is None:
            if len(self._index) >= _MAX_BACKENDS:
                return None
            i = self._index[address] = len(self._index)
            self._names.append("")
            self._backend_counted.append(0)
        return i

    def _write_config(self) -> None:
        policy = self._policy
        assert policy is not None
        flags = 0
        if policy.fast_inbound is None:
            flags |= _INBOUND
        if policy.fast_replies is None:
            flags |= _REPLIES
        if policy.translate:
            flags |= _TRANSLATE
        if policy.ports:
            flags |= _PORTS
        if not self.attached:
            flags |= _DRY
        if self.fixed_clock:
            flags |= _FIXED_CLOCK
        table = self.balancer.table
        now = self.clock.seconds()
        fixed = _ns(now) if self.fixed_clock else 0
        offset = 0 if self.fixed_clock else _ns(now) - time.monotonic_ns()
        config = _CONFIG.pack(policy.vips[0], flags, 0, _ns(table.lifetime),
                              _ns(table.resolution), offset, fixed)  # fmt: skip
        if config != self._config:
            self.program.config.update(_U32.pack(0), config)
            self._config = config

    def prepare(self) -> None:
        """Before a batch (or on a timer): the policy, the clock, the return paths, the
        bindings made since the last flush."""
        self.flush()
        self.refresh_policy()
        self._write_config()
        self._mirror_routes()

    # -- the table, mirrored ----------------------------------------------------------

    def _mirror(self, binding: Binding, bound: bool) -> None:
        """`StickyTable.listeners`: a binding made, re-pointed or given another alias
        (`bound`: written at the next `flush`, when the core has finished with the
        packet -- its care-of address is set after the listeners are told), or gone
        (removed from the program now)."""
        if bound:
            if not self._dirty and self.on_dirty is not None:
                self.on_dirty()
            self._dirty[binding] = None
        else:
            self._dirty.pop(binding, None)
            self._write(binding, ())

    def flush(self) -> None:
        """Write the bindings made or changed since the last flush.  The forwarder runs
        it after every batch the general path handled; `prepare` and `sync` run it."""
        dirty = self._dirty
        while dirty:
            binding = next(iter(dirty))
            del dirty[binding]
            self._write(binding, _addresses(binding))

    def _write(self, binding: Binding, now: tuple[bytes, ...]) -> None:
        """Each of `binding`'s address identities `now` (its key and its address
        aliases: home and care-of addresses) leads to its backend in the program; the
        ones it had before and lost lead nowhere."""
        owner, homes_of = self._owner, self._homes
        before = homes_of.pop(binding, ())
        changed = [h for h in before if h not in now] + [h for h in now if h not in before]
        for home in before:
            if home not in now and owner.get(home) is binding:
                self._drop_entry(home, binding)
                del owner[home]
                self._left_out.pop(home, None)
        if not now:
            self._forget_care_of(binding)
            self._recheck(changed, binding)
            return
        homes_of[binding] = now
        i = self._index_of(binding.backend.packed)
        if i is not None and not self._names[i]:
            self._names[i] = binding.backend.name
        for home in now:
            previous = owner.get(home)
            if previous is not None and previous is not binding:
                self._fold(home, previous)  # its packets there are the binding it left's
            owner[home] = binding
            if i is None:  # no room for another backend: the general path serves it
                self._drop_entry(home, binding)
                continue
            try:
                self._write_binding(home, binding, i)
            except OSError as e:
                if e.errno != errno.E2BIG:
                    raise
                # The maps are full (two identities per binding of the table's bound:
                # a terminal that moved a lot has more): this one is not offloaded
                # until room is made, its packets go up to the Python paths, which
                # serve them as before.
                self._synced.pop(home, None)
                if home not in self._left_out:
                    self._map_full()
                self._left_out[home] = binding
            else:
                self._left_out.pop(home, None)
        self._recheck(changed, binding)

    def _drop_entry(self, home: bytes, binding: Binding) -> None:
        """`home` no longer leads to `binding` in the program: its last packets there
        folded in, its entry deleted."""
        if home in self._synced:
            self._fold(home, binding)
            self.program.bindings.delete(home)
            del self._synced[home]
            self._room_made = True

    def _map_full(self) -> None:
        self.full += 1
        if self.full & (self.full - 1) == 0:  # the 1st, 2nd, 4th... (a bounded log)
            _log.warn("XDP maps full: {count} identities not offloaded so far (their "
                      "packets take the Python paths)", count=self.full)

    def _write_binding(self, home: bytes, binding: Binding, index: int) -> None:
        """`home`'s entry: the binding's backend, expiry and care-of address -- without
        the care-of address (so the program hands the terminal's packets up) when that
        address is an identity of another binding: the core then counts the conflict
        of every such packet (an identity bound elsewhere is never linked); and, in the
        correspondent's strict mode, unless the binding cache maps `home` to it: the
        general path answers the others with a Binding Error."""
        care_of = binding.care_of
        if care_of is not None and self._care_of.get(binding) != care_of:
            self._forget_care_of(binding)
            self._care_of[binding] = care_of
            self._care_of_users.setdefault(care_of, set()).add(binding)
        usable = care_of is not None and self._owner.get(care_of, binding) is binding and (
            self._strict is None or self._strict.get(home) == care_of)
        entry = _BINDING.pack(index, _HAS_CARE_OF if usable else 0, _ns(binding.expires),
                              care_of or bytes(16), 0, 0, 0, 0)
        bindings = self.program.bindings
        if home in self._synced:
            # The program's stamps carried over: read just before, so the hits of a
            # packet forwarded between the read and the write (microseconds; a write
            # follows a change of the binding, or a stale pass) are not counted in
            # the binding's packets -- the per-CPU counters have them.
            old = bindings.lookup(home)
            if old is not None:
                entry = entry[:_STAMPS] + old[_STAMPS:]
        bindings.update(home, entry)
        self._synced.setdefault(home, (0, 0))

    def _cache_changed(self, home: bytes) -> None:
        """`Correspondent.listeners`: `home`'s binding cache entry was made, changed or
        ended: its binding's entries are written again at the next flush."""
        binding = self._owner.get(home)
        if binding is not None:
            self._mirror(binding, True)

    def _forget_care_of(self, binding: Binding) -> None:
        care_of = self._care_of.pop(binding, None)
        if care_of is not None:
            users = self._care_of_users.get(care_of)
            if users is not None:
                users.discard(binding)
                if not users:
                    del self._care_of_users[care_of]

    def _recheck(self, homes: list[bytes], changed: Binding) -> None:
        """Identities that now lead to `changed`, or no longer do: the other bindings
        whose care-of address is one of them are written again (a conflict came or
        went)."""
        users = self._care_of_users
        for home in homes:
            for other in list(users.get(home, ())):
                if other is not changed and other in self._homes:
                    i = self._index.get(other.backend.packed)
                    if i is not None:
                        for its in self._homes[other]:
                            if its in self._synced:  # offloaded (`_write` made room)
                                self._write_binding(its, other, i)

    def _route_changed(self, home: bytes, care_of: bytes | None) -> None:
        """`ReturnPaths.listeners`: `home`'s confirmed care-of address, now (None: none)."""
        if care_of is None:
            if self._routes.pop(home, None) is not None:
                self.program.confirmed.delete(home)
        elif self._routes.get(home) != care_of:
            self.program.confirmed.update(home, care_of)
            self._routes[home] = care_of

    def _mirror_routes(self) -> None:
        """The whole of `ReturnPaths.routes` against the last copy (at `prepare`: a
        store replaced, or changes made before this executor listened)."""
        routes = self.balancer.return_paths.routes
        if routes == self._routes:
            return
        confirmed = self.program.confirmed
        for home in self._routes.keys() - routes.keys():
            confirmed.delete(home)
        for home, care_of in routes.items():
            if self._routes.get(home) != care_of:
                confirmed.update(home, care_of)
        self._routes = dict(routes)

    # -- what the program did -----------------------------------------------------------

    def sync(self, ahead: float = 2.0) -> int:
        """Before every sweep: the stamps of the bindings due within `ahead` seconds
        folded into the table (claim 10; make it longer than the sweep interval), the
        identities the program passed up written again, the counters folded into the
        shared `Counters`.  Returns the bindings the fold refreshed."""
        if self._room_made:  # identities left out for want of room: tried again
            self._room_made = False
            for home, binding in self._left_out.items():
                if self._owner.get(home) is binding:
                    self._dirty[binding] = None
        self.flush()
        self._rewrite_stale()
        table = self.balancer.table
        refreshed = 0
        for binding in table.due(self.clock.seconds() + ahead):
            refreshed += self.fold(binding)
        self.fold_counters()
        if not self.fixed_clock:
            self._write_config()  # the clock offset follows the reactor's clock
        return refreshed

    def fold(self, binding: Binding) -> bool:
        """`Stamps.fold`: tell the table the packets the program forwarded for
        `binding` since the last fold (True if there were any)."""
        folded = False
        for home in self._homes.get(binding, ()):
            folded |= self._fold(home, binding)
        return folded

    def fold_all(self) -> None:
        """`Stamps.fold_all`: every stamp at once, in one pass over ``lb_bindings``; and
        the identities whose stale count moved written again (for when ``lb_stale``
        could not record some)."""
        self.flush()
        owner, synced = self._owner, self._synced
        stale_homes = []
        for home, raw in self.program.bindings.items():
            binding = owner.get(home)
            before = synced.get(home)
            if binding is None or before is None:
                continue
            self._tell(home, binding, raw)
            stale = _HITS.unpack_from(raw, _STAMPS)[3]
            if stale != before[1]:
                synced[home] = (synced[home][0], stale)
                stale_homes.append(home)
        for home in stale_homes:
            self._write_again(home)

    def _fold(self, home: bytes, binding: Binding) -> bool:
        """`home`'s stamp, read now, into `binding` (what it leads to): the packets
        since the last fold, at the expiry the last of them gave."""
        if home not in self._synced or self._owner.get(home) is not binding:
            return False
        try:
            raw = self.program.bindings.lookup(home)
        except OSError as e:  # the table is mid-way through a sweep: never raise into it
            _log.error("XDP stamp of {home} unreadable: {e}", home=home.hex(), e=e)
            return False
        return raw is not None and self._tell(home, binding, raw)

    def _tell(self, home: bytes, binding: Binding, raw: bytes) -> bool:
        """`home`'s entry as read (`raw`) told to the table for `binding`: the hits
        since the last fold, at the expiry the last of them gave (True if any)."""
        _seen_ns, expires_ns, hits, _stale = _HITS.unpack_from(raw, _STAMPS)
        told, stale = self._synced[home]
        if hits <= told:
            return False
        self._synced[home] = (hits, stale)
        self.balancer.table.extend(binding, expires_ns / 1e9, hits - told)
        return True

    def _rewrite_stale(self) -> None:
        """The identities the program passed up (``lb_stale``), written again from what
        the table says now (its expiry, its care-of address), so the terminal's next
        packets stay in the driver; a whole pass if the program could not record some.
        Each is taken off the set before it is written: one passed up again meanwhile
        is back in the set for the next sync."""
        stale = self.program.stale
        for home, _ in list(stale.items()):
            stale.delete(home)
            self._write_again(home)
        lost = self.program.counters.per_cpu_sums(C_UNQUEUED)
        if lost != self._unqueued:
            self._unqueued = lost
            self.fold_all()

    def _write_again(self, home: bytes) -> None:
        binding = self._owner.get(home)
        if binding is not None and home in self._synced:
            i = self._index.get(binding.backend.packed)
            if i is not None:
                self._write_binding(home, binding, i)

    def fold_counters(self) -> None:
        """Add what the program counted since the last fold to the shared `Counters`
        (`sync` does it too; `lbproxyctl stats` does it so its totals are current)."""
        program, counters = self.program, self.balancer.counters
        now = [program.counters.per_cpu_sums(i) for i in range(len(_COUNTER_NAMES))]
        d_in = now[C_IN_PACKETS] - self._counted[C_IN_PACKETS]
        d_rep = now[C_REPLY_PACKETS] - self._counted[C_REPLY_PACKETS]
        self._counted = now
        if d_in:
            counters.packets_in += d_in
            counters.packets_out += d_in
            counters.hoa_hits_pending += d_in
            for i, name in enumerate(self._names):
                total = program.backend_packets.per_cpu_sums(i)
                if total != self._backend_counted[i]:
                    counters.backend_cell(name)[0] += total - self._backend_counted[i]
                    self._backend_counted[i] = total
        if d_rep:
            counters.replies_in += d_rep
            counters.replies_out += d_rep

    def stats(self) -> dict[str, int]:
        """What the program counted since it was loaded (all CPUs): packets and bytes
        forwarded per direction, packets handed up, stale passes, next hops missing;
        and identities not offloaded for want of room in the maps (``full``)."""
        return {**dict(zip(_COUNTER_NAMES, self._counted, strict=True)), "full": self.full}

    def last_seen(self, home: bytes) -> float | None:
        """The table-clock time of the program's last hit for `home` (None: none yet)."""
        raw = self.program.bindings.lookup(home)
        if raw is None:
            return None
        seen_ns = _HITS.unpack_from(raw, _STAMPS)[0]
        return seen_ns / 1e9 if seen_ns else None

    def seen(self, binding: Binding) -> tuple[float, float, int] | None:
        """What the program knows of `binding` that the table may not have yet (it
        folds in when the table needs it): its last hit on any of the binding's address
        identities as (table-clock time, the expiry that hit gave, hits not yet
        folded in); None when the program never forwarded a packet of it.  The
        operator's ``show`` reads it: a binding whose traffic stays in the driver is
        not idle."""
        synced = self._synced
        found: tuple[float, float, int] | None = None
        new = 0
        for home in self._homes.get(binding, ()):
            raw = self.program.bindings.lookup(home)
            if raw is None:
                continue
            seen_ns, expires_ns, hits, _stale = _HITS.unpack_from(raw, _STAMPS)
            if not hits:
                continue
            new += max(0, hits - synced.get(home, (0, 0))[0])
            if found is None or seen_ns / 1e9 > found[0]:
                found = (seen_ns / 1e9, expires_ns / 1e9, 0)
        return None if found is None else (found[0], found[1], new)

    def view(self) -> ProgramView:
        """What the program reads to decide, read from its maps as questions come
        (`lbproxy.io.xdpverdict.decide`: ``lbproxyctl trace``)."""
        program = self.program
        raw = program.config.lookup(_U32.pack(0)) or bytes(_CONFIG.size)
        vip, flags, _pad, _lifetime, _resolution, offset, fixed = _CONFIG.unpack(raw)
        now = fixed if flags & _FIXED_CLOCK else time.monotonic_ns() + offset

        def binding(home: bytes) -> tuple[int, int, int, bytes, int] | None:
            raw = program.bindings.lookup(home)
            if raw is None:
                return None
            entry = _BINDING.unpack(raw)  # (index, flags, expiry, care-of, then stamps)
            return entry[0], entry[1], entry[2], entry[3], entry[5]

        def backend(index: int) -> tuple[bytes, int] | None:
            if not 0 <= index < _MAX_BACKENDS:
                return None
            raw = program.backends.lookup(_U32.pack(index))
            return None if raw is None else _BACKEND.unpack(raw)[:2]

        def backend_index(address: bytes) -> int | None:
            raw = program.backend_ix.lookup(address)
            return None if raw is None else int(_U32.unpack(raw)[0])

        def name(index: int) -> str:
            names = self._names
            return names[index] if 0 <= index < len(names) and names[index] else f"#{index}"

        policy = self._policy
        return ProgramView(
            flags=flags, vip=vip, now_ns=now, binding=binding,
            backend=backend, backend_index=backend_index,
            port_served=lambda port: program.ports.lookup(_U16.pack(port)) is not None,
            own=lambda address: program.own.lookup(address) is not None,
            confirmed=program.confirmed.lookup, names=name,
            inbound_off=(policy.offload_inbound or "") if policy is not None else "",
            replies_off=(policy.fast_replies or "") if policy is not None else "",
        )  # fmt: skip

    def decide(self, packet: bytes) -> Decision:
        """Whether the program would forward `packet` (an IPv6 packet) itself, and why
        not: its own tests on what its maps hold now, without running it (which would
        stamp and count).  ``lbproxyctl trace`` shows it."""
        return decide(packet, self.view())

    # -- interfaces --------------------------------------------------------------------

    def attach(self, client: str, server: str, flags: int = XDP_FLAGS_DRV_MODE,
               namespace: str | None = None) -> None:  # fmt: skip
        """Put the program on the client link (terminals' packets) and the server link
        (replies), in driver mode unless `flags` say otherwise; the interfaces are
        `namespace`'s (an ``ip netns`` name; None: this thread's)."""
        from lbproxy.io.rawsocket import _network_namespace

        self.attached = True
        self._write_config()
        program = self.program
        try:
            with _network_namespace(namespace):
                for name, interface in (("lbproxy_inbound", client), ("lbproxy_replies", server)):
                    try:
                        ifindex = socket.if_nametoindex(interface)
                    except OSError as e:
                        raise OSError(e.errno, f"no interface {interface}") from None
                    try:
                        program.attach(name, ifindex, flags)
                    except OSError as e:
                        why = _attach_error(e.errno or 0)
                        raise OSError(e.errno, f"{interface}: {why}") from None
        except OSError:
            program.detach()
            self.attached = False
            self._write_config()
            raise

    def close(self) -> None:
        """Stop mirroring, detach and unload."""
        table = self.balancer.table
        if self._mirror in table.listeners:
            table.listeners.remove(self._mirror)
        if table.stamps is self:
            table.stamps = None
        routes = self.balancer.return_paths.listeners
        if self._route_changed in routes:
            routes.remove(self._route_changed)
        self.program.close()

    @classmethod
    def open(
        cls,
        balancer: Balancer,
        clock: IReactorTime,
        client: str,
        server: str,
        *,
        namespace: str | None = None,
        path: Path | str = OBJECT,
        proc: str = "/proc/sys/net/ipv6/conf",
    ) -> XdpOffload:
        """The executor loaded and attached in driver mode to both links, or
        `XdpUnavailable` saying why not in one line: no libbpf, no object, not
        permitted, IPv6 forwarding off on a link (the program's next-hop lookup,
        ``bpf_fib_lookup``, answers only on a forwarding interface), a driver without
        native XDP, another program already there."""
        try:
            program = XdpProgram(path, balancer.table.max_entries)
        except OSError as e:  # not permitted to create maps, say
            raise XdpUnavailable(f"cannot load the XDP program: {e.strerror or e}") from None
        off = [i for i in (client, server) if _forwarding(proc, i, namespace) == "0"]
        if off:
            program.close()
            raise XdpUnavailable(
                f"IPv6 forwarding is off on {' and '.join(off)}; the program's next-hop "
                f"lookup needs it ({', '.join(f'net.ipv6.conf.{i}.forwarding=1' for i in off)};"
                " docs/deploying.md)"
            )
        try:
            offload = cls(balancer, clock, program=program)
        except BaseException:
            program.close()
            raise
        try:
            offload.attach(client, server, namespace=namespace)
        except BaseException as e:
            offload.close()  # no longer a listener of the table either
            if isinstance(e, OSError):
                raise XdpUnavailable(
                    f"cannot attach the XDP program: {e.strerror or e}") from None
            raise
        return offload


def _forwarding(proc: str, interface: str, namespace: str | None) -> str | None:
    """``net.ipv6.conf.<interface>.forwarding`` ("0", "1"), or None when it cannot be
    read (no such interface: the attachment says so)."""
    from lbproxy.io.rawsocket import _network_namespace

    try:
        # /proc/sys/net shows the namespace of whoever opens it.
        with _network_namespace(namespace), open(f"{proc}/{interface}/forwarding") as f:
            return f.read().strip()
    except OSError:
        return None


def _addresses(binding: Binding) -> tuple[bytes, ...]:
    """The address identities (16 bytes each) of `binding`: its key and its aliases of
    the address kind (the home-address kind's code)."""
    keys = [binding.key, *(getattr(binding, "aliases", None) or ())]
    return tuple(bytes(k[1:]) for k in keys if len(k) == 17 and k[:1] == _HOA_KIND)


def _replace(m: _Map, keys: set[bytes]) -> None:
    """Make the set map `m` hold exactly `keys` (value 1)."""
    for key, _ in list(m.items()):
        if key not in keys:
            m.delete(key)
    for key in keys:
        m.update(key, b"\x01")
