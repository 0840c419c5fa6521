"""What every operations set needs: address ranges, page alignment, mapping lookup.

The kernel keeps these in mm/damon/ops-common.c; here they are the one home
of the range helpers that vaddr, fvaddr, paddr, the access checks and the
engine's regions share.
"""

from __future__ import annotations

from collections.abc import Iterable
from itertools import repeat

import numpy as np

from damond.monitor.config import PAGE_SIZE

Range = tuple[int, int]
"""An address range [start, end)."""


def align_down(addr: int) -> int:
    """addr rounded down to a page boundary."""
    return addr - addr % PAGE_SIZE


def align_up(addr: int) -> int:
    """addr rounded up to a page boundary."""
    return align_down(addr + PAGE_SIZE - 1)


def aligned_ranges(ranges: Iterable[Range]) -> list[Range]:
    """Ranges widened to whole pages (as damon_set_regions does), sorted, joined.

    Ranges that overlap once aligned (two ranges inside one page) are joined,
    so that regions built on them can never overlap; the kernel would build
    overlapping regions there. Touching ranges stay apart. An empty range is
    a caller's bug (configurations are validated before they get here):
    ValueError.
    """
    out: list[Range] = []
    for start, end in sorted(ranges):
        if start >= end:
            raise ValueError(f"empty range [{start:#x}, {end:#x})")
        start, end = align_down(start), align_up(end)
        if out and start < out[-1][1]:
            out[-1] = (out[-1][0], max(out[-1][1], end))
        else:
            out.append((start, end))
    return out


def ranges_from_tokens(tokens: list[bytes]) -> np.ndarray:
    """(n, 2) uint64 [start, end) from b"start-end" hex tokens, as maps and smaps print them."""
    if not tokens:
        return np.empty((0, 2), dtype=np.uint64)
    hexes = b"-".join(tokens).split(b"-")
    flat = np.fromiter(map(int, hexes, repeat(16, len(hexes))), np.uint64, len(hexes))
    return flat.reshape(-1, 2)


def mapping_index(mappings: np.ndarray, addrs: np.ndarray) -> np.ndarray:
    """For each address, the row of the (sorted) mapping holding it, or -1 (vectorised)."""
    addrs = np.asarray(addrs, dtype=np.uint64)
    row = np.searchsorted(mappings[:, 0], addrs, side="right").astype(np.int64) - 1
    if not len(mappings):
        return row
    inside = (row >= 0) & (addrs < mappings[np.maximum(row, 0), 1])
    return np.where(inside, row, -1)
