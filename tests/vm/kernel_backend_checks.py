"""Runs INSIDE the test guest (test_guest_kernel_backend.py): the claim on the kernel's DAMON.

Usage (in the guest): python kernel_backend_checks.py OUTPUT.json

Each check starts the real daemon (python -m damond on a private bus, the
guest kernel's real admin tree at /sys/kernel/mm/damon/admin, tracefs at
/sys/kernel/tracing), drives it over D-Bus and looks at the kernel's tree
itself; it records what it saw (or its traceback) for the host-side test:

- in_use: another tool (tests/vm/kernel_damon.py) has configured the tree
  and runs a kdamond there; damond must leave every file of it as it was,
  not offer the kernel backend (saying why), and fall back for `auto`;
- recovery: a damond that ran a kernel-backed kdamond is SIGKILLed; the next
  one finds its record, turns the left-over kdamond off, runs contexts on the
  kernel again, and on a clean exit writes nr_kdamonds back to 0;
- refusals: kernel writes made to fail (DAMOND_FAULT_SYSFS: the kernel
  refuses little of what damond's rules allow) leave the kernel's tree off,
  damond's tree unchanged, and name the kernel's errno; a scheme's file
  among them;
- schemes: a scheme with every file set lands in the kernel's schemes/ tree
  file for file, a commit carries changes there and into the running
  kdamond (a stat scheme that matched nothing starts trying regions, which
  come back over D-Bus), the effective quota is read back, and a scheme the
  kernel cannot do (an anon filter on vaddr) is refused at `on` before
  anything is written;
- commit_reuse: a commit names a new target, which dies and whose pid goes to
  another process before the kernel takes the commit (at its next
  aggregation): damond pinned the pid when it accepted the commit, so the
  newcomer is never monitored; the kdamond turns off saying why.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import kernel_damon  # tests/vm/kernel_damon.py
import scenarios  # tests/vm/scenarios.py
from dbus_fast import DBusError
from guest_json import outside_guest, write_report  # tests/vm/guest_json.py

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from pidreuse import PidGiver, Reused  # noqa: E402  (tests/pidreuse.py)

from damond.monitor.ops.damon_claim import RECORD, RUN_DIR

ADMIN = "/sys/kernel/mm/damon/admin"
INSTANCE = "/sys/kernel/tracing/instances/damond"
ROOT, K0, C0, T0 = scenarios.ROOT, scenarios.K0, scenarios.C0, scenarios.T0


def tree() -> dict[str, str]:
    """Every file of the kernel's kdamonds, read (the tree as another tool left it)."""
    files = {}
    for directory, _, names in os.walk(f"{ADMIN}/kdamonds"):
        for name in names:
            with open(f"{directory}/{name}") as f:
                files[f"{directory}/{name}".removeprefix(ADMIN + "/")] = f.read().strip()
    return files


def nr_kdamonds() -> int:
    with open(f"{ADMIN}/kdamonds/nr_kdamonds") as f:
        return int(f.read())


def states() -> list[str]:
    out = []
    for k in range(nr_kdamonds()):
        with open(f"{ADMIN}/kdamonds/{k}/state") as f:
            out.append(f.read().strip())
    return out


async def try_set(
    d: scenarios.Daemon, path: str, iface: str, name: str, sig: str, value: Any
) -> Any:
    """None when the write succeeded, else [error name, message]."""
    try:
        await d.set(path, iface, name, sig, value)
    except DBusError as e:
        return [e.type, e.text]
    return None


async def context(d: scenarios.Daemon, pid: int, backend: str) -> None:
    await scenarios.configure(d, pid, "auto")
    await d.set(C0, "org.damond1.Context", "backend", "s", backend)


async def on_and_first_snapshot(d: scenarios.Daemon) -> int:
    """Turn kdamond 0 on; the seq of the first Snapshot signal it sends."""
    queue = await d.snapshots()
    await scenarios.state(d, "on")
    message = await asyncio.wait_for(queue.get(), scenarios.SNAPSHOT_TIMEOUT_S)
    return int(message.body[0])


