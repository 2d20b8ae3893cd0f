"""The cache CLI (python -m probe_sweep.cache), run as a user runs it, on a tiny-model cache."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from probe_sweep.cache.cli import main as cache_main
from probe_sweep.cache.entry import entry_lock
from probe_sweep.extraction.activations import ActivationsConfig, extract
from tests.cache.test_cache_integrity import flip_finite
from tests.conftest import subprocess_timeout

CPU = torch.device("cpu")
REPO = Path(__file__).resolve().parents[2]
DAY = 86_400


def cache_cli(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "probe_sweep.cache.cli", *args],
        cwd=REPO,
        env={**os.environ, **(env or {})},
        capture_output=True,
        text=True,
        timeout=subprocess_timeout(),
    )


def age(path: Path, days: float) -> None:
    """Make ``path`` (and the files directly in it) look last touched ``days`` ago."""
    then = time.time() - days * DAY
    for p in [path, *path.iterdir()] if path.is_dir() else [path]:
        os.utime(p, (then, then))


@pytest.mark.e2e
def test_list_shows_every_entry_from_the_default_cache_dir(tiny, tmp_path: Path) -> None:
    model, corpus = tiny
    cache = tmp_path / "cache"  # conftest points PROBE_SWEEP_CACHE here
    assert os.environ["PROBE_SWEEP_CACHE"] == str(cache)
    a = extract(model, corpus, [0, 1], ActivationsConfig(cache_dir=str(cache)), CPU)
    b = extract(model, corpus, [2], ActivationsConfig(cache_dir=str(cache)), CPU)
    proc = cache_cli("list")
    assert proc.returncode == 0, proc.stderr
    lines = {line.split()[0]: line for line in proc.stdout.splitlines() if line}
    for store, layers in ((a, "0,1"), (b, "2")):
        line = lines[store.path.name]
        assert f"layers {layers}" in line and "model tiny-gpt2" in line
        assert corpus.description in line and store.meta["created"] in line
    rows = json.loads(cache_cli("list", "--json", "--cache-dir", str(cache)).stdout)
    by_name = {row["name"]: row for row in rows}
    on_disk = sum(f.stat().st_size for f in a.path.iterdir())
    assert by_name[a.path.name]["size"] >= on_disk > 0
    assert by_name[a.path.name]["model"] == "tiny-gpt2"
    assert abs(by_name[a.path.name]["used_s"] - time.time()) < 600
    empty = cache_cli("list", "--cache-dir", str(tmp_path / "nothing"))
    assert empty.returncode == 0 and "no activation cache entries" in empty.stdout


@pytest.mark.e2e
def test_a_reuse_records_its_time(tiny, tmp_path: Path) -> None:
    model, corpus = tiny
    cfg = ActivationsConfig(cache_dir=str(tmp_path / "cache"))
    store = extract(model, corpus, [1], cfg, CPU)
    meta_bytes = (store.path / "meta.json").read_bytes()
    age(store.path, 30)
    before = json.loads(cache_cli("list", "--json").stdout)[0]["used_s"]
    assert time.time() - before > 29 * DAY
    assert extract(model, corpus, [1], cfg, CPU).reused
    after = json.loads(cache_cli("list", "--json").stdout)[0]["used_s"]
    assert time.time() - after < 600
    assert (store.path / "meta.json").read_bytes() == meta_bytes, "meta.json was rewritten"


@pytest.mark.e2e
def test_verify_reports_each_entry_and_fails_on_a_corrupt_one(tiny, tmp_path: Path) -> None:
    model, corpus = tiny
    cfg = ActivationsConfig(cache_dir=str(tmp_path / "cache"))
    good = extract(model, corpus, [0], cfg, CPU)
    bad = extract(model, corpus, [1, 2], cfg, CPU)
    proc = cache_cli("verify")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert f"OK {good.path.name}" in proc.stdout and f"OK {bad.path.name}" in proc.stdout
    flip_finite(bad.path / "layer_2.npy")
    proc = cache_cli("verify")
    assert proc.returncode == 1
    assert f"OK {good.path.name}" in proc.stdout
    assert f"CORRUPT {bad.path.name}: layer_2.npy does not match its checksum" in proc.stdout
    one = cache_cli("verify", good.path.name[:8])  # a unique prefix names an entry
    assert one.returncode == 0 and bad.path.name not in one.stdout
    unknown = cache_cli("verify", "ffffffffffff")
    assert unknown.returncode == 2 and "no cache entries" in unknown.stderr
    assert "Traceback" not in unknown.stderr


@pytest.mark.e2e
def test_remove_refuses_while_the_entry_is_locked(tiny, tmp_path: Path) -> None:
    model, corpus = tiny
    cache = tmp_path / "cache"
    store = extract(model, corpus, [0], ActivationsConfig(cache_dir=str(cache)), CPU)
    lock = entry_lock(cache, store.path.name)
    lock.acquire()  # as a job computing this key holds it
    try:
        proc = cache_cli("remove", store.path.name)
    finally:
        lock.release()
    assert proc.returncode == 2 and "being written by another process" in proc.stderr
    assert store.path.is_dir()
    proc = cache_cli("remove", store.path.name)
    assert proc.returncode == 0, proc.stderr
    assert not store.path.exists()
    assert not [p for p in cache.iterdir() if p.is_dir()], "remove left a directory behind"


@pytest.mark.e2e
def test_prune_removes_what_was_not_used_lately(tiny, tmp_path: Path) -> None:
    model, corpus = tiny
    cache = tmp_path / "cache"
    cfg = ActivationsConfig(cache_dir=str(cache))
    old = extract(model, corpus, [0], cfg, CPU)
    fresh = extract(model, corpus, [1], cfg, CPU)
    age(old.path, 10)
    age(fresh.path, 10)
    assert extract(model, corpus, [1], cfg, CPU).reused  # used just now
    stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime(time.time() - 10 * DAY))
    old_corrupt = cache / f"{fresh.path.name}.corrupt-{stamp}"
    new_corrupt = cache / f"{fresh.path.name}.corrupt-{time.strftime('%Y%m%dT%H%M%SZ')}"
    dead_tmp = cache / f".tmp-{old.path.name}-12345-deadbeef"
    busy_tmp = cache / f".tmp-{fresh.path.name}-23456-cafecafe"
    for leftover in (old_corrupt, new_corrupt, dead_tmp, busy_tmp):
        leftover.mkdir()
        (leftover / "layer_0.npy").write_bytes(b"x" * 1000)
    age(dead_tmp, 10)
    age(busy_tmp, 10)

    dry = cache_cli("prune", "--older-than", "7", "--dry-run")
    assert dry.returncode == 0 and f"would remove entry {old.path.name}" in dry.stdout
    assert old.path.is_dir() and old_corrupt.is_dir() and dead_tmp.is_dir()

    lock = entry_lock(cache, fresh.path.name)
    lock.acquire()  # a job is writing busy_tmp right now
    try:
        proc = cache_cli("prune", "--older-than", "7")
    finally:
        lock.release()
    assert proc.returncode == 0, proc.stderr
    assert not old.path.exists() and not old_corrupt.exists() and not dead_tmp.exists()
    assert fresh.path.is_dir() and new_corrupt.is_dir()
    assert busy_tmp.is_dir() and f"skipped {busy_tmp.name}" in proc.stdout
    assert "freed" in proc.stdout


@pytest.mark.e2e
@pytest.mark.parametrize("days", ["nan", "inf", "-1", "-inf", "soon"])
def test_prune_refuses_a_number_of_days_that_is_not_one(
    tiny, tmp_path: Path, capsys: pytest.CaptureFixture[str], days: str
) -> None:
    """``--older-than nan`` compared false with every entry's age and removed them all. The
    command line as a user types it for nan; the parser's answer, in-process, for the rest."""
    model, corpus = tiny
    store = extract(model, corpus, [0], ActivationsConfig(cache_dir=str(tmp_path / "cache")), CPU)
    for dry_run in ([], ["--dry-run"]):
        if days == "nan":
            proc = cache_cli("prune", f"--older-than={days}", *dry_run)
            code, out, err = proc.returncode, proc.stdout, proc.stderr
        else:
            with pytest.raises(SystemExit) as exited:
                cache_main(["prune", f"--older-than={days}", *dry_run])
            (code,), (out, err) = exited.value.args, capsys.readouterr()
        assert code == 2 and out == ""
        [line] = err.splitlines()
        assert line.startswith("error:") and "is not a number of days >= 0" in line
    assert store.path.is_dir() and (store.path / "layer_0.npy").is_file()


