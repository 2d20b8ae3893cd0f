"""Layer-to-layer differences of top-1 are paired: the same tokens, the same resamples."""

from __future__ import annotations

import numpy as np
import pytest

from probe_sweep.baselines.depth import layer_differences
from probe_sweep.fitting.identity import Fitted
from probe_sweep.intervals import SequenceBootstrap
from probe_sweep.results import ProbeScores


def test_differences_are_paired_and_the_first_layer_has_none() -> None:
    rng = np.random.default_rng(0)
    sequences = np.repeat(np.arange(50), 20)  # 1,000 tokens in 50 sequences
    first = rng.random(1000) < 0.9
    second = first & (rng.random(1000) < 0.95)  # forgets about 5% of what the first knew
    correct = {0: first, 1: second, 2: second.copy()}
    scores = [
        ProbeScores(layer, f"layer_{layer}", float(c.mean()), 1.0, 0.1, 0.1, 0.5, 0)
        for layer, c in correct.items()
    ]
    found = layer_differences(Fitted({}, {}, scores, correct), SequenceBootstrap(sequences, 200, 0))
    assert set(found) == {1, 2}
    one, two = found[1], found[2]
    assert one.previous_layer == 0 and two.previous_layer == 1
    assert one.top1_minus_previous_layer == pytest.approx(second.mean() - first.mean())
    low, high = one.top1_minus_previous_layer_ci
    # Paired: the interval is of the difference (a few % wide), and it excludes 0.
    assert low <= one.top1_minus_previous_layer <= high < 0
    assert two.top1_minus_previous_layer == 0 and two.top1_minus_previous_layer_ci == [0.0, 0.0]
    # Minus the first layer: layer 2 has lost what layer 1 lost, with the same interval.
    assert one.first_layer == two.first_layer == 0
    assert two.top1_minus_first_layer == pytest.approx(one.top1_minus_previous_layer)
    assert two.top1_minus_first_layer_ci == pytest.approx(one.top1_minus_previous_layer_ci)
