"""A probe kind is one registration: every probe of a job (identity, control task, random-init
model, lens probe, accuracy against k, the code length's blocks) is then fitted as that kind."""

from __future__ import annotations

import math
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from probe_sweep.errors import UserError
from probe_sweep.probes import kinds
from probe_sweep.probes.kinds import KINDS, ProbeKind, ProbeTask, check_penalty, register
from probe_sweep.probes.linear import (
    FitResult,
    LinearProbe,
    ProbeConfig,
    RegConfig,
    RegKind,
    standardisation,
)
from tests.test_pipeline import run

FITTED: list[str] = []  # the descriptions of the probes class_means fitted


def class_means(
    task: ProbeTask, reg: RegConfig, cfg: ProbeConfig, init: object, desc: str, *_: object
) -> FitResult:
    """Nearest class mean in the standardised inputs: logits -||x - m_c||^2 / 2 up to a
    constant; a class no row has gets bias -inf (closed form: no iterates to keep)."""
    FITTED.append(desc)
    rows = task.train.labelled()
    mean, scale = standardisation(rows)
    n_classes = task.n_classes
    sums = torch.zeros(n_classes, rows.d, dtype=torch.float64)
    counts = torch.zeros(n_classes, dtype=torch.float64)
    for x, y in rows.chunks(4096):
        xs = ((x.cpu() - mean.cpu()) / scale).double()
        sums.index_add_(0, y.cpu(), xs)
        counts += torch.bincount(y.cpu(), minlength=n_classes)
    means = sums / counts.clamp_min(1)[:, None]
    bias = -0.5 * means.pow(2).sum(1)
    bias[counts == 0] = -math.inf
    probe = LinearProbe(means.float(), bias.float(), mean, scale)
    return FitResult(probe, {"solver": "closed_form", "converged": True})


@pytest.fixture
def registered() -> Iterator[str]:
    register("class_means", ProbeKind(class_means, (RegKind.none,), "rows"))
    FITTED.clear()
    yield "class_means"
    KINDS.pop("class_means")


def test_a_registered_kind_is_every_probe_of_the_job(
    registered: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def no_softmax(*args: object, **kwargs: object) -> None:
        raise AssertionError("a softmax probe was fitted in a class_means job")

    monkeypatch.setattr(kinds, "fit_softmax_probe", no_softmax)
    metrics = run(tmp_path, extra=(f"probe.kind={registered}", "reg=none"))
    fitted = " | ".join(FITTED)
    for probe in ("layer_0", "random_init_layer_0", "control probe", "logit-lens probe", "mdl"):
        assert probe in fitted, probe
    assert "top-8" in fitted and "bottom-8" in fitted and "random-8" in fitted
    row = metrics["layers"][0]
    for field in ("top1", "control_top1", "random_init_top1", "lens_probe_top1", "mdl_compression"):
        assert 0 <= row[field] <= 1 or field == "mdl_compression", field
    # Layer 0 of a model with tied embeddings: class means of its token embeddings read it well.
    assert row["top1"] > 0.5
    assert metrics["probe"]["kind"] == registered
    assert {p["kind"] for p in metrics["statistics"]["accuracy_vs_k"]} == {
        "top",
        "bottom",
        "random",
    }


def test_a_kind_names_the_penalties_it_takes(registered: str) -> None:
    check_penalty(registered, RegKind.none)
    with pytest.raises(UserError, match="probe=class_means does not take reg=l2; use reg=none"):
        check_penalty(registered, RegKind.l2)
