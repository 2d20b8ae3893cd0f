"""Data stage: the offline corpus, text files, token budget and the split by sequence."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from probe_sweep.errors import UserError
from probe_sweep.extraction.data import (
    TEST,
    TRAIN,
    VAL,
    CorpusSource,
    DataConfig,
    build_corpus,
    training_corpus,
    unseen_corpus,
)
from probe_sweep.extraction.model import ModelConfig, TrainingConfig, load_tokenizer


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


PROSE = "The quick brown fox jumps over the lazy dog near the café. " * 200


def text_cfg(path: Path, **kwargs) -> DataConfig:
    return DataConfig(
        source=CorpusSource.text_files, paths=[str(path)], token_budget=1000, **kwargs
    )


def test_invalid_utf8_names_the_file_and_the_byte_offset(tokenizer, tmp_path: Path) -> None:
    raw = PROSE.encode()
    bad = tmp_path / "latin.txt"
    bad.write_bytes(raw[:1234] + "é".encode("latin-1") + raw[1234:])
    with pytest.raises(UserError) as info:
        build_corpus(text_cfg(bad), tokenizer, 512, seed=0)
    message = str(info.value)
    assert str(bad) in message and "byte offset 1234" in message and "0xe9" in message
    assert "data.encoding=<codec>" in message
    # The same file read as Latin-1 is fine.
    corpus = build_corpus(text_cfg(bad, encoding="latin-1"), tokenizer, 512, seed=0)
    assert "fox" in tokenizer.decode(corpus.targets[0])


def test_binary_garbage_and_utf16_are_refused(tokenizer, tmp_path: Path) -> None:
    garbage = tmp_path / "garbage.bin"
    garbage.write_bytes(np.random.default_rng(0).integers(0, 256, 20_000, np.uint8).tobytes())
    with pytest.raises(UserError, match=r"garbage.bin is not valid utf-8: byte 0x.. at byte off"):
        build_corpus(text_cfg(garbage), tokenizer, 512, seed=0)
    with_bom = tmp_path / "utf16.txt"
    with_bom.write_bytes(PROSE.encode("utf-16"))
    with pytest.raises(UserError, match="utf16.txt is not valid utf-8: byte 0xff at byte offset 0"):
        build_corpus(text_cfg(with_bom), tokenizer, 512, seed=0)
    no_bom = tmp_path / "utf16le.txt"
    # ASCII text as UTF-16 without a BOM is valid UTF-8 (NULs between letters): caught as NUL.
    no_bom.write_bytes(PROSE.replace("é", "e").encode("utf-16-le"))
    with pytest.raises(UserError, match="utf16le.txt holds a NUL character at byte offset 1"):
        build_corpus(text_cfg(no_bom), tokenizer, 512, seed=0)
    # Read with its real encoding it is text.
    corpus = build_corpus(text_cfg(with_bom, encoding="utf-16"), tokenizer, 512, seed=0)
    assert "fox" in tokenizer.decode(corpus.targets[0])


def test_unknown_encoding(tokenizer, tmp_path: Path) -> None:
    text = tmp_path / "story.txt"
    text.write_text(PROSE)
    with pytest.raises(UserError, match="data.encoding='klingon' is not a codec"):
        build_corpus(text_cfg(text, encoding="klingon"), tokenizer, 512, seed=0)


def test_text_files_config_sets_the_encoding() -> None:
    from omegaconf import OmegaConf

    conf = Path(__file__).resolve().parents[2] / "conf/data/text_files.yaml"
    cfg = OmegaConf.merge(OmegaConf.structured(DataConfig), OmegaConf.load(conf))
    assert OmegaConf.to_object(cfg).encoding == "utf-8"
    assert DataConfig().encoding == "utf-8"


def test_unseen_corpus_holds_only_sequences_the_training_held_out(tokenizer) -> None:
    training = TrainingConfig(corpus="python_docs", token_budget=20_000, seq_len=64, seed=3)
    trained_on = training_corpus(training, tokenizer, 512)
    unseen = unseen_corpus(DataConfig(token_budget=3000, seq_len=64), trained_on, seed=0)
    trained = {row.tobytes() for row in trained_on.input_ids[trained_on.split == TRAIN]}
    held = {row.tobytes() for row in trained_on.input_ids[trained_on.split != TRAIN]}
    rows = [row.tobytes() for row in unseen.input_ids]
    assert len(rows) == 3000 // 62 and all(r in held and r not in trained for r in rows)
    assert set(unseen.split.tolist()) == {TRAIN, VAL, TEST}
    assert "held out from the model's training" in unseen.description
    with pytest.raises(UserError, match="exceeds the .* tokens the model's training held out"):
        unseen_corpus(DataConfig(token_budget=10_000, seq_len=64), trained_on, seed=0)
    with pytest.raises(UserError, match="set data.seq_len=64"):
        unseen_corpus(DataConfig(token_budget=3000, seq_len=128), trained_on, seed=0)
