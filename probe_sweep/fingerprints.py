"""Digests of what a job's numbers depend on besides its config: the weights a model holds and
the files it reads. They enter the activation cache's key and a job's content key, so a
checkpoint retrained in place or a text file edited in place is never answered from results
computed before the change.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable
from pathlib import Path

import torch
import xxhash

CHECKSUM = "xxh3_128"
CHUNK = 8 << 20  # bytes read at a time: memory stays flat whatever the file size


def file_checksum(path: Path) -> str:
    """``xxh3_128:<hex>`` of a file, read in CHUNK-sized pieces into one reused buffer."""
    digest = xxhash.xxh3_128()
    buf = bytearray(CHUNK)
    view = memoryview(buf)
    with open(path, "rb", buffering=0) as f:
        while n := f.readinto(buf):
            digest.update(view[:n])
    return f"{CHECKSUM}:{digest.hexdigest()}"


def update_with_tensors(digest: xxhash.xxh3_128, tensors: dict[str, torch.Tensor]) -> None:
    """Feed each tensor's name, dtype, shape and bytes to ``digest``, in name order."""
    for name, tensor in sorted(tensors.items()):
        digest.update(f"{name}|{tensor.dtype}|{tuple(tensor.shape)}|".encode())
        if not tensor.is_meta:  # a model built for its shapes only has no bytes
            flat = tensor.detach().reshape(-1).contiguous().cpu()
            digest.update(flat.view(torch.uint8).numpy().tobytes())


def tensors_digest(module: torch.nn.Module) -> str:
    """xxh3-128 of every parameter and buffer: the weights the model actually computes with,
    whatever file they came from."""
    digest = xxhash.xxh3_128()
    update_with_tensors(digest, module.state_dict())
    return digest.hexdigest()


def files_digest(paths: Iterable[str | Path]) -> str:
    """xxh3-128 of files' names and contents (each file's ``file_checksum``), in order."""
    named = [[Path(p).name, file_checksum(Path(p).expanduser())] for p in paths]
    return xxhash.xxh3_128(json.dumps(named).encode()).hexdigest()


def directory_digest(path: str | Path) -> str:
    """xxh3-128 of a model directory's files (top level, where ``from_pretrained`` reads):
    names and contents, read before the model loads them (xxh3 runs at memory speed, and the
    load then reads the weights from the page cache). Modification times are left out: a copy
    that keeps them still changes the digest, and a touched file does not."""
    root = Path(path).expanduser()
    return files_digest(sorted(p for p in root.iterdir() if p.is_file()))


def job_inputs(model_dir: str | None, text_files: list[str]) -> dict[str, str]:
    """What a job's content key adds to its config: the digest of its local model directory
    (none for a hub id or a random-init architecture) and of its corpus's text files."""
    inputs = {}
    if model_dir is not None and os.path.isdir(model_dir):
        inputs["model_dir_xxh3"] = directory_digest(model_dir)
    if text_files:
        inputs["text_files_xxh3"] = files_digest(text_files)
    return inputs
