"""Soak: many kdamonds, many subscribers, for minutes; memory, delivery and latency held.

`python -m bench.soak [--minutes N] [--json PATH]` (not part of `make test`;
tests/test_load.py runs a 20-second version of the same code).

Everything is real: a private dbus-daemon, the daemon from this tree, one
`sleep` process per kdamond as its target (vaddr, the host's access check),
and subscribers in a separate process that read the bus with a small raw
D-Bus reader (standard library; the body is not decoded past `seq`, so 16
fast readers keep up where 16 decoding clients could not on 2 cores).

What is measured:
- the daemon's RSS every `rss_every_s` seconds (flat after warm-up);
- per fast subscriber and context, gaps in `seq` (there must be none: a fast
  reader gets every snapshot); slow subscribers stop reading for 2 s out of
  every 3 and then catch up, so the bus holds megabytes for each of them
  (their gaps are counted too; a subscriber that stops reading for good is
  a different matter: docs/reliability.md, "Limits");
- `Get` round trips from a client subscribed to nothing, every `get_every_s`.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import select
import selectors
import statistics
import struct
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import psutil

from damond.tools.client import ROOT, connect, get_property, start_kdamonds
from damond.tools.privatebus import spawn_daemon, start_private_bus, wait_for_name
from tests import rawbus  # the stdlib-only client the policy and flood tests use

SLOW_PAUSE_S = 2.0
"""A slow subscriber reads nothing for this long, then catches up at once (a GC
pause, a busy agent): it lags seconds behind, but keeps up on average."""
SLOW_CYCLE_S = 3.0


@dataclass
class SoakResult:
    duration_s: float
    kdamonds: int
    regions: int
    sample_us: int
    aggr_us: int
    fast_subscribers: int
    slow_subscribers: int
    rss_mib: list[float] = field(default_factory=list)
    """The daemon's RSS, one sample every rss_every_s."""
    bus_rss_mib: list[float] = field(default_factory=list)
    get_p50_ms: float = 0.0
    get_p99_ms: float = 0.0
    get_max_ms: float = 0.0
    gets: int = 0
    fast_gaps: int = 0
    """seq gaps summed over fast subscribers and contexts (must be 0)."""
    fast_received: list[int] = field(default_factory=list)
    slow_received: list[int] = field(default_factory=list)
    slow_gaps: int = 0
    aggregations_per_s: float = 0.0
    """Per context, from the last snapshot's seq: what the daemon achieved."""
    regions_per_snapshot: int = 0
    daemon_cpu_percent: float = 0.0
    """The daemon's CPU time over the run, in % of one core."""
    host_cpu_percent: float = 0.0
    """All CPUs busy, in % of one core (200 = both cores of a 2-core host): what
    else ran, other sessions' work included, shows here."""
    daemon_alive: bool = True
    all_on: bool = True
    daemon_log_problems: list[str] = field(default_factory=list)

    @property
    def rss_growth_mib(self) -> float:
        """RSS growth after warm-up (from the second sample on)."""
        settled = self.rss_mib[1:] or self.rss_mib
        return max(settled) - settled[0] if settled else 0.0

    def markdown(self) -> str:
        rss = ", ".join(f"{r:.0f}" for r in self.rss_mib)
        return "\n".join(
            [
                f"| soak, {self.duration_s / 60:.1f} min | value |",
                "|---|---|",
                f"| kdamonds × regions, sample/aggr | {self.kdamonds} × {self.regions}, "
                f"{self.sample_us / 1000:g} ms / {self.aggr_us / 1000:g} ms |",
                f"| subscribers | {self.fast_subscribers} fast, {self.slow_subscribers} slow |",
                f"| aggregations per context (/s) | {self.aggregations_per_s:.1f} |",
                f"| regions per snapshot | {self.regions_per_snapshot} |",
                f"| daemon RSS (MiB, every sample) | {rss} |",
                f"| RSS growth after the first sample (MiB) | {self.rss_growth_mib:.1f} |",
                f"| Get round trips | {self.gets} |",
                f"| Get p50 / p99 / max (ms) | {self.get_p50_ms:.2f} / {self.get_p99_ms:.2f} / "
                f"{self.get_max_ms:.2f} |",
                f"| snapshots received per fast subscriber (min) | "
                f"{min(self.fast_received, default=0)} |",
                f"| seq gaps seen by fast subscribers | {self.fast_gaps} |",
                f"| snapshots received per slow subscriber (min-max) | "
                f"{min(self.slow_received, default=0)}-{max(self.slow_received, default=0)} |",
                f"| seq gaps seen by slow subscribers | {self.slow_gaps} |",
                f"| CPU: daemon / whole host (% of one core) | {self.daemon_cpu_percent:.0f} / "
                f"{self.host_cpu_percent:.0f} |",
                f"| daemon alive, every kdamond on at the end | "
                f"{self.daemon_alive and self.all_on} |",
            ]
        )


