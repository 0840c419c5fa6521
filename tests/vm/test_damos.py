"""DAMOS pageout on anonymous memory with swap (zram), damond beside the guest kernel's DAMOS.

One guest boot (tests/vm/damos.py): damond's user backend (page_idle,
process_madvise) and then the guest kernel's own DAMOS, each with the scheme
"page out what saw no access for 2 s" over a fresh workload process whose
first half is written continuously. Both must swap the cold half out and keep
the hot half resident; damond's stats and tried regions must say so. How the
workload's throughput fares is bench/damos.py's subject (make bench).
"""

from __future__ import annotations

from typing import Any

import pytest
from damond_vm_run import Guest  # tests/vm/run.py, loaded by tests/vm/conftest.py
from guest_json import run_script  # tests/vm/guest_json.py
from test_scenarios import check_damond_ran_well, phase  # tests/vm/test_scenarios.py

COLD_SWAPPED = 0.8
"""At least this share of the cold half swapped out..."""
HOT_RESIDENT = 0.95
"""...while at least this share of the hot half stays resident."""


@pytest.fixture(scope="module")
def damos(guest: Guest, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    results = tmp_path_factory.mktemp("vm-damos")
    data, result = run_script(guest, "damos.py", [], "damos.json", results, timeout=900)
    print(f"\n[damos] results in {results} (guest run {result.seconds:.0f} s)")
    return data


def table(d: dict[str, Any], k: dict[str, Any]) -> str:
    rows = [("", "damond", "kernel")]
    for key, label in [
        ("cold_swapped", "cold half swapped"),
        ("hot_present", "hot half resident"),
        ("hot_present_min", "hot half resident, lowest seen"),
        ("seconds_to_result", "seconds from on"),
    ]:
        rows.append((label, str(d.get(key)), str(k.get(key))))
    for key in ("nr_tried", "nr_applied", "sz_applied"):
        rows.append((key, str(d["stats"][key]), str(k["stats"][key])))
    return "\n".join(f"{a:34} {b:>12} {c:>12}" for a, b, c in rows)


def test_cold_anonymous_memory_is_swapped_and_hot_stays(damos: dict[str, Any]) -> None:
    assert damos["swap"]["swap_total_kb"] > 0, damos["swap"]
    d, k = phase(damos, "damond"), phase(damos, "kernel")
    print(f"[damos] pageout of regions idle for 2 s, zram swap:\n{table(d, k)}")
    check_damond_ran_well(d)
    # the kernel's DAMOS swaps the cold half out on this guest, or the comparison says
    # nothing (its hot half is for the record: under a loaded host the emulated guest
    # can starve the workload for 2 s, and the kernel then pages its hot pages out too)
    assert k["cold_swapped"] >= COLD_SWAPPED, table(d, k)
    assert d["cold_swapped"] >= COLD_SWAPPED, (table(d, k), d["trace"])
    assert d["hot_present"] >= HOT_RESIDENT, (table(d, k), d["trace"])


def test_damonds_stats_and_tried_regions_say_what_happened(damos: dict[str, Any]) -> None:
    d = phase(damos, "damond")
    stats = d["stats"]
    assert stats["nr_tried"] >= stats["nr_applied"] >= 1, stats
    # the cold half was swapped out by the scheme: its bytes were applied to and tried
    assert stats["sz_applied"] >= COLD_SWAPPED * d["cold_bytes"], stats
    assert d["cold_tried_share"] >= COLD_SWAPPED, d["cold_tried_share"]
    assert stats["qt_exceeds"] == 0  # no quota
    # 2 s without access is 20 aggregations: nothing swapped before (residency is read
    # after snapshot N, when the daemon may be an aggregation or two further)
    first_swapped = next((seq for _, seq, _, cold in d["trace"] if cold > 0.01), None)
    assert first_swapped is None or first_swapped >= 20 - 2, d["trace"]
