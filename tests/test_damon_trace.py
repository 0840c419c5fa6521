"""Reading kernel DAMON's trace events: ring buffer pages, records, whole aggregations.

The pages here are built by hand in the kernel's binary format (the
arithmetic of headers, time deltas and lengths is what is tested); reading
them from a real kernel, with a real kdamond writing them, is
tests/vm/test_guest_kernel_backend.py's.
"""

from __future__ import annotations

import struct

import numpy as np
import pytest

from damond import wire
from damond.monitor.kernel import _target_snapshot
from damond.monitor.kernel_relay import Aggregations
from damond.monitor.ops import damon_trace
from damond.monitor.ops.damon_trace import (
    EventFormat,
    Events,
    PageLayout,
    parse_page,
    parse_pages,
    parse_pages_native,
)
from damond.monitor.snapshot import Snapshot

# events/damon/damon_aggregated/format of the test guest's Linux 6.12
FORMAT = """name: damon_aggregated
ID: 340
format:
\tfield:unsigned short common_type;\toffset:0;\tsize:2;\tsigned:0;
\tfield:unsigned char common_flags;\toffset:2;\tsize:1;\tsigned:0;
\tfield:unsigned char common_preempt_count;\toffset:3;\tsize:1;\tsigned:0;
\tfield:int common_pid;\toffset:4;\tsize:4;\tsigned:1;

\tfield:unsigned long target_id;\toffset:8;\tsize:8;\tsigned:0;
\tfield:unsigned int nr_regions;\toffset:16;\tsize:4;\tsigned:0;
\tfield:unsigned long start;\toffset:24;\tsize:8;\tsigned:0;
\tfield:unsigned long end;\toffset:32;\tsize:8;\tsigned:0;
\tfield:unsigned int nr_accesses;\toffset:40;\tsize:4;\tsigned:0;
\tfield:unsigned int age;\toffset:44;\tsize:4;\tsigned:0;

print fmt: "target_id=%lu nr_regions=%u %lu-%lu: %u %u", REC->target_id, ...
"""
FMT = EventFormat.parse(FORMAT)
PAYLOAD = struct.Struct("<HBBiQI4xQQII")
PAGE = 4096


def record(delta: int, pid: int, target: int, nr: int, start: int, end: int, acc: int, age: int,
           event: int = 340) -> bytes:  # fmt: skip
    return struct.pack("<I", 12 | delta << 5) + PAYLOAD.pack(
        event, 0, 1, pid, target, nr, start, end, acc, age
    )


def extend(delta: int) -> bytes:
    """A time extend: delta split over its header's 27 bits and its word."""
    return struct.pack("<II", 30 | (delta & ((1 << 27) - 1)) << 5, delta >> 27)


def padding(length: int) -> bytes:
    """A discarded event of length bytes (header included)."""
    return struct.pack("<II", 29 | 1 << 5, length - 4) + bytes(length - 8)


def page(ts: int, *items: bytes, missed: bool = False) -> bytes:
    data = b"".join(items)
    commit = len(data) | (1 << 31 if missed else 0)
    return struct.pack("<Qq", ts, commit) + data + bytes(PAGE - 16 - len(data))


def regions(pid: int, target: int, n: int, first_delta: int = 7, acc: int = 3) -> list[bytes]:
    return [
        record(first_delta if i == 0 else 1, pid, target, n, i * 4096, (i + 1) * 4096, acc, i)
        for i in range(n)
    ]


def test_the_format_says_where_each_field_is() -> None:
    assert FMT.event_id == 340
    assert FMT.dtype.itemsize == 48 and FMT.type_len == 12
    assert {n: FMT.dtype.fields[n][1] for n in ("start", "end", "age")} == {  # type: ignore[index]
        "start": 24,
        "end": 32,
        "age": 44,
    }
    with pytest.raises(damon_trace.TraceError, match="lacks age"):
        EventFormat.parse(FORMAT.replace("int age;", "int aged;"))


def test_a_page_of_records_becomes_times_and_fields() -> None:
    p = page(1000, *regions(55, 0, 3))
    events = parse_page(p, FMT)
    assert events.ts.tolist() == [1007, 1008, 1009]
    assert events.records.field("start").tolist() == [0, 4096, 8192]
    assert events.records.field("common_pid").tolist() == [55, 55, 55]
    assert events.records.field("nr_regions").tolist() == [3, 3, 3]
    assert events.records.field("age").tolist() == [0, 1, 2]
    assert events.records.field("common_type").tolist() == [340] * 3
    assert not events.missed


def test_time_extends_padding_and_other_events_are_stepped_over() -> None:
    long_gap = 5 << 27 | 12345  # more than a header's 27 bits of delta
    other = record(2, 1, 0, 1, 0, 4096, 0, 0, event=341)
    items = [
        *regions(55, 0, 2),
        padding(20),
        extend(long_gap),
        other,
        *regions(55, 1, 2, first_delta=4),
    ]
    p = page(10**9, *items, missed=True)
    events = parse_page(p, FMT)
    after_extend = 10**9 + 7 + 1 + long_gap + 2
    assert events.ts.tolist() == [10**9 + 7, 10**9 + 8, after_extend + 4, after_extend + 5]
    assert events.records.field("target_id").tolist() == [0, 0, 1, 1]
    assert events.missed
    joined = parse_pages([p, page(2 * 10**9, *regions(56, 0, 1))], FMT)
    assert joined.ts.tolist() == [*events.ts.tolist(), 2 * 10**9 + 7]
    assert joined.records.field("common_pid").tolist() == [55, 55, 55, 55, 56]
    assert joined.missed