# --- the subscriber process (standard library only) ---------------------------------------


class RawSubscriber:
    """One bus connection subscribed to Snapshot; parses frames, checks seq per path."""

    def __init__(self, address: str) -> None:
        self.sock = rawbus.connect(address, rawbus.method_call(2, "AddMatch", rawbus.RULE))
        self.sock.setblocking(False)
        self.buf = bytearray()
        self.last: dict[str, int] = {}
        self.received = 0
        self.gaps = 0

    def pending(self) -> bool:
        """Whether the socket has more to read right now."""
        return bool(select.select([self.sock], [], [], 0)[0])

    def read(self, limit: int = 1 << 20) -> bool:
        """Read what is there (at most limit bytes); False when the bus closed."""
        try:
            chunk = self.sock.recv(limit)
        except BlockingIOError:
            return True
        if not chunk:
            return False
        self.buf += chunk
        self._parse()
        return True

    def _parse(self) -> None:
        buf, pos = self.buf, 0
        while len(buf) - pos >= 16:
            if buf[pos] != ord("l"):
                raise RuntimeError("big-endian message: not expected from dbus-daemon")
            kind = buf[pos + 1]
            body_len, _, fields_len = struct.unpack_from("<III", buf, pos + 4)
            body_at = pos + 16 + fields_len + (-(16 + fields_len) % 8)
            end = body_at + body_len
            if len(buf) < end:
                break
            if kind == 4:  # a signal: ours are the only ones matched
                self._signal(bytes(buf[pos + 16 : pos + 16 + fields_len]), buf, body_at)
            pos = end
        del buf[:pos]

    def _signal(self, fields: bytes, buf: bytearray, body_at: int) -> None:
        path = member = ""
        i = 0
        while i < len(fields):
            i += -i % 8
            if i >= len(fields):
                break
            code, sig_len = fields[i], fields[i + 1]
            sig = fields[i + 2 : i + 2 + sig_len].decode()
            i += 3 + sig_len
            if sig in ("s", "o"):
                i += -i % 4  # header fields start 8-aligned in the message, as here
                (n,) = struct.unpack_from("<I", fields, i)
                value = fields[i + 4 : i + 4 + n].decode()
                i += 5 + n
                if code == 1:
                    path = value
                elif code == 3:
                    member = value
            elif sig == "g":
                i += 2 + fields[i]
            elif sig == "u":
                i += -i % 4 + 4
            else:
                raise RuntimeError(f"unexpected header field type {sig!r}")
        if member != "Snapshot":
            return
        (seq,) = struct.unpack_from("<Q", buf, body_at)
        last = self.last.get(path)
        if last is not None and seq != last + 1:
            self.gaps += 1
        self.last[path] = seq
        self.received += 1


def subscriber_main(address: str, fast: int, slow: int) -> None:
    """Serve as the subscriber process: 'ready', then read until stdin closes; print JSON."""
    fasts = [RawSubscriber(address) for _ in range(fast)]
    slows = [RawSubscriber(address) for _ in range(slow)]
    selector = selectors.DefaultSelector()
    for i, sub in enumerate(fasts):
        selector.register(sub.sock, selectors.EVENT_READ, i)
    selector.register(sys.stdin, selectors.EVENT_READ, -1)
    print("ready", flush=True)
    started = time.monotonic()
    while True:
        for key, _ in selector.select(timeout=0.05):
            if key.data == -1:
                if not sys.stdin.readline():
                    print(
                        json.dumps(
                            {
                                "fast": [(s.received, s.gaps) for s in fasts],
                                "slow": [(s.received, s.gaps) for s in slows],
                            }
                        ),
                        flush=True,
                    )
                    return
                continue
            if not fasts[key.data].read():
                selector.unregister(key.fileobj)
        if (time.monotonic() - started) % SLOW_CYCLE_S >= SLOW_PAUSE_S:
            for sub in slows:  # catching up: everything the bus has for it
                while sub.read() and sub.pending():
                    pass


# --- the driver --------------------------------------------------------------------------


def _percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))] if ordered else 0.0


