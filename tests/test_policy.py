"""The access policy (docs/operations.md), enforced by a real dbus-daemon with its file.

The bus is configured like the system bus (deny by default, no root
exception) and includes the project's policy file itself, not a copy. Other
users are played by `setpriv`: `nobody`, and `nobody` with the group damond.
"""

from __future__ import annotations

import grp
import json
import subprocess
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest
from conftest import ROOT, Damond, start_damond, stop_process
from dbus_fast.aio import MessageBus

from damond.tools.privatebus import PrivateBus, start_private_bus

REPO = Path(__file__).resolve().parent.parent
POLICY = REPO / "packaging" / "dbus-policy.conf"
K0 = f"{ROOT}/kdamonds/0"
C0 = f"{K0}/contexts/0"
T0 = f"{C0}/targets/0"
DENIED = "org.freedesktop.DBus.Error.AccessDenied"
RAWBUS = Path(__file__).with_name("rawbus.py")
# pyenv's python lives under /root, out of nobody's reach; Debian's is everyone's
SYSTEM_PYTHON = "/usr/bin/python3"
NOBODY = ["setpriv", "--reuid=nobody", "--regid=nogroup", "--clear-groups"]
MEMBER = ["setpriv", "--reuid=nobody", "--regid=nogroup", "--groups=damond"]


@pytest.fixture(scope="module", autouse=True)
def damond_group() -> None:
    """The group the policy names; `make install` creates it the same way."""
    try:
        grp.getgrnam("damond")
    except KeyError:
        subprocess.run(["groupadd", "--system", "damond"], check=True)


@pytest.fixture
def policy_bus() -> Iterator[PrivateBus]:
    with start_private_bus(policy_files=[POLICY]) as bus:
        yield bus


@pytest.fixture
async def served(policy_bus: PrivateBus, tmp_path: Any) -> AsyncIterator[Damond]:
    """damond on the strict bus, kdamond 0 on and monitoring a sleep process."""
    client = await MessageBus(bus_address=policy_bus.address).connect()
    daemon = await start_damond(policy_bus, client, tmp_path)
    target = subprocess.Popen(["sleep", "600"])
    try:
        await daemon.set(ROOT, "org.damond1.Kdamonds", "nr", "u", 1)
        await daemon.set(K0, "org.damond1.Contexts", "nr", "u", 1)
        await daemon.set(C0, "org.damond1.Targets", "nr", "u", 1)
        await daemon.set(T0, "org.damond1.Target", "pid", "i", target.pid)
        await daemon.set(C0, "org.damond1.Intervals", "aggr_us", "t", 20000)
        await daemon.set(C0, "org.damond1.Schemes", "nr", "u", 1)  # stat: it tries every region
        snapshots = await daemon.signals(path=C0, member="Snapshot")
        await daemon.set(K0, "org.damond1.Kdamond", "state", "s", "on")
        await snapshots.next(timeout=10)  # GetSnapshot and GetTriedRegions have data from here on
        await snapshots.stop()
        yield daemon
    finally:
        stop_process(target)
        assert stop_process(daemon.process) == 0, daemon.stderr()
        client.disconnect()


def as_user(user: list[str], d: Damond, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*user, "busctl", f"--address={d.address}", *args],
        capture_output=True,
        text=True,
        timeout=30,
    )


def denied(out: subprocess.CompletedProcess[str]) -> bool:
    return out.returncode != 0 and "Access denied" in out.stderr


GET = ["get-property", "org.damond1", K0, "org.damond1.Kdamond", "state"]
SET = ["set-property", "org.damond1", C0, "org.damond1.Intervals", "aggr_us", "t", "50000"]
STATE_OFF = ["set-property", "org.damond1", K0, "org.damond1.Kdamond", "state", "s", "off"]
SNAPSHOT = ["call", "org.damond1", C0, "org.damond1.Context", "GetSnapshot"]
MANAGED = ["call", "org.damond1", ROOT, "org.freedesktop.DBus.ObjectManager", "GetManagedObjects"]
INTROSPECT = ["introspect", "org.damond1", C0]
TRIED = ["call", "org.damond1", f"{C0}/schemes/0", "org.damond1.Scheme", "GetTriedRegions"]


async def snapshots_received(user: list[str], d: Damond, snapshots: int = 10) -> int:
    """How many Snapshot signals a subscriber running as user gets while root gets `snapshots`."""
    subscriber = subprocess.Popen(
        [*user, SYSTEM_PYTHON, str(RAWBUS), "subscribe", d.address, "1", "0"],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert subscriber.stdout is not None
        assert subscriber.stdout.readline() == "ready\n"
        root_queue = await d.signals(path=C0, interface="org.damond1.Context", member="Snapshot")
        for _ in range(snapshots):
            await root_queue.next(timeout=10)
        await root_queue.stop()
        out, _ = subscriber.communicate("", timeout=30)
        return int(json.loads(out)[0])
    finally:
        stop_process(subscriber)


async def test_root_may_do_everything(served: Damond) -> None:
    assert served.busctl(*GET).stdout.strip() == 's "on"'
    assert served.busctl(*SNAPSHOT).returncode == 0
    assert served.busctl(*TRIED).returncode == 0
    assert served.busctl(*MANAGED).returncode == 0
    assert served.busctl(*SET).returncode == 0
    assert (
        served.busctl(
            "set-property", "org.damond1", K0, "org.damond1.Kdamond", "state", "s", "commit"
        ).returncode
        == 0
    )
    assert await snapshots_received([], served) > 0


async def test_everyone_else_reads_properties_only(served: Damond) -> None:
    assert as_user(NOBODY, served, *GET).stdout.strip() == 's "on"'
    assert as_user(NOBODY, served, *INTROSPECT).returncode == 0
    for call in (SET, STATE_OFF, SNAPSHOT, TRIED, MANAGED):
        out = as_user(NOBODY, served, *call)
        assert denied(out), (call, out.returncode, out.stderr)
    assert served.busctl(*GET).stdout.strip() == 's "on"'  # the denied `off` did nothing
    assert await served.get(C0, "org.damond1.Intervals", "aggr_us") == 20000
    assert await snapshots_received(NOBODY, served) == 0


async def test_group_damond_reads_and_watches(served: Damond) -> None:
    assert as_user(MEMBER, served, *GET).stdout.strip() == 's "on"'
    snapshot = as_user(MEMBER, served, *SNAPSHOT)
    assert snapshot.returncode == 0 and snapshot.stdout.startswith("ttua(uia(ttuu))"), snapshot
    tried = as_user(MEMBER, served, *TRIED)
    assert tried.returncode == 0 and tried.stdout.startswith("a(uttuu)"), tried
    assert as_user(MEMBER, served, *MANAGED).returncode == 0
    for call in (SET, STATE_OFF):
        out = as_user(MEMBER, served, *call)
        assert denied(out), (call, out.returncode, out.stderr)
    assert await snapshots_received(MEMBER, served) > 0


def test_only_root_may_own_the_name(policy_bus: PrivateBus) -> None:
    def own(user: list[str]) -> str:
        out = subprocess.run(
            [*user, SYSTEM_PYTHON, str(RAWBUS), "own", policy_bus.address, "org.damond1"],
            capture_output=True,
            text=True,
            timeout=30,
        )
        return out.stdout.strip()

    assert own(NOBODY) == DENIED
    assert own(MEMBER) == DENIED
    assert own([]) == "granted"
