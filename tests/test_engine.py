"""The monitoring engine: DAMON's adaptive regions against the kernel's rules."""

from __future__ import annotations

import logging
from collections.abc import Sequence

import numpy as np
import pytest

from damond.monitor import ops
from damond.monitor.config import PAGE_SIZE, Attrs, ContextConfig, SchemeConfig, TargetConfig
from damond.monitor.engine import Engine
from damond.monitor.ops.synthetic import SyntheticAccess, SyntheticSpace
from damond.monitor.regions import Regions, evenly_split, set_regions
from damond.monitor.snapshot import Snapshot

P = PAGE_SIZE
MiB = 1 << 20
Range = tuple[int, int]

# A process-like address space: text+heap, a big mmap area, a small stack.
PROCESS_RANGES: list[Range] = [
    (0x400000, 0x400000 + 37 * MiB),
    (0x7F0000000000, 0x7F0000000000 + 900 * MiB),
    (0x7FFD00000000, 0x7FFD00000000 + 132 * 1024),
]


def context(
    targets: Sequence[TargetConfig] = (TargetConfig(0, pid=100),),
    attrs: Attrs | None = None,
    operations: ops.Operations = ops.VADDR,
) -> ContextConfig:
    return ContextConfig(operations, "synthetic", attrs or Attrs(), tuple(targets))


def run(engine: Engine, nr_aggregations: int) -> list[Snapshot]:
    """Drive the engine like the runner does, collecting nr_aggregations snapshots."""
    snapshots: list[Snapshot] = []
    for _ in range(100_000):
        engine.prepare()
        snapshot = engine.check()
        if snapshot is not None:
            snapshots.append(snapshot)
            if len(snapshots) == nr_aggregations:
                return snapshots
    raise AssertionError("the engine stopped aggregating")


def fraction_of(ranges: Sequence[Range], lo: float, hi: float) -> list[Range]:
    """The bytes from lo to hi (fractions of the total, in address order), page aligned."""
    total = sum(e - s for s, e in ranges)
    a = int(total * lo) // P * P
    b = int(total * hi) // P * P
    out, offset = [], 0
    for s, e in ranges:
        x, y = max(a, offset), min(b, offset + e - s)
        if x < y:
            out.append((s + x - offset, s + y - offset))
        offset += e - s
    return out


def overlap(s: int, e: int, ranges: Sequence[Range]) -> int:
    return sum(max(0, min(e, re) - max(s, rs)) for rs, re in ranges)


def hot_fractions(snapshot: Snapshot, ranges: Sequence[Range], hot: Sequence[Range]) -> tuple:
    """(share of hot bytes, share of cold bytes) in regions with nr_accesses >= 80 % of max."""
    t = snapshot.targets[0]
    hot_total = sum(e - s for s, e in hot)
    cold_total = sum(e - s for s, e in ranges) - hot_total
    hot_in = cold_in = 0
    for s, e, nr in zip(t.starts.tolist(), t.ends.tolist(), t.nr_accesses.tolist(), strict=True):
        if nr >= 0.8 * snapshot.max_nr_accesses:
            o = overlap(s, e, hot)
            hot_in += o
            cold_in += e - s - o
    return hot_in / hot_total, cold_in / cold_total


def pages(*spec: tuple[int, int, int, int, int]) -> Regions:
    """Regions from (start_page, end_page, nr_accesses, last_nr_accesses, age) rows."""
    cols = list(zip(*spec, strict=True))
    return Regions.build(
        [s * P for s in cols[0]], [e * P for e in cols[1]], cols[2], cols[3], cols[4]
    )


class FixedRng:
    """Stands in for np.random.Generator in split(): the cut draws are given."""

    def __init__(self, draws: list[list[int]]) -> None:
        self.draws = np.array(draws, dtype=np.uint64)

    def integers(self, low: int, high: int, size: tuple[int, int], dtype: type) -> np.ndarray:
        assert self.draws.shape == size and low == 1 and high == 10
        return self.draws.astype(dtype)


# -- literal ports of the kernel's loops, to check the vectorised versions against ---------------


def kernel_merge(regs: list[list[int]], thres: int, sz_limit: int) -> list[list[int]]:
    """damon_merge_regions_of over [start, end, nr_accesses, last_nr_accesses, age] rows."""
    out: list[list[int]] = []
    for s, e, nr, last, age in regs:
        age = 0 if abs(nr - last) > thres else age + 1
        if out:
            prev = out[-1]
            sz_l, sz_r = prev[1] - prev[0], e - s
            if prev[1] == s and abs(prev[2] - nr) <= thres and sz_l + sz_r <= sz_limit:
                prev[2] = (prev[2] * sz_l + nr * sz_r) // (sz_l + sz_r)
                prev[4] = (prev[4] * sz_l + age * sz_r) // (sz_l + sz_r)
                prev[1] = e
                continue
        out.append([s, e, nr, last, age])
    return out


