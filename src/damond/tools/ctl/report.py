"""damondctl report heatmap|wss|access FILE: pictures and tables of a record.

Reads damondctl's records and damo's own (json, json_compressed). Terminal
output by default; ``--png OUT`` draws the picture with matplotlib instead.
"""

from __future__ import annotations

import argparse
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

from damond.tools import records
from damond.tools.ctl.common import EXIT_INPUT, EXIT_REFUSED, CtlError, emit_json, missing_extra
from damond.tools.heatmap import Heatmap, terminal_lines
from damond.tools.records import SnapshotRecord, TargetRecord
from damond.tools.render import format_size
from damond.tools.stats import (
    IDLE_METHOD,
    WSS_METHOD,
    idle_percentiles,
    idle_seconds,
    weighted_wss,
)


def _load(args: argparse.Namespace) -> list[TargetRecord]:
    try:
        found = [r for r in records.read(Path(args.file)) if r.snapshots]
    except records.RecordError as e:
        raise CtlError(EXIT_INPUT, str(e)) from None
    if args.target is not None:
        found = [r for r in found if r.target == args.target]
    if not found:
        raise CtlError(
            EXIT_INPUT,
            f"{args.file}: no snapshots"
            + (f" of target {args.target}" if args.target is not None else ""),
        )
    return found


def _title(record: TargetRecord) -> str:
    return f"{record.name} ({len(record.snapshots)} snapshots)"


def _output(args: argparse.Namespace, record: TargetRecord, many: bool) -> Path:
    """The PNG path for one target: OUT as given, or OUT-target-N.png when there are many."""
    path = Path(args.png)
    if not many:
        return path
    return path.with_name(f"{path.stem}-target-{record.target}{path.suffix or '.png'}")


def _pngs(
    args: argparse.Namespace,
    found: list[TargetRecord],
    draw: Callable[[Any, TargetRecord, Path], None],
) -> int:
    """Draw one PNG per target with draw(plots module, record, path); print the paths."""
    try:
        from damond.tools import plots
    except ImportError as e:
        raise missing_extra(e) from None
    written = []
    for record in found:
        path = _output(args, record, len(found) > 1)
        try:
            draw(plots, record, path)
        except OSError as e:
            raise CtlError(EXIT_REFUSED, f"{path}: {e}") from None
        written.append(str(path))
    if args.json:
        emit_json({"png": written})
    else:
        print("\n".join(written))
    return 0


def heatmap(args: argparse.Namespace) -> int:
    found = _load(args)
    if args.png:
        return _pngs(
            args,
            found,
            lambda plots, record, path: plots.heatmap_png(
                Heatmap.of(record, args.address_bins or 256, args.time_bins or 512),
                _title(record), path, args.width, args.height,
            ),
        )  # fmt: skip
    try:
        from rich.console import Console
    except ImportError as e:
        raise missing_extra(e) from None
    console = Console(highlight=False)
    width = args.address_bins or max(20, shutil.get_terminal_size((100, 40)).columns - 2)
    for record in found:
        picture = Heatmap.of(record, width, args.time_bins or min(30, len(record.snapshots)))
        if args.json:
            emit_json(
                {
                    "target": record.target,
                    "pid": record.pid,
                    "seconds": picture.seconds,
                    "spans": [
                        [int(s), int(e)]
                        for s, e in zip(picture.spans.starts, picture.spans.ends, strict=True)
                    ],
                    "values": [
                        [None if v != v else round(float(v), 4) for v in row]
                        for row in picture.values.T
                    ],
                }
            )
            continue
        console.print(f"{_title(record)}: {picture.seconds:.1f} s")
        console.print(
            f"time runs down ({picture.seconds / picture.values.shape[1]:.2f} s a line), "
            f"addresses across ({format_size(picture.spans.total)} monitored from "
            f"{int(picture.spans.starts[0]):#x}, gaps left out); 0-9: access frequency"
        )
        for line in terminal_lines(picture, console.is_terminal and not console.no_color):
            console.print(line)
    return 0


