"""The admin tree: Kdamonds → Kdamond → Context → Target → Region.

This is DAMON's sysfs interface as a plain object model: every directory is a
node, every file an Attribute declared once in its node's GROUPS (name, kind,
default, check, how it is read and written). The tree decides what the
contract says about the tree itself (defaults, `nr` semantics, the on/off/
commit state machine); the rules a configuration must obey are the core's
(monitor/config.py), and what an operations set needs is its table's
(monitor/ops). It knows nothing of D-Bus: listeners are told what changed, and
any transport can serve the tree.
"""

from __future__ import annotations

import dataclasses
import errno
import logging
import math
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any, ClassVar, Generic, Protocol, TypeVar

from damond.errors import Busy, DamondError, InvalidArgument, NoData, NotSupported
from damond.monitor import backends, ops
from damond.monitor.backends import Monitor, MonitorFactory
from damond.monitor.config import (
    ACTIONS,
    FILTER_TYPES,
    STAT,
    WMARK_METRICS,
    WMARK_NONE,
    AccessPattern,
    Attrs,
    ConfigError,
    ContextConfig,
    FilterConfig,
    Quotas,
    SchemeConfig,
    TargetConfig,
    Watermarks,
)
from damond.monitor.ops import kernel_damon
from damond.monitor.ops.process import process_problem
from damond.monitor.snapshot import SchemeResult, SchemeStats, Snapshot, TriedRegion

log = logging.getLogger(__name__)

# Resource caps, so that one client cannot exhaust the daemon (docs/dbus-api.md,
# docs/reliability.md says why these numbers).
MAX_KDAMONDS = 64
MAX_TARGETS = 256
MAX_REGIONS = 4096
"""Region objects per target."""
MAX_TREE_REGIONS = 16384
"""Region objects in the whole tree: bounds the tree's memory and GetManagedObjects."""
MAX_SCHEMES = 32
"""Schemes per context: each is walked over every region at each of its applications."""
MAX_FILTERS = 32
"""Filters per scheme."""
MAX_PATH = 4096
"""The longest memcg_path (the kernel's PATH_MAX)."""
STATS_INTERVAL_S = 1.0
"""Scheme stats are announced (PropertiesChanged) at most this often while running."""

U32_MAX = 2**32 - 1
U64_MAX = 2**64 - 1
I32_MIN, I32_MAX = -(2**31), 2**31 - 1
_BOUNDS = {"u32": (0, U32_MAX), "u64": (0, U64_MAX), "i32": (I32_MIN, I32_MAX)}

DEFAULT_ATTRS = Attrs()
"""The kernel's sysfs defaults, from the core's own definition."""


@dataclass(frozen=True)
class Attribute:
    """One sysfs file: its name, value kind, default, and how it is read and written.

    kind is one of "u32", "i32", "u64", "bool", "str", "strlist". A stored file keeps
    its value in the node's attribute ``field`` (set to ``default`` when the
    node is made); others compute it. ``write`` is None for read-only files;
    it raises a DamondError, changing nothing, to refuse a value.
    """

    name: str
    kind: str
    read: Callable[[Any], Any]
    write: Callable[[Any, Any], None] | None = None
    field: str | None = None
    default: Any = None
    announces: bool = False
    """The write emits PropertiesChanged itself (state: on/off change more than one file)."""
    emits_changed: bool = True
    """False for a file that changes with every aggregation: no PropertiesChanged is
    sent for it (introspection says so), clients read it when they need it."""

    @property
    def writable(self) -> bool:
        return self.write is not None

    def check_kind(self, where: str, value: Any) -> None:
        """Guard the value range of the kind, whatever the transport already checked."""
        if self.kind in _BOUNDS:
            lo, hi = _BOUNDS[self.kind]
            if not isinstance(value, int) or isinstance(value, bool) or not lo <= value <= hi:
                raise InvalidArgument(where, f"{self.name} must be an integer in [{lo}, {hi}]")
        elif self.kind == "str" and not isinstance(value, str):
            raise InvalidArgument(where, f"{self.name} must be a string")
        elif self.kind == "bool" and not isinstance(value, bool):
            raise InvalidArgument(where, f"{self.name} must be a boolean")


def stored(
    name: str,
    kind: str,
    default: Any,
    field: str | None = None,
    check: Callable[[Any, Any], None] | None = None,
) -> Attribute:
    """A file whose value the node keeps; check(node, value) refuses before it is stored."""
    attr = field or name

    def write(node: Any, value: Any) -> None:
        if check is not None:
            check(node, value)
        setattr(node, attr, value)

    return Attribute(name, kind, lambda node: getattr(node, attr), write, attr, default)


