"""The sweeper's work (imported when a sweep starts, so Optuna loads only then): the search space,
the storage, one study per grid point, and each trial's outcome told to its study and left in its
directory.

A study resumes when the same command runs again: trials a sweeper that is gone left running
(it was killed) are failed, the sampler is seeded afresh from the trials already in the study,
and trials are asked for until ``n_trials`` are complete, pruned or running in other sweepers
(several may work on one study: ``_owner.py``).
"""

from __future__ import annotations

import itertools
import logging
import math
import re
import uuid
from enum import Enum
from pathlib import Path
from typing import Any

import optuna
import yaml
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.core.utils import JobReturn, JobStatus
from hydra.errors import HydraException
from hydra.types import HydraContext, TaskFunction
from omegaconf import DictConfig, OmegaConf
from optuna.distributions import (
    BaseDistribution,
)
from optuna.trial import FrozenTrial, TrialState

from probe_sweep.files import write_json
from probe_sweep.jobs.jobdir import PRUNED, discard_fits
from probe_sweep.tracking.identity import TrackerConfig
from probe_sweep.tracking.runs import track_study
from probe_sweep.tuning import JOURNAL, PRUNER_ATTR, make_pruner, open_storage, quote_override

from ._owner import Sweeper
from ._space import distribution, override_value, sampler_seed
from ._storage import BASIC_LAUNCHER, choose_storage
from ._summary import ridge_path_of, write_summary

log = logging.getLogger("hydra_plugins.probe_sweep_optuna.sweeper")
NAMING_KEYS = ("model.name", "basis.kind", "probe.kind", "layers.mode")
NAMING_GROUPS = ("model", "basis", "probe", "layers")
WANDB_RUN_ATTR = "wandb_run_id"


def tracker_config(config: DictConfig) -> TrackerConfig | None:
    """The app's ``tracker`` settings as a TrackerConfig; None when the app has none."""
    node = config.get("tracker")
    if node is None:
        return None
    # Resolved in place first: its interpolations (group: ${tuning.study}) point elsewhere.
    plain = OmegaConf.to_container(node, resolve=True, enum_to_str=True)
    merged = OmegaConf.merge(OmegaConf.structured(TrackerConfig), plain)
    return OmegaConf.to_object(merged)  # type: ignore[return-value]


