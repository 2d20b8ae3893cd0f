"""The softmax probe reaches the optimum of its stated objective, and its certificate holds:
checked against float64 references (scikit-learn and our own solver run far tighter) on an
ill-conditioned problem, under rotations of the inputs, with classes no row carries, for l1 and
without a penalty, streamed or in memory."""

from __future__ import annotations

import logging
import math
import re

import numpy as np
import pytest
import torch
from sklearn.linear_model import LogisticRegression

from probe_sweep.probes import softmax_problem, solver
from probe_sweep.probes.linear import (
    ProbeConfig,
    RegConfig,
    RegKind,
    RidgePath,
    fit_softmax_probe,
    standardisation,
)
from tests.memory_rows import in_memory

DEFAULT = ProbeConfig()  # tol 1e-6: the relative gap every job's fit is certified to
REFERENCE = ProbeConfig(tol=1e-12, max_iter=200)  # float64 rows


def overlapping(n: int = 3000, n_classes: int = 12, d: int = 10, seed: int = 0):
    """Classes that overlap (noise 1.5), off-centre inputs with unequal coordinate scales: a
    problem with a finite, well-defined optimum even without a penalty."""
    g = torch.Generator().manual_seed(seed)
    centres = torch.randn(n_classes, d, generator=g)
    y = torch.randint(0, n_classes, (n,), generator=g)
    x = centres[y] + 1.5 * torch.randn(n, d, generator=g)
    return x * torch.linspace(0.5, 3.0, d) + 2.0, y, centres


def ill_conditioned(n: int = 4000, n_classes: int = 60, d: int = 24, seed: int = 1):
    """Zipf-distributed classes (several seen once or twice), well separated, inputs whose
    scales span 300x: at a small strength the optimum has large weights in low-variance
    directions, where a gradient-based stopping rule leaves them unsettled."""
    g = torch.Generator().manual_seed(seed)
    weights = 1.0 / torch.arange(1, n_classes + 1).double() ** 1.3
    y = torch.multinomial(weights, n, replacement=True, generator=g)
    y[:n_classes] = torch.arange(n_classes)  # every class at least once
    centres = 3 * torch.randn(n_classes, d, generator=g)
    x = centres[y] + torch.randn(n, d, generator=g)
    return x * torch.logspace(-1.5, 1, d), y


def objective64(probe, x: torch.Tensor, y: torch.Tensor, reg: RegConfig) -> float:
    """Mean cross-entropy + penalty in float64, computed here from the probe alone."""
    probe = probe.double()
    loss = torch.nn.functional.cross_entropy(probe(x.double()), y).item()
    w = probe.weight.detach()
    penalty = {RegKind.l2: w.pow(2).sum(), RegKind.l1: w.abs().sum(), RegKind.none: 0.0}
    return loss + reg.strength * float(penalty[reg.kind])


def scikit_learn_optimum(x: torch.Tensor, y: torch.Tensor, strength: float, probe) -> float:
    """scikit-learn's lbfgs on the same standardised inputs and objective, in float64 at a
    tight tolerance: it minimises C * sum(CE) + ||W||^2 / 2, ours when C = 1 / (2 strength n)."""
    xs = ((x.double() - probe.mean.double()) / probe.scale.double()).numpy()
    model = LogisticRegression(C=1 / (2 * strength * len(x)), tol=1e-12, max_iter=100_000)
    model.fit(xs, y.numpy())
    logits = torch.from_numpy(xs @ model.coef_.T + model.intercept_)
    loss = torch.nn.functional.cross_entropy(logits, y).item()
    return loss + strength * float((model.coef_**2).sum())


