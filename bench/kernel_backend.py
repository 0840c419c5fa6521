"""damond's kernel backend vs the kernel's DAMON alone, in the test guest: CPU, latency, verdict.

Part ``kernel`` of bench/guest.py (one boot, with its other parts). On the
half-hot workload of tests/vm/scenarios.py, for each region setup (the
default attributes, then min = max = 10, 100 and 1000 regions), one after
the other on the same workload process:

1. the kernel alone: a kdamond configured through the reference driver
   (tests/vm/kernel_damon.py), nobody reading its results; its CPU;
2. the kernel read through a ``stat`` scheme's tried_regions, as damo does:
   the reader's CPU, and how many of the kernel's aggregations it saw;
3. damond with ``backend kernel`` relaying the same kdamond over D-Bus to a
   subscribed client: damond's CPU next to the kdamond's in the same
   window, snapshots received and seq gaps (is the tracepoint reader
   complete?), the latency from the end of an aggregation to the client
   (CLOCK_REALTIME at receipt minus the snapshot's timestamp_us), and the
   hot/cold verdict of the last snapshots next to the kernel's own (2.).

CPU is utime + stime from /proc (the kdamond: its kernel thread). Under QEMU
TCG every guest task is slowed, Python more than kernel C, and the guest's
clock keeps running while the host runs other work, so windows are repeated
and compared within one boot.
"""

from __future__ import annotations

import asyncio
import dataclasses
import os
import statistics
import threading
import time
from pathlib import Path
from types import ModuleType
from typing import Any

WARMUP_SECONDS = 4.0
WINDOW_SECONDS = 15.0
SETUPS = (("default (10..1000)", 10, 1000), ("10", 10, 10), ("100", 100, 100))
SETUPS += (("1000", 1000, 1000),)
"""(name, nr_regions min, max)."""
LAST = 5
"""Verdicts are the mean of the last LAST aggregations (as in tests/vm/scenarios.py)."""


def cpu_seconds(pid: int) -> float:
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def kernel_alone(scenarios: ModuleType, kernel_damon: ModuleType, wl: Any, attrs: Any) -> Any:
    """Phases 1 and 2: the kdamond alone, then read through tried_regions."""
    out: dict[str, Any] = {}
    with kernel_damon.KernelDamon() as k:
        k.setup("vaddr", pids=[wl.pid], attrs=attrs)
        k.on()
        kpid = k.pid()
        time.sleep(WARMUP_SECONDS)
        k0, t0 = cpu_seconds(kpid), time.monotonic()
        time.sleep(WINDOW_SECONDS)
        seconds = time.monotonic() - t0
        out["alone"] = {"seconds": round(seconds, 2), "kdamond_cpu_s": cpu_seconds(kpid) - k0}
        # the reference reader, as damo reads: update_schemes_tried_regions, then the files
        reads: list[list[tuple[int, int, int, int]]] = []
        k0, t0, r0 = cpu_seconds(kpid), time.monotonic(), time.thread_time()
        while time.monotonic() - t0 < WINDOW_SECONDS:
            reads.append([(r.start, r.end, r.nr_accesses, r.age) for r in k.tried_regions()])
        seconds = time.monotonic() - t0
        out["tried_regions"] = {
            "seconds": round(seconds, 2),
            "reads": len(reads),
            "reader_cpu_s": time.thread_time() - r0,
            "kdamond_cpu_s": cpu_seconds(kpid) - k0,
            "regions": len(reads[-1]),
        }
        verdicts = [scenarios.classify(regions, wl) for regions in reads[-LAST:]]
        out["verdict"] = scenarios.mean_verdict(verdicts)
    return out