class OptunaSweeperImpl:
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
        """``<model>-<basis>-<probe>-<layers>`` (those the app's config has) plus any other grid
        values."""
        cfg = self.hydra_context.config_loader.load_sweep_config(self.config, list(overrides))
        values = [OmegaConf.select(cfg, key) for key in NAMING_KEYS]
        parts = [v.name if isinstance(v, Enum) else str(v) for v in values if v is not None]
        parts += [o for o in grid_point if o.split("=")[0] not in NAMING_GROUPS]
        prefix = f"{self.study_name}-" if self.study_name else ""
        # The name travels as an override value and a directory name: keep it plain.
        return re.sub(r"[^A-Za-z0-9._-]+", "_", prefix + ("-".join(parts) or "study"))

    def sweep(self, arguments: list[str]) -> list[JobReturn]:
        space, grid, fixed = self.split_arguments(arguments)
        self.sweep_dir.mkdir(parents=True, exist_ok=True)
        launcher = str(self.config.hydra.launcher.get("_target_", BASIC_LAUNCHER))
        self.store = choose_storage(self.storage, self.sweep_dir, launcher)
        where = self.store.url.removeprefix(JOURNAL)
        log.info("Optuna storage: %s %s (%s)", self.store.kind, where, self.store.reason)
        if self.store.kind == "sqlite" and launcher != BASIC_LAUNCHER:
            log.warning(
                "SQLite storage with %s: trials in several processes or on several nodes may "
                "fail to lock it; hydra.sweeper.storage=journal is safe there",
                launcher.rsplit(".", 1)[-1],
            )
        OmegaConf.save(self.config, self.sweep_dir / "multirun.yaml")
        returns: list[JobReturn] = []
        for grid_point in itertools.product(*grid) if grid else [()]:
            base = [*fixed, *grid_point]
            name = self.make_study_name(base, grid_point)
            returns += self.run_study(name, space, base)
        return returns

    def pruner_settings(self) -> dict[str, Any]:
        settings = OmegaConf.to_container(self.pruner_conf, resolve=True)
        assert isinstance(settings, dict)
        return {str(k): v for k, v in settings.items()}

    def run_study(
        self, name: str, space: dict[str, BaseDistribution], base: list[str]
    ) -> list[JobReturn]:
        study = optuna.create_study(
            study_name=name,
            storage=open_storage(self.store.url),
            pruner=make_pruner(self.pruner_settings()),
            direction=self.direction,
            load_if_exists=True,
        )
        # The jobs' trials ask the pruner configured now (a resume may change it).
        study.set_user_attr(PRUNER_ATTR, self.pruner_settings())
        with Sweeper(study) as worker:
            self.fail_stale(study, worker)
            existing = len(study.get_trials(deepcopy=False))
            seed = sampler_seed(self.sampler_conf.seed, existing)
            study.sampler = optuna.samplers.TPESampler(
                seed=seed, n_startup_trials=self.sampler_conf.n_startup_trials
            )
            log.info(
                "Study %s: %d of %d trials done (%d in storage, %d running in other sweepers; "
                "sampler seed %s)",
                *(name, self.finished(study), self.n_trials, existing),
                *(len(worker.running_elsewhere()), seed),
            )
            returns: list[JobReturn] = []
            while (room := self.n_trials - self.taken(study, worker)) > 0:
                trials = [worker.ask(space) for _ in range(min(self.n_jobs, room))]
                for group in consecutive(trials):
                    batch = [
                        [
                            *base,
                            *(f"{k}={override_value(v)}" for k, v in trial.params.items()),
                            f"tuning.study={name}",
                            f"tuning.storage={quote_override(self.store.url)}",
                            f"tuning.trial_id={trial._trial_id}",
                            f"tuning.trial_number={trial.number}",
                        ]
                        for trial in group
                    ]
                    # Job numbers are trial numbers: unique across sweepers of one study.
                    results = self.launcher.launch(batch, initial_job_idx=group[0].number)
                    for trial, result in zip(group, results, strict=True):
                        self.tell(study, trial, result)
                    returns += results
        tracker = tracker_config(self.config)
        extra = {WANDB_RUN_ATTR: self.wandb_run_id(study)} if tracker is not None else {}
        summary = write_summary(study, self.sweep_dir / name, ridge_path_of(returns), extra)
        if summary is not None and tracker is not None and returns:
            # Only a run that added trials logs the study, to its one W&B run (same id).
            images = [self.sweep_dir / name / "objective_by_param.png"]
            track_study(tracker, summary, images, self.sweep_dir)
        return returns

    @staticmethod
    def wandb_run_id(study: optuna.Study) -> str:
        """The id of the study's W&B run, made once and kept in the study: every run of the
        sweep that adds trials logs to that run instead of starting another."""
        run_id = study.user_attrs.get(WANDB_RUN_ATTR)
        if run_id is None:
            run_id = f"study-{uuid.uuid4().hex[:16]}"
            study.set_user_attr(WANDB_RUN_ATTR, run_id)
        return str(run_id)

    @staticmethod
    def finished(study: optuna.Study) -> int:
        states = (TrialState.COMPLETE, TrialState.PRUNED)
        return len(study.get_trials(deepcopy=False, states=states))

    def taken(self, study: optuna.Study, worker: Sweeper) -> int:
        """Trials that count towards ``n_trials``: finished, or running in other sweepers."""
        return self.finished(study) + len(worker.running_elsewhere())

    def fail_stale(self, study: optuna.Study, worker: Sweeper) -> None:
        """Fail the trials a sweeper that is gone left running (it was killed) and drop the
        probes their jobs saved for resuming: a failed trial is never run again. Trials of
        sweepers still at work on the study are theirs."""
        stale = worker.abandoned()
        if not stale:
            return
        dirs = trial_dirs(self.sweep_dir, study.study_name)
        for trial in stale:
            study.tell(trial.number, state=TrialState.FAIL, skip_if_finished=True)
            job_dir = dirs.get(trial.number)
            if job_dir is not None:
                discard_fits(job_dir)
            log.warning(
                "Trial %d failed: left running by an earlier run (killed?)%s",
                trial.number,
                f"; its dir: {job_dir}" if job_dir else "",
            )

    @staticmethod
    def tell(study: optuna.Study, trial: optuna.Trial, result: JobReturn) -> None:
        """Record a trial's outcome; a pruned or failed trial's saved probes are dropped (it is
        never run again) and a pruned trial's dir gets ``pruned.json`` saying so."""
        value = result._return_value
        job_dir = job_dir_of(result)
        where = f" ({job_dir})" if job_dir else ""
        if (
            result.status is JobStatus.COMPLETED
            and isinstance(value, float)
            and math.isfinite(value)
        ):
            study.tell(trial, value, skip_if_finished=True)
            return
        if isinstance(value, optuna.TrialPruned):
            study.tell(trial, state=TrialState.PRUNED, skip_if_finished=True)
            log.info("Trial %d pruned%s: %s", trial.number, where, value)
            if job_dir is not None:
                (frozen,) = [
                    t for t in study.get_trials(deepcopy=False) if t.number == trial.number
                ]
                write_json(job_dir / PRUNED, pruned_record(study.study_name, frozen, str(value)))
        else:
            study.tell(trial, state=TrialState.FAIL, skip_if_finished=True)
            log.warning("Trial %d failed%s: %s", trial.number, where, value)
        if job_dir is not None:
            discard_fits(job_dir)


