"""The mappings of a process, to name the regions that lie in them.

Read on the client side from /proc/PID/maps, where the reader may (the same
user as the target, or root: the kernel's ptrace read check); a snapshot carries
only addresses. A mapping's name is its file, or [heap], [stack], …; an
anonymous mapping has none.
"""

from __future__ import annotations

import bisect
import os
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from damond.monitor.ops.common import Range


@dataclass(frozen=True)
class Mapping:
    start: int
    end: int
    name: str
    """The pathname column of /proc/PID/maps ('' for anonymous memory)."""


@dataclass(frozen=True)
class Mappings:
    """One process's mappings, sorted by start."""

    pid: int
    items: tuple[Mapping, ...]

    @classmethod
    def parse(cls, pid: int, text: str) -> Mappings:
        items = []
        for line in text.splitlines():
            fields = line.split(maxsplit=5)
            if len(fields) < 5:
                continue
            start, _, end = fields[0].partition("-")
            name = fields[5].strip() if len(fields) == 6 else ""
            items.append(Mapping(int(start, 16), int(end, 16), name))
        return cls(pid, tuple(sorted(items, key=lambda m: m.start)))

    @classmethod
    def read(cls, pid: int) -> Mappings | None:
        """The mappings of pid; None when the process is gone or may not be read."""
        try:
            with open(f"/proc/{pid}/maps") as f:
                return cls.parse(pid, f.read())
        except OSError:
            return None

    def name(self, start: int, end: int) -> str:
        """The names of the named mappings [start, end) overlaps, the largest share
        first, joined by '+' ('' when it lies in anonymous memory or none)."""
        starts = [m.start for m in self.items]
        first = max(0, bisect.bisect_right(starts, start) - 1)
        shares: dict[str, int] = {}
        for m in self.items[first:]:
            if m.start >= end:
                break
            shared = min(end, m.end) - max(start, m.start)
            if shared > 0 and m.name:
                shares[m.name] = shares.get(m.name, 0) + shared
        return "+".join(sorted(shares, key=lambda n: -shares[n]))

    @property
    def summaries(self) -> Sequence[tuple[str, Range]]:
        return ()

    def label(self, start: int, end: int) -> str:
        """name(), each file by its base name (rows in a terminal are narrow)."""
        return "+".join(os.path.basename(n) or n for n in self.name(start, end).split("+") if n)

    def to_damo(self) -> dict[str, Any]:
        """damo's ProcVmas (a record's FILE.vmas entry for one process)."""
        return {
            "pid": self.pid,
            "vmas": [{"start": m.start, "end": m.end, "name": m.name} for m in self.items],
        }

    @classmethod
    def from_damo(cls, kv: dict[str, Any]) -> Mappings:
        return cls(
            int(kv["pid"]),
            # damo names anonymous memory by the inode column, "0"
            tuple(
                Mapping(
                    int(v["start"]), int(v["end"]), "" if str(v["name"]).isdigit() else v["name"]
                )
                for v in kv["vmas"]
            ),
        )
