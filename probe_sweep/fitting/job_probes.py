"""Every probe a job fits, in order: the identity probes of the trained model and of the
random-init model, then each baseline that is switched on (``baselines/``). All are fitted
through the job's probe kind and saved for resuming as they finish.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from probe_sweep.baselines.control import control_probes, control_task
from probe_sweep.baselines.depth import layer_differences
from probe_sweep.baselines.k_sweep import accuracy_vs_k
from probe_sweep.baselines.lens_probe import lens_probe_scores
from probe_sweep.baselines.lenses import compare_lenses
from probe_sweep.baselines.mdl import description_lengths
from probe_sweep.baselines.random_init import random_init_scores
from probe_sweep.bases import Basis
from probe_sweep.config import Config
from probe_sweep.extraction.data import TEST
from probe_sweep.extraction.hidden_states import Activations
from probe_sweep.extraction.labels import Split
from probe_sweep.extraction.layers import LayerMode
from probe_sweep.fitting.identity import (
    Fitted,
    LayerHook,
    Scorer,
    fit_identity_probes,
    input_covariances,
)
from probe_sweep.fitting.inputs import Inputs, read_rows
from probe_sweep.fitting.probe_set import LensInputs, ProbeSet
from probe_sweep.fitting.saved_fits import FitCheckpoint
from probe_sweep.intervals import SequenceBootstrap
from probe_sweep.probes.kinds import ProbeKind
from probe_sweep.results import (
    CodeLength,
    ControlScores,
    DepthScores,
    KPoint,
    LensComparison,
    LensProbeScores,
    RandomInitScores,
)


@dataclass
class Model:
    """One model's hidden states in the job's basis, with the scorer its probes are scored by
    and the W_E rows of the classes (on the job's device)."""

    acts: Activations
    scorer: Scorer
    class_embeddings: torch.Tensor

    @property
    def inputs(self) -> Inputs:
        return self.scorer.inputs


@dataclass(frozen=True)
class Probes:
    """Every probe the fitting stage fitted: the identity probes of the trained model (and of
    the random-init model), the statistics' view of them, and each baseline's results."""

    fitted: Fitted
    probe_set: ProbeSet
    random_init: ProbeSet | None = None
    control_fits: dict[str, Any] = field(default_factory=dict)
    depth: dict[int, DepthScores] = field(default_factory=dict)
    control: dict[int, ControlScores] = field(default_factory=dict)
    random_scores: dict[int, RandomInitScores] = field(default_factory=dict)
    lens_probe: dict[int, LensProbeScores] = field(default_factory=dict)
    lenses: dict[int, LensComparison] = field(default_factory=dict)
    mdl: dict[int, tuple[CodeLength, CodeLength]] = field(default_factory=dict)
    accuracy_vs_k: list[KPoint] = field(default_factory=list)
    lens: LensInputs | None = None


def model_inputs(
    acts: Activations,
    basis: Basis,
    split: Split,
    bootstrap: SequenceBootstrap,
    device: torch.device,
) -> Model:
    scorer = Scorer(Inputs(acts.store, basis, split, device), bootstrap)
    return Model(acts, scorer, acts.embedding[torch.from_numpy(split.classes)].to(device))


def probe_set(model: Model, fitted: Fitted) -> ProbeSet:
    """The statistics' view of one model's probes."""
    covariances = input_covariances(model.inputs, fitted)
    encoder = model.inputs.basis.encoder
    assert encoder is not None
    return ProbeSet(fitted.fits, encoder, model.class_embeddings.cpu(), covariances)


def fit_job_probes(
    config: Config,
    kind: ProbeKind,
    models: list[Model],
    checkpoint: FitCheckpoint,
    on_layer: LayerHook | None,
) -> Probes:
    """The identity probes of every model, then each baseline that is switched on."""
    ours = models[0]
    acts, scorer, inputs, targets = ours.acts, ours.scorer, ours.inputs, ours.class_embeddings
    fitted = fit_identity_probes(config, kind, scorer, acts.layers, targets, checkpoint, on_layer)
    ours_set = probe_set(ours, fitted)
    stats, per_layer = config.statistics, config.layers.mode is not LayerMode.pooled
    if not stats.enabled:
        return Probes(fitted, ours_set)
    found: dict[str, Any] = {}
    if stats.layer_differences:
        found["depth"] = layer_differences(fitted, scorer.bootstrap)
    if len(models) > 1:
        theirs = models[1]
        their_fits = fit_identity_probes(
            config, kind, theirs.scorer, theirs.acts.layers, theirs.class_embeddings,
            checkpoint, prefix="random_init_",
        )  # fmt: skip
        found["random_init"] = probe_set(theirs, their_fits)
        found["random_scores"] = random_init_scores(fitted, their_fits, scorer.bootstrap)
    control = control_task(config, inputs, acts.embedding)
    if stats.control_task:
        found["control"], found["control_fits"] = control_probes(
            config, kind, scorer, fitted, control, checkpoint
        )
    if stats.lens_probe and acts.unembedding is not None:
        found["lens_probe"] = lens_probe_scores(
            config, kind, acts, scorer, fitted, targets, checkpoint
        )
    if stats.logit_lens:
        found["lens"] = lens_inputs(acts, inputs.split, stats.lens_rows)
    if stats.lens_comparison and per_layer:
        found["lenses"] = compare_lenses(config, acts, inputs.split, inputs.device)
    if stats.mdl and per_layer:
        found["mdl"] = description_lengths(config, kind, inputs, fitted, targets, control)
    if stats.k_sweep and per_layer:
        found["accuracy_vs_k"] = accuracy_vs_k(config, kind, scorer, fitted, targets)
    return Probes(fitted, ours_set, **found)


def lens_inputs(acts: Activations, split: Split, n_rows: int) -> LensInputs | None:
    """Held-out hidden states and input tokens for the logit-lens read-outs (None without an
    unembedding). HF's last hidden state already has the final norm."""
    if acts.unembedding is None:
        return None
    rows = split.rows[TEST][:n_rows]
    return LensInputs(
        hidden={layer: read_rows(acts.store, layer, rows) for layer in acts.layers},
        targets=torch.from_numpy(split.targets[rows]),
        sequences=split.sequences[TEST][:n_rows],
        unembedding=acts.unembedding,
        final_norm=acts.final_norm,
        final_layer=acts.final_layer,
    )