async def managed_objects(d: scenarios.Daemon) -> Any:
    from damond.tools import client

    (objects,) = await client.call(
        d.client, ROOT, "org.freedesktop.DBus.ObjectManager", "GetManagedObjects"
    )
    return {
        path: {i: {k: v.value for k, v in props.items()} for i, props in ifaces.items()}
        for path, ifaces in objects.items()
    }


async def check_in_use(workdir: Path, sleeper: int) -> dict[str, Any]:
    out: dict[str, Any] = {}
    with kernel_damon.KernelDamon() as other:  # another tool's kdamond, running
        other.setup("vaddr", pids=[sleeper])
        other.on()
        out["other_pid"] = other.pid()
        before = tree()
        record: dict[str, Any] = {}
        async with scenarios.running_daemon(workdir, record, args=()) as d:
            await d.set(ROOT, "org.damond1.Kdamonds", "nr", "u", 1)
            await d.set(K0, "org.damond1.Contexts", "nr", "u", 1)
            out["avail_backends"] = list(await d.get(C0, "org.damond1.Context", "avail_backends"))
            out["kernel_refused"] = await try_set(
                d, C0, "org.damond1.Context", "backend", "s", "kernel"
            )
            await context(d, sleeper, "auto")
            out["snapshot_seq"] = await on_and_first_snapshot(d)
            out["effective_backend"] = await d.get(C0, "org.damond1.Context", "effective_backend")
            await scenarios.state(d, "off")
            log = d.log()
        out["daemon_exit_code"] = record.get("daemon_exit_code")
        out["tree_unchanged"] = tree() == before
        out["changed_files"] = sorted(k for k, v in tree().items() if before.get(k) != v)
        out["other_still_on"] = other.state() == "on" and other.pid() == out["other_pid"]
    out["log_says_why"] = "kdamonds/nr_kdamonds is 1" in log
    out["record_made"] = os.path.exists(f"{RUN_DIR}/{RECORD}")
    out["traceback"] = "Traceback" in log
    return out


async def check_recovery(workdir: Path, sleeper: int) -> dict[str, Any]:
    out: dict[str, Any] = {"nr_before": nr_kdamonds()}
    for name in ("first", "second"):
        (workdir / name).mkdir()
    first = await scenarios.Daemon.start(workdir / "first", ())
    try:
        out["avail_backends"] = []
        await context(first, sleeper, "kernel")
        out["avail_backends"] = list(await first.get(C0, "org.damond1.Context", "avail_backends"))
        await scenarios.state(first, "on")
        kpid = await first.get(K0, "org.damond1.Kdamond", "pid")
        with open(f"/proc/{kpid}/comm") as f:
            out["pid_is_a_kdamond"] = f.read().startswith("kdamond.")
        out["nr_while_claimed"] = nr_kdamonds()
        out["record_while_claimed"] = json.loads(Path(RUN_DIR, RECORD).read_text())
        first.process.send_signal(signal.SIGKILL)
        first.process.wait()
        out["states_after_kill"] = states()
        out["record_after_kill"] = os.path.exists(f"{RUN_DIR}/{RECORD}")
    finally:
        await first.stop()
    record: dict[str, Any] = {}
    async with scenarios.running_daemon(workdir / "second", record, args=()) as second:
        out["states_once_recovered"] = states()
        await context(second, sleeper, "kernel")
        out["second_snapshot_seq"] = await on_and_first_snapshot(second)
        out["second_effective_backend"] = await second.get(
            C0, "org.damond1.Context", "effective_backend"
        )
        log = second.log()
    out["recovered_in_log"] = "recovered the kernel DAMON pool" in log
    out["second_exit_code"] = record.get("daemon_exit_code")
    out["nr_after_clean_exit"] = nr_kdamonds()
    out["record_after_clean_exit"] = os.path.exists(f"{RUN_DIR}/{RECORD}")
    out["instance_after_clean_exit"] = os.path.exists(INSTANCE)
    out["traceback"] = "Traceback" in log
    return out


