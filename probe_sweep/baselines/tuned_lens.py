"""The tuned lens's translator and how a lens is scored on held-out positions (``lenses.py``
puts the lenses side by side).

- Logit lens (nostalgebraist 2020): the final norm and the unembedding applied to h_l.
- Tuned lens (Belrose et al. 2023, "Eliciting Latent Predictions from Transformers with the
  Tuned Lens"): an affine translator h -> h + A h + b per layer, read out through the final
  norm and unembedding, trained so that its distribution matches the final layer's:
  mean KL(final || lens) + ``l2 * ||A||^2``. Ours starts from the logit lens (A = 0, b = 0) and
  is fitted full-batch to a tolerance with the project's L-BFGS (``lbfgs.minimise``), which
  reports how close it came; the paper trains with SGD over a large corpus. The objective is
  not convex (the norm sits between translator and unembedding), so "converged" means a
  stationary point near the logit lens, not the global optimum.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from probe_sweep.intervals import SequenceBootstrap
from probe_sweep.logit_lens import lens_logits
from probe_sweep.probes.lbfgs import Params


def kl_divergence(target: torch.Tensor, mine: torch.Tensor) -> torch.Tensor:
    """KL(target || mine) of each row, from log-probabilities."""
    return (target.exp() * (target - mine)).sum(-1)


@dataclass
class TranslatorObjective:
    """Mean KL(final || tuned lens) over rows, plus ``l2 * ||A||^2``; ``hidden`` (n, d) are the
    layer's states, ``final`` (n, d) the final layer's (already normed, as HF returns it)."""

    hidden: torch.Tensor
    final: torch.Tensor
    unembedding: torch.Tensor
    final_norm: torch.nn.Module | None
    l2: float
    chunk: int = 1024

    def zero(self) -> Params:
        d = self.hidden.shape[1]
        return self.hidden.new_zeros(d, d), self.hidden.new_zeros(d)

    def logits(self, params: Params, hidden: torch.Tensor) -> torch.Tensor:
        """The tuned lens's logits: the translated state through final norm and unembedding."""
        weight, bias = params
        translated = hidden + hidden @ weight.T + bias
        return lens_logits(translated, self.unembedding, self.final_norm, True)

    def __call__(self, params: Params, grad: bool = True) -> tuple[float, Params | None]:
        weight = params[0].detach().requires_grad_(grad)
        bias = params[1].detach().requires_grad_(grad)
        total = 0.0
        with torch.enable_grad() if grad else torch.no_grad():
            for start in range(0, len(self.hidden), self.chunk):
                rows = slice(start, start + self.chunk)
                target = lens_logits(self.final[rows], self.unembedding, None, False)
                target = target.log_softmax(-1)
                mine = self.logits((weight, bias), self.hidden[rows]).log_softmax(-1)
                kl = kl_divergence(target, mine).sum()
                if grad:
                    kl.backward()
                total += kl.item()
        n = max(len(self.hidden), 1)
        value = total / n + self.l2 * weight.detach().pow(2).sum().item()
        if not grad:
            return value, None
        assert weight.grad is not None and bias.grad is not None
        g_weight = weight.grad / n + 2 * self.l2 * weight.detach()
        return value, (g_weight, bias.grad / n)


@dataclass
class LensTargets:
    """Held-out positions a lens is scored on: their current and next token (-1: none), which
    have a next token, the bootstrap over their sequences, and the final layer's
    log-probabilities."""

    current: torch.Tensor
    following: torch.Tensor
    has_next: np.ndarray
    bootstrap: SequenceBootstrap
    final_log_probs: torch.Tensor

    @classmethod
    def of(
        cls,
        rows: np.ndarray,
        tokens: np.ndarray,
        following: np.ndarray,
        has_next: np.ndarray,
        bootstrap: SequenceBootstrap,
        final_logits: torch.Tensor,
    ) -> LensTargets:
        device = final_logits.device
        after = np.where(has_next[rows], following[rows], -1)
        return cls(
            torch.from_numpy(tokens[rows]).to(device),
            torch.from_numpy(after).to(device),
            has_next[rows],
            bootstrap,
            final_logits.log_softmax(-1),
        )

    @torch.no_grad()
    def scores(self, name: str, logits: torch.Tensor) -> dict[str, Any]:
        """``<name>_top1`` (current token), ``<name>_next_top1`` (over positions with a next
        token), each with its interval, and ``<name>_kl``: mean KL(final || lens)."""
        top = logits.argmax(-1)
        out: dict[str, Any] = {}
        for which, hits, mask in (
            ("", (top == self.current).cpu().numpy(), None),
            ("_next", (top == self.following).cpu().numpy(), self.has_next),
        ):
            chosen = hits if mask is None else hits[mask]
            out[f"{name}{which}_top1"] = float(chosen.mean()) if len(chosen) else None
            out[f"{name}{which}_top1_ci"] = self.bootstrap.interval(hits, mask)
        out[f"{name}_kl"] = self.kl(logits).mean().item()
        return out

    @torch.no_grad()
    def kl(self, logits: torch.Tensor) -> torch.Tensor:
        """KL(final layer || lens) of each held-out position."""
        return kl_divergence(
            self.final_log_probs, logits.to(self.final_log_probs.device).log_softmax(-1)
        )
