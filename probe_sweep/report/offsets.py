"""Which token, by depth: held-out top-1 by layer and target offset, for the jobs of a sweep that
differ in ``target.offset`` (``python -m probe_sweep -m target.offset=-2,-1,0,1``). Jobs that
differ in anything else as well form one map per combination of the other settings."""

from __future__ import annotations

import textwrap
from pathlib import Path
from typing import Any

import numpy as np

from probe_sweep.report.plots import plt, save_figure
from probe_sweep.report.tables import interval_cell, markdown_table

OFFSET_KEY = "target.offset="
Grid = dict[int, dict[int, dict[str, Any]]]  # offset -> layer -> that layer's scores


def offset_grids(jobs: list[tuple[list[str], dict[str, Any]]]) -> dict[str, Grid]:
    """(overrides, metrics) of finished jobs -> per group of the other settings, the scores by
    offset and layer; only groups with at least two offsets."""
    groups: dict[str, Grid] = {}
    for overrides, metrics in jobs:
        rest = " ".join(sorted(o for o in overrides if not o.startswith(OFFSET_KEY)))
        offset = int(metrics.get("probe", {}).get("target_offset", 0))
        by_layer = {int(row["layer"]): row for row in metrics.get("layers", [])}
        groups.setdefault(rest, {})[offset] = by_layer
    return {rest: grid for rest, grid in groups.items() if len(grid) > 1}


def offset_table(grid: Grid) -> list[str]:
    """Markdown: one row per layer, one column per offset, top-1 with its 95% interval."""
    return _layer_by_offset(grid, "top1", "layer", _layers(grid))


def offset_change_table(grid: Grid) -> list[str]:
    """Markdown: per layer after the first and per offset, top-1 minus the first probed layer's
    with its paired interval (the same held-out tokens); empty when the jobs did not compute
    it (``statistics.layer_differences``)."""
    field = "top1_minus_first_layer"
    if all(row.get(field) is None for by_layer in grid.values() for row in by_layer.values()):
        return []
    first, *later = _layers(grid)
    return _layer_by_offset(grid, field, f"layer minus layer {first}", later)


def _layers(grid: Grid) -> list[int]:
    return sorted({layer for by_layer in grid.values() for layer in by_layer})


def _layer_by_offset(grid: Grid, field: str, corner: str, layers: list[int]) -> list[str]:
    """One row per layer, one column per offset: ``field`` with its interval (``field_ci``)."""
    offsets = sorted(grid)
    rows = [
        [layer, *[interval_cell(*_cell(grid[o].get(layer), field)) for o in offsets]]
        for layer in layers
    ]
    return markdown_table([corner, *[f"offset {o:+d}" for o in offsets]], rows)


def _cell(row: dict[str, Any] | None, field: str) -> tuple[Any, Any]:
    return (row.get(field), row.get(f"{field}_ci")) if row else (None, None)


def plot_offset_map(grid: Grid, path: Path, title: str) -> None:
    """Heat map of top-1 (layers down, offsets across), each cell annotated with its value."""
    offsets, layers = sorted(grid), _layers(grid)
    values = np.array(
        [[(grid[o].get(layer) or {}).get("top1", np.nan) for o in offsets] for layer in layers],
        dtype=float,
    )
    fig, ax = plt.subplots(figsize=(max(6.0, 2.0 + 1.1 * len(offsets)), 2.0 + 0.45 * len(layers)))
    image = ax.imshow(values, vmin=0.0, vmax=1.0, cmap="viridis", aspect="auto")
    for i, layer in enumerate(layers):
        for j, offset in enumerate(offsets):
            row = grid[offset].get(layer)
            if row and row.get("top1") is not None:
                half = (row["top1_ci"][1] - row["top1_ci"][0]) / 2 if row.get("top1_ci") else None
                text = f"{row['top1']:.2f}" + (f"\n±{half:.2f}" if half is not None else "")
                shade = "black" if row["top1"] > 0.6 else "white"
                ax.text(j, i, text, ha="center", va="center", fontsize=7, color=shade)
    ax.set_xticks(range(len(offsets)), [f"{o:+d}" for o in offsets])
    ax.set_yticks(range(len(layers)), [str(layer) for layer in layers])
    ax.set_xlabel("target offset (token read out, relative to the position)")
    ax.set_ylabel("layer")
    ax.set_title(textwrap.fill(title, 70), fontsize=9)
    fig.colorbar(image, ax=ax, label="held-out top-1")
    fig.tight_layout()
    save_figure(fig, path)


def offset_sections(jobs: list[tuple[list[str], dict[str, Any]]], sweep_dir: Path) -> list[str]:
    """The report's section: a table and a heat map per group of jobs that differ in offset."""
    grids = offset_grids(jobs)
    if not grids:
        return []
    lines = ["", "## Which token, by layer: top-1 by target offset", ""]
    for i, (rest, grid) in enumerate(sorted(grids.items())):
        name = f"report_offset_map_{i}.png"
        title = f"top-1 by layer and target offset{': ' + rest if rest else ''}"
        plot_offset_map(grid, sweep_dir / name, title)
        lines += [f"Jobs with {rest or 'the same settings'}:", "", f"![{title}]({name})", ""]
        lines += [*offset_table(grid), ""]
        change = offset_change_table(grid)
        if change:
            lines += ["Each layer minus the first, paired (the same held-out tokens):", ""]
            lines += [*change, ""]
    return lines
