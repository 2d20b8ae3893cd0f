"""The baseline that could have failed: the same probes on the same tokens of the same
architecture with random weights (its hidden states and probes come from the same stage
functions as the trained model's, called by the pipeline; init seed = seed + 1, so it differs
from a model that is itself random)."""

from __future__ import annotations

from probe_sweep.fitting.identity import Fitted
from probe_sweep.intervals import SequenceBootstrap, interval
from probe_sweep.results import RandomInitScores


def random_init_scores(
    ours: Fitted, theirs: Fitted, bootstrap: SequenceBootstrap
) -> dict[int, RandomInitScores]:
    """The random-init model's top-1 at each layer, and ours minus it with a paired interval
    (both scored on the same held-out tokens and resamples)."""
    out = {}
    for mine, other in zip(ours.scores, theirs.scores, strict=True):
        layer = mine.layer
        draws = bootstrap.draws(ours.correct[layer]) - bootstrap.draws(theirs.correct[layer])
        out[layer] = RandomInitScores(
            random_init_top1=other.top1,
            top1_minus_random_init=mine.top1 - other.top1,
            random_init_top1_ci=other.top1_ci,
            top1_minus_random_init_ci=interval(draws),
        )
    return out
