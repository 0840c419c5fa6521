"""Fixtures: a real private dbus-daemon, the real damond on it, real clients.

Which backend the D-Bus tests run on: DAMOND_TEST_BACKEND (default auto).
On the host that is always damond's own engine: every daemon the tests start
(the fixtures', activated ones, installed ones) sees the kernel backend's
admin tree at KERNEL_DAMON_ADMIN, which does not exist, through
DAMOND_KERNEL_DAMON_ADMIN set here for the whole session; the host's
/sys/kernel/mm/damon belongs to the machine. Only inside the test guest, with
DAMOND_TEST_BACKEND=kernel, do the daemons get the guest kernel's real tree
(tests/vm/test_guest_kernel_backend.py runs the D-Bus suite there that way).
"""

from __future__ import annotations

import asyncio
import contextlib
import grp
import os
import platform
import socket
import subprocess
import sys
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from dbus_fast import Message, MessageType, Variant
from dbus_fast.aio import MessageBus

from damond.tools.client import call_message as call
from damond.tools.privatebus import PrivateBus, spawn_daemon, start_private_bus, wait_for_name

BUS_NAME = "org.damond1"
ROOT = "/org/damond1"
MEASURED = frozenset({"effective_sample_us", "effective_aggr_us"})
"""Context properties that change with every aggregation of a running kdamond (the
intervals it really had), as a Snapshot does."""
DAEMON_START_TIMEOUT = float(os.environ.get("DAMOND_TEST_START_TIMEOUT", "15"))
"""Seconds for a daemon to own its name (the test guest, under TCG, needs more)."""

ADMIN_ENV = "DAMOND_KERNEL_DAMON_ADMIN"  # damond.cli.ADMIN_ENV: the daemon's default
KERNEL_DAMON_ADMIN = "/nonexistent/damond-tests/kernel-damon-admin"
"""Where host-side daemons look for the kernel's admin tree: nowhere."""
GUEST_KERNEL_DAMON_ADMIN = "/sys/kernel/mm/damon/admin"
TEST_BACKEND = os.environ.get("DAMOND_TEST_BACKEND", "auto")
"""The backend the D-Bus tests ask their contexts for: auto (the user backend, on the
host), or kernel (in the test guest only)."""


def in_test_guest() -> bool:
    """True only in the damond test VM (tests/vm/run.py sets both)."""
    return os.environ.get("DAMOND_IN_VM") == "1" and platform.node() == "damond-vm"


KERNEL_BACKEND = TEST_BACKEND == "kernel"
if KERNEL_BACKEND and not in_test_guest():
    raise pytest.UsageError(
        "DAMOND_TEST_BACKEND=kernel runs the kernel's own DAMON: only in the test guest "
        "(tests/vm/test_guest_kernel_backend.py), never on a host, whose DAMON is the "
        "machine's"
    )
os.environ[ADMIN_ENV] = GUEST_KERNEL_DAMON_ADMIN if KERNEL_BACKEND else KERNEL_DAMON_ADMIN

REPO = Path(__file__).resolve().parent.parent
POLICY = REPO / "packaging" / "dbus-policy.conf"
RAWBUS = Path(__file__).with_name("rawbus.py")
"""The stdlib-only client that plays other users (subscribers, forgers, attackers)."""
SYSTEM_PYTHON = "/usr/bin/python3"
"""pyenv's python lives under /root, out of nobody's reach; Debian's is everyone's."""
NOBODY = ["setpriv", "--reuid=nobody", "--regid=nogroup", "--clear-groups"]
MEMBER = ["setpriv", "--reuid=nobody", "--regid=nogroup", "--groups=damond"]
"""`nobody`, and `nobody` as a member of the group damond."""


@pytest.fixture(scope="session")
def damond_group() -> None:
    """The group the policy names; `make install` creates it the same way."""
    try:
        grp.getgrnam("damond")
    except KeyError:
        subprocess.run(["groupadd", "--system", "damond"], check=True)


@pytest.fixture
def private_bus() -> Iterator[PrivateBus]:
    with start_private_bus() as bus:
        yield bus


@pytest.fixture
def policy_bus() -> Iterator[PrivateBus]:
    """A bus configured like the system bus, with the project's policy file itself."""
    with start_private_bus(policy_files=[POLICY]) as bus:
        yield bus


