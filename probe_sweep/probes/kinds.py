"""The probe kinds, a registry like the bases': what each fits, the penalties it takes, and how
the statistics compare it with W_E. Every probe of a job (identity, control task, random-init
model, lens probe, accuracy against k, the code length's blocks) is fitted through its kind's
``fit``, so a baseline is always the same kind of probe as what it is compared with.

To add a kind: its fit function (here or in a module of its own), one ``register`` call below,
and ``conf/probe/<name>.yaml``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from probe_sweep.errors import UserError
from probe_sweep.probes.linear import (
    FitResult,
    LinearProbe,
    ProbeConfig,
    RegConfig,
    RegKind,
    fit_ridge_probe,
    fit_softmax_probe,
)
from probe_sweep.probes.rows import Rows


@dataclass(frozen=True)
class ProbeTask:
    """What one probe is fitted to: training rows labelled with class positions, the classes'
    target vectors (C, e) (W_E rows of the tokens they stand for; a kind that only needs their
    number ignores them), and validation rows where the kind scores a path on them."""

    train: Rows
    targets: torch.Tensor
    val: Rows | None = None

    @property
    def n_classes(self) -> int:
        return len(self.targets)


OnStep = Callable[[LinearProbe], None]
Fit = Callable[
    [ProbeTask, RegConfig, ProbeConfig, LinearProbe | None, str, OnStep | None], FitResult
]


@dataclass(frozen=True)
class ProbeKind:
    """``fit(task, reg, cfg, init, desc, on_step)``: the probe at the configured strength;
    ``init`` is the previous fit of the same shape (a warm start a kind may ignore);
    ``on_step``, when given, sees the probe at each iterate of an iterative fit (an interrupted
    fit goes on from the last one kept). ``penalties``: the
    ``reg`` kinds its objective takes. ``compared_as``: what the statistics set against W_E,
    its weight rows in W_E's space ("rows") or its map into W_E's space ("map")."""

    fit: Fit
    penalties: tuple[RegKind, ...]
    compared_as: str


KINDS: dict[str, ProbeKind] = {}


def register(name: str, kind: ProbeKind) -> None:
    KINDS[name] = kind


def probe_kind(name: str) -> ProbeKind:
    if name not in KINDS:
        raise UserError(f"probe.kind={name!r} is not a probe kind; use one of {', '.join(KINDS)}")
    return KINDS[name]


def check_penalty(name: str, reg: RegKind) -> None:
    """One line when the kind's objective does not take this penalty."""
    allowed = probe_kind(name).penalties
    if reg not in allowed:
        names = " or ".join(f"reg={r.value}" for r in allowed)
        raise UserError(f"probe={name} does not take reg={reg.value}; use {names}")


def _softmax(
    task: ProbeTask,
    reg: RegConfig,
    cfg: ProbeConfig,
    init: LinearProbe | None,
    desc: str,
    on_step: OnStep | None = None,
) -> FitResult:
    return fit_softmax_probe(task.train, task.n_classes, reg, cfg, init, desc, on_step)


def _ridge(task: ProbeTask, reg: RegConfig, cfg: ProbeConfig, *_: object) -> FitResult:
    """Closed form: no warm start to use, no iterates to keep."""
    return fit_ridge_probe(task.train, task.targets, reg, task.val, cfg.path_strengths)


register("softmax", ProbeKind(_softmax, (RegKind.l2, RegKind.l1, RegKind.none), "rows"))
register("ridge", ProbeKind(_ridge, (RegKind.l2, RegKind.none), "map"))
