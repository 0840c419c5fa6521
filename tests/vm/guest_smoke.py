"""Runs INSIDE the test guest (see test_guest_smoke.py); writes a JSON report.

Usage (in the guest): python guest_smoke.py OUTPUT.json

Each check records its findings or its error, so one failure hides nothing
else. Never run this on the host: it writes to /sys/kernel/mm/damon.
"""

from __future__ import annotations

import importlib.metadata
import json
import mmap
import os
import platform
import struct
import subprocess
import sys
import time
from collections.abc import Callable
from typing import Any

from guest_json import findings, outside_guest, write_report  # tests/vm/guest_json.py

PAGE = mmap.PAGESIZE
BITMAP = "/sys/kernel/mm/page_idle/bitmap"
DAMON_ADMIN = "/sys/kernel/mm/damon/admin"
PFN_MASK = (1 << 55) - 1
PRESENT = 1 << 63
BUFFER_MIB = 64


def pfns_of(addr: int, npages: int) -> list[int]:
    """PFNs of the pages at addr from /proc/self/pagemap (0 when absent)."""
    with open("/proc/self/pagemap", "rb", buffering=0) as f:
        raw = os.pread(f.fileno(), npages * 8, (addr // PAGE) * 8)
    entries = struct.unpack(f"<{npages}Q", raw)
    return [e & PFN_MASK if e & PRESENT else 0 for e in entries]


def bitmap_words(pfns: list[int]) -> list[int]:
    """The bitmap word indexes (64 pages each) that cover pfns."""
    return sorted({p // 64 for p in pfns})


def set_idle(fd: int, pfns: list[int]) -> None:
    """Mark every page of the 64-page groups holding pfns idle."""
    ones = struct.pack("<Q", (1 << 64) - 1)
    for word in bitmap_words(pfns):
        os.pwrite(fd, ones, word * 8)


def idle_bits(fd: int, pfns: list[int]) -> list[bool]:
    words = {w: struct.unpack("<Q", os.pread(fd, 8, w * 8))[0] for w in bitmap_words(pfns)}
    return [bool(words[p // 64] >> (p % 64) & 1) for p in pfns]


def check_page_idle() -> dict[str, Any]:
    out: dict[str, Any] = {"bitmap_exists": os.path.exists(BITMAP)}
    if not out["bitmap_exists"]:
        return out
    npages = BUFFER_MIB * 1024 * 1024 // PAGE
    half = npages // 2
    buf = mmap.mmap(-1, npages * PAGE, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    buf.madvise(mmap.MADV_NOHUGEPAGE)
    for i in range(npages):
        buf[i * PAGE] = 1  # allocate every page
    import ctypes

    view = ctypes.c_char.from_buffer(buf)
    addr = ctypes.addressof(view)
    del view  # an exported buffer would keep buf from closing
    pfns = pfns_of(addr, npages)
    out["pages"] = npages
    out["pages_without_pfn"] = sum(1 for p in pfns if p == 0)
    if out["pages_without_pfn"]:
        raise RuntimeError(f"{out['pages_without_pfn']} pages have no PFN in pagemap")
    fd = os.open(BITMAP, os.O_RDWR)
    try:
        set_idle(fd, pfns)
        after_set = idle_bits(fd, pfns)
        out["idle_right_after_marking"] = sum(after_set)
        for i in range(half):  # touch (write) the first half
            buf[i * PAGE] = 2
        bits = idle_bits(fd, pfns)
    finally:
        os.close(fd)
    out["touched_pages"] = half
    out["touched_idle"] = sum(bits[:half])
    out["untouched_pages"] = npages - half
    out["untouched_idle"] = sum(bits[half:])
    # THP: AnonHugePages of this mapping should be 0 after MADV_NOHUGEPAGE.
    out["thp_enabled"] = _read("/sys/kernel/mm/transparent_hugepage/enabled")
    buf.close()
    return out


def _read(path: str) -> str:
    with open(path) as f:
        return f.read().strip()


def check_damon() -> dict[str, Any]:
    out: dict[str, Any] = {"admin_exists": os.path.isdir(DAMON_ADMIN)}
    if not out["admin_exists"]:
        return out
    kdamonds = f"{DAMON_ADMIN}/kdamonds"
    out["nr_kdamonds_before"] = int(_read(f"{kdamonds}/nr_kdamonds"))
    # Create one kdamond with one context to read the available operations.
    try:
        with open(f"{kdamonds}/nr_kdamonds", "w") as f:
            f.write("1")
        with open(f"{kdamonds}/0/contexts/nr_contexts", "w") as f:
            f.write("1")
        out["avail_operations"] = _read(f"{kdamonds}/0/contexts/0/avail_operations").split()
    finally:
        with open(f"{kdamonds}/nr_kdamonds", "w") as f:
            f.write("0")
    return out


def check_imports() -> dict[str, Any]:
    t0 = time.monotonic()
    import dbus_fast
    import numpy

    import damond

    return {
        "python": sys.executable,
        "python_version": platform.python_version(),
        "prefix": sys.prefix,
        "numpy": numpy.__version__,
        "dbus_fast": importlib.metadata.version("dbus-fast"),
        "dbus_fast_file": dbus_fast.__file__,
        "damond_file": damond.__file__,
        "import_seconds": round(time.monotonic() - t0, 2),
    }


def check_dbus_daemon() -> dict[str, Any]:
    proc = subprocess.run(
        ["dbus-daemon", "--version"], capture_output=True, text=True, timeout=60, check=False
    )
    return {
        "returncode": proc.returncode,
        "first_line": (proc.stdout.splitlines() or [""])[0],
        "stderr": proc.stderr[-500:],
    }


def main() -> int:
    if outside_guest("guest_smoke.py"):
        return 2
    output = sys.argv[1]
    report: dict[str, Any] = {"kernel": platform.release(), "cpus": os.cpu_count()}
    checks: dict[str, Callable[[], dict[str, Any]]] = {
        "page_idle": check_page_idle,
        "damon": check_damon,
        "imports": check_imports,
        "dbus_daemon": check_dbus_daemon,
    }
    for name, check in checks.items():
        t0 = time.monotonic()
        report[name] = findings(check)
        report[name]["seconds"] = round(time.monotonic() - t0, 2)
        print(f"guest_smoke: {name}: {json.dumps(report[name])}", flush=True)
    write_report(output, report)
    return 0


if __name__ == "__main__":
    sys.exit(main())