async def damond_relaying(
    scenarios: ModuleType, wl: Any, attrs: Any, workdir: Path, record: dict[str, Any]
) -> dict[str, Any]:
    """Phase 3: damond with backend kernel, one client subscribed to its snapshots."""
    async with scenarios.running_daemon(workdir, record, args=()) as d:
        await scenarios.configure(
            d,
            wl.pid,
            "auto",
            attrs={
                "min": attrs.min_nr_regions,
                "max": attrs.max_nr_regions,
                "sample_us": attrs.sample_us,
                "aggr_us": attrs.aggr_us,
            },
        )
        await d.set(scenarios.C0, "org.damond1.Context", "backend", "s", "kernel")
        snapshots = await d.snapshots()
        arrivals: list[tuple[int, Any]] = []

        def arrived(msg: Any) -> None:
            arrivals.append((scenarios.realtime_us(), msg.body))

        d.client.add_message_handler(lambda m: arrived(m) if m.member == "Snapshot" else None)
        await scenarios.state(d, "on")
        kpid = await d.get(scenarios.K0, "org.damond1.Kdamond", "pid")
        effective = await d.get(scenarios.C0, "org.damond1.Context", "effective_backend")
        await asyncio.sleep(WARMUP_SECONDS)
        first = len(arrivals)
        d0, k0, t0 = cpu_seconds(d.process.pid), cpu_seconds(kpid), time.monotonic()
        await asyncio.sleep(WINDOW_SECONDS)
        seconds = time.monotonic() - t0
        damond_cpu, kdamond_cpu = cpu_seconds(d.process.pid) - d0, cpu_seconds(kpid) - k0
        window = arrivals[first:]
        await scenarios.state(d, "off")
        del snapshots
    seqs = [body[0] for _, body in window]
    latencies = sorted((at - body[1]) / 1000 for at, body in window)
    regions = [scenarios.Snap.from_body(body).regions for _, body in window[-LAST:]]
    return {
        "effective_backend": effective,
        "seconds": round(seconds, 2),
        "damond_cpu_s": damond_cpu,
        "kdamond_cpu_s": kdamond_cpu,
        "snapshots": len(window),
        "seq_span": (seqs[-1] - seqs[0] + 1) if seqs else 0,
        "aggregations_per_s": round(len(window) / seconds, 2),
        "latency_ms": {
            "p50": round(statistics.median(latencies), 2) if latencies else None,
            "p99": round(latencies[int(0.99 * (len(latencies) - 1))], 2) if latencies else None,
            "max": round(latencies[-1], 2) if latencies else None,
        },
        "regions": len(regions[-1]) if regions else 0,
        "verdict": scenarios.mean_verdict([scenarios.classify(r, wl) for r in regions]),
    }


async def measure(scenarios: ModuleType, kernel_damon: ModuleType, workdir: Path) -> Any:
    kernel_damon.mount_tracefs()  # where systemd would have (the guest's init does not)
    wl = scenarios.hotcold_workload(False)
    rows = []
    try:
        for name, lo, hi in SETUPS:
            attrs = dataclasses.replace(scenarios.DEFAULTS, min_nr_regions=lo, max_nr_regions=hi)
            row: dict[str, Any] = {"setup": name, "min": lo, "max": hi}
            alone = await asyncio.to_thread(kernel_alone, scenarios, kernel_damon, wl, attrs)
            row["kernel"] = alone
            record: dict[str, Any] = {}
            row["damond"] = await damond_relaying(scenarios, wl, attrs, workdir, record)
            row["damond_daemon"] = {k: v for k, v in record.items() if k != "daemon_log_tail"}
            rows.append(row)
            print(f"bench.kernel_backend: {row}", flush=True)
    finally:
        wl.stop()
    return {"rows": rows, "threads": threading.active_count()}


def _f(x: float | None, digits: int = 2) -> str:
    return "n/a" if x is None else f"{x:.{digits}f}"


