"""The ops interface: how the engine learns address ranges and page accesses.

Like the kernel's struct damon_operations, the engine (monitor/engine.py) calls
only two small interfaces, AddressSpace and AccessCheck; each operations set
(vaddr, fvaddr, paddr) and each access check (page_idle, soft_dirty, clear_refs) is
described by one table, Operations or AccessCheckOps, which says everything
the rest of damond may know of it. The tables are filled in ops/__init__.py.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol

import numpy as np

from damond.monitor.config import CORE_FILTER_TYPES, STAT, FilterConfig, TargetConfig

if TYPE_CHECKING:
    from damond.monitor.ops.process import ProcessTable


class TargetGone(Exception):
    """The target process exited (or its memory can no longer be read)."""

    def __init__(self, pid: int, reason: str = "exited") -> None:
        super().__init__(f"target pid {pid} {reason}")
        self.pid = pid
        self.reason = reason


class Unsupported(Exception):
    """This host's kernel cannot provide an operations set or access check."""


class KernelRefused(Exception):
    """The kernel refused a request damond's own rules allowed; ``errno`` is its answer."""

    def __init__(self, message: str, errno: int) -> None:
        super().__init__(message)
        self.errno = errno


class AddressSpace(Protocol):
    """Where a target's memory is: the ranges regions must cover."""

    name: str

    def initial_ranges(self, target: TargetConfig) -> list[tuple[int, int]]:
        """Page-aligned, sorted, disjoint [start, end) ranges to build regions on.

        vaddr: the three ranges of the mappings (minus the two largest gaps);
        fvaddr: the user-given regions; paddr: System RAM (or the user's regions).
        Raises TargetGone when the process does not exist.
        """
        ...

    def update_ranges(self, target: TargetConfig) -> list[tuple[int, int]] | None:
        """Ranges to fit regions to at each update interval; None: keep as they are."""
        ...

    def close(self) -> None:
        """Release what is held for the targets (nothing, for some)."""
        ...


class AccessCheck(Protocol):
    """Per-sample access information: did the page at each address get accessed?"""

    name: str

    def prepare(self, target: TargetConfig, addrs: np.ndarray) -> None:
        """Mark the pages at addrs (uint64 array) as not accessed (idle / cleared)."""
        ...

    def check(self, target: TargetConfig, addrs: np.ndarray) -> np.ndarray:
        """A bool array: was each page at addrs accessed since prepare()?

        Raises TargetGone when the process has exited.
        """
        ...

    def close(self) -> None:
        """Release files and handles held for the targets."""
        ...


class TargetSampler(Protocol):
    """A whole sample of one target in one call per step: an access check's optional fast path.

    Right after each sleep between samples, every Python or numpy call costs
    tens to hundreds of µs under emulation (docs/benchmarks.md), and the
    reference path makes several per target and sample: the engine picks the
    addresses (Regions.pick_sampling_addrs), the check marks them, answers
    with an array, the engine adds it. An access check that can do all of it
    in one call offers ``sampler(target)`` (see sampler_of); its answers must
    be exactly those of prepare() and check() on the addresses
    pick_sampling_addrs picks from the same uniforms (tested for page_idle).
    """

    def prepare(
        self, starts: np.ndarray, ends: np.ndarray, uniforms: np.ndarray, offset: int, /
    ) -> None:
        """Pick the page of each region [starts[i], ends[i]) that uniforms[offset + i]
        picks (as Regions.pick_sampling_addrs), and mark it as prepare() does.

        Raises TargetGone when the process has exited.
        """
        ...

    def check(self, nr_accesses: np.ndarray, /) -> None:
        """Add 1 to nr_accesses[i] (uint32, in place) where region i's page was accessed
        since prepare(). Raises TargetGone when the process has exited."""
        ...

    def close(self) -> None:
        """Release what it holds (it may hold its own fds)."""
        ...


def sampler_of(access: AccessCheck, target: TargetConfig) -> TargetSampler | None:
    """The fast path access offers for target, or None: the engine then uses prepare and
    check, the reference every access check has. An access check offers one by a method
    ``sampler(target) -> TargetSampler | None`` (page_idle's C path does)."""
    offer = getattr(access, "sampler", None)
    return offer(target) if offer is not None else None


@dataclass(frozen=True)
class Operations:
    """One operations set: the kernel's struct damon_operations plus damon_target_has_pid.

    The admin tree validates targets by these facts, the engine builds the
    address space with ``space``, and ``access_checks`` says which access
    checks can serve it: an operations set is available where one of them is.
    """

    name: str
    target_has_pid: bool
    """Targets are processes (vaddr, fvaddr) or not (paddr: pid -1)."""
    min_targets: int
    max_targets: int | None
    """None: no limit beyond the admin tree's."""
    needs_regions: bool
    """Each target must come with its own regions (fvaddr)."""
    space: Callable[[ProcessTable], AddressSpace]
    """The address space, pinning processes in the given table."""
    access_checks: tuple[str, ...]
    """The access checks that can serve it, the most precise first: what auto picks."""
    actions: tuple[str, ...] = (STAT,)
    """The DAMOS actions the user backend can do to its targets (where the host allows:
    each action's ActionOps probe)."""
    filter_types: tuple[str, ...] = CORE_FILTER_TYPES
    """The DAMOS filter types the user backend honours: the core's (per region) and its
    own (per page)."""
    kernel_actions: tuple[str, ...] = (STAT,)
    """The DAMOS actions the kernel's own operations set of this name does (Linux 6.12's
    damon_va_apply_scheme, damon_pa_apply_scheme); its sysfs takes the others too, and
    they then do nothing. The kernel backend asks it (with what the kernel's sysfs offers)."""
    kernel_filter_types: tuple[str, ...] = CORE_FILTER_TYPES
    """The DAMOS filter types the kernel honours for it: the core's, and the per page ones
    its actions check (paddr's damos_pa_filter_out; vaddr's madvise checks none)."""


class Actions(Protocol):
    """What a DAMOS action does to a target's memory (the kernel's ops.apply_scheme)."""

    def begin(self) -> None:
        """A new application pass starts: what was read of the targets may have changed."""
        ...

    def apply(
        self,
        target: TargetConfig,
        action: str,
        start: int,
        end: int,
        filters: tuple[FilterConfig, ...],
        default_reject: bool,
    ) -> int:
        """Do action to [start, end) of target, to the pages the (per page) filters let
        through (the first filter that matches decides; default_reject for the others);
        the bytes it was applied to. Failures count as 0 bytes and never raise."""
        ...

    def close(self) -> None: ...


@dataclass(frozen=True)
class ActionOps:
    """One DAMOS action of the user backend: how to do it, and whether this host can."""

    name: str
    advice: int | None
    """The process_madvise(2) advice; None for the action that does nothing (stat)."""
    probe: Callable[[], str]
    """'' when it works on this host (as this user), else why not. Never changes anything."""


@dataclass(frozen=True)
class AccessCheckOps:
    """One access check: how to tell whether it works here, and how to make one."""

    name: str
    granularity: str
    """What one answer stands for: "page" (reads and writes per page), "page-writes"
    (writes per page, reads per mapping) or "mapping" (only per-mapping counts exist)."""
    probe: Callable[[], str]
    """'' when it works on this host (as this user), else why not. Never changes anything."""
    make: Callable[[ProcessTable, int | None], AccessCheck]
    """(processes, seed) -> a new check, pinning processes in the given table."""
