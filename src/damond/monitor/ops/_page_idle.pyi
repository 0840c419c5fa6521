"""Types of the C module _page_idle.c (page_idle.py's prepare_sample and check_sample, and
the engine's fast path, Sampler)."""

from collections.abc import Callable
from typing import Any

NO_HEAD: int
PFN_HIDDEN: int
KERNEL_PAGE: int
KPF_LRU: int
KPF_COMPOUND_HEAD: int
KPF_COMPOUND_TAIL: int
KPF_NOPAGE: int
SAMPLE_PAGE: int
STALE: int
HIDDEN: int
MISSING: int
EXITED: int

def prepare(
    addrs: Any,
    heads: Any,
    pagemap_fd: int,
    kpageflags_fd: int,
    bitmap_fd: int,
    tails: dict[int, int],
    pagemap_gap: int,
    kpageflags_gap: int,
    write_gap: int,
    /,
) -> int: ...
def check(heads: Any, accessed: Any, bitmap_fd: int, read_gap: int, /) -> None: ...

class Sampler:
    def __init__(
        self,
        kpageflags_fd: int,
        bitmap_fd: int,
        pagemap_fd: int,
        pidfd: int,
        tails: dict[int, int],
        recover: Callable[[int], int],
        pagemap_gap: int,
        kpageflags_gap: int,
        write_gap: int,
        read_gap: int,
        forget_every: int,
        /,
    ) -> None: ...
    def prepare(self, starts: Any, ends: Any, uniforms: Any, offset: int, /) -> None: ...
    def check(self, nr_accesses: Any, /) -> None: ...
    def marked(self) -> tuple[bytes, bytes]: ...
    def close(self) -> None: ...
