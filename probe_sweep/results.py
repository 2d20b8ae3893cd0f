"""Typed results: what each stage of a job finds at each layer, and the checks that read them
back from metrics.json.

Each stage returns its own part, frozen: the identity probe's scores (fitting), the control
task, the random-init model, the lens probe, the lens comparison and the code lengths
(baselines), the logit lens's read-outs (statistics). ``LayerResult`` puts one layer's parts side
by side; nobody edits a part afterwards. A metrics.json row is ``LayerResult.row()``, every
part's fields flat under the names the README lists, and ``LayerResult.from_row`` reads one back,
checking each field against its type here. These dataclasses are the one list of what a row
holds: the tables, plots, tuner and report read their fields.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

from probe_sweep.typed_json import Count, Interval, build, part_type


def shown(accuracy: str = "", compared: bool = False, **default: Any) -> Any:
    """A field that readers show: ``accuracy``, its label in the accuracy-by-layer plot;
    ``compared``, a table and figure per job in the sweep report's statistics."""
    return field(metadata={"accuracy": accuracy, "compared": compared}, **default)


@dataclass(frozen=True)
class ProbeScores:
    """The identity probe on held-out tokens: test-split scores with intervals over held-out
    sequences (the split the README reports), validation NLL and top-1 (what tuning may use).
    ``n_unseen``: test tokens without an NLL (their type is not a class, or no training token
    had it); they count as errors in top-1 and top-5."""

    layer: Count
    probe: str
    top1: float = shown("top-1", compared=True)
    top5: float = shown("top-5")
    nll: float
    val_nll: float
    val_top1: float
    n_unseen: Count
    top1_ci: Interval | None = None
    top5_ci: Interval | None = None
    nll_ci: Interval | None = None
    top1_frequent: float | None = shown("top-1, frequent types", default=None)
    top1_frequent_ci: Interval | None = None
    top1_rare: float | None = shown("top-1, rare types", default=None)
    top1_rare_ci: Interval | None = None


@dataclass(frozen=True)
class ControlScores:
    """The control task (Hewitt & Liang 2019) at this layer: top-1 of the same kind of probe on
    a fixed random label per type, and selectivity, identity minus control top-1 (paired)."""

    control_top1: float = shown("control task top-1 (baseline)")
    selectivity: float = shown(compared=True)
    control_top1_ci: Interval | None = None
    selectivity_ci: Interval | None = None


@dataclass(frozen=True)
class RandomInitScores:
    """The same probe on the same tokens of the same architecture with random weights."""

    random_init_top1: float = shown("top-1, random-init model (baseline)")
    top1_minus_random_init: float = shown(compared=True)
    random_init_top1_ci: Interval | None = None
    top1_minus_random_init_ci: Interval | None = None


@dataclass(frozen=True)
class DepthScores:
    """This layer's identity-probe top-1 minus the previous probed layer's and minus the first
    probed layer's, each paired (the first: how much the layers so far changed in all)."""

    top1_minus_previous_layer: float = shown(compared=True)
    previous_layer: Count
    top1_minus_previous_layer_ci: Interval | None = None
    top1_minus_first_layer: float | None = None
    first_layer: Count | None = None
    top1_minus_first_layer_ci: Interval | None = None


@dataclass(frozen=True)
class LensProbeScores:
    """The identity probe fed the logit lens's log-probabilities of the classes instead of the
    hidden state (is the input token in the model's own guess?), against the hidden state."""

    lens_probe_top1: float
    hidden_minus_lens_probe_top1: float
    hidden_minus_lens_probe_top1_ci: Interval | None = None


@dataclass(frozen=True)
class LogitLensReadout:
    """The logit lens's read-out of the input token (rank 1 = top) on ``statistics.lens_rows``
    held-out positions, the identity probe's top-1 minus the lens's on those positions (paired),
    and, where the final layer was extracted, the mean cosine of the hidden state with the
    embeddings of the tokens the final layer ranks lowest, highest, and of random tokens."""

    lens_input_top1: float
    lens_input_top1_ci: Interval
    lens_input_median_rank: float
    lens_input_mean_log_rank: float
    lens_input_prob: float
    probe_minus_lens_top1: float
    probe_minus_lens_top1_ci: Interval
    proj_unlikely: float | None = None
    proj_likely: float | None = None
    proj_random: float | None = None


@dataclass(frozen=True)
class LensComparison:
    """The logit lens and a tuned lens (Belrose et al. 2023) side by side: top-1 of the current
    and of the next token, and mean KL(final layer || lens)."""

    logit_lens_top1: float | None
    logit_lens_next_top1: float | None
    logit_lens_kl: float
    tuned_lens_top1: float | None
    tuned_lens_next_top1: float | None
    tuned_lens_kl: float
    tuned_lens_converged: bool
    tuned_lens_iterations: int
    tuned_minus_logit_lens_kl: float | None = None  # paired, on the same held-out positions
    logit_lens_top1_ci: Interval | None = None
    logit_lens_next_top1_ci: Interval | None = None
    tuned_lens_top1_ci: Interval | None = None
    tuned_lens_next_top1_ci: Interval | None = None
    tuned_minus_logit_lens_kl_ci: Interval | None = None


@dataclass(frozen=True)
class CodeBlock:
    """One block of the online code: its rows, the rows its probe was trained on (0: the
    uniform code), its bits, and whether that probe converged (None: no probe)."""

    fraction: float
    n_rows: int
    n_train: int
    bits: float
    converged: bool | None
    iterations: int


