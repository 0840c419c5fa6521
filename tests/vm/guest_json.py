"""The JSON reports of the in-guest scripts (guest_smoke.py, page_idle_checks.py, scenarios.py).

In the guest, such a script refuses to run anywhere else (outside_guest), records
each check's findings or its traceback (findings) and leaves a JSON report in the
results share (write_report). On the host, run_script boots a guest that runs
one of them and loads its report; the tests assert on it there.

Imported as `guest_json`: the scripts run from this folder, and pytest puts it
on sys.path for the tests here (tests/vm/conftest.py has its asserts rewritten).
"""

from __future__ import annotations

import json
import sys
import traceback
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from kernel_damon import in_test_guest  # tests/vm/kernel_damon.py

if TYPE_CHECKING:
    from damond_vm_run import Guest, GuestResult  # tests/vm/run.py, on the host only

HERE = Path(__file__).resolve().parent
REPO = HERE.parent.parent
VENV_PYTHON = REPO / ".venv" / "bin" / "python"

# --- in the guest ------------------------------------------------------------------------


def outside_guest(script: str) -> bool:
    """True (said on stderr) anywhere but in the damond test guest: the script must not run."""
    if in_test_guest():
        return False
    print(f"{script}: not in the damond test guest; refusing to run", file=sys.stderr)
    return True


def findings(check: Callable[[], dict[str, Any]]) -> dict[str, Any]:
    """What check() found, or {"error": its traceback} when it raised."""
    try:
        return check()
    except Exception:
        return {"error": traceback.format_exc()}


def write_report(output: str, report: dict[str, Any]) -> None:
    with open(output, "w") as f:
        json.dump(report, f, indent=2)


# --- on the host -------------------------------------------------------------------------


def run_script(
    guest: Guest,
    script: str,
    args: Sequence[str],
    report: str,
    results: Path,
    timeout: float = 600.0,
) -> tuple[dict[str, Any], GuestResult]:
    """Boot a guest (1 vCPU, 1 GiB) that runs ``python tests/vm/SCRIPT ARGS... /results/REPORT``
    with the repository's venv; the report it left in results, and the guest's result.

    Fails unless the script exited 0 and left a report without an "error".
    """
    python = VENV_PYTHON if VENV_PYTHON.exists() else Path(sys.executable)
    result = guest.run(
        [str(python), str(HERE / script), *args, f"/results/{report}"],
        timeout=timeout,
        vcpus=1,
        memory_mib=1024,
        results_dir=results,
        cwd=REPO,
    )
    assert result.exit_code == 0, result.describe()
    report_file = results / report
    assert report_file.exists(), f"no report from the guest\n{result.describe()}"
    found: dict[str, Any] = json.loads(report_file.read_text())
    assert "error" not in found, f"{found['error']}\n{result.describe()}"
    return found, result
