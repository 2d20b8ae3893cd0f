"""One job, stage by stage, in the order of the data flow in DESIGN.md:

    model -> corpus -> activation cache -> basis -> probes -> statistics -> job files

Each stage is a function of typed values that returns a small dataclass; ``run_job`` wires
them and is the only place that knows them all (the Hydra entry only translates the config).
"""

from __future__ import annotations

import dataclasses
import logging
import re
import resource
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from probe_sweep import files, jobs, plots, tables
from probe_sweep import statistics as pstats
from probe_sweep.activations import ActivationStore, extract
from probe_sweep.bases import Basis, build_basis, check_basis_config
from probe_sweep.config import Config
from probe_sweep.data import TEST, TRAIN, VAL, Corpus, build_corpus
from probe_sweep.errors import UserError
from probe_sweep.inputs import Inputs, Split, read_rows, shifted_targets, split_labels
from probe_sweep.ksweep import accuracy_against_k
from probe_sweep.layers import LayerMode, pooled_assignment, resolve_layers
from probe_sweep.model import ModelInfo, inspect_model, load_model, load_tokenizer
from probe_sweep.probes import (
    FitResult,
    ProbeKind,
    RegKind,
    fit_ridge_probe,
    fit_softmax_probe,
    score_probe,
    summarise,
    token_scores,
)
from probe_sweep.rows import Rows
from probe_sweep.solver import minimise
from probe_sweep.statistics.bootstrap import SequenceBootstrap
from probe_sweep.statistics.mdl import online_codelength
from probe_sweep.statistics.nulls import interval
from probe_sweep.statistics.tuned_lens import LENS_ROW_FIELDS, LensTargets, TranslatorObjective

log = logging.getLogger("probe_sweep")
LayerHook = Callable[[int, dict[str, Any]], None]


def pick_device(name: str) -> torch.device:
    """``auto``: the GPU when one is visible, else the CPU."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise UserError(f"device={name} but no CUDA device is visible; use device=auto or cpu")
    return torch.device(name)


# --- model, corpus, cache, basis ---------------------------------------------------------------


@dataclass
class Activations:
    """What the later stages need from the model, once its hidden states are cached."""

    info: ModelInfo
    corpus: Corpus
    store: ActivationStore
    layers: list[int]
    embedding: torch.Tensor  # W_E (V x d), float32, CPU
    unembedding: torch.Tensor | None
    final_norm: torch.nn.Module | None

    @property
    def final_layer(self) -> int | None:
        """The last block's output, if extracted: HF has already applied the final norm."""
        return self.info.n_layers if self.info.n_layers in self.layers else None


def cache_activations(
    config: Config, device: torch.device, init_seed: int | None = None
) -> Activations:
    """Check every input, then load the model and cache its hidden states (or reuse them).
    ``init_seed``: the seed of random weights (default: the job's seed)."""
    tokenizer = load_tokenizer(config.model)
    info = inspect_model(config.model, len(tokenizer))
    warn_if_mislabelled(config.model.name, config.model.path)
    check_basis_config(config.basis, info.d_model)
    layers = resolve_layers(config.layers, info.n_layers)
    corpus = build_corpus(config.data, tokenizer, info.max_positions, config.seed)
    n_content = corpus.targets.shape[1]
    if abs(config.target.offset) >= n_content:
        raise UserError(
            f"target.offset={config.target.offset} leaves no position with a target in "
            f"sequences of {n_content} tokens; use |offset| < {n_content} or raise data.seq_len"
        )
    log.info(
        "Model %s (%d layers, d=%d) on %s; corpus %s",
        *(info.name, info.n_layers, info.d_model, device, corpus.description),
    )
    seed = config.seed if init_seed is None else init_seed
    model = load_model(config.model, len(tokenizer), device, seed)
    store = extract(model, corpus, layers, config.activations, device)
    embedding = model.embedding.float().cpu()
    return Activations(info, corpus, store, layers, embedding, model.unembedding, model.final_norm)


def warn_if_mislabelled(name: str, path: str | None) -> None:
    """``model.name`` is only a label: say so loudly when it does not match the weights' path
    (``model.name=gpt2`` alone still loads the default model)."""

    def norm(text: str) -> str:
        return re.sub(r"[^a-z0-9]", "", text.lower())

    if path is not None and norm(name) not in norm(path):
        log.warning(
            "model.name=%s is only the label of these results; the weights come from "
            "model.path=%s. To load another model choose model=<option> or set model.path",
            name,
            path,
        )


