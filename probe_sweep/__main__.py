"""Hydra entry point: ``python -m probe_sweep [-m] group=option key=value ...``.

The only module that knows every stage: it turns the config into typed values, then runs
model -> data -> activations -> basis -> probes -> results, checking every input before the
expensive steps.
"""

from __future__ import annotations

import logging
import sys
import time
from pathlib import Path
from typing import Any

import hydra
import numpy as np
import torch
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf

from probe_sweep import tracking
from probe_sweep.activations import ActivationStore, extract
from probe_sweep.bases import Basis, build_basis
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
        out[pick] = torch.from_numpy(np.asarray(store.layer(int(layer))[rows[pick]], np.float32))
    return basis.coordinates(out.to(device))


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
        return fit_ridge_probe(x_train, y_train, class_embeddings, config.reg)
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


def run_job(config: Config, resolved: dict[str, Any], out_dir: Path) -> dict[str, Any]:
    """One job: every stage in order; returns the metrics written to ``out_dir/metrics.json``."""
    started = time.perf_counter()
    device = pick_device(config.device)
    tokenizer = load_tokenizer(config.model)
    info = inspect_model(config.model, len(tokenizer))
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
    del model
    basis = build_basis(config.basis, embedding)
    extracted = time.perf_counter()

    targets = corpus.targets.reshape(-1)
    rows = {part: corpus.rows(part) for part in (TRAIN, VAL, TEST)}
    train_tokens = targets[rows[TRAIN]]
    seen = np.unique(train_tokens)
    classes = seen if config.probe.classes is ClassSet.seen else np.arange(info.vocab_size)
    lookup = class_index(classes, info.vocab_size)
    labels = {p: torch.from_numpy(lookup[targets[r]]).to(device) for p, r in rows.items()}
    frequent_set = frequent_types(train_tokens)
    frequent = torch.from_numpy(np.isin(targets[rows[TEST]], frequent_set)).to(device)
    class_embeddings = embedding[torch.from_numpy(classes)].to(device)

    def inputs(part: int, layer_of_row: np.ndarray | int) -> torch.Tensor:
        row_layers = np.broadcast_to(np.asarray(layer_of_row), rows[part].shape)
        return gather(store, basis, rows[part], row_layers, device)

    fits: dict[str, FitResult] = {}
    results: list[dict[str, Any]] = []
    if config.layers.mode is LayerMode.pooled:
        train_layers = pooled_assignment(len(rows[TRAIN]), layers, config.seed)
        val_layers = pooled_assignment(len(rows[VAL]), layers, config.seed + 1)
        fit = fit_probe(
            config,
            inputs(TRAIN, train_layers),
            labels[TRAIN],
            inputs(VAL, val_layers),
            labels[VAL],
            class_embeddings,
            "pooled probe",
        )
        fits["pooled"] = fit
        for layer in layers:
            scores = score_probe(fit.probe, inputs(TEST, layer), labels[TEST], frequent)
            results.append({"layer": layer, "probe": "pooled", **scores})
    else:
        for layer in layers:
            fit = fit_probe(
                config,
                inputs(TRAIN, layer),
                labels[TRAIN],
                inputs(VAL, layer),
                labels[VAL],
                class_embeddings,
                f"layer {layer} probe",
            )
            fits[f"layer_{layer}"] = fit
            scores = score_probe(fit.probe, inputs(TEST, layer), labels[TEST], frequent)
            results.append({"layer": layer, "probe": f"layer_{layer}", **scores})
    for row in results:
        history = fits[row["probe"]].history
        row["epochs"] = len(history)
        row["history"] = history
    fitted = time.perf_counter()

    tensors = {"classes": torch.from_numpy(classes)}
    for name, fit in fits.items():
        tensors.update({f"{name}.{k}": v for k, v in fit.probe.state_dict().items()})
        if fit.map_weight is not None:
            tensors[f"{name}.map_weight"] = fit.map_weight
    tracking.write_tensors(out_dir / "probes.safetensors", tensors, {"basis": basis.name})
    title = (
        f"{info.name}: {config.probe.kind.value} probe, {config.layers.mode.value} layers, "
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
        },
        "layers": results,
        "config": resolved,
    }
    tracking.write_json(out_dir / "metrics.json", metrics)
    log.info("Held-out scores (%s):\n%s", out_dir, tracking.format_table(results))
    return metrics


register_schema()


@hydra.main(version_base="1.3", config_path="../conf", config_name="config")
def main(cfg: DictConfig) -> None:
    out_dir = Path(HydraConfig.get().runtime.output_dir)
    try:
        config = to_typed(cfg)
        run_job(config, OmegaConf.to_container(cfg, resolve=True, enum_to_str=True), out_dir)  # type: ignore[arg-type]
    except UserError as exc:
        log.error("error: %s", exc)
        sys.exit(2)


if __name__ == "__main__":
    main()
