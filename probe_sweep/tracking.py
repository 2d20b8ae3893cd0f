"""Stage 7: a job's results, written to its output directory, then tracked in Weights & Biases.

Files (``metrics.json`` last, so its presence means the job finished):
- ``probes.safetensors``: probe tensors, ``<name>.weight`` / ``.bias`` / ``.mean`` / ``.scale``
  (and ``.map_weight`` for ridge), plus ``classes`` (the token id of each weight row).
- ``accuracy_by_layer.png``: held-out accuracy against depth.
- ``metrics.json``: the schema documented in the README.

After ``metrics.json``, ``track_job`` draws the probe weights (``probe_weights.png``,
``probe_weight_mass.png``) and logs the job, read back from those files, as one W&B run; it
writes ``wandb_run.json`` (where the run went) and never raises: a tracking failure is one log
line, and the results on disk are untouched. ``wandb`` is imported here only, and lazily.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import re
from dataclasses import dataclass, field
from enum import Enum
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
from safetensors import safe_open  # noqa: E402
from safetensors.torch import save_file  # noqa: E402

SCHEMA_VERSION = 1
log = logging.getLogger("probe_sweep.tracking")


def temp_path(path: Path) -> Path:
    """Where to write ``path`` before an atomic rename onto it (same dir, per process)."""
    return path.with_name(f".{path.name}.tmp-{os.getpid()}")


def write_json(path: Path, payload: dict[str, Any]) -> None:
    tmp = temp_path(path)
    tmp.write_text(json.dumps(payload, indent=2, allow_nan=False))
    os.replace(tmp, path)


def write_tensors(path: Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> None:
    tmp = temp_path(path)
    save_file({k: v.detach().cpu().contiguous() for k, v in tensors.items()}, tmp, metadata)
    os.replace(tmp, path)


def save_figure(fig: Any, path: Path, dpi: int = 110) -> None:
    """Write ``fig`` as a PNG at ``path`` atomically (a reader never sees half an image) and
    close it."""
    tmp = temp_path(path)
    fig.savefig(tmp, dpi=dpi, format="png")
    plt.close(fig)
    os.replace(tmp, path)


def _error_bars(values: list[float | None], cis: list[Any]) -> list[list[float]]:
    """Distances from each value to its 95% interval's ends (0 where there is none)."""
    lower, upper = [], []
    for value, ci in zip(values, cis, strict=True):
        ok = value is not None and isinstance(ci, list) and None not in ci
        lower.append(value - ci[0] if ok else 0.0)
        upper.append(ci[1] - value if ok else 0.0)
    return [lower, upper]


def plot_accuracy_by_layer(rows: list[dict[str, Any]], path: Path, title: str) -> None:
    """Held-out accuracies against depth, 95% intervals (held-out sequences) as error bars,
    with the random-init model's top-1 where it was measured."""
    layers = [r["layer"] for r in rows]
    fig, ax = plt.subplots(figsize=(7, 4.2))
    styles = {
        "top1": ("top-1", "-o"),
        "top5": ("top-5", "--s"),
        "top1_frequent": ("top-1, frequent types", ":^"),
        "top1_rare": ("top-1, rare types", ":v"),
        "random_init_top1": ("top-1, random-init model (baseline)", "-.x"),
        "control_top1": ("control task top-1 (baseline)", "-.+"),
    }
    shown = [k for k in styles if any(r.get(k) is not None for r in rows)]
    for key in shown:
        label, style = styles[key]
        values = [r.get(key) for r in rows]
        bars = _error_bars(values, [r.get(f"{key}_ci") for r in rows])
        ax.errorbar(layers, values, yerr=bars, fmt=style, label=label, ms=4, capsize=2)
    ax.set_xlabel("layer (0 = embedding output)")
    ax.set_ylabel("held-out accuracy (95% intervals)")
    ax.set_xticks(layers)
    lowest = min(r[k] for r in rows for k in shown if r.get(k) is not None)
    ax.set_ylim(max(0.0, lowest - 0.05), 1.01)
    ax.grid(alpha=0.3)
    ax.legend(loc="lower left", fontsize=8)
    ax.set_title(title, fontsize=10)
    fig.tight_layout()
    save_figure(fig, path, dpi=120)


