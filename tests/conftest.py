"""Shared fixtures: an isolated cache and wandb dirs per test, and a CLI runner."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
CONF = REPO / "conf"
# Small enough for seconds on 2 CPU cores, large enough that probes learn something.
TINY = ["model=tiny", "data.token_budget=4000", "data.seq_len=64"]


@pytest.fixture(autouse=True)
def isolated_env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Point every cache and wandb directory at this test's temp dir."""
    monkeypatch.setenv("PROBE_SWEEP_CACHE", str(tmp_path / "cache"))
    for var in ("WANDB_DIR", "WANDB_CACHE_DIR", "WANDB_CONFIG_DIR", "WANDB_DATA_DIR"):
        monkeypatch.setenv(var, str(tmp_path / "wandb"))
    monkeypatch.setenv("WANDB_MODE", "offline")
    return tmp_path


def run_cli(
    args: list[str], cwd: Path, env: dict[str, str] | None = None, check: bool = True
) -> subprocess.CompletedProcess[str]:
    """Run ``python -m probe_sweep`` as a user would, from ``cwd``."""
    proc = subprocess.run(
        [sys.executable, "-m", "probe_sweep", *args],
        cwd=cwd,
        env={**os.environ, **(env or {})},
        capture_output=True,
        text=True,
        timeout=600,
    )
    if check and proc.returncode != 0:
        raise AssertionError(
            f"exit {proc.returncode}\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
        )
    return proc


def wait_for_line(proc: subprocess.Popen[str], expected: str) -> None:
    """Read a child's stdout up to the line ``expected``; libraries may log lines before it."""
    assert proc.stdout is not None
    seen = []
    for line in proc.stdout:
        if line.strip() == expected:
            return
        seen.append(line)
    raise AssertionError(f"the child exited before printing {expected!r}:\n" + "".join(seen))
