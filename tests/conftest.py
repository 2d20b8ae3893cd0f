"""Shared fixtures: an isolated cache and wandb dirs per test, and a CLI runner."""

from __future__ import annotations

import os
import subprocess
import sys
import threading
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
CONF = REPO / "conf"
# Small enough for seconds on 2 CPU cores, large enough that probes learn something.
# The random-init baseline doubles every job; the statistics tests turn it back on.
TINY = [
    "model=tiny",
    "data.token_budget=4000",
    "data.seq_len=64",
    "statistics.random_init_baseline=false",
]


# A limit on a test's child processes is a guard against a hung child, not a speed test. A busy
# 2-core machine (other test runs, other users) makes a child several times slower than on an idle
# one, and a tight limit then fails tests that were merely slow (600 s did, for a newcomer). So one
# generous limit for every child a test starts, and PROBE_SWEEP_TEST_TIMEOUT_SCALE multiplies it
# on machines slower still (e.g. 3 under emulation; 0.1 to find a hang sooner).
TIMEOUT_S = 1800.0
TIMEOUT_SCALE_VAR = "PROBE_SWEEP_TEST_TIMEOUT_SCALE"


def subprocess_timeout() -> float:
    """Seconds a test may wait for a child process: ``TIMEOUT_S`` x the scale env var."""
    raw = os.environ.get(TIMEOUT_SCALE_VAR, "1")
    try:
        scale = float(raw)
    except ValueError:
        scale = -1.0
    if not scale > 0:
        raise ValueError(f"{TIMEOUT_SCALE_VAR}={raw!r}: expected a positive number, e.g. 2")
    return TIMEOUT_S * scale


def pytest_xdist_auto_num_workers(config: pytest.Config) -> int:
    """``-n auto`` (pyproject's addopts): a worker per core and one more, which keeps the cores
    busy while other workers wait on their children (startup, locks, a SLURM queue)."""
    return (os.cpu_count() or 1) + 1


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """End-to-end tests first: the short unit tests then fill the workers' last minutes, instead
    of one long job running alone at the end."""
    items.sort(key=lambda item: item.get_closest_marker("e2e") is None)


# Each worker's jobs get its share of the cores (at least one thread): jobs with as many OpenMP
# threads as the machine has cores spin against each other.
WORKERS = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
WORKER_THREADS = max(1, (os.cpu_count() or 1) // WORKERS)
if WORKERS > 1:
    import torch

    torch.set_num_threads(WORKER_THREADS)


@pytest.fixture(autouse=True)
def isolated_env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Point every cache and wandb directory at this test's temp dir (and, beside other workers,
    size the threads of the jobs a test starts to this worker's share of the cores)."""
    if WORKERS > 1 and "PROBE_SWEEP_THREADS" not in os.environ:
        monkeypatch.setenv("PROBE_SWEEP_THREADS", str(WORKER_THREADS))
    monkeypatch.setenv("PROBE_SWEEP_CACHE", str(tmp_path / "cache"))
    for var in ("WANDB_DIR", "WANDB_CACHE_DIR", "WANDB_CONFIG_DIR", "WANDB_DATA_DIR"):
        monkeypatch.setenv(var, str(tmp_path / "wandb"))
    monkeypatch.setenv("WANDB_MODE", "offline")
    return tmp_path


def run_cli(
    args: list[str], cwd: Path, env: dict[str, str | None] | None = None, check: bool = True
) -> subprocess.CompletedProcess[str]:
    """Run ``python -m probe_sweep`` as a user would, from ``cwd``; ``env`` adds variables to
    this process's environment, and a None value removes one."""
    child_env = {**os.environ, **(env or {})}
    proc = subprocess.run(
        [sys.executable, "-m", "probe_sweep", *args],
        cwd=cwd,
        env={k: v for k, v in child_env.items() if v is not None},
        capture_output=True,
        text=True,
        timeout=subprocess_timeout(),
    )
    if check and proc.returncode != 0:
        raise AssertionError(
            f"exit {proc.returncode}\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
        )
    return proc


def wait_for_line(
    proc: subprocess.Popen[str], expected: str, contains: bool = False, timeout: float | None = None
) -> str:
    """Read a child's stdout up to the line ``expected`` (or one containing it) and return it;
    libraries may log lines before it. A child that has not printed it within ``timeout``
    seconds (default: the scaled test limit) is killed and the test fails."""
    assert proc.stdout is not None
    limit = subprocess_timeout() if timeout is None else timeout
    expired = threading.Event()

    def give_up() -> None:
        expired.set()
        proc.kill()

    timer = threading.Timer(limit, give_up)
    timer.start()
    seen = []
    try:
        for line in proc.stdout:
            if (expected in line) if contains else (line.strip() == expected):
                return line
            seen.append(line)
    finally:
        timer.cancel()
    if expired.is_set():
        why = f"the child did not print {expected!r} within {limit:g} s and was killed"
    else:
        why = f"the child exited before printing {expected!r}"
    raise AssertionError(why + ":\n" + "".join(seen))


@pytest.fixture
def small_fs(tmp_path: Path) -> Iterator[Callable[..., Path]]:
    """Mount tmpfs file systems of a given size, ``mount(size)``, read-only with
    ``mount(size, read_only=True)`` (root only); skip, saying why, where refused
    (``remount_read_only`` turns one read-only after files were put there)."""
    mounted: list[Path] = []

    def mount(size: str, read_only: bool = False) -> Path:
        where = tmp_path / f"fs{len(mounted)}"
        where.mkdir()
        options = f"size={size}" + (",ro" if read_only else "")
        cmd = ["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(where)]
        try:
            proc = subprocess.run(cmd, capture_output=True, text=True, timeout=30)
        except OSError as exc:
            proc = subprocess.CompletedProcess(cmd, 1, "", str(exc))
        if proc.returncode != 0:
            reason = f"cannot mount a {size} tmpfs: {proc.stderr.strip() or proc.returncode}"
            print(reason)
            pytest.skip(reason)
        mounted.append(where)
        return where

    yield mount
    for where in mounted:
        subprocess.run(["umount", "-l", str(where)], capture_output=True, timeout=30)


def remount_read_only(where: Path) -> None:
    subprocess.run(["mount", "-o", "remount,ro", str(where)], check=True, timeout=30)


@pytest.fixture(scope="module")
def tiny():
    """The tiny random-init GPT-2 on CPU and a small corpus, built once per test module."""
    import torch

    from probe_sweep.extraction.data import DataConfig, build_corpus
    from probe_sweep.extraction.model import load_model, load_tokenizer
    from tests.extraction.test_model import TINY as TINY_MODEL

    tokenizer = load_tokenizer(TINY_MODEL)
    model = load_model(TINY_MODEL, len(tokenizer), torch.device("cpu"), seed=0)
    corpus = build_corpus(DataConfig(token_budget=1500, seq_len=32), tokenizer, 256, seed=0)
    return model, corpus
