"""Runs INSIDE the test guest (see test_guest_page_idle.py): PageIdleAccess against a real kernel.

Usage (in the guest): python page_idle_checks.py CHECK OUTPUT.json

CHECK is one of the names in CHECKS. Each check drives a child process that
holds a buffer, touches half of it on request and exits on request; it writes
its findings (or the traceback of its failure) as JSON for the host-side test
to assert on. Run on 1 vCPU: with 2, read accesses can be missed (no TLB flush
when a page is marked idle); the children write, which is never missed.
"""

from __future__ import annotations

import json
import mmap
import os
import platform
import re
import subprocess
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
from guest_json import findings, outside_guest, write_report  # tests/vm/guest_json.py

from damond.monitor import ops
from damond.monitor.config import TargetConfig
from damond.monitor.ops import TargetGone
from damond.monitor.ops import page_idle as pi

MiB = 1 << 20
PAGE = pi.KERNEL_PAGE
KPF_THP = 1 << 22
"""/proc/kpageflags: the page belongs to a transparent huge page."""
BUFFER = 64 * MiB
SAMPLES = 400
"""Sampled addresses per half: the engine's one page per region, 400 regions' worth."""

CHILD = r"""
import ctypes, mmap, sys
size, advice = int(sys.argv[1]), sys.argv[2]
buf = mmap.mmap(-1, size, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
if advice == "huge":
    buf.madvise(mmap.MADV_HUGEPAGE)
elif advice == "nohuge":
    buf.madvise(mmap.MADV_NOHUGEPAGE)
touched = size if sys.argv[3] == "all" else 0
buf[0:touched:4096] = b"\1" * len(range(0, touched, 4096))  # resident before any sample
print(ctypes.addressof(ctypes.c_char.from_buffer(buf)), flush=True)
for line in sys.stdin:
    if line.strip() == "touch":  # write one byte per page of the first half
        buf[0:size // 2:4096] = b"\2" * len(range(0, size // 2, 4096))
    print("ok", flush=True)
"""


class Child:
    """A process with a BUFFER-byte anonymous buffer (resident unless told otherwise)."""

    def __init__(self, advice: str, resident: bool = True) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, "-c", CHILD, str(BUFFER), advice, "all" if resident else "none"],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        assert self.proc.stdin is not None and self.proc.stdout is not None
        self.stdin, self.stdout = self.proc.stdin, self.proc.stdout
        self.start = int(self.stdout.readline())
        self.pid = self.proc.pid
        self.target = TargetConfig(0, self.pid)

    def touch(self) -> None:
        """Write the first half of the buffer, and wait until that is done."""
        self.stdin.write("touch\n")
        self.stdin.flush()
        assert self.stdout.readline().strip() == "ok"

    def halves(self) -> tuple[tuple[int, int], tuple[int, int]]:
        mid = self.start + BUFFER // 2
        return (self.start, mid), (mid, self.start + BUFFER)

    def exit(self) -> None:
        """Close its stdin: it exits. Reaped by wait()."""
        if not self.stdin.closed:
            self.stdin.close()

    def wait(self) -> None:
        self.exit()
        self.proc.wait()
        self.stdout.close()


@contextmanager
def child(advice: str, resident: bool = True) -> Iterator[Child]:
    c = Child(advice, resident)
    try:
        yield c
    finally:
        c.wait()


def sample(span: tuple[int, int], n: int, seed: int) -> np.ndarray:
    """n random addresses in [start, end), sorted, as the engine's would be."""
    rng = np.random.default_rng(seed)
    return np.sort(rng.integers(span[0], span[1], n, dtype=np.uint64))


