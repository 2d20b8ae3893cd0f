"""Stage 6: what the fitted probes say, each number with an interval and a baseline that could
have failed.

- ``similarity``: probe rows against W_E rows (cosine, CKA, Procrustes), with permutation nulls,
  type-bootstrap intervals and the random-init model's probe as the baseline.
- ``weight_mass``: the probe's weight on the directions W_E uses least, relative to the hidden
  state's variance there, against random subspaces of the same kind.
- ``bootstrap``: intervals over held-out sequences for every accuracy (used when scoring).
- ``lens``: the logit lens's read-out of the input token, and unlikely-token projections.

Functions take tensors and small dataclasses and know nothing of Hydra or of the cache.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from probe_sweep.statistics.lens import input_token_readout, lens_logits, token_set_projection
from probe_sweep.statistics.similarity import ridge_map_entries, similarity_entries
from probe_sweep.statistics.weight_mass import column_shares, weight_mass_entries

__all__ = ["JobProbes", "LensInputs", "ProbeSet", "StatisticsConfig", "job_statistics"]


@dataclass
class StatisticsConfig:
    """``n_permutations``: draws per null, whatever it draws (pairing permutations, random
    subspaces of the same kind, random token sets). ``n_bootstrap``: resamples of held-out
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
    in bits, with the compression against the uniform code. ``max_classes``: statistics of the
    probe matrix use at most this many classes, a seeded subsample shared by the probe and its
    baselines (0 = all; a 50,257 x 1,600 probe makes each null draw cost seconds), reported in
    ``statistics.classes``."""

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
    mdl: bool = False
    lens_comparison: bool = False
    lens_train_rows: int = 4096


def control_task_labels(vocab_size: int, n_labels: int, seed: int) -> np.ndarray:
    """Hewitt & Liang control task: a fixed random label in 0..n_labels-1 for every token type."""
    return np.random.default_rng(seed).integers(0, n_labels, size=vocab_size)


@dataclass
class ProbeSet:
    """The fitted probes of one model. ``fits``: probe name -> FitResult; ``encoder`` (d, k):
    coordinates = h @ encoder; ``class_embeddings`` (C, d): this model's W_E rows of the
    classes; ``covariances``: probe name -> covariance (k, k) of its training inputs."""

    fits: dict[str, Any]
    encoder: torch.Tensor
    class_embeddings: torch.Tensor
    covariances: dict[str, torch.Tensor]


@dataclass
class LensInputs:
    """Held-out hidden states (natural coordinates, per layer) and their input tokens for the
    logit-lens read-outs; ``final_layer``: the layer whose HF hidden state already has the
    final norm applied (None if it was not extracted)."""

    hidden: dict[int, torch.Tensor]
    targets: torch.Tensor
    unembedding: torch.Tensor
    final_norm: torch.nn.Module | None
    final_layer: int | None


@dataclass
class JobProbes:
    """What the statistics of one job are computed from. ``rows``: the per-layer scores (they
    get the statistics' per-layer fields); ``null_kind``: "coordinate" or "haar", the random
    subspaces the basis is compared with; ``random_init``: the same probes on the random-init
    model; ``control_fits``: identity-probe name -> the control-task probe at that layer."""

    probes: ProbeSet
    rows: list[dict[str, Any]]
    embedding: torch.Tensor
    null_kind: str
    random_init: ProbeSet | None = None
    control_fits: dict[str, Any] = field(default_factory=dict)
    lens: LensInputs | None = None


def class_subsample(n_classes: int, most: int, seed: int) -> torch.Tensor | None:
    """Sorted indices of a seeded subsample of ``most`` classes, or None to use them all."""
    if most <= 0 or n_classes <= most:
        return None
    generator = torch.Generator().manual_seed(seed)
    return torch.randperm(n_classes, generator=generator)[:most].sort().values


def job_statistics(job: JobProbes, cfg: StatisticsConfig, seed: int) -> dict[str, Any]:
    """Every statistic of one job; adds per-layer summaries to ``job.rows`` in place."""
    entries: list[dict[str, Any]] = []
    masses: dict[str, Any] = {}
    n_classes = len(job.probes.class_embeddings)
    keep = class_subsample(n_classes, cfg.max_classes, seed)
    for name, fit in job.probes.fits.items():
        layer = None if name == "pooled" else int(name.removeprefix("layer_"))
        found = probe_entries(job, name, fit, layer, cfg, seed, keep)
        entries += found
        weight = fit.map_weight if fit.map_weight is not None else fit.probe.weight
        masses[name] = column_shares(weight.detach().cpu())
        for row in job.rows:
            if row["probe"] == name:
                row.update(row_fields(found))
    lens: list[dict[str, Any]] = []
    if job.lens is not None:
        lens, found = logit_lens_readouts(job.lens, job.rows, job.embedding, cfg, seed)
        entries += found
    classes = {"used": n_classes if keep is None else len(keep), "of": n_classes}
    return {"entries": entries, "weight_mass": masses, "logit_lens": lens, "classes": classes}


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

    probes, random = job.probes, job.random_init
    weight = classes(fit.probe.weight)
    encoder = probes.encoder.double().cpu()
    if fit.map_weight is None:
        baselines = {}
        if random is not None:
            theirs = classes(random.fits[name].probe.weight)
            their_encoder = random.encoder.double().cpu()
            their_embeddings = classes(random.class_embeddings)
            baselines["random_init"] = (theirs @ their_encoder.T, their_embeddings)
        entries = similarity_entries(
            weight @ encoder.T, classes(probes.class_embeddings), layer, baselines,
            cfg.n_permutations, cfg.n_bootstrap_types, cfg.subspace_dim, seed,
        )  # fmt: skip
        source = weight
    else:
        source = fit.map_weight.detach().double().cpu()
        map_natural = encoder @ source.T  # (d_in, d_emb): row-vector h -> embedding space
        entries = ridge_map_entries(map_natural, job.embedding, layer, cfg.n_permutations, seed)
    mass_baselines = {}
    if random is not None and fit.map_weight is None:
        theirs = classes(random.fits[name].probe.weight)
        mass_baselines["random_init"] = (theirs, random.covariances[name])
    if name in job.control_fits:
        control = job.control_fits[name].probe.weight
        mass_baselines["control_task"] = (control, probes.covariances[name])
    entries += weight_mass_entries(
        source, probes.covariances[name], job.null_kind, layer, mass_baselines,
        cfg.n_permutations, cfg.n_bootstrap_types, seed,
    )  # fmt: skip
    return entries


def row_fields(entries: list[dict[str, Any]]) -> dict[str, Any]:
    """Per-layer summaries of a probe's entries: value, interval, p and baselines."""
    row: dict[str, Any] = {}
    for e in entries:
        name = e["name"]
        row[name] = e["observed"]
        if e.get("ci") is not None:
            row[f"{name}_ci"] = e["ci"]
        if "p" in e:
            row[f"{name}_p"] = e["p"]
        for baseline, b in (e.get("baselines") or {}).items():
            row[f"{name}_{baseline}"] = b["observed"]
            row[f"{name}_minus_{baseline}"] = b["difference"]
            row[f"{name}_minus_{baseline}_ci"] = b["difference_ci"]
    return row


def logit_lens_readouts(
    lens: LensInputs,
    rows: list[dict[str, Any]],
    embedding: torch.Tensor,
    cfg: StatisticsConfig,
    seed: int,
) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """Per layer: the logit lens's read-out of the input token, and the projection of the
    hidden state on the embeddings of tokens the final layer ranks lowest / highest."""
    final_logits = None
    if lens.final_layer is not None:
        final_hidden = lens.hidden[lens.final_layer]
        final_logits = lens_logits(final_hidden, lens.unembedding, lens.final_norm, False)
    readouts, entries = [], []
    for row in rows:
        layer = row["layer"]
        hidden = lens.hidden[layer]
        logits = lens_logits(hidden, lens.unembedding, lens.final_norm, layer != lens.final_layer)
        readout = {"layer": layer, **input_token_readout(logits, lens.targets)}
        if final_logits is not None:
            values, found = token_set_projection(
                hidden, embedding, final_logits, cfg.unlikely_k, layer, cfg.n_permutations, seed
            )
            readout.update(values)
            entries += found
        readout["probe_minus_lens_top1"] = row["top1"] - readout["lens_input_top1"]
        row.update({k: v for k, v in readout.items() if k != "layer"})
        readouts.append(readout)
    return readouts, entries


def _ci(ci: list[float | None] | None) -> str:
    return f"[{ci[0]:.3f}, {ci[1]:.3f}]" if ci and ci[0] is not None else ""


def format_entries(entries: list[dict[str, Any]]) -> str:
    """A fixed-width console table: value [95% CI], null mean [central 95%], p (its floor is
    1/(1+draws)), and the difference from each baseline [95% CI]."""
    head = f"{'statistic':>31} {'layer':>5} {'observed [95% CI]':>28} {'null [95%]':>28} {'p':>7}"
    lines = [head + "  baselines: difference [95% CI]"]
    for e in entries:
        layer = "all" if e["layer"] is None else str(e["layer"])
        observed = f"{e['observed']:.4f} {_ci(e.get('ci'))}"
        null = f"{e['null_mean']:.4f} {_ci(e['null_range'])}" if e.get("null_mean") else "-"
        p = e.get("p")
        p_text = "-" if p is None else (f"<={p:.4f}" if p <= e["p_floor"] else f"{p:.4f}")
        diffs = "  ".join(
            f"{name} {b['difference']:+.4f} {_ci(b['difference_ci'])}"
            for name, b in (e.get("baselines") or {}).items()
        )
        lines.append(f"{e['name']:>31} {layer:>5} {observed:>28} {null:>28} {p_text:>7}  {diffs}")
    return "\n".join(lines)


LAYER_FIELDS = [
    "top1",
    "random_init_top1",
    "control_top1",
    "selectivity",
    "lens_input_top1",
    "lens_input_median_rank",
    "probe_minus_lens_top1",
    "lens_probe_top1",
    "hidden_minus_lens_probe_top1",
    "proj_unlikely",
    "proj_likely",
    "proj_random",
    "logit_lens_next_top1",
    "tuned_lens_top1",
    "tuned_lens_next_top1",
    "mdl_compression",
    "control_mdl_compression",
]


def format_layers(rows: list[dict[str, Any]]) -> str:
    """Per-layer baseline / control / logit-lens fields that are present, with intervals."""
    columns = ["layer"] + [c for c in LAYER_FIELDS if any(c in r for r in rows)]
    lines = ["  ".join(f"{c[:22]:>22}" for c in columns)]
    for row in rows:
        cells = []
        for c in columns:
            value, ci = row.get(c), row.get(f"{c}_ci")
            text = f"{value:.4f}" if isinstance(value, float) else str(value)
            if ci and ci[0] is not None:
                text += f" ±{(ci[1] - ci[0]) / 2:.3f}"
            cells.append(f"{text:>22}")
        lines.append("  ".join(cells))
    return "\n".join(lines)
