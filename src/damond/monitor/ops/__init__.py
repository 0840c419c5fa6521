"""The ops registry: which operations and access checks this host can run, and their factories.

Availability is probed once per process (kernels do not grow config options at
run time) without disturbing anything: files are opened, never written.
Tests call reset_cache() after patching PROBES or the paths.
"""

from __future__ import annotations

import errno
import os
from collections.abc import Callable
from functools import cache

from damond.monitor.ops.base import AccessCheck, AddressSpace, TargetGone, Unsupported
from damond.monitor.ops.clear_refs import ClearRefsAccess
from damond.monitor.ops.paddr import PaddrSpace
from damond.monitor.ops.page_idle import PageIdleAccess
from damond.monitor.ops.process import ProcessTable
from damond.monitor.ops.vaddr import FvaddrSpace, VaddrSpace

__all__ = [
    "ACCESS_CHECKS",
    "OPERATIONS",
    "AccessCheck",
    "AddressSpace",
    "ProcessTable",
    "TargetGone",
    "Unsupported",
    "available_access_checks",
    "available_operations",
    "make_access",
    "make_space",
    "reset_cache",
    "resolve_access_check",
    "why_unavailable",
]

OPERATIONS = ("vaddr", "fvaddr", "paddr")
ACCESS_CHECKS = ("page_idle", "clear_refs")

SUPPORTS: dict[str, tuple[str, ...]] = {
    "page_idle": ("vaddr", "fvaddr", "paddr"),
    "clear_refs": ("vaddr", "fvaddr"),
}
"""Which operations each access check can serve; auto prefers the earlier one."""

PAGE_IDLE_BITMAP = "/sys/kernel/mm/page_idle/bitmap"
KPAGEFLAGS = "/proc/kpageflags"
CLEAR_REFS = "/proc/self/clear_refs"
SMAPS = "/proc/self/smaps"

IMPLEMENTATIONS: dict[str, Callable[[ProcessTable | None, int | None], AccessCheck]] = {
    "page_idle": PageIdleAccess,
    "clear_refs": ClearRefsAccess,
}


def _implementation(name: str) -> Callable[[ProcessTable | None, int | None], AccessCheck]:
    """The factory of an access check: (processes, seed) -> AccessCheck."""
    return IMPLEMENTATIONS[name]


def _open_reason(path: str, flags: int) -> str:
    """'' if path opens with flags, else why not. Opening these files changes nothing."""
    try:
        os.close(os.open(path, flags | os.O_CLOEXEC))
    except OSError as e:
        if e.errno == errno.ENOENT:
            return f"{path} missing"
        return f"{path}: {e.strerror}"
    return ""


def probe_page_idle() -> str:
    """'' when idle page tracking works here, else the reason.

    The bitmap must open for reading and writing; /proc/kpageflags too, for
    reading: without it a huge page's tails cannot be mapped to their heads.
    """
    if not os.path.exists(PAGE_IDLE_BITMAP):
        return f"page_idle: CONFIG_IDLE_PAGE_TRACKING is not set: {PAGE_IDLE_BITMAP} missing"
    reason = _open_reason(PAGE_IDLE_BITMAP, os.O_RDWR)
    if reason:
        return f"page_idle: {reason} (needs root)"
    reason = _open_reason(KPAGEFLAGS, os.O_RDONLY)
    if reason:
        return f"page_idle: {reason} (needed to map huge pages to their head pages)"
    return ""


def probe_clear_refs() -> str:
    """'' when clear_refs and smaps work here, else the reason."""
    if not os.path.exists(CLEAR_REFS):
        return f"clear_refs: CONFIG_PROC_PAGE_MONITOR is not set: {CLEAR_REFS} missing"
    for path, flags in ((CLEAR_REFS, os.O_WRONLY), (SMAPS, os.O_RDONLY)):
        reason = _open_reason(path, flags)
        if reason:
            return f"clear_refs: {reason}"
    return ""


PROBES: dict[str, Callable[[], str]] = {
    "page_idle": probe_page_idle,
    "clear_refs": probe_clear_refs,
}


@cache
def _access_reasons() -> dict[str, str]:
    return {name: PROBES[name]() for name in ACCESS_CHECKS}


def reset_cache() -> None:
    """Probe again at the next question (tests patch PROBES or the paths first)."""
    _access_reasons.cache_clear()


def available_access_checks() -> list[str]:
    return [name for name, reason in _access_reasons().items() if not reason]


def available_operations() -> list[str]:
    return [op for op in OPERATIONS if not _operations_reason(op)]


def _operations_reason(operations: str) -> str:
    reasons = [_access_reasons()[name] for name in ACCESS_CHECKS if operations in SUPPORTS[name]]
    if not all(reasons):
        return ""
    checks = [name for name in ACCESS_CHECKS if operations in SUPPORTS[name]]
    needs = f"the {checks[0]}" if len(checks) == 1 else "an"
    return f"{operations}: needs {needs} access check ({'; '.join(reasons)})"


def why_unavailable(name: str) -> str:
    """Why an operations set or access check cannot run here; '' when it can."""
    if name in ACCESS_CHECKS:
        return _access_reasons()[name]
    if name in OPERATIONS:
        return _operations_reason(name)
    raise ValueError(f"unknown operations or access check {name!r}")


def resolve_access_check(requested: str, operations: str) -> str:
    """The access check a context will use: 'auto' picks page_idle, else clear_refs.

    ValueError for names or combinations that can never work; Unsupported
    (with the reason) for what only this host cannot do.
    """
    if operations not in OPERATIONS:
        raise ValueError(f"unknown operations {operations!r}")
    if requested == "auto":
        for name in ACCESS_CHECKS:
            if operations in SUPPORTS[name] and not _access_reasons()[name]:
                return name
        raise Unsupported(_operations_reason(operations))
    if requested not in ACCESS_CHECKS:
        raise ValueError(f"unknown access check {requested!r}")
    if operations not in SUPPORTS[requested]:
        raise ValueError(f"{requested} works per process: not for {operations}")
    reason = _access_reasons()[requested]
    if reason:
        raise Unsupported(reason)
    return requested


def make_space(operations: str, processes: ProcessTable | None = None) -> AddressSpace:
    """The address space of an operations set.

    Pass one ProcessTable to both make_space and make_access, so that both pin
    the same processes, and close it when the context stops.
    """
    if operations == "vaddr":
        return VaddrSpace(processes)
    if operations == "fvaddr":
        return FvaddrSpace(processes)
    if operations == "paddr":
        return PaddrSpace()
    raise ValueError(f"unknown operations {operations!r}")


def make_access(
    name: str, processes: ProcessTable | None = None, seed: int | None = None
) -> AccessCheck:
    """A resolved access check (never 'auto'); Unsupported when it cannot run here."""
    if name not in ACCESS_CHECKS:
        raise ValueError(f"unknown access check {name!r}")
    reason = _access_reasons()[name]
    if reason:
        raise Unsupported(reason)
    check: AccessCheck = _implementation(name)(processes, seed)
    return check
