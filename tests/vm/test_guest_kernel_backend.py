"""The kernel backend against the guest kernel's own DAMON: the D-Bus suite, and the claim.

One guest boot (1 vCPU) runs, with tracefs mounted where systemd mounts it:

- kernel_backend_checks.py: the claim rules (a tree another tool configured
  is never touched and `auto` falls back; a SIGKILLed damond's pool is taken
  back by the next one; a clean exit writes nr_kdamonds 0; kernel refusals
  leave everything off and name the errno), and a commit's pid pinned at
  acceptance (a target that dies before the kernel takes the commit, its pid
  given to another process, is never monitored);
- the D-Bus suite's snapshot, commit and self-off tests, the error tests
  that can reach the kernel, and the DAMOS tests that make sense on the
  kernel's own schemes (their rules and refusals, stats read back and
  announced at most once a second, watermarks), with
  DAMOND_TEST_BACKEND=kernel: every context they make asks for the kernel's
  DAMON, and the `damond` fixture checks after each that the daemon's exit
  left nr_kdamonds 0 (tests/conftest.py).

Left out of the suite here: the flood and stalled-bus tests (they are about
the bus adapter's bounds, the same code for both backends, and rely on
1000-region snapshots of a `sleep` process every millisecond, which damond's
own engine makes and the kernel's, merging a sleeping process's regions,
does not), the tests of values and of the daemon's start that no backend
reaches, and the DAMOS tests of what Linux 6.12's vaddr cannot do (anon
filters, allow filters: the filter test and the busctl walkthrough, which
use them) or of a disk file the guest lacks (the file-backed pageout: the
kernel backend's pageout, of anonymous memory with zram swap, is
tests/vm/test_damos.py's).
"""

from __future__ import annotations

import json
import xml.etree.ElementTree as ET
from pathlib import Path
from typing import Any

import pytest
from damond_vm_run import Guest  # tests/vm/run.py, loaded by tests/vm/conftest.py
from guest_json import REPO, VENV_PYTHON  # tests/vm/guest_json.py
from kernel_backend_checks import (  # tests/vm/kernel_backend_checks.py
    KERNEL_FILES,
    KERNEL_FILES_COMMITTED,
    MATCH_NOTHING,
)

SUITE = [
    "tests/test_dbus_monitoring.py::test_seed_walkthrough_with_busctl",
    "tests/test_dbus_monitoring.py::test_hot_and_cold_buffers_are_told_apart",
    "tests/test_dbus_monitoring.py::test_target_exit_turns_the_kdamond_off",
    "tests/test_dbus_monitoring.py::test_commit_changes_the_aggregation_cadence",
    "tests/test_dbus_monitoring.py::test_turning_on_again_restarts_seq",
    "tests/test_dbus_errors.py::test_on_refuses_bad_attributes",
    "tests/test_dbus_errors.py::test_on_refuses_missing_and_dead_pids",
    "tests/test_dbus_errors.py::test_on_needs_exactly_one_context_and_a_target",
    "tests/test_dbus_errors.py::test_region_rules",
    "tests/test_dbus_errors.py::test_state_keywords_and_commit_while_off",
    "tests/test_dbus_errors.py::test_busy_while_on",
    "tests/test_dbus_schemes.py::test_watermarks_pause_and_resume_a_scheme",
    "tests/test_dbus_schemes.py::test_stats_are_announced_at_most_once_a_second",
    "tests/test_dbus_schemes.py::test_bad_scheme_values_get_the_contracts_errors_and_change_nothing",
]
BAD_ATTRIBUTES = 5
"""Parameters of test_on_refuses_bad_attributes: each a test of its own."""
TIMEOUT = 1500.0


