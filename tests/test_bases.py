"""Property tests for every basis: each fails on a wrong implementation."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from probe_sweep.bases import (
    BasisConfig,
    build_basis,
    check_basis_config,
    mod_dictionary,
    nmf_factors,
    random_orthogonal,
)
from probe_sweep.errors import UserError
from probe_sweep.probes.linear import (
    ProbeConfig,
    RegConfig,
    RegKind,
    fit_ridge_probe,
    fit_softmax_probe,
    score_probe,
)
from tests.memory_rows import in_memory

V, D = 400, 16


def anisotropic(seed: int = 0, v: int = V, d: int = D) -> torch.Tensor:
    """Rows with a known, strongly decaying spectrum along a random rotation, plus a mean."""
    rng = np.random.default_rng(seed)
    scales = 2.0 ** -np.arange(d)
    rot = random_orthogonal(d, seed + 100)
    x = rng.standard_normal((v, d)) * scales @ rot.T + rng.standard_normal(d)
    return torch.from_numpy(x).float()


def counts(seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 20, V)


def build(kind: str, emb: torch.Tensor | None = None, **kw):
    emb = anisotropic() if emb is None else emb
    cfg = BasisConfig(kind=kind, **kw)
    return build_basis(cfg, emb, counts(), seed=0)


@pytest.mark.parametrize("kind", ["natural", "pca", "frequency", "random"])
def test_orthonormal_bases_are_orthonormal_and_complete(kind: str) -> None:
    basis = build(kind)
    d = basis.directions.double()
    assert basis.orthonormal and d.shape == (D, D)
    torch.testing.assert_close(d.T @ d, torch.eye(D, dtype=torch.float64), atol=1e-5, rtol=0)
    torch.testing.assert_close(basis.encoder, basis.directions)
    h = torch.randn(5, D)
    torch.testing.assert_close(basis.coordinates(h) @ basis.directions.T, h, atol=1e-4, rtol=0)


def test_natural_basis_is_the_coordinate_axes_ordered_by_variance() -> None:
    emb = anisotropic()
    basis = build("natural", emb)
    d = basis.directions
    assert torch.equal(d.abs().sum(0), torch.ones(D)) and set(d.unique().tolist()) == {0.0, 1.0}
    variances = emb.var(0, unbiased=False)[d.argmax(0)]
    torch.testing.assert_close(basis.importance, variances, rtol=1e-4, atol=1e-7)
    assert (basis.importance[:-1] >= basis.importance[1:]).all()


def test_pca_orders_components_by_explained_variance() -> None:
    emb = anisotropic()
    basis = build("pca", emb)
    imp = basis.importance
    assert (imp[:-1] >= imp[1:]).all()
    along = ((emb - emb.mean(0)) @ basis.directions).var(0, unbiased=False)
    torch.testing.assert_close(along, imp, rtol=1e-3, atol=1e-7)
    # The planted spectrum halves at each step; the top direction is the planted top axis.
    top_axis = torch.from_numpy(random_orthogonal(D, 100)[:, 0]).float()
    assert abs(float(basis.directions[:, 0] @ top_axis)) > 0.99
    assert imp[0] / imp[1] > 3  # planted ratio is 4 in variance


def test_frequency_basis_follows_the_tokens_that_occur() -> None:
    rng = np.random.default_rng(1)
    emb = torch.from_numpy(rng.standard_normal((V, D))).float()
    frequent = np.arange(50)
    emb[frequent, 3] *= 10  # frequent tokens spread along axis 3, the rest along axis 7
    emb[50:, 7] *= 10
    tokens = np.zeros(V)
    tokens[frequent] = 100
    tokens[200] = 1
    freq = build_basis(BasisConfig(kind="frequency"), emb, tokens, seed=0)
    pca = build_basis(BasisConfig(kind="pca"), emb, tokens, seed=0)
    assert abs(float(freq.directions[3, 0])) > 0.99
    assert abs(float(pca.directions[7, 0])) > 0.99
    with pytest.raises(UserError, match="token counts"):
        build_basis(BasisConfig(kind="frequency"), emb, None, seed=0)


def test_random_basis_is_seeded() -> None:
    emb = anisotropic()
    a = build_basis(BasisConfig(kind="random"), emb, None, seed=3).directions
    b = build_basis(BasisConfig(kind="random"), emb, None, seed=3).directions
    c = build_basis(BasisConfig(kind="random"), emb, None, seed=4).directions
    assert torch.equal(a, b) and not torch.allclose(a, c)


def _token_task(seed: int = 0) -> tuple[torch.Tensor, ...]:
    gen = torch.Generator().manual_seed(seed)
    centres = torch.randn(20, D, generator=gen) * 2
    y = torch.randint(0, 20, (1200,), generator=gen)
    x = centres[y] + torch.randn(1200, D, generator=gen) * 1.5
    return x[:800], y[:800], x[800:1000], y[800:1000], x[1000:], y[1000:], centres


def test_l2_free_probe_accuracy_is_invariant_under_a_random_rotation() -> None:
    x_tr, y_tr, x_va, y_va, x_te, y_te, centres = _token_task()
    rot = build("random").directions
    reg = RegConfig(kind=RegKind.none, strength=0.0)
    frequent = torch.zeros(len(y_te), dtype=torch.bool)
    plain = score_probe(
        fit_ridge_probe(in_memory(x_tr, y_tr), centres, reg).probe, in_memory(x_te, y_te), frequent
    )
    rotated = score_probe(
        fit_ridge_probe(in_memory(x_tr @ rot, y_tr), centres, reg).probe,
        in_memory(x_te @ rot, y_te),
        frequent,
    )
    assert plain["top1"] == pytest.approx(rotated["top1"], abs=1e-9)
    assert plain["nll"] == pytest.approx(rotated["nll"], rel=1e-3)
    assert 0.3 < plain["top1"] < 1.0  # a task where accuracy could move
    # The softmax probe at its optimum is equivariant under l2 too (see test_solver). These
    # classes are separable, so without a penalty the optimum would lie at infinity.
    l2 = RegConfig(kind=RegKind.l2, strength=1e-3)
    fits = [
        fit_softmax_probe(in_memory(xt, y_tr), 20, l2, ProbeConfig()) for xt in (x_tr, x_tr @ rot)
    ]
    assert all(fit.convergence["converged"] for fit in fits)
    soft = [
        score_probe(f.probe, in_memory(xs, y_te), frequent)["top1"]
        for f, xs in zip(fits, (x_te, x_te @ rot), strict=True)
    ]
    assert soft[0] == pytest.approx(soft[1], abs=1 / len(y_te))


def test_nmf_factors_are_non_negative_and_reconstruct_a_planted_factorisation() -> None:
    rng = np.random.default_rng(0)
    a = rng.random((300, 6))
    h = rng.random((6, D)) * (rng.random((6, D)) < 0.5)
    emb = a @ h  # non-negative rank 6: the split is [emb, 0], exactly factorable
    loadings, atoms = nmf_factors(emb, 6, 500, 0)
    assert (loadings >= 0).all()
    err = np.linalg.norm(emb - loadings @ atoms.T) / np.linalg.norm(emb)
    assert err < 0.05, err
    # A signed matrix: the split [max(x,0), max(-x,0)] is non-negative; error reported, < 1.
    basis = build("nmf", n_components=D, max_iter=200)
    assert not basis.orthonormal and 0 < basis.info["reconstruction_error"] < 0.9
    # Least-squares coordinates reconstruct hidden states exactly when the atoms span R^d.
    h_states = torch.randn(7, D)
    torch.testing.assert_close(
        basis.coordinates(h_states) @ basis.directions.T, h_states, atol=1e-3, rtol=0
    )
    assert (basis.importance[:-1] >= basis.importance[1:]).all()


def test_dictionary_is_overcomplete_unit_norm_and_recovers_a_sparse_code() -> None:
    rng = np.random.default_rng(0)
    true_atoms = rng.standard_normal((D, 2 * D))
    true_atoms /= np.linalg.norm(true_atoms, axis=0)
    codes = np.zeros((800, 2 * D))
    for row in codes:
        row[rng.choice(2 * D, 2, replace=False)] = rng.standard_normal(2) + 2
    x = codes @ true_atoms.T
    atoms, learned = mod_dictionary(x, 2 * D, 2, 30, 0)
    err = np.linalg.norm(x - learned @ atoms.T) / np.linalg.norm(x)
    random_atoms = rng.standard_normal((D, 2 * D))
    random_atoms /= np.linalg.norm(random_atoms, axis=0)
    _, random_codes = mod_dictionary(x, 2 * D, 2, 0, 0)  # no learning: initial atoms only
    err_before = np.linalg.norm(x - random_codes @ random_atoms.T) / np.linalg.norm(x)
    assert err < 0.5 * err_before and err < 0.35, (err, err_before)
    basis = build("dictionary", n_nonzero=4, max_iter=10)
    assert basis.directions.shape == (D, 2 * D) and not basis.orthonormal
    torch.testing.assert_close(basis.directions.norm(dim=0), torch.ones(2 * D), atol=1e-5, rtol=0)
    assert (basis.importance[:-1] >= basis.importance[1:]).all()
    h_states = torch.randn(7, D)
    torch.testing.assert_close(
        basis.coordinates(h_states) @ basis.directions.T, h_states, atol=1e-2, rtol=0
    )
    assert 0 <= basis.info["reconstruction_error"] < 1


@pytest.mark.parametrize("kind", ["natural", "pca", "frequency", "random", "nmf"])
def test_top_k_and_bottom_k_split_the_full_basis(kind: str) -> None:
    kw = {"max_iter": 50} if kind == "nmf" else {}
    full = build(kind, **kw)
    top = build(kind, top_k=5, **kw)
    bottom = build(kind, bottom_k=D - 5, **kw)
    assert top.name == f"{kind}_top5" and bottom.name == f"{kind}_bottom{D - 5}"
    torch.testing.assert_close(top.directions, full.directions[:, :5])
    torch.testing.assert_close(bottom.directions, full.directions[:, 5:])
    torch.testing.assert_close(torch.cat([top.importance, bottom.importance]), full.importance)
    if full.orthonormal:
        h = torch.randn(6, D)
        both = torch.cat([top.coordinates(h), bottom.coordinates(h)], 1)
        torch.testing.assert_close(both, full.coordinates(h), atol=1e-5, rtol=0)
        # the two halves are orthogonal complements
        assert top.directions.T.mm(bottom.directions).abs().max() < 1e-5
    else:  # least squares on a subset of atoms: the projection onto their span
        h = torch.randn(6, D)
        proj = top.coordinates(h) @ top.directions.T
        residual = h - proj
        assert (residual @ top.directions).abs().max() < 1e-3


def test_bad_truncation_is_refused_before_any_work() -> None:
    with pytest.raises(UserError, match="at most one"):
        check_basis_config(BasisConfig(top_k=2, bottom_k=2), D)
    with pytest.raises(UserError, match=r"basis.top_k=17 must lie in 1..16"):
        check_basis_config(BasisConfig(top_k=17), D)
    with pytest.raises(UserError, match="over-complete"):
        check_basis_config(BasisConfig(kind="dictionary", n_components=D), D)
    check_basis_config(BasisConfig(kind="dictionary", bottom_k=2 * D), D)
