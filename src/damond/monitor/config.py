"""The frozen, validated configuration the engine runs on, and the rules it must obey.

The admin tree (hierarchy.py) owns mutable, user-edited values; the engine only
ever sees these immutable snapshots of them, so a write that is later refused
can never leak into a running monitor. As the kernel's damon_set_attrs does for
every caller, the rules live here, with the values: whoever builds an engine
(the daemon, a test, a benchmark) goes through ContextConfig.validate().
"""

from __future__ import annotations

from collections.abc import Collection
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from damond.monitor.ops.base import Operations

PAGE_SIZE = 4096
"""DAMON_MIN_REGION: regions are page aligned and at least one page long."""

MIN_NR_REGIONS = 3
"""The kernel's lower bound on nr_regions min (damon_set_attrs)."""
MAX_NR_REGIONS = 10000
"""damond's bound on a context's monitoring regions: `nr_regions max`, and the
regions it starts with (min per target, or the target's own regions). Bounds
the engine's memory and a Snapshot (24 bytes a region: 240 KB, marshalled in
about 11 ms)."""
MAX_REGION_END = 2**64 - PAGE_SIZE
"""A region's end must stay representable once aligned up to a page."""
DEFAULT_CPU_LIMIT_PCT = 10
"""cpu_limit_pct's default: a tenth of one CPU for a context's sampling (monitor/pacing.py)."""
U32_MAX = 2**32 - 1
U64_MAX = 2**64 - 1

ACTIONS = (
    "willneed",
    "cold",
    "pageout",
    "hugepage",
    "nohugepage",
    "lru_prio",
    "lru_deprio",
    "stat",
)
"""DAMOS actions, as the kernel's sysfs names them (what a backend can do is its table's)."""
STAT = "stat"
"""The action that only counts: every backend and operations set can do it."""
FILTER_TYPES = ("anon", "memcg", "addr", "target", "young")
CORE_FILTER_TYPES = ("addr", "target")
"""Filters the core decides per region (damos_filter_for_ops() is false for them); the
others are the operations set's, decided per page."""
WMARK_METRICS = ("none", "free_mem_rate")
WMARK_NONE = "none"


class ConfigError(ValueError):
    """A configuration the rules refuse.

    ``where`` is relative to the context ('' for the context itself,
    ``targets/0``, ``targets/0/regions/1``), so that the admin tree can name
    its own object; ``rule`` says what was wrong, with the values.
    """

    def __init__(self, where: str, rule: str) -> None:
        super().__init__(f"{where}: {rule}" if where else rule)
        self.where = where
        self.rule = rule


