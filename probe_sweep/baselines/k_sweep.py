"""Accuracy against k: how much of the token a probe recovers from only k directions of the
basis, the k most important to W_E (top-k), the k least important (bottom-k), or k random ones
of the same kind (random column subsets where the basis axes are privileged, Haar-random
k-dimensional subspaces where any rotation is as good). The random-k curve, over several
seeds, is the control that tells "stored in the directions the embedding uses little" from
"any k directions would do"."""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from probe_sweep.intervals import SequenceBootstrap
from probe_sweep.probes.linear import ProbeConfig, RegConfig, fit_softmax_probe, token_scores
from probe_sweep.probes.rows import Rows
from probe_sweep.statistics.nulls import interval
from probe_sweep.statistics.weight_mass import COORDINATE, coordinate_subsets, haar_frames


def projections(size: int, k: int, null_kind: str, seeds: int, seed: int) -> list[tuple]:
    """(kind, seed, projection) for top-k, bottom-k and ``seeds`` random-k draws; a projection
    is a column index array or an orthonormal (size, k) frame."""
    out: list[tuple[str, int | None, Any]] = [
        ("top", None, np.arange(k)),
        ("bottom", None, np.arange(size - k, size)),
    ]
    for s in range(seeds):
        if null_kind == COORDINATE:
            cols = coordinate_subsets(size, k, 1, seed + 1000 * k + s)[0].sort().values
            out.append(("random", s, cols.numpy()))
        else:
            frame = next(haar_frames(size, k, 1, seed + 1000 * k + s))[0].float()
            out.append(("random", s, frame))
    return out


def project(x: torch.Tensor, projection: Any) -> torch.Tensor:
    if isinstance(projection, np.ndarray):
        return x[:, torch.from_numpy(projection).to(x.device)]
    return x @ projection.to(x.device, x.dtype)


def accuracy_against_k(
    train: Rows,
    test: Rows,
    n_classes: int,
    ks: list[int],
    null_kind: str,
    seeds: int,
    reg: RegConfig,
    probe: ProbeConfig,
    bootstrap: SequenceBootstrap,
    layer: int,
    seed: int,
) -> list[dict[str, Any]]:
    """Held-out top-1 (with its sequence-bootstrap interval) of a softmax probe fitted on k
    directions, for every k, kind and seed."""
    rows = []
    size = train.d
    for k in sorted(k for k in ks if 0 < k <= size):
        for kind, draw, projection in projections(size, k, null_kind, seeds, seed):
            fit = fit_softmax_probe(
                train.map(lambda x, p=projection: project(x, p), k), n_classes, reg, probe,
                desc=f"layer {layer} {kind}-{k}",
            )  # fmt: skip
            on_k = test.map(lambda x, p=projection: project(x, p), k)
            correct = token_scores(fit.probe, on_k)["correct1"]
            rows.append(
                {
                    "layer": layer,
                    "k": k,
                    "kind": kind,
                    "seed": draw,
                    "top1": float(correct.mean()),
                    "top1_ci": interval(bootstrap.draws(correct)),
                    "converged": fit.convergence["converged"],
                }
            )
    return rows
