"""damondctl: damond for people and scripts (status, start, stop, tune, watch, wss, record,
report), over D-Bus, as busctl would do it, with the daemon's own rules and messages."""

from __future__ import annotations

import argparse
import asyncio
import sys
import textwrap
from collections.abc import Awaitable, Callable
from pathlib import Path

from dbus_fast import DBusError
from dbus_fast.aio import MessageBus

from damond.tools.ctl import admin, follow, report
from damond.tools.ctl.common import EXIT_CODES, CtlError, connected, default_bus, from_dbus
from damond.tools.records import FORMATS, JSON_COMPRESSED

EPILOG = """\
examples:
  python -m damond.tools.workload &              # a process with a hot and a cold buffer
  damondctl start --pid $!                       # monitor it; prints /org/damond1/kdamonds/0
  damondctl status                               # what runs: regions, wss, schemes' stats
  damondctl watch                                # the live picture (Ctrl-C to stop)
  damondctl wss $! --count 10                    # working set size, one line per aggregation
  damondctl record -o rec.data --duration 10     # a record damo's reports read too
  damondctl report heatmap rec.data --png heat.png
  damondctl tune 0 --aggr 200ms --commit         # new intervals, without stopping
  damondctl dump > kdamonds.json                 # the tree in damo's kdamonds format
  damondctl start --config kdamonds.json         # ... and back (JSON or YAML, damo's files too,
                                                 # DAMOS schemes included)
  damondctl stop
  damondctl --bus unix:path=/tmp/b/bus status    # a private bus (or DAMOND_BUS=...)

times take damo's forms ("5ms", "1 s", "1m 30s") or plain microseconds.

exit status:
""" + "\n".join(f"  {code}  {what}" for code, what in EXIT_CODES.items())

Command = Callable[[MessageBus, argparse.Namespace], Awaitable[int]]


def _monitoring_options(parser: argparse.ArgumentParser, with_ops: bool) -> None:
    group = parser.add_argument_group("monitoring attributes")
    if with_ops:
        group.add_argument(
            "--ops", choices=["vaddr", "fvaddr", "paddr"], help="operations set (default vaddr)"
        )
    group.add_argument("--sample", metavar="TIME", help="sampling interval (default 5ms)")
    group.add_argument("--aggr", metavar="TIME", help="aggregation interval (default 100ms)")
    group.add_argument("--update", metavar="TIME", help="update interval (default 60s)")
    group.add_argument("--min", metavar="N", help="nr_regions min (default 10)")
    group.add_argument("--max", metavar="N", help="nr_regions max (default 1000)")
    group.add_argument(
        "--access-check",
        dest="access_check",
        metavar="NAME",
        help="auto (default), page_idle, clear_refs, …: see damondctl status",
    )
    group.add_argument(
        "--backend", metavar="NAME", help="auto, user or kernel, where the daemon offers a choice"
    )
    group.add_argument(
        "--cpu-limit",
        dest="cpu_limit",
        metavar="PCT",
        help="most of one CPU the sampling may use, in percent (default 10; 0: no limit)",
    )