@dataclass(frozen=True)
class Method:
    """A call on a node: its name, the kind of value it answers with (the transport knows
    how to send each kind), and how to answer; it raises a DamondError to refuse."""

    name: str
    returns: str
    call: Callable[[Any], Any]


def computed(
    name: str, kind: str, read: Callable[[Any], Any], emits_changed: bool = True
) -> Attribute:
    """A read-only file computed from the node."""
    return Attribute(name, kind, read, emits_changed=emits_changed)


def nr_of(collection: str, check: Callable[[Any, int], None] | None = None) -> Attribute:
    """The `nr` file of a collection: refused under a running kdamond, then check(node, nr)."""

    def write(node: Node, value: int) -> None:
        node.refuse_if_running(f"{collection} nr")
        if check is not None:
            check(node, value)
        node.collection(collection).resize(value)

    return Attribute("nr", "u32", lambda node: len(node.collection(collection).items), write)


__all__ = ["Monitor", "MonitorFactory"]  # the backends' interface, as the tree drives it


class TreeListener(Protocol):
    """What a transport needs to hear from the tree."""

    def node_added(self, node: Node) -> None: ...

    def node_removed(self, node: Node) -> None: ...

    def properties_changed(self, node: Node, group: str, changed: dict[str, Any]) -> None: ...

    def snapshot(self, context: Context, snapshot: Snapshot) -> None: ...


N = TypeVar("N", bound="Node")
T = TypeVar("T")


class Collection(Generic[N]):
    """The children of one `nr` file: indices 0..nr-1, kept ones keep their values."""

    def __init__(self, owner: Node, name: str, make: Callable[[str], N], cap: int) -> None:
        self.owner = owner
        self.name = name
        self.make = make
        self.cap = cap
        self.items: list[N] = []

    def resize(self, nr: int) -> None:
        if nr > self.cap:
            raise InvalidArgument(
                self.owner.path, f"{self.name} nr {nr} is over the limit of {self.cap}"
            )
        tree = self.owner.tree
        while len(self.items) > nr:
            removed = self.items.pop()
            for node in reversed(list(removed.walk())):
                tree.emit_removed(node)
        while len(self.items) < nr:
            node = self.make(self.owner.child_path(self.name, len(self.items)))
            self.items.append(node)
            tree.emit_added(node)


class Node:
    """A directory of the admin tree; its files are the Attributes of GROUPS."""

    GROUPS: ClassVar[dict[str, tuple[Attribute, ...]]] = {}
    METHODS: ClassVar[dict[str, tuple[Method, ...]]] = {}
    """Calls, by the group (interface) they belong to."""

    def __init__(self, tree: Tree, path: str, parent: Node | None) -> None:
        self.tree = tree
        self.path = path
        self.parent = parent
        for attrs in self.GROUPS.values():
            for attr in attrs:
                if attr.field is not None:
                    setattr(self, attr.field, attr.default)

    @property
    def name(self) -> str:
        return self.path.rsplit("/", 1)[-1]

    def collections(self) -> list[Collection[Any]]:
        """The `nr`-governed child directories of this node."""
        return []

    def collection(self, name: str) -> Collection[Any]:
        for c in self.collections():
            if c.name == name:
                return c
        raise KeyError(name)

    def children(self) -> list[Node]:
        return [node for c in self.collections() for node in c.items]

    def walk(self) -> Iterator[Node]:
        """This node and its subtree, parents first."""
        yield self
        for child in self.children():
            yield from child.walk()

    def child_path(self, collection: str, index: int) -> str:
        prefix = f"{self.path}/" if self.path else ""
        return f"{prefix}{collection}/{index}"

    def attribute(self, group: str, name: str) -> Attribute:
        for attr in self.GROUPS.get(group, ()):
            if attr.name == name:
                return attr
        raise InvalidArgument(self.path, f"no attribute {group}.{name}")

    def get(self, group: str, name: str) -> Any:
        return self.attribute(group, name).read(self)

    def set(self, group: str, name: str, value: Any) -> None:
        """Write one attribute; refused writes change nothing and raise DamondError."""
        attr = self.attribute(group, name)
        if attr.write is None:
            raise InvalidArgument(self.path, f"{name} is read-only")
        attr.check_kind(self.path, value)
        if attr.announces:
            attr.write(self, value)
            return
        old = attr.read(self)
        attr.write(self, value)
        new = attr.read(self)
        if new != old:
            self.tree.emit_changed(self, group, {name: new})

    def kdamond(self) -> Kdamond | None:
        node: Node | None = self
        while node is not None and not isinstance(node, Kdamond):
            node = node.parent
        return node

    def refuse_if_running(self, what: str) -> None:
        kd = self.kdamond()
        if kd is not None and kd.running:
            raise Busy(self.path, f"cannot change {what} while {kd.path} is on")


