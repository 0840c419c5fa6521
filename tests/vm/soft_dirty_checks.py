"""Runs INSIDE the test guest (see test_guest_soft_dirty.py): SoftDirtyAccess on a real kernel.

Usage (in the guest): python soft_dirty_checks.py OUTPUT.json

The guest kernel has CONFIG_MEM_SOFT_DIRTY. A child holds two equal malloc'd
buffers in one mapping (as damond.tools.pair allocates them) and a third
buffer of its own mapping; on request it writes the first buffer, or reads
the third (all of it, or half). Each finding is a count over sampled pages,
asserted on by the host-side test.
"""

from __future__ import annotations

import json
import platform
import subprocess
import sys
from typing import Any

import numpy as np
from guest_json import findings, outside_guest, write_report  # tests/vm/guest_json.py

from damond.monitor import ops
from damond.monitor.config import TargetConfig
from damond.monitor.ops import soft_dirty as sd

MIB = 1 << 20
SIZE = 16 * MIB
SAMPLES = 200
"""Sampled addresses per buffer."""

CHILD = r"""
import ctypes, mmap, sys
from damond.tools.pair import allocate, mapping_of
size = int(sys.argv[1])
first, second = allocate(size, False)
third = mmap.mmap(-1, size)
third[0:size:4096] = b"\1" * (size // 4096)
address = ctypes.addressof(ctypes.c_char.from_buffer(third))
print(first, second, address, int(mapping_of(first) == mapping_of(second)), flush=True)
total = 0
for line in sys.stdin:
    cmd = line.split()
    if cmd[0] == "write":
        ctypes.memset(first, 7, size)
    elif cmd[0] == "read":
        total += sum(third[0:int(float(cmd[1]) * size):4096])
    print("ok", flush=True)
"""


class Child:
    def __init__(self) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, "-c", CHILD, str(SIZE)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        assert self.proc.stdin is not None and self.proc.stdout is not None
        self.stdin, self.stdout = self.proc.stdin, self.proc.stdout
        first, second, third, one = map(int, self.stdout.readline().split())
        self.buffers = {"written": first, "idle": second, "read": third}
        self.one_mapping = bool(one)
        self.target = TargetConfig(0, self.proc.pid)

    def send(self, command: str) -> None:
        self.stdin.write(command + "\n")
        self.stdin.flush()
        assert self.stdout.readline().strip() == "ok"

    def close(self) -> None:
        self.stdin.close()
        self.proc.wait()
        self.stdout.close()


def addrs(start: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return np.sort(rng.integers(start, start + SIZE, SAMPLES, dtype=np.uint64))


def sample(
    access: sd.SoftDirtyAccess, c: Child, command: str | None, seed: int
) -> dict[str, int]:
    """One sample over SAMPLES pages of each buffer: how many read accessed, per buffer."""
    sampled = {name: addrs(start, seed + i) for i, (name, start) in enumerate(c.buffers.items())}
    every = np.concatenate(list(sampled.values()))
    access.prepare(c.target, every)
    if command:
        c.send(command)
    accessed = access.check(c.target, every)
    parts = np.split(accessed, len(sampled))
    return {name: int(part.sum()) for name, part in zip(sampled, parts, strict=True)}


def check_soft_dirty() -> dict[str, Any]:
    registry = ops.Registry()
    out: dict[str, Any] = {
        "why_soft_dirty": registry.why_unavailable("soft_dirty"),
        "avail_access_checks": registry.available_access_checks(),
        "auto_vaddr": registry.resolve_access_check("auto", "vaddr"),
    }
    c = Child()
    access = sd.SoftDirtyAccess()
    try:
        out["one_mapping"] = c.one_mapping
        # the first sample measures reads: nothing read yet
        out["written"] = [sample(access, c, "write", seed) for seed in range(0, 40, 10)]
        out["quiet"] = sample(access, c, None, 50)
        # reads of the whole third buffer, measured in the next measuring sample (1 of 10)
        out["read_all"] = [sample(access, c, "read 1", seed) for seed in range(100, 400, 10)]
        out["read_half"] = [sample(access, c, "read 0.5", seed) for seed in range(400, 700, 10)]
        c.close()
        gone = []
        for step in (access.check, access.prepare):
            try:
                step(c.target, addrs(c.buffers["written"], 1))
                gone.append("returned")
            except ops.TargetGone:
                gone.append("TargetGone")
        out["gone"] = gone
    finally:
        access.close()
        if c.proc.poll() is None:
            c.close()
    return out


def main() -> int:
    if outside_guest("soft_dirty_checks.py"):
        return 2
    report: dict[str, Any] = {"kernel": platform.release()}
    report.update(findings(check_soft_dirty))
    print(f"soft_dirty_checks: {json.dumps(report)}", flush=True)
    write_report(sys.argv[1], report)
    return 0


if __name__ == "__main__":
    sys.exit(main())
