"""What a job in a sweep needs to know about the sweep: its content key, whether identical
results already exist (and whether the tracker logged them), how it failed, which SLURM job ran
it, which local GPU is its own, and which probes an earlier attempt of it already fitted.

A job's results are complete when its ``metrics.json`` carries a ``job`` section (written last,
after every other file) whose ``key`` hashes the job's resolved config. Re-running a sweep into
the same ``hydra.sweep.dir`` therefore skips finished jobs whatever their job number, and reruns
jobs that failed, were killed, or whose results were deleted.
"""

from __future__ import annotations

import contextlib
import copyreg
import dataclasses
import hashlib
import importlib
import json
import logging
import os
import shutil
import socket
import tempfile
import time
import typing
from collections.abc import Callable, Iterator
from enum import Enum
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
import torch
from filelock import FileLock, Timeout
from omegaconf import OmegaConf
from safetensors import safe_open
from safetensors.torch import save_file

from probe_sweep.files import temp_path, write_json
from probe_sweep.probes import FitResult

log = logging.getLogger(__name__)

FAILED = "failed.json"
SKIPPED = "skipped.json"
PRUNED = "pruned.json"  # an Optuna trial its study stopped (written by the sweeper)
METRICS = "metrics.json"
SCHEMA_VERSION = 1  # of metrics.json (README); part of every job's content key
# Written after the tracker logged the job's results: a job killed between metrics.json and
# tracking has none, and a rerun that skips it tracks it then (see ``is_tracked``).
TRACKED = "tracked.json"
WANDB_RUN = "wandb_run.json"  # what the tracker writes where a run went (README)
FITS = ".fits"
FIT_SUFFIX = ".safetensors"
T = TypeVar("T")
# The one list of config keys outside a job's identity (its content key, the W&B config hash, the
# job dir's name): they change where, how fast or how a job is tracked and tuned, not its numbers.
# ``device`` moves the arithmetic (float rounding, not results); ``tuning`` names the study and
# trial a job reports to and which metric it returns, read from the same results either way.
NOT_IN_KEY: tuple[str, ...] = (
    "redo",
    "device",
    "tracker",
    "tuning",
    "activations.cache_dir",
    "activations.batch_size",
)
SLURM_VARS = {
    "slurm_job_id": "SLURM_JOB_ID",
    "slurm_array_job_id": "SLURM_ARRAY_JOB_ID",
    "slurm_array_task_id": "SLURM_ARRAY_TASK_ID",
    "slurm_restart_count": "SLURM_RESTART_COUNT",
    "slurm_partition": "SLURM_JOB_PARTITION",
}


def keyed_content(resolved: dict[str, Any]) -> dict[str, Any]:
    """A JSON copy of the resolved config without the ``NOT_IN_KEY`` settings: what identifies
    a job's results."""
    content = json.loads(json.dumps(resolved, default=str))
    for dotted in NOT_IN_KEY:
        *parents, leaf = dotted.split(".")
        node = content
        for part in parents:
            node = node.get(part, {}) if isinstance(node, dict) else {}
        if isinstance(node, dict):
            node.pop(leaf, None)
    return content


def job_key(resolved: dict[str, Any], schema_version: Any = None) -> str:
    """A content key for one job: the resolved config minus settings that leave results alone."""
    blob = json.dumps({"config": keyed_content(resolved), "schema": schema_version}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:20]


def not_in_key() -> list[str]:
    """``NOT_IN_KEY`` as the list ``hydra.job.config.override_dirname.exclude_keys`` takes
    (resolver ``${probe_sweep_not_in_key:}``), so a job dir is not named by them either."""
    return list(NOT_IN_KEY)


def find_complete(root: Path, key: str) -> Path | None:
    """The job directory under ``root`` holding complete results for ``key``, if any."""
    for path in sorted(root.rglob(METRICS)):
        try:
            metrics = json.loads(path.read_text())
        except (OSError, ValueError):
            continue
        if isinstance(metrics, dict) and (metrics.get("job") or {}).get("key") == key:
            return path.parent
    return None


def load_metrics(job_dir: Path) -> dict[str, Any]:
    return json.loads((job_dir / METRICS).read_text())


def clear_markers(out_dir: Path, redo: bool) -> None:
    """Remove what an earlier attempt left in this job's directory before running it again
    (with ``redo``, also its results and the probes it had fitted)."""
    for name in (FAILED, SKIPPED, PRUNED, TRACKED, *((METRICS,) if redo else ())):
        (out_dir / name).unlink(missing_ok=True)
    if redo:
        discard_fits(out_dir)


def discard_fits(out_dir: Path) -> None:
    """Drop the probes saved for resuming: the results are written, or will never be."""
    shutil.rmtree(out_dir / FITS, ignore_errors=True)


