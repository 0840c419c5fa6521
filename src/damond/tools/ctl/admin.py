"""damondctl status, start, stop, tune and dump: the admin tree, read and written."""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from dbus_fast import DBusError
from dbus_fast.aio import MessageBus

from damond import kdamonds_format as fmt
from damond.tools import client
from damond.tools.ctl.common import (
    EXIT_INPUT,
    EXIT_REFUSED,
    CtlError,
    comm,
    emit_json,
    from_dbus,
    missing_extra,
    read_config,
)
from damond.tools.render import format_size, parse
from damond.tools.stats import WSS_METHOD, weighted_wss
from damond.tools.tree import ContextInfo, contexts, read_objects, run_steps


async def objects_of(bus: MessageBus) -> dict[str, dict[str, dict[str, Any]]]:
    try:
        return await read_objects(bus)
    except DBusError as e:
        raise from_dbus(e, "reading the tree") from None


async def latest_snapshot(bus: MessageBus, context: ContextInfo) -> list[Any] | None:
    """The context's latest snapshot body; None before the first (or when not allowed)."""
    try:
        return await client.get_snapshot(bus, context.path)
    except DBusError as e:
        if e.type in ("org.damond1.Error.NoData", "org.freedesktop.DBus.Error.AccessDenied"):
            return None
        raise from_dbus(e, f"GetSnapshot of {context.path}") from None


# --- status -----------------------------------------------------------------------------