class Region(Node):
    GROUPS = {"region": (stored("start", "u64", 0), stored("end", "u64", 0))}

    start: int
    end: int


def _check_tree_regions(target: Target, nr: int) -> None:
    total = target.tree.count_regions() - len(target.regions.items) + nr
    if nr <= MAX_REGIONS and total > MAX_TREE_REGIONS:
        raise InvalidArgument(
            target.path,
            f"regions nr {nr} would make {total} regions in the tree, over the limit "
            f"of {MAX_TREE_REGIONS}",
        )


class Target(Node):
    GROUPS = {
        "target": (stored("pid", "i32", -1),),
        "regions": (nr_of("regions", _check_tree_regions),),
    }

    pid: int

    def __init__(self, tree: Tree, path: str, parent: Node) -> None:
        super().__init__(tree, path, parent)
        self.regions = Collection(self, "regions", lambda p: Region(tree, p, self), MAX_REGIONS)

    def collections(self) -> list[Collection[Any]]:
        return [self.regions]


# --- DAMOS: schemes and their filters ---------------------------------------------------------


def _context_of(node: Node) -> Context:
    while not isinstance(node, Context):
        assert node.parent is not None, "schemes live under a context"
        node = node.parent
    return node


def _check_keyword(node: Node, name: str, value: str, known: tuple[str, ...]) -> None:
    if value not in known:
        raise InvalidArgument(node.path, f"{name} {_shown(value)} is not one of {', '.join(known)}")


def _deciding_backends(context: Context) -> list[backends.Backend]:
    """Whose tables say what the context's schemes can do: the backend it runs on (a
    commit keeps it), else the one its backend file names; under auto, each that could
    start it now (auto picks one that can do its schemes), or every one if none can."""
    table = context.tree.backends
    running = _running_config(context)
    if running is not None:
        return [table.get(running.backend)]
    if context.backend != backends.AUTO:
        return [table.get(context.backend)]
    return table.ready_for(context.operations) or [table.get(name) for name in table.names]


def _check_doable(node: Node, why_not: Callable[[backends.Backend, str], str]) -> None:
    """NotSupported, with the backends' reasons, for what no backend that may run the
    context can do (why_not asks one backend's table, for the context's operations)."""
    context = _context_of(node)
    deciding = _deciding_backends(context)
    reasons = [why_not(b, context.operations) for b in deciding]
    if all(reasons):
        if len(reasons) > 1:
            reasons = [f"{b.name} backend: {r}" for b, r in zip(deciding, reasons, strict=True)]
        raise NotSupported(node.path, "; ".join(reasons))


def _available_actions(scheme: Scheme) -> list[str]:
    """What the backends that may run the context can do (docs/dbus-api.md)."""
    context = _context_of(scheme)
    offered = {
        a for b in _deciding_backends(context) for a in b.available_actions(context.operations)
    }
    return [a for a in ACTIONS if a in offered]


def _check_action(scheme: Scheme, value: str) -> None:
    _check_keyword(scheme, "action", value, ACTIONS)
    _check_doable(scheme, lambda b, operations: b.why_action_unavailable(value, operations))


def _check_metric(scheme: Scheme, value: str) -> None:
    _check_keyword(scheme, "metric", value, WMARK_METRICS)


def _check_filter(node: Filter, f: FilterConfig) -> None:
    _check_doable(node, lambda b, operations: b.why_filter_unavailable(f, operations))


def _check_filter_type(node: Filter, value: str) -> None:
    _check_keyword(node, "type", value, FILTER_TYPES)
    _check_filter(node, dataclasses.replace(node.config(), type=value))


def _check_allow(node: Filter, value: bool) -> None:
    _check_filter(node, dataclasses.replace(node.config(), allow=value))


def _check_path(node: Filter, value: str) -> None:
    if len(value) > MAX_PATH or "\0" in value:
        raise InvalidArgument(
            node.path, f"memcg_path must be a path of at most {MAX_PATH} characters"
        )


DEFAULT_FILTER = FilterConfig()


