"""damo's kdamonds format: damond's declarative configuration, and the dump of its tree.

damo, the DAMON user-space tool, writes DAMON parameters as ``{"kdamonds":
[kdamond, …]}`` (``damo args damon --format json``, ``damo report damon
--json``): a kdamond has a ``state`` and ``contexts``; a context ``ops``,
``targets`` (``pid``, ``regions`` of ``start``/``end``), ``intervals``
(``sample_us``, ``aggr_us``, ``ops_update_us``), ``nr_regions`` (``min``,
``max``) and ``schemes`` (DAMOS, read and written by damos_format.py). Numbers
are plain, or damo's text: ``"5 ms"``, ``"1,000"``, ``"4 KiB"``, ``"max"``
(damo_text.py). The same shape, read by the daemon at start
and on reload and by damondctl, makes a damo user's file start damond; a dump
of damond's tree reads back in damo (its parser ignores the keys it does not
know, such as damond's ``access_check``).

What damo can say that damond cannot do (interval auto-tuning, address units,
probes, sample filters, pause; quota goals, migration and the filter types
damond lacks in schemes) is refused by name rather than ignored: a file must
not mean less here than it says.

This module only translates: a file becomes a list of Steps (attribute writes
and state changes on tree paths), run by whoever owns the tree — the daemon
through its Nodes, damondctl through D-Bus — so both go through the same
validation as any client's write.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from damond import damo_text as t
from damond import damos_format as damos
from damond.damo_text import FormatError as FormatError  # re-exported: clients catch it
from damond.damo_text import number as number
from damond.damo_text import size_bytes as size_bytes
from damond.damo_text import time_us as time_us
from damond.hierarchy import (
    STATE_COMMIT,
    STATE_OFF,
    STATE_ON,
    Attribute,
    Context,
    Filter,
    Kdamond,
    Kdamonds,
    Node,
    Region,
    Scheme,
    Target,
)

TreeObjects = Mapping[str, Mapping[str, Mapping[str, Any]]]
"""The admin tree as plain data: relative path ('' for the root, ``kdamonds/0``, …)
→ attribute group → attribute name → value."""


# --- the tree's side: which files a document sets ----------------------------------------


@dataclass(frozen=True)
class Write:
    """Set one attribute of a tree object (its relative path)."""

    path: str
    group: str
    name: str
    value: Any
    kind: str
    """The attribute's value kind (hierarchy.Attribute.kind), for typed transports."""


@dataclass(frozen=True)
class StateChange:
    """Write a kdamond's ``state``: on, off or commit."""

    path: str
    state: str


Step = Write | StateChange


DAMO_CONTEXT_KEYS = {
    "intervals": {"sample_us": "sample_us", "aggr_us": "aggr_us", "ops_update_us": "update_us"},
    "nr_regions": {"min": "min", "max": "max"},
}
"""damo's key → damond's attribute, in the groups of the same names."""

OPERATIONS = "operations"


def context_extensions() -> tuple[Attribute, ...]:
    """The writable files of org.damond1.Context besides ``operations`` (access_check, …):
    damond's additions to damo's context, written and read under their own names."""
    return tuple(a for a in t.stored_files(Context, "context") if a.name != OPERATIONS)


@dataclass(frozen=True)
class TargetSpec:
    pid: int
    regions: tuple[tuple[int, int], ...]


@dataclass(frozen=True)
class ContextSpec(damos.Files):
    """Every stored file of the context (defaults filled in), its targets and schemes."""

    targets: tuple[TargetSpec, ...]
    schemes: tuple[damos.SchemeSpec, ...] = ()


@dataclass(frozen=True)
class KdamondSpec:
    on: bool
    contexts: tuple[ContextSpec, ...]


# --- reading a document -----------------------------------------------------------------


def parse(document: Any) -> list[KdamondSpec]:
    """The kdamonds of a decoded damo document: ``{"kdamonds": [...]}``, or the bare list
    that damo's record writes beside a record (FILE.kdamonds). FormatError if it is not."""
    if isinstance(document, Mapping):
        t.known_keys(document, ("kdamonds",), "")
        if "kdamonds" not in document:
            raise FormatError("", "has no 'kdamonds' list")
        document = document["kdamonds"]
    kdamonds = t.listed(document, "kdamonds")
    return [_kdamond(kv, f"kdamonds[{k}]") for k, kv in enumerate(kdamonds)]


def _kdamond(value: Any, where: str) -> KdamondSpec:
    kv = t.mapping(value, where)
    t.known_keys(kv, ("state", "pid", "refresh_ms", "contexts"), where)
    state = kv.get("state") or STATE_ON  # damo's parameter dumps carry no state: start
    if state not in (STATE_ON, STATE_OFF):
        raise FormatError(f"{where}.state", f"must be {STATE_ON} or {STATE_OFF}, not {state!r}")
    contexts = t.listed(kv.get("contexts", []), f"{where}.contexts")
    return KdamondSpec(
        state == STATE_ON,
        tuple(_context(c, f"{where}.contexts[{i}]") for i, c in enumerate(contexts)),
    )


