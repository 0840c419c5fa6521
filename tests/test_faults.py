"""Faults: the daemon killed mid-aggregation, the bus daemon dying, kernel files failing.

- SIGKILL of damond while kdamonds aggregate leaves nothing behind: a new
  damond owns the name at once, with a fresh tree, and monitors the same
  target again. (What a kill leaves in the kernel: clear_refs has reset the
  target's referenced bits, which only feeds its reclaim heuristics; page_idle
  bits left set only make pages look idle to the next reader. Neither is
  state damond reads back: docs/reliability.md.)
- The bus daemon dying: damond exits 1 with one line saying so (systemd
  restarts it), instead of hanging.
- A kernel file failing mid-run (EIO, ENOENT, EPERM) through the fault hook
  DAMOND_FAULT_OPS (damond/faults.py, off by default): that kdamond turns
  off with the reason in the log, the others carry on.
"""

from __future__ import annotations

import asyncio
import errno
import os
import signal
import subprocess
import time
from collections.abc import Iterator
from typing import Any

import numpy as np
import pytest
from conftest import ROOT, Damond, SignalQueue, start_damond, stop_process
from dbus_fast.aio import MessageBus

from damond import faults
from damond.cli import Daemon
from damond.monitor import kdamond, ops
from damond.monitor.config import Attrs, ContextConfig, TargetConfig
from damond.monitor.snapshot import Snapshot
from damond.tools.client import start_kdamonds as start_on_bus
from damond.tools.privatebus import PrivateBus, start_private_bus

KDAMONDS = "org.damond1.Kdamonds"


def paths(k: int) -> tuple[str, str, str]:
    kd = f"{ROOT}/kdamonds/{k}"
    return kd, f"{kd}/contexts/0", f"{kd}/contexts/0/targets/0"


async def start_kdamonds(d: Damond, pids: list[int], **attrs: int) -> None:
    await start_on_bus(d.client, pids, **attrs)


@pytest.fixture
def sleepers() -> Iterator[list[subprocess.Popen[bytes]]]:
    processes = [subprocess.Popen(["sleep", "600"]) for _ in range(2)]
    yield processes
    for p in processes:
        stop_process(p)


async def wait_exit(process: subprocess.Popen[bytes], timeout: float) -> int:
    return await asyncio.wait_for(asyncio.to_thread(process.wait), timeout)


async def state_changes(d: Damond, k: int) -> SignalQueue:
    return await d.signals(
        path=paths(k)[0], interface="org.freedesktop.DBus.Properties", member="PropertiesChanged"
    )


async def next_state(queue: SignalQueue, timeout: float = 10.0) -> str:
    while True:
        msg = await queue.next(timeout)
        if msg.body[0] == "org.damond1.Kdamond" and "state" in msg.body[1]:
            return str(msg.body[1]["state"].value)


# --- SIGKILL mid-aggregation, then a restart ------------------------------------------------


@pytest.mark.parametrize("offset_ms", [0, 3, 7])
async def test_sigkill_mid_aggregation_then_restart_at_once(
    private_bus: PrivateBus,
    tmp_path: Any,
    sleepers: list[subprocess.Popen[bytes]],
    offset_ms: int,
) -> None:
    client = await MessageBus(bus_address=private_bus.address).connect()
    try:
        (tmp_path / "1").mkdir()
        (tmp_path / "2").mkdir()
        first = await start_damond(private_bus, client, tmp_path / "1")
        snapshots = await first.signals(interface="org.damond1.Context", member="Snapshot")
        # 1 ms samples, 10 ms aggregations of 1000 regions: a kill lands in one
        await start_kdamonds(
            first, [p.pid for p in sleepers], sample_us=1000, aggr_us=10000, min=1000, max=1000
        )
        await snapshots.next(timeout=10)
        await snapshots.next(timeout=10)
        await asyncio.sleep(offset_ms / 1000)
        name_lost = await first.signals(member="NameOwnerChanged")
        first.process.send_signal(signal.SIGKILL)
        assert await wait_exit(first.process, 10) == -signal.SIGKILL
        while True:  # the bus saw the owner go
            msg = await name_lost.next(timeout=10)
            if msg.body[0] == "org.damond1" and msg.body[2] == "":
                break
        for p in sleepers:  # the targets are unharmed
            assert p.poll() is None
        t0 = time.monotonic()
        second = await start_damond(private_bus, client, tmp_path / "2")
        started_s = time.monotonic() - t0
        try:
            assert started_s < 5, started_s  # the name was free at once
            assert await second.get(ROOT, KDAMONDS, "nr") == 0  # a fresh tree
            assert await second.managed_objects() == {}
            # and the same targets can be monitored again, at once
            snapshots.drain()
            await start_kdamonds(second, [p.pid for p in sleepers], aggr_us=20000)
            body = (await snapshots.next(timeout=10)).body
            assert body[0] == 1 and body[3][0][1] in {p.pid for p in sleepers}
            await second.set(paths(0)[0], "org.damond1.Kdamond", "state", "s", "off")
            await second.set(paths(1)[0], "org.damond1.Kdamond", "state", "s", "off")
        finally:
            assert stop_process(second.process) == 0
        assert "Traceback" not in second.stderr()
    finally:
        client.disconnect()


