"""MLflow, and only here: the experiment, the runs, their params, metrics and artifacts.

Everything goes through `MlflowClient` with explicit run ids, so the driver and a Ray worker (rank 0 only) log
into the same run without sharing process state. A tracking failure mid-run never stops training: one warning,
and the records go to a local JSONL that `python -m fwray.tracking replay` logs later.
"""
from __future__ import annotations

import json
import os
import sys
import time
import warnings
from pathlib import Path

# Fail fast against an unreachable server instead of retrying for minutes; set before mlflow reads them.
os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "10")

import mlflow  # noqa: E402
from mlflow.entities import Metric, Param, RunTag  # noqa: E402
from mlflow.tracking import MlflowClient  # noqa: E402

from .config import Experiment, flatten  # noqa: E402

DEFAULT_STORE = ".fwray/mlflow.db"
PARENT_TAG = "mlflow.parentRunId"
MAX_PARAM_CHARS = 6000  # MLflow's limit on a param value


class TrackingUnavailable(RuntimeError):
    """The tracking store cannot be reached at start, before any work."""


def resolve_uri(exp: Experiment) -> str:
    """tracking.uri, else $MLFLOW_TRACKING_URI, else a local sqlite store under .fwray/."""
    uri = exp.tracking.uri or os.environ.get("MLFLOW_TRACKING_URI")
    if uri:
        return uri
    return "sqlite:///" + str(Path(DEFAULT_STORE).resolve())


def local_fallback_uri() -> str:
    return "sqlite:///" + str(Path(DEFAULT_STORE).resolve())


def ui_command(uri: str) -> str:
    """How to browse `uri` in a browser: a server URI is already a UI; a local store needs `mlflow ui`."""
    if uri.startswith(("http://", "https://")):
        return f"open {uri} in a browser"
    return f"mlflow ui --backend-store-uri {uri} --host 127.0.0.1 --port 5000   # then open http://127.0.0.1:5000"


def connect(exp: Experiment) -> MlflowClient:
    """A client for the run's store, checked reachable; with tracking.required false, a local store instead."""
    uri = resolve_uri(exp)
    if uri.startswith("sqlite:///"):
        Path(uri[len("sqlite:///"):]).parent.mkdir(parents=True, exist_ok=True)
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


def log_params(client: MlflowClient, run_id: str, params: dict[str, object]) -> None:
    items = [Param(k, str(v)[:MAX_PARAM_CHARS]) for k, v in params.items()]
    for i in range(0, len(items), 100):  # MLflow accepts at most 100 params per batch
        client.log_batch(run_id, params=items[i:i + 100])


def log_experiment(client: MlflowClient, run_id: str, exp: Experiment) -> None:
    log_params(client, run_id, flatten(exp))


def finish(client: MlflowClient, run_id: str, ok: bool) -> None:
    client.set_terminated(run_id, "FINISHED" if ok else "FAILED")


class RunLogger:
    """Metrics and artifacts into one run from any process; on failure warns once and keeps a local JSONL."""

    def __init__(self, uri: str, run_id: str, fallback_dir: str | os.PathLike):
        self.uri, self.run_id = uri, run_id
        self.client = MlflowClient(tracking_uri=uri)
        self.fallback = Path(fallback_dir) / "unlogged_metrics.jsonl"
        self.failed = False

    def metrics(self, step: int, values: dict[str, float]) -> None:
        now = int(time.time() * 1000)
        values = {k: float(v) for k, v in values.items() if v is not None}
        if not self.failed:
            try:
                self.client.log_batch(self.run_id, metrics=[Metric(k, v, now, step) for k, v in values.items()])
                return
            except Exception as e:
                self._fail(e)
        self.fallback.parent.mkdir(parents=True, exist_ok=True)
        with open(self.fallback, "a") as f:
            f.write(json.dumps({"run_id": self.run_id, "step": step, "timestamp": now, "metrics": values}) + "\n")

    def artifact(self, path: str | os.PathLike, artifact_path: str | None = None) -> None:
        if self.failed:
            return
        try:
            if Path(path).is_dir():
                self.client.log_artifacts(self.run_id, str(path), artifact_path)
            else:
                self.client.log_artifact(self.run_id, str(path), artifact_path)
        except Exception as e:
            self._fail(e)

    def tags(self, values: dict[str, str]) -> None:
        if self.failed:
            return
        try:
            self.client.log_batch(self.run_id, tags=[RunTag(k, str(v)) for k, v in values.items()])
        except Exception as e:
            self._fail(e)

    def _fail(self, e: Exception) -> None:
        self.failed = True
        warnings.warn(f"MLflow at {self.uri} stopped answering ({type(e).__name__}); training goes on and metrics "
                      f"are kept in {self.fallback}; log them later with `python -m fwray.tracking replay "
                      f"{self.fallback}`", stacklevel=3)


def replay(jsonl: str | os.PathLike, uri: str | None = None) -> int:
    """Log the metrics a run kept locally while MLflow was away into their run; returns how many were logged."""
    client = MlflowClient(tracking_uri=uri or os.environ.get("MLFLOW_TRACKING_URI") or local_fallback_uri())
    count = 0
    with open(jsonl) as f:
        for line in f:
            rec = json.loads(line)
            client.log_batch(rec["run_id"], metrics=[Metric(k, v, rec["timestamp"], rec["step"])
                                                     for k, v in rec["metrics"].items()])
            count += len(rec["metrics"])
    return count


def main(argv: list[str] | None = None) -> int:
    import argparse

    parser = argparse.ArgumentParser(prog="python -m fwray.tracking")
    sub = parser.add_subparsers(dest="command", required=True)
    rp = sub.add_parser("replay", help="log metrics kept in unlogged_metrics.jsonl while MLflow was unreachable")
    rp.add_argument("jsonl")
    rp.add_argument("--uri", help="tracking URI (default: $MLFLOW_TRACKING_URI or the local store)")
    args = parser.parse_args(argv)
    n = replay(args.jsonl, args.uri)
    print(f"logged {n} metric values from {args.jsonl}")
    return 0


def version_tags() -> dict[str, str]:
    import torch

    tags = {"torch_version": torch.__version__, "mlflow_version": mlflow.__version__}
    try:
        import ray

        tags["ray_version"] = ray.__version__
    except ImportError:
        pass
    return tags


if __name__ == "__main__":
    sys.exit(main())
