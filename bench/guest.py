"""damond vs the kernel's own DAMON, in the test guest (tests/vm): CPU time and accuracy.

    python -m bench.guest [--json FILE]   # host: boots the guest, prints the section

The guest (tests/vm/run.py: Linux 6.12 with page_idle and DAMON under QEMU TCG,
1 vCPU) runs ``bench/guest.py --in-guest OUT.json``, which measures, in one boot,
on the workload of tests/vm/scenarios.py (64 MiB, one mapping, 4 KiB pages,
the first half written continuously with a 5 ms pause between passes):

- accuracy: scenario 2 (hot/cold bytes classified by damond, then by the
  kernel's DAMON, the mean of the last 5 aggregations of 2 s of DAMON time),
  REPEATS times, and once more with transparent huge pages;
- CPU: damond (``access_check`` auto = page_idle) for CPU_SECONDS, then the
  kernel's kdamond for CPU_SECONDS, both at the default attributes (5 ms /
  100 ms, 10..1000 regions) over the same workload process, plus a window with
  no monitor. One after the other, never together: kernel DAMON marks the pages
  it samples idle (folio_set_idle) and clears their young bits, and page_idle
  clears the same young bits, so each would see the other's marks as "not
  accessed" and both results would be wrong. damond's CPU is utime+stime of
  the daemon process from /proc/PID/stat (and per thread from
  /proc/PID/task/TID/stat), the kernel's that of the kdamond kernel thread
  (its pid from kdamonds/0/pid);
- where damond's CPU goes: a PROFILE_SECONDS run of the daemon under cProfile in
  every thread (py-spy is not in the guest), by own time and by phase.

µs per region per sample of the page_idle and clear_refs checks themselves is
bench/page_idle.py's subject, not this module's.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import tempfile
import time
from pathlib import Path
from types import ModuleType
from typing import Any

REPO = Path(__file__).resolve().parent.parent
VM = REPO / "tests" / "vm"
if str(REPO) not in sys.path:  # run as a script in the guest: bench/ itself is on the path
    sys.path.insert(0, str(REPO))

from bench import kernel_backend  # noqa: E402

REPEATS = 3
ROUNDS = 3
"""damond and the kernel take turns this often: the host's load shows through TCG
as a slower guest, and alternating spreads it over both."""
ROUND_SECONDS = 10.0
CPU_SECONDS = ROUNDS * ROUND_SECONDS
WARMUP_SECONDS = 5.0
BASELINE_SECONDS = 10.0
PROFILE_SECONDS = 15.0
TICK = os.sysconf("SC_CLK_TCK")


# ---------------------------------------------------------------------------------------------
# In the guest
# ---------------------------------------------------------------------------------------------


def _guest_modules() -> tuple[ModuleType, ModuleType]:
    """tests/vm/scenarios.py and kernel_damon.py (tests/ is no package)."""
    sys.path.insert(0, str(VM))
    import kernel_damon
    import scenarios

    return scenarios, kernel_damon


def cpu_seconds(pid: int, tid: int | None = None) -> float:
    """utime + stime of a process (or one of its threads), in seconds."""
    path = f"/proc/{pid}/task/{tid}/stat" if tid is not None else f"/proc/{pid}/stat"
    with open(path) as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / TICK


def threads_cpu(pid: int) -> dict[int, float]:
    out = {}
    for tid in os.listdir(f"/proc/{pid}/task"):
        try:
            out[int(tid)] = cpu_seconds(pid, int(tid))
        except OSError:
            continue
    return out


class Window:
    """CPU and workload progress over one measurement window."""

    def __init__(self, workload: Any, monitor_pid: int | None) -> None:
        self.workload = workload
        self.monitor_pid = monitor_pid
        self.t0 = time.monotonic()
        self.passes0 = workload.command("stats")["passes"]
        self.wl_cpu0 = cpu_seconds(workload.pid)
        self.cpu0 = cpu_seconds(monitor_pid) if monitor_pid else 0.0
        self.threads0 = threads_cpu(monitor_pid) if monitor_pid else {}

    def end(self) -> dict[str, Any]:
        seconds = time.monotonic() - self.t0
        passes = self.workload.command("stats")["passes"] - self.passes0
        out: dict[str, Any] = {
            "seconds": round(seconds, 2),
            "workload_passes_per_s": round(passes / seconds, 1),
            "workload_cpu_s": round(cpu_seconds(self.workload.pid) - self.wl_cpu0, 2),
        }
        if self.monitor_pid:
            out["monitor_cpu_s"] = round(cpu_seconds(self.monitor_pid) - self.cpu0, 2)
            threads = threads_cpu(self.monitor_pid)
            out["threads_cpu_s"] = {
                ("main" if tid == self.monitor_pid else str(tid)): round(
                    cpu - self.threads0.get(tid, 0.0), 2
                )
                for tid, cpu in threads.items()
            }
        return out


async def measure_accuracy(scenarios: ModuleType, workdir: Path) -> dict[str, Any]:
    rows: list[dict[str, Any]] = []
    for i in range(REPEATS + 1):
        thp = i == REPEATS
        run = scenarios.Run(workdir / f"accuracy-{i}.json", "auto")
        await scenarios.scenario_hotcold(run, thp=thp)
        d, k = run.result.get("damond", {}), run.result.get("kernel", {})
        rows.append(
            {
                "thp": thp,
                "error": d.get("error") or k.get("error"),
                "damond": d.get("mean_last"),
                "kernel": k.get("mean_last"),
                "damond_regions": d.get("nr_regions"),
                "kernel_regions": k.get("nr_regions"),
                "damond_samples_in_2s_wall": d.get("at_wall_2s", {}).get("samples"),
                "damond_seconds_to_result": d.get("seconds_on_to_result"),
                "resolved_access_check": d.get("resolved_access_check"),
            }
        )
        print(f"bench.guest: accuracy {i}: {json.dumps(rows[-1])}", flush=True)
    return {"rows": rows}


async def damond_window(scenarios: ModuleType, d: Any, wl: Any) -> dict[str, Any]:
    """damond on (as configured) for ROUND_SECONDS after a warm-up, then off."""
    await scenarios.state(d, "on")
    await asyncio.sleep(WARMUP_SECONDS)
    first = await d.snapshot()
    w = Window(wl, d.process.pid)
    await asyncio.sleep(ROUND_SECONDS)
    last = await d.snapshot()
    found = w.end()
    effective = [
        await d.get(scenarios.C0, "org.damond1.Context", n)
        for n in ("effective_sample_us", "effective_aggr_us", "effective_access_check")
    ]
    await scenarios.state(d, "off")
    samples = (last.seq - first.seq) * last.max_nr_accesses
    if not samples:
        raise RuntimeError("no aggregation during the window: damond's kdamond stalled")
    found.update(
        samples=samples,
        nr_regions=[len(s.regions) for s in (first, last)],
        effective_sample_us=effective[0],
        effective_aggr_us=effective[1],
        effective_access_check=effective[2],
    )
    return found


def kernel_window(kernel_damon: ModuleType, pid: int, wl: Any) -> dict[str, Any]:
    """The kernel's kdamond on the same workload for ROUND_SECONDS after a warm-up."""
    with kernel_damon.KernelDamon() as k:
        k.setup("vaddr", pids=[pid])
        k.on()
        time.sleep(WARMUP_SECONDS)
        kpid = k.pid()
        w = Window(wl, kpid)
        time.sleep(ROUND_SECONDS)
        result = w.end()
        result["nr_regions"] = len(k.tried_regions())
        result["kdamond_pid"] = kpid
    return result


