"""The tracker: a finished job, read back from its files, as one Weights & Biases run; an Optuna
study's outcome as one more run beside its trials. (What a job's run holds is
``tracking_contents``.)

``track_job`` runs after ``metrics.json`` is on disk. It draws the probe weights
(``probe_weights.png``, ``probe_weight_mass.png``), logs the job as one W&B run and writes
``wandb_run.json`` (where the run went). It never raises: a tracking failure is one log line,
and the results on disk are untouched. The run's files go under ``tracker.dir``, else
``$WANDB_DIR``, else the job's own output dir (a study's run: the sweep dir), never the
directory the user happened to start from.

This is the only module that imports ``wandb``, lazily and in one place (``_wandb``): a
disabled tracker never loads it, and tests put a recording fake there.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import shutil
from dataclasses import dataclass, field
from enum import Enum
from pathlib import Path
from typing import Any

import xxhash

from probe_sweep.files import write_json
from probe_sweep.jobs import jobdir
from probe_sweep.jobs.jobdir import keyed_content
from probe_sweep.report.plots import plot_probe_weights
from probe_sweep.tracking.contents import log_contents

log = logging.getLogger("probe_sweep.tracking.runs")


def _wandb() -> Any:
    """The ``wandb`` module: imported here only, when a run is about to be logged."""
    import wandb

    return wandb


class TrackerMode(Enum):
    auto = "auto"
    online = "online"
    offline = "offline"
    disabled = "disabled"


@dataclass
class TrackerConfig:
    """One W&B run per job. ``mode=auto``: online when an API key is configured (WANDB_API_KEY,
    ``wandb login``'s netrc entry) and WANDB_MODE does not say otherwise, else offline.
    ``group``/``job_type``/``name``: null = derived from the sweep dir and the chosen options.
    ``dir``: where wandb writes its run dirs (null = WANDB_DIR, else the job's output dir).
    ``init_timeout``: seconds before a run that cannot start is given up (and, under auto,
    replaced by an offline run)."""

    mode: TrackerMode = TrackerMode.auto
    project: str = "probe_sweep"
    entity: str | None = None
    tags: list[str] = field(default_factory=list)
    group: str | None = None
    job_type: str | None = None
    name: str | None = None
    dir: str | None = None
    init_timeout: float = 30.0
    log_artifacts: bool = True


@dataclass
class JobInfo:
    """What the tracker needs to know about the Hydra job, as plain values."""

    out_dir: Path
    choices: dict[str, str] = field(default_factory=dict)
    overrides: list[str] = field(default_factory=list)
    sweep_dir: Path | None = None
    num: int | None = None

    @classmethod
    def from_hydra(cls, hydra_cfg: Any) -> JobInfo:
        """From ``HydraConfig.get()``: in a multirun the job dir's parent is the sweep dir."""
        out_dir = Path(hydra_cfg.runtime.output_dir)
        multirun = str(getattr(hydra_cfg.mode, "name", hydra_cfg.mode)) == "MULTIRUN"
        num = hydra_cfg.job.get("num") if multirun else None
        return cls(
            out_dir=out_dir,
            choices={str(k): str(v) for k, v in hydra_cfg.runtime.choices.items() if v},
            overrides=[str(o) for o in hydra_cfg.overrides.task],
            sweep_dir=out_dir.parent if multirun else None,
            num=int(num) if num is not None else None,
        )


# --- the mode, and what a run is called ----------------------------------------------------


def api_key_configured() -> bool:
    """Whether wandb would find credentials (env var or netrc) without asking or any network."""
    if os.environ.get("WANDB_API_KEY") or os.environ.get("WANDB_IDENTITY_TOKEN_FILE"):
        return True
    try:
        from wandb.sdk.lib.wbauth import wbnetrc

        host = os.environ.get("WANDB_BASE_URL") or "https://api.wandb.ai"
        return bool(wbnetrc.read_netrc_auth(host=host))
    except Exception:  # an unreadable netrc or a moved private helper: no key
        return False


def resolve_mode(cfg: TrackerConfig) -> str:
    """``online``, ``offline`` or ``disabled``; ``auto`` defers to WANDB_MODE, then to the key."""
    if cfg.mode is not TrackerMode.auto:
        return cfg.mode.value
    env = os.environ.get("WANDB_MODE", "").strip().lower()
    if env in ("offline", "dryrun"):
        return "offline"
    if env == "disabled":
        return "disabled"
    if env in ("online", "run"):
        return "online"
    return "online" if api_key_configured() else "offline"


def _slug(text: str, limit: int = 96) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "-", text).strip("-.")[:limit] or "job"


def config_hash(resolved: dict[str, Any]) -> str:
    """Eight hex digits of the config, less what does not change the numbers."""
    text = json.dumps(keyed_content(resolved), sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:8]


GROUP_TAGS = ("model", "probe", "layers", "basis", "reg", "data")


def run_identity(
    cfg: TrackerConfig, job: JobInfo, metrics: dict[str, Any], resolved: dict[str, Any]
) -> dict[str, Any]:
    """group (the sweep), job_type, tags (chosen options), a readable name, the artifact name."""
    probe = metrics.get("probe", {})
    model = metrics.get("model", {}).get("name", "model")
    group = cfg.group
    if group is None and job.sweep_dir is not None:
        sweep = job.sweep_dir.resolve()
        try:
            group = sweep.relative_to(Path.cwd().resolve()).as_posix()
        except ValueError:
            group = "/".join(sweep.parts[-3:])
    chosen = dict(job.choices)
    for key, value in (("probe", probe.get("kind")), ("layers", probe.get("layers"))):
        chosen.setdefault(key, value)
    chosen.setdefault("basis", probe.get("basis"))
    tags = [f"{g}:{chosen[g]}" for g in GROUP_TAGS if chosen.get(g)]
    tags += [t for t in cfg.tags if t not in tags]
    name = cfg.name or (
        f"{probe.get('basis')} · {probe.get('kind')}/{probe.get('layers')} · "
        f"{probe.get('reg')}={probe.get('strength', 0):g} · {model}"
    )
    if cfg.name is None and job.num is not None:
        name = f"#{job.num} {name}"
    digest = config_hash(resolved)
    artifact = _slug(
        f"probes-{model}-{probe.get('kind')}-{probe.get('layers')}-{probe.get('basis')}-{digest}"
    )
    return {
        "group": group,
        "job_type": cfg.job_type or f"{probe.get('kind')}-{probe.get('layers')}",
        "tags": [t[:64] for t in tags],
        "name": name,
        "artifact": artifact,
        "config_hash": digest,
    }


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
    metrics_path = job.out_dir / jobdir.METRICS
    tensors_path = job.out_dir / jobdir.PROBES
    if metrics is None and not metrics_path.is_file():
        return None
    if tensors_path.is_file():
        try:
            plot_probe_weights(tensors_path, job.out_dir)
        except Exception as exc:  # derived images: never worth failing a finished job
            log.warning("Could not draw the probe weights: %s", _one_line(exc))
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
