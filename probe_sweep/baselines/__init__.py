"""What each identity probe is read against, fitted in the pipeline and handed to the
statistics as values: the control task (Hewitt & Liang 2019), the same architecture with random
weights, the logit lens as the probe's input, a tuned lens, and the online code length (Voita &
Titov 2020). Each adds its numbers, with paired intervals, to the probe's layer rows.
"""

from __future__ import annotations

import dataclasses
import logging
from typing import Any

import torch

from probe_sweep import statistics as pstats
from probe_sweep.baselines.k_sweep import accuracy_against_k
from probe_sweep.baselines.mdl import online_codelength
from probe_sweep.baselines.tuned_lens import LENS_ROW_FIELDS, LensTargets, TranslatorObjective
from probe_sweep.config import Config
from probe_sweep.extraction.data import TEST, TRAIN
from probe_sweep.extraction.hidden_states import Activations
from probe_sweep.fitting.identity import (
    Fitted,
    Scorer,
    fit_identity_probes,
    input_covariances,
    log_fit,
    prepare_inputs,
)
from probe_sweep.fitting.inputs import Inputs, Split, read_rows, shifted_targets
from probe_sweep.fitting.saved_fits import FitCheckpoint
from probe_sweep.intervals import SequenceBootstrap
from probe_sweep.probes.lbfgs import minimise
from probe_sweep.probes.linear import FitResult, RegKind, fit_softmax_probe, token_scores
from probe_sweep.probes.rows import Rows
from probe_sweep.statistics.nulls import interval

log = logging.getLogger("probe_sweep")
# The translator is not convex and has no certificate: L-BFGS to a stationary point, its largest
# gradient entry 1e-4 of its start (float32 resolves its KL objective to about that).
TRANSLATOR_TOL, TRANSLATOR_MAX_ITER = 1e-4, 500


def control_labels(config: Config, inputs: Inputs, vocab_size: int) -> dict[int, torch.Tensor]:
    """The control task's label of every row of every part (a fixed random label per type)."""
    mapping = pstats.control_task_labels(vocab_size, config.statistics.control_labels, config.seed)
    return {
        part: torch.from_numpy(mapping[inputs.split.targets[rows]]).to(inputs.device)
        for part, rows in inputs.split.rows.items()
    }


def description_lengths(
    config: Config, inputs: Inputs, fitted: Fitted, vocab_size: int
) -> list[dict[str, Any]]:
    """The online code length of the input token at each layer, and of the control task (Voita
    & Titov 2020); adds ``mdl_compression`` and ``control_mdl_compression`` to the rows."""
    control = control_labels(config, inputs, vocab_size)
    n_classes, n_control = len(inputs.split.classes), config.statistics.control_labels
    out = []
    for row in fitted.rows:
        layer, train = row["layer"], inputs(TRAIN, row["layer"])
        tasks = {
            "identity": (train, n_classes),
            "control": (train.with_labels(control[TRAIN]), n_control),
        }
        for task, (rows, classes) in tasks.items():
            code = online_codelength(
                rows, classes, config.reg, config.probe, seed=config.seed,
                desc=f"layer {layer} {task} MDL",
            )  # fmt: skip
            out.append({"layer": layer, "task": task, **code})
            prefix = "" if task == "identity" else "control_"
            row[f"{prefix}mdl_compression"] = code["compression"]
            row[f"{prefix}mdl_bits_per_token"] = code["bits_per_token"]
    return out


