"""A job's identity: one list (jobdir.NOT_IN_KEY) of settings that leave its results alone."""

from __future__ import annotations

import copy

from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from probe_sweep.config import register_schema
from probe_sweep.jobs import jobdir
from probe_sweep.jobs.scheduler import prepare_launchers
from tests.conftest import CONF

RESOLVED = {
    "seed": 0,
    "device": "auto",
    "redo": False,
    "reg": {"kind": "l2", "strength": 1e-6},
    "probe": {"kind": "softmax", "tol": 1e-6, "memory_mb": 4096, "chunk_mb": 64},
    "activations": {"cache_dir": "/a", "batch_size": 8, "dtype": "float32"},
    "tracker": {"mode": "offline"},
    "tuning": {"objective": "val_nll", "study": "s", "storage": "sqlite:////x", "trial_id": 3},
}


def changed(dotted: str, value: object) -> dict:
    config = copy.deepcopy(RESOLVED)
    *parents, leaf = dotted.split(".")
    node = config
    for part in parents:
        node = node[part]
    node[leaf] = value
    return config


def test_settings_outside_the_key_leave_it_alone_and_the_rest_change_it() -> None:
    key = jobdir.job_key(RESOLVED, 1)
    for dotted, value in [
        ("device", "cuda:1"),
        ("redo", True),
        ("tracker.mode", "disabled"),
        ("tuning.storage", "journal:/elsewhere/optuna.journal"),
        ("tuning.trial_id", 9),
        ("activations.cache_dir", "/b"),
        ("activations.batch_size", 64),
        ("probe.memory_mb", 20_000),
        ("probe.chunk_mb", 8),
    ]:
        assert jobdir.job_key(changed(dotted, value), 1) == key, dotted
    for dotted, value in [
        ("reg.strength", 1e-3),
        ("seed", 1),
        ("activations.dtype", "bf16"),
        ("probe.tol", 1e-8),
    ]:
        assert jobdir.job_key(changed(dotted, value), 1) != key, dotted
    assert jobdir.job_key(RESOLVED, 2) != key, "the schema version is part of the key"
    content = jobdir.keyed_content(RESOLVED)
    assert "tuning" not in content and "device" not in content
    assert content["activations"] == {"dtype": "float32"}
    assert content["probe"] == {"kind": "softmax", "tol": 1e-6}
    assert RESOLVED["activations"]["batch_size"] == 8, "the caller's config was changed"


def test_the_list_is_there_for_hydra_job_dir_names() -> None:
    """conf/config.yaml can take override_dirname.exclude_keys from the one list."""
    register_schema()
    prepare_launchers()
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = compose(
            "config",
            overrides=["hydra.job.config.override_dirname.exclude_keys=${probe_sweep_not_in_key:}"],
            return_hydra_config=True,
        )
    excluded = OmegaConf.to_container(cfg.hydra.job.config.override_dirname, resolve=True)
    assert excluded["exclude_keys"] == list(jobdir.NOT_IN_KEY)  # type: ignore[index]


def test_a_long_sweep_line_names_job_dirs_that_can_be_made(tmp_path) -> None:
    """conf/config.yaml's sweep subdir: Hydra's name when short; cut, with a digest of the
    whole override string, when it would pass the file system's limit (a sweep over many
    settings failed at mkdir with "File name too long")."""
    register_schema()
    prepare_launchers()
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = compose("config", return_hydra_config=True)
    short = "basis=pca,target.offset=-1"
    common = ",".join(f"statistics.setting_{i}=False" for i in range(20))
    names = []
    for overrides in (short, f"{common},target.offset=-2", f"{common},target.offset=-1"):
        cfg.hydra.job.num = 3
        cfg.hydra.job.override_dirname = overrides
        names.append(OmegaConf.to_container(cfg.hydra.sweep, resolve=True)["subdir"])  # type: ignore[index]
    assert names[0] == f"3_{short}"
    assert all(len(name) <= jobdir.MAX_DIR_NAME for name in names[1:])
    assert names[1] != names[2] and names[1].startswith("3_statistics.setting_0=False,")
    for name in names:
        (tmp_path / name).mkdir()
