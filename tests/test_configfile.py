"""The declarative configuration: damo's kdamonds JSON at start (--config) and on SIGHUP.

The real daemon on a private bus, monitoring a real process: a file starts
monitoring with no client involved, its scheme running (stats grow); a reload
commits new values, the scheme's included, to a running kdamond without
restarting it (seq goes on, stats too); a refused file changes nothing and the
daemon keeps serving, saying which object and rule.
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
S0 = f"{C0}/schemes/0"
STATS = "org.damond1.SchemeStats"


def stat_scheme(age_min: str = "0 s", sz_quota: str = "0 B") -> dict[str, Any]:
    """A scheme that acts on nothing and counts every region (damo's units)."""
    return {
        "action": "stat",
        "access_pattern": {
            "sz_bytes": {"min": "0 B", "max": "max"},
            "nr_accesses": {"min": "0 %", "max": "100 %"},
            "age": {"min": age_min, "max": "max"},
        },
        "quotas": {"time_ms": 0, "sz_bytes": sz_quota, "reset_interval_ms": "1 s",
                   "weights": {"sz_permil": "0 %", "nr_accesses_permil": "0 %",
                               "age_permil": "100 %"}},
    }  # fmt: skip


def kdamonds(
    pid: int, aggr_us: int = 50_000, min_regions: int = 10, scheme: dict[str, Any] | None = None
) -> dict[str, Any]:
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
                        "schemes": [scheme or stat_scheme()],
                    }
                ]
            }
        ]
    }  # fmt: skip


def settings(objects: dict[str, Any]) -> dict[str, Any]:
    """The tree without what a running scheme changes by itself (its stats, the
    effective quota)."""
    return {
        path: {
            iface: {k: v for k, v in props.items() if k != "effective_bytes"}
            for iface, props in ifaces.items()
            if iface != STATS
        }
        for path, ifaces in objects.items()
    }


async def nr_tried_above(daemon: Damond, changes: Any, floor: int) -> int:
    """Await the scheme's announced stats (PropertiesChanged, at most once a second) until
    nr_tried passes floor; the value."""
    while True:
        msg = await changes.next(timeout=10)
        if msg.body[0] == STATS and msg.body[1]["nr_tried"].value > floor:
            return int(msg.body[1]["nr_tried"].value)


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
    changes = await daemon.signals(path=S0, member="PropertiesChanged")
    body = (await snapshots.next(timeout=10)).body
    assert body[3][0][1] == pid
    assert f"configuration {config} applied: 1 kdamond(s), 1 on" in daemon.stderr()
    # the file's scheme runs: its stats grow, aggregation after aggregation
    assert await daemon.get(S0, "org.damond1.Scheme", "action") == "stat"
    assert await daemon.get(S0, "org.damond1.Quotas", "weight_age") == 1000  # "100 %"
    first = await nr_tried_above(daemon, changes, 0)
    await nr_tried_above(daemon, changes, first)


async def test_a_reload_commits_without_restarting(configured: tuple[Damond, Path, int]) -> None:
    daemon, config, pid = configured
    snapshots = await daemon.signals(path=C0, member="Snapshot")
    changes = await daemon.signals(path=S0, member="PropertiesChanged")
    before = (await snapshots.next(timeout=10)).body[0]
    tried = await nr_tried_above(daemon, changes, 0)
    new = kdamonds(pid, aggr_us=100_000, min_regions=12, scheme=stat_scheme("1 s", "1 MiB"))
    config.write_text(json.dumps(new))
    await reload(daemon, "applied")
    assert await daemon.get(C0, "org.damond1.Intervals", "aggr_us") == 100_000
    assert await daemon.get(C0, "org.damond1.NrRegions", "min") == 12
    # the scheme's new files, its age counted in the new aggregations (1 s / 100 ms)
    assert await daemon.get(S0, "org.damond1.AccessPattern", "age_min") == 10
    assert await daemon.get(S0, "org.damond1.Quotas", "bytes") == 1 << 20
    snapshots.drain()
    after = (await snapshots.next(timeout=10)).body[0]
    assert after > before, "seq restarted: the reload turned the kdamond off and on"
    changes.drain()
    assert await nr_tried_above(daemon, changes, tried) > tried  # stats kept, not reset
    assert f"{K0.removeprefix(ROOT + '/')} commit" in daemon.stderr()


async def test_a_refused_file_changes_nothing(configured: tuple[Damond, Path, int]) -> None:
    daemon, config, pid = configured
    objects = settings(await daemon.managed_objects())
    config.write_text(json.dumps(kdamonds(pid, aggr_us=100_000, min_regions=2)))
    await reload(daemon, "configuration refused")
    assert settings(await daemon.managed_objects()) == objects
    assert (
        "kdamonds/0/contexts/0: nr_regions min must be >= 3, is 2" in daemon.stderr()
    ), daemon.stderr()
    # a scheme the core's rules refuse: the file's tree object and the rule
    bad = stat_scheme()
    bad["access_pattern"]["nr_accesses"] = {"min": "50 %", "max": "10 %"}
    config.write_text(json.dumps(kdamonds(pid, scheme=bad)))
    await reload(daemon, "configuration refused")
    assert (
        "kdamonds/0/contexts/0/schemes/0: access pattern nr_accesses_min (5) must be <= "
        "nr_accesses_max (1)" in daemon.stderr()
    ), daemon.stderr()
    # what damond cannot do: the document's place and what it is
    goals = stat_scheme()
    goals["quotas"]["goals"] = [{"metric": "some_mem_psi_us", "target_value": "1 ms",
                                 "current_value": 0}]  # fmt: skip
    config.write_text(json.dumps(kdamonds(pid, scheme=goals)))
    await reload(daemon, "configuration refused")
    assert "kdamonds[0].contexts[0].schemes[0].quotas.goals: quota goals" in daemon.stderr()
    config.write_text("{not json")
    await reload(daemon, "configuration refused")
    assert "not JSON" in daemon.stderr()
    assert settings(await daemon.managed_objects()) == objects
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
