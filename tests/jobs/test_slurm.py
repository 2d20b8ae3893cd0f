"""A real SLURM cluster: launchers/slurm_cluster.sh brings up slurmctld + slurmd on this machine,
the sweep goes out as an array job through the `slurm` launcher preset, and the cluster is torn
down at the end.

Opt-in: as root this installs slurm-wlm and munge with apt-get, writes /etc/slurm and /etc/munge
and starts daemons, which no plain `pytest` may do to a developer's machine. It runs when
PROBE_SWEEP_SLURM_TEST=1 or CI=true (CI sets it); PROBE_SWEEP_SLURM_TEST=0 skips it even in CI.
Otherwise, and where SLURM cannot be installed (not Linux, not root, no apt-get, packages
unreachable), it is skipped with the reason."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator, Mapping
from pathlib import Path

import pytest

from tests.conftest import REPO, run_cli, subprocess_timeout

# One cluster for both tests: under pytest-xdist they run on one worker.
pytestmark = [pytest.mark.e2e, pytest.mark.xdist_group("slurm")]

SCRIPT = REPO / "launchers" / "slurm_cluster.sh"
CANNOT_INSTALL = 3
OPT_IN = "PROBE_SWEEP_SLURM_TEST"
YES, NO = {"1", "true", "yes"}, {"0", "false", "no"}
# Launcher tests check fan-out, not the null statistics (seconds per job): those are off.
FAST = [
    "model=tiny",
    "data.token_budget=2000",
    "data.seq_len=64",
    "probe.tol=1e-2",
    "tracker.mode=disabled",
    "statistics.enabled=false",
]
# The preset as a user sets it for this one-node cluster (no GPUs, small jobs).
SLURM = [
    "hydra/launcher=slurm",
    "hydra.launcher.partition=debug",
    "hydra.launcher.gpus_per_node=null",
    "hydra.launcher.cpus_per_task=1",
    "hydra.launcher.mem_gb=1",
    "hydra.launcher.timeout_min=10",
    "hydra.launcher.setup=['export PROBE_SWEEP_SETUP=ran']",
]


def slurm_opt_out_reason(env: Mapping[str, str]) -> str | None:
    """Why the real-cluster tests do not run here, or None when they were asked for."""
    asked = env.get(OPT_IN, "").strip().lower()
    if asked in YES:
        return None
    if asked not in NO and env.get("CI", "").strip().lower() in YES:
        return None
    return (
        "the real SLURM cluster test is opt-in: it installs and starts slurmctld, slurmd and "
        f"munged as root and writes /etc/slurm and /etc/munge; run it with {OPT_IN}=1 "
        "(CI=true runs it too)"
    )


@pytest.fixture(scope="module")
def slurm_cluster() -> Iterator[None]:
    reason = slurm_opt_out_reason(os.environ)
    if reason is not None:
        pytest.skip(reason)
    if not sys.platform.startswith("linux"):
        pytest.skip("SLURM cannot be installed here: launchers/slurm_cluster.sh needs Linux")
    have_slurm = all(shutil.which(t) for t in ("slurmctld", "slurmd", "munged"))
    if not have_slurm and (os.geteuid() != 0 or not shutil.which("apt-get")):
        pytest.skip("SLURM cannot be installed here: it is absent and installing needs root + apt")
    up = subprocess.run(
        ["bash", str(SCRIPT), "up"],
        capture_output=True,
        text=True,
        timeout=subprocess_timeout(),
        check=False,
    )
    if up.returncode == CANNOT_INSTALL:
        pytest.skip(up.stderr.strip().splitlines()[-1])
    assert up.returncode == 0, f"the cluster did not come up:\n{up.stdout}\n{up.stderr}"
    try:
        yield
    finally:
        if up.stdout.strip() == "started":
            subprocess.run(["bash", str(SCRIPT), "down"], timeout=subprocess_timeout(), check=False)


def test_a_sweep_runs_as_a_slurm_array_job_with_one_shared_cache(
    slurm_cluster: None, tmp_path: Path
) -> None:
    sweep = tmp_path / "sweep"
    proc = run_cli(
        ["-m", *SLURM, *FAST, "basis=pca,nmf,natural", f"hydra.sweep.dir={sweep}"], cwd=tmp_path
    )
    metrics = [json.loads(p.read_text()) for p in sorted(sweep.glob("*/metrics.json"))]
    assert len(metrics) == 3, proc.stdout + proc.stderr
    assert not list(sweep.glob("*/failed.json"))
    jobs = [m["job"] for m in metrics]
    assert all(j["slurm_job_id"] for j in jobs), jobs
    assert len({j["slurm_job_id"] for j in jobs}) == 3
    assert len({j["slurm_array_job_id"] for j in jobs}) == 1, "not one array job"
    assert sorted(j["slurm_array_task_id"] for j in jobs) == ["0", "1", "2"]
    assert {j["slurm_partition"] for j in jobs} == {"debug"}
    for m in metrics:
        assert [row["layer"] for row in m["layers"]] == [0, 1, 2]
        assert all(0 <= row["top1"] <= 1 for row in m["layers"])
    assert len({m["job"]["key"] for m in metrics}) == 3

    # The cache: one entry, computed by exactly one job; the others reused it.
    logs = "".join(p.read_text() for p in sweep.glob("*/probe_sweep.log"))
    assert logs.count("Cached activations") == 1, logs
    assert logs.count("Reusing cached activations") == 2
    assert sorted(m["cache"]["reused"] for m in metrics) == [False, True, True]
    assert len({m["cache"]["key"] for m in metrics}) == 1

    # What went to sbatch: one array of 3 on the partition, with the setup lines.
    array_id = jobs[0]["slurm_array_job_id"]
    script = (sweep / ".submitit" / array_id / f"{array_id}_submission.sh").read_text()
    assert "#SBATCH --array=0-2" in script and "#SBATCH --partition=debug" in script
    assert "export PROBE_SWEEP_SETUP=ran" in script
    state = show_job(array_id)
    assert "JobState=COMPLETED" in state, state


def test_a_timed_out_job_is_requeued_and_resumes_from_the_cache(
    slurm_cluster: None, tmp_path: Path
) -> None:
    """SIGUSR2 is what SLURM sends signal_delay_s before the time limit; submitit checkpoints
    the job and requeues it, and the second run reuses the activations the first one cached and
    the probe it had fitted."""
    sweep = tmp_path / "sweep"
    args = [
        "-m",
        *SLURM,
        *FAST,
        # Seconds of fitting per probe, so the signal lands mid-job even on an idle node:
        # 20k tokens of the large corpus, thousands of classes, to the default tolerance.
        "data=sotu",
        "data.token_budget=20000",
        "probe.tol=1e-4",
        "layers=subset",
        "layers.indices=[0,1]",
        f"hydra.sweep.dir={sweep}",
    ]
    proc = subprocess.Popen(
        [sys.executable, "-m", "probe_sweep", *args],
        cwd=tmp_path,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        deadline = time.monotonic() + subprocess_timeout()
        while time.monotonic() < deadline:
            if list(sweep.glob("*/.fits/layer_0.safetensors")):
                break
            assert proc.poll() is None, proc.communicate()[0]
            time.sleep(0.2)
        (job_dir,) = [p.name for p in (sweep / ".submitit").iterdir() if p.name.isdigit()]
        subprocess.run(
            ["scancel", "--signal=USR2", job_dir], check=True, timeout=subprocess_timeout()
        )
        # A requeued job goes back to PENDING with a begin time two minutes out; once it is
        # pending again (an update sent before the requeue is overwritten), move its start to a
        # few seconds from now, once. Not to now: the node revoked the first run's credential at
        # the requeue, to the second, and a run launched within that second is killed at once
        # ("Job credential revoked"), which leaves submitit waiting for a result that never comes.
        moved = False
        deadline = time.monotonic() + subprocess_timeout()
        while True:
            state = show_job(job_dir)
            if any(f"JobState={s} " in state for s in ENDED):
                break
            if not moved and "Restarts=1" in state and "JobState=PENDING" in state:
                update = ["scontrol", "update", f"jobid={job_dir}", "StartTime=now+5"]
                moved = subprocess.run(update, timeout=subprocess_timeout()).returncode == 0
            assert time.monotonic() < deadline, f"the job did not end: {state}"
            time.sleep(0.5)
        assert "Restarts=1" in state, f"the job ended without being requeued: {state}"
        assert "JobState=COMPLETED " in state, f"{state}\n{job_logs(sweep)}"
        out, _ = proc.communicate(timeout=subprocess_timeout())
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, out
    (metrics_path,) = sweep.glob("*/metrics.json")
    metrics = json.loads(metrics_path.read_text())
    assert metrics["job"]["slurm_job_id"] == job_dir
    assert metrics["job"]["slurm_restart_count"] == "1"
    assert metrics["cache"]["reused"] is True, "the requeued job extracted again"
    log = (metrics_path.parent / "probe_sweep.log").read_text()
    assert log.count("Cached activations") == 1 and log.count("Reusing cached activations") == 1
    assert log.count("Resumed layer_0") == 1 and "Resumed layer_1" not in log


# States of a job that has stopped for good; a requeued job is PENDING again, not one of these.
ENDED = ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY")


def job_logs(sweep: Path) -> str:
    """The last lines of each run's submitit logs, for a failure message."""
    return "\n".join(
        f"--- {log.name}\n" + "\n".join(log.read_text(errors="replace").splitlines()[-20:])
        for log in sorted((sweep / ".submitit").glob("*/*_log.*"))
    )


def show_job(job_id: str) -> str:
    """``scontrol show job``'s record of the job. A loaded controller can time out on a query
    (no output, an error): that is asked again, so an empty answer never stands for a state."""
    deadline = time.monotonic() + subprocess_timeout()
    while True:
        shown = subprocess.run(
            ["scontrol", "show", "job", job_id],
            capture_output=True,
            text=True,
            check=False,
            timeout=subprocess_timeout(),
        )
        if shown.returncode == 0 and shown.stdout.strip():
            return shown.stdout
        assert "Invalid job id" not in shown.stderr, f"job {job_id} left the queue: {shown.stderr}"
        assert time.monotonic() < deadline, f"scontrol show job {job_id}: {shown.stderr}"
        time.sleep(1)
