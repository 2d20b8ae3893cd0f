"""The sweep report: every job side by side, read from the job dirs (no job results from Hydra)."""

from __future__ import annotations

import csv
import json
import logging
import re
import struct
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from probe_sweep import files
from probe_sweep.jobs import sweep as sweep_jobs
from probe_sweep.report import sweep as report
from tests.conftest import TINY, run_cli
from tests.job_dirs import fake_job, sample_metrics
from tests.wandb_reader import read_run

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def png_size(path: Path) -> tuple[int, int]:
    data = path.read_bytes()
    assert data[:8] == PNG_MAGIC, f"{path} is not a PNG"
    return struct.unpack(">II", data[16:24])


def hydra_files(job_dir: Path, overrides: list[str]) -> None:
    (job_dir / ".hydra").mkdir(parents=True, exist_ok=True)
    (job_dir / ".hydra" / "overrides.yaml").write_text(OmegaConf.to_yaml(overrides))


def make_sweep(sweep: Path) -> None:
    """Five jobs: two finished (one with null statistics), one failed, one killed, one skipped."""
    common = ["model=tiny", "data.token_budget=4000"]
    for num, (basis, top1) in enumerate((("natural", [0.9, 0.8, 0.7]), ("pca", [0.95, 0.6, 0.4]))):
        job = sweep / f"{num}_basis={basis}"
        hydra_files(job, [*common, f"basis={basis}"])
        fake_job(job, top1, statistics=basis == "pca", basis=basis)
    failed = sweep / "2_basis=nmf"
    hydra_files(failed, [*common, "basis=nmf"])
    failure = {"error": "NMF did not converge", "type": "RuntimeError", "overrides": ["basis=nmf"]}
    files.write_json(failed / "failed.json", failure)
    hydra_files(sweep / "3_basis=random", [*common, "basis=random"])
    hydra_files(sweep / "4_basis=pca", [*common, "basis=pca"])
    files.write_json(sweep / "4_basis=pca" / "skipped.json", {"key": "k", "results": "1_basis=pca"})


def test_report_puts_every_job_side_by_side(tmp_path: Path) -> None:
    sweep = tmp_path / "sweep"
    make_sweep(sweep)
    path = report.write_sweep_report(sweep)
    assert path == sweep / "report.md"
    text = path.read_text()

    jobs = sweep_jobs.read_jobs(sweep)
    assert [(j.num, j.status) for j in jobs] == [
        (0, "finished"),
        (1, "finished"),
        (2, "failed"),
        (3, "incomplete"),
        (4, "skipped"),
    ]
    # Labels name only what varies across the sweep.
    assert [j.label for j in jobs] == [
        "#0 basis=natural",
        "#1 basis=pca",
        "#2 basis=nmf",
        "#3 basis=random",
        "#4 basis=pca",
    ]
    assert "5 jobs: 2 finished, 1 failed, 1 skipped, 0 pruned, 1 incomplete" in text
    assert (
        "| #1 basis=pca | finished | tiny-gpt2 | softmax | each | pca | l2 0.0001 | 0.9500 |"
        in (text)
    )
    # The plot, and the top-1 table under it.
    assert f"]({report.PLOT})" in text
    width, height = png_size(sweep / report.PLOT)
    assert width > 1000 and height > 400
    assert "| #0 basis=natural | 0.9000 | 0.8000 | 0.7000 |" in text
    # One table per statistic, jobs as rows and layers as columns, value [95% CI]; a figure each.
    stats = section(text, "## Statistics by layer")
    cosine = stats[stats.index("### probe_embedding_cosine") :]
    cosine = cosine[: cosine.index("\n### ")] if "\n### " in cosine else cosine
    values = [
        e
        for e in sample_metrics()["statistics"]["entries"]
        if e["name"] == "probe_embedding_cosine"
    ]
    cells = " | ".join(f"{e['observed']:.3f} [{e['ci'][0]:.3f}, {e['ci'][1]:.3f}]" for e in values)
    assert "| job | layer 0 | layer 1 | layer 2 |" in cosine
    assert f"| #1 basis=pca | {cells} |" in cosine
    assert "#0 basis=natural" not in cosine
    top1 = stats[stats.index("### top1") :]
    assert "| #0 basis=natural | 0.900 [0.890, 0.910] |" in top1
    assert png_size(sweep / "report_probe_embedding_cosine.png")[0] > 500
    # Failed and incomplete jobs are listed.
    failed = section(text, "## Failed jobs")
    assert "| #2 basis=nmf | RuntimeError | NMF did not converge |" in failed
    assert "#3 basis=random" in failed and "3_basis=random" in failed
    assert "- #4 basis=pca: results in `1_basis=pca`" in failed
    # Per-layer scores as CSV, one row per finished job and layer.
    with (sweep / report.CSV).open() as f:
        rows = list(csv.DictReader(f))
    assert [(r["job"], r["layer"]) for r in rows][:4] == [
        ("#0 basis=natural", "0"),
        ("#0 basis=natural", "1"),
        ("#0 basis=natural", "2"),
        ("#1 basis=pca", "0"),
    ]
    assert float(rows[4]["top1"]) == 0.6


def section(text: str, heading: str) -> str:
    start = text.index(heading)
    end = text.find("\n## ", start + 1)
    return text[start : end if end >= 0 else None]


def test_report_with_no_finished_job_still_lists_the_failures(tmp_path: Path) -> None:
    sweep = tmp_path / "sweep"
    job = sweep / "0_reg.strength=-1"
    hydra_files(job, ["reg.strength=-1"])
    files.write_json(job / "failed.json", {"error": "boom", "type": "ValueError"})
    text = report.write_sweep_report(sweep).read_text()
    assert "No finished job." in text and "| ValueError | boom |" in text
    assert not (sweep / report.PLOT).exists()