@pytest.mark.parametrize("strength", [1e-5, 1e-3])
def test_the_certified_gap_holds_against_float64_references(strength: float) -> None:
    x, y = ill_conditioned()
    reg = RegConfig(RegKind.l2, strength)
    fit = fit_softmax_probe(in_memory(x, y), 60, reg, DEFAULT)
    conv = fit.convergence
    assert conv["certified"] and conv["gap_rel"] <= DEFAULT.tol
    tight = fit_softmax_probe(in_memory(x.double(), y), 60, reg, REFERENCE)
    assert tight.convergence["certified"]
    best = min(
        objective64(tight.probe, x, y, reg),
        scikit_learn_optimum(x, y, strength, fit.probe),
    )
    ours = objective64(fit.probe, x, y, reg)
    assert ours == pytest.approx(conv["objective"], rel=1e-6)  # the record tells the truth
    assert ours - best <= conv["gap_bound"] + 1e-12 * abs(best)  # the bound holds
    assert (ours - best) / abs(best) <= DEFAULT.tol


def test_the_bound_holds_far_from_the_optimum_too() -> None:
    x, y = ill_conditioned()
    reg = RegConfig(RegKind.l2, 1e-4)
    reference = objective64(
        fit_softmax_probe(in_memory(x.double(), y), 60, reg, REFERENCE).probe, x, y, reg
    )
    for iterations in (1, 3, 6):
        early = fit_softmax_probe(in_memory(x, y), 60, reg, ProbeConfig(max_iter=iterations))
        gap = objective64(early.probe, x, y, reg) - reference
        assert 0 <= gap <= early.convergence["gap_bound"] * (1 + 1e-6) + 1e-12
        assert early.convergence["certified"] == (early.convergence["gap_rel"] <= DEFAULT.tol)


def rotations(d: int) -> dict[str, torch.Tensor]:
    x, y = ill_conditioned()
    centred = x.double() - x.double().mean(0)
    _, vectors = torch.linalg.eigh(centred.T @ centred)
    q, r = torch.linalg.qr(torch.randn(d, d, generator=torch.Generator().manual_seed(3)).double())
    return {"pca": vectors.flip(1), "random": q * torch.sign(torch.diagonal(r))}


@pytest.mark.parametrize("basis", ["pca", "random"])
def test_a_probe_in_an_orthonormal_basis_is_the_natural_probe_rotated(basis: str) -> None:
    x, y = ill_conditioned()
    strength = 1e-4
    reg = RegConfig(RegKind.l2, strength)
    rotation = rotations(x.shape[1])[basis].float()
    natural = fit_softmax_probe(in_memory(x, y), 60, reg, DEFAULT)
    rotated = fit_softmax_probe(in_memory(x @ rotation, y), 60, reg, DEFAULT)
    a, b = natural.convergence, rotated.convergence
    assert a["certified"] and b["certified"]
    assert abs(a["objective"] - b["objective"]) <= DEFAULT.tol * abs(a["objective"]) * 2
    # Strong convexity in W: f - f* >= strength ||W - W*||^2, so each certified fit lies
    # within sqrt(gap / strength) of the optimum, and the two within the sum.
    limit = math.sqrt(a["gap_bound"] / strength) + math.sqrt(b["gap_bound"] / strength)
    w, wq = natural.probe.weight.detach().double(), rotated.probe.weight.detach().double()
    assert (wq - w @ rotation.double()).norm().item() <= limit * 1.01 + 1e-5
    assert limit <= 0.05 * w.norm().item()  # and the bound is not vacuous


def test_classes_no_row_carries_are_pooled_out_exactly() -> None:
    x, y, _ = overlapping()
    reg = RegConfig(RegKind.l2, 1e-3)
    seen = fit_softmax_probe(in_memory(x, y), 12, reg, DEFAULT)
    # 12 labelled classes among 40: classes 3, 7, ... carry no row
    spread = torch.arange(12) * 3 + 1
    vocab = fit_softmax_probe(in_memory(x, spread[y]), 40, reg, DEFAULT)
    assert vocab.convergence["absent_classes"] == 28
    assert vocab.convergence["objective"] == pytest.approx(seen.convergence["objective"], rel=1e-6)
    absent = torch.ones(40, dtype=torch.bool)
    absent[spread] = False
    assert (vocab.probe.weight[absent] == 0).all() and torch.isneginf(
        vocab.probe.bias[absent]
    ).all()
    assert (vocab.probe(x).argmax(1) == spread[seen.probe(x).argmax(1)]).all()


