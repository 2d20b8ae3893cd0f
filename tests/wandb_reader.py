"""Read back what a W&B run logged, from its ``run-<id>.wandb`` file, without wandb's own reader.

wandb 0.30+ dropped the Python reader for this file and ``wandb.Api()`` cannot see offline runs.
The file is a LevelDB-style log: a 7-byte header (``:W&B``, magic 0xBEE1, version 0), then 32 KiB
blocks of records, each ``crc32 (uint32 LE) | length (uint16 LE) | type (1 byte) | payload``; a
record that does not fit in a block is split FIRST/MIDDLE.../LAST; a block tail shorter than a
record header is zero padding. Each reassembled payload is a ``wandb_internal_pb2.Record``.

The format is wandb's private one, so there is no upper bound on wandb for it: where the installed
wandb writes something this reader was not written for (another header, a record that does not
parse, protobufs moved), ``read_run`` skips the calling test and says why; a damaged file (CRC,
truncation) is still an error.
"""

from __future__ import annotations

import json
import struct
import time
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import wandb

try:
    from wandb.proto import wandb_internal_pb2 as pb
except ImportError as exc:  # a wandb that moved or dropped its internal protobufs
    pb = None
    PB_MISSING = f"wandb.proto.wandb_internal_pb2 cannot be imported ({exc})"

HEADER = b":W&B" + struct.pack("<HB", 0xBEE1, 0)
BLOCK = 32 * 1024
RECORD_HEADER = 7
FULL, FIRST, MIDDLE, LAST = 1, 2, 3, 4


class FormatChanged(ValueError):
    """The installed wandb writes run files in a format this reader does not know."""


def read_records(path: Path) -> list[pb.Record]:
    """Every record in the file, checking the header, each chunk's CRC and the chunk order."""
    if pb is None:
        raise FormatChanged(PB_MISSING)
    data = Path(path).read_bytes()
    if data[:4] != HEADER[:4]:
        raise ValueError(f"{path}: not a W&B run file (header {data[:7]!r})")
    if data[: len(HEADER)] != HEADER:
        raise FormatChanged(f"{path}: header {data[:7]!r}, this reader knows {HEADER!r}")
    records: list[pb.Record] = []
    pending: bytes | None = None
    pos = len(HEADER)
    while pos + RECORD_HEADER <= len(data):
        left_in_block = BLOCK - pos % BLOCK
        if left_in_block < RECORD_HEADER:
            pos += left_in_block
            continue
        crc, length, kind = struct.unpack_from("<IHB", data, pos)
        if crc == 0 and length == 0 and kind == 0:  # padding at the end of a block or file
            pos += left_in_block
            continue
        payload = data[pos + RECORD_HEADER : pos + RECORD_HEADER + length]
        if len(payload) != length:
            raise ValueError(f"{path}: truncated record at byte {pos}")
        if zlib.crc32(payload, zlib.crc32(bytes([kind]))) & 0xFFFFFFFF != crc:
            raise ValueError(f"{path}: CRC mismatch at byte {pos}")
        pos += RECORD_HEADER + length
        if kind == FULL:
            chunk = payload
        elif kind == FIRST:
            pending = payload
            continue
        elif kind in (MIDDLE, LAST) and pending is not None:
            pending += payload
            if kind == MIDDLE:
                continue
            chunk, pending = pending, None
        else:  # the CRC covers the type byte: a new kind of chunk, not damage
            raise FormatChanged(f"{path}: unexpected chunk type {kind} at byte {pos}")
        record = pb.Record()
        try:
            record.ParseFromString(chunk)
        except Exception as exc:  # protobuf's DecodeError: CRC-valid bytes of another schema
            raise FormatChanged(f"{path}: a record that is not a Record at byte {pos}") from exc
        records.append(record)
    return records


def _key(item: Any) -> str:
    return "/".join(item.nested_key) if item.nested_key else item.key


def _value(item: Any) -> Any:
    return json.loads(item.value_json)


@dataclass
class RunLog:
    """The parts of a run file the tests look at, decoded to plain Python."""

    run: pb.RunRecord
    config: dict[str, Any] = field(default_factory=dict)
    history: list[dict[str, Any]] = field(default_factory=list)
    summary: dict[str, Any] = field(default_factory=dict)
    metrics: dict[str, pb.MetricRecord] = field(default_factory=dict)
    artifacts: list[pb.ArtifactRecord] = field(default_factory=list)
    files: list[str] = field(default_factory=list)
    exit_code: int | None = None

    @property
    def tags(self) -> list[str]:
        return list(self.run.tags)

    def artifact_files(self, artifact: pb.ArtifactRecord) -> dict[str, pb.ArtifactManifestEntry]:
        return {entry.path: entry for entry in artifact.manifest.contents}

    def artifact_metadata(self, artifact: pb.ArtifactRecord) -> dict[str, Any]:
        return json.loads(artifact.metadata) if artifact.metadata else {}

    def rows_with(self, key: str) -> list[dict[str, Any]]:
        return [row for row in self.history if key in row]


def read_run(path: Path, wait_s: float = 120.0) -> RunLog:
    """Decode a run file once wandb's writer has flushed it (its exit record is there: wandb's
    service may still be writing when ``finish()`` returns, more so on a busy machine). Skips
    the calling test when the installed wandb's format is not one this reader knows."""
    deadline = time.monotonic() + wait_s
    while True:
        try:
            log = _decode_run(path)
        except FormatChanged as exc:
            pytest.skip(
                f"tests/wandb_reader.py cannot read the run files of the installed wandb "
                f"{wandb.__version__} (a private format): {exc}"
            )
        if (log is not None and log.exit_code is not None) or time.monotonic() > deadline:
            break
        time.sleep(0.5)
    if log is None:
        raise ValueError(f"{path}: no run record")
    return log


def _decode_run(path: Path) -> RunLog | None:
    """The run record, config updates, history rows, summary and artifacts of a run file."""
    try:
        return _decode_records(read_records(path))
    except AttributeError as exc:  # a Record whose fields were renamed
        raise FormatChanged(f"{path}: {exc}") from exc


def _decode_records(records: list[Any]) -> RunLog | None:
    log: RunLog | None = None
    for record in records:
        kind = record.WhichOneof("record_type")
        if kind == "run":
            if log is None:
                log = RunLog(run=record.run)
            for item in record.run.config.update:
                log.config[_key(item)] = _value(item)
        if log is None:
            continue
        if kind == "config":
            for item in record.config.update:
                log.config[_key(item)] = _value(item)
        elif kind == "history":
            log.history.append({_key(i): _value(i) for i in record.history.item})
        elif kind == "summary":
            for item in record.summary.update:
                log.summary[_key(item)] = _value(item)
            for item in record.summary.remove:
                log.summary.pop(_key(item), None)
        elif kind == "metric":
            name = record.metric.name or record.metric.glob_name
            log.metrics[name] = record.metric
        elif kind == "artifact":
            log.artifacts.append(record.artifact)
        elif kind == "files":
            log.files.extend(f.path for f in record.files.files)
        elif kind == "exit":
            log.exit_code = record.exit.exit_code
    return log


def run_files(root: Path) -> list[Path]:
    """Every ``run-*.wandb`` file under ``root``, oldest run directory first."""
    return sorted(Path(root).rglob("run-*.wandb"))
