"""PNG pictures of a record: the heatmap and the working set size over time.

matplotlib with its Agg backend (no display needed); a figure of
``width`` × ``height`` pixels exactly (``WIDTH_PX`` × ``HEIGHT_PX`` by default).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from damond.tools.heatmap import Heatmap
from damond.tools.render import format_size

WIDTH_PX, HEIGHT_PX = 1200, 800
DPI = 100


def _figure(width: int, height: int) -> Any:
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib.figure import Figure

    return Figure(figsize=(width / DPI, height / DPI), dpi=DPI, layout="constrained")


def heatmap_png(
    heatmap: Heatmap, title: str, path: Path, width: int = WIDTH_PX, height: int = HEIGHT_PX
) -> None:
    """Address (monitored memory only, low addresses at the bottom) × time, frequency as
    colour."""
    figure = _figure(width, height)
    axes = figure.add_subplot()
    image = axes.imshow(
        heatmap.values * 100,
        origin="lower",
        aspect="auto",
        interpolation="nearest",
        cmap="inferno",
        vmin=0,
        vmax=100,
        extent=(0, heatmap.seconds, 0, heatmap.spans.total),
    )
    figure.colorbar(image, ax=axes, label="access frequency (% of samples)")
    ticks = [float(x) for x in _tick_offsets(heatmap)]
    axes.set_yticks(ticks, [f"{heatmap.spans.address(t):#x}" for t in ticks])
    axes.set_xlabel("time (s)")
    axes.set_ylabel(
        f"address ({format_size(heatmap.spans.total)} monitored; unmonitored gaps left out)"
    )
    axes.set_title(title)
    figure.savefig(path, dpi=DPI, format="png")


def _tick_offsets(heatmap: Heatmap, count: int = 8) -> Sequence[float]:
    total = heatmap.spans.total
    return [total * i / count for i in range(count + 1)]


def wss_png(
    times_s: Sequence[float],
    wss_bytes: Sequence[float],
    title: str,
    path: Path,
    width: int = WIDTH_PX,
    height: int = HEIGHT_PX,
) -> None:
    """Working set size (weighted estimate) over time."""
    figure = _figure(width, height)
    axes = figure.add_subplot()
    axes.plot(list(times_s), [w / (1 << 20) for w in wss_bytes], drawstyle="steps-post")
    axes.set_xlabel("time (s)")
    axes.set_ylabel("working set size (MiB)")
    axes.set_ylim(bottom=0)
    axes.grid(True, alpha=0.3)
    axes.set_title(title)
    figure.savefig(path, dpi=DPI, format="png")
