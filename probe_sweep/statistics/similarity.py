"""Is the probe matrix closer to W_E than chance, and than a probe that could have failed?

Three similarities between a probe's weight rows (C, d, natural coordinates) and the W_E rows
of the same tokens, both centred over rows first (a softmax probe cannot represent a direction
shared by all rows): the mean cosine of matched rows, linear CKA, and the orthogonal Procrustes
residual ``2 - 2 ||A^T B||_* / (||A|| ||B||)``. All at full dimension by default.

Each gets (a) a 95% interval from half-samples of the token types (rows; the probe is not
refitted), (b) the pairing-permutation null (rows shuffled: it only tests "no pairing at all",
so any identity probe passes it), and (c) the same similarity for baseline probes that could
have failed (the random-init model's probe, at the same layer, against that model's W_E), as a
paired difference with its interval.
"""

from __future__ import annotations

from typing import Any

import torch

from probe_sweep.statistics.nulls import centred_interval, half_samples, null_entry, permutations

NAMES = ("probe_embedding_cosine", "probe_embedding_cka", "probe_embedding_procrustes")
# The direction in which each similarity means "more like W_E".
ALTERNATIVE = {"probe_embedding_cosine": "greater", "probe_embedding_cka": "greater"}
ALTERNATIVE["probe_embedding_procrustes"] = "less"


def top_components(x: torch.Tensor, r: int) -> tuple[torch.Tensor, float]:
    """Scores of centred ``x`` on its top-r principal components, and the variance they keep."""
    x = x.double() - x.double().mean(0)
    vals, vecs = torch.linalg.eigh(x.T @ x)
    vals, vecs = vals.flip(0).clamp_min(0), vecs.flip(1)
    r = min(r, len(vals))
    return x @ vecs[:, :r], (vals[:r].sum() / vals.sum().clamp_min(1e-300)).item()


def _nuclear(m: torch.Tensor) -> torch.Tensor:
    """Sum of singular values of each (..., d, d) matrix, from the eigenvalues of M^T M."""
    return torch.linalg.eigvalsh(m.transpose(-2, -1) @ m).clamp_min(0).sqrt().sum(-1)


def weighted_similarities(
    a: torch.Tensor, b: torch.Tensor, weights: torch.Tensor
) -> dict[str, torch.Tensor]:
    """The three similarities with row i counted ``weights[j, i]`` times, for each row j of
    ``weights`` (all ones: the plain statistic; bootstrap counts: its resamples)."""
    a, b, weights = a.double(), b.double(), weights.double()
    out: dict[str, list[torch.Tensor]] = {name: [] for name in NAMES}
    for w in weights:
        n = w.sum()
        ac, bc = a - (w @ a) / n, b - (w @ b) / n
        cos = (ac * bc).sum(1) / (ac.norm(dim=1) * bc.norm(dim=1)).clamp_min(1e-300)
        out["probe_embedding_cosine"].append((w * cos).sum() / n)
        wb = bc * w[:, None]
        cross, aa, bb = ac.T @ wb, ac.T @ (ac * w[:, None]), bc.T @ wb
        out["probe_embedding_cka"].append(cross.pow(2).sum() / (aa.norm() * bb.norm()))
        scale = (torch.trace(aa) * torch.trace(bb)).sqrt()
        out["probe_embedding_procrustes"].append(2 - 2 * _nuclear(cross) / scale)
    return {name: torch.stack(values) for name, values in out.items()}


def permutation_nulls(
    a: torch.Tensor, b: torch.Tensor, n_draws: int, seed: int, batch: int = 50
) -> dict[str, torch.Tensor]:
    """The three similarities with the rows of ``b`` shuffled (``n_draws`` seeded shuffles)."""
    ac, bc = a.double() - a.double().mean(0), b.double() - b.double().mean(0)
    perms = permutations(len(ac), n_draws, seed)
    an = torch.nn.functional.normalize(ac, dim=1)
    bn = torch.nn.functional.normalize(bc, dim=1)
    null = {"probe_embedding_cosine": (an @ bn.T).gather(1, perms.T).mean(0)}
    norm_aa, norm_bb = (ac.T @ ac).norm(), (bc.T @ bc).norm()
    scale = ac.norm() * bc.norm()
    cka, residual = [], []
    for start in range(0, n_draws, batch):
        cross = ac.T @ bc[perms[start : start + batch]]  # (batch, d, d)
        cka.append(cross.pow(2).sum((-2, -1)) / (norm_aa * norm_bb))
        residual.append(2 - 2 * _nuclear(cross) / scale)
    null["probe_embedding_cka"] = torch.cat(cka)
    null["probe_embedding_procrustes"] = torch.cat(residual)
    return null