def totals(windows: list[dict[str, Any]]) -> dict[str, Any]:
    """Windows added up: seconds, monitor CPU, samples, workload passes."""
    seconds = sum(w["seconds"] for w in windows)
    cpu = sum(w["monitor_cpu_s"] for w in windows)
    out: dict[str, Any] = {
        "seconds": round(seconds, 2),
        "monitor_cpu_s": round(cpu, 2),
        "workload_passes_per_s": round(
            sum(w["workload_passes_per_s"] * w["seconds"] for w in windows) / seconds, 1
        ),
        "rounds": windows,
    }
    if all("samples" in w for w in windows):
        samples = sum(w["samples"] for w in windows)
        out.update(
            samples=samples,
            samples_per_s=round(samples / seconds, 1),
            cpu_ms_per_sample=round(1e3 * cpu / samples, 3),
        )
    return out


async def measure_cpu(scenarios: ModuleType, kernel_damon: ModuleType, workdir: Path) -> Any:
    """damond (no CPU ceiling, as the kernel has none) and the kernel in turns, ROUNDS
    times; then damond under its default ceiling (10 % of a CPU)."""
    wl = scenarios.hotcold_workload(False)
    out: dict[str, Any] = {}
    try:
        await asyncio.sleep(WARMUP_SECONDS)
        w = Window(wl, None)
        await asyncio.sleep(BASELINE_SECONDS)
        out["baseline"] = w.end()

        record: dict[str, Any] = {}
        damond, kernel = [], []
        async with scenarios.running_daemon(workdir, record) as d:
            await scenarios.configure(d, wl.pid, "auto")  # cpu_limit_pct 0
            for _ in range(ROUNDS):
                damond.append(await damond_window(scenarios, d, wl))
                out["resolved_access_check"] = damond[-1]["effective_access_check"]
                kernel.append(await asyncio.to_thread(kernel_window, kernel_damon, wl.pid, wl))
            await d.set(scenarios.C0, "org.damond1.Context", "cpu_limit_pct", "u", 10)
            out["ceiling"] = await damond_window(scenarios, d, wl)
        out["damond"] = totals(damond)
        out["damond"]["threads_cpu_s"] = {
            name: round(sum(w["threads_cpu_s"].get(name, 0.0) for w in damond), 2)
            for name in damond[-1]["threads_cpu_s"]
        }
        out["damond_daemon"] = {k: v for k, v in record.items() if k != "daemon_log_tail"}
        nominal = int(ROUND_SECONDS * 1e6 / scenarios.DEFAULTS.sample_us)
        for window in kernel:
            window["samples"] = nominal
        out["kernel"] = totals(kernel)
        ratios = [
            (d_["monitor_cpu_s"] / d_["samples"]) / (k_["monitor_cpu_s"] / k_["samples"])
            for d_, k_ in zip(damond, kernel, strict=True)
            if k_["monitor_cpu_s"]
        ]
        out["per_sample_ratio_by_round"] = [round(r, 1) for r in ratios]
    finally:
        wl.stop()
    return out


