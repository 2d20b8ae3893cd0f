"""Activation cache integrity: checksums, damaged entries set aside and recomputed, non-finite
hidden states refused, and a full disk reported as one clear error with nothing left behind."""

from __future__ import annotations

import copy
import json
import logging
import os
import subprocess
import sys
import tracemalloc
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch

from probe_sweep.cache.entry import CacheDamaged, CacheDtype, check_entry, open_store
from probe_sweep.errors import UserError
from probe_sweep.extraction.activations import ActivationsConfig, extract
from probe_sweep.fingerprints import CHUNK, file_checksum
from tests.conftest import TINY as TINY_ARGS
from tests.conftest import run_cli, subprocess_timeout

CPU = torch.device("cpu")
REPO = Path(__file__).resolve().parents[2]
LOGGER = "probe_sweep.extraction.activations"


def f32(tmp_path: Path) -> ActivationsConfig:
    return ActivationsConfig(cache_dir=str(tmp_path / "cache"), dtype=CacheDtype.float32)


def leftovers(cache: Path) -> list[str]:
    """Temporary directories (not lock files) left in the cache."""
    return [p.name for p in cache.glob(".tmp-*") if p.is_dir()]


def quarantined(cache: Path, key: str) -> list[Path]:
    return sorted(cache.glob(f"{key}.corrupt-*"))


def warnings(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]


