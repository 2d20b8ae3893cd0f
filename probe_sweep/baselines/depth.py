"""Does the input token fade with depth? Each layer's identity-probe top-1 minus the layer
before it and minus the first probed layer, with paired intervals: all are scored on the same
held-out tokens and the same resamples of their sequences, so an interval is of the difference
itself, not of two overlapping accuracies."""

from __future__ import annotations

from itertools import pairwise

from probe_sweep.fitting.identity import Fitted
from probe_sweep.intervals import SequenceBootstrap, interval
from probe_sweep.results import DepthScores


def layer_differences(fitted: Fitted, bootstrap: SequenceBootstrap) -> dict[int, DepthScores]:
    """Top-1 at each probed layer minus the previous and the first probed layer's (none for the
    first)."""
    draws = {s.layer: bootstrap.draws(fitted.correct[s.layer]) for s in fitted.scores}
    out = {}
    for before, after in pairwise(fitted.scores):
        first = fitted.scores[0]
        out[after.layer] = DepthScores(
            top1_minus_previous_layer=after.top1 - before.top1,
            previous_layer=before.layer,
            top1_minus_previous_layer_ci=interval(draws[after.layer] - draws[before.layer]),
            top1_minus_first_layer=after.top1 - first.top1,
            first_layer=first.layer,
            top1_minus_first_layer_ci=interval(draws[after.layer] - draws[first.layer]),
        )
    return out
