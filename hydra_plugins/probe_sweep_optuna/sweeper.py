"""A Hydra sweeper for current Optuna: one study per grid point, trials pruned through storage.

Why not hydra-optuna-sweeper: its stable release pins optuna<3 (whose SQLite storage breaks under
SQLAlchemy 2), its release candidate needs a pre-release Hydra, and neither can prune (the job never
sees the trial). Here the sweeper asks the study for trials and launches them through whatever
launcher is configured; each job gets ``tuning.study/storage/trial_id`` and reports per-layer
validation scores to its trial through the study's storage, so the pruner can stop it.

Search space: ``hydra.sweeper.params`` and interval overrides on the command line, in Hydra's
override grammar: ``tag(log, interval(1e-6, 1e-1))`` (log-uniform float), ``interval(0, 1)``,
``tag(int, interval(1, 8))``, ``choice(a, b)`` (categorical). Plain comma lists on the command line
(``basis=pca,nmf``) form a grid: one study per grid point, not a categorical.
"""

import csv
import itertools
import json
import logging
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, Optional  # noqa: UP035 (OmegaConf needs typing generics)

import optuna
from hydra.core.config_store import ConfigStore
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.core.override_parser.types import ChoiceSweep, IntervalSweep, Override
from hydra.core.utils import JobReturn, JobStatus
from hydra.errors import HydraException
from hydra.plugins.sweeper import Sweeper
from hydra.types import HydraContext, TaskFunction
from omegaconf import DictConfig, OmegaConf
from optuna.distributions import (
    BaseDistribution,
    CategoricalDistribution,
    FloatDistribution,
    IntDistribution,
)
from optuna.trial import TrialState

from probe_sweep.tracking import plt, save_figure, track_study

log = logging.getLogger(__name__)
NAMING_GROUPS = ("model", "basis", "probe", "layers")


@dataclass
class SamplerConf:
    """TPE, seeded; ``n_startup_trials`` random trials before the model-based ones."""

    seed: int = 0
    n_startup_trials: int = 5


@dataclass
class PrunerConf:
    """``median``: stop a trial whose step value is worse than the median of earlier trials at
    that step (steps are the probed layers). ``none``: never prune."""

    kind: str = "median"
    n_startup_trials: int = 3
    n_warmup_steps: int = 1


@dataclass
class ProbeSweepOptunaConf:
    _target_: str = "hydra_plugins.probe_sweep_optuna.sweeper.ProbeSweepOptunaSweeper"
    direction: str = "minimize"
    n_trials: int = 20
    n_jobs: int = 1
    storage: Optional[str] = None  # noqa: UP045
    study_name: Optional[str] = None  # noqa: UP045
    sampler: SamplerConf = field(default_factory=SamplerConf)
    pruner: PrunerConf = field(default_factory=PrunerConf)
    params: Dict[str, str] = field(default_factory=dict)  # noqa: UP006


ConfigStore.instance().store(
    group="hydra/sweeper",
    name="probe_sweep_optuna",
    node=ProbeSweepOptunaConf,
    provider="probe_sweep",
)


def distribution(override: Override) -> BaseDistribution:
    """An Optuna distribution from an interval or choice override; a clear error otherwise."""
    key, value = override.get_key_element(), override.value()
    if isinstance(value, IntervalSweep):
        low, high, log_scale = value.start, value.end, "log" in value.tags
        if low is None or high is None or not low < high:
            raise HydraException(
                f"search space {key}: interval needs low < high, got {low}, {high}"
            )
        if log_scale and low <= 0:
            raise HydraException(f"search space {key}: a log interval needs low > 0, got {low}")
        if "int" in value.tags:
            return IntDistribution(int(low), int(high), log=log_scale)
        return FloatDistribution(float(low), float(high), log=log_scale)
    if isinstance(value, ChoiceSweep):
        return CategoricalDistribution(list(value.list))
    raise HydraException(
        f"search space {key}={override.get_value_element_as_str()} is not an interval or choice; "
        "use e.g. tag(log, interval(1e-6, 1e-1)) or choice(a, b)"
    )


