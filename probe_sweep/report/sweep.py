"""The sweep-level comparison: every job of a multirun side by side, read from the jobs' files
(``jobs/sweep.py``: Hydra's ``on_multirun_end`` gets no job results). It writes, in the sweep
dir:
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
import io
import logging
import sys
import time
from datetime import datetime
from pathlib import Path
from typing import Any

from hydra.experimental.callback import Callback
from omegaconf import DictConfig

from probe_sweep.files import write_bytes
from probe_sweep.jobs.jobdir import FAILED
from probe_sweep.jobs.sweep import JobResult, read_jobs
from probe_sweep.report.offsets import offset_sections
from probe_sweep.report.plots import plot_accuracy_vs_k, plt, save_figure
from probe_sweep.report.statistics import equivariance_lines, statistics_sections
from probe_sweep.report.tables import markdown_table

log = logging.getLogger("probe_sweep.report.sweep")

REPORT = "report.md"
PLOT = "report_accuracy_by_layer.png"
CSV = "report_layers.csv"
K_PLOT = "report_accuracy_vs_k.png"


def write_sweep_report(sweep_dir: Path, jobs: list[JobResult] | None = None) -> Path:
    """Write ``report.md`` (+ PNG, CSV) into ``sweep_dir`` from its jobs' files (``jobs``, when
    the caller has already read them); returns it."""
    sweep_dir = Path(sweep_dir)
    jobs = read_jobs(sweep_dir) if jobs is None else jobs
    finished = [j for j in jobs if j.status == "finished"]
    statuses = ("finished", "failed", "skipped", "pruned", "incomplete")
    counts = {status: sum(j.status == status for j in jobs) for status in statuses}
    where = "/".join(sweep_dir.resolve().parts[-2:])  # multirun/<date>/<time> -> <date>/<time>
    lines = [
        f"# Sweep report: {sweep_dir}",
        "",
        f"Written {datetime.now().isoformat(timespec='seconds')} from the job dirs' files. "
        f"{len(jobs)} jobs: " + ", ".join(f"{n} {status}" for status, n in counts.items()) + ".",
        "",
        "## Jobs",
        "",
        *jobs_table(jobs, sweep_dir),
        "",
        "## Accuracy by layer",
        "",
        *accuracy_section(jobs, sweep_dir, where),
    ]
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
    lines += ["", "## Failed jobs", "", *unfinished_lines(jobs, sweep_dir)]
    lines += ["", "## W&B runs", "", *_wandb_lines(jobs), ""]
    path = sweep_dir / REPORT
    write_bytes(path, "\n".join(lines).encode())
    return path


def jobs_table(jobs: list[JobResult], sweep_dir: Path) -> list[str]:
    """One row per job: what it fitted, its top-1 at the first and last layer, mean and best."""
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
    return markdown_table(header, rows)


def accuracy_section(jobs: list[JobResult], sweep_dir: Path, where: str) -> list[str]:
    """The figure of top-1 and NLL by layer, the top-1 table, and the CSV of every score."""
    finished = [j for j in jobs if j.status == "finished"]
    title = f"{where}: held-out scores by layer, one line per job"
    if not plot_sweep(jobs, sweep_dir / PLOT, title):
        return ["No finished job."]
    lines = [f"![top-1 accuracy and NLL by layer, one line per job]({PLOT})", ""]
    layers = sorted({r["layer"] for j in finished for r in j.metrics["layers"]})  # type: ignore[index]
    table = []
    for job in finished:
        by = {r["layer"]: r.get("top1") for r in job.metrics["layers"]}  # type: ignore[index]
        table.append([job.label, *[by.get(layer) for layer in layers]])
    lines += ["Held-out top-1 accuracy:", ""]
    lines += markdown_table(["job", *[f"layer {layer}" for layer in layers]], table)
    _write_csv(finished, sweep_dir / CSV)
    return lines


def unfinished_lines(jobs: list[JobResult], sweep_dir: Path) -> list[str]:
    """Failed jobs (a table of their errors), then skipped, pruned and incomplete ones."""
    failed = [j for j in jobs if j.status == "failed"]
    lines = ["None."]
    if failed:
        rows = [
            [j.label, (j.failure or {}).get("type"), (j.failure or {}).get("error")]
            + [" ".join(j.overrides)]
            for j in failed
        ]
        lines = markdown_table(["job", "type", "error", "overrides"], rows)
    for status, heading in (
        ("skipped", "Skipped (complete results for the same config already in the sweep):"),
        ("pruned", "Pruned (Optuna trials their study stopped early; see pruned.json):"),
        ("incomplete", "Incomplete (no metrics.json, no failed.json: killed or still running):"),
    ):
        these = [j for j in jobs if j.status == status]
        if these:
            lines += ["", heading, ""]
            lines += [f"- {j.label}: {_where(j, sweep_dir)}" for j in these]
    return lines


def _where(job: JobResult, sweep_dir: Path) -> str:
    """A skipped job's results, else the job's own dir (relative to the sweep)."""
    if job.status == "skipped":
        return f"results in `{(job.skipped or {}).get('results')}`"
    return f"`{job.dir.relative_to(sweep_dir).as_posix()}`"


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
    text = io.StringIO(newline="")
    writer = csv.writer(text)
    writer.writerow(["job", "dir", "layer", *keys])
    for job in jobs:
        for row in job.metrics["layers"]:  # type: ignore[index]
            writer.writerow([job.label, job.dir.name, row["layer"], *[row.get(k) for k in keys]])
    write_bytes(path, text.getvalue().encode())


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
                and (job.dir / FAILED).stat().st_mtime >= int(self.started)
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
