"""One aggregation's result, as published to clients."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class TargetSnapshot:
    """Regions of one target: parallel arrays sorted by start, not overlapping."""

    index: int
    pid: int
    """-1 for paddr."""
    starts: np.ndarray
    ends: np.ndarray
    nr_accesses: np.ndarray
    ages: np.ndarray

    def as_dbus(self) -> list:
        """(u i a(ttuu)): the wire shape of one target in a Snapshot."""
        regions = list(
            zip(
                self.starts.tolist(),
                self.ends.tolist(),
                self.nr_accesses.tolist(),
                self.ages.tolist(),
                strict=True,
            )
        )
        return [self.index, self.pid, [list(r) for r in regions]]


@dataclass(frozen=True)
class Snapshot:
    """One aggregation of one context."""

    seq: int
    """Counts up by one per aggregation, from 1 after each start."""
    timestamp_us: int
    """CLOCK_REALTIME at the end of the aggregation."""
    max_nr_accesses: int
    """The number of samples in the aggregation."""
    targets: tuple[TargetSnapshot, ...]
    effective_sample_us: int = 0
    """The wall time between two of its samples, really (0: not measured)."""
    effective_aggr_us: int = 0
    """The wall time the aggregation really took (0: not measured). Neither is on
    the wire: the Context's effective_* properties say them."""

    def as_dbus(self) -> list:
        """(t t u a(uia(ttuu))): the wire shape of Snapshot and GetSnapshot."""
        return [
            self.seq,
            self.timestamp_us,
            self.max_nr_accesses,
            [t.as_dbus() for t in self.targets],
        ]
