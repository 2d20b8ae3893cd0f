"""Probe inputs: the cached hidden states of a part's rows at given layers, in basis
coordinates, streamed from the activation cache as ``Rows``."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from probe_sweep.bases import Basis
from probe_sweep.cache.entry import ActivationStore
from probe_sweep.extraction.labels import Split
from probe_sweep.probes.rows import Rows


def read_rows(store: ActivationStore, layer: int, rows: np.ndarray) -> torch.Tensor:
    """Cached hidden states of ``rows`` at ``layer``, natural coordinates, float32, on the CPU."""
    return torch.from_numpy(np.asarray(store.layer(layer)[rows], np.float32))


@dataclass
class Inputs:
    """The hidden states of a part's rows at given layers, read from the cache chunk by chunk
    (page-locked and copied asynchronously when the device is a GPU)."""

    store: ActivationStore
    basis: Basis
    split: Split
    device: torch.device

    def natural(self, part: int, layer_of_row: np.ndarray | int) -> Rows:
        """Rows of ``part`` in natural coordinates; ``layer_of_row``: one layer, or one per
        row (the pooled probe)."""
        positions = self.split.rows[part]
        row_layers = np.broadcast_to(np.asarray(layer_of_row), positions.shape)
        d, pin = int(self.store.meta["d_model"]), self.device.type == "cuda"

        def read(index: np.ndarray) -> torch.Tensor:
            out = torch.empty(len(index), d, dtype=torch.float32, pin_memory=pin)
            layers = row_layers[index]
            for layer in np.unique(layers):
                pick = np.flatnonzero(layers == layer)
                rows = read_rows(self.store, int(layer), positions[index[pick]])
                out[torch.from_numpy(pick)] = rows
            return out.to(self.device, non_blocking=True)

        labels = self.split.labels[part]
        return Rows(read, labels, np.arange(len(positions)), d, read_ahead=True)

    def __call__(self, part: int, layer_of_row: np.ndarray | int) -> Rows:
        """Rows of ``part`` in basis coordinates."""
        assert self.basis.encoder is not None
        width = int(self.basis.encoder.shape[1])
        return self.natural(part, layer_of_row).map(self.basis.coordinates, width)
