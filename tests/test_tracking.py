"""W&B tracking with real wandb (offline), read back from the run file; and its failure modes."""

from __future__ import annotations

import json
import logging
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch

from probe_sweep import tracking
from probe_sweep.statistics.nulls import null_entry
from probe_sweep.tracking import JobInfo, TrackerConfig, TrackerMode
from tests.conftest import TINY, run_cli
from tests.wandb_reader import read_records, read_run, run_files


def _entry(name: str, layer: int | None, observed: float, null_mean: float) -> dict[str, Any]:
    """A statistic as production writes it (the real ``null_entry``, on seeded draws)."""
    draws = null_mean + 0.05 * torch.randn(99, generator=torch.Generator().manual_seed(0))
    ci = [observed - 0.02, observed + 0.02]
    return null_entry(name, layer, observed, draws, "greater", ci)


STATISTICS = {
    "entries": [
        _entry("probe_embedding_cosine", 0, 0.8, 0.1),
        _entry("probe_embedding_cosine", 2, 0.3, 0.1),
        _entry("weight_to_variance_bottom_half", 0, 1.1, 1.0),
    ],
    "weight_mass": {},
    "logit_lens": [],
}


def fake_job(
    out_dir: Path,
    top1: list[float],
    statistics: dict[str, Any] | None = None,
    basis: str = "natural",
) -> dict[str, Any]:
    """A job dir as run_job leaves it: probes.safetensors, a PNG, metrics.json last."""
    out_dir.mkdir(parents=True, exist_ok=True)
    n_classes, d = 12, 8
    generator = torch.Generator().manual_seed(len(top1))
    tensors = {"classes": torch.arange(n_classes)}
    rows = []
    for layer, acc in enumerate(top1):
        tensors[f"layer_{layer}.weight"] = torch.randn(n_classes, d, generator=generator)
        tensors[f"layer_{layer}.bias"] = torch.zeros(n_classes)
        rows.append(
            {
                "layer": layer,
                "probe": f"layer_{layer}",
                "top1": acc,
                "top5": min(1.0, acc + 0.1),
                "nll": 2.0 - acc,
                "top1_frequent": acc,
                "top1_rare": None,
                "n_test": 100,
                "n_unseen": 3,
                "top1_ci": [acc - 0.01, min(1.0, acc + 0.01)],
                "iterations": 30,
                "grad_norm_rel": 5e-5,
                "converged": True,
            }
        )
    tracking.write_tensors(out_dir / "probes.safetensors", tensors, {"basis": basis})
    tracking.plot_accuracy_by_layer(rows, out_dir / "accuracy_by_layer.png", "test")
    metrics = {
        "schema_version": tracking.SCHEMA_VERSION,
        "model": {"name": "tiny-gpt2", "n_layers": len(top1) - 1, "d_model": d},
        "probe": {
            "kind": "softmax",
            "layers": "each",
            "basis": basis,
            "reg": "l2",
            "strength": 1e-4,
            "classes": "seen",
            "n_classes": n_classes,
        },
        "counts": {"n_train_tokens": 1000, "n_test_tokens": 100},
        "timing_s": {"extract": 1.0, "fit": 2.0},
        "layers": rows,
        "fits": {
            f"layer_{layer}": {
                "solver": "lbfgs",
                "iterations": 30,
                "converged": True,
                "history": [{"evaluation": e, "objective": 3.0 - e / 10} for e in range(3)],
            }
            for layer in range(len(top1))
        },
        "config": {"basis": {"kind": basis}},
    }
    if statistics is not None:
        metrics["statistics"] = statistics
    tracking.write_json(out_dir / "metrics.json", metrics)
    return metrics


def offline(**kwargs: Any) -> TrackerConfig:
    return TrackerConfig(mode=TrackerMode.offline, **kwargs)


def test_null_statistics_are_found_wherever_they_sit() -> None:
    metrics = {
        "statistics": STATISTICS,
        "layers": [
            {"layer": 1, "statistics": {"norm": {"observed": 1, "p": 0.6}}},
            {"layer": 2},
        ],
    }
    stats = {s["name"]: s for s in tracking.null_statistics(metrics)}
    assert set(stats) == {
        "entries/probe_embedding_cosine/layer_0",
        "entries/probe_embedding_cosine/layer_2",
        "entries/weight_to_variance_bottom_half/layer_0",
        "layer_1/norm",
    }
    assert stats["entries/probe_embedding_cosine/layer_2"]["layer"] == 2
    assert stats["entries/probe_embedding_cosine/layer_0"]["p"] == 0.01  # its floor, 1/100
    assert tracking.null_statistics({"layers": []}) == []


