"""Where a job runs: its scheduler ids, the local GPU that is its own, and the resolvers the
launcher presets use. What a job leaves in its directory is ``jobdir.py``'s."""

from __future__ import annotations

import contextlib
import copyreg
import importlib
import logging
import os
import socket
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from filelock import FileLock, Timeout
from omegaconf import OmegaConf

from probe_sweep.jobs.jobdir import job_dir_name, not_in_key

log = logging.getLogger(__name__)

SLURM_VARS = {
    "slurm_job_id": "SLURM_JOB_ID",
    "slurm_array_job_id": "SLURM_ARRAY_JOB_ID",
    "slurm_array_task_id": "SLURM_ARRAY_TASK_ID",
    "slurm_restart_count": "SLURM_RESTART_COUNT",
    "slurm_partition": "SLURM_JOB_PARTITION",
}


def scheduler_record(key: str, overrides: list[str]) -> dict[str, Any]:
    """Where and under which scheduler ids this job ran; stored as ``metrics["job"]``."""
    info: dict[str, Any] = {"key": key, "overrides": overrides}
    info.update({name: os.environ.get(var) for name, var in SLURM_VARS.items()})
    info.update({"host": socket.gethostname(), "pid": os.getpid()})
    return info


def cuda_count() -> int:
    import torch

    return torch.cuda.device_count() if torch.cuda.is_available() else 0


@contextlib.contextmanager
def claim_gpu(
    device: str, n_devices: int | None = None, lock_dir: Path | None = None, poll_s: float = 1.0
) -> Iterator[str]:
    """With ``device=auto`` and several visible GPUs, hold one GPU for this job alone.

    Jobs on one machine (the joblib launcher's workers, or several sweeps at once) take the first
    free per-GPU lock, so no two share a GPU; a job waits while every GPU is taken. With one GPU,
    none, or an explicit device (as under SLURM, which sets CUDA_VISIBLE_DEVICES per job) the
    device passes through unchanged.
    """
    count = cuda_count() if n_devices is None else n_devices
    if device != "auto" or count < 2:
        yield device
        return
    lock_dir = lock_dir or Path(tempfile.gettempdir())
    # Locks are named by physical GPU, so jobs that see the GPUs through different
    # CUDA_VISIBLE_DEVICES settings still never share one.
    visible = os.environ.get("CUDA_VISIBLE_DEVICES", "").split(",")
    physical = visible if len(visible) == count else [str(i) for i in range(count)]
    locks = [
        FileLock(str(lock_dir / f"probe_sweep-{os.getuid()}-gpu-{gpu.strip()}.lock"))
        for gpu in physical
    ]
    waited = False
    while True:
        for index, lock in enumerate(locks):
            try:
                lock.acquire(timeout=0)
            except Timeout:
                continue
            try:
                log.info("This job has GPU cuda:%d to itself", index)
                yield f"cuda:{index}"
            finally:
                lock.release()
            return
        if not waited:
            log.info("All %d GPUs are taken by other jobs; waiting for one", count)
            waited = True
        time.sleep(poll_s)


def local_jobs() -> int:
    """How many jobs the ``local`` launcher preset runs at once: one per GPU, else up to 4."""
    gpus = cuda_count()
    return gpus if gpus > 1 else max(1, min(4, os.cpu_count() or 1))


def prepare_launchers() -> None:
    """Register the resolvers the launcher presets and conf/config.yaml use."""
    if not OmegaConf.has_resolver("probe_sweep_job_dir"):
        OmegaConf.register_new_resolver("probe_sweep_job_dir", job_dir_name)
    if not OmegaConf.has_resolver("probe_sweep_not_in_key"):
        OmegaConf.register_new_resolver("probe_sweep_not_in_key", not_in_key)
    if not OmegaConf.has_resolver("probe_sweep_local_jobs"):
        OmegaConf.register_new_resolver("probe_sweep_local_jobs", local_jobs)
    if not OmegaConf.has_resolver("probe_sweep_gpus"):
        OmegaConf.register_new_resolver("probe_sweep_gpus", cuda_count)


def _import_module(name: str) -> Any:
    return importlib.import_module(name)


def _pickle_torch_classes_by_name() -> None:
    """cloudpickle (joblib, submitit) pickles a task defined in ``__main__`` (a script calling
    ``cli.main``) by value, with the submodules its names touch: ``config.probe.classes`` pulls
    in ``torch.classes``, which pickle cannot handle. Pickle it as a re-import instead. Done at
    import, so it also holds in a SLURM job (which imports this module when it unpickles the
    task) when submitit pickles the task again to requeue it."""
    import torch

    copyreg.pickle(type(torch.classes), lambda _: (_import_module, ("torch.classes",)))


_pickle_torch_classes_by_name()
