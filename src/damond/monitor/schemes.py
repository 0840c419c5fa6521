"""DAMOS in the core: which regions each scheme acts on, in what order, and how much.

This is mm/damon/core.c's scheme application, step for step:

- ``wait_us`` is damos_wmark_wait_us over every scheme (kdamond_wait_activation):
  watermarks switch each scheme on and off, and when every scheme is off the
  kdamond pauses its sampling altogether;
- ``apply`` is kdamond_apply_schemes: for each scheme due (every
  apply_interval_us, counted in samples) and active, damos_adjust_quota opens
  a new charge window every reset_interval_ms, sets the effective size quota
  (damos_set_effective_quota: the time quota turned into bytes by the
  measured throughput, capped by the size quota) and the lowest score that
  fits in it (the score histogram); then every region of every target goes
  through damon_do_apply_schemes: regions charged in the previous window are
  skipped (damos_skip_charged_region), the access pattern and score decide
  (damos_valid_target), and damos_apply_scheme cuts the region to the quota
  left, runs the core filters (addr, target), has the ops act (the per page
  filters are theirs), charges the quota, resets the region's age and counts
  the stats.

The kernel's quirks are kept on purpose, so that a scheme does here what it
does there: a region split by a quota or an addr filter is not visited again
in the same pass, the quota is charged with the region's size from before an
addr filter cut it, and a window resumes one page into the region after the
last one charged.

Regions are walked as Python rows (the kernel's linked list: a split inserts
one after the region), but only for targets where something can happen: the
access patterns are checked on the region arrays first.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np

from damond.monitor.config import (
    PAGE_SIZE,
    STAT,
    U64_MAX,
    WMARK_NONE,
    Attrs,
    SchemeConfig,
    TargetConfig,
)
from damond.monitor.ops.base import Actions
from damond.monitor.regions import Regions
from damond.monitor.snapshot import SchemeResult, SchemeStats

log = logging.getLogger(__name__)

DAMOS_MAX_SCORE = 99
MAX_SUBSCORE = 100
MAX_AGE_IN_LOG = 32
BP = 10000
"""Basis points: the unit of the kernel's nr_accesses_bp."""
COLD_ACTIONS = ("pageout", "lru_deprio")
HOT_ACTIONS = ("lru_prio",)
"""get_scheme_score of the ops: the coldest regions first for these, the hottest for
those, and one score for every other action (so that only size order counts)."""


def _hotness(freq_subscore: Any, age_in_log: Any, weights: tuple[int, int]) -> Any:
    """damon_hot_score's second half, for ints or arrays alike: the age subscore (negative
    log age when there was no access at all: an old idle region is cold), both subscores
    weighted, scaled to 0..DAMOS_MAX_SCORE."""
    freq_weight, age_weight = weights
    signed_log = age_in_log - 2 * age_in_log * (freq_subscore == 0)
    age_subscore = (signed_log + MAX_AGE_IN_LOG) * MAX_SUBSCORE // MAX_AGE_IN_LOG // 2
    hotness = freq_weight * freq_subscore + age_weight * age_subscore
    if freq_weight + age_weight:
        hotness //= freq_weight + age_weight
    return hotness * DAMOS_MAX_SCORE // MAX_SUBSCORE


