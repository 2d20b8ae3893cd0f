"""Read back what a W&B run logged, from its ``run-<id>.wandb`` file, without wandb's own reader.

wandb 0.30+ dropped the Python reader for this file and ``wandb.Api()`` cannot see offline runs.
The file is a LevelDB-style log: a 7-byte header (``:W&B``, magic 0xBEE1, version 0), then 32 KiB
blocks of records, each ``crc32 (uint32 LE) | length (uint16 LE) | type (1 byte) | payload``; a
record that does not fit in a block is split FIRST/MIDDLE.../LAST; a block tail shorter than a
record header is zero padding. Each reassembled payload is a ``wandb_internal_pb2.Record``.
"""

from __future__ import annotations

import json
import struct
import time
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from wandb.proto import wandb_internal_pb2 as pb

HEADER = b":W&B" + struct.pack("<HB", 0xBEE1, 0)
BLOCK = 32 * 1024
RECORD_HEADER = 7
FULL, FIRST, MIDDLE, LAST = 1, 2, 3, 4


def read_records(path: Path) -> list[pb.Record]:
    """Every record in the file, checking the header, each chunk's CRC and the chunk order."""
    data = Path(path).read_bytes()
    if data[: len(HEADER)] != HEADER:
        raise ValueError(f"{path}: not a W&B run file (header {data[:7]!r})")
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
        else:
            raise ValueError(f"{path}: unexpected chunk type {kind} at byte {pos}")
        record = pb.Record()
        record.ParseFromString(chunk)
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
    service may still be writing when ``finish()`` returns, more so on a busy machine)."""
    deadline = time.monotonic() + wait_s
    while True:
        log = _decode_run(path)
        if (log is not None and log.exit_code is not None) or time.monotonic() > deadline:
            break
        time.sleep(0.5)
    if log is None:
        raise ValueError(f"{path}: no run record")
    return log


def _decode_run(path: Path) -> RunLog | None:
    """The run record, config updates, history rows, summary and artifacts of a run file."""
    log: RunLog | None = None
    for record in read_records(path):
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
