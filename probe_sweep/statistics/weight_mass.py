"""Does the probe read the token from directions the embedding uses little, more than the
hidden state's own variance there would explain?

For a subspace S of the probe's input coordinates (by default the least important half of the
basis columns: the directions W_E uses least), three numbers:
- the probe's weight share on S, ``||W_S||^2 / ||W||^2`` (W: classes x coordinates);
- the hidden state's variance share on S, ``tr(Sigma_SS) / tr(Sigma)`` (Sigma: covariance of
  the probe's inputs over the training tokens);
- their ratio: 1 when the probe weighs S as much as the activations vary there.

A share of the weight is only meaningful against where the activations live, and the ratio is
compared with subspaces of the same kind as S: random coordinate subsets where the basis is a
set of privileged axes (natural, NMF, dictionary), Haar-random subspaces where any rotation of
it is as good (PCA, frequency, random). Intervals come from half-samples of the token types
(the probe's rows).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from probe_sweep.statistics.nulls import centred_interval, half_samples, null_entry
from probe_sweep.subspaces import COORDINATE, coordinate_subsets, haar_frames


def column_shares(weight: torch.Tensor) -> dict[str, Any]:
    """Energy share per column of ``weight`` (C, k), columns in importance order."""
    energy = weight.double().pow(2).sum(0)
    share = energy / energy.sum().clamp_min(1e-300)
    return {"share": share.tolist(), "cumulative": share.cumsum(0).tolist()}


def null_ratios(
    weight: torch.Tensor, cov: torch.Tensor, dim: int, kind: str, n_draws: int, seed: int
) -> torch.Tensor:
    """Weight-to-variance ratio on ``n_draws`` random ``dim``-subspaces of the given kind."""
    gram, cov = weight.T @ weight, cov.double()
    if kind == COORDINATE:
        subsets = coordinate_subsets(len(cov), dim, n_draws, seed)
        w = gram.diagonal()[subsets].sum(1) / torch.trace(gram)
        v = cov.diagonal()[subsets].sum(1) / torch.trace(cov)
        return w / v
    ratios = []
    for q in haar_frames(len(cov), dim, n_draws, seed):
        w = ((gram @ q) * q).sum((1, 2)) / torch.trace(gram)
        v = ((cov @ q) * q).sum((1, 2)) / torch.trace(cov)
        ratios.append(w / v)
    return torch.cat(ratios)


def share_draws(weight: torch.Tensor, subset: np.ndarray, counts: torch.Tensor) -> torch.Tensor:
    """The weight share on coordinates ``subset`` with rows counted as in each row of
    ``counts`` (all ones first: the observed share)."""
    energy = weight.pow(2)
    return (counts @ energy[:, subset].sum(1)) / (counts @ energy.sum(1))


def weight_mass_entries(
    weight: torch.Tensor,
    cov: torch.Tensor,
    kind: str,
    layer: int | None,
    baselines: dict[str, tuple[torch.Tensor, torch.Tensor]],
    n_draws: int,
    n_bootstrap: int,
    seed: int,
) -> list[dict[str, Any]]:
    """Weight share, variance share and their ratio on the least important half of the
    coordinates, with the same-kind null for the ratio and baselines (name -> (weight, cov)
    of a probe that could have failed: the random-init model's, the control task's)."""
    k = weight.shape[1]
    subset = np.arange(k - k // 2, k)  # columns are in importance order: the bottom half

    def ratio_draws(w: torch.Tensor, c: torch.Tensor) -> tuple[torch.Tensor, float]:
        w = w.detach().double().cpu()
        counts = torch.ones(1 + n_bootstrap, len(w), dtype=torch.float64)
        counts[1:] = half_samples(len(w), n_bootstrap, seed)
        c = c.double().cpu()
        variance = (c.diagonal()[subset].sum() / torch.trace(c)).item()
        return share_draws(w, subset, counts) / variance, variance

    ratios, variance = ratio_draws(weight, cov)
    shares = ratios * variance
    null = null_ratios(weight.detach().double().cpu(), cov, len(subset), kind, n_draws, seed)
    ratio = null_entry(
        "weight_to_variance_bottom_half", layer, ratios[0].item(), null, "greater",
        centred_interval(ratios[0].item(), ratios[1:]),
    )  # fmt: skip
    ratio["p_less"] = (1 + int((null <= ratios[0]).sum())) / (1 + len(null))
    ratio["null"] = f"{kind} subspaces"
    ratio["baselines"] = {}
    for name, (w, c) in baselines.items():
        theirs, _ = ratio_draws(w, c)
        ratio["baselines"][name] = {
            "observed": theirs[0].item(),
            "ci": centred_interval(theirs[0].item(), theirs[1:]),
            "difference": (ratios[0] - theirs[0]).item(),
            "difference_ci": centred_interval(
                (ratios[0] - theirs[0]).item(), ratios[1:] - theirs[1:]
            ),
        }
    weight_share = {
        "name": "weight_share_bottom_half",
        "layer": layer,
        "observed": shares[0].item(),
        "ci": centred_interval(shares[0].item(), shares[1:]),
    }
    variance_share = {"name": "variance_share_bottom_half", "layer": layer, "observed": variance}
    return [weight_share, variance_share, ratio]
