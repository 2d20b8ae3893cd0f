"""Section 4: a 3-basis sweep (real ``python -m probe_sweep -m basis=...`` jobs) against one
job, each from a cold cache."""

from __future__ import annotations

import argparse
from pathlib import Path

from probe_sweep.bases import CONSTRUCTIONS
from probe_sweep.bench.common import Row, ok, progress
from probe_sweep.bench.runs import job_args, job_env, run_cli_job
from probe_sweep.jobs.jobdir import METRICS, read_metrics

BASIS_PREFERENCE = ["natural", "pca", "nmf", "random", "frequency", "dictionary"]


def chosen_bases(args: argparse.Namespace) -> list[str]:
    """The bases the sweep section runs: ``--bases``, or three registered ones."""
    if args.bases != "auto":
        return args.bases.split(",")
    return [b for b in BASIS_PREFERENCE if b in CONSTRUCTIONS][:3]


def section_sweep(args: argparse.Namespace, work: Path, out: list[Row], notes: list[str]) -> None:
    bases = chosen_bases(args)
    common = job_args(args, args.token_budget)
    axis = [f"basis={','.join(bases)}"]
    progress(f"sweep: one job (basis={bases[0]})")
    single = run_cli_job(
        [*common, f"basis={bases[0]}", "hydra.run.dir=single"], work, job_env(work, "cache-single")
    )
    progress(f"sweep: -m {' '.join(axis)}")
    sweep = run_cli_job(
        ["-m", *common, *axis, "hydra.sweep.dir=sweep"], work, job_env(work, "cache-sweep")
    )
    jobs = sorted((work / "sweep").rglob(METRICS))
    if len(jobs) != len(bases):
        raise RuntimeError(f"sweep wrote {len(jobs)} {METRICS} for {len(bases)} bases")
    timings = [read_metrics(p.parent).timing_s for p in jobs]
    one = read_metrics(work / "single").timing_s
    ratio = sweep.seconds / single.seconds
    fit_share = one["fit"] / single.seconds
    notes.append(
        f"sweep: single job {single.seconds:.1f} s (extract {one['extract']} s, fit "
        f"{one['fit']} s, the rest process start, imports, model load, writing results); sweep "
        f"jobs extract/fit s: {[(t['extract'], t['fit']) for t in timings]}. With the cache "
        f"reused, the least a {len(bases)}-job sweep can cost is about 1 + {len(bases) - 1} x "
        f"(fit share {fit_share:.2f}) = {1 + (len(bases) - 1) * fit_share:.2f} x one job"
    )
    out.append(
        Row(
            "4 sweep",
            f"`-m {' '.join(axis)}` vs one job (basis={bases[0]}), cold caches, real "
            f"CLI processes, {args.token_budget} tokens, all layers: wall s",
            f"{sweep.seconds:.1f}",
            f"{single.seconds:.1f}",
            f"{ratio:.2f}x one job",
            "< 1.5x",
            ok(ratio < 1.5),
        )
    )
