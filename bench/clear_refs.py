"""What one clear_refs sample costs (prepare + check of 1000 addresses) as a target grows.

The target is a child process whose memory is really resident (one write per
page), re-written between samples as a busy workload would. Both clear_refs
and smaps walk every page table entry, so the cost follows resident memory.
Rows: 64 MiB .. 4 GiB of 4 KiB pages, 4 GiB with transparent huge pages, and a
small process with 20k mappings (where the text parsing dominates instead).

    python -m bench.clear_refs
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from typing import Any

import numpy as np

from bench.table import Column, markdown_table
from bench.target import ChildTarget
from damond.monitor.ops.attribution import MappingCredit
from damond.monitor.ops.clear_refs import (
    ClearRefsAccess,
    mapping_answers,
    parse_smaps,
    referenced_fraction,
)
from damond.monitor.ops.vaddr import parse_maps

MiB = 1 << 20
SAMPLED = 1000
ROUNDS = 7

CHILD = r"""
import ctypes, mmap, sys
size, huge, split = int(sys.argv[1]), sys.argv[2] == "1", int(sys.argv[3])
buf = mmap.mmap(-1, size, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
if huge:
    buf.madvise(mmap.MADV_HUGEPAGE)
buf[0:size:4096] = b"\1" * (size // 4096)
first, step = (4096, 8192) if split else (0, 4096)
if split:  # every other page read-only: `split` more mappings
    libc = ctypes.CDLL(None)
    base = ctypes.addressof(ctypes.c_char.from_buffer(buf))
    for i in range(split):
        libc.mprotect(ctypes.c_void_p(base + 2 * i * 4096), 4096, 1)
ones = b"\2" * len(range(first, size, step))
print(ctypes.addressof(ctypes.c_char.from_buffer(buf)), flush=True)
for line in sys.stdin:  # "touch": write every writable page again
    buf[first:size:step] = ones
    print("ok", flush=True)
"""

CASES = [
    # (label, bytes, transparent huge pages, mappings split off)
    ("64 MiB", 64 * MiB, False, 0),
    ("256 MiB", 256 * MiB, False, 0),
    ("1 GiB", 1024 * MiB, False, 0),
    ("4 GiB", 4096 * MiB, False, 0),
    ("4 GiB THP", 4096 * MiB, True, 0),
    ("80 MiB, 20k mappings", 80 * MiB, False, 10_000),
]


def _ms(fn: Callable[..., Any], *args: Any) -> tuple[float, Any]:
    start = time.perf_counter()
    result = fn(*args)
    return (time.perf_counter() - start) * 1e3, result


class _Target(ChildTarget):
    """A child holding `size` bytes resident, re-writing them on request."""

    def __init__(self, size: int, huge: bool, split: int) -> None:
        super().__init__(CHILD, str(size), "1" if huge else "0", str(split))


def _sample(target: _Target, access: ClearRefsAccess, addrs: np.ndarray) -> dict[str, float]:
    """One sample as the engine takes it, then its check again part by part."""
    proc = access.processes.get(target.config.pid)
    target.touch()  # pages young, as a busy workload leaves them
    clear, _ = _ms(access.prepare, target.config, addrs)
    target.touch()  # the workload during the sampling interval
    check, accessed = _ms(access.check, target.config, addrs)
    read, text = _ms(proc.read, "smaps")
    parse, (maps, referenced) = _ms(parse_smaps, text)
    fraction = referenced_fraction(maps, referenced)
    credit = MappingCredit()
    lookup, _ = _ms(lambda: mapping_answers(maps, credit.fire(maps, fraction), addrs))
    maps_read, maps_text = _ms(proc.read, "maps")
    maps_parse, _ = _ms(parse_maps, maps_text)
    return {
        "mappings": len(maps),
        "referenced_mib": int(referenced.sum()) / MiB,
        "clear_ms": clear,
        "smaps_read_ms": read,
        "smaps_parse_ms": parse,
        "lookup_ms": lookup,
        "total_ms": clear + check,
        "maps_read_ms": maps_read,
        "maps_parse_ms": maps_parse,
        "accessed": float(accessed.mean()),
    }


def _measure(size: int, huge: bool, split: int) -> dict[str, float]:
    """Medians over ROUNDS samples of one target."""
    target = _Target(size, huge, split)
    access = ClearRefsAccess(seed=0)
    addrs = np.random.default_rng(0).integers(
        target.base, target.base + size, SAMPLED, dtype=np.uint64
    )
    try:
        rows = [_sample(target, access, addrs) for _ in range(ROUNDS)]
    finally:
        access.close()
        target.close()
    return {key: statistics.median(row[key] for row in rows) for key in rows[0]}


def run() -> list[dict[str, Any]]:
    """One row per case: medians over ROUNDS samples, times in milliseconds."""
    return [{"case": label, **_measure(size, huge, split)} for label, size, huge, split in CASES]


COLUMNS: list[Column] = [
    ("case", "target", "{}"),
    ("mappings", "mappings", "{:.0f}"),
    ("referenced_mib", "referenced MiB", "{:.0f}"),
    ("clear_ms", "clear_refs ms", "{:.2f}"),
    ("smaps_read_ms", "smaps read ms", "{:.2f}"),
    ("smaps_parse_ms", "smaps parse ms", "{:.2f}"),
    ("lookup_ms", "1000 answers ms", "{:.3f}"),
    ("total_ms", "per sample ms", "{:.2f}"),
    ("maps_read_ms", "maps read ms", "{:.2f}"),
    ("maps_parse_ms", "maps parse ms", "{:.2f}"),
    ("accessed", "accessed", "{:.2f}"),
]


def markdown(rows: list[dict[str, Any]]) -> str:
    return markdown_table(COLUMNS, rows)


if __name__ == "__main__":
    print(markdown(run()))
