"""`make demo`: damond watching a process that keeps one buffer hot and one cold.

Starts (as needed) a bus, the daemon and the workload, configures kdamond 0
over D-Bus exactly as the equivalent busctl commands would, and draws each
Snapshot until Ctrl-C or ``DEMO_SECONDS`` seconds. Everything it started is
stopped again on every way out.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import shlex
import signal
import sys
import tempfile
import textwrap
from collections.abc import Awaitable, Callable, Iterator
from contextlib import AsyncExitStack
from dataclasses import dataclass, replace
from pathlib import Path
from typing import IO, Any

from dbus_fast import DBusError
from dbus_fast.aio import MessageBus

from damond.tools import client, live
from damond.tools.client import BUS_NAME, ROOT, get_property
from damond.tools.live import Feed
from damond.tools.privatebus import die_with_parent, start_private_bus, wait_for_name
from damond.tools.render import COLUMNS, Marks, coverage, format_size, parse

KDAMOND = f"{ROOT}/kdamonds/0"
CONTEXT = f"{KDAMOND}/contexts/0"
TARGET = f"{CONTEXT}/targets/0"

SYSTEM_SOCKET = Path("/run/dbus/system_bus_socket")
POLICY_FILES = (
    Path("/usr/share/dbus-1/system.d/org.damond1.conf"),
    Path("/etc/dbus-1/system.d/org.damond1.conf"),
)
HOT_MIB, COLD_MIB = 8, 56
NAME_TIMEOUT_S = 10.0
WORKLOAD_TIMEOUT_S = 10.0
STOP_TIMEOUT_S = 5.0
FIRST_SNAPSHOT_TIMEOUT_S = 30.0
EFFECTIVE = ("effective_sample_us", "effective_aggr_us")
PACE_REFRESH_S = 2.0
"""effective_aggr_us is read again this often (it is not announced: it changes with every
aggregation)."""

GRANULARITY = {
    "mapping": (
        "per mapping: each sample clears the referenced bits and reads smaps; a mapping "
        "whose share f of pages was referenced counts as accessed, all its sampled pages "
        "at once, in a share f of the samples (hot and cold parts of one mapping look alike)"
    ),
    "page-writes": (
        "writes per page (each sampled page's soft-dirty bit), reads per mapping (smaps' "
        "Referenced, less the written pages)"
    ),
    "page": "per page: each sampled page's own idle bit says whether it was accessed",
}
"""What the access check's answers stand for, by the context's access_granularity."""


class DemoError(Exception):
    """A reason to stop the demo with exit status 1, said in one line (or a log)."""


@dataclass(frozen=True)
class BusChoice:
    """Where the demo runs: the system bus, or a private one once ``address`` is set."""

    system: bool
    start_daemon: bool
    reason: str
    address: str | None = None

    @property
    def daemon_arg(self) -> str:
        return self.address or "system"

    @property
    def busctl(self) -> list[str]:
        return ["busctl"] + ([f"--address={self.address}"] if self.address else [])


async def set_property(
    bus: MessageBus, path: str, interface: str, name: str, signature: str, value: Any
) -> None:
    """client.set_property, failing the demo with a message that says what was set."""
    try:
        await client.set_property(bus, path, interface, name, signature, value)
    except DBusError as e:
        raise DemoError(
            f"setting {path} {interface}.{name} to {value!r}: {e.type}: {e.text}"
        ) from None


async def choose_bus() -> BusChoice:
    """The system bus when damond is (or may be) served there by root, else a private bus."""
    if not SYSTEM_SOCKET.exists():
        return BusChoice(False, True, f"no system bus here ({SYSTEM_SOCKET} is missing)")
    if os.geteuid() != 0:
        return BusChoice(False, True, f"not root: may not own {BUS_NAME} on the system bus")
    try:
        bus = await client.connect(None)
    except Exception as e:  # any failure to reach the system bus means: use our own
        return BusChoice(False, True, f"the system bus is unreachable ({e})")
    try:
        owned = await client.name_has_owner(bus)
    finally:
        bus.disconnect()
    if owned:
        return BusChoice(True, False, f"{BUS_NAME} already runs on the system bus: using it")
    if any(p.exists() for p in POLICY_FILES):
        return BusChoice(True, True, "the damond policy is installed: using the system bus")
    return BusChoice(False, True, f"the system bus has no {BUS_NAME} policy installed")


@contextlib.contextmanager
def _sigint_ignored() -> Iterator[None]:
    """Ignore SIGINT for a while (children started meanwhile keep ignoring it)."""
    previous = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)


async def spawn(
    *args: str, stdout: int | IO[bytes], stderr: int | IO[bytes] | None
) -> asyncio.subprocess.Process:
    """A child in its own process group (a terminal's Ctrl-C reaches only the demo,
    which then stops the children in order) that dies with the demo."""
    return await asyncio.create_subprocess_exec(
        sys.executable,
        *args,
        stdin=asyncio.subprocess.DEVNULL,
        stdout=stdout,
        stderr=stderr,
        start_new_session=True,
        preexec_fn=die_with_parent,
    )


async def stop_process(process: asyncio.subprocess.Process) -> int:
    """SIGTERM, wait, SIGKILL if it will not go; returns the exit status."""
    if process.returncode is None:
        with contextlib.suppress(ProcessLookupError):
            process.terminate()
        try:
            await asyncio.wait_for(process.wait(), STOP_TIMEOUT_S)
        except TimeoutError:
            process.kill()
            await process.wait()
    assert process.returncode is not None
    return process.returncode


def read_log(log: IO[bytes]) -> str:
    log.seek(0)
    return log.read().decode(errors="replace").strip()


async def start_daemon(stack: AsyncExitStack, bus: MessageBus, choice: BusChoice) -> None:
    """Start damond and wait until it owns its name; on any exit, stop it again."""
    log = stack.enter_context(tempfile.TemporaryFile(prefix="damond-demo-"))  # noqa: SIM115
    process = await spawn("-m", "damond", "--bus", choice.daemon_arg, stdout=log, stderr=log)
    log_shown = False

    async def stop() -> None:
        code = await stop_process(process)
        print(f"stopped the daemon (exit status {code})")
        text = read_log(log)
        notable = text if code else "\n".join(x for x in text.splitlines() if not _routine(x))
        if notable and not log_shown:
            print(f"the daemon said:\n{notable}", file=sys.stderr)

    stack.push_async_callback(stop)
    print(
        f"started damond (pid {process.pid}): {sys.executable} -m damond --bus "
        f"{shlex.quote(choice.daemon_arg)}"
    )
    owned = asyncio.ensure_future(wait_for_name(bus, BUS_NAME, NAME_TIMEOUT_S))
    exited = asyncio.ensure_future(process.wait())
    await asyncio.wait([owned, exited], return_when=asyncio.FIRST_COMPLETED)
    exited.cancel()
    if not owned.done() or owned.exception() is not None:
        owned.cancel()
        if process.returncode is not None:
            problem = f"damond exited with status {process.returncode} before owning {BUS_NAME}"
        else:
            problem = f"damond did not own {BUS_NAME} within {NAME_TIMEOUT_S:.0f} s"
        log_shown = True
        raise DemoError(f"{problem}:\n{read_log(log)}")
    print(f"damond owns {BUS_NAME}")


def _routine(line: str) -> bool:
    """A daemon log line that is worth nothing to the demo's viewer."""
    return ": INFO: " in line or ": DEBUG: " in line


