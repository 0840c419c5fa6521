"""damo's kdamonds format, read and written: against damo's own parser and printer.

damo (a test dependency) writes the documents a damo user has, and reads the
dumps damond writes; both directions go through damo's own classes.
"""

from __future__ import annotations

import importlib
import sys
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from damond import kdamonds_format as fmt
from damond.hierarchy import Tree
from damond.monitor.config import ContextConfig


@pytest.fixture(scope="module")
def damon() -> Iterator[ModuleType]:
    """damo's _damon module (its kdamonds classes); damo imports its modules by bare name."""
    import damo

    where = str(Path(damo.__file__).parent)
    sys.path.insert(0, where)
    try:
        yield importlib.import_module("_damon")
    finally:
        sys.path.remove(where)


def damo_document(damon: ModuleType, pid: int, **intervals: str) -> dict[str, Any]:
    """What `damo args damon` writes: damo's human numbers ("5 ms", "1,000")."""
    ctx = damon.DamonCtx(
        "vaddr",
        [damon.DamonTarget(pid, [])],
        damon.DamonIntervals(
            intervals.get("sample", "5ms"), intervals.get("aggr", "100ms"), "1s"
        ),
        damon.DamonNrRegionsRange(10, 1000),
        [],
    )
    return {"kdamonds": [damon.Kdamond("off", None, [ctx]).to_kvpairs()]}


def test_a_damo_document_reads_with_damos_numbers(damon: ModuleType) -> None:
    doc = damo_document(damon, 4242, sample="2ms", aggr="1s")
    assert doc["kdamonds"][0]["contexts"][0]["intervals"]["aggr_us"] == "1 s"  # damo's text
    doc["kdamonds"][0]["state"] = "on"
    [spec] = fmt.parse(doc)
    [context] = spec.contexts
    assert spec.on
    assert context.value("context", "operations") == "vaddr"
    assert context.value("intervals", "sample_us") == 2000
    assert context.value("intervals", "aggr_us") == 1_000_000
    assert context.value("intervals", "update_us") == 1_000_000
    assert (context.value("nr_regions", "min"), context.value("nr_regions", "max")) == (10, 1000)
    assert context.value("context", "access_check") == "auto"  # damond's default
    assert context.targets == (fmt.TargetSpec(4242, ()),)


def test_parameters_without_a_state_mean_start() -> None:
    [spec] = fmt.parse({"kdamonds": [{"contexts": []}]})
    assert spec.on
    [spec] = fmt.parse([{"state": "off", "contexts": []}])  # FILE.kdamonds: a bare list
    assert not spec.on


def tree_with(document: dict[str, Any]) -> Tree:
    class Idle:
        def stop(self) -> None: ...

        def commit(self, config: ContextConfig) -> None: ...

    tree = Tree(lambda *_: Idle())
    for step in fmt.build(fmt.parse(document)):
        if isinstance(step, fmt.Write):
            node = tree.lookup(step.path)
            assert node is not None
            node.set(step.group, step.name, step.value)
    return tree


def test_a_dump_reads_back_in_damo_and_in_damond(damon: ModuleType) -> None:
    document = {
        "kdamonds": [
            {
                "state": "off",
                "contexts": [
                    {
                        "ops": "fvaddr",
                        "targets": [
                            {"pid": 77, "regions": [{"start": "4 KiB", "end": 1 << 20}]},
                        ],
                        "intervals": {"sample_us": 1000, "aggr_us": "20 ms",
                                      "ops_update_us": "1m 30s"},
                        "nr_regions": {"min": 5, "max": "2,000"},
                        "access_check": "clear_refs",
                    }
                ],
            }
        ]
    }  # fmt: skip
    dumped = fmt.dump(fmt.tree_objects(tree_with(document).root))
    [kdamond] = [damon.Kdamond.from_kvpairs(kv) for kv in dumped["kdamonds"]]
    [ctx] = kdamond.contexts
    assert ctx.ops == "fvaddr"
    assert (ctx.intervals.sample, ctx.intervals.aggr, ctx.intervals.ops_update) == (
        1000, 20000, 90_000_000,
    )  # fmt: skip
    assert (ctx.nr_regions.minimum, ctx.nr_regions.maximum) == (5, 2000)
    assert [(r.start, r.end) for r in ctx.targets[0].regions] == [(4096, 1 << 20)]
    assert ctx.targets[0].pid == 77
    # and damond reads its own dump into the same tree, damond's access_check included
    assert fmt.parse(dumped) == fmt.parse(document)
    assert dumped["kdamonds"][0]["contexts"][0]["access_check"] == "clear_refs"


