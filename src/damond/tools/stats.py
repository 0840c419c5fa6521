"""The numbers users ask of a snapshot: working set size, and how long memory has been cold.

Working set size is a weighted estimate: each region counts its size times
nr_accesses / max_nr_accesses, the fraction of the aggregation's samples that
found it accessed. Counting every region with nr_accesses > 0 whole overstates
it badly wherever a region is large and rarely touched (measured: 197 MiB for a
process whose referenced memory was 16 MiB, where the weighted sum said 16.2 MiB).

Idle ("cold") time is DAMON_STAT's: a region not accessed in the last
aggregation has been idle for (age + 1) aggregations (age counts the
aggregations before it with about the same frequency), times the aggregation
interval; an accessed region is idle for 0 s. Percentiles are over bytes: the
p-th says p % of the monitored memory has been idle for at most that long.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import numpy as np

Region = tuple[int, int, int, int]
"""(start, end, nr_accesses, age), as in a Snapshot."""

PERCENTILES = (0.0, 25.0, 50.0, 75.0, 90.0, 99.0, 100.0)

WSS_METHOD = (
    "weighted estimate: sum over regions of size x nr_accesses / max_nr_accesses "
    "(the share of the aggregation's samples that found the region accessed)"
)
IDLE_METHOD = (
    "a region not accessed in the last aggregation has been idle for (age + 1) x the "
    "aggregation interval; an accessed one for 0 s; percentiles are over bytes"
)


def _columns(regions: Iterable[Region]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Sizes, nr_accesses and ages of regions, as arrays."""
    rows = np.asarray(list(regions), dtype=np.float64).reshape(-1, 4)
    return rows[:, 1] - rows[:, 0], rows[:, 2], rows[:, 3]


def weighted_wss(regions: Iterable[Region], max_nr_accesses: int) -> float:
    """Working set size in bytes: each region weighted by nr_accesses / max_nr_accesses."""
    sizes, nr, _ = _columns(regions)
    if max_nr_accesses <= 0:
        return float(sizes[nr > 0].sum())
    return float((sizes * np.minimum(1.0, nr / max_nr_accesses)).sum())


def accessed_bytes(regions: Iterable[Region]) -> int:
    """Bytes in regions with any access: the naive (over-)estimate, for comparison."""
    sizes, nr, _ = _columns(regions)
    return int(sizes[nr > 0].sum())


def idle_seconds(nr_accesses: int, age: int, aggr_us: int) -> float:
    """How long one region has been cold (0 when it was accessed)."""
    return 0.0 if nr_accesses > 0 else (age + 1) * aggr_us / 1e6


def idle_percentiles(
    regions: Iterable[Region], aggr_us: int, percentiles: Sequence[float] = PERCENTILES
) -> dict[float, float]:
    """Idle time in seconds at each percentile of the monitored bytes ({} when empty)."""
    sizes, nr, ages = _columns(regions)
    if not sizes.size or sizes.sum() <= 0:
        return {}
    idle = np.where(nr > 0, 0.0, (ages + 1) * aggr_us / 1e6)
    order = np.argsort(idle, kind="stable")
    cumulative = np.cumsum(sizes[order])
    total = cumulative[-1]
    result = {}
    for p in percentiles:
        # the least idle time that at least p % of the bytes do not exceed
        at = int(np.searchsorted(cumulative, total * p / 100.0, side="left"))
        result[p] = float(idle[order][min(at, len(order) - 1)])
    return result


def aggregation_seconds(previous: tuple[int, int] | None, current: tuple[int, int]) -> float | None:
    """The measured aggregation interval between two snapshots' (seq, timestamp_us):
    elapsed time over the aggregations it spans; None without a usable previous one."""
    if previous is None:
        return None
    seq0, ts0 = previous
    seq1, ts1 = current
    if seq1 <= seq0 or ts1 <= ts0:
        return None
    return (ts1 - ts0) / 1e6 / (seq1 - seq0)
