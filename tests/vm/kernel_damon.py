"""Drive the GUEST kernel's own DAMON through its sysfs interface (Linux 6.12).

Used inside the test guest only (tests/vm/scenarios.py, bench/guest.py), as
the reference damond is compared with. It refuses to run anywhere else: the
host's /sys/kernel/mm/damon belongs to the machine and must never be written.

The interface (Documentation/admin-guide/mm/damon/usage.rst of 6.12)::

    /sys/kernel/mm/damon/admin/kdamonds/nr_kdamonds
      0/state (on, off, commit, update_schemes_tried_regions, ...), pid
      0/contexts/nr_contexts
        0/operations (vaddr, fvaddr, paddr)
        0/monitoring_attrs/intervals/{sample_us,aggr_us,update_us}
        0/monitoring_attrs/nr_regions/{min,max}
        0/targets/nr_targets, 0/targets/N/pid_target
        0/targets/N/regions/nr_regions, .../regions/M/{start,end}
        0/schemes/nr_schemes, 0/schemes/S/action
        0/schemes/S/access_pattern/{sz,nr_accesses,age}/{min,max}
        0/schemes/S/stats/{nr_tried,sz_tried,nr_applied,sz_applied,qt_exceeds}
        0/schemes/S/tried_regions/total_bytes, .../tried_regions/R/{start,end,nr_accesses,age}

set_scheme() makes that scheme act instead (tests/vm/damos.py: DAMOS pageout
next to damond's), and scheme_stats() reads its stats.

The kernel publishes monitoring results only through schemes and the
damon_aggregated tracepoint; the test kernel has no tracefs (no DEBUG_FS or
FTRACE), so results are read the way damo does: a ``stat`` scheme (does
nothing) whose access pattern matches every region, and
``update_schemes_tried_regions`` written to ``state``. That write blocks until
the kdamond has applied the scheme once more (one aggregation, since the
scheme's apply interval defaults to aggr_us), so the regions read afterwards
are those of one aggregation, after merging, as the tracepoint would show.
Their ``nr_accesses`` is the kernel's moving sum (``nr_accesses_bp / 10000``),
which at an aggregation boundary equals that aggregation's count up to
rounding.
"""

from __future__ import annotations

import os
import platform
from collections.abc import Sequence
from dataclasses import dataclass
from types import TracebackType

ADMIN = "/sys/kernel/mm/damon/admin"
ULONG_MAX = (1 << 64) - 1
UINT_MAX = (1 << 32) - 1


class KernelDamonError(RuntimeError):
    """A sysfs write the kernel refused, or use outside the test guest."""


def in_test_guest() -> bool:
    """True only in the damond test VM (tests/vm/run.py sets both)."""
    return os.environ.get("DAMOND_IN_VM") == "1" and platform.node() == "damond-vm"


@dataclass(frozen=True)
class KRegion:
    """One region as the kernel reported it."""

    start: int
    end: int
    nr_accesses: int
    age: int


@dataclass(frozen=True)
class KAttrs:
    """monitoring_attrs, with the kernel's (and damond's) defaults."""

    sample_us: int = 5000
    aggr_us: int = 100_000
    update_us: int = 60_000_000
    min_nr_regions: int = 10
    max_nr_regions: int = 1000


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
        self.kdamond = f"{admin}/kdamonds/0"
        self.context = f"{self.kdamond}/contexts/0"
        self.scheme = f"{self.context}/schemes/0"

    # -- files -------------------------------------------------------------------------------

    def write(self, path: str, value: object) -> None:
        """Write one sysfs file (path absolute or relative to the admin directory)."""
        full = path if path.startswith("/") else f"{self.admin}/{path}"
        try:
            with open(full, "w") as f:
                f.write(f"{value}\n")
        except OSError as e:
            raise KernelDamonError(f"write {value!r} to {full}: {e.strerror}") from e

    def read(self, path: str) -> str:
        full = path if path.startswith("/") else f"{self.admin}/{path}"
        with open(full) as f:
            return f.read().strip()

    # -- configuration -----------------------------------------------------------------------

    def setup(
        self,
        operations: str,
        pids: Sequence[int] = (),
        regions: Sequence[Sequence[tuple[int, int]]] = (),
        attrs: KAttrs | None = None,
    ) -> None:
        """One kdamond, one context: operations, attrs, targets, a match-all stat scheme.

        pids: one per target (vaddr, fvaddr); regions: per target, the initial
        regions (fvaddr, paddr; optional for vaddr). paddr takes one target and
        no pid.
        """
        attrs = attrs or KAttrs()
        self.off()
        self.write("kdamonds/nr_kdamonds", 1)
        self.write(f"{self.kdamond}/contexts/nr_contexts", 1)
        avail = self.read(f"{self.context}/avail_operations").split()
        if operations not in avail:
            raise KernelDamonError(f"operations {operations!r} not in {avail}")
        self.write(f"{self.context}/operations", operations)
        intervals = f"{self.context}/monitoring_attrs/intervals"
        self.write(f"{intervals}/sample_us", attrs.sample_us)
        self.write(f"{intervals}/aggr_us", attrs.aggr_us)
        self.write(f"{intervals}/update_us", attrs.update_us)
        nr_regions = f"{self.context}/monitoring_attrs/nr_regions"
        self.write(f"{nr_regions}/min", attrs.min_nr_regions)
        self.write(f"{nr_regions}/max", attrs.max_nr_regions)
        nr_targets = max(len(pids), len(regions), 1 if operations == "paddr" else 0)
        targets = f"{self.context}/targets"
        self.write(f"{targets}/nr_targets", nr_targets)
        for i in range(nr_targets):
            if i < len(pids):
                self.write(f"{targets}/{i}/pid_target", pids[i])
            mine = list(regions[i]) if i < len(regions) else []
            self.write(f"{targets}/{i}/regions/nr_regions", len(mine))
            for j, (start, end) in enumerate(mine):
                self.write(f"{targets}/{i}/regions/{j}/start", start)
                self.write(f"{targets}/{i}/regions/{j}/end", end)
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
        return self.read(f"{self.kdamond}/state") if self.exists() else "off"

    def on(self) -> None:
        self.write(f"{self.kdamond}/state", "on")

    def commit(self) -> None:
        self.write(f"{self.kdamond}/state", "commit")

    def off(self) -> None:
        """Turn kdamond 0 off if it exists and runs (idempotent)."""
        if self.exists() and self.state() == "on":
            self.write(f"{self.kdamond}/state", "off")

    def pid(self) -> int:
        """The kdamond kernel thread's pid while on, -1 while off."""
        return int(self.read(f"{self.kdamond}/pid"))

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
