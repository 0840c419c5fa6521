"""Runs INSIDE the test guest: DAMOS pageout by damond's user backend, by the guest
kernel's own DAMOS, then by damond on its kernel backend, on the same workload in the
same boot.

    python tests/vm/damos.py OUT.json [--throughput-s SECONDS]

Swap is zram (ZRAM_MIB, lz4). The workload is tests/vm/scenarios.py's (64 MiB
of anonymous memory in one mapping, 4 KiB pages, the first half written on
every pass, a 5 ms pause and a TLB flush between passes). Each monitor gets a
fresh workload process and the same scheme: pageout regions with no access
for IDLE_AGGREGATIONS aggregations (2 s at the default 5 ms / 100 ms).
damond runs first (page_idle, the user backend: process_madvise), then the
kernel's DAMON through its sysfs, then damond with `backend kernel` (the
scheme written into the kernel's schemes/, its stats and tried regions read
back over D-Bus), one after the other: each disturbs the others' accessed
bits. Residency is read from the workload's pagemap (present: bit 63,
swapped: bit 62) at every damond snapshot and every 0.2 s under the kernel,
until COLD_DONE of the cold half is swapped or the phase times out.

With --throughput-s (bench/damos.py), each phase then counts the workload's
passes in windows of that long, alternately with the monitor off and on (see
throughput()).

This script only measures and writes OUT.json; tests/vm/test_damos.py decides.
Refuses to run outside the damond test guest (it writes the kernel's DAMON sysfs).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import kernel_damon  # noqa: E402  (tests/vm/kernel_damon.py)
import scenarios as sc  # noqa: E402  (tests/vm/scenarios.py)
from guest_json import outside_guest  # noqa: E402

ZRAM_MIB = 256
IDLE_AGGREGATIONS = 20
"""The scheme's age_min: 2 s without access at 100 ms aggregations."""
COLD_DONE = 0.9
"""A phase stops waiting once this share of the cold half is swapped out."""
DAMOND_TIMEOUT_S = 300.0
"""damond takes its aggregations at guest Python's pace (see scenarios.AGGREGATIONS)."""
KERNEL_TIMEOUT_S = 120.0
POLL_S = 0.2
WINDOWS = 3
"""Pairs of throughput windows (monitor off, then on) per phase."""
PAGE = sc.PAGE
SCHEME = f"{sc.C0}/schemes/0"
STATS = ("nr_tried", "sz_tried", "nr_applied", "sz_applied", "qt_exceeds")
STATS_READ_S = 2.5
"""Long enough for the kernel backend's stats to be read again (once a second, each
read waiting for the kdamond's next sample, in 100 ms steps) and ride on a snapshot."""
TRIED_AGAIN_S = 30.0
"""How long to keep reading tried regions when the application that paged the cold half
out came and went between two reads: GetTriedRegions tells the last application only,
and a reader that lags a snapshot behind (a loaded host) can miss one. The scheme tries
the cold half again once its age, reset by the pageout, is back at age_min."""


def workload(pause_ms: float) -> sc.Workload:
    """scenarios.py's hot/cold workload (4 KiB pages), with this pause between passes."""
    return sc.Workload(
        "--size-mib", "64", "--hot-mib", "32", "--hot-offset-mib", "0", "--pause-ms", str(pause_ms)
    )


def swap_on_zram() -> dict[str, Any]:
    """A ZRAM_MIB swap device on zram0 (busybox's mkswap/swapon where Debian's are missing)."""
    Path("/sys/block/zram0/disksize").write_text(f"{ZRAM_MIB}M\n")
    for tool in ("mkswap", "swapon"):
        command = [tool, "/dev/zram0"]
        if subprocess.run(["which", tool], capture_output=True).returncode:
            command = ["busybox", *command]
        subprocess.run(command, check=True, capture_output=True)
    meminfo = Path("/proc/meminfo").read_text()
    total = next(line.split()[1] for line in meminfo.splitlines() if line.startswith("SwapTotal"))
    return {"zram_mib": ZRAM_MIB, "swap_total_kb": int(total)}


