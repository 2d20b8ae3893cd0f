"""Which sweeper runs which trial, so several sweepers can work on one study (the same command
started by two users, or in two SLURM allocations) and a trial is failed as "left running" only
when the sweeper that asked for it is gone.

Each sweeper names itself in the study (``sweeper:<id>``: host, pid and a heartbeat renewed
every ``HEARTBEAT_S`` by a thread) and marks the trials it asks for with its id. A sweeper on
the same host is gone when its process is; one on another host when its heartbeat is older
than ``GONE_AFTER_S``. A sweeper that stops (done, Ctrl-C, an error) says so at once.
"""

from __future__ import annotations

import os
import socket
import threading
import time
import uuid
from typing import Any

import optuna

HEARTBEAT_S = 20.0
GONE_AFTER_S = 6 * HEARTBEAT_S
TRIAL_ATTR = "sweeper"  # a trial's user attribute: the id of the sweeper that asked for it
PREFIX = "sweeper:"  # a study's user attribute per sweeper: host, pid, last heartbeat


def record_is_alive(record: Any, now: float | None = None) -> bool:
    """Whether the sweeper ``record`` describes may still be running its trials."""
    if not isinstance(record, dict) or not record.get("beat"):
        return False
    if record.get("host") == socket.gethostname():
        try:
            os.kill(int(record["pid"]), 0)
        except ProcessLookupError:
            return False
        except (PermissionError, ValueError, TypeError, OverflowError):
            return isinstance(record.get("pid"), int)  # another user's live process
        return True
    return (now or time.time()) - float(record["beat"]) < GONE_AFTER_S


class Sweeper:
    """This process as a worker of ``study``: its heartbeat runs from ``__enter__`` to
    ``__exit__``."""

    def __init__(self, study: optuna.Study) -> None:
        self.study, self.id = study, uuid.uuid4().hex[:12]
        self.stopped = threading.Event()
        self.thread = threading.Thread(target=self._beat, name="optuna-heartbeat", daemon=True)

    def __enter__(self) -> Sweeper:
        self._write(time.time())
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stopped.set()
        self.thread.join(timeout=HEARTBEAT_S)
        try:
            self._write(0.0)  # gone: its trials still running are left to the next sweeper
        except Exception:  # the storage failed us: the pid (or heartbeat age) tells the rest
            pass

    def _write(self, beat: float) -> None:
        record = {"host": socket.gethostname(), "pid": os.getpid(), "beat": beat}
        self.study.set_user_attr(PREFIX + self.id, record)

    def _beat(self) -> None:
        while not self.stopped.wait(HEARTBEAT_S):
            try:
                self._write(time.time())
            except Exception:  # a storage hiccup: the next beat tries again
                continue

    def ask(self, space: dict[str, Any]) -> optuna.Trial:
        trial = self.study.ask(space)
        trial.set_user_attr(TRIAL_ATTR, self.id)
        return trial

    def running_elsewhere(self) -> list[optuna.trial.FrozenTrial]:
        """Running trials of sweepers other than this one that are still alive."""
        return self._others_running(alive=True)

    def abandoned(self) -> list[optuna.trial.FrozenTrial]:
        """Running trials whose sweeper is gone (killed, or stopped before they ended)."""
        return self._others_running(alive=False)

    def _others_running(self, alive: bool) -> list[optuna.trial.FrozenTrial]:
        """Running trials of other sweepers, those whose sweeper is (or is not) alive."""
        attrs = self.study.user_attrs
        running = self.study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.RUNNING,))
        return [
            t
            for t in running
            if (owner := t.user_attrs.get(TRIAL_ATTR)) != self.id
            and record_is_alive(attrs.get(f"{PREFIX}{owner}")) == alive
        ]
