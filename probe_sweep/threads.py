"""How many threads a job's torch and BLAS may use: the cores it has, not the machine's.

torch and the BLAS libraries start one thread per core of the machine. Jobs that run side by side
then ask for several times the cores there are, and time-slicing their thread pools costs more
than it gains (reported: two jobs on 2 cores took 6x one job, not 2x). joblib passes its workers
OMP_NUM_THREADS = cores // n_jobs, which torch honours, unless the shell already set one; submitit's
local executor, which starts a whole sweep at once, passes nothing. So a job sizes its pools from
its share of the cores: SLURM's allocation, the machine's cores over the jobs running at once, or
an explicit ``PROBE_SWEEP_THREADS``.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping, MutableMapping
from dataclasses import dataclass
from pathlib import Path

import torch

log = logging.getLogger(__name__)

OVERRIDE_VAR = "PROBE_SWEEP_THREADS"
# Read by OpenMP / MKL / OpenBLAS when they load: set for libraries not loaded yet (and child
# processes); threadpoolctl resizes the ones already loaded.
BLAS_VARS = ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS")
JOBLIB_LAUNCHER = "hydra_plugins.hydra_joblib_launcher.joblib_launcher.JoblibLauncher"
SUBMITIT_LOCAL_LAUNCHER = "hydra_plugins.hydra_submitit_launcher.submitit_launcher.LocalLauncher"


@dataclass(frozen=True)
class ThreadPlan:
    """A thread count and the one-line reason for it (what the job logs)."""

    threads: int
    reason: str


def available_cores() -> int:
    """Cores this process may run on (its CPU affinity, which cgroups and taskset narrow)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def joblib_concurrency(n_jobs: int, cores: int) -> int:
    """Jobs joblib runs at once for ``n_jobs``: -1 means one per core, -2 all but one, ..."""
    if n_jobs < 0:
        return max(1, cores + 1 + n_jobs)
    return max(1, n_jobs)


def running_submitit_jobs(submitit_dir: Path) -> int:
    """Jobs of this sweep that submitit's local executor has started and not finished.

    That executor starts every job of a sweep at once, with no limit and no count passed to the
    jobs; each job has ``<id>/<id>_submitted.pkl`` and gets ``<id>_<task>_result.pkl`` when done.
    Counted as a job starts, after its imports, by when the launcher has submitted the whole sweep
    (a job counted early sees fewer neighbours and takes more threads, as before this count).
    """
    running = 0
    for job in submitit_dir.glob("*/*_submitted.pkl"):
        if not any(job.parent.glob("*_result.pkl")):
            running += 1
    return max(1, running)


def concurrent_jobs(
    launcher_target: str | None, n_jobs: int | None, submitit_dir: Path, cores: int
) -> int | None:
    """How many jobs of a multirun run on this machine at once, where the launcher decides it:
    joblib's ``n_jobs``, or the jobs submitit's local executor is running. None otherwise
    (Hydra's basic launcher runs one at a time; SLURM jobs get their own cores)."""
    if launcher_target == JOBLIB_LAUNCHER and n_jobs is not None:
        return joblib_concurrency(int(n_jobs), cores)
    if launcher_target == SUBMITIT_LOCAL_LAUNCHER:
        return running_submitit_jobs(submitit_dir)
    return None


def _positive_int(env: Mapping[str, str], var: str) -> int | None:
    value = env.get(var, "").strip()
    if not value:
        return None
    if value.isdigit() and int(value) >= 1:
        return int(value)
    log.warning("Ignoring %s=%r: not a positive whole number", var, value)
    return None


def plan_threads(
    cores: int, env: Mapping[str, str], concurrent_jobs: int | None = None
) -> ThreadPlan:
    """Threads for one job.

    ``PROBE_SWEEP_THREADS`` decides outright. Otherwise the job's cores: SLURM's
    ``SLURM_CPUS_PER_TASK``, else ``cores // concurrent_jobs`` (at least 1) when the launcher runs
    ``concurrent_jobs`` jobs on this machine at once, else every core; an ``OMP_NUM_THREADS``
    already set (by the user, or by joblib in its workers) caps that.
    """
    override = _positive_int(env, OVERRIDE_VAR)
    if override is not None:
        return ThreadPlan(override, f"{OVERRIDE_VAR}={override}")
    slurm = _positive_int(env, "SLURM_CPUS_PER_TASK")
    if slurm is not None:
        plan = ThreadPlan(slurm, f"SLURM_CPUS_PER_TASK={slurm}")
    elif concurrent_jobs is not None and concurrent_jobs > 1:
        threads = max(1, cores // concurrent_jobs)
        plan = ThreadPlan(threads, f"{cores} cores shared by {concurrent_jobs} concurrent jobs")
    else:
        plan = ThreadPlan(cores, f"all {cores} cores")
    cap = _positive_int(env, "OMP_NUM_THREADS")
    if cap is not None and cap < plan.threads:
        return ThreadPlan(cap, f"{plan.reason}, capped by OMP_NUM_THREADS={cap}")
    return plan


def apply_threads(threads: int, env: MutableMapping[str, str] | None = None) -> None:
    """Size torch's intra-op pool and the BLAS pools (loaded and yet to load) to ``threads``."""
    env = os.environ if env is None else env
    torch.set_num_threads(threads)
    for var in BLAS_VARS:
        env[var] = str(threads)
    try:
        from threadpoolctl import threadpool_limits
    except ImportError:
        return
    threadpool_limits(limits=threads)


def configure_threads(concurrent_jobs: int | None = None) -> ThreadPlan:
    """Plan this job's threads from its environment, apply them, and log the choice in one line."""
    plan = plan_threads(available_cores(), os.environ, concurrent_jobs)
    apply_threads(plan.threads)
    log.info(
        "Threads: %d for torch and BLAS (%s; %s=N overrides)",
        plan.threads,
        plan.reason,
        OVERRIDE_VAR,
    )
    return plan