class FitCheckpoint:
    """The probes an unfinished job has fitted so far, one file each in ``out_dir/.fits``, so
    that a requeued, preempted or killed job that runs again in the same directory resumes after
    the last probe it finished instead of fitting them all again.

    Each fit is a ``kind`` dataclass (``FitResult``) saved as ``<name>.safetensors``: tensors and
    module state dicts as tensors, every other field as JSON in the file's metadata (see
    ``save_fit``). Nothing is ever unpickled, so a file planted in a job dir cannot run code; a
    file that does not read back as a ``kind`` is refused with one warning and fitted again.
    Files are kept under the job's content key: those of another config are dropped. ``discard``
    once the results are written.
    """

    def __init__(
        self, out_dir: Path, key: str, device: torch.device, kind: type[Any] = FitResult
    ) -> None:
        self.out_dir, self.dir, self.device, self.kind = out_dir, out_dir / FITS, device, kind
        stamp = self.dir / "key"
        if self.dir.exists() and (not stamp.is_file() or stamp.read_text() != key):
            shutil.rmtree(self.dir)
        self.dir.mkdir(parents=True, exist_ok=True)
        stamp.write_text(key)

    def get_or_fit(self, name: str, fit: Callable[[], T]) -> T:
        """``fit()``'s value, saved under ``name``; read back instead when already saved."""
        path = self.dir / f"{name}{FIT_SUFFIX}"
        if path.is_file():
            try:
                value: T = load_fit(path, self.kind, self.device)
            except Exception as exc:  # unreadable, tampered with, or of another code version
                log.warning("Refused saved probe %s (%s); fitting it again", path, _brief(exc))
            else:
                log.info("Resumed %s from %s (fitted by an earlier attempt)", name, path)
                return value
        value = fit()
        try:
            save_fit(path, value)
        except Exception as exc:  # the job goes on; only a resume would have used the file
            log.warning("Could not save %s for resuming (%s)", name, _brief(exc))
        return value

    def discard(self) -> None:
        discard_fits(self.out_dir)


def _brief(exc: BaseException) -> str:
    text = " ".join(str(exc).split())[:200]
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


def _type_name(kind: type[Any]) -> str:
    return f"{kind.__module__}.{kind.__qualname__}"


def _json_default(value: Any) -> Any:
    """JSON for the scalars a fit record may hold besides plain Python ones."""
    if isinstance(value, torch.Tensor | np.generic) and value.ndim == 0:
        return value.item()
    if isinstance(value, Enum):
        return value.value
    if isinstance(value, Path):
        return str(value)
    raise TypeError(f"{type(value).__name__} is not JSON serialisable")


def save_fit(path: Path, value: Any) -> None:
    """Write the dataclass ``value`` to ``path`` (safetensors, atomically): each tensor field as
    a tensor ``<field>``, each module field's state dict as tensors ``<field>.<name>``, every other
    field (None included) as JSON in the metadata. New plain fields need no change here."""
    if not dataclasses.is_dataclass(value) or isinstance(value, type):
        raise TypeError(f"only a dataclass instance can be saved, not {type(value).__name__}")
    tensors: dict[str, torch.Tensor] = {}
    modules: list[str] = []
    plain: dict[str, Any] = {}
    for spec in dataclasses.fields(value):
        item = getattr(value, spec.name)
        if isinstance(item, torch.Tensor):
            tensors[spec.name] = item
        elif isinstance(item, torch.nn.Module):
            modules.append(spec.name)
            tensors.update({f"{spec.name}.{k}": t for k, t in item.state_dict().items()})
        else:
            plain[spec.name] = item
    metadata = {
        "type": _type_name(type(value)),
        "modules": json.dumps(modules),
        "fields": json.dumps(plain, default=_json_default),
    }
    # Own, contiguous CPU copies: safetensors refuses views and tensors sharing storage.
    cpu = {k: t.detach().to("cpu").contiguous().clone() for k, t in tensors.items()}
    tmp = temp_path(path)
    save_file(cpu, str(tmp), metadata=metadata)
    os.replace(tmp, path)


def load_fit(path: Path, kind: type[T], device: torch.device | str = "cpu") -> T:
    """Read back what ``save_fit`` wrote for a ``kind`` dataclass; raises on any mismatch (not a
    safetensors file, another type, a field or tensor missing or left over)."""
    with safe_open(str(path), framework="pt", device=str(device)) as f:
        metadata = f.metadata() or {}
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    if metadata.get("type") != _type_name(kind):
        raise ValueError(f"holds {metadata.get('type')!r}, not {_type_name(kind)}")
    modules = json.loads(metadata["modules"])
    plain = json.loads(metadata["fields"])
    if not isinstance(modules, list) or not isinstance(plain, dict):
        raise ValueError("malformed metadata")
    hints = typing.get_type_hints(kind)
    values: dict[str, Any] = {}
    for spec in dataclasses.fields(kind):  # type: ignore[arg-type]
        name = spec.name
        if name in modules:
            prefix = f"{name}."
            state = {
                k[len(prefix) :]: tensors.pop(k) for k in list(tensors) if k.startswith(prefix)
            }
            values[name] = _rebuild_module(hints[name], state)
        elif name in tensors:
            values[name] = tensors.pop(name)
        elif name in plain:
            values[name] = plain.pop(name)
        else:
            raise ValueError(f"field {name!r} is missing")
    if tensors or plain:
        raise ValueError(f"unknown entries {sorted([*tensors, *plain])}")
    return kind(**values)


