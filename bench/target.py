"""The benchmarks' target: a child process holding memory resident, re-writing it on request.

The child runs a Python script that prints its buffer's address once it is
resident, then answers each "touch" line on its stdin by writing its pages
again and printing "ok".
"""

from __future__ import annotations

import subprocess
import sys

from damond.monitor.config import TargetConfig


class ChildTarget:
    """A child running `script` with `args`; `base` is the address it printed."""

    def __init__(self, script: str, *args: str) -> None:
        self.child = subprocess.Popen(
            [sys.executable, "-c", script, *args],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        assert self.child.stdin is not None and self.child.stdout is not None
        self.stdin, self.stdout = self.child.stdin, self.child.stdout
        self.base = int(self.stdout.readline())
        self.config = TargetConfig(0, self.child.pid)

    def touch(self) -> None:
        self.stdin.write("touch\n")
        self.stdin.flush()
        assert self.stdout.readline().strip() == "ok"

    def close(self) -> None:
        self.child.kill()
        self.child.wait()
        self.stdin.close()
        self.stdout.close()
