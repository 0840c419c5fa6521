"""page_idle on this host: its pure helpers, its I/O against stand-in files, the registry.

This kernel has no idle page tracking, so the kernel's side of it is tested in
the guest (tests/vm/test_page_idle.py). Here a regular file stands in for
/sys/kernel/mm/page_idle/bitmap: what prepare() writes and check() reads is
checked word by word, against the real pagemap and kpageflags of a child.
"""

from __future__ import annotations

import errno
import functools
import os
import subprocess
import sys
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from ops_helpers import ChildProcess, assert_gone, registry_with  # tests/ops_helpers.py

from damond.monitor import ops
from damond.monitor.config import TargetConfig
from damond.monitor.ops import page_idle as pi
from damond.monitor.regions import Regions

HEAD, TAIL, LRU = pi.KPF_COMPOUND_HEAD, pi.KPF_COMPOUND_TAIL, pi.KPF_LRU
PAGE = pi.KERNEL_PAGE
u64 = np.uint64


def arr(*values: int) -> np.ndarray:
    return np.array(values, dtype=np.uint64)


def entries_file(tmp_path: Path, values: np.ndarray | list[int], name: str = "entries") -> int:
    path = tmp_path / name
    path.write_bytes(np.asarray(values, dtype=np.uint64).tobytes())
    return os.open(path, os.O_RDWR)


