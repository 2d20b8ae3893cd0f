"""Stage 6: measurements on fitted probes, each with a seeded null distribution.

Functions take tensors and arrays and know nothing of Hydra. Every null-tested number becomes an
*entry* ``{"name", "layer", "observed", "null_mean", "null_std", "z", "p", "n_null"}``: ``p`` is
the one-sided permutation p-value ``(1 + #{null at least as extreme}) / (1 + n_null)`` in the
direction named by ``alternative`` ("greater": larger = more aligned; "less" for residuals;
"two-sided": distance from the null mean).

- Weight mass: the share of the probe's weight energy on each basis component (columns ordered by
  importance to W_E), its cumulative curve and the share on the least important half; the null is
  the same share on a uniformly random half-dimensional subspace (the ``random`` basis), whose
  mean and std have a closed form (``random_subspace_moments``; p from the normal tail).
- Probe vs embedding (softmax probe, rows paired with W_E's rows of the same token): mean cosine
  of matched rows; orthogonal-Procrustes residual; linear CKA. Null: shuffle the pairing of
  rows. Both matrices are centred over rows first (a softmax probe cannot represent a direction
  shared by all rows). Procrustes and CKA are computed on the top ``subspace_dim`` principal
  components of each matrix (full-dimension nulls cost an SVD of a d x d matrix per draw);
  the retained variance is reported.
- Ridge probe: its map (hidden -> embedding space) against the identity (diagonal share under a
  permutation of output coordinates) and against W_E's principal subspace (energy share in the
  top half vs random half-subspaces).
- Control task (Hewitt & Liang): a fixed random map token type -> one of ``control_labels``
  labels; selectivity = accuracy - control accuracy.
- Logit lens: final norm then unembedding at every layer; rank and probability of the *input*
  token. Unlikely tokens: cosine of the hidden state with the embeddings of the tokens the
  final layer ranks lowest vs highest vs random tokens (signed cosine).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch


@dataclass
class StatisticsConfig:
    """``n_permutations``: draws per null. ``subspace_dim``: principal components kept for CKA /
    Procrustes. ``control_task``: also fit the Hewitt & Liang control probe (one more probe per
    layer). ``logit_lens``: logit-lens and unlikely-token read-outs (models with an unembedding).
    ``lens_rows``: held-out positions they use. ``unlikely_k``: tokens per set. ``lens_probe``:
    also train a probe on the logit-lens log-probabilities (the model's own guess) and compare it
    with the probe on the hidden state (one more probe per layer, V logits per token)."""

    enabled: bool = True
    n_permutations: int = 1000
    subspace_dim: int = 64
    control_task: bool = False
    control_labels: int = 32
    logit_lens: bool = True
    lens_probe: bool = False
    lens_rows: int = 1024
    unlikely_k: int = 50


def _f(x: Any) -> float | None:
    x = float(x)
    return x if math.isfinite(x) else None


def entry(
    name: str,
    layer: int | None,
    observed: float,
    null: torch.Tensor | np.ndarray,
    alternative: str = "greater",
) -> dict[str, Any]:
    """One null-tested number as a plain dict (JSON- and tracker-ready)."""
    null = torch.as_tensor(null, dtype=torch.float64)
    mean, std = null.mean().item(), null.std().item()
    if alternative == "greater":
        extreme = null >= observed
    elif alternative == "less":
        extreme = null <= observed
    else:
        extreme = (null - mean).abs() >= abs(observed - mean)
    z = (observed - mean) / std if std > 0 else math.nan
    p = (1 + int(extreme.sum())) / (1 + len(null))
    return _entry(name, layer, observed, mean, std, z, p, len(null), alternative)


def _entry(
    name: str,
    layer: int | None,
    observed: float,
    mean: float,
    std: float,
    z: float,
    p: float,
    n_null: int | None,
    alternative: str,
) -> dict[str, Any]:
    return {
        "name": name,
        "layer": layer,
        "observed": _f(observed),
        "null_mean": _f(mean),
        "null_std": _f(std),
        "z": _f(z),
        "p": _f(p),
        "n_null": n_null,
        "alternative": alternative,
    }


# --- weight mass ------------------------------------------------------------------------------


def weight_mass(weight: torch.Tensor) -> dict[str, Any]:
    """Energy share per column of ``weight`` (C, k), columns in importance order."""
    energy = weight.double().pow(2).sum(0)
    share = energy / energy.sum().clamp_min(1e-300)
    cumulative = share.cumsum(0)
    half = weight.shape[1] // 2
    return {
        "share": share.tolist(),
        "cumulative": cumulative.tolist(),
        "bottom_half_share": share[half:].sum().item(),
    }


def entry_normal(
    name: str, layer: int | None, observed: float, mean: float, std: float, alternative: str
) -> dict[str, Any]:
    """An entry whose null mean and std are exact (closed form); p from the normal tail."""
    z = (observed - mean) / std if std > 0 else math.nan
    tail = {"greater": z, "less": -z, "two-sided": abs(z)}[alternative]  # P(Z >= tail)
    p = 0.5 * math.erfc(tail / math.sqrt(2)) * (2 if alternative == "two-sided" else 1)
    entry = _entry(name, layer, observed, mean, std, z, min(p, 1.0), None, alternative)
    return {**entry, "null": "closed form (normal p)"}


def random_subspace_moments(weight: torch.Tensor, dim: int) -> tuple[float, float]:
    """Exact mean and std of the energy share of ``weight`` (C, d) on a Haar-random ``dim``-
    dimensional subspace: with G = W^T W, E = dim/d and
    Var = 2 dim (d - dim) (d tr(G^2) - tr(G)^2) / (d^2 (d - 1) (d + 2) tr(G)^2).
    (Checked against ``random_subspace_share`` draws in the tests; a Monte Carlo null of 1000
    QR draws of a 384 x 192 matrix took minutes per layer on 2 cores.)"""
    w = weight.double()
    d = w.shape[1]
    gram = w.T @ w
    t1, t2 = torch.trace(gram).item(), gram.pow(2).sum().item()
    if d < 2 or t1 <= 0:
        return dim / max(d, 1), 0.0
    var = 2 * dim * (d - dim) * (d * t2 - t1**2) / (d**2 * (d - 1) * (d + 2) * t1**2)
    return dim / d, math.sqrt(max(var, 0.0))


def random_subspace_share(
    weight: torch.Tensor, dim: int, n_draws: int, seed: int, batch: int = 100
) -> torch.Tensor:
    """Null draws of the energy share of ``weight`` (C, d) on a uniformly random ``dim``-
    dimensional subspace of R^d (the bottom half of a random orthogonal basis)."""
    w = weight.double()
    gram = w.T @ w
    total = torch.trace(gram)
    d = w.shape[1]
    gen = torch.Generator().manual_seed(seed)
    out = []
    for start in range(0, n_draws, batch):
        b = min(batch, n_draws - start)
        q, _ = torch.linalg.qr(torch.randn(b, d, dim, generator=gen, dtype=torch.float64))
        out.append(((gram @ q) * q).sum((1, 2)) / total)
    return torch.cat(out)


def subspace_share(weight: torch.Tensor, directions: torch.Tensor) -> float:
    """Energy share of ``weight`` (C, d) on the span of orthonormal ``directions`` (d, r)."""
    w = weight.double()
    return ((w @ directions.double()).pow(2).sum() / w.pow(2).sum()).item()


# --- probe vs embedding -----------------------------------------------------------------------


def _centre(x: torch.Tensor) -> torch.Tensor:
    x = x.double()
    return x - x.mean(0)


def _top_components(x: torch.Tensor, r: int) -> tuple[torch.Tensor, float]:
    """Scores on the top-r principal components (C, r) and the variance share they keep."""
    vals, vecs = torch.linalg.eigh(x.T @ x)  # (d, d): cheaper than an SVD of (C, d)
    vals, vecs = vals.flip(0).clamp_min(0), vecs.flip(1)
    r = min(r, len(vals))
    return x @ vecs[:, :r], (vals[:r].sum() / vals.sum().clamp_min(1e-300)).item()


def _permutations(n: int, n_draws: int, seed: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.argsort(torch.rand(n_draws, n, generator=gen), dim=1)


def matched_cosine(a: torch.Tensor, b: torch.Tensor) -> float:
    an = torch.nn.functional.normalize(_centre(a), dim=1)
    bn = torch.nn.functional.normalize(_centre(b), dim=1)
    return (an * bn).sum(1).mean().item()


def procrustes_residual(a: torch.Tensor, b: torch.Tensor) -> float:
    """min over orthogonal R of ||A R - B||_F^2 with A, B centred and scaled to unit norm:
    2 - 2 * nuclear_norm(A^T B)."""
    a, b = _centre(a), _centre(b)
    a, b = a / a.norm(), b / b.norm()
    return 2 - 2 * torch.linalg.svdvals(a.T @ b).sum().item()


def linear_cka(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = _centre(a), _centre(b)
    return ((a.T @ b).pow(2).sum() / ((a.T @ a).norm() * (b.T @ b).norm())).item()


def probe_embedding_statistics(
    probe_weight: torch.Tensor,
    embedding_rows: torch.Tensor,
    layer: int | None,
    n_permutations: int,
    subspace_dim: int,
    seed: int,
) -> list[dict[str, Any]]:
    """Matched-row cosine, Procrustes residual and linear CKA of the probe weight (C, d) against
    the embedding rows (C, d) of the same tokens, each with a row-shuffle null."""
    a, b = _centre(probe_weight), _centre(embedding_rows)
    perms = _permutations(len(a), n_permutations, seed)
    # Cosine: the full (C, C) cosine matrix once, then one gather per draw.
    an = torch.nn.functional.normalize(a, dim=1)
    bn = torch.nn.functional.normalize(b, dim=1)
    cos = an @ bn.T
    observed_cos = cos.diagonal().mean().item()
    null_cos = cos.gather(1, perms.T).mean(0)
    # Procrustes and CKA in the top principal components of each matrix.
    ar, keep_a = _top_components(a, subspace_dim)
    br, keep_b = _top_components(b, subspace_dim)
    ar, br = ar / ar.norm(), br / br.norm()
    norm_aa, norm_bb = (ar.T @ ar).norm(), (br.T @ br).norm()

    def scores(m: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        residual = 2 - 2 * torch.linalg.svdvals(m).sum(-1).double()
        cka = m.double().pow(2).sum((-2, -1)) / (norm_aa * norm_bb)
        return residual, cka

    obs_res, obs_cka = scores(ar.T @ br)
    null_res, null_cka = [], []
    for start in range(0, n_permutations, 100):
        r, c = scores(ar.T.float() @ br.float()[perms[start : start + 100]])
        null_res.append(r)
        null_cka.append(c)
    out = [
        entry("probe_embedding_cosine", layer, observed_cos, null_cos),
        entry("probe_embedding_procrustes", layer, obs_res.item(), torch.cat(null_res), "less"),
        entry("probe_embedding_cka", layer, obs_cka.item(), torch.cat(null_cka)),
    ]
    for e in out[1:]:
        e["variance_kept"] = [keep_a, keep_b]
    return out


def ridge_map_statistics(
    map_natural: torch.Tensor,
    embedding: torch.Tensor,
    layer: int | None,
    n_permutations: int,
    seed: int,
) -> list[dict[str, Any]]:
    """The ridge map M (d_in, d_out: row-vector hidden -> embedding space) against the identity
    (share of |M| on the diagonal, null: permuted output coordinates) and against W_E's
    principal subspace (energy of M's outputs in W_E's top d/2 principal directions, null:
    random d/2-dimensional subspaces)."""
    m = map_natural.double()
    d = m.shape[0]
    perms = _permutations(d, n_permutations, seed)
    total = m.abs().sum()
    observed = (m.diagonal().abs().sum() / total).item()
    null = m.abs().gather(1, perms.T).sum(0) / total
    centred = _centre(embedding)
    _, _, vh = torch.linalg.svd(centred, full_matrices=False)
    top = vh[: d // 2].T
    share = subspace_share(m, top)
    mean, std = random_subspace_moments(m, d // 2)
    return [
        entry("ridge_map_identity", layer, observed, null),
        entry_normal("ridge_map_embedding_subspace", layer, share, mean, std, "two-sided"),
    ]


# --- control task -----------------------------------------------------------------------------


def control_task_labels(vocab_size: int, n_labels: int, seed: int) -> np.ndarray:
    """Hewitt & Liang control task: a fixed random label in 0..n_labels-1 for every token type."""
    return np.random.default_rng(seed).integers(0, n_labels, size=vocab_size)


# --- logit lens and unlikely tokens ----------------------------------------------------------


@torch.no_grad()
def lens_logits(
    hidden: torch.Tensor,
    unembedding: torch.Tensor,
    final_norm: torch.nn.Module | None,
    apply_norm: bool,
) -> torch.Tensor:
    """Logit lens: ``final_norm(h) @ U^T`` (the norm is skipped where HF already applied it)."""
    h = hidden.float()
    if apply_norm and final_norm is not None:
        h = final_norm.float().to(h.device)(h)
    return h @ unembedding.float().to(h.device).T


@torch.no_grad()
def input_token_readout(logits: torch.Tensor, targets: torch.Tensor) -> dict[str, float]:
    """Rank (1 = top) and probability of the input token under logit-lens logits (N, V)."""
    target_logit = logits.gather(1, targets[:, None])
    rank = (logits > target_logit).sum(1).double() + 1
    prob = torch.softmax(logits.double(), 1).gather(1, targets[:, None])[:, 0]
    return {
        "lens_input_top1": (rank == 1).double().mean().item(),
        "lens_input_median_rank": rank.median().item(),
        "lens_input_mean_log_rank": rank.log().mean().item(),
        "lens_input_prob": prob.mean().item(),
    }


@torch.no_grad()
def token_set_projection(
    hidden: torch.Tensor,
    embedding: torch.Tensor,
    final_logits: torch.Tensor,
    k: int,
    layer: int,
    n_draws: int,
    seed: int,
) -> tuple[dict[str, float], list[dict[str, Any]]]:
    """Mean cos(h, e_t) over the k tokens the final layer ranks lowest (unlikely) and highest
    (likely) at each position, with a null of k random tokens per draw. Signed: a positive
    value mid-network for tokens the output then rules out means their embedding directions are
    present and later removed (at the final layer they point away by construction)."""
    hn = torch.nn.functional.normalize(hidden.float(), dim=1)
    en = torch.nn.functional.normalize(embedding.float().to(hn.device), dim=1)
    cos = hn @ en.T  # (N, V), signed: at the last layer unlikely tokens point away
    low = final_logits.topk(k, dim=1, largest=False).indices
    high = final_logits.topk(k, dim=1).indices
    unlikely = cos.gather(1, low).mean().item()
    likely = cos.gather(1, high).mean().item()
    gen = torch.Generator().manual_seed(seed)
    per_token = cos.mean(0)  # mean over positions of each token's |cos|
    draws = torch.randint(0, cos.shape[1], (n_draws, k), generator=gen)
    null = per_token.cpu()[draws].mean(1)
    values = {"proj_unlikely": unlikely, "proj_likely": likely, "proj_random": null.mean().item()}
    entries = [
        entry("unlikely_token_projection", layer, unlikely, null, "two-sided"),
        entry("likely_token_projection", layer, likely, null, "two-sided"),
    ]
    return values, entries


# --- one fitted probe -------------------------------------------------------------------------


def probe_statistics(
    weight: torch.Tensor,
    map_weight: torch.Tensor | None,
    encoder: torch.Tensor,
    class_embeddings: torch.Tensor,
    embedding: torch.Tensor,
    layer: int | None,
    cfg: StatisticsConfig,
    seed: int,
) -> tuple[list[dict[str, Any]], dict[str, Any], dict[str, Any]]:
    """Everything measured on one probe: null-tested entries, the per-layer row fields, and the
    weight-mass curve. ``weight`` (C, k) is the probe weight in basis coordinates (rows pair
    with ``class_embeddings``); ``map_weight`` (d, k) the ridge map; ``encoder`` (d, k) the
    basis encoder (coordinates = h @ encoder)."""
    weight, encoder = weight.detach().double().cpu(), encoder.double().cpu()
    source = map_weight.detach().double().cpu() if map_weight is not None else weight
    mass = weight_mass(source)
    k = source.shape[1]
    mean, std = random_subspace_moments(source, k - k // 2)
    observed = mass["bottom_half_share"]
    entries = [entry_normal("weight_mass_bottom_half", layer, observed, mean, std, "greater")]
    if map_weight is None:
        natural = weight @ encoder.T
        entries += probe_embedding_statistics(
            natural, class_embeddings.cpu(), layer, cfg.n_permutations, cfg.subspace_dim, seed
        )
    else:
        map_natural = encoder @ source.T  # (d_in, d_emb): row-vector h -> embedding space
        entries += ridge_map_statistics(
            map_natural, embedding.cpu(), layer, cfg.n_permutations, seed
        )
    row: dict[str, Any] = {}
    for e in entries:
        row[e["name"]] = e["observed"]
        row[e["name"] + "_z"] = e["z"]
    return entries, row, mass


def format_entries(entries: list[dict[str, Any]]) -> str:
    """A fixed-width table of null-tested statistics for the console."""
    lines = [f"{'statistic':>30}  {'layer':>5}  {'observed':>10}  {'null':>17}  {'z':>8}  {'p':>7}"]
    for e in entries:
        null = f"{e['null_mean']:.4f}+-{e['null_std']:.4f}" if e["null_mean"] is not None else "-"
        z = f"{e['z']:8.2f}" if e["z"] is not None else f"{'-':>8}"
        layer = "all" if e["layer"] is None else str(e["layer"])
        lines.append(
            f"{e['name']:>30}  {layer:>5}  {e['observed']:10.4f}  {null:>17}  {z}  {e['p']:7.4f}"
        )
    return "\n".join(lines)


# --- one job ----------------------------------------------------------------------------------


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
    """What the statistics of one job are computed from. ``fits``: probe name -> FitResult
    (``.probe.weight``, ``.map_weight``); ``rows``: the per-layer scores (they get the
    statistics' per-layer fields); ``encoder`` (d, k): coordinates = h @ encoder;
    ``control`` / ``lens_probe``: held-out scores of the control-task probe and of the probe on
    logit-lens log-probabilities, by layer."""

    fits: dict[str, Any]
    rows: list[dict[str, Any]]
    encoder: torch.Tensor
    embedding: torch.Tensor
    class_embeddings: torch.Tensor
    control: dict[int, dict[str, Any]] | None = None
    lens_probe: dict[int, dict[str, Any]] | None = None
    lens: LensInputs | None = None


def job_statistics(job: JobProbes, cfg: StatisticsConfig, seed: int) -> dict[str, Any]:
    """Every measurement of one job; adds per-layer summaries to ``job.rows`` in place."""
    entries: list[dict[str, Any]] = []
    masses: dict[str, Any] = {}
    fields: dict[str, dict[str, Any]] = {}
    for name, fit in job.fits.items():
        layer = next((r["layer"] for r in job.rows if r["probe"] == name), None)
        layer = None if name == "pooled" else layer
        found, row, mass = probe_statistics(
            fit.probe.weight, fit.map_weight, job.encoder, job.class_embeddings, job.embedding,
            layer, cfg, seed,
        )  # fmt: skip
        entries += found
        masses[name] = mass
        fields[name] = row
    for row in job.rows:
        row.update(fields[row["probe"]])
        if job.control is not None:
            row["control_top1"] = job.control[row["layer"]]["top1"]
            row["selectivity"] = row["top1"] - row["control_top1"]
        if job.lens_probe is not None:
            row["lens_probe_top1"] = job.lens_probe[row["layer"]]["top1"]
            row["hidden_minus_lens_probe_top1"] = row["top1"] - row["lens_probe_top1"]
    lens: list[dict[str, Any]] = []
    if job.lens is not None:
        lens, found = logit_lens_readouts(job.lens, job.rows, job.embedding, cfg, seed)
        entries += found
    return {"entries": entries, "weight_mass": masses, "logit_lens": lens}


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


LAYER_FIELDS = [
    "top1",
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
]


def format_layers(rows: list[dict[str, Any]]) -> str:
    """Per-layer control / logit-lens / unlikely-token fields that are present."""
    columns = ["layer"] + [c for c in LAYER_FIELDS if any(c in r for r in rows)]
    lines = ["  ".join(f"{c[:22]:>22}" for c in columns)]
    for row in rows:
        cells = []
        for c in columns:
            value = row.get(c)
            cells.append(f"{value:>22.4f}" if isinstance(value, float) else f"{value!s:>22}")
        lines.append("  ".join(cells))
    return "\n".join(lines)
