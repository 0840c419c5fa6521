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
from importlib import metadata
from pathlib import Path
from typing import Any

from dbus_fast import BusType, DBusError, RequestNameReply
from dbus_fast.aio import MessageBus

from damond import configfile, service
from damond.bus import BUS_NAME, NAMES, ROOT_PATH, BusAdapter, Name, own_name
from damond.hierarchy import Tree
from damond.monitor import backends, ops
from damond.monitor.backends import Backends, Monitor
from damond.monitor.config import ContextConfig
from damond.monitor.kdamond import KdamondTask, OpsWrapper
from damond.monitor.kernel import OFF, KernelDamon
from damond.monitor.ops import damon_claim, damon_sysfs, damon_trace
from damond.monitor.snapshot import Snapshot

log = logging.getLogger("damond")

SHUTDOWN_GRACE_S = 5.0
ADMIN_ENV = "DAMOND_KERNEL_DAMON_ADMIN"
"""The default of --kernel-damon-admin where set (the test suite points it nowhere)."""


class Fatal(Exception):
    """A reason to exit 1, said in one line."""


def host_support(
    registry: ops.Registry = ops.REGISTRY, kernel: KernelDamon | None = None
) -> str:
    """What this host offers (for --help): each backend, access check and operations set
    (of damond's own engine), and why not where it cannot run (the probes behind
    avail_backends, avail_access_checks and avail_operations; nothing is written, the
    kernel's admin tree is not claimed)."""
    kernel = kernel if kernel is not None else KernelDamon(default_admin())
    table = Backends([backends.kernel_backend(kernel), backends.user_backend(registry)])
    lines = ["On this host (as this user):"]
    for name in table.names:
        reason = table.get(name).probe()
        lines.append(f"  backend {name}: {f'no ({reason})' if reason else 'available'}")
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


def default_admin() -> str:
    return os.environ.get(ADMIN_ENV) or damon_sysfs.ADMIN


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
        "--kernel-damon-admin",
        default=default_admin(),
        metavar="DIR|off",
        help="the kernel DAMON sysfs admin tree the kernel backend may claim (default "
        f"{damon_sysfs.ADMIN}, or ${ADMIN_ENV}); off: no kernel backend",
    )
    parser.add_argument(
        "--kernel-damon-pool",
        type=int,
        default=damon_claim.POOL_SIZE,
        metavar="N",
        help="kernel kdamonds to claim at once, the most the kernel backend runs together "
        f"(default {damon_claim.POOL_SIZE})",
    )
    parser.add_argument(
        "--tracefs",
        default=damon_trace.TRACEFS,
        metavar="DIR",
        help=f"where tracefs is mounted (default {damon_trace.TRACEFS})",
    )
    parser.add_argument(
        "--run-dir",
        default=damon_claim.RUN_DIR,
        metavar="DIR",
        help="where the claim of the kernel's admin tree is recorded (default "
        f"{damon_claim.RUN_DIR})",
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


async def _own_name(bus: MessageBus, name: Name) -> None:
    try:
        reply = await own_name(bus, name)
    except DBusError as e:
        raise Fatal(f"not allowed to own {name.name} on this bus: {e.text}") from None
    if reply not in (RequestNameReply.PRIMARY_OWNER, RequestNameReply.ALREADY_OWNER):
        raise Fatal(f"{name.name} is already owned on this bus (is another damond running?)")


class Daemon:
    """The tree, its running kdamonds, the kernel backend and the bus they are served on."""

    def __init__(
        self,
        registry: ops.Registry = ops.REGISTRY,
        config: Path | None = None,
        kernel: KernelDamon | None = None,
    ) -> None:
        self.config = config or configfile.DEFAULT_PATH
        self.config_asked = config is not None
        """--config was given: a missing file is an error, not 'nothing to apply'."""
        self.tasks: set[KdamondTask] = set()
        self.registry = registry
        self.kernel = kernel if kernel is not None else KernelDamon(OFF)
        self.backends = Backends(
            [
                backends.kernel_backend(self.kernel),
                backends.user_backend(registry, self._start_kdamond),
            ]
        )
        self.tree = Tree(self._start_monitor, registry, self.backends)
        self.wrap_ops: OpsWrapper | None = None
        """Set by fault injection only (damond.faults)."""

    def _start_monitor(
        self,
        name: str,
        config: ContextConfig,
        on_snapshot: Callable[[Snapshot], None],
        on_stop: Callable[[str], None],
    ) -> Monitor:
        """The monitor factory of the tree: the resolved backend's."""
        start = self.backends.get(config.backend).start
        assert start is not None
        return start(name, config, on_snapshot, on_stop)

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

    def _say_kernel_backend(self, reason: str) -> None:
        """Log what claiming the kernel's admin tree at start-up gave."""
        if reason:
            log.info("kernel backend unavailable: %s", reason)
        else:
            log.info(
                "kernel backend available: %s claimed (%d kdamonds; operations %s)",
                self.kernel.admin,
                self.kernel.claim.pool_size,
                " ".join(self.kernel.claim.avail_operations),
            )

    async def shutdown(self, reason: str) -> None:
        tasks = list(self.tasks)
        self.tree.stop_all(reason)
        if tasks:
            await asyncio.wait(
                [asyncio.ensure_future(t.wait()) for t in tasks], timeout=SHUTDOWN_GRACE_S
            )
        self.kernel.close()  # the kernel's admin tree back: every kdamond off, nr 0

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
        try:
            return await self._serve(stop, spec, status)
        finally:
            self.kernel.close()  # however serving ended (idempotent after shutdown)

    async def _serve(self, stop: asyncio.Event, spec: str, status: service.ServiceStatus) -> int:
        loop = asyncio.get_running_loop()
        # one connection per name: what one class of peers leaves unread pins only its own
        buses = {name: await _connect(spec) for name in NAMES}
        adapter = BusAdapter(buses, self.tree, lambda: _connect(spec))
        adapter.attach()  # objects answer before the names are visible
        self.tree.listeners.append(status)
        unclaimed = self.kernel.claim_now()  # before the file: its kdamonds may want it
        # before the names too: whoever sees org.damond1 sees the file applied
        status.config_problem = self.apply_config()
        try:
            for name in NAMES:  # org.damond1 last (NAMES says why)
                await _own_name(buses[name], name)
        except Fatal:
            await self.shutdown("not serving: the names are not ours")
            raise
        log.info("serving %s on %s (pid %d)", BUS_NAME, spec, os.getpid())
        self._say_kernel_backend(unclaimed)
        warning = self.tree.interference_warning()
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
    if args.config is not None and not args.config.exists():
        print(f"damond: --config {args.config}: no such file", file=sys.stderr)
        return 1
    fault = None
    if _faults_asked():
        from damond import faults  # test support, loaded only when asked

        fault = faults.sysfs_write_fault
    kernel = KernelDamon(
        args.kernel_damon_admin, args.tracefs, args.run_dir, args.kernel_damon_pool, fault
    )
    daemon = Daemon(config=args.config, kernel=kernel)
    if _faults_asked():
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
