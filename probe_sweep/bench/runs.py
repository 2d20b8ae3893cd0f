"""Real ``python -m probe_sweep`` jobs, each in a fresh process: run one with its memory sampled
(peak RSS from the kernel, anon and file-backed RSS sampled from /proc), and read what it
measured (metrics.json, its log) into the figures the bench reports."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from probe_sweep.bench.common import REPO, disk_bytes, free_bytes
from probe_sweep.config import Config


def job_args(args: Any, budget: int) -> list[str]:
    """The bench's model, budget, sequence length and device as job overrides."""
    extra = [f"model.{o}" for o in args.model_override]
    return [
        f"model={args.model}",
        *extra,
        f"data.token_budget={budget}",
        f"data.seq_len={args.seq_len}",
        f"device={args.device}",
        "tracker=none",
    ]


def job_env(work: Path, cache: str) -> dict[str, str]:
    """The environment of a job: this checkout's code first (jobs run in the work dir, where
    an install that points elsewhere would be found instead), its own cache, no W&B."""
    env = dict(os.environ)
    path = [str(REPO), *filter(None, env.get("PYTHONPATH", "").split(os.pathsep))]
    env.update(
        {
            "PYTHONPATH": os.pathsep.join(path),
            "PROBE_SWEEP_CACHE": str(work / cache),
            "WANDB_MODE": "disabled",
            "HYDRA_FULL_ERROR": "1",
        }
    )
    for var in ("WANDB_DIR", "WANDB_CACHE_DIR", "WANDB_CONFIG_DIR", "WANDB_DATA_DIR"):
        env[var] = str(work / "wandb")
    return env


@dataclass
class JobRun:
    seconds: float
    peak_rss: int  # bytes, from the kernel (ru_maxrss: the process and its waited-for children)
    peak_anon: int  # bytes, sampled RssAnon: heap, not file-backed memmap pages
    peak_file: int  # bytes, sampled RssFile: memory-mapped files (reclaimable page cache)
    output: str


def _sample_memory(pid: int, peaks: dict[str, int], done: threading.Event) -> None:
    """Keep the highest RssAnon and RssFile of ``pid`` seen until ``done``."""
    status = Path(f"/proc/{pid}/status")
    while not done.is_set():
        try:
            for line in status.read_text().splitlines():
                key = line.split(":", 1)[0]
                if key in peaks:
                    peaks[key] = max(peaks[key], int(line.split()[1]) * 1024)
        except (OSError, ValueError, IndexError):
            pass
        done.wait(0.02)


def _copy_lines(source: Any, sink: Any, prefix: str | None) -> None:
    """Write the child's output to its log, and to stderr with ``prefix`` when given."""
    for raw in iter(source.readline, b""):
        sink.write(raw)
        sink.flush()
        if prefix is not None:
            line = raw.decode(errors="replace").rstrip()
            if line:
                print(f"{prefix}{line}", file=sys.stderr, flush=True)


def run_cli_job(cli: list[str], cwd: Path, env: dict[str, str], echo: str | None = None) -> JobRun:
    """Run ``python -m probe_sweep <cli>`` in a fresh process; time it, sample its memory.
    ``echo``: also print the job's output lines to stderr behind this prefix (long jobs)."""
    log = cwd / f"job-{time.monotonic_ns()}.log"
    peaks = {"RssAnon": 0, "RssFile": 0}
    with open(log, "wb") as sink:
        start = time.perf_counter()
        proc = subprocess.Popen(
            [sys.executable, "-m", "probe_sweep", *cli],
            cwd=cwd,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
        )
        done = threading.Event()
        threads = [
            threading.Thread(target=_sample_memory, args=(proc.pid, peaks, done), daemon=True),
            threading.Thread(target=_copy_lines, args=(proc.stdout, sink, echo), daemon=True),
        ]
        for thread in threads:
            thread.start()
        _, status, usage = os.wait4(proc.pid, 0)
        seconds = time.perf_counter() - start
        done.set()
        for thread in threads:
            thread.join()
        proc.returncode = os.waitstatus_to_exitcode(status)
        assert proc.stdout is not None
        proc.stdout.close()
    text = log.read_text(errors="replace")
    if proc.returncode != 0:
        raise RuntimeError(f"job {cli} failed ({proc.returncode}):\n{text[-3000:]}")
    return JobRun(seconds, usage.ru_maxrss * 1024, peaks["RssAnon"], peaks["RssFile"], text)


