"""The sweep report's comparisons across jobs: statistics by layer (a table and a figure per
statistic, 95% intervals) and the check that jobs differing only in an orthonormal basis fitted
the same probe up to rotation."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
from safetensors import safe_open

from probe_sweep.bases import ORTHONORMAL
from probe_sweep.jobs.jobdir import PROBES, keyed_content
from probe_sweep.jobs.sweep import JobResult
from probe_sweep.report.plots import plt, save_figure
from probe_sweep.report.tables import interval_cell, markdown_table
from probe_sweep.results import shown_fields


def _natural_weights(job: JobResult) -> dict[str, np.ndarray]:
    """Each probe's weight in natural coordinates (weight @ encoder^T), from probes.safetensors."""
    with safe_open(job.dir / PROBES, "np") as f:
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
    truncation, the optimum is the same probe rotated (both kinds standardise by one scalar):
    the largest relative difference of the weights in natural coordinates, and of top-1, from
    the natural basis's job (or the first)."""
    groups: dict[str, list[JobResult]] = {}
    for job in jobs:
        config = keyed_content((job.metrics or {}).get("config") or {})
        basis = config.pop("basis", None) or {}
        eligible = (
            basis.get("kind") in ORTHONORMAL
            and basis.get("top_k") is None
            and basis.get("bottom_k") is None
            and (config.get("reg") or {}).get("kind") in ("l2", "none")
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
    return markdown_table(header, rows)


def statistic_rows(job: JobResult) -> dict[str, dict[int, dict[str, Any]]]:
    """A job's per-layer statistics (metrics.json ``statistics.entries``), by name then layer;
    the accuracy rows' own intervals (top-1, selectivity) join them."""
    out: dict[str, dict[int, dict[str, Any]]] = {}
    metrics = job.metrics or {}
    for row in metrics.get("layers", []):
        for name in shown_fields("compared"):
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
                    [label + mark, *[interval_cell(c.get("observed"), c.get("ci")) for c in cells]]
                )
        figure = f"report_{name}.png"
        lines += [f"### {name}", ""]
        if plot_statistic(per_job, name, layers, unconverged, sweep_dir / figure):
            lines += [f"![{name} by layer, one line per job]({figure})", ""]
        lines += markdown_table(["job", *[f"layer {layer}" for layer in layers]], table) + [""]
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