def hot_score(nr_accesses: int, age: int, attrs: Attrs, weights: tuple[int, int]) -> int:
    """damon_hot_score (mm/damon/ops-common.c) for one region.

    The frequency subscore is nr_accesses per sample of an aggregation, the
    age subscore log2 of the age in seconds, both scaled to 0..100 and
    weighted (nr_accesses, age: per thousand); the result is in 0..99. The
    kernel's 32-bit overflows with weights in the millions are not copied.
    """
    freq_subscore = nr_accesses * MAX_SUBSCORE // attrs.samples_per_aggregation
    age_in_sec = (age * attrs.aggr_us % 2**64 // 1_000_000) & 0xFFFF_FFFF
    age_in_log = 0
    while age_in_log < MAX_AGE_IN_LOG and age_in_sec:
        age_in_log += 1
        age_in_sec >>= 1
    return int(_hotness(freq_subscore, age_in_log, weights))


def hot_scores(
    nr_accesses: np.ndarray, ages: np.ndarray, attrs: Attrs, weights: tuple[int, int]
) -> np.ndarray:
    """hot_score for arrays of regions (the quota's score histogram over every region)."""
    freq = nr_accesses.astype(np.int64) * MAX_SUBSCORE // attrs.samples_per_aggregation
    if attrs.aggr_us < 2**32:  # age (32 bits) times aggr_us fits in 64 bits
        age_sec = ages.astype(np.uint64) * np.uint64(attrs.aggr_us) // np.uint64(1_000_000)
    else:
        age_sec = np.array(
            [int(a) * attrs.aggr_us % 2**64 // 1_000_000 for a in ages.tolist()], dtype=np.uint64
        )
    age_sec &= np.uint64(0xFFFF_FFFF)
    age_log = np.zeros(len(freq), dtype=np.int64)
    for _ in range(MAX_AGE_IN_LOG):
        more = age_sec != 0
        if not more.any():
            break
        age_log += more
        age_sec >>= np.uint64(1)
    return np.asarray(_hotness(freq, age_log, weights))


def scheme_score(
    action: str, nr_accesses: int, age: int, attrs: Attrs, weights: tuple[int, int]
) -> int:
    """The ops' get_scheme_score: the cold score, the hot score, or the top score for all."""
    if action in COLD_ACTIONS:
        return DAMOS_MAX_SCORE - hot_score(nr_accesses, age, attrs, weights)
    if action in HOT_ACTIONS:
        return hot_score(nr_accesses, age, attrs, weights)
    return DAMOS_MAX_SCORE


def scheme_scores(
    action: str, nr_accesses: np.ndarray, ages: np.ndarray, attrs: Attrs, weights: tuple[int, int]
) -> np.ndarray:
    """scheme_score for arrays of regions."""
    if action in COLD_ACTIONS:
        return DAMOS_MAX_SCORE - hot_scores(nr_accesses, ages, attrs, weights)
    if action in HOT_ACTIONS:
        return hot_scores(nr_accesses, ages, attrs, weights)
    return np.full(len(nr_accesses), DAMOS_MAX_SCORE, dtype=np.int64)


def pattern_nr_accesses(regions: Regions, aggr_samples: int, attrs: Attrs) -> np.ndarray:
    """What the access pattern compares: nr_accesses_bp / 10000.

    The kernel keeps a moving sum per region that loses last_nr_accesses /
    samples per aggregation at each sample and gains one per access; it
    equals nr_accesses at the aggregation boundary and blends in the last
    aggregation's count in between. ``aggr_samples`` samples of the current
    aggregation have passed.
    """
    if aggr_samples >= attrs.samples_per_aggregation:
        return regions.nr_accesses.astype(np.int64)
    last_bp = regions.last_nr_accesses.astype(np.int64) * BP
    bp = last_bp - aggr_samples * (last_bp // attrs.samples_per_aggregation)
    return (bp + regions.nr_accesses.astype(np.int64) * BP) // BP


class _Target(Protocol):
    """An engine target: its configuration and its live regions (replaced after a split)."""

    config: TargetConfig
    regions: Regions


class _Row:
    """One region of a target while schemes are applied (a node of the kernel's list)."""

    __slots__ = ("age", "end", "last", "nr", "pattern_nr", "start")

    def __init__(self, start: int, end: int, nr: int, last: int, age: int, pattern_nr: int) -> None:
        self.start, self.end, self.nr, self.last, self.age = start, end, nr, last, age
        self.pattern_nr = pattern_nr

    @property
    def size(self) -> int:
        return self.end - self.start


def _split_at(rows: list[_Row], r: _Row, size: int) -> _Row:
    """damon_split_region_at: r keeps its first ``size`` bytes; the rest, a copy, follows it."""
    new = _Row(r.start + size, r.end, r.nr, r.last, r.age, r.pattern_nr)
    r.end = new.start
    rows.insert(rows.index(r) + 1, new)
    return new


@dataclass
class _Quota:
    """A scheme's charge state (struct damos_quota's private fields)."""

    esz: int = 0
    charged_sz: int = 0
    charged_from: int | None = None
    """monotonic ns the window opened; None: none yet."""
    total_charged_sz: int = 0
    total_charged_ns: int = 0
    min_score: int = 0
    charge_target_from: int | None = None
    """The index of the target where the last window stopped charging; None: none."""
    charge_addr_from: int = 0


@dataclass
class _Scheme:
    """One scheme's state while the kdamond runs."""

    config: SchemeConfig
    next_apply_sis: int = 0
    activated: bool = True
    nr_tried: int = 0
    sz_tried: int = 0
    nr_applied: int = 0
    sz_applied: int = 0
    qt_exceeds: int = 0
    quota: _Quota = field(default_factory=_Quota)
    tried: tuple[tuple[int, int, int, int, int], ...] | None = None
    """(target index, start, end, nr_accesses, age) of the last pass; None before one."""

    @property
    def core_filters(self) -> tuple:
        return tuple(f for f in self.config.filters if f.core)

    @property
    def page_filters(self) -> tuple:
        return tuple(f for f in self.config.filters if not f.core)

    def default_reject(self) -> tuple[bool, bool]:
        """damos_set_filters_default_reject: (core, per page). What no filter decided is
        rejected when the last filter allows; the core's last filter is the last one only
        when no per page filter follows."""
        core, page = self.core_filters, self.page_filters
        return (bool(core) and not page and core[-1].allow, bool(page) and page[-1].allow)

    def result(self) -> SchemeResult:
        return SchemeResult(
            index=self.config.index,
            stats=SchemeStats(
                self.nr_tried, self.sz_tried, self.nr_applied, self.sz_applied, self.qt_exceeds
            ),
            effective_bytes=self.quota.esz,
            active=self.activated,
            tried=self.tried,
        )


def _apply_interval_samples(config: SchemeConfig, attrs: Attrs) -> int:
    interval = config.apply_interval_us or attrs.aggr_us
    return interval // max(attrs.sample_us, 1)


class Schemes:
    """The schemes of one context and their state: what the engine asks to apply them."""

    def __init__(
        self,
        configs: Sequence[SchemeConfig],
        actions: Actions | None,
        metric: Callable[[], int],
        now_ns: Callable[[], int] = time.monotonic_ns,
    ) -> None:
        if actions is None and any(c.action != STAT for c in configs):
            raise ValueError("schemes with actions other than stat need the ops' Actions")
        self._states = [_Scheme(c) for c in configs]
        self._actions = actions
        self._metric = metric
        self._now_ns = now_ns

    def __len__(self) -> int:
        return len(self._states)

    def start(self, attrs: Attrs) -> None:
        """kdamond_init_ctx: each scheme first applies one apply interval after the start."""
        for s in self._states:
            s.next_apply_sis = _apply_interval_samples(s.config, attrs)

    def commit(self, configs: Sequence[SchemeConfig], passed: int, old: Attrs, new: Attrs) -> None:
        """damon_commit_schemes: schemes kept by index keep their stats, quota and
        watermark state; new ones start afresh. A changed apply interval (or intervals)
        restarts the countdown to the next application, as damos_set_next_apply_sis does."""
        if self._actions is None and any(c.action != STAT for c in configs):
            raise ValueError("schemes with actions other than stat need the ops' Actions")
        intervals_changed = (old.sample_us, old.aggr_us) != (new.sample_us, new.aggr_us)
        states = []
        for c in configs:
            s = self._states[c.index] if c.index < len(self._states) else None
            if s is None:
                s = _Scheme(c, next_apply_sis=passed + _apply_interval_samples(c, new))
            else:
                if intervals_changed or s.config.apply_interval_us != c.apply_interval_us:
                    s.next_apply_sis = passed + _apply_interval_samples(c, new)
                s.config = c
                if not c.quotas.limited:  # the kernel would keep limiting by the old quota
                    s.quota.esz = 0
            states.append(s)
        self._states = states

    def results(self) -> tuple[SchemeResult, ...]:
        return tuple(s.result() for s in self._states)

    # -- watermarks -------------------------------------------------------------------------

    def wait_us(self) -> int:
        """How long to pause sampling before checking the watermarks again; 0: go on.

        Every scheme's activation is updated (damos_wmark_wait_us); the pause is
        the shortest any scheme asks, so one active scheme (or one without
        watermarks) keeps the kdamond sampling. No schemes: 0.
        """
        if not self._states:
            return 0
        value: int | None = None
        wait = None
        for s in self._states:
            wm = s.config.watermarks
            this = 0
            if wm.metric != WMARK_NONE:
                if value is None:
                    value = self._metric()
                if value > wm.high or wm.low > value:
                    if s.activated:
                        log.info(
                            "scheme %d (%s) deactivated: %s %d is %s the %s watermark %d",
                            s.config.index,
                            s.config.action,
                            wm.metric,
                            value,
                            "above" if value > wm.high else "below",
                            "high" if value > wm.high else "low",
                            wm.high if value > wm.high else wm.low,
                        )
                    s.activated = False
                    this = wm.interval_us
                elif wm.high >= value >= wm.mid and not s.activated:
                    this = wm.interval_us
                else:
                    if not s.activated:
                        log.info(
                            "scheme %d (%s) activated: %s %d is below the mid watermark %d",
                            s.config.index,
                            s.config.action,
                            wm.metric,
                            value,
                            wm.mid,
                        )
                    s.activated = True
            wait = this if wait is None else min(wait, this)
        return wait or 0

    # -- application --------------------------------------------------------------------------

    def due(self, passed: int) -> bool:
        """Whether some scheme's apply interval has come (kdamond_apply_schemes' first test)."""
        return any(passed >= s.next_apply_sis for s in self._states)

    def next_due(self) -> int | None:
        """The passed samples at which due() turns true next (None: no scheme)."""
        return min((s.next_apply_sis for s in self._states), default=None)

    def apply(
        self, targets: Sequence[_Target], passed: int, aggr_samples: int, attrs: Attrs
    ) -> None:
        """kdamond_apply_schemes after ``passed`` samples, ``aggr_samples`` of them in the
        current aggregation. Targets whose regions were cut or aged get new Regions."""
        due = [s for s in self._states if passed >= s.next_apply_sis and s.activated]
        if not due:
            return
        patterns = [pattern_nr_accesses(t.regions, aggr_samples, attrs) for t in targets]
        for s in due:
            self._adjust_quota(s, targets, patterns, attrs)
        if self._actions is not None:
            self._actions.begin()
        tried: dict[int, list[tuple[int, int, int, int, int]]] = {id(s): [] for s in due}
        for t, pattern in zip(targets, patterns, strict=True):
            self._apply_to_target(t, pattern, due, tried, attrs)
        for s in self._states:
            if passed >= s.next_apply_sis:
                s.next_apply_sis = passed + _apply_interval_samples(s.config, attrs)
        for s in due:
            s.tried = tuple(tried[id(s)])

    def _valid_mask(self, s: _Scheme, regions: Regions, pattern: np.ndarray) -> np.ndarray:
        """__damos_valid_target for every region: its size, nr_accesses and age in range."""
        p = s.config.pattern
        sizes = regions.sizes()
        return (
            (sizes >= np.uint64(p.sz_min))
            & (sizes <= np.uint64(p.sz_max))
            & (pattern >= p.nr_accesses_min)
            & (pattern <= p.nr_accesses_max)
            & (regions.age >= p.age_min)
            & (regions.age <= p.age_max)
        )

    @staticmethod
    def _weights(s: _Scheme) -> tuple[int, int]:
        return s.config.quotas.weight_nr_accesses, s.config.quotas.weight_age

    def _adjust_quota(
        self, s: _Scheme, targets: Sequence[_Target], patterns: list[np.ndarray], attrs: Attrs
    ) -> None:
        """damos_adjust_quota: a new charge window when the last one is over, then the lowest
        score that the effective quota still covers, the highest scores first."""
        config, quota = s.config.quotas, s.quota
        if not config.limited:
            return
        now = self._now_ns()
        window_ns = config.reset_interval_ms * 1_000_000
        if quota.charged_from is None or now >= quota.charged_from + window_ns:
            if quota.esz and quota.charged_sz >= quota.esz:
                s.qt_exceeds += 1
            quota.total_charged_sz += quota.charged_sz
            quota.charged_from = now
            quota.charged_sz = 0
            quota.esz = self._effective_quota(s)
        histogram = np.zeros(DAMOS_MAX_SCORE + 1, dtype=np.uint64)
        for t, pattern in zip(targets, patterns, strict=True):
            valid = self._valid_mask(s, t.regions, pattern)
            if not valid.any():
                continue
            scores = scheme_scores(
                s.config.action,
                t.regions.nr_accesses[valid],
                t.regions.age[valid],
                attrs,
                self._weights(s),
            )
            np.add.at(histogram, scores, t.regions.sizes()[valid])
        nonzero = np.flatnonzero(histogram)
        score = int(nonzero[-1]) if len(nonzero) else 0
        cumulated = 0
        while True:
            cumulated += int(histogram[score])
            if cumulated >= quota.esz or not score:
                break
            score -= 1
        quota.min_score = score

    def _effective_quota(self, s: _Scheme) -> int:
        """damos_set_effective_quota without goals: the time quota in bytes at the
        throughput measured so far (4 MiB per ms before any), capped by the size quota."""
        config, quota = s.config.quotas, s.quota
        if not config.ms:
            return config.bytes
        if quota.total_charged_ns:
            throughput = quota.total_charged_sz * 1_000_000 // quota.total_charged_ns
        else:
            throughput = PAGE_SIZE * 1024
        esz = min(throughput * config.ms, U64_MAX)
        if config.bytes and config.bytes < esz:
            esz = config.bytes
        return esz

    def _apply_to_target(
        self,
        t: _Target,
        pattern: np.ndarray,
        due: list[_Scheme],
        tried: dict[int, list[tuple[int, int, int, int, int]]],
        attrs: Attrs,
    ) -> None:
        """damon_do_apply_schemes for each region of the target, as the kernel walks them."""
        if all(self._simple(s) for s in due):
            for s in due:
                self._apply_whole(t, pattern, s, tried[id(s)])
            return
        index = t.config.index
        resuming = any(s.quota.charge_target_from == index for s in due)
        candidates = np.zeros(len(t.regions), dtype=bool)
        for s in due:
            candidates |= self._valid_mask(s, t.regions, pattern)
        if not resuming and not candidates.any():
            return  # no region can be tried, no window resumes here: nothing happens
        rows = [
            _Row(s, e, nr, last, age, int(p))
            for (s, e, nr, last, age), p in zip(t.regions.rows(), pattern.tolist(), strict=True)
        ]
        walk = (
            rows if resuming else [r for r, c in zip(rows, candidates.tolist(), strict=True) if c]
        )
        changed = False
        for r in walk:  # a region split off during the pass is not walked (list_for_each_safe)
            for s in due:
                quota = s.quota
                if quota.esz and quota.charged_sz >= quota.esz:
                    continue
                skipped = self._skip_charged(index, rows, r, s)
                if skipped is None:
                    continue
                if skipped is not r:
                    r, changed = skipped, True
                if not self._valid(s, r, attrs):
                    continue
                changed |= self._apply_one(t, rows, r, s, tried[id(s)])
        if changed:
            t.regions = Regions.build(
                [r.start for r in rows],
                [r.end for r in rows],
                [r.nr for r in rows],
                [r.last for r in rows],
                [r.age for r in rows],
            )

    @staticmethod
    def _simple(s: _Scheme) -> bool:
        """Nothing can cut a region: no quota, no core filter, no window to resume."""
        quota = s.quota
        return not quota.esz and quota.charge_target_from is None and not s.core_filters

    def _apply_whole(
        self,
        t: _Target,
        pattern: np.ndarray,
        s: _Scheme,
        tried: list[tuple[int, int, int, int, int]],
    ) -> None:
        """damon_do_apply_schemes for a _simple scheme, on the region arrays at once.

        Without cuts, a region's fate depends on nothing but itself and the
        schemes before this one (an action resets its age), so going scheme by
        scheme over the arrays gives what the kernel's region by region walk
        gives, without a Python step per region that is not acted on.
        """
        regions = t.regions
        chosen = np.flatnonzero(self._valid_mask(s, regions, pattern))
        if not len(chosen):
            return
        starts, ends = regions.starts[chosen].tolist(), regions.ends[chosen].tolist()
        index, action = t.config.index, s.config.action
        tried.extend(
            zip(
                [index] * len(chosen),
                starts,
                ends,
                pattern[chosen].tolist(),
                regions.age[chosen].tolist(),
                strict=True,
            )
        )
        sizes = [e - b for b, e in zip(starts, ends, strict=True)]
        s.nr_tried += len(chosen)
        s.sz_tried += sum(sizes)
        s.quota.charged_sz += sum(sizes)
        if action == STAT:
            return
        assert self._actions is not None
        reject = s.default_reject()[1]
        for start, end in zip(starts, ends, strict=True):
            began = self._now_ns()
            applied = self._actions.apply(t.config, action, start, end, s.page_filters, reject)
            s.quota.total_charged_ns += self._now_ns() - began
            s.nr_applied += bool(applied)
            s.sz_applied += applied
        regions.age[chosen] = 0

    @staticmethod
    def _skip_charged(index: int, rows: list[_Row], r: _Row, s: _Scheme) -> _Row | None:
        """damos_skip_charged_region: None to skip r; else the region to go on with (the
        part of r after what the last window charged)."""
        quota = s.quota
        if quota.charge_target_from is None:
            return r
        if index != quota.charge_target_from:
            return None
        if r is rows[-1]:
            quota.charge_target_from, quota.charge_addr_from = None, 0
            return None
        if quota.charge_addr_from and r.end <= quota.charge_addr_from:
            return None
        if quota.charge_addr_from and r.start < quota.charge_addr_from:
            skip = (quota.charge_addr_from - r.start) // PAGE_SIZE * PAGE_SIZE
            if not skip:
                if r.size <= PAGE_SIZE:
                    return None
                skip = PAGE_SIZE
            r = _split_at(rows, r, skip)
        quota.charge_target_from, quota.charge_addr_from = None, 0
        return r

    def _valid(self, s: _Scheme, r: _Row, attrs: Attrs) -> bool:
        """damos_valid_target: the access pattern, and the score when a quota applies."""
        p = s.config.pattern
        if not (
            p.sz_min <= r.size <= p.sz_max
            and p.nr_accesses_min <= r.pattern_nr <= p.nr_accesses_max
            and p.age_min <= r.age <= p.age_max
        ):
            return False
        if not s.quota.esz:
            return True
        score = scheme_score(s.config.action, r.nr, r.age, attrs, self._weights(s))
        return score >= s.quota.min_score

    def _apply_one(
        self,
        t: _Target,
        rows: list[_Row],
        r: _Row,
        s: _Scheme,
        tried: list[tuple[int, int, int, int, int]],
    ) -> bool:
        """damos_apply_scheme; whether the rows changed (a split, an age reset)."""
        quota, action = s.quota, s.config.action
        sz = r.size
        changed = False
        if quota.esz and quota.charged_sz + sz > quota.esz:
            sz = (quota.esz - quota.charged_sz) // PAGE_SIZE * PAGE_SIZE
            if not sz:
                s.nr_tried += 1
                return False
            _split_at(rows, r, sz)
            changed = True
        out, allowed, split = self._filter_out(t.config.index, rows, r, s)
        changed |= split
        if out:
            return changed
        tried.append((t.config.index, r.start, r.end, r.pattern_nr, r.age))
        began = self._now_ns()
        applied = 0
        if action != STAT:
            assert self._actions is not None
            if allowed:  # a core filter allowed it: the per page filters are not asked
                applied = self._actions.apply(t.config, action, r.start, r.end, (), False)
            else:
                applied = self._actions.apply(
                    t.config, action, r.start, r.end, s.page_filters, s.default_reject()[1]
                )
        quota.total_charged_ns += self._now_ns() - began
        quota.charged_sz += sz
        if quota.esz and quota.charged_sz >= quota.esz:
            quota.charge_target_from = t.config.index
            quota.charge_addr_from = r.end + 1
        if action != STAT:
            r.age = 0
            changed = True
        s.nr_tried += 1
        s.sz_tried += sz
        if applied:
            s.nr_applied += 1
        s.sz_applied += applied
        return changed

    def _filter_out(
        self, index: int, rows: list[_Row], r: _Row, s: _Scheme
    ) -> tuple[bool, bool, bool]:
        """damos_filter_out over the core filters: (rejected, allowed by a filter, split).

        The first filter that matches decides; an addr filter cuts a region
        that straddles its range and decides for the first part.
        """
        split = False
        for f in s.core_filters:
            if f.type == "target":
                matched = index == f.target_idx
            else:
                start = f.addr_start // PAGE_SIZE * PAGE_SIZE
                end = f.addr_end // PAGE_SIZE * PAGE_SIZE
                if start <= r.start and r.end <= end:
                    matched = True
                elif r.end <= start or end <= r.start:
                    matched = False
                elif r.start < start:
                    _split_at(rows, r, start - r.start)
                    matched, split = False, True
                else:
                    _split_at(rows, r, end - r.start)
                    matched, split = True, True
            if matched == f.matching:
                return not f.allow, f.allow, split
        return s.default_reject()[0], False, split
