"""Where damond's CPU goes while it relays the kernel's DAMON, in the test guest.

    python -m bench.relay_profile [--json FILE]   # host: boots the guest, prints JSON

Two views, at 10 and 100 regions (the setups where damond costs more than
the kdamond, docs/benchmarks.md):

- stages: the kernel's own records of a real kdamond, read from a trace
  instance of this script's, then each step of the relay timed on them one by
  one in this process (thread CPU time, repeated): parse the pages, group the
  records into aggregations, build the Snapshot, marshal its body and the
  signal. Plus the cost of one trivial numpy call, the unit of cost under TCG.
- daemon: damond with ``backend kernel`` relaying to a subscribed client, its
  CPU per snapshot by thread, then the same under cProfile in every thread
  (bench/guest.py's profiled daemon): own time of the top functions.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import json
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from bench import guest  # noqa: E402

SETUPS = (10, 100)
CAPTURE_SECONDS = 3.0
WINDOW_SECONDS = 12.0
WARMUP_SECONDS = 3.0
REPEATS = 20


def _cpu_us(fn: Callable[[], object], repeats: int = REPEATS) -> float:
    """Thread CPU µs of one call of fn, the mean of repeats."""
    t0 = time.thread_time_ns()
    for _ in range(repeats):
        fn()
    return (time.thread_time_ns() - t0) / repeats / 1e3


def stages(scenarios: Any, kernel_damon: Any, wl: Any, regions: int) -> dict[str, Any]:
    """The relay's steps, timed on pages a real kdamond wrote."""
    import numpy as np

    from damond import wire
    from damond.bus import SNAPSHOT_SIGNATURE
    from damond.monitor.kernel import _target_snapshot
    from damond.monitor.kernel_relay import Aggregations
    from damond.monitor.ops import damon_trace
    from damond.monitor.ops.damon_trace import TraceInstance
    from damond.monitor.snapshot import Snapshot

    trace = TraceInstance(name="damond-profile")
    trace.create()
    fmt_kept, layout_kept = trace.format, trace.layout
    drains: list[list[bytes]] = []
    read_us = 0.0
    attrs = dataclasses.replace(scenarios.DEFAULTS, min_nr_regions=regions, max_nr_regions=regions)
    fds = trace.open_pipes()
    try:
        with kernel_damon.KernelDamon() as k:
            k.setup("vaddr", pids=[wl.pid], attrs=attrs)
            k.on()
            t0 = time.monotonic()
            while time.monotonic() - t0 < CAPTURE_SECONDS:
                time.sleep(attrs.aggr_us / 1e6)
                c0 = time.thread_time_ns()
                pages = [p for fd in fds for p in trace.read_pipe(fd)]
                read_us += (time.thread_time_ns() - c0) / 1e3
                if pages:
                    drains.append(pages)
    finally:
        for fd in fds:
            os.close(fd)
        trace.remove()
    trace.format, trace.layout = fmt_kept, layout_kept  # remove() forgets them
    parsed = [trace.parse(p) for p in drains]
    records = sum(len(e.ts) for e in parsed)
    aggs = Aggregations(1)
    found = [a for e in parsed for a in aggs.add(e.ts, e.records)]

    def group() -> None:
        a = Aggregations(1)
        for e in parsed:
            a.add(e.ts, e.records)

    def snapshots() -> list[Snapshot]:
        return [
            Snapshot(i, 0, 20, tuple(_target_snapshot(t, 1, r) for t, r in a.targets))
            for i, a in enumerate(found)
        ]

    snaps = snapshots()
    bodies = [wire.snapshot_body(s) for s in snaps]

    def signals() -> None:
        for body in bodies:
            wire.prepared_signal(
                "/org/damond1/kdamonds/0/contexts/0",
                "org.damond1.Context",
                "Snapshot",
                SNAPSHOT_SIGNATURE,
                body,
            )._marshall(False)

    n = max(len(found), 1)
    per_agg = {
        "parse": _cpu_us(lambda: [trace.parse(p) for p in drains]) / n,
        "group": _cpu_us(group) / n,
        "snapshot": _cpu_us(snapshots) / n,
        "body": _cpu_us(lambda: [wire.snapshot_body(s) for s in snaps]) / n,
        "signal": _cpu_us(signals) / n,
    }
    native = getattr(damon_trace, "NATIVE_PARSE", None)
    if native is not None:
        fmt, layout = fmt_kept, layout_kept
        per_agg["parse_c"] = (
            _cpu_us(lambda: [damon_trace.parse_pages_native(p, fmt, layout) for p in drains]) / n
        )
        per_agg["parse_python"] = (
            _cpu_us(lambda: [damon_trace.parse_pages(p, fmt, layout) for p in drains]) / n
        )
    zeros = _cpu_us(lambda: np.zeros(1), 1000)
    return {
        "regions": regions,
        "drains": len(drains),
        "pages": sum(len(p) for p in drains),
        "records": records,
        "aggregations": len(found),
        "read_us_per_drain": round(read_us / max(len(drains), 1), 1),
        "us_per_aggregation": {k: round(v, 1) for k, v in per_agg.items()},
        "numpy_zeros_us": round(zeros, 1),
    }


