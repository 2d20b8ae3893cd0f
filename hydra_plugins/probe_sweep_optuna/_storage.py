"""Where a sweep's studies live: a journal file, SQLite, or a database the user names."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from hydra.errors import HydraException

from probe_sweep.tuning import JOURNAL

BASIC_LAUNCHER = "hydra._internal.core_plugins.basic_launcher.BasicLauncher"
JOURNAL_FILE, SQLITE_FILE = "optuna.journal", "optuna.db"


@dataclass
class StorageChoice:
    """Where the studies live: ``url`` for ``tuning.open_storage``, ``kind`` and why."""

    url: str
    kind: str  # journal | sqlite | rdb
    reason: str


def choose_storage(setting: str | None, sweep_dir: Path, launcher: str) -> StorageChoice:
    """The storage for ``hydra.sweeper.storage=setting`` under launcher class ``launcher``.

    Unset: a study file already in the sweep dir (so a resume finds its study whatever the
    launcher now), else the journal file when trials may run in parallel or on other nodes
    (any launcher but the basic one: Optuna's advice for several processes on a shared
    filesystem, where SQLite's locking fails), else SQLite (one local process).
    """
    journal, sqlite = sweep_dir.resolve() / JOURNAL_FILE, sweep_dir.resolve() / SQLITE_FILE
    as_journal, as_sqlite = f"{JOURNAL}{journal}", f"sqlite:///{sqlite}"
    parallel = launcher != BASIC_LAUNCHER
    launcher_name = launcher.rsplit(".", 1)[-1]
    if setting in (None, "", "auto"):
        if journal.exists() != sqlite.exists():
            found = journal if journal.exists() else sqlite
            kind = "journal" if journal.exists() else "sqlite"
            url = as_journal if kind == "journal" else as_sqlite
            return StorageChoice(url, kind, f"default: the studies already in {found.name}")
        if parallel:
            why = f"default: {launcher_name} may run trials in parallel or on other nodes"
            return StorageChoice(as_journal, "journal", why)
        return StorageChoice(as_sqlite, "sqlite", "default: the basic launcher, one process")
    if setting == "journal":
        return StorageChoice(as_journal, "journal", "hydra.sweeper.storage=journal")
    if setting == "sqlite":
        return StorageChoice(as_sqlite, "sqlite", "hydra.sweeper.storage=sqlite")
    if "://" in setting:
        return StorageChoice(setting, "rdb", "hydra.sweeper.storage")
    raise HydraException(
        f"hydra.sweeper.storage={setting!r}: use journal, sqlite or a database URL "
        "(e.g. postgresql://user@host/db), or leave it unset"
    )