def profiled_daemon(out: str, argv: list[str]) -> int:
    """The daemon (damond.cli.main(argv)) with a cProfile profiler in every thread."""
    import cProfile
    import pstats
    import threading

    profiles: list[cProfile.Profile] = []
    lock = threading.Lock()

    def start_thread_profile(*_: Any) -> None:
        # first profile event of a new thread: hand the thread to its own profiler
        prof = cProfile.Profile()
        with lock:
            profiles.append(prof)
        prof.enable()

    threading.setprofile(start_thread_profile)
    from damond import cli

    main = cProfile.Profile()
    profiles.insert(0, main)
    main.enable()
    try:
        code = cli.main(argv)
    finally:
        main.disable()
        pstats.Stats(*profiles).dump_stats(out)
    return code


WAITING = (
    "<method 'poll' of 'select.epoll' objects>",
    "<built-in method time.sleep>",
    "<method 'acquire' of '_thread.lock' objects>",
    "<method 'acquire' of '_thread.RLock' objects>",
    "<built-in method select.select>",
)
"""Blocking calls: the profiler counts time spent in them, the CPU does not."""

CATEGORIES = [
    ("page_idle C path (its kernel calls included)", ("monitor.ops._page_idle.",)),
    ("page_idle access check (Python)", ("damond/monitor/ops/page_idle.py",)),
    ("kernel files: pread/pwrite/open/read/write", ("<built-in method posix.",)),
    ("regions: sampling, merge, split (Python)", ("damond/monitor/regions.py",)),
    ("engine and kdamond loop (Python)", ("damond/monitor/engine.py", "damond/monitor/kdamond.py")),
    ("target processes, address space", ("damond/monitor/ops/process.py", "ops/vaddr.py")),
    ("numpy", ("numpy",)),
    (
        "D-Bus: adapter, dbus-fast, socket",
        ("damond/bus.py", "damond/busio.py", "dbus_fast", "socket"),
    ),
    ("asyncio, threads", ("asyncio/", "concurrent/", "threading.py", "selectors.py")),
]