def _wss_series(record: TargetRecord) -> tuple[list[float], list[float]]:
    origin = record.snapshots[0].start_ns
    times = [(s.end_ns - origin) / 1e9 for s in record.snapshots]
    return times, [weighted_wss(s.regions, s.max_nr_accesses) for s in record.snapshots]


def wss(args: argparse.Namespace) -> int:
    found = _load(args)
    if args.png:
        return _pngs(
            args,
            found,
            lambda plots, record, path: plots.wss_png(
                *_wss_series(record), f"working set size: {_title(record)}", path,
                args.width, args.height,
            ),
        )  # fmt: skip
    for record in found:
        times, sizes = _wss_series(record)
        if args.json:
            emit_json(
                {
                    "target": record.target,
                    "pid": record.pid,
                    "method": WSS_METHOD,
                    "seconds": times,
                    "wss_bytes": [round(x) for x in sizes],
                }
            )
            continue
        ordered = sorted(sizes)
        print(f"# {_title(record)}")
        print(f"# wss: {WSS_METHOD}")
        print("# percentile of snapshots: wss")
        for p in (0, 25, 50, 75, 90, 100):
            value = ordered[min(len(ordered) - 1, int(p / 100 * len(ordered)))]
            print(f"  {p:>3}  {format_size(value):>11}")
        print(f"  avg  {format_size(sum(sizes) / len(sizes)):>11}")
    return 0


def _aggregation_us(record: TargetRecord, snap: SnapshotRecord) -> tuple[int, str]:
    """The aggregation a snapshot really had (its own start..end), or the asked one."""
    measured = (snap.end_ns - snap.start_ns) // 1000
    if measured > 0:
        return measured, "measured (the snapshot's start and end)"
    return record.aggr_us, "aggr_us (asked)"


def access(args: argparse.Namespace) -> int:
    found = _load(args)
    names = records.read_mappings(Path(args.file))
    for record in found:
        index = args.snapshot if args.snapshot is not None else len(record.snapshots) - 1
        if not -len(record.snapshots) <= index < len(record.snapshots):
            raise CtlError(
                EXIT_INPUT, f"{record.name} has {len(record.snapshots)} snapshots, no {index}"
            )
        snap = record.snapshots[index]
        aggr_us, source = _aggregation_us(record, snap)
        mappings = names.get(record.pid)
        rows: list[dict[str, Any]] = [
            {
                "start": s,
                "end": e,
                "nr_accesses": n,
                "age": a,
                "access_pct": round(100 * min(1.0, n / max(1, snap.max_nr_accesses)), 1),
                "cold_s": round(idle_seconds(n, a, aggr_us), 3),
                "mapping": mappings.name(s, e) if mappings else "",
            }
            for s, e, n, a in snap.regions
        ]
        percentiles = idle_percentiles(snap.regions, aggr_us)
        summary: dict[str, Any] = {
            "target": record.target,
            "pid": record.pid,
            "snapshot": index,
            "max_nr_accesses": snap.max_nr_accesses,
            "aggregation_us": aggr_us,
            "aggregation_source": source,
            "wss_bytes": round(weighted_wss(snap.regions, snap.max_nr_accesses)),
            "idle_percentiles_s": {str(p): v for p, v in percentiles.items()},
            "regions": rows,
        }
        if args.json:
            emit_json(summary)
            continue
        print(
            f"# {_title(record)}, snapshot {index}: {len(rows)} regions, "
            f"max_nr_accesses {snap.max_nr_accesses}, aggregation {aggr_us / 1000:g} ms "
            f"({source})"
        )
        print(f"# cold for: {IDLE_METHOD}")
        print(f"# {'range':<29} {'size':>10} {'access':>7} {'cold for':>10}  mapping")
        for row in rows:
            span = f"{row['start']:x}-{row['end']:x}"
            print(
                f"  {span:<29} {format_size(row['end'] - row['start']):>10} "
                f"{row['access_pct']:>6.1f}% {row['cold_s']:>9.1f}s  {row['mapping']}"
            )
        print(f"# wss {format_size(summary['wss_bytes'])} ({WSS_METHOD})")
        print(
            "# idle time by percentile of bytes: "
            + ", ".join(f"p{p:g} {v:.1f} s" for p, v in percentiles.items())
        )
    return 0