def residency(pid: int, ranges: list[tuple[int, int]]) -> tuple[float, float]:
    """(present share, swapped share) of the pages of ranges, from pagemap."""
    import numpy as np

    present = swapped = total = 0
    with open(f"/proc/{pid}/pagemap", "rb", buffering=0) as f:
        for lo, hi in ranges:
            raw = os.pread(f.fileno(), (hi - lo) // PAGE * 8, lo // PAGE * 8)
            entries = np.frombuffer(raw, dtype=np.uint64)
            present += int(np.count_nonzero(entries >> np.uint64(63)))
            swapped += int(np.count_nonzero((entries >> np.uint64(62)) & np.uint64(1)))
            total += len(entries)
    return present / total, swapped / total


def meminfo_kb(*names: str) -> dict[str, int]:
    """Fields of /proc/meminfo, in kB."""
    fields = dict(line.split(":", 1) for line in Path("/proc/meminfo").read_text().splitlines())
    return {name: int(fields[name].split()[0]) for name in names}


class Watch:
    """The hot half's residency and the cold half's swap-out over a phase."""

    def __init__(self, wl: sc.Workload, record: dict[str, Any]) -> None:
        self.wl = wl
        self.record = record
        record["meminfo_at_on"] = meminfo_kb("MemFree", "SwapFree")  # to diagnose a phase
        self.t0 = time.monotonic()
        self.hot_min = 1.0
        self.trace: list[list[Any]] = []
        record["trace"] = self.trace
        """[seconds since on, seq (damond) or None, hot present, cold swapped]"""

    def look(self, seq: int | None = None) -> bool:
        """Read the residency; True once the cold half is swapped out (COLD_DONE)."""
        hot, _ = residency(self.wl.pid, [self.wl.hot])
        _, cold = residency(self.wl.pid, self.wl.cold())
        seconds = round(time.monotonic() - self.t0, 2)
        self.hot_min = min(self.hot_min, hot)
        self.trace.append([seconds, seq, round(hot, 4), round(cold, 4)])
        self.record.update(
            seconds_to_result=seconds,
            hot_present=round(hot, 4),
            hot_present_min=round(self.hot_min, 4),
            cold_swapped=round(cold, 4),
        )
        return cold >= COLD_DONE


TICK = os.sysconf("SC_CLK_TCK")


def cpu_seconds(pid: int) -> float:
    """utime + stime of a process (a kernel thread too: the kdamond)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / TICK


async def throughput(
    wl: sc.Workload,
    seconds: float,
    off: Callable[[], Awaitable[None]],
    on: Callable[[], Awaitable[tuple[int, ...]]],
) -> dict[str, Any]:
    """The workload's passes per second with the monitor off and on, in WINDOWS pairs of
    windows of seconds (on() turns it on and says its pids, for their CPU meanwhile: on
    damond's kernel backend, damond's and the kernel's kdamond's).

    Pairs on the same process, back to back: the emulated guest's speed drifts
    with the host's load by more than the differences measured (one window of
    an unmonitored workload ran at half the speed of the one before), so only
    neighbours are compared. The ratio is on / off per pair; the median is kept.
    """
    pairs = []
    for _ in range(WINDOWS):
        await off()
        unmonitored = await window(wl, seconds, ())
        monitor = await on()
        monitored = await window(wl, seconds, monitor)
        pairs.append(
            {
                "off": unmonitored["passes_per_s"],
                "on": monitored["passes_per_s"],
                "ratio": round(monitored["passes_per_s"] / unmonitored["passes_per_s"], 4),
                "monitor_cpu_percent": monitored["monitor_cpu_percent"],
            }
        )
    ratios = sorted(p["ratio"] for p in pairs)
    cpus = sorted(p["monitor_cpu_percent"] for p in pairs)
    return {
        "window_seconds": seconds,
        "pairs": pairs,
        "ratio": ratios[len(ratios) // 2],
        "monitor_cpu_percent": cpus[len(cpus) // 2],
    }


async def window(wl: sc.Workload, seconds: float, monitor: tuple[int, ...]) -> dict[str, Any]:
    """The workload's passes per second over seconds, and the monitor's CPU meanwhile."""
    cpu_before = sum(cpu_seconds(pid) for pid in monitor)
    workload_before = cpu_seconds(wl.pid)
    before = wl.command("stats")
    await asyncio.sleep(seconds)
    after = wl.command("stats")
    cpu = sum(cpu_seconds(pid) for pid in monitor) - cpu_before
    workload = cpu_seconds(wl.pid) - workload_before
    elapsed = (after["t_us"] - before["t_us"]) / 1e6
    return {
        "seconds": round(elapsed, 2),
        "passes": after["passes"] - before["passes"],
        "passes_per_s": round((after["passes"] - before["passes"]) / elapsed, 2),
        "monitor_cpu_percent": round(100 * cpu / elapsed, 1),
        "workload_cpu_percent": round(100 * workload / elapsed, 1),
    }


async def damond_phase(
    run: sc.Run,
    throughput_s: float,
    pause_ms: float,
    record: dict[str, Any],
    backend: str = "user",
) -> None:
    """damond's scheme on backend: its own engine (user), or the kernel's DAMOS (kernel)."""
    from damond.tools.client import covered, set_scheme

    wl = workload(pause_ms)
    args = sc.USER_BACKEND_ONLY if backend == "user" else ()
    workdir = run.workdir / backend
    workdir.mkdir(exist_ok=True)
    try:
        async with sc.running_daemon(workdir, record, args) as d:
            await sc.configure(d, wl.pid, run.access_check)
            await d.set(sc.C0, "org.damond1.Context", "backend", "s", backend)
            await d.set(sc.C0, "org.damond1.Schemes", "nr", "u", 1)
            await set_scheme(
                d.client,
                sc.C0,
                0,
                action="pageout",
                nr_accesses_max=0,
                age_min=IDLE_AGGREGATIONS,
            )
            queue = await d.snapshots()
            await sc.state(d, "on")
            watch = Watch(wl, record)
            record.update(await d.access_check_facts())
            tried_all: list[tuple[int, int, int, int, int]] = []
            while time.monotonic() - watch.t0 < DAMOND_TIMEOUT_S:
                msg = await asyncio.wait_for(queue.get(), sc.SNAPSHOT_TIMEOUT_S)
                tried_all += await tried_so_far(d)
                if watch.look(int(msg.body[0])):
                    break
            lo, hi = wl.cold()[0]
            until = time.monotonic() + TRIED_AGAIN_S
            while covered(_ranges(tried_all), lo, hi) < COLD_DONE * (hi - lo):
                if time.monotonic() > until:
                    break
                await asyncio.wait_for(queue.get(), sc.SNAPSHOT_TIMEOUT_S)
                tried_all += await tried_so_far(d)
            tried = _ranges(tried_all)
            record["aggregations"] = watch.trace[-1][1] if watch.trace else 0
            await stats_as_they_stand(d, queue)
            record["stats"] = {n: await d.get(SCHEME, "org.damond1.SchemeStats", n) for n in STATS}
            record["tried_regions"] = sorted(set(tried_all))
            record["effective_backend"] = await d.get(
                sc.C0, "org.damond1.Context", "effective_backend"
            )
            record["cold_tried_share"] = round(covered(tried, lo, hi) / (hi - lo), 4)
            record["cold_bytes"] = hi - lo
            record["cold_range"] = [lo, hi]
            if throughput_s:

                async def off() -> None:
                    await sc.state(d, "off")

                async def on() -> tuple[int, ...]:
                    await sc.state(d, "on")
                    if backend == "user":
                        return (d.process.pid,)
                    kdamond = await d.get(sc.K0, "org.damond1.Kdamond", "pid")
                    return d.process.pid, kdamond

                record["throughput"] = await throughput(wl, throughput_s, off, on)
            await sc.state(d, "off")
    finally:
        wl.stop()


def _ranges(tried: list[tuple[int, int, int, int, int]]) -> list[tuple[int, int]]:
    """(start, end) of each tried region."""
    return [(r[1], r[2]) for r in tried]


async def stats_as_they_stand(d: sc.Daemon, queue: asyncio.Queue[Any]) -> None:
    """Wait until the stats seen over D-Bus include what the residency showed: damond's
    engine counts them as it acts; the kernel backend reads the kernel's at most once a
    second (STATS_READ_S), and they ride on the snapshots that follow."""
    until = time.monotonic() + STATS_READ_S
    while time.monotonic() < until:
        await asyncio.wait_for(queue.get(), sc.SNAPSHOT_TIMEOUT_S)


async def tried_so_far(d: sc.Daemon) -> list[tuple[int, int, int, int, int]]:
    """GetTriedRegions; none before the scheme's first application (NoData)."""
    from dbus_fast import DBusError

    from damond.tools.client import tried_regions

    try:
        return await tried_regions(d.client, SCHEME)
    except DBusError as e:
        if e.type != "org.damond1.Error.NoData":
            raise
        return []


