"""DAMOS pageout on anonymous memory with swap (zram), damond beside the guest kernel's DAMOS.

One guest boot (tests/vm/damos.py): damond's user backend (page_idle,
process_madvise), the guest kernel's own DAMOS driven directly, and then
damond on its kernel backend (the scheme handed to the kernel's DAMOS, its
results read back; last, so that the comparison of the first two runs as it
did), each with the scheme "page out what saw no access for 2 s" over a
fresh workload process whose first half is written continuously.
Each must swap the cold half out; damond's engine must keep the hot half
resident; damond's stats and tried regions must say what happened, whichever
backend did it. How the workload's throughput fares is bench/damos.py's
subject (make bench).
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


def table(*phases: tuple[str, dict[str, Any]]) -> str:
    rows = [("", *(name for name, _ in phases))]
    for key, label in [
        ("cold_swapped", "cold half swapped"),
        ("hot_present", "hot half resident"),
        ("hot_present_min", "hot half resident, lowest seen"),
        ("seconds_to_result", "seconds from on"),
    ]:
        rows.append((label, *(str(p.get(key)) for _, p in phases)))
    for key in ("nr_tried", "nr_applied", "sz_applied"):
        rows.append((key, *(str(p["stats"][key]) for _, p in phases)))
    return "\n".join(f"{row[0]:34}" + "".join(f" {c:>14}" for c in row[1:]) for row in rows)


def test_cold_anonymous_memory_is_swapped_and_hot_stays(damos: dict[str, Any]) -> None:
    assert damos["swap"]["swap_total_kb"] > 0, damos["swap"]
    d, k = phase(damos, "damond"), phase(damos, "kernel")
    shown = table(("damond", d), ("damond kernel", damos["damond_kernel"]), ("kernel", k))
    print(f"[damos] pageout of regions idle for 2 s, zram swap:\n{shown}")
    check_damond_ran_well(d)
    # the kernel's DAMOS swaps the cold half out on this guest, or the comparison says
    # nothing (its hot half is for the record: under a loaded host the emulated guest
    # can starve the workload for 2 s, and the kernel then pages its hot pages out too)
    assert k["cold_swapped"] >= COLD_SWAPPED, shown
    assert d["cold_swapped"] >= COLD_SWAPPED, (shown, d["trace"])
    assert d["hot_present"] >= HOT_RESIDENT, (shown, d["trace"])


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


def test_on_the_kernel_backend_the_kernel_pages_out_and_damond_says_so(
    damos: dict[str, Any],
) -> None:
    """The scheme handed to the kernel's DAMOS swaps the cold half out (its hot half is
    the kernel's business, as above), and what damond reads back over D-Bus agrees: the
    stats count the cold half applied, the tried regions cover it and match the pattern,
    all of target 0."""
    k = phase(damos, "damond_kernel")
    assert k["effective_backend"] == "kernel"
    assert k["daemon_exit_code"] == 0 and not k["daemon_traceback"], k["daemon_log_tail"]
    assert k["cold_swapped"] >= COLD_SWAPPED, (table(("damond kernel", k)), k["trace"])
    stats = k["stats"]
    assert stats["nr_tried"] >= stats["nr_applied"] >= 1, stats
    assert stats["sz_tried"] >= stats["sz_applied"] >= COLD_SWAPPED * k["cold_bytes"], stats
    assert stats["qt_exceeds"] == 0
    assert k["cold_tried_share"] >= COLD_SWAPPED, k["cold_tried_share"]
    tried = k["tried_regions"]
    assert tried and all(t == 0 and nr == 0 and age >= 20 for t, _, _, nr, age in tried), tried
