"""Statistics for comparing methods over the same seeds: paired differences with bootstrap confidence intervals.

Every method is fine-tuned with the same seeds, so seed s of method A and seed s of method B share their
fine-tuning randomness; the difference per seed is the paired quantity, and resampling seeds (with
replacement) gives a percentile interval for its mean. With five seeds the interval is wide: that is the
point, a difference inside it is reported as a tie.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class PairedDifference:
    mean: float
    low: float
    high: float
    n: int

    @property
    def verdict(self) -> str:
        """'better' or 'worse' when the 95% interval excludes zero, else 'tie'."""
        if self.low > 0:
            return "better"
        if self.high < 0:
            return "worse"
        return "tie"


def paired_bootstrap(
    first: dict[int, float], second: dict[int, float], resamples: int = 10_000, seed: int = 0, level: float = 0.95
) -> PairedDifference:
    """Mean of first[s] - second[s] over the seeds both have, with a percentile bootstrap interval."""
    seeds = sorted(set(first) & set(second))
    if not seeds:
        raise ValueError("the two methods share no seed: nothing to pair")
    differences = np.array([first[s] - second[s] for s in seeds], dtype=float)
    draws = np.random.default_rng(seed).integers(0, len(seeds), size=(resamples, len(seeds)))
    means = differences[draws].mean(axis=1)
    tail = (1 - level) / 2 * 100
    low, high = np.percentile(means, [tail, 100 - tail])
    return PairedDifference(float(differences.mean()), float(low), float(high), len(seeds))
