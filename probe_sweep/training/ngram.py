"""The baselines a trained decoder's perplexity is read against: a unigram and a bigram model
fitted on the same training tokens and scored on the same held-out tokens.

Unigram: add-alpha, alpha chosen on the validation tokens. Bigram: Witten-Bell interpolation
with that unigram, p(w | v) = (c(v, w) + T(v) p(w)) / (c(v) + T(v)), T(v) the number of distinct
words seen after v: a standard smoothed bigram with nothing left to tune.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

ALPHAS = (0.001, 0.01, 0.03, 0.1, 0.3, 1.0)


@dataclass(frozen=True)
class Pairs:
    """Token pairs: ``nxt[i]`` follows ``prev[i]``."""

    prev: np.ndarray
    nxt: np.ndarray


@dataclass(frozen=True)
class NgramModels:
    """Counts from the training pairs, and the unigram smoothing chosen on validation."""

    vocab_size: int
    unigram_counts: np.ndarray
    alpha: float
    bigram_keys: np.ndarray  # prev * vocab_size + next, sorted and unique
    bigram_counts: np.ndarray
    context_counts: np.ndarray  # c(v): training pairs with prev v
    followers: np.ndarray  # T(v): distinct next words after v

    def unigram_nll(self, pairs: Pairs) -> np.ndarray:
        """-log p(next) of each pair, in nats."""
        return -np.log(self._unigram(self.alpha)[pairs.nxt])

    def bigram_nll(self, pairs: Pairs) -> np.ndarray:
        """-log p(next | prev) of each pair, in nats."""
        keys = pairs.prev.astype(np.int64) * self.vocab_size + pairs.nxt
        at = np.minimum(np.searchsorted(self.bigram_keys, keys), len(self.bigram_keys) - 1)
        count = np.where(self.bigram_keys[at] == keys, self.bigram_counts[at], 0.0)
        context, seen = self.context_counts[pairs.prev], self.followers[pairs.prev]
        uni = self._unigram(self.alpha)[pairs.nxt]
        # An unseen context (c = T = 0) falls back to the unigram.
        prob = np.where(context > 0, (count + seen * uni) / np.maximum(context + seen, 1), uni)
        return -np.log(prob)

    def _unigram(self, alpha: float) -> np.ndarray:
        counts = self.unigram_counts + alpha
        return counts / counts.sum()


def fit_ngrams(train: Pairs, val: Pairs, vocab_size: int) -> NgramModels:
    """Unigram and bigram counts from ``train``; the unigram's alpha minimises validation NLL."""
    unigram = np.bincount(train.nxt, minlength=vocab_size).astype(np.float64)
    keys, counts = np.unique(
        train.prev.astype(np.int64) * vocab_size + train.nxt, return_counts=True
    )
    context = np.bincount(train.prev, minlength=vocab_size).astype(np.float64)
    followers = np.bincount(keys // vocab_size, minlength=vocab_size).astype(np.float64)

    def val_nll(alpha: float) -> float:
        probs = (unigram + alpha) / (unigram + alpha).sum()
        return float(-np.log(probs[val.nxt]).mean())

    alpha = min(ALPHAS, key=val_nll)
    return NgramModels(
        vocab_size=vocab_size,
        unigram_counts=unigram,
        alpha=alpha,
        bigram_keys=keys,
        bigram_counts=counts.astype(np.float64),
        context_counts=context,
        followers=followers,
    )