async def start_workload(stack: AsyncExitStack) -> tuple[Marks, asyncio.subprocess.Process]:
    """Start the workload and read where its buffers are."""
    process = await spawn(
        "-m",
        "damond.tools.workload",
        "--hot-mib",
        str(HOT_MIB),
        "--cold-mib",
        str(COLD_MIB),
        stdout=asyncio.subprocess.PIPE,
        stderr=None,
    )

    async def stop() -> None:
        code = await stop_process(process)
        print(f"stopped the workload (exit status {code})")

    stack.push_async_callback(stop)
    assert process.stdout is not None
    try:
        line = await asyncio.wait_for(process.stdout.readline(), WORKLOAD_TIMEOUT_S)
        marks = Marks.from_json(json.loads(line))
    except (TimeoutError, ValueError, KeyError) as e:
        raise DemoError(f"the workload did not announce its buffers: {e!r}") from None
    for name, (start, end) in (("hot", marks.hot), ("cold", marks.cold)):
        what = "written continuously" if name == "hot" else "touched once, then left alone"
        print(
            f"workload pid {marks.pid}: {name:<4} {format_size(end - start):>9} at "
            f"{start:x}-{end:x}, {what}"
        )
    return marks, process


async def configure(bus: MessageBus, choice: BusChoice, pid: int) -> None:
    """Set kdamond 0 up for ``pid`` (printing the busctl equivalent).

    Leaves ``state`` to the caller."""
    steps: list[tuple[str, str, str, str, Any]] = [
        (ROOT, "org.damond1.Kdamonds", "nr", "u", 1),
        (KDAMOND, "org.damond1.Contexts", "nr", "u", 1),
        (CONTEXT, "org.damond1.Context", "operations", "s", "vaddr"),
        (CONTEXT, "org.damond1.Targets", "nr", "u", 1),
        (TARGET, "org.damond1.Target", "pid", "i", pid),
    ]
    print("\nconfiguring kdamond 0, as these commands would:")
    busctl = shlex.join(choice.busctl)
    state_on = (KDAMOND, "org.damond1.Kdamond", "state", "s", "on")
    for path, iface, name, sig, value in [*steps, state_on]:
        print(f"  {busctl} set-property {BUS_NAME} {path} {iface} {name} {sig} {value}")
    for step in steps:
        await set_property(bus, *step)


