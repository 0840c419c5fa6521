"""Heatmaps: address × time, access frequency as colour, from a recorded target.

The address axis is the monitored memory only: the gaps between monitored
ranges (a vaddr target's address space is mostly unmapped) are left out, so
that a hot buffer of 8 MiB is not a sliver in 128 TiB. Each cell is the
average access frequency (nr_accesses / max_nr_accesses) over its bytes and
its time, weighted by how much of both each region of each snapshot covers.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from damond.tools.records import SnapshotRecord, TargetRecord


@dataclass(frozen=True)
class Spans:
    """The monitored address ranges of a record, sorted and merged."""

    starts: np.ndarray
    ends: np.ndarray

    @classmethod
    def of(cls, snapshots: Sequence[SnapshotRecord]) -> Spans:
        pairs = sorted((s, e) for snap in snapshots for s, e, _n, _a in snap.regions)
        merged: list[list[int]] = []
        for start, end in pairs:
            if merged and start <= merged[-1][1]:
                merged[-1][1] = max(merged[-1][1], end)
            else:
                merged.append([start, end])
        array = np.array(merged, dtype=np.float64).reshape(-1, 2)
        return cls(array[:, 0], array[:, 1])

    @property
    def total(self) -> float:
        """Monitored bytes: the length of the address axis."""
        return float((self.ends - self.starts).sum())

    def offsets(self, addresses: np.ndarray) -> np.ndarray:
        """Where addresses fall on the axis (each lies inside or at the edge of a span)."""
        before = np.concatenate(([0.0], np.cumsum(self.ends - self.starts)))
        span = np.clip(np.searchsorted(self.starts, addresses, side="right") - 1, 0, None)
        return before[span] + np.minimum(addresses, self.ends[span]) - self.starts[span]

    def address(self, offset: float) -> int:
        """The address at a point of the axis."""
        before = np.concatenate(([0.0], np.cumsum(self.ends - self.starts)))
        span = int(
            np.clip(np.searchsorted(before, offset, side="right") - 1, 0, len(self.starts) - 1)
        )
        return int(self.starts[span] + offset - before[span])


@dataclass(frozen=True)
class Heatmap:
    """values[row, column]: access frequency 0..1 of address bin ``row`` (low addresses
    first) in time bin ``column``; NaN where no snapshot covers the time."""

    values: np.ndarray
    spans: Spans
    start_ns: int
    end_ns: int

    @property
    def seconds(self) -> float:
        return (self.end_ns - self.start_ns) / 1e9

    @classmethod
    def of(cls, record: TargetRecord, address_bins: int, time_bins: int) -> Heatmap:
        snaps = [s for s in record.snapshots if s.regions]
        if not snaps:
            raise ValueError(f"{record.name}: no snapshot with regions to draw")
        spans = Spans.of(snaps)
        edges = np.linspace(0.0, spans.total, address_bins + 1)
        rows = np.array([_bin_frequencies(s, spans, edges) for s in snaps])  # snapshots × bins
        start = min(s.start_ns for s in snaps)
        end = max(s.end_ns for s in snaps)
        t_edges = np.linspace(start, end, time_bins + 1)
        s0 = np.array([s.start_ns for s in snaps], dtype=np.float64)[:, None]
        s1 = np.array([s.end_ns for s in snaps], dtype=np.float64)[:, None]
        overlap = np.clip(np.minimum(s1, t_edges[1:]) - np.maximum(s0, t_edges[:-1]), 0, None)
        weight = overlap.sum(axis=0)  # per time bin
        with np.errstate(invalid="ignore", divide="ignore"):
            values = (rows.T @ overlap) / weight
        values[:, weight == 0] = np.nan
        return cls(values, spans, start, end)


def _bin_frequencies(snap: SnapshotRecord, spans: Spans, edges: np.ndarray) -> np.ndarray:
    """Average access frequency of one snapshot over each address bin."""
    regions = np.array(snap.regions, dtype=np.float64).reshape(-1, 4)
    lo = spans.offsets(regions[:, 0])
    hi = spans.offsets(regions[:, 1])
    freq = np.minimum(1.0, regions[:, 2] / max(1, snap.max_nr_accesses))
    # the integral of frequency along the axis, piecewise linear through region edges
    xs = np.empty(2 * len(lo))
    xs[0::2], xs[1::2] = lo, hi
    gains = np.zeros(2 * len(lo))
    gains[1::2] = freq * (hi - lo)
    integral = np.interp(
        edges,
        np.concatenate(([0.0], xs, [spans.total])),
        np.concatenate(([0.0], np.cumsum(gains), [gains.sum()])),
    )
    widths = np.diff(edges)
    return np.diff(integral) / np.where(widths > 0, widths, 1)


LEVELS = " .:-=+*#%@"
"""Ten levels of frequency as characters, for terminals without colour."""


def terminal_lines(heatmap: Heatmap, color: bool) -> list[object]:
    """One rich Text per time bin (time runs down, addresses across), cells 0-9."""
    from rich.text import Text

    lines: list[object] = []
    for column in heatmap.values.T:
        text = Text()
        for value in column:
            if np.isnan(value):
                text.append(" ")
                continue
            level = min(9, int(value * 10))
            if color:
                # 256-colour grey ramp 232 (dark) .. 255 (light), as damo's heatmap
                ink = "white" if value < 0.5 else "black"
                text.append(str(level), style=f"{ink} on color({232 + round(value * 23)})")
            else:
                text.append(LEVELS[level])
        lines.append(text)
    return lines
