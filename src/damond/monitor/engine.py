"""The monitoring engine: kdamond_fn's loop for one context, one step at a time.

The engine is synchronous and owns no thread and no clock of its own: a runner
calls prepare(), sleeps for sample_us, calls check(), and publishes the
Snapshot that check() returns at each aggregation. Everything is counted in
samples, as the kernel does since v6.7, so a slow sample delays an aggregation
instead of shortening it. Configurations are validated on the way in
(ContextConfig.validate), as damon_set_attrs guards the kernel's core.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from damond.monitor.config import PAGE_SIZE, Attrs, ContextConfig, TargetConfig
from damond.monitor.ops.base import (
    AccessCheck,
    Actions,
    AddressSpace,
    TargetGone,
    TargetSampler,
    sampler_of,
)
from damond.monitor.ops.meminfo import free_mem_rate
from damond.monitor.regions import Regions, evenly_split, set_regions
from damond.monitor.schemes import Schemes
from damond.monitor.snapshot import Snapshot, TargetSnapshot

_log = logging.getLogger(__name__)

UNIFORMS_MAX = 1 << 16
"""Uniforms drawn at once at most (512 KiB): a block covers the samples until the
regions may change next, unless regions × samples are more than this."""


def realtime_us() -> int:
    """CLOCK_REALTIME in microseconds: the Snapshot's timestamp."""
    return time.clock_gettime_ns(time.CLOCK_REALTIME) // 1000


def _validated(config: ContextConfig) -> ContextConfig:
    """The rules, and what damond's own engine does of the schemes: the operations set's
    table says which actions and filters the user backend has."""
    ops = config.operations
    return config.validate().validate_doable(ops.actions, ops.filter_types)


@dataclass(eq=False)
class _Target:
    config: TargetConfig
    regions: Regions
    sampler: TargetSampler | None = None
    """The access check's fast path for this target (ops/base.py), or None."""
    column: int = 0
    """Where this target's regions start in a row of the engine's uniforms."""