def similarity_entries(
    probe: torch.Tensor,
    embedding_rows: torch.Tensor,
    layer: int | None,
    baselines: dict[str, tuple[torch.Tensor, torch.Tensor]],
    n_permutations: int,
    n_bootstrap: int,
    subspace_dim: int,
    seed: int,
) -> list[dict[str, Any]]:
    """Entries for the three similarities of ``probe`` (C, d) with ``embedding_rows`` (C, d).

    ``baselines``: name -> (probe, embedding rows) of a baseline over the same C classes.
    ``subspace_dim`` > 0 computes CKA and Procrustes on that many principal components of
    each matrix instead of at full dimension (the variance kept is reported)."""
    pairs = {"": (probe, embedding_rows), **baselines}
    kept: dict[str, list[float]] = {}
    if subspace_dim > 0:
        reduced = {}
        for name, (a, b) in pairs.items():
            (ar, keep_a), (br, keep_b) = (
                top_components(a, subspace_dim),
                top_components(b, subspace_dim),
            )
            reduced[name] = (ar, br)
            kept[name] = [keep_a, keep_b]
        pairs = reduced
    counts = torch.ones(1 + n_bootstrap, len(probe), dtype=torch.float64)
    counts[1:] = half_samples(len(probe), n_bootstrap, seed)
    values = {name: weighted_similarities(a, b, counts) for name, (a, b) in pairs.items()}
    a, b = pairs[""]
    nulls = permutation_nulls(a, b, n_permutations, seed)
    entries = []
    for stat in NAMES:
        ours = values[""][stat]
        found = null_entry(
            stat, layer, ours[0].item(), nulls[stat], ALTERNATIVE[stat],
            centred_interval(ours[0].item(), ours[1:]),
        )  # fmt: skip
        if kept:
            found["variance_kept"] = kept[""]
        found["baselines"] = {
            name: {
                "observed": values[name][stat][0].item(),
                "ci": centred_interval(values[name][stat][0].item(), values[name][stat][1:]),
                "difference": (ours[0] - values[name][stat][0]).item(),
                "difference_ci": centred_interval(
                    (ours[0] - values[name][stat][0]).item(), ours[1:] - values[name][stat][1:]
                ),
            }
            for name in baselines
        }
        entries.append(found)
    return entries


def ridge_map_entries(
    map_natural: torch.Tensor,
    embedding: torch.Tensor,
    layer: int | None,
    n_permutations: int,
    seed: int,
) -> list[dict[str, Any]]:
    """The ridge map M (d_in, d_out: hidden -> embedding space) against the identity (share of
    |M| on the diagonal; null: permuted output coordinates) and against W_E's principal
    subspace (energy of M's outputs in W_E's top d/2 principal directions; null: Haar-random
    d/2-dimensional subspaces)."""
    from probe_sweep.subspaces import haar_frames

    m = map_natural.double()
    d = m.shape[0]
    perms = permutations(d, n_permutations, seed)
    total = m.abs().sum()
    observed = (m.diagonal().abs().sum() / total).item()
    null = m.abs().gather(1, perms.T).sum(0) / total
    centred = embedding.double() - embedding.double().mean(0)
    _, _, vh = torch.linalg.svd(centred, full_matrices=False)
    gram = m.T @ m
    share = (torch.trace(vh[: d // 2] @ gram @ vh[: d // 2].T) / torch.trace(gram)).item()
    shares = [
        ((gram @ q) * q).sum((1, 2)) / torch.trace(gram)
        for q in haar_frames(d, d // 2, n_permutations, seed)
    ]
    return [
        null_entry("ridge_map_identity", layer, observed, null),
        null_entry("ridge_map_embedding_subspace", layer, share, torch.cat(shares), "two-sided"),
    ]