REFUSALS = {
    "state on": ("kdamonds/*/state:on:EBUSY", "EBUSY"),
    "targets nr": ("kdamonds/*/contexts/0/targets/nr_targets:*:ENOMEM", "ENOMEM"),
    "sample_us": ("kdamonds/*/contexts/0/monitoring_attrs/intervals/sample_us:*:EINVAL", "EINVAL"),
    "scheme file": ("kdamonds/*/contexts/0/schemes/0/access_pattern/age/min:*:ERANGE", "ERANGE"),
}


async def check_refusals(workdir: Path, sleeper: int) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for name, (fault, errno_name) in REFUSALS.items():
        os.environ["DAMOND_FAULT_SYSFS"] = fault
        record: dict[str, Any] = {}
        try:
            workdir_of = workdir / name.replace(" ", "-")
            workdir_of.mkdir()
            async with scenarios.running_daemon(workdir_of, record, args=()) as d:
                await context(d, sleeper, "kernel")
                if "schemes" in fault:
                    await d.set(C0, "org.damond1.Schemes", "nr", "u", 1)
                before = await managed_objects(d)
                refused = await try_set(d, K0, "org.damond1.Kdamond", "state", "s", "on")
                out[name] = {
                    "errno": errno_name,
                    "refused": refused,
                    "unchanged": await managed_objects(d) == before,
                    "kernel_states": states(),
                }
                log = d.log()
        finally:
            del os.environ["DAMOND_FAULT_SYSFS"]
        out[name]["exit_code"] = record.get("daemon_exit_code")
        out[name]["traceback"] = "Traceback" in log
    return out


MiB = 1 << 20
SCHEME = {  # every file of a scheme, none at damond's default
    "action": "cold",
    "apply_interval_us": 200_000,
    "sz_min": 8192,
    "sz_max": 1 << 30,
    "nr_accesses_min": 1,
    "nr_accesses_max": 15,
    "age_min": 3,
    "age_max": 1000,
    "ms": 0,
    "bytes": 16 * MiB,
    "reset_interval_ms": 500,
    "weight_sz": 1,
    "weight_nr_accesses": 2,
    "weight_age": 3,
    "metric": "free_mem_rate",
    "interval_us": 100_000,
    "high": 1000,
    "mid": 900,
    "low": 0,
}
FILTERS = (
    {"type": "addr", "matching": True, "addr_start": 4096, "addr_end": 1 << 40},
    {"type": "target", "matching": False, "target_idx": 0},
)
KERNEL_FILES = {  # where the kernel's sysfs keeps each, as it shows it
    "action": "cold",
    "apply_interval_us": "200000",
    "access_pattern/sz/min": "8192",
    "access_pattern/sz/max": str(1 << 30),
    "access_pattern/nr_accesses/min": "1",
    "access_pattern/nr_accesses/max": "15",
    "access_pattern/age/min": "3",
    "access_pattern/age/max": "1000",
    "quotas/ms": "0",
    "quotas/bytes": str(16 * MiB),
    "quotas/reset_interval_ms": "500",
    "quotas/weights/sz_permil": "1",
    "quotas/weights/nr_accesses_permil": "2",
    "quotas/weights/age_permil": "3",
    "watermarks/metric": "free_mem_rate",
    "watermarks/interval_us": "100000",
    "watermarks/high": "1000",
    "watermarks/mid": "900",
    "watermarks/low": "0",
    "filters/nr_filters": "2",
    "filters/0/type": "addr",
    "filters/0/matching": "Y",
    "filters/0/addr_start": "4096",
    "filters/0/addr_end": str(1 << 40),
    "filters/1/type": "target",
    "filters/1/matching": "N",
    "filters/1/damon_target_idx": "0",
}
MATCH_NOTHING = 1 << 50
"""A stat scheme's sz_min no region reaches."""
COMMITTED = (  # files changed while on, then committed
    (f"{C0}/schemes/0", "org.damond1.Scheme", "action", "s", "pageout"),
    (f"{C0}/schemes/0", "org.damond1.AccessPattern", "age_min", "u", 5),
    (f"{C0}/schemes/0", "org.damond1.AccessPattern", "sz_min", "t", 4096),
    (f"{C0}/schemes/0/filters/0", "org.damond1.Filter", "addr_end", "t", 1 << 41),
    (f"{C0}/schemes/1", "org.damond1.AccessPattern", "sz_min", "t", 0),  # match all
)
KERNEL_FILES_COMMITTED = {
    **KERNEL_FILES,
    "action": "pageout",
    "access_pattern/age/min": "5",
    "access_pattern/sz/min": "4096",
    "filters/0/addr_end": str(1 << 41),
}


