"""The page_idle access check: per-page accesses through /sys/kernel/mm/page_idle/bitmap.

What the kernel's DAMON does with page table bits (damon_pa_mkold /
damon_pa_young in mm/damon/paddr.c), user space does with idle page tracking
(Documentation/admin-guide/mm/idle_page_tracking.rst): writing a page's bit to
the bitmap clears the page's accessed bits and sets its idle flag; reading it
later says "idle" unless the page was accessed in between.

One sample of one region costs, in the common case, three small kernel calls
plus one for the page's flags:

- prepare: the sampled address's pagemap entry (vaddr/fvaddr; paddr addresses
  are physical already), its /proc/kpageflags entry, and one 8-byte bitmap
  write with only the sampled page's bit set (zero bits are ignored by the
  kernel, so neighbours are left alone);
- check: one 8-byte bitmap read.

The kpageflags read is what makes the answer correct rather than merely
cheap. The kernel tracks only pages on an LRU list and only the head page of a
compound page: a transparent huge page's tail reads "not idle" forever, which
without the flags would count as accessed. The flags say whether the page is
trackable (KPF_LRU) and whether it is a tail; a tail's head is found by
walking kpageflags back (folios are naturally aligned, so the head is within
the tail's PMD-sized block), and remembered for a while so that the next
sample in the same huge page costs no walk.

Reads and writes go to the kernel in runs: sampled entries that are close in
the file share one pread, identical bitmap words are written and read once.
A run is only worth it while it is short, because the kernel visits every page
in it (a bitmap read even walks the rmap of every idle page of its words): see
bench/page_idle.py for the measurements behind the gap constants.

A sample has two implementations with the same signature: prepare_sample and
check_sample below (the reference, in Python and numpy), and the C module
_page_idle (built with the package; `_page_idle.c`), which does the same
kernel calls in one call per target and sample. Under emulation a numpy
call or a Python loop step costs about as much as a kernel call, and a
sample of a few dozen regions made several dozen of each; the C path is what
the daemon uses, the Python path what it is tested against (and the
fallback, with a log line, where the module could not be built).

The C path also offers the engine's fast path (ops/base.py, TargetSampler):
PageIdleAccess.sampler(target) is a _page_idle.Sampler that picks the
sampled pages from the regions itself and adds its answers into the regions'
counters, so that a sample of a target is one call to prepare and one to
check, with no array made per sample: what is left of the check's Python
(which process, its pagemap fd, what a failure means) runs only when
something goes wrong (_recover).
"""

from __future__ import annotations

import errno
import functools
import logging
import mmap
import os
import sys
from collections.abc import Callable
from dataclasses import dataclass
from types import ModuleType
from typing import NamedTuple

import numpy as np

from damond.monitor.config import PAGE_SIZE, TargetConfig
from damond.monitor.ops.base import TargetGone, TargetSampler
from damond.monitor.ops.process import (
    ProcessHolder,
    ProcessTable,
    TargetProcess,
    gone_when_missing,
)

log = logging.getLogger(__name__)

BITMAP = "/sys/kernel/mm/page_idle/bitmap"
KPAGEFLAGS = "/proc/kpageflags"

KERNEL_PAGE = mmap.PAGESIZE
"""The kernel's page size: pagemap and the PFNs count in these (damond's PAGE_SIZE
is DAMON's minimum region size, 4 KiB everywhere)."""

ENTRY = 8
"""Bytes per entry of pagemap and kpageflags, and per word of the idle bitmap."""
WORD_PAGES = 64
"""Pages per bitmap word: the bitmap is read and written in aligned u64 words."""
FOLIO_BLOCK = KERNEL_PAGE // ENTRY
"""Pages per PMD-sized block (512 with 4 KiB pages): no LRU folio is larger, and
folios are naturally aligned, so a tail's head lies in the tail's block."""

PM_PRESENT = 1 << 63
PM_PFN_MASK = (1 << 55) - 1

ALL_ONES = (1 << 64) - 1
"""Fill for entries past a file's end. As a pagemap entry it cannot be real (bits
59-60 are always 0), so "nothing read" stays recognisable; as a bitmap word it
says idle, so a page that cannot be read back never counts as accessed."""

KPF_LRU = 1 << 5
KPF_COMPOUND_HEAD = 1 << 15
KPF_COMPOUND_TAIL = 1 << 16
KPF_NOPAGE = 1 << 20

