"""Stage 6: what the fitted probes say, each number with an interval and a baseline that could
have failed.

- ``similarity``: probe rows against W_E rows (cosine, CKA, Procrustes), with permutation nulls,
  type-bootstrap intervals and the random-init model's probe as the baseline.
- ``weight_mass``: the probe's weight on the directions W_E uses least, relative to the hidden
  state's variance there, against random subspaces of the same kind.
- ``lens``: the logit lens's read-out of the input token, and unlikely-token projections.

Functions take tensors and small dataclasses, fit nothing, and know nothing of Hydra or of the
cache; ``job_statistics`` returns its results without touching anyone else's.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from probe_sweep.fitting.probe_set import LensInputs, ProbeSet
from probe_sweep.intervals import SequenceBootstrap
from probe_sweep.logit_lens import lens_logits
from probe_sweep.results import LogitLensReadout
from probe_sweep.statistics.lens import input_token_readout, token_set_projection
from probe_sweep.statistics.similarity import ridge_map_entries, similarity_entries
from probe_sweep.statistics.weight_mass import column_shares, weight_mass_entries

__all__ = ["JobProbes", "Measured", "StatisticsConfig", "job_statistics", "logit_lens_readouts"]


@dataclass
class StatisticsConfig:
    """What the statistics stage and the baselines measure. ``n_permutations``: draws per null,
    whatever it draws (pairing permutations, random subspaces of the same kind, random token
    sets). ``n_bootstrap``: resamples of held-out
    sequences for accuracy intervals; ``n_bootstrap_types``: resamples of token types for the
    intervals of statistics of the probe matrix. ``subspace_dim``: 0 = CKA / Procrustes at full
    dimension, k = on the top k principal components. ``random_init_baseline``: also fit the
    probes of the same architecture with random weights, the baseline every similarity is read
    against. ``control_task``: the Hewitt & Liang control probe (selectivity, weight-mass
    baseline). ``logit_lens``: logit-lens and unlikely-token read-outs (models with an
    unembedding). ``lens_rows``: held-out positions they use. ``unlikely_k``: tokens per set.
    ``lens_probe``: also train a probe on the logit-lens log-probabilities (the model's own
    guess). ``k_sweep``: numbers of directions k at which top-k, bottom-k and random-k probes
    are fitted (accuracy against k; empty = off), with ``k_seeds`` random draws each.
    ``lens_comparison``: per layer, the logit lens's and a tuned lens's top-1 for the current
    and the next token beside the identity probe (models with an unembedding); each tuned-lens
    translator is fitted on ``lens_train_rows`` training positions. ``mdl``: the online code
    length (MDL, Voita & Titov 2020) of the input token and of the control task at each layer,
    in bits, with the compression against the uniform code, over ``mdl_orders`` seeded orders
    of the rows (the range of their compressions says how much the order matters).
    ``max_classes``: statistics of the probe matrix use at most this many classes, a seeded
    subsample shared by the probe and its baselines (0 = all; a 50,257 x 1,600 probe makes each
    null draw cost seconds), reported in ``statistics.classes``."""

    enabled: bool = True
    n_permutations: int = 200
    n_bootstrap: int = 1000
    n_bootstrap_types: int = 100
    subspace_dim: int = 0
    random_init_baseline: bool = True
    control_task: bool = True
    control_labels: int = 32
    logit_lens: bool = True
    lens_probe: bool = False
    lens_rows: int = 1024
    unlikely_k: int = 50
    k_sweep: list[int] = field(default_factory=list)
    k_seeds: int = 3
    max_classes: int = 0
    layer_differences: bool = True
    mdl: bool = False
    mdl_orders: int = 3
    lens_comparison: bool = False
    lens_train_rows: int = 4096


@dataclass
class JobProbes:
    """What the statistics of one job are computed from. ``correct``: by layer, which held-out
    tokens the identity probe got right (the logit lens's read-out is paired with it);
    ``null_kind``: "coordinate" or
    "haar", the random subspaces the basis is compared with; ``compared_as``: what the probe
    kind sets against W_E, its weight rows ("rows") or its map into W_E's space ("map");
    ``random_init``: the same probes on the random-init model; ``control_fits``: identity-probe
    name -> the control-task probe at that layer."""

    probes: ProbeSet
    correct: dict[int, np.ndarray]
    embedding: torch.Tensor
    null_kind: str
    compared_as: str = "rows"
    random_init: ProbeSet | None = None
    control_fits: dict[str, Any] = field(default_factory=dict)
    lens: LensInputs | None = None


@dataclass(frozen=True)
class Measured:
    """The statistics of one job: every null-tested number (``nulls.null_entry``), each probe's
    weight share by basis column, the classes used, and the logit lens's read-outs by layer."""

    entries: list[dict[str, Any]]
    weight_mass: dict[str, Any]
    classes: dict[str, int]
    readouts: dict[int, LogitLensReadout]


def class_subsample(n_classes: int, most: int, seed: int) -> torch.Tensor | None:
    """Sorted indices of a seeded subsample of ``most`` classes, or None to use them all."""
    if most <= 0 or n_classes <= most:
        return None
    generator = torch.Generator().manual_seed(seed)
    return torch.randperm(n_classes, generator=generator)[:most].sort().values


def job_statistics(job: JobProbes, cfg: StatisticsConfig, seed: int) -> Measured:
    """Every statistic of one job."""
    entries: list[dict[str, Any]] = []
    masses: dict[str, Any] = {}
    n_classes = len(job.probes.class_embeddings)
    keep = class_subsample(n_classes, cfg.max_classes, seed)
    for name, fit in job.probes.fits.items():
        layer = None if name == "pooled" else int(name.removeprefix("layer_"))
        entries += probe_entries(job, name, fit, layer, cfg, seed, keep)
        masses[name] = column_shares(read_out(fit, job.compared_as).detach().cpu())
    readouts: dict[int, LogitLensReadout] = {}
    if job.lens is not None:
        readouts, found = logit_lens_readouts(job.lens, job.correct, job.embedding, cfg, seed)
        entries += found
    classes = {"used": n_classes if keep is None else len(keep), "of": n_classes}
    return Measured(entries, masses, classes, readouts)


def read_out(fit: Any, compared_as: str) -> torch.Tensor:
    """The matrix of a fit the statistics read: its weight rows, or its map into W_E's space."""
    return fit.probe.weight if compared_as == "rows" else fit.map_weight


def probe_entries(
    job: JobProbes,
    name: str,
    fit: Any,
    layer: int | None,
    cfg: StatisticsConfig,
    seed: int,
    keep: torch.Tensor | None = None,
) -> list[dict[str, Any]]:
    """The statistics of one fitted probe, each against its baselines, on the classes ``keep``
    (None: all)."""

    def classes(rows: torch.Tensor) -> torch.Tensor:
        rows = rows.detach().double().cpu()
        return rows if keep is None else rows[keep]

    probes, random, rows_kind = job.probes, job.random_init, job.compared_as == "rows"
    encoder = probes.encoder.double().cpu()
    source = classes(fit.probe.weight) if rows_kind else fit.map_weight.detach().double().cpu()
    mass_baselines = {}
    if rows_kind:
        baselines = {}
        if random is not None:
            theirs = classes(random.fits[name].probe.weight)
            their_encoder = random.encoder.double().cpu()
            their_embeddings = classes(random.class_embeddings)
            baselines["random_init"] = (theirs @ their_encoder.T, their_embeddings)
            mass_baselines["random_init"] = (theirs, random.covariances[name])
        entries = similarity_entries(
            source @ encoder.T, classes(probes.class_embeddings), layer, baselines,
            cfg.n_permutations, cfg.n_bootstrap_types, cfg.subspace_dim, seed,
        )  # fmt: skip
    else:
        map_natural = encoder @ source.T  # (d_in, d_emb): row-vector h -> embedding space
        entries = ridge_map_entries(map_natural, job.embedding, layer, cfg.n_permutations, seed)
    if name in job.control_fits:
        control = read_out(job.control_fits[name], job.compared_as)
        mass_baselines["control_task"] = (control, probes.covariances[name])
    entries += weight_mass_entries(
        source, probes.covariances[name], job.null_kind, layer, mass_baselines,
        cfg.n_permutations, cfg.n_bootstrap_types, seed,
    )  # fmt: skip
    return entries


def logit_lens_readouts(
    lens: LensInputs,
    correct: dict[int, np.ndarray],
    embedding: torch.Tensor,
    cfg: StatisticsConfig,
    seed: int,
) -> tuple[dict[int, LogitLensReadout], list[dict[str, Any]]]:
    """Per layer: the logit lens's read-out of the input token, the identity probe's top-1
    minus the lens's on the same positions (paired interval over their sequences), and the
    projection of the hidden state on the embeddings of tokens the final layer ranks lowest /
    highest."""
    final_logits = None
    if lens.final_layer is not None:
        final_hidden = lens.hidden[lens.final_layer]
        final_logits = lens_logits(final_hidden, lens.unembedding, lens.final_norm, False)
    bootstrap = SequenceBootstrap(lens.sequences, cfg.n_bootstrap, seed)
    readouts, entries = {}, []
    for layer, probe_correct in correct.items():
        hidden = lens.hidden[layer]
        logits = lens_logits(hidden, lens.unembedding, lens.final_norm, layer != lens.final_layer)
        readout, lens_correct = input_token_readout(logits, lens.targets)
        gain = probe_correct[: len(lens_correct)].astype(np.float64) - lens_correct
        projections: dict[str, float] = {}
        if final_logits is not None:
            projections, found = token_set_projection(
                hidden, embedding, final_logits, cfg.unlikely_k, layer, cfg.n_permutations, seed
            )
            entries += found
        readouts[layer] = LogitLensReadout(
            **readout,
            lens_input_top1_ci=bootstrap.interval(lens_correct),
            probe_minus_lens_top1=float(gain.mean()),
            probe_minus_lens_top1_ci=bootstrap.interval(gain),
            **projections,
        )
    return readouts, entries
