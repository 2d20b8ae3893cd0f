"""Hydra entry point: ``python -m probe_sweep [-m] group=option key=value ...``.

The only module that knows every stage: it turns the config into typed values, then runs
model -> data -> activations -> basis -> probes -> results, checking every input before the
expensive steps.
"""

from __future__ import annotations

import logging
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import hydra
import numpy as np
import torch
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig, OmegaConf

from probe_sweep import jobs, tracking, tuning
from probe_sweep import statistics as pstats
from probe_sweep.activations import ActivationStore, extract
from probe_sweep.bases import Basis, build_basis, check_basis_config
from probe_sweep.config import Config, register_schema, to_typed
from probe_sweep.data import TEST, TRAIN, VAL, Corpus, build_corpus
from probe_sweep.errors import UserError
from probe_sweep.layers import LayerMode, pooled_assignment, resolve_layers
from probe_sweep.model import inspect_model, load_model, load_tokenizer
from probe_sweep.probes import (
    ClassSet,
    FitResult,
    ProbeKind,
    class_index,
    fit_ridge_probe,
    fit_softmax_probe,
    frequent_types,
    matmul_dtype,
    score_probe,
)

log = logging.getLogger("probe_sweep")


def pick_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise UserError(f"device={name} but no CUDA device is visible; use device=auto or cpu")
    return torch.device(name)


def gather(
    store: ActivationStore,
    basis: Basis,
    rows: np.ndarray,
    row_layers: np.ndarray,
    device: torch.device,
) -> torch.Tensor:
    """Hidden states of ``rows``, row i taken at layer ``row_layers[i]``, in basis coordinates."""
    out = torch.empty(len(rows), store.meta["d_model"], dtype=torch.float32)
    for layer in np.unique(row_layers):
        pick = np.flatnonzero(row_layers == layer)
        out[pick] = read_rows(store, int(layer), rows[pick])
    return basis.coordinates(out.to(device))


def read_rows(store: ActivationStore, layer: int, rows: np.ndarray) -> torch.Tensor:
    """Cached hidden states of ``rows`` at ``layer``, natural coordinates, float32, on the CPU."""
    return torch.from_numpy(np.asarray(store.layer(layer)[rows], np.float32))


def fit_probe(
    config: Config,
    x_train: torch.Tensor,
    y_train: torch.Tensor,
    x_val: torch.Tensor,
    y_val: torch.Tensor,
    class_embeddings: torch.Tensor,
    desc: str,
) -> FitResult:
    if config.probe.kind is ProbeKind.ridge:
        return fit_ridge_probe(
            x_train, y_train, class_embeddings, config.reg, (x_val, y_val),
            config.probe.path_strengths,
        )  # fmt: skip
    return fit_softmax_probe(
        x_train,
        y_train,
        x_val,
        y_val,
        len(class_embeddings),
        config.reg,
        config.probe,
        config.seed,
        desc,
    )


def ridge_path(fits: dict[str, FitResult], strengths: list[float]) -> dict[str, Any] | None:
    """Validation NLL along the ridge path, averaged over the fitted probes (as the objective)."""
    paths = [fit.path for fit in fits.values() if fit.path]
    if not paths:
        return None
    mean = [float(np.mean([p[i]["val_nll"] for p in paths])) for i in range(len(strengths))]
    return {"strengths": list(strengths), "val_nll": mean}


