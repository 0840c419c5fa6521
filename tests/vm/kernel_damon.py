"""Drive the GUEST kernel's own DAMON through its sysfs interface (Linux 6.12).

Used inside the test guest only (tests/vm/scenarios.py, bench/guest.py), as
the reference damond is compared with, and as "another tool" that uses the
admin tree (tests/vm/kernel_backend_checks.py). It refuses to run anywhere
else: the host's /sys/kernel/mm/damon belongs to the machine and must never be
written.

The context is written by damond's own sysfs driver
(damond/monitor/ops/damon_sysfs.py, which names the files); what is added
here is the reference's way of reading results, the way damo does: a
``stat`` scheme (does nothing) whose access pattern matches every region, and
``update_schemes_tried_regions`` written to ``state``::

    kdamonds/0/contexts/0/schemes/nr_schemes, schemes/S/action
    .../schemes/S/access_pattern/{sz,nr_accesses,age}/{min,max}
    .../schemes/S/tried_regions/total_bytes, .../tried_regions/R/{start,end,nr_accesses,age}

That write blocks until the kdamond has applied the scheme once more (one
aggregation, since the scheme's apply interval defaults to aggr_us; the kernel
checks in 100 ms steps), so the regions read afterwards are those of one
aggregation, after merging, as the tracepoint would show. Their
``nr_accesses`` is the kernel's moving sum (``nr_accesses_bp / 10000``), which
at an aggregation boundary equals that aggregation's count up to rounding.
damond's kernel backend reads the damon_aggregated tracepoint instead
(docs/benchmarks.md compares the two).

set_scheme() makes that scheme act instead (tests/vm/damos.py: DAMOS pageout
next to damond's), and scheme_stats() reads its stats.
"""

from __future__ import annotations

import os
import platform
import subprocess
from collections.abc import Sequence
from dataclasses import dataclass
from types import TracebackType

from damond.monitor import ops
from damond.monitor.config import Attrs, ContextConfig, TargetConfig
from damond.monitor.ops.damon_sysfs import ADMIN, AdminFiles, KdamondDir, SysfsError

ULONG_MAX = (1 << 64) - 1
UINT_MAX = (1 << 32) - 1
KAttrs = Attrs
"""monitoring_attrs, with the kernel's (and damond's) defaults."""


class KernelDamonError(RuntimeError):
    """A sysfs write the kernel refused, or use outside the test guest."""


def in_test_guest() -> bool:
    """True only in the damond test VM (tests/vm/run.py sets both)."""
    return os.environ.get("DAMOND_IN_VM") == "1" and platform.node() == "damond-vm"


TRACEFS = "/sys/kernel/tracing"


def mount_tracefs() -> None:
    """Mount tracefs where systemd mounts it (the test guest's init does not): the kernel
    backend reads kernel DAMON's results there. In the test guest only."""
    if not in_test_guest():
        raise KernelDamonError("kernel_damon: not in the damond test guest")
    if not os.path.isdir(f"{TRACEFS}/instances"):
        subprocess.run(["mount", "-t", "tracefs", "nodev", TRACEFS], check=True)


@dataclass(frozen=True)
class KRegion:
    """One region as the kernel reported it."""

    start: int
    end: int
    nr_accesses: int
    age: int


