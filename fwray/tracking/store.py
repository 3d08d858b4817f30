"""MLflow's store: where runs go (the experiment's tracking.uri, else the local store), the experiment, starting a run
(nested under a parent with mlflow.parentRunId), and the addresses to open it at. What a run logs, its finish
included, goes the live path (fwray.tracking.live).

Everything goes through `MlflowClient` with explicit run ids, so the driver and a Ray worker (rank 0 only) log into
the same run without sharing process state. A tracking failure mid-run never stops training: one warning, and the
records wait in the run's outbox (fwray.tracking.records) until `python -m fwray.tracking replay` logs them.

Layout: one MLflow experiment per experiment name (tagged as model training for MLflow 3's UI); one parent run per
`fwray.run`, named after the Ray run (fwray.tracking.tracker); the data preparation as a nested run `prepare`, and the
probe's run when it ran; `python -m fwray.probe` and `python -m fwray.plan` run alone start theirs at the top level.
"""
from __future__ import annotations

import logging
import os
import sys
from pathlib import Path

from mlflow.tracking import MlflowClient

from ..config import Experiment
from ..errors import FwrayError


# MLflow announces at INFO that it creates a new sqlite store's tables; fwray's last lines say where the run is
logging.getLogger("mlflow.store.db.utils").setLevel(logging.WARNING)

PREPARE_RUN = "prepare"

DEFAULT_STORE = ".fwray/mlflow.db"

PARENT_TAG = "mlflow.parentRunId"

class TrackingUnavailable(FwrayError):
    """The tracking store cannot be reached at start, before any work."""

def resolve_uri(exp: Experiment) -> str:
    """tracking.uri, else $MLFLOW_TRACKING_URI, else a local sqlite store under .fwray/."""
    return exp.tracking.uri or default_uri()

def default_uri() -> str:
    """Where a run without tracking.uri goes, and where the commands look by default: $MLFLOW_TRACKING_URI, else the
    local store."""
    return os.environ.get("MLFLOW_TRACKING_URI") or local_fallback_uri()

def local_fallback_uri() -> str:
    """fwray's local sqlite store under .fwray/ (artifacts beside it)."""
    return "sqlite:///" + str(Path(DEFAULT_STORE).resolve())

def is_server(uri: str) -> bool:
    """A tracking server (which serves the UI too), not a local store."""
    return uri.startswith(("http://", "https://"))

def ui_command(uri: str) -> str:
    """How to browse `uri` in a browser: a server URI is already a UI; a local store needs `mlflow ui`."""
    if is_server(uri):
        return f"open {uri} in a browser"
    return f"mlflow ui --backend-store-uri {uri} --host 127.0.0.1 --port 5000   # then open http://127.0.0.1:5000"

def ui_address(uri: str) -> str:
    """The UI's address for a store: a server serves its own; a local store's is where `ui_command` puts it."""
    return uri.rstrip("/") if is_server(uri) else "http://127.0.0.1:5000"

def run_page(uri: str, experiment_id: str, run_id: str) -> str:
    # MLflow 3.17's UI routes (a hash router): /experiments/:experimentId/runs/:runUuid is a run's page...
    return f"{ui_address(uri)}/#/experiments/{experiment_id}/runs/{run_id}"

def runs_table(uri: str, experiment_id: str) -> str:
    # ...and /experiments/:experimentId/runs the experiment's "Training runs" table. The experiment's own address
    # (/experiments/:experimentId) can open on the GenAI overview instead, whatever the experiment's kind tag says
    return f"{ui_address(uri)}/#/experiments/{experiment_id}/runs"

def connect(exp: Experiment) -> MlflowClient:
    """A client for the run's store, checked reachable; with tracking.required false, a local store instead."""
    uri = resolve_uri(exp)
    if uri.startswith("sqlite:///"):
        Path(uri[len("sqlite:///"):]).parent.mkdir(parents=True, exist_ok=True)
    # a new sqlite store logs its table creation at INFO on stderr, where fwray's one-line errors go
    for name in ("mlflow.store.db.utils", "alembic.runtime.migration"):
        logging.getLogger(name).setLevel(logging.WARNING)
    client = MlflowClient(tracking_uri=uri)
    try:
        client.search_experiments(max_results=1)
        return client
    except Exception as e:  # MlflowException, requests' ConnectionError, ...
        if exp.tracking.required:
            raise TrackingUnavailable(
                f"MLflow tracking store {uri} is unreachable ({type(e).__name__}); start it (e.g. `mlflow server "
                f"--host 127.0.0.1 --port 5000`), fix tracking.uri / MLFLOW_TRACKING_URI, or set "
                f"tracking.required: false to fall back to a local store") from None
        fallback = local_fallback_uri()
        print(f"fwray: warning: MLflow store {uri} is unreachable; tracking.required is false, so this run is "
              f"tracked in {fallback}", file=sys.stderr)
        Path(fallback[len("sqlite:///"):]).parent.mkdir(parents=True, exist_ok=True)
        return MlflowClient(tracking_uri=fallback)

def experiment_id(client: MlflowClient, name: str) -> str:
    found = client.get_experiment_by_name(name)
    if found is not None:
        return found.experiment_id
    # without this tag MLflow 3's UI opens the experiment in its GenAI view
    return client.create_experiment(name, tags={"mlflow.experimentKind": "custom_model_development"})

def start_run(client: MlflowClient, exp: Experiment, run_name: str, tags: dict[str, str],
              parent_run_id: str | None = None) -> str:
    tags = dict(tags)
    if parent_run_id:
        tags[PARENT_TAG] = parent_run_id
    run = client.create_run(experiment_id(client, exp.tracking.experiment or exp.name), run_name=run_name, tags=tags)
    return run.info.run_id
