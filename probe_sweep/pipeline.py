"""One job, stage by stage, in the order of the data flow in DESIGN.md:

    model -> corpus -> activation cache -> basis -> probes -> statistics -> job files

Each stage is a function of typed values that returns a small dataclass, in a module of its
own: ``hidden_states.py`` (model, corpus, cache), ``fitting.py`` (split, basis, identity
probes, scores), ``baselines.py`` (controls, random init, lenses, MDL) and ``statistics/``.
``run_job`` wires them and is the only place that knows them all (the Hydra entry only
translates the config); this module also writes the job's files.
"""

from __future__ import annotations

import logging
import resource
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from probe_sweep import baselines, files
from probe_sweep import statistics as pstats
from probe_sweep.bases import Basis
from probe_sweep.config import Config
from probe_sweep.extraction.data import TEST, TRAIN, VAL
from probe_sweep.extraction.hidden_states import Activations, pick_device
from probe_sweep.extraction.layers import LayerMode
from probe_sweep.fitting.identity import (
    Fitted,
    LayerHook,
    Scorer,
    fit_identity_probes,
    input_covariances,
    prepare_inputs,
)
from probe_sweep.fitting.inputs import Split
from probe_sweep.fitting.saved_fits import FitCheckpoint
from probe_sweep.jobs import jobdir
from probe_sweep.jobs.jobdir import JobMetrics
from probe_sweep.probes.linear import FitResult
from probe_sweep.report import plots, tables

log = logging.getLogger("probe_sweep")


def run_job(
    config: Config,
    resolved: dict[str, Any],
    out_dir: Path,
    job: dict[str, Any],
    on_layer: LayerHook | None = None,
) -> JobMetrics:
    """One job: every stage in order; returns the metrics written to ``out_dir/metrics.json``.

    ``job`` (content key, scheduler ids) is stored with them: a metrics.json that has it marks
    complete results. ``on_layer(step, row)`` is called as each layer is scored (a tuner may
    stop the job there)."""
    clock = [time.perf_counter()]
    device = pick_device(config.device)
    acts, scorer = prepare_inputs(config, device)
    split, basis = scorer.inputs.split, scorer.inputs.basis
    clock.append(time.perf_counter())

    checkpoint = FitCheckpoint(out_dir, job["key"], device)
    class_embeddings = acts.embedding[torch.from_numpy(split.classes)].to(device)
    fitted = fit_identity_probes(
        config, scorer, acts.layers, class_embeddings, checkpoint, on_layer
    )
    clock.append(time.perf_counter())
    statistics = measure(config, acts, scorer, fitted, device, checkpoint)
    clock.append(time.perf_counter())

    metrics = JobMetrics(
        **job_metrics(config, acts, split, fitted, statistics, basis.name),
        timing_s=stage_times(clock),
        resources=resources(device),
        job=job,
        config=resolved,
    )
    write_job_files(out_dir, metrics, fitted.fits, split.classes, basis)
    checkpoint.discard()
    return metrics


def measure(
    config: Config,
    acts: Activations,
    scorer: Scorer,
    fitted: Fitted,
    device: torch.device,
    checkpoint: FitCheckpoint,
) -> dict[str, Any]:
    """Statistics of the fitted probes against W_E, each read against its baselines (which add
    their own numbers to the layer rows)."""
    stats_cfg, per_layer = config.statistics, config.layers.mode is not LayerMode.pooled
    if not stats_cfg.enabled:
        return {}
    inputs, split, vocab_size = scorer.inputs, scorer.inputs.split, acts.info.vocab_size
    controls, random_init, lens = {}, None, None
    if stats_cfg.control_task:
        controls = baselines.control_probes(config, scorer, fitted, vocab_size, checkpoint)
    if stats_cfg.lens_probe and acts.unembedding is not None:
        baselines.lens_probe_scores(config, acts, scorer, fitted, checkpoint)
    if stats_cfg.random_init_baseline:
        random_init = baselines.random_init_probes(config, device, fitted, checkpoint)
    if stats_cfg.logit_lens:
        lens = baselines.lens_inputs(acts, split, stats_cfg.lens_rows)
    class_embeddings = acts.embedding[torch.from_numpy(split.classes)]
    probes = pstats.ProbeSet(
        fitted.fits, inputs.basis.encoder, class_embeddings, input_covariances(inputs, fitted)
    )
    job = pstats.JobProbes(
        probes=probes,
        rows=fitted.rows,
        embedding=acts.embedding,
        null_kind=inputs.basis.null_kind,
        random_init=random_init,
        control_fits=controls,
        lens=lens,
    )
    statistics = pstats.job_statistics(job, stats_cfg, config.seed)
    statistics["basis"] = {"name": inputs.basis.name, **inputs.basis.info}
    if stats_cfg.lens_comparison and per_layer:
        statistics["lens_comparison"] = baselines.compare_lenses(config, acts, scorer, fitted)
    if stats_cfg.mdl and per_layer:
        statistics["mdl"] = baselines.description_lengths(config, inputs, fitted, vocab_size)
    if stats_cfg.k_sweep and per_layer:
        statistics["accuracy_vs_k"] = baselines.accuracy_vs_k(config, scorer, fitted)
    return statistics


