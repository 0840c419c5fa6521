"""damondctl watch, wss and record: following a context's Snapshot signals as they come.

wss and record follow the context that monitors a pid; when none does, they
start one for the pid (at the intervals given) and turn it off again when they
end, so "what is the working set of 1234" is one command.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import signal
import sys
import textwrap
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

from dbus_fast.aio import MessageBus

from damond import kdamonds_format as fmt
from damond.tools import client, live, records
from damond.tools.ctl.admin import _run, latest_snapshot, objects_of, spec_from_args, start_kdamond
from damond.tools.ctl.common import EXIT_INPUT, EXIT_REFUSED, CtlError, emit_json
from damond.tools.mappings import Mappings
from damond.tools.render import COLUMNS, Labels, format_size, format_time, parse
from damond.tools.stats import WSS_METHOD, accessed_bytes, weighted_wss
from damond.tools.tree import ContextInfo, contexts, monitoring


def _pick(objects: fmt.TreeObjects, kdamond: int | None) -> ContextInfo:
    """The context of kdamond ``kdamond``, or the first running one."""
    found = contexts(objects)
    if kdamond is not None:
        chosen = [c for c in found if c.kdamond == kdamond]
        if not chosen:
            raise CtlError(EXIT_REFUSED, f"kdamond {kdamond} has no context")
        return chosen[0]
    running = [c for c in found if c.running]
    if not running:
        raise CtlError(EXIT_REFUSED, "no kdamond is on (start one: damondctl start --pid PID)")
    return running[0]


@contextlib.asynccontextmanager
async def following_pid(
    bus: MessageBus, args: argparse.Namespace, pid: int
) -> AsyncIterator[ContextInfo]:
    """The running context monitoring pid; one started for it (and stopped after) if none."""
    objects = await objects_of(bus)
    context = monitoring(objects, pid)
    if context is not None:
        yield context
        return
    args.pid = [pid]
    k = await start_kdamond(bus, objects, spec_from_args(args))
    print(
        f"# monitoring pid {pid} with {client.ROOT}/{fmt.kdamond_path(k)} "
        "(turned off again at the end)",
        file=sys.stderr,
    )
    try:
        yield contexts(await objects_of(bus))[k]
    finally:
        with contextlib.suppress(Exception):
            await _run(bus, [fmt.StateChange(fmt.kdamond_path(k), "off")], "stopping")


class _Stopped(Exception):
    """Ctrl-C during watch."""


class Stop:
    """Ends a following command on SIGINT/SIGTERM or when its time is up."""

    def __init__(self, seconds: float | None) -> None:
        self.event = asyncio.Event()
        loop = asyncio.get_running_loop()
        for signum in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(signum, self.event.set)
        self.timer = loop.call_later(seconds, self.event.set) if seconds else None

    def close(self) -> None:
        loop = asyncio.get_running_loop()
        for signum in (signal.SIGINT, signal.SIGTERM):
            loop.remove_signal_handler(signum)
        if self.timer is not None:
            self.timer.cancel()


def _labels(context: ContextInfo) -> dict[int, Labels]:
    found: dict[int, Labels] = {}
    for t in context.targets:
        mappings = Mappings.read(t.pid) if t.pid > 0 else None
        if mappings is not None:
            found[t.pid] = mappings
    return found


async def watch(bus: MessageBus, args: argparse.Namespace) -> int:
    context = _pick(await objects_of(bus), args.kdamond)
    feed = live.Feed(context.path)
    unsubscribe = await feed.subscribe(bus)
    body = await latest_snapshot(bus, context)
    if body is not None:
        feed.handle(context.path, body)
    check = str(
        context.context.get("effective_access_check") or context.context.get("access_check")
    )
    labels = _labels(context)
    print(textwrap.fill(COLUMNS, 100))
    stop = Stop(args.duration)

    def still_going() -> None:
        if stop.event.is_set():
            raise _Stopped

    try:
        await live.watch(
            feed,
            f"damondctl watch {context.path}",
            args.duration,
            lambda screen, b: screen.picture(b, None, check, labels),
            still_going,
        )
    except _Stopped:
        pass
    finally:
        stop.close()
        unsubscribe()
    return 0


async def _follow(
    bus: MessageBus,
    context: ContextInfo,
    stop: Stop,
    on_snapshot: Callable[[list[Any]], bool],
) -> None:
    """Call on_snapshot(body) for each Snapshot of context until stop, or until it says
    False."""
    queue: asyncio.Queue[list[Any]] = asyncio.Queue()
    unsubscribe = await client.subscribe_snapshots(
        bus, lambda _path, body: queue.put_nowait(body), context.path
    )
    try:
        while not stop.event.is_set():
            getting = asyncio.ensure_future(queue.get())
            stopping = asyncio.ensure_future(stop.event.wait())
            await asyncio.wait([getting, stopping], return_when=asyncio.FIRST_COMPLETED)
            stopping.cancel()
            if not getting.done():
                getting.cancel()
                break
            if not on_snapshot(getting.result()):
                break
    finally:
        unsubscribe()


async def wss(bus: MessageBus, args: argparse.Namespace) -> int:
    stop = Stop(args.duration)
    try:
        async with following_pid(bus, args, args.target_pid) as context:
            if not args.json:
                print(f"# pid {args.target_pid}: {WSS_METHOD}")
                print(f"# {'time':<12} {'seq':>6} {'wss':>11} {'monitored':>11} {'accessed':>11}")
            seen = 0

            def show(body: list[Any]) -> bool:
                nonlocal seen
                snap = parse(body)
                target = next((t for t in snap.targets if t.pid == args.target_pid), None)
                if target is None:
                    return True
                seen += 1
                wss_bytes = weighted_wss(target.regions, snap.max_nr_accesses)
                monitored = sum(e - s for s, e, _n, _a in target.regions)
                accessed = accessed_bytes(target.regions)
                if args.json:
                    emit_json(
                        {
                            "timestamp_us": snap.timestamp_us,
                            "seq": snap.seq,
                            "pid": args.target_pid,
                            "wss_bytes": round(wss_bytes),
                            "monitored_bytes": monitored,
                            "accessed_bytes": accessed,
                        }
                    )
                else:
                    print(
                        f"  {format_time(snap.timestamp_us):<12} {snap.seq:>6} "
                        f"{format_size(wss_bytes):>11} {format_size(monitored):>11} "
                        f"{format_size(accessed):>11}",
                        flush=True,
                    )
                return args.count is None or seen < args.count

            await _follow(bus, context, stop, show)
    finally:
        stop.close()
    return 0


async def record(bus: MessageBus, args: argparse.Namespace) -> int:
    stop = Stop(args.duration)
    try:
        if args.target_pid is not None:
            async with following_pid(bus, args, args.target_pid) as context:
                recorder = await _record(bus, context, stop)
                objects = await objects_of(bus)
        else:
            context = _pick(await objects_of(bus), args.kdamond)
            recorder = await _record(bus, context, stop)
            objects = await objects_of(bus)
    finally:
        stop.close()
    result = recorder.result()
    mappings = [m for t in context.targets if t.pid > 0 and (m := Mappings.read(t.pid))]
    try:
        written = records.write(
            Path(args.output), result, args.format, fmt.dump(objects)["kdamonds"], mappings
        )
    except OSError as e:
        raise CtlError(EXIT_INPUT, f"{args.output}: cannot write: {e.strerror or e}") from None
    count = sum(len(r.snapshots) for r in result)
    summary = {
        "record": str(written[0]),
        "files": [str(p) for p in written],
        "snapshots": count,
        "targets": len(result),
        "seq_gaps": recorder.gaps,
        "format": args.format,
    }
    if args.json:
        emit_json(summary)
    else:
        print(
            f"recorded {count} snapshot(s) of {len(result)} target(s) from {context.path} "
            f"into {written[0]} ({args.format}; with {', '.join(str(p) for p in written[1:])})"
            + (f"; {recorder.gaps} snapshot(s) missed" if recorder.gaps else "")
        )
        print(
            f"  damo reads it: damo report wss --input {written[0]}; "
            f"damondctl report heatmap {written[0]}"
        )
    return 0 if count else EXIT_REFUSED


async def _record(bus: MessageBus, context: ContextInfo, stop: Stop) -> records.Recorder:
    recorder = records.Recorder([context])

    def add(body: list[Any]) -> bool:
        recorder.add(context.path, body)
        return True

    await _follow(bus, context, stop, add)
    return recorder
