"""Terminal pictures of a Snapshot: pure functions from a D-Bus body to lines.

The body is what the ``Snapshot`` signal or ``GetSnapshot`` carries, as dbus-fast
hands it over: ``[seq, timestamp_us, max_nr_accesses, [[index, pid, [[start,
end, nr_accesses, age], …]], …]]``. Long region lists are compressed to fit a
line budget: regions covering the workload's buffers come first, adjacent
regions with the same rounded frequency are shown as one row, and coarser
rounding (then truncation) is used until the picture fits.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from datetime import datetime
from typing import Any, Protocol

from damond.monitor.ops.common import Range

Region = tuple[int, int, int, int]
"""(start, end, nr_accesses, age)."""

LEVELS = (0, 10, 4, 1)
"""Frequency roundings tried in turn; 0 means exact nr_accesses, 1 zero/non-zero."""

RESET = "\x1b[0m"
BOLD = "\x1b[1m"
DIM = "\x1b[2m"
RED = "\x1b[31m"
GREEN = "\x1b[32m"
YELLOW = "\x1b[33m"
BLUE = "\x1b[34m"
CYAN = "\x1b[36m"

_EIGHTHS = " ▏▎▍▌▋▊▉"

COLUMNS = (
    "columns: range = the region's addresses (rows of alike neighbours are merged); "
    "size; access frequency = nr_accesses / max_nr_accesses as a bar; nr = nr_accesses of "
    "max_nr_accesses samples (a range when merged); age = aggregations the frequency has "
    "stayed about the same; rgns = regions merged into the row; last = what the range is "
    "(the demo's hot/cold buffer, or the mapping it lies in)"
)
"""What the picture's columns mean, said once above it."""

MINOR_SHARE = 0.01
"""A buffer covering less of a region than this (besides the largest) is not named."""


class Labels(Protocol):
    """What names the regions of one process: the demo's buffers, or its mappings."""

    @property
    def pid(self) -> int: ...

    @property
    def summaries(self) -> Sequence[tuple[str, Range]]:
        """Named ranges worth a coverage line of their own above the rows."""
        ...

    def label(self, start: int, end: int) -> str: ...


@dataclass(frozen=True)
class Marks:
    """The workload's buffers, as announced by ``damond.tools.workload``."""

    pid: int
    hot: Range
    cold: Range

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Marks:
        """Build from the workload's JSON line (already decoded)."""
        return cls(
            pid=int(data["pid"]),
            hot=(int(data["hot"][0]), int(data["hot"][1])),
            cold=(int(data["cold"][0]), int(data["cold"][1])),
        )

    @property
    def summaries(self) -> Sequence[tuple[str, Range]]:
        return (("hot", self.hot), ("cold", self.cold))

    def label(self, start: int, end: int) -> str:
        """The buffers a region lies over, the largest share first ('cold+hot'), or ''.

        Besides the largest, a buffer is named only if it covers at least
        ``MINOR_SHARE`` of the region: a 4 KiB sliver does not make a region hot.
        """
        shares = sorted(
            (
                (overlap(start, end, rng), name)
                for name, rng in (("hot", self.hot), ("cold", self.cold))
            ),
            reverse=True,
        )
        minimum = max(1, (end - start) * MINOR_SHARE)
        return "+".join(
            name
            for i, (shared, name) in enumerate(shares)
            if shared and (i == 0 or shared >= minimum)
        )


@dataclass(frozen=True)
class TargetView:
    """One target of a snapshot."""

    index: int
    pid: int
    regions: tuple[Region, ...]


@dataclass(frozen=True)
class SnapshotView:
    """A decoded Snapshot body."""

    seq: int
    timestamp_us: int
    max_nr_accesses: int
    targets: tuple[TargetView, ...]

    @property
    def nr_regions(self) -> int:
        return sum(len(t.regions) for t in self.targets)


@dataclass(frozen=True)
class Coverage:
    """How a byte range fared in one snapshot."""

    size: int
    covered: int
    """Bytes of the range inside some region."""
    accessed: int
    """Bytes of the range inside regions with nr_accesses > 0."""
    weighted: float
    """Sum over covered bytes of nr_accesses / max_nr_accesses."""

    @property
    def accessed_fraction(self) -> float:
        return self.accessed / self.size if self.size else 0.0

    @property
    def covered_fraction(self) -> float:
        return self.covered / self.size if self.size else 0.0

    @property
    def mean_frequency(self) -> float:
        """Mean access frequency (0..1) over the covered bytes."""
        return self.weighted / self.covered if self.covered else 0.0


