"""Two equal malloc'd buffers in one mapping, written one at a time (the selftest's workload).

``python -m damond.tools.pair --mib 10 --switch-s 2`` allocates two buffers
with the C library's malloc, as the kernel's DAMON selftest program
access_memory does: glibc serves each from its own mmap, places the second
right next to the first, and the kernel merges the two into one VMA. It then
memsets one buffer in a loop for --switch-s seconds of wall time, then the
other, and so on (--switch-s 0: only the first, the second stays idle);
--per-page writes one byte per page instead, which covers a large buffer in
a fraction of a sample interval. It
prints one JSON line first: ``{"pid", "buffers": [[start, end], [start, end]],
"mapping": [start, end], "one_mapping": bool}``, and runs until SIGTERM.

This is what per-mapping access information cannot tell apart (both
buffers are one mapping), and what DAMON's working-set selftest estimates:
the written buffer's size.
"""

from __future__ import annotations

import argparse
import ctypes
import json
import mmap
import os
import signal
import sys
import time

import numpy as np

libc = ctypes.CDLL(None, use_errno=True)
libc.malloc.restype = ctypes.c_void_p
libc.malloc.argtypes = [ctypes.c_size_t]
libc.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]

MADV_HUGEPAGE = 14

MIB = 1 << 20


def mapping_of(address: int) -> tuple[int, int]:
    """[start, end) of the mapping holding address, from /proc/self/maps."""
    with open("/proc/self/maps") as f:
        for line in f:
            start, end = (int(x, 16) for x in line.split(None, 1)[0].split("-"))
            if start <= address < end:
                return start, end
    raise ValueError(f"{address:#x} is in no mapping")


def allocate(size: int, huge: bool) -> tuple[int, int]:
    """Two buffers of size bytes from malloc, both written once (resident); with huge,
    in transparent huge pages where the kernel can (MADV_HUGEPAGE first)."""
    buffers = []
    for _ in range(2):
        address = libc.malloc(size)
        if not address:
            raise MemoryError(f"malloc({size}) failed")
        if huge:
            start, end = mapping_of(address)
            libc.madvise(start, end - start, MADV_HUGEPAGE)
        ctypes.memset(address, 1, size)
        buffers.append(int(address))
    return buffers[0], buffers[1]


def page_bytes(address: int, size: int) -> np.ndarray:
    """The first byte of every page of a buffer, as a numpy view (writes go to the buffer)."""
    whole = np.ctypeslib.as_array((ctypes.c_uint8 * size).from_address(address))
    return whole[:: mmap.PAGESIZE]


def run(
    size: int, switch_s: float, pause_s: float, huge: bool = False, per_page: bool = False
) -> None:
    """Announce the buffers, then memset them in turn until SIGTERM/SIGINT."""
    stop = False

    def halt(signum: int, frame: object) -> None:
        nonlocal stop
        stop = True

    signal.signal(signal.SIGTERM, halt)
    signal.signal(signal.SIGINT, halt)
    first, second = allocate(size, huge)
    mapping = mapping_of(first)
    info = {
        "pid": os.getpid(),
        "buffers": [[first, first + size], [second, second + size]],
        "mapping": list(mapping),
        "one_mapping": mapping == mapping_of(second),
    }
    sys.stdout.write(json.dumps(info) + "\n")
    sys.stdout.flush()
    pages = [page_bytes(first, size), page_bytes(second, size)]
    start = time.monotonic()
    value = 2
    while not stop:
        turn = int((time.monotonic() - start) / switch_s) % 2 if switch_s > 0 else 0
        value = value % 250 + 2
        if per_page:
            pages[turn][:] = value
        else:
            ctypes.memset((first, second)[turn], value, size)
        if pause_s > 0:
            time.sleep(pause_s)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m damond.tools.pair",
        description="Two malloc'd buffers in one mapping, written one at a time.",
    )
    parser.add_argument("--mib", type=float, default=10.0, help="size of each buffer (MiB)")
    parser.add_argument(
        "--switch-s",
        type=float,
        default=2.0,
        help="seconds each buffer is written before the other (0: only the first)",
    )
    parser.add_argument(
        "--pause-ms", type=float, default=0.0, help="sleep between memsets (ms; 0: none)"
    )
    parser.add_argument("--thp", action="store_true", help="ask for transparent huge pages")
    parser.add_argument(
        "--per-page",
        action="store_true",
        help="write one byte per page instead of memset (a pass is far shorter)",
    )
    args = parser.parse_args(argv)
    try:
        run(int(args.mib * MIB), args.switch_s, args.pause_ms / 1000, args.thp, args.per_page)
    except (OSError, ValueError, MemoryError) as exc:
        print(f"pair: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