def kernel_split(regs: list[list[int]], nr_subs: int, draws: np.ndarray) -> list[list[int]]:
    """damon_split_regions_of, try k of region i drawing draws[k][i]."""
    out: list[list[int]] = []
    for i, (s, e, nr, last, age) in enumerate(regs):
        pieces = [[s, e, nr, last, age]]  # pieces[0] is the kernel's r, cut again and again
        sz = e - s
        k = 0
        while k < nr_subs - 1 and sz > 2 * P:
            sub = int(draws[k][i]) * sz // 10 // P * P
            k += 1
            if sub == 0 or sub >= sz:
                continue
            r = pieces[0]
            pieces.insert(1, [r[0] + sub, r[1], nr, last, age])
            r[1] = r[0] + sub
            sz = sub
        out.extend(pieces)
    return out


# -- evenly_split -------------------------------------------------------------------------------


def test_evenly_split_three_ranges_into_min_regions() -> None:
    ranges = [(0, 40 * P), (100 * P, 200 * P), (300 * P, 360 * P)]
    r = evenly_split(ranges, 10)
    starts = (0, 20, 100, 120, 140, 160, 180, 300, 320, 340)
    assert r.ranges() == [(s * P, (s + 20) * P) for s in starts]
    assert not r.nr_accesses.any() and not r.age.any()


