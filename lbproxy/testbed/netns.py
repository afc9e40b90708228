"""Thin wrappers over ``ip``, ``nft``, ``ethtool`` and setns(2) for the test bed.

Everything the bed does to the host goes through here, so that a missing
privilege or tool is reported once, clearly (:class:`BedUnavailableError`),
and a test can turn it into a skip with that reason.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import shutil
import subprocess
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager

CLONE_NEWNET = 0x40000000
REQUIRED_TOOLS = ("ip", "nft", "ethtool")

_libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)


class BedUnavailableError(RuntimeError):
    """The host cannot run the test bed (not root, a tool or /dev/net/tun missing)."""

    __test__ = False  # not a test case, whatever its name says


class CommandError(RuntimeError):
    """A command configuring the bed failed; the message has its output."""


def check_host() -> None:
    """Raise :class:`BedUnavailableError` with the reason if the bed cannot run here."""
    if os.geteuid() != 0:
        raise BedUnavailableError("the network test bed needs root (network namespaces)")
    missing = [tool for tool in REQUIRED_TOOLS if shutil.which(tool) is None]
    if missing:
        raise BedUnavailableError(
            f"the network test bed needs {', '.join(missing)} (Debian: nftables, ethtool, "
            "iproute2; `make system-deps`)")
    if not os.path.exists("/dev/net/tun"):
        raise BedUnavailableError("the network test bed needs /dev/net/tun")


def run(argv: Sequence[str], input: str | None = None, timeout: float = 30.0,
        check: bool = True) -> subprocess.CompletedProcess[str]:
    """Run a command, capturing its output; raise :class:`CommandError` if it fails."""
    result = subprocess.run(list(argv), input=input, capture_output=True, text=True,
                            timeout=timeout, check=False)
    if check and result.returncode != 0:
        raise CommandError(f"{' '.join(argv)} exited {result.returncode}: "
                            f"{result.stderr.strip() or result.stdout.strip()}")
    return result


def ip_batch(commands: Sequence[str], netns: str | None = None) -> None:
    """Run ``ip`` commands (without the leading ``ip``) in one process, in ``netns``."""
    if not commands:
        return
    argv = ["ip"] + (["-n", netns] if netns else []) + ["-batch", "-"]
    run(argv, input="\n".join(commands) + "\n")


def shell(netns: str, script: str) -> None:
    """Run a ``sh -e`` script inside ``netns`` (sysctl writes, ethtool, nft)."""
    run(["ip", "netns", "exec", netns, "sh", "-ec", script])


def exists(netns: str) -> bool:
    """Does a named network namespace ``netns`` exist?"""
    return os.path.exists(f"/run/netns/{netns}")


def delete(netns: str, attempts: int = 10) -> None:
    """Delete ``netns`` if it exists (its veth ends and TUN devices go with it).

    Retried briefly: the namespace file stays busy while a process that
    ``ip netns exec`` started there is still exiting.
    """
    for attempt in range(attempts):
        if not exists(netns):
            return
        run(["ip", "netns", "del", netns], check=False)
        if attempt:
            time.sleep(0.1)
    if exists(netns):
        raise CommandError(f"could not delete network namespace {netns}")


def _setns(fd: int) -> None:
    if _libc.setns(fd, CLONE_NEWNET) != 0:
        errno = ctypes.get_errno()
        raise OSError(errno, os.strerror(errno))


@contextmanager
def inside(netns: str) -> Iterator[None]:
    """Run the block with the calling thread inside ``netns``.

    Sockets opened in the block stay in ``netns`` after it ends: this is how
    a test in the root namespace gets a UDP or AF_PACKET socket in the bed.
    Other threads are unaffected (network namespaces are per thread).
    """
    original = os.open("/proc/thread-self/ns/net", os.O_RDONLY)
    try:
        target = os.open(f"/run/netns/{netns}", os.O_RDONLY)
        try:
            _setns(target)
        finally:
            os.close(target)
        try:
            yield
        finally:
            _setns(original)
    finally:
        os.close(original)