def kernel_scheme(index: int) -> dict[str, str]:
    """The kernel's files (of KERNEL_FILES, those that exist) of scheme index of the
    kdamond that runs (damond's, on)."""
    running = [k for k, state in enumerate(states()) if state == "on"]
    assert len(running) == 1, states()
    base = Path(f"{ADMIN}/kdamonds/{running[0]}/contexts/0/schemes/{index}")
    return {n: (base / n).read_text().strip() for n in KERNEL_FILES if (base / n).exists()}


async def snapshots_until(
    d: scenarios.Daemon, queue: Any, done: Callable[[], Awaitable[bool]], most: int = 100
) -> int:
    """Wait for snapshots until done() says so; how many it took (most: give up)."""
    for n in range(1, most + 1):
        await asyncio.wait_for(queue.get(), scenarios.SNAPSHOT_TIMEOUT_S)
        if await done():
            return n
    return -1


async def tried_is_every_region(d: scenarios.Daemon, scheme: str) -> bool | None:
    """A match-all stat scheme's tried regions are the regions of the snapshot they came
    with (compared when no snapshot came between the two reads; None if one always did)."""
    from damond.tools.client import tried_regions

    for _ in range(20):
        first = await d.snapshot()
        tried = await tried_regions(d.client, scheme)
        if (await d.snapshot()).seq == first.seq:
            regions = [(0, r[0], r[1]) for r in first.regions]
            return [(t, s, e) for t, s, e, _, _ in tried] == regions
    return None


async def check_schemes(workdir: Path, sleeper: int) -> dict[str, Any]:
    from damond.tools.client import set_scheme, tried_regions

    out: dict[str, Any] = {}
    s0, s1 = f"{C0}/schemes/0", f"{C0}/schemes/1"
    record: dict[str, Any] = {}
    async with scenarios.running_daemon(workdir, record, args=()) as d:
        await context(d, sleeper, "auto")
        await d.set(C0, "org.damond1.Schemes", "nr", "u", 2)
        # auto takes an anon filter (damond's engine honours it); the kernel's vaddr does
        # not: `on` on the kernel refuses it before writing anything there
        await set_scheme(d.client, C0, 1, ({"type": "anon"},), sz_min=MATCH_NOTHING)
        await d.set(C0, "org.damond1.Context", "backend", "s", "kernel")
        before, kernel_before = await managed_objects(d), tree()
        out["anon_refused"] = await try_set(d, K0, "org.damond1.Kdamond", "state", "s", "on")
        out["anon_unchanged"] = await managed_objects(d) == before and tree() == kernel_before
        await set_scheme(d.client, C0, 1, sz_min=MATCH_NOTHING)  # no filter

        await set_scheme(d.client, C0, 0, FILTERS, **SCHEME)
        queue = await d.snapshots()
        await scenarios.state(d, "on")
        out["effective_backend"] = await d.get(C0, "org.damond1.Context", "effective_backend")
        out["files_on"] = kernel_scheme(0)
        out["stat_match_nothing"] = kernel_scheme(1)["access_pattern/sz/min"]

        async def effective_bytes() -> bool:
            return await d.get(s0, "org.damond1.Quotas", "effective_bytes") == 16 * MiB

        out["effective_bytes_after"] = await snapshots_until(d, queue, effective_bytes)
        out["tried_before_commit"] = await tried_regions(d.client, s1)
        out["nr_tried_before_commit"] = await d.get(s1, "org.damond1.SchemeStats", "nr_tried")

        # a commit: new values in the kernel's files, and in the kdamond that runs
        for path, iface, name, sig, value in COMMITTED:
            await d.set(path, iface, name, sig, value)
        await scenarios.state(d, "commit")

        async def tried_all() -> bool:
            return bool(await tried_regions(d.client, s1))

        out["tried_after"] = await snapshots_until(d, queue, tried_all)
        out["tried_is_every_region"] = await tried_is_every_region(d, s1)

        async def nr_tried() -> bool:
            return await d.get(s1, "org.damond1.SchemeStats", "nr_tried") > 0

        out["nr_tried_after"] = await snapshots_until(d, queue, nr_tried)
        out["files_committed"] = kernel_scheme(0)
        await scenarios.state(d, "off")
        log = d.log()
    out["exit_code"] = record.get("daemon_exit_code")
    out["traceback"] = "Traceback" in log
    return out


