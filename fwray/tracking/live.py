"""The live path of a run's records into MLflow, the one way fwray logs metrics: `send` logs one record into its run,
a `RunLogger` sends each as it comes (params, metrics, tags, artifacts, a dataset, the final status) and keeps them in
the run's outbox (fwray.tracking.records) once MLflow stops answering, `log_evaluation` sends an evaluation's results
into the run it evaluated, and `metric_history` reads a run's metrics back (MLflow's, and those kept). Only rank 0 of
a run logs; a Ray worker builds its RunLogger from (uri, run_id, run_dir). METRICS lists the parent run's metrics.
"""
from __future__ import annotations

import os
import sys
import time
from pathlib import Path

from mlflow.entities import Dataset, DatasetInput, InputTag, Metric, Param, RunTag
from mlflow.tracking import MlflowClient
from mlflow.utils.mlflow_tags import MLFLOW_DATASET_CONTEXT  # the input tag the UI shows beside a dataset

from ..core import health
from ..errors import first_line
from . import records as outbox
from .store import TrackingUnavailable


# The parent run's metrics (names are stable: dashboards and the loss curve read them). x = optimizer step.
METRICS = {
    "train_loss": "mean training loss over the last log_interval steps (non-finite steps left out)",
    "val_loss": "validation loss, mean of eval_iters batches, at every eval_interval steps and after the last",
    "val_bpb": "the same evaluation in bits per UTF-8 byte of validation text (EOT targets left out: fwray.core.bpb)",
    "yardstick_val_loss": "loss on the yardstick file's first yardstick.tokens targets, at every evaluation: on "
                          "FineWeb's fineweb_val_000000.bin, GPT-2 small reaches 3.28 (llm.c; the README's Yardstick)",
    "lr": "learning rate of the step just taken",
    "tokens_per_s": "training throughput over the last log_interval steps, all workers (evaluation time excluded)",
    "mfu": "model FLOPs utilisation, 0..1, per worker against the GPU's dense bf16 peak (absent on CPU)",
    "peak_alloc_gb": "peak GPU memory allocated by tensors, GiB (absent on CPU)",
    "peak_reserved_gb": "peak GPU memory reserved by the caching allocator, GiB (absent on CPU)",
    "tokens_seen": "training tokens consumed so far (step x tokens per step)",
    "epoch": "passes over the prepared train split so far",
    "nonfinite_skipped": "optimizer steps skipped so far because the loss or gradient was not finite",
    "eta_s": "estimated seconds of training left",
    # logged by `python -m fwray.eval --run-id`, at the evaluated model's step
    "eval_val_loss": "fwray.eval: validation loss of the final model (the training's windows, or --all-val's)",
    "eval_val_bpb": "fwray.eval: the same in bits per UTF-8 byte (fwray.core.bpb)",
    "eval_yardstick_val_loss": "fwray.eval: yardstick_val_loss of the final model (or of --yardstick FILE)",
    "hellaswag_acc": "fwray.eval: HellaSwag accuracy, the ending with the lowest summed loss",
    "hellaswag_acc_norm": "fwray.eval: HellaSwag accuracy, the ending with the lowest loss per token",
    **health.METRICS,  # the machine at each log interval, as MLflow names system metrics
}

def now_ms() -> int:
    return int(time.time() * 1000)

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