@dataclass
class Row:
    """One display row: one region, or consecutive regions merged for display."""

    start: int
    end: int
    size: int
    """Bytes in the merged regions (less than end - start if they had gaps)."""
    label: str
    count: int
    weighted_nr: float
    """Sum of size * nr_accesses over the merged regions."""
    nr_min: int
    nr_max: int
    age_min: int
    age_max: int
    bucket: int = 0

    @classmethod
    def of(cls, region: Region, label: str, level: int) -> Row:
        """The row of a single region."""
        start, end, nr, age = region
        size = end - start
        return cls(start, end, size, label, 1, size * nr, nr, nr, age, age, level)

    @property
    def mean_nr(self) -> float:
        return self.weighted_nr / self.size if self.size else 0.0

    def absorb(self, other: Row) -> None:
        """Extend this row by the row that follows it."""
        self.end = other.end
        self.size += other.size
        self.label = _union_label(self.label, other.label)
        self.count += other.count
        self.weighted_nr += other.weighted_nr
        self.nr_min, self.nr_max = min(self.nr_min, other.nr_min), max(self.nr_max, other.nr_max)
        self.age_min = min(self.age_min, other.age_min)
        self.age_max = max(self.age_max, other.age_max)


def _union_label(a: str, b: str) -> str:
    names = [*a.split("+"), *b.split("+")]
    return "+".join(name for name in dict.fromkeys(names) if name)


@dataclass(frozen=True)
class Style:
    """How lines are drawn: colours (only for a tty) and the character set."""

    color: bool = False
    ascii_only: bool = False

    def paint(self, text: str, *codes: str) -> str:
        if not self.color or not codes or not text:
            return text
        return "".join(codes) + text + RESET


def parse(body: Sequence[Any]) -> SnapshotView:
    """Decode a Snapshot/GetSnapshot body, sorting each target's regions by start."""
    seq, timestamp_us, max_nr, targets = body
    views = []
    for index, pid, regions in targets:
        regs = sorted((int(s), int(e), int(n), int(a)) for s, e, n, a in regions)
        views.append(TargetView(int(index), int(pid), tuple(regs)))
    return SnapshotView(int(seq), int(timestamp_us), int(max_nr), tuple(views))


def overlap(start: int, end: int, rng: Range) -> int:
    """Bytes shared by [start, end) and rng."""
    return max(0, min(end, rng[1]) - max(start, rng[0]))


def coverage(regions: Sequence[Region], rng: Range, max_nr: int) -> Coverage:
    """How much of ``rng`` lies in regions, in accessed regions, and how often."""
    covered = accessed = 0
    weighted = 0.0
    for start, end, nr, _age in regions:
        shared = overlap(start, end, rng)
        if not shared:
            continue
        covered += shared
        if nr > 0:
            accessed += shared
            weighted += shared * (nr / max_nr if max_nr else 1.0)
    return Coverage(rng[1] - rng[0], covered, accessed, weighted)


def format_size(nbytes: float) -> str:
    """Human size with binary units: '4.0 KiB', '56.0 MiB'."""
    value = float(nbytes)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(value) < 1024 or unit == "TiB":
            return f"{int(value)} B" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    raise AssertionError("unreachable")


def format_duration(seconds: float) -> str:
    """A short duration: '350ms', '2.4s', '3.0min', '1.5h'."""
    if seconds < 1:
        return f"{seconds * 1000:.0f}ms"
    if seconds < 60:
        return f"{seconds:.1f}s"
    if seconds < 3600:
        return f"{seconds / 60:.1f}min"
    return f"{seconds / 3600:.1f}h"


def steady_for(age_min: int, age_max: int, aggr_us: int) -> str:
    """How long a row's access frequency has held: its ages times the real aggregation
    interval (effective_aggr_us), not the asked one, which a slowed sampler exceeds."""
    low, high = (format_duration(a * aggr_us / 1e6) for a in (age_min, age_max))
    return low if low == high else f"{low}-{high}"


