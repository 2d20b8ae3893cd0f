"""The model's own read-out (logit lens: final norm, then the unembedding, at every layer): the
rank and probability of the *input* token, and whether the embeddings of tokens the final layer
rules out are present in the hidden state mid-network."""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from probe_sweep.statistics.nulls import null_entry


@torch.no_grad()
def input_token_readout(
    logits: torch.Tensor, targets: torch.Tensor
) -> tuple[dict[str, float], np.ndarray]:
    """Rank (1 = top) and probability of the input token under logit-lens logits (N, V), and
    per position whether the lens ranks it first (paired differences need them)."""
    target_logit = logits.gather(1, targets[:, None])
    rank = (logits > target_logit).sum(1).double() + 1
    prob = torch.softmax(logits.double(), 1).gather(1, targets[:, None])[:, 0]
    correct = (rank == 1).cpu().numpy()
    summary = {
        "lens_input_top1": float(correct.mean()),
        "lens_input_median_rank": rank.median().item(),
        "lens_input_mean_log_rank": rank.log().mean().item(),
        "lens_input_prob": prob.mean().item(),
    }
    return summary, correct


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
    per_token = cos.mean(0)  # mean over positions of each token's cosine
    draws = torch.randint(0, cos.shape[1], (n_draws, k), generator=gen)
    null = per_token.cpu()[draws].mean(1)
    values = {"proj_unlikely": unlikely, "proj_likely": likely, "proj_random": null.mean().item()}
    entries = [
        null_entry("unlikely_token_projection", layer, unlikely, null, "two-sided"),
        null_entry("likely_token_projection", layer, likely, null, "two-sided"),
    ]
    return values, entries
