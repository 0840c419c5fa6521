"""What this host's access check makes of a real workload, through DAMON's algorithm.

The engine (no daemon, no bus) samples a real process with the access check
this kernel offers (clear_refs: smaps' Referenced per mapping) at the default
intervals. The workload is the one per-mapping information cannot see into:
two equal malloc'd buffers that the kernel merged into one mapping, one of
them written continuously, the other idle (damond.tools.pair).
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from collections.abc import Iterator
from typing import Any

import numpy as np
import pytest
from conftest import stop_process

from damond.monitor import ops
from damond.monitor.config import Attrs, ContextConfig, TargetConfig
from damond.monitor.engine import Engine
from damond.monitor.ops.process import ProcessTable
from damond.monitor.snapshot import Snapshot

MIB = 1 << 20
BUFFER_MIB = 64
"""Far over what the TLB maps: clear_refs clears accessed bits without a TLB flush, so a
buffer the TLB covers would be written without the kernel seeing it (workload.py)."""
AGGREGATIONS = 30
LAST = 10


@pytest.fixture
def pair() -> Iterator[tuple[subprocess.Popen[bytes], dict[str, Any]]]:
    process = subprocess.Popen(
        [sys.executable, "-m", "damond.tools.pair", "--mib", str(BUFFER_MIB), "--switch-s", "0"]
        + ["--pause-ms", "1", "--per-page"],  # a pass in about a millisecond: every sample
        stdout=subprocess.PIPE,
    )
    assert process.stdout is not None
    info = json.loads(process.stdout.readline())
    yield process, info
    stop_process(process)


def run_engine(pid: int, access_check: str, aggregations: int) -> list[Snapshot]:
    """The engine at the default attributes, paced as the kdamond paces it (sample_us)."""
    table = ProcessTable()
    config = ContextConfig(ops.VADDR, access_check, Attrs(), (TargetConfig(0, pid),))
    engine = Engine(config, ops.VADDR.space(table), ops.REGISTRY.make_access(access_check, table))
    snapshots: list[Snapshot] = []
    try:
        engine.start()
        while len(snapshots) < aggregations:
            engine.prepare()
            time.sleep(config.attrs.sample_us / 1e6)
            snapshot = engine.check()
            if snapshot is not None:
                snapshots.append(snapshot)
    finally:
        engine.close()
        table.close()
    return snapshots


def weighted_bytes(snapshot: Snapshot, span: tuple[int, int]) -> float:
    """The working set in span: each region's bytes there × nr_accesses / max_nr_accesses."""
    target = snapshot.targets[0]
    overlap = np.clip(
        np.minimum(target.ends, np.uint64(span[1])).astype(np.int64)
        - np.maximum(target.starts, np.uint64(span[0])).astype(np.int64),
        0,
        None,
    )
    return float((overlap * target.nr_accesses).sum()) / snapshot.max_nr_accesses


def test_one_mapping_half_written_is_half_accessed_without_fragmenting(
    pair: tuple[subprocess.Popen[bytes], dict[str, Any]],
) -> None:
    """clear_refs answers per mapping: regions over the merged buffers must not split on
    chance (they did, into hundreds, when each sample was a coin flip), and the working
    set weighted by nr_accesses is the written buffer's size."""
    process, info = pair
    assert info["one_mapping"], info
    check = ops.REGISTRY.resolve_access_check("auto", "vaddr")
    if check != "clear_refs":
        pytest.skip(f"this kernel offers {check}: the per-mapping case is tested where it is not")
    snapshots = run_engine(process.pid, check, AGGREGATIONS)[-LAST:]
    regions = [len(s.targets[0].starts) for s in snapshots]
    assert max(regions) <= 50, regions
    estimates = [weighted_bytes(s, tuple(info["mapping"])) / (BUFFER_MIB * MIB) for s in snapshots]
    # the median: a busy machine may keep the writer from a full pass in some samples
    assert 0.8 <= float(np.median(estimates)) <= 1.2, estimates
