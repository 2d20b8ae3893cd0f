"""The test suite's own rules: child-process time limits, the SLURM opt-in, the e2e marker."""

from __future__ import annotations

import ast
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests import conftest
from tests.conftest import TIMEOUT_S, TIMEOUT_SCALE_VAR, subprocess_timeout, wait_for_line
from tests.jobs.test_slurm import OPT_IN, slurm_opt_out_reason

TESTS = Path(__file__).resolve().parent
# What makes a test end-to-end: it starts a child process or kills one.
CHILD_PROCESS = ("subprocess.", "Popen", "run_cli(", "os.kill(", "os.killpg(")
# Tests that start children but cannot carry the marker yet: their file does not import pytest,
# and only its owner may add that line. Remove an entry once its decorator is in.
PENDING: set[str] = set()
# Tests that name a child-process call but replace it with a fake.
NO_CHILD = {"test_harness.py::test_run_cli_waits_for_the_scaled_limit"}


def test_child_time_limit_is_generous_and_scaled_by_the_environment(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.delenv(TIMEOUT_SCALE_VAR, raising=False)
    assert subprocess_timeout() == TIMEOUT_S >= 1800
    monkeypatch.setenv(TIMEOUT_SCALE_VAR, "2.5")
    assert subprocess_timeout() == 2.5 * TIMEOUT_S
    for bad in ("0", "-1", "fast", "nan"):
        monkeypatch.setenv(TIMEOUT_SCALE_VAR, bad)
        with pytest.raises(ValueError, match=TIMEOUT_SCALE_VAR):
            subprocess_timeout()


def test_run_cli_waits_for_the_scaled_limit(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    seen: dict[str, object] = {}

    def fake_run(cmd: list[str], **kwargs: object) -> subprocess.CompletedProcess[str]:
        seen.update(kwargs)
        return subprocess.CompletedProcess(cmd, 0, "", "")

    monkeypatch.setenv(TIMEOUT_SCALE_VAR, "3")
    monkeypatch.setenv("PROBE_SWEEP_DROP_ME", "x")
    monkeypatch.setattr(conftest.subprocess, "run", fake_run)
    conftest.run_cli(["--help"], cwd=tmp_path, env={"PROBE_SWEEP_DROP_ME": None, "A": "b"})
    assert seen["timeout"] == 3 * TIMEOUT_S
    env = seen["env"]
    assert isinstance(env, dict) and env["A"] == "b" and "PROBE_SWEEP_DROP_ME" not in env


@pytest.mark.e2e
def test_wait_for_line_gives_up_on_a_child_that_never_prints_it() -> None:
    proc = subprocess.Popen(
        [sys.executable, "-c", "import time; print('other', flush=True); time.sleep(600)"],
        stdout=subprocess.PIPE,
        text=True,
    )
    started = time.monotonic()
    try:
        with pytest.raises(AssertionError, match="within 2 s and was killed"):
            wait_for_line(proc, "ready", timeout=2)
    finally:
        proc.kill()
        proc.wait()
    assert time.monotonic() - started < 60


@pytest.mark.parametrize(
    ("env", "runs"),
    [
        ({}, False),
        ({OPT_IN: "1"}, True),
        ({OPT_IN: "true"}, True),
        ({"CI": "true"}, True),
        ({"CI": "1"}, True),
        ({"CI": "false"}, False),
        ({"CI": "true", OPT_IN: "0"}, False),
        ({OPT_IN: ""}, False),
    ],
)
def test_the_real_slurm_cluster_runs_only_when_asked(env: dict[str, str], runs: bool) -> None:
    reason = slurm_opt_out_reason(env)
    assert (reason is None) == runs
    if reason is not None:
        assert f"{OPT_IN}=1" in reason and "/etc/slurm" in reason


def _names(node: ast.AST) -> set[str]:
    return {n.id for n in ast.walk(node) if isinstance(n, ast.Name)}


def _marked_e2e(decorators: list[ast.expr]) -> bool:
    return any("e2e" in ast.unparse(d) for d in decorators)


def test_every_test_that_starts_or_kills_a_process_is_marked_e2e() -> None:
    """Directly, or through a helper function of its module that does."""
    unmarked = []
    for path in sorted(TESTS.rglob("test_*.py")):
        tree = ast.parse(path.read_text())
        source = path.read_text()
        module_marked = any(
            isinstance(node, ast.Assign)
            and any(isinstance(t, ast.Name) and t.id == "pytestmark" for t in node.targets)
            and "e2e" in ast.unparse(node.value)
            for node in tree.body
        )
        functions = [n for n in tree.body if isinstance(n, ast.FunctionDef)]
        spawning = {
            f.name
            for f in functions
            if any(p in ast.get_source_segment(source, f) for p in CHILD_PROCESS)
        }
        for f in functions:
            if not f.name.startswith("test_") or module_marked or _marked_e2e(f.decorator_list):
                continue
            if f.name in spawning or _names(f) & (spawning - {f.name}):
                unmarked.append(f"{path.name}::{f.name}")
    missing = sorted(set(unmarked) - PENDING - NO_CHILD)
    assert not missing, "mark these @pytest.mark.e2e:\n" + "\n".join(missing)