def plot_accuracy_vs_k(points: dict[str, list[dict[str, Any]]], path: Path, title: str) -> None:
    """Top-1 against k, one panel per layer: top-k and bottom-k with 95% intervals, and the
    random-k control as a band over its seeds (min to max) around their mean. ``points``: a
    label (a job; "" for one) -> the ``accuracy_vs_k`` records."""
    layers = sorted({p["layer"] for pts in points.values() for p in pts})
    fig, axes = plt.subplots(1, len(layers), figsize=(4.2 * len(layers), 3.8), squeeze=False)
    single = len(points) == 1
    for ax, layer in zip(axes[0], layers, strict=True):
        for i, (label, pts) in enumerate(points.items()):
            job_color = plt.get_cmap("tab10")(i % 10)
            here = [p for p in pts if p["layer"] == layer]
            for kind, style, kind_color in (("top", "-o", "C0"), ("bottom", "--s", "C3")):
                color = kind_color if single else job_color
                line = sorted((p for p in here if p["kind"] == kind), key=lambda p: p["k"])
                values = [p["top1"] for p in line]
                bars = _error_bars(values, [p["top1_ci"] for p in line])
                name = f"{label} {kind}-k".strip()
                ax.errorbar([p["k"] for p in line], values, yerr=bars, fmt=style, color=color,
                            ms=4, capsize=3, label=name)  # fmt: skip
            ks = sorted({p["k"] for p in here if p["kind"] == "random"})
            draws = [[p["top1"] for p in here if p["kind"] == "random" and p["k"] == k] for k in ks]
            if ks:
                color = "gray" if single else job_color
                band = f"{label} random-k (mean, range over seeds)".strip()
                means = [sum(d) / len(d) for d in draws]
                low, high = [min(d) for d in draws], [max(d) for d in draws]
                spread = [[m - lo for m, lo in zip(means, low, strict=True)],
                          [hi - m for m, hi in zip(means, high, strict=True)]]  # fmt: skip
                ax.fill_between(ks, low, high, color=color, alpha=0.2)
                ax.errorbar(ks, means, yerr=spread, fmt=":D", color=color, ms=4, capsize=6,
                            label=band)  # fmt: skip
        ax.set_xscale("log", base=2)
        ax.set_xlabel("k directions")
        ax.set_title(f"layer {layer}", fontsize=9)
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel("held-out top-1")
    axes[0][-1].legend(fontsize=7, loc="lower right")
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    save_figure(fig, path, dpi=110)


def format_table(rows: list[dict[str, Any]]) -> str:
    """A fixed-width table of the per-layer scores, for the console and the job log."""
    columns = ["layer", "top1", "top5", "nll", "top1_frequent", "top1_rare"]
    columns += [c for c in ("iterations", "converged") if any(c in r for r in rows)]
    lines = ["  ".join(f"{c:>13}" for c in columns)]
    for row in rows:
        cells = []
        for c in columns:
            value = row.get(c)
            if isinstance(value, float):
                cells.append(f"{value:>13.4f}")
            else:
                cells.append(f"{value!s:>13}")
        lines.append("  ".join(cells))
    return "\n".join(lines)


# --- Weights & Biases -------------------------------------------------------------------------


class TrackerMode(Enum):
    auto = "auto"
    online = "online"
    offline = "offline"
    disabled = "disabled"


@dataclass
class TrackerConfig:
    """One W&B run per job. ``mode=auto``: online when an API key is configured (WANDB_API_KEY,
    ``wandb login``'s netrc entry) and WANDB_MODE does not say otherwise, else offline.
    ``group``/``job_type``/``name``: null = derived from the sweep dir and the chosen options.
    ``dir``: where wandb writes its run dirs (null = WANDB_DIR, else the working directory).
    ``init_timeout``: seconds before a run that cannot start is given up (and, under auto,
    replaced by an offline run)."""

    mode: TrackerMode = TrackerMode.auto
    project: str = "probe_sweep"
    entity: str | None = None
    tags: list[str] = field(default_factory=list)
    group: str | None = None
    job_type: str | None = None
    name: str | None = None
    dir: str | None = None
    init_timeout: float = 30.0
    log_artifacts: bool = True