def prepare_inputs(
    config: Config, device: torch.device, init_seed: int | None = None
) -> tuple[Activations, Scorer]:
    """The model's cached hidden states, split and labelled, in the configured basis, with the
    scorer every probe of this model is scored by."""
    acts = cache_activations(config, device, init_seed)
    split = split_labels(
        acts.corpus, config.probe.classes, acts.info.vocab_size, device, config.target.offset
    )
    counts = np.bincount(split.targets[split.rows[TRAIN]], minlength=acts.info.vocab_size)
    basis = build_basis(config.basis, acts.embedding, counts, config.seed)
    bootstrap = SequenceBootstrap(split.sequences[TEST], config.statistics.n_bootstrap, config.seed)
    return acts, Scorer(Inputs(acts.store, basis, split, device), bootstrap)


# --- probes ------------------------------------------------------------------------------------


@dataclass
class ProbeTask:
    """What one probe is fitted to: the training and validation rows."""

    train: Rows
    val: Rows
    n_classes: int
    class_embeddings: torch.Tensor | None = None  # W_E rows of the classes: the ridge target


def fit_probe(config: Config, task: ProbeTask, desc: str) -> FitResult:
    """The configured probe at the configured strength. A softmax probe starts from zero: the
    closed-form ridge probe, offered as a warm start, had a higher objective than zero in every
    MiniLM fit measured."""
    if config.probe.kind is ProbeKind.ridge:
        assert task.class_embeddings is not None
        return fit_ridge_probe(
            task.train, task.class_embeddings, config.reg, task.val, config.probe.path_strengths
        )
    return fit_softmax_probe(task.train, task.n_classes, config.reg, config.probe, desc=desc)


def log_fit(name: str, c: dict[str, Any]) -> None:
    """One line per fit (``c``: its convergence record): logs and SLURM files get this instead
    of progress bars."""
    if c.get("solver") == "closed_form":
        return
    state = "converged" if c["converged"] else "NOT converged"
    log.log(
        logging.INFO if c["converged"] else logging.WARNING,
        "%s: %s (%s, %d iterations, objective %.6g, gradient %.1e of its start, tol %.0e)",
        *(name, state, c["solver"], c["iterations"], c["objective"], c["grad_norm_rel"], c["tol"]),
    )


@dataclass
class Scorer:
    """Held-out scores of probes on one model's inputs, with intervals from a bootstrap over
    held-out sequences (the same resamples for every probe, so differences are paired)."""

    inputs: Inputs
    bootstrap: SequenceBootstrap

    def __call__(
        self,
        fit: FitResult,
        layer: int,
        name: str,
        labels: dict[int, torch.Tensor] | None = None,
    ) -> tuple[dict[str, Any], np.ndarray]:
        """The test-split row (reported; validation NLL/top-1 are what tuning may use) and
        which test tokens the probe got right."""
        split, inputs = self.inputs.split, self.inputs
        labels = split.labels if labels is None else labels
        frequent = split.frequent[TEST].cpu().numpy()
        tokens = token_scores(fit.probe, inputs(TEST, layer).with_labels(labels[TEST]))
        val = score_probe(
            fit.probe, inputs(VAL, layer).with_labels(labels[VAL]), split.frequent[VAL]
        )
        row = {"layer": layer, "probe": name, **summarise(tokens, frequent, self.bootstrap)}
        row.update(val_nll=val["nll"], val_top1=val["top1"])
        conv = fit.convergence
        row.update({k: conv[k] for k in ("iterations", "grad_norm_rel", "converged") if k in conv})
        return row, tokens["correct1"]


@dataclass
class Fitted:
    """Probes fitted on one model: by name, the layers each was trained on, the test rows."""

    fits: dict[str, FitResult]
    train_layers: dict[str, np.ndarray | int]
    rows: list[dict[str, Any]]
    correct: dict[int, np.ndarray]  # layer -> which test tokens the probe scored there got right


