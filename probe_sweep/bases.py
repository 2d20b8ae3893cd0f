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
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from probe_sweep.errors import UserError

Coordinates = tuple[np.ndarray, np.ndarray]  # directions (d, k), importance (k,)


@dataclass(frozen=True)
class Construction:
    """One kind of basis: ``build(emb, cfg, token_counts, seed, info)`` returns its directions
    and their importance (any order; ``build_basis`` sorts by importance unless ``ordered``) and
    may add to ``info``. ``orthonormal``: the encoder is the directions themselves.
    ``axis_aligned``: its axes are privileged (a rotation of them is another basis), so
    statistics on a subset of its columns are compared with random subsets of columns, not random
    subspaces. ``atoms(d)``: its size for width d when ``basis.n_components`` is unset (None:
    always d). ``overcomplete``: it needs more than d atoms."""

    build: Callable[[np.ndarray, BasisConfig, np.ndarray | None, int, dict[str, Any]], Coordinates]
    orthonormal: bool
    axis_aligned: bool
    atoms: Callable[[int], int] | None = None
    overcomplete: bool = False
    ordered: bool = False  # keep the built order (the random basis: draw order)


CONSTRUCTIONS: dict[str, Construction] = {}


def construction(name: str, **kind: Any) -> Callable[[Callable[..., Coordinates]], Any]:
    """Register a basis construction under ``name`` (``basis=<name>``; add conf/basis/<name>.yaml
    so the config group lists it)."""

    def register(build: Callable[..., Coordinates]) -> Callable[..., Coordinates]:
        CONSTRUCTIONS[name] = Construction(build, **kind)
        return build

    return register


@dataclass
class BasisConfig:
    """``kind``: see the module docstring. ``top_k`` / ``bottom_k`` (at most one): keep only the
    k most / least important columns. ``n_components``: atoms for nmf (default d) and the
    dictionary (default 2d). ``n_nonzero``: OMP atoms per row for the dictionary. ``fit_rows``:
    W_E rows (seeded sample) nmf / dictionary are fitted on; ``max_iter`` their iterations."""

    kind: str = "natural"
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

    def coordinates(self, hidden: torch.Tensor) -> torch.Tensor:
        assert self.encoder is not None
        return hidden @ self.encoder.to(hidden.device, hidden.dtype)


def check_basis_config(cfg: BasisConfig, d_model: int) -> None:
    """Value checks a type cannot express; cheap, so the entry point runs it before loading."""
    if cfg.kind not in CONSTRUCTIONS:
        choices = ", ".join(sorted(CONSTRUCTIONS))
        raise UserError(f"basis.kind={cfg.kind} is not a basis; choose one of: {choices}")
    if cfg.top_k is not None and cfg.bottom_k is not None:
        raise UserError("set at most one of basis.top_k and basis.bottom_k")
    n_atoms = n_components(cfg, d_model)
    if CONSTRUCTIONS[cfg.kind].overcomplete and n_atoms <= d_model:
        raise UserError(f"basis={cfg.kind} needs n_components > d={d_model} (over-complete)")
    for name in ("top_k", "bottom_k"):
        k = getattr(cfg, name)
        if k is not None and not 1 <= k <= n_atoms:
            raise UserError(f"basis.{name}={k} must lie in 1..{n_atoms} (the basis size)")
    if cfg.n_nonzero < 1 or cfg.fit_rows < 2 or cfg.max_iter < 1:
        raise UserError("basis.n_nonzero, basis.fit_rows and basis.max_iter must be positive")


def n_components(cfg: BasisConfig, d_model: int) -> int:
    """The basis's size before truncation: d, or its atoms (``basis.n_components`` or default)."""
    atoms = CONSTRUCTIONS[cfg.kind].atoms
    return d_model if atoms is None else cfg.n_components or atoms(d_model)


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


@construction("natural", orthonormal=True, axis_aligned=True)
def natural_axes(
    emb: np.ndarray, cfg: BasisConfig, counts: Any, seed: int, info: dict
) -> Coordinates:
    """The coordinate axes, by the variance of W_E along each."""
    return np.eye(emb.shape[1]), emb.var(0)


@construction("pca", orthonormal=True, axis_aligned=False)
def principal_axes(
    emb: np.ndarray, cfg: BasisConfig, counts: Any, seed: int, info: dict
) -> Coordinates:
    """Eigenvectors of the covariance of W_E's rows, by explained variance."""
    centred = emb - emb.mean(0)
    importance, directions = _eig_desc(centred.T @ centred / len(emb))
    return directions, importance