def control_probes(
    config: Config, scorer: Scorer, fitted: Fitted, vocab_size: int, checkpoint: FitCheckpoint
) -> dict[str, FitResult]:
    """The Hewitt & Liang control probe at each per-layer probe's layer: the same probe on a
    fixed random label per token type (a task only memorising types can solve). Adds
    ``control_top1`` and ``selectivity`` (identity minus control top-1, paired interval) to the
    rows; returns the control fits by the identity probe's name."""
    inputs, n_labels = scorer.inputs, config.statistics.control_labels
    labels = control_labels(config, inputs, vocab_size)
    fits, previous = {}, None  # warm start: the control probe of the layer before
    for row in fitted.rows:
        layer, name = row["layer"], f"control_layer_{row['layer']}"
        fit = previous = checkpoint.get_or_fit(
            name,
            lambda layer=layer, init=previous: fit_softmax_probe(
                inputs(TRAIN, layer).with_labels(labels[TRAIN]), n_labels, config.reg,
                config.probe, None if init is None else init.probe,
                desc=f"layer {layer} control probe",
            ),
            shape=(n_labels, inputs(TRAIN, layer).d),
        )  # fmt: skip
        log_fit(name, fit.convergence)
        control, correct = scorer(fit, layer, name, labels)
        draws = scorer.bootstrap.draws(fitted.correct[layer]) - scorer.bootstrap.draws(correct)
        row.update(control_top1=control["top1"], control_top1_ci=control["top1_ci"])
        row.update(selectivity=row["top1"] - control["top1"], selectivity_ci=interval(draws))
        if row["probe"] != "pooled":
            fits[row["probe"]] = fit
    return fits


def random_init_probes(
    config: Config, device: torch.device, fitted: Fitted, checkpoint: FitCheckpoint
) -> pstats.ProbeSet:
    """The same probes on the same tokens of the same architecture with random weights (init
    seed = seed + 1, so it differs from a model that is itself random): the baseline that
    could have failed. Adds ``random_init_top1`` (with its interval) and
    ``top1_minus_random_init`` (paired interval) to the rows."""
    baseline = dataclasses.replace(
        config, model=dataclasses.replace(config.model, random_init=True)
    )
    acts, scorer = prepare_inputs(baseline, device, config.seed + 1)
    inputs, split = scorer.inputs, scorer.inputs.split
    class_embeddings = acts.embedding[torch.from_numpy(split.classes)]
    theirs = fit_identity_probes(
        config, scorer, acts.layers, class_embeddings.to(device), checkpoint, prefix="random_init_"
    )
    for row, other in zip(fitted.rows, theirs.rows, strict=True):
        layer = row["layer"]
        draws = scorer.bootstrap.draws(fitted.correct[layer])
        draws -= scorer.bootstrap.draws(theirs.correct[layer])
        row.update(random_init_top1=other["top1"], random_init_top1_ci=other["top1_ci"])
        row.update(top1_minus_random_init=row["top1"] - other["top1"])
        row["top1_minus_random_init_ci"] = interval(draws)
    return pstats.ProbeSet(
        theirs.fits, inputs.basis.encoder, class_embeddings, input_covariances(inputs, theirs)
    )


def lens_inputs(acts: Activations, split: Split, n_rows: int) -> pstats.LensInputs | None:
    """Held-out hidden states and input tokens for the logit-lens read-outs (None without an
    unembedding). HF's last hidden state already has the final norm."""
    if acts.unembedding is None:
        return None
    rows = split.rows[TEST][:n_rows]
    return pstats.LensInputs(
        hidden={layer: read_rows(acts.store, layer, rows) for layer in acts.layers},
        targets=torch.from_numpy(split.targets[rows]),
        unembedding=acts.unembedding,
        final_norm=acts.final_norm,
        final_layer=acts.final_layer,
    )


def lens_probe_scores(
    config: Config,
    acts: Activations,
    scorer: Scorer,
    fitted: Fitted,
    checkpoint: FitCheckpoint,
) -> None:
    """The identity probe fed the model's own guess instead of the hidden state: the logit-lens
    log-probabilities of the classes (is identity in what the model predicts?)."""
    assert acts.unembedding is not None
    inputs, split = scorer.inputs, scorer.inputs.split
    columns = torch.from_numpy(split.classes).to(inputs.device)
    for row in fitted.rows:
        layer = row["layer"]

        def guess(part: int, layer: int = layer) -> Rows:
            """Log-probabilities of the classes under the logit lens, computed chunk by chunk."""

            def read_out(hidden: torch.Tensor) -> torch.Tensor:
                lens = pstats.lens_logits(
                    hidden, acts.unembedding, acts.final_norm, layer != acts.final_layer
                )
                return lens.log_softmax(-1)[:, columns]

            return inputs.natural(part, layer).map(read_out, len(columns))

        name = f"lens_layer_{layer}"
        fit = checkpoint.get_or_fit(
            name,
            lambda guess=guess, layer=layer: fit_softmax_probe(
                guess(TRAIN), len(columns), config.reg, config.probe,
                desc=f"layer {layer} logit-lens probe",
            ),
            shape=(len(columns), len(columns)),
        )  # fmt: skip
        log_fit(name, fit.convergence)
        tokens = token_scores(fit.probe, guess(TEST))
        draws = scorer.bootstrap.draws(fitted.correct[layer])
        draws -= scorer.bootstrap.draws(tokens["correct1"])
        row["lens_probe_top1"] = float(tokens["correct1"].mean())
        row["hidden_minus_lens_probe_top1"] = row["top1"] - row["lens_probe_top1"]
        row["hidden_minus_lens_probe_top1_ci"] = interval(draws)


