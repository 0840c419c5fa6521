"""Types of the C module _page_idle.c (page_idle.py's prepare_sample and check_sample)."""

from typing import Any

NO_HEAD: int
PFN_HIDDEN: int
KERNEL_PAGE: int
KPF_LRU: int
KPF_COMPOUND_HEAD: int
KPF_COMPOUND_TAIL: int
KPF_NOPAGE: int

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
