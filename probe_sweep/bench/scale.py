"""Section 7 (issue 15): the real job at growing token budgets, each in a fresh process with a
cold cache of its own. Per budget: extraction tokens/s, fit tokens x solver evaluations per
second, peak RSS and the cache's bytes on disk; then the two criteria: peak RSS at the largest
budget at most 1.5x that at the smallest, and fit time per token per evaluation flat (within
1.5x). A few solver iterations suffice: the point is the cost of one evaluation and the memory,
not convergence (a full-vocabulary fit over 1M tokens takes minutes per evaluation on 2 cores).
"""

from __future__ import annotations

import argparse
import shlex
import shutil
from pathlib import Path

from probe_sweep.bench.common import Row, ok, progress
from probe_sweep.bench.runs import JobFigures, job_env, job_figures, room_for, run_cli_job
from probe_sweep.config import compose_config

SECTION = "7 scale"
RSS_LIMIT = 1.5  # peak RSS at the largest budget over that at the smallest
FIT_LIMIT = 1.5  # fit s per token per evaluation, largest budget over smallest


def scale_overrides(args: argparse.Namespace, budget: int) -> list[str]:
    """The job at ``budget`` tokens: one layer (0), a few solver iterations, no statistics."""
    return [
        f"model={args.model}",
        *(f"model.{o}" for o in args.model_override),
        f"data={args.scale_data}",
        f"data.token_budget={budget}",
        "layers=subset",
        "layers.indices=[0]",
        f"probe.max_iter={args.scale_max_iter}",
        "statistics.enabled=false",
        "tracker=none",
        f"device={args.device}",
        *shlex.split(args.scale_overrides),
    ]


def section_scale(args: argparse.Namespace, work: Path, out: list[Row], notes: list[str]) -> None:
    runs: list[tuple[int, JobFigures]] = []
    skipped: list[str] = []
    cache = work / "scale-cache"
    for budget in sorted(args.scale_tokens):
        overrides = [*scale_overrides(args, budget), f"activations.cache_dir={cache}"]
        why = room_for(compose_config(overrides), work)
        if why is not None:
            skipped.append(f"{budget:,} tokens skipped: {why} in {work}")
            progress(f"scale: {skipped[-1]}")
            continue
        progress(f"scale: {budget:,} tokens, `python -m probe_sweep {' '.join(overrides)}`")
        run_dir = work / f"scale-{budget}"
        run = run_cli_job(
            [*overrides, f"hydra.run.dir={run_dir}"], work, job_env(work, "scale-cache"), "  | "
        )
        figures = job_figures(run_dir, run)
        shutil.rmtree(cache, ignore_errors=True)  # measured; give the disk back before the next
        progress(f"scale: {budget:,} tokens done in {run.seconds:.0f} s")
        runs.append((budget, figures))
    setting = f"data={args.scale_data}, layer 0, probe.max_iter={args.scale_max_iter}"
    if args.scale_overrides:
        setting += f", {args.scale_overrides}"
    rows, lines = scale_report(runs, skipped, setting)
    out.extend(rows)
    notes.extend(lines)


def mib(n: float, digits: int = 0) -> str:
    return f"{n / 2**20:,.{digits}f}"


def scale_report(
    runs: list[tuple[int, JobFigures]], skipped: list[str], setting: str
) -> tuple[list[Row], list[str]]:
    """One row per budget and one per criterion (smallest budget against largest), with notes."""
    rows = [
        Row(
            SECTION,
            f"{budget:,} tokens ({setting}, {f.n_classes:,} classes): extraction tokens/s / "
            "fit tokens x evaluations/s / peak RSS MiB (anon) / cache MiB on disk",
            f"{f.extract_rate:,.0f} / {f.fit_rate:,.0f} / {mib(f.peak_rss)} "
            f"({mib(f.peak_anon)}) / {mib(f.cache_bytes, 1)}",
            "",
            "",
            "",
            "",
        )
        for budget, f in runs
    ]
    lines = [
        f"scale, {budget:,} tokens: {f.n_tokens:,} extracted ({f.n_train:,} train) in "
        f"{f.wall_s:.0f} s wall; extract stage {f.extract_s:.1f} s (model load, tokenising, "
        f"forward, cache write: {f.n_tokens / max(f.extract_s, 1e-9):,.0f} tokens/s; the "
        f"loop alone {'not logged' if f.loop_rate is None else f'{f.loop_rate:,.0f} tokens/s'}); "
        f"fit stage {f.fit_s:.1f} s for {f.evaluations} evaluations ({f.iterations} "
        f"iterations; it includes standardisation and held-out scoring), "
        f"{1e6 / f.fit_rate:.2f} us per token per evaluation; peak RSS {mib(f.peak_rss)} MiB "
        f"(sampled anon {mib(f.peak_anon)}, file-backed {mib(f.peak_file)})"
        for budget, f in runs
    ]
    lines += [f"scale: {why}" for why in skipped]
    if len(runs) < 2:
        verdict = "n/a (fewer than two budgets ran)"
        for measure in ("peak RSS", "fit s per token per evaluation"):
            rows.append(Row(SECTION, measure, "", "", "", "", verdict))
        return rows, lines
    (small, first), (large, last) = runs[0], runs[-1]
    rss = last.peak_rss / first.peak_rss
    per_eval = first.fit_rate / last.fit_rate  # s per token-evaluation, large over small
    rows.append(
        Row(
            SECTION,
            f"peak RSS MiB at {large:,} vs {small:,} tokens",
            mib(last.peak_rss),
            mib(first.peak_rss),
            f"{rss:.2f}x",
            f"<= {RSS_LIMIT}x",
            ok(rss <= RSS_LIMIT),
        )
    )
    rows.append(
        Row(
            SECTION,
            f"fit us per token per solver evaluation at {large:,} vs {small:,} tokens",
            f"{1e6 / last.fit_rate:.2f}",
            f"{1e6 / first.fit_rate:.2f}",
            f"{per_eval:.2f}x",
            f"flat (<= {FIT_LIMIT}x)",
            ok(per_eval <= FIT_LIMIT),
        )
    )
    return rows, lines