class Filter(Node):
    """One DAMOS filter (schemes/S/filters/F)."""

    GROUPS = {
        "filter": (
            stored("type", "str", DEFAULT_FILTER.type, field="type", check=_check_filter_type),
            stored("matching", "bool", DEFAULT_FILTER.matching),
            stored("allow", "bool", DEFAULT_FILTER.allow, check=_check_allow),
            stored("memcg_path", "str", DEFAULT_FILTER.memcg_path, check=_check_path),
            stored("addr_start", "u64", DEFAULT_FILTER.addr_start),
            stored("addr_end", "u64", DEFAULT_FILTER.addr_end),
            stored("target_idx", "u32", DEFAULT_FILTER.target_idx),
        )
    }

    type: str
    matching: bool
    allow: bool
    memcg_path: str
    addr_start: int
    addr_end: int
    target_idx: int

    def config(self) -> FilterConfig:
        return FilterConfig(
            self.type,
            self.matching,
            self.allow,
            self.memcg_path,
            self.addr_start,
            self.addr_end,
            self.target_idx,
        )


DEFAULT_PATTERN = AccessPattern()
DEFAULT_QUOTAS = Quotas()
DEFAULT_WATERMARKS = Watermarks()
NO_STATS = SchemeStats()
STATS = ("nr_tried", "sz_tried", "nr_applied", "sz_applied", "qt_exceeds")


def _stat(name: str) -> Attribute:
    return computed(name, "u64", lambda s: getattr(s.stats(), name))


def _stored_fields(kind: str, default: Any, names: tuple[str, ...]) -> tuple[Attribute, ...]:
    """Plain stored files whose defaults are the core's (AccessPattern, Quotas...)."""
    return tuple(stored(n, kind, getattr(default, n)) for n in names)


class Scheme(Node):
    """One DAMOS scheme (contexts/C/schemes/S): what to do to which regions, how much."""

    GROUPS = {
        "scheme": (
            stored("action", "str", STAT, check=_check_action),
            computed("avail_actions", "strlist", _available_actions),
            stored("apply_interval_us", "u64", 0),
        ),
        "access_pattern": (
            *_stored_fields("u64", DEFAULT_PATTERN, ("sz_min", "sz_max")),
            *_stored_fields(
                "u32",
                DEFAULT_PATTERN,
                ("nr_accesses_min", "nr_accesses_max", "age_min", "age_max"),
            ),
        ),
        "quotas": (
            *_stored_fields("u64", DEFAULT_QUOTAS, ("ms", "bytes", "reset_interval_ms")),
            *_stored_fields(
                "u32", DEFAULT_QUOTAS, ("weight_sz", "weight_nr_accesses", "weight_age")
            ),
            computed("effective_bytes", "u64", lambda s: s.effective_bytes()),
        ),
        "watermarks": (
            stored("metric", "str", WMARK_NONE, check=_check_metric),
            *_stored_fields("u64", DEFAULT_WATERMARKS, ("interval_us", "high", "mid", "low")),
        ),
        "filters": (nr_of("filters"),),
        "scheme_stats": tuple(_stat(name) for name in STATS),
    }
    METHODS = {"scheme": (Method("GetTriedRegions", "tried_regions", lambda s: s.tried_regions()),)}

    def __init__(self, tree: Tree, path: str, parent: Node) -> None:
        super().__init__(tree, path, parent)
        self.filters = Collection(self, "filters", lambda p: Filter(tree, p, self), MAX_FILTERS)
        self.result: SchemeResult | None = None
        """As of the latest snapshot of the running kdamond (kept after off; None after on)."""
        self._announced: dict[str, dict[str, Any]] = self._published()
        self._announced_at = -math.inf

    def collections(self) -> list[Collection[Any]]:
        return [self.filters]

    def stats(self) -> SchemeStats:
        return self.result.stats if self.result is not None else NO_STATS

    def effective_bytes(self) -> int:
        return self.result.effective_bytes if self.result is not None else 0

    def tried_regions(self) -> tuple[TriedRegion, ...]:
        if self.result is None or self.result.tried is None:
            raise NoData(self.path, "the scheme has not been applied since the kdamond went on")
        return self.result.tried

    def config(self, index: int) -> SchemeConfig:
        def values(group: str) -> dict[str, Any]:
            return {a.name: self.get(group, a.name) for a in self.GROUPS[group] if a.writable}

        watermarks = values("watermarks")
        return SchemeConfig(
            index=index,
            action=self.get("scheme", "action"),
            apply_interval_us=self.get("scheme", "apply_interval_us"),
            pattern=AccessPattern(**values("access_pattern")),
            quotas=Quotas(**values("quotas")),
            watermarks=Watermarks(**watermarks),
            filters=tuple(f.config() for f in self.filters.items),
        )

    # -- results: stats announced at most once per STATS_INTERVAL_S --------------------------

    def _published(self) -> dict[str, dict[str, Any]]:
        stats = self.stats()
        return {
            "scheme_stats": {name: getattr(stats, name) for name in STATS},
            "quotas": {"effective_bytes": self.effective_bytes()},
        }

    def publish(self, result: SchemeResult | None, now: float, force: bool = False) -> None:
        """Take a new result; say what changed if STATS_INTERVAL_S passed since the last
        time (or force: the kdamond turns on or off)."""
        self.result = result
        if not force and now - self._announced_at < STATS_INTERVAL_S:
            return
        published = self._published()
        for group, values in published.items():
            changed = {k: v for k, v in values.items() if self._announced[group].get(k) != v}
            if changed:
                self.tree.emit_changed(self, group, changed)
                self._announced_at = now
        self._announced = published


