"""Registries: names in the configuration to the factories that build them.

Why a module of its own: key strategies (`lbproxy.core.keys`) and schedulers
(`lbproxy.core.selection`) are both named in the configuration and both extensible by
third-party packages, through Python entry points (groups ``lbproxy.key_strategies`` and
``lbproxy.schedulers``).  One `Registry` class does it for both, so the rules -- lazy
loading, what happens to a broken entry point, the text of "unknown name" errors -- are
written once.  docs/core.md shows a plugin package.
"""

from __future__ import annotations

import importlib.metadata
from collections import Counter
from collections.abc import Callable
from typing import Generic, TypeVar

from twisted.logger import Logger

__all__ = ["Registry", "reason"]

T = TypeVar("T")

_log = Logger()


def _one_word(name: object) -> bool:
    return isinstance(name, str) and bool(name) and not any(c.isspace() for c in name)


def reason(e: BaseException) -> str:
    """An exception as one line: its type and message."""
    return f"{type(e).__name__}: {e}"


class Registry(Generic[T]):
    """Names to factories: built-in ones registered in code, third-party ones found
    through the Python entry points of one group.

    Why: configuration names key strategies and schedulers, and a new one should need a
    package of its own, not an edit of lbproxy.  Entry points are read lazily and once --
    on the first :meth:`names`, or the first :meth:`get` of a name not registered in
    code -- so importing lbproxy never imports a plugin, and a plugin may import lbproxy.
    Each entry point's object goes through `accept`, which returns the registry's entry or
    raises ``TypeError``/``ValueError`` saying why the object is unfit.  An entry point
    that fails to import, is unfit, or whose name is taken (by a built-in, or by another
    entry point of the same group) is skipped with one logged warning naming it and the
    reason; its name is then simply not registered.
    """

    def __init__(self, what: str, group: str, accept: Callable[[object], T]) -> None:
        self.what = what
        self.group = group
        self._accept = accept
        self._entries: dict[str, T] = {}
        self._from_entry_points: set[str] = set()
        self._loaded = False

    def register(self, name: str, entry: T) -> None:
        """Add `entry` under `name` (one word); ``ValueError`` if the name is taken."""
        if not _one_word(name):
            raise ValueError(f"a {self.what} name is one word, not {name!r}")
        if name in self._entries:
            raise ValueError(f"{self.what} {name!r} is already registered")
        self._entries[name] = entry

    def unregister(self, name: str) -> None:
        """Forget `name` (for tests); an unknown name is ignored."""
        self._entries.pop(name, None)
        self._from_entry_points.discard(name)

    def get(self, name: str) -> T | None:
        """The entry registered as `name`, or None."""
        entry = self._entries.get(name)
        if entry is None and not self._loaded:
            self.load_entry_points()
            entry = self._entries.get(name)
        return entry

    def names(self) -> tuple[str, ...]:
        """Every registered name: those registered in code, in order, then entry points'."""
        self.load_entry_points()
        return tuple(self._entries)

    def __contains__(self, name: object) -> bool:
        return isinstance(name, str) and self.get(name) is not None

    def unknown(self, name: object) -> str:
        """The reason given for a name that is not registered; it lists those that are."""
        registered = ", ".join(self.names())
        return f"{name!r} is not a registered {self.what} (registered: {registered})"

    def load_entry_points(self) -> None:
        """Read the group's entry points, unless done already."""
        if self._loaded:
            return
        self._loaded = True  # first: a plugin that asks for names must not come back here
        try:
            found = list(importlib.metadata.entry_points(group=self.group))
        except Exception as e:
            _log.warn(
                "Cannot read the entry points of group {group}: {reason}",
                group=self.group,
                reason=reason(e),
            )
            return
        same_name = Counter(ep.name for ep in found)
        for ep in found:
            skipped = self._add(ep, same_name[ep.name])
            if skipped is not None:
                _log.warn(
                    "Skipped {what} entry point {entry_point!r} of group {group} "
                    "(distribution {distribution}): {reason}",
                    what=self.what,
                    entry_point=f"{ep.name} = {ep.value}",
                    group=self.group,
                    distribution=_distribution(ep),
                    reason=skipped,
                )

    def _add(self, ep: importlib.metadata.EntryPoint, same_name: int) -> str | None:
        """Register one entry point; the reason it is skipped, or None."""
        if not _one_word(ep.name):
            return f"a {self.what} name is one word, not {ep.name!r}"
        if same_name > 1:
            return f"{same_name} entry points of the group are named {ep.name!r}; none is used"
        if ep.name in self._entries:
            return f"{self.what} {ep.name!r} is already registered"
        try:
            obj = ep.load()
        except Exception as e:
            return f"cannot load it: {reason(e)}"
        try:
            entry = self._accept(obj)
        except (TypeError, ValueError) as e:
            return str(e)
        if ep.name in self._entries:  # its module registered the name itself
            return f"{self.what} {ep.name!r} is already registered"
        self._entries[ep.name] = entry
        self._from_entry_points.add(ep.name)
        return None

    def forget_entry_points(self) -> None:
        """Drop what entry points added, and read them again when next asked (for tests
        that put a distribution of their own on ``sys.path``)."""
        for name in self._from_entry_points:
            self._entries.pop(name, None)
        self._from_entry_points.clear()
        self._loaded = False


def _distribution(ep: importlib.metadata.EntryPoint) -> str:
    dist = getattr(ep, "dist", None)
    try:
        return f"{dist.name} {dist.version}" if dist is not None else "unknown"
    except Exception:
        return "unknown"