# --- what a real job measured ------------------------------------------------------------------

# The job's last extraction progress line (off a terminal): the forward + cache-write loop alone.
LOOP_RATE = re.compile(r"Extracting activations: (\d+)/(\d+) sequences .*?([\d.]+) tokens/s")


@dataclass
class JobFigures:
    """A finished job's own record (metrics.json, log) and what the bench saw of it."""

    n_tokens: int  # content tokens extracted (train + val + test)
    n_train: int
    n_sequences: int
    n_classes: int
    evaluations: int  # passes over the rows (gradient passes + Hessian products), all probes
    iterations: list[int]
    converged: bool
    gap_rel: float  # the worst probe's relative gap
    extract_s: float  # the job's extract stage: model load, tokenising, forward, cache write
    fit_s: float  # its fit stage: standardisation, solver, held-out scoring
    statistics_s: float
    loop_rate: float | None  # tokens/s of the extraction loop alone, from the job's log
    cache_bytes: int
    peak_rss: int
    peak_anon: int
    peak_file: int
    wall_s: float
    peak_gpu_mb: float | None

    @property
    def extract_rate(self) -> float:
        """Extraction tokens/s: the loop's own rate where the job logged it, else the stage's."""
        if self.loop_rate is not None:
            return self.loop_rate
        return self.n_tokens / max(self.extract_s, 1e-9)

    @property
    def fit_rate(self) -> float:
        """Training tokens x solver evaluations per second of the fit stage."""
        return self.n_train * self.evaluations / max(self.fit_s, 1e-9)


def loop_rate(output: str) -> float | None:
    """The throughput of the job's last complete extraction, if its log says it."""
    done = [m for m in LOOP_RATE.finditer(output) if m.group(1) == m.group(2)]
    return float(done[-1].group(3)) if done else None


def job_figures(run_dir: Path, run: JobRun) -> JobFigures:
    """Read a finished job's metrics.json (and log) into the figures the bench reports."""
    from probe_sweep.jobs.jobdir import read_metrics

    metrics = read_metrics(run_dir)
    counts, timing, fits = metrics.counts, metrics.timing_s, metrics.fits.values()
    cache = Path(metrics.cache.path)
    return JobFigures(
        n_tokens=counts.n_train_tokens + counts.n_val_tokens + counts.n_test_tokens,
        n_train=counts.n_train_tokens,
        n_sequences=counts.n_sequences,
        n_classes=metrics.probe.n_classes,
        evaluations=sum(int(f.get("passes", 1)) + int(f.get("hessian_products", 0)) for f in fits),
        iterations=[int(f.get("iterations", 0)) for f in fits],
        converged=metrics.probe.all_converged,
        gap_rel=max((float(f.get("gap_rel") or 0.0) for f in fits), default=0.0),
        extract_s=float(timing["extract"]),
        fit_s=float(timing["fit"]),
        statistics_s=float(timing.get("statistics", 0.0)),
        loop_rate=loop_rate(run.output),
        cache_bytes=disk_bytes(cache) if cache.exists() else 0,
        peak_rss=run.peak_rss,
        peak_anon=run.peak_anon,
        peak_file=run.peak_file,
        wall_s=run.seconds,
        peak_gpu_mb=metrics.resources.get("peak_gpu_mb"),
    )


def cache_estimate(config: Config) -> int:
    """Bytes the job's activation cache entry will take (its layers at its token budget)."""
    import numpy as np

    from probe_sweep.extraction.layers import resolve_layers
    from probe_sweep.extraction.model import inspect_model, load_tokenizer

    info = inspect_model(config.model, len(load_tokenizer(config.model)))
    layers = resolve_layers(config.layers, info.n_layers)
    itemsize = np.dtype(config.activations.dtype.value).itemsize
    return config.data.token_budget * info.d_model * itemsize * len(layers)


def room_for(config: Config, where: Path) -> str | None:
    """None when ``where``'s disk holds the job's cache with a margin, else why not."""
    need, free = cache_estimate(config), free_bytes(where)
    if free >= 1.2 * need + 2**30:
        return None
    return f"needs about {need / 2**30:.1f} GiB of cache, {free / 2**30:.1f} GiB free"