def test_the_l1_probe_is_certified_and_meets_the_subgradient_conditions() -> None:
    x, y, _ = overlapping()
    strength = 2e-3
    cfg = ProbeConfig(tol=1e-5, max_iter=20_000)
    fit = fit_softmax_probe(in_memory(x, y), 12, RegConfig(RegKind.l1, strength), cfg)
    conv = fit.convergence
    assert conv["solver"] == "fista" and conv["certified"] and conv["gap_rel"] <= cfg.tol
    weight = fit.probe.weight.detach().double().requires_grad_()
    bias = fit.probe.bias.detach().double().requires_grad_()
    xs = ((x - fit.probe.mean) / fit.probe.scale).double()
    torch.nn.functional.cross_entropy(xs @ weight.T + bias, y).backward()
    g, w = weight.grad, weight.detach()
    nonzero = w != 0
    assert 0.05 < nonzero.float().mean().item() < 0.95, "the penalty must zero some weights"
    assert g[~nonzero].abs().max().item() <= strength * 1.05
    assert (g[nonzero] + strength * w[nonzero].sign()).abs().max().item() <= 0.05 * strength


def test_without_a_penalty_the_fit_says_it_is_uncertified() -> None:
    x, y, _ = overlapping()
    fit = fit_softmax_probe(in_memory(x, y), 12, RegConfig(RegKind.none, 0.0), DEFAULT)
    conv = fit.convergence
    assert conv["gap_bound"] is None and not conv["certified"]
    assert conv["converged"] and conv["gap_rel"] <= DEFAULT.tol  # the Newton decrement
    tight = fit_softmax_probe(in_memory(x.double(), y), 12, RegConfig(RegKind.none, 0.0), REFERENCE)
    reg = RegConfig(RegKind.none, 0.0)
    assert objective64(fit.probe, x, y, reg) == pytest.approx(
        objective64(tight.probe, x, y, reg), rel=1e-5
    )


def test_chunks_give_the_same_fit_as_one_chunk() -> None:
    x, y, _ = overlapping()
    x = x.double()  # float64: the fits differ only by the order of the sums
    mean, scale = standardisation(in_memory(x, y))
    fits = []
    for chunk in (len(x), 257):
        problem = softmax_problem.SoftmaxProblem(in_memory(x, y), 12, mean, scale, 1e-3, 0.0, chunk)
        (weight, _), conv, _ = solver.minimise(problem, None, 1e-10, 100)
        assert conv["certified"]
        fits.append(weight)
    assert ((fits[0] - fits[1]).norm() / fits[0].norm()).item() < 1e-6


def test_streamed_rows_with_recomputed_hessian_probabilities_reach_the_certified_optimum() -> None:
    x, y, _ = overlapping()
    mean, scale = standardisation(in_memory(x, y))
    strength, fits = 1e-3, []
    for memory_mb in (4096, 0):  # 0: rows streamed each pass, one chunk of 12 kept for H v
        problem = softmax_problem.SoftmaxProblem(
            in_memory(x, y), 12, mean, scale, strength, 0.0, 257, memory_mb
        )
        assert (problem.held is None) == (memory_mb == 0)
        (weight, _), conv, _ = solver.minimise(problem, None, 1e-6, 200)
        assert conv["certified"]
        fits.append((weight, conv["gap_bound"], conv["iterations"]))
    (a, gap_a, iterations_a), (b, gap_b, iterations_b) = fits
    limit = math.sqrt(gap_a / strength) + math.sqrt(gap_b / strength)
    assert (a - b).norm().item() <= limit * 1.01
    assert iterations_a == iterations_b  # the same exact Newton steps, up to float32 sums