def _us(us: int) -> str:
    for unit, size in (("s", 1_000_000), ("ms", 1000)):
        if us >= size and us % (size // 1000 or 1) == 0:
            return f"{us / size:g} {unit}"
    return f"{us} us"


async def status_rows(bus: MessageBus) -> list[dict[str, Any]]:
    """One entry per context (with its targets) for `status`, as plain data."""
    now_us = time.time() * 1e6
    rows = []
    for ctx in contexts(await objects_of(bus)):
        body = await latest_snapshot(bus, ctx) if ctx.running else None
        snap = parse(body) if body is not None else None
        aggr_us, aggr_source = ctx.effective_aggr_us
        per_target = {t.index: t for t in snap.targets} if snap else {}
        targets = []
        for t in ctx.targets:
            seen = per_target.get(t.index)
            entry: dict[str, Any] = {"index": t.index, "pid": t.pid, "comm": comm(t.pid)}
            if seen is not None and snap is not None:
                entry |= {
                    "regions": len(seen.regions),
                    "monitored_bytes": sum(e - s for s, e, _n, _a in seen.regions),
                    "wss_bytes": round(weighted_wss(seen.regions, snap.max_nr_accesses)),
                }
            targets.append(entry)
        rows.append(
            {
                "kdamond": ctx.kdamond,
                "context": ctx.index,
                "path": ctx.path,
                "state": "on" if ctx.running else "off",
                "pid": ctx.kdamond_pid,
                "operations": ctx.context.get("operations"),
                "access_check": ctx.context.get("access_check"),
                "effective_access_check": ctx.context.get("effective_access_check", ""),
                "backend": ctx.context.get("backend", ""),
                "effective_backend": ctx.context.get("effective_backend", ""),
                "sample_us": ctx.sample_us,
                "aggr_us": ctx.aggr_us,
                "update_us": ctx.update_us,
                "effective_aggr_us": aggr_us,
                "effective_aggr_source": aggr_source,
                "min_nr_regions": ctx.min_nr_regions,
                "max_nr_regions": ctx.max_nr_regions,
                "snapshot": None
                if snap is None
                else {
                    "seq": snap.seq,
                    "age_s": round(max(0.0, now_us - snap.timestamp_us) / 1e6, 3),
                    "max_nr_accesses": snap.max_nr_accesses,
                    # a rate only from a measured interval: asked ones can be missed
                    "samples_per_s": round(snap.max_nr_accesses / (aggr_us / 1e6), 1)
                    if aggr_source != "aggr_us"
                    else None,
                    "regions": snap.nr_regions,
                },
                "targets": targets,
                "schemes": [
                    {
                        "index": s.index,
                        "action": s.action,
                        **s.stats,
                        "effective_bytes": s.effective_bytes,
                    }
                    for s in ctx.schemes
                ],
            }
        )
    return rows


def _scheme_line(scheme: dict[str, Any]) -> str:
    """A scheme's stats as status prints them (the kernel's names, in words)."""
    words = [f"scheme {scheme['index']}: {scheme['action']}"]
    if "nr_tried" in scheme:
        words.append(
            f"tried {scheme['nr_tried']} regions ({format_size(scheme['sz_tried'])}), "
            f"applied to {scheme['nr_applied']} ({format_size(scheme['sz_applied'])}), "
            f"quota exceeded {scheme['qt_exceeds']} times"
        )
    if scheme["effective_bytes"]:
        words.append(f"quota {format_size(scheme['effective_bytes'])}")
    return ", ".join(words)


async def status(bus: MessageBus, args: argparse.Namespace) -> int:
    rows = await status_rows(bus)
    if args.json:
        emit_json({"contexts": rows, "wss_method": WSS_METHOD})
        return 0
    try:
        from rich.console import Console
        from rich.markup import escape
    except ImportError as e:
        raise missing_extra(e) from None
    console = Console(highlight=False, soft_wrap=True)
    if not rows:
        console.print("no kdamonds (start one: damondctl start --pid PID)")
        return 0
    for row in rows:
        on = row["state"] == "on"
        head = f"[bold]kdamond {row['kdamond']}[/bold] " + (
            f"[green]on[/green] (pid {row['pid']})" if on else "off"
        )
        console.print(f"{head}  {row['path'].rsplit('/contexts', 1)[0]}")
        check = row["access_check"]
        if row["effective_access_check"] and row["effective_access_check"] != check:
            check = f"{check} → {row['effective_access_check']}"
        backend = row["effective_backend"] or row["backend"]
        console.print(
            f"  context {row['context']}: {row['operations']}, access check {check}"
            + (f", backend {backend}" if backend else "")
        )
        console.print(
            f"    intervals sample {_us(row['sample_us'])}, aggr {_us(row['aggr_us'])}, "
            f"update {_us(row['update_us'])}; nr_regions {row['min_nr_regions']}.."
            f"{row['max_nr_regions']}"
        )
        snap = row["snapshot"]
        if snap:
            console.print(
                f"    last snapshot #{snap['seq']}, {snap['age_s']:.1f} s ago: "
                f"{snap['regions']} regions, {snap['max_nr_accesses']} samples"
                + (f" ({snap['samples_per_s']:g}/s)" if snap["samples_per_s"] else "")
            )
        elif on:
            console.print("    no snapshot yet (or not allowed to read it: group damond)")
        for t in row["targets"]:
            seen = (
                f"  wss {format_size(t['wss_bytes'])} of {format_size(t['monitored_bytes'])} "
                f"monitored, {t['regions']} regions"
                if "wss_bytes" in t
                else ""
            )
            name = f" ({escape(t['comm'])})" if t["comm"] else ""
            console.print(f"    target {t['index']}: pid {t['pid']}{name}{seen}")
        for scheme in row["schemes"]:
            console.print(f"    {_scheme_line(scheme)}")
    console.print(f"[dim]wss: {WSS_METHOD}[/dim]")
    return 0


# --- start, stop, tune ------------------------------------------------------------------


def _given(args: argparse.Namespace) -> dict[tuple[str, str], Any]:
    """The context attributes the command line sets, in the tree's names."""
    given: dict[tuple[str, str], Any] = {}
    for name, value in (
        ("operations", getattr(args, "ops", None)),
        ("access_check", args.access_check),
        ("backend", args.backend),
    ):
        if value is not None:
            given[("context", name)] = value
    numbers: list[tuple[str, str, str, Any, Callable[[Any, str], int]]] = [
        ("intervals", "sample_us", "--sample", args.sample, fmt.time_us),
        ("intervals", "aggr_us", "--aggr", args.aggr, fmt.time_us),
        ("intervals", "update_us", "--update", args.update, fmt.time_us),
        ("nr_regions", "min", "--min", args.min, fmt.number),
        ("nr_regions", "max", "--max", args.max, fmt.number),
        ("context", "cpu_limit_pct", "--cpu-limit", args.cpu_limit, fmt.number),
    ]
    for group, name, option, value, convert in numbers:
        if value is not None:
            try:
                given[(group, name)] = convert(value, option)
            except fmt.FormatError as e:
                raise CtlError(2, str(e)) from None
    return given


def _regions(specs: Sequence[str]) -> tuple[tuple[int, int], ...]:
    regions = []
    for spec in specs:
        start, sep, end = spec.partition("-")
        try:
            if not sep:
                raise ValueError
            regions.append((int(start, 0), int(end, 0)))
        except ValueError:
            raise CtlError(
                2, f"--region {spec!r}: must be START-END (e.g. 0x1000-0x200000)"
            ) from None
    return tuple(regions)


def spec_from_args(args: argparse.Namespace) -> fmt.KdamondSpec:
    regions = _regions(getattr(args, "region", None) or [])
    pids = args.pid or [-1]
    try:
        context = fmt.context_spec(_given(args), [fmt.TargetSpec(p, regions) for p in pids])
    except ValueError as e:
        raise CtlError(EXIT_REFUSED, str(e)) from None
    return fmt.KdamondSpec(True, (context,))


async def _run(bus: MessageBus, steps: Sequence[fmt.Step], doing: str) -> None:
    try:
        await run_steps(bus, steps)
    except DBusError as e:
        raise from_dbus(e, doing) from None


async def _undo(bus: MessageBus, steps: Sequence[fmt.Step]) -> None:
    """Best effort, after a refusal: never leave half a start running."""
    try:
        await run_steps(bus, steps)
    except DBusError as e:
        print(f"damondctl: undoing failed too: {e.text}", file=sys.stderr)


async def start_kdamond(bus: MessageBus, objects: fmt.TreeObjects, spec: fmt.KdamondSpec) -> int:
    """Set up spec in the first kdamond that is off (or a new one) and turn it on; its
    index. A refused start leaves no kdamond added."""
    count = objects[""]["kdamonds"]["nr"]
    idle = [k for k in range(count) if objects[fmt.kdamond_path(k)]["kdamond"]["state"] != "on"]
    k = idle[0] if idle else count
    steps: list[fmt.Step] = [] if idle else [fmt.kdamonds_nr(count + 1)]
    steps += fmt.kdamond_writes(k, spec, structure=True)
    steps.append(fmt.StateChange(fmt.kdamond_path(k), "on"))
    try:
        await _run(bus, steps, "start")
    except CtlError:
        if not idle:
            await _undo(bus, [fmt.kdamonds_nr(count)])
        raise
    return k


async def start(bus: MessageBus, args: argparse.Namespace) -> int:
    objects = await objects_of(bus)
    if args.config is not None:
        return await _start_config(bus, read_config(args.config), objects, args)
    if not args.pid and (args.ops in (None, "vaddr", "fvaddr")):
        raise CtlError(2, "start needs --pid PID (or --config FILE, or --ops paddr)")
    k = await start_kdamond(bus, objects, spec_from_args(args))
    path = f"{client.ROOT}/{fmt.kdamond_path(k)}"
    if args.json:
        emit_json({"kdamond": path, "index": k})
    else:
        print(path)
    return 0


async def _start_config(
    bus: MessageBus, specs: list[fmt.KdamondSpec], objects: fmt.TreeObjects, args: Any
) -> int:
    running = [c.kdamond_path for c in contexts(objects) if c.running]
    if running:
        raise CtlError(
            EXIT_REFUSED,
            f"{running[0]} is on: start --config sets up the whole tree; stop first "
            "(damondctl stop), or apply the file to what runs with damondctl tune --config",
        )
    steps = fmt.build(specs)
    try:
        await _run(bus, steps, "start --config")
    except CtlError:
        await _undo(bus, [fmt.StateChange(fmt.kdamond_path(k), "off") for k in range(len(specs))])
        raise
    paths = [f"{client.ROOT}/{fmt.kdamond_path(k)}" for k, s in enumerate(specs) if s.on]
    if args.json:
        emit_json({"kdamonds": paths})
    else:
        print("\n".join(paths) if paths else "configured; nothing to turn on")
    return 0


def _chosen(objects: fmt.TreeObjects, asked: Sequence[int] | None, running_only: bool) -> list[int]:
    count = objects[""]["kdamonds"]["nr"]
    for k in asked or []:
        if not 0 <= k < count:
            raise CtlError(EXIT_REFUSED, f"no kdamond {k} (kdamonds nr is {count})")
    if asked:
        return list(asked)
    return [
        k
        for k in range(count)
        if not running_only or objects[fmt.kdamond_path(k)]["kdamond"]["state"] == "on"
    ]


async def stop(bus: MessageBus, args: argparse.Namespace) -> int:
    chosen = _chosen(await objects_of(bus), args.kdamond, running_only=True)
    await _run(bus, [fmt.StateChange(fmt.kdamond_path(k), "off") for k in chosen], "stop")
    paths = [f"{client.ROOT}/{fmt.kdamond_path(k)}" for k in chosen]
    if args.json:
        emit_json({"stopped": paths})
    else:
        print("\n".join(f"{p}: off" for p in paths) if paths else "nothing was on")
    return 0


async def tune(bus: MessageBus, args: argparse.Namespace) -> int:
    objects = await objects_of(bus)
    if args.config is not None:
        steps = fmt.plan(read_config(args.config), objects)
        await _run(bus, steps, "tune --config")
        done = [(s.path, s.state) for s in steps if isinstance(s, fmt.StateChange)]
        if args.json:
            emit_json({"states": [{"kdamond": p, "state": s} for p, s in done]})
        else:
            print("\n".join(f"{client.ROOT}/{p}: {s}" for p, s in done) or "nothing changed")
        return 0
    [k] = _chosen(objects, [args.kdamond], running_only=False)
    given = _given(args)
    structural = [n for g, n in given if g == "context"]
    if structural:
        raise CtlError(
            2, f"tune cannot change {', '.join(structural)}: stop and start again instead"
        )
    was = fmt.parse_tree(objects, only=k)[0]
    if len(was.contexts) != 1:
        raise CtlError(EXIT_REFUSED, f"kdamond {k} has {len(was.contexts)} contexts, not one")
    context = was.contexts[0]
    if args.pid:
        if len(args.pid) != len(context.targets):
            raise CtlError(
                EXIT_REFUSED,
                f"--pid gives {len(args.pid)} pid(s) for {len(context.targets)} target(s): "
                "a running kdamond keeps its number of targets (stop and start to change it)",
            )
        targets = tuple(
            fmt.TargetSpec(p, t.regions) for p, t in zip(args.pid, context.targets, strict=True)
        )
    else:
        targets = context.targets
    values = tuple((g, n, given.get((g, n), v)) for g, n, v in context.values)
    spec = fmt.KdamondSpec(was.on, (fmt.ContextSpec(values, targets, context.schemes),))
    changes: list[fmt.Step] = list(fmt.kdamond_writes(k, spec, structure=False))
    if args.commit:
        changes.append(fmt.StateChange(fmt.kdamond_path(k), "commit"))
    try:
        await _run(bus, changes, "tune")
    except CtlError:
        # a refused commit leaves the new values stored, as the kernel's sysfs does;
        # put the old ones back so that the tree says what runs
        await _undo(bus, fmt.kdamond_writes(k, was, structure=False))
        raise
    path = f"{client.ROOT}/{fmt.kdamond_path(k)}"
    if args.json:
        emit_json({"kdamond": path, "committed": bool(args.commit)})
    elif args.commit:
        print(f"{path}: committed")
    else:
        print(f"{path}: stored; they take effect at commit (damondctl tune {k} --commit)")
    return 0


# --- dump -------------------------------------------------------------------------------


async def dump(bus: MessageBus, args: argparse.Namespace) -> int:
    document = fmt.dump(await objects_of(bus))
    if args.format == "yaml":
        try:
            import yaml
        except ImportError as e:
            raise missing_extra(e) from None
        text = yaml.safe_dump(document, sort_keys=False)
    else:
        text = json.dumps(document, indent=4) + "\n"
    if args.output is None:
        sys.stdout.write(text)
        return 0
    try:
        Path(args.output).write_text(text)
    except OSError as e:
        raise CtlError(EXIT_INPUT, f"{args.output}: cannot write: {e.strerror or e}") from None
    return 0
