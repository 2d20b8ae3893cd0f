"""What a job's W&B run is: the tracker's settings and mode (online, offline or disabled), the
Hydra job it logs, and the run's group, type, tags, name and config hash."""

from __future__ import annotations

import hashlib
import json
import os
import re
from dataclasses import dataclass, field
from enum import Enum
from pathlib import Path
from typing import Any

from probe_sweep.jobs.jobdir import keyed_content


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
    ``dir``: where wandb writes its run dirs (null = WANDB_DIR, else the job's output dir).
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


# --- the mode, and what a run is called ----------------------------------------------------


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
    text = json.dumps(keyed_content(resolved), sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:8]


GROUP_TAGS = ("model", "probe", "layers", "basis", "reg", "data")


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
