"""DAMOS actions of the user backend: process_madvise(2) on each target's pidfd.

The kernel's vaddr operations madvise() a region of the target's mm from
inside the kernel; from user space the same advice reaches another process
only through process_madvise(2), which takes just the advice that leaves the
process's mappings as they are: MADV_COLD, MADV_PAGEOUT, MADV_WILLNEED and
(since Linux 6.1, with transparent huge pages) MADV_COLLAPSE. DAMOS's
``hugepage`` is done with MADV_COLLAPSE (collapse now) where the kernel's
DAMON sets MADV_HUGEPAGE (collapse later); MADV_HUGEPAGE and MADV_NOHUGEPAGE
change VMA flags and are refused for another process, and user space has no
handle on the LRU lists (lru_prio, lru_deprio) or on physical pages (paddr).

A target is reached only through the pidfd its ProcessTable pinned (never by
its number), so an action can never land on a process that took a dead
target's pid. Each region is cut to the target's mappings first (as read from
its maps at the start of the pass): madvise over a hole fails with ENOMEM
after doing its work, and the bytes applied would read 0. Per page filters
(anon) read the target's pagemap for the region. A failed call (the target
exited, EPERM, EINVAL, EAGAIN...) applies nothing more to that region, is
counted and logged once per target, advice and error, and never raises: an
action is advice, monitoring goes on.
"""

from __future__ import annotations

import collections
import ctypes
import errno
import logging
import os
import subprocess
from collections.abc import Callable, Mapping

import numpy as np

from damond.monitor.config import FilterConfig, TargetConfig
from damond.monitor.ops.base import TargetGone
from damond.monitor.ops.common import Range
from damond.monitor.ops.page_idle import KERNEL_PAGE, pread_full
from damond.monitor.ops.process import ProcessHolder, ProcessTable, TargetProcess
from damond.monitor.ops.vaddr import parse_maps

log = logging.getLogger(__name__)

SYS_PROCESS_MADVISE = 440
"""The syscall number in the generic table, the same on every architecture (5.10+)."""
UIO_MAXIOV = 1024
"""The most iovecs one call takes."""

MADV_WILLNEED = 3
MADV_COLD = 20
MADV_PAGEOUT = 21
MADV_COLLAPSE = 25

PROBE_COMMAND = ("sleep", "60")
"""A child to ask the probes about: the kernel checks the advice only for another
process, and our own child is the one we surely may reach. It is killed at once."""

USER_SPACE_CANNOT = {
    "nohugepage": "MADV_NOHUGEPAGE changes the target's VMA flags, which process_madvise(2) "
    "refuses to do to another process",
    "lru_prio": "user space has no interface to move another process's pages on the LRU lists",
    "lru_deprio": "user space has no interface to move another process's pages on the LRU lists",
}
"""Why the user backend lacks the DAMOS actions it lacks everywhere."""

PM_PRESENT = np.uint64(1 << 63)
PM_SWAP = np.uint64(1 << 62)
PM_FILE = np.uint64(1 << 61)
"""pagemap bit 61: a file page or shared anonymous memory."""


class _Iovec(ctypes.Structure):
    _fields_ = [("iov_base", ctypes.c_void_p), ("iov_len", ctypes.c_size_t)]


_libc = ctypes.CDLL(None, use_errno=True)
_syscall = _libc.syscall
_syscall.restype = ctypes.c_long


def process_madvise(pidfd: int, ranges: list[Range], advice: int) -> int:
    """Advise [start, end) ranges of the pidfd's process (at most UIO_MAXIOV): bytes advised.

    OSError when the first range already failed; the bytes before a failing
    range otherwise (the kernel's own answer).
    """
    iov = (_Iovec * max(len(ranges), 1))(*[_Iovec(s, e - s) for s, e in ranges])
    done = _syscall(
        ctypes.c_long(SYS_PROCESS_MADVISE),
        ctypes.c_int(pidfd),
        iov,
        ctypes.c_size_t(len(ranges)),
        ctypes.c_int(advice),
        ctypes.c_uint(0),
    )
    if done < 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))
    return int(done)


def probe_advice(advice: int, name: str) -> Callable[[], str]:
    """A probe: '' when process_madvise(advice) works on another process here, else why not.

    Zero bytes are advised to a child of ours: the kernel still checks that
    the advice may be given to another process (EINVAL, also without the
    feature, e.g. MADV_COLLAPSE without CONFIG_TRANSPARENT_HUGEPAGE) and that
    we may (EPERM without CAP_SYS_NICE).
    """

    def probe() -> str:
        try:
            child = subprocess.Popen(PROBE_COMMAND, stdin=subprocess.DEVNULL)
        except OSError as e:
            return f"{name}: cannot start a process to probe ({e.strerror})"
        try:
            pidfd = os.pidfd_open(child.pid)
        except OSError as e:
            child.kill()
            child.wait()
            return f"{name}: cannot reach a process to probe ({e.strerror})"
        try:
            process_madvise(pidfd, [(0, 0)], advice)
        except OSError as e:
            if e.errno == errno.ENOSYS:
                return f"{name}: process_madvise(2) missing (Linux 5.10+)"
            if e.errno == errno.EINVAL:
                return f"{name}: the kernel refuses it for another process (EINVAL)"
            if e.errno == errno.EPERM:
                return f"{name}: not permitted (needs CAP_SYS_NICE and ptrace access)"
            return f"{name}: process_madvise: {e.strerror}"
        finally:
            os.close(pidfd)
            child.kill()
            child.wait()
        return ""

    return probe


