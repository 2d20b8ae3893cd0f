"""The probes an unfinished job has fitted, saved one file each under ``<job dir>/.fits`` so a
requeued, preempted or killed job resumes after the last probe it finished.

Each fit is a dataclass saved as safetensors: tensors and module state dicts as tensors, every
other field as JSON in the file's metadata. Nothing is ever unpickled, so a file planted in a job
dir cannot run code; a file that does not read back as the expected type is refused.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import shutil
import typing
from collections.abc import Callable
from enum import Enum
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from probe_sweep.files import temp_path
from probe_sweep.jobdir import FIT_SUFFIX, FITS, discard_fits
from probe_sweep.probes import FitResult

log = logging.getLogger(__name__)
T = TypeVar("T")


class FitCheckpoint:
    """The probes an unfinished job has fitted so far, one file each in ``out_dir/.fits``, so
    that a requeued, preempted or killed job that runs again in the same directory resumes after
    the last probe it finished instead of fitting them all again.

    Each fit is a ``kind`` dataclass (``FitResult``) saved as ``<name>.safetensors``: tensors and
    module state dicts as tensors, every other field as JSON in the file's metadata (see
    ``save_fit``). Nothing is ever unpickled, so a file planted in a job dir cannot run code; a
    file that does not read back as a ``kind`` is refused with one warning and fitted again.
    Files are kept under the job's content key: those of another config are dropped. ``discard``
    once the results are written.
    """

    def __init__(
        self, out_dir: Path, key: str, device: torch.device, kind: type[Any] = FitResult
    ) -> None:
        self.out_dir, self.dir, self.device, self.kind = out_dir, out_dir / FITS, device, kind
        stamp = self.dir / "key"
        if self.dir.exists() and (not stamp.is_file() or stamp.read_text() != key):
            shutil.rmtree(self.dir)
        self.dir.mkdir(parents=True, exist_ok=True)
        stamp.write_text(key)

    def get_or_fit(self, name: str, fit: Callable[[], T]) -> T:
        """``fit()``'s value, saved under ``name``; read back instead when already saved."""
        path = self.dir / f"{name}{FIT_SUFFIX}"
        if path.is_file():
            try:
                value: T = load_fit(path, self.kind, self.device)
            except Exception as exc:  # unreadable, tampered with, or of another code version
                log.warning("Refused saved probe %s (%s); fitting it again", path, _brief(exc))
            else:
                log.info("Resumed %s from %s (fitted by an earlier attempt)", name, path)
                return value
        value = fit()
        try:
            save_fit(path, value)
        except Exception as exc:  # the job goes on; only a resume would have used the file
            log.warning("Could not save %s for resuming (%s)", name, _brief(exc))
        return value

    def discard(self) -> None:
        discard_fits(self.out_dir)


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
        "fields": json.dumps(plain, default=_json_default),
    }
    # Own, contiguous CPU copies: safetensors refuses views and tensors sharing storage.
    cpu = {k: t.detach().to("cpu").contiguous().clone() for k, t in tensors.items()}
    tmp = temp_path(path)
    save_file(cpu, str(tmp), metadata=metadata)
    os.replace(tmp, path)


def load_fit(path: Path, kind: type[T], device: torch.device | str = "cpu") -> T:
    """Read back what ``save_fit`` wrote for a ``kind`` dataclass; raises on any mismatch (not a
    safetensors file, another type, a field or tensor missing or left over)."""
    with safe_open(str(path), framework="pt", device=str(device)) as f:
        metadata = f.metadata() or {}
        tensors = {k: f.get_tensor(k) for k in f.keys()}
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
    return kind(**values)


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
