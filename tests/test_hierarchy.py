"""The admin tree's decisions, without a bus: state machine, validation, events.

The monitor is a recording fake here; the real one is exercised over D-Bus in
test_dbus_*.py. These tests cover rules a host cannot reach over the bus
(paddr needs page_idle, which this development kernel lacks).
"""

from __future__ import annotations

import errno
import os
from collections.abc import Callable
from typing import Any

import pytest
from ops_helpers import registry_with  # tests/ops_helpers.py

from damond.errors import Busy, InvalidArgument, NoData, NotSupported
from damond.hierarchy import Context, Kdamond, Node, Scheme, Target, Tree
from damond.monitor import backends, ops
from damond.monitor.config import (
    AccessPattern,
    ContextConfig,
    FilterConfig,
    Quotas,
    SchemeConfig,
    Watermarks,
)
from damond.monitor.snapshot import SchemeResult, SchemeStats, Snapshot


class FakeMonitor:
    def __init__(
        self,
        config: ContextConfig,
        on_snapshot: Callable[[Snapshot], None],
        on_stop: Callable[[str], None],
    ) -> None:
        self.configs = [config]
        self.pid = os.getpid()
        self.on_snapshot = on_snapshot
        self.on_stop = on_stop
        self.stopped = False

    def stop(self) -> None:
        self.stopped = True

    def commit(self, config: ContextConfig) -> None:
        self.configs.append(config)


class Recorder:
    def __init__(self) -> None:
        self.events: list[tuple[str, str, Any]] = []

    def node_added(self, node: Node) -> None:
        self.events.append(("added", node.path, None))

    def node_removed(self, node: Node) -> None:
        self.events.append(("removed", node.path, None))

    def properties_changed(self, node: Node, group: str, changed: dict[str, Any]) -> None:
        self.events.append(("changed", node.path, (group, changed)))

    def snapshot(self, context: Context, snapshot: Snapshot) -> None:
        self.events.append(("snapshot", context.path, snapshot.seq))


@pytest.fixture
def tree() -> tuple[Tree, list[FakeMonitor], Recorder]:
    monitors: list[FakeMonitor] = []

    def factory(name: str, config: ContextConfig, on_snapshot: Any, on_stop: Any) -> FakeMonitor:
        monitors.append(FakeMonitor(config, on_snapshot, on_stop))
        return monitors[-1]

    t = Tree(factory)
    recorder = Recorder()
    t.listeners.append(recorder)
    return t, monitors, recorder


def build(t: Tree, pid: int = os.getpid(), targets: int = 1) -> tuple[Kdamond, Context]:
    t.root.set("kdamonds", "nr", 1)
    kd = t.lookup("kdamonds/0")
    assert isinstance(kd, Kdamond)
    kd.set("contexts", "nr", 1)
    ctx = t.lookup("kdamonds/0/contexts/0")
    assert isinstance(ctx, Context)
    ctx.set("targets", "nr", targets)
    for i in range(targets):
        target = t.lookup(f"kdamonds/0/contexts/0/targets/{i}")
        assert isinstance(target, Target)
        target.set("target", "pid", pid)
    return kd, ctx


def test_lookup_rejects_odd_and_non_canonical_paths(tree: Any) -> None:
    t, _, _ = tree
    build(t)
    assert t.lookup("kdamonds/0/contexts/0") is not None
    for bad in [
        "kdamonds",
        "kdamonds/00",
        "kdamonds/1",
        "kdamonds/-1",
        "nosuch/0",
        "kdamonds/0/targets/0",
        "kdamonds/+0",
    ]:
        assert t.lookup(bad) is None, bad


