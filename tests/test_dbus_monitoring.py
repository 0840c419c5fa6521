"""Monitoring real processes through a real bus: walkthrough, snapshots, commit, exit, flood.

The contexts ask for conftest.TEST_BACKEND: damond's own engine on the host;
tests/vm/test_guest_kernel_backend.py runs these tests in the test guest on the
kernel's own DAMON (DAMOND_TEST_BACKEND=kernel).
"""

from __future__ import annotations

import asyncio
import json
import signal
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import psutil
import pytest
from conftest import KERNEL_BACKEND, ROOT, TEST_BACKEND, Damond, call, is_kdamond_pid, stop_process

from damond.tools.client import start_kdamonds

K0 = f"{ROOT}/kdamonds/0"
C0 = f"{K0}/contexts/0"
T0 = f"{C0}/targets/0"


def check_snapshot_shape(body: list[Any], pid: int, max_nr: int | None = None) -> None:
    seq, timestamp_us, max_nr_accesses, targets = body
    assert seq >= 1 and timestamp_us > 1_600_000_000 * 10**6
    if max_nr is not None:
        assert max_nr_accesses == max_nr
    assert [(t[0], t[1]) for t in targets] == [(0, pid)]
    regions = targets[0][2]
    assert regions, "a snapshot with no regions"
    for start, end, nr_accesses, _age in regions:
        assert start < end and start % 4096 == 0 and end % 4096 == 0
        assert nr_accesses <= max_nr_accesses
    for (_, prev_end, _, _), (start, _, _, _) in zip(regions, regions[1:], strict=False):
        assert prev_end <= start, "regions overlap or are unsorted"


EFFECTIVE = ("effective_sample_us", "effective_aggr_us")


