"""damo's kdamonds format: damond's declarative configuration, and the dump of its tree.

damo, the DAMON user-space tool, writes DAMON parameters as ``{"kdamonds":
[kdamond, …]}`` (``damo args damon --format json``, ``damo report damon
--json``): a kdamond has a ``state`` and ``contexts``; a context ``ops``,
``targets`` (``pid``, ``regions`` of ``start``/``end``), ``intervals``
(``sample_us``, ``aggr_us``, ``ops_update_us``), ``nr_regions`` (``min``,
``max``) and ``schemes``. Numbers are plain, or damo's text: ``"5 ms"``,
``"1,000"``, ``"4 KiB"``, ``"max"``. The same shape, read by the daemon at start
and on reload and by damondctl, makes a damo user's file start damond; a dump
of damond's tree reads back in damo (its parser ignores the keys it does not
know, such as damond's ``access_check``).

What damo can say that damond cannot do (schemes, interval auto-tuning,
address units, probes, sample filters, pause) is refused by name rather than
ignored: a file must not mean less here than it says.

This module only translates: a file becomes a list of Steps (attribute writes
and state changes on tree paths), run by whoever owns the tree — the daemon
through its Nodes, damondctl through D-Bus — so both go through the same
validation as any client's write.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from damond.hierarchy import (
    STATE_COMMIT,
    STATE_OFF,
    STATE_ON,
    U64_MAX,
    Attribute,
    Context,
    Kdamond,
    Kdamonds,
    Node,
    Region,
    Target,
)

TreeObjects = Mapping[str, Mapping[str, Mapping[str, Any]]]
"""The admin tree as plain data: relative path ('' for the root, ``kdamonds/0``, …)
→ attribute group → attribute name → value."""


class FormatError(ValueError):
    """A file that is not damo's kdamonds format, or asks for what damond cannot do.

    ``where`` is a path into the document, e.g. ``kdamonds[0].contexts[0].intervals``.
    """

    def __init__(self, where: str, rule: str) -> None:
        super().__init__(f"{where}: {rule}" if where else rule)
        self.where = where
        self.rule = rule


# --- damo's numbers ------------------------------------------------------------------

_NS_PER = {
    "ns": 1,
    "us": 1_000,
    "ms": 1_000_000,
    "s": 10**9,
    "m": 60 * 10**9,
    "h": 3600 * 10**9,
    "d": 86400 * 10**9,
}
_BYTES_PER = {
    "": 1,
    "B": 1,
    **{f"{p}{s}": 1 << (10 * i) for i, p in enumerate("KMGTPE", 1) for s in ("", "B", "iB")},
}
_QUANTITY = re.compile(r"\s*([0-9][0-9,]*(?:\.[0-9]+)?)\s*([A-Za-z]*)\s*")


def _plain(value: Any, where: str) -> int | float:
    if isinstance(value, bool) or not isinstance(value, int | float | str):
        raise FormatError(where, f"must be a number, not {value!r}")
    if isinstance(value, str):
        if value.strip() == "max":
            return U64_MAX
        try:
            return float(value.replace(",", "")) if "." in value else int(value.replace(",", ""))
        except ValueError:
            raise FormatError(where, f"must be a number, not {value!r}") from None
    return value


def _integral(number: float, where: str, unit: str) -> int:
    if isinstance(number, float) and (not math.isfinite(number) or number != int(number)):
        raise FormatError(where, f"must be a whole number of {unit}, not {number!r}")
    number = int(number)
    if not 0 <= number <= U64_MAX:
        raise FormatError(where, f"must be in [0, {U64_MAX}], not {number}")
    return number


def _with_units(value: Any, where: str, units: Mapping[str, int], kind: str) -> float:
    """A number given with damo's units ('5 ms', '1 m 30 s', '4 KiB'), in the smallest unit."""
    if not isinstance(value, str):
        return _plain(value, where)
    total = 0.0
    rest = value.strip()
    if not rest:
        raise FormatError(where, f"must be a {kind}, not {value!r}")
    while rest:
        match = _QUANTITY.match(rest)
        if not match or match.group(2) not in units:
            raise FormatError(
                where,
                f"must be a {kind} (a number, or with a unit of "
                f"{', '.join(u for u in units if u)}), not {value!r}",
            )
        total += float(match.group(1).replace(",", "")) * units[match.group(2)]
        rest = rest[match.end() :]
    return total


