"""Stage 3: hidden states of every requested layer, computed once and cached on disk.

A cache entry is a directory ``<cache_dir>/<key>/`` holding ``layer_<l>.npy`` (rows = content
tokens in corpus order, columns = model width) and ``meta.json``. The key hashes everything the
numbers depend on. Entries are written under a temporary name and renamed when complete, so a
killed job never leaves a directory that looks finished.

Integrity: meta.json records an xxh3-128 checksum of every layer file, computed as it is written;
a reuse re-reads each file in chunks and compares. An entry whose damage is unambiguous (checksum
mismatch, truncated or missing layer file, unreadable or missing meta.json) is moved aside to
``<key>.corrupt-<UTC time>`` with one warning and recomputed. Hidden states must be finite, and
the disk must have room for the entry (checked from its shapes, space reserved per file with
``posix_fallocate``, written through file objects so a full disk is an OSError, never SIGBUS).
A reuse touches ``<entry>/last_used`` (for ``python -m probe_sweep.cache prune``).

Many jobs share one cache (a sweep over bases or probes needs the same hidden states): a file lock
per key (``.tmp-<key>.lock``, an flock that the kernel drops when its holder dies, also on NFS)
lets exactly one job compute an entry while the others wait and then reuse it. The lock holder
first removes temporary directories that killed jobs left for the same key.
"""

from __future__ import annotations

import errno
import hashlib
import io
import json
import logging
import os
import re
import shutil
import sys
import time
import uuid
from contextlib import ExitStack
from dataclasses import dataclass
from enum import Enum
from pathlib import Path
from typing import Any, BinaryIO, TextIO

import numpy as np
import torch
import xxhash
from filelock import FileLock, Timeout
from tqdm.auto import tqdm

from probe_sweep.data import Corpus
from probe_sweep.errors import UserError
from probe_sweep.model import LoadedModel, hidden_states

log = logging.getLogger(__name__)
META = "meta.json"
LAST_USED = "last_used"
CACHE_ENV = "PROBE_SWEEP_CACHE"
CHECKSUM = "xxh3_128"
CHUNK = 8 << 20  # bytes read at a time when verifying: memory stays flat whatever the entry size
KEY_RE = re.compile(r"^[0-9a-f]{20}$")
TMP_PREFIX = ".tmp-"
CORRUPT = ".corrupt-"
QUARANTINED_RE = re.compile(r"^(?P<key>[0-9a-f]{20})\.corrupt-(?P<stamp>\d{8}T\d{6}Z)(-\d+)?$")
STAMP = "%Y%m%dT%H%M%SZ"
FIX = "delete the directory to recompute (a run moves it aside as <key>.corrupt-<time> itself)"
SETTING = f"activations.cache_dir (env {CACHE_ENV})"


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


def default_cache_dir() -> str:
    """The cache dir a run uses when activations.cache_dir is not set (as conf/activations)."""
    return os.environ.get(CACHE_ENV) or ActivationsConfig.cache_dir


class CacheDamaged(UserError):
    """An entry whose files are unambiguously broken. ``keep``: worth quarantining (False for an
    entry that is merely of an older format, which is just replaced)."""

    def __init__(self, path: Path, problem: str, keep: bool = True) -> None:
        self.path, self.problem, self.keep = path, problem, keep
        super().__init__(f"{self.short}; {FIX}")

    @property
    def short(self) -> str:
        """The problem without the fix (for the warning when a run repairs it itself)."""
        return f"activation cache entry {self.path}: {self.problem}"


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
        return np.load(layer_file(self.path, layer), mmap_mode="r")


def cache_key(key_inputs: dict[str, Any]) -> str:
    blob = json.dumps(key_inputs, sort_keys=True, default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:20]


def layer_file(path: Path, layer: int) -> Path:
    return path / f"layer_{layer}.npy"


def entry_lock(root: Path, key: str) -> FileLock:
    """The lock held while an entry is computed (or removed by the cache CLI)."""
    return FileLock(str(root / f"{TMP_PREFIX}{key}.lock"))


def npy_header(shape: tuple[int, ...], dtype: np.dtype) -> bytes:
    """The .npy header np.load expects in front of a C-ordered array of ``shape``."""
    buf = io.BytesIO()
    d = {"descr": np.lib.format.dtype_to_descr(dtype), "fortran_order": False, "shape": shape}
    np.lib.format.write_array_header_1_0(buf, d)
    return buf.getvalue()


