"""The one owner of a job directory's layout: its file names, the metrics.json schema (written
and read here only), the markers an attempt leaves, and the job's content key.

A job's results are complete when its ``metrics.json`` carries a ``job`` section (written last,
after every other file) whose ``key`` hashes the job's resolved config. Re-running a sweep into
the same ``hydra.sweep.dir`` therefore skips finished jobs whatever their job number, and reruns
jobs that failed, were killed, or whose results were deleted. The probes an unfinished attempt
fitted live in ``FITS`` (``saved_fits.py``).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from probe_sweep.files import read_regular, write_json
from probe_sweep.results import (
    CacheUse,
    Counts,
    JobStatistics,
    LayerResult,
    ModelSummary,
    ProbeSummary,
)
from probe_sweep.typed_json import Interval, build, describe, is_of

log = logging.getLogger(__name__)

METRICS = "metrics.json"
PROBES = "probes.safetensors"
FAILED = "failed.json"
SKIPPED = "skipped.json"
PRUNED = "pruned.json"  # an Optuna trial its study stopped (written by the sweeper)
# Written after the tracker logged the job's results: a job killed between metrics.json and
# tracking has none, and a rerun that skips it tracks it then (see ``is_tracked``).
TRACKED = "tracked.json"
WANDB_RUN = "wandb_run.json"  # what the tracker writes where a run went (README)
FITS = ".fits"
FIT_SUFFIX = ".safetensors"
UNFINISHED = "unfinished"  # under FITS: the last kept iterate of each fit not yet finished

MAX_METRICS_BYTES = 1 << 30
MAX_MARKER_BYTES = 1 << 20  # failed.json, skipped.json, tracked.json, wandb_run.json
SCHEMA_VERSION = 3  # of metrics.json (README); part of every job's content key
# The one list of config keys outside a job's identity (its content key, the W&B config hash, the
# job dir's name): they change where, how fast or how a job is tracked and tuned, not its numbers.
# ``device``, ``probe.memory_mb`` and ``probe.chunk_mb`` move the arithmetic (where it runs, how
# rows are held and summed: float rounding, not results; every fit is certified to its tolerance
# either way), so a job can be resumed on more memory; ``tuning`` names the study and trial a job
# reports to and which metric it returns, read from the same results either way.
NOT_IN_KEY: tuple[str, ...] = (
    "redo",
    "device",
    "probe.memory_mb",
    "probe.chunk_mb",
    "tracker",
    "tuning",
    "activations.cache_dir",
    "activations.batch_size",
)


# --- the content key ---------------------------------------------------------------------------


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


def job_key(
    resolved: dict[str, Any],
    schema_version: int = SCHEMA_VERSION,
    *,
    inputs: dict[str, str] | None = None,
) -> str:
    """A content key for one job: the resolved config minus settings that leave results alone,
    the version of the metrics it writes, and ``inputs``, the digests of the local files it
    reads (``fingerprints.job_inputs``), so results of a changed model dir or corpus file are
    not taken for this job's."""
    content: dict[str, Any] = {"config": keyed_content(resolved), "schema": schema_version}
    if inputs:
        content["inputs"] = inputs
    blob = json.dumps(content, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:20]


def not_in_key() -> list[str]:
    """``NOT_IN_KEY`` as the list ``hydra.job.config.override_dirname.exclude_keys`` takes
    (resolver ``${probe_sweep_not_in_key:}``), so a job dir is not named by them either."""
    return list(NOT_IN_KEY)


MAX_DIR_NAME = 200  # characters of a job dir's name; most file systems allow 255 bytes


def job_dir_name(number: int, overrides: str) -> str:
    """A multirun job's dir name (resolver ``${probe_sweep_job_dir:...}``): its number and
    overrides, as Hydra names it, cut to ``MAX_DIR_NAME`` with a digest of the whole override
    string in place of the rest, so a long sweep line does not fail at mkdir and two jobs'
    names still differ. The full overrides are in each job's .hydra/overrides.yaml."""
    name = f"{number}_{overrides}"
    if len(name) <= MAX_DIR_NAME:
        return name
    digest = hashlib.sha256(overrides.encode()).hexdigest()[:12]
    return f"{name[: MAX_DIR_NAME - len(digest) - 3]}..{digest}"


# --- metrics.json ------------------------------------------------------------------------------


