"""The decoder trained here: its baselines, its batches, its checkpoint, and (end to end) a
minutes-sized version trained, interrupted, resumed, and probed as any saved model."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import transformers
from safetensors.torch import load_file, save_file

from probe_sweep.errors import UserError
from probe_sweep.extraction.model import TrainingConfig
from probe_sweep.training.decoder import (
    _optimizer,
    batch_sequences,
    learning_rate,
    load_checkpoint,
    save_checkpoint,
)
from probe_sweep.training.ngram import Pairs, fit_ngrams
from tests.conftest import run_cli, subprocess_timeout

# A minutes-sized sotu-gpt2: one block of width 32, on the Python docs (200 steps of 4 sequences
# end below the unigram's test perplexity: 294 against 315).
SMALL_DECODER = [
    "model=sotu-gpt2",
    "model.architecture.n_layer=1",
    "model.architecture.n_embd=32",
    "model.architecture.n_head=2",
    "model.architecture.n_positions=64",
    "model.training.corpus=python_docs",
    "model.training.token_budget=20000",
    "model.training.seq_len=64",
    "model.training.steps=200",
    "model.training.batch_size=4",
    "model.training.lr=1e-2",
    "model.training.warmup_steps=10",
    "model.training.checkpoint_every=20",
]


def test_bigram_and_unigram_are_distributions() -> None:
    rng = np.random.default_rng(0)
    vocab = 7
    train = Pairs(rng.integers(0, 5, 200), rng.integers(0, 5, 200))  # tokens 5, 6 never seen
    models = fit_ngrams(train, Pairs(rng.integers(0, 5, 50), rng.integers(0, 5, 50)), vocab)
    every = np.arange(vocab)
    for context in (0, 3, 6):  # seen contexts and one never seen
        pairs = Pairs(np.full(vocab, context), every)
        assert np.exp(-models.bigram_nll(pairs)).sum() == pytest.approx(1.0, abs=1e-12)
    assert np.exp(-models.unigram_nll(Pairs(every, every))).sum() == pytest.approx(1.0)


def test_bigram_is_witten_bell_by_hand() -> None:
    # After token 0 came 1, 1, 2: c(0) = 3, T(0) = 2.
    train = Pairs(np.array([0, 0, 0, 1]), np.array([1, 1, 2, 0]))
    models = fit_ngrams(train, Pairs(np.array([0]), np.array([1])), 3)
    unigram = (np.bincount(train.nxt, minlength=3) + models.alpha) / (4 + 3 * models.alpha)
    expected = (2 + 2 * unigram[1]) / (3 + 2)
    got = np.exp(-models.bigram_nll(Pairs(np.array([0]), np.array([1]))))[0]
    assert got == pytest.approx(expected)


def test_batches_read_each_epoch_once_in_a_seeded_order() -> None:
    n, batch = 10, 4
    seen = np.concatenate([batch_sequences(n, batch, step, seed=3) for step in range(5)])
    assert sorted(seen[:10]) == list(range(10)) and sorted(seen[10:20]) == list(range(10))
    again = np.concatenate([batch_sequences(n, batch, step, seed=3) for step in range(5)])
    other = np.concatenate([batch_sequences(n, batch, step, seed=4) for step in range(5)])
    assert (seen == again).all() and (seen != other).any()


def test_learning_rate_warms_up_then_decays_to_a_tenth() -> None:
    cfg = TrainingConfig(steps=100, warmup_steps=10, lr=1.0)
    rates = [learning_rate(cfg, s) for s in range(100)]
    assert rates[0] == pytest.approx(0.1) and rates[9] == pytest.approx(1.0)
    assert all(a >= b for a, b in zip(rates[9:], rates[10:], strict=False))
    assert learning_rate(cfg, 100) == pytest.approx(0.1)


def _small_model() -> torch.nn.Module:
    config = transformers.GPT2Config(n_layer=1, n_embd=8, n_head=2, n_positions=8, vocab_size=20)
    torch.manual_seed(0)
    return transformers.GPT2LMHeadModel(config)


def test_checkpoint_restores_weights_and_moments_and_refuses_anything_else(tmp_path: Path) -> None:
    cfg = TrainingConfig(steps=10)
    model = _small_model()
    optimizer = _optimizer(model, cfg)
    model(input_ids=torch.arange(8)[None], labels=torch.arange(8)[None]).loss.backward()
    optimizer.step()
    path = tmp_path / "m.checkpoint.safetensors"
    save_checkpoint(path, model, optimizer, 3, "setup-a")

    fresh = _small_model()
    with torch.no_grad():
        next(fresh.parameters()).add_(1.0)
    fresh_optimizer = _optimizer(fresh, cfg)
    assert load_checkpoint(path, fresh, fresh_optimizer, "setup-a", 10) == 3
    for (_, a), (_, b) in zip(model.named_parameters(), fresh.named_parameters(), strict=True):
        assert torch.equal(a, b)
    moments = optimizer.state_dict()["state"]
    for i, state in fresh_optimizer.state_dict()["state"].items():
        assert torch.equal(state["exp_avg_sq"], moments[i]["exp_avg_sq"])
        assert float(state["step"]) == 3

    with pytest.raises(UserError, match="another model.architecture"):
        load_checkpoint(path, _small_model(), _optimizer(_small_model(), cfg), "setup-b", 10)
    with pytest.raises(UserError, match="past|does not hold"):
        load_checkpoint(path, _small_model(), _optimizer(_small_model(), cfg), "setup-a", 2)
    tensors = load_file(path)
    tensors["param/extra"] = torch.zeros(1)
    save_file(tensors, path, {"step": "3", "setup": "setup-a"})
    with pytest.raises(UserError, match="does not hold this model's state"):
        load_checkpoint(path, _small_model(), _optimizer(_small_model(), cfg), "setup-a", 10)
    path.write_bytes(b"\x80\x04not safetensors")
    with pytest.raises(UserError, match="not readable"):
        load_checkpoint(path, _small_model(), _optimizer(_small_model(), cfg), "setup-a", 10)


def _train(models: Path, args: list[str] = SMALL_DECODER) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "probe_sweep.training", *args],
        env={**os.environ, "PROBE_SWEEP_MODELS": str(models)},
        capture_output=True,
        text=True,
        timeout=subprocess_timeout(),
    )


@pytest.mark.e2e
def test_trained_decoder_resumes_exactly_beats_unigram_and_loads_as_a_model(
    tmp_path: Path,
) -> None:
    probe = [*SMALL_DECODER, "data.token_budget=4000", "data.seq_len=64", "tracker.mode=disabled"]
    untrained = run_cli(
        probe, cwd=tmp_path, env={"PROBE_SWEEP_MODELS": str(tmp_path / "none")}, check=False
    )
    assert untrained.returncode == 2, untrained.stderr[-3000:]
    assert "is not trained yet" in untrained.stdout + untrained.stderr
    straight = _train(tmp_path / "a")
    assert straight.returncode == 0, straight.stderr[-3000:]

    # Ctrl-C after a checkpoint, then the same command: it resumes and ends where "a" did.
    log = tmp_path / "b.log"
    with log.open("w") as err:
        proc = subprocess.Popen(
            [sys.executable, "-m", "probe_sweep.training", *SMALL_DECODER],
            env={**os.environ, "PROBE_SWEEP_MODELS": str(tmp_path / "b")},
            stderr=err,
            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
        )
        checkpoint = tmp_path / "b" / "sotu-gpt2.checkpoint.safetensors"
        deadline = time.monotonic() + subprocess_timeout()
        while not checkpoint.exists() and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.05)
        proc.send_signal(signal.SIGINT)
        proc.wait(timeout=subprocess_timeout())
    assert proc.returncode == -signal.SIGINT, log.read_text()[-3000:]
    assert "Interrupted at step" in log.read_text() and checkpoint.exists()
    resumed = _train(tmp_path / "b")
    assert resumed.returncode == 0 and "Resuming sotu-gpt2 from step" in resumed.stderr
    assert not checkpoint.exists()
    weights_a = load_file(tmp_path / "a" / "sotu-gpt2" / "model.safetensors")
    weights_b = load_file(tmp_path / "b" / "sotu-gpt2" / "model.safetensors")
    assert weights_a.keys() == weights_b.keys()
    for name, tensor in weights_a.items():
        torch.testing.assert_close(weights_b[name], tensor, rtol=0, atol=1e-6)

    record = json.loads((tmp_path / "a" / "sotu-gpt2" / "training.json").read_text())
    perplexity = record["perplexity"]  # 2k test tokens: intervals overlap at this size
    assert perplexity["decoder"]["value"] < perplexity["unigram"]["value"], perplexity

    # Probed only on the sequences its training held out: 64 of its 322, 3,968 tokens.
    unseen = [*SMALL_DECODER, "data.token_budget=3000", "data.seq_len=64", "tracker.mode=disabled"]
    unseen += ["data.unseen_by_model=true", "statistics.random_init_baseline=false"]
    probed = run_cli(
        [*unseen, "hydra.run.dir=out"],
        cwd=tmp_path,
        env={"PROBE_SWEEP_MODELS": str(tmp_path / "a")},
    )
    assert "48 sequences x 62 tokens, held out from the model's training" in probed.stdout
    metrics = json.loads((tmp_path / "out" / "metrics.json").read_text())
    assert metrics["counts"]["n_sequences"] == 48
    assert metrics["model"]["name"] == "sotu-gpt2" and metrics["model"]["n_layers"] == 1
    assert metrics["model"]["path"].endswith("a/sotu-gpt2")
    assert [row["layer"] for row in metrics["layers"]] == [0, 1]
