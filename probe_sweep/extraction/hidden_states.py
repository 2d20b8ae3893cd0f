"""The first stages of a job: load the model, read the corpus, and cache the model's hidden
states at the chosen layers (or reuse a verified cache entry); ``labels.py`` then labels and
splits the corpus.

    model.py -> data.py -> activations.py  =>  ``Activations``
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass
from typing import Any

import torch

from probe_sweep.cache.entry import ActivationStore
from probe_sweep.config import Config
from probe_sweep.errors import UserError
from probe_sweep.extraction.activations import extract
from probe_sweep.extraction.data import Corpus, build_corpus, training_corpus, unseen_corpus
from probe_sweep.extraction.layers import resolve_layers
from probe_sweep.extraction.model import (
    ModelConfig,
    ModelInfo,
    inspect_model,
    load_model,
    load_tokenizer,
)

log = logging.getLogger("probe_sweep")


def pick_device(name: str) -> torch.device:
    """``auto``: the GPU when one is visible, else the CPU."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise UserError(f"device={name} but no CUDA device is visible; use device=auto or cpu")
    return torch.device(name)


@dataclass
class Activations:
    """What the later stages need from the model, once its hidden states are cached."""

    info: ModelInfo
    corpus: Corpus
    store: ActivationStore
    layers: list[int]
    embedding: torch.Tensor  # W_E (V x d), float32, CPU
    unembedding: torch.Tensor | None
    final_norm: torch.nn.Module | None

    @property
    def final_layer(self) -> int | None:
        """The last block's output, if extracted: HF has already applied the final norm."""
        return self.info.n_layers if self.info.n_layers in self.layers else None


def describe_model(cfg: ModelConfig) -> ModelInfo:
    """The model's shape from its config and tokenizer, without loading its weights."""
    return inspect_model(cfg, len(load_tokenizer(cfg)))


def probe_corpus(config: Config, tokenizer: Any, max_positions: int) -> Corpus:
    """The job's corpus: ``data`` as configured, or with ``data.unseen_by_model`` only the
    sequences the model's own training held out (``to_typed`` checked that it has one)."""
    training = config.model.training
    if config.data.unseen_by_model and training is not None:
        trained_on = training_corpus(training, tokenizer, max_positions)
        return unseen_corpus(config.data, trained_on, config.seed)
    return build_corpus(config.data, tokenizer, max_positions, config.seed)


def cache_activations(
    config: Config,
    device: torch.device,
    init_seed: int | None = None,
    corpus: Corpus | None = None,
) -> Activations:
    """Check the model, layers, corpus and target, then load the model and cache its hidden
    states (or reuse them). ``init_seed``: the seed of random weights (default: the job's
    seed). ``corpus``: the job's corpus when another model of the job has built it."""
    tokenizer = load_tokenizer(config.model)
    info = inspect_model(config.model, len(tokenizer))
    warn_if_mislabelled(config.model.name, config.model.path)
    layers = resolve_layers(config.layers, info.n_layers)
    if corpus is None:
        corpus = probe_corpus(config, tokenizer, info.max_positions)
    n_content = corpus.targets.shape[1]
    if abs(config.target.offset) >= n_content:
        raise UserError(
            f"target.offset={config.target.offset} leaves no position with a target in "
            f"sequences of {n_content} tokens; use |offset| < {n_content} or raise data.seq_len"
        )
    log.info(
        "Model %s (%d layers, d=%d) on %s; corpus %s",
        *(info.name, info.n_layers, info.d_model, device, corpus.description),
    )
    seed = config.seed if init_seed is None else init_seed
    model = load_model(config.model, len(tokenizer), device, seed)
    store = extract(model, corpus, layers, config.activations, device)
    embedding = model.embedding.float().cpu()
    return Activations(info, corpus, store, layers, embedding, model.unembedding, model.final_norm)


def warn_if_mislabelled(name: str, path: str | None) -> None:
    """``model.name`` is only a label: say so loudly when it does not match the weights' path
    (``model.name=gpt2`` alone still loads the default model)."""

    def norm(text: str) -> str:
        return re.sub(r"[^a-z0-9]", "", text.lower())

    if path is not None and norm(name) not in norm(path):
        log.warning(
            "model.name=%s is only the label of these results; the weights come from "
            "model.path=%s. To load another model choose model=<option> or set model.path",
            name,
            path,
        )
