"""Stage 3: hidden states of every requested layer, computed once and cached on disk
(``cache/entry.py`` holds the entry format and its checks).

Hidden states must be finite, and the disk must have room for the entry (checked from its
shapes, space reserved per file with ``posix_fallocate``, written through file objects so a full
disk is an OSError, never SIGBUS).

Many jobs share one cache (a sweep over bases or probes needs the same hidden states): a file lock
per key (``.tmp-<key>.lock``, an flock that the kernel drops when its holder dies, also on NFS)
lets exactly one job compute an entry while the others wait and then reuse it. The lock holder
first removes temporary directories that killed jobs left for the same key.
"""

from __future__ import annotations

import errno
import json
import logging
import os
import shutil
import time
import uuid
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np
import torch
import xxhash
from filelock import Timeout

from probe_sweep.cache.entry import (
    META,
    TMP_PREFIX,
    ActivationStore,
    CacheDamaged,
    CacheDtype,
    cache_key,
    discard,
    entry_lock,
    entry_nbytes,
    layer_file,
    npy_header,
    open_store,
    quarantine,
    touch_last_used,
)
from probe_sweep.errors import UserError
from probe_sweep.extraction.data import Corpus
from probe_sweep.extraction.model import LoadedModel, hidden_states
from probe_sweep.fingerprints import CHECKSUM
from probe_sweep.progress import ExtractionProgress

log = logging.getLogger(__name__)
CACHE_ENV = "PROBE_SWEEP_CACHE"
SETTING = f"activations.cache_dir (env {CACHE_ENV})"


@dataclass
class ActivationsConfig:
    """Where and how hidden states are stored. float16 halves disk and read time; probe
    accuracy is unaffected at the precision a linear read-out needs (values stay < 65504)."""

    cache_dir: str = "~/.cache/probe_sweep/activations"
    dtype: CacheDtype = CacheDtype.float16
    batch_size: int = 16


def default_cache_dir() -> str:
    """The cache dir a run uses when activations.cache_dir is not set (as conf/activations)."""
    return os.environ.get(CACHE_ENV) or ActivationsConfig.cache_dir


def _reuse(
    final: Path, meta: dict[str, Any], repair: bool, note: str = ""
) -> ActivationStore | None:
    """The verified entry, or None. With ``repair`` (lock held) a damaged entry is set aside."""
    try:
        store = open_store(final, meta)
    except CacheDamaged as damage:
        if not repair:
            return None
        try:
            if damage.keep:
                aside = quarantine(final)
                log.warning("%s; moved it to %s and recomputing", damage.short, aside)
            else:
                discard(final)
                log.warning("%s; recomputing it", damage.short)
        except OSError as exc:
            raise UserError(f"{damage} (moving it aside failed: {exc})") from exc
        return None
    if store is not None:
        touch_last_used(final)
        log.info("Reusing cached activations %s%s", final, note)
    return store


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
    meta: dict[str, Any] = {
        "key": key,
        "key_inputs": key_inputs,
        "layers": sorted(layers),
        "n_rows": int(corpus.input_ids.shape[0] * n_content),
        "d_model": model.info.d_model,
        "dtype": dtype.name,
        "model": model.info.name,
        "corpus": corpus.description,
    }
    existing = _reuse(final, meta, repair=False)
    if existing is not None:
        return existing

    try:
        root.mkdir(parents=True, exist_ok=True)
        lock = entry_lock(root, key)
        try:
            lock.acquire(timeout=0)
        except Timeout:
            log.info("Waiting for another job to finish extracting activations %s", final)
            lock.acquire()
    except OSError as exc:
        raise UserError(f"cannot use the activation cache {root}: {exc}; set {SETTING}") from exc
    try:
        existing = _reuse(final, meta, repair=True, note=" (computed by another job)")
        if existing is not None:
            return existing
        for stale in root.glob(f"{TMP_PREFIX}{key}-*"):
            log.info("Removing %s, left by a job that died mid-extraction", stale)
            shutil.rmtree(stale, ignore_errors=True)
        check_space(root, meta)
        _write_entry(model, corpus, meta, final, cfg.batch_size, device)
    finally:
        lock.release()
    log.info("Cached activations for %d layers at %s", len(layers), final)
    store = open_store(final, meta, verify=False)  # checksums were taken from these very bytes
    assert store is not None
    store.reused = False
    return store


def _size(n: int) -> str:
    return f"{n / 2**20:.1f} MiB ({n} bytes)"


