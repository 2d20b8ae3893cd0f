"""The probes an unfinished job has fitted, saved one file each under ``<job dir>/.fits`` so a
requeued, preempted or killed job resumes after the last probe it finished, and the last iterate
of the fit it was in (``.fits/unfinished``), so that fit goes on from there.

Each fit is a dataclass saved as safetensors: tensors and module state dicts as tensors, every
other field as JSON in the file's metadata. Nothing is ever unpickled, so a file planted in a job
dir cannot run code; a file that does not read back as the expected type is refused.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import time
import typing
from collections.abc import Callable
from enum import Enum
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
import torch
import xxhash
from safetensors import safe_open
from safetensors.torch import save

from probe_sweep.files import write_bytes
from probe_sweep.fingerprints import update_with_tensors
from probe_sweep.jobs.jobdir import FIT_SUFFIX, FITS, UNFINISHED, discard_fits
from probe_sweep.probes.linear import FitResult, LinearProbe

log = logging.getLogger(__name__)
T = TypeVar("T")
MAX_FIT_BYTES = 8 << 30  # a GPT-2-XL-sized probe over the whole vocabulary takes 0.3 GiB
STAMP_BYTES = 64
KEEP_EVERY_S = 120.0  # an interrupted fit loses at most this much of its progress (and a step)


class Unfinished:
    """Where an earlier attempt at one fit left off. ``start``: the probe at the last iterate it
    kept (None when there is none); ``keep``: an ``on_step`` for the fit that keeps its current
    iterate, at most once every ``every_s`` seconds. The file is verified like a finished fit's
    and refused with one warning; it only ever serves as a warm start, so a fit that goes on
    from it is certified like any other."""

    def __init__(self, path: Path, start: LinearProbe | None, every_s: float) -> None:
        self.path, self.start, self.every_s = path, start, every_s
        self.kept_at = time.monotonic()

    def warm_start(self, init: LinearProbe | None) -> LinearProbe | None:
        """The kept iterate where there is one, else ``init``."""
        return init if self.start is None else self.start

    def keep(self, probe: LinearProbe) -> None:
        now = time.monotonic()
        if now - self.kept_at < self.every_s:
            return
        self.kept_at = now
        try:
            save_fit(self.path, FitResult(probe))
        except Exception as exc:  # the fit goes on; only a resume would have used the file
            log.warning("Could not keep the iterate of %s (%s)", self.path.stem, _brief(exc))


class FitCheckpoint:
    """The probes an unfinished job has fitted so far, one file each in ``out_dir/.fits``, so
    that a requeued, preempted or killed job that runs again in the same directory resumes after
    the last probe it finished instead of fitting them all again.

    Each fit is a ``kind`` dataclass (``FitResult``) saved as ``<name>.safetensors``: tensors and
    module state dicts as tensors, every other field as JSON in the file's metadata (see
    ``save_fit``). Nothing is ever unpickled, so a file planted in a job dir cannot run code; a
    file that does not read back as a ``kind`` is refused with one warning and fitted again.
    Files are kept under the job's content key: those of another config are dropped. ``discard``
    once the results are written. A fit still running keeps its iterate every ``keep_every_s``
    seconds (``Unfinished``), and the next attempt goes on from it.
    """

    def __init__(
        self,
        out_dir: Path,
        key: str,
        device: torch.device,
        kind: type[Any] = FitResult,
        keep_every_s: float = KEEP_EVERY_S,
    ) -> None:
        self.out_dir, self.dir, self.device, self.kind = out_dir, out_dir / FITS, device, kind
        self.keep_every_s = keep_every_s
        stamp = self.dir / "key"
        if self.dir.is_symlink() or (self.dir.exists() and _read_stamp(stamp) != key):
            discard_fits(out_dir)
        self.dir.mkdir(parents=True, exist_ok=True)
        stamp.write_text(key)

    def get_or_fit(
        self, name: str, fit: Callable[[Unfinished], T], shape: tuple[int, ...] = ()
    ) -> T:
        """``fit(unfinished)``'s value, saved under ``name``; read back instead when already
        saved, its checksum and values verified (and ``shape``, when given, the probe weight's).
        ``unfinished``: where an earlier attempt at this fit left off."""
        path = self.dir / f"{name}{FIT_SUFFIX}"
        if path.is_file() and not path.is_symlink():
            try:
                value: T = self._read(path, self.kind, shape)
            except Exception as exc:  # unreadable, tampered with, or of another code version
                log.warning("Refused saved probe %s (%s); fitting it again", path, _brief(exc))
            else:
                log.info("Resumed %s from %s (fitted by an earlier attempt)", name, path)
                return value
        unfinished = self._unfinished(name, shape)
        value = fit(unfinished)
        try:
            save_fit(path, value)
        except Exception as exc:  # the job goes on; only a resume would have used the file
            log.warning("Could not save %s for resuming (%s)", name, _brief(exc))
        unfinished.path.unlink(missing_ok=True)
        return value

    def _read(self, path: Path, kind: type[T], shape: tuple[int, ...]) -> T:
        """A saved ``kind`` verified (and its probe weight's ``shape``, when given)."""
        value = load_fit(path, kind, self.device)
        if shape and _probe_shape(value) != shape:
            raise ValueError(f"probe of shape {_probe_shape(value)}, this job's is {shape}")
        return value

    def _unfinished(self, name: str, shape: tuple[int, ...]) -> Unfinished:
        """The iterate an earlier attempt at ``name`` kept, verified, and where to keep this
        attempt's."""
        folder = self.dir / UNFINISHED
        if folder.is_symlink() or (folder.exists() and not folder.is_dir()):
            folder.unlink()  # planted: a kept iterate is written here, never through a link
        folder.mkdir(exist_ok=True)
        path = folder / f"{name}{FIT_SUFFIX}"
        start = None
        if path.is_file() and not path.is_symlink():
            try:
                kept = self._read(path, FitResult, shape)
            except Exception as exc:
                log.warning(
                    "Refused the kept iterate %s (%s); fitting from the start", path, _brief(exc)
                )
            else:
                log.info("Going on with %s from the iterate an earlier attempt kept", name)
                start = kept.probe
        return Unfinished(path, start, self.keep_every_s)

    def discard(self) -> None:
        discard_fits(self.out_dir)


def _read_stamp(stamp: Path) -> str | None:
    """The content key a ``.fits`` dir was written for (at most a key's length is read: the
    file is untrusted), or None when it is missing or not a regular file."""
    try:
        if not stamp.is_file() or stamp.is_symlink():
            return None
        with open(stamp, "rb") as f:
            return f.read(STAMP_BYTES).decode("ascii", errors="replace")
    except OSError:
        return None


def _probe_shape(value: Any) -> tuple[int, ...]:
    return tuple(value.probe.weight.shape) if hasattr(value, "probe") else ()


def _brief(exc: BaseException) -> str:
    text = " ".join(str(exc).split())[:200]
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


def _type_name(kind: type[Any]) -> str:
    return f"{kind.__module__}.{kind.__qualname__}"


def _json_default(value: Any) -> Any:
    """JSON for the scalars a fit record may hold besides plain Python ones."""
    if isinstance(value, torch.Tensor | np.generic) and value.ndim == 0:
        return value.item()
    if isinstance(value, Enum):
        return value.value
    if isinstance(value, Path):
        return str(value)
    raise TypeError(f"{type(value).__name__} is not JSON serialisable")


def save_fit(path: Path, value: Any) -> None:
    """Write the dataclass ``value`` to ``path`` (safetensors, atomically): each tensor field as
    a tensor ``<field>``, each module field's state dict as tensors ``<field>.<name>``, every other
    field (None included) as JSON in the metadata. New plain fields need no change here."""
    if not dataclasses.is_dataclass(value) or isinstance(value, type):
        raise TypeError(f"only a dataclass instance can be saved, not {type(value).__name__}")
    tensors: dict[str, torch.Tensor] = {}
    modules: list[str] = []
    plain: dict[str, Any] = {}
    for spec in dataclasses.fields(value):
        item = getattr(value, spec.name)
        if isinstance(item, torch.Tensor):
            tensors[spec.name] = item
        elif isinstance(item, torch.nn.Module):
            modules.append(spec.name)
            tensors.update({f"{spec.name}.{k}": t for k, t in item.state_dict().items()})
        else:
            plain[spec.name] = item
    metadata = {
        "type": _type_name(type(value)),
        "modules": json.dumps(modules),
        "fields": json.dumps(plain, default=_json_default, allow_nan=False),
    }
    # Own, contiguous CPU copies: safetensors refuses views and tensors sharing storage.
    cpu = {k: t.detach().to("cpu").contiguous().clone() for k, t in tensors.items()}
    metadata["checksum"] = _checksum(metadata, cpu)
    write_bytes(path, save(cpu, metadata=metadata))


def load_fit(path: Path, kind: type[T], device: torch.device | str = "cpu") -> T:
    """Read back what ``save_fit`` wrote for a ``kind`` dataclass; raises on any mismatch (too
    large, not a safetensors file, a checksum that does not match, another type, a field or
    tensor missing or left over, or a fit ``check_fit`` refuses)."""
    size = path.stat().st_size
    if size > MAX_FIT_BYTES:
        raise ValueError(f"{size} bytes, more than a saved fit may take ({MAX_FIT_BYTES})")
    with safe_open(str(path), framework="pt", device="cpu") as f:
        metadata = f.metadata() or {}
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    if metadata.get("checksum") != _checksum(metadata, tensors):
        raise ValueError("checksum mismatch: the file changed after it was written")
    tensors = {k: t.to(device) for k, t in tensors.items()}
    if metadata.get("type") != _type_name(kind):
        raise ValueError(f"holds {metadata.get('type')!r}, not {_type_name(kind)}")
    modules = json.loads(metadata["modules"])
    plain = json.loads(metadata["fields"])
    if not isinstance(modules, list) or not isinstance(plain, dict):
        raise ValueError("malformed metadata")
    hints = typing.get_type_hints(kind)
    values: dict[str, Any] = {}
    for spec in dataclasses.fields(kind):  # type: ignore[arg-type]
        name = spec.name
        if name in modules:
            prefix = f"{name}."
            state = {
                k[len(prefix) :]: tensors.pop(k) for k in list(tensors) if k.startswith(prefix)
            }
            values[name] = _rebuild_module(hints[name], state)
        elif name in tensors:
            values[name] = tensors.pop(name)
        elif name in plain:
            values[name] = plain.pop(name)
        else:
            raise ValueError(f"field {name!r} is missing")
    if tensors or plain:
        raise ValueError(f"unknown entries {sorted([*tensors, *plain])}")
    value = kind(**values)
    if isinstance(value, FitResult):
        check_fit(value)
    return value


def check_fit(fit: FitResult) -> None:
    """Raise ValueError unless ``fit``'s fields are what a fit produces: consistent shapes, finite
    numbers (a bias may be -inf: a class no training row carries), a positive scale, and
    records of JSON scalars. A fit read back from disk is checked before use."""
    weight, bias, mean = fit.probe.weight, fit.probe.bias, fit.probe.mean
    scale = float(fit.probe.scale)
    if weight.ndim != 2 or bias.shape != weight.shape[:1] or mean.shape != weight.shape[1:]:
        raise ValueError(
            f"inconsistent shapes: weight {tuple(weight.shape)}, bias {tuple(bias.shape)}, "
            f"mean {tuple(mean.shape)}"
        )
    if not (math.isfinite(scale) and scale > 0):
        raise ValueError(f"scale {scale} is not a positive finite number")
    finite_bias = bool((torch.isfinite(bias) | (bias == -math.inf)).all())
    if not (bool(torch.isfinite(weight).all() and torch.isfinite(mean).all()) and finite_bias):
        raise ValueError("the probe holds NaN or infinite values")
    if fit.map_weight is not None and not (
        fit.map_weight.ndim == 2
        and fit.map_weight.shape[0] == weight.shape[1]
        and bool(torch.isfinite(fit.map_weight).all())
    ):
        raise ValueError("map_weight is not a finite (d x k) matrix")
    if not isinstance(fit.history, list) or not isinstance(fit.path, list):
        raise ValueError("history and path must be lists of records")
    for record in [fit.convergence, *fit.history, *fit.path]:
        if not isinstance(record, dict) or not all(_json_scalar(v) for v in record.values()):
            raise ValueError(f"a record is not a map of finite JSON scalars: {record!r:.80}")


def _json_scalar(value: object) -> bool:
    if isinstance(value, float):
        return math.isfinite(value)
    return value is None or isinstance(value, str | int | bool)


def _checksum(metadata: dict[str, str], tensors: dict[str, torch.Tensor]) -> str:
    """xxh3-128 of the metadata (but the checksum) and every tensor's name, dtype, shape and
    bytes."""
    digest = xxhash.xxh3_128()
    fields = {k: v for k, v in metadata.items() if k != "checksum"}
    digest.update(json.dumps(fields, sort_keys=True).encode())
    update_with_tensors(digest, tensors)
    return digest.hexdigest()


def _rebuild_module(annotation: Any, state: dict[str, torch.Tensor]) -> torch.nn.Module:
    """A module of the field's declared class from its state dict. The class's constructor takes
    its state dict's entries by name (``LinearProbe(weight, bias, mean, scale)``); loading the
    state dict back (strict) checks that nothing is missing or left over."""
    cls = next((c for c in (annotation, *typing.get_args(annotation)) if _is_module_class(c)), None)
    if cls is None:
        raise TypeError(f"{annotation!r} is not a torch module class")
    module = cls(**state)
    module.load_state_dict(state, strict=True)
    return module


def _is_module_class(value: Any) -> bool:
    return isinstance(value, type) and issubclass(value, torch.nn.Module)
