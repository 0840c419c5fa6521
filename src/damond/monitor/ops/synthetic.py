"""A deterministic, in-memory address space and access source for tests and benchmarks.

It lets the engine's algorithm be tested and timed without a process, a
kernel feature or root: the "memory" is a list of ranges, and an address is
accessed when it lies in a hot range (with a chosen probability).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence

import numpy as np

from damond.monitor.config import TargetConfig
from damond.monitor.ops.base import TargetGone
from damond.monitor.ops.common import Range

HotSet = Callable[[np.ndarray], np.ndarray] | Sequence[Range]
"""Either a predicate over an address array, or [start, end) hot ranges."""


class SyntheticSpace:
    """An AddressSpace with fixed ranges, the same for every target or per target index.

    ``update`` (optional) answers update_ranges(); ``gone`` holds pids that
    behave as exited processes.
    """

    name = "synthetic"

    def __init__(
        self,
        ranges: Sequence[Range] | Mapping[int, Sequence[Range]],
        update: Callable[[TargetConfig], list[Range] | None] | None = None,
    ) -> None:
        self.ranges = ranges
        self.update = update
        self.gone: set[int] = set()
        self.closed = False

    def initial_ranges(self, target: TargetConfig) -> list[Range]:
        self._check_alive(target)
        if isinstance(self.ranges, Mapping):
            return list(self.ranges[target.index])
        return list(self.ranges)

    def update_ranges(self, target: TargetConfig) -> list[Range] | None:
        self._check_alive(target)
        return self.update(target) if self.update is not None else None

    def close(self) -> None:
        self.closed = True

    def _check_alive(self, target: TargetConfig) -> None:
        if target.pid in self.gone:
            raise TargetGone(target.pid)


class SyntheticAccess:
    """An AccessCheck: an address in the hot set is accessed with ``probability``.

    The hot set can be replaced at any time (set_hot) to move a hot spot.
    ``gone`` holds pids whose checks raise TargetGone; ``prepared`` keeps the
    last sampling addresses per target index, for tests.
    """

    name = "synthetic"

    def __init__(self, hot: HotSet, probability: float = 1.0, seed: int = 0) -> None:
        self.probability = probability
        self.gone: set[int] = set()
        self.prepared: dict[int, np.ndarray] = {}
        self.closed = False
        self._rng = np.random.default_rng(seed)
        self._predicate: Callable[[np.ndarray], np.ndarray] = _never
        self.set_hot(hot)

    def set_hot(self, hot: HotSet) -> None:
        if callable(hot):
            self._predicate = hot
        else:
            self._predicate = _in_ranges(hot)

    def prepare(self, target: TargetConfig, addrs: np.ndarray) -> None:
        if target.pid in self.gone:
            raise TargetGone(target.pid)
        self.prepared[target.index] = addrs

    def check(self, target: TargetConfig, addrs: np.ndarray) -> np.ndarray:
        if target.pid in self.gone:
            raise TargetGone(target.pid)
        accessed = np.asarray(self._predicate(addrs), dtype=bool)
        if self.probability < 1.0:
            accessed &= self._rng.random(len(addrs)) < self.probability
        return accessed

    def close(self) -> None:
        self.closed = True


def _never(addrs: np.ndarray) -> np.ndarray:
    return np.zeros(len(addrs), dtype=bool)


def _in_ranges(ranges: Sequence[Range]) -> Callable[[np.ndarray], np.ndarray]:
    """A vectorised membership test for sorted, disjoint [start, end) ranges."""
    ordered = sorted(ranges)
    starts = np.array([s for s, _ in ordered], dtype=np.uint64)
    ends = np.array([e for _, e in ordered], dtype=np.uint64)
    if not ordered:
        return _never

    def inside(addrs: np.ndarray) -> np.ndarray:
        i = np.searchsorted(starts, addrs, side="right") - 1
        return (i >= 0) & (addrs < ends[np.maximum(i, 0)])

    return inside