async def test_seed_walkthrough_with_busctl(
    damond: Damond, workload: tuple[subprocess.Popen[bytes], dict[str, Any]]
) -> None:
    process, info = workload
    snapshots = await damond.signals(path=C0, interface="org.damond1.Context", member="Snapshot")
    context_changes = await damond.signals(
        path=C0, interface="org.freedesktop.DBus.Properties", member="PropertiesChanged"
    )
    b = ["set-property", "org.damond1"]
    damond.busctl(*b, ROOT, "org.damond1.Kdamonds", "nr", "u", "1")
    damond.busctl(*b, K0, "org.damond1.Contexts", "nr", "u", "1")
    damond.busctl(*b, C0, "org.damond1.Context", "operations", "s", "vaddr")
    damond.busctl(*b, C0, "org.damond1.Context", "backend", "s", TEST_BACKEND)
    damond.busctl(*b, C0, "org.damond1.Targets", "nr", "u", "1")
    damond.busctl(*b, T0, "org.damond1.Target", "pid", "i", str(process.pid))
    damond.busctl(*b, K0, "org.damond1.Kdamond", "state", "s", "on")
    get = ["get-property", "org.damond1", K0, "org.damond1.Kdamond"]
    assert damond.busctl(*get, "state").stdout.strip() == 's "on"'
    pid = int(damond.busctl(*get, "pid").stdout.split()[1])
    assert is_kdamond_pid(damond, pid), pid
    measured_then = await measured_in_managed_objects(damond)
    # what auto stood for, said by the daemon (and announced) rather than guessed by clients
    context = ["get-property", "org.damond1", C0, "org.damond1.Context"]
    avail = json.loads(damond.busctl("--json=short", *context, "avail_access_checks").stdout)
    effective = damond.busctl(*context, "effective_access_check").stdout.strip()
    backend = damond.busctl(*context, "effective_backend").stdout.strip()
    if KERNEL_BACKEND:  # the kernel samples: no access check of damond's
        assert (backend, effective) == ('s "kernel"', 's ""'), (backend, effective)
    else:
        assert backend == 's "user"', backend
        assert effective == f's "{avail["data"][0]}"', (effective, avail)
    announced = (await context_changes.next()).body[1]  # the first change of C0 since nr
    while "effective_access_check" not in announced:
        announced = (await context_changes.next()).body[1]
    assert f's "{announced["effective_access_check"].value}"' == effective
    assert f's "{announced["effective_backend"].value}"' == backend
    # and what one of its answers stands for, said plainly: this host's auto is clear_refs
    granularity = {"page_idle": "page", "soft_dirty": "page-writes", "clear_refs": "mapping"}
    expected = "page" if KERNEL_BACKEND else granularity[avail["data"][0]]
    said = damond.busctl(*context, "access_granularity").stdout.strip()
    assert said == f's "{expected}"', said
    assert announced["access_granularity"].value == expected

    bodies = [(await snapshots.next(timeout=10)).body for _ in range(12)]
    seqs = [body[0] for body in bodies]
    assert seqs == list(range(seqs[0], seqs[0] + 12)), seqs
    for body in bodies:
        check_snapshot_shape(body, process.pid, max_nr=100000 // 5000)
    gaps = [b2[1] - b1[1] for b1, b2 in zip(bodies, bodies[1:], strict=False)]
    # about every aggr_us (100 ms), slower only when sampling is slow or over its CPU
    # ceiling (cpu_limit_pct, 10 % by default); effective_aggr_us says which it is
    said = [int(damond.busctl(*context, n).stdout.split()[1]) for n in EFFECTIVE]
    assert said[0] >= 5000 and said[1] >= 100_000, said
    assert 0.7 * said[1] < statistics.median(gaps) < 1.4 * said[1], (gaps, said)
    assert statistics.median(gaps) > 50_000, gaps
    # not announced, but GetManagedObjects (kept marshalled) carries them a second old at most
    measured_now = await measured_in_managed_objects(damond)
    assert measured_now["effective_aggr_us"] > 0, measured_now
    assert measured_now != measured_then, (measured_then, measured_now)

    latest = await call(damond.client, C0, "org.damond1.Context", "GetSnapshot")
    assert latest.signature == "ttua(uia(ttuu))"
    assert latest.body[0] >= seqs[-1]
    check_snapshot_shape(latest.body, process.pid)

    damond.busctl(*b, K0, "org.damond1.Kdamond", "state", "s", "off")
    assert damond.busctl(*get, "state").stdout.strip() == 's "off"'
    assert damond.busctl(*get, "pid").stdout.strip() == "i -1"
    assert damond.busctl(*context, "effective_access_check").stdout.strip() == 's ""'
    assert damond.busctl(*context, "effective_backend").stdout.strip() == 's ""'
    assert damond.busctl(*context, "access_granularity").stdout.strip() == 's ""'


async def measured_in_managed_objects(d: Damond) -> dict[str, int]:
    context = (await d.managed_objects(measured=True))[C0]["org.damond1.Context"]
    return {name: context[name] for name in EFFECTIVE}


async def configure_and_start(d: Damond, pid: int, **attrs: int) -> None:
    """kdamond 0 monitors pid (vaddr) with these Intervals/NrRegions, and is on."""
    await start_kdamonds(d.client, [pid], TEST_BACKEND, **attrs)


async def test_hot_and_cold_buffers_are_told_apart(
    damond: Damond, workload: tuple[subprocess.Popen[bytes], dict[str, Any]]
) -> None:
    process, info = workload
    snapshots = await damond.signals(path=C0, interface="org.damond1.Context", member="Snapshot")
    await configure_and_start(damond, process.pid)

    def share_accessed(regions: list[Any], lo: int, hi: int) -> float:
        total = hit = 0
        for start, end, nr, _ in regions:
            overlap = max(0, min(end, hi) - max(start, lo))
            total += overlap
            hit += overlap if nr > 0 else 0
        assert total > 0, "the buffer is outside every region"
        return hit / total

    # regions adapt: within 10 s (100 aggregations) one snapshot must tell them apart
    seen = []
    for _ in range(100):
        regions = (await snapshots.next(timeout=10)).body[3][0][2]
        seen.append((share_accessed(regions, *info["hot"]), share_accessed(regions, *info["cold"])))
        if seen[-1][0] > 0.9 and seen[-1][1] < 0.1:
            break
    else:
        raise AssertionError(f"hot/cold never told apart: {seen[-10:]}")


async def test_target_exit_turns_the_kdamond_off(damond: Damond) -> None:
    target = subprocess.Popen(["sleep", "600"])
    try:
        changes = await damond.signals(
            path=K0, interface="org.freedesktop.DBus.Properties", member="PropertiesChanged"
        )
        await configure_and_start(damond, target.pid, aggr_us=50000)
        on = await changes.next()
        while on.body[0] != "org.damond1.Kdamond":  # Contexts.nr came first
            on = await changes.next()
        said = {k: v.value for k, v in on.body[1].items()}
        assert said.keys() == {"state", "pid"} and said["state"] == "on", said
        assert is_kdamond_pid(damond, said["pid"]), said
        target.kill()
        target.wait()
        off = await changes.next(timeout=10)
        assert off.body[0] == "org.damond1.Kdamond"
        assert {k: v.value for k, v in off.body[1].items()} == {"state": "off", "pid": -1}
        assert await damond.get(K0, "org.damond1.Kdamond", "state") == "off"
        assert "every target has exited" in damond.stderr()
    finally:
        stop_process(target)


async def test_commit_changes_the_aggregation_cadence(
    damond: Damond, sleeper: subprocess.Popen[bytes]
) -> None:
    snapshots = await damond.signals(path=C0, interface="org.damond1.Context", member="Snapshot")
    # no CPU ceiling: it would stretch the short intervals more than the long ones
    await configure_and_start(damond, sleeper.pid, sample_us=5000, aggr_us=50000, cpu_limit_pct=0)
    before = [(await snapshots.next()).body for _ in range(4)]
    assert {b[2] for b in before} == {10}
    # written while on: stored, no effect until commit
    await damond.set(C0, "org.damond1.Intervals", "aggr_us", "t", 200000)
    assert await damond.get(C0, "org.damond1.Intervals", "aggr_us") == 200000
    await damond.set(K0, "org.damond1.Kdamond", "state", "s", "commit")
    after = []
    while len(after) < 4:
        body = (await snapshots.next(timeout=10)).body
        if body[2] == 40:
            after.append(body)
        else:
            assert not after, "cadence went back after commit"
    seqs = [b[0] for b in before + after]
    assert seqs == sorted(seqs) and len(set(seqs)) == len(seqs)
    gap_before = statistics.median(
        b2[1] - b1[1] for b1, b2 in zip(before, before[1:], strict=False)
    )
    gap_after = statistics.median(b2[1] - b1[1] for b1, b2 in zip(after, after[1:], strict=False))
    assert gap_after > 2.5 * gap_before, (gap_before, gap_after)


async def test_turning_on_again_restarts_seq(
    damond: Damond, sleeper: subprocess.Popen[bytes]
) -> None:
    snapshots = await damond.signals(path=C0, interface="org.damond1.Context", member="Snapshot")
    await configure_and_start(damond, sleeper.pid, aggr_us=20000)
    assert (await snapshots.next()).body[0] == 1
    await damond.set(K0, "org.damond1.Kdamond", "state", "s", "off")
    reply = await call(damond.client, C0, "org.damond1.Context", "GetSnapshot")
    assert reply.error_name is None  # the last one is kept while off
    snapshots.drain()
    await damond.set(K0, "org.damond1.Kdamond", "state", "s", "on")
    first = (await snapshots.next()).body
    while first[0] != 1:  # a snapshot of the old run may still be in flight
        first = (await snapshots.next()).body
    assert first[0] == 1


async def test_flood_of_snapshots_to_many_subscribers(
    damond: Damond, sleeper: subprocess.Popen[bytes]
) -> None:
    """20 subscribers (one never reads), 1000 regions, 1 ms aggregation, 5 s.

    The subscribers live in another process (rawbus.py), so the
    fixture's client, subscribed to nothing, measures the daemon's answers.
    """
    subscribers = subprocess.Popen(
        [
            sys.executable,
            str(Path(__file__).with_name("rawbus.py")),
            "subscribe",
            damond.address,
            "19",
            "1",
        ],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert subscribers.stdout is not None and subscribers.stdin is not None
        assert subscribers.stdout.readline() == "ready\n"
        first = await damond.signals(path=C0, interface="org.damond1.Context", member="Snapshot")
        await configure_and_start(
            damond, sleeper.pid, sample_us=1000, aggr_us=1000, min=1000, max=1000
        )
        body = (await first.next(timeout=10)).body
        assert len(body[3][0][2]) >= 900, "the flood is not of 1000-region snapshots"
        await first.stop()  # from now on, only Gets on this connection
        rss = [psutil.Process(damond.process.pid).memory_info().rss]
        loop = asyncio.get_running_loop()
        end = loop.time() + 5
        latencies = []
        while loop.time() < end:
            t0 = loop.time()
            nr = await asyncio.wait_for(damond.get(ROOT, "org.damond1.Kdamonds", "nr"), 2)
            latencies.append(loop.time() - t0)
            assert nr == 1
            if len(latencies) % 10 == 0:
                rss.append(psutil.Process(damond.process.pid).memory_info().rss)
            await asyncio.sleep(0.05)
        assert len(latencies) > 20
        assert damond.process.poll() is None
        assert await damond.get(K0, "org.damond1.Kdamond", "state") == "on"
        # bounded: after a second of warm-up the daemon's memory stays put
        assert max(rss) - rss[0] < 64 * 2**20, rss
        await damond.set(K0, "org.damond1.Kdamond", "state", "s", "off")
        counts_line, _ = subscribers.communicate("", timeout=30)
        counts = json.loads(counts_line)
        assert min(counts) > 100, counts  # every reading subscriber kept receiving
    finally:
        stop_process(subscribers)
    assert "lost the connection" not in damond.stderr()


def test_daemon_exits_1_when_the_bus_is_unreachable(tmp_path: Any) -> None:
    out = subprocess.run(
        [sys.executable, "-m", "damond", "--bus", f"unix:path={tmp_path}/nobus"],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert out.returncode == 1
    assert out.stderr.startswith("damond: cannot connect"), out.stderr
    assert len(out.stderr.splitlines()) == 1, out.stderr


async def test_second_daemon_exits_1_when_the_name_is_taken(damond: Damond) -> None:
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "damond",
        "--bus",
        damond.address,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    _, stderr = await asyncio.wait_for(proc.communicate(), 30)
    assert proc.returncode == 1
    assert "already owned" in stderr.decode() and len(stderr.splitlines()) == 1, stderr
    assert damond.process.poll() is None  # the first one is unaffected


async def test_a_stalled_bus_costs_snapshots_not_memory(
    damond: Damond, sleeper: subprocess.Popen[bytes]
) -> None:
    """The bus stops reading (SIGSTOP) under 1000-region snapshots every ms: the
    daemon queues a bounded number, drops the rest, and carries on afterwards.
    No CPU ceiling: the sampler must run flat out to flood the bus."""
    first = await damond.signals(path=C0, interface="org.damond1.Context", member="Snapshot")
    await configure_and_start(
        damond, sleeper.pid, sample_us=1000, aggr_us=1000, min=1000, max=1000, cpu_limit_pct=0
    )
    await first.next(timeout=10)
    await first.stop()
    seq_before = (await call(damond.client, C0, "org.damond1.Context", "GetSnapshot")).body[0]
    rss_before = psutil.Process(damond.process.pid).memory_info().rss
    damond.bus.process.send_signal(signal.SIGSTOP)
    try:
        # two seconds of snapshots (~50 MB unbounded) with nowhere to go
        await asyncio.to_thread(time.sleep, 2)
        rss_stalled = psutil.Process(damond.process.pid).memory_info().rss
    finally:
        damond.bus.process.send_signal(signal.SIGCONT)
    assert rss_stalled - rss_before < 32 * 2**20, (rss_before, rss_stalled)
    assert await damond.get(K0, "org.damond1.Kdamond", "state") == "on"
    reply = await call(damond.client, C0, "org.damond1.Context", "GetSnapshot")
    # 2 s at 1 ms aggregations of one sample: ~500-1000 aggregations (each sample sleeps
    # the whole sample_us after its ~1 ms of work), fewer on a loaded machine; none at
    # all if the stall had stopped the kdamond
    assert reply.body[0] - seq_before > 200, (
        f"the kdamond did not keep sampling while the bus stalled: seq {seq_before} -> "
        f"{reply.body[0]}"
    )
    await damond.set(K0, "org.damond1.Kdamond", "state", "s", "off")
    assert "dropped" in damond.stderr()
    assert "lost the connection" not in damond.stderr()


async def test_the_cpu_ceiling_stretches_sampling_and_says_so(damond: Damond) -> None:
    """clear_refs walks every page of the target each sample: on 70 MiB that costs more
    than 10 % of a CPU at 5 ms. The default ceiling stretches the interval, the daemon's
    CPU stays near it, effective_* and the log say so; lifting it (commit) speeds up."""
    process = subprocess.Popen(
        [sys.executable, "-m", "damond.tools.workload", "--hot-mib", "6", "--cold-mib", "64"],
        stdout=subprocess.PIPE,
    )
    assert process.stdout is not None
    process.stdout.readline()
    try:
        snapshots = await damond.signals(
            path=C0, interface="org.damond1.Context", member="Snapshot"
        )
        await configure_and_start(damond, process.pid)
        assert await damond.get(C0, "org.damond1.Context", "cpu_limit_pct") == 10
        await snapshots.next(timeout=30)  # the first aggregation learns what a sample costs
        daemon = psutil.Process(damond.process.pid)
        cpu0, t0 = sum(daemon.cpu_times()[:2]), time.monotonic()
        bodies = [(await snapshots.next(timeout=30)).body for _ in range(3)]
        share = (sum(daemon.cpu_times()[:2]) - cpu0) / (time.monotonic() - t0)
        sample_us, aggr_us = [await damond.get(C0, "org.damond1.Context", n) for n in EFFECTIVE]
        assert sample_us > 1.2 * 5000, (sample_us, aggr_us)
        assert aggr_us == pytest.approx(20 * sample_us, rel=0.01)
        gaps = [b2[1] - b1[1] for b1, b2 in zip(bodies, bodies[1:], strict=False)]
        assert statistics.median(gaps) == pytest.approx(aggr_us, rel=0.3), (gaps, aggr_us)
        assert share < 0.15, f"the daemon used {share:.0%} of a CPU under a 10 % ceiling"
        log = damond.stderr()
        assert "kdamond 0 falls behind: a sample every" in log, log
        assert "cpu_limit_pct 10 stretches the interval" in log, log

        await damond.set(C0, "org.damond1.Context", "cpu_limit_pct", "u", 0)
        await damond.set(K0, "org.damond1.Kdamond", "state", "s", "commit")
        for _ in range(3):  # the commit applies at an aggregation; the next one is free
            await snapshots.next(timeout=30)
        unlimited = await damond.get(C0, "org.damond1.Context", "effective_sample_us")
        assert unlimited < sample_us / 1.5, (unlimited, sample_us)
    finally:
        stop_process(process)
