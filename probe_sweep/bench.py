"""Benchmark: ``python -m probe_sweep.bench [flags]`` prints one table, measured in one run on the
same data, and appends it (with the machine and the date) to BENCHMARKS.md.

1. activation extraction, tokens/s, against the forward-pass bound (2 x matmul parameters FLOPs
   per token over the device's measured float32 matmul rate);
2. per-layer softmax probes against scikit-learn's ``LogisticRegression`` (lbfgs) on the
   identical (standardised) rows, the same objective and the same gradient tolerance: the time
   ratio at a matched objective value;
3. the ridge regularisation path (one decomposition, every strength scored on validation)
   against scikit-learn's ``RidgeCV`` with the same strengths: the time ratio;
4. a 3-basis sweep (real ``python -m probe_sweep -m basis=...`` jobs) against one job;
5. peak resident memory of a real job as the token budget doubles twice, each in a fresh process;
6. two real jobs at once on the same cores (each sized to its share) against one after the other.

Timings on a shared machine are noisy: each of our timings is the median of ``--repeats`` runs,
and every ratio compares numbers taken minutes apart in the same process.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import math
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from probe_sweep import probes
from probe_sweep.activations import ActivationsConfig, ActivationStore, extract
from probe_sweep.data import TEST, TRAIN, VAL, DataConfig, build_corpus
from probe_sweep.model import ModelConfig, inspect_model, load_model, load_tokenizer
from probe_sweep.pipeline import pick_device
from probe_sweep.probes import (
    ProbeConfig,
    RegConfig,
    RegKind,
    class_index,
    fit_ridge_probe,
    fit_softmax_probe,
)

REPO = Path(__file__).resolve().parents[1]
CONF = REPO / "conf"
DEFAULT_STRENGTHS = [1e-7, 1e-6, 1e-5, 1e-4, 1e-3, 1e-2, 1e-1, 1.0]
BASIS_PREFERENCE = ["natural", "pca", "nmf", "random", "frequency", "dictionary"]


@dataclass
class Row:
    section: str
    measure: str
    ours: str
    reference: str
    ratio: str
    target: str
    verdict: str


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m probe_sweep.bench", description=__doc__.split("\n")[0]
    )
    p.add_argument("--model", default="minilm", help="a conf/model/<name>.yaml (default minilm)")
    p.add_argument(
        "--model-override",
        nargs="*",
        default=[],
        metavar="KEY=VALUE",
        help="model settings, e.g. random_init=true architecture.n_layer=12 (also sent to jobs)",
    )
    p.add_argument("--token-budget", type=int, default=16_000, help="tokens for sections 1-4")
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("--device", default="auto", help="auto (cuda when visible), cpu, cuda")
    p.add_argument(
        "--compare-layers",
        default="0,-1",
        help="layers for the scikit-learn comparisons (python indices into 0..n_layers)",
    )
    p.add_argument("--strength", type=float, default=RegConfig().strength, help="l2 strength")
    p.add_argument("--tol", type=float, default=ProbeConfig().tol, help="solver tolerance")
    p.add_argument("--repeats", type=int, default=3, help="runs of our timed fits (median)")
    p.add_argument("--sk-repeats", type=int, default=1, help="runs of scikit-learn fits (median)")
    p.add_argument("--sk-max-iter", type=int, default=2000, help="LogisticRegression max_iter")
    p.add_argument(
        "--strengths",
        type=lambda s: [float(v) for v in s.split(",")],
        default=DEFAULT_STRENGTHS,
        help="comma-separated ridge path strengths",
    )
    p.add_argument("--bases", default="auto", help="3 bases for the sweep, e.g. pca,nmf,natural")
    p.add_argument(
        "--memory-budget",
        type=int,
        default=8_000,
        help="token budget B of section 5 (runs B, 2B, 4B)",
    )
    p.add_argument("--skip", default="", help="comma-separated sections to skip: 1,2,3,4,5,6")
    p.add_argument("--output", default=str(REPO / "BENCHMARKS.md"), help="file to append to")
    p.add_argument("--no-write", action="store_true", help="print only")
    p.add_argument("--work-dir", default=None, help="where caches and job dirs go (temp)")
    return p.parse_args(argv)


# ---------------------------------------------------------------------------------- helpers


def timed(fn: Callable[[], Any], repeats: int) -> tuple[float, Any]:
    """Median wall time of ``repeats`` calls, and the last call's result."""
    times, result = [], None
    for _ in range(max(repeats, 1)):
        start = time.perf_counter()
        result = fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times), result


