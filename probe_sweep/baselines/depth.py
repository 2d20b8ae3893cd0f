"""Does the input token fade with depth? Each layer's identity-probe top-1 minus the layer
before it, with a paired interval: both are scored on the same held-out tokens and the same
resamples of their sequences, so the interval is of the difference itself, not of two
overlapping accuracies."""

from __future__ import annotations

from itertools import pairwise

from probe_sweep.fitting.identity import Fitted
from probe_sweep.intervals import SequenceBootstrap, interval
from probe_sweep.results import DepthScores


def layer_differences(fitted: Fitted, bootstrap: SequenceBootstrap) -> dict[int, DepthScores]:
    """Top-1 at each probed layer minus the previous probed layer's (none for the first)."""
    out = {}
    for before, after in pairwise(fitted.scores):
        draws = bootstrap.draws(fitted.correct[after.layer])
        draws -= bootstrap.draws(fitted.correct[before.layer])
        out[after.layer] = DepthScores(
            top1_minus_previous_layer=after.top1 - before.top1,
            previous_layer=before.layer,
            top1_minus_previous_layer_ci=interval(draws),
        )
    return out
