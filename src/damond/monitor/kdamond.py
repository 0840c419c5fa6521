"""The monitoring loop of one kdamond: an asyncio task driving an Engine.

As the kernel's kdamond thread runs kdamond_fn, this kdamond's own worker
thread runs the engine's sample → aggregate cycle, paced by absolute
deadlines that it sleeps for itself (a futex wait: precise to a few tens of
µs, where the event loop's epoll sleeps in whole milliseconds). Kernel file
I/O (pagemap, smaps, clear_refs) blocks, so none of it runs on the event
loop; the loop only hears of each aggregation's Snapshot, so it stays free
to answer D-Bus whatever the sampling rate. When one sample takes longer
than sample_us, sampling simply runs slower (aggregation is counted in
samples) and the snapshot timestamps show it.
"""

from __future__ import annotations

import asyncio
import collections
import errno
import logging
import os
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, TypeVar

from damond.monitor import ops
from damond.monitor.config import ContextConfig
from damond.monitor.engine import Engine
from damond.monitor.ops.process import ProcessTable
from damond.monitor.snapshot import Snapshot

log = logging.getLogger(__name__)

T = TypeVar("T")

MAX_UNPUBLISHED = 8
"""Snapshots the worker may get ahead of the event loop; older ones are dropped
(a seq gap) so that a busy loop costs snapshots, never memory."""


class KdamondTask:
    """One running kdamond: started on creation, stopped by stop() or by itself."""

    def __init__(
        self,
        name: str,
        config: ContextConfig,
        on_snapshot: Callable[[Snapshot], None],
        on_stop: Callable[[str], None],
    ) -> None:
        self.name = name
        self._on_snapshot = on_snapshot
        self._on_stop = on_stop
        self._worker = ThreadPoolExecutor(max_workers=1, thread_name_prefix=f"kdamond.{name}")
        self._config = config
        """The latest config from on/commit; the worker hands it to the engine."""
        self._stopping = threading.Event()
        self._unpublished: collections.deque[Snapshot] = collections.deque(maxlen=MAX_UNPUBLISHED)
        self._publish_lock = threading.Lock()
        self._publish_scheduled = False
        self.snapshots_dropped = 0
        self._loop = asyncio.get_running_loop()
        self._task = self._loop.create_task(self._run(), name=f"kdamond.{name}")

    def stop(self) -> None:
        """End the loop; the worker finishes its current sample and closes the engine."""
        self._stopping.set()
        self._task.cancel()

    def commit(self, config: ContextConfig) -> None:
        """Hand a new config to the engine, which applies it at the next aggregation."""
        self._config = config  # the worker picks it up before its next sample

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
            self._stopping.set()
            self._worker.shutdown(wait=False)
        self._on_stop(reason)

    def _work(self) -> str:
        """On the worker: build, start and run the engine; always release its files."""
        processes = ProcessTable()  # shared by space and access check: one pin per pid
        engine: Engine | None = None
        try:
            engine = _engine_for(self.name, self._config, processes)
            handed = self._config
            engine.start()
            return self._sample_loop(engine, handed, processes)
        finally:
            if engine is not None:
                engine.close()
            processes.close()

    def _sample_loop(self, engine: Engine, handed: ContextConfig, processes: ProcessTable) -> str:
        """prepare, sleep sample_us, check: as kdamond_fn.

        The sleep is always the whole interval, never shortened by the time
        the sample itself took: a page must have sample_us to be accessed
        before it is checked, or a slow sample (a large process, a slow
        machine) would see almost nothing. So a slow sample makes sampling
        slower, not blinder; the snapshot timestamps show it. The worker
        sleeps (a futex wait, precise to tens of µs), not the event loop.
        """
        engine.prepare()
        while not engine.done:
            config = self._config
            if config is not handed:
                engine.commit(config)
                handed = config
            if self._stopping.wait(engine.config.attrs.sample_us / 1e6):
                return "stopped"
            applied = engine.config
            snapshot = engine.check()
            if snapshot is not None:
                self._publish(snapshot)
                if engine.config is not applied:  # a commit took effect
                    processes.retain(t.pid for t in engine.config.targets)
            if not engine.done:
                engine.prepare()
        return "every target has exited"

    def _publish(self, snapshot: Snapshot) -> None:
        """From the worker: queue the snapshot for the event loop (bounded)."""
        with self._publish_lock:
            if len(self._unpublished) == self._unpublished.maxlen:
                self.snapshots_dropped += 1
            self._unpublished.append(snapshot)
            if self._publish_scheduled:
                return
            self._publish_scheduled = True
        try:
            self._loop.call_soon_threadsafe(self._deliver)
        except RuntimeError:  # the event loop is closed: the daemon is exiting
            self._stopping.set()

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


