"""The typed schema behind conf/: one dataclass per config group, each owned by its stage.

Hydra merges every group's YAML onto these dataclasses, so a wrong type or an unknown enum
value fails at composition time, naming the key and the allowed values, before anything loads.
``to_typed`` adds the checks a type cannot express.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields

from hydra.core.config_store import ConfigStore
from omegaconf import DictConfig, OmegaConf

from probe_sweep.activations import ActivationsConfig
from probe_sweep.bases import BasisConfig
from probe_sweep.data import DataConfig
from probe_sweep.errors import UserError
from probe_sweep.inputs import TargetConfig
from probe_sweep.jobs import prepare_launchers
from probe_sweep.layers import LayersConfig
from probe_sweep.model import ModelConfig
from probe_sweep.probes import ProbeConfig, ProbeKind, RegConfig, RegKind
from probe_sweep.statistics import StatisticsConfig
from probe_sweep.tracking import TrackerConfig
from probe_sweep.tuning import TuningConfig, check_objective


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    activations: ActivationsConfig = field(default_factory=ActivationsConfig)
    layers: LayersConfig = field(default_factory=LayersConfig)
    target: TargetConfig = field(default_factory=TargetConfig)
    probe: ProbeConfig = field(default_factory=ProbeConfig)
    basis: BasisConfig = field(default_factory=BasisConfig)
    reg: RegConfig = field(default_factory=RegConfig)
    statistics: StatisticsConfig = field(default_factory=StatisticsConfig)
    tracker: TrackerConfig = field(default_factory=TrackerConfig)
    tuning: TuningConfig = field(default_factory=TuningConfig)
    seed: int = 0
    device: str = "auto"
    # Multirun: rerun jobs whose complete results already exist under the sweep dir.
    redo: bool = False


def register_schema() -> None:
    """The config schema, and the resolvers conf/ uses: whatever composes the config has both."""
    ConfigStore.instance().store(name="probe_sweep_schema", node=Config)
    prepare_launchers()


def _check(ok: bool, message: str) -> None:
    if not ok:
        raise UserError(message)


def to_typed(cfg: DictConfig) -> Config:
    """The composed config as plain dataclasses, with value checks a type cannot express."""
    config: Config = OmegaConf.to_object(cfg)  # type: ignore[assignment]
    allowed = {f.name for f in fields(Config)}
    extra = sorted(set(cfg.keys()) - allowed)
    _check(
        not extra,
        f"{extra[0] if extra else ''} is not a setting; the settings are: "
        f"{', '.join(sorted(allowed))} (and the groups' own keys, e.g. probe.tol)",
    )
    for group in fields(Config):
        node = cfg.get(group.name)
        if isinstance(node, DictConfig):
            known = {f.name for f in fields(getattr(config, group.name))}
            unknown = sorted(set(node.keys()) - known)
            _check(
                not unknown,
                f"{group.name}.{unknown[0] if unknown else ''} is not a setting; "
                f"known {group.name} settings: {', '.join(sorted(known))}",
            )
    data, probe, reg = config.data, config.probe, config.reg
    _check(reg.strength >= 0, f"reg.strength={reg.strength} is negative; use a value >= 0")
    _check(
        not (probe.kind is ProbeKind.ridge and reg.kind is RegKind.l1),
        "probe=ridge has a closed form only with reg=l2 or reg=none; choose one of those",
    )
    _check(data.token_budget > 0, "data.token_budget must be a positive number of tokens")
    _check(data.seq_len > 0, "data.seq_len must be positive")
    for name in ("val_fraction", "test_fraction"):
        value = getattr(data, name)
        _check(0 < value < 1, f"data.{name}={value} must lie strictly between 0 and 1")
    _check(0 < probe.tol < 1, f"probe.tol={probe.tol} must lie strictly between 0 and 1")
    _check(
        probe.max_iter > 0 and probe.chunk_mb > 0 and probe.memory_mb > 0,
        "probe.max_iter, probe.chunk_mb and probe.memory_mb must be > 0",
    )
    _check(config.activations.batch_size > 0, "activations.batch_size must be > 0")
    check_objective(config.tuning)
    stats = config.statistics
    _check(stats.n_permutations >= 2, "statistics.n_permutations must be >= 2")
    _check(stats.control_labels >= 2, "statistics.control_labels must be >= 2")
    _check(stats.max_classes >= 0, "statistics.max_classes must be >= 0 (0 = all classes)")
    _check(
        config.device in ("auto", "cpu", "cuda") or config.device.startswith("cuda:"),
        f"device={config.device!r} is not one of auto, cpu, cuda, cuda:<index>",
    )
    return config
