"""DAMOS in the core (monitor/schemes.py) against the kernel's rules: arithmetic only.

Regions, clocks, the free memory rate and the action are stand-ins here; what
the actions do to real processes is tested in test_damos_ops.py and, over a
real bus, in test_dbus_schemes.py. Literal ports of kernel loops serve as
oracles for the numpy versions.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

import numpy as np
import pytest

from damond.monitor import ops
from damond.monitor.config import (
    PAGE_SIZE,
    AccessPattern,
    Attrs,
    ConfigError,
    ContextConfig,
    FilterConfig,
    Quotas,
    SchemeConfig,
    TargetConfig,
    Watermarks,
)
from damond.monitor.engine import Engine
from damond.monitor.ops.synthetic import SyntheticAccess, SyntheticSpace
from damond.monitor.regions import Regions
from damond.monitor.schemes import (
    DAMOS_MAX_SCORE,
    Schemes,
    hot_score,
    hot_scores,
    pattern_nr_accesses,
    scheme_score,
)
from damond.monitor.snapshot import Snapshot

MiB = 1 << 20
ATTRS = Attrs()  # 20 samples per aggregation of 100 ms
BASE = 0x7F00_0000_0000


@dataclass
class Applied:
    target: int
    action: str
    start: int
    end: int
    filters: tuple[FilterConfig, ...]
    default_reject: bool


@dataclass
class RecordingActions:
    """Stands in for the ops' actions: records each call, says it applied every byte."""

    calls: list[Applied] = field(default_factory=list)
    passes: int = 0

    def begin(self) -> None:
        self.passes += 1

    def apply(
        self,
        target: TargetConfig,
        action: str,
        start: int,
        end: int,
        filters: tuple[FilterConfig, ...],
        default_reject: bool,
    ) -> int:
        self.calls.append(Applied(target.index, action, start, end, filters, default_reject))
        return end - start

    def close(self) -> None:
        pass


class Clock:
    """A monotonic clock in ns that the test moves."""

    def __init__(self) -> None:
        self.ns = 10**12

    def __call__(self) -> int:
        return self.ns

    def advance_ms(self, ms: float) -> None:
        self.ns += int(ms * 1e6)


@dataclass
class FakeTarget:
    config: TargetConfig
    regions: Regions


def regions_of(sizes_mib: list[float], nr: list[int], age: list[int], base: int = BASE) -> Regions:
    starts, ends, at = [], [], base
    for size in sizes_mib:
        starts.append(at)
        at += int(size * MiB)
        ends.append(at)
    return Regions.build(starts, ends, nr, nr, age)


def schemes(
    *configs: SchemeConfig, metric: int = 500, clock: Clock | None = None
) -> tuple[Schemes, RecordingActions]:
    actions = RecordingActions()
    s = Schemes(configs, actions, lambda: metric, clock or Clock())
    s.start(ATTRS)
    return s, actions


def applied_ranges(actions: RecordingActions) -> list[tuple[int, int]]:
    return [(c.start, c.end) for c in actions.calls]


# --- scores and the pattern's nr_accesses ----------------------------------------------------


def test_hot_scores_match_the_kernels_loop() -> None:
    rng = np.random.default_rng(1)
    for attrs in (ATTRS, Attrs(sample_us=1000, aggr_us=1_000_000), Attrs(5000, 2**40, 2**41)):
        nr = rng.integers(0, attrs.samples_per_aggregation + 1, 400).astype(np.uint32)
        ages = rng.integers(0, 2**32, 400).astype(np.uint32)
        ages[:100] = rng.integers(0, 200, 100)
        for weights in [(0, 0), (1000, 0), (0, 1000), (3, 7), (10**6, 1)]:
            vector = hot_scores(nr, ages, attrs, weights).tolist()
            assert vector == [
                hot_score(n, a, attrs, weights)
                for n, a in zip(nr.tolist(), ages.tolist(), strict=True)
            ]
            assert all(0 <= v <= DAMOS_MAX_SCORE for v in vector)


def test_cold_score_puts_old_idle_regions_first_and_other_actions_tie() -> None:
    weights = (0, 1000)  # age only
    old_idle = scheme_score("pageout", 0, 600, ATTRS, weights)  # 60 s without access
    young_idle = scheme_score("pageout", 0, 10, ATTRS, weights)
    old_busy = scheme_score("pageout", 20, 600, ATTRS, weights)  # 60 s always accessed
    assert old_idle > young_idle > old_busy
    assert scheme_score("lru_prio", 20, 600, ATTRS, weights) > scheme_score(
        "lru_prio", 0, 600, ATTRS, weights
    )
    assert {scheme_score("willneed", n, a, ATTRS, weights) for n, a in [(0, 0), (20, 600)]} == {
        DAMOS_MAX_SCORE
    }