def _clip(ranges: np.ndarray, start: int, end: int) -> list[Range]:
    """[start, end) cut to the (sorted, disjoint) mappings."""
    if not len(ranges):
        return []
    lo = int(np.searchsorted(ranges[:, 1], np.uint64(start), side="right"))
    hi = int(np.searchsorted(ranges[:, 0], np.uint64(end), side="left"))
    out = []
    for s, e in ranges[lo:hi].tolist():
        s, e = max(s, start), min(e, end)
        if s < e:
            out.append((s, e))
    return out


def anon_pages(entries: np.ndarray) -> np.ndarray:
    """Which pages of pagemap entries hold anonymous memory (present or swapped, not a file
    page). A page never touched holds nothing: not anonymous."""
    held = (entries & (PM_PRESENT | PM_SWAP)) != 0
    return held & ((entries & PM_FILE) == 0)


PAGE_FILTERS: dict[str, Callable[[np.ndarray], np.ndarray]] = {"anon": anon_pages}
"""Per page filter types: whether each page (from its pagemap entry) is of the type."""
PAGE_FILTERS_CANNOT = {
    "memcg": "the user backend cannot tell which memory cgroup a page is charged to "
    "(nothing in /proc says it per page)",
    "young": "the user backend reads accessed bits of sampled pages only, not of every page "
    "an action is about to touch",
}
"""Why the user backend lacks the per page filters it lacks."""


def passing(
    entries: np.ndarray, filters: tuple[FilterConfig, ...], default_reject: bool
) -> np.ndarray:
    """damos_pa_filter_out per page: the first filter whose type-match equals its
    ``matching`` decides (allow or reject); pages no filter decided get default_reject."""
    rejected = np.full(len(entries), default_reject)
    undecided = np.ones(len(entries), dtype=bool)
    for f in filters:
        hit = undecided & (PAGE_FILTERS[f.type](entries) == f.matching)
        rejected[hit] = not f.allow
        undecided &= ~hit
    return ~rejected


def _runs(pages: np.ndarray, first_page: int) -> list[Range]:
    """Address ranges of the runs of True in a per page mask starting at first_page."""
    edges = np.flatnonzero(np.diff(np.concatenate(([0], pages.astype(np.int8), [0]))))
    starts, ends = edges[::2], edges[1::2]
    return [
        ((first_page + int(s)) * KERNEL_PAGE, (first_page + int(e)) * KERNEL_PAGE)
        for s, e in zip(starts.tolist(), ends.tolist(), strict=True)
    ]


class MadviseActions(ProcessHolder):
    """Actions by process_madvise(2) on the pinned targets of a ProcessTable."""

    def __init__(self, advice: Mapping[str, int], processes: ProcessTable | None = None) -> None:
        super().__init__(processes)
        self._advice = dict(advice)
        self._mappings: dict[int, np.ndarray] = {}
        self.failures: collections.Counter[tuple[int, str, int]] = collections.Counter()
        """(pid, action, errno) → failed calls, for the log and for tests."""

    def begin(self) -> None:
        self._mappings.clear()

    def apply(
        self,
        target: TargetConfig,
        action: str,
        start: int,
        end: int,
        filters: tuple[FilterConfig, ...],
        default_reject: bool,
    ) -> int:
        advice = self._advice[action]  # KeyError: a caller's bug (validated configs only)
        try:
            proc = self.processes.live(target.pid)
            ranges = _clip(self._mapped(proc), start, end)
            if filters:
                ranges = [
                    r for s, e in ranges for r in self._passing(proc, s, e, filters, default_reject)
                ]
        except TargetGone:
            self._failed(target.pid, action, errno.ESRCH)
            return 0
        except OSError as e:
            self._failed(target.pid, action, e.errno or 0)
            return 0
        return self._advise(proc, action, advice, ranges)

    def _mapped(self, proc: TargetProcess) -> np.ndarray:
        found = self._mappings.get(proc.pid)
        if found is None:
            found = self._mappings[proc.pid] = parse_maps(proc.read("maps"))
        return found

    def _passing(
        self,
        proc: TargetProcess,
        start: int,
        end: int,
        filters: tuple[FilterConfig, ...],
        default_reject: bool,
    ) -> list[Range]:
        first, last = start // KERNEL_PAGE, end // KERNEL_PAGE
        size = (last - first) * 8
        data = pread_full(proc.fd("pagemap"), size, first * 8)
        if len(data) < size:
            raise TargetGone(proc.pid, "has no pagemap for the range")
        entries = np.frombuffer(data, dtype=np.uint64)
        return _runs(passing(entries, filters, default_reject), first)

    def _advise(self, proc: TargetProcess, action: str, advice: int, ranges: list[Range]) -> int:
        """Advise every range, UIO_MAXIOV per call; a failing range is counted and skipped.

        The kernel advises ranges in order and answers with the bytes of the
        ranges done before a failing one; asking again from that range gives
        its error.
        """
        applied, i = 0, 0
        while i < len(ranges):
            chunk = ranges[i : i + UIO_MAXIOV]
            try:
                done = process_madvise(proc.pidfd, chunk, advice)
            except OSError as e:
                self._failed(proc.pid, action, e.errno or 0)
                if e.errno == errno.ESRCH:
                    break
                i += 1
                continue
            applied += done
            progress = i
            for start, end in chunk:
                if done < end - start:
                    break
                done -= end - start
                i += 1
            if i == progress:  # nothing done and no error: never loop on it
                self._failed(proc.pid, action, 0)
                i += 1
        return applied

    def _failed(self, pid: int, action: str, err: int) -> None:
        key = (pid, action, err)
        self.failures[key] += 1
        if self.failures[key] == 1:
            log.warning(
                "%s on pid %d failed: %s (counted as not applied; logged once per error)",
                action,
                pid,
                os.strerror(err) if err else "nothing done",
            )
