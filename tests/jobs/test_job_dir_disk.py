"""A job dir that cannot take the results: a full disk, a read-only one, and Ctrl-C before the
job starts. Each is one ``error:`` line (or one line on what was kept), never a traceback, and
nothing half written is left behind."""

from __future__ import annotations

import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from tests.conftest import REPO, TINY, remount_read_only, run_cli, subprocess_timeout

QUICK = [*TINY, "statistics.enabled=false", "tracker=none"]


def leftovers(root: Path) -> list[str]:
    return sorted(str(p.relative_to(root)) for p in root.rglob("*.tmp-*"))


@pytest.mark.e2e
def test_a_full_job_dir_disk_is_one_error_line_and_leaves_no_temporary_file(
    tmp_path: Path, small_fs: Callable[..., Path]
) -> None:
    """Used to be a traceback from write_tensors, a second from write_failed, and a 0-byte
    .failed.json.tmp-<pid>. The three probes (563 x 64 each) need about 0.4 MiB."""
    disk = small_fs("160k")
    proc = run_cli([*QUICK, f"hydra.run.dir={disk / 'job'}"], tmp_path, check=False)
    output = proc.stdout + proc.stderr
    assert proc.returncode == 2, output[-3000:]
    assert "Traceback" not in output
    [line] = [x for x in output.splitlines() if "error:" in x]
    assert f"the disk of {disk / 'job'} is full" in line and "bytes needed" in line
    assert "bytes free" in line and "run the same command again" in line
    assert leftovers(disk) == []
    assert not (disk / "job" / "metrics.json").exists()


@pytest.mark.e2e
@pytest.mark.parametrize("existing", [False, True], ids=["new-dir", "existing-dir"])
def test_a_read_only_job_dir_is_one_error_line(
    tmp_path: Path, small_fs: Callable[..., Path], existing: bool
) -> None:
    disk = small_fs("1m")
    job = disk / "job"
    if existing:
        job.mkdir()
        (job / "metrics.json").write_text("{}")
    remount_read_only(disk)
    proc = run_cli([*QUICK, f"hydra.run.dir={job}"], tmp_path, check=False)
    output = proc.stdout + proc.stderr
    assert proc.returncode == 2, output[-3000:]
    assert "Traceback" not in output and len(output.strip().splitlines()) == 1, output
    assert output.startswith(f"error: cannot write the job dir {job}: Read-only file system")
    assert "hydra.run.dir=<dir>" in output
    sweep = run_cli(["-m", *QUICK, "seed=0,1", f"hydra.sweep.dir={job}"], tmp_path, check=False)
    assert sweep.returncode == 2 and "with hydra.sweep.dir=<dir>" in sweep.stderr


@pytest.mark.e2e
def test_help_needs_no_writable_dir(tmp_path: Path, small_fs: Callable[..., Path]) -> None:
    disk = small_fs("1m", read_only=True)
    proc = run_cli(["--help"], disk)
    assert "== Config groups" in proc.stdout


@pytest.mark.e2e
@pytest.mark.parametrize("multirun", [False, True], ids=["run", "multirun"])
def test_ctrl_c_while_starting_is_one_line(tmp_path: Path, multirun: bool) -> None:
    """Ctrl-C in the first seconds gave an ImportError ("cannot load module more than once per
    process") or a KeyboardInterrupt traceback, and a single run was told to resume with
    hydra.sweep.dir=."""
    flags, sweep = (["-m"], ["seed=0,1"]) if multirun else ([], [])
    lines = []
    for delay in (0.5, 1.5, 3.0):  # while importing, and while Hydra composes the config
        proc = subprocess.Popen(
            [sys.executable, "-m", "probe_sweep", *flags, *QUICK, *sweep, "hydra.run.dir=out"],
            cwd=tmp_path,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        time.sleep(delay)
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=subprocess_timeout())
        output = out + err
        if proc.returncode == 0:
            continue  # finished before the signal (a fast machine): nothing to check
        assert proc.returncode == -signal.SIGINT, output[-3000:]
        assert "Traceback" not in output and "Error" not in output, output[-3000:]
        lines.append(output.strip().splitlines()[-1])
    assert lines, "every run finished before Ctrl-C"
    for line in lines:
        assert "Interrupted" in line, line
        if "resume" in line:
            expected = "hydra.sweep.dir=" if multirun else "hydra.run.dir="
            assert expected in line, line
        else:
            assert "nothing was run or written" in line, line


@pytest.mark.e2e
def test_the_entry_module_imports_nothing_heavy() -> None:
    """The SIGINT guard is only in place while cli.py's imports run: __main__ itself must load
    at once."""
    code = "import sys, probe_sweep.__main__ as m; print('torch' in sys.modules)"
    proc = subprocess.run(
        [sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120
    )
    assert proc.stdout.strip() == "False", proc.stderr
