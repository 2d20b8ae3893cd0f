"""The identity probes: one probe per layer (or one pooled over layers) fitted to the input
token on one model's inputs, each scored on held-out tokens with intervals over held-out
sequences. ``job_probes.py`` calls it for the trained model and for the random-init model
alike.

    Inputs (``inputs.py``) + the probe kind (``probes/kinds.py``)  =>  ``Fitted``
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from probe_sweep.config import Config
from probe_sweep.extraction.data import TEST, TRAIN, VAL
from probe_sweep.extraction.layers import LayerMode
from probe_sweep.fitting.inputs import Inputs
from probe_sweep.fitting.saved_fits import FitCheckpoint
from probe_sweep.intervals import SequenceBootstrap
from probe_sweep.probes.kinds import ProbeKind, ProbeTask
from probe_sweep.probes.linear import FitResult, score_probe, summarise, token_scores
from probe_sweep.results import ProbeScores

log = logging.getLogger("probe_sweep")
LayerHook = Callable[[int, ProbeScores], None]


def pooled_assignment(n_rows: int, layers: list[int], seed: int) -> np.ndarray:
    """A layer for each row: every layer gets an equal share (up to one row), order seeded."""
    per_layer = np.resize(np.asarray(layers), n_rows)
    return np.random.default_rng(seed).permutation(per_layer)


def log_fit(name: str, c: dict[str, Any]) -> None:
    """One line per fit (``c``: its convergence record): logs and SLURM files get this instead
    of progress bars. A fit short of its tolerance is a warning."""
    if c.get("solver") == "closed_form":
        log.info("%s: fitted in closed form (exact, no gap to certify)", name)
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

    def correct(
        self, fit: FitResult, layer: int, labels: dict[int, torch.Tensor] | None = None
    ) -> tuple[dict[str, Any], np.ndarray]:
        """Test-split means with intervals, and which test tokens the probe got right
        (``labels``: another task's labels of each part, e.g. the control task's)."""
        split, inputs = self.inputs.split, self.inputs
        labels = split.labels if labels is None else labels
        tokens = token_scores(fit.probe, inputs(TEST, layer).with_labels(labels[TEST]))
        summary = summarise(tokens, split.frequent[TEST].cpu().numpy(), self.bootstrap)
        return summary, tokens["correct1"]

    def __call__(self, fit: FitResult, layer: int, name: str) -> tuple[ProbeScores, np.ndarray]:
        """The identity probe's scores at ``layer``, and which test tokens it got right."""
        summary, correct = self.correct(fit, layer)
        split, inputs = self.inputs.split, self.inputs
        val = score_probe(fit.probe, inputs(VAL, layer), split.frequent[VAL])
        summary.pop("n_test")
        scores = ProbeScores(
            layer=layer, probe=name, val_nll=val["nll"], val_top1=val["top1"], **summary
        )
        return scores, correct


@dataclass
class Fitted:
    """Probes fitted on one model: by name, the layers each was trained on, each layer's scores,
    and which test tokens the probe scored there got right (paired differences need them)."""

    fits: dict[str, FitResult]
    train_layers: dict[str, np.ndarray | int]
    scores: list[ProbeScores]
    correct: dict[int, np.ndarray]


def fit_identity_probes(
    config: Config,
    kind: ProbeKind,
    scorer: Scorer,
    layers: list[int],
    class_embeddings: torch.Tensor,
    checkpoint: FitCheckpoint,
    on_layer: LayerHook | None = None,
    prefix: str = "",
) -> Fitted:
    """One probe per layer (or one pooled probe scored at every layer) for the input token. A
    probe starts from the previous layer's where that beats the input-blind start: faster over
    MiniLM's default job, though slower at its last layer (BENCHMARKS.md)."""
    inputs = scorer.inputs
    split = inputs.split
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
    previous: FitResult | None = None
    for name in dict.fromkeys(names.values()):
        task = ProbeTask(
            inputs(TRAIN, train_layers[name]), class_embeddings, inputs(VAL, val_layers[name])
        )
        fits[name] = previous = checkpoint.get_or_fit(
            prefix + name,
            lambda unfinished, task=task, name=name, init=previous: kind.fit(
                task,
                config.reg,
                config.probe,
                unfinished.warm_start(None if init is None else init.probe),
                prefix + name,
                unfinished.keep,
            ),
            shape=(task.n_classes, task.train.d),
        )
        log_fit(prefix + name, fits[name].convergence)
    scores, correct = [], {}
    for layer in layers:
        layer_scores, correct[layer] = scorer(fits[names[layer]], layer, names[layer])
        scores.append(layer_scores)
        if on_layer is not None:
            on_layer(len(scores) - 1, layer_scores)
    return Fitted(fits, train_layers, scores, correct)


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
