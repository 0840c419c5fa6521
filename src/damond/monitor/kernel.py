"""The kernel backend: contexts run by the kernel's own DAMON, behind damond's tree.

``KernelDamon`` is the backend: the claim on the kernel's admin tree
(ops/damon_claim.py), the relay of its results (kernel_relay.py), and the
answers the backend table needs (may damond use it here, for which
operations sets; start a context). ``KernelMonitor`` is one running context:
a kdamond directory of damond's pool, written from the frozen ContextConfig
and turned on. The kernel's aggregations come back through the relay and
leave as the same Snapshots damond's own engine publishes: seq counts
aggregations from 1, the timestamp is the end of the aggregation in
CLOCK_REALTIME, max_nr_accesses is aggr_us / sample_us, and each region's
nr_accesses and age are the kernel's own.

A context's DAMOS schemes are written into the kdamond's schemes/ files and
the kernel does everything; what they did comes back in the snapshots as
damond's own engine reports it (SchemeResult): the stats and the effective
size quota read from the kernel's files at most once a second, off the event
loop, and the tried regions from the damos_before_apply trace event
(kernel_schemes.py). What the kernel can do of a scheme (its actions and
filters) is asked of its sysfs when damond claims the tree, and of the
operations tables (monitor/ops).
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import functools
import logging
import math
import os
import sys
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor

import numpy as np

from damond.monitor.config import ConfigError, ContextConfig, FilterConfig
from damond.monitor.kernel_relay import Aggregation, Aggregations, Relay
from damond.monitor.kernel_schemes import STATS_INTERVAL_S, KernelSchemes
from damond.monitor.ops.base import KernelRefused, Operations
from damond.monitor.ops.damon_claim import POOL_SIZE, RUN_DIR, Claim
from damond.monitor.ops.damon_sysfs import ADMIN, AdminFiles, KdamondDir, WriteFault
from damond.monitor.ops.damon_trace import (
    TRACEFS,
    TRIED_BUFFER_KB,
    TRIED_EVENT,
    TRIED_FIELDS,
    TRIED_INSTANCE,
    Records,
    TraceInstance,
)
from damond.monitor.ops.damon_trace import probe as probe_tracefs
from damond.monitor.ops.process import TargetProcess
from damond.monitor.pins import pin_targets
from damond.monitor.snapshot import Snapshot, TargetSnapshot

log = logging.getLogger(__name__)

OFF = "off"
"""The admin root that turns the kernel backend off (``--kernel-damon-admin off``)."""


class KernelDamon:
    """The kernel's DAMON as a backend of this daemon: claimed pool, relay, answers."""

    def __init__(
        self,
        admin: str = ADMIN,
        tracefs: str = TRACEFS,
        run_dir: str = RUN_DIR,
        pool_size: int = POOL_SIZE,
        fault: WriteFault | None = None,
    ) -> None:
        self.turned_off = admin == OFF
        self.files = AdminFiles("" if self.turned_off else admin, fault)
        self.trace = TraceInstance(tracefs)
        self.tried = TraceInstance(
            tracefs, TRIED_INSTANCE, TRIED_EVENT, TRIED_FIELDS, TRIED_BUFFER_KB
        )
        self.claim = Claim(self.files, self.trace, run_dir, pool_size, self.tried)
        self.commands = threading.Lock()
        """Held around damond's `state` commands to running kdamonds (commit, the stats
        updates): the kernel carries out one at a time for the whole tree and answers
        EBUSY to a second, so damond's own never race each other."""
        self._relay: Relay | None = None

    @property
    def admin(self) -> str:
        return OFF if self.turned_off else self.files.root

    def why_unavailable(self) -> str:
        """'' when damond may run contexts on the kernel's DAMON here, else why not.
        Writes nothing (--help and avail_backends ask it)."""
        if self.turned_off:
            return "the kernel backend is turned off (--kernel-damon-admin off)"
        if self.claim.claimed:
            return self.claim.check()
        return self.claim.why_not() or probe_tracefs(self.trace.tracefs)

    def owns_host_damon(self) -> bool:
        """damond holds the machine's own admin tree (not a test's stand-in)."""
        return self.claim.claimed and self.files.root == ADMIN

    def claim_now(self) -> str:
        """Claim the admin tree if damond may ('' when it holds it), else why not."""
        reason = self.why_unavailable()
        if reason or self.claim.claimed:
            return reason
        return self.claim.acquire()

    def operations(self) -> list[str]:
        """The operations sets the kernel's DAMON offers: its avail_operations, which only
        a kdamond directory shows, so asking claims the tree if damond may."""
        self.claim_now()
        return list(self.claim.avail_operations) if self.claim.claimed else []

    def ready(self, operations: str) -> str:
        """'' when a context of this operations set can start on the kernel now, else why
        not. Claims the tree if it has become free since start-up."""
        reason = self.claim_now()
        if reason:
            return reason
        if operations not in self.claim.avail_operations:
            return (
                f"the kernel's DAMON has no {operations} (its avail_operations: "
                f"{' '.join(self.claim.avail_operations) or 'none'})"
            )
        if self.claim.busy >= self.claim.pool_size:
            return f"all {self.claim.pool_size} kdamonds of damond's kernel DAMON pool are on"
        return ""

    # -- what its DAMOS can do (the backend table's why_action/filter_unavailable) --------

    def why_action_unavailable(self, action: str, operations: Operations) -> str:
        """'' when the kernel does this DAMOS action for a context of that operations set:
        its sysfs takes the action (probed at the claim) and its operations do it."""
        reason = self._why_no_damos()
        if reason:
            return reason
        if action not in self.claim.damos.actions:
            return f"{action}: this kernel's DAMON has no such action (its sysfs refuses it)"
        if action not in operations.kernel_actions:
            return (
                f"{action}: the kernel's {operations.name} operations do not do it "
                f"(they do {', '.join(operations.kernel_actions)})"
            )
        return ""

    def why_filter_unavailable(self, f: FilterConfig, operations: Operations) -> str:
        """'' when the kernel honours this DAMOS filter for that operations set: its sysfs
        takes the type (and an allow filter, if allow is set), and the operations (or the
        core) check it."""
        reason = self._why_no_damos()
        if reason:
            return reason
        if f.type not in self.claim.damos.filter_types:
            return f"{f.type} filter: this kernel's DAMON has no such filter (its sysfs refuses it)"
        if f.type not in operations.kernel_filter_types:
            return (
                f"{f.type} filter: the kernel's {operations.name} operations ignore it (they "
                f"honour {', '.join(operations.kernel_filter_types)} filters)"
            )
        if f.allow and not self.claim.damos.filter_allow:
            return (
                f"{f.type} filter with allow: this kernel's DAMOS filters have no allow "
                "file: a filter can only reject the memory it matches (allow false)"
            )
        return ""

    def _why_no_damos(self) -> str:
        reason = self.claim_now()
        if reason:
            return f"the kernel backend is unavailable: {reason}"
        if self.claim.damos.reason:
            return f"the kernel backend has no DAMOS schemes: {self.claim.damos.reason}"
        return ""

    def start(
        self,
        name: str,
        config: ContextConfig,
        on_snapshot: Callable[[Snapshot], None],
        on_stop: Callable[[str], None],
    ) -> KernelMonitor:
        return KernelMonitor(self, name, config, on_snapshot, on_stop)

    def relay(self) -> Relay:
        """The reader of damond's trace instance, on the running event loop."""
        if self._relay is None:
            self._relay = Relay(self.trace, asyncio.get_running_loop(), self.tried)
        return self._relay

    def close(self) -> None:
        """Stop relaying and give the admin tree back (every kdamond of the pool off)."""
        if self._relay is not None:
            self._relay.close()
            self._relay = None
        self.claim.release()


