"""Runs INSIDE the test guest: damond against a real kernel, next to the kernel's own DAMON.

    python tests/vm/scenarios.py SCENARIO OUT.json [--access-check auto]
    python tests/vm/scenarios.py workload [--size-mib 64 --hot-mib 32 ...]

SCENARIO is one of SCENARIOS below. Each one starts a real dbus-daemon (a
private bus), the real daemon (``python -m damond --bus ADDRESS``), real
workload processes (``scenarios.py workload``) and drives them with busctl or
dbus-fast, then runs the guest kernel's DAMON (tests/vm/kernel_damon.py) over
the same workload where there is a kernel counterpart, one after the other:
the two would disturb each other's access bits (kernel DAMON marks the pages
it samples idle; page_idle users clear the young bits DAMON looks at).

This script only measures: it writes what it saw to OUT.json (after every
phase, so a timeout leaves the finished phases) and tests/vm/test_scenarios.py
on the host decides. An exception in a phase is recorded as that phase's
``error`` and the next phase still runs.

The workload (``scenarios.py workload``) maps one anonymous buffer (one
mapping, MADV_NOHUGEPAGE or MADV_HUGEPAGE), writes every page once, prints one
JSON line (pid, buffer and hot ranges), then writes one byte per page of its
hot range on every pass, then flushes its TLB (see flush_tlb: under QEMU TCG
nothing else would, and no access would ever be seen again after the first
mark), waiting ``--pause-ms`` for a command on stdin between passes. Commands
(one line each, a JSON line answers): ``move OFFSET_MIB``, ``map ADDR MIB``
(ADDR 0: anywhere), ``unmap``, ``stats``, ``quit``.

Time is counted as DAMON counts it: see AGGREGATIONS.

Refuses to run outside the damond test guest: it writes the kernel's DAMON sysfs.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import json
import mmap
import os
import re
import select
import signal
import subprocess
import sys
import time
import traceback
from collections.abc import (
    AsyncIterator,
    Awaitable,
    Callable,
    Coroutine,
    Iterable,
    Mapping,
    Sequence,
)
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import kernel_damon  # noqa: E402  (tests/vm/kernel_damon.py)
from guest_json import outside_guest  # noqa: E402  (tests/vm/guest_json.py)

PAGE = 4096
MIB = 1 << 20
HUGE = 2 * MIB
BUS_NAME = "org.damond1"
ROOT = "/org/damond1"
K0 = f"{ROOT}/kdamonds/0"
C0 = f"{K0}/contexts/0"
T0 = f"{C0}/targets/0"
DEFAULTS = kernel_damon.KAttrs()
"""The default intervals and region bounds, the same for damond and the kernel."""
MONITOR_SECONDS = 2.0
"""How long each monitor watches a workload before its result is read."""
AGGREGATIONS = int(MONITOR_SECONDS * 1e6) // DEFAULTS.aggr_us
"""MONITOR_SECONDS in DAMON's own clock: aggregations of aggr_us / sample_us samples.
The kernel's kdamond takes them in MONITOR_SECONDS; guest Python is slower than
sample_us per sample, so damond's results are read after this many aggregations
(and, for the record, also at MONITOR_SECONDS of wall time)."""
LAST = 5
"""Verdicts are the mean of the last LAST aggregations up to MONITOR_SECONDS."""
WINDOW_TIMEOUT_S = 300.0
"""Give up on a monitoring window after this long (damond takes 400 samples in 5-25 s)."""
SNAPSHOT_TIMEOUT_S = 60.0
"""Give up when no snapshot comes for this long (an aggregation takes well under 2 s):
the kdamond has stalled (its stacks are in the daemon's log after the phase)."""
WORKLOAD_PAUSE_MS = 5.0
"""The workload's pause between passes: it leaves the one vCPU to the monitor part of
the time, and still writes each hot page every few milliseconds."""
USER_BACKEND_ONLY = ("--kernel-damon-admin", "off")
"""The scenarios compare damond's own engine with the kernel's DAMON, which they drive
themselves (kernel_damon.py): the daemon must leave the kernel's admin tree alone."""
DAEMON_START_TIMEOUT = 120.0
"""Guest Python imports numpy, dbus-fast and damond over 9p under TCG: seconds."""

MADV_HUGEPAGE = 14
MADV_NOHUGEPAGE = 15
MAP_FIXED_NOREPLACE = 0x100000
PFN_MASK = (1 << 55) - 1
PAGE_PRESENT = 1 << 63


def realtime_us() -> int:
    """CLOCK_REALTIME in µs: the clock of damond's snapshot timestamps."""
    return time.clock_gettime_ns(time.CLOCK_REALTIME) // 1000


# ---------------------------------------------------------------------------------------------
# The workload process
# ---------------------------------------------------------------------------------------------

GUARD = 64 * MIB
"""Never-accessible reservations (PROT_NONE, nothing ever present) on both sides of the
buffer. Without them the buffer's neighbours are whatever the interpreter and its
libraries mapped there (glibc arenas, numpy's buffers, library pages that other
processes run too), and the region that straddles the buffer's cold end and that
memory gets nr_accesses > 0 whenever one of its pages is touched: in one guest run
the cold half's share fell from 100 % to 0 % for an aggregation that way (a direct
page_idle check of the cold half itself saw 0 of 30,000 samples accessed). The
scenario is about the buffer; the guards make its surroundings known to be idle,
for damond and the kernel's DAMON alike."""
MAP_FIXED = 0x10
PROT_NONE = 0


def _map_buffer(length: int, thp: bool) -> int:
    """One anonymous mapping between two GUARD reservations; with thp, 2 MiB aligned and
    MADV_HUGEPAGE (else MADV_NOHUGEPAGE)."""
    from damond.tools.workload import check_errno, libc, map_anonymous

    align = HUGE if thp else PAGE
    reserved = map_anonymous(length + 2 * GUARD + align, prot=PROT_NONE)
    base = -(-(reserved + GUARD) // align) * align
    map_anonymous(length, base, MAP_FIXED)
    advice = MADV_HUGEPAGE if thp else MADV_NOHUGEPAGE
    check_errno(libc.madvise(base, length, advice) == 0, f"madvise({advice})")
    return base


TLB_SCRATCH_PAGES = 64
"""More than the kernel's tlb_single_page_flush_ceiling (33): changing the protection
of that many pages makes it flush the whole local TLB instead of page by page."""


def flush_tlb(scratch: int) -> None:
    """Flush this CPU's TLB: write-protect and unprotect a populated scratch mapping.

    Under QEMU TCG the guest's software TLB is direct mapped and grows to millions of
    entries; it is flushed only by CR3 writes and INVLPG. A process alone on the CPU
    (switching only to kernel threads and idle, which keep its mm) therefore keeps
    every translation cached, and the CPU sets the accessed bit again (after DAMON
    or page_idle cleared it; neither flushes) only when an entry happens to be
    evicted. Measured with kernel DAMON on the 32 MiB written half: nr_accesses 0
    to 2 of 20 without this flush (0 in one run of three), 18 to 20 with it. On
    real hardware a 32 MiB working set (8192 pages) evicts a TLB of a few thousand
    entries within every pass; one flush per pass stands in for that capacity.
    """
    from damond.tools.workload import libc

    length = TLB_SCRATCH_PAGES * PAGE
    libc.mprotect(scratch, length, mmap.PROT_READ)
    libc.mprotect(scratch, length, mmap.PROT_READ | mmap.PROT_WRITE)


def workload_main(argv: Sequence[str]) -> int:
    """The workload process (see the module docstring)."""
    from damond.tools.workload import libc, map_anonymous, view

    parser = argparse.ArgumentParser(prog="scenarios.py workload")
    parser.add_argument("--size-mib", type=int, default=64)
    parser.add_argument("--hot-mib", type=int, default=32)
    parser.add_argument("--hot-offset-mib", type=int, default=0)
    parser.add_argument("--thp", action="store_true", help="MADV_HUGEPAGE (else NOHUGEPAGE)")
    parser.add_argument("--pause-ms", type=float, default=WORKLOAD_PAUSE_MS)
    parser.add_argument(
        "--no-tlb-flush", action="store_true", help="do not flush the TLB after each pass"
    )
    args = parser.parse_args(argv)
    size = args.size_mib * MIB
    start = _map_buffer(size, args.thp)
    buf = view(start, size)
    buf[::PAGE] = 1  # every page resident
    hot = [args.hot_offset_mib * MIB, (args.hot_offset_mib + args.hot_mib) * MIB]
    extra: list[tuple[int, int, Any]] = []  # (start, end, view) of mappings made by `map`
    scratch = map_anonymous(TLB_SCRATCH_PAGES * PAGE)
    view(scratch, TLB_SCRATCH_PAGES * PAGE)[::PAGE] = 1
    passes = 0

    def reply(obj: dict[str, Any]) -> None:
        sys.stdout.write(json.dumps(obj) + "\n")
        sys.stdout.flush()

    reply(
        {
            "pid": os.getpid(),
            "start": start,
            "end": start + size,
            "hot": [start + hot[0], start + hot[1]],
            "thp": args.thp,
            "pause_ms": args.pause_ms,
        }
    )

    def handle(line: str) -> bool:
        words = line.split()
        if not words:
            return True
        cmd = words[0]
        if cmd == "move":
            offset = int(words[1]) * MIB
            hot[0], hot[1] = offset, offset + args.hot_mib * MIB
            reply({"hot": [start + hot[0], start + hot[1]], "t_us": realtime_us()})
        elif cmd == "map":
            addr, length = int(words[1]), int(words[2]) * MIB
            flags = MAP_FIXED_NOREPLACE if addr else 0
            base = map_anonymous(length, addr, flags)
            libc.madvise(base, length, MADV_NOHUGEPAGE)
            v = view(base, length)
            v[::PAGE] = 1
            extra.append((base, base + length, v))
            reply({"mapping": [base, base + length], "t_us": realtime_us()})
        elif cmd == "unmap":
            base, end, v = extra.pop()
            del v
            libc.munmap(base, end - base)
            reply({"unmapped": [base, end], "t_us": realtime_us()})
        elif cmd == "stats":
            reply({"passes": passes, "t_us": realtime_us()})
        elif cmd == "quit":
            reply({"passes": passes})
            return False
        else:
            reply({"error": f"unknown command {line!r}"})
        return True

    pending = b""
    value = 1
    pause = args.pause_ms / 1000
    stdin = sys.stdin.fileno()
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    while True:
        value = value % 255 + 1
        buf[hot[0] : hot[1] : PAGE] = value
        for _, _, v in extra:
            v[::PAGE] = value
        if not args.no_tlb_flush:
            flush_tlb(scratch)
        passes += 1
        readable, _, _ = select.select([stdin], [], [], pause)
        if not readable:
            continue
        chunk = os.read(stdin, 4096)
        if not chunk:
            return 0
        pending += chunk
        while b"\n" in pending:
            line, pending = pending.split(b"\n", 1)
            if not handle(line.decode()):
                return 0


class Workload:
    """A workload process and its command pipe (blocking: every command answers at once)."""

    def __init__(self, *args: str) -> None:
        self.process = subprocess.Popen(
            [sys.executable, str(Path(__file__).resolve()), "workload", *args],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        self.info: dict[str, Any] = self._read()
        self.pid: int = self.info["pid"]
        self.start: int = self.info["start"]
        self.end: int = self.info["end"]
        self.hot: tuple[int, int] = tuple(self.info["hot"])

    def _read(self) -> dict[str, Any]:
        assert self.process.stdout is not None
        line = self.process.stdout.readline()
        if not line:
            raise RuntimeError(f"workload exited ({self.process.wait()}) without answering")
        answer: dict[str, Any] = json.loads(line)
        if "error" in answer:
            raise RuntimeError(f"workload: {answer['error']}")
        return answer

    def command(self, text: str) -> dict[str, Any]:
        assert self.process.stdin is not None
        self.process.stdin.write(text + "\n")
        self.process.stdin.flush()
        return self._read()

    def cold(self) -> list[tuple[int, int]]:
        """The buffer minus the hot range."""
        out = []
        if self.start < self.hot[0]:
            out.append((self.start, self.hot[0]))
        if self.hot[1] < self.end:
            out.append((self.hot[1], self.end))
        return out

    def stop(self) -> None:
        if self.process.poll() is None:
            with contextlib.suppress(OSError, RuntimeError, ValueError):
                self.command("quit")
            try:
                self.process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        for f in (self.process.stdin, self.process.stdout):
            if f is not None:
                with contextlib.suppress(OSError):
                    f.close()


def anon_huge_kb(pid: int, lo: int, hi: int) -> int:
    """AnonHugePages (kB) of the mappings of pid that overlap [lo, hi), from smaps."""
    total = 0
    inside = False
    with open(f"/proc/{pid}/smaps") as f:
        for line in f:
            head = re.match(r"([0-9a-f]+)-([0-9a-f]+) ", line)
            if head:
                start, end = int(head[1], 16), int(head[2], 16)
                inside = start < hi and lo < end
            elif inside and line.startswith("AnonHugePages:"):
                total += int(line.split()[1])
    return total


def pfns_of(pid: int, lo: int, hi: int) -> list[int]:
    """The PFN of each page of [lo, hi) of pid (0 when not present), from pagemap."""
    import numpy as np

    npages = (hi - lo) // PAGE
    with open(f"/proc/{pid}/pagemap", "rb", buffering=0) as f:
        raw = os.pread(f.fileno(), npages * 8, lo // PAGE * 8)
    entries = np.frombuffer(raw, dtype=np.uint64)
    present = (entries & np.uint64(PAGE_PRESENT)) != 0
    pfns = np.where(present, entries & np.uint64(PFN_MASK), 0)
    return [int(p) for p in pfns.tolist()]


# ---------------------------------------------------------------------------------------------
# Reading monitoring results
# ---------------------------------------------------------------------------------------------

Region = tuple[int, int, int, int]
"""(start, end, nr_accesses, age), as in damond's snapshots."""


def share(regions: Iterable[Region], ranges: Iterable[tuple[int, int]], accessed: bool) -> float:
    """Fraction of the bytes of ranges inside regions with nr_accesses > 0 (accessed) or == 0.

    Bytes no region covers count against the share.
    """
    ranges = list(ranges)
    total = sum(hi - lo for lo, hi in ranges)
    hit = 0
    for start, end, nr, _age in regions:
        if (nr > 0) != accessed:
            continue
        for lo, hi in ranges:
            hit += max(0, min(end, hi) - max(start, lo))
    return hit / total if total else 0.0


def coverage(regions: Iterable[Region], lo: int, hi: int) -> float:
    """Fraction of [lo, hi) inside any region."""
    covered = sum(max(0, min(end, hi) - max(start, lo)) for start, end, _, _ in regions)
    return covered / (hi - lo)


def overlapping(regions: Iterable[Region], lo: int, hi: int) -> list[Region]:
    return [r for r in regions if r[0] < hi and lo < r[1]]


def page_shares(regions: Sequence[Region], pfns: Sequence[int]) -> tuple[float, float, int]:
    """Physical pages: (share in regions with nr > 0, share in regions with nr == 0, uncovered)."""
    import numpy as np

    if not pfns:
        return 0.0, 0.0, 0
    starts = np.array([r[0] for r in regions], dtype=np.uint64)
    ends = np.array([r[1] for r in regions], dtype=np.uint64)
    nrs = np.array([r[2] for r in regions], dtype=np.int64)
    addrs = np.array(pfns, dtype=np.uint64) * np.uint64(PAGE)
    idx = np.searchsorted(starts, addrs, side="right") - 1
    ok = (idx >= 0) & (addrs < ends[np.clip(idx, 0, None)])
    nr = np.where(ok, nrs[np.clip(idx, 0, None)], -1)
    n = len(pfns)
    return float((nr > 0).sum() / n), float((nr == 0).sum() / n), int((~ok).sum())


def classify(regions: Sequence[Region], wl: Workload) -> dict[str, Any]:
    """The hot/cold verdict of one set of regions over the workload's buffer."""
    hot = [wl.hot]
    cold = wl.cold()
    inside = overlapping(regions, wl.start, wl.end)
    hot_nr = [r[2] for r in overlapping(regions, *wl.hot)]
    cold_nr = [nr for lo, hi in cold for nr in (r[2] for r in overlapping(regions, lo, hi))]
    return {
        "hot_accessed_share": round(share(regions, hot, accessed=True), 4),
        "cold_idle_share": round(share(regions, cold, accessed=False), 4),
        "buffer_coverage": round(coverage(regions, wl.start, wl.end), 4),
        "nr_regions": len(regions),
        "nr_regions_over_buffer": len(inside),
        "hot_nr_accesses": [min(hot_nr, default=0), max(hot_nr, default=0)],
        "cold_nr_accesses": [min(cold_nr, default=0), max(cold_nr, default=0)],
        "regions_over_buffer": [[r[0] - wl.start, r[1] - wl.start, r[2], r[3]] for r in inside],
    }


@dataclass
class Snap:
    """One damond snapshot of target 0."""

    seq: int
    timestamp_us: int
    max_nr_accesses: int
    regions: list[Region]

    @classmethod
    def from_body(cls, body: Sequence[Any]) -> Snap:
        seq, ts, max_nr, targets = body
        regions = [tuple(int(x) for x in r) for r in targets[0][2]] if targets else []
        return cls(int(seq), int(ts), int(max_nr), regions)  # type: ignore[arg-type]


# ---------------------------------------------------------------------------------------------
# damond on a private bus
# ---------------------------------------------------------------------------------------------


@dataclass
class Daemon:
    """A private dbus-daemon, damond on it, and a dbus-fast client; busctl for the walkthrough."""

    bus: Any
    process: subprocess.Popen[bytes]
    client: Any
    log_path: Path
    handlers: list[Callable[[Any], None]] = field(default_factory=list)
    hang_report: list[dict[str, str]] | None = None
    """Its threads' states when it did not stop on SIGTERM (see threads_report)."""

    @classmethod
    async def start(cls, workdir: Path, args: Sequence[str] = USER_BACKEND_ONLY) -> Daemon:
        from damond.tools import client
        from damond.tools.privatebus import spawn_daemon, start_private_bus, wait_for_name

        bus = start_private_bus()
        log_path = workdir / "damond.log"
        # faulthandler: a SIGABRT (sent when it does not stop) dumps every thread's stack
        process = spawn_daemon(bus.address, log_path, *args, env={"PYTHONFAULTHANDLER": "1"})
        conn = await client.connect(bus.address)
        daemon = cls(bus, process, conn, log_path)
        try:
            await wait_for_name(conn, BUS_NAME, DAEMON_START_TIMEOUT)
        except TimeoutError:
            await daemon.stop()
            raise RuntimeError(f"damond did not own {BUS_NAME}:\n{daemon.log()}") from None
        return daemon

    @property
    def address(self) -> str:
        return str(self.bus.address)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def busctl(self, *args: str) -> str:
        out = subprocess.run(
            ["busctl", f"--address={self.address}", *args],
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
        if out.returncode != 0:
            raise RuntimeError(f"busctl {' '.join(args)}: {out.stderr.strip()}")
        return out.stdout

    def busctl_set(self, path: str, iface: str, name: str, sig: str, value: object) -> None:
        self.busctl("set-property", BUS_NAME, path, iface, name, sig, str(value))

    def busctl_get(self, path: str, iface: str, name: str) -> Any:
        out = self.busctl("--json=short", "get-property", BUS_NAME, path, iface, name)
        return json.loads(out)["data"]

    def busctl_snapshot(self) -> Snap:
        out = self.busctl(
            "--json=short", "call", BUS_NAME, C0, "org.damond1.Context", "GetSnapshot"
        )
        return Snap.from_body(json.loads(out)["data"])

    async def set(self, path: str, iface: str, name: str, sig: str, value: Any) -> None:
        from damond.tools import client

        await client.set_property(self.client, path, iface, name, sig, value)

    async def get(self, path: str, iface: str, name: str) -> Any:
        from damond.tools import client

        return await client.get_property(self.client, path, iface, name)

    async def snapshot(self) -> Snap:
        from damond.tools import client

        body = await client.call(self.client, C0, "org.damond1.Context", "GetSnapshot")
        return Snap.from_body(body)

    async def subscribe(self, rule: str, match: Callable[[Any], bool]) -> asyncio.Queue[Any]:
        """Messages matching rule (an AddMatch rule) and match(), queued as they arrive."""
        from damond.tools import client

        queue: asyncio.Queue[Any] = asyncio.Queue()

        def handler(msg: Any) -> None:
            if match(msg):
                queue.put_nowait(msg)

        self.client.add_message_handler(handler)
        self.handlers.append(handler)
        await client.add_match(self.client, rule)
        return queue

    async def snapshots(self) -> asyncio.Queue[Any]:
        return await self.subscribe(
            f"type='signal',path='{C0}',interface='org.damond1.Context',member='Snapshot'",
            lambda m: m.member == "Snapshot" and m.path == C0,
        )

    async def state_changes(self) -> asyncio.Queue[Any]:
        return await self.subscribe(
            f"type='signal',path='{K0}',interface='org.freedesktop.DBus.Properties',"
            "member='PropertiesChanged'",
            lambda m: (
                m.member == "PropertiesChanged"
                and m.path == K0
                and m.body[0] == "org.damond1.Kdamond"
            ),
        )

    async def access_check_facts(self) -> dict[str, Any]:
        """What the context offers and what `on` resolved `auto` to (from the daemon's log)."""
        found = re.findall(r"kdamonds/0 on: (\w+)/(\w+)", self.log())
        return {
            "avail_access_checks": list(
                await self.get(C0, "org.damond1.Context", "avail_access_checks")
            ),
            "avail_operations": list(await self.get(C0, "org.damond1.Context", "avail_operations")),
            "access_check": await self.get(C0, "org.damond1.Context", "access_check"),
            "resolved_access_check": found[-1][1] if found else None,
        }

    async def stop(self) -> int:
        for handler in self.handlers:
            self.client.remove_message_handler(handler)
        self.client.disconnect()
        if self.process.poll() is None:
            self.process.terminate()
            try:
                await asyncio.to_thread(self.process.wait, 30)
            except subprocess.TimeoutExpired:
                self.hang_report = threads_report(self.process.pid)
                self.process.send_signal(signal.SIGABRT)  # stacks to the log
                try:
                    await asyncio.to_thread(self.process.wait, 10)
                except subprocess.TimeoutExpired:
                    self.process.kill()
                    self.process.wait()
        self.bus.stop()
        return int(self.process.returncode)


def threads_report(pid: int) -> list[dict[str, str]]:
    """Each thread's name, state, CPU ticks, wait channel and kernel stack (for a hang)."""
    out = []
    for tid in sorted(os.listdir(f"/proc/{pid}/task"), key=int):
        info = {"tid": tid}
        for name in ("comm", "stat", "wchan", "stack"):
            try:
                info[name] = Path(f"/proc/{pid}/task/{tid}/{name}").read_text().strip()
            except OSError as e:
                info[name] = f"unreadable: {e.strerror}"
        out.append(info)
    return out


@contextlib.asynccontextmanager
async def running_daemon(
    workdir: Path, record: dict[str, Any], args: Sequence[str] = USER_BACKEND_ONLY
) -> AsyncIterator[Daemon]:
    """damond for one phase; its exit code, log tail and any traceback land in record."""
    t0 = time.monotonic()
    daemon = await Daemon.start(workdir, args)
    record["daemon_start_seconds"] = round(time.monotonic() - t0, 2)
    try:
        yield daemon
    finally:
        record["daemon_exit_code"] = await daemon.stop()
        if daemon.hang_report is not None:
            record["daemon_hang_report"] = daemon.hang_report
        log = daemon.log()
        record["daemon_traceback"] = "Traceback" in log
        record["daemon_log_tail"] = log.splitlines()[-30:]


async def configure(
    d: Daemon,
    target: int | None,
    access_check: str,
    operations: str = "vaddr",
    regions: Sequence[tuple[int, int]] = (),
    attrs: Mapping[str, int] | None = None,
) -> None:
    """kdamond 0, context 0, one target (a pid, or regions), attrs; not yet on (dbus-fast).

    attrs: Intervals (sample_us, aggr_us, update_us), NrRegions (min, max) and
    cpu_limit_pct to set. cpu_limit_pct is 0 unless given: damond is compared
    with the kernel's DAMON, which has no CPU ceiling (and itself uses more
    than damond's default 10 % of the guest's emulated vCPU).
    """
    from damond.tools.client import ATTRIBUTE_HOMES

    await d.set(ROOT, "org.damond1.Kdamonds", "nr", "u", 1)
    await d.set(K0, "org.damond1.Contexts", "nr", "u", 1)
    await d.set(C0, "org.damond1.Context", "operations", "s", operations)
    if access_check != "auto":
        await d.set(C0, "org.damond1.Context", "access_check", "s", access_check)
    await d.set(C0, "org.damond1.Targets", "nr", "u", 1)
    if target is not None:
        await d.set(T0, "org.damond1.Target", "pid", "i", target)
    if regions:
        await d.set(T0, "org.damond1.Regions", "nr", "u", len(regions))
        for i, (start, end) in enumerate(regions):
            await d.set(f"{T0}/regions/{i}", "org.damond1.Region", "start", "t", start)
            await d.set(f"{T0}/regions/{i}", "org.damond1.Region", "end", "t", end)
    for name, value in {"cpu_limit_pct": 0, **(attrs or {})}.items():
        iface, signature = ATTRIBUTE_HOMES.get(name, ("org.damond1.Intervals", "t"))
        await d.set(C0, iface, name, signature, value)


async def state(d: Daemon, value: str) -> int:
    """Write Kdamond.state; returns CLOCK_REALTIME µs when the write was answered."""
    await d.set(K0, "org.damond1.Kdamond", "state", "s", value)
    return realtime_us()


def sampling_facts(snap: Snap, t_on_us: int) -> dict[str, Any]:
    """How many samples damond took from `on` to this snapshot (aggregations are counted
    in samples: seq aggregations of max_nr_accesses samples each)."""
    samples = snap.seq * snap.max_nr_accesses
    seconds = (snap.timestamp_us - t_on_us) / 1e6
    return {
        "seq": snap.seq,
        "samples_per_aggregation": snap.max_nr_accesses,
        "samples": samples,
        "seconds_on_to_snapshot": round(seconds, 3),
        "samples_per_second": round(samples / seconds, 1) if seconds > 0 else None,
        "nominal_samples_per_second": round(1e6 / DEFAULTS.sample_us, 1),
    }


# ---------------------------------------------------------------------------------------------
# Kernel DAMON phases
# ---------------------------------------------------------------------------------------------


def kernel_regions(
    operations: str,
    seconds: float,
    pids: Sequence[int] = (),
    regions: Sequence[Sequence[tuple[int, int]]] = (),
    attrs: kernel_damon.KAttrs = DEFAULTS,
    last: int = 1,
) -> tuple[list[list[Region]], dict[str, Any]]:
    """Run the guest kernel's DAMON; the regions of `last` aggregations up to about seconds.

    Each read waits for the next aggregation (reading the files takes a few tens
    of ms in the guest, so consecutive reads may skip one).
    """
    got: list[list[Region]] = []
    with kernel_damon.KernelDamon() as k:
        k.setup(operations, pids=pids, regions=regions, attrs=attrs)
        k.on()
        t_on = time.monotonic()
        facts: dict[str, Any] = {"kdamond_pid": k.pid()}
        first = seconds - last * attrs.aggr_us / 1e6
        time.sleep(max(0.0, first - (time.monotonic() - t_on)))
        for _ in range(last):
            got.append([(r.start, r.end, r.nr_accesses, r.age) for r in k.tried_regions()])
        facts["seconds_on_to_regions"] = round(time.monotonic() - t_on, 3)
        facts["total_bytes"] = k.total_bytes()
    return got, facts


def mean_verdict(verdicts: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """The mean hot/cold shares of several aggregations (one region straddling the edge of
    a range for an aggregation or two is DAMON's normal state, not a verdict)."""
    n = len(verdicts)
    return {
        "n": n,
        "hot_accessed_share": round(sum(v["hot_accessed_share"] for v in verdicts) / n, 4)
        if n
        else None,
        "cold_idle_share": round(sum(v["cold_idle_share"] for v in verdicts) / n, 4) if n else None,
        "each": [[v["hot_accessed_share"], v["cold_idle_share"]] for v in verdicts],
    }


# ---------------------------------------------------------------------------------------------
# Scenarios
# ---------------------------------------------------------------------------------------------


@dataclass
class Run:
    """One scenario run: where results go and how damond is asked to check accesses."""

    out: Path
    access_check: str
    result: dict[str, Any] = field(default_factory=dict)
    intervals: dict[str, int] = field(default_factory=dict)
    """damond's sample_us/aggr_us when not the defaults (only to diagnose; the tests
    use the defaults)."""

    @property
    def workdir(self) -> Path:
        return self.out.parent

    def save(self) -> None:
        tmp = self.out.with_suffix(".tmp")
        tmp.write_text(json.dumps(self.result, indent=1))
        tmp.replace(self.out)

    async def phase(self, name: str, body: Callable[[dict[str, Any]], Awaitable[None]]) -> None:
        """Run one phase into result[name]; an exception becomes its ``error``."""
        record: dict[str, Any] = {}
        self.result[name] = record
        t0 = time.monotonic()
        print(f"scenarios: {name} …", flush=True)
        try:
            await body(record)
        except Exception:
            record["error"] = traceback.format_exc()
            print(f"scenarios: {name} failed:\n{record['error']}", flush=True)
        record["phase_seconds"] = round(time.monotonic() - t0, 2)
        self.save()
        shown = {k: v for k, v in record.items() if not isinstance(v, list | dict)}
        print(f"scenarios: {name}: {json.dumps(shown)}", flush=True)


def hotcold_workload(thp: bool) -> Workload:
    args = ["--size-mib", "64", "--hot-mib", "32", "--hot-offset-mib", "0"]
    return Workload(*args, *(["--thp"] if thp else []))


async def monitoring_window(
    queue: asyncio.Queue[Any],
    t_on_mono: float,
    record: dict[str, Any],
    get: Callable[[], Awaitable[Snap]],
    verdict: Callable[[Snap], dict[str, Any]],
) -> Snap:
    """MONITOR_SECONDS of monitoring, by the wall clock and by DAMON's own clock.

    At MONITOR_SECONDS of wall time the latest snapshot is read with get() and
    recorded as ``at_wall_2s`` (with how many samples damond managed). Then
    snapshots are awaited until the one that ends aggregation AGGREGATIONS
    (MONITOR_SECONDS of samples at sample_us: DAMON counts its intervals in
    samples), which is read with get() again and returned: the scenario's result.
    The verdicts of the last LAST aggregations (from the signals' bodies) are
    averaged into ``mean_last``.
    """
    wall: dict[str, Any] = {}
    record["at_wall_2s"] = wall
    verdicts: list[dict[str, Any]] = []
    trace: list[list[Any]] = []
    record["trace"] = trace
    """[seq, seconds since on, hot share, cold share, regions over the buffer] of every
    snapshot signal."""
    deadline = t_on_mono + MONITOR_SECONDS
    seq = 0
    give_up = t_on_mono + WINDOW_TIMEOUT_S
    while seq < AGGREGATIONS:
        now = time.monotonic()
        if not wall and now >= deadline:
            try:
                snap = await get()
            except Exception as e:  # NoData: not one aggregation yet
                wall.update(error=str(e), seq=0, samples=0)
            else:
                wall.update(
                    seconds=round(time.monotonic() - t_on_mono, 3),
                    seq=snap.seq,
                    samples=snap.seq * snap.max_nr_accesses,
                )
                wall.update(verdict(snap))
            continue
        until = deadline if not wall else min(give_up, now + SNAPSHOT_TIMEOUT_S)
        try:
            msg = await asyncio.wait_for(queue.get(), max(0.001, until - now))
        except TimeoutError:
            if wall:
                raise RuntimeError(
                    f"no snapshot {AGGREGATIONS} within {WINDOW_TIMEOUT_S} s"
                ) from None
            continue
        seq = int(msg.body[0])
        snap = Snap.from_body(msg.body)
        seen = verdict(snap)
        trace.append(
            [
                seq,
                round(time.monotonic() - t_on_mono, 3),
                seen["hot_accessed_share"],
                seen["cold_idle_share"],
                seen.get("regions_over_buffer"),
            ]
        )
        if AGGREGATIONS - LAST < seq <= AGGREGATIONS:
            verdicts.append(seen)
    snap = await get()
    record["seconds_on_to_result"] = round(time.monotonic() - t_on_mono, 3)
    record["mean_last"] = mean_verdict(verdicts)
    return snap


async def damond_walkthrough(run: Run, wl: Workload, record: dict[str, Any]) -> None:
    """The README's walkthrough with busctl; the snapshot read with busctl's GetSnapshot."""
    async with running_daemon(run.workdir, record) as d:
        queue = await d.snapshots()
        d.busctl_set(ROOT, "org.damond1.Kdamonds", "nr", "u", 1)
        d.busctl_set(K0, "org.damond1.Contexts", "nr", "u", 1)
        d.busctl_set(C0, "org.damond1.Context", "operations", "s", "vaddr")
        if run.access_check != "auto":  # only while debugging the harness
            d.busctl_set(C0, "org.damond1.Context", "access_check", "s", run.access_check)
        d.busctl_set(C0, "org.damond1.Targets", "nr", "u", 1)
        d.busctl_set(T0, "org.damond1.Target", "pid", "i", wl.pid)
        for name, value in run.intervals.items():  # only while diagnosing
            d.busctl_set(C0, "org.damond1.Intervals", name, "t", value)
        d.busctl_set(K0, "org.damond1.Kdamond", "state", "s", "on")
        t_on = realtime_us()
        t_on_mono = time.monotonic()
        record["kdamond_pid"] = d.busctl_get(K0, "org.damond1.Kdamond", "pid")
        record["daemon_pid"] = d.process.pid
        record.update(await d.access_check_facts())

        async def get() -> Snap:
            return await asyncio.to_thread(d.busctl_snapshot)

        def verdict(snap: Snap) -> dict[str, Any]:
            return classify(snap.regions, wl)

        snap = await monitoring_window(queue, t_on_mono, record, get, verdict)
        d.busctl_set(K0, "org.damond1.Kdamond", "state", "s", "off")
        record.update(sampling_facts(snap, t_on))
        record.update(classify(snap.regions, wl))


async def scenario_hotcold(run: Run, thp: bool = False) -> None:
    """1 (and 4 with thp): damond's hot/cold verdict after 2 s; 2: the kernel's, same workload."""
    wl = hotcold_workload(thp)
    try:
        run.result["workload"] = {**wl.info, "size": wl.end - wl.start}
        if thp:
            run.result["workload"]["anon_huge_kb"] = anon_huge_kb(wl.pid, wl.start, wl.end)
        run.save()
        await run.phase("damond", lambda rec: damond_walkthrough(run, wl, rec))

        async def kernel(record: dict[str, Any]) -> None:
            sets, facts = await asyncio.to_thread(
                kernel_regions, "vaddr", MONITOR_SECONDS, pids=[wl.pid], last=LAST
            )
            record.update(facts)
            record.update(classify(sets[-1], wl))
            verdicts = [classify(regions, wl) for regions in sets]
            record["mean_last"] = mean_verdict(verdicts)

        await run.phase("kernel", kernel)
        if thp:
            run.result["workload"]["anon_huge_kb_after"] = anon_huge_kb(wl.pid, wl.start, wl.end)
        run.result["workload"]["passes"] = wl.command("stats")["passes"]
    finally:
        wl.stop()


async def scenario_thp(run: Run) -> None:
    await scenario_hotcold(run, thp=True)


MOVING_SPOT_MIB = 8
MOVING_SLOTS = [0, 4, 1, 6, 3]
"""Where the hot 8 MiB sits, in units of 8 MiB within the 64 MiB buffer; it moves every
AGGREGATIONS aggregations (MONITOR_SECONDS in DAMON's clock)."""
MOVING_MIN_NR_REGIONS = 100
"""min_nr_regions of the moving-spot scenario, for damond and the kernel alike (both
defaults otherwise). DAMON tells a hot range apart only when it is more than about a
tenth of the region it lies in (a region whose nr_accesses is within max/10 of its
idle neighbour's merges with it), and idle regions grow up to sz_limit = the
target's total size / min_nr_regions: about 130 MiB for this interpreter and its
guards with the default 10, where the 8 MiB spot is a sixteenth. Then following it
is a matter of lucky splits, for the kernel as for damond (seen in the guest: a move
not followed within 20 aggregations by damond, the kernel at 79 % for a second).
With 100, idle regions stay under ~13 MiB, as a DAMON user watching an 8 MiB working
set would set it."""
FOLLOW_SHARE = 0.9
"""Followed: this share of the old spot in idle regions, and of the new one in accessed
regions (NEW_SPOT_SHARE)."""
NEW_SPOT_SHARE = 0.8
"""For the new spot, 80 %: the resolution of DAMON's adaptive regions, not a damond
limit. A region nr_accesses of at most max_nr_accesses / 10 (2 of 20) merges with
an idle neighbour, so a hot sliver at the edge of a large idle region is resolved
only once a split leaves it more than ~10 % of its piece; with idle regions up to
sz_limit (the target's total / min_nr_regions: ~13 MiB with MOVING_MIN_NR_REGIONS) a
sliver of up to ~1.3 MiB of the 8 MiB spot can stay inside the idle region for many
aggregations (seen in the guest with the default min: 89.9 % for 19 aggregations).
Whether and when 90 % was reached is recorded too (followed_90_after_aggregations)."""


@dataclass(frozen=True)
class Following:
    """How one set of regions sees a moved hot spot."""

    new_accessed: float
    """Share of the new spot's bytes in regions with nr_accesses > 0."""
    away_idle: float
    """Share of the old spot's bytes (before the first move: the rest of the buffer) in
    regions with nr_accesses == 0."""

    @classmethod
    def of(
        cls, regions: Iterable[Region], hot: tuple[int, int], away: list[tuple[int, int]]
    ) -> Following:
        regions = list(regions)
        return cls(share(regions, [hot], accessed=True), share(regions, away, accessed=False))

    @property
    def followed(self) -> bool:
        return self.away_idle >= FOLLOW_SHARE and self.new_accessed >= NEW_SPOT_SHARE

    @property
    def followed_90(self) -> bool:
        return self.away_idle >= FOLLOW_SHARE and self.new_accessed >= FOLLOW_SHARE

    def trace(self) -> list[float]:
        return [round(self.new_accessed, 3), round(self.away_idle, 3)]


async def scenario_moving(run: Run) -> None:
    """3: the hot 8 MiB moves every 2 s (of samples); when do damond's regions follow it?"""
    wl = Workload("--size-mib", "64", "--hot-mib", str(MOVING_SPOT_MIB), "--hot-offset-mib", "0")
    try:
        run.result["workload"] = dict(wl.info)

        async def body(record: dict[str, Any]) -> None:
            async with running_daemon(run.workdir, record) as d:
                queue = await d.snapshots()
                attrs = {"min": MOVING_MIN_NR_REGIONS, **run.intervals}
                await configure(d, wl.pid, run.access_check, attrs=attrs)
                t_on = await state(d, "on")
                record.update(await d.access_check_facts())
                moves: list[dict[str, Any]] = []
                record["moves"] = moves
                old: tuple[int, int] | None = None
                seq_move, t_move, t_move_mono = 0, t_on, time.monotonic()
                last: Snap | None = None
                for n, slot in enumerate(MOVING_SLOTS):
                    if n:
                        answer = wl.command(f"move {slot * MOVING_SPOT_MIB}")
                        old, wl.hot = wl.hot, tuple(answer["hot"])
                        t_move, t_move_mono = answer["t_us"], time.monotonic()
                        seq_move = last.seq if last else 0
                    away = [old] if old else wl.cold()
                    move: dict[str, Any] = {
                        "slot": slot,
                        "hot": [wl.hot[0] - wl.start, wl.hot[1] - wl.start],
                        "old": [old[0] - wl.start, old[1] - wl.start] if old else None,
                        "seq_at_move": seq_move,
                        "followed_after_aggregations": None,
                        "followed_90_after_aggregations": None,
                        "trace": [],
                    }
                    moves.append(move)
                    while last is None or last.seq < seq_move + AGGREGATIONS:
                        msg = await asyncio.wait_for(queue.get(), SNAPSHOT_TIMEOUT_S)
                        last = Snap.from_body(msg.body)
                        seen = Following.of(last.regions, wl.hot, away)
                        move["trace"].append(
                            [
                                last.seq,
                                *seen.trace(),
                                classify(last.regions, wl)["regions_over_buffer"],
                            ]
                        )
                        if move["followed_90_after_aggregations"] is None and seen.followed_90:
                            move["followed_90_after_aggregations"] = last.seq - seq_move
                        if move["followed_after_aggregations"] is None and seen.followed:
                            move["followed_after_aggregations"] = last.seq - seq_move
                            move["followed_after_samples"] = (
                                last.seq - seq_move
                            ) * last.max_nr_accesses
                            move["followed_after_wall_s"] = round(time.monotonic() - t_move_mono, 3)
                            move["followed_snapshot_after_move_s"] = round(
                                (last.timestamp_us - t_move) / 1e6, 3
                            )
                    move["end"] = classify(last.regions, wl) | {"seq": last.seq}
                    move["end"].pop("regions_over_buffer")
                await state(d, "off")
                if last is not None:
                    record.update(sampling_facts(last, t_on))

        await run.phase("damond", body)
        await run.phase("kernel", lambda record: asyncio.to_thread(kernel_moving, wl, record))
    finally:
        wl.stop()


def kernel_moving(wl: Workload, record: dict[str, Any]) -> None:
    """The same moves under the guest kernel's DAMON, for the record (not asserted).

    The kernel aggregates in real time, so a move's window is MONITOR_SECONDS of
    wall time; its regions are read as often as tried_regions allows (each read
    waits for the next aggregation and takes a few more under TCG), so the
    follow times have that granularity.
    """
    moves: list[dict[str, Any]] = []
    record["moves"] = moves
    wl.hot = tuple(wl.command(f"move {MOVING_SLOTS[0] * MOVING_SPOT_MIB}")["hot"])
    with kernel_damon.KernelDamon() as k:
        k.setup(
            "vaddr",
            pids=[wl.pid],
            attrs=dataclasses.replace(DEFAULTS, min_nr_regions=MOVING_MIN_NR_REGIONS),
        )
        k.on()
        old: tuple[int, int] | None = None
        for n, slot in enumerate(MOVING_SLOTS):
            if n:
                answer = wl.command(f"move {slot * MOVING_SPOT_MIB}")
                old, wl.hot = wl.hot, tuple(answer["hot"])
            t_move = time.monotonic()
            away = [old] if old else wl.cold()
            move: dict[str, Any] = {
                "slot": slot,
                "followed_after_s": None,
                "followed_90_after_s": None,
                "trace": [],
            }
            moves.append(move)
            while (elapsed := time.monotonic() - t_move) < MONITOR_SECONDS:
                regions = [(r.start, r.end, r.nr_accesses, r.age) for r in k.tried_regions()]
                elapsed = round(time.monotonic() - t_move, 3)
                seen = Following.of(regions, wl.hot, away)
                move["trace"].append([elapsed, *seen.trace()])
                if move["followed_90_after_s"] is None and seen.followed_90:
                    move["followed_90_after_s"] = elapsed
                if move["followed_after_s"] is None and seen.followed:
                    move["followed_after_s"] = elapsed


async def scenario_paddr(run: Run) -> None:
    """5: a paddr context over the workload's physical pages; hot PFNs seen accessed?"""
    wl = hotcold_workload(thp=False)
    try:
        pfns = pfns_of(wl.pid, wl.start, wl.end)
        hot_n = (wl.hot[1] - wl.hot[0]) // PAGE
        hot_pfns, cold_pfns = pfns[:hot_n], pfns[hot_n:]
        present = [p for p in pfns if p]
        lo, hi = min(present) * PAGE, (max(present) + 1) * PAGE
        ordered = sorted(present)
        runs = 1 + sum(1 for a, b in zip(ordered, ordered[1:], strict=False) if b != a + 1)
        run.result["workload"] = {
            **wl.info,
            "pages": len(pfns),
            "pages_without_pfn": len(pfns) - len(present),
            "pfn_hull": [lo, hi],
            "pfn_hull_pages": (hi - lo) // PAGE,
            "contiguous_runs": runs,
            "hot_pfn_range": [min(hot_pfns), max(hot_pfns)],
            "cold_pfn_range": [min(cold_pfns), max(cold_pfns)],
        }
        run.save()

        def page_verdict(regions: Sequence[Region]) -> dict[str, Any]:
            hot_acc, _, hot_out = page_shares(regions, hot_pfns)
            _, cold_idle, cold_out = page_shares(regions, cold_pfns)
            return {
                "hot_accessed_share": round(hot_acc, 4),
                "cold_idle_share": round(cold_idle, 4),
                "hot_pages_uncovered": hot_out,
                "cold_pages_uncovered": cold_out,
                "nr_regions": len(regions),
                "regions": [list(r) for r in regions],
            }

        async def damond(record: dict[str, Any]) -> None:
            async with running_daemon(run.workdir, record) as d:
                queue = await d.snapshots()
                await configure(
                    d,
                    None,
                    run.access_check,
                    operations="paddr",
                    regions=[(lo, hi)],
                    attrs=run.intervals,
                )
                t_on = await state(d, "on")
                t_on_mono = time.monotonic()
                record.update(await d.access_check_facts())

                def verdict(snap: Snap) -> dict[str, Any]:
                    out = page_verdict(snap.regions)
                    out.pop("regions")
                    return out

                snap = await monitoring_window(queue, t_on_mono, record, d.snapshot, verdict)
                await state(d, "off")
                record.update(sampling_facts(snap, t_on))
                record.update(page_verdict(snap.regions))

        async def kernel(record: dict[str, Any]) -> None:
            sets, facts = await asyncio.to_thread(
                kernel_regions, "paddr", MONITOR_SECONDS, regions=[[(lo, hi)]], last=LAST
            )
            record.update(facts)
            record.update(page_verdict(sets[-1]))
            record["mean_last"] = mean_verdict([page_verdict(regions) for regions in sets])

        await run.phase("damond", damond)
        await run.phase("kernel", kernel)
        after = pfns_of(wl.pid, wl.start, wl.end)
        run.result["workload"]["pages_moved_meanwhile"] = sum(
            1 for a, b in zip(pfns, after, strict=True) if a != b
        )
    finally:
        wl.stop()


UPDATE_US = 1_000_000
MAP_MIB = 32
MAP_BELOW_MIB = 64
"""The new mapping goes this far below the lowest mapping of the middle range, inside
the biggest gap, so only an update can bring it under the regions."""


async def scenario_lifecycle(run: Run) -> None:
    """6: a target that exits while monitored; a target that maps and unmaps memory."""

    async def exits(record: dict[str, Any]) -> None:
        wl = Workload("--size-mib", "16", "--hot-mib", "8")
        try:
            async with running_daemon(run.workdir, record) as d:
                changes = await d.state_changes()
                snaps = await d.snapshots()
                await configure(d, wl.pid, run.access_check)
                await state(d, "on")
                record.update(await d.access_check_facts())
                on = await asyncio.wait_for(changes.get(), 30)
                record["on_changed"] = {k: v.value for k, v in on.body[1].items()}
                await asyncio.wait_for(snaps.get(), SNAPSHOT_TIMEOUT_S)  # monitoring for real
                t_kill = time.monotonic()
                wl.process.kill()
                wl.process.wait()
                off = await asyncio.wait_for(changes.get(), 30)
                record["off_after_s"] = round(time.monotonic() - t_kill, 3)
                record["off_changed"] = {k: v.value for k, v in off.body[1].items()}
                record["state_after"] = await d.get(K0, "org.damond1.Kdamond", "state")
                record["pid_after"] = await d.get(K0, "org.damond1.Kdamond", "pid")
                record["log_says_exited"] = "every target has exited" in d.log()
        finally:
            wl.stop()

    async def maps(record: dict[str, Any]) -> None:
        from damond.monitor.ops.vaddr import parse_maps, three_regions

        wl = Workload("--size-mib", "16", "--hot-mib", "8")
        try:
            async with running_daemon(run.workdir, record) as d:
                snaps = await d.snapshots()
                await configure(d, wl.pid, run.access_check, attrs={"update_us": UPDATE_US})
                await state(d, "on")
                record.update(await d.access_check_facts())
                first = Snap.from_body(
                    (await asyncio.wait_for(snaps.get(), SNAPSHOT_TIMEOUT_S)).body
                )
                record["samples_per_update"] = UPDATE_US // DEFAULTS.sample_us
                record["samples_per_aggregation"] = first.max_nr_accesses
                with open(f"/proc/{wl.pid}/maps", "rb") as f:
                    ranges = three_regions(parse_maps(f.read()))
                middle = ranges[1]
                addr = (middle[0] - (MAP_BELOW_MIB + MAP_MIB) * MIB) // HUGE * HUGE
                record["three_regions"] = [list(r) for r in ranges]
                before = latest(snaps, first)
                answer = wl.command(f"map {addr} {MAP_MIB}")
                lo, hi = answer["mapping"]
                record["mapping"] = [lo, hi]
                record["coverage_before_map"] = coverage(before.regions, lo, hi)
                record["map"], seen = await watch_coverage(snaps, lo, hi, want_covered=True)
                before = latest(snaps, seen or before)
                wl.command("unmap")
                record["coverage_before_unmap"] = coverage(before.regions, lo, hi)
                record["unmap"], _ = await watch_coverage(snaps, lo, hi, want_covered=False)
                await state(d, "off")
        finally:
            wl.stop()

    await run.phase("exit", exits)
    await run.phase("map_unmap", maps)


def latest(snaps: asyncio.Queue[Any], default: Snap) -> Snap:
    """The newest snapshot already queued (default if none); the queue is left empty."""
    snap = default
    while not snaps.empty():
        snap = Snap.from_body(snaps.get_nowait().body)
    return snap


async def watch_coverage(
    snaps: asyncio.Queue[Any], lo: int, hi: int, want_covered: bool, limit: int = 40
) -> tuple[dict[str, Any], Snap | None]:
    """Snapshots until [lo, hi) is fully covered (or not at all): how many, how long.

    Returns that record and the last snapshot seen.
    """
    t0 = time.monotonic()
    trace: list[list[float]] = []
    found: dict[str, Any] = {"trace": trace, "reached": False}
    first_seq: int | None = None
    snap: Snap | None = None
    for _ in range(limit):
        snap = Snap.from_body((await asyncio.wait_for(snaps.get(), SNAPSHOT_TIMEOUT_S)).body)
        if first_seq is None:
            first_seq = snap.seq
        c = coverage(snap.regions, lo, hi)
        trace.append([snap.seq, round(c, 4)])
        if (c >= 1.0) if want_covered else (c <= 0.0):
            found.update(
                reached=True,
                snapshots=snap.seq - first_seq + 1,
                samples=(snap.seq - first_seq + 1) * snap.max_nr_accesses,
                seconds=round(time.monotonic() - t0, 3),
            )
            break
    return found, snap


SCENARIOS: dict[str, Callable[[Run], Coroutine[Any, Any, None]]] = {
    "hotcold": scenario_hotcold,
    "thp": scenario_thp,
    "moving": scenario_moving,
    "paddr": scenario_paddr,
    "lifecycle": scenario_lifecycle,
}


def guest_facts() -> dict[str, Any]:
    import platform

    def read(path: str) -> str:
        try:
            return Path(path).read_text().strip()
        except OSError as e:
            return f"unreadable: {e.strerror}"

    return {
        "kernel": platform.release(),
        "cpus": os.cpu_count(),
        "page_idle": os.path.exists("/sys/kernel/mm/page_idle/bitmap"),
        "thp_enabled": read("/sys/kernel/mm/transparent_hugepage/enabled"),
        "thp_defrag": read("/sys/kernel/mm/transparent_hugepage/defrag"),
    }


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] == "workload":
        return workload_main(argv[1:])
    parser = argparse.ArgumentParser(prog="scenarios.py")
    parser.add_argument("scenario", choices=sorted(SCENARIOS))
    parser.add_argument("out", type=Path)
    parser.add_argument(
        "--access-check",
        default="auto",
        help="damond's access_check (auto; clear_refs only to debug this harness)",
    )
    parser.add_argument("--sample-us", type=int, help="damond's sample_us (to diagnose)")
    parser.add_argument("--aggr-us", type=int, help="damond's aggr_us (to diagnose)")
    args = parser.parse_args(argv)
    if outside_guest("scenarios.py"):
        return 2
    run = Run(args.out, args.access_check)
    if args.sample_us:
        run.intervals["sample_us"] = args.sample_us
    if args.aggr_us:
        run.intervals["aggr_us"] = args.aggr_us
    run.result.update(
        scenario=args.scenario,
        access_check_requested=args.access_check,
        damond_intervals=run.intervals or "defaults",
        guest=guest_facts(),
    )
    execute(run, SCENARIOS[args.scenario](run))
    return 0


def execute(run: Run, scenario: Coroutine[Any, Any, None]) -> None:
    """Run a scenario into run.result: its exception as ``error``, its ``seconds``."""
    run.save()
    t0 = time.monotonic()
    try:
        asyncio.run(scenario)
    except Exception:
        run.result["error"] = traceback.format_exc()
        print(run.result["error"], flush=True)
    run.result["seconds"] = round(time.monotonic() - t0, 2)
    run.save()


if __name__ == "__main__":
    sys.exit(main())
