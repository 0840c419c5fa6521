"""A mapping's share of accessed pages, turned into whole samples without chance.

Where the kernel says only how much of a mapping was referenced (smaps'
Referenced after clear_refs), a sampled page in it cannot be told accessed
or not. Answering with a coin flip of that probability (damond's first
clear_refs check did) is right on average and wrong in every detail: regions
over one mapping get random nr_accesses around the mean, their ages keep
resetting, and DAMON's splitting multiplies them into hundreds.

MappingCredit answers for the whole mapping instead: each sample adds the
mapping's fraction to its credit, and every sampled page of the mapping
counts as accessed in the samples where the credit reaches a whole sample
(which it then spends). Over an aggregation each region of the mapping gets
the same nr_accesses, the fraction times the samples (±1), so they merge
and keep their ages: the mapping is the unit, and the answers say so.
"""

from __future__ import annotations

import numpy as np

START_CREDIT = 0.5
"""A new mapping's credit: its first access counts at half a sample's worth of
fraction, so that over time the counts round to nearest."""


class MappingCredit:
    """Per mapping (by start address) of one target: the fraction not yet counted."""

    def __init__(self) -> None:
        self._starts = np.empty(0, dtype=np.uint64)
        self._credit = np.empty(0, dtype=np.float64)

    def fire(
        self, mappings: np.ndarray, fraction: np.ndarray, sampled: np.ndarray | None = None
    ) -> np.ndarray:
        """Which mappings (rows of the sorted (n, 2) array) count as accessed this sample.

        fraction is each mapping's share of accessed pages in [0, 1]. Only the
        rows where sampled is True take part (None: all): a mapping without a
        sampled page keeps its credit for the samples that land in it.
        """
        starts = np.ascontiguousarray(mappings[:, 0])
        credit = np.full(len(starts), START_CREDIT)
        if len(self._starts) and len(starts):
            at = np.minimum(np.searchsorted(self._starts, starts), len(self._starts) - 1)
            known = self._starts[at] == starts
            credit[known] = self._credit[at[known]]
        grown = credit + fraction
        if sampled is not None:
            grown = np.where(sampled, grown, credit)
        fired = grown >= 1.0
        grown[fired] -= 1.0
        self._starts, self._credit = starts, grown
        return fired if sampled is None else fired & sampled
