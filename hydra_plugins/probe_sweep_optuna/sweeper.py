"""A Hydra sweeper for current Optuna: one study per grid point, trials pruned through storage.

Why not hydra-optuna-sweeper: its stable release pins optuna<3 (whose SQLite storage breaks under
SQLAlchemy 2), its release candidate needs a pre-release Hydra, and neither can prune (the job never
sees the trial). Here the sweeper asks the study for trials and launches them through whatever
launcher is configured; each job gets ``tuning.study/storage/trial_id/trial_number`` and reports
per-layer validation scores to its trial through the study's storage, so the pruner can stop it.

Search space: ``hydra.sweeper.params`` and interval overrides on the command line, in Hydra's
override grammar: ``tag(log, interval(1e-6, 1e-1))`` (log-uniform float), ``interval(0, 1)``,
``tag(int, interval(1, 8))``, ``choice(a, b)`` (categorical). Plain comma lists on the command line
(``basis=pca,nmf``) form a grid: one study per grid point, not a categorical.

Hydra imports every public module under ``hydra_plugins`` at start-up, for every command: this one
holds only the config schema and a shell, and imports Optuna (in ``_impl``) when a sweep starts.
"""

from dataclasses import dataclass, field
from typing import Dict, List, Optional  # noqa: UP035 (OmegaConf needs typing generics)

from hydra.core.config_store import ConfigStore
from hydra.core.utils import JobReturn
from hydra.plugins.sweeper import Sweeper
from hydra.types import HydraContext, TaskFunction
from omegaconf import DictConfig


@dataclass
class SamplerConf:
    """TPE, seeded; ``n_startup_trials`` random trials before the model-based ones. A resumed
    study's sampler is seeded from ``seed`` and the number of trials already in the study, so
    it never replays the draws of an earlier run."""

    seed: Optional[int] = 0  # noqa: UP045
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
    """``storage``: null (journal file ``<sweep dir>/optuna.journal`` when the launcher runs
    trials in parallel or on other nodes, i.e. any launcher but the basic one, else SQLite
    ``<sweep dir>/optuna.db``; a study already in one of those files is resumed from it),
    ``journal``, ``sqlite``, or an RDB URL (``postgresql://...``, ``sqlite:////abs/path.db``)."""

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


class ProbeSweepOptunaSweeper(Sweeper):
    """Hydra's face of the sweeper; the work is in ``_impl.OptunaSweeperImpl``."""

    def __init__(
        self,
        direction: str,
        n_trials: int,
        n_jobs: int,
        storage: Optional[str],  # noqa: UP045
        study_name: Optional[str],  # noqa: UP045
        sampler: DictConfig,
        pruner: DictConfig,
        params: DictConfig,
    ) -> None:
        from ._impl import OptunaSweeperImpl

        self.sweeper = OptunaSweeperImpl(
            direction, n_trials, n_jobs, storage, study_name, sampler, pruner, params
        )

    def setup(
        self, *, hydra_context: HydraContext, task_function: TaskFunction, config: DictConfig
    ) -> None:
        self.sweeper.setup(hydra_context=hydra_context, task_function=task_function, config=config)

    def sweep(self, arguments: List[str]) -> List[JobReturn]:  # noqa: UP006
        return self.sweeper.sweep(arguments)