def run_job(
    config: Config,
    resolved: dict[str, Any],
    out_dir: Path,
    job: dict[str, Any],
    on_layer: Callable[[int, dict[str, Any]], None] | None = None,
) -> dict[str, Any]:
    """One job: every stage in order; returns the metrics written to ``out_dir/metrics.json``.

    ``job`` (content key, scheduler ids) is stored with them: a metrics.json that has it marks
    complete results. ``on_layer(step, row)`` is called as each layer is scored (a tuner may
    stop the job there).
    """
    started = time.perf_counter()
    device = pick_device(config.device)
    tokenizer = load_tokenizer(config.model)
    info = inspect_model(config.model, len(tokenizer))
    check_basis_config(config.basis, info.d_model)
    layers = resolve_layers(config.layers, info.n_layers)
    corpus: Corpus = build_corpus(config.data, tokenizer, info.max_positions, config.seed)
    log.info(
        "Model %s (%d layers, d=%d) on %s; corpus %s",
        info.name,
        info.n_layers,
        info.d_model,
        device,
        corpus.description,
    )

    model = load_model(config.model, len(tokenizer), device, config.seed)
    store = extract(model, corpus, layers, config.activations, device)
    embedding = model.embedding.float().cpu()
    has_unembedding = model.unembedding is not None
    unembedding, final_norm = model.unembedding, model.final_norm
    del model
    train_counts = np.bincount(
        corpus.targets.reshape(-1)[corpus.rows(TRAIN)], minlength=info.vocab_size
    )
    basis = build_basis(config.basis, embedding, train_counts, config.seed)
    extracted = time.perf_counter()

    targets = corpus.targets.reshape(-1)
    rows = {part: corpus.rows(part) for part in (TRAIN, VAL, TEST)}
    train_tokens = targets[rows[TRAIN]]
    seen = np.unique(train_tokens)
    classes = seen if config.probe.classes is ClassSet.seen else np.arange(info.vocab_size)
    lookup = class_index(classes, info.vocab_size)
    labels = {p: torch.from_numpy(lookup[targets[r]]).to(device) for p, r in rows.items()}
    frequent_set = frequent_types(train_tokens)
    frequent = {
        p: torch.from_numpy(np.isin(targets[r], frequent_set)).to(device) for p, r in rows.items()
    }
    class_embeddings = embedding[torch.from_numpy(classes)].to(device)

    def inputs(part: int, layer_of_row: np.ndarray | int) -> torch.Tensor:
        row_layers = np.broadcast_to(np.asarray(layer_of_row), rows[part].shape)
        return gather(store, basis, rows[part], row_layers, device)

    def evaluate(fit: FitResult, layer: int, name: str) -> dict[str, Any]:
        """Test-split scores (reported) plus validation-split NLL/top-1 (what tuning may use)."""
        val = score_probe(fit.probe, inputs(VAL, layer), labels[VAL], frequent[VAL])
        scores = score_probe(fit.probe, inputs(TEST, layer), labels[TEST], frequent[TEST])
        row = {"layer": layer, "probe": name, **scores}
        row.update(val_nll=val["nll"], val_top1=val["top1"])
        if on_layer is not None:
            on_layer(len(results), row)
        return row

    checkpoint = jobs.FitCheckpoint(out_dir, job["key"], device)
    fits: dict[str, FitResult] = {}
    results: list[dict[str, Any]] = []
    if config.layers.mode is LayerMode.pooled:
        train_layers = pooled_assignment(len(rows[TRAIN]), layers, config.seed)
        val_layers = pooled_assignment(len(rows[VAL]), layers, config.seed + 1)
        fit = checkpoint.get_or_fit(
            "pooled",
            lambda: fit_probe(
                config,
                inputs(TRAIN, train_layers),
                labels[TRAIN],
                inputs(VAL, val_layers),
                labels[VAL],
                class_embeddings,
                "pooled probe",
            ),
        )
        fits["pooled"] = fit
        for layer in layers:
            results.append(evaluate(fit, layer, "pooled"))
    else:
        for layer in layers:
            fit = checkpoint.get_or_fit(
                f"layer_{layer}",
                lambda layer=layer: fit_probe(
                    config,
                    inputs(TRAIN, layer),
                    labels[TRAIN],
                    inputs(VAL, layer),
                    labels[VAL],
                    class_embeddings,
                    f"layer {layer} probe",
                ),
            )
            fits[f"layer_{layer}"] = fit
            results.append(evaluate(fit, layer, f"layer_{layer}"))
    for row in results:
        history = fits[row["probe"]].history
        row["epochs"] = len(history)
        row["history"] = history
    fitted = time.perf_counter()
    stats_cfg = config.statistics
    statistics: dict[str, Any] = {}
    if stats_cfg.enabled:
        mapping = pstats.control_task_labels(info.vocab_size, stats_cfg.control_labels, config.seed)
        control = {p: torch.from_numpy(mapping[targets[r]]).to(device) for p, r in rows.items()}

        def control_scores(layer: int) -> dict[str, Any]:
            fit = checkpoint.get_or_fit(
                f"control_layer_{layer}",
                lambda: fit_softmax_probe(
                    *(inputs(TRAIN, layer), control[TRAIN], inputs(VAL, layer), control[VAL]),
                    *(stats_cfg.control_labels, config.reg, config.probe, config.seed),
                    f"layer {layer} control probe",
                ),
            )
            return score_probe(fit.probe, inputs(TEST, layer), control[TEST], frequent[TEST])

        final_layer = info.n_layers if info.n_layers in layers else None

        def lens_probe_scores(layer: int) -> dict[str, Any]:
            """The same probe, fed the model's own guess: logit-lens log-probs of the classes."""
            assert unembedding is not None

            columns = torch.from_numpy(classes).to(device)

            def guess(part: int) -> torch.Tensor:
                chunks = []
                for start in range(0, len(rows[part]), 4096):
                    hidden = read_rows(store, layer, rows[part][start : start + 4096])
                    logits = pstats.lens_logits(
                        hidden.to(device), unembedding, final_norm, layer != final_layer
                    )
                    chunks.append(logits.log_softmax(-1)[:, columns])
                return torch.cat(chunks)

            fit = checkpoint.get_or_fit(
                f"lens_layer_{layer}",
                lambda: fit_softmax_probe(
                    *(guess(TRAIN), labels[TRAIN], guess(VAL), labels[VAL], len(classes)),
                    *(config.reg, config.probe, config.seed, f"layer {layer} logit-lens probe"),
                ),
            )
            return score_probe(fit.probe, guess(TEST), labels[TEST], frequent[TEST])

        lens_rows = rows[TEST][: stats_cfg.lens_rows]

        def lens_hidden(layer: int) -> torch.Tensor:
            return read_rows(store, layer, lens_rows)

        statistics = pstats.job_statistics(
            fits,
            results,
            basis.encoder,
            embedding,
            class_embeddings,
            stats_cfg,
            config.seed,
            control_scores if stats_cfg.control_task else None,
            lens_probe_scores if stats_cfg.lens_probe and unembedding is not None else None,
            lens_hidden,
            torch.from_numpy(targets[lens_rows]),
            unembedding,
            final_norm,
            final_layer,
        )
        statistics["basis"] = {"name": basis.name, **basis.info}
    measured = time.perf_counter()

    tensors = {"classes": torch.from_numpy(classes)}
    for name, fit in fits.items():
        tensors.update({f"{name}.{k}": v for k, v in fit.probe.state_dict().items()})
        if fit.map_weight is not None:
            tensors[f"{name}.map_weight"] = fit.map_weight
    tracking.write_tensors(out_dir / "probes.safetensors", tensors, {"basis": basis.name})
    title = (
        f"{info.name}: {config.probe.kind.value} probe ({config.layers.mode.value} layer), "
        f"{basis.name} basis, {config.reg.kind.value} {config.reg.strength:g}"
    )
    tracking.plot_accuracy_by_layer(results, out_dir / "accuracy_by_layer.png", title)
    metrics = {
        "schema_version": tracking.SCHEMA_VERSION,
        "model": {
            "name": info.name,
            "model_type": info.model_type,
            "n_layers": info.n_layers,
            "d_model": info.d_model,
            "vocab_size": info.vocab_size,
            "has_unembedding": has_unembedding,
        },
        "probe": {
            "kind": config.probe.kind.value,
            "layers": config.layers.mode.value,
            "basis": basis.name,
            "reg": config.reg.kind.value,
            "strength": config.reg.strength,
            "classes": config.probe.classes.value,
            "n_classes": int(len(classes)),
            "train_matmul_dtype": str(matmul_dtype(device, config.probe.precision)).split(".")[-1],
        },
        "counts": {
            "n_sequences": int(corpus.input_ids.shape[0]),
            "seq_len": int(corpus.input_ids.shape[1]),
            "n_train_tokens": int(len(rows[TRAIN])),
            "n_val_tokens": int(len(rows[VAL])),
            "n_test_tokens": int(len(rows[TEST])),
            "n_train_types": int(len(seen)),
            "n_frequent_types": int(len(frequent_set)),
            "n_test_unseen": int((labels[TEST] < 0).sum()),
        },
        "cache": {"key": store.meta["key"], "path": str(store.path), "reused": store.reused},
        "timing_s": {
            "extract": round(extracted - started, 2),
            "fit": round(fitted - extracted, 2),
            "statistics": round(measured - fitted, 2),
        },
        "layers": results,
        "statistics": statistics,
        "ridge_path": ridge_path(fits, config.probe.path_strengths),
        "job": job,
        "config": resolved,
    }
    tracking.write_json(out_dir / "metrics.json", metrics)
    checkpoint.discard()
    log.info("Held-out scores (%s):\n%s", out_dir, tracking.format_table(results))
    if statistics.get("entries"):
        log.info("Statistics (nulls):\n%s", pstats.format_entries(statistics["entries"]))
    if statistics.get("logit_lens") or stats_cfg.control_task:
        log.info("Logit lens / controls by layer:\n%s", pstats.format_layers(results))
    return metrics


