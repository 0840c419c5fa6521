"""The clear_refs access check: per-mapping access rates for kernels without page_idle.

Writing "1" to /proc/PID/clear_refs clears the accessed bits of every page of
the process; afterwards /proc/PID/smaps says, per mapping, how many kB were
referenced again. That is all the kernel tells: which pages were touched is
lost, so the mapping is the unit of every answer. A mapping whose fraction f
of pages was referenced counts as accessed, for all its sampled pages at once,
in a share f of the samples (attribution.MappingCredit): no chance involved,
so regions over one mapping agree, merge and age instead of splitting on
noise. Two buffers that glibc placed side by side in one VMA are one mapping
here: half written, both read as half accessed.

Both files cost time proportional to the target's resident memory (the kernel
walks every page table entry), not to the number of sampled addresses: the
context's CPU ceiling (cpu_limit_pct) is what bounds it.
"""

from __future__ import annotations

import re

import numpy as np

from damond.monitor.config import TargetConfig
from damond.monitor.ops.attribution import MappingCredit
from damond.monitor.ops.common import mapping_index, ranges_from_tokens
from damond.monitor.ops.process import ProcessHolder, ProcessTable

CLEAR_ACCESSED = b"1"
"""clear_refs command 1: clear the referenced/accessed bits of all pages."""

_REFERENCED = re.compile(rb"\nReferenced: +(\d+) kB")
_HEADER_AFTER_FLAGS = re.compile(rb"\nVmFlags:[^\n]*\n([0-9a-f]+-[0-9a-f]+) ")
"""Each mapping's header follows the previous one's VmFlags line (the last
field since Linux 3.8). Both patterns start with a literal, which lets re
skip ahead with a fast search: 10x faster than a multiline '^' pattern."""


def parse_smaps(text: bytes) -> tuple[np.ndarray, np.ndarray]:
    """smaps text as (mappings: (n, 2) uint64 [start, end), referenced: (n,) bytes)."""
    if not text:
        return np.empty((0, 2), dtype=np.uint64), np.empty(0, dtype=np.uint64)
    tokens = [text[: text.find(b" ")], *_HEADER_AFTER_FLAGS.findall(text)]
    refs = _REFERENCED.findall(text)
    if len(refs) != len(tokens):
        raise ValueError(
            f"unexpected smaps format: {len(tokens)} mappings, {len(refs)} Referenced lines"
        )
    referenced = np.fromiter(map(int, refs), np.uint64, len(refs)) * np.uint64(1024)
    return ranges_from_tokens(tokens), referenced


def referenced_fraction(mappings: np.ndarray, referenced: np.ndarray) -> np.ndarray:
    """Per mapping, the fraction of its pages referenced since the last clear."""
    sizes = (mappings[:, 1] - mappings[:, 0]).astype(np.float64)
    return np.clip(referenced / np.maximum(sizes, 1.0), 0.0, 1.0)


def mapping_answers(
    mappings: np.ndarray, fired: np.ndarray, addrs: np.ndarray, rows: np.ndarray | None = None
) -> np.ndarray:
    """Each address answers for its mapping (fired, per row); outside every mapping: never."""
    row = mapping_index(mappings, addrs) if rows is None else rows
    if not len(fired):
        return np.zeros(len(row), dtype=bool)
    return (row >= 0) & fired[np.maximum(row, 0)]


class TargetCredits:
    """A MappingCredit per target index, started afresh when the target's pid changes."""

    def __init__(self) -> None:
        self._credits: dict[int, tuple[int, MappingCredit]] = {}

    def of(self, target: TargetConfig) -> MappingCredit:
        pid, credit = self._credits.get(target.index, (target.pid, None))
        if credit is None or pid != target.pid:
            credit = MappingCredit()
            self._credits[target.index] = (target.pid, credit)
        return credit


class ClearRefsAccess(ProcessHolder):
    """Access check through clear_refs + smaps (vaddr and fvaddr only: it works per process)."""

    name = "clear_refs"

    def __init__(self, processes: ProcessTable | None = None, seed: int | None = None) -> None:
        super().__init__(processes)
        self._credits = TargetCredits()

    def prepare(self, target: TargetConfig, addrs: np.ndarray) -> None:
        """Clear the accessed bits of all of the target's pages: once per target and sample."""
        self.processes.live(target.pid).write("clear_refs", CLEAR_ACCESSED)

    def check(self, target: TargetConfig, addrs: np.ndarray) -> np.ndarray:
        """Every sampled page of a mapping answers as its mapping does this sample."""
        mappings, referenced = parse_smaps(self.processes.get(target.pid).read("smaps"))
        fired = self._credits.of(target).fire(mappings, referenced_fraction(mappings, referenced))
        return mapping_answers(mappings, fired, addrs)
