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
  damond's tree unchanged, and name the kernel's errno;
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
                try:
                    report[name] = await check(workdir, sleeper.pid)
                except Exception:
                    report[name] = {"error": traceback.format_exc()}
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
