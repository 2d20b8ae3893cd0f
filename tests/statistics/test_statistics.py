"""Statistics: planted signals are found and absent ones are not, intervals cover at their
stated rate, the coordinate-subset null is exact on a small case, and the CLI reports every
statistic with its interval and baselines."""

from __future__ import annotations

import itertools
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from probe_sweep.baselines.control import control_task_labels
from probe_sweep.bases import random_orthogonal
from probe_sweep.intervals import SequenceBootstrap
from probe_sweep.logit_lens import lens_logits
from probe_sweep.statistics.lens import input_token_readout, token_set_projection
from probe_sweep.statistics.nulls import half_samples, null_entry
from probe_sweep.statistics.similarity import (
    permutation_nulls,
    ridge_map_entries,
    similarity_entries,
    weighted_similarities,
)
from probe_sweep.statistics.weight_mass import null_ratios, weight_mass_entries
from probe_sweep.subspaces import COORDINATE, HAAR
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


# --- similarities with baselines ---------------------------------------------------------------


def test_a_probe_like_the_embedding_beats_a_baseline_that_is_not() -> None:
    emb = embedding()
    probe = noisy(emb, 0.5, 1)
    unrelated = noisy(embedding(seed=7), 0.5, 2)  # a baseline probe of other "types"
    found = by_name(
        similarity_entries(probe, emb, 3, {"random_init": (unrelated, emb)}, 200, 100, 0, 0)
    )
    for name, e in found.items():
        assert e["layer"] == 3 and e["n_null"] == 200 and e["p"] == e["p_floor"] == 1 / 201
        assert "z" not in e, "no Gaussian z beyond the draws"
        lo, hi = e["ci"]
        assert lo <= e["observed"] <= hi
        lo, hi = e["baselines"]["random_init"]["difference_ci"]
        better = lo > 0 if name != "probe_embedding_procrustes" else hi < 0
        assert better, (name, e["baselines"])


def test_a_baseline_as_good_as_the_probe_is_not_declared_worse() -> None:
    emb = embedding()
    probe, other = noisy(emb, 0.5, 1), noisy(emb, 0.5, 2)  # same signal, other noise
    for e in similarity_entries(probe, emb, 0, {"random_init": (other, emb)}, 50, 100, 0, 0):
        lo, hi = e["baselines"]["random_init"]["difference_ci"]
        assert lo < 0 < hi, e["name"]


def test_similarities_have_their_invariances_and_a_shuffle_kills_them() -> None:
    emb = embedding()
    rotation = torch.from_numpy(random_orthogonal(D, 3)).float()
    ones = torch.ones(1, C)
    rotated = weighted_similarities(emb @ rotation, emb, ones)
    assert rotated["probe_embedding_cka"].item() == pytest.approx(1.0, abs=1e-6)
    assert rotated["probe_embedding_procrustes"].item() == pytest.approx(0.0, abs=1e-5)
    assert rotated["probe_embedding_cosine"].item() < 0.5  # cosine needs the same axes
    shuffled = emb[torch.randperm(C, generator=torch.Generator().manual_seed(0))]
    null = permutation_nulls(emb, emb, 100, 0)
    same = weighted_similarities(shuffled, emb, ones)
    for name, draws in null.items():
        assert draws.min() <= same[name].item() <= draws.max(), name


def test_half_sample_weights_count_half_the_rows_twice() -> None:
    w = half_samples(10, 5, 0)
    assert ((w == 0) | (w == 2)).all() and (w.sum(1) == 10).all()
    assert not torch.equal(w[0], w[1])


def test_ridge_map_statistics_recognise_the_identity() -> None:
    emb = embedding()
    identity = torch.eye(D) + 0.05 * torch.randn(D, D, generator=torch.Generator().manual_seed(0))
    assert by_name(ridge_map_entries(identity, emb, 1, 200, 0))["ridge_map_identity"]["p"] < 0.01
    scrambled = torch.randn(D, D, generator=torch.Generator().manual_seed(1))
    assert by_name(ridge_map_entries(scrambled, emb, 1, 200, 0))["ridge_map_identity"]["p"] > 0.01