def profile_summary(path: str) -> dict[str, Any]:
    """Own time by category and the top functions of a pstats file (blocking calls apart)."""
    import pstats

    stats = pstats.Stats(path)
    raw: dict[Any, Any] = stats.stats  # type: ignore[attr-defined]
    rows = []
    waiting = 0.0
    for (filename, line, func), (_cc, ncalls, tottime, cumtime, _callers) in raw.items():
        where = f"{filename}:{line}({func})" if line else f"{filename}{func}"
        if any(w in where for w in WAITING):
            waiting += tottime
            continue
        rows.append((where, ncalls, tottime, cumtime))
    busy = sum(r[2] for r in rows) or 1.0
    by_category: dict[str, float] = {}
    for where, _n, tottime, _cum in rows:
        name = "other"
        for label, needles in CATEGORIES:
            if any(n in where for n in needles):
                name = label
                break
        by_category[name] = by_category.get(name, 0.0) + tottime
    rows.sort(key=lambda r: -r[2])
    entry_points = {}
    for needle in (
        "(prepare)",
        "(check)",
        "(_aggregate)",
        "(pick_sampling_addrs)",
        "(emit_snapshot)",
        "(_sample)",
    ):
        for where, n, _tt, cum in [r for r in rows if needle in r[0] and "damond" in r[0]][:3]:
            entry_points[where.split("/src/")[-1]] = {"calls": n, "cum_s": round(cum, 3)}
    return {
        "busy_seconds": round(busy, 2),
        "waiting_seconds": round(waiting, 2),
        "by_category": {
            k: round(v / busy, 3) for k, v in sorted(by_category.items(), key=lambda kv: -kv[1])
        },
        "top": [
            {
                "function": w.split("/site-packages/")[-1].split("/src/")[-1],
                "calls": n,
                "own_s": round(t, 3),
                "cum_s": round(c, 3),
            }
            for w, n, t, c in rows[:15]
        ],
        "entry_points": entry_points,
    }


async def measure_profile(scenarios: ModuleType, workdir: Path) -> dict[str, Any]:
    """The daemon under cProfile (all threads) for PROFILE_SECONDS on the same workload."""
    import subprocess

    from damond.tools import client
    from damond.tools.privatebus import start_private_bus, wait_for_name

    wl = scenarios.hotcold_workload(False)
    prof = workdir / "damond.prof"
    bus = start_private_bus()
    conn = None
    process: subprocess.Popen[bytes] | None = None
    try:
        with open(workdir / "damond-profiled.log", "wb") as log:
            process = subprocess.Popen(
                [
                    sys.executable,
                    str(Path(__file__).resolve()),
                    "profiled-daemon",
                    str(prof),
                    "--bus",
                    bus.address,
                    *scenarios.USER_BACKEND_ONLY,
                ],
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                stderr=log,
            )
        conn = await client.connect(bus.address)
        await wait_for_name(conn, scenarios.BUS_NAME, scenarios.DAEMON_START_TIMEOUT)
        d = scenarios.Daemon(bus, process, conn, workdir / "damond-profiled.log")
        await scenarios.configure(d, wl.pid, "auto")
        await scenarios.state(d, "on")
        await asyncio.sleep(WARMUP_SECONDS)
        first = await d.snapshot()
        t0 = time.monotonic()
        cpu0 = cpu_seconds(process.pid)
        await asyncio.sleep(PROFILE_SECONDS)
        last = await d.snapshot()
        seconds = time.monotonic() - t0
        cpu = cpu_seconds(process.pid) - cpu0
        await scenarios.state(d, "off")
        conn.disconnect()
        conn = None
        process.terminate()
        try:
            process.wait(timeout=60)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
            raise RuntimeError("the profiled daemon did not stop on SIGTERM") from None
        samples = (last.seq - first.seq) * last.max_nr_accesses
        summary = profile_summary(str(prof))
        summary.update(
            samples=samples,
            samples_per_s=round(samples / seconds, 1),
            cpu_ms_per_sample_profiled=round(1e3 * cpu / samples, 2) if samples else None,
        )
        return summary
    finally:
        if conn is not None:
            conn.disconnect()
        if process is not None and process.poll() is None:
            process.kill()
            process.wait()
        bus.stop()
        wl.stop()


