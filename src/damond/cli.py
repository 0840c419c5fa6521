"""`damond`: serve the admin tree on a bus until SIGTERM/SIGINT."""

from __future__ import annotations

import argparse
import asyncio
import errno
import logging
import os
import signal
import sys
import textwrap
from collections.abc import Callable
from typing import Any

from dbus_fast import BusType, DBusError, RequestNameReply
from dbus_fast.aio import MessageBus

from damond import service
from damond.bus import BUS_NAME, NAMES, ROOT_PATH, BusAdapter, Name, own_name
from damond.hierarchy import Tree
from damond.monitor import ops
from damond.monitor.config import ContextConfig
from damond.monitor.kdamond import KdamondTask, OpsWrapper
from damond.monitor.ops import kernel_damon
from damond.monitor.snapshot import Snapshot

log = logging.getLogger("damond")

SHUTDOWN_GRACE_S = 5.0


class Fatal(Exception):
    """A reason to exit 1, said in one line."""


def host_support(registry: ops.Registry = ops.REGISTRY) -> str:
    """What this host offers (for --help): each access check and operations set, and why
    not where it cannot run (the same probes as avail_access_checks/avail_operations)."""
    lines = ["On this host (as this user):"]
    for kind, names in (
        ("access check", registry.access_check_names),
        ("operations", registry.operations_names),
    ):
        for name in names:
            reason = registry.why_unavailable(name)
            said = f"no ({reason.removeprefix(name + ': ')})" if reason else "available"
            lines.append(f"  {kind} {name}: {said}")
    return "\n".join(lines)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    description = (
        "DAMON-style data-access monitor in user space. Serves the DAMON admin tree "
        f"(kdamonds, contexts, targets, regions) as D-Bus objects under {ROOT_PATH} with "
        f"the bus name {BUS_NAME}, and publishes each aggregation as a Snapshot signal. "
        "Configure and start monitoring with busctl set-property (see docs/dbus-api.md)."
    )
    parser = argparse.ArgumentParser(
        prog="damond",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description=textwrap.fill(description, 79),
        epilog=textwrap.fill(
            "Exits 1 when the bus is unreachable or the name is taken; 0 on SIGTERM/SIGINT.",
            79,
        )
        + "\n\n"
        + host_support(),
    )
    parser.add_argument(
        "--bus",
        default="system",
        metavar="system|session|ADDRESS",
        help="the bus to serve on: the system bus (default), the session bus, or a D-Bus "
        "address such as unix:path=/run/damond-test/bus",
    )
    parser.add_argument(
        "--log-level",
        default="info",
        choices=["debug", "info", "warning", "error"],
        help="least severe messages to log (default: info)",
    )
    return parser.parse_args(argv)


def _message_bus(spec: str) -> MessageBus:
    if spec == "system":
        return MessageBus(bus_type=BusType.SYSTEM)
    if spec == "session":
        return MessageBus(bus_type=BusType.SESSION)
    return MessageBus(bus_address=spec)


async def _connect(spec: str) -> MessageBus:
    try:
        bus = _message_bus(spec)
        return await bus.connect()
    except Exception as e:
        raise Fatal(f"cannot connect to the {spec} bus: {e}") from None


async def _own_name(bus: MessageBus, name: Name) -> None:
    try:
        reply = await own_name(bus, name)
    except DBusError as e:
        raise Fatal(f"not allowed to own {name.name} on this bus: {e.text}") from None
    if reply not in (RequestNameReply.PRIMARY_OWNER, RequestNameReply.ALREADY_OWNER):
        raise Fatal(f"{name.name} is already owned on this bus (is another damond running?)")


