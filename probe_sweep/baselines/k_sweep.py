"""Accuracy against k: how much of the token a probe recovers from only k directions of the
basis, the k most important to W_E (top-k), the k least important (bottom-k), or k random ones
of the same kind (random column subsets where the basis axes are privileged, Haar-random
k-dimensional subspaces where any rotation is as good). The random-k curve, over several
seeds, is the control that tells "stored in the directions the embedding uses little" from
"any k directions would do"."""

from __future__ import annotations

import time
from typing import Any

import numpy as np
import torch

from probe_sweep.config import Config
from probe_sweep.extraction.data import TEST, TRAIN
from probe_sweep.fitting.identity import Fitted, Scorer
from probe_sweep.intervals import SequenceBootstrap, interval
from probe_sweep.probes.kinds import ProbeKind, ProbeTask
from probe_sweep.probes.linear import ProbeConfig, RegConfig, token_scores
from probe_sweep.probes.rows import Rows
from probe_sweep.progress import duration, log
from probe_sweep.results import KPoint
from probe_sweep.subspaces import COORDINATE, coordinate_subsets, haar_frames


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
    targets: torch.Tensor,
    kind: ProbeKind,
    ks: list[int],
    null_kind: str,
    seeds: int,
    reg: RegConfig,
    probe: ProbeConfig,
    bootstrap: SequenceBootstrap,
    layer: int,
    seed: int,
) -> list[KPoint]:
    """Held-out top-1 (with its sequence-bootstrap interval) of a probe of the job's kind fitted
    on k directions, for every k, kind of subset and seed."""
    points = []
    size, start = train.d, time.perf_counter()
    for k in sorted(k for k in ks if 0 < k <= size):
        for which, draw, projection in projections(size, k, null_kind, seeds, seed):
            on_k = ProbeTask(train.map(lambda x, p=projection: project(x, p), k), targets)
            fit = kind.fit(on_k, reg, probe, None, f"layer {layer} {which}-{k}")
            held_out = test.map(lambda x, p=projection: project(x, p), k)
            correct = token_scores(fit.probe, held_out)["correct1"]
            points.append(
                KPoint(
                    layer=layer, k=k, kind=which, seed=draw, top1=float(correct.mean()),
                    converged=bool(fit.convergence["converged"]),
                    top1_ci=interval(bootstrap.draws(correct)),
                )
            )  # fmt: skip
        at_k = {p.kind: p.top1 for p in points if p.k == k and p.kind != "random"}
        log.info(
            "layer %d: accuracy against k, k=%d: top %.3f, bottom %.3f (%d random draws), %s",
            layer, k, at_k["top"], at_k["bottom"], seeds, duration(time.perf_counter() - start),
        )  # fmt: skip
    return points


def accuracy_vs_k(
    config: Config, kind: ProbeKind, scorer: Scorer, fitted: Fitted, targets: torch.Tensor
) -> list[KPoint]:
    """At each layer, held-out top-1 of probes on the top, bottom and random k coordinates of
    the basis: where in the basis the input token is readable."""
    inputs, stats_cfg = scorer.inputs, config.statistics
    return [
        point
        for scores in fitted.scores
        for point in accuracy_against_k(
            inputs(TRAIN, scores.layer), inputs(TEST, scores.layer), targets, kind,
            stats_cfg.k_sweep, inputs.basis.null_kind, stats_cfg.k_seeds, config.reg,
            config.probe, scorer.bootstrap, scores.layer, config.seed,
        )
    ]  # fmt: skip