def context_spec(
    given: Mapping[tuple[str, str], Any], targets: Sequence[TargetSpec]
) -> ContextSpec:
    """A context from (group, attribute) → value, every other file at its default;
    ValueError naming an attribute this damond's context does not have."""
    values = []
    for group in ("context", *DAMO_CONTEXT_KEYS):
        for attr in t.stored_files(Context, group):
            values.append((group, attr.name, given.get((group, attr.name), attr.default)))
    unknown = set(given) - {(g, n) for g, n, _ in values}
    if unknown:
        group, name = sorted(unknown)[0]
        raise ValueError(f"this damond's contexts have no {group} attribute {name!r}")
    return ContextSpec(tuple(values), tuple(targets))


def _context(value: Any, where: str) -> ContextSpec:
    kv = t.mapping(value, where)
    extensions = {a.name: a for a in context_extensions()}
    damo_keys = (
        "ops",
        "addr_unit",
        "targets",
        "intervals",
        "nr_regions",
        "probes",
        "sample_control",
        "pause",
        "schemes",
    )
    t.known_keys(kv, (*damo_keys, *extensions), where)
    t.refuse_unless(
        size_bytes(kv.get("addr_unit", 1), f"{where}.addr_unit") == 1,
        f"{where}.addr_unit",
        "an addr_unit other than 1",
    )
    t.refuse_unless(
        not t.listed(kv.get("probes", []), f"{where}.probes"), f"{where}.probes", "probes"
    )
    t.refuse_unless(
        kv.get("pause", False) in (False, "false", "no", "n"), f"{where}.pause", "pause"
    )
    _sample_control(kv.get("sample_control"), f"{where}.sample_control")
    values: list[tuple[str, str, Any]] = []
    for attr in t.stored_files(Context, "context"):
        key = "ops" if attr.name == OPERATIONS else attr.name
        given = kv.get(key, attr.default)
        if attr.kind != "str":  # a number of damond's (cpu_limit_pct), written as damo's
            given = number(given, f"{where}.{key}")
        elif not isinstance(given, str):
            raise FormatError(f"{where}.{key}", f"must be a string, not {given!r}")
        values.append(("context", attr.name, given))
    for group, keys in DAMO_CONTEXT_KEYS.items():
        section = t.mapping(kv.get(group, {}), f"{where}.{group}")
        extra = {"intervals_goal"} if group == "intervals" else set()
        t.known_keys(section, (*keys, *extra), f"{where}.{group}")
        if "intervals_goal" in section:
            _intervals_goal(section["intervals_goal"], f"{where}.{group}.intervals_goal")
        for key, name in keys.items():
            attr = t.attribute(Context, group, name)
            spot = f"{where}.{group}.{key}"
            convert = time_us if group == "intervals" else number
            values.append(
                (group, name, convert(section[key], spot) if key in section else attr.default)
            )
    targets = t.listed(kv.get("targets", []), f"{where}.targets")
    intervals = {name: v for g, name, v in values if g == "intervals"}
    schemes = damos.parse_schemes(
        kv.get("schemes") or [],
        f"{where}.schemes",
        damos.Intervals(intervals["sample_us"], intervals["aggr_us"]),
    )
    return ContextSpec(
        tuple(values),
        tuple(_target(target, f"{where}.targets[{i}]") for i, target in enumerate(targets)),
        schemes,
    )


def _sample_control(value: Any, where: str) -> None:
    if value is None:
        return
    kv = t.mapping(value, where)
    t.known_keys(kv, ("primitives_enabled", "sample_filters"), where)
    primitives = t.mapping(kv.get("primitives_enabled", {}), f"{where}.primitives_enabled")
    t.refuse_unless(
        primitives.get("page_table", True) is True and primitives.get("page_fault", False) is False,
        f"{where}.primitives_enabled",
        "sampling other than by page table (page_fault)",
    )
    t.refuse_unless(
        not t.listed(kv.get("sample_filters", []), f"{where}.sample_filters"),
        f"{where}.sample_filters",
        "sample filters",
    )


def _intervals_goal(value: Any, where: str) -> None:
    kv = t.mapping(value, where)
    t.refuse_unless(
        number(kv.get("aggrs", 0), f"{where}.aggrs") == 0,
        where,
        "intervals auto-tuning (intervals_goal with aggrs > 0)",
    )


