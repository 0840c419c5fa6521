"""Unit tests of the snapshot renderer, on hand-made Snapshot bodies."""

from __future__ import annotations

import random
import re

import pytest

from damond.tools.render import (
    Marks,
    Style,
    bar,
    bucket,
    clip,
    compress,
    coverage,
    format_size,
    merge_rows,
    parse,
    render,
)

KIB = 1024
MIB = 1024 * KIB
HOT = (0x7F00_0000_0000, 0x7F00_0080_0000)  # 8 MiB
COLD = (0x7F00_0080_1000, 0x7F00_0400_1000)  # 56 MiB, after a guard page
MARKS = Marks(pid=4242, hot=HOT, cold=COLD)
ANSI = re.compile(r"\x1b\[[0-9;]*m")


def body(regions: list[list[int]], max_nr: int = 20, pid: int = 4242) -> list[object]:
    """A Snapshot body with one target."""
    return [7, 1_700_000_000_000_000, max_nr, [[0, pid, regions]]]


def workload_regions() -> list[list[int]]:
    """Hot buffer in two accessed regions, cold buffer in three idle ones, plus others."""
    return [
        [0x5555_0000_0000, 0x5555_0010_0000, 3, 9],
        [HOT[0], HOT[0] + 4 * MIB, 20, 4],
        [HOT[0] + 4 * MIB, HOT[1], 19, 4],
        [COLD[0], COLD[0] + 20 * MIB, 0, 30],
        [COLD[0] + 20 * MIB, COLD[0] + 40 * MIB, 0, 31],
        [COLD[0] + 40 * MIB, COLD[1], 0, 32],
        [0x7FFF_0000_0000, 0x7FFF_0002_0000, 1, 2],
    ]


def many_regions(n: int, seed: int = 1) -> list[list[int]]:
    """n touching regions of random sizes and frequencies, covering HOT and COLD."""
    rng = random.Random(seed)
    start = HOT[0] - 64 * MIB
    regions = []
    for _ in range(n):
        end = start + rng.randint(1, 64) * 4 * KIB
        regions.append([start, end, rng.choice([0, 0, 1, 5, 12, 20]), rng.randint(0, 50)])
        start = end
    return regions


def test_parse_sorts_regions_and_counts_them() -> None:
    regs = workload_regions()
    snap = parse(body(list(reversed(regs))))
    assert snap.seq == 7 and snap.max_nr_accesses == 20
    assert snap.nr_regions == len(regs)
    assert [r[0] for r in snap.targets[0].regions] == sorted(r[0] for r in regs)


def test_marks_label_by_overlap() -> None:
    assert MARKS.label(HOT[0], HOT[0] + 4096) == "hot"
    assert MARKS.label(COLD[1] - 4096, COLD[1] + 4096) == "cold"
    assert MARKS.label(HOT[0], COLD[1]) == "cold+hot"  # the larger share first
    assert MARKS.label(HOT[0], HOT[1] + 2 * MIB) == "hot+cold"
    assert MARKS.label(HOT[1] - 4096, COLD[1]) == "cold"  # one hot page of 56 MiB: not named
    assert MARKS.label(HOT[1] - 4096, HOT[1] + 4096) == "hot"  # the guard does not count
    assert MARKS.label(HOT[1], COLD[0]) == ""  # the guard page alone
    assert Marks.from_json({"pid": 1, "hot": [1, 2], "cold": [3, 4]}) == Marks(1, (1, 2), (3, 4))


def test_coverage_of_hot_and_cold() -> None:
    regs = [tuple(r) for r in workload_regions()]
    hot = coverage(regs, HOT, 20)  # type: ignore[arg-type]
    cold = coverage(regs, COLD, 20)  # type: ignore[arg-type]
    assert hot.accessed_fraction == 1.0
    assert hot.mean_frequency == pytest.approx(19.5 / 20)
    assert cold.accessed_fraction == 0.0 and cold.covered_fraction == 1.0


def test_coverage_counts_partial_and_missing_bytes() -> None:
    regs = [(HOT[0] - MIB, HOT[0] + 2 * MIB, 5, 0)]  # covers the first 2 of 8 MiB
    cov = coverage(regs, HOT, 10)
    assert cov.covered == 2 * MIB and cov.accessed == 2 * MIB
    assert cov.accessed_fraction == 0.25
    assert cov.mean_frequency == pytest.approx(0.5)
    assert coverage(regs, (0, 0), 10).accessed_fraction == 0.0  # empty range: no division


