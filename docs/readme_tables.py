"""Print the README's result tables from jobs' metrics.json files, so no number is typed by hand.

python docs/readme_tables.py layers  <job dir>                # per layer, one job
python docs/readme_tables.py bases   <sweep dir>              # one row per job and layer
python docs/readme_tables.py k       <job dir>                # accuracy against k
python docs/readme_tables.py mdl     <job dir>                # online code length by layer
python docs/readme_tables.py lenses  <job dir>                # the lenses side by side
python docs/readme_tables.py readout <job dir>                # logit-lens read-out, projections
python docs/readme_tables.py offsets <sweep dir>              # top-1 by layer and target offset
python docs/readme_tables.py study   <study dir>              # an Optuna study's trials
"""

from __future__ import annotations

import csv
import json
import sys
from pathlib import Path
from typing import Any

from probe_sweep.baselines.mdl import paired_compression_range
from probe_sweep.report.offsets import offset_change_table, offset_grids, offset_table
from probe_sweep.results import LayerResult


def ci(value: float | None, interval: list | None, digits: int = 3) -> str:
    if value is None:
        return "-"
    if interval and None not in interval:
        return f"{value:.{digits}f} [{interval[0]:.{digits}f}, {interval[1]:.{digits}f}]"
    return f"{value:.{digits}f}"


def entries(metrics: dict[str, Any]) -> dict[tuple[str, int | None], dict[str, Any]]:
    return {(e["name"], e["layer"]): e for e in metrics["statistics"].get("entries", [])}


def diff(entry: dict[str, Any], baseline: str) -> str:
    b = (entry.get("baselines") or {}).get(baseline)
    return "-" if b is None else f"{b['observed']:.3f} ({ci(b['difference'], b['difference_ci'])})"


def shares(found: dict[tuple[str, int | None], dict[str, Any]], layer: int) -> str:
    weight = found[("weight_share_bottom_half", layer)]["observed"]
    variance = found[("variance_share_bottom_half", layer)]["observed"]
    return f"{weight:.3f} / {variance:.3f}"


def table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return "\n".join([*lines, *("| " + " | ".join(r) + " |" for r in rows)])


def ratio_cell(ratio: dict[str, Any]) -> str:
    return (
        f"{ci(ratio['observed'], ratio['ci'])}; p(greater) {ratio['p']:.3f}, "
        f"p(less) {ratio['p_less']:.3f}"
    )


def layers_table(metrics: dict[str, Any]) -> str:
    """Three tables: accuracy with its baselines, similarity to W_E against the random-init
    model's probe, and weight mass against the activations."""
    found = entries(metrics)
    accuracy, similarity, mass = [], [], []
    for row in metrics["layers"]:
        layer = row["layer"]
        accuracy.append(
            [
                str(layer),
                ci(row["top1"], row.get("top1_ci")),
                ci(row.get("top1_minus_previous_layer"), row.get("top1_minus_previous_layer_ci")),
                ci(row.get("random_init_top1"), row.get("random_init_top1_ci")),
                ci(row.get("top1_minus_random_init"), row.get("top1_minus_random_init_ci")),
                ci(row.get("control_top1"), row.get("control_top1_ci")),
                ci(row.get("selectivity"), row.get("selectivity_ci")),
                gap_cell(metrics["fits"][row["probe"]]),
            ]
        )
        if ("probe_embedding_cosine", layer) in found:  # softmax: rows of the probe matrix
            cells = [str(layer)]
            for name in (
                "probe_embedding_cosine",
                "probe_embedding_cka",
                "probe_embedding_procrustes",
            ):
                entry = found[(name, layer)]
                cells += [ci(entry["observed"], entry["ci"]), diff(entry, "random_init")]
            similarity.append(cells)
        ratio = found[("weight_to_variance_bottom_half", layer)]
        mass.append(
            [str(layer), shares(found, layer), ratio_cell(ratio), diff(ratio, "random_init"),
             diff(ratio, "control_task")]
        )  # fmt: skip
    tables = [
        table(
            ["layer", "top-1", "minus the layer before (paired)", "random-init top-1",
             "difference", "control-task top-1", "selectivity", "relative gap"],
            accuracy,
        ),
        table(
            ["layer", "cosine", "random-init (difference)", "CKA", "random-init (difference)",
             "Procrustes residual", "random-init (difference)"],
            similarity,
        ) if similarity else "",
        table(
            ["layer", "weight / variance share of the bottom half", "ratio (same-kind null)",
             "random-init ratio (difference)", "control-task ratio (difference)"],
            mass,
        ),
    ]  # fmt: skip
    return "\n\n".join(t for t in tables if t)