def compare_lenses(config: Config, acts: Activations, scorer: Scorer, fitted: Fitted) -> list:
    """Per layer, on held-out positions: the logit lens's and a tuned lens's top-1 for the
    current and the next token (95% intervals over held-out sequences) and their KL to the final
    layer's distribution, beside the identity probe's top-1. Each tuned-lens translator is fitted
    on ``statistics.lens_train_rows`` training positions (``statistics/tuned_lens.py``)."""
    final, unembedding, norm = acts.final_layer, acts.unembedding, acts.final_norm
    if unembedding is None or final is None:
        log.info("Lens comparison skipped: it needs an unembedding and the final layer extracted")
        return []
    stats_cfg, split, device = config.statistics, scorer.inputs.split, scorer.inputs.device
    train = split.rows[TRAIN][: stats_cfg.lens_train_rows]
    test, sequences = split.rows[TEST][: stats_cfg.lens_rows], split.sequences[TEST]
    following, has_next = shifted_targets(acts.corpus.targets, 1)
    final_logits = pstats.lens_logits(read_rows(acts.store, final, test), unembedding, None, False)
    held_out = LensTargets.of(
        test, acts.corpus.targets.reshape(-1), following, has_next,
        SequenceBootstrap(sequences[: len(test)], stats_cfg.n_bootstrap, config.seed),
        final_logits.to(device),
    )  # fmt: skip
    l2 = config.reg.strength if config.reg.kind is RegKind.l2 else 0.0
    final_train = read_rows(acts.store, final, train).to(device)
    out = []
    for row in fitted.rows:
        layer = row["layer"]
        hidden = read_rows(acts.store, layer, test).to(device)
        logit_lens = pstats.lens_logits(hidden, unembedding, norm, layer != final)
        tuned_lens, conv = logit_lens, {"converged": True, "iterations": 0}
        if layer != final:
            objective = TranslatorObjective(
                read_rows(acts.store, layer, train).to(device), final_train, unembedding, norm, l2
            )
            params, conv = minimise(objective, TRANSLATOR_TOL, TRANSLATOR_MAX_ITER)
            tuned_lens = objective.logits(params, hidden).detach()
            log_fit(f"tuned_lens_layer_{layer}", conv)
        result = {"layer": layer, "probe_top1": row["top1"], "probe_top1_ci": row.get("top1_ci")}
        result.update(held_out.scores("logit_lens", logit_lens))
        result.update(held_out.scores("tuned_lens", tuned_lens))
        result.update(
            tuned_lens_converged=conv["converged"], tuned_lens_iterations=conv["iterations"]
        )
        row.update({k: v for k, v in result.items() if k.startswith(LENS_ROW_FIELDS)})
        out.append(result)
    return out


def accuracy_vs_k(config: Config, scorer: Scorer, fitted: Fitted) -> list[dict[str, Any]]:
    """At each layer, held-out top-1 of probes on the top, bottom and random k coordinates of
    the basis (``ksweep.py``): where in the basis the input token is readable."""
    inputs, stats_cfg = scorer.inputs, config.statistics
    return [
        point
        for row in fitted.rows
        for point in accuracy_against_k(
            inputs(TRAIN, row["layer"]), inputs(TEST, row["layer"]),
            len(inputs.split.classes), stats_cfg.k_sweep, inputs.basis.null_kind,
            stats_cfg.k_seeds, config.reg, config.probe, scorer.bootstrap, row["layer"],
            config.seed,
        )
    ]  # fmt: skip
