"""The kernel's DAMON admin tree in sysfs: its files, and one kdamond directory driven by damond.

The interface (Documentation/admin-guide/mm/damon/usage.rst, mm/damon/sysfs.c)::

    ADMIN/kdamonds/nr_kdamonds
    ADMIN/kdamonds/K/state (on, off, commit, ...), pid
    ADMIN/kdamonds/K/contexts/nr_contexts
    ADMIN/kdamonds/K/contexts/0/{operations, avail_operations}
    .../contexts/0/monitoring_attrs/intervals/{sample_us, aggr_us, update_us}
    .../contexts/0/monitoring_attrs/nr_regions/{min, max}
    .../contexts/0/targets/nr_targets, targets/T/pid_target
    .../contexts/0/targets/T/regions/nr_regions, regions/R/{start, end}
    .../contexts/0/schemes/nr_schemes, schemes/S/{action, apply_interval_us}
    .../schemes/S/access_pattern/{sz, nr_accesses, age}/{min, max}
    .../schemes/S/quotas/{ms, bytes, reset_interval_ms, effective_bytes}
    .../schemes/S/quotas/weights/{sz_permil, nr_accesses_permil, age_permil}
    .../schemes/S/watermarks/{metric, interval_us, high, mid, low}
    .../schemes/S/filters/nr_filters, filters/F/{type, matching, allow (6.14+),
        memcg_path, addr_start, addr_end, damon_target_idx}
    .../schemes/S/stats/{nr_tried, sz_tried, nr_applied, sz_applied, qt_exceeds}

Files are staged values: writing them changes nothing that runs; `state on`
builds the kernel's context from them (and refuses it with EINVAL), `state
commit` hands them to the running kdamond at its next aggregation. Every `nr`
file and `state` take a global lock with trylock and answer EBUSY while
anyone else holds it, for a moment: such writes are retried briefly here.

A scheme's files are damond's SchemeConfig one for one (docs/dbus-api.md),
and every one of them is written, defaults too: a new scheme directory of
the kernel starts from values of its own (an access pattern that matches
nothing, for one), never from damond's. Its stats and effective quota are
copied into the files only by a `state` command (update_schemes_stats,
update_schemes_effective_quotas) that the kdamond carries out at its next
sample, the writer waiting in 100 ms steps as for a commit.

Nothing here decides whether damond may write a tree: that is the claim's
(damon_claim.py). A context is written from the frozen ContextConfig the
core validated, so the kernel sees only what damond's rules already allow.
"""

from __future__ import annotations

import contextlib
import errno
import os
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import TypeVar

from damond.monitor.config import (
    ACTIONS,
    FILTER_TYPES,
    ContextConfig,
    FilterConfig,
    SchemeConfig,
    TargetConfig,
)
from damond.monitor.ops import paddr
from damond.monitor.ops.base import KernelRefused

ADMIN = "/sys/kernel/mm/damon/admin"
BUSY_RETRY_S = 2.0
"""How long an EBUSY (another writer holds DAMON's sysfs lock) is retried."""
BUSY_PAUSE_S = 0.001

T = TypeVar("T")

PATTERN_FILES = (
    ("sz", "sz_min", "sz_max"),
    ("nr_accesses", "nr_accesses_min", "nr_accesses_max"),
    ("age", "age_min", "age_max"),
)
"""access_pattern/NAME/{min, max} and the AccessPattern fields they hold."""
QUOTA_FILES = (
    ("ms", "ms"),
    ("bytes", "bytes"),
    ("reset_interval_ms", "reset_interval_ms"),
    ("weights/sz_permil", "weight_sz"),
    ("weights/nr_accesses_permil", "weight_nr_accesses"),
    ("weights/age_permil", "weight_age"),
)
"""quotas/FILE and the Quotas field it holds."""
WATERMARK_FILES = ("metric", "interval_us", "high", "mid", "low")
STATS_FILES = ("nr_tried", "sz_tried", "nr_applied", "sz_applied", "qt_exceeds")
FILTER_FIELD_FILES = {
    "memcg": (("memcg_path", "memcg_path"),),
    "addr": (("addr_start", "addr_start"), ("addr_end", "addr_end")),
    "target": (("damon_target_idx", "target_idx"),),
}
"""The files of a filter's type besides type, matching and allow, and their fields."""

WriteFault = Callable[[str, str], int | None]
"""(file relative to the admin root, value) -> an errno to fail with instead (tests only)."""


class SysfsError(KernelRefused):
    """A read or write of the admin tree the kernel refused, naming the file and errno."""

    def __init__(self, path: str, errno_: int, value: str | None = None) -> None:
        name = errno.errorcode.get(errno_, str(errno_))
        what = f"writing {value!r} to {path}" if value is not None else f"reading {path}"
        super().__init__(f"kernel DAMON refused {what}: {name} ({os.strerror(errno_)})", errno_)
        self.path = path