def markdown(results: dict[str, Any]) -> list[str]:
    """The section of docs/benchmarks.md for these results."""
    if "error" in results:
        return ["Kernel backend measurement failed:", "", "```", results["error"], "```", ""]
    lines = [
        "### The kernel backend: damond relaying the kernel's DAMON",
        "",
        f"For each setup, over {WINDOW_SECONDS:.0f} s windows after {WARMUP_SECONDS:.0f} s "
        "of warm-up, one after the other on the same workload: the kdamond alone (nobody "
        "reading), the kdamond read through a `stat` scheme's tried_regions as damo reads "
        "it (`update_schemes_tried_regions`, then the files), and damond with `backend "
        "kernel` relaying the kdamond's `damon:damon_aggregated` events (its trace "
        "instance, binary pages) as Snapshot signals to one subscribed dbus-fast client. "
        "damond's CPU is the whole daemon process (event loop, trace reading, D-Bus), "
        "next to the kdamond's in the same window.",
        "",
        "| setup | regions | kdamond alone CPU % | kdamond CPU % (damond relaying) "
        "| damond CPU % | damond / kdamond | snapshots/s | seq gaps "
        "| latency p50 / p99 / max (ms) |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---|",
    ]
    for row in results["rows"]:
        k, d = row["kernel"], row["damond"]
        alone = 100 * k["alone"]["kdamond_cpu_s"] / k["alone"]["seconds"]
        kd = 100 * d["kdamond_cpu_s"] / d["seconds"]
        dm = 100 * d["damond_cpu_s"] / d["seconds"]
        ratio = d["damond_cpu_s"] / d["kdamond_cpu_s"] if d["kdamond_cpu_s"] else None
        lat = d["latency_ms"]
        lines.append(
            f"| {row['setup']} | {d['regions']} | {alone:.1f} | {kd:.1f} | {dm:.1f} "
            f"| **{_f(ratio)}** | {d['aggregations_per_s']} | {d['seq_span'] - d['snapshots']} "
            f"| {_f(lat['p50'])} / {_f(lat['p99'])} / {_f(lat['max'])} |"
        )
    lines += [
        "",
        "Reading the results: the tracepoint against tried_regions (same setups, the "
        "reader's own CPU, and the share of the kernel's aggregations it saw; an "
        "aggregation takes the time damond's snapshots came at):",
        "",
        "| setup | tried_regions reads/s | kernel aggregations/s | seen | reader CPU per read (ms) "
        "| kdamond CPU % while read | damond (tracepoint) seen | damond CPU per snapshot (ms) |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for row in results["rows"]:
        t, d = row["kernel"]["tried_regions"], row["damond"]
        rate = t["reads"] / t["seconds"]
        agg = d["aggregations_per_s"]
        seen_d = d["snapshots"] / d["seq_span"] if d["seq_span"] else None
        lines.append(
            f"| {row['setup']} | {rate:.2f} | {agg} | {100 * rate / agg:.0f} % "
            f"| {1e3 * t['reader_cpu_s'] / max(t['reads'], 1):.1f} "
            f"| {100 * t['kdamond_cpu_s'] / t['seconds']:.1f} "
            f"| {_f(100 * seen_d if seen_d is not None else None, 0)} % "
            f"| {1e3 * d['damond_cpu_s'] / max(d['snapshots'], 1):.2f} |"
        )
    lines += [
        "",
        "Verdicts (share of the hot half in regions with nr_accesses > 0, of the cold "
        f"half in regions with nr_accesses 0; mean of the last {LAST} aggregations): the "
        "kernel alone (tried_regions) and damond relaying it.",
        "",
        "| setup | kernel hot % | damond hot % | kernel cold % | damond cold % |",
        "|---|---:|---:|---:|---:|",
    ]
    for row in results["rows"]:
        kv, dv = row["kernel"]["verdict"], row["damond"]["verdict"]
        lines.append(
            f"| {row['setup']} | {_f(100 * kv['hot_accessed_share'], 1)} "
            f"| {_f(100 * dv['hot_accessed_share'], 1)} "
            f"| {_f(100 * kv['cold_idle_share'], 1)} | {_f(100 * dv['cold_idle_share'], 1)} |"
        )
    lines.append("")
    return lines
