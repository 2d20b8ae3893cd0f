"""Launcher presets, and sweeps that survive failure and skip finished jobs when re-run."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

import probe_sweep.cli  # noqa: F401  (registers the schema and the presets' resolver)
from tests.conftest import CONF, run_cli, subprocess_timeout
from tests.jobs.test_slurm import FAST as SLURM_FAST

pytestmark = pytest.mark.e2e

FAST = [*SLURM_FAST, "layers=subset", "layers.indices=[0]"]


def launcher_config(preset: str, *overrides: str) -> dict:
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = compose(
            "config",
            overrides=[f"hydra/launcher={preset}", *overrides],
            return_hydra_config=True,
        )
    return OmegaConf.to_container(cfg.hydra.launcher, resolve=True)  # type: ignore[return-value]


def test_presets_compose_with_the_settings_a_cluster_user_sets() -> None:
    local = launcher_config("local")
    assert local["_target_"].endswith("JoblibLauncher")
    assert isinstance(local["n_jobs"], int) and local["n_jobs"] >= 1

    sub = launcher_config("local_submitit")
    assert sub["_target_"].endswith("submitit_launcher.LocalLauncher")

    slurm = launcher_config(
        "slurm",
        "hydra.launcher.partition=gpu",
        "hydra.launcher.gpus_per_node=2",
        "hydra.launcher.timeout_min=30",
        "hydra.launcher.mem_gb=32",
        "hydra.launcher.array_parallelism=5",
        "hydra.launcher.setup=[module load cuda]",
    )
    assert slurm["_target_"].endswith("submitit_launcher.SlurmLauncher")
    assert (slurm["partition"], slurm["gpus_per_node"], slurm["timeout_min"]) == ("gpu", 2, 30)
    assert (slurm["mem_gb"], slurm["array_parallelism"]) == (32, 5)
    assert slurm["setup"] == ["module load cuda"]
    assert slurm["max_num_timeout"] >= 1, "time-outs must requeue the job"
    assert launcher_config("slurm")["gpus_per_node"] == 1


def job_dirs(sweep: Path) -> dict[str, Path]:
    """Job dirs of a reg.strength sweep, by strength."""
    dirs = {}
    for hydra_dir in sweep.glob("*/.hydra"):
        overrides = (hydra_dir / "overrides.yaml").read_text()
        strength = overrides.split("reg.strength=")[1].split()[0]
        dirs[strength] = hydra_dir.parent
    return dirs


def logs(sweep: Path) -> str:
    return "".join(p.read_text() for p in sorted(sweep.glob("*/probe_sweep.log")))


def test_a_failing_job_leaves_the_others_complete_and_a_rerun_skips_finished_jobs(
    tmp_path: Path,
) -> None:
    sweep = tmp_path / "sweep"
    args = [*FAST, "reg.strength=0,0.001,-1", f"hydra.sweep.dir={sweep}"]

    # 1. Three jobs as separate processes (submitit's local executor); one fails mid-sweep.
    first = run_cli(["-m", "hydra/launcher=local_submitit", *args], cwd=tmp_path, check=False)
    assert first.returncode == 1, "a sweep with a failed job must exit non-zero"
    assert "1 job(s) failed" in first.stdout + first.stderr
    dirs = job_dirs(sweep)
    assert sorted(dirs) == ["-1", "0", "0.001"], first.stdout
    failed = json.loads((dirs["-1"] / "failed.json").read_text())
    assert failed["type"] == "UserError"
    assert failed["error"] == "reg.strength=-1.0 is out of range; use a value >= 0"
    assert "reg.strength=-1" in failed["overrides"]
    assert not (dirs["-1"] / "metrics.json").exists()
    complete = {}
    for strength in ("0", "0.001"):
        metrics = json.loads((dirs[strength] / "metrics.json").read_text())
        assert metrics["job"]["key"] and (dirs[strength] / "probes.safetensors").is_file()
        assert not (dirs[strength] / "failed.json").exists()
        complete[strength] = metrics
    assert complete["0"]["job"]["key"] != complete["0.001"]["job"]["key"]
    assert logs(sweep).count("Cached activations") == 1, "the cache was computed twice"
    assert len([p for p in (tmp_path / "cache").iterdir() if not p.name.startswith(".")]) == 1
    assert list(sweep.glob(".submitit/*")), "submitit did not run the jobs"

    # 2. The same sweep again, with the joblib preset: the finished job is skipped by its content
    # key, the job whose results were deleted is redone, the failing one fails again.
    kept = (dirs["0"] / "metrics.json").stat().st_mtime_ns
    (dirs["0.001"] / "metrics.json").unlink()
    second = run_cli(["-m", "hydra/launcher=local", *args], cwd=tmp_path, check=False)
    assert second.returncode == 1
    assert job_dirs(sweep) == dirs, "a re-run wrote to other job dirs"
    assert (dirs["0"] / "metrics.json").stat().st_mtime_ns == kept
    skipped_log = (dirs["0"] / "probe_sweep.log").read_text()
    assert "Skipped: complete results for this config" in skipped_log
    assert not (dirs["0"] / "failed.json").exists()
    redone = json.loads((dirs["0.001"] / "metrics.json").read_text())
    assert redone["job"]["key"] == complete["0.001"]["job"]["key"]
    assert redone["cache"]["reused"] is True
    # Same config, same numbers up to float summation order (workers differ in thread count).
    for row, before in zip(redone["layers"], complete["0.001"]["layers"], strict=True):
        assert row["layer"] == before["layer"] and abs(row["top1"] - before["top1"]) < 0.05
    assert (dirs["-1"] / "failed.json").exists(), second.stdout

    # 3. redo=true reruns a finished job in place.
    run_cli(["-m", *FAST, "reg.strength=0", "redo=true", f"hydra.sweep.dir={sweep}"], cwd=tmp_path)
    assert (dirs["0"] / "metrics.json").stat().st_mtime_ns != kept
    assert (
        json.loads((dirs["0"] / "metrics.json").read_text())["job"]["key"]
        == (complete["0"]["job"]["key"])
    )


def test_a_crash_outside_user_errors_is_recorded_too(tmp_path: Path) -> None:
    """Any exception in a multirun job becomes failed.json with its class, not a dead sweep."""
    sweep = tmp_path / "sweep"
    # 64-wide blocks cannot have 3 heads: transformers raises a ValueError building the model
    # (a cache dir that is a file used to be the example; it is a one-line UserError now).
    proc = run_cli(
        ["-m", *FAST, "reg.strength=0", "model.architecture.n_head=3", f"hydra.sweep.dir={sweep}"],
        cwd=tmp_path,
        check=False,
    )
    assert proc.returncode == 1, proc.stderr
    (failed_path,) = sweep.glob("*/failed.json")
    failed = json.loads(failed_path.read_text())
    assert failed["type"] == "ValueError", failed
    assert "\n" not in failed["error"]


def test_a_killed_job_run_again_resumes_after_the_probes_it_had_fitted(tmp_path: Path) -> None:
    """Killed between probes and run again in the same dir (as a requeued SLURM job is), a job
    reads back the probes it had fitted, and its results equal those of an uninterrupted run."""
    # Three layers, seconds of fitting each, so the kill lands after the first probe is saved.
    args = [
        "model=tiny",
        "data.token_budget=8000",
        "data.seq_len=64",
        "tracker.mode=disabled",
        "statistics.enabled=false",
    ]
    out = tmp_path / "job"
    proc = subprocess.Popen(
        [sys.executable, "-m", "probe_sweep", *args, f"hydra.run.dir={out}"],
        cwd=tmp_path,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.time() + subprocess_timeout()
    while not (out / ".fits" / "layer_0.safetensors").exists() and time.time() < deadline:
        assert proc.poll() is None, "the job ended before its first probe was saved"
        time.sleep(0.05)
    proc.kill()
    proc.wait()
    saved = sorted(p.stem for p in (out / ".fits").glob("*.safetensors"))
    assert "layer_0" in saved and not (out / "metrics.json").exists()

    resumed = run_cli([*args, f"hydra.run.dir={out}"], cwd=tmp_path)
    lines = [line for line in resumed.stdout.splitlines() if "Resumed layer_" in line]
    assert len(lines) == len(saved) < 3, resumed.stdout
    assert not (out / ".fits").exists(), "the saved probes outlived the complete results"
    run_cli([*args, "hydra.run.dir=fresh"], cwd=tmp_path)
    got, want = (json.loads((d / "metrics.json").read_text()) for d in (out, tmp_path / "fresh"))
    keys = ("layer", "top1", "nll")
    assert [[r[k] for k in keys] for r in got["layers"]] == [
        [r[k] for k in keys] for r in want["layers"]
    ]
    assert [f["iterations"] for f in got["fits"].values()] == [
        f["iterations"] for f in want["fits"].values()
    ]


def test_saved_probes_of_another_config_are_not_read_back(tmp_path: Path) -> None:
    """The .fits dir belongs to one content key: a different config run in the same dir, or
    redo=true, fits again."""
    from probe_sweep.fitting.saved_fits import FitCheckpoint
    from probe_sweep.jobs import jobdir
    from tests.fitting.test_fit_checkpoint import a_fit

    saved, again = a_fit(), a_fit(map_weight=False)

    def fit_and_save(key: str) -> None:
        FitCheckpoint(tmp_path, key, torch.device("cpu")).get_or_fit("layer_0", lambda _: saved)

    def read_back(key: str) -> object:
        checkpoint = FitCheckpoint(tmp_path, key, torch.device("cpu"))
        return checkpoint.get_or_fit("layer_0", lambda _: again)

    fit_and_save("key-a")
    resumed = read_back("key-a")
    assert resumed is not again and torch.equal(resumed.map_weight, saved.map_weight)  # type: ignore[attr-defined]
    assert read_back("key-b") is again
    fit_and_save("key-c")
    jobdir.clear_markers(tmp_path, redo=True)
    assert read_back("key-c") is again
