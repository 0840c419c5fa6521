"""The ops layer against real processes of this host: maps, smaps, clear_refs, pidfds, iomem.

Children are Python processes with known mmap'd buffers; they report their
addresses and acknowledge each command over pipes, so nothing here sleeps.
"""

from __future__ import annotations

import ctypes
import errno
import functools
import gc
import mmap
import os
import resource
import threading
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from ops_helpers import ChildProcess, assert_gone, registry_with  # tests/ops_helpers.py

from damond.monitor import ops
from damond.monitor.config import PAGE_SIZE, TargetConfig
from damond.monitor.ops import TargetGone, Unsupported
from damond.monitor.ops.attribution import MappingCredit
from damond.monitor.ops.clear_refs import ClearRefsAccess, mapping_answers, parse_smaps
from damond.monitor.ops.common import aligned_ranges, mapping_index
from damond.monitor.ops.paddr import PaddrSpace, parse_iomem, system_ram
from damond.monitor.ops.process import ProcessTable, TargetProcess
from damond.monitor.ops.vaddr import (
    FvaddrSpace,
    VaddrSpace,
    mappings,
    parse_maps,
    process_mappings,
    three_regions,
)

MiB = 1 << 20

CHILD = r"""
MiB = 1 << 20
# Anonymous mmap objects are MAP_SHARED: each is its own shmem object, so the
# kernel never merges them with a neighbour into one mapping.
hot = mmap.mmap(-1, 64 * MiB)
cold = mmap.mmap(-1, 8 * MiB)
hot.write(b"\1" * len(hot))
cold.write(b"\1" * len(cold))  # resident and referenced before any clear
print(address(hot), len(hot), address(cold), len(cold), flush=True)

def touch(n):  # write one byte per page of hot[0:n]
    n = int(n)
    hot[0:n:4096] = b"\2" * len(range(0, n, 4096))

serve(touch=touch)
"""


class Child(ChildProcess):
    """A target process with a 64 MiB `hot` and an 8 MiB `cold` buffer."""

    def __init__(self) -> None:
        super().__init__(CHILD)
        hot, hot_len, cold, cold_len = map(int, self.first_line.split())
        self.hot = (hot, hot + hot_len)
        self.cold = (cold, cold + cold_len)


@pytest.fixture
def child() -> Iterator[Child]:
    c = Child()
    yield c
    c.reap()


