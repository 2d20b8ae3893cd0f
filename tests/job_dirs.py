"""A finished job's dir as production leaves it, for the tests of what reads job dirs (the
tracker, the sweep report), without running a job.

The metrics are real: ``tests/data/metrics_tiny.json`` is the ``metrics.json`` of

    python -m probe_sweep model=tiny data.token_budget=4000 data.seq_len=64 \\
        statistics.random_init_baseline=false hydra.run.dir=<dir>

and ``metrics_tiny_no_statistics.json`` the same with ``statistics.enabled=false``.
``fake_job`` only sets the top-1 scores a test wants and keeps the first layers.
test_tracking's end-to-end test fails when production's metrics.json no longer has this shape;
``python -m tests.job_dirs`` then writes both files again from the code as it is.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

import torch

from probe_sweep import files
from probe_sweep.report import plots
from probe_sweep.results import LayerResult

DATA = Path(__file__).parent / "data"
SAMPLES = {True: DATA / "metrics_tiny.json", False: DATA / "metrics_tiny_no_statistics.json"}
SAMPLE_ARGS = [
    "model=tiny",
    "data.token_budget=4000",
    "data.seq_len=64",
    "statistics.random_init_baseline=false",
]


def sample_metrics(statistics: bool = True) -> dict[str, Any]:
    """A fresh copy of a real metrics.json (three layers: 0 = embeddings, then two blocks)."""
    return json.loads(SAMPLES[statistics].read_text())


def fake_job(
    out_dir: Path, top1: list[float], statistics: bool = False, basis: str = "natural"
) -> dict[str, Any]:
    """A job dir as ``run_job`` leaves it: probes.safetensors, the PNGs, then metrics.json.
    The metrics are the real sample's, cut to its first ``len(top1)`` layers, with these top-1
    accuracies (95% interval +-0.01) and ``basis`` as the basis's name."""
    metrics = sample_metrics(statistics)
    rows = metrics["layers"][: len(top1)]
    assert len(rows) == len(top1), f"the sample has {len(metrics['layers'])} layers"
    for row, acc in zip(rows, top1, strict=True):
        row["top1"], row["top1_ci"] = acc, [acc - 0.01, min(1.0, acc + 0.01)]
    layers, probes = {row["layer"] for row in rows}, {row["probe"] for row in rows}
    metrics["layers"] = rows
    metrics["fits"] = {name: fit for name, fit in metrics["fits"].items() if name in probes}
    stats = metrics["statistics"]
    if stats:
        stats["entries"] = [e for e in stats["entries"] if e["layer"] in layers]
        stats["weight_mass"] = {k: v for k, v in stats["weight_mass"].items() if k in probes}
        stats["basis"]["name"] = basis
    metrics["probe"]["basis"] = metrics["config"]["basis"]["kind"] = basis

    out_dir.mkdir(parents=True, exist_ok=True)
    n_classes, d = metrics["probe"]["n_classes"], metrics["model"]["d_model"]
    generator = torch.Generator().manual_seed(len(top1))
    tensors = {"classes": torch.arange(n_classes), "basis.encoder": torch.eye(d)}
    for name in sorted(probes):
        tensors[f"{name}.weight"] = torch.randn(n_classes, d, generator=generator)
        tensors[f"{name}.bias"] = torch.zeros(n_classes)
        tensors[f"{name}.mean"] = torch.zeros(d)
        tensors[f"{name}.scale"] = torch.tensor(1.0)
    files.write_tensors(out_dir / "probes.safetensors", tensors, {"basis": basis})
    plots.plot_probe_weights(out_dir / "probes.safetensors", out_dir)
    results = [LayerResult.from_row(row) for row in rows]
    plots.plot_accuracy_by_layer(results, out_dir / "accuracy_by_layer.png", "test")
    files.write_json(out_dir / "metrics.json", metrics)
    return metrics


def write_samples() -> None:
    """Run the two tiny jobs (about a minute) and keep their metrics.json as the samples."""
    env = {**os.environ, "WANDB_MODE": "disabled"}
    for statistics, target in SAMPLES.items():
        with tempfile.TemporaryDirectory() as out:
            extra = [] if statistics else ["statistics.enabled=false"]
            args = [*SAMPLE_ARGS, *extra, f"hydra.run.dir={out}"]
            subprocess.run([sys.executable, "-m", "probe_sweep", *args], env=env, check=True)
            target.write_text((Path(out) / "metrics.json").read_text())
            print(f"wrote {target}")


if __name__ == "__main__":
    write_samples()
