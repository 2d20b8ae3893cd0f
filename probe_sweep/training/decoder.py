"""Train a small GPT-2-style decoder on an offline corpus: a trained decoder to probe where no
trained decoder's weights can be downloaded. ``python -m probe_sweep.training model=sotu-gpt2``.

Seeded and resumable. The weights start from ``seed`` and the batches are a function of
``(seed, step)``, so a run resumed from its checkpoint goes on as the uninterrupted run would.
The checkpoint (weights, AdamW moments, step) is one safetensors file beside ``model.path``,
written atomically every ``checkpoint_every`` steps and on Ctrl-C, and read back only after its
tensors and setup are checked (never unpickled). The finished model is saved at ``model.path``
with ``save_pretrained``, with its tokenizer and ``training.json`` (held-out perplexity beside
the unigram and bigram baselines), under a temporary name renamed when complete.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import shutil
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
import transformers
from safetensors import SafetensorError, safe_open

from probe_sweep.errors import UserError
from probe_sweep.extraction.data import TEST, TRAIN, VAL, Corpus, training_corpus
from probe_sweep.extraction.model import (
    ModelConfig,
    TrainingConfig,
    load_tokenizer,
    model_config,
    resolve_location,
)
from probe_sweep.files import write_json, write_tensors
from probe_sweep.intervals import SequenceBootstrap, interval
from probe_sweep.progress import duration
from probe_sweep.training.ngram import Pairs, fit_ngrams

log = logging.getLogger(__name__)

RECORD = "training.json"
EVAL_BATCH = 32
VAL_SEQUENCES = 64  # the validation NLL logged at each checkpoint
N_BOOTSTRAP = 1000


class Interrupted(Exception):
    """Ctrl-C during training; the checkpoint of ``step`` is saved at ``checkpoint``."""

    def __init__(self, step: int, checkpoint: Path) -> None:
        super().__init__(f"Interrupted at step {step}; checkpoint {checkpoint}")
        self.step, self.checkpoint = step, checkpoint


def checkpoint_path(target: Path) -> Path:
    return target.with_name(target.name + ".checkpoint.safetensors")


def batch_sequences(n_train: int, batch_size: int, step: int, seed: int) -> np.ndarray:
    """The training sequences of ``step``: epochs are seeded permutations, read in order."""
    positions = np.arange(step * batch_size, (step + 1) * batch_size)
    epochs = positions // n_train
    out = np.empty(batch_size, dtype=np.int64)
    for epoch in np.unique(epochs):
        order = np.random.default_rng([seed, int(epoch)]).permutation(n_train)
        at = epochs == epoch
        out[at] = order[positions[at] % n_train]
    return out


def learning_rate(training: TrainingConfig, step: int) -> float:
    """Linear warm-up, then a cosine down to a tenth of ``lr`` at the last step."""
    if step < training.warmup_steps:
        return training.lr * (step + 1) / training.warmup_steps
    done = (step - training.warmup_steps) / max(training.steps - training.warmup_steps, 1)
    return training.lr * (0.1 + 0.45 * (1 + math.cos(math.pi * min(done, 1.0))))


def next_token_loss(module: torch.nn.Module, input_ids: torch.Tensor) -> torch.Tensor:
    """Cross-entropy of every next token, (n_seq, seq_len - 1), in nats."""
    logits = module(input_ids=input_ids).logits[:, :-1]
    targets = input_ids[:, 1:]
    loss = torch.nn.functional.cross_entropy(
        logits.reshape(-1, logits.shape[-1]), targets.reshape(-1), reduction="none"
    )
    return loss.view(targets.shape)


@torch.inference_mode()
def held_out_nll(
    module: torch.nn.Module, input_ids: np.ndarray, device: torch.device
) -> np.ndarray:
    """:func:`next_token_loss` of every sequence, in eval mode, in batches; the module's mode
    is restored afterwards."""
    was_training = module.training
    module.eval()
    parts = [
        next_token_loss(module, torch.as_tensor(input_ids[i : i + EVAL_BATCH], device=device))
        for i in range(0, len(input_ids), EVAL_BATCH)
    ]
    module.train(was_training)
    return torch.cat(parts).double().cpu().numpy()


def _param_groups(module: torch.nn.Module) -> tuple[list[str], list[str]]:
    """Parameter names with weight decay (the matrices) and without (biases, LayerNorm gains)."""
    params = dict(module.named_parameters())
    return [n for n, p in params.items() if p.dim() >= 2], [
        n for n, p in params.items() if p.dim() < 2
    ]


def _optimizer(module: torch.nn.Module, training: TrainingConfig) -> torch.optim.AdamW:
    """AdamW with weight decay on the matrices only."""
    params = dict(module.named_parameters())
    decay, rest = _param_groups(module)
    return torch.optim.AdamW(
        [
            {"params": [params[n] for n in decay], "weight_decay": training.weight_decay},
            {"params": [params[n] for n in rest]},
        ],
        lr=training.lr,
        weight_decay=0.0,
    )


def _adam_order(module: torch.nn.Module) -> list[str]:
    """Parameter names in the order :func:`_optimizer` hands them to AdamW (its state's ids)."""
    decay, rest = _param_groups(module)
    return decay + rest


def save_checkpoint(
    path: Path, module: torch.nn.Module, optimizer: torch.optim.AdamW, step: int, setup: str
) -> None:
    """Weights, AdamW moments and step in one safetensors file, written atomically."""
    tensors = {f"param/{n}": p for n, p in module.named_parameters()}
    state = optimizer.state_dict()["state"]
    for i, name in enumerate(_adam_order(module)):
        tensors[f"exp_avg/{name}"] = state[i]["exp_avg"]
        tensors[f"exp_avg_sq/{name}"] = state[i]["exp_avg_sq"]
    write_tensors(path, tensors, {"step": str(step), "setup": setup})


def load_checkpoint(
    path: Path, module: torch.nn.Module, optimizer: torch.optim.AdamW, setup: str, steps: int
) -> int:
    """Restore the checkpoint at ``path`` into ``module`` and ``optimizer``; its step.

    The file is untrusted: it must be safetensors with exactly this model's tensors and shapes,
    a step within the budget and the very setup (config and corpus) of this run."""
    fix = f"remove {path} to train from the start"
    try:
        with safe_open(str(path), framework="pt") as f:
            meta, tensors = f.metadata() or {}, {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118
    except (SafetensorError, OSError, ValueError) as exc:
        raise UserError(f"the training checkpoint {path} is not readable ({exc}); {fix}") from exc
    if meta.get("setup") != setup:
        raise UserError(
            f"the training checkpoint {path} was written for another model.architecture, "
            f"model.training or corpus; restore those settings to resume, or {fix}"
        )
    step = meta.get("step", "")
    names = _adam_order(module)
    params = dict(module.named_parameters())
    expected = {
        f"{kind}/{n}": params[n].shape for kind in ("param", "exp_avg", "exp_avg_sq") for n in names
    }
    found = {k: v.shape for k, v in tensors.items()}
    if not step.isdigit() or not 0 < int(step) <= steps or found != expected:
        raise UserError(f"the training checkpoint {path} does not hold this model's state; {fix}")
    with torch.no_grad():
        for name in names:
            params[name].copy_(tensors[f"param/{name}"])
    state = optimizer.state_dict()
    state["state"] = {
        i: {
            "step": torch.tensor(float(step)),
            "exp_avg": tensors[f"exp_avg/{name}"],
            "exp_avg_sq": tensors[f"exp_avg_sq/{name}"],
        }
        for i, name in enumerate(names)
    }
    optimizer.load_state_dict(state)
    return int(step)


def perplexity(nll: np.ndarray, sequence: np.ndarray, seed: int) -> dict[str, Any]:
    """exp(mean NLL) with its 95% interval over resampled held-out sequences."""
    draws = SequenceBootstrap(sequence, N_BOOTSTRAP, seed).draws(nll)
    return {"value": float(np.exp(nll.mean())), "ci": interval(np.exp(draws))}


def content_pairs(corpus: Corpus, part: int) -> tuple[Pairs, np.ndarray]:
    """Each content token of split ``part`` and the token before it; the sequence of each."""
    seqs = np.flatnonzero(corpus.split == part)
    targets = np.flatnonzero(corpus.content)
    ids = corpus.input_ids[seqs]
    pairs = Pairs(prev=ids[:, targets - 1].reshape(-1), nxt=ids[:, targets].reshape(-1))
    return pairs, np.repeat(seqs, len(targets))


def evaluate(
    module: torch.nn.Module, corpus: Corpus, vocab_size: int, device: torch.device, seed: int
) -> dict[str, Any]:
    """Test-split perplexity of the decoder, the unigram and the bigram on the same tokens."""
    ngrams = fit_ngrams(content_pairs(corpus, TRAIN)[0], content_pairs(corpus, VAL)[0], vocab_size)
    test, sequence = content_pairs(corpus, TEST)
    nll = held_out_nll(module, corpus.input_ids[corpus.split == TEST], device)
    decoder = nll[:, np.flatnonzero(corpus.content) - 1].reshape(-1)
    return {
        "test_tokens": len(test.nxt),
        "perplexity": {
            "decoder": perplexity(decoder, sequence, seed),
            "bigram": perplexity(ngrams.bigram_nll(test), sequence, seed),
            "unigram": perplexity(ngrams.unigram_nll(test), sequence, seed),
        },
        "unigram_alpha": ngrams.alpha,
    }


def run_steps(
    module: torch.nn.Module,
    optimizer: torch.optim.AdamW,
    corpus: Corpus,
    training: TrainingConfig,
    step: int,
    checkpoint: Path,
    setup: str,
) -> None:
    """Train from ``step`` to ``training.steps``, saving the checkpoint every
    ``checkpoint_every`` steps and on Ctrl-C (then :class:`Interrupted`); a log line with the
    losses and the pace every 5% of the steps."""
    device = next(module.parameters()).device
    train_seqs = np.flatnonzero(corpus.split == TRAIN)
    val_ids = corpus.input_ids[corpus.split == VAL][:VAL_SEQUENCES]
    started, first, losses = time.monotonic(), step, []
    log_every = max(1, training.steps // 20)
    try:
        while step < training.steps:
            picks = batch_sequences(len(train_seqs), training.batch_size, step, training.seed)
            batch = torch.as_tensor(corpus.input_ids[train_seqs[picks]], device=device)
            for group in optimizer.param_groups:
                group["lr"] = learning_rate(training, step)
            loss = next_token_loss(module, batch).mean()
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(module.parameters(), 1.0)
            optimizer.step()
            step += 1
            losses.append(loss.item())
            if step % training.checkpoint_every == 0 and step < training.steps:
                save_checkpoint(checkpoint, module, optimizer, step, setup)
            if step % log_every == 0 or step == training.steps:
                elapsed = time.monotonic() - started
                rate = (step - first) * training.batch_size * training.seq_len / elapsed
                left = elapsed / (step - first) * (training.steps - step)
                log.info(
                    "step %d/%d: train loss %.3f, val loss %.3f, %.0f tokens/s, %s",
                    *(step, training.steps, np.mean(losses)),
                    held_out_nll(module, val_ids, device).mean(),
                    rate,
                    f"about {duration(left)} left" if step < training.steps else "done",
                )
                losses = []
    except KeyboardInterrupt:
        if step > first:
            save_checkpoint(checkpoint, module, optimizer, step, setup)
        raise Interrupted(step, checkpoint) from None


def train_decoder(cfg: ModelConfig, device: torch.device) -> Path:
    """Train ``cfg`` (resuming its checkpoint if there is one) and save it at ``cfg.path``."""
    training = cfg.training
    if training is None or cfg.path is None:
        raise UserError(f"model {cfg.name!r} has no model.training; pick a model to train")
    target = Path(resolve_location(cfg.path))
    if target.exists():
        log.info("Model %s is already trained: %s (remove it to train again)", cfg.name, target)
        return target
    plain = dataclasses.replace(cfg, path=None, tokenizer=training.tokenizer, training=None)
    tokenizer = load_tokenizer(plain)
    config = model_config(plain, len(tokenizer))
    corpus = training_corpus(training, tokenizer, config.n_positions)
    setup = json.dumps(
        {
            "training": dataclasses.asdict(training),
            "architecture": cfg.architecture,
            "corpus": corpus.fingerprint(),
        },
        sort_keys=True,
    )
    torch.manual_seed(training.seed)
    module = transformers.AutoModelForCausalLM.from_config(config).to(device).train()
    optimizer = _optimizer(module, training)
    checkpoint = checkpoint_path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    step = 0
    if checkpoint.exists():
        step = load_checkpoint(checkpoint, module, optimizer, setup, training.steps)
        log.info("Resuming %s from step %d (%s)", cfg.name, step, checkpoint)
    n_params = sum(p.numel() for p in module.parameters())
    log.info(
        "Training %s (%.1fM parameters) on %s: %d steps of %d sequences on %s",
        *(cfg.name, n_params / 1e6, corpus.description),
        *(training.steps, training.batch_size, device),
    )
    started = time.monotonic()
    run_steps(module, optimizer, corpus, training, step, checkpoint, setup)
    seconds = time.monotonic() - started
    module.eval()
    results = evaluate(module, corpus, len(tokenizer), device, training.seed)
    tmp = target.with_name(f".{target.name}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    module.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    record = {
        "name": cfg.name,
        "training": dataclasses.asdict(training),
        "architecture": cfg.architecture,
        "parameters": n_params,
        "corpus": corpus.description,
        "train_tokens_seen": training.steps * training.batch_size * training.seq_len,
        "seconds_last_run": round(seconds, 1),
        "device": str(device),
        **results,
    }
    write_json(tmp / RECORD, record)
    tmp.rename(target)
    checkpoint.unlink(missing_ok=True)
    ppl = results["perplexity"]
    log.info(
        "Saved %s at %s. Test perplexity over %d tokens: decoder %.1f, bigram %.1f, unigram %.1f",
        *(cfg.name, target, results["test_tokens"]),
        *(ppl[k]["value"] for k in ("decoder", "bigram", "unigram")),
    )
    return target