def gap_cell(fit: dict[str, Any]) -> str:
    """The fit's relative gap to its optimum, and whether it met its tolerance."""
    gap = fit.get("gap_rel")
    if gap is None:
        return "closed form" if fit.get("converged") else "n/a"
    return f"{gap:.1e}" + ("" if fit.get("converged") else " (NOT converged)")


def bases_table(sweep: Path) -> str:
    rows = []
    for path in sorted(sweep.rglob("metrics.json")):
        metrics = json.loads(path.read_text())
        found = entries(metrics)
        basis = metrics["probe"]["basis"]
        for row in metrics["layers"]:
            layer = row["layer"]
            ratio = found[("weight_to_variance_bottom_half", layer)]
            cos = found.get(("probe_embedding_cosine", layer))  # softmax only
            fit = metrics["fits"][row["probe"]]
            rows.append(
                [
                    basis,
                    str(layer),
                    ci(row["top1"], row.get("top1_ci")),
                    str(fit.get("iterations", "-")),
                    gap_cell(fit),
                    ci(cos["observed"], cos["ci"]) if cos else "-",
                    shares(found, layer),
                    f"{ratio_cell(ratio)} ({ratio['null']})",
                    diff(ratio, "control_task"),
                ]
            )
    header = ["basis", "layer", "top-1", "Newton iterations", "relative gap", "cosine to W_E",
              "weight / variance share, bottom half", "ratio (null: p)",
              "control-task ratio (difference)"]  # fmt: skip
    return table(header, rows)


def k_table(metrics: dict[str, Any]) -> str:
    points = metrics["statistics"]["accuracy_vs_k"]
    rows = []
    for layer in sorted({p["layer"] for p in points}):
        for k in sorted({p["k"] for p in points if p["layer"] == layer}):
            here = [p for p in points if p["layer"] == layer and p["k"] == k]
            top = next(p for p in here if p["kind"] == "top")
            bottom = next(p for p in here if p["kind"] == "bottom")
            random = [p["top1"] for p in here if p["kind"] == "random"]
            rows.append(
                [
                    str(layer),
                    str(k),
                    ci(top["top1"], top["top1_ci"]),
                    ci(bottom["top1"], bottom["top1_ci"]),
                    f"{sum(random) / len(random):.3f} ({min(random):.3f}-{max(random):.3f}, "
                    f"{len(random)} seeds)",
                ]
            )
    return table(["layer", "k", "top-k top-1", "bottom-k top-1", "random-k top-1 (range)"], rows)


def mdl_table(metrics: dict[str, Any]) -> str:
    rows = []
    for row in metrics["layers"]:
        cells = [str(row["layer"])]
        for task in ("mdl_", "control_mdl_"):
            cells += [
                f"{row[task + 'codelength_bits'] / 1000:,.1f}",
                f"{row[task + 'uniform_bits'] / 1000:,.1f}",
                f"{row[task + 'compression']:.2f}",
                orders_cell(row, task),
                "yes" if row[task + "all_converged"] else "no",
            ]
        result = LayerResult.from_row(row)
        paired = paired_compression_range(result.mdl, result.control_mdl)
        cells.append("n/a" if paired is None else f"{paired[0]:+.2f} to {paired[1]:+.2f}")
        rows.append(cells)
    header = ["layer", "token: online kbit", "uniform kbit", "compression", "range over orders"]
    header += ["all fits converged", "control: online kbit", "uniform kbit", "compression"]
    header += ["range over orders", "all fits converged", "token - control, by order"]
    return table(header, rows)


def orders_cell(row: dict[str, Any], task: str) -> str:
    """The lowest and highest compression of one seeded order of the rows, and how many."""
    spread = row.get(task + "compression_range")
    if not spread:
        return "one order"
    return f"{spread[0]:.2f}-{spread[1]:.2f} ({row[task + 'n_orders']} orders)"


