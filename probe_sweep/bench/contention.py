"""Section 6: two real jobs at once on the same cores, each sized to its share
(PROBE_SWEEP_THREADS, as the local launcher's n_jobs would set), against the same two jobs one
after the other."""

from __future__ import annotations

import argparse
import os
import threading
import time
from pathlib import Path

from probe_sweep.bench.common import Row, ok, progress
from probe_sweep.bench.runs import job_args, job_env, run_cli_job
from probe_sweep.jobs.jobdir import METRICS


def section_contention(
    args: argparse.Namespace, work: Path, out: list[Row], notes: list[str]
) -> None:
    cores = os.cpu_count() or 1
    common = [*job_args(args, args.token_budget), "statistics.enabled=false"]
    env = job_env(work, "cache-contention")
    progress("contention: caching the activations, then two jobs one after the other")
    run_cli_job([*common, "hydra.run.dir=warm"], work, env)
    sequential = sum(
        run_cli_job([*common, f"seed={i}", f"hydra.run.dir=seq-{i}"], work, env).seconds
        for i in range(2)
    )
    shared = {**env, "PROBE_SWEEP_THREADS": str(max(1, cores // 2))}
    progress("contention: two jobs at once")
    start = time.perf_counter()
    threads = [
        threading.Thread(
            target=run_cli_job,
            args=([*common, f"seed={i}", f"hydra.run.dir=par-{i}"], work, shared),
        )
        for i in range(2)
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    together = time.perf_counter() - start
    if len(list(work.glob(f"par-*/{METRICS}"))) != 2:
        raise RuntimeError("a job of the contention pair failed")
    ratio = together / sequential
    notes.append(
        f"contention: two jobs one after the other {sequential:.1f} s, at once with "
        f"{max(1, cores // 2)} thread(s) each on {cores} cores {together:.1f} s"
    )
    out.append(
        Row(
            "6 contention",
            f"two jobs at once vs one after the other ({args.token_budget} tokens, cached "
            "activations, statistics off): wall s",
            f"{together:.1f}",
            f"{sequential:.1f}",
            f"{ratio:.2f}x",
            "<= 1.2x",
            ok(ratio <= 1.2),
        )
    )