@pytest.mark.parametrize(
    ("change", "where", "words"),
    [
        (lambda c: c["intervals"].update(intervals_goal={"access_bp": "4%", "aggrs": 3}),
         ".intervals.intervals_goal", "auto-tuning"),
        (lambda c: c.update(addr_unit="4 KiB"), ".addr_unit", "addr_unit"),
        (lambda c: c.update(pause=True), ".pause", "pause"),
        (lambda c: c.update(sample_control={"primitives_enabled": {"page_fault": True}}),
         ".sample_control.primitives_enabled", "page_fault"),
        (lambda c: c.update(opss="vaddr"), "", "unknown key 'opss'"),
        (lambda c: c["intervals"].update(aggr_us="fast"), ".intervals.aggr_us", "'fast'"),
        (lambda c: c["intervals"].update(sample_us="1.5 us"), ".intervals.sample_us",
         "whole number"),
        (lambda c: c["nr_regions"].update(min=-1), ".nr_regions.min", "[0,"),
        (lambda c: c["targets"][0].update(pid="12"), ".targets[0].pid", "integer"),
        (lambda c: c["targets"][0].update(obsolete=True), ".targets[0].obsolete", "obsolete"),
    ],
)  # fmt: skip
def test_what_damond_cannot_do_is_refused_by_name(
    damon: ModuleType, change: Any, where: str, words: str
) -> None:
    doc = damo_document(damon, 1)
    change(doc["kdamonds"][0]["contexts"][0])
    with pytest.raises(fmt.FormatError) as e:
        fmt.parse(doc)
    assert e.value.where == f"kdamonds[0].contexts[0]{where}"
    assert words in str(e.value)


@pytest.mark.parametrize(
    ("text", "us"),
    [("5ms", 5000), ("5 ms", 5000), ("1 s", 10**6), ("1m 30s", 90 * 10**6), ("250 us", 250),
     ("1,000", 1000), (7, 7), ("1.5 ms", 1500), ("2h", 7200 * 10**6)],
)  # fmt: skip
def test_damo_times(text: Any, us: int) -> None:
    assert fmt.time_us(text, "x") == us


@pytest.mark.parametrize(
    ("text", "size"),
    [("4 KiB", 4096), ("4K", 4096), ("1,048,576", 1 << 20), ("2 MiB", 2 << 20), ("1 B", 1),
     (12, 12), ("max", 2**64 - 1)],
)  # fmt: skip
def test_damo_sizes(text: Any, size: int) -> None:
    assert fmt.size_bytes(text, "x") == size


def running(document: dict[str, Any]) -> dict[str, Any]:
    """The tree of document, with every kdamond marked on (as objects say it)."""
    objects = fmt.tree_objects(tree_with(document).root)
    for groups in objects.values():
        if "kdamond" in groups:
            groups["kdamond"]["state"] = "on"
    return objects


def doc(*contexts: dict[str, Any]) -> dict[str, Any]:
    return {"kdamonds": [{"contexts": [c]} for c in contexts]}


def ctx(pids: list[int], aggr: int = 100_000, check: str = "auto") -> dict[str, Any]:
    return {
        "ops": "vaddr",
        "targets": [{"pid": p, "regions": []} for p in pids],
        "intervals": {"aggr_us": aggr},
        "access_check": check,
    }


def states(steps: list[fmt.Step]) -> list[tuple[str, str]]:
    return [(s.path, s.state) for s in steps if isinstance(s, fmt.StateChange)]


