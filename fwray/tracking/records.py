"""The outbox: what a run could not log to MLflow, kept as JSON lines in its run folder (replayed by fwray.tracking.replay).

One record a line, for one run: {"run_id", "uri" (the store it was meant for), and one of
  "metrics" {name: value} with "step" and "timestamp" | "params" {name: text} | "tags" {name: text} |
  "artifact" (a local path, file or folder) with "artifact_path" | "dataset" (an MLflow dataset's fields: name,
  digest, source_type, source, schema, profile) with its "context" | "model" (the run's model folder; when it is
  not there, the run's model/ artifacts) with "registered_model": logged as an MLflow model and registered
  (fwray.tracking.served) | "status" (FINISHED/FAILED) with "timestamp" and the outcome "tags"}.
fwray.tracking.live.send logs one record into its run: a `RunLogger` sends its records live through it and keeps them
here when that fails, and `replay` sends the kept ones, so the format is read in one place.
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Iterator


FALLBACK_FILE = "unlogged_metrics.jsonl"

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
