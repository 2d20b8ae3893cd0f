"""``python -m probe_sweep.bench``: the command line, the sections it runs, and the report it
prints and appends to BENCHMARKS.md (see the package docstring for what each section measures).
"""

from __future__ import annotations

import argparse
import datetime as dt
import os
import sys
import tempfile
import time
from pathlib import Path

from probe_sweep.bench import __doc__ as package_doc
from probe_sweep.bench.common import REPO, Row, machine, progress
from probe_sweep.probes.linear import RegConfig

DEFAULT_STRENGTHS = [1e-7, 1e-6, 1e-5, 1e-4, 1e-3, 1e-2, 1e-1, 1.0]
SECTIONS = ["extraction", "softmax", "ridge", "sweep", "memory", "contention", "scale", "gpu_scale"]
DEFAULT_SECTIONS = SECTIONS[:6]
GPU_OVERRIDES = (
    "layers=subset layers.indices=[0,48] probe.classes=vocab probe.max_iter=15 "
    "probe.chunk_mb=4096 statistics.random_init_baseline=false statistics.n_permutations=20 "
    "tracker=none"
)


def integers(text: str) -> list[int]:
    return [int(v.replace("_", "")) for v in text.split(",") if v.strip()]


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m probe_sweep.bench",
        description="Benchmark probe_sweep (extraction, probe fits against scikit-learn, sweeps, "
        "memory, scale), print a table and append it to BENCHMARKS.md.",
        epilog=(package_doc or "").split("\n\n")[1],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--model", default="minilm", help="a conf/model/<name>.yaml")
    p.add_argument(
        "--model-override",
        nargs="*",
        default=[],
        metavar="KEY=VALUE",
        help="model settings, e.g. random_init=true architecture.n_layer=12 (also sent to jobs)",
    )
    p.add_argument("--token-budget", type=int, default=16_000, help="tokens for sections 1-4, 6")
    p.add_argument("--seq-len", type=int, default=128, help="sequence length of sections 1-6")
    p.add_argument("--device", default="auto", help="auto (cuda when visible), cpu, cuda")
    p.add_argument(
        "--compare-layers",
        default="0,-1",
        help="layers for the scikit-learn comparisons (python indices into 0..n_layers)",
    )
    p.add_argument("--strength", type=float, default=RegConfig().strength, help="l2 strength")
    p.add_argument("--repeats", type=int, default=3, help="runs of our timed fits (median)")
    p.add_argument("--sk-repeats", type=int, default=1, help="runs of scikit-learn fits (median)")
    p.add_argument(
        "--sk-budget", type=float, default=900, help="solver: scikit-learn's seconds per solver"
    )
    p.add_argument(
        "--strengths",
        type=lambda s: [float(v) for v in s.split(",")],
        default=DEFAULT_STRENGTHS,
        help="comma-separated ridge path strengths",
    )
    p.add_argument("--bases", default="auto", help="3 bases for the sweep, e.g. pca,nmf,natural")
    p.add_argument(
        "--memory-budget", type=int, default=8_000, help="budget B of section 5 (runs B, 2B, 4B)"
    )
    p.add_argument(
        "--scale-tokens",
        type=integers,
        default=[100_000, 1_000_000],
        help="scale: comma-separated token budgets, e.g. 100000,1000000,5000000 (a budget whose "
        "cache the disk cannot hold is skipped with a note; default 100000,1000000)",
    )
    p.add_argument("--scale-data", default="sotu", help="scale: the corpus (conf/data)")
    p.add_argument("--scale-max-iter", type=int, default=3, help="scale: solver iterations (3)")
    p.add_argument(
        "--scale-overrides",
        default="probe.classes=vocab",
        help="scale: more job overrides (default probe.classes=vocab: the class count, and with it "
        "the probe's memory, stays the same at every budget)",
    )
    p.add_argument(
        "--gpu-model", default="gpt2-xl-random", help="gpu_scale: the model (conf/model)"
    )
    p.add_argument("--gpu-tokens", type=int, default=1_000_000, help="gpu_scale: token budget")
    p.add_argument(
        "--gpu-overrides",
        default=GPU_OVERRIDES,
        help="gpu_scale: job overrides (default: %(default)s)",
    )
    p.add_argument(
        "--only",
        default=",".join(DEFAULT_SECTIONS),
        help=f"comma-separated sections to run, by name or number 1-8 ({', '.join(SECTIONS)}) "
        "or 'all' (default: 1-6)",
    )
    p.add_argument("--skip", default="", help="comma-separated sections not to run (as --only)")
    p.add_argument("--output", default=str(REPO / "BENCHMARKS.md"), help="file to append to")
    p.add_argument("--no-write", action="store_true", help="print only")
    p.add_argument("--work-dir", default=None, help="where caches and job dirs go (a temp dir)")
    return p.parse_args(argv)


