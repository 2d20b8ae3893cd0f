"""Atomic file writes: a reader (a resumed sweep, the report, another job) sees a file whole or
not at all. Each writes to a temp name in the same directory, then renames it onto the path."""

from __future__ import annotations

import errno
import json
import os
import shutil
import stat
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save

from probe_sweep.errors import UserError


def temp_path(path: Path) -> Path:
    """Where to write ``path`` before an atomic rename onto it (same dir, per process)."""
    return path.with_name(f".{path.name}.tmp-{os.getpid()}")


def write_json(path: Path, payload: dict[str, Any]) -> None:
    """``payload`` as indented JSON; NaN and infinity are refused (they are not JSON)."""
    write_bytes(path, json.dumps(payload, indent=2, allow_nan=False).encode())


def write_tensors(path: Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> None:
    """``tensors`` (moved to the CPU, made contiguous) as a safetensors file with ``metadata``."""
    cpu = {k: v.detach().cpu().contiguous() for k, v in tensors.items()}
    write_bytes(path, save(cpu, metadata))


def write_bytes(path: Path, data: bytes) -> None:
    """``data`` to ``path`` atomically. The temporary file never survives a failure; a full
    disk is one ``UserError`` naming the directory, the bytes needed and the bytes free."""
    tmp = temp_path(path)
    try:
        with open(tmp, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
    except OSError as exc:
        tmp.unlink(missing_ok=True)
        if exc.errno in (errno.ENOSPC, errno.EDQUOT):
            raise DiskFull(path.parent, len(data)) from exc
        raise


class DiskFull(UserError):
    """A job dir's disk has no room for a file: one line with the sizes and the fix."""

    def __init__(self, directory: Path, needed: int) -> None:
        try:
            free = f"{shutil.disk_usage(directory).free:,} bytes free"
        except OSError:
            free = "free space unknown"
        super().__init__(
            f"the disk of {directory} is full: {needed:,} bytes needed, {free}. Free space "
            "there (or choose another hydra.run.dir= / hydra.sweep.dir=) and run the same "
            "command again: the probes saved so far in .fits/ are kept"
        )


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
