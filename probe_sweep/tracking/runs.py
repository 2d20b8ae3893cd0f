"""The tracker: a finished job, read back from its files, as one Weights & Biases run; an Optuna
study's outcome as one more run beside its trials. (What a job's run holds is
``contents.py``; its mode, name and group, ``identity.py``.)

``track_job`` runs after ``metrics.json`` is on disk. It logs the job, with the PNGs the job
drew, as one W&B run and writes ``wandb_run.json`` (where the run went). It never raises: a
tracking failure is one log line, and the results on disk are untouched. The run's files go
under ``tracker.dir``, else ``$WANDB_DIR``, else the job's own output dir (a study's run: the
sweep dir), never the directory the user happened to start from.

This is the only module that imports ``wandb``, lazily and in one place (``_wandb``): a
disabled tracker never loads it, and tests put a recording fake there.
"""

from __future__ import annotations

import logging
import os
import shutil
from pathlib import Path
from typing import Any

import xxhash

from probe_sweep.files import write_json
from probe_sweep.jobs import jobdir
from probe_sweep.tracking.contents import log_contents
from probe_sweep.tracking.identity import (
    JobInfo,
    TrackerConfig,
    TrackerMode,
    resolve_mode,
    run_identity,
)

log = logging.getLogger("probe_sweep.tracking.runs")


def _wandb() -> Any:
    """The ``wandb`` module: imported here only, when a run is about to be logged."""
    import wandb

    return wandb


# --- a job's run, a study's run ---------------------------------------------------------------


def track_job(
    cfg: TrackerConfig,
    job: JobInfo,
    resolved: dict[str, Any],
    metrics: dict[str, Any] | None = None,
) -> dict[str, Any] | None:
    """Log a finished job (read from its files) as one W&B run; never raises.

    ``metrics``: logged instead of metrics.json (a pruned trial's record; tagged pruned).
    Returns what ``wandb_run.json`` records (run id, mode, where it lives), or None when the
    tracker is disabled, the job left no ``metrics.json``, or W&B failed (one warning line).
    """
    if metrics is None and not (job.out_dir / jobdir.METRICS).is_file():
        return None
    mode = resolve_mode(cfg)
    if mode == "disabled":
        return None
    try:
        if metrics is None:
            metrics = jobdir.read_metrics(job.out_dir).to_json()
        identity = run_identity(cfg, job, metrics, resolved)
        if "pruned" in metrics:
            identity["tags"].append("pruned")
        try:
            info = _log_run(cfg, job, metrics, resolved, identity, mode)
        except Exception as exc:
            if cfg.mode is not TrackerMode.auto or mode != "online":
                raise
            log.warning("W&B online run failed (%s); logging offline instead", _one_line(exc))
            mode = "offline"
            info = _log_run(cfg, job, metrics, resolved, identity, mode)
        write_json(job.out_dir / jobdir.WANDB_RUN, info)
    except Exception as exc:
        log.warning(
            "W&B tracking (%s) failed, results are complete in %s: %s",
            mode,
            job.out_dir,
            _one_line(exc),
        )
        return None
    if info["mode"] == "offline":
        log.info("W&B offline run %s; upload it with: wandb sync %s", info["id"], info["run_dir"])
    else:
        log.info("W&B run %s: %s", info["id"], info.get("url"))
    return info


def track_study(
    cfg: TrackerConfig, summary: dict[str, Any], images: list[Path], sweep_dir: Path
) -> None:
    """Log an Optuna study's outcome (best value and parameters, its plots) as one W&B run in
    the study's group, beside its trials, its files under the sweep dir; never raises."""
    mode = resolve_mode(cfg)
    if mode == "disabled":
        return
    try:
        wandb = _wandb()
        run = wandb.init(
            project=cfg.project,
            entity=cfg.entity,
            id=summary.get("wandb_run_id"),
            resume="allow" if summary.get("wandb_run_id") else None,
            group=summary["study"],
            job_type="study",
            name=f"study {summary['study']}",
            config=summary,
            dir=str(run_root(cfg, sweep_dir)),
            mode=mode,  # type: ignore[arg-type]
            reinit="finish_previous",
            settings=wandb.Settings(init_timeout=cfg.init_timeout, quiet=True, console="off"),
        )
        try:
            run.summary["best_value"] = summary["best_value"]
            for key, value in summary["best_params"].items():
                run.summary[f"best/{key}"] = value
            run.log({f"images/{p.stem}": wandb.Image(str(p)) for p in images if p.is_file()})
        finally:
            run.finish()
    except Exception as exc:
        log.warning("W&B study logging (%s) failed: %s", mode, _one_line(exc))


