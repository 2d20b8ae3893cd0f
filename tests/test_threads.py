"""Thread counts per job: the job's share of the cores, whichever launcher runs it."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
import torch

from probe_sweep import threads
from probe_sweep.threads import (
    JOBLIB_LAUNCHER,
    SUBMITIT_LOCAL_LAUNCHER,
    ThreadPlan,
    concurrent_jobs,
    joblib_concurrency,
    plan_threads,
)


@pytest.mark.parametrize(
    ("cores", "env", "jobs", "threads_"),
    [
        (16, {}, None, 16),  # alone: every core
        (16, {}, 1, 16),
        (16, {}, 4, 4),  # joblib n_jobs=4
        (2, {}, 2, 1),  # the 2-core machine, two jobs: one thread each, not two
        (2, {}, 4, 1),  # never below one
        (10, {}, 3, 3),  # rounded down: 3 x 3 <= 10
        (64, {"SLURM_CPUS_PER_TASK": "8"}, None, 8),  # SLURM's allocation, not the node
        (64, {"SLURM_CPUS_PER_TASK": "8"}, 4, 8),
        (16, {"PROBE_SWEEP_THREADS": "3"}, 4, 3),  # explicit: decides outright
        (16, {"PROBE_SWEEP_THREADS": "32", "OMP_NUM_THREADS": "1"}, None, 32),
        (16, {"OMP_NUM_THREADS": "2"}, None, 2),  # the user's (or joblib's) cap
        (16, {"OMP_NUM_THREADS": "8"}, 4, 4),  # a cap above the share changes nothing
        (16, {"SLURM_CPUS_PER_TASK": "8", "OMP_NUM_THREADS": "1"}, None, 1),
    ],
)
def test_threads_are_the_jobs_share_of_the_cores(
    cores: int, env: dict[str, str], jobs: int | None, threads_: int
) -> None:
    assert plan_threads(cores, env, jobs).threads == threads_


def test_the_plan_says_why() -> None:
    assert plan_threads(2, {}, 2) == ThreadPlan(1, "2 cores shared by 2 concurrent jobs")
    assert plan_threads(8, {}).reason == "all 8 cores"
    assert plan_threads(8, {"SLURM_CPUS_PER_TASK": "4"}).reason == "SLURM_CPUS_PER_TASK=4"
    capped = plan_threads(8, {"OMP_NUM_THREADS": "2"})
    assert capped.reason == "all 8 cores, capped by OMP_NUM_THREADS=2"


@pytest.mark.parametrize("bad", ["0", "-2", "four", "1.5"])
def test_a_bad_setting_is_ignored_with_a_warning(
    bad: str, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.WARNING, logger="probe_sweep.threads"):
        plan = plan_threads(4, {"PROBE_SWEEP_THREADS": bad, "SLURM_CPUS_PER_TASK": bad})
    assert plan == ThreadPlan(4, "all 4 cores")
    assert len(caplog.records) == 2 and bad in caplog.records[0].getMessage()


@pytest.mark.parametrize(
    ("n_jobs", "cores", "at_once"),
    [(4, 16, 4), (1, 16, 1), (-1, 16, 16), (-2, 16, 15), (-32, 4, 1)],
)
def test_joblib_n_jobs_counts_like_joblib(n_jobs: int, cores: int, at_once: int) -> None:
    assert joblib_concurrency(n_jobs, cores) == at_once


def submitted(root: Path, job_id: str, done: bool) -> None:
    job = root / job_id
    job.mkdir(parents=True)
    (job / f"{job_id}_submitted.pkl").write_bytes(b"")
    if done:
        (job / f"{job_id}_0_result.pkl").write_bytes(b"")


def test_each_launcher_says_how_many_jobs_share_the_machine(tmp_path: Path) -> None:
    folder = tmp_path / ".submitit"
    for job_id, done in (("101", False), ("102", False), ("103", True), ("104", False)):
        submitted(folder, job_id, done)
    assert concurrent_jobs(JOBLIB_LAUNCHER, 3, folder, 16) == 3
    assert concurrent_jobs(JOBLIB_LAUNCHER, -1, folder, 16) == 16
    # submitit's local executor starts the whole sweep at once: the unfinished jobs.
    assert concurrent_jobs(SUBMITIT_LOCAL_LAUNCHER, None, folder, 16) == 3
    assert concurrent_jobs(SUBMITIT_LOCAL_LAUNCHER, None, tmp_path / "none", 16) == 1
    basic = "hydra._internal.core_plugins.basic_launcher.BasicLauncher"
    assert concurrent_jobs(basic, None, folder, 16) is None  # one job at a time
    slurm = "hydra_plugins.hydra_submitit_launcher.submitit_launcher.SlurmLauncher"
    assert concurrent_jobs(slurm, None, folder, 16) is None  # SLURM gives each job its cores


def test_configure_sets_torch_and_blas_and_logs_one_line(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    before = torch.get_num_threads()
    for var in (*threads.BLAS_VARS, "SLURM_CPUS_PER_TASK", "PROBE_SWEEP_THREADS"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setattr(threads, "available_cores", lambda: 4)
    calls: list[int] = []

    def threadpool_limits(limits: int) -> None:  # threadpoolctl's, for the BLAS already loaded
        calls.append(limits)

    monkeypatch.setattr("threadpoolctl.threadpool_limits", threadpool_limits)
    try:
        with caplog.at_level(logging.INFO, logger="probe_sweep.threads"):
            plan = threads.configure_threads(concurrent_jobs=2)
        assert plan.threads == 2 and torch.get_num_threads() == 2
        assert all(threads.os.environ[var] == "2" for var in threads.BLAS_VARS)
        assert calls == [2]
        (record,) = caplog.records
        assert record.getMessage().startswith("Threads: 2 for torch and BLAS (4 cores shared by 2")
    finally:
        torch.set_num_threads(before)
