"""The control task (Hewitt & Liang 2019): a fixed random label per token type, a task only
memorising types can solve. Its probe is the same kind, on the same inputs, as the identity
probe at each layer; selectivity is identity minus control top-1, with a paired interval."""

from __future__ import annotations

import logging

import numpy as np
import torch

from probe_sweep.config import Config
from probe_sweep.extraction.data import TRAIN
from probe_sweep.fitting.identity import Fitted, Scorer, log_fit
from probe_sweep.fitting.inputs import Inputs
from probe_sweep.fitting.saved_fits import FitCheckpoint
from probe_sweep.intervals import interval
from probe_sweep.probes.kinds import ProbeKind, ProbeTask
from probe_sweep.probes.linear import FitResult
from probe_sweep.results import ControlScores

log = logging.getLogger("probe_sweep")


def control_task_labels(vocab_size: int, n_labels: int, seed: int) -> np.ndarray:
    """A fixed random label in 0..n_labels-1 for every token type."""
    return np.random.default_rng(seed).integers(0, n_labels, size=vocab_size)


def control_labels(config: Config, inputs: Inputs, vocab_size: int) -> dict[int, torch.Tensor]:
    """The control task's label of every row of every part."""
    mapping = control_task_labels(vocab_size, config.statistics.control_labels, config.seed)
    return {
        part: torch.from_numpy(mapping[inputs.split.targets[rows]]).to(inputs.device)
        for part, rows in inputs.split.rows.items()
    }


def control_targets(embedding: torch.Tensor, n_labels: int, seed: int) -> torch.Tensor:
    """Target vectors of the control labels for a kind that maps into W_E's space: the W_E rows
    of ``n_labels`` seeded random tokens (a label stands for a token like a class does)."""
    tokens = np.random.default_rng([seed, 1]).choice(len(embedding), n_labels, replace=False)
    return embedding[torch.from_numpy(tokens)]


def control_probes(
    config: Config,
    kind: ProbeKind,
    scorer: Scorer,
    fitted: Fitted,
    embedding: torch.Tensor,
    checkpoint: FitCheckpoint,
) -> tuple[dict[int, ControlScores], dict[str, FitResult]]:
    """The control probe at each identity probe's layer: its scores by layer, and the fits by
    the identity probe's name (the weight-mass statistics compare with them; not pooled)."""
    inputs, n_labels = scorer.inputs, config.statistics.control_labels
    labels = control_labels(config, inputs, len(embedding))
    targets = control_targets(embedding, n_labels, config.seed).to(inputs.device)
    scores, fits, previous = {}, {}, None
    for identity in fitted.scores:
        layer, name = identity.layer, f"control_layer_{identity.layer}"
        task = ProbeTask(inputs(TRAIN, layer).with_labels(labels[TRAIN]), targets)
        fit = previous = checkpoint.get_or_fit(
            name,
            lambda task=task, layer=layer, init=previous: kind.fit(
                task, config.reg, config.probe, None if init is None else init.probe,
                f"layer {layer} control probe",
            ),
            shape=(n_labels, task.train.d),
        )  # fmt: skip
        log_fit(name, fit.convergence)
        control, correct = scorer.correct(fit, layer, labels)
        draws = scorer.bootstrap.draws(fitted.correct[layer]) - scorer.bootstrap.draws(correct)
        scores[layer] = ControlScores(
            control_top1=control["top1"],
            selectivity=identity.top1 - control["top1"],
            control_top1_ci=control.get("top1_ci"),
            selectivity_ci=interval(draws),
        )
        if identity.probe != "pooled":
            fits[identity.probe] = fit
    return scores, fits
