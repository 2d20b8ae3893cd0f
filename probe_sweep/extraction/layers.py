"""Which layers are probed.

Layer 0 is the embedding output; layer l (1..n_layers) the output of block l.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import Enum

from probe_sweep.errors import UserError


class LayerMode(Enum):
    each = "each"
    pooled = "pooled"
    subset = "subset"


@dataclass
class LayersConfig:
    """``each``: one probe per layer. ``pooled``: one probe on rows drawn in equal shares from
    all layers, or from ``indices`` when given, scored per layer. ``subset``: one probe per
    layer in ``indices``."""

    mode: LayerMode = LayerMode.each
    indices: list[int] = field(default_factory=list)


def resolve_layers(cfg: LayersConfig, n_layers: int) -> list[int]:
    """The hidden-state indices to extract (0..n_layers), checked against the model."""
    if cfg.mode is LayerMode.each and cfg.indices:
        raise UserError(
            "layers.indices is only read by layers=subset and layers=pooled; "
            "use layers=subset 'layers.indices=[...]' to probe chosen layers"
        )
    if not cfg.indices and cfg.mode is not LayerMode.subset:
        return list(range(n_layers + 1))
    if not cfg.indices:
        raise UserError("layers=subset needs layers.indices=[...], e.g. layers.indices=[0,3,6]")
    bad = [i for i in cfg.indices if not 0 <= i <= n_layers]
    if bad:
        raise UserError(
            f"layers.indices {bad} out of range: this model has layers 0..{n_layers} "
            "(0 = embedding output)"
        )
    return sorted(set(cfg.indices))