PARTS = ("cpu", "profile", "accuracy", "kernel")


async def in_guest(out: Path, parts: tuple[str, ...] = PARTS) -> int:
    scenarios, kernel_damon = _guest_modules()
    if not kernel_damon.in_test_guest():
        print("bench/guest.py: not in the damond test guest; refusing to run", file=sys.stderr)
        return 2
    workdir = out.parent
    results: dict[str, Any] = {"guest": scenarios.guest_facts()}
    for name, coro in (
        ("cpu", lambda: measure_cpu(scenarios, kernel_damon, workdir)),
        ("profile", lambda: measure_profile(scenarios, workdir)),
        ("accuracy", lambda: measure_accuracy(scenarios, workdir)),
        ("kernel", lambda: kernel_backend.measure(scenarios, kernel_damon, workdir)),
    ):
        if name not in parts:
            continue
        print(f"bench.guest: {name} …", flush=True)
        t0 = time.monotonic()
        try:
            results[name] = await coro()
        except Exception:
            import traceback

            results[name] = {"error": traceback.format_exc()}
        results[name]["bench_seconds"] = round(time.monotonic() - t0, 1)
        print(f"bench.guest: {name}: {json.dumps(results[name])[:2000]}", flush=True)
        out.write_text(json.dumps(results, indent=1))
    return 0


# ---------------------------------------------------------------------------------------------
# On the host
# ---------------------------------------------------------------------------------------------


def run_in_guest(
    script: Path, args: list[str], report: str, results_dir: Path | None, vcpus: int = 1
) -> dict[str, Any]:
    """Boot the test guest running ``python SCRIPT ARGS`` (the repository's venv) and load
    the JSON report it leaves in /results/REPORT, with where and how long."""
    from tests.vm import run as vm  # the rig's runner (only on the host)

    rdir = Path(results_dir or tempfile.mkdtemp(prefix=f"damond-bench-{script.stem}-"))
    python = REPO / ".venv" / "bin" / "python"
    result = vm.run_in_guest(
        [str(python if python.exists() else sys.executable), str(script), *args],
        timeout=1800,
        vcpus=vcpus,
        memory_mib=1024,
        results_dir=rdir,
        cwd=REPO,
    )
    path = rdir / report
    if not path.exists():
        raise RuntimeError(f"the guest wrote no results: {result.describe()}")
    data: dict[str, Any] = json.loads(path.read_text())
    data["results_dir"] = str(rdir)
    data["guest_run_seconds"] = round(result.seconds, 1)
    return data


def run(results_dir: Path | None = None, parts: tuple[str, ...] = PARTS) -> dict[str, Any]:
    """Boot the test guest once and run every measurement in it (about 5 minutes)."""
    args = ["--in-guest", "/results/bench.json", "--only", ",".join(parts)]
    return run_in_guest(Path(__file__).resolve(), args, "bench.json", results_dir)


def _pct(x: float | None) -> str:
    return "n/a" if x is None else f"{100 * x:.1f}"