def entry_nbytes(meta: dict[str, Any]) -> int:
    """Bytes the layer files of an entry take, from its shapes alone."""
    shape, dtype = (meta["n_rows"], meta["d_model"]), np.dtype(meta["dtype"])
    per_layer = len(npy_header(shape, dtype)) + shape[0] * shape[1] * dtype.itemsize
    return per_layer * len(meta["layers"])


def file_checksum(path: Path) -> str:
    """``xxh3_128:<hex>`` of a file, read in CHUNK-sized pieces into one reused buffer."""
    digest = xxhash.xxh3_128()
    buf = bytearray(CHUNK)
    view = memoryview(buf)
    with open(path, "rb", buffering=0) as f:
        while n := f.readinto(buf):
            digest.update(view[:n])
    return f"{CHECKSUM}:{digest.hexdigest()}"


def read_meta(path: Path) -> dict[str, Any]:
    """An entry's meta.json, checked for the fields every reader needs."""
    meta_path = path / META
    if not meta_path.is_file():
        raise CacheDamaged(path, "has no meta.json (left by a crash or an interrupted copy)")
    try:
        meta = json.loads(meta_path.read_text(encoding="utf-8"))
    except PermissionError as exc:
        raise UserError(f"cannot read {meta_path}: {exc.strerror}; fix its permissions") from exc
    except (OSError, ValueError) as exc:
        raise CacheDamaged(path, f"meta.json is unreadable ({exc})") from exc
    fields = {"key_inputs": dict, "layers": list, "n_rows": int, "d_model": int, "dtype": str}
    bad = [
        k for k, t in fields.items() if not isinstance(meta, dict) or not isinstance(meta.get(k), t)
    ]
    if bad:
        raise CacheDamaged(path, f"meta.json lacks a valid {bad[0]!r}")
    if meta["dtype"] not in (d.value for d in CacheDtype):
        raise CacheDamaged(path, f"meta.json names an unknown dtype {meta['dtype']!r}")
    if cache_key(meta["key_inputs"]) != path.name or meta.get("key") != path.name:
        raise CacheDamaged(path, "meta.json does not hash to the entry's name")
    if not isinstance(meta.get("checksums"), dict):
        raise CacheDamaged(path, "has no checksums (written by an older probe_sweep)", keep=False)
    return meta


def _check_layer_file(path: Path, meta: dict[str, Any], layer: int) -> None:
    """Shape, dtype and length of one layer file against meta.json (reads the header only)."""
    file = layer_file(path, layer)
    shape, dtype = (meta["n_rows"], meta["d_model"]), np.dtype(meta["dtype"])
    try:
        with open(file, "rb") as f:
            version = np.lib.format.read_magic(f)
            read = np.lib.format.read_array_header_1_0
            if version != (1, 0):
                read = np.lib.format.read_array_header_2_0
            found_shape, fortran, found_dtype = read(f)
            offset, size = f.tell(), os.fstat(f.fileno()).st_size
    except FileNotFoundError as exc:
        raise CacheDamaged(path, f"{file.name} is missing") from exc
    except (ValueError, OSError, EOFError) as exc:
        raise CacheDamaged(path, f"{file.name} is not a readable .npy file ({exc})") from exc
    if found_shape != shape or found_dtype != dtype or fortran:
        raise CacheDamaged(
            path,
            f"layer {layer} has shape {found_shape} {found_dtype}, meta.json says {shape} "
            f"{dtype.name}",
        )
    expected = offset + shape[0] * shape[1] * dtype.itemsize
    if size != expected:
        raise CacheDamaged(path, f"{file.name} has {size} bytes, not {expected} (truncated?)")


def check_entry(path: Path, verify: bool = True) -> dict[str, Any]:
    """meta.json of a complete, undamaged entry; ``verify`` also compares every checksum.
    Raises CacheDamaged naming the first problem found."""
    meta = read_meta(path)
    for layer in meta["layers"]:
        _check_layer_file(path, meta, layer)
    if verify:
        for layer in meta["layers"]:
            file = layer_file(path, layer)
            try:
                found = file_checksum(file)
            except OSError as exc:
                raise CacheDamaged(path, f"{file.name} cannot be read ({exc})") from exc
            if found != meta["checksums"].get(file.name):
                raise CacheDamaged(path, f"{file.name} does not match its checksum (corrupted)")
    return meta