def test_a_record_of_another_event_of_the_same_length_is_not_taken() -> None:
    """It does not shift the records after it: each record's event id is read."""
    items = regions(55, 0, 3)
    items.insert(1, record(2, 1, 0, 1, 0, 4096, 0, 0, event=341))
    events = parse_page(page(1000, *items), FMT)
    assert events.ts.tolist() == [1007, 1010, 1011]
    assert events.records.field("common_type").tolist() == [340] * 3
    assert parse_pages([page(1000, *items)], FMT).ts.tolist() == [1007, 1010, 1011]


def test_reading_pages_together_is_reading_them_one_by_one() -> None:
    """parse_pages joins the runs of several pages into one numpy pass: the same result."""
    rng = np.random.default_rng(3)
    pages = []
    for n in range(12):
        items: list[bytes] = []
        for _ in range(int(rng.integers(1, 4))):
            kind = int(rng.integers(0, 4))
            if kind == 0:
                items.append(extend(int(rng.integers(1 << 27, 1 << 40))))
            elif kind == 1:
                items.append(padding(int(rng.integers(2, 30)) * 4))
            items += regions(50 + n % 2, 0, int(rng.integers(1, 25)), int(rng.integers(0, 99)))
        pages.append(page(n * 10**8, *items))
    one_by_one = [parse_page(p, FMT) for p in pages]
    together = parse_pages(pages, FMT)
    assert together.ts.tolist() == np.concatenate([e.ts for e in one_by_one]).tolist()
    assert (
        together.records.words
        == np.concatenate([e.records.words for e in one_by_one])
    ).all()


# --- the C parser against the Python reference ------------------------------------------------

needs_c = pytest.mark.skipif(
    damon_trace.NATIVE_PARSE is None,
    reason=f"damond's C module is not built here: {damon_trace.NO_NATIVE_PARSE}",
)


def stamp(time: int) -> bytes:
    """An absolute time stamp (its top 5 bits left out, as the kernel writes it)."""
    time &= (1 << 59) - 1
    return struct.pack("<II", 31 | (time & ((1 << 27) - 1)) << 5, time >> 27)


def same(a: Events, b: Events) -> None:
    assert a.ts.dtype == b.ts.dtype == np.uint64
    assert a.ts.tolist() == b.ts.tolist()
    assert a.records.words.dtype == b.records.words.dtype == np.uint32
    assert a.records.words.shape == b.records.words.shape
    assert (a.records.words == b.records.words).all()
    assert a.missed == b.missed


def random_pages(seed: int) -> list[bytes]:
    """Pages of runs of records between every other kind of entry the ring buffer has:
    time extends, absolute time stamps, padding, other events of the same and of other
    lengths, long records (type_len 0), records lost before a page, torn ends."""
    rng = np.random.default_rng(seed)
    pages = []
    for n in range(int(rng.integers(1, 9))):
        items: list[bytes] = []
        for _ in range(int(rng.integers(0, 6))):
            kind = int(rng.integers(0, 8))
            if kind == 0:
                items.append(extend(int(rng.integers(1, 1 << 40))))
            elif kind == 1:
                items.append(padding(int(rng.integers(2, 30)) * 4))
            elif kind == 2:
                items.append(stamp(int(rng.integers(0, 1 << 62))))
            elif kind == 3:
                items.append(record(int(rng.integers(0, 1 << 27)), 9, 0, 1, 0, 1, 0, 0, 341))
            elif kind == 4:  # a record of 3 words, then one of 40 (its length in a word)
                items.append(struct.pack("<IIII", 3 | 5 << 5, 340, 1, 2))
                items.append(struct.pack("<II", 0 | 6 << 5, 164) + bytes(160))
            items += regions(50 + n % 3, int(rng.integers(0, 3)), int(rng.integers(1, 30)),
                             int(rng.integers(0, 1 << 27)))  # fmt: skip
        missed = bool(rng.integers(0, 4) == 0)
        data = page(int(rng.integers(0, 1 << 62)), *items[:40], missed=missed)
        cut = int(rng.integers(0, 5))
        if cut == 1:  # a commit that ends inside a record
            commit = min(len(b"".join(items[:40])), PAGE - 16) - 20
            data = data[:8] + struct.pack("<q", max(commit, 0)) + data[16:]
        elif cut == 2:  # padding to the end of the page (delta 0)
            data = data[:8] + struct.pack("<q", PAGE - 16) + data[16:]
        pages.append(data)
    return pages