def model_config(name: str, overrides: list[str]) -> ModelConfig:
    from omegaconf import OmegaConf

    path = CONF / "model" / f"{name}.yaml"
    if not path.is_file():
        raise SystemExit(f"error: no model config {path}")
    node = OmegaConf.merge(
        OmegaConf.structured(ModelConfig), OmegaConf.load(path), OmegaConf.from_dotlist(overrides)
    )
    return OmegaConf.to_object(node)  # type: ignore[return-value]


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def matmul_rate(device: torch.device, n: int = 2048, repeats: int = 5) -> float:
    """Best float32 FLOP/s of an n x n matmul on ``device``."""
    a = torch.randn(n, n, device=device)
    b = torch.randn(n, n, device=device)
    a @ b
    sync(device)
    best = math.inf
    for _ in range(repeats):
        start = time.perf_counter()
        a @ b
        sync(device)
        best = min(best, time.perf_counter() - start)
    return 2 * n**3 / best


def matmul_params(module: torch.nn.Module) -> int:
    """Parameters that take part in a matmul per token: all but the embedding tables, plus the
    output head when the model has one (it runs in every forward pass, even when tied)."""
    embedded = {
        id(p) for m in module.modules() if isinstance(m, torch.nn.Embedding) for p in m.parameters()
    }
    total = sum(p.numel() for p in module.parameters() if id(p) not in embedded)
    head = module.get_output_embeddings()
    if head is not None and id(head.weight) in embedded:
        total += head.weight.numel()
    return total


def machine() -> dict[str, str]:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    mem = ""
    try:
        kib = int(Path("/proc/meminfo").read_text().split()[1])
        mem = f"{kib / 2**20:.0f} GiB"
    except (OSError, ValueError, IndexError):
        pass
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "none"
    blas = "?"
    try:
        from threadpoolctl import threadpool_info

        kernels = {
            f"{i['internal_api']} {i.get('architecture') or ''}".strip()
            for i in threadpool_info()
            if i["user_api"] == "blas"
        }
        blas = ", ".join(sorted(kernels))
    except ImportError:
        pass
    core = os.environ.get("OPENBLAS_CORETYPE")
    return {
        "cpu": f"{cpu}, {os.cpu_count()} cores, {mem}",
        "gpu": gpu,
        "torch": f"{torch.__version__} ({torch.get_num_threads()} threads)",
        "numpy BLAS": blas + (f" (OPENBLAS_CORETYPE={core} forced)" if core else ""),
    }


# -------------------------------------------------------------------------------- sections


@dataclass
class Setup:
    args: argparse.Namespace
    device: torch.device
    store: ActivationStore
    rows: dict[int, np.ndarray]
    labels: dict[int, np.ndarray]
    classes: np.ndarray
    class_embeddings: torch.Tensor
    n_layers: int
    notes: list[str]

    def x(self, part: int, layer: int) -> torch.Tensor:
        array = np.asarray(self.store.layer(layer)[self.rows[part]], dtype=np.float32)
        return torch.from_numpy(array).to(self.device)

    def y(self, part: int) -> torch.Tensor:
        return torch.from_numpy(self.labels[part]).to(self.device)