def _sub(
    subs: argparse._SubParsersAction,
    name: str,
    run: Command | Callable[..., int] | None,
    summary: str,
    examples: str = "",
) -> argparse.ArgumentParser:
    parser = subs.add_parser(
        name,
        help=summary,
        description=summary,
        epilog=f"examples:\n{textwrap.indent(examples, '  ')}" if examples else None,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.set_defaults(run=run)
    return parser


def parser() -> argparse.ArgumentParser:
    top = argparse.ArgumentParser(
        prog="damondctl",
        description="Configure damond and read what it finds, over D-Bus. Configuration "
        "files are damo's kdamonds format (JSON or YAML); records are damo's record format.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    top.add_argument(
        "--bus",
        default=default_bus(),
        metavar="system|session|ADDRESS",
        help="the bus damond serves (default: $DAMOND_BUS, else system)",
    )
    top.add_argument("--json", action="store_true", help="machine-readable output")
    subs = top.add_subparsers(dest="command", metavar="COMMAND", required=True)

    _sub(
        subs,
        "status",
        admin.status,
        "every kdamond, context and target, and what it sees",
        "damondctl status\ndamondctl --json status | jq '.contexts[0].targets'",
    )

    p = _sub(
        subs,
        "start",
        admin.start,
        "set up a kdamond and turn it on (prints its object path)",
        "damondctl start --pid 1234\n"
        "damondctl start --pid 1234 5678 --sample 1ms --aggr 50ms --min 20\n"
        "damondctl start --config kdamonds.json   # damo's kdamonds format",
    )
    p.add_argument("--pid", type=int, nargs="+", help="processes to monitor (one target each)")
    p.add_argument(
        "--region",
        action="append",
        metavar="START-END",
        help="a fixed region of every target (fvaddr, paddr); repeatable",
    )
    p.add_argument(
        "--config",
        type=Path,
        metavar="FILE",
        help="damo's kdamonds JSON/YAML: set up the whole tree as it says, schemes included",
    )
    _monitoring_options(p, with_ops=True)

    p = _sub(
        subs,
        "stop",
        admin.stop,
        "turn kdamonds off (all that are on by default)",
        "damondctl stop\ndamondctl stop 0 2",
    )
    p.add_argument("kdamond", type=int, nargs="*", help="kdamond indices")

    p = _sub(
        subs,
        "tune",
        admin.tune,
        "change a kdamond's attributes; --commit applies them while it runs",
        "damondctl tune 0 --aggr 200ms --max 500 --commit\n"
        "damondctl tune 0 --pid 4321 --commit      # same number of targets\n"
        "damondctl tune --config kdamonds.json     # commit where the shape allows",
    )
    p.add_argument("kdamond", type=int, nargs="?", default=0, help="kdamond index (default 0)")
    p.add_argument("--pid", type=int, nargs="+", help="new pids of the targets, in order")
    p.add_argument("--commit", action="store_true", help="apply now (state commit)")
    p.add_argument(
        "--config",
        type=Path,
        metavar="FILE",
        help="move the whole tree to what FILE says: running kdamonds whose shape "
        "is unchanged are committed, others restarted",
    )
    _monitoring_options(p, with_ops=False)

    p = _sub(
        subs,
        "dump",
        admin.dump,
        "the tree in damo's kdamonds format",
        "damondctl dump > /etc/damond/kdamonds.json   # what the daemon applies at start\n"
        "damondctl dump --format yaml",
    )
    p.add_argument("--format", choices=["json", "yaml"], default="json")
    p.add_argument("-o", "--output", metavar="FILE", help="write to FILE instead of stdout")

    p = _sub(
        subs,
        "watch",
        follow.watch,
        "the live picture of a running context",
        "damondctl watch            # the first kdamond that is on\n"
        "damondctl watch 1 --duration 30",
    )
    p.add_argument("kdamond", type=int, nargs="?", help="kdamond index")
    p.add_argument("--duration", type=float, metavar="S", help="stop after S seconds")

    p = _sub(
        subs,
        "wss",
        follow.wss,
        "working set size of a process, one line per aggregation (starts monitoring "
        "it for the while if nothing does)",
        "damondctl wss 1234\ndamondctl --json wss 1234 --count 50 --aggr 1s",
    )
    p.add_argument("target_pid", type=int, metavar="PID")
    p.add_argument("--count", type=int, metavar="N", help="stop after N numbers")
    p.add_argument("--duration", type=float, metavar="S", help="stop after S seconds")
    _monitoring_options(p, with_ops=False)

    p = _sub(
        subs,
        "record",
        follow.record,
        "record a context's snapshots into a file damo's reports read",
        "damondctl record -o rec.data --duration 30           # the first running kdamond\n"
        "damondctl record -o rec.data --pid 1234 --duration 10\n"
        "damo report wss --input rec.data",
    )
    p.add_argument("-o", "--output", required=True, metavar="FILE")
    p.add_argument(
        "--duration",
        type=float,
        default=10.0,
        metavar="S",
        help="seconds to record (default 10; Ctrl-C ends earlier)",
    )
    p.add_argument("--kdamond", type=int, help="the kdamond to record (default: first on)")
    p.add_argument(
        "--pid",
        dest="target_pid",
        type=int,
        help="record the context monitoring PID (one is started if none)",
    )
    p.add_argument(
        "--format",
        choices=FORMATS,
        default=JSON_COMPRESSED,
        help=f"damo's record file type (default {JSON_COMPRESSED}, as damo's)",
    )
    _monitoring_options(p, with_ops=False)

    p = _sub(
        subs,
        "report",
        None,
        "pictures and tables of a record (damondctl's or damo's)",
        "damondctl report heatmap rec.data                   # in the terminal\n"
        "damondctl report heatmap rec.data --png heat.png\n"
        "damondctl report wss rec.data --png wss.png\n"
        "damondctl report access rec.data                    # the last snapshot",
    )
    kinds = p.add_subparsers(dest="kind", metavar="KIND", required=True)
    for kind, run, what in (
        ("heatmap", report.heatmap, "address x time, access frequency as colour"),
        ("wss", report.wss, "working set size over time (weighted estimate)"),
        ("access", report.access, "one snapshot's regions: frequency, cold for how long, mapping"),
    ):
        k = kinds.add_parser(kind, help=what, description=what)
        k.set_defaults(run=run)
        k.add_argument("file", metavar="FILE")
        k.add_argument("--target", type=int, help="only this target index")
        if kind == "access":
            k.add_argument("--snapshot", type=int, help="snapshot index (default: the last)")
            continue
        k.add_argument("--png", metavar="OUT", help="draw a PNG to OUT instead")
        k.add_argument("--width", type=int, default=1200, help="PNG width in pixels")
        k.add_argument("--height", type=int, default=800, help="PNG height in pixels")
        if kind == "heatmap":
            k.add_argument("--time-bins", dest="time_bins", type=int, metavar="N")
            k.add_argument("--address-bins", dest="address_bins", type=int, metavar="N")
    return top


async def _on_bus(run: Command, args: argparse.Namespace) -> int:
    async with connected(args.bus) as bus:
        try:
            return await run(bus, args)
        except DBusError as e:
            raise from_dbus(e) from None


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    try:
        if args.command == "report":
            return int(args.run(args))
        return asyncio.run(_on_bus(args.run, args))
    except CtlError as e:
        print(f"damondctl: {e.message}", file=sys.stderr)
        return e.code
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:
        return 0


if __name__ == "__main__":
    sys.exit(main())