def time_us(value: Any, where: str) -> int:
    """damo's time ('5 ms', '100ms', '1 s', or plain microseconds) in microseconds."""
    if isinstance(value, str) and value.strip() == "max":
        return U64_MAX
    if isinstance(value, str) and not value.strip().replace(",", "").isdigit():
        ns = _with_units(value, where, _NS_PER, "time")
        return _integral(round(ns / 1000, 6), where, "microseconds")
    return _integral(_plain(value, where), where, "microseconds")


def size_bytes(value: Any, where: str) -> int:
    """damo's size ('4 KiB', '1,048,576', '2M', 'max', or plain bytes) in bytes."""
    if isinstance(value, str) and value.strip() == "max":
        return U64_MAX
    return _integral(_with_units(value, where, _BYTES_PER, "size"), where, "bytes")


def number(value: Any, where: str) -> int:
    """damo's count ('1,000', 'max', or plain)."""
    return _integral(_plain(value, where), where, "units")


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


def _stored(node: type[Node], group: str) -> tuple[Attribute, ...]:
    """The writable files of a node's group that keep a value (not `nr`, not `state`)."""
    return tuple(a for a in node.GROUPS[group] if a.writable and a.field is not None)


def _attribute(node: type[Node], group: str, name: str) -> Attribute:
    return next(a for a in node.GROUPS[group] if a.name == name)


DAMO_CONTEXT_KEYS = {
    "intervals": {"sample_us": "sample_us", "aggr_us": "aggr_us", "ops_update_us": "update_us"},
    "nr_regions": {"min": "min", "max": "max"},
}
"""damo's key → damond's attribute, in the groups of the same names."""

OPERATIONS = "operations"


def context_extensions() -> tuple[Attribute, ...]:
    """The writable files of org.damond1.Context besides ``operations`` (access_check, …):
    damond's additions to damo's context, written and read under their own names."""
    return tuple(a for a in _stored(Context, "context") if a.name != OPERATIONS)


@dataclass(frozen=True)
class TargetSpec:
    pid: int
    regions: tuple[tuple[int, int], ...]


@dataclass(frozen=True)
class ContextSpec:
    values: tuple[tuple[str, str, Any], ...]
    """(group, attribute, value) for every stored file of the context, defaults filled in."""
    targets: tuple[TargetSpec, ...]

    def value(self, group: str, name: str) -> Any:
        return next(v for g, n, v in self.values if g == group and n == name)


@dataclass(frozen=True)
class KdamondSpec:
    on: bool
    contexts: tuple[ContextSpec, ...]


# --- reading a document -----------------------------------------------------------------


def _mapping(value: Any, where: str) -> Mapping[str, Any]:
    if not isinstance(value, Mapping):
        raise FormatError(where, f"must be a mapping (JSON object), not {type(value).__name__}")
    return value


def _list(value: Any, where: str) -> Sequence[Any]:
    if not isinstance(value, list):
        raise FormatError(where, f"must be a list, not {type(value).__name__}")
    return value


def _known_keys(kv: Mapping[str, Any], known: Iterable[str], where: str) -> None:
    unknown = sorted(set(kv) - set(known))
    if unknown:
        raise FormatError(
            where, f"unknown key {unknown[0]!r} (known here: {', '.join(sorted(known))})"
        )


def _refuse_unless(ok: bool, where: str, what: str) -> None:
    if not ok:
        raise FormatError(where, f"{what} is not supported by damond")


def parse(document: Any) -> list[KdamondSpec]:
    """The kdamonds of a decoded damo document: ``{"kdamonds": [...]}``, or the bare list
    that damo's record writes beside a record (FILE.kdamonds). FormatError if it is not."""
    if isinstance(document, Mapping):
        _known_keys(document, ("kdamonds",), "")
        if "kdamonds" not in document:
            raise FormatError("", "has no 'kdamonds' list")
        document = document["kdamonds"]
    kdamonds = _list(document, "kdamonds")
    return [_kdamond(kv, f"kdamonds[{k}]") for k, kv in enumerate(kdamonds)]


