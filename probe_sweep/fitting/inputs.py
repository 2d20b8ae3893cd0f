"""Probe inputs: the corpus split into labelled parts, and the cached hidden states of a part's
rows at given layers, in basis coordinates, streamed from the activation cache as ``Rows``."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from probe_sweep.bases import Basis
from probe_sweep.cache.entry import ActivationStore
from probe_sweep.extraction.data import TEST, TRAIN, VAL, Corpus
from probe_sweep.probes.linear import ClassSet, class_index, frequent_types
from probe_sweep.probes.rows import Rows


@dataclass
class TargetConfig:
    """Which token the probe reads out: the one ``offset`` content positions from the hidden
    state's own (0: the token there; -1: the one before it; +1: the next token, the logit
    lens's question). Positions whose target falls outside their sequence are left out."""

    offset: int = 0


@dataclass
class Split:
    """Row indices, labels (class positions, -1 outside the class set) and the frequent-type
    mask of each part (TRAIN, VAL, TEST) of the corpus."""

    rows: dict[int, np.ndarray]
    targets: np.ndarray  # token id of every corpus position
    classes: np.ndarray  # token id of every class
    labels: dict[int, torch.Tensor]
    frequent: dict[int, torch.Tensor]
    sequences: dict[int, np.ndarray]  # sequence id of every row: intervals resample these
    n_train_types: int
    n_frequent_types: int
    n_outside: int  # positions left out: their target lies outside the sequence


def shifted_targets(grid: np.ndarray, offset: int) -> tuple[np.ndarray, np.ndarray]:
    """The token ``offset`` positions on from each position of each sequence (n_seq, n),
    flattened, and where there is one (``|offset| < n``, checked with the config)."""
    n = grid.shape[1]
    shifted, inside = np.zeros_like(grid), np.zeros(grid.shape, dtype=bool)
    if offset >= 0:
        shifted[:, : n - offset], inside[:, : n - offset] = grid[:, offset:], True
    else:
        shifted[:, -offset:], inside[:, -offset:] = grid[:, : n + offset], True
    return shifted.reshape(-1), inside.reshape(-1)


def split_labels(
    corpus: Corpus,
    probe_classes: ClassSet,
    vocab_size: int,
    device: torch.device,
    offset: int = 0,
) -> Split:
    """Labels of every part (the token ``offset`` positions on); the classes are the types seen
    in training, or the vocabulary."""
    targets, inside = shifted_targets(corpus.targets, offset)
    every = {part: corpus.rows(part) for part in (TRAIN, VAL, TEST)}
    rows = {part: r[inside[r]] for part, r in every.items()}
    train_tokens = targets[rows[TRAIN]]
    seen = np.unique(train_tokens)
    classes = seen if probe_classes is ClassSet.seen else np.arange(vocab_size)
    lookup = class_index(classes, vocab_size)
    frequent_set = frequent_types(train_tokens)

    def on_device(values: np.ndarray) -> torch.Tensor:
        return torch.from_numpy(values).to(device)

    return Split(
        rows=rows,
        targets=targets,
        classes=classes,
        labels={p: on_device(lookup[targets[r]]) for p, r in rows.items()},
        frequent={p: on_device(np.isin(targets[r], frequent_set)) for p, r in rows.items()},
        sequences={p: r // corpus.targets.shape[1] for p, r in rows.items()},
        n_train_types=len(seen),
        n_frequent_types=len(frequent_set),
        n_outside=int(sum(len(every[p]) - len(rows[p]) for p in every)),
    )


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