def fit_identity_probes(
    config: Config,
    scorer: Scorer,
    layers: list[int],
    class_embeddings: torch.Tensor,
    checkpoint: jobs.FitCheckpoint,
    on_layer: LayerHook | None = None,
    prefix: str = "",
) -> Fitted:
    """One probe per layer (or one pooled probe scored at every layer) for the input token."""
    inputs, split = scorer.inputs, scorer.inputs.split
    n_classes = len(split.classes)
    if config.layers.mode is LayerMode.pooled:
        pooled = pooled_assignment(len(split.rows[TRAIN]), layers, config.seed)
        val = pooled_assignment(len(split.rows[VAL]), layers, config.seed + 1)
        train_layers: dict[str, np.ndarray | int] = {"pooled": pooled}
        val_layers: dict[str, np.ndarray | int] = {"pooled": val}
        names = {layer: "pooled" for layer in layers}
    else:
        names = {layer: f"layer_{layer}" for layer in layers}
        train_layers = val_layers = {name: layer for layer, name in names.items()}
    fits: dict[str, FitResult] = {}
    for name in dict.fromkeys(names.values()):
        task = ProbeTask(
            inputs(TRAIN, train_layers[name]), inputs(VAL, val_layers[name]), n_classes,
            class_embeddings,
        )  # fmt: skip
        fits[name] = checkpoint.get_or_fit(
            prefix + name, lambda task=task, name=name: fit_probe(config, task, prefix + name)
        )
        log_fit(prefix + name, fits[name].convergence)
    fitted = Fitted(fits, train_layers, [], {})
    for layer in layers:
        row, fitted.correct[layer] = scorer(fits[names[layer]], layer, names[layer])
        fitted.rows.append(row)
        if on_layer is not None:
            on_layer(len(fitted.rows) - 1, row)
    return fitted


def input_covariances(inputs: Inputs, fitted: Fitted) -> dict[str, torch.Tensor]:
    """Covariance (k, k) of each probe's training inputs, from the sums of x and x x' in one
    streamed pass (float64)."""
    out = {}
    for name, layers in fitted.train_layers.items():
        rows = inputs(TRAIN, layers)
        device = inputs.device
        total = torch.zeros(rows.d, dtype=torch.float64, device=device)
        square = torch.zeros(rows.d, rows.d, dtype=torch.float64, device=device)
        for x, _ in rows.chunks(65536):
            x = x.to(device).double()
            total += x.sum(0)
            square += x.T @ x
        n = len(rows)
        cov = (square - torch.outer(total, total) / max(n, 1)) / max(n - 1, 1)
        out[name] = cov.cpu()
    return out