def test_auto_mode_is_offline_without_a_key_and_online_with_one(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.delenv("WANDB_MODE")
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.setenv("NETRC", str(tmp_path / "no-netrc"))
    monkeypatch.setenv("HOME", str(tmp_path))
    auto = TrackerConfig()
    assert tracking.resolve_mode(auto) == "offline"
    monkeypatch.setenv("WANDB_API_KEY", "k" * 40)
    assert tracking.resolve_mode(auto) == "online"
    monkeypatch.setenv("WANDB_MODE", "offline")
    assert tracking.resolve_mode(auto) == "offline"
    assert tracking.resolve_mode(TrackerConfig(mode=TrackerMode.online)) == "online"
    monkeypatch.setenv("WANDB_MODE", "disabled")
    assert tracking.resolve_mode(auto) == "disabled"


def test_a_job_becomes_one_offline_run_with_everything_logged(tmp_path: Path) -> None:
    job_dir = tmp_path / "sweep" / "3_basis=pca"
    metrics = fake_job(job_dir, [0.9, 0.8, 0.6], STATISTICS, basis="pca")
    job = JobInfo(
        out_dir=job_dir,
        choices={"model": "tiny", "probe": "softmax", "layers": "each", "basis": "pca"},
        overrides=["basis=pca"],
        sweep_dir=tmp_path / "sweep",
        num=3,
    )
    resolved = {"basis": {"kind": "pca"}, "seed": 0, "tracker": {"mode": "offline"}}
    info = tracking.track_job(offline(tags=["mine"]), job, resolved)

    assert info is not None and info["mode"] == "offline"
    assert json.loads((job_dir / "wandb_run.json").read_text()) == info
    assert (job_dir / "probe_weights.png").is_file()
    assert (job_dir / "probe_weight_mass.png").is_file()
    (path,) = run_files(tmp_path / "wandb")
    assert path.parent == Path(info["run_dir"])
    run = read_run(path)
    assert run.exit_code == 0
    assert run.run.run_id == info["id"]
    assert run.run.run_group == info["group"] and info["group"].endswith("sweep")
    assert run.run.job_type == "softmax-each"
    assert run.run.display_name == "#3 pca · softmax/each · l2=0.0001 · tiny-gpt2"
    assert run.tags == ["model:tiny", "probe:softmax", "layers:each", "basis:pca", "mine"]
    assert run.config["basis"] == {"kind": "pca"} and run.config["seed"] == 0
    assert run.config["job"]["overrides"] == ["basis=pca"]

    # Per-layer curves on a layer x-axis, fit curves on a solver-evaluation x-axis.
    assert run.metrics["by_layer/*"].step_metric == "layer"
    assert run.metrics["fit/*"].step_metric == "evaluation"
    by_layer = run.rows_with("by_layer/top1")
    assert [(r["layer"], r["by_layer/top1"]) for r in by_layer] == [(0, 0.9), (1, 0.8), (2, 0.6)]
    assert "by_layer/top1_rare" not in by_layer[0]  # None is not a number to plot
    # Null statistics that name their layer are curves on the same axis.
    key = "by_layer/null/entries/probe_embedding_cosine/observed"
    assert {r["layer"]: r.get(key) for r in by_layer} == {0: 0.8, 1: None, 2: 0.3}
    curve = run.rows_with("fit/layer_2/objective")
    assert [r["evaluation"] for r in curve] == [0, 1, 2]
    assert [r["fit/layer_2/objective"] for r in curve] == pytest.approx([3.0, 2.9, 2.8])

    # Summary: per-layer scores by name, the headline numbers, every null statistic.
    summary = run.summary
    assert summary["top1/layer_1"] == 0.8 and summary["best_layer"] == 0
    assert summary["top1_last"] == 0.6
    assert summary["null/entries/probe_embedding_cosine/layer_0/observed"] == 0.8
    assert summary["null/entries/weight_to_variance_bottom_half/layer_0/p"] > 0.01
    for field in tracking.STAT_FIELDS:
        assert f"null/entries/probe_embedding_cosine/layer_2/{field}" in summary
    assert summary["counts/n_train_tokens"] == 1000

    # Tables and images are in the run's files.
    files = run_dir_files(Path(info["run_dir"]))
    stats_table = json.loads(files["tables/null_statistics"].read_text())
    assert stats_table["columns"][:5] == ["name", *tracking.STAT_FIELDS]
    assert len(stats_table["data"]) == 3
    layer_table = json.loads(files["tables/per_layer"].read_text())
    assert [row[0] for row in layer_table["data"]] == [0, 1, 2]
    assert {"images/accuracy_by_layer", "images/probe_weights", "images/probe_weight_mass"} <= set(
        files
    )

    # The weights: a versioned artifact with the safetensors file and metadata.
    (artifact,) = [a for a in run.artifacts if a.type == "probes"]
    assert artifact.name == info["artifact"] and artifact.name.startswith("probes-tiny-gpt2-")
    assert "latest" in artifact.aliases
    contents = run.artifact_files(artifact)
    assert set(contents) == {"probes.safetensors", "metrics.json"}
    assert contents["probes.safetensors"].size == (job_dir / "probes.safetensors").stat().st_size
    meta = run.artifact_metadata(artifact)
    assert meta["tensors"]["layer_0.weight"] == [12, 8]
    assert meta["probe"]["basis"] == "pca" and meta["top1_by_layer"]["2"] == 0.6
    # Nothing on disk was changed by tracking.
    assert json.loads((job_dir / "metrics.json").read_text()) == metrics


def run_dir_files(run_dir: Path) -> dict[str, Path]:
    """Media files of an offline run by the key they were logged under (``tables/per_layer``)."""
    found = {}
    for path in (run_dir / "files" / "media").rglob("*"):
        if path.is_file():
            rel = path.relative_to(run_dir / "files" / "media").as_posix()
            key = rel.split("/", 1)[1].rsplit("_", 2)[0]  # images/x_12_hash.png -> x
            found[key] = path
    return found


def test_jobs_in_one_process_are_separate_finished_runs(tmp_path: Path) -> None:
    """The joblib launcher reuses processes: each job's run must end before the next starts."""
    ids = []
    for num, top1 in enumerate(([0.9, 0.5], [0.7, 0.6, 0.5])):
        job_dir = tmp_path / "sweep" / f"{num}_x"
        fake_job(job_dir, top1)
        job = JobInfo(out_dir=job_dir, sweep_dir=tmp_path / "sweep", num=num)
        ids.append(tracking.track_job(offline(), job, {"n": num})["id"])  # type: ignore[index]
    paths = run_files(tmp_path / "wandb")
    runs = {read_run(p).run.run_id: read_run(p) for p in paths}
    assert len(set(ids)) == 2 and set(runs) == set(ids)
    first, second = runs[ids[0]], runs[ids[1]]
    assert first.exit_code == 0 and second.exit_code == 0
    assert [r["layer"] for r in first.rows_with("by_layer/top1")] == [0, 1]
    assert [r["layer"] for r in second.rows_with("by_layer/top1")] == [0, 1, 2]
    assert first.config["n"] == 0 and second.config["n"] == 1
    assert first.run.run_group == second.run.run_group


@pytest.mark.e2e
def test_disabled_tracker_never_imports_wandb(tmp_path: Path) -> None:
    job_dir = tmp_path / "job"
    fake_job(job_dir, [0.9, 0.8])
    code = (
        "import sys; from pathlib import Path; from probe_sweep import tracking as t\n"
        "cfg = t.TrackerConfig(mode=t.TrackerMode.disabled)\n"
        f"assert t.track_job(cfg, t.JobInfo(out_dir=Path({str(job_dir)!r})), {{}}) is None\n"
        "print('wandb' in sys.modules)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"
    assert (job_dir / "probe_weights.png").is_file()  # the images do not depend on W&B
    assert not (job_dir / "wandb_run.json").exists()


def test_a_wandb_dir_that_cannot_be_written_is_one_warning(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    job_dir = tmp_path / "job"
    metrics = fake_job(job_dir, [0.9, 0.8])
    blocker = tmp_path / "not-a-dir"
    blocker.write_text("a file where wandb wants a directory")
    with caplog.at_level(logging.WARNING, logger="probe_sweep.tracking"):
        info = tracking.track_job(offline(dir=str(blocker)), JobInfo(out_dir=job_dir), {})
    assert info is None
    warnings = [r for r in caplog.records if r.levelno >= logging.WARNING]
    assert len(warnings) == 1 and "W&B tracking (offline) failed" in warnings[0].getMessage()
    assert str(job_dir) in warnings[0].getMessage()
    assert json.loads((job_dir / "metrics.json").read_text()) == metrics
    assert not (job_dir / "wandb_run.json").exists()


def test_reader_rejects_a_corrupted_run_file(tmp_path: Path) -> None:
    job_dir = tmp_path / "job"
    fake_job(job_dir, [0.9])
    tracking.track_job(offline(), JobInfo(out_dir=job_dir), {})
    (path,) = run_files(tmp_path / "wandb")
    assert len(read_records(path)) > 5
    data = bytearray(path.read_bytes())
    data[200] ^= 0xFF
    path.write_bytes(bytes(data))
    with pytest.raises(ValueError, match="CRC mismatch|truncated|unexpected chunk"):
        read_records(path)


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


@pytest.mark.e2e
def test_cli_job_auto_mode_without_key_logs_offline(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("WANDB_MODE")
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    env = {"NETRC": str(tmp_path / "none"), "HOME": str(tmp_path)}
    run_cli([*TINY, "layers=pooled", "hydra.run.dir=out"], cwd=tmp_path, env=env)
    info = json.loads((tmp_path / "out" / "wandb_run.json").read_text())
    assert info["mode"] == "offline" and info["group"] is None
    run = read_run(next(Path(info["run_dir"]).glob("run-*.wandb")))
    assert run.run.job_type == "softmax-pooled"
    assert run.config["model"]["name"] == "tiny-gpt2"  # the resolved config
    assert run.config["tracker"]["mode"] == "auto"
    # A pooled probe has one fit curve, scored at every layer.
    fit_curves = [k for k in run.summary if k.startswith("fit/") and k.endswith("objective")]
    assert "fit/pooled/objective" in fit_curves and "fit/layer_0/objective" not in fit_curves
    assert [r["layer"] for r in run.rows_with("by_layer/top1")] == [0, 1, 2]
