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
    wire: np.ndarray | None = None
    """The same regions as the wire's (ttuu) structs, when the monitor has them so: rows
    of six uint32 words in little-endian order (the kernel's trace records hold them so),
    marshalled as they are; None: marshalled from the four arrays."""

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
class SchemeStats:
    """What a DAMOS scheme did since the kdamond went on (the kernel's stats/ files)."""

    nr_tried: int = 0
    """Regions the scheme was tried on (they matched its pattern, score and filters)."""
    sz_tried: int = 0
    nr_applied: int = 0
    """Regions its action was applied to (at least one byte)."""
    sz_applied: int = 0
    qt_exceeds: int = 0
    """Charge windows that ended with the quota used up."""


TriedRegion = tuple[int, int, int, int, int]
"""(target index, start, end, nr_accesses, age) of a region a scheme was tried on."""


@dataclass(frozen=True)
class SchemeResult:
    """One scheme's state as of a snapshot."""

    index: int
    stats: SchemeStats
    effective_bytes: int
    """The size quota in force (the time quota turned into bytes); 0: no quota."""
    active: bool
    """The watermarks let it run."""
    tried: tuple[TriedRegion, ...] | None
    """The regions of its last application; None before the first."""


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
    schemes: tuple[SchemeResult, ...] = ()
    """The context's schemes after this aggregation's application (not in the signal)."""
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