def consecutive(trials: list[optuna.Trial]) -> list[list[optuna.Trial]]:
    """``trials`` cut where their numbers skip (another sweeper took the numbers between): a
    launch numbers its jobs consecutively."""
    groups: list[list[optuna.Trial]] = []
    for trial in trials:
        if groups and trial.number == groups[-1][-1].number + 1:
            groups[-1].append(trial)
        else:
            groups.append([trial])
    return groups


def job_dir_of(result: JobReturn) -> Path | None:
    if result.hydra_cfg is None:
        return None
    output_dir = OmegaConf.select(result.hydra_cfg, "hydra.runtime.output_dir")
    return Path(output_dir) if output_dir else None


def pruned_record(study: str, trial: FrozenTrial, message: str) -> dict[str, Any]:
    """What ``pruned.json`` says: the study stopped this trial, where, and what it had reported."""
    steps = trial.intermediate_values
    return {
        "study": study,
        "trial": trial.number,
        "message": message,
        "params": trial.params,
        "last_step": max(steps) if steps else None,
        "intermediate_values": {str(k): v for k, v in sorted(steps.items())},
    }


def trial_dirs(sweep_dir: Path, study: str) -> dict[int, Path]:
    """Job dirs of ``study``'s trials under ``sweep_dir``, by trial number, from the overrides
    Hydra saved in each job dir when the job started."""
    found: dict[int, Path] = {}
    for path in sweep_dir.rglob("overrides.yaml"):
        if path.parent.name != ".hydra":
            continue
        try:
            overrides = yaml.safe_load(path.read_text()) or []
        except (OSError, yaml.YAMLError):
            continue
        values = dict(str(o).split("=", 1) for o in overrides if "=" in str(o))
        number = values.get("tuning.trial_number")
        if values.get("tuning.study") == study and number is not None and number.isdigit():
            found[int(number)] = path.parent.parent
    return found
