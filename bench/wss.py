"""DAMON's working-set selftest, made by damond's user-space checks and by the kernel's DAMON.

The kernel's selftest (sysfs_update_schemes_tried_regions_wss_estimation.py):
two buffers of one size written alternately, 2 s each; default intervals; 40
readings, one every 100 ms, of the bytes in regions with 5 <= nr_accesses <=
20 and age >= 2; the error of the 50th and 75th percentile reading against the
buffer size, tolerance 0.2. The workload here is damond.tools.pair: the two
buffers come from malloc, and the kernel merges them into one mapping (which
is what per-mapping access information cannot see into).

- On this host (no page_idle, no soft-dirty): clear_refs.
- In the test guest: soft_dirty, and the guest kernel's own DAMON (vaddr) on
  the same workload, one after the other; and the share of the written buffer
  that its writer really covers in one 5 ms window (counted in the full
  pagemap after clearing the soft-dirty bits): no monitor can read more.
- The steady case (one buffer written one byte per page, the other idle):
  regions and the working set weighted by nr_accesses / max_nr_accesses.

    python -m bench.wss                      # host, then the guest
    python -m bench.wss --in-guest OUT.json  # (in the guest)

damond is driven through its engine (no daemon), paced as the kdamond paces
it with no CPU ceiling, as the kernel has none.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np

from damond.monitor import ops
from damond.monitor.config import Attrs, ContextConfig, TargetConfig
from damond.monitor.engine import Engine
from damond.monitor.ops.process import ProcessTable
from damond.monitor.snapshot import Snapshot

REPO = Path(__file__).resolve().parent.parent
MIB = 1 << 20
SIZES_MIB = (10, 20, 40, 80, 160)
READINGS = 40
READING_S = 0.1
NR_MIN, NR_MAX, AGE_MIN = 5, 20, 2
TOLERANCE = 0.2
WARMUP_S = 2.0
STEADY_MIB = 64
STEADY_AGGREGATIONS = 30
WINDOWS = 20
SCALE = 10
"""In the guest the test is also run with every time (intervals, readings, the
writer's turns) SCALE times longer, which the emulated CPU's writer can fill."""
SCALED_SIZES_MIB = (10, 40)


def start_pair(mib: float, *args: str) -> tuple[subprocess.Popen[bytes], dict[str, Any]]:
    process = subprocess.Popen(
        [sys.executable, "-m", "damond.tools.pair", "--mib", str(mib), *args],
        stdout=subprocess.PIPE,
    )
    assert process.stdout is not None
    return process, json.loads(process.stdout.readline())


def stop(process: subprocess.Popen[bytes]) -> None:
    process.kill()
    process.wait()
    if process.stdout is not None:
        process.stdout.close()


def wss_bytes(
    starts: np.ndarray, ends: np.ndarray, nr: np.ndarray, age: np.ndarray, span: list[int]
) -> int:
    """The selftest's working set: bytes in span of regions with 5 <= nr <= 20, age >= 2."""
    overlap = np.clip(
        np.minimum(ends.astype(np.int64), span[1]) - np.maximum(starts.astype(np.int64), span[0]),
        0,
        None,
    )
    chosen = (nr >= NR_MIN) & (nr <= NR_MAX) & (age >= AGE_MIN)
    return int(overlap[chosen].sum())


def errors(readings: list[int], size: int) -> dict[str, float]:
    ordered = sorted(readings)
    return {
        f"p{pc}": round(abs(ordered[int(len(ordered) * pc / 100)] - size) / size, 3)
        for pc in (50, 75)
    }


class EngineRun:
    """damond's engine on one target in a thread, sampling at the default intervals
    (times scale)."""

    def __init__(self, pid: int, check: str, scale: int = 1) -> None:
        self.table = ProcessTable()
        attrs = Attrs(sample_us=5000 * scale, aggr_us=100_000 * scale, cpu_limit_pct=0)
        config = ContextConfig(ops.VADDR, check, attrs, (TargetConfig(0, pid),))
        self.engine = Engine(
            config, ops.VADDR.space(self.table), ops.REGISTRY.make_access(check, self.table)
        )
        self.snapshots: list[Snapshot] = []
        self.samples = 0
        self.cpu_s = 0.0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop)
        self.engine.start()
        self._thread.start()

    def _loop(self) -> None:
        cpu0 = time.thread_time()
        while not self._stop.is_set():
            self.engine.prepare()
            time.sleep(self.engine.config.attrs.sample_us / 1e6)
            snapshot = self.engine.check()
            self.samples += 1
            if snapshot is not None:
                self.snapshots.append(snapshot)
        self.cpu_s = time.thread_time() - cpu0

    def close(self) -> None:
        self._stop.set()
        self._thread.join()
        self.engine.close()
        self.table.close()


