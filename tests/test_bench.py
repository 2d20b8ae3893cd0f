"""The benchmark: its report logic on made-up figures (unit), and the CLI end to end at a tiny
size (smoke tests of real runs, not timed)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch

from probe_sweep.bench.__main__ import SECTIONS, section_names
from probe_sweep.bench.runs import JobFigures, loop_rate
from probe_sweep.bench.scale import scale_report
from tests.conftest import REPO, subprocess_timeout

DEFAULT_ROWS = (
    "1 extraction",
    "2 solver",
    "3 ridge path",
    "4 sweep",
    "5 memory",
    "6 contention",
)
MIB = 2**20


def figures(n_train: int, fit_s: float, peak_rss_mib: float, evaluations: int = 5) -> JobFigures:
    return JobFigures(
        n_tokens=n_train * 5 // 4,
        n_train=n_train,
        n_sequences=n_train // 100,
        n_classes=30522,
        evaluations=evaluations,
        iterations=[3],
        converged=False,
        gap_rel=0.5,
        extract_s=10.0,
        fit_s=fit_s,
        statistics_s=0.0,
        loop_rate=None,
        cache_bytes=n_train * 768,
        peak_rss=int(peak_rss_mib * MIB),
        peak_anon=int(peak_rss_mib * MIB * 0.8),
        peak_file=int(peak_rss_mib * MIB * 0.2),
        wall_s=fit_s + 20,
        peak_gpu_mb=None,
    )


def run_bench(args: list[str], tmp_path: Path) -> tuple[subprocess.CompletedProcess[str], str]:
    out = tmp_path / "BENCHMARKS.md"
    out.write_text("# Benchmarks\n\n## an earlier run\n\n| kept | row |\n")
    proc = subprocess.run(
        [sys.executable, "-m", "probe_sweep.bench", *args, f"--output={out}"]
        + [f"--work-dir={tmp_path}"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=subprocess_timeout(),
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    written = out.read_text()
    assert written.startswith("# Benchmarks\n\n## an earlier run\n\n| kept | row |\n")
    assert "| section | measure | probe_sweep |" in proc.stdout  # printed as well as written
    assert not any(tmp_path.glob("probe_sweep_bench-*")), "work dir left behind"
    return proc, written


def table_rows(written: str, section: str) -> list[list[str]]:
    rows = [line for line in written.splitlines() if line.startswith(f"| {section} |")]
    assert all(line.count("|") == 8 for line in rows), rows
    return [[cell.strip() for cell in line.split("|")[1:-1]] for line in rows]


def test_sections_by_name_number_or_all() -> None:
    assert section_names("scale") == {"scale"}
    assert section_names("1,gpu-scale") == {"extraction", "gpu_scale"}
    assert section_names("all") == set(SECTIONS)
    with pytest.raises(SystemExit, match="no bench section 'nope'"):
        section_names("nope")


def test_scale_report_rows_and_criteria() -> None:
    small, large = figures(80_000, 40.0, 1000), figures(800_000, 400.0, 1200)
    rows, notes = scale_report([(100_000, small), (1_000_000, large)], [], "data=sotu")
    assert [r.section for r in rows] == ["7 scale"] * 4
    assert rows[0].measure.startswith("100,000 tokens (data=sotu, 30,522 classes)")
    assert rows[0].ours.split(" / ")[1] == "10,000"  # 80k tokens x 5 evaluations / 40 s
    rss, fit = rows[2], rows[3]
    assert (rss.ours, rss.reference, rss.ratio, rss.verdict) == ("1,200", "1,000", "1.20x", "meets")
    assert (fit.ratio, fit.verdict) == ("1.00x", "meets")
    assert len(notes) == 2 and "100.00 us per token per evaluation" in notes[0]

    slower, fatter = figures(800_000, 800.0, 1600), figures(800_000, 400.0, 1600, evaluations=10)
    rows, _ = scale_report([(100_000, small), (1_000_000, slower)], [], "x")
    assert [r.verdict for r in rows[2:]] == ["MISSES", "MISSES"]  # 1.6x RSS, 2x per evaluation
    rows, _ = scale_report([(100_000, small), (1_000_000, fatter)], [], "x")
    assert rows[3].ratio == "0.50x"  # twice the evaluations in the same time: cheaper each


def test_scale_report_with_a_budget_skipped() -> None:
    rows, notes = scale_report([(100_000, figures(80_000, 40.0, 1000))], ["5,000,000 no"], "x")
    assert [r.verdict for r in rows[1:]] == ["n/a (fewer than two budgets ran)"] * 2
    assert notes[-1] == "scale: 5,000,000 no"


def test_loop_rate_is_the_last_complete_extraction() -> None:
    log = (
        "Extracting activations: 5/10 sequences (50%), 800 tokens/s, about 2 s left\n"
        "Extracting activations: 10/10 sequences (100%), 1035 tokens/s, done in 4 s\n"
    )
    assert loop_rate(log) == 1035.0
    assert loop_rate("no progress lines") is None


@pytest.mark.e2e
def test_bench_runs_end_to_end_and_appends_its_table(tmp_path: Path) -> None:
    proc, written = run_bench(
        [
            "--model=tiny",
            "--token-budget=2000",
            "--seq-len=64",
            "--memory-budget=1000",
            "--repeats=1",
            "--compare-layers=0",
            "--sk-budget=20",
            "--strengths=1e-4,1e-2",
        ],
        tmp_path,
    )
    for section in DEFAULT_ROWS:
        assert table_rows(written, section), f"no {section} row in\n{written}"
    assert not table_rows(written, "7 scale")  # long sections run only when named
    solver_rows = [row[1] for row in table_rows(written, "2 solver")]
    assert any(row.endswith("ours cold vs ours, streamed") for row in solver_rows), solver_rows
    assert "tiny-gpt2 on cpu" in written and "basis=natural,pca,nmf" in written
    assert "peak RSS MiB at 1000 / 2000 / 4000 tokens" in written


@pytest.mark.e2e
def test_bench_scale_section_from_real_jobs(tmp_path: Path) -> None:
    gpu = ["--gpu-model=tiny", "--gpu-tokens=4000", "--gpu-overrides=probe.max_iter=2 tracker=none"]
    proc, written = run_bench(
        ["--model=tiny", "--only=scale,gpu_scale", "--scale-tokens=2000,4000", *gpu], tmp_path
    )
    rows = table_rows(written, "7 scale")
    assert [r[1].split(" (")[0] for r in rows[:2]] == ["2,000 tokens", "4,000 tokens"]
    for row in rows[:2]:
        extraction, fit, rss, cache = (v.split(" (")[0] for v in row[2].split(" / "))
        assert float(extraction.replace(",", "")) > 0 and float(fit.replace(",", "")) > 0
        assert 100 < float(rss.replace(",", "")) < 10_000  # MiB
        assert 0 < float(cache.replace(",", "")) < 10  # MiB: one 64-wide fp16 layer
    criteria = {r[1].split(" at ")[0]: r for r in rows[2:]}
    assert set(criteria) == {"peak RSS MiB", "fit us per token per solver evaluation"}
    assert all(r[-1] in ("meets", "MISSES") for r in criteria.values())
    assert "scale, 4,000 tokens:" in written and "30,522 classes" in written
    assert "4,000 tokens done" in proc.stderr  # progress lines as it goes
    gpu_rows = table_rows(written, "8 gpu scale")
    if torch.cuda.is_available():  # the tiny model's job on the GPU against its forward pass
        assert len(gpu_rows) == 3 and gpu_rows[0][4].endswith("of bound")
    else:
        assert [r[-1] for r in gpu_rows] == ["skipped (no GPU)"]
