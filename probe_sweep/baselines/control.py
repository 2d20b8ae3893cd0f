"""The control task (Hewitt & Liang 2019): a fixed random label per token type, a task only
memorising types can solve. Its probe is the same kind, on the same inputs, as the identity
probe at each layer; selectivity is identity minus control top-1, with a paired interval."""

from __future__ import annotations

import logging
from dataclasses import dataclass

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


@dataclass(frozen=True)
class ControlTask:
    """The control task of one job: the label of every row of every part, and the target
    vector of each label for a kind that maps into W_E's space (the W_E rows of ``n_labels``
    seeded random tokens: a label stands for a token like a class does)."""

    labels: dict[int, torch.Tensor]
    targets: torch.Tensor


def control_task(config: Config, inputs: Inputs, embedding: torch.Tensor) -> ControlTask:
    """The control task's labels and targets, drawn once for the control probes and the MDL."""
    n_labels = config.statistics.control_labels
    mapping = control_task_labels(len(embedding), n_labels, config.seed)
    labels = {
        part: torch.from_numpy(mapping[inputs.split.targets[rows]]).to(inputs.device)
        for part, rows in inputs.split.rows.items()
    }
    tokens = np.random.default_rng([config.seed, 1]).choice(len(embedding), n_labels, replace=False)
    return ControlTask(labels, embedding[torch.from_numpy(tokens)].to(inputs.device))


def control_probes(
    config: Config,
    kind: ProbeKind,
    scorer: Scorer,
    fitted: Fitted,
    control: ControlTask,
    checkpoint: FitCheckpoint,
) -> tuple[dict[int, ControlScores], dict[str, FitResult]]:
    """The control probe at each identity probe's layer: its scores by layer, and the fits by
    the identity probe's name (the weight-mass statistics compare with them; not pooled)."""
    inputs, labels, targets = scorer.inputs, control.labels, control.targets
    scores, fits, previous = {}, {}, None
    for identity in fitted.scores:
        layer, name = identity.layer, f"control_layer_{identity.layer}"
        task = ProbeTask(inputs(TRAIN, layer).with_labels(labels[TRAIN]), targets)
        fit = previous = checkpoint.get_or_fit(
            name,
            lambda unfinished, task=task, layer=layer, init=previous: kind.fit(
                task, config.reg, config.probe,
                unfinished.warm_start(None if init is None else init.probe),
                f"layer {layer} control probe", unfinished.keep,
            ),
            shape=(len(targets), task.train.d),
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
