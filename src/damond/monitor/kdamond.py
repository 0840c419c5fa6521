"""The monitoring loop of one kdamond: an asyncio task driving an Engine.

As the kernel's kdamond thread runs kdamond_fn, this kdamond's own worker
thread runs the engine's sample → aggregate cycle, paced by absolute
deadlines that it sleeps for itself (a futex wait: precise to a few tens of
µs, where the event loop's epoll sleeps in whole milliseconds). Kernel file
I/O (pagemap, smaps, clear_refs) blocks, so none of it runs on the event
loop; the loop only hears of each aggregation's Snapshot, so it stays free
to answer D-Bus whatever the sampling rate. When one sample takes longer
than sample_us, or would use more CPU than cpu_limit_pct allows, sampling
runs slower (aggregation is counted in samples, monitor/pacing.py): each
Snapshot carries the intervals it really had, and the log says when they
fall more than 20 % behind the asked ones.
"""

from __future__ import annotations

import asyncio
import collections
import dataclasses
import logging
import os
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TypeVar

from damond.monitor import ops
from damond.monitor.config import ContextConfig
from damond.monitor.engine import Engine
from damond.monitor.ops import AccessCheck, AddressSpace
from damond.monitor.ops.process import ProcessTable, TargetProcess
from damond.monitor.pacing import Effective, Pacer
from damond.monitor.pins import pin_targets
from damond.monitor.snapshot import Snapshot

log = logging.getLogger(__name__)

T = TypeVar("T")

MAX_UNPUBLISHED = 8
"""Snapshots the worker may get ahead of the event loop; older ones are dropped
(a seq gap) so that a busy loop costs snapshots, never memory."""


OpsWrapper = Callable[[str, AddressSpace, AccessCheck], tuple[AddressSpace, AccessCheck]]
"""(kdamond name, space, access check) -> the ops the engine uses instead (fault injection)."""


