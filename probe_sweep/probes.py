"""Stage 5: linear probes from a hidden state (in some basis) to the input token, and their scores.

Both probe kinds end as a ``LinearProbe``: logits over a fixed set of classes (token ids).
- softmax: a linear classifier fitted to the optimum of its stated objective, mean cross-entropy
  over the training tokens plus the penalty (``solver.py``: L-BFGS for l2/none, FISTA for l1).
- ridge: a closed-form linear map to the token's embedding row, decoded by the nearest row of
  W_E; its logits are the log-likelihood of a Gaussian around each row, so it has an NLL too.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from enum import Enum
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from probe_sweep import solver
from probe_sweep.errors import UserError


class ProbeKind(Enum):
    softmax = "softmax"
    ridge = "ridge"


class ClassSet(Enum):
    seen = "seen"
    vocab = "vocab"


class RegKind(Enum):
    l2 = "l2"
    l1 = "l1"
    none = "none"


@dataclass
class ProbeConfig:
    """``classes=seen``: the softmax is over token types seen in training (held-out tokens of
    other types count as errors); ``vocab``: over the whole vocabulary.

    The softmax fit runs until the largest gradient entry (for l1: of the proximal gradient
    step) is at most ``tol`` times its value at the zero probe, or ``max_iter`` iterations.
    ``chunk_mb`` bounds the memory of one chunk of logits, so memory stays flat in the tokens.
    """

    kind: ProbeKind = ProbeKind.softmax
    classes: ClassSet = ClassSet.seen
    tol: float = 1e-4
    max_iter: int = 500
    history_size: int = 10
    chunk_mb: int = 256
    # Strengths at which a whole regularisation path is fitted and scored on validation
    # (ridge: from one eigendecomposition; softmax: each fit warm-started from the last).
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
    (solver, iterations, objective, relative gradient norm, tolerance, converged)."""

    probe: LinearProbe
    convergence: dict[str, float | int | bool | str] = field(default_factory=dict)
    history: list[dict[str, float]] = field(default_factory=list)
    map_weight: torch.Tensor | None = None
    path: list[dict[str, float]] = field(default_factory=list)


def class_index(classes: np.ndarray, vocab_size: int) -> np.ndarray:
    """Lookup from token id to class position; -1 for types outside ``classes``."""
    lookup = np.full(vocab_size, -1, dtype=np.int64)
    lookup[classes] = np.arange(len(classes))
    return lookup


def frequent_types(train_tokens: np.ndarray, mass: float = 0.5) -> np.ndarray:
    """The most frequent token types that together cover ``mass`` of the training tokens."""
    types, counts = np.unique(train_tokens, return_counts=True)
    order = np.argsort(-counts, kind="stable")
    covered = np.cumsum(counts[order]) / counts.sum()
    return types[order[: int(np.searchsorted(covered, mass)) + 1]]


def standardisation(x: torch.Tensor, chunk: int = 65536) -> tuple[torch.Tensor, float]:
    """Mean row and one scalar scale (root mean square of the centred coordinates), in
    chunks, so no centred copy of ``x`` is made."""
    mean = torch.zeros(x.shape[1], dtype=torch.float64, device=x.device)
    for start in range(0, len(x), chunk):
        mean += x[start : start + chunk].double().sum(0)
    mean = (mean / max(len(x), 1)).to(x.dtype)
    total = sum(
        (x[start : start + chunk] - mean).pow(2).double().sum().item()
        for start in range(0, len(x), chunk)
    )
    scale = math.sqrt(total / max(len(x) * x.shape[1], 1))
    return mean, max(scale, 1e-8)