class RunLogger:
    """Metrics, params, tags, artifacts and the final status into one run from any process.

    Each is an outbox record, sent to MLflow as it comes. On the first failure it prints one warning and from then on
    keeps every record in `<fallback_dir>/unlogged_metrics.jsonl` (artifacts as their local paths) for
    `python -m fwray.tracking replay`.
    """

    def __init__(self, uri: str, run_id: str, fallback_dir: str | os.PathLike):
        self.uri, self.run_id = uri, run_id
        self.client = MlflowClient(tracking_uri=uri)
        self.fallback = Path(fallback_dir) / outbox.FALLBACK_FILE
        self.failed = False

    def metrics(self, step: int, values: dict[str, float]) -> None:
        self._send({"step": step, "timestamp": now_ms(),
                    "metrics": {k: float(v) for k, v in values.items() if v is not None}})

    def params(self, values: dict[str, object]) -> None:
        self._send({"params": {k: str(v) for k, v in values.items()}})

    def tags(self, values: dict[str, object]) -> None:
        self._send({"tags": {k: str(v) for k, v in values.items()}})

    def artifact(self, path: str | os.PathLike, artifact_path: str | None = None) -> None:
        self._send({"artifact": str(Path(path).resolve()), "artifact_path": artifact_path})

    def dataset(self, fields: dict, context: str) -> None:
        """A dataset input of the run (`training_dataset`'s fields), with its context ("training")."""
        self._send({"dataset": fields, "context": context})

    def finish(self, ok: bool, tags: dict[str, object] | None = None) -> bool:
        """Mark the run FINISHED or FAILED, with its last `tags` (the outcome). Never raises: a status MLflow does not
        take is one warning and waits in the outbox for replay (after the records before it: once MLflow has stopped
        answering, silently, as they do). Returns whether MLflow took it."""
        status = "FINISHED" if ok else "FAILED"
        record = {"run_id": self.run_id, "uri": self.uri, "status": status, "timestamp": now_ms(),
                  **({"tags": {k: str(v) for k, v in tags.items()}} if tags else {})}
        if not self.failed:
            try:
                send(self.client, record)
                return True
            except Exception as e:
                self.failed = True
                print(f"fwray: warning: MLflow at {self.uri} did not take the run's final status {status} "
                      f"({type(e).__name__}); the status is kept in {self.fallback}: log it with "
                      f"`python -m fwray.tracking replay {self.fallback}`", file=sys.stderr, flush=True)
        self._keep(record)
        return False

    def _send(self, record: dict) -> None:
        record = {"run_id": self.run_id, "uri": self.uri, **record}
        if not self.failed:
            try:
                send(self.client, record)
                return
            except Exception as e:  # MlflowException, requests' ConnectionError, OSError from a store, ...
                self._fail(e)
        self._keep(record)

    def _keep(self, record: dict) -> None:
        try:
            outbox.keep(self.fallback, record)
        except OSError as e:  # a full disk must not stop training either
            print(f"fwray: warning: cannot write {self.fallback} ({e.strerror}); a record is lost", file=sys.stderr)

    def _fail(self, e: Exception) -> None:
        self.failed = True
        print(f"fwray: warning: MLflow at {self.uri} stopped answering ({type(e).__name__}); training goes on and "
              f"metrics are kept in {self.fallback}; log them later with `python -m fwray.tracking replay "
              f"{self.fallback}`", file=sys.stderr, flush=True)

def log_evaluation(run_id: str, uri: str, step: int, metrics: dict[str, float], tags: dict[str, str]) -> None:
    """An evaluation's results into the run it evaluated (at the model's step), in one request. A store that does not
    take them is one-line `TrackingUnavailable`: the command printed them, and there is no run folder to keep them."""
    record = {"run_id": run_id, "step": step, "timestamp": now_ms(),
              "metrics": {k: float(v) for k, v in metrics.items()}, "tags": {k: str(v) for k, v in tags.items()}}
    try:
        send(MlflowClient(tracking_uri=uri), record)
    except Exception as e:
        raise TrackingUnavailable(f"MLflow at {uri} did not take the results for run {run_id} ({type(e).__name__}: "
                                  f"{first_line(e)}); they are printed above") from None

def metric_history(uri: str, run_id: str, names: tuple[str, ...] = ("train_loss", "val_loss"),
                   fallback: str | os.PathLike | None = None,
                   max_step: int | None = None) -> dict[str, dict[int, float]]:
    """{name: {step: value}} of the run so far, from MLflow and from any JSONL of unlogged records; steps after
    `max_step` (logged after the checkpoint a restarted worker resumes from) are left out. Never raises."""
    out: dict[str, dict[int, float]] = {n: {} for n in names}
    try:
        client = MlflowClient(tracking_uri=uri)
        for n in names:
            for m in client.get_metric_history(run_id, n):
                out[n][m.step] = m.value
    except Exception as e:
        print(f"fwray: warning: could not read the run's metric history ({type(e).__name__}); the loss curve "
              "starts from here", file=sys.stderr, flush=True)
    if fallback is not None:
        for n, points in outbox.kept_metrics(fallback, run_id, names).items():
            out[n].update(points)
    if max_step is not None:
        out = {n: {s: v for s, v in pts.items() if s <= max_step} for n, pts in out.items()}
    return out