class Engine:
    """DAMON's adaptive-regions monitor for all targets of one context."""

    def __init__(
        self,
        config: ContextConfig,
        space: AddressSpace,
        access: AccessCheck,
        rng: np.random.Generator | None = None,
        clock: Callable[[], int] = realtime_us,
        actions: Actions | None = None,
        metric: Callable[[], int] = free_mem_rate,
        now_ns: Callable[[], int] = time.monotonic_ns,
    ) -> None:
        """actions: what the schemes' actions do (the ops'; only stat schemes without);
        metric: the watermarks' free memory rate; now_ns: the quotas' clock."""
        self._config = _validated(config)
        self._space = space
        self._access = access
        self._schemes = Schemes(config.schemes, actions, metric, now_ns)
        self._rng = rng if rng is not None else np.random.default_rng()
        self._clock = clock
        self._targets: list[_Target] = []
        self._gone: dict[int, TargetConfig] = {}
        """Dropped targets by index: a commit with the same pid does not revive them."""
        self._pending: ContextConfig | None = None
        self._pending_lock = threading.Lock()
        self._started = False
        self._passed_samples = 0
        self._aggr_samples = 0
        self._next_aggregation = 0
        self._next_update = 0
        self._seq = 0
        self._sz_limit = PAGE_SIZE
        self._last_nr_regions = 0
        """kdamond_split_regions' static last_nr_regions."""
        self._uniforms = np.empty(0)
        """Rows of uniforms that pick the sampled pages, one row per sample (_draw)."""
        self._rows = 0
        """Rows in _uniforms; 0 once the regions changed (draw anew)."""
        self._row = 0
        """The next sample's row."""
        self._width = 0
        """Uniforms per row: the regions of all targets."""

    @property
    def config(self) -> ContextConfig:
        """The configuration in effect (a pending commit is not, yet)."""
        return self._config

    @property
    def done(self) -> bool:
        """True once started and no target remains: the kdamond should stop."""
        return self._started and not self._targets

    @property
    def nr_regions(self) -> int:
        return sum(len(t.regions) for t in self._targets)

    def regions_of(self, index: int) -> Regions | None:
        """The live regions of the target with this index (for tests and tools)."""
        for t in self._targets:
            if t.config.index == index:
                return t.regions
        return None

    # -- life cycle ---------------------------------------------------------------------------

    def start(self) -> None:
        """kdamond_init_ctx + ops.init: counters to zero, initial regions for every target."""
        attrs = self._config.attrs
        self._release(self._targets)
        self._targets = []
        self._gone = {}
        for tc in self._config.targets:
            target = self._init_target(tc, attrs)
            if target is not None:
                self._targets.append(target)
        self._passed_samples = 0
        self._aggr_samples = 0
        self._next_aggregation = attrs.samples_per_aggregation
        self._next_update = attrs.samples_per_update
        self._seq = 0
        self._last_nr_regions = 0
        self._sz_limit = self._region_sz_limit()
        self._rows = 0
        self._schemes.start(attrs)
        self._started = True

    def commit(self, config: ContextConfig) -> None:
        """Take a new configuration at the next aggregation boundary (any thread).

        ConfigError, now, for one the rules refuse.
        """
        _validated(config)
        if not self._started:
            self._config = config
            return
        with self._pending_lock:
            self._pending = config

    def activation_wait_us(self) -> int:
        """kdamond_wait_activation: how long to pause before sampling again, 0 to sample
        now. Not 0 only while the watermarks have every scheme off; a commit waiting for
        an aggregation boundary is applied then (the kernel's kdamond_call in that loop),
        or a paused kdamond could never be given the watermarks that wake it."""
        wait = self._schemes.wait_us()
        if wait:
            with self._pending_lock:
                pending, self._pending = self._pending, None
            if pending is not None:
                self._apply_commit(pending)
                wait = self._schemes.wait_us()
        return wait

    def close(self) -> None:
        """Release the ops' files: the samplers', the access check's and the space's."""
        self._release(self._targets)
        self._access.close()
        self._space.close()

    # -- one sample ---------------------------------------------------------------------------

    def prepare(self) -> None:
        """prepare_access_checks: a random page per region, marked not accessed.

        A target whose access check offers a fast path (ops/base.py,
        TargetSampler) is sampled in one call; the others through
        pick_sampling_addrs and the check's prepare, the reference. Both take
        their uniforms from the same row, so both pick the same pages.
        """
        if self._row >= self._rows:
            self._draw()
        offset = self._row * self._width
        self._row += 1
        uniforms = self._uniforms
        for t in self._targets:  # _drop makes a new list: this one stays whole
            regions = t.regions
            try:
                if t.sampler is not None:
                    t.sampler.prepare(regions.starts, regions.ends, uniforms, offset + t.column)
                else:
                    first = offset + t.column
                    addrs = regions.pick_sampling_addrs(uniforms[first : first + len(regions)])
                    self._access.prepare(t.config, addrs)
            except TargetGone as gone:
                self._drop(t, gone)

    def check(self) -> Snapshot | None:
        """check_accesses, then aggregation and update when due.

        Returns the Snapshot at an aggregation boundary, else None (also
        when no target is left: see done).
        """
        for t in self._targets:
            regions = t.regions
            try:
                if t.sampler is not None:
                    t.sampler.check(regions.nr_accesses)
                    continue
                addrs = regions.sampling_addrs
                if addrs is None:
                    raise RuntimeError(
                        "Engine.check() without a prepare() since the regions changed"
                    )
                regions.add_accesses(self._access.check(t.config, addrs))
            except TargetGone as gone:
                self._drop(t, gone)
        self._passed_samples += 1
        self._aggr_samples += 1
        if not self._targets:
            return None

        snapshot = None
        if self._passed_samples >= self._next_aggregation:
            snapshot = self._aggregate()
            self._rows = 0
        elif self._schemes.due(self._passed_samples):  # an apply interval inside an aggregation
            self._schemes.apply(
                self._targets, self._passed_samples, self._aggr_samples, self._config.attrs
            )
            self._rows = 0
        if self._passed_samples >= self._next_update:
            self._next_update += self._config.attrs.samples_per_update
            self._update()
            self._rows = 0
        return snapshot

    def _draw(self) -> None:
        """Uniforms for the samples until the regions may change next (the next
        aggregation, update or scheme application), drawn at once: one numpy call where
        a call per target and sample costs a few hundred µs each right after a sleep
        under emulation. A row per sample, each target's regions in turn: the numbers a
        draw per target and sample would give, in the same order (PCG64 makes a double
        of each 64-bit output, a block of n is n single draws), so that the splits that
        draw from the same generator at the block's end see what they saw before. Only
        a target dropped or a commit inside a block leaves rows unused."""
        width = 0
        for t in self._targets:
            t.column = width
            width += len(t.regions)
        end = min(self._next_aggregation, self._next_update)
        due = self._schemes.next_due()
        if due is not None:
            end = min(end, due)
        rows = end - self._passed_samples
        rows = max(1, min(rows, UNIFORMS_MAX // max(width, 1)))
        self._uniforms = self._rng.random(rows * width)
        self._rows, self._width, self._row = rows, width, 0

    # -- aggregation --------------------------------------------------------------------------

    def _aggregate(self) -> Snapshot:
        """kdamond_fn's aggregation: merge, publish, commit, apply schemes, reset, split.

        The snapshot shows the regions as merged, before the schemes acted on
        them (an action resets a region's age), and the schemes' results of
        this aggregation.
        """
        max_nr_accesses = max(
            (int(t.regions.nr_accesses.max()) for t in self._targets if len(t.regions)),
            default=0,
        )
        self._merge_regions(max_nr_accesses // 10)
        regions, ended = self._target_snapshots(), self._clock()
        samples, self._aggr_samples = self._aggr_samples, 0
        # kdamond_call (where the kernel applies a commit) runs before the reset.
        with self._pending_lock:
            pending, self._pending = self._pending, None
        if pending is not None:
            self._apply_commit(pending)
        attrs = self._config.attrs
        if self._schemes.due(self._passed_samples):
            self._schemes.apply(
                self._targets, self._passed_samples, attrs.samples_per_aggregation, attrs
            )
        snapshot = self._snapshot(ended, samples, regions)
        self._next_aggregation = self._passed_samples + self._config.attrs.samples_per_aggregation
        for t in self._targets:
            t.regions.reset_aggregated()
        self._split_regions()
        return snapshot

    def _merge_regions(self, threshold: int) -> None:
        """kdamond_merge_regions: merge, doubling the threshold while over max_nr_regions."""
        attrs = self._config.attrs
        max_threshold = attrs.samples_per_aggregation
        while True:
            for t in self._targets:
                t.regions.merge(threshold, self._sz_limit)
            threshold = max(1, threshold * 2)
            if not (self.nr_regions > attrs.max_nr_regions and threshold // 2 < max_threshold):
                break

    def _split_regions(self) -> None:
        """kdamond_split_regions: 2 pieces each, 3 when the count settled and there is room."""
        attrs = self._config.attrs
        nr_regions = self.nr_regions
        if nr_regions > attrs.max_nr_regions // 2:
            return
        nr_subs = 2
        if self._last_nr_regions == nr_regions and nr_regions < attrs.max_nr_regions // 3:
            nr_subs = 3
        for t in self._targets:
            t.regions.split(nr_subs, self._rng)
        self._last_nr_regions = nr_regions

    def _target_snapshots(self) -> tuple[TargetSnapshot, ...]:
        return tuple(
            TargetSnapshot(
                index=t.config.index,
                pid=t.config.pid,
                starts=t.regions.starts.copy(),
                ends=t.regions.ends.copy(),
                nr_accesses=t.regions.nr_accesses.copy(),
                ages=t.regions.age.copy(),
            )
            for t in self._targets
        )

    def _snapshot(
        self, ended_us: int, samples: int, targets: tuple[TargetSnapshot, ...]
    ) -> Snapshot:
        self._seq += 1
        return Snapshot(
            seq=self._seq,
            timestamp_us=ended_us,
            max_nr_accesses=samples,
            targets=targets,
            schemes=self._schemes.results(),
        )

    # -- update and commit --------------------------------------------------------------------

    def _update(self) -> None:
        """ops.update: fit regions to the current ranges (vaddr: the new mappings)."""
        for t in list(self._targets):
            try:
                ranges = self._space.update_ranges(t.config)
            except TargetGone as gone:
                self._drop(t, gone)
                continue
            if ranges is not None:
                t.regions = set_regions(t.regions, ranges)
        self._sz_limit = self._region_sz_limit()

    def _apply_commit(self, new: ContextConfig) -> None:
        """damon_commit_ctx, at an aggregation boundary.

        Targets are matched by index. A changed pid starts the target afresh
        (the kernel would keep the old process's regions until the next
        update); changed, non-empty user regions are fitted with
        set_regions; otherwise a target keeps its regions. Changed intervals
        rescale nr_accesses and age as damon_set_attrs does, and restart the
        update countdown.
        """
        old = self._config
        by_index = {t.config.index: t for t in self._targets}
        targets: list[_Target] = []
        for tc in new.targets:
            cur = by_index.get(tc.index)
            if cur is None:
                gone = self._gone.get(tc.index)
                if gone is not None and gone.pid == tc.pid:
                    continue
                self._gone.pop(tc.index, None)
                started = self._init_target(tc, new.attrs)
                if started is not None:
                    targets.append(started)
                continue
            if cur.config.pid != tc.pid:
                started = self._init_target(tc, new.attrs)
                if started is not None:
                    targets.append(started)
                continue
            if tc.regions and tc.regions != cur.config.regions:
                cur.regions = set_regions(cur.regions, tc.regions)
            cur.config = tc
            targets.append(cur)
        self._release([t for t in self._targets if t not in targets])
        self._targets = targets
        self._rows = 0
        self._config = new
        self._schemes.commit(new.schemes, self._passed_samples, old.attrs, new.attrs)

        oa, na = old.attrs, new.attrs
        if (oa.sample_us, oa.aggr_us) != (na.sample_us, na.aggr_us):
            for t in self._targets:
                t.regions.rescale(
                    oa.samples_per_aggregation, na.samples_per_aggregation, oa.aggr_us, na.aggr_us
                )
        self._next_update = self._passed_samples + na.samples_per_update
        self._sz_limit = self._region_sz_limit()

    # -- helpers ------------------------------------------------------------------------------

    def _init_target(self, tc: TargetConfig, attrs: Attrs) -> _Target | None:
        """ops.init for one target: user regions as given, else its ranges split evenly."""
        try:
            ranges = self._space.initial_ranges(tc)
            sampler = sampler_of(self._access, tc)
        except TargetGone as gone:
            _log.info("target %d (pid %d) dropped: %s", tc.index, tc.pid, gone)
            self._gone[tc.index] = tc
            return None
        if tc.regions:
            regions = set_regions(Regions.empty(), tc.regions)
        else:
            regions = evenly_split(ranges, attrs.min_nr_regions)
        return _Target(tc, regions, sampler)

    def _drop(self, target: _Target, gone: TargetGone) -> None:
        _log.info("target %d (pid %d) dropped: %s", target.config.index, target.config.pid, gone)
        self._release([target])
        self._targets = [t for t in self._targets if t is not target]
        self._rows = 0
        self._gone[target.config.index] = target.config
        self._sz_limit = self._region_sz_limit()

    @staticmethod
    def _release(targets: list[_Target]) -> None:
        """Close the samplers of targets that are no longer sampled."""
        for t in targets:
            if t.sampler is not None:
                t.sampler.close()
                t.sampler = None

    def _region_sz_limit(self) -> int:
        """damon_region_sz_limit: no merge makes a region larger than total / min_nr_regions."""
        total = sum(t.regions.total_size() for t in self._targets)
        min_nr = self._config.attrs.min_nr_regions
        if min_nr:
            total //= min_nr
        return max(total, PAGE_SIZE)
