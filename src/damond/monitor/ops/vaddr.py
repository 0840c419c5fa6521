"""Virtual address spaces: vaddr (the mappings' three regions) and fvaddr (fixed ranges).

Mappings come from /proc/PID/maps, parsed by hand: psutil.memory_maps reads
smaps instead and is about 15x slower. The three-region rule follows the
kernel's __damon_va_three_regions (mm/damon/vaddr.c).
"""

from __future__ import annotations

import numpy as np

from damond.monitor.config import TargetConfig
from damond.monitor.ops.base import TargetGone
from damond.monitor.ops.common import Range, align_up, aligned_ranges, ranges_from_tokens
from damond.monitor.ops.process import ProcessHolder, TargetProcess

KERNEL_HALF = 1 << 63
"""maps lists the x86 [vsyscall] gate page up here. It is not in the mm's VMA
tree that the kernel walks, so it must not count: the gap below it would
otherwise always be the biggest."""


def parse_maps(text: bytes) -> np.ndarray:
    """The user mappings of /proc/PID/maps text as a sorted (n, 2) uint64 array."""
    # Split on "\n" only: the kernel escapes "\n" in paths, but not "\r".
    tokens = [line[: line.find(b" ")] for line in text.split(b"\n") if line]
    ranges = ranges_from_tokens(tokens)
    return ranges[ranges[:, 0] < KERNEL_HALF]


def three_regions(mappings: np.ndarray) -> list[Range]:
    """The kernel's three regions: the mappings' extent minus its two largest gaps.

    Ties go to the lower gap, as the kernel's strict '>' scan does. Where the
    kernel fails (fewer than two gaps) this returns the extent as one or two
    ranges, so that a tiny address space can still be monitored.
    """
    if not len(mappings):
        raise ValueError("no mappings")
    starts = mappings[:, 0].astype(np.int64)
    ends = mappings[:, 1].astype(np.int64)
    gaps = starts[1:] - ends[:-1]
    biggest = np.argsort(-gaps, kind="stable")[:2]
    cuts = np.sort(biggest[gaps[biggest] > 0])
    bounds = [int(starts[0])]
    for i in cuts.tolist():
        bounds += [int(ends[i]), int(starts[i + 1])]
    bounds.append(int(ends[-1]))
    aligned = [align_up(b) for b in bounds]
    return list(zip(aligned[::2], aligned[1::2], strict=True))


def process_mappings(proc: TargetProcess) -> np.ndarray:
    """The current user mappings of a pinned process; TargetGone if it has none left."""
    found = parse_maps(proc.read("maps"))
    if not len(found):
        raise TargetGone(proc.pid, "has no user address space")
    return found


def mappings(pid: int) -> np.ndarray:
    """The user mappings of pid as (n, 2) uint64 [start, end) rows, sorted."""
    with TargetProcess(pid) as proc:
        return process_mappings(proc)


class VaddrSpace(ProcessHolder):
    """A process's virtual memory, as the kernel's vaddr operations see it."""

    name = "vaddr"

    def initial_ranges(self, target: TargetConfig) -> list[Range]:
        """User-given regions when there are any (the kernel keeps them), else three regions."""
        if target.regions:
            self.processes.live(target.pid)
            return aligned_ranges(target.regions)
        return self.three_regions(target)

    def update_ranges(self, target: TargetConfig) -> list[Range] | None:
        """Three regions again: like damon_va_update, even over user-given regions."""
        return self.three_regions(target)

    def three_regions(self, target: TargetConfig) -> list[Range]:
        return three_regions(process_mappings(self.processes.get(target.pid)))


class FvaddrSpace(ProcessHolder):
    """Fixed virtual ranges of a process: the user's regions, never updated."""

    name = "fvaddr"

    def initial_ranges(self, target: TargetConfig) -> list[Range]:
        self.processes.live(target.pid)
        return aligned_ranges(target.regions)

    def update_ranges(self, target: TargetConfig) -> list[Range] | None:
        self.processes.live(target.pid)
        return None
