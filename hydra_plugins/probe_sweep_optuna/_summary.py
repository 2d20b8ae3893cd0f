"""The files a finished (or resumed) study leaves in ``<sweep dir>/<study>/``: ``trials.csv``,
``best.json``, ``objective_by_param.png``, and ``<sweep dir>/tuned/tuned/<study>.yaml``."""

from __future__ import annotations

import csv
import json
import logging
from pathlib import Path
from typing import Any

import optuna
from hydra.core.utils import JobReturn, JobStatus
from omegaconf import OmegaConf
from optuna.trial import TrialState

from probe_sweep.jobs.jobdir import InvalidMetrics, read_metrics
from probe_sweep.report.plots import plt, save_figure

log = logging.getLogger(__name__)


def ridge_path_of(results: list[JobReturn]) -> dict[str, list[float]] | None:
    """The ridge regularisation path that a ``probe=ridge`` trial scored (same data for all)."""
    for result in results:
        if result.status is not JobStatus.COMPLETED or result.hydra_cfg is None:
            continue
        try:
            metrics = read_metrics(Path(result.hydra_cfg.hydra.runtime.output_dir))
        except (OSError, InvalidMetrics):
            continue
        if metrics.ridge_path:
            return metrics.ridge_path
    return None


def write_summary(
    study: optuna.Study,
    out: Path,
    ridge_path: dict[str, list[float]] | None = None,
    extra: dict[str, Any] | None = None,
) -> dict[str, Any] | None:
    """``trials.csv``, ``best.json`` (with ``extra``), a plot of each parameter against the
    objective, and ``tuned/<study>.yaml``: the best parameters as a config the next sweep can
    load."""
    out.mkdir(parents=True, exist_ok=True)
    trials = study.get_trials(deepcopy=False)
    names = sorted({k for t in trials for k in t.params})
    with open(out / "trials.csv", "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["number", "state", "value", *names])
        for t in trials:
            writer.writerow([t.number, t.state.name, t.value, *(t.params.get(n) for n in names)])
    complete = [t for t in trials if t.state is TrialState.COMPLETE]
    if not complete:
        log.warning("Study %s has no complete trial", study.study_name)
        return None
    best = study.best_trial
    summary = {
        "study": study.study_name,
        "direction": study.direction.name.lower(),
        "best_value": best.value,
        "best_params": best.params,
        "best_trial": best.number,
        "n_complete": len(complete),
        "n_pruned": sum(t.state is TrialState.PRUNED for t in trials),
        "n_failed": sum(t.state is TrialState.FAIL for t in trials),
    }
    if ridge_path is not None:
        at = min(range(len(ridge_path["val_nll"])), key=ridge_path["val_nll"].__getitem__)
        summary["ridge_path_best"] = {
            "reg.strength": ridge_path["strengths"][at],
            "value": ridge_path["val_nll"][at],
        }
    summary.update(extra or {})
    (out / "best.json").write_text(json.dumps(summary, indent=2))
    tuned = out.parent / "tuned" / "tuned"
    tuned.mkdir(parents=True, exist_ok=True)
    nested = OmegaConf.from_dotlist([f"{k}={v}" for k, v in best.params.items()])
    (tuned / f"{study.study_name}.yaml").write_text(
        f"# @package _global_\n# best of study {study.study_name}: value {best.value:.6g}, "
        f"trial {best.number}\n{OmegaConf.to_yaml(nested)}"
    )
    plot_study(study, out / "objective_by_param.png", ridge_path)
    log.info(
        "Study %s: best %s = %.6g at %s (%d complete, %d pruned); config in %s",
        study.study_name,
        summary["direction"],
        best.value,
        best.params,
        summary["n_complete"],
        summary["n_pruned"],
        tuned / f"{study.study_name}.yaml",
    )
    return summary


def plot_study(
    study: optuna.Study, path: Path, ridge_path: dict[str, list[float]] | None = None
) -> None:
    trials = study.get_trials(deepcopy=False)
    names = sorted({k for t in trials for k in t.params})
    fig, axes = plt.subplots(1, len(names), figsize=(5.5 * len(names), 4), squeeze=False)
    for ax, name in zip(axes[0], names, strict=True):
        values = []
        for state, style in ((TrialState.COMPLETE, "o"), (TrialState.PRUNED, "x")):
            points = [
                (
                    t.params[name],
                    t.value
                    if t.value is not None
                    else t.intermediate_values.get(max(t.intermediate_values, default=0)),
                )
                for t in trials
                if t.state is state and name in t.params
            ]
            points = [(x, y) for x, y in points if y is not None]
            if points:
                ax.plot(*zip(*points, strict=True), style, label=state.name.lower())
                values += [y for _, y in points]
        if ridge_path is not None and name == "reg.strength":
            ax.plot(
                ridge_path["strengths"],
                ridge_path["val_nll"],
                "-",
                color="grey",
                label="ridge path (one decomposition)",
                zorder=0,
            )
        best = study.best_trial
        ax.plot(best.params[name], best.value, "*", markersize=14, color="gold", label="best")
        distribution = next(t.distributions[name] for t in trials if name in t.distributions)
        if getattr(distribution, "log", False):
            ax.set_xscale("log")
        if values and min(values) > 0 and max(values) > 10 * min(values):
            ax.set_yscale("log")  # a pruned trial's loss would flatten the rest
        ax.set_xlabel(name)
        ax.set_ylabel("objective (pruned: last reported)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle(f"study {study.study_name}", fontsize=10)
    fig.tight_layout()
    save_figure(fig, path)
