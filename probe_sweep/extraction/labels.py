"""The corpus's labels: which token each position is read out as (the one ``target.offset``
positions on), the class set, and the split into training, validation and test rows. Both the
basis (token counts of the training split) and the probes read them.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum

import numpy as np
import torch

from probe_sweep.extraction.data import TEST, TRAIN, VAL, Corpus


class ClassSet(Enum):
    """The classes a probe reads out: the token types seen in training, or the vocabulary."""

    seen = "seen"
    vocab = "vocab"


def class_index(classes: np.ndarray, vocab_size: int) -> np.ndarray:
    """Lookup from token id to class position; -1 for types outside ``classes``."""
    lookup = np.full(vocab_size, -1, dtype=np.int64)
    lookup[classes] = np.arange(len(classes))
    return lookup


def frequent_types(train_tokens: np.ndarray, mass: float = 0.5) -> np.ndarray:
    """The most frequent token types that together cover ``mass`` of the training tokens."""
    types, counts = np.unique(train_tokens, return_counts=True)
    order = np.argsort(-counts, kind="stable")
    covered = np.cumsum(counts[order]) / counts.sum()
    return types[order[: int(np.searchsorted(covered, mass)) + 1]]


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


def split_labels(
    corpus: Corpus,
    probe_classes: ClassSet,
    vocab_size: int,
    device: torch.device,
    offset: int = 0,
) -> Split:
    """Labels of every part (the token ``offset`` positions on); the classes are the types seen
    in training, or the vocabulary."""
    targets, inside = corpus.shifted_targets(offset)
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
