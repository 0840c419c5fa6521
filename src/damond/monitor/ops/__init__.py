"""The ops tables: which operations sets and access checks exist, and which this host can run.

Every fact about an operations set or an access check is in its table
(Operations, AccessCheckOps in ops/base.py), and this module fills them:
the admin tree, the engine and the command line ask a Registry, and compare
no operations name of their own. Tests and tools that need another host build
a Registry of their own tables instead of patching these.

Availability is probed once per Registry (kernels do not grow config options
at run time) without disturbing anything: files are opened, never written.
"""

from __future__ import annotations

import ctypes
import errno
import mmap
import os
from collections.abc import Sequence

from damond.monitor.config import CORE_FILTER_TYPES, STAT
from damond.monitor.ops import madvise, page_idle
from damond.monitor.ops.base import (
    AccessCheck,
    AccessCheckOps,
    ActionOps,
    Actions,
    AddressSpace,
    KernelRefused,
    Operations,
    TargetGone,
    Unsupported,
)
from damond.monitor.ops.clear_refs import ClearRefsAccess
from damond.monitor.ops.paddr import PaddrSpace
from damond.monitor.ops.page_idle import PageIdleAccess
from damond.monitor.ops.process import ProcessTable
from damond.monitor.ops.soft_dirty import PM_SOFT_DIRTY, SoftDirtyAccess
from damond.monitor.ops.vaddr import FvaddrSpace, VaddrSpace

__all__ = [
    "ACCESS_CHECKS",
    "AUTO",
    "OPERATIONS",
    "REGISTRY",
    "AccessCheck",
    "AccessCheckOps",
    "ActionOps",
    "Actions",
    "AddressSpace",
    "KernelRefused",
    "Operations",
    "ProcessTable",
    "Registry",
    "TargetGone",
    "Unsupported",
]

AUTO = "auto"
"""The access check to ask for when any will do: the most precise one available."""

PAGE_IDLE_BITMAP = page_idle.BITMAP
KPAGEFLAGS = page_idle.KPAGEFLAGS
CLEAR_REFS = "/proc/self/clear_refs"
SMAPS = "/proc/self/smaps"
PAGEMAP = "/proc/self/pagemap"


def _open_reason(path: str, flags: int) -> str:
    """'' if path opens with flags, else why not. Opening these files changes nothing."""
    try:
        os.close(os.open(path, flags | os.O_CLOEXEC))
    except OSError as e:
        if e.errno == errno.ENOENT:
            return f"{path} missing"
        return f"{path}: {e.strerror}"
    return ""


def probe_page_idle(bitmap: str = PAGE_IDLE_BITMAP, kpageflags: str = KPAGEFLAGS) -> str:
    """'' when idle page tracking works here, else the reason.

    The bitmap must open for reading and writing; /proc/kpageflags too, for
    reading: without it a huge page's tails cannot be mapped to their heads.
    """
    if not os.path.exists(bitmap):
        return f"page_idle: CONFIG_IDLE_PAGE_TRACKING is not set: {bitmap} missing"
    reason = _open_reason(bitmap, os.O_RDWR)
    if reason:
        return f"page_idle: {reason} (needs root)"
    reason = _open_reason(kpageflags, os.O_RDONLY)
    if reason:
        return f"page_idle: {reason} (needed to map huge pages to their head pages)"
    return ""


def probe_clear_refs(clear_refs: str = CLEAR_REFS, smaps: str = SMAPS) -> str:
    """'' when clear_refs and smaps work here, else the reason."""
    if not os.path.exists(clear_refs):
        return f"clear_refs: CONFIG_PROC_PAGE_MONITOR is not set: {clear_refs} missing"
    for path, flags in ((clear_refs, os.O_WRONLY), (smaps, os.O_RDONLY)):
        reason = _open_reason(path, flags)
        if reason:
            return f"clear_refs: {reason}"
    return ""


