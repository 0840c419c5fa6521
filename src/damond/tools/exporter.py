"""damond-exporter: damond's snapshots as Prometheus / OpenMetrics metrics.

A client of the daemon like any other (as a member of group ``damond`` it may
receive Snapshot signals and read the tree through org.damond1.Readers): it
follows every running context's Snapshot signals, keeps what the latest says,
and serves it over HTTP with prometheus_client at ``--listen`` (loopback by
default). The tree (which kdamonds run, scheme stats) it reads with
GetManagedObjects, which the daemon keeps marshalled: at a scrape when the
last read is older than REFRESH_MIN_PERIOD_S, and when a Snapshot or the
daemon's name says it changed. Not from PropertiesChanged: only root receives
those, and the exporter runs as a member of ``damond``.

Metrics (labels kdamond, context; per target also target, pid, comm):
``damond_wss_bytes`` (weighted estimate, see damond.tools.stats),
``damond_monitored_bytes``, ``damond_regions``, ``damond_idle_time_seconds``
by ``quantile`` of the bytes, ``damond_aggregation_interval_seconds`` and
``damond_sample_rate_hertz`` (measured from the snapshots' seq and timestamps),
``damond_snapshots_total``, ``damond_snapshot_seq_gaps_total`` (snapshots the
bus dropped), ``damond_last_snapshot_timestamp_seconds``,
``damond_kdamond_running``, ``damond_up``; and, where the daemon has schemes,
``damond_scheme_*_total`` from each scheme's org.damond1.SchemeStats.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import signal
import sys
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import TimeoutError as FutureTimeout
from dataclasses import dataclass, field
from typing import Any

from dbus_fast import DBusError, Message, MessageType
from dbus_fast.aio import MessageBus

from damond.tools import client
from damond.tools.ctl.common import comm
from damond.tools.render import SnapshotView, parse
from damond.tools.stats import aggregation_seconds, idle_percentiles, weighted_wss
from damond.tools.tree import ContextInfo, contexts, from_managed

log = logging.getLogger("damond-exporter")

DEFAULT_LISTEN = "127.0.0.1:9433"
QUANTILES = (0.0, 25.0, 50.0, 75.0, 90.0, 99.0, 100.0)
REFRESH_MIN_PERIOD_S = 1.0
"""The tree is read again at most this often (the daemon announces scheme stats at
most once a second too)."""
SCRAPE_WAIT_S = 5.0
"""How long a scrape waits for the tree to be read again; then it gets the last one."""
OWNER_RULE = (
    f"type='signal',sender='org.freedesktop.DBus',member='NameOwnerChanged',"
    f"arg0='{client.BUS_NAME}'"
)

SCHEME_STATS = {
    # property of org.damond1.SchemeStats: (metric, help)
    "nr_tried": ("damond_scheme_tried_regions", "regions a scheme was tried on"),
    "sz_tried": ("damond_scheme_tried_bytes", "bytes of the regions a scheme was tried on"),
    "nr_applied": ("damond_scheme_applied_regions", "regions a scheme's action was applied to"),
    "sz_applied": ("damond_scheme_applied_bytes", "bytes a scheme's action was applied to"),
    "qt_exceeds": ("damond_scheme_quota_exceeds", "times a scheme's quota was exceeded"),
}
"""Scheme statistics, one counter family each, labelled kdamond, context, scheme, action:
a new statistic of the daemon is one line here."""


@dataclass
class ContextState:
    """What the snapshots of one context said."""

    info: ContextInfo
    latest: SnapshotView | None = None
    previous: tuple[int, int] | None = None
    aggregation_s: float | None = None
    snapshots: int = 0
    gaps: int = 0
    comms: dict[int, str] = field(default_factory=dict)

    def add(self, snap: SnapshotView) -> None:
        current = (snap.seq, snap.timestamp_us)
        if self.previous is not None and snap.seq > self.previous[0] + 1:
            self.gaps += snap.seq - self.previous[0] - 1
        measured = aggregation_seconds(self.previous, current)
        if measured is not None:
            self.aggregation_s = measured
        self.previous = current
        self.latest = snap
        self.snapshots += 1
        for target in snap.targets:
            if target.pid > 0 and target.pid not in self.comms:
                self.comms[target.pid] = comm(target.pid)

    @property
    def aggr_us(self) -> float:
        """The aggregation interval that turns ages into time: measured, else the
        daemon's effective_aggr_us when it has one, else aggr_us."""
        if self.aggregation_s is not None:
            return self.aggregation_s * 1e6
        return self.info.effective_aggr_us[0]


