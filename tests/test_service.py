"""sd_notify as systemd sees it: READY=1, STATUS=, WATCHDOG=1 from the event loop.

A datagram socket stands in for systemd's NOTIFY_SOCKET; the daemon is the real
one on a real private bus.
"""

from __future__ import annotations

import asyncio
import logging
import signal
import subprocess
from collections.abc import AsyncIterator
from typing import Any

import pytest
from conftest import ROOT, Damond, NotifySocket, notified_damond

from damond import service
from damond.monitor.ops import kernel_damon
from damond.tools import client as damond_client
from damond.tools.privatebus import PrivateBus

WATCHDOG_USEC = 400_000
STALL_S = 1.5
K0 = f"{ROOT}/kdamonds/0"
C0 = f"{K0}/contexts/0"


@pytest.fixture
async def notified(
    private_bus: PrivateBus, tmp_path: Any
) -> AsyncIterator[tuple[Damond, NotifySocket]]:
    stall = {"DAMOND_FAULT_STALL_S": str(STALL_S)}
    async with notified_damond(private_bus, tmp_path, WATCHDOG_USEC, **stall) as served:
        yield served


async def test_ready_after_the_name_is_owned_then_status(
    notified: tuple[Damond, NotifySocket],
) -> None:
    daemon, notify = notified
    _, first = await notify.until(lambda m: "READY=1" in m)
    assert await damond_client.name_has_owner(daemon.client)
    _, status = await notify.until(lambda m: m.startswith("STATUS="))
    assert "idle" in status
    # where the host runs a kernel kdamond, which disturbs damond: say so
    host_damon = bool(kernel_damon.running_kdamonds())
    assert ("warning: the kernel's own DAMON is running" in status) == host_damon
    assert ("the kernel's own DAMON is running" in daemon.stderr()) == host_damon
    sleeper = await asyncio.create_subprocess_exec("sleep", "600")
    try:
        await daemon.set(ROOT, "org.damond1.Kdamonds", "nr", "u", 1)
        await daemon.set(K0, "org.damond1.Contexts", "nr", "u", 1)
        await daemon.set(C0, "org.damond1.Targets", "nr", "u", 1)
        await daemon.set(f"{C0}/targets/0", "org.damond1.Target", "pid", "i", sleeper.pid)
        await daemon.set(K0, "org.damond1.Kdamond", "state", "s", "on")
        _, on = await notify.until(lambda m: m.startswith("STATUS=") and "on:" in m)
        assert "kdamonds/0 vaddr/clear_refs 1 target(s)" in on
        _, regions = await notify.until(lambda m: m.startswith("STATUS=") and "regions" in m)
        assert "kdamonds/0" in regions
        await daemon.set(K0, "org.damond1.Kdamond", "state", "s", "off")
        _, off = await notify.until(lambda m: m.startswith("STATUS=") and "idle" in m)
    finally:
        sleeper.kill()
        await sleeper.wait()
    daemon.process.send_signal(signal.SIGTERM)
    await notify.until(lambda m: "STOPPING=1" in m)


async def test_status_says_when_sampling_falls_behind(
    notified: tuple[Damond, NotifySocket],
    workload: tuple[subprocess.Popen[bytes], dict[str, Any]],
) -> None:
    """A clear_refs sample of the workload costs over 10 % of a CPU at 5 ms: the ceiling
    stretches aggregations beyond 120 ms, and STATUS= says how far."""
    daemon, notify = notified
    process, _ = workload
    await notify.until(lambda m: "READY=1" in m)
    await daemon.set(ROOT, "org.damond1.Kdamonds", "nr", "u", 1)
    await daemon.set(K0, "org.damond1.Contexts", "nr", "u", 1)
    await daemon.set(C0, "org.damond1.Targets", "nr", "u", 1)
    await daemon.set(f"{C0}/targets/0", "org.damond1.Target", "pid", "i", process.pid)
    await daemon.set(K0, "org.damond1.Kdamond", "state", "s", "on")
    _, behind = await notify.until(lambda m: "behind" in m, timeout=30)
    assert "kdamonds/0 vaddr/clear_refs 1 target(s)" in behind, behind
    assert "behind: a Snapshot every" in behind and "(aggr_us asks 100 ms)" in behind, behind
    await daemon.set(K0, "org.damond1.Kdamond", "state", "s", "off")


async def test_watchdog_pings_from_the_event_loop(
    notified: tuple[Damond, NotifySocket],
) -> None:
    daemon, notify = notified
    await notify.until(lambda m: "READY=1" in m)
    pings = [(await notify.until(lambda m: m == "WATCHDOG=1"))[0] for _ in range(6)]
    gaps = [b - a for a, b in zip(pings, pings[1:], strict=False)]
    # systemd would act after WATCHDOG_USEC without a ping; pings come every half of it
    assert max(gaps) < WATCHDOG_USEC / 1e6, gaps
    daemon.process.send_signal(signal.SIGUSR1)  # fault injection: block the event loop
    times = pings[-1:] + [(await notify.until(lambda m: m == "WATCHDOG=1"))[0] for _ in range(8)]
    gaps = [b - a for a, b in zip(times, times[1:], strict=False)]
    stalled = [g for g in gaps if g >= STALL_S * 0.8]
    assert len(stalled) == 1, f"pings went on while the event loop was blocked: {gaps}"
    # and once it runs again, they come at the usual pace
    assert max(gaps[gaps.index(stalled[0]) + 1 :]) < WATCHDOG_USEC / 1e6, gaps
    assert "blocking the event loop" in daemon.stderr()


def test_no_notify_socket_means_no_notification(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("NOTIFY_SOCKET", raising=False)
    assert service.notify("READY=1") is False
    monkeypatch.setenv("WATCHDOG_USEC", "1000000")
    monkeypatch.setenv("WATCHDOG_PID", "1")
    assert service.watchdog_interval() is None  # meant for another process


def test_journal_fields_from_extra(monkeypatch: pytest.MonkeyPatch) -> None:
    """Under systemd the journal handler gets KDAMOND=, TARGET_PID=… as fields."""
    from systemd import journal

    sent: list[tuple[str, dict[str, Any]]] = []

    def sender(*args: str, **fields: Any) -> None:  # journal.send's shape
        sent.append((args[0], fields))

    handler = journal.JournalHandler(sender_function=sender)
    logger = logging.getLogger("damond.test-journal")
    logger.addHandler(handler)
    try:
        logger.warning("kdamonds/0 on", extra={"KDAMOND": "0", "TARGET_PID": "42"})
    finally:
        logger.removeHandler(handler)
    message, fields = sent[0]
    assert message == "kdamonds/0 on"
    assert fields["KDAMOND"] == "0" and fields["TARGET_PID"] == "42"
    assert fields["PRIORITY"] == "4"
