"""The core guards itself: every engine caller meets the same rules (monitor/config.py).

As the kernel's damon_set_attrs refuses bad attributes whoever calls it, an
Engine refuses a configuration the rules forbid, at construction and at
commit, whether it comes from the admin tree, a test or a benchmark. The
admin tree's own use of these rules (and its messages) is tested over D-Bus
in test_dbus_errors.py.
"""

from __future__ import annotations

from dataclasses import replace

import pytest

from damond.monitor import ops
from damond.monitor.config import (
    MAX_NR_REGIONS,
    MAX_REGION_END,
    Attrs,
    ConfigError,
    ContextConfig,
    TargetConfig,
)
from damond.monitor.engine import Engine
from damond.monitor.ops.synthetic import SyntheticAccess, SyntheticSpace

VADDR_TARGET = TargetConfig(0, pid=100)


def config(
    operations: ops.Operations = ops.VADDR,
    targets: tuple[TargetConfig, ...] = (VADDR_TARGET,),
    **attrs: int,
) -> ContextConfig:
    return ContextConfig(operations, "synthetic", Attrs(**attrs), targets)


def engine(cfg: ContextConfig) -> Engine:
    return Engine(cfg, SyntheticSpace([(0, 1 << 30)]), SyntheticAccess([]))


@pytest.mark.parametrize(
    ("cfg", "where", "rule"),
    [
        (config(min_nr_regions=2), "", "nr_regions min must be >= 3, is 2"),
        (
            config(min_nr_regions=20, max_nr_regions=10),
            "",
            "nr_regions min (20) must be <= max (10)",
        ),
        (config(sample_us=0), "", "intervals sample_us must be > 0"),
        (
            config(sample_us=200, aggr_us=100),
            "",
            "intervals sample_us (200) must be <= aggr_us (100)",
        ),
        (config(update_us=0), "", "intervals update_us must be > 0"),
        (
            config(max_nr_regions=MAX_NR_REGIONS + 1),
            "",
            f"nr_regions max ({MAX_NR_REGIONS + 1}) must be <= {MAX_NR_REGIONS}",
        ),
        (
            config(cpu_limit_pct=101),
            "",
            "cpu_limit_pct must be <= 100 (percent of one CPU; 0: no limit), is 101",
        ),
        (config(targets=()), "", "vaddr needs at least one target (targets nr is 0)"),
        (
            config(ops.PADDR, (TargetConfig(0), TargetConfig(1))),
            "",
            "paddr takes at most one target, has 2",
        ),
        (config(ops.PADDR, (TargetConfig(0, pid=7),)), "targets/0", "paddr targets have no"),
        (config(ops.FVADDR), "targets/0", "fvaddr needs at least one region"),
        (
            config(targets=(TargetConfig(0, 100, ((0x2000, 0x2000),)),)),
            "targets/0/regions/0",
            "start (0x2000) must be < end (0x2000)",
        ),
        (
            config(targets=(TargetConfig(0, 100, ((0, 2**64 - 1),)),)),
            "targets/0/regions/0",
            f"end (0xffffffffffffffff) must be <= {MAX_REGION_END:#x}",
        ),
        (
            config(targets=(TargetConfig(0, 100, ((0x1000, 0x3000), (0x2000, 0x4000))),)),
            "targets/0/regions/1",
            "regions must be sorted and not overlap",
        ),
        (
            config(
                targets=tuple(TargetConfig(i, 100) for i in range(11)),
                min_nr_regions=MAX_NR_REGIONS,
                max_nr_regions=MAX_NR_REGIONS,
            ),
            "",
            "would start with",
        ),
    ],
)
def test_engines_refuse_what_the_rules_forbid(cfg: ContextConfig, where: str, rule: str) -> None:
    with pytest.raises(ConfigError) as refused:
        engine(cfg)
    assert refused.value.where == where
    assert refused.value.rule.startswith(rule), refused.value.rule


def test_a_refused_commit_changes_nothing() -> None:
    good = config(min_nr_regions=3)
    e = engine(good)
    e.start()
    with pytest.raises(ConfigError, match="nr_regions min must be >= 3"):
        e.commit(replace(good, attrs=Attrs(min_nr_regions=1)))
    for _ in range(good.attrs.samples_per_aggregation):
        e.prepare()
        e.check()
    assert e.config is good


def test_what_the_rules_allow_runs() -> None:
    for cfg in [
        config(min_nr_regions=3, max_nr_regions=3),
        config(sample_us=100_000, aggr_us=100_000),
        config(cpu_limit_pct=0),
        config(cpu_limit_pct=100),
        config(ops.PADDR, (TargetConfig(0),)),
        config(ops.PADDR, ()),
        config(ops.FVADDR, (TargetConfig(0, 100, ((0x1000, 0x2000), (0x2000, 0x3000))),)),
    ]:
        e = engine(cfg)
        e.start()
        e.prepare()
        e.check()
