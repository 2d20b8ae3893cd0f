"""Minimum description length of the labels given the hidden states: the online (prequential)
code of Voita & Titov (2020), "Information-Theoretic Probing with Minimum Description Length".

The rows are put in a seeded random order and cut at fractions t_1 < ... < t_S = 1 of them. The
first block is sent with the uniform code over the class set (log2 C bits a token); every later
block with the probe trained on all the rows before it, at a cost of sum -log2 p(y | x) over the
block. Compression = uniform code length / online code length: about 1 when x says nothing about
y, large when a linear read-out of x gives y cheaply and from few examples.

Departures from the paper: each probe is the job's kind of probe (``probes/kinds.py``) at the
optimum of its stated objective (for softmax, mean cross-entropy + penalty at ``reg``), not a
network stopped early on a held-out part of its block; and a softmax fit is warm-started from the
previous block's probe, re-expressed exactly in the new fit's standardised coordinates (the
solver's optimum does not depend on the start, only the iterations to reach it do). A control task
is the same call with the control labels as ``y``.

Caveat: on the first blocks (tens of rows, many classes, a weak penalty) the data are nearly
separable, the optimum lies far out, and how far a fit within ``tol`` gets changes those blocks'
bits by tens of percent; the large late blocks dominate the total and are stable.
"""

from __future__ import annotations

import dataclasses
import math
from itertools import pairwise

import numpy as np
import torch
import torch.nn.functional as F

from probe_sweep.baselines.control import ControlTask
from probe_sweep.config import Config
from probe_sweep.extraction.data import TRAIN
from probe_sweep.fitting.identity import Fitted
from probe_sweep.fitting.inputs import Inputs
from probe_sweep.probes.kinds import ProbeKind, ProbeTask
from probe_sweep.probes.linear import LinearProbe, ProbeConfig, RegConfig
from probe_sweep.probes.rows import Rows
from probe_sweep.results import CodeBlock, CodeLength

# Voita & Titov's schedule: 0.1, 0.2, 0.4, 0.8, 1.6, 3.2, 6.25, 12.5, 25, 50, 100 % of the rows.
DEFAULT_FRACTIONS = (0.001, 0.002, 0.004, 0.008, 0.016, 0.032, 0.0625, 0.125, 0.25, 0.5, 1.0)


def block_ends(n: int, fractions: tuple[float, ...] | list[float]) -> list[int]:
    """Row counts ``round(f * n)`` at which the blocks end, increasing, with empty blocks (a
    repeated or zero end, on few rows) left out; the last is ``n``."""
    fractions = [float(f) for f in fractions]
    if not fractions or any(b <= a for a, b in pairwise(fractions)):
        raise ValueError(f"fractions must increase strictly, got {fractions}")
    if fractions[0] <= 0 or fractions[-1] != 1.0:
        raise ValueError(f"fractions must lie in (0, 1] and end at 1.0, got {fractions}")
    return sorted({min(n, round(f * n)) for f in fractions} - {0})


# Weight of the uniform code mixed into every block's code: a type no earlier block showed has
# probability 0 at the probe's optimum (its bias's infimum is -inf), and costs log2(C / ESCAPE)
# bits instead of infinitely many; every other token pays at most log2(1 / (1 - ESCAPE)).
ESCAPE = 1e-3


@torch.no_grad()
def code_bits(probe: LinearProbe, rows: Rows, batch: int = 8192) -> float:
    """Sum over rows (every label a class) of -log2 p(label | x) under the probe mixed with
    the uniform code (weight ``ESCAPE``)."""
    total = 0.0
    for x, target in rows.chunks(batch):
        logits = probe(x.to(probe.weight.device, probe.weight.dtype)).double()
        logp = F.log_softmax(logits, 1) + math.log1p(-ESCAPE)
        escape = torch.full_like(logp, math.log(ESCAPE / logits.shape[1]))
        mixed = torch.logaddexp(logp, escape)
        total -= mixed.gather(1, target.to(logits.device)[:, None]).sum().item()
    return total / math.log(2)


def _seeded_blocks(rows: Rows, ends: list[int], seed: int) -> Rows:
    """``rows`` in a seeded random order; inside each block, in their stored order (the same
    set of rows, read from the cache more sequentially)."""
    order = torch.randperm(len(rows), generator=torch.Generator().manual_seed(seed)).numpy()
    for start, end in pairwise([0, *ends]):
        block = order[start:end]
        order[start:end] = block[np.argsort(rows.index[block], kind="stable")]
    labels = rows.labels[torch.from_numpy(order).to(rows.labels.device)]
    return dataclasses.replace(rows, labels=labels, index=rows.index[order])


