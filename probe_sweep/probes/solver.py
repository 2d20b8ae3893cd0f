"""Fitting a softmax probe to the optimum of its stated objective, with a certificate.

Objective: f(W, b) = mean_i [logsumexp(W x_i + b) - (W x_i + b)_{y_i}] + penalty(W), the inputs
centred and divided by one scale, the penalty ``l2 * ||W||^2`` or ``l1 * ||W||_1``, the bias
not penalised. Classes no training row carries have no finite optimum (their probability's
infimum is 0): they are left out of the fit, exactly, with weight 0 and bias -inf.

- l2 and none: Newton's method with conjugate-gradient steps, damped (Levenberg-Marquardt) by
  the change of the logits the step causes, a trust region in that metric; a step that raises
  the objective is tried shorter (up to three passes) before the damping grows.
  CG is preconditioned by a per-class model of the curvature: ``c_k Sigma + c_k m_k m_k' +
  2 l2`` with Sigma = V S V' the inputs' covariance (one eigendecomposition per fit), c_k the
  class's mean p(1-p) and m_k the inputs' mean weighted by it. It commutes with rotations of
  the inputs, so a fit in a rotated basis is the same fit rotated. Hessian-vector products are
  exact, over every row, in the rows' precision: they reuse the probabilities the last
  gradient pass kept.
- l1: FISTA (constant step from Boehning's curvature bound, gradient restart).

The stopping rule is a certificate on the objective: the duality gap P(W, b) - D(U) >= f - f*,
with the dual point U built from the probabilities of the current probe. The certificate is
taken in float64 after the bias is polished to its exact optimum for the weight, which makes U
feasible for the unpenalised bias (whatever infeasibility is left is paid for by a mixture with
a fixed distribution); for l2 and a feasible U the gap is ||grad_W f||^2 / (4 l2). A fit stops
when gap / |f| <= tol. Without a penalty no dual bound exists (the optimum may not be
attained); the fit stops on the Newton decrement's estimate of f - f* and says it is
uncertified.

Passes are in float32 until the predicted decrease of a step falls below what float32 resolves
of the objective, then in float64 (float64 throughout when the rows are), summed in float64
across chunks. Rows stay in memory up to ``memory_mb``, beyond which they are streamed; a pass
keeps its probabilities for Hessian products up to half of it (a Newton step holds two passes),
beyond which the products recompute the other chunks' probabilities (one more matrix product
per chunk) rather than use a subsample: a subsampled Hessian leaves the classes whose rows are
all left out with no curvature, and at thousands of classes their steps overshoot.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch

from probe_sweep.probes.softmax_problem import Params, Pass, SoftmaxProblem
from probe_sweep.progress import FitProgress


@dataclass
class Preconditioner:
    """(c_k Sigma + c_k m_k m_k' + 2 l2 + mu M1)^-1 per class in Sigma's eigenbasis, the rank-one
    term by Sherman-Morrison; the bias by 1 / (c_k + mu)."""

    problem: SoftmaxProblem
    at: Pass
    damping: float

    def __post_init__(self) -> None:
        p, c = self.problem, self.at.curvature.clamp_min(1e-12)
        s = p.eigvals[None, :]
        self.diag = c[:, None] * s + 2 * p.l2 + self.damping * (s + 1e-6)
        mean = (self.at.curvature_x @ p.eigvecs) / c[:, None]

        self.mean_scaled = mean / self.diag
        self.sm = c[:, None] / (1 + c[:, None] * (self.mean_scaled * mean).sum(1, keepdim=True))
        self.bias = c + self.damping

    def __call__(self, vector: Params) -> Params:
        v_w, v_b = vector
        rotated = v_w @ self.problem.eigvecs
        out = rotated / self.diag
        out -= self.mean_scaled * ((self.mean_scaled * rotated).sum(1, keepdim=True) * self.sm)
        return out @ self.problem.eigvecs.T, v_b / self.bias


def _dot(a: Params, b: Params) -> float:
    return (a[0] * b[0]).sum().item() + (a[1] * b[1]).sum().item()


def _axpy(alpha: float, x: Params, y: Params) -> Params:
    return y[0] + alpha * x[0], y[1] + alpha * x[1]


def conjugate_gradient(
    problem: SoftmaxProblem, at: Pass, damping: float, forcing: float, max_steps: int
) -> tuple[Params, int]:
    """An approximate solution of (H + damping M1) s = -g by preconditioned CG, to a residual
    of ``forcing`` times the initial one in the preconditioner's norm."""
    grad: Params = (at.grad_w, at.grad_b)
    precondition = Preconditioner(problem, at, damping)
    step: Params = (torch.zeros_like(grad[0]), torch.zeros_like(grad[1]))
    residual: Params = (-grad[0], -grad[1])
    z = precondition(residual)
    direction = z
    rz = _dot(residual, z)
    start = math.sqrt(max(rz, 0.0))
    if start == 0:
        return step, 0
    for count in range(1, max_steps + 1):
        hd = problem.hessian_product(at, direction)
        if damping:
            hd = _axpy(damping, problem.logit_metric(direction), hd)
        curvature = _dot(direction, hd)
        if curvature <= 0:
            return step, count
        alpha = rz / curvature
        step = _axpy(alpha, direction, step)
        residual = _axpy(-alpha, hd, residual)
        z = precondition(residual)
        rz_next = _dot(residual, z)
        if math.sqrt(max(rz_next, 0.0)) <= forcing * start or rz <= 0:
            return step, count
        direction = _axpy(rz_next / rz, direction, z)
        rz = rz_next
    return step, max_steps


Record = dict[str, float | int | bool | str | None]
History = list[dict[str, float | None]]
OnStep = Callable[[Params], None]  # called with each iterate the fit moves to


def minimise(
    problem: SoftmaxProblem,
    start: Params | None,
    tol: float,
    max_iter: int,
    desc: str = "softmax probe",
    on_step: OnStep | None = None,
) -> tuple[Params, Record, History]:
    """The probe minimising ``problem``'s objective from the better of ``start`` and the
    input-blind start, until its certified relative gap is at most ``tol`` or ``max_iter``
    iterations. Returns the parameters, the convergence record and, per iteration, the
    objective and the estimated relative gap. ``on_step`` sees every iterate the fit moves to
    (an interrupted fit can go on from the last one it kept)."""
    params, chosen = problem.start(), "zero"
    at = problem.evaluate(params)
    if start is not None:
        warm = (start[0].to(params[0]).clone(), start[1].to(params[1]).clone())
        trial = problem.evaluate(warm)
        if trial.value < at.value:
            params, at, chosen = warm, trial, "warm"
    history: History = []
    with FitProgress(desc) as progress:
        step = _fista if problem.l1 else _newton
        params, at, iterations, bound, estimate = step(
            problem, params, at, tol, max_iter, history, progress, on_step or _ignore
        )
    gap = bound if bound is not None else estimate
    gap_rel = None if gap is None else gap / max(abs(at.value), 1e-300)
    record: Record = {
        "solver": "fista" if problem.l1 else "newton_cg",
        "init": chosen,
        "iterations": iterations,
        "passes": problem.passes,
        "hessian_products": problem.products,
        "objective": at.value,
        "gap_bound": bound,
        "gap_rel": gap_rel,
        "certified": bound is not None and gap_rel is not None and gap_rel <= tol,
        "tol": tol,
        "converged": gap_rel is not None and gap_rel <= tol,
    }
    return params, record, history


Outcome = tuple[Params, Pass, int, float | None, float | None]  # + iterations, bound, estimate


def _ignore(params: Params) -> None:
    pass


def _estimate(problem: SoftmaxProblem, at: Pass) -> float | None:
    """The gap the certificate will find once the bias is polished, to first order: for l2
    ||grad_W||^2 / (4 l2), for l1 the gap's float32 bound; None without a penalty."""
    if problem.l2:
        return at.grad_w.pow(2).sum().item() / (4 * problem.l2)
    return None


def _newton(
    problem: SoftmaxProblem,
    params: Params,
    at: Pass,
    tol: float,
    max_iter: int,
    history: History,
    progress: FitProgress,
    on_step: OnStep,
) -> Outcome:
    """Damped Newton-CG (see the module docstring). The damping shrinks tenfold after a step
    the quadratic model predicted well and grows after one it did not; a rejected step is
    tried at fractions of its length (``backtrack``, up to three passes). Passes are in
    float32 until the predicted decrease falls below what float32 resolves of the objective,
    then in float64. The float64 certificate is taken when the pass's own bound is within
    ``tol``, or when the weight's part of it is and a bias polish may close the rest; a failed
    certificate goes on from the polished point. Without a penalty the fit stops when the
    Newton decrement's estimate of f - f* is within ``tol``."""
    damping, bound, decrement = 0.1, None, None
    grad0 = math.sqrt(_dot((at.grad_w, at.grad_b), (at.grad_w, at.grad_b)))
    polished = False  # since the last step
    iteration = max_iter
    for i in range(max_iter):
        scale, estimate = max(abs(at.value), 1e-300), _estimate(problem, at)
        shown = _ratio(estimate if estimate is not None else decrement, scale)
        history.append(problem.snapshot(i, at.value, shown))
        progress.update(i, at.value, shown)
        cheap = problem.gap(params, at)
        ready = cheap is not None and cheap <= tol * scale
        hopeful = estimate is not None and estimate <= 0.5 * tol * scale and not polished
        if ready or hopeful:
            candidate, checked, bound = problem.certify(params, tol, at.value)
            if bound is not None and bound <= tol * abs(checked.value):
                params, at, iteration = candidate, checked, i
                break
            params, at, polished = candidate, problem.evaluate(candidate), True
        grad = (at.grad_w, at.grad_b)
        forcing = min(0.1, math.sqrt(math.sqrt(_dot(grad, grad)) / max(grad0, 1e-300)))
        if estimate is not None and estimate > 0:  # solve no tighter than the last step needs
            forcing = max(forcing, min(0.5, math.sqrt(0.1 * tol * scale / estimate)))
        step, _ = conjugate_gradient(problem, at, damping, forcing, 200)
        predicted = -(_dot(grad, step) + 0.5 * _dot(step, problem.hessian_product(at, step)))
        if estimate is None:
            decrement = predicted
            if damping < 1e-6 and predicted <= tol * scale:
                iteration = i
                break
        if predicted <= 16 * torch.finfo(problem.dtype).eps * scale:
            if problem.dtype == torch.float64:
                iteration = i
                break  # no step left that a pass could measure
            problem.dtype, damping = torch.float64, min(damping, 1e-6)
            at = problem.evaluate(params)
            continue
        trial_params = _axpy(1.0, step, params)
        trial = problem.evaluate(trial_params)
        ratio = (at.value - trial.value) / predicted
        accepted = (trial_params, trial) if ratio > 0 else None
        if accepted is None:  # a few passes along the step before a new CG solve, more damped
            value = trial.value
            del trial  # a step holds at most two passes' probabilities
            accepted = backtrack(problem, params, at, step, value)
        if accepted is not None:
            (params, at), polished = accepted, False
            on_step(params)
        if ratio > 0.9:
            damping *= 0.1
        elif ratio > 0.5:
            damping *= 0.5
        elif ratio < 0.25:
            damping = max(damping * 4, 1e-8)
    if problem.l2 and (bound is None or bound > tol * abs(at.value)):
        params, at, bound = problem.certify(params, tol, at.value)
    return params, at, iteration, bound, decrement


def backtrack(
    problem: SoftmaxProblem, params: Params, at: Pass, step: Params, value: float, tries: int = 3
) -> tuple[Params, Pass] | None:
    """A point part of the way along a rejected ``step`` (``value``: the objective at its end)
    that lowers the objective, and its pass; None if ``tries`` passes find none. Each try goes
    to the minimum of the quadratic through the objective at the start, its slope there and
    the last point tried, kept within [0.1, 0.5] of that point's fraction of the step. A new CG
    solve with more damping costs up to 200 Hessian products."""
    slope, t = _dot((at.grad_w, at.grad_b), step), 1.0
    for _ in range(tries):
        curvature = (value - at.value - slope * t) / t**2
        fraction = 0.1
        if math.isfinite(curvature) and curvature > 0:
            fraction = min(0.5, max(0.1, -slope / (2 * curvature * t)))
        t *= fraction
        shorter = _axpy(t, step, params)
        there = problem.evaluate(shorter)
        if there.value < at.value:
            return shorter, there
        value = there.value
        del there  # a step holds at most two passes' probabilities
    return None


def _ratio(value: float | None, scale: float) -> float | None:
    return None if value is None else value / scale


def _fista(
    problem: SoftmaxProblem,
    params: Params,
    at: Pass,
    tol: float,
    max_iter: int,
    history: History,
    progress: FitProgress,
    on_step: OnStep,
) -> Outcome:
    """Accelerated proximal gradient on smooth part + ``l1 * ||W||_1`` (Beck & Teboulle 2009)
    with the constant step 1/L, L = lambda_max(second moment of (x, 1)) / 2 (Boehning 1992),
    and gradient restart (O'Donoghue & Candes 2015). Each iteration's pass is at the momentum
    point; its float32 duality gap decides when the float64 certificate is taken."""
    top = problem.eigvals[-1].item() + problem.x_mean.pow(2).sum().item() + 1.0
    step = 1.0 / (0.5 * top)
    l1 = problem.l1

    def prox(point: Params, grads: Pass) -> Params:
        weight = point[0] - step * grads.grad_w
        weight = weight.sign() * (weight.abs() - step * l1).clamp_min(0)
        return weight, point[1] - step * grads.grad_b

    current, point, momentum = params, params, 1.0
    bound: float | None = None
    iteration = max_iter
    for i in range(max_iter):
        scale = max(abs(at.value), 1e-300)
        gap = problem.gap(point, at)
        history.append(problem.snapshot(i, at.value, _ratio(gap, scale)))
        progress.update(i, at.value, _ratio(gap, scale))
        if gap is not None and gap <= tol * scale:
            polished, checked, bound = problem.certify(point, tol, at.value)
            if bound is not None and bound <= tol * abs(checked.value):
                return polished, checked, i, bound, None
        candidate = prox(point, at)
        ascent = _dot(_axpy(-1.0, candidate, point), _axpy(-1.0, current, candidate))
        if ascent > 0:
            momentum = 1.0
        following = (1 + math.sqrt(1 + 4 * momentum**2)) / 2
        ratio = (momentum - 1) / following
        point = _axpy(ratio, _axpy(-1.0, current, candidate), candidate)
        current, momentum = candidate, following
        at = problem.evaluate(point, keep=False)
        on_step(point)
    polished, checked, bound = problem.certify(point, tol, at.value)
    return polished, checked, iteration, bound, None
