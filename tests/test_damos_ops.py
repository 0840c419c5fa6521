"""The user backend's DAMOS actions (monitor/ops/madvise.py) on real processes of this host.

process_madvise(2) through each target's pidfd: MADV_PAGEOUT drops a clean,
file-backed mapping of another process here without swap, which is what
these tests look at (smaps' Rss). Per page filters read the target's pagemap.
"""

from __future__ import annotations

import errno
import logging
from collections.abc import Iterator
from pathlib import Path

import pytest
from ops_helpers import ChildProcess

from damond.monitor import ops
from damond.monitor.config import FilterConfig, TargetConfig
from damond.monitor.ops import madvise
from damond.monitor.ops.meminfo import free_mem_rate, parse_free_mem_rate
from damond.monitor.ops.process import ProcessTable

MiB = 1 << 20
PAGE = 4096

# anon: 4 MiB written (private: Python's default, MAP_SHARED, is shmem, a file to the
# kernel); file: 8 MiB of a file read once (clean page cache); locked: 1 MiB mlock()ed
# (MADV_PAGEOUT refuses locked memory: EINVAL); holey: 8 MiB mapped, 8 MiB unmapped,
# 8 MiB mapped
SCRIPT = r"""
private = mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS
anon = mmap.mmap(-1, 4 << 20, flags=private)
anon[::4096] = b"a" * (len(anon) // 4096)
f = open(os.environ["DAMOS_FILE"], "rb")
file = mmap.mmap(f.fileno(), 8 << 20, mmap.MAP_SHARED, mmap.PROT_READ)
sum(file[::4096])
locked = mmap.mmap(-1, 1 << 20, flags=private)
locked[::4096] = b"l" * 256
libc = ctypes.CDLL(None, use_errno=True)
assert libc.mlock(ctypes.c_void_p(address(locked)), ctypes.c_size_t(1 << 20)) == 0
import numpy
file_address = numpy.frombuffer(file, dtype=numpy.uint8).__array_interface__["data"][0]
holey = mmap.mmap(-1, 24 << 20, flags=private)
libc.munmap(ctypes.c_void_p(address(holey) + (8 << 20)), ctypes.c_size_t(8 << 20))
print(address(anon), file_address, address(locked), address(holey), flush=True)
serve()
"""