register_schema()
jobs.prepare_launchers()


@hydra.main(version_base="1.3", config_path="../conf", config_name="config")
def main(cfg: DictConfig) -> float | None:
    """Run one job; return the tuning objective (what an Optuna sweep optimises)."""
    hydra_cfg = HydraConfig.get()
    out_dir = Path(hydra_cfg.runtime.output_dir)
    # In a multirun a failed job writes failed.json and returns, so the other jobs still run.
    multirun = hydra_cfg.mode is RunMode.MULTIRUN
    overrides = list(hydra_cfg.overrides.task)
    try:
        config = to_typed(cfg)
        resolved = OmegaConf.to_container(cfg, resolve=True, enum_to_str=True)
        key = jobs.job_key(resolved, tracking.SCHEMA_VERSION)  # type: ignore[arg-type]
        sweep_dir = Path(hydra_cfg.sweep.dir)
        done = jobs.find_complete(sweep_dir, key) if multirun and not config.redo else None
        if done is not None:
            log.info("Skipped: complete results for this config in %s (redo=true reruns)", done)
            jobs.note_skipped(out_dir, done, key)
            return tuning.objective(jobs.load_metrics(done)["layers"], config.tuning)
        jobs.clear_markers(out_dir, config.redo)
        with jobs.claim_gpu(config.device) as device:
            config.device = device
            reporter = tuning.trial_reporter(config.tuning)
            job_info = jobs.job_info(key, overrides)
            metrics = run_job(config, resolved, out_dir, job_info, reporter)  # type: ignore[arg-type]
        # After metrics.json is on disk; never raises (a W&B failure is one warning line).
        job = tracking.JobInfo.from_hydra(HydraConfig.get())
        tracking.track_job(config.tracker, job, resolved)  # type: ignore[arg-type]
        return tuning.objective(metrics["layers"], config.tuning)
    except UserError as exc:
        log.error("error: %s", exc)
        jobs.write_failed(out_dir, exc, overrides)
        if not multirun:
            sys.exit(2)
    except Exception as exc:
        if tuning.is_pruned(exc):
            log.info("Trial pruned by the study: %s", exc)
            jobs.discard_fits(out_dir)  # a pruned trial is never run again
            raise  # the Optuna sweeper records the trial as pruned
        jobs.write_failed(out_dir, exc, overrides)
        if not multirun:
            raise
        log.exception("error: %s: %s", type(exc).__name__, exc)


if __name__ == "__main__":
    main()