def _rebuild_module(annotation: Any, state: dict[str, torch.Tensor]) -> torch.nn.Module:
    """A module of the field's declared class from its state dict. The class's constructor takes
    its state dict's entries by name (``LinearProbe(weight, bias, mean, scale)``); loading the
    state dict back (strict) checks that nothing is missing or left over."""
    cls = next((c for c in (annotation, *typing.get_args(annotation)) if _is_module_class(c)), None)
    if cls is None:
        raise TypeError(f"{annotation!r} is not a torch module class")
    module = cls(**state)
    module.load_state_dict(state, strict=True)
    return module


def _is_module_class(value: Any) -> bool:
    return isinstance(value, type) and issubclass(value, torch.nn.Module)


def note_skipped(out_dir: Path, done: Path, key: str) -> None:
    if done.resolve() != out_dir.resolve():
        write_json(out_dir / SKIPPED, {"key": key, "results": str(done)})


def mark_tracked(job_dir: Path, key: str, run: dict[str, Any]) -> None:
    """Record that the tracker logged the results of job ``key`` in ``job_dir`` (as ``run``)."""
    write_json(job_dir / TRACKED, {"key": key, "run": run})


def is_tracked(job_dir: Path, key: str) -> bool:
    """Whether the tracker logged the complete results of job ``key`` in ``job_dir``.

    ``tracked.json`` answers for the key it names. Without it (a job dir written before that
    file existed, or a job killed between the tracker's own ``wandb_run.json`` and the marker),
    a ``wandb_run.json`` newer than ``metrics.json`` counts: one written for results that were
    replaced since (a run killed before tracking, in a reused job dir) is older than them."""
    try:
        marker = json.loads((job_dir / TRACKED).read_text())
    except FileNotFoundError:
        marker = None
    except (OSError, ValueError):
        return False
    if marker is not None:
        return isinstance(marker, dict) and marker.get("key") == key
    try:
        run_written = (job_dir / WANDB_RUN).stat().st_mtime_ns
        return run_written >= (job_dir / METRICS).stat().st_mtime_ns
    except OSError:
        return False


def job_info(key: str, overrides: list[str]) -> dict[str, Any]:
    """Where and under which scheduler ids this job ran; stored as ``metrics["job"]``."""
    info: dict[str, Any] = {"key": key, "overrides": overrides}
    info.update({name: os.environ.get(var) for name, var in SLURM_VARS.items()})
    info.update({"host": socket.gethostname(), "pid": os.getpid()})
    return info


def failure(exc: BaseException, overrides: list[str]) -> dict[str, Any]:
    lines = str(exc).strip().splitlines()
    return {
        "error": lines[0] if lines else type(exc).__name__,
        "type": type(exc).__name__,
        "overrides": overrides,
    }


def write_failed(out_dir: Path, exc: BaseException, overrides: list[str]) -> None:
    out_dir.mkdir(parents=True, exist_ok=True)
    write_json(out_dir / FAILED, failure(exc, overrides))


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
    if not OmegaConf.has_resolver("probe_sweep_not_in_key"):
        OmegaConf.register_new_resolver("probe_sweep_not_in_key", not_in_key)
    if not OmegaConf.has_resolver("probe_sweep_local_jobs"):
        OmegaConf.register_new_resolver("probe_sweep_local_jobs", local_jobs)
    if not OmegaConf.has_resolver("probe_sweep_gpus"):
        OmegaConf.register_new_resolver("probe_sweep_gpus", cuda_count)


def _import_module(name: str) -> Any:
    return importlib.import_module(name)


def _pickle_torch_classes_by_name() -> None:
    """``python -m probe_sweep`` defines the task in ``__main__``, which cloudpickle (joblib,
    submitit) pickles by value with the submodules its names touch: ``config.probe.classes`` pulls
    in ``torch.classes``, which pickle cannot handle. Pickle it as a re-import instead. Done at
    import, so it also holds in a SLURM job (which imports this module when it unpickles the
    task) when submitit pickles the task again to requeue it."""
    import torch

    copyreg.pickle(type(torch.classes), lambda _: (_import_module, ("torch.classes",)))


_pickle_torch_classes_by_name()
