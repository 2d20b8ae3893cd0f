"""Online (prequential) MDL code: far below uniform when the label is a linear function of x, at
uniform when it is noise, with exact block bookkeeping and seeded reproducibility."""

from __future__ import annotations

import dataclasses
import json
import math
from itertools import pairwise
from pathlib import Path

import pytest
import torch

from probe_sweep.baselines.mdl import (
    DEFAULT_FRACTIONS,
    block_ends,
    code_bits,
    online_codelength,
    over_orders,
    paired_compression_range,
)
from probe_sweep.probes.kinds import probe_kind
from probe_sweep.probes.linear import (
    ProbeConfig,
    RegConfig,
    fit_softmax_probe,
    in_coordinates_of,
    standardisation,
)
from tests.conftest import TINY, run_cli
from tests.memory_rows import in_memory

CFG = ProbeConfig()
C, D, N = 8, 16, 4000
TARGETS = torch.zeros(C, 1)  # a softmax probe needs only their number
SOFTMAX = probe_kind("softmax")


def linear_task(n: int = N, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """y = argmax(x @ A): a deterministic linear function of x."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, D, generator=g) * 3 + 1  # off-centre and scaled: the standardisation works
    a = torch.randn(D, C, generator=g)
    return x, (x @ a).argmax(1)


def test_linear_labels_compress_far_below_uniform() -> None:
    x, y = linear_task()
    result = online_codelength(in_memory(x, y), TARGETS, SOFTMAX, RegConfig(), CFG)
    assert result.n_tokens == N and result.n_dropped == 0
    assert result.uniform_bits == pytest.approx(N * 3.0)
    assert result.compression > 3
    assert result.codelength_bits < result.uniform_bits / 3
    assert result.bits_per_token == pytest.approx(result.codelength_bits / N)
    # the probes learn: the last (largest) block costs far less per token than the uniform code
    last = result.blocks[-1]
    assert last.bits / last.n_rows < 0.5


def test_random_labels_do_not_compress() -> None:
    x, _ = linear_task()
    y = torch.randint(0, C, (N,), generator=torch.Generator().manual_seed(1))
    result = online_codelength(in_memory(x, y), TARGETS, SOFTMAX, RegConfig(), CFG)
    assert result.compression < 1.1
    # The online code is a valid code for y given x, chosen before y is seen; for labels drawn
    # uniformly, Kraft's inequality and Markov's give P(it beats uniform by k bits) <= 2^-k. A
    # probe that saw the block it codes does beat it (by about 440 bits here).
    assert result.codelength_bits > result.uniform_bits - 20


def test_blocks_partition_the_rows_and_the_first_is_uniform() -> None:
    x, y = linear_task()
    y = y.clone()
    y[::10] = -1  # types outside the class set: dropped and counted
    result = online_codelength(in_memory(x, y), TARGETS, SOFTMAX, RegConfig(), CFG)
    n = N - len(range(0, N, 10))
    assert result.n_dropped == N - n and result.n_tokens == n
    blocks = result.blocks
    assert sum(b.n_rows for b in blocks) == n
    ends = [round(f * n) for f in DEFAULT_FRACTIONS]  # 3600 rows: no fraction gives an empty block
    assert [b.n_rows for b in blocks] == [ends[0]] + [b - a for a, b in pairwise(ends)]
    assert [b.n_train for b in blocks] == [0] + ends[:-1]
    assert blocks[0].bits == ends[0] * math.log2(C) and blocks[0].converged is None
    assert result.codelength_bits == pytest.approx(sum(b.bits for b in blocks))
    assert result.all_converged == all(b.converged for b in blocks[1:])


def test_tiny_data_skips_empty_blocks() -> None:
    x, y = linear_task(n=60)
    result = online_codelength(in_memory(x, y), TARGETS, SOFTMAX, RegConfig(), CFG)
    # round(f * 60) for the default schedule: 0, 0, 0, 0, 1, 2, 4, 8, 15, 30, 60
    assert [b.n_rows for b in result.blocks] == [1, 1, 2, 4, 7, 15, 30]
    assert result.blocks[0].bits == math.log2(C)  # one row, fewer than 2 classes seen next
    assert math.isfinite(result.codelength_bits)
    assert block_ends(3, DEFAULT_FRACTIONS) == [1, 2, 3]


def test_bad_fractions_are_refused() -> None:
    with pytest.raises(ValueError, match="end at 1.0"):
        block_ends(100, (0.1, 0.5))
    with pytest.raises(ValueError, match="increase"):
        block_ends(100, (0.5, 0.1, 1.0))


def test_same_seed_same_result_other_seed_other_order() -> None:
    x, y = linear_task(n=1000)
    a = online_codelength(in_memory(x, y), TARGETS, SOFTMAX, RegConfig(), CFG, seed=3)
    b = online_codelength(in_memory(x, y), TARGETS, SOFTMAX, RegConfig(), CFG, seed=3)
    c = online_codelength(in_memory(x, y), TARGETS, SOFTMAX, RegConfig(), CFG, seed=4)
    assert a == b
    assert a.codelength_bits != c.codelength_bits


def test_seeded_orders_combine_into_a_mean_and_a_range() -> None:
    x, y = linear_task(n=1000)
    codes = [
        online_codelength(in_memory(x, y), TARGETS, SOFTMAX, RegConfig(), CFG, seed=seed)
        for seed in range(3)
    ]
    both = over_orders(codes)
    mean = sum(c.codelength_bits for c in codes) / 3
    assert both.codelength_bits == pytest.approx(mean) and both.n_orders == 3
    assert both.compression == pytest.approx(both.uniform_bits / mean)
    low, high = both.compression_range
    assert low == min(c.compression for c in codes) < high == max(c.compression for c in codes)
    assert low <= both.compression <= high
    assert both.order_compressions == [c.compression for c in codes]
    assert both.blocks == codes[0].blocks


def test_token_and_control_pair_up_by_order() -> None:
    """The same labels coded as "token" and as "control": each order's difference is exactly 0,
    though the orders' compressions spread; a control code of other rows does not pair."""
    x, y = linear_task(n=1000)
    token, control = (
        over_orders(
            [
                online_codelength(in_memory(x, y), TARGETS, SOFTMAX, RegConfig(), CFG, seed=seed)
                for seed in range(3)
            ]
        )
        for _ in range(2)
    )
    low, high = token.compression_range
    assert low < high and paired_compression_range(token, control) == [0.0, 0.0]
    fewer = dataclasses.replace(control, n_tokens=control.n_tokens - 1)
    assert paired_compression_range(token, fewer) is None


def test_warm_start_is_the_same_map_and_changes_no_block() -> None:
    """The previous probe re-expressed in new coordinates gives the same logits, and a block's
    code length under the warm-started fit equals the one under a fit from zero."""
    g = torch.Generator().manual_seed(5)
    embeddings = torch.randn(C, D, generator=g)
    y = torch.randint(0, C, (2000,), generator=g)
    x = embeddings[y] + 1.5 * torch.randn(2000, D, generator=g) + 2  # overlapping classes
    first = fit_softmax_probe(in_memory(x[:500], y[:500]), C, RegConfig(), CFG).probe
    moved = in_coordinates_of(first, *standardisation(in_memory(x[:1000], y[:1000])))
    assert not torch.allclose(moved.weight, first.weight)
    torch.testing.assert_close(moved(x), first(x), atol=1e-4, rtol=1e-4)

    result = online_codelength(
        in_memory(x, y), TARGETS, SOFTMAX, RegConfig(), CFG, fractions=(0.25, 0.5, 1.0)
    )
    assert result.all_converged
    order = torch.randperm(2000, generator=torch.Generator().manual_seed(0))
    xs, ys = x[order], y[order]
    cold = fit_softmax_probe(in_memory(xs[:1000], ys[:1000]), C, RegConfig(), CFG).probe
    expected = code_bits(cold, in_memory(xs[1000:], ys[1000:]))
    assert result.blocks[2].bits == pytest.approx(expected, rel=1e-3)


@pytest.mark.e2e
def test_a_job_reports_the_code_length_of_the_token_and_of_the_control_task(
    tmp_path: Path,
) -> None:
    run_cli(
        [
            *TINY,
            "data.token_budget=2000",
            "layers=subset",
            "layers.indices=[0]",
            "statistics.control_task=false",
            "statistics.mdl=true",
            "tracker=none",
            f"hydra.run.dir={tmp_path}",
        ],
        tmp_path,
    )
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    row = metrics["layers"][0]
    assert row["mdl_n_tokens"] == metrics["counts"]["n_train_tokens"] - row["mdl_n_dropped"]
    assert row["control_mdl_n_tokens"] == row["mdl_n_tokens"]
    # Layer 0 holds the token: its code is far below the uniform code over the classes.
    assert row["mdl_compression"] > 1.5 and row["control_mdl_compression"] > 0
    # Three seeded orders by default: the mean's compression lies within their range.
    low, high = row["mdl_compression_range"]
    assert row["mdl_n_orders"] == 3 and low <= row["mdl_compression"] <= high
    assert len(row["mdl_order_compressions"]) == len(row["control_mdl_order_compressions"]) == 3
