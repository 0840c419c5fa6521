"""A private dbus-daemon for demos, tests and benchmarks, and the daemon on it.

The config mirrors the system bus (EXTERNAL auth, deny-by-default policy for
non-root users) so that the project's own policy file can be included and
enforced; with no policy included, root may do everything.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import os
import shutil
import signal
import subprocess
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

from dbus_fast import Message, MessageType
from dbus_fast.aio import MessageBus

from damond.tools import client

PR_SET_PDEATHSIG = 1
ROOT_ALLOWS_ALL = """<policy user="root">
    <allow own="*"/>
    <allow send_type="method_call"/>
  </policy>"""

CONFIG_TEMPLATE = """<!DOCTYPE busconfig PUBLIC
 "-//freedesktop//DTD D-Bus Bus Configuration 1.0//EN"
 "http://www.freedesktop.org/standards/dbus/1.0/busconfig.dtd">
<busconfig>
  <type>system</type>
  <listen>unix:path={socket}</listen>
  <auth>EXTERNAL</auth>
  {servicedirs}
  <policy context="default">
    <allow user="*"/>
    <deny own="*"/>
    <deny send_type="method_call"/>
    <allow send_type="signal"/>
    <allow send_requested_reply="true" send_type="method_return"/>
    <allow send_requested_reply="true" send_type="error"/>
    <allow receive_type="method_call"/>
    <allow receive_type="method_return"/>
    <allow receive_type="error"/>
    <allow receive_type="signal"/>
    <allow send_destination="org.freedesktop.DBus"
           send_interface="org.freedesktop.DBus"/>
    <allow send_destination="org.freedesktop.DBus"
           send_interface="org.freedesktop.DBus.Introspectable"/>
    <allow send_destination="org.freedesktop.DBus"
           send_interface="org.freedesktop.DBus.Properties"/>
  </policy>
  {root_policy}
  {includes}
  <limit name="max_incoming_bytes">133169152</limit>
  <limit name="max_outgoing_bytes">133169152</limit>
  <limit name="max_message_size">33554432</limit>
  <limit name="reply_timeout">30000</limit>
</busconfig>
"""


@dataclass
class PrivateBus:
    """A running dbus-daemon; ``address`` is what clients connect to."""

    address: str
    directory: Path
    process: subprocess.Popen[bytes]
    _closed: bool = field(default=False, repr=False)

    def stop(self) -> None:
        """Terminate the bus daemon and remove its directory (idempotent)."""
        if self._closed:
            return
        self._closed = True
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=5)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        shutil.rmtree(self.directory, ignore_errors=True)

    def __enter__(self) -> PrivateBus:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def die_with_parent() -> None:
    """For preexec_fn: the child gets SIGTERM when the process that started it dies,
    so a killed demo or test run leaves no bus or daemon behind."""
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL(None).prctl(PR_SET_PDEATHSIG, signal.SIGTERM)


def start_private_bus(
    policy_files: list[Path] | None = None, service_dirs: list[Path] | None = None
) -> PrivateBus:
    """Start a dbus-daemon on a socket in a fresh directory and wait until it listens."""
    daemon = shutil.which("dbus-daemon")
    if daemon is None:
        raise RuntimeError("dbus-daemon not found: install the Debian package 'dbus'")
    directory = Path(tempfile.mkdtemp(prefix="damond-bus-"))
    os.chmod(directory, 0o755)  # unprivileged test clients must reach the socket
    socket_path = directory / "bus"
    includes = "\n  ".join(f"<include>{p}</include>" for p in policy_files or [])
    # Without a service policy, root may do anything (tests of the API itself);
    # with one, the bus is as strict as the system bus and the policy decides.
    root_policy = "" if policy_files else ROOT_ALLOWS_ALL
    servicedirs = "\n  ".join(f"<servicedir>{d}</servicedir>" for d in service_dirs or [])
    config = directory / "bus.conf"
    config.write_text(
        CONFIG_TEMPLATE.format(
            socket=socket_path,
            includes=includes,
            servicedirs=servicedirs,
            root_policy=root_policy,
        )
    )
    process = subprocess.Popen(
        [daemon, f"--config-file={config}", "--nofork", "--print-address"],
        stdout=subprocess.PIPE,
        stdin=subprocess.DEVNULL,
        stderr=(directory / "bus.log").open("wb"),
        preexec_fn=die_with_parent,
    )
    assert process.stdout is not None
    line = process.stdout.readline().decode().strip()  # printed once it listens
    if not line:
        process.wait()
        shutil.rmtree(directory, ignore_errors=True)
        raise RuntimeError(f"dbus-daemon exited with {process.returncode} before listening")
    process.stdout.close()
    return PrivateBus(address=line, directory=directory, process=process)


def spawn_daemon(
    address: str,
    log_path: Path,
    *extra: str,
    env: dict[str, str] | None = None,
    wrapper: tuple[str, ...] = (),
) -> subprocess.Popen[bytes]:
    """Start `python -m damond` on a bus, its stderr going to log_path.

    env adds to (does not replace) this process's environment; wrapper is a
    command that runs it (e.g. setpriv with fewer capabilities).
    """
    with open(log_path, "wb") as log:
        return subprocess.Popen(
            [*wrapper, sys.executable, "-m", "damond", "--bus", address, *extra],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=log,
            env={**os.environ, **(env or {})},
        )


async def wait_for_name(bus: MessageBus, name: str, timeout: float) -> None:
    """Return once name has an owner: NameOwnerChanged is awaited, not polled."""
    owned = asyncio.get_running_loop().create_future()

    def on_message(msg: Message) -> None:
        if (
            msg.message_type is MessageType.SIGNAL
            and msg.member == "NameOwnerChanged"
            and msg.body[0] == name
            and msg.body[2]
            and not owned.done()
        ):
            owned.set_result(None)

    bus.add_message_handler(on_message)
    try:
        await client.add_match(bus, f"type='signal',member='NameOwnerChanged',arg0='{name}'")
        if await client.name_has_owner(bus, name):
            return
        await asyncio.wait_for(owned, timeout)
    finally:
        bus.remove_message_handler(on_message)
