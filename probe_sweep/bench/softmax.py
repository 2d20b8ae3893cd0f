"""Section 2: per-layer softmax probes against scikit-learn's ``LogisticRegression`` (lbfgs) on
the identical (standardised) rows, the same objective and the same gradient tolerance: the
time ratio at a matched objective value."""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from probe_sweep.bench.common import Row, ok, progress, sync, timed
from probe_sweep.bench.extraction import Setup
from probe_sweep.data import TRAIN
from probe_sweep.probes import (
    FitResult,
    ProbeConfig,
    RegConfig,
    RegKind,
    fit_softmax_probe,
    standardisation,
)
from probe_sweep.rows import Rows


@dataclass
class Standardised:
    """A part's labelled rows, gathered and standardised the way the probe does it (centre,
    one scalar scale), for a reference estimator that needs them in memory."""

    rows: Rows  # the labelled rows as the pipeline streams them
    x: np.ndarray  # (n, d) float32, standardised
    y: np.ndarray  # (n,) class positions


def standardised(rows: Rows) -> Standardised:
    labelled = rows.labelled()
    mean, scale = standardisation(labelled)
    x = ((labelled.gather() - mean.to(labelled.labels.device)) / scale).cpu().numpy()
    return Standardised(labelled, x, labelled.labels.cpu().numpy())


def sklearn_objective(clf: Any, data: Standardised, strength: float) -> float:
    """Mean cross-entropy + strength ||W||^2 of a fitted LogisticRegression, in float64."""
    x = torch.from_numpy(data.x).double()
    coef, intercept = torch.from_numpy(clf.coef_).double(), torch.from_numpy(clf.intercept_)
    logits = x @ coef.T + intercept.double()
    target = torch.from_numpy(np.searchsorted(clf.classes_, data.y))
    value = torch.nn.functional.cross_entropy(logits, target).item()
    return value + strength * float(coef.pow(2).sum())


def compare_layer(s: Setup, layer: int) -> tuple[float, float, float, Row]:
    """Our fit and scikit-learn's at one layer: (our s, their s, relative objective gap, row)."""
    from sklearn.linear_model import LogisticRegression

    args = s.args
    reg = RegConfig(RegKind.l2, args.strength)
    cfg = ProbeConfig(tol=args.tol)
    rows = s.inputs(TRAIN, layer)

    def ours() -> FitResult:
        fit = fit_softmax_probe(rows, s.n_classes, reg, cfg, desc="bench")
        sync(s.device)
        return fit

    progress(f"softmax, layer {layer}: ours")
    t_ours, fit = timed(ours, args.repeats)
    conv = fit.convergence
    data = standardised(rows)
    # scikit-learn minimises mean cross-entropy + ||W||^2 / (2 C n) (it scales its loss by the
    # sample count), ours mean cross-entropy + strength ||W||^2: equal at C = 1 / (2 strength
    # n). Its tol bounds the largest gradient entry of that same objective, so ours, tol x the
    # largest gradient entry at zero, is matched exactly.
    c = 1.0 / (2 * args.strength * len(data.y)) if args.strength > 0 else 1e12
    sk_tol = float(conv["tol"]) * float(conv["grad_start"])

    def theirs() -> Any:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            model = LogisticRegression(C=c, tol=sk_tol, max_iter=args.sk_max_iter)
            return model.fit(data.x, data.y)

    progress(f"softmax, layer {layer}: scikit-learn")
    t_sk, clf = timed(theirs, args.sk_repeats)
    sk_value = sklearn_objective(clf, data, args.strength)
    ours_value = float(conv["objective"])
    gap = (ours_value - sk_value) / abs(sk_value)
    iterations = int(clf.n_iter_[0])
    s.notes.append(
        f"softmax, layer {layer}: ours {conv['iterations']} L-BFGS iterations "
        f"({conv['evaluations']} loss+gradient passes, {t_ours / conv['evaluations']:.3f} s "
        f"each, float32, converged={conv['converged']}), scikit-learn {iterations} lbfgs "
        f"iterations ({t_sk / max(iterations, 1):.3f} s each, float64); objectives "
        f"{ours_value:.6f} vs {sk_value:.6f}"
    )
    row = Row(
        "2 softmax probe",
        f"layer {layer}: fit s at tol {args.tol:g} (objective gap, relative)",
        f"{t_ours:.2f}",
        f"{t_sk:.2f}",
        f"{t_sk / t_ours:.1f}x faster",
        ">= 20x, |gap| <= 1e-4",
        ok(t_sk / t_ours >= 20 and abs(gap) <= 1e-4) + f" (gap {gap:+.1e})",
    )
    return t_ours, t_sk, gap, row


def section_softmax(s: Setup, layers: list[int], out: list[Row]) -> None:
    ours_total = sk_total = 0.0
    matched = True
    for layer in layers:
        t_ours, t_sk, gap, row = compare_layer(s, layer)
        ours_total += t_ours
        sk_total += t_sk
        matched &= abs(gap) <= 1e-4
        out.append(row)
    ratio = sk_total / ours_total
    out.append(
        Row(
            "2 softmax probe",
            f"all compared layers {layers}: total fit s",
            f"{ours_total:.2f}",
            f"{sk_total:.2f}",
            f"{ratio:.1f}x faster",
            ">= 20x at matched objective",
            ok(ratio >= 20 and matched),
        )
    )