class State:
    """Everything the exporter knows, shared by the event loop and the HTTP thread."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.contexts: dict[str, ContextState] = {}
        self.kdamonds: dict[int, bool] = {}
        self.schemes: list[tuple[dict[str, str], dict[str, int]]] = []
        self.up = False

    def snapshot(self, path: str, body: list[Any]) -> bool:
        """Take one Snapshot; False when its context is unknown (the tree must be read)."""
        snap = parse(body)
        with self.lock:
            state = self.contexts.get(path)
            if state is None:
                return False
            state.add(snap)
        return True

    def tree(self, raw: dict[str, dict[str, dict[str, Any]]] | None) -> None:
        """The daemon's tree (client.managed_objects), or None when it is not there."""
        with self.lock:
            if raw is None:
                self.up = False
                self.contexts.clear()
                self.kdamonds.clear()
                self.schemes = []
                return
            found = {c.path: c for c in contexts(from_managed(raw))}
            self.kdamonds = {c.kdamond: c.running for c in found.values()}
            for path in list(self.contexts):
                if path not in found or not found[path].running:
                    del self.contexts[path]  # stale numbers of a stopped context mislead
            for path, info in found.items():
                if info.running:
                    state = self.contexts.setdefault(path, ContextState(info))
                    state.info = info
            self.schemes = [
                (
                    {
                        "kdamond": str(c.kdamond),
                        "context": str(c.index),
                        "scheme": str(s.index),
                        "action": s.action,
                    },
                    s.stats,
                )
                for c in found.values()
                for s in c.schemes
            ]
            self.up = True


class Collector:
    """prometheus_client's custom collector over State: read at each scrape, after
    fresh() (the tree read again when it is old)."""

    def __init__(self, state: State, fresh: Callable[[], None] = lambda: None) -> None:
        self.state = state
        self.fresh = fresh

    def collect(self) -> Iterator[Any]:
        from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

        self.fresh()

        ctx_labels = ["kdamond", "context"]
        tgt_labels = [*ctx_labels, "target", "pid", "comm"]
        up = GaugeMetricFamily("damond_up", "1 when damond's tree could be read")
        running = GaugeMetricFamily(
            "damond_kdamond_running", "1 while a kdamond is on", labels=["kdamond"]
        )
        snapshots = CounterMetricFamily("damond_snapshots", "snapshots received", labels=ctx_labels)
        gaps = CounterMetricFamily(
            "damond_snapshot_seq_gaps",
            "snapshots published but not received (gaps in seq)",
            labels=ctx_labels,
        )
        last = GaugeMetricFamily(
            "damond_last_snapshot_timestamp_seconds",
            "end of the latest aggregation (CLOCK_REALTIME)",
            labels=ctx_labels,
        )
        aggregation = GaugeMetricFamily(
            "damond_aggregation_interval_seconds",
            "the aggregation interval as measured from the snapshots (else as asked)",
            labels=ctx_labels,
        )
        rate = GaugeMetricFamily(
            "damond_sample_rate_hertz",
            "samples per second the latest aggregation really had",
            labels=ctx_labels,
        )
        asked = GaugeMetricFamily(
            "damond_sample_interval_seconds",
            "the sampling interval asked (sample_us)",
            labels=ctx_labels,
        )
        wss = GaugeMetricFamily(
            "damond_wss_bytes",
            "working set size: sum of region size x nr_accesses / max_nr_accesses",
            labels=tgt_labels,
        )
        monitored = GaugeMetricFamily(
            "damond_monitored_bytes", "bytes in the target's regions", labels=tgt_labels
        )
        regions = GaugeMetricFamily("damond_regions", "regions of the target", labels=tgt_labels)
        idle = GaugeMetricFamily(
            "damond_idle_time_seconds",
            "how long memory has been idle, by quantile of the target's bytes: (age + 1) x "
            "aggregation interval for regions not accessed in the last aggregation, else 0",
            labels=[*tgt_labels, "quantile"],
        )
        with self.state.lock:
            up.add_metric([], 1.0 if self.state.up else 0.0)
            for k, on in sorted(self.state.kdamonds.items()):
                running.add_metric([str(k)], 1.0 if on else 0.0)
            for state in self.state.contexts.values():
                self._context(state, snapshots, gaps, last, aggregation, rate, asked)
                self._targets(state, wss, monitored, regions, idle)
            schemes = list(self.state.schemes)
        yield from (up, running, snapshots, gaps, last, aggregation, rate, asked)
        yield from (wss, monitored, regions, idle)
        yield from _scheme_families(schemes)

    @staticmethod
    def _context(state: ContextState, *families: Any) -> None:
        snapshots, gaps, last, aggregation, rate, asked = families
        labels = [str(state.info.kdamond), str(state.info.index)]
        snapshots.add_metric(labels, state.snapshots)
        gaps.add_metric(labels, state.gaps)
        asked.add_metric(labels, state.info.sample_us / 1e6)
        snap = state.latest
        if snap is None:
            return
        last.add_metric(labels, snap.timestamp_us / 1e6)
        aggregation.add_metric(labels, state.aggr_us / 1e6)
        rate.add_metric(labels, snap.max_nr_accesses / (state.aggr_us / 1e6))

    @staticmethod
    def _targets(state: ContextState, *families: Any) -> None:
        wss, monitored, regions, idle = families
        snap = state.latest
        if snap is None:
            return
        for target in snap.targets:
            labels = [
                str(state.info.kdamond),
                str(state.info.index),
                str(target.index),
                str(target.pid),
                state.comms.get(target.pid, ""),
            ]
            wss.add_metric(labels, weighted_wss(target.regions, snap.max_nr_accesses))
            monitored.add_metric(labels, sum(e - s for s, e, _n, _a in target.regions))
            regions.add_metric(labels, len(target.regions))
            for q, seconds in idle_percentiles(
                target.regions, round(state.aggr_us), QUANTILES
            ).items():
                idle.add_metric([*labels, f"{q / 100:g}"], seconds)