def open_store(path: Path, expected: dict[str, Any], verify: bool = True) -> ActivationStore | None:
    """Return the entry at ``path`` if complete, None if absent; CacheDamaged if damaged."""
    if not path.exists():
        return None
    meta = check_entry(path, verify)
    if meta["key_inputs"] != expected["key_inputs"]:
        raise UserError(f"activation cache {path} was written for other inputs; delete it")
    for name in ("layers", "n_rows", "d_model", "dtype"):
        if meta[name] != expected[name]:
            raise CacheDamaged(path, f"meta.json has {name}={meta[name]}, not {expected[name]}")
    return ActivationStore(path=path, meta=meta, reused=True)


def touch_last_used(path: Path) -> None:
    """Record a reuse (for prune) without rewriting meta.json; a read-only cache is fine."""
    try:
        (path / LAST_USED).touch()
    except OSError as exc:
        log.debug("Cannot record the use of %s: %s", path, exc)


def last_used(path: Path) -> float:
    """When an entry was last reused (or written), as a POSIX time."""
    for name in (LAST_USED, META):
        try:
            return (path / name).stat().st_mtime
        except OSError:
            continue
    return path.stat().st_mtime


def quarantine(path: Path) -> Path:
    """Move a damaged entry aside to ``<key>.corrupt-<UTC time>`` in the same directory."""
    stamp = time.strftime(STAMP, time.gmtime())
    target, n = path.with_name(f"{path.name}{CORRUPT}{stamp}"), 0
    while target.exists():
        n += 1
        target = path.with_name(f"{path.name}{CORRUPT}{stamp}-{n}")
    os.rename(path, target)
    return target


def discard(path: Path) -> None:
    """Delete an entry: renamed to a temporary name first, so no reader sees it half deleted."""
    trash = path.with_name(f"{TMP_PREFIX}{path.name}-removed-{os.getpid()}-{uuid.uuid4().hex[:8]}")
    os.rename(path, trash)
    shutil.rmtree(trash, ignore_errors=True)


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


def _is_terminal(stream: TextIO | None) -> bool:
    try:
        return bool(stream is not None and stream.isatty())
    except (AttributeError, ValueError):  # no isatty, or a closed stream
        return False


class ExtractionProgress:
    """Progress of an extraction: a tqdm bar when stderr is a terminal; otherwise (a SLURM or
    CI log, a pipe, a file) no bar, whose every redraw would be a line of its own, but one log
    line per tenth of the sequences with the throughput in tokens/s, so a log holds at most
    ``STEPS`` lines per extraction whatever its length."""

    STEPS = 10

    def __init__(
        self, n_seq: int, n_tokens: int, n_layers: int, stream: TextIO | None = None
    ) -> None:
        self.stream = sys.stderr if stream is None else stream
        self.n_seq, self.n_tokens, self.n_layers = n_seq, n_tokens, n_layers
        self.seq = self.tokens = self.reported = 0
        self.started = time.monotonic()
        self.bar: Any = None
        if _is_terminal(self.stream):
            self.bar = tqdm(total=n_seq, unit="seq", desc="extract activations", file=self.stream)
        else:
            log.info(
                "Extracting activations: %d sequences, %d tokens, %d layers",
                n_seq,
                n_tokens,
                n_layers,
            )

    def __enter__(self) -> ExtractionProgress:
        return self

    def __exit__(self, *exc: object) -> None:
        if self.bar is not None:
            self.bar.close()

    def update(self, n_seq: int, n_tokens: int) -> None:
        """``n_seq`` more sequences (``n_tokens`` content tokens) written to every layer."""
        self.seq += n_seq
        self.tokens += n_tokens
        if self.bar is not None:
            self.bar.update(n_seq)
            return
        step = self.seq * self.STEPS // max(self.n_seq, 1)
        if step <= self.reported:
            return
        self.reported = step
        elapsed = max(time.monotonic() - self.started, 1e-9)
        rate = self.tokens / elapsed
        left = max(self.n_tokens - self.tokens, 0) / rate if rate > 0 else 0.0
        log.info(
            "Extracting activations: %d/%d sequences (%d%%), %.0f tokens/s, %s",
            self.seq,
            self.n_seq,
            100 * self.seq // max(self.n_seq, 1),
            rate,
            f"about {_duration(left)} left"
            if self.seq < self.n_seq
            else f"done in {_duration(elapsed)}",
        )


def _duration(seconds: float) -> str:
    seconds = round(seconds)
    if seconds < 60:
        return f"{seconds} s"
    if seconds < 3600:
        return f"{seconds // 60} min {seconds % 60:02d} s"
    return f"{seconds // 3600} h {seconds % 3600 // 60:02d} min"
