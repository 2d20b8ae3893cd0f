"""A job's per-layer scores as a fixed-width table, for the console and the job log. (The
statistics print their own tables, ``statistics.format_entries`` and ``format_layers``.)"""

from __future__ import annotations

from typing import Any


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