def _keep(x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Rows whose label is a class; no copy when all are."""
    keep = y >= 0
    return (x, y) if bool(keep.all()) else (x[keep], y[keep])


def fit_softmax_probe(
    x_train: torch.Tensor,
    y_train: torch.Tensor,
    n_classes: int,
    reg: RegConfig,
    cfg: ProbeConfig,
    init: LinearProbe | None = None,
    desc: str = "softmax probe",
) -> FitResult:
    """The softmax probe at the optimum of mean cross-entropy + penalty (see ``solver.py``).

    ``init`` (a probe over the same classes, e.g. the ridge probe or the fit at a nearby
    strength) is a warm start, used when its objective is below the zero probe's. Rows with
    ``y == -1`` (types not in the class set) cannot enter a cross-entropy and are left out.
    """
    x_train, y_train = _keep(x_train, y_train)
    if not x_train.is_floating_point():
        x_train = x_train.float()
    mean, scale = standardisation(x_train)
    rows = solver.chunk_rows(cfg.chunk_mb, x_train.shape[1], n_classes)
    l2 = reg.strength if reg.kind is RegKind.l2 else 0.0
    l1 = reg.strength if reg.kind is RegKind.l1 else 0.0
    problem = solver.SoftmaxObjective(x_train, y_train, n_classes, mean, scale, l2, rows)
    start = None if init is None else (init.weight.detach(), init.bias.detach())
    (weight, bias), convergence, history = solver.minimise(
        problem, start, l1, cfg.tol, cfg.max_iter, cfg.history_size, desc
    )
    probe = LinearProbe(weight, bias, mean, scale)
    return FitResult(probe=probe, convergence=convergence, history=history)


def fit_softmax_path(
    x_train: torch.Tensor,
    y_train: torch.Tensor,
    n_classes: int,
    reg: RegConfig,
    cfg: ProbeConfig,
    strengths: list[float],
    init: LinearProbe | None = None,
) -> list[FitResult]:
    """Softmax probes along a regularisation path, strongest penalty first, each warm-started
    from the one before (the optimum moves little between neighbouring strengths)."""
    fits: dict[float, FitResult] = {}
    for strength in sorted(strengths, reverse=True):
        step = RegConfig(reg.kind, strength)
        fit = fit_softmax_probe(x_train, y_train, n_classes, step, cfg, init, f"path {strength:g}")
        fits[strength], init = fit, fit.probe
    return [fits[s] for s in strengths]


class RidgePath:
    """Closed-form ridge probes at any strength from one eigendecomposition.

    The map from the (standardised) hidden state to the embedding row of its class is
    ``A(s) = Q diag(1 / (lambda + s)) Q^T X^T Y / n`` with ``X^T X / n = Q diag(lambda) Q^T``, so
    each strength costs one matrix product. Decoding: logits_c = -||x A + b - e_c||^2 / (2 sigma^2)
    up to a constant, with sigma^2 the mean squared training residual per dimension.
    """

    def __init__(self, x_train: torch.Tensor, y_train: torch.Tensor, embeddings: torch.Tensor):
        x_train, y_train = _keep(x_train, y_train)
        self.mean, self.scale = standardisation(x_train)
        self.xs = (x_train - self.mean) / self.scale
        self.targets = embeddings[y_train]
        self.target_mean = self.targets.mean(0)
        self.class_embeddings = embeddings
        n = len(self.xs)
        self.eigvals, self.eigvecs = torch.linalg.eigh(self.xs.T @ self.xs / n)
        self.eig_cross = self.eigvecs.T @ (self.xs.T @ (self.targets - self.target_mean) / n)

    def fit(self, strength: float) -> FitResult:
        inverse = 1.0 / (self.eigvals.clamp_min(0) + strength).clamp_min(1e-10)
        map_weight = self.eigvecs @ (inverse[:, None] * self.eig_cross)
        residual = self.xs @ map_weight + self.target_mean - self.targets
        sigma2 = residual.pow(2).mean().clamp_min(1e-12)
        emb = self.class_embeddings
        weight = (emb @ map_weight.T) / sigma2
        bias = (emb @ self.target_mean - 0.5 * emb.pow(2).sum(1)) / sigma2
        probe = LinearProbe(weight, bias, self.mean, self.scale)
        closed_form = {"solver": "closed_form", "converged": True}
        return FitResult(probe, closed_form, map_weight=map_weight.T.contiguous())


def fit_ridge_probe(
    x_train: torch.Tensor,
    y_train: torch.Tensor,
    class_embeddings: torch.Tensor,
    reg: RegConfig,
    validation: tuple[torch.Tensor, torch.Tensor] | None = None,
    path_strengths: list[float] | tuple[float, ...] = (),
) -> FitResult:
    """The ridge probe at ``reg.strength`` (l2) or unregularised (none); see ``RidgePath``.

    With ``validation`` and ``path_strengths``, also the validation NLL at every strength of
    the path, from the same decomposition (``FitResult.path``)."""
    if reg.kind is RegKind.l1:
        raise UserError("probe=ridge has a closed form only for reg=l2 or reg=none; use l2")
    ridge = RidgePath(x_train, y_train, class_embeddings)
    result = ridge.fit(reg.strength if reg.kind is RegKind.l2 else 0.0)
    if validation is not None:
        x_val, y_val = validation
        everything = torch.ones(len(x_val), dtype=torch.bool, device=x_val.device)
        result.path = [
            {
                "strength": s,
                "val_nll": score_probe(ridge.fit(s).probe, x_val, y_val, everything)["nll"],
            }
            for s in path_strengths
        ]
    return result


@torch.no_grad()
def token_scores(
    probe: LinearProbe, x: torch.Tensor, y: torch.Tensor, batch: int = 4096
) -> dict[str, np.ndarray]:
    """Per held-out token: top-1 and top-5 correct, and the NLL (NaN where the token's type is
    not a class, ``y == -1``: it counts as an error in top-1/top-5 and has no NLL)."""
    correct1, correct5, nll = [], [], []
    for start in range(0, len(x), batch):
        logits = probe(x[start : start + batch]).float()
        target = y[start : start + batch]
        top = logits.topk(min(5, logits.shape[1]), dim=1).indices
        correct1.append(top[:, 0] == target)
        correct5.append((top == target[:, None]).any(1))
        loss = torch.full(target.shape, float("nan"), device=logits.device)
        known = target >= 0
        if known.any():
            loss[known] = F.cross_entropy(logits[known], target[known], reduction="none")
        nll.append(loss)
    return {
        name: torch.cat(parts).cpu().numpy()
        for name, parts in (("correct1", correct1), ("correct5", correct5), ("nll", nll))
    }


def score_probe(
    probe: LinearProbe, x: torch.Tensor, y: torch.Tensor, frequent: torch.Tensor
) -> dict[str, float | int | None]:
    """Held-out top-1, top-5 and NLL. Tokens whose type is not a class (``y == -1``) count as
    errors in top-1/top-5 and are left out of the NLL (it would be infinite); ``n_unseen``
    says how many there were. ``frequent`` splits top-1 by token frequency."""
    return summarise(token_scores(probe, x, y), frequent.cpu().numpy())


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