def _kdamond(value: Any, where: str) -> KdamondSpec:
    kv = _mapping(value, where)
    _known_keys(kv, ("state", "pid", "refresh_ms", "contexts"), where)
    state = kv.get("state") or STATE_ON  # damo's parameter dumps carry no state: start
    if state not in (STATE_ON, STATE_OFF):
        raise FormatError(f"{where}.state", f"must be {STATE_ON} or {STATE_OFF}, not {state!r}")
    contexts = _list(kv.get("contexts", []), f"{where}.contexts")
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
        for attr in _stored(Context, group):
            values.append((group, attr.name, given.get((group, attr.name), attr.default)))
    unknown = set(given) - {(g, n) for g, n, _ in values}
    if unknown:
        group, name = sorted(unknown)[0]
        raise ValueError(f"this damond's contexts have no {group} attribute {name!r}")
    return ContextSpec(tuple(values), tuple(targets))


def _context(value: Any, where: str) -> ContextSpec:
    kv = _mapping(value, where)
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
    _known_keys(kv, (*damo_keys, *extensions), where)
    _refuse_unless(
        size_bytes(kv.get("addr_unit", 1), f"{where}.addr_unit") == 1,
        f"{where}.addr_unit",
        "an addr_unit other than 1",
    )
    _refuse_unless(not _list(kv.get("probes", []), f"{where}.probes"), f"{where}.probes", "probes")
    _refuse_unless(kv.get("pause", False) in (False, "false", "no", "n"), f"{where}.pause", "pause")
    _sample_control(kv.get("sample_control"), f"{where}.sample_control")
    if _list(kv.get("schemes", []), f"{where}.schemes"):
        raise FormatError(
            f"{where}.schemes", "schemes (DAMOS) are not served by damond yet: remove them"
        )
    values: list[tuple[str, str, Any]] = []
    for attr in _stored(Context, "context"):
        key = "ops" if attr.name == OPERATIONS else attr.name
        given = kv.get(key, attr.default)
        if attr.kind != "str":  # a number of damond's (cpu_limit_pct), written as damo's
            given = number(given, f"{where}.{key}")
        elif not isinstance(given, str):
            raise FormatError(f"{where}.{key}", f"must be a string, not {given!r}")
        values.append(("context", attr.name, given))
    for group, keys in DAMO_CONTEXT_KEYS.items():
        section = _mapping(kv.get(group, {}), f"{where}.{group}")
        extra = {"intervals_goal"} if group == "intervals" else set()
        _known_keys(section, (*keys, *extra), f"{where}.{group}")
        if "intervals_goal" in section:
            _intervals_goal(section["intervals_goal"], f"{where}.{group}.intervals_goal")
        for key, name in keys.items():
            attr = _attribute(Context, group, name)
            spot = f"{where}.{group}.{key}"
            convert = time_us if group == "intervals" else number
            values.append(
                (group, name, convert(section[key], spot) if key in section else attr.default)
            )
    targets = _list(kv.get("targets", []), f"{where}.targets")
    return ContextSpec(
        tuple(values), tuple(_target(t, f"{where}.targets[{i}]") for i, t in enumerate(targets))
    )


def _sample_control(value: Any, where: str) -> None:
    if value is None:
        return
    kv = _mapping(value, where)
    _known_keys(kv, ("primitives_enabled", "sample_filters"), where)
    primitives = _mapping(kv.get("primitives_enabled", {}), f"{where}.primitives_enabled")
    _refuse_unless(
        primitives.get("page_table", True) is True and primitives.get("page_fault", False) is False,
        f"{where}.primitives_enabled",
        "sampling other than by page table (page_fault)",
    )
    _refuse_unless(
        not _list(kv.get("sample_filters", []), f"{where}.sample_filters"),
        f"{where}.sample_filters",
        "sample filters",
    )


