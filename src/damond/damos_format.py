"""damo's DAMOS schemes ↔ the files of the tree's schemes subtree.

A damo scheme (``_damon.Damos`` in damo's source) is ``action``,
``access_pattern`` (``sz_bytes``, ``nr_accesses``, ``age``, each min/max),
``apply_interval_us``, ``quotas`` (``time_ms``, ``sz_bytes``,
``reset_interval_ms``, ``weights``), ``watermarks`` (``metric``,
``interval_us``, ``high/mid/low_permil``) and ``filters`` (``filter_type``,
``matching``, ``allow``, ``memcg_path``, ``address_range``,
``damon_target_idx``). The tree's files are the kernel's sysfs files (docs/dbus-api.md):
a scheme's ``nr_accesses`` counts samples per aggregation and its ``age``
aggregations, where damo lets a user write a share of the aggregation
(``"5 %"``, and plain numbers are percent) and a time (``"2 s"``, and plain
numbers are microseconds). Those are converted with the context's intervals as
damo converts them before it writes the kernel's files (samples =
int(percent × aggr / sample / 100), aggregations = int(µs / aggr)); a bound past
the tree's 2^32 − 1 (damo's ``"max"``) is that largest count. A dump writes
``"N samples"`` and ``"N aggr_intervals"``, which damo reads back exactly.

What damo can say and damond cannot do is refused by name: quota goals and
fail-charge ratios, migration (``migrate_hot``/``migrate_cold``, ``dests``,
``target_nid``), the ``collapse`` action, and the filter types the tree does
not know. What the tree knows but this host cannot do (an action, the memcg
filter) is left for the tree to refuse, naming its object.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from damond import damo_text as t
from damond.damo_text import FormatError
from damond.hierarchy import U32_MAX, Filter, Node, Scheme

DAMO_ONLY_ACTIONS = ("collapse", "migrate_hot", "migrate_cold")
"""Actions damo knows that the tree does not."""
DAMO_ONLY_FILTER_TYPES = ("active", "hugepage_size", "unmapped", "probe_hits_wsum")
"""Filter types damo knows that the tree does not."""

SCHEME_GROUPS = ("scheme", "access_pattern", "quotas", "watermarks")
"""The groups of a Scheme whose files a document sets."""


@dataclass(frozen=True)
class Files:
    """(group, attribute, value) for the stored files of one tree object."""

    values: tuple[tuple[str, str, Any], ...]

    def value(self, group: str, name: str) -> Any:
        return next(v for g, n, v in self.values if g == group and n == name)


@dataclass(frozen=True)
class FilterSpec(Files):
    """One filter's files (group ``filter``)."""


@dataclass(frozen=True)
class SchemeSpec(Files):
    """One scheme's files, and its filters in order."""

    filters: tuple[FilterSpec, ...] = ()


@dataclass(frozen=True)
class Key:
    """A damo key and the tree file it sets, read with damo's text for that key."""

    damo: str
    group: str
    name: str
    read: Callable[[Any, str], Any]


SCHEME_KEYS: dict[tuple[str, ...], tuple[Key, ...]] = {
    (): (
        Key("action", "scheme", "action", t.text),
        Key("apply_interval_us", "scheme", "apply_interval_us", t.time_us),
    ),
    ("quotas",): (
        Key("time_ms", "quotas", "ms", t.time_ms),
        Key("sz_bytes", "quotas", "bytes", t.size_bytes),
        Key("reset_interval_ms", "quotas", "reset_interval_ms", t.time_ms),
    ),
    ("quotas", "weights"): (
        Key("sz_permil", "quotas", "weight_sz", t.permil),
        Key("nr_accesses_permil", "quotas", "weight_nr_accesses", t.permil),
        Key("age_permil", "quotas", "weight_age", t.permil),
    ),
    ("watermarks",): (
        Key("metric", "watermarks", "metric", t.text),
        Key("interval_us", "watermarks", "interval_us", t.time_us),
        Key("high_permil", "watermarks", "high", t.permil),
        Key("mid_permil", "watermarks", "mid", t.permil),
        Key("low_permil", "watermarks", "low", t.permil),
    ),
}
"""damo's scheme keys by section (a path of nested keys); the access pattern is apart,
its units needing the context's intervals."""

