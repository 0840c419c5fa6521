"""Every error rule of docs/dbus-api.md over a real bus; after each, nothing changed.

With DAMOND_TEST_BACKEND=kernel (in the test guest, tests/vm/test_guest_kernel_backend.py)
the contexts ask for the kernel's own DAMON, and "nothing changed" includes the
kernel's admin tree: bad input is refused before anything is written there.
"""

from __future__ import annotations

import subprocess
from collections.abc import Awaitable, Callable
from typing import Any

import pytest
from conftest import (
    KERNEL_BACKEND,
    ROOT,
    TEST_BACKEND,
    Damond,
    call,
    kernel_tree_state,
    start_damond,
    stop_process,
)
from dbus_fast.aio import MessageBus

from damond.tools.privatebus import PrivateBus

K0 = f"{ROOT}/kdamonds/0"
C0 = f"{K0}/contexts/0"
T0 = f"{C0}/targets/0"
INVALID = "org.damond1.Error.InvalidArgument"
BUSY = "org.damond1.Error.Busy"
NOT_SUPPORTED = "org.damond1.Error.NotSupported"


async def configure(d: Damond, pid: int) -> None:
    """The seed's walkthrough, up to (not including) `on`."""
    await d.set(ROOT, "org.damond1.Kdamonds", "nr", "u", 1)
    await d.set(K0, "org.damond1.Contexts", "nr", "u", 1)
    await d.set(C0, "org.damond1.Context", "operations", "s", "vaddr")
    await d.set(C0, "org.damond1.Context", "backend", "s", TEST_BACKEND)
    await d.set(C0, "org.damond1.Targets", "nr", "u", 1)
    await d.set(T0, "org.damond1.Target", "pid", "i", pid)


async def state_of_everything(d: Damond) -> Any:
    kernel = kernel_tree_state() if KERNEL_BACKEND else None
    return (await d.get(ROOT, "org.damond1.Kdamonds", "nr"), await d.managed_objects(), kernel)


async def expect_error(
    d: Damond, action: Callable[[], Awaitable[Any]], error: str, *words: str
) -> None:
    """action fails with error, its message names each word, and nothing changed."""
    before = await state_of_everything(d)
    reply = await action()
    assert reply.error_name == error, (reply.error_name, reply.body)
    text = reply.body[0]
    for word in words:
        assert word in text, (word, text)
    assert "Traceback" not in text
    assert await state_of_everything(d) == before


def set_(d: Damond, path: str, iface: str, name: str, sig: str, value: Any) -> Callable[..., Any]:
    return lambda: d.try_set(path, iface, name, sig, value)


def state(d: Damond, value: str) -> Callable[..., Any]:
    return set_(d, K0, "org.damond1.Kdamond", "state", "s", value)


@pytest.mark.parametrize(
    ("iface", "name", "value", "words"),
    [
        ("org.damond1.NrRegions", "min", 2, ["min", ">= 3", C0]),
        ("org.damond1.NrRegions", "min", 2000, ["min", "max", C0]),
        ("org.damond1.Intervals", "sample_us", 200000, ["sample_us", "aggr_us", C0]),
        ("org.damond1.Intervals", "sample_us", 0, ["sample_us", "> 0"]),
        ("org.damond1.Intervals", "update_us", 0, ["update_us", "> 0"]),
    ],
)
async def test_on_refuses_bad_attributes(
    damond: Damond,
    sleeper: subprocess.Popen[bytes],
    iface: str,
    name: str,
    value: int,
    words: list[str],
) -> None:
    await configure(damond, sleeper.pid)
    await damond.set(C0, iface, name, "t", value)
    await expect_error(damond, state(damond, "on"), INVALID, *words)
    assert await damond.get(K0, "org.damond1.Kdamond", "state") == "off"


async def test_on_refuses_a_cpu_limit_over_one_cpu(
    damond: Damond, sleeper: subprocess.Popen[bytes]
) -> None:
    await configure(damond, sleeper.pid)
    await damond.set(C0, "org.damond1.Context", "cpu_limit_pct", "u", 101)
    await expect_error(damond, state(damond, "on"), INVALID, "cpu_limit_pct", "<= 100", C0)
    assert await damond.get(K0, "org.damond1.Kdamond", "state") == "off"


async def test_on_refuses_missing_and_dead_pids(
    damond: Damond, sleeper: subprocess.Popen[bytes]
) -> None:
    await configure(damond, -1)
    await expect_error(damond, state(damond, "on"), INVALID, T0, "pid -1")
    dead = subprocess.Popen(["true"])
    dead.wait()
    await damond.set(T0, "org.damond1.Target", "pid", "i", dead.pid)
    await expect_error(damond, state(damond, "on"), INVALID, T0, f"pid {dead.pid}")
    # a zombie is not a live process either
    zombie = subprocess.Popen(["true"])
    try:
        import os

        os.waitid(os.P_PID, zombie.pid, os.WEXITED | os.WNOWAIT)
        await damond.set(T0, "org.damond1.Target", "pid", "i", zombie.pid)
        await expect_error(damond, state(damond, "on"), INVALID, T0, f"pid {zombie.pid}")
    finally:
        zombie.wait()


