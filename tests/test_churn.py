"""Target churn: short-lived targets, forks, exec, commits swapping targets, pid reuse.

The pid-reuse test runs the daemon inside a new PID namespace (unshare --pid
--fork --mount-proc), where /proc/sys/kernel/ns_last_pid may be set to give a
dead target's pid to a new process; the host's pid allocation is untouched.
Run as a script (`python tests/test_churn.py reuse ADDRESS`), this file is the
program that runs inside that namespace.
"""

from __future__ import annotations

import asyncio
import json
import os
import random
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
from conftest import ROOT, Damond, stop_process
from pidreuse import PidGiver, Reused  # tests/pidreuse.py

from damond.tools.client import ATTRIBUTE_HOMES

K0 = f"{ROOT}/kdamonds/0"
C0 = f"{K0}/contexts/0"
INVALID = "org.damond1.Error.InvalidArgument"


def fds(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


async def configure(d: Damond, pids: list[int], **attrs: int) -> None:
    await d.set(ROOT, "org.damond1.Kdamonds", "nr", "u", 1)
    await d.set(K0, "org.damond1.Contexts", "nr", "u", 1)
    await d.set(C0, "org.damond1.Targets", "nr", "u", len(pids))
    for i, pid in enumerate(pids):
        await d.set(f"{C0}/targets/{i}", "org.damond1.Target", "pid", "i", pid)
    for name, value in attrs.items():
        iface, signature = ATTRIBUTE_HOMES.get(name, ("org.damond1.Intervals", "t"))
        await d.set(C0, iface, name, signature, value)


async def test_fifty_short_lived_targets(damond: Damond) -> None:
    """50 targets exiting one after the other: each leaves the snapshots for good, the
    kdamond turns itself off after the last, and the daemon keeps no fd of theirs."""
    before_fds = fds(damond.process.pid)
    rng = random.Random(50)
    lifetimes = sorted(rng.uniform(0.3, 2.5) for _ in range(50))
    procs = [subprocess.Popen(["sleep", f"{t:.2f}"]) for t in lifetimes]
    try:
        snapshots = await damond.signals(
            path=C0, interface="org.damond1.Context", member="Snapshot"
        )
        changes = await damond.signals(
            path=K0, interface="org.freedesktop.DBus.Properties", member="PropertiesChanged"
        )
        await configure(  # no CPU ceiling: 50 targets' samples are many per aggregation
            damond, [p.pid for p in procs], sample_us=5000, aggr_us=25000, min=3, cpu_limit_pct=0
        )
        await damond.set(K0, "org.damond1.Kdamond", "state", "s", "on")
        seen: list[set[int]] = []
        while True:
            msg = await changes.next(timeout=15)
            if msg.body[0] == "org.damond1.Kdamond" and msg.body[1]["state"].value == "off":
                break
        seen = [{t[1] for t in m.body[3]} for m in snapshots.drain()]
    finally:
        for p in procs:
            stop_process(p)
    pids = {p.pid for p in procs}
    assert len(seen) >= 20, len(seen)
    assert all(s <= pids for s in seen)
    for earlier, later in zip(seen, seen[1:], strict=False):
        assert later <= earlier, f"a target came back: {later - earlier}"
    assert len(seen[0]) > 40 and len(seen[-1]) <= 5, (len(seen[0]), len(seen[-1]))
    assert "every target has exited" in damond.stderr()
    assert await damond.get(K0, "org.damond1.Kdamond", "state") == "off"
    assert fds(damond.process.pid) <= before_fds + 2  # pidfds and proc files released


async def test_commits_swapping_50_targets_keep_the_fds_bounded(
    damond: Damond, sleeper: subprocess.Popen[bytes]
) -> None:
    """A long-running kdamond whose targets are replaced by commit as they exit: one
    anchor target lives throughout, 4 slots churn through 50 processes. Snapshots only
    name targets that are configured, and the daemon does not pile up fds."""
    slots = 4
    procs = [subprocess.Popen(["sleep", "0.4"]) for _ in range(slots)]
    started = len(procs)
    await configure(  # no CPU ceiling: the churn is counted in aggregations (> 50)
        damond, [sleeper.pid] + [p.pid for p in procs], aggr_us=20000, min=3, cpu_limit_pct=0
    )
    snapshots = await damond.signals(path=C0, interface="org.damond1.Context", member="Snapshot")
    await damond.set(K0, "org.damond1.Kdamond", "state", "s", "on")
    configured: set[int] = {sleeper.pid} | {p.pid for p in procs}
    ever: set[int] = set(configured)
    baseline = fds(damond.process.pid)
    peak = baseline
    refused = 0
    try:
        while started < 50:
            await asyncio.sleep(0.05)
            replaced = False
            for i, p in enumerate(procs):
                if p.poll() is not None and started < 50:
                    new = subprocess.Popen(["sleep", "0.4"])
                    started += 1
                    procs[i] = new
                    ever.add(new.pid)
                    replaced = True
                    await damond.set(
                        f"{C0}/targets/{i + 1}", "org.damond1.Target", "pid", "i", new.pid
                    )
            if replaced:
                # refused (as the kernel would) when another slot's process exited since
                # the loop looked: the next round replaces that one and commits again
                reply = await damond.try_set(K0, "org.damond1.Kdamond", "state", "s", "commit")
                assert reply.error_name in (None, INVALID), reply.body
                if reply.error_name:
                    assert "is not a live process" in reply.body[0], reply.body
                    refused += 1
            peak = max(peak, fds(damond.process.pid))
        assert await damond.get(K0, "org.damond1.Kdamond", "state") == "on"
        bodies = [m.body for m in snapshots.drain()]
        assert len(bodies) > 50
        for body in bodies:
            pids = {t[1] for t in body[3]}
            assert sleeper.pid in pids  # the anchor is never lost
            assert pids <= ever
        # 5 live targets hold ~4 fds each (pidfd, /proc dir, smaps, clear_refs), and
        # replaced ones until the aggregation after the commit: ~40 at most. Without
        # releasing replaced targets, each of the 50 processes would keep its 4.
        assert peak - baseline < 60, (baseline, peak)
        assert refused < 25, refused
    finally:
        await damond.set(K0, "org.damond1.Kdamond", "state", "s", "off")
        for p in procs:
            stop_process(p)


TARGET_THAT_FORKS_AND_EXECS = """
import os, sys, time
buf = bytearray(8 << 20)
children = []
for i in range(5):
    pid = os.fork()
    if pid == 0:
        mine = bytearray(4 << 20)
        for j in range(0, len(mine), 4096):
            mine[j] = 1
        time.sleep(0.1 * (i + 1))
        os._exit(0)
    children.append(pid)
print(" ".join(map(str, children)), flush=True)
for pid in children:
    os.waitpid(pid, 0)
for _ in range(20):
    for j in range(0, len(buf), 4096):
        buf[j] = (buf[j] + 1) % 256
    time.sleep(0.02)
print("exec", flush=True)
os.execvp("sleep", ["sleep", "600"])
"""


def user_extent(pid: int) -> tuple[int, int]:
    starts, ends = [], []
    with open(f"/proc/{pid}/maps") as f:
        for line in f:
            lo, hi = (int(x, 16) for x in line.split()[0].split("-"))
            if lo < 1 << 63:
                starts.append(lo)
                ends.append(hi)
    return min(starts), max(ends)


async def test_forked_children_and_exec(damond: Damond) -> None:
    """The target forks children (never monitored) and then execs: the kdamond stays on
    across both, keeps its pid, and fits its regions to the new address space."""
    target = subprocess.Popen(
        [sys.executable, "-c", TARGET_THAT_FORKS_AND_EXECS], stdout=subprocess.PIPE, text=True
    )
    try:
        assert target.stdout is not None
        children = {int(x) for x in target.stdout.readline().split()}
        snapshots = await damond.signals(
            path=C0, interface="org.damond1.Context", member="Snapshot"
        )
        await configure(damond, [target.pid], aggr_us=20000, update_us=100000)
        await damond.set(K0, "org.damond1.Kdamond", "state", "s", "on")
        assert await asyncio.to_thread(target.stdout.readline) == "exec\n"
        exec_at = time.time()
        # two update intervals after the exec, regions lie in sleep's address space
        while True:
            body = (await snapshots.next(timeout=10)).body
            assert [t[1] for t in body[3]] == [target.pid]
            assert not children & {t[1] for t in body[3]}
            if body[1] / 1e6 > exec_at + 0.3:
                break
        lo, hi = user_extent(target.pid)
        regions = body[3][0][2]
        assert regions[0][0] >= lo - 4096 and regions[-1][1] <= hi + 4096, (
            hex(regions[0][0]),
            hex(regions[-1][1]),
            hex(lo),
            hex(hi),
        )
        assert await damond.get(K0, "org.damond1.Kdamond", "state") == "on"
        await damond.set(K0, "org.damond1.Kdamond", "state", "s", "off")
    finally:
        stop_process(target)


# --- pid reuse, end to end, in a PID namespace ----------------------------------------------


def in_a_pid_namespace(scenario: str, address: str, tmp_path: Path) -> tuple[dict[str, Any], str]:
    """Run this file's scenario (its pid 1 the script, damond inside): its JSON result,
    and the daemon's log."""
    out = subprocess.run(
        [
            "unshare",
            "--pid",
            "--fork",
            "--mount-proc",
            sys.executable,
            __file__,
            scenario,
            address,
            str(tmp_path / "damond.log"),
        ],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=Path(__file__).parent,
    )
    assert out.returncode == 0, out.stdout + out.stderr
    result = json.loads(out.stdout.strip().splitlines()[-1])
    return result, (tmp_path / "damond.log").read_text()


@pytest.mark.skipif(shutil.which("unshare") is None, reason="needs util-linux unshare")
def test_a_reused_pid_is_not_monitored_as_the_old_target(private_bus: Any, tmp_path: Path) -> None:
    result, log = in_a_pid_namespace("reuse", private_bus.address, tmp_path)
    # B really got A's pid, while the kdamond was still on and had not looked again
    assert result["reused"], result
    assert result["on_when_reused"], result
    # and the kdamond noticed A had gone instead of adopting B
    assert result["state_after"] == "off", result
    assert result["b_alive"], result
    assert not result["snapshots_naming_b"], result
    assert "every target has exited" in log, log
    assert "Traceback" not in log, log


async def _snapshots_once_served(bus: Any) -> list[tuple[float, list[Any]]]:
    """Once damond owns its name: every Snapshot it sends from then, with arrival times."""
    from damond.tools import client
    from damond.tools.privatebus import wait_for_name

    await wait_for_name(bus, client.BUS_NAME, 15)
    await client.add_match(bus, client.SNAPSHOT_RULE)
    got: list[tuple[float, list[Any]]] = []
    bus.add_message_handler(
        lambda m: got.append((time.time(), m.body)) if m.member == "Snapshot" else None
    )
    return got


async def _reuse(address: str, log_path: str) -> dict[str, Any]:
    """Inside the namespace (we are its pid 1): damond, a target A, A's death, B on A's pid."""
    from damond.tools import client
    from damond.tools.privatebus import spawn_daemon

    bus = await client.connect(address)
    daemon = spawn_daemon(address, Path(log_path), "--log-level", "debug")
    a = subprocess.Popen(["sleep", "600"])
    giver = PidGiver()  # ahead: b must come right after a's death
    b: Reused | None = None
    try:
        got = await _snapshots_once_served(bus)
        p = client.ROOT
        await client.set_property(bus, p, "org.damond1.Kdamonds", "nr", "u", 1)
        await client.set_property(bus, K0, "org.damond1.Contexts", "nr", "u", 1)
        await client.set_property(bus, C0, "org.damond1.Targets", "nr", "u", 1)
        await client.set_property(bus, f"{C0}/targets/0", "org.damond1.Target", "pid", "i", a.pid)
        # long samples: A dies and B takes its pid between two looks of the kdamond
        await client.set_property(bus, C0, "org.damond1.Intervals", "sample_us", "t", 400_000)
        await client.set_property(bus, C0, "org.damond1.Intervals", "aggr_us", "t", 400_000)
        await client.set_property(bus, K0, "org.damond1.Kdamond", "state", "s", "on")
        while not got:
            await asyncio.sleep(0.01)
        await asyncio.sleep(0.05)  # just after a sample: the next look is ~350 ms away
        pid = a.pid
        b = giver.give(a)
        reused_at = time.time()
        state_then = await client.get_property(bus, K0, "org.damond1.Kdamond", "state")
        for _ in range(300):
            state = await client.get_property(bus, K0, "org.damond1.Kdamond", "state")
            if state == "off":
                break
            await asyncio.sleep(0.01)
        return {
            "reused": b.pid == pid,
            "on_when_reused": state_then == "on",
            "state_after": state,
            "b_alive": b.alive(),
            "snapshots_naming_b": [body[0] for t, body in got if t > reused_at + 0.01 and body[3]],
        }
    finally:
        giver.close()
        if b is not None:
            b.kill()
        for proc in (a, daemon):
            if proc.poll() is None:
                proc.terminate()
                proc.wait()
        bus.disconnect()


@pytest.mark.skipif(shutil.which("unshare") is None, reason="needs util-linux unshare")
def test_a_pid_reused_after_commit_is_not_adopted(private_bus: Any, tmp_path: Path) -> None:
    """`commit` pins the new pid when it accepts it, as the kernel does: the process
    dies and its pid goes to another before the commit takes effect (the next
    aggregation), and the newcomer is not monitored."""
    result, log = in_a_pid_namespace("commit-reuse", private_bus.address, tmp_path)
    assert result["reused"] and result["before_effect"], result
    assert result["snapshots_after"] >= 2, result  # the commit has taken effect
    assert result["state_after"] == "on" and result["b_alive"], result
    assert not result["snapshots_naming_b"], result
    assert "Traceback" not in log, log


async def _commit_reuse(address: str, log_path: str) -> dict[str, Any]:
    """Inside the namespace: an anchor target and a second one; commit makes A the
    second, A dies right after and B gets A's pid, all before the next aggregation."""
    from damond.tools import client
    from damond.tools.privatebus import spawn_daemon

    bus = await client.connect(address)
    daemon = spawn_daemon(address, Path(log_path), "--log-level", "debug")
    anchor, first, a = (subprocess.Popen(["sleep", "600"]) for _ in range(3))
    giver = PidGiver()  # ahead: b must come right after a's death
    b: Reused | None = None
    try:
        got = await _snapshots_once_served(bus)
        await client.set_property(bus, client.ROOT, "org.damond1.Kdamonds", "nr", "u", 1)
        await client.set_property(bus, K0, "org.damond1.Contexts", "nr", "u", 1)
        await client.set_property(bus, C0, "org.damond1.Targets", "nr", "u", 2)
        for i, proc in enumerate((anchor, first)):
            await client.set_property(
                bus, f"{C0}/targets/{i}", "org.damond1.Target", "pid", "i", proc.pid
            )
        await client.set_property(bus, C0, "org.damond1.Intervals", "sample_us", "t", 100_000)
        await client.set_property(bus, C0, "org.damond1.Intervals", "aggr_us", "t", 1_000_000)
        await client.set_property(bus, K0, "org.damond1.Kdamond", "state", "s", "on")
        while not got:
            await asyncio.sleep(0.01)
        # just after an aggregation: the commit takes effect at the next, ~1 s away
        committed_at = time.time()
        await client.set_property(bus, f"{C0}/targets/1", "org.damond1.Target", "pid", "i", a.pid)
        await client.set_property(bus, K0, "org.damond1.Kdamond", "state", "s", "commit")
        pid = a.pid
        b = giver.give(a)
        reused_at = time.time()
        seen_before = len(got)
        while len([t for t, _ in got if t > reused_at]) < 2:
            await asyncio.sleep(0.05)
        state = await client.get_property(bus, K0, "org.damond1.Kdamond", "state")
        return {
            "reused": b.pid == pid,
            "before_effect": seen_before == 1 and reused_at - committed_at < 0.5,
            "snapshots_after": len([t for t, _ in got if t > reused_at]),
            "state_after": state,
            "b_alive": b.alive(),
            "snapshots_naming_b": [
                body[0] for t, body in got if t > reused_at and pid in {x[1] for x in body[3]}
            ],
        }
    finally:
        giver.close()
        if b is not None:
            b.kill()
        for proc in (anchor, first, a, daemon):
            if proc.poll() is None:
                proc.terminate()
                proc.wait()
        bus.disconnect()


if __name__ == "__main__" and sys.argv[1:2] == ["reuse"]:
    print(json.dumps(asyncio.run(_reuse(sys.argv[2], sys.argv[3]))))
if __name__ == "__main__" and sys.argv[1:2] == ["commit-reuse"]:
    print(json.dumps(asyncio.run(_commit_reuse(sys.argv[2], sys.argv[3]))))