FILTER_KEYS: dict[tuple[str, ...], tuple[Key, ...]] = {
    (): (
        Key("filter_type", "filter", "type", t.text),
        Key("matching", "filter", "matching", t.boolean),
        Key("allow", "filter", "allow", t.boolean),
        Key("memcg_path", "filter", "memcg_path", t.text),
        Key("damon_target_idx", "filter", "target_idx", t.number),
    ),
    ("address_range",): (
        Key("start", "filter", "addr_start", t.size_bytes),
        Key("end", "filter", "addr_end", t.size_bytes),
    ),
}

SCHEME_IGNORED = ("stats",)
QUOTAS_IGNORED = ("goal_tuner", "effective_sz_bytes")
FILTER_IGNORED = ("hugepage_size", "probe_hits_wsum_range")
"""Keys damo writes that are results, not configuration (a status dump's stats, the
effective quota), or that only the refused goals and filter types use."""


# --- reading damo's schemes --------------------------------------------------------------


@dataclass(frozen=True)
class Intervals:
    """The context's intervals, to count damo's percent and times in samples and
    aggregations."""

    sample_us: int
    aggr_us: int


def parse_schemes(value: Any, where: str, intervals: Intervals) -> tuple[SchemeSpec, ...]:
    """The schemes of a context's ``schemes`` list."""
    return tuple(
        _scheme(kv, f"{where}[{i}]", intervals) for i, kv in enumerate(t.listed(value, where))
    )


def _sections(
    kv: Mapping[str, Any],
    where: str,
    node: type[Node],
    table: Mapping[tuple[str, ...], tuple[Key, ...]],
    also: Mapping[tuple[str, ...], Iterable[str]],
) -> dict[tuple[str, str], Any]:
    """The files of node a damo object sets through table (unknown keys refused; null is
    unset; each value of the kind its file takes)."""
    given: dict[tuple[str, str], Any] = {}
    for path, keys in table.items():
        section: Any = kv
        spot = where
        for part in path:
            section = section.get(part)
            spot = f"{spot}.{part}"
            if section is None:
                break
            section = t.mapping(section, spot)
        if section is None:
            continue
        nested = {p[len(path)] for p in table if len(p) > len(path) and p[: len(path)] == path}
        t.known_keys(section, [*(k.damo for k in keys), *nested, *also.get(path, ())], spot)
        for key in keys:
            if section.get(key.damo) is not None:
                at = f"{spot}.{key.damo}"
                value = key.read(section[key.damo], at)
                given[(key.group, key.name)] = t.fits(node, key.group, key.name, value, at)
    return given


def _filled(
    node: type[Node], groups: Iterable[str], given: Mapping[tuple[str, str], Any]
) -> tuple[tuple[str, str, Any], ...]:
    """Every stored file of node's groups: the given value, else the file's default."""
    return tuple(
        (group, a.name, given.get((group, a.name), a.default))
        for group in groups
        for a in t.stored_files(node, group)
    )


