"""A recording stand-in for the ``wandb`` module, for unit tests of the tracker.

Install it at the tracker's one import (``monkeypatch.setattr(tracking, "_wandb", lambda:
fake)``). It records every run's ``init`` arguments, logged rows, metric definitions, summary,
artifacts and exit code as plain Python. Each call is bound to the real wandb's signature first,
so an argument wandb would reject by name fails here too; ``Settings`` is wandb's own class.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import wandb


def _bind(real: Any, *args: Any, **kwargs: Any) -> dict[str, Any]:
    """The arguments as wandb's ``real`` callable would take them (TypeError if it would not)."""
    return dict(inspect.signature(real).bind(*args, **kwargs).arguments)


@dataclass
class Table:
    columns: list[str]
    data: list[list[Any]]

    def add_data(self, *row: Any) -> None:
        _bind(wandb.Table.add_data, None, *row)
        assert len(row) == len(self.columns), (row, self.columns)
        self.data.append(list(row))


@dataclass
class Image:
    path: Path
    caption: str | None


@dataclass
class Chart:
    kind: str
    args: dict[str, Any]


@dataclass
class Artifact:
    name: str
    type: str
    description: str | None
    metadata: dict[str, Any]
    files: dict[str, Path] = field(default_factory=dict)

    def add_file(self, local_path: str, name: str | None = None) -> None:
        _bind(wandb.Artifact.add_file, None, local_path, name=name)
        path = Path(local_path)
        assert path.is_file(), path
        self.files[name or path.name] = path


@dataclass
class Metric:
    name: str
    step_metric: str | None


@dataclass
class Run:
    init: dict[str, Any]
    id: str
    entity: str = "fake-entity"
    history: list[dict[str, Any]] = field(default_factory=list)
    metrics: dict[str, Metric] = field(default_factory=dict)
    summary: dict[str, Any] = field(default_factory=dict)
    artifacts: list[Artifact] = field(default_factory=list)
    exit_code: int | None = None
    finished: bool = False

    @property
    def dir(self) -> str:
        """Where wandb keeps the run's files: ``<init dir>/wandb/<offline-run-...>/files``."""
        return str(Path(self.init["dir"]) / "wandb" / f"offline-run-{self.id}" / "files")

    @property
    def url(self) -> str:
        return f"https://wandb.invalid/{self.id}"

    def define_metric(self, name: str, step_metric: str | None = None) -> None:
        _bind(wandb.sdk.wandb_run.Run.define_metric, None, name, step_metric=step_metric)
        self.metrics[name] = Metric(name, step_metric)

    def log(self, data: dict[str, Any]) -> None:
        _bind(wandb.sdk.wandb_run.Run.log, None, data)
        assert not self.finished, "logged to a finished run"
        assert all(isinstance(k, str) for k in data), data
        self.history.append(dict(data))

    def log_artifact(self, artifact: Artifact) -> None:
        _bind(wandb.sdk.wandb_run.Run.log_artifact, None, artifact)
        self.artifacts.append(artifact)

    def finish(self, exit_code: int | None = None) -> None:
        _bind(wandb.sdk.wandb_run.Run.finish, None, exit_code=exit_code)
        self.finished, self.exit_code = True, exit_code if exit_code is not None else 0

    def rows_with(self, key: str) -> list[dict[str, Any]]:
        return [row for row in self.history if key in row]

    def logged(self, key: str) -> Any:
        """The one value logged under ``key`` (a table, an image, a chart)."""
        (value,) = [row[key] for row in self.history if key in row]
        return value


class Plot:
    @staticmethod
    def line_series(*args: Any, **kwargs: Any) -> Chart:
        return Chart("line_series", _bind(wandb.plot.line_series, *args, **kwargs))


class FakeWandb:
    """What the tracker uses of the wandb module; ``runs`` in the order they were started.
    ``fail_init``: modes whose ``init`` raises (as an online run does without a server)."""

    Settings = wandb.Settings
    plot = Plot

    def __init__(self, fail_init: tuple[str, ...] = ()) -> None:
        self.runs: list[Run] = []
        self.fail_init = fail_init

    def init(self, **kwargs: Any) -> Run:
        _bind(wandb.init, **kwargs)
        if kwargs.get("mode") in self.fail_init:
            raise TimeoutError(f"fake: a {kwargs['mode']} run cannot start")
        if self.runs and not self.runs[-1].finished:
            assert kwargs.get("reinit") == "finish_previous", "wandb would return the same run"
            self.runs[-1].finish()
        run = Run(init=kwargs, id=kwargs.get("id") or f"fake{len(self.runs)}")
        self.runs.append(run)
        return run

    @staticmethod
    def Table(*args: Any, **kwargs: Any) -> Table:  # wandb's capitalised name
        bound = _bind(wandb.Table, *args, **kwargs)
        return Table(list(bound.get("columns") or []), [list(r) for r in bound.get("data") or []])

    @staticmethod
    def Image(*args: Any, **kwargs: Any) -> Image:  # wandb's capitalised name
        bound = _bind(wandb.Image, *args, **kwargs)
        path = Path(bound["data_or_path"])
        assert path.is_file(), path
        return Image(path, bound.get("caption"))

    @staticmethod
    def Artifact(*args: Any, **kwargs: Any) -> Artifact:  # wandb's capitalised name
        bound = _bind(wandb.Artifact, *args, **kwargs)
        return Artifact(
            bound["name"], bound["type"], bound.get("description"), bound.get("metadata") or {}
        )