# --- the bus daemon dies --------------------------------------------------------------------


@pytest.mark.parametrize("how", [signal.SIGKILL, signal.SIGTERM])
async def test_bus_death_makes_damond_exit_1_with_one_line(
    tmp_path: Any, sleepers: list[subprocess.Popen[bytes]], how: signal.Signals
) -> None:
    """With kdamonds running (worker threads busy), the bus goes away: damond must not
    hang; it exits 1, its last stderr line says why, and no traceback."""
    with start_private_bus() as bus:
        client = await MessageBus(bus_address=bus.address).connect()
        d = await start_damond(bus, client, tmp_path)
        try:
            await start_kdamonds(d, [p.pid for p in sleepers], sample_us=1000, aggr_us=10000)
            await asyncio.sleep(0.2)
            t0 = time.monotonic()
            bus.process.send_signal(how)
            code = await wait_exit(d.process, 15)
            took = time.monotonic() - t0
        finally:
            stop_process(d.process)
            client.disconnect()
    log = d.stderr()
    assert code == 1, log
    assert took < 10, took
    # (the test runs the daemon at --log-level debug; debug lines may follow)
    last = [line for line in log.strip().splitlines() if not line.startswith("damond: DEBUG")][-1]
    assert last.startswith("damond: lost the connection to the bus: "), log
    reason = last.removeprefix("damond: lost the connection to the bus: ")
    assert reason.strip() and reason[0].isalpha(), f"no reason given: {last!r}"
    assert "Traceback" not in log, log


async def test_restart_after_the_bus_came_back(tmp_path: Any) -> None:
    """After the bus restarted (a new bus daemon at the same address), a new damond
    serves at once: nothing of the old one is in the way."""
    with start_private_bus() as bus:
        client = await MessageBus(bus_address=bus.address).connect()
        d = await start_damond(bus, client, tmp_path)
        bus.process.kill()
        assert await wait_exit(d.process, 15) == 1
        client.disconnect()
        socket_path = bus.address.split("path=", 1)[1].split(",", 1)[0]
        bus.process.wait()
        os.unlink(socket_path)
        restarted = subprocess.Popen(
            [
                "dbus-daemon",
                f"--config-file={bus.directory / 'bus.conf'}",
                "--nofork",
                "--print-address",
            ],
            stdout=subprocess.PIPE,
            stdin=subprocess.DEVNULL,
        )
        try:
            assert restarted.stdout is not None
            assert socket_path in restarted.stdout.readline().decode()
            client = await MessageBus(bus_address=bus.address).connect()
            d2 = await start_damond(bus, client, tmp_path)
            assert await d2.get(ROOT, KDAMONDS, "nr") == 0
            assert stop_process(d2.process) == 0
            client.disconnect()
        finally:
            stop_process(restarted)


# --- kernel files failing mid-run ---------------------------------------------------------