def _mean(values: list[float]) -> float | None:
    return sum(values) / len(values) if values else None


PHASES = [
    ("prepare: pagemap + kpageflags reads, bitmap writes", "monitor/engine.py", "(prepare)"),
    ("check: bitmap reads", "monitor/engine.py", "(check)"),
    ("  of which aggregation: merge, split, snapshot", "monitor/engine.py", "(_aggregate)"),
    ("Snapshot signal (event loop)", "hierarchy.py", "(emit_snapshot)"),
]


def _phase_lines(prof: dict[str, Any]) -> list[str]:
    """Cumulative time of the engine's phases, as shares of the busy time."""
    busy = prof.get("busy_seconds") or 0.0
    points = prof.get("entry_points", {})
    lines = ["| phase (cumulative) | calls | share of busy time |", "|---|---:|---:|"]
    for label, module, func in PHASES:
        hit = next((v for k, v in points.items() if module in k and k.endswith(func)), None)
        if hit and busy:
            lines.append(f"| {label} | {hit['calls']} | {100 * hit['cum_s'] / busy:.1f} % |")
    return [*lines, ""] if len(lines) > 2 else []


def _what_dominates(shares: dict[str, float]) -> list[str]:
    """The reading of the profile: what the CPU goes to."""

    def pct(*keys: str) -> str:
        return f"{100 * sum(shares.get(k, 0.0) for k in keys):.0f} %"

    return [
        "What it goes to: the page_idle C path, kernel calls included "
        f"({pct('page_idle C path (its kernel calls included)')}); numpy "
        f"({pct('numpy')}); the engine and the check's Python "
        f"({pct('regions: sampling, merge, split (Python)', 'engine and kdamond loop (Python)', 'page_idle access check (Python)')}); "  # noqa: E501
        f"D-Bus ({pct('D-Bus: adapter, dbus-fast, socket')}). A sample is one C call "
        "per target to prepare and one to check (the Python path made several dozen numpy "
        "calls and a Python loop step per region). What remains is fixed per sample: "
        "under TCG the first instructions after each sleep run about ten times slower "
        "than in a tight loop (the context switch empties the emulated TLB; a numpy "
        "call measured 225 µs right after a 5 ms sleep against 56 µs in a loop), and "
        "the page_idle interface itself needs about four kernel calls per region "
        "(pagemap, kpageflags, a bitmap word written and read back, where the kernel's "
        "DAMON reads and clears the page table entry in place).",
        "",
    ]


