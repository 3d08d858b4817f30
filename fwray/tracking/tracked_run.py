"""One MLflow run of fwray's and what goes into it: `TrackedRun` (params, metrics, tags, artifacts, a dataset, its
finish, its nested runs), and `open_run`, the one way a run is started, nested under a parent or at the top level.
A `Tracker` (fwray.tracking.tracker) hands them out: fwray.run's parent run, the prepare and probe runs under it, and
the runs of `python -m fwray.probe` and `python -m fwray.plan` run alone."""
from __future__ import annotations

import os
import sys
from pathlib import Path

from mlflow.tracking import MlflowClient

from ..config import Experiment
from ..errors import first_line
from .live import RunLogger
from .store import start_run


class TrackedRun:
    """One run; everything goes through a `RunLogger`, so an outage warns once and never stops the work, and what
    MLflow did not take waits in `folder`'s outbox for `python -m fwray.tracking replay`. A run MLflow would not
    start (`run_id` None: its start warned) takes nothing, and starts no children."""

    def __init__(self, client: MlflowClient, exp: Experiment, run_id: str | None, folder: str | os.PathLike):
        self.client, self.exp, self.run_id, self.folder = client, exp, run_id, Path(folder)
        self._log = RunLogger(client.tracking_uri, run_id, self.folder) if run_id else None

    def params(self, values: dict[str, object]) -> None:
        if self._log:
            self._log.params(values)

    def metrics(self, step: int, values: dict[str, float | None]) -> None:
        if self._log:
            self._log.metrics(step, values)

    def tags(self, values: dict[str, object]) -> None:
        if self._log:
            self._log.tags(values)

    def artifact(self, path: str | os.PathLike, artifact_path: str | None = None) -> None:
        if self._log:
            self._log.artifact(path, artifact_path)

    def dataset(self, fields: dict, context: str) -> None:
        if self._log:
            self._log.dataset(fields, context)

    def finish(self, ok: bool, tags: dict[str, object] | None = None) -> bool:
        """FINISHED or FAILED with the outcome `tags`; never raises. Returns whether MLflow took it."""
        return self._log.finish(ok, tags) if self._log else False

    def child(self, name: str, tags: dict[str, str], folder: str | os.PathLike | None = None) -> TrackedRun:
        """A run nested under this one, its outbox in `folder` (default: this run's). Under a run that MLflow did not
        start, or has stopped taking records for, none is started: that outage has had its one warning."""
        folder = folder or self.folder
        if self._log is None or self._log.failed:
            return TrackedRun(self.client, self.exp, None, folder)
        return open_run(self.client, self.exp, name, tags, folder, parent_run_id=self.run_id)


def open_run(client: MlflowClient, exp: Experiment, name: str, tags: dict[str, str], folder: str | os.PathLike,
             parent_run_id: str | None = None) -> TrackedRun:
    """A new run in the experiment's MLflow experiment, nested under `parent_run_id` when given. A store that does not
    start it is one warning, never an error: the work it would record goes on."""
    try:
        run_id = start_run(client, exp, name, tags, parent_run_id)
    except Exception as e:  # MlflowException, requests' ConnectionError, ...
        print(f"fwray: warning: MLflow at {client.tracking_uri} did not start the run {name!r} ({type(e).__name__}: "
              f"{first_line(e)[:160]}); the work goes on without it", file=sys.stderr, flush=True)
        run_id = None
    return TrackedRun(client, exp, run_id, folder)