# --- baselines, controls and lenses ------------------------------------------------------------


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
    config: Config, scorer: Scorer, fitted: Fitted, vocab_size: int, checkpoint: jobs.FitCheckpoint
) -> dict[str, FitResult]:
    """The Hewitt & Liang control probe at each per-layer probe's layer: the same probe on a
    fixed random label per token type (a task only memorising types can solve). Adds
    ``control_top1`` and ``selectivity`` (identity minus control top-1, paired interval) to the
    rows; returns the control fits by the identity probe's name."""
    inputs, n_labels = scorer.inputs, config.statistics.control_labels
    labels = control_labels(config, inputs, vocab_size)
    fits = {}
    for row in fitted.rows:
        layer, name = row["layer"], f"control_layer_{row['layer']}"
        fit = checkpoint.get_or_fit(
            name,
            lambda layer=layer: fit_softmax_probe(
                inputs(TRAIN, layer).with_labels(labels[TRAIN]), n_labels, config.reg,
                config.probe, desc=f"layer {layer} control probe",
            ),
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
    config: Config, device: torch.device, fitted: Fitted, checkpoint: jobs.FitCheckpoint
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
    checkpoint: jobs.FitCheckpoint,
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
            desc = f"layer {layer} tuned lens"
            params, conv = minimise(
                objective, None, 0.0, config.probe.tol, config.probe.max_iter, desc=desc
            )[:2]
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


def measure(
    config: Config,
    acts: Activations,
    scorer: Scorer,
    fitted: Fitted,
    device: torch.device,
    checkpoint: jobs.FitCheckpoint,
) -> dict[str, Any]:
    """Statistics of the fitted probes against W_E, each read against its baselines."""
    stats_cfg = config.statistics
    if not stats_cfg.enabled:
        return {}
    inputs, split = scorer.inputs, scorer.inputs.split
    controls = {}
    if stats_cfg.control_task:
        controls = control_probes(config, scorer, fitted, acts.info.vocab_size, checkpoint)
    if stats_cfg.lens_probe and acts.unembedding is not None:
        lens_probe_scores(config, acts, scorer, fitted, checkpoint)
    random_init = None
    if stats_cfg.random_init_baseline:
        random_init = random_init_probes(config, device, fitted, checkpoint)
    probes = pstats.ProbeSet(
        fitted.fits,
        inputs.basis.encoder,
        acts.embedding[torch.from_numpy(split.classes)],
        input_covariances(inputs, fitted),
    )
    job = pstats.JobProbes(
        probes=probes,
        rows=fitted.rows,
        embedding=acts.embedding,
        null_kind=inputs.basis.null_kind,
        random_init=random_init,
        control_fits=controls,
        lens=lens_inputs(acts, split, stats_cfg.lens_rows) if stats_cfg.logit_lens else None,
    )
    statistics = pstats.job_statistics(job, stats_cfg, config.seed)
    statistics["basis"] = {"name": inputs.basis.name, **inputs.basis.info}
    if stats_cfg.lens_comparison and config.layers.mode is not LayerMode.pooled:
        statistics["lens_comparison"] = compare_lenses(config, acts, scorer, fitted)
    if stats_cfg.mdl and config.layers.mode is not LayerMode.pooled:
        statistics["mdl"] = description_lengths(config, inputs, fitted, acts.info.vocab_size)
    if stats_cfg.k_sweep and config.layers.mode is not LayerMode.pooled:
        statistics["accuracy_vs_k"] = [
            point
            for row in fitted.rows
            for point in accuracy_against_k(
                inputs(TRAIN, row["layer"]), inputs(TEST, row["layer"]),
                len(split.classes), stats_cfg.k_sweep, inputs.basis.null_kind,
                stats_cfg.k_seeds, config.reg, config.probe, scorer.bootstrap, row["layer"],
                config.seed,
            )
        ]  # fmt: skip
    return statistics


# --- the job -----------------------------------------------------------------------------------


def run_job(
    config: Config,
    resolved: dict[str, Any],
    out_dir: Path,
    job: dict[str, Any],
    on_layer: LayerHook | None = None,
) -> dict[str, Any]:
    """One job: every stage in order; returns the metrics written to ``out_dir/metrics.json``.

    ``job`` (content key, scheduler ids) is stored with them: a metrics.json that has it marks
    complete results. ``on_layer(step, row)`` is called as each layer is scored (a tuner may
    stop the job there)."""
    clock = [time.perf_counter()]
    device = pick_device(config.device)
    acts, scorer = prepare_inputs(config, device)
    split, basis = scorer.inputs.split, scorer.inputs.basis
    clock.append(time.perf_counter())

    checkpoint = jobs.FitCheckpoint(out_dir, job["key"], device)
    class_embeddings = acts.embedding[torch.from_numpy(split.classes)].to(device)
    fitted = fit_identity_probes(
        config, scorer, acts.layers, class_embeddings, checkpoint, on_layer
    )
    clock.append(time.perf_counter())
    statistics = measure(config, acts, scorer, fitted, device, checkpoint)
    clock.append(time.perf_counter())

    metrics = job_metrics(config, acts, split, fitted, statistics, basis.name, clock)
    metrics.update(resources=resources(device), job=job, config=resolved)
    write_job_files(out_dir, metrics, fitted.fits, split.classes, basis)
    checkpoint.discard()
    return metrics


def job_metrics(
    config: Config,
    acts: Activations,
    split: Split,
    fitted: Fitted,
    statistics: dict[str, Any],
    basis_name: str,
    clock: list[float],
) -> dict[str, Any]:
    """The contents of metrics.json (schema in the README), less the job and config sections."""
    info, rows = acts.info, split.rows
    converged = [bool(f.convergence.get("converged", True)) for f in fitted.fits.values()]
    return {
        "schema_version": jobs.SCHEMA_VERSION,
        "model": {
            "name": info.name,
            "path": config.model.path,
            "model_type": info.model_type,
            "n_layers": info.n_layers,
            "d_model": info.d_model,
            "vocab_size": info.vocab_size,
            "has_unembedding": acts.unembedding is not None,
        },
        "probe": {
            "kind": config.probe.kind.value,
            "layers": config.layers.mode.value,
            "basis": basis_name,
            "reg": config.reg.kind.value,
            "strength": config.reg.strength,
            "classes": config.probe.classes.value,
            "n_classes": int(len(split.classes)),
            "target_offset": config.target.offset,
            "tol": config.probe.tol,
            "all_converged": all(converged),
        },
        "counts": {
            "n_sequences": int(acts.corpus.input_ids.shape[0]),
            "seq_len": int(acts.corpus.input_ids.shape[1]),
            "n_train_tokens": int(len(rows[TRAIN])),
            "n_val_tokens": int(len(rows[VAL])),
            "n_test_tokens": int(len(rows[TEST])),
            "n_train_types": split.n_train_types,
            "n_frequent_types": split.n_frequent_types,
            "n_test_unseen": int((split.labels[TEST] < 0).sum()),
            "n_outside_target": split.n_outside,
        },
        "cache": {
            "key": acts.store.meta["key"],
            "path": str(acts.store.path),
            "reused": acts.store.reused,
        },
        "timing_s": {
            stage: round(end - start, 2)
            for stage, start, end in zip(
                ("extract", "fit", "statistics"), clock, clock[1:], strict=False
            )
        },
        "layers": fitted.rows,
        "fits": {
            name: {**fit.convergence, "history": fit.history} for name, fit in fitted.fits.items()
        },
        "statistics": statistics,
        "ridge_path": ridge_path(fitted.fits, config.probe.path_strengths),
    }


def resources(device: torch.device) -> dict[str, Any]:
    """Where the job ran and its peak memory: resident (this process, MiB) and on the GPU."""
    peak_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux
    out: dict[str, Any] = {"device": str(device), "peak_rss_mb": round(peak_rss, 1)}
    if device.type == "cuda":
        out["gpu"] = torch.cuda.get_device_name(device)
        out["peak_gpu_mb"] = round(torch.cuda.max_memory_allocated(device) / 2**20, 1)
    return out


def ridge_path(fits: dict[str, FitResult], strengths: list[float]) -> dict[str, Any] | None:
    """Validation NLL along the ridge path, averaged over the fitted probes (as the objective)."""
    paths = [fit.path for fit in fits.values() if fit.path]
    if not paths:
        return None
    mean = [float(np.mean([p[i]["val_nll"] for p in paths])) for i in range(len(strengths))]
    return {"strengths": list(strengths), "val_nll": mean}


def write_job_files(
    out_dir: Path,
    metrics: dict[str, Any],
    fits: dict[str, FitResult],
    classes: np.ndarray,
    basis: Basis,
) -> None:
    """Probe tensors (with the basis encoder, which maps them to natural coordinates), the
    plots, then metrics.json last (its presence marks a finished job), then the tables."""
    encoder, basis_name = basis.encoder, basis.name
    assert encoder is not None
    tensors = {"classes": torch.from_numpy(classes), "basis.encoder": encoder}
    for name, fit in fits.items():
        tensors.update({f"{name}.{k}": v for k, v in fit.probe.state_dict().items()})
        if fit.map_weight is not None:
            tensors[f"{name}.map_weight"] = fit.map_weight
    files.write_tensors(out_dir / "probes.safetensors", tensors, {"basis": basis_name})
    probe, rows = metrics["probe"], metrics["layers"]
    title = (
        f"{metrics['model']['name']}: {probe['kind']} probe ({probe['layers']} layer), "
        f"{basis_name} basis, {probe['reg']} {probe['strength']:g}"
    )
    plots.plot_accuracy_by_layer(rows, out_dir / "accuracy_by_layer.png", title)
    if metrics["statistics"].get("accuracy_vs_k"):
        points = metrics["statistics"]["accuracy_vs_k"]
        plots.plot_accuracy_vs_k({"": points}, out_dir / "accuracy_vs_k.png", title)
    files.write_json(out_dir / jobs.METRICS, metrics)
    log.info("Held-out scores (%s):\n%s", out_dir, tables.format_table(rows))
    statistics = metrics["statistics"]
    if statistics.get("entries"):
        log.info("Statistics (nulls):\n%s", pstats.format_entries(statistics["entries"]))
    if any(field in row for row in rows for field in pstats.LAYER_FIELDS[1:]):
        log.info("Baselines, controls, lenses, MDL by layer:\n%s", pstats.format_layers(rows))