def section_extraction(args: argparse.Namespace, work: Path, out: list[Row]) -> Setup:
    device = pick_device(args.device)
    cfg = model_config(args.model, args.model_override)
    tokenizer = load_tokenizer(cfg)
    info = inspect_model(cfg, len(tokenizer))
    corpus = build_corpus(
        DataConfig(token_budget=args.token_budget, seq_len=args.seq_len),
        tokenizer,
        info.max_positions,
        seed=0,
    )
    model = load_model(cfg, len(tokenizer), device, seed=0)
    layers = list(range(info.n_layers + 1))
    n_tokens = corpus.input_ids.size
    rate = matmul_rate(device)
    flops_per_token = 2 * matmul_params(model.module)
    bound = rate / flops_per_token

    def run(i: int) -> ActivationStore:
        acfg = ActivationsConfig(cache_dir=str(work / f"extract-{i}"))
        return extract(model, corpus, layers, acfg, device)

    counter = iter(range(10**6))
    seconds, store = timed(lambda: run(next(counter)), args.repeats)
    measured = n_tokens / seconds
    out.append(
        Row(
            "1 extraction",
            f"{info.name} on {device.type}: tokens/s ({n_tokens} tokens, all {len(layers)} "
            f"layers written to the fp16 cache); bound = {rate / 1e9:.0f} GFLOP/s matmul / "
            f"{flops_per_token / 1e6:.1f} MFLOP per token",
            f"{measured:,.0f}",
            f"{bound:,.0f}",
            f"{measured / bound:.2f} of bound",
            ">= 0.5 on a GPU",
            "n/a on CPU (GPU target)" if device.type == "cpu" else _ok(measured / bound >= 0.5),
        )
    )
    targets = corpus.targets.reshape(-1)
    rows = {part: corpus.rows(part) for part in (TRAIN, VAL, TEST)}
    classes = np.unique(targets[rows[TRAIN]])
    lookup = class_index(classes, info.vocab_size)
    labels = {part: lookup[targets[r]] for part, r in rows.items()}
    class_embeddings = model.embedding.float()[torch.from_numpy(classes).to(device)]
    notes = [
        f"data: {corpus.description}; {len(rows[TRAIN])}/{len(rows[VAL])}/{len(rows[TEST])} "
        f"train/val/test tokens; {len(classes)} classes (token types seen in training)"
    ]
    return Setup(args, device, store, rows, labels, classes, class_embeddings, info.n_layers, notes)


def _ok(passed: bool) -> str:
    return "meets" if passed else "MISSES"


def _standardised(s: Setup, layer: int) -> dict[str, Any]:
    """The identical inputs both estimators see: rows of known classes, standardised the way
    the probe does it (centre, one scalar scale)."""
    x = {p: s.x(p, layer) for p in (TRAIN, VAL, TEST)}
    y = {p: s.y(p) for p in (TRAIN, VAL, TEST)}
    keep = y[TRAIN] >= 0
    mean, scale = probes.standardisation(x[TRAIN][keep])
    xs = {p: ((x[p] - mean) / scale).cpu().numpy() for p in x}
    return {"x": x, "y": y, "xs": xs, "keep": keep.cpu().numpy()}


