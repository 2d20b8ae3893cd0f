"""Atomic file writes: a reader (a resumed sweep, the report, another job) sees a file whole or
not at all. Each writes to a temp name in the same directory, then renames it onto the path."""

from __future__ import annotations

import json
import os
import stat
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file


def temp_path(path: Path) -> Path:
    """Where to write ``path`` before an atomic rename onto it (same dir, per process)."""
    return path.with_name(f".{path.name}.tmp-{os.getpid()}")


def write_json(path: Path, payload: dict[str, Any]) -> None:
    """``payload`` as indented JSON; NaN and infinity are refused (they are not JSON)."""
    tmp = temp_path(path)
    tmp.write_text(json.dumps(payload, indent=2, allow_nan=False))
    os.replace(tmp, path)


def write_tensors(path: Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> None:
    """``tensors`` (moved to the CPU, made contiguous) as a safetensors file with ``metadata``."""
    tmp = temp_path(path)
    save_file({k: v.detach().cpu().contiguous() for k, v in tensors.items()}, tmp, metadata)
    os.replace(tmp, path)


def read_regular(path: Path, limit: int) -> str:
    """The text of ``path`` if it is a regular file of at most ``limit`` bytes; ValueError for
    anything else (a FIFO, a device, a directory: opened without blocking, then refused), so
    a planted file cannot hang or exhaust a reader."""
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)
    try:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            raise ValueError(f"{path} is not a regular file")
        if info.st_size > limit:
            raise ValueError(f"{path} has {info.st_size} bytes, more than {limit}")
        with os.fdopen(fd, "rb", closefd=False) as f:
            return f.read(limit + 1).decode("utf-8")
    finally:
        os.close(fd)
