"""Null statistics: planted cases give large z, shuffled ones z near 0 and roughly uniform p."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from probe_sweep.bases import random_orthogonal
from probe_sweep.statistics import (
    _centre,
    _permutations,
    control_task_labels,
    entry,
    entry_normal,
    input_token_readout,
    lens_logits,
    linear_cka,
    matched_cosine,
    probe_embedding_statistics,
    procrustes_residual,
    random_subspace_moments,
    random_subspace_share,
    ridge_map_statistics,
    token_set_projection,
    weight_mass,
)
from tests.conftest import TINY, run_cli

C, D = 300, 24


def embedding(seed: int = 0) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(C, D, generator=gen) * torch.linspace(2, 0.3, D) + 1.0


def noisy(x: torch.Tensor, level: float, seed: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return x + level * x.std() * torch.randn(x.shape, generator=gen)


def by_name(entries: list[dict]) -> dict[str, dict]:
    return {e["name"]: e for e in entries}


def test_planted_probe_equal_to_embedding_up_to_noise_gives_large_z() -> None:
    emb = embedding()
    found = by_name(probe_embedding_statistics(noisy(emb, 0.5, 1), emb, 3, 1000, 16, 0))
    for name in ("probe_embedding_cosine", "probe_embedding_cka"):
        assert found[name]["z"] > 10 and found[name]["p"] == pytest.approx(1 / 1001)
    assert found["probe_embedding_procrustes"]["z"] < -10
    assert all(e["layer"] == 3 and e["n_null"] == 1000 for e in found.values())
    assert set(found["probe_embedding_cka"]) >= {"observed", "null_mean", "null_std", "z", "p"}


def test_procrustes_and_cka_see_a_rotated_copy_that_the_cosine_misses() -> None:
    emb = embedding()
    rotated = noisy(emb, 0.2, 2) @ torch.from_numpy(random_orthogonal(D, 5)).float()
    found = by_name(probe_embedding_statistics(rotated, emb, None, 1000, D, 0))
    assert abs(found["probe_embedding_cosine"]["z"]) < 10
    assert found["probe_embedding_procrustes"]["z"] < -10
    assert found["probe_embedding_cka"]["z"] > 10


def test_shuffled_probe_has_z_near_zero_and_roughly_uniform_p_over_seeds() -> None:
    emb = embedding()
    p_values, z_values = [], []
    for seed in range(20):
        perm = torch.from_numpy(np.random.default_rng(seed).permutation(C))
        found = by_name(
            probe_embedding_statistics(noisy(emb[perm], 0.5, seed + 99), emb, 0, 200, 8, seed)
        )
        p_values.append(found["probe_embedding_cosine"]["p"])
        z_values.append(found["probe_embedding_cosine"]["z"])
    assert np.abs(z_values).max() < 4.5
    assert 0.3 < np.mean(p_values) < 0.7
    assert np.mean(np.array(p_values) < 0.1) <= 0.3
    assert len({round(p, 3) for p in p_values}) > 10  # not a constant


def test_vectorised_nulls_equal_a_loop_over_the_same_permutations() -> None:
    emb, probe = embedding(), noisy(embedding(), 2.0, 3)
    found = by_name(probe_embedding_statistics(probe, emb, 0, 7, D, 11))
    perms = _permutations(C, 7, 11)
    cos = [matched_cosine(probe, emb[p]) for p in perms]
    cka = [linear_cka(probe, emb[p]) for p in perms]
    res = [procrustes_residual(probe, emb[p]) for p in perms]
    assert found["probe_embedding_cosine"]["null_mean"] == pytest.approx(np.mean(cos), abs=1e-6)
    assert found["probe_embedding_cka"]["null_mean"] == pytest.approx(np.mean(cka), abs=1e-5)
    assert found["probe_embedding_procrustes"]["null_mean"] == pytest.approx(np.mean(res), abs=1e-5)
    assert found["probe_embedding_cka"]["observed"] == pytest.approx(linear_cka(probe, emb), 1e-5)


def test_reproducible_for_a_seed() -> None:
    emb, probe = embedding(), noisy(embedding(), 3.0, 3)
    a = probe_embedding_statistics(probe, emb, 0, 100, 8, 5)
    b = probe_embedding_statistics(probe, emb, 0, 100, 8, 5)
    c = probe_embedding_statistics(probe, emb, 0, 100, 8, 6)
    assert a == b and a != c


def test_similarity_measures_have_their_invariances() -> None:
    a = embedding()
    rot = torch.from_numpy(random_orthogonal(D, 1)).float()
    assert procrustes_residual(a, 3 * a @ rot) == pytest.approx(0, abs=1e-6)
    assert linear_cka(a, 2 * a @ rot) == pytest.approx(1, abs=1e-6)
    assert matched_cosine(a, a + 5.0) == pytest.approx(1, abs=1e-6)  # rows centred first
    assert _centre(a).mean(0).abs().max() < 1e-9


def test_weight_mass_and_its_random_basis_null() -> None:
    gen = torch.Generator().manual_seed(0)
    top_heavy = torch.randn(50, D, generator=gen) * torch.cat([torch.ones(12), torch.zeros(12)])
    mass = weight_mass(top_heavy)
    assert mass["bottom_half_share"] == pytest.approx(0, abs=1e-12)
    assert mass["cumulative"][-1] == pytest.approx(1) and len(mass["share"]) == D
    null = random_subspace_share(top_heavy, 12, 500, 0)
    assert null.mean().item() == pytest.approx(0.5, abs=0.02)
    e = entry("weight_mass_bottom_half", 0, mass["bottom_half_share"], null, "greater")
    assert e["z"] < -5 and e["p"] == 1.0
    isotropic = torch.randn(2000, D, generator=gen)
    assert random_subspace_share(isotropic, 6, 200, 1).mean().item() == pytest.approx(0.25, 0.05)


def test_ridge_map_statistics_recognise_the_identity() -> None:
    emb = embedding()
    identity = torch.eye(D) + 0.05 * torch.randn(D, D, generator=torch.Generator().manual_seed(0))
    found = by_name(ridge_map_statistics(identity, emb, 1, 1000, 0))
    assert found["ridge_map_identity"]["z"] > 10
    scrambled = torch.randn(D, D, generator=torch.Generator().manual_seed(1))
    assert (
        abs(by_name(ridge_map_statistics(scrambled, emb, 1, 1000, 0))["ridge_map_identity"]["z"])
        < 4
    )


def test_control_task_labels_are_a_fixed_seeded_map() -> None:
    a = control_task_labels(1000, 7, 0)
    assert np.array_equal(a, control_task_labels(1000, 7, 0))
    assert not np.array_equal(a, control_task_labels(1000, 7, 1))
    assert a.min() == 0 and a.max() == 6 and len(np.unique(a)) == 7


def test_logit_lens_readout_ranks_and_norm() -> None:
    gen = torch.Generator().manual_seed(0)
    unembedding = torch.from_numpy(random_orthogonal(64, 0)[:50]).float()  # orthonormal rows
    targets = torch.arange(10)
    hidden = 10 * unembedding[targets] + 0.1 * torch.randn(10, 64, generator=gen)
    norm = torch.nn.LayerNorm(64)
    logits = lens_logits(hidden, unembedding, norm, apply_norm=False)
    torch.testing.assert_close(logits, hidden @ unembedding.T)
    normed = lens_logits(hidden, unembedding, norm, apply_norm=True)
    torch.testing.assert_close(normed, norm(hidden) @ unembedding.T)
    out = input_token_readout(logits, targets)
    assert out["lens_input_top1"] == 1.0 and out["lens_input_median_rank"] == 1.0
    shifted = input_token_readout(logits, (targets + 1) % 50)
    assert shifted["lens_input_top1"] < 0.5 and shifted["lens_input_mean_log_rank"] > 0


def test_token_set_projection_sees_planted_unlikely_directions() -> None:
    gen = torch.Generator().manual_seed(0)
    emb = torch.randn(200, 16, generator=gen)
    final_logits = torch.randn(40, 200, generator=gen)
    low = final_logits.topk(5, dim=1, largest=False).indices
    hidden = emb[low].sum(1)  # hidden state built from the unlikely tokens' embeddings
    values, entries = token_set_projection(hidden, emb, final_logits, 5, 2, 300, 0)
    assert values["proj_unlikely"] > 0.3 > abs(values["proj_likely"])
    found = by_name(entries)
    assert found["unlikely_token_projection"]["z"] > 5
    assert abs(found["likely_token_projection"]["z"]) < found["unlikely_token_projection"]["z"]


# --- through the CLI (model=tiny) -------------------------------------------------------------

STAT_KEYS = {"name", "layer", "observed", "null_mean", "null_std", "z", "p"}


def _metrics(root: Path) -> list[dict]:
    return [json.loads(p.read_text()) for p in sorted(root.rglob("metrics.json"))]


@pytest.mark.e2e
def test_every_basis_runs_and_reports_statistics_with_nulls(tmp_path: Path) -> None:
    bases = "natural,pca,nmf,frequency,random,dictionary"
    args = ["-m", *TINY, f"basis={bases}", "layers=subset", "layers.indices=[0,2]"]
    proc = run_cli([*args, "basis.max_iter=20", "hydra.sweep.dir=sweep"], cwd=tmp_path)
    jobs = _metrics(tmp_path / "sweep")
    assert sorted(m["probe"]["basis"] for m in jobs) == sorted(bases.split(","))
    assert "Statistics (nulls)" in proc.stdout and "probe_embedding_cka" in proc.stdout
    for m in jobs:
        entries = m["statistics"]["entries"]
        names = {e["name"] for e in entries}
        assert {"weight_mass_bottom_half", "probe_embedding_cosine"} <= names
        assert all(STAT_KEYS <= set(e) for e in entries)
        assert all(e["n_null"] >= 1000 for e in entries if e["name"] != "weight_mass_bottom_half")
        layer0 = [e for e in entries if e["name"] == "probe_embedding_cosine" and e["layer"] == 0]
        assert layer0[0]["z"] > 3, m["probe"]["basis"]  # the layer-0 probe resembles W_E
        row = m["layers"][0]
        assert {"weight_mass_bottom_half", "lens_input_top1", "proj_unlikely"} <= set(row)
        assert len(m["statistics"]["logit_lens"]) == 2
    dictionary = next(m for m in jobs if m["probe"]["basis"] == "dictionary")
    assert dictionary["statistics"]["basis"]["size"] == 128
    assert 0 < dictionary["statistics"]["basis"]["reconstruction_error"] < 1


@pytest.mark.e2e
def test_top_k_truncation_and_same_seed_same_numbers(tmp_path: Path) -> None:
    args = [*TINY, "basis=pca", "basis.top_k=8", "layers=subset", "layers.indices=[0]"]
    run_cli([*args, "hydra.run.dir=a"], cwd=tmp_path)
    run_cli([*args, "hydra.run.dir=b"], cwd=tmp_path)
    a, b = (json.loads((tmp_path / d / "metrics.json").read_text()) for d in "ab")
    assert a["probe"]["basis"] == "pca_top8"
    assert len(a["statistics"]["weight_mass"]["layer_0"]["share"]) == 8
    assert a["statistics"]["entries"] == b["statistics"]["entries"]
    assert a["layers"][0]["top1"] == b["layers"][0]["top1"]


def test_closed_form_random_subspace_null_matches_monte_carlo() -> None:
    gen = torch.Generator().manual_seed(0)
    for d, k in [(10, 4), (24, 12), (7, 2)]:
        w = torch.randn(50, d, generator=gen) * torch.linspace(3, 0.1, d)
        mean, std = random_subspace_moments(w, k)
        draws = random_subspace_share(w, k, 4000, 1)
        assert mean == pytest.approx(draws.mean().item(), abs=0.005)
        assert std == pytest.approx(draws.std().item(), rel=0.06)
    assert random_subspace_moments(torch.ones(5, 6) @ torch.eye(6), 3)[1] > 0


def test_closed_form_entry_p_values_point_the_right_way() -> None:
    high = entry_normal("x", 0, 0.8, 0.5, 0.1, "greater")
    low = entry_normal("x", 0, 0.2, 0.5, 0.1, "greater")
    assert high["z"] == pytest.approx(3) and high["p"] == pytest.approx(0.00135, abs=1e-4)
    assert low["p"] > 0.99
    assert entry_normal("x", 0, 0.2, 0.5, 0.1, "less")["p"] == pytest.approx(0.00135, abs=1e-4)
    assert entry_normal("x", 0, 0.2, 0.5, 0.1, "two-sided")["p"] == pytest.approx(0.0027, abs=2e-4)


@pytest.mark.e2e
def test_control_task_and_probe_on_the_models_own_guess(tmp_path: Path) -> None:
    args = [
        *TINY,
        "layers=subset",
        "layers.indices=[0,2]",
        "statistics.control_task=true",
        "statistics.lens_probe=true",
        "hydra.run.dir=out",
    ]
    run_cli(args, cwd=tmp_path)
    rows = json.loads((tmp_path / "out" / "metrics.json").read_text())["layers"]
    for row in rows:
        assert 0 <= row["control_top1"] <= 1
        assert row["selectivity"] == pytest.approx(row["top1"] - row["control_top1"])
        assert row["hidden_minus_lens_probe_top1"] == pytest.approx(
            row["top1"] - row["lens_probe_top1"]
        )
    # Tied embeddings and random blocks: the layer-0 logit lens is nearly the identity read-out.
    assert rows[0]["lens_probe_top1"] > 0.5
