"""damond's claim on the kernel's DAMON admin tree: taken only when nobody uses it.

The kernel's admin tree is one per machine, and nothing in it says who wrote
it: a kdamond configured by an operator (or by damo, or by the machine's own
setup) looks like any other. So damond writes it only under a claim:

- it claims the tree only when ``kdamonds/nr_kdamonds`` reads 0 at claim time,
  under a lock (``RUN_DIR/kernel-damon.lock``, flock, held for the daemon's
  life) so that two damonds never claim together;
- the claim makes the whole pool of kdamond directories in one write (the
  kernel refuses `nr_kdamonds` writes while any kdamond runs, so it could not
  grow later), each with its one context;
- it is recorded in ``RUN_DIR/kernel-damon.json`` before the tree is written,
  so that after a crash (SIGKILL, say) the next damond finds its lock free
  and the record naming a pool of the size the tree still has: that pool is
  its own, and is taken back (kdamonds left running are turned off). A tree
  whose size no longer matches the record was changed by someone else
  meanwhile, and is not touched;
- on exit every kdamond of the pool is turned off and `nr_kdamonds` written
  back to 0, if it still is the pool's size; the record goes.

Until a claim is made, nothing is written: not the tree, not the run
directory (when the tree is in use and no record exists).
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import os

from damond.monitor.ops.damon_sysfs import (
    AdminFiles,
    Damos,
    KdamondDir,
    SysfsError,
    running_dirs,
)
from damond.monitor.ops.damon_trace import TraceError, TraceInstance

log = logging.getLogger(__name__)

RUN_DIR = "/run/damond"
LOCK = "kernel-damon.lock"
RECORD = "kernel-damon.json"
POOL_SIZE = 8
"""Kernel kdamonds damond can run at once (a kdamond directory is a few kobjects)."""
NR = "kdamonds/nr_kdamonds"


class Claim:
    """The pool of kdamond directories damond claimed, or why it has none."""

    def __init__(
        self,
        files: AdminFiles,
        trace: TraceInstance,
        run_dir: str = RUN_DIR,
        pool_size: int = POOL_SIZE,
        tried: TraceInstance | None = None,
    ) -> None:
        self.files = files
        self.trace = trace
        self.tried = tried
        """The instance of the damos_before_apply event, made with the claim where the
        kernel has the event (the tried regions of schemes); None: never."""
        self.run_dir = run_dir
        self.pool_size = pool_size
        self.dirs: list[KdamondDir] = []
        """The pool while claimed; [] otherwise."""
        self.avail_operations: list[str] = []
        """What the kernel's DAMON offers (read from the pool's first context)."""
        self.damos = Damos()
        """What its DAMOS sysfs takes (probed in the pool's first kdamond directory)."""
        self.reason = "not claimed"
        """'' while claimed, else why there is no claim."""
        self._free: list[KdamondDir] = []
        self._lock_fd = -1

    @property
    def claimed(self) -> bool:
        return not self.reason

    @property
    def record_path(self) -> str:
        return f"{self.run_dir}/{RECORD}"

    # -- claiming ---------------------------------------------------------------------------

    def acquire(self) -> str:
        """Claim the tree if it is free (or damond's own from before a crash); '' on success,
        else the reason, with nothing written."""
        if self.claimed:
            return ""
        self.reason = self._acquire()
        return self.reason

    def why_not(self) -> str:
        """'' when the tree is damond's or may be claimed, else why not. Reads only: one
        file of the tree (and whether a claim record exists)."""
        if self.claimed:
            return ""
        if not self.files.exists():
            return f"no kernel DAMON sysfs at {self.files.root} (needs CONFIG_DAMON_SYSFS)"
        if os.path.exists(self.record_path):
            return ""  # a claim of damond's from before a crash: acquire() decides
        try:
            nr = self._nr()
        except (SysfsError, ValueError) as e:
            return str(e)
        return f"kernel DAMON sysfs in use: {NR} is {nr}" if nr else ""

    def _acquire(self) -> str:
        reason = self.why_not() or self._lock()
        if reason:
            return reason
        try:
            reason = self._claim_locked()
        except (OSError, SysfsError, TraceError, ValueError) as e:
            reason = f"claiming the kernel DAMON sysfs failed: {e}"
            self._undo()
        if reason:
            self._unlock()
        return reason

    def _claim_locked(self) -> str:
        recovered = self._recover()
        if not recovered:
            nr = self._nr()
            if nr:
                return f"kernel DAMON sysfs in use: {NR} is {nr}"
            self._write_record()
        self.trace.create()
        if self.tried is not None and self.tried.kernel_has_event():
            self.tried.create()
        # one write makes the whole pool; the kernel refuses it while any kdamond runs,
        # and clears every directory it had: a recovered pool starts clean too
        self.files.write(NR, self.pool_size)
        self.dirs = [KdamondDir(self.files, i) for i in range(self.pool_size)]
        for d in self.dirs:
            d.prepare()
        self.avail_operations = self.dirs[0].avail_operations()
        self.damos = self.dirs[0].probe_damos()
        if self.damos.reason:
            log.warning("no DAMOS schemes on the kernel backend: %s", self.damos.reason)
        self._free = list(self.dirs)
        log.info(
            "claimed the kernel DAMON sysfs at %s: %d kdamonds%s (record %s)",
            self.files.root,
            self.pool_size,
            " (recovered from a previous damond)" if recovered else "",
            self.record_path,
        )
        return ""

    def _undo(self) -> None:
        """A claim that failed half-way: nothing of it stays (the pool, the instance, the
        record), so that the tree reads as it did."""
        if self.dirs:
            with contextlib.suppress(SysfsError, ValueError):
                if self._nr() == self.pool_size:
                    self.files.write(NR, 0)
        self.dirs, self._free = [], []
        self._close_trace()
        self._forget_record()

    def _recover(self) -> bool:
        """Take back the pool a crashed damond recorded, if the tree is still its size."""
        record = self._read_record()
        if record is None:
            return False
        nr = self._nr()
        if record.get("admin") != self.files.root or nr != record.get("nr_kdamonds"):
            log.warning(
                "ignoring the claim record %s of pid %s: the tree at %s now has %d kdamonds "
                "(the record says %s): someone else changed it",
                self.record_path,
                record.get("pid"),
                self.files.root,
                nr,
                record.get("nr_kdamonds"),
            )
            self._forget_record()
            return False
        left = running_dirs([KdamondDir(self.files, i) for i in range(nr)])
        for d in left:
            d.off()
        log.warning(
            "recovered the kernel DAMON pool of a previous damond (pid %s): turned %d "
            "kdamond(s) it left running off",
            record.get("pid"),
            len(left),
        )
        self._write_record()
        return True

    # -- the pool ---------------------------------------------------------------------------

    def take(self) -> KdamondDir | None:
        """A kdamond directory of the pool that nobody of damond's uses; None when all are."""
        return self._free.pop(0) if self._free else None

    def give_back(self, kdamond: KdamondDir) -> None:
        if kdamond in self.dirs and kdamond not in self._free:
            self._free.append(kdamond)
            self._free.sort(key=lambda d: d.index)

    @property
    def busy(self) -> int:
        return len(self.dirs) - len(self._free)

    def check(self) -> str:
        """'' while the pool is still what damond made; else why not (someone rewrote
        `nr_kdamonds`), and the claim is dropped without touching the tree again."""
        if not self.claimed:
            return self.reason
        try:
            nr = self._nr()
        except (SysfsError, ValueError) as e:
            nr, problem = -1, str(e)
        else:
            problem = ""
        if nr == self.pool_size:
            return ""
        self.reason = problem or (
            f"the kernel DAMON sysfs was changed by someone else: {NR} is {nr}, damond's "
            f"pool had {self.pool_size}"
        )
        log.warning("%s; the claim is given up", self.reason)
        self.dirs, self._free = [], []
        self._close_trace()
        self._forget_record()
        self._unlock()
        return self.reason

    # -- giving it back ---------------------------------------------------------------------

    def release(self) -> None:
        """Turn the pool's kdamonds off and write nr_kdamonds 0 (if still the pool's size)."""
        if not self.claimed:
            return
        for d in self.dirs:
            with contextlib.suppress(SysfsError):
                d.off()
        self._close_trace()
        try:
            if self._nr() == self.pool_size:
                self.files.write(NR, 0)
        except (SysfsError, ValueError) as e:
            log.warning("giving the kernel DAMON sysfs back: %s", e)
        self.dirs, self._free = [], []
        self.reason = "released"
        self._forget_record()
        self._unlock()
        log.info("gave the kernel DAMON sysfs at %s back", self.files.root)

    def _close_trace(self) -> None:
        for trace in (self.trace, self.tried):
            if trace is None:
                continue
            try:
                trace.remove()
            except TraceError as e:
                log.warning("%s", e)

    # -- files of the claim -----------------------------------------------------------------

    def _nr(self) -> int:
        return self.files.read_int(NR)

    def _lock(self) -> str:
        try:
            os.makedirs(self.run_dir, mode=0o755, exist_ok=True)
            fd = os.open(f"{self.run_dir}/{LOCK}", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        except OSError as e:
            return f"cannot record a claim in {self.run_dir}: {e.strerror}"
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            os.close(fd)
            return f"another damond holds the kernel DAMON sysfs ({self.run_dir}/{LOCK} is locked)"
        self._lock_fd = fd
        return ""

    def _unlock(self) -> None:
        if self._lock_fd >= 0:
            os.close(self._lock_fd)  # closing drops the flock
            self._lock_fd = -1

    def _read_record(self) -> dict | None:
        try:
            with open(self.record_path) as f:
                record = json.load(f)
        except FileNotFoundError:
            return None
        except (OSError, ValueError) as e:
            log.warning("unreadable claim record %s: %s", self.record_path, e)
            return {}
        return record if isinstance(record, dict) else {}

    def _write_record(self) -> None:
        """Written (atomically) before the tree is: a crash between the two leaves a record
        whose size the tree does not have, which the next damond then ignores."""
        record = {
            "admin": self.files.root,
            "nr_kdamonds": self.pool_size,
            "pid": os.getpid(),
            "trace_instance": self.trace.path,
            "tried_instance": self.tried.path if self.tried is not None else None,
        }
        tmp = f"{self.record_path}.tmp"
        with open(tmp, "w") as f:
            json.dump(record, f)
        os.replace(tmp, self.record_path)

    def _forget_record(self) -> None:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.record_path)
