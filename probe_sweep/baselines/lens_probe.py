"""The identity probe fed the model's own guess instead of the hidden state: the logit lens's
log-probabilities of the classes at each layer (is the input token in what the model predicts?),
against the identity probe on the hidden state, with a paired interval."""

from __future__ import annotations

import torch

from probe_sweep.config import Config
from probe_sweep.extraction.data import TEST, TRAIN
from probe_sweep.extraction.hidden_states import Activations
from probe_sweep.fitting.identity import Fitted, Scorer, log_fit
from probe_sweep.fitting.saved_fits import FitCheckpoint
from probe_sweep.intervals import interval
from probe_sweep.logit_lens import lens_logits
from probe_sweep.probes.kinds import ProbeKind, ProbeTask
from probe_sweep.probes.linear import token_scores
from probe_sweep.probes.rows import Rows
from probe_sweep.results import LensProbeScores


def lens_probe_scores(
    config: Config,
    kind: ProbeKind,
    acts: Activations,
    scorer: Scorer,
    fitted: Fitted,
    class_embeddings: torch.Tensor,
    checkpoint: FitCheckpoint,
) -> dict[int, LensProbeScores]:
    """The lens probe's held-out top-1 at each layer, and the identity probe's minus it."""
    assert acts.unembedding is not None
    inputs, split = scorer.inputs, scorer.inputs.split
    columns = torch.from_numpy(split.classes).to(inputs.device)
    out = {}
    for identity in fitted.scores:
        layer = identity.layer

        def guess(part: int, layer: int = layer) -> Rows:
            """Log-probabilities of the classes under the logit lens, computed chunk by chunk."""

            def read_out(hidden: torch.Tensor) -> torch.Tensor:
                lens = lens_logits(
                    hidden, acts.unembedding, acts.final_norm, layer != acts.final_layer
                )
                return lens.log_softmax(-1)[:, columns]

            return inputs.natural(part, layer).map(read_out, len(columns))

        name = f"lens_layer_{layer}"
        fit = checkpoint.get_or_fit(
            name,
            lambda unfinished, guess=guess, layer=layer: kind.fit(
                ProbeTask(guess(TRAIN), class_embeddings), config.reg, config.probe,
                unfinished.warm_start(None), f"layer {layer} logit-lens probe", unfinished.keep,
            ),
            shape=(len(columns), len(columns)),
        )  # fmt: skip
        log_fit(name, fit.convergence)
        correct = token_scores(fit.probe, guess(TEST))["correct1"]
        draws = scorer.bootstrap.draws(fitted.correct[layer]) - scorer.bootstrap.draws(correct)
        top1 = float(correct.mean())
        out[layer] = LensProbeScores(
            lens_probe_top1=top1,
            hidden_minus_lens_probe_top1=identity.top1 - top1,
            hidden_minus_lens_probe_top1_ci=interval(draws),
        )
    return out
