"""Stage 4: the coordinates a probe sees, derived from the embedding matrix W_E (V x d).

A basis is a (d, k) matrix whose columns are directions ("atoms") in the residual stream,
ordered by their importance to W_E (column 0 = most important), plus an *encoder* (d, k): a
hidden state h gets coordinates ``h @ encoder``. For the orthonormal bases (natural, pca,
frequency, random) the encoder is the direction matrix itself. For NMF and the dictionary the
atoms are not orthogonal, so the coordinates are the minimum-norm least-squares solution of
``h ~= c @ directions.T``, i.e. ``encoder = pinv(directions.T)``; for k >= d atoms spanning
R^d this reconstructs h exactly, for a truncated basis it is the projection onto their span.
The probe is trained on those coordinates, so its regularisation acts, and its weights are
read, in that basis.

Constructions (``importance`` is what orders the columns):
- natural: the coordinate axes, ordered by the variance of W_E along each axis.
- pca: eigenvectors of the covariance of W_E's rows (all V rows), by explained variance.
- frequency: eigenvectors of the token-frequency-weighted covariance
  sum_t p_t (e_t - mu)(e_t - mu)^T with p_t the token's share of the training tokens, by
  weighted variance: the directions the embeddings of the tokens that actually occur spread along.
- random: a seeded Haar-random orthogonal basis (QR of a Gaussian matrix) in draw order, so its
  top-k is a random k-dimensional subspace: the null for every basis-dependent statistic.
- nmf: W_E is signed, so the non-negative matrix [max(W_E, 0), max(-W_E, 0)] (V x 2d) is factored
  as A @ H with A, H >= 0 (scikit-learn NMF, multiplicative updates); atom j is
  H[j, :d] - H[j, d:], so W_E ~= A @ atoms.T with non-negative loadings (parts add, never cancel
  in the loadings). Importance = energy of the rank-1 term, ||A_j||^2 ||atom_j||^2.
- dictionary: an over-complete dictionary (k = 2d atoms by default, unit norm) for the centred,
  scaled rows of W_E, learned by the method of optimal directions (MOD, Engan et al. 1999:
  sparse codes with ``n_nonzero`` atoms per row, chosen by correlation and weighted by least
  squares, then a least-squares atom update, ``max_iter`` rounds). scikit-learn's
  MiniBatchDictionaryLearning took minutes on 2 CPU cores for 768 atoms; MOD takes seconds.
  Importance = sum of squared codes of the atom over the fitted rows.
NMF and the dictionary are fitted on ``fit_rows`` rows of W_E drawn with the seed.

``top_k`` / ``bottom_k``: keep only the first k (most important) or last k columns.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field
from enum import Enum
from typing import Any

import numpy as np
import torch

from probe_sweep.errors import UserError


class BasisKind(Enum):
    natural = "natural"
    pca = "pca"
    nmf = "nmf"
    frequency = "frequency"
    random = "random"
    dictionary = "dictionary"


ORTHONORMAL = {BasisKind.natural, BasisKind.pca, BasisKind.frequency, BasisKind.random}
# Bases whose axes are privileged (any rotation of them is a different basis): statistics on
# a subset of their columns are compared with random subsets of columns, not random subspaces.
AXIS_ALIGNED = {BasisKind.natural, BasisKind.nmf, BasisKind.dictionary}


@dataclass
class BasisConfig:
    """``kind``: see the module docstring. ``top_k`` / ``bottom_k`` (at most one): keep only the
    k most / least important columns. ``n_components``: atoms for nmf (default d) and the
    dictionary (default 2d). ``n_nonzero``: OMP atoms per row for the dictionary. ``fit_rows``:
    W_E rows (seeded sample) nmf / dictionary are fitted on; ``max_iter`` their iterations."""

    kind: BasisKind = BasisKind.natural
    top_k: int | None = None
    bottom_k: int | None = None
    n_components: int | None = None
    n_nonzero: int = 8
    fit_rows: int = 2048
    max_iter: int = 100


@dataclass
class Basis:
    name: str
    directions: torch.Tensor
    encoder: torch.Tensor | None = None
    importance: torch.Tensor | None = None
    orthonormal: bool = True
    info: dict[str, Any] = field(default_factory=dict)
    # "coordinate" (random column subsets) or "haar" (random subspaces): the same-kind null
    null_kind: str = "haar"

    def __post_init__(self) -> None:
        if self.encoder is None:
            self.encoder = self.directions
        if self.importance is None:
            self.importance = torch.ones(self.directions.shape[1])

    @property
    def size(self) -> int:
        return int(self.directions.shape[1])

    def coordinates(self, hidden: torch.Tensor) -> torch.Tensor:
        assert self.encoder is not None
        return hidden @ self.encoder.to(hidden.device, hidden.dtype)

    def to_natural(self, weight: torch.Tensor) -> torch.Tensor:
        """A probe weight (C, k) read in this basis as the weight (C, d) it applies to h."""
        assert self.encoder is not None
        return weight @ self.encoder.to(weight.device, weight.dtype).T


def check_basis_config(cfg: BasisConfig, d_model: int) -> None:
    """Value checks a type cannot express; cheap, so the entry point runs it before loading."""
    if cfg.top_k is not None and cfg.bottom_k is not None:
        raise UserError("set at most one of basis.top_k and basis.bottom_k")
    n_atoms = n_components(cfg, d_model)
    if cfg.kind is BasisKind.dictionary and n_atoms <= d_model:
        raise UserError(f"basis=dictionary needs n_components > d={d_model} (over-complete)")
    for name in ("top_k", "bottom_k"):
        k = getattr(cfg, name)
        if k is not None and not 1 <= k <= n_atoms:
            raise UserError(f"basis.{name}={k} must lie in 1..{n_atoms} (the basis size)")
    if cfg.n_nonzero < 1 or cfg.fit_rows < 2 or cfg.max_iter < 1:
        raise UserError("basis.n_nonzero, basis.fit_rows and basis.max_iter must be positive")


def n_components(cfg: BasisConfig, d_model: int) -> int:
    if cfg.kind is BasisKind.nmf:
        return cfg.n_components or d_model
    if cfg.kind is BasisKind.dictionary:
        return cfg.n_components or 2 * d_model
    return d_model


def _eig_desc(cov: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    vals, vecs = np.linalg.eigh(cov)
    order = np.argsort(-vals, kind="stable")
    vecs = vecs[:, order]
    # A deterministic sign: the largest-magnitude entry of each eigenvector is positive.
    signs = np.sign(vecs[np.abs(vecs).argmax(0), np.arange(vecs.shape[1])])
    return np.clip(vals[order], 0, None), vecs * np.where(signs == 0, 1, signs)


def _variance_along(emb: np.ndarray, directions: np.ndarray) -> np.ndarray:
    centred = emb - emb.mean(0)
    return ((centred @ directions) ** 2).mean(0)


def _sample_rows(emb: np.ndarray, n: int, seed: int) -> np.ndarray:
    if len(emb) <= n:
        return emb
    pick = np.sort(np.random.default_rng(seed).choice(len(emb), n, replace=False))
    return emb[pick]


def random_orthogonal(d: int, seed: int) -> np.ndarray:
    """A Haar-random orthogonal (d, d) matrix from ``seed``."""
    gauss = np.random.default_rng(seed).standard_normal((d, d))
    q, r = np.linalg.qr(gauss)
    return q * np.sign(np.diag(r))


def nmf_factors(
    emb: np.ndarray, n_atoms: int, max_iter: int, seed: int
) -> tuple[np.ndarray, np.ndarray]:
    """Loadings A (n, k) >= 0 and signed atoms (d, k) with emb ~= A @ atoms.T, from the NMF of
    the non-negative split [max(emb, 0), max(-emb, 0)] = A @ H, atoms = H[:, :d] - H[:, d:]."""
    from sklearn.decomposition import NMF

    d = emb.shape[1]
    split = np.concatenate([np.maximum(emb, 0), np.maximum(-emb, 0)], 1).astype(np.float32)
    model = NMF(n_atoms, init="nndsvda", solver="mu", max_iter=max_iter, random_state=seed)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # ConvergenceWarning at max_iter: reported as the error
        loadings = model.fit_transform(split)
    parts = model.components_
    return loadings.astype(np.float64), (parts[:, :d] - parts[:, d:]).T.astype(np.float64)


def sparse_codes(x: np.ndarray, atoms: np.ndarray, n_nonzero: int) -> np.ndarray:
    """Codes (n, k) with ``n_nonzero`` non-zeros per row: the atoms most correlated with the row,
    weighted by least squares on that support (one-step orthogonal matching pursuit)."""
    xt, at = torch.from_numpy(x).float(), torch.from_numpy(atoms).float()
    support = (xt @ at).abs().topk(n_nonzero, dim=1).indices  # (n, s)
    chosen = at.T[support]  # (n, s, d)
    gram = chosen @ chosen.transpose(1, 2) + 1e-6 * torch.eye(n_nonzero)
    weights = torch.linalg.solve(gram, chosen @ xt[:, :, None])[..., 0]
    codes = torch.zeros(len(x), atoms.shape[1])
    codes.scatter_(1, support, weights)
    return codes.double().numpy()


def mod_dictionary(
    x: np.ndarray, n_atoms: int, n_nonzero: int, n_iter: int, seed: int
) -> tuple[np.ndarray, np.ndarray]:
    """Method of optimal directions: unit-norm atoms (d, k) and sparse codes (n, k) with
    x ~= codes @ atoms.T, codes by ``sparse_codes`` (``n_nonzero`` per row)."""
    rng = np.random.default_rng(seed)
    atoms = x[rng.choice(len(x), n_atoms, replace=len(x) < n_atoms)].T.copy()
    atoms += 0.1 * rng.standard_normal(atoms.shape) * np.abs(atoms).mean()
    atoms /= np.linalg.norm(atoms, axis=0, keepdims=True).clip(1e-12)
    for _ in range(n_iter):
        codes = sparse_codes(x, atoms, n_nonzero)
        solved = torch.linalg.lstsq(torch.from_numpy(codes), torch.from_numpy(x)).solution
        update = solved.numpy().T.copy()
        norms = np.linalg.norm(update, axis=0)
        dead = norms < 1e-8  # unused atoms: re-seed from random rows
        update[:, dead] = x[rng.choice(len(x), int(dead.sum()))].T
        atoms = update / np.linalg.norm(update, axis=0, keepdims=True).clip(1e-12)
    return atoms, sparse_codes(x, atoms, n_nonzero)


def _relative_error(x: np.ndarray, approx: np.ndarray) -> float:
    return float(np.linalg.norm(x - approx) / max(np.linalg.norm(x), 1e-12))


def build_basis(
    cfg: BasisConfig,
    embedding: torch.Tensor,
    token_counts: np.ndarray | None = None,
    seed: int = 0,
) -> Basis:
    """The basis named by ``cfg`` for the model whose token embedding matrix is ``embedding``.

    ``token_counts`` (V,): how often each token occurs in the training split (``frequency``).
    """
    emb = embedding.detach().double().cpu().numpy()
    v, d = emb.shape
    check_basis_config(cfg, d)
    info: dict[str, Any] = {}
    kind = cfg.kind
    if kind is BasisKind.natural:
        importance = emb.var(0)
        order = np.argsort(-importance, kind="stable")
        directions, importance = np.eye(d)[:, order], importance[order]
    elif kind is BasisKind.pca:
        centred = emb - emb.mean(0)
        importance, directions = _eig_desc(centred.T @ centred / v)
    elif kind is BasisKind.frequency:
        if token_counts is None or np.sum(token_counts) <= 0:
            raise UserError("basis=frequency needs token counts from the training split")
        p = np.asarray(token_counts, np.float64)[:v]
        p = p / p.sum()
        mean = p @ emb
        centred = emb - mean
        importance, directions = _eig_desc((centred * p[:, None]).T @ centred)
        info["n_weighted_types"] = int((p > 0).sum())
    elif kind is BasisKind.random:
        directions = random_orthogonal(d, seed)
        importance = _variance_along(emb, directions)
    elif kind is BasisKind.nmf:
        rows = _sample_rows(emb, cfg.fit_rows, seed)
        loadings, atoms = nmf_factors(rows, n_components(cfg, d), cfg.max_iter, seed)
        importance = (loadings**2).sum(0) * (atoms**2).sum(0)
        order = np.argsort(-importance, kind="stable")
        directions, importance = atoms[:, order], importance[order]
        info["reconstruction_error"] = _relative_error(rows, loadings @ atoms.T)
    else:
        rows = _sample_rows(emb, cfg.fit_rows, seed)
        centred = rows - emb.mean(0)
        scale = float(np.linalg.norm(centred, axis=1).mean()) or 1.0
        atoms, codes = mod_dictionary(
            centred / scale, n_components(cfg, d), cfg.n_nonzero, cfg.max_iter, seed
        )
        importance = (codes**2).sum(0)
        order = np.argsort(-importance, kind="stable")
        directions, importance = atoms[:, order], importance[order]
        info["reconstruction_error"] = _relative_error(centred / scale, codes @ atoms.T)
        gram = np.abs(directions.T @ directions - np.eye(directions.shape[1]))
        info["max_atom_overlap"] = float(gram.max())
        info["mean_atom_overlap"] = float(gram.sum() / (gram.size - len(gram)))

    if cfg.top_k is not None:
        keep = np.arange(cfg.top_k)
    elif cfg.bottom_k is not None:
        keep = np.arange(directions.shape[1] - cfg.bottom_k, directions.shape[1])
    else:
        keep = np.arange(directions.shape[1])
    directions, importance = directions[:, keep], importance[keep]
    orthonormal = kind in ORTHONORMAL
    encoder = directions if orthonormal else np.linalg.pinv(directions.T)
    name = kind.value
    if cfg.top_k is not None:
        name += f"_top{cfg.top_k}"
    elif cfg.bottom_k is not None:
        name += f"_bottom{cfg.bottom_k}"
    info["size"] = int(directions.shape[1])
    return Basis(
        name=name,
        directions=torch.from_numpy(directions).float(),
        encoder=torch.from_numpy(np.ascontiguousarray(encoder)).float(),
        importance=torch.from_numpy(np.ascontiguousarray(importance)).float(),
        orthonormal=orthonormal,
        info=info,
        null_kind="coordinate" if kind in AXIS_ALIGNED else "haar",
    )