def test_a_new_value_for_a_running_kdamond_is_a_commit() -> None:
    steps = fmt.plan(fmt.parse(doc(ctx([1], aggr=200_000))), running(doc(ctx([1]))))
    assert states(steps) == [("kdamonds/0", "commit")]
    assert not [s for s in steps if isinstance(s, fmt.Write) and s.name == "nr"]
    assert fmt.Write(
        "kdamonds/0/contexts/0", "intervals", "aggr_us", 200_000, "u64"
    ) in steps
    # a new pid for the same number of targets commits too
    steps = fmt.plan(fmt.parse(doc(ctx([2]))), running(doc(ctx([1]))))
    assert states(steps) == [("kdamonds/0", "commit")]


def test_a_new_shape_restarts_that_kdamond_only() -> None:
    now = running(doc(ctx([1]), ctx([2])))
    steps = fmt.plan(fmt.parse(doc(ctx([1]), ctx([2, 3]))), now)
    assert states(steps) == [("kdamonds/0", "commit"), ("kdamonds/1", "off"), ("kdamonds/1", "on")]
    steps = fmt.plan(fmt.parse(doc(ctx([1], check="clear_refs"), ctx([2]))), now)
    assert states(steps) == [("kdamonds/0", "off"), ("kdamonds/0", "on"), ("kdamonds/1", "commit")]


def test_another_number_of_kdamonds_rewrites_them_all() -> None:
    steps = fmt.plan(fmt.parse(doc(ctx([1]))), running(doc(ctx([1]), ctx([2]))))
    assert states(steps) == [("kdamonds/0", "off"), ("kdamonds/1", "off"), ("kdamonds/0", "on")]
    assert steps[2] == fmt.kdamonds_nr(1)


# --- schemes (DAMOS) -------------------------------------------------------------------------


def damo_scheme_document(damon: ModuleType, pid: int) -> dict[str, Any]:
    """A context with a scheme as damo writes it: the access pattern in percent and time,
    weights and watermarks in percent, quotas in time and size text, three filters."""
    pattern = damon.DamosAccessPattern(
        ["4 KiB", "max"], ["5 %", "max"], damon.unit_percent, ["2 s", "max"], damon.unit_usec
    )
    scheme = damon.Damos(
        pattern,
        "cold",
        apply_interval_us="1 s",
        quotas=damon.DamosQuotas("10 ms", "64 MiB", "1 s", ["0 %", "30 %", "70 %"]),
        watermarks=damon.DamosWatermarks("free_mem_rate", "5 s", "90 %", "50 %", "10 %"),
        filters=[
            damon.DamosFilter("anon", True, allow=False),
            damon.DamosFilter("addr", True, True, address_range=damon.DamonRegion(4096, 1 << 20)),
            damon.DamosFilter("target", False, damon_target_idx=0),
        ],
    )
    ctx = damon.DamonCtx(
        "vaddr",
        [damon.DamonTarget(pid, [])],
        damon.DamonIntervals("5ms", "100ms", "1s"),
        damon.DamonNrRegionsRange(10, 1000),
        [scheme],
    )
    return {"kdamonds": [damon.Kdamond("off", None, [ctx]).to_kvpairs()]}


