"""A sweep's jobs as its directory holds them: each job dir with its status and what it left
behind (``jobdir.py`` names the files): ``metrics.json`` (finished), ``failed.json`` (failed:
error, type, overrides), ``skipped.json`` (skipped: complete results already elsewhere in the
sweep), ``pruned.json`` (pruned: an Optuna trial its study stopped), none of them (incomplete:
killed or still running), plus ``wandb_run.json`` when the tracker logged the job."""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from probe_sweep.jobs.jobdir import (
    FAILED,
    METRICS,
    PRUNED,
    SKIPPED,
    WANDB_RUN,
    InvalidMetrics,
    read_marker,
    read_metrics,
)

log = logging.getLogger("probe_sweep.report.sweep")


@dataclass
class JobResult:
    """One job dir of a sweep: its status, overrides and files (metrics checked, or None)."""

    dir: Path
    num: int | None
    status: str  # finished | failed | skipped | pruned | incomplete
    overrides: list[str] = field(default_factory=list)
    metrics: dict[str, Any] | None = None
    failure: dict[str, Any] | None = None
    skipped: dict[str, Any] | None = None
    wandb: dict[str, Any] | None = None
    label: str = ""


def _read_json(path: Path) -> dict[str, Any] | None:
    try:
        value = read_marker(path)
    except (OSError, ValueError):
        return None
    return value if isinstance(value, dict) else None


def _read_metrics(job_dir: Path) -> dict[str, Any] | None:
    """A job's checked metrics.json, or None (absent; or invalid, with one warning line)."""
    try:
        return read_metrics(job_dir).to_json()
    except FileNotFoundError:
        return None
    except (OSError, InvalidMetrics) as exc:
        log.warning("Ignored %s: %s", job_dir / METRICS, exc)
        return None


def _job_dirs(sweep_dir: Path) -> list[Path]:
    found: set[Path] = set()
    for pattern in (".hydra", METRICS, FAILED, SKIPPED, PRUNED):
        for path in sweep_dir.rglob(pattern):
            rel = path.parent.relative_to(sweep_dir).parts
            if any(part == "wandb" or part.startswith(".") for part in rel):
                continue
            if path.parent != sweep_dir:
                found.add(path.parent)
    return sorted(found)


def _natural(path: Path) -> list[tuple[int, int | str]]:
    """Sort key reading runs of digits as numbers: trial_2 before trial_10."""
    return [(0, int(p)) if p.isdigit() else (1, p) for p in re.split(r"(\d+)", path.as_posix())]


def _num(job_dir: Path) -> int | None:
    match = re.match(r"(\d+)(_|$)", job_dir.name)
    return int(match.group(1)) if match else None


def read_jobs(sweep_dir: Path) -> list[JobResult]:
    """Every job dir under ``sweep_dir``, in job-number order, with what it left behind."""
    jobs = []
    for job_dir in _job_dirs(sweep_dir):
        metrics = _read_metrics(job_dir)
        failure = _read_json(job_dir / FAILED)
        skipped = _read_json(job_dir / SKIPPED)
        status = (
            "finished"
            if metrics
            else "failed"
            if failure is not None
            else "skipped"
            if skipped is not None
            else "pruned"
            if (job_dir / PRUNED).is_file()
            else "incomplete"
        )
        overrides: list[str] = []
        try:
            loaded = yaml.safe_load((job_dir / ".hydra" / "overrides.yaml").read_text())
            overrides = [str(o) for o in loaded or []]
        except (OSError, yaml.YAMLError):
            overrides = [str(o) for o in (failure or {}).get("overrides") or []]
        jobs.append(
            JobResult(
                dir=job_dir,
                num=_num(job_dir),
                status=status,
                overrides=overrides,
                metrics=metrics,
                failure=failure,
                skipped=skipped,
                wandb=_read_json(job_dir / WANDB_RUN),
            )
        )
    jobs.sort(key=lambda j: (j.num is None, j.num if j.num is not None else 0, _natural(j.dir)))
    _label(jobs)
    return jobs


def _label(jobs: list[JobResult]) -> None:
    """Label each job by the overrides that differ between the jobs of the sweep."""
    parsed = [dict(o.split("=", 1) if "=" in o else (o, "") for o in j.overrides) for j in jobs]
    keys = sorted({k for p in parsed for k in p})
    varying = [k for k in keys if len({p.get(k) for p in parsed}) > 1]
    for job, values in zip(jobs, parsed, strict=True):
        parts = [f"{k}={values[k]}" for k in varying if k in values]
        text = ", ".join(parts) or job.dir.name
        job.label = f"#{job.num} {text}" if job.num is not None else text