@dataclass
class JobInfo:
    """What the tracker needs to know about the Hydra job, as plain values."""

    out_dir: Path
    choices: dict[str, str] = field(default_factory=dict)
    overrides: list[str] = field(default_factory=list)
    sweep_dir: Path | None = None
    num: int | None = None

    @classmethod
    def from_hydra(cls, hydra_cfg: Any) -> JobInfo:
        """From ``HydraConfig.get()``: in a multirun the job dir's parent is the sweep dir."""
        out_dir = Path(hydra_cfg.runtime.output_dir)
        multirun = str(getattr(hydra_cfg.mode, "name", hydra_cfg.mode)) == "MULTIRUN"
        num = hydra_cfg.job.get("num") if multirun else None
        return cls(
            out_dir=out_dir,
            choices={str(k): str(v) for k, v in hydra_cfg.runtime.choices.items() if v},
            overrides=[str(o) for o in hydra_cfg.overrides.task],
            sweep_dir=out_dir.parent if multirun else None,
            num=int(num) if num is not None else None,
        )


STAT_FIELDS = ("observed", "null_mean", "p", "p_floor")
GROUP_TAGS = ("model", "probe", "layers", "basis", "reg", "data")


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def null_statistics(metrics: dict[str, Any]) -> list[dict[str, Any]]:
    """Every null statistic in ``metrics`` (the ``statistics`` section, and any per-layer one).

    A statistic is any dict holding ``observed`` and ``p``, wherever it sits; its name is
    its path of keys (list items are named by their ``name``/``statistic``/``layer`` field).
    Rows keep the statistic's other scalar fields (``layer``, ``n_permutations``, ...).
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
            if "observed" in node and "p" in node:
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


def _probe_order(name: str) -> tuple[int, str]:
    number = re.search(r"(\d+)$", name)
    return (int(number.group(1)) if number else -1, name)


def read_probe_weights(path: Path) -> tuple[dict[str, np.ndarray], dict[str, str]]:
    """``{probe name: weight (classes x components)}`` and the file's metadata."""
    with safe_open(str(path), "pt") as f:
        metadata = dict(f.metadata() or {})
        names = sorted(
            (k[: -len(".weight")] for k in f.keys() if k.endswith(".weight")), key=_probe_order
        )
        weights = {n: f.get_tensor(f"{n}.weight").float().numpy() for n in names}
    return weights, metadata


def plot_probe_weights(tensors_path: Path, out_dir: Path, max_panels: int = 8) -> list[Path]:
    """Two images of the probes in the job's basis, written into ``out_dir``:
    ``probe_weight_mass.png`` (each probe's squared weight per basis component, relative to an
    even spread: blue = a direction the probe uses little) and ``probe_weights.png`` (weight
    heatmaps of up to ``max_panels`` probes, the 48 classes with the largest weights)."""
    from matplotlib.colors import LogNorm

    weights, metadata = read_probe_weights(tensors_path)
    if not weights:
        return []
    basis = metadata.get("basis", "?")
    names = list(weights)
    mass = np.stack([(w**2).sum(0) / max(float((w**2).sum()), 1e-30) for w in weights.values()])
    ratio = mass * mass.shape[1]  # 1 = the share every component would get if all were equal
    fig, ax = plt.subplots(figsize=(9, 1.6 + 0.32 * len(names)), layout="constrained")
    image = ax.imshow(
        np.clip(ratio, 0.1, 10),
        aspect="auto",
        interpolation="nearest",
        cmap="RdBu_r",
        norm=LogNorm(vmin=0.1, vmax=10),
    )
    ax.set_yticks(range(len(names)), names, fontsize=7)
    ax.set_xlabel(f"{basis} basis component")
    ax.set_title(f"squared probe weight by component ({basis} basis), 1 = even spread", fontsize=9)
    fig.colorbar(image, ax=ax, extend="both", label="share x number of components")
    mass_path = out_dir / "probe_weight_mass.png"
    save_figure(fig, mass_path)

    index = np.unique(np.linspace(0, len(names) - 1, min(max_panels, len(names))).round())
    picks = [names[int(i)] for i in index]
    limit = max(float(np.quantile(np.abs(weights[n]), 0.99)) for n in picks) or 1.0
    fig, axes = plt.subplots(
        1, len(picks), figsize=(2.4 * len(picks) + 1.2, 3.6), squeeze=False, layout="constrained"
    )
    for ax, name in zip(axes[0], picks, strict=True):
        w = weights[name]
        top = np.sort(np.argsort(-np.linalg.norm(w, axis=1))[:48])
        image = ax.imshow(w[top], aspect="auto", cmap="RdBu_r", vmin=-limit, vmax=limit)
        ax.set_title(f"{name} ({w.shape[0]}x{w.shape[1]})", fontsize=8)
        ax.set_xlabel("component", fontsize=7)
        ax.tick_params(labelsize=6)
    axes[0][0].set_ylabel("class (48 largest rows)", fontsize=7)
    fig.colorbar(image, ax=axes[0].tolist(), shrink=0.8, extend="both")
    fig.suptitle(f"probe weights in the {basis} basis (shared colour scale)", fontsize=9)
    weights_path = out_dir / "probe_weights.png"
    save_figure(fig, weights_path)
    return [mass_path, weights_path]


