"""Requests of many callers, taken one per caller in turn, with a cap per caller.

One event loop serves every caller of a bus name. Served in arrival order, a
caller that pipelines a hundred requests makes everyone behind it wait for
all of them; served in turn, it waits for its own. The cap bounds what one
caller can make the daemon hold: past it, a request is refused at once
(bus.py answers LimitsExceeded) instead of queued.
"""

from __future__ import annotations

from collections import OrderedDict, deque
from typing import Generic, TypeVar

T = TypeVar("T")


class FairQueue(Generic[T]):
    """Round robin over callers; each caller's own requests stay in order."""

    def __init__(self, per_caller: int | None = None, total: int | None = None) -> None:
        self.per_caller = per_caller
        """Requests one caller may have waiting; None: no cap."""
        self.total = total
        """Requests all callers may have waiting; None: no cap."""
        self._queues: OrderedDict[str, deque[T]] = OrderedDict()
        self._len = 0

    def __len__(self) -> int:
        return self._len

    def waiting(self, caller: str) -> int:
        return len(self._queues.get(caller, ()))

    def put(self, caller: str, item: T) -> bool:
        """Queue item after caller's earlier ones; False (nothing queued) over a cap."""
        queue = self._queues.get(caller)
        if (self.total is not None and self._len >= self.total) or (
            self.per_caller is not None and queue is not None and len(queue) >= self.per_caller
        ):
            return False
        if queue is None:
            queue = self._queues[caller] = deque()
        queue.append(item)
        self._len += 1
        return True

    def pop(self) -> tuple[str, T]:
        """The next caller's oldest request; that caller goes to the back of the line."""
        caller, queue = next(iter(self._queues.items()))
        item = queue.popleft()
        self._len -= 1
        if queue:
            self._queues.move_to_end(caller)
        else:
            del self._queues[caller]
        return caller, item
