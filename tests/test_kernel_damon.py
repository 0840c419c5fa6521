"""Detecting the kernel's own DAMON (read-only), on a fake admin tree and on this host."""

from __future__ import annotations

from pathlib import Path

from damond.monitor.ops import kernel_damon


def make_admin(root: Path, states: list[str]) -> Path:
    admin = root / "kdamonds"
    admin.mkdir()
    (admin / "nr_kdamonds").write_text(f"{len(states)}\n")
    for i, state in enumerate(states):
        (admin / str(i)).mkdir()
        (admin / str(i) / "state").write_text(f"{state}\n")
        (admin / str(i) / "pid").write_text(f"{100 + i if state == 'on' else -1}\n")
    return admin


def test_running_kdamonds_are_named(tmp_path: Path) -> None:
    admin = make_admin(tmp_path, ["off", "on", "off", "on"])
    assert kernel_damon.running_kdamonds(admin) == ["kdamonds/1 (pid 101)", "kdamonds/3 (pid 103)"]
    warning = kernel_damon.interference_warning(admin)
    assert warning is not None and "kdamonds/1 (pid 101)" in warning


def test_nothing_running_or_no_damon(tmp_path: Path) -> None:
    assert kernel_damon.interference_warning(make_admin(tmp_path, ["off"])) is None
    assert kernel_damon.running_kdamonds(tmp_path / "missing") == []


def test_this_host_only_read() -> None:
    """Whatever this host runs, looking must not change it (development hosts run a kdamond)."""
    admin = kernel_damon.ADMIN
    before = {p: (p / "state").read_text() for p in admin.glob("[0-9]*")} if admin.exists() else {}
    found = kernel_damon.running_kdamonds()
    after = {p: (p / "state").read_text() for p in admin.glob("[0-9]*")} if admin.exists() else {}
    assert before == after
    assert len(found) == sum(s.strip() == "on" for s in before.values())
