"""The job's side of an Optuna study: the objective it returns and the pruning hook.

The sweeper (``hydra_plugins/probe_sweep_optuna``) asks the study for a trial and launches the
job with ``tuning.study``, ``tuning.storage`` and ``tuning.trial_id`` set. The job reports each
layer's validation score to that trial through the shared storage, so the study's pruner can stop
an unpromising trial part way through; the Hydra sweeper API alone cannot, as it never hands the
trial to the job.
"""

from __future__ import annotations

import math
import sys
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from probe_sweep.errors import UserError

OBJECTIVES = ("val_nll", "val_top1", "nll", "top1", "top5")


@dataclass
class TuningConfig:
    """``objective``: a per-layer metric (``val_*`` = validation split, the honest choice for
    tuning; the test split stays untouched), averaged over the probed layers or taken at
    ``layer``. The study fields are set by the sweeper, not by hand."""

    objective: str = "val_nll"
    layer: int | None = None
    study: str | None = None
    storage: str | None = None
    trial_id: int | None = None


def check_objective(cfg: TuningConfig) -> None:
    if cfg.objective not in OBJECTIVES:
        raise UserError(
            f"tuning.objective={cfg.objective!r} is not a per-layer metric; use one of "
            f"{', '.join(OBJECTIVES)}"
        )


def objective(rows: list[dict[str, Any]], cfg: TuningConfig) -> float:
    """The scalar a study optimises, from a job's per-layer rows."""
    if cfg.layer is not None:
        rows = [r for r in rows if r["layer"] == cfg.layer]
        if not rows:
            raise UserError(f"tuning.layer={cfg.layer} was not probed; add it to the layers")
    values = [float(r[cfg.objective]) for r in rows]
    return math.fsum(values) / len(values)


def trial_reporter(cfg: TuningConfig) -> Callable[[int, dict[str, Any]], None] | None:
    """A per-layer callback that reports to the study's trial and stops the job (by raising
    ``optuna.TrialPruned``) when the pruner says so; None outside a study."""
    if cfg.trial_id is None:
        return None
    import optuna

    study = optuna.load_study(study_name=cfg.study, storage=cfg.storage)
    trial = optuna.trial.Trial(study, cfg.trial_id)

    def report(step: int, row: dict[str, Any]) -> None:
        if cfg.layer is not None and row["layer"] != cfg.layer:
            return
        trial.report(float(row[cfg.objective]), step)
        if trial.should_prune():
            raise optuna.TrialPruned(f"pruned after layer {row['layer']}")

    return report


def is_pruned(exc: BaseException) -> bool:
    """Whether ``exc`` is Optuna's "stop this trial" (without importing Optuna for other jobs)."""
    optuna = sys.modules.get("optuna")
    return optuna is not None and isinstance(exc, optuna.TrialPruned)