def markdown(results: dict[str, Any]) -> str:
    """The docs/benchmarks.md section (from `## ` on) for these results."""
    g = results.get("guest", {})
    cpu, prof, acc = results.get("cpu", {}), results.get("profile", {}), results.get("accuracy", {})
    lines = [
        "## damond vs the kernel's own DAMON (test guest)",
        "",
        f"Both in one boot of the test guest (tests/vm: Linux {g.get('kernel', '?')} with "
        "page_idle and DAMON, QEMU TCG, "
        f"{g.get('cpus', '?')} vCPU; guest Python runs about 15× slower than on the host), "
        "`python -m bench.guest`. The workload is tests/vm/scenarios.py's: one 64 MiB "
        "mapping of 4 KiB pages (MADV_NOHUGEPAGE) between two 64 MiB PROT_NONE guards, "
        "the first half written (one byte per page per pass, a 5 ms pause between "
        "passes), the second never touched. damond "
        "runs with `access_check` auto (resolved: "
        f"{cpu.get('resolved_access_check', '?')}), the kernel with vaddr; both at the "
        "default attributes (5 ms / 100 ms / 60 s, 10..1000 regions). They run one after "
        "the other on the same workload process, never together: kernel DAMON marks the "
        "pages it samples idle and clears their young bits, page_idle clears the same "
        'bits, so each would take the other\'s marks for "not accessed".',
        "",
    ]
    if "error" in cpu:
        lines += ["CPU measurement failed:", "", "```", cpu["error"].strip(), "```", ""]
    elif cpu:
        d, k, b, c = cpu["damond"], cpu["kernel"], cpu["baseline"], cpu["ceiling"]
        ratio = d["monitor_cpu_s"] / k["monitor_cpu_s"] if k["monitor_cpu_s"] else None
        per_sample = d["cpu_ms_per_sample"] / k["cpu_ms_per_sample"]
        nominal = 1e6 / 5000
        threads = ", ".join(f"{t} {s:.2f} s" for t, s in d["threads_cpu_s"].items())
        c_samples = c["samples"] / c["seconds"]
        lines += [
            f"### CPU time: {ROUNDS} rounds of {ROUND_SECONDS:.0f} s each, taken in turns",
            "",
            "damond with `cpu_limit_pct` 0 (the kernel's DAMON has no ceiling), then the "
            "kernel, then damond again, and so on; and once more damond at its default "
            "ceiling of 10 % of a CPU.",
            "",
            "| | no monitor | damond | kernel kdamond | damond, default ceiling |",
            "|---|---:|---:|---:|---:|",
            f"| monitor CPU (utime+stime, s) | | {d['monitor_cpu_s']:.2f} "
            f"| {k['monitor_cpu_s']:.2f} | {c['monitor_cpu_s']:.2f} |",
            f"| monitor CPU (% of the vCPU) | | {100 * d['monitor_cpu_s'] / d['seconds']:.1f} "
            f"| {100 * k['monitor_cpu_s'] / k['seconds']:.1f} "
            f"| {100 * c['monitor_cpu_s'] / c['seconds']:.1f} |",
            f"| samples taken | | {d['samples']} | ≈{k['samples']} (nominal) | {c['samples']} |",
            f"| samples/s (nominal {nominal:.0f}) | | {d['samples_per_s']} "
            f"({100 * d['samples_per_s'] / nominal:.0f} %) | ≈{k['samples_per_s']} "
            f"| {c_samples:.1f} ({100 * c_samples / nominal:.0f} %) |",
            f"| CPU per sample (ms) | | {d['cpu_ms_per_sample']} | {k['cpu_ms_per_sample']} "
            f"| {1e3 * c['monitor_cpu_s'] / c['samples']:.2f} |",
            f"| effective_sample_us / effective_aggr_us (last round) | "
            f"| {d['rounds'][-1]['effective_sample_us']} / {d['rounds'][-1]['effective_aggr_us']} "
            f"| | {c['effective_sample_us']} / {c['effective_aggr_us']} |",
            f"| regions (start, end of the last window) | "
            f"| {d['rounds'][-1]['nr_regions'][0]}, {d['rounds'][-1]['nr_regions'][1]} "
            f"| {k['rounds'][-1]['nr_regions']} (end) "
            f"| {c['nr_regions'][0]}, {c['nr_regions'][1]} |",
            f"| workload passes/s | {b['workload_passes_per_s']} | "
            f"{d['workload_passes_per_s']} | {k['workload_passes_per_s']} "
            f"| {c['workload_passes_per_s']} |",
            "",
            f"Without a ceiling damond used **{ratio:.1f}×** the kdamond thread's CPU time over "
            f"the same {CPU_SECONDS:.0f} s, and **{per_sample:.1f}×** per sample (by round: "
            + ", ".join(f"{r}×" for r in cpu["per_sample_ratio_by_round"])
            + f"; it took {d['samples']} samples where the kernel took about "
            f"{k['samples']}, nominally: its rate is not counted). By thread: {threads} "
            "(main = the event loop and D-Bus; the other is the kdamond worker that samples). "
            f"The kernel's CPU is counted in clock ticks (1/{TICK} s).",
            "",
        ]
    if "error" in prof:
        lines += ["Profile failed:", "", "```", prof["error"].strip(), "```", ""]
    elif prof:
        lines += [
            f"### Where damond's CPU goes (cProfile in every thread, {PROFILE_SECONDS:.0f} s)",
            "",
            "Own time by category, blocking calls (epoll, sleep, locks) left out "
            "(profiling slows Python down, so the shares matter, not the totals; "
            f"{prof['samples']} samples, {prof['samples_per_s']} samples/s under the "
            "profiler):",
            "",
            "| category | share of busy time |",
            "|---|---:|",
            *[f"| {name} | {100 * v:.1f} % |" for name, v in prof["by_category"].items()],
            "",
            *_phase_lines(prof),
            "| top functions by own time | calls | own s | cumulative s |",
            "|---|---:|---:|---:|",
            *[
                f"| `{t['function']}` | {t['calls']} | {t['own_s']} | {t['cum_s']} |"
                for t in prof["top"][:12]
            ],
            "",
            *_what_dominates(prof["by_category"]),
        ]
    if results.get("kernel"):
        lines += kernel_backend.markdown(results["kernel"])
    if "error" in acc:
        lines += ["Accuracy measurement failed:", "", "```", acc["error"].strip(), "```", ""]
    elif acc:
        rows = acc["rows"]
        lines += [
            "### Accuracy: hot/cold classification, damond vs the kernel",
            "",
            "Share of the hot half's bytes in regions with nr_accesses > 0, and of the "
            "cold half's in regions with nr_accesses == 0, the mean of the last 5 "
            "aggregations of 2 s of DAMON time (400 samples; the kernel takes them in "
            "2 s, damond in the time shown). Scenario 2 of tests/vm/test_scenarios.py "
            "requires damond within 10 points of the kernel.",
            "",
            "| run | pages | damond hot % | kernel hot % | damond cold % | kernel cold % "
            "| regions damond / kernel | damond samples in 2 s wall | damond s to 400 samples |",
            "|---|---|---:|---:|---:|---:|---:|---:|---:|",
        ]
        for i, r in enumerate(rows, 1):
            dm, km = r["damond"] or {}, r["kernel"] or {}
            lines.append(
                f"| {i} | {'2 MiB THP' if r['thp'] else '4 KiB'} "
                f"| {_pct(dm.get('hot_accessed_share'))} | {_pct(km.get('hot_accessed_share'))} "
                f"| {_pct(dm.get('cold_idle_share'))} | {_pct(km.get('cold_idle_share'))} "
                f"| {r['damond_regions']} / {r['kernel_regions']} "
                f"| {r['damond_samples_in_2s_wall']} | {r['damond_seconds_to_result']} |"
            )
        small = [r for r in rows if not r["thp"] and r["damond"] and r["kernel"]]
        if small:
            hot = _mean(
                [
                    abs(r["damond"]["hot_accessed_share"] - r["kernel"]["hot_accessed_share"])
                    for r in small
                ]
            )
            cold = _mean(
                [
                    abs(r["damond"]["cold_idle_share"] - r["kernel"]["cold_idle_share"])
                    for r in small
                ]
            )
            lines += [
                "",
                f"Mean |damond − kernel| over the 4 KiB runs: hot {_pct(hot)} points, "
                f"cold {_pct(cold)} points.",
            ]
        lines.append("")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] == "profiled-daemon":
        return profiled_daemon(argv[1], argv[2:])
    parser = argparse.ArgumentParser(
        prog="python -m bench.guest", description=__doc__.split("\n")[0]
    )
    parser.add_argument("--in-guest", type=Path, help="(in the guest) measure, write JSON here")
    parser.add_argument("--json", type=Path, help="(host) also write the raw results here")
    parser.add_argument("--results", type=Path, help="(host) the guest's results directory")
    parser.add_argument(
        "--only", default=",".join(PARTS), help=f"comma-separated parts of {', '.join(PARTS)}"
    )
    args = parser.parse_args(argv)
    parts = tuple(args.only.split(","))
    if unknown := set(parts) - set(PARTS):
        parser.error(f"unknown parts: {', '.join(sorted(unknown))}")
    if args.in_guest:
        return asyncio.run(in_guest(args.in_guest, parts))
    results = run(args.results, parts)
    if args.json:
        args.json.write_text(json.dumps(results, indent=1))
    print(markdown(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