def _scheme_families(schemes: Sequence[tuple[dict[str, str], dict[str, int]]]) -> Iterator[Any]:
    from prometheus_client.core import CounterMetricFamily

    if not schemes:
        return
    labels = ["kdamond", "context", "scheme", "action"]
    for prop, (name, text) in SCHEME_STATS.items():
        family = CounterMetricFamily(name, text, labels=labels)
        for scheme_labels, values in schemes:
            if prop in values:
                family.add_metric([scheme_labels[k] for k in labels], values[prop])
        yield family


class Follower:
    """Keeps State up to date from the bus: Snapshot signals, and the tree when it may
    have changed (a scrape after REFRESH_MIN_PERIOD_S, a new context's Snapshot, the
    daemon's name changing owner)."""

    def __init__(self, bus: MessageBus, state: State) -> None:
        self.bus = bus
        self.state = state
        self._refresh: asyncio.Task[None] | None = None
        self._last_refresh = 0.0

    async def start(self) -> None:
        await client.subscribe_snapshots(self.bus, self._snapshot)
        await client.add_match(self.bus, OWNER_RULE)
        self.bus.add_message_handler(self._changed)
        await self.refresh()

    def _snapshot(self, path: str, body: list[Any]) -> None:
        if not self.state.snapshot(path, body):
            self.schedule()

    def _changed(self, msg: Message) -> None:
        if msg.message_type is MessageType.SIGNAL and msg.member == "NameOwnerChanged":
            self.schedule()

    def schedule(self) -> None:
        """Read the tree again soon (at most once per REFRESH_MIN_PERIOD_S)."""
        if self._refresh is not None and not self._refresh.done():
            return
        delay = max(0.0, self._last_refresh + REFRESH_MIN_PERIOD_S - time.monotonic())
        self._refresh = asyncio.ensure_future(self._later(delay))

    async def _later(self, delay: float) -> None:
        await asyncio.sleep(delay)
        await self.refresh()

    async def fresh(self) -> None:
        """The tree read again unless it was within REFRESH_MIN_PERIOD_S (a scrape)."""
        if self._refresh is not None and not self._refresh.done():
            await asyncio.shield(self._refresh)  # a read is under way: share it
        elif time.monotonic() - self._last_refresh >= REFRESH_MIN_PERIOD_S:
            self._refresh = asyncio.ensure_future(self.refresh())
            await asyncio.shield(self._refresh)

    def fresh_from_thread(self, loop: asyncio.AbstractEventLoop) -> None:
        """fresh(), from the HTTP server's thread: wait up to SCRAPE_WAIT_S for it."""
        future = asyncio.run_coroutine_threadsafe(self.fresh(), loop)
        try:
            future.result(timeout=SCRAPE_WAIT_S)
        except FutureTimeout:
            future.cancel()
            log.warning("the tree took over %g s to read: this scrape has the last", SCRAPE_WAIT_S)

    async def refresh(self) -> None:
        self._last_refresh = time.monotonic()
        try:
            raw = await client.managed_objects(self.bus)
        except DBusError as e:
            log.warning("cannot read damond's tree: %s: %s", e.type, e.text)
            raw = None
        self.state.tree(raw)