def test_a_streamed_fit_reports_the_objective_of_the_probe_it_returns() -> None:
    """Off-centre float32 rows: streamed rows standardised in float64 once the passes turn
    float64 (and not in float32, as the class sums were) shifted the reported objective, and
    so the certificate, by about 1e-5 of it."""
    x, y, _ = overlapping()
    x = x * 0.01 + 40.0
    reg = RegConfig(RegKind.l2, 1e-4)
    fit = fit_softmax_probe(in_memory(x, y), 12, reg, ProbeConfig(memory_mb=0))
    reported = fit.convergence["objective"]
    assert fit.convergence["certified"]
    assert reported == pytest.approx(objective64(fit.probe, x, y, reg), rel=1e-8)


def test_a_pass_keeps_its_hessian_probabilities_in_one_block_within_half_the_budget() -> None:
    x, y, _ = overlapping(n=30_000)
    mean, scale = standardisation(in_memory(x, y))
    chunk, budget_mb = 257, 1
    problem = softmax_problem.SoftmaxProblem(
        in_memory(x, y), 12, mean, scale, 1e-3, 0.0, chunk, budget_mb
    )
    g = torch.Generator().manual_seed(0)
    weight = torch.randn(12, 10, generator=g, dtype=torch.float64)
    bias = torch.randn(12, generator=g, dtype=torch.float64)
    kept = problem.evaluate((weight, bias)).probs
    assert kept is not None and kept.is_contiguous()
    assert 0 < problem.kept_rows < len(y) and kept.shape == (problem.kept_rows, 12)
    assert kept.numel() * kept.element_size() <= budget_mb * 2**20 // 2
    # the kept chunks' probabilities, in chunk order
    starts = [i * chunk for i in sorted(problem.kept_chunks)]
    rows = torch.cat([torch.arange(start, min(start + chunk, len(y))) for start in starts])
    logits = ((x - mean) / scale) @ weight.float().T + bias.float()
    torch.testing.assert_close(kept, logits.softmax(1)[rows], rtol=1e-4, atol=1e-6)


def test_the_hessian_product_is_exact_whatever_the_memory() -> None:
    """A rare class defeats a subsampled Hessian: here class 11's rows all lie in chunk 1,
    which a 1 MiB budget does not keep. The product must still match autograd's over every
    row."""
    x, y, _ = overlapping(n=30_000)
    x, chunk = x.double(), 257
    y = torch.where(y == 11, 10, y)
    y[chunk : 2 * chunk : 5] = 11
    rows = in_memory(x, y)
    mean, scale = standardisation(rows)
    strength = 1e-3
    g = torch.Generator().manual_seed(1)
    weight, v_w = torch.randn(2, 12, 10, generator=g, dtype=torch.float64)
    bias, v_b = torch.randn(2, 12, generator=g, dtype=torch.float64)
    xs = (x - mean) / scale

    def objective(w: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        ce = torch.nn.functional.cross_entropy(xs @ w.T + b, y)
        return ce + strength * w.pow(2).sum()

    expected = torch.autograd.functional.hvp(objective, (weight, bias), (v_w, v_b))[1]
    problem = softmax_problem.SoftmaxProblem(rows, 12, mean, scale, strength, 0.0, chunk, 1)
    assert problem.held is None and 1 not in problem.kept_chunks
    product = problem.hessian_product(problem.evaluate((weight, bias)), (v_w, v_b))
    for got, want in zip(product, expected, strict=True):
        torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-12)


