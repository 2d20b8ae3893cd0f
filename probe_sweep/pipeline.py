"""One job, stage by stage, in the order of the data flow in DESIGN.md:

    checks -> extraction -> bases -> fitting (identity probes, then baselines) -> statistics
           -> job files

Each stage runs once: the random-init model's hidden states, basis and probes come from the same
stage functions as the trained model's, called here beside them. Each stage returns its own
typed results (``results.py``) and nobody edits them afterwards; ``run_job`` puts a layer's
parts side by side. This is the only module that knows every stage (the Hydra entry only
translates the config).
"""

from __future__ import annotations

import dataclasses
import logging
import resource
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from probe_sweep.bases import Basis, build_basis, check_basis_config
from probe_sweep.config import Config
from probe_sweep.extraction.data import TEST, TRAIN, VAL
from probe_sweep.extraction.hidden_states import (
    Activations,
    cache_activations,
    describe_model,
    pick_device,
)
from probe_sweep.extraction.labels import Split, split_labels
from probe_sweep.extraction.layers import resolve_layers
from probe_sweep.fitting.identity import LayerHook
from probe_sweep.fitting.job_probes import Model, Probes, fit_job_probes, model_inputs
from probe_sweep.fitting.saved_fits import FitCheckpoint
from probe_sweep.intervals import SequenceBootstrap
from probe_sweep.jobs.jobdir import JobMetrics
from probe_sweep.probes.kinds import ProbeKind, probe_kind
from probe_sweep.report.job_files import write_job_files
from probe_sweep.results import (
    CacheUse,
    Counts,
    JobStatistics,
    LayerResult,
    ModelSummary,
    ProbeSummary,
)
from probe_sweep.statistics import JobProbes, Measured, job_statistics

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
    complete results. ``on_layer(step, scores)`` is called as each layer is scored (a tuner may
    stop the job there)."""
    check_inputs(config)
    clock = [time.perf_counter()]
    device = pick_device(config.device)
    trained, random = extract(config, device)
    split, models = prepare(config, [a for a in (trained, random) if a is not None], device)
    clock.append(time.perf_counter())
    checkpoint = FitCheckpoint(out_dir, job["key"], device)
    kind = probe_kind(config.probe.kind)
    probes = fit_job_probes(config, kind, models, checkpoint, on_layer)
    clock.append(time.perf_counter())
    measured = measure(config, kind, models[0], probes)
    clock.append(time.perf_counter())
    basis = models[0].inputs.basis
    metrics = JobMetrics(
        **job_sections(config, trained, split, probes, measured, basis),
        timing_s=stage_times(clock),
        resources=resources(device),
        job=job,
        config=resolved,
    )
    write_job_files(out_dir, metrics, probes.fitted.fits, split.classes, basis)
    checkpoint.discard()
    return metrics


def check_inputs(config: Config) -> None:
    """The checks that need the model's shape, before any work (a bad basis or layer setting
    fails in seconds, not after an extraction)."""
    info = describe_model(config.model)
    check_basis_config(config.basis, info.d_model)
    resolve_layers(config.layers, info.n_layers)


def extract(config: Config, device: torch.device) -> tuple[Activations, Activations | None]:
    """The hidden states of the model and, for the random-init baseline, of the same
    architecture with random weights (init seed = seed + 1, so it differs from a model that is
    itself random), on the same corpus, built once."""
    trained = cache_activations(config, device)
    stats = config.statistics
    if not (stats.enabled and stats.random_init_baseline):
        return trained, None
    baseline = dataclasses.replace(
        config, model=dataclasses.replace(config.model, random_init=True)
    )
    return trained, cache_activations(baseline, device, config.seed + 1, trained.corpus)


def prepare(
    config: Config, acts: list[Activations], device: torch.device
) -> tuple[Split, list[Model]]:
    """The corpus labelled and split (the same for every model: one tokenizer), then each
    model's basis from its W_E and the training split's token counts."""
    first = acts[0]
    split = split_labels(
        first.corpus, config.probe.classes, first.info.vocab_size, device, config.target.offset
    )
    counts = np.bincount(split.targets[split.rows[TRAIN]], minlength=first.info.vocab_size)
    bases = [build_basis(config.basis, a.embedding, counts, config.seed) for a in acts]
    n_draws = config.statistics.n_bootstrap
    bootstrap = SequenceBootstrap(split.sequences[TEST], n_draws, config.seed)
    return split, [
        model_inputs(a, b, split, bootstrap, device) for a, b in zip(acts, bases, strict=True)
    ]


def measure(config: Config, kind: ProbeKind, ours: Model, probes: Probes) -> Measured | None:
    """The statistics of the fitted probes against W_E, each read against its baselines."""
    if not config.statistics.enabled:
        return None
    job = JobProbes(
        probes=probes.probe_set,
        correct=probes.fitted.correct,
        embedding=ours.acts.embedding,
        null_kind=ours.inputs.basis.null_kind,
        compared_as=kind.compared_as,
        random_init=probes.random_init,
        control_fits=probes.control_fits,
        lens=probes.lens,
    )
    return job_statistics(job, config.statistics, config.seed)


def layer_results(probes: Probes, measured: Measured | None) -> list[LayerResult]:
    """Each layer's parts side by side."""
    readouts = measured.readouts if measured is not None else {}
    out = []
    for scores in probes.fitted.scores:
        layer = scores.layer
        mdl, control_mdl = probes.mdl.get(layer, (None, None))
        out.append(
            LayerResult(
                scores=scores,
                depth=probes.depth.get(layer),
                control=probes.control.get(layer),
                random_init=probes.random_scores.get(layer),
                lens_probe=probes.lens_probe.get(layer),
                logit_lens=readouts.get(layer),
                lenses=probes.lenses.get(layer),
                mdl=mdl,
                control_mdl=control_mdl,
            )
        )
    return out


