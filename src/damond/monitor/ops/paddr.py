"""Physical address space (paddr): System RAM from /proc/iomem, or the user's ranges.

The kernel's own helpers (DAMON_RECLAIM, damo) default to the single biggest
System RAM resource; damond covers every top-level System RAM range, so
memory below the PCI hole is watched too, while the holes themselves never
become regions.
"""

from __future__ import annotations

from damond.monitor.config import PAGE_SIZE, TargetConfig
from damond.monitor.ops.common import Range, align_down, align_up, aligned_ranges

IOMEM = "/proc/iomem"
SYSTEM_RAM = "System RAM"


def parse_iomem(text: str) -> list[Range]:
    """Top-level System RAM of /proc/iomem text as [start, end) ranges of whole pages.

    iomem prints inclusive ends and nests children (Kernel code, ...) by
    indentation; only unindented entries are resources of their own. Partial
    pages at either end are dropped (page aligned inward).
    """
    found: list[Range] = []
    for line in text.splitlines():
        if not line or line[0] == " ":
            continue
        span, _, name = line.partition(" : ")
        if name.strip() != SYSTEM_RAM:
            continue
        first, _, last = span.partition("-")
        start, end = align_up(int(first, 16)), align_down(int(last, 16) + 1)
        if start < end:
            found.append((start, end))
    return sorted(found)


def system_ram(path: str = IOMEM) -> list[Range]:
    """This host's System RAM; PermissionError when iomem hides the addresses."""
    with open(path) as f:
        text = f.read()
    ranges = parse_iomem(text)
    if not ranges and SYSTEM_RAM in text:
        raise PermissionError(
            f"{path} shows System RAM at address 0: reading real addresses needs CAP_SYS_ADMIN"
        )
    if not ranges:
        raise ValueError(f"{path} lists no System RAM of at least one page ({PAGE_SIZE} bytes)")
    return ranges


class PaddrSpace:
    """Physical memory: one target (pid -1) covering System RAM or the user's ranges."""

    name = "paddr"

    def initial_ranges(self, target: TargetConfig) -> list[Range]:
        if target.regions:
            return aligned_ranges(target.regions)
        return system_ram()

    def update_ranges(self, target: TargetConfig) -> list[Range] | None:
        """None: physical memory does not move (the kernel's paddr has no update either)."""
        return None

    def close(self) -> None:
        """Nothing held; here so every AddressSpace closes alike."""
