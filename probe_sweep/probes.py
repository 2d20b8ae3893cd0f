"""Stage 5: linear probes from a hidden state (in some basis) to the input token, and their scores.

Both probe kinds end as a ``LinearProbe``: logits over a fixed set of classes (token ids).
- softmax: a linear classifier trained with minibatch Adam and early stopping on validation loss.
- ridge: a closed-form linear map to the token's embedding row, decoded by the nearest row of
  W_E; its logits are the log-likelihood of a Gaussian around each row, so it has an NLL too.
"""

from __future__ import annotations

import copy
import functools
import math
from dataclasses import dataclass, field
from enum import Enum

import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

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


class Precision(Enum):
    """Precision of the softmax probe's training matmuls (weights, loss and validation stay
    float32). ``auto``: bfloat16 where the device runs it natively (CUDA with bf16, CPUs with
    AVX512-BF16/AMX), else float32."""

    auto = "auto"
    float32 = "float32"
    bfloat16 = "bfloat16"


@dataclass
class ProbeConfig:
    """``classes=seen``: the softmax is over token types seen in training (held-out tokens of
    other types count as errors); ``vocab``: over the whole vocabulary."""

    kind: ProbeKind = ProbeKind.softmax
    classes: ClassSet = ClassSet.seen
    batch_size: int = 1024
    lr: float = 0.01
    max_epochs: int = 30
    patience: int = 2
    precision: Precision = Precision.auto
    # ridge only: strengths at which the whole regularisation path is scored on validation
    path_strengths: list[float] = field(default_factory=list)


@dataclass
class RegConfig:
    """Penalty ``strength * ||W||^2`` (l2) or ``strength * ||W||_1`` (l1) added to the mean
    per-token loss; for ridge, the l2 term of the per-token squared error."""

    kind: RegKind = RegKind.l2
    strength: float = 1e-6


class LinearProbe(torch.nn.Module):
    """``logits = ((x - mean) / scale) @ weight.T + bias`` over ``classes`` (token ids).

    Inputs are centred and divided by one scalar, which keeps the geometry of the basis
    (a per-coordinate scale would not).
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
    probe: LinearProbe
    history: list[dict[str, float]]
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


def _standardisation(x: torch.Tensor, chunk: int = 65536) -> tuple[torch.Tensor, float]:
    """Mean row and one scalar scale; in chunks, so no centred copy of ``x`` is made."""
    mean = x.mean(0)
    total = sum(
        (x[start : start + chunk] - mean).pow(2).sum().item() for start in range(0, len(x), chunk)
    )
    scale = math.sqrt(total / max(len(x), 1)) / math.sqrt(x.shape[1])
    return mean, max(scale, 1e-8)


@functools.cache
def _cpu_has_native_bf16() -> bool:
    try:
        with open("/proc/cpuinfo") as f:
            flags = next((line for line in f if line.startswith("flags")), "").split()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def matmul_dtype(device: torch.device, precision: Precision) -> torch.dtype:
    """The dtype the softmax probe's training matmuls run in on ``device``."""
    if precision is Precision.float32:
        return torch.float32
    if precision is Precision.bfloat16:
        return torch.bfloat16
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float32
    if device.type == "cpu" and _cpu_has_native_bf16():
        return torch.bfloat16
    return torch.float32


