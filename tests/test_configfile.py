"""The declarative configuration: damo's kdamonds JSON at start (--config) and on SIGHUP.

The real daemon on a private bus, monitoring a real process: a file starts
monitoring with no client involved; a reload commits new values to a running
kdamond without restarting it (seq goes on); a refused file changes nothing
and the daemon keeps serving, saying which object and rule.
"""

from __future__ import annotations

import json
import signal
import subprocess
import sys
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from conftest import ROOT, Damond, start_damond, stop_process
from dbus_fast.aio import MessageBus

from damond.tools.privatebus import PrivateBus, spawn_daemon

K0 = f"{ROOT}/kdamonds/0"
C0 = f"{K0}/contexts/0"


def kdamonds(pid: int, aggr_us: int = 50_000, min_regions: int = 10) -> dict[str, Any]:
    return {
        "kdamonds": [
            {
                "contexts": [
                    {
                        "ops": "vaddr",
                        "targets": [{"pid": pid, "regions": []}],
                        "intervals": {"sample_us": "5 ms", "aggr_us": aggr_us,
                                      "ops_update_us": "1 s"},
                        "nr_regions": {"min": min_regions, "max": "1,000"},
                    }
                ]
            }
        ]
    }  # fmt: skip


@pytest.fixture
async def configured(
    private_bus: PrivateBus, tmp_path: Path, sleeper: subprocess.Popen[bytes]
) -> AsyncIterator[tuple[Damond, Path, int]]:
    """damond started with --config FILE that monitors the sleeper."""
    config = tmp_path / "kdamonds.json"
    config.write_text(json.dumps(kdamonds(sleeper.pid)))
    client = await MessageBus(bus_address=private_bus.address).connect()
    daemon = await start_damond(private_bus, client, tmp_path, args=("--config", str(config)))
    try:
        yield daemon, config, sleeper.pid
    finally:
        code = stop_process(daemon.process)
        client.disconnect()
        assert "Traceback" not in daemon.stderr(), daemon.stderr()
        assert code == 0, daemon.stderr()


async def reload(daemon: Damond, logged: str) -> None:
    """SIGHUP, then wait until the log says the reload is done (the daemon logs a line
    per outcome)."""
    import asyncio

    before = daemon.stderr().count(logged)
    daemon.process.send_signal(signal.SIGHUP)
    for _ in range(200):
        if daemon.stderr().count(logged) > before:
            return
        await asyncio.sleep(0.05)
    raise AssertionError(f"no {logged!r} after SIGHUP:\n{daemon.stderr()}")


async def test_the_file_starts_monitoring_at_start(configured: tuple[Damond, Path, int]) -> None:
    daemon, config, pid = configured
    # the name is owned only after the file was applied: no waiting needed
    assert await daemon.get(K0, "org.damond1.Kdamond", "state") == "on"
    assert await daemon.get(C0, "org.damond1.Intervals", "aggr_us") == 50_000
    assert await daemon.get(f"{C0}/targets/0", "org.damond1.Target", "pid") == pid
    snapshots = await daemon.signals(path=C0, member="Snapshot")
    body = (await snapshots.next(timeout=10)).body
    assert body[3][0][1] == pid
    assert f"configuration {config} applied: 1 kdamond(s), 1 on" in daemon.stderr()


async def test_a_reload_commits_without_restarting(configured: tuple[Damond, Path, int]) -> None:
    daemon, config, pid = configured
    snapshots = await daemon.signals(path=C0, member="Snapshot")
    before = (await snapshots.next(timeout=10)).body[0]
    config.write_text(json.dumps(kdamonds(pid, aggr_us=100_000, min_regions=12)))
    await reload(daemon, "applied")
    assert await daemon.get(C0, "org.damond1.Intervals", "aggr_us") == 100_000
    assert await daemon.get(C0, "org.damond1.NrRegions", "min") == 12
    snapshots.drain()
    after = (await snapshots.next(timeout=10)).body[0]
    assert after > before, "seq restarted: the reload turned the kdamond off and on"
    assert f"{K0.removeprefix(ROOT + '/')} commit" in daemon.stderr()


async def test_a_refused_file_changes_nothing(configured: tuple[Damond, Path, int]) -> None:
    daemon, config, pid = configured
    objects = await daemon.managed_objects()
    config.write_text(json.dumps(kdamonds(pid, aggr_us=100_000, min_regions=2)))
    await reload(daemon, "configuration refused")
    assert await daemon.managed_objects() == objects
    assert (
        "kdamonds/0/contexts/0: nr_regions min must be >= 3, is 2" in daemon.stderr()
    ), daemon.stderr()
    config.write_text(json.dumps({"kdamonds": [{"contexts": [{"ops": "vaddr", "schemes": [{}]}]}]}))
    await reload(daemon, "configuration refused")
    assert "kdamonds[0].contexts[0].schemes: schemes (DAMOS)" in daemon.stderr()
    config.write_text("{not json")
    await reload(daemon, "configuration refused")
    assert "not JSON" in daemon.stderr()
    assert await daemon.managed_objects() == objects
    assert await daemon.get(K0, "org.damond1.Kdamond", "state") == "on"


async def test_a_file_that_cannot_start_leaves_the_daemon_serving(
    private_bus: PrivateBus, tmp_path: Path
) -> None:
    config = tmp_path / "kdamonds.json"
    config.write_text(json.dumps(kdamonds(2**22 + 12345)))  # no such process
    client = await MessageBus(bus_address=private_bus.address).connect()
    daemon = await start_damond(private_bus, client, tmp_path, args=("--config", str(config)))
    try:
        assert await daemon.get(ROOT, "org.damond1.Kdamonds", "nr") == 0
        assert "targets/0: pid 4206649 is not a live process" in daemon.stderr()
    finally:
        assert stop_process(daemon.process) == 0
        client.disconnect()


def test_a_missing_config_is_an_error_and_version_is_told(tmp_path: Path) -> None:
    process = spawn_daemon("unix:path=/nonexistent", tmp_path / "log", "--config",
                           str(tmp_path / "missing.json"))  # fmt: skip
    assert process.wait(timeout=30) == 1
    assert "missing.json: no such file" in (tmp_path / "log").read_text()
    out = subprocess.run([sys.executable, "-m", "damond", "--version"], capture_output=True,
                         text=True, timeout=30, check=True).stdout  # fmt: skip
    assert out.startswith("damond 0.")