class SignalQueue:
    """Signals matching a rule, delivered to a queue as they arrive."""

    def __init__(self, client: MessageBus, rule: dict[str, str]) -> None:
        self.client = client
        self.rule = rule
        self.queue: asyncio.Queue[Message] = asyncio.Queue()

    def _match(self, msg: Message) -> bool:
        if msg.message_type is not MessageType.SIGNAL:
            return False
        fields = {"path": msg.path, "interface": msg.interface, "member": msg.member}
        return all(fields.get(k) == v for k, v in self.rule.items() if k in fields)

    def _handler(self, msg: Message) -> None:
        if self._match(msg):
            self.queue.put_nowait(msg)

    def _match_rule(self) -> str:
        return ",".join(f"{k}='{v}'" for k, v in {"type": "signal", **self.rule}.items())

    async def start(self) -> SignalQueue:
        await call(
            self.client,
            "/org/freedesktop/DBus",
            "org.freedesktop.DBus",
            "AddMatch",
            "s",
            [self._match_rule()],
            destination="org.freedesktop.DBus",
        )
        self.client.add_message_handler(self._handler)
        return self

    async def stop(self) -> None:
        self.client.remove_message_handler(self._handler)
        await call(
            self.client,
            "/org/freedesktop/DBus",
            "org.freedesktop.DBus",
            "RemoveMatch",
            "s",
            [self._match_rule()],
            destination="org.freedesktop.DBus",
        )

    async def next(self, timeout: float = 5.0) -> Message:
        return await asyncio.wait_for(self.queue.get(), timeout)

    def drain(self) -> list[Message]:
        items = []
        while not self.queue.empty():
            items.append(self.queue.get_nowait())
        return items


@dataclass
class Damond:
    """The real daemon as a subprocess, and a dbus-fast client on the same bus."""

    bus: PrivateBus
    process: subprocess.Popen[bytes]
    client: MessageBus
    stderr_path: str
    queues: list[SignalQueue] = field(default_factory=list)

    @property
    def address(self) -> str:
        return self.bus.address

    def stderr(self) -> str:
        with open(self.stderr_path, errors="replace") as f:
            return f.read()

    async def get(self, path: str, interface: str, name: str) -> Any:
        reply = await call(
            self.client, path, "org.freedesktop.DBus.Properties", "Get", "ss", [interface, name]
        )
        assert reply.message_type is MessageType.METHOD_RETURN, reply.body
        return reply.body[0].value

    async def try_set(self, path: str, interface: str, name: str, sig: str, value: Any) -> Message:
        return await call(
            self.client,
            path,
            "org.freedesktop.DBus.Properties",
            "Set",
            "ssv",
            [interface, name, Variant(sig, value)],
        )

    async def set(self, path: str, interface: str, name: str, sig: str, value: Any) -> None:
        reply = await self.try_set(path, interface, name, sig, value)
        assert reply.message_type is MessageType.METHOD_RETURN, (
            f"Set {path} {interface}.{name}={value!r}: {reply.error_name} {reply.body}"
        )

    async def signals(self, **rule: str) -> SignalQueue:
        queue = await SignalQueue(self.client, rule).start()
        self.queues.append(queue)
        return queue

    async def managed_objects(self, measured: bool = False) -> dict[str, Any]:
        """Every object's properties; without the MEASURED ones unless asked, so that
        "nothing changed" compares what requests change, not a running kdamond's clock."""
        reply = await call(
            self.client, ROOT, "org.freedesktop.DBus.ObjectManager", "GetManagedObjects"
        )
        assert reply.message_type is MessageType.METHOD_RETURN, reply.body
        return {
            path: {
                i: {k: v.value for k, v in props.items() if measured or k not in MEASURED}
                for i, props in ifaces.items()
            }
            for path, ifaces in reply.body[0].items()
        }

    def busctl(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            ["busctl", f"--address={self.address}", *args],
            capture_output=True,
            text=True,
            check=check,
            timeout=30,
        )


async def start_damond(
    bus: PrivateBus,
    client: MessageBus,
    tmp_path: Any,
    env: dict[str, str] | None = None,
    args: tuple[str, ...] = (),
    wrapper: tuple[str, ...] = (),
) -> Damond:
    """Start the daemon (with more command-line args) and wait for its name to appear."""
    log_path = tmp_path / "damond.log"
    process = spawn_daemon(
        bus.address, log_path, "--log-level", "debug", *args, env=env, wrapper=wrapper
    )
    daemon = Damond(bus, process, client, str(log_path))
    try:
        await wait_for_name(client, BUS_NAME, DAEMON_START_TIMEOUT)
    except TimeoutError:
        process.kill()
        raise AssertionError(f"damond did not own {BUS_NAME}:\n{daemon.stderr()}") from None
    return daemon


def stop_process(process: subprocess.Popen[Any], timeout: float = 10.0) -> int:
    if process.poll() is None:
        process.terminate()
        try:
            process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
    return process.returncode