def _scheme(value: Any, where: str, intervals: Intervals) -> SchemeSpec:
    kv = t.mapping(value, where)
    also = {
        (): ("access_pattern", "filters", "dests", "target_nid", *SCHEME_IGNORED),
        ("quotas",): ("goals", "fail_charge_num", "fail_charge_denom", *QUOTAS_IGNORED),
    }
    given = _sections(kv, where, Scheme, SCHEME_KEYS, also)
    action = given.get(("scheme", "action"))
    t.refuse_unless(action not in DAMO_ONLY_ACTIONS, f"{where}.action", f"the {action} action")
    t.refuse_unless(
        not t.listed(kv.get("dests") or [], f"{where}.dests"),
        f"{where}.dests",
        "migration (dests)",
    )
    t.refuse_unless(kv.get("target_nid") is None, f"{where}.target_nid", "migration (target_nid)")
    quotas = t.mapping(kv.get("quotas") or {}, f"{where}.quotas")
    t.refuse_unless(
        not t.listed(quotas.get("goals") or [], f"{where}.quotas.goals"),
        f"{where}.quotas.goals",
        "quota goals (auto-tuning the quota)",
    )
    for key in ("fail_charge_num", "fail_charge_denom"):
        spot = f"{where}.quotas.{key}"
        t.refuse_unless(t.number(quotas.get(key) or 0, spot) == 0, spot, "a fail charge ratio")
    if kv.get("access_pattern") is not None:
        given |= _access_pattern(kv["access_pattern"], f"{where}.access_pattern", intervals)
    filters = t.listed(kv.get("filters") or [], f"{where}.filters")
    return SchemeSpec(
        _filled(Scheme, SCHEME_GROUPS, given),
        tuple(_filter(f, f"{where}.filters[{i}]") for i, f in enumerate(filters)),
    )


def _filter(value: Any, where: str) -> FilterSpec:
    kv = dict(t.mapping(value, where))
    passed = kv.pop("filter_pass", None)  # damo's older name of allow, which wins
    if kv.get("allow") is None and passed is not None:
        kv["allow"] = passed
    if kv.get("filter_type") is None:
        raise FormatError(where, "has no 'filter_type'")
    given = _sections(kv, where, Filter, FILTER_KEYS, {(): FILTER_IGNORED})
    kind = given[("filter", "type")]
    t.refuse_unless(
        kind not in DAMO_ONLY_FILTER_TYPES, f"{where}.filter_type", f"the {kind} filter type"
    )
    return FilterSpec(_filled(Filter, ("filter",), given))


# --- the access pattern, in damo's units ---------------------------------------------------

PERCENT, SAMPLES = "percent", "samples"
USEC, AGGR_INTERVALS = "usec", "aggr_intervals"


def _count(value: str, unit: str) -> str | None:
    """The number of 'N unit', or None."""
    head, _, tail = value.strip().partition(" ")
    return head if tail.strip() == unit else None


def _nr_accesses(value: Any, where: str) -> tuple[str, float]:
    """(unit, number) of a bound of damo's nr_accesses: plain numbers are percent."""
    if isinstance(value, str):
        count = _count(value, SAMPLES)
        if count is not None:
            return SAMPLES, t.number(count, where)
        share = _count(value, PERCENT)
        given = t.percent(value if share is None else f"{share} %")
        if given is not None:
            return PERCENT, given
    try:
        return PERCENT, t.plain(value, where)
    except FormatError:
        raise FormatError(
            where,
            "must be a share of the aggregation's samples ('5 %'; plain numbers are "
            f"percent) or a count ('3 samples'), not {value!r}",
        ) from None


def _age(value: Any, where: str) -> tuple[str, float]:
    """(unit, number) of a bound of damo's age: plain numbers are microseconds."""
    if isinstance(value, str):
        count = _count(value, AGGR_INTERVALS)
        if count is not None:
            return AGGR_INTERVALS, t.number(count, where)
    try:
        return USEC, t.time_us(value, where)
    except FormatError:
        raise FormatError(
            where,
            "must be a time ('2 s'; plain numbers are microseconds) or a count of "
            f"aggregations ('5 aggr_intervals'), not {value!r}",
        ) from None


def _converted(unit: str, value: float, intervals: Intervals, where: str) -> int:
    """A bound in the tree's unit (samples, aggregations), as damo converts it."""
    if not math.isfinite(value):  # JSON's NaN and Infinity, or a number past a float's
        raise FormatError(where, f"must be a finite number, not {value!r}")
    if value < 0:
        raise FormatError(where, f"must be >= 0, not {value!r}")
    if unit == PERCENT:
        if intervals.sample_us == 0:
            raise FormatError(where, "a percentage needs intervals.sample_us > 0")
        counted = value * (intervals.aggr_us / intervals.sample_us) / 100
    elif unit == USEC:
        if intervals.aggr_us == 0:
            raise FormatError(where, "a time needs intervals.aggr_us > 0")
        counted = value / intervals.aggr_us
    else:
        counted = value
    return U32_MAX if counted >= U32_MAX else int(counted)  # damo's 'max' and past: no bound


