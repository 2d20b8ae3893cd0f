"""Optuna tuning: the search space, the objective, and real studies through the Hydra sweeper."""

from __future__ import annotations

import csv
import inspect
import json
from pathlib import Path

import optuna
import pytest
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.errors import HydraException

from hydra_plugins.probe_sweep_optuna._impl import distribution
from probe_sweep.errors import UserError
from probe_sweep.results import ProbeScores
from probe_sweep.tracking import runs as tracking
from probe_sweep.tuning import (
    PRUNER_ATTR,
    TuningConfig,
    check_objective,
    is_pruned,
    objective,
    open_storage,
    pruned_metrics,
    pruned_rows,
    trial_reporter,
)
from tests.conftest import TINY, run_cli
from tests.wandb_reader import read_run, run_files

PARSER = OverridesParser.create()


def parsed(text: str):
    return distribution(PARSER.parse_override(text))


def test_search_space_grammar() -> None:
    dist = optuna.distributions
    log_float = dist.FloatDistribution(1e-6, 0.1, log=True)
    assert parsed("reg.strength=tag(log, interval(1e-6, 0.1))") == log_float
    assert parsed("probe.lr=interval(0.001, 0.1)") == dist.FloatDistribution(0.001, 0.1)
    assert parsed("probe.batch_size=tag(int, interval(64, 512))") == dist.IntDistribution(64, 512)
    assert parsed("reg=choice(l1, l2)") == dist.CategoricalDistribution(["l1", "l2"])


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("reg.strength=tag(log, interval(0, 1))", "a log interval needs low > 0"),
        ("reg.strength=interval(1, 0.5)", "interval needs low < high"),
        ("reg.strength=0.1", "is not an interval or choice"),
    ],
)
def test_bad_search_space_is_one_clear_error(text: str, message: str) -> None:
    with pytest.raises(HydraException, match=message):
        parsed(text)


def scores(layer: int, val_nll: float) -> ProbeScores:
    return ProbeScores(layer, f"layer_{layer}", 0.5, 0.9, 1.0, val_nll, 0.5, 0)


def test_objective_averages_layers_or_takes_one() -> None:
    rows = [scores(0, 1.0), scores(1, 3.0)]
    assert objective(rows, TuningConfig()) == 2.0
    assert objective(rows, TuningConfig(layer=1)) == 3.0
    with pytest.raises(UserError, match="tuning.layer=5 was not probed"):
        objective(rows, TuningConfig(layer=5))
    with pytest.raises(UserError, match="tuning.objective='accuracy' is not a per-layer metric"):
        check_objective(TuningConfig(objective="accuracy"))


def pruned_trials_are_tracked() -> bool:
    """Whether a pruned job logs its W&B run (the entry point passes the rows it scored to
    ``tracking.track_job(metrics=...)``); until then its tests are expected failures."""
    return "metrics" in inspect.signature(tracking.track_job).parameters


def read_trials(study_dir: Path) -> list[dict[str, str]]:
    with open(study_dir / "trials.csv") as f:
        return list(csv.DictReader(f))


@pytest.mark.e2e
def test_ridge_study_finds_the_path_optimum_and_resumes(tmp_path: Path) -> None:
    args = [
        "-m",
        "hparams_search=probe_reg",
        *TINY,
        "statistics.enabled=false",  # the study reads validation NLL only
        "probe=ridge",
        "hydra.sweep.dir=sweep",
        "hydra.sweeper.sampler.n_startup_trials=4",
    ]
    run_cli([*args, "hydra.sweeper.n_trials=6"], cwd=tmp_path)
    studies = [p.parent for p in (tmp_path / "sweep").glob("*/best.json")]
    assert len(studies) == 1
    best = json.loads((studies[0] / "best.json").read_text())
    assert best["n_complete"] + best["n_pruned"] == 6 and best["n_failed"] == 0
    # The check: every trial's job also evaluated the whole ridge path from one decomposition.
    metrics = json.loads(next((tmp_path / "sweep").rglob("metrics.json")).read_text())
    path = metrics["ridge_path"]
    path_best = min(path["val_nll"])
    assert best["best_value"] <= path_best * 1.05, (best, path)
    tuned = (tmp_path / "sweep" / "tuned" / "tuned" / f"{best['study']}.yaml").read_text()
    assert "strength" in tuned
    # Each trial is a W&B run in the study's group, and so is the study's summary.
    runs = [read_run(p) for p in run_files(tmp_path / "wandb")]
    assert {r.run.run_group for r in runs} == {best["study"]}
    (study_run,) = [r for r in runs if r.run.job_type == "study"]
    assert study_run.summary["best_value"] == pytest.approx(best["best_value"])
    assert len(runs) == 1 + 6 - (0 if pruned_trials_are_tracked() else best["n_pruned"])

    run_cli([*args, "hydra.sweeper.n_trials=8"], cwd=tmp_path)
    rows = read_trials(studies[0])
    assert [int(r["number"]) for r in rows] == list(range(8)), "a resumed study counts on"
    strengths = [r["reg.strength"] for r in rows]
    assert len(set(strengths)) == 8, f"a resumed study repeated a trial: {strengths}"
    # Each trial's directory is named by its number in the study.
    assert sorted(p.name for p in studies[0].glob("trial_*")) == sorted(
        f"trial_{n}" for n in range(8)
    )


