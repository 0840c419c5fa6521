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
        (lambda c: c.update(schemes=[{"action": "pageout"}]), ".schemes", "DAMOS"),
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
