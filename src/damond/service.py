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
from damond.monitor.pacing import BEHIND_RATIO
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

    Fields come from ``extra=``: KDAMOND, TARGET_PID, BACKEND, OPERATIONS, ACCESS_CHECK.
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
        self._aggr_us: dict[str, int] = {}
        """By context: how long its latest aggregation really took."""
        self._last = 0.0
        self.text = ""
        self.config_problem = ""
        """Why the configuration file was refused when last applied, or ''."""

    def describe(self) -> str:
        text = self._describe_kdamonds()
        if self.config_problem:
            text += f"; configuration refused: {self.config_problem}"
        if self.tree.interference_warning():
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
            context = kdamond.child_path("contexts", 0)
            regions = self._regions.get(context)
            # who samples: damond's access check, or the kernel's DAMON ("vaddr/kernel")
            parts.append(
                f"{kdamond.path} {config.operations.name}/{config.access_check or config.backend} "
                f"{len(config.targets)} target(s)"
                + (f" {regions} regions" if regions is not None else "")
                + _falling_behind(self._aggr_us.get(context, 0), config.attrs.aggr_us)
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
            self._aggr_us.pop(node.path, None)

    def properties_changed(self, node: Node, group: str, changed: dict[str, Any]) -> None:
        if isinstance(node, Kdamond) and "state" in changed:
            self._aggr_us.pop(node.child_path("contexts", 0), None)  # a new run's pace
            self.update()

    def snapshot(self, context: Context, snapshot: Snapshot) -> None:
        self._regions[context.path] = sum(len(t.starts) for t in snapshot.targets)
        self._aggr_us[context.path] = snapshot.effective_aggr_us
        if time.monotonic() - self._last >= STATUS_MIN_PERIOD_S:
            self.update()


def _falling_behind(effective_aggr_us: int, aggr_us: int) -> str:
    """', behind: …' when aggregations take more than BEHIND_RATIO times aggr_us."""
    if effective_aggr_us <= BEHIND_RATIO * aggr_us:
        return ""
    return (
        f", behind: a Snapshot every {effective_aggr_us / 1000:g} ms "
        f"(aggr_us asks {aggr_us / 1000:g} ms)"
    )
