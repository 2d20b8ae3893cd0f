"""Atomic file writes: a reader (a resumed sweep, the report, another job) sees a file whole or
not at all. Each writes to a temp name in the same directory, then renames it onto the path."""

from __future__ import annotations

import json
import os
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
