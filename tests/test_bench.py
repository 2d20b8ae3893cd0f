"""The benchmark runs end to end at a tiny size and writes its table (a smoke test, not timed)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import REPO, subprocess_timeout

SECTIONS = (
    "1 extraction",
    "2 softmax probe",
    "3 ridge path",
    "4 sweep",
    "5 memory",
    "6 contention",
)


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
            "--tol=1e-3",
            "--repeats=1",
            "--strengths=1e-4,1e-2",
            f"--output={out}",
            f"--work-dir={tmp_path}",
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=subprocess_timeout(),
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