# --- weight mass against the activations --------------------------------------------------------


def covariance(k: int, seed: int) -> torch.Tensor:
    """Activations whose variance falls off along the coordinates (like a real layer)."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(4000, k, generator=gen, dtype=torch.float64) * torch.linspace(2, 0.5, k)
    return torch.cov(x.T)


@pytest.mark.parametrize("kind", [COORDINATE, HAAR])
def test_a_probe_planted_in_the_bottom_half_is_detected_and_a_proportional_one_is_not(
    kind: str,
) -> None:
    k, gen = 16, torch.Generator().manual_seed(0)
    cov = covariance(k, 1)
    # Weights proportional to where the activations vary: ratio 1, nothing to detect.
    proportional = torch.randn(200, k, generator=gen, dtype=torch.float64) * cov.diagonal().sqrt()
    # The same, plus weight planted on the least important half of the coordinates.
    planted = proportional.clone()
    planted[:, k // 2 :] *= 2.5
    for weight, detected in ((planted, True), (proportional, False)):
        ratio = by_name(weight_mass_entries(weight, cov, kind, 0, {}, 400, 100, 0))[
            "weight_to_variance_bottom_half"
        ]
        assert (ratio["p"] < 0.01) is detected, (kind, ratio)
        assert ratio["ci"][0] <= ratio["observed"] <= ratio["ci"][1]
        assert (ratio["ci"][0] > 1) is detected


def test_the_coordinate_half_null_is_exact_on_a_small_case() -> None:
    k, dim = 4, 2
    gen = torch.Generator().manual_seed(0)
    weight = torch.randn(30, k, generator=gen, dtype=torch.float64)
    cov = covariance(k, 2)
    energy, variance = weight.pow(2).sum(0), cov.diagonal()
    exact = sorted(
        float(energy[list(s)].sum() / energy.sum() / (variance[list(s)].sum() / variance.sum()))
        for s in itertools.combinations(range(k), dim)
    )
    draws = null_ratios(weight, cov, dim, COORDINATE, 6000, 0).numpy()
    values, counts = np.unique(draws.round(12), return_counts=True)
    np.testing.assert_allclose(values, np.round(exact, 12))  # exactly the 6 subsets
    assert np.abs(counts / len(draws) - 1 / 6).max() < 0.02  # each drawn uniformly
    observed = exact[4]  # the 5th of 6 values: exact p(greater) = 2/6
    p = null_entry("r", 0, observed, draws, "greater")["p"]
    assert p == pytest.approx(2 / 6, abs=0.02)


# --- intervals over sequences -------------------------------------------------------------------


def test_the_sequence_bootstrap_covers_the_true_mean_at_its_stated_rate() -> None:
    """Tokens within a sequence share a sequence effect: resampling sequences covers the true
    mean about 95% of the time (resampling tokens would be too narrow)."""
    rng = np.random.default_rng(0)
    n_seq, per_seq, truth, covered = 60, 20, 0.7, 0
    trials = 200
    for trial in range(trials):
        p_seq = np.clip(truth + rng.normal(0, 0.15, n_seq), 0, 1)
        correct = rng.random((n_seq, per_seq)) < p_seq[:, None]
        groups = np.repeat(np.arange(n_seq), per_seq)
        lo, hi = SequenceBootstrap(groups, 400, trial).interval(correct.reshape(-1))
        covered += lo <= truth <= hi
    assert 0.88 <= covered / trials <= 0.99


def test_a_difference_of_two_metrics_on_the_same_tokens_is_paired() -> None:
    rng = np.random.default_rng(1)
    groups = np.repeat(np.arange(50), 10)
    a = rng.random(500) < 0.8
    b = a.copy()
    b[:5] = ~b[:5]  # b differs from a on 5 tokens only
    boot = SequenceBootstrap(groups, 500, 0)
    diff = boot.draws(a) - boot.draws(b)
    assert diff.std() < 0.5 * boot.draws(a).std()


# --- controls and lenses ------------------------------------------------------------------------


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
    out, correct = input_token_readout(logits, targets)
    assert out["lens_input_top1"] == 1.0 and out["lens_input_median_rank"] == 1.0
    assert correct.all()
    shifted, wrong = input_token_readout(logits, (targets + 1) % 50)
    assert shifted["lens_input_top1"] < 0.5 and shifted["lens_input_mean_log_rank"] > 0
    assert shifted["lens_input_top1"] == wrong.mean()


def test_probe_minus_lens_is_paired_on_the_lens_positions() -> None:
    """The probe's top-1 minus the lens's is taken on the positions the lens read, with an
    interval over their sequences: a probe right exactly where the lens is gives 0 [0, 0],
    whatever it scores on the positions the lens did not read."""
    from probe_sweep.fitting.probe_set import LensInputs
    from probe_sweep.statistics import StatisticsConfig, logit_lens_readouts

    gen = torch.Generator().manual_seed(0)
    unembedding = torch.from_numpy(random_orthogonal(64, 0)[:50]).float()
    targets = torch.randint(0, 50, (120,), generator=gen)
    hidden = unembedding[targets] + 0.6 * torch.randn(120, 64, generator=gen)
    lens = LensInputs({0: hidden}, targets, np.arange(120) // 6, unembedding, None, None)
    _, lens_correct = input_token_readout(hidden @ unembedding.T, targets)
    assert 0.2 < lens_correct.mean() < 0.9  # the lens is neither always right nor always wrong
    cfg = StatisticsConfig(n_bootstrap=200)
    elsewhere = np.zeros(500, bool)  # the probe's scores past the lens's 120 positions
    same, _ = logit_lens_readouts(lens, {0: np.r_[lens_correct, elsewhere]}, unembedding, cfg, 0)
    assert same[0].probe_minus_lens_top1 == 0 and same[0].probe_minus_lens_top1_ci == [0, 0]
    lo, hi = same[0].lens_input_top1_ci
    assert lo < lens_correct.mean() < hi
    always = np.ones(620, bool)
    better, _ = logit_lens_readouts(lens, {0: always}, unembedding, cfg, 0)
    gain = 1 - lens_correct.mean()
    assert better[0].probe_minus_lens_top1 == pytest.approx(gain)
    lo, hi = better[0].probe_minus_lens_top1_ci
    assert 0 < lo < gain < hi


def test_token_set_projection_sees_planted_unlikely_directions() -> None:
    gen = torch.Generator().manual_seed(0)
    emb = torch.randn(200, 16, generator=gen)
    final_logits = torch.randn(40, 200, generator=gen)
    low = final_logits.topk(5, dim=1, largest=False).indices
    hidden = emb[low].sum(1)  # hidden state built from the unlikely tokens' embeddings
    values, entries = token_set_projection(hidden, emb, final_logits, 5, 2, 300, 0)
    assert values["proj_unlikely"] > 0.3 > abs(values["proj_likely"])
    assert by_name(entries)["unlikely_token_projection"]["p"] < 0.01


# --- through the CLI (model=tiny) -------------------------------------------------------------

ENTRY_KEYS = {"name", "layer", "observed", "ci", "null_mean", "null_range", "p", "p_floor"}


def _metrics(root: Path) -> list[dict]:
    return [json.loads(p.read_text()) for p in sorted(root.rglob("metrics.json"))]


@pytest.mark.e2e
def test_every_basis_reports_statistics_with_intervals_and_baselines(tmp_path: Path) -> None:
    bases = "natural,pca,nmf,frequency,random,dictionary"
    args = ["-m", *TINY, f"basis={bases}", "layers=subset", "layers.indices=[0,2]"]
    args += ["statistics.n_permutations=50", "statistics.n_bootstrap_types=20"]
    args += ["statistics.random_init_baseline=true"]
    proc = run_cli([*args, "basis.max_iter=20", "hydra.sweep.dir=sweep"], cwd=tmp_path)
    jobs = _metrics(tmp_path / "sweep")
    assert sorted(m["probe"]["basis"] for m in jobs) == sorted(bases.split(","))
    assert "Statistics (nulls)" in proc.stdout and "probe_embedding_cka" in proc.stdout
    for m in jobs:
        found = {(e["name"], e["layer"]): e for e in m["statistics"]["entries"]}
        cosine = found[("probe_embedding_cosine", 0)]
        assert ENTRY_KEYS <= set(cosine) and cosine["p"] == cosine["p_floor"]  # no shuffle beats it
        assert "random_init" in cosine["baselines"]
        ratio = found[("weight_to_variance_bottom_half", 0)]
        expected = (
            "coordinate" if m["probe"]["basis"] in ("natural", "nmf", "dictionary") else "haar"
        )
        assert ratio["null"] == f"{expected} subspaces"
        assert {"random_init", "control_task"} <= set(ratio["baselines"])
        row = m["layers"][0]
        for key in ("top1_ci", "selectivity_ci", "random_init_top1", "lens_input_top1"):
            assert key in row, key
        assert row["top1_ci"][0] <= row["top1"] <= row["top1_ci"][1]
        converged = [fit["converged"] for fit in m["fits"].values()]
        if m["probe"]["basis"] in ("natural", "pca", "frequency", "random"):
            assert all(converged), m["probe"]["basis"]
        assert m["probe"]["all_converged"] == all(converged)  # NMF/dictionary may not: said so
    dictionary = next(m for m in jobs if m["probe"]["basis"] == "dictionary")
    assert dictionary["statistics"]["basis"]["size"] == 128


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


@pytest.mark.e2e
def test_control_task_and_probe_on_the_models_own_guess(tmp_path: Path) -> None:
    args = [*TINY, "layers=subset", "layers.indices=[0,2]", "statistics.lens_probe=true"]
    run_cli([*args, "hydra.run.dir=out"], cwd=tmp_path)
    rows = json.loads((tmp_path / "out" / "metrics.json").read_text())["layers"]
    for row in rows:
        assert 0 <= row["control_top1"] <= 1
        assert row["selectivity"] == pytest.approx(row["top1"] - row["control_top1"])
        lo, hi = row["selectivity_ci"]
        assert lo <= row["selectivity"] <= hi
        assert row["hidden_minus_lens_probe_top1"] == pytest.approx(
            row["top1"] - row["lens_probe_top1"]
        )
    # Tied embeddings and random blocks: the layer-0 logit lens is nearly the identity read-out.
    assert rows[0]["lens_probe_top1"] > 0.5


def test_a_baseline_in_its_own_basis_is_read_in_that_basis() -> None:
    """The random-init model's natural basis orders its axes by its own W_E: its probe must be
    mapped back with its own encoder. The same probe in a permuted basis is the same baseline."""
    from probe_sweep.fitting.probe_set import ProbeSet
    from probe_sweep.probes.linear import FitResult, LinearProbe
    from probe_sweep.statistics import JobProbes, StatisticsConfig, job_statistics

    emb = embedding()
    probe = noisy(emb, 0.3, 1)
    order = torch.randperm(D, generator=torch.Generator().manual_seed(3))
    permuted = torch.eye(D)[:, order]  # encoder: coordinates = h @ permuted

    def fit(weight: torch.Tensor) -> FitResult:
        return FitResult(LinearProbe(weight, torch.zeros(C), torch.zeros(D), 1.0))

    cov = {"layer_0": covariance(D, 0)}
    ours = ProbeSet({"layer_0": fit(probe)}, torch.eye(D), emb, cov)
    theirs = ProbeSet({"layer_0": fit(probe @ permuted)}, permuted, emb, cov)
    job = JobProbes(ours, {0: np.ones(10, bool)}, emb, COORDINATE, random_init=theirs)
    cfg = StatisticsConfig(n_permutations=20, n_bootstrap_types=20)
    found = by_name(job_statistics(job, cfg, 0).entries)
    for name in ("probe_embedding_cosine", "probe_embedding_cka"):
        assert found[name]["baselines"]["random_init"]["difference"] == pytest.approx(0, abs=1e-9)