async def kernel_phase(throughput_s: float, pause_ms: float, record: dict[str, Any]) -> None:
    wl = workload(pause_ms)
    try:
        with kernel_damon.KernelDamon() as k:
            k.setup("vaddr", pids=[wl.pid])
            k.set_scheme(
                "pageout", nr_accesses=(0, 0), age=(IDLE_AGGREGATIONS, kernel_damon.UINT_MAX)
            )
            k.on()
            watch = Watch(wl, record)
            record["kdamond_pid"] = k.pid()
            while time.monotonic() - watch.t0 < KERNEL_TIMEOUT_S and not watch.look():
                await asyncio.sleep(POLL_S)
            record["stats"] = k.scheme_stats()
            lo, hi = wl.cold()[0]
            record["cold_bytes"] = hi - lo
            if throughput_s:

                async def off() -> None:
                    k.off()

                async def on() -> tuple[int, ...]:
                    k.on()
                    return (k.pid(),)

                record["throughput"] = await throughput(wl, throughput_s, off, on)
    finally:
        wl.stop()


async def scenario(run: sc.Run, throughput_s: float, pause_ms: float) -> None:
    run.result["swap"] = swap_on_zram()
    run.result["workload_pause_ms"] = pause_ms
    run.save()
    await run.phase("damond", lambda r: damond_phase(run, throughput_s, pause_ms, r))
    await run.phase("kernel", lambda r: kernel_phase(throughput_s, pause_ms, r))
    kernel_damon.mount_tracefs()  # where the kernel backend reads the kernel's results
    await run.phase(
        "damond_kernel",
        lambda r: damond_phase(run, throughput_s, pause_ms, r, backend="kernel"),
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="damos.py")
    parser.add_argument("out", type=Path)
    parser.add_argument("--throughput-s", type=float, default=0.0)
    parser.add_argument(
        "--pause-ms",
        type=float,
        default=sc.WORKLOAD_PAUSE_MS,
        help="the workload's pause between passes (0: as fast as it can)",
    )
    args = parser.parse_args(argv)
    if outside_guest("damos.py"):
        return 2
    run = sc.Run(args.out, "auto")
    run.result.update(scenario="damos", guest=sc.guest_facts())
    sc.execute(run, scenario(run, args.throughput_s, args.pause_ms))
    return 0


if __name__ == "__main__":
    sys.exit(main())