AGGR_US = 2_000_000
"""commit_reuse's aggregation: room to kill a target and reuse its pid before the kernel
takes the commit (at the end of the aggregation under way)."""


async def check_commit_reuse(workdir: Path, sleeper: int) -> dict[str, Any]:
    out: dict[str, Any] = {}
    a = subprocess.Popen(["sleep", "600"])
    giver = PidGiver()  # ahead: b must come right after a's death
    b: Reused | None = None
    record: dict[str, Any] = {}
    try:
        async with scenarios.running_daemon(workdir, record, args=()) as d:
            await context(d, sleeper, "kernel")
            await d.set(C0, "org.damond1.Intervals", "sample_us", "t", 100_000)
            await d.set(C0, "org.damond1.Intervals", "aggr_us", "t", AGGR_US)
            snapshots = await d.snapshots()
            await scenarios.state(d, "on")
            await asyncio.wait_for(snapshots.get(), scenarios.SNAPSHOT_TIMEOUT_S)
            # just after an aggregation: the kernel takes the commit at the next one
            await d.set(T0, "org.damond1.Target", "pid", "i", a.pid)
            await scenarios.state(d, "commit")
            pid = a.pid
            b = giver.give(a)
            out["reused"] = b.pid == pid
            out["before_effect"] = snapshots.empty()  # no aggregation ended since the commit
            # until the kdamond turns off, or three aggregations ended after the commit
            got: list[Any] = []
            state = "on"
            deadline = time.monotonic() + 4 * AGGR_US / 1e6 + 10
            while state == "on" and len(got) < 3 and time.monotonic() < deadline:
                await asyncio.sleep(0.1)
                while not snapshots.empty():
                    got.append(snapshots.get_nowait().body)
                state = await d.get(K0, "org.damond1.Kdamond", "state")
            out["state_after"] = state
            out["snapshots_after"] = [body[0] for body in got]
            out["snapshots_naming_b"] = [
                body[0] for body in got if any(t[1] == pid and t[2] for t in body[3])
            ]
            out["b_alive"] = b.alive()
            log = d.log()
        out["reason_in_log"] = "exited between the commit and the kernel taking it" in log
        out["traceback"] = "Traceback" in log
        out["exit_code"] = record.get("daemon_exit_code")
        out["nr_after_exit"] = nr_kdamonds()
    finally:
        giver.close()
        if b is not None:
            b.kill()
        if a.poll() is None:
            a.kill()
            a.wait()
    return out


CHECKS: dict[str, Callable[[Path, int], Awaitable[dict[str, Any]]]] = {
    "in_use": check_in_use,
    "recovery": check_recovery,
    "refusals": check_refusals,
    "schemes": check_schemes,
    "commit_reuse": check_commit_reuse,
}


async def run_all() -> dict[str, Any]:
    kernel_damon.mount_tracefs()
    report: dict[str, Any] = {}
    sleeper = subprocess.Popen(["sleep", "600"])
    try:
        with tempfile.TemporaryDirectory() as tmp:
            for name, check in CHECKS.items():
                workdir = Path(tmp) / name
                workdir.mkdir()
                began = time.monotonic()
                try:
                    report[name] = await check(workdir, sleeper.pid)
                except Exception:
                    report[name] = {"error": traceback.format_exc()}
                report[name]["seconds"] = round(time.monotonic() - began, 1)
                print(f"kernel_backend_checks: {name}: {json.dumps(report[name])}", flush=True)
    finally:
        sleeper.kill()
        sleeper.wait()
    return report


def main() -> int:
    if outside_guest("kernel_backend_checks.py"):
        return 2
    write_report(sys.argv[1], asyncio.run(run_all()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
