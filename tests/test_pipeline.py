"""One job with every statistic on, traced: each stage runs once and in the order of the data
flow, its results are frozen, and its metrics are the ones the code wrote before (field by
field, apart from timings and paths).

``tests/data/metrics_every_statistic.json`` is the metrics.json of ``EVERYTHING`` below;
``python -m tests.test_pipeline`` writes it again from the code as it is (do that only when a
change is meant to move the numbers, and say so in the commit).
"""

from __future__ import annotations

import ast
import dataclasses
import json
import math
import sys
import types
from pathlib import Path
from typing import Any

import pytest
import torch
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from probe_sweep import results
from probe_sweep.config import register_schema, to_typed
from probe_sweep.pipeline import run_job
from tests.conftest import CONF

GOLDEN = Path(__file__).parent / "data" / "metrics_every_statistic.json"
EVERYTHING = [
    "model=tiny",
    "data.token_budget=1500",
    "data.seq_len=64",
    "statistics.random_init_baseline=true",
    "statistics.lens_probe=true",
    "statistics.lens_comparison=true",
    "statistics.mdl=true",
    "statistics.k_sweep=[8]",
    "statistics.k_seeds=1",
    "statistics.lens_rows=128",
    "statistics.lens_train_rows=128",
    "statistics.n_permutations=10",
    "statistics.n_bootstrap=20",
    "statistics.n_bootstrap_types=20",
    "tracker=none",
]
# The stages in the order of the data flow, by the modules that do their work. Modules not
# named here are shared values and helpers (results, intervals, files, the job dir's layout in
# jobs/, ...).
STAGES = [
    ("extraction", ("probe_sweep.extraction.", "probe_sweep.cache.")),
    ("bases", ("probe_sweep.bases",)),
    ("fitting", ("probe_sweep.probes.", "probe_sweep.fitting.", "probe_sweep.baselines.")),
    ("statistics", ("probe_sweep.statistics",)),
    ("job files", ("probe_sweep.report.",)),
]
LATER = [("tracking", ("probe_sweep.tracking.",))]  # after the job, from its files


def stage_of(module: str) -> str | None:
    for stage, prefixes in STAGES:
        if module.startswith(prefixes):
            return stage
    return None


def run(
    out_dir: Path, trace: list[str] | None = None, extra: tuple[str, ...] = ()
) -> dict[str, Any]:
    """Run the job in this process; with ``trace``, record the stage of every module-level
    function called after the input checks (methods of a stage's values, such as a basis's
    coordinates or a store's layer, do not enter its stage)."""
    register_schema()
    with initialize_config_dir(str(CONF), version_base=None):
        cfg = compose(config_name="config", overrides=[*EVERYTHING, *extra])
    config = to_typed(cfg)
    resolved = OmegaConf.to_container(cfg, resolve=True, enum_to_str=True)
    checks = run_job.__globals__["check_inputs"].__code__

    def profile(frame: types.FrameType, event: str, arg: Any) -> None:
        if event != "call":
            return
        qualname = frame.f_code.co_qualname
        method = "." in qualname and ".<locals>." not in qualname
        if method or qualname.startswith("__create_fn__"):  # dataclasses make __init__ there
            return
        stage = stage_of(frame.f_globals.get("__name__", ""))
        if stage is None or (trace and trace[-1] == stage):
            return
        caller = frame.f_back
        while caller is not None:
            if caller.f_code is checks:
                return
            caller = caller.f_back
        trace.append(stage)  # type: ignore[union-attr]

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # sums in one order: the tuned lens has no certificate to meet
    if trace is not None:
        sys.setprofile(profile)
    try:
        run_job(config, resolved, out_dir, {"key": "traced", "overrides": EVERYTHING})
    finally:
        sys.setprofile(None)
        torch.set_num_threads(threads)
    return json.loads((out_dir / "metrics.json").read_text())


def test_a_job_runs_each_stage_once_in_order_and_writes_the_metrics_it_wrote_before(
    tmp_path: Path,
) -> None:
    trace: list[str] = []
    metrics = run(tmp_path, trace)
    assert trace == [stage for stage, _ in STAGES], trace
    golden = json.loads(GOLDEN.read_text())
    assert differences(metrics, golden) == []


def test_no_stage_imports_a_later_one() -> None:
    """A module reads what the stages before it wrote and knows nothing of the ones after it."""
    order = [prefixes for _, prefixes in STAGES + LATER]

    def rank(module: str) -> int | None:
        found = [i for i, prefixes in enumerate(order) if (module + ".").startswith(prefixes)]
        return found[0] if found else None

    package = Path(__file__).parents[1] / "probe_sweep"
    later = []
    for path in sorted(package.rglob("*.py")):
        module = ".".join(path.relative_to(package.parent).with_suffix("").parts)
        mine = rank(module.removesuffix(".__init__"))
        for node in ast.walk(ast.parse(path.read_text())):
            if mine is None or not isinstance(node, ast.ImportFrom) or not node.module:
                continue
            targets = [f"{node.module}.{alias.name}" for alias in node.names]
            ranks = [r for r in map(rank, targets) if r is not None]
            if ranks and min(ranks) > mine:
                later.append(f"{module} imports {node.module}")
    assert later == []


def differences(new: Any, old: Any, path: str = "") -> list[str]:
    """Every field where ``new`` and ``old`` differ beyond float rounding, apart from timings,
    resources, the job record and paths."""
    if isinstance(new, dict) and isinstance(old, dict):
        skip = {"timing_s", "resources", "job", "path", "cache_dir", "dir", "reused", "history"}
        out = [f"{path}.{k}: only in one" for k in set(new) ^ set(old) if k not in skip]
        for k in sorted((set(new) & set(old)) - skip):
            out += differences(new[k], old[k], f"{path}.{k}")
        return out
    if isinstance(new, list) and isinstance(old, list):
        if len(new) != len(old):
            return [f"{path}: {len(new)} items, before {len(old)}"]
        return [
            d
            for i, (a, b) in enumerate(zip(new, old, strict=True))
            for d in differences(a, b, f"{path}[{i}]")
        ]
    if isinstance(new, float) and isinstance(old, float):
        return (
            []
            if math.isclose(new, old, rel_tol=1e-4, abs_tol=1e-6)
            else [f"{path}: {new} vs {old}"]
        )
    return [] if new == old else [f"{path}: {new!r} vs {old!r}"]


@pytest.mark.parametrize(
    "part",
    [t for t in vars(results).values() if isinstance(t, type) and dataclasses.is_dataclass(t)],
)
def test_every_result_is_frozen(part: type) -> None:
    # A stage's results are read by later stages, never edited by them.
    assert part.__dataclass_params__.frozen  # type: ignore[attr-defined]


if __name__ == "__main__":
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        GOLDEN.write_text(json.dumps(run(Path(tmp)), indent=1) + "\n")
    print(f"wrote {GOLDEN}")
