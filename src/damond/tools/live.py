"""Live views of a running context: its latest Snapshot, drawn as it changes.

Shared by the demo and ``damondctl watch``: a Feed keeps the latest Snapshot of
one context (subscribed with the client's snapshot match), a Screen draws
render.py's picture of it — redrawn in place on a terminal, as a compact block
every second otherwise — and watch() runs the two until told to stop.
"""

from __future__ import annotations

import asyncio
import contextlib
import shutil
import sys
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from dbus_fast.aio import MessageBus

from damond.tools import client
from damond.tools.render import Labels, Style, render

PRINT_PERIOD_S = 1.0
"""Without a tty, a compact block is printed this often."""
QUIET_WARNING_S = 3.0


class Feed:
    """The latest Snapshot body of one context, and when it arrived."""

    def __init__(self, path: str) -> None:
        self.path = path
        self.latest: list[Any] | None = None
        self.arrived = asyncio.Event()

    def handle(self, path: str, body: list[Any]) -> None:
        self.latest = body
        self.arrived.set()

    async def subscribe(self, bus: MessageBus) -> Callable[[], None]:
        return await client.subscribe_snapshots(bus, self.handle, self.path)


def _utf8() -> bool:
    return (sys.stdout.encoding or "").lower().replace("-", "") == "utf8"


@dataclass
class Screen:
    """Draws pictures: redrawn in place on a tty, compact blocks every second otherwise."""

    tty: bool
    title: str

    def draw(self, lines: list[str]) -> None:
        if self.tty:
            body = "".join(f"{line}\x1b[K\n" for line in [self.title, *lines])
            sys.stdout.write("\x1b[H" + body + "\x1b[J")
        else:
            sys.stdout.write("\n".join(["", self.title, *lines]) + "\n")
        sys.stdout.flush()

    def picture(
        self,
        body: list[Any],
        marks: Labels | None,
        check: str,
        labels: Mapping[int, Labels] | None = None,
        aggr_us: int = 0,
    ) -> list[str]:
        """render()'s picture; aggr_us: the context's effective_aggr_us, when known."""
        size = shutil.get_terminal_size((100, 40))
        if self.tty:
            return render(
                body,
                marks,
                access_check=check,
                aggr_us=aggr_us,
                max_lines=size.lines - 2,
                width=size.columns,
                style=Style(color=True, ascii_only=not _utf8()),
                labels=labels,
            )
        return render(
            body,
            marks,
            access_check=check,
            aggr_us=aggr_us,
            max_lines=16,
            width=100,
            style=Style(ascii_only=not _utf8()),
            labels=labels,
        )


async def watch(
    feed: Feed,
    title: str,
    seconds: float | None,
    picture: Callable[[Screen, list[Any]], list[str]],
    still_going: Callable[[], None] = lambda: None,
) -> None:
    """Draw feed's snapshots until the time is up (or forever); still_going() is asked
    every half second and raises to end the watch (a child process that exited)."""
    loop = asyncio.get_running_loop()
    begin = loop.time()
    end = begin + seconds if seconds is not None else None
    until = f"for {seconds:g} s" if seconds is not None else "until Ctrl-C"
    screen = Screen(sys.stdout.isatty(), "")
    if screen.tty:
        sys.stdout.write("\x1b[2J")
    next_print = begin
    last_seen = begin
    while end is None or loop.time() < end:
        still_going()
        timeout = 0.5 if end is None else max(0.0, min(0.5, end - loop.time()))
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(feed.arrived.wait(), timeout)
        now = loop.time()
        screen.title = f"{title}: t+{now - begin:.1f} s, running {until}"
        if feed.arrived.is_set():
            feed.arrived.clear()
            last_seen = now
        elif now - last_seen > QUIET_WARNING_S and now >= next_print:
            print(f"no Snapshot for {now - last_seen:.0f} s", file=sys.stderr)
            next_print = now + PRINT_PERIOD_S
            continue
        if feed.latest is not None and (screen.tty or now >= next_print):
            screen.draw(picture(screen, feed.latest))
            next_print = now + PRINT_PERIOD_S
