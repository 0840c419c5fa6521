"""The admin tree: Kdamonds → Kdamond → Context → Target → Region.

This is DAMON's sysfs interface as a plain object model: every directory is a
node, every file an attribute in a named group. It decides everything the
contract says about values (defaults, `nr` semantics, validation, the on/off/
commit state machine) and knows nothing of D-Bus: listeners are told what
changed, and any transport can serve the tree.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any, Protocol

from damond.errors import Busy, InvalidArgument, NoData, NotSupported
from damond.monitor import ops
from damond.monitor.config import PAGE_SIZE, Attrs, ContextConfig, TargetConfig
from damond.monitor.ops import kernel_damon
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
MAX_NR_REGIONS = 10000
"""A context's monitoring regions: `nr_regions max`, and the regions it starts
with (min per target, or the target's own regions). Bounds the engine's memory
and a Snapshot (24 bytes a region: 240 KB, marshalled in about 11 ms)."""
MAX_REGION_END = 2**64 - PAGE_SIZE
"""A region's end must stay representable once aligned up to a page."""

U32_MAX = 2**32 - 1
U64_MAX = 2**64 - 1
I32_MIN, I32_MAX = -(2**31), 2**31 - 1


@dataclass(frozen=True)
class Attribute:
    """One sysfs file: its name, value kind and whether clients may write it."""

    name: str
    kind: str
    """One of "u32", "i32", "u64", "str", "strlist"."""
    writable: bool


def _rw(name: str, kind: str) -> Attribute:
    return Attribute(name, kind, True)


def _ro(name: str, kind: str) -> Attribute:
    return Attribute(name, kind, False)


class Monitor(Protocol):
    """A running kdamond's monitor, as hierarchy.py drives it (monitor/kdamond.py)."""

    def stop(self) -> None: ...

    def commit(self, config: ContextConfig) -> None: ...


MonitorFactory = Callable[
    [str, ContextConfig, Callable[[Snapshot], None], Callable[[str], None]], Monitor
]
"""(kdamond name, config, on_snapshot, on_stop(reason)) → a started Monitor."""


class TreeListener(Protocol):
    """What a transport needs to hear from the tree."""

    def node_added(self, node: Node) -> None: ...

    def node_removed(self, node: Node) -> None: ...

    def properties_changed(self, node: Node, group: str, changed: dict[str, Any]) -> None: ...

    def snapshot(self, context: Context, snapshot: Snapshot) -> None: ...


class Node:
    """A directory of the admin tree."""

    GROUPS: dict[str, tuple[Attribute, ...]] = {}

    def __init__(self, tree: Tree, path: str, parent: Node | None) -> None:
        self.tree = tree
        self.path = path
        self.parent = parent

    @property
    def name(self) -> str:
        return self.path.rsplit("/", 1)[-1]

    def collections(self) -> list[Collection]:
        """The `nr`-governed child directories of this node."""
        return []

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
        self.attribute(group, name)
        return getattr(self, f"_get_{group}_{name}")()

    def get_all(self, group: str) -> dict[str, Any]:
        return {a.name: self.get(group, a.name) for a in self.GROUPS.get(group, ())}

    def set(self, group: str, name: str, value: Any) -> None:
        """Write one attribute; refused writes change nothing and raise DamondError."""
        attr = self.attribute(group, name)
        if not attr.writable:
            raise InvalidArgument(self.path, f"{name} is read-only")
        _check_kind(self.path, attr, value)
        old = self.get(group, name)
        getattr(self, f"_set_{group}_{name}")(value)
        new = self.get(group, name)
        if new != old:
            self.tree.emit_changed(self, group, {name: new})

    def kdamond(self) -> Kdamond | None:
        node: Node | None = self
        while node is not None and not isinstance(node, Kdamond):
            node = node.parent
        return node

    def _refuse_if_running(self, what: str) -> None:
        kd = self.kdamond()
        if kd is not None and kd.running:
            raise Busy(self.path, f"cannot change {what} while {kd.path} is on")


def _check_kind(where: str, attr: Attribute, value: Any) -> None:
    """Guard the value range of each kind, whatever the transport already checked."""
    bounds = {"u32": (0, U32_MAX), "u64": (0, U64_MAX), "i32": (I32_MIN, I32_MAX)}
    if attr.kind in bounds:
        lo, hi = bounds[attr.kind]
        if not isinstance(value, int) or isinstance(value, bool) or not lo <= value <= hi:
            raise InvalidArgument(where, f"{attr.name} must be an integer in [{lo}, {hi}]")
    elif attr.kind == "str" and not isinstance(value, str):
        raise InvalidArgument(where, f"{attr.name} must be a string")


class Collection:
    """The children of one `nr` file: indices 0..nr-1, kept ones keep their values."""

    def __init__(self, owner: Node, name: str, make: Callable[[str], Node], cap: int) -> None:
        self.owner = owner
        self.name = name
        self.make = make
        self.cap = cap
        self.items: list[Node] = []

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


class Region(Node):
    GROUPS = {"region": (_rw("start", "u64"), _rw("end", "u64"))}

    def __init__(self, tree: Tree, path: str, parent: Node) -> None:
        super().__init__(tree, path, parent)
        self.start = 0
        self.end = 0

    def _get_region_start(self) -> int:
        return self.start

    def _get_region_end(self) -> int:
        return self.end

    def _set_region_start(self, value: int) -> None:
        self.start = value

    def _set_region_end(self, value: int) -> None:
        self.end = value


class Target(Node):
    GROUPS = {"target": (_rw("pid", "i32"),), "regions": (_rw("nr", "u32"),)}

    def __init__(self, tree: Tree, path: str, parent: Node) -> None:
        super().__init__(tree, path, parent)
        self.pid = -1
        self.regions = Collection(self, "regions", lambda p: Region(tree, p, self), MAX_REGIONS)

    def collections(self) -> list[Collection]:
        return [self.regions]

    def _get_target_pid(self) -> int:
        return self.pid

    def _set_target_pid(self, value: int) -> None:
        self.pid = value

    def _get_regions_nr(self) -> int:
        return len(self.regions.items)

    def _set_regions_nr(self, value: int) -> None:
        self._refuse_if_running("regions nr")
        total = self.tree.count_regions() - len(self.regions.items) + value
        if value <= MAX_REGIONS and total > MAX_TREE_REGIONS:
            raise InvalidArgument(
                self.path,
                f"regions nr {value} would make {total} regions in the tree, over the limit "
                f"of {MAX_TREE_REGIONS}",
            )
        self.regions.resize(value)


class Context(Node):
    GROUPS = {
        "context": (
            _rw("operations", "str"),
            _ro("avail_operations", "strlist"),
            _rw("access_check", "str"),
            _ro("avail_access_checks", "strlist"),
        ),
        "intervals": (_rw("sample_us", "u64"), _rw("aggr_us", "u64"), _rw("update_us", "u64")),
        "nr_regions": (_rw("min", "u64"), _rw("max", "u64")),
        "targets": (_rw("nr", "u32"),),
    }

    def __init__(self, tree: Tree, path: str, parent: Node) -> None:
        super().__init__(tree, path, parent)
        defaults = Attrs()
        self.operations = "vaddr"
        self.access_check = "auto"
        self.sample_us = defaults.sample_us
        self.aggr_us = defaults.aggr_us
        self.update_us = defaults.update_us
        self.min_nr_regions = defaults.min_nr_regions
        self.max_nr_regions = defaults.max_nr_regions
        self.targets = Collection(self, "targets", lambda p: Target(tree, p, self), MAX_TARGETS)
        self.latest: Snapshot | None = None

    def collections(self) -> list[Collection]:
        return [self.targets]

    def _get_context_operations(self) -> str:
        return self.operations

    def _set_context_operations(self, value: str) -> None:
        if value not in ops.OPERATIONS:
            raise InvalidArgument(
                self.path,
                f"operations {_shown(value)} is not one of {', '.join(ops.OPERATIONS)}",
            )
        if value not in ops.available_operations():
            raise NotSupported(self.path, ops.why_unavailable(value))
        self.operations = value

    def _get_context_avail_operations(self) -> list[str]:
        return list(ops.available_operations())

    def _get_context_access_check(self) -> str:
        return self.access_check

    def _set_context_access_check(self, value: str) -> None:
        known = ("auto", *ops.ACCESS_CHECKS)
        if value not in known:
            raise InvalidArgument(
                self.path, f"access_check {_shown(value)} is not one of {', '.join(known)}"
            )
        if value != "auto" and value not in ops.available_access_checks():
            raise NotSupported(self.path, ops.why_unavailable(value))
        self.access_check = value

    def _get_context_avail_access_checks(self) -> list[str]:
        return list(ops.available_access_checks())

    def _get_intervals_sample_us(self) -> int:
        return self.sample_us

    def _set_intervals_sample_us(self, value: int) -> None:
        self.sample_us = value

    def _get_intervals_aggr_us(self) -> int:
        return self.aggr_us

    def _set_intervals_aggr_us(self, value: int) -> None:
        self.aggr_us = value

    def _get_intervals_update_us(self) -> int:
        return self.update_us

    def _set_intervals_update_us(self, value: int) -> None:
        self.update_us = value

    def _get_nr_regions_min(self) -> int:
        return self.min_nr_regions

    def _set_nr_regions_min(self, value: int) -> None:
        self.min_nr_regions = value

    def _get_nr_regions_max(self) -> int:
        return self.max_nr_regions

    def _set_nr_regions_max(self, value: int) -> None:
        self.max_nr_regions = value

    def _get_targets_nr(self) -> int:
        return len(self.targets.items)

    def _set_targets_nr(self, value: int) -> None:
        self._refuse_if_running("targets nr")
        self.targets.resize(value)

    def get_snapshot(self) -> Snapshot:
        if self.latest is None:
            raise NoData(self.path, "no snapshot yet: the context has not completed an aggregation")
        return self.latest

    def config(self) -> ContextConfig:
        """Validate this context for `on`/`commit` and freeze it for the engine."""
        where = self.path
        if self.min_nr_regions < 3:
            raise InvalidArgument(where, f"nr_regions min must be >= 3, is {self.min_nr_regions}")
        if self.min_nr_regions > self.max_nr_regions:
            raise InvalidArgument(
                where,
                f"nr_regions min ({self.min_nr_regions}) must be <= max ({self.max_nr_regions})",
            )
        if self.sample_us == 0:
            raise InvalidArgument(where, "intervals sample_us must be > 0")
        if self.sample_us > self.aggr_us:
            raise InvalidArgument(
                where,
                f"intervals sample_us ({self.sample_us}) must be <= aggr_us ({self.aggr_us})",
            )
        if self.update_us == 0:
            raise InvalidArgument(where, "intervals update_us must be > 0")
        if self.max_nr_regions > MAX_NR_REGIONS:
            raise InvalidArgument(
                where,
                f"nr_regions max ({self.max_nr_regions}) must be <= {MAX_NR_REGIONS} "
                "(damond's limit)",
            )
        if self.operations not in ops.available_operations():
            raise NotSupported(where, ops.why_unavailable(self.operations))
        try:
            access_check = ops.resolve_access_check(self.access_check, self.operations)
        except ops.Unsupported as e:
            raise NotSupported(where, str(e)) from None
        except ValueError as e:
            raise InvalidArgument(where, str(e)) from None
        targets = tuple(self._target_config(i, t) for i, t in enumerate(self.targets.items))
        initial = sum(len(t.regions) or self.min_nr_regions for t in targets)
        if initial > MAX_NR_REGIONS:
            raise InvalidArgument(
                where,
                f"would start with {initial} regions (nr_regions min or the target's own "
                f"regions, per target), over damond's limit of {MAX_NR_REGIONS}",
            )
        if self.operations == "vaddr" and not targets:
            raise InvalidArgument(where, "vaddr needs at least one target (targets nr is 0)")
        if self.operations == "paddr" and len(targets) > 1:
            raise InvalidArgument(where, f"paddr takes at most one target, has {len(targets)}")
        attrs = Attrs(
            sample_us=self.sample_us,
            aggr_us=self.aggr_us,
            update_us=self.update_us,
            min_nr_regions=self.min_nr_regions,
            max_nr_regions=self.max_nr_regions,
        )
        return ContextConfig(self.operations, access_check, attrs, targets)

    def _target_config(self, index: int, target: Node) -> TargetConfig:
        assert isinstance(target, Target)
        regions = tuple((r.start, r.end) for r in target.regions.items if isinstance(r, Region))
        for r, (start, end) in zip(target.regions.items, regions, strict=True):
            if start >= end:
                raise InvalidArgument(r.path, f"start ({start:#x}) must be < end ({end:#x})")
            if end > MAX_REGION_END:
                raise InvalidArgument(
                    r.path, f"end ({end:#x}) must be <= {MAX_REGION_END:#x} (the last page)"
                )
        for (_, prev_end), r, (start, _) in zip(
            regions, target.regions.items[1:], regions[1:], strict=False
        ):
            if start < prev_end:
                raise InvalidArgument(
                    r.path,
                    f"regions must be sorted and not overlap: start {start:#x} < previous "
                    f"region's end {prev_end:#x}",
                )
        if self.operations == "fvaddr" and not regions:
            raise InvalidArgument(target.path, "fvaddr needs at least one region (regions nr is 0)")
        if self.operations in ("vaddr", "fvaddr") and not _process_exists(target.pid):
            raise InvalidArgument(target.path, f"pid {target.pid} is not a live process")
        pid = target.pid if self.operations != "paddr" else -1
        return TargetConfig(index=index, pid=pid, regions=regions)


def _shown(value: str, limit: int = 64) -> str:
    """A client's string as an error message repeats it: quoted, and cut when long."""
    if len(value) <= limit:
        return repr(value)
    return f"{value[:limit]!r}… ({len(value)} characters)"


def _process_exists(pid: int) -> bool:
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:  # a zombie has no memory left to monitor
        with open(f"/proc/{pid}/stat", "rb") as f:
            return f.read().rsplit(b")", 1)[1].split()[0] != b"Z"
    except (OSError, IndexError):
        return False


STATE_ON = "on"
STATE_OFF = "off"
STATE_COMMIT = "commit"


class Kdamond(Node):
    GROUPS = {
        "kdamond": (_rw("state", "str"), _ro("pid", "i32")),
        "contexts": (_rw("nr", "u32"),),
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

    def collections(self) -> list[Collection]:
        return [self.contexts]

    def _get_kdamond_state(self) -> str:
        return STATE_ON if self.running else STATE_OFF

    def _get_kdamond_pid(self) -> int:
        return os.getpid() if self.running else -1

    def _get_contexts_nr(self) -> int:
        return len(self.contexts.items)

    def _set_contexts_nr(self, value: int) -> None:
        self._refuse_if_running("contexts nr")
        if value > 1:
            raise InvalidArgument(self.path, f"contexts nr must be 0 or 1, not {value}")
        self.contexts.resize(value)

    def set(self, group: str, name: str, value: Any) -> None:
        if (group, name) != ("kdamond", "state"):
            super().set(group, name, value)
            return
        _check_kind(self.path, self.attribute(group, name), value)
        if value == STATE_ON:
            self.turn_on()
        elif value == STATE_OFF:
            self.turn_off("stopped by request")
        elif value == STATE_COMMIT:
            self.commit()
        else:
            raise InvalidArgument(
                self.path, f"state must be on, off or commit, not {_shown(value)}"
            )

    def _context(self) -> Context:
        if len(self.contexts.items) != 1:
            raise InvalidArgument(
                self.path,
                f"needs exactly one context (contexts nr is {len(self.contexts.items)})",
            )
        context = self.contexts.items[0]
        assert isinstance(context, Context)
        return context

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

        monitor = self.tree.monitor_factory(self.name, config, on_snapshot, on_stop)
        self.monitor = monitor
        self.running_config = config
        context.latest = None
        log.info(
            "%s on: %s/%s, %d target(s) %s",
            self.path,
            config.operations,
            config.access_check,
            len(config.targets),
            [t.pid for t in config.targets],
            extra={
                "KDAMOND": self.name,
                "OPERATIONS": config.operations,
                "ACCESS_CHECK": config.access_check,
                "TARGET_PID": ",".join(str(t.pid) for t in config.targets),
            },
        )
        warning = kernel_damon.interference_warning()
        if warning:
            log.warning("%s: %s", self.path, warning, extra={"KDAMOND": self.name})
        self.tree.emit_changed(self, "kdamond", {"state": STATE_ON, "pid": os.getpid()})

    def turn_off(self, reason: str) -> None:
        """Stop monitoring (idempotent); reason goes to the log."""
        monitor, self.monitor = self.monitor, None
        if monitor is None:
            return
        self.running_config = None
        monitor.stop()
        log.info("%s off: %s", self.path, reason, extra={"KDAMOND": self.name})
        self.tree.emit_changed(self, "kdamond", {"state": STATE_OFF, "pid": -1})

    def commit(self) -> None:
        if self.monitor is None:
            raise InvalidArgument(self.path, "commit needs the kdamond to be on (state is off)")
        config = self._context().config()
        self.monitor.commit(config)
        self.running_config = config
        log.info("%s commit", self.path, extra={"KDAMOND": self.name})


class Kdamonds(Node):
    GROUPS = {"kdamonds": (_rw("nr", "u32"),)}

    def __init__(self, tree: Tree) -> None:
        super().__init__(tree, "", None)
        self.kdamonds = Collection(self, "kdamonds", lambda p: Kdamond(tree, p, self), MAX_KDAMONDS)

    def collections(self) -> list[Collection]:
        return [self.kdamonds]

    def _get_kdamonds_nr(self) -> int:
        return len(self.kdamonds.items)

    def _set_kdamonds_nr(self, value: int) -> None:
        running = [k.path for k in self.kdamonds.items if isinstance(k, Kdamond) and k.running]
        if running:
            raise Busy(self.path, f"cannot change nr while {running[0]} is on")
        self.kdamonds.resize(value)


class Tree:
    """The whole admin tree, with its listeners and the monitor factory."""

    def __init__(self, monitor_factory: MonitorFactory) -> None:
        self.monitor_factory = monitor_factory
        self.listeners: list[TreeListener] = []
        self.root = Kdamonds(self)

    def lookup(self, path: str) -> Node | None:
        """The node at a relative path such as ``kdamonds/0/contexts/0``."""
        node: Node = self.root
        parts = path.split("/") if path else []
        if len(parts) % 2:
            return None
        for collection, index in zip(parts[::2], parts[1::2], strict=True):
            items = getattr(node, collection, None)
            if not isinstance(items, Collection) or not index.isdigit():
                return None
            if str(int(index)) != index or int(index) >= len(items.items):
                return None
            node = items.items[int(index)]
        return node

    def kdamonds(self) -> list[Kdamond]:
        return [k for k in self.root.kdamonds.items if isinstance(k, Kdamond)]

    def count_regions(self) -> int:
        """Region objects in the whole tree (for MAX_TREE_REGIONS)."""
        return sum(
            len(target.regions.items)
            for kdamond in self.kdamonds()
            for context in kdamond.contexts.items
            if isinstance(context, Context)
            for target in context.targets.items
            if isinstance(target, Target)
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
