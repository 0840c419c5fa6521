"""D-Bus benchmarks: Snapshot delivery at 1000 regions, Get latency under load.

Everything is real: a private dbus-daemon, the daemon from this tree, dbus-fast
clients, `sleep` processes as targets. References in the same run: Get latency
with no kdamond running, and the aggregation rate the daemon was asked for.
"""

from __future__ import annotations

import asyncio
import statistics
import subprocess
import tempfile
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

from dbus_fast import Message
from dbus_fast.aio import MessageBus

from damond.tools.client import (
    ROOT,
    SNAPSHOT_RULE,
    add_match,
    connect,
    get_property,
    start_kdamonds,
)
from damond.tools.privatebus import spawn_daemon, start_private_bus, wait_for_name


def _percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


@asynccontextmanager
async def _daemon() -> AsyncIterator[MessageBus]:
    with start_private_bus() as bus, tempfile.TemporaryDirectory() as tmp:
        client = await connect(bus.address)
        daemon = spawn_daemon(bus.address, Path(tmp) / "damond.log", "--kernel-damon-admin", "off")
        try:
            await wait_for_name(client, "org.damond1", 15)
            yield client
        finally:
            daemon.terminate()
            daemon.wait(timeout=10)
            client.disconnect()


async def _get_latencies(client: MessageBus, n: int) -> list[float]:
    latencies = []
    for _ in range(n):
        t0 = time.perf_counter()
        await get_property(client, ROOT, "org.damond1.Kdamonds", "nr")
        latencies.append((time.perf_counter() - t0) * 1e6)
    return latencies


async def snapshot_delivery(seconds: float = 5.0, aggr_us: int = 10_000) -> dict[str, Any]:
    """Snapshots of 1000 regions as fast as asked: received rate, latency, seq gaps."""
    sleeper = subprocess.Popen(["sleep", "600"])
    try:
        async with _daemon() as client:
            received: list[tuple[int, float, int]] = []

            def on_signal(msg: Message) -> None:
                if msg.member == "Snapshot":
                    received.append(
                        (msg.body[0], time.time() * 1e6 - msg.body[1], len(msg.body[3][0][2]))
                    )

            await add_match(client, SNAPSHOT_RULE)
            client.add_message_handler(on_signal)
            await start_kdamonds(  # no CPU ceiling: the bus, not the sampler, is measured
                client,
                [sleeper.pid],
                sample_us=1000,
                aggr_us=aggr_us,
                min=1000,
                max=1000,
                cpu_limit_pct=0,
            )
            await asyncio.sleep(1.0)  # warm up: regions settle, first snapshots out
            received.clear()
            await asyncio.sleep(seconds)
            got = list(received)
    finally:
        sleeper.kill()
        sleeper.wait()
    seqs = [s for s, _, _ in got]
    gaps = sum(b - a - 1 for a, b in zip(seqs, seqs[1:], strict=False))
    latencies = [lat for _, lat, _ in got]
    return {
        "asked_per_s": 1e6 / aggr_us,
        "received_per_s": len(got) / seconds,
        "regions_mean": statistics.mean(n for _, _, n in got),
        "latency_p50_us": _percentile(latencies, 0.5),
        "latency_p99_us": _percentile(latencies, 0.99),
        "seq_gaps": gaps,
    }


async def get_latency_under_load(kdamonds: int = 4, calls: int = 2000) -> dict[str, Any]:
    """Get round trips: idle daemon (reference) vs 4 kdamonds sampling 1000 regions each."""
    sleepers = [subprocess.Popen(["sleep", "600"]) for _ in range(kdamonds)]
    try:
        async with _daemon() as client:
            idle = await _get_latencies(client, calls)
            await start_kdamonds(
                client,
                [s.pid for s in sleepers],
                sample_us=5000,
                aggr_us=100_000,
                min=1000,
                max=1000,
                cpu_limit_pct=0,  # the load is the sampling at its nominal rate
            )
            await asyncio.sleep(1.0)
            loaded = await _get_latencies(client, calls)
    finally:
        for s in sleepers:
            s.kill()
            s.wait()
    return {
        "idle_p50_us": _percentile(idle, 0.5),
        "idle_p99_us": _percentile(idle, 0.99),
        "loaded_p50_us": _percentile(loaded, 0.5),
        "loaded_p99_us": _percentile(loaded, 0.99),
        "p99_ratio": _percentile(loaded, 0.99) / _percentile(idle, 0.99),
    }


def run() -> dict[str, dict[str, Any]]:
    return {
        "snapshot_delivery": asyncio.run(snapshot_delivery(aggr_us=10_000)),
        "snapshot_flood": asyncio.run(snapshot_delivery(aggr_us=1_000)),
        "get_latency": asyncio.run(get_latency_under_load()),
    }


def markdown(results: dict[str, dict[str, Any]]) -> str:
    d, f, g = results["snapshot_delivery"], results["snapshot_flood"], results["get_latency"]
    return "\n".join(
        [
            "| Snapshot signals, 1000 regions, one dbus-fast client | 10 ms aggr | 1 ms aggr |",
            "|---|---:|---:|",
            f"| asked (aggregations/s) | {d['asked_per_s']:.0f} | {f['asked_per_s']:.0f} |",
            f"| received (/s) | {d['received_per_s']:.0f} | {f['received_per_s']:.0f} |",
            f"| regions per snapshot (mean) | {d['regions_mean']:.0f} | {f['regions_mean']:.0f} |",
            f"| latency end of aggregation → client, p50 (ms) | {d['latency_p50_us'] / 1e3:.2f} "
            f"| {f['latency_p50_us'] / 1e3:.2f} |",
            f"| latency p99 (ms) | {d['latency_p99_us'] / 1e3:.2f} "
            f"| {f['latency_p99_us'] / 1e3:.2f} |",
            f"| seq gaps seen by the client | {d['seq_gaps']} | {f['seq_gaps']} |",
            "",
            "| Get round trip (µs) | p50 | p99 |",
            "|---|---:|---:|",
            f"| idle daemon (reference) | {g['idle_p50_us']:.0f} | {g['idle_p99_us']:.0f} |",
            f"| 4 kdamonds × 1000 regions sampling | {g['loaded_p50_us']:.0f} "
            f"| {g['loaded_p99_us']:.0f} |",
            f"| ratio loaded/idle (p99) | | {g['p99_ratio']:.1f}× |",
        ]
    )


if __name__ == "__main__":
    print(markdown(run()))
