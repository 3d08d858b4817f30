"""`replay`: what a run kept in its outbox (fwray.tracking.records) while MLflow was away, logged into its run.
The command is `python -m fwray.tracking replay` (fwray/tracking/__main__.py)."""
from __future__ import annotations

import os
import sys
import time
from pathlib import Path

from mlflow.tracking import MlflowClient

from .live import send
from .records import records


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
