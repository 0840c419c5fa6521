"""What the ops tests (test_ops.py, test_page_idle.py) share: target processes, the registry.

A child is a Python process running a script given as text after PRELUDE: the
script maps its buffers, prints one line that says where they are, then calls
serve(), which carries out one command per stdin line and answers "ok" when it
is done. Nothing waits by sleeping: every step waits for the child's answer.
When it has exited, assert_gone() checks that an access check says so.

registry_with() builds a Registry of the real tables with stand-in probes or
access check factories: tests of what a host offers inject it, and patch
nothing of the ops modules.
"""

from __future__ import annotations

import dataclasses
import os
import subprocess
import sys
from collections.abc import Callable

import numpy as np
import pytest

from damond.monitor import ops
from damond.monitor.config import TargetConfig
from damond.monitor.ops import TargetGone
from damond.monitor.ops.base import AccessCheck

PRELUDE = r"""
import ctypes, mmap, os, sys

def address(buffer):
    return ctypes.addressof(ctypes.c_char.from_buffer(buffer))

def serve(**commands):
    # "exec" replaces the program (its mappings are gone); the new one answers and waits
    for line in sys.stdin:
        cmd, *args = line.split()
        if cmd == "exec":
            os.execv(sys.executable, [sys.executable, "-c",
                     "import sys; print('ok', flush=True); sys.stdin.read()"])
        commands[cmd](*args)
        print("ok", flush=True)
"""


class ChildProcess:
    """A child running PRELUDE + script; `first_line` is the line it printed first."""

    def __init__(self, script: str) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, "-c", PRELUDE + script],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        assert self.proc.stdin is not None and self.proc.stdout is not None
        self.stdin, self.stdout = self.proc.stdin, self.proc.stdout
        self.first_line = self.stdout.readline()
        self.pid = self.proc.pid
        self.target = TargetConfig(index=0, pid=self.pid)

    def send(self, command: str) -> None:
        """Send a command and wait until the child has carried it out."""
        self.stdin.write(command + "\n")
        self.stdin.flush()
        answer = self.stdout.readline()
        assert answer.strip() == "ok", f"{command!r} answered {answer!r}"

    def exit_unreaped(self) -> None:
        """Let the child exit and wait for it, leaving a zombie (not reaped)."""
        self.stdin.close()
        os.waitid(os.P_PID, self.pid, os.WEXITED | os.WNOWAIT)

    def reap(self) -> None:
        """Let the child exit (if it has not) and reap it."""
        if not self.stdin.closed:
            self.stdin.close()
        self.proc.wait()
        self.stdout.close()


def assert_gone(access: AccessCheck, target: TargetConfig, addrs: np.ndarray) -> None:
    """The target has exited: the access check's check() and prepare() raise TargetGone."""
    with pytest.raises(TargetGone):
        access.check(target, addrs)
    with pytest.raises(TargetGone):
        access.prepare(target, addrs)


def registry_with(
    probes: dict[str, Callable[[], str] | str] | None = None,
    makers: dict[str, Callable[..., AccessCheck]] | None = None,
) -> ops.Registry:
    """The real tables, with the named access checks' probes (a function, or the
    reason it returns) and factories replaced."""
    probes, makers = probes or {}, makers or {}
    checks = []
    for check in ops.ACCESS_CHECKS:
        probe = probes.get(check.name, check.probe)
        checks.append(
            dataclasses.replace(
                check,
                probe=probe if callable(probe) else (lambda r=probe: r),
                make=makers.get(check.name, check.make),
            )
        )
    return ops.Registry(ops.OPERATIONS, checks)