def test_on_off_commit_cycle(tree: Any) -> None:
    t, monitors, recorder = tree
    kd, ctx = build(t)
    recorder.events.clear()
    kd.set("kdamond", "state", "on")
    assert kd.get("kdamond", "state") == "on" and kd.get("kdamond", "pid") == os.getpid()
    config = monitors[0].configs[0]
    granularity = t.registry.access_check(config.access_check).granularity
    assert recorder.events == [
        (
            "changed",
            "kdamonds/0/contexts/0",
            (
                "context",
                {
                    "effective_access_check": config.access_check,
                    "access_granularity": granularity,
                    "effective_backend": "user",
                },
            ),
        ),
        ("changed", "kdamonds/0", ("kdamond", {"state": "on", "pid": os.getpid()})),
    ]
    assert ctx.get("context", "effective_access_check") == config.access_check
    assert ctx.get("context", "effective_backend") == config.backend == "user"
    assert ctx.get("context", "access_granularity") in ("page", "page-writes", "mapping")
    assert config.operations is ops.VADDR and config.targets[0].pid == os.getpid()
    assert config.access_check in t.registry.available_access_checks()

    ctx.set("intervals", "aggr_us", 200000)
    assert len(monitors[0].configs) == 1  # stored, not applied
    kd.set("kdamond", "state", "commit")
    assert monitors[0].configs[-1].attrs.aggr_us == 200000

    snap = Snapshot(1, 0, 20, ())
    monitors[0].on_snapshot(snap)
    assert ctx.get_snapshot() is snap
    kd.set("kdamond", "state", "off")
    assert monitors[0].stopped and kd.get("kdamond", "pid") == -1
    kd.set("kdamond", "state", "off")  # idempotent, silent
    assert [e for e in recorder.events if e[0] == "changed" and e[1] == "kdamonds/0"][-1] == (
        "changed",
        "kdamonds/0",
        ("kdamond", {"state": "off", "pid": -1}),
    )
    # a stale monitor's late callbacks change nothing
    monitors[0].on_stop("late")
    monitors[0].on_snapshot(Snapshot(2, 0, 20, ()))
    assert ctx.get_snapshot() is snap


def test_monitor_stopping_by_itself_turns_the_kdamond_off(tree: Any) -> None:
    t, monitors, recorder = tree
    kd, ctx = build(t)
    kd.set("kdamond", "state", "on")
    monitors[0].on_stop("every target has exited")
    assert kd.get("kdamond", "state") == "off"
    assert recorder.events[-1] == (
        "changed",
        "kdamonds/0",
        ("kdamond", {"state": "off", "pid": -1}),
    )
    with pytest.raises(NoData):
        Context.get_snapshot(t.lookup("kdamonds/0/contexts/0"))  # type: ignore[arg-type]


def test_paddr_takes_at_most_one_target(tree: Any) -> None:
    t, monitors, _ = tree
    t.registry = registry_with(probes={"page_idle": "", "clear_refs": ""})  # as with page_idle
    kd, ctx = build(t, targets=2)
    ctx.set("context", "operations", "paddr")
    with pytest.raises(InvalidArgument, match="paddr takes at most one target"):
        kd.set("kdamond", "state", "on")
    assert not monitors
    ctx.set("targets", "nr", 1)
    kd.set("kdamond", "state", "on")
    assert monitors[0].configs[0].targets[0].pid == -1  # paddr has no process


def test_refused_writes_change_nothing_and_say_nothing(tree: Any) -> None:
    t, _, recorder = tree
    kd, ctx = build(t)
    kd.set("kdamond", "state", "on")
    recorder.events.clear()
    for node, group, name, value, error in [
        (t.root, "kdamonds", "nr", 0, Busy),
        (kd, "contexts", "nr", 0, Busy),
        (ctx, "targets", "nr", 3, Busy),
        (kd, "kdamond", "state", "on", Busy),
        (kd, "kdamond", "state", "bogus", InvalidArgument),
        (kd, "kdamond", "pid", 1, InvalidArgument),
        (ctx, "context", "operations", "nope", InvalidArgument),
        (ctx, "intervals", "aggr_us", -1, InvalidArgument),
        (ctx, "intervals", "aggr_us", 2**64, InvalidArgument),
        (ctx, "intervals", "aggr_us", "1", InvalidArgument),
    ]:
        with pytest.raises(error):
            node.set(group, name, value)
    assert recorder.events == []
    assert len(list(t.root.walk())) == 4


# --- DAMOS schemes ---------------------------------------------------------------------------


