"""Linear probes from a hidden state (in some basis) to a label, and their scores.

Both probe kinds (``kinds.py``) end as a ``LinearProbe``: logits over a fixed set of classes.
- softmax: a linear classifier fitted to the optimum of its stated objective, mean cross-entropy
  over the training tokens plus the penalty (``solver.py``: Newton-CG for l2/none, FISTA for l1).
- ridge: a closed-form linear map to the token's embedding row, decoded by the nearest row of
  W_E; its logits are the log-likelihood of a Gaussian around each row, so it has an NLL too.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from enum import Enum
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from probe_sweep.errors import UserError
from probe_sweep.extraction.labels import ClassSet
from probe_sweep.probes import softmax_problem, solver
from probe_sweep.probes.rows import Rows


class RegKind(Enum):
    l2 = "l2"
    l1 = "l1"
    none = "none"


@dataclass
class ProbeConfig:
    """``kind``: the estimator, a name in ``probes/kinds.py``'s registry. ``classes=seen``: the
    classes are the token types seen in training (held-out tokens of other types count as
    errors); ``vocab``: the whole vocabulary (types no training token has get probability 0,
    exactly the optimum's limit, so the cost grows with the types seen).

    A softmax fit stops when its certified relative gap to the optimum, (f - f*) / |f| bounded
    by a duality gap, is at most ``tol`` (without a penalty: the Newton decrement's estimate,
    uncertified), or after ``max_iter`` iterations (Newton for l2/none, FISTA for l1).
    ``chunk_mb`` bounds one chunk of logits; rows and probabilities are kept in memory up to
    ``memory_mb`` (beyond it the rows stream from the cache each pass, and Hessian products
    recompute the probabilities that were not kept). ``path_strengths``: strengths at which
    the ridge probe is also scored on validation, from the same decomposition (metrics.json
    ``ridge_path``); the softmax probe has no path.
    """

    kind: str = "softmax"
    classes: ClassSet = ClassSet.seen
    tol: float = 1e-6
    max_iter: int = 1000
    chunk_mb: int = 64
    memory_mb: int = 4096
    path_strengths: list[float] = field(default_factory=list)


@dataclass
class RegConfig:
    """Penalty ``strength * ||W||^2`` (l2) or ``strength * ||W||_1`` (l1) added to the mean
    per-token loss; for ridge, the l2 term of the per-token squared error. The bias is not
    penalised. scikit-learn's ``LogisticRegression(C=1 / (2 * strength * n_train))`` minimises
    the same l2 objective (its loss is a sum, and its penalty is ``||W||^2 / 2``)."""

    kind: RegKind = RegKind.l2
    strength: float = 1e-4


class LinearProbe(torch.nn.Module):
    """``logits = ((x - mean) / scale) @ weight.T + bias`` over ``classes`` (token ids).

    Inputs are centred and divided by one scalar: that keeps the geometry of the basis, so an
    l2 or unpenalised probe fitted in a rotated basis is the natural one rotated (a
    per-coordinate scale would change the objective differently in every basis).
    """

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor, mean: torch.Tensor, scale: float):
        super().__init__()
        self.weight = torch.nn.Parameter(weight)
        self.bias = torch.nn.Parameter(bias)
        self.register_buffer("mean", mean)
        self.register_buffer("scale", torch.tensor(float(scale)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return ((x - self.mean) / self.scale) @ self.weight.T + self.bias


@dataclass
class FitResult:
    """A fitted probe; ``convergence`` says how close it came to its objective's optimum
    (solver, iterations, objective, certified gap, tolerance, converged)."""

    probe: LinearProbe
    convergence: dict[str, float | int | bool | str] = field(default_factory=dict)
    history: list[dict[str, float]] = field(default_factory=list)
    map_weight: torch.Tensor | None = None
    path: list[dict[str, float]] = field(default_factory=list)


def standardisation(rows: Rows, chunk: int = 65536) -> tuple[torch.Tensor, float]:
    """Mean row and one scalar scale (root mean square of the centred coordinates), streamed
    in chunks: two passes, no centred copy."""
    total, dtype = torch.zeros(rows.d, dtype=torch.float64), torch.float32
    for x, _ in rows.chunks(chunk):
        total, dtype = total.to(x.device) + x.double().sum(0), x.dtype
    mean = (total / max(len(rows), 1)).to(dtype)
    square = sum(
        (x.to(dtype) - mean.to(x.device)).pow(2).double().sum().item()
        for x, _ in rows.chunks(chunk)
    )
    scale = math.sqrt(square / max(len(rows) * rows.d, 1))
    return mean, max(scale, 1e-8)


def in_coordinates_of(probe: LinearProbe, mean: torch.Tensor, scale: float) -> LinearProbe:
    """The same affine map from x to logits, for inputs standardised by ``mean`` and ``scale``:
    ((x - m1) / s1) W^T + b = ((x - m2) / s2) (W s2 / s1)^T + b + ((m2 - m1) / s1) W^T."""
    weight, bias = probe.weight.detach(), probe.bias.detach()
    old_scale = float(probe.scale)
    shift = (mean.to(weight) - probe.mean.to(weight)) / old_scale
    return LinearProbe(weight * (scale / old_scale), bias + weight @ shift, mean.to(weight), scale)


def fit_softmax_probe(
    rows: Rows,
    n_classes: int,
    reg: RegConfig,
    cfg: ProbeConfig,
    init: LinearProbe | None = None,
    desc: str = "softmax probe",
    on_step: Callable[[LinearProbe], None] | None = None,
) -> FitResult:
    """The softmax probe at the optimum of mean cross-entropy + penalty (see ``solver.py``),
    with its certified gap in ``convergence``. ``on_step`` sees the probe at every iterate the
    fit moves to (a warm start for the same fit, should it be interrupted).

    ``init`` (a probe over the same classes and inputs of the same width, e.g. the previous
    layer's or the previous MDL block's) is a warm start: the same map from x to logits, put in
    this fit's standardisation, used when its objective is below the input-blind start's.
    Rows labelled -1 (types not in the class set) cannot enter a cross-entropy and are left
    out. Classes no row carries are left out of the fit: weight 0, bias -inf (their
    probability's infimum).
    """
    rows = rows.labelled()
    mean, scale = standardisation(rows)
    device = rows.labels.device
    present = torch.bincount(rows.labels, minlength=n_classes) > 0
    position = torch.cumsum(present, 0) - 1
    fitted = rows.with_labels(position[rows.labels]) if not bool(present.all()) else rows
    n_fitted = int(present.sum())
    problem = softmax_problem.SoftmaxProblem(
        fitted,
        n_fitted,
        mean.to(device),
        scale,
        l2=reg.strength if reg.kind is RegKind.l2 else 0.0,
        l1=reg.strength if reg.kind is RegKind.l1 else 0.0,
        chunk=softmax_problem.chunk_rows(cfg.chunk_mb, rows.d, n_fitted),
        memory_mb=cfg.memory_mb,
    )
    start = None
    if init is not None:  # a class absent where ``init`` was fitted starts from its frequency
        init = in_coordinates_of(init, mean.to(device), scale)
        bias = init.bias.detach()[present].to(problem.freq)
        bias = torch.where(torch.isfinite(bias), bias, problem.freq.log())
        start = (init.weight.detach()[present], bias)

    def as_probe(params: softmax_problem.Params) -> LinearProbe:
        weight, bias = params
        full_weight = weight.new_zeros(n_classes, rows.d)
        full_bias = bias.new_full((n_classes,), -math.inf)
        full_weight[present], full_bias[present] = weight, bias
        return LinearProbe(full_weight.to(mean), full_bias.to(mean), mean.to(device), scale)

    params, convergence, history = solver.minimise(
        problem, start, cfg.tol, cfg.max_iter, desc,
        None if on_step is None else lambda params: on_step(as_probe(params)),
    )  # fmt: skip
    convergence["absent_classes"] = n_classes - n_fitted
    return FitResult(probe=as_probe(params), convergence=convergence, history=history)


class RidgePath:
    """Closed-form ridge probes at any strength from one eigendecomposition.

    The map from the (standardised) hidden state to the embedding row of its class is
    ``A(s) = Q diag(1 / (lambda + s)) Q^T X^T Y / n`` with ``X^T X / n = Q diag(lambda) Q^T``, so
    each strength costs one matrix product. Decoding: logits_c = -||x A + b - e_c||^2 / (2 sigma^2)
    up to a constant, with sigma^2 the mean squared training residual per dimension. Every
    quantity is a sum over rows, streamed in chunks; the residual comes from the same sums.
    """

    def __init__(self, rows: Rows, embeddings: torch.Tensor, chunk: int = 65536):
        rows = rows.labelled()
        self.mean, self.scale = standardisation(rows, chunk)
        device = embeddings.device
        counts = torch.bincount(rows.labels.to(device), minlength=len(embeddings)).double()
        self.target_mean = (counts @ embeddings.double() / max(len(rows), 1)).to(embeddings)
        d, e = rows.d, embeddings.shape[1]
        gram = torch.zeros(d, d, dtype=torch.float64, device=device)
        cross = torch.zeros(d, e, dtype=torch.float64, device=device)
        self.target_square = 0.0  # sum of ||e_y - mean||^2 over rows
        for x, y in rows.chunks(chunk):
            xs = ((x.to(device) - self.mean.to(device)) / self.scale).double()
            targets = (embeddings[y.to(device)] - self.target_mean).double()
            gram += xs.T @ xs
            cross += xs.T @ targets
            self.target_square += targets.pow(2).sum().item()
        self.n, self.e = max(len(rows), 1), e
        self.gram = gram / self.n
        self.cross = cross / self.n
        self.class_embeddings = embeddings
        self.eigvals, self.eigvecs = torch.linalg.eigh(self.gram)
        self.eig_cross = self.eigvecs.T @ self.cross

    def fit(self, strength: float) -> FitResult:
        inverse = 1.0 / (self.eigvals.clamp_min(0) + strength).clamp_min(1e-10)
        map_weight = self.eigvecs @ (inverse[:, None] * self.eig_cross)
        # mean ||x A - (t - m)||^2 = tr(A' G A) - 2 tr(A' C) + mean ||t - m||^2, per dimension
        square = (
            (map_weight * (self.gram @ map_weight)).sum()
            - 2 * (map_weight * self.cross).sum()
            + self.target_square / self.n
        )
        emb = self.class_embeddings
        sigma2 = (square / self.e).clamp_min(1e-12).to(emb)
        map_weight = map_weight.to(emb)
        weight = (emb @ map_weight.T) / sigma2
        bias = (emb @ self.target_mean - 0.5 * emb.pow(2).sum(1)) / sigma2
        probe = LinearProbe(weight, bias, self.mean.to(emb.device), self.scale)
        closed_form = {"solver": "closed_form", "converged": True}
        return FitResult(probe, closed_form, map_weight=map_weight.T.contiguous())


def fit_ridge_probe(
    rows: Rows,
    class_embeddings: torch.Tensor,
    reg: RegConfig,
    validation: Rows | None = None,
    path_strengths: list[float] | tuple[float, ...] = (),
) -> FitResult:
    """The ridge probe at ``reg.strength`` (l2) or unregularised (none); see ``RidgePath``.

    With ``validation`` and ``path_strengths``, also the validation NLL at every strength of
    the path, from the same decomposition (``FitResult.path``)."""
    if reg.kind is RegKind.l1:
        raise UserError("probe=ridge has a closed form only for reg=l2 or reg=none; use l2")
    ridge = RidgePath(rows, class_embeddings)
    result = ridge.fit(reg.strength if reg.kind is RegKind.l2 else 0.0)
    if validation is not None:
        everything = np.ones(len(validation), dtype=bool)
        result.path = [
            {
                "strength": s,
                "val_nll": score_probe(ridge.fit(s).probe, validation, everything)["nll"],
            }
            for s in path_strengths
        ]
    return result


@torch.no_grad()
def token_scores(probe: LinearProbe, rows: Rows, batch: int = 4096) -> dict[str, np.ndarray]:
    """Per held-out token: top-1 and top-5 correct, and the NLL (NaN where the token's type is
    not a class, label -1, or a class no training token had, probability 0: it counts as an
    error in top-1/top-5 and has no NLL)."""
    correct1, correct5, nll = [], [], []
    for x, target in rows.chunks(batch):
        logits = probe(x.to(probe.weight.device, probe.weight.dtype)).float()
        target = target.to(logits.device)
        top = logits.topk(min(5, logits.shape[1]), dim=1).indices
        correct1.append(top[:, 0] == target)
        correct5.append((top == target[:, None]).any(1))
        loss = torch.full(target.shape, float("nan"), device=logits.device)
        # a type outside the class set, or one no training row had (bias -inf): no NLL
        picked = logits.gather(1, target.clamp_min(0)[:, None]).squeeze(1)
        known = (target >= 0) & torch.isfinite(picked)
        if known.any():
            loss[known] = F.cross_entropy(logits[known], target[known], reduction="none")
        nll.append(loss)
    return {
        name: torch.cat(parts).cpu().numpy()
        for name, parts in (("correct1", correct1), ("correct5", correct5), ("nll", nll))
    }


def score_probe(
    probe: LinearProbe, rows: Rows, frequent: torch.Tensor | np.ndarray
) -> dict[str, float | int | None]:
    """Held-out top-1, top-5 and NLL. Tokens whose type is not a class (label -1) count as
    errors in top-1/top-5 and are left out of the NLL (it would be infinite); ``n_unseen``
    says how many there were. ``frequent`` splits top-1 by token frequency."""
    if isinstance(frequent, torch.Tensor):
        frequent = frequent.cpu().numpy()
    return summarise(token_scores(probe, rows), frequent)


def summarise(
    tokens: dict[str, np.ndarray], frequent: np.ndarray, bootstrap=None
) -> dict[str, float | int | None]:
    """Means of per-token scores, and with a ``SequenceBootstrap``, their 95% intervals
    (``<name>_ci``) from resampled held-out sequences."""
    known = ~np.isnan(tokens["nll"])
    columns = {
        "top1": (tokens["correct1"], None),
        "top5": (tokens["correct5"], None),
        "nll": (np.where(known, tokens["nll"], 0.0), known),
        "top1_frequent": (tokens["correct1"], frequent),
        "top1_rare": (tokens["correct1"], ~frequent),
    }
    out: dict[str, Any] = {}
    for name, (values, mask) in columns.items():
        chosen = values if mask is None else values[mask]
        out[name] = float(np.mean(chosen)) if len(chosen) else None
        if bootstrap is not None and len(chosen):
            out[f"{name}_ci"] = bootstrap.interval(values, mask)
    out["n_test"] = len(known)
    out["n_unseen"] = int((~known).sum())
    return out