IDLE_LOOP = """
import asyncio, sys, time
async def main():
    n, t0 = 0, time.process_time()
    end = time.monotonic() + float(sys.argv[1])
    while time.monotonic() < end:
        await asyncio.sleep(0.1)
        n += 1
    print((time.process_time() - t0) / n * 1e6)
asyncio.run(main())
"""


def wakeup_us() -> float:
    """CPU µs of one wakeup of an idle asyncio loop (a timer every 100 ms), in a process
    of its own: what any event costs a Python process in this guest, before any work."""
    out = subprocess.run(
        [sys.executable, "-c", IDLE_LOOP, "5"], capture_output=True, text=True, check=True
    )
    return round(float(out.stdout), 1)


def thread_cpu(pid: int) -> dict[str, float]:
    out = {}
    for tid in os.listdir(f"/proc/{pid}/task"):
        with open(f"/proc/{pid}/task/{tid}/comm") as f:
            name = f.read().strip()
        out[f"{tid}:{name}"] = guest.cpu_seconds(pid, int(tid))
    return out


async def daemon(scenarios: Any, wl: Any, regions: int, workdir: Path, profiled: bool) -> Any:
    """damond relaying one kdamond at regions, to a subscribed client: CPU per snapshot."""
    from damond.tools import client
    from damond.tools.privatebus import start_private_bus, wait_for_name

    bus = start_private_bus()
    prof = workdir / f"relay-{regions}.prof"
    log_path = workdir / f"relay-{regions}.log"
    argv = [sys.executable]
    argv += [str(REPO / "bench" / "guest.py"), "profiled-daemon", str(prof)] if profiled else []
    argv += ["-m", "damond"] if not profiled else []
    with open(log_path, "wb") as log:
        process = subprocess.Popen(
            [*argv, "--bus", bus.address], stdin=subprocess.DEVNULL, stdout=log, stderr=log
        )
    conn = await client.connect(bus.address)
    try:
        await wait_for_name(conn, scenarios.BUS_NAME, scenarios.DAEMON_START_TIMEOUT)
        d = scenarios.Daemon(bus, process, conn, log_path)
        attrs = {"min": regions, "max": regions, "sample_us": 5000, "aggr_us": 100000}
        await scenarios.configure(d, wl.pid, "auto", attrs=attrs)
        await d.set(scenarios.C0, "org.damond1.Context", "backend", "s", "kernel")
        await d.snapshots()
        seqs: list[int] = []
        conn.add_message_handler(
            lambda m: seqs.append(m.body[0]) if m.member == "Snapshot" else None
        )
        await scenarios.state(d, "on")
        kpid = await d.get(scenarios.K0, "org.damond1.Kdamond", "pid")
        await asyncio.sleep(WARMUP_SECONDS)
        first, t0 = len(seqs), time.monotonic()
        threads0, k0 = thread_cpu(process.pid), guest.cpu_seconds(kpid)
        await asyncio.sleep(WINDOW_SECONDS)
        threads1, k1 = thread_cpu(process.pid), guest.cpu_seconds(kpid)
        seconds, snaps = time.monotonic() - t0, len(seqs) - first
        await scenarios.state(d, "off")
    finally:
        conn.disconnect()
        process.terminate()
        process.wait(timeout=120)
        bus.stop()
    by_thread = {t: round(threads1[t] - threads0.get(t, 0.0), 3) for t in threads1}
    damond_s = sum(by_thread.values())
    out: dict[str, Any] = {
        "regions": regions,
        "profiled": profiled,
        "seconds": round(seconds, 2),
        "snapshots": snaps,
        "damond_cpu_s": round(damond_s, 3),
        "kdamond_cpu_s": round(k1 - k0, 3),
        "damond_ms_per_snapshot": round(1e3 * damond_s / max(snaps, 1), 2),
        "by_thread_s": by_thread,
    }
    if profiled:
        out["profile"] = guest.profile_summary(str(prof))
        out["profile"]["top"] = _top(str(prof), snaps)
    return out


