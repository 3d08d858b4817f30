"""The outbox: what a run could not log to MLflow, kept as JSON lines in its run folder, and `replay`, which logs it.

One record a line, for one run: {"run_id", "uri" (the store it was meant for), and one of
  "metrics" {name: value} with "step" and "timestamp" | "params" {name: text} | "tags" {name: text} |
  "artifact" (a local path, file or folder) with "artifact_path" | "dataset" (an MLflow dataset's fields: name,
  digest, source_type, source, schema, profile) with its "context" | "model" (the run's model folder; when it is
  not there, the run's model/ artifacts) with "registered_model": logged as an MLflow model and registered
  (fwray.tracking.served) | "status" (FINISHED/FAILED) with "timestamp" and the outcome "tags"}.
`send` logs one record into its run: `tracking.RunLogger` sends its records live through it and keeps them here when
that fails, and `replay` sends the kept ones, so the format is read in one place. The command is
`python -m fwray.tracking replay` (fwray/tracking/__main__.py). No fwray.tracking.store import here: the store
imports this module.
"""
from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path
from typing import Iterator

from mlflow.entities import Dataset, DatasetInput, InputTag, Metric, Param, RunTag
from mlflow.tracking import MlflowClient
from mlflow.utils.mlflow_tags import MLFLOW_DATASET_CONTEXT  # the input tag the UI shows beside a dataset


FALLBACK_FILE = "unlogged_metrics.jsonl"


def send(client: MlflowClient, record: dict) -> None:
    """Log one record into its run. Neither batching nor truncation is done here: MlflowClient.log_batch splits
    metrics, params and tags into requests within the server's limits (100 params or tags, 1000 entities each), and
    MLflow's store cuts a param value over 6000 characters to 6000, with a warning (mlflow/mlflow#11208; read in
    mlflow 3.17's TrackingServiceClient.log_batch and utils/validation.py)."""
    run_id = record["run_id"]
    client.log_batch(run_id,
                     metrics=[Metric(k, v, record["timestamp"], record["step"])
                              for k, v in record.get("metrics", {}).items()],
                     params=[Param(k, v) for k, v in record.get("params", {}).items()],
                     tags=[RunTag(k, v) for k, v in record.get("tags", {}).items()])
    if "artifact" in record:
        local, under = record["artifact"], record.get("artifact_path")
        if Path(local).is_dir():
            client.log_artifacts(run_id, local, under)
        else:
            client.log_artifact(run_id, local, under)
    if "dataset" in record:
        client.log_inputs(run_id, [DatasetInput(Dataset(**record["dataset"]),
                                                [InputTag(MLFLOW_DATASET_CONTEXT, record["context"])])])
    if "model" in record:
        from .served import log_run_model  # here: it loads torch and mlflow.pyfunc, which no other record needs

        log_run_model(client.tracking_uri, run_id, record["model"], record["registered_model"])
    if "status" in record:  # after the tags: they are the outcome the status closes
        client.set_terminated(run_id, record["status"], end_time=record.get("timestamp"))


# ---------------------------------------------------------------- the file


def keep(path: Path, record: dict) -> None:
    """Append one record, synced: a crash right after still leaves it in the file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as f:
        f.write(json.dumps(record) + "\n")
        f.flush()
        os.fsync(f.fileno())


def records(path: Path) -> Iterator[dict]:
    with open(path) as f:
        for line in f:
            line = line.strip()
            if line:
                try:
                    yield json.loads(line)
                except json.JSONDecodeError:  # a line cut short by a crash
                    continue


def kept_metrics(path: str | os.PathLike, run_id: str, names: tuple[str, ...]) -> dict[str, dict[int, float]]:
    """{name: {step: value}} of `run_id`'s metrics kept in `path` (empty when there is no such file)."""
    out: dict[str, dict[int, float]] = {n: {} for n in names}
    if not Path(path).is_file():
        return out
    for rec in records(Path(path)):
        if rec.get("run_id") == run_id and "metrics" in rec:
            for n in names:
                if n in rec["metrics"]:
                    out[n][rec["step"]] = rec["metrics"][n]
    return out


# ---------------------------------------------------------------- replay


def replay(jsonl: str | os.PathLike, uri: str | None = None, *, default_uri: str | None = None) -> dict[str, int]:
    """Log what a run kept locally while MLflow was away into its run: metrics, params, tags, artifacts (from their
    local paths, as they are now) and the final status. Each record goes to `uri`, else to the store it was kept for,
    else to `default_uri`. The file is renamed `*.replayed` afterwards, so a second replay cannot log twice. Returns
    counts per kind."""
    path = Path(jsonl)
    clients: dict[str | None, MlflowClient] = {}
    counts = {"metrics": 0, "params": 0, "tags": 0, "artifacts": 0, "missing_artifacts": 0, "datasets": 0,
              "models": 0, "status": 0}
    done_artifacts: set[tuple[str, str, str | None]] = set()
    for rec in list(records(path)):
        if "artifact" in rec:
            key = (rec["run_id"], rec["artifact"], rec.get("artifact_path"))
            if key in done_artifacts:  # a refreshed file (the loss curve): its latest version, once
                continue
            done_artifacts.add(key)
            if not Path(rec["artifact"]).exists():
                counts["missing_artifacts"] += 1
                print(f"fwray: warning: {rec['artifact']} is gone; not logged", file=sys.stderr)
                continue
        target = uri or rec.get("uri") or default_uri
        send(clients.setdefault(target, MlflowClient(tracking_uri=target)), rec)
        for kind in ("metrics", "params", "tags"):
            counts[kind] += len(rec.get(kind, {}))
        counts["artifacts"] += "artifact" in rec
        counts["datasets"] += "dataset" in rec
        counts["models"] += "model" in rec
        counts["status"] += "status" in rec
    done = path.with_name(path.name + ".replayed")
    if done.exists():
        done = path.with_name(f"{path.name}.replayed-{int(time.time())}")
    os.replace(path, done)
    return counts