def section_softmax(s: Setup, layers: list[int], out: list[Row]) -> None:
    """Our fit against scikit-learn's lbfgs on the same rows and the same objective, both run
    to the same tolerance on the largest gradient entry: time ratio at matched objective."""
    from sklearn.linear_model import LogisticRegression

    args = s.args
    reg = RegConfig(RegKind.l2, args.strength)
    cfg = ProbeConfig(tol=args.tol)
    ours_total = sk_total = 0.0
    matched = True
    for layer in layers:
        d = _standardised(s, layer)
        x, y = d["x"], d["y"]

        def ours(x=x, y=y) -> probes.FitResult:
            fit = fit_softmax_probe(x[TRAIN], y[TRAIN], len(s.classes), reg, cfg, desc="bench")
            sync(s.device)
            return fit

        t_ours, fit = timed(ours, args.repeats)
        conv = fit.convergence
        keep, xs = d["keep"], d["xs"]
        y_train = y[TRAIN].cpu().numpy()[keep]
        # scikit-learn minimises mean cross-entropy + ||W||^2 / (2 C n) (it scales its loss by
        # the sample count), ours mean cross-entropy + strength ||W||^2: equal at
        # C = 1 / (2 strength n). Its tol bounds the largest gradient entry of that same
        # objective, so ours, tol x the largest gradient entry at zero, is matched exactly.
        c = 1.0 / (2 * args.strength * len(y_train)) if args.strength > 0 else 1e12
        sk_tol = float(conv["tol"]) * float(conv["grad_start"])

        def theirs(xs=xs, keep=keep, y_train=y_train, c=c, sk_tol=sk_tol) -> Any:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                model = LogisticRegression(C=c, tol=sk_tol, max_iter=args.sk_max_iter)
                return model.fit(xs[TRAIN][keep], y_train)

        t_sk, clf = timed(theirs, args.sk_repeats)
        x_train = torch.from_numpy(xs[TRAIN][keep]).double()
        coef, intercept = torch.from_numpy(clf.coef_).double(), torch.from_numpy(clf.intercept_)
        logits = x_train @ coef.T + intercept.double()
        target = torch.from_numpy(np.searchsorted(clf.classes_, y_train))
        sk_objective = torch.nn.functional.cross_entropy(logits, target).item()
        sk_objective += args.strength * float(coef.pow(2).sum())
        ours_objective = float(conv["objective"])
        gap = (ours_objective - sk_objective) / abs(sk_objective)
        close = abs(gap) <= 1e-4
        matched &= close
        iterations = int(clf.n_iter_[0])
        s.notes.append(
            f"softmax, layer {layer}: ours {conv['iterations']} L-BFGS iterations "
            f"({conv['evaluations']} loss+gradient passes, {t_ours / conv['evaluations']:.3f} s "
            f"each, float32, converged={conv['converged']}), scikit-learn {iterations} lbfgs "
            f"iterations ({t_sk / max(iterations, 1):.3f} s each, float64); objectives "
            f"{ours_objective:.6f} vs {sk_objective:.6f}"
        )
        ours_total += t_ours
        sk_total += t_sk
        out.append(
            Row(
                "2 softmax probe",
                f"layer {layer}: fit s at tol {args.tol:g} (objective gap, relative)",
                f"{t_ours:.2f}",
                f"{t_sk:.2f}",
                f"{t_sk / t_ours:.1f}x faster",
                ">= 20x, |gap| <= 1e-4",
                _ok(t_sk / t_ours >= 20 and close) + f" (gap {gap:+.1e})",
            )
        )
    ratio = sk_total / ours_total
    out.append(
        Row(
            "2 softmax probe",
            f"all compared layers {layers}: total fit s",
            f"{ours_total:.2f}",
            f"{sk_total:.2f}",
            f"{ratio:.1f}x faster",
            ">= 20x at matched objective",
            _ok(ratio >= 20 and matched),
        )
    )


def section_ridge(s: Setup, layer: int, out: list[Row]) -> None:
    from sklearn.linear_model import RidgeCV

    args = s.args
    strengths = list(args.strengths)
    d = _standardised(s, layer)
    x, y = d["x"], d["y"]

    def ours() -> list[dict[str, float]]:
        fit = fit_ridge_probe(
            x[TRAIN],
            y[TRAIN],
            s.class_embeddings,
            RegConfig(RegKind.l2, strengths[0]),
            validation=(x[VAL], y[VAL]),
            path_strengths=strengths,
        )
        sync(s.device)
        return fit.path

    t_ours, path = timed(ours, args.repeats)
    best = min(path, key=lambda p: p["val_nll"])["strength"]
    keep, xs = d["keep"], d["xs"]
    targets = s.class_embeddings[torch.from_numpy(s.labels[TRAIN][keep]).to(s.device)]
    n = int(keep.sum())

    def theirs() -> Any:
        # Per-token mean objective here, summed in scikit-learn: alpha = strength * n.
        return RidgeCV(alphas=[v * n for v in strengths]).fit(
            xs[TRAIN][keep], targets.cpu().numpy()
        )

    t_sk, ridge = timed(theirs, args.sk_repeats)
    ratio = t_sk / t_ours
    out.append(
        Row(
            "3 ridge path",
            f"layer {layer}, {len(strengths)} strengths, fit_ridge_probe(path_strengths=...): "
            "s (chosen strength; ours by validation NLL, RidgeCV by leave-one-out MSE)",
            f"{t_ours:.2f} ({best:g})",
            f"{t_sk:.2f} ({ridge.alpha_ / n:g})",
            f"{ratio:.1f}x faster",
            "faster than RidgeCV",
            _ok(ratio > 1),
        )
    )


# ------------------------------------------------------------------- subprocess (real) jobs


