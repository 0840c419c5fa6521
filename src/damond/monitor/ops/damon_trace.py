"""Kernel DAMON's results as the kernel publishes them: the damon:damon_aggregated tracepoint.

The kernel's DAMON tells user space what it found in two ways only: DAMOS
schemes (a ``stat`` scheme's tried_regions, refreshed on request by a sysfs
command that polls in 100 ms steps and so cannot follow every aggregation)
and the ``damon_aggregated`` trace event, emitted once per region at the end
of every aggregation, with the region's exact count of accessed samples and
its age. damond reads the event (docs/benchmarks.md has both measured).

It reads it from a tracefs instance of its own (``instances/damond``): an
instance has its own ring buffer and event switches, so other tracing users
and damond never see or disturb each other's events. The buffer is read in
the kernel's binary page format (``per_cpu/cpuN/trace_pipe_raw``): no text
formatting in the kernel, and a run of records becomes rows of 32-bit words in
a handful of numpy calls, whatever its length. (Records one by one with
``struct`` were measured too: every field of every record becomes a Python
int, about 1.5 µs a record on the development host, where the numpy calls
for a whole page cost 25 µs; in the test guest a numpy call costs tens of µs,
so a page's worth of numpy calls is what to keep few.)

Ring buffer pages (kernel/trace/ring_buffer.c; tracefs describes them in
``events/header_page`` and ``events/header_event``)::

    u64 timestamp; local_t commit (data bytes; bit 31: events were lost before it)
    records: u32 header (type_len: 5 bits, time_delta: 27 bits), then
      type_len 1..28: data of type_len * 4 bytes
      type_len 0:     u32 length (of itself and the data), then the data
      29 padding (time_delta 0: the rest of the page), 30 time extend,
      31 absolute time stamp (both 8 bytes)

A record's time is the page's timestamp plus every time_delta and time
extend before it, in the instance's trace clock (``mono``: CLOCK_MONOTONIC).
"""

from __future__ import annotations

import errno
import functools
import logging
import os
import re
import struct
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

log = logging.getLogger(__name__)

TRACEFS = "/sys/kernel/tracing"
INSTANCE = "damond"
EVENT = "damon/damon_aggregated"
TRACE_CLOCK = "mono"
"""CLOCK_MONOTONIC, so that an event's time converts to CLOCK_REALTIME exactly."""

PADDING, TIME_EXTEND, TIME_STAMP = 29, 30, 31
TS_SHIFT = 27
TS_MSB = 0xF8 << 56
"""The high bits an absolute time stamp record leaves out (rb_fix_abs_ts)."""
MAX_SMALL_WORDS = 28
"""The longest record (in words) whose length fits its header's type_len."""
MISSED_EVENTS = 1 << 31
COMMIT_SIZE_MASK = (1 << 30) - 1
_PAGE_HEADER = struct.Struct("<Qq")
_WORD = struct.Struct("<I")
_RECORD_HEAD = struct.Struct("<II")

FIELDS: tuple[str, ...] = ("common_type", "common_pid", "target_id", "nr_regions", "start")
FIELDS += ("end", "nr_accesses", "age")
"""What damond reads of each damon_aggregated record, in the kernel's order."""
TRIED_INSTANCE = "damond-damos"
TRIED_EVENT = "damon/damos_before_apply"
TRIED_FIELDS: tuple[str, ...] = ("common_type", "common_pid", "scheme_idx", "target_idx")
TRIED_FIELDS += ("start", "end", "nr_accesses", "age")
"""What damond reads of each damos_before_apply record (Linux 6.12 has the event): a
region a DAMOS scheme is about to act on, with its scheme's and target's indices;
nr_accesses is the moving sum DAMOS compares (nr_accesses_bp / 10000), as in the sysfs
tried_regions."""
TRIED_BUFFER_KB = 256
"""Per CPU ring buffer of the tried regions' instance: a pass of a scheme over 1000
regions writes 56 KB, and the relay reads at every aggregation."""

_FIELD = re.compile(
    r"field:(?P<decl>[^;]*);\s*offset:(?P<offset>\d+);\s*size:(?P<size>\d+);"
    r"\s*signed:(?P<signed>\d);"
)