class SyscallLog:
    """Records os.pread/os.pwrite calls as (kind, size, offset), still doing them."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch, max_chunk: int | None = None) -> None:
        self.calls: list[tuple[str, int, int]] = []
        pread, pwrite = os.pread, os.pwrite

        def logged_pread(fd: int, size: int, offset: int) -> bytes:
            self.calls.append(("pread", size, offset))
            return pread(fd, min(size, max_chunk or size), offset)

        def logged_pwrite(fd: int, data: Any, offset: int) -> int:
            self.calls.append(("pwrite", len(data), offset))
            return pwrite(fd, bytes(data)[: max_chunk or len(data)], offset)

        monkeypatch.setattr(os, "pread", logged_pread)
        monkeypatch.setattr(os, "pwrite", logged_pwrite)


# --- runs and layouts -----------------------------------------------------------------


def test_runs_split_where_positions_are_far_apart() -> None:
    positions = arr(3, 4, 6, 20, 21, 40)

    def runs(gap: int) -> list[tuple[int, int]]:
        layout = pi.Layout.of(positions, gap)
        return list(zip(layout.firsts, layout.counts, strict=True))

    assert runs(0) == [(3, 2), (6, 1), (20, 2), (40, 1)]
    assert runs(1) == [(3, 4), (20, 2), (40, 1)]  # one missing between 4 and 6: read too
    assert runs(100) == [(3, 38)]


def test_layout_indexes_each_position_in_the_concatenated_runs() -> None:
    rng = np.random.default_rng(0)
    positions = np.unique(rng.integers(0, 5000, 300).astype(np.uint64))
    for gap in (0, 3, 16, 10_000):
        layout = pi.Layout.of(positions, gap)
        buffer = np.concatenate(
            [np.arange(f, f + c) for f, c in zip(layout.firsts, layout.counts, strict=True)]
        )
        assert buffer[layout.index].tolist() == positions.tolist()
        assert sum(layout.counts) == len(buffer)
    empty = pi.Layout.of(arr(), 4)
    assert empty.firsts == [] and empty.counts == [] and len(empty.index) == 0


def test_sorted_unique_matches_np_unique() -> None:
    rng = np.random.default_rng(1)
    for values in (rng.integers(0, 50, 300).astype(np.uint64), arr(7), arr()):
        found = pi.sorted_unique(values)
        unique, inverse = np.unique(values, return_inverse=True)
        assert found.values.tolist() == unique.tolist()
        assert found.inverse.tolist() == inverse.tolist()
        assert values[found.order].tolist() == sorted(values.tolist())
        _, starts = np.unique(values[found.order], return_index=True)
        assert found.starts.tolist() == starts.tolist()


# --- pagemap -----------------------------------------------------------------------------


def test_decode_pagemap() -> None:
    present = 1 << 63
    swapped = (1 << 62) | 0x1234  # swap type/offset in the low bits, not a PFN
    entries = arr(present | 0x42, 0, swapped, present | (1 << 55) | 0x99)  # soft-dirty bit
    assert pi.decode_pagemap(entries).tolist() == [0x42, 0, 0, 0x99]


def test_decode_pagemap_refuses_hidden_pfns() -> None:
    with pytest.raises(PermissionError, match="CAP_SYS_ADMIN"):
        pi.decode_pagemap(arr(1 << 63, 1 << 63))


# --- bitmap words ------------------------------------------------------------------------


def test_word_masks_or_the_bits_of_each_word_once() -> None:
    words, masks = pi.word_masks(arr(130, 5, 64, 0, 5, 63, 129))
    assert words.tolist() == [0, 1, 2]
    assert masks.tolist() == [(1 << 0) | (1 << 5) | (1 << 63), 1 << 0, (1 << 1) | (1 << 2)]
    words, masks = pi.word_masks(arr())
    assert len(words) == len(masks) == 0


def test_bits_of_reads_each_pfns_bit() -> None:
    words = arr(0, 7)
    values = arr(1 << 5, (1 << 63) | 1)
    bits = pi.bits_of(arr(5, 6, 7 * 64, 7 * 64 + 63, 7 * 64 + 1), words, values)
    assert bits.tolist() == [True, False, True, True, False]


# --- heads of compound pages -----------------------------------------------------------


def test_head_candidates_are_the_pfn_rounded_down_to_each_order() -> None:
    assert pi.head_candidates(0b1011) == [0b1010, 0b1000, 0]
    assert pi.head_candidates(1025) == [1024]
    assert pi.head_candidates(1024) == []
    assert len(pi.head_candidates(1023)) == 9  # 1022, 1020, ..., 512


def test_head_of_is_the_nearest_non_tail_when_it_is_a_head() -> None:
    flags = arr(LRU, HEAD | LRU, TAIL, TAIL, TAIL)
    assert pi.head_of(flags, 100) == 101
    assert pi.head_of(arr(TAIL, TAIL), 100) == -1  # the head lies further back
    assert pi.head_of(arr(HEAD, LRU, TAIL), 100) == -1  # a small page before a tail: changing
    assert pi.head_of(arr(), 100) == -1


def synthetic_kpageflags() -> np.ndarray:
    """PFNs 0-2047: a PMD-sized THP at 512, a 16-page folio at 1024, small pages elsewhere."""
    flags = np.full(2048, LRU, dtype=np.uint64)
    flags[512] |= HEAD
    flags[513:1024] |= TAIL
    flags[1024] |= HEAD
    flags[1025:1040] |= TAIL
    return flags


def test_find_head_walks_back_once_then_uses_the_cache(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    fd = entries_file(tmp_path, synthetic_kpageflags())
    log = SyscallLog(monkeypatch)
    cache = pi.HeadCache()
    assert pi.find_head(fd, 700, cache) == 512
    assert log.calls == [("pread", (700 - 512) * 8, 512 * 8)]  # block start up to the tail
    assert pi.find_head(fd, 600, cache) == 512  # inside the known span: no read
    assert len(log.calls) == 1
    assert pi.find_head(fd, 900, cache) == 512  # beyond it: only the entries after it
    assert log.calls[-1] == ("pread", (900 - 701) * 8, 701 * 8)
    assert pi.find_head(fd, 1030, cache) == 1024  # a smaller folio in the next block
    assert pi.find_head(fd, 1039, cache) == 1024
    os.close(fd)


def test_find_head_notices_a_new_folio_beyond_a_known_span(tmp_path: Path) -> None:
    flags = synthetic_kpageflags()
    fd = entries_file(tmp_path, flags)
    cache = pi.HeadCache()
    assert pi.find_head(fd, 600, cache) == 512
    # the huge page was freed; a 64-page folio now starts at 640
    flags[513:1024] = LRU
    flags[640] |= HEAD
    flags[641:704] |= TAIL
    os.pwrite(fd, flags.tobytes(), 0)
    assert pi.find_head(fd, 650, cache) == 640
    os.close(fd)


def test_find_head_gives_up_without_a_head(tmp_path: Path) -> None:
    flags = np.full(1024, TAIL | LRU, dtype=np.uint64)
    fd = entries_file(tmp_path, flags)
    assert pi.find_head(fd, 700, pi.HeadCache()) == -1
    os.close(fd)


# --- file I/O --------------------------------------------------------------------------


def test_read_entries_joins_close_positions_and_fills_past_the_end(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    fd = entries_file(tmp_path, np.arange(100, dtype=np.uint64) * 3)
    log = SyscallLog(monkeypatch)
    got = pi.read_entries(fd, arr(10, 5, 12, 10, 99, 150, 7), max_gap=4, fill=7777)
    assert got.tolist() == [30, 15, 36, 30, 297, 7777, 21]
    # [5, 7, 10, 12] in one read, 99 in another, 150 tried (the file had ended)
    assert [(size // 8, offset // 8) for _, size, offset in log.calls] == [
        (8, 5),
        (1, 99),
        (1, 150),
    ]
    os.close(fd)


def test_reads_and_writes_continue_after_short_transfers(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """sysfs moves at most a page per call: longer transfers must loop."""
    fd = entries_file(tmp_path, np.zeros(2000, dtype=np.uint64))
    SyscallLog(monkeypatch, max_chunk=4096)
    words = np.arange(1500, dtype=np.uint64)
    pi.write_words(fd, words, words + u64(1), max_gap=0)
    assert pi.read_entries(fd, words, max_gap=0, fill=0).tolist() == (words + u64(1)).tolist()
    os.close(fd)


def test_write_words_joins_close_words_with_zeros_between(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    fd = entries_file(tmp_path, np.full(64, 0xFF, dtype=np.uint64))
    log = SyscallLog(monkeypatch)
    pi.write_words(fd, arr(3, 5, 20), arr(1, 2, 4), max_gap=2)
    assert [(size // 8, offset // 8) for _, size, offset in log.calls] == [(3, 3), (1, 20)]
    content = np.frombuffer(Path(tmp_path / "entries").read_bytes(), dtype=np.uint64)
    assert content[3:6].tolist() == [1, 0, 2]  # zero bits: the kernel leaves those pages be
    assert content[20] == 4 and content[2] == 0xFF and content[19] == 0xFF
    os.close(fd)


# --- the access check against a stand-in bitmap -------------------------------------------

CHILD = r"""
buf = mmap.mmap(-1, 16 << 20, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
buf.madvise(mmap.MADV_NOHUGEPAGE)
buf[0 : 8 << 20 : 4096] = b"\1" * 2048  # the first half resident, the rest never touched
print(address(buf), flush=True)
serve()
"""


class Child(ChildProcess):
    def __init__(self) -> None:
        super().__init__(CHILD)
        self.start = int(self.first_line)

    def resident(self, n: int) -> np.ndarray:
        return self.start + np.arange(n, dtype=np.uint64) * u64(5 * PAGE) + u64(123)

    def untouched(self, n: int) -> np.ndarray:
        return self.resident(n) + u64(8 << 20)


@pytest.fixture
def child() -> Iterator[Child]:
    c = Child()
    yield c
    c.reap()


@pytest.fixture
def bitmap(tmp_path: Path) -> Path:
    """A regular file as the idle bitmap: it keeps what is written and reads it back."""
    path = tmp_path / "bitmap"
    path.write_bytes(b"")
    return path


def pfns_of(pid: int, addrs: np.ndarray) -> np.ndarray:
    fd = os.open(f"/proc/{pid}/pagemap", os.O_RDONLY)
    try:
        raw = b"".join(os.pread(fd, 8, int(a) // PAGE * 8) for a in addrs)
    finally:
        os.close(fd)
    return pi.decode_pagemap(np.frombuffer(raw, dtype=np.uint64))


def bitmap_bits(path: Path, pfns: np.ndarray) -> np.ndarray:
    words = np.frombuffer(path.read_bytes(), dtype=np.uint64)
    index = (pfns // u64(64)).astype(np.int64)
    inside = index < len(words)
    bits = np.zeros(len(pfns), dtype=bool)
    bits[inside] = (words[index[inside]] >> (pfns[inside] % u64(64))) & u64(1) == 1
    return bits


def clear_bits(path: Path, pfns: np.ndarray) -> None:
    """What the kernel does to the idle flag of a page that is accessed."""
    words = np.frombuffer(path.read_bytes(), dtype=np.uint64).copy()
    for pfn in pfns.tolist():
        words[pfn // 64] &= ~np.uint64(1 << (pfn % 64))
    path.write_bytes(words.tobytes())


def host_has_lru_pages(pfns: np.ndarray) -> bool:
    fd = os.open(pi.KPAGEFLAGS, os.O_RDONLY)
    try:
        flags = pi.read_entries(fd, pfns, 0, pi.KPF_NOPAGE)
    finally:
        os.close(fd)
    return bool(np.all(flags & u64(LRU)))


def test_prepare_marks_the_sampled_pages_and_check_reads_them_back(
    child: Child, bitmap: Path
) -> None:
    resident, untouched = child.resident(50), child.untouched(50)
    pfns = pfns_of(child.proc.pid, resident)
    assert np.all(pfns) and host_has_lru_pages(pfns)
    addrs = np.concatenate([resident, untouched])
    access = pi.PageIdleAccess(bitmap=str(bitmap))
    try:
        access.prepare(child.target, addrs)
        assert bitmap_bits(bitmap, pfns).all()  # each resident page marked idle
        assert not access.check(child.target, addrs).any()  # nothing cleared: all idle
        clear_bits(bitmap, pfns[:20])  # the kernel saw 20 of them accessed
        accessed = access.check(child.target, addrs)
        assert accessed[:20].all() and not accessed[20:].any()  # never-present ones: never
        with pytest.raises(ValueError, match="without its prepare"):
            access.check(child.target, addrs[:10])
    finally:
        access.close()


def test_physical_addresses_are_their_own_pfns(child: Child, bitmap: Path) -> None:
    pfns = pfns_of(child.proc.pid, child.resident(30))
    physical = pfns * u64(PAGE) + u64(77)
    access = pi.PageIdleAccess(bitmap=str(bitmap))
    try:
        access.prepare(TargetConfig(0, -1), physical)
        assert bitmap_bits(bitmap, pfns).all()
        clear_bits(bitmap, pfns[::2])
        assert access.check(TargetConfig(0, -1), physical).tolist() == [True, False] * 15
    finally:
        access.close()


def test_a_target_that_exits_is_gone(child: Child, bitmap: Path) -> None:
    addrs = child.resident(10)
    access = pi.PageIdleAccess(bitmap=str(bitmap))
    try:
        access.prepare(child.target, addrs)
        child.reap()
        assert_gone(access, child.target, addrs)
    finally:
        access.close()


def test_pagemap_is_reopened_after_the_target_execs(child: Child, bitmap: Path) -> None:
    access = pi.PageIdleAccess(bitmap=str(bitmap))
    try:
        access.prepare(child.target, child.resident(5))  # opens and keeps its pagemap
        child.send("exec")
        maps = Path(f"/proc/{child.proc.pid}/maps").read_text().split("\n")[0]
        text = int(maps.split("-")[0], 16)
        addrs = text + np.arange(4, dtype=np.uint64) * u64(PAGE)  # the new image's text
        access.prepare(child.target, addrs)
        assert bitmap_bits(bitmap, pfns_of(child.proc.pid, addrs)).any()
    finally:
        access.close()


def test_closing_releases_every_fd(bitmap: Path) -> None:
    def fds() -> int:
        return len(os.listdir("/proc/self/fd"))

    before = fds()
    access = pi.PageIdleAccess(bitmap=str(bitmap))
    assert fds() == before + 2
    access.close()
    access.close()
    assert fds() == before


def test_a_root_only_file_says_what_it_needs(monkeypatch: pytest.MonkeyPatch) -> None:
    def denied(path: str, flags: int) -> int:
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(os, "open", denied)
    with pytest.raises(PermissionError, match="needs root"):
        pi.open_kernel_file(pi.BITMAP, os.O_RDWR)


# --- the registry -------------------------------------------------------------------------


@pytest.mark.skipif(os.path.exists(pi.BITMAP), reason="this kernel has page_idle")
def test_this_host_has_no_page_idle() -> None:
    registry = ops.Registry()
    assert registry.why_unavailable("page_idle") == (
        "page_idle: CONFIG_IDLE_PAGE_TRACKING is not set: /sys/kernel/mm/page_idle/bitmap missing"
    )
    assert registry.available_access_checks() == ["clear_refs"]
    assert registry.available_operations() == ["vaddr", "fvaddr"]
    assert registry.resolve_access_check("auto", "vaddr") == "clear_refs"
    assert registry.why_unavailable("paddr").startswith("paddr: needs the page_idle access check")
    with pytest.raises(ops.Unsupported, match="CONFIG_IDLE_PAGE_TRACKING"):
        registry.make_access("page_idle", ops.ProcessTable())


def stand_in_bitmap(path: Path, kpageflags: str = pi.KPAGEFLAGS) -> ops.Registry:
    """The real tables, with page_idle probing and opening path as its bitmap."""
    return registry_with(
        probes={"page_idle": functools.partial(ops.probe_page_idle, str(path), kpageflags)},
        makers={"page_idle": functools.partial(pi.PageIdleAccess, bitmap=str(path))},
    )


def test_page_idle_is_auto_and_brings_paddr_where_the_bitmap_opens(tmp_path: Path) -> None:
    path = tmp_path / "bitmap"
    path.write_bytes(b"")
    registry = stand_in_bitmap(path)
    assert registry.why_unavailable("page_idle") == ""
    assert registry.available_access_checks() == ["page_idle", "clear_refs"]
    assert registry.available_operations() == ["vaddr", "fvaddr", "paddr"]
    assert registry.resolve_access_check("auto", "vaddr") == "page_idle"
    assert registry.resolve_access_check("auto", "paddr") == "page_idle"
    table = ops.ProcessTable()
    access = registry.make_access("page_idle", table)
    assert isinstance(access, pi.PageIdleAccess) and access.processes is table
    access.close()
    table.close()


@pytest.mark.parametrize(
    ("setup", "reason"),
    [
        (lambda p: p.mkdir(), "page_idle: {p}: Is a directory (needs root)"),
        (
            lambda p: p.write_bytes(b""),
            "page_idle: {k} missing (needed to map huge pages to their head pages)",
        ),
    ],
)
def test_page_idle_reasons_when_files_do_not_open(
    tmp_path: Path, setup: Callable[[Path], Any], reason: str
) -> None:
    path, kpageflags = tmp_path / "bitmap", tmp_path / "kpageflags"
    setup(path)
    registry = stand_in_bitmap(path, str(kpageflags))
    assert registry.why_unavailable("page_idle") == reason.format(p=path, k=kpageflags)
    assert "paddr" not in registry.available_operations()


# --- the C sample path against the Python reference ------------------------------------------

C_PATH = pi.NATIVE_PATH
needs_c = pytest.mark.skipif(
    C_PATH is None, reason=f"damond's C module is not built here: {pi.NATIVE_PROBLEM}"
)
PM_SWAPPED = 1 << 62
NPFN = 4 * pi.FOLIO_BLOCK
NVPN = 256


@st.composite
def worlds(draw: st.DrawFn) -> dict[str, Any]:
    """kpageflags with folios of every order (and stray tails), a pagemap with present,
    absent and swapped pages and hidden PFNs, files that end early, sampled addresses,
    gaps, a bitmap. The bulk comes from a drawn seed, the structure from hypothesis."""
    rng = np.random.default_rng(draw(st.integers(0, 2**32)))

    def kpageflags() -> np.ndarray:
        kinds = np.array([0, LRU, LRU, pi.KPF_NOPAGE], dtype=np.uint64)
        flags = kinds[rng.integers(0, len(kinds), NPFN)]
        for order in draw(st.lists(st.integers(1, pi.FOLIO_BLOCK.bit_length() - 1), max_size=6)):
            head = int(rng.integers(0, NPFN >> order)) << order
            flags[head] |= u64(HEAD | LRU)
            flags[head + 1 : head + (1 << order)] = u64(TAIL | LRU)
        stray = rng.integers(0, NPFN, draw(st.integers(0, 8)))
        flags[stray] = u64(TAIL | LRU)  # tails whose folio is changing under the read
        return flags[: draw(st.integers(NPFN // 2, NPFN))]

    pagemap = rng.integers(1, NPFN + 64, NVPN, dtype=np.uint64)
    start = int(rng.integers(0, NVPN))  # a stretch mapped in order, as a huge page is
    pagemap[start:] = (int(rng.integers(1, NPFN)) + np.arange(NVPN - start)).astype(np.uint64)
    pagemap |= u64(pi.PM_PRESENT)
    pagemap[rng.random(NVPN) < draw(st.sampled_from([0.0, 0.3]))] = 0
    pagemap[rng.random(NVPN) < draw(st.sampled_from([0.0, 0.1]))] = u64(PM_SWAPPED | 5)
    if draw(st.booleans()):
        pagemap[rng.integers(0, NVPN)] = u64(pi.PM_PRESENT)  # PFN 0: no CAP_SYS_ADMIN
    physical = draw(st.booleans())

    def addrs() -> np.ndarray:
        n = draw(st.integers(0, 80))
        pages = rng.integers(0, (NPFN + 64) if physical else NVPN + 32, n, dtype=np.uint64)
        found = pages * u64(PAGE) + rng.integers(0, PAGE, n, dtype=np.uint64)
        if draw(st.booleans()):
            found.sort()
        return found

    bitmap = rng.integers(0, 2**64, draw(st.integers(0, NPFN // 64 + 2)), dtype=np.uint64)
    return {
        "kpageflags": [kpageflags(), kpageflags()],  # folios change between the samples
        "pagemap": pagemap[: draw(st.integers(0, NVPN))],
        "physical": physical,
        "addrs": [addrs(), addrs()],
        "gaps": [draw(st.integers(0, 20)) for _ in range(4)],
        "bitmap": bitmap,
    }


def run_path(path: pi.SamplePath, world: dict[str, Any], tmp: Path) -> list[Any]:
    """Two samples on one tail cache: heads, answers, what reached the bitmap, the cache."""
    tmp.mkdir()
    kpageflags = entries_file(tmp, world["kpageflags"][0], "kpageflags")
    pagemap = entries_file(tmp, world["pagemap"], "pagemap")
    bitmap = entries_file(tmp, world["bitmap"], "bitmap")
    pagemap_gap, kpageflags_gap, write_gap, read_gap = world["gaps"]
    tails: dict[int, int] = {}
    seen: list[Any] = []
    try:
        for addrs, flags in zip(world["addrs"], world["kpageflags"], strict=True):
            os.ftruncate(kpageflags, 0)
            os.pwrite(kpageflags, flags.tobytes(), 0)
            heads = np.zeros(len(addrs), dtype=np.uint64)
            read = path.prepare(
                addrs,
                heads,
                -1 if world["physical"] else pagemap,
                kpageflags,
                bitmap,
                tails,
                pagemap_gap,
                kpageflags_gap,
                write_gap,
            )
            written = (tmp / "bitmap").read_bytes()
            accessed = np.ones(len(addrs), dtype=bool)
            path.check(heads, accessed, bitmap, read_gap)
            seen.append((read, heads.tolist(), written, accessed.tolist(), dict(tails)))
    finally:
        for fd in (kpageflags, pagemap, bitmap):
            os.close(fd)
    return seen


@needs_c
@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(world=worlds())
def test_the_c_path_does_what_the_python_path_does(world: dict[str, Any]) -> None:
    """Same heads, same return, the same bytes in the bitmap, the same answers, the same
    learned tails: on synthetic files, where every case (THP tails, pages off the LRU,
    absent and swapped pages, files ending early, hidden PFNs) can be made."""
    with tempfile.TemporaryDirectory() as tmp:
        python = run_path(pi.PYTHON_PATH, world, Path(tmp) / "python")
        c = run_path(C_PATH, world, Path(tmp) / "c")  # type: ignore[arg-type]
    assert c == python


@needs_c
def test_the_c_path_notices_a_new_folio_right_after_a_known_span(tmp_path: Path) -> None:
    """The case random worlds rarely make: a tail learned at 639 of the THP at 512, then
    that THP freed and a 64-page folio at 640, sampled at 650 (its head is 640, not 512)."""
    before = synthetic_kpageflags()
    after = before.copy()
    after[513:1024] = LRU
    after[640] |= HEAD
    after[641:704] |= TAIL
    world = {
        "kpageflags": [before, after],
        "pagemap": arr(639 | pi.PM_PRESENT, 650 | pi.PM_PRESENT),
        "physical": False,
        "addrs": [arr(0), arr(PAGE)],
        "gaps": [0, 0, 0, 0],
        "bitmap": np.zeros(32, dtype=np.uint64),
    }
    python = run_path(pi.PYTHON_PATH, world, tmp_path / "python")
    assert [heads for _, heads, *_ in python] == [[512], [640]]
    assert run_path(C_PATH, world, tmp_path / "c") == python  # type: ignore[arg-type]


@needs_c
def test_the_c_path_raises_what_the_kernel_said(tmp_path: Path) -> None:
    assert C_PATH is not None
    heads = np.zeros(1, dtype=np.uint64)
    with pytest.raises(OSError) as raised:
        C_PATH.prepare(arr(PAGE), heads, 987654, 987654, 987654, {}, 0, 0, 0)
    assert raised.value.errno == errno.EBADF
    with pytest.raises(ValueError, match="equal multiples of 8"):
        C_PATH.prepare(arr(PAGE, PAGE), heads, -1, 0, 0, {}, 0, 0, 0)


@pytest.mark.parametrize("native", [True, False], ids=["c", "python"])
def test_each_path_serves_the_access_check(native: bool, child: Child, bitmap: Path) -> None:
    if native and C_PATH is None:
        pytest.skip(f"damond's C module is not built here: {pi.NATIVE_PROBLEM}")
    resident = child.resident(40)
    pfns = pfns_of(child.proc.pid, resident)
    access = pi.PageIdleAccess(bitmap=str(bitmap), native=native)
    try:
        assert access.path.name == ("c" if native else "python")
        access.prepare(child.target, resident)
        assert bitmap_bits(bitmap, pfns).all()
        clear_bits(bitmap, pfns[::4])
        assert access.check(child.target, resident).tolist() == [True, False, False, False] * 10
    finally:
        access.close()


def test_without_the_c_module_the_python_path_runs_and_says_so() -> None:
    script = (
        "import logging, sys\n"
        "logging.basicConfig(format='%(levelname)s %(message)s')\n"
        "sys.modules['damond.monitor.ops._page_idle'] = None  # as if never built\n"
        "from damond.monitor.ops import page_idle as pi\n"
        "print(pi.sample_path(None).name)\n"
        "print(pi.sample_path(None).name)\n"
        "try:\n"
        "    pi.sample_path(True)\n"
        "except RuntimeError as e:\n"
        "    print('refused:', e)\n"
    )
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines()[:2] == ["python", "python"]
    assert "refused: page_idle: the C module is not built" in done.stdout
    warnings = [line for line in done.stderr.splitlines() if line.startswith("WARNING")]
    assert len(warnings) == 1 and "sampling in Python instead" in warnings[0], done.stderr


# --- the engine's fast path: a whole sample of a target in C ----------------------------------


def sampled_regions(start: int) -> Regions:
    """64 regions of 1 to 40 pages, half over the child's resident 8 MiB, half over the
    untouched 8 MiB after it."""
    rng = np.random.default_rng(11)
    starts = start + np.arange(64, dtype=np.uint64) * u64(64 * PAGE)
    ends = starts + rng.integers(1, 41, 64).astype(np.uint64) * u64(PAGE)
    return Regions.build(starts, ends)


def marked_by(sampler: Any) -> tuple[list[int], list[int]]:
    """The addresses a sampler picked and the heads it marked, in its last prepare."""
    addrs, heads = sampler.marked()
    return np.frombuffer(addrs, np.uint64).tolist(), np.frombuffer(heads, np.uint64).tolist()


@needs_c
def test_the_sampler_picks_and_counts_as_the_reference(child: Child, tmp_path: Path) -> None:
    """From the same uniforms: the pages pick_sampling_addrs picks, the heads and bitmap
    words prepare() marks, and per region the answers check() gives, added up."""
    regions = sampled_regions(child.start)
    n = len(regions)
    uniforms = np.random.default_rng(7).random(3 * n + 5)
    bitmaps = tmp_path / "python", tmp_path / "c"
    for path in bitmaps:
        path.write_bytes(b"")
    python = pi.PageIdleAccess(bitmap=str(bitmaps[0]), native=False)
    native = pi.PageIdleAccess(bitmap=str(bitmaps[1]), native=True)
    sampler = native.sampler(child.target)
    assert sampler is not None and python.sampler(child.target) is None
    counts, expected = np.zeros(n, np.uint32), np.zeros(n, np.uint32)
    try:
        for offset in (0, n + 5, 2 * n + 5):
            addrs = regions.pick_sampling_addrs(uniforms[offset : offset + n])
            python.prepare(child.target, addrs)
            sampler.prepare(regions.starts, regions.ends, uniforms, offset)
            heads = python.marked(child.target)
            assert marked_by(sampler) == (addrs.tolist(), heads.tolist())
            assert bitmaps[0].read_bytes() == bitmaps[1].read_bytes()
            known = heads[heads != u64(pi.NO_HEAD)]
            assert 0 < len(known) < n  # the resident half is trackable, the rest is not
            for path in bitmaps:
                clear_bits(path, known[offset % 3 :: 3])  # the kernel saw these accessed
            expected += python.check(child.target, addrs)
            sampler.check(counts)
            assert counts.tolist() == expected.tolist()
        assert 0 < expected.sum() < 3 * n
    finally:
        sampler.close()
        python.close()
        native.close()


@needs_c
def test_the_sampler_picks_inside_enormous_regions_too(tmp_path: Path) -> None:
    """Where a float product can round up to the page count, both stay inside the region
    (physical addresses far beyond memory: nothing to mark, only the picking counts)."""
    bitmap = tmp_path / "bitmap"
    bitmap.write_bytes(b"")
    starts = arr(1 << 40, 1 << 44, 1 << 46, (1 << 62) + PAGE)
    ends = starts + arr(PAGE, 3 * PAGE, (1 << 45) + PAGE, 1 << 61)
    regions = Regions.build(starts, ends)
    access = pi.PageIdleAccess(bitmap=str(bitmap), native=True)
    sampler = access.sampler(TargetConfig(0, -1))
    assert sampler is not None
    try:
        for u in (0.0, 0.5, np.nextafter(1.0, 0.0)):
            uniforms = np.full(len(regions), u)
            sampler.prepare(regions.starts, regions.ends, uniforms, 0)
            picked, heads = marked_by(sampler)
            assert picked == regions.pick_sampling_addrs(uniforms).tolist()
            assert all(s <= a < e for s, a, e in zip(starts, picked, ends, strict=True))
            assert heads == [pi.NO_HEAD] * len(regions)
            counts = np.zeros(len(regions), np.uint32)
            sampler.check(counts)
            assert not counts.any()
    finally:
        sampler.close()
        access.close()


@needs_c
@pytest.mark.parametrize("how", ["zombie", "reaped"])
def test_a_sampled_target_that_exits_is_gone(child: Child, bitmap: Path, how: str) -> None:
    regions = sampled_regions(child.start)
    uniforms = np.zeros(len(regions))
    access = pi.PageIdleAccess(bitmap=str(bitmap), native=True)
    sampler = access.sampler(child.target)
    assert sampler is not None
    try:
        sampler.prepare(regions.starts, regions.ends, uniforms, 0)
        child.exit_unreaped() if how == "zombie" else child.reap()
        with pytest.raises(ops.TargetGone):
            sampler.check(np.zeros(len(regions), np.uint32))
        with pytest.raises(ops.TargetGone):
            sampler.prepare(regions.starts, regions.ends, uniforms, 0)
    finally:
        sampler.close()
        access.close()


@needs_c
def test_the_sampler_reopens_the_pagemap_after_the_target_execs(child: Child, bitmap: Path) -> None:
    access = pi.PageIdleAccess(bitmap=str(bitmap), native=True)
    sampler = access.sampler(child.target)
    assert sampler is not None
    try:
        child.send("exec")
        maps = Path(f"/proc/{child.proc.pid}/maps").read_text().split("\n")[0]
        text = int(maps.split("-")[0], 16)
        starts = text + np.arange(4, dtype=np.uint64) * u64(PAGE)  # the new image's text
        sampler.prepare(starts, starts + u64(PAGE), np.zeros(4), 0)
        assert bitmap_bits(bitmap, pfns_of(child.proc.pid, starts)).any()
    finally:
        sampler.close()
        access.close()


@needs_c
def test_the_sampler_refuses_what_does_not_fit(child: Child, bitmap: Path) -> None:
    regions = sampled_regions(child.start)
    n = len(regions)
    access = pi.PageIdleAccess(bitmap=str(bitmap), native=True)
    sampler = access.sampler(child.target)
    assert sampler is not None
    try:
        with pytest.raises(RuntimeError, match="without a prepare"):
            sampler.check(np.zeros(n, np.uint32))
        with pytest.raises(ValueError, match="uniforms 2 to 66 of 65"):
            sampler.prepare(regions.starts, regions.ends, np.zeros(n + 1), 2)
        with pytest.raises(TypeError, match="starts: want a contiguous array"):
            sampler.prepare(regions.starts.astype(np.int32), regions.ends, np.zeros(n), 0)
        sampler.prepare(regions.starts, regions.ends, np.zeros(n), 0)
        with pytest.raises(TypeError, match="nr_accesses"):
            sampler.check(np.zeros(n, np.uint64))
        with pytest.raises(ValueError, match="3 regions, 64 prepared"):
            sampler.check(np.zeros(3, np.uint32))
        sampler.close()
        with pytest.raises(ValueError, match="closed"):
            sampler.prepare(regions.starts, regions.ends, np.zeros(n), 0)
    finally:
        sampler.close()
        access.close()