def format_time(timestamp_us: int) -> str:
    """Local wall-clock time of a snapshot, to the millisecond."""
    return datetime.fromtimestamp(timestamp_us / 1e6).strftime("%H:%M:%S.%f")[:-3]


def bucket(nr: int, max_nr: int, levels: int) -> int:
    """Rounded frequency; 0 stays apart from every non-zero value."""
    if levels == 0:
        return nr
    if nr <= 0:
        return 0
    fraction = min(1.0, nr / max_nr) if max_nr else 1.0
    return max(1, math.ceil(fraction * levels))


def heat_color(fraction: float) -> str:
    """ANSI colour of an access frequency in 0..1."""
    if fraction <= 0:
        return BLUE
    if fraction < 0.25:
        return CYAN
    if fraction < 0.5:
        return GREEN
    if fraction < 0.75:
        return YELLOW
    return RED


def bar(fraction: float, width: int, style: Style) -> str:
    """A ``width``-cell bar filled to ``fraction`` (clamped to 0..1)."""
    fraction = min(1.0, max(0.0, fraction))
    eighths = round(fraction * width * 8)
    full, part = divmod(eighths, 8)
    if style.ascii_only:
        filled = "#" * full + ("+" if part >= 4 else "")
        empty_char = "."
    else:
        filled = "█" * full + (_EIGHTHS[part] if part else "")
        empty_char = "·"
    empty = empty_char * (width - len(filled))
    return style.paint(filled, heat_color(fraction)) + style.paint(empty, DIM)


def merge_rows(
    regions: Sequence[Region], marks: Labels | None, max_nr: int, levels: int
) -> list[Row]:
    """Rows of touching regions with the same label and rounded frequency."""
    rows: list[Row] = []
    for region in regions:
        start, end, nr, _age = region
        row = Row.of(region, marks.label(start, end) if marks else "", bucket(nr, max_nr, levels))
        last = rows[-1] if rows else None
        if last and last.end == start and last.label == row.label and last.bucket == row.bucket:
            last.absorb(row)
        else:
            rows.append(row)
    return rows


def squeeze(rows: Sequence[Row], limit: int) -> list[Row]:
    """At most ``limit`` rows, each folding a run of consecutive input rows."""
    if len(rows) <= limit:
        return list(rows)
    per_row = math.ceil(len(rows) / max(1, limit))
    squeezed = []
    for first in range(0, len(rows), per_row):
        group = rows[first : first + per_row]
        row = replace(group[0])
        for other in group[1:]:
            row.absorb(other)
        squeezed.append(row)
    return squeezed


