"""The figures of a job: held-out accuracy against depth, accuracy against k, and the probe
weights in the job's basis. Every figure is drawn with matplotlib's Agg backend (no display) and
written with ``save_figure``, atomically. Other modules that draw (the sweep report, the Optuna
summary) take ``plt`` and ``save_figure`` from here, so the backend is chosen in one place.
"""

from __future__ import annotations

import io
import re
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from safetensors import safe_open  # noqa: E402

from probe_sweep.files import write_bytes  # noqa: E402
from probe_sweep.results import LayerResult, shown_fields  # noqa: E402

__all__ = [
    "plot_accuracy_by_layer",
    "plot_accuracy_vs_k",
    "plot_probe_weights",
    "plt",
    "read_probe_weights",
    "save_figure",
]


def save_figure(fig: Any, path: Path, dpi: int = 110) -> None:
    """Write ``fig`` as a PNG at ``path`` atomically (a reader never sees half an image) and
    close it."""
    image = io.BytesIO()
    fig.savefig(image, dpi=dpi, format="png")
    plt.close(fig)
    write_bytes(path, image.getvalue())


def _error_bars(values: list[float | None], cis: list[Any]) -> list[list[float]]:
    """Distances from each value to its 95% interval's ends (0 where there is none)."""
    lower, upper = [], []
    for value, ci in zip(values, cis, strict=True):
        ok = value is not None and isinstance(ci, list) and None not in ci
        lower.append(value - ci[0] if ok else 0.0)
        upper.append(ci[1] - value if ok else 0.0)
    return [lower, upper]


def plot_accuracy_by_layer(results: list[LayerResult], path: Path, title: str) -> None:
    """Held-out accuracies against depth, 95% intervals (held-out sequences) as error bars,
    with the random-init model's and the control task's top-1 where they were measured."""
    rows = [result.row() for result in results]
    layers = [r["layer"] for r in rows]
    fig, ax = plt.subplots(figsize=(7, 4.2))
    markers = ["-o", "--s", ":^", ":v", "-.+", "-.x", "-d", "--p"]
    labels = shown_fields("accuracy")
    styles = {
        key: (label, markers[i % len(markers)]) for i, (key, label) in enumerate(labels.items())
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


MAX_PANELS_PER_ROW = 4


def plot_accuracy_vs_k(points: dict[str, list[dict[str, Any]]], path: Path, title: str) -> None:
    """Top-1 against k, one panel per layer: top-k and bottom-k with 95% intervals, and the
    random-k control as a band over its seeds (min to max) around their mean. ``points``: a
    label (a job; "" for one) -> the ``accuracy_vs_k`` records."""
    layers = sorted({p["layer"] for pts in points.values() for p in pts})
    n_rows = -(-len(layers) // MAX_PANELS_PER_ROW)
    n_cols = -(-len(layers) // n_rows)
    fig, grid = plt.subplots(n_rows, n_cols, figsize=(4.2 * n_cols, 3.6 * n_rows), squeeze=False)
    axes = list(grid.flat)
    for ax in axes[len(layers) :]:
        ax.set_visible(False)
    single = len(points) == 1
    for ax, layer in zip(axes, layers, strict=False):
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
    for row in grid:
        row[0].set_ylabel("held-out top-1")
    axes[len(layers) - 1].legend(fontsize=7, loc="lower right")
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    save_figure(fig, path, dpi=110)


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