async def test_on_refuses_a_kernel_thread(damond: Damond) -> None:
    """kthreadd is live but has no user memory: refused at `on`, naming why, instead of
    a kdamond that turns itself off at its first sample."""
    await configure(damond, 2)
    await expect_error(damond, state(damond, "on"), INVALID, T0, "pid 2", "kernel thread")


async def test_on_refuses_a_process_whose_memory_it_cannot_read(
    private_bus: PrivateBus, tmp_path: Any
) -> None:
    """A daemon without CAP_SYS_PTRACE (all capabilities dropped) cannot read another
    user's maps: `on` says so, and nothing starts."""
    client = await MessageBus(bus_address=private_bus.address).connect()
    no_caps = ("setpriv", "--bounding-set=-all", "--inh-caps=-all")
    daemon = await start_damond(private_bus, client, tmp_path, wrapper=no_caps)
    other_user = subprocess.Popen(
        ["setpriv", "--reuid=nobody", "--regid=nogroup", "--clear-groups", "sleep", "600"]
    )
    try:
        await configure(daemon, other_user.pid)
        await expect_error(
            daemon,
            state(daemon, "on"),
            INVALID,
            T0,
            f"pid {other_user.pid}",
            "cannot read its memory",
            f"/proc/{other_user.pid}/maps",
        )
        assert await daemon.get(K0, "org.damond1.Kdamond", "state") == "off"
    finally:
        stop_process(other_user)
        assert stop_process(daemon.process) == 0, daemon.stderr()
        client.disconnect()


async def test_on_needs_exactly_one_context_and_a_target(
    damond: Damond, sleeper: subprocess.Popen[bytes]
) -> None:
    await damond.set(ROOT, "org.damond1.Kdamonds", "nr", "u", 1)
    await expect_error(damond, state(damond, "on"), INVALID, K0, "exactly one context")
    await expect_error(
        damond, set_(damond, K0, "org.damond1.Contexts", "nr", "u", 2), INVALID, K0, "0 or 1"
    )
    await damond.set(K0, "org.damond1.Contexts", "nr", "u", 1)
    await expect_error(damond, state(damond, "on"), INVALID, C0, "at least one target")


async def test_operations_and_access_check_values(damond: Damond) -> None:
    await damond.set(ROOT, "org.damond1.Kdamonds", "nr", "u", 1)
    await damond.set(K0, "org.damond1.Contexts", "nr", "u", 1)
    await expect_error(
        damond,
        set_(damond, C0, "org.damond1.Context", "operations", "s", "damon_type"),
        INVALID,
        C0,
        "damon_type",
        "vaddr",
    )
    await expect_error(
        damond,
        set_(damond, C0, "org.damond1.Context", "access_check", "s", "magic"),
        INVALID,
        C0,
        "magic",
    )
    avail_ops = await damond.get(C0, "org.damond1.Context", "avail_operations")
    avail_checks = await damond.get(C0, "org.damond1.Context", "avail_access_checks")
    assert "vaddr" in avail_ops
    for name in {"vaddr", "fvaddr", "paddr"} - set(avail_ops):
        await expect_error(
            damond,
            set_(damond, C0, "org.damond1.Context", "operations", "s", name),
            NOT_SUPPORTED,
            name,
        )
    for name in {"page_idle", "clear_refs"} - set(avail_checks):
        await expect_error(
            damond,
            set_(damond, C0, "org.damond1.Context", "access_check", "s", name),
            NOT_SUPPORTED,
            name,
        )


async def test_region_rules(damond: Damond, sleeper: subprocess.Popen[bytes]) -> None:
    await configure(damond, sleeper.pid)
    await damond.set(C0, "org.damond1.Context", "operations", "s", "fvaddr")
    await expect_error(damond, state(damond, "on"), INVALID, T0, "at least one region")
    await damond.set(T0, "org.damond1.Regions", "nr", "u", 2)
    r0, r1 = f"{T0}/regions/0", f"{T0}/regions/1"
    await damond.set(r0, "org.damond1.Region", "start", "t", 0x10000)
    await damond.set(r0, "org.damond1.Region", "end", "t", 0x10000)
    await expect_error(damond, state(damond, "on"), INVALID, r0, "start", "end")
    await damond.set(r0, "org.damond1.Region", "end", "t", 0x20000)
    await damond.set(r1, "org.damond1.Region", "start", "t", 0x18000)
    await damond.set(r1, "org.damond1.Region", "end", "t", 0x30000)
    await expect_error(damond, state(damond, "on"), INVALID, r1, "overlap")
    await damond.set(r1, "org.damond1.Region", "start", "t", 0x1000)
    await damond.set(r1, "org.damond1.Region", "end", "t", 0x2000)
    await expect_error(damond, state(damond, "on"), INVALID, r1, "sorted")


