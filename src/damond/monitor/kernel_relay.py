"""The reader of kernel DAMON's trace events for every kernel-backed kdamond, on the event loop.

The kernel writes the damon_aggregated events of all its kdamonds into
damond's one tracefs instance (ops/damon_trace.py), and reading a
trace_pipe_raw consumes what it returns: so there is one reader, this relay,
which hands each kdamond's records (told apart by the kdamond thread's pid,
the records' common_pid) to whoever watches that pid. The trace pipes and the
watchers' pidfds (kdamond threads, target processes) are readers of the
event loop itself: an aggregation costs one wakeup of the loop, which then
publishes its snapshot at once, with no thread to hand it over from (one
more wakeup and context switch per aggregation, which is most of the cost of
relaying a small one).

``Aggregations`` turns one kdamond's stream of records back into whole
aggregations: the kernel emits, at the end of each aggregation, every
region of target 0, then of target 1, ..., each record saying how many
regions its target has.

Where the kernel has it, a second instance holds the damos_before_apply
events (a region a DAMOS scheme is about to act on): its pipes are read
with the first, and each drain hands a kdamond its tried regions before
its aggregations, so that an aggregation finds the scheme applications that
came before it (the kernel applies the schemes just before it reports the
aggregation).
"""

from __future__ import annotations

import asyncio
import logging
import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

import numpy as np

from damond.monitor.ops.damon_trace import Events, Records, TraceInstance

log = logging.getLogger(__name__)

ORPHAN_RECORDS = 1 << 16
"""Records of kdamonds nobody watches (yet) kept for a watcher that comes late."""
SETTLE_S = 0.01
"""Woken by a kdamond's records, the relay reads them at once: in the test guest the
kernel has written the whole aggregation by the time damond runs, and a wakeup is what
costs (about 1.6 ms of CPU for an idle Python loop under TCG, more than reading and
publishing a 100-region aggregation), so an aggregation costs one. Found half an
aggregation (the kernel writes its records in one burst, but the reader may have been
woken in its middle), it stops listening for this long (or a tenth of the shortest
aggregation interval, if less) and reads again, rather than be woken for every few
records of the rest. Snapshots come that much later then: a tenth of an aggregation
at most."""


@dataclass(frozen=True)
class Aggregation:
    """The regions of one aggregation of one kdamond, target by target."""

    ts: int
    """Trace clock (CLOCK_MONOTONIC) nanoseconds of its first record: the aggregation's end."""
    targets: tuple[tuple[int, Records], ...]
    """(target index, its regions sorted by start), in target order."""


class Aggregations:
    """One kdamond's records, put back together into whole aggregations.

    Records are checked by their first and last of each target's run (same
    target, same count) in plain Python; in full (and for sorted, apart
    regions) only after records were lost, when a run may be glued from two
    aggregations.
    """

    def __init__(self, nr_targets: int) -> None:
        self.nr_targets = nr_targets
        self._ts = np.zeros(0, np.uint64)
        self._records: Records | None = None
        self._blocks: list[tuple[int, Records]] = []
        self._first_ts = 0
        self._last_target = -1
        self._resync = False

    def lose(self) -> None:
        """Records were lost: what is half read is dropped, and the next whole
        aggregation is waited for (each run of records checked in full till then)."""
        self._blocks, self._last_target = [], -1
        self._ts, self._records = self._ts[:0], None
        self._resync = True

    @property
    def midway(self) -> bool:
        """An aggregation is half read: its kdamond is writing the rest."""
        return bool(self._blocks) or (self._records is not None and len(self._records) > 0)

    def add(self, ts: np.ndarray, records: Records) -> list[Aggregation]:
        """Records (in time order) of this kdamond; the aggregations they complete."""
        if self._records is not None and len(self._records):
            ts = np.concatenate((self._ts, ts))
            records = Records.join([self._records, records])
        targets = records.field("target_id").tolist()
        counts = records.field("nr_regions").tolist()
        done: list[Aggregation] = []
        i, n = 0, len(targets)
        while i < n:
            target, count = targets[i], counts[i]
            if count <= 0:
                i = self._torn(records, i)
                continue
            if i + count > n:
                break  # the rest of this target's regions has not been read yet
            last = i + count - 1
            block = records.take(slice(i, i + count))
            if (targets[last], counts[last]) != (target, count) or (
                self._resync and not _one_run(block, target, count)
            ):
                i = self._torn(records, i)
                continue
            starts_anew = target <= self._last_target
            if self._resync:
                if target != 0 and not starts_anew:
                    self._last_target = target  # the tail of an aggregation begun unseen
                    i += count
                    continue
                self._resync = False
            elif starts_anew and self._blocks:
                # a target with no regions ended the last aggregation unnoticed
                done.append(Aggregation(self._first_ts, tuple(self._blocks)))
                self._blocks = []
            if not self._blocks:
                self._first_ts = int(ts[i])
            self._blocks.append((target, block))
            self._last_target = target
            i += count
            if target >= self.nr_targets - 1:
                done.append(Aggregation(self._first_ts, tuple(self._blocks)))
                self._blocks, self._last_target = [], -1
        self._ts, self._records = ts[i:], records.take(slice(i, None))
        return done

    def _torn(self, records: Records, i: int) -> int:
        """The run of records at i is broken (records were lost): drop the aggregation and
        go on where a run may begin: at the next record of another target, or one whose
        region starts below the one before (the next aggregation's first)."""
        self.lose()
        targets = records.field("target_id")[i:]
        starts, ends = records.field("start")[i:], records.field("end")[i:]
        begins = (targets[1:] != targets[:-1]) | (starts[1:] < ends[:-1])
        later = np.flatnonzero(begins)
        return i + 1 + int(later[0]) if len(later) else len(records)