def test_pattern_nr_accesses_is_the_kernels_moving_sum() -> None:
    """Mid-aggregation, the pattern compares nr_accesses_bp / 10000, which
    damon_update_region_access_rate keeps sample by sample."""
    rng = np.random.default_rng(2)
    attrs = Attrs(sample_us=5000, aggr_us=35_000)  # 7 samples: 10000 is not a multiple
    last = rng.integers(0, 8, 50)
    accessed = rng.random((7, 50)) < 0.5
    bp = last * 10000  # kdamond_reset_aggregated leaves nr_accesses_bp == last * 10000
    nr = np.zeros(50, dtype=np.int64)
    for k in range(7):
        bp = bp - last * 10000 // 7 + np.where(accessed[k], 10000, 0)
        nr += accessed[k]
        regions = Regions.build(np.arange(50) * PAGE_SIZE, np.arange(1, 51) * PAGE_SIZE, nr, last)
        expected = nr if k == 6 else bp // 10000
        assert pattern_nr_accesses(regions, k + 1, attrs).tolist() == expected.tolist()


# --- which regions, in what order, how much --------------------------------------------------


def pageout(**kw: object) -> SchemeConfig:
    return SchemeConfig(0, action="pageout", **kw)  # type: ignore[arg-type]


def test_pattern_selects_and_stats_count_as_the_kernel() -> None:
    regions = regions_of([1, 2, 4, 8], nr=[0, 0, 5, 0], age=[3, 30, 30, 30])
    target = FakeTarget(TargetConfig(0, pid=1), regions)
    s, actions = schemes(pageout(pattern=AccessPattern(nr_accesses_max=0, age_min=20)))
    s.apply([target], ATTRS.samples_per_aggregation, 20, ATTRS)
    assert applied_ranges(actions) == [
        (BASE + MiB, BASE + 3 * MiB),
        (BASE + 7 * MiB, BASE + 15 * MiB),
    ]
    result = s.results()[0]
    assert result.stats.nr_tried == 2 and result.stats.sz_tried == 10 * MiB
    assert result.stats.nr_applied == 2 and result.stats.sz_applied == 10 * MiB
    assert result.tried == (
        (0, BASE + MiB, BASE + 3 * MiB, 0, 30),
        (0, BASE + 7 * MiB, BASE + 15 * MiB, 0, 30),
    )
    assert target.regions.age.tolist() == [3, 0, 30, 0]  # applied regions start aging anew


def test_stat_counts_tries_and_applies_nothing() -> None:
    target = FakeTarget(TargetConfig(0, pid=1), regions_of([1, 1], nr=[0, 3], age=[1, 1]))
    s, actions = schemes(SchemeConfig(0))
    s.apply([target], 20, 20, ATTRS)
    stats = s.results()[0].stats
    assert (stats.nr_tried, stats.sz_tried, stats.nr_applied, stats.sz_applied) == (
        2,
        2 * MiB,
        0,
        0,
    )
    assert actions.calls == [] and target.regions.age.tolist() == [1, 1]


def test_size_quota_is_never_exceeded_in_a_window() -> None:
    """bytes per reset_interval_ms: each window applies at most the quota, in pieces cut
    to what is left, and the next window goes on where the last one stopped."""
    clock = Clock()
    quota = Quotas(bytes=3 * MiB, reset_interval_ms=1000)
    s, actions = schemes(pageout(quotas=quota), clock=clock)
    target = FakeTarget(TargetConfig(0, pid=1), regions_of([2] * 8, nr=[0] * 8, age=[5] * 8))
    windows: list[list[tuple[int, int]]] = []
    passed = 0
    for _window in range(5):
        before = len(actions.calls)
        for _aggregation in range(10):  # 10 aggregations of 100 ms: one window
            passed += ATTRS.samples_per_aggregation
            s.apply([target], passed, 20, ATTRS)
            clock.advance_ms(100)
        windows.append(applied_ranges(actions)[before:])
    for ranges in windows:
        assert sum(e - b for b, e in ranges) == quota.bytes, ranges
    starts = [w[0][0] for w in windows]
    assert starts == sorted(starts) and len(set(starts)) == len(starts)  # it moves on
    assert s.results()[0].effective_bytes == quota.bytes
    assert s.results()[0].stats.qt_exceeds == 4  # each window but the open one ran out