def job_sections(
    config: Config,
    acts: Activations,
    split: Split,
    probes: Probes,
    measured: Measured | None,
    basis: Basis,
) -> dict[str, Any]:
    """The sections of metrics.json that describe the model, probe, data and results."""
    info, rows, fits = acts.info, split.rows, probes.fitted.fits
    converged = [bool(f.convergence.get("converged", True)) for f in fits.values()]
    model = ModelSummary(
        name=info.name,
        path=config.model.path,
        model_type=info.model_type,
        n_layers=info.n_layers,
        d_model=info.d_model,
        vocab_size=info.vocab_size,
        has_unembedding=acts.unembedding is not None,
    )
    probe = ProbeSummary(
        kind=config.probe.kind,
        layers=config.layers.mode.value,
        basis=basis.name,
        reg=config.reg.kind.value,
        strength=config.reg.strength,
        classes=config.probe.classes.value,
        n_classes=int(len(split.classes)),
        target_offset=config.target.offset,
        tol=config.probe.tol,
        all_converged=all(converged),
    )
    counts = Counts(
        n_sequences=int(acts.corpus.input_ids.shape[0]),
        seq_len=int(acts.corpus.input_ids.shape[1]),
        n_train_tokens=int(len(rows[TRAIN])),
        n_val_tokens=int(len(rows[VAL])),
        n_test_tokens=int(len(rows[TEST])),
        n_train_types=split.n_train_types,
        n_frequent_types=split.n_frequent_types,
        n_test_unseen=int((split.labels[TEST] < 0).sum()),
        n_outside_target=split.n_outside,
    )
    statistics = None
    if measured is not None:
        statistics = JobStatistics(
            entries=measured.entries,
            weight_mass=measured.weight_mass,
            classes=measured.classes,
            basis={"name": basis.name, **basis.info},
            accuracy_vs_k=probes.accuracy_vs_k,
        )
    store = acts.store
    return {
        "model": model,
        "probe": probe,
        "counts": counts,
        "cache": CacheUse(store.meta["key"], str(store.path), store.reused),
        "layers": layer_results(probes, measured),
        "fits": {name: {**f.convergence, "history": f.history} for name, f in fits.items()},
        "statistics": statistics,
        "ridge_path": ridge_path(fits, config.probe.path_strengths),
    }


def stage_times(clock: list[float]) -> dict[str, float]:
    """Seconds spent extracting (both models, the split and the bases), fitting (identity
    probes and baselines) and computing the statistics, from the clock read between stages."""
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


def ridge_path(fits: dict[str, Any], strengths: list[float]) -> dict[str, Any] | None:
    """Validation NLL along the ridge path, averaged over the fitted probes (as the objective)."""
    paths = [fit.path for fit in fits.values() if fit.path]
    if not paths:
        return None
    mean = [float(np.mean([p[i]["val_nll"] for p in paths])) for i in range(len(strengths))]
    return {"strengths": list(strengths), "val_nll": mean}
