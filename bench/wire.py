"""Bodies marshalled once (damond/wire.py, treecache.py) vs dbus-fast marshalling per send.

The reference is dbus-fast's own path, measured in the same run: Snapshot.as_dbus()
marshalled from Python lists, and GetManagedObjects built from the tree and
marshalled at every call (what the daemon did before). No bus is involved:
this is event-loop time per message.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from typing import Any

import numpy as np

from damond import wire
from damond.bus import BusAdapter, object_path
from damond.hierarchy import Tree
from damond.monitor.snapshot import Snapshot, TargetSnapshot
from damond.treecache import ManagedObjects

TREE_REGIONS = 16_000


def _per_call_s(fn: Callable[[], Any], repeat: int) -> float:
    best = float("inf")
    for _ in range(3):
        started = time.perf_counter()
        for _ in range(repeat):
            fn()
        best = min(best, (time.perf_counter() - started) / repeat)
    return best


def _snapshot(regions: int) -> Snapshot:
    rng = np.random.default_rng(0)
    starts = np.sort(rng.integers(0, 1 << 46, regions, dtype=np.uint64))
    target = TargetSnapshot(
        0,
        1234,
        starts,
        starts + np.uint64(4096),
        rng.integers(0, 20, regions).astype(np.uint32),
        rng.integers(0, 100, regions).astype(np.uint32),
    )
    return Snapshot(1, 0, 20, (target,))


def _tree() -> Tree:
    """4 kdamonds × 4 targets × 1000 regions: the attack tests' 16,000-region tree."""
    tree = Tree(lambda *a: None)  # type: ignore[arg-type, return-value]
    tree.root.set("kdamonds", "nr", 4)
    for kdamond in tree.root.kdamonds.items:
        kdamond.set("contexts", "nr", 1)
        context = kdamond.contexts.items[0]
        context.set("targets", "nr", 4)
        for target in context.targets.items:
            target.set("regions", "nr", TREE_REGIONS // 16)
    return tree


def run() -> dict[str, float]:
    found: dict[str, float] = {}
    for regions in (1000, 10_000):
        snapshot = _snapshot(regions)
        found[f"snapshot_{regions}_dbus_fast"] = _per_call_s(
            lambda s=snapshot: wire.marshal("ttua(uia(ttuu))", s.as_dbus()), 5
        )
        found[f"snapshot_{regions}_wire"] = _per_call_s(
            lambda s=snapshot: wire.snapshot_body(s), 50
        )
    tree = _tree()
    adapter = BusAdapter({}, tree)
    found["tree_objects"] = sum(1 for _ in tree.root.walk()) - 1

    def per_call() -> bytes:  # what the daemon did at every call before
        objects = {
            object_path(n.path): adapter._interfaces_and_properties(n)
            for n in tree.root.walk()
            if n is not tree.root
        }
        return wire.marshal("a{oa{sa{sv}}}", [objects])

    found["managed_dbus_fast"] = _per_call_s(per_call, 2)
    found.update(asyncio.run(_cached(tree, adapter)))
    return found


async def _cached(tree: Tree, adapter: BusAdapter) -> dict[str, float]:
    cache = ManagedObjects(tree, adapter._managed_entry)
    found = {}
    started = time.perf_counter()
    body = await cache.body()
    found["managed_first_build"] = time.perf_counter() - started
    found["managed_mib"] = len(body) / 2**20
    changing = tree.root.kdamonds.items[1].contexts.items[0]
    for key, change in (("managed_cached", False), ("managed_after_one_change", True)):
        best = float("inf")
        for _ in range(20):
            if change:
                cache.changed(changing)
            started = time.perf_counter()
            await cache.body()
            best = min(best, time.perf_counter() - started)
        found[key] = best
    return found


def _ratio(x: float) -> str:
    return f"{x:.1f}×" if x < 10 else f"{x:.0f}×"


def markdown(found: dict[str, float]) -> str:
    rows = [
        "| event-loop time per message (ms) | dbus-fast per send (reference) | "
        "marshalled once | ratio |",
        "|---|---:|---:|---:|",
    ]
    for regions in (1000, 10_000):
        ref, ours = found[f"snapshot_{regions}_dbus_fast"], found[f"snapshot_{regions}_wire"]
        rows.append(
            f"| Snapshot body, {regions} regions | {ref * 1e3:.2f} | {ours * 1e3:.3f} | "
            f"{_ratio(ref / ours)} |"
        )
    ref = found["managed_dbus_fast"]
    n, mib = int(found["tree_objects"]), found["managed_mib"]
    for label, key in (
        (
            "first call after the tree was built (in all; the loop is free every 5 ms)",
            "managed_first_build",
        ),
        ("after one object changed", "managed_after_one_change"),
        ("unchanged tree", "managed_cached"),
    ):
        ours = found[key]
        shown, ratio = (
            (f"{ours * 1e3:.2f}", _ratio(ref / ours)) if ours > 1e-5 else ("< 0.01", "> 10⁴×")
        )
        rows.append(
            f"| GetManagedObjects, {n} objects ({mib:.1f} MiB): {label} | {ref * 1e3:.1f} | "
            f"{shown} | {ratio} |"
        )
    return "\n".join(rows)


if __name__ == "__main__":
    print(markdown(run()))