class KdamondTask:
    """One running kdamond: started on creation, stopped by stop() or by itself.

    Target pids are pinned when a configuration is accepted (here and in
    commit(), on the event loop), then handed to the worker with it.
    """

    def __init__(
        self,
        name: str,
        config: ContextConfig,
        on_snapshot: Callable[[Snapshot], None],
        on_stop: Callable[[str], None],
        registry: ops.Registry = ops.REGISTRY,
        wrap_ops: OpsWrapper | None = None,
    ) -> None:
        self.name = name
        self._registry = registry
        self._wrap_ops = wrap_ops
        self._on_snapshot = on_snapshot
        self._on_stop = on_stop
        self._processes = ProcessTable()
        """Shared by the engine's space and access check: one pin per pid. The worker's
        alone once it runs; new pins reach it with their config (_Handover)."""
        self._processes.adopt(pin_targets(config, set()))  # ConfigError: nothing started
        self._accepted_pids = {t.pid for t in config.targets}
        self._worker = ThreadPoolExecutor(max_workers=1, thread_name_prefix=f"kdamond.{name}")
        self._config = config
        """The latest config from on/commit; the worker hands it to the engine."""
        self._handover_lock = threading.Lock()
        self._handovers: list[dict[int, TargetProcess]] = []
        """Pins of commits the worker has not taken yet (oldest first)."""
        self._worker_done = False
        self._stopping = threading.Event()
        self._gate = threading.Lock()
        """Held until stopping: the worker sleeps by acquiring it with a timeout, one C
        call (Event.wait is a dozen lines of Python, each sample, right after a sleep)."""
        self._gate.acquire()
        self._halt_lock = threading.Lock()
        self._unpublished: collections.deque[Snapshot] = collections.deque(maxlen=MAX_UNPUBLISHED)
        self._publish_lock = threading.Lock()
        self._publish_scheduled = False
        self._loop = asyncio.get_running_loop()
        self._task = self._loop.create_task(self._run(), name=f"kdamond.{name}")

    def stop(self) -> None:
        """End the loop; the worker finishes its current sample and closes the engine."""
        self._halt()
        self._task.cancel()

    @property
    def pid(self) -> int:
        """Who samples: the daemon itself (its worker thread)."""
        return os.getpid()

    def _halt(self) -> None:
        """Stopping, from any thread: the worker's current sleep ends at once."""
        with self._halt_lock:
            if not self._stopping.is_set():
                self._stopping.set()
                self._gate.release()

    def commit(self, config: ContextConfig) -> None:
        """Hand a new config to the engine, which applies it at the next aggregation.

        New pids are pinned now (ConfigError, and nothing changes, when one
        cannot be); pids of the previous config keep their pins, as the kernel
        keeps a target's struct pid when its number did not change.
        """
        pins = pin_targets(config, self._accepted_pids)
        with self._handover_lock:
            late = self._worker_done
            if not late:
                self._handovers.append(pins)
                self._config = config  # the worker picks both up before its next sample
        if late:  # the worker has ended: nobody will take these
            for proc in pins.values():
                proc.close()
            return
        self._accepted_pids = {t.pid for t in config.targets}

    def done(self) -> bool:
        return self._task.done()

    def add_done_callback(self, callback: Callable[[], None]) -> None:
        """callback() once the loop has ended, however it ended."""
        self._task.add_done_callback(lambda _: callback())

    async def wait(self) -> None:
        """Wait until the loop has ended (after stop() or by itself)."""
        await asyncio.gather(self._task, return_exceptions=True)

    async def _call(self, fn: Callable[..., T], *args: Any) -> T:
        return await self._loop.run_in_executor(self._worker, fn, *args)

    async def _run(self) -> None:
        try:
            reason = await self._call(self._work)
        except asyncio.CancelledError:
            raise
        except Exception as e:  # a kernel file failed under us: stop this kdamond only
            log.error("kdamond %s failed: %s", self.name, e, extra={"KDAMOND": self.name})
            reason = f"monitoring failed: {e}"
        finally:
            self._halt()
            self._worker.shutdown(wait=False)
        self._on_stop(reason)

    def _work(self) -> str:
        """On the worker: build, start and run the engine; always release its files."""
        processes = self._processes
        engine: Engine | None = None
        try:
            handed = self._take_config(processes)
            engine = _engine_for(self.name, handed, processes, self._registry, self._wrap_ops)
            engine.start()
            return self._sample_loop(engine, handed, processes)
        finally:
            if engine is not None:
                engine.close()
            with self._handover_lock:
                self._worker_done = True
                untaken, self._handovers = self._handovers, []
            for pins in untaken:
                for proc in pins.values():
                    proc.close()
            processes.close()

    def _take_config(self, processes: ProcessTable) -> ContextConfig:
        """On the worker: the latest config, its commits' pins adopted into the table."""
        with self._handover_lock:
            config = self._config
            handovers, self._handovers = self._handovers, []
        for pins in handovers:
            processes.adopt(pins)
        return config

    def _sample_loop(self, engine: Engine, handed: ContextConfig, processes: ProcessTable) -> str:
        """prepare, sleep, check: as kdamond_fn.

        The sleep is sample_us, never shortened by the time the sample itself
        took: a page must have sample_us to be accessed before it is checked,
        or a slow sample (a large process, a slow machine) would see almost
        nothing. It is lengthened where the sample's CPU cost would exceed
        cpu_limit_pct (the Pacer). So a slow sample makes sampling slower,
        not blinder; each Snapshot says how slow. The worker sleeps (a futex
        wait, precise to tens of µs), not the event loop.
        """
        pacer = Pacer()
        pacer.start()
        engine.prepare()
        pacer.sampled()
        while not engine.done:
            if self._config is not handed:
                handed = self._take_config(processes)
                engine.commit(handed)
            pause = engine.activation_wait_us()
            if pause:  # the watermarks have every scheme off: no sampling, as the kernel
                paused = time.monotonic_ns()
                if self._gate.acquire(timeout=min(pause / 1e6, threading.TIMEOUT_MAX)):
                    self._gate.release()
                    return "stopped"
                pacer.paused(time.monotonic_ns() - paused)
                engine.prepare()  # what was marked before the pause is stale
                continue
            applied = engine.config
            if self._gate.acquire(timeout=pacer.sleep_s(applied.attrs)):
                self._gate.release()
                return "stopped"
            snapshot = engine.check()
            if snapshot is not None:
                self._aggregated(pacer, snapshot, applied)
                if engine.config is not applied:  # a commit took effect
                    processes.retain(t.pid for t in engine.config.targets)
            if not engine.done:
                engine.prepare()
            pacer.sampled()
        return "every target has exited"

    def _aggregated(self, pacer: Pacer, snapshot: Snapshot, config: ContextConfig) -> None:
        """Stamp the snapshot with the intervals it really had, say so when they change
        from keeping up to falling behind (or back), and publish it."""
        was_behind = pacer.behind
        found = pacer.aggregated(snapshot.max_nr_accesses, config.attrs)
        if pacer.behind != was_behind:
            self._say_pace(found, config, pacer.behind)
        self._publish(
            dataclasses.replace(
                snapshot, effective_sample_us=found.sample_us, effective_aggr_us=found.aggr_us
            )
        )

    def _say_pace(self, found: Effective, config: ContextConfig, behind: bool) -> None:
        attrs = config.attrs
        pace = (
            f"a sample every {found.sample_us / 1000:.1f} ms (asked "
            f"{attrs.sample_us / 1000:g} ms), an aggregation every {found.aggr_us / 1000:.0f} ms "
            f"(asked {attrs.aggr_us / 1000:g} ms)"
        )
        extra = {"KDAMOND": self.name, "ACCESS_CHECK": config.access_check}
        if not behind:
            log.info("kdamond %s keeps up again: %s", self.name, pace, extra=extra)
            return
        why = f"a {config.access_check} sample costs {found.cpu_us_per_sample / 1000:.1f} ms of CPU"
        if found.stretched:
            why += (
                f", and cpu_limit_pct {attrs.cpu_limit_pct} stretches the interval to keep "
                "sampling under that share of one CPU"
            )
        log.warning("kdamond %s falls behind: %s: %s", self.name, pace, why, extra=extra)

    def _publish(self, snapshot: Snapshot) -> None:
        """From the worker: queue the snapshot for the event loop (bounded)."""
        with self._publish_lock:
            self._unpublished.append(snapshot)  # full: the oldest goes, a seq gap
            if self._publish_scheduled:
                return
            self._publish_scheduled = True
        try:
            self._loop.call_soon_threadsafe(self._deliver)
        except RuntimeError:  # the event loop is closed: the daemon is exiting
            self._halt()

    def _deliver(self) -> None:
        """On the event loop: hand every queued snapshot on, oldest first."""
        with self._publish_lock:
            snapshots = list(self._unpublished)
            self._unpublished.clear()
            self._publish_scheduled = False
        for snapshot in snapshots:
            if self._stopping.is_set():
                return
            self._on_snapshot(snapshot)


def _engine_for(
    name: str,
    config: ContextConfig,
    processes: ProcessTable,
    registry: ops.Registry,
    wrap_ops: OpsWrapper | None,
) -> Engine:
    """An engine whose space, access check and actions pin the same target processes."""
    space = config.operations.space(processes)
    access = registry.make_access(config.access_check, processes)
    if wrap_ops is not None:
        space, access = wrap_ops(name, space, access)
    return Engine(config, space, access, actions=registry.make_actions(processes))
