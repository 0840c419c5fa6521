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

import logging
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any, ClassVar, Generic, Protocol, TypeVar

from damond.errors import Busy, InvalidArgument, NoData, NotSupported
from damond.monitor import ops
from damond.monitor.config import Attrs, ConfigError, ContextConfig, TargetConfig
from damond.monitor.ops import kernel_damon
from damond.monitor.ops.process import process_problem
from damond.monitor.snapshot import Snapshot

log = logging.getLogger(__name__)

# Resource caps, so that one client cannot exhaust the daemon (docs/dbus-api.md,
# docs/reliability.md says why these numbers).
MAX_KDAMONDS = 64
MAX_TARGETS = 256
MAX_REGIONS = 4096
"""Region objects per target."""
MAX_TREE_REGIONS = 16384
"""Region objects in the whole tree: bounds the tree's memory and GetManagedObjects."""

U32_MAX = 2**32 - 1
U64_MAX = 2**64 - 1
I32_MIN, I32_MAX = -(2**31), 2**31 - 1
_BOUNDS = {"u32": (0, U32_MAX), "u64": (0, U64_MAX), "i32": (I32_MIN, I32_MAX)}

DEFAULT_ATTRS = Attrs()
"""The kernel's sysfs defaults, from the core's own definition."""


@dataclass(frozen=True)
class Attribute:
    """One sysfs file: its name, value kind, default, and how it is read and written.

    kind is one of "u32", "i32", "u64", "str", "strlist". A stored file keeps
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


def computed(name: str, kind: str, read: Callable[[Any], Any]) -> Attribute:
    """A read-only file computed from the node."""
    return Attribute(name, kind, read)


def nr_of(collection: str, check: Callable[[Any, int], None] | None = None) -> Attribute:
    """The `nr` file of a collection: refused under a running kdamond, then check(node, nr)."""

    def write(node: Node, value: int) -> None:
        node.refuse_if_running(f"{collection} nr")
        if check is not None:
            check(node, value)
        node.collection(collection).resize(value)

    return Attribute("nr", "u32", lambda node: len(node.collection(collection).items), write)


class Monitor(Protocol):
    """A running kdamond's monitor, as hierarchy.py drives it (monitor/kdamond.py)."""

    def stop(self) -> None: ...

    def commit(self, config: ContextConfig) -> None: ...


MonitorFactory = Callable[
    [str, ContextConfig, Callable[[Snapshot], None], Callable[[str], None]], Monitor
]
"""(kdamond name, config, on_snapshot, on_stop(reason)) → a started Monitor.

The factory and Monitor.commit may refuse a config with ConfigError (a target
pid that cannot be pinned at acceptance); then nothing started or changed."""


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
    if value not in registry.available_operations():
        raise NotSupported(context.path, registry.why_unavailable(value))


def _check_access_check(context: Context, value: str) -> None:
    registry = context.tree.registry
    known = (ops.AUTO, *registry.access_check_names)
    if value not in known:
        raise InvalidArgument(
            context.path, f"access_check {_shown(value)} is not one of {', '.join(known)}"
        )
    if value != ops.AUTO and value not in registry.available_access_checks():
        raise NotSupported(context.path, registry.why_unavailable(value))


def _effective_access_check(context: Context) -> str:
    kdamond = context.kdamond()
    config = kdamond.running_config if kdamond is not None else None
    return config.access_check if config is not None else ""


