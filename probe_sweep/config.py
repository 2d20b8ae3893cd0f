"""The typed schema behind conf/: one dataclass per config group, each owned by its stage.

Hydra merges every group's YAML onto these dataclasses, so a wrong type or an unknown enum
value fails at composition time, naming the key and the allowed values, before anything loads.
``to_typed`` adds the checks a type cannot express.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, fields
from pathlib import Path

from hydra.core.config_store import ConfigStore
from omegaconf import DictConfig, OmegaConf

from probe_sweep.bases import BasisConfig
from probe_sweep.errors import UserError
from probe_sweep.extraction.activations import ActivationsConfig
from probe_sweep.extraction.data import DataConfig
from probe_sweep.extraction.labels import TargetConfig
from probe_sweep.extraction.layers import LayersConfig
from probe_sweep.extraction.model import ModelConfig
from probe_sweep.jobs.scheduler import prepare_launchers
from probe_sweep.probes.kinds import check_penalty
from probe_sweep.probes.linear import ProbeConfig, RegConfig
from probe_sweep.statistics import StatisticsConfig
from probe_sweep.tracking.identity import TrackerConfig
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


# conf/ beside the package, as a path: Hydra would look up a relative one as a module.
CONF = Path(__file__).resolve().parents[1] / "conf"


def register_schema() -> None:
    """The config schema, and the resolvers conf/ uses: whatever composes the config has both."""
    ConfigStore.instance().store(name="probe_sweep_schema", node=Config)
    prepare_launchers()


def _check(ok: bool, message: str) -> None:
    if not ok:
        raise UserError(message)


# The range of every numeric setting (list settings: of each element), lowest and highest
# allowed, None for no bound; every float must also be finite. Checked before anything loads.
RANGES: dict[str, tuple[float | None, float | None]] = {
    "seed": (0, 2**32 - 1),  # numpy's seeds
    "data.token_budget": (1, None),
    "data.seq_len": (1, None),
    "data.val_fraction": (0, 1),  # strictly inside: checked below
    "data.test_fraction": (0, 1),
    "activations.batch_size": (1, None),
    "layers.indices": (0, None),
    "target.offset": (None, None),
    "probe.tol": (0, 1),  # strictly inside: checked below
    "probe.max_iter": (1, None),
    "probe.chunk_mb": (1, None),
    "probe.memory_mb": (1, None),
    "probe.path_strengths": (0, None),
    "basis.top_k": (1, None),
    "basis.bottom_k": (1, None),
    "basis.n_components": (1, None),
    "basis.n_nonzero": (1, None),
    "basis.fit_rows": (1, None),
    "basis.max_iter": (1, None),
    "reg.strength": (0, None),
    "statistics.n_permutations": (2, None),
    "statistics.n_bootstrap": (20, None),  # fewer resamples cannot place a 95% interval
    "statistics.n_bootstrap_types": (20, None),
    "statistics.subspace_dim": (0, None),
    "statistics.control_labels": (2, None),
    "statistics.lens_rows": (1, None),
    "statistics.unlikely_k": (1, None),
    "statistics.k_sweep": (1, None),
    "statistics.k_seeds": (1, None),
    "statistics.max_classes": (0, None),
    "statistics.lens_train_rows": (1, None),
    "statistics.mdl_orders": (1, None),
    "tracker.init_timeout": (0, None),
    # a model this tool trains (model.training is None for every other model)
    "model.training.token_budget": (1, None),
    "model.training.seq_len": (2, None),  # a next-token target needs two tokens
    "model.training.steps": (1, None),
    "model.training.batch_size": (1, None),
    "model.training.lr": (0, None),
    "model.training.warmup_steps": (0, None),
    "model.training.weight_decay": (0, None),
    "model.training.checkpoint_every": (1, None),
    "model.training.seed": (0, 2**32 - 1),
}


def check_ranges(config: Config) -> None:
    """One ``UserError`` for the first numeric setting outside ``RANGES`` (or not finite); a
    setting inside an optional group that is None (``model.training``) is not checked."""
    for dotted, (low, high) in RANGES.items():
        value = config
        for part in dotted.split("."):
            value = None if value is None else getattr(value, part)
        for item in value if isinstance(value, list) else [value]:
            if item is None:
                continue
            ok = math.isfinite(item) and (low is None or item >= low)
            ok = ok and (high is None or item <= high)
            if not ok:
                bounds = f">= {low:g}" if high is None else f"from {low:g} to {high:g}"
                fix = f"use a value {bounds}" if low is not None else "use a finite number"
                raise UserError(f"{dotted}={item} is out of range; {fix}")


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
    check_ranges(config)
    check_penalty(probe.kind, reg.kind)
    for name in ("val_fraction", "test_fraction"):
        value = getattr(data, name)
        _check(0 < value < 1, f"data.{name}={value} must lie strictly between 0 and 1")
    _check(
        data.val_fraction + data.test_fraction < 1,
        "data.val_fraction + data.test_fraction must be below 1 (the rest is for training)",
    )
    check_unseen_by_model(config)
    _check(0 < probe.tol < 1, f"probe.tol={probe.tol} must lie strictly between 0 and 1")
    check_objective(config.tuning)
    _check(
        config.device in ("auto", "cpu", "cuda") or config.device.startswith("cuda:"),
        f"device={config.device!r} is not one of auto, cpu, cuda, cuda:<index>",
    )
    return config


def check_unseen_by_model(config: Config) -> None:
    """``data.unseen_by_model`` needs a model trained here, on this corpus, in sequences of this
    length: only then are its held-out sequences known."""
    data, model = config.data, config.model
    if not data.unseen_by_model:
        return
    training = model.training
    _check(
        training is not None,
        f"data.unseen_by_model=true needs a model trained here (one with model.training, e.g. "
        f"model=sotu-gpt2); model {model.name!r} has none: drop the setting",
    )
    assert training is not None
    _check(
        data.source.value == training.corpus,
        f"data.unseen_by_model=true: model {model.name!r} was trained on {training.corpus}, "
        f"not data={data.source.value}; use data={training.corpus}",
    )
    _check(
        data.seq_len == training.seq_len,
        f"data.unseen_by_model=true: model {model.name!r} was trained on sequences of "
        f"{training.seq_len} tokens; set data.seq_len={training.seq_len}",
    )


def compose_config(overrides: list[str]) -> Config:
    """The typed config a ``python -m probe_sweep <overrides>`` job would run with, composed
    without running Hydra's app (no output dir): for the commands beside the main one."""
    from hydra import compose, initialize_config_dir

    register_schema()
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3", job_name="probe_sweep"):
        return to_typed(compose(config_name="config", overrides=overrides))
