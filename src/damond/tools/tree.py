"""The daemon's admin tree as a client sees it: read in one call, written step by step.

GetManagedObjects gives every object; here it becomes kdamonds_format's plain
TreeObjects (relative path → attribute group → value), and typed views of the
contexts for status, watch, wss, record and the exporter. Writes go through
D-Bus one property at a time, exactly as busctl would, so the daemon's rules
and messages apply.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from dbus_fast.aio import MessageBus

from damond import kdamonds_format as fmt
from damond.bus import GROUPS, INTERFACES, ROOT_PATH, SIGNATURES, object_path
from damond.tools import client


def relative(path: str) -> str:
    """An object path as a tree path: /org/damond1/kdamonds/0 → kdamonds/0."""
    return path[len(ROOT_PATH) + 1 :] if path.startswith(ROOT_PATH + "/") else ""


def from_managed(
    managed: dict[str, dict[str, dict[str, Any]]],
) -> dict[str, dict[str, dict[str, Any]]]:
    """TreeObjects (the root included) from client.managed_objects' answer; interfaces
    this version does not know are left out."""
    objects: dict[str, dict[str, dict[str, Any]]] = {}
    for path, ifaces in managed.items():
        objects[relative(path)] = {GROUPS[i]: props for i, props in ifaces.items() if i in GROUPS}
    nr = sum(1 for p in objects if p.count("/") == 1 and p.startswith("kdamonds/"))
    objects[""] = {"kdamonds": {"nr": nr}}
    return objects


async def read_objects(bus: MessageBus) -> dict[str, dict[str, dict[str, Any]]]:
    """Every object of the daemon's tree as TreeObjects (the root included)."""
    return from_managed(await client.managed_objects(bus))


async def run_steps(bus: MessageBus, steps: Sequence[fmt.Step]) -> None:
    """Write each step as a property Set; the first refusal is raised (DBusError)."""
    for step in steps:
        if isinstance(step, fmt.StateChange):
            await client.set_property(
                bus, object_path(step.path), INTERFACES["kdamond"], "state", "s", step.state
            )
        else:
            await client.set_property(
                bus,
                object_path(step.path),
                INTERFACES[step.group],
                step.name,
                SIGNATURES[step.kind],
                step.value,
            )


@dataclass(frozen=True)
class TargetInfo:
    index: int
    pid: int
    nr_regions: int
    """User-given regions (fvaddr, paddr); 0 for vaddr's own."""


SCHEME_STATS = ("nr_tried", "sz_tried", "nr_applied", "sz_applied", "qt_exceeds")
"""org.damond1.SchemeStats, as the kernel's schemes/S/stats/ files."""


@dataclass(frozen=True)
class SchemeInfo:
    """One scheme: what it does and what it did (stats since its kdamond went on)."""

    index: int
    action: str
    stats: dict[str, int]
    """SCHEME_STATS by name (those the daemon has)."""
    effective_bytes: int
    """The quota in force (0: none)."""


@dataclass(frozen=True)
class ContextInfo:
    """One context as status and the live commands need it."""

    kdamond: int
    index: int
    running: bool
    kdamond_pid: int
    context: dict[str, Any]
    """org.damond1.Context's properties (operations, access_check, effective_*, …)."""
    sample_us: int
    aggr_us: int
    update_us: int
    min_nr_regions: int
    max_nr_regions: int
    targets: tuple[TargetInfo, ...]
    schemes: tuple[SchemeInfo, ...] = ()

    @property
    def path(self) -> str:
        """The context's object path (where its Snapshot signals come from)."""
        return object_path(f"kdamonds/{self.kdamond}/contexts/{self.index}")

    @property
    def kdamond_path(self) -> str:
        return object_path(f"kdamonds/{self.kdamond}")

    @property
    def effective_aggr_us(self) -> tuple[int, str]:
        """The aggregation interval to turn ages into time, and where it came from:
        the daemon's measured ``effective_aggr_us`` when it has one, else ``aggr_us``."""
        measured = self.context.get("effective_aggr_us")
        if isinstance(measured, int) and measured > 0:
            return measured, "effective_aggr_us"
        return self.aggr_us, "aggr_us"


def contexts(objects: fmt.TreeObjects) -> list[ContextInfo]:
    """Every context of the tree, in kdamond order."""
    found = []
    for kpath in fmt.children(objects, "", "kdamonds"):
        kdamond = objects[kpath]["kdamond"]
        for cpath in fmt.children(objects, kpath, "contexts"):
            ctx = objects[cpath]
            targets = tuple(
                TargetInfo(
                    t,
                    objects[tpath]["target"]["pid"],
                    len(fmt.children(objects, tpath, "regions")),
                )
                for t, tpath in enumerate(fmt.children(objects, cpath, "targets"))
            )
            schemes = tuple(
                _scheme(s, objects[spath])
                for s, spath in enumerate(fmt.children(objects, cpath, "schemes"))
            )
            found.append(
                ContextInfo(
                    kdamond=int(kpath.rsplit("/", 1)[1]),
                    index=int(cpath.rsplit("/", 1)[1]),
                    running=kdamond["state"] == "on",
                    kdamond_pid=kdamond["pid"],
                    context=dict(ctx["context"]),
                    sample_us=ctx["intervals"]["sample_us"],
                    aggr_us=ctx["intervals"]["aggr_us"],
                    update_us=ctx["intervals"]["update_us"],
                    min_nr_regions=ctx["nr_regions"]["min"],
                    max_nr_regions=ctx["nr_regions"]["max"],
                    targets=targets,
                    schemes=schemes,
                )
            )
    return found


def _scheme(index: int, groups: Mapping[str, Mapping[str, Any]]) -> SchemeInfo:
    stats = groups.get("scheme_stats", {})
    return SchemeInfo(
        index,
        str(groups.get("scheme", {}).get("action", "")),
        {name: int(stats[name]) for name in SCHEME_STATS if name in stats},
        int(groups.get("quotas", {}).get("effective_bytes", 0)),
    )


def monitoring(objects: fmt.TreeObjects, pid: int) -> ContextInfo | None:
    """A running context that has pid among its targets, if any."""
    return next(
        (c for c in contexts(objects) if c.running and any(t.pid == pid for t in c.targets)),
        None,
    )