async def test_wrong_types_and_read_only(damond: Damond) -> None:
    await damond.set(ROOT, "org.damond1.Kdamonds", "nr", "u", 1)
    await expect_error(
        damond,
        set_(damond, ROOT, "org.damond1.Kdamonds", "nr", "s", "3"),
        INVALID,
        "nr",
        "'u'",
        "'s'",
    )
    await expect_error(
        damond, set_(damond, ROOT, "org.damond1.Kdamonds", "nr", "i", -1), INVALID, "nr"
    )
    await expect_error(
        damond, set_(damond, K0, "org.damond1.Kdamond", "pid", "i", 5), INVALID, "read-only"
    )
    await expect_error(
        damond, set_(damond, K0, "org.damond1.Kdamond", "state", "u", 1), INVALID, "state"
    )
    reply = await damond.try_set(K0, "org.damond1.Kdamond", "nosuch", "s", "x")
    assert reply.error_name == "org.freedesktop.DBus.Error.UnknownProperty"
    reply = await damond.try_set(K0, "org.damond1.Nosuch", "nr", "u", 1)
    assert reply.error_name == "org.freedesktop.DBus.Error.UnknownInterface"
    # busctl's own type parsing and our error, end to end
    out = damond.busctl(
        "set-property", "org.damond1", ROOT, "org.damond1.Kdamonds", "nr", "s", "x", check=False
    )
    assert out.returncode != 0 and "type" in out.stderr, out.stderr


async def test_state_keywords_and_commit_while_off(damond: Damond) -> None:
    await damond.set(ROOT, "org.damond1.Kdamonds", "nr", "u", 1)
    await expect_error(damond, state(damond, "start"), INVALID, K0, "on, off or commit")
    await expect_error(damond, state(damond, "commit"), INVALID, K0, "commit", "off")
    await damond.set(K0, "org.damond1.Kdamond", "state", "s", "off")  # idempotent


async def test_no_snapshot_yet(damond: Damond) -> None:
    await damond.set(ROOT, "org.damond1.Kdamonds", "nr", "u", 1)
    await damond.set(K0, "org.damond1.Contexts", "nr", "u", 1)
    before = await state_of_everything(damond)
    reply = await call(damond.client, C0, "org.damond1.Context", "GetSnapshot")
    assert reply.error_name == "org.damond1.Error.NoData"
    assert C0 in reply.body[0]
    assert await state_of_everything(damond) == before


async def test_busy_while_on(damond: Damond, sleeper: subprocess.Popen[bytes]) -> None:
    await configure(damond, sleeper.pid)
    await damond.set(K0, "org.damond1.Kdamond", "state", "s", "on")
    try:
        await expect_error(damond, state(damond, "on"), BUSY, K0, "already on")
        await expect_error(
            damond,
            set_(damond, ROOT, "org.damond1.Kdamonds", "nr", "u", 2),
            BUSY,
            f"{ROOT}: ",
            "kdamonds/0 is on",
        )
        await expect_error(
            damond,
            set_(damond, ROOT, "org.damond1.Kdamonds", "nr", "u", 0),
            BUSY,
            "kdamonds/0 is on",
        )
        await expect_error(
            damond, set_(damond, K0, "org.damond1.Contexts", "nr", "u", 0), BUSY, "contexts nr"
        )
        await expect_error(
            damond, set_(damond, C0, "org.damond1.Targets", "nr", "u", 2), BUSY, "targets nr"
        )
        await expect_error(
            damond, set_(damond, T0, "org.damond1.Regions", "nr", "u", 1), BUSY, "regions nr"
        )
        # a bad commit is refused and leaves the running kdamond on
        await damond.set(C0, "org.damond1.NrRegions", "min", "t", 1)
        await expect_error(damond, state(damond, "commit"), INVALID, "min")
        assert await damond.get(K0, "org.damond1.Kdamond", "state") == "on"
    finally:
        await damond.set(K0, "org.damond1.Kdamond", "state", "s", "off")


async def test_resource_caps(damond: Damond) -> None:
    await expect_error(
        damond, set_(damond, ROOT, "org.damond1.Kdamonds", "nr", "u", 10**6), INVALID, "limit"
    )
    await expect_error(
        damond, set_(damond, ROOT, "org.damond1.Kdamonds", "nr", "u", 2**32 - 1), INVALID, "limit"
    )


async def test_daemon_survives_a_burst_of_bad_calls(damond: Damond) -> None:
    for _ in range(50):
        await damond.try_set(ROOT, "org.damond1.Kdamonds", "nr", "t", 2**64 - 1)
        await call(damond.client, f"{ROOT}/kdamonds/99", "org.damond1.Context", "GetSnapshot")
        await call(damond.client, ROOT, "org.damond1.Kdamonds", "Nope", "s", ["x"])
    assert await damond.get(ROOT, "org.damond1.Kdamonds", "nr") == 0
    assert damond.process.poll() is None