def probe_soft_dirty(pagemap: str = PAGEMAP) -> str:
    """'' when the kernel tracks soft-dirty bits (and clear_refs and smaps work), else why not.

    A page of a fresh mapping of our own, written once, must show pagemap bit 55:
    the kernel marks new mappings soft-dirty where CONFIG_MEM_SOFT_DIRTY is set,
    and the bit is always 0 where it is not. Nothing of anybody else changes
    (the page is ours, and unmapped again), and nothing is cleared.
    """
    reason = probe_clear_refs()
    if reason:
        return "soft_dirty: " + reason.removeprefix("clear_refs: ")
    page = mmap.mmap(-1, mmap.PAGESIZE)
    try:
        page[0] = 1
        cell = ctypes.c_char.from_buffer(page)
        address = ctypes.addressof(cell)
        del cell  # the mapping cannot close while ctypes holds a view of it
        fd = os.open(pagemap, os.O_RDONLY | os.O_CLOEXEC)
        try:
            entry = int.from_bytes(os.pread(fd, 8, address // mmap.PAGESIZE * 8), "little")
        finally:
            os.close(fd)
    except OSError as e:
        return f"soft_dirty: {pagemap}: {e.strerror}"
    finally:
        page.close()
    if not entry & PM_SOFT_DIRTY:
        return (
            "soft_dirty: CONFIG_MEM_SOFT_DIRTY is not set: a freshly written page shows no "
            f"soft-dirty bit in {pagemap}"
        )
    return ""


PAGE_IDLE = AccessCheckOps("page_idle", "page", probe_page_idle, PageIdleAccess)
SOFT_DIRTY = AccessCheckOps("soft_dirty", "page-writes", probe_soft_dirty, SoftDirtyAccess)
CLEAR_REFS_CHECK = AccessCheckOps("clear_refs", "mapping", probe_clear_refs, ClearRefsAccess)
ACCESS_CHECKS: tuple[AccessCheckOps, ...] = (PAGE_IDLE, SOFT_DIRTY, CLEAR_REFS_CHECK)
"""Every access check, the most precise first: page_idle sees reads and writes per page,
soft_dirty writes per page (reads per mapping), clear_refs everything per mapping."""

ACTIONS: tuple[ActionOps, ...] = (
    ActionOps(STAT, None, lambda: ""),
    *(
        ActionOps(name, advice, madvise.probe_advice(advice, name))
        for name, advice in (
            ("willneed", madvise.MADV_WILLNEED),
            ("cold", madvise.MADV_COLD),
            ("pageout", madvise.MADV_PAGEOUT),
            ("hugepage", madvise.MADV_COLLAPSE),
        )
    ),
)
"""The DAMOS actions of the user backend, as process_madvise(2) advice."""
PROCESS_ACTIONS = tuple(a.name for a in ACTIONS)
PROCESS_FILTERS = (*CORE_FILTER_TYPES, *madvise.PAGE_FILTERS)
KERNEL_MADVISE_ACTIONS = ("willneed", "cold", "pageout", "hugepage", "nohugepage", STAT)
"""What the kernel's vaddr operations do to a region (damos_madvise: MADV_WILLNEED,
MADV_COLD, MADV_PAGEOUT, MADV_HUGEPAGE, MADV_NOHUGEPAGE), fvaddr's too."""
KERNEL_PADDR_ACTIONS = ("pageout", "lru_prio", "lru_deprio", STAT)
"""What the kernel's paddr operations do (reclaim, mark accessed, deactivate)."""
KERNEL_PADDR_FILTERS = ("anon", "memcg", "young", *CORE_FILTER_TYPES)
"""paddr checks the per page filters of each folio (damos_pa_filter_out)."""

VADDR = Operations(
    "vaddr",
    target_has_pid=True,
    min_targets=1,
    max_targets=None,
    needs_regions=False,
    space=VaddrSpace,
    access_checks=("page_idle", "soft_dirty", "clear_refs"),
    actions=PROCESS_ACTIONS,
    filter_types=PROCESS_FILTERS,
    kernel_actions=KERNEL_MADVISE_ACTIONS,
)
FVADDR = Operations(
    "fvaddr",
    target_has_pid=True,
    min_targets=0,
    max_targets=None,
    needs_regions=True,
    space=FvaddrSpace,
    access_checks=("page_idle", "soft_dirty", "clear_refs"),
    actions=PROCESS_ACTIONS,
    filter_types=PROCESS_FILTERS,
    kernel_actions=KERNEL_MADVISE_ACTIONS,
)
PADDR = Operations(
    "paddr",
    target_has_pid=False,
    min_targets=0,
    max_targets=1,
    needs_regions=False,
    space=lambda processes: PaddrSpace(),
    access_checks=("page_idle",),
    kernel_actions=KERNEL_PADDR_ACTIONS,
    kernel_filter_types=KERNEL_PADDR_FILTERS,
)
OPERATIONS: tuple[Operations, ...] = (VADDR, FVADDR, PADDR)


class Registry:
    """A set of operations and access check tables, and what of them this host can run."""

    def __init__(
        self,
        operations: Sequence[Operations] = OPERATIONS,
        access_checks: Sequence[AccessCheckOps] = ACCESS_CHECKS,
        actions: Sequence[ActionOps] = ACTIONS,
    ) -> None:
        self._operations = {o.name: o for o in operations}
        self._checks = {c.name: c for c in access_checks}
        self._actions = {a.name: a for a in actions}
        self._reasons: dict[str, str] | None = None
        self._action_reasons: dict[str, str] | None = None

    # -- what exists ----------------------------------------------------------------------

    @property
    def operations_names(self) -> tuple[str, ...]:
        return tuple(self._operations)

    @property
    def access_check_names(self) -> tuple[str, ...]:
        return tuple(self._checks)

    def operations(self, name: str) -> Operations:
        """The table of an operations set; ValueError for a name that does not exist."""
        try:
            return self._operations[name]
        except KeyError:
            raise ValueError(f"unknown operations {name!r}") from None

    def access_check(self, name: str) -> AccessCheckOps:
        """The table of an access check; ValueError for a name that does not exist."""
        try:
            return self._checks[name]
        except KeyError:
            raise ValueError(f"unknown access check {name!r}") from None

    # -- what works here ------------------------------------------------------------------

    def _access_reasons(self) -> dict[str, str]:
        if self._reasons is None:
            self._reasons = {name: check.probe() for name, check in self._checks.items()}
        return self._reasons

    def reset(self) -> None:
        """Probe again at the next question (after the host changed under a test)."""
        self._reasons = None
        self._action_reasons = None

    def available_access_checks(self) -> list[str]:
        return [name for name, reason in self._access_reasons().items() if not reason]

    def available_operations(self) -> list[str]:
        return [name for name in self._operations if not self._operations_reason(name)]

    def _serving(self, operations: str) -> list[str]:
        """The known access checks that can serve an operations set, the most precise first."""
        return [c for c in self._operations[operations].access_checks if c in self._checks]

    def _operations_reason(self, operations: str) -> str:
        checks = self._serving(operations)
        reasons = [self._access_reasons()[name] for name in checks]
        if not all(reasons):
            return ""
        needs = f"the {checks[0]}" if len(checks) == 1 else "an"
        return f"{operations}: needs {needs} access check ({'; '.join(reasons)})"

    def why_unavailable(self, name: str) -> str:
        """Why an operations set or access check cannot run here; '' when it can."""
        if name in self._checks:
            return self._access_reasons()[name]
        if name in self._operations:
            return self._operations_reason(name)
        raise ValueError(f"unknown operations or access check {name!r}")

    def resolve_access_check(self, requested: str, operations: str) -> str:
        """The access check a context will use: AUTO picks the most precise one available.

        ValueError for names or combinations that can never work; Unsupported
        (with the reason) for what only this host cannot do.
        """
        self.operations(operations)
        serving = self._serving(operations)
        if requested == AUTO:
            for name in serving:
                if not self._access_reasons()[name]:
                    return name
            raise Unsupported(self._operations_reason(operations))
        self.access_check(requested)
        if requested not in serving:
            raise ValueError(f"{requested} works per process: not for {operations}")
        reason = self._access_reasons()[requested]
        if reason:
            raise Unsupported(reason)
        return requested

    def make_access(
        self, name: str, processes: ProcessTable, seed: int | None = None
    ) -> AccessCheck:
        """A resolved access check (never AUTO); Unsupported when it cannot run here."""
        check = self.access_check(name)
        reason = self._access_reasons()[name]
        if reason:
            raise Unsupported(reason)
        return check.make(processes, seed)

    # -- DAMOS -----------------------------------------------------------------------------

    def available_actions(self, operations: str) -> list[str]:
        """The DAMOS actions a context of this operations set can do on this host."""
        return [a for a in self._actions if not self.why_action_unavailable(a, operations)]

    def why_action_unavailable(self, action: str, operations: str) -> str:
        """Why a context of this operations set cannot do action here; '' when it can."""
        if action in madvise.USER_SPACE_CANNOT:
            return f"{action}: {madvise.USER_SPACE_CANNOT[action]}"
        table = self.operations(operations)
        if action not in table.actions or action not in self._actions:
            return (
                f"{action}: the user backend acts on processes (process_madvise(2)); on "
                f"{operations} it can only count ({STAT})"
            )
        if self._action_reasons is None:
            self._action_reasons = {name: a.probe() for name, a in self._actions.items()}
        return self._action_reasons[action]

    def why_filter_unavailable(self, filter_type: str, operations: str) -> str:
        """Why a context of this operations set cannot honour a filter type; '' when it can."""
        if filter_type in self.operations(operations).filter_types:
            return ""
        why = madvise.PAGE_FILTERS_CANNOT.get(filter_type, f"not for {operations} targets")
        return f"{filter_type} filter: {why}"

    def make_actions(self, processes: ProcessTable) -> Actions:
        """The user backend's actions, pinning targets in the given table."""
        advice = {a.name: a.advice for a in self._actions.values() if a.advice is not None}
        return madvise.MadviseActions(advice, processes)


REGISTRY = Registry()
"""This host's tables: what the daemon serves."""