PAGEMAP_GAP = 16
"""Entries between two sampled pages up to which one pagemap pread covers both.
An entry more costs the kernel a page table lookup: natively ~0.03 µs against
~0.85 µs for a pread from Python; under TCG ~0.1 µs against 5-10 µs."""
KPAGEFLAGS_GAP = 16
"""The same for kpageflags: ~0.14 µs an entry against 5-10 µs a pread (TCG)."""
BITMAP_WRITE_GAP = 2
"""Words between two written words up to which one pwrite covers both: the kernel
ignores zero bits, but still visits each page of a zero word (~2-3 µs a word
against ~10 µs a pwrite, TCG)."""
BITMAP_READ_GAP = 0
"""Bitmap words are read together only when adjacent: every idle page of a word
read costs an rmap walk (~0.6 µs each, TCG: ~47 µs for a fully idle word against
~10 µs for a pread of a word with nothing idle)."""

NO_HEAD = ALL_ONES
"""A sample's head where page_idle cannot tell (counts as not accessed): no page,
not on an LRU list (the zero page, hugetlb, kernel memory, pages still in a
per-CPU LRU batch), or no head found."""
PFN_HIDDEN = -2
"""prepare_sample's answer when pagemap shows present pages without PFNs."""

HEAD_CACHE_PREPARES = 100
"""prepare() calls after which the learned tail→head spans are forgotten: a
huge page that was split or freed and reused in a different shape is trusted
for at most this long. (A Sampler keeps its own spans, for its own target.)"""

STALE, HIDDEN, MISSING, EXITED = 1, 2, 3, 4
"""What a _page_idle.Sampler hands to _recover: nothing read from the pagemap (the
process exited or exec'd), PFNs hidden, ESRCH/ENOENT from a file, the pidfd says
the process has exited."""


# --- pure helpers: numpy over entries and bitmap words ------------------------------


@dataclass(frozen=True)
class Layout:
    """How sorted unique positions of an array file are fetched: one pread per run.

    A run ends where the next position is more than max_gap positions away.
    The runs' contents, concatenated, form one buffer; `index` is each
    position's entry in it. Worked out in one plain loop over the positions:
    the loop over runs that follows does a syscall per run anyway, and for
    the few dozen to few hundred regions DAMON usually keeps, a loop costs
    less than the two dozen numpy calls the vectorised form needs (each tens
    of µs under emulation; bench/guest.py's profile).
    """

    firsts: list[int]
    """The first position of each run."""
    counts: list[int]
    """The number of entries each run reads (its gaps included)."""
    index: np.ndarray

    @classmethod
    def of(cls, positions: np.ndarray, max_gap: int) -> Layout:
        values = positions.tolist()
        if not values:
            return cls([], [], np.empty(0, dtype=np.int64))
        limit = max_gap + 1
        first = last = values[0]
        firsts, counts, index = [first], [], []
        base = 0
        for p in values:
            if p - last > limit:
                count = last - first + 1
                counts.append(count)
                base += count
                first = p
                firsts.append(p)
            index.append(base + p - first)
            last = p
        counts.append(last - first + 1)
        return cls(firsts, counts, np.array(index, dtype=np.int64))


def decode_pagemap(entries: np.ndarray) -> np.ndarray:
    """PFNs of pagemap entries, 0 where no page is present (swapped, never touched).

    Raises PermissionError when a present page shows PFN 0: the kernel hides
    PFNs from readers without CAP_SYS_ADMIN (PFN 0 is never a user page).
    """
    entries = np.asarray(entries, dtype=np.uint64)
    present = (entries & np.uint64(PM_PRESENT)) != 0
    pfns = np.where(present, entries & np.uint64(PM_PFN_MASK), np.uint64(0))
    if np.any(present & (pfns == 0)):
        raise pfns_hidden()
    return pfns


def pfns_hidden() -> PermissionError:
    """The kernel hides PFNs from readers without CAP_SYS_ADMIN (PFN 0 is never a user page)."""
    return PermissionError(
        errno.EPERM,
        "pagemap shows present pages without their PFNs: "
        "page_idle needs CAP_SYS_ADMIN (run damond as root)",
    )


class Unique(NamedTuple):
    """np.unique's answers, and the sort behind them."""

    values: np.ndarray
    """The unique values, sorted."""
    inverse: np.ndarray
    """For each input, the index of its value in values."""
    order: np.ndarray
    """The stable argsort of the input."""
    starts: np.ndarray
    """Where each value's run of equal inputs starts in the sorted input."""