class InvalidMetrics(ValueError):
    """A metrics.json that is not what ``write_metrics`` writes: unreadable, another schema
    version, or a section missing, unknown or of the wrong type."""


@dataclass
class JobMetrics:
    """A finished job's results, as metrics.json holds them (schema in the README). Each field
    is one top-level section; ``job`` (content key, scheduler ids) and ``config`` (the resolved
    config) are written with the rest, so a file that has them is complete."""

    model: ModelSummary  # name, path, type, depth, width, vocabulary
    probe: ProbeSummary  # kind, layers, basis, regularisation, classes, offset, convergence
    counts: Counts  # sequences, tokens and types per split
    cache: CacheUse  # the activation cache entry: key, path, reused
    timing_s: dict[str, float]  # seconds per stage
    layers: list[LayerResult]  # everything measured at each layer (``results.py``)
    fits: dict[str, dict[str, Any]]  # each probe's convergence record and history
    statistics: JobStatistics | None  # null statistics, weight shares, accuracy against k
    ridge_path: dict[str, Any] | None  # validation NLL along the ridge path
    resources: dict[str, Any]  # device and peak memory
    job: dict[str, Any]  # content key, overrides, scheduler ids
    config: dict[str, Any]  # the resolved config
    schema_version: int = SCHEMA_VERSION

    def to_json(self) -> dict[str, Any]:
        """The file's contents, version first: a layer is one flat row (``LayerResult.row``),
        and a job without statistics has an empty ``statistics`` object."""
        sections = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        sections.update({name: dataclasses.asdict(sections[name]) for name in SUMMARIES})
        sections["layers"] = [layer.row() for layer in self.layers]
        stats = self.statistics
        sections["statistics"] = {} if stats is None else dataclasses.asdict(stats)
        return {"schema_version": sections.pop("schema_version"), **sections}

    @classmethod
    def from_json(cls, value: Any) -> JobMetrics:
        """Check ``value`` against the schema; raises ``InvalidMetrics`` naming what is wrong."""
        if not isinstance(value, dict):
            raise InvalidMetrics("not a JSON object")
        version = value.get("schema_version")
        if version != SCHEMA_VERSION:
            raise InvalidMetrics(f"schema version {version!r}, this code reads {SCHEMA_VERSION}")
        names = {f.name for f in dataclasses.fields(cls)}
        missing, unknown = names - value.keys(), value.keys() - names
        if missing or unknown:
            raise InvalidMetrics(f"sections missing {sorted(missing)}, unknown {sorted(unknown)}")
        for name in names - {"schema_version", "ridge_path"}:
            expected = list if name == "layers" else dict
            if not isinstance(value[name], expected):
                raise InvalidMetrics(f"section {name!r} is not a JSON {expected.__name__}")
        _check_fields(value)
        sections = dict(value)
        for name, kind in SUMMARIES.items():
            try:
                sections[name] = build(kind, value[name], f"{name}.")
            except ValueError as exc:
                raise InvalidMetrics(str(exc)) from None
        sections["layers"] = [_layer(i, row) for i, row in enumerate(value["layers"])]
        sections["statistics"] = _statistics(value["statistics"])
        return cls(**sections)


SUMMARIES = {"model": ModelSummary, "probe": ProbeSummary, "counts": Counts, "cache": CacheUse}
# The job section is the scheduler's record (``jobs/scheduler.py``); readers need these two.
JOB_REQUIRED: dict[str, type] = {"key": str, "overrides": list}


def _check_fields(value: dict[str, Any]) -> None:
    """The fields readers use, with their types; every number in the per-layer rows, counts
    and timings finite. Raises ``InvalidMetrics`` naming the first bad field."""
    for name, kind in JOB_REQUIRED.items():
        if not is_of(value["job"].get(name), kind):
            raise InvalidMetrics(f"job.{name} is not a {describe(kind)}")
    for name, item in value["timing_s"].items():
        if not is_of(item, float):
            raise InvalidMetrics(f"timing_s.{name} is not a number")
    if not value["layers"]:
        raise InvalidMetrics("'layers' is empty")
    for name, fit in value["fits"].items():
        if not isinstance(fit, dict):
            raise InvalidMetrics(f"fits.{name} is not a JSON object")