def test_the_highest_priority_regions_go_first() -> None:
    """Under a quota, the cold score (weights: age) picks the oldest idle regions."""
    ages = [10, 500, 40, 2000, 5, 900]  # aggregations of 100 ms
    target = FakeTarget(TargetConfig(0, pid=1), regions_of([1] * 6, nr=[0] * 6, age=ages))
    quota = Quotas(bytes=3 * MiB, reset_interval_ms=1000, weight_age=1000)
    s, actions = schemes(pageout(quotas=quota))
    s.apply([target], 20, 20, ATTRS)
    oldest = sorted(range(6), key=lambda i: -ages[i])[:3]
    assert applied_ranges(actions) == [
        (BASE + i * MiB, BASE + (i + 1) * MiB) for i in sorted(oldest)
    ]


def test_time_quota_becomes_bytes_at_the_measured_throughput() -> None:
    """damos_set_effective_quota: ms * (bytes charged / ns spent), 4 MiB/ms before any."""
    clock = Clock()

    class SlowActions(RecordingActions):
        def apply(self, *args: object, **kw: object) -> int:
            clock.advance_ms(2)  # 2 ms per call
            return super().apply(*args, **kw)  # type: ignore[arg-type]

    actions = SlowActions()
    s = Schemes([pageout(quotas=Quotas(ms=10, reset_interval_ms=100))], actions, lambda: 0, clock)
    s.start(ATTRS)
    target = FakeTarget(TargetConfig(0, pid=1), regions_of([1] * 64, nr=[0] * 64, age=[5] * 64))
    s.apply([target], 20, 20, ATTRS)
    assert s.results()[0].effective_bytes == 4096 * 1024 * 10  # no measurement yet
    clock.advance_ms(200)
    s.apply([target], 40, 20, ATTRS)
    # 1 MiB per 2 ms charged so far: 10 ms buy 5 MiB
    assert s.results()[0].effective_bytes == MiB * 1_000_000 // 2_000_000 * 10


def test_quota_bytes_cap_the_time_quota() -> None:
    s, _ = schemes(pageout(quotas=Quotas(ms=1000, bytes=MiB)))
    target = FakeTarget(TargetConfig(0, pid=1), regions_of([1] * 4, nr=[0] * 4, age=[5] * 4))
    s.apply([target], 20, 20, ATTRS)
    assert s.results()[0].effective_bytes == MiB


# --- watermarks --------------------------------------------------------------------------------


def test_watermarks_switch_around_their_thresholds() -> None:
    """damos_wmark_wait_us: off above high or below low; back on only below mid."""
    value = 0
    wm = Watermarks("free_mem_rate", interval_us=5000, high=600, mid=500, low=300)
    s = Schemes([SchemeConfig(0, watermarks=wm)], None, lambda: value)
    for value, active, wait in [
        (700, False, 5000),  # above high
        (550, False, 5000),  # between mid and high: stays off
        (450, True, 0),  # below mid: on
        (550, True, 0),  # between mid and high: stays on
        (600, True, 0),  # at high: still in range
        (601, False, 5000),
        (450, True, 0),
        (299, False, 5000),  # below low
        (350, True, 0),  # below mid, above low
    ]:
        assert (s.wait_us(), s.results()[0].active) == (wait, active), value


def test_one_scheme_without_watermarks_keeps_sampling() -> None:
    off = Watermarks("free_mem_rate", interval_us=7000, high=10, mid=5, low=0)
    s = Schemes([SchemeConfig(0, watermarks=off), SchemeConfig(1)], None, lambda: 900)
    assert s.wait_us() == 0 and [r.active for r in s.results()] == [False, True]
    s = Schemes([SchemeConfig(0, watermarks=off)] * 2, None, lambda: 900)
    assert s.wait_us() == 7000


def test_deactivated_schemes_are_not_applied() -> None:
    off = Watermarks("free_mem_rate", interval_us=1, high=10, mid=5, low=0)
    s, actions = schemes(pageout(watermarks=off), metric=900)
    s.wait_us()
    target = FakeTarget(TargetConfig(0, pid=1), regions_of([1], nr=[0], age=[5]))
    s.apply([target], 20, 20, ATTRS)
    assert actions.calls == [] and s.results()[0].tried is None


# --- filters -----------------------------------------------------------------------------------


