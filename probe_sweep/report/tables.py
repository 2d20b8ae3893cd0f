"""Tables: fixed-width ones for the console and the job log (scores, null statistics, the
baselines by layer), and markdown for the sweep report."""

from __future__ import annotations

import dataclasses
from typing import Any

from probe_sweep.results import LayerResult, ProbeScores, fields_of
from probe_sweep.typed_json import part_type


def format_table(scores: list[ProbeScores], fits: dict[str, dict[str, Any]]) -> str:
    """A fixed-width table of the per-layer scores, with the solver's iterations and certified
    gap of the probe scored there (``fits``: convergence records by probe name)."""
    columns = ["layer", "top1", "top5", "nll", "top1_frequent", "top1_rare"]
    solver = [c for c in ("iterations", "gap_rel") if any(c in f for f in fits.values())]
    lines = ["  ".join(f"{c:>13}" for c in columns + solver)]
    for score in scores:
        row = {**dataclasses.asdict(score), **fits.get(score.probe, {})}
        cells = []
        for c in columns + solver:
            value = row.get(c)
            if c == "gap_rel" and isinstance(value, float):
                cells.append(f"{value:>13.1e}")
            elif isinstance(value, float):
                cells.append(f"{value:>13.4f}")
            else:
                cells.append(f"{value!s:>13}")
        lines.append("  ".join(cells))
    return "\n".join(lines)


def cell(value: Any, digits: int = 4) -> str:
    """A markdown table cell: a dash for nothing, floats to ``digits`` places (or scientific)."""
    if value is None:
        return "–"
    if isinstance(value, float):
        return f"{value:.{digits}f}" if abs(value) >= 10**-digits or value == 0 else f"{value:.2e}"
    return str(value).replace("|", "\\|").replace("\n", " ")


def interval_cell(value: Any, ci: Any) -> str:
    """``value [low, high]`` to 3 places (the value alone when the interval is missing)."""
    if value is None:
        return "–"
    if isinstance(ci, list | tuple) and len(ci) == 2 and None not in ci:
        return f"{value:.3f} [{ci[0]:.3f}, {ci[1]:.3f}]"
    return f"{value:.3f}"


def markdown_table(header: list[str], rows: list[list[Any]]) -> list[str]:
    """A markdown table's lines, each value through ``cell``."""
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(cell(c) for c in row) + " |" for row in rows]
    return lines


def _ci(ci: list[float | None] | None) -> str:
    return f"[{ci[0]:.3f}, {ci[1]:.3f}]" if ci and ci[0] is not None else ""


def format_entries(entries: list[dict[str, Any]]) -> str:
    """A fixed-width console table: value [95% CI], null mean [central 95%], p (its floor is
    1/(1+draws)), and the difference from each baseline [95% CI]."""
    head = f"{'statistic':>31} {'layer':>5} {'observed [95% CI]':>28} {'null [95%]':>28} {'p':>7}"
    lines = [head + "  baselines: difference [95% CI]"]
    for e in entries:
        layer = "all" if e["layer"] is None else str(e["layer"])
        observed = f"{e['observed']:.4f} {_ci(e.get('ci'))}"
        null = f"{e['null_mean']:.4f} {_ci(e['null_range'])}" if e.get("null_mean") else "-"
        p = e.get("p")
        p_text = "-" if p is None else (f"<={p:.4f}" if p <= e["p_floor"] else f"{p:.4f}")
        diffs = "  ".join(
            f"{name} {b['difference']:+.4f} {_ci(b['difference_ci'])}"
            for name, b in (e.get("baselines") or {}).items()
        )
        lines.append(f"{e['name']:>31} {layer:>5} {observed:>28} {null:>28} {p_text:>7}  {diffs}")
    return "\n".join(lines)


def format_layers(layers: list[LayerResult]) -> str:
    """One fixed-width table per baseline that ran (control task, random-init model, lenses,
    code lengths): its fields by layer, intervals as +- half-widths."""
    tables = []
    for part in dataclasses.fields(LayerResult)[1:]:
        present = [(r.layer, getattr(r, part.name)) for r in layers if getattr(r, part.name)]
        if not present:
            continue
        prefix = part.metadata.get("prefix", "")
        kind = part_type(LayerResult, part.name)
        columns = [c for c in fields_of(kind) if c != "blocks"]
        lines = ["  ".join(f"{c[:22]:>22}" for c in ["layer", *(prefix + c for c in columns)])]
        for layer, value in present:
            cells = [f"{layer:>22}"]
            for c in columns:
                item, ci = getattr(value, c), getattr(value, f"{c}_ci", None)
                text = f"{item:.4f}" if isinstance(item, float) else str(item)
                if ci and ci[0] is not None:
                    text += f" ±{(ci[1] - ci[0]) / 2:.3f}"
                cells.append(f"{text:>22}")
            lines.append("  ".join(cells))
        tables.append("\n".join(lines))
    return "\n\n".join(tables)
