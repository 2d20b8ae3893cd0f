"""Section 8 (issue 15), on a GPU only: the GPT-2-XL-shaped random-init job at research scale.

(a) The forward-pass bound: tokens/s of the bare model forward (``output_hidden_states=True``)
on random token ids at the job's batch size and sequence length, after a warm-up. (b) The real
job in a fresh process: extraction tokens/s against that bound (target >= 50%), probe-fit
tokens x evaluations per second, convergence, peak GPU memory (as the job records it), peak
RSS and wall time.
"""

from __future__ import annotations

import argparse
import gc
import shlex
import shutil
import time
from pathlib import Path

import torch

from probe_sweep.bench.common import Row, ok, progress, sync
from probe_sweep.bench.runs import JobFigures, job_env, job_figures, room_for, run_cli_job
from probe_sweep.config import Config, compose_config
from probe_sweep.extraction.model import load_model, load_tokenizer

SECTION = "8 gpu scale"
TARGET = 0.5  # extraction over the forward-pass bound


def gpu_overrides(args: argparse.Namespace) -> list[str]:
    return [
        f"model={args.gpu_model}",
        "data=sotu",
        f"data.token_budget={args.gpu_tokens}",
        *shlex.split(args.gpu_overrides),
        "device=cuda",
    ]


def forward_bound(config: Config, warmup: int = 3, repeats: int = 10) -> float:
    """Sequences/s of the bare forward pass (every hidden state out) at the job's batch size
    and sequence length, on random token ids."""
    device = torch.device("cuda")
    tokenizer = load_tokenizer(config.model)
    model = load_model(config.model, len(tokenizer), device, config.seed)
    batch, seq_len = config.activations.batch_size, config.data.seq_len
    ids = torch.randint(0, len(tokenizer), (batch, seq_len), device=device)
    with torch.inference_mode():
        for _ in range(warmup):
            model.module(input_ids=ids, output_hidden_states=True)
        sync(device)
        start = time.perf_counter()
        for _ in range(repeats):
            model.module(input_ids=ids, output_hidden_states=True)
        sync(device)
        seconds = time.perf_counter() - start
    del model, ids
    gc.collect()
    torch.cuda.empty_cache()
    return batch * repeats / seconds


def section_gpu_scale(
    args: argparse.Namespace, work: Path, out: list[Row], notes: list[str]
) -> None:
    if not torch.cuda.is_available():
        notes.append("gpu scale: skipped, no CUDA device is visible")
        out.append(Row(SECTION, "GPT-2-XL-shaped job", "", "", "", "", "skipped (no GPU)"))
        return
    cache = work / "gpu-cache"
    overrides = [*gpu_overrides(args), f"activations.cache_dir={cache}"]
    config = compose_config(overrides)
    why = room_for(config, work)
    if why is not None:
        notes.append(f"gpu scale: skipped, {why} in {work}")
        out.append(Row(SECTION, "GPT-2-XL-shaped job", "", "", "", "", "skipped (disk)"))
        return
    batch, seq_len = config.activations.batch_size, config.data.seq_len
    progress(f"gpu scale: forward-pass bound of {args.gpu_model}, batch {batch} x {seq_len}")
    sequences_per_s = forward_bound(config)
    progress(f"gpu scale: bound {sequences_per_s * seq_len:,.0f} positions/s; the job next")
    progress(f"gpu scale: `python -m probe_sweep {' '.join(overrides)}`")
    run_dir = work / "gpu-job"
    run = run_cli_job(
        [*overrides, f"hydra.run.dir={run_dir}"], work, job_env(work, "gpu-cache"), "  | "
    )
    keep = Path(args.output).parent  # the job's own record, beside the report
    for name in ("metrics.json", "probe_sweep.log", "accuracy_by_layer.png"):
        if (run_dir / name).exists():
            shutil.copy(run_dir / name, keep / f"gpu_scale_{name}")
    figures = job_figures(run_dir, run)
    shutil.rmtree(cache, ignore_errors=True)
    progress(f"gpu scale: job done in {run.seconds:.0f} s")
    rows, lines = gpu_report(args, figures, sequences_per_s, batch)
    out.extend(rows)
    notes.extend(lines)


def gpu_report(
    args: argparse.Namespace, f: JobFigures, sequences_per_s: float, batch: int
) -> tuple[list[Row], list[str]]:
    """Rows of the GPU job against the bound (in content tokens: the job's tokens per sequence)."""
    bound = sequences_per_s * f.n_tokens / max(f.n_sequences, 1)
    ratio = f.extract_rate / bound
    setting = f"{args.gpu_model}, {f.n_tokens:,} tokens"
    gpu = "not recorded" if f.peak_gpu_mb is None else f"{f.peak_gpu_mb:,.0f}"
    rows = [
        Row(
            SECTION,
            f"{setting}: extraction tokens/s vs the bare forward pass (batch {batch})",
            f"{f.extract_rate:,.0f}",
            f"{bound:,.0f}",
            f"{ratio:.2f} of bound",
            f">= {TARGET}",
            ok(ratio >= TARGET),
        ),
        Row(
            SECTION,
            f"{setting}: fit tokens x evaluations/s ({f.evaluations} evaluations, "
            f"{f.n_classes:,} classes); converged",
            f"{f.fit_rate:,.0f}; {f.converged}",
            "",
            "",
            "",
            "",
        ),
        Row(
            SECTION,
            f"{setting}: peak GPU MiB / peak RSS MiB / wall s",
            f"{gpu} / {f.peak_rss / 2**20:,.0f} / {f.wall_s:,.0f}",
            "",
            "",
            "",
            "",
        ),
    ]
    lines = [
        f"gpu scale: `{args.gpu_overrides}`; extract stage {f.extract_s:.1f} s "
        f"({f.n_tokens / max(f.extract_s, 1e-9):,.0f} tokens/s with model build and "
        f"tokenising; the loop alone "
        f"{'not logged' if f.loop_rate is None else f'{f.loop_rate:,.0f} tokens/s'}), fit "
        f"stage {f.fit_s:.1f} s ({f.iterations} iterations, worst relative "
        f"gap {f.gap_rel:.1e}), statistics {f.statistics_s:.1f} s; cache "
        f"{f.cache_bytes / 2**30:.2f} GiB"
    ]
    return rows, lines