def _engine_for(name: str, config: ContextConfig, processes: ProcessTable) -> Engine:
    """An engine whose space and access check pin the same target processes."""
    space: Any = ops.make_space(config.operations, processes)
    access: Any = ops.make_access(config.access_check, processes)
    for fault in faults_for(name):
        if fault.op in FaultyOps.SPACE_OPS:
            space = FaultyOps(space, fault)
        else:
            access = FaultyOps(access, fault)
    return Engine(config, space, access)


def start_kdamond(
    name: str,
    config: ContextConfig,
    on_snapshot: Callable[[Snapshot], None],
    on_stop: Callable[[str], None],
) -> KdamondTask:
    """The monitor factory hierarchy.Tree uses (needs a running event loop)."""
    return KdamondTask(name, config, on_snapshot, on_stop)


# --- fault injection (tests only; off unless DAMOND_FAULT_OPS is set) ---------------------

FAULT_OPS_ENV = "DAMOND_FAULT_OPS"
"""``KDAMOND:OP:N:ERRNO[,…]``: in the kdamond named KDAMOND (its index, e.g. ``1``),
the Nth call (from 1) of the ops method OP and every later one raises
OSError(ERRNO) as if the kernel file had failed. OP is one of ``prepare``,
``check`` (the access check), ``initial_ranges``, ``update_ranges`` (the
address space); ERRNO a name such as EIO, ENOENT or EPERM. Documented in
docs/reliability.md; never set in production."""


@dataclass(frozen=True)
class Fault:
    kdamond: str
    op: str
    nth: int
    errno: int

    @classmethod
    def parse(cls, spec: str) -> Fault:
        kdamond, op, nth, name = spec.strip().split(":")
        if op not in FaultyOps.SPACE_OPS + FaultyOps.ACCESS_OPS:
            raise ValueError(f"{FAULT_OPS_ENV}: unknown ops method {op!r}")
        code = getattr(errno, name, None)
        if not isinstance(code, int) or int(nth) < 1:
            raise ValueError(f"{FAULT_OPS_ENV}: bad fault {spec!r}")
        return cls(kdamond, op, int(nth), code)


def faults_for(name: str) -> list[Fault]:
    text = os.environ.get(FAULT_OPS_ENV, "")
    faults = [Fault.parse(spec) for spec in text.split(",") if spec.strip()]
    return [f for f in faults if f.kdamond == name]


class FaultyOps:
    """An AddressSpace or AccessCheck whose method `fault.op` fails from its Nth call."""

    SPACE_OPS = ("initial_ranges", "update_ranges")
    ACCESS_OPS = ("prepare", "check")

    def __init__(self, inner: Any, fault: Fault) -> None:
        self._inner = inner
        self._fault = fault
        self.calls = 0
        self.name = inner.name

    def __getattr__(self, attr: str) -> Any:
        value = getattr(self._inner, attr)
        if attr != self._fault.op:
            return value

        def faulty(*args: Any) -> Any:
            self.calls += 1
            if self.calls >= self._fault.nth:
                code = self._fault.errno
                log.warning(
                    "fault injection: %s call %d raises %s",
                    attr,
                    self.calls,
                    errno.errorcode.get(code, code),
                )
                raise OSError(code, os.strerror(code), f"(injected fault in {attr})")
            return value(*args)

        return faulty