def damond_wss(check: str, mib: int, scale: int = 1) -> dict[str, Any]:
    process, info = start_pair(mib, "--switch-s", str(2 * scale))
    run = EngineRun(process.pid, check, scale)
    try:
        time.sleep(WARMUP_S * scale)
        readings, t0 = [], time.monotonic()
        while len(readings) < READINGS:
            time.sleep(READING_S * scale)
            if run.snapshots:
                t = run.snapshots[-1].targets[0]
                readings.append(wss_bytes(t.starts, t.ends, t.nr_accesses, t.ages, info["mapping"]))
        wall = time.monotonic() - t0
    finally:
        run.close()
        stop(process)
    last = run.snapshots[-1].targets[0]
    return {
        "one_mapping": info["one_mapping"],
        **errors(readings, mib * MIB),
        "readings_mib": [round(r / MIB, 1) for r in sorted(readings)[::8]],
        "regions": len(last.starts),
        "cpu_ms_per_sample": round(1e3 * run.cpu_s / max(run.samples, 1), 2),
        "samples_per_s": round(run.samples / max(wall + WARMUP_S * scale, 1e-9), 1),
    }


def kernel_wss(mib: int, scale: int = 1) -> dict[str, Any]:
    """The guest kernel's DAMON (vaddr) on the same workload, read the selftest's way."""
    sys.path.insert(0, str(REPO / "tests" / "vm"))
    import kernel_damon

    process, info = start_pair(mib, "--switch-s", str(2 * scale))
    attrs = kernel_damon.KAttrs(sample_us=5000 * scale, aggr_us=100_000 * scale)
    try:
        with kernel_damon.KernelDamon() as k:
            k.setup("vaddr", pids=[process.pid], attrs=attrs)
            k.on()
            time.sleep(WARMUP_S * scale)
            readings = []
            while len(readings) < READINGS:
                time.sleep(READING_S * scale)
                regions = k.tried_regions()
                readings.append(
                    wss_bytes(
                        np.array([r.start for r in regions], dtype=np.uint64),
                        np.array([r.end for r in regions], dtype=np.uint64),
                        np.array([r.nr_accesses for r in regions]),
                        np.array([r.age for r in regions]),
                        info["mapping"],
                    )
                )
    finally:
        stop(process)
    shown = [round(r / MIB, 1) for r in sorted(readings)[::8]]
    return {**errors(readings, mib * MIB), "readings_mib": shown}


