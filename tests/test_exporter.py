"""damond-exporter against the real daemon: /metrics scraped over HTTP on loopback and
parsed with prometheus_client's own parser, for a workload whose working set is known,
with a DAMOS stat scheme whose counters grow."""

from __future__ import annotations

import socket
import subprocess
import sys
import urllib.request
from collections.abc import Iterator
from typing import Any

import pytest
from conftest import ROOT, Damond, start_workload, stop_process
from prometheus_client.parser import text_string_to_metric_families

from damond import kdamonds_format as fmt
from damond.tools.tree import run_steps

C0 = f"{ROOT}/kdamonds/0/contexts/0"
S0 = f"{C0}/schemes/0"
MIB = 1 << 20


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture
def workload32() -> Iterator[tuple[subprocess.Popen[bytes], dict[str, Any]]]:
    process, info = start_workload(32, 64)
    yield process, info
    stop_process(process)


def scrape(url: str) -> dict[str, list[Any]]:
    with urllib.request.urlopen(url, timeout=10) as reply:
        text = reply.read().decode()
    return {f.name: f.samples for f in text_string_to_metric_families(text)}


async def test_metrics_of_a_running_context(
    damond: Damond, workload32: tuple[subprocess.Popen[bytes], dict[str, Any]]
) -> None:
    process, info = workload32
    port = free_port()
    exporter = subprocess.Popen(
        [sys.executable, "-m", "damond.tools.exporter", "--bus", damond.address,
         "--listen", f"127.0.0.1:{port}"],
        stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        assert exporter.stderr is not None
        ready = exporter.stderr.readline()  # said once it listens
        assert f"serving /metrics on 127.0.0.1:{port}" in ready, ready
        snapshots = await damond.signals(path=C0, member="Snapshot")
        stats = await damond.signals(path=S0, member="PropertiesChanged")
        context = {"ops": "vaddr", "targets": [{"pid": process.pid}],
                   "intervals": {"aggr_us": "50 ms"}, "schemes": [{"action": "stat"}]}
        await run_steps(damond.client, fmt.build(fmt.parse({"kdamonds": [
            {"contexts": [context]}]})))  # fmt: skip
        for _ in range(8):  # enough aggregations for the regions to settle on the buffer
            await snapshots.next(timeout=10)
        url = f"http://127.0.0.1:{port}/metrics"
        metrics: dict[str, list[Any]] = {}
        for _ in range(20):
            metrics = scrape(url)
            if metrics.get("damond_wss_bytes"):
                break
            await snapshots.next(timeout=10)  # the next snapshot reaches the exporter too
        assert metrics.get("damond_wss_bytes"), metrics.keys()
        [up] = metrics["damond_up"]
        assert up.value == 1
        [wss] = metrics["damond_wss_bytes"]
        assert wss.labels == {"kdamond": "0", "context": "0", "target": "0",
                              "pid": str(process.pid), "comm": "python"}  # fmt: skip
        hot = info["hot"][1] - info["hot"][0]
        assert abs(wss.value - hot) <= 0.2 * hot, wss.value / MIB
        [monitored] = metrics["damond_monitored_bytes"]
        assert monitored.value >= info["cold"][1] - info["hot"][0]
        [regions] = metrics["damond_regions"]
        assert regions.value >= 10
        quantiles = {s.labels["quantile"]: s.value for s in metrics["damond_idle_time_seconds"]}
        assert set(quantiles) == {"0", "0.25", "0.5", "0.75", "0.9", "0.99", "1"}
        assert quantiles["0"] == 0  # the hot buffer
        assert quantiles["1"] > 0 and quantiles["0.5"] <= quantiles["1"]
        [count] = metrics["damond_snapshots"]
        assert count.name == "damond_snapshots_total" and count.value >= 1
        assert [s.value for s in metrics["damond_snapshot_seq_gaps"]] == [0]
        [rate] = metrics["damond_sample_rate_hertz"]
        assert 0 < rate.value <= 1e6 / 5000 * 1.2
        [aggregation] = metrics["damond_aggregation_interval_seconds"]
        assert aggregation.value >= 0.05 * 0.8
        assert [s.value for s in metrics["damond_kdamond_running"]] == [1]

        # the scheme's counters, from the tree the exporter reads again when stats change
        labels = {"kdamond": "0", "context": "0", "scheme": "0", "action": "stat"}
        seen: list[float] = []
        for _ in range(10):
            tried = scrape(url).get("damond_scheme_tried_regions", [])
            if tried:
                [sample] = tried
                assert sample.name == "damond_scheme_tried_regions_total"
                assert sample.labels == labels
                if sample.value > 0:
                    seen.append(sample.value)
                if len(seen) > 1 and seen[-1] > seen[0]:
                    break
            await stats.next(timeout=10)  # the daemon announces stats at most once a second
        assert len(seen) > 1 and seen[-1] > seen[0], seen
        scraped = scrape(url)
        for family in ("damond_scheme_tried_bytes", "damond_scheme_applied_regions",
                       "damond_scheme_applied_bytes", "damond_scheme_quota_exceeds"):  # fmt: skip
            assert [s.labels for s in scraped[family]] == [labels], family
        assert scraped["damond_scheme_tried_bytes"][0].value > 0
        assert scraped["damond_scheme_applied_regions"][0].value == 0  # stat applies nothing
    finally:
        exporter.terminate()
        assert exporter.wait(timeout=10) == 0
        assert exporter.stderr is not None
        log = exporter.stderr.read()
        assert "Traceback" not in log, log