@dataclass(frozen=True)
class Attrs:
    """monitoring_attrs: intervals in microseconds and the region count bounds; and
    damond's CPU ceiling for sampling them."""

    sample_us: int = 5000
    aggr_us: int = 100_000
    update_us: int = 60_000_000
    min_nr_regions: int = 10
    max_nr_regions: int = 1000
    cpu_limit_pct: int = DEFAULT_CPU_LIMIT_PCT
    """The most of one CPU, in percent, the sampling may use (averaged over an
    aggregation; 0: no limit): beyond it the interval between samples grows."""

    @property
    def samples_per_aggregation(self) -> int:
        """Aggregation is counted in samples, as the kernel does since v6.7."""
        return max(1, self.aggr_us // self.sample_us)

    @property
    def samples_per_update(self) -> int:
        return max(1, self.update_us // self.sample_us)

    def validate(self) -> None:
        """damon_set_attrs' rules, and damond's region bound; ConfigError if broken."""
        if self.min_nr_regions < MIN_NR_REGIONS:
            raise ConfigError(
                "", f"nr_regions min must be >= {MIN_NR_REGIONS}, is {self.min_nr_regions}"
            )
        if self.min_nr_regions > self.max_nr_regions:
            raise ConfigError(
                "",
                f"nr_regions min ({self.min_nr_regions}) must be <= max ({self.max_nr_regions})",
            )
        if self.sample_us <= 0:
            raise ConfigError("", "intervals sample_us must be > 0")
        if self.sample_us > self.aggr_us:
            raise ConfigError(
                "", f"intervals sample_us ({self.sample_us}) must be <= aggr_us ({self.aggr_us})"
            )
        if self.update_us <= 0:
            raise ConfigError("", "intervals update_us must be > 0")
        if not 0 <= self.cpu_limit_pct <= 100:
            raise ConfigError(
                "",
                f"cpu_limit_pct must be <= 100 (percent of one CPU; 0: no limit), "
                f"is {self.cpu_limit_pct}",
            )
        if self.max_nr_regions > MAX_NR_REGIONS:
            raise ConfigError(
                "",
                f"nr_regions max ({self.max_nr_regions}) must be <= {MAX_NR_REGIONS} "
                "(damond's limit)",
            )


@dataclass(frozen=True)
class TargetConfig:
    """One monitoring target: a process (vaddr, fvaddr) or physical memory (paddr)."""

    index: int
    pid: int = -1
    """-1 where the operations set's targets have no process (paddr)."""
    regions: tuple[tuple[int, int], ...] = ()
    """User-given regions as [start, end) pairs; when present they are the start."""

    def validate(self) -> None:
        """Regions non-empty, within the address space, sorted and apart."""
        where = f"targets/{self.index}"
        prev_end = 0
        for i, (start, end) in enumerate(self.regions):
            region = f"{where}/regions/{i}"
            if start >= end:
                raise ConfigError(region, f"start ({start:#x}) must be < end ({end:#x})")
            if end > MAX_REGION_END:
                raise ConfigError(
                    region, f"end ({end:#x}) must be <= {MAX_REGION_END:#x} (the last page)"
                )
            if i and start < prev_end:
                raise ConfigError(
                    region,
                    f"regions must be sorted and not overlap: start {start:#x} < previous "
                    f"region's end {prev_end:#x}",
                )
            prev_end = end


def _count(n: int, noun: str) -> str:
    return f"one {noun}" if n == 1 else f"{n} {noun}s"


@dataclass(frozen=True)
class AccessPattern:
    """Which regions a scheme is for: closed ranges of size (bytes), nr_accesses (samples
    per aggregation, as the kernel's sysfs) and age (aggregations). Defaults match all."""

    sz_min: int = 0
    sz_max: int = U64_MAX
    nr_accesses_min: int = 0
    nr_accesses_max: int = U32_MAX
    age_min: int = 0
    age_max: int = U32_MAX

    def validate(self, where: str) -> None:
        for name in ("sz", "nr_accesses", "age"):
            lo, hi = getattr(self, f"{name}_min"), getattr(self, f"{name}_max")
            if lo > hi:
                raise ConfigError(
                    where,
                    f"access pattern {name}_min ({lo}) must be <= {name}_max ({hi}): "
                    "the range would match no region",
                )


@dataclass(frozen=True)
class Quotas:
    """At most ``ms`` of action time and ``bytes`` per ``reset_interval_ms``, regions taken in
    the order of the weights (per thousand) of size, access frequency and age. The kernel's
    scores use the frequency and age weights only; the size weight is kept for its sysfs."""

    ms: int = 0
    bytes: int = 0
    reset_interval_ms: int = 0
    weight_sz: int = 0
    weight_nr_accesses: int = 0
    weight_age: int = 0

    @property
    def limited(self) -> bool:
        """0 ms and 0 bytes: no quota (damos_adjust_quota does nothing)."""
        return bool(self.ms or self.bytes)


@dataclass(frozen=True)
class Watermarks:
    """Activate the scheme while the metric (per thousand) is in [low, high] and, once
    deactivated, only again when it falls to mid (damos_wmark_wait_us)."""

    metric: str = WMARK_NONE
    interval_us: int = 0
    high: int = 0
    mid: int = 0
    low: int = 0

    def validate(self, where: str) -> None:
        if self.metric not in WMARK_METRICS:
            raise ConfigError(
                where, f"watermarks metric {self.metric!r} is not one of {', '.join(WMARK_METRICS)}"
            )
        if self.metric != WMARK_NONE and not self.low <= self.mid <= self.high:
            raise ConfigError(
                where,
                f"watermarks must be low ({self.low}) <= mid ({self.mid}) <= high ({self.high})",
            )


@dataclass(frozen=True)
class FilterConfig:
    """One DAMOS filter: memory of ``type`` that matches (or, with matching false, does not)
    is allowed (``allow``) or rejected; the first filter that matches decides."""

    type: str = "anon"
    matching: bool = False
    allow: bool = False
    memcg_path: str = ""
    addr_start: int = 0
    addr_end: int = 0
    target_idx: int = 0

    @property
    def core(self) -> bool:
        """Decided per region by the core (addr, target), not per page by the ops."""
        return self.type in CORE_FILTER_TYPES

    def validate(self, where: str, nr_targets: int) -> None:
        if self.type not in FILTER_TYPES:
            raise ConfigError(
                where, f"filter type {self.type!r} is not one of {', '.join(FILTER_TYPES)}"
            )
        if self.type == "addr" and self.addr_start > self.addr_end:
            raise ConfigError(
                where,
                f"addr filter start ({self.addr_start:#x}) must be <= end ({self.addr_end:#x})",
            )
        if self.type == "target" and self.target_idx >= nr_targets:
            raise ConfigError(
                where,
                f"target filter target_idx ({self.target_idx}) names no target "
                f"(targets nr is {nr_targets})",
            )
        if self.type == "memcg" and not self.memcg_path:
            raise ConfigError(where, "memcg filter needs a memcg_path")


@dataclass(frozen=True)
class SchemeConfig:
    """One DAMOS scheme: do ``action`` to the regions of ``pattern``, within the quotas,
    while the watermarks allow, to what the filters let through."""

    index: int
    action: str = STAT
    apply_interval_us: int = 0
    """0: at every aggregation."""
    pattern: AccessPattern = AccessPattern()
    quotas: Quotas = Quotas()
    watermarks: Watermarks = Watermarks()
    filters: tuple[FilterConfig, ...] = ()

    def validate(self, nr_targets: int) -> None:
        where = f"schemes/{self.index}"
        if self.action not in ACTIONS:
            raise ConfigError(where, f"action {self.action!r} is not one of {', '.join(ACTIONS)}")
        self.pattern.validate(where)
        self.watermarks.validate(where)
        for i, f in enumerate(self.filters):
            f.validate(f"{where}/filters/{i}", nr_targets)


@dataclass(frozen=True)
class ContextConfig:
    """What one context monitors and how: operations, access check, attrs, targets, backend."""

    operations: Operations
    """The operations set's table (monitor/ops): its rules and its address space."""
    access_check: str
    """Resolved name of the access check (never ``auto``)."""
    attrs: Attrs
    targets: tuple[TargetConfig, ...]
    schemes: tuple[SchemeConfig, ...] = ()
    """DAMOS schemes, applied in order at each of their apply intervals."""
    backend: str = "user"
    """Resolved name of the backend that runs it (never ``auto``): damond's own engine
    (``user``) or the kernel's DAMON (``kernel``); see monitor/backends.py."""

    def validate(self) -> ContextConfig:
        """Every rule a context must obey before an engine takes it; returns self.

        The attributes' rules first, then each target's regions, then what
        the operations set asks of its targets (how many, with regions, with
        a process or not), then damond's bound on the regions to start with,
        then each scheme's rules. What a backend can do of the schemes is its
        own table's to say (validate_doable, monitor/backends.py).
        """
        self.attrs.validate()
        ops = self.operations
        for target in self.targets:
            target.validate()
            where = f"targets/{target.index}"
            if ops.needs_regions and not target.regions:
                raise ConfigError(where, f"{ops.name} needs at least one region (regions nr is 0)")
            if not ops.target_has_pid and target.pid != -1:
                raise ConfigError(where, f"{ops.name} targets have no process (pid must be -1)")
        initial = sum(len(t.regions) or self.attrs.min_nr_regions for t in self.targets)
        if initial > MAX_NR_REGIONS:
            raise ConfigError(
                "",
                f"would start with {initial} regions (nr_regions min or the target's own "
                f"regions, per target), over damond's limit of {MAX_NR_REGIONS}",
            )
        if len(self.targets) < ops.min_targets:
            raise ConfigError(
                "",
                f"{ops.name} needs at least {_count(ops.min_targets, 'target')} "
                f"(targets nr is {len(self.targets)})",
            )
        if ops.max_targets is not None and len(self.targets) > ops.max_targets:
            raise ConfigError(
                "",
                f"{ops.name} takes at most {_count(ops.max_targets, 'target')}, "
                f"has {len(self.targets)}",
            )
        for scheme in self.schemes:
            scheme.validate(len(self.targets))
        return self

    def validate_doable(
        self, actions: Collection[str], filter_types: Collection[str]
    ) -> ContextConfig:
        """ConfigError unless every scheme's action is one of actions and every filter's
        type one of filter_types (what the backend running it does); returns self."""
        for scheme in self.schemes:
            where = f"schemes/{scheme.index}"
            if scheme.action not in actions:
                raise ConfigError(
                    where, f"{self.operations.name} cannot do the {scheme.action} action"
                )
            for i, f in enumerate(scheme.filters):
                if f.type not in filter_types:
                    raise ConfigError(
                        f"{where}/filters/{i}",
                        f"{self.operations.name} cannot honour the {f.type} filter",
                    )
        return self
