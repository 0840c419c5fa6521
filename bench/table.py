"""A markdown table of benchmark rows, by column: the row key, its title, how to show it."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

Column = tuple[str, str, str | Callable[[Any], str]]
"""(row key, title, a str.format pattern or a function of the value)."""


def markdown_table(columns: Sequence[Column], rows: Sequence[dict[str, Any]]) -> str:
    lines = [
        "| " + " | ".join(title for _, title, _ in columns) + " |",
        "|" + "---|" * len(columns),
    ]
    for row in rows:
        cells = [
            fmt(row[key]) if callable(fmt) else fmt.format(row[key]) for key, _, fmt in columns
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)
