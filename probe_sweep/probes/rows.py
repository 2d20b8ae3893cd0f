"""Probe inputs as rows read chunk by chunk, so that no layer is ever held in memory whole.

A ``Rows`` is a set of labelled rows and a function that reads the inputs of any of them. The
solver, the scores and the ridge probe walk it in chunks; memory is bounded by the chunk, not by
the token count. Rows from the activation cache are read from its memory maps one chunk ahead,
in a background thread, while the current chunk is computed on; rows in memory are sliced.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np
import torch

Chunk = tuple[torch.Tensor, torch.Tensor]  # inputs (rows x d, float32), labels (rows,)


@dataclass(frozen=True)
class Rows:
    """Rows ``index`` (positions in ``read``'s domain) with their ``labels`` (class positions,
    -1 outside the class set); ``read(positions)`` returns their inputs (``d`` wide) on the
    device the labels are on."""

    read: Callable[[np.ndarray], torch.Tensor]
    labels: torch.Tensor
    index: np.ndarray
    d: int
    read_ahead: bool = False

    def __len__(self) -> int:
        return len(self.index)

    def chunks(self, size: int) -> Iterator[Chunk]:
        """Inputs and labels of consecutive chunks of at most ``size`` rows, in order."""
        bounds = [(start, min(start + size, len(self))) for start in range(0, len(self), size)]
        if not self.read_ahead:
            for start, stop in bounds:
                yield self.read(self.index[start:stop]), self.labels[start:stop]
            return
        with ThreadPoolExecutor(1, thread_name_prefix="read-ahead") as ahead:
            pending = [
                ahead.submit(self.read, self.index[start:stop]) for start, stop in bounds[:1]
            ]
            for i, (start, stop) in enumerate(bounds):
                if i + 1 < len(bounds):
                    pending.append(ahead.submit(self.read, self.index[slice(*bounds[i + 1])]))
                yield pending.pop(0).result(), self.labels[start:stop]

    def select(self, keep: torch.Tensor | np.ndarray) -> Rows:
        """The rows where ``keep`` (a boolean mask over these rows) is true."""
        mask = keep.cpu().numpy() if isinstance(keep, torch.Tensor) else keep
        labels = self.labels[torch.from_numpy(mask).to(self.labels.device)]
        return Rows(self.read, labels, self.index[mask], self.d, self.read_ahead)

    def head(self, n: int) -> Rows:
        """The first ``n`` rows."""
        return Rows(self.read, self.labels[:n], self.index[:n], self.d, self.read_ahead)

    def labelled(self) -> Rows:
        """The rows whose label is a class (a cross-entropy needs one); no copy when all are."""
        keep = self.labels >= 0
        return self if bool(keep.all()) else self.select(keep)

    def with_labels(self, labels: torch.Tensor) -> Rows:
        """The same inputs with other labels (a control task), one per row."""
        return Rows(self.read, labels, self.index, self.d, self.read_ahead)

    def map(self, transform: Callable[[torch.Tensor], torch.Tensor], d: int) -> Rows:
        """The inputs passed through ``transform`` (to ``d`` columns), chunk by chunk."""
        read = self.read
        return Rows(
            lambda positions: transform(read(positions)),
            self.labels,
            self.index,
            d,
            self.read_ahead,
        )

    def gather(self) -> torch.Tensor:
        """All inputs at once: only for rows known to be few (tests, held-out subsets)."""
        return self.read(self.index)
