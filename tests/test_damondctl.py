"""damondctl against the real daemon on a real bus, monitoring a real workload.

Round trips (start, status, tune, stop, dump and start --config, a DAMOS scheme
included), errors with
their exit codes, the working set size of a workload whose working set is
known, and records that damo's own report commands read.
"""

from __future__ import annotations

import json
import shutil
import statistics
import struct
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from conftest import ROOT, Damond, start_workload, stop_process

from damond.tools.ctl.common import EXIT_INPUT, EXIT_REFUSED, EXIT_UNREACHABLE

K0 = f"{ROOT}/kdamonds/0"
C0 = f"{K0}/contexts/0"
S0 = f"{C0}/schemes/0"
MIB = 1 << 20
HOT_MIB, COLD_MIB = 32, 64
"""The hot buffer is the working set: larger than the interpreter's own memory that the
loop touches (about 1 MiB), so that 20 % is a fair bound, and larger than the TLB's reach
(clear_refs does not flush it: an 8 MiB buffer in a tight loop reads ~80 % referenced)."""


def ctl(damond: Damond, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    result = subprocess.run(
        [sys.executable, "-m", "damond.tools.ctl", "--bus", damond.address, *args],
        capture_output=True,
        text=True,
        timeout=60,
    )
    if check:
        assert result.returncode == 0, f"damondctl {' '.join(args)}: {result.stderr}"
    return result


@pytest.fixture
def hot_workload() -> Iterator[tuple[subprocess.Popen[bytes], dict[str, Any]]]:
    process, info = start_workload(HOT_MIB, COLD_MIB)
    yield process, info
    stop_process(process)


def test_help_lists_exit_codes_and_examples() -> None:
    out = subprocess.run(
        [sys.executable, "-m", "damond.tools.ctl", "--help"],
        capture_output=True, text=True, check=True, timeout=60,
    ).stdout  # fmt: skip
    assert "damondctl start --pid" in out and "exit status:" in out
    for code in range(6):
        assert f"  {code}  " in out


async def test_start_status_tune_stop(damond: Damond, sleeper: subprocess.Popen[bytes]) -> None:
    out = ctl(damond, "start", "--pid", str(sleeper.pid), "--aggr", "50ms", "--min", "12")
    assert out.stdout.strip() == K0
    assert await damond.get(K0, "org.damond1.Kdamond", "state") == "on"
    assert await damond.get(C0, "org.damond1.Intervals", "aggr_us") == 50_000
    assert await damond.get(C0, "org.damond1.NrRegions", "min") == 12
    snapshots = await damond.signals(path=C0, member="Snapshot")
    await snapshots.next(timeout=10)

    status = json.loads(ctl(damond, "--json", "status").stdout)
    [row] = status["contexts"]
    assert (row["state"], row["aggr_us"], row["min_nr_regions"]) == ("on", 50_000, 12)
    [target] = row["targets"]
    assert (target["pid"], target["comm"]) == (sleeper.pid, "sleep")
    assert target["regions"] >= 1 and target["monitored_bytes"] > 0
    assert row["snapshot"]["seq"] >= 1 and row["snapshot"]["age_s"] < 10
    human = ctl(damond, "status").stdout
    assert f"pid {sleeper.pid} (sleep)" in human and "aggr 50 ms" in human

    tuned = ctl(damond, "tune", "0", "--aggr", "100ms", "--max", "500", "--commit")
    assert "committed" in tuned.stdout
    assert await damond.get(C0, "org.damond1.Intervals", "aggr_us") == 100_000
    assert await damond.get(C0, "org.damond1.NrRegions", "max") == 500
    # a refused commit names the object and rule, exits 1, and keeps the values that run
    bad = ctl(damond, "tune", "0", "--min", "600", "--commit", check=False)
    assert bad.returncode == EXIT_REFUSED
    assert f"{C0}: nr_regions min (600) must be <= max (500) [InvalidArgument]" in bad.stderr
    assert await damond.get(C0, "org.damond1.NrRegions", "min") == 12

    assert ctl(damond, "stop").stdout.strip() == f"{K0}: off"
    assert await damond.get(K0, "org.damond1.Kdamond", "state") == "off"
    assert ctl(damond, "stop").stdout.strip() == "nothing was on"


def settings(objects: dict[str, Any]) -> dict[str, Any]:
    """The tree without what a running scheme changes by itself (stats, effective quota)."""
    return {
        path: {
            iface: {k: v for k, v in props.items() if k != "effective_bytes"}
            for iface, props in groups.items()
            if iface != "org.damond1.SchemeStats"
        }
        for path, groups in objects.items()
    }


async def test_dump_and_start_config_round_trip(
    damond: Damond, sleeper: subprocess.Popen[bytes], tmp_path: Path
) -> None:
    # a scheme comes in a damo file, in damo's units
    scheme = {
        "action": "stat",
        "access_pattern": {"nr_accesses": {"min": "0 %", "max": "50 %"},
                           "age": {"min": 0, "max": "1 s"}},
        "filters": [{"filter_type": "anon", "matching": True, "allow": True}],
    }
    document = {"kdamonds": [{"contexts": [{
        "ops": "vaddr", "targets": [{"pid": sleeper.pid}],
        "intervals": {"sample_us": "2ms", "aggr_us": "40ms"}, "schemes": [scheme],
    }]}]}  # fmt: skip
    with_scheme = tmp_path / "with-scheme.json"
    with_scheme.write_text(json.dumps(document))
    snapshots = await damond.signals(path=C0, member="Snapshot")
    assert ctl(damond, "start", "--config", str(with_scheme)).stdout.strip() == K0
    assert await damond.get(S0, "org.damond1.AccessPattern", "nr_accesses_max") == 10  # of 20
    assert await damond.get(S0, "org.damond1.AccessPattern", "age_max") == 25  # 1 s / 40 ms
    await snapshots.next(timeout=10)  # the scheme has been applied once
    status = json.loads(ctl(damond, "--json", "status").stdout)
    [shown] = status["contexts"][0]["schemes"]
    assert shown["action"] == "stat" and shown["nr_tried"] >= 1 and shown["sz_tried"] > 0
    assert shown["nr_applied"] == 0  # stat applies nothing
    assert "scheme 0: stat, tried" in ctl(damond, "status").stdout

    dumped = tmp_path / "kdamonds.yaml"
    ctl(damond, "dump", "--format", "yaml", "-o", str(dumped))
    before = await damond.managed_objects()
    # the dump, schemes and all, is what runs: tune --config commits it without a restart
    assert ctl(damond, "tune", "--config", str(dumped)).stdout.strip() == f"{K0}: commit"
    ctl(damond, "stop")
    # a running kdamond: start --config refuses, saying what to do
    ctl(damond, "start", "--pid", str(sleeper.pid))
    busy = ctl(damond, "start", "--config", str(dumped), check=False)
    assert busy.returncode == EXIT_REFUSED and "tune --config" in busy.stderr
    ctl(damond, "stop")
    ctl(damond, "start", "--config", str(dumped))
    after = settings(await damond.managed_objects())
    assert after[C0] == settings(before)[C0]  # intervals, access check, … as dumped
    assert after[S0] == settings(before)[S0]  # the scheme too
    assert after[f"{S0}/filters/0"] == before[f"{S0}/filters/0"]
    assert await damond.get(K0, "org.damond1.Kdamond", "state") == "on"
    # a document damond cannot honour is refused before anything is written
    bad = tmp_path / "bad.json"
    scheme["action"] = "migrate_hot"
    bad.write_text(json.dumps(document))
    objects = settings(await damond.managed_objects())
    refused = ctl(damond, "tune", "--config", str(bad), check=False)
    assert refused.returncode == EXIT_INPUT
    assert "kdamonds[0].contexts[0].schemes[0].action: the migrate_hot action" in refused.stderr
    assert settings(await damond.managed_objects()) == objects


async def test_errors_have_meaningful_exit_codes(damond: Damond, tmp_path: Path) -> None:
    dead = ctl(damond, "start", "--pid", str(2**22 + 99), check=False)
    assert dead.returncode == EXIT_REFUSED
    assert "targets/0: pid 4194403 is not a live process [InvalidArgument]" in dead.stderr
    # the refused start added no kdamond
    assert await damond.get(ROOT, "org.damond1.Kdamonds", "nr") == 0
    gone = subprocess.run(
        [sys.executable, "-m", "damond.tools.ctl", "--bus", f"unix:path={tmp_path}/none",
         "status"], capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert gone.returncode == EXIT_UNREACHABLE and "cannot connect" in gone.stderr
    missing = ctl(damond, "start", "--config", str(tmp_path / "nope.json"), check=False)
    assert missing.returncode == EXIT_INPUT and "nope.json: cannot read" in missing.stderr
    assert ctl(damond, "start", check=False).returncode == 2  # needs --pid
    assert "Traceback" not in dead.stderr + gone.stderr + missing.stderr


async def test_wss_is_the_known_working_set(
    damond: Damond, hot_workload: tuple[subprocess.Popen[bytes], dict[str, Any]]
) -> None:
    """wss starts monitoring the pid by itself, prints one number per aggregation, and
    stops what it started."""
    process, info = hot_workload
    out = ctl(damond, "--json", "wss", str(process.pid), "--count", "12").stdout
    readings = [json.loads(line) for line in out.splitlines()]
    assert len(readings) == 12
    assert all(r["pid"] == process.pid for r in readings)
    seqs = [r["seq"] for r in readings]
    assert seqs == sorted(seqs) and len(set(seqs)) == 12
    hot = info["hot"][1] - info["hot"][0]
    # the first aggregations come before the regions have split down to the buffer
    settled = [r["wss_bytes"] for r in readings[4:]]
    median = statistics.median(settled)
    assert abs(median - hot) <= 0.2 * hot, [round(x / MIB, 1) for x in settled]
    # the naive count (regions with any access, whole) is no better than the estimate
    assert statistics.median(r["accessed_bytes"] for r in readings[4:]) >= median * 0.95
    assert await damond.get(K0, "org.damond1.Kdamond", "state") == "off"  # stopped again


def png_size(path: Path) -> tuple[int, int]:
    header = path.read_bytes()[:24]
    assert header[:8] == b"\x89PNG\r\n\x1a\n", "not a PNG"
    width, height = struct.unpack(">II", header[16:24])
    return width, height


def damo(*args: str) -> subprocess.CompletedProcess[str]:
    executable = shutil.which("damo", path=str(Path(sys.executable).parent))
    assert executable, "damo is a test dependency (pyproject.toml): make venv installs it"
    return subprocess.run([executable, *args], capture_output=True, text=True, timeout=120)


async def test_a_record_reads_in_damos_reports_and_draws(
    damond: Damond,
    hot_workload: tuple[subprocess.Popen[bytes], dict[str, Any]],
    tmp_path: Path,
) -> None:
    process, info = hot_workload
    record = tmp_path / "rec.data"
    summary = json.loads(
        ctl(damond, "--json", "record", "-o", str(record), "--pid", str(process.pid),
            "--duration", "4", "--aggr", "50ms", "--cpu-limit", "0").stdout
    )  # fmt: skip
    # not 80: under clear_refs an aggregation of this process takes longer than asked
    # (and longer still under the default CPU ceiling, which --cpu-limit 0 lifts)
    assert summary["snapshots"] >= 8, summary
    assert sorted(Path(p).name for p in summary["files"]) == [
        "rec.data", "rec.data.kdamonds", "rec.data.vmas",
    ]  # fmt: skip
    assert record.stat().st_mode & 0o777 == 0o600
    hot = (info["hot"][1] - info["hot"][0]) / MIB

    # damo's own reports (they read the file only: no root, no kernel DAMON needed)
    wss = damo("report", "wss", "--input", str(record), "--exclude_samples", "3",
               "--raw_number")  # fmt: skip
    assert wss.returncode == 0, wss.stdout + wss.stderr
    median = next(line for line in wss.stdout.splitlines() if line.split()[:1] == ["50"])
    # damo counts a region as working set when nr_accesses >= 1, whole: an upper bound
    assert int(median.split()[1]) >= 0.8 * hot * MIB, wss.stdout
    heatmap = damo("report", "heatmap", "--input", str(record), "--output", "raw",
                   "--resol", "10", "20")  # fmt: skip
    assert heatmap.returncode == 0, heatmap.stderr
    heats = [float(x.split()[2]) for x in heatmap.stdout.splitlines() if x.strip()]
    assert len(heats) == 200 and max(h for h in heats if h == h) > 0

    # damondctl's pictures of the same record
    png = tmp_path / "heat.png"
    ctl(damond, "report", "heatmap", str(record), "--png", str(png))
    assert png_size(png) == (1200, 800)
    small = tmp_path / "wss.png"
    ctl(damond, "report", "wss", str(record), "--png", str(small), "--width", "640",
        "--height", "480")  # fmt: skip
    assert png_size(small) == (640, 480)
    series = json.loads(ctl(damond, "--json", "report", "wss", str(record)).stdout)
    assert abs(statistics.median(series["wss_bytes"][3:]) / MIB - hot) <= 0.2 * hot
    access = json.loads(ctl(damond, "--json", "report", "access", str(record)).stdout)
    # the hot buffer lies in regions accessed in the last aggregation (cold for 0 s)
    start, end = info["hot"]
    warm = sum(
        max(0, min(end, r["end"]) - max(start, r["start"]))
        for r in access["regions"]
        if r["cold_s"] == 0
    )
    assert warm >= 0.8 * (end - start), access["regions"]
    assert any(r["cold_s"] > 0 for r in access["regions"])  # and the rest has been idle
    named = {r["mapping"] for r in access["regions"] if r["mapping"]}
    assert any(name.endswith(("python3", "python", "[heap]", "[stack]")) or "python" in name
               for name in named), named  # fmt: skip
    terminal = ctl(damond, "report", "heatmap", str(record)).stdout
    assert "access frequency" in terminal and "@" in terminal
