"""Data stage: the offline corpus, text files, token budget and the split by sequence."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from probe_sweep.data import TEST, TRAIN, VAL, CorpusSource, DataConfig, build_corpus
from probe_sweep.errors import UserError
from probe_sweep.model import ModelConfig, load_tokenizer


@pytest.fixture(scope="module")
def tokenizer():
    return load_tokenizer(ModelConfig())


def test_python_docs_corpus_is_deterministic_prose(tokenizer) -> None:
    cfg = DataConfig(token_budget=3000, seq_len=64)
    a = build_corpus(cfg, tokenizer, 512, seed=0)
    b = build_corpus(cfg, tokenizer, 512, seed=0)
    assert np.array_equal(a.input_ids, b.input_ids) and np.array_equal(a.split, b.split)
    assert a.fingerprint() == b.fingerprint()
    words = tokenizer.decode(a.targets[0])
    assert sum(w.isalpha() for w in words.split()) > 20


def test_special_tokens_wrap_each_sequence_and_are_not_targets(tokenizer) -> None:
    corpus = build_corpus(DataConfig(token_budget=3000, seq_len=64), tokenizer, 512, seed=0)
    assert corpus.input_ids.shape[1] == 64
    assert (corpus.input_ids[:, 0] == tokenizer.cls_token_id).all()
    assert (corpus.input_ids[:, -1] == tokenizer.sep_token_id).all()
    assert corpus.targets.shape[1] == 62
    assert tokenizer.cls_token_id not in corpus.targets


def test_split_is_by_sequence_disjoint_and_complete(tokenizer) -> None:
    corpus = build_corpus(DataConfig(token_budget=6200, seq_len=64), tokenizer, 512, seed=1)
    parts = [corpus.rows(p) for p in (TRAIN, VAL, TEST)]
    all_rows = np.concatenate(parts)
    assert len(all_rows) == corpus.targets.size == len(np.unique(all_rows))
    n_content = corpus.targets.shape[1]
    for part in parts:
        # Whole sequences only: every row's sequence is entirely in the part.
        seqs, counts = np.unique(part // n_content, return_counts=True)
        assert (counts == n_content).all()
    assert len(parts[TEST]) > 0 and len(parts[VAL]) > 0
    other_seed = build_corpus(DataConfig(token_budget=6200, seq_len=64), tokenizer, 512, seed=2)
    assert not np.array_equal(corpus.split, other_seed.split)


def test_text_files(tokenizer, tmp_path: Path) -> None:
    text = tmp_path / "story.txt"
    text.write_text("The quick brown fox jumps over the lazy dog. " * 200)
    cfg = DataConfig(source=CorpusSource.text_files, paths=[str(text)], token_budget=1000)
    corpus = build_corpus(cfg, tokenizer, 512, seed=0)
    assert "fox" in tokenizer.decode(corpus.targets[0])


def test_missing_text_file(tokenizer, tmp_path: Path) -> None:
    cfg = DataConfig(source=CorpusSource.text_files, paths=[str(tmp_path / "nope.txt")])
    with pytest.raises(UserError, match="no such file .*nope.txt"):
        build_corpus(cfg, tokenizer, 512, seed=0)


def test_corpus_smaller_than_budget(tokenizer, tmp_path: Path) -> None:
    text = tmp_path / "short.txt"
    text.write_text("Only a few words here.")
    cfg = DataConfig(source=CorpusSource.text_files, paths=[str(text)], token_budget=5000)
    with pytest.raises(UserError, match="fewer than data.token_budget=5000"):
        build_corpus(cfg, tokenizer, 512, seed=0)


def test_sequence_longer_than_model_maximum(tokenizer) -> None:
    with pytest.raises(UserError, match="data.seq_len=1024 exceeds the model's maximum of 512"):
        build_corpus(DataConfig(seq_len=1024), tokenizer, 512, seed=0)