def with_scheme(t: Tree, filters: int = 0) -> tuple[Kdamond, Context, Scheme]:
    kd, ctx = build(t)
    ctx.set("schemes", "nr", 1)
    scheme = t.lookup("kdamonds/0/contexts/0/schemes/0")
    assert isinstance(scheme, Scheme)
    scheme.set("filters", "nr", filters)
    return kd, ctx, scheme


def test_scheme_files_become_the_cores_config(tree: Any) -> None:
    t, monitors, _ = tree
    kd, _, scheme = with_scheme(t, filters=1)
    for group, name, value in [
        ("scheme", "action", "pageout"),
        ("scheme", "apply_interval_us", 300_000),
        ("access_pattern", "nr_accesses_max", 0),
        ("access_pattern", "age_min", 20),
        ("quotas", "bytes", 1 << 20),
        ("quotas", "reset_interval_ms", 1000),
        ("quotas", "weight_age", 1000),
        ("watermarks", "metric", "free_mem_rate"),
        ("watermarks", "high", 900),
        ("watermarks", "mid", 800),
    ]:
        scheme.set(group, name, value)
    filter_node = t.lookup("kdamonds/0/contexts/0/schemes/0/filters/0")
    assert filter_node is not None
    filter_node.set("filter", "type", "addr")
    filter_node.set("filter", "allow", True)
    filter_node.set("filter", "addr_end", 1 << 30)
    kd.set("kdamond", "state", "on")
    config = monitors[0].configs[0].schemes[0]
    assert config == SchemeConfig(
        0,
        "pageout",
        300_000,
        AccessPattern(nr_accesses_max=0, age_min=20),
        Quotas(bytes=1 << 20, reset_interval_ms=1000, weight_age=1000),
        Watermarks("free_mem_rate", high=900, mid=800),
        (FilterConfig("addr", allow=True, addr_end=1 << 30),),
    )


def test_what_the_backend_cannot_do_is_not_supported(tree: Any) -> None:
    t, monitors, recorder = tree
    t.registry = registry_with(probes={"page_idle": "", "clear_refs": ""})  # paddr available
    kd, ctx, scheme = with_scheme(t, filters=1)
    scheme.set("scheme", "action", "pageout")
    assert "pageout" in scheme.get("scheme", "avail_actions")
    ctx.set("context", "operations", "paddr")  # accepted: the scheme is checked at on
    assert scheme.get("scheme", "avail_actions") == ["stat"]
    with pytest.raises(NotSupported, match="only count"):
        kd.set("kdamond", "state", "on")
    with pytest.raises(NotSupported, match="only count"):
        scheme.set("scheme", "action", "cold")
    scheme.set("scheme", "action", "stat")
    with pytest.raises(NotSupported, match="anon filter"):
        kd.set("kdamond", "state", "on")  # the default filter type: anon, per page
    node = t.lookup("kdamonds/0/contexts/0/schemes/0/filters/0")
    assert node is not None
    node.set("filter", "type", "addr")
    ctx.set("targets", "nr", 1)
    kd.set("kdamond", "state", "on")
    assert monitors[0].configs[0].schemes[0].action == "stat"


def test_stats_are_announced_at_most_once_a_second(tree: Any) -> None:
    t, monitors, recorder = tree
    kd, ctx, scheme = with_scheme(t)
    kd.set("kdamond", "state", "on")
    recorder.events.clear()

    def snapshot(seq: int, nr_tried: int) -> Snapshot:
        stats = SchemeStats(nr_tried, nr_tried * 4096)
        result = SchemeResult(0, stats, 0, True, ((0, 0, 4096, 0, 1),))
        return Snapshot(seq, 0, 20, (), (result,))

    def announced() -> list[Any]:
        return [e[2][1] for e in recorder.events if e[0] == "changed" and e[1] == scheme.path]

    monitors[0].on_snapshot(snapshot(1, 1))
    assert announced() == [{"nr_tried": 1, "sz_tried": 4096}]
    monitors[0].on_snapshot(snapshot(2, 2))  # within the second: read, not announced
    assert scheme.get("scheme_stats", "nr_tried") == 2 and len(announced()) == 1
    assert scheme.tried_regions() == ((0, 0, 4096, 0, 1),)
    kd.set("kdamond", "state", "off")  # the last word
    assert announced()[-1] == {"nr_tried": 2, "sz_tried": 8192}
    assert scheme.get("scheme_stats", "nr_tried") == 2  # kept while off
    kd.set("kdamond", "state", "on")  # back to zero, and said so
    assert announced()[-1] == {"nr_tried": 0, "sz_tried": 0}
    with pytest.raises(NoData):
        scheme.tried_regions()


