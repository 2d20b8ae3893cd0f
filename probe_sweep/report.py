"""The sweep-level comparison: every job of a multirun side by side, read from the jobs' files.

Hydra's ``on_multirun_end`` gets no job results, so ``write_sweep_report`` reads each job dir
under the sweep dir: ``metrics.json`` (finished), ``failed.json`` (failed: error, type,
overrides), ``skipped.json`` (skipped: complete results already elsewhere in the sweep),
``pruned.json`` (pruned: an Optuna trial its study stopped), none of them (incomplete: killed or
still running), plus ``wandb_run.json`` when the tracker logged the job. It writes, in the
sweep dir:
- ``report.md``: the jobs table, top-1 by layer, every null statistic in one table, failed and
  incomplete jobs, and how to see the W&B runs (their group, ``wandb sync`` for offline ones);
- ``report_accuracy_by_layer.png``: top-1 accuracy and NLL by layer, one line per job;
- ``report_layers.csv``: the per-layer scores of every finished job, one row per job and layer.

``SweepReportCallback`` (in conf/config.yaml under ``hydra.callbacks``) writes it after every
multirun and makes the multirun exit with status 1 when a job failed;
``python -m probe_sweep.report <sweep dir>`` writes it again by hand.
"""

from __future__ import annotations

import csv
import json
import logging
import re
import sys
import time
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

import numpy as np
import yaml
from hydra.experimental.callback import Callback
from omegaconf import DictConfig
from safetensors import safe_open

from probe_sweep.files import temp_path
from probe_sweep.offset_map import offset_sections
from probe_sweep.plots import plot_accuracy_vs_k, plt, save_figure

log = logging.getLogger("probe_sweep.report")

REPORT = "report.md"
PLOT = "report_accuracy_by_layer.png"
CSV = "report_layers.csv"
K_PLOT = "report_accuracy_vs_k.png"


@dataclass
class JobResult:
    dir: Path
    num: int | None
    status: str  # finished | failed | skipped | pruned | incomplete
    overrides: list[str] = field(default_factory=list)
    metrics: dict[str, Any] | None = None
    failure: dict[str, Any] | None = None
    skipped: dict[str, Any] | None = None
    wandb: dict[str, Any] | None = None
    label: str = ""


def _read_json(path: Path) -> dict[str, Any] | None:
    try:
        value = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return value if isinstance(value, dict) else None


def _job_dirs(sweep_dir: Path) -> list[Path]:
    found: set[Path] = set()
    for pattern in (".hydra", "metrics.json", "failed.json", "skipped.json", "pruned.json"):
        for path in sweep_dir.rglob(pattern):
            rel = path.parent.relative_to(sweep_dir).parts
            if any(part == "wandb" or part.startswith(".") for part in rel):
                continue
            if path.parent != sweep_dir:
                found.add(path.parent)
    return sorted(found)


def _natural(path: Path) -> list[tuple[int, int | str]]:
    """Sort key reading runs of digits as numbers: trial_2 before trial_10."""
    return [(0, int(p)) if p.isdigit() else (1, p) for p in re.split(r"(\d+)", path.as_posix())]


def _num(job_dir: Path) -> int | None:
    match = re.match(r"(\d+)(_|$)", job_dir.name)
    return int(match.group(1)) if match else None


def read_jobs(sweep_dir: Path) -> list[JobResult]:
    """Every job dir under ``sweep_dir``, in job-number order, with what it left behind."""
    jobs = []
    for job_dir in _job_dirs(sweep_dir):
        metrics = _read_json(job_dir / "metrics.json")
        failure = _read_json(job_dir / "failed.json")
        skipped = _read_json(job_dir / "skipped.json")
        status = (
            "finished"
            if metrics
            else "failed"
            if failure is not None
            else "skipped"
            if skipped is not None
            else "pruned"
            if (job_dir / "pruned.json").is_file()
            else "incomplete"
        )
        overrides: list[str] = []
        try:
            loaded = yaml.safe_load((job_dir / ".hydra" / "overrides.yaml").read_text())
            overrides = [str(o) for o in loaded or []]
        except (OSError, yaml.YAMLError):
            overrides = [str(o) for o in (failure or {}).get("overrides") or []]
        jobs.append(
            JobResult(
                dir=job_dir,
                num=_num(job_dir),
                status=status,
                overrides=overrides,
                metrics=metrics,
                failure=failure,
                skipped=skipped,
                wandb=_read_json(job_dir / "wandb_run.json"),
            )
        )
    jobs.sort(key=lambda j: (j.num is None, j.num if j.num is not None else 0, _natural(j.dir)))
    _label(jobs)
    return jobs


