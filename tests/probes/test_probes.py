"""Probes: planted linear tasks they must solve, ridge against scikit-learn, honest scoring."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from sklearn.linear_model import Ridge

from probe_sweep.errors import UserError
from probe_sweep.extraction.labels import class_index, frequent_types
from probe_sweep.extraction.layers import LayerMode, LayersConfig, resolve_layers
from probe_sweep.fitting.identity import pooled_assignment
from probe_sweep.probes.linear import (
    ProbeConfig,
    RegConfig,
    RegKind,
    fit_ridge_probe,
    fit_softmax_probe,
    score_probe,
)
from tests.memory_rows import in_memory


def planted(n: int, n_classes: int = 20, d: int = 16, noise: float = 0.3, seed: int = 0):
    """Hidden states = class embedding + noise: linearly decodable by construction."""
    g = torch.Generator().manual_seed(seed)
    embeddings = torch.randn(n_classes, d, generator=g)
    y = torch.randint(0, n_classes, (n,), generator=g)
    x = embeddings[y] + noise * torch.randn(n, d, generator=g)
    return x, y, embeddings


def test_softmax_probe_learns_a_planted_task() -> None:
    x, y, _ = planted(4000)
    fit = fit_softmax_probe(in_memory(x[:3000], y[:3000]), 20, RegConfig(), ProbeConfig())
    assert fit.convergence["certified"] and fit.convergence["solver"] == "newton_cg"
    scores = score_probe(
        fit.probe, in_memory(x[3500:], y[3500:]), torch.ones(500, dtype=torch.bool)
    )
    assert scores["top1"] > 0.97 and scores["top5"] >= scores["top1"]


def test_softmax_probe_is_reproducible() -> None:
    x, y, _ = planted(2000)
    a, b = (fit_softmax_probe(in_memory(x, y), 20, RegConfig(), ProbeConfig()) for _ in range(2))
    assert torch.equal(a.probe.weight, b.probe.weight)


def test_stronger_l2_shrinks_the_weights() -> None:
    x, y, _ = planted(2000)
    weak = fit_softmax_probe(in_memory(x, y), 20, RegConfig(RegKind.l2, 1e-4), ProbeConfig())
    strong = fit_softmax_probe(in_memory(x, y), 20, RegConfig(RegKind.l2, 0.1), ProbeConfig())
    assert strong.probe.weight.norm() < 0.5 * weak.probe.weight.norm()


def test_a_fit_that_runs_out_of_iterations_says_so() -> None:
    x, y, _ = planted(2000)
    fit = fit_softmax_probe(
        in_memory(x, y), 20, RegConfig(RegKind.l2, 1e-4), ProbeConfig(max_iter=2)
    )
    assert not fit.convergence["converged"]
    assert fit.convergence["gap_rel"] > fit.convergence["tol"] and not fit.convergence["certified"]


def test_ridge_map_matches_scikit_learn() -> None:
    x, y, embeddings = planted(3000, d=12)
    strength = 0.05
    fit = fit_ridge_probe(in_memory(x, y), embeddings, RegConfig(RegKind.l2, strength))
    xs = (x - fit.probe.mean) / fit.probe.scale
    # Our objective is the per-token mean; scikit-learn's is the sum.
    reference = Ridge(alpha=strength * len(x)).fit(xs.numpy(), embeddings[y].numpy())
    np.testing.assert_allclose(fit.map_weight.numpy(), reference.coef_, rtol=1e-3, atol=1e-4)
    scores = score_probe(fit.probe, in_memory(x, y), torch.ones(len(x), dtype=torch.bool))
    assert scores["top1"] > 0.97


def test_ridge_refuses_l1() -> None:
    x, y, embeddings = planted(100)
    with pytest.raises(UserError, match="reg=l2 or reg=none"):
        fit_ridge_probe(in_memory(x, y), embeddings, RegConfig(RegKind.l1, 0.1))


def test_unseen_types_count_as_errors_not_dropped() -> None:
    classes = np.array([5, 7, 9])
    lookup = class_index(classes, vocab_size=12)
    y = torch.from_numpy(lookup[np.array([5, 7, 11, 9])])
    assert y.tolist() == [0, 1, -1, 2]
    probe_weight = torch.eye(3)
    from probe_sweep.probes.linear import LinearProbe

    probe = LinearProbe(probe_weight * 10, torch.zeros(3), torch.zeros(3), 1.0)
    x = torch.eye(3)[[0, 1, 0, 2]]
    scores = score_probe(probe, in_memory(x, y), torch.tensor([True, True, False, False]))
    assert scores["top1"] == 0.75 and scores["n_unseen"] == 1
    assert scores["top1_frequent"] == 1.0 and scores["top1_rare"] == 0.5


def test_frequent_types_cover_half_the_tokens() -> None:
    tokens = np.array([1] * 50 + [2] * 30 + [3] * 10 + [4] * 10)
    assert frequent_types(tokens).tolist() == [1]
    assert sorted(frequent_types(tokens, mass=0.8).tolist()) == [1, 2]


def test_layer_selection_and_pooled_shares() -> None:
    assert resolve_layers(LayersConfig(), 6) == list(range(7))
    assert resolve_layers(LayersConfig(LayerMode.subset, [3, 0, 3]), 6) == [0, 3]
    with pytest.raises(UserError, match=r"layers.indices \[9\] out of range.*0..6"):
        resolve_layers(LayersConfig(LayerMode.subset, [0, 9]), 6)
    assignment = pooled_assignment(700, list(range(7)), seed=0)
    assert np.bincount(assignment).tolist() == [100] * 7
    assert np.array_equal(assignment, pooled_assignment(700, list(range(7)), seed=0))


def test_pooled_layers_follow_the_indices_and_each_refuses_them() -> None:
    assert resolve_layers(LayersConfig(LayerMode.pooled, [2, 0]), 6) == [0, 2]
    assert resolve_layers(LayersConfig(LayerMode.pooled), 2) == [0, 1, 2]
    with pytest.raises(UserError, match="only read by layers=subset and layers=pooled"):
        resolve_layers(LayersConfig(LayerMode.each, [1]), 6)
