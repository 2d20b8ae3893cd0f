"""Stage 3: hidden states of every requested layer, computed once and cached on disk.

A cache entry is a directory ``<cache_dir>/<key>/`` holding ``layer_<l>.npy`` (rows = content
tokens in corpus order, columns = model width) and ``meta.json``. The key hashes everything the
numbers depend on. Entries are written under a temporary name and renamed when complete, so a
killed job never leaves a directory that looks finished.

Many jobs share one cache (a sweep over bases or probes needs the same hidden states): a file lock
per key (``.tmp-<key>.lock``, an flock that the kernel drops when its holder dies, also on NFS)
lets exactly one job compute an entry while the others wait and then reuse it. The lock holder
first removes temporary directories that killed jobs left for the same key.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import uuid
from dataclasses import dataclass
from enum import Enum
from pathlib import Path
from typing import Any

import numpy as np
import torch
from filelock import FileLock, Timeout
from tqdm.auto import tqdm

from probe_sweep.data import Corpus
from probe_sweep.errors import UserError
from probe_sweep.model import LoadedModel, hidden_states

log = logging.getLogger(__name__)
META = "meta.json"


class CacheDtype(Enum):
    float16 = "float16"
    float32 = "float32"


@dataclass
class ActivationsConfig:
    """Where and how hidden states are stored. float16 halves disk and read time; probe
    accuracy is unaffected at the precision a linear read-out needs (values stay < 65504)."""

    cache_dir: str = "~/.cache/probe_sweep/activations"
    dtype: CacheDtype = CacheDtype.float16
    batch_size: int = 16


@dataclass
class ActivationStore:
    """A complete cache entry; ``layer(l)`` memory-maps one layer without reading it all."""

    path: Path
    meta: dict[str, Any]
    reused: bool

    @property
    def layers(self) -> list[int]:
        return list(self.meta["layers"])

    def layer(self, layer: int) -> np.ndarray:
        return np.load(self.path / f"layer_{layer}.npy", mmap_mode="r")


def cache_key(key_inputs: dict[str, Any]) -> str:
    blob = json.dumps(key_inputs, sort_keys=True, default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:20]


def open_store(path: Path, expected: dict[str, Any]) -> ActivationStore | None:
    """Return the entry at ``path`` if complete, None if absent; refuse one that mismatches."""
    meta_path = path / META
    if not meta_path.is_file():
        return None
    meta = json.loads(meta_path.read_text())
    if meta["key_inputs"] != expected["key_inputs"]:
        raise UserError(f"activation cache {path} was written for other inputs; delete it")
    shape = (meta["n_rows"], meta["d_model"])
    for layer in meta["layers"]:
        array = np.load(path / f"layer_{layer}.npy", mmap_mode="r")
        if array.shape != tuple(shape) or array.dtype != np.dtype(meta["dtype"]):
            raise UserError(
                f"activation cache {path} layer {layer} has shape {array.shape} {array.dtype}, "
                f"meta.json says {tuple(shape)} {meta['dtype']}; delete the directory to recompute"
            )
    return ActivationStore(path=path, meta=meta, reused=True)


def extract(
    model: LoadedModel,
    corpus: Corpus,
    layers: list[int],
    cfg: ActivationsConfig,
    device: torch.device,
) -> ActivationStore:
    """Reuse the cache entry for these inputs, or compute it (batched, inference mode)."""
    dtype = np.dtype(cfg.dtype.value)
    key_inputs = {
        "model": model.fingerprint,
        "corpus_sha256": corpus.fingerprint(),
        "seq_len": int(corpus.input_ids.shape[1]),
        "content_positions": np.flatnonzero(corpus.content).tolist(),
        "layers": sorted(layers),
        "dtype": dtype.name,
    }
    key = cache_key(key_inputs)
    root = Path(cfg.cache_dir).expanduser()
    final = root / key
    n_content = int(corpus.content.sum())
    meta = {
        "key": key,
        "key_inputs": key_inputs,
        "layers": sorted(layers),
        "n_rows": int(corpus.input_ids.shape[0] * n_content),
        "d_model": model.info.d_model,
        "dtype": dtype.name,
    }
    existing = open_store(final, meta)
    if existing is not None:
        log.info("Reusing cached activations %s", final)
        return existing

    root.mkdir(parents=True, exist_ok=True)
    lock = FileLock(str(root / f".tmp-{key}.lock"))
    try:
        lock.acquire(timeout=0)
    except Timeout:
        log.info("Waiting for another job to finish extracting activations %s", final)
        lock.acquire()
    try:
        existing = open_store(final, meta)
        if existing is not None:
            log.info("Reusing cached activations %s (computed by another job)", final)
            return existing
        for stale in root.glob(f".tmp-{key}-*"):
            log.info("Removing %s, left by a job that died mid-extraction", stale)
            shutil.rmtree(stale, ignore_errors=True)
        tmp = root / f".tmp-{key}-{os.getpid()}-{uuid.uuid4().hex[:8]}"
        tmp.mkdir()
        try:
            _write_layers(model, corpus, meta, tmp, cfg.batch_size, device)
            (tmp / META).write_text(json.dumps(meta, indent=2))
            os.rename(tmp, final)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    finally:
        lock.release()
    log.info("Cached activations for %d layers at %s", len(layers), final)
    store = open_store(final, meta)
    assert store is not None
    store.reused = False
    return store


def _write_layers(
    model: LoadedModel,
    corpus: Corpus,
    meta: dict[str, Any],
    out: Path,
    batch_size: int,
    device: torch.device,
) -> None:
    layers = meta["layers"]
    shape = (meta["n_rows"], meta["d_model"])
    arrays = {
        layer: np.lib.format.open_memmap(
            out / f"layer_{layer}.npy", mode="w+", dtype=meta["dtype"], shape=shape
        )
        for layer in layers
    }
    content = torch.from_numpy(corpus.content).to(device)
    n_seq = corpus.input_ids.shape[0]
    row = 0
    with tqdm(total=n_seq, unit="seq", desc="extract activations") as bar:
        for start in range(0, n_seq, batch_size):
            ids = torch.from_numpy(corpus.input_ids[start : start + batch_size]).to(device)
            states = hidden_states(model, ids, layers)
            n = ids.shape[0] * int(content.sum())
            for layer, state in zip(layers, states, strict=True):
                rows = state[:, content].reshape(n, -1).float().cpu().numpy()
                arrays[layer][row : row + n] = rows
            row += n
            bar.update(ids.shape[0])
    for array in arrays.values():
        array.flush()