def _shown(value: str, limit: int = 64) -> str:
    """A client's string as an error message repeats it: quoted, and cut when long."""
    if len(value) <= limit:
        return repr(value)
    return f"{value[:limit]!r}… ({len(value)} characters)"


def _check_operations(context: Context, value: str) -> None:
    registry = context.tree.registry
    if value not in registry.operations_names:
        raise InvalidArgument(
            context.path,
            f"operations {_shown(value)} is not one of {', '.join(registry.operations_names)}",
        )
    if value not in _available_operations(context):
        raise NotSupported(context.path, context.tree.backends.why_not_offered(value))


def _available_operations(context: Context) -> list[str]:
    """What some available backend runs: the user backend's access checks, or the kernel's."""
    return context.tree.backends.available_operations(context.tree.registry.operations_names)


def _check_backend(context: Context, value: str) -> None:
    known = (backends.AUTO, *context.tree.backends.names)
    if value not in known:
        raise InvalidArgument(
            context.path, f"backend {_shown(value)} is not one of {', '.join(known)}"
        )
    if value != backends.AUTO and value not in context.tree.backends.available():
        raise NotSupported(context.path, context.tree.backends.why_unavailable(value))


def _check_access_check(context: Context, value: str) -> None:
    registry = context.tree.registry
    known = (ops.AUTO, *registry.access_check_names)
    if value not in known:
        raise InvalidArgument(
            context.path, f"access_check {_shown(value)} is not one of {', '.join(known)}"
        )
    if value != ops.AUTO and value not in registry.available_access_checks():
        raise NotSupported(context.path, registry.why_unavailable(value))


def _running_config(context: Context) -> ContextConfig | None:
    kdamond = context.kdamond()
    return kdamond.running_config if kdamond is not None else None


def _effective_access_check(context: Context) -> str:
    config = _running_config(context)
    return config.access_check if config is not None else ""


def _effective_backend(context: Context) -> str:
    config = _running_config(context)
    return config.backend if config is not None else ""


def _access_granularity(context: Context) -> str:
    """What one access answer of the running context stands for ('' while off): its
    access check's, or its backend's where that checks accesses itself."""
    config = _running_config(context)
    if config is None:
        return ""
    if config.access_check:
        return context.tree.registry.access_check(config.access_check).granularity
    return context.tree.backends.get(config.backend).granularity


def _latest_pace(field: str) -> Callable[[Context], int]:
    """An effective interval of the latest snapshot (0 before the first after on)."""
    return lambda context: getattr(context.latest, field) if context.latest is not None else 0


EFFECTIVE = {
    "effective_access_check": _effective_access_check,
    "access_granularity": _access_granularity,
    "effective_backend": _effective_backend,
}
"""The read-only files that say what `auto` resolved to while on: announced with the state."""