def api_key_configured() -> bool:
    """Whether wandb would find credentials (env var or netrc) without asking or any network."""
    if os.environ.get("WANDB_API_KEY") or os.environ.get("WANDB_IDENTITY_TOKEN_FILE"):
        return True
    try:
        from wandb.sdk.lib.wbauth import wbnetrc

        host = os.environ.get("WANDB_BASE_URL") or "https://api.wandb.ai"
        return bool(wbnetrc.read_netrc_auth(host=host))
    except Exception:  # an unreadable netrc or a moved private helper: no key
        return False


def resolve_mode(cfg: TrackerConfig) -> str:
    """``online``, ``offline`` or ``disabled``; ``auto`` defers to WANDB_MODE, then to the key."""
    if cfg.mode is not TrackerMode.auto:
        return cfg.mode.value
    env = os.environ.get("WANDB_MODE", "").strip().lower()
    if env in ("offline", "dryrun"):
        return "offline"
    if env == "disabled":
        return "disabled"
    if env in ("online", "run"):
        return "online"
    return "online" if api_key_configured() else "offline"


def _slug(text: str, limit: int = 96) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "-", text).strip("-.")[:limit] or "job"


def config_hash(resolved: dict[str, Any]) -> str:
    """Eight hex digits of the config, less what does not change the numbers."""
    from probe_sweep.jobs import keyed_content  # jobs imports this module

    text = json.dumps(keyed_content(resolved), sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:8]


def run_identity(
    cfg: TrackerConfig, job: JobInfo, metrics: dict[str, Any], resolved: dict[str, Any]
) -> dict[str, Any]:
    """group (the sweep), job_type, tags (chosen options), a readable name, the artifact name."""
    probe = metrics.get("probe", {})
    model = metrics.get("model", {}).get("name", "model")
    group = cfg.group
    if group is None and job.sweep_dir is not None:
        sweep = job.sweep_dir.resolve()
        try:
            group = sweep.relative_to(Path.cwd().resolve()).as_posix()
        except ValueError:
            group = "/".join(sweep.parts[-3:])
    chosen = dict(job.choices)
    for key, value in (("probe", probe.get("kind")), ("layers", probe.get("layers"))):
        chosen.setdefault(key, value)
    chosen.setdefault("basis", probe.get("basis"))
    tags = [f"{g}:{chosen[g]}" for g in GROUP_TAGS if chosen.get(g)]
    tags += [t for t in cfg.tags if t not in tags]
    name = cfg.name or (
        f"{probe.get('basis')} · {probe.get('kind')}/{probe.get('layers')} · "
        f"{probe.get('reg')}={probe.get('strength', 0):g} · {model}"
    )
    if cfg.name is None and job.num is not None:
        name = f"#{job.num} {name}"
    digest = config_hash(resolved)
    artifact = _slug(
        f"probes-{model}-{probe.get('kind')}-{probe.get('layers')}-{probe.get('basis')}-{digest}"
    )
    return {
        "group": group,
        "job_type": cfg.job_type or f"{probe.get('kind')}-{probe.get('layers')}",
        "tags": [t[:64] for t in tags],
        "name": name,
        "artifact": artifact,
        "config_hash": digest,
    }


