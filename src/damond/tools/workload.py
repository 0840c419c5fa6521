"""The demo workload: one hot buffer written continuously, one cold buffer left alone.

``python -m damond.tools.workload --hot-mib 8 --cold-mib 56`` maps two anonymous
buffers, touches every page of both once (so they are resident), prints one
JSON line ``{"pid": …, "hot": [start, end], "cold": [start, end]}`` and then
writes one byte per page of the hot buffer on every pass until SIGTERM/SIGINT.
With ``--cold-file PATH`` the cold buffer is that file instead (written with
``--cold-mib`` of data, mapped read-only and read once: clean page cache, which
MADV_PAGEOUT can drop without swap).

The two buffers are separate mappings (VMAs), kept apart by a PROT_NONE guard
page so the kernel cannot merge them: the clear_refs access check only sees
per-mapping access information, so one mapping would blur hot and cold together.

The short sleep between passes matters beyond CPU use: clear_refs clears the
accessed bits without flushing the TLB, so a tight loop over a buffer that
fits in the TLB (8 MiB is 2048 pages) keeps hitting cached translations and
reads as mostly idle (measured: ~20% referenced with no sleep, ~80% with 1 ms,
where a 64 MiB buffer reads ~100% either way). Sleeping lets other tasks run
and evict those entries.
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
from dataclasses import dataclass
from types import FrameType

import numpy as np

PAGE = mmap.PAGESIZE
MIB = 1 << 20
PROT_NONE = 0

libc = ctypes.CDLL(None, use_errno=True)
"""The C library, with the argument types of the calls made here (mmap, mprotect, munmap,
madvise); also used by the workload of tests/vm/scenarios.py."""
libc.mmap.restype = ctypes.c_void_p
libc.mmap.argtypes = [
    ctypes.c_void_p,
    ctypes.c_size_t,
    ctypes.c_int,
    ctypes.c_int,
    ctypes.c_int,
    ctypes.c_long,
]
libc.mprotect.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
libc.munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
libc.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
MAP_FAILED = ctypes.c_void_p(-1).value


def check_errno(ok: bool, what: str) -> None:
    """Raise OSError from the C library's errno unless ``ok``."""
    if not ok:
        err = ctypes.get_errno()
        raise OSError(err, f"{what}: {os.strerror(err)}")


def map_anonymous(
    length: int, addr: int = 0, flags: int = 0, prot: int = mmap.PROT_READ | mmap.PROT_WRITE
) -> int:
    """mmap ``length`` bytes of private anonymous memory (at ``addr`` if not 0, with the
    extra mmap ``flags``); the mapping's address."""
    base = libc.mmap(
        addr or None, length, prot, mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS | flags, -1, 0
    )
    check_errno(base is not None and base != MAP_FAILED, f"mmap {length} bytes at {addr:#x}")
    return int(base)


def view(address: int, length: int) -> np.ndarray:
    """The ``length`` bytes at ``address`` as a numpy byte array (no copy)."""
    return np.ctypeslib.as_array((ctypes.c_uint8 * length).from_address(address))


@dataclass
class Buffers:
    """The hot and cold buffers, as numpy byte arrays over one reservation."""

    base: int
    length: int
    hot: np.ndarray
    cold: np.ndarray

    @staticmethod
    def address(array: np.ndarray) -> tuple[int, int]:
        """[start, end) of a buffer in the process's address space."""
        start = int(array.__array_interface__["data"][0])
        return start, start + array.nbytes

    def close(self) -> None:
        """Unmap everything (the arrays must not be used afterwards)."""
        libc.munmap(self.base, self.length)


def allocate(hot_bytes: int, cold_bytes: int) -> Buffers:
    """Map hot | guard page | cold; the guard splits them into two mappings."""
    hot_bytes = -(-hot_bytes // PAGE) * PAGE
    cold_bytes = -(-cold_bytes // PAGE) * PAGE
    if hot_bytes <= 0 or cold_bytes <= 0:
        raise ValueError("both buffers need at least one page")
    length = hot_bytes + PAGE + cold_bytes
    base = map_anonymous(length)
    check_errno(libc.mprotect(base + hot_bytes, PAGE, PROT_NONE) == 0, "mprotect")
    return Buffers(
        base=base,
        length=length,
        hot=view(base, hot_bytes),
        cold=view(base + hot_bytes + PAGE, cold_bytes),
    )


def touch(array: np.ndarray, value: int) -> None:
    """Write one byte in every page of ``array``."""
    array[::PAGE] = value


class _Stop:
    """Turns SIGTERM/SIGINT into a flag the write loop polls."""

    def __init__(self) -> None:
        self.requested = False
        signal.signal(signal.SIGTERM, self._handle)
        signal.signal(signal.SIGINT, self._handle)

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        self.requested = True


def map_file(path: str, length: int) -> np.ndarray:
    """``length`` bytes of data written to path, mapped read-only and read once."""
    length = -(-length // PAGE) * PAGE
    with open(path, "wb") as f:
        chunk = bytes(range(256)) * (MIB // 256)
        for _ in range(length // MIB):
            f.write(chunk)
        f.write(chunk[: length % MIB])
    with open(path, "rb") as f:
        mapped = mmap.mmap(f.fileno(), length, mmap.MAP_SHARED, mmap.PROT_READ)
    array = np.frombuffer(mapped, dtype=np.uint8)
    int(array[::PAGE].sum())  # read every page: resident, clean
    return array


def run(hot_mib: float, cold_mib: float, pause_s: float, cold_file: str | None = None) -> None:
    """Allocate, announce the buffers on stdout, then keep the hot part hot."""
    stop = _Stop()
    buffers = allocate(int(hot_mib * MIB), int(cold_mib * MIB))
    touch(buffers.hot, 1)
    cold = buffers.cold
    if cold_file is None:
        touch(cold, 1)
    else:
        cold = map_file(cold_file, int(cold_mib * MIB))
    info = {
        "pid": os.getpid(),
        "hot": list(Buffers.address(buffers.hot)),
        "cold": list(Buffers.address(cold)),
    }
    sys.stdout.write(json.dumps(info) + "\n")
    sys.stdout.flush()
    value = 1
    while not stop.requested:
        value = value % 255 + 1
        touch(buffers.hot, value)
        if pause_s > 0:
            time.sleep(pause_s)


def main(argv: list[str] | None = None) -> int:
    """Command line entry point."""
    parser = argparse.ArgumentParser(
        prog="python -m damond.tools.workload",
        description="Keep one buffer hot and another cold, for damond to observe.",
    )
    parser.add_argument("--hot-mib", type=float, default=8.0, help="hot buffer size (MiB)")
    parser.add_argument("--cold-mib", type=float, default=56.0, help="cold buffer size (MiB)")
    parser.add_argument(
        "--pause-ms",
        type=float,
        default=1.0,
        help="sleep between passes over the hot buffer (ms; 0: none)",
    )
    parser.add_argument(
        "--cold-file", help="make the cold buffer this file's data, mapped read-only (clean)"
    )
    args = parser.parse_args(argv)
    try:
        run(args.hot_mib, args.cold_mib, args.pause_ms / 1000, args.cold_file)
    except (OSError, ValueError) as exc:
        print(f"workload: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
