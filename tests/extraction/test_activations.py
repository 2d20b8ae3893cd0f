"""Activation cache: reuse, key separation, shape checks, and no complete-looking partial entry."""

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

from probe_sweep.cache.entry import CacheDtype, open_store
from probe_sweep.errors import UserError
from probe_sweep.extraction.activations import ActivationsConfig, extract
from probe_sweep.extraction.data import DataConfig, build_corpus
from probe_sweep.extraction.model import hidden_states, load_model, load_tokenizer
from tests.conftest import subprocess_timeout, wait_for_line
from tests.extraction.test_model import TINY

CPU = torch.device("cpu")


def test_cache_holds_the_models_hidden_states(tiny, tmp_path: Path) -> None:
    model, corpus = tiny
    cfg = ActivationsConfig(cache_dir=str(tmp_path), dtype=CacheDtype.float32, batch_size=4)
    store = extract(model, corpus, [0, 1, 2], cfg, CPU)
    assert not store.reused
    states = hidden_states(model, torch.from_numpy(corpus.input_ids[:2]), [0, 2])
    n = int(corpus.content.sum())
    expected = states[1][:, corpus.content].reshape(2 * n, -1).numpy()
    np.testing.assert_allclose(store.layer(2)[: 2 * n], expected, rtol=1e-5, atol=1e-5)


def test_same_key_is_reused_and_other_keys_are_not(tiny, tmp_path: Path) -> None:
    model, corpus = tiny
    cfg = ActivationsConfig(cache_dir=str(tmp_path), batch_size=8)
    first = extract(model, corpus, [0, 2], cfg, CPU)
    again = extract(model, corpus, [0, 2], cfg, CPU)
    assert again.reused and again.path == first.path
    assert np.array_equal(first.layer(2), again.layer(2))
    other_layers = extract(model, corpus, [0, 1], cfg, CPU)
    cfg32 = ActivationsConfig(cache_dir=str(tmp_path), dtype=CacheDtype.float32)
    other_dtype = extract(model, corpus, [0, 2], cfg32, CPU)
    shorter = type(corpus)(corpus.input_ids[:-1], corpus.content, corpus.split[:-1], "shorter")
    other_corpus = extract(model, shorter, [0, 2], cfg, CPU)
    paths = {first.path, other_layers.path, other_dtype.path, other_corpus.path}
    assert len(paths) == 4
    assert not any(s.reused for s in (other_layers, other_dtype, other_corpus))


def test_a_damaged_entry_is_refused(tiny, tmp_path: Path) -> None:
    model, corpus = tiny
    cfg = ActivationsConfig(cache_dir=str(tmp_path))
    store = extract(model, corpus, [1], cfg, CPU)
    np.save(store.path / "layer_1.npy", np.zeros((3, 3), dtype=np.float16))
    meta = json.loads((store.path / "meta.json").read_text())
    with pytest.raises(UserError, match="delete the directory to recompute"):
        open_store(store.path, meta)


KILL_SCRIPT = """
import sys, torch
from probe_sweep.extraction.activations import ActivationsConfig, extract
from probe_sweep.extraction.data import DataConfig, build_corpus
from probe_sweep.extraction.model import load_model, load_tokenizer
from tests.extraction.test_model import TINY
tok = load_tokenizer(TINY)
model = load_model(TINY, len(tok), torch.device("cpu"), seed=0)
corpus = build_corpus(DataConfig(token_budget=60000, seq_len=128), tok, 256, seed=0)
print("extracting", flush=True)
cfg = ActivationsConfig(cache_dir=sys.argv[1], batch_size=1)
extract(model, corpus, [0, 1, 2], cfg, torch.device("cpu"))
"""


@pytest.mark.e2e
def test_killed_extraction_leaves_nothing_that_looks_complete(tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    proc = subprocess.Popen(
        [sys.executable, "-c", KILL_SCRIPT, str(cache)],
        cwd=Path(__file__).resolve().parents[2],
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
    )
    wait_for_line(proc, "extracting")
    deadline = time.time() + subprocess_timeout()
    while not any(cache.glob(".tmp-*/layer_2.npy")) and time.time() < deadline:
        time.sleep(0.05)
    time.sleep(0.5)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    entries = [p for p in cache.iterdir() if not p.name.startswith(".tmp-")]
    assert entries == [], "a killed extraction left an entry under its final name"
    assert list(cache.glob(".tmp-*")), "the test did not kill the job mid-write"

    tokenizer = load_tokenizer(TINY)
    model = load_model(TINY, len(tokenizer), CPU, seed=0)
    corpus = build_corpus(DataConfig(token_budget=60000, seq_len=128), tokenizer, 256, seed=0)
    store = extract(model, corpus, [0, 1, 2], ActivationsConfig(cache_dir=str(cache)), CPU)
    assert not store.reused and store.layer(2).shape == (store.meta["n_rows"], 64)