class KernelDamon:
    """kdamond 0 of the guest kernel, with one context and one stat scheme.

    ``with KernelDamon() as k: k.setup(...); k.on(); ...; k.tried_regions()``;
    leaving the block turns it off and removes the kdamond.
    """

    def __init__(self, admin: str = ADMIN) -> None:
        if not in_test_guest():
            raise KernelDamonError(
                "kernel_damon: not in the damond test guest (DAMOND_IN_VM=1, hostname "
                "damond-vm); refusing to write the host's DAMON sysfs"
            )
        if not os.path.isdir(admin):
            raise KernelDamonError(f"kernel_damon: {admin} missing (no CONFIG_DAMON_SYSFS)")
        self.admin = admin
        self.files = AdminFiles(admin)
        self.dir = KdamondDir(self.files, 0)
        self.kdamond = f"{admin}/kdamonds/0"
        self.context = f"{self.kdamond}/contexts/0"
        self.scheme = f"{self.context}/schemes/0"

    # -- files -------------------------------------------------------------------------------

    def write(self, path: str, value: object) -> None:
        """Write one sysfs file (path absolute or relative to the admin directory)."""
        try:
            self.files.write(path.removeprefix(self.admin + "/"), value)
        except SysfsError as e:
            raise KernelDamonError(str(e)) from e

    def read(self, path: str) -> str:
        return self.files.read(path.removeprefix(self.admin + "/"))

    # -- configuration -----------------------------------------------------------------------

    def setup(
        self,
        operations: str,
        pids: Sequence[int] = (),
        regions: Sequence[Sequence[tuple[int, int]]] = (),
        attrs: Attrs | None = None,
    ) -> None:
        """One kdamond, one context: operations, attrs, targets, a match-all stat scheme.

        pids: one per target (vaddr, fvaddr); regions: per target, the initial
        regions (fvaddr, paddr; optional for vaddr; paddr without them covers
        System RAM, as damond does). paddr takes one target and no pid.
        """
        table = ops.REGISTRY.operations(operations)
        nr_targets = max(len(pids), len(regions), 0 if table.target_has_pid else 1)
        config = ContextConfig(
            table,
            "",
            attrs or Attrs(),
            tuple(
                TargetConfig(
                    i,
                    pids[i] if i < len(pids) else -1,
                    tuple(regions[i]) if i < len(regions) else (),
                )
                for i in range(nr_targets)
            ),
        )
        self.off()
        self.write("kdamonds/nr_kdamonds", 1)
        try:
            self.dir.prepare()
            avail = self.dir.avail_operations()
            if operations not in avail:
                raise KernelDamonError(f"operations {operations!r} not in {avail}")
            self.dir.write(config)
        except SysfsError as e:
            raise KernelDamonError(str(e)) from e
        self.write(f"{self.context}/schemes/nr_schemes", 1)
        self.write(f"{self.scheme}/action", "stat")
        pattern = f"{self.scheme}/access_pattern"
        for name, top in (("sz", ULONG_MAX), ("nr_accesses", UINT_MAX), ("age", UINT_MAX)):
            self.write(f"{pattern}/{name}/min", 0)
            self.write(f"{pattern}/{name}/max", top)

    # -- state -------------------------------------------------------------------------------

    def exists(self) -> bool:
        return os.path.isdir(self.kdamond)

    def state(self) -> str:
        return "on" if self.exists() and self.dir.running() else "off"

    def on(self) -> None:
        self.write(f"{self.kdamond}/state", "on")

    def commit(self) -> None:
        self.write(f"{self.kdamond}/state", "commit")

    def off(self) -> None:
        """Turn kdamond 0 off if it exists and runs (idempotent)."""
        if self.exists():
            self.dir.off()

    def pid(self) -> int:
        """The kdamond kernel thread's pid while on, -1 while off."""
        return self.dir.pid()

    def close(self) -> None:
        """Off, and no kdamond left."""
        self.off()
        if int(self.read("kdamonds/nr_kdamonds")):
            self.write("kdamonds/nr_kdamonds", 0)

    def __enter__(self) -> KernelDamon:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    # -- results -----------------------------------------------------------------------------

    def tried_regions(self) -> list[KRegion]:
        """The regions of the next aggregation (blocks for about one aggr_us).

        Every region matches the stat scheme, so the tried regions are all of
        them, sorted by start. Raises KernelDamonError when the kdamond is off.
        """
        if self.state() != "on":
            raise KernelDamonError("tried_regions: kdamond 0 is not on")
        self.write(f"{self.kdamond}/state", "update_schemes_tried_regions")
        base = f"{self.scheme}/tried_regions"
        names = sorted(int(n) for n in os.listdir(base) if n.isdigit())
        regions = []
        for n in names:
            d = f"{base}/{n}"
            regions.append(
                KRegion(
                    start=int(self.read(f"{d}/start")),
                    end=int(self.read(f"{d}/end")),
                    nr_accesses=int(self.read(f"{d}/nr_accesses")),
                    age=int(self.read(f"{d}/age")),
                )
            )
        return sorted(regions, key=lambda r: r.start)

    def total_bytes(self) -> int:
        """tried_regions/total_bytes as of the last update."""
        return int(self.read(f"{self.scheme}/tried_regions/total_bytes"))

    # -- DAMOS -------------------------------------------------------------------------------

    def set_scheme(
        self,
        action: str,
        sz: tuple[int, int] = (0, ULONG_MAX),
        nr_accesses: tuple[int, int] = (0, UINT_MAX),
        age: tuple[int, int] = (0, UINT_MAX),
    ) -> None:
        """Make scheme 0 (setup()'s) do action to the regions of this access pattern
        (nr_accesses in samples, age in aggregations, as damond's Scheme)."""
        self.write(f"{self.scheme}/action", action)
        pattern = f"{self.scheme}/access_pattern"
        for name, (lo, hi) in (("sz", sz), ("nr_accesses", nr_accesses), ("age", age)):
            self.write(f"{pattern}/{name}/min", lo)
            self.write(f"{pattern}/{name}/max", hi)

    def scheme_stats(self) -> dict[str, int]:
        """Scheme 0's stats/ files, brought up to date (update_schemes_stats)."""
        self.write(f"{self.kdamond}/state", "update_schemes_stats")
        return {
            name: int(self.read(f"{self.scheme}/stats/{name}"))
            for name in ("nr_tried", "sz_tried", "nr_applied", "sz_applied", "qt_exceeds")
        }