@pytest.mark.parametrize(
    ("nr", "max_nr", "levels", "expected"),
    [
        (0, 20, 4, 0),
        (1, 20, 4, 1),
        (5, 20, 4, 1),
        (6, 20, 4, 2),
        (20, 20, 4, 4),
        (7, 20, 0, 7),
        (3, 20, 1, 1),
        (3, 0, 4, 4),
        (25, 20, 4, 4),
    ],
)
def test_bucket(nr: int, max_nr: int, levels: int, expected: int) -> None:
    assert bucket(nr, max_nr, levels) == expected


def test_merge_rows_merges_only_touching_same_label_same_level() -> None:
    regs = [
        (0x1000, 0x2000, 4, 1),
        (0x2000, 0x3000, 4, 3),  # touches, same nr: merged
        (0x3000, 0x4000, 5, 3),  # different nr at exact level
        (0x5000, 0x6000, 5, 3),  # gap before it: separate
        (0x6000, 0x7000, 0, 3),  # zero never merges with non-zero
    ]
    exact = merge_rows(regs, None, 20, 0)
    assert [(r.start, r.end, r.count) for r in exact] == [
        (0x1000, 0x3000, 2),
        (0x3000, 0x4000, 1),
        (0x5000, 0x6000, 1),
        (0x6000, 0x7000, 1),
    ]
    assert (exact[0].age_min, exact[0].age_max) == (1, 3)
    coarse = merge_rows(regs, None, 20, 1)
    assert [(r.start, r.end, r.nr_min, r.nr_max) for r in coarse] == [
        (0x1000, 0x4000, 4, 5),
        (0x5000, 0x6000, 5, 5),
        (0x6000, 0x7000, 0, 0),
    ]
    assert coarse[0].mean_nr == pytest.approx((4 + 4 + 5) / 3)


def test_merge_rows_keeps_hot_and_cold_apart() -> None:
    regs = [(HOT[0], HOT[1], 0, 0), (HOT[1], COLD[0], 0, 0), (COLD[0], COLD[1], 0, 0)]
    rows = merge_rows(regs, MARKS, 20, 1)
    assert [r.label for r in rows] == ["hot", "", "cold"]


@pytest.mark.parametrize("budget", [2, 5, 17, 40])
def test_compress_fits_budget_and_keeps_totals(budget: int) -> None:
    regs = [tuple(r) for r in many_regions(1000)]
    rows = compress(regs, MARKS, 20, budget)  # type: ignore[arg-type]
    assert 1 <= len(rows) <= budget
    assert sum(r.count for r in rows) == len(regs)
    assert sum(r.size for r in rows) == sum(r[1] - r[0] for r in regs)
    assert sum(r.weighted_nr for r in rows) == sum((r[1] - r[0]) * r[2] for r in regs)


def test_compress_puts_workload_rows_first() -> None:
    regs = [tuple(r) for r in workload_regions()]
    rows = compress(regs, MARKS, 20, 40)  # type: ignore[arg-type]
    assert [r.label for r in rows] == ["hot", "hot", "cold", "", ""]  # exact levels fit
    assert (rows[2].start, rows[2].end, rows[2].count) == (COLD[0], COLD[1], 3)
    rows = compress(regs, MARKS, 20, 4)  # type: ignore[arg-type]
    assert [r.label for r in rows] == ["hot", "cold", "", ""]
    assert (rows[0].start, rows[0].end) == HOT  # 20 and 19 round alike


def test_compress_returns_everything_when_it_fits() -> None:
    regs = [tuple(r) for r in many_regions(12)]
    assert len(compress(regs, None, 20, 40)) == len(merge_rows(regs, None, 20, 0))  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("fraction", "filled"), [(0.0, 0), (0.5, 10), (1.0, 20), (1.7, 20), (-1.0, 0)]
)
def test_bar_has_fixed_width(fraction: float, filled: int) -> None:
    plain = bar(fraction, 20, Style())
    assert len(plain) == 20 and plain.count("█") == filled
    ascii_bar = bar(fraction, 20, Style(ascii_only=True))
    assert len(ascii_bar) == 20 and ascii_bar.count("#") == filled
    colored = bar(fraction, 20, Style(color=True))
    assert ANSI.sub("", colored) == plain


