"""D-Bus activation with packaging/org.damond1.service: the first call starts damond.

A private dbus-daemon reads a test-local copy of the activation file whose Exec
line runs this checkout's damond on that private bus instead of the system bus.
A bus started by start_private_bus has no launch helper and no systemd, so it
runs Exec itself (as a system bus without systemd would).
"""

from __future__ import annotations

import os
import select
import shlex
import signal
import subprocess
from pathlib import Path

from damond.tools.privatebus import PrivateBus, start_private_bus

REPO = Path(__file__).resolve().parent.parent
ACTIVATION = REPO / "packaging" / "org.damond1.service"
DAMOND = REPO / ".venv" / "bin" / "damond"
INSTALLED_EXEC = "/usr/local/bin/damond --bus system"
TIMEOUT_S = 30


def busctl(bus: PrivateBus, *args: str) -> str:
    result = subprocess.run(
        ["busctl", f"--address={bus_address(bus)}", f"--timeout={TIMEOUT_S}", *args],
        capture_output=True,
        text=True,
        timeout=TIMEOUT_S + 10,
    )
    assert result.returncode == 0, f"busctl {args}: {result.stderr}\nbus log:\n{bus_log(bus)}"
    return result.stdout.strip()


def bus_address(bus: PrivateBus) -> str:
    return f"unix:path={bus.directory}/bus"


def bus_log(bus: PrivateBus) -> str:
    """dbus-daemon's stderr, which is also where the activated daemon's stderr goes."""
    path = bus.directory / "bus.log"
    return path.read_text(errors="replace") if path.exists() else ""


def bus_call(bus: PrivateBus, member: str, *args: str) -> str:
    return busctl(
        bus, "call", "org.freedesktop.DBus", "/org/freedesktop/DBus", "org.freedesktop.DBus",
        member, *args,
    )  # fmt: skip


def activation_file(bus: PrivateBus, status: Path, log: Path) -> str:
    """packaging/org.damond1.service with only Exec changed: this checkout's damond
    on the private bus, under a shell that records its stderr and exit status (the
    daemon is the bus's child, not ours, so we cannot wait for its status)."""
    text = ACTIVATION.read_text()
    assert f"Exec={INSTALLED_EXEC}\n" in text
    command = f"{DAMOND} --bus {bus_address(bus)} --log-level debug 2>>{log}"
    wrapped = f"/bin/sh -c {shlex.quote(f'{command}; echo $? > {status}')}"
    return text.replace(f"Exec={INSTALLED_EXEC}\n", f"Exec={wrapped}\n")


def wait_exit(pid: int, timeout: float) -> None:
    """Return once process pid (not our child) has exited."""
    fd = os.pidfd_open(pid)
    try:
        ready, _, _ = select.select([fd], [], [], timeout)
        assert ready, f"process {pid} still running after {timeout} s"
    finally:
        os.close(fd)


def parent_pid(pid: int) -> int:
    stat = Path(f"/proc/{pid}/stat").read_text()
    return int(stat.rsplit(")", 1)[1].split()[1])


def test_first_call_activates_damond_which_exits_0_on_sigterm(tmp_path: Path) -> None:
    assert DAMOND.exists(), f"{DAMOND} missing: run make venv"
    services = tmp_path / "services"
    services.mkdir()
    status = tmp_path / "exit-status"
    log = tmp_path / "damond.log"
    with start_private_bus(service_dirs=[services]) as bus:
        assert bus.address.startswith(bus_address(bus) + ","), bus.address
        # The bus rescans its service directories when asked for a name it does
        # not know, so the file can be written once the address is known.
        (services / "org.damond1.service").write_text(activation_file(bus, status, log))
        assert bus_call(bus, "NameHasOwner", "s", "org.damond1") == "b false"

        # The first call starts the daemon and is answered by it.
        got = busctl(
            bus, "get-property", "org.damond1", "/org/damond1", "org.damond1.Kdamonds", "nr"
        )
        assert got == "u 0", log.read_text()
        assert "org.damond1" in bus_call(bus, "ListActivatableNames")
        kind, pid_text = bus_call(bus, "GetConnectionUnixProcessID", "s", "org.damond1").split()
        assert kind == "u"
        pid = int(pid_text)
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
        assert str(DAMOND).encode() in cmdline[1], cmdline  # python's argv[1]: the script
        assert bus_address(bus).encode() in cmdline
        shell = parent_pid(pid)

        # Later calls go to the same daemon.
        busctl(bus, "get-property", "org.damond1", "/org/damond1", "org.damond1.Kdamonds", "nr")
        assert bus_call(bus, "GetConnectionUnixProcessID", "s", "org.damond1") == f"u {pid}"

        os.kill(pid, signal.SIGTERM)
        wait_exit(pid, TIMEOUT_S)
        wait_exit(shell, TIMEOUT_S)
        assert status.read_text().strip() == "0", log.read_text()
        assert bus_call(bus, "NameHasOwner", "s", "org.damond1") == "b false"
    assert "Traceback" not in log.read_text(), log.read_text()
