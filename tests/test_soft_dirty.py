"""soft_dirty on this host: its arithmetic, its probe, its place in the registry.

This host's kernel has no CONFIG_MEM_SOFT_DIRTY: the check itself is tested
against the guest kernel (tests/vm/test_guest_soft_dirty.py).
"""

from __future__ import annotations

import mmap
import os

import numpy as np
import pytest
from ops_helpers import registry_with  # tests/ops_helpers.py

from damond.monitor import ops
from damond.monitor.ops import soft_dirty as sd
from damond.monitor.ops.page_idle import ALL_ONES, KERNEL_PAGE

P = KERNEL_PAGE


def test_soft_dirty_is_bit_55_of_a_read_entry() -> None:
    entries = np.array(
        [sd.PM_SOFT_DIRTY | 1 << 63 | 5, 1 << 63 | 5, sd.PM_SOFT_DIRTY, ALL_ONES, 0],
        dtype=np.uint64,
    )
    assert sd.soft_dirty(entries).tolist() == [True, False, True, False, False]


def test_reads_are_what_was_referenced_and_not_written() -> None:
    maps = np.array([[0, 100 * P], [100 * P, 200 * P], [200 * P, 300 * P]], np.uint64)
    referenced = np.array([50 * P, 50 * P, 10 * P], np.uint64)
    written = np.array([50.0, 0.0, 20.0])  # all of it / none of it / more than referenced
    # written pages are accessed on their own: reads are the rest of the mapping's pages
    assert sd.read_fraction(maps, referenced, written).tolist() == [0.0, 0.5, 0.0]
    assert sd.read_fraction(maps, referenced, np.array([25.0, 0, 0]))[0] == 25 / 75


@pytest.mark.skipif(ops.probe_soft_dirty() == "", reason="this kernel tracks soft-dirty bits")
def test_this_host_has_no_soft_dirty() -> None:
    registry = ops.Registry()
    assert registry.why_unavailable("soft_dirty") == (
        "soft_dirty: CONFIG_MEM_SOFT_DIRTY is not set: a freshly written page shows no "
        "soft-dirty bit in /proc/self/pagemap"
    )
    assert "soft_dirty" not in registry.available_access_checks()
    with pytest.raises(ops.Unsupported, match="CONFIG_MEM_SOFT_DIRTY"):
        registry.make_access("soft_dirty", ops.ProcessTable())


def test_probing_changes_nothing_of_ours(tmp_path: object) -> None:
    """The probe writes a page of its own fresh mapping, never clear_refs: a page of
    ours written before keeps its soft-dirty state (here: the kernel's answer)."""
    mine = mmap.mmap(-1, P)
    mine[0] = 1
    before = os.listdir("/proc/self/fd")
    assert ops.probe_soft_dirty() in (
        "",
        "soft_dirty: CONFIG_MEM_SOFT_DIRTY is not set: a freshly written page shows no "
        "soft-dirty bit in /proc/self/pagemap",
    )
    assert os.listdir("/proc/self/fd") == before  # no fd left open
    mine.close()


def test_a_pagemap_that_does_not_open_is_the_reason(tmp_path: object) -> None:
    assert ops.probe_soft_dirty("/nonexistent/pagemap") == (
        "soft_dirty: /nonexistent/pagemap: No such file or directory"
    )


def test_auto_takes_soft_dirty_after_page_idle_and_before_clear_refs() -> None:
    registry = registry_with(probes={"page_idle": "page_idle: nope", "soft_dirty": ""})
    assert registry.available_access_checks() == ["soft_dirty", "clear_refs"]
    assert registry.resolve_access_check("auto", "vaddr") == "soft_dirty"
    assert registry.resolve_access_check("auto", "fvaddr") == "soft_dirty"
    assert registry.access_check("soft_dirty").granularity == "page-writes"
    with pytest.raises(ValueError, match="soft_dirty works per process: not for paddr"):
        registry.resolve_access_check("soft_dirty", "paddr")
    both = registry_with(probes={"page_idle": "", "soft_dirty": ""})
    assert both.resolve_access_check("auto", "vaddr") == "page_idle"