def lens_table(metrics: dict[str, Any]) -> str:
    rows = []
    for r in metrics["layers"]:
        rows.append(
            [
                str(r["layer"]),
                ci(r["top1"], r["top1_ci"]),
                ci(r["logit_lens_top1"], r["logit_lens_top1_ci"]),
                ci(r["tuned_lens_top1"], r["tuned_lens_top1_ci"]),
                ci(r["logit_lens_next_top1"], r["logit_lens_next_top1_ci"]),
                ci(r["tuned_lens_next_top1"], r["tuned_lens_next_top1_ci"]),
                f"{r['logit_lens_kl']:.4f} / {r['tuned_lens_kl']:.4f}",
                ci(r.get("tuned_minus_logit_lens_kl"), r.get("tuned_minus_logit_lens_kl_ci"), 4),
                f"{r['tuned_lens_iterations']}, {'yes' if r['tuned_lens_converged'] else 'no'}",
            ]
        )
    header = ["layer", "identity probe top-1", "logit lens: token", "tuned lens: token"]
    header += ["logit lens: next", "tuned lens: next", "KL to final (logit / tuned)"]
    header += ["tuned minus logit KL (paired)"]
    header += ["translator iterations, converged"]
    return table(header, rows)


def readout_table(metrics: dict[str, Any]) -> str:
    """The logit lens's read-out of the input token beside the identity probe (the probe minus
    the lens on the lens's positions, paired; runs before the pairing show no interval), and the
    hidden state's cosine with the embeddings of the tokens the final layer ranks lowest / highest,
    against random tokens (p: two-sided, from the random-token null)."""
    found = entries(metrics)
    rows = []
    for r in metrics["layers"]:
        layer = r["layer"]
        cells = [str(layer), ci(r["top1"], r["top1_ci"])]
        cells.append(ci(r["lens_input_top1"], r.get("lens_input_top1_ci")))
        cells.append(ci(r["probe_minus_lens_top1"], r.get("probe_minus_lens_top1_ci")))
        cells.append(f"{r['lens_input_median_rank']:g}")
        for name, field in (("unlikely", "proj_unlikely"), ("likely", "proj_likely")):
            entry = found.get((f"{name}_token_projection", layer))
            p = "" if entry is None else f" (p {entry['p']:.3f})"
            cells.append("-" if r.get(field) is None else f"{r[field]:+.4f}{p}")
        cells.append("-" if r.get("proj_random") is None else f"{r['proj_random']:+.4f}")
        rows.append(cells)
    header = ["layer", "identity probe top-1", "logit lens: input top-1"]
    header += ["probe minus lens (same positions)"]
    header += ["lens: input median rank", "cos, 50 least likely", "cos, 50 most likely"]
    header += ["cos, 50 random tokens"]
    return table(header, rows)


def offsets_table(sweep: Path) -> str:
    """The sweep report's tables: top-1 by layer and offset, and each layer minus the first."""
    jobs = [([], json.loads(path.read_text())) for path in sorted(sweep.glob("*/metrics.json"))]
    (grid,) = offset_grids(jobs).values()
    return "\n".join([*offset_table(grid), "", *offset_change_table(grid)])


def study_table(study: Path) -> str:
    """One row per trial of an Optuna study (trials.csv), with each probed layer's validation
    NLL and top-1, and its test top-1 where the trial finished."""
    rows = []
    for trial in csv.DictReader((study / "trials.csv").open()):
        strength = float(trial["reg.strength"])
        cells = [trial["number"], f"{strength:.2e}", trial["state"].lower()]
        path = study / f"trial_{trial['number']}" / "metrics.json"
        if trial["state"] != "COMPLETE" or not path.exists():
            value = f"{float(trial['value']):.4f} (last reported)" if trial["value"] else "-"
            rows.append([*cells, value, "-", "-"])
            continue
        metrics = json.loads(path.read_text())
        layers = metrics["layers"]
        gaps = max(metrics["fits"][r["probe"]]["gap_rel"] for r in layers)
        rows.append(
            [
                *cells,
                f"{float(trial['value']):.4f}",
                "; ".join(
                    f"{r['layer']}: {r['val_nll']:.4f} / {r['val_top1']:.3f}" for r in layers
                ),
                "; ".join(f"{r['layer']}: {ci(r['top1'], r['top1_ci'])}" for r in layers)
                + f" (gaps <= {gaps:.1e})",
            ]
        )
    return table(
        ["trial", "strength", "state", "objective (mean val NLL)",
         "layer: val NLL / val top-1", "layer: test top-1"],
        rows,
    )  # fmt: skip


def main(argv: list[str]) -> int:
    kind, where = argv[0], Path(argv[1])
    sweeps = {"bases": bases_table, "offsets": offsets_table, "study": study_table}
    if kind in sweeps:
        print(sweeps[kind](where))
        return 0
    metrics = json.loads((where / "metrics.json").read_text())
    tables = {
        "layers": layers_table,
        "k": k_table,
        "mdl": mdl_table,
        "lenses": lens_table,
        "readout": readout_table,
    }
    print(tables[kind](metrics))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
