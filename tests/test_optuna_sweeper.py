"""The Optuna sweeper's bookkeeping, through Hydra's CLI with a toy app (a second's objective):
resume without repeats, storage choice, quoting, trial numbers, pruned trials, study W&B runs."""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
import time
from pathlib import Path

import optuna
import pytest
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.errors import HydraException
from omegaconf import OmegaConf

from hydra_plugins.probe_sweep_optuna._space import override_value, sampler_seed
from hydra_plugins.probe_sweep_optuna._storage import BASIC_LAUNCHER, choose_storage
from probe_sweep.jobs import sweep as sweep_jobs
from probe_sweep.report import sweep as report
from probe_sweep.tuning import open_storage, quote_override
from tests.conftest import subprocess_timeout
from tests.wandb_reader import read_run, run_files

JOBLIB = "hydra_plugins.hydra_joblib_launcher.joblib_launcher.JoblibLauncher"

APP = """
import math, os, shutil, time
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig

from probe_sweep.jobs.jobdir import JobMetrics, write_metrics
from probe_sweep.results import (CacheUse, Counts, LayerResult, ModelSummary, ProbeScores,
                                 ProbeSummary)
from probe_sweep.tuning import TuningConfig, trial_reporter


@hydra.main(version_base="1.3", config_path=".", config_name="toy")
def main(cfg) -> float:
    out = Path(HydraConfig.get().runtime.output_dir)
    (out / ".fits").mkdir(exist_ok=True)  # as a probe job saves its fitted probes
    if cfg.kill_at is not None and cfg.tuning.trial_number == cfg.kill_at:
        os._exit(3)  # the whole sweep dies mid-trial (the basic launcher runs it in-process)
    time.sleep(cfg.sleep)
    report = trial_reporter(TuningConfig(**cfg.tuning))
    loss = (math.log10(cfg.x) + 3.0) ** 2
    scores = [ProbeScores(step, "toy", 0.5, 0.5, loss, loss, 0.5, 0) for step in range(3)]
    for step, layer in enumerate(scores):
        report(step, layer)
    rows = [LayerResult(layer) for layer in scores]
    sections = dict.fromkeys(("timing_s", "fits", "resources", "config"))
    sections = {name: {} for name in sections}
    model = ModelSummary("toy", None, "toy", 2, 1, 1, False)
    probe = ProbeSummary("toy", "each", "natural", "l2", cfg.x, "seen", 1, 0, 1e-6, True)
    counts = Counts(*[1] * 9)
    cache, job = CacheUse("toy", "toy", False), {"key": "toy", "overrides": []}
    write_metrics(out, JobMetrics(model=model, probe=probe, counts=counts, cache=cache, job=job,
                                  layers=rows, statistics=None, ridge_path=None, **sections))
    shutil.rmtree(out / ".fits")  # as a job does once its results are written
    return loss


if __name__ == "__main__":
    main()
"""

CONFIG = """
defaults:
  - override hydra/sweeper: probe_sweep_optuna
  - _self_
x: 1.0
kill_at: null
sleep: 0
tuning: {objective: val_nll, layer: null, study: null, storage: null, trial_id: null,
         trial_number: null}
tracker: {mode: disabled}
hydra:
  sweep:
    dir: SWEEP_DIR
    subdir: ${tuning.study}/trial_${tuning.trial_number}
  sweeper:
    n_trials: 3
    sampler: {seed: 0, n_startup_trials: 10}
    pruner: {kind: none}
    params:
      x: tag(log, interval(1e-6, 1.0))
"""


def toy_app(root: Path, sweep_dir: str = "sweep") -> Path:
    """The app and its config in ``root``; its sweep dir written as a YAML (JSON) string."""
    root.mkdir(parents=True, exist_ok=True)
    (root / "app.py").write_text(APP)
    (root / "toy.yaml").write_text(CONFIG.replace("SWEEP_DIR", json.dumps(sweep_dir)))
    return root


def sweep(root: Path, *args: str, code: int = 0) -> str:
    """``python app.py -m args`` in ``root``; its output (log lines), checked for ``code``."""
    proc = subprocess.run(
        [sys.executable, "app.py", "-m", *args],
        cwd=root,
        env={**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])},
        capture_output=True,
        text=True,
        timeout=subprocess_timeout(),
    )
    output = proc.stdout + proc.stderr
    assert proc.returncode == code, output[-4000:]
    return output


def trials_of(storage: object) -> list[optuna.trial.FrozenTrial]:
    (summary,) = optuna.get_all_study_summaries(storage)  # type: ignore[arg-type]
    study = optuna.load_study(study_name=summary.study_name, storage=storage)  # type: ignore[arg-type]
    return study.get_trials(deepcopy=False)


# --- unit: quoting, storage choice, seeds --------------------------------------------------------