def _one_run(block: Records, target: int, count: int) -> bool:
    """The records are one target's regions of one aggregation: same target, same count,
    sorted and apart (the tail of one aggregation followed by the head of the next, once
    records in between were lost, would have the first two but not the last)."""
    starts, ends = block.field("start"), block.field("end")
    return bool(
        (block.field("target_id") == target).all()
        and (block.field("nr_regions") == count).all()
        and (starts[1:] >= ends[:-1]).all()
    )


class Watcher(Protocol):
    """A kernel-backed kdamond, as the relay feeds it (on the event loop)."""

    def records(self, ts: np.ndarray, records: Records) -> None: ...

    def tried(self, ts: np.ndarray, records: Records) -> None:
        """damos_before_apply records of its kdamond, in time order."""
        ...

    def lost(self) -> None: ...

    def lost_tried(self) -> None:
        """damos_before_apply records were lost: what it holds of them is incomplete."""
        ...

    @property
    def midway(self) -> bool:
        """It has half an aggregation: more records are coming at once."""
        ...

    @property
    def aggr_s(self) -> float:
        """Its aggregation interval, in seconds."""
        ...


class Relay:
    """The reader of damond's trace instance, on the event loop, from the first watch."""

    def __init__(
        self,
        trace: TraceInstance,
        loop: asyncio.AbstractEventLoop,
        tried: TraceInstance | None = None,
    ) -> None:
        self._trace = trace
        self._tried = tried if tried is not None and tried.format is not None else None
        self._loop = loop
        self._pipes: list[int] = []
        self._tried_pipes: list[int] = []
        self._fds: set[int] = set()
        self._watchers: dict[int, Watcher] = {}
        self._orphans: dict[int, list[tuple[np.ndarray, Records]]] = {}
        self._settling: asyncio.TimerHandle | None = None

    def watch(self, pid: int, watcher: Watcher, since: int = 0) -> None:
        """Hand the records of kdamond thread pid to watcher, those already read from
        trace time since on too (older ones are of an earlier thread with that pid)."""
        self._start()
        self._watchers[pid] = watcher
        for ts, records in self._orphans.pop(pid, []):
            recent = ts >= since
            if recent.any():
                watcher.records(ts[recent], records.take(recent))

    def unwatch(self, pid: int) -> None:
        self._watchers.pop(pid, None)

    def add_fd(self, fd: int, ready: Callable[[], None]) -> None:
        """Call ready() once fd is readable (a pidfd: its process exited); the fd is then
        forgotten (the caller closes it)."""

        def once() -> None:
            self.remove_fd(fd)
            ready()

        self._fds.add(fd)
        self._loop.add_reader(fd, once)

    def remove_fd(self, fd: int) -> None:
        if fd in self._fds:
            self._fds.discard(fd)
            self._loop.remove_reader(fd)

    def close(self) -> None:
        """Stop reading (the trace pipes are closed; watchers' fds are theirs)."""
        for fd in list(self._fds):
            self.remove_fd(fd)
        if self._settling is not None:
            self._settling.cancel()
            self._settling = None
        else:
            for fd in self._all_pipes:
                self._loop.remove_reader(fd)
        for fd in self._all_pipes:
            os.close(fd)
        self._pipes, self._tried_pipes = [], []

    @property
    def _all_pipes(self) -> list[int]:
        return self._pipes + self._tried_pipes

    def _start(self) -> None:
        if self._pipes:
            return
        self._pipes = self._trace.open_pipes()
        if self._tried is not None:
            try:
                self._tried_pipes = self._tried.open_pipes()
            except OSError as e:
                log.warning("kernel relay: no tried regions of schemes: %s", e)
        for fd in self._all_pipes:
            self._loop.add_reader(fd, self._readable)

    def _readable(self) -> None:
        """A pipe has events: read them at once (a whole aggregation, usually, is
        published in this one wakeup); a kdamond found midway through writing its
        aggregation is not listened to for SETTLE_S, then read again."""
        self._drain()
        if self._midway():
            for fd in self._all_pipes:
                self._loop.remove_reader(fd)
            self._settling = self._loop.call_later(self._settle_s(), self._settled)

    def _midway(self) -> bool:
        return any(w.midway for w in self._watchers.values())

    def _settle_s(self) -> float:
        return min([SETTLE_S, *(w.aggr_s / 10 for w in self._watchers.values())])

    def _settled(self) -> None:
        self._drain()
        if self._midway():
            self._settling = self._loop.call_later(self._settle_s(), self._settled)
            return
        self._settling = None
        for fd in self._all_pipes:
            self._loop.add_reader(fd, self._readable)

    def _drain(self) -> None:
        """A CPU's buffer has events: read every CPU's (an aggregation's records may span
        CPUs when its kdamond moved), and hand them on in time order, the tried regions
        of schemes first. Those are read second: a kdamond may write between the two
        reads, and what it wrote before an aggregation read must be read too."""
        pages = [page for fd in self._pipes for page in self._trace.read_pipe(fd)]
        if self._tried is not None and self._tried_pipes:
            self._drain_tried(self._tried)
        if not pages:
            return
        try:
            events = self._trace.parse(pages)
        except Exception:  # pages the parser cannot read: say so, count them lost, go on
            log.exception("kernel relay: unreadable trace pages")
            for watcher in list(self._watchers.values()):
                watcher.lost()
            return
        self._dispatch(events, len(self._pipes) > 1)

    def _drain_tried(self, tried: TraceInstance) -> None:
        pages = [page for fd in self._tried_pipes for page in tried.read_pipe(fd)]
        if not pages:
            return
        try:
            events = tried.parse(pages)
        except Exception:
            log.exception("kernel relay: unreadable trace pages of tried regions")
            events = None
        if events is None or events.missed:
            if events is not None:
                log.warning("kernel relay: tried regions of schemes were lost (buffer full)")
            for watcher in list(self._watchers.values()):
                watcher.lost_tried()
            if events is None:
                return
        for pid, ts, records in _by_kdamond(events, len(self._tried_pipes) > 1):
            mine = self._watchers.get(pid)
            if mine is None:
                continue  # a kdamond damond does not watch (yet): its schemes are not ours
            try:
                mine.tried(ts, records)
            except Exception:
                log.exception("kernel relay: the monitor of kdamond thread %d failed", pid)
                mine.lost_tried()

    def _dispatch(self, events: Events, several_cpus: bool) -> None:
        if events.missed:
            log.warning("kernel relay: trace events were lost (the kernel's buffer was full)")
            self._orphans.clear()
            for watcher in list(self._watchers.values()):
                watcher.lost()
        for pid, ts, records in _by_kdamond(events, several_cpus):
            self._hand(pid, ts, records)

    def _hand(self, pid: int, ts: np.ndarray, records: Records) -> None:
        watcher = self._watchers.get(pid)
        if watcher is not None:
            try:
                watcher.records(ts, records)
            except Exception:  # one kdamond's failure is its own: the relay reads on
                log.exception("kernel relay: the monitor of kdamond thread %d failed", pid)
                watcher.lost()
            return
        self._orphans.setdefault(pid, []).append((ts, records))
        while sum(len(r) for kept in self._orphans.values() for _, r in kept) > ORPHAN_RECORDS:
            oldest = min(self._orphans, key=lambda p: int(self._orphans[p][0][0][0]))
            self._orphans[oldest].pop(0)
            if not self._orphans[oldest]:
                del self._orphans[oldest]


def _by_kdamond(events: Events, several_cpus: bool) -> list[tuple[int, np.ndarray, Records]]:
    """(kdamond thread pid, times, records) of each kdamond the events are of, each in time
    order (records of several CPUs' buffers are put back into it)."""
    ts, records = events.ts, events.records
    if not len(ts):
        return []
    if several_cpus and len(ts) > 1 and (ts[1:] < ts[:-1]).any():
        order = np.argsort(ts, kind="stable")
        ts, records = ts[order], records.take(order)
    pids = records.field("common_pid")
    kdamonds = set(pids.tolist())
    if len(kdamonds) == 1:  # the usual: one kdamond's burst
        return [(kdamonds.pop(), ts, records)]
    return [(pid, ts[pids == pid], records.take(pids == pid)) for pid in sorted(kdamonds)]
