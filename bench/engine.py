"""Engine cost per sample and per aggregation at 10, 100 and 1000 regions.

The synthetic ops (no kernel files) isolate the engine's own work. Two setups
per region count N:

- ``fixed``: min = max = N, so merge and split find nothing to do and the
  count really is N: the per-sample cost (prepare + check) at N regions.
- ``adaptive``: min 10, max about 1.4 N, every page accessed with probability
  0.5, so merges and splits happen every aggregation with about N regions:
  the aggregation cost under real churn (regions: the mean count before it).

An aggregation is timed as the whole check() call that ends it.
"""

from __future__ import annotations

import statistics
import time
from typing import Any

import numpy as np

from damond.monitor import ops
from damond.monitor.config import Attrs, ContextConfig, TargetConfig
from damond.monitor.engine import Engine
from damond.monitor.ops.synthetic import SyntheticAccess, SyntheticSpace

BASE = 0x7F0000000000
SIZE = 4 << 30
SIZES = (10, 100, 1000)
AGGREGATIONS = 300
WARMUP = 20


def _percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def _stats(values: list[float]) -> dict[str, float]:
    return {
        "mean": statistics.fmean(values),
        "p50": _percentile(values, 0.5),
        "p99": _percentile(values, 0.99),
    }


def _measure(setup: str, n: int) -> dict[str, Any]:
    if setup == "fixed":
        attrs = Attrs(min_nr_regions=n, max_nr_regions=n)
        access = SyntheticAccess([(BASE, BASE + SIZE // 10)], probability=0.5, seed=1)
    else:
        # the count swings between about max/2 and max: aim its mean at n
        attrs = Attrs(min_nr_regions=min(10, n), max_nr_regions=max(n, n * 10 // 7))
        access = SyntheticAccess([(BASE, BASE + SIZE)], probability=0.5, seed=1)
    config = ContextConfig(ops.VADDR, "synthetic", attrs, (TargetConfig(0, pid=1),))
    engine = Engine(config, SyntheticSpace([(BASE, BASE + SIZE)]), access, np.random.default_rng(1))
    engine.start()
    per_aggregation = attrs.samples_per_aggregation
    samples: list[float] = []
    aggregations: list[float] = []
    counts: list[int] = []
    clock = time.perf_counter_ns
    for round_ in range(WARMUP + AGGREGATIONS):
        for i in range(per_aggregation):
            t0 = clock()
            engine.prepare()
            count = engine.nr_regions
            t1 = clock()
            snapshot = engine.check()
            t2 = clock()
            if round_ < WARMUP:
                continue
            if i == per_aggregation - 1:
                assert snapshot is not None
                aggregations.append((t2 - t1) / 1000)
                counts.append(count)
            else:
                samples.append((t2 - t0) / 1000)
    return {
        "setup": setup,
        "target_regions": n,
        "regions": statistics.fmean(counts),
        "sample_us": _stats(samples),
        "aggregation_us": _stats(aggregations),
    }


def run() -> list[dict[str, Any]]:
    return [_measure(setup, n) for setup in ("fixed", "adaptive") for n in SIZES]


def markdown(results: list[dict[str, Any]]) -> str:
    lines = [
        "| setup | N | regions | sample mean | p50 | p99 | aggregation mean | p50 | p99 |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in results:
        s, a = r["sample_us"], r["aggregation_us"]
        lines.append(
            f"| {r['setup']} | {r['target_regions']} | {r['regions']:.0f} "
            f"| {s['mean']:.1f} | {s['p50']:.1f} | {s['p99']:.1f} "
            f"| {a['mean']:.1f} | {a['p50']:.1f} | {a['p99']:.1f} |"
        )
    note = "(µs; sample = prepare + check; aggregation = the check() call that ends it)"
    return "\n".join(lines) + "\n\n" + note


if __name__ == "__main__":
    print(markdown(run()))
