"""The benchmark runs end to end at a tiny size and writes its table (a smoke test, not timed);
and the reduced-precision training it reports on keeps a planted task's accuracy."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch

from probe_sweep.probes import (
    Precision,
    ProbeConfig,
    RegConfig,
    fit_softmax_probe,
    matmul_dtype,
    score_probe,
)
from tests.conftest import REPO

SECTIONS = ("1 extraction", "2 softmax probe", "3 ridge path", "4 sweep", "5 memory")


@pytest.mark.e2e
def test_bench_runs_end_to_end_and_appends_its_table(tmp_path: Path) -> None:
    out = tmp_path / "BENCHMARKS.md"
    out.write_text("# Benchmarks\n\n## an earlier run\n\n| kept | row |\n")
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "probe_sweep.bench",
            "--model=tiny",
            "--token-budget=2000",
            "--seq-len=64",
            "--memory-budget=1000",
            "--max-epochs=2",
            "--repeats=1",
            "--strengths=1e-4,1e-2",
            f"--output={out}",
            f"--work-dir={tmp_path}",
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    written = out.read_text()
    assert written.startswith("# Benchmarks\n\n## an earlier run\n\n| kept | row |\n")
    table = [line for line in written.splitlines() if line.startswith("| ")]
    for section in SECTIONS:
        rows = [line for line in table if line.startswith(f"| {section} |")]
        assert rows, f"no {section} row in\n{written}"
        assert all(line.count("|") == 8 for line in rows)
    assert "tiny-gpt2 on cpu" in written and "basis=natural,pca,nmf" in written
    assert "peak RSS MiB at 1000 / 2000 / 4000 tokens" in written
    assert "| section | measure | probe_sweep |" in proc.stdout  # printed as well as written
    assert not any((tmp_path).glob("probe_sweep_bench-*")), "work dir left behind"


def test_bfloat16_training_keeps_the_accuracy_of_float32() -> None:
    g = torch.Generator().manual_seed(0)
    embeddings = torch.randn(50, 32, generator=g)
    y = torch.randint(0, 50, (6000,), generator=g)
    x = embeddings[y] + 0.5 * torch.randn(6000, 32, generator=g)
    every = torch.ones(1000, dtype=torch.bool)
    top1 = {}
    for precision in (Precision.float32, Precision.bfloat16):
        cfg = ProbeConfig(max_epochs=8, batch_size=256, precision=precision)
        fit = fit_softmax_probe(
            x[:4000], y[:4000], x[4000:5000], y[4000:5000], 50, RegConfig(), cfg, 0
        )
        assert fit.probe.weight.dtype == torch.float32
        top1[precision] = score_probe(fit.probe, x[5000:], y[5000:], every)["top1"]
    assert top1[Precision.float32] > 0.9
    assert abs(top1[Precision.float32] - top1[Precision.bfloat16]) <= 0.01
    assert matmul_dtype(torch.device("cpu"), Precision.float32) is torch.float32
    assert matmul_dtype(torch.device("cpu"), Precision.auto) in (torch.float32, torch.bfloat16)