def _intervals_goal(value: Any, where: str) -> None:
    kv = _mapping(value, where)
    _refuse_unless(
        number(kv.get("aggrs", 0), f"{where}.aggrs") == 0,
        where,
        "intervals auto-tuning (intervals_goal with aggrs > 0)",
    )


def _target(value: Any, where: str) -> TargetSpec:
    kv = _mapping(value, where)
    _known_keys(kv, ("pid", "obsolete", "regions"), where)
    _refuse_unless(
        kv.get("obsolete", False) in (False, "false", "no", "n"),
        f"{where}.obsolete",
        "an obsolete target",
    )
    pid = kv.get("pid")
    if pid is None:
        pid = _attribute(Target, "target", "pid").default
    elif isinstance(pid, bool) or not isinstance(pid, int):
        raise FormatError(f"{where}.pid", f"must be an integer or null, not {pid!r}")
    regions = []
    for i, region in enumerate(_list(kv.get("regions", []), f"{where}.regions")):
        spot = f"{where}.regions[{i}]"
        rkv = _mapping(region, spot)
        # damo's status dumps carry a region's last results too; they are not configuration
        _known_keys(
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
    return Write(path, collection, "nr", n, _attribute(node, collection, "nr").kind)


def _value(path: str, node: type[Node], group: str, name: str, value: Any) -> Write:
    return Write(path, group, name, value, _attribute(node, group, name).kind)


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
        for t, target in enumerate(context.targets):
            tpath = f"{path}/targets/{t}"
            writes.append(_value(tpath, Target, "target", "pid", target.pid))
            if structure:
                writes.append(_nr(tpath, Target, "regions", len(target.regions)))
            for r, (start, end) in enumerate(target.regions):
                rpath = f"{tpath}/regions/{r}"
                writes.append(_value(rpath, Region, "region", "start", start))
                writes.append(_value(rpath, Region, "region", "end", end))
    return writes


def build(specs: Sequence[KdamondSpec]) -> list[Step]:
    """The steps that make an empty tree what specs say, kdamonds on last."""
    steps: list[Step] = [kdamonds_nr(len(specs))]
    for k, spec in enumerate(specs):
        steps.extend(kdamond_writes(k, spec, structure=True))
    steps.extend(StateChange(kdamond_path(k), STATE_ON) for k, s in enumerate(specs) if s.on)
    return steps


def _shape(spec: KdamondSpec) -> tuple[Any, ...]:
    """What a commit cannot change: the count of everything, and each context's own files."""
    return tuple(
        (
            tuple((n, v) for g, n, v in c.values if g == "context"),
            tuple(len(t.regions) for t in c.targets),
        )
        for c in spec.contexts
    )


def plan(specs: Sequence[KdamondSpec], current: TreeObjects) -> list[Step]:
    """The steps from the current tree to specs, keeping what can keep running.

    A kdamond that runs and keeps its shape (contexts, targets and regions
    counted, operations, access check and the context's other files) gets the
    new values and a `commit`, or `off` if the document says so: it never stops
    for a change of intervals, region bounds, pids or region addresses. One whose
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
            values = tuple(
                (group, attr.name, objects[ctx][group][attr.name])
                for group in ("context", *DAMO_CONTEXT_KEYS)
                for attr in _stored(Context, group)
                if attr.name in objects[ctx].get(group, {})
            )
            targets = tuple(
                TargetSpec(
                    objects[t]["target"]["pid"],
                    tuple(
                        (objects[r]["region"]["start"], objects[r]["region"]["end"])
                        for r in children(objects, t, "regions")
                    ),
                )
                for t in children(objects, ctx, "targets")
            )
            contexts.append(ContextSpec(values, targets))
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
                    "pid": t.pid,
                    "obsolete": False,
                    "regions": [{"start": s, "end": e} for s, e in t.regions],
                }
                for t in context.targets
            ]
            for group, keys in DAMO_CONTEXT_KEYS.items():
                kv[group] = {key: context.value(group, name) for key, name in keys.items()}
            kv["schemes"] = []
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