def _label(jobs: list[JobResult]) -> None:
    """Label each job by the overrides that differ between the jobs of the sweep."""
    parsed = [dict(o.split("=", 1) if "=" in o else (o, "") for o in j.overrides) for j in jobs]
    keys = sorted({k for p in parsed for k in p})
    varying = [k for k in keys if len({p.get(k) for p in parsed}) > 1]
    for job, values in zip(jobs, parsed, strict=True):
        parts = [f"{k}={values[k]}" for k in varying if k in values]
        text = ", ".join(parts) or job.dir.name
        job.label = f"#{job.num} {text}" if job.num is not None else text


def _cell(value: Any, digits: int = 4) -> str:
    if value is None:
        return "–"
    if isinstance(value, float):
        return f"{value:.{digits}f}" if abs(value) >= 10**-digits or value == 0 else f"{value:.2e}"
    return str(value).replace("|", "\\|").replace("\n", " ")


def _table(header: list[str], rows: list[list[Any]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(_cell(c) for c in row) + " |" for row in rows]
    return lines


def plot_sweep(jobs: list[JobResult], path: Path, title: str) -> bool:
    """Top-1 accuracy and NLL by layer, one line per finished job; False when there is none."""
    done = [j for j in jobs if j.metrics and j.metrics.get("layers")]
    if not done:
        return False
    fig, (acc, nll) = plt.subplots(1, 2, figsize=(12, 4.6))
    colors = plt.get_cmap("tab10" if len(done) <= 10 else "tab20")
    all_layers: set[int] = set()
    for i, job in enumerate(done):
        rows = job.metrics["layers"]  # type: ignore[index]
        layers = [r["layer"] for r in rows]
        all_layers.update(layers)
        style = dict(color=colors(i % colors.N), marker="o", markersize=4, label=job.label)
        acc.plot(layers, [r.get("top1") for r in rows], "-", **style)
        nll.plot(layers, [r.get("nll") for r in rows], "-", **style)
    for ax, name in ((acc, "held-out top-1 accuracy"), (nll, "held-out NLL (nats)")):
        ax.set_xlabel("layer (0 = embedding output)")
        ax.set_ylabel(name)
        ax.set_xticks(sorted(all_layers))
        ax.grid(alpha=0.3)
    handles, labels = acc.get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=min(3, len(done)), fontsize=8)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout(rect=(0, 0.06 + 0.035 * ((len(done) - 1) // 3), 1, 1))
    save_figure(fig, path, dpi=120)
    return True


ROTATIONS = {"natural", "pca", "frequency", "random"}


def _natural_weights(job: JobResult) -> dict[str, np.ndarray]:
    """Each probe's weight in natural coordinates (weight @ encoder^T), from probes.safetensors."""
    with safe_open(job.dir / "probes.safetensors", "np") as f:
        if "basis.encoder" not in f.keys():
            return {}
        encoder = f.get_tensor("basis.encoder")
        return {
            key.removesuffix(".weight"): f.get_tensor(key) @ encoder.T
            for key in f.keys()
            if key.endswith(".weight")
        }


def equivariance_lines(jobs: list[JobResult]) -> list[str]:
    """For jobs that differ only in an orthonormal basis, under l2 or no penalty and without
    truncation, the optimum is the same probe rotated: the largest relative difference of the
    weights in natural coordinates, and of top-1, from the natural basis's job (or the first)."""
    groups: dict[str, list[JobResult]] = {}
    for job in jobs:
        config = dict((job.metrics or {}).get("config") or {})
        basis = config.pop("basis", None) or {}
        config.pop("tracker", None)
        eligible = (
            basis.get("kind") in ROTATIONS
            and basis.get("top_k") is None
            and basis.get("bottom_k") is None
            and (config.get("reg") or {}).get("kind") in ("l2", "none")
            and (config.get("probe") or {}).get("kind") == "softmax"
        )
        if eligible:
            groups.setdefault(json.dumps(config, sort_keys=True, default=str), []).append(job)
    rows = []
    for group in groups.values():
        if len(group) < 2:
            continue
        kinds = [j.metrics["config"]["basis"]["kind"] for j in group]  # type: ignore[index]
        reference = group[kinds.index("natural")] if "natural" in kinds else group[0]
        ours = _natural_weights(reference)
        top1 = {r["layer"]: r["top1"] for r in reference.metrics["layers"]}  # type: ignore[index]
        for job in group:
            if job is reference:
                continue
            theirs = _natural_weights(job)
            shared = sorted(set(ours) & set(theirs))
            if not shared:
                continue
            deviation = max(
                float(np.linalg.norm(theirs[n] - ours[n]) / np.linalg.norm(ours[n])) for n in shared
            )
            d_top1 = max(
                abs(r["top1"] - top1[r["layer"]])
                for r in job.metrics["layers"]  # type: ignore[index]
                if r["layer"] in top1
            )
            rows.append([job.label, reference.label, f"{deviation:.2e}", f"{d_top1:.4f}"])
    if not rows:
        return ["No two jobs differ only in an orthonormal basis (under l2 or no penalty)."]
    header = [
        "job",
        "against",
        "largest relative weight difference",
        "largest top-1 difference (absolute)",
    ]
    return _table(header, rows)


def _interval_cell(value: Any, ci: Any) -> str:
    if value is None:
        return "-"
    if isinstance(ci, list) and len(ci) == 2 and None not in ci:
        return f"{value:.3f} [{ci[0]:.3f}, {ci[1]:.3f}]"
    return f"{value:.3f}"


def statistic_rows(job: JobResult) -> dict[str, dict[int, dict[str, Any]]]:
    """A job's per-layer statistics (metrics.json ``statistics.entries``), by name then layer;
    the accuracy rows' own intervals (top-1, selectivity) join them."""
    out: dict[str, dict[int, dict[str, Any]]] = {}
    metrics = job.metrics or {}
    for row in metrics.get("layers", []):
        for name in ("top1", "selectivity", "top1_minus_random_init"):
            if row.get(name) is not None:
                value = {"observed": row[name], "ci": row.get(f"{name}_ci")}
                out.setdefault(name, {})[row["layer"]] = value
    for entry in (metrics.get("statistics") or {}).get("entries", []):
        if entry.get("layer") is not None and entry.get("observed") is not None:
            out.setdefault(entry["name"], {})[entry["layer"]] = entry
    return out


def statistics_sections(jobs: list[JobResult], sweep_dir: Path) -> list[str]:
    """One table per statistic (jobs as rows, layers as columns, value [95% CI]) and one figure
    (a line per job, the interval as error bars). Jobs with an unconverged probe are marked."""
    per_job = {job.label: statistic_rows(job) for job in jobs}
    names = sorted({name for stats in per_job.values() for name in stats})
    if not names:
        return ["No job reported statistics."]
    unconverged = {
        job.label
        for job in jobs
        if not ((job.metrics or {}).get("probe") or {}).get("all_converged", True)
    }
    lines = []
    if unconverged:
        lines += [
            f"Jobs marked * have a probe that did not reach its tolerance: {sorted(unconverged)}",
            "",
        ]
    for name in names:
        layers = sorted({layer for stats in per_job.values() for layer in stats.get(name, {})})
        table = []
        for label, stats in per_job.items():
            by_layer = stats.get(name, {})
            if by_layer:
                cells = [by_layer.get(layer, {}) for layer in layers]
                mark = " *" if label in unconverged else ""
                table.append(
                    [label + mark, *[_interval_cell(c.get("observed"), c.get("ci")) for c in cells]]
                )
        figure = f"report_{name}.png"
        lines += [f"### {name}", ""]
        if plot_statistic(per_job, name, layers, unconverged, sweep_dir / figure):
            lines += [f"![{name} by layer, one line per job]({figure})", ""]
        lines += _table(["job", *[f"layer {layer}" for layer in layers]], table) + [""]
    return lines


def plot_statistic(
    per_job: dict[str, dict[str, dict[int, dict[str, Any]]]],
    name: str,
    layers: list[int],
    unconverged: set[str],
    path: Path,
) -> bool:
    """``name`` against the layer, one line per job, 95% intervals as error bars."""
    fig, ax = plt.subplots(figsize=(7.5, 4.2))
    drawn = False
    for label, stats in per_job.items():
        points = [(layer, stats[name][layer]) for layer in layers if layer in stats.get(name, {})]
        if not points:
            continue
        xs = [layer for layer, _ in points]
        ys = [p["observed"] for _, p in points]
        cis = [p.get("ci") or [None, None] for _, p in points]
        lower = [y - c[0] if c[0] is not None else 0 for y, c in zip(ys, cis, strict=True)]
        upper = [c[1] - y if c[1] is not None else 0 for y, c in zip(ys, cis, strict=True)]
        style = "--" if label in unconverged else "-"
        text = label + (" (not converged)" if label in unconverged else "")
        ax.errorbar(xs, ys, yerr=[lower, upper], fmt=style + "o", ms=3, capsize=2, label=text)
        drawn = True
    if not drawn:
        plt.close(fig)
        return False
    ax.set_xlabel("layer (0 = embedding output)")
    ax.set_ylabel(name)
    ax.set_xticks(layers)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    ax.set_title(f"{name} by layer (95% intervals)", fontsize=10)
    fig.tight_layout()
    save_figure(fig, path, dpi=110)
    return True


def write_sweep_report(sweep_dir: Path, jobs: list[JobResult] | None = None) -> Path:
    """Write ``report.md`` (+ PNG, CSV) into ``sweep_dir`` from its jobs' files (``jobs``, when
    the caller has already read them); returns it."""
    sweep_dir = Path(sweep_dir)
    jobs = read_jobs(sweep_dir) if jobs is None else jobs
    finished = [j for j in jobs if j.status == "finished"]
    failed = [j for j in jobs if j.status == "failed"]
    incomplete = [j for j in jobs if j.status == "incomplete"]
    skipped = [j for j in jobs if j.status == "skipped"]
    pruned = [j for j in jobs if j.status == "pruned"]
    lines = [
        f"# Sweep report: {sweep_dir}",
        "",
        f"Written {datetime.now().isoformat(timespec='seconds')} from the job dirs' files. "
        f"{len(jobs)} jobs: {len(finished)} finished, {len(failed)} failed, "
        f"{len(skipped)} skipped, {len(pruned)} pruned, {len(incomplete)} incomplete.",
        "",
        "## Jobs",
        "",
    ]
    rows = []
    for job in jobs:
        m = job.metrics or {}
        probe, top1 = m.get("probe", {}), [r.get("top1") for r in m.get("layers", [])]
        scored = [(r["layer"], r["top1"]) for r in m.get("layers", []) if r.get("top1") is not None]
        run = job.wandb or {}
        rows.append(
            [
                job.label,
                job.status,
                m.get("model", {}).get("name"),
                probe.get("kind"),
                probe.get("layers"),
                probe.get("basis"),
                f"{probe['reg']} {probe['strength']:g}" if "reg" in probe else None,
                top1[0] if top1 else None,
                top1[-1] if top1 else None,
                sum(t for _, t in scored) / len(scored) if scored else None,
                max(scored, key=lambda lt: lt[1])[0] if scored else None,
                f"{run['mode']} {run['id']}" if run.get("id") else None,
                job.dir.relative_to(sweep_dir).as_posix(),
            ]
        )
    header = ["job", "status", "model", "probe", "layers", "basis", "reg", "top-1 first layer"]
    header += ["top-1 last layer", "mean top-1", "best layer", "W&B run", "dir"]
    lines += _table(header, rows)

    lines += ["", "## Accuracy by layer", ""]
    where = "/".join(sweep_dir.resolve().parts[-2:])  # multirun/<date>/<time> -> <date>/<time>
    title = f"{where}: held-out scores by layer, one line per job"
    if plot_sweep(jobs, sweep_dir / PLOT, title):
        lines += [f"![top-1 accuracy and NLL by layer, one line per job]({PLOT})", ""]
        layers = sorted({r["layer"] for j in finished for r in j.metrics["layers"]})  # type: ignore[index]
        table = []
        for job in finished:
            by = {r["layer"]: r.get("top1") for r in job.metrics["layers"]}  # type: ignore[index]
            table.append([job.label, *[by.get(layer) for layer in layers]])
        lines += ["Held-out top-1 accuracy:", ""]
        lines += _table(["job", *[f"layer {layer}" for layer in layers]], table)
        _write_csv(finished, sweep_dir / CSV)
    else:
        lines.append("No finished job.")

    k_points = {
        job.label: job.metrics["statistics"]["accuracy_vs_k"]  # type: ignore[index]
        for job in finished
        if ((job.metrics or {}).get("statistics") or {}).get("accuracy_vs_k")
    }
    if k_points:
        plot_accuracy_vs_k(k_points, sweep_dir / K_PLOT, f"{where}: top-1 against k, per job")
        lines += ["", "## Accuracy against k", "", f"![top-1 against k, per job]({K_PLOT})"]
    lines += offset_sections([(j.overrides, j.metrics or {}) for j in finished], sweep_dir)
    lines += ["", "## Orthonormal bases under l2: the same probe up to rotation", ""]
    lines += equivariance_lines(finished)
    lines += ["", "## Statistics by layer", ""]
    lines += statistics_sections(finished, sweep_dir)

    lines += ["", "## Failed jobs", ""]
    if failed:
        failed_rows = [
            [
                j.label,
                (j.failure or {}).get("type"),
                (j.failure or {}).get("error"),
                " ".join(j.overrides),
            ]
            for j in failed
        ]
        lines += _table(["job", "type", "error", "overrides"], failed_rows)
    else:
        lines.append("None.")
    if skipped:
        lines += ["", "Skipped (complete results for the same config already in the sweep):", ""]
        lines += [f"- {j.label}: results in `{(j.skipped or {}).get('results')}`" for j in skipped]
    if pruned:
        lines += ["", "Pruned (Optuna trials their study stopped early; see pruned.json):", ""]
        lines += [f"- {j.label}: `{j.dir.relative_to(sweep_dir).as_posix()}`" for j in pruned]
    if incomplete:
        lines += ["", "Incomplete (no metrics.json, no failed.json: killed or still running):", ""]
        lines += [f"- {j.label}: `{j.dir.relative_to(sweep_dir).as_posix()}`" for j in incomplete]

    lines += ["", "## W&B runs", "", *_wandb_lines(jobs), ""]
    path = sweep_dir / REPORT
    tmp = temp_path(path)
    tmp.write_text("\n".join(lines))
    tmp.replace(path)
    return path


def _write_csv(jobs: list[JobResult], path: Path) -> None:
    keys = sorted(
        {
            k
            for j in jobs
            for r in j.metrics["layers"]
            for k, v in r.items()  # type: ignore[index]
            if isinstance(v, (int, float)) and not isinstance(v, bool)
        }
        - {"layer"}
    )
    tmp = temp_path(path)
    with tmp.open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["job", "dir", "layer", *keys])
        for job in jobs:
            for row in job.metrics["layers"]:  # type: ignore[index]
                writer.writerow(
                    [job.label, job.dir.name, row["layer"], *[row.get(k) for k in keys]]
                )
    tmp.replace(path)


def _wandb_lines(jobs: list[JobResult]) -> list[str]:
    runs = [j.wandb for j in jobs if j.wandb and j.wandb.get("id")]
    if not runs:
        return ["No job was logged to W&B (tracker disabled, or W&B failed: see the job logs)."]
    groups = sorted({str(r.get("group")) for r in runs})
    lines = [f"{len(runs)} runs, project `{runs[0].get('project')}`, group `{', '.join(groups)}`."]
    online = [r for r in runs if r.get("url")]
    offline = [r for r in runs if r.get("mode") == "offline"]
    lines += [f"- [{r['name']}]({r['url']})" for r in online]
    if offline:
        lines += [
            "",
            f"{len(offline)} offline runs; upload them (then compare them grouped by `group`):",
            "",
            "```",
            "wandb sync " + " ".join(str(r["run_dir"]) for r in offline),
            "```",
        ]
    return lines


class SweepReportCallback(Callback):
    """Writes the sweep report after every multirun (a failure to write it is one warning line),
    then exits with status 1 if a job of this multirun failed: the other jobs ran to the end,
    and scripts that launch sweeps must still be able to tell."""

    started = 0.0

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        self.started = time.time()

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        sweep_dir = Path(str(config.hydra.sweep.dir))
        try:
            jobs = read_jobs(sweep_dir)
            log.info("Sweep report: %s", write_sweep_report(sweep_dir, jobs))
            # Failures left in the sweep dir by earlier multiruns are in the report, not here
            # (whole seconds: some file systems keep coarse modification times).
            failed = [
                job.dir.name
                for job in jobs
                if job.status == "failed"
                and (job.dir / "failed.json").stat().st_mtime >= int(self.started)
            ]
        except Exception as exc:
            log.warning("Could not write the sweep report: %s: %s", type(exc).__name__, exc)
            return
        if failed:
            log.error(
                "%d job(s) failed (%s); each has a failed.json and the sweep report lists them",
                len(failed),
                ", ".join(failed),
            )
            sys.exit(1)


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 1 or not Path(args[0]).is_dir():
        print("usage: python -m probe_sweep.report <sweep dir>", file=sys.stderr)
        return 2
    print(write_sweep_report(Path(args[0])))
    return 0


if __name__ == "__main__":
    sys.exit(main())