def test_recomputed_hessian_probabilities_are_reported_with_the_memory_that_keeps_them(
    caplog: pytest.LogCaptureFixture,
) -> None:
    x, y, _ = overlapping(n=30_000)
    rows = in_memory(x, y)
    mean, scale = standardisation(rows)
    logger = "probe_sweep.probes.softmax_problem"
    with caplog.at_level(logging.INFO, logger=logger):
        softmax_problem.SoftmaxProblem(rows, 12, mean, scale, 1e-3, 0.0, 257, 1)
    (message,) = [r.getMessage() for r in caplog.records]
    found = re.search(r"probe\.memory_mb=(\d+) keeps every row's", message)
    assert found, message
    caplog.clear()
    with caplog.at_level(logging.INFO, logger=logger):
        whole = softmax_problem.SoftmaxProblem(
            rows, 12, mean, scale, 1e-3, 0.0, 257, int(found.group(1))
        )
    assert whole.kept_rows == len(y) and not caplog.records


def test_chunk_size_follows_the_memory_budget() -> None:
    assert softmax_problem.chunk_rows(64, d=384, n_classes=2000) == 64 * 2**20 // (4 * 4384)
    assert softmax_problem.chunk_rows(1, d=1600, n_classes=50257) == 64  # never below 64 rows


@pytest.mark.parametrize("overshoot", [5.0, 20.0])
def test_a_step_that_raises_the_objective_is_tried_shorter_in_a_few_passes(
    overshoot: float,
) -> None:
    """A Newton step stretched until it raises the objective: ``backtrack`` finds a point
    along it that lowers it within three passes; along an ascent direction it finds none."""
    x, y, _ = overlapping()
    mean, scale = standardisation(in_memory(x, y))
    problem = softmax_problem.SoftmaxProblem(in_memory(x, y), 12, mean, scale, 1e-3, 0.0, 257)
    start = problem.start()
    at = problem.evaluate(start)
    newton, _ = solver.conjugate_gradient(problem, at, 0.0, 1e-3, 200)
    for sign, lowers in ((1.0, True), (-1.0, False)):
        step = (sign * overshoot * newton[0], sign * overshoot * newton[1])
        end = problem.evaluate((start[0] + step[0], start[1] + step[1])).value
        assert end > at.value
        passes = problem.passes
        found = solver.backtrack(problem, start, at, step, end)
        assert (found is not None) == lowers
        assert problem.passes - passes <= 3
        if found is not None:
            point, there = found
            assert there.value < at.value
            fraction = ((point[1] - start[1]).norm() / step[1].norm()).item()
            assert 0 < fraction <= 0.5


def test_a_warm_start_is_used_only_where_it_beats_the_input_blind_start() -> None:
    x, y, centres = overlapping()
    reg = RegConfig(RegKind.l2, 1e-3)
    cold = fit_softmax_probe(in_memory(x, y), 12, reg, DEFAULT)
    near = fit_softmax_probe(in_memory(x, y), 12, RegConfig(RegKind.l2, 2e-3), DEFAULT).probe
    warm = fit_softmax_probe(in_memory(x, y), 12, reg, DEFAULT, init=near)
    assert warm.convergence["init"] == "warm" and warm.convergence["certified"]
    assert warm.convergence["passes"] < cold.convergence["passes"]
    assert warm.convergence["objective"] == pytest.approx(cold.convergence["objective"], rel=2e-6)
    # A start worse than the input-blind one (the ridge probe's Gaussian logits) is not used.
    ridge = RidgePath(in_memory(x, y), centres).fit(reg.strength).probe
    assert fit_softmax_probe(in_memory(x, y), 12, reg, DEFAULT, init=ridge).convergence["init"] == (
        "zero"
    )


def test_the_history_records_every_iteration_with_its_gap() -> None:
    x, y, _ = overlapping()
    fit = fit_softmax_probe(in_memory(x, y), 12, RegConfig(RegKind.l2, 1e-3), DEFAULT)
    history = fit.history
    assert [h["iteration"] for h in history] == list(range(len(history)))
    assert np.isfinite([h["objective"] for h in history]).all()
    assert history[-1]["gap_rel"] <= DEFAULT.tol
