"""The layering of docs/architecture.md, read from the sources' imports.

bus.py adapts, hierarchy.py decides, monitor/ computes, monitor/ops touches
the kernel: imports point down only, the daemon imports none of the
client-side tools, and what an operations set is lives in its table alone.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

from damond.monitor import ops

PACKAGE = Path(__file__).resolve().parent.parent / "src" / "damond"

LAYER_OF = {
    "damond.tools": 5,
    "damond.__main__": 4,
    "damond.cli": 4,
    "damond.faults": 4,
    "damond.service": 4,
    "damond.bus": 3,
    "damond.busio": 3,
    "damond.wire": 3,
    "damond.treecache": 3,
    "damond.fairqueue": 3,
    "damond.configfile": 2,
    "damond.kdamonds_format": 2,
    "damond.damos_format": 2,
    "damond.damo_text": 2,
    "damond.hierarchy": 2,
    "damond.errors": 2,
    "damond.monitor.ops": 0,
    "damond.monitor.config": 0,
    "damond.monitor": 1,
    "damond": 0,
}
"""Higher layers may import lower ones; never the other way (the most specific prefix
wins). The frozen configuration is what the engine hands its ops: it sits with them."""


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def layer(module: str) -> int | None:
    for prefix in sorted(LAYER_OF, key=len, reverse=True):
        if module == prefix or module.startswith(prefix + "."):
            return LAYER_OF[prefix]
    return None


def imports(path: Path) -> set[str]:
    """Every damond module path imports, at any depth (lazy imports included)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module)
            found |= {f"{node.module}.{a.name}" for a in node.names}
    return {m for m in found if m.startswith("damond")}


SOURCES = sorted(PACKAGE.rglob("*.py"))


@pytest.mark.parametrize("path", SOURCES, ids=lambda p: module_name(p))
def test_imports_point_down(path: Path) -> None:
    own = layer(module_name(path))
    assert own is not None, f"{module_name(path)} belongs to no layer"
    upward = [m for m in imports(path) if (layer(m) or 0) > own]
    assert not upward, f"{module_name(path)} (layer {own}) imports {upward}"


def test_the_daemon_imports_no_tool() -> None:
    daemon = [p for p in SOURCES if not module_name(p).startswith("damond.tools")]
    assert len(daemon) > 10
    for path in daemon:
        tools = [m for m in imports(path) if m.startswith("damond.tools")]
        assert not tools, f"{module_name(path)} imports {tools}"


def test_no_operations_name_is_compared_outside_the_ops_tables() -> None:
    names = {o.name for o in ops.OPERATIONS}
    for path in SOURCES:
        module = module_name(path)
        if module.startswith(("damond.monitor.ops", "damond.tools")):
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Constant) and node.value in names:
                raise AssertionError(f"{module}:{node.lineno} names {node.value!r}")