def test_a_quoted_override_reads_back_exactly() -> None:
    parser = OverridesParser.create()

    def read_back(value: str) -> str:
        parsed = parser.parse_override(f"tuning.storage={quote_override(value)}").value()
        cfg = OmegaConf.create({"tuning": {"storage": None}})
        OmegaConf.update(cfg, "tuning.storage", parsed, merge=True)  # as Hydra applies it
        return cfg.tuning.storage

    cases = [
        'sqlite:////tmp/it\'s a "sweep"/optuna.db',
        "journal:/tmp/a'b\\'c/optuna.journal",
        "trailing\\",
        "c:\\dir\\",
        "${not.an.interpolation}",
        "a\\${x}",
        "x,y=z 'q'",
    ]
    rng = random.Random(0)
    cases += ["".join(rng.choice("ab\\'\"${} ,=") for _ in range(12)) for _ in range(500)]
    for value in cases:
        assert read_back(value) == value, (value, quote_override(value))


def test_sampled_values_become_overrides_hydra_reads_back() -> None:
    parser = OverridesParser.create()
    for value in (1e-7, 0.1, 3, True, "pca", "a b's", None, "null", "true", "1e-3", "inf"):
        assert parser.parse_override(f"k={override_value(value)}").value() == value


def test_the_storage_follows_the_setting_the_launcher_and_what_the_sweep_dir_holds(
    tmp_path: Path,
) -> None:
    journal, sqlite = tmp_path / "optuna.journal", tmp_path / "optuna.db"
    assert choose_storage(None, tmp_path, BASIC_LAUNCHER).url == f"sqlite:///{sqlite}"
    parallel = choose_storage(None, tmp_path, JOBLIB)
    assert (parallel.kind, parallel.url) == ("journal", f"journal:{journal}")
    assert "JoblibLauncher" in parallel.reason
    assert choose_storage("sqlite", tmp_path, JOBLIB).kind == "sqlite"
    assert choose_storage("journal", tmp_path, BASIC_LAUNCHER).kind == "journal"
    url = "postgresql://user@db.example/optuna"
    assert choose_storage(url, tmp_path, JOBLIB).url == url
    with pytest.raises(HydraException, match="use journal, sqlite or a database URL"):
        choose_storage("redis", tmp_path, JOBLIB)
    # A resumed sweep keeps the storage its studies are in, whatever the launcher now.
    sqlite.touch()
    assert choose_storage(None, tmp_path, JOBLIB).kind == "sqlite"
    sqlite.unlink()
    journal.touch()
    assert choose_storage(None, tmp_path, BASIC_LAUNCHER).kind == "journal"


def test_each_run_of_a_study_seeds_its_sampler_anew() -> None:
    seeds = {sampler_seed(0, n) for n in range(100)}
    assert len(seeds) == 100 and sampler_seed(0, 5) == sampler_seed(0, 5)
    assert sampler_seed(1, 5) != sampler_seed(0, 5) and sampler_seed(None, 5) is None


# --- end to end through the toy app ---------------------------------------------------------------


@pytest.mark.e2e
def test_a_killed_and_resumed_study_never_repeats_a_trial(tmp_path: Path) -> None:
    root = toy_app(tmp_path)
    sweep(root, "hydra.sweeper.n_trials=4", "kill_at=2", code=3)
    storage = f"sqlite:///{root / 'sweep' / 'optuna.db'}"
    states = [t.state.name for t in trials_of(storage)]
    assert states == ["COMPLETE", "COMPLETE", "RUNNING"], states
    (killed,) = root.glob("sweep/*/trial_2")
    assert (killed / ".fits").is_dir()

    resumed = sweep(root, "hydra.sweeper.n_trials=4")
    assert "Trial 2 failed: left running by an earlier run" in resumed
    assert not (killed / ".fits").exists(), "the killed trial's saved probes were orphaned"
    sweep(root, "hydra.sweeper.n_trials=6")  # stopped at n_trials, resumed with more

    trials = trials_of(storage)
    assert [t.state.name for t in trials].count("COMPLETE") == 6, str(
        [(t.number, t.state.name) for t in trials]
    )
    xs = [t.params["x"] for t in trials]
    assert len(set(xs)) == len(xs), f"a resumed study repeated a trial: {xs}"
    # Each trial's directory is named by its number in the study, as the log and trials.csv say.
    for trial in trials:
        (job_dir,) = root.glob(f"sweep/*/trial_{trial.number}")
        overrides = (job_dir / ".hydra" / "overrides.yaml").read_text()
        assert f"x={trial.params['x']!r}" in overrides


@pytest.mark.e2e
def test_parallel_trials_share_a_journal_in_a_dir_with_quotes(tmp_path: Path) -> None:
    """The joblib launcher's default storage is the journal file, and a sweep dir with ' and "
    reaches the jobs intact: each job reports to its trial through the storage."""
    sweep_dir = tmp_path / 'it\'s a "sweep"'
    root = toy_app(tmp_path / "app", str(sweep_dir))
    out = sweep(root, "hydra/launcher=joblib", "hydra.launcher.n_jobs=2", "hydra.sweeper.n_jobs=2")
    journal = sweep_dir / "optuna.journal"
    assert f"Optuna storage: journal {journal.resolve()}" in out
    assert journal.is_file() and not (sweep_dir / "optuna.db").exists()
    trials = trials_of(open_storage(f"journal:{journal}"))
    assert len(trials) == 3 and all(t.state.name == "COMPLETE" for t in trials)
    assert all(len(t.intermediate_values) == 3 for t in trials), "a job did not reach its trial"

    explicit = sweep(
        root, "hydra/launcher=joblib", "hydra.launcher.n_jobs=2", "hydra.sweeper.storage=sqlite"
    )
    assert "Optuna storage: sqlite" in explicit and "SQLite storage with JoblibLauncher" in explicit
    assert len(trials_of(f"sqlite:///{sweep_dir / 'optuna.db'}")) == 3