def section_names(text: str) -> set[str]:
    """Section names from names, numbers (1 = extraction) or 'all'."""
    names: set[str] = set()
    for value in (v.strip() for v in text.split(",")):
        if value == "all":
            names.update(SECTIONS)
        elif value.isdigit() and 1 <= int(value) <= len(SECTIONS):
            names.add(SECTIONS[int(value) - 1])
        elif value.replace("-", "_") in SECTIONS:
            names.add(value.replace("-", "_"))
        elif value:
            raise SystemExit(f"error: no bench section {value!r}; sections: {', '.join(SECTIONS)}")
    return names


def run_sections(args: argparse.Namespace, chosen: set[str], work: Path) -> tuple[list, list]:
    """Run the chosen sections in order; the rows of the table and the notes below it."""
    from probe_sweep.bench.contention import section_contention
    from probe_sweep.bench.gpu_scale import section_gpu_scale
    from probe_sweep.bench.memory import section_memory
    from probe_sweep.bench.scale import section_scale
    from probe_sweep.bench.sweep import section_sweep

    rows: list[Row] = []
    notes: list[str] = []
    if chosen & {"extraction", "softmax", "ridge"}:  # 2 and 3 fit on 1's cache entry
        from probe_sweep.bench.extraction import section_extraction
        from probe_sweep.bench.ridge import section_ridge
        from probe_sweep.bench.softmax import section_softmax

        setup = section_extraction(args, work, rows)
        notes.extend(setup.notes)
        setup.notes = notes  # sections 2 and 3 add theirs below
        if setup.device.type == "cpu":
            notes.append("GPU numbers were not taken: no CUDA device on this machine")
        all_layers = list(range(setup.n_layers + 1))
        layers = sorted({all_layers[int(v)] for v in args.compare_layers.split(",")})
        if "softmax" in chosen:
            section_softmax(setup, layers, rows)
        if "ridge" in chosen:
            section_ridge(setup, layers[-1], rows)
        del setup
    others = {
        "sweep": section_sweep,
        "memory": section_memory,
        "contention": section_contention,
        "scale": section_scale,
        "gpu_scale": section_gpu_scale,
    }
    for name, section in others.items():
        if name in chosen:
            section(args, work, rows, notes)
    return rows, notes


def format_table(rows: list[Row]) -> str:
    head = ["section", "measure", "probe_sweep", "reference", "ratio", "target", "verdict"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        cells = [r.section, r.measure, r.ours, r.reference, r.ratio, r.target, r.verdict]
        lines.append("| " + " | ".join(c.replace("|", "/") for c in cells) + " |")
    return "\n".join(lines)


def title(args: argparse.Namespace, chosen: list[str]) -> str:
    """The model, and the token budgets of the sections that ran."""
    parts = [args.model]
    if set(chosen) & set(DEFAULT_SECTIONS):
        parts.append(f"{args.token_budget} tokens")
    if "scale" in chosen:
        parts.append(f"scale at {'/'.join(f'{b:,}' for b in sorted(args.scale_tokens))} tokens")
    if "gpu_scale" in chosen:
        parts.append(f"gpu scale: {args.gpu_model} at {args.gpu_tokens:,} tokens")
    return ", ".join(parts)


def report(
    args: argparse.Namespace, chosen: list[str], rows: list[Row], notes: list[str], seconds: float
) -> str:
    now = dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    lines = [
        f"## {now}: {title(args, chosen)}",
        "",
        *(f"- {k}: {v}" for k, v in machine().items()),
        f"- command: `python -m probe_sweep.bench {' '.join(args.argv)}`",
        f"- sections: {', '.join(chosen)}",
        f"- total bench time: {seconds:.0f} s. Ours: median of {args.repeats} runs; scikit-learn: "
        f"median of {args.sk_repeats}. Reference column = scikit-learn (2, 3), one job (4), "
        "the smallest budget (7), the bare forward pass (8).",
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
    chosen = section_names(args.only) - section_names(args.skip)
    ordered = [name for name in SECTIONS if name in chosen]
    if not ordered:
        raise SystemExit("error: no section left to run (--only minus --skip)")
    started = time.perf_counter()
    if os.environ.get("OPENBLAS_CORETYPE"):
        print(
            "note: OPENBLAS_CORETYPE is set, so numpy/scikit-learn may run an older BLAS kernel; "
            "for a fair comparison run with `env -u OPENBLAS_CORETYPE -u OPENBLAS_L2_SIZE`",
            file=sys.stderr,
        )
    progress(f"sections: {', '.join(ordered)}")
    if args.work_dir:
        Path(args.work_dir).mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="probe_sweep_bench-", dir=args.work_dir) as tmp:
        rows, notes = run_sections(args, chosen, Path(tmp))
    text = report(args, ordered, rows, notes, time.perf_counter() - started)
    print(text)
    if not args.no_write:
        append(Path(args.output), text)
        print(f"appended to {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
