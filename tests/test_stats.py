"""The numbers of damond.tools.stats and the heatmap's binning, on hand-made regions."""

from __future__ import annotations

import math

import numpy as np
import pytest

from damond.tools.heatmap import Heatmap, Spans
from damond.tools.records import SnapshotRecord, TargetRecord
from damond.tools.stats import (
    accessed_bytes,
    aggregation_seconds,
    idle_percentiles,
    idle_seconds,
    weighted_wss,
)

MIB = 1 << 20


def test_the_weighted_estimate_is_not_the_naive_sum() -> None:
    # one large mapping seen through clear_refs: touched now and then, not worked on
    regions = [(0, 180 * MIB, 1, 5), (180 * MIB, 196 * MIB, 20, 5), (196 * MIB, 200 * MIB, 0, 9)]
    assert accessed_bytes(regions) == 196 * MIB
    assert weighted_wss(regions, 20) == pytest.approx(180 * MIB / 20 + 16 * MIB)
    assert weighted_wss(regions, 10) == pytest.approx(180 * MIB / 10 + 16 * MIB)  # capped at 1
    assert weighted_wss([], 20) == 0


def test_idle_time_and_its_percentiles_over_bytes() -> None:
    assert idle_seconds(3, 50, 100_000) == 0
    assert idle_seconds(0, 0, 100_000) == pytest.approx(0.1)
    assert idle_seconds(0, 9, 200_000) == pytest.approx(2.0)
    regions = [(0, 25, 4, 0), (25, 75, 0, 9), (75, 100, 0, 99)]  # 25 % hot, 50 % 1 s, 25 % 10 s
    p = idle_percentiles(regions, 100_000, (0, 25, 26, 50, 75, 76, 100))
    assert p == pytest.approx({0: 0, 25: 0, 26: 1.0, 50: 1.0, 75: 1.0, 76: 10.0, 100: 10.0})
    assert idle_percentiles([], 100_000) == {}


def test_the_measured_aggregation_interval() -> None:
    assert aggregation_seconds(None, (5, 10**6)) is None
    assert aggregation_seconds((5, 0), (7, 500_000)) == pytest.approx(0.25)
    assert aggregation_seconds((5, 0), (5, 10)) is None


def test_spans_leave_gaps_out() -> None:
    spans = Spans.of([SnapshotRecord(0, 1, 1, [(100, 200, 0, 0), (1000, 1100, 0, 0)])])
    assert spans.total == 200
    assert list(spans.offsets(np.array([100.0, 200.0, 1000.0, 1050.0, 1100.0]))) == [
        0, 100, 100, 150, 200,
    ]  # fmt: skip
    assert spans.address(150) == 1050


def test_heatmap_cells_average_frequency_over_bytes_and_time() -> None:
    record = TargetRecord(0, 0, 0, 1, 5000, 100_000, 10**6)
    # two snapshots of 1 s each: the lower half hot then cold, the upper half cold then hot
    record.snapshots = [
        SnapshotRecord(0, 10**9, 10, [(0, 50, 10, 0), (50, 100, 0, 0)]),
        SnapshotRecord(10**9, 2 * 10**9, 10, [(0, 50, 0, 0), (50, 100, 5, 0)]),
    ]
    grid = Heatmap.of(record, address_bins=2, time_bins=2).values
    assert grid.tolist() == [[1.0, 0.0], [0.0, 0.5]]
    coarse = Heatmap.of(record, address_bins=1, time_bins=1).values
    assert coarse[0, 0] == pytest.approx((1.0 * 50 + 0.5 * 50) / 200)
    finer = Heatmap.of(record, address_bins=4, time_bins=4).values
    assert finer.shape == (4, 4) and not any(math.isnan(v) for v in finer.flat)