class StandIn:
    """A kernel backend table whose answers the test sets (what the host can do is the
    guest's to test: tests/vm/test_guest_kernel_backend.py)."""

    def __init__(self) -> None:
        self.reason = ""
        self.busy = ""
        self.offered = ["vaddr", "paddr"]
        self.refuse: int | None = None
        self.readied: list[str] = []
        self.cannot: dict[str, str] = {}
        """DAMOS action or filter type (or "allow") -> why the kernel cannot do it."""

    def ready(self, operations: str) -> str:
        self.readied.append(operations)
        if self.reason or self.busy:
            return self.reason or self.busy
        return "" if operations in self.offered else f"the kernel's DAMON has no {operations}"

    def table(self, start: Any) -> backends.Backend:
        def started(*args: Any) -> Any:
            if self.refuse is not None:
                raise ops.KernelRefused(f"kernel said {errno.errorcode[self.refuse]}", self.refuse)
            return start(*args)

        return backends.Backend(
            backends.KERNEL,
            uses_access_check=False,
            probe=lambda: self.reason,
            operations=lambda: self.offered,
            ready=self.ready,
            why_action_unavailable=lambda action, operations: self.cannot.get(action, ""),
            why_filter_unavailable=lambda f, operations: self.cannot.get(f.type, "")
            or (self.cannot.get("allow", "") if f.allow else ""),
            start=started,
            granularity="page",
        )


@pytest.fixture
def with_kernel(tree: Any) -> tuple[Tree, list[FakeMonitor], Recorder, StandIn]:
    t, monitors, recorder = tree
    kernel = StandIn()
    t._backends = backends.Backends(
        [kernel.table(t.monitor_factory), backends.user_backend(t.registry)]
    )
    t.monitor_factory = kernel.table(t.monitor_factory).start
    return t, monitors, recorder, kernel


def test_auto_picks_the_kernel_where_it_can_run_the_context(with_kernel: Any) -> None:
    t, monitors, recorder, kernel = with_kernel
    kd, ctx = build(t)
    assert ctx.get("context", "avail_backends") == ["kernel", "user"]
    recorder.events.clear()
    kd.set("kdamond", "state", "on")
    config = monitors[0].configs[0]
    assert (config.backend, config.access_check) == ("kernel", "")
    assert recorder.events[0] == (
        "changed",
        "kdamonds/0/contexts/0",
        (
            "context",
            {
                "effective_access_check": "",
                "access_granularity": "page",
                "effective_backend": "kernel",
            },
        ),
    )
    kd.set("kdamond", "state", "off")
    # another tool took the tree meanwhile: auto falls back, kernel is refused saying why
    kernel.reason = "kernel DAMON sysfs in use: kdamonds/nr_kdamonds is 2"
    assert ctx.get("context", "avail_backends") == ["user"]
    kd.set("kdamond", "state", "on")
    assert monitors[-1].configs[0].backend == "user"
    kd.set("kdamond", "state", "off")
    with pytest.raises(NotSupported, match="kernel backend: kernel DAMON sysfs in use"):
        ctx.set("context", "backend", "kernel")
    assert ctx.get("context", "backend") == "auto"


def test_the_backend_is_chosen_only_once_the_context_is_known_good(with_kernel: Any) -> None:
    t, monitors, _, kernel = with_kernel
    kd, ctx = build(t, pid=-1)
    ctx.set("context", "backend", "kernel")
    with pytest.raises(InvalidArgument, match="pid -1"):
        kd.set("kdamond", "state", "on")
    assert kernel.readied == []  # nothing asked of the kernel (which would claim its tree)
    with pytest.raises(InvalidArgument, match="is not one of auto, kernel, user"):
        ctx.set("context", "backend", "kernal")
    assert not monitors