def test_evenly_split_rounds_pieces_down_and_last_takes_the_remainder() -> None:
    # sz = 100 pages / 30 (not page aligned); 30 pieces asked, each align_down(100/30 pages)
    # = 3 pages, so the kernel's loop makes 33 of them and the last one takes 4 pages.
    r = evenly_split([(0, 100 * P)], 30)
    sizes = (r.sizes() // P).tolist()
    assert sizes == [3] * 32 + [4]
    assert r.starts[0] == 0 and r.ends[-1] == 100 * P


def test_evenly_split_keeps_ranges_smaller_than_a_piece_whole() -> None:
    # total 101 pages, sz = 10.1 pages: the 1-page range stays one region; the other asks for
    # 9 pieces of align_down(100/9) = 11 pages, the last one 12 pages.
    r = evenly_split([(0, P), (10 * P, 110 * P)], 10)
    assert (r.sizes() // P).tolist() == [1] + [11] * 8 + [12]


def test_evenly_split_at_least_one_page_and_aligned() -> None:
    r = evenly_split([(5 * P + 7, 10 * P - 3)], 100)
    assert r.ranges() == [(s * P, (s + 1) * P) for s in range(5, 10)]


# -- set_regions --------------------------------------------------------------------------------


def test_set_regions_drops_clips_fills_and_adds() -> None:
    before = pages(
        (0, 10, 5, 4, 3),
        (10, 20, 7, 7, 2),
        (30, 40, 1, 0, 9),
        (50, 60, 9, 9, 9),  # outside every new range: dropped
    )
    after = set_regions(before, [(5 * P, 35 * P), (70 * P, 80 * P)])
    assert after.rows() == [
        (5 * P, 10 * P, 5, 4, 3),  # first region clipped to the range start
        (10 * P, 20 * P, 7, 7, 2),  # kept as it was
        (20 * P, 30 * P, 0, 0, 0),  # hole filled
        (30 * P, 35 * P, 1, 0, 9),  # last region clipped to the range end
        (70 * P, 80 * P, 0, 0, 0),  # a range no region touched
    ]


def test_set_regions_stretches_edges_to_the_range_and_aligns() -> None:
    after = set_regions(pages((10, 20, 3, 3, 1)), [(2 * P + 100, 30 * P - 100)])
    assert after.rows() == [(2 * P, 30 * P, 3, 3, 1)]


def test_set_regions_region_spanning_two_ranges_stays_in_the_first() -> None:
    after = set_regions(pages((0, 100, 4, 4, 2)), [(0, 40 * P), (60 * P, 100 * P)])
    assert after.rows() == [(0, 40 * P, 4, 4, 2), (60 * P, 100 * P, 0, 0, 0)]


def test_set_regions_on_nothing_makes_one_region_per_range() -> None:
    after = set_regions(Regions.empty(), [(P, 3 * P), (3 * P, 4 * P), (9 * P, 10 * P)])
    assert after.ranges() == [(P, 3 * P), (3 * P, 4 * P), (9 * P, 10 * P)]


# -- merge --------------------------------------------------------------------------------------


def test_merge_hand_computed() -> None:
    r = pages(
        (0, 1, 10, 10, 5),  # unchanged: age 6
        (1, 4, 12, 0, 7),  # changed by 12 > 2: age 0; merges with the first
        (4, 5, 20, 20, 1),  # too different from the merged 11: stays
        (6, 8, 20, 18, 2),  # changed by exactly 2: ages; same nr_accesses but not adjacent
        (8, 10, 0, 0, 0),
    )
    r.merge(threshold=2, sz_limit=100 * P)
    assert r.rows() == [
        # nr = (10*1 + 12*3) // 4 = 11, age = (6*1 + 0*3) // 4 = 1, last stays the left one's
        (0, 4 * P, 11, 10, 1),
        (4 * P, 5 * P, 20, 20, 2),
        (6 * P, 8 * P, 20, 18, 3),
        (8 * P, 10 * P, 0, 0, 1),
    ]


def test_merge_compares_with_the_grown_region_not_the_neighbour() -> None:
    # Each neighbour differs by 2 only, but after 0 and 2 merge into 1, 4 is 3 away.
    r = pages((0, 1, 0, 0, 0), (1, 2, 2, 2, 0), (2, 3, 4, 4, 0), (3, 4, 6, 6, 0))
    r.merge(threshold=2, sz_limit=100 * P)
    assert [(s // P, e // P, nr) for s, e, nr, _, _ in r.rows()] == [(0, 2, 1), (2, 4, 5)]


def test_merge_respects_the_size_limit() -> None:
    r = pages(*[(i, i + 1, 3, 3, 0) for i in range(5)])
    r.merge(threshold=0, sz_limit=2 * P)
    assert (r.sizes() // P).tolist() == [2, 2, 1]


@pytest.mark.parametrize("seed", range(30))
def test_merge_matches_the_kernel_loop(seed: int) -> None:
    rng = np.random.default_rng(seed)
    n = int(rng.integers(1, 300))
    sizes = rng.integers(1, 20, n) * P
    gaps = np.where(rng.random(n) < 0.1, rng.integers(1, 5, n) * P, 0)
    starts = np.cumsum(sizes + gaps) - sizes
    nr = rng.integers(0, 21, n)
    last = np.where(rng.random(n) < 0.5, nr, rng.integers(0, 21, n))
    age = rng.integers(0, 50, n)
    thres = int(rng.integers(0, 6))
    sz_limit = int(rng.integers(1, 60)) * P
    r = Regions.build(starts, starts + sizes, nr, last, age)
    expected = kernel_merge([list(x) for x in r.rows()], thres, sz_limit)
    r.merge(thres, sz_limit)
    assert [list(x) for x in r.rows()] == expected


# -- split --------------------------------------------------------------------------------------


def test_split_cuts_the_left_part_again_and_pieces_inherit() -> None:
    r = pages((0, 100, 7, 5, 3), (100, 101, 1, 1, 1))
    r.split(3, FixedRng([[7, 9], [5, 9]]))  # type: ignore[arg-type]
    # 100 pages: first cut at 70 pages, then the left 70 pages at 35; 1 page: never cut.
    assert r.rows() == [
        (0, 35 * P, 7, 5, 3),
        (35 * P, 70 * P, 7, 5, 3),
        (70 * P, 100 * P, 7, 5, 3),
        (100 * P, 101 * P, 1, 1, 1),
    ]


def test_split_never_makes_blank_or_unaligned_regions() -> None:
    # 3 pages: 1..3 tenths round down to 0 (skipped), 7 tenths to 2 pages.
    # 2 pages is not more than two pages: never cut. 13 pages at 1 tenth: 1 page.
    r = pages((0, 3, 0, 0, 0), (3, 5, 0, 0, 0), (5, 8, 0, 0, 0), (8, 21, 0, 0, 0))
    r.split(2, FixedRng([[2, 9, 7, 1]]))  # type: ignore[arg-type]
    assert [(s // P, e // P) for s, e in r.ranges()] == [
        (0, 3),
        (3, 5),
        (5, 7),
        (7, 8),
        (8, 9),
        (9, 21),
    ]


@pytest.mark.parametrize("seed", range(30))
def test_split_matches_the_kernel_loop(seed: int) -> None:
    rng = np.random.default_rng(seed)
    n = int(rng.integers(1, 200))
    nr_subs = int(rng.integers(2, 4))
    sizes = rng.integers(1, 40, n) * P
    starts = np.cumsum(sizes + rng.integers(0, 3, n) * P) - sizes
    r = Regions.build(
        starts,
        starts + sizes,
        rng.integers(0, 20, n),
        rng.integers(0, 20, n),
        rng.integers(0, 9, n),
    )
    draws = rng.integers(1, 10, (nr_subs - 1, n))
    expected = kernel_split([list(x) for x in r.rows()], nr_subs, draws)
    r.split(nr_subs, FixedRng(draws.tolist()))  # type: ignore[arg-type]
    assert [list(x) for x in r.rows()] == expected
    assert len(r) <= nr_subs * n
    assert (r.starts % P == 0).all() and (r.ends > r.starts).all()


def test_split_with_a_real_generator_covers_the_same_bytes() -> None:
    r = evenly_split(PROCESS_RANGES, 10)
    before = r.ranges()
    r.split(3, np.random.default_rng(1))
    assert len(r) > len(before)
    assert (r.ends[:-1] <= r.starts[1:]).all() and (r.starts % P == 0).all()
    assert sum(overlap(s, e, before) for s, e in r.ranges()) == r.total_size()
    assert r.total_size() == sum(e - s for s, e in before)


def test_rescale_keeps_ratio_and_time() -> None:
    r = pages((0, 1, 10, 0, 4))
    r.rescale(old_max_nr=20, new_max_nr=40, old_aggr_us=100_000, new_aggr_us=200_000)
    assert (int(r.nr_accesses[0]), int(r.age[0])) == (20, 2)


# -- the engine ---------------------------------------------------------------------------------


def assert_invariants(snapshot: Snapshot, ranges: dict[int, list[Range]], attrs: Attrs) -> None:
    total = 0
    for t in snapshot.targets:
        s, e = t.starts, t.ends
        assert s.dtype == np.uint64 and e.dtype == np.uint64
        assert (s < e).all(), "empty region"
        assert (e[:-1] <= s[1:]).all(), "unsorted or overlapping regions"
        assert (s % P == 0).all() and (e % P == 0).all(), "unaligned region"
        pairs = zip(s.tolist(), e.tolist(), strict=True)
        covered = sum(overlap(a, b, ranges[t.index]) for a, b in pairs)
        assert covered == int((e - s).sum()), "region outside the target's ranges"
        assert int(t.nr_accesses.max()) <= snapshot.max_nr_accesses
        total += len(s)
    assert attrs.min_nr_regions <= total <= attrs.max_nr_regions


def test_region_invariants_over_many_aggregations() -> None:
    ranges = {
        0: [
            (0x400000, 0x400000 + 40 * MiB),
            (0x7F0000000000, 0x7F0000000000 + 100 * MiB),
            (0x7FFD00000000, 0x7FFD00000000 + 60 * MiB),
        ],
        1: [(0x10000000, 0x10000000 + 60 * MiB)],
    }
    attrs = Attrs(min_nr_regions=13, max_nr_regions=60)
    engine = Engine(
        context([TargetConfig(0, pid=100), TargetConfig(1, pid=101)], attrs),
        SyntheticSpace(ranges),
        access := SyntheticAccess([], probability=0.6, seed=3),
        rng=np.random.default_rng(3),
    )
    engine.start()
    pattern = np.random.default_rng(4)
    everything = [r for rs in ranges.values() for r in rs]
    seqs = []
    for round_ in range(30):
        # a new random set of hot spots every 5 aggregations
        if round_ % 5 == 0:
            hot = []
            for s, e in everything:
                for _ in range(3):
                    a, b = sorted(pattern.integers(s // P, e // P, 2).tolist())
                    hot.append((a * P, b * P))
            hot.sort()
            access.set_hot(
                lambda addrs, hot=hot: np.any([(addrs >= a) & (addrs < b) for a, b in hot], axis=0)
            )
        for snapshot in run(engine, 5):
            assert snapshot.max_nr_accesses == attrs.samples_per_aggregation
            assert [t.index for t in snapshot.targets] == [0, 1]
            assert [t.pid for t in snapshot.targets] == [100, 101]
            assert_invariants(snapshot, ranges, attrs)
            seqs.append(snapshot.seq)
        engine.prepare()  # prepare twice in a row is harmless: the next run() starts with one
        for index, addrs in access.prepared.items():
            regions = engine.regions_of(index)
            assert regions is not None
            assert (addrs % P == 0).all()
            assert ((addrs >= regions.starts) & (addrs < regions.ends)).all()
    assert seqs == list(range(1, 151))


def test_hot_and_cold_are_told_apart() -> None:
    hot = fraction_of(PROCESS_RANGES, 0.0, 0.1)
    engine = Engine(
        context(),
        SyntheticSpace(PROCESS_RANGES),
        SyntheticAccess(hot),
        rng=np.random.default_rng(7),
    )
    engine.start()
    snapshots = run(engine, 20)
    hot_share, cold_share = hot_fractions(snapshots[-1], PROCESS_RANGES, hot)
    assert hot_share >= 0.9
    assert cold_share <= 0.05


def test_a_moving_hot_spot_is_followed_within_ten_aggregations() -> None:
    first = fraction_of(PROCESS_RANGES, 0.0, 0.1)
    access = SyntheticAccess(first)
    engine = Engine(
        context(), SyntheticSpace(PROCESS_RANGES), access, rng=np.random.default_rng(11)
    )
    engine.start()
    run(engine, 10)
    second = fraction_of(PROCESS_RANGES, 0.5, 0.6)
    access.set_hot(second)
    found = [hot_fractions(s, PROCESS_RANGES, second) for s in run(engine, 10)]
    assert any(h >= 0.9 and c <= 0.05 for h, c in found), found
    # and it is not a fluke: it stays found
    assert found[-1][0] >= 0.9 and found[-1][1] <= 0.05


def test_threshold_doubles_while_over_max_regions() -> None:
    # 20 one-page user regions alternately never and always accessed: no threshold below
    # 20 merges them, so only the doubling (2, 4, 8, 16, 32) brings 20 regions under max 5.
    user = tuple((i * P, (i + 1) * P) for i in range(20))
    hot = [r for i, r in enumerate(user) if i % 2]
    attrs = Attrs(min_nr_regions=3, max_nr_regions=5)
    engine = Engine(
        context([TargetConfig(0, pid=100, regions=user)], attrs),
        SyntheticSpace(list(user)),
        SyntheticAccess(hot),
        rng=np.random.default_rng(0),
    )
    engine.start()
    assert engine.nr_regions == 20
    (snapshot,) = run(engine, 1)
    t = snapshot.targets[0]
    # sz_limit = 20 pages / 3: groups of 6 pages; weighted averages of 0,20,0,20,0,20 = 9
    assert ((t.ends - t.starts) // P).tolist() == [6, 6, 6, 2]
    assert t.nr_accesses.tolist() == [9, 9, 9, 10]


def test_threshold_doubling_stops_at_the_samples_per_aggregation() -> None:
    # Regions that are not adjacent can never merge: the doubling must give up.
    user = tuple((2 * i * P, (2 * i + 1) * P) for i in range(20))
    attrs = Attrs(min_nr_regions=3, max_nr_regions=5)
    engine = Engine(
        context([TargetConfig(0, pid=100, regions=user)], attrs),
        SyntheticSpace(list(user)),
        SyntheticAccess([]),
        rng=np.random.default_rng(0),
    )
    engine.start()
    (snapshot,) = run(engine, 1)
    assert len(snapshot.targets[0].starts) == 20


def test_split_uses_three_pieces_only_when_the_count_settled(monkeypatch) -> None:
    calls: list[tuple[int, int]] = []
    original = Regions.split

    def spy(self: Regions, nr_subs: int, rng: np.random.Generator) -> None:
        calls.append((len(self), nr_subs))
        original(self, nr_subs, rng)

    monkeypatch.setattr(Regions, "split", spy)
    # Non-adjacent one-page regions: never merged, never split (not > 2 pages): the count
    # stays 12, so after the first split (2 pieces) it is "unchanged" and 12 < 40 / 3.
    user = tuple((2 * i * P, (2 * i + 1) * P) for i in range(12))
    engine = Engine(
        context(
            [TargetConfig(0, pid=100, regions=user)], Attrs(min_nr_regions=3, max_nr_regions=40)
        ),
        SyntheticSpace(list(user)),
        SyntheticAccess([]),
        rng=np.random.default_rng(0),
    )
    engine.start()
    run(engine, 3)
    assert calls == [(12, 2), (12, 3), (12, 3)]
    # Over max / 2 regions: no split at all.
    calls.clear()
    engine.commit(
        context(
            [TargetConfig(0, pid=100, regions=user)], Attrs(min_nr_regions=3, max_nr_regions=23)
        )
    )
    run(engine, 3)
    assert calls == []


def test_sampling_addresses_are_random_pages_of_each_region() -> None:
    r = Regions.build([0, 100 * P], [100 * P, 101 * P])
    rng = np.random.default_rng(0)
    seen = {int(r.pick_sampling_addrs(rng.random(2))[0]) for _ in range(200)}
    assert all(a % P == 0 and 0 <= a < 100 * P for a in seen)
    assert len(seen) > 50
    assert set(r.pick_sampling_addrs(rng.random(2)).tolist()) >= {100 * P}


class SamplingAccess(SyntheticAccess):
    """SyntheticAccess that offers the engine's fast path (ops/base.py, TargetSampler):
    a sampler per target that picks as pick_sampling_addrs and answers as check does."""

    def __init__(self, *args: object, **kwargs: object) -> None:
        super().__init__(*args, **kwargs)  # type: ignore[arg-type]
        self.samplers: list[Sampler] = []

    def sampler(self, target: TargetConfig) -> Sampler:
        self.samplers.append(Sampler(self, target))
        return self.samplers[-1]


class Sampler:
    def __init__(self, access: SyntheticAccess, target: TargetConfig) -> None:
        self.access, self.target, self.closed = access, target, False
        self.addrs: np.ndarray | None = None

    def prepare(self, starts: np.ndarray, ends: np.ndarray, u: np.ndarray, offset: int) -> None:
        regions = Regions.build(starts, ends)
        self.addrs = regions.pick_sampling_addrs(u[offset : offset + len(starts)])
        self.access.prepare(self.target, self.addrs)

    def check(self, nr_accesses: np.ndarray) -> None:
        assert self.addrs is not None and nr_accesses.dtype == np.uint32
        nr_accesses += self.access.check(self.target, self.addrs)

    def close(self) -> None:
        self.closed = True


SECOND: list[Range] = [(0x10000000, 0x10000000 + 60 * MiB)]


def sampled_pair(access: SyntheticAccess, schemes: Sequence[SchemeConfig] = ()) -> Engine:
    ranges = {0: PROCESS_RANGES, 1: SECOND}
    targets = (TargetConfig(0, pid=100), TargetConfig(1, pid=101))
    attrs = Attrs(min_nr_regions=13, max_nr_regions=60)
    config = ContextConfig(ops.VADDR, "synthetic", attrs, targets, tuple(schemes))
    engine = Engine(config, SyntheticSpace(ranges), access, rng=np.random.default_rng(3))
    engine.start()
    return engine


def regions_seen(engine: Engine, nr_aggregations: int) -> list[list[list[int]]]:
    return [
        [t.starts.tolist() + t.ends.tolist() + t.nr_accesses.tolist() for t in s.targets]
        for s in run(engine, nr_aggregations)
    ]


def test_a_targets_sampler_sees_what_prepare_and_check_see() -> None:
    """The fast path gets the reference's uniforms: the same pages, the same counts."""
    hot = fraction_of(PROCESS_RANGES, 0.0, 0.2) + fraction_of(SECOND, 0.3, 0.6)
    reference = sampled_pair(SyntheticAccess(hot, probability=0.7, seed=5))
    access = SamplingAccess(hot, probability=0.7, seed=5)
    fast = sampled_pair(access)
    assert regions_seen(fast, 12) == regions_seen(reference, 12)
    assert [s.target.index for s in access.samplers] == [0, 1]
    fast.close()
    assert all(s.closed for s in access.samplers)


def test_uniforms_drawn_ahead_leave_the_splits_their_numbers() -> None:
    """Uniforms are drawn in blocks that end where a scheme applies (nothing drawn ahead
    is thrown away), so a scheme that changes no region changes no split."""
    hot = fraction_of(PROCESS_RANGES, 0.0, 0.2) + fraction_of(SECOND, 0.3, 0.6)
    alone = sampled_pair(SyntheticAccess(hot, probability=0.7, seed=5))
    stat = SchemeConfig(0, apply_interval_us=35_000)  # 7 samples: inside an aggregation
    with_scheme = sampled_pair(SyntheticAccess(hot, probability=0.7, seed=5), [stat])
    assert regions_seen(with_scheme, 12) == regions_seen(alone, 12)


def test_snapshot_fields_and_copies() -> None:
    clock = iter(range(1000, 2000))
    # one-page regions far apart: neither merged nor split, so nothing replaces the arrays
    user = tuple((4 * i * P, (4 * i + 1) * P) for i in range(5))
    engine = Engine(
        context(
            operations=ops.PADDR,
            targets=[TargetConfig(0, pid=-1, regions=user)],
            attrs=Attrs(min_nr_regions=3),
        ),
        SyntheticSpace(list(user)),
        SyntheticAccess([user[0]]),
        rng=np.random.default_rng(0),
        clock=lambda: next(clock),
    )
    engine.start()
    engine.prepare()
    assert engine.check() is None  # not an aggregation boundary yet
    a, b = run(engine, 2)
    assert (a.seq, b.seq, a.max_nr_accesses) == (1, 2, 20)
    assert a.timestamp_us < b.timestamp_us
    assert a.targets[0].pid == -1
    assert b.targets[0].nr_accesses.tolist() == [20, 0, 0, 0, 0]
    # hot: changed at the first aggregation (age 0), then steady (1); cold: steady twice (2)
    expected = [[s, e, 20, 1] if s == 0 else [s, e, 0, 2] for s, e in user]
    assert b.as_dbus() == [2, b.timestamp_us, 20, [[0, -1, expected]]]
    regions = engine.regions_of(0)
    assert regions is not None
    engine_arrays = (
        regions.starts,
        regions.ends,
        regions.nr_accesses,
        regions.last_nr_accesses,
        regions.age,
    )
    t = b.targets[0]
    for array in engine_arrays:
        for field in (t.starts, t.ends, t.nr_accesses, t.ages):
            assert not np.shares_memory(array, field)


class Duty:
    """A hot-set predicate that accesses page p on n[p] of every 20 samples."""

    def __init__(self, duty: dict[int, int]) -> None:
        self.duty = duty
        self.calls = 0

    def __call__(self, addrs: np.ndarray) -> np.ndarray:
        k = self.calls % 20
        self.calls += 1
        return np.array([k < self.duty.get(a // P * P, 0) for a in addrs.tolist()])


def test_merge_threshold_is_a_tenth_of_the_highest_nr_accesses() -> None:
    # The kernel passes check_accesses()'s result, the highest nr_accesses of any region
    # (18 here), not the number of samples (20): threshold 1, so 17 and 15 stay apart.
    user = ((0, P), (P, 2 * P), (2 * P, 3 * P), (3 * P, 4 * P), (10 * P, 110 * P))
    duty = Duty({0: 18, P: 17, 2 * P: 15, 3 * P: 8})
    engine = Engine(
        context([TargetConfig(0, pid=100, regions=user)], Attrs(min_nr_regions=3)),
        SyntheticSpace(list(user)),
        SyntheticAccess(duty),
        rng=np.random.default_rng(0),
    )
    engine.start()
    (snapshot,) = run(engine, 1)
    t = snapshot.targets[0]
    assert [
        (s // P, e // P, nr)
        for s, e, nr in zip(t.starts.tolist(), t.ends.tolist(), t.nr_accesses.tolist(), strict=True)
    ] == [(0, 2, 17), (2, 3, 15), (3, 4, 8), (10, 110, 0)]


def test_ages_grow_while_the_pattern_holds_and_reset_when_it_changes() -> None:
    first = fraction_of(PROCESS_RANGES, 0.0, 0.1)
    access = SyntheticAccess(first)
    engine = Engine(context(), SyntheticSpace(PROCESS_RANGES), access, rng=np.random.default_rng(5))
    engine.start()
    snapshot = run(engine, 15)[-1]
    t = snapshot.targets[0]
    hot = t.nr_accesses == 20
    assert hot.any() and int(t.ages[hot].max()) >= 5  # hot and staying hot: old
    assert int(t.ages[0]) >= 5 and int(t.nr_accesses[0]) == 20  # (the first range is all hot)
    access.set_hot([])
    (snapshot,) = run(engine, 1)
    t = snapshot.targets[0]
    assert int(t.ages[0]) == 0  # went cold: young again
    formerly_hot = np.array(
        [overlap(s, e, first) > 0 for s, e in zip(t.starts.tolist(), t.ends.tolist(), strict=True)]
    )
    assert int(t.ages[~formerly_hot].max()) >= 5  # was and is cold: old


def test_update_fits_regions_to_new_ranges() -> None:
    ranges = [(0, 64 * MiB)]
    space = SyntheticSpace(ranges, update=lambda target: [(16 * MiB, 96 * MiB)])
    attrs = Attrs(update_us=200_000)  # every two aggregations
    engine = Engine(context(attrs=attrs), space, SyntheticAccess([]), rng=np.random.default_rng(0))
    engine.start()
    first, second, third = run(engine, 3)
    for snapshot, expected in ((first, ranges), (second, ranges), (third, [(16 * MiB, 96 * MiB)])):
        t = snapshot.targets[0]
        assert int(t.starts[0]) == expected[0][0] and int(t.ends[-1]) == expected[-1][1]


# -- commit -------------------------------------------------------------------------------------


def two_targets(
    space_ranges: dict[int, list[Range]],
) -> tuple[Engine, SyntheticSpace, SyntheticAccess]:
    space = SyntheticSpace(dict(space_ranges))
    access = SyntheticAccess([])
    engine = Engine(
        context([TargetConfig(0, pid=100), TargetConfig(1, pid=101)]),
        space,
        access,
        rng=np.random.default_rng(0),
    )
    engine.start()
    return engine, space, access


def covered(engine: Engine, index: int) -> tuple[int, int]:
    regions = engine.regions_of(index)
    assert regions is not None
    return int(regions.starts[0]), int(regions.ends[-1])


def test_commit_applies_at_the_next_aggregation_boundary() -> None:
    engine, _, _ = two_targets({0: [(0, 64 * MiB)], 1: [(1 << 40, (1 << 40) + 64 * MiB)]})
    new = context(
        [TargetConfig(0, pid=100), TargetConfig(1, pid=101)],
        Attrs(aggr_us=200_000, max_nr_regions=500),
    )
    for _ in range(5):
        engine.prepare()
        engine.check()
    engine.commit(new)
    for _ in range(14):
        engine.prepare()
        assert engine.check() is None
        assert engine.config.attrs == Attrs()
    (old_attrs_snapshot,) = run(engine, 1)
    assert old_attrs_snapshot.max_nr_accesses == 20
    assert engine.config is new
    # the next aggregation counts the new number of samples
    for _ in range(39):
        engine.prepare()
        assert engine.check() is None
    engine.prepare()
    snapshot = engine.check()
    assert snapshot is not None and snapshot.max_nr_accesses == 40


def test_commit_restarts_a_target_whose_pid_changed_and_keeps_the_others() -> None:
    engine, space, _ = two_targets({0: [(0, 64 * MiB)], 1: [(1 << 40, (1 << 40) + 64 * MiB)]})
    run(engine, 3)
    ages_before = engine.regions_of(1)
    assert ages_before is not None and int(ages_before.age.max()) > 0
    space.ranges = {0: [(2 << 40, (2 << 40) + 32 * MiB)], 1: [(3 << 40, (3 << 40) + 32 * MiB)]}
    engine.commit(context([TargetConfig(0, pid=200), TargetConfig(1, pid=101)]))
    (snapshot,) = run(engine, 1)
    assert covered(engine, 0) == (2 << 40, (2 << 40) + 32 * MiB)  # re-initialised
    assert covered(engine, 1) == (1 << 40, (1 << 40) + 64 * MiB)  # kept its regions
    new_target = engine.regions_of(0)
    kept = engine.regions_of(1)
    assert new_target is not None and kept is not None
    assert int(new_target.age.max()) == 0 and int(kept.age.max()) > 0
    (snapshot,) = run(engine, 1)
    assert [t.pid for t in snapshot.targets] == [200, 101]


def test_commit_fits_a_target_to_its_changed_user_regions() -> None:
    engine, _, _ = two_targets({0: [(0, 64 * MiB)], 1: [(1 << 40, (1 << 40) + 64 * MiB)]})
    run(engine, 2)
    user = ((8 * MiB, 16 * MiB), (32 * MiB, 48 * MiB))
    engine.commit(context([TargetConfig(0, pid=100, regions=user), TargetConfig(1, pid=101)]))
    run(engine, 1)
    regions = engine.regions_of(0)
    assert regions is not None
    assert sum(overlap(s, e, user) for s, e in regions.ranges()) == regions.total_size()
    assert regions.total_size() == 24 * MiB
    assert covered(engine, 1) == (1 << 40, (1 << 40) + 64 * MiB)


# -- targets that go away -----------------------------------------------------------------------


def test_a_target_that_exits_is_dropped_and_done_when_none_is_left(caplog) -> None:
    engine, space, access = two_targets({0: [(0, 64 * MiB)], 1: [(1 << 40, (1 << 40) + 64 * MiB)]})
    run(engine, 1)
    access.gone.add(101)
    with caplog.at_level(logging.INFO, logger="damond.monitor.engine"):
        (snapshot,) = run(engine, 1)
    assert [t.index for t in snapshot.targets] == [0]
    assert "pid 101" in caplog.text
    assert not engine.done
    # the same pid committed again does not come back; a new pid does
    engine.commit(context([TargetConfig(0, pid=100), TargetConfig(1, pid=101)]))
    run(engine, 1)
    assert engine.regions_of(1) is None  # not started again, not even until the next sample
    (snapshot,) = run(engine, 1)
    assert [t.index for t in snapshot.targets] == [0]
    engine.commit(context([TargetConfig(0, pid=100), TargetConfig(1, pid=102)]))
    (snapshot,) = run(engine, 2)[-1:]
    assert [t.pid for t in snapshot.targets] == [100, 102]

    access.gone.update({100, 102})
    engine.prepare()
    assert engine.done
    assert engine.check() is None
    engine.close()
    assert access.closed and space.closed


def test_a_target_gone_at_start_is_dropped() -> None:
    space = SyntheticSpace([(0, 64 * MiB)])
    space.gone.add(100)
    engine = Engine(
        context([TargetConfig(0, pid=100), TargetConfig(1, pid=101)]), space, SyntheticAccess([])
    )
    assert not engine.done
    engine.start()
    assert not engine.done
    (snapshot,) = run(engine, 1)
    assert [t.pid for t in snapshot.targets] == [101]
    space.gone.add(101)
    alone = Engine(context([TargetConfig(0, pid=101)]), space, SyntheticAccess([]))
    alone.start()
    assert alone.done


def test_a_target_that_exits_during_check_is_dropped() -> None:
    engine, _, access = two_targets({0: [(0, 64 * MiB)], 1: [(1 << 40, (1 << 40) + 64 * MiB)]})
    engine.prepare()
    access.gone.add(100)
    engine.check()
    assert engine.regions_of(0) is None and engine.regions_of(1) is not None
    (snapshot,) = run(engine, 1)
    assert [t.pid for t in snapshot.targets] == [101]
