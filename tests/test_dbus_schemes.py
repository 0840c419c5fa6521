"""DAMOS over a real bus: the schemes subtree, its rules, and schemes acting on real processes.

This host has only the clear_refs access check (per mapping), so the
workloads keep what must be told apart in separate mappings: a hot anonymous
buffer and a cold, clean, file-backed one, which MADV_PAGEOUT drops here
without swap. Residency is read from the workload's pagemap.

The contexts ask for conftest.TEST_BACKEND: damond's own engine on the host;
tests/vm/test_guest_kernel_backend.py runs the tests that make sense there on
the guest kernel's own DAMOS (DAMOND_TEST_BACKEND=kernel): the rules, stats and
watermarks. Its pageout of anonymous memory with swap is tests/vm/test_damos.py's.
"""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from conftest import (
    KERNEL_BACKEND,
    ROOT,
    TEST_BACKEND,
    Damond,
    call,
    kernel_tree_state,
    stop_process,
)

from damond.monitor.ops.meminfo import free_mem_rate
from damond.tools.client import covered, set_scheme, start_kdamonds, tried_regions

MiB = 1 << 20
PAGE = 4096
K0 = f"{ROOT}/kdamonds/0"
C0 = f"{K0}/contexts/0"
S0 = f"{C0}/schemes/0"
INVALID = "org.damond1.Error.InvalidArgument"
NOT_SUPPORTED = "org.damond1.Error.NotSupported"
BUSY = "org.damond1.Error.Busy"
NO_DATA = "org.damond1.Error.NoData"
COLD_MIB = 64
HOT_MIB = 8
IDLE_AGGREGATIONS = 20
"""2 s of idleness at the default 100 ms aggregations: the scheme's age_min."""
BACKEND = "kernel" if KERNEL_BACKEND else "user"
REFUSED: dict[str, list[tuple[str, str, str, Any, str]]] = {
    "user": [
        ("Scheme", "action", "s", "nohugepage", "VMA"),
        ("Scheme", "action", "s", "lru_prio", "LRU"),
        ("Filter", "type", "s", "memcg", "cgroup"),
        ("Filter", "type", "s", "young", "young"),
    ],
    "kernel": [  # Linux 6.12's vaddr: madvise, no per page filter, no allow file
        ("Scheme", "action", "s", "lru_prio", "the kernel's vaddr operations do not do it"),
        ("Scheme", "action", "s", "lru_deprio", "the kernel's vaddr operations do not do it"),
        ("Filter", "type", "s", "anon", "the kernel's vaddr operations ignore it"),
        ("Filter", "type", "s", "memcg", "ignore it"),
        ("Filter", "type", "s", "young", "ignore it"),
        ("Filter", "allow", "b", True, "can only reject"),
    ],
}
"""What each backend refuses on vaddr (NotSupported), and a word of why."""


@pytest.fixture
def file_workload(tmp_path: Path) -> Iterator[tuple[subprocess.Popen[bytes], dict[str, Any]]]:
    """A hot anonymous buffer written continuously and a cold, clean 64 MiB file mapping."""
    data = Path("/var/tmp") / f"damond-cold-{tmp_path.name}.bin"  # a disk, not tmpfs
    process = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "damond.tools.workload",
            "--hot-mib",
            str(HOT_MIB),
            "--cold-mib",
            str(COLD_MIB),
            "--cold-file",
            str(data),
        ],
        stdout=subprocess.PIPE,
    )
    assert process.stdout is not None
    info = json.loads(process.stdout.readline())
    try:
        yield process, info
    finally:
        stop_process(process)
        data.unlink(missing_ok=True)


