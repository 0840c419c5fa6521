"""What the kernel's DAMOS did, in damond's shape (SchemeResult), for each kernel snapshot.

A kernel-backed context's schemes run in the kernel's kdamond, which tells
what they did in two ways, and damond reads each the cheap way:

- the stats (nr_tried, sz_tried, nr_applied, sz_applied, qt_exceeds) and the
  effective size quota: the kernel copies them into sysfs files only on a
  `state` command (update_schemes_stats, update_schemes_effective_quotas),
  which the kdamond carries out at its next sample while the writer waits
  in 100 ms steps, one such command at a time for the whole tree. The
  kernel monitor asks on a worker thread, at most once every
  STATS_INTERVAL_S (as often as the admin tree announces stats), and what it
  read rides on the snapshots that follow;
- the damos_before_apply trace event: a record for each region a scheme is
  about to act on, with the scheme's and the target's index. (The sysfs way,
  update_schemes_tried_regions, shows one application per request, holds the
  kernel's sysfs lock for the whole of it, up to twice the apply interval,
  refusing every other writer meanwhile, and names no target.)

The kernel applies the schemes just before it reports an aggregation
(kdamond_fn: merge, apply the schemes, then the damon_aggregated records
as it resets the counts), so the records before an aggregation's first
damon_aggregated record are the applications since the aggregation before.
A scheme's tried regions in a snapshot are those of its last application:
at the default apply interval (the aggregation interval) that of this very
aggregation, an empty list when it tried nothing; with a shorter interval
the last of several, told apart by the regions' order (an application walks
the targets in order and each target's regions by address); with a longer
one an aggregation without records keeps the list it had, since nothing
says whether an application that tried nothing took place. Tried regions
whose records were lost (a full trace buffer) keep the list they had too.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from damond.monitor.config import ContextConfig, SchemeConfig
from damond.monitor.ops.damon_trace import Records
from damond.monitor.snapshot import SchemeResult, SchemeStats, TriedRegion

STATS_INTERVAL_S = 1.0
"""The kernel's stats and effective quotas are read at most this often (the admin tree
announces them at most once a second: hierarchy.STATS_INTERVAL_S)."""
NO_STATS = SchemeStats()


def last_applications(records: Records) -> dict[int, tuple[TriedRegion, ...]]:
    """Of one kdamond's damos_before_apply records, in time order: the regions of each
    scheme's last application, by scheme index."""
    schemes = records.field("scheme_idx")
    found: dict[int, tuple[TriedRegion, ...]] = {}
    for index in np.unique(schemes).tolist():
        mine = records.take(schemes == index)
        targets, starts = mine.field("target_idx"), mine.field("start")
        # an application walks the targets in order, each one's regions by address:
        # where that order falls back, the next application began
        back = (targets[1:] < targets[:-1]) | (
            (targets[1:] == targets[:-1]) & (starts[1:] <= starts[:-1])
        )
        begins = np.flatnonzero(back)
        first = int(begins[-1]) + 1 if len(begins) else 0
        found[int(index)] = tuple(
            zip(
                targets[first:].tolist(),
                starts[first:].tolist(),
                mine.field("end")[first:].tolist(),
                mine.field("nr_accesses")[first:].tolist(),
                mine.field("age")[first:].tolist(),
                strict=True,
            )
        )
    return found


def _applied_every_aggregation(scheme: SchemeConfig, config: ContextConfig) -> bool:
    """An application is due at least once per aggregation (so none recorded: it tried
    nothing, or the watermarks held it off)."""
    aggr = config.attrs.aggr_us
    return (scheme.apply_interval_us or aggr) <= aggr


class KernelSchemes:
    """One kernel-backed context's scheme results, as its snapshots carry them (on the
    event loop: the relay hands the tried regions, the monitor the stats it read)."""

    def __init__(self, tracks_tried: bool = True) -> None:
        self._tracks_tried = tracks_tried
        """The damos_before_apply records come (the kernel has the event); else the
        tried regions stay unknown (None: GetTriedRegions answers NoData)."""
        self._pending: list[tuple[np.ndarray, Records]] = []
        """damos_before_apply records (and their trace times) not yet in a snapshot."""
        self._lost = False
        self._stats: dict[int, SchemeStats] = {}
        self._effective: dict[int, int] = {}
        self._tried: dict[int, tuple[TriedRegion, ...]] = {}

    def tried(self, ts: np.ndarray, records: Records) -> None:
        """damos_before_apply records of the kdamond, in time order."""
        self._pending.append((ts, records))

    def lost(self) -> None:
        """Records were lost: the applications under way are not whole."""
        self._pending.clear()
        self._lost = True

    def took_stats(self, stats: Sequence[tuple[int, ...]], effective: Sequence[int]) -> None:
        """What the kernel's stats and quotas/effective_bytes files said, scheme by scheme."""
        self._stats = {i: SchemeStats(*values) for i, values in enumerate(stats)}
        self._effective = dict(enumerate(effective))

    def results(self, ts: int, config: ContextConfig) -> tuple[SchemeResult, ...]:
        """The schemes' results as of the aggregation whose first record has trace time ts
        (the applications recorded before it are its own and its predecessors')."""
        applied = self._applications_until(ts)
        results = []
        for scheme in config.schemes:
            index = scheme.index
            if index in applied:
                self._tried[index] = applied[index]
            elif self._tracks_tried and not self._lost and _applied_every_aggregation(
                scheme, config
            ):
                self._tried[index] = ()
            results.append(
                SchemeResult(
                    index,
                    self._stats.get(index, NO_STATS),
                    self._effective.get(index, 0),
                    active=True,  # the kernel does not say (6.12 has no file for it)
                    tried=self._tried.get(index),
                )
            )
        self._lost = False
        return tuple(results)

    def _applications_until(self, ts: int) -> dict[int, tuple[TriedRegion, ...]]:
        taken, kept = [], []
        for times, records in self._pending:
            early = times <= np.uint64(ts)
            if early.all():
                taken.append(records)
                continue
            if early.any():
                taken.append(records.take(early))
            kept.append((times[~early], records.take(~early)))
        self._pending = kept
        return last_applications(Records.join(taken)) if taken else {}