def job_metrics(
    config: Config,
    acts: Activations,
    split: Split,
    fitted: Fitted,
    statistics: dict[str, Any],
    basis_name: str,
) -> dict[str, Any]:
    """The sections of metrics.json that describe the model, probe, data and results."""
    info, rows = acts.info, split.rows
    converged = [bool(f.convergence.get("converged", True)) for f in fitted.fits.values()]
    model = {
        "name": info.name,
        "path": config.model.path,
        "model_type": info.model_type,
        "n_layers": info.n_layers,
        "d_model": info.d_model,
        "vocab_size": info.vocab_size,
        "has_unembedding": acts.unembedding is not None,
    }
    probe = {
        "kind": config.probe.kind.value,
        "layers": config.layers.mode.value,
        "basis": basis_name,
        "reg": config.reg.kind.value,
        "strength": config.reg.strength,
        "classes": config.probe.classes.value,
        "n_classes": int(len(split.classes)),
        "target_offset": config.target.offset,
        "tol": config.probe.tol,
        "all_converged": all(converged),
    }
    counts = {
        "n_sequences": int(acts.corpus.input_ids.shape[0]),
        "seq_len": int(acts.corpus.input_ids.shape[1]),
        "n_train_tokens": int(len(rows[TRAIN])),
        "n_val_tokens": int(len(rows[VAL])),
        "n_test_tokens": int(len(rows[TEST])),
        "n_train_types": split.n_train_types,
        "n_frequent_types": split.n_frequent_types,
        "n_test_unseen": int((split.labels[TEST] < 0).sum()),
        "n_outside_target": split.n_outside,
    }
    store = acts.store
    return {
        "model": model,
        "probe": probe,
        "counts": counts,
        "cache": {"key": store.meta["key"], "path": str(store.path), "reused": store.reused},
        "layers": fitted.rows,
        "fits": {name: {**f.convergence, "history": f.history} for name, f in fitted.fits.items()},
        "statistics": statistics,
        "ridge_path": ridge_path(fitted.fits, config.probe.path_strengths),
    }


def stage_times(clock: list[float]) -> dict[str, float]:
    """Seconds spent extracting, fitting and measuring, from the clock read between stages."""
    stages = ("extract", "fit", "statistics")
    return {stage: round(b - a, 2) for stage, a, b in zip(stages, clock, clock[1:], strict=False)}


def resources(device: torch.device) -> dict[str, Any]:
    """Where the job ran and its peak memory: resident (this process, MiB) and on the GPU."""
    peak_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux
    out: dict[str, Any] = {"device": str(device), "peak_rss_mb": round(peak_rss, 1)}
    if device.type == "cuda":
        out["gpu"] = torch.cuda.get_device_name(device)
        out["peak_gpu_mb"] = round(torch.cuda.max_memory_allocated(device) / 2**20, 1)
    return out


def ridge_path(fits: dict[str, FitResult], strengths: list[float]) -> dict[str, Any] | None:
    """Validation NLL along the ridge path, averaged over the fitted probes (as the objective)."""
    paths = [fit.path for fit in fits.values() if fit.path]
    if not paths:
        return None
    mean = [float(np.mean([p[i]["val_nll"] for p in paths])) for i in range(len(strengths))]
    return {"strengths": list(strengths), "val_nll": mean}


def write_job_files(
    out_dir: Path,
    metrics: JobMetrics,
    fits: dict[str, FitResult],
    classes: np.ndarray,
    basis: Basis,
) -> None:
    """Probe tensors (with the basis encoder, which maps them to natural coordinates), the
    plots, then metrics.json last (its presence marks a finished job), then the tables."""
    assert basis.encoder is not None
    tensors = {"classes": torch.from_numpy(classes), "basis.encoder": basis.encoder}
    for name, fit in fits.items():
        tensors.update({f"{name}.{k}": v for k, v in fit.probe.state_dict().items()})
        if fit.map_weight is not None:
            tensors[f"{name}.map_weight"] = fit.map_weight
    files.write_tensors(out_dir / jobdir.PROBES, tensors, {"basis": basis.name})
    probe, rows, statistics = metrics.probe, metrics.layers, metrics.statistics
    title = (
        f"{metrics.model['name']}: {probe['kind']} probe ({probe['layers']} layer), "
        f"{basis.name} basis, {probe['reg']} {probe['strength']:g}"
    )
    plots.plot_accuracy_by_layer(rows, out_dir / "accuracy_by_layer.png", title)
    if statistics.get("accuracy_vs_k"):
        points = statistics["accuracy_vs_k"]
        plots.plot_accuracy_vs_k({"": points}, out_dir / "accuracy_vs_k.png", title)
    jobdir.write_metrics(out_dir, metrics)
    log.info("Held-out scores (%s):\n%s", out_dir, tables.format_table(rows))
    if statistics.get("entries"):
        log.info("Statistics (nulls):\n%s", pstats.format_entries(statistics["entries"]))
    if any(field in row for row in rows for field in pstats.LAYER_FIELDS[1:]):
        log.info("Baselines, controls, lenses, MDL by layer:\n%s", pstats.format_layers(rows))
