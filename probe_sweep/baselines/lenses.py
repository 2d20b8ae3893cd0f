"""The lenses side by side at each layer, on held-out positions: the logit lens's and a tuned
lens's top-1 for the current and the next token (95% intervals over held-out sequences), their
KL to the final layer's distribution, and the tuned lens's KL minus the logit lens's with a
paired interval (Belrose et al. 2023 report it below zero at every layer of every model they
studied). Each tuned-lens translator is fitted on ``statistics.lens_train_rows`` training
positions (``tuned_lens.py``)."""

from __future__ import annotations

import logging

import torch

from probe_sweep.baselines.tuned_lens import LensTargets, TranslatorObjective
from probe_sweep.config import Config
from probe_sweep.extraction.data import TEST, TRAIN
from probe_sweep.extraction.hidden_states import Activations
from probe_sweep.extraction.labels import Split
from probe_sweep.fitting.identity import log_fit
from probe_sweep.fitting.inputs import read_rows
from probe_sweep.intervals import SequenceBootstrap
from probe_sweep.logit_lens import lens_logits
from probe_sweep.probes.lbfgs import minimise
from probe_sweep.probes.linear import RegKind
from probe_sweep.results import LensComparison

log = logging.getLogger("probe_sweep")
# The translator is not convex and has no certificate: L-BFGS to a stationary point, its largest
# gradient entry 1e-4 of its start (float32 resolves its KL objective to about that).
TRANSLATOR_TOL, TRANSLATOR_MAX_ITER = 1e-4, 500


def compare_lenses(
    config: Config, acts: Activations, split: Split, device: torch.device
) -> dict[int, LensComparison]:
    """The two lenses at every extracted layer (none without an unembedding and the final
    layer: the tuned lens is trained towards the final layer's distribution)."""
    final, unembedding, norm = acts.final_layer, acts.unembedding, acts.final_norm
    if unembedding is None or final is None:
        log.info("Lens comparison skipped: it needs an unembedding and the final layer extracted")
        return {}
    stats_cfg = config.statistics
    train = split.rows[TRAIN][: stats_cfg.lens_train_rows]
    test, sequences = split.rows[TEST][: stats_cfg.lens_rows], split.sequences[TEST]
    following, has_next = acts.corpus.shifted_targets(1)
    final_logits = lens_logits(read_rows(acts.store, final, test), unembedding, None, False)
    held_out = LensTargets.of(
        test, acts.corpus.targets.reshape(-1), following, has_next,
        SequenceBootstrap(sequences[: len(test)], stats_cfg.n_bootstrap, config.seed),
        final_logits.to(device),
    )  # fmt: skip
    l2 = config.reg.strength if config.reg.kind is RegKind.l2 else 0.0
    final_train = read_rows(acts.store, final, train).to(device)
    out = {}
    for layer in acts.layers:
        hidden = read_rows(acts.store, layer, test).to(device)
        logit_lens = lens_logits(hidden, unembedding, norm, layer != final)
        tuned_lens, conv = logit_lens, {"converged": True, "iterations": 0}
        if layer != final:
            objective = TranslatorObjective(
                read_rows(acts.store, layer, train).to(device), final_train, unembedding, norm, l2
            )
            name = f"tuned_lens_layer_{layer}"
            params, conv = minimise(objective, TRANSLATOR_TOL, TRANSLATOR_MAX_ITER, desc=name)
            tuned_lens = objective.logits(params, hidden).detach()
            log_fit(name, conv)
        kl_gain = (held_out.kl(tuned_lens) - held_out.kl(logit_lens)).cpu().numpy()
        out[layer] = LensComparison(
            **held_out.scores("logit_lens", logit_lens),
            **held_out.scores("tuned_lens", tuned_lens),
            tuned_minus_logit_lens_kl=float(kl_gain.mean()),
            tuned_minus_logit_lens_kl_ci=held_out.bootstrap.interval(kl_gain),
            tuned_lens_converged=bool(conv["converged"]),
            tuned_lens_iterations=int(conv["iterations"]),
        )
    return out