def job_args(args: argparse.Namespace, budget: int) -> list[str]:
    extra = [f"model.{o}" for o in args.model_override]
    tracker = ["tracker=none"] if (CONF / "tracker" / "none.yaml").is_file() else []
    return [
        f"model={args.model}",
        *extra,
        f"data.token_budget={budget}",
        f"data.seq_len={args.seq_len}",
        f"device={args.device}",
        *tracker,
    ]


def job_env(work: Path, cache: str) -> dict[str, str]:
    env = dict(os.environ)
    env.update(
        {
            "PROBE_SWEEP_CACHE": str(work / cache),
            "WANDB_MODE": "disabled",
            "HYDRA_FULL_ERROR": "1",
        }
    )
    for var in ("WANDB_DIR", "WANDB_CACHE_DIR", "WANDB_CONFIG_DIR", "WANDB_DATA_DIR"):
        env[var] = str(work / "wandb")
    return env


@dataclass
class JobRun:
    seconds: float
    peak_rss: int  # bytes, from the kernel (VmHWM / ru_maxrss)
    peak_anon: int  # bytes, sampled RssAnon: heap, not file-backed memmap pages
    peak_file: int  # bytes, sampled RssFile: memory-mapped files (reclaimable page cache)
    output: str


def run_job(cli: list[str], cwd: Path, env: dict[str, str]) -> JobRun:
    """Run ``python -m probe_sweep <cli>`` in a fresh process; time it, sample its memory."""
    log = cwd / f"job-{time.monotonic_ns()}.log"
    peaks = {"RssAnon": 0, "RssFile": 0}
    with open(log, "w") as sink:
        start = time.perf_counter()
        proc = subprocess.Popen(
            [sys.executable, "-m", "probe_sweep", *cli],
            cwd=cwd,
            env=env,
            stdout=sink,
            stderr=subprocess.STDOUT,
        )
        done = threading.Event()

        def sample() -> None:
            status = Path(f"/proc/{proc.pid}/status")
            while not done.is_set():
                try:
                    for line in status.read_text().splitlines():
                        key = line.split(":", 1)[0]
                        if key in peaks:
                            peaks[key] = max(peaks[key], int(line.split()[1]) * 1024)
                except (OSError, ValueError, IndexError):
                    pass
                done.wait(0.02)

        sampler = threading.Thread(target=sample, daemon=True)
        sampler.start()
        _, status, usage = os.wait4(proc.pid, 0)
        seconds = time.perf_counter() - start
        done.set()
        sampler.join()
        proc.returncode = os.waitstatus_to_exitcode(status)
    text = log.read_text()
    if proc.returncode != 0:
        raise RuntimeError(f"job {cli} failed ({proc.returncode}):\n{text[-3000:]}")
    return JobRun(seconds, usage.ru_maxrss * 1024, peaks["RssAnon"], peaks["RssFile"], text)


def available_bases() -> list[str]:
    try:
        from probe_sweep.bases import BasisKind

        names = {k.value for k in BasisKind}
    except ImportError:
        names = {"natural"}
    names &= {p.stem for p in (CONF / "basis").glob("*.yaml")} | {"natural"}
    return [b for b in BASIS_PREFERENCE if b in names]