@pytest.fixture(scope="module")
def in_guest(guest: Guest, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    results = tmp_path_factory.mktemp("vm-kernel-backend")
    python = VENV_PYTHON if VENV_PYTHON.exists() else Path("python3")
    script = f"""
mount -t tracefs nodev /sys/kernel/tracing
{python} tests/vm/kernel_backend_checks.py /results/checks.json
echo "checks exit $?"
DAMOND_TEST_BACKEND=kernel DAMOND_TEST_START_TIMEOUT=120 {python} -m pytest -p no:cacheprovider \\
    -q --junitxml=/results/suite.xml {" ".join(SUITE)}
echo "suite exit $?"
"""
    result = guest.run(script, timeout=TIMEOUT, vcpus=1, results_dir=results, cwd=REPO)
    assert result.exit_code == 0, result.describe()
    checks = results / "checks.json"
    suite = results / "suite.xml"
    assert checks.exists() and suite.exists(), result.describe()
    print(f"\n[kernel backend] results in {results} (guest run {result.seconds:.0f} s)")
    return {
        "checks": json.loads(checks.read_text()),
        "suite": ET.parse(suite).getroot(),
        "console": result.command_output(),
    }


def check(data: dict[str, Any], name: str) -> dict[str, Any]:
    found: dict[str, Any] = data["checks"][name]
    if "error" in found:
        pytest.fail(f"{name} failed in the guest:\n{found['error']}", pytrace=False)
    return found


def test_the_dbus_suite_passes_on_the_kernel_backend(in_guest: dict[str, Any]) -> None:
    cases = in_guest["suite"].iter("testcase")
    outcome = {}
    for case in cases:
        name = f"{case.get('classname', '').replace('.', '/')}.py::{case.get('name')}"
        problems = [c for c in case if c.tag in ("failure", "error", "skipped")]
        outcome[name] = problems[0].get("message", problems[0].tag) if problems else "passed"
    wanted = len(SUITE) - 1 + BAD_ATTRIBUTES
    assert len(outcome) == wanted, (sorted(outcome), in_guest["console"][-3000:])
    for test in SUITE:
        ran = [n for n in outcome if n.split("[")[0] == test]
        assert ran, f"{test} did not run in the guest: {sorted(outcome)}"
    failed = {n: why for n, why in outcome.items() if why != "passed"}
    assert not failed, (failed, in_guest["console"][-6000:])


def test_a_tree_another_tool_configured_is_never_modified(in_guest: dict[str, Any]) -> None:
    seen = check(in_guest, "in_use")
    assert seen["tree_unchanged"], seen["changed_files"]
    assert seen["other_still_on"]
    assert not seen["record_made"]
    assert seen["daemon_exit_code"] == 0 and not seen["traceback"]


def test_auto_falls_back_and_kernel_is_refused_saying_why(in_guest: dict[str, Any]) -> None:
    seen = check(in_guest, "in_use")
    assert seen["avail_backends"] == ["user"]
    error, text = seen["kernel_refused"]
    assert error == "org.damond1.Error.NotSupported"
    assert "kernel DAMON sysfs in use: kdamonds/nr_kdamonds is 1" in text, text
    assert seen["effective_backend"] == "user" and seen["snapshot_seq"] == 1
    assert seen["log_says_why"]


def test_a_sigkilled_damonds_pool_is_recovered_by_the_next(in_guest: dict[str, Any]) -> None:
    seen = check(in_guest, "recovery")
    assert seen["nr_before"] == 0
    assert seen["avail_backends"] == ["kernel", "user"]
    assert seen["pid_is_a_kdamond"]
    pool = seen["nr_while_claimed"]
    assert pool > 0 and seen["record_while_claimed"]["nr_kdamonds"] == pool
    # killed: its kdamond runs on, its pool and record stay
    assert seen["states_after_kill"][0] == "on" and len(seen["states_after_kill"]) == pool
    assert seen["record_after_kill"]
    # the next damond takes the pool back: nothing left running, and it runs contexts there
    assert seen["recovered_in_log"]
    assert seen["states_once_recovered"] == ["off"] * pool
    assert seen["second_effective_backend"] == "kernel" and seen["second_snapshot_seq"] == 1
    assert seen["second_exit_code"] == 0 and not seen["traceback"]


def test_a_clean_exit_gives_the_tree_back(in_guest: dict[str, Any]) -> None:
    seen = check(in_guest, "recovery")
    assert seen["nr_after_clean_exit"] == 0
    assert not seen["record_after_clean_exit"]
    assert not seen["instance_after_clean_exit"]


@pytest.mark.parametrize(
    ("refusal", "error"),
    [
        ("state on", "org.damond1.Error.Busy"),
        ("targets nr", "org.damond1.Error.Busy"),
        ("sample_us", "org.damond1.Error.InvalidArgument"),
        ("scheme file", "org.damond1.Error.InvalidArgument"),
    ],
)
def test_a_kernel_refusal_leaves_everything_off_and_names_the_errno(
    in_guest: dict[str, Any], refusal: str, error: str
) -> None:
    seen = check(in_guest, "refusals")[refusal]
    assert seen["refused"] is not None, seen
    name, text = seen["refused"]
    assert name == error, seen
    assert seen["errno"] in text and "/org/damond1/kdamonds/0" in text, text
    assert seen["unchanged"]
    assert set(seen["kernel_states"]) == {"off"}, seen["kernel_states"]
    assert seen["exit_code"] == 0 and not seen["traceback"]


def test_a_scheme_lands_in_the_kernels_files_and_a_commit_carries_changes(
    in_guest: dict[str, Any],
) -> None:
    seen = check(in_guest, "schemes")
    assert seen["effective_backend"] == "kernel"
    assert seen["files_on"] == KERNEL_FILES  # every file, none left at the kernel's default
    assert seen["stat_match_nothing"] == str(MATCH_NOTHING)
    assert seen["files_committed"] == KERNEL_FILES_COMMITTED
    assert seen["exit_code"] == 0 and not seen["traceback"]


def test_stats_quotas_and_tried_regions_come_back_from_the_kernel(
    in_guest: dict[str, Any],
) -> None:
    seen = check(in_guest, "schemes")
    assert seen["effective_bytes_after"] > 0  # the 16 MiB size quota, read back
    # a stat scheme matching nothing tried nothing; committed to match all, the running
    # kdamond tries every region: the regions of the very snapshot it came with
    assert seen["tried_before_commit"] == [] and seen["nr_tried_before_commit"] == 0
    assert seen["tried_after"] > 0 and seen["nr_tried_after"] > 0
    assert seen["tried_is_every_region"] is True


def test_what_the_kernel_cannot_do_is_refused_before_anything_is_written(
    in_guest: dict[str, Any],
) -> None:
    seen = check(in_guest, "schemes")
    assert seen["anon_refused"] is not None
    error, text = seen["anon_refused"]
    assert error == "org.damond1.Error.NotSupported", text
    assert "/org/damond1/kdamonds/0/contexts/0/schemes/1/filters/0: anon filter" in text, text
    assert seen["anon_unchanged"]


def test_a_pid_reused_before_the_kernel_takes_a_commit_is_never_monitored(
    in_guest: dict[str, Any],
) -> None:
    """damond accepts a commit before the kernel takes it (at its next aggregation):
    the new target's pid is pinned at acceptance, and when that process has died by
    the time the kernel resolved the number, the kdamond turns off instead of
    monitoring (or acting on) the process that took the number."""
    seen = check(in_guest, "commit_reuse")
    assert seen["reused"] and seen["before_effect"], seen
    assert seen["state_after"] == "off", seen
    assert seen["reason_in_log"], seen
    # The kernel takes a commit in its after_aggregation step, before it traces that
    # aggregation (mm/damon/core.c, kdamond_fn): that one is reported under the new
    # targets, with the counts of the old. Whatever comes after would be the newcomer's
    # memory; the kdamond is off by then.
    assert set(seen["snapshots_naming_b"]) <= set(seen["snapshots_after"][:1]), seen
    assert seen["b_alive"], seen
    assert seen["exit_code"] == 0 and not seen["traceback"], seen
    assert seen["nr_after_exit"] == 0, seen
