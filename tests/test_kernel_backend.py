"""The kernel backend on the development host: never available to the tests, never written.

The host's /sys/kernel/mm/damon belongs to the machine (a kdamond of the
machine's runs there). Two fences keep damond's tests off it, and both are
checked here: every daemon the suite starts looks for the admin tree at a path
that does not exist (conftest.py), and a daemon pointed at the real tree finds
it in use and refuses it by the claim rule, having opened none of its files
for writing (an audit hook in the daemon's own process sees every open, and
would refuse a write). The kernel backend itself runs in the test guest:
tests/vm/test_guest_kernel_backend.py.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from conftest import (
    ADMIN_ENV,
    BUS_NAME,
    DAEMON_START_TIMEOUT,
    KERNEL_BACKEND,
    KERNEL_DAMON_ADMIN,
    ROOT,
    Damond,
    stop_process,
)
from dbus_fast.aio import MessageBus

from damond.tools.privatebus import PrivateBus, wait_for_name

K0 = f"{ROOT}/kdamonds/0"
C0 = f"{K0}/contexts/0"
NOT_SUPPORTED = "org.damond1.Error.NotSupported"
HOST_DAMON = "/sys/kernel/mm/damon"
HOST_ADMIN = f"{HOST_DAMON}/admin"

pytestmark = pytest.mark.skipif(
    KERNEL_BACKEND, reason="host-side tests: in the guest the kernel backend is the point"
)

AUDITED = r"""
import json, os, sys
WRITE_FLAGS = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_APPEND
GUARDED = ("/sys/kernel/mm/damon", "/sys/kernel/tracing", "/sys/kernel/debug/tracing")
REPORT = sys.argv[1]
seen = {"read": [], "write": []}

def writes(event, args):
    if event == "open":
        path, mode, flags = args
        return isinstance(mode, str) and any(c in mode for c in "wax+") or (
            isinstance(flags, int) and flags & WRITE_FLAGS)
    return event in ("os.mkdir", "os.rmdir", "os.remove", "os.rename", "os.replace")

def hook(event, args):
    if event not in ("open", "os.mkdir", "os.rmdir", "os.remove", "os.rename", "os.replace"):
        return
    path = args[0]
    if isinstance(path, int) or path is None:
        return
    path = os.fsdecode(path)
    if not path.startswith(GUARDED):
        return
    kind = "write" if writes(event, args) else "read"
    seen[kind].append(path)
    with open(REPORT, "w") as f:
        json.dump(seen, f)
    if kind == "write":
        raise PermissionError(f"audit hook: no write under {path} from a test")

sys.addaudithook(hook)
from damond.cli import main
sys.exit(main(sys.argv[2:]))
"""


def test_every_daemon_of_the_suite_looks_for_the_admin_tree_nowhere() -> None:
    assert os.environ[ADMIN_ENV] == KERNEL_DAMON_ADMIN
    assert not os.path.exists(KERNEL_DAMON_ADMIN)
    from damond import cli

    assert cli.default_admin() == KERNEL_DAMON_ADMIN  # what a daemon started now would use


async def test_a_test_daemon_offers_no_kernel_backend_and_says_why(damond: Damond) -> None:
    await damond.set(ROOT, "org.damond1.Kdamonds", "nr", "u", 1)
    await damond.set(K0, "org.damond1.Contexts", "nr", "u", 1)
    assert await damond.get(C0, "org.damond1.Context", "avail_backends") == ["user"]
    reply = await damond.try_set(C0, "org.damond1.Context", "backend", "s", "kernel")
    assert reply.error_name == NOT_SUPPORTED, reply.body
    assert f"no kernel DAMON sysfs at {KERNEL_DAMON_ADMIN}" in reply.body[0], reply.body
    assert await damond.get(C0, "org.damond1.Context", "backend") == "auto"


def host_admin_in_use() -> int | None:
    """The host's nr_kdamonds (read only); None without a DAMON sysfs."""
    try:
        with open(f"{HOST_ADMIN}/kdamonds/nr_kdamonds") as f:
            return int(f.read())
    except FileNotFoundError:
        return None


async def test_a_daemon_given_the_hosts_admin_tree_refuses_it_and_writes_nothing(
    private_bus: PrivateBus, tmp_path: Path, sleeper: subprocess.Popen[bytes]
) -> None:
    nr = host_admin_in_use()
    if nr == 0:
        pytest.skip(
            "this host's kernel DAMON admin tree is free (nr_kdamonds 0): a daemon may claim "
            "it, so there is no 'in use' refusal to show here (the guest tests the claim)"
        )
    report, log = tmp_path / "opens.json", tmp_path / "damond.log"
    run_dir = tmp_path / "run"
    argv = ["--bus", private_bus.address, "--kernel-damon-admin", HOST_ADMIN]
    argv += ["--run-dir", str(run_dir), "--log-level", "debug"]
    with open(log, "wb") as err:
        process = subprocess.Popen(
            [sys.executable, "-c", AUDITED, str(report), *argv],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=err,
        )
    client = await MessageBus(bus_address=private_bus.address).connect()
    try:
        await wait_for_name(client, BUS_NAME, DAEMON_START_TIMEOUT)
        d = Damond(private_bus, process, client, str(log))
        await d.set(ROOT, "org.damond1.Kdamonds", "nr", "u", 1)
        await d.set(K0, "org.damond1.Contexts", "nr", "u", 1)
        assert "kernel" not in await d.get(C0, "org.damond1.Context", "avail_backends")
        reply = await d.try_set(C0, "org.damond1.Context", "backend", "s", "kernel")
        assert reply.error_name == NOT_SUPPORTED, reply.body
        why = reply.body[0]
        if nr is None:
            assert f"no kernel DAMON sysfs at {HOST_ADMIN}" in why, why
        else:
            assert f"kernel DAMON sysfs in use: kdamonds/nr_kdamonds is {nr}" in why, why
        # auto falls back to damond's own engine, which monitors as ever
        await d.set(C0, "org.damond1.Targets", "nr", "u", 1)
        await d.set(f"{C0}/targets/0", "org.damond1.Target", "pid", "i", sleeper.pid)
        await d.set(K0, "org.damond1.Kdamond", "state", "s", "on")
        assert await d.get(C0, "org.damond1.Context", "effective_backend") == "user"
        await d.set(K0, "org.damond1.Kdamond", "state", "s", "off")
    finally:
        code = stop_process(process)
        client.disconnect()
    text = log.read_text()
    assert code == 0 and "Traceback" not in text, text
    seen: dict[str, Any] = json.loads(report.read_text()) if report.exists() else {}
    assert not seen.get("write"), f"the daemon tried to write {seen['write']}"
    if nr is not None:  # it looked (that is how it knew), and only looked
        assert f"{HOST_ADMIN}/kdamonds/nr_kdamonds" in seen.get("read", []), seen
    assert not run_dir.exists(), "a claim was recorded for a tree in use"
    assert "kernel backend unavailable" in text, text