class Context(Node):
    GROUPS = {
        "context": (
            stored("operations", "str", ops.VADDR.name, check=_check_operations),
            computed("avail_operations", "strlist", _available_operations),
            stored("access_check", "str", ops.AUTO, check=_check_access_check),
            computed(
                "avail_access_checks",
                "strlist",
                lambda c: c.tree.registry.available_access_checks(),
            ),
            computed("effective_access_check", "str", _effective_access_check),
            stored("backend", "str", backends.AUTO, check=_check_backend),
            computed("avail_backends", "strlist", lambda c: c.tree.backends.available()),
            computed("effective_backend", "str", _effective_backend),
            computed("access_granularity", "str", _access_granularity),
            stored("cpu_limit_pct", "u32", DEFAULT_ATTRS.cpu_limit_pct),
            computed(
                "effective_sample_us", "u64", _latest_pace("effective_sample_us"), False
            ),
            computed("effective_aggr_us", "u64", _latest_pace("effective_aggr_us"), False),
        ),
        "intervals": (
            stored("sample_us", "u64", DEFAULT_ATTRS.sample_us),
            stored("aggr_us", "u64", DEFAULT_ATTRS.aggr_us),
            stored("update_us", "u64", DEFAULT_ATTRS.update_us),
        ),
        "nr_regions": (
            stored("min", "u64", DEFAULT_ATTRS.min_nr_regions, field="min_nr_regions"),
            stored("max", "u64", DEFAULT_ATTRS.max_nr_regions, field="max_nr_regions"),
        ),
        "targets": (nr_of("targets"),),
        "schemes": (nr_of("schemes"),),
    }
    METHODS = {"context": (Method("GetSnapshot", "snapshot", lambda c: c.get_snapshot()),)}

    operations: str
    access_check: str
    backend: str
    sample_us: int
    aggr_us: int
    update_us: int
    min_nr_regions: int
    max_nr_regions: int
    cpu_limit_pct: int

    def __init__(self, tree: Tree, path: str, parent: Node) -> None:
        super().__init__(tree, path, parent)
        self.targets = Collection(self, "targets", lambda p: Target(tree, p, self), MAX_TARGETS)
        self.schemes = Collection(self, "schemes", lambda p: Scheme(tree, p, self), MAX_SCHEMES)
        self.latest: Snapshot | None = None

    def collections(self) -> list[Collection[Any]]:
        return [self.targets, self.schemes]

    def publish_schemes(self, snapshot: Snapshot | None, force: bool = False) -> None:
        """Hand each scheme its result of the snapshot (None: none yet, after on)."""
        now = time.monotonic()
        results = {r.index: r for r in snapshot.schemes} if snapshot is not None else {}
        for i, scheme in enumerate(self.schemes.items):
            scheme.publish(results.get(i), now, force)

    def get_snapshot(self) -> Snapshot:
        if self.latest is None:
            raise NoData(self.path, "no snapshot yet: the context has not completed an aggregation")
        return self.latest

    def config(self, running: ContextConfig | None = None) -> ContextConfig:
        """Validate this context for `on` (or `commit` of running) and freeze it for the monitor.

        The attributes first (the core's rules), then whether this host
        runs the operations set, then the targets and schemes (the core's
        rules and the operations set's), then the backend that runs it (which
        may claim the kernel's admin tree: only once everything else is known
        good), what that backend can do of each scheme's action and filters
        and, for damond's own engine, the access check.
        """
        attrs = Attrs(
            sample_us=self.sample_us,
            aggr_us=self.aggr_us,
            update_us=self.update_us,
            min_nr_regions=self.min_nr_regions,
            max_nr_regions=self.max_nr_regions,
            cpu_limit_pct=self.cpu_limit_pct,
        )
        self._checked(attrs.validate)
        registry = self.tree.registry
        if self.operations not in _available_operations(self):
            raise NotSupported(self.path, self.tree.backends.why_not_offered(self.operations))
        operations = registry.operations(self.operations)
        targets = tuple(
            TargetConfig(
                index=i,
                pid=t.pid if operations.target_has_pid else -1,
                regions=tuple((r.start, r.end) for r in t.regions.items),
            )
            for i, t in enumerate(self.targets.items)
        )
        schemes = tuple(s.config(i) for i, s in enumerate(self.schemes.items))
        config = ContextConfig(operations, "", attrs, targets, schemes)
        self._checked(config.validate)
        if operations.target_has_pid:
            for target, tc in zip(self.targets.items, targets, strict=True):
                problem = process_problem(tc.pid)
                if problem:
                    raise InvalidArgument(target.path, problem)
        try:
            backend = self._backend(operations.name, running, schemes)
            where, why = backend.why_schemes_unavailable(schemes, operations.name)
            if why:
                raise NotSupported(f"{self.path}/{where}", why)
            access_check = (
                registry.resolve_access_check(self.access_check, operations.name)
                if backend.uses_access_check
                else ""
            )
        except ops.Unsupported as e:
            raise NotSupported(self.path, str(e)) from None
        except ValueError as e:
            raise InvalidArgument(self.path, str(e)) from None
        return dataclasses.replace(config, access_check=access_check, backend=backend.name)

    def _backend(
        self, operations: str, running: ContextConfig | None, schemes: tuple[SchemeConfig, ...]
    ) -> backends.Backend:
        """The backend to run on: resolved at `on`; at `commit`, the one running."""
        if running is None:
            return self.tree.backends.resolve(self.backend, operations, schemes)
        backend = self.tree.backends.get(running.backend)
        if self.backend not in (backends.AUTO, backend.name):
            raise ValueError(
                f"backend {self.backend} takes effect at the next on: this context runs on "
                f"{backend.name}"
            )
        if operations not in backend.operations():
            raise ops.Unsupported(f"{backend.name} backend: {operations} is not available")
        return backend

    def _checked(self, validate: Callable[[], T]) -> T:
        """Run one of the core's validations (or what may refuse like one: a monitor
        pinning the targets), its error named after this tree's object."""
        try:
            return validate()
        except ConfigError as e:
            where = f"{self.path}/{e.where}" if e.where else self.path
            raise InvalidArgument(where, e.rule) from None


