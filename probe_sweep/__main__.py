"""Hydra entry point: ``python -m probe_sweep [-m] group=option key=value ...``.

Hydra glue only: the config becomes typed values (``config.py``), ``pipeline.run_job`` runs
the stages, and this module turns errors into one line and an exit code, skips finished jobs of
a resumed sweep and hands the results to the tracker and the tuner. A skipped job whose results
the tracker never logged (killed between metrics.json and tracking) is tracked then.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import signal
import sys
from pathlib import Path
from typing import Any

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig, OmegaConf

from probe_sweep import jobs, tracking, tuning
from probe_sweep.config import register_schema, to_typed
from probe_sweep.errors import UserError
from probe_sweep.pipeline import run_job

log = logging.getLogger("probe_sweep")


register_schema()
jobs.prepare_launchers()


def progress_bars_on_terminal_only() -> None:
    """Off a terminal (a SLURM or CI log, a pipe) every redraw of a progress bar is a line of
    its own: turn off the bars of transformers and huggingface_hub (weight loading, downloads)
    there. Ours choose for themselves (``activations.ExtractionProgress``, tqdm's
    ``disable=None``). Decided in each job, not the launching process: a SLURM job's stderr is
    a file even when the sweep was started from a terminal. An explicit
    HF_HUB_DISABLE_PROGRESS_BARS is the user's choice and left alone."""
    try:
        if sys.stderr.isatty() or os.environ.get("HF_HUB_DISABLE_PROGRESS_BARS") is not None:
            return
    except (AttributeError, ValueError):  # no isatty, or a closed stream: not a terminal
        pass
    import huggingface_hub.utils
    import transformers.utils.logging

    huggingface_hub.utils.disable_progress_bars()
    transformers.utils.logging.disable_progress_bar()


def track(
    cfg: tracking.TrackerConfig, job: tracking.JobInfo, resolved: dict[str, Any], key: str
) -> bool:
    """Log a finished job's results with the tracker and mark its dir tracked; never raises.
    False when nothing was logged (tracker disabled, or W&B failed: one warning line)."""
    info = tracking.track_job(cfg, job, resolved)
    if info is None:
        return False
    try:
        jobs.mark_tracked(job.out_dir, key, info)
    except OSError as exc:  # the run is logged; a rerun may log it once more
        log.warning("Could not record in %s that the job was tracked: %s", job.out_dir, exc)
    return True