def section_sweep(args: argparse.Namespace, work: Path, out: list[Row], notes: list[str]) -> None:
    if args.bases == "auto":
        present = available_bases()
        bases = (present + ["natural"] * 3)[:3]
        if len(set(bases)) < 3:
            notes.append(
                f"sweep: only bases {present} exist in this checkout, so the sweep repeats "
                f"natural ({','.join(bases)}): the same work per job as three distinct bases "
                "minus the cost of building them"
            )
    else:
        bases = args.bases.split(",")
    common = job_args(args, args.token_budget)
    if len(set(bases)) == len(bases):
        axis = [f"basis={','.join(bases)}"]
    else:  # Hydra drops repeated values: vary the seed instead (same work, same cache entry)
        axis = [f"basis={bases[0]}", f"seed={','.join(str(i) for i in range(len(bases)))}"]
    single = run_job(
        [*common, f"basis={bases[0]}", "hydra.run.dir=single"], work, job_env(work, "cache-single")
    )
    sweep = run_job(
        ["-m", *common, *axis, "hydra.sweep.dir=sweep"],
        work,
        job_env(work, "cache-sweep"),
    )
    jobs = sorted((work / "sweep").rglob("metrics.json"))
    if len(jobs) != len(bases):
        raise RuntimeError(f"sweep wrote {len(jobs)} metrics.json for {len(bases)} bases")
    timings = [json.loads(p.read_text())["timing_s"] for p in jobs]
    one = json.loads((work / "single" / "metrics.json").read_text())["timing_s"]
    ratio = sweep.seconds / single.seconds
    fit_share = one["fit"] / single.seconds
    notes.append(
        f"sweep: single job {single.seconds:.1f} s (extract {one['extract']} s, fit "
        f"{one['fit']} s, the rest process start, imports, model load, writing results); sweep "
        f"jobs extract/fit s: {[(t['extract'], t['fit']) for t in timings]}. With the cache "
        f"reused, the least a {len(bases)}-job sweep can cost is about 1 + {len(bases) - 1} x "
        f"(fit share {fit_share:.2f}) = {1 + (len(bases) - 1) * fit_share:.2f} x one job"
    )
    out.append(
        Row(
            "4 sweep",
            f"`-m {' '.join(axis)}` vs one job (basis={bases[0]}), cold caches, real "
            f"CLI processes, {args.token_budget} tokens, all layers: wall s",
            f"{sweep.seconds:.1f}",
            f"{single.seconds:.1f}",
            f"{ratio:.2f}x one job",
            "< 1.5x",
            _ok(ratio < 1.5),
        )
    )