async def run_soak(
    duration_s: float,
    kdamonds: int = 8,
    regions: int = 1000,
    sample_us: int = 5000,
    aggr_us: int = 100_000,
    fast: int = 16,
    slow: int = 4,
    rss_every_s: float = 10.0,
    get_every_s: float = 0.1,
) -> SoakResult:
    result = SoakResult(duration_s, kdamonds, regions, sample_us, aggr_us, fast, slow)
    targets = [subprocess.Popen(["sleep", str(int(duration_s) + 600)]) for _ in range(kdamonds)]
    with start_private_bus() as bus, tempfile.TemporaryDirectory() as tmp:
        log_path = Path(tmp) / "damond.log"
        client = await connect(bus.address)
        daemon = spawn_daemon(bus.address, log_path, "--kernel-damon-admin", "off")
        subscribers: subprocess.Popen[str] | None = None
        try:
            await wait_for_name(client, "org.damond1", 15)
            subscribers = subprocess.Popen(
                [
                    sys.executable,
                    "-m",
                    "bench.soak",
                    "--subscriber",
                    bus.address,
                    str(fast),
                    str(slow),
                ],
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                text=True,
                cwd=Path(__file__).resolve().parent.parent,
            )
            assert subscribers.stdout is not None and subscribers.stdin is not None
            if subscribers.stdout.readline() != "ready\n":
                raise RuntimeError("the subscriber process did not start")
            await start_kdamonds(
                client,
                [t.pid for t in targets],
                sample_us=sample_us,
                aggr_us=aggr_us,
                min=regions,
                max=regions,
                cpu_limit_pct=0,  # the load is the nominal rate: no CPU ceiling stretching it
            )
            proc = psutil.Process(daemon.pid)
            bus_proc = psutil.Process(bus.process.pid)
            loop = asyncio.get_running_loop()
            start = loop.time()
            cpu0 = proc.cpu_times()
            psutil.cpu_percent()
            end = start + duration_s
            next_rss = start
            latencies: list[float] = []
            while loop.time() < end:
                if loop.time() >= next_rss:
                    next_rss += rss_every_s
                    result.rss_mib.append(proc.memory_info().rss / 2**20)
                    result.bus_rss_mib.append(bus_proc.memory_info().rss / 2**20)
                t0 = time.perf_counter()
                await asyncio.wait_for(get_property(client, ROOT, "org.damond1.Kdamonds", "nr"), 10)
                latencies.append((time.perf_counter() - t0) * 1e3)
                await asyncio.sleep(get_every_s)
            result.rss_mib.append(proc.memory_info().rss / 2**20)
            cpu1 = proc.cpu_times()
            elapsed = loop.time() - start
            result.daemon_cpu_percent = (
                100 * (cpu1.user + cpu1.system - cpu0.user - cpu0.system) / elapsed
            )
            result.host_cpu_percent = psutil.cpu_percent() * (os.cpu_count() or 1)
            result.gets = len(latencies)
            result.get_p50_ms = _percentile(latencies, 0.5)
            result.get_p99_ms = _percentile(latencies, 0.99)
            result.get_max_ms = max(latencies, default=0.0)
            states = []
            seqs = []
            for k in range(kdamonds):
                kd = f"{ROOT}/kdamonds/{k}"
                states.append(await get_property(client, kd, "org.damond1.Kdamond", "state"))
                snap = await client_snapshot(client, f"{kd}/contexts/0")
                seqs.append(snap[0])
                result.regions_per_snapshot = max(
                    result.regions_per_snapshot, sum(len(t[2]) for t in snap[3])
                )
            result.all_on = all(s == "on" for s in states)
            result.aggregations_per_s = statistics.mean(seqs) / (loop.time() - start)
            result.daemon_alive = daemon.poll() is None
            counts_line, _ = subscribers.communicate("", timeout=60)
            counts = json.loads(counts_line)
            result.fast_received = [n for n, _ in counts["fast"]]
            result.fast_gaps = sum(g for _, g in counts["fast"])
            result.slow_received = [n for n, _ in counts["slow"]]
            result.slow_gaps = sum(g for _, g in counts["slow"])
        finally:
            if subscribers is not None and subscribers.poll() is None:
                subscribers.kill()
                subscribers.wait()
            client.disconnect()
            if daemon.poll() is None:
                daemon.terminate()
                daemon.wait(timeout=15)
            for t in targets:
                t.kill()
                t.wait()
        text = log_path.read_text(errors="replace")
        result.daemon_log_problems = [
            line
            for line in text.splitlines()
            if "Traceback" in line or "lost the connection" in line or "ERROR" in line
        ]
    return result


async def client_snapshot(client: Any, path: str) -> list[Any]:
    from damond.tools.client import call

    return await call(client, path, "org.damond1.Context", "GetSnapshot")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m bench.soak", description=__doc__.split("\n")[0]
    )
    parser.add_argument("--minutes", type=float, default=10.0)
    parser.add_argument("--json", type=Path, help="also write the result as JSON here")
    parser.add_argument(
        "--subscriber", nargs=3, metavar=("ADDRESS", "FAST", "SLOW"), help=argparse.SUPPRESS
    )
    args = parser.parse_args(argv)
    if args.subscriber:
        address, fast, slow = args.subscriber
        subscriber_main(address, int(fast), int(slow))
        return 0
    result = asyncio.run(run_soak(args.minutes * 60))
    print(result.markdown())
    if args.json:
        args.json.write_text(
            json.dumps({**asdict(result), "rss_growth_mib": result.rss_growth_mib}, indent=1)
        )
    ok = (
        result.daemon_alive
        and result.all_on
        and result.fast_gaps == 0
        and result.get_p99_ms < 50
        and not result.daemon_log_problems
    )
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