def _part(rows: Rows, start: int, end: int) -> Rows:
    return dataclasses.replace(rows, labels=rows.labels[start:end], index=rows.index[start:end])


def online_codelength(
    rows: Rows,
    targets: torch.Tensor,
    kind: ProbeKind,
    reg: RegConfig,
    cfg: ProbeConfig,
    fractions: tuple[float, ...] | list[float] = DEFAULT_FRACTIONS,
    seed: int = 0,
    desc: str = "",
) -> CodeLength:
    """Online code length (bits) of the labels of ``rows`` (class positions, -1 = outside the
    class set; ``targets``: the classes' target vectors) given their inputs, streamed chunk by
    chunk. Rows labelled -1 are dropped and counted; the rest are put in a seeded random order
    (a plain row permutation: the caller's rows are already whole sequences, and a block needs
    no sequence boundaries) and coded block by block (see the module docstring)."""
    labelled = rows.labelled()
    n, n_dropped = len(labelled), len(rows) - len(labelled)
    if n == 0:
        raise ValueError("online_codelength: no row has a label in the class set")
    ends = block_ends(n, fractions)
    ordered = _seeded_blocks(labelled, ends, seed)
    n_classes = len(targets)
    bits_per_class = math.log2(n_classes) if n_classes > 0 else 0.0
    # the first block: the uniform code, no probe
    blocks = [CodeBlock(ends[0] / n, ends[0], 0, ends[0] * bits_per_class, None, 0)]
    probe: LinearProbe | None = None
    for start, end in pairwise(ends):
        label = f"{desc} mdl {start}/{n}".strip()
        fit = kind.fit(ProbeTask(ordered.head(start), targets), reg, cfg, probe, label)
        probe = fit.probe
        bits = code_bits(probe, _part(ordered, start, end))
        converged, iterations = fit.convergence["converged"], fit.convergence.get("iterations", 0)
        blocks.append(
            CodeBlock(end / n, end - start, start, bits, bool(converged), int(iterations))
        )
    online = sum(b.bits for b in blocks)
    uniform = n * bits_per_class
    return CodeLength(
        codelength_bits=online,
        uniform_bits=uniform,
        compression=uniform / online if online > 0 else float("nan"),
        bits_per_token=online / n,
        n_tokens=n,
        n_dropped=n_dropped,
        all_converged=all(bool(b.converged) for b in blocks[1:]),
        blocks=blocks,
    )


def over_orders(codes: list[CodeLength]) -> CodeLength:
    """The code lengths of one task under several seeded orders of its rows, as one: mean bits,
    the compression of the mean, each order's compression and their range, the first's
    blocks."""
    first, n = codes[0], len(codes)
    bits = sum(code.codelength_bits for code in codes) / n
    ratios = [code.compression for code in codes]
    return dataclasses.replace(
        first,
        codelength_bits=bits,
        compression=first.uniform_bits / bits if bits > 0 else float("nan"),
        bits_per_token=bits / first.n_tokens,
        all_converged=all(code.all_converged for code in codes),
        n_orders=n,
        compression_range=[min(ratios), max(ratios)],
        order_compressions=ratios,
    )


def paired_compression_range(token: CodeLength, control: CodeLength) -> list[float] | None:
    """Lowest and highest of token minus control compression over their seeded orders: order
    j puts the same rows in the same order in both when both code the same rows. None when they
    do not, or without per-order figures."""
    a, b = token.order_compressions, control.order_compressions
    if not a or len(a) != len(b) or token.n_tokens != control.n_tokens:
        return None
    differences = [x - y for x, y in zip(a, b, strict=True)]
    return [min(differences), max(differences)]


def description_lengths(
    config: Config,
    kind: ProbeKind,
    inputs: Inputs,
    fitted: Fitted,
    class_embeddings: torch.Tensor,
    control: ControlTask,
) -> dict[int, tuple[CodeLength, CodeLength]]:
    """The code length of the input token and of the control task at each layer, each over
    ``statistics.mdl_orders`` seeded orders of the training rows (seed, seed + 1, ...)."""
    tasks = {
        "identity": (None, class_embeddings),
        "control": (control.labels[TRAIN], control.targets),
    }
    out = {}
    for scores in fitted.scores:
        layer, train = scores.layer, inputs(TRAIN, scores.layer)
        codes = []
        for task, (labels, targets) in tasks.items():
            rows = train if labels is None else train.with_labels(labels)
            orders = [
                online_codelength(
                    rows, targets.to(inputs.device), kind, config.reg, config.probe,
                    seed=config.seed + order, desc=f"layer {layer} {task} MDL order {order}",
                )
                for order in range(config.statistics.mdl_orders)
            ]  # fmt: skip
            codes.append(over_orders(orders))
        out[layer] = (codes[0], codes[1])
    return out