STATE_ON = "on"
STATE_OFF = "off"
STATE_COMMIT = "commit"


def _write_state(kdamond: Kdamond, value: str) -> None:
    if value == STATE_ON:
        kdamond.turn_on()
    elif value == STATE_OFF:
        kdamond.turn_off("stopped by request")
    elif value == STATE_COMMIT:
        kdamond.commit()
    else:
        raise InvalidArgument(kdamond.path, f"state must be on, off or commit, not {_shown(value)}")


def _check_contexts_nr(kdamond: Kdamond, nr: int) -> None:
    if nr > 1:
        raise InvalidArgument(kdamond.path, f"contexts nr must be 0 or 1, not {nr}")


class Kdamond(Node):
    GROUPS = {
        "kdamond": (
            Attribute(
                "state",
                "str",
                lambda k: STATE_ON if k.running else STATE_OFF,
                _write_state,
                announces=True,
            ),
            computed("pid", "i32", lambda k: k.monitor.pid if k.monitor is not None else -1),
        ),
        "contexts": (nr_of("contexts", _check_contexts_nr),),
    }

    def __init__(self, tree: Tree, path: str, parent: Node) -> None:
        super().__init__(tree, path, parent)
        self.contexts = Collection(self, "contexts", lambda p: Context(tree, p, self), 1)
        self.monitor: Monitor | None = None
        self.running_config: ContextConfig | None = None
        """What the monitor was last given (on or commit); None while off."""

    @property
    def running(self) -> bool:
        return self.monitor is not None

    def collections(self) -> list[Collection[Any]]:
        return [self.contexts]

    def _context(self) -> Context:
        if len(self.contexts.items) != 1:
            raise InvalidArgument(
                self.path,
                f"needs exactly one context (contexts nr is {len(self.contexts.items)})",
            )
        return self.contexts.items[0]

    def check(self) -> ContextConfig:
        """Validate this kdamond for `on` or, while on, `commit` (its one context, frozen),
        changing nothing; InvalidArgument/NotSupported name the object and rule."""
        return self._context().config(self.running_config)

    def turn_on(self) -> None:
        if self.running:
            raise Busy(self.path, "is already on")
        context = self._context()
        config = self.check()

        def on_snapshot(snapshot: Snapshot) -> None:
            if self.monitor is monitor:
                context.latest = snapshot
                context.publish_schemes(snapshot)
                self.tree.emit_snapshot(context, snapshot)

        def on_stop(reason: str) -> None:
            if self.monitor is monitor:
                self.turn_off(reason)

        monitor = self._accepted(
            context, lambda: self.tree.monitor_factory(self.name, config, on_snapshot, on_stop)
        )
        self.monitor = monitor
        self.running_config = config
        context.latest = None
        context.publish_schemes(None, force=True)
        log.info(
            "%s on: %s/%s, %d target(s) %s (%s backend)",
            self.path,
            config.operations.name,
            config.access_check or config.backend,  # who samples, as STATUS= says it
            len(config.targets),
            [t.pid for t in config.targets],
            config.backend,
            extra={
                "KDAMOND": self.name,
                "BACKEND": config.backend,
                "OPERATIONS": config.operations.name,
                "ACCESS_CHECK": config.access_check,
                "TARGET_PID": ",".join(str(t.pid) for t in config.targets),
            },
        )
        warning = self.tree.interference_warning()
        if warning:
            log.warning("%s: %s", self.path, warning, extra={"KDAMOND": self.name})
        self._announce_effective(context)
        self.tree.emit_changed(self, "kdamond", {"state": STATE_ON, "pid": monitor.pid})

    def turn_off(self, reason: str) -> None:
        """Stop monitoring (idempotent); reason goes to the log."""
        monitor, self.monitor = self.monitor, None
        if monitor is None:
            return
        self.running_config = None
        monitor.stop()
        log.info("%s off: %s", self.path, reason, extra={"KDAMOND": self.name})
        if self.contexts.items:
            context = self.contexts.items[0]
            context.publish_schemes(context.latest, force=True)  # the last word on them
            self._announce_effective(context)
        self.tree.emit_changed(self, "kdamond", {"state": STATE_OFF, "pid": -1})

    def _announce_effective(self, context: Context) -> None:
        """The effective_* files change with the state: say so as for any file, before
        the state itself, so that whoever reacts to the state reads them changed."""
        self.tree.emit_changed(
            context, "context", {name: effective(context) for name, effective in EFFECTIVE.items()}
        )

    def commit(self) -> None:
        if self.monitor is None:
            raise InvalidArgument(self.path, "commit needs the kdamond to be on (state is off)")
        config = self.check()
        monitor = self.monitor
        self._accepted(self._context(), lambda: monitor.commit(config))  # new pids pinned now
        self.running_config = config
        log.info("%s commit", self.path, extra={"KDAMOND": self.name})

    def _accepted(self, context: Context, accept: Callable[[], T]) -> T:
        """A monitor accepting a config (starting, or taking a commit): it may still refuse,
        as the kernel's own DAMON does (KernelRefused), or because a target cannot be
        pinned (ConfigError, named after the target's object); then nothing changed."""
        try:
            return context._checked(accept)
        except ops.KernelRefused as e:  # the kernel's own DAMON said no; it is left off
            raise _kernel_error(e.errno)(self.path, str(e)) from None


