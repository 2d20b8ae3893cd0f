"""The tracker against a recording fake of wandb at its one import (``tracking._wandb``), fed job
dirs with production's metrics (``tests/job_dirs.py``); and one end-to-end job whose real
offline run file is read back and compared with what the fake records."""

from __future__ import annotations

import json
import logging
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import optuna
import pytest
from omegaconf import OmegaConf

from hydra_plugins.probe_sweep_optuna._summary import write_summary
from probe_sweep import tuning
from probe_sweep.tracking import runs as tracking
from probe_sweep.tracking.contents import STAT_FIELDS, statistics
from probe_sweep.tracking.identity import (
    JobInfo,
    TrackerConfig,
    TrackerMode,
    config_hash,
    resolve_mode,
)
from tests.conftest import TINY, run_cli
from tests.fake_wandb import FakeWandb, Run
from tests.job_dirs import fake_job, sample_metrics
from tests.wandb_reader import read_records, read_run, run_files


@pytest.fixture
def fake(monkeypatch: pytest.MonkeyPatch) -> FakeWandb:
    """A recording wandb in place of the real one; no WANDB_DIR, so runs go where the tracker
    puts them by default."""
    recorder = FakeWandb()
    monkeypatch.setattr(tracking, "_wandb", lambda: recorder)
    monkeypatch.delenv("WANDB_DIR")
    return recorder


def offline(**kwargs: Any) -> TrackerConfig:
    return TrackerConfig(mode=TrackerMode.offline, **kwargs)


def entries(metrics: dict[str, Any], name: str) -> dict[int, dict[str, Any]]:
    """The statistics entries called ``name``, by layer."""
    return {e["layer"]: e for e in metrics["statistics"]["entries"] if e["name"] == name}


def test_statistics_are_the_entries_with_or_without_a_null() -> None:
    metrics = sample_metrics()
    stats = {s["name"]: s for s in statistics(metrics)}
    every = metrics["statistics"]["entries"]
    assert 0 < len([e for e in every if "p" in e]) < len(every)
    assert set(stats) == {f"entries/{e['name']}/layer_{e['layer']}" for e in every}
    cosine = stats["entries/probe_embedding_cosine/layer_2"]
    expected = entries(metrics, "probe_embedding_cosine")[2]
    assert cosine["layer"] == 2 and cosine["p"] == expected["p"]
    assert cosine["p_floor"] == expected["p_floor"] and cosine["alternative"] == "greater"
    assert "ci" not in cosine  # scalars only
    assert statistics(sample_metrics(statistics=False)) == []