@construction("frequency", orthonormal=True, axis_aligned=False)
def frequency_axes(
    emb: np.ndarray, cfg: BasisConfig, counts: np.ndarray | None, seed: int, info: dict
) -> Coordinates:
    """Eigenvectors of the token-frequency-weighted covariance of W_E's rows."""
    if counts is None or np.sum(counts) <= 0:
        raise UserError("basis=frequency needs token counts from the training split")
    p = np.asarray(counts, np.float64)[: len(emb)]
    p = p / p.sum()
    centred = emb - p @ emb
    importance, directions = _eig_desc((centred * p[:, None]).T @ centred)
    info["n_weighted_types"] = int((p > 0).sum())
    return directions, importance


@construction("random", orthonormal=True, axis_aligned=False, ordered=True)
def random_axes(
    emb: np.ndarray, cfg: BasisConfig, counts: Any, seed: int, info: dict
) -> Coordinates:
    """A seeded Haar-random orthogonal basis in draw order (its top-k: a random subspace)."""
    directions = random_orthogonal(emb.shape[1], seed)
    return directions, _variance_along(emb, directions)


@construction("nmf", orthonormal=False, axis_aligned=True, atoms=lambda d: d)
def nmf_atoms(emb: np.ndarray, cfg: BasisConfig, counts: Any, seed: int, info: dict) -> Coordinates:
    """Signed NMF atoms of W_E, by the energy of their rank-1 terms."""
    rows = _sample_rows(emb, cfg.fit_rows, seed)
    loadings, atoms = nmf_factors(rows, n_components(cfg, emb.shape[1]), cfg.max_iter, seed)
    info["reconstruction_error"] = _relative_error(rows, loadings @ atoms.T)
    return atoms, (loadings**2).sum(0) * (atoms**2).sum(0)


@construction(
    "dictionary", orthonormal=False, axis_aligned=True, atoms=lambda d: 2 * d, overcomplete=True
)
def dictionary_atoms(
    emb: np.ndarray, cfg: BasisConfig, counts: Any, seed: int, info: dict
) -> Coordinates:
    """An over-complete sparse dictionary (MOD) of W_E's centred, scaled rows, by code energy."""
    rows = _sample_rows(emb, cfg.fit_rows, seed)
    centred = rows - emb.mean(0)
    scale = float(np.linalg.norm(centred, axis=1).mean()) or 1.0
    n_atoms = n_components(cfg, emb.shape[1])
    atoms, codes = mod_dictionary(centred / scale, n_atoms, cfg.n_nonzero, cfg.max_iter, seed)
    info["reconstruction_error"] = _relative_error(centred / scale, codes @ atoms.T)
    gram = np.abs(atoms.T @ atoms - np.eye(atoms.shape[1]))
    info["max_atom_overlap"] = float(gram.max())
    info["mean_atom_overlap"] = float(gram.sum() / (gram.size - len(gram)))
    return atoms, (codes**2).sum(0)


ORTHONORMAL = {name for name, c in CONSTRUCTIONS.items() if c.orthonormal}


def build_basis(
    cfg: BasisConfig,
    embedding: torch.Tensor,
    token_counts: np.ndarray | None = None,
    seed: int = 0,
) -> Basis:
    """The basis named by ``cfg`` for the model whose token embedding matrix is ``embedding``,
    its columns by importance, truncated to ``top_k`` / ``bottom_k``.

    ``token_counts`` (V,): how often each token occurs in the training split (``frequency``).
    """
    emb = embedding.detach().double().cpu().numpy()
    check_basis_config(cfg, emb.shape[1])
    kind, info = CONSTRUCTIONS[cfg.kind], {}
    directions, importance = kind.build(emb, cfg, token_counts, seed, info)
    if not kind.ordered:
        order = np.argsort(-importance, kind="stable")
        directions, importance = directions[:, order], importance[order]
    keep, name = slice(None), cfg.kind
    if cfg.top_k is not None:
        keep, name = slice(0, cfg.top_k), f"{name}_top{cfg.top_k}"
    elif cfg.bottom_k is not None:
        keep, name = slice(directions.shape[1] - cfg.bottom_k, None), f"{name}_bottom{cfg.bottom_k}"
    directions, importance = directions[:, keep], importance[keep]
    encoder = directions if kind.orthonormal else np.linalg.pinv(directions.T)
    info["size"] = int(directions.shape[1])
    return Basis(
        name=name,
        directions=torch.from_numpy(np.ascontiguousarray(directions)).float(),
        encoder=torch.from_numpy(np.ascontiguousarray(encoder)).float(),
        importance=torch.from_numpy(np.ascontiguousarray(importance)).float(),
        orthonormal=kind.orthonormal,
        info=info,
        null_kind="coordinate" if kind.axis_aligned else "haar",
    )