class AdminFiles:
    """The files of one admin tree, named relative to its root (``kdamonds/nr_kdamonds``)."""

    def __init__(self, root: str = ADMIN, fault: WriteFault | None = None) -> None:
        self.root = root.rstrip("/")
        self._fault = fault

    def exists(self, rel: str = "kdamonds/nr_kdamonds") -> bool:
        return os.path.exists(self.path(rel))

    def path(self, rel: str) -> str:
        return f"{self.root}/{rel}"

    def read(self, rel: str) -> str:
        def read() -> str:
            with open(self.path(rel)) as f:
                return f.read().strip()

        return self._retrying(rel, None, read)

    def read_int(self, rel: str) -> int:
        return int(self.read(rel))

    def write(self, rel: str, value: object) -> None:
        """Write one file; SysfsError with the kernel's errno when refused."""
        text = str(value)
        injected = self._fault(rel, text) if self._fault is not None else None

        def write() -> None:
            if injected is not None:
                raise OSError(injected, os.strerror(injected))
            with open(self.path(rel), "w") as f:
                f.write(text)

        self._retrying(rel, text, write)

    def _retrying(self, rel: str, value: str | None, action: Callable[[], T]) -> T:
        deadline = time.monotonic() + BUSY_RETRY_S
        while True:
            try:
                return action()
            except OSError as e:
                code = e.errno or errno.EIO
                if code == errno.EBUSY and time.monotonic() < deadline:
                    time.sleep(BUSY_PAUSE_S)
                    continue
                raise SysfsError(rel, code, value) from None


@dataclass(frozen=True)
class Damos:
    """What this kernel's DAMOS sysfs takes (KdamondDir.probe_damos)."""

    actions: tuple[str, ...] = ()
    """Of damond's action names, those the kernel's `action` file takes."""
    filter_types: tuple[str, ...] = ()
    """Of damond's filter types, those a filter's `type` file takes."""
    filter_allow: bool = False
    """Filters have an `allow` file (Linux 6.14+); without it a filter only rejects."""
    reason: str = "not probed"
    """'' once probed; else why nothing is known (no schemes directory, a refusal)."""


