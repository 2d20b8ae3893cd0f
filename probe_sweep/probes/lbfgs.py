"""Full-batch L-BFGS for a smooth objective that is not a softmax probe: the tuned lens's
translator (not convex, so no certificate; it stops at a stationary point).

It stops when the largest gradient entry is at most ``tol`` times its value at the start.
"""

from __future__ import annotations

from typing import Protocol

import torch

from probe_sweep.progress import FitProgress

Params = tuple[torch.Tensor, torch.Tensor]


class Objective(Protocol):
    """A smooth function of two parameter tensors, with its gradient, and the zero point the
    solver starts from."""

    def __call__(self, params: Params, grad: bool = True) -> tuple[float, Params | None]: ...

    def zero(self) -> Params: ...


def _max_abs(params: Params) -> float:
    return max(p.abs().max().item() for p in params)


def minimise(
    objective: Objective,
    tol: float,
    max_iter: int,
    history_size: int = 10,
    desc: str = "L-BFGS",
) -> tuple[Params, dict[str, float | int | bool | str]]:
    """L-BFGS (strong-Wolfe line search) from ``objective.zero()``; returns the parameters and
    a convergence record (iterations, objective, largest gradient entry relative to the start).
    A long fit logs its progress (``FitProgress``: evaluations and objective)."""
    init = objective.zero()
    _, grads0 = objective(init)
    assert grads0 is not None
    reference = max(_max_abs(grads0), 1e-12)
    weight = torch.nn.Parameter(init[0].clone())
    bias = torch.nn.Parameter(init[1].clone())
    optimiser = torch.optim.LBFGS(
        [weight, bias],
        lr=1.0,
        max_iter=max_iter,
        max_eval=max_iter * 5 // 4,
        tolerance_grad=tol * reference,
        # stop on a vanishing step, never on a small change of the objective: near the
        # optimum that change is below the resolution of the dtype long before the gradient is
        tolerance_change=torch.finfo(init[0].dtype).eps ** 2,
        history_size=history_size,
        line_search_fn="strong_wolfe",
    )

    evaluations = 0

    def closure() -> float:
        nonlocal evaluations
        value, grads = objective((weight.detach(), bias.detach()))
        assert grads is not None
        weight.grad, bias.grad = grads
        evaluations += 1
        progress.update(evaluations, value, None)
        return value

    with FitProgress(desc) as progress:
        optimiser.step(closure)  # type: ignore[arg-type]
    params = (weight.detach(), bias.detach())
    value, grads = objective(params)
    assert grads is not None
    residual = _max_abs(grads) / reference
    record = {
        "solver": "lbfgs",
        "iterations": int(optimiser.state[weight].get("n_iter", 0)),
        "objective": value,
        "max_grad_rel": residual,
        "tol": tol,
        "converged": bool(residual <= tol),
    }
    return params, record
