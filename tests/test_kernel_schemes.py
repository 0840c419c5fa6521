"""The kernel backend's scheme results: damos_before_apply records back into tried regions.

Pages are built by hand in the kernel's binary format, as in test_damon_trace.py
(the arithmetic is what is tested here); a real kernel's DAMOS writing them,
and damond reading them over D-Bus, is tests/vm/test_damos.py's and
tests/vm/test_guest_kernel_backend.py's.
"""

from __future__ import annotations

import struct

from damond.monitor import ops
from damond.monitor.config import Attrs, ContextConfig, SchemeConfig, TargetConfig
from damond.monitor.kernel_schemes import KernelSchemes, last_applications
from damond.monitor.ops.damon_trace import TRIED_FIELDS, EventFormat, Events, parse_pages

# events/damon/damos_before_apply/format of the test guest's Linux 6.12
FORMAT = """name: damos_before_apply
ID: 341
format:
\tfield:unsigned short common_type;\toffset:0;\tsize:2;\tsigned:0;
\tfield:unsigned char common_flags;\toffset:2;\tsize:1;\tsigned:0;
\tfield:unsigned char common_preempt_count;\toffset:3;\tsize:1;\tsigned:0;
\tfield:int common_pid;\toffset:4;\tsize:4;\tsigned:1;

\tfield:unsigned int context_idx;\toffset:8;\tsize:4;\tsigned:0;
\tfield:unsigned int scheme_idx;\toffset:12;\tsize:4;\tsigned:0;
\tfield:unsigned long target_idx;\toffset:16;\tsize:8;\tsigned:0;
\tfield:unsigned long start;\toffset:24;\tsize:8;\tsigned:0;
\tfield:unsigned long end;\toffset:32;\tsize:8;\tsigned:0;
\tfield:unsigned int nr_accesses;\toffset:40;\tsize:4;\tsigned:0;
\tfield:unsigned int age;\toffset:44;\tsize:4;\tsigned:0;
\tfield:unsigned int nr_regions;\toffset:48;\tsize:4;\tsigned:0;

print fmt: "ctx_idx=%u scheme_idx=%u target_idx=%lu nr_regions=%u %lu-%lu: %u %u", ...
"""
FMT = EventFormat.parse(FORMAT, TRIED_FIELDS)
PAYLOAD = struct.Struct("<HBBiIIQQQIII4x")
"""The kernel's struct: 52 bytes of fields, padded to 56 (its 8-byte fields' alignment)."""
PAGE = 4096
MiB = 1 << 20
PID = 77


def tried(
    delta: int, scheme: int, target: int, start: int, end: int, nr: int = 0, age: int = 5
) -> bytes:
    return struct.pack("<I", 14 | delta << 5) + PAYLOAD.pack(
        341, 0, 1, PID, 0, scheme, target, start, end, nr, age, 9
    )


def page(ts: int, *items: bytes) -> bytes:
    data = b"".join(items)
    return struct.pack("<Qq", ts, len(data)) + data + bytes(PAGE - 16 - len(data))


def events(ts: int, *items: bytes) -> Events:
    return parse_pages([page(ts, *items)], FMT)


def test_a_record_is_the_kernels_padded_struct() -> None:
    """The ring buffer holds the whole struct, tail padding included: 56 bytes, not the 52
    its fields end at (reading 52-byte records found none in a real guest's buffer)."""
    assert FMT.event_id == 341
    assert FMT.dtype.itemsize == 56 and FMT.type_len == 14
    got = events(1000, tried(3, 1, 2, 4096, 8192, nr=7, age=11), tried(1, 0, 0, 0, 4096))
    assert got.ts.tolist() == [1003, 1004]
    fields = {name: got.records.field(name).tolist() for name in TRIED_FIELDS}
    assert fields == {
        "common_type": [341, 341],
        "common_pid": [PID, PID],
        "scheme_idx": [1, 0],
        "target_idx": [2, 0],
        "start": [4096, 0],
        "end": [8192, 4096],
        "nr_accesses": [7, 0],
        "age": [11, 5],
    }


def test_each_schemes_last_application_is_told_apart_by_the_regions_order() -> None:
    """An application walks the targets in order, each one's regions by address, every
    scheme for each region: where a scheme's order falls back, its next one began."""
    first = [tried(1, 0, 0, 0, MiB), tried(1, 1, 0, 0, MiB), tried(1, 0, 1, 0, MiB)]
    second = [tried(1, 1, 0, 2 * MiB, 3 * MiB), tried(1, 0, 0, MiB, 2 * MiB)]
    third = [tried(1, 0, 0, MiB, 2 * MiB)]  # the same region again: a new application
    got = last_applications(events(0, *first, *second, *third).records)
    assert got == {
        0: ((0, MiB, 2 * MiB, 0, 5),),
        1: ((0, 0, MiB, 0, 5), (0, 2 * MiB, 3 * MiB, 0, 5)),  # later in the same order
    }


def context(*schemes: SchemeConfig, aggr_us: int = 100_000) -> ContextConfig:
    return ContextConfig(ops.VADDR, "", Attrs(aggr_us=aggr_us), (TargetConfig(0, 1),), schemes)


def test_a_snapshot_carries_the_applications_before_its_aggregation() -> None:
    results = KernelSchemes()
    config = context(SchemeConfig(0), SchemeConfig(1, apply_interval_us=1_000_000))
    assert [r.tried for r in results.results(50, config)] == [(), None]  # none yet
    got = events(100, tried(1, 0, 0, 0, MiB), tried(1, 1, 0, 0, MiB), tried(500, 0, 0, 0, MiB))
    results.tried(got.ts, got.records)
    first = results.results(200, config)  # the aggregation whose first record is at 200
    assert [r.tried for r in first] == [((0, 0, MiB, 0, 5),), ((0, 0, MiB, 0, 5),)]
    second = results.results(400, config)  # no records between: scheme 0 tried nothing,
    assert [r.tried for r in second] == [(), ((0, 0, MiB, 0, 5),)]  # 1 was not due
    third = results.results(700, config)  # the record at 601 waited for this one
    assert third[0].tried == ((0, 0, MiB, 0, 5),)


def test_lost_records_keep_what_was_known_and_stats_come_as_read() -> None:
    results = KernelSchemes()
    config = context(SchemeConfig(0))
    got = events(100, tried(1, 0, 0, 0, MiB))
    results.tried(got.ts, got.records)
    assert results.results(200, config)[0].tried == ((0, 0, MiB, 0, 5),)
    results.lost()
    assert results.results(300, config)[0].tried == ((0, 0, MiB, 0, 5),)  # unknown: kept
    assert results.results(400, config)[0].tried == ()  # a whole aggregation seen again
    results.took_stats([(3, 3 * MiB, 2, MiB, 1)], [4 * MiB])
    (result,) = results.results(500, config)
    assert (result.stats.nr_tried, result.stats.sz_applied, result.stats.qt_exceeds) == (
        3,
        MiB,
        1,
    )
    assert result.effective_bytes == 4 * MiB


def test_without_the_trace_event_the_tried_regions_stay_unknown() -> None:
    results = KernelSchemes(tracks_tried=False)
    assert results.results(100, context(SchemeConfig(0)))[0].tried is None  # not "nothing"
