"""Random subspaces of the same kind as a basis's: random subsets of its columns where its axes
are privileged (natural, NMF, dictionary), Haar-random subspaces where any rotation of it is as
good (PCA, frequency, random). The nulls of the weight-mass statistics and the random-k probes
of the k sweep draw from here."""

from __future__ import annotations

from collections.abc import Iterator

import torch

COORDINATE, HAAR = "coordinate", "haar"


def haar_frames(
    k: int, dim: int, n_draws: int, seed: int, batch: int = 50
) -> Iterator[torch.Tensor]:
    """Seeded orthonormal frames (batch, k, dim) spanning Haar-random ``dim``-subspaces of R^k."""
    gen = torch.Generator().manual_seed(seed)
    for start in range(0, n_draws, batch):
        size = min(batch, n_draws - start)
        q, _ = torch.linalg.qr(torch.randn(size, k, dim, generator=gen, dtype=torch.float64))
        yield q


def coordinate_subsets(k: int, dim: int, n_draws: int, seed: int) -> torch.Tensor:
    """Seeded random ``dim``-subsets of ``range(k)``, one per row."""
    gen = torch.Generator().manual_seed(seed)
    return torch.argsort(torch.rand(n_draws, k, generator=gen), dim=1)[:, :dim]
