"""What a sample costs per region (µs, syscalls): page_idle (C, Python), soft_dirty, clear_refs.

Needs a kernel with idle page tracking, so it runs in the test guest of tests/vm:

    python -m bench.page_idle --vm      # on the host: boots the guest, runs itself there
    python -m bench.page_idle           # where /sys/kernel/mm/page_idle/bitmap exists (root)

The target is a child process with a 256 MiB anonymous buffer, resident, with
4 KiB pages (MADV_NOHUGEPAGE) or transparent huge pages (MADV_HUGEPAGE). It is
split into N equal regions (100, 1000); each sample picks one random address
per region, as the engine does, then: prepare, the child writes the first half
of its buffer, check. Only prepare and check are timed. `paddr` samples the
same pages by physical address. clear_refs does its per-process work once per
sample whatever N is, so its per-region cost is its sample cost / N.

Syscalls are counted in separate, untimed rounds by wrapping os.pread & co.,
and attributed to the file they went to: the C path of page_idle makes its
calls from C, where they are not counted (they are the Python path's calls,
in the same runs); its rows say "in C".
"""

from __future__ import annotations

import argparse
import ctypes
import json
import mmap
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from collections import Counter, defaultdict
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np

from bench.table import Column, markdown_table
from bench.target import ChildTarget
from damond.monitor.config import TargetConfig
from damond.monitor.ops.base import AccessCheck
from damond.monitor.ops.clear_refs import ClearRefsAccess
from damond.monitor.ops.page_idle import (
    BITMAP,
    KERNEL_PAGE,
    KPAGEFLAGS,
    PageIdleAccess,
    decode_pagemap,
)
from damond.monitor.ops.soft_dirty import SoftDirtyAccess

MiB = 1 << 20
SIZE = 256 * MiB
REGIONS = (100, 1000)
ROUNDS = 15
REPO = Path(__file__).resolve().parent.parent

CHILD = r"""
import ctypes, mmap, sys
size, advice = int(sys.argv[1]), sys.argv[2]
buf = mmap.mmap(-1, size, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
buf.madvise(mmap.MADV_HUGEPAGE if advice == "huge" else mmap.MADV_NOHUGEPAGE)
buf[0:size:4096] = b"\1" * (size // 4096)
half = b"\2" * (size // 2 // 4096)
print(ctypes.addressof(ctypes.c_char.from_buffer(buf)), flush=True)
for line in sys.stdin:  # "touch": write the first half
    buf[0:size // 2:4096] = half
    print("ok", flush=True)
"""

SYSCALLS = ("pread", "pwrite", "read", "write", "lseek", "open")


