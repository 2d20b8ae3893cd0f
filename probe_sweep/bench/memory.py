"""Section 5: peak resident memory of a real job as the token budget doubles twice, each in a
fresh process from a cold cache."""

from __future__ import annotations

import argparse
from pathlib import Path

from probe_sweep.bench.common import Row, ok, progress
from probe_sweep.bench.runs import job_args, job_env, run_cli_job


def section_memory(args: argparse.Namespace, work: Path, out: list[Row], notes: list[str]) -> None:
    budgets = [args.memory_budget * 2**i for i in range(3)]
    runs = []
    for budget in budgets:
        progress(f"memory: {budget} tokens")
        cli = [*job_args(args, budget), "probe.max_iter=1", f"hydra.run.dir=mem-{budget}"]
        runs.append(run_cli_job(cli, work, job_env(work, f"cache-mem-{budget}")))
    mib = [r.peak_rss / 2**20 for r in runs]
    anon = [r.peak_anon / 2**20 for r in runs]
    files = [r.peak_file / 2**20 for r in runs]
    growth = (mib[-1] - mib[0]) / mib[0]
    per_k = (mib[-1] - mib[0]) / ((budgets[-1] - budgets[0]) / 1000)
    notes.append(
        "memory: peak RSS (MiB) "
        + ", ".join(
            f"{b} tokens: {m:.0f} (anon {a:.0f}, file-backed {f:.0f})"
            for b, m, a, f in zip(budgets, mib, anon, files, strict=True)
        )
        + f"; {per_k:.2f} MiB per extra 1k tokens. Each a fresh `python -m probe_sweep` job "
        "(cold cache, all layers, probe.max_iter=1: memory does not depend on iterations)"
    )
    out.append(
        Row(
            "5 memory",
            f"peak RSS MiB at {budgets[0]} / {budgets[1]} / {budgets[2]} tokens",
            " / ".join(f"{m:.0f}" for m in mib),
            "",
            f"+{100 * growth:.0f}% over 4x tokens",
            "flat (< +10% over 4x)",
            ok(growth < 0.10),
        )
    )
