"""Stage 7: a job's results, written to its output directory.

Files (``metrics.json`` last, so its presence means the job finished):
- ``probes.safetensors``: probe tensors, ``<name>.weight`` / ``.bias`` / ``.mean`` / ``.scale``
  (and ``.map_weight`` for ridge), plus ``classes`` (the token id of each weight row).
- ``accuracy_by_layer.png``: held-out accuracy against depth.
- ``metrics.json``: the schema documented in the README.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402
from safetensors.torch import save_file  # noqa: E402

SCHEMA_VERSION = 1


def _atomic(path: Path) -> Path:
    return path.with_name(f".{path.name}.tmp-{os.getpid()}")


def write_json(path: Path, payload: dict[str, Any]) -> None:
    tmp = _atomic(path)
    tmp.write_text(json.dumps(payload, indent=2, allow_nan=False))
    os.replace(tmp, path)


def write_tensors(path: Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> None:
    tmp = _atomic(path)
    save_file({k: v.detach().cpu().contiguous() for k, v in tensors.items()}, tmp, metadata)
    os.replace(tmp, path)


def plot_accuracy_by_layer(rows: list[dict[str, Any]], path: Path, title: str) -> None:
    layers = [r["layer"] for r in rows]
    fig, ax = plt.subplots(figsize=(7, 4.2))
    styles = {
        "top1": ("top-1", "-o"),
        "top5": ("top-5", "--s"),
        "top1_frequent": ("top-1, frequent types", ":^"),
        "top1_rare": ("top-1, rare types", ":v"),
    }
    for key, (label, style) in styles.items():
        ax.plot(layers, [r[key] for r in rows], style, label=label, markersize=4)
    ax.set_xlabel("layer (0 = embedding output)")
    ax.set_ylabel("held-out accuracy")
    ax.set_xticks(layers)
    lowest = min(r[k] for r in rows for k in styles if r[k] is not None)
    ax.set_ylim(max(0.0, lowest - 0.05), 1.01)
    ax.grid(alpha=0.3)
    ax.legend(loc="lower left", fontsize=8)
    ax.set_title(title, fontsize=10)
    fig.tight_layout()
    tmp = _atomic(path)
    fig.savefig(tmp, dpi=120, format="png")
    plt.close(fig)
    os.replace(tmp, path)


def format_table(rows: list[dict[str, Any]]) -> str:
    """A fixed-width table of the per-layer scores, for the console and the job log."""
    columns = ["layer", "top1", "top5", "nll", "top1_frequent", "top1_rare", "epochs"]
    lines = ["  ".join(f"{c:>13}" for c in columns)]
    for row in rows:
        cells = []
        for c in columns:
            value = row[c]
            if isinstance(value, float):
                cells.append(f"{value:>13.4f}")
            else:
                cells.append(f"{value!s:>13}")
        lines.append("  ".join(cells))
    return "\n".join(lines)
