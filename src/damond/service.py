"""Life as a systemd service: sd_notify (READY, STATUS, WATCHDOG) and journal logging.

Everything here degrades to nothing without systemd: with no NOTIFY_SOCKET,
notify() does nothing; with stderr not connected to the journal, logs go to
stderr as plain lines.
"""

from __future__ import annotations

import asyncio
import logging
import os
import sys
import time
from typing import Any

from damond.hierarchy import Context, Kdamond, Node, Tree
from damond.monitor.ops import kernel_damon
from damond.monitor.snapshot import Snapshot

log = logging.getLogger(__name__)

JOURNAL_SOCKET = "/run/systemd/journal/socket"
STATUS_MIN_PERIOD_S = 1.0
"""STATUS= follows region counts at most this often (snapshots can come every ms)."""

try:
    from systemd import daemon as _sd_daemon
    from systemd import journal as _sd_journal
except ImportError:  # systemd-python is a dependency, but never fail for lack of it
    _sd_daemon = None
    _sd_journal = None


def notify(state: str) -> bool:
    """Send one sd_notify message; False when not run by a service manager."""
    if _sd_daemon is None or not os.environ.get("NOTIFY_SOCKET"):
        return False
    return bool(_sd_daemon.notify(state))


def stderr_is_journal() -> bool:
    """systemd sets JOURNAL_STREAM to stderr's device:inode when stderr goes to the journal."""
    stream = os.environ.get("JOURNAL_STREAM", "")
    try:
        device, inode = (int(x) for x in stream.split(":"))
        st = os.fstat(sys.stderr.fileno())
    except (ValueError, OSError):
        return False
    return (st.st_dev, st.st_ino) == (device, inode) and os.path.exists(JOURNAL_SOCKET)


def setup_logging(level: str) -> None:
    """Journal with structured fields under systemd; plain stderr lines otherwise.

    Fields come from ``extra=``: KDAMOND, TARGET_PID, OPERATIONS, ACCESS_CHECK.
    """
    handler: logging.Handler
    if _sd_journal is not None and stderr_is_journal():
        handler = _sd_journal.JournalHandler(SYSLOG_IDENTIFIER="damond")
        handler.setFormatter(logging.Formatter("%(message)s"))
    else:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("damond: %(levelname)s: %(message)s"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())


def watchdog_interval() -> float | None:
    """Half of WATCHDOG_USEC, when the watchdog is on for this process."""
    usec = os.environ.get("WATCHDOG_USEC")
    pid = os.environ.get("WATCHDOG_PID")
    if not usec or (pid and pid != str(os.getpid())):
        return None
    try:
        return int(usec) / 2e6
    except ValueError:
        return None


async def watchdog(interval: float) -> None:
    """WATCHDOG=1 from the event loop itself: a stuck loop stops the pings.

    Nothing a client sends stands in line before it: bus.py answers requests
    from per-caller queues for at most a couple of ms per turn of the loop, so
    a timer is late by one short turn at most, whatever readers ask for.
    """
    while True:
        notify("WATCHDOG=1")
        await asyncio.sleep(interval)


class ServiceStatus:
    """Keeps systemd's STATUS= saying what runs; a TreeListener."""

    def __init__(self, tree: Tree) -> None:
        self.tree = tree
        self._regions: dict[str, int] = {}
        self._last = 0.0
        self.text = ""

    def describe(self) -> str:
        text = self._describe_kdamonds()
        if kernel_damon.running_kdamonds():
            text += "; warning: the kernel's own DAMON is running (see the log)"
        return text

    def _describe_kdamonds(self) -> str:
        running = [k for k in self.tree.kdamonds() if k.running]
        if not running:
            return f"idle: {len(self.tree.kdamonds())} kdamond(s), none on"
        parts = []
        for kdamond in running:
            config = kdamond.running_config
            assert config is not None
            regions = self._regions.get(kdamond.child_path("contexts", 0))
            parts.append(
                f"{kdamond.path} {config.operations.name}/{config.access_check} "
                f"{len(config.targets)} target(s)"
                + (f" {regions} regions" if regions is not None else "")
            )
        return f"{len(running)} kdamond(s) on: " + "; ".join(parts)

    def update(self) -> None:
        text = self.describe()
        if text != self.text:
            self.text = text
            notify(f"STATUS={text}")
        self._last = time.monotonic()

    def node_added(self, node: Node) -> None:
        pass

    def node_removed(self, node: Node) -> None:
        if isinstance(node, Context):
            self._regions.pop(node.path, None)

    def properties_changed(self, node: Node, group: str, changed: dict[str, Any]) -> None:
        if isinstance(node, Kdamond) and "state" in changed:
            self.update()

    def snapshot(self, context: Context, snapshot: Snapshot) -> None:
        self._regions[context.path] = sum(len(t.starts) for t in snapshot.targets)
        if time.monotonic() - self._last >= STATUS_MIN_PERIOD_S:
            self.update()
