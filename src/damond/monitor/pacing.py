"""Sample pacing: sample_us between samples, stretched to keep sampling under its CPU ceiling.

A user-space access check costs CPU per sample, and for some checks that cost
grows with the target's memory, not with its regions (clear_refs and
soft_dirty walk every page table entry). ``cpu_limit_pct`` bounds it: the
worker's CPU time per sample, averaged over an aggregation, may be at most
that share of the time between samples. When a sample costs more, the sleep
between samples grows (never shrinks below sample_us: a sampled page must
have the whole interval to be accessed), and since aggregations are counted
in samples they grow with it. The Pacer measures what really happened, so
that every Snapshot carries the intervals its aggregation truly had.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

from damond.monitor.config import Attrs

BEHIND_RATIO = 1.2
"""An aggregation that took more than this times aggr_us is "falling behind"."""
CAUGHT_UP_RATIO = 1.1
"""...and sampling has caught up again below this (hysteresis: no flapping at 1.2)."""


@dataclass(frozen=True)
class Effective:
    """The intervals one aggregation really had, and why."""

    sample_us: int
    """Wall time between two samples: the sleep plus what a sample took."""
    aggr_us: int
    """Wall time of the aggregation: its samples × sample_us, really."""
    cpu_us_per_sample: int
    """The worker's CPU time per sample over the aggregation."""
    stretched: bool
    """The CPU ceiling made the sleep longer than sample_us."""


class Pacer:
    """How long the worker sleeps before each check, and what each aggregation really took.

    The cost of a sample is the worker thread's CPU time from one sample to the
    next (check, aggregation when due, prepare). The sleep uses the mean cost
    per sample of the last aggregation (of the samples so far, in the first
    one), so that every sample of an aggregation gets the same interval.
    """

    def __init__(
        self,
        clock_ns: Callable[[], int] = time.monotonic_ns,
        cpu_clock_ns: Callable[[], int] = time.thread_time_ns,
    ) -> None:
        self._clock = clock_ns
        self._cpu = cpu_clock_ns
        self._aggr_start = 0
        self._cpu_mark = 0
        self._aggr_cpu = 0
        self._aggr_samples = 0
        self._mean_cost: float | None = None
        """CPU ns per sample over the last aggregation; None before the first."""
        self._stretched = False
        self.behind = False
        """The last aggregation ran more than BEHIND_RATIO slower than asked (with
        hysteresis: it stays so until one runs faster than CAUGHT_UP_RATIO)."""

    def start(self) -> None:
        """Before the first prepare: the first aggregation starts now."""
        self._aggr_start = self._clock()
        self._cpu_mark = self._cpu()
        self._aggr_cpu = self._aggr_samples = 0
        self._mean_cost = None
        self._stretched = self.behind = False

    def sampled(self) -> None:
        """After a sample's work (check, prepare): account its CPU time."""
        now = self._cpu()
        self._aggr_cpu += now - self._cpu_mark
        self._cpu_mark = now
        self._aggr_samples += 1

    def paused(self, ns: int) -> None:
        """Sampling stood still for ns (DAMOS watermarks): not the sampler's time."""
        self._aggr_start += ns

    def sleep_s(self, attrs: Attrs) -> float:
        """The sleep before the next check: sample_us, or longer where the ceiling asks.

        At a cost c per sample and a ceiling L, a period of c + sleep uses the
        share c / (c + sleep) of a CPU: at most L when sleep >= c (1/L - 1).
        """
        sample_ns = attrs.sample_us * 1000
        cost = self._mean_cost
        if cost is None and self._aggr_samples:
            cost = self._aggr_cpu / self._aggr_samples
        limit = attrs.cpu_limit_pct
        sleep_ns = float(sample_ns)
        if limit and cost:
            sleep_ns = max(sleep_ns, cost * (100 / limit - 1))
        self._stretched = sleep_ns > sample_ns
        return sleep_ns / 1e9

    def aggregated(self, samples: int, attrs: Attrs) -> Effective:
        """At an aggregation of `samples` samples: the intervals it really had."""
        now = self._clock()
        wall_ns = now - self._aggr_start
        self._aggr_start = now
        cpu_ns = self._aggr_cpu / self._aggr_samples if self._aggr_samples else 0.0
        if self._aggr_samples:
            self._mean_cost = cpu_ns
        self._aggr_cpu = self._aggr_samples = 0
        samples = max(samples, 1)
        found = Effective(
            sample_us=round(wall_ns / samples / 1000),
            aggr_us=round(wall_ns / 1000),
            cpu_us_per_sample=round(cpu_ns / 1000),
            stretched=self._stretched,
        )
        asked = samples * attrs.sample_us
        ratio = found.aggr_us / asked if asked else 1.0
        self.behind = ratio > (CAUGHT_UP_RATIO if self.behind else BEHIND_RATIO)
        return found
