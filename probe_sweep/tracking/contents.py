"""What a job's W&B run holds, read from its ``metrics.json`` and its files: curves against
depth (``by_layer/*``) and against solver evaluations (``fit/*``), tables, images, the summary,
and the probe weights as a versioned artifact.

``log_contents`` is handed the ``wandb`` module and a started run by ``tracking``, which alone
imports wandb; nothing here starts, names or finishes a run. The metrics are walked generically
(``statistics``, ``layer_scalars``), so a new score or statistic in metrics.json reaches
W&B without a change here.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np
from safetensors import safe_open

STAT_FIELDS = ("observed", "null_mean", "p", "p_floor")


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def statistics(metrics: dict[str, Any]) -> list[dict[str, Any]]:
    """Every statistic in ``metrics`` (the ``statistics`` section, and any per-layer one).

    A statistic is any dict holding ``observed``, wherever it sits, with its null's ``p`` where
    it was tested against one; its name is its path of keys (list items are named by their
    ``name``/``statistic``/``layer`` field). Rows keep the statistic's other scalar fields
    (``layer``, ``n_null``, ...).
    """
    found: list[dict[str, Any]] = []

    def label(item: Any, index: int) -> str:
        if isinstance(item, dict):
            for key in ("name", "statistic", "kind"):
                if isinstance(item.get(key), str):
                    layer = item.get("layer")
                    return item[key] if layer is None else f"{item[key]}/layer_{layer}"
            if "layer" in item:
                return f"layer_{item['layer']}"
        return str(index)

    def walk(node: Any, path: list[str]) -> None:
        if isinstance(node, dict):
            if "observed" in node:
                row = {k: v for k, v in node.items() if _is_number(v) or isinstance(v, str)}
                row["name"] = "/".join(path) or "statistic"
                found.append(row)
                return
            for key, value in node.items():
                walk(value, [*path, str(key)])
        elif isinstance(node, list):
            for i, item in enumerate(node):
                walk(item, [*path, label(item, i)])

    walk(metrics.get("statistics"), [])
    for row in metrics.get("layers", []):
        if isinstance(row, dict) and "statistics" in row:
            walk(row["statistics"], [f"layer_{row.get('layer')}"])
    return found


def layer_scalars(row: dict[str, Any]) -> dict[str, float]:
    """The numeric per-layer scores of a ``metrics.json`` row (not the layer, not the history)."""
    return {k: v for k, v in row.items() if k != "layer" and _is_number(v)}


def log_contents(
    wandb: Any,
    run: Any,
    out_dir: Path,
    metrics: dict[str, Any],
    identity: dict[str, Any],
    log_artifacts: bool,
) -> None:
    """Curves against depth and against solver evaluations, tables, images, the summary and the
    probe weights as an artifact, in that order."""
    rows = [r for r in metrics.get("layers", []) if isinstance(r, dict)]
    stats = statistics(metrics)
    curves = {name: fit.get("history") or [] for name, fit in metrics.get("fits", {}).items()}
    _log_layer_curves(run, rows, stats)
    _log_fit_curves(wandb, run, curves)
    run.log(_tables(wandb, rows, curves, stats))
    images = {
        f"images/{p.stem}": wandb.Image(str(p), caption=p.name)
        for p in sorted(out_dir.glob("*.png"))
    }
    if images:
        run.log(images)
    run.summary.update(_summary(metrics, rows, stats))
    if log_artifacts and (out_dir / "probes.safetensors").is_file():
        run.log_artifact(_probe_artifact(wandb, out_dir, metrics, rows, identity))


def _log_layer_curves(run: Any, rows: list[dict[str, Any]], stats: list[dict[str, Any]]) -> None:
    """Every numeric per-layer score, and the observed value (and p) of every statistic that
    names its layer, as curves ``by_layer/*`` on a ``layer`` x-axis."""
    run.define_metric("layer")
    run.define_metric("by_layer/*", step_metric="layer")
    for row in rows:
        point = {f"by_layer/{k}": v for k, v in layer_scalars(row).items()}
        point.update(_layer_statistics(row["layer"], stats))
        run.log({"layer": row["layer"], **point})


def _layer_statistics(layer: Any, stats: list[dict[str, Any]]) -> dict[str, float]:
    """``by_layer/statistics/<name less its layer>/{p,observed}`` of the statistics of
    ``layer``."""
    point = {}
    for stat in stats:
        if stat.get("layer") != layer:
            continue
        base = "/".join(p for p in stat["name"].split("/") if p != f"layer_{layer}")
        for key in ("p", "observed"):
            if _is_number(stat.get(key)):
                point[f"by_layer/statistics/{base or 'statistic'}/{key}"] = stat[key]
    return point


def _log_fit_curves(wandb: Any, run: Any, curves: dict[str, list[dict[str, Any]]]) -> None:
    """The objective and the estimated relative gap at every solver iteration, curves
    ``fit/<probe>/objective`` and ``fit/<probe>/gap_rel`` per fitted probe on an ``iteration``
    x-axis, and all objectives in one chart."""
    run.define_metric("iteration")
    run.define_metric("fit/*", step_metric="iteration")
    for probe, history in curves.items():
        for point in history:
            logged = {"iteration": point["iteration"], f"fit/{probe}/objective": point["objective"]}
            if point.get("gap_rel") is not None:
                logged[f"fit/{probe}/gap_rel"] = point["gap_rel"]
            run.log(logged)
    if any(curves.values()):
        chart = wandb.plot.line_series(
            xs=[[x["iteration"] for x in h] for h in curves.values()],
            ys=[[x["objective"] for x in h] for h in curves.values()],
            keys=list(curves),
            title="training objective by solver iteration, one line per probe",
            xname="iteration",
        )
        run.log({"charts/objective_by_iteration": chart})


def _tables(
    wandb: Any,
    rows: list[dict[str, Any]],
    curves: dict[str, list[dict[str, Any]]],
    stats: list[dict[str, Any]],
) -> dict[str, Any]:
    """``tables/per_layer``, and where there is something to show ``tables/training`` (the fit
    curves) and ``tables/statistics``."""
    columns = sorted({k for r in rows for k in layer_scalars(r)})
    per_layer = wandb.Table(columns=["layer", "probe", *columns])
    for row in rows:
        per_layer.add_data(row["layer"], row.get("probe"), *[row.get(c) for c in columns])
    tables: dict[str, Any] = {"tables/per_layer": per_layer}
    training = [[probe, p["iteration"], p["objective"]] for probe, h in curves.items() for p in h]
    if training:
        tables["tables/training"] = wandb.Table(
            columns=["probe", "iteration", "objective"], data=training
        )
    if stats:
        extra = sorted({k for s in stats for k in s} - {"name", *STAT_FIELDS})
        stat_columns = ["name", *STAT_FIELDS, *extra]
        tables["tables/statistics"] = wandb.Table(
            columns=stat_columns, data=[[s.get(c) for c in stat_columns] for s in stats]
        )
    return tables


def _summary(
    metrics: dict[str, Any], rows: list[dict[str, Any]], stats: list[dict[str, Any]]
) -> dict[str, Any]:
    """Per-layer scores by name (``top1/layer_2``), the headline numbers, every statistic
    (``statistics/<name>/<field>``) and the numeric counts and timings."""
    summary: dict[str, Any] = {}
    for row in rows:
        for key, value in layer_scalars(row).items():
            summary[f"{key}/layer_{row['layer']}"] = value
    top1 = [(r["layer"], r["top1"]) for r in rows if _is_number(r.get("top1"))]
    if top1:
        summary["top1_mean"] = float(np.mean([t for _, t in top1]))
        summary["top1_first"], summary["top1_last"] = top1[0][1], top1[-1][1]
        summary["best_layer"] = max(top1, key=lambda lt: lt[1])[0]
    for stat in stats:
        for key in STAT_FIELDS:
            if _is_number(stat.get(key)):
                summary[f"statistics/{stat['name']}/{key}"] = stat[key]
    for section in ("counts", "timing_s"):
        for key, value in (metrics.get(section) or {}).items():
            if _is_number(value):
                summary[f"{section}/{key}"] = value
    return summary


def _probe_artifact(
    wandb: Any,
    out_dir: Path,
    metrics: dict[str, Any],
    rows: list[dict[str, Any]],
    identity: dict[str, Any],
) -> Any:
    """The weights as a versioned ``probes`` artifact: same config, same name; new contents, a
    new version. It holds probes.safetensors and metrics.json, and their shapes as metadata."""
    tensors_path = out_dir / "probes.safetensors"
    with safe_open(str(tensors_path), "pt") as f:
        shapes = {k: list(f.get_slice(k).get_shape()) for k in f.keys()}
        file_meta = dict(f.metadata() or {})
    artifact = wandb.Artifact(
        identity["artifact"],
        type="probes",
        description=f"Linear probe weights of {identity['name']}",
        metadata={
            "model": metrics.get("model", {}),
            "probe": metrics.get("probe", {}),
            "counts": metrics.get("counts", {}),
            "tensors": shapes,
            "safetensors_metadata": file_meta,
            "top1_by_layer": {str(r["layer"]): r.get("top1") for r in rows},
            "config_hash": identity["config_hash"],
            "group": identity["group"],
            "job_dir": str(out_dir),
        },
    )
    artifact.add_file(str(tensors_path), name="probes.safetensors")
    artifact.add_file(str(out_dir / "metrics.json"), name="metrics.json")
    return artifact
