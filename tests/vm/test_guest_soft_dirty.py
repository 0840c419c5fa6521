"""SoftDirtyAccess against a real kernel with CONFIG_MEM_SOFT_DIRTY (the tests/vm guest).

One boot runs soft_dirty_checks.py; the assertions are made here. The child's
two malloc'd buffers share one mapping: writes must be told apart per page
(what clear_refs cannot), reads of a third buffer are counted per mapping.
"""

from __future__ import annotations

from typing import Any

import pytest
from damond_vm_run import Guest  # tests/vm/run.py, loaded by tests/vm/conftest.py
from guest_json import run_script  # tests/vm/guest_json.py

SAMPLES = 200


@pytest.fixture(scope="module")
def report(guest: Guest, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    found, result = run_script(
        guest, "soft_dirty_checks.py", [], "soft_dirty.json", tmp_path_factory.mktemp("sd")
    )
    found["_describe"] = result.describe()
    return found


def test_soft_dirty_is_offered_after_page_idle(report: dict[str, Any]) -> None:
    assert report["why_soft_dirty"] == "", report
    assert report["avail_access_checks"] == ["page_idle", "soft_dirty", "clear_refs"], report
    assert report["auto_vaddr"] == "page_idle", report


def test_writes_are_seen_per_page_inside_one_mapping(report: dict[str, Any]) -> None:
    """The written buffer's sampled pages, all; its neighbour in the same mapping, none."""
    assert report["one_mapping"], report
    for found in report["written"]:
        assert found["written"] >= 0.95 * SAMPLES, report["written"]
        assert found["idle"] == 0 and found["read"] == 0, report["written"]
    assert report["quiet"] == {"written": 0, "idle": 0, "read": 0}, report["quiet"]


def test_reads_are_counted_per_mapping_in_whole_samples(report: dict[str, Any]) -> None:
    """Read all: every sample after the first measurement counts the whole mapping;
    read half: every other sample, all its sampled pages at once; never the others."""
    read_all = [s["read"] for s in report["read_all"]]
    assert set(read_all[10:]) == {SAMPLES}, read_all
    read_half = [s["read"] for s in report["read_half"]]
    assert set(read_half[10:]) == {0, SAMPLES}, read_half
    assert 8 <= read_half[10:].count(SAMPLES) <= 12, read_half
    for s in report["read_all"] + report["read_half"]:
        assert s["written"] == 0 and s["idle"] == 0, s


def test_a_target_that_exits_is_gone(report: dict[str, Any]) -> None:
    assert report["gone"] == ["TargetGone", "TargetGone"], report["gone"]