@pytest.mark.e2e
def test_an_entry_removed_while_a_job_reads_it_stays_readable(tiny, tmp_path: Path) -> None:
    """``cache remove`` (or ``prune --older-than 0``) during a fit crashed the job with
    FileNotFoundError; the job maps its layers when it opens the entry and reads on."""
    model, corpus = tiny
    cfg = ActivationsConfig(cache_dir=str(tmp_path / "cache"))
    extract(model, corpus, [0, 1, 2], cfg, CPU)
    store = extract(model, corpus, [0, 1, 2], cfg, CPU)  # a job reusing the entry
    assert store.reused
    first = np.array(store.layer(0))
    proc = cache_cli("prune", "--older-than", "0")
    assert proc.returncode == 0 and f"removed entry {store.path.name}" in proc.stdout
    assert not store.path.exists()
    assert np.array_equal(store.layer(0), first)
    assert store.layer(2).shape == (store.meta["n_rows"], 64) and np.isfinite(store.layer(2)).all()
    again = extract(model, corpus, [0, 1, 2], cfg, CPU)  # the next job recomputes it
    assert not again.reused and np.array_equal(again.layer(0), first)


@pytest.mark.e2e
def test_list_marks_a_damaged_entry_and_verify_reads_checksums(tiny, tmp_path: Path) -> None:
    model, corpus = tiny
    cfg = ActivationsConfig(cache_dir=str(tmp_path / "cache"))
    good = extract(model, corpus, [0], cfg, CPU)
    flipped = extract(model, corpus, [1], cfg, CPU)
    truncated = extract(model, corpus, [2], cfg, CPU)
    flip_finite(flipped.path / "layer_1.npy")
    layer = truncated.path / "layer_2.npy"
    layer.write_bytes(layer.read_bytes()[:-64])
    plain = {line.split()[0]: line for line in cache_cli("list").stdout.splitlines() if line}
    assert "DAMAGED" in plain[truncated.path.name] and "DAMAGED" not in plain[good.path.name]
    assert "checksums not read: --verify reads them" in cache_cli("list").stdout
    verified = cache_cli("list", "--verify").stdout
    lines = {line.split()[0]: line for line in verified.splitlines() if line}
    assert "DAMAGED" in lines[flipped.path.name] and "checksum" in lines[flipped.path.name]
    assert "DAMAGED" in lines[truncated.path.name] and "DAMAGED" not in lines[good.path.name]


