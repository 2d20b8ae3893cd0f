"""The activation cache's entry format and its checks: what a complete entry is, and whether
one on disk is what it claims to be.

A cache entry is a directory ``<cache_dir>/<key>/`` holding ``layer_<l>.npy`` (rows = content
tokens in corpus order, columns = model width) and ``meta.json``. The key hashes everything the
numbers depend on. Entries are written under a temporary name and renamed when complete, so a
killed job never leaves a directory that looks finished.

Integrity: meta.json records an xxh3-128 checksum of every layer file, computed as it is written;
a reuse re-reads each file in chunks and compares. An entry whose damage is unambiguous (checksum
mismatch, truncated or missing layer file, unreadable or missing meta.json) is moved aside to
``<key>.corrupt-<UTC time>`` with one warning and recomputed. A reuse touches
``<entry>/last_used`` (for ``python -m probe_sweep.cache prune``).
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import os
import re
import shutil
import time
import uuid
from dataclasses import dataclass, field
from enum import Enum
from pathlib import Path
from typing import Any

import numpy as np
from filelock import FileLock

from probe_sweep.errors import UserError
from probe_sweep.fingerprints import file_checksum

log = logging.getLogger(__name__)
META = "meta.json"
LAST_USED = "last_used"
KEY_RE = re.compile(r"^[0-9a-f]{20}$")
TMP_PREFIX = ".tmp-"
CORRUPT = ".corrupt-"
QUARANTINED_RE = re.compile(r"^(?P<key>[0-9a-f]{20})\.corrupt-(?P<stamp>\d{8}T\d{6}Z)(-\d+)?$")
STAMP = "%Y%m%dT%H%M%SZ"
FIX = "delete the directory to recompute (a run moves it aside as <key>.corrupt-<time> itself)"


class CacheDtype(Enum):
    float16 = "float16"
    float32 = "float32"


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
    """A complete cache entry, every layer memory-mapped (nothing read yet) when it is opened:
    an entry removed meanwhile (``cache remove``, ``prune``) stays readable to the job that
    opened it, as the kernel keeps an unlinked file while it is mapped."""

    path: Path
    meta: dict[str, Any]
    reused: bool
    maps: dict[int, np.ndarray] = field(default_factory=dict, repr=False)

    def __post_init__(self) -> None:
        self.maps = {
            layer: np.load(layer_file(self.path, layer), mmap_mode="r")
            for layer in self.meta["layers"]
        }

    @property
    def layers(self) -> list[int]:
        return list(self.meta["layers"])

    def layer(self, layer: int) -> np.ndarray:
        return self.maps[layer]


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
    try:
        return ActivationStore(path=path, meta=meta, reused=True)
    except FileNotFoundError:  # removed since it was checked: as good as absent
        return None


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
    """Delete an entry: renamed to a temporary name first, so no reader sees it half deleted
    (an entry that is a symbolic link: the link only)."""
    if path.is_symlink():
        path.unlink()
        return
    trash = path.with_name(f"{TMP_PREFIX}{path.name}-removed-{os.getpid()}-{uuid.uuid4().hex[:8]}")
    os.rename(path, trash)
    shutil.rmtree(trash, ignore_errors=True)