class TraceError(Exception):
    """tracefs is missing something damond needs, or refused a write."""


@dataclass(frozen=True)
class EventFormat:
    """Where the fields of one event's records are, from its tracefs ``format`` file."""

    event_id: int
    dtype: np.dtype
    """The record's fields damond reads, at their offsets; itemsize = the record's size
    in whole 32-bit words (what the ring buffer stores)."""

    @functools.cached_property
    def words(self) -> int:
        return int(self.dtype.itemsize // 4)

    @functools.cached_property
    def type_len(self) -> int:
        """The type_len of its records' headers: their length in words (0 when too long
        for it: the length then comes in a word of its own)."""
        return self.words if self.words <= MAX_SMALL_WORDS else 0

    @classmethod
    def parse(cls, text: str, fields: tuple[str, ...] = FIELDS) -> EventFormat:
        """From the text of ``events/SYSTEM/NAME/format``; TraceError when a field is missing."""
        found = re.search(r"^ID:\s*(\d+)", text, re.MULTILINE)
        if found is None:
            raise TraceError("the event's format has no ID")
        names, formats, offsets = [], [], []
        size_of_all = 0
        align = 4
        for m in _FIELD.finditer(text):
            name = m["decl"].split()[-1]
            offset, size = int(m["offset"]), int(m["size"])
            size_of_all = max(size_of_all, offset + size)
            if size in (1, 2, 4, 8):
                align = max(align, size)
            if name in fields and size in (1, 2, 4, 8):
                names.append(name)
                formats.append(f"<{'i' if m['signed'] == '1' else 'u'}{size}")
                offsets.append(offset)
        missing = set(fields) - set(names)
        if missing:
            raise TraceError(f"the event's format lacks {', '.join(sorted(missing))}")
        # the record is the kernel's struct, padded at its end to its widest field's
        # alignment (damos_before_apply: 52 bytes of fields, 56 of record)
        itemsize = -(-size_of_all // align) * align
        dtype = np.dtype(
            {"names": names, "formats": formats, "offsets": offsets, "itemsize": itemsize}
        )
        return cls(int(found[1]), dtype)


@dataclass(frozen=True)
class PageLayout:
    """Where a ring buffer page's data is (``events/header_page``), and the page's size."""

    data_offset: int = 16
    page_size: int = 4096

    @classmethod
    def parse(cls, header_page: str, page_size: int) -> PageLayout:
        m = re.search(r"field: char data;\s*offset:(\d+);", header_page)
        return cls(int(m[1]) if m else cls.data_offset, page_size)


@functools.cache
def _layout(dtype: np.dtype) -> dict[str, tuple[int, int]]:
    """Each field's (size, offset) in a record."""
    fields: dict[str, tuple[np.dtype, int]] = dict(dtype.fields or {})  # type: ignore[arg-type]
    return {name: (field[0].itemsize, field[1]) for name, field in fields.items()}


class Records:
    """Records of one event as rows of 32-bit words, read by field name.

    Rows are plain uint32, so taking, joining and filtering them are plain
    array copies (numpy copies a structured array field by field, about forty
    times slower: 1000 records in 2 µs as words, 80 µs as a structured
    array), and a field is a column, or a column of the rows seen as 64-bit
    words: basic slicing, never a structured view (whose safety checks alone
    cost tens of µs in the test guest).
    """

    __slots__ = ("dtype", "words")

    def __init__(self, words: np.ndarray, dtype: np.dtype) -> None:
        self.words = words
        """C-contiguous uint32, one row of dtype.itemsize / 4 words per record."""
        self.dtype = dtype

    @classmethod
    def empty(cls, dtype: np.dtype) -> Records:
        return cls(np.zeros((0, dtype.itemsize // 4), np.uint32), dtype)

    @classmethod
    def join(cls, parts: list[Records]) -> Records:
        if len(parts) == 1:
            return parts[0]
        return cls(np.concatenate([p.words for p in parts]), parts[0].dtype)

    def __len__(self) -> int:
        return len(self.words)

    def field(self, name: str) -> np.ndarray:
        """One field of every record (a view; 2-byte fields as their whole word)."""
        size, offset = _layout(self.dtype)[name]
        if size == 8 and offset % 8 == 0 and self.words.shape[1] % 2 == 0:
            return self.words.view(np.uint64)[:, offset // 8]
        if size == 8:
            low = self.words[:, offset // 4].astype(np.uint64)
            return low | (self.words[:, offset // 4 + 1].astype(np.uint64) << np.uint64(32))
        column = self.words[:, offset // 4]
        if size == 4:
            return column
        return (column >> (8 * (offset % 4))) & ((1 << (8 * size)) - 1)

    def span(self, fields: tuple[tuple[str, int], ...]) -> np.ndarray | None:
        """The words of fields (name, size in bytes) in every record, when the fields
        have those sizes and lie side by side in that order from a word's start (a view);
        None when they do not."""
        layout = _layout(self.dtype)
        first = at = layout[fields[0][0]][1]
        for name, size in fields:
            if layout[name] != (size, at) or size % 4:
                return None
            at += size
        return self.words[:, first // 4 : at // 4] if first % 4 == 0 else None

    def take(self, index: slice | np.ndarray) -> Records:
        """The records at index (a slice, a boolean mask or positions)."""
        if isinstance(index, slice):  # rows of C-contiguous rows are C-contiguous: a view
            return Records(self.words[index], self.dtype)
        return Records(np.ascontiguousarray(self.words[index]), self.dtype)


@dataclass(frozen=True)
class Events:
    """Records of one event read from the ring buffer: their times and their fields."""

    ts: np.ndarray
    """uint64 nanoseconds of the trace clock."""
    records: Records
    missed: bool = False
    """The kernel dropped events before these (the buffer was full): a gap."""

    @classmethod
    def empty(cls, fmt: EventFormat, missed: bool = False) -> Events:
        return cls(np.zeros(0, np.uint64), Records.empty(fmt.dtype), missed)

    @classmethod
    def join(cls, parts: list[Events], fmt: EventFormat, missed: bool = False) -> Events:
        parts = [p for p in parts if len(p.ts)]
        if not parts:
            return cls.empty(fmt, missed)
        ts = parts[0].ts if len(parts) == 1 else np.concatenate([p.ts for p in parts])
        return cls(ts, Records.join([p.records for p in parts]), missed)


DATA = 0
"""_entry's kind for a record (of any event)."""


def _entry(page: bytes, pos: int, end: int) -> tuple[int, int, int] | None:
    """(kind, length, time) of the ring buffer entry at pos: DATA with its time delta,
    PADDING (time 0), TIME_EXTEND with its delta or TIME_STAMP with its absolute time;
    None at the end of the page's data (or of what can be read of it)."""
    if pos + 4 > end:
        return None
    header = _WORD.unpack_from(page, pos)[0]
    type_len, delta = header & 31, header >> 5
    if type_len == PADDING:
        if delta == 0 or pos + 8 > end:
            return None  # the rest of the page is padding
        return PADDING, _WORD.unpack_from(page, pos + 4)[0] + 4, 0
    if type_len in (TIME_EXTEND, TIME_STAMP):
        if pos + 8 > end:
            return None
        return type_len, 8, (_WORD.unpack_from(page, pos + 4)[0] << TS_SHIFT) + delta
    if type_len:
        size = type_len * 4 + 4
    elif pos + 8 <= end:
        size = _WORD.unpack_from(page, pos + 4)[0] + 4
    else:
        return None
    if size < 8 or pos + size > end:
        return None  # a torn record: never in a committed page
    return DATA, size, delta


def _run(rows: np.ndarray, ts: int, fmt: EventFormat) -> Events:
    """The leading run of fmt's records among rows (each a whole ring buffer record cut at
    fmt's length, header first): every row is checked (a record of another event of the
    same length would not shift the rows after it)."""
    n = len(rows)
    mine = ((rows[:, 0] & 31) == fmt.type_len) & ((rows[:, 1] & 0xFFFF) == fmt.event_id)
    count = n if mine.all() else int(np.argmin(mine))
    times = np.cumsum(rows[:count, 0] >> 5, dtype=np.uint64)
    times += np.uint64(ts)
    return Events(times, Records(np.ascontiguousarray(rows[:count, 1:]), fmt.dtype))


def parse_page(page: bytes, fmt: EventFormat, layout: PageLayout = PageLayout()) -> Events:
    """The records of fmt's event in one page read from trace_pipe_raw.

    An aggregation's burst writes runs of its records, each taken in one go;
    between runs, time extends, padding and records of other events are
    stepped over one at a time.
    """
    base_ts, commit = _PAGE_HEADER.unpack_from(page, 0)
    pos = layout.data_offset
    end = min(pos + (commit & COMMIT_SIZE_MASK), len(page))
    length = fmt.type_len * 4 + 4
    parts: list[Events] = []
    ts = base_ts
    while (entry := _entry(page, pos, end)) is not None:
        kind, size, time = entry
        if kind == DATA and fmt.type_len and pos + length <= end and _valid(page, pos, fmt):
            count = (end - pos) // length
            rows = np.frombuffer(page, "<u4", count * length // 4, pos).reshape(count, -1)
            run = _run(rows, ts, fmt)
            if len(run.ts):
                parts.append(run)
                ts = int(run.ts[-1])
                pos += len(run.ts) * length
                continue
        ts = _absolute(time, ts) if kind == TIME_STAMP else ts + time
        pos += size
    return Events.join(parts, fmt, bool(commit & MISSED_EVENTS))


@dataclass(frozen=True)
class _Segment:
    """A run of fmt's records in one page, and where its time starts."""

    data: bytes
    count: int
    base: int | None
    """The time before its first record: a page's timestamp (or an absolute time stamp);
    None: where the segment before it (in the same page) ended."""
    offset: int
    """Time added since base (or since that end) by what came in between."""


def _valid(page: bytes, pos: int, fmt: EventFormat) -> bool:
    header, event = _RECORD_HEAD.unpack_from(page, pos)
    return header & 31 == fmt.type_len and event & 0xFFFF == fmt.event_id


def _extent(page: bytes, pos: int, end: int, fmt: EventFormat) -> int:
    """How many of fmt's records run from pos, the one at pos being one: all that fit
    when the last does, else found by bisection (a record out of the run's stride, after
    padding or a time extend, makes every later slot read as garbage)."""
    length = fmt.type_len * 4 + 4
    n = (end - pos) // length
    if _valid(page, pos + (n - 1) * length, fmt):
        return n
    good, bad = 0, n - 1
    while bad - good > 1:
        mid = (good + bad) // 2
        if _valid(page, pos + mid * length, fmt):
            good = mid
        else:
            bad = mid
    return good + 1


def _segments(pages: list[bytes], fmt: EventFormat, layout: PageLayout) -> list[_Segment]:
    """Every run of fmt's records in pages, found by reading headers only at the edges."""
    length = fmt.type_len * 4 + 4
    found: list[_Segment] = []
    for page in pages:
        base, commit = _PAGE_HEADER.unpack_from(page, 0)
        pos = layout.data_offset
        end = min(pos + (commit & COMMIT_SIZE_MASK), len(page))
        anchor: int | None = base
        offset = 0
        while (entry := _entry(page, pos, end)) is not None:
            kind, size, time = entry
            if kind == TIME_STAMP:
                raise _NeedsWalk  # rare (absolute stamps): leave it to parse_page
            if kind == DATA and pos + length <= end and _valid(page, pos, fmt):
                count = _extent(page, pos, end, fmt)
                found.append(_Segment(page[pos : pos + count * length], count, anchor, offset))
                anchor, offset = None, 0
                pos += count * length
                continue
            offset += time  # a time extend, or a record of another event: its time counts
            pos += size
    return found


class _NeedsWalk(Exception):
    """Pages the joined parse does not handle: parse them one by one."""


def parse_pages(pages: list[bytes], fmt: EventFormat, layout: PageLayout = PageLayout()) -> Events:
    """The records of fmt's event in pages read from trace_pipe_raw, in the pages' order.

    The runs of records are found by reading a few headers per run (struct),
    then joined and taken in one numpy pass, whatever their number: numpy
    calls are what costs, so they are spent once per read rather than per page
    or per run. Whatever that pass does not vouch for is parsed page by page.
    """
    missed = any(_PAGE_HEADER.unpack_from(p, 0)[1] & MISSED_EVENTS for p in pages)
    try:
        segments = _segments(pages, fmt, layout) if fmt.type_len else None
    except _NeedsWalk:
        segments = None
    if not segments:
        if segments is not None:
            return Events.empty(fmt, missed)
        return Events.join([parse_page(p, fmt, layout) for p in pages], fmt, missed)
    length = fmt.type_len * 4 + 4
    rows = np.frombuffer(b"".join(s.data for s in segments), "<u4").reshape(-1, length // 4)
    mine = ((rows[:, 0] & 31) == fmt.type_len) & ((rows[:, 1] & 0xFFFF) == fmt.event_id)
    if not mine.all():
        return Events.join([parse_page(p, fmt, layout) for p in pages], fmt, missed)
    sums = np.cumsum(rows[:, 0] >> 5, dtype=np.uint64)
    ends = sums[np.cumsum([s.count for s in segments]) - 1].tolist()
    adds, before, end = [], 0, 0
    for segment, after in zip(segments, ends, strict=True):
        start = (segment.base if segment.base is not None else end) + segment.offset
        adds.append(start - before)  # record times: sums + this, within the segment
        end = start + after - before
        before = after
    times = sums + np.repeat(np.array(adds, dtype=np.uint64), [s.count for s in segments])
    return Events(times, Records(np.ascontiguousarray(rows[:, 1:]), fmt.dtype), missed)


def _load_native() -> tuple[Callable[..., tuple[bytearray, bytearray, int, bool]] | None, str]:
    """_damon_trace.parse, or None and why not (damond parses in Python without it)."""
    try:
        from damond.monitor.ops import _damon_trace
    except ImportError as e:
        return None, f"the C module is not built ({e})"
    return _damon_trace.parse, ""


NATIVE_PARSE, NO_NATIVE_PARSE = _load_native()
"""_damon_trace.parse (the same records as parse_pages, in one C call), or None and why."""


def parse_pages_native(
    pages: list[bytes], fmt: EventFormat, layout: PageLayout = PageLayout()
) -> Events:
    """parse_pages in one C call and two numpy ones (fmt's records of 1 to 28 words)."""
    assert NATIVE_PARSE is not None, NO_NATIVE_PARSE
    times, rows, count, missed = NATIVE_PARSE(pages, fmt.event_id, fmt.type_len, layout.data_offset)
    words = np.frombuffer(rows, np.uint32).reshape(count, fmt.type_len)
    return Events(np.frombuffer(times, np.uint64), Records(words, fmt.dtype), missed)


def _absolute(stamp: int, previous: int) -> int:
    """An absolute time stamp record's time: it leaves out the top bits (rb_fix_abs_ts)."""
    if previous & TS_MSB:
        stamp |= previous & TS_MSB
        if stamp < previous:
            stamp += 1 << 59
    return stamp


def probe(tracefs: str = TRACEFS) -> str:
    """'' when tracefs has what damond needs (instances, the event), else why not. Reads only."""
    if not os.path.isdir(f"{tracefs}/instances"):
        return f"tracefs is not mounted at {tracefs} (needed to read kernel DAMON's results)"
    if not os.path.exists(f"{tracefs}/events/{EVENT}/format"):
        return (
            f"the kernel has no {EVENT.replace('/', ':')} trace event "
            f"({tracefs}/events/{EVENT} missing: CONFIG_DAMON with CONFIG_FTRACE)"
        )
    if not os.access(f"{tracefs}/instances", os.W_OK):
        return f"{tracefs}/instances is not writable (needs root)"
    return ""


class TraceInstance:
    """A tracefs instance of damond's: its own ring buffer with one event enabled
    (damon_aggregated; a second instance has damos_before_apply, so that each buffer
    holds one kind of record and is read in whole runs)."""

    def __init__(
        self,
        tracefs: str = TRACEFS,
        name: str = INSTANCE,
        event: str = EVENT,
        fields: tuple[str, ...] = FIELDS,
        buffer_kb: int | None = None,
    ) -> None:
        self.tracefs = tracefs
        self.name = name
        self.path = f"{tracefs}/instances/{name}"
        self.event = event
        self.fields = fields
        self.buffer_kb = buffer_kb
        """Its per CPU buffer size; None: tracefs's default."""
        self.format: EventFormat | None = None
        self.layout = PageLayout()

    def exists(self) -> bool:
        return os.path.isdir(self.path)

    def kernel_has_event(self) -> bool:
        return os.path.exists(f"{self.tracefs}/events/{self.event}/format")

    def create(self) -> None:
        """Make the instance (or take back damond's own from before a crash) and enable
        the event; TraceError naming the file the kernel refused."""
        try:
            os.mkdir(self.path)
        except FileExistsError:
            pass
        except OSError as e:
            raise TraceError(f"cannot create {self.path}: {e.strerror}") from None
        self._write("events/enable", "0")
        self._write("trace_clock", TRACE_CLOCK)
        if os.path.exists(f"{self.path}/buffer_percent"):
            self._write("buffer_percent", "0")  # wake the reader at the first event, not half full
        if self.buffer_kb is not None:
            self._write("buffer_size_kb", str(self.buffer_kb))
        self.clear()
        self._write(f"events/{self.event}/enable", "1")
        self._write("tracing_on", "1")
        self.format = EventFormat.parse(self._read(f"events/{self.event}/format"), self.fields)
        self.layout = PageLayout.parse(self._read_top("events/header_page"), self._page_size())
        if NATIVE_PARSE is None:
            log.warning("%s: its pages are parsed in Python: %s", self.path, NO_NATIVE_PARSE)

    def clear(self) -> None:
        """Empty the buffer (what a previous damond left in it)."""
        try:
            os.close(os.open(f"{self.path}/trace", os.O_WRONLY | os.O_TRUNC | os.O_CLOEXEC))
        except OSError as e:
            raise TraceError(f"cannot clear {self.path}/trace: {e.strerror}") from None

    def open_pipes(self) -> list[int]:
        """A non-blocking trace_pipe_raw fd for each CPU's buffer (the caller closes them)."""
        fds = []
        cpus = sorted(
            (d for d in os.listdir(f"{self.path}/per_cpu") if d.startswith("cpu")),
            key=lambda d: int(d[3:]),
        )
        try:
            for cpu in cpus:
                fds.append(
                    os.open(
                        f"{self.path}/per_cpu/{cpu}/trace_pipe_raw",
                        os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC,
                    )
                )
        except OSError:
            for fd in fds:
                os.close(fd)
            raise
        return fds

    def parse(self, pages: list[bytes]) -> Events:
        """The records of its event in pages read from this instance."""
        assert self.format is not None, "create() first"
        if NATIVE_PARSE is not None and self.format.type_len:
            return parse_pages_native(pages, self.format, self.layout)
        return parse_pages(pages, self.format, self.layout)

    def read_pipe(self, fd: int) -> list[bytes]:
        """Every page waiting in one CPU's buffer (a page read may hold only its rest:
        the reader had taken its beginning before); [] when it is empty."""
        found = []
        while True:
            try:
                page = os.read(fd, self.layout.page_size)
            except BlockingIOError:
                break
            except OSError as e:
                if e.errno == errno.EINTR:
                    continue
                raise
            if not page:
                break
            found.append(page)
        return found

    def remove(self) -> None:
        """Disable the event and remove the instance (its readers must be closed first)."""
        self.format = None
        if not self.exists():
            return
        try:
            self._write("events/enable", "0")
            os.rmdir(self.path)
        except (OSError, TraceError) as e:
            raise TraceError(f"cannot remove {self.path}: {e}") from None

    def _page_size(self) -> int:
        try:
            return int(self._read("buffer_subbuf_size_kb")) * 1024
        except (OSError, ValueError):
            return os.sysconf("SC_PAGE_SIZE")  # before sub-buffers (6.8): one page

    def _read(self, name: str) -> str:
        with open(f"{self.path}/{name}") as f:
            return f.read()

    def _read_top(self, name: str) -> str:
        with open(f"{self.tracefs}/{name}") as f:
            return f.read()

    def _write(self, name: str, value: str) -> None:
        try:
            with open(f"{self.path}/{name}", "w") as f:
                f.write(value)
        except OSError as e:
            raise TraceError(f"writing {value!r} to {self.path}/{name}: {e.strerror}") from None
