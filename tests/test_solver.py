"""The softmax probe reaches the optimum of its stated objective: equal to scikit-learn's on the
same objective, equivariant under rotations of the inputs (l2, none), optimal for l1 by the
subgradient conditions, and the same whatever the chunk size."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from sklearn.linear_model import LogisticRegression

from probe_sweep import solver
from probe_sweep.probes import (
    ProbeConfig,
    RegConfig,
    RegKind,
    RidgePath,
    fit_softmax_path,
    fit_softmax_probe,
    standardisation,
)
from probe_sweep.rows import in_memory

# The default tolerance: float32 logits resolve the objective to about 1e-7 of its value,
# which is where L-BFGS's line search stops finding decrease (about 1e-4 relative gradient).
TIGHT = ProbeConfig(tol=1e-4, max_iter=2000)
# In float64 the same code goes much further.
EXACT = ProbeConfig(tol=1e-7, max_iter=2000)


def overlapping(n: int = 3000, n_classes: int = 12, d: int = 10, seed: int = 0):
    """Classes that overlap (noise 1.5), off-centre inputs with unequal coordinate scales: a
    problem with a finite, well-defined optimum even without a penalty."""
    g = torch.Generator().manual_seed(seed)
    centres = torch.randn(n_classes, d, generator=g)
    y = torch.randint(0, n_classes, (n,), generator=g)
    x = centres[y] + 1.5 * torch.randn(n, d, generator=g)
    return x * torch.linspace(0.5, 3.0, d) + 2.0, y, centres


def objective(fit, x: torch.Tensor, y: torch.Tensor, reg: RegConfig) -> float:
    """Mean cross-entropy + penalty in float64, computed here from the weights alone."""
    probe = fit.probe.double()
    logits = probe(x.double())
    loss = torch.nn.functional.cross_entropy(logits, y).item()
    w = probe.weight.detach()
    penalty = {RegKind.l2: w.pow(2).sum(), RegKind.l1: w.abs().sum(), RegKind.none: 0.0}
    return loss + reg.strength * float(penalty[reg.kind])


def random_rotation(d: int, seed: int) -> torch.Tensor:
    q, r = torch.linalg.qr(torch.randn(d, d, generator=torch.Generator().manual_seed(seed)))
    return q * torch.sign(torch.diagonal(r))


@pytest.mark.parametrize(
    ("dtype", "cfg", "bound"), [(torch.float32, TIGHT, 1e-3), (torch.float64, EXACT, 1e-5)]
)
@pytest.mark.parametrize("reg", [RegConfig(RegKind.l2, 1e-3), RegConfig(RegKind.none, 0.0)])
def test_a_probe_in_a_rotated_basis_is_the_natural_probe_rotated(
    reg: RegConfig, dtype: torch.dtype, cfg: ProbeConfig, bound: float
) -> None:
    x, y, _ = overlapping()
    x, q = x.to(dtype), random_rotation(x.shape[1], seed=1).to(dtype)
    natural = fit_softmax_probe(in_memory(x, y), 12, reg, cfg)
    rotated = fit_softmax_probe(in_memory(x @ q, y), 12, reg, cfg)
    assert natural.convergence["converged"] and rotated.convergence["converged"]
    w, wq = natural.probe.weight.detach(), rotated.probe.weight.detach()
    assert ((wq - w @ q).norm() / w.norm()).item() < bound
    pred, pred_q = natural.probe(x).argmax(1), rotated.probe(x @ q).argmax(1)
    assert (pred == pred_q).float().mean().item() >= 0.999  # near-ties may flip
    top1, top1_q = (pred == y).float().mean().item(), (pred_q == y).float().mean().item()
    assert abs(top1 - top1_q) <= 1 / len(y)


def test_the_objective_matches_scikit_learn_at_its_optimum() -> None:
    x, y, _ = overlapping()
    strength = 1e-3
    reg = RegConfig(RegKind.l2, strength)
    fit = fit_softmax_probe(in_memory(x, y), 12, reg, TIGHT)
    # scikit-learn minimises C * sum(CE) + ||W||^2 / 2; divided by C * n that is ours when
    # C = 1 / (2 * strength * n). Same standardised inputs, bias unpenalised in both.
    xs = ((x - fit.probe.mean) / fit.probe.scale).double().numpy()
    reference = LogisticRegression(C=1 / (2 * strength * len(x)), tol=1e-8, max_iter=10_000)
    reference.fit(xs, y.numpy())
    ref_loss = torch.nn.functional.cross_entropy(
        torch.from_numpy(xs @ reference.coef_.T + reference.intercept_), y
    ).item()
    ref_objective = ref_loss + strength * float((reference.coef_**2).sum())
    ours = objective(fit, x, y, reg)
    assert ours == pytest.approx(ref_objective, rel=1e-4)
    assert ours == pytest.approx(fit.convergence["objective"], rel=1e-5)
    predictions = fit.probe(x).argmax(1).numpy()
    assert (predictions == reference.predict(xs)).mean() > 0.999


def test_the_l1_probe_meets_the_subgradient_optimality_conditions() -> None:
    x, y, _ = overlapping()
    strength = 2e-3
    fit = fit_softmax_probe(in_memory(x, y), 12, RegConfig(RegKind.l1, strength), TIGHT)
    conv = fit.convergence
    assert conv["solver"] == "fista" and conv["converged"]
    # The gradient of the smooth part (mean cross-entropy) at the solution, by autograd.
    weight = fit.probe.weight.detach().double().requires_grad_()
    bias = fit.probe.bias.detach().double().requires_grad_()
    xs = ((x - fit.probe.mean) / fit.probe.scale).double()
    torch.nn.functional.cross_entropy(xs @ weight.T + bias, y).backward()
    g, w = weight.grad, weight.detach()
    # Where w != 0: g = -strength * sign(w); where w == 0: |g| <= strength; bias: g = 0.
    slack = 1e-3 * strength + 5 * conv["tol"] * solver_reference(x, y)
    nonzero = w != 0
    assert 0.05 < nonzero.float().mean().item() < 0.95, "the penalty must zero some weights"
    assert (g[nonzero] + strength * w[nonzero].sign()).abs().max().item() <= slack
    assert g[~nonzero].abs().max().item() <= strength + slack
    assert bias.grad.abs().max().item() <= slack


def solver_reference(x: torch.Tensor, y: torch.Tensor) -> float:
    """The largest gradient entry of the zero probe (what the tolerance is relative to)."""
    mean, scale = standardisation(in_memory(x, y))
    problem = solver.SoftmaxObjective(in_memory(x, y), 12, mean, scale, 0.0, chunk=len(x))
    zero = (torch.zeros(12, x.shape[1]), torch.zeros(12))
    _, grads = problem(zero)
    return max(g.abs().max().item() for g in grads)


@pytest.mark.parametrize("kind", [RegKind.l2, RegKind.l1])
def test_chunked_streaming_gives_the_same_fit_as_one_chunk(kind: RegKind) -> None:
    x, y, _ = overlapping()
    x = x.double()  # float64: the two fits differ only by the order of the sums
    mean, scale = standardisation(in_memory(x, y))
    l2, l1 = (1e-3, 0.0) if kind is RegKind.l2 else (0.0, 1e-3)
    fits = []
    for chunk in (len(x), 257):
        problem = solver.SoftmaxObjective(in_memory(x, y), 12, mean, scale, l2, chunk)
        (weight, _), conv, _ = solver.minimise(problem, None, l1, 1e-7, 3000)
        assert conv["converged"]
        fits.append(weight)
    assert ((fits[0] - fits[1]).norm() / fits[0].norm()).item() < 1e-5


def test_chunk_size_follows_the_memory_budget() -> None:
    assert solver.chunk_rows(256, d=384, n_classes=2000) == 256 * 2**20 // (4 * 4384)
    assert solver.chunk_rows(1, d=1600, n_classes=50257) == 64  # never below 64 rows


def test_a_warm_start_is_used_only_where_it_beats_the_zero_probe() -> None:
    x, y, centres = overlapping()
    reg = RegConfig(RegKind.l2, 1e-3)
    cold = fit_softmax_probe(in_memory(x, y), 12, reg, TIGHT)
    near = fit_softmax_probe(in_memory(x, y), 12, RegConfig(RegKind.l2, 2e-3), TIGHT).probe
    warm = fit_softmax_probe(in_memory(x, y), 12, reg, TIGHT, init=near)
    assert warm.convergence["init"] == "warm"
    assert warm.convergence["iterations"] <= cold.convergence["iterations"]
    assert warm.convergence["objective"] == pytest.approx(cold.convergence["objective"], rel=1e-5)
    w_cold, w_warm = cold.probe.weight.detach(), warm.probe.weight.detach()
    assert ((w_cold - w_warm).norm() / w_cold.norm()).item() < 1e-2
    # A start worse than zero (here the ridge probe's Gaussian logits) is not used.
    ridge = RidgePath(in_memory(x, y), centres).fit(reg.strength).probe
    assert (
        fit_softmax_probe(in_memory(x, y), 12, reg, TIGHT, init=ridge).convergence["init"] == "zero"
    )


def test_the_regularisation_path_is_each_strength_s_optimum() -> None:
    x, y, _ = overlapping(n=1500)
    strengths = [1e-1, 1e-2, 1e-3]
    path = fit_softmax_path(in_memory(x, y), 12, RegConfig(RegKind.l2, 0.0), TIGHT, strengths)
    for strength, fit in zip(strengths, path, strict=True):
        alone = fit_softmax_probe(in_memory(x, y), 12, RegConfig(RegKind.l2, strength), TIGHT)
        assert fit.convergence["converged"]
        assert fit.convergence["objective"] == pytest.approx(
            alone.convergence["objective"], rel=1e-5
        )
    norms = [fit.probe.weight.norm().item() for fit in path]
    assert norms == sorted(norms), "weaker penalties give larger weights"
    assert np.isfinite(norms).all()