class Context(Node):
    GROUPS = {
        "context": (
            stored("operations", "str", ops.VADDR.name, check=_check_operations),
            computed(
                "avail_operations", "strlist", lambda c: c.tree.registry.available_operations()
            ),
            stored("access_check", "str", ops.AUTO, check=_check_access_check),
            computed(
                "avail_access_checks",
                "strlist",
                lambda c: c.tree.registry.available_access_checks(),
            ),
            computed("effective_access_check", "str", _effective_access_check),
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
    }

    operations: str
    access_check: str
    sample_us: int
    aggr_us: int
    update_us: int
    min_nr_regions: int
    max_nr_regions: int

    def __init__(self, tree: Tree, path: str, parent: Node) -> None:
        super().__init__(tree, path, parent)
        self.targets = Collection(self, "targets", lambda p: Target(tree, p, self), MAX_TARGETS)
        self.latest: Snapshot | None = None

    def collections(self) -> list[Collection[Any]]:
        return [self.targets]

    def get_snapshot(self) -> Snapshot:
        if self.latest is None:
            raise NoData(self.path, "no snapshot yet: the context has not completed an aggregation")
        return self.latest

    def config(self) -> ContextConfig:
        """Validate this context for `on`/`commit` and freeze it for the engine.

        The attributes first (the core's rules), then what this host can
        run, then the targets (the core's rules and the operations set's).
        """
        attrs = Attrs(
            sample_us=self.sample_us,
            aggr_us=self.aggr_us,
            update_us=self.update_us,
            min_nr_regions=self.min_nr_regions,
            max_nr_regions=self.max_nr_regions,
        )
        self._checked(attrs.validate)
        registry = self.tree.registry
        if self.operations not in registry.available_operations():
            raise NotSupported(self.path, registry.why_unavailable(self.operations))
        operations = registry.operations(self.operations)
        try:
            access_check = registry.resolve_access_check(self.access_check, operations.name)
        except ops.Unsupported as e:
            raise NotSupported(self.path, str(e)) from None
        except ValueError as e:
            raise InvalidArgument(self.path, str(e)) from None
        targets = tuple(
            TargetConfig(
                index=i,
                pid=t.pid if operations.target_has_pid else -1,
                regions=tuple((r.start, r.end) for r in t.regions.items),
            )
            for i, t in enumerate(self.targets.items)
        )
        config = ContextConfig(operations, access_check, attrs, targets)
        self._checked(config.validate)
        if operations.target_has_pid:
            for target, tc in zip(self.targets.items, targets, strict=True):
                problem = process_problem(tc.pid)
                if problem:
                    raise InvalidArgument(target.path, problem)
        return config

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
            computed("pid", "i32", lambda k: os.getpid() if k.running else -1),
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

    def turn_on(self) -> None:
        if self.running:
            raise Busy(self.path, "is already on")
        context = self._context()
        config = context.config()

        def on_snapshot(snapshot: Snapshot) -> None:
            if self.monitor is monitor:
                context.latest = snapshot
                self.tree.emit_snapshot(context, snapshot)

        def on_stop(reason: str) -> None:
            if self.monitor is monitor:
                self.turn_off(reason)

        monitor = context._checked(  # ConfigError: a target could not be pinned
            lambda: self.tree.monitor_factory(self.name, config, on_snapshot, on_stop)
        )
        self.monitor = monitor
        self.running_config = config
        context.latest = None
        log.info(
            "%s on: %s/%s, %d target(s) %s",
            self.path,
            config.operations.name,
            config.access_check,
            len(config.targets),
            [t.pid for t in config.targets],
            extra={
                "KDAMOND": self.name,
                "OPERATIONS": config.operations.name,
                "ACCESS_CHECK": config.access_check,
                "TARGET_PID": ",".join(str(t.pid) for t in config.targets),
            },
        )
        warning = kernel_damon.interference_warning()
        if warning:
            log.warning("%s: %s", self.path, warning, extra={"KDAMOND": self.name})
        self._announce_effective(context)
        self.tree.emit_changed(self, "kdamond", {"state": STATE_ON, "pid": os.getpid()})

    def turn_off(self, reason: str) -> None:
        """Stop monitoring (idempotent); reason goes to the log."""
        monitor, self.monitor = self.monitor, None
        if monitor is None:
            return
        self.running_config = None
        monitor.stop()
        log.info("%s off: %s", self.path, reason, extra={"KDAMOND": self.name})
        if self.contexts.items:
            self._announce_effective(self.contexts.items[0])
        self.tree.emit_changed(self, "kdamond", {"state": STATE_OFF, "pid": -1})

    def _announce_effective(self, context: Context) -> None:
        """The effective_* files change with the state: say so as for any file, before
        the state itself, so that whoever reacts to the state reads them changed."""
        self.tree.emit_changed(
            context, "context", {"effective_access_check": _effective_access_check(context)}
        )

    def commit(self) -> None:
        if self.monitor is None:
            raise InvalidArgument(self.path, "commit needs the kdamond to be on (state is off)")
        context = self._context()
        config = context.config()
        monitor = self.monitor
        context._checked(lambda: monitor.commit(config))  # new pids are pinned now
        self.running_config = config
        log.info("%s commit", self.path, extra={"KDAMOND": self.name})


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
        self, monitor_factory: MonitorFactory, registry: ops.Registry = ops.REGISTRY
    ) -> None:
        self.monitor_factory = monitor_factory
        self.registry = registry
        self.listeners: list[TreeListener] = []
        self.root = Kdamonds(self)

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
