"""95% intervals: percentile intervals of draws, and the cluster bootstrap over held-out
sequences that every accuracy's interval comes from (tokens of one sequence share their
context, so they are resampled together; resampling tokens would understate the spread)."""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch

LEVEL = 0.95


def finite(x: Any) -> float | None:
    x = float(x)
    return x if math.isfinite(x) else None


def interval(draws: np.ndarray | torch.Tensor) -> list[float | None]:
    """The central 95% of bootstrap draws."""
    values = np.asarray(draws, dtype=np.float64)
    values = values[np.isfinite(values)]
    if not len(values):
        return [None, None]
    lo, hi = np.quantile(values, [(1 - LEVEL) / 2, (1 + LEVEL) / 2])
    return [float(lo), float(hi)]


class SequenceBootstrap:
    """Seeded resamples of the sequences that ``groups`` (one sequence id per token) names.

    Every metric is computed on the same resamples, so differences between two metrics of the
    same tokens (selectivity, trained minus random-init) get paired intervals."""

    def __init__(self, groups: np.ndarray, n_draws: int, seed: int) -> None:
        ids, self.group_of = np.unique(np.asarray(groups), return_inverse=True)
        rng = np.random.default_rng(seed)
        picks = rng.integers(0, len(ids), size=(n_draws, len(ids)))
        self.counts = np.zeros((n_draws, len(ids)))
        np.add.at(self.counts, (np.arange(n_draws)[:, None], picks), 1.0)

    def draws(self, values: np.ndarray, mask: np.ndarray | None = None) -> np.ndarray:
        """The mean of ``values`` over the tokens in ``mask``, once per resample."""
        values = np.asarray(values, dtype=np.float64)
        mask = np.ones(len(values), bool) if mask is None else np.asarray(mask, bool)
        n_groups = self.counts.shape[1]
        sums = np.bincount(self.group_of[mask], values[mask], minlength=n_groups)
        sizes = np.bincount(self.group_of[mask], minlength=n_groups).astype(np.float64)
        with np.errstate(invalid="ignore", divide="ignore"):
            return (self.counts @ sums) / (self.counts @ sizes)

    def interval(self, values: np.ndarray, mask: np.ndarray | None = None) -> list[float | None]:
        return interval(self.draws(values, mask))
