"""Tables of scores: the fixed-width one for the console and the job log, and markdown for the
sweep report. (The statistics print their own, ``statistics.format_entries`` and
``format_layers``.)"""

from __future__ import annotations

from typing import Any


def format_table(rows: list[dict[str, Any]]) -> str:
    """A fixed-width table of the per-layer scores, for the console and the job log."""
    columns = ["layer", "top1", "top5", "nll", "top1_frequent", "top1_rare"]
    columns += [c for c in ("iterations", "gap_rel") if any(c in r for r in rows)]
    lines = ["  ".join(f"{c:>13}" for c in columns)]
    for row in rows:
        cells = []
        for c in columns:
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