def test_callback_never_breaks_the_multirun(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    blocked = tmp_path / "file"
    blocked.write_text("not a directory")
    config = OmegaConf.create({"hydra": {"sweep": {"dir": str(blocked)}}})
    with caplog.at_level(logging.WARNING, logger="probe_sweep.report.sweep"):
        report.SweepReportCallback().on_multirun_end(config)
    assert ["Could not write the sweep report" in r.getMessage() for r in caplog.records] == [True]


def test_report_can_be_written_again_from_the_command_line(tmp_path: Path) -> None:
    sweep = tmp_path / "sweep"
    make_sweep(sweep)
    assert report.main([str(sweep)]) == 0
    assert (sweep / "report.md").is_file()
    assert report.main([str(tmp_path / "missing")]) == 2


@pytest.mark.e2e
def test_multirun_gives_one_wandb_group_and_a_report(tmp_path: Path) -> None:
    """The issue's acceptance run, on the tiny model: a 2-job sweep with no network. The second
    job reuses the cache entry the first computed, computing none."""
    proc = run_cli(["-m", *TINY, "reg.strength=0,0.001", "hydra.sweep.dir=sweep"], cwd=tmp_path)
    sweep = tmp_path / "sweep"
    assert "Sweep report: " in proc.stdout + proc.stderr
    strengths = [
        json.loads(p.read_text())["probe"]["strength"] for p in sweep.glob("*/metrics.json")
    ]
    assert sorted(strengths) == [0.0, 0.001]
    computed = re.findall(r"Cached activations for \d+ layers at (\S+)", proc.stdout)
    reused = re.findall(r"Reusing cached activations (\S+)", proc.stdout)
    assert computed and sorted(reused) == sorted(computed), proc.stdout
    infos = [json.loads(p.read_text()) for p in sorted(sweep.glob("*/wandb_run.json"))]
    assert len(infos) == 2 and len({i["id"] for i in infos}) == 2
    assert {i["group"] for i in infos} == {"sweep"}
    runs = [read_run(next(Path(i["run_dir"]).glob("run-*.wandb"))) for i in infos]
    assert [r.run.display_name for r in runs] == [
        "#0 natural · softmax/each · l2=0 · tiny-gpt2",
        "#1 natural · softmax/each · l2=0.001 · tiny-gpt2",
    ]
    for run in runs:
        assert run.exit_code == 0 and run.run.run_group == "sweep"
        assert {"model:tiny", "basis:natural", "probe:softmax", "layers:each"} <= set(run.tags)
        assert [r["layer"] for r in run.rows_with("by_layer/top1")] == [0, 1, 2]
        assert any(a.type == "probes" for a in run.artifacts)
    assert runs[1].config["reg"]["strength"] == 0.001

    text = (sweep / "report.md").read_text()
    assert "2 jobs: 2 finished, 0 failed, 0 skipped, 0 pruned, 0 incomplete" in text
    assert "#0 reg.strength=0 " in text and "#1 reg.strength=0.001 " in text
    assert "wandb sync " + " ".join(i["run_dir"] for i in infos) in text
    png_size(sweep / report.PLOT)


def test_report_checks_that_rotated_bases_give_the_rotated_probe(tmp_path: Path) -> None:
    """Two jobs that differ only in an orthonormal basis: the report maps both probes to natural
    coordinates with the saved encoder and prints their largest relative difference."""
    import numpy as np
    import torch

    sweep = tmp_path / "sweep"
    q, _ = torch.linalg.qr(torch.randn(8, 8, generator=torch.Generator().manual_seed(0)))
    weight = torch.randn(12, 8, generator=torch.Generator().manual_seed(1))
    for num, (kind, encoder) in enumerate((("natural", torch.eye(8)), ("pca", q))):
        job = sweep / f"{num}_basis={kind}"
        hydra_files(job, [f"basis={kind}"])
        fake_job(job, [0.9], basis=kind)  # configs that differ only in the basis
        tensors = {"classes": torch.arange(12), "basis.encoder": encoder}
        tensors["layer_0.weight"] = weight @ encoder  # the same probe, read in this basis
        files.write_tensors(job / "probes.safetensors", tensors, {"basis": kind})
    text = report.write_sweep_report(sweep).read_text()
    lines = section(text, "## Orthonormal bases under l2")
    row = next(line for line in lines.splitlines() if line.startswith("| #1 basis=pca |"))
    deviation = float(row.split("|")[3])
    assert deviation < 1e-5 and np.isfinite(deviation)


def test_report_draws_accuracy_against_k_for_every_job_that_has_it(tmp_path: Path) -> None:
    sweep = tmp_path / "sweep"
    job = sweep / "0_basis=pca"
    hydra_files(job, ["basis=pca"])
    metrics = fake_job(job, [0.9, 0.8], statistics=True)
    points = [
        {"layer": layer, "k": k, "kind": kind, "seed": seed, "top1": 0.5 + k / 100,
         "top1_ci": [0.45 + k / 100, 0.55 + k / 100], "converged": True}
        for layer in (0, 1)
        for k in (4, 8)
        for kind, seed in (("top", None), ("bottom", None), ("random", 0), ("random", 1))
    ]  # fmt: skip
    metrics["statistics"]["accuracy_vs_k"] = points
    files.write_json(job / "metrics.json", metrics)
    text = report.write_sweep_report(sweep).read_text()
    assert f"]({report.K_PLOT})" in section(text, "## Accuracy against k")
    width, height = png_size(sweep / report.K_PLOT)
    assert width > 600 and height > 300
