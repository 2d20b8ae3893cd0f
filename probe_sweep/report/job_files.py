"""What a finished job leaves in its directory besides its metrics: the probe tensors, the
plots and the tables in the log. metrics.json is written last: its presence marks a finished
job (``jobs/jobdir.py``)."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import torch

from probe_sweep import files
from probe_sweep.bases import Basis
from probe_sweep.jobs import jobdir
from probe_sweep.jobs.jobdir import JobMetrics
from probe_sweep.probes.linear import FitResult
from probe_sweep.report import plots, tables

log = logging.getLogger("probe_sweep")


def write_job_files(
    out_dir: Path,
    metrics: JobMetrics,
    fits: dict[str, FitResult],
    classes: np.ndarray,
    basis: Basis,
) -> None:
    """Probe tensors (with the basis encoder, which maps them to natural coordinates), the
    plots (accuracy by layer and against k, the probe weights and their mass by basis column),
    then metrics.json last, then the tables to the log."""
    assert basis.encoder is not None
    tensors = {"classes": torch.from_numpy(classes), "basis.encoder": basis.encoder}
    for name, fit in fits.items():
        tensors.update({f"{name}.{k}": v for k, v in fit.probe.state_dict().items()})
        if fit.map_weight is not None:
            tensors[f"{name}.map_weight"] = fit.map_weight
    files.write_tensors(out_dir / jobdir.PROBES, tensors, {"basis": basis.name})
    plots.plot_probe_weights(out_dir / jobdir.PROBES, out_dir)
    probe, layers, statistics = metrics.probe, metrics.layers, metrics.statistics
    title = (
        f"{metrics.model.name}: {probe.kind} probe ({probe.layers} layer), "
        f"{basis.name} basis, {probe.reg} {probe.strength:g}"
    )
    plots.plot_accuracy_by_layer(layers, out_dir / "accuracy_by_layer.png", title)
    if statistics is not None and statistics.accuracy_vs_k:
        points = [point.__dict__ for point in statistics.accuracy_vs_k]
        plots.plot_accuracy_vs_k({"": points}, out_dir / "accuracy_vs_k.png", title)
    jobdir.write_metrics(out_dir, metrics)
    scores = [layer.scores for layer in layers]
    log.info("Held-out scores (%s):\n%s", out_dir, tables.format_table(scores, metrics.fits))
    if statistics is not None and statistics.entries:
        log.info("Statistics (nulls):\n%s", tables.format_entries(statistics.entries))
    baselines = tables.format_layers(layers)
    if baselines:
        log.info("Baselines, controls, lenses, MDL by layer:\n%s", baselines)