class ProbeSweepOptunaSweeper(Sweeper):
    def __init__(
        self,
        direction: str,
        n_trials: int,
        n_jobs: int,
        storage: str | None,
        study_name: str | None,
        sampler: DictConfig,
        pruner: DictConfig,
        params: DictConfig,
    ) -> None:
        if direction not in ("minimize", "maximize"):
            raise HydraException(f"hydra.sweeper.direction={direction!r}: use minimize or maximize")
        if n_trials < 1 or n_jobs < 1:
            raise HydraException("hydra.sweeper.n_trials and n_jobs must be >= 1")
        if pruner.kind not in ("median", "none"):
            raise HydraException(f"hydra.sweeper.pruner.kind={pruner.kind!r}: use median or none")
        self.direction, self.n_trials, self.n_jobs = direction, n_trials, n_jobs
        self.storage, self.study_name = storage, study_name
        self.sampler_conf, self.pruner_conf = sampler, pruner
        self.params = dict(params or {})
        self.job_idx = 0

    def setup(
        self, *, hydra_context: HydraContext, task_function: TaskFunction, config: DictConfig
    ) -> None:
        from hydra.core.plugins import Plugins

        self.hydra_context, self.config = hydra_context, config
        self.launcher = Plugins.instance().instantiate_launcher(
            hydra_context=hydra_context, task_function=task_function, config=config
        )
        self.sweep_dir = Path(config.hydra.sweep.dir)

    def split_arguments(
        self, arguments: list[str]
    ) -> tuple[dict[str, BaseDistribution], list[list[str]], list[str]]:
        """(search space, grid of override lists, fixed overrides)."""
        parser = OverridesParser.create(config_loader=self.hydra_context.config_loader)
        space: dict[str, BaseDistribution] = {}
        for override in parser.parse_overrides([f"{k}={v}" for k, v in self.params.items()]):
            space[override.get_key_element()] = distribution(override)
        grid: list[list[str]] = []
        fixed: list[str] = []
        for override in parser.parse_overrides(arguments):
            key = override.get_key_element()
            if override.is_interval_sweep() or (
                override.is_sweep_override() and not override.is_discrete_sweep()
            ):
                space[key] = distribution(override)
            elif override.is_discrete_sweep():
                grid.append([f"{key}={v}" for v in override.sweep_string_iterator()])
            else:
                fixed.append(f"{key}={override.get_value_element_as_str()}")
        if not space:
            raise HydraException(
                "the Optuna sweep has no search space: set hydra.sweeper.params (see "
                "conf/hparams_search/probe_reg.yaml) or pass key=tag(log, interval(lo, hi))"
            )
        return space, grid, fixed

    def make_study_name(self, overrides: list[str], grid_point: tuple[str, ...]) -> str:
        """``<model>-<basis>-<probe>-<layers>`` plus any other grid values."""
        cfg = self.hydra_context.config_loader.load_sweep_config(self.config, list(overrides))
        chosen = OmegaConf.to_container(cfg, enum_to_str=True)
        parts = [
            str(chosen["model"]["name"]),
            str(chosen["basis"]["kind"]),
            str(chosen["probe"]["kind"]),
            str(chosen["layers"]["mode"]),
        ]
        parts += [o for o in grid_point if o.split("=")[0] not in NAMING_GROUPS]
        prefix = f"{self.study_name}-" if self.study_name else ""
        # The name travels as an override value and a directory name: keep it plain.
        return re.sub(r"[^A-Za-z0-9._-]+", "_", prefix + "-".join(parts))

    def storage_url(self) -> str:
        if self.storage:
            return self.storage
        return f"sqlite:///{(self.sweep_dir / 'optuna.db').resolve()}"

    def sweep(self, arguments: list[str]) -> list[JobReturn]:
        space, grid, fixed = self.split_arguments(arguments)
        self.sweep_dir.mkdir(parents=True, exist_ok=True)
        OmegaConf.save(self.config, self.sweep_dir / "multirun.yaml")
        returns: list[JobReturn] = []
        for grid_point in itertools.product(*grid) if grid else [()]:
            base = [*fixed, *grid_point]
            name = self.make_study_name(base, grid_point)
            returns += self.run_study(name, space, base)
        return returns

    def run_study(
        self, name: str, space: dict[str, BaseDistribution], base: list[str]
    ) -> list[JobReturn]:
        sampler = optuna.samplers.TPESampler(
            seed=self.sampler_conf.seed, n_startup_trials=self.sampler_conf.n_startup_trials
        )
        pruner: optuna.pruners.BasePruner = (
            optuna.pruners.MedianPruner(
                n_startup_trials=self.pruner_conf.n_startup_trials,
                n_warmup_steps=self.pruner_conf.n_warmup_steps,
            )
            if self.pruner_conf.kind == "median"
            else optuna.pruners.NopPruner()
        )
        storage = self.storage_url()
        study = optuna.create_study(
            study_name=name,
            storage=storage,
            sampler=sampler,
            pruner=pruner,
            direction=self.direction,
            load_if_exists=True,
        )
        for stale in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
            study.tell(stale.number, state=TrialState.FAIL, skip_if_finished=True)
        finished = (TrialState.COMPLETE, TrialState.PRUNED)
        done = len(study.get_trials(deepcopy=False, states=finished))
        log.info("Study %s in %s: %d of %d trials done", name, storage, done, self.n_trials)
        returns: list[JobReturn] = []
        while done < self.n_trials:
            trials = [study.ask(space) for _ in range(min(self.n_jobs, self.n_trials - done))]
            batch = [
                [
                    *base,
                    *(
                        f"{k}={v!r}" if isinstance(v, float) else f"{k}={v}"
                        for k, v in trial.params.items()
                    ),
                    f"tuning.study={name}",
                    f"tuning.storage='{storage}'",
                    f"tuning.trial_id={trial._trial_id}",
                ]
                for trial in trials
            ]
            results = self.launcher.launch(batch, initial_job_idx=self.job_idx)
            self.job_idx += len(batch)
            for trial, result in zip(trials, results, strict=True):
                self.tell(study, trial, result)
            done += len(trials)
            returns += results
        summary = write_summary(study, self.sweep_dir / name, ridge_path_of(returns))
        if summary is not None:
            tracker = OmegaConf.to_object(self.config.tracker)
            track_study(tracker, summary, [self.sweep_dir / name / "objective_by_param.png"])
        return returns

    @staticmethod
    def tell(study: optuna.Study, trial: optuna.Trial, result: JobReturn) -> None:
        value = result._return_value
        if (
            result.status is JobStatus.COMPLETED
            and isinstance(value, float)
            and math.isfinite(value)
        ):
            study.tell(trial, value)
        elif isinstance(value, optuna.TrialPruned):
            study.tell(trial, state=TrialState.PRUNED)
            log.info("Trial %d pruned (%s)", trial.number, value)
        else:
            study.tell(trial, state=TrialState.FAIL)
            log.warning("Trial %d failed: %s", trial.number, value)


def ridge_path_of(results: list[JobReturn]) -> dict[str, list[float]] | None:
    """The ridge regularisation path that a ``probe=ridge`` trial scored (same data for all)."""
    for result in results:
        if result.status is not JobStatus.COMPLETED or result.hydra_cfg is None:
            continue
        metrics = Path(result.hydra_cfg.hydra.runtime.output_dir) / "metrics.json"
        if metrics.is_file():
            path = json.loads(metrics.read_text()).get("ridge_path")
            if path:
                return path
    return None


def write_summary(
    study: optuna.Study, out: Path, ridge_path: dict[str, list[float]] | None = None
) -> dict[str, Any] | None:
    """``trials.csv``, ``best.json``, a plot of each parameter against the objective, and
    ``tuned/<study>.yaml``: the best parameters as a config the next sweep can load."""
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
        ax.set_xlabel(name)
        ax.set_ylabel("objective (pruned: last reported)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle(f"study {study.study_name}", fontsize=10)
    fig.tight_layout()
    save_figure(fig, path)
