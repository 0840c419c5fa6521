"""`damond`: serve the admin tree on a bus until SIGTERM/SIGINT."""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import signal
import sys
import textwrap
from collections.abc import Callable
from importlib import metadata
from pathlib import Path
from typing import Any

from dbus_fast import BusType, DBusError, NameFlag, RequestNameReply
from dbus_fast.aio import MessageBus

from damond import configfile, service
from damond.bus import BUS_NAME, ROOT_PATH, BusAdapter
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
    for name in registry.available_operations():
        actions = ", ".join(registry.available_actions(name))
        lines.append(f"  DAMOS actions on {name}: {actions}")
    return "\n".join(lines)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    description = (
        "DAMON-style data-access monitor in user space. Serves the DAMON admin tree "
        f"(kdamonds, contexts, targets, regions) as D-Bus objects under {ROOT_PATH} with "
        f"the bus name {BUS_NAME}, and publishes each aggregation as a Snapshot signal. "
        "Configure and start monitoring with damondctl, busctl set-property (see "
        "docs/dbus-api.md), or a configuration file in damo's kdamonds JSON format, applied "
        "at start and again on SIGHUP."
    )
    examples = (
        "examples:\n"
        "  damond --bus system                      # as the system service does\n"
        "  damond --bus unix:path=/tmp/b/bus        # on a private bus (see the README)\n"
        "  damond --config kdamonds.json --bus ...  # start what the file says\n"
        "  kill -HUP $(pidof -x damond)             # apply the file again (systemctl reload)"
    )
    parser = argparse.ArgumentParser(
        prog="damond",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description=textwrap.fill(description, 79),
        epilog=examples
        + "\n\n"
        + textwrap.fill(
            "Exits 1 when the bus is unreachable, the name is taken, or --config names a "
            "file that does not exist; 0 on SIGTERM/SIGINT. A configuration that is refused "
            "(at start or reload) is logged with the object and rule, and changes nothing: "
            "the daemon keeps serving.",
            79,
        )
        + "\n\n"
        + host_support(),
    )
    parser.add_argument("--version", action="version", version=f"damond {_version()}")
    parser.add_argument(
        "--bus",
        default="system",
        metavar="system|session|ADDRESS",
        help="the bus to serve on: the system bus (default), the session bus, or a D-Bus "
        "address such as unix:path=/run/damond-test/bus",
    )
    parser.add_argument(
        "--config",
        type=Path,
        default=None,
        metavar="FILE",
        help=f"damo's kdamonds JSON to apply at start and on SIGHUP (default: "
        f"{configfile.DEFAULT_PATH}, when it exists)",
    )
    parser.add_argument(
        "--log-level",
        default="info",
        choices=["debug", "info", "warning", "error"],
        help="least severe messages to log (default: info)",
    )
    return parser.parse_args(argv)


def _version() -> str:
    try:
        return metadata.version("damond")
    except metadata.PackageNotFoundError:
        return "unknown (not installed)"


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


async def _own_name(bus: MessageBus) -> None:
    try:
        reply = await bus.request_name(BUS_NAME, NameFlag.DO_NOT_QUEUE)
    except DBusError as e:
        raise Fatal(f"not allowed to own {BUS_NAME} on this bus: {e.text}") from None
    if reply not in (RequestNameReply.PRIMARY_OWNER, RequestNameReply.ALREADY_OWNER):
        raise Fatal(f"{BUS_NAME} is already owned on this bus (is another damond running?)")


class Daemon:
    """The tree, its running kdamonds and the bus it is served on."""

    def __init__(
        self, registry: ops.Registry = ops.REGISTRY, config: Path | None = None
    ) -> None:
        self.config = config or configfile.DEFAULT_PATH
        self.config_asked = config is not None
        """--config was given: a missing file is an error, not 'nothing to apply'."""
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

    def apply_config(self) -> str:
        """Apply the configuration file (at start, on SIGHUP); the reason it was refused,
        which changes nothing and is logged, or ''."""
        try:
            configfile.load(self.config, self.tree, missing_ok=not self.config_asked)
        except configfile.ConfigFileError as e:
            log.error("configuration refused, nothing changed: %s", e)
            return str(e)
        return ""

    def reload(self, status: service.ServiceStatus) -> None:
        """SIGHUP: apply the configuration again (systemd's reload protocol around it)."""
        service.notify("RELOADING=1")
        log.info("reloading the configuration from %s", self.config)
        status.config_problem = self.apply_config()
        service.notify("READY=1")
        status.update()

    async def serve(self, spec: str) -> int:
        loop = asyncio.get_running_loop()
        loop.set_exception_handler(_quiet_after_disconnect)
        # before the name is visible: a SIGTERM right after start-up is a clean stop,
        # and a SIGHUP a reload (its default action would end the daemon)
        stop = asyncio.Event()
        for signum in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(signum, stop.set)
        status = service.ServiceStatus(self.tree)
        loop.add_signal_handler(signal.SIGHUP, self.reload, status)
        bus = await _connect(spec)
        adapter = BusAdapter(bus, self.tree)
        adapter.attach()  # objects answer before the name is visible
        self.tree.listeners.append(status)
        # before the name too: whoever sees org.damond1 sees the file applied
        status.config_problem = self.apply_config()
        try:
            await _own_name(bus)
        except Fatal:
            await self.shutdown("not serving: the name is not ours")
            raise
        log.info("serving %s on %s (pid %d)", BUS_NAME, spec, os.getpid())
        warning = kernel_damon.interference_warning()
        if warning:
            log.warning("%s", warning)
        service.notify("READY=1")  # the file applied, the name owned, the tree exported
        status.update()

        interval = service.watchdog_interval()
        pinger = asyncio.ensure_future(service.watchdog(interval)) if interval else None
        if _faults_asked():
            from damond import faults  # test support, loaded only when asked

            faults.install_stall(loop)
        stopped = asyncio.ensure_future(stop.wait())
        disconnected = asyncio.ensure_future(bus.wait_for_disconnect())
        await asyncio.wait([stopped, disconnected], return_when=asyncio.FIRST_COMPLETED)
        service.notify("STOPPING=1")
        if pinger is not None:
            pinger.cancel()
        if disconnected.done():
            stopped.cancel()
            error = disconnected.exception() if not disconnected.cancelled() else None
            await self.shutdown("lost the bus connection")
            raise Fatal(f"lost the connection to the bus{f': {error}' if error else ''}")
        disconnected.cancel()
        log.info("stopping on signal")
        await self.shutdown("daemon stopping")
        adapter.detach()
        bus.disconnect()
        return 0


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
    if args.config is not None and not args.config.exists():
        print(f"damond: --config {args.config}: no such file", file=sys.stderr)
        return 1
    daemon = Daemon(config=args.config)
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