@pytest.mark.e2e
def test_unpromising_trials_are_pruned(tmp_path: Path) -> None:
    run_cli(
        [
            "-m",
            "hparams_search=probe_reg",
            *TINY,
            "statistics.enabled=false",  # pruning reads the per-layer scores only
            "hydra.sweep.dir=sweep",
            "hydra.sweeper.n_trials=6",
            "hydra.sweeper.sampler.n_startup_trials=6",
            "hydra.sweeper.pruner.n_startup_trials=2",
            "hydra.sweeper.pruner.n_warmup_steps=0",
            "reg.strength=tag(log, interval(1e-6, 10.0))",
        ],
        cwd=tmp_path,
    )
    rows = read_trials(next((tmp_path / "sweep").glob("*/trials.csv")).parent)
    states = [r["state"] for r in rows]
    assert "PRUNED" in states and "COMPLETE" in states, rows
    assert not list((tmp_path / "sweep").rglob(".fits")), "a pruned trial kept its saved probes"
    for job_dir in (tmp_path / "sweep").glob("*/trial_*"):
        state = rows[int(job_dir.name.removeprefix("trial_"))]["state"]
        assert (job_dir / "pruned.json").is_file() == (state == "PRUNED"), job_dir
    # Every trial is a W&B run, a pruned one too (tagged pruned).
    if not pruned_trials_are_tracked():
        pytest.xfail("needs __main__ to log a pruned trial with tracking.track_job(metrics=...)")
    runs = [read_run(p) for p in run_files(tmp_path / "wandb")]
    trial_runs = [r for r in runs if r.run.job_type != "study"]
    assert len(trial_runs) == len(rows)
    assert sum("pruned" in r.run.tags for r in trial_runs) == states.count("PRUNED")


@pytest.mark.e2e
def test_grid_over_bases_makes_one_study_per_value(tmp_path: Path) -> None:
    run_cli(
        [
            "-m",
            "hparams_search=probe_reg",
            *TINY,
            "statistics.enabled=false",
            "probe=ridge",
            "hydra.sweep.dir=sweep",
            "hydra.sweeper.n_trials=2",
            "reg=l2,none",
        ],
        cwd=tmp_path,
    )
    studies = sorted(p.parent.name for p in (tmp_path / "sweep").glob("*/best.json"))
    assert len(studies) == 2 and studies[0] != studies[1]


def test_a_job_asks_the_pruner_the_sweeper_was_configured_with(tmp_path: Path) -> None:
    """Not Optuna's default pruner: with pruner.kind=none nothing is pruned; with median, the
    pruned job's exception carries the rows it had scored (its W&B run logs them)."""
    url = f"journal:{tmp_path / 'optuna.journal'}"
    study = optuna.create_study(study_name="s", storage=open_storage(url))
    for value in (1.0, 1.0, 1.0, 1.0, 1.0):  # enough for Optuna's default MedianPruner
        trial = study.ask()
        for step in range(3):
            trial.report(value, step)
        study.tell(trial, value)

    def run_trial(settings: dict) -> BaseException | None:
        study.set_user_attr(PRUNER_ATTR, settings)
        trial = study.ask()
        cfg = TuningConfig(study="s", storage=url, trial_id=trial._trial_id)
        report = trial_reporter(cfg)
        assert report is not None
        try:
            for step in range(3):
                report(step, scores(step, 9.0))
        except optuna.TrialPruned as exc:
            return exc
        return None

    assert run_trial({"kind": "none"}) is None
    pruned = run_trial({"kind": "median", "n_startup_trials": 1, "n_warmup_steps": 1})
    assert pruned is not None and is_pruned(pruned)
    assert [r["layer"] for r in pruned_rows(pruned)] == [0, 1]
    resolved = {"model": {"name": "tiny"}, "reg": {"kind": "l2", "strength": 0.1}}
    metrics = pruned_metrics(pruned, resolved)
    assert metrics["probe"]["strength"] == 0.1 and metrics["pruned"] == "pruned after layer 1"
    assert len(metrics["layers"]) == 2
