"""The lenses side by side: the tuned-lens translator's objective, and the comparison end to end
on the tiny GPT-2."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from probe_sweep.baselines.tuned_lens import TranslatorObjective
from probe_sweep.logit_lens import lens_logits
from tests.conftest import TINY, run_cli


def objective(n: int = 40, d: int = 6, vocab: int = 11) -> TranslatorObjective:
    gen = torch.Generator().manual_seed(0)
    norm = torch.nn.LayerNorm(d).double().requires_grad_(False)
    hidden = torch.randn(n, d, generator=gen, dtype=torch.float64)
    final = torch.randn(n, d, generator=gen, dtype=torch.float64)
    unembedding = torch.randn(vocab, d, generator=gen, dtype=torch.float64)
    return TranslatorObjective(hidden, final, unembedding, norm, l2=1e-2, chunk=16)


def test_the_translator_starts_as_the_logit_lens_and_its_gradient_is_exact() -> None:
    obj = objective()
    zero = obj.zero()
    lens = lens_logits(obj.hidden, obj.unembedding, obj.final_norm, True)
    assert torch.allclose(obj.logits(zero, obj.hidden), lens)
    gen = torch.Generator().manual_seed(1)
    params = tuple(0.1 * torch.randn(p.shape, generator=gen, dtype=torch.float64) for p in zero)
    _, grads = obj(params)
    assert grads is not None
    for i in (0, 1):  # central differences on a few entries of the weight and the bias
        for index in [(0, 0), (2, 3)] if i == 0 else [(1,), (4,)]:
            step = torch.zeros_like(params[i])
            step[index] = 1e-6
            up = list(params)
            up[i] = params[i] + step
            down = list(params)
            down[i] = params[i] - step
            numeric = (obj(tuple(up), grad=False)[0] - obj(tuple(down), grad=False)[0]) / 2e-6
            assert grads[i][index].item() == pytest.approx(numeric, rel=1e-5, abs=1e-9)


@pytest.mark.e2e
def test_the_lens_comparison_runs_on_the_tiny_gpt2(tmp_path: Path) -> None:
    run_cli(
        [
            *TINY,
            "statistics.control_task=false",
            "statistics.logit_lens=false",
            "statistics.n_permutations=20",
            "statistics.lens_comparison=true",
            "statistics.lens_train_rows=256",
            "statistics.lens_rows=256",
            "tracker=none",
            f"hydra.run.dir={tmp_path}",
        ],
        tmp_path,
    )
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    table = metrics["layers"]
    assert [row["layer"] for row in table] == [0, 1, 2]
    for row in table:
        for name in ("logit_lens", "tuned_lens"):
            for which in ("", "_next"):
                value, (low, high) = row[f"{name}{which}_top1"], row[f"{name}{which}_top1_ci"]
                assert 0.0 <= low <= value <= high <= 1.0
    first, last = table[0], table[-1]
    # The translator is trained towards the final layer's distribution: closer to it than the
    # logit lens on held-out positions, and at the final layer the two lenses coincide.
    assert first["tuned_lens_kl"] < first["logit_lens_kl"]
    assert last["tuned_lens_top1"] == last["logit_lens_top1"] and last["tuned_lens_iterations"] == 0
