"""The logit lens (nostalgebraist 2020): the model's own read-out of a hidden state, its final
norm and unembedding applied at any layer. The lens statistics, the lens probe and the tuned
lens all read through it."""

from __future__ import annotations

import torch


def lens_logits(
    hidden: torch.Tensor,
    unembedding: torch.Tensor,
    final_norm: torch.nn.Module | None,
    apply_norm: bool,
) -> torch.Tensor:
    """Logit lens: ``final_norm(h) @ U^T`` (the norm is skipped where HF already applied it).
    Differentiable in ``hidden`` (the tuned lens trains through it); the model's own weights
    never require a gradient. Computed in float32, or in float64 for float64 states."""
    h = hidden if hidden.dtype == torch.float64 else hidden.float()
    if apply_norm and final_norm is not None:
        h = final_norm.to(h.device, h.dtype)(h)
    return h @ unembedding.to(h.device, h.dtype).T