def _target(value: Any, where: str) -> TargetSpec:
    kv = t.mapping(value, where)
    t.known_keys(kv, ("pid", "obsolete", "regions"), where)
    t.refuse_unless(
        kv.get("obsolete", False) in (False, "false", "no", "n"),
        f"{where}.obsolete",
        "an obsolete target",
    )
    pid = kv.get("pid")
    if pid is None:
        pid = t.attribute(Target, "target", "pid").default
    elif isinstance(pid, bool) or not isinstance(pid, int):
        raise FormatError(f"{where}.pid", f"must be an integer or null, not {pid!r}")
    regions = []
    for i, region in enumerate(t.listed(kv.get("regions", []), f"{where}.regions")):
        spot = f"{where}.regions[{i}]"
        rkv = t.mapping(region, spot)
        # damo's status dumps carry a region's last results too; they are not configuration
        t.known_keys(
            rkv, ("start", "end", "nr_accesses", "age", "probe_hits", "sz_filter_passed"), spot
        )
        for key in ("start", "end"):
            if key not in rkv:
                raise FormatError(spot, f"has no {key!r}")
        regions.append(
            (size_bytes(rkv["start"], f"{spot}.start"), size_bytes(rkv["end"], f"{spot}.end"))
        )
    return TargetSpec(pid, tuple(regions))


# --- from specs to steps ----------------------------------------------------------------


def _nr(path: str, node: type[Node], collection: str, n: int) -> Write:
    return Write(path, collection, "nr", n, t.attribute(node, collection, "nr").kind)


def _value(path: str, node: type[Node], group: str, name: str, value: Any) -> Write:
    return Write(path, group, name, value, t.attribute(node, group, name).kind)


def kdamonds_nr(n: int) -> Write:
    """Set the number of kdamonds."""
    return _nr("", Kdamonds, "kdamonds", n)


def kdamond_path(k: int) -> str:
    return f"kdamonds/{k}"


def kdamond_writes(k: int, spec: KdamondSpec, structure: bool) -> list[Write]:
    """Every file under kdamond k that spec sets; without `nr` and the context's own
    files (operations, access_check, …) when not ``structure`` (a commit keeps them)."""
    kd = kdamond_path(k)
    writes = [_nr(kd, Kdamond, "contexts", len(spec.contexts))] if structure else []
    for c, context in enumerate(spec.contexts):
        path = f"{kd}/contexts/{c}"
        for group, name, value in context.values:
            if structure or group != "context":
                writes.append(_value(path, Context, group, name, value))
        if structure:
            writes.append(_nr(path, Context, "targets", len(context.targets)))
        for ti, target in enumerate(context.targets):
            tpath = f"{path}/targets/{ti}"
            writes.append(_value(tpath, Target, "target", "pid", target.pid))
            if structure:
                writes.append(_nr(tpath, Target, "regions", len(target.regions)))
            for r, (start, end) in enumerate(target.regions):
                rpath = f"{tpath}/regions/{r}"
                writes.append(_value(rpath, Region, "region", "start", start))
                writes.append(_value(rpath, Region, "region", "end", end))
        writes.extend(_scheme_writes(path, context.schemes, structure))
    return writes


def _scheme_writes(
    context: str, schemes: Sequence[damos.SchemeSpec], structure: bool
) -> list[Write]:
    """The files of a context's schemes and their filters (with their `nr` if structure).
    After the context's own files: whether an action can be done depends on operations."""
    writes = [_nr(context, Context, "schemes", len(schemes))] if structure else []
    for s, scheme in enumerate(schemes):
        spath = f"{context}/schemes/{s}"
        writes.extend(_value(spath, Scheme, g, n, v) for g, n, v in scheme.values)
        if structure:
            writes.append(_nr(spath, Scheme, "filters", len(scheme.filters)))
        for f, filter_spec in enumerate(scheme.filters):
            fpath = f"{spath}/filters/{f}"
            writes.extend(_value(fpath, Filter, g, n, v) for g, n, v in filter_spec.values)
    return writes


def build(specs: Sequence[KdamondSpec]) -> list[Step]:
    """The steps that make an empty tree what specs say, kdamonds on last."""
    steps: list[Step] = [kdamonds_nr(len(specs))]
    for k, spec in enumerate(specs):
        steps.extend(kdamond_writes(k, spec, structure=True))
    steps.extend(StateChange(kdamond_path(k), STATE_ON) for k, s in enumerate(specs) if s.on)
    return steps


def _shape(spec: KdamondSpec) -> tuple[Any, ...]:
    """What a commit cannot change: the count of everything (schemes and their filters
    too), and each context's own files."""
    return tuple(
        (
            tuple((n, v) for g, n, v in c.values if g == "context"),
            tuple(len(target.regions) for target in c.targets),
            tuple(len(scheme.filters) for scheme in c.schemes),
        )
        for c in spec.contexts
    )