def test_a_kernel_refusal_changes_nothing_and_names_the_errno(with_kernel: Any) -> None:
    t, monitors, recorder, kernel = with_kernel
    kd, ctx = build(t)
    ctx.set("context", "backend", "kernel")
    refusals = {errno.EBUSY: Busy, errno.EINVAL: InvalidArgument, errno.EROFS: NotSupported}
    for code, error in refusals.items():  # busy for now; a value it takes otherwise; not ours
        kernel.refuse = code
        recorder.events.clear()
        with pytest.raises(error, match=errno.errorcode[code]):
            kd.set("kdamond", "state", "on")
        assert kd.get("kdamond", "state") == "off" and not recorder.events
    assert not monitors


def test_commit_keeps_the_backend_the_context_runs_on(with_kernel: Any) -> None:
    t, monitors, _, kernel = with_kernel
    kd, ctx = build(t)
    kd.set("kdamond", "state", "on")
    kernel.busy = f"all {8} kdamonds of damond's kernel DAMON pool are on"
    ctx.set("intervals", "aggr_us", 200000)
    kd.set("kdamond", "state", "commit")  # its own kdamond: no new one needed
    assert [c.backend for c in monitors[0].configs] == ["kernel", "kernel"]
    ctx.set("context", "backend", "user")
    with pytest.raises(InvalidArgument, match="takes effect at the next on"):
        kd.set("kdamond", "state", "commit")
    assert len(monitors[0].configs) == 2


def test_schemes_are_checked_against_the_backend_that_runs_them(with_kernel: Any) -> None:
    """Each backend's tables say what it does of a scheme: the one the context names, the
    one it runs on while on, or under auto any that may run it (auto then picks one that
    can do every scheme); refusals are NotSupported before a monitor exists."""
    t, monitors, _, kernel = with_kernel
    kernel.cannot = {
        "pageout": "pageout: not the kernel's here",
        "anon": "anon filter: the kernel's vaddr operations ignore it",
        "allow": "allow: the kernel's filters only reject",
    }
    kd, ctx, scheme = with_scheme(t, filters=1)  # filter 0: anon, the default type
    ctx.set("context", "backend", "kernel")
    avail = scheme.get("scheme", "avail_actions")
    assert "nohugepage" in avail and "pageout" not in avail  # the kernel's, not the user's
    scheme.set("scheme", "action", "nohugepage")  # which the user backend cannot do
    with pytest.raises(NotSupported, match="not the kernel's here"):
        scheme.set("scheme", "action", "pageout")
    f0 = t.lookup("kdamonds/0/contexts/0/schemes/0/filters/0")
    assert f0 is not None
    with pytest.raises(NotSupported, match="filters/0: anon filter: the kernel's vaddr"):
        kd.set("kdamond", "state", "on")
    f0.set("filter", "type", "addr")
    with pytest.raises(NotSupported, match="only reject"):
        f0.set("filter", "allow", True)
    kd.set("kdamond", "state", "on")
    assert monitors[-1].configs[0].backend == "kernel"
    ctx.set("context", "backend", "user")  # for the next on: the running kernel decides
    assert "pageout" not in scheme.get("scheme", "avail_actions")
    with pytest.raises(NotSupported, match="not the kernel's here"):
        scheme.set("scheme", "action", "pageout")
    kd.set("kdamond", "state", "off")

    # auto: what either may do; `on` picks the first that can do every scheme
    ctx.set("context", "backend", "auto")
    assert {"nohugepage", "pageout"} <= set(scheme.get("scheme", "avail_actions"))
    scheme.set("scheme", "action", "pageout")
    f0.set("filter", "allow", True)
    kd.set("kdamond", "state", "on")
    assert monitors[-1].configs[0].backend == "user"
    kd.set("kdamond", "state", "off")
    scheme.set("scheme", "action", "nohugepage")
    with pytest.raises(NotSupported, match="filters/0: allow: the kernel's filters only reject"):
        kd.set("kdamond", "state", "on")  # neither can: the first's reason, named
    f0.set("filter", "allow", False)
    kd.set("kdamond", "state", "on")
    assert monitors[-1].configs[0].backend == "kernel"