async def describe_access_check(bus: MessageBus) -> str:
    """Print the access check asked for and the one the daemon chose; returns the latter."""
    asked = await get_property(bus, CONTEXT, "org.damond1.Context", "access_check")
    avail = await get_property(bus, CONTEXT, "org.damond1.Context", "avail_access_checks")
    check = str(await get_property(bus, CONTEXT, "org.damond1.Context", "effective_access_check"))
    granularity = await get_property(bus, CONTEXT, "org.damond1.Context", "access_granularity")
    shown = check if check == asked else f"{asked} -> {check}"
    print(f"access_check {shown} (available: {', '.join(avail) or 'none'})")
    print(f"  granularity {granularity}: {GRANULARITY.get(granularity, 'unknown to this demo')}")
    return check


async def describe_pace(bus: MessageBus, feed: Feed) -> int:
    """After the first Snapshot: the intervals asked and those sampling really has (with the
    CPU ceiling that may stretch them); returns effective_aggr_us."""
    try:
        await asyncio.wait_for(feed.arrived.wait(), FIRST_SNAPSHOT_TIMEOUT_S)
    except TimeoutError:
        raise DemoError(f"no Snapshot within {FIRST_SNAPSHOT_TIMEOUT_S:g} s") from None
    asked = [
        await get_property(bus, CONTEXT, "org.damond1.Intervals", n)
        for n in ("sample_us", "aggr_us")
    ]
    real = [await get_property(bus, CONTEXT, "org.damond1.Context", n) for n in EFFECTIVE]
    limit = await get_property(bus, CONTEXT, "org.damond1.Context", "cpu_limit_pct")
    print(
        f"sampling every {real[0] / 1000:.1f} ms (asked {asked[0] / 1000:g} ms), "
        f"a Snapshot every {real[1] / 1000:.0f} ms (asked {asked[1] / 1000:g} ms); "
        + (f"cpu_limit_pct {limit} % of one CPU" if limit else "no CPU ceiling")
    )
    if real[1] > 1.2 * asked[1]:
        print("  sampling is slower than asked: the times below use the real interval")
    return int(real[1])


async def follow_pace(bus: MessageBus, pace: dict[str, int]) -> None:
    """Keep pace["aggr_us"] at the context's effective_aggr_us (read every few seconds)."""
    while True:
        await asyncio.sleep(PACE_REFRESH_S)
        with contextlib.suppress(DBusError):
            pace["aggr_us"] = await get_property(bus, CONTEXT, "org.damond1.Context", EFFECTIVE[1])


async def watch(
    bus: MessageBus,
    feed: Feed,
    marks: Marks,
    check: str,
    seconds: float | None,
    children: dict[str, asyncio.subprocess.Process],
    aggr_us: int,
) -> None:
    """Draw snapshots until the time is up; a child that exits ends the demo. Ages are
    shown as durations with the aggregation interval sampling really has."""

    def children_live() -> None:
        for name, process in children.items():
            if process.returncode is not None:
                raise DemoError(f"the {name} exited with status {process.returncode}")

    pace = {"aggr_us": aggr_us}
    follower = asyncio.ensure_future(follow_pace(bus, pace))
    try:
        await live.watch(
            feed,
            "damond demo",
            seconds,
            lambda screen, body: screen.picture(body, marks, check, aggr_us=pace["aggr_us"]),
            children_live,
        )
    finally:
        follower.cancel()


