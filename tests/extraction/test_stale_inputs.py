"""Inputs changed in place are never answered from results computed before the change: a local
model retrained in its directory (the activation cache key holds the loaded weights' digest) and
a text file edited in place (a job's content key holds the files' digest)."""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

import numpy as np
import pytest
import torch

from probe_sweep.cache.entry import CacheDtype
from probe_sweep.extraction.activations import ActivationsConfig, extract
from probe_sweep.extraction.model import ModelConfig, load_model
from tests.conftest import TINY, run_cli
from tests.extraction.test_model import TINY as TINY_MODEL

CPU = torch.device("cpu")
LAYERS = [0, 1, 2]


def test_a_local_model_retrained_in_place_is_extracted_again(
    tmp_path: Path, tiny, caplog: pytest.LogCaptureFixture
) -> None:
    _, corpus = tiny
    directory = tmp_path / "checkpoint"
    load_model(TINY_MODEL, 30522, CPU, seed=0).module.save_pretrained(directory)
    local = ModelConfig(name="local", path=str(directory), tokenizer=TINY_MODEL.tokenizer)
    cache = ActivationsConfig(cache_dir=str(tmp_path / "cache"), dtype=CacheDtype.float32)
    before = extract(load_model(local, 30522, CPU, 0), corpus, LAYERS, cache, CPU)
    assert not before.reused

    # Training writes new weights under the same names; a copy keeps sizes, layout and times.
    weights = directory / "model.safetensors"
    stat = weights.stat()
    load_model(TINY_MODEL, 30522, CPU, seed=1).module.save_pretrained(directory)
    os.utime(weights, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    assert weights.stat().st_size == stat.st_size
    retrained = load_model(local, 30522, CPU, 0)
    with caplog.at_level(logging.INFO, logger="probe_sweep"):
        after = extract(retrained, corpus, LAYERS, cache, CPU)
    assert not after.reused and after.path != before.path
    assert "Reusing cached activations" not in caplog.text
    assert not np.array_equal(before.layer(2), after.layer(2))

    fresh_cache = ActivationsConfig(cache_dir=str(tmp_path / "fresh"), dtype=CacheDtype.float32)
    fresh = extract(retrained, corpus, LAYERS, fresh_cache, CPU)
    for layer in LAYERS:
        assert np.array_equal(after.layer(layer), fresh.layer(layer)), layer
    again = extract(load_model(local, 30522, CPU, 0), corpus, LAYERS, cache, CPU)
    assert again.reused and again.path == after.path, "unchanged weights reuse the entry"


def finished(sweep: Path) -> dict[str, dict]:
    """Each job's metrics.json by its dir (a path in an override nests the job dir)."""
    return {
        str(p.parent.relative_to(sweep)): json.loads(p.read_text())
        for p in sweep.rglob("metrics.json")
    }


@pytest.mark.e2e
def test_a_text_file_edited_in_place_reruns_its_finished_job(tmp_path: Path) -> None:
    text = tmp_path / "book.txt"
    words = "the quick brown fox jumps over the lazy dog and runs far away from home ".split()
    rng = np.random.default_rng(0)
    text.write_text(" ".join(rng.choice(words, 3000)))
    sweep = tmp_path / "sweep"
    args = [
        "-m",
        *TINY,
        "data=text_files",
        f"data.paths=[{text}]",
        "data.token_budget=1500",
        "statistics.enabled=false",
        "tracker.mode=disabled",
        "seed=0,1",
        f"hydra.sweep.dir={sweep}",
    ]
    run_cli(args, tmp_path)
    first = finished(sweep)
    assert len(first) == 2

    edited = text.read_text().replace("fox", "cat").replace("dog", "owl")
    stat = text.stat()
    text.write_text(edited)  # same size, then the old modification time
    os.utime(text, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    proc = run_cli(args, tmp_path)
    assert "Skipped: complete results" not in proc.stdout + proc.stderr
    second = finished(sweep)
    assert second.keys() == first.keys() and not list(sweep.rglob("skipped.json"))
    for name in first:
        assert second[name]["job"]["key"] != first[name]["job"]["key"], name
        assert second[name]["cache"]["key"] != first[name]["cache"]["key"], name

    # A kill between a job's metrics.json and the removal of its saved probes leaves them.
    leftover = next(iter(sweep.rglob("metrics.json"))).parent / ".fits"
    leftover.mkdir()
    (leftover / "layer_0.safetensors").write_bytes(b"x")
    proc = run_cli(args, tmp_path)  # unchanged since: both jobs are skipped
    assert (proc.stdout + proc.stderr).count("Skipped: complete results") == 2
    assert not leftover.exists(), "a finished job kept its saved probes"


def test_a_jobs_key_follows_its_model_dir_and_text_files(tmp_path: Path) -> None:
    """The job key's inputs: the model dir's files and the corpus files, by content (a copy
    that keeps modification times still changes them; touching a file does not)."""
    from probe_sweep.fingerprints import job_inputs
    from probe_sweep.jobs import jobdir

    model_dir, text = tmp_path / "model", tmp_path / "book.txt"
    model_dir.mkdir()
    (model_dir / "model.safetensors").write_bytes(b"\x01" * 64)
    (model_dir / "config.json").write_text("{}")
    text.write_text("some text")
    resolved = {"seed": 0}
    key = jobdir.job_key(resolved, inputs=job_inputs(str(model_dir), [str(text)]))
    assert key != jobdir.job_key(resolved), "the inputs are part of the key"
    os.utime(model_dir / "config.json")  # touched, unchanged
    assert jobdir.job_key(resolved, inputs=job_inputs(str(model_dir), [str(text)])) == key

    stat = (model_dir / "model.safetensors").stat()
    (model_dir / "model.safetensors").write_bytes(b"\x02" * 64)
    os.utime(model_dir / "model.safetensors", ns=(stat.st_atime_ns, stat.st_mtime_ns))
    changed = jobdir.job_key(resolved, inputs=job_inputs(str(model_dir), [str(text)]))
    assert changed != key
    text.write_text("some test")
    assert jobdir.job_key(resolved, inputs=job_inputs(str(model_dir), [str(text)])) != changed
    assert job_inputs("gpt2", []) == {}, "a hub id has no local files to digest"
