"""One large target at the default attributes: what its sampling costs, with and without the
CPU ceiling (cpu_limit_pct), and the sample rate it keeps.

The target is a child holding SIZE resident (one write per page), sampled by
this host's best access check through a real kdamond (monitor/kdamond.py, no
bus): with clear_refs a sample walks every page table entry of the target, so
its cost follows the target's memory, and only the ceiling bounds it. CPU is
the kdamond worker thread's (utime + stime), from the end of the first
aggregation (which learns what a sample costs) to the end of the last.

    python -m bench.ceiling
"""

from __future__ import annotations

import asyncio
import os
import threading
import time
from typing import Any

from bench.table import Column, markdown_table
from bench.target import ChildTarget
from damond.monitor import ops
from damond.monitor.config import Attrs, ContextConfig, TargetConfig
from damond.monitor.kdamond import KdamondTask
from damond.monitor.snapshot import Snapshot

GiB = 1 << 30
SIZE = 4 * GiB
AGGREGATIONS = 3
"""Aggregations measured after the first."""
TICK = os.sysconf("SC_CLK_TCK")

CHILD = r"""
import ctypes, mmap, sys
size = int(sys.argv[1])
buf = mmap.mmap(-1, size, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
buf.madvise(mmap.MADV_NOHUGEPAGE)
for start in range(0, size, 1 << 28):  # in pieces: one bytes object of size/4096 at a time
    end = min(size, start + (1 << 28))
    buf[start:end:4096] = b"\1" * len(range(start, end, 4096))
print(ctypes.addressof(ctypes.c_char.from_buffer(buf)), flush=True)
sys.stdin.read()
"""


def thread_cpu_s(tid: int) -> float:
    with open(f"/proc/self/task/{tid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / TICK


async def measure(pid: int, check: str, limit: int) -> dict[str, Any]:
    snapshots: list[Snapshot] = []
    arrived = asyncio.Event()

    def on_snapshot(snapshot: Snapshot) -> None:
        snapshots.append(snapshot)
        arrived.set()

    config = ContextConfig(
        ops.VADDR, check, Attrs(cpu_limit_pct=limit), (TargetConfig(0, pid),)
    )
    task = KdamondTask("bench", config, on_snapshot, lambda reason: arrived.set())
    try:
        while not snapshots:
            await arrived.wait()
            arrived.clear()
        tid = next(t.native_id for t in threading.enumerate() if t.name.startswith("kdamond."))
        assert tid is not None
        cpu0, t0, first = thread_cpu_s(tid), time.monotonic(), len(snapshots)
        while len(snapshots) < first + AGGREGATIONS:
            await arrived.wait()
            arrived.clear()
        cpu, seconds = thread_cpu_s(tid) - cpu0, time.monotonic() - t0
    finally:
        task.stop()
        await task.wait()
    last = snapshots[-1]
    samples = sum(s.max_nr_accesses for s in snapshots[first:])
    return {
        "limit": limit,
        "cpu_share": cpu / seconds,
        "cpu_ms_per_sample": 1e3 * cpu / samples,
        "samples_per_s": samples / seconds,
        "effective_sample_us": last.effective_sample_us,
        "effective_aggr_us": last.effective_aggr_us,
        "seconds": seconds,
    }


def run() -> dict[str, Any]:
    check = ops.REGISTRY.resolve_access_check("auto", "vaddr")
    target = ChildTarget(CHILD, str(SIZE))
    try:
        rows = [
            asyncio.run(measure(target.config.pid, check, limit))
            for limit in (Attrs().cpu_limit_pct, 0)
        ]
    finally:
        target.close()
    return {"check": check, "size_gib": SIZE // GiB, "rows": rows}


COLUMNS: list[Column] = [
    ("limit", "cpu_limit_pct", lambda v: f"{v} (default)" if v == 10 else f"{v} (no limit)"),
    ("cpu_share", "sampling CPU (share of one CPU)", "{:.1%}"),
    ("cpu_ms_per_sample", "CPU per sample (ms)", "{:.1f}"),
    ("samples_per_s", "samples/s (nominal 200)", "{:.1f}"),
    ("effective_sample_us", "effective_sample_us", "{}"),
    ("effective_aggr_us", "effective_aggr_us", "{}"),
    ("seconds", "measured over (s)", "{:.0f}"),
]


def markdown(results: dict[str, Any]) -> str:
    return (
        f"One {results['size_gib']} GiB resident target (4 KiB pages), access check "
        f"{results['check']}, default intervals:\n\n" + markdown_table(COLUMNS, results["rows"])
    )


if __name__ == "__main__":
    print(markdown(run()))