def test_a_damo_scheme_reads_in_the_trees_units(damon: ModuleType) -> None:
    doc = damo_scheme_document(damon, 4242)
    pattern = doc["kdamonds"][0]["contexts"][0]["schemes"][0]["access_pattern"]
    assert pattern["nr_accesses"]["min"] == "5 %" and pattern["age"]["min"] == "2 s"  # damo's text
    [spec] = fmt.parse(doc)
    [scheme] = spec.contexts[0].schemes
    files = {n: v for _, n, v in scheme.values}
    # 5 % of 20 samples per aggregation; 2 s of 100 ms aggregations; damo's 'max': no bound
    assert (files["nr_accesses_min"], files["nr_accesses_max"]) == (1, 2**32 - 1)
    assert (files["age_min"], files["age_max"]) == (20, 2**32 - 1)
    assert (files["sz_min"], files["sz_max"]) == (4096, 2**64 - 1)
    assert files["action"] == "cold" and files["apply_interval_us"] == 1_000_000
    assert (files["ms"], files["bytes"], files["reset_interval_ms"]) == (10, 64 << 20, 1000)
    assert (files["weight_sz"], files["weight_nr_accesses"], files["weight_age"]) == (0, 300, 700)
    assert (files["metric"], files["interval_us"]) == ("free_mem_rate", 5_000_000)
    assert (files["high"], files["mid"], files["low"]) == (900, 500, 100)
    filters = [{n: v for _, n, v in f.values} for f in scheme.filters]
    assert [(f["type"], f["matching"], f["allow"]) for f in filters] == [
        ("anon", True, False), ("addr", True, True), ("target", False, False),
    ]  # fmt: skip
    assert (filters[1]["addr_start"], filters[1]["addr_end"]) == (4096, 1 << 20)


@pytest.mark.parametrize(
    ("sample", "aggr", "nr_accesses", "age"),
    [("5ms", "100ms", ["0 %", "100 %"], ["0 us", "max"]),
     ("1ms", "1s", ["7 %", "33.3 %"], ["1 s", "90 s"]),
     ("3ms", "100ms", ["12.5 %", "66 %"], ["150 ms", "max"]),
     ("2ms", "30ms", ["10 %", "max"], ["45 ms", "1 h"]),
     ("5ms", "100ms", [3, 50], [250_000, 10**6])],
)  # fmt: skip
def test_percent_and_time_are_counted_as_damo_counts_them(
    damon: ModuleType, sample: str, aggr: str, nr_accesses: list[Any], age: list[Any]
) -> None:
    """damo's own conversion of the same document (what it writes to the kernel's files)
    is the oracle."""
    intervals = damon.DamonIntervals(sample, aggr, "1s")
    pattern = damon.DamosAccessPattern(
        ["min", "max"], nr_accesses, damon.unit_percent, age, damon.unit_usec
    )
    ctx = damon.DamonCtx("vaddr", [damon.DamonTarget(1, [])], intervals,
                         damon.DamonNrRegionsRange(10, 1000), [damon.Damos(pattern)])  # fmt: skip
    kv = damon.Kdamond("off", None, [ctx]).to_kvpairs()
    [scheme] = fmt.parse({"kdamonds": [kv]})[0].contexts[0].schemes
    [damos] = damon.Kdamond.from_kvpairs(kv).contexts[0].schemes
    kernel = damos.access_pattern.converted_for_units(
        damon.unit_samples, damon.unit_aggr_intervals, intervals
    )
    expected = [
        *(min(int(n.samples), 2**32 - 1) for n in kernel.nr_acc_min_max),
        *(min(int(a.aggr_intervals), 2**32 - 1) for a in kernel.age_min_max),
    ]
    names = ("nr_accesses_min", "nr_accesses_max", "age_min", "age_max")
    assert [scheme.value("access_pattern", n) for n in names] == expected


def test_a_dump_of_schemes_reads_back_in_damo_and_in_damond(damon: ModuleType) -> None:
    document = damo_scheme_document(damon, 77)
    document["kdamonds"][0]["contexts"][0]["schemes"][0]["action"] = "stat"  # any host does it
    dumped = fmt.dump(fmt.tree_objects(tree_with(document).root))
    [kdamond] = [damon.Kdamond.from_kvpairs(kv) for kv in dumped["kdamonds"]]
    [scheme] = kdamond.contexts[0].schemes
    assert scheme.action == "stat" and scheme.apply_interval_us == 1_000_000
    pattern = scheme.access_pattern
    assert (pattern.nr_accesses_unit, pattern.age_unit) == ("samples", "aggr_intervals")
    assert [n.samples for n in pattern.nr_acc_min_max] == [1, 2**32 - 1]
    assert [a.aggr_intervals for a in pattern.age_min_max] == [20, 2**32 - 1]
    assert pattern.sz_bytes == [4096, 2**64 - 1]
    quotas = scheme.quotas
    assert (quotas.time_ms, quotas.sz_bytes, quotas.reset_interval_ms) == (10, 64 << 20, 1000)
    assert (quotas.weight_nr_accesses_permil, quotas.weight_age_permil) == (300, 700)
    marks = scheme.watermarks
    assert (marks.metric, marks.interval_us, marks.high_permil, marks.mid_permil,
            marks.low_permil) == ("free_mem_rate", 5_000_000, 900, 500, 100)  # fmt: skip
    assert [f.to_str(True) for f in scheme.filters] == [
        "reject anon", "allow addr [4096, 1048576) (1044480)", "reject none target 0",
    ]  # fmt: skip
    # damond reads its own dump into the same tree
    assert fmt.parse(dumped)[0].contexts == fmt.parse(document)[0].contexts


