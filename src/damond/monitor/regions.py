"""Regions of one monitoring target, as parallel numpy arrays.

The kernel keeps a linked list of ``struct damon_region``; here every field is
an array, so that a sample (one address per region, one access bit per region)
costs a few vector operations instead of a Python loop. The adaptive-regions
steps follow mm/damon/core.c and vaddr.c: line by line where the order of
operations changes the result (the merge chain, damon_set_regions), vectorised
where it provably does not (aging, splitting, sampling).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

import numpy as np

from damond.monitor.config import PAGE_SIZE
from damond.monitor.ops.common import Range, align_down, aligned_ranges

_U64 = np.uint64
_U32 = np.uint32
_PAGE_MASK = _U64(~(PAGE_SIZE - 1) & 0xFFFF_FFFF_FFFF_FFFF)
_PAGE_SHIFT = _U64(PAGE_SIZE.bit_length() - 1)
assert 1 << int(_PAGE_SHIFT) == PAGE_SIZE, "PAGE_SIZE must be a power of two"


@dataclass(eq=False)
class Regions:
    """The regions of one target: sorted by start, disjoint, page aligned.

    merge/split/reset_aggregated change the object in place (they are the
    engine's per-aggregation steps); set_regions/evenly_split build new ones.
    """

    starts: np.ndarray
    ends: np.ndarray
    nr_accesses: np.ndarray
    last_nr_accesses: np.ndarray
    age: np.ndarray
    sampling_addrs: np.ndarray | None = field(default=None)
    """One page address per region, from the last pick_sampling_addrs()."""
    _pages: tuple[np.ndarray, np.ndarray, np.ndarray] | None = field(default=None, repr=False)
    """(starts, ends, pages per region as floats) of the last pick: kept while the
    region arrays are the same objects (merge, split and set_regions replace them)."""

    @classmethod
    def build(
        cls,
        starts: Sequence[int] | np.ndarray,
        ends: Sequence[int] | np.ndarray,
        nr_accesses: Sequence[int] | np.ndarray | None = None,
        last_nr_accesses: Sequence[int] | np.ndarray | None = None,
        age: Sequence[int] | np.ndarray | None = None,
    ) -> Regions:
        s = np.asarray(starts, dtype=_U64)
        n = len(s)

        def counters(values: Sequence[int] | np.ndarray | None) -> np.ndarray:
            if values is None:
                return np.zeros(n, dtype=_U32)
            return np.asarray(values, dtype=_U32).copy()

        return cls(
            s.copy(),
            np.asarray(ends, dtype=_U64).copy(),
            counters(nr_accesses),
            counters(last_nr_accesses),
            counters(age),
        )

    @classmethod
    def empty(cls) -> Regions:
        return cls.build([], [])

    def __len__(self) -> int:
        return len(self.starts)

    def sizes(self) -> np.ndarray:
        return self.ends - self.starts

    def total_size(self) -> int:
        return int(self.sizes().sum(dtype=_U64))

    def ranges(self) -> list[Range]:
        return list(zip(self.starts.tolist(), self.ends.tolist(), strict=True))

    def rows(self) -> list[tuple[int, int, int, int, int]]:
        """Each region as (start, end, nr_accesses, last_nr_accesses, age), plain ints."""
        return list(
            zip(
                self.starts.tolist(),
                self.ends.tolist(),
                self.nr_accesses.tolist(),
                self.last_nr_accesses.tolist(),
                self.age.tolist(),
                strict=True,
            )
        )

    def copy(self) -> Regions:
        return Regions.build(
            self.starts, self.ends, self.nr_accesses, self.last_nr_accesses, self.age
        )

    # -- sampling -----------------------------------------------------------------------------

    def pick_sampling_addrs(self, uniforms: np.ndarray) -> np.ndarray:
        """A random page of each region (the kernel's damon_rand(start, end), page aligned):
        region i's is the one uniforms[i], in [0, 1), falls on.

        The engine draws the uniforms of many samples at once (Engine._draw), and
        a TargetSampler picks the same pages from them in C: right after a sleep
        each numpy call costs a few hundred µs under emulation (bench/guest.py).
        Page counts are exact as floats below 2^53 pages.
        """
        cached = self._pages
        if cached is None or cached[0] is not self.starts or cached[1] is not self.ends:
            pages = ((self.ends - self.starts) >> _PAGE_SHIFT).astype(np.float64)
            # uniforms are < 1, but the float product can round up to the page count
            # itself for enormous regions: one ulp less keeps it inside
            np.nextafter(pages, 0, out=pages)
            cached = self._pages = (self.starts, self.ends, pages)
        offsets = np.multiply(uniforms, cached[2]).astype(_U64)
        np.left_shift(offsets, _PAGE_SHIFT, out=offsets)
        self.sampling_addrs = np.add(self.starts, offsets, out=offsets)
        return self.sampling_addrs

    def add_accesses(self, accessed: np.ndarray) -> None:
        """nr_accesses += 1 where the sampled page was accessed."""
        np.add(self.nr_accesses, accessed, out=self.nr_accesses, casting="unsafe")

    # -- aggregation --------------------------------------------------------------------------

    def merge(self, threshold: int, sz_limit: int) -> None:
        """damon_merge_regions_of: age every region, then merge similar neighbours.

        age becomes 0 when |nr_accesses - last_nr_accesses| > threshold, else
        grows by one. Walking left to right, a region is merged into the one
        before it (prev, possibly already grown by merges) when they touch,
        |prev.nr_accesses - nr_accesses| <= threshold and the merged size stays
        <= sz_limit; nr_accesses and age become size-weighted integer averages,
        last_nr_accesses stays prev's.

        The chain is sequential (prev's values move as it grows), so it runs
        in Python, but only over the boundaries that can merge at all: prev
        always ends with the left neighbour, hence is at least as large, so a
        boundary where the two neighbours are apart or already too large
        together never merges.
        """
        n = len(self)
        if n == 0:
            return
        nr = self.nr_accesses.astype(np.int64)
        changed = np.abs(nr - self.last_nr_accesses.astype(np.int64)) > threshold
        self.age = np.where(changed, _U32(0), self.age + _U32(1)).astype(_U32)
        if n == 1:
            return
        sizes = self.ends - self.starts
        mergeable = (self.ends[:-1] == self.starts[1:]) & (sizes[:-1] + sizes[1:] <= _U64(sz_limit))
        candidates = (np.flatnonzero(mergeable) + 1).tolist()
        if not candidates:
            return

        nr_l = self.nr_accesses.tolist()
        age_l = self.age.tolist()
        sz_l = sizes.tolist()
        absorbed: list[int] = []
        grown: dict[int, None] = {}  # heads whose values changed, in order
        head, last_absorbed = -1, -2
        for i in candidates:
            h = head if last_absorbed == i - 1 else i - 1
            sz_h, sz_i = sz_l[h], sz_l[i]
            nr_h, nr_i = nr_l[h], nr_l[i]
            if abs(nr_h - nr_i) > threshold or sz_h + sz_i > sz_limit:
                continue
            total = sz_h + sz_i
            nr_l[h] = (nr_h * sz_h + nr_i * sz_i) // total
            age_l[h] = (age_l[h] * sz_h + age_l[i] * sz_i) // total
            sz_l[h] = total
            grown[h] = None
            absorbed.append(i)
            head, last_absorbed = h, i
        if not absorbed:
            return

        heads = np.array(list(grown), dtype=np.intp)
        self.nr_accesses[heads] = np.array([nr_l[h] for h in heads.tolist()], dtype=_U32)
        self.age[heads] = np.array([age_l[h] for h in heads.tolist()], dtype=_U32)
        keep = np.ones(n, dtype=bool)
        keep[absorbed] = False
        kept = np.flatnonzero(keep)
        # Each kept region now ends where the last region absorbed into it ended.
        new_ends = self.ends[np.append(kept[1:] - 1, n - 1)]
        self.starts = self.starts[kept]
        self.ends = new_ends
        self.nr_accesses = self.nr_accesses[kept]
        self.last_nr_accesses = self.last_nr_accesses[kept]
        self.age = self.age[kept]
        self.sampling_addrs = None

    def reset_aggregated(self) -> None:
        """kdamond_reset_aggregated: this aggregation's counts become the last ones."""
        self.last_nr_accesses = self.nr_accesses
        self.nr_accesses = np.zeros(len(self), dtype=_U32)

    def split(self, nr_subs: int, rng: np.random.Generator) -> None:
        """damon_split_regions_of: cut each region into up to nr_subs pieces.

        Up to nr_subs - 1 times, while the (left) part is larger than two
        pages, cut it at align_down(rand(1..9) * size / 10); a cut that would
        leave an empty piece is skipped (it still counts as a try). The next
        try cuts the left part again, so a region's cuts are at decreasing
        offsets. Pieces inherit nr_accesses, last_nr_accesses and age.
        """
        n = len(self)
        if n == 0 or nr_subs < 2:
            return
        tries = nr_subs - 1
        rand = rng.integers(1, 10, size=(tries, n), dtype=_U64)
        size = self.ends - self.starts
        # bounds[:, 0] is each region's start; column tries - k holds try k's cut, so a
        # row reads in address order. Row-major masking then yields sorted starts.
        bounds = np.zeros((n, nr_subs), dtype=_U64)
        valid = np.zeros((n, nr_subs), dtype=bool)
        bounds[:, 0] = self.starts
        valid[:, 0] = True
        for k in range(tries):
            sub = (rand[k] * size // _U64(10)) & _PAGE_MASK
            ok = (size > _U64(2 * PAGE_SIZE)) & (sub != 0) & (sub < size)
            bounds[:, tries - k] = self.starts + sub
            valid[:, tries - k] = ok
            size = np.where(ok, sub, size)
        counts = valid.sum(axis=1)
        if int(counts.sum()) == n:
            return
        owner = np.repeat(np.arange(n), counts)
        starts = bounds[valid]
        ends = self.ends[owner]
        same = owner[1:] == owner[:-1]
        ends[:-1][same] = starts[1:][same]
        self.starts = starts
        self.ends = ends
        self.nr_accesses = self.nr_accesses[owner]
        self.last_nr_accesses = self.last_nr_accesses[owner]
        self.age = self.age[owner]
        self.sampling_addrs = None

    def rescale(self, old_max_nr: int, new_max_nr: int, old_aggr_us: int, new_aggr_us: int) -> None:
        """damon_update_monitoring_result at an aggregation boundary: new attrs.

        nr_accesses keep their ratio to the samples per aggregation (through
        basis points, with the kernel's rounding) and age its length in time.
        """
        bp = self.nr_accesses.astype(np.uint64) * _U64(10000) // _U64(max(old_max_nr, 1))
        self.nr_accesses = (bp * _U64(new_max_nr) // _U64(10000)).astype(_U32)
        age = self.age.astype(np.uint64) * _U64(old_aggr_us) // _U64(max(new_aggr_us, 1))
        self.age = age.astype(_U32)


def evenly_split(ranges: Iterable[Range], min_nr_regions: int) -> Regions:
    """__damon_va_init_regions: initial regions of about total/min bytes each.

    sz = total / min (at least a page, not aligned); a range of size S gets
    nr = S // sz pieces requested, damon_va_evenly_split_region then cuts it
    into pieces of align_down(S / nr) bytes (so possibly more than nr), the
    last piece taking the remainder; a range smaller than sz stays whole.
    """
    rs = aligned_ranges(ranges)
    total = sum(e - s for s, e in rs)
    sz = max(total // max(min_nr_regions, 1), PAGE_SIZE)
    starts: list[int] = []
    ends: list[int] = []
    for start, end in rs:
        size = end - start
        nr_pieces = size // sz
        piece = align_down(size // nr_pieces) if nr_pieces else 0
        if not piece:
            starts.append(start)
            ends.append(end)
            continue
        count = size // piece
        piece_starts = range(start, start + count * piece, piece)
        starts.extend(piece_starts)
        ends.extend(s + piece for s in piece_starts)
        ends[-1] = end
    return Regions.build(starts, ends)


def set_regions(regions: Regions, ranges: Iterable[Range]) -> Regions:
    """damon_set_regions: fit existing regions to new ranges, keeping what they learned.

    Regions touching no range are dropped; for each range, the first and last
    regions touching it are stretched or clipped to its (page-aligned) bounds
    and holes between them are filled with new regions (nr_accesses and age
    0); a range no region touches becomes one new region. A region spanning
    two ranges stays in the first only (as in the kernel).
    """
    rs = aligned_ranges(ranges)
    # [start, end, nr_accesses, last_nr_accesses, age]
    items = [
        [s, e, nr, last, age]
        for s, e, nr, last, age in regions.rows()
        if any(s < re and rs_ < e for rs_, re in rs)
    ]
    pos = 0  # the kernel's cursor r: where the search for the next range starts
    for r_start, r_end in rs:
        first = last = -1
        j = pos
        while j < len(items):
            s, e = items[j][0], items[j][1]
            if s < r_end and r_start < e:
                if first < 0:
                    first = j
                last = j
            if s >= r_end:
                break
            j += 1
        if first < 0:
            items.insert(j, [r_start, r_end, 0, 0, 0])
            pos = j + 1
            continue
        items[first][0] = r_start
        items[last][1] = r_end
        k = first
        while k < last:
            if items[k][1] != items[k + 1][0]:
                items.insert(k + 1, [items[k][1], items[k + 1][0], 0, 0, 0])
                last += 1
                j += 1
            k += 1
        pos = j
    if not items:
        return Regions.empty()
    cols = list(zip(*items, strict=True))
    return Regions.build(cols[0], cols[1], cols[2], cols[3], cols[4])
