"""Null distributions and intervals, as plain JSON-ready entries.

A null-tested number is an *entry* ``{"name", "layer", "observed", "ci", "null_mean",
"null_range", "p", "p_floor", "n_null", "alternative"}``. ``p`` is the Monte Carlo p-value
``(1 + #{null at least as extreme}) / (1 + n_null)``, so it never goes below ``p_floor``; no
Gaussian z is given, since nothing supports extrapolating a normal tail past the draws.
``ci`` is a 95% percentile bootstrap interval of ``observed``.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from probe_sweep.intervals import finite, interval


def null_entry(
    name: str,
    layer: int | None,
    observed: float,
    null: np.ndarray | torch.Tensor,
    alternative: str = "greater",
    ci: list[float | None] | None = None,
) -> dict[str, Any]:
    """One number against its null draws; ``alternative``: the direction the claim states
    ("greater", "less", or "two-sided": distance from the null mean)."""
    draws = np.asarray(torch.as_tensor(null, dtype=torch.float64).cpu(), dtype=np.float64)
    mean = float(draws.mean())
    if alternative == "greater":
        extreme = draws >= observed
    elif alternative == "less":
        extreme = draws <= observed
    else:
        extreme = np.abs(draws - mean) >= abs(observed - mean)
    n = len(draws)
    return {
        "name": name,
        "layer": layer,
        "observed": finite(observed),
        "ci": ci,
        "null_mean": finite(mean),
        "null_range": interval(draws),
        "p": (1 + int(extreme.sum())) / (1 + n),
        "p_floor": 1 / (1 + n),
        "n_null": n,
        "alternative": alternative,
    }


def permutations(n: int, n_draws: int, seed: int) -> torch.Tensor:
    """``n_draws`` seeded permutations of ``range(n)``, one per row."""
    gen = torch.Generator().manual_seed(seed)
    return torch.argsort(torch.rand(n_draws, n, generator=gen), dim=1)


def half_samples(n: int, n_draws: int, seed: int) -> torch.Tensor:
    """Row weights (n_draws, n): each draw counts a seeded random half of the rows twice and the
    rest not at all. Half-sampling without replacement (McCarthy 1969) has about the variance of
    the full-sample estimate and, unlike the bootstrap, never duplicates a row, which biases
    CKA- and Procrustes-like statistics of a resample upwards."""
    gen = torch.Generator().manual_seed(seed)
    order = torch.argsort(torch.rand(n_draws, n, generator=gen), dim=1)
    weights = torch.zeros(n_draws, n, dtype=torch.float64)
    weights.scatter_(1, order[:, : n // 2], 2.0 * n / (2 * (n // 2)))
    return weights


def centred_interval(estimate: float, draws: torch.Tensor | np.ndarray) -> list[float | None]:
    """A 95% interval around ``estimate`` with the spread of ``draws`` about their mean (the
    half-samples' own small-sample bias is not carried into the interval)."""
    values = np.asarray(torch.as_tensor(draws, dtype=torch.float64).cpu(), dtype=np.float64)
    lo, hi = interval(values - values.mean())
    return [None, None] if lo is None else [estimate + lo, estimate + hi]
