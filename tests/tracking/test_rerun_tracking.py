"""A job killed after metrics.json but before tracking gets its W&B run when the sweep reruns."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest

from probe_sweep.jobs import jobdir
from tests.conftest import TINY, run_cli
from tests.wandb_reader import read_run, run_files

KEY = "0123456789abcdef0123"


def complete_job(job_dir: Path, key: str = KEY) -> None:
    job_dir.mkdir(parents=True, exist_ok=True)
    (job_dir / jobdir.METRICS).write_text(json.dumps({"job": {"key": key}, "layers": []}))


def test_a_job_is_tracked_once_marked_for_its_own_key(tmp_path: Path) -> None:
    complete_job(tmp_path)
    assert not jobdir.is_tracked(tmp_path, KEY)
    jobdir.mark_tracked(tmp_path, KEY, {"id": "abc", "mode": "offline"})
    assert jobdir.is_tracked(tmp_path, KEY)
    assert not jobdir.is_tracked(tmp_path, "f" * 20)
    marker = json.loads((tmp_path / jobdir.TRACKED).read_text())
    assert marker == {"key": KEY, "run": {"id": "abc", "mode": "offline"}}
    (tmp_path / jobdir.TRACKED).write_text("{not json")
    assert not jobdir.is_tracked(tmp_path, KEY)


def test_without_the_marker_a_run_record_newer_than_the_results_counts(tmp_path: Path) -> None:
    """Job dirs tracked before tracked.json existed are not tracked twice; a run record left
    from results that were written again since (and then killed before tracking) is stale."""
    complete_job(tmp_path)
    (tmp_path / jobdir.WANDB_RUN).write_text(json.dumps({"id": "abc"}))
    metrics_time = (tmp_path / jobdir.METRICS).stat().st_mtime_ns
    os.utime(tmp_path / jobdir.WANDB_RUN, ns=(metrics_time + 10**9, metrics_time + 10**9))
    assert jobdir.is_tracked(tmp_path, KEY)
    os.utime(tmp_path / jobdir.WANDB_RUN, ns=(metrics_time - 10**9, metrics_time - 10**9))
    assert not jobdir.is_tracked(tmp_path, KEY)


def test_running_a_job_again_drops_its_tracked_marker(tmp_path: Path) -> None:
    complete_job(tmp_path)
    jobdir.mark_tracked(tmp_path, KEY, {"id": "abc"})
    jobdir.clear_markers(tmp_path, redo=False)
    assert not (tmp_path / jobdir.TRACKED).exists() and (tmp_path / jobdir.METRICS).exists()


@pytest.mark.e2e
def test_a_rerun_tracks_a_complete_job_that_was_killed_before_tracking(tmp_path: Path) -> None:
    sweep = tmp_path / "sweep"
    wandb_root = Path(os.environ["WANDB_DIR"])  # the test's own dir (conftest), offline mode
    args = ["-m", *TINY, "layers=pooled", f"hydra.sweep.dir={sweep}"]

    run_cli(args, cwd=tmp_path)
    (metrics_path,) = sweep.glob(f"*/{jobdir.METRICS}")
    job_dir = metrics_path.parent
    key = json.loads(metrics_path.read_text())["job"]["key"]
    assert jobdir.is_tracked(job_dir, key)
    assert len(run_files(wandb_root)) == 1

    # Killed after metrics.json, before the tracker ran: no run, no record of one.
    for name in (jobdir.TRACKED, jobdir.WANDB_RUN):
        (job_dir / name).unlink()
    shutil.rmtree(wandb_root)
    written = metrics_path.stat().st_mtime_ns

    rerun = run_cli(args, cwd=tmp_path)
    output = rerun.stdout + rerun.stderr
    assert "Skipped: complete results for this config" in output
    lines = [line for line in output.splitlines() if "Tracked the results in" in line]
    assert len(lines) == 1 and str(job_dir) in lines[0], output[-3000:]
    assert metrics_path.stat().st_mtime_ns == written, "the results were computed again"
    (run_file,) = run_files(wandb_root)
    run = read_run(run_file)
    assert run.exit_code == 0
    assert run.config["job"]["out_dir"] == str(job_dir)
    assert run.rows_with("by_layer/top1"), "the run holds no per-layer results"
    marker = json.loads((job_dir / jobdir.TRACKED).read_text())
    assert marker["key"] == key and marker["run"]["id"] == run.run.run_id
    assert jobdir.is_tracked(job_dir, key)

    # Tracked now: a further rerun skips without a second run.
    again = run_cli(args, cwd=tmp_path)
    assert "Tracked the results in" not in again.stdout + again.stderr
    assert len(run_files(wandb_root)) == 1


@pytest.mark.e2e
def test_a_job_run_again_is_one_offline_run_not_two(tmp_path: Path) -> None:
    """Rerunning a finished single job wrote a second complete offline run beside the first,
    and a kill while logging left an orphan: ``wandb sync`` uploaded both. One job dir is one
    run, resumed by its id; the run files of earlier attempts are replaced."""
    wandb_root = Path(os.environ["WANDB_DIR"])  # offline mode (conftest)
    args = [*TINY, "statistics.enabled=false", "hydra.run.dir=out"]
    run_cli(args, tmp_path)
    first = json.loads((tmp_path / "out" / jobdir.WANDB_RUN).read_text())
    (orphan,) = run_files(wandb_root)
    killed = orphan.parent.with_name(orphan.parent.name.replace("offline-run-2", "offline-run-1"))
    shutil.copytree(orphan.parent, killed)  # as an attempt killed while logging leaves it

    run_cli(args, tmp_path)
    again = json.loads((tmp_path / "out" / jobdir.WANDB_RUN).read_text())
    assert again["id"] == first["id"]
    (path,) = run_files(wandb_root)
    assert read_run(path).run.run_id == first["id"] and read_run(path).exit_code == 0

    run_cli([*args, "seed=1"], tmp_path)  # other results in the same dir: their own run
    other = json.loads((tmp_path / "out" / jobdir.WANDB_RUN).read_text())
    (path,) = run_files(wandb_root)
    assert other["id"] != first["id"] and read_run(path).run.run_id == other["id"]
