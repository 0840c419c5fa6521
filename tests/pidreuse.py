"""A dead target's pid given to a new process: the pid-reuse tests' one move.

Stdlib only: imported by tests/test_churn.py (in a PID namespace of its own)
and, in the test guest, by tests/vm/kernel_backend_checks.py (the guest is
throwaway). The new process is made with clone3(2)'s set_tid, which picks the
pid (root only; no CONFIG_PID_NS or ns_last_pid needed, which the guest
kernel lacks). The clone happens in a helper process (this file run as a
script, PidGiver): a single-threaded Python whose clone execs at once, so
that no lock another thread holds is cloned along.

Run as a script, it reads pids from stdin, one a line, and for each starts
`sleep 600` with that pid and prints it.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import signal
import subprocess
import sys
from pathlib import Path

SYS_CLONE3 = 435
"""x86_64 and every other architecture's (include/uapi/asm-generic/unistd.h)."""


class _CloneArgs(ctypes.Structure):
    """struct clone_args (include/uapi/linux/sched.h), up to set_tid_size."""

    _fields_ = [
        (name, ctypes.c_uint64)
        for name in (
            "flags",
            "pidfd",
            "child_tid",
            "parent_tid",
            "exit_signal",
            "stack",
            "stack_size",
            "tls",
            "set_tid",
            "set_tid_size",
        )
    ]


class Reused:
    """The process that was given a dead process's pid (not our child: the helper's)."""

    def __init__(self, pid: int) -> None:
        self.pid = pid

    def alive(self) -> bool:
        try:
            with open(f"/proc/{self.pid}/stat", "rb") as f:
                return f.read().rsplit(b")", 1)[1].split()[0] != b"Z"
        except OSError:
            return False

    def kill(self) -> None:
        with contextlib.suppress(ProcessLookupError):
            os.kill(self.pid, signal.SIGKILL)


class PidGiver:
    """A helper process, started ahead (Python starts slowly in the test guest), that
    starts a `sleep` with the pid it is told."""

    def __init__(self) -> None:
        self._helper = subprocess.Popen(
            [sys.executable, str(Path(__file__).resolve())],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )

    def give(self, a: subprocess.Popen[bytes]) -> Reused:
        """Kill a (and reap it), and start a `sleep` with a's pid."""
        assert self._helper.stdin is not None and self._helper.stdout is not None
        pid = a.pid
        a.kill()
        a.wait()
        self._helper.stdin.write(f"{pid}\n")
        self._helper.stdin.flush()
        said = self._helper.stdout.readline()
        if not said.strip().isdigit():
            raise RuntimeError(f"pidreuse helper: {said!r} (exit {self._helper.poll()})")
        return Reused(int(said))

    def close(self) -> None:
        assert self._helper.stdin is not None
        self._helper.stdin.close()
        self._helper.wait(timeout=30)


def _start_as(pid: int, argv: list[str]) -> int:
    libc = ctypes.CDLL(None, use_errno=True)
    libc.syscall.restype = ctypes.c_long
    tid = (ctypes.c_int * 1)(pid)
    args = _CloneArgs(exit_signal=signal.SIGCHLD, set_tid=ctypes.addressof(tid), set_tid_size=1)
    child = libc.syscall(SYS_CLONE3, ctypes.byref(args), ctypes.c_size_t(ctypes.sizeof(args)))
    if child == 0:
        try:  # not the helper's stdout: whoever reads it waits for its end
            devnull = os.open(os.devnull, os.O_RDWR)
            for fd in (0, 1, 2):
                os.dup2(devnull, fd)
            os.execvp(argv[0], argv)
        finally:
            os._exit(127)
    if child < 0:
        err = ctypes.get_errno()
        raise OSError(err, f"clone3 with set_tid {pid}: {os.strerror(err)}")
    return int(child)


if __name__ == "__main__":
    for line in sys.stdin:
        print(_start_as(int(line), ["sleep", "600"]), flush=True)