class Daemon:
    """The tree, its running kdamonds and the bus it is served on."""

    def __init__(self, registry: ops.Registry = ops.REGISTRY) -> None:
        self.tasks: set[KdamondTask] = set()
        self.registry = registry
        self.tree = Tree(self._start_kdamond, registry)
        self.wrap_ops: OpsWrapper | None = None
        """Set by fault injection only (damond.faults)."""

    def _start_kdamond(
        self,
        name: str,
        config: ContextConfig,
        on_snapshot: Callable[[Snapshot], None],
        on_stop: Callable[[str], None],
    ) -> KdamondTask:
        task = KdamondTask(name, config, on_snapshot, on_stop, self.registry, self.wrap_ops)
        self.tasks.add(task)
        # however it ends (by itself, or cancelled by `off`): a stopped task
        # kept here would keep its engine and regions for the daemon's lifetime
        task.add_done_callback(lambda: self.tasks.discard(task))
        return task

    async def shutdown(self, reason: str) -> None:
        tasks = list(self.tasks)
        self.tree.stop_all(reason)
        if tasks:
            await asyncio.wait(
                [asyncio.ensure_future(t.wait()) for t in tasks], timeout=SHUTDOWN_GRACE_S
            )

    async def serve(self, spec: str) -> int:
        loop = asyncio.get_running_loop()
        loop.set_exception_handler(_quiet_after_disconnect)
        # before the name is visible: a SIGTERM right after start-up is a clean stop
        stop = asyncio.Event()
        for signum in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(signum, stop.set)
        # one connection per name: what one class of peers leaves unread pins only its own
        buses = {name: await _connect(spec) for name in NAMES}
        adapter = BusAdapter(buses, self.tree, lambda: _connect(spec))
        adapter.attach()  # objects answer before the names are visible
        for name in NAMES:
            await _own_name(buses[name], name)
        log.info("serving %s on %s (pid %d)", BUS_NAME, spec, os.getpid())
        warning = kernel_damon.interference_warning()
        if warning:
            log.warning("%s", warning)
        status = service.ServiceStatus(self.tree)
        self.tree.listeners.append(status)
        service.notify("READY=1")  # the name is owned and the tree exported
        status.update()

        interval = service.watchdog_interval()
        pinger = asyncio.ensure_future(service.watchdog(interval)) if interval else None
        if _faults_asked():
            from damond import faults  # test support, loaded only when asked

            faults.install_stall(loop)
        stopped = asyncio.ensure_future(stop.wait())
        lost = asyncio.ensure_future(adapter.wait_lost())
        await asyncio.wait([stopped, lost], return_when=asyncio.FIRST_COMPLETED)
        service.notify("STOPPING=1")
        if pinger is not None:
            pinger.cancel()
        if lost.done():
            stopped.cancel()
            adapter.detach()
            await self.shutdown("lost the bus connection")
            raise Fatal(f"lost the connection to the bus: {disconnect_reason(lost.result())}")
        lost.cancel()
        log.info("stopping on signal")
        await self.shutdown("daemon stopping")
        adapter.detach()
        for face in adapter.faces.values():
            face.bus.disconnect()
        return 0


def disconnect_reason(error: BaseException | None) -> str:
    """What ended a bus connection, in words: the exception dbus-fast ended it with often
    has no text (EOFError() when the bus closed the socket)."""
    if error is None:
        return "the bus closed it"
    if isinstance(error, EOFError):
        return "the bus closed the socket (end of file)"
    if isinstance(error, OSError) and error.errno is not None:
        name = errno.errorcode.get(error.errno, str(error.errno))
        return f"{error.strerror or os.strerror(error.errno)} ({name})"
    return str(error) or type(error).__name__


def _quiet_after_disconnect(loop: asyncio.AbstractEventLoop, context: dict[str, Any]) -> None:
    """dbus-fast fails every message still queued when the bus goes away; futures of
    messages nobody awaits then log "exception never retrieved" with a traceback.
    The disconnection itself is handled (serve() exits 1 saying so): log those quietly."""
    if isinstance(context.get("exception"), ConnectionError | EOFError):
        log.debug("after the disconnection: %s", context.get("message"))
        return
    loop.default_exception_handler(context)


def _faults_asked() -> bool:
    """A DAMOND_FAULT_* variable is set: tests want fault injection (damond.faults)."""
    return any(name.startswith("DAMOND_FAULT_") for name in os.environ)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    service.setup_logging(args.log_level)
    daemon = Daemon()
    if _faults_asked():
        from damond import faults  # test support, loaded only when asked

        daemon.wrap_ops = faults.wrap_ops
    try:
        return asyncio.run(daemon.serve(args.bus))
    except Fatal as e:
        print(f"damond: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 0


if __name__ == "__main__":
    sys.exit(main())