def sorted_unique(values: np.ndarray) -> Unique:
    """np.unique(values, return_inverse=True), and more, faster on small arrays.

    numpy 2's np.unique costs ~10 µs for 100 values (~300 µs under TCG); a
    stable argsort and a mask do the same in ~2 µs.
    """
    order = np.argsort(values, kind="stable")
    ordered = values[order]
    first = np.ones(len(ordered), dtype=bool)
    first[1:] = ordered[1:] != ordered[:-1]
    inverse = np.empty(len(values), dtype=np.int64)
    inverse[order] = np.cumsum(first) - 1
    return Unique(ordered[first], inverse, order, np.flatnonzero(first))


def word_masks(pfns: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The sorted unique bitmap words holding pfns and, per word, the OR of their bits.

    Writing a word marks idle exactly the pages whose bits are 1 in it, so a
    word written once with all its sampled bits does the work of many writes.
    """
    pfns = np.asarray(pfns, dtype=np.uint64)
    if not len(pfns):
        return np.empty(0, np.uint64), np.empty(0, np.uint64)
    words = pfns // np.uint64(WORD_PAGES)
    bits = np.left_shift(np.uint64(1), pfns % np.uint64(WORD_PAGES))
    unique = sorted_unique(words)
    return unique.values, np.bitwise_or.reduceat(bits[unique.order], unique.starts)


def bits_of(pfns: np.ndarray, words: np.ndarray, values: np.ndarray) -> np.ndarray:
    """Each pfn's bit (bool) from the bitmap words `words` (sorted) whose contents are values."""
    pfns = np.asarray(pfns, dtype=np.uint64)
    row = np.searchsorted(words, pfns // np.uint64(WORD_PAGES))
    shifted = np.right_shift(values[row], pfns % np.uint64(WORD_PAGES))
    return (shifted & np.uint64(1)).astype(bool)


def head_of(flags: np.ndarray, first: int) -> int:
    """The head PFN of a tail, given the kpageflags of PFNs [first, tail).

    The head is the nearest page before the tail that is no tail itself; -1
    when there is none or it is no head (the folio changed under the read).
    """
    not_tail = np.flatnonzero((flags & np.uint64(KPF_COMPOUND_TAIL)) == 0)
    if not len(not_tail):
        return -1
    last = int(not_tail[-1])
    if not int(flags[last]) & KPF_COMPOUND_HEAD:
        return -1
    return first + last


def head_candidates(pfn: int) -> list[int]:
    """Where pfn's head can be, nearest first: pfn rounded down to each folio order."""
    found: list[int] = []
    size = 2
    while size <= FOLIO_BLOCK:
        head = pfn & ~(size - 1)
        if head != pfn and (not found or head != found[-1]):
            found.append(head)
        size *= 2
    return found


# --- kernel file I/O ---------------------------------------------------------------------


def pread_full(fd: int, size: int, offset: int) -> bytes:
    """pread until size bytes or end of file: sysfs hands out at most a page per call."""
    chunks = []
    done = 0
    while done < size:
        chunk = os.pread(fd, size - done, offset + done)
        if not chunk:
            break
        chunks.append(chunk)
        done += len(chunk)
    return b"".join(chunks)


def pwrite_full(fd: int, data: bytes | memoryview, offset: int) -> None:
    """pwrite all of data: sysfs takes at most a page per call.

    The kernel takes nothing of a last, partial bitmap word (max_pfn not a
    multiple of 64): the write returns 0 there, so stop; those pages read back
    as idle (past the end), i.e. never accessed.
    """
    view = memoryview(data)
    while view:
        written = os.pwrite(fd, view, offset)
        if written <= 0:
            return
        view, offset = view[written:], offset + written


def read_entries(fd: int, positions: np.ndarray, max_gap: int, fill: int) -> np.ndarray:
    """The 8-byte entries at positions (any order, repeats allowed) of an array file.

    Close positions share one pread (see Layout); entries past the end of the
    file read as fill.
    """
    positions = np.asarray(positions, dtype=np.uint64)
    if not len(positions):
        return np.empty(0, dtype=np.uint64)
    if bool(np.all(positions[1:] > positions[:-1])):  # the engine's addresses: sorted already
        return read_sorted(fd, positions, max_gap, fill)
    unique = sorted_unique(positions)
    return read_sorted(fd, unique.values, max_gap, fill)[unique.inverse]


def read_sorted(fd: int, positions: np.ndarray, max_gap: int, fill: int) -> np.ndarray:
    """read_entries of sorted unique positions. The loop is kept to the syscall and a
    length check: it runs about once per sampled page."""
    layout = Layout.of(positions, max_gap)
    pread = os.pread
    chunks = []
    for first, count in zip(layout.firsts, layout.counts, strict=True):
        size = count * ENTRY
        data = pread(fd, size, first * ENTRY)
        if len(data) < size:
            data = _complete(fd, data, size, first * ENTRY, fill)
        chunks.append(data)
    return np.frombuffer(b"".join(chunks), dtype=np.uint64)[layout.index]


def _complete(fd: int, data: bytes, size: int, offset: int, fill: int) -> bytes:
    """A short read finished: read on when it got something (sysfs gives at most a page
    per call), fill what is past the end of the file."""
    if data:
        data += pread_full(fd, size - len(data), offset + len(data))
    return data + fill.to_bytes(ENTRY, sys.byteorder) * ((size - len(data)) // ENTRY)


def write_words(fd: int, words: np.ndarray, masks: np.ndarray, max_gap: int) -> None:
    """Write masks at bitmap words (sorted, unique); close words share one pwrite."""
    layout = Layout.of(words, max_gap)
    buffer = np.zeros(sum(layout.counts), dtype=np.uint64)
    buffer[layout.index] = masks
    data = memoryview(buffer.tobytes())
    pwrite = os.pwrite
    start = 0
    for first, count in zip(layout.firsts, layout.counts, strict=True):
        chunk = data[start : start + count * ENTRY]
        written = pwrite(fd, chunk, first * ENTRY)
        if written < len(chunk):
            pwrite_full(fd, chunk[written:], first * ENTRY + written)
        start += count * ENTRY


# --- tails and their heads ----------------------------------------------------------------


class HeadCache:
    """Tail → head spans learned from kpageflags, so a huge page is walked once.

    An entry head → last says that PFNs head+1..last were tails of the folio
    at head when it was learned. Lookups try the head candidates of a tail
    (its PFN rounded down to each folio order) nearest first. Everything is
    forgotten every HEAD_CACHE_PREPARES prepares, which bounds both memory and
    how long a changed folio layout can mislead.
    """

    def __init__(self, spans: dict[int, int] | None = None) -> None:
        self.spans: dict[int, int] = spans if spans is not None else {}
        """head -> last known tail: what both sample paths are handed."""

    def clear(self) -> None:
        self.spans.clear()

    def nearest(self, pfn: int) -> tuple[int, int] | None:
        """(head, last known tail) of the nearest cached head that may hold pfn."""
        for head in head_candidates(pfn):
            last = self.spans.get(head)
            if last is not None:
                return head, last
        return None

    def learn(self, head: int, last: int) -> None:
        self.spans[head] = max(last, self.spans.get(head, last))


def find_head(kpageflags: int, pfn: int, cache: HeadCache) -> int:
    """The head PFN of the tail page pfn (-1 when it cannot be told).

    Within a known span: no read. Beyond a known span's end: only the entries
    after it are read (they must all be tails, else the nearest non-tail is
    the head). Otherwise: the entries from the block's start up to pfn.
    """
    known = cache.nearest(pfn)
    if known is not None and pfn <= known[1]:
        return known[0]
    first = known[1] + 1 if known is not None else pfn & ~(FOLIO_BLOCK - 1)
    count = pfn - first
    flags = np.frombuffer(pread_full(kpageflags, count * ENTRY, first * ENTRY), dtype=np.uint64)
    if len(flags) < count:
        return -1
    if known is not None and not np.any((flags & np.uint64(KPF_COMPOUND_TAIL)) == 0):
        head = known[0]
    else:
        head = head_of(flags, first)
    if head >= 0:
        cache.learn(head, pfn)
    return head


# --- one sample: the Python reference of _page_idle.c ------------------------------------------


def heads_of(
    kpageflags: int, pfns: np.ndarray, cache: HeadCache, max_gap: int = KPAGEFLAGS_GAP
) -> np.ndarray:
    """The head PFN standing for each pfn (0: no page), or NO_HEAD where page_idle cannot tell."""
    valid = pfns != 0
    flags = np.full(len(pfns), KPF_NOPAGE, dtype=np.uint64)
    flags[valid] = read_entries(kpageflags, pfns[valid], max_gap, KPF_NOPAGE)
    trackable = valid & ((flags & np.uint64(KPF_LRU)) != 0)
    heads = np.where(trackable, pfns, np.uint64(NO_HEAD))
    tails = trackable & ((flags & np.uint64(KPF_COMPOUND_TAIL)) != 0)
    for i in np.flatnonzero(tails).tolist():
        head = find_head(kpageflags, int(pfns[i]), cache)
        heads[i] = head if head >= 0 else NO_HEAD
    return heads


def prepare_sample(
    addrs: np.ndarray,
    heads: np.ndarray,
    pagemap: int,
    kpageflags: int,
    bitmap: int,
    tails: dict[int, int],
    pagemap_gap: int = PAGEMAP_GAP,
    kpageflags_gap: int = KPAGEFLAGS_GAP,
    write_gap: int = BITMAP_WRITE_GAP,
) -> int:
    """Mark the (head) page of each address idle and fill heads (NO_HEAD: cannot tell).

    addrs are virtual, translated through the pagemap fd, or physical when
    pagemap is -1; tails are the spans of a HeadCache, learned and used.
    Returns how many addresses' pagemap entries were read (for physical
    addresses: how many there are); 0 when none was, the sign of a pagemap fd
    holding an old address space, and then nothing is marked; PFN_HIDDEN when
    pagemap shows present pages without their PFNs.
    """
    if pagemap >= 0:
        entries = read_entries(pagemap, addrs // np.uint64(KERNEL_PAGE), pagemap_gap, ALL_ONES)
        read = int(np.count_nonzero(entries != np.uint64(ALL_ONES)))
        entries[entries == np.uint64(ALL_ONES)] = 0
        present = (entries & np.uint64(PM_PRESENT)) != 0
        pfns = np.where(present, entries & np.uint64(PM_PFN_MASK), np.uint64(0))
        if not read:
            heads[:] = NO_HEAD
            return 0
        if np.any(present & (pfns == 0)):
            heads[:] = NO_HEAD
            return PFN_HIDDEN
    else:
        pfns = addrs // np.uint64(KERNEL_PAGE)
        read = len(addrs)
    heads[:] = heads_of(kpageflags, pfns, HeadCache(tails), kpageflags_gap)
    words, masks = word_masks(heads[heads != np.uint64(NO_HEAD)])
    write_words(bitmap, words, masks, write_gap)
    return read


def check_sample(
    heads: np.ndarray, accessed: np.ndarray, bitmap: int, read_gap: int = BITMAP_READ_GAP
) -> None:
    """Fill accessed: the head is trackable and no longer idle. The kernel clears the idle
    flag of an accessed page, or finds its accessed bit set when this read walks its rmap."""
    trackable = heads != np.uint64(NO_HEAD)
    known = heads[trackable]
    words, _ = word_masks(known)
    values = read_sorted(bitmap, words, read_gap, fill=ALL_ONES)
    accessed[:] = False
    accessed[trackable] = ~bits_of(known, words, values)


class SamplePath(NamedTuple):
    """One implementation of a sample: prepare_sample and check_sample, or _page_idle's."""

    name: str
    prepare: Callable[..., int]
    check: Callable[..., None]
    sampler: Callable[..., TargetSampler] | None = None
    """The engine's fast path (_page_idle.Sampler), where the path has one."""


PYTHON_PATH = SamplePath("python", prepare_sample, check_sample)
"""The reference (tested against the kernel, and the C path tested against it)."""


def _load_native() -> tuple[SamplePath | None, str]:
    """The C path, or None and why not (never raises: damond runs without it)."""
    try:
        from damond.monitor.ops import _page_idle as native
    except ImportError as e:
        return None, f"the C module is not built ({e})"
    differ = _native_differs(native)
    if differ:
        return None, f"the C module disagrees with page_idle.py on {differ}"

    return SamplePath("c", native.prepare, native.check, native.Sampler), ""


def _native_differs(native: ModuleType) -> str:
    """The constants the two paths must share, where they differ ('' when none)."""
    ours = {
        "NO_HEAD": NO_HEAD,
        "PFN_HIDDEN": PFN_HIDDEN,
        "KERNEL_PAGE": KERNEL_PAGE,
        "KPF_LRU": KPF_LRU,
        "KPF_COMPOUND_HEAD": KPF_COMPOUND_HEAD,
        "KPF_COMPOUND_TAIL": KPF_COMPOUND_TAIL,
        "KPF_NOPAGE": KPF_NOPAGE,
        "SAMPLE_PAGE": PAGE_SIZE,
        "STALE": STALE,
        "HIDDEN": HIDDEN,
        "MISSING": MISSING,
        "EXITED": EXITED,
    }
    return ", ".join(k for k, v in ours.items() if getattr(native, k, None) != v)


NATIVE_PATH, NATIVE_PROBLEM = _load_native()
"""The C path (None where it cannot be used, NATIVE_PROBLEM says why)."""
_said_python = False


def sample_path(native: bool | None) -> SamplePath:
    """The C path when native is None and it is there (else the Python one, logged once);
    native=True insists on C (RuntimeError without it), native=False takes Python."""
    global _said_python
    if native is False:
        return PYTHON_PATH
    if NATIVE_PATH is not None:
        return NATIVE_PATH
    if native:
        raise RuntimeError(f"page_idle: {NATIVE_PROBLEM}")
    if not _said_python:
        _said_python = True
        log.warning(
            "page_idle: %s; sampling in Python instead (several times the CPU per sample)",
            NATIVE_PROBLEM,
        )
    return PYTHON_PATH


# --- the access check -----------------------------------------------------------------------


class Prepared(NamedTuple):
    """What prepare() marked for one target, for check() to read back."""

    pid: int
    addrs: np.ndarray
    heads: np.ndarray
    """The PFN whose idle bit stands for each address (the head of its folio), or
    NO_HEAD where page_idle cannot tell, which counts as not accessed."""


def open_kernel_file(path: str, flags: int) -> int:
    """An fd of a root-only kernel file, with errors that say what is missing."""
    try:
        return os.open(path, flags | os.O_CLOEXEC)
    except PermissionError as e:
        raise PermissionError(
            e.errno, f"{e.strerror}: page_idle needs root (CAP_SYS_ADMIN)", path
        ) from e


class PageIdleAccess(ProcessHolder):
    """Access check through idle page tracking, for vaddr, fvaddr and paddr.

    A target with a pid (vaddr, fvaddr) has virtual sampling addresses,
    translated through its pinned /proc/PID/pagemap; the paddr target (pid -1)
    has physical ones. The pagemap fd of each process, kpageflags and the
    bitmap stay open while the check lives. ``native`` chooses the sample
    path (sample_path): by default the C one where it is built.
    """

    name = "page_idle"

    def __init__(
        self,
        processes: ProcessTable | None = None,
        seed: int | None = None,
        bitmap: str = BITMAP,
        native: bool | None = None,
    ) -> None:
        self.path = sample_path(native)
        super().__init__(processes)
        self._bitmap = open_kernel_file(bitmap, os.O_RDWR)
        try:
            self._kpageflags = open_kernel_file(KPAGEFLAGS, os.O_RDONLY)
        except BaseException:
            os.close(self._bitmap)
            raise
        self._prepared: dict[int, Prepared] = {}
        """By target index: one entry per target, whatever pids commits give it."""
        self._heads = HeadCache()
        self._prepares = 0

    def prepare(self, target: TargetConfig, addrs: np.ndarray) -> None:
        """Mark the (head) page of each address idle; remember which for check()."""
        addrs = np.ascontiguousarray(addrs, dtype=np.uint64)
        self._prepares += 1
        if self._prepares % HEAD_CACHE_PREPARES == 0:
            self._heads.clear()
        heads = np.empty(len(addrs), dtype=np.uint64)
        if target.pid < 0:
            self._prepare_through(None, addrs, heads)
        else:
            # not live(): a pagemap that reads nothing says the same, one poll less a sample
            self._prepare_virtual(self.processes.get(target.pid), addrs, heads)
        self._prepared[target.index] = Prepared(target.pid, addrs, heads)

    def check(self, target: TargetConfig, addrs: np.ndarray) -> np.ndarray:
        """Whether each sampled page was accessed since prepare() (not trackable: False)."""
        prepared = self._prepared.get(target.index)
        if (
            prepared is None
            or prepared.pid != target.pid
            or (prepared.addrs is not addrs and not np.array_equal(prepared.addrs, addrs))
        ):
            raise ValueError(f"page_idle: check() of target {target.index} without its prepare()")
        if target.pid >= 0:
            self.processes.live(target.pid)
        accessed = np.empty(len(addrs), dtype=bool)
        self.path.check(prepared.heads, accessed, self._bitmap, BITMAP_READ_GAP)
        return accessed

    def sampler(self, target: TargetConfig) -> TargetSampler | None:
        """The engine's fast path for target (ops/base.py): a _page_idle.Sampler, or None
        on the Python path (the reference has none).

        The sampler holds its own copies of the fds (a pagemap reopened for another
        target of the same process, or a commit dropping the process, cannot pull
        them from under it) and its own tail spans, forgotten every
        HEAD_CACHE_PREPARES of its prepares. TargetGone when the process has gone.
        """
        make = self.path.sampler
        if make is None:
            return None
        proc = self.processes.get(target.pid) if target.pid >= 0 else None
        fds = [os.dup(self._kpageflags), os.dup(self._bitmap), -1, -1]
        try:
            if proc is not None:
                with gone_when_missing(proc):
                    fds[2] = os.dup(proc.fd("pagemap"))
                fds[3] = os.dup(proc.pidfd)
            return make(
                *fds,
                {},
                functools.partial(_recover, proc),
                PAGEMAP_GAP,
                KPAGEFLAGS_GAP,
                BITMAP_WRITE_GAP,
                BITMAP_READ_GAP,
                HEAD_CACHE_PREPARES,
            )
        except BaseException:
            for fd in fds:
                if fd >= 0:
                    os.close(fd)
            raise

    def marked(self, target: TargetConfig) -> np.ndarray:
        """The heads the last prepare() of target marked (NO_HEAD: cannot tell): what
        the two sample paths are compared by (tests/vm)."""
        return self._prepared[target.index].heads.copy()

    def close(self) -> None:
        for attr in ("_bitmap", "_kpageflags"):
            fd = getattr(self, attr, -1)
            if fd >= 0:
                os.close(fd)
            setattr(self, attr, -1)
        self._prepared.clear()
        super().close()

    def _prepare_virtual(self, proc: TargetProcess, addrs: np.ndarray, heads: np.ndarray) -> None:
        """prepare through the pagemap; TargetGone when the process has gone meanwhile.

        A pagemap fd holds the address space it was opened on: after the
        target's execve it reads nothing, so it is opened again once.
        """
        read = self._prepare_through(proc, addrs, heads)
        if not read and len(addrs):
            if not proc.alive():
                raise TargetGone(proc.pid)
            reopen(proc, "pagemap")
            read = self._prepare_through(proc, addrs, heads)
        if read == PFN_HIDDEN:
            raise pfns_hidden()

    def _prepare_through(
        self, proc: TargetProcess | None, addrs: np.ndarray, heads: np.ndarray
    ) -> int:
        """One sample path call: through proc's pagemap, or of physical addresses (None)."""
        with gone_when_missing(proc):
            return self.path.prepare(
                addrs,
                heads,
                proc.fd("pagemap") if proc is not None else -1,
                self._kpageflags,
                self._bitmap,
                self._heads.spans,
                PAGEMAP_GAP,
                KPAGEFLAGS_GAP,
                BITMAP_WRITE_GAP,
            )


def _recover(proc: TargetProcess | None, status: int) -> int:
    """What a _page_idle.Sampler leaves to Python, as PageIdleAccess does it: a pagemap
    that read nothing is opened again once (a new fd of the sampler's own) when the
    process lives, or the process has gone (TargetGone); hidden PFNs need root."""
    if status == HIDDEN:
        raise pfns_hidden()
    if proc is None:
        raise RuntimeError(f"page_idle: a sampler of physical addresses reported {status}")
    if status == STALE and proc.alive():
        reopen(proc, "pagemap")
        with gone_when_missing(proc):
            return os.dup(proc.fd("pagemap"))
    raise TargetGone(proc.pid)


def reopen(proc: TargetProcess, name: str) -> None:
    """Drop the cached fd of a proc file so that the next use opens it anew.

    TargetProcess reopens only the files it reads whole (TargetProcess.read);
    pagemap is read in pieces, so this reaches for the same private step.
    """
    proc._forget(name, os.O_RDONLY)