class KdamondDir:
    """One kdamond directory (``kdamonds/K``) with one context, written from a ContextConfig."""

    def __init__(self, files: AdminFiles, index: int) -> None:
        self.files = files
        self.index = index
        self.path = f"kdamonds/{index}"
        self.context = f"{self.path}/contexts/0"

    def prepare(self) -> None:
        """Give it its one context (the kernel's sysfs runs one context per kdamond)."""
        self.files.write(f"{self.path}/contexts/nr_contexts", 1)

    def avail_operations(self) -> list[str]:
        return self.files.read(f"{self.context}/avail_operations").split()

    def write(self, config: ContextConfig) -> None:
        """Stage config in the context's files (nothing runs differently until on/commit)."""
        ctx = self.context
        self.files.write(f"{ctx}/operations", config.operations.name)
        attrs = config.attrs
        for name, value in (
            ("intervals/sample_us", attrs.sample_us),
            ("intervals/aggr_us", attrs.aggr_us),
            ("intervals/update_us", attrs.update_us),
            ("nr_regions/min", attrs.min_nr_regions),
            ("nr_regions/max", attrs.max_nr_regions),
        ):
            self.files.write(f"{ctx}/monitoring_attrs/{name}", value)
        self.files.write(f"{ctx}/targets/nr_targets", len(config.targets))
        for target in config.targets:
            self._write_target(config, target)
        if config.schemes or self.files.exists(f"{ctx}/schemes/nr_schemes"):
            self.files.write(f"{ctx}/schemes/nr_schemes", len(config.schemes))
        for scheme in config.schemes:
            self._write_scheme(scheme)

    def scheme(self, index: int) -> str:
        return f"{self.context}/schemes/{index}"

    def _write_scheme(self, scheme: SchemeConfig) -> None:
        """Every file of the scheme (the kernel's defaults are not damond's)."""
        path = self.scheme(scheme.index)
        self.files.write(f"{path}/action", scheme.action)
        self.files.write(f"{path}/apply_interval_us", scheme.apply_interval_us)
        for name, lo, hi in PATTERN_FILES:
            self.files.write(f"{path}/access_pattern/{name}/min", getattr(scheme.pattern, lo))
            self.files.write(f"{path}/access_pattern/{name}/max", getattr(scheme.pattern, hi))
        for name, field in QUOTA_FILES:
            self.files.write(f"{path}/quotas/{name}", getattr(scheme.quotas, field))
        for name in WATERMARK_FILES:
            self.files.write(f"{path}/watermarks/{name}", getattr(scheme.watermarks, name))
        self.files.write(f"{path}/filters/nr_filters", len(scheme.filters))
        for i, f in enumerate(scheme.filters):
            self._write_filter(f"{path}/filters/{i}", f)

    def _write_filter(self, path: str, f: FilterConfig) -> None:
        self.files.write(f"{path}/type", f.type)
        self.files.write(f"{path}/matching", _flag(f.matching))
        if f.allow or self.files.exists(f"{path}/allow"):  # a kernel without it only rejects
            self.files.write(f"{path}/allow", _flag(f.allow))
        for name, field in FILTER_FIELD_FILES.get(f.type, ()):
            self.files.write(f"{path}/{name}", getattr(f, field))

    def command(self, name: str) -> None:
        """A `state` command for the running kdamond (update_schemes_stats, ...). Blocks
        until the kdamond has carried it out: at its next sample, checked in 100 ms steps."""
        self.files.write(f"{self.path}/state", name)

    def scheme_stats(self, nr_schemes: int) -> list[tuple[int, ...]]:
        """The stats of the first nr_schemes schemes, brought up to date
        (STATS_FILES' values, each a tuple in that order)."""
        self.command("update_schemes_stats")
        return [
            tuple(self.files.read_int(f"{self.scheme(i)}/stats/{name}") for name in STATS_FILES)
            for i in range(nr_schemes)
        ]

    def effective_bytes(self, nr_schemes: int) -> list[int]:
        """The size quota in force of each of the first nr_schemes schemes, up to date."""
        self.command("update_schemes_effective_quotas")
        return [
            self.files.read_int(f"{self.scheme(i)}/quotas/effective_bytes")
            for i in range(nr_schemes)
        ]

    def probe_damos(self) -> Damos:
        """What the kernel's DAMOS sysfs takes, asked in this (off, unused) directory:
        each action and filter type damond knows is written once (EINVAL: not taken),
        and whether a filter has `allow`; it is left with no scheme."""
        schemes = f"{self.context}/schemes"
        if not self.files.exists(f"{schemes}/nr_schemes"):
            return Damos(reason="the kernel's DAMON sysfs has no schemes directory")
        try:
            self.files.write(f"{schemes}/nr_schemes", 1)
            actions = self._taken(f"{schemes}/0/action", ACTIONS)
            self.files.write(f"{schemes}/0/filters/nr_filters", 1)
            types = self._taken(f"{schemes}/0/filters/0/type", FILTER_TYPES)
            allow = self.files.exists(f"{schemes}/0/filters/0/allow")
        except SysfsError as e:
            return Damos(reason=f"probing the kernel's DAMOS: {e}")
        finally:
            with contextlib.suppress(SysfsError):
                self.files.write(f"{schemes}/nr_schemes", 0)
        return Damos(actions, types, allow, reason="")

    def _taken(self, rel: str, values: Sequence[str]) -> tuple[str, ...]:
        taken = []
        for value in values:
            try:
                self.files.write(rel, value)
            except SysfsError as e:
                if e.errno != errno.EINVAL:
                    raise
                continue
            taken.append(value)
        return tuple(taken)

    def _write_target(self, config: ContextConfig, target: TargetConfig) -> None:
        path = f"{self.context}/targets/{target.index}"
        if config.operations.target_has_pid:
            self.files.write(f"{path}/pid_target", target.pid)
        regions = list(target.regions) or _default_regions(config)
        self.files.write(f"{path}/regions/nr_regions", len(regions))
        for i, (start, end) in enumerate(regions):
            self.files.write(f"{path}/regions/{i}/start", start)
            self.files.write(f"{path}/regions/{i}/end", end)

    def on(self) -> None:
        self.files.write(f"{self.path}/state", "on")

    def commit(self) -> None:
        """Hand the staged files to the running kdamond. Blocks until it has taken them:
        the kernel applies them at its next aggregation and checks in 100 ms steps."""
        self.files.write(f"{self.path}/state", "commit")

    def off(self) -> None:
        """Stop it if it runs (idempotent); returns once the kdamond thread has ended."""
        if self.running():
            self.files.write(f"{self.path}/state", "off")

    def running(self) -> bool:
        return self.files.read(f"{self.path}/state") == "on"

    def pid(self) -> int:
        """The kdamond thread's pid while on, -1 while off."""
        return self.files.read_int(f"{self.path}/pid")


def _flag(value: bool) -> str:
    return "Y" if value else "N"


def _default_regions(config: ContextConfig) -> list[tuple[int, int]]:
    """Regions for a target given none: the kernel builds a process's from its mappings
    itself, but starts a physical address space with no regions at all, so damond
    gives it System RAM, as its own engine does (ops/paddr.py)."""
    if config.operations.target_has_pid:
        return []
    return paddr.system_ram()


def kdamond_dirs(files: AdminFiles, count: int) -> Iterator[KdamondDir]:
    for index in range(count):
        yield KdamondDir(files, index)


def running_dirs(dirs: Sequence[KdamondDir]) -> list[KdamondDir]:
    """Those of dirs whose kdamond runs (a read error counts as not running)."""
    found = []
    for d in dirs:
        try:
            if d.running():
                found.append(d)
        except SysfsError:
            continue
    return found