def addrs_in(span: tuple[int, int], n: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(span[0], span[1], n, dtype=np.uint64)


# --- maps and the three regions ------------------------------------------------------

SYNTHETIC_MAPS = b"""\
00400000-00401000 r--p 00000000 fe:00 1 /usr/bin/prog
00401000-00402000 r-xp 00001000 fe:00 1 /usr/bin/prog
00600000-00601000 rw-p 00002000 fe:00 1 /usr/bin/prog
01000000-01100000 rw-p 00000000 00:00 0 [heap]
7f0000000000-7f0000100000 r--p 00000000 fe:00 2 /usr/lib/libc.so.6
7f0000200000-7f0000300000 rw-p 00000000 00:00 0
7ffd00000000-7ffd00021000 rw-p 00000000 00:00 0 [stack]
ffffffffff600000-ffffffffff601000 --xp 00000000 00:00 0 [vsyscall]
"""


def test_parse_maps_reads_addresses_and_drops_the_gate_page() -> None:
    parsed = parse_maps(SYNTHETIC_MAPS)
    assert parsed.dtype == np.uint64
    assert parsed.tolist() == [
        [0x400000, 0x401000],
        [0x401000, 0x402000],
        [0x600000, 0x601000],
        [0x1000000, 0x1100000],
        [0x7F0000000000, 0x7F0000100000],
        [0x7F0000200000, 0x7F0000300000],
        [0x7FFD00000000, 0x7FFD00021000],
    ]


def test_three_regions_cut_the_two_biggest_gaps() -> None:
    # The heap-mmap and mmap-stack gaps; not the stack-[vsyscall] gap, which the
    # kernel never sees, and not the small gaps among the low mappings.
    assert three_regions(parse_maps(SYNTHETIC_MAPS)) == [
        (0x400000, 0x1100000),
        (0x7F0000000000, 0x7F0000300000),
        (0x7FFD00000000, 0x7FFD00021000),
    ]


def test_three_regions_ties_go_to_the_lower_gap_like_the_kernel() -> None:
    p = PAGE_SIZE
    maps = np.array([[0, p], [6 * p, 7 * p], [10 * p, 11 * p], [16 * p, 17 * p]], np.uint64)
    # gaps: 5, 3, 5 pages -> the first and the third
    assert three_regions(maps) == [(0, p), (6 * p, 11 * p), (16 * p, 17 * p)]
    maps = np.array([[0, p], [4 * p, 5 * p], [10 * p, 11 * p], [16 * p, 17 * p]], np.uint64)
    # gaps: 3, 5, 5 -> the second and the third
    assert three_regions(maps) == [(0, 5 * p), (10 * p, 11 * p), (16 * p, 17 * p)]
    # enough ties for numpy's default (unstable) sort to reorder them
    gaps = [3, 2, 2, 1, 1, 1, 1, 1, 1, 3, 2, 3, 2, 2, 3, 3, 2, 2, 2, 3]
    starts = np.cumsum([0] + [g + 1 for g in gaps]) * p
    maps = np.stack([starts, starts + p], axis=1).astype(np.uint64)
    ranges = three_regions(maps)
    assert [r[0] for r in ranges] == [0, int(starts[1]), int(starts[10])]


def test_three_regions_with_fewer_than_two_gaps() -> None:
    p = PAGE_SIZE
    one = np.array([[p, 3 * p]], np.uint64)
    assert three_regions(one) == [(p, 3 * p)]
    adjacent = np.array([[p, 3 * p], [3 * p, 4 * p]], np.uint64)
    assert three_regions(adjacent) == [(p, 4 * p)]
    two = np.array([[p, 3 * p], [8 * p, 9 * p]], np.uint64)
    assert three_regions(two) == [(p, 3 * p), (8 * p, 9 * p)]
    with pytest.raises(ValueError):
        three_regions(np.empty((0, 2), np.uint64))


def test_three_regions_of_a_real_process(child: Child) -> None:
    found = mappings(child.pid)
    ranges = three_regions(found)
    assert len(ranges) == 3
    flat = [a for r in ranges for a in r]
    assert flat == sorted(flat) and all(a % PAGE_SIZE == 0 for a in flat)
    assert flat[0] == found[0, 0] and flat[-1] == found[-1, 1]
    # every mapping lies inside one range
    for start, end in found.tolist():
        assert any(s <= start and end <= e for s, e in ranges)
    # the two cut gaps are at least as big as every gap left inside the ranges
    cut = min(ranges[1][0] - ranges[0][1], ranges[2][0] - ranges[1][1])
    gaps = sorted((found[1:, 0] - found[:-1, 1]).tolist())
    assert len(gaps) >= 3 and gaps[-3] <= cut
    assert any(s <= child.hot[0] and child.hot[1] <= e for s, e in ranges)


def test_mappings_match_the_childs_buffers(child: Child) -> None:
    found = mappings(child.pid).tolist()
    assert list(child.hot) in found and list(child.cold) in found
    maps_lines = Path(f"/proc/{child.pid}/maps").read_text().splitlines()
    assert len(found) == len([x for x in maps_lines if not x.endswith("[vsyscall]")])


def test_mapping_index() -> None:
    maps = np.array([[0x1000, 0x3000], [0x5000, 0x6000]], np.uint64)
    addrs = np.array([0x0, 0x1000, 0x2FFF, 0x3000, 0x5800, 0x6000, 0x9000], np.uint64)
    assert mapping_index(maps, addrs).tolist() == [-1, 0, 0, -1, 1, -1, -1]
    assert mapping_index(np.empty((0, 2), np.uint64), addrs).tolist() == [-1] * 7


def test_vaddr_ranges_and_update(child: Child) -> None:
    space = VaddrSpace()
    try:
        initial = space.initial_ranges(child.target)
        assert initial == three_regions(mappings(child.pid))
        assert space.update_ranges(child.target) == initial
        given = TargetConfig(0, child.pid, regions=((0x10001, 0x20000),))
        assert space.initial_ranges(given) == [(0x10000, 0x20000)]
        # like damon_va_update, the update goes back to the three regions
        assert space.update_ranges(given) == initial
    finally:
        space.close()


def test_vaddr_follows_an_exec(child: Child) -> None:
    """The cached maps fd pins the old mm; after execve it reads empty and must be reopened."""
    space = VaddrSpace()
    try:
        proc = space.processes.get(child.pid)
        assert list(child.hot) in process_mappings(proc).tolist()
        child.send("exec")
        after = process_mappings(proc).tolist()
        assert list(child.hot) not in after and len(after) > 3
        assert len(space.update_ranges(child.target) or []) == 3
    finally:
        space.close()


def test_vaddr_raises_target_gone_for_zombies_and_reaped(child: Child) -> None:
    space = VaddrSpace()
    try:
        space.initial_ranges(child.target)
        child.exit_unreaped()
        with pytest.raises(TargetGone):
            space.update_ranges(child.target)
        child.reap()
        with pytest.raises(TargetGone):
            space.update_ranges(child.target)
        with pytest.raises(TargetGone):
            VaddrSpace().initial_ranges(child.target)
        with pytest.raises(TargetGone):
            mappings(child.pid)
    finally:
        space.close()


def test_kernel_thread_has_no_address_space() -> None:
    with pytest.raises(TargetGone, match="no user address space"):
        mappings(2)  # kthreadd


def test_fvaddr_uses_the_users_regions(child: Child) -> None:
    space = FvaddrSpace()
    target = TargetConfig(0, child.pid, regions=((0x5000, 0x8001), (0x1234, 0x4000)))
    try:
        assert space.initial_ranges(target) == [(0x1000, 0x4000), (0x5000, 0x9000)]
        assert space.update_ranges(target) is None
        child.reap()
        with pytest.raises(TargetGone):
            space.update_ranges(target)
    finally:
        space.close()


def test_aligned_ranges_merge_what_alignment_overlaps() -> None:
    assert aligned_ranges([(0x800, 0x1100), (0x10, 0x20)]) == [(0, 0x2000)]
    assert aligned_ranges([(0x1800, 0x1900), (0x10, 0x20)]) == [(0, 0x1000), (0x1000, 0x2000)]
    with pytest.raises(ValueError):
        aligned_ranges([(0x2000, 0x2000)])


# --- TargetProcess -----------------------------------------------------------------


def test_target_process_alive_flips_on_exit(child: Child) -> None:
    """alive() polls the pidfd, so it flips at exit (zombie included) and stays False.

    Why pid reuse cannot fool it: the pidfd names the struct pid, not the
    number, and every proc file is opened relative to a /proc/PID directory fd
    taken while the pidfd still said alive (see TargetProcess). After reaping,
    a new process with the same number has a different struct pid: our pidfd
    stays "exited", and opens through our directory fail with ESRCH (checked
    below) instead of reaching the newcomer.
    """
    proc = TargetProcess(child.pid)
    try:
        assert proc.alive()
        assert proc.read("maps")
        child.exit_unreaped()
        assert not proc.alive()  # a zombie counts as gone
        with pytest.raises(TargetGone):
            proc.read("maps")
        child.reap()
        assert not proc.alive()
        with pytest.raises(TargetGone):
            proc.read("smaps")  # a fresh open through the pinned directory: ESRCH
    finally:
        proc.close()
    proc.close()  # idempotent


def test_target_process_refuses_missing_pids(child: Child) -> None:
    pid = child.pid
    child.reap()
    with pytest.raises(TargetGone):
        TargetProcess(pid)
    with pytest.raises(TargetGone):
        TargetProcess(0)


def test_target_process_accepts_a_thread_id() -> None:
    """The kernel's sysfs takes any task's pid; pidfd_open needs PIDFD_THREAD for those."""
    started, release = threading.Event(), threading.Event()
    tids: list[int] = []

    def thread() -> None:
        tids.append(threading.get_native_id())
        started.set()
        release.wait()

    worker = threading.Thread(target=thread, daemon=True)
    worker.start()
    started.wait()
    try:
        proc = TargetProcess(tids[0])
        assert proc.alive() and len(process_mappings(proc)) > 3
    finally:
        release.set()
        worker.join()
    assert not proc.alive()
    proc.close()


def test_a_failed_pin_closes_its_pidfd_exactly_once() -> None:
    """pidfd_open succeeds, opening /proc/PID then fails (here EMFILE: pidfd_open took
    the last free fd): the pidfd is closed, and its number forgotten. Were it
    remembered, __del__ would close that number again, and by then it can be
    another fd (in the daemon, another kdamond's pidfd or /proc directory): the
    interleaving of that race, made deterministic by opening the fd ourselves."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    highest = max(int(fd) for fd in os.listdir("/proc/self/fd"))
    resource.setrlimit(resource.RLIMIT_NOFILE, (highest + 16, hard))
    fillers: list[int] = []
    failure: Exception | None = None
    try:
        with pytest.raises(OSError) as full:
            while True:
                fillers.append(os.open("/dev/null", os.O_RDONLY))
        assert full.value.errno == errno.EMFILE
        del full
        last_free = fillers.pop()
        os.close(last_free)  # exactly one free fd: pidfd_open gets it
        try:
            TargetProcess(os.getpid())
        except (OSError, TargetGone) as e:
            failure = e  # keeps the half-made TargetProcess alive, as a traceback would
        reused = os.open("/dev/null", os.O_RDONLY)  # gets the pidfd's old number
        fillers.append(reused)
        assert reused == last_free
        said = repr(failure)
        failure = None
        gc.collect()  # the half-made TargetProcess goes, its __del__ runs
        os.fstat(reused)  # still ours: nobody closed it behind our back
        # and a full fd table is not a gone process: the error says what happened
        assert "Too many open files" in said and "TargetGone" not in said, said
    finally:
        for fd in fillers:
            os.close(fd)
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


def test_process_table_never_readopts_a_gone_pid(child: Child) -> None:
    """Once gone, a pid stays gone in the table, whoever gets the number next."""
    table = ProcessTable()
    try:
        first = table.live(child.pid)
        child.reap()
        assert table.get(child.pid) is first
        with pytest.raises(TargetGone):
            table.live(child.pid)
    finally:
        table.close()


# --- clear_refs ---------------------------------------------------------------------


def test_clear_refs_sees_touched_and_untouched_mappings(child: Child) -> None:
    access = ClearRefsAccess(seed=1)
    hot, cold = addrs_in(child.hot, 2000), addrs_in(child.cold, 2000, seed=2)
    try:
        # nothing touched since the clear: both mappings read as idle
        access.prepare(child.target, hot)
        assert not access.check(child.target, hot).any()
        assert not access.check(child.target, cold).any()

        access.prepare(child.target, hot)
        child.send(f"touch {64 * MiB}")
        assert access.check(child.target, hot).mean() > 0.99
        assert not access.check(child.target, cold).any()

        # per mapping, not per page: with half of hot touched each sample, every sampled
        # page of hot answers alike, accessed in half the samples (never by chance: a
        # coin flip per page would split each sample's answers)
        answers = []
        both = np.concatenate([hot, cold])  # one check per sample, as the engine makes
        for _ in range(8):
            access.prepare(child.target, both)
            child.send(f"touch {32 * MiB}")
            found = access.check(child.target, both)
            answers.append(found[: len(hot)])
            assert not found[len(hot) :].any()
        assert all(a.all() or not a.any() for a in answers)
        assert 3 <= sum(bool(a[0]) for a in answers) <= 5, [bool(a[0]) for a in answers]
        unmapped = np.array([0, PAGE_SIZE, 1 << 62], np.uint64)
        assert not access.check(child.target, unmapped).any()
    finally:
        access.close()


MACHINE_DAMON_SLACK = 16 * 4096
"""Pages a kdamond of the machine may have found unreferenced between a touch and a
read (seen: one page of the 4096 touched, in 3 of 25 runs on the development host)."""


def test_smaps_referenced_counts_only_the_touched_pages(child: Child) -> None:
    access = ClearRefsAccess()
    try:
        access.prepare(child.target, np.empty(0, np.uint64))
        child.send(f"touch {16 * MiB}")
        found, referenced = parse_smaps(access.processes.get(child.pid).read("smaps"))
        rows = found.tolist()
        # every touched page, and nothing else: Referenced never exceeds what was
        # touched. A few pages may read unreferenced: the machine's own kdamond (its
        # paddr pageout scheme) clears accessed bits of pages it looks at, ours too.
        hot = int(referenced[rows.index(list(child.hot))])
        assert 16 * MiB - MACHINE_DAMON_SLACK <= hot <= 16 * MiB, hot
        assert referenced[rows.index(list(child.cold))] == 0
        user = found[found[:, 0] < 1 << 63]
        assert np.array_equal(user, mappings(child.pid))
    finally:
        access.close()


def test_clear_refs_target_gone(child: Child) -> None:
    access = ClearRefsAccess()
    addrs = addrs_in(child.hot, 10)
    try:
        access.prepare(child.target, addrs)
        child.exit_unreaped()
        assert_gone(access, child.target, addrs)
        child.reap()
        with pytest.raises(TargetGone):
            access.check(child.target, addrs)
        with pytest.raises(TargetGone):
            ClearRefsAccess().prepare(child.target, addrs)
    finally:
        access.close()


def test_clear_refs_permission_error_names_the_file(
    child: Child, monkeypatch: pytest.MonkeyPatch
) -> None:
    def denied(fd: int, data: bytes) -> int:
        raise PermissionError(errno.EACCES, "Permission denied")

    access = ClearRefsAccess()
    try:
        monkeypatch.setattr("damond.monitor.ops.process.os.write", denied)
        with pytest.raises(PermissionError) as info:
            access.prepare(child.target, addrs_in(child.hot, 1))
        assert info.value.filename == f"/proc/{child.pid}/clear_refs"
    finally:
        access.close()


P = PAGE_SIZE


def test_mapping_credit_counts_each_mappings_fraction_in_whole_samples() -> None:
    maps = np.array([[0, 100 * P], [200 * P, 300 * P], [400 * P, 500 * P]], np.uint64)
    credit = MappingCredit()
    fired = [credit.fire(maps, np.array([0.25, 1.0, 0.0])) for _ in range(8)]
    assert np.sum(fired, axis=0).tolist() == [2, 8, 0]
    addrs = np.concatenate([addrs_in((0, 100 * P), 50), addrs_in((100 * P, 200 * P), 5)])
    answers = mapping_answers(maps, fired[3], addrs)
    assert answers[:50].all() == bool(fired[3][0]) and answers[:50].all() == answers[:50].any()
    assert not answers[50:].any()  # between mappings: never


def test_mapping_credit_follows_mappings_by_start() -> None:
    credit = MappingCredit()
    one = np.array([[10 * P, 20 * P]], np.uint64)
    assert not credit.fire(one, np.array([0.4])).any()  # 0.5 + 0.4
    grown = np.array([[0, 5 * P], [10 * P, 30 * P]], np.uint64)  # a new one before; grown
    assert credit.fire(grown, np.array([0.0, 0.2])).tolist() == [False, True]  # 0.9 + 0.2
    # unsampled mappings keep their credit; a new start is a new mapping
    assert credit.fire(grown, np.array([0.9, 0.9]), np.array([False, True])).tolist() == [
        False,
        True,
    ]
    moved = np.array([[P, 5 * P]], np.uint64)
    assert not credit.fire(moved, np.array([0.4])).any()  # starts again at 0.5


# --- paddr --------------------------------------------------------------------------

SAMPLE_IOMEM = """\
00000000-00000fff : Reserved
00001000-0009fbff : System RAM
0009fc00-000fffff : Reserved
  000f0000-000fffff : System ROM
00100000-bfffffff : System RAM
  01000000-022090c7 : Kernel code
  03b34000-03c57fff : Kernel bss
c0001000-eebfffff : PCI Bus 0000:00
  c1000000-c1000fff : System RAM
100000000-63fffffff : System RAM
4000000000-7fffffffff : PCI Bus 0000:00
"""


def test_parse_iomem_takes_top_level_system_ram_aligned_inward() -> None:
    assert parse_iomem(SAMPLE_IOMEM) == [
        (0x1000, 0x9F000),  # 0x9fbff is mid-page: the partial page is dropped
        (0x100000, 0xC0000000),
        (0x100000000, 0x640000000),
    ]


def test_iomem_with_hidden_addresses_is_a_permission_error(tmp_path: Path) -> None:
    hidden = tmp_path / "iomem"
    hidden.write_text("00000000-00000000 : Reserved\n00000000-00000000 : System RAM\n")
    with pytest.raises(PermissionError, match="CAP_SYS_ADMIN"):
        system_ram(str(hidden))


def test_real_iomem_covers_memtotal() -> None:
    ranges = system_ram()
    total = sum(end - start for start, end in ranges)
    meminfo = Path("/proc/meminfo").read_text().split()
    memtotal = int(meminfo[meminfo.index("MemTotal:") + 1]) * 1024
    assert memtotal <= total < 2 * memtotal
    assert all(s % PAGE_SIZE == 0 and e % PAGE_SIZE == 0 for s, e in ranges)
    assert ranges == sorted(ranges)


def test_paddr_space() -> None:
    space = PaddrSpace()
    physical = TargetConfig(0)
    assert space.initial_ranges(physical) == system_ram()
    assert space.update_ranges(physical) is None
    given = TargetConfig(0, regions=((0x100000, 0x200800),))
    assert space.initial_ranges(given) == [(0x100000, 0x201000)]


# --- the registry -------------------------------------------------------------------


def test_this_host() -> None:
    registry = ops.Registry()
    assert "clear_refs" in registry.available_access_checks()
    assert {"vaddr", "fvaddr"} <= set(registry.available_operations())
    assert registry.why_unavailable("vaddr") == ""
    assert registry.resolve_access_check("clear_refs", "fvaddr") == "clear_refs"
    if not os.path.exists(ops.PAGE_IDLE_BITMAP):
        assert "page_idle" not in registry.available_access_checks()
        assert "paddr" not in registry.available_operations()
        assert "CONFIG_IDLE_PAGE_TRACKING" in registry.why_unavailable("page_idle")
        assert registry.resolve_access_check("auto", "vaddr") == "clear_refs"


def test_missing_files_give_exact_reasons(tmp_path: Path) -> None:
    registry = registry_with(
        probes={
            "page_idle": functools.partial(ops.probe_page_idle, str(tmp_path / "bitmap")),
            "clear_refs": functools.partial(ops.probe_clear_refs, str(tmp_path / "clear_refs")),
        }
    )
    assert registry.available_access_checks() == []
    assert registry.available_operations() == []
    assert registry.why_unavailable("page_idle") == (
        f"page_idle: CONFIG_IDLE_PAGE_TRACKING is not set: {tmp_path}/bitmap missing"
    )
    assert "CONFIG_PROC_PAGE_MONITOR" in registry.why_unavailable("clear_refs")
    paddr = registry.why_unavailable("paddr")
    assert paddr.startswith("paddr: needs the page_idle access check (page_idle: CONFIG_IDLE")
    vaddr = registry.why_unavailable("vaddr")
    assert "page_idle:" in vaddr and "clear_refs:" in vaddr
    with pytest.raises(Unsupported, match="CONFIG_PROC_PAGE_MONITOR"):
        registry.resolve_access_check("auto", "vaddr")
    with pytest.raises(Unsupported):
        registry.make_access("clear_refs", ProcessTable())


def test_auto_prefers_page_idle() -> None:
    registry = registry_with(probes={"page_idle": "", "clear_refs": ""})
    assert registry.available_access_checks() == ["page_idle", "clear_refs"]
    assert registry.available_operations() == ["vaddr", "fvaddr", "paddr"]
    assert registry.resolve_access_check("auto", "vaddr") == "page_idle"
    assert registry.resolve_access_check("auto", "paddr") == "page_idle"
    with pytest.raises(ValueError, match="clear_refs works per process: not for paddr"):
        registry.resolve_access_check("clear_refs", "paddr")


def test_resolve_rejects_what_cannot_work() -> None:
    registry = registry_with(probes={"page_idle": "page_idle: nope", "clear_refs": ""})
    with pytest.raises(Unsupported, match="paddr: needs the page_idle access check"):
        registry.resolve_access_check("auto", "paddr")
    with pytest.raises(Unsupported, match="page_idle: nope"):
        registry.resolve_access_check("page_idle", "vaddr")
    with pytest.raises(ValueError, match="clear_refs works per process"):
        registry.resolve_access_check("clear_refs", "paddr")  # a combination, before availability
    with pytest.raises(ValueError):
        registry.resolve_access_check("bogus", "vaddr")
    with pytest.raises(ValueError):
        registry.resolve_access_check("auto", "bogus")
    with pytest.raises(ValueError):
        registry.why_unavailable("bogus")


def test_availability_is_cached() -> None:
    calls = []

    def probe() -> str:
        calls.append(1)
        return ""

    registry = registry_with(probes={"clear_refs": probe})
    registry.available_access_checks()
    registry.available_operations()
    registry.why_unavailable("vaddr")
    assert len(calls) == 1
    registry.reset()
    registry.available_access_checks()
    assert len(calls) == 2


def test_probing_clear_refs_does_not_clear_anything() -> None:
    buf = mmap.mmap(-1, 4 * MiB)
    try:
        start = ctypes.addressof(ctypes.c_char.from_buffer(buf))
        buf.write(b"\1" * len(buf))
        assert ops.probe_clear_refs() == ""
        found, referenced = parse_smaps(Path("/proc/self/smaps").read_bytes())
        assert referenced[found[:, 0].tolist().index(start)] == 4 * MiB
    finally:
        buf.close()


def test_factories() -> None:
    registry = ops.Registry()
    table = ProcessTable()
    assert isinstance(registry.operations("vaddr").space(table), VaddrSpace)
    assert isinstance(registry.operations("fvaddr").space(table), FvaddrSpace)
    assert isinstance(registry.operations("paddr").space(table), PaddrSpace)
    access = registry.make_access("clear_refs", table)
    assert isinstance(access, ClearRefsAccess) and access.processes is table
    with pytest.raises(ValueError):
        registry.operations("bogus")
    with pytest.raises(ValueError):
        registry.make_access("auto", table)
    table.close()