def verdict(body: list[Any] | None, marks: Marks) -> str:
    """One line: did the last snapshot show the hot buffer hot and the cold one cold?"""
    if body is None:
        return "result: no Snapshot was received"
    snap = parse(body)
    target = next((t for t in snap.targets if t.pid == marks.pid), None)
    if target is None:
        return f"result: the last Snapshot (seq {snap.seq}) has no target for pid {marks.pid}"
    hot = coverage(target.regions, marks.hot, snap.max_nr_accesses)
    cold = coverage(target.regions, marks.cold, snap.max_nr_accesses)
    good = hot.accessed_fraction >= 0.9 and cold.accessed_fraction <= 0.1
    return (
        f"result (seq {snap.seq}): hot buffer {hot.accessed_fraction:.0%} in accessed regions "
        f"(mean freq {hot.mean_frequency:.0%}), cold buffer {cold.accessed_fraction:.0%} "
        f"(mean freq {cold.mean_frequency:.0%}): "
        + ("hot looks hot and cold looks cold" if good else "NOT the expected picture")
    )


async def warn_on_failure(what: str, action: Callable[[], Awaitable[Any]]) -> None:
    """Run a cleanup step; a failure is reported, not raised, so later steps still run."""
    try:
        await asyncio.wait_for(action(), STOP_TIMEOUT_S)
    except Exception as e:  # cleanup must go on whatever happened
        print(f"warning: {what} failed: {e}", file=sys.stderr)


async def demo(stack: AsyncExitStack, seconds: float | None) -> None:
    """The whole demo; every cleanup step is pushed on ``stack`` as soon as it is needed."""
    choice = await choose_bus()
    if choice.system:
        print(choice.reason)
    else:
        with _sigint_ignored():  # inherited: a terminal's Ctrl-C must not kill the bus
            private = start_private_bus()

        def stop_bus() -> None:
            private.stop()
            print("stopped the private bus")

        stack.callback(stop_bus)
        choice = replace(choice, address=private.address)
        print(f"{choice.reason}: using a private dbus-daemon at {private.address}")

    bus = await client.connect(choice.address)
    stack.callback(bus.disconnect)
    if choice.start_daemon:
        if await client.name_has_owner(bus):
            raise DemoError(f"{BUS_NAME} is already owned on this bus")
        await start_daemon(stack, bus, choice)

    marks, workload = await start_workload(stack)
    await configure(bus, choice, marks.pid)
    feed = Feed(CONTEXT)
    await feed.subscribe(bus)

    async def state_off() -> None:
        await set_property(bus, KDAMOND, "org.damond1.Kdamond", "state", "s", "off")
        print("kdamond 0: state off")

    stack.push_async_callback(warn_on_failure, "state off", state_off)
    await set_property(bus, KDAMOND, "org.damond1.Kdamond", "state", "s", "on")
    kpid = await get_property(bus, KDAMOND, "org.damond1.Kdamond", "pid")
    print(f"kdamond 0: state on (pid {kpid})")
    check = await describe_access_check(bus)
    aggr_us = await describe_pace(bus, feed)
    print(textwrap.fill(COLUMNS, 100))

    try:
        await watch(bus, feed, marks, check, seconds, {"workload": workload}, aggr_us)
    finally:
        print(verdict(feed.latest, marks))


def _parse_seconds() -> float | None:
    raw = os.environ.get("DEMO_SECONDS", "").strip()
    if not raw:
        return None
    try:
        seconds = float(raw)
    except ValueError:
        raise DemoError(f"DEMO_SECONDS must be a number of seconds, not {raw!r}") from None
    if seconds <= 0:
        raise DemoError(f"DEMO_SECONDS must be positive, not {raw!r}")
    return seconds


class _Interrupt:
    """SIGINT/SIGTERM cancel the demo once; during cleanup they are ignored."""

    def __init__(self, task: asyncio.Task[Any]) -> None:
        self.task = task
        self.armed = True
        self.fired = False
        loop = asyncio.get_running_loop()
        for signum in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(signum, self._fire)

    def _fire(self) -> None:
        if self.armed:
            self.armed = False
            self.fired = True
            self.task.cancel()


async def _run(seconds: float | None) -> int:
    task = asyncio.current_task()
    assert task is not None
    interrupt = _Interrupt(task)
    status = 0
    async with AsyncExitStack() as stack:  # unwinding it stops everything, in reverse order
        try:
            await demo(stack, seconds)
        except asyncio.CancelledError:
            if not interrupt.fired:
                raise
            task.uncancel()
            print("\ninterrupted")
        except DemoError as e:
            sys.stdout.flush()
            print(f"demo: {e}", file=sys.stderr)
            status = 1
        finally:
            interrupt.armed = False
            print("stopping")
    return status


def main() -> int:
    """Entry point of ``python -m damond.tools.demo``."""
    try:
        seconds = _parse_seconds()
    except DemoError as e:
        print(f"demo: {e}", file=sys.stderr)
        return 2
    return asyncio.run(_run(seconds))


if __name__ == "__main__":
    sys.exit(main())