def check_space(root: Path, meta: dict[str, Any]) -> None:
    """Refuse before any work when the cache's filesystem cannot hold the entry."""
    needed = entry_nbytes(meta) + len(json.dumps(meta)) + 4096
    free = shutil.disk_usage(root).free
    if free < needed:
        raise UserError(
            f"activation cache entry {meta['key']} needs {_size(needed)} but {root} has only "
            f"{_size(free)} free; free some space (python -m probe_sweep.cache prune) or point "
            f"{SETTING} at a larger disk"
        )


def _write_entry(
    model: LoadedModel,
    corpus: Corpus,
    meta: dict[str, Any],
    final: Path,
    batch_size: int,
    device: torch.device,
) -> None:
    """Write the entry under a temporary name and rename it; the temporary dir never survives a
    failure, and a full disk or other OSError becomes one UserError."""
    root, key = final.parent, final.name
    tmp = root / f"{TMP_PREFIX}{key}-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    try:
        tmp.mkdir()
        meta["checksums"] = _write_layers(model, corpus, meta, tmp, batch_size, device)
        meta["created"] = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
        (tmp / META).write_text(json.dumps(meta, indent=2), encoding="utf-8")
        os.rename(tmp, final)
    except OSError as exc:
        if exc.errno in (errno.ENOSPC, errno.EDQUOT):
            raise UserError(
                f"the disk of the activation cache {root} filled up while writing entry {key} "
                f"({_size(entry_nbytes(meta))}); nothing was cached. Free space there or point "
                f"{SETTING} at a larger disk"
            ) from exc
        raise UserError(
            f"could not write activation cache entry {key} in {root}: {exc}; nothing was cached. "
            f"Check that {SETTING} is a writable directory"
        ) from exc
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _reserve(f: BinaryIO, nbytes: int) -> None:
    """Allocate the file's blocks now: a full disk fails here, before hours of compute."""
    try:
        os.posix_fallocate(f.fileno(), 0, nbytes)
    except OSError as exc:
        if exc.errno not in (errno.EOPNOTSUPP, errno.EINVAL, errno.ENOSYS):
            raise
    except AttributeError:  # no posix_fallocate on this platform: writes still raise OSError
        pass


def _finite(rows: np.ndarray, stored: np.ndarray, layer: int, start: int, n_seq: int) -> None:
    """Refuse NaN/inf before it reaches the cache (a probe on it would be silently wrong)."""
    if np.isfinite(stored).all():
        return
    where = f"layer {layer}, sequences {start}..{start + n_seq - 1}"
    if np.isfinite(rows).all():
        raise UserError(
            f"hidden states at {where} reach {np.abs(rows).max():.3g}, beyond {stored.dtype}'s "
            "range; nothing was cached. Set activations.dtype=float32"
        )
    raise UserError(
        f"the model produced NaN or inf hidden states at {where}; nothing was cached. Check the "
        "model's weights (model.path / model.revision) and its dtype"
    )


def _write_layers(
    model: LoadedModel,
    corpus: Corpus,
    meta: dict[str, Any],
    out: Path,
    batch_size: int,
    device: torch.device,
) -> dict[str, str]:
    """Stream every layer into its .npy through a file object; return each file's checksum."""
    layers = meta["layers"]
    shape, dtype = (meta["n_rows"], meta["d_model"]), np.dtype(meta["dtype"])
    header = npy_header(shape, dtype)
    files: dict[int, BinaryIO] = {}
    digests = {layer: xxhash.xxh3_128(header) for layer in layers}
    content = torch.from_numpy(corpus.content).to(device)
    n_seq = corpus.input_ids.shape[0]
    row = 0
    with ExitStack() as stack:
        for layer in layers:
            files[layer] = stack.enter_context(open(layer_file(out, layer), "wb"))
            _reserve(files[layer], len(header) + shape[0] * shape[1] * dtype.itemsize)
            files[layer].write(header)
        with ExtractionProgress(n_seq, shape[0], len(layers)) as bar:
            for start in range(0, n_seq, batch_size):
                ids = torch.from_numpy(corpus.input_ids[start : start + batch_size]).to(device)
                states = hidden_states(model, ids, layers)
                n = ids.shape[0] * int(content.sum())
                for layer, state in zip(layers, states, strict=True):
                    rows = state[:, content].reshape(n, -1).float().cpu().numpy()
                    with np.errstate(over="ignore"):  # overflow is refused just below
                        stored = np.ascontiguousarray(rows.astype(dtype))
                    _finite(rows, stored, layer, start, ids.shape[0])
                    data = memoryview(stored).cast("B")
                    files[layer].write(data)
                    digests[layer].update(data)
                row += n
                bar.update(ids.shape[0], n)
    assert row == shape[0], (row, shape)
    return {layer_file(out, i).name: f"{CHECKSUM}:{digests[i].hexdigest()}" for i in layers}
