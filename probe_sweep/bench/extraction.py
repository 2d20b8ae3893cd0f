"""Section 1: activation extraction, tokens/s, against the forward-pass bound (2 x matmul
parameters FLOPs per token over the device's measured float32 matmul rate). Its cache entry
then feeds sections 2 and 3 through the pipeline's own inputs (split, labels, basis)."""

from __future__ import annotations

import argparse
import dataclasses
import gc
from dataclasses import dataclass
from pathlib import Path

import torch

from probe_sweep.bench.common import (
    Row,
    matmul_params,
    matmul_rate,
    ok,
    progress,
    timed,
)
from probe_sweep.bench.runs import job_args
from probe_sweep.config import Config, compose_config
from probe_sweep.extraction.activations import extract
from probe_sweep.extraction.data import TEST, TRAIN, VAL, build_corpus
from probe_sweep.extraction.hidden_states import cache_activations, pick_device
from probe_sweep.extraction.layers import resolve_layers
from probe_sweep.extraction.model import inspect_model, load_model, load_tokenizer
from probe_sweep.fitting.inputs import Inputs
from probe_sweep.pipeline import prepare


@dataclass
class Setup:
    """The bench's model on its data, as the pipeline prepares it for a job."""

    args: argparse.Namespace
    config: Config
    device: torch.device
    inputs: Inputs
    class_embeddings: torch.Tensor  # W_E rows of the classes (natural coordinates), on device
    n_layers: int
    notes: list[str]

    @property
    def n_classes(self) -> int:
        return len(self.inputs.split.classes)


def bench_config(args: argparse.Namespace, cache_dir: Path) -> Config:
    """The job the bench measures: its model and budget, every layer, the natural basis."""
    overrides = [
        *job_args(args, args.token_budget),
        "layers=each",
        "basis=natural",
        f"activations.cache_dir={cache_dir}",
    ]
    return compose_config(overrides)


def time_extraction(
    args: argparse.Namespace, config: Config, device: torch.device, work: Path, out: list[Row]
) -> Path:
    """Extract the job's layers ``--repeats`` times, each into a fresh cache; the last one."""
    tokenizer = load_tokenizer(config.model)
    info = inspect_model(config.model, len(tokenizer))
    corpus = build_corpus(config.data, tokenizer, info.max_positions, config.seed)
    model = load_model(config.model, len(tokenizer), device, config.seed)
    layers = resolve_layers(config.layers, info.n_layers)
    n_tokens = corpus.input_ids.size
    rate = matmul_rate(device)
    flops_per_token = 2 * matmul_params(model.module)
    bound = rate / flops_per_token
    runs = iter(range(10**6))

    def run() -> Path:
        cache = work / f"extract-{next(runs)}"
        activations = dataclasses.replace(config.activations, cache_dir=str(cache))
        extract(model, corpus, layers, activations, device)
        return cache

    progress(f"extraction: {n_tokens} tokens x {len(layers)} layers, {args.repeats} runs")
    seconds, cache = timed(run, args.repeats)
    measured = n_tokens / seconds
    out.append(
        Row(
            "1 extraction",
            f"{info.name} on {device.type}: tokens/s ({n_tokens} tokens, all {len(layers)} "
            f"layers written to the fp16 cache); bound = {rate / 1e9:.0f} GFLOP/s matmul / "
            f"{flops_per_token / 1e6:.1f} MFLOP per token",
            f"{measured:,.0f}",
            f"{bound:,.0f}",
            f"{measured / bound:.2f} of bound",
            ">= 0.5 on a GPU",
            "n/a on CPU (GPU target)" if device.type == "cpu" else ok(measured / bound >= 0.5),
        )
    )
    return cache


def section_extraction(args: argparse.Namespace, work: Path, out: list[Row]) -> Setup:
    device = pick_device(args.device)
    config = bench_config(args, work / "extract-0")
    cache = time_extraction(args, config, device, work, out)
    gc.collect()
    # The pipeline's own preparation of a job's inputs, reusing the entry just written.
    config = dataclasses.replace(
        config, activations=dataclasses.replace(config.activations, cache_dir=str(cache))
    )
    acts = cache_activations(config, device)
    split, (model,) = prepare(config, [acts], device)
    scorer, class_embeddings = model.scorer, model.class_embeddings
    rows = {part: len(split.rows[part]) for part in (TRAIN, VAL, TEST)}
    notes = [
        f"data: {acts.corpus.description}; {rows[TRAIN]}/{rows[VAL]}/{rows[TEST]} "
        f"train/val/test tokens; {len(split.classes)} classes (token types seen in training)"
    ]
    return Setup(args, config, device, scorer.inputs, class_embeddings, acts.info.n_layers, notes)