@hydra.main(version_base="1.3", config_path="../conf", config_name="config")
def main(cfg: DictConfig) -> float | None:
    """Run one job; return the tuning objective (what an Optuna sweep optimises)."""
    import time
    from typing import NoReturn

    from probe_sweep import threads

    hydra_cfg = HydraConfig.get()
    out_dir = Path(hydra_cfg.runtime.output_dir)
    # In a multirun a failed job writes failed.json and returns, so the other jobs still run.
    multirun = hydra_cfg.mode is RunMode.MULTIRUN
    overrides = list(hydra_cfg.overrides.task)

    def stop_interrupted() -> NoReturn:
        """Ctrl-C: one line on what is kept and how to resume, then die of SIGINT as Python
        does for an uncaught KeyboardInterrupt (status 130 in a shell, and a shell loop around
        the command stops too), without the traceback."""
        fitted = len(list((out_dir / jobs.FITS).glob(f"*{jobs.FIT_SUFFIX}")))
        again = f"hydra.sweep.dir={hydra_cfg.sweep.dir}" if multirun else f"hydra.run.dir={out_dir}"
        log.warning(
            "Interrupted. Kept: the activation cache's complete entries and %s (%s). "
            "To resume, run the same command with %s",
            f"the {fitted} probe(s) fitted so far" if fitted else "no fitted probes yet",
            out_dir / jobs.FITS,
            again,
        )
        logging.shutdown()
        sys.stdout.flush()
        sys.stderr.flush()
        if os.name == "posix":
            signal.signal(signal.SIGINT, signal.SIG_DFL)
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(1)  # another thread may take the signal a moment later
        os._exit(130)

    try:
        # torch's and BLAS's threads: this job's share of the cores, not the whole machine.
        launcher = hydra_cfg.launcher
        sharing = threads.concurrent_jobs(
            launcher.get("_target_"),
            launcher.get("n_jobs"),
            Path(hydra_cfg.sweep.dir) / ".submitit",
            threads.available_cores(),
        )
        threads.configure_threads(sharing if multirun else None)
        progress_bars_on_terminal_only()
        config = to_typed(cfg)
        resolved = OmegaConf.to_container(cfg, resolve=True, enum_to_str=True)
        key = jobs.job_key(resolved, jobs.SCHEMA_VERSION)  # type: ignore[arg-type]
        sweep_dir = Path(hydra_cfg.sweep.dir)
        done = jobs.find_complete(sweep_dir, key) if multirun and not config.redo else None
        if done is not None:
            log.info("Skipped: complete results for this config in %s (redo=true reruns)", done)
            jobs.note_skipped(out_dir, done, key)
            if config.tracker.mode.value != "disabled" and not jobs.is_tracked(done, key):
                # Killed after metrics.json, before tracking: log the run from the files now.
                job = dataclasses.replace(tracking.JobInfo.from_hydra(hydra_cfg), out_dir=done)
                if track(config.tracker, job, resolved, key):  # type: ignore[arg-type]
                    log.info(
                        "Tracked the results in %s now: the job that wrote them had stopped "
                        "before the tracker logged them",
                        done,
                    )
            return tuning.objective(jobs.load_metrics(done)["layers"], config.tuning)
        jobs.clear_markers(out_dir, config.redo)
        with jobs.claim_gpu(config.device) as device:
            config.device = device
            reporter = tuning.trial_reporter(config.tuning)
            job_info = jobs.job_info(key, overrides)
            metrics = run_job(config, resolved, out_dir, job_info, reporter)  # type: ignore[arg-type]
        # After metrics.json is on disk; never raises (a W&B failure is one warning line).
        job = tracking.JobInfo.from_hydra(HydraConfig.get())
        track(config.tracker, job, resolved, key)  # type: ignore[arg-type]
        return tuning.objective(metrics["layers"], config.tuning)
    except KeyboardInterrupt:
        stop_interrupted()
    except UserError as exc:
        log.error("error: %s", exc)
        jobs.write_failed(out_dir, exc, overrides)
        if not multirun:
            sys.exit(2)
    except Exception as exc:
        # Ctrl-C inside a lazy import comes out wrapped (transformers raises ModuleNotFoundError).
        cause: BaseException | None = exc
        for _ in range(20):
            if cause is None or isinstance(cause, KeyboardInterrupt):
                break
            cause = cause.__cause__ or cause.__context__
        if isinstance(cause, KeyboardInterrupt):
            stop_interrupted()
        if tuning.is_pruned(exc):
            log.info("Trial pruned by the study: %s", exc)
            jobs.discard_fits(out_dir)  # a pruned trial is never run again
            job = tracking.JobInfo.from_hydra(HydraConfig.get())
            pruned = tuning.pruned_metrics(exc, resolved)  # type: ignore[arg-type]
            tracking.track_job(config.tracker, job, resolved, pruned)  # type: ignore[arg-type]
            raise  # the Optuna sweeper records the trial as pruned
        jobs.write_failed(out_dir, exc, overrides)
        if not multirun:
            raise
        log.exception("error: %s: %s", type(exc).__name__, exc)


if __name__ == "__main__":
    try:
        main()
    except KeyboardInterrupt:  # a multirun's parent (joblib, submitit), outside any job
        print(
            "Interrupted. Finished jobs are kept; run the same command with the same "
            "hydra.sweep.dir= to resume.",
            file=sys.stderr,
        )
        signal.signal(signal.SIGINT, signal.SIG_DFL)
        os.kill(os.getpid(), signal.SIGINT)