def test_addr_filter_cuts_and_decides_for_the_part_it_covers() -> None:
    """A region straddling the range is cut; the part in the range passes this pass,
    the rest waits for the next pass (the kernel does not revisit it either)."""
    target = FakeTarget(TargetConfig(0, pid=1), regions_of([4], nr=[0], age=[5]))
    allow = FilterConfig("addr", matching=True, allow=True, addr_start=BASE, addr_end=BASE + MiB)
    s, actions = schemes(pageout(filters=(allow,)))
    s.apply([target], 20, 20, ATTRS)
    assert applied_ranges(actions) == [(BASE, BASE + MiB)]
    assert target.regions.ranges() == [(BASE, BASE + MiB), (BASE + MiB, BASE + 4 * MiB)]
    s.apply([target], 40, 20, ATTRS)  # the rest matches no allow filter: default reject
    assert applied_ranges(actions) == [(BASE, BASE + MiB)] * 2


def test_target_filter_and_the_first_matching_filter_decides() -> None:
    t0 = FakeTarget(TargetConfig(0, pid=1), regions_of([1], nr=[0], age=[5]))
    t1 = FakeTarget(TargetConfig(1, pid=2), regions_of([1], nr=[0], age=[5]))
    reject_t1 = FilterConfig("target", matching=True, allow=False, target_idx=1)
    allow_all = FilterConfig("target", matching=False, allow=True, target_idx=7)
    s, actions = schemes(pageout(filters=(reject_t1, allow_all)))
    s.apply([t0, t1], 20, 20, ATTRS)
    assert [c.target for c in actions.calls] == [0]


def test_page_filters_go_to_the_ops_unless_a_core_filter_allowed() -> None:
    anon = FilterConfig("anon", matching=True, allow=False)
    allow_t0 = FilterConfig("target", matching=True, allow=True, target_idx=0)
    t0 = FakeTarget(TargetConfig(0, pid=1), regions_of([1], nr=[0], age=[5]))
    t1 = FakeTarget(TargetConfig(1, pid=2), regions_of([1], nr=[0], age=[5], base=2 * BASE))
    s, actions = schemes(pageout(filters=(allow_t0, anon)))
    s.apply([t0, t1], 20, 20, ATTRS)
    assert [(c.target, c.filters, c.default_reject) for c in actions.calls] == [
        (0, (), False),  # allowed by the target filter: the page filter is not asked
        (1, (anon,), False),  # the last filter rejects: what it does not match passes
    ]


def test_default_reject_follows_the_last_filter() -> None:
    s, actions = schemes(pageout(filters=(FilterConfig("anon", matching=True, allow=True),)))
    s.apply([FakeTarget(TargetConfig(0, pid=1), regions_of([1], nr=[0], age=[5]))], 20, 20, ATTRS)
    assert actions.calls[0].default_reject is True


# --- intervals and commits -----------------------------------------------------------------------


def synthetic_engine(*configs: SchemeConfig) -> tuple[Engine, RecordingActions]:
    ranges = [(BASE, BASE + 16 * MiB)]
    config = ContextConfig(ops.VADDR, "synthetic", ATTRS, (TargetConfig(0, pid=1),), configs)
    actions = RecordingActions()
    engine = Engine(
        config, SyntheticSpace(ranges), SyntheticAccess([]), actions=actions, metric=lambda: 0
    )
    engine.start()
    return engine, actions


def samples(engine: Engine, n: int) -> list[int]:
    """Run n samples; the sample numbers after which a snapshot came."""
    seen = []
    for i in range(1, n + 1):
        engine.prepare()
        if engine.check() is not None:
            seen.append(i)
    return seen


def test_apply_interval_counts_samples() -> None:
    """Every apply_interval_us / sample_us samples, also inside an aggregation."""
    every_other = SchemeConfig(0, apply_interval_us=200_000)  # 40 samples
    inside = SchemeConfig(1, apply_interval_us=25_000)  # 5 samples
    default = SchemeConfig(2)  # every aggregation: 20 samples
    s, _ = schemes(every_other, inside, default)
    target = FakeTarget(TargetConfig(0, pid=1), regions_of([1], nr=[0], age=[5]))
    for passed in range(1, 81):
        if s.due(passed):
            s.apply([target], passed, passed % 20 or 20, ATTRS)
    assert [r.stats.nr_tried for r in s.results()] == [2, 16, 4]


def next_snapshot(engine: Engine) -> Snapshot:
    for _ in range(1000):
        engine.prepare()
        snapshot = engine.check()
        if snapshot is not None:
            return snapshot
    raise AssertionError("no aggregation")