@pytest.mark.parametrize(
    ("change", "where", "words"),
    [(lambda s: s.update(action="migrate_cold", target_nid=1), ".action", "migrate_cold"),
     (lambda s: s.update(action="collapse"), ".action", "collapse"),
     (lambda s: s.update(dests=[{"id": 1, "weight": 1}]), ".dests", "migration"),
     (lambda s: s["quotas"].update(goals=[{"metric": "user_input", "target_value": 1,
                                           "current_value": 0}]),
      ".quotas.goals", "quota goals"),
     (lambda s: s["quotas"].update(fail_charge_denom="2"), ".quotas.fail_charge_denom",
      "fail charge"),
     (lambda s: s["filters"][0].update(filter_type="active"), ".filters[0].filter_type",
      "active filter type"),
     (lambda s: s["access_pattern"]["nr_accesses"].update(max="3 samples"),
      ".access_pattern.nr_accesses", "same unit"),
     (lambda s: s["access_pattern"]["nr_accesses"].update(min="5 hz"),
      ".access_pattern.nr_accesses.min", "'5 hz'"),
     (lambda s: s["access_pattern"]["nr_accesses"].update(min=float("nan")),
      ".access_pattern.nr_accesses.min", "finite"),
     (lambda s: s["access_pattern"]["age"].update(min="2 fortnights"),
      ".access_pattern.age.min", "a time"),
     (lambda s: s["access_pattern"]["sz_bytes"].update(min=-1),
      ".access_pattern.sz_bytes.min", "[0,"),
     (lambda s: s["access_pattern"]["nr_accesses"].update(min=-5),
      ".access_pattern.nr_accesses.min", ">= 0"),
     (lambda s: s["quotas"]["weights"].update(age_permil="5,000,000,000"),
      ".quotas.weights.age_permil", "weight_age must be an integer in [0, 4294967295]"),
     (lambda s: s["watermarks"].update(high_permil="90.05 %"), ".watermarks.high_permil",
      "whole number"),
     (lambda s: s["filters"][1].update(matching="perhaps"), ".filters[1].matching",
      "true or false"),
     (lambda s: s.update(actoin="stat"), "", "unknown key 'actoin'")],
)  # fmt: skip
def test_what_damond_cannot_do_in_a_scheme_is_refused_by_name(
    damon: ModuleType, change: Any, where: str, words: str
) -> None:
    doc = damo_scheme_document(damon, 1)
    change(doc["kdamonds"][0]["contexts"][0]["schemes"][0])
    with pytest.raises(fmt.FormatError) as e:
        fmt.parse(doc)
    assert e.value.where == f"kdamonds[0].contexts[0].schemes[0]{where}"
    assert words in str(e.value)


def test_a_percentage_needs_intervals_to_be_counted(damon: ModuleType) -> None:
    doc = damo_scheme_document(damon, 1)
    doc["kdamonds"][0]["contexts"][0]["intervals"]["sample_us"] = 0
    with pytest.raises(fmt.FormatError) as e:
        fmt.parse(doc)
    assert e.value.where.endswith("schemes[0].access_pattern.nr_accesses.min")
    assert "sample_us > 0" in e.value.rule