@needs_c
@pytest.mark.parametrize("seed", range(40))
def test_the_c_parser_reads_what_the_python_one_reads(seed: int) -> None:
    pages = random_pages(seed)
    same(parse_pages_native(pages, FMT), parse_pages(pages, FMT))
    one_by_one = Events.join([parse_page(p, FMT) for p in pages], FMT, same_missed(pages))
    same(parse_pages_native(pages, FMT), one_by_one)


def same_missed(pages: list[bytes]) -> bool:
    return any(struct.unpack_from("<Q", p, 8)[0] & (1 << 31) for p in pages)


@needs_c
def test_the_c_parser_reads_the_cases_written_out_above() -> None:
    long_gap = 5 << 27 | 12345
    other = record(2, 1, 0, 1, 0, 4096, 0, 0, event=341)
    items = [*regions(55, 0, 2), padding(20), extend(long_gap), other, *regions(55, 1, 2)]
    cases = [
        [page(1000, *regions(55, 0, 3))],
        [page(10**9, *items, missed=True), page(2 * 10**9, *regions(56, 0, 1))],
        [page(TS_HIGH, *regions(1, 0, 2), stamp(TS_HIGH + 99), *regions(1, 0, 2))],
        [page(0)],
        [],
    ]
    for pages in cases:
        same(parse_pages_native(pages, FMT), parse_pages(pages, FMT))
    with pytest.raises(ValueError, match="shorter than its header"):
        parse_pages_native([b"short"], FMT)


TS_HIGH = (0xF8 << 56) | 12345
"""A trace clock time with the top bits an absolute time stamp leaves out."""


def test_a_snapshot_of_records_is_marshalled_from_their_words_as_they_are() -> None:
    """The kernel's regions leave as the record's words: the same bytes as dbus-fast's."""
    items = [
        record(1, 55, 0, 3, (i + 1) << 40, ((i + 1) << 40) + 4096 * (i + 1), 20 - i, 7 * i + 1)
        for i in range(3)
    ]
    records = parse_pages([page(1000, *items)], FMT).records
    target = _target_snapshot(0, 55, records)
    assert target.wire is not None
    snapshot = Snapshot(9, 1_700_000_000_000_000, 20, (target,))
    expected = wire.marshal("ttua(uia(ttuu))", snapshot.as_dbus())
    assert wire.snapshot_body(snapshot) == expected
    assert snapshot.as_dbus()[3][0][2][1] == [2 << 40, (2 << 40) + 8192, 19, 8]
    assert records.span((("start", 8), ("age", 4))) is None  # not side by side
    assert records.span((("start", 8), ("end", 4))) is None  # not of that size


def test_layout_of_pages_comes_from_tracefs() -> None:
    header_page = "\tfield: char data;\toffset:16;\tsize:4080;\tsigned:0;\n"
    assert PageLayout.parse(header_page, 8192) == PageLayout(16, 8192)


def aggregate(aggregations: Aggregations, *pages: bytes) -> list[list[tuple[int, list[int]]]]:
    """The aggregations the pages complete: per aggregation, (target, region starts)."""
    events = parse_pages(list(pages), FMT)
    return [
        [(t, r.field("start").tolist()) for t, r in a.targets]
        for a in aggregations.add(events.ts, events.records)
    ]


def test_aggregations_are_whole_once_every_target_is_read() -> None:
    agg = Aggregations(nr_targets=2)
    first = regions(55, 0, 3) + regions(55, 1, 2)
    assert aggregate(agg, page(0, *first[:4])) == []  # target 1 half read
    assert agg.midway
    assert aggregate(agg, page(100, *first[4:], *regions(55, 0, 1))) == [
        [(0, [0, 4096, 8192]), (1, [0, 4096])]
    ]
    assert aggregate(agg, page(200, *regions(55, 1, 1))) == [[(0, [0]), (1, [0])]]
    assert not agg.midway


def test_a_loss_drops_the_half_read_aggregation_and_waits_for_a_whole_one() -> None:
    agg = Aggregations(nr_targets=2)
    assert aggregate(agg, page(0, *regions(55, 0, 2))) == []
    agg.lose()
    # the kernel dropped records: what comes next is the tail of an aggregation
    tail = regions(55, 1, 3)[1:]  # target 1's last two of three regions
    assert aggregate(agg, page(100, *tail, *regions(55, 0, 1), *regions(55, 1, 1))) == [
        [(0, [0]), (1, [0])]
    ]


def test_a_run_glued_from_two_aggregations_is_refused_after_a_loss() -> None:
    """A target's last regions, then (records lost) the next aggregation's first ones:
    same target, same count, but not sorted: not one aggregation, and what follows is."""
    agg = Aggregations(nr_targets=1)
    agg.lose()
    old = regions(55, 0, 4)[2:]  # regions 2, 3 of 4
    new = regions(55, 0, 4)  # a whole next aggregation
    got = aggregate(agg, page(0, *old, *new[:2]), page(100, *new[2:], *regions(55, 0, 4)))
    whole = [(0, [0, 4096, 8192, 12288])]
    assert got == [whole, whole]  # the glued run refused; the two whole ones after it kept