def _layer(i: int, row: Any) -> LayerResult:
    if not isinstance(row, dict):
        raise InvalidMetrics(f"layers[{i}] is not a JSON object")
    try:
        return LayerResult.from_row(row)
    except ValueError as exc:
        raise InvalidMetrics(f"layers[{i}].{exc}") from None


def _statistics(value: dict[str, Any]) -> JobStatistics | None:
    """The statistics section read back (None: the job ran without statistics)."""
    if not value:
        return None
    for i, entry in enumerate(value.get("entries", [])):
        if not (isinstance(entry, dict) and is_of(entry.get("name"), str)):
            raise InvalidMetrics(f"statistics.entries[{i}] has no name")
        observed = entry.get("observed")
        if not (is_of(observed, float | bool | None) or is_of(observed, Interval)):
            raise InvalidMetrics(f"statistics.entries[{i}].observed is not a finite number")
    try:
        return build(JobStatistics, value, "statistics.")
    except ValueError as exc:
        raise InvalidMetrics(f"{exc}") from None


def write_metrics(out_dir: Path, metrics: JobMetrics) -> None:
    """metrics.json, atomically: its presence (with ``job``) marks a finished job."""
    write_json(out_dir / METRICS, metrics.to_json())


def read_metrics(job_dir: Path) -> JobMetrics:
    """A job dir's metrics.json, checked (``InvalidMetrics``, or ``OSError`` when absent)."""
    try:
        text = read_regular(job_dir / METRICS, MAX_METRICS_BYTES)
    except ValueError as exc:
        raise InvalidMetrics(str(exc)) from None
    try:
        value = json.loads(text)
    except ValueError as exc:
        raise InvalidMetrics(f"not JSON ({exc})") from None
    return JobMetrics.from_json(value)


def find_complete(root: Path, key: str) -> Path | None:
    """The job directory under ``root`` holding complete results for ``key``, if any (a
    metrics.json that does not check out is not complete)."""
    for path in sorted(root.rglob(METRICS)):
        try:
            metrics = read_metrics(path.parent)
        except (OSError, InvalidMetrics):
            continue
        if metrics.job.get("key") == key:
            return path.parent
    return None


# --- markers -----------------------------------------------------------------------------------


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


def count_fits(out_dir: Path) -> int:
    """How many probes an unfinished attempt saved for resuming."""
    return len(list((out_dir / FITS).glob(f"*{FIT_SUFFIX}")))


def count_kept_iterates(out_dir: Path) -> int:
    """How many fits an unfinished attempt left part-way, their last iterate kept."""
    return len(list((out_dir / FITS / UNFINISHED).glob(f"*{FIT_SUFFIX}")))


def note_skipped(out_dir: Path, done: Path, key: str) -> None:
    if done.resolve() != out_dir.resolve():
        write_json(out_dir / SKIPPED, {"key": key, "results": str(done)})


def mark_tracked(job_dir: Path, key: str, run: dict[str, Any]) -> None:
    """Record that the tracker logged the results of job ``key`` in ``job_dir`` (as ``run``)."""
    write_json(job_dir / TRACKED, {"key": key, "run": run})


def read_marker(path: Path) -> Any:
    """A marker file's JSON, read as untrusted: a regular file of at most
    ``MAX_MARKER_BYTES`` (OSError when absent, ValueError when not such a file or not JSON)."""
    return json.loads(read_regular(path, MAX_MARKER_BYTES))


def is_tracked(job_dir: Path, key: str) -> bool:
    """Whether the tracker logged the complete results of job ``key`` in ``job_dir``.

    ``tracked.json`` answers for the key it names. Without it (a job dir written before that
    file existed, or a job killed between the tracker's own ``wandb_run.json`` and the marker),
    a ``wandb_run.json`` newer than ``metrics.json`` counts: one written for results that were
    replaced since (a run killed before tracking, in a reused job dir) is older than them."""
    try:
        marker = read_marker(job_dir / TRACKED)
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


def write_failed(out_dir: Path, exc: BaseException, overrides: list[str]) -> None:
    """``failed.json``: the error's first line, its type, and the job's overrides."""
    lines = str(exc).strip().splitlines()
    out_dir.mkdir(parents=True, exist_ok=True)
    failure = {
        "error": lines[0] if lines else type(exc).__name__,
        "type": type(exc).__name__,
        "overrides": overrides,
    }
    write_json(out_dir / FAILED, failure)