def resident(pid: int, start: int, end: int) -> int:
    """Bytes of [start, end) of pid's memory that are present (pagemap bit 63)."""
    with open(f"/proc/{pid}/pagemap", "rb") as f:
        f.seek(start // PAGE * 8)
        entries = np.frombuffer(f.read((end - start) // PAGE * 8), dtype=np.uint64)
    return int(np.count_nonzero(entries >> np.uint64(63))) * PAGE


async def one_scheme(d: Damond, pid: int, **attrs: int) -> None:
    """kdamond 0 monitoring pid, configured but off, with one scheme (defaults). No CPU
    ceiling unless asked: the tests count their seconds in aggregations at the asked pace."""
    await start_kdamonds(d.client, [pid], TEST_BACKEND, **{"cpu_limit_pct": 0, **attrs})
    await d.set(K0, "org.damond1.Kdamond", "state", "s", "off")
    await d.set(C0, "org.damond1.Schemes", "nr", "u", 1)


async def test_pageout_drops_the_cold_mapping_and_keeps_the_hot_one(
    damond: Damond, file_workload: tuple[subprocess.Popen[bytes], dict[str, Any]]
) -> None:
    """The proof on this host: regions idle for 2 s are paged out; within 15 s at least
    80 % of the cold file mapping is gone while the hot buffer stays 95 % resident,
    and the stats and tried regions say so."""
    process, info = file_workload
    cold, hot = info["cold"], info["hot"]
    assert resident(process.pid, *cold) == COLD_MIB * MiB
    await one_scheme(damond, process.pid)
    await set_scheme(
        damond.client, C0, 0, action="pageout", nr_accesses_max=0, age_min=IDLE_AGGREGATIONS
    )
    snapshots = await damond.signals(path=C0, member="Snapshot")
    await damond.set(K0, "org.damond1.Kdamond", "state", "s", "on")
    started = time.monotonic()
    tried: list[tuple[int, int, int, int, int]] = []
    hot_lowest = 1.0
    cold_left = 1.0
    while time.monotonic() - started < 15 and cold_left > 0.2:
        await snapshots.next(timeout=10)
        hot_lowest = min(hot_lowest, resident(process.pid, *hot) / (HOT_MIB * MiB))
        cold_left = resident(process.pid, *cold) / (COLD_MIB * MiB)
        reply = await call(damond.client, S0, "org.damond1.Scheme", "GetTriedRegions")
        if reply.error_name is None:
            tried += [tuple(r) for r in reply.body[0]]
        else:
            assert reply.error_name == NO_DATA  # before the first application
    elapsed = time.monotonic() - started
    assert cold_left <= 0.2, f"{cold_left:.0%} of the cold mapping still resident after 15 s"
    assert hot_lowest >= 0.95, f"the hot buffer fell to {hot_lowest:.0%} resident"
    print(f"\ncold mapping {cold_left:.0%} resident after {elapsed:.1f} s; hot >= {hot_lowest:.0%}")

    # every region tried matched the pattern, and they cover the cold mapping. (They may
    # reach into the hot buffer: a region straddling its end and 64 MiB of idle memory
    # beside it can see none of its 20 samples land in the hot part, DAMON's resolution;
    # those pages are paged out and written again at once, which the 95 % allows for.)
    assert tried and all(nr == 0 and age >= IDLE_AGGREGATIONS for _, _, _, nr, age in tried)
    assert covered([(s, e) for _, s, e, _, _ in tried], *cold) >= 0.8 * COLD_MIB * MiB
    stats = {
        n: await damond.get(S0, "org.damond1.SchemeStats", n)
        for n in ("nr_tried", "sz_tried", "nr_applied", "sz_applied", "qt_exceeds")
    }
    assert stats["nr_tried"] >= stats["nr_applied"] >= 1, stats
    assert stats["sz_tried"] >= stats["sz_applied"] >= 0.8 * COLD_MIB * MiB, stats
    assert (
        stats["qt_exceeds"] == 0
        and await damond.get(S0, "org.damond1.Quotas", "effective_bytes") == 0
    )
    await damond.set(K0, "org.damond1.Kdamond", "state", "s", "off")
    assert await damond.get(S0, "org.damond1.SchemeStats", "nr_tried") >= stats["nr_tried"]  # kept


async def test_filters_exclude_what_they_say(
    damond: Damond, file_workload: tuple[subprocess.Popen[bytes], dict[str, Any]]
) -> None:
    """An addr filter lets only the first half of the cold mapping through; then an anon
    filter that rejects file pages keeps the rest resident although it is tried.

    (The second step has no addr filter: a region that straddles an addr filter's
    edge is cut and only its first part is decided in that pass, as in the kernel;
    idle neighbours merge again by the next pass, so the part beyond the edge of an
    idle mapping can wait long.)"""
    process, info = file_workload
    start, end = info["cold"]
    half = start + (end - start) // 2
    await one_scheme(damond, process.pid, aggr_us=20_000)
    first_half = {
        "type": "addr",
        "matching": True,
        "allow": True,
        "addr_start": start,
        "addr_end": half,
    }
    await set_scheme(
        damond.client, C0, 0, (first_half,), action="pageout", nr_accesses_max=0, age_min=10
    )
    snapshots = await damond.signals(path=C0, member="Snapshot")
    await damond.set(K0, "org.damond1.Kdamond", "state", "s", "on")
    for _ in range(500):
        await snapshots.next(timeout=10)
        if resident(process.pid, start, half) <= 0.2 * (half - start):
            break
    assert resident(process.pid, start, half) <= 0.2 * (half - start)
    assert resident(process.pid, half, end) == end - half  # excluded: all still there

    # now only an anon filter that rejects file pages: the rest is tried, and kept
    await damond.set(K0, "org.damond1.Kdamond", "state", "s", "off")
    f0 = f"{S0}/filters/0"
    await damond.set(f0, "org.damond1.Filter", "type", "s", "anon")
    await damond.set(f0, "org.damond1.Filter", "matching", "b", False)
    await damond.set(f0, "org.damond1.Filter", "allow", "b", False)
    snapshots.drain()
    await damond.set(K0, "org.damond1.Kdamond", "state", "s", "on")
    tried_ranges: list[tuple[int, int]] = []
    deadline = time.monotonic() + 30
    while covered(tried_ranges, half, end) < 0.9 * (end - half) and time.monotonic() < deadline:
        await snapshots.next(timeout=10)
        reply = await call(damond.client, S0, "org.damond1.Scheme", "GetTriedRegions")
        if reply.error_name is None:
            tried_ranges += [(r[1], r[2]) for r in reply.body[0]]
    assert covered(tried_ranges, half, end) >= 0.9 * (end - half)  # the scheme was tried...
    assert resident(process.pid, half, end) == end - half  # ...and the anon filter kept it


async def test_watermarks_pause_and_resume_a_scheme(damond: Damond, sleeper: Any) -> None:
    """free_mem_rate above the high watermark: the only scheme is off and the kdamond
    samples nothing; a commit that puts the rate between low and mid turns it on."""
    await one_scheme(damond, sleeper.pid, aggr_us=20_000)
    off = {"metric": "free_mem_rate", "interval_us": 10_000, "high": 0, "mid": 0, "low": 0}
    await set_scheme(damond.client, C0, 0, **off)
    snapshots = await damond.signals(path=C0, member="Snapshot")
    await damond.set(K0, "org.damond1.Kdamond", "state", "s", "on")
    await asyncio.sleep(0.5)  # no event says "nothing happened": 25 aggregations' time
    assert snapshots.drain() == []
    reply = await call(damond.client, C0, "org.damond1.Context", "GetSnapshot")
    assert reply.error_name == NO_DATA
    if not KERNEL_BACKEND:  # damond's engine says so; the kernel's kdamond says nothing
        assert "deactivated" in damond.stderr()
    for name, value in (("high", 1000), ("mid", 1000)):
        await damond.set(S0, "org.damond1.Watermarks", name, "t", value)
    if KERNEL_BACKEND:
        # Linux 6.12 takes a commit at the end of an aggregation, which a kdamond whose
        # schemes are all off never reaches (docs/dbus-api.md): off and on again
        await damond.set(K0, "org.damond1.Kdamond", "state", "s", "off")
        await damond.set(K0, "org.damond1.Kdamond", "state", "s", "on")
    else:
        await damond.set(K0, "org.damond1.Kdamond", "state", "s", "commit")
    await snapshots.next(timeout=10)
    snapshot = await snapshots.next(timeout=10)
    assert snapshot.body[0] >= 2
    assert (await tried_regions(damond.client, S0)) != []  # stat tried every region


async def test_stats_are_announced_at_most_once_a_second(damond: Damond, sleeper: Any) -> None:
    await one_scheme(damond, sleeper.pid, sample_us=1000, aggr_us=10_000)
    changes = await damond.signals(path=S0, member="PropertiesChanged")
    await damond.set(K0, "org.damond1.Kdamond", "state", "s", "on")
    times, counts = [], []
    while len(times) < 3:
        msg = await changes.next(timeout=5)
        if msg.body[0] == "org.damond1.SchemeStats":
            times.append(time.monotonic())
            counts.append(msg.body[1]["nr_tried"].value)
    gaps = [b - a for a, b in zip(times, times[1:], strict=False)]
    assert all(g >= 0.9 for g in gaps), gaps  # 100 aggregations a second, one announcement
    assert counts == sorted(counts) and counts[0] > 0
    await damond.set(K0, "org.damond1.Kdamond", "state", "s", "off")
    final = await damond.get(S0, "org.damond1.SchemeStats", "nr_tried")
    assert final >= counts[-1]


async def test_bad_scheme_values_get_the_contracts_errors_and_change_nothing(
    damond: Damond, sleeper: Any
) -> None:
    d = damond
    await one_scheme(d, sleeper.pid)
    await d.set(S0, "org.damond1.Filters", "nr", "u", 1)
    f0 = f"{S0}/filters/0"
    await d.set(f0, "org.damond1.Filter", "type", "s", "addr")  # what every backend honours
    before = await d.managed_objects()
    kernel = kernel_tree_state() if KERNEL_BACKEND else None  # nothing is written there

    async def refused(
        path: str, iface: str, name: str, sig: str, value: Any, error: str, *words: str
    ) -> None:
        reply = await d.try_set(path, iface, name, sig, value)
        assert reply.error_name == error, (name, value, reply.body)
        assert all(w in reply.body[0] for w in words), reply.body[0]
        assert await d.managed_objects() == before
        assert (kernel_tree_state() if KERNEL_BACKEND else None) == kernel

    await refused(S0, "org.damond1.Scheme", "action", "s", "explode", INVALID, S0, "explode")
    avail = await d.get(S0, "org.damond1.Scheme", "avail_actions")
    for iface, name, sig, value, why in REFUSED[BACKEND]:  # what this backend cannot do
        path = S0 if iface == "Scheme" else f0
        await refused(path, f"org.damond1.{iface}", name, sig, value, NOT_SUPPORTED, why, path)
        assert name != "action" or value not in avail
    await refused(S0, "org.damond1.Scheme", "avail_actions", "as", [], INVALID, "read-only")
    await refused(S0, "org.damond1.SchemeStats", "nr_tried", "t", 1, INVALID, "read-only")
    await refused(S0, "org.damond1.Watermarks", "metric", "s", "ram", INVALID, "ram")
    await refused(S0, "org.damond1.AccessPattern", "age_min", "t", 1, INVALID, "'u'")
    await refused(f0, "org.damond1.Filter", "type", "s", "huge", INVALID, "huge")
    await refused(f0, "org.damond1.Filter", "matching", "s", "Y", INVALID, "'b'")
    await refused(f0, "org.damond1.Filter", "memcg_path", "s", "x" * 5000, INVALID, "4096")
    assert set(await d.get(S0, "org.damond1.Scheme", "avail_actions")) >= {"stat", "pageout"}

    # rules checked at on: named after the scheme or filter, nothing started
    for iface, name, sig, value, words in [
        ("org.damond1.AccessPattern", "age_min", "u", 10, ()),
        ("org.damond1.AccessPattern", "age_max", "u", 5, ("age_min (10) must be <=", S0)),
        ("org.damond1.AccessPattern", "age_max", "u", 10, ()),
        ("org.damond1.Watermarks", "metric", "s", "free_mem_rate", ()),
        ("org.damond1.Watermarks", "low", "t", 700, ("low (700) <= mid (0)", S0)),
        ("org.damond1.Watermarks", "low", "t", 0, ()),
    ]:
        await d.set(S0, iface, name, sig, value)
        if words:
            reply = await d.try_set(K0, "org.damond1.Kdamond", "state", "s", "on")
            assert reply.error_name == INVALID, reply.body
            assert all(w in reply.body[0] for w in words), reply.body
            assert await d.get(K0, "org.damond1.Kdamond", "state") == "off"
            assert (kernel_tree_state() if KERNEL_BACKEND else None) == kernel
    await d.set(f0, "org.damond1.Filter", "type", "s", "target")
    await d.set(f0, "org.damond1.Filter", "target_idx", "u", 3)
    reply = await d.try_set(K0, "org.damond1.Kdamond", "state", "s", "on")
    assert reply.error_name == INVALID and f"{f0}: target filter target_idx (3)" in reply.body[0]
    await d.set(f0, "org.damond1.Filter", "target_idx", "u", 0)

    # GetTriedRegions before any application; nr while on: Busy; values wait for commit
    reply = await call(d.client, S0, "org.damond1.Scheme", "GetTriedRegions")
    assert reply.error_name == NO_DATA and S0 in reply.body[0]
    await d.set(K0, "org.damond1.Kdamond", "state", "s", "on")
    for path, iface in ((C0, "org.damond1.Schemes"), (S0, "org.damond1.Filters")):
        reply = await d.try_set(path, iface, "nr", "u", 2)
        assert reply.error_name == BUSY, reply.body
    await d.set(S0, "org.damond1.Scheme", "action", "s", "pageout")  # stored: on at commit
    await d.set(K0, "org.damond1.Kdamond", "state", "s", "off")


async def test_the_damos_walkthrough_with_busctl(damond: Damond, sleeper: Any) -> None:
    """docs/dbus-api.md's DAMOS walkthrough, command by command."""
    await start_kdamonds(damond.client, [sleeper.pid])
    b = ["set-property", "org.damond1"]
    get = ["get-property", "org.damond1", S0]
    damond.busctl(*b, K0, "org.damond1.Kdamond", "state", "s", "off")
    damond.busctl(*b, C0, "org.damond1.Schemes", "nr", "u", "1")
    avail = damond.busctl(*get, "org.damond1.Scheme", "avail_actions").stdout
    assert avail.startswith("as ") and '"pageout"' in avail and '"lru_prio"' not in avail
    for iface, name, sig, value in [
        ("Scheme", "action", "s", "pageout"),
        ("AccessPattern", "nr_accesses_max", "u", "0"),
        ("AccessPattern", "age_min", "u", "20"),
        ("Quotas", "bytes", "t", str(64 << 20)),
        ("Quotas", "reset_interval_ms", "t", "1000"),
        ("Quotas", "weight_age", "u", "1000"),
        ("Watermarks", "metric", "s", "free_mem_rate"),
        ("Watermarks", "interval_us", "t", "1000000"),
        ("Watermarks", "high", "t", "500"),
        ("Watermarks", "mid", "t", "400"),
        ("Watermarks", "low", "t", "50"),
        ("Filters", "nr", "u", "1"),
    ]:
        damond.busctl(*b, S0, f"org.damond1.{iface}", name, sig, value)
    damond.busctl(*b, f"{S0}/filters/0", "org.damond1.Filter", "type", "s", "anon")
    damond.busctl(*b, f"{S0}/filters/0", "org.damond1.Filter", "matching", "b", "false")
    damond.busctl(*b, K0, "org.damond1.Kdamond", "state", "s", "on")
    stats = damond.busctl(*get, "org.damond1.SchemeStats", "nr_tried", "sz_applied").stdout
    assert stats.split() == ["t", "0", "t", "0"]  # nothing yet (or paused: see below)
    assert damond.busctl(*get, "org.damond1.Quotas", "effective_bytes").stdout.startswith("t ")
    tried = damond.busctl(
        "call", "org.damond1", S0, "org.damond1.Scheme", "GetTriedRegions", check=False
    )
    if free_mem_rate() > 500:  # above high: the scheme (the only one) is off, nothing sampled
        assert tried.returncode != 0 and "not been applied" in tried.stderr, tried
    else:
        assert tried.returncode == 0 or "not been applied" in tried.stderr, tried
    assert (await damond.get(K0, "org.damond1.Kdamond", "state")) == "on"