def _top(path: str, snaps: int) -> list[dict[str, Any]]:
    """Own and cumulative µs per snapshot of the busiest functions (blocking calls apart)."""
    import pstats

    raw: dict[Any, Any] = pstats.Stats(path).stats  # type: ignore[attr-defined]
    rows = []
    for (filename, line, func), (_cc, ncalls, tottime, cumtime, _callers) in raw.items():
        where = f"{filename.split('/site-packages/')[-1].split('/src/')[-1]}:{line}({func})"
        if any(w in where for w in guest.WAITING):
            continue
        rows.append((where, ncalls, tottime, cumtime))
    n = max(snaps, 1)
    own = sorted(rows, key=lambda r: -r[2])[:25]
    cum = [r for r in sorted(rows, key=lambda r: -r[3]) if "damond" in r[0]][:25]
    return [
        {"f": w, "calls": c, "own_us": round(1e6 * t / n), "cum_us": round(1e6 * u / n)}
        for w, c, t, u in own + cum
    ]


async def in_guest(out: Path) -> int:
    scenarios, kernel_damon = guest._guest_modules()
    if not kernel_damon.in_test_guest():
        print("relay_profile: not in the damond test guest; refusing to run", file=sys.stderr)
        return 2
    kernel_damon.mount_tracefs()
    wl = scenarios.hotcold_workload(False)
    results: dict[str, Any] = {"stages": [], "daemon": []}
    try:
        with tempfile.TemporaryDirectory() as tmp:
            results["wakeup_us"] = wakeup_us()
            print(json.dumps({"wakeup_us": results["wakeup_us"]}), flush=True)
            for regions in SETUPS:
                results["stages"].append(stages(scenarios, kernel_damon, wl, regions))
                print(json.dumps(results["stages"][-1]), flush=True)
            for regions in SETUPS:
                for profiled in (False, True):
                    row = await daemon(scenarios, wl, regions, Path(tmp), profiled)
                    results["daemon"].append(row)
                    print(json.dumps({k: v for k, v in row.items() if k != "profile"}), flush=True)
    finally:
        wl.stop()
    out.write_text(json.dumps(results, indent=1))
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", help="write the results here (host)")
    parser.add_argument("--in-guest", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.in_guest:
        return asyncio.run(in_guest(Path(args.in_guest)))
    from tests.vm import run as vm

    with tempfile.TemporaryDirectory() as results:
        result = vm.run_in_guest(
            [sys.executable, str(Path(__file__).resolve()), "--in-guest", "/results/out.json"],
            results_dir=Path(results),
            timeout=900,
        )
        path = Path(results) / "out.json"
        if result.exit_code != 0 or not path.exists():
            print(result.console_output[-4000:], file=sys.stderr)
            return 1
        text = path.read_text()
    if args.json:
        Path(args.json).write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