def _access_pattern(value: Any, where: str, intervals: Intervals) -> dict[tuple[str, str], Any]:
    kv = t.mapping(value, where)
    t.known_keys(kv, ("sz_bytes", "nr_accesses", "age"), where)
    given: dict[tuple[str, str], Any] = {}
    readers = {"sz_bytes": None, "nr_accesses": _nr_accesses, "age": _age}
    for key, read in readers.items():
        if kv.get(key) is None:
            continue
        spot = f"{where}.{key}"
        section = t.mapping(kv[key], spot)
        t.known_keys(section, ("min", "max"), spot)
        name = "sz" if key == "sz_bytes" else key
        bounds = {b: section[b] for b in ("min", "max") if section.get(b) is not None}
        if read is None:
            counted = {b: t.size_bytes(v, f"{spot}.{b}") for b, v in bounds.items()}
        else:
            read_bounds = {b: read(v, f"{spot}.{b}") for b, v in bounds.items()}
            units = {unit for unit, _ in read_bounds.values()}
            if len(units) > 1:
                raise FormatError(
                    spot, f"min and max must be in the same unit, not {sorted(units)}"
                )
            counted = {
                b: _converted(unit, n, intervals, f"{spot}.{b}")
                for b, (unit, n) in read_bounds.items()
            }
        for b, value in counted.items():
            file = f"{name}_{b}"
            given[("access_pattern", file)] = t.fits(
                Scheme, "access_pattern", file, value, f"{spot}.{b}"
            )
    return given


# --- the tree's schemes as damo's ----------------------------------------------------------


def _nest(table: Mapping[tuple[str, ...], tuple[Key, ...]], files: Files) -> dict[str, Any]:
    """damo's object for files, through table (values raw: damo reads plain numbers)."""
    out: dict[str, Any] = {}
    for path, keys in table.items():
        section = out
        for part in path:
            section = section.setdefault(part, {})
        for key in keys:
            section[key.damo] = files.value(key.group, key.name)
    return out


def to_damo(scheme: SchemeSpec) -> dict[str, Any]:
    """damo's kvpairs of a scheme: damo's Damos.from_kvpairs reads them back."""
    kv = _nest(SCHEME_KEYS, scheme)
    pattern = {
        "sz_bytes": {b: scheme.value("access_pattern", f"sz_{b}") for b in ("min", "max")},
        "nr_accesses": {
            b: f"{scheme.value('access_pattern', f'nr_accesses_{b}')} {SAMPLES}"
            for b in ("min", "max")
        },
        "age": {
            b: f"{scheme.value('access_pattern', f'age_{b}')} {AGGR_INTERVALS}"
            for b in ("min", "max")
        },
    }
    kv["quotas"]["goals"] = []
    return {
        "action": kv.pop("action"),
        "access_pattern": pattern,
        **kv,
        "filters": [_nest(FILTER_KEYS, f) for f in scheme.filters],
    }


def from_objects(
    objects: Mapping[str, Mapping[str, Mapping[str, Any]]], path: str, filter_paths: list[str]
) -> SchemeSpec:
    """The scheme at path of a tree read as plain data (kdamonds_format.TreeObjects)."""
    return SchemeSpec(
        files_of(objects[path], Scheme, SCHEME_GROUPS),
        tuple(FilterSpec(files_of(objects[p], Filter, ("filter",))) for p in filter_paths),
    )


def files_of(
    groups: Mapping[str, Mapping[str, Any]], node: type[Node], names: Iterable[str]
) -> tuple[tuple[str, str, Any], ...]:
    """(group, attribute, value) of node's stored files that one object's data has."""
    return tuple(
        (group, a.name, groups[group][a.name])
        for group in names
        for a in t.stored_files(node, group)
        if a.name in groups.get(group, {})
    )