def compress(
    regions: Sequence[Region], marks: Labels | None, max_nr: int, budget: int
) -> list[Row]:
    """At most ``budget`` rows: those over the workload's buffers first, then the rest.

    Tries exact, then coarser frequency rounding; if even zero/non-zero rounding
    does not fit, folds runs of consecutive rows together (the workload's rows
    into at most half the budget, the others into what is left).
    """
    budget = max(2, budget)
    marked: list[Row] = []
    other: list[Row] = []
    for levels in LEVELS:
        rows = merge_rows(regions, marks, max_nr, levels)
        marked = [r for r in rows if r.label]
        other = [r for r in rows if not r.label]
        if len(rows) <= budget:
            return marked + other
    marked = squeeze(marked, max(budget // 2, budget - len(other)))
    return marked + squeeze(other, budget - len(marked))


def _row_line(
    row: Row, max_nr: int, addr_width: int, bar_width: int, style: Style, aggr_us: int = 0
) -> str:
    fraction = row.mean_nr / max_nr if max_nr else 0.0
    span = f"{row.start:x}-{row.end:x}".rjust(addr_width)
    if row.nr_min == row.nr_max:
        nr = f"{row.nr_min}/{max_nr}"
    else:
        nr = f"{row.nr_min}-{row.nr_max}/{max_nr}"
    age = str(row.age_min) if row.age_min == row.age_max else f"{row.age_min}-{row.age_max}"
    count = f"x{row.count}" if row.count > 1 else ""
    label_color = {"hot": RED, "cold": BLUE}.get(row.label, YELLOW)
    label = style.paint(row.label, BOLD, label_color) if row.label else ""
    steady = f"{steady_for(row.age_min, row.age_max, aggr_us):>13}  " if aggr_us else ""
    return (
        f"  {span}  {format_size(row.size):>10}  {bar(fraction, bar_width, style)} "
        f"{nr:>9}  {age:>7}  {steady}{count:>5}  {label}"
    ).rstrip()


def _summary_line(name: str, rng: Range, cov: Coverage, style: Style) -> str:
    color = RED if name == "hot" else BLUE
    text = (
        f"  {style.paint(f'{name:<4}', BOLD, color)} {format_size(cov.size):>10} at {rng[0]:x}: "
        f"{cov.accessed_fraction:4.0%} of bytes in accessed regions, "
        f"mean freq {cov.mean_frequency:4.0%}"
    )
    if cov.covered < cov.size:
        text += f", {1 - cov.covered_fraction:.0%} unmonitored"
    return text


def clip(line: str, width: int) -> str:
    """``line`` cut to ``width`` visible characters, ANSI sequences kept intact."""
    visible = 0
    out: list[str] = []
    for match in re.finditer(r"\x1b\[[0-9;]*m|.", line):
        piece = match.group()
        if len(piece) == 1:
            if visible == width:
                return "".join(out) + (RESET if "\x1b[" in line else "")
            visible += 1
        out.append(piece)
    return line


def render(
    body: Sequence[Any],
    marks: Labels | None = None,
    *,
    access_check: str = "",
    aggr_us: int = 0,
    max_lines: int = 40,
    width: int = 100,
    style: Style | None = None,
    labels: Mapping[int, Labels] | None = None,
) -> list[str]:
    """The lines picturing one snapshot: at most ``max_lines``, each at most ``width``.

    Rows are named by ``marks`` for the target of its pid, or by ``labels`` by pid.

    aggr_us, when known, is the aggregation interval the snapshots really have
    (the context's effective_aggr_us): the header says it, and each row says
    for how long its frequency has held (age × aggr_us).
    """
    style = style or Style()
    snap = parse(body)
    max_nr = snap.max_nr_accesses
    header = (
        f"seq {snap.seq}  {format_time(snap.timestamp_us)}  max_nr_accesses {max_nr}  "
        f"regions {snap.nr_regions}"
    )
    if access_check:
        header += f"  access check {access_check}"
    if aggr_us:
        header += f"  a Snapshot every {format_duration(aggr_us / 1e6)}"
    lines = [style.paint(header, BOLD)]
    if not snap.targets:
        return [clip(line, width) for line in lines + ["  (no targets)"]]
    addr_width = max(
        (len(f"{s:x}-{e:x}") for t in snap.targets for s, e, _n, _a in t.regions), default=0
    )
    bar_width = max(8, min(30, width - addr_width - 54 - (15 if aggr_us else 0)))
    steady = f"{'held for':>13}  " if aggr_us else ""
    column_head = (
        f"  {'range':<{addr_width}}  {'size':>10}  {'access frequency':<{bar_width}} "
        f"{'nr':>9}  {'age':>7}  {steady}{'rgns':>5}"
    )
    # Per target: its title, the column head, and the hot/cold summaries if marked.

    def labels_of(pid: int) -> Labels | None:
        if marks is not None and pid == marks.pid:
            return marks
        return labels.get(pid) if labels else None

    fixed = 1 + sum(
        2 + len(found.summaries) if (found := labels_of(t.pid)) else 2 for t in snap.targets
    )
    row_budget = max(1, (max_lines - fixed) // len(snap.targets))
    for target in snap.targets:
        total = sum(e - s for s, e, _n, _a in target.regions)
        lines.append(
            f"target {target.index}  pid {target.pid}  {len(target.regions)} regions  "
            f"{format_size(total)} monitored"
        )
        mine = labels_of(target.pid)
        if mine:
            for name, rng in mine.summaries:
                cov = coverage(target.regions, rng, max_nr)
                lines.append(_summary_line(name, rng, cov, style))
        lines.append(style.paint(column_head, DIM))
        if not target.regions:
            lines.append("  (no regions)")
            continue
        rows = compress(target.regions, mine, max_nr, row_budget)
        lines.extend(_row_line(r, max_nr, addr_width, bar_width, style, aggr_us) for r in rows)
    return [clip(line, width) for line in lines]
