"""The sample pacer's arithmetic (monitor/pacing.py), on stand-in clocks.

What it does to a running daemon (the ceiling stretching a real clear_refs
target's sampling, effective_* and STATUS= saying so) is tested over D-Bus in
test_dbus_monitoring.py; here only the numbers it computes.
"""

from __future__ import annotations

import pytest

from damond.monitor.config import Attrs
from damond.monitor.pacing import Pacer

MS = 1_000_000  # ns


class Clocks:
    """A wall clock and a thread CPU clock that tests move by hand."""

    def __init__(self) -> None:
        self.wall = 0
        self.cpu = 0

    def pacer(self) -> Pacer:
        return Pacer(lambda: self.wall, lambda: self.cpu)

    def sample(self, pacer: Pacer, attrs: Attrs, cost_ns: int) -> None:
        """Sleep as the pacer says, then a sample that costs cost_ns of CPU (and wall)."""
        self.wall += round(pacer.sleep_s(attrs) * 1e9)
        self.wall += cost_ns
        self.cpu += cost_ns
        pacer.sampled()


def run_aggregations(
    attrs: Attrs, cost_ns: int, aggregations: int
) -> tuple[list[tuple[int, int]], list[tuple[int, int, bool]]]:
    """(wall, cpu) at each aggregation, and (effective sample_us, aggr_us, behind)."""
    clocks = Clocks()
    pacer = clocks.pacer()
    pacer.start()
    clocks.sample(pacer, attrs, cost_ns)  # the first prepare
    marks, found = [], []
    for _ in range(aggregations):
        for _ in range(attrs.samples_per_aggregation):
            clocks.sample(pacer, attrs, cost_ns)
        effective = pacer.aggregated(attrs.samples_per_aggregation, attrs)
        found.append((effective.sample_us, effective.aggr_us, pacer.behind))
        marks.append((clocks.wall, clocks.cpu))
    return marks, found


def test_a_cheap_sample_keeps_the_asked_interval() -> None:
    attrs = Attrs()  # 5 ms, 100 ms, 10 %
    _, found = run_aggregations(attrs, 100_000, 3)  # 0.1 ms a sample: 2 % of a CPU
    assert found[-1] == (5100, 102_000, False)


@pytest.mark.parametrize("limit", [10, 20, 25])
def test_an_expensive_sample_is_spread_to_the_ceiling(limit: int) -> None:
    attrs = Attrs(cpu_limit_pct=limit)
    marks, found = run_aggregations(attrs, 4 * MS, 4)  # 80 % of a CPU at 5 ms
    sample_us, aggr_us, behind = found[-1]
    assert sample_us == round(4000 * 100 / limit)  # the period where 4 ms is `limit` %
    assert aggr_us == 20 * sample_us  # aggregations stay counted in samples
    assert behind
    (wall0, cpu0), (wall1, cpu1) = marks[0], marks[-1]
    assert (cpu1 - cpu0) / (wall1 - wall0) == pytest.approx(limit / 100)


def test_no_limit_is_sample_us_plus_the_cost() -> None:
    _, found = run_aggregations(Attrs(cpu_limit_pct=0), 4 * MS, 2)
    assert found[-1][:2] == (9000, 180_000)


def test_the_ceiling_follows_a_changing_cost_one_aggregation_late() -> None:
    attrs = Attrs(cpu_limit_pct=10)
    clocks = Clocks()
    pacer = clocks.pacer()
    pacer.start()
    periods = []
    for cost in (1 * MS, 1 * MS, 3 * MS, 3 * MS):
        for _ in range(20):
            clocks.sample(pacer, attrs, cost)
        periods.append(pacer.aggregated(20, attrs).sample_us)
    # 1 ms: 10 ms periods (the very first sleep knows no cost yet: 5 ms); the first
    # aggregation of 3 ms samples still sleeps as for 1 ms ones
    assert periods == [9_800, 10_000, 12_000, 30_000]


def test_falling_behind_and_catching_up_has_hysteresis() -> None:
    attrs = Attrs(cpu_limit_pct=0)
    clocks = Clocks()
    pacer = clocks.pacer()
    pacer.start()
    seen = []
    for cost_us in (500, 1100, 900, 400):  # +10 %, +22 %, +18 %, +8 % of sample_us
        for _ in range(20):
            clocks.sample(pacer, attrs, cost_us * 1000)
        pacer.aggregated(20, attrs)
        seen.append(pacer.behind)
    assert seen == [False, True, True, False]
