"""A target process held by identity, not by number.

A pid is only a number: once the process exits and is reaped, the kernel may
hand the same number to an unrelated process, and a monitor that keeps opening
``/proc/PID/...`` would silently watch the newcomer. ``TargetProcess`` pins the
process with a pidfd and reaches its proc files only through a ``/proc/PID``
directory fd that was opened *before* the pidfd was seen alive; see
``TargetProcess.__init__`` for why that makes every later open safe.
"""

from __future__ import annotations

import errno
import os
import select
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from types import TracebackType

from damond.monitor.ops.base import TargetGone

_PIDFD_THREAD = os.O_EXCL
"""pidfd_open flag for a thread id (Linux 6.9+); the kernel reuses O_EXCL's value."""

_GONE_ERRNOS = frozenset({errno.ESRCH, errno.ENOENT})
_DENIED_ERRNOS = frozenset({errno.EACCES, errno.EPERM})

READ_CHUNK = 1 << 20
"""seq_file fills a read with as many whole records as fit: big reads, few calls."""


def _pidfd_open(pid: int) -> int:
    """A pidfd for a process, or for a thread id where the kernel allows it."""
    try:
        return os.pidfd_open(pid)
    except OSError as e:
        # ENOENT (EINVAL before 6.9): pid is a thread, not a thread group leader
        if e.errno in (errno.ENOENT, errno.EINVAL):
            return os.pidfd_open(pid, _PIDFD_THREAD)
        raise


PF_KTHREAD = 0x00200000
"""The flags word of /proc/PID/stat (include/linux/sched.h): a kernel thread."""


def process_problem(pid: int) -> str:
    """Why pid cannot be a monitoring target now, or '' when it can.

    A target is a live process (not a zombie) with user memory that this
    daemon may read: a kernel thread has none, and a process whose maps the
    kernel will not show us (no CAP_SYS_PTRACE over it) cannot be sampled;
    either would turn the kdamond off at its first sample.
    """
    if pid <= 0:
        return f"pid {pid} is not a live process"
    try:
        with TargetProcess(pid) as proc:
            return proc.problem()
    except TargetGone:
        return f"pid {pid} is not a live process"
    except OSError as e:
        return f"pid {pid} cannot be pinned: {e.strerror or e}"


def _state_and_flags(stat: bytes) -> tuple[bytes, int]:
    """The state letter and flags word of /proc/PID/stat (fields 3 and 9; the name
    before them may hold spaces and parentheses, hence the last ')')."""
    fields = stat.rsplit(b")", 1)[1].split()
    return fields[0], int(fields[6])


class TargetProcess:
    """One monitored process: a pidfd, its /proc directory and cached proc files.

    Pid reuse safety: first the pidfd is taken, then /proc/PID is opened, then
    the pidfd is polled. If the process is still alive at that poll, it has
    held the pid since pidfd_open, so the directory opened in between is its
    own. A /proc/PID directory fd stays bound to that struct pid: files opened
    relative to it belong to our process or fail with ESRCH, even after the
    number has been given to someone else; fds of proc files behave the same.
    So once constructed, nothing here can reach another process.
    """

    def __init__(self, pid: int) -> None:
        if pid <= 0:
            raise TargetGone(pid, "is not a valid pid")
        self.pid = pid
        self._files: dict[tuple[str, int], int] = {}
        self._dirfd = -1
        self._pidfd = -1
        try:
            self._pidfd = _pidfd_open(pid)
        except OSError as e:
            if e.errno in (errno.ESRCH, errno.ENOENT, errno.EINVAL):
                raise TargetGone(pid, "does not exist") from e
            raise
        try:
            self._dirfd = os.open(f"/proc/{pid}", os.O_RDONLY | os.O_DIRECTORY)
        except OSError as e:
            # close() forgets the number too: closed but remembered, __del__ would
            # close it again, by then maybe another thread's newly opened fd
            self.close()
            if e.errno in _GONE_ERRNOS:
                raise TargetGone(pid, "has no /proc entry") from e
            raise
        if not self.alive():
            self.close()
            raise TargetGone(pid)

    def alive(self) -> bool:
        """False once the process has exited (a zombie counts as exited). Never blocks."""
        if self._pidfd < 0:
            return False
        poller = select.poll()
        poller.register(self._pidfd, select.POLLIN)
        return not poller.poll(0)

    def problem(self) -> str:
        """Why this process cannot be monitored, or '' (see process_problem)."""
        try:
            stat = self.read("stat")
            state, flags = _state_and_flags(stat)
            if state == b"Z" or not self.alive():
                return f"pid {self.pid} is not a live process"
            if flags & PF_KTHREAD:
                name = stat[stat.find(b"(") + 1 : stat.rfind(b")")].decode(errors="replace")
                return f"pid {self.pid} is a kernel thread ({name}): it has no user memory"
            if not self.read("maps"):
                return f"pid {self.pid} has no user address space"
        except TargetGone:
            return f"pid {self.pid} is not a live process"
        except PermissionError as e:
            return f"pid {self.pid}: cannot read its memory ({e.filename}: {e.strerror})"
        return ""

    @property
    def pidfd(self) -> int:
        """The pidfd that pins the process (process_madvise(2) acts through it)."""
        if self._pidfd < 0:
            raise TargetGone(self.pid, "is closed")
        return self._pidfd

    def path(self, name: str) -> str:
        """The file's name for messages (we never open by this path)."""
        return f"/proc/{self.pid}/{name}"

    def fd(self, name: str, flags: int = os.O_RDONLY) -> int:
        """A cached fd of /proc/PID/name, opened relative to the pinned directory."""
        key = (name, flags)
        fd = self._files.get(key)
        if fd is None:
            if self._dirfd < 0:
                raise TargetGone(self.pid, "is closed")
            try:
                fd = os.open(name, flags | os.O_CLOEXEC, dir_fd=self._dirfd)
            except OSError as e:
                raise self._translate(e, name) from e
            self._files[key] = fd
        return fd

    def read(self, name: str) -> bytes:
        """The whole of /proc/PID/name as it is now.

        Empty text from a live process means the fd holds an old address
        space (maps, smaps and pagemap pin the mm at open, and an execve
        replaces it); the file is opened again once. Empty text from a dead
        process raises TargetGone.
        """
        text = self._read_fd(name)
        if not text and self.alive():
            self._forget(name, os.O_RDONLY)
            text = self._read_fd(name)
        if not text and not self.alive():
            raise TargetGone(self.pid)
        return text

    def write(self, name: str, data: bytes) -> None:
        """Write data to /proc/PID/name through a cached fd."""
        fd = self.fd(name, os.O_WRONLY)
        try:
            os.write(fd, data)
        except OSError as e:
            raise self._translate(e, name) from e

    def close(self) -> None:
        """Release the pidfd, the directory and every cached file. Idempotent."""
        # each number is forgotten before it is closed: a number closed twice may
        # by then be another thread's fd (another kdamond's pidfd, say)
        files, self._files = list(self._files.values()), {}
        fds = [getattr(self, "_dirfd", -1), getattr(self, "_pidfd", -1)]
        self._dirfd = self._pidfd = -1
        for fd in files + [fd for fd in fds if fd >= 0]:
            os.close(fd)

    def __enter__(self) -> TargetProcess:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def __del__(self) -> None:
        if getattr(self, "_pidfd", -1) >= 0:
            self.close()

    def _read_fd(self, name: str) -> bytes:
        fd = self.fd(name)
        chunks = []
        try:
            os.lseek(fd, 0, os.SEEK_SET)
            while chunk := os.read(fd, READ_CHUNK):
                chunks.append(chunk)
        except OSError as e:
            raise self._translate(e, name) from e
        return b"".join(chunks)

    def _forget(self, name: str, flags: int) -> None:
        fd = self._files.pop((name, flags), None)
        if fd is not None:
            os.close(fd)

    def _translate(self, e: OSError, name: str) -> Exception:
        """ESRCH/ENOENT: the process is gone. EACCES/EPERM: say which file."""
        if e.errno in _GONE_ERRNOS:
            return TargetGone(self.pid)
        if e.errno in _DENIED_ERRNOS:
            return PermissionError(
                e.errno,
                f"{os.strerror(e.errno)}: needs root or CAP_SYS_PTRACE over the target",
                self.path(name),
            )
        return e


