"""Progress reporting: a bar on a terminal, a bounded number of log lines in a log (SLURM, CI)."""

from __future__ import annotations

import io
import logging
import re
import subprocess
import sys
from pathlib import Path

import pytest

from probe_sweep.progress import ExtractionProgress
from tests.conftest import TINY, subprocess_timeout

# What a progress bar leaves in a log: tqdm's "  40%|████      | 8/20 [00:01<00:02, 5.1seq/s]".
BAR = re.compile(r"\d+%\|")


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def progress_lines(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if "Extracting activations" in r.getMessage()]


def test_off_a_terminal_extraction_logs_a_line_per_tenth_and_draws_no_bar(
    caplog: pytest.LogCaptureFixture,
) -> None:
    stream = io.StringIO()
    with caplog.at_level(logging.INFO, logger="probe_sweep"):
        with ExtractionProgress(1000, 64000, 7, stream=stream) as progress:
            for _ in range(1000):
                progress.update(1, 64)
    assert stream.getvalue() == ""
    lines = progress_lines(caplog)
    assert len(lines) == 1 + ExtractionProgress.STEPS, lines
    assert "1000 sequences, 64000 tokens, 7 layers" in lines[0]
    assert "100/1000 sequences (10%)" in lines[1] and "tokens/s" in lines[1]
    assert "1000/1000 sequences (100%)" in lines[-1] and "done in" in lines[-1]
    assert all(r.name.startswith("probe_sweep") for r in caplog.records)


def test_few_large_batches_log_once_per_batch_at_most(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.INFO, logger="probe_sweep"):
        with ExtractionProgress(10, 640, 3, stream=io.StringIO()) as progress:
            for _ in range(3):
                progress.update(4, 256)  # the last batch overshoots, as a short final batch can't
    assert len(progress_lines(caplog)) == 1 + 3


def test_on_a_terminal_extraction_draws_the_bar_and_logs_nothing(
    caplog: pytest.LogCaptureFixture,
) -> None:
    stream = Terminal()
    with caplog.at_level(logging.INFO, logger="probe_sweep"):
        with ExtractionProgress(20, 1280, 3, stream=stream) as progress:
            for _ in range(20):
                progress.update(1, 64)
    drawn = stream.getvalue()
    assert "extract activations" in drawn and "20/20" in drawn and "\r" in drawn
    assert progress_lines(caplog) == []


def test_library_bars_are_turned_off_only_off_a_terminal(monkeypatch: pytest.MonkeyPatch) -> None:
    import huggingface_hub.utils
    import transformers.utils.logging

    from probe_sweep.cli import progress_bars_on_terminal_only

    monkeypatch.delenv("HF_HUB_DISABLE_PROGRESS_BARS", raising=False)
    try:
        monkeypatch.setattr("sys.stderr", Terminal())
        progress_bars_on_terminal_only()
        assert transformers.utils.logging.is_progress_bar_enabled()
        assert not huggingface_hub.utils.are_progress_bars_disabled()
        monkeypatch.setattr("sys.stderr", io.StringIO())
        progress_bars_on_terminal_only()
        assert not transformers.utils.logging.is_progress_bar_enabled()
        assert huggingface_hub.utils.are_progress_bars_disabled()
    finally:
        transformers.utils.logging.enable_progress_bar()
        huggingface_hub.utils.enable_progress_bars()


@pytest.mark.e2e
def test_a_job_logging_to_a_pipe_writes_no_bar_redraws(tmp_path: Path) -> None:
    """stderr and stdout piped, as under SLURM or CI: no carriage-return redraws, no bar lines,
    and a bounded number of progress lines however many batches the extraction takes. Read as
    bytes: text mode (``run_cli``) would turn each ``\\r`` into a newline."""
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "probe_sweep",
            *TINY,
            "activations.batch_size=2",
            "hydra.run.dir=out",
        ],
        cwd=tmp_path,
        capture_output=True,
        timeout=subprocess_timeout(),
    )
    output = (proc.stdout + proc.stderr).decode()
    assert proc.returncode == 0, output[-3000:]
    assert "\r" not in output, output[-3000:]
    assert not [line for line in output.splitlines() if BAR.search(line)], output[-3000:]
    extraction = [line for line in output.splitlines() if "Extracting activations" in line]
    assert 2 <= len(extraction) <= 1 + ExtractionProgress.STEPS, output[-3000:]
    assert "(100%)" in extraction[-1] and "tokens/s" in extraction[-1]
    log_file = (tmp_path / "out" / "probe_sweep.log").read_bytes().decode()
    assert "\r" not in log_file and log_file.count("Extracting activations") == len(extraction)
