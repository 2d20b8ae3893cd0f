"""Target offset: the probe at a position reads out the token ``offset`` positions away."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from probe_sweep.extraction.data import TEST, TRAIN, VAL, Corpus
from probe_sweep.extraction.labels import split_labels
from probe_sweep.probes.linear import (
    ClassSet,
    ProbeConfig,
    RegConfig,
    fit_softmax_probe,
    score_probe,
)
from probe_sweep.report.offsets import offset_sections
from tests.job_dirs import sample_metrics
from tests.memory_rows import in_memory

CPU = torch.device("cpu")
VOCAB, D = 40, 32


def copy_task(n_seq: int = 80, n: int = 24, seed: int = 0) -> tuple[Corpus, torch.Tensor]:
    """Random tokens, and hidden states that hold the previous token by construction: the
    state at a position is the embedding of the token before it plus noise (the first
    position of each sequence holds noise only)."""
    rng = np.random.default_rng(seed)
    ids = rng.integers(0, VOCAB, size=(n_seq, n))
    split = np.full(n_seq, TRAIN, dtype=np.int8)
    split[-20:-10], split[-10:] = VAL, TEST
    corpus = Corpus(ids, np.ones(n, dtype=bool), split, "planted copy task")
    embedding = torch.from_numpy(rng.normal(size=(VOCAB, D))).float()
    previous = np.roll(ids, 1, axis=1)
    hidden = embedding[torch.from_numpy(previous)]
    hidden[:, 0] = 0.0
    hidden += 0.3 * torch.from_numpy(rng.normal(size=hidden.shape)).float()
    return corpus, hidden.reshape(n_seq * n, D)


def held_out_top1(offset: int) -> tuple[float, int]:
    corpus, hidden = copy_task()
    split = split_labels(corpus, ClassSet.seen, VOCAB, CPU, offset)
    rows = {p: in_memory(hidden[split.rows[p]], split.labels[p]) for p in (TRAIN, TEST)}
    fit = fit_softmax_probe(rows[TRAIN], len(split.classes), RegConfig(), ProbeConfig())
    assert fit.convergence["converged"]
    return score_probe(fit.probe, rows[TEST], split.frequent[TEST])["top1"], split.n_outside


def test_the_planted_previous_token_is_read_at_offset_minus_one_only() -> None:
    top1, outside = held_out_top1(-1)
    assert top1 > 0.95
    assert outside == 80  # the first position of each sequence has no previous token
    top1_far, outside_far = held_out_top1(-3)
    assert top1_far < 0.15  # chance is 1/40; the state says nothing of the token 3 back
    assert outside_far == 3 * 80
    top1_here, _ = held_out_top1(0)
    assert top1_here < 0.15


@pytest.mark.parametrize("offset", [-2, 0, 1, 3])
def test_each_row_is_labelled_with_the_token_offset_positions_on(offset: int) -> None:
    corpus, _ = copy_task(n_seq=30, n=8)
    split = split_labels(corpus, ClassSet.vocab, VOCAB, CPU, offset)
    grid = corpus.targets
    for part in (TRAIN, VAL, TEST):
        seq, pos = np.divmod(split.rows[part], grid.shape[1])
        assert ((pos + offset >= 0) & (pos + offset < grid.shape[1])).all()
        want = grid[seq, pos + offset]
        assert (split.labels[part].numpy() == want).all()
    assert split.n_outside == 30 * abs(offset)


def test_the_sweep_report_maps_top1_by_layer_and_offset(tmp_path: Path) -> None:
    jobs = []
    for offset, top1 in ((-1, 0.30), (0, 0.90), (1, 0.05)):
        metrics = sample_metrics(statistics=False)
        metrics["probe"]["target_offset"] = offset
        for row in metrics["layers"]:
            row["top1"], row["top1_ci"] = top1 + row["layer"] / 100, [top1 - 0.01, top1 + 0.01]
            if row["layer"] > 0:
                row["top1_minus_first_layer"] = row["layer"] / 100
                row["top1_minus_first_layer_ci"] = [0.0, row["layer"] / 50]
        jobs.append(([f"target.offset={offset}", "basis=pca"], metrics))
    other = sample_metrics(statistics=False)  # another basis, one offset: no map of its own
    jobs.append((["target.offset=0", "basis=natural"], other))
    lines = offset_sections(jobs, tmp_path)
    assert (tmp_path / "report_offset_map_0.png").stat().st_size > 0
    assert not (tmp_path / "report_offset_map_1.png").exists()
    table, change = [line for line in lines if line.startswith("| 1 |")]
    assert table == "| 1 | 0.310 [0.290, 0.310] | 0.910 [0.890, 0.910] | 0.060 [0.040, 0.060] |"
    assert "| layer | offset -1 | offset +0 | offset +1 |" in lines
    assert change == "| 1 | 0.010 [0.000, 0.020] | 0.010 [0.000, 0.020] | 0.010 [0.000, 0.020] |"
    assert "| layer minus layer 0 | offset -1 | offset +0 | offset +1 |" in lines