def _listen(spec: str) -> tuple[str, int]:
    host, sep, port = spec.rpartition(":")
    if not sep or not port.isdigit():
        raise SystemExit(f"damond-exporter: --listen {spec!r}: must be HOST:PORT")
    return host.strip("[]") or "127.0.0.1", int(port)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="damond-exporter",
        description="Serve damond's snapshots as Prometheus / OpenMetrics metrics "
        "(working set size, idle-time quantiles, regions, sample rate, seq gaps).",
        epilog="examples:\n"
        "  damond-exporter                                 # system bus, 127.0.0.1:9433\n"
        "  damond-exporter --listen [::1]:9433\n"
        "  damond-exporter --bus unix:path=/tmp/b/bus --listen 127.0.0.1:9500\n"
        "  curl -s localhost:9433/metrics | grep damond_wss_bytes\n\n"
        "It needs to receive Snapshot signals: run it as root or in group damond "
        "(its systemd unit does). Exits 1 when the bus is unreachable or the address "
        "cannot be bound, or when the bus connection is lost.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--bus", default="system", metavar="system|ADDRESS")
    parser.add_argument(
        "--listen",
        default=DEFAULT_LISTEN,
        metavar="HOST:PORT",
        help=f"where to serve /metrics (default {DEFAULT_LISTEN})",
    )
    parser.add_argument(
        "--log-level", default="info", choices=["debug", "info", "warning", "error"]
    )
    return parser.parse_args(argv)


async def serve(args: argparse.Namespace) -> int:
    from prometheus_client import CollectorRegistry, start_http_server

    host, port = _listen(args.listen)
    state = State()
    try:
        bus = await client.connect(None if args.bus == "system" else args.bus)
    except Exception as e:  # any failure to connect ends the exporter with one line
        print(f"damond-exporter: cannot connect to the {args.bus} bus: {e}", file=sys.stderr)
        return 1
    follower = Follower(bus, state)
    await follower.start()
    loop = asyncio.get_running_loop()
    registry = CollectorRegistry()
    registry.register(Collector(state, lambda: follower.fresh_from_thread(loop)))
    try:
        server, thread = start_http_server(port, addr=host, registry=registry)
    except OSError as e:
        print(f"damond-exporter: cannot listen on {args.listen}: {e}", file=sys.stderr)
        return 1
    log.info("serving /metrics on %s", args.listen)
    stop = asyncio.Event()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    lost = asyncio.ensure_future(bus.wait_for_disconnect())
    stopped = asyncio.ensure_future(stop.wait())
    await asyncio.wait([lost, stopped], return_when=asyncio.FIRST_COMPLETED)
    server.shutdown()
    thread.join(timeout=5)
    if lost.done():
        print("damond-exporter: lost the connection to the bus", file=sys.stderr)
        return 1
    lost.cancel()
    bus.disconnect()
    return 0


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(), format="damond-exporter: %(message)s")
    try:
        return asyncio.run(serve(args))
    except ImportError as e:
        print(
            f"damond-exporter: needs damond's tools extra (pip install 'damond[tools]'): {e}",
            file=sys.stderr,
        )
        return 1
    except KeyboardInterrupt:
        return 0


if __name__ == "__main__":
    sys.exit(main())
