"""The test guest works: page_idle, DAMON sysfs, the venv, dbus-daemon.

One guest boot runs guest_smoke.py (all four checks, 1 vCPU so that page_idle
results are deterministic); a second boot checks exit-code propagation, the
results share and 2 vCPUs.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from damond_vm_run import Guest  # tests/vm/run.py, loaded by tests/vm/conftest.py
from guest_json import REPO, run_script  # tests/vm/guest_json.py

# Pages most recently allocated sit in per-CPU LRU batches and never read
# idle (about 18 measured); allow a margin.
LRU_BATCH_TOLERANCE = 64


@pytest.fixture(scope="module")
def smoke(guest: Guest, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    results = tmp_path_factory.mktemp("vm-smoke")
    report, result = run_script(guest, "guest_smoke.py", [], "smoke.json", results)
    report["_boot_seconds"] = result.boot_seconds
    report["_seconds"] = result.seconds
    return report


def test_page_idle_works(smoke: dict[str, Any]) -> None:
    pi = smoke["page_idle"]
    assert "error" not in pi, pi.get("error")
    assert pi["bitmap_exists"], "no /sys/kernel/mm/page_idle/bitmap in the guest"
    assert pi["pages_without_pfn"] == 0
    # Marking works at all: almost every page reads idle right after marking.
    assert pi["idle_right_after_marking"] >= pi["pages"] - LRU_BATCH_TOLERANCE, pi
    # Written pages lose the idle bit; untouched ones keep it.
    assert pi["touched_idle"] == 0, pi
    assert pi["untouched_idle"] >= pi["untouched_pages"] - LRU_BATCH_TOLERANCE, pi


def test_damon_sysfs_exists(smoke: dict[str, Any]) -> None:
    damon = smoke["damon"]
    assert "error" not in damon, damon.get("error")
    assert damon["admin_exists"], "no /sys/kernel/mm/damon/admin in the guest"
    assert {"vaddr", "paddr"} <= set(damon["avail_operations"]), damon


def test_venv_imports(smoke: dict[str, Any]) -> None:
    imports = smoke["imports"]
    assert "error" not in imports, imports.get("error")
    assert imports["damond_file"].startswith(str(REPO / "src")), imports


def test_dbus_daemon_runs(smoke: dict[str, Any]) -> None:
    dbus = smoke["dbus_daemon"]
    assert "error" not in dbus, dbus.get("error")
    assert dbus["returncode"] == 0, dbus
    assert dbus["first_line"].startswith("D-Bus Message Bus Daemon"), dbus


def test_exit_code_and_results_share_smp(guest: Guest, tmp_path: Path) -> None:
    result = guest.run(
        "nproc > /results/nproc; uname -r > /results/uname; echo hello-from-guest; exit 7",
        timeout=300,
        vcpus=2,
        results_dir=tmp_path,
    )
    assert result.exit_code == 7, result.describe()
    assert (tmp_path / "nproc").read_text().strip() == "2"
    assert "hello-from-guest" in result.command_output()


def test_boot_that_never_starts_the_command_is_retried_once(guest: Guest, tmp_path: Path) -> None:
    # A boot timeout too short for any boot stands in for the rare silent boot.
    result = guest.run("exit 0", timeout=60, boot_timeout=0.2, results_dir=tmp_path)
    assert result.attempts == 2, result.describe()
    assert result.exit_code is None
    assert result.timed_out
    assert len(result.earlier_consoles) == 1


def test_command_timeout_is_reported(guest: Guest, tmp_path: Path) -> None:
    result = guest.run("echo started; sleep 600", timeout=15, results_dir=tmp_path)
    assert result.timed_out, result.describe()
    assert result.exit_code is None
    assert result.attempts == 1
    assert "started" in result.command_output()
