"""The identity probes: the cached hidden states split, labelled and put in the basis, one
probe per layer (or one pooled over layers) fitted to the input token, each scored on held-out
tokens with intervals over held-out sequences.

    Activations -> inputs.py (split, labels, ``Rows``) + bases.py -> probes.py  =>  ``Fitted``
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from probe_sweep.bases import build_basis
from probe_sweep.config import Config
from probe_sweep.extraction.data import TEST, TRAIN, VAL
from probe_sweep.extraction.hidden_states import Activations, cache_activations
from probe_sweep.extraction.layers import LayerMode, pooled_assignment
from probe_sweep.fitting.inputs import Inputs, split_labels
from probe_sweep.fitting.saved_fits import FitCheckpoint
from probe_sweep.intervals import SequenceBootstrap
from probe_sweep.probes.linear import (
    FitResult,
    ProbeKind,
    fit_ridge_probe,
    fit_softmax_probe,
    score_probe,
    summarise,
    token_scores,
)
from probe_sweep.probes.rows import Rows

log = logging.getLogger("probe_sweep")
LayerHook = Callable[[int, dict[str, Any]], None]


def prepare_inputs(
    config: Config, device: torch.device, init_seed: int | None = None
) -> tuple[Activations, Scorer]:
    """The model's cached hidden states, split and labelled, in the configured basis, with the
    scorer every probe of this model is scored by."""
    acts = cache_activations(config, device, init_seed)
    split = split_labels(
        acts.corpus, config.probe.classes, acts.info.vocab_size, device, config.target.offset
    )
    counts = np.bincount(split.targets[split.rows[TRAIN]], minlength=acts.info.vocab_size)
    basis = build_basis(config.basis, acts.embedding, counts, config.seed)
    bootstrap = SequenceBootstrap(split.sequences[TEST], config.statistics.n_bootstrap, config.seed)
    return acts, Scorer(Inputs(acts.store, basis, split, device), bootstrap)


@dataclass
class ProbeTask:
    """What one probe is fitted to: the training and validation rows."""

    train: Rows
    val: Rows
    n_classes: int
    class_embeddings: torch.Tensor | None = None  # W_E rows of the classes: the ridge target


def fit_probe(
    config: Config, task: ProbeTask, desc: str, init: FitResult | None = None
) -> FitResult:
    """The configured probe at the configured strength. A softmax probe starts from ``init``
    (the previous layer's probe) where that beats the input-blind start: faster over MiniLM's
    default job, though slower at its last layer (BENCHMARKS.md, 2026-12-05). The closed-form
    ridge probe, tried as a start, had a higher objective than zero."""
    if config.probe.kind is ProbeKind.ridge:
        assert task.class_embeddings is not None
        return fit_ridge_probe(
            task.train, task.class_embeddings, config.reg, task.val, config.probe.path_strengths
        )
    start = None if init is None else init.probe
    return fit_softmax_probe(task.train, task.n_classes, config.reg, config.probe, start, desc)


def log_fit(name: str, c: dict[str, Any]) -> None:
    """One line per fit (``c``: its convergence record): logs and SLURM files get this instead
    of progress bars. A fit short of its tolerance is a warning."""
    if c.get("solver") == "closed_form":
        return
    if "gap_rel" in c:
        gap = c["gap_rel"]
        kind = "certified gap" if c.get("gap_bound") is not None else "estimated gap (no bound)"
        reached = f"{kind} {gap:.1e}" if gap is not None else "no gap"
    else:
        reached = f"largest gradient entry {c['max_grad_rel']:.1e} of its start"
    state = "converged" if c["converged"] else "NOT converged"
    log.log(
        logging.INFO if c["converged"] else logging.WARNING,
        "%s: %s (%s, %d iterations, objective %.8g, %s, tol %.0e)",
        *(name, state, c["solver"], c["iterations"], c["objective"], reached, c["tol"]),
    )


@dataclass
class Scorer:
    """Held-out scores of probes on one model's inputs, with intervals from a bootstrap over
    held-out sequences (the same resamples for every probe, so differences are paired)."""

    inputs: Inputs
    bootstrap: SequenceBootstrap

    def __call__(
        self,
        fit: FitResult,
        layer: int,
        name: str,
        labels: dict[int, torch.Tensor] | None = None,
    ) -> tuple[dict[str, Any], np.ndarray]:
        """The test-split row (reported; validation NLL/top-1 are what tuning may use) and
        which test tokens the probe got right."""
        split, inputs = self.inputs.split, self.inputs
        labels = split.labels if labels is None else labels
        frequent = split.frequent[TEST].cpu().numpy()
        tokens = token_scores(fit.probe, inputs(TEST, layer).with_labels(labels[TEST]))
        val = score_probe(
            fit.probe, inputs(VAL, layer).with_labels(labels[VAL]), split.frequent[VAL]
        )
        row = {"layer": layer, "probe": name, **summarise(tokens, frequent, self.bootstrap)}
        row.update(val_nll=val["nll"], val_top1=val["top1"])
        conv = fit.convergence
        row.update({k: conv[k] for k in ("iterations", "gap_rel", "converged") if k in conv})
        return row, tokens["correct1"]


@dataclass
class Fitted:
    """Probes fitted on one model: by name, the layers each was trained on, the test rows."""

    fits: dict[str, FitResult]
    train_layers: dict[str, np.ndarray | int]
    rows: list[dict[str, Any]]
    correct: dict[int, np.ndarray]  # layer -> which test tokens the probe scored there got right


def fit_identity_probes(
    config: Config,
    scorer: Scorer,
    layers: list[int],
    class_embeddings: torch.Tensor,
    checkpoint: FitCheckpoint,
    on_layer: LayerHook | None = None,
    prefix: str = "",
) -> Fitted:
    """One probe per layer (or one pooled probe scored at every layer) for the input token."""
    inputs, split = scorer.inputs, scorer.inputs.split
    n_classes = len(split.classes)
    if config.layers.mode is LayerMode.pooled:
        pooled = pooled_assignment(len(split.rows[TRAIN]), layers, config.seed)
        val = pooled_assignment(len(split.rows[VAL]), layers, config.seed + 1)
        train_layers: dict[str, np.ndarray | int] = {"pooled": pooled}
        val_layers: dict[str, np.ndarray | int] = {"pooled": val}
        names = {layer: "pooled" for layer in layers}
    else:
        names = {layer: f"layer_{layer}" for layer in layers}
        train_layers = val_layers = {name: layer for layer, name in names.items()}
    fits: dict[str, FitResult] = {}
    previous: FitResult | None = None  # the warm start: the layer before
    for name in dict.fromkeys(names.values()):
        task = ProbeTask(
            inputs(TRAIN, train_layers[name]), inputs(VAL, val_layers[name]), n_classes,
            class_embeddings,
        )  # fmt: skip
        fits[name] = previous = checkpoint.get_or_fit(
            prefix + name,
            lambda task=task, name=name, init=previous: fit_probe(
                config, task, prefix + name, init
            ),
            shape=(n_classes, task.train.d),
        )
        log_fit(prefix + name, fits[name].convergence)
    fitted = Fitted(fits, train_layers, [], {})
    for layer in layers:
        row, fitted.correct[layer] = scorer(fits[names[layer]], layer, names[layer])
        fitted.rows.append(row)
        if on_layer is not None:
            on_layer(len(fitted.rows) - 1, row)
    return fitted


def input_covariances(inputs: Inputs, fitted: Fitted) -> dict[str, torch.Tensor]:
    """Covariance (k, k) of each probe's training inputs, from the sums of x and x x' in one
    streamed pass (float64)."""
    out = {}
    for name, layers in fitted.train_layers.items():
        rows = inputs(TRAIN, layers)
        device = inputs.device
        total = torch.zeros(rows.d, dtype=torch.float64, device=device)
        square = torch.zeros(rows.d, rows.d, dtype=torch.float64, device=device)
        for x, _ in rows.chunks(65536):
            x = x.to(device).double()
            total += x.sum(0)
            square += x.T @ x
        n = len(rows)
        cov = (square - torch.outer(total, total) / max(n, 1)) / max(n - 1, 1)
        out[name] = cov.cpu()
    return out