def flip_finite(path: Path) -> None:
    """Flip the lowest mantissa bit of a value in the middle of a layer file: still finite."""
    array = np.load(path, mmap_mode="r")
    offset = array.offset + (array.size // 2) * array.itemsize  # little-endian: lowest byte
    del array
    with open(path, "r+b") as f:
        f.seek(offset)
        byte = f.read(1)[0]
        f.seek(offset)
        f.write(bytes([byte ^ 1]))


def truncate(path: Path) -> None:
    os.truncate(path, path.stat().st_size // 2)


DAMAGE: dict[str, tuple[Callable[[Path], None], str]] = {
    "finite byte flip": (lambda e: flip_finite(e / "layer_1.npy"), "does not match its checksum"),
    "truncated layer": (lambda e: truncate(e / "layer_1.npy"), "truncated"),
    "emptied layer": (lambda e: os.truncate(e / "layer_1.npy", 0), "not a readable .npy"),
    "missing layer": (lambda e: (e / "layer_1.npy").unlink(), "layer_1.npy is missing"),
    "bad meta.json": (lambda e: (e / "meta.json").write_text('{"key": '), "meta.json is unread"),
    "no meta.json": (lambda e: (e / "meta.json").unlink(), "has no meta.json"),
}


@pytest.mark.parametrize("damage", list(DAMAGE))
def test_damaged_entry_is_set_aside_with_one_warning_and_recomputed(
    tiny, tmp_path: Path, caplog: pytest.LogCaptureFixture, damage: str
) -> None:
    model, corpus = tiny
    cfg = f32(tmp_path)
    first = extract(model, corpus, [0, 1, 2], cfg, CPU)
    good = np.array(first.layer(1))
    damage_fn, problem = DAMAGE[damage]
    damage_fn(first.path)
    if damage == "finite byte flip":
        flipped = np.load(first.path / "layer_1.npy")
        assert np.isfinite(flipped).all() and not np.array_equal(flipped, good)

    caplog.set_level(logging.INFO, logger=LOGGER)
    again = extract(model, corpus, [0, 1, 2], cfg, CPU)
    assert not again.reused, f"a {damage} entry was reused"
    assert again.path == first.path
    np.testing.assert_array_equal(again.layer(1), good)
    check_entry(again.path)  # the recomputed entry verifies
    [warning] = warnings(caplog)
    assert str(first.path) in warning and problem in warning
    [aside] = quarantined(first.path.parent, first.path.name)
    assert str(aside) in warning
    assert leftovers(first.path.parent) == []


def test_open_store_names_the_entry_and_the_fix(tiny, tmp_path: Path) -> None:
    model, corpus = tiny
    store = extract(model, corpus, [1], f32(tmp_path), CPU)
    flip_finite(store.path / "layer_1.npy")
    with pytest.raises(CacheDamaged) as info:
        open_store(store.path, store.meta)
    assert isinstance(info.value, UserError)
    message = str(info.value)
    assert str(store.path) in message and "delete the directory to recompute" in message


def test_checksums_are_recorded_at_write_time(tiny, tmp_path: Path) -> None:
    model, corpus = tiny
    store = extract(model, corpus, [0, 2], f32(tmp_path), CPU)
    meta = json.loads((store.path / "meta.json").read_text())
    assert set(meta["checksums"]) == {"layer_0.npy", "layer_2.npy"}
    for name, digest in meta["checksums"].items():
        assert digest.startswith("xxh3_128:") and file_checksum(store.path / name) == digest
    assert meta["model"] == "tiny-gpt2" and meta["corpus"] == corpus.description
    assert meta["created"].endswith("Z")


def test_entry_without_checksums_is_recomputed_not_quarantined(
    tiny, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    model, corpus = tiny
    cfg = f32(tmp_path)
    store = extract(model, corpus, [0], cfg, CPU)
    meta = json.loads((store.path / "meta.json").read_text())
    del meta["checksums"]  # as written by the version before checksums
    (store.path / "meta.json").write_text(json.dumps(meta))
    caplog.set_level(logging.INFO, logger=LOGGER)
    again = extract(model, corpus, [0], cfg, CPU)
    assert not again.reused
    [warning] = warnings(caplog)
    assert "written by an older probe_sweep" in warning
    assert quarantined(store.path.parent, store.path.name) == []
    assert leftovers(store.path.parent) == []


def test_checksum_streams_in_chunks(tmp_path: Path) -> None:
    big = tmp_path / "big.bin"
    with open(big, "wb") as f:
        for _ in range(6):
            f.write(os.urandom(CHUNK))
    tracemalloc.start()
    try:
        file_checksum(big)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 2 * CHUNK, f"verifying a {6 * CHUNK}-byte file peaked at {peak} bytes"


def poisoned(model, fill: Callable[[torch.nn.Module], None]):
    bad = copy.deepcopy(model)
    with torch.no_grad():
        fill(bad.module)
    return bad


def test_nan_hidden_states_are_refused_before_anything_is_cached(tiny, tmp_path: Path) -> None:
    model, corpus = tiny

    def nan(module: torch.nn.Module) -> None:
        module.transformer.h[0].mlp.c_fc.weight[0, 0] = float("nan")

    with pytest.raises(UserError, match=r"NaN or inf hidden states at layer 1, sequences 0\.\."):
        extract(poisoned(model, nan), corpus, [0, 1], f32(tmp_path), CPU)
    cache = tmp_path / "cache"
    assert [p.name for p in cache.iterdir() if p.is_dir()] == []


def test_float16_overflow_is_refused_with_the_fix(tiny, tmp_path: Path) -> None:
    model, corpus = tiny

    def huge(module: torch.nn.Module) -> None:
        module.transformer.wte.weight.mul_(1e7)

    cfg = ActivationsConfig(cache_dir=str(tmp_path / "cache"), dtype=CacheDtype.float16)
    with pytest.raises(UserError, match="beyond float16's range.*activations.dtype=float32"):
        extract(poisoned(model, huge), corpus, [0], cfg, CPU)
    assert [p.name for p in (tmp_path / "cache").iterdir() if p.is_dir()] == []


@pytest.mark.e2e
def test_cli_refuses_a_cache_disk_without_room_before_extracting(
    tmp_path: Path, small_fs: Callable[[str], Path]
) -> None:
    cache = small_fs("1m")  # the tiny run's three float16 layers need about 1.5 MiB
    proc = run_cli(
        [*TINY_ARGS, "tracker=none", f"activations.cache_dir={cache}"], cwd=tmp_path, check=False
    )
    out = proc.stdout + proc.stderr
    assert proc.returncode == 2, out[-3000:]
    assert "Traceback" not in out
    [line] = [x for x in out.splitlines() if "error:" in x]
    assert "needs 1.5 MiB" in line and "MiB" in line.split("only")[1]
    assert "activations.cache_dir (env PROBE_SWEEP_CACHE)" in line and str(cache) in line
    assert leftovers(cache) == [] and [p for p in cache.iterdir() if p.is_dir()] == []


# Extraction onto a file system that fills up after the free-space check (another writer took the
# space): disk_usage is made to report plenty, so the writes themselves hit ENOSPC. With
# fallocate=0 the file system behaves as one without posix_fallocate (the plain write path).
FILL_SCRIPT = """
import errno, os, shutil, sys, torch
from probe_sweep.extraction import activations
from probe_sweep.extraction.activations import ActivationsConfig, extract
from probe_sweep.extraction.data import DataConfig, build_corpus
from probe_sweep.errors import UserError
from probe_sweep.extraction.model import load_model, load_tokenizer
from tests.extraction.test_model import TINY
cache, fallocate = sys.argv[1], sys.argv[2] == "1"
real = shutil.disk_usage
shutil.disk_usage = lambda p: real(p)._replace(free=1 << 40)
if not fallocate:
    def no_fallocate(fd, offset, length):
        raise OSError(errno.EOPNOTSUPP, "not supported")
    os.posix_fallocate = no_fallocate
tok = load_tokenizer(TINY)
model = load_model(TINY, len(tok), torch.device("cpu"), seed=0)
corpus = build_corpus(DataConfig(token_budget=3000, seq_len=32), tok, 256, seed=0)
try:
    extract(model, corpus, [0, 1, 2], ActivationsConfig(cache_dir=cache, batch_size=4),
            torch.device("cpu"))
except UserError as exc:
    print("error:", exc, flush=True)
    sys.exit(2)
print("no error", flush=True)
"""


@pytest.mark.e2e
@pytest.mark.parametrize("fallocate", ["1", "0"], ids=["fallocate", "plain-writes"])
def test_disk_filling_up_mid_write_is_an_error_not_sigbus(
    tmp_path: Path, small_fs: Callable[[str], Path], fallocate: str
) -> None:
    cache = small_fs("512k")  # three float16 layers of 3000 x 64 need about 1.1 MiB
    proc = subprocess.run(
        [sys.executable, "-c", FILL_SCRIPT, str(cache), fallocate],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=subprocess_timeout(),
    )
    assert proc.returncode == 2, f"exit {proc.returncode}\n{proc.stdout}\n{proc.stderr[-3000:]}"
    assert "filled up while writing entry" in proc.stdout and "nothing was cached" in proc.stdout
    assert "activations.cache_dir" in proc.stdout
    assert leftovers(cache) == [], "a temporary directory survived the failure"
    assert [p for p in cache.iterdir() if p.is_dir()] == []
