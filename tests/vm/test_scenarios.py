"""damond against a real kernel, next to the kernel's own DAMON (tests/vm/scenarios.py).

One guest boot per scenario group (1 vCPU: page_idle reads are deterministic
there), each running the real dbus-daemon, the real daemon, busctl and real
workload processes; scenarios.py only measures and writes JSON into the
results directory, these tests decide.

Time is counted as DAMON counts it. With the default intervals (5 ms samples,
100 ms aggregations) the guest kernel takes 400 samples in 2 s; damond in
the guest (Python under TCG, about 15x slower than on the host) takes far
fewer, so "after 2 s" means after 400 samples = 20 aggregations for damond,
and the wall-clock figure (how many samples damond managed in 2 s, and what
it saw then) is printed and kept in the JSON. Hot/cold verdicts are the mean
of the last 5 aggregations up to that point, for damond and the kernel alike:
a region that straddles the edge of the buffer for an aggregation or two is
DAMON's normal state, not its verdict.

Each scenario also asserts that damond offers page_idle and that `auto`
resolved to it: on this kernel anything else would be a regression.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from damond_vm_run import Guest  # tests/vm/run.py, loaded by tests/vm/conftest.py
from guest_json import run_script  # tests/vm/guest_json.py

SCENARIO_TIMEOUT = 1200.0

HOT_SHARE = 0.9
"""Scenario 1: at least this share of the hot bytes in regions with nr_accesses > 0,
and of the cold bytes in regions with nr_accesses == 0."""
KERNEL_TOLERANCE = 0.10
"""Scenario 2: damond's shares within 10 percentage points of the kernel's."""
AGGREGATIONS = 20
"""2 s of DAMON time at the default intervals (scenarios.AGGREGATIONS)."""


def run_scenario(guest: Guest, name: str, results: Path) -> dict[str, Any]:
    data, result = run_script(
        guest, "scenarios.py", [name], f"{name}.json", results, timeout=SCENARIO_TIMEOUT
    )
    data["_results_dir"] = str(results)
    print(f"\n[{name}] results in {results} (guest run {result.seconds:.0f} s)")
    return data


def scenario_fixture(name: str) -> Any:
    @pytest.fixture(scope="module")
    def fixture(guest: Guest, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
        return run_scenario(guest, name, tmp_path_factory.mktemp(f"vm-{name}"))

    return fixture


hotcold = scenario_fixture("hotcold")
thp = scenario_fixture("thp")
moving = scenario_fixture("moving")
paddr = scenario_fixture("paddr")
lifecycle = scenario_fixture("lifecycle")


def phase(data: dict[str, Any], name: str) -> dict[str, Any]:
    record: dict[str, Any] = data[name]
    if "error" in record:
        log = "\n".join(record.get("daemon_log_tail", []))
        pytest.fail(
            f"{data['scenario']}/{name} failed in the guest:\n{record['error']}\n"
            f"damond's log (its threads' stacks when it hung):\n{log}",
            pytrace=False,
        )
    return record


def check_damond_ran_well(record: dict[str, Any]) -> None:
    """page_idle offered and chosen by auto; the daemon exited 0 without a traceback."""
    assert "page_idle" in record["avail_access_checks"], record["avail_access_checks"]
    assert record["access_check"] == "auto"
    assert record["resolved_access_check"] == "page_idle", (
        f"auto resolved to {record['resolved_access_check']!r}, not page_idle"
    )
    assert record["daemon_exit_code"] == 0, record.get("daemon_hang_report") or record.get(
        "daemon_log_tail"
    )
    assert not record["daemon_traceback"], "\n".join(record["daemon_log_tail"])


def pct(x: float | None) -> str:
    return "  n/a" if x is None else f"{100 * x:5.1f}"


def side_by_side(damond: dict[str, Any], kernel: dict[str, Any], unit: str = "bytes") -> str:
    """The comparison table printed by the scenario 2 (and 4, 5) tests."""
    dm, km = damond["mean_last"], kernel["mean_last"]
    wall = damond.get("at_wall_2s", {})
    rows = [
        f"{'':34} {'damond':>10} {'kernel':>10}",
        f"{'hot ' + unit + ' in accessed regions %':34} {pct(dm['hot_accessed_share']):>10} "
        f"{pct(km['hot_accessed_share']):>10}",
        f"{'cold ' + unit + ' in idle regions %':34} {pct(dm['cold_idle_share']):>10} "
        f"{pct(km['cold_idle_share']):>10}",
        f"{'  (mean of aggregations)':34} {dm['n']:>10} {km['n']:>10}",
        f"{'last: hot % / cold %':34} "
        f"{pct(damond['hot_accessed_share']) + '/' + pct(damond['cold_idle_share']):>10} "
        f"{pct(kernel['hot_accessed_share']) + '/' + pct(kernel['cold_idle_share']):>10}",
        f"{'regions (last)':34} {damond['nr_regions']:>10} {kernel['nr_regions']:>10}",
        f"{'samples to the result':34} {damond['samples']:>10} {'~400':>10}",
        f"{'seconds on -> result':34} {damond['seconds_on_to_result']:>10} "
        f"{kernel['seconds_on_to_regions']:>10}",
        f"{'damond samples in 2 s wall (/400)':34} {wall.get('samples', 'n/a'):>10}",
    ]
    return "\n".join(rows)


# -- 1. hot/cold through the walkthrough -------------------------------------------------------


def test_hot_and_cold_halves_told_apart(hotcold: dict[str, Any]) -> None:
    d = phase(hotcold, "damond")
    check_damond_ran_well(d)
    wall = d["at_wall_2s"]
    print(
        f"[hotcold] damond: {wall.get('samples')} samples in 2 s of wall time "
        f"(nominal 400), {d['samples_per_second']} samples/s; result after "
        f"{d['samples']} samples ({d['seconds_on_to_result']} s)"
    )
    assert d["seq"] >= AGGREGATIONS and d["samples_per_aggregation"] == 20
    mean = d["mean_last"]
    assert mean["n"] >= 3, mean
    assert mean["hot_accessed_share"] >= HOT_SHARE, mean
    assert mean["cold_idle_share"] >= HOT_SHARE, mean


# -- 2. the same workload under the kernel's own DAMON -----------------------------------------


def test_hot_cold_matches_kernel_damon(hotcold: dict[str, Any]) -> None:
    d, k = phase(hotcold, "damond"), phase(hotcold, "kernel")
    table = side_by_side(d, k)
    print(f"[hotcold] damond vs the guest kernel's DAMON (vaddr, same workload):\n{table}")
    comparison = {
        "damond": {key: d[key] for key in ("mean_last", "at_wall_2s", "samples", "nr_regions")},
        "kernel": {key: k[key] for key in ("mean_last", "nr_regions", "seconds_on_to_regions")},
    }
    Path(hotcold["_results_dir"], "comparison.json").write_text(json.dumps(comparison, indent=1))
    check_damond_ran_well(d)
    # the kernel itself must have told them apart, or the comparison says nothing
    assert k["mean_last"]["hot_accessed_share"] >= HOT_SHARE, table
    for key in ("hot_accessed_share", "cold_idle_share"):
        diff = abs(d["mean_last"][key] - k["mean_last"][key])
        assert diff <= KERNEL_TOLERANCE, f"{key}: {diff:.3f} apart\n{table}"


# -- 3. a moving hot spot ----------------------------------------------------------------------


def test_moving_hot_spot_is_followed(moving: dict[str, Any]) -> None:
    d = phase(moving, "damond")
    check_damond_ran_well(d)
    moves = d["moves"]
    assert len(moves) == 5
    lines = [
        f"slot {m['slot']}: followed after {m['followed_after_aggregations']} aggregations "
        f"({m.get('followed_after_wall_s')} s wall), both at 90 % after "
        f"{m['followed_90_after_aggregations']}"
        for m in moves
    ]
    print("[moving] " + "; ".join(lines) + f"; {d['samples_per_second']} samples/s")
    kernel = moving.get("kernel", {})
    if "moves" in kernel:  # for the record: the kernel's DAMON on the same moves
        print(
            "[moving] the guest kernel's DAMON, same moves (seconds after the move, at "
            "80 % / 90 %): "
            + "; ".join(
                f"slot {m['slot']}: {m['followed_after_s']} / {m['followed_90_after_s']}"
                for m in kernel["moves"]
            )
        )
    for m in moves[1:]:
        followed = m["followed_after_aggregations"]
        assert followed is not None and followed <= AGGREGATIONS, (m["slot"], m["trace"])


# -- 4. transparent huge pages -----------------------------------------------------------------


def test_thp_hot_and_cold_told_apart(thp: dict[str, Any]) -> None:
    workload = thp["workload"]
    assert workload["anon_huge_kb"] > 0, "the buffer got no transparent huge pages"
    d, k = phase(thp, "damond"), phase(thp, "kernel")
    table = side_by_side(d, k)
    print(
        f"[thp] AnonHugePages {workload['anon_huge_kb']} kB of 65536 kB; damond vs kernel:\n{table}"
    )
    check_damond_ran_well(d)
    assert d["mean_last"]["hot_accessed_share"] >= HOT_SHARE, table
    assert d["mean_last"]["cold_idle_share"] >= HOT_SHARE, table


# -- 5. physical address space -----------------------------------------------------------------


def test_paddr_sees_the_hot_pages(paddr: dict[str, Any]) -> None:
    w = paddr["workload"]
    assert w["pages_without_pfn"] == 0, w
    d, k = phase(paddr, "damond"), phase(paddr, "kernel")
    table = side_by_side(d, k, unit="pages")
    print(
        f"[paddr] {w['pages']} pages in {w['contiguous_runs']} physically contiguous runs, "
        f"region = their PFN hull ({w['pfn_hull_pages']} pages); damond vs kernel:\n{table}"
    )
    check_damond_ran_well(d)
    assert d["hot_pages_uncovered"] == 0 and d["cold_pages_uncovered"] == 0
    assert d["mean_last"]["hot_accessed_share"] >= HOT_SHARE, table
    assert d["mean_last"]["cold_idle_share"] >= HOT_SHARE, table


# -- 6. targets that exit, map and unmap -------------------------------------------------------


def test_exiting_target_turns_the_kdamond_off(lifecycle: dict[str, Any]) -> None:
    e = phase(lifecycle, "exit")
    check_damond_ran_well(e)
    print(f"[lifecycle] kdamond off {e['off_after_s']} s after the target was killed")
    assert e["on_changed"] == {"state": "on", "pid": e["on_changed"]["pid"]}
    assert e["off_changed"] == {"state": "off", "pid": -1}
    assert e["state_after"] == "off" and e["pid_after"] == -1
    assert e["log_says_exited"]
    assert e["off_after_s"] < 5.0


def test_mapping_and_unmapping_followed_at_update(lifecycle: dict[str, Any]) -> None:
    m = phase(lifecycle, "map_unmap")
    check_damond_ran_well(m)
    per_update = m["samples_per_update"] // m["samples_per_aggregation"]  # 10 aggregations
    print(
        f"[lifecycle] update_us 1 s = {per_update} aggregations; new mapping covered after "
        f"{m['map'].get('snapshots')} snapshots ({m['map'].get('seconds')} s), unmapped range "
        f"left after {m['unmap'].get('snapshots')} ({m['unmap'].get('seconds')} s)"
    )
    for what in ("map", "unmap"):
        watch = m[what]
        # at most one update interval, plus the aggregation in flight when it happened
        assert watch["reached"], (what, watch["trace"])
        assert watch["snapshots"] <= per_update + 1, (what, watch["trace"])
    # the regions reached the new mapping only through an update, and left it through one
    assert m["coverage_before_map"] == 0.0, m
    assert m["coverage_before_unmap"] == 1.0, m
