"""`damond --help`: what it explains, including what this host can monitor with."""

from __future__ import annotations

import subprocess
import sys

from damond.monitor import ops


def test_help_says_what_this_host_offers_and_why_not() -> None:
    out = subprocess.run(
        [sys.executable, "-m", "damond", "--help"],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    ).stdout
    assert "org.damond1" in out and "--bus" in out
    registry = ops.Registry()
    for name in (*registry.access_check_names, *registry.operations_names):
        reason = registry.why_unavailable(name)
        line = next(
            x
            for x in out.splitlines()
            if x.strip().startswith(("access check", "operations")) and f" {name}:" in x
        )
        if reason:
            assert line.endswith(f"no ({reason.removeprefix(name + ': ')})"), line
        else:
            assert line.endswith(": available"), line
    # this host (no idle page tracking): page_idle and paddr say what the kernel lacks
    if registry.why_unavailable("page_idle"):
        assert "CONFIG_IDLE_PAGE_TRACKING" in out
