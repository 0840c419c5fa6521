"""PageIdleAccess against a real kernel with idle page tracking (the tests/vm guest).

Each test boots one guest (1 vCPU: with 2, read accesses can be missed) that
runs one check of page_idle_checks.py and leaves its findings in
/results/CHECK.json; the assertions are made here, on the host. A child in
the guest writes the first half of a 64 MiB buffer between prepare() and
check(); 400 sampled addresses lie in each half.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from damond_vm_run import Guest, GuestResult  # tests/vm/run.py, loaded by tests/vm/conftest.py
from guest_json import run_script  # tests/vm/guest_json.py

SHARE = 0.95
"""Share of the written half that must read accessed, and of the untouched half
that must read not accessed: room for pages that are off the LRU lists
(per-CPU LRU batches, ~18 pages measured) or caught in migration."""


def run_check(guest: Guest, name: str, results: Path) -> tuple[dict[str, Any], GuestResult]:
    """Boot a guest that runs one check; its JSON report and the guest's result."""
    return run_script(guest, "page_idle_checks.py", [name], f"{name}.json", results)


def assert_halves(halves: dict[str, Any], what: str, result: GuestResult) -> None:
    """Most of the written half accessed, most of the untouched half not."""
    message = f"{what}: {halves}\n{result.describe()}"
    assert halves["written_accessed"] >= SHARE * halves["written"], message
    assert halves["untouched_accessed"] <= (1 - SHARE) * halves["untouched"], message


def assert_quiet(halves: dict[str, Any], what: str, result: GuestResult) -> None:
    """A sample in which nobody wrote: (almost) nothing accessed."""
    message = f"{what}: {halves}\n{result.describe()}"
    total = halves["written"] + halves["untouched"]
    assert halves["written_accessed"] + halves["untouched_accessed"] <= (1 - SHARE) * total, message


def test_vaddr_small_pages(guest: Guest, tmp_path: Path) -> None:
    """(a) MADV_NOHUGEPAGE: 4 KiB pages, one pagemap entry and one bitmap bit each."""
    report, result = run_check(guest, "vaddr", tmp_path)
    assert report["anon_huge_kib"] == 0, f"{report}\n{result.describe()}"
    assert_halves(report["touched"], "written after prepare", result)
    assert_quiet(report["quiet"], "no write at all", result)
    assert_halves(report["touched_again"], "new sampled pages, written again", result)


def test_vaddr_transparent_huge_pages(guest: Guest, tmp_path: Path) -> None:
    """(b) MADV_HUGEPAGE: the sampled pages are tails, answered by their heads."""
    report, result = run_check(guest, "thp", tmp_path)
    context = f"{report}\n{result.describe()}"
    assert report["anon_huge_kib"] >= 32 * 1024, (
        f"the guest kernel gave no transparent huge pages (AnonHugePages "
        f"{report['anon_huge_kib']} kB of 64 MiB; enabled: {report['thp_enabled']}; "
        f"defrag: {report['thp_defrag']}): the THP case is untested\n{context}"
    )
    assert report["sampled_tails"] >= 0.9 * 800, f"few sampled pages were tails\n{context}"
    # A tail's own bit never reads idle: without the head mapping, all would be "accessed".
    assert report["tails_reading_idle"] == 0, context
    assert_halves(report["touched"], "written after prepare", result)
    assert_quiet(report["quiet"], "no write at all", result)
    assert_halves(report["touched_again"], "new sampled pages, written again", result)


def test_paddr(guest: Guest, tmp_path: Path) -> None:
    """(c) the child's sampled pages by physical address (pid -1), small and huge."""
    report, result = run_check(guest, "paddr", tmp_path)
    for kind in ("small", "huge"):
        found = report[kind]
        assert found["pages_without_pfn"] == 0, f"{kind}: {found}\n{result.describe()}"
        assert_halves(found, f"paddr, {kind} pages", result)


def test_not_present_pages_are_not_accessed(guest: Guest, tmp_path: Path) -> None:
    """(d) pages never touched, and addresses outside every mapping."""
    report, result = run_check(guest, "not_present", tmp_path)
    context = f"{report}\n{result.describe()}"
    assert report["present"] == 0, context
    assert report["accessed"] == 0, context
    assert report["outside_accessed"] == 0, context


def test_a_target_that_exits_is_gone(guest: Guest, tmp_path: Path) -> None:
    """(e) TargetGone from check() and prepare(), for a zombie and for a reaped target."""
    report, result = run_check(guest, "exit", tmp_path)
    for key in ("zombie_check", "zombie_prepare", "reaped_check", "reaped_prepare"):
        assert report[key] == "TargetGone", f"{key}: {report[key]}\n{result.describe()}"


def test_registry_offers_page_idle_and_paddr(guest: Guest, tmp_path: Path) -> None:
    """(f) the guest kernel has page_idle: it is available, auto picks it, paddr works."""
    report, result = run_check(guest, "registry", tmp_path)
    context = f"{report}\n{result.describe()}"
    assert report["why_page_idle"] == "", context
    assert "page_idle" in report["avail_access_checks"], context
    assert report["auto_vaddr"] == report["auto_paddr"] == "page_idle", context
    assert "paddr" in report["avail_operations"], context
    assert report["why_paddr"] == "", context
    assert report["made"] == "PageIdleAccess", context


def test_shared_pages_answer_for_every_process(guest: Guest, tmp_path: Path) -> None:
    """(g) docs/dbus-api.md: a page the target shares reads accessed when another process
    wrote it (page_idle answers for the physical page, as paddr does)."""
    report, result = run_check(guest, "shared", tmp_path)
    assert_halves(report["touched"], "written by another process after prepare", result)
    assert_quiet(report["quiet"], "no write at all", result)


def test_c_and_python_sample_paths_agree(guest: Guest, tmp_path: Path) -> None:
    """(h) the same guest pages through both sample paths: the same heads marked and the
    same answers, for 4 KiB pages, THP tails, absent pages and paddr; and right answers.
    The engine's fast path (a Sampler of the C path) marks the same heads and counts
    the same answers."""
    report, result = run_check(guest, "paths", tmp_path)
    context = f"{report}\n{result.describe()}"
    assert report["c"], f"the C module is not built: {report['why_not_c']}\n{context}"
    assert report["huge"]["sampled_tails"] >= 0.9 * 800, f"few sampled pages were tails\n{context}"
    for case in ("nohuge", "huge", "paddr_nohuge", "paddr_huge", "not_present"):
        for sample in ("touched", "quiet"):
            found = report[case][sample]
            for key in (
                "heads_differ",
                "answers_differ",
                "sampler_heads_differ",
                "sampler_answers_differ",
            ):
                assert found[key] == 0, f"{case} {sample}: {key}\n{context}"
    for case in ("nohuge", "huge", "paddr_nohuge", "paddr_huge"):
        touched = report[case]["touched"]["accessed"]
        assert SHARE * 400 <= touched <= (2 - SHARE) * 400, f"{case}: {touched}\n{context}"
        assert report[case]["quiet"]["accessed"] <= (1 - SHARE) * 800, f"{case}\n{context}"
    absent = report["not_present"]
    assert absent["touched"]["untrackable"] == absent["sampled"], context
    assert absent["touched"]["accessed"] == 0, context
