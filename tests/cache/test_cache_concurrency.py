"""One activation cache, many jobs: real processes race for one key; one dies holding the lock."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.conftest import subprocess_timeout, wait_for_line

REPO = Path(__file__).resolve().parents[2]

# A job's extraction step: import everything, say "ready", wait for the go file, then extract and
# report what it got. Waiting for the go file makes the processes race only for the cache itself.
JOB = """
import hashlib, json, logging, sys, time
from pathlib import Path
import torch
from probe_sweep.extraction.activations import ActivationsConfig, extract
from probe_sweep.extraction.data import DataConfig, build_corpus
from probe_sweep.extraction.model import load_model, load_tokenizer
from tests.extraction.test_model import TINY
cache, budget, batch, go = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), Path(sys.argv[4])
logging.basicConfig(level=logging.INFO, stream=sys.stdout, format="%(message)s", force=True)
tok = load_tokenizer(TINY)
model = load_model(TINY, len(tok), torch.device("cpu"), seed=0)
corpus = build_corpus(DataConfig(token_budget=budget, seq_len=128), tok, 256, seed=0)
print("ready", flush=True)
while not go.exists():
    time.sleep(0.01)
store = extract(model, corpus, [0, 1, 2], ActivationsConfig(cache_dir=cache, batch_size=batch),
                torch.device("cpu"))
digest = hashlib.sha256()
for layer in store.layers:
    digest.update((store.path / f"layer_{layer}.npy").read_bytes())
print("RESULT " + json.dumps({"reused": store.reused, "path": str(store.path),
                              "sha": digest.hexdigest()}), flush=True)
"""


def start(cache: Path, budget: int, batch: int, go: Path) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-c", JOB, str(cache), str(budget), str(batch), str(go)],
        cwd=REPO,
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
    )


def finish(proc: subprocess.Popen[str]) -> tuple[dict, str]:
    out, _ = proc.communicate(timeout=subprocess_timeout())
    assert proc.returncode == 0, out
    result = [line for line in out.splitlines() if line.startswith("RESULT ")]
    assert len(result) == 1, out
    return json.loads(result[0][len("RESULT ") :]), out


def entries(cache: Path) -> list[str]:
    return sorted(p.name for p in cache.iterdir() if not p.name.startswith(".tmp-"))


@pytest.mark.e2e
def test_racing_jobs_compute_once_and_read_the_same_bytes(tmp_path: Path) -> None:
    cache, go = tmp_path / "cache", tmp_path / "go"
    procs = [start(cache, 6000, 8, go) for _ in range(3)]
    for proc in procs:
        wait_for_line(proc, "ready")
    go.touch()
    results = [finish(proc) for proc in procs]
    computed = [r for r, _ in results if not r["reused"]]
    assert len(computed) == 1, [r for r, _ in results]
    assert len({r["path"] for r, _ in results}) == 1
    assert len({r["sha"] for r, _ in results}) == 1, "jobs read different bytes"
    waited = [out for _, out in results if "Waiting for another job" in out]
    assert waited, "no job waited on the lock: the race did not happen"
    assert entries(cache) == [Path(computed[0]["path"]).name]
    assert not [p for p in cache.glob(".tmp-*") if p.is_dir()], "temporary dirs left behind"


@pytest.mark.e2e
def test_a_job_killed_holding_the_lock_leaves_nothing_and_the_waiter_recomputes(
    tmp_path: Path,
) -> None:
    cache, go_first, go_second = tmp_path / "cache", tmp_path / "go1", tmp_path / "go2"
    # The first job extracts slowly (one sequence per batch); batch size is not in the cache key,
    # so the second job asks for the same entry and computes it quickly once it has the lock.
    # 100k tokens one sequence at a time: seconds of work even on an idle machine.
    first = start(cache, 100_000, 1, go_first)
    second = start(cache, 100_000, 64, go_second)
    wait_for_line(first, "ready")
    wait_for_line(second, "ready")
    go_first.touch()
    deadline = time.time() + subprocess_timeout()
    while not list(cache.glob(".tmp-*/layer_2.npy")) and time.time() < deadline:
        time.sleep(0.05)
    assert list(cache.glob(".tmp-*/layer_2.npy")), "the first job never started writing"
    go_second.touch()
    time.sleep(0.5)
    assert second.poll() is None, "the second job did not wait for the lock holder"
    assert entries(cache) == []
    os.kill(first.pid, signal.SIGKILL)
    first.wait()
    result, out = finish(second)
    assert not result["reused"], "a killed job's partial extraction was accepted"
    assert "left by a job that died mid-extraction" in out
    assert entries(cache) == [Path(result["path"]).name]
    assert not [p for p in cache.glob(".tmp-*") if p.is_dir()], "the dead job's temp dir remains"
    meta = json.loads((Path(result["path"]) / "meta.json").read_text())
    assert meta["n_rows"] > 0


def test_one_job_per_gpu(tmp_path: Path) -> None:
    """device=auto with several GPUs: each job holds one GPU; a further job waits for one."""
    import threading

    from probe_sweep.jobs.scheduler import claim_gpu

    holders = 2
    with claim_gpu("auto", holders, tmp_path) as a, claim_gpu("auto", holders, tmp_path) as b:
        assert {a, b} == {"cuda:0", "cuda:1"}
        got: list[str] = []

        def third() -> None:
            with claim_gpu("auto", holders, tmp_path, poll_s=0.02) as device:
                got.append(device)

        thread = threading.Thread(target=third)
        thread.start()
        time.sleep(0.3)
        assert got == [], "a third job shared a GPU"
    thread.join(10)
    assert got and got[0] in ("cuda:0", "cuda:1")
    with claim_gpu("cpu", holders, tmp_path) as device:
        assert device == "cpu"
    with claim_gpu("auto", 1, tmp_path) as device:
        assert device == "auto"