def _keep(x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Rows whose label is a class; no copy when all are."""
    keep = y >= 0
    return (x, y) if bool(keep.all()) else (x[keep], y[keep])


def _penalty(weight: torch.Tensor, reg: RegConfig) -> torch.Tensor:
    if reg.kind is RegKind.l2:
        return reg.strength * weight.pow(2).sum()
    if reg.kind is RegKind.l1:
        return reg.strength * weight.abs().sum()
    return weight.new_zeros(())


@torch.no_grad()
def _mean_loss(probe: LinearProbe, x: torch.Tensor, y: torch.Tensor, batch: int) -> float:
    total = 0.0
    for start in range(0, len(x), batch):
        logits = probe(x[start : start + batch])
        total += F.cross_entropy(logits, y[start : start + batch], reduction="sum").item()
    return total / max(len(x), 1)


def fit_softmax_probe(
    x_train: torch.Tensor,
    y_train: torch.Tensor,
    x_val: torch.Tensor,
    y_val: torch.Tensor,
    n_classes: int,
    reg: RegConfig,
    cfg: ProbeConfig,
    seed: int,
    desc: str = "softmax probe",
) -> FitResult:
    """Minibatch Adam on cross-entropy + penalty; keep the epoch with the lowest validation
    loss and stop after ``patience`` epochs without improvement. ``y == -1`` rows (types not in
    the class set) cannot enter a cross-entropy and are left out of training and validation.

    Training matmuls run in ``matmul_dtype(device, cfg.precision)`` (autocast; the weights,
    the loss and the validation loss that decides early stopping stay float32)."""
    x_train, y_train = _keep(x_train, y_train)
    x_val, y_val = _keep(x_val, y_val)
    mean, scale = _standardisation(x_train)
    d = x_train.shape[1]
    probe = LinearProbe(
        torch.zeros(n_classes, d, device=x_train.device),
        torch.zeros(n_classes, device=x_train.device),
        mean,
        scale,
    )
    optimiser = torch.optim.Adam(probe.parameters(), lr=cfg.lr)
    generator = torch.Generator().manual_seed(seed)
    best_loss, best_state, stale = math.inf, copy.deepcopy(probe.state_dict()), 0
    history: list[dict[str, float]] = []
    device = x_train.device
    dtype = matmul_dtype(device, cfg.precision)
    with tqdm(range(cfg.max_epochs), desc=desc, unit="epoch", leave=False) as bar:
        for epoch in bar:
            order = torch.randperm(len(x_train), generator=generator).to(device)
            running = torch.zeros((), device=device)  # summed on the device: one sync per epoch
            for start in range(0, len(order), cfg.batch_size):
                idx = order[start : start + cfg.batch_size]
                with torch.autocast(device.type, dtype, enabled=dtype != torch.float32):
                    logits = probe(x_train[idx])
                loss = F.cross_entropy(logits.float(), y_train[idx])
                optimiser.zero_grad(set_to_none=True)
                (loss + _penalty(probe.weight, reg)).backward()
                optimiser.step()
                running += loss.detach() * len(idx)
            val_loss = _mean_loss(probe, x_val, y_val, 4 * cfg.batch_size)
            history.append(
                {"epoch": epoch, "train_loss": running.item() / len(x_train), "val_loss": val_loss}
            )
            bar.set_postfix(val_loss=f"{val_loss:.4f}")
            if val_loss < best_loss - 1e-4:
                best_loss, best_state, stale = val_loss, copy.deepcopy(probe.state_dict()), 0
            else:
                stale += 1
                if stale >= cfg.patience:
                    break
    probe.load_state_dict(best_state)
    return FitResult(probe=probe, history=history)


class RidgePath:
    """Closed-form ridge probes at any strength from one eigendecomposition.

    The map from the (standardised) hidden state to the embedding row of its class is
    ``A(s) = Q diag(1 / (lambda + s)) Q^T X^T Y / n`` with ``X^T X / n = Q diag(lambda) Q^T``, so
    each strength costs one matrix product. Decoding: logits_c = -||x A + b - e_c||^2 / (2 sigma^2)
    up to a constant, with sigma^2 the mean squared training residual per dimension.
    """

    def __init__(self, x_train: torch.Tensor, y_train: torch.Tensor, embeddings: torch.Tensor):
        x_train, y_train = _keep(x_train, y_train)
        self.mean, self.scale = _standardisation(x_train)
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
        return FitResult(probe=probe, history=[], map_weight=map_weight.T.contiguous())


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
    solver = RidgePath(x_train, y_train, class_embeddings)
    result = solver.fit(reg.strength if reg.kind is RegKind.l2 else 0.0)
    if validation is not None:
        x_val, y_val = validation
        everything = torch.ones(len(x_val), dtype=torch.bool, device=x_val.device)
        result.path = [
            {
                "strength": s,
                "val_nll": score_probe(solver.fit(s).probe, x_val, y_val, everything)["nll"],
            }
            for s in path_strengths
        ]
    return result


@torch.no_grad()
def score_probe(
    probe: LinearProbe,
    x: torch.Tensor,
    y: torch.Tensor,
    frequent: torch.Tensor,
    batch: int = 4096,
) -> dict[str, float | int]:
    """Held-out top-1, top-5 and NLL. Tokens whose type is not a class (``y == -1``) count as
    errors in top-1/top-5 and are left out of the NLL (it would be infinite); ``n_unseen``
    says how many there were. ``frequent`` splits top-1 by token frequency."""
    correct1 = torch.zeros(len(x), dtype=torch.bool, device=x.device)
    correct5 = torch.zeros_like(correct1)
    nll_sum = 0.0
    for start in range(0, len(x), batch):
        logits = probe(x[start : start + batch])
        target = y[start : start + batch]
        top = logits.topk(min(5, logits.shape[1]), dim=1).indices
        correct1[start : start + batch] = top[:, 0] == target
        correct5[start : start + batch] = (top == target[:, None]).any(1)
        known = target >= 0
        if known.any():
            nll_sum += F.cross_entropy(logits[known], target[known], reduction="sum").item()
    n_known = int((y >= 0).sum())
    rare = ~frequent
    return {
        "top1": correct1.float().mean().item(),
        "top5": correct5.float().mean().item(),
        "nll": nll_sum / max(n_known, 1),
        "top1_frequent": correct1[frequent].float().mean().item() if frequent.any() else None,
        "top1_rare": correct1[rare].float().mean().item() if rare.any() else None,
        "n_test": len(x),
        "n_unseen": len(x) - n_known,
    }