def pfns_of(pid: int, addrs: np.ndarray) -> np.ndarray:
    """The PFNs behind a process's addresses, read the plain way (one pread each)."""
    fd = os.open(f"/proc/{pid}/pagemap", os.O_RDONLY)
    try:
        entries = [int.from_bytes(os.pread(fd, 8, int(a) // PAGE * 8), "little") for a in addrs]
    finally:
        os.close(fd)
    return pi.decode_pagemap(np.array(entries, dtype=np.uint64))


def kpageflags_of(pfns: np.ndarray) -> np.ndarray:
    fd = os.open(pi.KPAGEFLAGS, os.O_RDONLY)
    try:
        return np.array(
            [int.from_bytes(os.pread(fd, 8, int(p) * 8), "little") for p in pfns],
            dtype=np.uint64,
        )
    finally:
        os.close(fd)


def anon_huge_kib(pid: int, start: int) -> int:
    """AnonHugePages of the mapping starting at start (the child's buffer)."""
    text = Path(f"/proc/{pid}/smaps").read_text()
    block = text[text.index(f"{start:x}-") :]
    found = re.search(r"^AnonHugePages:\s+(\d+) kB", block, re.MULTILINE)
    assert found is not None, "no AnonHugePages line in smaps"
    return int(found.group(1))


def tails_reading_idle(pid: int, addrs: np.ndarray) -> int:
    """How many of the sampled tail pages read idle by their own bit, right after a
    sample marked (the heads of) these untouched pages idle: the kernel says 0,
    which is why tails must be mapped to their heads."""
    pfns = pfns_of(pid, addrs)
    tails = pfns[(kpageflags_of(pfns) & np.uint64(pi.KPF_COMPOUND_TAIL)) != 0]
    fd = os.open(pi.BITMAP, os.O_RDONLY)
    try:
        words, _ = pi.word_masks(tails)
        values = pi.read_entries(fd, words, 0, fill=0)
    finally:
        os.close(fd)
    return int(pi.bits_of(tails, words, values).sum())


def one_sample(
    access: pi.PageIdleAccess, target: TargetConfig, addrs: np.ndarray, between: Callable[[], None]
) -> np.ndarray:
    """prepare, let `between` run (the workload), check."""
    access.prepare(target, addrs)
    between()
    return access.check(target, addrs)


def halves_report(accessed: np.ndarray, n: int) -> dict[str, Any]:
    """The first n answers are of the written half, the rest of the untouched half."""
    return {
        "written": n,
        "written_accessed": int(accessed[:n].sum()),
        "untouched": len(accessed) - n,
        "untouched_accessed": int(accessed[n:].sum()),
    }


def written_and_untouched(c: Child, seed: int) -> tuple[np.ndarray, int]:
    """SAMPLES addresses in the half the child writes, then SAMPLES in the other half."""
    written, untouched = c.halves()
    both = [sample(written, SAMPLES, seed), sample(untouched, SAMPLES, seed + 1)]
    return np.concatenate(both), SAMPLES


def virtual_halves(advice: str) -> dict[str, Any]:
    """A child writes the first half after prepare; then a sample with no writes at all."""
    out: dict[str, Any] = {"advice": advice}
    with child(advice) as c:
        out["anon_huge_kib"] = anon_huge_kib(c.pid, c.start)
        addrs, n = written_and_untouched(c, seed=1)
        flags = kpageflags_of(pfns_of(c.pid, addrs))
        out["sampled_tails"] = int(np.count_nonzero(flags & np.uint64(pi.KPF_COMPOUND_TAIL)))
        out["sampled_thp"] = int(np.count_nonzero(flags & np.uint64(KPF_THP)))
        access = pi.PageIdleAccess(seed=0)
        try:
            out["touched"] = halves_report(one_sample(access, c.target, addrs, c.touch), n)
            out["quiet"] = halves_report(one_sample(access, c.target, addrs, lambda: None), n)
            out["tails_reading_idle"] = tails_reading_idle(c.pid, addrs[n:])
            addrs2, _ = written_and_untouched(c, seed=2)  # new pages, as the next sample's
            out["touched_again"] = halves_report(one_sample(access, c.target, addrs2, c.touch), n)
        finally:
            access.close()
    return out


def check_vaddr() -> dict[str, Any]:
    """(a) 4 KiB pages: MADV_NOHUGEPAGE."""
    return virtual_halves("nohuge")


def check_thp() -> dict[str, Any]:
    """(b) transparent huge pages: MADV_HUGEPAGE; the report says whether THP happened."""
    out = virtual_halves("huge")
    out["thp_enabled"] = Path("/sys/kernel/mm/transparent_hugepage/enabled").read_text().strip()
    out["thp_defrag"] = Path("/sys/kernel/mm/transparent_hugepage/defrag").read_text().strip()
    return out


def physical_halves(advice: str) -> dict[str, Any]:
    """The child's sampled pages, by physical address, through a paddr target (pid -1)."""
    out: dict[str, Any] = {"advice": advice}
    with child(advice) as c:
        addrs, n = written_and_untouched(c, seed=3)
        pfns = pfns_of(c.pid, addrs)
        out["pages_without_pfn"] = int(np.count_nonzero(pfns == 0))
        offsets = addrs % np.uint64(PAGE)
        physical = pfns * np.uint64(PAGE) + offsets
        access = pi.PageIdleAccess(seed=0)
        try:
            accessed = one_sample(access, TargetConfig(0, -1), physical, c.touch)
        finally:
            access.close()
        out.update(halves_report(accessed, n))
    return out


def check_paddr() -> dict[str, Any]:
    """(c) paddr: 4 KiB pages and huge pages."""
    return {"small": physical_halves("nohuge"), "huge": physical_halves("huge")}


def check_not_present() -> dict[str, Any]:
    """(d) addresses of never-touched pages, and of pages outside every mapping."""
    with child("nohuge", resident=False) as c:
        addrs = sample((c.start, c.start + BUFFER), SAMPLES, seed=4)
        unmapped = np.arange(SAMPLES, dtype=np.uint64) * np.uint64(PAGE)  # page 0 upwards
        access = pi.PageIdleAccess(seed=0)
        try:
            accessed = one_sample(access, c.target, addrs, lambda: None)
            outside = one_sample(access, c.target, unmapped, lambda: None)
        finally:
            access.close()
        return {
            "sampled": SAMPLES,
            "present": int(np.count_nonzero(pfns_of(c.pid, addrs))),
            "accessed": int(accessed.sum()),
            "outside_accessed": int(outside.sum()),
        }


SHARED_CHILD = r"""
import ctypes, mmap, sys
with open(sys.argv[1], "r+b") as f:
    buf = mmap.mmap(f.fileno(), int(sys.argv[2]))
sum(buf[0:len(buf):4096])  # mapped and read once, never again
print(ctypes.addressof(ctypes.c_char.from_buffer(buf)), flush=True)
sys.stdin.read()
"""


def check_shared() -> dict[str, Any]:
    """(g) pages the target shares: another process's writes count, as documented.

    The target maps a shmem file and reads it once; this process maps the same
    file and writes the first half between prepare and check. page_idle answers
    for the physical page (its read walks every mapping's accessed bit), so the
    target's samples of that half read accessed although the target itself
    never touched them again (the kernel's vaddr would look at the target's
    own page-table entries only).
    """
    path = Path("/dev/shm/damond-shared-check")
    with open(path, "wb") as f:
        f.truncate(BUFFER)
    proc = subprocess.Popen(
        [sys.executable, "-c", SHARED_CHILD, str(path), str(BUFFER)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    assert proc.stdin is not None and proc.stdout is not None
    access = pi.PageIdleAccess(seed=0)
    try:
        start = int(proc.stdout.readline())
        with open(path, "r+b") as f:
            mine = mmap.mmap(f.fileno(), BUFFER)
        half = BUFFER // 2
        addrs = np.concatenate(
            [
                sample((start, start + half), SAMPLES, 6),
                sample((start + half, start + BUFFER), SAMPLES, 7),
            ]
        )
        target = TargetConfig(0, proc.pid)

        def others_write() -> None:
            mine[0:half:PAGE] = b"\3" * (half // PAGE)

        out = {"touched": halves_report(one_sample(access, target, addrs, others_write), SAMPLES)}
        out["quiet"] = halves_report(one_sample(access, target, addrs, lambda: None), SAMPLES)
        mine.close()
        return out
    finally:
        access.close()
        proc.stdin.close()
        proc.wait()
        proc.stdout.close()
        path.unlink()


def raises_gone(fn: Callable[[], object]) -> str:
    """'TargetGone' when fn raises it; else what happened."""
    try:
        fn()
    except TargetGone:
        return "TargetGone"
    except Exception as e:
        return f"{type(e).__name__}: {e}"
    return "returned"


def exit_between(state: str) -> dict[str, str]:
    """prepare, the target exits (left a zombie, or reaped), then check and prepare."""
    c = Child("nohuge")
    addrs, _ = written_and_untouched(c, seed=5)
    access = pi.PageIdleAccess(seed=0)
    try:
        access.prepare(c.target, addrs)
        c.exit()
        if state == "zombie":
            os.waitid(os.P_PID, c.pid, os.WEXITED | os.WNOWAIT)
        else:
            c.wait()
        return {
            f"{state}_check": raises_gone(lambda: access.check(c.target, addrs)),
            f"{state}_prepare": raises_gone(lambda: access.prepare(c.target, addrs)),
        }
    finally:
        access.close()
        c.wait()


def check_exit() -> dict[str, Any]:
    """(e) a target that exits between prepare and check."""
    return {**exit_between("zombie"), **exit_between("reaped")}


def check_registry() -> dict[str, Any]:
    """(f) what the daemon would offer on this kernel."""
    registry = ops.Registry()
    table = ops.ProcessTable()
    access = registry.make_access("page_idle", table)
    access.close()
    table.close()
    return {
        "avail_access_checks": registry.available_access_checks(),
        "avail_operations": registry.available_operations(),
        "auto_vaddr": registry.resolve_access_check("auto", "vaddr"),
        "auto_paddr": registry.resolve_access_check("auto", "paddr"),
        "why_page_idle": registry.why_unavailable("page_idle"),
        "why_paddr": registry.why_unavailable("paddr"),
        "made": type(access).__name__,
    }


def both_paths(c: Child, target: TargetConfig, addrs: np.ndarray) -> dict[str, Any]:
    """The Python and C sample paths on the same pages: each prepares (marking the same
    pages), the child writes the first half, each checks; then a sample with no write.
    The engine's fast path (the C path's Sampler) takes part too, on one-page regions
    that hold the same pages: its heads and per-region counts must be the same."""
    python = pi.PageIdleAccess(native=False)
    native = pi.PageIdleAccess(native=True)
    sampler = native.sampler(target)
    assert sampler is not None
    starts = addrs - addrs % np.uint64(PAGE)
    ends = starts + np.uint64(PAGE)
    out: dict[str, Any] = {"sampled": len(addrs)}
    try:
        for name, between in (("touched", c.touch), ("quiet", lambda: None)):
            python.prepare(target, addrs)
            native.prepare(target, addrs)
            sampler.prepare(starts, ends, np.zeros(len(addrs)), 0)
            heads = python.marked(target), native.marked(target)
            sampler_heads = np.frombuffer(sampler.marked()[1], dtype=np.uint64)
            between()
            answers = python.check(target, addrs), native.check(target, addrs)
            counts = np.zeros(len(addrs), dtype=np.uint32)
            sampler.check(counts)
            out[name] = {
                "heads_differ": int(np.count_nonzero(heads[0] != heads[1])),
                "sampler_heads_differ": int(np.count_nonzero(heads[0] != sampler_heads)),
                "untrackable": int(np.count_nonzero(heads[0] == np.uint64(pi.NO_HEAD))),
                "answers_differ": int(np.count_nonzero(answers[0] != answers[1])),
                "sampler_answers_differ": int(np.count_nonzero(answers[0] != counts)),
                "accessed": int(answers[0].sum()),
            }
    finally:
        sampler.close()
        python.close()
        native.close()
    return out


def check_paths() -> dict[str, Any]:
    """(h) the C sample path against the Python one: 4 KiB pages, THP tails (mapped to
    their heads), pages never present, addresses outside every mapping, and paddr."""
    out: dict[str, Any] = {"c": pi.NATIVE_PATH is not None, "why_not_c": pi.NATIVE_PROBLEM}
    for advice in ("nohuge", "huge"):
        with child(advice) as c:
            addrs, _ = written_and_untouched(c, seed=8)
            tails = kpageflags_of(pfns_of(c.pid, addrs)) & np.uint64(pi.KPF_COMPOUND_TAIL)
            out[advice] = both_paths(c, c.target, addrs)
            out[advice]["sampled_tails"] = int(np.count_nonzero(tails))
            pfns = pfns_of(c.pid, addrs)
            physical = pfns * np.uint64(PAGE) + addrs % np.uint64(PAGE)
            out[f"paddr_{advice}"] = both_paths(c, TargetConfig(0, -1), physical)
    with child("nohuge", resident=False) as c:
        never = sample((c.start, c.start + BUFFER), SAMPLES, seed=9)
        outside = np.arange(SAMPLES, dtype=np.uint64) * np.uint64(PAGE)
        out["not_present"] = both_paths(c, c.target, np.concatenate([never, outside]))
    return out


CHECKS: dict[str, Callable[[], dict[str, Any]]] = {
    "vaddr": check_vaddr,
    "thp": check_thp,
    "paddr": check_paddr,
    "not_present": check_not_present,
    "exit": check_exit,
    "registry": check_registry,
    "shared": check_shared,
    "paths": check_paths,
}


def main() -> int:
    if outside_guest("page_idle_checks.py"):
        return 2
    name, output = sys.argv[1], sys.argv[2]
    report: dict[str, Any] = {"check": name, "kernel": platform.release()}
    report.update(findings(CHECKS[name]))
    print(f"page_idle_checks: {json.dumps(report)}", flush=True)
    write_report(output, report)
    return 0


if __name__ == "__main__":
    sys.exit(main())