@pytest.mark.e2e
def test_pruned_trials_are_called_pruned_by_their_own_number(tmp_path: Path) -> None:
    root = toy_app(tmp_path)
    out = sweep(
        root,
        "hydra.sweeper.n_trials=12",
        "hydra.sweeper.pruner.kind=median",
        "hydra.sweeper.pruner.n_startup_trials=1",
        "hydra.sweeper.pruner.n_warmup_steps=0",
    )
    trials = trials_of(f"sqlite:///{root / 'sweep' / 'optuna.db'}")
    pruned = [t.number for t in trials if t.state.name == "PRUNED"]
    assert pruned, [t.state.name for t in trials]
    (study_dir,) = (root / "sweep").glob("*/trials.csv")
    for number in pruned:
        job_dir = study_dir.parent / f"trial_{number}"
        assert f"Trial {number} pruned ({job_dir.resolve()})" in out
        record = json.loads((job_dir / "pruned.json").read_text())
        assert record["trial"] == number and record["last_step"] == 0
        assert not (job_dir / ".fits").exists(), "a pruned trial kept its saved probes"
    jobs = sweep_jobs.read_jobs(root / "sweep")
    assert [j.dir.name for j in jobs] == [f"trial_{n}" for n in range(12)], "not in number order"
    assert {j.dir.name for j in jobs if j.status == "pruned"} == {f"trial_{n}" for n in pruned}
    assert not [j for j in jobs if j.status == "incomplete"]
    text = report.write_sweep_report(root / "sweep", jobs).read_text()
    assert f"{len(pruned)} pruned, 0 incomplete" in text


def study_runs(tmp_path: Path) -> list:
    return [read_run(p) for p in run_files(tmp_path / "wandb")]


@pytest.mark.e2e
def test_a_resume_that_runs_no_trial_logs_no_study_run(tmp_path: Path) -> None:
    root = toy_app(tmp_path)
    sweep(root, "tracker.mode=offline", "hydra.sweeper.n_trials=2")
    assert len(study_runs(tmp_path)) == 1
    sweep(root, "tracker.mode=offline", "hydra.sweeper.n_trials=2")
    assert len(study_runs(tmp_path)) == 1, "a resume that ran nothing logged the study again"
    best = json.loads(next((root / "sweep").glob("*/best.json")).read_text())
    assert best["wandb_run_id"].startswith("study-")


@pytest.mark.e2e
def test_a_resumed_study_logs_to_its_one_wandb_run(tmp_path: Path) -> None:
    root = toy_app(tmp_path)
    sweep(root, "tracker.mode=offline", "hydra.sweeper.n_trials=2")
    sweep(root, "tracker.mode=offline", "hydra.sweeper.n_trials=3")
    runs = study_runs(tmp_path)
    assert len(runs) == 2
    best = json.loads(next((root / "sweep").glob("*/best.json")).read_text())
    assert {r.run.run_id for r in runs} == {best["wandb_run_id"]}


@pytest.mark.e2e
def test_two_sweepers_share_one_journal_study(tmp_path: Path) -> None:
    """The same command started twice on one study (two users, two SLURM allocations): the
    second used to fail the first's running trial, and the first then crashed with
    UpdateFinishedTrialError. Each now runs trials of its own until the study has n_trials."""
    root = toy_app(tmp_path)
    args = ["hydra.sweeper.storage=journal", "hydra.sweeper.n_trials=4", "sleep=4"]
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    procs = []
    for _ in range(2):
        procs.append(
            subprocess.Popen(
                [sys.executable, "app.py", "-m", *args],
                cwd=root,
                env=env,
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                text=True,
            )
        )
        time.sleep(2)  # the second starts while the first's first trial runs
    outputs = [p.communicate(timeout=subprocess_timeout())[0] for p in procs]
    for proc, output in zip(procs, outputs, strict=True):
        assert proc.returncode == 0, output[-4000:]
        assert "left running by an earlier run" not in output, output[-4000:]
    assert "running in other sweepers" in outputs[1]
    trials = trials_of(open_storage(f"journal:{root / 'sweep' / 'optuna.journal'}"))
    states = [t.state.name for t in trials]
    assert "FAIL" not in states and "RUNNING" not in states, states
    # n_trials, or one more where both asked at the same moment
    assert 4 <= states.count("COMPLETE") <= 5, states
    owners = {t.user_attrs["sweeper"] for t in trials}
    assert len(owners) == 2, "one sweeper ran every trial"
    for trial in trials:
        (job_dir,) = root.glob(f"sweep/*/trial_{trial.number}")
        assert (job_dir / "metrics.json").is_file()