class ProcessTable:
    """The TargetProcess of each pid a context uses, shared by its ops.

    An entry is opened at first use and kept while the context runs, dead or
    alive: once a target has gone, its pid keeps reporting TargetGone rather
    than being looked up again and adopting whoever got the number next.
    Share one table between a context's address space and access check so
    both pin the same process.
    """

    def __init__(self) -> None:
        self._procs: dict[int, TargetProcess] = {}

    def get(self, pid: int) -> TargetProcess:
        """The pinned process for pid; TargetGone if it has never been seen and does not exist."""
        proc = self._procs.get(pid)
        if proc is None:
            proc = self._procs[pid] = TargetProcess(pid)
        return proc

    def live(self, pid: int) -> TargetProcess:
        """Like get(), but TargetGone when the pinned process has exited."""
        proc = self.get(pid)
        if not proc.alive():
            raise TargetGone(pid)
        return proc

    def adopt(self, pins: dict[int, TargetProcess]) -> None:
        """Take processes pinned elsewhere (at a commit's acceptance); a pin taken later
        replaces an earlier one of the same number."""
        for pid, proc in pins.items():
            old = self._procs.get(pid)
            if old is not None and old is not proc:
                old.close()
            self._procs[pid] = proc

    def drop(self, pid: int) -> None:
        """Forget pid (e.g. a commit removed or replaced the target)."""
        proc = self._procs.pop(pid, None)
        if proc is not None:
            proc.close()

    def retain(self, pids: Iterable[int]) -> None:
        """Drop every pid not in pids (after a commit replaced targets): without this a
        long-running context whose targets are swapped by commits keeps the pidfd,
        /proc directory and files of every pid it ever had, until it runs out of fds."""
        keep = set(pids)
        for pid in [p for p in self._procs if p not in keep]:
            self.drop(pid)

    def close(self) -> None:
        for pid in list(self._procs):
            self.drop(pid)


class ProcessHolder:
    """Base of the ops that reach processes: a table, closed only by whoever made it."""

    def __init__(self, processes: ProcessTable | None = None) -> None:
        self._owns_processes = processes is None
        self.processes = processes if processes is not None else ProcessTable()

    def close(self) -> None:
        if self._owns_processes:
            self.processes.close()


@contextmanager
def gone_when_missing(proc: TargetProcess | None) -> Iterator[None]:
    """ESRCH or ENOENT from a proc file of proc: the process has gone (TargetGone).

    For the reads made through a cached fd (pagemap) rather than TargetProcess.read.
    """
    try:
        yield
    except OSError as e:
        if proc is not None and e.errno in _GONE_ERRNOS:
            raise TargetGone(proc.pid) from e
        raise