def test_snapshots_carry_the_results_and_commit_keeps_the_stats() -> None:
    engine, actions = synthetic_engine(pageout(pattern=AccessPattern(age_min=2)))
    seen = [next_snapshot(engine) for _ in range(4)]
    assert seen[0].schemes[0].tried == ()  # nothing old enough after one aggregation
    assert seen[-1].schemes[0].stats.nr_applied > 0 and actions.calls
    applied = seen[-1].schemes[0].stats.sz_applied
    never = pageout(pattern=AccessPattern(age_min=10**6))
    engine.commit(dataclasses.replace(engine.config, schemes=(never,)))
    next_snapshot(engine)
    after = next_snapshot(engine).schemes[0]
    assert after.stats.sz_applied == applied and after.tried == ()  # kept; nothing matches


def test_configs_are_validated_in_the_core() -> None:
    base = ContextConfig(ops.VADDR, "synthetic", ATTRS, (TargetConfig(0, pid=1),))

    def refused(scheme: SchemeConfig, *words: str) -> None:
        with pytest.raises(ConfigError) as e:
            dataclasses.replace(base, schemes=(scheme,)).validate()
        assert e.value.where.startswith("schemes/0") and all(w in e.value.rule for w in words)

    refused(SchemeConfig(0, action="explode"), "explode")
    refused(SchemeConfig(0, pattern=AccessPattern(age_min=5, age_max=4)), "age_min")
    refused(SchemeConfig(0, watermarks=Watermarks("free_mem_rate", high=1, mid=2)), "mid")
    refused(SchemeConfig(0, watermarks=Watermarks("ram")), "metric")
    refused(SchemeConfig(0, filters=(FilterConfig("addr", addr_start=2, addr_end=1),)), "addr")
    refused(SchemeConfig(0, filters=(FilterConfig("target", target_idx=1),)), "target_idx")
    refused(SchemeConfig(0, filters=(FilterConfig("memcg"),)), "memcg")
    # what damond's own engine does is its operations table's (the kernel's is another)
    lru = dataclasses.replace(base, schemes=(SchemeConfig(0, action="lru_prio"),)).validate()
    with pytest.raises(ConfigError, match="vaddr cannot do the lru_prio action"):
        Engine(lru, SyntheticSpace([(0, MiB)]), SyntheticAccess([]))
    paddr = ContextConfig(ops.PADDR, "page_idle", ATTRS, (TargetConfig(0),), (pageout(),))
    with pytest.raises(ConfigError, match="paddr cannot do the pageout action"):
        paddr.validate().validate_doable(ops.PADDR.actions, ops.PADDR.filter_types)
    anon = dataclasses.replace(paddr, schemes=(SchemeConfig(0, filters=(FilterConfig(),)),))
    with pytest.raises(ConfigError, match="paddr cannot honour the anon filter"):
        Engine(anon, SyntheticSpace([(0, MiB)]), SyntheticAccess([]))
    with pytest.raises(ValueError, match="need the ops' Actions"):
        Engine(
            dataclasses.replace(base, schemes=(pageout(),)),
            SyntheticSpace([(0, MiB)]),
            SyntheticAccess([]),
        )


def test_the_whole_array_pass_equals_the_kernels_region_walk() -> None:
    """Schemes that nothing can cut are applied on the region arrays at once; an allow-all
    target filter sends the same schemes down the region by region walk (a core filter
    can cut): both must give the same stats, tried regions, ages and actions."""
    rng = np.random.default_rng(3)
    allow_all = FilterConfig("target", matching=True, allow=True, target_idx=0)
    for _ in range(30):
        n = int(rng.integers(1, 60))
        sizes = (rng.integers(1, 64, n) * PAGE_SIZE).tolist()
        nr = rng.integers(0, 21, n).tolist()
        age = rng.integers(0, 40, n).tolist()
        configs = [
            SchemeConfig(
                i,
                action=str(rng.choice(["stat", "pageout", "cold"])),
                pattern=AccessPattern(
                    nr_accesses_max=int(rng.integers(0, 21)), age_min=int(rng.integers(0, 30))
                ),
            )
            for i in range(int(rng.integers(1, 4)))
        ]
        outcomes = []
        for filters in ((), (allow_all,)):
            schemes_, actions = schemes(*[dataclasses.replace(c, filters=filters) for c in configs])
            starts = np.cumsum([0, *sizes[:-1]]) + BASE
            regions = Regions.build(starts, starts + np.array(sizes), nr, nr, age)
            target = FakeTarget(TargetConfig(0, pid=1), regions)
            schemes_.apply([target], 20, 20, ATTRS)
            outcomes.append(
                (
                    [(r.stats, r.tried) for r in schemes_.results()],
                    target.regions.rows(),
                    sorted((c.action, c.start, c.end) for c in actions.calls),
                )
            )
        assert outcomes[0] == outcomes[1], configs