def test_auto_mode_is_offline_without_a_key_and_online_with_one(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.delenv("WANDB_MODE")
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.setenv("NETRC", str(tmp_path / "no-netrc"))
    monkeypatch.setenv("HOME", str(tmp_path))
    auto = TrackerConfig()
    assert resolve_mode(auto) == "offline"
    monkeypatch.setenv("WANDB_API_KEY", "k" * 40)
    assert resolve_mode(auto) == "online"
    monkeypatch.setenv("WANDB_MODE", "offline")
    assert resolve_mode(auto) == "offline"
    assert resolve_mode(TrackerConfig(mode=TrackerMode.online)) == "online"
    monkeypatch.setenv("WANDB_MODE", "disabled")
    assert resolve_mode(auto) == "disabled"


def test_a_job_is_one_run_with_everything_logged(tmp_path: Path, fake: FakeWandb) -> None:
    sweep = tmp_path / "sweep"
    job_dir = sweep / "3_basis=pca"
    metrics = fake_job(job_dir, [0.9, 0.8, 0.6], statistics=True, basis="pca")
    job = JobInfo(
        out_dir=job_dir,
        choices={"model": "tiny", "probe": "softmax", "layers": "each", "basis": "pca"},
        overrides=["basis=pca"],
        sweep_dir=sweep,
        num=3,
    )
    resolved = metrics["config"]
    info = tracking.track_job(offline(tags=["mine"]), job, resolved)

    (run,) = fake.runs
    assert info is not None and info["mode"] == "offline" and info["id"] == run.id
    assert json.loads((job_dir / "wandb_run.json").read_text()) == info
    assert info["run_dir"] == str(Path(run.dir).parent)
    assert run.finished and run.exit_code == 0
    assert (job_dir / "probe_weights.png").is_file()
    assert (job_dir / "probe_weight_mass.png").is_file()

    init = run.init
    assert init["dir"] == str(job_dir)  # the job's own dir, not the directory it started from
    assert init["mode"] == "offline" and init["reinit"] == "finish_previous"
    assert init["project"] == "probe_sweep" and init["settings"].init_timeout == 30
    assert init["group"] == info["group"] and info["group"].endswith("sweep")
    assert init["job_type"] == "softmax-each"
    assert init["name"] == "#3 pca · softmax/each · l2=0.0001 · tiny-gpt2"
    assert init["tags"] == ["model:tiny", "probe:softmax", "layers:each", "basis:pca", "mine"]
    assert init["config"]["basis"]["kind"] == "pca" and init["config"]["seed"] == 0
    assert init["config"]["job"]["overrides"] == ["basis=pca"]
    assert init["config"]["job"]["config_hash"] == config_hash(resolved)

    # Per-layer curves on a layer x-axis: every numeric score, not intervals, names or flags.
    assert run.metrics["by_layer/*"].step_metric == "layer"
    by_layer = run.rows_with("by_layer/top1")
    assert [(r["layer"], r["by_layer/top1"]) for r in by_layer] == [(0, 0.9), (1, 0.8), (2, 0.6)]
    assert by_layer[1]["by_layer/nll"] == metrics["layers"][1]["nll"]
    assert by_layer[1]["by_layer/n_unseen"] == metrics["layers"][1]["n_unseen"]
    for absent in ("top1_ci", "probe", "converged"):
        assert f"by_layer/{absent}" not in by_layer[0]
    # The statistics of a layer are curves on the same axis, with their p where they have one.
    for name in ("probe_embedding_cosine", "variance_share_bottom_half"):
        found, key = entries(metrics, name), f"by_layer/statistics/entries/{name}"
        assert {r["layer"]: r[f"{key}/observed"] for r in by_layer} == {
            layer: e["observed"] for layer, e in found.items()
        }
    cosine = entries(metrics, "probe_embedding_cosine")
    assert by_layer[0]["by_layer/statistics/entries/probe_embedding_cosine/p"] == cosine[0]["p"]
    assert "by_layer/statistics/entries/variance_share_bottom_half/p" not in by_layer[0]

    # The solver's objective per probe, on an iteration x-axis, and in one chart.
    assert run.metrics["fit/*"].step_metric == "iteration"
    for name, fit in metrics["fits"].items():
        curve = run.rows_with(f"fit/{name}/objective")
        assert [(r["iteration"], r[f"fit/{name}/objective"]) for r in curve] == [
            (p["iteration"], p["objective"]) for p in fit["history"]
        ]
    chart = run.logged("charts/objective_by_iteration")
    assert chart.kind == "line_series" and chart.args["keys"] == list(metrics["fits"])

    # Tables, and every PNG in the job dir as an image.
    per_layer = run.logged("tables/per_layer")
    assert per_layer.columns[:2] == ["layer", "probe"] and "top1_ci" not in per_layer.columns
    assert [row[:2] for row in per_layer.data] == [[0, "layer_0"], [1, "layer_1"], [2, "layer_2"]]
    training = run.logged("tables/training")
    assert len(training.data) == sum(len(f["history"]) for f in metrics["fits"].values())
    stats = run.logged("tables/statistics")
    assert stats.columns[:5] == ["name", *STAT_FIELDS]
    assert len(stats.data) == len(statistics(metrics))
    images = {k: v for row in run.history for k, v in row.items() if k.startswith("images/")}
    assert set(images) == {
        "images/accuracy_by_layer",
        "images/probe_weights",
        "images/probe_weight_mass",
    }
    assert all(image.path.parent == job_dir for image in images.values())

    # Summary: per-layer scores by name, the headline numbers, every null statistic, counts.
    summary = run.summary
    assert summary["top1/layer_1"] == 0.8 and summary["best_layer"] == 0
    assert summary["top1_first"] == 0.9 and summary["top1_last"] == 0.6
    assert summary["top1_mean"] == pytest.approx((0.9 + 0.8 + 0.6) / 3)
    for field in STAT_FIELDS:
        key = f"statistics/entries/probe_embedding_cosine/layer_2/{field}"
        assert summary[key] == cosine[2][field]
    assert summary["counts/n_train_tokens"] == metrics["counts"]["n_train_tokens"]
    assert summary["timing_s/fit"] == metrics["timing_s"]["fit"]

    # The weights: a versioned artifact with the safetensors file and metadata.
    (artifact,) = run.artifacts
    assert artifact.name == info["artifact"] and artifact.type == "probes"
    assert artifact.name.startswith("probes-tiny-gpt2-softmax-each-pca-")
    assert artifact.files == {
        "probes.safetensors": job_dir / "probes.safetensors",
        "metrics.json": job_dir / "metrics.json",
    }
    shape = [metrics["probe"]["n_classes"], metrics["model"]["d_model"]]
    assert artifact.metadata["tensors"]["layer_0.weight"] == shape
    assert artifact.metadata["probe"]["basis"] == "pca"
    assert artifact.metadata["top1_by_layer"]["2"] == 0.6
    assert artifact.metadata["job_dir"] == str(job_dir)
    # Nothing on disk was changed by tracking.
    assert json.loads((job_dir / "metrics.json").read_text()) == metrics


def test_run_files_go_to_the_job_dir_unless_a_dir_is_configured(
    tmp_path: Path, fake: FakeWandb, monkeypatch: pytest.MonkeyPatch
) -> None:
    job_dir = tmp_path / "job"
    resolved = fake_job(job_dir, [0.9])["config"]
    tracking.track_job(offline(), JobInfo(out_dir=job_dir), resolved)
    monkeypatch.setenv("WANDB_DIR", str(tmp_path / "env"))
    tracking.track_job(offline(), JobInfo(out_dir=job_dir), resolved)
    tracking.track_job(offline(dir=str(tmp_path / "mine")), JobInfo(out_dir=job_dir), resolved)
    dirs = [run.init["dir"] for run in fake.runs]
    assert dirs == [str(job_dir), str(tmp_path / "env"), str(tmp_path / "mine")]
    assert (tmp_path / "env").is_dir() and (tmp_path / "mine").is_dir()


def test_jobs_in_one_process_are_separate_finished_runs(tmp_path: Path, fake: FakeWandb) -> None:
    """The joblib launcher reuses processes: each job's run must end before the next starts."""
    for num, top1 in enumerate(([0.9, 0.5], [0.7, 0.6, 0.5])):
        job_dir = tmp_path / "sweep" / f"{num}_x"
        fake_job(job_dir, top1)
        job = JobInfo(out_dir=job_dir, sweep_dir=tmp_path / "sweep", num=num)
        tracking.track_job(offline(), job, {"n": num})
    first, second = fake.runs
    assert first.id != second.id
    assert first.exit_code == 0 and second.exit_code == 0
    assert [r["layer"] for r in first.rows_with("by_layer/top1")] == [0, 1]
    assert [r["layer"] for r in second.rows_with("by_layer/top1")] == [0, 1, 2]
    assert first.init["config"]["n"] == 0 and second.init["config"]["n"] == 1
    assert first.init["group"] == second.init["group"]
    assert first.init["dir"] != second.init["dir"]


def test_a_run_that_fails_while_logging_is_finished_as_failed_and_one_warning(
    tmp_path: Path,
    fake: FakeWandb,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    job_dir = tmp_path / "job"
    metrics = fake_job(job_dir, [0.9, 0.8])

    def log_fails(self: Run, data: dict[str, Any]) -> None:
        raise RuntimeError("no space left on device")

    monkeypatch.setattr(Run, "log", log_fails)
    with caplog.at_level(logging.WARNING, logger="probe_sweep.tracking.runs"):
        info = tracking.track_job(offline(), JobInfo(out_dir=job_dir), metrics["config"])
    assert info is None
    (run,) = fake.runs
    assert run.finished and run.exit_code == 1
    (warning,) = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    assert warning.startswith(f"W&B tracking (offline) failed, results are complete in {job_dir}")
    assert warning.endswith("RuntimeError: no space left on device")
    assert json.loads((job_dir / "metrics.json").read_text()) == metrics
    assert not (job_dir / "wandb_run.json").exists()


def test_auto_mode_logs_offline_when_an_online_run_cannot_start(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    recorder = FakeWandb(fail_init=("online",))
    monkeypatch.setattr(tracking, "_wandb", lambda: recorder)
    monkeypatch.setenv("WANDB_MODE", "online")
    job_dir = tmp_path / "job"
    resolved = fake_job(job_dir, [0.9])["config"]
    with caplog.at_level(logging.WARNING, logger="probe_sweep.tracking.runs"):
        info = tracking.track_job(TrackerConfig(), JobInfo(out_dir=job_dir), resolved)
    assert info is not None and info["mode"] == "offline"
    (run,) = recorder.runs
    assert run.init["mode"] == "offline" and run.exit_code == 0
    (warning,) = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    assert "W&B online run failed (TimeoutError" in warning and "logging offline instead" in warning
    # A forced online mode does not fall back: one warning, no run.
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="probe_sweep.tracking.runs"):
        forced = TrackerConfig(mode=TrackerMode.online)
        assert tracking.track_job(forced, JobInfo(out_dir=job_dir), resolved) is None
    assert len(recorder.runs) == 1
    assert ["W&B tracking (online) failed" in r.getMessage() for r in caplog.records] == [True]


def test_a_wandb_dir_that_cannot_be_made_is_one_warning(
    tmp_path: Path, fake: FakeWandb, caplog: pytest.LogCaptureFixture
) -> None:
    job_dir = tmp_path / "job"
    metrics = fake_job(job_dir, [0.9, 0.8])
    blocker = tmp_path / "not-a-dir"
    blocker.write_text("a file where wandb wants a directory")
    with caplog.at_level(logging.WARNING, logger="probe_sweep.tracking.runs"):
        info = tracking.track_job(offline(dir=str(blocker)), JobInfo(out_dir=job_dir), {})
    assert info is None and fake.runs == []
    warnings = [r for r in caplog.records if r.levelno >= logging.WARNING]
    assert len(warnings) == 1 and "W&B tracking (offline) failed" in warnings[0].getMessage()
    assert str(job_dir) in warnings[0].getMessage()
    assert json.loads((job_dir / "metrics.json").read_text()) == metrics
    assert not (job_dir / "wandb_run.json").exists()


def test_a_pruned_trial_is_logged_from_its_record_and_tagged(
    tmp_path: Path, fake: FakeWandb
) -> None:
    """A pruned job leaves no metrics.json: the tracker logs what ``tuning.pruned_metrics``
    makes of the rows it had scored."""
    sample = sample_metrics()
    pruned = optuna.TrialPruned("pruned after layer 0")
    pruned.rows = sample["layers"][:1]  # type: ignore[attr-defined]
    record = tuning.pruned_metrics(pruned, sample["config"])
    job_dir = tmp_path / "trial_3"
    job_dir.mkdir()
    info = tracking.track_job(offline(), JobInfo(out_dir=job_dir), sample["config"], record)
    (run,) = fake.runs
    assert info is not None and "pruned" in run.init["tags"]
    assert [r["layer"] for r in run.rows_with("by_layer/top1")] == [0]
    assert run.artifacts == []  # no weights to log
    assert json.loads((job_dir / "wandb_run.json").read_text()) == info


def test_a_study_is_one_run_in_its_sweep_dir(tmp_path: Path, fake: FakeWandb) -> None:
    sampler = optuna.samplers.RandomSampler(seed=0)
    study = optuna.create_study(study_name="probe_reg", sampler=sampler)
    study.optimize(lambda t: (t.suggest_float("reg.strength", 1e-5, 1e-1, log=True) - 1e-2) ** 2, 3)
    sweep = tmp_path / "sweep"
    summary = write_summary(study, sweep / "probe_reg", None, {"wandb_run_id": "study-0123"})
    assert summary is not None
    tracking.track_study(
        offline(), summary, [sweep / "probe_reg" / "objective_by_param.png"], sweep
    )
    (run,) = fake.runs
    assert run.init["dir"] == str(sweep)
    assert run.init["id"] == "study-0123" and run.init["resume"] == "allow"
    assert run.init["group"] == "probe_reg" and run.init["job_type"] == "study"
    assert run.summary["best_value"] == summary["best_value"]
    best = summary["best_params"]["reg.strength"]
    assert run.summary["best/reg.strength"] == best
    assert run.logged("images/objective_by_param").path.name == "objective_by_param.png"
    assert run.finished


@pytest.mark.e2e
def test_disabled_tracker_never_imports_wandb(tmp_path: Path) -> None:
    job_dir = tmp_path / "job"
    fake_job(job_dir, [0.9, 0.8])
    code = (
        "import sys; from pathlib import Path; from probe_sweep.tracking import identity as i\n"
        "from probe_sweep.tracking.runs import track_job\n"
        "cfg = i.TrackerConfig(mode=i.TrackerMode.disabled)\n"
        f"assert track_job(cfg, i.JobInfo(out_dir=Path({str(job_dir)!r})), {{}}) is None\n"
        "print('wandb' in sys.modules)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"
    assert (job_dir / "probe_weights.png").is_file()  # drawn by the job, not by W&B
    assert not (job_dir / "wandb_run.json").exists()


@pytest.mark.e2e
def test_cli_job_with_unreachable_wandb_keeps_complete_results(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Online with a key but no server: one warning line, exit 0, every number on disk."""
    monkeypatch.delenv("WANDB_MODE")
    env = {"WANDB_API_KEY": "k" * 40, "WANDB_BASE_URL": "http://127.0.0.1:9"}
    args = [*TINY, "tracker.mode=online", "tracker.init_timeout=5", "hydra.run.dir=out"]
    proc = run_cli(args, cwd=tmp_path, env=env)
    output = proc.stdout + proc.stderr
    lines = [line for line in output.splitlines() if "W&B tracking (online) failed" in line]
    assert len(lines) == 1, output
    assert "127.0.0.1:9" in lines[0]  # it failed for want of the server, not something else
    out = tmp_path / "out"
    metrics = json.loads((out / "metrics.json").read_text())
    assert [row["layer"] for row in metrics["layers"]] == [0, 1, 2]
    assert all(isinstance(row["top1"], float) for row in metrics["layers"])
    assert (out / "probes.safetensors").is_file() and (out / "probe_weights.png").is_file()
    assert not (out / "wandb_run.json").exists()


def history_keys(rows: list[dict[str, Any]]) -> set[str]:
    return {k for row in rows for k in row if not k.startswith("_")}


def under(key: str, keys: set[str]) -> bool:
    """Whether ``key`` is one of ``keys`` or a field below one (``tables/per_layer/path``)."""
    return key in keys or any(key.startswith(f"{k}/") for k in keys)


@pytest.mark.e2e
def test_a_cli_job_is_one_real_offline_run_in_its_own_dir(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The one test against real wandb: a tiny job through the Hydra entry point, in auto mode
    without a key (so offline) and without WANDB_DIR. Its run file lands in the job's dir and
    holds what the fake records for the same job. The file is wandb's private format, read with
    tests/wandb_reader.py; the test skips, saying why, where this wandb's format is not one the
    reader knows. It also checks that tests/data still has production's metrics.json shape."""
    for var in ("WANDB_MODE", "WANDB_DIR"):
        monkeypatch.delenv(var)
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    env = {"NETRC": str(tmp_path / "none"), "HOME": str(tmp_path)}
    run_cli([*TINY, "hydra.run.dir=out"], cwd=tmp_path, env=env)
    out = tmp_path / "out"
    info = json.loads((out / "wandb_run.json").read_text())
    assert info["mode"] == "offline" and info["group"] is None
    (path,) = run_files(tmp_path)  # one run, under the job dir, none where the job started
    assert path.parent == Path(info["run_dir"]) and path.parent.parent == out / "wandb"

    # The unit tests' job dirs (tests/job_dirs.py) have production's shape.
    metrics = json.loads((out / "metrics.json").read_text())
    sample = sample_metrics()
    stale = "tests/data is not production's shape any more: `python -m tests.job_dirs` renews it"
    assert metrics.keys() == sample.keys(), stale
    assert [r.keys() for r in metrics["layers"]] == [r.keys() for r in sample["layers"]], stale
    assert metrics["fits"]["layer_0"].keys() == sample["fits"]["layer_0"].keys(), stale
    assert metrics["statistics"].keys() == sample["statistics"].keys(), stale
    names = {(e["name"], e["layer"]) for e in metrics["statistics"]["entries"]}
    assert names == {(e["name"], e["layer"]) for e in sample["statistics"]["entries"]}, stale

    real = read_run(path)
    assert real.exit_code == 0 and real.run.run_id == info["id"]
    assert real.config["model"]["name"] == "tiny-gpt2" and real.config["tracker"]["mode"] == "auto"
    assert real.metrics["by_layer/*"].step_metric == "layer"
    assert real.metrics["fit/*"].step_metric == "iteration"
    top1 = [r["by_layer/top1"] for r in real.rows_with("by_layer/top1")]
    assert top1 == [r["top1"] for r in metrics["layers"]]
    (artifact,) = [a for a in real.artifacts if a.type == "probes"]
    assert artifact.name == info["artifact"]

    # The reader tells a damaged file from a format it does not know.
    damaged = tmp_path / "damaged.wandb"
    shutil.copy(path, damaged)
    data = bytearray(damaged.read_bytes())
    data[200] ^= 0xFF
    damaged.write_bytes(bytes(data))
    with pytest.raises(ValueError, match="CRC mismatch|truncated"):
        read_records(damaged)

    # The same job through the fake records what wandb wrote (a chart's key gains "_table").
    # (Tracking it again replaces the job's offline run files: one job, one run.)
    recorder = FakeWandb()
    monkeypatch.setattr(tracking, "_wandb", lambda: recorder)
    hydra_cfg = OmegaConf.load(out / ".hydra" / "hydra.yaml").hydra
    tracking.track_job(TrackerConfig(), JobInfo.from_hydra(hydra_cfg), metrics["config"])
    (recorded,) = recorder.runs
    assert real.run.display_name == recorded.init["name"]
    assert real.run.job_type == recorded.init["job_type"] and real.tags == recorded.init["tags"]
    chart = "charts/objective_by_iteration"
    logged = history_keys(recorded.history) - {chart} | {f"{chart}_table"}
    written = history_keys(real.history)  # a table or image: its record's fields, <key>/<field>
    assert all(under(key, logged) for key in written)
    assert all(key in written or any(under(w, {key}) for w in written) for key in logged)
    assert set(recorded.summary) <= set(real.summary)
    assert {k: real.summary[k] for k in recorded.summary} == pytest.approx(recorded.summary)
    assert set(real.artifact_files(artifact)) == set(recorded.artifacts[0].files)
    assert real.artifact_metadata(artifact) == json.loads(
        json.dumps(recorded.artifacts[0].metadata)
    )
