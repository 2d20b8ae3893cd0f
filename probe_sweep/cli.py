"""The Hydra entry (``python -m probe_sweep [-m] group=option key=value ...``, see __main__.py).

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
import tempfile
from pathlib import Path
from typing import Any, NoReturn

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.experimental.callback import Callback
from hydra.types import RunMode
from omegaconf import DictConfig, OmegaConf

from probe_sweep import fingerprints, threads, tuning
from probe_sweep.config import CONF, Config, register_schema, to_typed
from probe_sweep.errors import UserError
from probe_sweep.extraction.data import CorpusSource
from probe_sweep.extraction.model import resolve_location
from probe_sweep.interrupt import die_of_sigint
from probe_sweep.jobs import jobdir, scheduler
from probe_sweep.pipeline import run_job
from probe_sweep.tracking import runs as tracking
from probe_sweep.tracking.identity import JobInfo, TrackerConfig

log = logging.getLogger("probe_sweep")


register_schema()
scheduler.prepare_launchers()


def progress_bars_on_terminal_only() -> None:
    """Off a terminal (a SLURM or CI log, a pipe) every redraw of a progress bar is a line of
    its own: turn off the bars of transformers and huggingface_hub (weight loading, downloads)
    there. Ours choose for themselves (``progress.ExtractionProgress``, tqdm's
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


def track(cfg: TrackerConfig, job: JobInfo, resolved: dict[str, Any], key: str) -> bool:
    """Log a finished job's results with the tracker and mark its dir tracked; never raises.
    False when nothing was logged (tracker disabled, or W&B failed: one warning line)."""
    info = tracking.track_job(cfg, job, resolved)
    if info is None:
        return False
    try:
        jobdir.mark_tracked(job.out_dir, key, info)
    except OSError as exc:  # the run is logged; a rerun may log it once more
        log.warning("Could not record in %s that the job was tracked: %s", job.out_dir, exc)
    return True


def share_cores(hydra_cfg: DictConfig, multirun: bool) -> None:
    """torch's and BLAS's threads: this job's share of the cores, not the whole machine."""
    launcher = hydra_cfg.launcher
    sharing = threads.concurrent_jobs(
        launcher.get("_target_"),
        launcher.get("n_jobs"),
        Path(hydra_cfg.sweep.dir) / ".submitit",
        threads.available_cores(),
    )
    threads.configure_threads(sharing if multirun else None)


def skip_finished(
    config: Config, hydra_cfg: DictConfig, resolved: dict[str, Any], key: str, done: Path
) -> float | None:
    """A resumed sweep's job whose results exist in ``done``: note it, track the results if the
    job that wrote them was killed before its tracker ran, and return their objective."""
    out_dir = Path(hydra_cfg.runtime.output_dir)
    log.info("Skipped: complete results for this config in %s (redo=true reruns)", done)
    jobdir.discard_fits(done)  # left by a kill between its metrics.json and their removal
    jobdir.note_skipped(out_dir, done, key)
    if config.tracker.mode.value != "disabled" and not jobdir.is_tracked(done, key):
        job = dataclasses.replace(JobInfo.from_hydra(hydra_cfg), out_dir=done)
        if track(config.tracker, job, resolved, key):
            log.info(
                "Tracked the results in %s now: the job that wrote them had stopped before the "
                "tracker logged them",
                done,
            )
    layers = jobdir.read_metrics(done).layers
    return tuning.objective([layer.scores for layer in layers], config.tuning)


def run_and_track(
    config: Config, hydra_cfg: DictConfig, resolved: dict[str, Any], key: str
) -> float | None:
    """Run the job on its own GPU (if several), then hand its results to the tracker."""
    out_dir = Path(hydra_cfg.runtime.output_dir)
    jobdir.clear_markers(out_dir, config.redo)
    with scheduler.claim_gpu(config.device) as device:
        config.device = device
        reporter = tuning.trial_reporter(config.tuning)
        record = scheduler.scheduler_record(key, list(hydra_cfg.overrides.task))
        metrics = run_job(config, resolved, out_dir, record, reporter)
    # After metrics.json is on disk; never raises (a W&B failure is one warning line).
    track(config.tracker, JobInfo.from_hydra(hydra_cfg), resolved, key)
    return tuning.objective([layer.scores for layer in metrics.layers], config.tuning)


def stop_interrupted(hydra_cfg: DictConfig, multirun: bool) -> NoReturn:
    """Ctrl-C: one line on what is kept and how to resume, then die of SIGINT as Python does for
    an uncaught KeyboardInterrupt (status 130 in a shell, and a shell loop around the command
    stops too), without the traceback."""
    out_dir = Path(hydra_cfg.runtime.output_dir)
    fitted, part_way = jobdir.count_fits(out_dir), jobdir.count_kept_iterates(out_dir)
    again = f"hydra.sweep.dir={hydra_cfg.sweep.dir}" if multirun else f"hydra.run.dir={out_dir}"
    log.warning(
        "Interrupted. Kept: the activation cache's complete entries and %s%s (%s). "
        "To resume, run the same command with %s",
        f"the {fitted} probe(s) fitted so far" if fitted else "no fitted probes yet",
        f", and the last iterate of {part_way} fit(s) left part-way" if part_way else "",
        out_dir / jobdir.FITS,
        again,
    )
    logging.shutdown()
    die_of_sigint()


def record_failure(out_dir: Path, exc: BaseException, overrides: list[str]) -> None:
    """failed.json for the sweep report; where it cannot be written (the full or read-only
    disk that failed the job) the error line already said what happened."""
    try:
        jobdir.write_failed(out_dir, exc, overrides)
    except (OSError, UserError) as failure:
        log.debug("Could not write %s: %s", out_dir / jobdir.FAILED, failure)


def caused_by_interrupt(exc: BaseException) -> bool:
    """Ctrl-C inside a lazy import comes out wrapped (transformers raises ModuleNotFoundError)."""
    cause: BaseException | None = exc
    for _ in range(20):
        if cause is None or isinstance(cause, KeyboardInterrupt):
            break
        cause = cause.__cause__ or cause.__context__
    return isinstance(cause, KeyboardInterrupt)


def input_digests(config: Config) -> dict[str, str]:
    """Digests of the local model dir and text files the job reads, for its content key (files
    that do not exist are left to the data stage's error)."""
    model_dir = resolve_location(config.model.path) if config.model.path else None
    files = list(config.data.paths) if config.data.source is CorpusSource.text_files else []
    existing = [p for p in files if Path(p).expanduser().is_file()]
    return fingerprints.job_inputs(model_dir, existing)


@hydra.main(version_base="1.3", config_path=str(CONF), config_name="config")
def main(cfg: DictConfig) -> float | None:
    """Run one job; return the tuning objective (what an Optuna sweep optimises). In a multirun
    a failed job writes failed.json and returns, so the other jobs still run."""
    hydra_cfg = HydraConfig.get()
    out_dir = Path(hydra_cfg.runtime.output_dir)
    multirun = hydra_cfg.mode is RunMode.MULTIRUN
    overrides = list(hydra_cfg.overrides.task)
    try:
        share_cores(hydra_cfg, multirun)
        progress_bars_on_terminal_only()
        config = to_typed(cfg)
        resolved: dict[str, Any] = OmegaConf.to_container(cfg, resolve=True, enum_to_str=True)  # type: ignore[assignment]
        key = jobdir.job_key(resolved, inputs=input_digests(config))
        done = None
        if multirun and not config.redo:
            done = jobdir.find_complete(Path(hydra_cfg.sweep.dir), key)
        if done is not None:
            return skip_finished(config, hydra_cfg, resolved, key, done)
        return run_and_track(config, hydra_cfg, resolved, key)
    except KeyboardInterrupt:
        stop_interrupted(hydra_cfg, multirun)
    except UserError as exc:
        log.error("error: %s", exc)
        record_failure(out_dir, exc, overrides)
        if not multirun:
            sys.exit(2)
    except Exception as exc:
        if caused_by_interrupt(exc):
            stop_interrupted(hydra_cfg, multirun)
        if tuning.is_pruned(exc):
            log.info("Trial pruned by the study: %s", exc)
            jobdir.discard_fits(out_dir)  # a pruned trial is never run again
            job = JobInfo.from_hydra(hydra_cfg)
            tracking.track_job(config.tracker, job, resolved, tuning.pruned_metrics(exc, resolved))
            raise  # the Optuna sweeper records the trial as pruned
        record_failure(out_dir, exc, overrides)
        if not multirun:
            raise
        log.exception("error: %s: %s", type(exc).__name__, exc)
    return None


# Hydra flags that print something and run no job (so create no job dir).
NO_JOB_FLAGS = ("-h", "--help", "--hydra-help", "-c", "--cfg", "-i", "--info", "-sc")


def check_output_dir(argv: list[str]) -> None:
    """Hydra creates the job (or sweep) dir and writes its config there before any code of ours
    runs, and one it cannot write ends in Hydra's traceback: try it first, and say it in one
    line (exit 2)."""
    if any(arg in NO_JOB_FLAGS or arg.startswith("--shell-completion") for arg in argv):
        return
    multirun = any(arg in ("-m", "--multirun") for arg in argv)
    setting = "hydra.sweep.dir" if multirun else "hydra.run.dir"
    given = [arg.split("=", 1)[1] for arg in argv if arg.lstrip("+").startswith(f"{setting}=")]
    target = Path(given[-1].split("${")[0] if given else ("multirun" if multirun else "outputs"))
    existing = target
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    try:
        tempfile.TemporaryFile(dir=existing).close()
    except OSError as exc:
        reason = exc.strerror or type(exc).__name__
        print(
            f"error: cannot write the job dir {target}: {reason} ({existing}); choose a "
            f"writable one with {setting}=<dir>, or fix the permissions",
            file=sys.stderr,
        )
        sys.exit(2)


PENDING_INTERRUPT = []  # a Ctrl-C that arrived while Hydra composed the config


def defer_interrupts() -> None:
    """Until Hydra has composed the config, Ctrl-C is only recorded: raised inside OmegaConf, a
    KeyboardInterrupt comes out as a config error (and a traceback-like message)."""
    signal.signal(signal.SIGINT, lambda signum, frame: PENDING_INTERRUPT.append(signum))


def release_interrupts() -> None:
    """Ctrl-C is Python's KeyboardInterrupt again; one pressed meanwhile is raised now."""
    signal.signal(signal.SIGINT, signal.default_int_handler)
    if PENDING_INTERRUPT:
        raise KeyboardInterrupt


class ConfigComposed(Callback):
    """Hydra calls this once the config is composed, before any job: deferred Ctrl-C is
    released (conf/config.yaml, ``hydra.callbacks``)."""

    def on_run_start(self, config: DictConfig, **kwargs: Any) -> None:
        release_interrupts()

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        release_interrupts()


def run() -> None:
    """``python -m probe_sweep``: the job dir checked, Hydra's main, and Ctrl-C outside any job
    (while Hydra composes the config, or in a multirun's parent: joblib, submitit) as one line
    and SIGINT."""
    check_output_dir(sys.argv[1:])
    defer_interrupts()
    try:
        main()
        release_interrupts()  # --help, --cfg: no run started
    except KeyboardInterrupt:
        multirun = any(arg in ("-m", "--multirun") for arg in sys.argv[1:])
        again = "hydra.sweep.dir=" if multirun else "hydra.run.dir="
        kept = "Finished jobs are kept; run" if multirun else "Run"
        print(
            f"Interrupted. {kept} the same command with the same {again} to resume.",
            file=sys.stderr,
        )
        die_of_sigint()