def test_bar_partial_cell() -> None:
    assert bar(0.0625, 4, Style()) == "▎···"  # 1/16 of 4 cells = 2 eighths of a cell
    assert bar(0.0625, 4, Style()) != bar(0.0, 4, Style())


@pytest.mark.parametrize(
    ("size", "text"),
    [(0, "0 B"), (1023, "1023 B"), (4096, "4.0 KiB"), (8 * MIB, "8.0 MiB"), (3 << 30, "3.0 GiB")],
)
def test_format_size(size: int, text: str) -> None:
    assert format_size(size) == text


def test_render_header_and_summary() -> None:
    lines = render(body(workload_regions()), MARKS, access_check="clear_refs", max_lines=9)
    text = "\n".join(lines)
    assert not ANSI.search(text)
    assert lines[0].startswith("seq 7 ")
    assert "max_nr_accesses 20" in lines[0] and "regions 7" in lines[0]
    assert "access check clear_refs" in lines[0]
    hot_line = next(line for line in lines if line.lstrip().startswith("hot "))
    cold_line = next(line for line in lines if line.lstrip().startswith("cold "))
    assert "100% of bytes in accessed regions" in hot_line
    assert "0% of bytes in accessed regions" in cold_line and "100%" not in cold_line
    rows = [line for line in lines if re.match(r"\s+[0-9a-f]+-[0-9a-f]+\s", line)]
    assert rows[0].endswith("hot") and "8.0 MiB" in rows[0] and "19-20/20" in rows[0]
    assert rows[1].endswith("cold") and "56.0 MiB" in rows[1] and "x3" in rows[1]
    assert "30-32" in rows[1]  # the merged cold regions' ages


def test_render_says_times_with_the_real_aggregation_interval() -> None:
    """age × effective_aggr_us: a sampler slowed to 240 ms aggregations (asked 100) has
    kept the cold buffer idle 7.2-7.7 s, not the 3.0-3.2 s the asked interval would say."""
    lines = render(body(workload_regions()), MARKS, aggr_us=240_000, max_lines=9, width=120)
    assert "a Snapshot every 240ms" in lines[0]
    rows = [line for line in lines if re.match(r"\s+[0-9a-f]+-[0-9a-f]+\s", line)]
    assert "held for" in next(line for line in lines if "range" in line)
    assert "7.2s-7.7s" in rows[1] and rows[1].endswith("cold"), rows[1]
    assert "960ms" in rows[0], rows[0]  # the hot rows' age 4
    assert all(len(line) <= 120 for line in lines)
    assert "held for" not in "\n".join(render(body(workload_regions()), MARKS))


def test_render_marks_only_the_workload_target() -> None:
    lines = render(body(workload_regions(), pid=1), MARKS)
    assert not any("accessed regions" in line for line in lines)
    assert not any(line.endswith(("hot", "cold")) for line in lines)


@pytest.mark.parametrize("max_lines", [20, 40])
def test_render_fits_the_line_budget(max_lines: int) -> None:
    targets = [[0, 4242, many_regions(1000)], [1, 77, many_regions(300, 2)]]
    lines = render([9, 1_700_000_000_000_000, 20, targets], MARKS, max_lines=max_lines)
    assert len(lines) <= max_lines
    assert "regions 1300" in lines[0]
    assert max(len(line) for line in lines) <= 100
    narrow = render([9, 0, 20, targets], MARKS, width=60, style=Style(color=True))
    assert max(len(ANSI.sub("", line)) for line in narrow) == 60


def test_clip_keeps_escapes_and_counts_visible_characters() -> None:
    assert clip("abcdef", 4) == "abcd"
    assert clip("abc", 4) == "abc"
    assert clip("\x1b[31mabcdef\x1b[0m", 3) == "\x1b[31mabc\x1b[0m"


def test_render_colour_only_on_request() -> None:
    plain = render(body(workload_regions()), MARKS)
    colored = render(body(workload_regions()), MARKS, style=Style(color=True))
    assert any(ANSI.search(line) for line in colored)
    assert [ANSI.sub("", line) for line in colored] == plain


def test_render_degenerate_snapshots() -> None:
    assert render([1, 0, 20, []])[1] == "  (no targets)"
    assert render([1, 0, 20, [[0, 5, []]]])[-1] == "  (no regions)"
    lines = render(body([[0x1000, 0x3000, 0, 0]], max_nr=0))  # no samples: no division by 0
    assert "0/0" in lines[-1]