WIRE_FIELDS = (("start", 8), ("end", 8), ("nr_accesses", 4), ("age", 4))
"""A region of a Snapshot on the wire, (ttuu): the damon_aggregated record has these
fields side by side, so its words are the signal's bytes as they are (on a little-endian
machine, as the wire is)."""


def _target_snapshot(index: int, pid: int, regions: Records) -> TargetSnapshot:
    """One target's regions in a Snapshot: the kernel's own values (views of its records)."""
    return TargetSnapshot(
        index=index,
        pid=pid,
        starts=regions.field("start"),
        ends=regions.field("end"),
        nr_accesses=regions.field("nr_accesses"),
        ages=regions.field("age"),
        wire=regions.span(WIRE_FIELDS) if sys.byteorder == "little" else None,
    )


def _close(pins: dict[int, TargetProcess]) -> None:
    for proc in pins.values():
        proc.close()


def _lost_before_taken(config: ContextConfig, pins: dict[int, TargetProcess]) -> int | None:
    """Once the kernel has taken config's pids: the index of a target whose newly pinned
    process has exited since (the kernel may have resolved its number to another's)."""
    for target in config.targets:
        proc = pins.get(target.pid)
        if proc is not None and not proc.alive():
            return target.index
    return None


def _pidfd(pid: int) -> int | None:
    """A pidfd of pid; None when it has already exited."""
    try:
        return os.pidfd_open(pid)
    except ProcessLookupError:
        return None


