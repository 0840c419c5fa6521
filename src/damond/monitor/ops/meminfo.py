"""The system's free memory rate, the metric of DAMOS watermarks (free_mem_rate).

The kernel computes it as NR_FREE_PAGES * 1000 / totalram_pages(); /proc/meminfo
prints the same two counts as MemFree and MemTotal.
"""

from __future__ import annotations

MEMINFO = "/proc/meminfo"


def parse_free_mem_rate(text: bytes) -> int:
    """MemFree per thousand of MemTotal, from /proc/meminfo's text."""
    fields = {}
    for line in text.split(b"\n"):
        name, _, rest = line.partition(b":")
        if name in (b"MemTotal", b"MemFree"):
            fields[name] = int(rest.split()[0])
            if len(fields) == 2:
                break
    total = fields.get(b"MemTotal", 0)
    if not total or b"MemFree" not in fields:
        raise ValueError(f"{MEMINFO} has no MemTotal and MemFree")
    return fields[b"MemFree"] * 1000 // total


def free_mem_rate(path: str = MEMINFO) -> int:
    """This machine's free memory now, per thousand of its RAM."""
    with open(path, "rb") as f:
        return parse_free_mem_rate(f.read())