def written_share(mib: int) -> float:
    """Median share of the written buffer that its writer covers in one 5 ms window."""
    from damond.monitor.ops.soft_dirty import soft_dirty

    process, info = start_pair(mib, "--switch-s", "0")
    try:
        time.sleep(WARMUP_S)
        clear = os.open(f"/proc/{process.pid}/clear_refs", os.O_WRONLY)
        pagemap = os.open(f"/proc/{process.pid}/pagemap", os.O_RDONLY)
        start, end = info["buffers"][0]
        shares = []
        for _ in range(WINDOWS):
            os.write(clear, b"4")
            time.sleep(0.005)
            raw = os.pread(pagemap, (end - start) // 4096 * 8, start // 4096 * 8)
            shares.append(float(soft_dirty(np.frombuffer(raw, dtype=np.uint64)).mean()))
        os.close(clear)
        os.close(pagemap)
    finally:
        stop(process)
    return round(float(np.median(shares)), 2)


def steady(check: str) -> dict[str, Any]:
    """One buffer written a byte per page continuously, the other idle, in one mapping."""
    process, info = start_pair(STEADY_MIB, "--switch-s", "0", "--per-page", "--pause-ms", "1")
    run = EngineRun(process.pid, check)
    try:
        while len(run.snapshots) < STEADY_AGGREGATIONS:
            time.sleep(0.1)
    finally:
        run.close()
        stop(process)
    last = run.snapshots[-10:]
    lo, hi = info["mapping"]
    weighted = []
    for s in last:
        t = s.targets[0]
        overlap = np.clip(
            np.minimum(t.ends.astype(np.int64), hi) - np.maximum(t.starts.astype(np.int64), lo),
            0,
            None,
        )
        weighted.append(float((overlap * t.nr_accesses).sum()) / s.max_nr_accesses)
    return {
        "regions_max": max(len(s.targets[0].starts) for s in last),
        "weighted_ratio": round(float(np.median(weighted)) / (STEADY_MIB * MIB), 3),
        "cpu_ms_per_sample": round(1e3 * run.cpu_s / max(run.samples, 1), 2),
    }


def on_host() -> dict[str, Any]:
    check = ops.REGISTRY.resolve_access_check("auto", "vaddr")
    return {
        "check": check,
        "steady": steady(check),
        "sizes": {mib: damond_wss(check, mib) for mib in SIZES_MIB},
    }


def in_guest(out: Path) -> int:
    results: dict[str, Any] = {"kernel": os.uname().release}
    for mib in SIZES_MIB:
        row: dict[str, Any] = {}
        for name, measure, args in (
            ("written_share", written_share, (mib,)),
            ("soft_dirty", damond_wss, ("soft_dirty", mib)),
            ("kernel", kernel_wss, (mib,)),
        ):
            try:
                row[name] = measure(*args)  # type: ignore[operator]
            except Exception as e:
                row[name] = {"error": f"{type(e).__name__}: {e}"}
        results[str(mib)] = row
        print(f"bench.wss: {mib} MiB: {json.dumps(row)}", flush=True)
        out.write_text(json.dumps(results, indent=1))
    for mib in SCALED_SIZES_MIB:
        scaled: dict[str, Any] = {}
        for name, measure, args in (
            ("soft_dirty", damond_wss, ("soft_dirty", mib, SCALE)),
            ("kernel", kernel_wss, (mib, SCALE)),
        ):
            try:
                scaled[name] = measure(*args)  # type: ignore[operator]
            except Exception as e:
                scaled[name] = {"error": f"{type(e).__name__}: {e}"}
        results[f"{mib}x{SCALE}"] = scaled
        print(f"bench.wss: {mib} MiB, times x{SCALE}: {json.dumps(scaled)}", flush=True)
        out.write_text(json.dumps(results, indent=1))
    try:
        results["steady"] = steady("soft_dirty")
    except Exception as e:
        results["steady"] = {"error": f"{type(e).__name__}: {e}"}
    out.write_text(json.dumps(results, indent=1))
    return 0


def in_vm() -> dict[str, Any]:
    from bench.guest import run_in_guest

    script = Path(__file__).resolve()
    return run_in_guest(script, ["--in-guest", "/results/wss.json"], "wss.json", None)


def run() -> dict[str, Any]:
    return {"host": on_host(), "guest": in_vm()}


def _err(found: dict[str, Any]) -> str:
    if "error" in found:
        return f"failed: {found['error']}"
    return f"{found['p50']:.2f} / {found['p75']:.2f}"


def markdown(results: dict[str, Any]) -> str:
    host, guest = results["host"], results["guest"]
    lines = [
        f"Selftest errors (50th / 75th percentile; the kernel's tolerance is {TOLERANCE}), "
        "buffers from malloc in one mapping, memset in turn for 2 s each:",
        "",
        f"| buffer | this host, {host['check']} | guest, damond soft_dirty | guest, kernel DAMON "
        "| guest: written share of the buffer per 5 ms window |",
        "|---|---:|---:|---:|---:|",
    ]
    for mib in SIZES_MIB:
        g = guest.get(str(mib), {})
        lines.append(
            f"| {mib} MiB | {_err(host['sizes'][mib])} | {_err(g.get('soft_dirty', {}))} "
            f"| {_err(g.get('kernel', {}))} | {g.get('written_share', 'n/a')} |"
        )
    lines += [
        "",
        f"In the guest with every time {SCALE}× longer ({5 * SCALE} ms samples, "
        f"{100 * SCALE} ms aggregations, readings every {READING_S * SCALE:g} s, the "
        f"writer's turns {2 * SCALE} s), which its emulated CPU can fill:",
        "",
        "| buffer | damond soft_dirty | kernel DAMON |",
        "|---|---:|---:|",
    ]
    for mib in SCALED_SIZES_MIB:
        g = guest.get(f"{mib}x{SCALE}", {})
        lines.append(
            f"| {mib} MiB | {_err(g.get('soft_dirty', {}))} | {_err(g.get('kernel', {}))} |"
        )
    sd = [guest.get(str(m), {}).get("soft_dirty", {}) for m in SIZES_MIB]
    lines += [
        "",
        "damond's cost in these runs (no CPU ceiling): "
        + ", ".join(
            f"{m} MiB {s.get('cpu_ms_per_sample', '?')} ms/sample at {s.get('samples_per_s', '?')}"
            "/s"
            for m, s in zip(SIZES_MIB, sd, strict=True)
        )
        + " (soft_dirty, guest); "
        + ", ".join(f"{m} MiB {host['sizes'][m]['cpu_ms_per_sample']} ms" for m in SIZES_MIB)
        + f" ({host['check']}, host).",
        "",
        f"The steady case, {STEADY_MIB} MiB written one byte per page and {STEADY_MIB} MiB idle "
        "in one mapping, the last 10 of 30 aggregations:",
        "",
        "| | check | regions (max) | weighted working set / written buffer |",
        "|---|---|---:|---:|",
        f"| this host | {host['check']} | {host['steady']['regions_max']} "
        f"| {host['steady']['weighted_ratio']} |",
    ]
    gs = guest.get("steady", {})
    if "error" not in gs:
        lines.append(
            f"| guest | soft_dirty | {gs.get('regions_max')} | {gs.get('weighted_ratio')} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.wss", description=__doc__.split("\n")[0])
    parser.add_argument("--in-guest", type=Path, help="(in the guest) measure, write JSON here")
    parser.add_argument("--json", type=Path, help="(host) also write the raw results here")
    args = parser.parse_args(argv)
    if args.in_guest:
        return in_guest(args.in_guest)
    results = run()
    if args.json:
        args.json.write_text(json.dumps(results, indent=1))
    print(markdown(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