@pytest.mark.e2e
def test_remove_and_prune_take_a_symlinked_entry_as_a_link(tiny, tmp_path: Path) -> None:
    """``remove`` reported success and left a renamed link; ``prune`` stopped at the first
    link ("Cannot call rmtree on a symbolic link")."""
    model, corpus = tiny
    elsewhere = tmp_path / "elsewhere"
    store = extract(model, corpus, [0], ActivationsConfig(cache_dir=str(elsewhere)), CPU)
    cache = tmp_path / "cache"
    cache.mkdir()
    stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime(time.time() - 10 * DAY))
    linked = [cache / store.path.name, cache / f"{store.path.name}.corrupt-{stamp}"]
    for link in linked:
        link.symlink_to(store.path, target_is_directory=True)
    proc = cache_cli("remove", store.path.name)
    assert proc.returncode == 0 and "removed the symbolic link" in proc.stdout, proc.stderr
    assert sorted(p.name for p in cache.iterdir()) == [linked[1].name]
    linked[0].symlink_to(store.path, target_is_directory=True)
    age(store.path, 10)
    proc = cache_cli("prune", "--older-than", "1")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert proc.stdout.count("removed ") == 2 and "skipped" not in proc.stdout
    assert [p for p in cache.iterdir() if not p.name.endswith(".lock")] == []
    assert (store.path / "layer_0.npy").is_file(), "the link's target was deleted"