def track_job(
    cfg: TrackerConfig,
    job: JobInfo,
    resolved: dict[str, Any],
    metrics: dict[str, Any] | None = None,
) -> dict[str, Any] | None:
    """Log a finished job (read from its files) as one W&B run; never raises.

    ``metrics``: logged instead of metrics.json (a pruned trial's record; tagged pruned).
    Returns what ``wandb_run.json`` records (run id, mode, where it lives), or None when the
    tracker is disabled, the job left no ``metrics.json``, or W&B failed (one warning line).
    """
    metrics_path = job.out_dir / "metrics.json"
    tensors_path = job.out_dir / "probes.safetensors"
    if metrics is None and not metrics_path.is_file():
        return None
    if tensors_path.is_file():
        try:
            plot_probe_weights(tensors_path, job.out_dir)
        except Exception as exc:  # derived images: never worth failing a finished job
            log.warning("Could not draw the probe weights: %s", _one_line(exc))
    mode = resolve_mode(cfg)
    if mode == "disabled":
        return None
    try:
        if metrics is None:
            metrics = json.loads(metrics_path.read_text())
        identity = run_identity(cfg, job, metrics, resolved)
        if "pruned" in metrics:
            identity["tags"].append("pruned")
        try:
            info = _log_run(cfg, job, metrics, resolved, identity, mode)
        except Exception as exc:
            if cfg.mode is not TrackerMode.auto or mode != "online":
                raise
            log.warning("W&B online run failed (%s); logging offline instead", _one_line(exc))
            mode = "offline"
            info = _log_run(cfg, job, metrics, resolved, identity, mode)
        write_json(job.out_dir / "wandb_run.json", info)
    except Exception as exc:
        log.warning(
            "W&B tracking (%s) failed, results are complete in %s: %s",
            mode,
            job.out_dir,
            _one_line(exc),
        )
        return None
    if info["mode"] == "offline":
        log.info("W&B offline run %s; upload it with: wandb sync %s", info["id"], info["run_dir"])
    else:
        log.info("W&B run %s: %s", info["id"], info.get("url"))
    return info


def track_study(cfg: TrackerConfig, summary: dict[str, Any], images: list[Path]) -> None:
    """Log an Optuna study's outcome (best value and parameters, its plots) as one W&B run in
    the study's group, beside its trials; never raises."""
    mode = resolve_mode(cfg)
    if mode == "disabled":
        return
    try:
        import wandb

        run = wandb.init(
            project=cfg.project,
            entity=cfg.entity,
            id=summary.get("wandb_run_id"),
            resume="allow" if summary.get("wandb_run_id") else None,
            group=summary["study"],
            job_type="study",
            name=f"study {summary['study']}",
            config=summary,
            dir=cfg.dir or os.environ.get("WANDB_DIR") or None,
            mode=mode,  # type: ignore[arg-type]
            reinit="finish_previous",
            settings=wandb.Settings(init_timeout=cfg.init_timeout, quiet=True, console="off"),
        )
        try:
            run.summary["best_value"] = summary["best_value"]
            for key, value in summary["best_params"].items():
                run.summary[f"best/{key}"] = value
            run.log({f"images/{p.stem}": wandb.Image(str(p)) for p in images if p.is_file()})
        finally:
            run.finish()
    except Exception as exc:
        log.warning("W&B study logging (%s) failed: %s", mode, _one_line(exc))


def _one_line(exc: BaseException) -> str:
    text = " ".join(str(exc).split())
    return f"{type(exc).__name__}: {text[:300]}"


def _log_run(
    cfg: TrackerConfig,
    job: JobInfo,
    metrics: dict[str, Any],
    resolved: dict[str, Any],
    identity: dict[str, Any],
    mode: str,
) -> dict[str, Any]:
    import wandb

    wandb_dir = cfg.dir or os.environ.get("WANDB_DIR") or None
    if wandb_dir is not None:
        Path(wandb_dir).mkdir(parents=True, exist_ok=True)
    run = wandb.init(
        project=cfg.project,
        entity=cfg.entity,
        group=identity["group"],
        job_type=identity["job_type"],
        tags=identity["tags"],
        name=identity["name"],
        config={**resolved, "job": _job_config(job, metrics, identity)},
        dir=wandb_dir,
        mode=mode,  # type: ignore[arg-type]
        reinit="finish_previous",
        settings=wandb.Settings(init_timeout=cfg.init_timeout, quiet=True, console="off"),
    )
    ok = False
    try:
        _log_contents(wandb, run, job, metrics, identity, cfg.log_artifacts)
        ok = True
        info = {
            "id": run.id,
            "name": identity["name"],
            "group": identity["group"],
            "project": cfg.project,
            "entity": run.entity if mode == "online" else cfg.entity,
            "mode": mode,
            "url": run.url if mode == "online" else None,
            "run_dir": str(Path(run.dir).parent),
            "artifact": identity["artifact"] if cfg.log_artifacts else None,
        }
    finally:
        run.finish(exit_code=0 if ok else 1)
    return info