class Target(ChildTarget):
    """A child holding SIZE bytes resident, writing the first half on request."""

    def __init__(self, advice: str) -> None:
        super().__init__(CHILD, str(SIZE), advice)

    def addrs(self, n: int, rng: np.random.Generator) -> np.ndarray:
        """One random address in each of n equal regions of the buffer."""
        starts = self.base + np.arange(n, dtype=np.uint64) * np.uint64(SIZE // n)
        return starts + rng.integers(0, SIZE // n, n, dtype=np.uint64)

    def physical(self, addrs: np.ndarray) -> np.ndarray:
        """The physical addresses behind addrs (read untimed, one pread each)."""
        fd = os.open(f"/proc/{self.child.pid}/pagemap", os.O_RDONLY)
        try:
            raw = [os.pread(fd, 8, int(a) // KERNEL_PAGE * 8) for a in addrs]
        finally:
            os.close(fd)
        pfns = decode_pagemap(np.frombuffer(b"".join(raw), dtype=np.uint64))
        return pfns * np.uint64(KERNEL_PAGE) + addrs % np.uint64(KERNEL_PAGE)


class Meter:
    """Syscalls and the µs spent in them, per file they went to."""

    def __init__(self) -> None:
        self.calls: Counter[str] = Counter()
        self.us: dict[str, float] = defaultdict(float)
        self._names: dict[int, str] = {}

    def file_of(self, fd: object) -> str:
        if not isinstance(fd, int):
            return os.path.basename(str(fd))
        if fd not in self._names:
            self._names[fd] = os.path.basename(os.readlink(f"/proc/self/fd/{fd}"))
        return self._names[fd]

    def wrap(self, original: Callable[..., Any]) -> Callable[..., Any]:
        def counted(*args: Any, **kwargs: Any) -> Any:
            name = self.file_of(args[0])
            t0 = time.perf_counter()
            try:
                return original(*args, **kwargs)
            finally:
                self.us[name] += (time.perf_counter() - t0) * 1e6
                self.calls[name] += 1

        return counted


@contextmanager
def counting() -> Iterator[Meter]:
    """Count (and time) os-level file syscalls by the file they go to while the block runs."""
    meter = Meter()
    originals = {name: getattr(os, name) for name in SYSCALLS}
    for name, original in originals.items():
        setattr(os, name, meter.wrap(original))
    try:
        yield meter
    finally:
        for name, original in originals.items():
            setattr(os, name, original)


def one_sample(
    access: AccessCheck, target: Target, config: TargetConfig, addrs: np.ndarray
) -> tuple[float, np.ndarray]:
    """prepare, the workload, check: µs spent in prepare + check."""
    t0 = time.perf_counter()
    access.prepare(config, addrs)
    t1 = time.perf_counter()
    target.touch()
    t2 = time.perf_counter()
    accessed = access.check(config, addrs)
    t3 = time.perf_counter()
    return ((t1 - t0) + (t3 - t2)) * 1e6, accessed


def measure(make: Callable[[], AccessCheck], target: Target, space: str, n: int) -> dict[str, Any]:
    """µs per region over ROUNDS samples (median, best, the first), syscalls per region.

    The host's other work shows through TCG as noise: the best sample is the
    steadiest number, the median the honest one, the first one pays for cold
    caches (the head cache of huge pages among them).
    """
    rng = np.random.default_rng(n)
    config = TargetConfig(0, -1) if space == "paddr" else target.config
    access = make()
    try:
        times, accessed_share = [], []
        for _ in range(ROUNDS):
            addrs = target.addrs(n, rng)
            if space == "paddr":
                addrs = target.physical(addrs)
            us, accessed = one_sample(access, target, config, addrs)
            times.append(us / n)
            accessed_share.append(float(accessed.mean()))
        addrs = target.addrs(n, rng)
        if space == "paddr":
            addrs = target.physical(addrs)
        with counting() as meter:
            one_sample(access, target, config, addrs)
    finally:
        access.close()
    return {
        "us_per_region": statistics.median(times),
        "min_us_per_region": min(times),
        "first_us_per_region": times[0],
        "syscalls_per_region": sum(meter.calls.values()) / n,
        "per_file": {name: calls / n for name, calls in sorted(meter.calls.items())},
        "syscall_us_per_region": {name: us / n for name, us in sorted(meter.us.items())},
        "accessed": statistics.median(accessed_share),
    }


CASES = [
    # (label, buffer advice, space, access check)
    ("page_idle vaddr 4 KiB", "nohuge", "vaddr", "page_idle"),
    ("page_idle (Python) vaddr 4 KiB", "nohuge", "vaddr", "page_idle python"),
    ("page_idle vaddr THP", "huge", "vaddr", "page_idle"),
    ("page_idle (Python) vaddr THP", "huge", "vaddr", "page_idle python"),
    ("page_idle paddr 4 KiB", "nohuge", "paddr", "page_idle"),
    ("page_idle paddr THP", "huge", "paddr", "page_idle"),
    ("soft_dirty vaddr 4 KiB", "nohuge", "vaddr", "soft_dirty"),
    ("soft_dirty vaddr THP", "huge", "vaddr", "soft_dirty"),
    ("clear_refs vaddr 4 KiB", "nohuge", "vaddr", "clear_refs"),
    ("clear_refs vaddr THP", "huge", "vaddr", "clear_refs"),
]

FACTORIES: dict[str, Callable[[], AccessCheck]] = {
    "page_idle": lambda: PageIdleAccess(seed=0, native=True),
    "page_idle python": lambda: PageIdleAccess(seed=0, native=False),
    "soft_dirty": lambda: SoftDirtyAccess(seed=0),
    "clear_refs": lambda: ClearRefsAccess(seed=0),
}


def run() -> list[dict[str, Any]]:
    rows = []
    targets: dict[str, Target] = {}
    try:
        for label, advice, space, check in CASES:
            target = targets.get(advice) or targets.setdefault(advice, Target(advice))
            for n in REGIONS:
                row = measure(FACTORIES[check], target, space, n)
                rows.append({"case": label, "regions": n, **row})
                print(f"{label} x{n}: {json.dumps(row)}", file=sys.stderr, flush=True)
    finally:
        for target in targets.values():
            target.close()
    return rows


def _files(per_file: dict[str, float]) -> str:
    return ", ".join(f"{name} {value:.2f}" for name, value in per_file.items()) or "in C"


def _calls(per_region: float) -> str:
    return f"{per_region:.2f}" if per_region else "in C"


COLUMNS: list[Column] = [
    ("case", "case", "{}"),
    ("regions", "regions", "{}"),
    ("us_per_region", "µs/region (median)", "{:.1f}"),
    ("min_us_per_region", "µs/region (best)", "{:.1f}"),
    ("first_us_per_region", "µs/region (1st sample)", "{:.1f}"),
    ("syscalls_per_region", "syscalls/region", _calls),
    ("per_file", "syscalls by file", _files),
    ("syscall_us_per_region", "µs in syscalls by file", _files),
    ("accessed", "accessed", "{:.2f}"),
]


def markdown(rows: list[dict[str, Any]]) -> str:
    """The table, and the Python path against the C one, case by case, in the same run."""
    by_case = {(r["case"], r["regions"]): r["us_per_region"] for r in rows}
    ratios = []
    for (case, n), us in by_case.items():
        c_case = (case.replace(" (Python)", ""), n)
        if "(Python)" in case and c_case in by_case:
            ratios.append(f"{c_case[0]} ×{n}: {us / by_case[c_case]:.1f}")
    text = markdown_table(COLUMNS, rows)
    if ratios:
        text += "\n\npage_idle's Python path over its C path (median µs/region): " + "; ".join(
            ratios
        )
    return text


@contextmanager
def own_pages(pages: int) -> Iterator[tuple[int, np.ndarray, Callable[[], None]]]:
    """A resident 4 KiB-page buffer of this process: its address, its PFNs, a function
    writing it."""
    buf = mmap.mmap(-1, pages * KERNEL_PAGE, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    buf.madvise(mmap.MADV_NOHUGEPAGE)

    def touch() -> None:
        buf[0 : len(buf) : KERNEL_PAGE] = b"\1" * pages

    touch()
    view = ctypes.c_char.from_buffer(buf)
    start = ctypes.addressof(view)
    del view
    with open("/proc/self/pagemap", "rb", buffering=0) as f:
        raw = os.pread(f.fileno(), pages * 8, start // KERNEL_PAGE * 8)
    try:
        yield start, decode_pagemap(np.frombuffer(raw, dtype=np.uint64)), touch
    finally:
        buf.close()


def _us_per_call(fn: Callable[[], object], calls: int = 300) -> float:
    t0 = time.perf_counter()
    for _ in range(calls):
        fn()
    return (time.perf_counter() - t0) / calls * 1e6


def kernel_ops() -> list[tuple[str, float]]:
    """µs per call of each kernel operation page_idle uses: what the gap constants rest on."""
    pagemap = os.open("/proc/self/pagemap", os.O_RDONLY)
    kpageflags = os.open(KPAGEFLAGS, os.O_RDONLY)
    bitmap = os.open(BITMAP, os.O_RDWR)
    ones = ((1 << 64) - 1).to_bytes(8, sys.byteorder)
    try:
        with own_pages(4096) as (start, pfns, touch):
            pfn, busy = int(pfns[100]), int(pfns[2000])
            vpn = start // KERNEL_PAGE * 8
            one = (1 << pfn % 64).to_bytes(8, sys.byteorder)
            word, busy_word = pfn // 64 * 8, busy // 64 * 8
            rows = [
                ("getpid (a syscall's floor)", _us_per_call(os.getpid)),
                ("pagemap, 1 entry", _us_per_call(lambda: os.pread(pagemap, 8, vpn))),
                ("pagemap, 512 entries", _us_per_call(lambda: os.pread(pagemap, 4096, vpn))),
                ("kpageflags, 1 entry", _us_per_call(lambda: os.pread(kpageflags, 8, pfn * 8))),
                (
                    "kpageflags, 512 entries",
                    _us_per_call(lambda: os.pread(kpageflags, 4096, (pfn & ~511) * 8)),
                ),
                ("bitmap write, 1 bit", _us_per_call(lambda: os.pwrite(bitmap, one, word))),
                (
                    "bitmap write, 8 zero words",
                    _us_per_call(lambda: os.pwrite(bitmap, bytes(64), word)),
                ),
                (
                    "bitmap read, 1 word, no page idle",
                    _us_per_call(lambda: os.pread(bitmap, 8, busy_word)),
                ),
                (
                    "bitmap read, 8 words, no page idle",
                    _us_per_call(lambda: os.pread(bitmap, 64, busy_word)),
                ),
            ]
            os.pwrite(bitmap, ones, word)
            idle = bin(int.from_bytes(os.pread(bitmap, 8, word), sys.byteorder)).count("1")
            rows += [
                (
                    f"bitmap write, 64 bits ({idle} pages trackable)",
                    _us_per_call(lambda: os.pwrite(bitmap, ones, word), 50),
                ),
                (
                    f"bitmap read, 1 word, {idle} pages idle",
                    _us_per_call(lambda: os.pread(bitmap, 8, word), 50),
                ),
            ]
            touch()
            return rows
    finally:
        for fd in (pagemap, kpageflags, bitmap):
            os.close(fd)


def ops_markdown(ops: list[tuple[str, float]]) -> str:
    lines = ["| kernel operation | µs per call |", "|---|---|"]
    lines += [f"| {label} | {us:.1f} |" for label, us in ops]
    return "\n".join(lines)


def in_vm(extra: list[str]) -> dict[str, Any]:
    """Run this benchmark in the tests/vm guest (1 vCPU) and return its results."""
    with tempfile.TemporaryDirectory(prefix="damond-bench-") as results:
        proc = subprocess.run(
            [
                sys.executable, str(REPO / "tests" / "vm" / "run.py"), "-q",
                "--vcpus", "1", "--memory", "2048", "--results", results, "--cwd", str(REPO),
                "--", sys.executable, "-m", "bench.page_idle",
                "--json", "/results/out.json", *extra,
            ],
            check=False,
        )  # fmt: skip
        out_file = Path(results) / "out.json"
        if proc.returncode != 0 or not out_file.exists():
            raise SystemExit(f"the guest run failed (exit {proc.returncode}); see its console")
        found: dict[str, Any] = json.loads(out_file.read_text())
        return found


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--vm", action="store_true", help="run in the tests/vm guest")
    parser.add_argument("--json", help="also write the results to this file")
    parser.add_argument("--ops-only", action="store_true", help="only the kernel operations")
    args = parser.parse_args()
    if args.vm:
        found = in_vm(["--ops-only"] if args.ops_only else [])
    elif not os.path.exists(BITMAP):
        print(f"{BITMAP} is missing: run with --vm (the tests/vm guest)", file=sys.stderr)
        return 2
    else:
        rows = [] if args.ops_only else run()
        found = {"kernel": platform.release(), "kernel_ops": kernel_ops(), "rows": rows}
    if args.json:
        Path(args.json).write_text(json.dumps(found, indent=1))
    print(f"Linux {found['kernel']}, 1 vCPU under QEMU TCG when run with --vm\n")
    print(ops_markdown(found["kernel_ops"]))
    if found["rows"]:
        print()
        print(markdown(found["rows"]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