def run_root(cfg: TrackerConfig, default: Path) -> Path:
    """The directory wandb writes a run's files under (in its ``wandb/`` subdir), created:
    ``tracker.dir``, else ``$WANDB_DIR``, else ``default`` (the job's output dir, or the sweep
    dir for a study)."""
    root = Path(cfg.dir or os.environ.get("WANDB_DIR") or default)
    root.mkdir(parents=True, exist_ok=True)
    return root


def _one_line(exc: BaseException) -> str:
    text = " ".join(str(exc).split())
    return f"{type(exc).__name__}: {text[:300]}"


def _log_run(
    cfg: TrackerConfig,
    job: JobInfo,
    metrics: dict[str, Any],
    resolved: dict[str, Any],
    identity: dict[str, Any],
    mode: str,
) -> dict[str, Any]:
    """One run, started, filled and finished (exit code 1 if filling it failed); where it went."""
    wandb = _wandb()
    root = run_root(cfg, job.out_dir)
    run_id = job_run_id(job, identity)
    if mode == "offline":
        drop_earlier_offline_runs(root / "wandb", run_id, job.out_dir)
    run = wandb.init(
        project=cfg.project,
        entity=cfg.entity,
        id=run_id,
        resume="allow",
        group=identity["group"],
        job_type=identity["job_type"],
        tags=identity["tags"],
        name=identity["name"],
        config={**resolved, "job": _job_config(job, metrics, identity)},
        dir=str(root),
        mode=mode,  # type: ignore[arg-type]
        reinit="finish_previous",
        settings=wandb.Settings(init_timeout=cfg.init_timeout, quiet=True, console="off"),
    )
    ok = False
    try:
        log_contents(wandb, run, job.out_dir, metrics, identity, cfg.log_artifacts)
        ok = True
        info = {
            "id": run.id,
            "name": identity["name"],
            "group": identity["group"],
            "project": cfg.project,
            "entity": run.entity if mode == "online" else cfg.entity,
            "mode": mode,
            "url": run.url if mode == "online" else None,
            "run_dir": str(Path(run.dir).parent),
            "artifact": identity["artifact"] if cfg.log_artifacts else None,
        }
    finally:
        run.finish(exit_code=0 if ok else 1)
    return info


def job_run_id(job: JobInfo, identity: dict[str, Any]) -> str:
    """One W&B run per job: an id from the job dir and its config, the same on every rerun of
    the job (a rerun logs into the same run instead of beside it)."""
    where = str(job.out_dir.resolve())
    return xxhash.xxh3_64_hexdigest(f"{where}|{identity['config_hash']}".encode())


def drop_earlier_offline_runs(wandb_dir: Path, run_id: str, out_dir: Path) -> None:
    """Delete the offline run files an earlier attempt of this job left (finished, or killed
    while logging), and those of the run ``wandb_run.json`` names when the job dir's results
    were replaced since: ``wandb sync`` then uploads one run per job."""
    stale = list(wandb_dir.glob(f"offline-run-*-{run_id}"))
    try:
        earlier = jobdir.read_marker(out_dir / jobdir.WANDB_RUN)
        recorded = Path(earlier["run_dir"]) if earlier.get("mode") == "offline" else None
    except (OSError, ValueError, KeyError, TypeError):
        recorded = None
    if (
        recorded is not None
        and recorded.parent == wandb_dir
        and recorded.name.startswith("offline-run-")
    ):
        stale.append(recorded)
    for path in stale:
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path, ignore_errors=True)
            log.info("Removed the earlier offline W&B run of this job, %s", path)


def _job_config(job: JobInfo, metrics: dict[str, Any], identity: dict[str, Any]) -> dict[str, Any]:
    return {
        "out_dir": str(job.out_dir),
        "sweep_dir": str(job.sweep_dir) if job.sweep_dir else None,
        "num": job.num,
        "choices": job.choices,
        "overrides": job.overrides,
        "config_hash": identity["config_hash"],
        "model_info": metrics.get("model", {}),
        "probe_info": metrics.get("probe", {}),
    }
