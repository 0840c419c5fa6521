"""The frozen, validated configuration the admin tree hands to the engine.

The tree (hierarchy.py) owns mutable, user-edited values; the engine only ever
sees these immutable snapshots of them, so a write that is later refused can
never leak into a running monitor.
"""

from __future__ import annotations

from dataclasses import dataclass

PAGE_SIZE = 4096
"""DAMON_MIN_REGION: regions are page aligned and at least one page long."""


@dataclass(frozen=True)
class Attrs:
    """monitoring_attrs: intervals in microseconds and the region count bounds."""

    sample_us: int = 5000
    aggr_us: int = 100_000
    update_us: int = 60_000_000
    min_nr_regions: int = 10
    max_nr_regions: int = 1000

    @property
    def samples_per_aggregation(self) -> int:
        """Aggregation is counted in samples, as the kernel does since v6.7."""
        return max(1, self.aggr_us // self.sample_us)

    @property
    def samples_per_update(self) -> int:
        return max(1, self.update_us // self.sample_us)


@dataclass(frozen=True)
class TargetConfig:
    """One monitoring target: a process (vaddr, fvaddr) or physical memory (paddr)."""

    index: int
    pid: int = -1
    regions: tuple[tuple[int, int], ...] = ()
    """User-given regions as [start, end) pairs; when present they are the start."""


@dataclass(frozen=True)
class ContextConfig:
    """What one context monitors and how: operations, access check, attrs, targets."""

    operations: str
    access_check: str
    """Resolved name of the access check (never ``auto``)."""
    attrs: Attrs
    targets: tuple[TargetConfig, ...]