@pytest.fixture
async def damond(private_bus: PrivateBus, tmp_path: Any) -> AsyncIterator[Damond]:
    client = await MessageBus(bus_address=private_bus.address).connect()
    daemon = await start_damond(private_bus, client, tmp_path)
    try:
        yield daemon
    finally:
        code = stop_process(daemon.process)
        client.disconnect()
        log = daemon.stderr()
        assert "Traceback" not in log, log
        assert code == 0, f"damond exited {code}:\n{log}"
        if KERNEL_BACKEND:  # a clean exit gives the kernel's admin tree back
            assert kernel_tree_state()[0] == 0, (kernel_tree_state(), log)


def kernel_tree_state() -> tuple[int, dict[str, str]]:
    """The kernel's admin tree as the kernel backend tests see it: nr_kdamonds and every
    file of every kdamond (state, pid, its context's staged values)."""
    kdamonds = f"{os.environ[ADMIN_ENV]}/kdamonds"
    with open(f"{kdamonds}/nr_kdamonds") as f:
        nr = int(f.read())
    files = {}
    for k in range(nr):
        for directory, _, names in os.walk(f"{kdamonds}/{k}"):
            for name in names:
                path = f"{directory}/{name}"
                with open(path) as f:
                    files[path.removeprefix(kdamonds + "/")] = f.read().strip()
    return nr, files


def is_kdamond_pid(d: Damond, pid: int) -> bool:
    """pid is who samples for the test's backend: the daemon, or a kernel kdamond thread."""
    if not KERNEL_BACKEND:
        return pid == d.process.pid
    try:
        with open(f"/proc/{pid}/comm") as f:
            return f.read().startswith("kdamond.")
    except OSError:
        return False


def start_workload(
    hot_mib: float, cold_mib: float
) -> tuple[subprocess.Popen[bytes], dict[str, Any]]:
    """The demo workload with buffers of these sizes; it has announced them on return."""
    import json

    process = subprocess.Popen(
        [sys.executable, "-m", "damond.tools.workload", "--hot-mib", str(hot_mib),
         "--cold-mib", str(cold_mib)],
        stdout=subprocess.PIPE,
    )  # fmt: skip
    assert process.stdout is not None
    return process, json.loads(process.stdout.readline())


@pytest.fixture
def sleeper() -> Iterator[subprocess.Popen[bytes]]:
    """A real, idle process to monitor."""
    process = subprocess.Popen(["sleep", "600"])
    yield process
    stop_process(process)


@pytest.fixture
def workload() -> Iterator[tuple[subprocess.Popen[bytes], dict[str, Any]]]:
    """The demo workload: a hot and a cold buffer in one real process."""
    process, info = start_workload(4, 16)
    yield process, info
    stop_process(process)


class NotifySocket:
    """What systemd would receive: (monotonic arrival time, message) pairs."""

    def __init__(self, path: str) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(path)
        self.sock.setblocking(False)
        self.path = path

    async def next(self, timeout: float = 10.0) -> tuple[float, str]:
        loop = asyncio.get_running_loop()
        data = await asyncio.wait_for(loop.sock_recv(self.sock, 4096), timeout)
        return loop.time(), data.decode()

    async def until(self, predicate: Any, timeout: float = 10.0) -> tuple[float, str]:
        while True:
            arrived, message = await self.next(timeout)
            if predicate(message):
                return arrived, message


@contextlib.asynccontextmanager
async def notified_damond(
    bus: PrivateBus, tmp_path: Any, watchdog_usec: int, **env: str
) -> AsyncIterator[tuple[Damond, NotifySocket]]:
    """The daemon with a NOTIFY_SOCKET (what systemd would receive) and WATCHDOG_USEC;
    yields it and the socket, stops it after (the caller checks its exit if it cares)."""
    notify = NotifySocket(str(tmp_path / "notify"))
    client = await MessageBus(bus_address=bus.address).connect()
    env = {"NOTIFY_SOCKET": notify.path, "WATCHDOG_USEC": str(watchdog_usec), **env}
    daemon = await start_damond(bus, client, tmp_path, env=env)
    try:
        yield daemon, notify
    finally:
        stop_process(daemon.process)
        client.disconnect()
        notify.sock.close()


def rawbus_as(user: list[str], *args: str) -> subprocess.Popen[str]:
    """tests/rawbus.py run as user (a setpriv prefix; [] for root), with text pipes."""
    return subprocess.Popen(
        [*user, SYSTEM_PYTHON, str(RAWBUS), *args],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )


def daemon_rss(daemon: Damond) -> int:
    import psutil

    return int(psutil.Process(daemon.process.pid).memory_info().rss)
