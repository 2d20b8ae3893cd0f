"""Rows of a tensor already in memory, for tests of what walks ``Rows`` (production rows come
from the activation cache, ``fitting/inputs.py``)."""

from __future__ import annotations

import numpy as np
import torch

from probe_sweep.probes.rows import Rows


def in_memory(x: torch.Tensor, y: torch.Tensor) -> Rows:
    """Rows of a tensor already in memory; consecutive positions are read as views."""

    def read(positions: np.ndarray) -> torch.Tensor:
        if len(positions) and positions[-1] - positions[0] + 1 == len(positions):
            return x[int(positions[0]) : int(positions[-1]) + 1]
        return x[torch.from_numpy(positions).to(x.device)]

    return Rows(read, y, np.arange(len(x)), int(x.shape[1]))
