"""Stage 4: the coordinates a probe sees, derived from the embedding matrix W_E.

A basis is a (d, k) matrix whose columns are directions in the residual stream; a hidden
state h gets coordinates ``h @ directions``. The probe is trained on those coordinates, so its
regularisation acts, and its weights are read, in that basis.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum

import torch


class BasisKind(Enum):
    natural = "natural"


@dataclass
class BasisConfig:
    """``natural``: the coordinate basis, in which LayerNorm acts."""

    kind: BasisKind = BasisKind.natural


@dataclass
class Basis:
    name: str
    directions: torch.Tensor

    def coordinates(self, hidden: torch.Tensor) -> torch.Tensor:
        return hidden @ self.directions.to(hidden.device, hidden.dtype)


def build_basis(cfg: BasisConfig, embedding: torch.Tensor) -> Basis:
    """The basis named by ``cfg`` for the model whose token embedding matrix is ``embedding``."""
    d = embedding.shape[1]
    return Basis(name=cfg.kind.value, directions=torch.eye(d))