KERNEL_ERRORS: dict[int, type[DamondError]] = {
    errno.EBUSY: Busy,
    errno.EAGAIN: Busy,
    errno.ENOMEM: Busy,
    errno.EINVAL: InvalidArgument,
    errno.ERANGE: InvalidArgument,
    errno.ESRCH: InvalidArgument,
}
"""The contract's error for what the kernel answered a write damond's rules allowed:
busy or out of memory for now; a value it refuses; anything else (EACCES, EROFS,
ENOENT: the tree is not damond's to write) NotSupported."""


def _kernel_error(code: int) -> type[DamondError]:
    return KERNEL_ERRORS.get(code, NotSupported)


def _check_no_kdamond_runs(root: Kdamonds, nr: int) -> None:
    running = [k.path for k in root.kdamonds.items if k.running]
    if running:
        raise Busy(root.path, f"cannot change nr while {running[0]} is on")


class Kdamonds(Node):
    GROUPS = {"kdamonds": (nr_of("kdamonds", _check_no_kdamond_runs),)}

    def __init__(self, tree: Tree) -> None:
        super().__init__(tree, "", None)
        self.kdamonds = Collection(self, "kdamonds", lambda p: Kdamond(tree, p, self), MAX_KDAMONDS)

    def collections(self) -> list[Collection[Any]]:
        return [self.kdamonds]


class Tree:
    """The whole admin tree, with its listeners, the monitor factory and the ops tables."""

    def __init__(
        self,
        monitor_factory: MonitorFactory,
        registry: ops.Registry = ops.REGISTRY,
        backends_: backends.Backends | None = None,
    ) -> None:
        self.monitor_factory = monitor_factory
        self.registry = registry
        self._backends = backends_
        self.listeners: list[TreeListener] = []
        self.root = Kdamonds(self)

    @property
    def backends(self) -> backends.Backends:
        """Who may run a context here (monitor/backends.py): by default the user backend
        alone, over the registry the tree has now."""
        if self._backends is not None:
            return self._backends
        return backends.user_only(self.registry)

    def interference_warning(self) -> str | None:
        """A warning when a kernel kdamond runs that is not damond's own (read-only look)."""
        if self.backends.own_host_damon():
            return None  # damond claimed the machine's admin tree: its kdamonds are damond's
        return kernel_damon.interference_warning()

    def lookup(self, path: str) -> Node | None:
        """The node at a relative path such as ``kdamonds/0/contexts/0``."""
        node: Node = self.root
        parts = path.split("/") if path else []
        if len(parts) % 2:
            return None
        for name, index in zip(parts[::2], parts[1::2], strict=True):
            try:
                items = node.collection(name).items
            except KeyError:
                return None
            if not index.isdigit() or str(int(index)) != index or int(index) >= len(items):
                return None
            node = items[int(index)]
        return node

    def kdamonds(self) -> list[Kdamond]:
        return list(self.root.kdamonds.items)

    def count_regions(self) -> int:
        """Region objects in the whole tree (for MAX_TREE_REGIONS)."""
        return sum(
            len(target.regions.items)
            for kdamond in self.root.kdamonds.items
            for context in kdamond.contexts.items
            for target in context.targets.items
        )

    def stop_all(self, reason: str) -> None:
        for kdamond in self.kdamonds():
            kdamond.turn_off(reason)

    def emit_added(self, node: Node) -> None:
        for listener in self.listeners:
            listener.node_added(node)

    def emit_removed(self, node: Node) -> None:
        for listener in self.listeners:
            listener.node_removed(node)

    def emit_changed(self, node: Node, group: str, changed: dict[str, Any]) -> None:
        for listener in self.listeners:
            listener.properties_changed(node, group, changed)

    def emit_snapshot(self, context: Context, snapshot: Snapshot) -> None:
        for listener in self.listeners:
            listener.snapshot(context, snapshot)
