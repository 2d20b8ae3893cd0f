"""The job's side of an Optuna study: the objective it returns and the pruning hook.

The sweeper (``hydra_plugins/probe_sweep_optuna``) asks the study for a trial and launches the
job with ``tuning.study``, ``tuning.storage``, ``tuning.trial_id`` and ``tuning.trial_number`` set.
The job reports each layer's validation score to that trial through the shared storage, so the
study's pruner can stop an unpromising trial part way through; the Hydra sweeper API alone cannot,
as it never hands the trial to the job.

Both sides open the storage with ``open_storage``: an RDB URL (``sqlite:///...``,
``postgresql://...``) or ``journal:<path>``, Optuna's journal file storage.
"""

from __future__ import annotations

import math
import re
import sys
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from probe_sweep.errors import UserError
from probe_sweep.results import LayerResult, ProbeScores

OBJECTIVES = ("val_nll", "val_top1", "nll", "top1", "top5")  # fields of ``ProbeScores``


@dataclass
class TuningConfig:
    """``objective``: a per-layer metric (``val_*`` = validation split, the honest choice for
    tuning; the test split stays untouched), averaged over the probed layers or taken at
    ``layer``. The study fields are set by the sweeper, not by hand: ``trial_id`` is the trial's
    id in the storage (unique across studies), ``trial_number`` its number in its study (what the
    log, ``trials.csv`` and the trial's directory name say)."""

    objective: str = "val_nll"
    layer: int | None = None
    study: str | None = None
    storage: str | None = None
    trial_id: int | None = None
    trial_number: int | None = None


JOURNAL = "journal:"


def open_storage(url: str) -> Any:
    """An Optuna storage from what ``tuning.storage`` holds: ``journal:<path>`` is a
    ``JournalStorage`` on a file (safe for several processes and nodes on a shared filesystem),
    anything else an RDB URL (Optuna opens it)."""
    if url.startswith(JOURNAL):
        from optuna.storages import JournalStorage
        from optuna.storages.journal import JournalFileBackend

        return JournalStorage(JournalFileBackend(url[len(JOURNAL) :]))
    return url


PRUNER_ATTR = "pruner"  # the study's user attribute holding the sweeper's pruner settings


def make_pruner(settings: dict[str, Any] | None) -> Any:
    """The pruner the sweeper is configured with (``hydra.sweeper.pruner``): ``median`` with its
    start-up trials and warm-up steps, or ``none``. The sweeper stores these settings in the
    study so that each job's trial asks the same pruner, not Optuna's default."""
    import optuna

    settings = settings or {"kind": "none"}
    if settings["kind"] == "median":
        return optuna.pruners.MedianPruner(
            n_startup_trials=int(settings["n_startup_trials"]),
            n_warmup_steps=int(settings["n_warmup_steps"]),
        )
    if settings["kind"] == "none":
        return optuna.pruners.NopPruner()
    raise UserError(f"pruner kind {settings['kind']!r}: use median or none")


def quote_override(value: str) -> str:
    """``value`` as a single-quoted value of Hydra's override grammar that reads back exactly:
    backslashes before a quote or at the end doubled, quotes escaped, and ``${`` escaped so
    that OmegaConf does not take a path for an interpolation."""
    value = re.sub(r"(\\*)\$\{", lambda m: m.group(1) * 2 + "\\${", value)
    value = re.sub(r"(\\*)'", lambda m: m.group(1) * 2 + "\\'", value)
    value = re.sub(r"(\\+)$", lambda m: m.group(1) * 2, value)
    return f"'{value}'"


def check_objective(cfg: TuningConfig) -> None:
    if cfg.objective not in OBJECTIVES:
        raise UserError(
            f"tuning.objective={cfg.objective!r} is not a per-layer metric; use one of "
            f"{', '.join(OBJECTIVES)}"
        )


def objective(scores: list[ProbeScores], cfg: TuningConfig) -> float:
    """The scalar a study optimises, from a job's per-layer scores."""
    if cfg.layer is not None:
        scores = [s for s in scores if s.layer == cfg.layer]
        if not scores:
            raise UserError(f"tuning.layer={cfg.layer} was not probed; add it to the layers")
    values = [float(getattr(s, cfg.objective)) for s in scores]
    return math.fsum(values) / len(values)


def trial_reporter(cfg: TuningConfig) -> Callable[[int, ProbeScores], None] | None:
    """A per-layer callback that reports to the study's trial and stops the job (by raising
    ``optuna.TrialPruned``) when the pruner says so; None outside a study."""
    if cfg.trial_id is None:
        return None
    import optuna

    assert cfg.storage is not None, "the sweeper sets tuning.storage with tuning.trial_id"
    storage = open_storage(cfg.storage)
    study = optuna.load_study(study_name=cfg.study, storage=storage)
    study.pruner = make_pruner(study.user_attrs.get(PRUNER_ATTR))
    trial = optuna.trial.Trial(study, cfg.trial_id)
    reported: list[dict[str, Any]] = []

    def report(step: int, scores: ProbeScores) -> None:
        reported.append(LayerResult(scores).row())
        if cfg.layer is not None and scores.layer != cfg.layer:
            return
        trial.report(float(getattr(scores, cfg.objective)), step)
        if trial.should_prune():
            pruned = optuna.TrialPruned(f"pruned after layer {scores.layer}")
            pruned.rows = list(reported)  # type: ignore[attr-defined]
            raise pruned

    return report


def pruned_rows(exc: BaseException) -> list[dict[str, Any]]:
    """The per-layer rows a pruned job had scored before its study stopped it."""
    return list(getattr(exc, "rows", []))


def pruned_metrics(exc: BaseException, resolved: dict[str, Any]) -> dict[str, Any]:
    """What the tracker logs for a pruned trial (a W&B run like any trial's, tagged pruned):
    the layers it scored before its study stopped it, and the model and probe as configured
    (``resolved``: the job's resolved config)."""

    def get(dotted: str) -> Any:
        node: Any = resolved
        for part in dotted.split("."):
            node = node.get(part) if isinstance(node, dict) else None
        return node

    return {
        "model": {"name": get("model.name")},
        "probe": {
            "kind": get("probe.kind"),
            "layers": get("layers.mode"),
            "basis": get("basis.kind"),
            "reg": get("reg.kind"),
            "strength": get("reg.strength"),
        },
        "layers": pruned_rows(exc),
        "pruned": str(exc),
    }


def is_pruned(exc: BaseException) -> bool:
    """Whether ``exc`` is Optuna's "stop this trial" (without importing Optuna for other jobs)."""
    optuna = sys.modules.get("optuna")
    return optuna is not None and isinstance(exc, optuna.TrialPruned)
