"""What the statistics read of a job's probes: the fits with the encoder, class embeddings and
input covariances they are read against, and the held-out hidden states of the logit lens."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch


@dataclass(frozen=True)
class ProbeSet:
    """The fitted probes of one model. ``fits``: probe name -> FitResult; ``encoder`` (d, k):
    coordinates = h @ encoder; ``class_embeddings`` (C, d): this model's W_E rows of the
    classes; ``covariances``: probe name -> covariance (k, k) of its training inputs."""

    fits: dict[str, Any]
    encoder: torch.Tensor
    class_embeddings: torch.Tensor
    covariances: dict[str, torch.Tensor]


@dataclass(frozen=True)
class LensInputs:
    """Held-out hidden states (natural coordinates, per layer) and their input tokens for the
    logit-lens read-outs: the first ``len(targets)`` test positions, in the order the identity
    probes were scored, and their sequences (for paired intervals); ``final_layer``: the layer
    whose HF hidden state already has the final norm applied (None if it was not extracted)."""

    hidden: dict[int, torch.Tensor]
    targets: torch.Tensor
    sequences: np.ndarray
    unembedding: torch.Tensor
    final_norm: torch.nn.Module | None
    final_layer: int | None