@dataclass(frozen=True)
class CodeLength:
    """The online code length (Voita & Titov 2020) of a task's labels given the hidden state,
    over ``n_orders`` seeded orders of the rows: mean total bits, the uniform code's, their
    ratio (compression), bits per token, each order's compression in seed order (the control
    task's orders are the same row orders, so the two pair up) with their lowest and highest
    (``compression_range``), and the first order's blocks."""

    codelength_bits: float
    uniform_bits: float
    compression: float
    bits_per_token: float
    n_tokens: Count
    n_dropped: Count
    all_converged: bool
    n_orders: Count = Count(1)
    compression_range: Interval | None = None
    order_compressions: list[float] = field(default_factory=list)
    blocks: list[CodeBlock] = field(default_factory=list)


@dataclass(frozen=True)
class LayerResult:
    """Everything measured at one layer; a part is None when its stage did not run. The
    ``prefix`` of a part names its fields in a row (the two code lengths share a type)."""

    scores: ProbeScores
    depth: DepthScores | None = None
    control: ControlScores | None = None
    random_init: RandomInitScores | None = None
    lens_probe: LensProbeScores | None = None
    logit_lens: LogitLensReadout | None = None
    lenses: LensComparison | None = None
    mdl: CodeLength | None = field(default=None, metadata={"prefix": "mdl_"})
    control_mdl: CodeLength | None = field(default=None, metadata={"prefix": "control_mdl_"})

    @property
    def layer(self) -> int:
        return self.scores.layer

    def row(self) -> dict[str, Any]:
        """The metrics.json row: every part's fields, flat; a missing value is left out."""
        out: dict[str, Any] = {}
        for part in dataclasses.fields(self):
            value = getattr(self, part.name)
            if value is not None:
                prefix = part.metadata.get("prefix", "")
                flat = dataclasses.asdict(value).items()
                out.update({prefix + k: v for k, v in flat if v is not None})
        return out

    @classmethod
    def from_row(cls, row: Any) -> LayerResult:
        """A row read back, checked against the fields above (``ValueError`` naming the first
        field that is unknown, missing or of the wrong type)."""
        if not isinstance(row, dict):
            raise ValueError("is not a JSON object")
        unknown = sorted(set(row) - set(ROW_FIELDS))
        if unknown:
            raise ValueError(f"{unknown[0]} is not a field")
        parts: dict[str, Any] = {}
        for part in dataclasses.fields(cls):
            prefix = part.metadata.get("prefix", "")
            kind = part_type(cls, part.name)
            names = {f.name for f in dataclasses.fields(kind)}
            given = {name: row[prefix + name] for name in names if prefix + name in row}
            if given or part.name == "scores":
                parts[part.name] = build(kind, given, prefix)
        return cls(**parts)


ROW_FIELDS: dict[str, str] = {
    part.metadata.get("prefix", "") + f.name: part.name
    for part in dataclasses.fields(LayerResult)
    for f in dataclasses.fields(part_type(LayerResult, part.name))
}  # flat name in a row -> the part that owns it
assert len(ROW_FIELDS) == sum(
    len(dataclasses.fields(part_type(LayerResult, p.name))) for p in dataclasses.fields(LayerResult)
), "two parts of a layer's result give a row field the same name"


def shown_fields(what: str) -> dict[str, Any]:
    """Row fields marked ``what`` (see ``shown``), in declaration order, with the mark."""
    out = {}
    for part in dataclasses.fields(LayerResult):
        prefix = part.metadata.get("prefix", "")
        for f in dataclasses.fields(part_type(LayerResult, part.name)):
            if f.metadata.get(what):
                out[prefix + f.name] = f.metadata[what]
    return out


def fields_of(kind: type) -> list[str]:
    """The value fields of a part, without their intervals: what a table shows."""
    return [f.name for f in dataclasses.fields(kind) if not f.name.endswith("_ci")]


@dataclass(frozen=True)
class KPoint:
    """Held-out top-1 of a probe on k directions of the basis: the top-k, the bottom-k, or a
    random k of the same kind (``seed``: which draw)."""

    layer: int
    k: int
    kind: str
    seed: int | None
    top1: float
    converged: bool
    top1_ci: Interval | None = None


@dataclass(frozen=True)
class JobStatistics:
    """metrics.json ``statistics``: every null-tested number (``statistics/nulls.py``'s
    entries), each probe's weight share by basis column, the classes the probe-matrix
    statistics used, the basis, and accuracy against k."""

    entries: list[dict[str, Any]]
    weight_mass: dict[str, Any]
    classes: dict[str, int]
    basis: dict[str, Any]
    accuracy_vs_k: list[KPoint] = field(default_factory=list)


@dataclass(frozen=True)
class ModelSummary:
    """metrics.json ``model``: what was probed."""

    name: str
    path: str | None
    model_type: str
    n_layers: Count
    d_model: Count
    vocab_size: Count
    has_unembedding: bool


@dataclass(frozen=True)
class ProbeSummary:
    """metrics.json ``probe``: what was fitted, and whether every fit met its tolerance."""

    kind: str
    layers: str
    basis: str
    reg: str
    strength: float
    classes: str
    n_classes: Count
    target_offset: int
    tol: float
    all_converged: bool


@dataclass(frozen=True)
class Counts:
    """metrics.json ``counts``: sequences, tokens and types of each split."""

    n_sequences: Count
    seq_len: Count
    n_train_tokens: Count
    n_val_tokens: Count
    n_test_tokens: Count
    n_train_types: Count
    n_frequent_types: Count
    n_test_unseen: Count
    n_outside_target: Count


@dataclass(frozen=True)
class CacheUse:
    """metrics.json ``cache``: the activation cache entry the job read, and whether it existed."""

    key: str
    path: str
    reused: bool
