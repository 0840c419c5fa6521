"""Fixtures of the VM tests: the test kernel and initramfs, and a guest runner.

tests/vm/run.py is loaded as the module `damond_vm_run` (tests/ is no package,
and a top-level module named `run` would be ambiguous).

The VM tests never skip by themselves: when the kernel cannot be built or
QEMU is missing they fail with the reason. Set DAMOND_SKIP_VM=1 to skip them.
"""

from __future__ import annotations

import importlib.util
import os
import sys
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest

HERE = Path(__file__).resolve().parent


def _load_run_module() -> ModuleType:
    name = "damond_vm_run"
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(name, HERE / "run.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses look their module up here
    spec.loader.exec_module(module)
    return module


vm_run = _load_run_module()
pytest.register_assert_rewrite("guest_json")  # its run_script asserts for the tests here


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers", "vm: boots the page_idle/DAMON test kernel under QEMU (tests/vm)"
    )


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        if item.path.resolve().parent == HERE:
            item.add_marker(pytest.mark.vm)


@pytest.fixture(scope="session")
def guest() -> Any:
    """A damond_vm_run.Guest (fails, never skips, unless DAMOND_SKIP_VM=1)."""
    if os.environ.get("DAMOND_SKIP_VM") == "1":
        pytest.skip("DAMOND_SKIP_VM=1 is set: the VM (real kernel) tests are skipped on request")
    try:
        return vm_run.Guest.build()
    except vm_run.VMUnavailable as e:
        pytest.fail(
            f"the test VM is unavailable (set DAMOND_SKIP_VM=1 to skip these tests): {e}",
            pytrace=False,
        )