@pytest.mark.parametrize(
    ("op", "error", "words"),
    [
        ("check", "EIO", "Input/output error"),
        ("prepare", "EPERM", "Operation not permitted"),
        ("update_ranges", "ENOENT", "No such file or directory"),
    ],
)
async def test_a_failing_kernel_file_stops_only_its_kdamond(
    private_bus: PrivateBus,
    tmp_path: Any,
    sleepers: list[subprocess.Popen[bytes]],
    op: str,
    error: str,
    words: str,
) -> None:
    client = await MessageBus(bus_address=private_bus.address).connect()
    d = await start_damond(
        private_bus, client, tmp_path, env={faults.FAULT_OPS_ENV: f"1:{op}:20:{error}"}
    )
    try:
        changes = await state_changes(d, 1)
        survivor = await d.signals(
            path=paths(0)[1], interface="org.damond1.Context", member="Snapshot"
        )
        await start_kdamonds(
            d, [p.pid for p in sleepers], sample_us=2000, aggr_us=20000, update_us=20000
        )
        assert await next_state(changes) == "on"
        assert await next_state(changes) == "off"  # kdamond 1, by itself
        assert await d.get(paths(1)[0], "org.damond1.Kdamond", "pid") == -1
        # kdamond 0 carries on: on, and still publishing
        assert await d.get(paths(0)[0], "org.damond1.Kdamond", "state") == "on"
        survivor.drain()
        seqs = [(await survivor.next()).body[0] for _ in range(3)]
        assert seqs == sorted(seqs)
        log = d.stderr()
        assert f"kdamonds/1 off: monitoring failed: [Errno {getattr(errno, error)}] {words}" in log
        assert "kdamonds/0 off" not in log
        # and kdamond 1 can be turned on again (the hook fails it again, the same way)
        await d.set(paths(1)[0], "org.damond1.Kdamond", "state", "s", "on")
        assert await next_state(changes) == "on"
        assert await next_state(changes) == "off"
        await d.set(paths(0)[0], "org.damond1.Kdamond", "state", "s", "off")
    finally:
        code = stop_process(d.process)
        client.disconnect()
    assert code == 0
    assert "Traceback" not in d.stderr()


# --- the same, without a bus: KdamondTask and the fault layer directly -------------------------


def test_fault_specs_are_checked() -> None:
    assert faults.Fault.parse("2:check:5:EIO") == faults.Fault("2", "check", 5, errno.EIO)
    for bad in ["2:check:0:EIO", "2:read:5:EIO", "2:check:5:ENOTANERRNO", "2:check:5"]:
        with pytest.raises(ValueError):
            faults.Fault.parse(bad)


async def test_fault_layer_fails_one_task_of_two(
    sleepers: list[subprocess.Popen[bytes]], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv(faults.FAULT_OPS_ENV, "b:check:5:EIO")
    attrs = Attrs(sample_us=1000, aggr_us=5000, min_nr_regions=10, max_nr_regions=100)
    stopped: dict[str, asyncio.Future[str]] = {}
    got: dict[str, list[Snapshot]] = {"a": [], "b": []}
    tasks = []
    for name, proc in zip(["a", "b"], sleepers, strict=True):
        config = ContextConfig(ops.VADDR, "clear_refs", attrs, (TargetConfig(0, proc.pid),))
        stopped[name] = asyncio.get_running_loop().create_future()
        tasks.append(
            kdamond.KdamondTask(
                name,
                config,
                got[name].append,
                stopped[name].set_result,
                wrap_ops=faults.wrap_ops,
            )
        )
    reason = await asyncio.wait_for(stopped["b"], 10)
    assert reason.startswith("monitoring failed: [Errno 5]"), reason
    assert not stopped["a"].done()
    count = len(got["a"])
    while len(got["a"]) < count + 3:  # a keeps aggregating
        await asyncio.sleep(0.01)
    assert len(got["b"]) == 0  # b failed at its 5th check, before its first aggregation
    tasks[0].stop()
    await asyncio.gather(*(t.wait() for t in tasks))


async def test_stopped_tasks_are_not_kept(sleepers: list[subprocess.Popen[bytes]]) -> None:
    """on/off cycles must not leave their tasks (engine, regions, worker) behind."""
    daemon = Daemon()
    tree = daemon.tree
    tree.root.set("kdamonds", "nr", 1)
    kd = tree.kdamonds()[0]
    kd.set("contexts", "nr", 1)
    context = kd.contexts.items[0]
    context.set("targets", "nr", 1)
    context.targets.items[0].set("target", "pid", sleepers[0].pid)
    for _ in range(20):
        kd.set("kdamond", "state", "on")
        await asyncio.sleep(0)
        kd.set("kdamond", "state", "off")
    await asyncio.wait_for(daemon.shutdown("test"), 10)
    await asyncio.sleep(0)
    assert daemon.tasks == set()


def test_fault_layer_counts_calls() -> None:
    class Access:
        name = "fake"

        def __init__(self) -> None:
            self.calls = 0

        def check(self, target: TargetConfig, addrs: np.ndarray) -> np.ndarray:
            self.calls += 1
            return np.zeros(len(addrs), bool)

    inner = Access()
    faulty: Any = faults.FaultyOps(inner, faults.Fault("0", "check", 3, errno.ENOENT))
    target = TargetConfig(0, 1)
    faulty.check(target, np.zeros(2, np.uint64))
    faulty.check(target, np.zeros(2, np.uint64))
    with pytest.raises(FileNotFoundError):
        faulty.check(target, np.zeros(2, np.uint64))
    assert inner.calls == 2 and faulty.name == "fake"