def section_contention(
    args: argparse.Namespace, work: Path, out: list[Row], notes: list[str]
) -> None:
    """Two jobs at once on the same cores, each sized to its share (PROBE_SWEEP_THREADS, as the
    local launcher's n_jobs would set), against the same two jobs one after the other."""
    cores = os.cpu_count() or 1
    common = [*job_args(args, args.token_budget), "statistics.enabled=false"]
    env = job_env(work, "cache-contention")
    run_job([*common, "hydra.run.dir=warm"], work, env)  # cache the activations first
    sequential = sum(
        run_job([*common, f"seed={i}", f"hydra.run.dir=seq-{i}"], work, env).seconds
        for i in range(2)
    )
    shared = {**env, "PROBE_SWEEP_THREADS": str(max(1, cores // 2))}
    start = time.perf_counter()
    threads = [
        threading.Thread(
            target=run_job, args=([*common, f"seed={i}", f"hydra.run.dir=par-{i}"], work, shared)
        )
        for i in range(2)
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    together = time.perf_counter() - start
    if len(list(work.glob("par-*/metrics.json"))) != 2:
        raise RuntimeError("a job of the contention pair failed")
    ratio = together / sequential
    notes.append(
        f"contention: two jobs one after the other {sequential:.1f} s, at once with "
        f"{max(1, cores // 2)} thread(s) each on {cores} cores {together:.1f} s"
    )
    out.append(
        Row(
            "6 contention",
            f"two jobs at once vs one after the other ({args.token_budget} tokens, cached "
            "activations, statistics off): wall s",
            f"{together:.1f}",
            f"{sequential:.1f}",
            f"{ratio:.2f}x",
            "<= 1.2x",
            _ok(ratio <= 1.2),
        )
    )


def section_memory(args: argparse.Namespace, work: Path, out: list[Row], notes: list[str]) -> None:
    budgets = [args.memory_budget * 2**i for i in range(3)]
    runs = []
    for budget in budgets:
        cli = [*job_args(args, budget), "probe.max_iter=1", f"hydra.run.dir=mem-{budget}"]
        runs.append(run_job(cli, work, job_env(work, f"cache-mem-{budget}")))
    mib = [r.peak_rss / 2**20 for r in runs]
    anon = [r.peak_anon / 2**20 for r in runs]
    files = [r.peak_file / 2**20 for r in runs]
    growth = (mib[-1] - mib[0]) / mib[0]
    per_k = (mib[-1] - mib[0]) / ((budgets[-1] - budgets[0]) / 1000)
    notes.append(
        "memory: peak RSS (MiB) "
        + ", ".join(
            f"{b} tokens: {m:.0f} (anon {a:.0f}, file-backed {f:.0f})"
            for b, m, a, f in zip(budgets, mib, anon, files, strict=True)
        )
        + f"; {per_k:.2f} MiB per extra 1k tokens. Each a fresh `python -m probe_sweep` job "
        "(cold cache, all layers, probe.max_iter=1: memory does not depend on iterations)"
    )
    out.append(
        Row(
            "5 memory",
            f"peak RSS MiB at {budgets[0]} / {budgets[1]} / {budgets[2]} tokens",
            " / ".join(f"{m:.0f}" for m in mib),
            "",
            f"+{100 * growth:.0f}% over 4x tokens",
            "flat (< +10% over 4x)",
            _ok(growth < 0.10),
        )
    )


# ------------------------------------------------------------------------------- reporting


def format_table(rows: list[Row]) -> str:
    head = ["section", "measure", "probe_sweep", "reference", "ratio", "target", "verdict"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        cells = [r.section, r.measure, r.ours, r.reference, r.ratio, r.target, r.verdict]
        lines.append("| " + " | ".join(c.replace("|", "/") for c in cells) + " |")
    return "\n".join(lines)


def report(args: argparse.Namespace, rows: list[Row], notes: list[str], seconds: float) -> str:
    now = dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    info = machine()
    lines = [
        f"## {now}: {args.model}, {args.token_budget} tokens",
        "",
        *(f"- {k}: {v}" for k, v in info.items()),
        f"- command: `python -m probe_sweep.bench {' '.join(args.argv)}`",
        f"- total bench time: {seconds:.0f} s. Ours: median of {args.repeats} runs; scikit-learn: "
        f"median of {args.sk_repeats}. Reference column = scikit-learn (2, 3), one job (4).",
        "",
        format_table(rows),
        "",
        *(f"- {n}" for n in notes),
        "",
    ]
    return "\n".join(lines)


HEADER = """# Benchmarks

Written by `python -m probe_sweep.bench` (see the README); each run appends one section and
earlier sections are kept. Targets (issue 8): probe fitting >= 20x faster than scikit-learn at
matched held-out accuracy on CPU; extraction >= half the forward-pass bound on a GPU; a 3-basis
sweep < 1.5x one job; peak memory flat in the token budget.

"""


def append(path: Path, text: str) -> None:
    old = path.read_text() if path.is_file() else HEADER
    if not old.endswith("\n"):
        old += "\n"
    path.write_text(old + "\n" + text)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    args.argv = sys.argv[1:] if argv is None else list(argv)
    started = time.perf_counter()
    if os.environ.get("OPENBLAS_CORETYPE"):
        print(
            "note: OPENBLAS_CORETYPE is set, so numpy/scikit-learn may run an older BLAS kernel; "
            "for a fair comparison run with `env -u OPENBLAS_CORETYPE -u OPENBLAS_L2_SIZE`",
            file=sys.stderr,
        )
    skip = {v.strip() for v in args.skip.split(",") if v.strip()}
    rows: list[Row] = []
    with tempfile.TemporaryDirectory(prefix="probe_sweep_bench-", dir=args.work_dir) as tmp:
        work = Path(tmp)
        setup = section_extraction(args, work, rows)
        notes = setup.notes
        if setup.device.type == "cpu":
            notes.append("GPU numbers were not taken: no CUDA device on this machine")
        all_layers = list(range(setup.n_layers + 1))
        layers = sorted({all_layers[int(v)] for v in args.compare_layers.split(",")})
        if "2" not in skip:
            section_softmax(setup, layers, rows)
        if "3" not in skip:
            section_ridge(setup, layers[-1], rows)
        if "4" not in skip:
            section_sweep(args, work, rows, notes)
        if "5" not in skip:
            section_memory(args, work, rows, notes)
        if "6" not in skip:
            section_contention(args, work, rows, notes)
        del setup
    text = report(args, rows, notes, time.perf_counter() - started)
    print(text)
    if not args.no_write:
        append(Path(args.output), text)
        print(f"appended to {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