@pytest.fixture
def child(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[ChildProcess]:
    data = Path("/var/tmp") / f"damond-damos-{tmp_path.name}.bin"  # a disk, not tmpfs
    data.write_bytes(bytes(range(256)) * (8 * MiB // 256))
    monkeypatch.setenv("DAMOS_FILE", str(data))
    c = ChildProcess(SCRIPT)
    try:
        yield c
    finally:
        c.reap()
        data.unlink()


def addresses(c: ChildProcess) -> tuple[int, int, int]:
    anon, file, locked, _ = map(int, c.first_line.split())
    return anon, file, locked


def rss(pid: int, start: int, end: int) -> int:
    """Resident bytes of the mappings inside [start, end), from smaps."""
    total, inside = 0, False
    with open(f"/proc/{pid}/smaps") as f:
        for line in f:
            head = line.split(maxsplit=1)[0]
            if "-" in head and not head.endswith(":"):
                lo, hi = (int(x, 16) for x in head.split("-"))
                inside = start <= lo and hi <= end
            elif head == "Rss:" and inside:
                total += int(line.split()[1]) * 1024
    return total


@pytest.fixture
def actions() -> Iterator[madvise.MadviseActions]:
    processes = ProcessTable()
    made = ops.REGISTRY.make_actions(processes)
    assert isinstance(made, madvise.MadviseActions)
    yield made
    processes.close()


def test_the_host_offers_the_process_madvise_actions() -> None:
    registry = ops.Registry()
    offered = registry.available_actions("vaddr")
    assert {"stat", "willneed", "cold", "pageout"} <= set(offered)
    assert not {"nohugepage", "lru_prio", "lru_deprio"} & set(offered)
    assert registry.available_actions("paddr") == ["stat"]
    assert "VMA flags" in registry.why_action_unavailable("nohugepage", "fvaddr")
    assert "LRU" in registry.why_action_unavailable("lru_deprio", "vaddr")
    assert "only count" in registry.why_action_unavailable("pageout", "paddr")
    assert "cgroup" in registry.why_filter_unavailable("memcg", "vaddr")
    assert "sampled pages" in registry.why_filter_unavailable("young", "vaddr")
    assert registry.why_filter_unavailable("anon", "paddr")
    assert registry.why_filter_unavailable("anon", "vaddr") == ""


def test_probes_ask_the_kernel_without_advising_anything() -> None:
    assert madvise.probe_advice(madvise.MADV_PAGEOUT, "pageout")() == ""
    assert "EINVAL" in madvise.probe_advice(14, "madv_hugepage")()  # MADV_HUGEPAGE: not remote


def test_pageout_drops_a_clean_file_mapping(
    child: ChildProcess, actions: madvise.MadviseActions
) -> None:
    anon, file, _ = addresses(child)
    assert rss(child.pid, file, file + 8 * MiB) == 8 * MiB
    actions.begin()
    applied = actions.apply(child.target, "pageout", file, file + 8 * MiB, (), False)
    assert applied == 8 * MiB
    assert rss(child.pid, file, file + 8 * MiB) == 0
    assert rss(child.pid, anon, anon + 4 * MiB) == 4 * MiB  # not asked, not touched


def test_a_region_over_holes_is_cut_to_the_mappings(
    child: ChildProcess, actions: madvise.MadviseActions
) -> None:
    """madvise over unmapped memory fails with ENOMEM; regions span holes, so only the
    mapped parts are advised and the bytes applied count those."""
    holey = int(child.first_line.split()[3])
    actions.begin()
    assert actions.apply(child.target, "cold", holey, holey + 24 * MiB, (), False) == 16 * MiB
    assert not actions.failures


def test_anon_filter_decides_page_by_page(
    child: ChildProcess, actions: madvise.MadviseActions
) -> None:
    anon, file, _ = addresses(child)
    reject_file = (FilterConfig("anon", matching=False, allow=False),)  # reject non-anon pages
    reject_anon = (FilterConfig("anon", matching=True, allow=False),)
    allow_anon = (FilterConfig("anon", matching=True, allow=True),)  # and reject the rest
    actions.begin()
    target = child.target
    assert actions.apply(target, "pageout", file, file + 8 * MiB, reject_file, False) == 0
    assert rss(child.pid, file, file + 8 * MiB) == 8 * MiB
    assert actions.apply(target, "pageout", anon, anon + 4 * MiB, reject_file, False) == 4 * MiB
    assert actions.apply(target, "pageout", file, file + 8 * MiB, allow_anon, True) == 0
    assert rss(child.pid, file, file + 8 * MiB) == 8 * MiB
    assert actions.apply(target, "pageout", file, file + 8 * MiB, reject_anon, False) == 8 * MiB
    assert rss(child.pid, file, file + 8 * MiB) == 0


def test_failures_are_counted_logged_once_and_never_raise(
    child: ChildProcess, actions: madvise.MadviseActions, caplog: pytest.LogCaptureFixture
) -> None:
    anon, file, locked = addresses(child)
    caplog.set_level(logging.WARNING, logger=madvise.__name__)
    actions.begin()
    # EINVAL for the locked mapping, and the next range is still advised
    ranges = sorted([(locked, locked + MiB), (file, file + 8 * MiB)])
    for start, end in ranges:
        actions.apply(child.target, "pageout", start, end, (), False)
    assert actions.failures[(child.pid, "pageout", errno.EINVAL)] == 1
    assert rss(child.pid, file, file + 8 * MiB) == 0
    actions.apply(child.target, "pageout", locked, locked + MiB, (), False)
    assert actions.failures[(child.pid, "pageout", errno.EINVAL)] == 2
    child.reap()
    for _ in range(2):  # ESRCH: the target has exited
        assert actions.apply(child.target, "pageout", anon, anon + MiB, (), False) == 0
    assert actions.failures[(child.pid, "pageout", errno.ESRCH)] == 2
    warnings = [r.getMessage() for r in caplog.records]
    assert len(warnings) == 2, warnings  # one per error, not per call
    assert all("logged once" in w for w in warnings)


def test_an_unconfigured_pid_is_never_reached_by_number(
    child: ChildProcess, actions: madvise.MadviseActions
) -> None:
    """Actions go through the pidfd the table pinned: a target pinned and gone stays
    gone, whoever gets its number later."""
    _, file, _ = addresses(child)
    actions.processes.get(child.pid)  # pinned, as the engine's ops pin their targets
    child.reap()
    assert (
        actions.apply(TargetConfig(0, pid=child.pid), "pageout", file, file + MiB, (), False) == 0
    )
    assert actions.failures[(child.pid, "pageout", errno.ESRCH)] == 1


def test_free_mem_rate() -> None:
    text = b"MemTotal:       24684084 kB\nMemFree:        22790168 kB\nMemAvailable: 1 kB\n"
    assert parse_free_mem_rate(text) == 22790168 * 1000 // 24684084
    with pytest.raises(ValueError):
        parse_free_mem_rate(b"MemFree: 1 kB\n")
    assert 0 <= free_mem_rate() <= 1000
