"""Section 3: the ridge regularisation path (one decomposition, every strength scored on
validation) against scikit-learn's ``RidgeCV`` with the same strengths: the time ratio."""

from __future__ import annotations

from typing import Any

import torch

from probe_sweep.bench.common import Row, ok, progress, sync, timed
from probe_sweep.bench.extraction import Setup
from probe_sweep.bench.softmax import standardised
from probe_sweep.extraction.data import TRAIN, VAL
from probe_sweep.probes.linear import RegConfig, RegKind, fit_ridge_probe


def section_ridge(s: Setup, layer: int, out: list[Row]) -> None:
    from sklearn.linear_model import RidgeCV

    args = s.args
    strengths = list(args.strengths)
    train, val = s.inputs(TRAIN, layer), s.inputs(VAL, layer)

    def ours() -> list[dict[str, float]]:
        reg = RegConfig(RegKind.l2, strengths[0])
        fit = fit_ridge_probe(train, s.class_embeddings, reg, val, strengths)
        sync(s.device)
        return fit.path

    progress(f"ridge path, layer {layer}: ours")
    t_ours, path = timed(ours, args.repeats)
    best = min(path, key=lambda p: p["val_nll"])["strength"]
    data = standardised(train)
    targets = s.class_embeddings[torch.from_numpy(data.y).to(s.device)].cpu().numpy()
    n = len(data.y)

    def theirs() -> Any:
        # Per-token mean objective here, summed in scikit-learn: alpha = strength * n.
        return RidgeCV(alphas=[v * n for v in strengths]).fit(data.x, targets)

    progress(f"ridge path, layer {layer}: scikit-learn")
    t_sk, ridge = timed(theirs, args.sk_repeats)
    ratio = t_sk / t_ours
    out.append(
        Row(
            "3 ridge path",
            f"layer {layer}, {len(strengths)} strengths, fit_ridge_probe(path_strengths=...): "
            "s (chosen strength; ours by validation NLL, RidgeCV by leave-one-out MSE)",
            f"{t_ours:.2f} ({best:g})",
            f"{t_sk:.2f} ({ridge.alpha_ / n:g})",
            f"{ratio:.1f}x faster",
            "faster than RidgeCV",
            ok(ratio > 1),
        )
    )