def plan(specs: Sequence[KdamondSpec], current: TreeObjects) -> list[Step]:
    """The steps from the current tree to specs, keeping what can keep running.

    A kdamond that runs and keeps its shape (contexts, targets, regions, schemes
    and their filters counted, operations, access check and the context's other
    files) gets the new values and a `commit`, or `off` if the document says so:
    it never stops for a change of intervals, region bounds, pids, region
    addresses or a scheme's files (its action, pattern, quotas, watermarks,
    filters), and its schemes keep their stats, as the kernel's commit keeps them. One whose
    shape changed is turned off, rewritten and turned on again. A change of the
    number of kdamonds rewrites them all, since `nr` cannot change while any
    kdamond runs (the kernel's rule).
    """
    count = current[""]["kdamonds"]["nr"]
    running = [current[kdamond_path(k)]["kdamond"]["state"] == STATE_ON for k in range(count)]
    if count != len(specs):
        stops: list[Step] = [
            StateChange(kdamond_path(k), STATE_OFF) for k in range(count) if running[k]
        ]
        return stops + build(specs)
    steps: list[Step] = []
    for k, spec in enumerate(specs):
        was = parse_tree(current, only=k)[0]
        if running[k] and _shape(was) == _shape(spec):
            steps.extend(kdamond_writes(k, spec, structure=False))
            steps.append(StateChange(kdamond_path(k), STATE_COMMIT if spec.on else STATE_OFF))
            continue
        if running[k]:
            steps.append(StateChange(kdamond_path(k), STATE_OFF))
        steps.extend(kdamond_writes(k, spec, structure=True))
        if spec.on:
            steps.append(StateChange(kdamond_path(k), STATE_ON))
    return steps


# --- from the tree to a document --------------------------------------------------------


def children(objects: TreeObjects, path: str, collection: str) -> list[str]:
    """Paths of a collection's children, in index order (as many as exist)."""
    prefix = f"{path}/{collection}/" if path else f"{collection}/"
    found: list[str] = []
    while f"{prefix}{len(found)}" in objects:
        found.append(f"{prefix}{len(found)}")
    return found


def parse_tree(objects: TreeObjects, only: int | None = None) -> list[KdamondSpec]:
    """The specs a tree holds (all kdamonds, or kdamond ``only``)."""
    paths = children(objects, "", "kdamonds")
    if only is not None:
        paths = [paths[only]]
    specs = []
    for kd in paths:
        contexts = []
        for ctx in children(objects, kd, "contexts"):
            values = damos.files_of(objects[ctx], Context, ("context", *DAMO_CONTEXT_KEYS))
            targets = tuple(
                TargetSpec(
                    objects[tp]["target"]["pid"],
                    tuple(
                        (objects[r]["region"]["start"], objects[r]["region"]["end"])
                        for r in children(objects, tp, "regions")
                    ),
                )
                for tp in children(objects, ctx, "targets")
            )
            schemes = tuple(
                damos.from_objects(objects, s, children(objects, s, "filters"))
                for s in children(objects, ctx, "schemes")
            )
            contexts.append(ContextSpec(values, targets, schemes))
        specs.append(KdamondSpec(objects[kd]["kdamond"]["state"] == STATE_ON, tuple(contexts)))
    return specs


def dump(objects: TreeObjects) -> dict[str, Any]:
    """The tree as damo's kdamonds document (raw numbers; damond's extra keys beside)."""
    kdamonds = []
    for kd, spec in zip(children(objects, "", "kdamonds"), parse_tree(objects), strict=True):
        pid = objects[kd]["kdamond"].get("pid", -1)
        contexts = []
        for context in spec.contexts:
            kv: dict[str, Any] = {"ops": context.value("context", OPERATIONS), "addr_unit": 1}
            kv["targets"] = [
                {
                    "pid": target.pid,
                    "obsolete": False,
                    "regions": [{"start": s, "end": e} for s, e in target.regions],
                }
                for target in context.targets
            ]
            for group, keys in DAMO_CONTEXT_KEYS.items():
                kv[group] = {key: context.value(group, name) for key, name in keys.items()}
            kv["schemes"] = [damos.to_damo(scheme) for scheme in context.schemes]
            for attr in context_extensions():
                if any(g == "context" and n == attr.name for g, n, _ in context.values):
                    kv[attr.name] = context.value("context", attr.name)
            contexts.append(kv)
        kdamonds.append(
            {
                "state": STATE_ON if spec.on else STATE_OFF,
                "pid": pid if pid != -1 else None,
                "refresh_ms": 0,
                "contexts": contexts,
            }
        )
    return {"kdamonds": kdamonds}


def tree_objects(root: Node) -> dict[str, dict[str, dict[str, Any]]]:
    """A tree's objects as plain data (TreeObjects), read through its attributes."""
    return {
        node.path: {
            group: {a.name: node.get(group, a.name) for a in attrs}
            for group, attrs in node.GROUPS.items()
        }
        for node in root.walk()
    }
