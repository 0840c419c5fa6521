"""The ops interface: how the engine learns address ranges and page accesses.

Like the kernel's struct damon_operations, the engine (monitor/engine.py) calls
only these two small interfaces; vaddr/fvaddr/paddr and page_idle/clear_refs
plug in behind them (registry in ops/__init__.py).
"""

from __future__ import annotations

from typing import Protocol

import numpy as np

from damond.monitor.config import TargetConfig


class TargetGone(Exception):
    """The target process exited (or its memory can no longer be read)."""

    def __init__(self, pid: int, reason: str = "exited") -> None:
        super().__init__(f"target pid {pid} {reason}")
        self.pid = pid
        self.reason = reason


class Unsupported(Exception):
    """This host's kernel cannot provide an operations set or access check."""


class AddressSpace(Protocol):
    """Where a target's memory is: the ranges regions must cover."""

    name: str

    def initial_ranges(self, target: TargetConfig) -> list[tuple[int, int]]:
        """Page-aligned, sorted, disjoint [start, end) ranges to build regions on.

        vaddr: the three ranges of the mappings (minus the two largest gaps);
        fvaddr: the user-given regions; paddr: System RAM (or the user's regions).
        Raises TargetGone when the process does not exist.
        """
        ...

    def update_ranges(self, target: TargetConfig) -> list[tuple[int, int]] | None:
        """Ranges to fit regions to at each update interval; None: keep as they are."""
        ...


class AccessCheck(Protocol):
    """Per-sample access information: did the page at each address get accessed?"""

    name: str

    def prepare(self, target: TargetConfig, addrs: np.ndarray) -> None:
        """Mark the pages at addrs (uint64 array) as not accessed (idle / cleared)."""
        ...

    def check(self, target: TargetConfig, addrs: np.ndarray) -> np.ndarray:
        """A bool array: was each page at addrs accessed since prepare()?

        Raises TargetGone when the process has exited.
        """
        ...

    def close(self) -> None:
        """Release files and handles held for the targets."""
        ...