def with_schemes(context: dict[str, Any], *schemes: dict[str, Any]) -> dict[str, Any]:
    return {**context, "schemes": list(schemes)}


def test_a_scheme_change_of_a_running_kdamond_is_a_commit() -> None:
    was = doc(with_schemes(ctx([1]), {"action": "stat", "filters": [{"filter_type": "anon",
                                                                      "matching": True}]}))
    new = doc(with_schemes(ctx([1]), {
        "action": "cold", "access_pattern": {"age": {"min": "1 s", "max": "max"}},
        "quotas": {"sz_bytes": "1 GiB", "weights": {"age_permil": "100 %"}},
        "filters": [{"filter_type": "addr", "matching": True,
                     "address_range": {"start": 0, "end": "4 KiB"}}],
    }))  # fmt: skip
    steps = fmt.plan(fmt.parse(new), running(was))
    assert states(steps) == [("kdamonds/0", "commit")]
    assert not [s for s in steps if isinstance(s, fmt.Write) and s.name == "nr"]
    scheme, flt = "kdamonds/0/contexts/0/schemes/0", "kdamonds/0/contexts/0/schemes/0/filters/0"
    assert fmt.Write(scheme, "scheme", "action", "cold", "str") in steps
    assert fmt.Write(scheme, "access_pattern", "age_min", 10, "u32") in steps
    assert fmt.Write(scheme, "quotas", "weight_age", 1000, "u32") in steps
    assert fmt.Write(flt, "filter", "type", "addr", "str") in steps
    assert fmt.Write(flt, "filter", "addr_end", 4096, "u64") in steps


def test_another_number_of_schemes_or_filters_restarts_the_kdamond() -> None:
    stat = {"action": "stat"}
    anon = {"action": "stat", "filters": [{"filter_type": "anon", "matching": True}]}
    now = running(doc(with_schemes(ctx([1]), stat)))
    for new in (with_schemes(ctx([1])), with_schemes(ctx([1]), stat, stat),
                with_schemes(ctx([1]), anon)):  # fmt: skip
        steps = fmt.plan(fmt.parse(doc(new)), now)
        assert states(steps) == [("kdamonds/0", "off"), ("kdamonds/0", "on")]
        nrs = [s.value for s in steps if isinstance(s, fmt.Write) and s.group == "schemes"]
        assert nrs == [len(new["schemes"])]


def leaves(value: Any, path: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    """Paths to every value inside a decoded document (containers included)."""
    found = [path]
    if isinstance(value, dict):
        for k, v in value.items():
            found += leaves(v, (*path, k))
    elif isinstance(value, list):
        for i, v in enumerate(value):
            found += leaves(v, (*path, i))
    return found


JSON = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**70), 2**70) | st.floats()
    | st.sampled_from(["", "max", "min", "5 %", "2 s", "3 samples", "4 KiB", "-1", "1e9",
                       "1.5", "yes", "anon", "addr", "stat", "x y z"]) | st.text(max_size=8),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=6), inner,
                                                                max_size=3),
    max_leaves=6,
)  # fmt: skip


@given(data=st.data())
@settings(max_examples=300, deadline=None)
def test_any_value_anywhere_in_a_scheme_is_read_or_refused_by_name(
    damon: ModuleType, data: st.DataObject
) -> None:
    """No value makes the reader (or the tree it builds) fail otherwise than with the
    format's or the tree's own error, which names where."""
    from damond.errors import DamondError

    document = damo_scheme_document(damon, 1)
    scheme = document["kdamonds"][0]["contexts"][0]["schemes"][0]
    path = data.draw(st.sampled_from(leaves(scheme)[1:]))
    parent = scheme
    for part in path[:-1]:
        parent = parent[part]
    parent[path[-1]] = data.draw(JSON)
    try:
        fmt.parse(document)
    except fmt.FormatError as e:
        assert e.where.startswith("kdamonds[0].contexts[0].schemes[0]"), e
        return
    try:
        tree_with(document)
    except DamondError as e:
        assert e.where.startswith("kdamonds/0/contexts/0/schemes/0"), e