def _job_config(job: JobInfo, metrics: dict[str, Any], identity: dict[str, Any]) -> dict[str, Any]:
    return {
        "out_dir": str(job.out_dir),
        "sweep_dir": str(job.sweep_dir) if job.sweep_dir else None,
        "num": job.num,
        "choices": job.choices,
        "overrides": job.overrides,
        "config_hash": identity["config_hash"],
        "model_info": metrics.get("model", {}),
        "probe_info": metrics.get("probe", {}),
    }


def _log_contents(
    wandb: Any,
    run: Any,
    job: JobInfo,
    metrics: dict[str, Any],
    identity: dict[str, Any],
    log_artifacts: bool,
) -> None:
    rows = [r for r in metrics.get("layers", []) if isinstance(r, dict)]
    stats = null_statistics(metrics)
    # Curves against depth: every numeric per-layer score, and the z and p of every null
    # statistic that names its layer (by_layer/null/<name without the layer>/z), x-axis = layer.
    run.define_metric("layer")
    run.define_metric("by_layer/*", step_metric="layer")
    for row in rows:
        point = {f"by_layer/{k}": v for k, v in layer_scalars(row).items()}
        for stat in stats:
            if stat.get("layer") == row["layer"]:
                base = "/".join(p for p in stat["name"].split("/") if p != f"layer_{row['layer']}")
                for key in ("p", "observed"):
                    if _is_number(stat.get(key)):
                        point[f"by_layer/null/{base or 'statistic'}/{key}"] = stat[key]
        run.log({"layer": row["layer"], **point})
    # Fit curves: the objective at every solver evaluation, one line per fitted probe.
    run.define_metric("evaluation")
    run.define_metric("fit/*", step_metric="evaluation")
    curves = {name: fit.get("history") or [] for name, fit in metrics.get("fits", {}).items()}
    train_rows = []
    for probe, history in curves.items():
        for point in history:
            step, value = point["evaluation"], point["objective"]
            run.log({"evaluation": step, f"fit/{probe}/objective": value})
            train_rows.append([probe, point["evaluation"], point["objective"]])
    if any(curves.values()):
        chart = wandb.plot.line_series(
            xs=[[x["evaluation"] for x in h] for h in curves.values()],
            ys=[[x["objective"] for x in h] for h in curves.values()],
            keys=list(curves),
            title="training objective by solver evaluation, one line per probe",
            xname="evaluation",
        )
        run.log({"charts/objective_by_evaluation": chart})
    # Tables: per layer, training history, null statistics.
    columns = sorted({k for r in rows for k in layer_scalars(r)})
    layer_table = wandb.Table(columns=["layer", "probe", *columns])
    for row in rows:
        layer_table.add_data(row["layer"], row.get("probe"), *[row.get(c) for c in columns])
    tables: dict[str, Any] = {"tables/per_layer": layer_table}
    if train_rows:
        tables["tables/training"] = wandb.Table(
            columns=["probe", "evaluation", "objective"], data=train_rows
        )
    if stats:
        extra = sorted({k for s in stats for k in s} - {"name", *STAT_FIELDS})
        stat_columns = ["name", *STAT_FIELDS, *extra]
        tables["tables/null_statistics"] = wandb.Table(
            columns=stat_columns, data=[[s.get(c) for c in stat_columns] for s in stats]
        )
    run.log(tables)
    # Images: the weight heatmaps and every other PNG the job wrote.
    images = {
        f"images/{p.stem}": wandb.Image(str(p), caption=p.name)
        for p in sorted(job.out_dir.glob("*.png"))
    }
    if images:
        run.log(images)
    # Summary: per-layer scores by name, the headline numbers, every null statistic.
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
                summary[f"null/{stat['name']}/{key}"] = stat[key]
    for section in ("counts", "timing_s"):
        for key, value in (metrics.get(section) or {}).items():
            if _is_number(value):
                summary[f"{section}/{key}"] = value
    run.summary.update(summary)
    # The weights: a versioned artifact (same config, same name; a new digest, a new version).
    tensors_path = job.out_dir / "probes.safetensors"
    if log_artifacts and tensors_path.is_file():
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
                "job_dir": str(job.out_dir),
            },
        )
        artifact.add_file(str(tensors_path), name="probes.safetensors")
        artifact.add_file(str(job.out_dir / "metrics.json"), name="metrics.json")
        run.log_artifact(artifact)
