"""Fitting a softmax probe to the optimum of its stated objective.

Objective: mean cross-entropy over the training rows (inputs centred and divided by one scale)
plus ``l2 * ||W||^2`` or ``l1 * ||W||_1``; the bias is not penalised. It is convex, so its
optimum is the probe; how close a fit came is measured and reported, never assumed.

- l2 and none: full-batch L-BFGS with a strong-Wolfe line search (``torch.optim.LBFGS``).
- l1: FISTA (accelerated proximal gradient, backtracking on the step, adaptive restart).

Both stop when the largest entry of the gradient (for l1: of the minimum-norm subgradient) is
at most ``tol`` times the largest gradient entry of the zero probe: a scale-free measure that
means the same in every basis. Loss and gradient stream over row chunks, so memory is bounded
by the chunk, not the token count, and run on whichever device the rows are moved to.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Protocol

import torch
from tqdm.auto import tqdm

from probe_sweep.rows import Rows

Params = tuple[torch.Tensor, torch.Tensor]  # weight (classes x d), bias (classes)


def chunk_rows(chunk_mb: int, d: int, n_classes: int) -> int:
    """Rows per chunk so that one chunk's logits and inputs take about ``chunk_mb`` MiB."""
    return max(64, chunk_mb * 2**20 // (4 * (2 * n_classes + d)))


@dataclass
class SoftmaxObjective:
    """The smooth part: mean cross-entropy plus ``l2 * ||W||^2``, in chunks of ``chunk`` rows
    streamed from ``rows`` (every label a class)."""

    rows: Rows
    n_classes: int
    mean: torch.Tensor
    scale: float
    l2: float
    chunk: int

    def standardised(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """Centred, scaled inputs and labels, chunk by chunk, on the parameters' device."""
        for x, y in self.rows.chunks(self.chunk):
            yield (
                (x.to(self.mean.device, self.mean.dtype) - self.mean) / self.scale,
                y.to(self.mean.device),
            )

    @torch.no_grad()
    def __call__(self, params: Params, grad: bool = True) -> tuple[float, Params | None]:
        weight, bias = params
        device = weight.device
        total = torch.zeros((), dtype=torch.float64, device=device)
        g_weight, g_bias = torch.zeros_like(weight), torch.zeros_like(bias)
        for xs, y in self.standardised():
            logits = torch.addmm(bias, xs, weight.T)
            lse = torch.logsumexp(logits, 1)
            total += (lse - logits.gather(1, y[:, None]).squeeze(1)).sum(dtype=torch.float64)
            if grad:
                probs = logits.sub_(lse[:, None]).exp_()  # in place: one chunk-sized buffer
                probs[torch.arange(len(y), device=device), y] -= 1.0
                g_weight.addmm_(probs.T, xs)
                g_bias += probs.sum(0)
        n = max(len(self.rows), 1)
        value = total.item() / n + self.l2 * weight.pow(2).sum().item()
        if not grad:
            return value, None
        g_weight.div_(n).add_(weight, alpha=2 * self.l2)
        return value, (g_weight, g_bias.div_(n))

    def zero(self) -> Params:
        """The zero probe: where the solver starts unless a warm start is better."""
        like = self.mean
        return like.new_zeros(self.n_classes, self.rows.d), like.new_zeros(self.n_classes)

    @torch.no_grad()
    def lipschitz(self) -> float:
        """An upper bound on the smooth part's curvature: lambda_max of the second moment of
        (standardised row, 1) over 2 (Boehning 1992), plus 2 * l2."""
        d = self.rows.d
        gram = torch.zeros(d + 1, d + 1, dtype=torch.float64, device=self.mean.device)
        for xs, _ in self.standardised():
            xs = torch.cat([xs, torch.ones_like(xs[:, :1])], 1).double()
            gram += xs.T @ xs
        top = torch.linalg.eigvalsh(gram / max(len(self.rows), 1))[-1].item()
        return 0.5 * top + 2 * self.l2


def _max_abs(params: Params) -> float:
    return max(p.abs().max().item() for p in params)


def _l1_value(weight: torch.Tensor, l1: float) -> float:
    return l1 * weight.abs().sum().item() if l1 else 0.0


def _min_norm_subgradient(params: Params, grads: Params, l1: float) -> Params:
    """The subgradient of smooth part + ``l1 * ||W||_1`` nearest zero: zero at the optimum."""
    weight, _ = params
    g_weight, g_bias = grads
    if not l1:
        return g_weight, g_bias
    shrunk = g_weight.sign() * (g_weight.abs() - l1).clamp_min(0)
    return torch.where(weight != 0, g_weight + l1 * weight.sign(), shrunk), g_bias


class Objective(Protocol):
    """A smooth function of two parameter tensors, with its gradient, and the zero point the
    solver starts from: ``SoftmaxObjective`` (convex) and the tuned lens's translator objective.
    An l1 penalty (FISTA) needs a ``SoftmaxObjective``, for its curvature bound."""

    def __call__(self, params: Params, grad: bool = True) -> tuple[float, Params | None]: ...

    def zero(self) -> Params: ...


def minimise(
    objective: Objective,
    start: Params | None,
    l1: float,
    tol: float,
    max_iter: int,
    history_size: int = 10,
    desc: str = "softmax probe",
) -> tuple[Params, dict[str, float | int | bool | str], list[dict[str, float]]]:
    """The probe minimising ``objective`` (+ ``l1 * ||W||_1``), from the zero probe or
    ``start``, whichever has the lower objective. Returns the parameters, a convergence
    record and the objective at every evaluation."""
    zero = objective.zero()
    value0, grads0 = objective(zero)
    assert grads0 is not None
    reference = max(_max_abs(grads0), 1e-12)
    init, chosen = zero, "zero"
    if start is not None:
        start = (start[0].to(zero[0]).clone(), start[1].to(zero[1]).clone())
        if objective(start, grad=False)[0] + _l1_value(start[0], l1) < value0:
            init, chosen = start, "warm"
    history: list[dict[str, float]] = []
    with tqdm(total=max_iter, desc=desc, unit="it", leave=False, disable=None) as bar:
        if l1:
            assert isinstance(objective, SoftmaxObjective)
            params, iterations, evaluations = _fista(
                objective, init, l1, tol * reference, max_iter, history, bar
            )
        else:
            params, iterations, evaluations = _lbfgs(
                objective, init, tol * reference, max_iter, history_size, history, bar
            )
    value, grads = objective(params)
    assert grads is not None
    residual = _max_abs(_min_norm_subgradient(params, grads, l1)) / reference
    convergence = {
        "solver": "fista" if l1 else "lbfgs",
        "init": chosen,
        "iterations": iterations,
        "evaluations": evaluations + 1,
        "objective": value + _l1_value(params[0], l1),
        "grad_norm_rel": residual,
        "grad_start": reference,
        "tol": tol,
        "converged": bool(residual <= tol),
    }
    return params, convergence, history


def _lbfgs(
    objective: Objective,
    init: Params,
    tolerance: float,
    max_iter: int,
    history_size: int,
    history: list[dict[str, float]],
    bar: tqdm,
) -> tuple[Params, int, int]:
    """Full-batch L-BFGS (strong-Wolfe line search) from ``init`` until the largest gradient
    entry is at most ``tolerance``; returns the parameters, iterations and evaluations."""
    weight = torch.nn.Parameter(init[0].clone())
    bias = torch.nn.Parameter(init[1].clone())
    optimiser = torch.optim.LBFGS(
        [weight, bias],
        lr=1.0,
        max_iter=max_iter,
        max_eval=max_iter * 5 // 4,  # torch's default; it also bounds each line search
        tolerance_grad=tolerance,
        # stop on a vanishing step, never on a small change of the objective: near the
        # optimum that change is below the resolution of the dtype long before the gradient is
        tolerance_change=torch.finfo(init[0].dtype).eps ** 2,
        history_size=history_size,
        line_search_fn="strong_wolfe",
    )

    def closure() -> float:
        value, grads = objective((weight.detach(), bias.detach()))
        assert grads is not None
        weight.grad, bias.grad = grads
        history.append({"evaluation": len(history), "objective": value})
        bar.set_postfix(objective=f"{value:.5f}")
        return value

    optimiser.step(closure)  # type: ignore[arg-type]
    state = optimiser.state[weight]
    bar.update(state.get("n_iter", 0))
    params = (weight.detach(), bias.detach())
    return params, int(state.get("n_iter", 0)), int(state.get("func_evals", len(history)))


def _fista(
    objective: SoftmaxObjective,
    init: Params,
    l1: float,
    tolerance: float,
    max_iter: int,
    history: list[dict[str, float]],
    bar: tqdm,
) -> tuple[Params, int, int]:
    """Accelerated proximal gradient on smooth part + ``l1 * ||W||_1`` (Beck & Teboulle 2009)
    with the constant step 1/L from Boehning's curvature bound, L = lambda_max(X'X / n) / 2 + 2 l2
    (X with a column of ones for the bias), and gradient-based adaptive restart (O'Donoghue &
    Candes 2015). Neither needs objective values, whose float32 resolution (about 1e-7 of the
    loss) is far coarser than the decrease per step near the optimum."""
    step = 1.0 / objective.lipschitz()

    def prox(params: Params, grads: Params) -> Params:
        weight = params[0] - step * grads[0]
        weight = weight.sign() * (weight.abs() - step * l1).clamp_min(0)
        return weight, params[1] - step * grads[1]

    current, momentum_point, momentum = init, init, 1.0
    evaluations = 0
    for iteration in range(1, max_iter + 1):
        smooth, grads = objective(momentum_point)
        assert grads is not None
        evaluations += 1
        candidate = prox(momentum_point, grads)
        history.append({"evaluation": evaluations, "objective": smooth})
        bar.update(1)
        mapping = max(_max_abs(momentum_point[i] - candidate[i]) for i in (0, 1)) / step
        if mapping <= tolerance:  # the gradient mapping is small: check the real residual
            _, exact = objective(candidate)
            assert exact is not None
            evaluations += 1
            if _max_abs(_min_norm_subgradient(candidate, exact, l1)) <= tolerance:
                return candidate, iteration, evaluations
        ascent = sum(
            ((momentum_point[i] - candidate[i]) * (candidate[i] - current[i])).sum().item()
            for i in (0, 1)
        )
        if ascent > 0:  # the momentum points uphill: restart it
            momentum = 1.0
        next_momentum = (1 + (1 + 4 * momentum**2) ** 0.5) / 2
        ratio = (momentum - 1) / next_momentum
        momentum_point = (
            candidate[0] + ratio * (candidate[0] - current[0]),
            candidate[1] + ratio * (candidate[1] - current[1]),
        )
        current, momentum = candidate, next_momentum
    return current, max_iter, evaluations