class KernelMonitor:
    """One context on a kdamond of damond's pool; on from creation, off by stop() or itself.

    Everything happens on the event loop (the relay calls it there), except a
    commit: the kernel's `commit` write blocks until the kdamond has taken the
    files, up to an aggregation and more, so it runs on a worker thread.

    The kernel resolves target pids when it takes `on` (at once) or a commit
    (at its next aggregation), but damond accepts them before: so new pids are
    pinned at acceptance (pins.py), and once the kernel has taken them each
    pinned process must still live; else the number the kernel resolved may
    have been another process's, and the kdamond is refused (`on`) or ended
    (commit) rather than monitor, or act on, a stranger. Target exits are
    watched through the same pins.
    """

    def __init__(
        self,
        kernel: KernelDamon,
        name: str,
        config: ContextConfig,
        on_snapshot: Callable[[Snapshot], None],
        on_stop: Callable[[str], None],
    ) -> None:
        self.name = name
        self._kernel = kernel
        self._on_snapshot = on_snapshot
        self._on_stop = on_stop
        self._loop = asyncio.get_running_loop()
        self._stopped = False
        self._worker = ThreadPoolExecutor(max_workers=1, thread_name_prefix=f"kdamond.{name}")
        turned_on = time.clock_gettime_ns(time.CLOCK_MONOTONIC)  # the trace clock
        pins = pin_targets(config, set())  # ConfigError: nothing taken
        try:
            self._kdamond = self._turn_on(config)
        except KernelRefused:
            _close(pins)
            raise
        try:
            self.pid = self._kdamond.pid()
            index = _lost_before_taken(config, pins)
            if index is not None:
                raise ConfigError(
                    f"targets/{index}", "exited while the kernel's DAMON took its pid"
                )
        except (KernelRefused, ConfigError):
            self._release()
            _close(pins)
            raise
        self._epochs: list[tuple[int, ContextConfig]] = [(0, config)]
        """(trace clock ns from which it applies, config): commits, in order."""
        self._committed = False
        self._aggregations = Aggregations(len(config.targets))
        self._schemes = KernelSchemes(tracks_tried=kernel.tried.format is not None)
        self._reading_stats = False
        self._stats_read_at = -math.inf
        self._stats_problem = ""
        """The last refusal of a stats read (on the worker), logged once."""
        self._seq = 0
        self._last_ts = 0
        self._lost = False
        self._gone: set[int] = set()
        """Pids of targets whose process has exited."""
        self._pins: dict[int, TargetProcess] = {}
        """Pid -> the process pinned when a config naming it was accepted."""
        self._accepted_pids = {t.pid for t in config.targets}
        relay = kernel.relay()
        relay.watch(self.pid, self, since=turned_on)
        self._kthread = _pidfd(self.pid)
        if self._kthread is None:
            self._loop.call_soon(self._end, self._why_stopped())
        else:
            relay.add_fd(self._kthread, lambda: self._end(self._why_stopped()))
        self._watch_targets(config, pins)

    def _turn_on(self, config: ContextConfig) -> KdamondDir:
        """A kdamond of the pool, written and on; on any refusal it is left off and given back."""
        kdamond = self._kernel.claim.take()
        if kdamond is None:
            raise KernelRefused("every kdamond of damond's kernel DAMON pool is on", errno.EBUSY)
        try:
            kdamond.write(config)
            kdamond.on()
        except KernelRefused:
            with contextlib.suppress(KernelRefused):
                kdamond.off()
            self._kernel.claim.give_back(kdamond)
            raise
        log.info(
            "%s runs on the kernel's %s/%s",
            self.name,
            self._kernel.files.root,
            kdamond.path,
            extra={"KDAMOND": self.name},
        )
        return kdamond

    # -- the Monitor interface --------------------------------------------------------------

    def stop(self) -> None:
        """Turn the kernel's kdamond off and give its directory back (idempotent)."""
        if self._stopped:
            return
        self._stopped = True
        relay = self._kernel.relay()
        relay.unwatch(self.pid)
        if self._kthread is not None:
            relay.remove_fd(self._kthread)
            os.close(self._kthread)
        for proc in self._pins.values():
            relay.remove_fd(proc.pidfd)
        _close(self._pins)
        self._pins = {}
        self._release()

    def commit(self, config: ContextConfig) -> None:
        """Pin the new pids now (ConfigError, and nothing changes, when one cannot be),
        then stage the new files and commit them on the worker: the kernel takes them at
        its next aggregation, and the write waits for that (in 100 ms steps)."""
        if self._stopped:
            return
        pins = pin_targets(config, self._accepted_pids)
        self._accepted_pids = {t.pid for t in config.targets}
        self._worker.submit(self._commit, config, pins)

    # -- internals --------------------------------------------------------------------------

    def _release(self) -> None:
        try:
            self._kdamond.off()
        except KernelRefused as e:
            log.error("%s: %s; its kdamond stays out of the pool", self.name, e)
            self._worker.shutdown(wait=False)
            return
        kdamond, claim, loop = self._kdamond, self._kernel.claim, self._loop

        def give_back() -> None:
            with contextlib.suppress(RuntimeError):  # the loop is closed: the claim goes anyway
                loop.call_soon_threadsafe(claim.give_back, kdamond)

        self._worker.submit(give_back)  # after a commit still in flight
        self._worker.shutdown(wait=False)

    def _commit(self, config: ContextConfig, pins: dict[int, TargetProcess]) -> None:
        """On the worker."""
        if self._stopped:
            _close(pins)
            return
        try:
            self._kdamond.write(config)
            with self._kernel.commands:
                # from now on, an aggregation the kernel reports ran with config (list
                # appends and reads are atomic: the loop reads _epochs without a lock)
                self._epochs.append((time.clock_gettime_ns(time.CLOCK_MONOTONIC), config))
                self._committed = True
                self._kdamond.commit()
        except KernelRefused as e:
            _close(pins)
            self._from_worker(self._end, f"the kernel refused the commit: {e}")
            return
        index = _lost_before_taken(config, pins)
        if index is not None:
            _close(pins)
            self._from_worker(
                self._end,
                f"target {index} exited between the commit and the kernel taking it: the "
                "pid the kernel resolved may be another process's",
            )
            return
        self._from_worker(self._watch_targets, config, pins)

    def _from_worker(self, fn: Callable[..., None], *args: object) -> None:
        with contextlib.suppress(RuntimeError):  # the loop is closed: the daemon is exiting
            self._loop.call_soon_threadsafe(fn, *args)

    def _watch_targets(self, config: ContextConfig, pins: dict[int, TargetProcess]) -> None:
        """Wait for each target process's exit through its pin; after a commit, forget
        the pins of pids it dropped and watch those it pinned."""
        if self._stopped:
            _close(pins)
            return
        relay = self._kernel.relay()
        kept = {t.pid for t in config.targets}
        for pid in [pid for pid in self._pins if pid not in kept]:
            proc = self._pins.pop(pid)
            relay.remove_fd(proc.pidfd)
            proc.close()
            self._gone.discard(pid)
        for pid, proc in pins.items():
            self._pins[pid] = proc
            self._gone.discard(pid)
            if proc.alive():
                relay.add_fd(proc.pidfd, functools.partial(self._target_exited, pid))
            else:
                self._target_exited(pid)

    def _target_exited(self, pid: int) -> None:
        """A target's process exited; once all have, this kdamond stops."""
        self._gone.add(pid)
        config = self._epochs[-1][1]
        if {t.pid for t in config.targets} <= self._gone:
            self._loop.call_soon(self._end, "every target has exited")

    def _why_stopped(self) -> str:
        if self._committed:
            return (
                "the kernel's kdamond stopped by itself (the kernel stops a kdamond whose "
                "commit it refuses)"
            )
        return "the kernel's kdamond stopped by itself"

    def _end(self, reason: str) -> None:
        if self._stopped:
            return
        self.stop()
        log.info("%s: %s", self.name, reason, extra={"KDAMOND": self.name})
        self._on_stop(reason)

    # -- the relay's Watcher interface ------------------------------------------------------

    def records(self, ts: np.ndarray, records: Records) -> None:
        for aggregation in self._aggregations.add(ts, records):
            self._publish(aggregation)

    def lost(self) -> None:
        self._aggregations.lose()
        self._lost = True

    def tried(self, ts: np.ndarray, records: Records) -> None:
        self._schemes.tried(ts, records)

    def lost_tried(self) -> None:
        self._schemes.lost()

    @property
    def midway(self) -> bool:
        return self._aggregations.midway

    @property
    def aggr_s(self) -> float:
        return min(config.attrs.aggr_us for _, config in self._epochs) / 1e6

    def _config_at(self, ts: int) -> ContextConfig:
        """The config an aggregation ending at ts ran with: the kernel applies a commit at
        the first aggregation after it was asked, just before it reports that one."""
        while len(self._epochs) > 1 and self._epochs[1][0] <= ts:
            self._epochs.pop(0)
        return self._epochs[0][1]

    def _publish(self, aggregation: Aggregation) -> None:
        if self._stopped:
            return
        config = self._config_at(aggregation.ts)
        self._seq += 1
        # the interval the kernel really had: the time since its last aggregation
        aggr_us = (aggregation.ts - self._last_ts) // 1000 if self._last_ts else 0
        if self._lost and self._last_ts:
            # say how many aggregations went with the lost records: a seq gap
            interval = config.attrs.aggr_us * 1000
            self._seq += max(0, round((aggregation.ts - self._last_ts) / interval) - 1)
            aggr_us = 0  # spans lost aggregations: not one interval
        self._lost = False
        self._last_ts = aggregation.ts
        pids = {t.index: t.pid for t in config.targets if t.pid not in self._gone}
        targets = tuple(
            _target_snapshot(index, pids[index], regions)
            for index, regions in aggregation.targets
            if index in pids
        )
        if not targets:
            return
        offset = time.clock_gettime_ns(time.CLOCK_REALTIME) - time.clock_gettime_ns(
            time.CLOCK_MONOTONIC
        )
        self._on_snapshot(
            Snapshot(
                self._seq,
                (aggregation.ts + offset) // 1000,
                config.attrs.samples_per_aggregation,
                targets,
                self._schemes.results(aggregation.ts, config),
                effective_sample_us=aggr_us // config.attrs.samples_per_aggregation,
                effective_aggr_us=aggr_us,
            )
        )
        self._read_stats(config)

    # -- scheme stats, read on the worker ---------------------------------------------------

    def _read_stats(self, config: ContextConfig) -> None:
        """Have the worker read the schemes' stats (and effective quotas) from the kernel,
        if STATS_INTERVAL_S has passed since the last time and none is under way."""
        now = time.monotonic()
        recently = now - self._stats_read_at < STATS_INTERVAL_S
        if not config.schemes or self._reading_stats or recently:
            return
        self._reading_stats, self._stats_read_at = True, now
        quotas = any(s.quotas.limited for s in config.schemes)
        self._worker.submit(self._stats_from_kernel, len(config.schemes), quotas)

    def _stats_from_kernel(self, nr_schemes: int, quotas: bool) -> None:
        """On the worker: the update commands (each waits for the kdamond's next sample)
        and the files. Skipped while another command of damond's is under way (a commit
        waits for an aggregation): the next snapshot asks again."""
        stats: Sequence[tuple[int, ...]] | None = None
        effective: Sequence[int] = [0] * nr_schemes
        if not self._stopped and self._kernel.commands.acquire(blocking=False):
            try:
                stats = self._kdamond.scheme_stats(nr_schemes)
                if quotas:
                    effective = self._kdamond.effective_bytes(nr_schemes)
            except KernelRefused as e:
                if not self._stopped and str(e) != self._stats_problem:  # said once
                    log.warning("%s: reading scheme stats: %s", self.name, e)
                self._stats_problem, stats = str(e), None
            finally:
                self._kernel.commands.release()
        self._from_worker(self._took_stats, stats, effective)

    def _took_stats(
        self, stats: Sequence[tuple[int, ...]] | None, effective: Sequence[int]
    ) -> None:
        self._reading_stats = False
        if stats is not None and not self._stopped:
            self._schemes.took_stats(stats, effective)
