"""The monitoring loop of one kdamond: an asyncio task driving an Engine.

As the kernel's kdamond thread runs kdamond_fn, this task runs the engine's
sample → aggregate cycle. Kernel file I/O (pagemap, smaps, clear_refs) blocks,
so every engine call runs on this kdamond's own worker thread and the event
loop stays free to answer D-Bus. Sampling is paced by absolute deadlines; when
one sample takes longer than sample_us, sampling simply runs slower
(aggregation is counted in samples) and the snapshot timestamps show it.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TypeVar

from damond.monitor import ops
from damond.monitor.config import ContextConfig
from damond.monitor.engine import Engine
from damond.monitor.ops.process import ProcessTable
from damond.monitor.snapshot import Snapshot

log = logging.getLogger(__name__)

T = TypeVar("T")

FINE_SLEEP_S = 0.002
"""The last part of each sample interval is slept on the worker thread, precisely."""


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
        self._engine: Engine | None = None
        self._config = config
        self._task = asyncio.get_running_loop().create_task(self._run(), name=f"kdamond.{name}")

    def stop(self) -> None:
        """Cancel the loop; the worker finishes its current call and closes the engine."""
        self._task.cancel()

    def commit(self, config: ContextConfig) -> None:
        """Hand a new config to the engine, which applies it at the next aggregation."""
        self._config = config
        engine = self._engine
        if engine is not None:
            self._worker.submit(engine.commit, config)

    async def wait(self) -> None:
        """Wait until the loop has ended (after stop() or by itself)."""
        await asyncio.gather(self._task, return_exceptions=True)

    async def _call(self, fn: Callable[..., T], *args: Any) -> T:
        return await asyncio.get_running_loop().run_in_executor(self._worker, fn, *args)

    async def _run(self) -> None:
        reason = "stopped"
        engine: Engine | None = None
        processes = ProcessTable()  # shared by space and access check: one pin per pid
        try:
            engine = await self._call(_engine_for, self._config, processes)
            self._engine = engine
            if self._config is not engine.config:
                engine.commit(self._config)  # a commit arrived while the engine was built
            await self._call(engine.start)
            reason = await self._sample_loop(engine)
        except asyncio.CancelledError:
            raise
        except Exception as e:  # a kernel file failed under us: stop this kdamond only
            log.error("kdamond %s failed: %s", self.name, e, extra={"KDAMOND": self.name})
            reason = f"monitoring failed: {e}"
        finally:
            if engine is not None:
                self._worker.submit(engine.close)
            self._worker.submit(processes.close)
            self._worker.shutdown(wait=False)
        self._on_stop(reason)

    async def _sample_loop(self, engine: Engine) -> str:
        """prepare, sleep, check: as kdamond_fn, paced by absolute deadlines.

        The event loop sleeps in whole milliseconds (epoll), which would stretch
        every 1 ms sample by up to a millisecond; so the loop sleeps until just
        before the deadline and the worker thread sleeps the precise rest, then
        checks and prepares the next sample in the same hop.
        """
        await self._call(engine.prepare)
        deadline = time.monotonic()
        while not engine.done:
            deadline += engine.config.attrs.sample_us / 1e6
            coarse = deadline - time.monotonic() - FINE_SLEEP_S
            if coarse > 0:
                await asyncio.sleep(coarse)
            elif coarse + FINE_SLEEP_S < 0:
                deadline = time.monotonic()  # late: pace from now, never catch up in a burst
            snapshot = await self._call(_sample, engine, deadline)
            if snapshot is not None:
                self._on_snapshot(snapshot)
        return "every target has exited"


def _sample(engine: Engine, deadline: float) -> Snapshot | None:
    """On the worker: wait for the deadline, check this sample, prepare the next."""
    delay = deadline - time.monotonic()
    if delay > 0:
        time.sleep(delay)
    snapshot = engine.check()
    if not engine.done:
        engine.prepare()
    return snapshot


def _engine_for(config: ContextConfig, processes: ProcessTable) -> Engine:
    """An engine whose space and access check pin the same target processes."""
    return Engine(
        config,
        ops.make_space(config.operations, processes),
        ops.make_access(config.access_check, processes),
    )


def start_kdamond(
    name: str,
    config: ContextConfig,
    on_snapshot: Callable[[Snapshot], None],
    on_stop: Callable[[str], None],
) -> KdamondTask:
    """The monitor factory hierarchy.Tree uses (needs a running event loop)."""
    return KdamondTask(name, config, on_snapshot, on_stop)
